"""Example plugins shipped with a6-runner: each is a small, tested model to copy.

Every module here is loaded at start-up (``--no-builtin-plugins`` turns that off).
"""

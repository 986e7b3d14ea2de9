"""Example plugins shipped with a6-runner: each is a small, tested model to copy.

This is a plugin directory, not a package to import: the wheel ships it as
``runner/examples/`` and the runner loads its files as it loads any ``--plugins-dir``
(this ``__init__.py`` is never run). They are served when the runner has no plugin
directory and no entry-point plugin, or with ``--examples``; ``--no-examples`` turns
them off. Their tests load them with ``runner.testing.load_plugin``.
"""

"""The runner's core layer."""

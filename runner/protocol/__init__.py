"""The runner's protocol layer."""

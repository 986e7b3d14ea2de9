"""The runner's server layer."""

"""The runner's tools layer."""

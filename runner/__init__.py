"""a6-runner: an external plugin runner for the Apache APISIX API gateway."""

__version__ = "0.1.0"

"""Logging: one short line per event on stderr, which the gateway copies to its error.log."""

from __future__ import annotations

import logging
import os
import sys


class _Formatter(logging.Formatter):
    def formatException(self, ei: object) -> str:
        # Tracebacks stay multi-line, but indented so they read as one event.
        text = super().formatException(ei)  # type: ignore[arg-type]
        return "\n".join("    " + line for line in text.splitlines())


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        _Formatter(
            f"%(asctime)s a6-runner[{os.getpid()}] %(levelname)s %(name)s: %(message)s",
            datefmt="%Y-%m-%dT%H:%M:%S",
        )
    )
    root = logging.getLogger("a6")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False

"""Logging: one short line per event on stderr, which the gateway copies to its error.log.

A misbehaving client or a plugin failing on every request must not flood that log:
lines that differ only in their numbers (call ids, tokens, sizes) are let through a few
at a time per window, and the next one that gets through says how many were held back.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections.abc import Callable

_NUMBERS = re.compile(r"\d+")


class _Formatter(logging.Formatter):
    def formatException(self, ei: object) -> str:
        # Tracebacks stay multi-line, but indented so they read as one event.
        text = super().formatException(ei)  # type: ignore[arg-type]
        return "\n".join("    " + line for line in text.splitlines())


class RepeatFilter(logging.Filter):
    """Lets at most ``burst`` lines of one kind through per ``window`` seconds."""

    def __init__(
        self,
        burst: int = 10,
        window: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        max_kinds: int = 1000,
    ) -> None:
        super().__init__()
        self.burst = burst
        self.window = window
        self._clock = clock
        self._max_kinds = max_kinds
        # kind -> [window start, lines let through in it, lines held back since last shown]
        self._kinds: dict[str, list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        kind = f"{record.name}:{_NUMBERS.sub('#', record.getMessage())}"
        now = self._clock()
        state = self._kinds.get(kind)
        if state is None:
            if len(self._kinds) >= self._max_kinds:
                self._kinds.clear()  # bounded memory whatever the messages are
            self._kinds[kind] = [now, 1, 0]
            return True
        if now - state[0] >= self.window:
            state[0], state[1] = now, 0
        if state[1] >= self.burst:
            state[2] += 1
            return False
        state[1] += 1
        if state[2]:
            record.msg = f"{record.msg} [{int(state[2])} similar line(s) held back]"
            state[2] = 0
        return True


def setup_logging(level: str, process: str | None = None) -> None:
    """Log to stderr; each line names its process: ``process`` (e.g. "worker 2 pid 1234",
    when several processes share the stream), else the pid."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        _Formatter(
            f"%(asctime)s a6-runner[{process or os.getpid()}] %(levelname)s %(name)s: %(message)s",
            datefmt="%Y-%m-%dT%H:%M:%S",
        )
    )
    handler.addFilter(RepeatFilter())
    root = logging.getLogger("a6")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False

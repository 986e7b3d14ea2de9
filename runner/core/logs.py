"""Logging: one short line per event on stderr, which the gateway copies to its error.log.

A misbehaving client or a plugin failing on every request must not flood that log:
lines that differ only in their numbers (call ids, tokens, sizes) are let through a few
at a time per window, and the next one that gets through says how many were held back.

Two formats (``--log-format``): text, one line per event, and json, one JSON object per
line for log shippers. Plugins log through :func:`plugin_logger` (``Plugin.log``): their
lines carry the plugin's name and the route (the conf's key) as fields.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, MutableMapping
from typing import Any

_NUMBERS = re.compile(r"\d+")

# The fields a record may carry beyond logging's own (``extra=``), in the order a line
# shows them.
FIELDS = ("plugin", "route")

PLUGIN_LOGGER = "a6.plugin"


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        shown = [f"{name}={getattr(record, name)}" for name in FIELDS if getattr(record, name, "")]
        if not shown:
            return text
        # After the message's first line: a traceback stays below it.
        first, newline, rest = text.partition("\n")
        return f"{first} [{' '.join(shown)}]{newline}{rest}"

    def formatException(self, ei: object) -> str:
        # Tracebacks stay multi-line, but indented so they read as one event.
        text = super().formatException(ei)  # type: ignore[arg-type]
        return "\n".join("    " + line for line in text.splitlines())


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, process, pid, worker (with
    ``--workers``: 1..N, or "supervisor"), logger, message, then the record's fields
    (plugin, route) and, after a failure, ``error`` with the traceback."""

    def __init__(self, worker: int | str | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line: dict[str, Any] = {
            "time": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "process": "a6-runner",
            "pid": record.process,
        }
        if self.worker is not None:
            line["worker"] = self.worker
        line["logger"] = record.name
        line["message"] = record.getMessage()
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


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


def setup_logging(
    level: str, process: str | None = None, fmt: str = "text", worker: int | str | None = None
) -> None:
    """Log to stderr; each line names its process: ``process`` (e.g. "worker 2 pid 1234",
    when several processes share the stream), else the pid; ``fmt`` is text or json
    (whose ``worker`` field is ``worker``).

    The handler is the root logger's, at ``level``: lines of plugins that use the
    standard ``logging.getLogger(__name__)`` come out too, at the same level and in the
    same format, rather than dropped (info) or bare (warning).
    """
    handler = logging.StreamHandler(sys.stderr)
    formatter: logging.Formatter
    if fmt == "json":
        formatter = JsonFormatter(worker)
    else:
        formatter = _Formatter(
            f"%(asctime)s a6-runner[{process or os.getpid()}] %(levelname)s %(name)s: %(message)s",
            datefmt="%Y-%m-%dT%H:%M:%S",
        )
    handler.setFormatter(formatter)
    handler.addFilter(RepeatFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    ours = logging.getLogger("a6")
    ours.handlers[:] = []
    ours.setLevel(logging.NOTSET)
    ours.propagate = True


class PluginLogger(logging.LoggerAdapter[logging.Logger]):
    """A plugin's logger: its lines carry the plugin's name and the route as fields."""

    def __init__(self, plugin: str, route: str) -> None:
        super().__init__(logging.getLogger(f"{PLUGIN_LOGGER}.{plugin}"), {})
        self.plugin = plugin
        self.route = route

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        extra = dict(kwargs.get("extra") or {})
        extra.setdefault("plugin", self.plugin)
        extra.setdefault("route", self.route)
        kwargs["extra"] = extra
        return msg, kwargs


def plugin_logger(plugin: str, route: str = "") -> PluginLogger:
    """The logger of plugin ``plugin`` serving route ``route`` (a conf's key)."""
    return PluginLogger(plugin, route)

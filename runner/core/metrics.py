"""The runner's counters: plain ints in one object per process, read at scrape time.

Counting happens on the call path, so it is kept to a dict or list increment: no
locks, no label lookups, no prometheus_client objects (whose labelled counters cost
about a microsecond per increment, the tenth of a whole call's CPU). The Prometheus
side (``runner.server.status``) turns a ``snapshot`` of these into metric families when
it is scraped; with several workers, each worker writes its snapshot to a file that the
supervisor sums (``MetricsPublisher``, ``merge_snapshots``).

Nothing here imports prometheus_client: a runner without ``--metrics-listen`` makes no
``Metrics`` at all, and the call path then pays one ``is None`` check.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeAlias

from runner.protocol.messages import ErrCode, InfoKind

# Upper bounds of the plugin duration histogram, in seconds. A plain plugin takes a few
# microseconds, one that asks the gateway a variable a few tens, a blocking one that
# calls a database milliseconds: the buckets cover all three.
PLUGIN_BUCKETS: tuple[float, ...] = (
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

# Label values, made once: the call path indexes dicts with these tuples.
RPC_NAMES = {1: "prepare_conf", 2: "http_req_call", 3: "extra_info", 4: "http_resp_call"}
OUTCOME_PASS = "pass"
OUTCOME_STOP = "stop"
OUTCOME_REWRITE = "rewrite"
OUTCOME_OK = "ok"
ERROR_OUTCOMES = {code: code.name.lower() for code in ErrCode}
INFO_KINDS = {kind: kind.name.lower() for kind in InfoKind}
_OUTCOMES = {
    "prepare_conf": (OUTCOME_OK, *ERROR_OUTCOMES.values()),
    "http_req_call": (OUTCOME_PASS, OUTCOME_STOP, OUTCOME_REWRITE, *ERROR_OUTCOMES.values()),
    "http_resp_call": (OUTCOME_PASS, OUTCOME_REWRITE, *ERROR_OUTCOMES.values()),
}

log = logging.getLogger("a6.metrics")

Snapshot: TypeAlias = dict[str, Any]
"""``Metrics.snapshot()``: JSON-able, and summed across workers by ``merge_snapshots``."""


class PluginStats:
    """One plugin hook's durations (a histogram) and failures."""

    __slots__ = ("buckets", "failures", "total")

    def __init__(self) -> None:
        # One count per bound, then one for +Inf: cumulated at scrape time, not here.
        self.buckets = [0] * (len(PLUGIN_BUCKETS) + 1)
        self.total = 0.0
        self.failures = 0

    def observe(self, seconds: float) -> None:
        self.buckets[bisect_left(PLUGIN_BUCKETS, seconds)] += 1
        self.total += seconds

    def failed(self, seconds: float) -> None:
        """A run that raised (a timeout's cancellation is timed, not a failure)."""
        self.observe(seconds)
        if not isinstance(sys.exc_info()[1], asyncio.CancelledError):
            self.failures += 1


class Metrics:
    """Every count of one runner process. Its attributes are written on the call path
    (from the event loop; a ``blocking`` plugin's duration from its thread) and read by
    ``snapshot``, which copies each container first: a scrape in another thread never
    iterates a dict the loop is growing."""

    def __init__(self) -> None:
        # rpc name -> outcome -> calls answered; made with every outcome the RPC can
        # have, so that the dispatcher counts with one increment (and a scrape shows
        # zeros rather than missing series).
        self.calls: dict[str, dict[str, int]] = {
            rpc: dict.fromkeys(outcomes, 0) for rpc, outcomes in _OUTCOMES.items()
        }
        # (plugin name, hook) -> its stats.
        self.plugins: dict[tuple[str, str], PluginStats] = {}
        # info kind -> [queries answered, bytes received].
        self.extra_info: dict[str, list[int]] = {}
        # "new" (a chain built) or "reused" (the same route's conf again).
        self.confs_prepared = {"new": 0, "reused": 0}
        # "size" (max_confs reached) or "expired" (unused past their lifetime).
        self.conf_evictions = {"size": 0, "expired": 0}
        # reason -> frames (or connections) refused before any call.
        self.frames_rejected: dict[str, int] = {}
        self.connections_refused = 0
        # Calls past their deadline (answered SERVICE_UNAVAILABLE by the exchange).
        self.call_timeouts = 0
        # Read at snapshot time, set by whoever owns what they count.
        self.open_connections: Callable[[], int] = lambda: 0
        self.confs_held: Callable[[], int] = lambda: 0

    # ------------------------------------------------------------- the call path

    def count_call(self, rpc: str, outcome: str) -> None:
        """Count one call (the dispatcher counts its hot paths through ``calls_of``)."""
        counts = self.calls_of(rpc)
        counts[outcome] = counts.get(outcome, 0) + 1

    def calls_of(self, rpc: str) -> dict[str, int]:
        """The outcome counts of one RPC type, to increment: ``counts[outcome] += 1``."""
        counts = self.calls.get(rpc)
        if counts is None:
            counts = self.calls[rpc] = dict.fromkeys(ERROR_OUTCOMES.values(), 0)
        return counts

    def count_rejected(self, reason: str) -> None:
        self.frames_rejected[reason] = self.frames_rejected.get(reason, 0) + 1

    def plugin(self, name: str, hook: str) -> PluginStats:
        """The stats of one plugin hook, made on first use (when a chain is built)."""
        key = (name, hook)
        stats = self.plugins.get(key)
        if stats is None:
            stats = self.plugins[key] = PluginStats()
        return stats

    def count_extra_info(self, kind: InfoKind, answer: bytes | None) -> None:
        entry = self.extra_info.get(INFO_KINDS[kind])
        if entry is None:
            entry = self.extra_info[INFO_KINDS[kind]] = [0, 0]
        entry[0] += 1
        if answer:
            entry[1] += len(answer)

    def timed_hook(
        self, name: str, hook_name: str, hook: Callable[[Any], Any], awaited: bool
    ) -> Callable[[Any], Any]:
        """``hook``, measured into this plugin's histogram and failure count. Built once
        per chain when metrics are on; the chain calls it exactly as it calls the hook."""
        stats = self.plugin(name, hook_name)
        buckets = stats.buckets
        clock = time.perf_counter
        # The histogram's observe, inlined: this runs once per plugin per call.
        if awaited:

            async def timed_async(call: Any) -> Any:
                start = clock()
                try:
                    result = await hook(call)
                except BaseException:
                    stats.failed(clock() - start)
                    raise
                elapsed = clock() - start
                buckets[bisect_left(PLUGIN_BUCKETS, elapsed)] += 1
                stats.total += elapsed
                return result

            return timed_async

        def timed(call: Any) -> Any:
            start = clock()
            try:
                result = hook(call)
            except BaseException:
                stats.failed(clock() - start)
                raise
            elapsed = clock() - start
            buckets[bisect_left(PLUGIN_BUCKETS, elapsed)] += 1
            stats.total += elapsed
            return result

        return timed

    # ----------------------------------------------------------------- reading

    def snapshot(self) -> Snapshot:
        """Every count as plain JSON-able data (see ``merge_snapshots``)."""
        plugins = {
            f"{name}\0{hook}": [list(s.buckets), s.total, s.failures]
            for (name, hook), s in dict(self.plugins).items()
        }
        return {
            "calls": {
                f"{rpc}\0{outcome}": n
                for rpc, counts in dict(self.calls).items()
                for outcome, n in dict(counts).items()
            },
            "plugins": plugins,
            "extra_info": {kind: list(v) for kind, v in dict(self.extra_info).items()},
            "confs_prepared": dict(self.confs_prepared),
            "conf_evictions": dict(self.conf_evictions),
            "frames_rejected": dict(self.frames_rejected),
            "connections_refused": self.connections_refused,
            "call_timeouts": self.call_timeouts,
            "gauges": {
                "open_connections": self.open_connections(),
                "confs_held": self.confs_held(),
            },
        }


def _add(total: Any, part: Any) -> Any:
    """``part`` summed into ``total``: numbers added, lists element by element, dicts
    key by key (a key only one side has is kept as it is)."""
    if isinstance(part, dict):
        out = dict(total) if isinstance(total, dict) else {}
        for key, value in part.items():
            out[key] = _add(out[key], value) if key in out else value
        return out
    if isinstance(part, list):
        if not isinstance(total, list) or len(total) != len(part):
            return list(part)
        return [_add(a, b) for a, b in zip(total, part, strict=True)]
    if isinstance(part, (int, float)) and isinstance(total, (int, float)):
        return total + part
    return part


def merge_snapshots(snapshots: list[Snapshot]) -> Snapshot:
    """The sum of several processes' snapshots: counters and gauges alike add up (the
    gauges count connections and confs, which are per process)."""
    total: Snapshot = {}
    for snap in snapshots:
        total = _add(total, snap)
    return total


def without_gauges(snapshot: Snapshot) -> Snapshot:
    """A dead worker's counts: its counters stay in the totals, its gauges do not."""
    return {key: value for key, value in snapshot.items() if key != "gauges"}


# --------------------------------------------------------------- several workers

SNAPSHOT_PREFIX = "worker-"


def snapshot_path(directory: Path, number: int, pid: int) -> Path:
    return directory / f"{SNAPSHOT_PREFIX}{number}-{pid}.json"


def write_snapshot(path: Path, snapshot: Snapshot) -> None:
    """Replace ``path`` with ``snapshot`` atomically: a reader sees the old or the new."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(snapshot, f, separators=(",", ":"))
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def read_snapshot(path: Path) -> Snapshot | None:
    """The snapshot at ``path``; None if there is none (yet, or any more)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class MetricsPublisher:
    """A worker's side of the sum: its snapshot, rewritten while it changes.

    The supervisor serves the sum of every worker's file, so a scrape sees a worker's
    calls at most ``interval`` seconds late; a worker that stops writes a last one.
    """

    def __init__(self, metrics: Metrics, path: Path, interval: float = 0.5) -> None:
        self.metrics = metrics
        self.path = path
        self.interval = interval
        self._last: Snapshot | None = None

    def publish(self) -> None:
        snapshot = self.metrics.snapshot()
        if snapshot != self._last:
            write_snapshot(self.path, snapshot)
            self._last = snapshot

    async def run(self, sleep: Callable[[float], Awaitable[None]]) -> None:
        """Publish now (the file also says the worker serves), then every ``interval``."""
        failing = False
        while True:
            try:
                self.publish()
                failing = False
            except OSError as exc:
                if not failing:  # once per spell of failures, not twice a second
                    log.warning("cannot write the metrics snapshot %s: %s", self.path, exc)
                failing = True
            await sleep(self.interval)

"""``a6-runner bench``: drive a runner the way the gateway does, and measure it.

The conversation is the gateway's: one PrepareConf with the route's plugin conf, then N
kept-alive connections, each with exactly one call in flight, ExtraInfo queries answered
from the given variables and body. Everything that can be prepared before the clock
starts is: the request frame is encoded once per connection, and the answer to each
distinct ExtraInfo query is encoded the first time it is asked and then replayed. In the
measured loop a reply is judged by its frame type alone; a sample of replies (the first
of each connection, then every ``verify_every``-th) is decoded in full and every offset
checked, so a runner that answers garbage cannot look fast. Messages go through the
gateway's side of ``runner.protocol.messages``, frames through ``FrameDecoder``.

The runner's CPU time per call comes from ``/proc/<pid>/stat`` (user + system time of
every thread) of the runner and all its descendants (a supervisor's workers), sampled at
both ends of the measured window, when the process is known: spawned by the bench, given
with ``--pid``, or found as the listener of the socket.

One client process saturates one core: ``--processes N`` shares the connections among N
child processes and merges their results (latency percentiles over all their calls).
The command exits with status 1 if more calls failed than ``--max-error-rate`` allows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from array import array
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import click

if TYPE_CHECKING:
    from click._termui_impl import ProgressBar

from runner.protocol import messages
from runner.protocol.frame import RPC, FrameDecoder, FrameTooLarge, encode_frame
from runner.protocol.messages import InfoKind, MalformedMessage, Rewrite, Stop
from runner.tools.client import Connection, RunnerError, strip_unix_prefix, wait_for_socket

__all__ = [
    "BenchConfig",
    "BenchResult",
    "RequestShape",
    "SpawnedRunner",
    "find_listener_pid",
    "format_result",
    "merge_results",
    "parse_conf",
    "process_cpu_seconds",
    "process_rss_kib",
    "process_tree",
    "run_bench",
    "run_bench_processes",
    "split_config",
]

Phase = Literal["request", "response"]

_ERROR_KINDS: Final = {
    0: "bad_request",
    1: "service_unavailable",
    2: "conf_token_not_found",
}
_CLK_TCK: Final = os.sysconf("SC_CLK_TCK")
# Answers to distinct ExtraInfo queries kept per run: plugins ask for a few names, but a
# plugin asking for ever new names must not grow the bench without bound.
_MAX_CACHED_ANSWERS: Final = 4096
_DEFAULT_VARS: Final[Mapping[str, str]] = {
    "remote_addr": "127.0.0.1",
    "server_addr": "127.0.0.1",
    "server_port": "9080",
    "scheme": "http",
    "request_time": "0.000",
}
FILLER_HEADERS: Final = (
    ("host", "bench.example.com"),
    ("user-agent", "a6-runner-bench"),
    ("accept", "*/*"),
    ("accept-encoding", "gzip, deflate"),
    ("content-type", "application/json"),
    ("x-request-id", "5f0c6f9e-8a1b-4c1e-9d1a-2b7e0f3c4d5e"),
    ("x-forwarded-for", "10.0.0.1"),
    ("authorization", "Bearer 0123456789abcdef"),
)


# ------------------------------------------------------------------ configuration


@dataclass(frozen=True, slots=True)
class RequestShape:
    """What every call looks like. Headers beyond the explicit ones are realistic fillers
    (host, user-agent, ...) then ``x-bench-N``, up to ``header_count`` in all."""

    phase: Phase = "request"
    method: str = "GET"
    path: str = "/bench"
    header_count: int = 8
    headers: tuple[tuple[str, str], ...] = ()
    args: tuple[tuple[str, str | None], ...] = ()
    body_size: int = 0  # answered to ReqBody; 0 = no body
    resp_body_size: int = 0  # answered to RespBody (response phase); 0 = no body
    status: int = 200  # the upstream status, response phase
    body_data: bytes | None = None  # a real request body; replaces body_size's filler
    resp_body_data: bytes | None = None  # a real upstream body; replaces the filler
    # The upstream's headers (response phase); None: the request's headers stand in.
    resp_headers: tuple[tuple[str, str], ...] | None = None
    vars: tuple[tuple[str, str], ...] = tuple(_DEFAULT_VARS.items())

    def all_headers(self) -> list[tuple[str, str]]:
        out = list(self.headers)
        fillers = iter(FILLER_HEADERS)
        n = 0
        while len(out) < self.header_count:
            name, value = next(fillers, (f"x-bench-{n}", f"value-{n}"))
            n += 1
            if all(name != have for have, _ in out):
                out.append((name, value))
        return out

    def body(self) -> bytes | None:
        if self.body_data is not None:
            return self.body_data
        return _pattern(self.body_size) if self.body_size else None

    def resp_body(self) -> bytes | None:
        if self.resp_body_data is not None:
            return self.resp_body_data
        return _pattern(self.resp_body_size) if self.resp_body_size else None

    def upstream_headers(self) -> list[tuple[str, str]]:
        return self.all_headers() if self.resp_headers is None else list(self.resp_headers)

    def describe(self) -> dict[str, Any]:
        """The shape as JSON can hold it: bodies by their size."""
        data = asdict(self)
        del data["body_data"], data["resp_body_data"]
        body, resp_body = self.body(), self.resp_body()
        data["body_size"] = len(body) if body is not None else 0
        data["resp_body_size"] = len(resp_body) if resp_body is not None else 0
        return data


def _pattern(size: int) -> bytes:
    unit = b'{"k":"0123456789abcdef"},'
    return (unit * (size // len(unit) + 1))[:size]


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """One bench run. It ends when ``requests`` calls are done or ``duration`` seconds
    have passed (after ``warmup``), whichever comes first."""

    socket: str
    conf: tuple[tuple[str, str], ...]
    shape: RequestShape = field(default_factory=RequestShape)
    connections: int = 16
    requests: int | None = None
    duration: float = 10.0
    warmup: float = 1.0
    call_timeout: float = 60.0  # the gateway's read timeout
    verify_every: int = 1000
    # The gateway never reads a reply's id, but a runner should echo it: checked unless
    # the server is known not to (the canned-reply floor server).
    check_id: bool = True
    pid: int | None = None
    key: str = "route#bench#ext-plugin-pre-req#1"

    def check(self) -> None:
        if self.connections < 1:
            raise ValueError("connections must be at least 1")
        if self.requests is not None and self.requests < 1:
            raise ValueError("requests must be at least 1")
        if self.duration <= 0 or self.warmup < 0 or self.call_timeout <= 0:
            raise ValueError("duration and call_timeout must be positive, warmup not negative")
        if self.shape.method not in messages.METHOD_CODES:
            raise ValueError(f"unknown method {self.shape.method!r}")


# ------------------------------------------------------------------------ results


@dataclass(slots=True)
class BenchResult:
    connections: int
    calls: int  # calls ended in the measured window, errors included
    ok: int
    errors: dict[str, int]
    seconds: float
    throughput: float  # calls per second
    latency_ms: dict[str, float]  # p50, p90, p99, p99.9, max, mean over ok calls
    runner_pid: int | None
    runner_cpu_us_per_call: float | None
    runner_rss_kib: tuple[int, int] | None  # at the start and the end of the window
    bench_cpu_us_per_call: float | None
    reconnects: int
    first_reply: str
    shape: dict[str, Any]
    stopped_by: str  # "requests" or "duration": the bound that ended the run
    processes: int = 1  # client processes that made the load

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["runner_rss_kib"] = (
            None
            if self.runner_rss_kib is None
            else {"start": self.runner_rss_kib[0], "end": self.runner_rss_kib[1]}
        )
        return data


def percentile(sorted_values: Sequence[int], q: float) -> int:
    """The nearest-rank percentile ``q`` (0-100) of already sorted values."""
    if not sorted_values:
        return 0
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


# ------------------------------------------------------------------ process facts


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state is [0])."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ')'.
    return raw.rsplit(")", 1)[1].split()


def process_tree(pid: int) -> list[int]:
    """``pid`` and every live descendant of it (a supervisor's workers, their children)."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            fields = _stat_fields(int(proc.name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(proc.name))
    tree = [pid]
    for parent in tree:  # grows while it is walked: breadth first
        tree.extend(children.get(parent, ()))
    return tree


def process_cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time of ``pid`` and all its descendants, every thread, with
    the time of children already reaped; None if ``pid`` cannot be read."""
    total = 0
    for member in process_tree(pid):
        fields = _stat_fields(member)
        if fields is None:
            if member == pid:
                return None
            continue  # exited since the tree was listed
        # utime, stime, then cutime and cstime: reaped children count in their parent.
        total += sum(int(f) for f in fields[11:15])
    return total / _CLK_TCK


def process_rss_kib(pid: int) -> int | None:
    """Resident memory of ``pid`` and all its descendants; None if ``pid`` cannot be read."""
    total = 0
    for member in process_tree(pid):
        rss = _rss_kib(member)
        if rss is None and member == pid:
            return None
        total += rss or 0
    return total


def _rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def find_listener_pid(path: str) -> int | None:
    """The process listening on the Unix socket ``path``, if this user can see it."""
    try:
        lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    except OSError:
        return None
    inode = None
    for line in lines:
        parts = line.split()
        # Flags 00010000 is __SO_ACCEPTCON: the listening socket, not an accepted one.
        if len(parts) >= 8 and parts[7] == path and int(parts[3], 16) & 0x10000:
            inode = parts[6]
            break
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) == target:
                        return int(proc.name)
    return None


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --------------------------------------------------------------------- the load


class _Run:
    """What every connection of one run shares: the clock, the limits, the tallies."""

    def __init__(self, config: BenchConfig, request_frames: list[bytes], expect: int) -> None:
        self.config = config
        self.request_frames = request_frames
        self.expect = expect
        shape = config.shape
        self.vars = {name: value.encode() for name, value in shape.vars}
        self.body = shape.body()
        self.resp_body = shape.resp_body()
        self.answers: dict[bytes, bytes] = {}
        self.latencies = array("q")
        self.errors: Counter[str] = Counter()
        self.measuring = False
        self.stopping = False
        self.stopped_by = "duration"
        self.issued = 0
        self.warmup_calls = 0
        self.completed = 0
        self.ok = 0
        self.reconnects = 0
        self.first_reply = ""
        self.t0 = 0
        self.t_end = 0
        self.cpu_start: float | None = None
        self.own_cpu_start = 0.0
        self.rss_start: int | None = None
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.done: asyncio.Future[None] = loop.create_future()
        self.slots: list[_Slot] = []
        self.reconnecting: set[asyncio.Task[None]] = set()
        now = time.perf_counter_ns()
        self.warmup_end = now + int(config.warmup * 1e9)
        self.deadline = self.warmup_end + int(config.duration * 1e9)

    # Called with the time a call ended; decides whether the slot sends another.
    def may_issue(self, now: int) -> bool:
        if self.stopping:
            return False
        if not self.measuring and now >= self.warmup_end:
            self.start_window(now)
        if now >= self.deadline:
            self.stop("duration")
            return False
        if self.measuring:
            limit = self.config.requests
            if limit is not None and self.issued >= limit:
                self.stop("requests")
                return False
            self.issued += 1
        return True

    def start_window(self, now: int) -> None:
        self.measuring = True
        self.t0 = now
        pid = self.config.pid
        if pid is not None:
            self.cpu_start = process_cpu_seconds(pid)
            self.rss_start = process_rss_kib(pid)
        self.own_cpu_start = _own_cpu_seconds()

    def stop(self, why: str) -> None:
        if not self.stopping:
            self.stopping = True
            self.stopped_by = why
        self.check_done()

    def check_done(self) -> None:
        if self.stopping and not self.done.done() and not any(s.busy for s in self.slots):
            self.t_end = time.perf_counter_ns()
            self.done.set_result(None)

    def answer(self, query_payload: bytes) -> bytes:
        """The ExtraInfo answer frame to a query, encoded once per distinct query.

        Raises MalformedMessage on a query the gateway could not read either."""
        cached = self.answers.get(query_payload)
        if cached is not None:
            return cached
        query = messages.decode_extra_info_query(query_payload)
        if query.kind is InfoKind.VAR:
            result = self.vars.get(query.name) if query.name is not None else None
        elif query.kind is InfoKind.REQ_BODY:
            result = self.body
        else:
            result = self.resp_body if self.config.shape.phase == "response" else None
        reply = encode_frame(RPC.EXTRA_INFO, messages.encode_extra_info_reply(result))
        if len(self.answers) < _MAX_CACHED_ANSWERS:
            self.answers[query_payload] = reply
        return reply

    def verify(self, payload: bytes, call_id: int) -> str | None:
        """Decode a reply in full; a description, or None if it is malformed or (ids
        being checked) answers another call."""
        try:
            if self.expect == RPC.HTTP_REQ_CALL:
                reply = messages.decode_req_call_reply(payload)
                if self.config.check_id and reply.id != call_id:
                    return None
                return _describe_action(reply.action)
            resp = messages.decode_resp_call_reply(payload)
        except MalformedMessage:
            return None
        if self.config.check_id and resp.id != call_id:
            return None
        headers = _entries(resp.headers) if resp.headers else "unchanged"
        body = "unchanged" if not resp.body else f"{len(resp.body)} bytes"
        # Not shortened: every header of the reply replaces the upstream's, all matter.
        return f"response: status {resp.status or 'unchanged'}, headers {headers}, body {body}"


def _entries(entries: Sequence[tuple[str, str | None]]) -> str:
    return ", ".join(
        name if value is None else f"{name}={_shorten(value, 40)}" for name, value in entries
    )


def _describe_action(action: Stop | Rewrite | None) -> str:
    """One line saying what a reply asks the gateway to do, for the report."""
    if action is None:
        return "pass through"
    if isinstance(action, Stop):
        text = f"stop: status {action.status}, {len(action.body)}-byte body"
        if action.headers:
            text += f", headers {_entries(action.headers)}"
        return text
    parts = []
    if action.path is not None:
        parts.append(f"path {action.path}")
    if action.headers:
        parts.append(f"headers {_entries(action.headers)}")
    if action.args:
        parts.append(f"args {_entries(action.args)}")
    if action.resp_headers:
        parts.append(f"response headers {_entries(action.resp_headers)}")
    if action.body is not None:
        parts.append(f"{len(action.body)}-byte body")
    return "rewrite: " + ("; ".join(parts) or "nothing")


def _shorten(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Slot(asyncio.Protocol):
    """One kept-alive connection with at most one call in flight."""

    def __init__(self, run: _Run, index: int) -> None:
        self.run = run
        self.index = index
        self.call_id = index  # like the gateway's worker_id << 22 | counter, fixed here
        self.request = run.request_frames[index]
        self.transport: asyncio.Transport | None = None
        self.frames = FrameDecoder()
        self.busy = False
        self.started = 0
        self.measured = False
        self.replies = 0
        self.closed: asyncio.Future[None] = run.loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.closed.done():
            self.closed.set_result(None)
        if self.busy:
            self.fail("connection_lost")

    def send(self) -> None:
        run = self.run
        self.measured = run.measuring
        self.busy = True
        self.started = time.perf_counter_ns()
        self.transport.write(self.request)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        frames = self.frames
        # One whole frame per read is the rule on a quiet socket: no buffering then.
        whole = frames.whole_frame(data)
        if whole is not None:
            self.on_frame(*whole)
            return
        frames.feed(data)
        while self.transport is not None:
            try:
                frame = frames.next_frame()
            except FrameTooLarge:  # cannot happen at the protocol's own limit
                self.fail("unexpected_frame")
                return
            if frame is None:
                return
            self.on_frame(*frame)

    def on_frame(self, rpc_type: int, payload: bytes) -> None:
        run = self.run
        if not self.busy:
            self.fail("unexpected_frame")
            return
        if rpc_type == run.expect:
            now = time.perf_counter_ns()
            self.busy = False
            self.replies += 1
            if self.replies == 1 or (
                run.config.verify_every and self.replies % run.config.verify_every == 0
            ):
                described = run.verify(payload, self.call_id)
                if described is None:
                    self.end_call("bad_reply", now)
                    return
                if not run.first_reply:
                    run.first_reply = described
            if self.measured:
                run.latencies.append(now - self.started)
                run.ok += 1
                run.completed += 1
            else:
                run.warmup_calls += 1
            self.next(now)
        elif rpc_type == RPC.EXTRA_INFO:
            try:
                answer = run.answer(payload)
            except MalformedMessage:
                self.fail("bad_extra_info_query")
                return
            self.transport.write(answer)  # type: ignore[union-attr]
        elif rpc_type == RPC.ERROR:
            try:
                code = messages.decode_error(payload)
            except MalformedMessage:
                self.fail("bad_error_frame")
                return
            self.busy = False
            self.end_call(_ERROR_KINDS.get(code, f"error_code_{code}"), time.perf_counter_ns())
        else:
            self.fail("unexpected_frame")

    def end_call(self, kind: str, now: int) -> None:
        """A call ended in error, the connection still in step."""
        run = self.run
        self.busy = False
        if self.measured:
            run.errors[kind] += 1
            run.completed += 1
        self.next(now)

    def next(self, now: int) -> None:
        if self.run.may_issue(now) and self.transport is not None:
            self.send()
        else:
            self.run.check_done()

    def fail(self, kind: str) -> None:
        """A call ended with the connection out of step: drop it, as the gateway does."""
        run = self.run
        was_busy = self.busy
        self.busy = False
        if was_busy and self.measured:
            run.errors[kind] += 1
            run.completed += 1
        elif not was_busy and kind != "connection_lost":
            run.errors[kind] += 1
        if self.transport is not None:
            transport, self.transport = self.transport, None
            transport.abort()
        self.frames = FrameDecoder()
        run.check_done()
        if not run.stopping:
            task = run.loop.create_task(_reconnect(run, self.index))
            run.reconnecting.add(task)  # the loop holds tasks weakly
            task.add_done_callback(run.reconnecting.discard)

    def timed_out(self, now: int, limit_ns: int) -> bool:
        return self.busy and now - self.started > limit_ns


async def _open_slot(run: _Run, index: int) -> _Slot:
    path = strip_unix_prefix(run.config.socket)
    _, slot = await run.loop.create_unix_connection(lambda: _Slot(run, index), path)
    return slot


async def _reconnect(run: _Run, index: int) -> None:
    while not run.stopping:
        try:
            async with asyncio.timeout(1.0):  # the gateway's connect timeout
                slot = await _open_slot(run, index)
        except (OSError, TimeoutError):
            run.errors["connect_failed"] += 1
            await asyncio.sleep(0.1)
            continue
        run.reconnects += 1
        run.slots[index] = slot
        if run.may_issue(time.perf_counter_ns()):
            slot.send()
        else:
            slot.transport.abort()  # type: ignore[union-attr]
            run.check_done()
        return
    run.check_done()


async def _watchdog(run: _Run, progress: Callable[[_Run], None] | None) -> None:
    limit_ns = int(run.config.call_timeout * 1e9)
    tick = min(0.25, run.config.call_timeout / 4)
    while not run.done.done():
        await asyncio.sleep(tick)
        now = time.perf_counter_ns()
        if not run.stopping and now >= run.deadline:
            run.stop("duration")
        for slot in list(run.slots):
            if slot.timed_out(now, limit_ns):
                slot.fail("timeout")
        if progress is not None:
            progress(run)


def _encode_requests(config: BenchConfig, token: int) -> tuple[list[bytes], int]:
    shape = config.shape
    frames = []
    for index in range(config.connections):
        if shape.phase == "request":
            payload = messages.encode_req_call(
                conf_token=token,
                id=index,
                method=shape.method,
                path=shape.path,
                args=shape.args,
                headers=shape.all_headers(),
            )
            frames.append(encode_frame(RPC.HTTP_REQ_CALL, payload))
        else:
            payload = messages.encode_resp_call(
                conf_token=token, id=index, status=shape.status, headers=shape.upstream_headers()
            )
            frames.append(encode_frame(RPC.HTTP_RESP_CALL, payload))
    expect = RPC.HTTP_REQ_CALL if shape.phase == "request" else RPC.HTTP_RESP_CALL
    return frames, expect


async def prepare(config: BenchConfig) -> int:
    """PrepareConf on a connection of its own, as the gateway does; returns the token.

    Raises OSError saying what is at the socket path if nothing accepts connections."""
    path = strip_unix_prefix(config.socket)
    try:
        conn = await Connection.open(path, io_timeout=config.call_timeout)
    except FileNotFoundError:
        raise OSError(f"no socket at {path}: is the runner running with this --listen?") from None
    except ConnectionRefusedError:
        raise OSError(
            f"nothing accepts connections on {path}: the runner is not running there"
            " (a socket file left behind?)"
        ) from None
    except OSError as exc:
        raise OSError(f"cannot connect to the runner at {path}: {exc.strerror or exc}") from None
    async with conn:
        return await conn.prepare_conf(list(config.conf), config.key)


async def run_bench(
    config: BenchConfig, progress: Callable[[_Run], None] | None = None
) -> BenchResult:
    """Run the load described by ``config`` against a runner that is already listening.

    Raises RunnerError if PrepareConf fails (nothing could be measured), OSError if the
    socket does not accept connections.
    """
    return _result(await _measure(config, progress))


async def _measure(config: BenchConfig, progress: Callable[[_Run], None] | None) -> _Run:
    config.check()
    token = await prepare(config)
    frames, expect = _encode_requests(config, token)
    run = _Run(config, frames, expect)
    try:
        run.slots = [await _open_slot(run, i) for i in range(config.connections)]
    except BaseException:
        for slot in run.slots:
            if slot.transport is not None:
                slot.transport.abort()
        raise
    run.warmup_end = time.perf_counter_ns() + int(config.warmup * 1e9)
    run.deadline = run.warmup_end + int(config.duration * 1e9)
    if config.warmup == 0:
        run.start_window(time.perf_counter_ns())
    watchdog = run.loop.create_task(_watchdog(run, progress))
    for slot in run.slots:
        if run.may_issue(time.perf_counter_ns()):
            slot.send()
    run.check_done()
    try:
        await run.done
    finally:
        for task in [watchdog, *run.reconnecting]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for slot in run.slots:
            if slot.transport is not None:
                slot.transport.close()
        for slot in run.slots:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await asyncio.shield(slot.closed)
    return run


def _latency_summary(lat: Sequence[int]) -> dict[str, float]:
    """Milliseconds, from sorted nanoseconds."""
    ms = 1e-6
    return {
        "p50": percentile(lat, 50) * ms,
        "p90": percentile(lat, 90) * ms,
        "p99": percentile(lat, 99) * ms,
        "p99.9": percentile(lat, 99.9) * ms,
        "max": (lat[-1] if lat else 0) * ms,
        "mean": (sum(lat) / len(lat) if lat else 0) * ms,
    }


def _result(run: _Run) -> BenchResult:
    config = run.config
    if not run.measuring:  # stopped before the warm-up ended
        run.start_window(run.t_end)
    seconds = max(run.t_end - run.t0, 1) / 1e9
    latency = _latency_summary(sorted(run.latencies))
    calls = run.completed
    runner_cpu = None
    rss = None
    if config.pid is not None:
        cpu_end = process_cpu_seconds(config.pid)
        if run.cpu_start is not None and cpu_end is not None and calls:
            runner_cpu = (cpu_end - run.cpu_start) / calls * 1e6
        rss_end = process_rss_kib(config.pid)
        if run.rss_start is not None and rss_end is not None:
            rss = (run.rss_start, rss_end)
    own = (_own_cpu_seconds() - run.own_cpu_start) / calls * 1e6 if calls else None
    return BenchResult(
        connections=config.connections,
        calls=calls,
        ok=run.ok,
        errors=dict(sorted(run.errors.items())),
        seconds=seconds,
        throughput=calls / seconds,
        latency_ms=latency,
        runner_pid=config.pid,
        runner_cpu_us_per_call=runner_cpu,
        runner_rss_kib=rss,
        bench_cpu_us_per_call=own,
        reconnects=run.reconnects,
        first_reply=run.first_reply or "none",
        shape=config.shape.describe(),
        stopped_by=run.stopped_by,
    )


# ------------------------------------------------------------ several processes
#
# One client process saturates one core long before a runner with several workers does.
# With ``processes`` > 1 the load comes from that many child processes, each running
# ``_measure`` over its share of the connections (and of ``requests``) with the same
# warm-up and duration, so that their measured windows nearly coincide. Each sends back
# its result and its raw latencies; percentiles are taken over all of them.


def split_config(config: BenchConfig, processes: int) -> list[BenchConfig]:
    """``config``'s connections and request count shared out among ``processes``."""
    if not 1 <= processes <= config.connections:
        raise ValueError("processes must be between 1 and the number of connections")

    def share(total: int, i: int) -> int:
        return total // processes + (i < total % processes)

    return [
        replace(
            config,
            connections=share(config.connections, i),
            requests=None if config.requests is None else max(1, share(config.requests, i)),
        )
        for i in range(processes)
    ]


_CHILD = "from runner.tools.bench import _client_process; _client_process()"


def _client_process() -> None:
    """A child's life: a pickled BenchConfig on stdin, the pickled ``(BenchResult,
    latencies)`` on stdout; a failure as text on stderr and status 1."""
    import uvloop

    config: BenchConfig = pickle.loads(sys.stdin.buffer.read())

    async def main() -> tuple[BenchResult, bytes]:
        run = await _measure(config, None)
        return _result(run), run.latencies.tobytes()

    try:
        outcome = uvloop.run(main())
    except (RunnerError, OSError, RuntimeError, TimeoutError) as exc:
        sys.stderr.write(f"{exc}\n")
        raise SystemExit(1) from None
    sys.stdout.buffer.write(pickle.dumps(outcome))


async def run_bench_processes(
    config: BenchConfig, processes: int, tick: Callable[[float], None] | None = None
) -> BenchResult:
    """``run_bench`` with the load made by ``processes`` child processes, results merged.

    The runner's CPU time per call is its CPU time over the (nearly common) window,
    averaged over the children's views of it, divided by all the calls. ``tick`` is
    called with the seconds elapsed, about four times a second.
    """
    if processes == 1:
        return await run_bench(config)
    shares = split_config(config, processes)
    for share in shares:
        share.check()
    # One PrepareConf first, so that a rejected conf or a missing socket is reported once
    # and as run_bench reports it (each child prepares again, as gateway workers would).
    await prepare(config)
    children = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _CHILD,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in shares
    ]
    started = time.monotonic()
    waits = asyncio.gather(
        *(
            child.communicate(pickle.dumps(share))
            for child, share in zip(children, shares, strict=True)
        )
    )
    try:
        while True:
            done, _ = await asyncio.wait([waits], timeout=0.25)
            if done:
                break
            if tick is not None:
                tick(time.monotonic() - started)
        outputs = waits.result()
    finally:
        waits.cancel()  # a no-op once done; on cancellation, stop waiting for the pipes
        for child in children:
            if child.returncode is None:
                child.kill()
                await child.wait()
    parts: list[tuple[BenchResult, bytes]] = []
    for child, (out, err) in zip(children, outputs, strict=True):
        if child.returncode != 0:
            raise RuntimeError(f"a client process failed: {err.decode(errors='replace').strip()}")
        parts.append(pickle.loads(out))
    return merge_results(config, parts)


def merge_results(config: BenchConfig, parts: Sequence[tuple[BenchResult, bytes]]) -> BenchResult:
    results = [result for result, _ in parts]
    latencies = array("q")
    for _, raw in parts:
        latencies.frombytes(raw)
    calls = sum(r.calls for r in results)
    errors: Counter[str] = Counter()
    for r in results:
        errors.update(r.errors)
    # Each child saw the runner's whole CPU time over its window, not a share of it.
    cpu_views = [
        r.runner_cpu_us_per_call * r.calls for r in results if r.runner_cpu_us_per_call is not None
    ]
    runner_cpu = sum(cpu_views) / len(cpu_views) / calls if cpu_views and calls else None
    bench_cpu = [
        r.bench_cpu_us_per_call * r.calls for r in results if r.bench_cpu_us_per_call is not None
    ]
    first = results[0]
    return BenchResult(
        connections=sum(r.connections for r in results),
        calls=calls,
        ok=sum(r.ok for r in results),
        errors=dict(sorted(errors.items())),
        seconds=max(r.seconds for r in results),
        throughput=sum(r.throughput for r in results),
        latency_ms=_latency_summary(sorted(latencies)),
        runner_pid=config.pid,
        runner_cpu_us_per_call=runner_cpu,
        runner_rss_kib=first.runner_rss_kib,  # every child sees the same processes
        bench_cpu_us_per_call=sum(bench_cpu) / calls if bench_cpu and calls else None,
        reconnects=sum(r.reconnects for r in results),
        first_reply=next((r.first_reply for r in results if r.first_reply != "none"), "none"),
        shape=first.shape,
        stopped_by=first.stopped_by,
        processes=len(results),
    )


# ------------------------------------------------------------------- the runner


class SpawnedRunner:
    """``a6-runner run`` in a child process on a socket of its own, for one bench.

    Its output goes to a temporary file, shown if it fails to start. Stopped with SIGTERM
    (SIGKILL after 5 s) on exit. ``env`` replaces the environment; ``cwd`` is where
    ``python -m runner`` starts, and so which ``runner`` package it imports first (another
    version of the runner, to compare).
    """

    def __init__(
        self,
        runner_args: Sequence[str] = (),
        socket: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> None:
        self._dir: str | None = None
        self._env = None if env is None else dict(env)
        self._cwd = cwd
        if socket is None:
            self._dir = tempfile.mkdtemp(prefix="a6-bench-")
            socket = os.path.join(self._dir, "runner.sock")
        self.socket = strip_unix_prefix(socket)
        self.args = [
            sys.executable,
            "-m",
            "runner",
            "run",
            "--listen",
            f"unix:{self.socket}",
            "--log-level",
            "warning",
            *runner_args,
        ]
        # Open for the runner's whole life; closed by stop().
        self._log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def launch(self) -> None:
        """Start the process; ``start`` also waits until it listens."""
        self.process = subprocess.Popen(
            self.args,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self._env,
            cwd=self._cwd,
        )

    async def start(self, timeout: float = 15.0) -> None:  # noqa: ASYNC109
        """Launch the runner and wait until it listens; RuntimeError with its output if it
        exits first (reported at once, not after ``timeout``) or never listens."""
        self.launch()
        process = self.process
        assert process is not None
        deadline = time.monotonic() + timeout
        while process.poll() is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            # Short probes, so that a runner that dies at startup is noticed at once.
            with contextlib.suppress(TimeoutError):
                await wait_for_socket(self.socket, min(0.2, remaining))
                return
        status = process.poll()
        output = self.output()
        self.stop()
        what = f"exited with status {status}" if status is not None else "did not listen"
        raise RuntimeError(f"the runner {what}:\n{output}")

    def output(self) -> str:
        self._log.seek(0)
        return self._log.read()[-4000:]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


# ----------------------------------------------------------------------- output


def _fmt_ms(value: float) -> str:
    return f"{value:.3g} ms" if value < 100 else f"{value:.0f} ms"


def format_result(result: BenchResult) -> str:
    lat = result.latency_ms
    lines = [
        f"{result.calls:,} calls on {result.connections} connection(s)"
        + (f" from {result.processes} client processes" if result.processes > 1 else "")
        + f" in {result.seconds:.2f} s (stopped by {result.stopped_by})",
        f"reply         {result.first_reply}",
        f"throughput    {result.throughput:,.0f} calls/s",
        "latency       "
        + "  ".join(f"{name} {_fmt_ms(lat[name])}" for name in ("p50", "p90", "p99", "p99.9"))
        + f"  max {_fmt_ms(lat['max'])}",
    ]
    if result.errors:
        total = sum(result.errors.values())
        kinds = ", ".join(f"{kind}: {n:,}" for kind, n in result.errors.items())
        lines.append(f"errors        {total:,} ({kinds})")
    else:
        lines.append("errors        none")
    if result.reconnects:
        lines.append(f"reconnects    {result.reconnects:,}")
    if result.runner_cpu_us_per_call is not None:
        cpu = f"{result.runner_cpu_us_per_call:.1f} us/call (pid {result.runner_pid})"
        if result.runner_rss_kib is not None:
            start, end = result.runner_rss_kib
            cpu += f", RSS {start / 1024:.1f} MiB -> {end / 1024:.1f} MiB"
        lines.append(f"runner CPU    {cpu}")
    else:
        lines.append("runner CPU    unknown (spawn the runner, or give --pid)")
    if result.bench_cpu_us_per_call is not None:
        lines.append(f"bench CPU     {result.bench_cpu_us_per_call:.1f} us/call")
    return "\n".join(lines)


class _ProgressBar:
    """Feeds click's progress bar: the share of the time budget spent (or of the calls
    made, when a call count ends the run sooner), with calls, rate and errors beside it."""

    STEPS: Final = 1000

    def __init__(self, config: BenchConfig, bar: ProgressBar[str | None]) -> None:
        self.config = config
        self.bar = bar
        self.started = time.monotonic()
        self.last = (0, self.started)

    def __call__(self, run: _Run) -> None:
        now = time.monotonic()
        fraction = (now - self.started) / (self.config.warmup + self.config.duration)
        if run.measuring and self.config.requests:
            fraction = max(fraction, run.issued / self.config.requests)
        # The rate counts every reply, warm-up included, so that it never jumps back.
        replies = run.warmup_calls + run.completed
        last_replies, then = self.last
        rate = (replies - last_replies) / (now - then) if now > then else 0.0
        self.last = (replies, now)
        phase = "measuring" if run.measuring else "warming up"
        shown = run.completed if run.measuring else run.warmup_calls
        errors = sum(run.errors.values())
        self.show(fraction, f"{phase} {shown:,} calls {rate:,.0f}/s errors {errors:,}")

    def tick(self, elapsed: float) -> None:
        """Progress by time alone: the load runs in child processes."""
        budget = self.config.warmup + self.config.duration
        phase = "warming up" if elapsed < self.config.warmup else "measuring"
        self.show(elapsed / budget, f"{phase} in client processes")

    def show(self, fraction: float, text: str) -> None:
        target = min(self.STEPS, int(fraction * self.STEPS))
        self.bar.update(max(0, target - self.bar.pos), text)


# -------------------------------------------------------------------- the command


def parse_conf(text: str) -> tuple[tuple[str, str], ...]:
    """A plugin conf as the gateway's route holds it: ``[{"name": ..., "value": ...}]``,
    or the whole ``{"conf": [...]}`` object. A value that is not a string is the config
    itself and is serialized; ``[]`` is the empty conf (every call passes through)."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"the conf is not JSON: {exc}") from None
    if isinstance(data, dict) and "conf" in data:
        data = data["conf"]
    if not isinstance(data, list):
        raise ValueError('the conf must be a list of {"name": ..., "value": ...}')
    out = []
    for i, entry in enumerate(data):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ValueError(f"conf entry {i} must be an object with a string 'name'")
        value = entry.get("value", "{}")
        out.append((entry["name"], value if isinstance(value, str) else json.dumps(value)))
    return tuple(out)


def _pairs(values: Sequence[str], sep: str, what: str) -> list[tuple[str, str]]:
    out = []
    for value in values:
        name, found, rest = value.partition(sep)
        if not found or not name:
            raise click.BadParameter(f"{value!r} is not NAME{sep}VALUE", param_hint=what)
        out.append((name.strip(), rest.strip() if sep == ":" else rest))
    return out


def _args(values: Sequence[str]) -> list[tuple[str, str | None]]:
    out: list[tuple[str, str | None]] = []
    for value in values:
        name, found, rest = value.partition("=")
        out.append((name, rest if found else None))
    return out


@click.command(context_settings={"show_default": True})
@click.option(
    "--socket",
    "socket_path",
    metavar="PATH",
    help="Socket of a running runner (path or unix:/path). Without it, the bench spawns "
    "'a6-runner run' on a temporary socket with RUNNER_ARGS.",
)
@click.option(
    "--pid",
    type=int,
    help="Process id of the runner behind --socket, for its CPU time and memory "
    "(default: the socket's listener, if visible).",
)
@click.option(
    "--conf",
    "conf_text",
    metavar="JSON",
    help='The route\'s plugin conf: [{"name": "say", "value": "{...}"}], or @FILE.',
    default='[{"name": "say", "value": "{}"}]',
)
@click.option("-c", "--connections", type=int, default=16, help="Kept-alive connections.")
@click.option(
    "-p",
    "--processes",
    type=click.IntRange(1),
    default=1,
    help="Client processes sharing the connections, for more than one core of load"
    " (latency percentiles are over all their calls).",
)
@click.option("-n", "--requests", type=int, help="Stop after this many measured calls.")
@click.option("-d", "--duration", type=float, default=10.0, help="Stop after this many seconds.")
@click.option("--warmup", type=float, default=1.0, help="Seconds of load before measuring.")
@click.option(
    "--phase",
    type=click.Choice(["request", "response"]),
    default="request",
    help="HTTPReqCall (ext-plugin-pre-req) or HTTPRespCall (ext-plugin-post-resp).",
)
@click.option("--method", default="GET", help="HTTP method of the request.")
@click.option("--path", default="/bench", help="Request path.")
@click.option("--headers", "header_count", type=int, default=8, help="Request headers in all.")
@click.option(
    "--header",
    "headers",
    multiple=True,
    metavar="NAME:VALUE",
    help="A request header (repeatable).",
)
@click.option(
    "--arg", "args", multiple=True, metavar="NAME[=VALUE]", help="A query arg (repeatable)."
)
@click.option(
    "--body",
    "body_text",
    metavar="TEXT|@FILE",
    help="The request body answered to ReqBody (a file's bytes with @FILE).",
)
@click.option(
    "--body-size", type=int, default=0, help="Bytes of filler request body, without --body."
)
@click.option(
    "--resp-body",
    "resp_body_text",
    metavar="TEXT|@FILE",
    help="The upstream body answered to RespBody, response phase (a file's bytes with @FILE).",
)
@click.option(
    "--resp-body-size",
    type=int,
    default=0,
    help="Bytes of filler upstream body, without --resp-body.",
)
@click.option("--status", type=int, default=200, help="Upstream status, response phase.")
@click.option(
    "--upstream-header",
    "upstream_headers",
    multiple=True,
    metavar="NAME:VALUE",
    help="A header of the upstream response, response phase (repeatable; default: the"
    " request's headers stand in).",
)
@click.option(
    "--var",
    "variables",
    multiple=True,
    metavar="NAME=VALUE",
    help="An nginx variable answered to ExtraInfo (repeatable; remote_addr, server_addr,"
    " server_port, scheme and request_time have defaults).",
)
@click.option(
    "--verify-every",
    type=int,
    default=1000,
    help="Fully decode every Nth reply of a connection (the first always; 0: first only).",
)
@click.option(
    "--check-id/--no-check-id",
    default=True,
    help="Count a reply whose id is not the request's as a bad reply.",
)
@click.option("--call-timeout", type=float, default=60.0, help="Seconds a call may take.")
@click.option(
    "--max-error-rate",
    type=click.FloatRange(0, 100),
    default=0.0,
    metavar="PERCENT",
    help="Exit with status 1 if more than this share of the measured calls failed (so a"
    " CI job can gate on it).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--progress/--no-progress", default=True, help="Progress bar on a terminal.")
@click.argument("runner_args", nargs=-1, type=click.UNPROCESSED)
def bench(
    socket_path: str | None,
    pid: int | None,
    conf_text: str,
    connections: int,
    processes: int,
    requests: int | None,
    duration: float,
    warmup: float,
    phase: Phase,
    method: str,
    path: str,
    header_count: int,
    headers: Sequence[str],
    args: Sequence[str],
    body_text: str | None,
    body_size: int,
    resp_body_text: str | None,
    resp_body_size: int,
    status: int,
    upstream_headers: Sequence[str],
    variables: Sequence[str],
    verify_every: int,
    check_id: bool,
    call_timeout: float,
    max_error_rate: float,
    as_json: bool,
    progress: bool,
    runner_args: Sequence[str],
) -> None:
    """Load-test a runner as the gateway would, and report throughput, latency, errors
    and the runner's CPU time per call.

    \b
    a6-runner bench -c 16 -d 10                        # spawn a runner, 'say' plugin
    a6-runner bench --conf @conf.json -- --plugins-dir ./my-plugins
    a6-runner bench --socket /tmp/runner.sock -n 100000 --json
    a6-runner bench --method POST --body @payload.json --max-error-rate 0.1
    a6-runner bench -p 4 -c 64 --socket /tmp/runner.sock   # four client processes

    Exits with status 1 if more than --max-error-rate percent of the calls failed.
    """
    if conf_text.startswith("@"):
        try:
            conf_text = Path(conf_text[1:]).read_text()
        except OSError as exc:
            raise click.BadParameter(str(exc), param_hint="--conf") from None
    try:
        conf = parse_conf(conf_text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--conf") from None
    if socket_path is not None and runner_args:
        raise click.UsageError("RUNNER_ARGS are for a spawned runner; drop them or --socket")
    vars_ = dict(_DEFAULT_VARS)
    vars_.update(_pairs(variables, "=", "--var"))
    shape = RequestShape(
        phase=phase,
        method=method.upper(),
        path=path,
        header_count=max(header_count, len(headers)),
        headers=tuple(_pairs(headers, ":", "--header")),
        args=tuple(_args(args)),
        body_size=body_size,
        resp_body_size=resp_body_size,
        status=status,
        vars=tuple(vars_.items()),
        body_data=_text_or_file(body_text, "--body"),
        resp_body_data=_text_or_file(resp_body_text, "--resp-body"),
        resp_headers=tuple(_pairs(upstream_headers, ":", "--upstream-header"))
        if upstream_headers
        else None,
    )
    config = BenchConfig(
        socket=socket_path or "",
        conf=conf,
        shape=shape,
        connections=connections,
        requests=requests,
        duration=duration,
        warmup=warmup,
        call_timeout=call_timeout,
        verify_every=verify_every,
        check_id=check_id,
        pid=pid,
    )
    try:
        config.check()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if processes > connections:
        raise click.UsageError("--processes cannot exceed --connections")
    try:
        if progress and sys.stderr.isatty():
            with click.progressbar(
                length=_ProgressBar.STEPS,
                label="bench",
                file=sys.stderr,
                width=30,
                show_eta=False,
                show_percent=False,
                item_show_func=lambda text: text,
            ) as bar:
                result = _run_command(config, runner_args, processes, _ProgressBar(config, bar))
        else:
            result = _run_command(config, runner_args, processes, None)
    except (RunnerError, RuntimeError, OSError, TimeoutError) as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        click.echo(format_result(result))
    failed = sum(result.errors.values())
    if not result.calls:
        raise click.ClickException("no call completed in the measured window")
    rate = failed / result.calls * 100
    if rate > max_error_rate:
        raise click.ClickException(
            f"{failed:,} of {result.calls:,} calls failed ({rate:.3g}%),"
            f" more than --max-error-rate {max_error_rate:g}%"
        )


def _text_or_file(value: str | None, option: str) -> bytes | None:
    """``TEXT`` as UTF-8, or ``@FILE``'s bytes."""
    if value is None:
        return None
    if not value.startswith("@"):
        return value.encode()
    try:
        return Path(value[1:]).read_bytes()
    except OSError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None


def _run_command(
    config: BenchConfig, runner_args: Sequence[str], processes: int, bar: _ProgressBar | None
) -> BenchResult:
    import uvloop

    async def drive(config: BenchConfig) -> BenchResult:
        if processes == 1:
            return await run_bench(config, bar)
        return await run_bench_processes(config, processes, None if bar is None else bar.tick)

    async def main() -> BenchResult:
        if config.socket:
            cfg = config
            if cfg.pid is None:
                found = find_listener_pid(strip_unix_prefix(cfg.socket))
                cfg = replace(cfg, pid=found)
            try:
                return await drive(cfg)
            except RunnerError as exc:
                raise RuntimeError(
                    f"the runner rejected the conf at PrepareConf ({exc}); its log says why"
                    " (the runner's output, or the gateway's error.log if the gateway"
                    " started it)"
                ) from None
        runner = SpawnedRunner(runner_args)
        await runner.start()
        try:
            return await drive(replace(config, socket=runner.socket, pid=runner.pid))
        except RunnerError as exc:
            raise RuntimeError(
                f"the runner rejected the conf at PrepareConf ({exc}); its log:\n{runner.output()}"
            ) from None
        finally:
            runner.stop()

    return uvloop.run(main())

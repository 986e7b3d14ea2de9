"""The operator's endpoint: Prometheus metrics and health checks over HTTP.

``GET /metrics`` (Prometheus text exposition), ``GET /healthz`` (the process answers)
and ``GET /readyz`` (200 when the runner serves the gateway, else 503 with the reason),
on a TCP loopback address or a Unix socket (``--metrics-listen``).

One process serves it: the single runner, from a thread of its own, or the supervisor
of ``--workers``, from the wait of its main loop (a supervisor must not have threads
when it forks). Either way the endpoint never runs on the event loop that serves calls.
The server is a small non-blocking HTTP/1.0 responder over ``select``: a scrape is one
short request; a client that says nothing is dropped after a few seconds, and one
that will not read cannot stall the process.

prometheus_client is imported here and nowhere else, and only when the endpoint is on.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from runner.core.config import StatusAddress
from runner.core.metrics import PLUGIN_BUCKETS, Snapshot
from runner.server.listener import StartupError, make_socket_dir, remove_socket

log = logging.getLogger("a6.status")

# A client has this long to send its request line and headers.
CLIENT_TIMEOUT = 5.0
MAX_REQUEST = 8192
# Only the owner may connect to a Unix socket endpoint (a local agent of the same user).
SOCKET_MODE = 0o600


# ------------------------------------------------------------------ the metrics


@dataclass
class WorkerView:
    """What the supervisor knows of one worker slot, for the metrics and /readyz."""

    number: int
    serving: bool
    snapshot: Snapshot | None


class RunnerCollector(Collector):
    """Metric families from the runner's snapshots, made at scrape time.

    ``live`` gives ``(worker number, snapshot)`` of each process serving (worker 0: the
    single process); ``retired`` the counters of workers that are gone (their counts
    stay in the totals, as counters must not go down); ``restarts`` the workers the
    supervisor replaced, by cause.
    """

    def __init__(
        self,
        live: Callable[[], list[tuple[int, Snapshot]]],
        retired: Callable[[], Snapshot] = dict,
        restarts: Callable[[], dict[str, int]] | None = None,
    ) -> None:
        self._live = live
        self._retired = retired
        self._restarts = restarts

    def collect(self) -> Iterator[Metric]:
        from runner.core.metrics import merge_snapshots, without_gauges

        live = self._live()
        total = merge_snapshots([self._retired(), *(without_gauges(snap) for _n, snap in live)])
        yield from counters(total)
        open_conns = GaugeMetricFamily(
            "a6_runner_open_connections",
            "Gateway connections open now, per worker process (0: a single process).",
            labels=["worker"],
        )
        confs = GaugeMetricFamily(
            "a6_runner_confs_cached",
            "Prepared confs held in memory now, per worker process (each worker holds "
            "the confs it served).",
            labels=["worker"],
        )
        for number, snap in live:
            gauges = snap.get("gauges", {})
            open_conns.add_metric([str(number)], gauges.get("open_connections", 0))
            confs.add_metric([str(number)], gauges.get("confs_held", 0))
        yield open_conns
        yield confs
        if self._restarts is not None:
            restarts = CounterMetricFamily(
                "a6_runner_worker_restarts",
                "Worker processes replaced after they died, by how they ended.",
                labels=["cause"],
            )
            for cause, n in sorted(self._restarts().items()):
                restarts.add_metric([cause], n)
            yield restarts


def counters(total: Snapshot) -> Iterator[Metric]:
    """The counter and histogram families of a (summed) snapshot."""
    calls = CounterMetricFamily(
        "a6_runner_calls",
        "Calls answered, by RPC type and outcome: pass, stop, rewrite, ok (a PrepareConf) "
        "or the error code sent (bad_request, service_unavailable, conf_token_not_found).",
        labels=["rpc", "outcome"],
    )
    not_found = 0
    for key, n in sorted(total.get("calls", {}).items()):
        rpc, outcome = key.split("\0")
        calls.add_metric([rpc, outcome], n)
        if outcome == "conf_token_not_found":
            not_found += n
    yield calls
    yield CounterMetricFamily(
        "a6_runner_conf_token_not_found",
        "Calls answered CONF_TOKEN_NOT_FOUND (the gateway then prepares the route again): "
        "a steady rate means confs are evicted or expire too early.",
        value=not_found,
    )
    durations = HistogramMetricFamily(
        "a6_runner_plugin_duration_seconds",
        "Time a plugin's hook took per call (awaited ExtraInfo queries included).",
        labels=["plugin", "hook"],
    )
    failures = CounterMetricFamily(
        "a6_runner_plugin_failures",
        "Hook runs that raised (the call got SERVICE_UNAVAILABLE).",
        labels=["plugin", "hook"],
    )
    bounds = [*(repr(b) for b in PLUGIN_BUCKETS), "+Inf"]
    for key, (buckets, seconds, failed) in sorted(total.get("plugins", {}).items()):
        labels = key.split("\0")
        cumulative, running = [], 0
        for bound, count in zip(bounds, buckets, strict=True):
            running += count
            cumulative.append((bound, running))
        durations.add_metric(labels, cumulative, seconds)
        failures.add_metric(labels, failed)
    yield durations
    yield failures
    queries = CounterMetricFamily(
        "a6_runner_extra_info",
        "ExtraInfo round trips (a plugin asking the gateway), by kind: var, req_body, resp_body.",
        labels=["kind"],
    )
    received = CounterMetricFamily(
        "a6_runner_extra_info_bytes",
        "Bytes of the gateway's ExtraInfo answers, by kind.",
        labels=["kind"],
    )
    for kind, (n, size) in sorted(total.get("extra_info", {}).items()):
        queries.add_metric([kind], n)
        received.add_metric([kind], size)
    yield queries
    yield received
    yield _labelled(
        "a6_runner_confs_prepared",
        "PrepareConf calls served, by result: new (a chain built) or reused (the same "
        "route key and conf as a live token).",
        "result",
        total.get("confs_prepared", {}),
    )
    yield _labelled(
        "a6_runner_conf_evictions",
        "Prepared confs dropped, by reason: size (max_confs reached) or expired.",
        "reason",
        total.get("conf_evictions", {}),
    )
    yield _labelled(
        "a6_runner_frames_rejected",
        "Frames refused before any call: too_large (over max_frame_size; the connection "
        "closes), unexpected (a frame out of turn), unknown_type.",
        "reason",
        total.get("frames_rejected", {}),
    )
    yield CounterMetricFamily(
        "a6_runner_call_timeouts",
        "Calls past call_timeout, answered SERVICE_UNAVAILABLE (not in calls_total: the "
        "chain never finished).",
        value=total.get("call_timeouts", 0),
    )
    yield CounterMetricFamily(
        "a6_runner_connections_refused",
        "Gateway connections refused at max_connections.",
        value=total.get("connections_refused", 0),
    )


def _labelled(name: str, doc: str, label: str, values: dict[str, int]) -> Metric:
    family = CounterMetricFamily(name, doc, labels=[label])
    for value, n in sorted(values.items()):
        family.add_metric([value], n)
    return family


def render(collector: Collector) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry)


# ---------------------------------------------------------------------- health


@dataclass
class Health:
    """Why the runner is not ready yet (or any more); None once it serves."""

    reasons: list[str] = field(default_factory=lambda: ["starting"])

    def ready(self) -> None:
        self.reasons = []

    def not_ready(self, reason: str) -> None:
        self.reasons = [reason]


# ---------------------------------------------------------------------- server


@dataclass
class _Client:
    sock: socket.socket
    since: float
    received: bytes = b""
    out: bytes = b""
    answered: bool = False


class StatusServer:
    """The endpoint's listening socket and its clients, served by ``wait``.

    ``metrics`` renders the exposition; ``readiness`` gives the reasons the runner is
    not ready (an empty list: ready).
    """

    def __init__(
        self,
        address: StatusAddress,
        metrics: Callable[[], bytes],
        readiness: Callable[[], list[str]],
    ) -> None:
        self.address = address
        self._metrics = metrics
        self._readiness = readiness
        self._clients: dict[int, _Client] = {}
        self._socket_id: tuple[int, int] | None = None
        self._listener = self._listen(address)
        self._thread: threading.Thread | None = None
        self._stop_r, self._stop_w = -1, -1

    @property
    def bound(self) -> str:
        """The address actually listened on (the port the kernel chose for port 0)."""
        if self.address.path is not None:
            return str(self.address)
        host, port = self._listener.getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def _listen(self, address: StatusAddress) -> socket.socket:
        try:
            if address.path is not None:
                return self._listen_unix(address)
            infos = socket.getaddrinfo(
                address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
            family, kind, proto, _name, sockaddr = infos[0]
            sock = socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(sockaddr)
                sock.listen(64)
            except BaseException:
                sock.close()
                raise
        except OSError as exc:
            raise StartupError(
                f"cannot listen for metrics on {address}: {exc.strerror or exc}"
            ) from exc
        sock.setblocking(False)
        return sock

    def _listen_unix(self, address: StatusAddress) -> socket.socket:
        from runner.server.listener import prepare_socket_path

        assert address.path is not None
        make_socket_dir(address.path.parent)
        prepare_socket_path(address.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # born owner-only
        try:
            sock.bind(str(address.path))
        except BaseException:
            sock.close()
            raise
        finally:
            os.umask(old_umask)
        st = address.path.lstat()
        self._socket_id = (st.st_dev, st.st_ino)
        os.chmod(address.path, SOCKET_MODE)
        sock.listen(64)
        sock.setblocking(False)
        return sock

    # ------------------------------------------------------------------ serving

    def wait(self, timeout: float, wake_fd: int) -> None:
        """Serve clients until ``wake_fd`` is readable or ``timeout`` seconds pass."""
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            now = time.monotonic()
            self._drop_stale(now)
            left = deadline - now
            readers = [wake_fd, self._listener.fileno()]
            readers += [fd for fd, c in self._clients.items() if not c.answered]
            writers = [fd for fd, c in self._clients.items() if c.out]
            if left > 0:
                # Wake in time to drop a client that has said nothing.
                left = min(left, CLIENT_TIMEOUT)
            try:
                readable, writable, _ = select.select(readers, writers, [], max(0.0, left))
            except InterruptedError:
                readable, writable = [], []
            for fd in readable:
                if fd == wake_fd:
                    continue
                if fd == self._listener.fileno():
                    self._accept()
                elif fd in self._clients:
                    self._read(self._clients[fd])
            for fd in writable:
                if fd in self._clients:
                    self._write(self._clients[fd])
            if wake_fd in readable or time.monotonic() >= deadline:
                return

    def start_thread(self) -> None:
        """Serve from a thread of its own until ``close`` (the single-process runner)."""
        self._stop_r, self._stop_w = os.pipe()

        def serve() -> None:
            stop_r = self._stop_r
            while True:
                self.wait(60.0, stop_r)
                with contextlib.suppress(BlockingIOError):
                    if select.select([stop_r], [], [], 0)[0]:
                        return

        self._thread = threading.Thread(target=serve, name="a6-status", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            os.write(self._stop_w, b"x")
            self._thread.join(2.0)
            self._thread = None
        for fd in (self._stop_r, self._stop_w):
            if fd >= 0:
                os.close(fd)
        self._stop_r = self._stop_w = -1
        for client in list(self._clients.values()):
            self._drop(client)
        self._listener.close()
        if self.address.path is not None and self._socket_id is not None:
            remove_socket(self.address.path, self._socket_id)

    def close_inherited(self) -> None:
        """In a forked child: close our copies of the sockets, touching nothing else
        (the socket file and the clients are the parent's)."""
        for client in self._clients.values():
            client.sock.close()
        self._clients.clear()
        self._listener.close()

    # ----------------------------------------------------------------- clients

    def _accept(self) -> None:
        while True:
            try:
                sock, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ECONNABORTED):
                    return
                raise
            sock.setblocking(False)
            self._clients[sock.fileno()] = _Client(sock, time.monotonic())

    def _read(self, client: _Client) -> None:
        try:
            data = client.sock.recv(MAX_REQUEST)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(client)
            return
        if not data:
            self._drop(client)
            return
        client.received += data
        head, sep, _rest = client.received.partition(b"\r\n\r\n")
        if not sep:
            head, sep, _rest = client.received.partition(b"\n\n")
        if sep:
            self._answer(client, head)
        elif len(client.received) > MAX_REQUEST:
            self._respond(client, 431, "request header too large\n")

    def _answer(self, client: _Client, head: bytes) -> None:
        line = head.split(b"\n", 1)[0].decode("latin-1").strip()
        parts = line.split()
        if len(parts) < 2:
            self._respond(client, 400, "bad request\n")
            return
        method, target = parts[0], parts[1].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            self._respond(client, 405, "only GET\n", head_only=False)
            return
        head_only = method == "HEAD"
        try:
            if target == "/metrics":
                self._respond(client, 200, self._metrics(), CONTENT_TYPE_PLAIN_0_0_4, head_only)
            elif target == "/healthz":
                self._respond(client, 200, "ok\n", head_only=head_only)
            elif target == "/readyz":
                reasons = self._readiness()
                if reasons:
                    self._respond(
                        client, 503, "".join(f"{r}\n" for r in reasons), head_only=head_only
                    )
                else:
                    self._respond(client, 200, "ready\n", head_only=head_only)
            else:
                self._respond(client, 404, "not found: /metrics, /healthz, /readyz\n")
        except Exception:
            # The endpoint must never take the process down with it.
            log.exception("the status endpoint failed to answer %s", target)
            self._respond(client, 500, "internal error\n")

    def _respond(
        self,
        client: _Client,
        status: int,
        body: bytes | str,
        content_type: str = "text/plain; charset=utf-8",
        head_only: bool = False,
    ) -> None:
        data = body.encode() if isinstance(body, str) else body
        reason = _REASONS.get(status, "")
        head = (
            f"HTTP/1.0 {status} {reason}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
        ).encode()
        client.out = head if head_only else head + data
        client.answered = True
        self._write(client)

    def _write(self, client: _Client) -> None:
        try:
            sent = client.sock.send(client.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(client)
            return
        client.out = client.out[sent:]
        if not client.out:
            self._drop(client)

    def _drop_stale(self, now: float) -> None:
        for client in list(self._clients.values()):
            if now - client.since > CLIENT_TIMEOUT:
                self._drop(client)

    def _drop(self, client: _Client) -> None:
        self._clients.pop(client.sock.fileno(), None)
        client.sock.close()


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}

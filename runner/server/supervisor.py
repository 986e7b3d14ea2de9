"""The supervisor of ``a6-runner run --workers N``: one socket, N worker processes.

The supervisor is the process the gateway spawned and signals. It binds the socket once
(the same path checks, mode and group as a single runner), makes the private conf store
the workers share (``runner.core.confstore``), then forks the workers, which accept on
the listening socket they inherit. After that it only waits, without an event loop: for
a signal, a worker's death, or the next sweep of the store. It serves no call.

- A worker that dies (an exception, SIGKILL, the OOM killer) is replaced; only the calls
  in flight on it fail (the gateway sees their connections close). Connections keep
  queueing on the socket meanwhile (the supervisor holds it open) and the live workers
  take them; the replacement finds every live token in the store. A worker that dies
  within a second of its start is restarted after a delay that doubles up to 5 s.
- SIGTERM or SIGINT: the socket file is removed, every worker gets SIGTERM and stops as
  a single runner does (stop accepting, calls in flight finish within the grace); a
  worker still alive shortly after the grace is killed, so that all is over before the
  gateway's SIGKILL (1 s after its SIGTERM). Then the state store (``--state-url``,
  opened before the first fork, so a ``local://`` file is one state for all workers) is
  closed, which removes a ``local://`` file, the conf store goes, and the exit status is 0.
- The supervisor killed with SIGKILL: each worker watches a pipe only the supervisor
  holds open; at its end-of-file the worker stops as on SIGTERM, so no process keeps
  serving a socket nobody owns (the next runner removes the stale file).

Forking, not spawning: the workers start with the plugins the supervisor imported (one
import, checked before anything listens) and without a second interpreter start. The
supervisor has no threads and no event loop when it forks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from runner.core.config import Config
from runner.core.confstore import make_store_dir, sweep
from runner.core.logs import setup_logging
from runner.core.metrics import (
    Snapshot,
    merge_snapshots,
    read_snapshot,
    snapshot_path,
    without_gauges,
)
from runner.core.registry import PluginRegistry
from runner.core.tmpdirs import make_private_dir
from runner.server.lifecycle import close_shared_state, open_shared_state
from runner.server.listener import (
    StartupError,
    bind_socket,
    prepare_socket_path,
    remove_socket,
)
from runner.server.worker import worker_main
from runner.state import StateStore

if TYPE_CHECKING:
    from runner.server.status import StatusServer

log = logging.getLogger("a6.supervisor")

_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)

METRICS_DIR_PREFIX = "a6-runner-metrics-"

# A worker that lived less than this is failing at start: restart it after a delay.
FAST_FAILURE = 1.0
MAX_RESTART_DELAY = 5.0

# After the grace, workers abort their last connections and exit at once; this is how
# long the supervisor waits for that before killing them. The gateway kills us 1 s after
# its SIGTERM: with the default grace of 0.7 s this ends at 0.95 s, and the socket file
# was removed first, so even a SIGKILL just then leaves nothing a new runner trips on (an
# orphaned conf store is swept at the next start; workers exit when our pipe closes).
EXIT_MARGIN = 0.25


@dataclass
class WorkerSlot:
    """One of the N places for a worker, and the worker process that fills it."""

    number: int
    pid: int = 0
    started: float = 0.0
    restart_at: float = 0.0
    fast_failures: int = 0


class Supervisor:
    def __init__(self, config: Config, registry: PluginRegistry) -> None:
        self.config = config
        self.registry = registry
        self.slots = [WorkerSlot(n) for n in range(1, config.workers + 1)]
        self._by_pid: dict[int, WorkerSlot] = {}
        self._stopping = False
        self._listener: socket.socket | None = None
        self._socket_id: tuple[int, int] | None = None
        self._store_dir: Path | None = None
        # --metrics-listen: the workers' snapshots, the endpoint, and what stays of the
        # workers that died (their counts must not vanish from the totals).
        self._metrics_dir: Path | None = None
        self._status: StatusServer | None = None
        self._retired: Snapshot = {}
        self._restarts: dict[str, int] = {}
        self._state: StateStore | None = None
        self._sweep_interval = max(1.0, min(60.0, config.conf_ttl / 4))
        # Signals wake the wait through this pipe (signal.set_wakeup_fd).
        self._wake_r, self._wake_w = os.pipe()
        # The workers' watch on us: we hold the only write end, and never write to it.
        self._alive_r, self._alive_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)

    # ------------------------------------------------------------------------ life

    def run(self) -> int:
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in _SIGNALS:
            signal.signal(sig, self._on_signal)
        try:
            try:
                # Before the first fork: every worker inherits the one store (for
                # local://, the one file; a Redis client is made in each worker). First,
                # so that a store that cannot be made never binds the socket.
                self._state = open_shared_state(self.config)
                self._listen()
            except StartupError as exc:
                log.error("cannot start: %s", exc)
                return 1
            try:
                self._store_dir = make_store_dir(self.config.socket_path)
            except OSError as exc:
                log.error("cannot start: cannot create the shared conf store: %s", exc)
                return 1
            if self.config.metrics_listen is not None:
                try:
                    self._start_status(self._store_dir)
                except (StartupError, OSError) as exc:
                    log.error("cannot start: %s", exc)
                    return 1
            log.info(
                "listening on unix:%s with %d workers (conf store %s; state %s; plugins: %s)",
                self.config.socket_path,
                len(self.slots),
                self._store_dir,
                self._state.location,
                ", ".join(self.registry.names()) or "none",
            )
            for slot in self.slots:
                if not self._stopping:
                    self._start(slot)
            self._supervise()
            self._shutdown()
            return 0
        finally:
            if self._status is not None:
                self._status.close()
            if self._metrics_dir is not None:
                shutil.rmtree(self._metrics_dir, ignore_errors=True)
            if self._state is not None:
                # Last, with every worker gone: a local:// store removes its file here.
                asyncio.run(close_shared_state(self._state))
            if self._store_dir is not None:
                shutil.rmtree(self._store_dir, ignore_errors=True)
            if self._listener is not None:
                self._listener.close()
                # Already done by a clean shutdown; here for a start that failed half-way.
                remove_socket(self.config.socket_path, self._socket_id)
            signal.set_wakeup_fd(-1)
            for sig in _SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            for fd in (self._wake_r, self._wake_w, self._alive_r, self._alive_w):
                os.close(fd)
            sys.stderr.flush()

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        # Runs between two bytecodes of the main loop: only set a flag. A second
        # SIGTERM changes nothing, so it cannot cut the workers' grace short.
        if signum != signal.SIGCHLD:
            self._stopping = True

    def _listen(self) -> None:
        path = self.config.socket_path
        prepare_socket_path(path)
        sock = bind_socket(path, self.config.socket_mode, self.config.socket_group)
        st = path.lstat()
        self._socket_id = (st.st_dev, st.st_ino)
        try:
            # Listening from now on: connections queue until a worker accepts them.
            sock.listen(1024)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            remove_socket(path, self._socket_id)
            raise StartupError(f"cannot listen on {path}: {exc.strerror or exc}") from exc
        self._listener = sock

    def _supervise(self) -> None:
        next_sweep = time.monotonic() + self._sweep_interval
        while not self._stopping:
            now = time.monotonic()
            due = [s.restart_at for s in self.slots if not s.pid]
            self._wait(min([next_sweep, *due]) - now)
            self._reap()
            if self._stopping:
                return
            now = time.monotonic()
            for slot in self.slots:
                if not slot.pid and slot.restart_at <= now:
                    self._start(slot)
            if now >= next_sweep:
                next_sweep = now + self._sweep_interval
                self._sweep()

    def _shutdown(self) -> None:
        live = [s for s in self.slots if s.pid]
        log.info("shutting down %d worker(s)", len(live))
        # No new connection can reach the socket; the workers stop accepting and let
        # their calls in flight finish.
        remove_socket(self.config.socket_path, self._socket_id)
        for slot in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(slot.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.config.shutdown_grace + EXIT_MARGIN
        while self._by_pid and (left := deadline - time.monotonic()) > 0:
            self._wait(left)
            self._reap()
        for pid, slot in list(self._by_pid.items()):
            log.warning("worker %d pid %d did not stop in time: killing it", slot.number, pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in list(self._by_pid):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            del self._by_pid[pid]
        log.info("stopped")

    # --------------------------------------------------------------------- workers

    def _start(self, slot: WorkerSlot) -> None:
        assert self._listener is not None
        assert self._store_dir is not None
        assert self._state is not None
        sys.stderr.flush()
        sys.stdout.flush()
        # Blocked across the fork: the child must not run our handlers (they would wake
        # our loop and act on our state) before it has put back the defaults.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            pid = os.fork()
        except OSError as exc:  # out of processes or memory: try again later
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            slot.restart_at = time.monotonic() + MAX_RESTART_DELAY
            log.error("cannot start worker %d: %s", slot.number, exc)
            return
        if pid == 0:
            status = 1
            try:
                signal.set_wakeup_fd(-1)
                for sig in _SIGNALS:
                    signal.signal(sig, signal.SIG_DFL)
                for fd in (self._wake_r, self._wake_w, self._alive_w):
                    os.close(fd)
                if self._status is not None:
                    self._status.close_inherited()  # the endpoint is the supervisor's
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                status = worker_main(
                    slot.number,
                    self.config,
                    self.registry,
                    self._listener,
                    self._store_dir,
                    self._state,
                    self._alive_r,
                    self._metrics_dir,
                )
            except BaseException:
                with contextlib.suppress(BaseException):
                    log.exception("worker %d failed", slot.number)
            finally:
                with contextlib.suppress(BaseException):
                    sys.stderr.flush()
                os._exit(status)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        slot.pid = pid
        slot.started = time.monotonic()
        self._by_pid[pid] = slot

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = self._by_pid.pop(pid, None)
            if slot is None:
                continue
            slot.pid = 0
            self._retire(slot.number, pid)
            if self._stopping:
                continue
            if self._status is not None:
                cause = "killed" if os.waitstatus_to_exitcode(status) < 0 else "exited"
                self._restarts[cause] = self._restarts.get(cause, 0) + 1
            lived = time.monotonic() - slot.started
            if lived < FAST_FAILURE:
                slot.fast_failures += 1
                delay = min(MAX_RESTART_DELAY, 0.1 * 2 ** (slot.fast_failures - 1))
            else:
                slot.fast_failures, delay = 0, 0.0
            slot.restart_at = time.monotonic() + delay
            log.error(
                "worker %d pid %d %s after %.1f s; starting another%s",
                slot.number,
                pid,
                _describe(status),
                lived,
                f" in {delay:g} s" if delay else "",
            )

    def _wait(self, timeout: float) -> None:
        """Sleep until a signal arrives or ``timeout`` seconds have passed (serving the
        metrics endpoint meanwhile, if there is one)."""
        if self._status is not None:
            self._status.wait(timeout, self._wake_r)
        else:
            with contextlib.suppress(InterruptedError):
                select.select([self._wake_r], [], [], max(0.0, timeout))
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 512):
                pass

    # --------------------------------------------------------------------- metrics

    def _start_status(self, store_dir: Path) -> None:
        from runner.server.status import RunnerCollector, StatusServer, render

        address = self.config.status_address
        assert address is not None
        # Beside the conf store (on tmpfs), removed by the next runner if this
        # supervisor is killed.
        self._metrics_dir = make_private_dir(METRICS_DIR_PREFIX, store_dir.parent)
        collector = RunnerCollector(
            self._live_snapshots, lambda: self._retired, self._restart_counts
        )
        self._status = StatusServer(address, lambda: render(collector), self._not_ready)
        log.info("metrics and health on %s (/metrics, /healthz, /readyz)", self._status.bound)

    def _live_snapshots(self) -> list[tuple[int, Snapshot]]:
        out = []
        for slot in self.slots:
            if slot.pid and self._metrics_dir is not None:
                snap = read_snapshot(snapshot_path(self._metrics_dir, slot.number, slot.pid))
                if snap is not None:
                    out.append((slot.number, snap))
        return out

    def _restart_counts(self) -> dict[str, int]:
        return {"killed": 0, "exited": 0, **self._restarts}

    def _not_ready(self) -> list[str]:
        """Why /readyz answers 503: every worker must be up and serving."""
        if self._stopping:
            return ["shutting down"]
        reasons = []
        for slot in self.slots:
            if not slot.pid:
                reasons.append(f"worker {slot.number} is down (restarting)")
            elif (
                self._metrics_dir is not None
                and not snapshot_path(self._metrics_dir, slot.number, slot.pid).exists()
            ):
                reasons.append(f"worker {slot.number} is starting")
        return reasons

    def _retire(self, number: int, pid: int) -> None:
        """Keep a dead worker's counters in the totals (its last snapshot's)."""
        if self._metrics_dir is None:
            return
        path = snapshot_path(self._metrics_dir, number, pid)
        snap = read_snapshot(path)
        if snap is not None:
            self._retired = merge_snapshots([self._retired, without_gauges(snap)])
        path.unlink(missing_ok=True)

    def _sweep(self) -> None:
        assert self._store_dir is not None
        try:
            removed, kept = sweep(self._store_dir, self.config.conf_ttl)
        except OSError as exc:
            log.error("cannot sweep the conf store %s: %s", self._store_dir, exc)
            return
        if removed:
            log.debug("conf store: removed %d old entries, %d kept", removed, kept)


def _describe(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


def supervise(config: Config, registry: PluginRegistry) -> int:
    """Serve ``config.workers`` worker processes until a signal; the exit status."""
    setup_logging(
        config.log_level, f"supervisor pid {os.getpid()}", config.log_format, "supervisor"
    )
    return Supervisor(config, registry).run()

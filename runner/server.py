"""The asyncio layer: the Unix socket, its connections, and the server's life.

Each connection feeds bytes to a FrameDecoder and hands whole frames to the
Dispatcher. A call the dispatcher can answer at once is answered inside
``data_received``; a call that must wait (ExtraInfo, async or blocking plugins) runs as
one task, during which the only frames the gateway may send are ExtraInfo replies.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import grp
import logging
import os
import resource
import signal
import socket
import stat
from collections import deque
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, cast

from runner.config import Config
from runner.dispatch import Dispatcher
from runner.errors import BadRequest, ProtocolViolation
from runner.frame import RPC, FrameDecoder, FrameTooLarge, encode_frame
from runner.messages import (
    InfoKind,
    MalformedMessage,
    decode_extra_info_reply,
    encode_extra_info_query,
)

log = logging.getLogger("a6.server")

# Frames a non-conforming client may pipeline behind a call in progress before we stop
# reading from it (the gateway never pipelines: it waits for each reply).
_MAX_BACKLOG = 16

# Seconds a frame may take to arrive once its first byte has: the gateway's send timeout.
FRAME_STALL_TIMEOUT = 60.0


# Plugins ask for the same few variables on every call: each query is framed once.
@functools.lru_cache(maxsize=512)
def _extra_info_query_frame(kind: InfoKind, name: str) -> bytes:
    return encode_frame(RPC.EXTRA_INFO, encode_extra_info_query(kind, name))


class StartupError(Exception):
    """The runner cannot start as configured; the message says what to change."""


class Connection(asyncio.Protocol):
    """One connection from a gateway worker: many calls, strictly one after another."""

    def __init__(self, server: RunnerServer) -> None:
        self._server = server
        self._dispatcher = server.dispatcher
        self._decoder = FrameDecoder(server.config.max_frame_size)
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()  # made by the server, in its loop
        self._task: asyncio.Task[None] | None = None
        self._call_started = 0.0  # loop time at which the running call started
        # Our ExtraInfo queries still unanswered, oldest first: the gateway answers them
        # in order (a plugin may ask several at once, with asyncio.gather).
        self._waiters: deque[asyncio.Future[bytes | None]] = deque()
        self._stall: asyncio.TimerHandle | None = None
        self._backlog: deque[tuple[int, bytes]] = deque()
        self._close_after_call = False
        self._reading_paused = False
        self._writing_paused = False

    # --------------------------------------------------------------- asyncio events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        transport = cast(asyncio.Transport, transport)
        server = self._server
        if server.closing or len(server.connections) >= server.config.max_connections:
            server.note_refused()
            transport.abort()
            return
        self._transport = transport
        server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        decoder = self._decoder
        frame = decoder.whole_frame(data)
        if frame is not None:
            if self._stall is not None:
                self._stop_stall_timer()
            if self._transport is not None:
                self._on_frame(*frame)
            return
        decoder.feed(data)
        while self._transport is not None:
            try:
                frame = decoder.next_frame()
            except FrameTooLarge as exc:
                # Without reading the oversized body we cannot find the next frame.
                log.warning("closing a connection: %s", exc)
                self._transport.write(self._dispatcher.error_frame(BadRequest(str(exc))))
                self._close()
                return
            if frame is None:
                if decoder.in_frame and self._stall is None:
                    self._stall = asyncio.get_running_loop().call_later(
                        FRAME_STALL_TIMEOUT, self._stalled
                    )
                return
            if self._stall is not None:
                self._stop_stall_timer()
            self._on_frame(*frame)

    def _stop_stall_timer(self) -> None:
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None

    def _stalled(self) -> None:
        # The gateway sends a whole frame in one send with a 60 s timeout: a frame still
        # incomplete after that is never coming, and its buffer would be held forever.
        self._stall = None
        log.warning(
            "closing a connection stuck mid-frame for %g s (%d bytes received)",
            FRAME_STALL_TIMEOUT,
            self._decoder.buffered,
        )
        self.abort()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is None:
            return
        self._transport = None
        self._stop_stall_timer()
        self._server.connections.discard(self)
        if self._decoder.in_frame or self._task is not None:
            log.info(
                "a gateway connection closed in the middle of a %s",
                "call" if self._task is not None else "frame",
            )
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(ConnectionResetError("the gateway closed the connection"))
        self._waiters.clear()
        if self._task is not None:
            self._task.cancel()
        self._server.connection_done()

    def pause_writing(self) -> None:
        # The peer is not reading its replies: stop reading its requests until it does.
        self._writing_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._update_reading()

    # -------------------------------------------------------------------- frames

    def _on_frame(self, rpc_type: int, payload: bytes) -> None:
        waiters = self._waiters
        if waiters:
            if rpc_type == RPC.EXTRA_INFO:
                waiter = waiters.popleft()
                if not waiter.done():  # else it was cancelled: its answer is dropped
                    try:
                        waiter.set_result(decode_extra_info_reply(payload))
                    except MalformedMessage as exc:
                        waiter.set_exception(exc)
                return
            if self._task is not None:
                self._close_after_call = True
                violation = ProtocolViolation(
                    f"expected an ExtraInfo reply, got a frame of RPC type {rpc_type}"
                )
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_exception(violation)
                waiters.clear()
                return
            waiters.clear()  # queries of a call that is over: not answered after all
        if self._task is not None:
            self._backlog.append((rpc_type, payload))
            self._update_reading()
            return
        reply = self._dispatcher.handle(rpc_type, payload, self)
        if type(reply) is bytes:
            self._write(reply)
        else:
            self._task = self._loop.create_task(self._finish(reply))  # type: ignore[arg-type]
            # The call's deadline: the server looks for calls past theirs when the first
            # one it knows of is due (registering every call costs more than the check).
            started = self._call_started = self._loop.time()
            server = self._server
            if server.deadline_check is None:
                server.check_deadlines_at(started + self._dispatcher.call_timeout)

    async def _finish(self, reply: Coroutine[Any, Any, bytes]) -> None:
        try:
            frame = await reply
        except asyncio.CancelledError:
            return  # the connection is gone; nobody to answer
        finally:
            self._task = None
        self._write(frame)
        if self._close_after_call:
            self._close()
            return
        if self._backlog:
            while self._backlog and self._task is None and self._transport is not None:
                self._on_frame(*self._backlog.popleft())
            self._update_reading()
        if self._server.closing and self._task is None:
            self._close()

    def _write(self, frame: bytes) -> None:
        if self._transport is not None:
            self._transport.write(frame)

    def ask(self, kind: InfoKind, name: str = "") -> asyncio.Future[bytes | None]:
        """Ask the gateway for a variable or a body, on this connection: the future of
        its answer (None: no such value)."""
        # The loop's own create_future: asyncio.get_running_loop() makes a getpid()
        # system call on every use (Python 3.11).
        waiter: asyncio.Future[bytes | None] = self._loop.create_future()
        if self._transport is None:
            waiter.set_exception(ConnectionResetError("the gateway closed the connection"))
            return waiter
        self._transport.write(_extra_info_query_frame(kind, name))
        self._waiters.append(waiter)
        return waiter

    # ----------------------------------------------------------------- lifecycle

    @property
    def busy(self) -> bool:
        return self._task is not None

    def expire_if_due(self, now: float) -> float | None:
        """Cancel the call running here if it is past its deadline; else the time it
        is due (None if no call is running)."""
        task = self._task
        if task is None:
            return None
        dispatcher = self._dispatcher
        due = self._call_started + dispatcher.call_timeout
        if due > now:
            return due
        dispatcher.expired_calls.expire(task)
        return None

    def _update_reading(self) -> None:
        if self._transport is None:
            return
        pause = self._writing_paused or len(self._backlog) >= _MAX_BACKLOG
        if pause and not self._reading_paused:
            self._transport.pause_reading()
        elif not pause and self._reading_paused:
            self._transport.resume_reading()
        self._reading_paused = pause

    def _close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def close_when_idle(self) -> None:
        """For shutdown: close now if no call is running, else right after it."""
        if self._task is None:
            self._close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


class RunnerServer:
    """Owns the listening socket and every live connection."""

    def __init__(self, config: Config, dispatcher: Dispatcher) -> None:
        self.config = config
        self.dispatcher = dispatcher
        self.connections: set[Connection] = set()
        self.closing = False
        self._server: asyncio.AbstractServer | None = None
        self._all_closed = asyncio.Event()
        self._refused = 0
        self._socket_id: tuple[int, int] | None = None
        self.deadline_check: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        path = self.config.socket_path
        prepare_socket_path(path)
        sock = bind_socket(path, self.config.socket_mode, self.config.socket_group)
        st = path.lstat()
        self._socket_id = (st.st_dev, st.st_ino)
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_unix_server(
                lambda: Connection(self), sock=sock, backlog=1024
            )
        except OSError as exc:
            sock.close()
            remove_socket(path, self._socket_id)
            raise StartupError(f"cannot listen on {path}: {exc.strerror or exc}") from exc

    async def stop(self) -> None:
        """Stop accepting, let calls in flight finish within the grace period, close."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        remove_socket(self.config.socket_path, self._socket_id)
        busy = sum(conn.busy for conn in self.connections)
        for conn in list(self.connections):
            conn.close_when_idle()
        if self.connections:
            if busy:
                log.info(
                    "waiting up to %g s for %d call(s) in flight", self.config.shutdown_grace, busy
                )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.shutdown_grace):
                    await self._all_closed.wait()
        for conn in list(self.connections):
            conn.abort()
        if self.deadline_check is not None:
            self.deadline_check.cancel()
            self.deadline_check = None
        if self._server is not None:
            await self._server.wait_closed()

    def check_deadlines_at(self, when: float) -> None:
        self.deadline_check = asyncio.get_running_loop().call_at(when, self._check_deadlines)

    def _check_deadlines(self) -> None:
        """Cancel the calls past their deadline; come back when the next one is due."""
        self.deadline_check = None
        self.dispatcher.expired_calls.forget_done()
        now = asyncio.get_running_loop().time()
        next_due: float | None = None
        for conn in self.connections:
            due = conn.expire_if_due(now)
            if due is not None and (next_due is None or due < next_due):
                next_due = due
        if next_due is not None:
            self.check_deadlines_at(next_due)

    def connection_done(self) -> None:
        if self.closing and not self.connections:
            self._all_closed.set()

    def note_refused(self) -> None:
        self._refused += 1
        if self._refused == 1 or self._refused % 1000 == 0:
            log.warning(
                "refused %d connection(s): at the limit of %d (max_connections)",
                self._refused,
                self.config.max_connections,
            )


def prepare_socket_path(path: Path) -> None:
    """Make the path ready to bind: create the directory, clear a stale socket file.

    A socket file that a live process still accepts on is not stale: we refuse to start
    rather than steal the gateway's connections from another runner.
    """
    make_socket_dir(path.parent)
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        _remove_stale(path)
        return
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            _remove_stale(path)
            return
        raise StartupError(f"cannot check the socket {path}: {exc}") from exc
    finally:
        probe.close()
    raise StartupError(
        f"another process is already listening on {path}; stop it or choose another path"
    )


def _remove_stale(path: Path) -> None:
    # Left behind by a runner that was killed: nobody accepts on it any more.
    path.unlink(missing_ok=True)
    log.info("removed the stale socket file %s (no process accepted on it)", path)


def make_socket_dir(directory: Path) -> None:
    """Create the socket's directory and missing parents as 0755, whatever the umask.

    Gateway workers running as another user must be able to traverse it; nobody else may
    write there (and so replace our socket). An existing directory is left as it is.
    """
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for d in reversed(missing):
        try:
            d.mkdir()
            os.chmod(d, 0o755)
        except FileExistsError:
            continue  # made meanwhile by someone else: theirs to set up
        except OSError as exc:
            raise StartupError(
                f"cannot create the socket's directory {d}: {exc.strerror or exc}"
            ) from exc


def bind_socket(path: Path, mode: int, group: str | None) -> socket.socket:
    """A Unix socket bound at ``path`` with its final mode and group, not yet listening.

    The file is born owner-only whatever the umask and is opened up only to the
    configured access before anyone can connect: a socket restricted to a group must
    never have been reachable by everyone, even for a moment.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound = False
    try:
        # The umask is process-wide; nothing else creates files while the runner starts.
        old_umask = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old_umask)
        bound = True
        set_socket_access(path, mode, group)
    except BaseException as exc:
        sock.close()
        if bound:
            path.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise StartupError(f"cannot listen on {path}: {exc.strerror or exc}") from exc
        raise
    return sock


def set_socket_access(path: Path, mode: int, group: str | None) -> None:
    try:
        if group is not None:
            try:
                gid = grp.getgrnam(group).gr_gid
            except KeyError:
                raise StartupError(f"socket_group: no group named {group!r}") from None
            os.chown(path, -1, gid)
        os.chmod(path, mode)
    except OSError as exc:
        what = f"group {group!r} and mode {mode:o}" if group is not None else f"mode {mode:o}"
        raise StartupError(f"cannot give the socket {path} {what}: {exc.strerror or exc}") from exc


def remove_socket(path: Path, only: tuple[int, int] | None = None) -> None:
    """Remove the socket file at ``path``; with ``only`` (st_dev, st_ino), only that file.

    A runner that stops must not remove the socket of another runner that took the path
    over after our file was deleted.
    """
    with contextlib.suppress(FileNotFoundError):
        st = path.lstat()
        if stat.S_ISSOCK(st.st_mode) and (only is None or (st.st_dev, st.st_ino) == only):
            path.unlink()


def raise_open_file_limit(wanted: int) -> int:
    """Raise the soft RLIMIT_NOFILE towards ``wanted`` (within the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    if soft != resource.RLIM_INFINITY and soft < wanted:
        # Not fatal: connections beyond the limit fail to be accepted, others are served.
        log.warning(
            "open-file limit is %d (hard limit %s), below the %d that max_connections needs;"
            " raise the hard limit (ulimit -Hn) or lower max_connections",
            soft,
            "unlimited" if hard == resource.RLIM_INFINITY else hard,
            wanted,
        )
    return soft


async def serve(config: Config, dispatcher: Dispatcher, ready: asyncio.Event | None = None) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    server = RunnerServer(config, dispatcher)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info(
        "listening on unix:%s (pid %d; plugins: %s)",
        config.socket_path,
        os.getpid(),
        ", ".join(dispatcher.registry.names()) or "none",
    )
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
        log.info("shutting down")
    finally:
        # Handlers stay during the grace period: a second SIGTERM must not kill the
        # process half-way through its cleanup (and leave the socket file behind).
        try:
            await server.stop()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
    log.info("stopped")

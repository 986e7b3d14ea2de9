"""The listening socket: its path, bind, permissions, stale-socket probe and limits,
and the server object that owns it and every live connection."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import logging
import os
import resource
import socket
import stat
from pathlib import Path

from runner.core.config import Config
from runner.core.dispatch import Dispatcher
from runner.core.metrics import Metrics
from runner.protocol.connection import DEFAULT_MAX_BACKLOG, DEFAULT_STALL_TIMEOUT
from runner.server.connection import Connection

log = logging.getLogger("a6.server")


class StartupError(Exception):
    """The runner cannot start as configured; the message says what to change."""


class RunnerServer:
    """Owns the listening socket and every live connection.

    ``frame_stall_timeout`` and ``max_backlog`` are the exchange's tunables (see
    ``runner.protocol.connection.Exchange``); the gateway never needs others.
    ``listener``: a socket already bound and listening (a worker's, inherited from its
    supervisor), served as it is; its file is the supervisor's to remove.
    """

    def __init__(
        self,
        config: Config,
        dispatcher: Dispatcher,
        listener: socket.socket | None = None,
        *,
        frame_stall_timeout: float = DEFAULT_STALL_TIMEOUT,
        max_backlog: int = DEFAULT_MAX_BACKLOG,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        # Counted into by the connections; None (no --metrics-listen): nothing counts.
        self.metrics = metrics
        self._listener = listener
        self.dispatcher = dispatcher
        self.frame_stall_timeout = frame_stall_timeout
        self.max_backlog = max_backlog
        self.connections: set[Connection] = set()
        self.closing = False
        self._server: asyncio.AbstractServer | None = None
        self._all_closed = asyncio.Event()
        self._refused = 0
        self._socket_id: tuple[int, int] | None = None
        self.deadline_check: asyncio.TimerHandle | None = None
        if metrics is not None:
            metrics.open_connections = lambda: len(self.connections)

    async def start(self) -> None:
        path = self.config.socket_path
        if self._listener is not None:
            sock = self._listener
        else:
            prepare_socket_path(path)
            sock = bind_socket(path, self.config.socket_mode, self.config.socket_group)
            st = path.lstat()
            self._socket_id = (st.st_dev, st.st_ino)
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_unix_server(
                lambda: Connection(self, loop), sock=sock, backlog=1024
            )
        except OSError as exc:
            sock.close()
            if self._socket_id is not None:
                remove_socket(path, self._socket_id)
            raise StartupError(f"cannot listen on {path}: {exc.strerror or exc}") from exc

    async def stop(self) -> None:
        """Stop accepting, let calls in flight finish within the grace period, close."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        if self._socket_id is not None:  # else not ours (a worker's) or never made
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
        busy = sum(conn.busy for conn in self.connections)
        if busy:
            log.warning(
                "shutdown grace of %g s is over: abandoning %d call(s) still running",
                self.config.shutdown_grace,
                busy,
            )
        for conn in list(self.connections):
            conn.abort_for_shutdown()
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
        if self.metrics is not None:
            self.metrics.connections_refused += 1
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
    except OSError as exc:
        # NotADirectoryError, PermissionError, ELOOP...: say which path and why.
        raise StartupError(f"cannot use the socket path {path}: {exc.strerror or exc}") from exc
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
    try:
        while not directory.exists():
            missing.append(directory)
            directory = directory.parent
    except OSError as exc:
        raise StartupError(
            f"cannot look up the socket's directory {directory}: {exc.strerror}"
        ) from exc
    if not directory.is_dir():
        raise StartupError(f"cannot create the socket in {directory}: it is not a directory")
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

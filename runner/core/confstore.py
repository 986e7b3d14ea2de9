"""The conf store shared by worker processes (``a6-runner run --workers N``).

The gateway sends a PrepareConf on one connection and the calls that use its token on
any connection of any of its workers, so any of our workers may be asked for any token.
Each prepared conf is therefore also a file in a private directory (on tmpfs when there
is one), named by its token and holding the route key and the plugin configs; a worker
that does not hold a token in memory reads its file, builds the chain once and keeps it.

Why a token never reads as unknown once its reply has left (the ordering argument):

1. ``claim`` writes the whole entry to a temporary file and then ``link``\\ s it to its
   token's name. ``link`` is atomic and fails if the name exists: a reader sees no file
   or a complete one, never a partial one, and two workers that picked the same token
   cannot both win (the loser picks another). ``rename`` would silently replace.
2. ``ConfCache.put`` calls ``claim`` and only then returns the token; the dispatcher
   builds the PrepareConf reply from that return value. So the file exists before the
   reply is written to the socket, and the gateway cannot send the token before it has
   read the reply: every call carrying the token finds the file, on every worker,
   including workers started (or restarted) after it was written. Directory operations
   are visible to other processes as soon as the system call returns; nothing needs
   ``fsync``, since the store lives no longer than the supervisor.
3. A re-prepare of the same conf (``touch``) sets the file's modification time before
   its reply, too. The entry is served while it is younger than ``ttl`` (the gateway's
   expire time plus a margin), the same lifetime a single process gives it.

Why a token never selects another route's conf: an entry older than ``ttl`` reads as
unknown, but its file stays until it is ``2 * ttl`` old, and while the file exists the
token cannot be claimed again. A worker keeps a chain it loaded at most ``ttl`` after
loading it, and it loaded it while the entry was younger than ``ttl``: every worker has
forgotten the token before its number can be reissued. Tokens of an earlier life of the
runner are in no store (each supervisor makes its own) and follow CLOCK_MONOTONIC (see
``TokenIssuer``), so they are unknown, never aliases.

Entries are removed only by age (``sweep``, run by the supervisor): the store holds the
confs prepared in the last ``2 * ttl``, whatever ``max_confs`` (which bounds each
worker's memory). Ages are measured on the wall clock (file times); a clock stepped
forward ages entries early (the gateway re-prepares), one stepped back keeps them longer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from runner.core.chain import Chain
from runner.core.tmpdirs import make_private_dir, tmpfs_base

log = logging.getLogger("a6.confstore")

Conf = tuple[tuple[str, str], ...]

# Directories are named after the supervisor that made them, so that the next runner can
# remove the ones a killed supervisor left behind.
DIR_PREFIX = "a6-runner-confs-"

# A temporary file older than this was left by a worker killed between write and link.
_TEMP_MAX_AGE = 60.0


class ConfStore:
    """One worker's view of the shared store: claim, touch and load entries.

    ``build`` turns a stored (route key, conf) into a chain with this worker's plugins
    (``Dispatcher.build_chain``); its errors (a conf the plugins now reject) propagate
    to the call, as they would to a PrepareConf.
    """

    def __init__(
        self,
        directory: Path,
        ttl: float,
        build: Callable[[str, Conf], Chain],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory = directory
        self.ttl = ttl
        self._dir = str(directory)
        self._build = build
        self._clock = clock

    def _path(self, token: int) -> str:
        return f"{self._dir}/{token}"

    def claim(self, token: int, conf: Chain) -> bool:
        data = json.dumps({"key": conf.key, "conf": conf.conf}, separators=(",", ":")).encode()
        temp = f"{self._dir}/.{token}.{os.getpid()}.tmp"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            os.link(temp, self._path(token))
        except FileExistsError:
            return False
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
        return True

    def touch(self, token: int, conf: Chain) -> None:
        try:
            os.utime(self._path(token))
        except FileNotFoundError:
            # Not expected (an entry lives on disk at least as long as in memory), but a
            # reply must never carry a token the other workers cannot find.
            if not self.claim(token, conf):
                raise RuntimeError(f"conf token {token} was claimed by another conf") from None

    def load(self, token: int) -> Chain:
        try:
            fd = os.open(self._path(token), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KeyError(token) from None
        with open(fd, "rb") as f:
            if self._clock() - os.fstat(fd).st_mtime >= self.ttl:
                raise KeyError(token)  # expired: kept only to stop its reissue
            entry = json.loads(f.read())
        key, conf = _entry(entry)
        chain = self._build(key, conf)
        log.debug("conf token %d loaded from the shared store", token)
        return chain


def _entry(entry: object) -> tuple[str, Conf]:
    """The route key and conf of a stored entry (written by ``claim``)."""
    if isinstance(entry, dict):
        key, conf = entry.get("key"), entry.get("conf")
        if isinstance(key, str) and isinstance(conf, list):
            pairs = []
            for item in conf:
                if not (isinstance(item, list) and len(item) == 2):
                    break
                name, value = item
                if not (isinstance(name, str) and isinstance(value, str)):
                    break
                pairs.append((name, value))
            else:
                return key, tuple(pairs)
    raise ValueError("a malformed entry in the shared conf store")


# ----------------------------------------------------------------- supervisor side


def make_store_dir(socket_path: Path) -> Path:
    """A new private (0700) directory for one supervisor's store.

    On tmpfs (``/dev/shm``) when it is writable, else beside the socket. Directories
    left by supervisors that no longer run (killed with SIGKILL) are removed first.
    """
    return make_private_dir(DIR_PREFIX, tmpfs_base(socket_path.parent))


def sweep(directory: Path, ttl: float, now: float | None = None) -> tuple[int, int]:
    """Remove entries ``2 * ttl`` old (see the module docstring) and abandoned
    temporary files; returns (removed, kept)."""
    now = time.time() if now is None else now
    removed = kept = 0
    with os.scandir(directory) as entries:
        for entry in entries:
            try:
                age = now - entry.stat(follow_symlinks=False).st_mtime
            except FileNotFoundError:
                continue
            temporary = entry.name.startswith(".")
            if age >= (_TEMP_MAX_AGE if temporary else 2 * ttl):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                removed += 1
            elif not temporary:
                kept += 1
    return removed, kept

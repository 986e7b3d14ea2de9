"""State shared by every worker process of this runner on this node: SQLite in WAL mode.

**Mechanism.** One SQLite database file, by default in a fresh directory on tmpfs
(``/dev/shm``), created by ``open_state`` in the process that opens the store -- the
supervisor, before it forks the workers -- so every worker inherits the same path. Each
process opens its own connection on first use (an SQLite connection must not cross a
fork; a connection inherited from the parent is set aside, never used or closed).

**Consistency.** Every write (``set``, ``delete``, ``incr``, ``take``) is one ``BEGIN
IMMEDIATE`` transaction: read the row, compute in Python (``model.py``), write, ``COMMIT``.
``BEGIN IMMEDIATE`` takes SQLite's write lock (an ``fcntl`` lock on the file, which the
kernel holds for the process) before the read, so two processes can never both read the
old value: updates are serialised across processes. A process that dies mid-transaction
loses the lock with its life and its unfinished transaction is never seen. Reads (``get``)
take no lock: WAL gives them the last committed snapshot while a writer works. The
transaction has no ``await`` inside, so the lock is held only for its own microseconds of
CPU (unless the scheduler preempts the holder: then for the time the holder waits for a core).

**Cost.** SQLite's part of an ``incr`` (BEGIN, SELECT, INSERT, COMMIT on tmpfs with
``synchronous=OFF``, which tmpfs makes free: it has no durability to keep) is ~23 us; a
whole ``incr`` call has a median of ~40-60 us. ``benchmarks/state.py`` (mean per call over
2000 calls, one task, on a 2-core machine shared at load ~5) measured: get 25 us, set 90,
incr 107, take 135; memory 1-18 us; Redis over a Unix socket through redis-py 450-650 us.
Every write runs in the event loop's thread: CPU the worker does not spend on requests.

**Contention.** The connection's busy timeout is 0: SQLite's own busy handler would sleep
*in the event loop's thread* (1 ms, then longer). Instead the tasks of one process queue
on an ``asyncio.Lock``, and the one at the head, when SQLite says the file is locked by
another process, yields to the loop and tries again (twice at once, then every 1 ms), so
the loop keeps serving other requests meanwhile. A call that has not got the lock after
``lock_timeout`` (default 100 ms, counted from the call) raises ``StateUnavailable``:
with the lock held for microseconds, that takes a worker stopped while holding it or a
node far more loaded than it can serve. (On that loaded 2-core machine, four forked
workers taking from one bucket together made 8300 takes/s with waits of p50 41 us, p99
15 ms, max 94 ms: holders preempted mid-transaction.)

**Limits.** Node-local only (never put the file on a network filesystem); clock is the
wall clock (``time.time``), shared by every process on the node.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from runner.core.tmpdirs import make_private_dir, tmpfs_base
from runner.state.model import StateUnavailable, Take, add_to_counter, take_from_bucket

T = TypeVar("T")
Clock = Callable[[], float]

DEFAULT_LOCK_TIMEOUT = 0.1
_SPINS = 2  # tries after a mere yield to the loop, before waiting 1 ms between tries
_BACKOFF = 0.001
_PURGE_EVERY = 64  # write transactions of this process between two sweeps of expired keys
_PURGE_AT_MOST = 256  # rows per sweep: a sweep never stalls the loop for long

_SCHEMA = """
PRAGMA journal_mode = WAL;
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    expires REAL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS kv_expires ON kv (expires) WHERE expires IS NOT NULL;
"""
_LIVE = "SELECT value, expires FROM kv WHERE key = ? AND (expires IS NULL OR expires > ?)"
_PUT = "INSERT OR REPLACE INTO kv (key, value, expires) VALUES (?, ?, ?)"
_PURGE = "DELETE FROM kv WHERE key IN (SELECT key FROM kv WHERE expires <= ? LIMIT ?)"


_DIR_PREFIX = "a6-state-"


def _tmpfs() -> str:
    return str(tmpfs_base(Path(tempfile.gettempdir())))


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    # Extended codes (SQLITE_BUSY_SNAPSHOT, ...) carry the primary code in the low byte.
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF == sqlite3.SQLITE_BUSY


class LocalBackend:
    """An SQLite file shared by the processes of one node; see the module docstring."""

    kind = "local"

    def __init__(
        self,
        path: Path | None = None,
        *,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
        clock: Clock = time.time,
    ) -> None:
        self._own_dir: Path | None = None
        if path is None:
            # The creator's pid in the name is what lets a later runner find it orphaned.
            self._own_dir = make_private_dir(_DIR_PREFIX, Path(_tmpfs()))
            path = self._own_dir / "state.db"
        self.path = path
        self.where = str(path)
        self._lock_timeout = lock_timeout
        self._clock = clock
        self._creator = os.getpid()
        self._conn: sqlite3.Connection | None = None
        self._conn_pid = 0
        self._inherited: list[sqlite3.Connection] = []
        self._writes = 0
        self._writer_lock: asyncio.Lock | None = None
        self._writer_loop: asyncio.AbstractEventLoop | None = None
        # Made here, once, by the process that opens the store; this connection waits for
        # the lock (other runners may be creating the same explicit file) and is closed
        # before anyone forks.
        try:
            setup = sqlite3.connect(path, timeout=5.0, isolation_level=None)
            try:
                setup.executescript(_SCHEMA)
            finally:
                setup.close()
        except sqlite3.Error as exc:
            raise ValueError(f"local state: cannot use {path}: {exc}") from exc

    def _connection(self) -> sqlite3.Connection:
        pid = os.getpid()
        if self._conn is None or self._conn_pid != pid:
            if self._conn is not None:
                # The parent's: closing it here could disturb the parent's locks.
                self._inherited.append(self._conn)
            conn = sqlite3.connect(self.path, timeout=0, isolation_level=None)
            conn.execute("PRAGMA synchronous = OFF")
            self._conn, self._conn_pid = conn, pid
        return self._conn

    def _turn(self) -> asyncio.Lock:
        # One lock per process and loop: a Lock belongs to the loop it first waited on.
        loop = asyncio.get_running_loop()
        if self._writer_lock is None or self._writer_loop is not loop:
            self._writer_lock, self._writer_loop = asyncio.Lock(), loop
        return self._writer_lock

    async def _run(self, op: Callable[[sqlite3.Connection, float], T], write: bool) -> T:
        if not write:
            return await self._attempt(op, write, time.monotonic() + self._lock_timeout)
        deadline = time.monotonic() + self._lock_timeout
        # The tasks of this process queue here, in order, so that at most one of them
        # per process contends for the file lock: the others would only spin.
        turn = self._turn()
        if turn.locked():  # the timer is only worth its cost when there is a queue
            try:
                async with asyncio.timeout(self._lock_timeout):
                    await turn.acquire()
            except TimeoutError:
                raise self._busy() from None
        else:
            await turn.acquire()
        try:
            return await self._attempt(op, write, deadline)
        finally:
            turn.release()

    async def _attempt(
        self, op: Callable[[sqlite3.Connection, float], T], write: bool, deadline: float
    ) -> T:
        tries = 0
        while True:
            try:
                conn = self._connection()
                if not write:
                    return op(conn, self._clock())
                conn.execute("BEGIN IMMEDIATE")
                try:
                    now = self._clock()
                    result = op(conn, now)
                    self._writes += 1
                    if self._writes % _PURGE_EVERY == 0:
                        conn.execute(_PURGE, (now, _PURGE_AT_MOST))
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
                return result
            except sqlite3.OperationalError as exc:
                if self._conn is not None and self._conn.in_transaction:
                    # A failed COMMIT leaves the transaction open; the next BEGIN would fail.
                    self._conn.execute("ROLLBACK")
                if not _is_busy(exc):
                    raise StateUnavailable(f"local state at {self.path}: {exc}") from exc
            if time.monotonic() >= deadline:
                raise self._busy()
            tries += 1
            # A yield first (the holder is usually done within microseconds), then 1 ms
            # steps, so that waiters do not take the CPU from the holder on a busy node.
            await asyncio.sleep(0 if tries <= _SPINS else _BACKOFF)

    def _busy(self) -> StateUnavailable:
        return StateUnavailable(
            f"local state at {self.path}: still locked by another process "
            f"after {self._lock_timeout * 1000:.0f} ms"
        )

    async def get(self, key: str) -> bytes | None:
        def op(conn: sqlite3.Connection, now: float) -> bytes | None:
            row = conn.execute(_LIVE, (key, now)).fetchone()
            return None if row is None else bytes(row[0])

        return await self._run(op, write=False)

    async def set(self, key: str, value: bytes, ttl: float | None) -> None:
        def op(conn: sqlite3.Connection, now: float) -> None:
            conn.execute(_PUT, (key, value, None if ttl is None else now + ttl))

        await self._run(op, write=True)

    async def delete(self, key: str) -> bool:
        def op(conn: sqlite3.Connection, now: float) -> bool:
            found = conn.execute(_LIVE, (key, now)).fetchone() is not None
            conn.execute("DELETE FROM kv WHERE key = ?", (key,))
            return found

        return await self._run(op, write=True)

    async def incr(self, key: str, amount: int, ttl: float | None) -> int:
        def op(conn: sqlite3.Connection, now: float) -> int:
            row = conn.execute(_LIVE, (key, now)).fetchone()
            value = add_to_counter(None if row is None else bytes(row[0]), amount)
            expires = None if row is None else row[1]
            if expires is None and ttl is not None:
                expires = now + ttl
            conn.execute(_PUT, (key, str(value).encode(), expires))
            return value

        return await self._run(op, write=True)

    async def take(self, key: str, rate: float, burst: int, cost: int) -> Take:
        def op(conn: sqlite3.Connection, now: float) -> Take:
            row = conn.execute(_LIVE, (key, now)).fetchone()
            answer, stored, ttl = take_from_bucket(
                None if row is None else bytes(row[0]), now, rate, burst, cost
            )
            if stored is not None:
                conn.execute(_PUT, (key, stored, now + ttl))
            return answer

        return await self._run(op, write=True)

    async def close(self) -> None:
        """Close this process's connection; the process that made a temporary file
        (normally the supervisor, after its workers are gone) also removes it."""
        if self._conn is not None and self._conn_pid == os.getpid():
            self._conn.close()
        self._conn = None
        if self._own_dir is not None and os.getpid() == self._creator:
            shutil.rmtree(self._own_dir, ignore_errors=True)
            self._own_dir = None

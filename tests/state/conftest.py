"""Fixtures for the state tests: a real redis-server on a Unix socket, and a clock to turn."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from runner.state import StateStore, open_state

REDIS_SERVER = shutil.which("redis-server")
needs_redis = pytest.mark.skipif(
    REDIS_SERVER is None,
    reason="redis-server is not installed (apt-get install redis-server); Redis backend untested",
)


class FakeClock:
    """Seconds that move only when a test says so."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class RedisServer:
    """A redis-server of our own, on a Unix socket in a directory of our own, no persistence."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.socket = directory / "redis.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, **options: str) -> str:
        query = "&".join(f"{k}={v}" for k, v in options.items())
        return f"unix://{self.socket}" + (f"?{query}" if query else "")

    def start(self) -> None:
        assert REDIS_SERVER is not None
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                *("--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700"),
                *("--save", "", "--appendonly", "no", "--dir", str(self.directory)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not self._answers_ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.01)

    def _answers_ping(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX) as conn:
                conn.settimeout(1)
                conn.connect(str(self.socket))
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """Gone at once, as after a crash: no reply to anything in flight."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def pause(self) -> None:
        """Slow to the point of silence: connections are accepted, nothing is answered."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)


@pytest.fixture
def redis_dir() -> Iterator[Path]:
    # Unix socket paths are limited to ~107 bytes: pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="a6-redis-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def running_redis(directory: Path) -> Iterator[RedisServer]:
    """A redis-server on a Unix socket in ``directory`` for the duration (the test is
    skipped where redis-server is not installed)."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer(directory)
    server.start()
    try:
        yield server
    finally:
        if server.proc is not None:
            server.resume()  # a SIGSTOPped server would ignore SIGTERM until continued
        server.kill()


@pytest.fixture
def redis_server(redis_dir: Path) -> Iterator[RedisServer]:
    """A server for this test alone: the fault tests stop and restart it."""
    with running_redis(redis_dir) as server:
        yield server


@pytest.fixture(scope="session")
def shared_redis() -> Iterator[RedisServer]:
    """One server for the tests that only use it; each test keeps to its own key prefix."""
    directory = Path(tempfile.mkdtemp(prefix="a6-redis-"))
    try:
        with running_redis(directory) as server:
            yield server
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@dataclass
class Backend:
    """A store under test, and how to let time pass for it."""

    kind: str
    store: StateStore
    clock: FakeClock | None  # None: Redis, whose clock is the server's

    @property
    def short_ttl(self) -> float:
        # Redis cannot be told the time: its TTLs have to run out for real.
        return 10.0 if self.clock else 0.1


BACKENDS = ["memory", "local", pytest.param("redis", marks=needs_redis)]


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    """Poll ``check`` until it holds; fail (TimeoutError) if it does not within ``within``."""
    async with asyncio.timeout(within):
        while True:
            if await check():
                return
            await asyncio.sleep(0.01)


def open_backend(kind: str, request: pytest.FixtureRequest) -> Backend:
    if kind == "redis":
        server: RedisServer = request.getfixturevalue("shared_redis")
        url = server.url(prefix=f"t-{uuid.uuid4().hex}:", timeout="5", connect_timeout="5")
        return Backend(kind, open_state(url), None)
    clock = FakeClock()
    return Backend(kind, open_state(f"{kind}://", clock=clock), clock)

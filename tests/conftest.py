"""Shared fixtures: a runner served in-process on a real Unix socket."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Coroutine, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import uvloop

from runner.core.config import Config
from runner.core.dispatch import Dispatcher
from runner.core.registry import load_registry
from runner.plugin import InfoSource
from runner.protocol.messages import InfoKind
from runner.server.lifecycle import build_dispatcher
from runner.server.listener import RunnerServer
from runner.tools.client import Connection

FIXTURE_PLUGINS = Path(__file__).parent / "fixtures" / "plugins"

# No async test on this suite may take longer than this: a hang fails instead of stalling CI.
ASYNC_TEST_TIMEOUT = 60.0


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run ``async def`` tests on uvloop, the loop the runner uses in production."""
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    names = pyfuncitem._fixtureinfo.argnames
    kwargs = {name: pyfuncitem.funcargs[name] for name in names}

    async def bounded() -> None:
        async with asyncio.timeout(ASYNC_TEST_TIMEOUT):
            await pyfuncitem.obj(**kwargs)

    uvloop.run(bounded())
    return True


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # Unix socket paths are limited to ~107 bytes: pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="a6-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_config(sock_dir: Path, **overrides: object) -> Config:
    base = Config(
        listen=f"unix:{sock_dir / 'runner.sock'}", plugin_dirs=(FIXTURE_PLUGINS,), examples=True
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


test_config.__test__ = False  # type: ignore[attr-defined]


@contextlib.asynccontextmanager
async def serving(
    config: Config, *, frame_stall_timeout: float = 60.0
) -> AsyncIterator[RunnerServer]:
    """A runner on ``config.listen`` in this event loop, stopped on exit."""
    dispatcher = build_dispatcher(config, load_registry(config))
    server = RunnerServer(config, dispatcher, frame_stall_timeout=frame_stall_timeout)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
        if dispatcher.executor is not None:
            dispatcher.executor.shutdown(wait=False, cancel_futures=True)


async def connect(config: Config) -> Connection:
    return await Connection.open(config.listen)


class CallRecorder:
    """A dispatcher ``Caller`` that keeps what it is given; its questions go to ``source``."""

    def __init__(self, source: InfoSource) -> None:
        self.source = source
        self.now: list[bytes] = []
        self.later: list[Coroutine[Any, Any, bytes]] = []

    def ask(self, kind: InfoKind, name: str = "") -> Awaitable[bytes | None]:
        return self.source.ask(kind, name)

    def reply(self, frame: bytes) -> None:
        self.now.append(frame)

    def reply_later(self, reply: Coroutine[Any, Any, bytes]) -> None:
        self.later.append(reply)


def handle(
    dispatcher: Dispatcher, rpc_type: int, payload: bytes, source: InfoSource
) -> bytes | Coroutine[Any, Any, bytes]:
    """What the dispatcher gives for one request frame: the reply frame at once, or the
    coroutine that produces it. Exactly one of the two, every time."""
    caller = CallRecorder(source)
    dispatcher.handle(rpc_type, payload, caller)
    assert len(caller.now) + len(caller.later) == 1, (caller.now, caller.later)
    return caller.now[0] if caller.now else caller.later[0]

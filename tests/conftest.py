"""Shared fixtures: a runner served in-process on a real Unix socket."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import uvloop

from runner.core.config import Config
from runner.server.lifecycle import build_dispatcher, load_registry
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
async def serving(config: Config) -> AsyncIterator[RunnerServer]:
    """A runner on ``config.listen`` in this event loop, stopped on exit."""
    dispatcher = build_dispatcher(config, load_registry(config))
    server = RunnerServer(config, dispatcher)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
        if dispatcher.executor is not None:
            dispatcher.executor.shutdown(wait=False, cancel_futures=True)


async def connect(config: Config) -> Connection:
    return await Connection.open(config.listen)

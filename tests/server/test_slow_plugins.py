"""Slow, hung and blocking plugin code affects only its own call, over real sockets.

Each test holds one call inside a plugin on purpose (on an event it controls, never on
a timer) and checks that calls on other connections complete meanwhile.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from runner.plugin import Plugin, Request
from runner.protocol.messages import ErrCode, InfoKind, Rewrite, Stop
from runner.tools.client import Connection, ExtraInfoQuery, RunnerError
from tests.conftest import connect, serving, test_config


class Gates:
    """Events a test opens to let a held plugin call go on (one set per test)."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.finished = threading.Event()
        self.late_error: str | None = None
        self.loop_release: asyncio.Event | None = None


GATES = Gates()


@pytest.fixture(autouse=True)
def gates() -> Iterator[Gates]:
    global GATES
    GATES = Gates()
    yield GATES
    # Never leave a worker thread parked after the test, whatever happened.
    GATES.release.set()


class SlowAsync(Plugin[None]):
    """Awaits without blocking the loop until the test releases it."""

    name = "slow-async"

    async def on_request(self, request: Request) -> None:
        release = GATES.loop_release = asyncio.Event()
        GATES.entered.set()
        await release.wait()
        request.headers.set("x-slow", "done")


class SlowBlocking(Plugin[None]):
    """Plain blocking code (as a synchronous client would block), run in a thread."""

    name = "slow-blocking"
    blocking = True

    def on_request(self, request: Request) -> None:
        GATES.entered.set()
        try:
            if not GATES.release.wait(timeout=30):
                raise TimeoutError("the test never released the call")
            addr = request.run_sync(request.var("remote_addr"))
            request.headers.set("x-blocked-then", str(addr))
        except RuntimeError as exc:
            GATES.late_error = str(exc)
            raise
        finally:
            GATES.finished.set()


class BlockingQuick(Plugin[None]):
    """A blocking plugin that does not wait: needs a free worker thread."""

    name = "blocking-quick"
    blocking = True

    def on_request(self, request: Request) -> None:
        request.stop(200, threading.current_thread().name)


def _register(server_registry: object) -> None:
    for cls in (SlowAsync, SlowBlocking, BlockingQuick):
        server_registry.add(cls, __file__)  # type: ignore[attr-defined]


async def _fast_calls(conn: Connection, count: int = 10) -> list[bytes]:
    token = await conn.prepare_conf([("request-info", "{}"), ("say", '{"body": "fast"}')])
    bodies = []
    for i in range(count):
        reply = await conn.req_call(token, id=i)
        assert isinstance(reply.action, Stop)
        bodies.append(reply.action.body)
    return bodies


async def _wait_entered() -> None:
    if not await asyncio.to_thread(GATES.entered.wait, 10):
        raise AssertionError("the slow call never reached its plugin")


async def test_a_slow_async_call_does_not_delay_calls_on_other_connections(
    sock_dir: Path,
) -> None:
    config = test_config(sock_dir)
    async with (
        serving(config) as server,
        await connect(config) as slow,
        await connect(config) as fast,
    ):
        _register(server.dispatcher.registry)
        token = await slow.prepare_conf([("slow-async", "")])
        held = asyncio.create_task(slow.req_call(token, id=1))
        await _wait_entered()

        assert await _fast_calls(fast) == [b"fast"] * 10
        assert not held.done()

        assert GATES.loop_release is not None
        GATES.loop_release.set()
        reply = await held
    assert isinstance(reply.action, Rewrite)
    assert reply.action.headers == (("x-slow", "done"),)


async def test_a_blocking_call_runs_off_the_loop_and_stalls_nobody(sock_dir: Path) -> None:
    config = test_config(sock_dir)
    async with (
        serving(config) as server,
        await connect(config) as slow,
        await connect(config) as fast,
        await connect(config) as other_blocking,
    ):
        _register(server.dispatcher.registry)
        token = await slow.prepare_conf([("slow-blocking", "")])
        held = asyncio.create_task(slow.req_call(token, id=1, vars={"remote_addr": "192.0.2.1"}))
        await _wait_entered()

        # The loop serves other connections, ExtraInfo round trips included...
        assert await _fast_calls(fast) == [b"fast"] * 10
        # ...and another blocking plugin gets another worker thread.
        quick = await other_blocking.prepare_conf([("blocking-quick", "")])
        reply = await other_blocking.req_call(quick)
        assert isinstance(reply.action, Stop)
        assert reply.action.body.startswith(b"a6-blocking")
        assert not held.done()

        GATES.release.set()
        reply = await held
    assert isinstance(reply.action, Rewrite)
    # The thread asked the gateway for a variable over the held call's connection.
    assert reply.action.headers == (("x-blocked-then", "192.0.2.1"),)


async def test_a_hung_call_fails_at_the_deadline_and_only_that_call(sock_dir: Path) -> None:
    config = test_config(sock_dir, call_timeout=0.3)
    async with serving(config), await connect(config) as hung, await connect(config) as fast:
        token = await hung.prepare_conf([("test-hang", "")])
        held = asyncio.create_task(hung.req_call(token, id=1))

        assert await _fast_calls(fast, count=3) == [b"fast"] * 3
        assert not held.done()

        with pytest.raises(RunnerError) as info:
            await held
        assert info.value.code == ErrCode.SERVICE_UNAVAILABLE
        # The connection that carried the failed call serves the next one.
        assert await _fast_calls(hung, count=2) == [b"fast"] * 2


async def test_a_blocking_call_past_the_deadline_fails_without_holding_its_connection(
    sock_dir: Path,
) -> None:
    config = test_config(sock_dir, call_timeout=0.3)
    async with serving(config) as server, await connect(config) as slow:
        _register(server.dispatcher.registry)
        token = await slow.prepare_conf([("slow-blocking", "")])
        with pytest.raises(RunnerError) as info:
            await slow.req_call(token, id=1)
        assert info.value.code == ErrCode.SERVICE_UNAVAILABLE
        # Its thread is still parked; the connection is free all the same.
        assert not GATES.release.is_set()
        assert await _fast_calls(slow, count=2) == [b"fast"] * 2

        # Woken late, the thread cannot ask the gateway on a connection that moved on.
        GATES.release.set()
        assert await asyncio.to_thread(GATES.finished.wait, 10)
        assert GATES.late_error is not None
        assert "while its call lasts" in GATES.late_error
        await _fast_calls(slow, count=1)
        assert slow.last_queries == [ExtraInfoQuery(InfoKind.VAR, "remote_addr")]


async def test_a_plugin_that_raises_fails_its_own_call_only(sock_dir: Path) -> None:
    config = test_config(sock_dir)
    async with serving(config), await connect(config) as failing, await connect(config) as fast:
        token = await failing.prepare_conf([("test-fail", "")])
        with pytest.raises(RunnerError) as info:
            await failing.req_call(token)
        assert info.value.code == ErrCode.SERVICE_UNAVAILABLE
        assert await _fast_calls(fast, count=2) == [b"fast"] * 2
        assert await _fast_calls(failing, count=2) == [b"fast"] * 2

"""Redis gone or silent: calls fail fast with StateUnavailable, and come back on their own.

Each test has a redis-server of its own, which it kills, restarts or SIGSTOPs mid-run. The
``asyncio.timeout`` guards only turn a hang into a failure; nothing here asserts a timing.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from runner.state import State, StateUnavailable, Take, open_state
from tests.state.conftest import RedisServer, eventually, needs_redis

pytestmark = needs_redis

# Bounds far above a healthy reply, even on a busy CI machine (a spurious timeout would be
# a second "lost" line), and far below a hang.
FAST = {"timeout": "0.25", "connect_timeout": "0.25", "retry_interval": "0.05"}
NEVER_HANGS = 5.0


def state_lines(caplog: pytest.LogCaptureFixture, word: str) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == "a6.state" and word in r.getMessage()
    ]


async def works(state: State) -> bool:
    try:
        await state.get("probe")
    except StateUnavailable:
        return False
    return True


async def test_redis_killed_mid_run(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="a6.state")
    async with open_state(redis_server.url(**FAST)) as store:
        state = store.for_plugin("p")
        assert await state.incr("n") == 1
        assert await state.take("c", rate=0.001, burst=1) == Take(True, 0, 0.0)
        assert not state_lines(caplog, "")

        redis_server.kill()
        async with asyncio.timeout(NEVER_HANGS):
            at_once = await asyncio.gather(
                *(state.incr("n") for _ in range(50)), return_exceptions=True
            )
            assert all(isinstance(answer, StateUnavailable) for answer in at_once)
            # While lost, calls do not each wait for a timeout: they are refused at once.
            for _ in range(20):
                with pytest.raises(StateUnavailable, match="unreachable"):
                    await state.get("n")
            deny = await state.take("c", rate=0.5, burst=1, if_unavailable="deny")
            assert deny == Take(False, 0, 2.0, unavailable=True)
            allow = await state.take("c", rate=0.5, burst=1, if_unavailable="allow")
            assert allow.allowed
            assert allow.unavailable

        redis_server.start()
        await eventually(lambda: works(state))
        # A new server (no persistence): counting starts again, the scripts load again.
        assert await state.incr("n", ttl=60) == 1
        assert await state.take("c", rate=0.001, burst=1) == Take(True, 0, 0.0)

    lost, back = state_lines(caplog, "lost Redis"), state_lines(caplog, "is back")
    assert len(lost) == 1, lost
    assert len(back) == 1, back
    assert str(redis_server.socket) in lost[0]
    assert len(state_lines(caplog, "")) == 2


async def test_redis_that_stops_answering(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="a6.state")
    async with open_state(redis_server.url(**FAST)) as store:
        state = store.for_plugin("p")
        await state.set("k", "v")
        redis_server.pause()
        try:
            async with asyncio.timeout(NEVER_HANGS):
                with pytest.raises(StateUnavailable):
                    await state.get("k")
                with pytest.raises(StateUnavailable, match="unreachable"):
                    await state.take("c", rate=1, burst=1)
        finally:
            redis_server.resume()
        await eventually(lambda: works(state))
        assert await state.get("k") == b"v"
    assert len(state_lines(caplog, "lost Redis")) == 1
    assert len(state_lines(caplog, "is back")) == 1


async def test_redis_not_there_yet_at_the_first_call(
    redis_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="a6.state")
    server = RedisServer(redis_dir)
    # Opening connects to nothing: a runner starts even when Redis is down.
    async with open_state(server.url(**FAST)) as store:
        state = store.for_plugin("p")
        async with asyncio.timeout(NEVER_HANGS):
            with pytest.raises(StateUnavailable):
                await state.incr("n")
        server.start()
        try:
            await eventually(lambda: works(state))
            assert await state.incr("n") == 1
        finally:
            server.kill()
    assert len(state_lines(caplog, "lost Redis")) == 1
    assert len(state_lines(caplog, "is back")) == 1


async def test_a_plugin_error_is_not_an_outage(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="a6.state")
    async with open_state(redis_server.url(**FAST)) as store:
        state = store.for_plugin("p")
        await state.set("k", "text")
        with pytest.raises(ValueError, match="not an integer"):
            await state.incr("k")
        with pytest.raises(ValueError, match="not a token bucket"):
            await state.take("k", rate=1, burst=1)
        assert await state.get("k") == b"text"
    assert not state_lines(caplog, "")

"""What a plugin sees, the same on every backend: memory, local (SQLite) and Redis."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator

import pytest

from runner.state import State
from tests.state.conftest import BACKENDS, Backend, eventually, open_backend


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    opened = open_backend(request.param, request)
    yield opened
    if opened.kind != "redis":  # a Redis client belongs to the test's loop: tests close it
        asyncio.run(opened.store.close())


async def expires(backend: Backend, check: Callable[[], Awaitable[bool]], ttl: float) -> None:
    """Let ``ttl`` seconds pass, then wait for ``check`` to hold (Redis: poll, bounded)."""
    if backend.clock is not None:
        backend.clock.advance(ttl)
        assert await check()
        return
    await eventually(check)


async def test_set_get_delete(backend: Backend) -> None:
    async with backend.store as store:
        state = store.for_plugin("p")
        assert await state.get("k") is None
        await state.set("k", b"\x00binary\xff")
        assert await state.get("k") == b"\x00binary\xff"
        await state.set("k", "text é")
        assert await state.get("k") == "text é".encode()
        assert await state.delete("k") is True
        assert await state.get("k") is None
        assert await state.delete("k") is False


async def test_plugins_do_not_see_each_others_keys(backend: Backend) -> None:
    async with backend.store as store:
        one, other = store.for_plugin("one"), store.for_plugin("other")
        await one.set("alice", "1")
        await other.set("alice", "2")
        assert await one.get("alice") == b"1"
        assert await other.get("alice") == b"2"
        assert await one.namespace("sub").get("alice") is None
        with pytest.raises(ValueError, match="namespace"):
            store.for_plugin("a:b")


async def test_a_key_with_a_ttl_reads_as_missing_once_it_runs_out(backend: Backend) -> None:
    async with backend.store as store:
        state = store.for_plugin("p")
        await state.set("short", "v", ttl=backend.short_ttl)
        await state.set("kept", "v", ttl=1000)
        await state.set("forever", "v")

        async def short_is_gone() -> bool:
            return await state.get("short") is None

        await expires(backend, short_is_gone, backend.short_ttl)
        assert await state.get("kept") == b"v"
        assert await state.get("forever") == b"v"
        assert await state.delete("short") is False


async def test_set_without_ttl_removes_the_old_ttl(backend: Backend) -> None:
    async with backend.store as store:
        state = store.for_plugin("p")
        await state.set("k", "old", ttl=backend.short_ttl)
        await state.set("k", "new")
        await state.set("witness", "w", ttl=backend.short_ttl)

        async def witness_is_gone() -> bool:
            return await state.get("witness") is None

        await expires(backend, witness_is_gone, backend.short_ttl)
        assert await state.get("k") == b"new"


async def test_incr_counts_from_zero_and_get_reads_the_number(backend: Backend) -> None:
    async with backend.store as store:
        state = store.for_plugin("p")
        assert await state.incr("n") == 1
        assert await state.incr("n", 41) == 42
        assert await state.incr("n", -50) == -8
        assert await state.get("n") == b"-8"
        await state.set("m", "10")
        assert await state.incr("m") == 11


@pytest.mark.parametrize("stored", ["text", "1.5", " 1", "010", "+1", "99999999999999999999"])
async def test_incr_refuses_what_is_not_an_integer_counter(backend: Backend, stored: str) -> None:
    async with backend.store as store:
        state = store.for_plugin("p")
        await state.set("k", stored)
        with pytest.raises(ValueError, match="integer"):
            await state.incr("k")
        assert await state.get("k") == stored.encode()


async def test_incr_refuses_to_overflow(backend: Backend) -> None:
    async with backend.store as store:
        state = store.for_plugin("p")
        await state.set("k", str(2**63 - 1))
        with pytest.raises(ValueError, match="overflow"):
            await state.incr("k")
        assert await state.get("k") == str(2**63 - 1).encode()


async def test_incr_ttl_is_a_window_from_the_first_increment(backend: Backend) -> None:
    async with backend.store as store:
        state = store.for_plugin("p")
        assert await state.incr("hits", ttl=backend.short_ttl) == 1
        # Later calls neither extend the window nor drop it.
        assert await state.incr("hits", ttl=1000) == 2
        assert await state.incr("hits") == 3

        async def window_is_over() -> bool:
            return await state.get("hits") is None

        await expires(backend, window_is_over, backend.short_ttl)
        assert await state.incr("hits", ttl=1000) == 1


async def test_incr_ttl_applies_to_a_counter_set_without_one(backend: Backend) -> None:
    async with backend.store as store:
        state = store.for_plugin("p")
        await state.set("n", "5")
        assert await state.incr("n", ttl=backend.short_ttl) == 6

        async def gone() -> bool:
            return await state.get("n") is None

        await expires(backend, gone, backend.short_ttl)


async def test_a_new_bucket_lets_the_burst_through_then_refuses(backend: Backend) -> None:
    async with backend.store as store:
        state = store.for_plugin("p")
        # A rate so low that no token comes back during the test, whatever the clock.
        rate = 0.001
        answers = [await state.take("c", rate=rate, burst=3) for _ in range(4)]
        assert [a.allowed for a in answers] == [True, True, True, False]
        assert [a.remaining for a in answers] == [2, 1, 0, 0]
        assert answers[0].retry_after == 0
        # One token is a 1/rate = 1000 s wait, less what may have dripped in meanwhile.
        assert 990 < answers[3].retry_after <= 1000
        assert not any(a.unavailable for a in answers)
        assert (await state.take("other-client", rate=rate, burst=3)).allowed


async def test_a_take_of_several_tokens_takes_all_or_none(backend: Backend) -> None:
    async with backend.store as store:
        state = store.for_plugin("p")
        assert (await state.take("c", rate=0.001, burst=5, cost=3)).remaining == 2
        refused = await state.take("c", rate=0.001, burst=5, cost=3)
        assert not refused.allowed
        assert refused.remaining == 2
        assert (await state.take("c", rate=0.001, burst=5, cost=2)).allowed
        with pytest.raises(ValueError, match="cost"):
            await state.take("c", rate=1, burst=5, cost=6)


async def test_tokens_come_back_at_the_rate(backend: Backend) -> None:
    async with backend.store as store:
        state = store.for_plugin("p")
        rate = 10.0
        assert (await state.take("c", rate=rate, burst=2, cost=2)).allowed
        if backend.clock is not None:
            assert not (await state.take("c", rate=rate, burst=2)).allowed
            backend.clock.advance(0.05)  # half a token
            half = await state.take("c", rate=rate, burst=2)
            assert not half.allowed
            assert half.retry_after == pytest.approx(0.05)
            backend.clock.advance(0.05)
            assert (await state.take("c", rate=rate, burst=2)).allowed
            backend.clock.advance(1000)  # refills up to the burst, no further
            assert (await state.take("c", rate=rate, burst=2)).remaining == 1
            return
        # Redis keeps its own time: wait for the token, checking the promise on the way.
        async with asyncio.timeout(10):
            while not (answer := await state.take("c", rate=rate, burst=2)).allowed:
                assert 0 < answer.retry_after <= 1 / rate
                await asyncio.sleep(0.01)


async def test_take_refuses_nonsense_arguments(backend: Backend) -> None:
    async with backend.store as store:
        state = store.for_plugin("p")
        for rate, burst in [(0.0, 1), (-1.0, 1), (float("inf"), 1), (1.0, 0)]:
            with pytest.raises(ValueError, match=r"rate|burst"):
                await state.take("c", rate=rate, burst=burst)
        with pytest.raises(ValueError, match="ttl"):
            await state.set("k", "v", ttl=0)


async def test_a_bucket_key_is_not_a_counter_and_a_counter_not_a_bucket(backend: Backend) -> None:
    async with backend.store as store:
        state = store.for_plugin("p")
        await state.take("b", rate=1, burst=5)
        with pytest.raises(ValueError, match="integer"):
            await state.incr("b")
        await state.incr("n")
        with pytest.raises(ValueError, match="bucket"):
            await state.take("n", rate=1, burst=5)


async def test_concurrent_tasks_lose_no_increment_and_overdraw_no_bucket(
    backend: Backend,
) -> None:
    async with backend.store as store:
        state = store.for_plugin("p")

        async def hammer(state: State) -> int:
            allowed = 0
            for _ in range(20):
                await state.incr("n")
                allowed += (await state.take("c", rate=0.001, burst=150)).allowed
            return allowed

        passed = await asyncio.gather(*(hammer(state) for _ in range(25)))
        assert sum(passed) == 150
        assert await state.get("n") == b"500"

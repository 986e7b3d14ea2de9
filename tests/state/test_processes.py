"""Several OS processes on one state, as the runner's forked workers are: nothing is lost.

The store is opened before the fork, as the supervisor opens it, and each child uses it
from its own event loop, with several tasks at once, all starting together. The lock
timeouts are long: these tests are about counts, on a machine that may be busy.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from pathlib import Path

import pytest

from runner.state import State, StateStore, open_state
from tests.state.conftest import RedisServer, needs_redis

PROCESSES = 4
TASKS = 4  # per process
ROUNDS = 60  # per task: one incr and one take each
BURST = 300  # fewer than the PROCESSES * TASKS * ROUNDS = 960 takes

# Python 3.12+ warns about fork() in a process with threads; these tests fork on purpose
# (it is how the runner's workers come to be) and their children use no inherited thread.
pytestmark = pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")


async def hammer(state: State) -> int:
    allowed = 0
    for _ in range(ROUNDS):
        await state.incr("requests")
        allowed += (await state.take("client", rate=0.001, burst=BURST)).allowed
    return allowed


def run_in_children(store: StateStore) -> list[int]:
    """Each child's count of allowed takes; a child's exception fails the test."""
    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    results = ctx.Queue()

    def child() -> None:
        async def work() -> int:
            state = store.for_plugin("p")
            try:
                return sum(await asyncio.gather(*(hammer(state) for _ in range(TASKS))))
            finally:
                await store.close()

        start.wait()
        try:
            results.put(asyncio.run(work()))
        except BaseException as exc:
            results.put(repr(exc))

    children = [ctx.Process(target=child) for _ in range(PROCESSES)]
    for process in children:
        process.start()
    start.set()  # all at once, so their transactions really interleave
    answers = [results.get(timeout=120) for _ in children]
    for process in children:
        process.join(timeout=60)
        assert process.exitcode == 0
    failures = [answer for answer in answers if not isinstance(answer, int)]
    assert not failures
    return [int(answer) for answer in answers]


def test_local_state_is_one_state_for_forked_workers() -> None:
    store = open_state("local://?lock_timeout=30")
    path = Path(store._backend.path)  # type: ignore[attr-defined]
    assert path.exists()

    async def before_fork() -> None:
        # The parent has a connection of its own now; the children must not share it.
        assert await store.for_plugin("p").incr("requests") == 1

    asyncio.run(before_fork())
    allowed = run_in_children(store)
    # Every child closed the store: only the process that opened it removes the file.
    assert path.exists()

    async def after() -> bytes | None:
        try:
            return await store.for_plugin("p").get("requests")
        finally:
            await store.close()

    assert sum(allowed) == BURST
    assert all(share > 0 for share in allowed), "a child got no token: did they overlap?"
    assert asyncio.run(after()) == str(1 + PROCESSES * TASKS * ROUNDS).encode()
    assert not path.exists()


def test_two_runners_on_one_local_file_share_it(tmp_path: Path) -> None:
    url = f"local://{tmp_path}/state.db?lock_timeout=30"
    store = open_state(url)
    allowed = run_in_children(store)

    async def from_another_opening() -> bytes | None:
        async with open_state(url) as other:
            return await other.for_plugin("p").get("requests")

    assert sum(allowed) == BURST
    assert asyncio.run(from_another_opening()) == str(PROCESSES * TASKS * ROUNDS).encode()
    asyncio.run(store.close())
    assert (tmp_path / "state.db").exists(), "a file named in the URL is the user's to keep"


@needs_redis
def test_redis_state_is_one_state_for_processes(redis_server: RedisServer) -> None:
    store = open_state(redis_server.url(timeout="5", connect_timeout="5"))
    allowed = run_in_children(store)

    async def after() -> bytes | None:
        async with store:
            return await store.for_plugin("p").get("requests")

    assert sum(allowed) == BURST
    assert asyncio.run(after()) == str(PROCESSES * TASKS * ROUNDS).encode()

"""The local backend under contention and crashes: bounded waits, a free event loop."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import sqlite3
import subprocess
from pathlib import Path

import pytest

from runner.state import StateUnavailable, Take, open_state
from tests.state.conftest import FakeClock


def hold_write_lock(path: Path) -> sqlite3.Connection:
    """What another worker, stopped in the middle of a write, looks like from here."""
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    return holder


async def test_a_call_that_cannot_get_the_lock_gives_up_and_the_loop_runs_on(
    tmp_path: Path,
) -> None:
    async with open_state(f"local://{tmp_path}/s.db?lock_timeout=0.2") as store:
        state = store.for_plugin("p")
        holder = hold_write_lock(tmp_path / "s.db")
        ticks = 0

        async def other_requests() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        others = asyncio.create_task(other_requests())
        with pytest.raises(StateUnavailable, match="locked by another process"):
            await state.incr("n")
        others.cancel()
        # SQLite's own busy handler would have slept in the loop: no other task would run.
        assert ticks > 2

        deny = await state.take("c", rate=2, burst=1, if_unavailable="deny")
        assert deny == Take(False, 0, 0.5, unavailable=True)
        allow = await state.take("c", rate=2, burst=1, if_unavailable="allow")
        assert allow == Take(True, 0, 0.0, unavailable=True)
        with pytest.raises(StateUnavailable):
            await state.take("c", rate=2, burst=1)
        # Reads need no lock: they see the last committed state.
        assert await state.get("n") is None

        holder.execute("ROLLBACK")
        holder.close()
        assert await state.incr("n") == 1, "a refused call must count nothing"


async def test_a_waiting_call_goes_through_once_the_lock_is_free(tmp_path: Path) -> None:
    async with open_state(f"local://{tmp_path}/s.db?lock_timeout=30") as store:
        state = store.for_plugin("p")
        holder = hold_write_lock(tmp_path / "s.db")
        holder.execute("INSERT INTO kv VALUES ('p:n', CAST('41' AS BLOB), NULL)")
        waiting = [asyncio.create_task(state.incr("n")) for _ in range(3)]
        await asyncio.sleep(0.05)
        assert not any(task.done() for task in waiting)
        holder.execute("COMMIT")
        holder.close()
        assert sorted(await asyncio.gather(*waiting)) == [42, 43, 44]


@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
async def test_a_worker_killed_in_the_middle_of_a_write_leaves_no_lock_and_no_half_write(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.db"
    async with open_state(f"local://{path}") as store:
        state = store.for_plugin("p")
        await state.set("n", "10")

        def dies_mid_write() -> None:
            conn = sqlite3.connect(path, isolation_level=None)
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("UPDATE kv SET value = CAST('999' AS BLOB) WHERE key = 'p:n'")
            os.kill(os.getpid(), signal.SIGKILL)

        child = multiprocessing.get_context("fork").Process(target=dies_mid_write)
        child.start()
        child.join(timeout=60)
        assert child.exitcode == -signal.SIGKILL
        assert await state.incr("n") == 11


async def test_expired_keys_leave_the_file_not_just_the_answers(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    clock = FakeClock()

    def rows() -> int:
        with sqlite3.connect(path) as conn:
            count: int = conn.execute("SELECT count(*) FROM kv").fetchone()[0]
        return count

    async with open_state(f"local://{path}", clock=clock) as store:
        state = store.for_plugin("p")
        for client in range(200):
            await state.take(f"client-{client}", rate=1, burst=5)
        assert rows() == 200
        clock.advance(5)  # every bucket is full again: nothing left to remember
        for _ in range(200):
            await state.incr("still-counting")
        assert rows() == 1


def test_the_file_of_a_runner_killed_with_sigkill_is_removed_by_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runner.state import local

    monkeypatch.setattr(local, "_tmpfs", lambda: str(tmp_path))
    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan = tmp_path / f"a6-state-{dead.pid}-x1"
    living = tmp_path / f"a6-state-{os.getpid()}-x2"  # a runner still at work
    foreign = tmp_path / "a6-state-notarunner"
    for path in (orphan, living, foreign):
        path.mkdir()
        (path / "state.db").write_bytes(b"")
    store = open_state("local://")
    assert not orphan.exists()
    assert living.exists()
    assert foreign.exists()
    asyncio.run(store.close())

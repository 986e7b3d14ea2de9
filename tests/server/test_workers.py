"""``a6-runner run --workers N`` as the gateway runs it: real processes, signals and sockets.

Which worker served a call is read from the reply: the ``test-pid`` fixture plugins
answer with the pid of the process that ran them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from runner.protocol.messages import ErrCode, Stop
from runner.tools.client import Connection, ProtocolViolation, RunnerError
from tests.conftest import FIXTURE_PLUGINS
from tests.server.test_process import EXIT_TIMEOUT, START_TIMEOUT, RunnerProcess, conf

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")

# Connections opened at most while looking for one on each worker: the kernel hands each
# new connection to whichever worker accepts first, so a few dozen reach them all.
MAX_CONNECTIONS_TO_SPREAD = 400


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process; None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[1])


def children(pid: int) -> set[int]:
    """The live (not zombie) child processes of ``pid``."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st is not None and st[1] == pid and st[0] != "Z":
                found.add(int(entry.name))
    return found


def gone(pid: int) -> bool:
    st = _stat(pid)
    return st is None or st[0] in "ZX"


async def until(condition: Callable[[], bool], what: str, within: float = START_TIMEOUT) -> None:
    """Poll ``condition()`` until it is true; fail naming ``what`` if it never is."""
    try:
        async with asyncio.timeout(within):
            while True:
                if condition():
                    return
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def workers_of(runner: RunnerProcess, count: int) -> set[int]:
    await until(lambda: len(children(runner.pid)) == count, f"{count} workers")
    return children(runner.pid)


async def served_by(conn: Connection) -> int:
    """The pid of the worker at the other end of ``conn`` (a conf of its own asks it)."""
    token = await conn.prepare_conf([conf("test-pid")])
    action = (await conn.req_call(token)).action
    assert isinstance(action, Stop)
    return int(action.body or b"")


@contextlib.asynccontextmanager
async def one_connection_each(sock: Path, pids: set[int]) -> AsyncIterator[dict[int, Connection]]:
    """A connection to each worker in ``pids``, kept open (so new ones spread), closed
    on exit."""
    opened: list[Connection] = []
    found: dict[int, Connection] = {}
    try:
        while set(found) != pids:
            assert len(opened) < MAX_CONNECTIONS_TO_SPREAD, f"no connection reached {pids}"
            conn = await Connection.open(str(sock))
            opened.append(conn)
            pid = await served_by(conn)
            assert pid in pids, f"pid {pid} served, not one of the workers {pids}"
            found.setdefault(pid, conn)
        yield found
    finally:
        for conn in opened:
            await conn.aclose()


@contextlib.asynccontextmanager
async def running(sock: Path, *args: str, **kwargs: object) -> AsyncIterator[RunnerProcess]:
    """``test_process.running``, stopped with SIGTERM as the gateway does (a supervisor
    killed with SIGKILL leaves its conf store for the next runner to remove)."""
    runner = RunnerProcess(sock, *args, **kwargs)  # type: ignore[arg-type]
    try:
        await runner.ready()
        yield runner
    finally:
        if runner.proc.poll() is None:
            runner.signal(signal.SIGTERM)
            with contextlib.suppress(AssertionError):
                await runner.exit_status()
        runner.kill()


def store_dir(output: str) -> Path:
    match = re.search(r"conf store (\S+?);", output)
    assert match, output
    return Path(match.group(1))


# ---------------------------------------------------------------------------- tokens


async def test_a_conf_prepared_on_any_worker_is_served_by_every_worker(sock_dir: Path) -> None:
    sock = sock_dir / "runner.sock"
    async with running(sock, "--workers", "3") as runner:
        pids = await workers_of(runner, 3)
        async with one_connection_each(sock, pids) as conns:
            for preparer, conn in conns.items():
                token = await conn.prepare_conf([conf("test-pid", tag=f"{preparer}->")])
                # Right after the reply, on every other worker: the gateway may send the
                # token on any connection of any of its workers.
                for server, other in conns.items():
                    reply = await other.req_call(token)
                    assert reply.action == Stop(200, (), f"{preparer}->{server}".encode())
            # A token never issued is still unknown everywhere (the gateway re-prepares).
            for other in conns.values():
                with pytest.raises(RunnerError) as info:
                    await other.req_call(123)
                assert info.value.code == ErrCode.CONF_TOKEN_NOT_FOUND
    # One log stream; each line says which process wrote it.
    assert f"a6-runner[supervisor pid {runner.pid}]" in runner.output
    for number, pid in enumerate(sorted(pids), 1):
        assert re.search(rf"a6-runner\[worker \d pid {pid}\]", runner.output), number


async def test_tokens_prepared_at_once_on_several_workers_are_distinct(sock_dir: Path) -> None:
    sock = sock_dir / "runner.sock"
    async with running(sock, "--workers", "2") as runner:
        pids = await workers_of(runner, 2)
        async with one_connection_each(sock, pids) as conns:

            async def prepare_many(pid: int, conn: Connection) -> list[tuple[int, bytes]]:
                made = []
                for i in range(100):
                    body = f"{pid}/{i}"
                    made.append((await conn.prepare_conf([conf("say", body=body)]), body.encode()))
                return made

            # Both workers issue tokens from the same clock at the same time.
            batches = await asyncio.gather(*(prepare_many(p, c) for p, c in conns.items()))
            results = [item for batch in batches for item in batch]
            tokens = [token for token, _ in results]
            assert len(set(tokens)) == len(tokens)
            for conn in conns.values():
                for token, body in results:
                    assert (await conn.req_call(token)).action == Stop(200, (), body)


# ------------------------------------------------------------------ a worker dies


async def test_a_worker_killed_under_load_fails_only_its_calls_and_is_replaced(
    sock_dir: Path,
) -> None:
    sock = sock_dir / "runner.sock"
    async with running(sock, "--workers", "2") as runner:
        pids = await workers_of(runner, 2)
        async with one_connection_each(sock, pids) as conns:
            victim, survivor = sorted(pids)
            tokens = {
                await conns[pid].prepare_conf([conf("say", body=f"route {i}")]): f"route {i}"
                for i in range(20)
                for pid in pids
            }
            slow = await conns[survivor].prepare_conf([conf("test-slow-pid", seconds=30)])
            in_flight = asyncio.create_task(conns[victim].req_call(slow))
            stop_load = asyncio.Event()
            served: list[bytes] = []

            async def load() -> None:
                # Calls one after another on the survivor while the victim dies.
                conn = conns[survivor]
                while not stop_load.is_set():
                    for token, body in tokens.items():
                        reply = await conn.req_call(token)
                        assert reply.action == Stop(200, (), body.encode())
                        served.append(reply.action.body)

            loader = asyncio.create_task(load())
            await asyncio.sleep(0.3)  # the slow call is running on the victim
            os.kill(victim, signal.SIGKILL)
            with pytest.raises(ProtocolViolation, match="closed the connection"):
                await in_flight

            await until(lambda: len(children(runner.pid) - {victim}) == 2, "a replacement worker")
            (replacement,) = children(runner.pid) - pids
            before = len(served)
            await until(lambda: len(served) > before + 100, "calls on the survivor")
            stop_load.set()
            await loader  # no call on the survivor failed

            # The replacement serves every token prepared before it existed.
            async with one_connection_each(sock, {survivor, replacement}) as after:
                for token, body in tokens.items():
                    reply = await after[replacement].req_call(token)
                    assert reply.action == Stop(200, (), body.encode())
    assert f"pid {victim} was killed by SIGKILL" in runner.output


# ------------------------------------------------------------------------- SIGTERM


async def test_sigterm_lets_calls_in_flight_on_every_worker_finish_then_exits_0(
    sock_dir: Path,
) -> None:
    sock = sock_dir / "runner.sock"
    # A grace long enough for a call that the worker may have started a little late on
    # a busy machine (the default 0.5 s is tested with one process).
    runner = RunnerProcess(sock, "--workers", "2", "--shutdown-grace", "3")
    try:
        await runner.ready()
        pids = await workers_of(runner, 2)
        async with one_connection_each(sock, pids) as conns:
            token = await next(iter(conns.values())).prepare_conf(
                [conf("test-slow-pid", seconds=1.0)]
            )
            calls = {
                pid: asyncio.create_task(conn.req_call(token, id=pid))
                for pid, conn in conns.items()
            }
            await asyncio.sleep(0.3)  # both calls are running
            runner.signal(signal.SIGTERM)
            for pid, call in calls.items():
                reply = await call
                assert reply.id == pid
                assert reply.action == Stop(200, (), str(pid).encode())
        assert await runner.exit_status() == 0
    finally:
        runner.kill()
    assert not sock.exists()
    assert not store_dir(runner.output).exists()
    for pid in pids:
        assert gone(pid)
        # Each worker stopped by itself, gracefully; none had to be killed.
        assert re.search(rf"pid {pid}\] INFO a6.worker: stopped", runner.output)
    assert "did not stop in time" not in runner.output


async def test_a_second_sigterm_does_not_cut_the_workers_grace_short(sock_dir: Path) -> None:
    sock = sock_dir / "runner.sock"
    async with running(sock, "--workers", "2", "--shutdown-grace", "5") as runner:
        pids = await workers_of(runner, 2)
        async with one_connection_each(sock, pids) as conns:
            token = await next(iter(conns.values())).prepare_conf(
                [conf("test-slow-pid", seconds=1.0)]
            )
            calls = [asyncio.create_task(c.req_call(token)) for c in conns.values()]
            await asyncio.sleep(0.3)  # both calls are running
            runner.signal(signal.SIGTERM)
            await asyncio.sleep(0.1)
            runner.signal(signal.SIGTERM)
            bodies = {(await call).action.body for call in calls}  # type: ignore[union-attr]
            assert bodies == {str(pid).encode() for pid in pids}
        assert await runner.exit_status() == 0
    assert not sock.exists()


# ------------------------------------------------------------- the supervisor dies


async def test_a_supervisor_killed_with_sigkill_leaves_nothing_serving(sock_dir: Path) -> None:
    sock = sock_dir / "runner.sock"
    async with running(sock, "--workers", "2") as runner:
        pids = await workers_of(runner, 2)
        runner.signal(signal.SIGKILL)
        assert await runner.exit_status() == -signal.SIGKILL
        try:
            await until(lambda: all(gone(pid) for pid in pids), "the workers to exit", EXIT_TIMEOUT)
        finally:
            for pid in pids:  # whatever happened, leave no orphan behind
                if not gone(pid):
                    os.kill(pid, signal.SIGKILL)
    # Nobody accepts on the file left behind: the next runner replaces it as stale.
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with probe, pytest.raises(ConnectionRefusedError):
        probe.connect(str(sock))
    async with running(sock, "--workers", "2") as second:
        await workers_of(second, 2)
        conn = await Connection.open(str(sock))
        async with conn:
            token = await conn.prepare_conf([conf("say", body="again")])
            assert (await conn.req_call(token)).action == Stop(200, (), b"again")
    # The store the killed supervisor could not remove is removed by the next one.
    assert not store_dir(runner.output).exists()


# ----------------------------------------------------------------- how many workers


async def test_workers_auto_starts_one_worker_per_usable_cpu(sock_dir: Path) -> None:
    sock = sock_dir / "runner.sock"
    cpus = len(os.sched_getaffinity(0))
    async with running(sock, env={"A6_RUNNER_WORKERS": "auto"}) as runner:
        if cpus == 1:
            assert children(runner.pid) == set()  # a single process, as without the option
        else:
            pids = await workers_of(runner, cpus)
            assert f"with {cpus} workers" in runner.output
            async with one_connection_each(sock, pids) as conns:
                assert set(conns) == pids


# -------------------------------------------------------------------------- reload


async def test_reload_reaches_every_worker(sock_dir: Path) -> None:
    plugins = sock_dir / "plugins"
    plugins.mkdir()
    source = plugins / "version.py"
    template = (
        "import os\n"
        "from runner.plugin import Plugin, Request\n\n"
        "class Version(Plugin[None]):\n"
        '    name = "test-version"\n\n'
        "    def on_request(self, request: Request) -> None:\n"
        '        request.stop(200, f"{VERSION} {os.getpid()}")\n'
    )
    source.write_text('VERSION = "v1"\n' + template)
    sock = sock_dir / "runner.sock"
    env = {"A6_RUNNER_PLUGINS_DIR": f"{FIXTURE_PLUGINS}{os.pathsep}{plugins}"}
    async with running(sock, "--workers", "2", "--reload", env=env) as runner:
        pids = await workers_of(runner, 2)
        async with one_connection_each(sock, pids) as conns:
            token = await next(iter(conns.values())).prepare_conf([conf("test-version")])
            for pid, conn in conns.items():
                assert (await conn.req_call(token)).action == Stop(200, (), b"v1 %d" % pid)
            edited = plugins / "version.py.new"  # replaced at once: no half-written file
            edited.write_text('VERSION = "v2"\n' + template)
            edited.replace(source)

            async def answers() -> set[bytes]:
                found: set[bytes] = set()
                for conn in conns.values():
                    try:
                        reply = await conn.req_call(token)
                    except RunnerError as exc:
                        if exc.code != ErrCode.CONF_TOKEN_NOT_FOUND:
                            raise
                        continue
                    assert isinstance(reply.action, Stop)
                    found.add(reply.action.body or b"")
                return found

            want = {b"v2 %d" % pid for pid in pids}
            async with asyncio.timeout(START_TIMEOUT):
                while True:
                    if await answers() == want:
                        break
                    await asyncio.sleep(0.1)
    for pid in pids:
        assert re.search(
            rf"pid {pid}\] INFO a6.reload: reloaded plugins after a change", runner.output
        )


async def test_a_second_runner_with_workers_on_a_live_socket_refuses_to_start(
    sock_dir: Path,
) -> None:
    sock = sock_dir / "runner.sock"
    async with running(sock, "--workers", "2") as first:
        pids = await workers_of(first, 2)
        inode = sock.stat().st_ino
        second = RunnerProcess(sock, "--workers", "2")
        assert await second.exit_status() == 1
        assert f"cannot start: another process is already listening on {sock}" in second.output
        assert sock.stat().st_ino == inode
        assert children(first.pid) == pids  # the first runner's workers are untouched

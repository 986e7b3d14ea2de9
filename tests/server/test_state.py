"""The shared state store in the runner's life (``--state-url``): opened once per runner,
before the workers are forked, closed by each process at shutdown, the supervisor last.
Real processes; which worker served a call is read from the reply (``test-pid``)."""

from __future__ import annotations

import asyncio
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from runner.protocol.messages import ErrCode, Stop
from runner.tools.client import Connection, RunnerError
from tests.server.test_process import RunnerProcess, conf, startup_failure, until_logged
from tests.server.test_workers import (
    MAX_CONNECTIONS_TO_SPREAD,
    running,
    served_by,
    workers_of,
)
from tests.state.conftest import RedisServer, eventually, needs_redis, running_redis

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")

HAS_SHM = Path("/dev/shm").is_dir()


def state_file(output: str) -> Path:
    match = re.search(r"; state (\S+?);", output)
    assert match, output
    return Path(match.group(1))


async def test_the_workers_local_state_file_lives_as_long_as_the_runner(sock_dir: Path) -> None:
    sock = sock_dir / "runner.sock"
    async with running(sock, "--workers", "2") as runner:
        await workers_of(runner, 2)
        path = state_file(runner.output)
        assert path.exists()
        if HAS_SHM:
            assert path.is_relative_to("/dev/shm")  # tmpfs: no disk write per request
        runner.signal(signal.SIGTERM)
        assert await runner.exit_status() == 0
    assert not path.parent.exists()


async def test_a_single_runners_local_state_file_lives_as_long_as_the_runner(
    sock_dir: Path,
) -> None:
    sock = sock_dir / "runner.sock"
    async with running(sock) as runner:
        path = state_file(runner.output)
        assert path.exists()
        runner.signal(signal.SIGTERM)
        assert await runner.exit_status() == 0
    assert not path.parent.exists()


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_a_state_file_that_cannot_be_made_stops_the_start_in_one_line(
    sock_dir: Path, workers: str
) -> None:
    sock = sock_dir / "runner.sock"
    where = sock_dir / "missing" / "state.db"
    runner = RunnerProcess(sock, "--workers", workers, "--state-url", f"local://{where}")
    assert await runner.exit_status() == 1
    line = startup_failure(runner, 1)
    assert "cannot start: cannot open the state store" in line
    assert str(where) in line
    assert not sock.exists()  # nothing listened


async def test_a_state_url_written_wrong_stops_the_start_naming_the_setting(
    sock_dir: Path,
) -> None:
    runner = RunnerProcess(sock_dir / "runner.sock", env={"A6_RUNNER_STATE_URL": "redis://h:x"})
    assert await runner.exit_status() == 2
    assert "A6_RUNNER_STATE_URL: state url 'redis://h:x'" in startup_failure(runner, 2)


# ------------------------------------------------------------- one limit, many processes

# A bucket that refills one token in 1000 s: within a test, only the burst can pass,
# however slowly a busy machine runs it.
BURST = 10
CALLS = 4 * BURST
ROUTE = "route#1#12#ext-plugin-pre-req"  # the shape of the gateway's conf key


def rate_limit(**options: object) -> tuple[str, str]:
    return conf("rate-limit", rate=0.001, burst=BURST, key="http_x_client", **options)


async def spread_connections(sock: Path, pids: set[int], count: int) -> list[Connection]:
    """``count`` or more open connections, at least one on each worker in ``pids``."""
    opened: list[Connection] = []
    seen: set[int] = set()
    while len(opened) < count or seen != pids:
        assert len(opened) < MAX_CONNECTIONS_TO_SPREAD, f"no connection reached {pids - seen}"
        conn = await Connection.open(str(sock))
        opened.append(conn)
        seen.add(await served_by(conn))
    return opened


async def call_all(
    targets: list[tuple[Connection, int]], calls: int, client: str
) -> list[Stop | None]:
    """``calls`` requests of ``client``, spread round-robin over ``(connection, token)``
    pairs, every connection working at once; the actions the gateway got."""
    per_target: list[list[Stop | None]] = [[] for _ in targets]

    async def work(i: int) -> None:
        conn, token = targets[i]
        for _ in range(i, calls, len(targets)):
            action = (await conn.req_call(token, vars={"http_x_client": client})).action
            assert action is None or isinstance(action, Stop), action
            per_target[i].append(action)

    await asyncio.gather(*(work(i) for i in range(len(targets))))
    return [action for actions in per_target for action in actions]


def passed(actions: list[Stop | None]) -> int:
    """How many calls passed; every other one must be a 429 with a retry-after."""
    refused = [a for a in actions if a is not None]
    for stop in refused:
        assert stop.status == 429, stop
        # The one token missing comes back within 1000 s (less the time the test took).
        assert 1 <= int(dict(stop.headers)["retry-after"]) <= 1000, stop
    return len(actions) - len(refused)


async def test_two_workers_let_exactly_the_burst_of_one_client_through(sock_dir: Path) -> None:
    sock = sock_dir / "runner.sock"
    async with running(sock, "--workers", "2") as runner:
        pids = await workers_of(runner, 2)
        conns = await spread_connections(sock, pids, 16)
        try:
            token = await conns[0].prepare_conf([rate_limit()], ROUTE)
            targets = [(conn, token) for conn in conns]
            assert passed(await call_all(targets, CALLS, "alice")) == BURST
            # Another client has a bucket of its own, on every worker too.
            assert passed(await call_all(targets, CALLS, "bob")) == BURST
        finally:
            for conn in conns:
                await conn.aclose()


@pytest.fixture
def redis(sock_dir: Path) -> Iterator[RedisServer]:
    with running_redis(sock_dir) as server:
        yield server


@needs_redis
async def test_two_runners_on_one_redis_let_exactly_the_burst_through(
    sock_dir: Path, redis: RedisServer
) -> None:
    url = redis.url(timeout="5", connect_timeout="5")  # counts, not speed, on a busy CI box
    async with (
        running(sock_dir / "a.sock", "--state-url", url) as first,
        running(sock_dir / "b.sock", "--state-url", url, "--workers", "2") as second,
    ):
        await workers_of(second, 2)
        conns = [await Connection.open(str(r.sock)) for r in (first, second) for _ in range(4)]
        try:
            # Each runner prepares the route itself, as two gateway nodes do; the buckets
            # meet in Redis because both derive the route's namespace from its conf key.
            tokens = {}
            for conn in conns:
                tokens[conn] = await conn.prepare_conf([rate_limit()], ROUTE)
            targets = [(conn, tokens[conn]) for conn in conns]
            assert passed(await call_all(targets, CALLS, "alice")) == BURST
            # Another route (another conf key) counts on its own.
            other = [(c, await c.prepare_conf([rate_limit()], "route#2#5#ext-plugin-pre-req"))
                     for c in conns]  # fmt: skip
            assert passed(await call_all(other, CALLS, "alice")) == BURST
        finally:
            for conn in conns:
                await conn.aclose()
    assert "lost Redis" not in first.output + second.output


def log_lines(output: str, text: str) -> list[str]:
    return [line for line in output.splitlines() if text in line]


@needs_redis
@pytest.mark.parametrize("how", ["killed", "silent"])
async def test_redis_gone_mid_run_answers_with_each_routes_choice_then_recovers(
    sock_dir: Path, redis: RedisServer, how: str
) -> None:
    url = redis.url(timeout="0.2", connect_timeout="0.2", retry_interval="0.1")
    sock = sock_dir / "runner.sock"
    # A call timeout far below the test's: a state call that hung would fail the call
    # (an error frame), not answer with the plugin's choice.
    async with running(sock, "--state-url", url, "--call-timeout", "10") as runner:
        conn = await Connection.open(str(sock))
        async with conn:
            open_ = await conn.prepare_conf([rate_limit(if_state_unavailable="allow")], "r#open")
            closed = await conn.prepare_conf([rate_limit(if_state_unavailable="deny")], "r#closed")

            async def answer(token: int, client: str = "carol") -> Stop | None:
                action = (await conn.req_call(token, vars={"http_x_client": client})).action
                assert action is None or isinstance(action, Stop), action
                return action

            assert passed([await answer(closed) for _ in range(BURST + 1)]) == BURST

            # Killed: connections refused. Silent (SIGSTOP): connections accepted and
            # never answered, which only the state's own timeouts bound.
            if how == "killed":
                redis.kill()
            else:
                redis.pause()
            for _ in range(3 * BURST):
                assert await answer(open_) is None  # fail open: every call passes
                stop = await answer(closed)  # fail closed: refused, not a plugin error
                assert stop is not None
                assert stop.status == 503

            # Killed and started again, it is empty (no persistence): buckets start full.
            if how == "killed":
                redis.start()
            else:
                redis.resume()

            async def back() -> bool:
                return await answer(closed, "dave") is None

            await eventually(back)
    lost = log_lines(runner.output, "lost Redis")
    assert len(lost) == 1, runner.output
    assert str(redis.socket) in lost[0]
    assert len(log_lines(runner.output, "is back after")) == 1, runner.output


async def test_buckets_outlive_a_plugin_reload(sock_dir: Path) -> None:
    # SIGHUP retires every prepared conf and its plugin instances; the gateway prepares
    # the route again (same conf key), and the new instances find the same buckets.
    sock = sock_dir / "runner.sock"
    async with running(sock) as runner:
        conn = await Connection.open(str(sock))
        async with conn:
            token = await conn.prepare_conf([rate_limit()], ROUTE)
            assert passed(await call_all([(conn, token)], CALLS, "erin")) == BURST
            runner.signal(signal.SIGHUP)
            await until_logged(runner, "reloaded plugins")
            with pytest.raises(RunnerError) as retired:
                await conn.req_call(token)
            assert retired.value.code == ErrCode.CONF_TOKEN_NOT_FOUND
            again = await conn.prepare_conf([rate_limit()], ROUTE)
            assert passed(await call_all([(conn, again)], CALLS, "erin")) == 0

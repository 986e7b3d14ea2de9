"""Limits: connections and frame sizes bounded by configuration with sane defaults, the
open-file limit, and keep-alive connections held however long they stay idle."""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import threading
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import pytest

from runner.cli import run as run_command
from runner.core.config import Config, read_config_file
from runner.protocol.frame import MAX_PAYLOAD, RPC, encode_frame
from runner.protocol.messages import (
    ErrCode,
    Stop,
    decode_error,
    decode_prepare_conf_reply,
    encode_prepare_conf,
)
from runner.server.listener import RunnerServer, raise_open_file_limit
from runner.tools.client import Connection
from tests.conftest import connect, serving, test_config

ROOT = Path(__file__).resolve().parents[2]


def conf(name: str, **config: object) -> tuple[str, str]:
    return name, json.dumps(config)


async def settled(server: RunnerServer, connections: int) -> None:
    async with asyncio.timeout(5):
        while len(server.connections) != connections:  # noqa: ASYNC110 - no event for this
            await asyncio.sleep(0.01)


# ------------------------------------------------------------------------ defaults


def test_the_defaults_fit_the_gateway() -> None:
    config = Config()
    assert config.max_frame_size == MAX_PAYLOAD == (1 << 24) - 1
    # 32 pooled connections per gateway worker: 4096 serves 128 workers.
    assert config.max_connections == 4096
    assert config.socket_mode == 0o766  # workers running as another user can connect
    assert config.socket_group is None
    # The gateway keeps tokens 3600 s; confs must outlive them.
    assert config.conf_ttl > config.conf_expire_time == 3600
    # SIGTERM: calls get their grace inside the 1 s the gateway waits before SIGKILL.
    assert 0 < config.shutdown_grace < 1
    # A call's deadline comes before the gateway's 60 s read timeout.
    assert config.call_timeout < 60


def test_the_documented_defaults_are_the_real_ones() -> None:
    shipped = ROOT / "runner" / "a6-runner.toml"
    documented = read_config_file(shipped)
    # Every setting is documented (one without a default, commented out), and the file
    # read back is exactly the defaults.
    defaults = Config()
    unset = {f.name for f in fields(Config) if getattr(defaults, f.name) is None}
    assert set(documented) == {f.name for f in fields(Config)} - unset
    assert all(f"# {name} = " in shipped.read_text() for name in unset)
    assert Config.from_values(documented) == Config()
    # The help shows Config's defaults: the CLI repeats none of its own.
    shown = {p.name: p.default for p in run_command.params}
    assert shown["max_connections"] == str(Config().max_connections)
    assert shown["socket_mode"] == "0766"
    assert shown["shutdown_grace"] == str(Config().shutdown_grace)


@pytest.mark.parametrize(
    "overrides",
    [
        {"max_frame_size": 0},
        {"max_frame_size": MAX_PAYLOAD + 1},
        {"max_connections": 0},
        {"socket_mode": 0o1777},
    ],
)
def test_limits_out_of_range_are_refused(overrides: dict[str, int]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each names its own setting
        Config(**overrides).check()  # type: ignore[arg-type]


# --------------------------------------------------------------------- connections


async def test_connections_over_the_limit_are_refused_and_the_others_kept(
    sock_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = test_config(sock_dir, max_connections=8)
    async with serving(config) as server:
        conns = [await connect(config) for _ in range(8)]
        try:
            token = await conns[0].prepare_conf([conf("say", body="kept")])
            for conn in conns:
                assert (await conn.req_call(token)).action == Stop(200, (), b"kept")
            for _ in range(3):
                async with await connect(config) as extra:
                    # Refused: closed at once, before any exchange.
                    assert await extra._reader.read() == b""
            # Refusing new connections never costs an idle one its place.
            for conn in conns:
                assert (await conn.req_call(token)).action is not None
            await conns.pop().aclose()
            await settled(server, 7)
            async with await connect(config) as late:
                assert (await late.req_call(token)).action is not None
        finally:
            for conn in conns:
                await conn.aclose()
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1  # one line, not one per refusal
    assert "at the limit of 8 (max_connections)" in refusals[0].getMessage()


async def test_connection_slots_are_given_back_whatever_way_a_connection_ends(
    sock_dir: Path,
) -> None:
    config = test_config(sock_dir, max_connections=4)
    async with serving(config) as server:
        async with await connect(config) as setup:
            token = await setup.prepare_conf([conf("test-sleep", seconds=0.01)])
        for i in range(60):
            async with await connect(config) as conn:
                if i % 3 == 0:
                    await conn.req_call(token)
                elif i % 3 == 1:
                    conn._writer.write(b"\x02\x00")  # half a header
                else:
                    conn._writer.write(encode_frame(9, b"?"))
        await settled(server, 0)
        async with await connect(config) as conn:
            assert (await conn.req_call(token)).action is None


# -------------------------------------------------------------------------- frames


async def test_a_frame_at_the_limit_is_served_and_one_byte_more_is_refused(
    sock_dir: Path,
) -> None:
    limit = 1024
    config = test_config(sock_dir, max_frame_size=limit)
    base = encode_prepare_conf([conf("say")], key="")
    pad = limit - len(encode_prepare_conf([conf("say")], key="k"))
    exact = encode_prepare_conf([conf("say")], key="k" * (pad + 1))
    assert len(exact) == limit, (len(base), len(exact))
    async with serving(config), await connect(config) as conn:
        rpc_type, payload = await conn.call_raw(RPC.PREPARE_CONF, exact)
        assert rpc_type == RPC.PREPARE_CONF
        assert decode_prepare_conf_reply(payload) != 0
        await conn.send_frame(RPC.PREPARE_CONF, exact + b"\0")
        rpc_type, payload = await conn.read_frame()
        assert (rpc_type, decode_error(payload)) == (RPC.ERROR, ErrCode.BAD_REQUEST)
        assert await conn._reader.read() == b""  # the rest of the stream cannot be trusted


# --------------------------------------------------------------- open-file limit


@pytest.fixture
def nofile() -> Iterator[tuple[int, int]]:
    saved = resource.getrlimit(resource.RLIMIT_NOFILE)
    yield saved
    resource.setrlimit(resource.RLIMIT_NOFILE, saved)


def test_the_open_file_limit_is_raised_within_the_hard_limit(nofile: tuple[int, int]) -> None:
    _, hard = nofile
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    wanted = 1000 if hard == resource.RLIM_INFINITY else min(1000, hard)
    assert raise_open_file_limit(wanted) == wanted
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (wanted, hard)


# (A hard limit below what max_connections needs is tested on a runner process, in
# test_process.py: lowering this process's hard limit could not be undone.)


# ----------------------------------------------------------------------- keep-alive


class _TimeTravelLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock the test can move forward: every timer the runner set
    (an idle timeout, say) fires as if that much time had passed."""

    offset = 0.0

    def time(self) -> float:
        return super().time() + self.offset


def test_idle_keep_alive_connections_are_never_closed_by_the_runner(sock_dir: Path) -> None:
    # The gateway keeps pooled connections up to 180 s idle and reuses them without a
    # retry: a runner that closed one earlier would turn the next request into a 503.
    config = test_config(sock_dir)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, _TimeTravelLoop)
        async with serving(config) as server, await connect(config) as conn:
            idle = [await Connection.open(config.listen) for _ in range(3)]
            try:
                token = await conn.prepare_conf([conf("say", body="still open")])
                for hours in (1, 24, 24 * 30):
                    loop.offset += hours * 3600.0
                    await asyncio.sleep(0.05)  # any timer now due has fired
                    for c in (conn, *idle):
                        reply = await c.req_call(token)
                        assert reply.action == Stop(200, (), b"still open")
                assert len(server.connections) == 4
            finally:
                for c in idle:
                    await c.aclose()

    async def bounded() -> None:
        # Bounded in real time: a timeout on the loop's clock would fire at the first jump.
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        watchdog = threading.Timer(30, loop.call_soon_threadsafe, (task.cancel,))
        watchdog.start()
        try:
            await scenario()
        finally:
            watchdog.cancel()

    with asyncio.Runner(loop_factory=_TimeTravelLoop) as runner:
        runner.run(bounded())


async def test_many_idle_connections_are_held_at_once(sock_dir: Path) -> None:
    config = test_config(sock_dir)
    async with serving(config) as server:
        conns = await asyncio.gather(*(connect(config) for _ in range(300)))
        try:
            token = await conns[0].prepare_conf([conf("say", body="pool")])
            await asyncio.sleep(0.2)
            replies = await asyncio.gather(*(c.req_call(token) for c in conns))
            assert all(r.action == Stop(200, (), b"pool") for r in replies)
            assert len(server.connections) == 300
        finally:
            for c in conns:
                await c.aclose()


def test_logging_does_not_need_to_be_configured_for_these_tests() -> None:
    # The refusal test reads the runner's warning through caplog: the logger propagates
    # unless the CLI set it up, which these in-process tests never do.
    assert logging.getLogger("a6.server").propagate

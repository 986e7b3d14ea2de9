"""Faults, one at a time: a gateway that vanishes at every point of an exchange, plugins
that raise, hang, block or return what they should not, replies too large to frame,
wrong answers to ExtraInfo, and a flood of distinct confs.

Each test checks what the gateway would see for the faulty call, that nothing else is
disturbed (other connections, the next call on the same connection), and that the
runner keeps no trace of it (no connection, no task, no thread left behind).
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from runner.core.chain import Chain
from runner.core.config import Config
from runner.protocol.frame import RPC, encode_frame
from runner.protocol.messages import (
    ErrCode,
    InfoKind,
    Rewrite,
    Stop,
    decode_error,
    encode_extra_info_reply,
    encode_prepare_conf,
    encode_req_call,
    encode_resp_call,
)
from runner.server.listener import RunnerServer
from runner.tools.client import Connection, RunnerError
from tests.conftest import connect, serving, test_config


def conf(name: str, **config: object) -> tuple[str, str]:
    return name, json.dumps(config)


async def settled(server: RunnerServer, connections: int = 0) -> None:
    """Wait until only ``connections`` connections are left, none of them busy."""
    await until(
        lambda: (
            len(server.connections) <= connections and not any(c.busy for c in server.connections)
        )
    )


async def until(predicate: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not predicate():  # noqa: ASYNC110 - polls state that has no event
            await asyncio.sleep(0.01)


def plugin_class(server: RunnerServer, name: str) -> Any:
    cls = server.dispatcher.registry.get(name)
    assert cls is not None
    return cls


async def still_serves(config: Config, conn: Connection | None = None) -> None:
    """A well-formed call gets its answer (on ``conn``, or a new connection)."""
    if conn is None:
        async with await connect(config) as fresh:
            await still_serves(config, fresh)
        return
    token = await conn.prepare_conf([conf("say", body="still here")])
    reply = await conn.req_call(token, id=99)
    assert reply.id == 99
    assert reply.action == Stop(200, (), b"still here")


def no_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


# ---------------------------------------------------------------- the gateway vanishes


@pytest.mark.parametrize("cut", [1, 3, 4, 5, -1])
async def test_a_client_that_vanishes_mid_frame_leaves_nothing_behind(
    sock_dir: Path, cut: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    config = test_config(sock_dir)
    async with serving(config) as server, await connect(config) as bystander:
        token = await bystander.prepare_conf([conf("say", body="x")])
        frame = encode_frame(RPC.HTTP_REQ_CALL, encode_req_call(conf_token=token))
        async with await connect(config) as conn:
            conn._writer.write(frame[:cut])
            await conn._writer.drain()
            await until(lambda: len(server.connections) == 2)
        await settled(server, connections=1)
        await still_serves(config, bystander)
    assert "closed in the middle of a frame" in caplog.text
    assert not no_errors(caplog)


async def test_a_client_that_vanishes_mid_extra_info_cancels_its_call(
    sock_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = test_config(sock_dir)
    async with serving(config) as server, await connect(config) as bystander:
        probe = plugin_class(server, "test-cancel-probe")
        probe.outcomes.clear()
        token = await bystander.prepare_conf([conf("test-cancel-probe")])
        async with await connect(config) as conn:
            await conn.send_frame(RPC.HTTP_REQ_CALL, encode_req_call(conf_token=token))
            rpc_type, _ = await conn.read_frame()
            assert rpc_type == RPC.EXTRA_INFO  # the plugin now waits for the answer
        await until(lambda: bool(probe.outcomes))
        assert probe.outcomes == ["cancelled"]  # not left waiting for an answer forever
        await settled(server, connections=1)
        # The same plugin still serves a gateway that does answer.
        reply = await bystander.req_call(token, vars={"remote_addr": "10.9.8.7"})
        assert reply.action == Stop(200, (), b"10.9.8.7")
    assert not no_errors(caplog)


async def test_a_blocking_plugin_whose_client_vanishes_mid_extra_info_frees_its_thread(
    sock_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # One worker thread: if the vanished call kept it, the next blocking call would hang.
    config = test_config(sock_dir, blocking_workers=1)
    async with serving(config) as server, await connect(config) as bystander:
        probe = plugin_class(server, "test-blocking-ask")
        probe.outcomes.clear()
        token = await bystander.prepare_conf([conf("test-blocking-ask")])
        for _ in range(3):
            async with await connect(config) as conn:
                await conn.send_frame(RPC.HTTP_REQ_CALL, encode_req_call(conf_token=token))
                rpc_type, _ = await conn.read_frame()
                assert rpc_type == RPC.EXTRA_INFO
        await until(lambda: len(probe.outcomes) == 3)
        assert probe.outcomes == ["ConnectionResetError"] * 3
        reply = await bystander.req_call(token, vars={"remote_addr": "10.0.0.2"})
        assert reply.action == Stop(200, (), b"10.0.0.2")
        await settled(server, connections=1)


@pytest.mark.parametrize("read", [0, 4, 100_000])
async def test_a_client_that_vanishes_mid_reply_disturbs_nobody(
    sock_dir: Path, read: int, caplog: pytest.LogCaptureFixture
) -> None:
    config = test_config(sock_dir)
    async with serving(config) as server, await connect(config) as bystander:
        big = await bystander.prepare_conf([conf("test-big-reply", size=8 << 20)])
        for _ in range(3):
            async with await connect(config) as conn:
                await conn.send_frame(RPC.HTTP_REQ_CALL, encode_req_call(conf_token=big))
                if read:
                    await conn._reader.readexactly(read)
        await settled(server, connections=1)
        reply = await bystander.req_call(big)  # the same 8 MiB reply, whole, to someone who reads
        assert isinstance(reply.action, Stop)
        assert len(reply.action.body) == 8 << 20
    assert not no_errors(caplog)


async def test_a_client_that_vanishes_while_an_async_call_runs_cancels_it(
    sock_dir: Path,
) -> None:
    config = test_config(sock_dir)
    async with serving(config) as server, await connect(config) as bystander:
        hang = await bystander.prepare_conf([conf("test-hang")])
        for _ in range(5):
            async with await connect(config) as conn:
                await conn.send_frame(RPC.HTTP_REQ_CALL, encode_req_call(conf_token=hang))
                await until(lambda: any(c.busy for c in server.connections))
        # No task is left hanging on behalf of a connection that is gone.
        await settled(server, connections=1)
        tasks = [t for t in asyncio.all_tasks() if "_finish" in repr(t.get_coro())]
        assert tasks == []


# ---------------------------------------------------------------- plugins misbehave


@pytest.mark.parametrize("plugin", ["test-fail", "test-async-fail", "test-blocking-fail"])
async def test_a_plugin_that_raises_fails_its_call_only(
    sock_dir: Path, plugin: str, caplog: pytest.LogCaptureFixture
) -> None:
    config = test_config(sock_dir)
    async with serving(config), await connect(config) as conn:
        bad = await conn.prepare_conf([conf(plugin)])
        with pytest.raises(RunnerError) as info:
            await conn.req_call(bad, id=3)
        assert info.value.code == ErrCode.SERVICE_UNAVAILABLE
        await still_serves(config, conn)
    assert f"plugin '{plugin}' raised in on_request (call 3)" in caplog.text


@pytest.mark.parametrize("plugin", ["test-fail", "test-async-fail"])
async def test_a_plugin_that_raises_in_the_response_phase_fails_its_call_only(
    sock_dir: Path, plugin: str
) -> None:
    config = test_config(sock_dir)
    async with serving(config), await connect(config) as conn:
        bad = await conn.prepare_conf([conf(plugin)])
        with pytest.raises(RunnerError) as info:
            await conn.resp_call(bad, id=4)
        assert info.value.code == ErrCode.SERVICE_UNAVAILABLE
        await still_serves(config, conn)


@pytest.mark.parametrize(
    ("entry", "phase"),
    [
        (conf("test-blocking-hang", seconds=2.0), "request"),
        (conf("test-resp-hang"), "response"),
    ],
)
async def test_a_plugin_that_hangs_fails_at_the_deadline_while_others_are_served(
    sock_dir: Path, entry: tuple[str, str], phase: str
) -> None:
    config = test_config(sock_dir, call_timeout=0.3)
    async with serving(config), await connect(config) as hung, await connect(config) as other:
        token = await hung.prepare_conf([entry])
        say = await other.prepare_conf([conf("say", body="alive")])
        call = hung.req_call(token) if phase == "request" else hung.resp_call(token)
        stuck = asyncio.create_task(call)
        await asyncio.sleep(0.05)
        for _ in range(10):
            assert (await other.req_call(say)).action is not None
        with pytest.raises(RunnerError) as info:
            await stuck
        assert info.value.code == ErrCode.SERVICE_UNAVAILABLE
        assert (await hung.req_call(say)).action is not None  # usable again


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (conf("test-returns", what="int"), "on_request returned int 42; hooks must return None"),
        (conf("test-returns", what="false"), "on_request returned bool False"),
        (
            conf("test-returns", what="coroutine"),
            "on_request is a plain function but returned a coroutine: declare it 'async def'",
        ),
        (conf("test-async-returns"), "on_request returned str 'allowed'"),
        (conf("test-blocking-returns"), "on_request returned int 403"),
    ],
)
async def test_a_hook_that_returns_a_value_fails_its_call_instead_of_being_ignored(
    sock_dir: Path, entry: tuple[str, str], message: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A returned value is not a verdict: ignoring it could let a request through that the
    # plugin meant to deny (and an un-awaited coroutine is a plugin that never ran).
    config = test_config(sock_dir)
    async with serving(config), await connect(config) as conn:
        token = await conn.prepare_conf([entry, conf("say", body="reached the end")])
        with pytest.raises(RunnerError) as info:
            await conn.req_call(token)
        assert info.value.code == ErrCode.SERVICE_UNAVAILABLE
        # the same wrong plugin alongside an async one fails the same way
        mixed = await conn.prepare_conf([conf("test-sleep", seconds=0), entry])
        with pytest.raises(RunnerError):
            await conn.req_call(mixed)
        await still_serves(config, conn)
    assert message in caplog.text
    gc.collect()  # an un-awaited coroutine would warn here (warnings are errors)


async def test_a_reply_over_the_frame_limit_is_an_error_in_both_phases(sock_dir: Path) -> None:
    config = test_config(sock_dir, max_frame_size=64 * 1024)
    async with serving(config), await connect(config) as conn:
        big = await conn.prepare_conf([conf("test-big-reply", size=64 * 1024)])
        with pytest.raises(RunnerError) as info:
            await conn.req_call(big)
        assert info.value.code == ErrCode.SERVICE_UNAVAILABLE
        # The response phase: a body echoed back (as its repr, 4 B per byte) over the limit.
        echo = await conn.prepare_conf([conf("test-resp-echo")])
        with pytest.raises(RunnerError) as info:
            await conn.resp_call(echo, resp_body=b"\xff" * 20_000)
        assert info.value.code == ErrCode.SERVICE_UNAVAILABLE
        small = await conn.prepare_conf([conf("test-big-reply", size=60_000)])
        reply = await conn.req_call(small)
        assert isinstance(reply.action, Stop)
        assert len(reply.action.body) == 60_000


async def test_a_reply_over_16_mib_never_reaches_the_wire_with_a_wrapped_length(
    sock_dir: Path,
) -> None:
    config = test_config(sock_dir)
    async with serving(config), await connect(config) as conn:
        token = await conn.prepare_conf([conf("test-body-size")])
        # A 16 MiB - 100 B request body comes back reversed: with the rest of the reply
        # the frame is just over the limit.
        body = b"b" * ((1 << 24) - 100)
        rpc_type, payload = await conn.call_raw(
            RPC.HTTP_REQ_CALL,
            encode_req_call(conf_token=token),
            lambda query: body if query.kind is InfoKind.REQ_BODY else None,
        )
        assert (rpc_type, decode_error(payload)) == (RPC.ERROR, ErrCode.SERVICE_UNAVAILABLE)
        reply = await conn.req_call(token, body=b"abc")  # in step
        assert isinstance(reply.action, Rewrite)
        assert reply.action.body == b"cba"


# ------------------------------------------------------- wrong answers to ExtraInfo


@pytest.mark.parametrize(
    "answer",
    [
        (RPC.HTTP_REQ_CALL, b"x"),
        (RPC.PREPARE_CONF, encode_prepare_conf([("say", "{}")])),
        (RPC.ERROR, b""),
        (9, b"????"),
    ],
)
@pytest.mark.parametrize("plugin", ["test-cancel-probe", "test-blocking-ask"])
async def test_a_wrong_frame_type_for_an_extra_info_answer_fails_the_call_and_closes(
    sock_dir: Path, answer: tuple[int, bytes], plugin: str
) -> None:
    config = test_config(sock_dir)
    async with serving(config) as server, await connect(config) as bystander:
        token = await bystander.prepare_conf([conf(plugin)])
        confs_before = len(server.dispatcher.cache)
        async with await connect(config) as conn:
            await conn.send_frame(RPC.HTTP_REQ_CALL, encode_req_call(conf_token=token))
            assert (await conn.read_frame())[0] == RPC.EXTRA_INFO
            await conn.send_frame(*answer)
            rpc_type, payload = await conn.read_frame()
            assert (rpc_type, decode_error(payload)) == (RPC.ERROR, ErrCode.BAD_REQUEST)
            assert await conn._reader.read() == b""  # then the runner hangs up
        # The stray frame was not served as a request of its own.
        assert len(server.dispatcher.cache) == confs_before
        await settled(server, connections=1)
        reply = await bystander.req_call(token, vars={"remote_addr": "1.1.1.1"})
        assert reply.action == Stop(200, (), b"1.1.1.1")


async def test_a_garbled_extra_info_answer_fails_the_call_and_keeps_the_connection(
    sock_dir: Path,
) -> None:
    config = test_config(sock_dir)
    async with serving(config), await connect(config) as conn:
        token = await conn.prepare_conf([conf("test-cancel-probe")])
        await conn.send_frame(RPC.HTTP_REQ_CALL, encode_req_call(conf_token=token))
        assert (await conn.read_frame())[0] == RPC.EXTRA_INFO
        await conn.send_frame(RPC.EXTRA_INFO, b"\xff\xff\xff\x7f")
        rpc_type, payload = await conn.read_frame()
        assert (rpc_type, decode_error(payload)) == (RPC.ERROR, ErrCode.BAD_REQUEST)
        reply = await conn.req_call(token, vars={"remote_addr": "2.2.2.2"})  # in step
        assert reply.action == Stop(200, (), b"2.2.2.2")


async def test_an_extra_info_answer_over_the_frame_limit_closes_the_connection(
    sock_dir: Path,
) -> None:
    config = test_config(sock_dir, max_frame_size=1024)
    async with serving(config) as server, await connect(config) as conn:
        token = await conn.prepare_conf([conf("test-cancel-probe")])
        await conn.send_frame(RPC.HTTP_REQ_CALL, encode_req_call(conf_token=token))
        assert (await conn.read_frame())[0] == RPC.EXTRA_INFO
        await conn.send_frame(RPC.EXTRA_INFO, encode_extra_info_reply(b"a" * 2000))
        rpc_type, payload = await conn.read_frame()
        assert (rpc_type, decode_error(payload)) == (RPC.ERROR, ErrCode.BAD_REQUEST)
        assert await conn._reader.read() == b""
        await settled(server)


# -------------------------------------------------------------------- conf flood


async def test_thousands_of_distinct_confs_stay_bounded_and_never_alias(sock_dir: Path) -> None:
    limit = 200
    config = test_config(sock_dir, max_confs=limit)
    async with serving(config) as server:

        async def prepare_many(worker: int) -> list[tuple[int, bytes]]:
            async with await connect(config) as conn:
                out = []
                for i in range(500):
                    body = f"route {worker}/{i}"
                    key = f"route#flood-{worker}-{i}#ext-plugin-pre-req#1"
                    out.append(
                        (await conn.prepare_conf([conf("say", body=body)], key), body.encode())
                    )
                return out

        prepared = [
            t for batch in await asyncio.gather(*(prepare_many(w) for w in range(6))) for t in batch
        ]
        tokens = [t for t, _ in prepared]
        assert len(set(tokens)) == len(tokens) == 3000  # never one token for two confs

        # Memory stays bounded: the cache, the route-key index and the live chains.
        assert len(server.dispatcher.cache) <= limit
        assert len(server.dispatcher._by_key) <= limit
        gc.collect()
        ours = [o for o in gc.get_objects() if isinstance(o, Chain) and "#flood-" in o.key]
        assert len(ours) <= limit

        # Every token gives its own route's plugins or CONF_TOKEN_NOT_FOUND, never
        # another route's; the most recent ones are all still there.
        found = 0
        codes: Counter[int] = Counter()
        async with await connect(config) as conn:
            for n, (token, body) in enumerate(prepared):
                try:
                    reply = await conn.req_call(token)
                except RunnerError as exc:
                    codes[exc.code] += 1
                    continue
                assert reply.action == Stop(200, (), body), (n, token)
                found += 1
        assert 0 < found <= limit
        assert set(codes) == {ErrCode.CONF_TOKEN_NOT_FOUND}


async def test_an_expired_token_is_not_found_and_the_route_is_prepared_again(
    sock_dir: Path,
) -> None:
    # What the gateway does on CONF_TOKEN_NOT_FOUND: PrepareConf again (same route key)
    # and retry. The retry must get a fresh token with the route's own plugins.
    from runner.core.cache import ConfCache

    config = test_config(sock_dir, conf_expire_time=10)
    now = [0.0]
    async with serving(config) as server, await connect(config) as conn:
        server.dispatcher.cache = ConfCache(config.conf_ttl, config.max_confs, lambda: now[0])
        key = "route#7#ext-plugin-pre-req#1"
        old = await conn.prepare_conf([conf("say", body="seven")], key)
        other = await conn.prepare_conf([conf("say", body="eight")], "route#8#ext-plugin-pre-req#1")
        now[0] += config.conf_ttl + 1
        for token in (old, other):
            with pytest.raises(RunnerError) as info:
                await conn.req_call(token)
            assert info.value.code == ErrCode.CONF_TOKEN_NOT_FOUND
        new = await conn.prepare_conf([conf("say", body="seven")], key)
        assert new not in (old, other)
        assert (await conn.req_call(new)).action == Stop(200, (), b"seven")
        with pytest.raises(RunnerError):
            await conn.req_call(old)


async def test_a_response_call_for_an_unknown_token_is_not_found(sock_dir: Path) -> None:
    config = test_config(sock_dir)
    async with serving(config), await connect(config) as conn:
        rpc_type, payload = await conn.call_raw(
            RPC.HTTP_RESP_CALL, encode_resp_call(conf_token=7, id=1)
        )
    assert (rpc_type, decode_error(payload)) == (RPC.ERROR, ErrCode.CONF_TOKEN_NOT_FOUND)


async def test_a_stop_body_built_from_a_non_utf8_header_value_is_sent(sock_dir: Path) -> None:
    # Found by the socket fuzzer. Header values are not always UTF-8 (Latin-1 from old
    # clients); the runner hands them to plugins as str with surrogate escapes.
    config = test_config(sock_dir)
    async with serving(config), await connect(config) as conn:
        token = await conn.prepare_conf([("test-echo-header", '{"name": "x-name"}')])
        latin1 = b"caf\xe9".decode("utf-8", "surrogateescape")
        reply = await conn.req_call(token, headers=[("x-name", latin1)])
    assert isinstance(reply.action, Stop)
    assert reply.action.body == b"caf\xe9"

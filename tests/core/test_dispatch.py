"""The dispatcher in memory: request payload in, reply frame out, no socket."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import pytest

from runner.core.cache import ConfCache
from runner.core.chain import Chain, PluginFailed
from runner.core.config import Config
from runner.core.dispatch import Dispatcher
from runner.core.errors import (
    BadRequest,
    CallTimeout,
    ConfTokenNotFound,
    ProtocolViolation,
    UnknownPlugin,
    error_code_for,
)
from runner.core.registry import load_registry
from runner.protocol.frame import RPC, FrameDecoder, FrameTooLarge
from runner.protocol.messages import ErrCode, InfoKind, MalformedMessage
from tests.conftest import FIXTURE_PLUGINS, handle
from tests.refcodec import (
    StopAction,
    decode_error,
    decode_prepare_conf_reply,
    decode_req_call_reply,
    encode_prepare_conf,
    encode_req_call,
)


class FakeGateway:
    def __init__(self, **vars: bytes) -> None:
        self.vars = vars
        self.asked: list[tuple[InfoKind, str]] = []

    async def ask(self, kind: InfoKind, name: str = "") -> bytes | None:
        self.asked.append((kind, name))
        return self.vars.get(name)


def make_dispatcher() -> Dispatcher:
    config = Config(plugin_dirs=(FIXTURE_PLUGINS,), examples=True)
    cache: ConfCache[Chain] = ConfCache(ttl=60, maxsize=100)
    return Dispatcher(load_registry(config), cache)


def split(frame: bytes) -> tuple[int, bytes]:
    decoder = FrameDecoder()
    decoder.feed(frame)
    got = decoder.next_frame()
    assert got is not None
    return got


def prepare(d: Dispatcher, conf: list[tuple[str, str]]) -> int:
    reply = handle(d, RPC.PREPARE_CONF, encode_prepare_conf(conf), FakeGateway())
    assert isinstance(reply, bytes)
    rpc_type, payload = split(reply)
    assert rpc_type == RPC.PREPARE_CONF
    return decode_prepare_conf_reply(payload)


def test_plain_plugins_are_answered_without_a_task() -> None:
    d = make_dispatcher()
    token = prepare(d, [("say", '{"body": "x"}')])
    reply = handle(d, RPC.HTTP_REQ_CALL, encode_req_call(conf_token=token, id=3), FakeGateway())
    assert isinstance(reply, bytes)
    rpc_type, payload = split(reply)
    assert rpc_type == RPC.HTTP_REQ_CALL
    assert decode_req_call_reply(payload).action == StopAction(200, [], b"x")


@pytest.mark.parametrize("limit", [100, 160])
def test_a_stop_over_the_frame_limit_is_an_error_every_time(limit: int) -> None:
    # A Stop's frame is made once and reused: the limit holds for it all the same.
    config = Config(plugin_dirs=(FIXTURE_PLUGINS,), examples=True)
    cache: ConfCache[Chain] = ConfCache(ttl=60, maxsize=100)
    d = Dispatcher(load_registry(config), cache, max_frame_size=limit)
    small = prepare(d, [("say", '{"body": "x"}')])
    big = prepare(d, [("say", '{"body": "%s"}' % ("x" * 80))])
    for _ in range(2):
        for token, fits in ((small, True), (big, limit >= 160)):
            reply = handle(d, RPC.HTTP_REQ_CALL, encode_req_call(conf_token=token), FakeGateway())
            assert isinstance(reply, bytes)
            rpc_type, payload = split(reply)
            if fits:
                assert rpc_type == RPC.HTTP_REQ_CALL
                assert decode_req_call_reply(payload).action is not None
            else:
                assert (rpc_type, decode_error(payload)) == (RPC.ERROR, ErrCode.SERVICE_UNAVAILABLE)


def test_async_plugins_get_a_coroutine_that_asks_the_gateway() -> None:
    d = make_dispatcher()
    token = prepare(d, [("test-echo-vars", '{"names": ["remote_addr"]}')])
    gateway = FakeGateway(remote_addr=b"1.2.3.4")
    reply = handle(d, RPC.HTTP_REQ_CALL, encode_req_call(conf_token=token), gateway)
    assert inspect.iscoroutine(reply)
    frame: Any = asyncio.run(reply)
    _, payload = split(frame)
    assert decode_req_call_reply(payload).action == StopAction(200, [], b"remote_addr='1.2.3.4'\n")
    assert gateway.asked == [(InfoKind.VAR, "remote_addr")]


def test_unknown_rpc_type_is_bad_request() -> None:
    reply = handle(make_dispatcher(), 42, b"", FakeGateway())
    assert isinstance(reply, bytes)
    rpc_type, payload = split(reply)
    assert (rpc_type, decode_error(payload)) == (RPC.ERROR, ErrCode.BAD_REQUEST)


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (ConfTokenNotFound(5), ErrCode.CONF_TOKEN_NOT_FOUND),
        (BadRequest("x"), ErrCode.BAD_REQUEST),
        (UnknownPlugin("x", []), ErrCode.BAD_REQUEST),
        (ProtocolViolation("x"), ErrCode.BAD_REQUEST),
        (MalformedMessage("x"), ErrCode.BAD_REQUEST),
        (PluginFailed("p", "on_request"), ErrCode.SERVICE_UNAVAILABLE),
        (CallTimeout("x"), ErrCode.SERVICE_UNAVAILABLE),
        (FrameTooLarge(1 << 24, (1 << 24) - 1), ErrCode.SERVICE_UNAVAILABLE),
        (RuntimeError("x"), ErrCode.SERVICE_UNAVAILABLE),
    ],
)
def test_one_place_maps_exceptions_to_wire_codes(exc: Exception, code: ErrCode) -> None:
    assert error_code_for(exc) is code

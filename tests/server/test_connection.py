"""The asyncio Connection over a fake transport: does it do what the exchange says?"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from runner.core.config import Config
from runner.core.registry import load_registry
from runner.protocol.frame import RPC, FrameDecoder, encode_frame
from runner.protocol.messages import (
    decode_prepare_conf_reply,
    decode_req_call_reply,
    encode_prepare_conf,
    encode_req_call,
)
from runner.server.connection import Connection
from runner.server.lifecycle import build_dispatcher
from runner.server.listener import RunnerServer
from tests.conftest import FIXTURE_PLUGINS


class FakeTransport(asyncio.Transport):
    """Keeps what the connection writes and whether it wants to read."""

    def __init__(self) -> None:
        super().__init__()
        self.decoder = FrameDecoder()
        self.reading = True
        self.pauses = 0
        self.closed = False

    def write(self, data: Any) -> None:
        self.decoder.feed(bytes(data))

    def frames(self) -> list[tuple[int, bytes]]:
        out = []
        while (frame := self.decoder.next_frame()) is not None:
            out.append(frame)
        return out

    def pause_reading(self) -> None:
        assert self.reading
        self.reading = False
        self.pauses += 1

    def resume_reading(self) -> None:
        assert not self.reading
        self.reading = True

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


async def test_reading_pauses_while_pipelined_frames_pile_up_and_resumes_after() -> None:
    config = Config(listen="unix:/nonexistent/a6.sock", plugin_dirs=(FIXTURE_PLUGINS,))
    loop = asyncio.get_running_loop()
    server = RunnerServer(config, build_dispatcher(config, load_registry(config)), max_backlog=4)
    conn = Connection(server, loop)
    transport = FakeTransport()
    conn.connection_made(transport)
    conn.data_received(
        encode_frame(
            RPC.PREPARE_CONF, encode_prepare_conf([("test-sleep", json.dumps({"seconds": 0}))])
        )
    )
    [(rpc_type, payload)] = transport.frames()
    assert rpc_type == RPC.PREPARE_CONF
    token = decode_prepare_conf_reply(payload)
    # A client that does not wait for replies: ten calls of an async plugin at once.
    burst = b"".join(
        encode_frame(RPC.HTTP_REQ_CALL, encode_req_call(conf_token=token, id=i)) for i in range(10)
    )
    conn.data_received(burst)
    assert not transport.reading  # nine wait behind the first: over the bound of 4
    ids: list[int] = []
    async with asyncio.timeout(5):
        while len(ids) < 10:
            await asyncio.sleep(0.001)
            ids += [decode_req_call_reply(p).id for _, p in transport.frames()]
    assert ids == list(range(10))
    assert transport.reading
    assert transport.pauses == 1
    assert not conn.busy
    assert not transport.closed
    if server.deadline_check is not None:
        server.deadline_check.cancel()
    conn.connection_lost(None)

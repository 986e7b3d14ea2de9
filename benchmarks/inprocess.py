"""The runner's own work per call, without the socket: a Connection fed by a fake transport.

Each call goes through the real ``Connection``, dispatcher, plugins and codecs on uvloop;
the transport answers ExtraInfo queries and sends the next request from the event loop,
as the gateway's replies would arrive. Prints CPU time per call, which is noisy on a
shared machine; run it under callgrind for counts that are not (the instructions of
``--calls 2500`` minus those of ``--calls 500``, divided by 2000):

    PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        .venv/bin/python benchmarks/inprocess.py var --calls 2500

With another version of the runner on PYTHONPATH instead, it measures that version (one
recent enough to have the gateway's side in ``runner.protocol.messages``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import uvloop

from runner.core.config import Config
from runner.protocol import messages
from runner.protocol.frame import RPC, encode_frame
from runner.server.connection import Connection
from runner.server.lifecycle import build_dispatcher, load_registry
from runner.server.listener import RunnerServer
from runner.tools.bench import FILLER_HEADERS

HEADERS = list(FILLER_HEADERS)  # the same request shape as `a6-runner bench`
REWRITE = {
    "path": "/v2/bench",
    "set_headers": {"x-gateway": "apisix"},
    "set_args": {"v": "2"},
    "response_headers": {"x-served-by": "a6-runner"},
}
# A Stop with a body and one header: what a typical "answer it here" plugin sends.
STOP_ONE_HEADER = json.dumps({"headers": {"content-type": "text/plain"}})
CASES: dict[str, tuple[list[tuple[str, str]], bytes]] = {
    "empty": ([], b""),
    "stop": ([("say", "{}")], b""),
    "stop1h": ([("say", STOP_ONE_HEADER)], b""),
    "rewrite": ([("rewrite", json.dumps(REWRITE))], b""),
    "var": ([("request-info", "{}")], b"127.0.0.1"),
    "body64k": (
        [("request-info", json.dumps({"vars": {}, "body_length_header": "x-body-length"}))],
        b"x" * 65536,
    ),
}


class _Gateway(asyncio.Transport):
    """Plays the gateway's side of one connection, from the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, answer: bytes) -> None:
        super().__init__()
        self.loop = loop
        self.answer = encode_frame(RPC.EXTRA_INFO, messages.encode_extra_info_reply(answer))
        self.conn: Connection | None = None
        self.request = b""
        self.left = 0
        self.token = 0
        self.done: asyncio.Future[None] | None = None

    def write(self, data: Any) -> None:
        assert self.conn is not None
        kind = data[0]
        if kind == RPC.PREPARE_CONF:
            self.token = messages.decode_prepare_conf_reply(bytes(data[4:]))
        elif kind == RPC.EXTRA_INFO:
            self.loop.call_soon(self.conn.data_received, self.answer)
        elif kind == RPC.HTTP_REQ_CALL:
            self.left -= 1
            if self.left > 0:
                self.loop.call_soon(self.conn.data_received, self.request)
            elif self.done is not None:
                self.done.set_result(None)
        else:
            raise RuntimeError(f"the runner answered with a frame of type {kind}")

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False


async def run(case: str, calls: int, warmup: int) -> float:
    conf, answer = CASES[case]
    loop = asyncio.get_running_loop()
    config = Config(listen="unix:/nonexistent/inprocess.sock")
    server = RunnerServer(config, build_dispatcher(config, load_registry(config)))
    conn = Connection(server)
    gateway = _Gateway(loop, answer)
    gateway.conn = conn
    conn.connection_made(gateway)
    conn.data_received(encode_frame(RPC.PREPARE_CONF, messages.encode_prepare_conf(conf, "k")))
    payload = messages.encode_req_call(conf_token=gateway.token, id=5, headers=HEADERS)
    gateway.request = encode_frame(RPC.HTTP_REQ_CALL, payload)

    async def cycle(n: int) -> None:
        gateway.done = loop.create_future()
        gateway.left = n
        conn.data_received(gateway.request)
        await gateway.done

    await cycle(warmup)
    started = time.process_time()
    await cycle(calls)
    return (time.process_time() - started) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("case", choices=sorted(CASES))
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--warmup", type=int, default=3_000)
    args = parser.parse_args()
    us = uvloop.run(run(args.case, args.calls, args.warmup))
    print(f"{args.case}: {us:.2f} us of CPU per call ({args.calls:,} calls)")


if __name__ == "__main__":
    main()

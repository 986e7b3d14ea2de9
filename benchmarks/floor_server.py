"""The transport floor: a uvloop Unix-socket server that answers every frame with a canned reply.

It does what no runner can avoid (accept, read, find frame boundaries, write a reply) and
nothing else, so its CPU time per call is the floor the runner's own cost is compared to.
It speaks just enough of the protocol for ``a6-runner bench`` to drive it: PrepareConf gets
token 1, HTTPReqCall a pass-through reply, HTTPRespCall an empty reply. The replies are
encoded once, at start, by the runner's codec.

    python benchmarks/floor_server.py /tmp/floor.sock
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import uvloop

from runner.protocol.frame import RPC, FrameDecoder, encode_frame
from runner.protocol.messages import (
    ErrCode,
    encode_error,
    encode_prepare_conf_reply,
    encode_req_call_reply,
    encode_resp_call_reply,
)

_CANNED: dict[int, bytes] = {
    RPC.PREPARE_CONF: encode_frame(RPC.PREPARE_CONF, encode_prepare_conf_reply(1)),
    RPC.HTTP_REQ_CALL: encode_frame(RPC.HTTP_REQ_CALL, encode_req_call_reply(0, None)),
    RPC.HTTP_RESP_CALL: encode_frame(RPC.HTTP_RESP_CALL, encode_resp_call_reply(0)),
}
_BAD_REQUEST = encode_frame(RPC.ERROR, encode_error(ErrCode.BAD_REQUEST))


class _Canned(asyncio.Protocol):
    __slots__ = ("_frames", "_transport")

    def __init__(self) -> None:
        self._frames = FrameDecoder()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        # The runner's own frame codec, used the way the runner uses it: the common case,
        # one whole frame per read, is one header check; split or coalesced frames go
        # through the buffer. The floor pays for framing exactly what the runner pays.
        write = self._transport.write  # type: ignore[union-attr]
        frames = self._frames
        whole = frames.whole_frame(data)
        if whole is not None:
            write(_CANNED.get(whole[0], _BAD_REQUEST))
            return
        frames.feed(data)
        while (frame := frames.next_frame()) is not None:
            write(_CANNED.get(frame[0], _BAD_REQUEST))


async def serve(path: str) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_unix_server(_Canned, path, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"floor server listening on {path} (pid {os.getpid()})", file=sys.stderr, flush=True)
    try:
        await stop.wait()
    finally:
        server.close()


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit("usage: floor_server.py SOCKET_PATH")
    path = sys.argv[1].removeprefix("unix:")
    Path(path).unlink(missing_ok=True)
    try:
        uvloop.run(serve(path))
    finally:
        Path(path).unlink(missing_ok=True)


if __name__ == "__main__":
    main()

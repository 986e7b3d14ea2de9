"""A client that talks to a runner the way the APISIX gateway does: for tests and load.

The gateway's conversation, which this module reproduces (``apisix/plugins/ext-plugin``):

* one exchange at a time per connection: a request frame, then any number of ExtraInfo
  queries from the runner, each answered at once, then the final reply frame;
* connections are kept open and reused for the next exchange (keep-alive);
* a type-0 frame is an error whatever exchange it ends; any other frame type than the
  request's (or ExtraInfo inside a call) is a protocol violation;
* PrepareConf is a single round trip: the gateway does not answer ExtraInfo there.

Messages are built and read with the gateway's side of ``runner.protocol.messages`` and
frames split by ``FrameDecoder``: the one codec of the tree. The tests hold that codec to
the generated code (``tests/refcodec.py``), so neither the client nor a runner it drives
needs ``flatbuffers``.

Unlike the gateway, a RunnerError does not close the connection: the stream is still in
step, and tests may want to go on using it. Close it yourself to imitate the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from types import MappingProxyType, TracebackType
from typing import Final, Self, TypeVar

from runner.protocol import messages
from runner.protocol.frame import MAX_PAYLOAD, RPC, FrameDecoder, encode_header
from runner.protocol.messages import (
    ExtraInfoQuery,
    InfoKind,
    MalformedMessage,
    ReqCallReply,
    RespCallReply,
)

__all__ = [
    "Answer",
    "Connection",
    "ExtraInfoQuery",
    "ProtocolViolation",
    "ReqCallReply",
    "RespCallReply",
    "RunnerError",
    "strip_unix_prefix",
    "wait_for_socket",
]

Answer = Callable[[ExtraInfoQuery], bytes | None]
"""Answers one ExtraInfo query: the result bytes, or None for "no such value"."""

# The gateway's socket timeouts (sock:settimeouts(1000, 60000, 60000)).
GATEWAY_CONNECT_TIMEOUT: Final = 1.0
GATEWAY_IO_TIMEOUT: Final = 60.0

_ERROR_NAMES: Final = {
    0: "bad request",
    1: "service unavailable",
    2: "conf token not found",
}
_NO_VARS: Final[Mapping[str, bytes | str]] = MappingProxyType({})
_LOCALHOST: Final = b"\x7f\x00\x00\x01"
_READ_SIZE: Final = 1 << 18  # about what the kernel hands over at once for a large frame
_T = TypeVar("_T")


class RunnerError(Exception):
    """The runner answered with an error frame (RPC type 0); ``code`` is its ``A6.Err.Code``."""

    def __init__(self, code: int) -> None:
        name = _ERROR_NAMES.get(code, "unknown error")
        super().__init__(f"runner error {code} ({name})")
        self.code = code


class ProtocolViolation(Exception):
    """The runner broke the protocol: an unexpected frame type, an undecodable reply, or
    a connection closed in the middle of an exchange. The connection is closed."""


def strip_unix_prefix(path: str) -> str:
    """``unix:/x.sock`` (the form of ``APISIX_LISTEN_ADDRESS``) -> ``/x.sock``."""
    return path.removeprefix("unix:")


def _frame_name(rpc_type: int) -> str:
    try:
        return f"{RPC(rpc_type).name} ({rpc_type})"
    except ValueError:
        return f"unknown type {rpc_type}"


class Connection:
    """One connection to a runner, used like the gateway uses a pooled socket.

    Open with ``await Connection.open(path)``; use as ``async with`` to close it on exit.
    Calls on one connection are serialized: a second call waits for the first to end,
    because the protocol has no way to tell two exchanges' frames apart.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        io_timeout: float | None = GATEWAY_IO_TIMEOUT,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._frames = FrameDecoder()
        self._lock = asyncio.Lock()
        self.io_timeout = io_timeout
        """Seconds any single read or write may take; None waits forever."""
        self.last_queries: list[ExtraInfoQuery] = []
        """The ExtraInfo queries the runner sent during the last call, in order."""
        self.calls = 0
        """Exchanges completed on this connection (keep-alive reuse count)."""

    @classmethod
    async def open(
        cls,
        path: str,
        *,
        connect_timeout: float | None = GATEWAY_CONNECT_TIMEOUT,
        io_timeout: float | None = GATEWAY_IO_TIMEOUT,
    ) -> Self:
        """Connect to the runner's unix socket; ``path`` may carry a ``unix:`` prefix."""
        async with asyncio.timeout(connect_timeout):
            reader, writer = await asyncio.open_unix_connection(strip_unix_prefix(path))
        return cls(reader, writer, io_timeout=io_timeout)

    # ------------------------------------------------------------------- lifetime

    @property
    def closed(self) -> bool:
        return self._writer.is_closing()

    def close(self) -> None:
        """Start closing the connection (like ``StreamWriter.close``); idempotent."""
        self._writer.close()

    async def wait_closed(self) -> None:
        """Wait until the connection is closed; errors while closing are ignored."""
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()

    async def aclose(self) -> None:
        """Close the connection and wait for it."""
        self.close()
        await self.wait_closed()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # ------------------------------------------------------------------- frames

    async def send_frame(self, rpc_type: int, payload: bytes) -> None:
        """Send one frame. Raises FrameTooLarge above the 24-bit length limit."""
        if self.closed:
            raise ProtocolViolation(
                f"cannot send {_frame_name(rpc_type)}: the connection is closed"
            )
        header = encode_header(rpc_type, len(payload), MAX_PAYLOAD)
        # writelines spares a copy of large payloads.
        self._writer.writelines((header, payload))
        try:
            async with asyncio.timeout(self.io_timeout):
                await self._writer.drain()
        except ConnectionError as exc:
            self.close()
            raise ProtocolViolation(
                f"connection lost while sending {_frame_name(rpc_type)}: {exc}"
            ) from exc

    async def read_frame(self) -> tuple[int, bytes]:
        """Read one whole frame as ``(rpc_type, payload)``, however the kernel splits it.

        Raises ProtocolViolation (and closes the connection) if the runner closes the
        connection before a whole frame arrived, and TimeoutError after ``io_timeout``.
        """
        while True:
            frame = self._frames.next_frame()
            if frame is not None:
                return frame
            data = await self._read_some()
            if not data:
                self.close()
                if self._frames.in_frame:
                    msg = (
                        "the runner closed the connection in the middle of a frame,"
                        f" after {self._frames.buffered} bytes of it"
                    )
                else:
                    msg = "the runner closed the connection instead of replying"
                raise ProtocolViolation(msg)
            self._frames.feed(data)

    async def _read_some(self) -> bytes:
        try:
            async with asyncio.timeout(self.io_timeout):
                return await self._reader.read(_READ_SIZE)
        except ConnectionError as exc:
            self.close()
            raise ProtocolViolation(f"connection lost while reading a reply: {exc}") from exc
        except TimeoutError:
            # The gateway gives up on the socket too: a late reply would desynchronize it.
            self.close()
            raise

    async def call_raw(
        self, rpc_type: int, payload: bytes, answer: Answer | None = None
    ) -> tuple[int, bytes]:
        """Send a pre-encoded request and return the runner's final frame, undecoded.

        Every ExtraInfo query in between is recorded in ``last_queries`` and answered with
        ``answer(query)`` (no answer function: "no such value"). The final frame is
        returned whatever its type, type 0 included: judging it is the caller's business.
        """
        async with self._lock, self._abandon_on_failure():
            self.last_queries = []
            await self.send_frame(rpc_type, payload)
            while True:
                got_type, got = await self.read_frame()
                if got_type != RPC.EXTRA_INFO:
                    self.calls += 1
                    return got_type, got
                try:
                    query = messages.decode_extra_info_query(got)
                except MalformedMessage as exc:
                    # The gateway aborts the call and drops the socket on a query it cannot read.
                    raise ProtocolViolation(f"undecodable ExtraInfo query: {exc!r}") from exc
                self.last_queries.append(query)
                result = answer(query) if answer is not None else None
                await self.send_frame(RPC.EXTRA_INFO, messages.encode_extra_info_reply(result))

    # -------------------------------------------------------------- the exchanges

    async def prepare_conf(self, conf: Sequence[tuple[str, str]], key: str = "") -> int:
        """PrepareConf: register a plugin chain ``[(name, json_config)]``; returns the token.

        Like the gateway, ExtraInfo is not answered here: it ends the exchange as a
        protocol violation.
        """
        async with self._lock, self._abandon_on_failure():
            self.last_queries = []
            await self.send_frame(RPC.PREPARE_CONF, messages.encode_prepare_conf(conf, key))
            rpc_type, payload = await self.read_frame()
            self.calls += 1
        self._check_reply(rpc_type, payload, RPC.PREPARE_CONF)
        return self._decode(messages.decode_prepare_conf_reply, payload, "PrepareConf reply")

    async def req_call(
        self,
        conf_token: int,
        *,
        id: int = 0,
        method: str = "GET",
        path: str = "/",
        args: Sequence[tuple[str, str | None]] = (),
        headers: Sequence[tuple[str, str]] = (),
        src_ip: bytes = _LOCALHOST,
        vars: Mapping[str, bytes | str] = _NO_VARS,
        body: bytes | None = None,
    ) -> ReqCallReply:
        """HTTPReqCall: the request phase.

        ExtraInfo queries are answered from ``vars`` (a missing name: no result) and
        ``body`` for ReqBody; RespBody gets no result, as in the gateway's request phase.
        """
        payload = messages.encode_req_call(
            conf_token=conf_token,
            id=id,
            method=method,
            path=path,
            args=args,
            headers=headers,
            src_ip=src_ip,
        )
        rpc_type, reply = await self.call_raw(
            RPC.HTTP_REQ_CALL, payload, _answerer(vars, body, None)
        )
        self._check_reply(rpc_type, reply, RPC.HTTP_REQ_CALL)
        return self._decode(messages.decode_req_call_reply, reply, "HTTPReqCall reply")

    async def resp_call(
        self,
        conf_token: int,
        *,
        id: int = 0,
        status: int = 200,
        headers: Sequence[tuple[str, str]] = (),
        vars: Mapping[str, bytes | str] = _NO_VARS,
        body: bytes | None = None,
        resp_body: bytes | None = None,
    ) -> RespCallReply:
        """HTTPRespCall: the response phase; ``resp_body`` answers RespBody queries."""
        payload = messages.encode_resp_call(
            conf_token=conf_token, id=id, status=status, headers=headers
        )
        rpc_type, reply = await self.call_raw(
            RPC.HTTP_RESP_CALL, payload, _answerer(vars, body, resp_body)
        )
        self._check_reply(rpc_type, reply, RPC.HTTP_RESP_CALL)
        return self._decode(messages.decode_resp_call_reply, reply, "HTTPRespCall reply")

    # -------------------------------------------------------------------- helpers

    @contextlib.asynccontextmanager
    async def _abandon_on_failure(self) -> AsyncIterator[None]:
        """Close the connection if an exchange ends half-way, for whatever reason.

        After a timeout, a cancellation or a failing answer function, frames of the
        broken exchange may still be in flight: reusing the connection would read them as
        the reply to the next request. The gateway drops such sockets too.
        """
        try:
            yield
        except BaseException:
            self.close()
            raise

    def _check_reply(self, rpc_type: int, payload: bytes, expected: RPC) -> None:
        if rpc_type == RPC.ERROR:
            code = self._decode(messages.decode_error, payload, "error frame")
            raise RunnerError(code)
        if rpc_type != expected:
            self.close()
            raise ProtocolViolation(
                f"expected a reply of type {_frame_name(expected)}, got a frame of type"
                f" {_frame_name(rpc_type)} ({len(payload)} bytes)"
            )

    def _decode(self, decode: Callable[[bytes], _T], payload: bytes, what: str) -> _T:
        try:
            return decode(payload)
        except MalformedMessage as exc:
            self.close()
            raise ProtocolViolation(f"undecodable {what} ({len(payload)} bytes): {exc}") from exc


def _answerer(
    vars: Mapping[str, bytes | str], body: bytes | None, resp_body: bytes | None
) -> Answer:
    def answer(query: ExtraInfoQuery) -> bytes | None:
        if query.kind is InfoKind.VAR:
            value = vars.get(query.name) if query.name is not None else None
            # The gateway sends tostring() of the variable: accept str for convenience.
            return value.encode() if isinstance(value, str) else value
        if query.kind is InfoKind.REQ_BODY:
            return body
        return resp_body

    return answer


# A timeout argument rather than asyncio.timeout(): callers poll a budget, not a deadline.
async def wait_for_socket(path: str, timeout: float = 10.0) -> None:  # noqa: ASYNC109
    """Poll until something accepts connections on the unix socket ``path``.

    Raises TimeoutError if nothing does within ``timeout`` seconds. The probe connection
    is closed at once without sending anything, which a runner must tolerate anyway.
    """
    sock_path = strip_unix_prefix(path)
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        try:
            _, writer = await asyncio.open_unix_connection(sock_path)
        except OSError as exc:
            if time.monotonic() + delay > deadline:
                raise TimeoutError(
                    f"nothing accepted on {sock_path} within {timeout} s: {exc}"
                ) from exc
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)
            continue
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
        return

"""The frame codec: bytes in, ``(rpc_type, payload)`` out, and back. No I/O.

Every message on the runner's socket, in both directions, is one frame: a 1-byte RPC
type, a 3-byte big-endian payload length, then the payload (a FlatBuffers message).
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import Final

HEADER_SIZE: Final = 4
# The length field has 24 bits: 2**24 - 1 is the protocol's hard ceiling. (One peer used
# 2 << 24 - 1, twice this, and wrapped the header of every frame above 16 MiB.)
MAX_PAYLOAD: Final = (1 << 24) - 1
_HEADER: Final = struct.Struct(">I").unpack_from


class RPC(IntEnum):
    """The RPC types of the protocol: the first byte of every frame."""

    ERROR = 0
    PREPARE_CONF = 1
    HTTP_REQ_CALL = 2
    EXTRA_INFO = 3
    HTTP_RESP_CALL = 4


class FrameTooLarge(ValueError):
    """A payload does not fit the frame's length field (or a configured, lower limit)."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"frame payload of {size} bytes exceeds the limit of {limit} bytes")
        self.size = size
        self.limit = limit


def encode_header(rpc_type: int, size: int, limit: int = MAX_PAYLOAD) -> bytes:
    """The 4-byte header of a frame whose payload has ``size`` bytes.

    Raises FrameTooLarge rather than wrapping the length: a wrapped length would make
    the peer read the rest of the payload as the next frame.
    """
    if size > limit:
        raise FrameTooLarge(size, limit)
    return (rpc_type << 24 | size).to_bytes(4, "big")


def encode_frame(rpc_type: int, payload: bytes, limit: int = MAX_PAYLOAD) -> bytes:
    """One whole frame: header and payload."""
    return encode_header(rpc_type, len(payload), limit) + payload


class FrameDecoder:
    """Splits a byte stream into frames, whatever pieces the stream arrives in.

    Feed it bytes with ``feed``; take complete frames with ``next_frame``, which returns
    None when it needs more data. A header announcing more than ``max_payload`` bytes
    raises FrameTooLarge from ``next_frame``: the stream cannot be trusted after that.
    """

    __slots__ = ("_buf", "_max_payload", "_pos")

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        # bytes while it holds one piece as received (usually one whole frame: no copy),
        # a bytearray once pieces must be joined.
        self._buf: bytes | bytearray = b""
        self._pos = 0
        self._max_payload = max_payload

    def feed(self, data: bytes) -> None:
        buf = self._buf
        if not buf:
            self._buf = data if type(data) is bytes else bytes(data)
            self._pos = 0
            return
        if isinstance(buf, bytes):
            buf = self._buf = bytearray(memoryview(buf)[self._pos :])
        elif self._pos:
            # Drop consumed bytes only when new data comes, so that a burst of small
            # frames costs one compaction instead of one per frame.
            del buf[: self._pos]
        self._pos = 0
        buf += data

    def whole_frame(self, data: bytes) -> tuple[int, bytes] | None:
        """``data`` as a frame, if nothing is buffered and it is exactly one whole frame
        within the limit (the usual read on a gateway connection); else None, and
        nothing is consumed: ``feed`` it instead."""
        if self._buf or len(data) < HEADER_SIZE:
            return None
        header = _HEADER(data, 0)[0]
        size = header & 0xFFFFFF
        if len(data) != HEADER_SIZE + size or size > self._max_payload:
            return None
        return header >> 24, data[HEADER_SIZE:]

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a frame."""
        return len(self._buf) - self._pos

    @property
    def in_frame(self) -> bool:
        """True if part of a frame has been received: the stream ended mid-frame."""
        return self.buffered > 0

    def next_frame(self) -> tuple[int, bytes] | None:
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        if avail < HEADER_SIZE:
            return None
        header = _HEADER(buf, pos)[0]
        size = header & 0xFFFFFF
        if size > self._max_payload:
            raise FrameTooLarge(size, self._max_payload)
        end = pos + HEADER_SIZE + size
        if end > len(buf):
            return None
        # One copy of the payload, however the stream arrived.
        payload = bytes(memoryview(buf)[pos + HEADER_SIZE : end])
        if end == len(buf):
            self._buf = b""
            self._pos = 0
        else:
            self._pos = end
        return header >> 24, payload

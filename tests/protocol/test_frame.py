"""The frame codec, at the level of bytes."""

from __future__ import annotations

import pytest

from runner.protocol.frame import (
    MAX_PAYLOAD,
    RPC,
    FrameDecoder,
    FrameTooLarge,
    encode_frame,
    encode_header,
)


def test_header_is_type_then_24_bit_big_endian_length() -> None:
    assert encode_frame(RPC.HTTP_REQ_CALL, b"abc") == b"\x02\x00\x00\x03abc"
    assert encode_header(RPC.ERROR, 0x010203) == b"\x00\x01\x02\x03"


def test_largest_payload_fits_and_one_more_byte_is_refused_not_wrapped() -> None:
    assert MAX_PAYLOAD == 16_777_215
    assert encode_header(RPC.PREPARE_CONF, MAX_PAYLOAD) == b"\x01\xff\xff\xff"
    with pytest.raises(FrameTooLarge) as info:
        encode_header(RPC.PREPARE_CONF, MAX_PAYLOAD + 1)
    assert info.value.size == MAX_PAYLOAD + 1


def test_a_configured_lower_limit_applies_to_encoding() -> None:
    with pytest.raises(FrameTooLarge):
        encode_frame(RPC.HTTP_REQ_CALL, b"x" * 11, limit=10)


def test_decoder_reassembles_frames_fed_one_byte_at_a_time() -> None:
    stream = encode_frame(1, b"first") + encode_frame(2, b"") + encode_frame(3, b"x" * 300)
    decoder = FrameDecoder()
    frames = []
    for byte in stream:
        decoder.feed(bytes([byte]))
        while (frame := decoder.next_frame()) is not None:
            frames.append(frame)
    assert frames == [(1, b"first"), (2, b""), (3, b"x" * 300)]
    assert not decoder.in_frame


def test_decoder_returns_every_frame_of_one_chunk_in_order() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"".join(encode_frame(2, bytes([i]) * i) for i in range(50)))
    got = []
    while (frame := decoder.next_frame()) is not None:
        got.append(frame)
    assert got == [(2, bytes([i]) * i) for i in range(50)]


def test_decoder_waits_for_the_rest_of_a_large_frame() -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB, delivered like the kernel does: in pieces
    stream = encode_frame(2, payload)
    decoder = FrameDecoder()
    for start in range(0, len(stream), 219_000):
        assert decoder.next_frame() is None
        decoder.feed(stream[start : start + 219_000])
    assert decoder.next_frame() == (2, payload)


def test_decoder_says_when_the_stream_stopped_mid_frame() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"\x02\x00")
    assert decoder.next_frame() is None
    assert decoder.in_frame
    decoder.feed(b"\x00\x02a")
    assert decoder.next_frame() is None
    assert decoder.in_frame


def test_decoder_refuses_a_header_over_its_limit() -> None:
    decoder = FrameDecoder(max_payload=1024)
    decoder.feed(encode_header(2, 1025))
    with pytest.raises(FrameTooLarge):
        decoder.next_frame()

"""The hot path's direct encoders and decoders against the two references.

Replies are written straight into their final layout (``runner.protocol.messages``,
``flatbuf.table_blob`` and friends). They must equal, byte for byte, what the generic
builder ``flatbuf.build`` makes from the schema-shaped spec below, and read back field
for field through the generated code (``tests/refcodec.py``). Requests are read by a
hand-unrolled decoder: it must see what the generated code sees, or raise
MalformedMessage, for well-formed and damaged messages alike.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner.protocol import flatbuf as fb
from runner.protocol import messages as m
from runner.protocol.flatbuf import MalformedMessage
from runner.protocol.frame import RPC, FrameDecoder, encode_frame
from tests import refcodec as ref

SETTINGS = settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)

U32 = st.integers(0, 2**32 - 1)
U16 = st.integers(0, 2**16 - 1)
# Header bytes that are not UTF-8 reach plugins as lone surrogates and must go back as
# the same bytes.
RAW_TEXT = st.binary(max_size=40).map(lambda b: b.decode("utf-8", "surrogateescape"))
TEXT = st.one_of(st.text(max_size=40), RAW_TEXT)
PAIRS = st.lists(st.tuples(TEXT, TEXT), max_size=8)
ENTRIES = st.lists(st.tuples(TEXT, st.none() | TEXT), max_size=8)
BODY = st.binary(max_size=300)


# ------------------------------------------------------- the generic-builder reference


def _entries(entries: Sequence[fb.Entry]) -> list[fb.TableSpec]:
    return fb.text_entries(entries)


def generic_req_call_reply(call_id: int, action: m.Stop | m.Rewrite | None) -> bytes:
    """``A6.HTTPReqCall.Resp`` through ``fb.build``, field by field as the schema says."""
    if action is None:
        return fb.build(((0, fb.U32, call_id),))
    spec: list[fb.Field] = []
    if isinstance(action, m.Stop):
        spec.append((0, fb.U16, action.status))
        if action.headers:
            spec.append((1, fb.TABLES, _entries(action.headers)))
        if action.body:
            spec.append((2, fb.BYTES, action.body))
        kind = 1
    else:
        if action.path is not None:
            spec.append((0, fb.BYTES, action.path))
        if action.headers:
            spec.append((1, fb.TABLES, _entries(action.headers)))
        if action.args:
            spec.append((2, fb.TABLES, _entries(action.args)))
        if action.resp_headers:
            spec.append((3, fb.TABLES, _entries(action.resp_headers)))
        if action.body is not None:
            spec.append((4, fb.BYTES, action.body))
        kind = 2
    return fb.build(((0, fb.U32, call_id), (1, fb.U8, kind), (2, fb.TABLE, spec)))


def generic_resp_call_reply(
    call_id: int, status: int, headers: Sequence[tuple[str, str]], body: bytes | None
) -> bytes:
    spec: list[fb.Field] = [(0, fb.U32, call_id)]
    if status:
        spec.append((1, fb.U16, status))
    if headers:
        spec.append((2, fb.TABLES, _entries(headers)))
    if body:
        spec.append((3, fb.BYTES, body))
    return fb.build(spec)


def generic_extra_info_query(kind: m.InfoKind, name: str) -> bytes:
    info: list[fb.Field] = [(0, fb.BYTES, name)] if kind is m.InfoKind.VAR else []
    return fb.build(((0, fb.U8, int(kind)), (1, fb.TABLE, info)))


# ----------------------------------------------------------------- reply encoders


@SETTINGS
@given(call_id=U32)
def test_pass_through_reply(call_id: int) -> None:
    fast = m.encode_req_call_reply(call_id, None)
    assert fast == generic_req_call_reply(call_id, None)
    assert ref.decode_req_call_reply(fast) == ref.ReqCallReply(call_id, None)


@SETTINGS
@given(call_id=U32, status=U16, headers=PAIRS, body=BODY)
def test_stop_reply(call_id: int, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
    stop = m.Stop(status, headers, body)
    fast = m.encode_req_call_reply(call_id, stop)
    assert fast == generic_req_call_reply(call_id, stop)
    assert ref.decode_req_call_reply(fast) == ref.ReqCallReply(
        call_id, ref.StopAction(status, list(headers), body)
    )
    # A Stop with its headers in a tuple keeps its encoding: sent again, under another
    # call id, it is the same reply but for the id.
    kept = m.Stop(status, tuple(headers), body)
    assert m.encode_req_call_reply(call_id, kept) == fast
    other_id = call_id ^ 0xFFFF
    assert m.encode_stop_reply(other_id, kept) == generic_req_call_reply(other_id, kept)
    # What it keeps is not part of its value.
    assert kept == m.Stop(status, tuple(headers), body)
    assert dataclasses.asdict(kept) == {"status": status, "headers": tuple(headers), "body": body}
    assert repr(kept) == repr(m.Stop(status, tuple(headers), body))


def test_a_stop_whose_header_list_changes_is_encoded_as_it_is_now() -> None:
    headers = [("x-a", "1")]
    stop = m.Stop(200, headers, b"body")
    assert m.decode_req_call_reply(m.encode_stop_reply(1, stop)).action == m.Stop(
        200, (("x-a", "1"),), b"body"
    )
    headers.append(("x-b", "2"))
    assert m.decode_req_call_reply(m.encode_stop_reply(2, stop)).action == m.Stop(
        200, (("x-a", "1"), ("x-b", "2")), b"body"
    )


@pytest.mark.parametrize("headers", [(), (("x", "1"),), (("a", ""), ("a", "é"))])
@pytest.mark.parametrize("body", [b"", b"x", b"ab", b"abc", b"abcd", b"\0" * 1025])
def test_stop_reply_every_padding(headers: tuple[tuple[str, str], ...], body: bytes) -> None:
    # The two template shapes (no headers; body or not) and the general one, with
    # bodies of every length modulo 4.
    stop = m.Stop(403, headers, body)
    assert m.encode_req_call_reply(7, stop) == generic_req_call_reply(7, stop)


@SETTINGS
@given(
    call_id=U32,
    path=st.none() | TEXT,
    headers=ENTRIES,
    args=ENTRIES,
    resp_headers=PAIRS,
    body=st.none() | BODY,
)
def test_rewrite_reply(
    call_id: int,
    path: str | None,
    headers: list[fb.Entry],
    args: list[fb.Entry],
    resp_headers: list[tuple[str, str]],
    body: bytes | None,
) -> None:
    rw = m.Rewrite(path, headers, args, resp_headers, body)
    fast = m.encode_req_call_reply(call_id, rw)
    assert fast == generic_req_call_reply(call_id, rw)
    assert ref.decode_req_call_reply(fast) == ref.ReqCallReply(
        call_id, ref.RewriteAction(path, headers, args, list(resp_headers), body)
    )


@SETTINGS
@given(call_id=U32, status=U16, headers=PAIRS, body=st.none() | BODY)
def test_resp_call_reply(
    call_id: int, status: int, headers: list[tuple[str, str]], body: bytes | None
) -> None:
    fast = m.encode_resp_call_reply(call_id, status, headers, body)
    assert fast == generic_resp_call_reply(call_id, status, headers, body)
    assert ref.decode_resp_call_reply(fast) == ref.RespCallReply(
        call_id, status, list(headers), body or None
    )


@SETTINGS
@given(kind=st.sampled_from(list(m.InfoKind)), name=TEXT)
def test_extra_info_query(kind: m.InfoKind, name: str) -> None:
    fast = m.encode_extra_info_query(kind, name)
    assert fast == generic_extra_info_query(kind, name)
    query = ref.decode_extra_info_query(fast)
    if kind is m.InfoKind.VAR:
        assert query == ref.ExtraInfoQuery("var", name)
    else:
        assert (
            query.kind == {m.InfoKind.REQ_BODY: "req_body", m.InfoKind.RESP_BODY: "resp_body"}[kind]
        )


@pytest.mark.parametrize(
    ("call_id", "action"),
    [
        (-1, None),
        (2**32, None),
        (1, m.Stop(status=70000)),
        (1, m.Stop(status=-1, body=b"x")),
        (1, m.Stop(status=2**16, headers=(("a", "b"),))),
    ],
)
def test_out_of_range_scalars_are_refused(call_id: int, action: m.Stop | None) -> None:
    # Refused like the generic builder refuses them, rather than wrapped silently.
    with pytest.raises((ValueError, struct.error)):
        generic_req_call_reply(call_id, action)
    with pytest.raises(ValueError, match="does not fit"):
        m.encode_req_call_reply(call_id, action)


def test_resp_call_reply_refuses_a_wide_status() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        m.encode_resp_call_reply(1, 70000)


# ---------------------------------------------------------- blobs, one by one


@SETTINGS
@given(entries=ENTRIES)
def test_entries_blob_is_the_generic_vector(entries: list[fb.Entry]) -> None:
    fast = fb.finish(fb.table_blob([(0, (fb.entries_blob(entries), 0))]))
    assert fast == fb.build(((0, fb.TABLES, fb.text_entries(entries)),))


@SETTINGS
@given(
    fields=st.lists(
        st.tuples(
            st.integers(0, 9),
            st.one_of(U32, TEXT, st.binary(max_size=40)),
        ),
        max_size=6,
        unique_by=lambda f: f[0],
    ).map(sorted)
)
def test_table_blob_is_the_generic_table(fields: list[tuple[int, int | str | bytes]]) -> None:
    spec: list[fb.Field] = []
    fast: list[tuple[int, int | fb.Child]] = []
    for slot, value in fields:
        if isinstance(value, int):
            spec.append((slot, fb.U32, value))
            fast.append((slot, value))
        elif isinstance(value, str):
            spec.append((slot, fb.BYTES, value))
            fast.append((slot, (fb.str_blob(value), 0)))
        else:
            spec.append((slot, fb.BYTES, value))
            fast.append((slot, (fb.bytes_blob(value), 0)))
    assert fb.finish(fb.table_blob(fast)) == fb.build(spec)


# --------------------------------------------------------------- request decoding


# tests/test_messages.py::test_req_call holds the decoded fields to what was encoded;
# here, damaged entries must fail cleanly.


@SETTINGS
@given(data=st.data())
def test_damaged_text_entries_never_escape_as_other_errors(data: st.DataObject) -> None:
    headers = data.draw(ENTRIES)
    payload = bytearray(fb.build(((0, fb.TABLES, fb.text_entries(headers)),)))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(payload) - 1))
        payload[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(payload)))
    damaged = bytes(payload[:cut])
    try:
        (pos,) = fb.root_fields(damaged, 1)
        fb.read_text_entries(damaged, pos)
    except MalformedMessage:
        pass


# ---------------------------------------------------------------------- frames


@SETTINGS
@given(
    payloads=st.lists(st.binary(max_size=300), min_size=1, max_size=6),
    cuts=st.lists(st.integers(1, 64), max_size=20),
)
def test_frame_decoder_any_split(payloads: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(encode_frame(RPC.HTTP_REQ_CALL, p) for p in payloads)
    decoder = FrameDecoder()
    got: list[tuple[int, bytes]] = []
    pos = 0
    for cut in [*cuts, len(stream)]:
        decoder.feed(stream[pos : pos + cut])
        pos += cut
        while (frame := decoder.next_frame()) is not None:
            got.append((frame[0], bytes(frame[1])))
        if pos >= len(stream):
            break
    assert got == [(RPC.HTTP_REQ_CALL, p) for p in payloads]
    assert not decoder.in_frame


def test_an_odd_vtable_size_is_malformed() -> None:
    # vtable [size 5, table 8, field at 4]: the generated code reads the field whose
    # entry lies half outside the vtable; the runner must not read it as absent.
    payload = bytes.fromhex(
        "0c0000000000050008000400060000000400000013000000736f6d65207661726961626c652076616c756500"
    )
    with pytest.raises(MalformedMessage):
        m.decode_extra_info_reply(payload)


@pytest.mark.parametrize(
    "data",
    [
        encode_frame(RPC.HTTP_REQ_CALL, b"abc"),
        encode_frame(RPC.EXTRA_INFO, b""),
    ],
)
def test_whole_frame_takes_exactly_one_frame(data: bytes) -> None:
    decoder = FrameDecoder()
    assert decoder.whole_frame(data) == (data[0], data[4:])
    assert not decoder.in_frame


@pytest.mark.parametrize(
    "data",
    [
        b"\x02\x00\x00",  # a partial header
        encode_frame(RPC.HTTP_REQ_CALL, b"abc")[:-1],  # a partial frame
        encode_frame(RPC.HTTP_REQ_CALL, b"abc") * 2,  # two frames
        encode_frame(RPC.HTTP_REQ_CALL, b"x" * 2000),  # over the decoder's limit
    ],
)
def test_whole_frame_leaves_everything_else_to_feed(data: bytes) -> None:
    decoder = FrameDecoder(max_payload=1024)
    assert decoder.whole_frame(data) is None
    assert decoder.buffered == 0


def test_whole_frame_defers_to_buffered_bytes() -> None:
    decoder = FrameDecoder()
    frame = encode_frame(RPC.HTTP_REQ_CALL, b"abc")
    decoder.feed(frame[:2])
    assert decoder.whole_frame(frame) is None


# ---------------------------------------------- headers and args, lazy vs. eager
#
# Headers.set and Args.set on an untouched request only record the change: the
# request's entries are decoded (and the changes applied, in order) when a plugin reads
# them. The same operations on an instance that was read first (decoded at once, the
# original way) must give the same reads and the same rewrite for the gateway.

NAMES = st.sampled_from(["host", "Host", "x-a", "X-A", "k", "flag"])
VALUES = st.sampled_from(["", "1", "v", "é"])
MULTIDICT_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("set"), NAMES, VALUES),
        st.tuples(st.just("setall"), NAMES, st.lists(VALUES, max_size=2)),
        st.tuples(st.just("add"), NAMES, VALUES),
        st.tuples(st.just("delete"), NAMES, st.just("")),
        st.tuples(st.just("read"), NAMES, st.just("")),
    ),
    max_size=12,
)
SOURCE = st.lists(st.tuples(NAMES, st.none() | VALUES), max_size=6)


def _apply(target: Any, ops: list[tuple[str, str, object]]) -> list[object]:
    reads: list[object] = []
    for op, name, value in ops:
        if op == "read":
            reads.append((target.get(name), target.getall(name), name in target))
        elif op == "setall":
            if hasattr(target, "setall"):
                target.setall(name, value)
        elif op == "add":
            if hasattr(target, "add"):
                target.add(name, value)
        else:
            getattr(target, op)(name, *([value] if op == "set" else []))
    return reads


@SETTINGS
@given(source=SOURCE, ops=MULTIDICT_OPS, kind=st.sampled_from(["headers", "args"]))
def test_lazy_changes_read_and_rewrite_like_eager_ones(
    source: list[fb.Entry], ops: list[tuple[str, str, object]], kind: str
) -> None:
    from runner.core.calls import ChangeLog
    from runner.plugin import Args, Headers

    make = Headers if kind == "headers" else Args
    lazy_log: ChangeLog = {}
    eager_log: ChangeLog = {}
    lazy, eager = make(list(source), lazy_log), make(list(source), eager_log)
    eager._mutable()  # decoded before any change: the original, eager path
    assert _apply(lazy, ops) == _apply(eager, ops)
    assert lazy.changed == eager.changed
    # What the gateway is sent comes from the change log: the same either way, and
    # each changed name's logged values are the values it has now.
    assert lazy_log == eager_log
    assert all(values == lazy.getall(name) for name, values in lazy_log.values())
    assert lazy.items() == eager.items()


@SETTINGS
@given(call_id=U32, headers=st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=8))
def test_a_headers_only_rewrite(call_id: int, headers: list[tuple[str, str]]) -> None:
    # The usual rewrite, encoded from one constant layout.
    rw = m.Rewrite(headers=headers)
    assert m.encode_req_call_reply(call_id, rw) == generic_req_call_reply(call_id, rw)


REQUEST_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("headers"), MULTIDICT_OPS),
        st.tuples(st.just("args"), MULTIDICT_OPS),
        st.tuples(st.just("path"), st.sampled_from(["/", "/v2", "/é"])),
        st.tuples(st.just("resp_header"), st.tuples(NAMES, VALUES)),
        st.tuples(st.just("body"), st.sampled_from([b"x", b"body"])),
        st.tuples(st.just("stop"), st.sampled_from([200, 403])),
    ),
    max_size=6,
)


@SETTINGS
@given(call_id=U32, source=SOURCE, args=SOURCE, ops=REQUEST_OPS)
def test_request_encode_reply_is_its_action_encoded(
    call_id: int, source: list[fb.Entry], args: list[fb.Entry], ops: list[tuple[str, object]]
) -> None:
    # The dispatcher sends encode_request_reply(edits), written for speed; the generic
    # encoder of request_action(edits) is the reference: the same bytes, always.
    from runner.core.calls import RequestEdits, encode_request_reply, request_action
    from runner.plugin import Request

    payload = ref.encode_req_call(
        conf_token=1,
        id=call_id,
        headers=[(n, v or "") for n, v in source],
        args=args,
    )
    edits = RequestEdits()
    request = Request(m.HTTPReqCall(payload), None, edits)  # type: ignore[arg-type]
    for op, value in ops:
        if op in ("headers", "args"):
            _apply(getattr(request, op), value)  # type: ignore[arg-type]
        elif op == "path":
            request.set_path(value)  # type: ignore[arg-type]
        elif op == "resp_header":
            request.response_headers.set(*value)  # type: ignore[misc]
        elif op == "body":
            request.set_body(value)  # type: ignore[arg-type]
        else:
            request.stop(value)  # type: ignore[arg-type]
    assert encode_request_reply(call_id, edits) == m.encode_req_call_reply(
        call_id, request_action(edits)
    )


def _generic_root_bytes(buf: bytes) -> bytes | None:
    pos, (result,) = fb.root_offsets(buf, 1)
    return fb.read_bytes(buf, pos + result if result else 0)


@SETTINGS
@given(
    value=st.none() | st.binary(max_size=40),
    cuts=st.lists(st.tuples(st.integers(0, 80), st.integers(0, 255)), max_size=4),
    truncate=st.none() | st.integers(0, 80),
)
def test_root_bytes_reads_and_refuses_like_the_general_readers(
    value: bytes | None, cuts: list[tuple[int, int]], truncate: int | None
) -> None:
    # ExtraInfo answers, intact and damaged: the one-call reader must agree with
    # root_offsets + read_bytes on every value and on every refusal.
    buf = bytearray(ref.encode_extra_info_reply(value))
    for at, byte in cuts:
        if at < len(buf):
            buf[at] = byte
    data = bytes(buf[:truncate] if truncate is not None else buf)
    try:
        expected: object = _generic_root_bytes(data)
    except MalformedMessage:
        expected = MalformedMessage
    try:
        got: object = fb.root_bytes(data)
    except MalformedMessage:
        got = MalformedMessage
    assert got == expected

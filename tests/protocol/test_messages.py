"""The runner's fast codec against the generated-code reference, field for field.

Gateway -> runner: messages built by ``tests/refcodec.py`` (flatc's code and the generic
``flatbuffers`` builder) must read back identically through ``runner.protocol.messages``.
Runner -> gateway: replies built by ``runner.protocol.messages`` must read back identically
through ``tests/refcodec.py``. Malformed input must raise MalformedMessage and nothing
else: a stray IndexError or struct.error would escape the runner's error handling.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable, Sequence
from typing import Any

import flatbuffers
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ext_plugin_proto.A6 import TextEntry as GenTextEntry
from ext_plugin_proto.A6.Err.Code import Code as GenErrCode
from ext_plugin_proto.A6.ExtraInfo import Resp as GenInfoResp
from ext_plugin_proto.A6.ExtraInfo.Info import Info as GenInfo
from ext_plugin_proto.A6.HTTPReqCall import Req as GenReqCallReq
from ext_plugin_proto.A6.HTTPRespCall import Req as GenRespCallReq
from ext_plugin_proto.A6.Method import Method as GenMethod
from ext_plugin_proto.A6.PrepareConf import Req as GenPrepReq
from runner.protocol import flatbuf as fb
from runner.protocol import messages as m
from runner.protocol.flatbuf import MalformedMessage
from tests import refcodec as ref

# No example database: it would litter the tree, and a failure prints its example anyway.
BOUNDED = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
FEW = settings(BOUNDED, max_examples=50)

U32 = st.integers(0, 2**32 - 1)
U16 = st.integers(0, 2**16 - 1)
MIB = 1 << 20

# What the runner sees for header bytes that are not UTF-8: lone surrogates.
RAW_TEXT = st.binary(max_size=24).map(lambda b: b.decode("utf-8", "surrogateescape"))
TEXT = st.one_of(st.text(max_size=24), RAW_TEXT)
PAIRS = st.lists(st.tuples(TEXT, TEXT), max_size=6)
ENTRIES = st.lists(st.tuples(TEXT, st.none() | TEXT), max_size=6)
BODY = st.binary(max_size=256)
OPT_BODY = st.none() | BODY
SRC_IP = st.sampled_from([0, 4, 16]).flatmap(lambda n: st.binary(min_size=n, max_size=n))
METHODS = st.sampled_from(m.METHOD_NAMES)


# ----------------------------------------------------------------- generated-code readers
#
# The reference codec only decodes what the runner sends; to compare the runner's view
# of a (possibly corrupted) request with the generated code's, read requests here.


def _gen_bytes(obj: Any, vtable_offset: int) -> bytes | None:
    tab = obj._tab
    o = tab.Offset(vtable_offset)
    if not o:
        return None
    start = tab.Vector(o)
    return bytes(tab.Bytes[start : start + tab.VectorLen(o)])


def _gen_str(raw: bytes | None) -> str | None:
    return None if raw is None else raw.decode("utf-8", "surrogateescape")


def _gen_entries(length: int, get: Callable[[int], Any]) -> list[fb.Entry]:
    out: list[fb.Entry] = []
    for i in range(length):
        entry = get(i)
        name = _gen_str(entry.Name())
        assert name is not None
        out.append((name, _gen_str(entry.Value())))
    return out


def gen_prepare_conf(payload: bytes) -> m.PrepareConf:
    req = GenPrepReq.Req.GetRootAs(payload, 0)
    conf = [(n, v or "") for n, v in _gen_entries(req.ConfLength(), req.Conf)]
    return m.PrepareConf(conf, _gen_str(req.Key()) or "")


def gen_req_call(payload: bytes) -> tuple[object, ...]:
    req = GenReqCallReq.Req.GetRootAs(payload, 0)
    code = req.Method()
    return (
        req.Id(),
        req.ConfToken(),
        m.METHOD_NAMES[code] if code < len(m.METHOD_NAMES) else f"METHOD_{code}",
        _gen_str(req.Path()) or "",
        _gen_entries(req.ArgsLength(), req.Args),
        _gen_entries(req.HeadersLength(), req.Headers),
        _gen_bytes(req, 6) or b"",
    )


def gen_resp_call(payload: bytes) -> tuple[object, ...]:
    req = GenRespCallReq.Req.GetRootAs(payload, 0)
    return (
        req.Id(),
        req.Status(),
        req.ConfToken(),
        _gen_entries(req.HeadersLength(), req.Headers),
    )


def gen_extra_info_reply(payload: bytes) -> bytes | None:
    return _gen_bytes(GenInfoResp.Resp.GetRootAs(payload, 0), 4)


# ------------------------------------------------------------------- runner-side readers


def runner_req_call(payload: bytes) -> tuple[object, ...]:
    call = m.HTTPReqCall(payload)
    return (
        call.id,
        call.conf_token,
        call.method,
        call.path,
        call.args,
        call.headers,
        call.src_ip,
    )


def runner_resp_call(payload: bytes) -> tuple[object, ...]:
    call = m.HTTPRespCall(payload)
    return call.id, call.status, call.conf_token, call.headers


Decoder = Callable[[bytes], object]
# (runner decoder, generated-code decoder) per message the runner reads.
DECODERS: dict[str, tuple[Decoder, Decoder]] = {
    "prepare_conf": (m.decode_prepare_conf, gen_prepare_conf),
    "req_call": (runner_req_call, gen_req_call),
    "resp_call": (runner_resp_call, gen_resp_call),
    "extra_info_reply": (m.decode_extra_info_reply, gen_extra_info_reply),
}


def _samples() -> dict[str, bytes]:
    return {
        "prepare_conf": ref.encode_prepare_conf(
            [("auth", '{"k":1}'), ("rewrite", "{}")], key="route#1#ext-plugin-pre-req#2"
        ),
        "req_call": ref.encode_req_call(
            conf_token=7,
            id=3 << 22 | 5,
            method="POST",
            path="/a/b",
            args=[("flag", None), ("empty", ""), ("x", "1")],
            headers=[("host", "example.com"), ("x-v", "\udcff\udcfe")],
            src_ip=bytes(range(16)),
        ),
        "resp_call": ref.encode_resp_call(
            conf_token=9, id=11, status=502, headers=[("a", "1"), ("a", "2")]
        ),
        "extra_info_reply": ref.encode_extra_info_reply(b"some variable value"),
    }


SAMPLES = _samples()


def _runner_reads_like_reference(kind: str, payload: bytes) -> None:
    """The runner either rejects ``payload`` with MalformedMessage or reads what flatc's
    code reads: it must never raise anything else, nor see different values."""
    runner_decode, gen_decode = DECODERS[kind]
    try:
        got = runner_decode(payload)
    except MalformedMessage:
        return
    assert got == gen_decode(payload)


# ============================================================ schema constants agree


def test_method_numbering_matches_schema() -> None:
    assert {name: code for code, name in enumerate(m.METHOD_NAMES)} == {
        name: getattr(GenMethod, name) for name in m.METHOD_NAMES
    }
    assert len(m.METHOD_NAMES) == len([a for a in vars(GenMethod) if a.isupper()])


def test_err_codes_match_schema() -> None:
    assert {c.name: c.value for c in m.ErrCode} == {
        name: value for name, value in vars(GenErrCode).items() if name.isupper()
    }


def test_info_kinds_match_schema() -> None:
    assert {k.name: k.value for k in m.InfoKind} == {
        "VAR": GenInfo.Var,
        "REQ_BODY": GenInfo.ReqBody,
        "RESP_BODY": GenInfo.RespBody,
    }


# ================================================================ gateway -> runner


@BOUNDED
@given(conf=PAIRS, key=TEXT)
def test_prepare_conf(conf: list[tuple[str, str]], key: str) -> None:
    got = m.decode_prepare_conf(ref.encode_prepare_conf(conf, key))
    assert got == m.PrepareConf(conf, key)


def _raw_prepare_conf(entries: Sequence[fb.Entry] | None, key: str | None) -> bytes:
    """PrepareConf built field by field, to leave out what refcodec always writes."""
    builder = flatbuffers.Builder(128)
    key_off = None if key is None else builder.CreateString(key)
    vec = None
    if entries is not None:
        offs = []
        for name, value in entries:
            n = builder.CreateString(name)
            v = None if value is None else builder.CreateString(value)
            GenTextEntry.Start(builder)
            GenTextEntry.AddName(builder, n)
            if v is not None:
                GenTextEntry.AddValue(builder, v)
            offs.append(GenTextEntry.End(builder))
        GenPrepReq.StartConfVector(builder, len(offs))
        for off in reversed(offs):
            builder.PrependUOffsetTRelative(off)
        vec = builder.EndVector()
    GenPrepReq.Start(builder)
    if key_off is not None:
        GenPrepReq.AddKey(builder, key_off)
    if vec is not None:
        GenPrepReq.AddConf(builder, vec)
    builder.Finish(GenPrepReq.End(builder))
    return bytes(builder.Output())


@pytest.mark.parametrize(
    ("entries", "key", "expected"),
    [
        (None, None, m.PrepareConf([], "")),  # "ext-plugin-pre-req": {} and no key
        ([], "k", m.PrepareConf([], "k")),  # an empty vector, not an absent one
        ([("p", None)], "", m.PrepareConf([("p", "")], "")),  # an entry without value
        ([("p", ""), ("q", "{}")], None, m.PrepareConf([("p", ""), ("q", "{}")], "")),
    ],
)
def test_prepare_conf_absent_and_empty_fields(
    entries: list[fb.Entry] | None, key: str | None, expected: m.PrepareConf
) -> None:
    assert m.decode_prepare_conf(_raw_prepare_conf(entries, key)) == expected


@BOUNDED
@given(
    conf_token=U32,
    call_id=U32,
    method=METHODS,
    path=TEXT,
    args=ENTRIES,
    headers=PAIRS,
    src_ip=SRC_IP,
)
def test_req_call(
    conf_token: int,
    call_id: int,
    method: str,
    path: str,
    args: list[fb.Entry],
    headers: list[tuple[str, str]],
    src_ip: bytes,
) -> None:
    payload = ref.encode_req_call(
        conf_token=conf_token,
        id=call_id,
        method=method,
        path=path,
        args=args,
        headers=headers,
        src_ip=src_ip,
    )
    assert runner_req_call(payload) == (
        call_id,
        conf_token,
        method,
        path,
        args,
        headers,
        src_ip,
    )


@pytest.mark.parametrize("method", m.METHOD_NAMES)
def test_req_call_every_method(method: str) -> None:
    call = m.HTTPReqCall(ref.encode_req_call(conf_token=1, method=method))
    assert call.method == method


@pytest.mark.parametrize("code", [len(m.METHOD_NAMES), 200, 255])
def test_req_call_unknown_method_code(code: int) -> None:
    payload = bytearray(ref.encode_req_call(conf_token=1, method="HEAD"))
    method_pos = fb.root_fields(bytes(payload), 7)[2]
    payload[method_pos] = code
    assert m.HTTPReqCall(bytes(payload)).method == f"METHOD_{code}"


@pytest.mark.parametrize("src_ip", [b"", b"\x0a\x00\x00\x01", bytes(range(16))])
def test_req_call_src_ip_sizes(src_ip: bytes) -> None:
    assert m.HTTPReqCall(ref.encode_req_call(conf_token=1, src_ip=src_ip)).src_ip == src_ip


def test_req_call_defaults_left_out() -> None:
    # id 0 and GET are the defaults the gateway's builder leaves out of the table.
    payload = ref.encode_req_call(conf_token=0)
    fields = fb.root_fields(payload, 7)
    assert fields[0] == fields[2] == fields[6] == 0
    assert runner_req_call(payload) == (0, 0, "GET", "/", [], [], b"\x7f\x00\x00\x01")


def test_req_call_args_absent_empty_and_repeated() -> None:
    args = [("z", None), ("y", ""), ("a", "1"), ("a", "2"), ("", "")]
    call = m.HTTPReqCall(ref.encode_req_call(conf_token=1, args=args))
    assert call.args == args


def test_req_call_large_fields() -> None:
    path = "/" + "p" * MIB
    value = "v" * MIB
    call = m.HTTPReqCall(ref.encode_req_call(conf_token=1, path=path, headers=[("big", value)]))
    assert call.path == path
    assert call.headers == [("big", value)]


def test_req_call_non_utf8_survives() -> None:
    raw = b"caf\xe9 \xff\x00\x80"
    text = raw.decode("utf-8", "surrogateescape")
    call = m.HTTPReqCall(ref.encode_req_call(conf_token=1, path=text, headers=[(text, text)]))
    assert call.path.encode("utf-8", "surrogateescape") == raw
    assert call.headers == [(text, text)]


@BOUNDED
@given(conf_token=U32, call_id=U32, status=U16, headers=PAIRS)
def test_resp_call(
    conf_token: int, call_id: int, status: int, headers: list[tuple[str, str]]
) -> None:
    payload = ref.encode_resp_call(
        conf_token=conf_token, id=call_id, status=status, headers=headers
    )
    assert runner_resp_call(payload) == (call_id, status, conf_token, headers)


@BOUNDED
@given(result=OPT_BODY)
def test_extra_info_reply(result: bytes | None) -> None:
    assert m.decode_extra_info_reply(ref.encode_extra_info_reply(result)) == result


@pytest.mark.parametrize("result", [None, b"", b"\x00", b"x" * MIB])
def test_extra_info_reply_none_empty_large(result: bytes | None) -> None:
    assert m.decode_extra_info_reply(ref.encode_extra_info_reply(result)) == result


# ================================================================ runner -> gateway


@pytest.mark.parametrize("code", list(m.ErrCode))
def test_error_every_code(code: m.ErrCode) -> None:
    assert ref.decode_error(m.encode_error(code)) == code


@BOUNDED
@given(token=U32)
def test_prepare_conf_reply(token: int) -> None:
    assert ref.decode_prepare_conf_reply(m.encode_prepare_conf_reply(token)) == token


@BOUNDED
@given(call_id=U32)
def test_req_call_reply_pass_through(call_id: int) -> None:
    assert ref.decode_req_call_reply(m.encode_req_call_reply(call_id, None)) == ref.ReqCallReply(
        call_id, None
    )


def _expected_stop(stop: m.Stop) -> ref.StopAction:
    return ref.StopAction(stop.status, list(stop.headers), stop.body)


def _expected_rewrite(rw: m.Rewrite) -> ref.RewriteAction:
    return ref.RewriteAction(
        rw.path, list(rw.headers), list(rw.args), list(rw.resp_headers), rw.body
    )


@BOUNDED
@given(call_id=U32, status=U16, headers=PAIRS, body=BODY)
def test_req_call_reply_stop(
    call_id: int, status: int, headers: list[tuple[str, str]], body: bytes
) -> None:
    stop = m.Stop(status, headers, body)
    got = ref.decode_req_call_reply(m.encode_req_call_reply(call_id, stop))
    assert got == ref.ReqCallReply(call_id, _expected_stop(stop))


@BOUNDED
@given(
    call_id=U32,
    path=st.none() | TEXT,
    headers=ENTRIES,
    args=ENTRIES,
    resp_headers=PAIRS,
    body=OPT_BODY,
)
def test_req_call_reply_rewrite(
    call_id: int,
    path: str | None,
    headers: list[fb.Entry],
    args: list[fb.Entry],
    resp_headers: list[tuple[str, str]],
    body: bytes | None,
) -> None:
    rw = m.Rewrite(path, headers, args, resp_headers, body)
    got = ref.decode_req_call_reply(m.encode_req_call_reply(call_id, rw))
    assert got == ref.ReqCallReply(call_id, _expected_rewrite(rw))


@pytest.mark.parametrize(
    ("status", "headers", "body"),
    list(
        itertools.product(
            [0, 200, 403, 65535],
            [(), [("x", "1"), ("x", "2"), ("empty", "")]],
            [b"", b"denied", b"\x00" * 3],
        )
    ),
)
def test_req_call_reply_stop_combinations(
    status: int, headers: Sequence[tuple[str, str]], body: bytes
) -> None:
    stop = m.Stop(status, headers, body)
    got = ref.decode_req_call_reply(m.encode_req_call_reply(4, stop))
    assert got == ref.ReqCallReply(4, _expected_stop(stop))


@pytest.mark.parametrize(
    "present", list(itertools.product([False, True], repeat=5)), ids=lambda p: str(p)
)
@pytest.mark.parametrize("empty", [False, True], ids=["values", "empty-values"])
def test_req_call_reply_rewrite_combinations(present: tuple[bool, ...], empty: bool) -> None:
    # Every subset of Rewrite's five fields, with ordinary values or with empty
    # ones: an empty path or body must still be sent, unlike an absent one.
    has_path, has_headers, has_args, has_resp_headers, has_body = present
    rw = m.Rewrite(
        path=("" if empty else "/new?a=b") if has_path else None,
        headers=[("x-del", None), ("x-set", "" if empty else "1")] if has_headers else (),
        args=[("gone", None), ("k", "" if empty else "v")] if has_args else (),
        resp_headers=[("x-r", "" if empty else "r")] if has_resp_headers else (),
        body=(b"" if empty else b"new body") if has_body else None,
    )
    got = ref.decode_req_call_reply(m.encode_req_call_reply(5, rw))
    assert got == ref.ReqCallReply(5, _expected_rewrite(rw))


def test_req_call_reply_large_bodies() -> None:
    body = bytes(range(256)) * (MIB // 256)
    stop = ref.decode_req_call_reply(m.encode_req_call_reply(1, m.Stop(200, (), body))).action
    assert isinstance(stop, ref.StopAction)
    assert stop.body == body
    rw = ref.decode_req_call_reply(m.encode_req_call_reply(1, m.Rewrite(body=body))).action
    assert isinstance(rw, ref.RewriteAction)
    assert rw.body == body
    assert ref.decode_resp_call_reply(m.encode_resp_call_reply(1, body=body)).body == body


@BOUNDED
@given(call_id=U32, status=U16, headers=PAIRS, body=OPT_BODY)
def test_resp_call_reply(
    call_id: int, status: int, headers: list[tuple[str, str]], body: bytes | None
) -> None:
    got = ref.decode_resp_call_reply(m.encode_resp_call_reply(call_id, status, headers, body))
    # An empty body means "keep the upstream's" to the gateway, exactly like no body:
    # the runner leaves it out.
    expected_headers: list[fb.Entry] = list(headers)
    assert got == ref.RespCallReply(call_id, status, expected_headers, body or None)


@BOUNDED
@given(name=TEXT)
def test_extra_info_query_var(name: str) -> None:
    got = ref.decode_extra_info_query(m.encode_extra_info_query(m.InfoKind.VAR, name))
    assert got == ref.ExtraInfoQuery("var", name)


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        (m.InfoKind.VAR, ref.ExtraInfoQuery("var", "")),
        (m.InfoKind.REQ_BODY, ref.ExtraInfoQuery("req_body")),
        (m.InfoKind.RESP_BODY, ref.ExtraInfoQuery("resp_body")),
    ],
)
def test_extra_info_query_kinds(kind: m.InfoKind, expected: ref.ExtraInfoQuery) -> None:
    assert ref.decode_extra_info_query(m.encode_extra_info_query(kind)) == expected


def test_extra_info_query_body_kinds_ignore_name() -> None:
    got = ref.decode_extra_info_query(m.encode_extra_info_query(m.InfoKind.REQ_BODY, "x"))
    assert got == ref.ExtraInfoQuery("req_body", None)


# ===================================================================== malformed input


def _patched(payload: bytes, at: int, fmt: str, value: int) -> bytes:
    buf = bytearray(payload)
    struct.pack_into(fmt, buf, at, value)
    return bytes(buf)


@pytest.mark.parametrize("kind", sorted(DECODERS))
def test_every_truncation(kind: str) -> None:
    payload = SAMPLES[kind]
    runner_decode, _ = DECODERS[kind]
    expected = runner_decode(payload)
    for size in range(len(payload)):
        try:
            got = runner_decode(payload[:size])
        except MalformedMessage:
            continue
        # Only padding can go missing unnoticed: every value must still be whole.
        assert got == expected, size


def _outcome(payload: bytes) -> tuple[object, ...] | str:
    try:
        return runner_req_call(payload)
    except MalformedMessage:
        return "malformed"


@pytest.mark.parametrize(
    ("sample", "learned"),
    [
        (SAMPLES["req_call"], 1),
        (m.encode_req_call(conf_token=7, id=9, headers=[("h", "v")]), 1),
        (m.encode_req_call(conf_token=1, id=0, method="POST"), 0),  # no id: the long way
    ],
)
def test_a_learned_layout_reads_like_the_long_way(sample: bytes, learned: int) -> None:
    # HTTPReqCall reads calls laid out like one seen before through that layout. Every
    # cut and every byte changed in its first 64 bytes must read as if it had never
    # been seen: the same values, or malformed.
    variants = [sample[:size] for size in range(len(sample))]
    for at in range(min(64, len(sample))):
        for value in (0, 1, 4, 0x80, 0xFF, sample[at] ^ 1):
            buf = bytearray(sample)
            buf[at] = value
            variants.append(bytes(buf))
    m._REQ_LAYOUTS.clear()
    cold = [_outcome(variant) for variant in variants]
    m._REQ_LAYOUTS.clear()
    assert _outcome(sample) == _outcome(sample) != "malformed"  # learned, then used
    assert len(m._REQ_LAYOUTS) == learned
    for variant, expected in zip(variants, cold, strict=True):
        assert _outcome(variant) == expected, variant.hex()
        _runner_reads_like_reference("req_call", variant)


def test_layouts_seen_are_bounded() -> None:
    # Other bytes in the padding between the vtable and the table: the same message,
    # and a new layout every time.
    sample = m.encode_req_call(conf_token=5, id=3, path="/p")
    pos = struct.unpack_from("<I", sample)[0]
    vt = pos - struct.unpack_from("<i", sample, pos)[0]
    pad = vt + struct.unpack_from("<H", sample, vt)[0]
    assert pos - pad == 2
    m._REQ_LAYOUTS.clear()
    for n in range(3 * m._MAX_LAYOUTS):
        payload = sample[:pad] + struct.pack("<H", n) + sample[pos:]
        assert runner_req_call(payload)[:4] == (3, 5, "GET", "/p")
        assert runner_req_call(payload)[:4] == (3, 5, "GET", "/p")  # through its layout
        assert 1 <= len(m._REQ_LAYOUTS) <= m._MAX_LAYOUTS


@pytest.mark.parametrize("kind", sorted(DECODERS))
@pytest.mark.parametrize("payload", [b"", b"\x00", b"\x00\x00\x00", b"\xff" * 3])
def test_too_short_for_a_root_offset(kind: str, payload: bytes) -> None:
    with pytest.raises(MalformedMessage):
        DECODERS[kind][0](payload)


@pytest.mark.parametrize("kind", sorted(DECODERS))
@pytest.mark.parametrize("value", [0xFFFFFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFC, 1, 2, 3])
def test_every_aligned_word_overwritten(kind: str, value: int) -> None:
    # Every root offset, soffset, uoffset and length in the message, pointed far out of
    # the buffer, just out of it, or to a misaligned spot.
    payload = SAMPLES[kind]
    for at in range(0, len(payload) - 3):
        _runner_reads_like_reference(kind, _patched(payload, at, "<I", value))
        _runner_reads_like_reference(kind, _patched(payload, at, "<I", len(payload) - at))


@pytest.mark.parametrize("kind", sorted(DECODERS))
@pytest.mark.parametrize("value", [0, 1, 3, 4, 0x7FFF, 0xFFFF])
def test_every_halfword_overwritten(kind: str, value: int) -> None:
    # vtable sizes, table sizes and field offsets.
    payload = SAMPLES[kind]
    for at in range(0, len(payload) - 1):
        _runner_reads_like_reference(kind, _patched(payload, at, "<H", value))


def _req_call_positions() -> dict[str, int]:
    payload = SAMPLES["req_call"]
    root = struct.unpack_from("<I", payload, 0)[0]
    vtable = root - struct.unpack_from("<i", payload, root)[0]
    fields = fb.root_fields(payload, 7)
    args_vec = fb.deref(payload, fields[4])
    first_arg = args_vec + 4 + struct.unpack_from("<I", payload, args_vec + 4)[0]
    return {
        "root": root,
        "vtable": vtable,
        "src_ip_field": fields[1],
        "src_ip_vec": fb.deref(payload, fields[1]),
        "path_field": fields[3],
        "path_str": fb.deref(payload, fields[3]),
        "args_field": fields[4],
        "args_vec": args_vec,
        "first_arg": first_arg,
    }


POS = _req_call_positions()


@pytest.mark.parametrize(
    ("what", "at", "fmt", "value"),
    [
        ("root offset past the end", 0, "<I", len(SAMPLES["req_call"])),
        ("root offset huge", 0, "<I", 0xFFFFFFF0),
        ("vtable before the buffer", POS["root"], "<i", POS["root"] + 4),
        ("vtable past the end", POS["root"], "<i", -len(SAMPLES["req_call"])),
        ("vtable size past the end", POS["vtable"], "<H", 0xFFFF),
        ("table size past the end", POS["vtable"] + 2, "<H", 0xFFFF),
        ("field offset outside its table", POS["vtable"] + 4 + 2 * 3, "<H", 0xFFF0),
        ("path offset past the end", POS["path_field"], "<I", 0xFFFFFF00),
        ("path length past the end", POS["path_str"], "<I", 0xFFFFFFFF),
        ("src_ip length past the end", POS["src_ip_vec"], "<I", 0x7FFFFFFF),
        ("args offset past the end", POS["args_field"], "<I", 0x80000000),
        ("args count past the end", POS["args_vec"], "<I", 0x40000000),
        ("arg table offset past the end", POS["args_vec"] + 4, "<I", 0xFFFFFFF0),
        ("arg vtable past the end", POS["first_arg"], "<i", -0x7FFFFFFF),
    ],
)
def test_offsets_outside_the_buffer(what: str, at: int, fmt: str, value: int) -> None:
    with pytest.raises(MalformedMessage):
        runner_req_call(_patched(SAMPLES["req_call"], at, fmt, value))


@pytest.mark.parametrize("prop", ["path", "args", "headers", "src_ip"])
def test_lazy_properties_raise_malformed(prop: str) -> None:
    # The constructor reads only id and conf token: a broken field must surface as
    # MalformedMessage when the plugin touches it, not as a bare IndexError.
    payload = SAMPLES["req_call"]
    fields = fb.root_fields(payload, 7)
    slot = {"src_ip": 1, "path": 3, "args": 4, "headers": 5}[prop]
    call = m.HTTPReqCall(_patched(payload, fields[slot], "<I", 0x7FFFFFF0))
    with pytest.raises(MalformedMessage):
        getattr(call, prop)


def test_resp_call_headers_lazy_raise_malformed() -> None:
    payload = SAMPLES["resp_call"]
    fields = fb.root_fields(payload, 4)
    call = m.HTTPRespCall(_patched(payload, fields[2], "<I", 0x7FFFFFF0))
    with pytest.raises(MalformedMessage):
        _ = call.headers


def test_text_entry_without_name() -> None:
    builder = flatbuffers.Builder(64)
    value = builder.CreateString("orphan")
    GenTextEntry.Start(builder)
    GenTextEntry.AddValue(builder, value)
    entry = GenTextEntry.End(builder)
    GenPrepReq.StartConfVector(builder, 1)
    builder.PrependUOffsetTRelative(entry)
    vec = builder.EndVector()
    GenPrepReq.Start(builder)
    GenPrepReq.AddConf(builder, vec)
    builder.Finish(GenPrepReq.End(builder))
    with pytest.raises(MalformedMessage):
        m.decode_prepare_conf(bytes(builder.Output()))


@BOUNDED
@given(kind=st.sampled_from(sorted(DECODERS)), payload=st.binary(max_size=512))
def test_random_garbage(kind: str, payload: bytes) -> None:
    _runner_reads_like_reference(kind, payload)


@BOUNDED
@given(
    kind=st.sampled_from(sorted(DECODERS)),
    data=st.data(),
)
def test_random_corruption_of_valid_messages(kind: str, data: st.DataObject) -> None:
    payload = bytearray(SAMPLES[kind])
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(payload) - 1))
        payload[at] = data.draw(st.integers(0, 255))
    _runner_reads_like_reference(kind, bytes(payload))


@FEW
@given(
    conf_token=U32,
    args=ENTRIES,
    headers=PAIRS,
    src_ip=SRC_IP,
    cut=st.floats(0, 1, exclude_max=True),
)
def test_random_truncation_of_random_requests(
    conf_token: int,
    args: list[fb.Entry],
    headers: list[tuple[str, str]],
    src_ip: bytes,
    cut: float,
) -> None:
    payload = ref.encode_req_call(conf_token=conf_token, args=args, headers=headers, src_ip=src_ip)
    _runner_reads_like_reference("req_call", payload[: int(len(payload) * cut)])

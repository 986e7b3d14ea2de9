"""The gateway's side of ``runner.protocol.messages`` against the generated-code reference.

The test client and ``a6-runner bench`` play the gateway with these functions: what
they send must read back field for field through flatc's code, and what a runner built
on flatc's code sends must read back field for field through them. A runner under test
may answer garbage: the decoders must then raise MalformedMessage and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ext_plugin_proto.A6.PrepareConf import Req as PrepReq
from runner.protocol import flatbuf as fb
from runner.protocol import messages as m
from runner.protocol.flatbuf import Entry, MalformedMessage
from runner.protocol.messages import InfoKind
from tests import refcodec as ref

BOUNDED = settings(
    max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)

U32 = st.integers(0, 2**32 - 1)
U16 = st.integers(0, 2**16 - 1)
# Header bytes that are not UTF-8 travel as lone surrogates.
RAW_TEXT = st.binary(max_size=24).map(lambda b: b.decode("utf-8", "surrogateescape"))
TEXT = st.one_of(st.text(max_size=24), RAW_TEXT)
PAIRS = st.lists(st.tuples(TEXT, TEXT), max_size=6)
ENTRIES = st.lists(st.tuples(TEXT, st.none() | TEXT), max_size=6)
BODY = st.binary(max_size=256)
OPT_BODY = st.none() | BODY
SRC_IP = st.sampled_from([0, 4, 16]).flatmap(lambda n: st.binary(min_size=n, max_size=n))
METHODS = st.sampled_from(m.METHOD_NAMES)
INFO_NAMES: dict[InfoKind, ref.InfoName] = {
    InfoKind.VAR: "var",
    InfoKind.REQ_BODY: "req_body",
    InfoKind.RESP_BODY: "resp_body",
}


# ====================================================================== gateway -> runner


@BOUNDED
@given(conf=PAIRS, key=TEXT)
def test_prepare_conf(conf: list[tuple[str, str]], key: str) -> None:
    assert ref.decode_prepare_conf(m.encode_prepare_conf(conf, key)) == (conf, key)


def test_an_empty_prepare_conf_is_sent_as_no_list() -> None:
    # What the gateway sends for a route with "ext-plugin-pre-req": {}.
    payload = m.encode_prepare_conf([], "k")
    assert ref.decode_prepare_conf(payload) == ([], "k")
    assert PrepReq.Req.GetRootAs(payload, 0).ConfIsNone()
    assert m.decode_prepare_conf(payload) == m.PrepareConf([], "k")


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
    args: list[Entry],
    headers: list[tuple[str, str]],
    src_ip: bytes,
) -> None:
    payload = m.encode_req_call(
        conf_token=conf_token,
        id=call_id,
        method=method,
        path=path,
        args=args,
        headers=headers,
        src_ip=src_ip,
    )
    assert ref.decode_req_call(payload) == ref.GatewayReqCall(
        call_id, src_ip, method, path, args, list(headers), conf_token
    )


def test_req_call_refuses_what_the_gateway_cannot_send() -> None:
    with pytest.raises(ValueError, match="BREW"):
        m.encode_req_call(conf_token=1, method="BREW")
    with pytest.raises(ValueError, match="uint32"):
        m.encode_req_call(conf_token=2**32)


@BOUNDED
@given(conf_token=U32, call_id=U32, status=U16, headers=PAIRS)
def test_resp_call(
    conf_token: int, call_id: int, status: int, headers: list[tuple[str, str]]
) -> None:
    payload = m.encode_resp_call(conf_token=conf_token, id=call_id, status=status, headers=headers)
    assert ref.decode_resp_call(payload) == ref.GatewayRespCall(
        call_id, status, list(headers), conf_token
    )


@BOUNDED
@given(result=OPT_BODY)
def test_extra_info_reply(result: bytes | None) -> None:
    # None (no such value) and b"" (an empty value) must stay apart.
    assert ref.decode_extra_info_reply(m.encode_extra_info_reply(result)) == result


# ====================================================================== runner -> gateway


@BOUNDED
@given(token=U32)
def test_prepare_conf_reply(token: int) -> None:
    assert m.decode_prepare_conf_reply(ref.encode_prepare_conf_reply(token)) == token


@pytest.mark.parametrize("code", [*m.ErrCode, 7])
def test_error(code: int) -> None:
    assert m.decode_error(ref.encode_error(code)) == code


@BOUNDED
@given(call_id=U32)
def test_req_call_reply_pass_through(call_id: int) -> None:
    assert m.decode_req_call_reply(ref.encode_req_call_reply(call_id, None)) == m.ReqCallReply(
        call_id, None
    )


@BOUNDED
@given(call_id=U32, status=U16, headers=PAIRS, body=BODY)
def test_req_call_reply_stop(
    call_id: int, status: int, headers: list[tuple[str, str]], body: bytes
) -> None:
    payload = ref.encode_req_call_reply(call_id, ref.StopAction(status, list(headers), body))
    got = m.decode_req_call_reply(payload)
    assert got == m.ReqCallReply(call_id, m.Stop(status, tuple(headers), body))
    assert isinstance(got.action, m.Stop)
    assert isinstance(got.action.headers, tuple)


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
    headers: list[Entry],
    args: list[Entry],
    resp_headers: list[tuple[str, str]],
    body: bytes | None,
) -> None:
    action = ref.RewriteAction(path, headers, args, list(resp_headers), body)
    got = m.decode_req_call_reply(ref.encode_req_call_reply(call_id, action))
    expected = m.Rewrite(path, tuple(headers), tuple(args), tuple(resp_headers), body)
    assert got == m.ReqCallReply(call_id, expected)


def test_stop_header_without_value_reads_as_empty() -> None:
    payload = ref.encode_req_call_reply(1, ref.StopAction(403, [("x", None)], b""))
    assert m.decode_req_call_reply(payload).action == m.Stop(403, (("x", ""),), b"")


@BOUNDED
@given(call_id=U32, status=U16, headers=ENTRIES, body=OPT_BODY)
def test_resp_call_reply(
    call_id: int, status: int, headers: list[Entry], body: bytes | None
) -> None:
    got = m.decode_resp_call_reply(ref.encode_resp_call_reply(call_id, status, headers, body))
    assert got == m.RespCallReply(call_id, status, tuple(headers), body)


@BOUNDED
@given(kind=st.sampled_from(list(InfoKind)), name=st.none() | TEXT)
def test_extra_info_query(kind: InfoKind, name: str | None) -> None:
    got = m.decode_extra_info_query(ref.encode_extra_info_query(INFO_NAMES[kind], name))
    assert got == m.ExtraInfoQuery(kind, name if kind is InfoKind.VAR else None)


@pytest.mark.parametrize("kind", list(InfoKind))
def test_the_runners_own_queries_read_back(kind: InfoKind) -> None:
    got = m.decode_extra_info_query(m.encode_extra_info_query(kind, "server_port"))
    assert got == m.ExtraInfoQuery(kind, "server_port" if kind is InfoKind.VAR else None)


# ======================================================================== malformed replies


def _ref_req_call_reply(payload: bytes) -> m.ReqCallReply:
    got = ref.decode_req_call_reply(payload)
    action = got.action
    if isinstance(action, ref.StopAction):
        return m.ReqCallReply(
            got.id,
            m.Stop(action.status, tuple((n, v or "") for n, v in action.headers), action.body),
        )
    if isinstance(action, ref.RewriteAction):
        rewrite = m.Rewrite(
            action.path,
            tuple(action.headers),
            tuple(action.args),
            tuple((n, v or "") for n, v in action.resp_headers),
            action.body,
        )
        return m.ReqCallReply(got.id, rewrite)
    return m.ReqCallReply(got.id, None)


def _ref_resp_call_reply(payload: bytes) -> m.RespCallReply:
    got = ref.decode_resp_call_reply(payload)
    return m.RespCallReply(got.id, got.status, tuple(got.headers), got.body)


def _ref_extra_info_query(payload: bytes) -> m.ExtraInfoQuery:
    got = ref.decode_extra_info_query(payload)
    kind = next(k for k, name in INFO_NAMES.items() if name == got.kind)
    return m.ExtraInfoQuery(kind, got.name)


# (our decoder, the reference read the same way, a valid sample)
DECODERS: dict[str, tuple[Callable[[bytes], Any], Callable[[bytes], Any], bytes]] = {
    "prepare_conf_reply": (
        m.decode_prepare_conf_reply,
        ref.decode_prepare_conf_reply,
        ref.encode_prepare_conf_reply(77),
    ),
    "error": (m.decode_error, ref.decode_error, ref.encode_error(2)),
    "stop": (
        m.decode_req_call_reply,
        _ref_req_call_reply,
        ref.encode_req_call_reply(9, ref.StopAction(403, [("x", "1")], b"denied")),
    ),
    "rewrite": (
        m.decode_req_call_reply,
        _ref_req_call_reply,
        ref.encode_req_call_reply(
            9, ref.RewriteAction("/p", [("h", None)], [("a", "1")], [("r", "2")], b"body")
        ),
    ),
    "resp_call_reply": (
        m.decode_resp_call_reply,
        _ref_resp_call_reply,
        ref.encode_resp_call_reply(5, 201, [("a", "1"), ("b", None)], b"new"),
    ),
    "extra_info_query": (
        m.decode_extra_info_query,
        _ref_extra_info_query,
        ref.encode_extra_info_query("var", "remote_addr"),
    ),
}


def _reads_like_reference(kind: str, payload: bytes) -> None:
    """Our decoder rejects ``payload`` with MalformedMessage or reads what flatc's code
    reads (where flatc's code reads anything at all)."""
    ours, reference, _ = DECODERS[kind]
    try:
        got = ours(payload)
    except MalformedMessage:
        return
    try:
        expected = reference(payload)
    except Exception:
        # The generated code follows offsets blindly; where it fails, ours must not
        # have invented a value out of bytes outside the message (it checked them all).
        return
    assert got == expected


@pytest.mark.parametrize("kind", sorted(DECODERS))
def test_every_truncation(kind: str) -> None:
    ours, _, sample = DECODERS[kind]
    whole = ours(sample)
    for size in range(len(sample)):
        try:
            got = ours(sample[:size])
        except MalformedMessage:
            continue
        assert got == whole, size  # only padding may go missing unnoticed


@pytest.mark.parametrize("kind", sorted(DECODERS))
@pytest.mark.parametrize("payload", [b"", b"\x00\x00\x00", b"\xff" * 8])
def test_too_short_or_nonsense(kind: str, payload: bytes) -> None:
    with pytest.raises(MalformedMessage):
        DECODERS[kind][0](payload)


def test_unknown_action_and_info_types_are_malformed() -> None:
    sample = bytearray(DECODERS["stop"][2])
    # The action type is the only byte equal to 1 in the Resp table's second slot.
    pos = fb.root_fields(bytes(sample), 3)[1]
    sample[pos] = 9
    with pytest.raises(MalformedMessage, match="action type 9"):
        m.decode_req_call_reply(bytes(sample))
    query = bytearray(DECODERS["extra_info_query"][2])
    pos = fb.root_fields(bytes(query), 2)[0]
    query[pos] = 4
    with pytest.raises(MalformedMessage, match="ExtraInfo type 4"):
        m.decode_extra_info_query(bytes(query))


@BOUNDED
@given(kind=st.sampled_from(sorted(DECODERS)), payload=st.binary(max_size=256))
def test_random_garbage(kind: str, payload: bytes) -> None:
    _reads_like_reference(kind, payload)


@BOUNDED
@given(kind=st.sampled_from(sorted(DECODERS)), data=st.data())
def test_random_corruption_of_valid_replies(kind: str, data: st.DataObject) -> None:
    payload = bytearray(DECODERS[kind][2])
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(payload) - 1))
        payload[at] = data.draw(st.integers(0, 255))
    _reads_like_reference(kind, bytes(payload))

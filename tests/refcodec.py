"""The reference codec: both sides of the protocol, built on the generated code.

Everything here goes through ``ext_plugin_proto`` (the Python that flatc generates from
``ext-plugin.fbs``) and the generic ``flatbuffers`` package, and shares nothing with
``runner.protocol``. That independence is the point: tests encode with one codec and
decode with the other, in both directions and for both sides (the runner's, and the
gateway's that the client and the bench use), so a layout mistake in the runner's codec
cannot hide behind the same mistake in its own decoder. Only tests import it: neither a
serving runner nor its tools need ``flatbuffers`` or ``ext_plugin_proto``.

Encoders of the gateway's messages follow the gateway's habits where they matter to a
runner: scalars equal to their default are left out of the table (id 0, method GET), an
arg without value has no value field, the args and headers vectors are always present
(possibly empty), and an empty PrepareConf list is sent as no list at all.

Decoders expect well-formed payloads; on malformed ones they raise whatever the
generated code raises (usually IndexError or struct.error), or ValueError for a union
type the schema does not know.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias

import flatbuffers

from ext_plugin_proto.A6 import TextEntry as _TextEntry
from ext_plugin_proto.A6.Err import Resp as _ErrResp
from ext_plugin_proto.A6.ExtraInfo import Req as _InfoReq
from ext_plugin_proto.A6.ExtraInfo import ReqBody as _InfoReqBody
from ext_plugin_proto.A6.ExtraInfo import Resp as _InfoResp
from ext_plugin_proto.A6.ExtraInfo import RespBody as _InfoRespBody
from ext_plugin_proto.A6.ExtraInfo import Var as _InfoVar
from ext_plugin_proto.A6.HTTPReqCall import Req as _ReqCallReq
from ext_plugin_proto.A6.HTTPReqCall import Resp as _ReqCallResp
from ext_plugin_proto.A6.HTTPReqCall import Rewrite as _Rewrite
from ext_plugin_proto.A6.HTTPReqCall import Stop as _Stop
from ext_plugin_proto.A6.HTTPRespCall import Req as _RespCallReq
from ext_plugin_proto.A6.HTTPRespCall import Resp as _RespCallResp
from ext_plugin_proto.A6.PrepareConf import Req as _PrepReq
from ext_plugin_proto.A6.PrepareConf import Resp as _PrepResp

__all__ = [
    "ExtraInfoQuery",
    "GatewayReqCall",
    "GatewayRespCall",
    "InfoName",
    "ReqCallReply",
    "RespCallReply",
    "RewriteAction",
    "StopAction",
    "decode_error",
    "decode_extra_info_query",
    "decode_extra_info_reply",
    "decode_prepare_conf",
    "decode_prepare_conf_reply",
    "decode_req_call",
    "decode_req_call_reply",
    "decode_resp_call",
    "decode_resp_call_reply",
    "encode_error",
    "encode_extra_info_query",
    "encode_extra_info_reply",
    "encode_prepare_conf",
    "encode_prepare_conf_reply",
    "encode_req_call",
    "encode_req_call_reply",
    "encode_resp_call",
    "encode_resp_call_reply",
]

Entry: TypeAlias = tuple[str, str | None]
InfoName: TypeAlias = Literal["var", "req_body", "resp_body"]

# Union discriminants, from the schema (A6.HTTPReqCall.Action, A6.ExtraInfo.Info).
_ACTION_NONE: Final = 0
_ACTION_STOP: Final = 1
_ACTION_REWRITE: Final = 2
_INFO_KINDS: Final[dict[int, InfoName]] = {1: "var", 2: "req_body", 3: "resp_body"}

_METHODS: Final = (
    "GET", "HEAD", "POST", "PUT", "DELETE", "MKCOL", "COPY", "MOVE", "OPTIONS",
    "PROPFIND", "PROPPATCH", "LOCK", "UNLOCK", "PATCH", "TRACE",
)  # fmt: skip
# Kept apart from runner.protocol.messages.METHOD_NAMES on purpose: the schema's enum order is
# what both must match, and a shared table would hide a mistake in either.
_METHOD_CODES: Final = {name: code for code, name in enumerate(_METHODS)}


# ---------------------------------------------------------------------------- helpers


def _text(s: str) -> bytes:
    # Non-UTF-8 header bytes travel as lone surrogates in the runner's str values.
    return s.encode("utf-8", "surrogateescape")


def _untext(raw: Any) -> str:
    return bytes(raw).decode("utf-8", "surrogateescape")


def _opt_untext(raw: Any) -> str | None:
    return None if raw is None else _untext(raw)


def _finish(builder: Any, root: int) -> bytes:
    builder.Finish(root)
    return bytes(builder.Output())


def _text_entries(builder: Any, entries: Sequence[Entry], start_vector: Any) -> int:
    """Write a ``[TextEntry]`` vector; a None value leaves the value field out."""
    offsets: list[int] = []
    for name, value in entries:
        name_off = builder.CreateString(_text(name))
        value_off = None if value is None else builder.CreateString(_text(value))
        _TextEntry.Start(builder)
        _TextEntry.AddName(builder, name_off)
        if value_off is not None:
            _TextEntry.AddValue(builder, value_off)
        offsets.append(int(_TextEntry.End(builder)))
    start_vector(builder, len(offsets))
    # FlatBuffers builds back to front: prepend in reverse to keep the order.
    for off in reversed(offsets):
        builder.PrependUOffsetTRelative(off)
    return int(builder.EndVector())


def _read_entries(length: int, get: Any) -> list[Entry]:
    out: list[Entry] = []
    for i in range(length):
        entry = get(i)
        name = entry.Name()
        if name is None:
            raise ValueError(f"TextEntry {i} has no name")
        out.append((_untext(name), _opt_untext(entry.Value())))
    return out


def _ubytes(obj: Any, vtable_offset: int) -> bytes | None:
    """A ``[ubyte]`` field of a generated table object; None where the field is absent.

    The generated accessors return one byte per call (or need numpy): slicing the
    underlying buffer is the only practical way to read a body.
    """
    tab = obj._tab
    o = int(tab.Offset(vtable_offset))
    if o == 0:
        return None
    start = int(tab.Vector(o))
    length = int(tab.VectorLen(o))
    return bytes(tab.Bytes[start : start + length])


def _sub_table(cls: Any, union_table: Any) -> Any:
    obj = cls()
    obj.Init(union_table.Bytes, union_table.Pos)
    return obj


# --------------------------------------------------------------------------- encoders


def encode_prepare_conf(conf: Sequence[tuple[str, str]], key: str = "") -> bytes:
    """``A6.PrepareConf.Req``: one ``(plugin name, JSON config)`` entry per plugin."""
    builder = flatbuffers.Builder(256)
    key_off = builder.CreateString(_text(key))
    conf_off = _text_entries(builder, conf, _PrepReq.StartConfVector) if conf else None
    _PrepReq.Start(builder)
    _PrepReq.AddKey(builder, key_off)
    if conf_off is not None:
        _PrepReq.AddConf(builder, conf_off)
    return _finish(builder, _PrepReq.End(builder))


def encode_req_call(
    *,
    conf_token: int,
    id: int = 0,
    method: str = "GET",
    path: str = "/",
    args: Sequence[tuple[str, str | None]] = (),
    headers: Sequence[tuple[str, str]] = (),
    src_ip: bytes = b"\x7f\x00\x00\x01",
) -> bytes:
    """``A6.HTTPReqCall.Req``. An arg whose value is None is sent without a value (``?flag``)."""
    builder = flatbuffers.Builder(256 + len(path))
    path_off = builder.CreateString(_text(path))
    ip_off = builder.CreateByteVector(bytes(src_ip))
    args_off = _text_entries(builder, args, _ReqCallReq.StartArgsVector)
    headers_off = _text_entries(builder, headers, _ReqCallReq.StartHeadersVector)
    _ReqCallReq.Start(builder)
    _ReqCallReq.AddId(builder, id)
    _ReqCallReq.AddConfToken(builder, conf_token)
    _ReqCallReq.AddSrcIp(builder, ip_off)
    _ReqCallReq.AddPath(builder, path_off)
    _ReqCallReq.AddArgs(builder, args_off)
    _ReqCallReq.AddHeaders(builder, headers_off)
    _ReqCallReq.AddMethod(builder, _METHOD_CODES[method])
    return _finish(builder, _ReqCallReq.End(builder))


def encode_resp_call(
    *,
    conf_token: int,
    id: int = 0,
    status: int = 200,
    headers: Sequence[tuple[str, str]] = (),
) -> bytes:
    """``A6.HTTPRespCall.Req``: the upstream response's status and headers."""
    builder = flatbuffers.Builder(256)
    headers_off = _text_entries(builder, headers, _RespCallReq.StartHeadersVector)
    _RespCallReq.Start(builder)
    _RespCallReq.AddId(builder, id)
    _RespCallReq.AddStatus(builder, status)
    _RespCallReq.AddConfToken(builder, conf_token)
    _RespCallReq.AddHeaders(builder, headers_off)
    return _finish(builder, _RespCallReq.End(builder))


def encode_extra_info_reply(result: bytes | None) -> bytes:
    """``A6.ExtraInfo.Resp``. None sends no result field ("no such value")."""
    builder = flatbuffers.Builder(64 + (len(result) if result else 0))
    result_off = None if result is None else builder.CreateByteVector(bytes(result))
    _InfoResp.Start(builder)
    if result_off is not None:
        _InfoResp.AddResult(builder, result_off)
    return _finish(builder, _InfoResp.End(builder))


# --------------------------------------------------------------------------- decoders


@dataclass(frozen=True, slots=True)
class StopAction:
    """``A6.HTTPReqCall.Stop`` as decoded; an absent body reads as ``b""`` (as for the gateway)."""

    status: int
    headers: list[Entry]
    body: bytes


@dataclass(frozen=True, slots=True)
class RewriteAction:
    """``A6.HTTPReqCall.Rewrite`` as decoded; path and body are None where absent."""

    path: str | None
    headers: list[Entry]
    args: list[Entry]
    resp_headers: list[Entry]
    body: bytes | None


@dataclass(frozen=True, slots=True)
class ReqCallReply:
    """``A6.HTTPReqCall.Resp``; action None means "pass through unchanged"."""

    id: int
    action: StopAction | RewriteAction | None


@dataclass(frozen=True, slots=True)
class RespCallReply:
    """``A6.HTTPRespCall.Resp``; body is None where the field is absent."""

    id: int
    status: int
    headers: list[Entry]
    body: bytes | None


@dataclass(frozen=True, slots=True)
class ExtraInfoQuery:
    """``A6.ExtraInfo.Req``: name is the variable's name for "var", else None."""

    kind: InfoName
    name: str | None = None


def decode_error(payload: bytes) -> int:
    """``A6.Err.Resp``: the error code (an ``A6.Err.Code`` value)."""
    return int(_ErrResp.Resp.GetRootAs(payload, 0).Code())


def decode_prepare_conf_reply(payload: bytes) -> int:
    """``A6.PrepareConf.Resp``: the conf token."""
    return int(_PrepResp.Resp.GetRootAs(payload, 0).ConfToken())


def decode_req_call_reply(payload: bytes) -> ReqCallReply:
    resp = _ReqCallResp.Resp.GetRootAs(payload, 0)
    call_id = int(resp.Id())
    action_type = int(resp.ActionType())
    if action_type == _ACTION_NONE:
        return ReqCallReply(call_id, None)
    table = resp.Action()
    if table is None:
        raise ValueError(f"action type {action_type} without an action table")
    if action_type == _ACTION_STOP:
        stop = _sub_table(_Stop.Stop, table)
        body = _ubytes(stop, 8)
        return ReqCallReply(
            call_id,
            StopAction(
                status=int(stop.Status()),
                headers=_read_entries(int(stop.HeadersLength()), stop.Headers),
                body=b"" if body is None else body,
            ),
        )
    if action_type == _ACTION_REWRITE:
        rw = _sub_table(_Rewrite.Rewrite, table)
        return ReqCallReply(
            call_id,
            RewriteAction(
                path=_opt_untext(rw.Path()),
                headers=_read_entries(int(rw.HeadersLength()), rw.Headers),
                args=_read_entries(int(rw.ArgsLength()), rw.Args),
                resp_headers=_read_entries(int(rw.RespHeadersLength()), rw.RespHeaders),
                body=_ubytes(rw, 12),
            ),
        )
    raise ValueError(f"unknown HTTPReqCall action type {action_type}")


def decode_resp_call_reply(payload: bytes) -> RespCallReply:
    resp = _RespCallResp.Resp.GetRootAs(payload, 0)
    return RespCallReply(
        id=int(resp.Id()),
        status=int(resp.Status()),
        headers=_read_entries(int(resp.HeadersLength()), resp.Headers),
        body=_ubytes(resp, 10),
    )


def decode_extra_info_query(payload: bytes) -> ExtraInfoQuery:
    """``A6.ExtraInfo.Req``. Raises ValueError on an info type the gateway would reject."""
    req = _InfoReq.Req.GetRootAs(payload, 0)
    info_type = int(req.InfoType())
    kind = _INFO_KINDS.get(info_type)
    if kind is None:
        raise ValueError(f"unsupported ExtraInfo type {info_type}")
    if kind != "var":
        return ExtraInfoQuery(kind)
    table = req.Info()
    if table is None:
        # The gateway would index a nil variable name: nothing is found.
        return ExtraInfoQuery(kind, None)
    var = _sub_table(_InfoVar.Var, table)
    return ExtraInfoQuery(kind, _opt_untext(var.Name()))


# ============================================================= the runner's side
#
# The other direction: what a runner sends, built with the generated code, and what the
# gateway sends, read with it. Tests hold ``runner.protocol.messages``' gateway side (the
# client's and the bench's codec) to these.

_INFO_CODES: Final[dict[InfoName, int]] = {name: code for code, name in _INFO_KINDS.items()}


def encode_prepare_conf_reply(conf_token: int) -> bytes:
    builder = flatbuffers.Builder(32)
    _PrepResp.Start(builder)
    _PrepResp.AddConfToken(builder, conf_token)
    return _finish(builder, _PrepResp.End(builder))


def encode_error(code: int) -> bytes:
    builder = flatbuffers.Builder(32)
    _ErrResp.Start(builder)
    _ErrResp.AddCode(builder, code)
    return _finish(builder, _ErrResp.End(builder))


def encode_req_call_reply(call_id: int, action: StopAction | RewriteAction | None) -> bytes:
    """``A6.HTTPReqCall.Resp``; a Rewrite's path or body None is left out, as is a Stop's
    empty body."""
    builder = flatbuffers.Builder(256)
    kind = _ACTION_NONE
    table = None
    if isinstance(action, StopAction):
        kind = _ACTION_STOP
        headers = _text_entries(builder, action.headers, _Stop.StartHeadersVector)
        body = builder.CreateByteVector(action.body) if action.body else None
        _Stop.Start(builder)
        _Stop.AddStatus(builder, action.status)
        _Stop.AddHeaders(builder, headers)
        if body is not None:
            _Stop.AddBody(builder, body)
        table = _Stop.End(builder)
    elif isinstance(action, RewriteAction):
        kind = _ACTION_REWRITE
        path = None if action.path is None else builder.CreateString(_text(action.path))
        rw_headers = _text_entries(builder, action.headers, _Rewrite.StartHeadersVector)
        args = _text_entries(builder, action.args, _Rewrite.StartArgsVector)
        resp = _text_entries(builder, action.resp_headers, _Rewrite.StartRespHeadersVector)
        rw_body = None if action.body is None else builder.CreateByteVector(action.body)
        _Rewrite.Start(builder)
        if path is not None:
            _Rewrite.AddPath(builder, path)
        _Rewrite.AddHeaders(builder, rw_headers)
        _Rewrite.AddArgs(builder, args)
        _Rewrite.AddRespHeaders(builder, resp)
        if rw_body is not None:
            _Rewrite.AddBody(builder, rw_body)
        table = _Rewrite.End(builder)
    _ReqCallResp.Start(builder)
    _ReqCallResp.AddId(builder, call_id)
    _ReqCallResp.AddActionType(builder, kind)
    if table is not None:
        _ReqCallResp.AddAction(builder, table)
    return _finish(builder, _ReqCallResp.End(builder))


def encode_resp_call_reply(
    call_id: int, status: int, headers: Sequence[Entry], body: bytes | None
) -> bytes:
    builder = flatbuffers.Builder(256)
    headers_off = _text_entries(builder, headers, _RespCallResp.StartHeadersVector)
    body_off = None if body is None else builder.CreateByteVector(body)
    _RespCallResp.Start(builder)
    _RespCallResp.AddId(builder, call_id)
    _RespCallResp.AddStatus(builder, status)
    _RespCallResp.AddHeaders(builder, headers_off)
    if body_off is not None:
        _RespCallResp.AddBody(builder, body_off)
    return _finish(builder, _RespCallResp.End(builder))


def encode_extra_info_query(kind: InfoName, name: str | None = None) -> bytes:
    """``A6.ExtraInfo.Req``; a "var" query with name None has no Var table."""
    builder = flatbuffers.Builder(64)
    info = None
    if kind == "var":
        if name is not None:
            name_off = builder.CreateString(_text(name))
            _InfoVar.Start(builder)
            _InfoVar.AddName(builder, name_off)
            info = _InfoVar.End(builder)
    elif kind == "req_body":
        _InfoReqBody.Start(builder)
        info = _InfoReqBody.End(builder)
    else:
        _InfoRespBody.Start(builder)
        info = _InfoRespBody.End(builder)
    _InfoReq.Start(builder)
    _InfoReq.AddInfoType(builder, _INFO_CODES[kind])
    if info is not None:
        _InfoReq.AddInfo(builder, info)
    return _finish(builder, _InfoReq.End(builder))


def decode_prepare_conf(payload: bytes) -> tuple[list[Entry], str | None]:
    """``A6.PrepareConf.Req``: the entries and the key (None where absent)."""
    req = _PrepReq.Req.GetRootAs(payload, 0)
    return _read_entries(int(req.ConfLength()), req.Conf), _opt_untext(req.Key())


@dataclass(frozen=True, slots=True)
class GatewayReqCall:
    """``A6.HTTPReqCall.Req`` as decoded; src_ip is None where absent."""

    id: int
    src_ip: bytes | None
    method: str
    path: str | None
    args: list[Entry]
    headers: list[Entry]
    conf_token: int


def decode_req_call(payload: bytes) -> GatewayReqCall:
    req = _ReqCallReq.Req.GetRootAs(payload, 0)
    return GatewayReqCall(
        id=int(req.Id()),
        src_ip=_ubytes(req, 6),
        method=_METHODS[int(req.Method())],
        path=_opt_untext(req.Path()),
        args=_read_entries(int(req.ArgsLength()), req.Args),
        headers=_read_entries(int(req.HeadersLength()), req.Headers),
        conf_token=int(req.ConfToken()),
    )


@dataclass(frozen=True, slots=True)
class GatewayRespCall:
    """``A6.HTTPRespCall.Req`` as decoded."""

    id: int
    status: int
    headers: list[Entry]
    conf_token: int


def decode_resp_call(payload: bytes) -> GatewayRespCall:
    req = _RespCallReq.Req.GetRootAs(payload, 0)
    return GatewayRespCall(
        id=int(req.Id()),
        status=int(req.Status()),
        headers=_read_entries(int(req.HeadersLength()), req.Headers),
        conf_token=int(req.ConfToken()),
    )


def decode_extra_info_reply(payload: bytes) -> bytes | None:
    """``A6.ExtraInfo.Resp``: None where the result field is absent."""
    return _ubytes(_InfoResp.Resp.GetRootAs(payload, 0), 4)

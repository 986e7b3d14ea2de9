"""The protocol's messages as plain typed objects, decoded from and encoded to payloads.

This is the only module that knows the field layout of each FlatBuffers table (the
slot numbers below follow ``ext_plugin_proto/ext-plugin.fbs``). Requests are decoded
lazily: a call's id and conf token are read at once, everything else only when a
plugin asks for it. No I/O happens here.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from runner import flatbuf as fb
from runner.flatbuf import Entry, MalformedMessage

__all__ = [
    "METHOD_NAMES",
    "Entry",
    "ErrCode",
    "HTTPReqCall",
    "HTTPRespCall",
    "MalformedMessage",
    "PrepareConf",
    "Rewrite",
    "Stop",
    "decode_extra_info_reply",
    "decode_prepare_conf",
    "encode_error",
    "encode_extra_info_query",
    "encode_prepare_conf_reply",
    "encode_req_call_reply",
    "encode_resp_call_reply",
]


class ErrCode(IntEnum):
    """``A6.Err.Code``: what an error frame (RPC type 0) tells the gateway."""

    BAD_REQUEST = 0
    SERVICE_UNAVAILABLE = 1
    CONF_TOKEN_NOT_FOUND = 2


METHOD_NAMES: Final = (
    "GET", "HEAD", "POST", "PUT", "DELETE", "MKCOL", "COPY", "MOVE", "OPTIONS",
    "PROPFIND", "PROPPATCH", "LOCK", "UNLOCK", "PATCH", "TRACE",
)  # fmt: skip
METHOD_CODES: Final = {name: code for code, name in enumerate(METHOD_NAMES)}


def _guard(what: str, exc: Exception) -> MalformedMessage:
    return MalformedMessage(f"malformed {what}: {exc}")


# ------------------------------------------------------------------------ PrepareConf


@dataclass(frozen=True, slots=True)
class PrepareConf:
    """``A6.PrepareConf.Req``: the plugin chain of one route, in execution order."""

    conf: list[tuple[str, str]]  # (plugin name, plugin config as a JSON string)
    key: str


def decode_prepare_conf(payload: bytes) -> PrepareConf:
    try:
        conf_pos, key_pos = fb.root_fields(payload, 2)
        conf = [(name, value or "") for name, value in fb.read_text_entries(payload, conf_pos)]
        return PrepareConf(conf, fb.read_str(payload, key_pos) or "")
    except MalformedMessage:
        raise
    except (ValueError, IndexError, struct.error) as exc:
        raise _guard("PrepareConf request", exc) from exc


def encode_prepare_conf_reply(conf_token: int) -> bytes:
    return fb.build(((0, fb.U32, conf_token),))


# ------------------------------------------------------------------------------- Err


_ERROR_PAYLOADS: Final = {code: fb.build(((0, fb.U8, int(code)),)) for code in ErrCode}


def encode_error(code: ErrCode) -> bytes:
    return _ERROR_PAYLOADS[code]


# ----------------------------------------------------------------------- HTTPReqCall


class HTTPReqCall:
    """``A6.HTTPReqCall.Req``, decoded lazily: fields are read when first used."""

    __slots__ = ("_args", "_buf", "_fields", "_headers", "conf_token", "id")

    def __init__(self, payload: bytes) -> None:
        try:
            fields = fb.root_fields(payload, 7)
            self.id = fb.read_u32(payload, fields[0])
            self.conf_token = fb.read_u32(payload, fields[6])
        except MalformedMessage:
            raise
        except (ValueError, IndexError, struct.error) as exc:
            raise _guard("HTTPReqCall request", exc) from exc
        self._buf = payload
        self._fields = fields
        self._args: list[Entry] | None = None
        self._headers: list[Entry] | None = None

    @property
    def method(self) -> str:
        code = fb.read_u8(self._buf, self._fields[2])
        return METHOD_NAMES[code] if code < len(METHOD_NAMES) else f"METHOD_{code}"

    @property
    def src_ip(self) -> bytes:
        """The client address: 4 bytes (IPv4), 16 bytes (IPv6), or empty if not sent."""
        try:
            return fb.read_bytes(self._buf, self._fields[1]) or b""
        except (ValueError, IndexError, struct.error) as exc:
            raise _guard("HTTPReqCall src_ip", exc) from exc

    @property
    def path(self) -> str:
        try:
            return fb.read_str(self._buf, self._fields[3]) or ""
        except (ValueError, IndexError, struct.error) as exc:
            raise _guard("HTTPReqCall path", exc) from exc

    @property
    def args(self) -> list[Entry]:
        """Query args in arrival order; ``?flag`` has value None, ``?flag=`` has ``""``."""
        if self._args is None:
            try:
                self._args = fb.read_text_entries(self._buf, self._fields[4])
            except (ValueError, IndexError, struct.error) as exc:
                raise _guard("HTTPReqCall args", exc) from exc
        return self._args

    @property
    def headers(self) -> list[Entry]:
        """Request headers in arrival order, one entry per value."""
        if self._headers is None:
            try:
                self._headers = fb.read_text_entries(self._buf, self._fields[5])
            except (ValueError, IndexError, struct.error) as exc:
                raise _guard("HTTPReqCall headers", exc) from exc
        return self._headers


@dataclass(frozen=True, slots=True)
class Stop:
    """``A6.HTTPReqCall.Stop``: the gateway answers the client itself."""

    status: int = 200
    headers: Sequence[tuple[str, str]] = ()
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class Rewrite:
    """``A6.HTTPReqCall.Rewrite``: the changes to make to the request before proxying."""

    path: str | None = None
    headers: Sequence[Entry] = ()  # value None deletes the header
    args: Sequence[Entry] = ()  # value None deletes the arg
    resp_headers: Sequence[tuple[str, str]] = ()
    body: bytes | None = None


_ACTION_STOP: Final = 1
_ACTION_REWRITE: Final = 2


def encode_req_call_reply(call_id: int, action: Stop | Rewrite | None) -> bytes:
    """``A6.HTTPReqCall.Resp``. No action means "pass the request through unchanged"."""
    if action is None:
        return fb.build(((0, fb.U32, call_id),))
    spec: list[fb.Field]
    if isinstance(action, Stop):
        spec = [(0, fb.U16, action.status)]
        if action.headers:
            spec.append((1, fb.TABLES, fb.text_entries(action.headers)))
        if action.body:
            spec.append((2, fb.BYTES, action.body))
        kind = _ACTION_STOP
    else:
        spec = []
        if action.path is not None:
            spec.append((0, fb.BYTES, action.path))
        if action.headers:
            spec.append((1, fb.TABLES, fb.text_entries(action.headers)))
        if action.args:
            spec.append((2, fb.TABLES, fb.text_entries(action.args)))
        if action.resp_headers:
            spec.append((3, fb.TABLES, fb.text_entries(action.resp_headers)))
        if action.body is not None:
            spec.append((4, fb.BYTES, action.body))
        kind = _ACTION_REWRITE
    return fb.build(((0, fb.U32, call_id), (1, fb.U8, kind), (2, fb.TABLE, spec)))


# ---------------------------------------------------------------------- HTTPRespCall


class HTTPRespCall:
    """``A6.HTTPRespCall.Req``: the upstream's response, decoded lazily."""

    __slots__ = ("_buf", "_fields", "_headers", "conf_token", "id", "status")

    def __init__(self, payload: bytes) -> None:
        try:
            fields = fb.root_fields(payload, 4)
            self.id = fb.read_u32(payload, fields[0])
            self.status = fb.read_u16(payload, fields[1])
            self.conf_token = fb.read_u32(payload, fields[3])
        except MalformedMessage:
            raise
        except (ValueError, IndexError, struct.error) as exc:
            raise _guard("HTTPRespCall request", exc) from exc
        self._buf = payload
        self._fields = fields
        self._headers: list[Entry] | None = None

    @property
    def headers(self) -> list[Entry]:
        if self._headers is None:
            try:
                self._headers = fb.read_text_entries(self._buf, self._fields[2])
            except (ValueError, IndexError, struct.error) as exc:
                raise _guard("HTTPRespCall headers", exc) from exc
        return self._headers


def encode_resp_call_reply(
    call_id: int,
    status: int = 0,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes | None = None,
) -> bytes:
    """``A6.HTTPRespCall.Resp``.

    The gateway reads it this way: status 0 keeps the upstream status; a non-empty
    header list REPLACES every upstream header; an empty body keeps the upstream body.
    """
    spec: list[fb.Field] = [(0, fb.U32, call_id)]
    if status:
        spec.append((1, fb.U16, status))
    if headers:
        spec.append((2, fb.TABLES, fb.text_entries(headers)))
    if body:
        spec.append((3, fb.BYTES, body))
    return fb.build(spec)


# ------------------------------------------------------------------------- ExtraInfo


class InfoKind(IntEnum):
    """``A6.ExtraInfo.Info``: what the runner may ask the gateway for during a call."""

    VAR = 1
    REQ_BODY = 2
    RESP_BODY = 3


def encode_extra_info_query(kind: InfoKind, name: str = "") -> bytes:
    """``A6.ExtraInfo.Req``: ask for an nginx variable (by name) or a body."""
    info: list[fb.Field] = [(0, fb.BYTES, name)] if kind is InfoKind.VAR else []
    return fb.build(((0, fb.U8, int(kind)), (1, fb.TABLE, info)))


def decode_extra_info_reply(payload: bytes) -> bytes | None:
    """``A6.ExtraInfo.Resp``: None means "no such value", ``b""`` means "empty"."""
    try:
        (result_pos,) = fb.root_fields(payload, 1)
        return fb.read_bytes(payload, result_pos)
    except MalformedMessage:
        raise
    except (ValueError, IndexError, struct.error) as exc:
        raise _guard("ExtraInfo reply", exc) from exc

"""The protocol's messages as plain typed objects, decoded from and encoded to payloads.

This is the only module that knows the field layout of each FlatBuffers table (the
slot numbers below follow ``ext_plugin_proto/ext-plugin.fbs``). Requests are decoded
lazily: a call's id and conf token are read at once, everything else only when a
plugin asks for it. No I/O happens here.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, ClassVar, Final, TypeAlias

from runner.protocol import flatbuf as fb
from runner.protocol.flatbuf import Entry, MalformedMessage
from runner.protocol.frame import MAX_PAYLOAD, RPC, FrameTooLarge, encode_header

__all__ = [
    "METHOD_NAMES",
    "Entry",
    "ErrCode",
    "ExtraInfoQuery",
    "HTTPReqCall",
    "HTTPRespCall",
    "MalformedMessage",
    "PrepareConf",
    "ReqCallReply",
    "RespCallReply",
    "Rewrite",
    "Stop",
    "decode_error",
    "decode_extra_info_query",
    "decode_extra_info_reply",
    "decode_prepare_conf",
    "decode_prepare_conf_reply",
    "decode_req_call_reply",
    "decode_resp_call_reply",
    "encode_error",
    "encode_extra_info_query",
    "encode_extra_info_reply",
    "encode_pass_through_reply",
    "encode_prepare_conf",
    "encode_prepare_conf_reply",
    "encode_req_call",
    "encode_req_call_reply",
    "encode_resp_call",
    "encode_resp_call_reply",
    "encode_rewrite_reply",
    "encode_stop_frame",
    "encode_stop_reply",
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

    __slots__ = ("_args", "_buf", "_headers", "_offsets", "_pos", "conf_token", "id")
    _args: list[Entry] | None
    _headers: list[Entry] | None
    _offsets: tuple[int, ...]

    def __init__(self, payload: bytes) -> None:
        # A call laid out like one seen before (the gateway builds every call alike):
        # its first bytes give where everything is.
        layout = _REQ_LAYOUTS.get(payload[:_LAYOUT_KEY])
        if layout is not None and layout[0] <= len(payload):
            first, second = layout[1](payload)
            if layout[2]:
                self.conf_token = first
                self.id = second
            else:
                self.id = first
                self.conf_token = second
            self._offsets = layout[3]
            self._pos = _LAYOUT_KEY - 4
        else:
            self._pos = self._decode(payload)
        self._buf = payload
        self._args = None
        self._headers = None

    def _decode(self, payload: bytes) -> int:
        """Read the call the long way, checking every offset; learn its layout."""
        try:
            pos, offsets = fb.root_offsets(payload, 7)
            id_off = offsets[0]
            token_off = offsets[6]
            size = len(payload)
            if pos + id_off + 4 > size or pos + token_off + 4 > size:
                raise MalformedMessage("the call id or conf token lies outside the message")
            self.id = _u32(payload, pos + id_off)[0] if id_off else 0
            self.conf_token = _u32(payload, pos + token_off)[0] if token_off else 0
            self._offsets = offsets
            _learn_req_layout(payload, pos, offsets)
        except MalformedMessage:
            raise
        except (ValueError, IndexError, struct.error) as exc:
            raise _guard("HTTPReqCall request", exc) from exc
        return pos

    def _field(self, slot: int) -> int:
        offset = self._offsets[slot]
        return self._pos + offset if offset else 0

    @property
    def method(self) -> str:
        code = fb.read_u8(self._buf, self._field(2))
        return METHOD_NAMES[code] if code < len(METHOD_NAMES) else f"METHOD_{code}"

    @property
    def src_ip(self) -> bytes:
        """The client address: 4 bytes (IPv4), 16 bytes (IPv6), or empty if not sent."""
        try:
            return fb.read_bytes(self._buf, self._field(1)) or b""
        except (ValueError, IndexError, struct.error) as exc:
            raise _guard("HTTPReqCall src_ip", exc) from exc

    @property
    def path(self) -> str:
        try:
            return fb.read_str(self._buf, self._field(3)) or ""
        except (ValueError, IndexError, struct.error) as exc:
            raise _guard("HTTPReqCall path", exc) from exc

    @property
    def args(self) -> list[Entry]:
        """Query args in arrival order; ``?flag`` has value None, ``?flag=`` has ``""``."""
        if self._args is None:
            try:
                self._args = fb.read_text_entries(self._buf, self._field(4))
            except (ValueError, IndexError, struct.error) as exc:
                raise _guard("HTTPReqCall args", exc) from exc
        return self._args

    @property
    def headers(self) -> list[Entry]:
        """Request headers in arrival order, one entry per value."""
        if self._headers is None:
            try:
                self._headers = fb.read_text_entries(self._buf, self._field(5))
            except (ValueError, IndexError, struct.error) as exc:
                raise _guard("HTTPReqCall headers", exc) from exc
        return self._headers


# HTTPReqCall layouts seen, by the message's first 28 bytes: (where the root table ends,
# the reader of the call id and conf token in the order they lie, True if that is token
# first, the seven field offsets). The gateway's calls start alike: the root offset (24),
# padding, the root table's vtable of seven fields, then the table, whose first 4 bytes
# (its vtable offset) end the key. So the key holds the vtable, and with it every
# offset. Only layouts that passed every check of the long way are kept, and a call is
# read through one only if its table fits in its message. Calls laid out otherwise are
# always read the long way.
_ReqLayout: TypeAlias = tuple[int, Callable[[bytes], tuple[int, ...]], bool, tuple[int, ...]]
_REQ_LAYOUTS: dict[bytes, _ReqLayout] = {}
_LAYOUT_KEY: Final = 28
_MAX_LAYOUTS: Final = 64


def _learn_req_layout(payload: bytes, pos: int, offsets: tuple[int, ...]) -> None:
    vt = pos - _i32(payload, pos)[0]
    vt_size, table_size = fb.read_u16(payload, vt), fb.read_u16(payload, vt + 2)
    id_off = offsets[0]
    token_off = offsets[6]
    low, high = sorted((id_off, token_off))
    if (
        pos + 4 != _LAYOUT_KEY
        or vt < 4
        or vt + vt_size > pos
        or not low
        or low + 4 > high
        or high + 4 > table_size
    ):
        return
    if len(_REQ_LAYOUTS) >= _MAX_LAYOUTS:
        _REQ_LAYOUTS.clear()
    reader = struct.Struct(f"<{pos + low}xI{high - low - 4}xI").unpack_from
    key = payload[:_LAYOUT_KEY]
    _REQ_LAYOUTS[key] = (pos + table_size, reader, token_off < id_off, offsets)


@dataclass(frozen=True)
class Stop:
    """``A6.HTTPReqCall.Stop``: the gateway answers the client itself."""

    status: int = 200
    headers: Sequence[tuple[str, str]] = ()
    body: bytes = b""  # b"" means "no body"
    # Its reply frame before and after the call id, set on the instance on first use: a
    # Stop is immutable, and one sent again (a plugin answering with the same response)
    # costs only the call id's bytes. Not a field: not part of the value, its repr or
    # asdict() (hence no slots: the instance keeps it in its __dict__).
    _encoded: ClassVar[tuple[bytes, bytes] | None] = None

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (any case), or None."""
        key = name.lower()
        return next((v for n, v in self.headers if n.lower() == key), None)

    @property
    def text(self) -> str:
        """The body as UTF-8 text."""
        return self.body.decode()

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)


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
_U32_LIMIT: Final = 1 << 32
_U16_LIMIT: Final = 1 << 16
_pack_u32 = struct.Struct("<I").pack
_u32 = struct.Struct("<I").unpack_from
_i32 = struct.Struct("<i").unpack_from

# Replies are written straight into their final layout, the one ``fb.build`` produces
# (the tests compare the two byte for byte). Every HTTPReqCall.Resp with an action
# starts alike: root offset, Resp's vtable [id, action_type, action] and table, then
# the action table right after it at offset 32.
_RESP_HEAD: Final = struct.Struct("<IHHHHHxxiIII")
_PASS_THROUGH_HEAD: Final = fb.build(((0, fb.U32, 0),))[:-4]  # all of it but the id
# Every Stop reply starts alike: the root offset, the Resp's vtable [id, action_type,
# action] and the Resp table up to its call id. What follows the id (the action type,
# the Stop's vtable and table, the header and body vectors) is the Stop's own.
_STOP_HEAD: Final = struct.Struct("<IHHHHHxxi").pack(16, 10, 16, 4, 8, 12, 12)
# What follows the call id, for a Stop without headers, with and without a body (a body
# follows as a [ubyte] vector) ...
_STOP_BARE: Final = struct.Struct("<IIHHHxxiI")
_STOP_WITH_BODY: Final = struct.Struct("<IIHHHHHxxiII")
# ... and with headers, without and with a body: the header vector (and the body's)
# follow.
_STOP_HEADERS: Final = struct.Struct("<IIHHHHiII")
_STOP_HEADERS_BODY: Final = struct.Struct("<IIHHHHHxxiIII")


def encode_req_call_reply(call_id: int, action: Stop | Rewrite | None) -> bytes:
    """``A6.HTTPReqCall.Resp``. No action means "pass the request through unchanged"."""
    if not 0 <= call_id < _U32_LIMIT:
        raise ValueError(f"call id {call_id} does not fit a uint32")
    if action is None:
        return _PASS_THROUGH_HEAD + _pack_u32(call_id)
    if isinstance(action, Stop):
        return encode_stop_reply(call_id, action)
    return _encode_rewrite(call_id, action)


def encode_stop_reply(call_id: int, stop: Stop) -> bytes:
    """``encode_req_call_reply(call_id, stop)``, for an id known to fit a uint32."""
    return _STOP_HEAD + _pack_u32(call_id) + _stop_parts(stop)[1]


def encode_stop_frame(call_id: int, stop: Stop) -> bytes:
    """The whole frame (header included) of ``stop``'s HTTPReqCall reply, for an id
    known to fit a uint32: a Stop sent again costs only its call id's bytes. Raises
    FrameTooLarge if it cannot be framed."""
    parts = stop._encoded
    if parts is None:
        parts = _stop_parts(stop)
    if not parts[0]:
        raise FrameTooLarge(len(_STOP_HEAD) + 4 + len(parts[1]), MAX_PAYLOAD)
    return parts[0] + _pack_u32(call_id) + parts[1]


def _stop_parts(stop: Stop) -> tuple[bytes, bytes]:
    """A Stop reply's frame, up to its call id (frame header included) and after it."""
    parts = stop._encoded
    if parts is None:
        tail = _encode_stop(stop)
        size = len(_STOP_HEAD) + 4 + len(tail)
        # (Empty if it cannot be framed: encode_stop_frame says so, the payload is made.)
        head = encode_header(RPC.HTTP_REQ_CALL, size) + _STOP_HEAD if size <= MAX_PAYLOAD else b""
        parts = (head, tail)
        # The memo of a frozen value; not for headers in a list, which could change.
        if type(stop.headers) is tuple and type(stop.body) is bytes:
            object.__setattr__(stop, "_encoded", parts)
    return parts


def _encode_stop(stop: Stop) -> bytes:
    """A Stop reply's bytes after the call id: the layout ``fb.build`` gives (the tests
    compare the two byte for byte), written straight in place."""
    status = stop.status
    if not 0 <= status < _U16_LIMIT:
        raise ValueError(f"status {status} does not fit a uint16")
    body = stop.body
    if not stop.headers:
        if not body:
            # Stop table at 40: uoffset 40 - 28 = 12.
            return _STOP_BARE.pack(1, 12, 6, 8, 4, 8, status)
        # Stop table at 44 (uoffset 16); its body slot at 52 points to the vector at 56.
        head = _STOP_WITH_BODY.pack(1, 16, 10, 12, 4, 0, 8, 12, status, 4)
        return b"".join((head, _pack_u32(len(body)), body, fb.BYTES_PAD[len(body) & 3]))
    # With headers: the Stop table in one pack, then the header vector (and the body's):
    # the layout table_blob gives, without its per-field loop.
    entries = fb.entries_blob(stop.headers)
    if not body:
        # Stop table at 40 (uoffset 12): [status, headers -> right after the table].
        return _STOP_HEADERS.pack(1, 12, 8, 12, 4, 8, 8, status, 4) + entries
    # Stop table at 44 (uoffset 16): [status, headers, body after the header vector].
    head = _STOP_HEADERS_BODY.pack(1, 16, 10, 16, 4, 8, 12, 12, status, 8, 4 + len(entries))
    return b"".join((head, entries, _pack_u32(len(body)), body, fb.BYTES_PAD[len(body) & 3]))


def _encode_rewrite(call_id: int, rw: Rewrite) -> bytes:
    return encode_rewrite_reply(call_id, rw.path, rw.headers, rw.args, rw.resp_headers, rw.body)


def encode_pass_through_reply(call_id: int) -> bytes:
    """``encode_req_call_reply(call_id, None)``, for an id known to fit a uint32."""
    return _PASS_THROUGH_HEAD + _pack_u32(call_id)


def encode_rewrite_reply(
    call_id: int,
    path: str | None,
    headers: Sequence[Entry],
    args: Sequence[Entry],
    resp_headers: Sequence[tuple[str, str]],
    body: bytes | None,
) -> bytes:
    """``encode_req_call_reply`` of a Rewrite made of these parts, without making one.

    For an id known to fit a uint32 (the request's own). The usual rewrite changes
    request headers only: its Resp and Rewrite tables are one constant layout.
    """
    if headers and path is None and not args and not resp_headers and body is None:
        return b"".join(
            (
                _RESP_HEAD.pack(16, 10, 16, 4, 8, 12, 12, call_id, _ACTION_REWRITE, 12),
                _REWRITE_HEADERS_ONLY,
                fb.entries_blob(headers),
            )
        )
    fields: list[tuple[int, int | fb.Child]] = []
    if path is not None:
        fields.append((0, (fb.str_blob(path), 0)))
    if headers:
        fields.append((1, (fb.entries_blob(headers), 0)))
    if args:
        fields.append((2, (fb.entries_blob(args), 0)))
    if resp_headers:
        fields.append((3, (fb.entries_blob(resp_headers), 0)))
    if body is not None:
        fields.append((4, (fb.bytes_blob(body), 0)))
    return _resp_with_action(call_id, _ACTION_REWRITE, fb.table_blob(fields))


# A Rewrite table whose only field is the headers vector, as table_blob lays it out:
# vtable [8 bytes, table 8 bytes, path absent, headers at 4], table [soffset 8, uoffset
# 4 to the vector right after it].
_REWRITE_HEADERS_ONLY: Final = struct.pack("<HHHHiI", 8, 8, 0, 4, 8, 4)


def _resp_with_action(call_id: int, kind: int, action: fb.Child) -> bytes:
    blob, inner = action
    # The action table lies at 32 + inner; its uoffset is stored at 28.
    return _RESP_HEAD.pack(16, 10, 16, 4, 8, 12, 12, call_id, kind, 4 + inner) + blob


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
    if not 0 <= call_id < _U32_LIMIT:
        raise ValueError(f"call id {call_id} does not fit a uint32")
    fields: list[tuple[int, int | fb.Child]] = [(0, call_id)]
    if status:
        if not 0 <= status < _U16_LIMIT:
            raise ValueError(f"status {status} does not fit a uint16")
        fields.append((1, status))
    if headers:
        fields.append((2, (fb.entries_blob(headers), 0)))
    if body:
        fields.append((3, (fb.bytes_blob(body), 0)))
    return fb.finish(fb.table_blob(fields))


# ------------------------------------------------------------------------- ExtraInfo


class InfoKind(IntEnum):
    """``A6.ExtraInfo.Info``: what the runner may ask the gateway for during a call."""

    VAR = 1
    REQ_BODY = 2
    RESP_BODY = 3


def encode_extra_info_query(kind: InfoKind, name: str = "") -> bytes:
    """``A6.ExtraInfo.Req``: ask for an nginx variable (by name) or a body."""
    info: list[tuple[int, int | fb.Child]] = (
        [(0, (fb.str_blob(name), 0))] if kind is InfoKind.VAR else []
    )
    return fb.finish(fb.table_blob([(0, int(kind)), (1, fb.table_blob(info))]))


def decode_extra_info_reply(payload: bytes) -> bytes | None:
    """``A6.ExtraInfo.Resp``: None means "no such value", ``b""`` means "empty"."""
    try:
        return fb.root_bytes(payload)
    except MalformedMessage:
        raise
    except (ValueError, IndexError, struct.error) as exc:
        raise _guard("ExtraInfo reply", exc) from exc


# ===================================================================== the gateway's side
#
# What the gateway sends and how it reads the runner's replies, on the same codec: the
# test client and the load generator speak through these, so a serving runner and its
# tools share one message model. The encoders keep the gateway's habits where a runner
# could notice them: id 0 and GET are left out of the table (FlatBuffers defaults), an
# arg without value has no value field, args and headers are always sent (possibly
# empty), and an empty PrepareConf list is no list at all. The decoders check every
# offset they follow: a runner under test that answers garbage raises MalformedMessage.

_LOCALHOST: Final = b"\x7f\x00\x00\x01"


def encode_prepare_conf(conf: Sequence[tuple[str, str]], key: str = "") -> bytes:
    """``A6.PrepareConf.Req``: one ``(plugin name, JSON config)`` entry per plugin."""
    fields: list[tuple[int, int | fb.Child]] = []
    if conf:
        fields.append((0, (fb.entries_blob(conf), 0)))
    fields.append((1, (fb.str_blob(key), 0)))
    return fb.finish(fb.table_blob(fields))


def decode_prepare_conf_reply(payload: bytes) -> int:
    """``A6.PrepareConf.Resp``: the conf token."""
    try:
        return fb.read_u32(payload, fb.root_fields(payload, 1)[0])
    except MalformedMessage:
        raise
    except (ValueError, IndexError, struct.error) as exc:
        raise _guard("PrepareConf reply", exc) from exc


def decode_error(payload: bytes) -> int:
    """``A6.Err.Resp``: the error code, an ``ErrCode`` value if the runner keeps to the
    schema (an unknown code is returned as it is, for the caller to report)."""
    try:
        return fb.read_u8(payload, fb.root_fields(payload, 1)[0])
    except MalformedMessage:
        raise
    except (ValueError, IndexError, struct.error) as exc:
        raise _guard("error reply", exc) from exc


def _u32_field(value: int, what: str) -> int:
    if not 0 <= value < _U32_LIMIT:
        raise ValueError(f"{what} {value} does not fit a uint32")
    return value


def encode_req_call(
    *,
    conf_token: int,
    id: int = 0,
    method: str = "GET",
    path: str = "/",
    args: Sequence[Entry] = (),
    headers: Sequence[tuple[str, str]] = (),
    src_ip: bytes = _LOCALHOST,
) -> bytes:
    """``A6.HTTPReqCall.Req``. An arg whose value is None is sent without one (``?flag``)."""
    code = METHOD_CODES.get(method)
    if code is None:
        raise ValueError(f"the gateway cannot send method {method!r}")
    fields: list[tuple[int, int | fb.Child]] = []
    if id:
        fields.append((0, _u32_field(id, "call id")))
    fields.append((1, (fb.bytes_blob(src_ip), 0)))
    if code:
        fields.append((2, code))
    fields.append((3, (fb.str_blob(path), 0)))
    fields.append((4, (fb.entries_blob(args), 0)))
    fields.append((5, (fb.entries_blob(headers), 0)))
    if conf_token:
        fields.append((6, _u32_field(conf_token, "conf token")))
    return fb.finish(fb.table_blob(fields))


@dataclass(frozen=True, slots=True)
class ReqCallReply:
    """``A6.HTTPReqCall.Resp`` as the gateway reads it; action None means "pass through"."""

    id: int
    action: Stop | Rewrite | None


def decode_req_call_reply(payload: bytes) -> ReqCallReply:
    """``A6.HTTPReqCall.Resp`` into the runner's own ``Stop`` and ``Rewrite``.

    Sequences come back as tuples. Header entries without value read as ``""`` in a
    Stop's headers and a Rewrite's resp_headers (those models hold plain pairs); request
    headers and args keep None ("delete"). An absent Stop body reads as ``b""`` (no body,
    as for the gateway); an absent Rewrite path or body as None (unchanged). An action
    type the schema does not know is malformed: the gateway would ignore the action.
    """
    try:
        call_id_pos, kind_pos, action_pos = fb.root_fields(payload, 3)
        call_id = fb.read_u32(payload, call_id_pos)
        kind = fb.read_u8(payload, kind_pos)
        if kind == 0:
            return ReqCallReply(call_id, None)
        if kind not in (_ACTION_STOP, _ACTION_REWRITE):
            raise MalformedMessage(f"unknown HTTPReqCall action type {kind}")
        if not action_pos:
            raise MalformedMessage(f"action type {kind} without an action table")
        table = fb.deref(payload, action_pos)
        if kind == _ACTION_STOP:
            status_pos, headers_pos, body_pos = fb.table_fields(payload, table, 3)
            stop = Stop(
                status=fb.read_u16(payload, status_pos),
                headers=_pairs(fb.read_text_entries(payload, headers_pos)),
                body=fb.read_bytes(payload, body_pos) or b"",
            )
            return ReqCallReply(call_id, stop)
        path_pos, headers_pos, args_pos, resp_pos, body_pos = fb.table_fields(payload, table, 5)
        rewrite = Rewrite(
            path=fb.read_str(payload, path_pos),
            headers=tuple(fb.read_text_entries(payload, headers_pos)),
            args=tuple(fb.read_text_entries(payload, args_pos)),
            resp_headers=_pairs(fb.read_text_entries(payload, resp_pos)),
            body=fb.read_bytes(payload, body_pos),
        )
        return ReqCallReply(call_id, rewrite)
    except MalformedMessage:
        raise
    except (ValueError, IndexError, struct.error) as exc:
        raise _guard("HTTPReqCall reply", exc) from exc


def _pairs(entries: list[Entry]) -> tuple[tuple[str, str], ...]:
    return tuple((name, value or "") for name, value in entries)


def encode_resp_call(
    *,
    conf_token: int,
    id: int = 0,
    status: int = 200,
    headers: Sequence[tuple[str, str]] = (),
) -> bytes:
    """``A6.HTTPRespCall.Req``: the upstream response's status and headers."""
    if not 0 <= status < _U16_LIMIT:
        raise ValueError(f"status {status} does not fit a uint16")
    fields: list[tuple[int, int | fb.Child]] = []
    if id:
        fields.append((0, _u32_field(id, "call id")))
    if status:
        fields.append((1, status))
    fields.append((2, (fb.entries_blob(headers), 0)))
    if conf_token:
        fields.append((3, _u32_field(conf_token, "conf token")))
    return fb.finish(fb.table_blob(fields))


@dataclass(frozen=True, slots=True)
class RespCallReply:
    """``A6.HTTPRespCall.Resp`` as the gateway reads it: status 0 keeps the upstream's,
    empty headers keep the upstream's (any other list replaces them all), body None or
    ``b""`` keeps the upstream's."""

    id: int
    status: int
    headers: tuple[Entry, ...]
    body: bytes | None


def decode_resp_call_reply(payload: bytes) -> RespCallReply:
    try:
        call_id_pos, status_pos, headers_pos, body_pos = fb.root_fields(payload, 4)
        return RespCallReply(
            id=fb.read_u32(payload, call_id_pos),
            status=fb.read_u16(payload, status_pos),
            headers=tuple(fb.read_text_entries(payload, headers_pos)),
            body=fb.read_bytes(payload, body_pos),
        )
    except MalformedMessage:
        raise
    except (ValueError, IndexError, struct.error) as exc:
        raise _guard("HTTPRespCall reply", exc) from exc


@dataclass(frozen=True, slots=True)
class ExtraInfoQuery:
    """``A6.ExtraInfo.Req``: ``name`` is the variable's name for ``InfoKind.VAR``
    (None if the runner sent no Var table), else None."""

    kind: InfoKind
    name: str | None = None


def decode_extra_info_query(payload: bytes) -> ExtraInfoQuery:
    """``A6.ExtraInfo.Req``. An info type the schema does not know is malformed: the
    gateway aborts the call and closes the connection."""
    try:
        kind_pos, info_pos = fb.root_fields(payload, 2)
        code = fb.read_u8(payload, kind_pos)
        try:
            kind = InfoKind(code)
        except ValueError:
            raise MalformedMessage(f"unknown ExtraInfo type {code}") from None
        if kind is not InfoKind.VAR:
            return ExtraInfoQuery(kind)
        if not info_pos:
            return ExtraInfoQuery(kind)
        (name_pos,) = fb.table_fields(payload, fb.deref(payload, info_pos), 1)
        return ExtraInfoQuery(kind, fb.read_str(payload, name_pos))
    except MalformedMessage:
        raise
    except (ValueError, IndexError, struct.error) as exc:
        raise _guard("ExtraInfo query", exc) from exc


def encode_extra_info_reply(result: bytes | None) -> bytes:
    """``A6.ExtraInfo.Resp``. None sends no result field ("no such value"); ``b""``
    sends an empty one (the value exists and is empty)."""
    if result is None:
        return _EXTRA_INFO_NO_RESULT
    return fb.finish(fb.table_blob([(0, (fb.bytes_blob(result), 0))]))


_EXTRA_INFO_NO_RESULT: Final = fb.finish(fb.table_blob([]))

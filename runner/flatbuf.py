"""Just enough FlatBuffers to read and write the protocol's messages quickly.

The generic ``flatbuffers`` package costs well over 100 us per message in Python; the
runner's hot path instead reads fields straight out of the payload with ``struct`` and
writes replies front to back into one ``bytearray``. The generated code in
``ext_plugin_proto`` stays the reference: tests check that both agree field for field.

Reading validates every offset it follows, so a malformed payload raises
MalformedMessage (the peer's fault) instead of reading outside the buffer.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Final, TypeAlias

_U16: Final = struct.Struct("<H")
_U32: Final = struct.Struct("<I")
_I32: Final = struct.Struct("<i")
_u16 = _U16.unpack_from
_u32 = _U32.unpack_from
_i32 = _I32.unpack_from
_pack_u32 = _U32.pack


class MalformedMessage(ValueError):
    """The peer sent a payload that is not a valid FlatBuffers message of the expected type."""


# ---------------------------------------------------------------------------- reading


def root_fields(buf: bytes, nslots: int) -> list[int]:
    """Absolute positions of the root table's fields ``0..nslots-1`` (0 where absent)."""
    if len(buf) < 4:
        raise MalformedMessage(f"message of {len(buf)} bytes is too short for a FlatBuffer")
    return table_fields(buf, _u32(buf, 0)[0], nslots)


def table_fields(buf: bytes, pos: int, nslots: int) -> list[int]:
    """Absolute positions of the fields of the table at ``pos`` (0 where absent)."""
    size = len(buf)
    if pos + 4 > size:
        raise MalformedMessage(f"table offset {pos} is outside the {size}-byte message")
    vt = pos - _i32(buf, pos)[0]
    if vt < 0 or vt + 4 > size:
        raise MalformedMessage(f"vtable offset {vt} is outside the {size}-byte message")
    vt_size, table_size = struct.unpack_from("<HH", buf, vt)
    if vt_size < 4 or vt + vt_size > size or pos + table_size > size:
        raise MalformedMessage("vtable or table runs past the end of the message")
    present = min(nslots, (vt_size - 4) >> 1)
    offsets = struct.unpack_from(f"<{present}H", buf, vt + 4)
    out = [pos + o if o else 0 for o in offsets]
    if present < nslots:
        out.extend([0] * (nslots - present))
    for o in offsets:
        if o >= table_size:
            raise MalformedMessage(f"a field offset ({o}) lies outside its {table_size}-byte table")
    return out


def read_u8(buf: bytes, field_pos: int) -> int:
    return buf[field_pos] if field_pos else 0


def read_u16(buf: bytes, field_pos: int) -> int:
    if not field_pos:
        return 0
    _check(buf, field_pos, 2)
    value: int = _u16(buf, field_pos)[0]
    return value


def read_u32(buf: bytes, field_pos: int) -> int:
    if not field_pos:
        return 0
    _check(buf, field_pos, 4)
    value: int = _u32(buf, field_pos)[0]
    return value


def deref(buf: bytes, field_pos: int) -> int:
    """Follow the uoffset stored at ``field_pos``."""
    _check(buf, field_pos, 4)
    target: int = field_pos + _u32(buf, field_pos)[0]
    if target >= len(buf):
        raise MalformedMessage(f"offset at {field_pos} points outside the message")
    return target


def read_bytes(buf: bytes, field_pos: int) -> bytes | None:
    """A string or ``[ubyte]`` field; None where the field is absent."""
    if not field_pos:
        return None
    start = deref(buf, field_pos)
    _check(buf, start, 4)
    length: int = _u32(buf, start)[0]
    end = start + 4 + length
    if end > len(buf):
        raise MalformedMessage(f"vector at {start} of {length} bytes runs past the message end")
    return bytes(buf[start + 4 : end])


def read_str(buf: bytes, field_pos: int) -> str | None:
    """A string field, decoded as UTF-8; bytes that are not UTF-8 survive as surrogates.

    HTTP header values are not always UTF-8; ``surrogateescape`` keeps them intact both
    ways instead of failing the request.
    """
    raw = read_bytes(buf, field_pos)
    return None if raw is None else raw.decode("utf-8", "surrogateescape")


def read_table_vector(buf: bytes, field_pos: int) -> list[int]:
    """Positions of the tables in a ``[Table]`` field; empty where absent."""
    if not field_pos:
        return []
    start = deref(buf, field_pos)
    _check(buf, start, 4)
    count: int = _u32(buf, start)[0]
    _check(buf, start + 4, 4 * count)
    base = start + 4
    return [base + 4 * i + o for i, o in enumerate(struct.unpack_from(f"<{count}I", buf, base))]


Entry: TypeAlias = tuple[str, str | None]


def read_text_entries(buf: bytes, field_pos: int) -> list[Entry]:
    """A ``[TextEntry]`` field as ``(name, value)`` pairs; value None means "no value"."""
    out: list[Entry] = []
    for pos in read_table_vector(buf, field_pos):
        name_pos, value_pos = table_fields(buf, pos, 2)
        name = read_str(buf, name_pos)
        if name is None:
            raise MalformedMessage("a TextEntry has no name")
        out.append((name, read_str(buf, value_pos)))
    return out


def _check(buf: bytes, pos: int, size: int) -> None:
    if pos < 0 or pos + size > len(buf):
        raise MalformedMessage(f"{size} bytes at {pos} lie outside the {len(buf)}-byte message")


# ---------------------------------------------------------------------------- writing
#
# A table to write is a sequence of (slot, kind, value). Every inline field takes a
# 4-byte-aligned 4-byte slot, which keeps all scalars and offsets naturally aligned.
# Layout, front to back: root offset, then per table [vtable][table][children...].

U8: Final = 0
U16: Final = 1
U32: Final = 2
BYTES: Final = 3  # str is encoded as UTF-8 and gets FlatBuffers' NUL terminator
TABLE: Final = 4
TABLES: Final = 5

_LIMITS: Final = {U8: 1 << 8, U16: 1 << 16, U32: 1 << 32}

Field: TypeAlias = "tuple[int, int, object]"
TableSpec: TypeAlias = "Sequence[Field]"


def build(root: TableSpec) -> bytes:
    """Serialize a root table into a finished FlatBuffer."""
    out = bytearray(4)
    _pack_u32_into(out, 0, _write_table(out, root))
    return bytes(out)


def _pack_u32_into(out: bytearray, at: int, value: int) -> None:
    out[at : at + 4] = _pack_u32(value)


def _write_table(out: bytearray, fields: TableSpec) -> int:
    nslots = max((slot for slot, _, _ in fields), default=-1) + 1
    vt_size = 4 + 2 * nslots
    table_size = 4 + 4 * len(fields)
    vt_pos = len(out)
    pad = -vt_size % 4
    table_pos = vt_pos + vt_size + pad
    slot_offsets = [0] * nslots
    for i, (slot, _, _) in enumerate(fields):
        slot_offsets[slot] = 4 + 4 * i
    out += struct.pack(f"<HH{nslots}H", vt_size, table_size, *slot_offsets)
    out += bytes(pad)
    out += _I32.pack(table_pos - vt_pos)
    pending: list[tuple[int, int, object]] = []
    for i, (_, kind, value) in enumerate(fields):
        at = table_pos + 4 + 4 * i
        if kind in (U8, U16, U32):
            if not 0 <= value < _LIMITS[kind]:  # type: ignore[operator]
                raise ValueError(f"field {i} value {value!r} does not fit its type")
            out += _pack_u32(value)
        else:
            out += b"\0\0\0\0"
            pending.append((at, kind, value))
    for at, kind, value in pending:
        child = _write_child(out, kind, value)
        _pack_u32_into(out, at, child - at)
    return table_pos


def _write_child(out: bytearray, kind: int, value: object) -> int:
    pos = len(out)
    if kind == BYTES:
        if isinstance(value, str):
            data = value.encode("utf-8", "surrogateescape")
            out += _pack_u32(len(data))
            out += data
            out += bytes(1 + (-(len(data) + 1) % 4))
        else:
            data = value  # type: ignore[assignment]
            out += _pack_u32(len(data))
            out += data
            out += bytes(-len(data) % 4)
        return pos
    if kind == TABLE:
        return _write_table(out, value)  # type: ignore[arg-type]
    tables: Sequence[TableSpec] = value  # type: ignore[assignment]
    out += _pack_u32(len(tables))
    slots = len(out)
    out += bytes(4 * len(tables))
    for i, table in enumerate(tables):
        at = slots + 4 * i
        _pack_u32_into(out, at, _write_table(out, table) - at)
    return pos


def text_entries(entries: Sequence[Entry]) -> list[TableSpec]:
    """``(name, value)`` pairs as TextEntry tables; value None leaves the value out."""
    return [
        ((0, BYTES, name),) if value is None else ((0, BYTES, name), (1, BYTES, value))
        for name, value in entries
    ]

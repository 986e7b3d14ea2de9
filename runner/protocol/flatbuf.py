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
from collections.abc import Callable, Sequence
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


# Unpackers of n vtable entries, made once: a format string per call costs a cache lookup.
_OFFSETS: Final = [struct.Struct(f"<{n}H").unpack_from for n in range(32)]
_NO_OFFSETS: Final = [(0,) * n for n in range(32)]
_HH: Final = struct.Struct("<HH").unpack_from


def root_offsets(buf: bytes, nslots: int) -> tuple[int, tuple[int, ...]]:
    """The root table's position and its fields' offsets in it (0 where absent): what
    ``root_fields`` checks, without building the positions of fields never read."""
    if len(buf) < 4:
        raise MalformedMessage(f"message of {len(buf)} bytes is too short for a FlatBuffer")
    pos: int = _u32(buf, 0)[0]
    return pos, table_offsets(buf, pos, nslots)


def table_offsets(buf: bytes, pos: int, nslots: int) -> tuple[int, ...]:
    """The offsets of fields ``0..nslots-1`` inside the table at ``pos`` (0 where absent),
    every one checked to lie inside the table and the message."""
    size = len(buf)
    if pos + 4 > size:
        raise MalformedMessage(f"table offset {pos} is outside the {size}-byte message")
    vt = pos - _i32(buf, pos)[0]
    if vt < 0 or vt + 4 > size:
        raise MalformedMessage(f"vtable offset {vt} is outside the {size}-byte message")
    vt_size, table_size = _HH(buf, vt)
    # A vtable is made of 16-bit entries: an odd size is damage, and the generated
    # code would read a field whose entry is half outside the vtable.
    if vt_size < 4 or vt_size & 1 or vt + vt_size > size or pos + table_size > size:
        raise MalformedMessage("vtable or table runs past the end of the message")
    present = (vt_size - 4) >> 1
    offsets: tuple[int, ...] = _OFFSETS[min(present, nslots)](buf, vt + 4)
    if offsets and max(offsets) >= table_size:
        raise MalformedMessage(f"a field offset lies outside its {table_size}-byte table")
    if present < nslots:
        offsets += _NO_OFFSETS[nslots - present]
    return offsets


def root_bytes(buf: bytes) -> bytes | None:
    """The root table's field 0 read as a string or ``[ubyte]`` (None where absent):
    ``read_bytes`` after ``root_offsets(buf, 1)``, in fewer calls. Every ExtraInfo
    answer is read this way."""
    if len(buf) < 4:
        raise MalformedMessage(f"message of {len(buf)} bytes is too short for a FlatBuffer")
    pos: int = _u32(buf, 0)[0]
    offset = table_offsets(buf, pos, 1)[0]
    return read_bytes(buf, pos + offset) if offset else None


def table_fields(buf: bytes, pos: int, nslots: int) -> list[int]:
    """Absolute positions of the fields of the table at ``pos`` (0 where absent)."""
    return [pos + o if o else 0 for o in table_offsets(buf, pos, nslots)]


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
    if field_pos + 4 > len(buf):
        raise MalformedMessage(f"4 bytes at {field_pos} lie outside the {len(buf)}-byte message")
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
    # deref and _check inlined: a body's ExtraInfo reply is read this way on every call.
    size = len(buf)
    if field_pos + 4 > size:
        raise MalformedMessage(f"4 bytes at {field_pos} lie outside the {size}-byte message")
    start: int = field_pos + _u32(buf, field_pos)[0]
    if start + 4 > size:
        raise MalformedMessage(f"offset at {field_pos} points outside the message")
    length: int = _u32(buf, start)[0]
    end = start + 4 + length
    if end > size:
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
    """A ``[TextEntry]`` field as ``(name, value)`` pairs; value None means "no value".

    Headers are the bulk of a request, so this is ``table_fields`` and ``read_str``
    unrolled for two-field tables, with the same checks.
    """
    out: list[Entry] = []
    size = len(buf)
    for pos in read_table_vector(buf, field_pos):
        if pos + 4 > size:
            raise MalformedMessage(f"table offset {pos} is outside the {size}-byte message")
        vt = pos - _i32(buf, pos)[0]
        if vt < 0 or vt + 4 > size:
            raise MalformedMessage(f"vtable offset {vt} is outside the {size}-byte message")
        vt_size, table_size = _HH(buf, vt)
        if vt_size < 4 or vt_size & 1 or vt + vt_size > size or pos + table_size > size:
            raise MalformedMessage("vtable or table runs past the end of the message")
        if vt_size >= 8:
            name_off, value_off = _HH(buf, vt + 4)
            if name_off >= table_size or value_off >= table_size:
                raise MalformedMessage("a TextEntry field lies outside its table")
        elif vt_size >= 6:
            name_off = _u16(buf, vt + 4)[0]
            value_off = 0
            if name_off >= table_size:
                raise MalformedMessage("a TextEntry field lies outside its table")
        else:
            name_off = value_off = 0
        if not name_off:
            raise MalformedMessage("a TextEntry has no name")
        name = _text_at(buf, pos + name_off, size)
        out.append((name, _text_at(buf, pos + value_off, size) if value_off else None))
    return out


def _text_at(buf: bytes, field_pos: int, size: int) -> str:
    """The string whose uoffset is at ``field_pos`` (``read_str`` for a present field)."""
    if field_pos + 4 > size:
        raise MalformedMessage(f"4 bytes at {field_pos} lie outside the {size}-byte message")
    start = field_pos + _u32(buf, field_pos)[0]
    if start + 4 > size:
        raise MalformedMessage(f"offset at {field_pos} points outside the message")
    end = start + 4 + _u32(buf, start)[0]
    if end > size:
        raise MalformedMessage(f"vector at {start} runs past the message end")
    return buf[start + 4 : end].decode("utf-8", "surrogateescape")


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


# ------------------------------------------------------------------ writing, fast
#
# The same layout as ``build``, byte for byte, without its per-field dispatch: each piece
# is a relocatable "blob" (all offsets inside it are relative, and its length is a
# multiple of 4), and a table's children are blobs laid out right after it. A child is
# ``(blob, inner)``: ``inner`` is where the uoffset must point inside the blob (0 for
# strings and vectors, past the vtable for tables). ``build`` stays the reference the
# tests hold these to.

Child: TypeAlias = tuple[bytes, int]

_STR_PAD: Final = (b"\0\0\0\0", b"\0\0\0", b"\0\0", b"\0")  # NUL terminator + alignment
BYTES_PAD: Final = (b"", b"\0\0\0", b"\0\0", b"\0")
# An entry's vtable and table, then its name's length: (6 or 8) + (2 or 0) + (8 or 12) + 4.
_ENTRY_WITH_VALUE: Final = struct.Struct("<HHHHiIII")
_ENTRY_WITHOUT_VALUE: Final = struct.Struct("<HHHxxiII")


def str_blob(value: str) -> bytes:
    """A FlatBuffers string: length, UTF-8 bytes (surrogates back to raw bytes), NUL, pad."""
    data = value.encode("utf-8", "surrogateescape")
    return b"".join((_pack_u32(len(data)), data, _STR_PAD[len(data) & 3]))


def bytes_blob(data: bytes) -> bytes:
    """A ``[ubyte]`` vector: length, bytes, pad (no NUL, unlike a string)."""
    return b"".join((_pack_u32(len(data)), data, BYTES_PAD[len(data) & 3]))


def entries_blob(entries: Sequence[Entry]) -> bytes:
    """A ``[TextEntry]`` vector; a None value leaves the value field out."""
    count = len(entries)
    if count == 1:
        name, value = entries[0]
        if value is not None:
            # The usual rewrite sets one header: the count, the slot (12: past itself, to the
            # table behind the vtable), the vtable, the table and the name's length in one pack.
            raw_name = name.encode("utf-8", "surrogateescape")
            raw_value = value.encode("utf-8", "surrogateescape")
            name_len = len(raw_name)
            value_len = len(raw_value)
            name_size = 8 + name_len - (name_len & 3)
            return b"".join(
                (
                    _ONE_ENTRY.pack(1, 12, 8, 12, 4, 8, 8, 8, 4 + name_size, name_len),
                    raw_name,
                    _STR_PAD[name_len & 3],
                    _pack_u32(value_len),
                    raw_value,
                    _STR_PAD[value_len & 3],
                )
            )
    parts: list[bytes] = [b""]  # the count and the slots, filled in at the end
    slots: list[int] = []
    at = 4 * count  # from the first slot to the next table's vtable
    for i, (name, value) in enumerate(entries):
        raw_name = name.encode("utf-8", "surrogateescape")
        name_len = len(raw_name)
        name_size = 8 + name_len - (name_len & 3)  # length, bytes, NUL and padding
        slots.append(at + 8 - 4 * i)  # the table lies 8 bytes into the entry
        if value is None:
            # vtable [6, 8, name at 4] + pad, table [soffset 8, name -> just after it]
            parts.append(_ENTRY_WITHOUT_VALUE.pack(6, 8, 4, 8, 4, name_len))
            parts.append(raw_name)
            parts.append(_STR_PAD[name_len & 3])
            at += 16 + name_size
        else:
            # vtable [8, 12, name at 4, value at 8], table [soffset 8, name, value]
            raw_value = value.encode("utf-8", "surrogateescape")
            value_len = len(raw_value)
            parts.append(_ENTRY_WITH_VALUE.pack(8, 12, 4, 8, 8, 8, 4 + name_size, name_len))
            parts.append(raw_name)
            parts.append(_STR_PAD[name_len & 3])
            parts.append(_pack_u32(value_len))
            parts.append(raw_value)
            parts.append(_STR_PAD[value_len & 3])
            at += 20 + name_size + 8 + value_len - (value_len & 3)
    count_and_slots = _COUNT_AND_SLOTS.get(count)
    if count_and_slots is None:
        count_and_slots = struct.Struct(f"<I{count}I").pack
        if count < 64:
            _COUNT_AND_SLOTS[count] = count_and_slots
    parts[0] = count_and_slots(count, *slots)
    return b"".join(parts)


_ONE_ENTRY: Final = struct.Struct("<II" + _ENTRY_WITH_VALUE.format[1:])
# entry count -> packer of the count and the slots; up to 63 entries, made once each.
_COUNT_AND_SLOTS: dict[int, Callable[..., bytes]] = {}


def table_blob(fields: Sequence[tuple[int, int | Child]]) -> Child:
    """A table and its children, fields listed in slot order; ints are scalars written
    into 4-byte slots (the caller checks their range), children are blobs."""
    count = len(fields)
    nslots = fields[-1][0] + 1 if fields else 0
    vt_size = 4 + 2 * nslots
    pad = -vt_size % 4
    table_pos = vt_size + pad
    offsets = [0] * nslots
    words: list[int] = []
    children: list[bytes] = []
    child_at = table_pos + 4 + 4 * count
    for i, (slot, value) in enumerate(fields):
        offsets[slot] = 4 + 4 * i
        if isinstance(value, int):
            words.append(value)
        else:
            blob, inner = value
            words.append(child_at + inner - (table_pos + 4 + 4 * i))
            children.append(blob)
            child_at += len(blob)
    layout = _TABLE_LAYOUTS.get((nslots, count))
    if layout is None:
        layout = _TABLE_LAYOUTS[nslots, count] = struct.Struct(f"<HH{nslots}H{pad}xi{count}I").pack
    head = layout(vt_size, 4 + 4 * count, *offsets, table_pos, *words)
    return head + b"".join(children) if children else head, table_pos


# (vtable slots, fields) -> packer of the vtable and table: a few shapes, made once each.
_TABLE_LAYOUTS: dict[tuple[int, int], Callable[..., bytes]] = {}


def finish(root: Child) -> bytes:
    """The whole message: the root uoffset, then the root table's blob."""
    blob, inner = root
    return _pack_u32(4 + inner) + blob

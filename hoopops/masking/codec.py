"""Pure codecs for the backend messages masking reads and rewrites (no I/O).

Payloads are message bodies after the type byte and the Int32 length, as in the
"Message Formats" section of the PostgreSQL protocol documentation. Everything stays in
bytes: field values are never decoded here, so the client encoding never matters.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from hoopops.masking.sources import OutputSources

I16 = struct.Struct("!h")
I32 = struct.Struct("!i")
U32 = struct.Struct("!I")
_FIELD_TAIL = struct.Struct("!IhIhih")
NULL_FIELD = b"\xff\xff\xff\xff"


class CodecError(ValueError):
    """A payload that does not have the shape its message type requires."""


@dataclass(frozen=True, slots=True)
class ColumnInfo:
    """One RowDescription field, plus what the catalog says it carries.

    ``origin`` is filled by the catalog for columns with a table OID: the source column(s)
    and whether the value passes through unchanged (a view column may be computed).
    ``base_type_oid`` is the built-in type a domain, enum or text-like extension type
    behaves as on the wire, when the catalog knows it (0: unknown, treat as opaque).
    """

    name: str
    table_oid: int = 0
    attnum: int = 0
    type_oid: int = 25
    format_code: int = 0
    type_size: int = -1
    type_mod: int = -1
    origin: OutputSources | None = None
    base_type_oid: int | None = None

    @property
    def wire_type(self) -> int:
        return self.base_type_oid if self.base_type_oid is not None else self.type_oid


class FieldLike(Protocol):
    """A decoded RowDescription field from elsewhere (``hoopops.proxy.protocol.Field``)."""

    name: str
    table_oid: int
    attnum: int
    type_oid: int
    type_size: int
    type_mod: int
    format_code: int


def columns_from_fields(fields: Iterable[FieldLike]) -> list[ColumnInfo]:
    """ColumnInfo for fields another codec already decoded (no origins yet)."""
    return [ColumnInfo(f.name, f.table_oid, f.attnum, f.type_oid, f.format_code, f.type_size,
                       f.type_mod) for f in fields]


def parse_row_description(payload: bytes) -> list[ColumnInfo]:
    """RowDescription ('T') → columns. Names are decoded as UTF-8 with replacement: they
    label columns in the audit trail and are never matched for masking."""
    try:
        (count,) = I16.unpack_from(payload, 0)
        pos = 2
        columns = []
        for _ in range(count):
            end = payload.index(b"\0", pos)
            name = payload[pos:end].decode("utf-8", "replace")
            table_oid, attnum, type_oid, size, mod, fmt = _FIELD_TAIL.unpack_from(payload, end + 1)
            pos = end + 19
            columns.append(ColumnInfo(name, table_oid, attnum, type_oid, fmt, size, mod))
    except (struct.error, ValueError):
        raise CodecError("malformed RowDescription") from None
    if pos != len(payload):
        raise CodecError("trailing bytes in RowDescription")
    return columns


def apply_result_formats(columns: Sequence[ColumnInfo], formats: Sequence[int]) -> list[ColumnInfo]:
    """Columns with the result formats a Bind asked for.

    A RowDescription answering Describe of a *statement* always says text, because the
    formats are not known until Bind ("Extended Query" in the protocol docs): zero codes
    mean all text, one code applies to every column, otherwise one code per column.
    """
    if not formats:
        wanted = [0] * len(columns)
    elif len(formats) == 1:
        wanted = [formats[0]] * len(columns)
    elif len(formats) == len(columns):
        wanted = list(formats)
    else:
        raise CodecError(f"Bind gave {len(formats)} result formats for {len(columns)} columns")
    return [c if c.format_code == f else replace(c, format_code=f)
            for c, f in zip(columns, wanted, strict=True)]


def split_data_row(payload: bytes) -> list[bytes | None]:
    """DataRow ('D') → field values, None for NULL."""
    try:
        (count,) = I16.unpack_from(payload, 0)
        pos = 2
        values: list[bytes | None] = []
        for _ in range(count):
            (size,) = I32.unpack_from(payload, pos)
            pos += 4
            if size < 0:
                values.append(None)
                continue
            if pos + size > len(payload):
                raise CodecError("DataRow field runs past the message")
            values.append(payload[pos:pos + size])
            pos += size
    except struct.error:
        raise CodecError("truncated DataRow") from None
    if pos != len(payload):
        raise CodecError("trailing bytes in DataRow")
    return values


def field(value: bytes | None) -> bytes:
    """One length-prefixed field as in DataRow and binary COPY."""
    return NULL_FIELD if value is None else I32.pack(len(value)) + value


def build_data_row(values: Sequence[bytes | None]) -> bytes:
    return I16.pack(len(values)) + b"".join(field(v) for v in values)


@dataclass(frozen=True, slots=True)
class CopyResponse:
    """CopyOutResponse ('H'): overall format (0 text/CSV, 1 binary) and per-column formats."""

    format: int
    column_formats: tuple[int, ...]


def parse_copy_response(payload: bytes) -> CopyResponse:
    try:
        overall = payload[0]
        (count,) = I16.unpack_from(payload, 1)
        formats = struct.unpack_from(f"!{count}h", payload, 3) if count > 0 else ()
    except (struct.error, IndexError):
        raise CodecError("malformed CopyOutResponse") from None
    if 3 + 2 * max(count, 0) != len(payload):
        raise CodecError("trailing bytes in CopyOutResponse")
    return CopyResponse(overall, tuple(formats))


def parse_fields(payload: bytes) -> list[tuple[int, bytes]]:
    """ErrorResponse/NoticeResponse → ``[(code byte, raw value)]`` in wire order."""
    fields: list[tuple[int, bytes]] = []
    pos = 0
    size = len(payload)
    while pos < size and payload[pos] != 0:
        end = payload.find(b"\0", pos + 1)
        if end < 0:
            raise CodecError("unterminated field in ErrorResponse/NoticeResponse")
        fields.append((payload[pos], payload[pos + 1:end]))
        pos = end + 1
    if pos != size - 1:
        raise CodecError("ErrorResponse/NoticeResponse must end with one NUL")
    return fields


def build_fields(fields: Sequence[tuple[int, bytes]]) -> bytes:
    return b"".join(bytes((code,)) + value + b"\0" for code, value in fields) + b"\0"


def parse_notification(payload: bytes) -> tuple[int, bytes, bytes]:
    """NotificationResponse ('A') → (backend pid, channel, payload)."""
    try:
        (pid,) = I32.unpack_from(payload, 0)
        channel_end = payload.index(b"\0", 4)
        body_end = payload.index(b"\0", channel_end + 1)
    except (struct.error, ValueError):
        raise CodecError("malformed NotificationResponse") from None
    if body_end != len(payload) - 1:
        raise CodecError("trailing bytes in NotificationResponse")
    return pid, payload[4:channel_end], payload[channel_end + 1:body_end]


def build_notification(pid: int, channel: bytes, body: bytes) -> bytes:
    return I32.pack(pid) + channel + b"\0" + body + b"\0"


def parse_parameter_status(payload: bytes) -> tuple[bytes, bytes]:
    try:
        name_end = payload.index(b"\0")
        value_end = payload.index(b"\0", name_end + 1)
    except ValueError:
        raise CodecError("malformed ParameterStatus") from None
    if value_end != len(payload) - 1:
        raise CodecError("trailing bytes in ParameterStatus")
    return payload[:name_end], payload[name_end + 1:value_end]


def build_parameter_status(name: bytes, value: bytes) -> bytes:
    return name + b"\0" + value + b"\0"

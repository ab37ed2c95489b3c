"""Pure framing and codecs for the PostgreSQL frontend/backend protocol 3.0 (no I/O).

The PostgreSQL documentation's "Frontend/Backend Protocol" chapter, sections "Message
Flow" and "Message Formats", is the specification; comments cite the section where the
code follows a subtle rule.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

PROTOCOL_3_0 = 196608  # 3 << 16
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102

HEADER = struct.Struct("!cI")
_INT32 = struct.Struct("!i")
_UINT32 = struct.Struct("!I")
_INT16 = struct.Struct("!h")

# Backend message types (first byte), as ints for fast comparison against buffer bytes.
AUTHENTICATION = ord("R")
BACKEND_KEY_DATA = ord("K")
BIND_COMPLETE = ord("2")
CLOSE_COMPLETE = ord("3")
COMMAND_COMPLETE = ord("C")
COPY_DATA = ord("d")
COPY_DONE = ord("c")
COPY_FAIL = ord("f")
COPY_IN_RESPONSE = ord("G")
COPY_OUT_RESPONSE = ord("H")
COPY_BOTH_RESPONSE = ord("W")
DATA_ROW = ord("D")
EMPTY_QUERY_RESPONSE = ord("I")
ERROR_RESPONSE = ord("E")
FUNCTION_CALL_RESPONSE = ord("V")
NEGOTIATE_PROTOCOL_VERSION = ord("v")
NO_DATA = ord("n")
NOTICE_RESPONSE = ord("N")
NOTIFICATION_RESPONSE = ord("A")
PARAMETER_DESCRIPTION = ord("t")
PARAMETER_STATUS = ord("S")
PARSE_COMPLETE = ord("1")
PORTAL_SUSPENDED = ord("s")
READY_FOR_QUERY = ord("Z")
ROW_DESCRIPTION = ord("T")

# Frontend message types.
BIND = ord("B")
CLOSE = ord("C")
DESCRIBE = ord("D")
EXECUTE = ord("E")
FLUSH = ord("H")
FUNCTION_CALL = ord("F")
PARSE = ord("P")
PASSWORD = ord("p")
QUERY = ord("Q")
SYNC = ord("S")
TERMINATE = ord("X")

FRONTEND_TYPES = frozenset(b"BCDEHFPpQSXdcf")


class ProtocolError(Exception):
    """The peer broke the protocol; the connection cannot continue."""

    def __init__(self, message: str, sqlstate: str = "08P01") -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


# -- framing ----------------------------------------------------------------------------


def bad_length(length: int, limit: int) -> ProtocolError:
    """The error for a client message whose length field is below the minimum or above
    the gateway's limit (``limits.max_message_size``)."""
    if length < 4:
        return ProtocolError(f"invalid message length {length}")
    return ProtocolError(f"message of {length} bytes exceeds the gateway limit of {limit} "
                         "bytes (limits.max_message_size)", "54000")


def frame(mtype: int | bytes, payload: bytes = b"") -> bytes:
    """One complete message: type byte, int32 length (including itself), payload."""
    type_byte = mtype if isinstance(mtype, bytes) else bytes((mtype,))
    return type_byte + _UINT32.pack(len(payload) + 4) + payload


def cstr(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape") + b"\x00"


def read_cstr(data: bytes, pos: int) -> tuple[str, int]:
    """The NUL-terminated string at ``pos`` and the position after it."""
    end = data.find(b"\x00", pos)
    if end < 0:
        raise ProtocolError("string field is not NUL-terminated")
    return data[pos:end].decode("utf-8", "surrogateescape"), end + 1


def read_cstr_bytes(data: bytes, pos: int) -> tuple[bytes, int]:
    end = data.find(b"\x00", pos)
    if end < 0:
        raise ProtocolError("string field is not NUL-terminated")
    return data[pos:end], end + 1


# -- startup ----------------------------------------------------------------------------


@dataclass(frozen=True)
class StartupPacket:
    code: int
    params: dict[str, str]
    raw_options: tuple[str, ...] = ()

    @property
    def major(self) -> int:
        return self.code >> 16

    @property
    def minor(self) -> int:
        return self.code & 0xFFFF


def parse_startup(payload: bytes) -> StartupPacket:
    """Parse the body of a length-prefixed startup-phase packet (after the length)."""
    if len(payload) < 4:
        raise ProtocolError("startup packet too short")
    (code,) = _UINT32.unpack_from(payload, 0)
    if code in (SSL_REQUEST, GSSENC_REQUEST):
        if len(payload) != 4:
            raise ProtocolError("malformed SSL/GSS request")
        return StartupPacket(code, {})
    if code == CANCEL_REQUEST:
        # 3.2 allows variable-length keys (4 to 256 bytes).
        if not 12 <= len(payload) <= 264:
            raise ProtocolError("malformed CancelRequest")
        return StartupPacket(code, {"pid": str(_INT32.unpack_from(payload, 4)[0]),
                                    "key": payload[8:].hex()})
    if code >> 16 != 3:
        raise ProtocolError(f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}: "
                            "the gateway speaks protocol 3", "0A000")
    try:
        # Names and values reach the audit trail, events and the console as text.
        payload[4:].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("startup packet is not valid UTF-8: send parameter names and "
                            "values (user, database, application_name...) in UTF-8") from None
    params: dict[str, str] = {}
    order: list[str] = []
    pos = 4
    data = payload
    while True:
        if pos >= len(data):
            raise ProtocolError("startup packet is not terminated")
        if data[pos] == 0:
            if pos != len(data) - 1:
                raise ProtocolError("unexpected bytes after the startup packet terminator")
            break
        name, pos = read_cstr(data, pos)
        value, pos = read_cstr(data, pos)
        if name in params:
            raise ProtocolError(f"startup parameter {name!r} given twice")
        params[name] = value
        order.append(name)
    return StartupPacket(code, params, tuple(order))


def startup_message(params: dict[str, str], code: int = PROTOCOL_3_0) -> bytes:
    body = _UINT32.pack(code) + b"".join(cstr(k) + cstr(v) for k, v in params.items()) + b"\0"
    return _UINT32.pack(len(body) + 4) + body


def ssl_request() -> bytes:
    return _UINT32.pack(8) + _UINT32.pack(SSL_REQUEST)


def cancel_request(pid: int, key: bytes) -> bytes:
    body = _UINT32.pack(CANCEL_REQUEST) + _INT32.pack(pid) + key
    return _UINT32.pack(len(body) + 4) + body


# -- backend messages the gateway builds --------------------------------------------------


def authentication(code: int, extra: bytes = b"") -> bytes:
    return frame(AUTHENTICATION, _INT32.pack(code) + extra)


AUTH_OK = authentication(0)
AUTH_CLEARTEXT = authentication(3)


def parameter_status(name: str, value: str) -> bytes:
    return frame(PARAMETER_STATUS, cstr(name) + cstr(value))


def backend_key_data(pid: int, key: bytes) -> bytes:
    return frame(BACKEND_KEY_DATA, _INT32.pack(pid) + key)


def ready_for_query(status: bytes) -> bytes:
    return frame(READY_FOR_QUERY, status)


def negotiate_protocol_version(minor: int, unsupported: Sequence[str]) -> bytes:
    """NegotiateProtocolVersion offering protocol 3.``minor``.

    The documentation calls the first field the "newest minor protocol version", but the
    server sends (and libpq 18 reads) the whole version code, ``(3 << 16) | minor``: a bare
    ``0`` is read as "downgrade to protocol 0.0" and libpq gives up.
    """
    body = _INT32.pack(PROTOCOL_3_0 | minor) + _INT32.pack(len(unsupported)) + b"".join(
        cstr(o) for o in unsupported)
    return frame(NEGOTIATE_PROTOCOL_VERSION, body)


def error_fields(fields: dict[str, str]) -> bytes:
    return b"".join(k.encode() + cstr(v) for k, v in fields.items()) + b"\0"


def error_response(sqlstate: str, message: str, severity: str = "ERROR",
                   detail: str | None = None, hint: str | None = None) -> bytes:
    fields = {"S": severity, "V": severity, "C": sqlstate, "M": message}
    if detail:
        fields["D"] = detail
    if hint:
        fields["H"] = hint
    return frame(ERROR_RESPONSE, error_fields(fields))


def notice_response(message: str, severity: str = "NOTICE", sqlstate: str = "00000",
                    detail: str | None = None) -> bytes:
    fields = {"S": severity, "V": severity, "C": sqlstate, "M": message}
    if detail:
        fields["D"] = detail
    return frame(NOTICE_RESPONSE, error_fields(fields))


def parse_error_fields(payload: bytes) -> dict[str, str]:
    """Fields of an ErrorResponse/NoticeResponse payload keyed by their one-letter code."""
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(payload) and payload[pos] != 0:
        code = chr(payload[pos])
        value, pos = read_cstr(payload, pos + 1)
        fields[code] = value
    return fields


# -- frontend messages ------------------------------------------------------------------


def query(sql: str) -> bytes:
    return frame(QUERY, cstr(sql))


def password_message(data: bytes) -> bytes:
    return frame(PASSWORD, data)


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return frame(PASSWORD, cstr(mechanism) + _INT32.pack(len(data)) + data)


SYNC_MESSAGE = frame(SYNC)
FLUSH_MESSAGE = frame(FLUSH)
TERMINATE_MESSAGE = frame(TERMINATE)


def parse_message(name: str, sql: str, param_types: Sequence[int] = ()) -> bytes:
    body = cstr(name) + cstr(sql) + _INT16.pack(len(param_types)) + b"".join(
        _UINT32.pack(t) for t in param_types)
    return frame(PARSE, body)


def bind_message(portal: str, statement: str) -> bytes:
    return frame(BIND, cstr(portal) + cstr(statement) + b"\0\0\0\0\0\0")


def execute_message(portal: str, max_rows: int = 0) -> bytes:
    return frame(EXECUTE, cstr(portal) + _INT32.pack(max_rows))


@dataclass(frozen=True)
class ParseMsg:
    name: str
    sql: str
    param_types: tuple[int, ...]


def decode_parse(payload: bytes) -> ParseMsg:
    name, pos = read_cstr(payload, 0)
    sql_bytes, pos = read_cstr_bytes(payload, pos)
    if pos + 2 > len(payload):
        raise ProtocolError("truncated Parse message")
    (count,) = _INT16.unpack_from(payload, pos)
    pos += 2
    if count < 0 or pos + 4 * count != len(payload):
        raise ProtocolError("malformed Parse parameter types")
    types = struct.unpack_from(f"!{count}I", payload, pos) if count else ()
    return ParseMsg(name, decode_sql(sql_bytes), tuple(types))


@dataclass(frozen=True)
class BindMsg:
    portal: str
    statement: str
    param_formats: tuple[int, ...]
    params: tuple[bytes | None, ...]
    result_formats: tuple[int, ...]


def decode_bind(payload: bytes) -> BindMsg:
    return _walk_bind(payload, keep_params=True)


def scan_bind(payload: bytes) -> tuple[str, str, tuple[int, ...]]:
    """Portal, statement and result formats of a Bind, stepping over parameter values
    without copying them (the hot path needs only the names)."""
    msg = _walk_bind(payload, keep_params=False)
    return msg.portal, msg.statement, msg.result_formats


def _walk_bind(payload: bytes, keep_params: bool) -> BindMsg:
    """Validate a whole Bind message; parameter values are copied only if asked for."""
    try:
        portal, pos = read_cstr(payload, 0)
        statement, pos = read_cstr(payload, pos)
        (nfmt,) = _INT16.unpack_from(payload, pos)
        pos += 2
        if nfmt < 0:
            raise ProtocolError("malformed Bind message")
        fmts = struct.unpack_from(f"!{nfmt}h", payload, pos) if nfmt else ()
        pos += 2 * nfmt
        (nparams,) = _INT16.unpack_from(payload, pos)
        pos += 2
        if nparams < 0:
            raise ProtocolError("malformed Bind message")
        params: list[bytes | None] = []
        unpack = _INT32.unpack_from
        for _ in range(nparams):
            (size,) = unpack(payload, pos)
            pos += 4
            if size == -1:
                if keep_params:
                    params.append(None)
                continue
            if size < 0 or pos + size > len(payload):
                raise ProtocolError("malformed Bind parameter")
            if keep_params:
                params.append(payload[pos:pos + size])
            pos += size
        (nres,) = _INT16.unpack_from(payload, pos)
        pos += 2
        if nres < 0:
            raise ProtocolError("malformed Bind message")
        results = struct.unpack_from(f"!{nres}h", payload, pos) if nres else ()
        pos += 2 * nres
    except struct.error:
        raise ProtocolError("truncated Bind message") from None
    if pos != len(payload):
        raise ProtocolError("trailing bytes in Bind message")
    return BindMsg(portal, statement, tuple(fmts), tuple(params), tuple(results))


# -- the same, read in place from a receive buffer (the relay's hot path) ----------------
# ``pos``/``end`` delimit one message's payload inside ``buf``; nothing is copied but the
# names, and the message is validated as strictly as by the decoders above.

_INT16_1 = struct.Struct("!h").unpack_from


def _name_at(buf: bytes | bytearray, pos: int, end: int) -> tuple[str, int]:
    zero = buf.find(0, pos, end)
    if zero < 0:
        raise ProtocolError("string field is not NUL-terminated")
    if zero == pos:
        return "", pos + 1
    return buf[pos:zero].decode("utf-8", "surrogateescape"), zero + 1


def name_at(buf: bytes | bytearray, pos: int, end: int) -> str:
    """The name a Parse or Execute payload ``buf[pos:end]`` begins with."""
    return _name_at(buf, pos, end)[0]


def bind_at(buf: bytes | bytearray, pos: int, end: int) -> tuple[str, str, tuple[int, ...]]:
    """``scan_bind`` of the Bind payload ``buf[pos:end]``."""
    return bind_layout_at(buf, pos, end)[:3]  # type: ignore[return-value]


def bind_layout_at(buf: bytes | bytearray, pos: int, end: int
                   ) -> tuple[str, str, tuple[int, ...], int, int, int]:
    """``bind_at``, and where its parts lie: the offset of the first parameter value's
    length, the number of parameters, and the offset of the result-format count. What
    precedes the values and what follows them fix every field but the values, so a
    relay that saw those bytes before need not read them again (``params_end_at``)."""
    if pos < end and buf[pos] == 0:  # the unnamed portal
        portal, pos = "", pos + 1
    else:
        portal, pos = _name_at(buf, pos, end)
    statement, pos = _name_at(buf, pos, end)
    try:
        (count,) = _INT16_1(buf, pos)
        if count < 0:
            raise ProtocolError("malformed Bind message")
        pos += 2 + 2 * count
        (nparams,) = _INT16_1(buf, pos)
        if nparams < 0:
            raise ProtocolError("malformed Bind message")
        pos += 2
        params_at = pos
        unpack = _INT32.unpack_from
        for _ in range(nparams):
            (size,) = unpack(buf, pos)
            if size < -1:
                raise ProtocolError("malformed Bind parameter")
            pos += 4 if size == -1 else 4 + size
            if pos > end:
                raise ProtocolError("malformed Bind parameter")
        results_at = pos
        (count,) = _INT16_1(buf, pos)
        if count < 0:
            raise ProtocolError("malformed Bind message")
        if count == 0:
            results: tuple[int, ...] = ()
        elif count == 1:
            results = _INT16_1(buf, pos + 2)
        else:
            results = struct.unpack_from(f"!{count}h", buf, pos + 2)
        pos += 2 + 2 * count
    except struct.error:
        raise ProtocolError("truncated Bind message") from None
    if pos != end:
        raise ProtocolError("trailing bytes in Bind message")
    return portal, statement, results, params_at, nparams, results_at


def params_end_at(buf: bytes | bytearray, pos: int, count: int, end: int) -> int:
    """Where ``count`` Bind parameter values starting at ``pos`` end, or -1 if they are
    malformed or run past ``end``."""
    unpack = _INT32.unpack_from
    for _ in range(count):
        if pos + 4 > end:
            return -1
        (size,) = unpack(buf, pos)
        if size < 0:
            if size != -1:
                return -1
            pos += 4
        else:
            pos += 4 + size
    return pos if pos <= end else -1


def execute_at(buf: bytes | bytearray, pos: int, end: int) -> tuple[str, int]:
    """``decode_execute`` of the Execute payload ``buf[pos:end]``."""
    portal, pos = _name_at(buf, pos, end)
    if pos + 4 != end:
        raise ProtocolError("malformed Execute message")
    return portal, _INT32.unpack_from(buf, pos)[0]


def parse_at(buf: bytes | bytearray, pos: int, end: int) -> tuple[str, str]:
    """Statement name and text of the Parse payload ``buf[pos:end]`` (``decode_parse``
    without the parameter types, which are checked but not kept)."""
    name, pos = _name_at(buf, pos, end)
    zero = buf.find(0, pos, end)
    if zero < 0:
        raise ProtocolError("string field is not NUL-terminated")
    sql = decode_sql(bytes(buf[pos:zero]))
    pos = zero + 1
    if pos + 2 > end:
        raise ProtocolError("truncated Parse message")
    (count,) = _INT16_1(buf, pos)
    if count < 0 or pos + 2 + 4 * count != end:
        raise ProtocolError("malformed Parse parameter types")
    return name, sql


_BARE_NAMES = {SYNC: "Sync", FLUSH: "Flush", COPY_DONE: "CopyDone"}


def check_bare(mtype: int, raw: bytes) -> None:
    """Refuse a Sync, Flush or CopyDone that carries data, and a CopyFail that is not one
    string: the server answers those with an error (and, for Flush, skips to the next
    Sync), which the gateway would not foresee if it forwarded them."""
    if mtype == COPY_FAIL:
        if raw.find(b"\x00", 5) != len(raw) - 1:
            raise ProtocolError("malformed CopyFail message: its reason must be one "
                                "NUL-terminated string")
    elif len(raw) != 5 and mtype in _BARE_NAMES:
        raise ProtocolError(f"malformed {_BARE_NAMES[mtype]} message: it carries no data, "
                            f"got {len(raw) - 5} bytes")


def decode_describe_or_close(payload: bytes) -> tuple[str, str]:
    """``('S' or 'P', name)`` from a Describe or Close message."""
    if not payload or payload[:1] not in (b"S", b"P"):
        raise ProtocolError("Describe/Close must name a statement (S) or portal (P)")
    name, pos = read_cstr(payload, 1)
    if pos != len(payload):
        raise ProtocolError("trailing bytes in Describe/Close message")
    return chr(payload[0]), name


def decode_execute(payload: bytes) -> tuple[str, int]:
    portal, pos = read_cstr(payload, 0)
    if pos + 4 != len(payload):
        raise ProtocolError("malformed Execute message")
    return portal, _INT32.unpack_from(payload, pos)[0]


def decode_query(payload: bytes) -> str:
    if not payload or payload[-1] != 0:
        raise ProtocolError("Query message is not NUL-terminated")
    return decode_sql(payload[:-1])


class SqlTextError(ProtocolError):
    """Statement text the gateway cannot read exactly as the server would."""


def decode_sql(raw: bytes) -> str:
    """Strict UTF-8; a NUL inside the text would end it early for the server."""
    if 0 in raw:  # (an int: ``b"\0" in raw`` first fails as an index, which costs)
        raise SqlTextError("statement text contains a NUL byte", "22021")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SqlTextError("statement text is not valid UTF-8", "22021") from None


# -- backend messages the gateway reads ------------------------------------------------------


def decode_command_tag(payload: bytes) -> str:
    return payload.rstrip(b"\x00").decode("utf-8", "replace")


def rows_from_tag(tag: str) -> int | None:
    """Row count carried by a CommandComplete tag (``SELECT 5``, ``INSERT 0 3``...)."""
    last = tag.rpartition(" ")[2]
    return int(last) if last.isdigit() else None


@dataclass(frozen=True)
class Field:
    name: str
    table_oid: int
    attnum: int
    type_oid: int
    type_size: int
    type_mod: int
    format_code: int


def decode_row_description(payload: bytes) -> list[Field]:
    (count,) = _INT16.unpack_from(payload, 0)
    pos = 2
    fields = []
    for _ in range(count):
        name, pos = read_cstr(payload, pos)
        table_oid, attnum, type_oid, size, mod, fmt = struct.unpack_from("!IhIhih", payload, pos)
        pos += 18
        fields.append(Field(name, table_oid, attnum, type_oid, size, mod, fmt))
    return fields


def decode_data_row(payload: bytes) -> list[bytes | None]:
    (count,) = _INT16.unpack_from(payload, 0)
    pos = 2
    values: list[bytes | None] = []
    for _ in range(count):
        (size,) = _INT32.unpack_from(payload, pos)
        pos += 4
        if size < 0:
            values.append(None)
        else:
            values.append(payload[pos:pos + size])
            pos += size
    return values


def decode_auth(payload: bytes) -> tuple[int, bytes]:
    if len(payload) < 4:
        raise ProtocolError("truncated authentication message")
    return _INT32.unpack_from(payload, 0)[0], payload[4:]


def decode_backend_key(payload: bytes) -> tuple[int, bytes]:
    if len(payload) < 8:
        raise ProtocolError("truncated BackendKeyData")
    return _INT32.unpack_from(payload, 0)[0], payload[4:]


def decode_parameter_status(payload: bytes) -> tuple[str, str]:
    name, pos = read_cstr(payload, 0)
    value, _ = read_cstr(payload, pos)
    return name, value

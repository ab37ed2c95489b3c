"""The relay's in-place decoders (``proxy/protocol.py``), with bytes alone.

The fast path reads Bind, Execute and Parse where they lie in the receive buffer instead
of slicing them out first; it must read exactly what the slicing decoders read, and
refuse exactly what they refuse.
"""

from __future__ import annotations

import struct

import pytest

from hoopops.proxy import protocol as p


def _bind(portal: bytes, statement: bytes, param_formats: tuple[int, ...],
          params: tuple[bytes | None, ...], result_formats: tuple[int, ...]) -> bytes:
    out = portal + b"\0" + statement + b"\0"
    out += struct.pack(f"!h{len(param_formats)}h", len(param_formats), *param_formats)
    out += struct.pack("!h", len(params))
    for value in params:
        out += struct.pack("!i", -1) if value is None else struct.pack("!i", len(value)) + value
    out += struct.pack(f"!h{len(result_formats)}h", len(result_formats), *result_formats)
    return out


BINDS = [
    _bind(b"", b"", (), (), ()),
    _bind(b"", b"P_0", (), (b"42",), (1,)),
    _bind(b"portal", b"stmt", (0, 1), (b"x", None), (0, 1, 1)),
    _bind("pörtal".encode(), b"s", (1,), (b"\x00\x01", b""), ()),
]


@pytest.mark.parametrize("payload", BINDS)
def test_bind_at_reads_what_scan_bind_reads(payload: bytes) -> None:
    framed = b"junk" + payload + b"next message"  # read in place, between other bytes
    start, end = 4, 4 + len(payload)
    assert p.bind_at(framed, start, end) == p.scan_bind(payload)
    assert p.bind_at(bytearray(framed), start, end) == p.scan_bind(payload)


@pytest.mark.parametrize("payload", [
    b"", b"\0", b"\0\0", b"\0\0\x00\x01\x00\x00\x00\x01\xff\xff\xff\x00",  # truncated
    _bind(b"", b"s", (), (b"abc",), ())[:-3],  # a parameter runs past the end
    _bind(b"", b"s", (), (), ()) + b"\0",  # trailing bytes
    b"\0s\0\xff\xff",  # negative count
    b"\0s\0\0\0\0\x01\xff\xff\xff\xfe\0\0",  # length below -1
    b"no terminator",
])
def test_bind_at_refuses_what_scan_bind_refuses(payload: bytes) -> None:
    with pytest.raises(p.ProtocolError):
        p.scan_bind(payload)
    framed = payload + b"\0\0\0\0 more bytes of the next message"
    with pytest.raises(p.ProtocolError):
        p.bind_at(framed, 0, len(payload))


@pytest.mark.parametrize("payload", [b"\0\0\0\0\0", b"portal\0\0\0\0\x0a", "pört\0".encode()
                                     + b"\0\0\0\x01"])
def test_execute_at(payload: bytes) -> None:
    framed = b"x" + payload + b"y"
    assert p.execute_at(framed, 1, 1 + len(payload)) == p.decode_execute(payload)


@pytest.mark.parametrize("payload", [b"", b"\0\0\0", b"name\0\0\0\0\0\0", b"noterm"])
def test_execute_at_refuses(payload: bytes) -> None:
    with pytest.raises(p.ProtocolError):
        p.decode_execute(payload)
    with pytest.raises(p.ProtocolError):
        p.execute_at(payload + b"\0\0\0\0\0", 0, len(payload))


@pytest.mark.parametrize("payload", [
    b"\0select 1\0\0\0", b"s1\0select $1\0\0\x01\0\0\0\x17", "\0select 'é'\0".encode()
    + b"\0\0"])
def test_parse_at(payload: bytes) -> None:
    msg = p.decode_parse(payload)
    assert p.parse_at(b"ab" + payload + b"cd", 2, 2 + len(payload)) == (msg.name, msg.sql)


@pytest.mark.parametrize(("payload", "error"), [
    (b"\0select 1\0\0", p.ProtocolError),  # truncated parameter count
    (b"\0select 1\0\0\x01", p.ProtocolError),  # a parameter type missing
    (b"\0select \xff\0\0\0", p.SqlTextError),  # not UTF-8
    (b"\0select 1", p.ProtocolError),  # no terminator
])
def test_parse_at_refuses(payload: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        p.decode_parse(payload)
    with pytest.raises(error):
        p.parse_at(payload + b"\0\0\0\0", 0, len(payload))

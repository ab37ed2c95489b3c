"""A tiny raw-socket PostgreSQL frontend for the hostile-bytes and protocol tests.

It speaks just enough of the protocol (startup, cleartext password, simple query) to put
the gateway in a known state, then lets a test write any bytes it likes. Every read has a
deadline so a test fails instead of hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from dataclasses import dataclass, field

PROTOCOL_3_0 = 196608
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102


def startup_packet(params: dict[str, str], code: int = PROTOCOL_3_0) -> bytes:
    body = struct.pack("!I", code) + b"".join(
        k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    return struct.pack("!I", len(body) + 4) + body


def message(mtype: bytes, payload: bytes = b"") -> bytes:
    return mtype + struct.pack("!I", len(payload) + 4) + payload


def query(sql: str) -> bytes:
    return message(b"Q", sql.encode() + b"\0")


def error_fields(payload: bytes) -> dict[str, str]:
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(payload) and payload[pos] != 0:
        end = payload.index(b"\0", pos + 1)
        fields[chr(payload[pos])] = payload[pos + 1:end].decode("utf-8", "replace")
        pos = end + 1
    return fields


@dataclass
class Reply:
    """Messages up to (and including) a stopping point."""

    messages: list[tuple[bytes, bytes]] = field(default_factory=list)
    closed: bool = False

    def types(self) -> bytes:
        return b"".join(t for t, _ in self.messages)

    def errors(self) -> list[dict[str, str]]:
        return [error_fields(p) for t, p in self.messages if t == b"E"]

    def rows(self) -> list[list[str | None]]:
        out = []
        for t, p in self.messages:
            if t != b"D":
                continue
            (count,) = struct.unpack_from("!h", p, 0)
            pos, row = 2, []
            for _ in range(count):
                (size,) = struct.unpack_from("!i", p, pos)
                pos += 4
                if size < 0:
                    row.append(None)
                else:
                    row.append(p[pos:pos + size].decode())
                    pos += size
            out.append(row)
        return out


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.backend_pid: int | None = None
        self.backend_key: bytes | None = None
        self.parameters: dict[str, str] = {}

    @classmethod
    async def open(cls, port: int, host: str = "127.0.0.1") -> RawClient:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_byte(self, within: float = 5) -> bytes:
        return await asyncio.wait_for(self.reader.readexactly(1), within)

    async def read_message(self, within: float = 5) -> tuple[bytes, bytes]:
        header = await asyncio.wait_for(self.reader.readexactly(5), within)
        mtype, length = header[:1], struct.unpack("!I", header[1:])[0]
        payload = await asyncio.wait_for(self.reader.readexactly(length - 4), within)
        return mtype, payload

    async def read_until(self, stop: bytes = b"Z", within: float = 10) -> Reply:
        """Messages until one of type ``stop`` (or an error when stop is 'E'), or EOF."""
        reply = Reply()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"no {stop!r} within {within}s; got {reply.types()!r}")
            try:
                mtype, payload = await self.read_message(remaining)
            except (asyncio.IncompleteReadError, ConnectionError):
                reply.closed = True
                return reply
            reply.messages.append((mtype, payload))
            if mtype in stop:
                return reply

    async def wait_closed_by_peer(self, within: float = 10) -> bytes:
        """Everything the gateway still sends until it closes the connection."""
        data = b""
        async with asyncio.timeout(within):
            while True:
                try:
                    chunk = await self.reader.read(65536)
                except ConnectionError:
                    return data
                if not chunk:
                    return data
                data += chunk

    async def login(self, token: str, database: str = "appdb", user: str = "agent",
                    extra: dict[str, str] | None = None) -> Reply:
        """Startup + token; returns the messages up to ReadyForQuery (or the FATAL)."""
        await self.send(startup_packet({"user": user, "database": database,
                                        **(extra or {})}))
        reply = await self.read_until(b"RE")
        if reply.messages and reply.messages[-1][0] == b"R":
            await self.send(message(b"p", token.encode() + b"\0"))
            rest = await self.read_until(b"ZE")
            reply.messages += rest.messages
            reply.closed = rest.closed
        for mtype, payload in reply.messages:
            if mtype == b"K":
                self.backend_pid = struct.unpack_from("!i", payload)[0]
                self.backend_key = payload[4:]
            elif mtype == b"S":
                name, value, _ = payload.split(b"\0", 2)
                self.parameters[name.decode()] = value.decode()
        return reply

    async def simple(self, sql: str, within: float = 10) -> Reply:
        await self.send(query(sql))
        return await self.read_until(b"Z", within)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()
            await asyncio.wait_for(self.writer.wait_closed(), 2)


async def send_cancel(port: int, pid: int, key: bytes) -> None:
    """A raw CancelRequest, as libpq sends it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        body = struct.pack("!I", CANCEL_REQUEST) + struct.pack("!i", pid) + key
        writer.write(struct.pack("!I", len(body) + 4) + body)
        await writer.drain()
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await asyncio.wait_for(reader.read(1), 5)
    finally:
        writer.close()

"""Calibration relays: what a Python proxy costs before it does anything useful.

    python benchmarks/_relay.py {streams|protocol} LISTEN_PORT UPSTREAM_PORT [--uvloop]

* ``streams``: two ``StreamReader.read`` -> ``StreamWriter.write`` pump tasks per
  connection, bytes untouched: the structure ``hoopops/proxy/session.py`` had before its
  relay moved to protocol callbacks.
* ``protocol``: ``asyncio.Protocol`` callbacks that frame every message in both directions
  (type byte + length, as a gateway must to attribute replies) and forward each chunk
  unchanged in ``data_received``, with no task switch per read: the floor for a gateway
  written in Python, and the structure the gateway's relay now has.

The client authenticates with PostgreSQL itself through these relays (SCRAM passes through
untouched), so they need no configuration. Loopback only; they exit on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import sys
from collections import deque
from collections.abc import Callable
from typing import cast

_HDR = struct.Struct("!BI").unpack_from
_READY_FOR_QUERY = ord("Z")
_SYNC = ord("S")


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(262144):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


async def serve_streams(listen: int, upstream: int) -> None:
    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", upstream, limit=1 << 20)
        await asyncio.gather(_pump(client_r, up_w), _pump(up_r, client_w),
                             return_exceptions=True)

    server = await asyncio.start_server(handle, "127.0.0.1", listen, limit=1 << 20)
    async with server:
        await server.serve_forever()


class _Framer:
    """Splits a byte stream into complete messages; returns the complete prefix."""

    def __init__(self) -> None:
        self.rest = b""

    def complete(self, data: bytes, on_type: int, callback: Callable[[int], object]) -> bytes:
        if self.rest:
            data = self.rest + data
            self.rest = b""
        pos, end = 0, len(data)
        while end - pos >= 5:
            mtype, length = _HDR(data, pos)
            nxt = pos + 1 + length
            if nxt > end:
                break
            if mtype == on_type:
                callback(mtype)
            pos = nxt
        if pos < end:
            self.rest = data[pos:]
            data = data[:pos]
        return data


class _UpstreamSide(asyncio.Protocol):
    def __init__(self, client: _ClientSide) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.framer = _Framer()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.client.startup:
            # The server's side of the login is framed from its first byte; its first
            # ReadyForQuery ends the login, and the client sends nothing before seeing it.
            if data != b"N":  # the answer to an SSLRequest is one untyped byte
                self.framer.complete(data, _READY_FOR_QUERY, self.client.logged_in)
            self.client.send(data)
            return
        pending = self.client.pending
        out = self.framer.complete(data, _READY_FOR_QUERY,
                                   lambda _t: pending.popleft() if pending else None)
        if out:
            self.client.send(out)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.close()

    # Backpressure: while PostgreSQL's socket is full, stop reading from the client.
    def pause_writing(self) -> None:
        if self.client.transport is not None:
            self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.client.transport is not None:
            self.client.transport.resume_reading()


class _ClientSide(asyncio.Protocol):
    def __init__(self, upstream: int) -> None:
        self.upstream_port = upstream
        self.transport: asyncio.Transport | None = None
        self.up = _UpstreamSide(self)
        self.early: list[bytes] | None = []
        self.pending: deque[int] = deque()
        self.framer = _Framer()
        self.startup = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.create_connection(lambda: self.up, "127.0.0.1", self.upstream_port)
        assert self.up.transport is not None
        for data in self.early or ():
            self.up.transport.write(data)
        self.early = None

    def send(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def logged_in(self, _mtype: int) -> None:
        self.startup = False

    def data_received(self, data: bytes) -> None:
        if self.startup:
            # Startup packet (untyped) and the SASL messages pass through untouched.
            if self.early is not None:
                self.early.append(data)
            elif self.up.transport is not None:
                self.up.transport.write(data)
            return
        pending = self.pending
        out = self.framer.complete(data, _SYNC, pending.append)
        if out and self.up.transport is not None:
            self.up.transport.write(out)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.up.transport is not None:
            self.up.transport.close()

    # Backpressure: while the client's socket is full, stop reading from PostgreSQL, so a
    # large result streams with flat memory, as a gateway must.
    def pause_writing(self) -> None:
        if self.up.transport is not None:
            self.up.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.up.transport is not None:
            self.up.transport.resume_reading()


async def serve_protocol(listen: int, upstream: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _ClientSide(upstream), "127.0.0.1", listen)
    async with server:
        await server.serve_forever()


def main(argv: list[str]) -> int:
    kind, listen, upstream = argv[0], int(argv[1]), int(argv[2])
    if "--uvloop" in argv:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    serve = serve_streams if kind == "streams" else serve_protocol
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(listen, upstream))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Hostile and broken clients, on raw sockets.

Every case checks what the offending client gets (a protocol error, or just a closed
socket), and that the gateway then still serves a normal client: a malformed session
never takes others down. Also: deadlines and connection caps keep half-open sockets from
locking legitimate agents out, and FunctionCall is refused without ending the session.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator

import asyncpg
import psycopg
import pytest

from hoopops.devdb import LocalPostgres
from tests.clients.gw import logged_in, serves
from tests.clients.rawpg import RawClient, error_fields, message, query, startup_packet
from tests.clients.util import poll, psql_args, run, service_backends
from tests.conftest import RunningGateway, psql_path


def fatal(rest: bytes) -> dict[str, str]:
    assert rest[:1] == b"E", rest[:40]
    (length,) = struct.unpack_from("!I", rest, 1)
    fields = error_fields(rest[5:1 + length])
    assert fields["S"] == "FATAL"
    return fields


@pytest.fixture
async def gw(gateway: RunningGateway) -> AsyncIterator[RunningGateway]:
    yield gateway
    await serves(gateway)  # after every hostile case


# -- startup phase ------------------------------------------------------------------------

def _with_length(body: bytes) -> bytes:
    return struct.pack("!I", len(body) + 4) + body


BAD_STARTUPS = {
    "length too small": (struct.pack("!I", 3), "08P01", "invalid startup packet length"),
    "length enormous": (struct.pack("!I", 0x7FFFFFFF) + b"xxxx", "08P01",
                        "invalid startup packet length"),
    "unknown protocol": (struct.pack("!II", 8, 0x12345678), "0A000",
                         "unsupported frontend protocol"),
    "value not terminated": (struct.pack("!II", 18, 196608) + b"user\0agent", "08P01",
                             "not NUL-terminated"),
    "packet not terminated": (struct.pack("!II", 19, 196608) + b"user\0agent\0", "08P01",
                              "not terminated"),
    "duplicate parameter": (_with_length(startup_packet({"user": "a"})[4:-1]
                                         + b"user\0b\0\0"), "08P01", "given twice"),
    "trailing bytes": (struct.pack("!II", 23, 196608) + b"user\0agent\0\0xyzw", "08P01",
                       "unexpected bytes after"),
    "short cancel": (struct.pack("!III", 12, 80877102, 1), "08P01",
                     "malformed CancelRequest"),
    "no user": (startup_packet({"database": "appdb"}), "28000", "no user name"),
}


@pytest.mark.parametrize("case", list(BAD_STARTUPS))
async def test_bad_startup_packets(gw: RunningGateway, case: str) -> None:
    data, sqlstate, words = BAD_STARTUPS[case]
    raw = await RawClient.open(gw.port)
    try:
        await raw.send(data)
        rest = await raw.wait_closed_by_peer(5)
        fields = fatal(rest)
        assert fields["C"] == sqlstate, fields
        assert words in fields["M"], fields
    finally:
        await raw.close()


async def test_truncated_startup_then_close(gw: RunningGateway) -> None:
    for cut in (1, 3, 4, 10):
        raw = await RawClient.open(gw.port)
        await raw.send(startup_packet({"user": "agent", "database": "appdb"})[:cut])
        await raw.close()
    await serves(gw)


async def test_non_password_message_during_auth(gw: RunningGateway) -> None:
    raw = await RawClient.open(gw.port)
    try:
        await raw.send(startup_packet({"user": "agent", "database": "appdb"}))
        assert (await raw.read_message())[0] == b"R"
        await raw.send(query("select 1"))
        fields = fatal(await raw.wait_closed_by_peer(5))
        assert fields["C"] == "08P01" and "password message" in fields["M"]
    finally:
        await raw.close()


async def test_huge_password_message_refused_without_reading_it(gw: RunningGateway) -> None:
    raw = await RawClient.open(gw.port)
    try:
        await raw.send(startup_packet({"user": "agent", "database": "appdb"}))
        assert (await raw.read_message())[0] == b"R"
        await raw.send(b"p" + struct.pack("!I", 100_000_000) + b"eyJ")
        fields = fatal(await raw.wait_closed_by_peer(5))
        assert fields["C"] == "28P01" and "64 KiB" in fields["M"]
    finally:
        await raw.close()


async def test_startup_deadline_closes_silent_sockets(gateway_factory) -> None:
    gw = await gateway_factory("limits:\n  startup_timeout: 1s\n")
    loop = asyncio.get_running_loop()
    for opening in (b"", b"\x00", startup_packet({"user": "agent", "database": "appdb"})):
        raw = await RawClient.open(gw.port)
        try:
            started = loop.time()
            await raw.send(opening)
            rest = await raw.wait_closed_by_peer(5)
            assert loop.time() - started < 4
            if opening.startswith(b"\x00\x00"):
                assert rest[:1] == b"R"  # asked for the token, which never came
                rest = rest[9:]
            fields = fatal(rest)
            assert "limits.startup_timeout" in fields["M"]
        finally:
            await raw.close()
    await serves(gw)


async def test_half_open_sockets_do_not_lock_out_psql(gateway: RunningGateway,
                                                      pg: LocalPostgres) -> None:
    sockets = []
    try:
        for i in range(200):
            raw = await RawClient.open(gateway.port)
            await raw.send(startup_packet({"user": "x", "database": "appdb"})[: i % 6])
            sockets.append(raw)
        loop = asyncio.get_running_loop()
        started = loop.time()
        done = await run(psql_args(psql_path(pg), gateway.port, "-At", "-c",
                                   "select 'let in'"), env=gateway.env())
        assert done.stdout.strip() == "let in", done.stderr
        assert loop.time() - started < 5
    finally:
        for raw in sockets:
            await raw.close()


async def test_cap_full_of_half_open_sockets_still_admits_agents(gateway_factory) -> None:
    gw = await gateway_factory("limits:\n  max_connections: 20\n")
    sockets = []
    try:
        for _ in range(20):  # every slot taken by sockets that never authenticate
            raw = await RawClient.open(gw.port)
            await raw.send(b"\x00\x00")
            sockets.append(raw)
        conns = []
        for i in range(5):  # each newcomer displaces the oldest unauthenticated socket
            conn = await asyncpg.connect(gw.dsn(gw.token(f"agent-{i}")))
            assert await conn.fetchval("select 1") == 1
            conns.append(conn)
        fields = fatal(await sockets[0].wait_closed_by_peer(5))
        assert fields["C"] == "53300" and "not authenticated yet" in fields["M"]
        # Once the slots hold real sessions, the cap is enforced for everyone.
        conns += [await asyncpg.connect(gw.dsn(gw.token(f"more-{i}"))) for i in range(15)]
        with pytest.raises(asyncpg.TooManyConnectionsError) as info:
            await asyncpg.connect(gw.dsn(gw.token("one-too-many")))
        assert "limits.max_connections = 20" in str(info.value)
        for conn in conns:
            await conn.close()
    finally:
        for raw in sockets:
            await raw.close()


# -- established sessions -----------------------------------------------------------------


async def test_bad_message_length_mid_session(gw: RunningGateway) -> None:
    raw = await logged_in(gw)
    try:
        await raw.send(b"Q" + struct.pack("!I", 2))
        fields = fatal(await raw.wait_closed_by_peer(5))
        assert fields["C"] == "08P01" and "invalid message length" in fields["M"]
    finally:
        await raw.close()


async def test_unknown_message_type(gw: RunningGateway) -> None:
    raw = await logged_in(gw)
    try:
        await raw.send(message(b"z", b"whatever"))
        fields = fatal(await raw.wait_closed_by_peer(5))
        assert fields["C"] == "08P01" and "unexpected message type 'z'" in fields["M"]
    finally:
        await raw.close()


async def test_malformed_bind(gw: RunningGateway) -> None:
    raw = await logged_in(gw)
    try:
        await raw.send(message(b"P", b"\0select $1::int\0\0\0")
                       + message(b"B", b"\0\0\x00\x01\x00\x00\x00\x01\xff\xff\xff\x00")
                       + message(b"S"))
        rest = await raw.wait_closed_by_peer(5)
        # ParseComplete may come first; then the FATAL about the Bind.
        idx = rest.find(b"E")
        fields = fatal(rest[idx:])
        assert fields["C"] == "08P01" and "Bind" in fields["M"]
    finally:
        await raw.close()


async def test_truncated_frame_then_close_releases_upstream(gw: RunningGateway,
                                                           pg: LocalPostgres) -> None:
    before = await service_backends(pg)
    raw = await logged_in(gw)
    assert await service_backends(pg) == before + 1
    await raw.send(b"Q" + struct.pack("!I", 100) + b"select 1")
    await raw.close()

    async def released() -> bool:
        return await service_backends(pg) <= before
    await poll(released, 10, what="the upstream backend of the broken session to close")


async def test_oversized_message_refused_with_54000(gateway_factory) -> None:
    gw = await gateway_factory("limits:\n  max_message_size: 64KiB\n")
    big = "select '" + "x" * 1_000_000 + "'"
    # Just under the limit still works.
    conn = await psycopg.AsyncConnection.connect(gw.dsn(), autocommit=True)
    cur = await conn.execute("select length(%s)", ("y" * 60_000,))
    assert await cur.fetchone() == (60_000,)
    with pytest.raises(psycopg.Error) as info:
        await conn.execute(big)
    assert "limits.max_message_size" in str(info.value)
    assert info.value.sqlstate in ("54000", None)
    assert conn.closed or conn.broken
    await conn.close()
    # The same on the wire: the FATAL arrives although the client is still sending.
    raw = await logged_in(gw)
    try:
        await raw.send(b"Q" + struct.pack("!I", 1_000_005))
        await raw.send(b"x" * 200_000)
        fields = fatal(await raw.wait_closed_by_peer(5))
        assert fields["C"] == "54000"
        assert "65536" in fields["M"] and "limits.max_message_size" in fields["M"]
    finally:
        await raw.close()
    await serves(gw)


async def test_function_call_refused_session_goes_on(gw: RunningGateway) -> None:
    raw = await logged_in(gw)
    try:
        # FunctionCall: oid of int4abs, one text-format argument "-5", text result.
        payload = struct.pack("!Ihh", 1397, 1, 0) + struct.pack("!hi", 1, 2) + b"-5" \
            + struct.pack("!h", 0)
        await raw.send(message(b"F", payload))
        reply = await raw.read_until(b"Z")
        (error,) = reply.errors()
        assert error["S"] == "ERROR" and error["C"] == "0A000"
        assert "function-call" in error["M"] and "SELECT" in error["M"]
        assert (await raw.simple("select abs(-5)")).rows() == [["5"]]
        # In a transaction too: the error aborts it, exactly as a server error would.
        await raw.simple("begin")
        await raw.send(message(b"F", payload))
        reply = await raw.read_until(b"Z")
        assert reply.errors()[0]["C"] == "0A000"
        assert reply.messages[-1] == (b"Z", b"E")
        reply = await raw.simple("select 1")
        assert reply.errors()[0]["C"] == "25P02"
        assert (await raw.simple("rollback")).messages[-1] == (b"Z", b"I")
        assert (await raw.simple("select 'on'")).rows() == [["on"]]
    finally:
        await raw.close()


async def test_invalid_utf8_statement_refused_session_goes_on(gw: RunningGateway) -> None:
    raw = await logged_in(gw)
    try:
        await raw.send(message(b"Q", b"select '\xff\xfe'\0"))
        reply = await raw.read_until(b"Z")
        assert reply.errors()[0]["C"] == "22021"
        assert (await raw.simple("select 'ok'")).rows() == [["ok"]]
    finally:
        await raw.close()


async def test_password_message_mid_session_is_a_protocol_error(gw: RunningGateway) -> None:
    raw = await logged_in(gw)
    try:
        await raw.send(message(b"p", b"again\0"))
        fields = fatal(await raw.wait_closed_by_peer(5))
        assert fields["C"] == "08P01"
    finally:
        await raw.close()


async def test_terminate_and_pipelined_garbage(gw: RunningGateway) -> None:
    raw = await logged_in(gw)
    try:
        # Terminate ends the session; whatever follows it is ignored.
        await raw.send(message(b"X") + b"\xde\xad\xbe\xef" * 10)
        assert await raw.wait_closed_by_peer(5) == b""
    finally:
        await raw.close()


async def test_sync_flush_and_empty_query(gw: RunningGateway) -> None:
    raw = await logged_in(gw)
    try:
        await raw.send(message(b"S"))
        assert (await raw.read_until(b"Z")).types() == b"Z"
        await raw.send(message(b"H"))
        reply = await raw.simple("")
        assert reply.types() == b"IZ"
        assert (await raw.simple("select 3")).rows() == [["3"]]
    finally:
        await raw.close()


async def test_many_broken_sessions_leave_others_untouched(gw: RunningGateway) -> None:
    survivor = await psycopg.AsyncConnection.connect(gw.dsn(), autocommit=True)
    try:
        await survivor.execute("create temp table keep (v int)")
        await survivor.execute("insert into keep values (1)")
        for junk in (b"Q\x00\x00\x00\x01", message(b"z"), b"\xff" * 64,
                     b"D" + struct.pack("!I", 5) + b"S"):
            raw = await logged_in(gw)
            await raw.send(junk)
            await raw.wait_closed_by_peer(5)
            await raw.close()
        cur = await survivor.execute("select v from keep")
        assert await cur.fetchone() == (1,)
    finally:
        await survivor.close()

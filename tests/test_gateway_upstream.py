"""The gateway's own login to the target, as the agent experiences it.

Unreachable and silent targets give a clear error naming the target within the timeout
(never a hang, never the service password); the gateway logs in with trust, cleartext,
md5 and SCRAM-SHA-256 and over a Unix socket, and the agent never sees that exchange.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import quote

import asyncpg
import pytest

from hoopops.devdb import LocalPostgres, free_port
from tests.clients.gw import GatewayPool
from tests.clients.util import psql_args, run
from tests.conftest import RunningGateway, psql_path


@pytest.fixture
async def pool(tmp_path: Path) -> AsyncIterator[GatewayPool]:
    gateways = GatewayPool(tmp_path)
    yield gateways
    await gateways.close()


def _to(gw: RunningGateway, target: str) -> str:
    return gw.dsn().replace("/appdb?", f"/{target}?")


async def test_unreachable_target_named_quickly(pool: GatewayPool, pg: LocalPostgres) -> None:
    port = free_port()
    gw = await pool.start({"appdb": pg.dsn(),
                           "down": f"postgresql://svc:TopSecret99@127.0.0.1:{port}/x"})
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(asyncpg.PostgresError) as info:
        await asyncpg.connect(_to(gw, "down"))
    assert loop.time() - started < 3
    message = str(info.value)
    assert "target 'down'" in message and f"127.0.0.1:{port}" in message
    assert "unreachable" in message
    assert "TopSecret99" not in message
    assert info.value.sqlstate == "08006"
    # psql users read the same line.
    done = await run(psql_args(psql_path(pg), gw.port, "-c", "select 1", database="down"),
                     env=gw.env())
    assert done.returncode == 2 and "target 'down'" in done.stderr
    # The other target is unaffected.
    conn = await asyncpg.connect(gw.dsn())
    try:
        assert await conn.fetchval("select 1") == 1
    finally:
        await conn.close()


async def test_silent_target_times_out_with_its_name(pool: GatewayPool) -> None:
    held: list[asyncio.StreamWriter] = []

    async def swallow(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # accept, then never answer

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        gw = await pool.start({
            "silent": f"postgresql://svc:pw@127.0.0.1:{port}/x?connect_timeout=1",
            "silent_default": f"postgresql://svc:pw@127.0.0.1:{port}/x",
        }, "limits:\n  startup_timeout: 2s\n")
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(asyncpg.PostgresError) as info:
            await asyncpg.connect(_to(gw, "silent"))
        assert loop.time() - started < 4
        assert "target 'silent'" in str(info.value)
        assert "did not answer within 1s" in str(info.value)
        # With the upstream's connect_timeout (10s default) longer than the gateway's
        # startup deadline, the client still learns which target is at fault.
        started = loop.time()
        with pytest.raises(asyncpg.PostgresError) as info:
            await asyncpg.connect(_to(gw, "silent_default"))
        assert loop.time() - started < 5
        assert "target 'silent_default'" in str(info.value)
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_wrong_service_password_named_not_echoed(pool: GatewayPool,
                                                       pg: LocalPostgres) -> None:
    gw = await pool.start({"bad": pg.dsn(password="Wrong-Pass-123")})
    with pytest.raises(asyncpg.PostgresError) as info:
        await asyncpg.connect(_to(gw, "bad"))
    message = str(info.value)
    assert "target 'bad' refused the gateway's login" in message
    assert "password authentication failed" in message
    assert "Wrong-Pass-123" not in message
    # The service account's login failing is not about the agent's token.
    assert info.value.sqlstate == "08006"


# -- authentication methods -----------------------------------------------------------------

_METHODS = {"trust": "hh_trust", "password": "hh_cleartext", "md5": "hh_md5",
            "scram-sha-256": "hh_scram"}
# The server SASLpreps a SCRAM password before hashing it (NFKC, soft hyphen dropped), so
# the gateway must too: "\ufb01" is the "fi" ligature, "\u00ad" a soft hyphen.
_UNICODE_PASSWORD = "\ufb01-pass\u00adword-\u00fc\u2003x"


@pytest.fixture(scope="module")
def auth_methods(pg: LocalPostgres) -> Iterator[dict[str, str]]:
    """One role per method, with pg_hba lines that force that method for it."""
    hba = pg.data / "pg_hba.conf"
    original = hba.read_text()
    for method, role in _METHODS.items():
        encryption = "md5" if method == "md5" else "scram-sha-256"
        pg.psql(f"set password_encryption = '{encryption}'; "
                f"create role {role} login password 'pw-{role}'")
        pg.psql(f"grant connect on database app to {role}")
    pg.psql(f"create role hh_unicode login password '{_UNICODE_PASSWORD}'")
    pg.psql("create role hh_limited login password 'pw-hh_limited' connection limit 0")
    lines = [f"host app {role} 127.0.0.1/32 {method}" for method, role in _METHODS.items()]
    hba.write_text("\n".join(lines) + "\n" + original)
    pg.psql("select pg_reload_conf()")
    try:
        urls = {method: f"postgresql://{role}:pw-{role}@127.0.0.1:{pg.port}/app"
                for method, role in _METHODS.items()}
        urls["unicode"] = (f"postgresql://hh_unicode:{quote(_UNICODE_PASSWORD, safe='')}"
                           f"@127.0.0.1:{pg.port}/app")
        urls["limited"] = f"postgresql://hh_limited:pw-hh_limited@127.0.0.1:{pg.port}/app"
        yield urls
    finally:
        hba.write_text(original)
        pg.psql("select pg_reload_conf()")


async def test_upstream_auth_methods(auth_methods: dict[str, str], pool: GatewayPool) -> None:
    names = {method: method.replace("-", "_") for method in auth_methods}
    gw = await pool.start({names[m]: dsn + "?sslmode=disable"
                           for m, dsn in auth_methods.items()})
    for method, role in [*_METHODS.items(), ("unicode", "hh_unicode")]:
        conn = await asyncpg.connect(_to(gw, names[method]))
        try:
            assert await conn.fetchval("select current_user") == role, method
        finally:
            await conn.close()


async def test_upstream_over_unix_socket(pool: GatewayPool, pg: LocalPostgres) -> None:
    dsn = (f"postgresql://hoopops_svc:{pg.service_password}@/app?host={pg.sockets}"
           f"&port={pg.port}")
    gw = await pool.start({"appdb": dsn})
    conn = await asyncpg.connect(gw.dsn())
    try:
        # inet_server_addr() is NULL on a Unix-socket connection.
        assert await conn.fetchval("select inet_server_addr() is null") is True
        assert await conn.fetchval("select count(*) from generate_series(1, 1000)") == 1000
    finally:
        await conn.close()


async def test_target_refusal_keeps_its_sqlstate(auth_methods: dict[str, str],
                                                 pool: GatewayPool) -> None:
    # The role may not log in at all (connection limit 0): the server answers 53300,
    # which tells a client "too many connections, retry later" -- it is passed on.
    gw = await pool.start({"limited": auth_methods["limited"]})
    with pytest.raises(asyncpg.TooManyConnectionsError) as info:
        await asyncpg.connect(_to(gw, "limited"))
    assert "target 'limited' refused the gateway's login" in str(info.value)

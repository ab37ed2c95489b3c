"""The gateway relays a real client end to end."""

from __future__ import annotations

import asyncio

import asyncpg

from tests.conftest import RunningGateway, psql_path


async def test_psql_query_through_gateway(gateway: RunningGateway, pg) -> None:
    proc = await asyncio.create_subprocess_exec(
        psql_path(pg), "-X", "-At", "-h", "127.0.0.1", "-p", str(gateway.port), "-U", "agent",
        "-d", "appdb", "-c", "select 40 + 2", env=gateway.env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert out.decode().strip() == "42"


async def test_asyncpg_through_gateway(gateway: RunningGateway) -> None:
    conn = await asyncpg.connect(gateway.dsn())
    try:
        assert await conn.fetchval("select $1::int * 2", 21) == 42
        assert await conn.fetchval("select current_user") == "hoopops_svc"
    finally:
        await conn.close()

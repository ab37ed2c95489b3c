"""pgbench through the gateway: initialisation (COPY, DDL, VACUUM) and short runs in every
query mode, checked for zero failed transactions."""

from __future__ import annotations

import re

import pytest

from hoopops.devdb import LocalPostgres
from tests.clients.util import run
from tests.conftest import RunningGateway


def _pgbench(pg: LocalPostgres, gw: RunningGateway, *args: str) -> list[str]:
    return [pg.tool("pgbench"), "-h", "127.0.0.1", "-p", str(gw.port), "-U", "agent", *args,
            "appdb"]


def _processed(output: str) -> tuple[int, int]:
    match = re.search(r"number of transactions actually processed: (\d+)/(\d+)", output)
    assert match, output
    return int(match.group(1)), int(match.group(2))


@pytest.fixture
async def initialised(gateway: RunningGateway, pg: LocalPostgres) -> RunningGateway:
    done = await run(_pgbench(pg, gateway, "-i", "-s", "1", "-q"), env=gateway.env(),
                     within=90)
    assert done.returncode == 0, done.stderr
    assert "done in" in done.stderr
    return gateway


async def test_pgbench_init_and_modes(initialised: RunningGateway, pg: LocalPostgres) -> None:
    gw = initialised
    from tests.clients.util import admin

    conn = await admin(pg)
    try:
        assert await conn.fetchval("select count(*) from pgbench_accounts") == 100_000
    finally:
        await conn.close()
    for mode in ("simple", "extended", "prepared"):
        done = await run(_pgbench(pg, gw, "-n", "-S", "-M", mode, "-c", "4", "-j", "2",
                                  "-t", "250"), env=gw.env(), within=60)
        assert done.returncode == 0, f"{mode}: {done.stderr}"
        assert _processed(done.stdout) == (1000, 1000), done.stdout
        assert "number of failed transactions: 0" in done.stdout, done.stdout
    # The TPC-B-like default script: transactions with updates, in prepared mode.
    done = await run(_pgbench(pg, gw, "-n", "-M", "prepared", "-c", "4", "-j", "2", "-t", "50"),
                     env=gw.env(), within=60)
    assert done.returncode == 0, done.stderr
    assert _processed(done.stdout) == (200, 200), done.stdout
    assert "number of failed transactions: 0" in done.stdout, done.stdout

"""What masking cannot fix, through the real gateway with the shipped policy set.

A seeded database of fake PII (``hoopops.demo.seed``) behind a gateway running the
shipped ``policies/`` folder unchanged. Masking alone lets ``WHERE ssn LIKE '123-45-%'``
bisect a masked SSN through which rows come back; the shipped policy holds such a
statement for an analyst, who sees why (the masking facts reach the audit trail and the
approval). Copies of sensitive values and masked placeholders written back are refused
outright; a filtered read on ordinary columns runs as before; the session goes on; the
break-glass group is not held.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from hoopops import events
from hoopops.approvals import Decision
from hoopops.config import load_config
from hoopops.demo.seed import seed
from hoopops.devdb import SERVICE_USER, LocalPostgres
from hoopops.tui.widgets.approval_detail import masking_summary
from tests.clients.util import poll, psql_args, run
from tests.conftest import AUDIENCE, ISSUER, JWT_SECRET, RunningGateway, psql_path

ROOT = Path(__file__).resolve().parent.parent
HELD = "sensitive-inference-needs-review"


@pytest.fixture(scope="module")
async def factsdb(pg: LocalPostgres) -> AsyncIterator[tuple[str, list[Any]]]:
    name = f"factsdb_{secrets.token_hex(4)}"
    pg.psql(f"CREATE DATABASE {name} OWNER {SERVICE_USER}")
    conn = await asyncpg.connect(pg.dsn(database=name))
    try:
        people, _ = await seed(conn)
        await conn.execute("CREATE TABLE public.scratch (v text)")
    finally:
        await conn.close()
    yield name, people
    pg.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="module")
async def gw(factsdb: tuple[str, list[Any]], pg: LocalPostgres,
             tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningGateway]:
    from hoopops.gateway import build_gateway

    folder = tmp_path_factory.mktemp("facts-gw")
    shutil.copytree(ROOT / "policies", folder / "policies")  # the shipped set, unchanged
    lines = ["listen: 127.0.0.1:0", "targets:", "  appdb:",
             f"    upstream: {pg.dsn(database=factsdb[0])}", "identity:",
             f"  issuer: {ISSUER}", f"  audience: {AUDIENCE}", f"  hs256_secret: {JWT_SECRET}",
             f"policies: {folder / 'policies'}", "approvals:", "  timeout: 30s",
             "  poll_interval: 0.1", "audit:", f"  path: {folder / 'audit.db'}"]
    (folder / "hoopops.yaml").write_text("\n".join(lines) + "\n")
    gateway = await build_gateway(load_config(folder / "hoopops.yaml"))
    await gateway.start()
    yield RunningGateway(gateway, gateway.config, gateway.port)  # type: ignore[attr-defined]
    await gateway.stop(grace=1)  # type: ignore[attr-defined]


def _broker(gw: RunningGateway) -> Any:
    return gw.gateway.broker  # type: ignore[attr-defined]


async def _pending(gw: RunningGateway, sql: str) -> Any:
    """The approval the gateway holds ``sql`` under (it must be held for this rule)."""
    found: list[Any] = []

    async def held() -> bool:
        found[:] = [p for p in _broker(gw).pending() if p.view.sql == sql]
        return bool(found)
    await poll(held, 10, 0.02, what=f"{sql!r} to be held")
    [pending] = found
    assert pending.view.rule_id == HELD
    return pending


async def _direct(pg: LocalPostgres, database: str, sql: str, *args: object) -> list[Any]:
    conn = await asyncpg.connect(pg.dsn(database=database))
    try:
        return [tuple(r) for r in await conn.fetch(sql, *args)]
    finally:
        await conn.close()


async def test_bisecting_like_is_held_asyncpg(gw: RunningGateway, factsdb: tuple[str, list],
                                              pg: LocalPostgres) -> None:
    name, people = factsdb
    prefix = people[0].ssn[:7] + "%"
    bisect = "SELECT id FROM customers WHERE ssn LIKE $1 ORDER BY id"
    ordinary = "SELECT id, full_name FROM customers WHERE city = $1 ORDER BY id"
    conn = await asyncpg.connect(gw.dsn())
    try:
        # Denied: the analyst saw why it was held; the session goes on.
        task = asyncio.ensure_future(conn.fetch(bisect, prefix))
        pending = await _pending(gw, bisect)
        await _broker(gw).decide(pending.id, Decision.DENIED, "analyst-1", "no bisecting")
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="no bisecting"):
            await asyncio.wait_for(task, 10)
        rows = [tuple(r) for r in await conn.fetch(ordinary, people[0].city)]
        assert rows and rows == await _direct(pg, name, ordinary, people[0].city)
        # Approved: it runs, once, and returns what it would have returned directly.
        task = asyncio.ensure_future(conn.fetch(bisect, prefix))
        pending = await _pending(gw, bisect)
        await _broker(gw).decide(pending.id, Decision.APPROVED_ONCE, "analyst-1")
        got = [tuple(r) for r in await asyncio.wait_for(task, 10)]
        assert (1,) in got and got == await _direct(pg, name, bisect, prefix)
        assert await conn.fetchval("SELECT count(*) FROM customers WHERE id > $1", 0) == \
            len(people)
    finally:
        await conn.close()


async def test_inference_through_the_output_is_held_psql(gw: RunningGateway,
                                                         factsdb: tuple[str, list],
                                                         pg: LocalPostgres) -> None:
    """Simple protocol: the CASE that answers a guess is held and denied, the ordinary
    filtered read after it in the same psql session runs."""
    name, people = factsdb
    guess = (f"SELECT id, CASE WHEN ssn LIKE '{people[1].ssn[:3]}%' THEN 1 END "
             "FROM customers ORDER BY id")
    ordinary = f"SELECT id, full_name FROM customers WHERE city = '{people[1].city}' ORDER BY id"
    args = psql_args(psql_path(pg), gw.port, "-A", "-t", "-c", guess, "-c", ordinary)
    proc = asyncio.ensure_future(run(args, env=gw.env(), within=30))
    pending = await _pending(gw, guess)
    await _broker(gw).decide(pending.id, Decision.DENIED, "analyst-1", "no guessing")
    done = await proc
    assert "no guessing" in done.stderr, done.stderr
    expected = await _direct(pg, name, ordinary)
    assert expected and done.stdout.strip().splitlines() == [
        f"{i}|{n}" for i, n in expected], done.stdout


async def test_held_statement_carries_its_masking_facts(gw: RunningGateway,
                                                        factsdb: tuple[str, list]) -> None:
    sql = "SELECT count(*) FROM customers GROUP BY left(card_number, 6)"
    bus = gw.gateway.bus  # type: ignore[attr-defined]
    announced = bus.subscribe([events.APPROVAL_REQUESTED])
    conn = await asyncpg.connect(gw.dsn())
    try:
        task = asyncio.ensure_future(conn.fetch(sql))
        pending = await _pending(gw, sql)
        statement_id, session_id = pending.view.statement_id, pending.session_id
        await _broker(gw).decide(pending.id, Decision.DENIED, "analyst-1", "no")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await asyncio.wait_for(task, 10)
    finally:
        await conn.close()
    store = gw.gateway.store  # type: ignore[attr-defined]
    [record] = [s for s in await store.session_statements(session_id) if s.id == statement_id]
    [facts] = record.facts["statements"]
    assert facts["masking"]["sensitive_in_predicates"] == ["public.customers.card_number"]
    assert facts["rule"] == HELD
    # The console's approval pane gets the same facts with the announcement.
    [event] = [e for e in announced.drain() if e.data["approval_id"] == pending.id]
    announced.close()
    assert masking_summary(event.data["facts"]) == \
        "decides rows on public.customers.card_number"


@pytest.mark.parametrize(("sql", "rule"), [
    ("UPDATE customers SET ssn = '***-**-1234' WHERE id = 1", "no-masked-placeholders-written"),
    ("UPDATE customers SET email = '***@example.com' WHERE id = 1",
     "no-masked-placeholders-written"),
    ("INSERT INTO scratch (v) SELECT ssn FROM customers", "no-sensitive-copies"),
    ("CREATE TABLE stash AS SELECT id, card_number FROM customers", "no-sensitive-copies"),
])
async def test_copies_and_placeholders_are_refused(sql: str, rule: str, gw: RunningGateway,
                                                   factsdb: tuple[str, list],
                                                   pg: LocalPostgres) -> None:
    name, people = factsdb
    conn = await asyncpg.connect(gw.dsn())
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match=rule):
            await conn.execute(sql)
        assert await conn.fetchval("SELECT 1") == 1  # the session goes on
    finally:
        await conn.close()
    assert await _direct(pg, name, "SELECT ssn, email FROM customers WHERE id = 1") == [
        (people[0].ssn, people[0].email)]
    assert await _direct(pg, name, "SELECT count(*) FROM scratch") == [(0,)]


async def test_breakglass_is_not_held(gw: RunningGateway, factsdb: tuple[str, list]) -> None:
    _, people = factsdb
    token = gw.token("oncall-7", ("agents", "breakglass"))
    conn = await asyncpg.connect(gw.dsn(token))
    try:
        rows = await asyncio.wait_for(conn.fetch(
            "SELECT id FROM customers WHERE ssn = $1", people[2].ssn), 5)
    finally:
        await conn.close()
    assert [r["id"] for r in rows] == [people[2].id]

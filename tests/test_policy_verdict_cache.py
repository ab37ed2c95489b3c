"""The enforcer's verdict cache (issue 3): an ALLOW handed back for a text whose facts are
those of one it already judged, without building the new text's facts.

Every case runs real clients through a real gateway and compares what the client sees
with what the policy engine decides on facts analysed from scratch (no cache at all), so
a cache that conflated two statements with different decisions fails here: names that
differ, literals the normaliser keeps (``ORDER BY 2``), identities, a policy reload, and
a function that turns VOLATILE behind the catalog's back.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from hoopops.devdb import SERVICE_USER, LocalPostgres
from hoopops.identity import Identity
from hoopops.sql import default_analyzer
from tests.conftest import RunningGateway

RULES = """\
rules:
  - id: no-writes
    when: {kinds: [write]}
    action: block
  - id: no-secret
    when: {tables_read: ["*vc_secret_*"]}
    action: block
  - id: no-order-by-two
    when: {sql: "ORDER BY 2"}
    action: block
  - id: only-agent-2
    when: {tables_read: ["*vc_open_*"], subjects: [agent-2]}
    action: block
  - id: reads
    when: {kinds: [read]}
    action: allow
default: block
"""


def folder(root: Path, rules: str = RULES) -> Path:
    path = root / f"pol-{uuid.uuid4().hex[:6]}"
    path.mkdir()
    (path / "rules.yaml").write_text(rules)
    return path


async def sh(pg: LocalPostgres, sql: str, user: str = SERVICE_USER) -> None:
    await asyncio.to_thread(pg.psql, sql, "app", user)


@pytest.fixture
async def tables(pg: LocalPostgres) -> AsyncIterator[tuple[str, str]]:
    tag = uuid.uuid4().hex[:8]
    open_, secret = f"vc_open_{tag}", f"vc_secret_{tag}"
    await sh(pg, f"CREATE TABLE {open_} (id int, v int); CREATE TABLE {secret} (id int, v int);"
                 f" INSERT INTO {open_} VALUES (1, 1), (2, 2);"
                 f" INSERT INTO {secret} VALUES (1, 1)")
    try:
        yield open_, secret
    finally:
        await sh(pg, f"DROP TABLE IF EXISTS {open_}, {secret}")


def enforcer(gw: RunningGateway) -> Any:
    return gw.gateway.gate  # type: ignore[attr-defined]


def oracle(gw: RunningGateway, sql: str, subject: str = "agent-1") -> str:
    """The engine's decision on facts analysed with no cache (the catalog left out)."""
    engine = enforcer(gw).engine
    analysis = default_analyzer().analyze_uncached(sql, shapes=False)
    return engine.decide(Identity(subject, ("agents",), None, None, None), "appdb",
                         analysis).action


async def simple(conn: asyncpg.Connection, sql: str) -> str:
    """Run ``sql`` as a simple Query; "allow" or "block" as the gateway decided."""
    try:
        await conn.execute(sql)
    except asyncpg.PostgresError as exc:
        assert "hoopops blocked this statement" in str(exc), exc
        return "block"
    return "allow"


async def test_texts_of_one_skeleton_share_a_verdict_and_others_do_not(
        gateway_factory: Any, tmp_path: Path, tables: tuple[str, str]) -> None:
    open_, secret = tables
    gw = await gateway_factory(policies=folder(tmp_path))
    conn = await asyncpg.connect(gw.dsn())
    try:
        texts = [f"SELECT v FROM {open_} WHERE id = {n}" for n in range(1, 6)]
        texts += [f"SELECT v FROM {secret} WHERE id = {n}" for n in range(1, 4)]
        texts += [f"SELECT v FROM {open_} ORDER BY {n}" for n in (1, 2, 1, 2)]
        texts += [f"SELECT v FROM {open_} WHERE id = {n} LIMIT {n}" for n in (1, 2, 3)]
        texts += [f"SELECT v FROM {open_} WHERE id = {n}" for n in range(6, 9)]
        for sql in texts:
            assert await simple(conn, sql) == oracle(gw, sql), sql
        # The cache did serve: the shape reading the open table is in it (so this test
        # exercises it), and nothing blocked ever is.
        cached = [hit for table in enforcer(gw)._verdicts.values() for hit in table.values()]
        assert cached and all(v.action == "allow" and v.approval_id is None
                              for _, v, _ in cached)
        assert {oracle(gw, t) for t in texts} == {"allow", "block"}
    finally:
        await conn.close()


async def test_identity_is_part_of_the_key(gateway_factory: Any, tmp_path: Path,
                                           tables: tuple[str, str]) -> None:
    open_, _ = tables
    gw = await gateway_factory(policies=folder(tmp_path))
    one = await asyncpg.connect(gw.dsn(gw.token("agent-1")))
    two = await asyncpg.connect(gw.dsn(gw.token("agent-2")))
    try:
        for n in range(1, 4):
            sql = f"SELECT v FROM {open_} WHERE id = {n}"
            assert await simple(one, sql) == "allow" == oracle(gw, sql, "agent-1")
            assert await simple(two, sql) == "block" == oracle(gw, sql, "agent-2")
            assert await simple(one, sql) == "allow"
    finally:
        await one.close()
        await two.close()


async def test_a_reload_is_judged_anew(gateway_factory: Any, tmp_path: Path,
                                       tables: tuple[str, str]) -> None:
    open_, _ = tables
    pol = folder(tmp_path)
    gw = await gateway_factory(policies=pol)
    conn = await asyncpg.connect(gw.dsn())
    pconn = await psycopg.AsyncConnection.connect(gw.dsn(), autocommit=True,
                                                  prepare_threshold=None)
    try:
        for n in range(1, 4):
            assert await simple(conn, f"SELECT v FROM {open_} WHERE id = {n}") == "allow"
            # Extended protocol, unnamed statement: the same text every time.
            await pconn.execute(f"SELECT v FROM {open_} WHERE id = %s", (n,))
        assert enforcer(gw)._verdicts
        (pol / "rules.yaml").write_text(RULES.replace("subjects: [agent-2]",
                                                      "subjects: [agent-1]"))
        gw.gateway.reload()  # type: ignore[attr-defined]
        for n in range(1, 4):
            assert await simple(conn, f"SELECT v FROM {open_} WHERE id = {n}") == "block"
            with pytest.raises(psycopg.Error, match="hoopops blocked"):
                await pconn.execute(f"SELECT v FROM {open_} WHERE id = %s", (n,))
    finally:
        await conn.close()
        await pconn.close()


async def test_a_table_turned_into_a_view_that_writes_is_judged_anew(
        gateway_factory: Any, tmp_path: Path, pg: LocalPostgres,
        tables: tuple[str, str]) -> None:
    open_, _ = tables
    tag = uuid.uuid4().hex[:6]
    swap, fn = f"vc_swap_{tag}", f"vc_bump_{tag}"
    await sh(pg, f"CREATE TABLE {swap} (id int, v int); INSERT INTO {swap} VALUES (1, 1)")
    gw = await gateway_factory(policies=folder(tmp_path))
    conn = await asyncpg.connect(gw.dsn())
    try:
        for n in range(1, 4):
            assert await simple(conn, f"SELECT v FROM {swap} WHERE id = {n}") == "allow"
        assert enforcer(gw)._verdicts
        # The same name now reads through a VOLATILE user function: a write.
        await sh(pg, f"DROP TABLE {swap}; CREATE FUNCTION public.{fn}() RETURNS int "
                     f"LANGUAGE sql VOLATILE AS 'SELECT 1'; CREATE VIEW {swap} AS "
                     f"SELECT id, public.{fn}() AS v FROM {open_}")
        for catalog in enforcer(gw).catalogs.values():
            catalog.invalidate()  # what DDL through the gateway or the TTL would do
        for n in range(4, 7):
            assert await simple(conn, f"SELECT v FROM {swap} WHERE id = {n}") == "block"
    finally:
        await conn.close()
        await sh(pg, f"DROP VIEW IF EXISTS {swap}; DROP TABLE IF EXISTS {swap}; "
                     f"DROP FUNCTION IF EXISTS public.{fn}()")


async def test_not_used_when_the_audit_trail_needs_the_facts(
        gateway_factory: Any, tmp_path: Path, tables: tuple[str, str]) -> None:
    open_, secret = tables
    gw = await gateway_factory(policies=folder(tmp_path), audit=True)
    conn = await asyncpg.connect(gw.dsn())
    try:
        for n in range(1, 4):
            assert await simple(conn, f"SELECT v FROM {open_} WHERE id = {n}") == "allow"
            assert await simple(conn, f"SELECT v FROM {secret} WHERE id = {n}") == "block"
        assert not enforcer(gw)._verdicts
    finally:
        await conn.close()

"""The relay's fast paths with audit on (issue 4): what the trail records for statements
the fast paths carried must be what the general path records, and exactly what the
client received.

* A result of many rows, which arrives in many reads: the trail's ``result_sha256`` is
  the SHA-256 of the DataRow messages the client got (rebuilt here from the values, every
  column text, so text and binary formats send the same bytes), its row count and tag.
* An error in a prepared statement's Bind/Execute/Sync group is recorded with its
  SQLSTATE, and the statement after it on the same connection is recorded normally.
* Pipelined groups (several Executes before one Sync, and several Syncs in one write)
  get one record each, each with its own rows.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import struct
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from hoopops.config import load_config
from hoopops.devdb import LocalPostgres
from tests.conftest import RunningGateway, write_config

pytestmark = pytest.mark.asyncio

_MANY = ("SELECT g::text, repeat(md5(g::text), 40) FROM generate_series(1, {n}) g "
         "/* q:{mark} */")


def _data_rows_sha(rows: list[tuple[str | None, ...]]) -> str:
    """SHA-256 of the DataRow messages that carry ``rows`` (text values)."""
    h = hashlib.sha256()
    for row in rows:
        body = struct.pack("!h", len(row))
        for value in row:
            if value is None:
                body += struct.pack("!i", -1)
            else:
                data = value.encode()
                body += struct.pack("!i", len(data)) + data
        h.update(b"D" + struct.pack("!i", len(body) + 4) + body)
    return h.hexdigest()


async def _trail(gw: RunningGateway) -> list[dict[str, Any]]:
    out = io.StringIO()
    await gw.gateway.store.export(out)  # type: ignore[attr-defined]
    return [json.loads(line) for line in out.getvalue().splitlines()]


def _marked(trail: list[dict[str, Any]], mark: str) -> list[dict[str, Any]]:
    return [r for r in trail if f"q:{mark} " in r["sql"]]


async def test_errors_in_groups_are_recorded_with_their_sqlstate(
        gateway_factory: Any) -> None:
    gw: RunningGateway = await gateway_factory(audit=True)
    conn = await asyncpg.connect(gw.dsn())
    query = "SELECT 10 / (g - $1::int) FROM generate_series(1, 3) g /* q:div */"
    try:
        for i in range(3):  # prepared once, then Bind/Execute/Sync groups
            assert len(await conn.fetch(query, 10 + i)) == 3
        with pytest.raises(asyncpg.DivisionByZeroError):  # after one row was sent
            await conn.fetch(query, 2)
        assert len(await conn.fetch(query, 20)) == 3
        # Folded while planning: the error answers the Bind.
        with pytest.raises(asyncpg.DivisionByZeroError):
            await conn.fetch("SELECT 10 / $1::int /* q:bind */", 0)
        assert await conn.fetch("SELECT 10 / $1::int /* q:bind */", 5) == [(2,)]
    finally:
        await conn.close()
    trail = await _trail(gw)
    rows = _marked(trail, "div")
    assert [r["sqlstate"] for r in rows] == [None, None, None, "22012", None]
    assert [r["rows"] for r in rows] == [3, 3, 3, 1, 3]
    assert [r["command_tag"] for r in rows] == ["SELECT 3"] * 3 + [None, "SELECT 3"]
    # (asyncpg sends int4 in binary: the trail keeps those bytes)
    assert [r["params"] for r in rows] == [[{"hex": f"{v:08x}"}] for v in (10, 11, 12, 2, 20)]
    assert all(r["result_sha256"] for r in rows)
    assert rows[3]["result_sample"]["rows"] == [["-10"]]
    bind = _marked(trail, "bind")
    assert [(r["sqlstate"], r["rows"]) for r in bind] == [("22012", 0), (None, 1)]


async def test_a_result_in_many_reads_is_hashed_as_the_client_received_it(
        gateway_factory: Any) -> None:
    gw: RunningGateway = await gateway_factory(audit=True)
    n = 3000  # ~4 MB: many reads of the server's socket, rows split between them
    simple = _MANY.format(n=n, mark="simple")
    extended = _MANY.format(n=n, mark="extended").replace(f"1, {n})", "1, $1::int)")
    async with await psycopg.AsyncConnection.connect(
            gw.dsn(), autocommit=True, cursor_factory=psycopg.AsyncClientCursor) as conn:
        got_simple = await (await conn.execute(simple)).fetchall()  # a Query
    conn2 = await asyncpg.connect(gw.dsn())
    try:
        got_extended = [tuple(r) for r in await conn2.fetch(extended, n)]  # binary text
        got_again = [tuple(r) for r in await conn2.fetch(extended, n - 1)]
    finally:
        await conn2.close()
    assert len(got_simple) == len(got_extended) == n
    trail = await _trail(gw)
    for mark, got in (("simple", [got_simple]), ("extended", [got_extended, got_again])):
        records = _marked(trail, mark)
        assert len(records) == len(got)
        for record, rows in zip(records, got, strict=True):
            assert record["result_sha256"] == _data_rows_sha(rows)
            assert (record["rows"], record["command_tag"], record["sqlstate"]) == (
                len(rows), f"SELECT {len(rows)}", None)
            sample = record["result_sample"]
            assert sample["truncated"] is True and sample["columns"] == ["g", "repeat"]
            assert [tuple(r) for r in sample["rows"]] == rows[:len(sample["rows"])]


async def test_pipelined_statements_get_a_record_each(gateway_factory: Any) -> None:
    gw: RunningGateway = await gateway_factory(audit=True)
    async with await psycopg.AsyncConnection.connect(gw.dsn(), autocommit=True) as conn:
        async with conn.pipeline() as pipeline:
            cursors = []
            for i in range(6):  # each with its own Sync: groups in one write
                cursors.append(await conn.execute(
                    "SELECT g, %s::text FROM generate_series(1, %s::int) g /* q:piped */",
                    (f"v{i}", str(i))))
                await pipeline.sync()
            for i in range(4):  # several Executes before one Sync
                cursors.append(await conn.execute(
                    "SELECT %s::text /* q:batched */", (f"b{i}",)))
        results = [await cur.fetchall() for cur in cursors]
    assert [len(r) for r in results] == [0, 1, 2, 3, 4, 5, 1, 1, 1, 1]
    trail = await _trail(gw)
    piped = _marked(trail, "piped")
    assert [(r["rows"], r["params"]) for r in piped] == [
        (i, [f"v{i}", str(i)]) for i in range(6)]
    assert [r["result_sha256"] for r in piped] == [
        _data_rows_sha([(str(g), f"v{i}") for g in range(1, i + 1)]) for i in range(6)]
    batched = _marked(trail, "batched")
    assert [(r["rows"], r["params"], r["command_tag"]) for r in batched] == [
        (1, [f"b{i}"], "SELECT 1") for i in range(4)]


@pytest.mark.parametrize("synchronous", ["NORMAL", "FULL"])
async def test_a_failed_audit_write_refuses_the_statement(
        tmp_path: Path, pg: LocalPostgres, synchronous: str) -> None:
    from hoopops.gateway import build_gateway

    config = load_config(write_config(tmp_path, pg, audit=True, synchronous=synchronous))
    gateway = await build_gateway(config)
    await gateway.start()
    gw = RunningGateway(gateway, config, gateway.port)
    table = f"aud_fail_{uuid.uuid4().hex[:8]}"
    try:
        async with await psycopg.AsyncConnection.connect(gw.dsn(), autocommit=True) as conn:
            await conn.execute(f"CREATE TABLE {table} (k int)")
            await conn.execute(f"INSERT INTO {table} VALUES (%s)", (1,))  # prepared path
            await conn.execute(f"INSERT INTO {table} VALUES (2)", prepare=False)
            # The disk fills up: every journal write fails from here on.
            journal = gateway.store._journal  # type: ignore[attr-defined]
            full = os.open("/dev/full", os.O_WRONLY)
            os.dup2(full, journal._fd)
            os.close(full)
            with pytest.raises(psycopg.Error) as simple:
                await (await psycopg.AsyncClientCursor(conn).execute(
                    f"INSERT INTO {table} VALUES (3)"))
            assert simple.value.sqlstate == "58030"
            with pytest.raises(psycopg.Error) as extended:
                await conn.execute(f"INSERT INTO {table} VALUES (%s)", (4,))
            assert extended.value.sqlstate == "58030"
        seen = await asyncpg.connect(pg.dsn())
        try:
            assert [r[0] for r in await seen.fetch(f"SELECT k FROM {table} ORDER BY k")] \
                == [1, 2]
            await seen.execute(f"DROP TABLE {table}")
        finally:
            await seen.close()
    finally:
        with contextlib.suppress(Exception):
            await gateway.stop(grace=1)


async def test_results_are_reported_without_audit(gateway_factory: Any) -> None:
    """Audit off, a console listening: the fast paths give each statement its run, and
    its end is published with its rows and tag."""
    from hoopops import events

    gw: RunningGateway = await gateway_factory()
    bus = gw.gateway.bus  # type: ignore[attr-defined]
    sub = bus.subscribe([events.STATEMENT_FINISHED])
    try:
        async with await psycopg.AsyncConnection.connect(
                gw.dsn(), autocommit=True, cursor_factory=psycopg.AsyncClientCursor) as conn:
            await conn.execute("SELECT generate_series(1, 3)")  # a Query
        conn2 = await asyncpg.connect(gw.dsn())
        try:
            for n in (2, 5):  # Bind/Execute/Sync groups once prepared
                assert len(await conn2.fetch("SELECT generate_series(1, $1::int)", n)) == n
            with pytest.raises(asyncpg.DivisionByZeroError):
                await conn2.fetch("SELECT 1 / (g - 2) FROM generate_series(1, $1::int) g", 3)
        finally:
            await conn2.close()
        seen = [(e.data["rows"], e.data["tag"], e.data["sqlstate"]) for e in sub.drain()]
    finally:
        sub.close()
    assert (3, "SELECT 3", None) in seen
    assert seen[-3:] == [(2, "SELECT 2", None), (5, "SELECT 5", None), (1, None, "22012")]


async def test_a_statement_the_server_refuses_at_parse_is_recorded_once(
        gateway_factory: Any) -> None:
    """asyncpg prepares first (Parse, Describe, Sync) and never sends the Execute of a
    statement whose Parse failed: the trail still has it, with the server's SQLSTATE. A
    client that sends Parse, Bind, Execute and Sync together gets one record, not two."""
    gw: RunningGateway = await gateway_factory(audit=True)
    conn = await asyncpg.connect(gw.dsn())
    try:
        with pytest.raises(asyncpg.UndefinedTableError):
            await conn.fetch("SELECT * FROM no_such_table /* q:prepare */")
        with pytest.raises(asyncpg.UndefinedTableError):
            await conn.fetch("SELECT * FROM no_such_table WHERE 1 = $1 /* q:prepare2 */", 1)
        assert await conn.fetchval("SELECT 7 /* q:after */") == 7
    finally:
        await conn.close()
    pconn = await psycopg.AsyncConnection.connect(gw.dsn(), autocommit=True)
    async with pconn:
        with pytest.raises(psycopg.errors.UndefinedTable):
            await pconn.execute("SELECT * FROM no_such_table WHERE 1 = %s /* q:group */", (1,))
    trail = await _trail(gw)
    for mark in ("prepare", "prepare2", "group"):
        records = _marked(trail, mark)
        assert len(records) == 1, (mark, records)
        assert records[0]["sqlstate"] == "42P01" and records[0]["decision"] == "allow", records
    assert _marked(trail, "after")[0]["sqlstate"] is None
    report = await gw.gateway.store.verify()  # type: ignore[attr-defined]
    assert report.ok, report.first_problem

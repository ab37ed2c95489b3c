"""A pipeline of statements shares one flush of the audit journal (issue 4).

Under ``synchronous: FULL`` a statement's record must be on disk before the statement is
forwarded. A client that pipelines (JDBC ``executeBatch``, psycopg's pipeline mode,
asyncpg's ``executemany``) sends hundreds of Bind/Execute pairs before one Sync; each
used to wait for a flush of its own in turn, so a batch of 20,000 inserts took 20 s
instead of half a second. Now the statements read together are recorded together and
wait once, before the first of them is forwarded. What must not change: every statement
the server ran has its record, with its parameters, and the server ran each once.
"""

from __future__ import annotations

import io
import json
from typing import Any

import asyncpg
import psycopg
import pytest

from tests.conftest import RunningGateway

pytestmark = pytest.mark.asyncio

_ROWS = 400


async def _trail(gw: RunningGateway, mark: str) -> list[dict[str, Any]]:
    out = io.StringIO()
    await gw.gateway.store.export(out)  # type: ignore[attr-defined]
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    return [r for r in records if f"/* {mark} */" in r["sql"]]


def _int_param(value: Any) -> int:
    """A recorded integer parameter: text, or (binary format) its big-endian bytes."""
    if isinstance(value, dict):
        return int.from_bytes(bytes.fromhex(value["hex"]), "big", signed=True)
    return int(value)


async def _audited_full(gateway_factory: Any) -> RunningGateway:
    gw: RunningGateway = await gateway_factory(audit=True)
    store = gw.gateway.store  # type: ignore[attr-defined]
    assert store.synchronous == "FULL"
    return gw


@pytest.mark.parametrize("client", ["psycopg-pipeline", "asyncpg-executemany"])
async def test_a_pipeline_shares_one_flush_and_every_statement_is_recorded(
        gateway_factory: Any, client: str) -> None:
    gw = await _audited_full(gateway_factory)
    table = f"batch_{client.replace('-', '_')}"
    insert = f"INSERT INTO {table} (n, label) VALUES ($1, $2) /* {table} */"
    admin = await asyncpg.connect(gw.dsn())
    try:
        await admin.execute(f"CREATE TABLE {table} (n int PRIMARY KEY, label text)")
    finally:
        await admin.close()
    store = gw.gateway.store  # type: ignore[attr-defined]
    before = store.journal_flushes
    values = [(n, f"row {n}") for n in range(_ROWS)]
    if client == "psycopg-pipeline":
        pipelined = insert.replace("$1", "%s").replace("$2", "%s")
        conn = await psycopg.AsyncConnection.connect(gw.dsn(), autocommit=True)
        async with conn, conn.pipeline(), conn.cursor() as cur:
            await cur.executemany(pipelined, values)
    else:
        conn = await asyncpg.connect(gw.dsn())
        try:
            await conn.executemany(insert, values)
        finally:
            await conn.close()
    flushes = store.journal_flushes - before
    # One flush per pipelined read of the client's socket, not one per statement (the
    # figure was _ROWS and more before).
    assert 0 < flushes < _ROWS / 10, flushes

    check = await asyncpg.connect(gw.dsn())
    try:
        assert await check.fetchval(f"SELECT count(*) FROM {table}") == _ROWS
    finally:
        await check.close()
    trail = await _trail(gw, table)
    executed = [r for r in trail if r["sql"].startswith("INSERT")]
    assert len(executed) == _ROWS, len(executed)
    assert sorted(_int_param(r["params"][0]) for r in executed) == list(range(_ROWS))
    assert all(r["sqlstate"] is None and r["command_tag"] == "INSERT 0 1"
               for r in executed)
    report = await store.verify()
    assert report.ok, report.first_problem


async def test_a_failing_statement_mid_pipeline_still_leaves_a_complete_trail(
        gateway_factory: Any) -> None:
    """The server skips the rest of the pipeline after an error: the records of the
    skipped statements say they did not run, and the statements before it ran."""
    gw = await _audited_full(gateway_factory)
    table = "batch_dup"
    insert = f"INSERT INTO {table} (n) VALUES ($1) /* {table} */"
    conn = await asyncpg.connect(gw.dsn())
    try:
        await conn.execute(f"CREATE TABLE {table} (n int PRIMARY KEY)")
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.executemany(insert, [(1,), (2,), (2,), (3,)])
        # executemany runs in one implicit transaction: nothing of it stays.
        assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0
        assert await conn.fetchval("SELECT 41 + 1") == 42  # the session goes on
    finally:
        await conn.close()
    trail = await _trail(gw, table)
    states = [(_int_param(r["params"][0]), r["sqlstate"]) for r in trail
              if r["sql"].startswith("INSERT")]
    assert states[:3] == [(1, None), (2, None), (2, "23505")], states
    assert all(state is not None for _, state in states[3:]), states

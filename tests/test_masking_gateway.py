"""Issue 5 acceptance: raw sensitive values never leave the gateway, whichever way a query asks.

A dedicated database is seeded with fake PII (``hoopops.demo.seed``) and every exfiltration
trick runs through a real gateway with the shipped policy set, driven by psql (text),
asyncpg (binary format; statements re-run from its cache, so portals run without a
Describe) and psycopg (text and binary cursors; binary ones as named prepared
statements). For each, on what the client received (rows, COPY data, notices,
notifications, error texts): no seeded SSN, card number, IBAN, email or phone appears in
any revealing form, or the statement was refused with a clear error.

Then: results that touch no sensitive data are byte-identical through the gateway and
direct (psql output, asyncpg records, and raw protocol bytes in both protocols), and the
``breakglass`` group sees raw values with the exemption recorded in the audit trail.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from hoopops.audit import open_store
from hoopops.config import load_config, parse_upstream
from hoopops.demo.seed import customers, seed
from hoopops.devdb import SERVICE_USER, LocalPostgres
from hoopops.masking.rewrite import numeric_text
from hoopops.proxy.upstream import connect as upstream_connect
from tests.clients.exfil import (
    Case,
    Outcome,
    Secrets,
    case,
    run_asyncpg,
    run_psql,
    run_psycopg,
)
from tests.clients.rawpg import RawClient, message
from tests.clients.util import run
from tests.conftest import AUDIENCE, ISSUER, JWT_SECRET, RunningGateway, psql_path

ROOT = Path(__file__).resolve().parent.parent

# Lets the tests reach the statements the shipped policy would send for review (writes to
# the scratch tables, pg_notify, and the set_config() asyncpg's type introspection calls),
# so they exercise masking rather than review. Sorted before default.yaml: the first
# matching rule decides. The free-text rule for customers.note (``detect``) comes from
# the shipped masking.yaml.
TEST_RULES = """\
description: exfiltration tests may write to the scratch tables and notify
rules:
  - id: test-scratch-writes
    description: the tests may write to the scratch tables
    when: {kinds: [write], tables_written: [public.leak_sink, public.leak_checked,
                                            public.leak_echo]}
    unless: {dangerous: true}
    action: allow
  - id: test-notify
    description: the tests may send notifications
    when: {functions: [pg_notify]}
    unless: {dangerous: true}
    action: allow
  - id: test-asyncpg-introspection
    description: asyncpg turns jit off with set_config() around its type introspection
    when: {functions: [set_config], kinds: [write]}
    unless: {dangerous: true}
    action: allow
  - id: test-inference-reads
    description: reads that filter, group or branch on masked columns run, so that their
      results' masking is tested (test_masking_facts_gateway.py tests the review)
    when: {kinds: [read], sensitive_in_predicates: true}
    unless: {dangerous: true}
    action: allow
  - id: test-opaque-reads
    description: reads that pass masked columns to user functions run, for the same reason
    when: {kinds: [read], sensitive_opaque: true}
    unless: {dangerous: true}
    action: allow
"""

SETUP_SQL = """
CREATE TABLE public.leak_sink (v text UNIQUE);
CREATE TABLE public.leak_checked (v text CHECK (length(v) < 5));
CREATE VIEW public.customer_directory AS
    SELECT id, full_name AS name, ssn AS tax_id, card_number AS pan, email AS contact
    FROM public.customers;
CREATE VIEW public.customer_digest AS
    SELECT c.id, upper(c.ssn) AS a, c.card_number || '' AS b, row_to_json(c) AS j
    FROM public.customers c;
CREATE FUNCTION public.shout(v text) RETURNS text LANGUAGE plpgsql STABLE AS
    $$BEGIN RAISE NOTICE 'value: %', v; RETURN 'ok'; END$$;
CREATE FUNCTION public.fail_with(v text) RETURNS text LANGUAGE plpgsql STABLE AS
    $$BEGIN RAISE EXCEPTION 'bad value %', v USING DETAIL = 'detail ' || v; END$$;
CREATE FUNCTION public.echo(v text) RETURNS text LANGUAGE sql IMMUTABLE AS $$SELECT v$$;
CREATE FUNCTION public.all_customers() RETURNS SETOF public.customers LANGUAGE sql STABLE
    AS $$SELECT * FROM public.customers$$;
CREATE MATERIALIZED VIEW public.customer_cards AS
    SELECT id, card_number, lower(email) AS mail FROM public.customers;
CREATE TABLE public.leak_echo (v text);
CREATE FUNCTION public.echo_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE NOTICE 'got %', reverse(NEW.v);
    IF length(NEW.v) > 15 THEN RAISE EXCEPTION 'too long: %', reverse(NEW.v); END IF;
    RETURN NEW;
END$$;
CREATE TRIGGER leak_echo_row BEFORE INSERT ON public.leak_echo
    FOR EACH ROW EXECUTE FUNCTION public.echo_row();
GRANT SELECT ON public.customer_directory, public.customer_digest, public.customer_cards
    TO hoopops_svc;
GRANT ALL ON public.leak_sink, public.leak_checked, public.leak_echo TO hoopops_svc;
"""


@dataclass
class PiiDb:
    name: str
    secrets: Secrets
    people: list
    accounts: list

    def dsn(self, pg: LocalPostgres) -> str:
        return pg.dsn(database=self.name)


@pytest.fixture(scope="module")
async def piidb(pg: LocalPostgres) -> AsyncIterator[PiiDb]:
    name = f"piidb_{secrets.token_hex(4)}"
    pg.psql(f"CREATE DATABASE {name} OWNER {SERVICE_USER}")
    conn = await asyncpg.connect(pg.dsn(database=name))
    try:
        people, accounts = await seed(conn)
    finally:
        await conn.close()
    pg.psql(SETUP_SQL, database=name)
    found = Secrets([c.ssn for c in people], [c.card_number for c in people],
                    [c.email for c in people], [c.phone for c in people],
                    [a.iban for a in accounts])
    yield PiiDb(name, found, people, accounts)
    pg.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _policies(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("default.yaml", "masking.yaml"):
        shutil.copy(ROOT / "policies" / name, folder / name)
    (folder / "00-exfil-tests.yaml").write_text(TEST_RULES)
    return folder


def _config(folder: Path, upstream: str, policies: Path, audit: bool) -> Path:
    lines = ["listen: 127.0.0.1:0", "targets:", "  appdb:", f"    upstream: {upstream}",
             "identity:", f"  issuer: {ISSUER}", f"  audience: {AUDIENCE}",
             f"  hs256_secret: {JWT_SECRET}", f"policies: {policies}",
             # Statements the policy sends for review are refused when nobody approves.
             "approvals:", "  timeout: 1", "audit:",
             f"  enabled: {'true' if audit else 'false'}", f"  path: {folder / 'audit.db'}"]
    path = folder / "hoopops.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


async def _start(folder: Path, upstream: str, audit: bool = False) -> RunningGateway:
    from hoopops.gateway import build_gateway

    config = load_config(_config(folder, upstream, _policies(folder / "policies"), audit))
    gateway = await build_gateway(config)
    await gateway.start()
    return RunningGateway(gateway, config, gateway.port)


@pytest.fixture(scope="module")
async def masked(piidb: PiiDb, pg: LocalPostgres, tmp_path_factory: pytest.TempPathFactory
                 ) -> AsyncIterator[RunningGateway]:
    running = await _start(tmp_path_factory.mktemp("masked-gw"), piidb.dsn(pg))
    yield running
    await running.gateway.stop(grace=1)  # type: ignore[attr-defined]


# -- the exfiltration queries --------------------------------------------------------------

SENSITIVE = "ssn, card_number, email, phone"
FIRST = customers()[0]  # customers.id = 1 (the seed is deterministic)
CASES: list[Case] = [
    # plain, aliases, casts, concatenation
    case("plain", f"SELECT id, {SENSITIVE} FROM customers"),
    case("aliases", "SELECT ssn AS x, card_number AS y, email AS z, phone AS w FROM customers"),
    case("quoted-alias", 'SELECT ssn AS "full_name", card_number AS "id" FROM customers'),
    case("casts", "SELECT ssn::text, card_number::varchar(40), email::bpchar, "
         "phone::name FROM customers"),
    case("concat", "SELECT ssn || '', '' || card_number, email || ' ', phone || 'x' "
         "FROM customers"),
    case("substr", "SELECT substr(ssn, 1, 11), substring(card_number from 1 for 16), "
         "left(email, 100), right(phone, 20) FROM customers", prefixes=True),
    case("substr-pieces", "SELECT left(ssn, 7), substr(card_number, 1, 8) FROM customers",
         prefixes=True),
    case("reverse", "SELECT reverse(ssn), reverse(card_number), reverse(email) FROM customers"),
    case("case-change", "SELECT upper(email), lower(card_number), initcap(email), "
         "upper(ssn) FROM customers"),
    case("translate", "SELECT translate(ssn, '-', ''), translate(phone, '+-', '  ') "
         "FROM customers"),
    case("regexp-replace", r"SELECT regexp_replace(ssn, '-', '', 'g'), "
         r"regexp_replace(card_number, '(\d{4})', '\1 ', 'g') FROM customers"),
    case("split-part", "SELECT split_part(ssn, '-', 1) || split_part(ssn, '-', 2) || "
         "split_part(ssn, '-', 3), split_part(email, '@', 1) FROM customers"),
    case("overlay", "SELECT overlay(ssn placing 'x' from 4 for 1), "
         "overlay(card_number placing '' from 1 for 0) FROM customers"),
    case("format", "SELECT format('%s|%s|%s', ssn, card_number, email), "
         "format('%I', ssn) FROM customers"),
    case("concat-ws", "SELECT concat_ws(',', ssn, card_number, email, phone), "
         "concat(ssn, card_number) FROM customers"),
    case("chars-split", "SELECT string_to_array(ssn, NULL), "
         "regexp_split_to_array(card_number, '') FROM customers"),
    case("char-codes", "SELECT (SELECT string_agg(ascii(ch)::text, ',') FROM "
         "regexp_split_to_table(ssn, '') ch) FROM customers"),
    # aggregates and JSON
    case("string-agg", "SELECT string_agg(ssn, ','), string_agg(card_number, ';') "
         "FROM customers"),
    case("array-agg", "SELECT array_agg(ssn), array_agg(email ORDER BY id) FROM customers"),
    case("json-agg", "SELECT json_agg(ssn), jsonb_agg(card_number) FROM customers"),
    case("json-agg-row", "SELECT json_agg(c) FROM customers c"),
    case("row-to-json", "SELECT row_to_json(c) FROM customers c"),
    case("to-jsonb", "SELECT to_jsonb(c), to_json(c.*) FROM customers c"),
    case("row-text", "SELECT row(ssn, card_number)::text, ROW(c.*) FROM customers c"),
    case("json-build", "SELECT json_build_object('s', ssn, 'c', card_number), "
         "jsonb_build_array(email, phone) FROM customers"),
    case("json-path", "SELECT to_jsonb(c)->>'ssn', to_jsonb(c)#>>'{card_number}', "
         "row_to_json(c)->'email' FROM customers c"),
    case("jsonb-path-query", "SELECT jsonb_path_query(to_jsonb(c), '$.ssn'), "
         "jsonb_path_query_first(to_jsonb(c), '$.card_number') FROM customers c"),
    case("jsonb-each", "SELECT j.key, j.value FROM customers c, jsonb_each_text(to_jsonb(c)) j"),
    case("hstore-like", "SELECT json_object(ARRAY['s', ssn, 'c', card_number]) "
         "FROM customers"),
    # whole rows and stars
    case("whole-row", "SELECT c FROM customers c"),
    case("qualified-star", "SELECT c.* FROM customers c"),
    case("star", "SELECT * FROM customers"),
    case("table", "TABLE customers"),
    case("star-join", "SELECT * FROM customers c JOIN accounts a ON a.customer_id = c.id"),
    case("iban", "SELECT iban, lower(iban), iban || '', reverse(iban) FROM accounts"),
    # subqueries, CTEs, set operations, views, lateral, VALUES
    case("subquery", "SELECT x FROM (SELECT ssn AS x FROM customers) s"),
    case("scalar-subquery", "SELECT (SELECT ssn FROM customers ORDER BY id LIMIT 1), "
         "ARRAY(SELECT card_number FROM customers)"),
    case("cte", "WITH t AS (SELECT ssn AS a, card_number AS b FROM customers) "
         "SELECT a, b FROM t"),
    case("cte-recursive", "WITH RECURSIVE r(v, n) AS (SELECT ssn, 1 FROM customers "
         "UNION ALL SELECT v || '', n + 1 FROM r WHERE n < 2) SELECT v FROM r"),
    case("union", "SELECT ssn FROM customers UNION SELECT email FROM customers "
         "UNION ALL SELECT iban FROM accounts"),
    case("intersect-except", "SELECT ssn FROM customers INTERSECT SELECT ssn FROM customers "
         "EXCEPT SELECT 'x'"),
    case("union-hidden", "SELECT 'x' AS v UNION ALL SELECT card_number FROM customers"),
    case("view-rename", "SELECT * FROM customer_directory"),
    case("view-computed", "SELECT a, b, j FROM customer_digest"),
    case("matview", "SELECT * FROM customer_cards"),
    case("setof-function", "SELECT * FROM all_customers()"),
    case("array-of-rows", "SELECT array_agg(c) FROM customers c"),
    case("lateral", "SELECT t.v FROM customers c, LATERAL (SELECT c.ssn || c.card_number AS v) t"),
    case("values-join", "SELECT v.k, c.ssn, c.card_number FROM (VALUES (1, 'a'), (2, 'b')) "
         "v(k, l) JOIN customers c ON c.id = v.k"),
    case("values-rows", "SELECT * FROM (VALUES ((SELECT min(ssn) FROM customers))) v(x)"),
    case("unnest", "SELECT unnest(ARRAY[ssn, card_number, email]) FROM customers"),
    # expressions
    case("case-expr", "SELECT CASE WHEN id > 0 THEN ssn ELSE card_number END, "
         "CASE id WHEN 1 THEN email ELSE phone END FROM customers"),
    case("coalesce-etc", "SELECT coalesce(ssn, 'x'), nullif(card_number, ''), "
         "greatest(ssn, ''), least(email, 'zzzz') FROM customers"),
    case("min-max", "SELECT min(ssn), max(card_number), min(email) FROM customers"),
    case("window", "SELECT first_value(ssn) OVER (ORDER BY id), lag(card_number) OVER w, "
         "nth_value(email, 2) OVER w FROM customers WINDOW w AS (ORDER BY id)"),
    case("grouping", "SELECT ssn, count(*) FROM customers GROUP BY ROLLUP (ssn)"),
    # inference statements (held by the shipped policy; allowed here): still masked
    case("where-bisect", "SELECT id, ssn, card_number FROM customers WHERE ssn LIKE '%-%' "
         "AND card_number > '0' ORDER BY 2, email"),
    case("case-guess", "SELECT CASE WHEN ssn LIKE '1%' THEN ssn ELSE card_number END, "
         "nullif(email, 'x') FROM customers"),
    case("join-using", "SELECT c.ssn, d.tax_id FROM customers c JOIN customer_directory d "
         "USING (id) NATURAL JOIN (SELECT id FROM customers) k ORDER BY d.tax_id"),
    case("field-select", "SELECT (c).ssn, (c).card_number FROM customers c"),
    case("tablesample", "SELECT ssn, email FROM customers TABLESAMPLE SYSTEM (100)"),
    case("collate", 'SELECT ssn COLLATE "C", card_number COLLATE "C" || \'\' FROM customers'),
    case("char-by-char", "SELECT id, string_agg(substr(ssn, i, 1), '' ORDER BY i) "
         "FROM customers, generate_series(1, 11) i GROUP BY id"),
    case("tsvector", "SELECT to_tsvector('simple', note), to_tsvector('simple', ssn) "
         "FROM customers"),
    case("json-table", "SELECT jt.* FROM customers c, JSON_TABLE(to_jsonb(c), '$' COLUMNS "
         "(s text PATH '$.ssn', k text PATH '$.card_number')) jt"),
    case("cte-search", "WITH RECURSIVE t(v, n) AS (SELECT card_number, 1 FROM customers "
         "UNION ALL SELECT v, n + 1 FROM t WHERE n < 2) SEARCH BREADTH FIRST BY v SET ord "
         "SELECT ord, n FROM t"),
    case("cte-cycle", "WITH RECURSIVE t(v, n) AS (SELECT ssn, 1 FROM customers UNION ALL "
         "SELECT v, n + 1 FROM t WHERE n < 2) CYCLE v SET looped USING path "
         "SELECT * FROM t"),
    case("user-sql-function", "SELECT echo(ssn), echo(card_number) FROM customers"),
    # bytes, encodings and hashes (a hash of a nine-digit SSN is a dictionary away)
    case("bytea", "SELECT ssn::bytea, convert_to(card_number, 'UTF8') FROM customers"),
    case("encode", "SELECT encode(ssn::bytea, 'hex'), encode(convert_to(card_number, 'UTF8'), "
         "'base64'), decode(encode(email::bytea, 'hex'), 'hex') FROM customers"),
    case("hashes", "SELECT md5(ssn), md5(card_number), sha256(ssn::bytea) FROM customers"),
    # numbers: binary int8/numeric and arithmetic that breaks the Luhn check
    case("card-bigint", "SELECT card_number::bigint FROM customers", no_long_digits=True),
    case("card-arith", "SELECT card_number::numeric + 0, card_number::numeric * 1, "
         "card_number::bigint - 1 FROM customers", no_long_digits=True),
    case("card-float", "SELECT card_number::float8, (card_number::numeric / 2)::text "
         "FROM customers", no_long_digits=True),
    case("ssn-number", "SELECT translate(ssn, '-', '')::int, "
         "translate(ssn, '-', '')::bigint * 10 FROM customers"),
    # free text
    case("note", "SELECT id, note FROM customers"),
    case("note-derived", "SELECT upper(note), replace(note, ' ', '') FROM customers"),
    case("note-spread", r"SELECT regexp_replace(note, '(\d)', '\1 ', 'g') FROM customers"),
    # COPY
    case("copy-text", copy=("customers", "", {})),
    case("copy-csv", copy=("SELECT ssn, card_number, email, note FROM customers",
                           "WITH (FORMAT csv, HEADER)", {"format": "csv", "header": True})),
    case("copy-binary", copy=("customers", "WITH (FORMAT binary)", {"format": "binary"})),
    case("copy-computed", copy=("SELECT ssn || '', row_to_json(c) FROM customers c",
                                "WITH (FORMAT csv, DELIMITER '|')",
                                {"format": "csv", "delimiter": "|"})),
    case("copy-iban", copy=("accounts", "WITH (FORMAT text, NULL 'none')",
                            {"format": "text", "null": "none"})),
    case("copy-dash-delimiter", copy=("SELECT ssn, phone, card_number FROM customers",
                                      "WITH (DELIMITER '-')", {"delimiter": "-"})),
    # COPY text escapes the delimiter inside values: detectors must read the value
    case("copy-note-escaped", copy=("SELECT note FROM customers", "WITH (DELIMITER '-')",
                                    {"delimiter": "-"})),
    case("copy-csv-quoting", copy=("SELECT email, ssn, note FROM customers",
                                   "WITH (FORMAT csv, QUOTE '*', ESCAPE '\\', FORCE_QUOTE *)",
                                   {"format": "csv", "quote": "*", "escape": "\\",
                                    "force_quote": True})),
    case("psql-copy", r"\copy (SELECT ssn, card_number, email FROM customers) TO STDOUT",
         clients=("psql",)),
    case("multi-copy", "SELECT 1 AS one; COPY (SELECT ssn, row_to_json(c) FROM customers c) "
         "TO STDOUT; SELECT email FROM customers", clients=("psql",)),
    case("big-rows", "SELECT ssn, repeat('x', 3000) AS pad, card_number, email "
         "FROM customers"),
    case("multi-statement", "SELECT 1 AS one; SELECT ssn, card_number || '' FROM customers; "
         "SELECT row_to_json(c) FROM customers c", clients=("psql", "psycopg-text")),
    # cursors and prepared statements
    case("cursor", "BEGIN", "DECLARE c CURSOR FOR SELECT ssn, card_number FROM customers",
         "FETCH 10 FROM c", "FETCH ALL FROM c", "COMMIT"),
    case("cursor-computed", "BEGIN",
         "DECLARE c CURSOR FOR SELECT ssn || '' AS x, row_to_json(cu) FROM customers cu",
         "MOVE 1 IN c", "FETCH FORWARD 20 FROM c", "COMMIT"),
    case("cursor-binary", "BEGIN", "DECLARE c BINARY CURSOR FOR SELECT ssn, "
         "card_number::bigint, email || '' FROM customers", "FETCH ALL FROM c", "COMMIT",
         no_long_digits=True),
    case("prepare", "PREPARE p(int) AS SELECT ssn, card_number || '' FROM customers "
         "WHERE id > $1", "EXECUTE p(0)", "EXECUTE p(100)"),
    case("prepare-computed", "PREPARE q AS SELECT format('%s', ssn), to_jsonb(c) "
         "FROM customers c", "EXECUTE q"),
    case("prepare-notice", "PREPARE n AS SELECT shout(reverse(card_number)) FROM customers "
         "WHERE id <= 2", "EXECUTE n"),
    case("prepare-redefined", "PREPARE r AS SELECT ssn || '' FROM customers",
         "PREPARE r AS SELECT 'harmless'::text", "EXECUTE r", expect="any"),
    case("cursor-redeclared", "BEGIN", "DECLARE h CURSOR WITH HOLD FOR SELECT reverse(ssn) "
         "FROM customers", "COMMIT", "DECLARE h CURSOR WITH HOLD FOR SELECT 'harmless'::text",
         "FETCH ALL FROM h", "CLOSE h", expect="any"),
    case("cursor-scroll", "BEGIN", "DECLARE s SCROLL CURSOR FOR SELECT email, iban FROM "
         "customers c JOIN accounts a ON a.customer_id = c.id", "FETCH LAST FROM s",
         "FETCH BACKWARD 5 FROM s", "FETCH ABSOLUTE 3 FROM s", "COMMIT"),
    # errors and notices that quote values
    case("error-int-cast", "SELECT ssn::int FROM customers", expect="error"),
    case("error-int-range", "SELECT card_number::int FROM customers", expect="error"),
    case("error-date", "SELECT translate(ssn, '-', '')::date FROM customers", expect="error"),
    case("error-json", "SELECT email::json FROM customers", expect="error"),
    case("error-raise", "SELECT fail_with(ssn) FROM customers", expect="error"),
    case("error-raise-digits", "SELECT fail_with(reverse(card_number)) FROM customers",
         expect="error"),
    case("error-unique", "INSERT INTO leak_sink(v) SELECT ssn FROM customers "
         "UNION ALL SELECT ssn FROM customers", expect="error"),
    case("error-check", "INSERT INTO leak_checked(v) SELECT card_number FROM customers",
         expect="error"),
    case("returning", "BEGIN", "INSERT INTO leak_sink(v) SELECT translate(ssn, '-', '') "
         "FROM customers WHERE id <= 3 RETURNING v, reverse(v)", "ROLLBACK"),
    case("trigger-notice", "BEGIN", "INSERT INTO leak_echo SELECT ssn FROM customers "
         "WHERE id <= 2", "INSERT INTO leak_echo SELECT card_number FROM customers "
         "WHERE id = 3", "ROLLBACK", expect="error"),
    case("notice-function", "SELECT shout(ssn), shout(reverse(card_number)) FROM customers "
         "WHERE id <= 3"),
    case("do-raise-notice", "DO $$DECLARE r text; BEGIN SELECT ssn INTO r FROM customers "
         "LIMIT 1; RAISE NOTICE '%', r; END$$", expect="refused"),
    case("pg-notify", "SELECT pg_notify('leak', ssn), pg_notify('leak', reverse(card_number)) "
         "FROM customers WHERE id <= 3", listen="leak", expect="refused"),
    case("pg-notify-subquery", "SELECT pg_notify('leak', (SELECT string_agg(reverse(iban), ',') "
         "FROM accounts))", listen="leak", expect="refused"),
    case("set-config", "SELECT set_config('leak.v', reverse(card_number), false) FROM customers "
         "WHERE id = 1", "SELECT current_setting('leak.v')", "SHOW leak.v", expect="refused"),
    case("advisory-lock", "SELECT pg_advisory_lock(card_number::bigint) FROM customers "
         "WHERE id = 1", "SELECT objid FROM pg_locks WHERE locktype = 'advisory'",
         expect="refused"),
    # catalogs that hold sample values or other sessions' statements
    case("pg-stats", "SELECT most_common_vals::text, histogram_bounds::text FROM pg_stats "
         "WHERE tablename = 'customers'", expect="refused"),
    case("pg-stats-ext", "SELECT s.* FROM pg_catalog.pg_statistic s", expect="refused"),
    case("pg-stat-activity", "SELECT query FROM pg_stat_activity", expect="refused"),
    case("stat-function", "SELECT pg_stat_get_backend_activity(s) "
         "FROM pg_stat_get_backend_idset() s", expect="refused"),
    case("query-to-xml", "SELECT query_to_xml('SELECT ssn FROM customers', true, false, '')",
         expect="refused"),
    case("ts-rewrite", "SELECT ts_rewrite('a'::tsquery, 'SELECT to_tsquery(''simple'', ''a''), "
         "to_tsquery(''simple'', translate(ssn, ''-'', '''')) FROM customers LIMIT 1')",
         expect="refused"),
    # errors that print the number they failed on bare, not quoted
    case("error-bare-number", "SELECT set_byte('\\x00'::bytea, translate(ssn, '-', '')::int, 0) "
         "FROM customers", "SELECT chr(translate(ssn, '-', '')::int) FROM customers",
         "SELECT make_date(translate(ssn, '-', '')::int, 1, 1) FROM customers",
         "SELECT make_timestamp(translate(ssn, '-', '')::int, 1, 1, 0, 0, 0) FROM customers",
         expect="error"),
    # a value quoted in an error is not a name to quote back because an alias spells it
    case("error-alias-echo", f"SELECT ('a' || ssn)::int AS \"a{FIRST.ssn}\", "
         f"('b' || card_number)::int AS \"b{FIRST.card_number}\" FROM customers WHERE id = 1",
         expect="error"),
]

CLIENTS = ("psql", "asyncpg", "psycopg-text", "psycopg-binary")


async def _run(client: str, item: Case, gw: RunningGateway, psql: str) -> Outcome:
    if client == "psql":
        return await run_psql(psql, gw.port, gw.env(), item)
    if client == "asyncpg":
        return await run_asyncpg(gw.dsn(), item)
    return await run_psycopg(gw.dsn(), item, binary=client == "psycopg-binary")


def _check(item: Case, outcome: Outcome, found: Secrets) -> None:
    where = f"{item.id} via {outcome.client}"
    leaks = found.find(outcome.text(), item.no_long_digits, item.prefixes)
    assert not leaks, f"{where} leaked {leaks[:5]}:\n{outcome.text()[:3000]}"
    if item.expect == "rows":
        assert not outcome.errors, f"{where}: unexpected errors {outcome.errors}"
        assert outcome.rows > 0, f"{where}: no rows came back\n{outcome.text()[:2000]}"
    elif item.expect == "error":
        assert outcome.errors, f"{where}: expected the server to fail it"
    elif item.expect == "refused":
        assert outcome.refused(), f"{where}: expected a policy refusal, got " \
                                  f"{outcome.errors or outcome.text()[:500]}"
    else:
        assert outcome.rows > 0 or outcome.refused(), f"{where}: {outcome.errors}"


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("item", CASES, ids=[c.id for c in CASES])
async def test_exfiltration(item: Case, client: str, masked: RunningGateway, piidb: PiiDb,
                            pg: LocalPostgres) -> None:
    if item.clients and client not in item.clients:
        pytest.skip(f"{item.id} runs with {', '.join(item.clients)} only")
    outcome = await asyncio.wait_for(_run(client, item, masked, psql_path(pg)), 30)
    _check(item, outcome, piidb.secrets)


def test_enough_cases() -> None:
    assert len([c for c in CASES if not c.clients]) >= 60


# -- masking never changes an unmasked result ----------------------------------------------

# Queries that touch no sensitive value (non-sensitive columns of sensitive tables
# included, with the detectors running over them), each as the statements one session runs.
UNMASKED: list[tuple[str, ...]] = [
    ("SELECT * FROM products ORDER BY id",),
    ("SELECT status, count(*), sum(quantity) FROM orders GROUP BY status ORDER BY status",),
    ("SELECT g, g * 2, md5(g::text), g::numeric / 7, g::float8 / 3 "
     "FROM generate_series(1, 3000) g",),
    ("SELECT id, full_name, city, created_at FROM customers ORDER BY id",),
    ("SELECT o.id, p.name, o.quantity, o.status, o.placed_at FROM orders o "
     "JOIN products p ON p.id = o.product_id ORDER BY o.id",),
    ("SELECT count(*), count(ssn), count(DISTINCT city) FROM customers",),
    ("SELECT id, customer_id, balance_cents, balance_cents::numeric / 100 FROM accounts "
     "ORDER BY id",),
    ("SELECT row_to_json(p), to_jsonb(p), p FROM products p ORDER BY id",),
    ("WITH t AS (SELECT product_id, sum(quantity) AS q FROM orders GROUP BY 1) "
     "SELECT p.name, t.q FROM t JOIN products p ON p.id = t.product_id ORDER BY 1",),
    ("SELECT array_agg(name ORDER BY id), string_agg(city, ',' ORDER BY id) "
     "FROM products, (SELECT DISTINCT city FROM customers) c",),
    ("BEGIN", "DECLARE c CURSOR FOR SELECT g, g * 2 AS twice, 'x' || g FROM "
     "generate_series(1, 50) g", "FETCH 10 FROM c", "FETCH ALL FROM c", "COMMIT"),
    ("PREPARE p(int) AS SELECT g * $1, name FROM generate_series(1, 5) g, products",
     "EXECUTE p(3)"),
    ("WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t WHERE n < 20) "
     "SEARCH DEPTH FIRST BY n SET ord CYCLE n SET looped USING path SELECT * FROM t",),
    ("BEGIN", "INSERT INTO leak_sink(v) SELECT name FROM products RETURNING v, length(v)",
     "ROLLBACK"),
    ("COPY (SELECT * FROM products ORDER BY id) TO STDOUT WITH (FORMAT csv, HEADER)",),
    ("COPY (SELECT id, customer_id, quantity, status FROM orders ORDER BY id) TO STDOUT",),
]


def _psql(psql: str, port: int, database: str, user: str, steps: tuple[str, ...]
          ) -> list[str]:
    args = [psql, "-X", "-A", "-h", "127.0.0.1", "-p", str(port), "-U", user, "-d",
            database, "-v", "ON_ERROR_STOP=1"]
    for step in steps:
        args += ["-c", step]
    return args


async def test_unmasked_results_identical_psql(masked: RunningGateway, piidb: PiiDb,
                                               pg: LocalPostgres) -> None:
    psql = psql_path(pg)
    direct_env = {**masked.env(), "PGPASSWORD": pg.service_password}
    for steps in UNMASKED:
        via = await run(_psql(psql, masked.port, "appdb", "agent", steps), env=masked.env())
        direct = await run(_psql(psql, pg.port, piidb.name, SERVICE_USER, steps),
                           env=direct_env)
        assert via.returncode == direct.returncode == 0, (steps, via.stderr, direct.stderr)
        assert via.stdout == direct.stdout, steps
        assert via.stdout.count("\n") >= 3, steps


async def test_unmasked_results_identical_asyncpg(masked: RunningGateway, piidb: PiiDb,
                                                  pg: LocalPostgres) -> None:
    via = await asyncpg.connect(masked.dsn())
    direct = await asyncpg.connect(piidb.dsn(pg))
    async def results(conn: asyncpg.Connection, steps: tuple[str, ...]) -> list[list[tuple]]:
        out = []
        for step in steps:  # twice: the second run binds the cached statement
            for _ in range(2 if len(steps) == 1 else 1):
                out.append([tuple(r.values()) for r in await conn.fetch(step)])
        return out

    try:
        for steps in UNMASKED:
            if steps[0].startswith("COPY"):
                continue
            # One connection's steps at a time: a transaction's uncommitted rows would
            # make the other wait.
            assert await results(via, steps) == await results(direct, steps), steps
    finally:
        await via.close()
        await direct.close()


def _bind(portal: str, statement: str, result_format: int) -> bytes:
    body = (portal.encode() + b"\0" + statement.encode() + b"\0" + struct.pack("!hh", 0, 0)
            + struct.pack("!hh", 1, result_format))
    return message(b"B", body)


def _parse(name: str, sql: str) -> bytes:
    return message(b"P", name.encode() + b"\0" + sql.encode() + b"\0" + struct.pack("!h", 0))


def _execute(portal: str, max_rows: int = 0) -> bytes:
    return message(b"E", portal.encode() + b"\0" + struct.pack("!i", max_rows))


def _describe_portal(portal: str) -> bytes:
    return message(b"D", b"P" + portal.encode() + b"\0")


SYNC = message(b"S")


def _exchanges(sql: str) -> list[bytes]:
    """The same statement four ways: simple Query; extended with a Describe, text and
    binary results; extended without a Describe (the gateway describes the portal itself
    and hides that); a portal run three rows at a time."""
    return [
        message(b"Q", sql.encode() + b"\0"),
        _parse("", sql) + _bind("", "", 0) + _describe_portal("") + _execute("") + SYNC,
        _parse("s1", sql) + _bind("", "s1", 1) + _describe_portal("") + _execute("") + SYNC,
        _bind("", "s1", 1) + _execute("") + SYNC,
        _bind("p1", "s1", 1) + _execute("p1", 3) + _execute("p1", 3) + SYNC
        + message(b"C", b"Ss1\0") + SYNC,
    ]


async def _raw_reply(client: RawClient, data: bytes, syncs: int) -> bytes:
    await client.send(data)
    out = b""
    for _ in range(syncs):
        reply = await client.read_until(b"Z", within=20)
        out += b"".join(t + struct.pack("!I", len(p) + 4) + p for t, p in reply.messages)
    return out


async def test_unmasked_results_identical_on_the_wire(masked: RunningGateway, piidb: PiiDb,
                                                      pg: LocalPostgres) -> None:
    """Raw protocol bytes, simple and extended (text and binary formats), through the
    gateway and direct, are identical for results with nothing to mask."""
    via = await RawClient.open(masked.port)
    login = await via.login(masked.token())
    assert login.types().endswith(b"Z"), login.errors()
    upstream = await upstream_connect(parse_upstream(piidb.dsn(pg)), "direct", {})
    direct = RawClient(upstream.reader, upstream.writer)
    try:
        for steps in UNMASKED:
            if len(steps) != 1 or steps[0].startswith("COPY"):
                continue
            for data in _exchanges(steps[0]):
                syncs = data.count(SYNC) if data[:1] != b"Q" else 1
                got = await _raw_reply(via, data, syncs)
                want = await _raw_reply(direct, data, syncs)
                assert got == want, (steps[0], data[:40])
                assert b"D" in got[:1] + got, steps[0]
    finally:
        await via.close()
        upstream.close()


# -- break glass ---------------------------------------------------------------------------


async def test_breakglass_sees_raw_values_and_is_audited(piidb: PiiDb, pg: LocalPostgres,
                                                         tmp_path: Path) -> None:
    running = await _start(tmp_path, piidb.dsn(pg), audit=True)
    try:
        person = piidb.people[0]
        sql = "SELECT ssn, card_number, email, note FROM customers WHERE id = 1"
        glass = await asyncpg.connect(running.dsn(running.token(
            "oncall-7", ("agents", "breakglass"))))
        try:
            row = await glass.fetchrow(sql)
        finally:
            await glass.close()
        assert (row["ssn"], row["card_number"], row["email"]) == (
            person.ssn, person.card_number, person.email)
        assert row["note"] == person.note
        # The same statement for an ordinary agent is masked, so the exemption is real.
        agent = await asyncpg.connect(running.dsn())
        try:
            masked_row = await agent.fetchrow(sql)
            # Errors quoting a value are masked for the agent, and so in the trail.
            for failing in ("SELECT ssn::int FROM customers",
                            "SELECT fail_with(ssn) FROM customers",
                            "SELECT email::json FROM customers"):
                with pytest.raises(asyncpg.PostgresError):
                    await agent.fetch(failing)
        finally:
            await agent.close()
        assert masked_row["ssn"] == "***-**-" + person.ssn[-4:]
        assert masked_row["card_number"] != person.card_number
    finally:
        await running.gateway.stop(grace=1)  # type: ignore[attr-defined]
    store = await open_store(running.config.audit, create=False)
    try:
        sessions = await store.list_sessions()
        by_subject = {s.subject: s for s in sessions}
        assert {"oncall-7", "agent-1"} <= set(by_subject)
        statements = await store.session_statements(by_subject["oncall-7"].id)
        actions = {(m.column_or_detector, m.strategy) for st in statements for m in st.masking}
        assert ("public.customers.ssn", "unmasked:breakglass") in actions, actions
        assert ("public.customers.card_number", "unmasked:breakglass") in actions, actions
        assert ("detectors", "unmasked:breakglass") in actions, actions
        agent_statements = await store.session_statements(by_subject["agent-1"].id)
        agent_actions = {(m.column_or_detector, m.strategy) for st in agent_statements
                         for m in st.masking}
        assert ("public.customers.ssn", "last4") in agent_actions, agent_actions
        errors = [st.error_message for st in agent_statements if st.error_message]
        assert len(errors) == 3, errors
        assert any("****" in e for e in errors) and any("withheld" in e for e in errors), errors
    finally:
        await store.close()
    assert not piidb.secrets.find(_read_all(tmp_path, "audit.db*")), \
        "raw values in the audit trail"


def _read_all(folder: Path, pattern: str) -> str:
    """Every byte of the matching files (the SQLite store, its WAL, and the files of its
    journal directory), as text."""
    paths = [p for path in folder.glob(pattern)
             for p in ([path] if not path.is_dir() else sorted(path.rglob("*")))]
    return b"".join(p.read_bytes() for p in paths if p.is_file()).decode("latin-1")


@pytest.mark.parametrize("item", [c for c in CASES if c.id in (
    "aliases", "row-to-json", "copy-csv", "reverse", "card-bigint", "note-spread")],
    ids=lambda c: c.id)
async def test_breakglass_runs_leak_detector(item: Case, piidb: PiiDb, pg: LocalPostgres,
                                             tmp_path: Path) -> None:
    """The leak check is not vacuous: the same cases for a break-glass identity (masking
    exempt) do show raw values, and the check finds them."""
    running = await _start(tmp_path, piidb.dsn(pg))
    try:
        token = running.token("oncall-7", ("breakglass",))
        outcome = await asyncio.wait_for(run_asyncpg(running.dsn(token), item), 30)
    finally:
        await running.gateway.stop(grace=1)  # type: ignore[attr-defined]
    assert piidb.secrets.find(outcome.text(), item.no_long_digits, item.prefixes), item.id


# -- the raw bytes of every protocol path --------------------------------------------------


def _wire_text(messages: list[tuple[bytes, bytes]]) -> str:
    """Everything received, with each DataRow field also read as the binary numbers it
    could be (int2/4/8, float4/8, numeric), so a card number sent as int8 shows."""
    lines = []
    for mtype, payload in messages:
        lines.append(payload.decode("latin-1"))
        if mtype != b"D":
            continue
        (count,) = struct.unpack_from("!h", payload)
        pos = 2
        for _ in range(count):
            (size,) = struct.unpack_from("!i", payload, pos)
            pos += 4
            if size <= 0:
                continue
            value = payload[pos:pos + size]
            pos += size
            if size in (2, 4, 8):
                lines.append(str(int.from_bytes(value, "big", signed=True)))
            if size in (4, 8):
                lines.append(repr(struct.unpack("!f" if size == 4 else "!d", value)[0]))
            lines.append(numeric_text(value).decode("latin-1"))
    return "\n".join(lines)


RAW_SENSITIVE = [
    "SELECT ssn, card_number::bigint, card_number::numeric, card_number::float8, email, "
    "row_to_json(c), c FROM customers c",
    "SELECT * FROM customers",
    "SELECT iban, reverse(iban), a FROM accounts a",
]


@pytest.mark.parametrize("sql", RAW_SENSITIVE, ids=["computed", "star", "iban"])
async def test_raw_protocol_paths_masked(sql: str, masked: RunningGateway,
                                         piidb: PiiDb) -> None:
    """Simple Query, extended with text and binary results, a portal executed without a
    Describe and one suspended every three rows: the bytes on the wire hold no secret."""
    client = await RawClient.open(masked.port)
    try:
        login = await client.login(masked.token())
        assert login.types().endswith(b"Z"), login.errors()
        for data in _exchanges(sql):
            await client.send(data)
            syncs = data.count(SYNC) if data[:1] != b"Q" else 1
            received: list[tuple[bytes, bytes]] = []
            for _ in range(syncs):
                reply = await client.read_until(b"Z", within=20)
                assert not reply.errors(), (sql, data[:40], reply.errors())
                received += reply.messages
            assert sum(t == b"D" for t, _ in received) >= 3, (sql, data[:40])
            leaks = piidb.secrets.find(_wire_text(received))
            assert not leaks, (sql, data[:40], leaks[:5])
    finally:
        await client.close()


@pytest.mark.parametrize(("sql", "expected"), [
    ("SELECT * FROM nosuch", 'relation "nosuch" does not exist'),
    ("SELECT nosuchcol FROM customers", 'column "nosuchcol" does not exist'),
    ("SELECT nosuch_fn(ssn) FROM customers", "function nosuch_fn(text) does not exist"),
    ("SELECT 'x'::nosuchtype", 'type "nosuchtype" does not exist'),
    ("INSERT INTO leak_checked VALUES ('too long')",
     'new row for relation "leak_checked" violates check constraint "leak_checked_v_check"'),
    ("SELECT ssn::int FROM customers", 'invalid input syntax for type integer: "****"'),
])
async def test_errors_stay_readable(sql: str, expected: str, masked: RunningGateway) -> None:
    """Masking error texts keeps them useful: names the statement spelled and the names
    the server reports in their own fields are quoted back; values are not."""
    conn = await asyncpg.connect(masked.dsn())
    try:
        with pytest.raises(asyncpg.PostgresError) as failure:
            await conn.fetch(sql)
    finally:
        await conn.close()
    assert failure.value.args[0] == expected


# -- names SQL gives to statements and cursors ---------------------------------------------


def _describe_statement(name: str) -> bytes:
    return message(b"D", b"S" + name.encode() + b"\0")


class _Fails(bytes):
    """A setup exchange the server refuses (its error is part of the scenario)."""


_REVERSED = "SELECT ssn, reverse(ssn) AS r, card_number || '' AS c FROM customers"
_HARMLESS = "SELECT 'a'::text AS ssn, 'b'::text AS r, 'c'::text AS c"
_UNKNOWN = "SELECT nosuchcol FROM customers"  # (parses, then fails on the server)
# (setup: simple Queries as text, extended exchanges ending in one Sync as bytes; then the
# exchange that reads rows through a protocol name the gateway did not see bound)
SQL_NAMED: list[tuple[str, list[str | bytes], bytes]] = [
    ("declared-cursor", [f"BEGIN; DECLARE c CURSOR FOR {_REVERSED}"], _execute("c", 3) + SYNC),
    ("declared-cursor-described", [f"BEGIN; DECLARE c CURSOR FOR {_REVERSED}"],
     _describe_portal("c") + _execute("c") + SYNC),
    ("sql-prepared", [f"PREPARE p AS {_REVERSED}"], _bind("", "p", 1) + _execute("") + SYNC),
    ("statement-renamed", [
        _parse("s", "SELECT 'a'::text AS ssn, 'b'::text AS r, 'c'::text AS c")
        + _describe_statement("s") + SYNC, f"DEALLOCATE s; PREPARE s AS {_REVERSED}"],
     _bind("", "s", 0) + _execute("") + SYNC),
    ("portal-renamed", [
        "BEGIN", _parse("h", "SELECT 'a'::text AS ssn, 'b'::text AS r, 'c'::text AS c "
                        "FROM generate_series(1, 9)") + _bind("c", "h", 0)
        + _describe_portal("c") + _execute("c", 1) + SYNC,
        f"CLOSE c; DECLARE c CURSOR FOR {_REVERSED}"], _execute("c", 3) + SYNC),
    # a Parse the server refuses (the name is taken) or skips (after an error) leaves the
    # name holding what it held before, not the text the gateway saw
    ("parse-over-sql-prepared", [f"PREPARE p AS {_REVERSED}",
                                 _Fails(_parse("p", _HARMLESS) + _describe_statement("p")
                                        + SYNC)], _bind("", "p", 0) + _execute("") + SYNC),
    ("parse-twice", [_parse("q", _REVERSED) + SYNC, _Fails(_parse("q", _HARMLESS) + SYNC)],
     _bind("", "q", 0) + _describe_portal("") + _execute("") + SYNC),
    ("unnamed-parse-skipped", [_parse("", _REVERSED) + SYNC,
                               _Fails(_parse("b", _UNKNOWN) + _parse("", _HARMLESS) + SYNC)],
     _bind("", "", 1) + _execute("") + SYNC),
    ("close-skipped", [_parse("x", _REVERSED) + SYNC,
                       _Fails(_parse("b", _UNKNOWN) + message(b"C", b"Sx\0") + SYNC),
                       _Fails(_parse("x", _HARMLESS) + _describe_statement("x") + SYNC)],
     _bind("", "x", 0) + _execute("") + SYNC),
    # likewise a Bind the server refuses (the portal exists), its transaction resumed
    ("portal-rebound", [
        "BEGIN", _parse("s", _REVERSED) + _parse("h", _HARMLESS) + _bind("c", "s", 0)
        + _execute("c", 1) + SYNC, "SAVEPOINT sp", _Fails(_bind("c", "h", 0) + SYNC),
        "ROLLBACK TO sp"], _execute("c", 3) + SYNC),
]


async def _set_up(client: RawClient, gw: RunningGateway, setup: list[str | bytes]) -> None:
    """Log in, then run each setup step (SQL text as a simple Query, or raw messages),
    each failing exactly when it is a _Fails."""
    login = await client.login(gw.token())
    assert login.types().endswith(b"Z"), login.errors()
    for step in setup:
        data = message(b"Q", step.encode() + b"\0") if isinstance(step, str) else step
        await client.send(data)
        done = await client.read_until(b"Z", within=20)
        assert bool(done.errors()) == isinstance(step, _Fails), (step, done.errors())


@pytest.mark.parametrize(("setup", "exchange"), [(s, e) for _, s, e in SQL_NAMED],
                         ids=[name for name, _, _ in SQL_NAMED])
async def test_sql_named_statements_and_cursors(setup: list[str | bytes], exchange: bytes,
                                                masked: RunningGateway, piidb: PiiDb) -> None:
    """PREPARE and DECLARE name prepared statements and portals in the namespaces Bind and
    Execute use: bound or executed by the protocol (never seen by Parse/Bind, or renamed
    by SQL since), their rows would arrive with nothing known about their sources; so
    would those of a name whose last Parse the server refused or skipped. The gateway
    refuses that with a clear error, and the session goes on."""
    client = await RawClient.open(masked.port)
    try:
        await _set_up(client, masked, setup)
        await client.send(exchange)
        reply = await client.read_until(b"Z", within=20)
        leaks = piidb.secrets.find(_wire_text(reply.messages))
        assert not leaks, leaks[:5]
        assert not any(t == b"D" for t, _ in reply.messages)
        errors = reply.errors()
        assert errors and errors[0].get("C") == "42501" and "hoopops" in errors[0].get("M", "")
        await client.send(message(b"Q", b"ROLLBACK\0"))
        await client.read_until(b"Z", within=20)
        after = await client.simple("SELECT 41 + 1")
        assert after.rows() == [["42"]], after.messages
    finally:
        await client.close()


# -- inference the shipped policy sends to a human ------------------------------------------


@pytest.fixture(scope="module")
async def shipped(piidb: PiiDb, pg: LocalPostgres, tmp_path_factory: pytest.TempPathFactory
                  ) -> AsyncIterator[RunningGateway]:
    """A gateway with the shipped policy set alone (no test rules)."""
    folder = tmp_path_factory.mktemp("shipped-gw")
    policies = _policies(folder / "policies")
    (policies / "00-exfil-tests.yaml").unlink()
    from hoopops.gateway import build_gateway

    config = load_config(_config(folder, piidb.dsn(pg), policies, False))
    gateway = await build_gateway(config)
    await gateway.start()
    yield RunningGateway(gateway, config, gateway.port)
    await gateway.stop(grace=1)  # type: ignore[attr-defined]


@pytest.mark.parametrize("sql", [
    # how many rows a set-returning function yields is a function of its arguments
    "SELECT id, generate_series(1, substr(ssn, 1, 1)::int) FROM customers WHERE id = 1",
    "SELECT count(*) FROM customers c, generate_series(1, substr(c.ssn, 1, 1)::int) g "
    "WHERE c.id = 1",
    "SELECT count(*) FROM customers c, regexp_matches(c.card_number, '5', 'g') m "
    "WHERE c.id = 1",
    "SELECT c.id FROM customers c, jsonb_path_query(to_jsonb(c), "
    "'$ ? (@.ssn starts with \"5\")') j",
    "SELECT (SELECT count(*) FROM unnest(string_to_array(ssn, '5'))) FROM customers",
    "SELECT count(*) FROM customers TABLESAMPLE BERNOULLI ((SELECT ascii(ssn) - 48 "
    "FROM customers WHERE id = 1) * 10) REPEATABLE (1)",
    # how many distinct values there are (1: the guess was right)
    "SELECT count(*) FROM (SELECT DISTINCT x FROM (SELECT left(ssn, 1) AS x FROM customers "
    "WHERE id = 1 UNION ALL SELECT '5') s) d",
    # an unmasked truth value about a masked one
    "SELECT id, (ssn > '5') IS TRUE FROM customers",
    "SELECT id, substring(card_number from '^4') IS NULL FROM customers",
    # how long it takes
    "SELECT pg_sleep(0.01 * substr(ssn, 1, 1)::int) FROM customers WHERE id = 1",
    # whether it fails
    "SELECT 1 / (substr(ssn, 1, 1)::int - 5) FROM customers WHERE id = 1",
    "SELECT ('a' || card_number)::int FROM customers WHERE id = 1",
    "SELECT chr(ascii(ssn) * 1000000) FROM customers WHERE id = 1",
    "SELECT 'x' LIKE substr(ssn, 1, 1) || '\\' FROM customers WHERE id = 1",
    "SELECT repeat('x', 100000000 * (substr(ssn, 1, 1) = '5')::int) FROM customers "
    "WHERE id = 1",
    "SELECT ARRAY[string_to_array(ssn, '5'), ARRAY['a', 'b']] FROM customers WHERE id = 1",
    "SELECT array_agg(string_to_array(ssn, '5')) FROM customers WHERE id IN (1, 2)",
    "SELECT json_build_object(substring(ssn from '^5'), 1) FROM customers WHERE id = 1",
    "SELECT jsonb_path_query_first(to_jsonb(c), 'strict $ ? (@.ssn like_regex \"^5\").x') "
    "FROM customers c WHERE id = 1",
    pytest.param("WITH t AS (SELECT string_to_array(ssn, '5') AS a FROM customers "
                 "WHERE id IN (1, 2)) SELECT array_agg(a) FROM t", marks=pytest.mark.xfail(
                     strict=True, reason="open: an array-valued column of a CTE or subquery "
                     "is not known to be an array (no types in the analysis), so the "
                     "dimension check array_agg makes on it is not seen as a condition")),
], ids=["srf-target-list", "srf-from", "regexp-matches-count", "jsonb-path-filter",
        "unnest-count", "tablesample-size", "distinct-count", "boolean-test", "null-test",
        "sleep-timing",
        "error-division", "error-cast", "error-chr", "error-like-pattern", "error-repeat",
        "error-array-dims", "error-array-agg-dims", "error-json-key", "error-jsonpath-filter",
        "error-array-agg-via-cte"])
async def test_row_count_inference_is_reviewed(sql: str, shipped: RunningGateway) -> None:
    """Statements whose row count, duration or success depends on a masked value answer
    questions about it; the shipped policy holds them for an analyst (none here: refused)."""
    conn = await asyncpg.connect(shipped.dsn())
    try:
        with pytest.raises(asyncpg.PostgresError) as failure:
            await conn.fetch(sql)
    finally:
        await conn.close()
    assert "approval" in str(failure.value.args[0]), failure.value.args[0]


@pytest.mark.parametrize(("first", "second"), [
    ("SELECT DISTINCT ON (1) id, left(ssn, 1) FROM customers",
     "SELECT DISTINCT ON (2) id, left(ssn, 1) FROM customers"),
    ("SELECT id, left(card_number, 1), count(*) FROM customers GROUP BY CUBE (1, 1)",
     "SELECT id, left(card_number, 1), count(*) FROM customers GROUP BY CUBE (1, 2)"),
], ids=["distinct-on", "cube"])
async def test_output_positions_are_not_literals(first: str, second: str,
                                                 shipped: RunningGateway) -> None:
    """DISTINCT ON (2) and ROLLUP/CUBE/GROUPING SETS positions name output columns, yet a
    statement's shape turns them into parameters: the first statement (grouping on id,
    run or failed) must not lend its facts to the second (grouping on a masked value)."""
    conn = await asyncpg.connect(shipped.dsn())
    try:
        with contextlib.suppress(asyncpg.PostgresError):
            await conn.fetch(first)
        with pytest.raises(asyncpg.PostgresError) as failure:
            await conn.fetch(second)
    finally:
        await conn.close()
    assert "approval" in str(failure.value.args[0]), failure.value.args[0]


SHADOWED: list[tuple[str, list[str | bytes], bytes]] = [
    ("prepare-closed-then-parsed", [f"PREPARE p AS {_HARMLESS}", message(b"C", b"Sp\0") + SYNC,
                                    _parse("p", _REVERSED) + SYNC],
     message(b"Q", b"EXECUTE p\0")),
    ("prepare-failed-then-parsed", [_Fails(message(b"Q", f"PREPARE t AS {_HARMLESS} FROM "
                                                        "nosuch\0".encode())),
                                    _parse("t", _REVERSED) + SYNC],
     message(b"Q", b"EXECUTE t\0")),
    ("declare-failed-then-bound", [_Fails(message(b"Q", f"DECLARE c CURSOR FOR {_HARMLESS}\0"
                                                  .encode())), "BEGIN",
                                   _parse("s", _REVERSED) + _bind("c", "s", 0)
                                   + _execute("c", 1) + SYNC],
     message(b"Q", b"FETCH 3 FROM c\0")),
]


@pytest.mark.parametrize(("setup", "exchange"), [(s, e) for _, s, e in SHADOWED],
                         ids=[name for name, _, _ in SHADOWED])
async def test_sql_names_used_by_the_protocol(setup: list[str | bytes], exchange: bytes,
                                              masked: RunningGateway, piidb: PiiDb) -> None:
    """EXECUTE / FETCH of a name that PREPARE / DECLARE gave (or failed to give) and the
    protocol has since used for another statement or portal: the rows are that other one's,
    so what PREPARE / DECLARE said about them is not used (they are masked whole)."""
    client = await RawClient.open(masked.port)
    try:
        await _set_up(client, masked, setup)
        await client.send(exchange)
        reply = await client.read_until(b"Z", within=20)
        assert not reply.errors(), reply.errors()
        assert sum(t == b"D" for t, _ in reply.messages) >= 3
        leaks = piidb.secrets.find(_wire_text(reply.messages))
        assert not leaks, leaks[:5]
    finally:
        await client.close()

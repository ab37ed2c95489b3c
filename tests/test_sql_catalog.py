"""SqlCatalog against a real PostgreSQL: names are judged by what they really are.

The server is private to this module (outside pytest's shared temp folder, which other
test runs may prune while it is in use).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from hoopops.devdb import LocalPostgres
from hoopops.policy import PolicyEngine, load_policies
from hoopops.sql import analyze
from hoopops.sql_catalog import SqlCatalog

POLICIES = Path(__file__).resolve().parent.parent / "policies"
DATABASE = "hoopops_catalog_test"

SCHEMA = """
CREATE TABLE t (id int PRIMARY KEY, a int);
CREATE TABLE audited (id int, note text);
CREATE TABLE secret_rows (id int, owner text);
CREATE SEQUENCE s;

CREATE FUNCTION innocent() RETURNS int LANGUAGE sql VOLATILE
    AS 'DELETE FROM t RETURNING 1';
CREATE FUNCTION stable_reader() RETURNS bigint LANGUAGE sql STABLE
    AS 'SELECT count(*) FROM t';
CREATE FUNCTION calls_innocent() RETURNS int LANGUAGE sql STABLE
    AS 'SELECT innocent()';
CREATE FUNCTION sneaky() RETURNS boolean LANGUAGE plpgsql STABLE AS $$
BEGIN
  RETURN pg_terminate_backend(0);
END $$;
CREATE FUNCTION sneaky_atomic() RETURNS text LANGUAGE sql STABLE
BEGIN ATOMIC
  SELECT pg_read_file('postgresql.conf');
END;
CREATE FUNCTION dynamic_one() RETURNS void LANGUAGE plpgsql STABLE AS $$
BEGIN
  EXECUTE 'SELECT 1';
END $$;
CREATE FUNCTION bumps() RETURNS bigint LANGUAGE sql STABLE AS $$ SELECT nextval('s') $$;
CREATE FUNCTION looping(n int) RETURNS int LANGUAGE sql STABLE
    AS 'SELECT CASE WHEN n > 0 THEN looping(n - 1) ELSE 0 END';

CREATE VIEW report AS SELECT innocent() AS x;
CREATE VIEW plain_view AS SELECT id, a FROM t;
CREATE VIEW view_of_view AS SELECT * FROM report;

CREATE FUNCTION audit_fn() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_read_file('postgresql.conf');
  RETURN NEW;
END $$;
CREATE TRIGGER audited_trg BEFORE INSERT ON audited FOR EACH ROW EXECUTE FUNCTION audit_fn();

CREATE FUNCTION weird_eq(int, int) RETURNS boolean LANGUAGE sql VOLATILE
    AS 'SELECT $1 = $2';
CREATE OPERATOR === (LEFTARG = int, RIGHTARG = int, FUNCTION = weird_eq);

CREATE SCHEMA evil;
CREATE FUNCTION evil.lower(text) RETURNS text LANGUAGE sql VOLATILE AS 'SELECT $1';

CREATE FUNCTION rls_check(text) RETURNS boolean LANGUAGE sql VOLATILE AS 'SELECT true';
ALTER TABLE secret_rows ENABLE ROW LEVEL SECURITY;
CREATE POLICY p ON secret_rows USING (rls_check(owner));

CREATE VIEW ticket AS SELECT nextval('s') AS n;
CREATE VIEW peek AS SELECT pg_read_file('postgresql.conf') AS conf;

CREATE FUNCTION acc(int, int) RETURNS int LANGUAGE sql VOLATILE AS 'SELECT $1 + $2';
CREATE AGGREGATE sneaky_sum(int) (SFUNC = acc, STYPE = int, INITCOND = '0');

CREATE FUNCTION positive(int) RETURNS boolean LANGUAGE sql VOLATILE AS 'SELECT $1 > 0';
CREATE DOMAIN checked_int AS int CHECK (positive(VALUE));

CREATE TYPE money2 AS (amount int);
CREATE FUNCTION to_money2(int) RETURNS money2 LANGUAGE sql VOLATILE
    AS 'SELECT ROW($1)::money2';
CREATE CAST (int AS money2) WITH FUNCTION to_money2(int);

CREATE TABLE ruled (id int);
CREATE RULE copy_to_audited AS ON INSERT TO ruled DO ALSO
    INSERT INTO audited VALUES (NEW.id, 'copied');
CREATE VIEW audited_view AS SELECT id, note FROM audited;

CREATE FUNCTION relax_strings() RETURNS text LANGUAGE sql STABLE
    AS $$ SELECT set_config('standard_conforming_strings', 'off', false) $$;

CREATE FUNCTION lots_of_uuid() RETURNS uuid LANGUAGE sql VOLATILE
    AS 'SELECT gen_random_uuid()';
"""


@pytest.fixture(scope="module")
def catalog_pg() -> Iterator[LocalPostgres]:
    server = LocalPostgres().start()
    try:
        yield server
    finally:
        server.stop(remove=True)


@pytest.fixture(scope="module")
async def catalog_db(catalog_pg: LocalPostgres) -> AsyncIterator[str]:
    pg = catalog_pg
    admin = await asyncpg.connect(pg.admin_dsn)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {DATABASE}")
        await admin.execute(f"CREATE DATABASE {DATABASE}")
    finally:
        await admin.close()
    owner = await asyncpg.connect(pg.dsn("postgres", database=DATABASE))
    try:
        await owner.execute(SCHEMA)
    finally:
        await owner.close()
    yield pg.dsn(database=DATABASE)


@pytest.fixture
async def catalog(catalog_db: str) -> AsyncIterator[SqlCatalog]:
    conn = await asyncpg.connect(catalog_db)

    async def connect() -> Any:
        return conn

    try:
        yield SqlCatalog(connect)
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def engine() -> PolicyEngine:
    return PolicyEngine.from_policies(load_policies(POLICIES))


async def judge(catalog: SqlCatalog, engine: PolicyEngine, sql: str,
                search_path: str | None = None) -> tuple[str, str, Any]:
    analysis = await catalog.enrich(analyze(sql), search_path)
    decision = engine.decide(None, None, analysis)
    return decision.action, decision.rule_id, analysis.statements[decision.statement_index
                                                                  or 0]


async def test_plain_reads_stay_reads(catalog: SqlCatalog, engine: PolicyEngine) -> None:
    for sql in ("SELECT * FROM t", "SELECT stable_reader()", "SELECT * FROM plain_view",
                "SELECT lower('x') FROM t", "SELECT 1 = 1", "SELECT now()"):
        action, rule, _ = await judge(catalog, engine, sql, "public")
        assert (action, rule) == ("allow", "reads"), sql


async def test_volatile_user_function_is_a_write(catalog: SqlCatalog,
                                                 engine: PolicyEngine) -> None:
    action, rule, facts = await judge(catalog, engine, "SELECT innocent()")
    assert (action, rule) == ("review", "writes-need-review")
    assert "write" in facts.kinds
    assert any("public.innocent is a volatile" in note for note in facts.notes)


async def test_stable_function_calling_a_volatile_one(catalog: SqlCatalog,
                                                      engine: PolicyEngine) -> None:
    action, rule, facts = await judge(catalog, engine, "SELECT calls_innocent()")
    assert (action, rule) == ("review", "writes-need-review")
    assert "public.innocent" in facts.functions


async def test_dangerous_calls_inside_function_bodies(catalog: SqlCatalog,
                                                      engine: PolicyEngine) -> None:
    for sql, fragment in (("SELECT sneaky()", "pg_terminate_backend"),
                          ("SELECT sneaky_atomic()", "pg_read_file")):
        action, rule, facts = await judge(catalog, engine, sql)
        assert (action, rule) == ("block", "no-dangerous"), sql
        assert any(fragment in reason for reason in facts.dangerous_reasons)


async def test_dynamic_sql_and_side_effect_builtins_in_bodies(
        catalog: SqlCatalog, engine: PolicyEngine) -> None:
    action, rule, facts = await judge(catalog, engine, "SELECT dynamic_one()")
    assert (action, rule) == ("review", "writes-need-review")
    assert any("dynamic SQL" in note for note in facts.notes)
    action, rule, _ = await judge(catalog, engine, "SELECT bumps()")
    assert (action, rule) == ("review", "writes-need-review")


async def test_recursive_functions_terminate(catalog: SqlCatalog,
                                             engine: PolicyEngine) -> None:
    action, rule, _ = await judge(catalog, engine, "SELECT looping(3)")
    assert (action, rule) == ("allow", "reads")


async def test_views_are_what_they_call(catalog: SqlCatalog, engine: PolicyEngine) -> None:
    action, rule, facts = await judge(catalog, engine, "SELECT * FROM report")
    assert (action, rule) == ("review", "writes-need-review")
    assert "public.innocent" in facts.functions
    action, rule, _ = await judge(catalog, engine, "SELECT x FROM view_of_view")
    assert (action, rule) == ("review", "writes-need-review")


async def test_triggers_fire_on_writes(catalog: SqlCatalog, engine: PolicyEngine) -> None:
    action, rule, facts = await judge(catalog, engine, "INSERT INTO audited VALUES (1, 'x')")
    assert (action, rule) == ("block", "no-dangerous")
    assert any("fires triggers" in note for note in facts.notes)
    action, rule, _ = await judge(catalog, engine, "SELECT * FROM audited")
    assert (action, rule) == ("allow", "reads")


async def test_rules_and_updatable_views_reach_triggers(
        catalog: SqlCatalog, engine: PolicyEngine) -> None:
    action, rule, facts = await judge(catalog, engine, "INSERT INTO ruled VALUES (1)")
    assert (action, rule) == ("block", "no-dangerous")
    assert any("rules that rewrite writes" in note for note in facts.notes)
    action, rule, _ = await judge(catalog, engine,
                                  "INSERT INTO audited_view VALUES (1, 'x')")
    assert (action, rule) == ("block", "no-dangerous")
    action, rule, _ = await judge(catalog, engine, "SELECT * FROM audited_view")
    assert (action, rule) == ("allow", "reads")


async def test_functions_changing_how_text_is_read(catalog: SqlCatalog,
                                                   engine: PolicyEngine) -> None:
    action, rule, facts = await judge(catalog, engine, "SELECT relax_strings()")
    assert (action, rule) == ("block", "builtin:lexing-risk")
    assert facts.lexing_risk[0].startswith("public.relax_strings: ")


async def test_user_defined_operators_are_calls(catalog: SqlCatalog,
                                                engine: PolicyEngine) -> None:
    action, rule, facts = await judge(catalog, engine, "SELECT 1 === 2")
    assert (action, rule) == ("review", "writes-need-review")
    assert "public.weird_eq" in facts.functions


async def test_shadowing_through_search_path(catalog: SqlCatalog,
                                             engine: PolicyEngine) -> None:
    # Unknown search path: evil.lower could be what lower() means.
    action, rule, _ = await judge(catalog, engine, "SELECT lower('x')")
    assert (action, rule) == ("review", "writes-need-review")
    action, rule, _ = await judge(catalog, engine, "SELECT lower('x')", "evil, public")
    assert (action, rule) == ("review", "writes-need-review")
    action, rule, _ = await judge(catalog, engine, "SELECT lower('x')", "public")
    assert (action, rule) == ("allow", "reads")
    action, rule, _ = await judge(catalog, engine, "SELECT pg_catalog.lower('x')")
    assert (action, rule) == ("allow", "reads")


async def test_row_security_policies(catalog: SqlCatalog, engine: PolicyEngine) -> None:
    action, rule, facts = await judge(catalog, engine, "SELECT * FROM secret_rows")
    assert (action, rule) == ("review", "writes-need-review")
    assert "public.rls_check" in facts.functions


async def test_volatile_without_side_effects_list(catalog: SqlCatalog,
                                                  engine: PolicyEngine) -> None:
    # A volatile user function is a write even if all it does is make a UUID.
    action, _, _ = await judge(catalog, engine, "SELECT lots_of_uuid()")
    assert action == "review"


async def test_views_calling_builtins_with_side_effects(
        catalog: SqlCatalog, engine: PolicyEngine) -> None:
    action, rule, facts = await judge(catalog, engine, "SELECT n FROM ticket")
    assert (action, rule) == ("review", "writes-need-review")
    assert "pg_catalog.nextval" in facts.functions
    action, rule, _ = await judge(catalog, engine, "SELECT conf FROM peek")
    assert (action, rule) == ("block", "no-dangerous")


async def test_aggregates_domains_and_casts_call_functions(
        catalog: SqlCatalog, engine: PolicyEngine) -> None:
    for sql, function in (("SELECT sneaky_sum(a) FROM t", "public.acc"),
                          ("SELECT 5::checked_int", "public.positive"),
                          ("SELECT CAST(5 AS money2)", "public.to_money2")):
        action, rule, facts = await judge(catalog, engine, sql)
        assert (action, rule) == ("review", "writes-need-review"), sql
        assert function in facts.functions, sql
    action, rule, _ = await judge(catalog, engine, "SELECT sum(a)::text FROM t")
    assert (action, rule) == ("allow", "reads")


async def test_lookups_are_cached(catalog: SqlCatalog) -> None:
    await catalog.enrich(analyze("SELECT innocent() FROM report JOIN t ON t.id = 1"))
    before = catalog.lookups
    await catalog.enrich(analyze("SELECT innocent() FROM report JOIN t ON t.id = 1"))
    await catalog.enrich(analyze("SELECT x FROM report WHERE innocent() = 1"))
    assert catalog.lookups == before
    catalog.invalidate()
    await catalog.enrich(analyze("SELECT innocent()"))
    assert catalog.lookups > before


async def test_nothing_to_look_up_means_no_round_trip(catalog: SqlCatalog) -> None:
    analysis = analyze("SELECT 1")
    assert await catalog.enrich(analysis) is analysis
    assert catalog.lookups == 0


async def test_lookup_failure_fails_closed(engine: PolicyEngine) -> None:
    async def broken() -> Any:
        raise OSError("connection refused")

    catalog = SqlCatalog(broken)
    analysis = await catalog.enrich(analyze("SELECT * FROM t; SELECT 1"))
    decision = engine.decide(None, None, analysis)
    assert (decision.action, decision.rule_id) == ("block", "builtin:unanalysable")
    assert "catalog could not be consulted" in decision.rule_description
    assert all(st.unanalysable for st in analysis.statements)


async def test_lookup_on_a_pool(catalog_db: str, engine: PolicyEngine) -> None:
    pool = await asyncpg.create_pool(catalog_db, min_size=1, max_size=2)
    try:
        async def connect() -> Any:
            return pool

        catalog = SqlCatalog(connect)
        action, rule, _ = await judge(catalog, engine, "SELECT * FROM report")
        assert (action, rule) == ("review", "writes-need-review")
    finally:
        await pool.close()


def test_policy_check_consults_the_catalog(catalog_db: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from hoopops.cli import main

    code = main(["policy", "check", "--policies", str(POLICIES), "--json", "--dsn",
                 catalog_db, "SELECT * FROM report"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert (out["decision"], out["rule"]) == ("review", "writes-need-review")
    assert "public.innocent" in out["statements"][0]["functions"]


async def test_new_literals_reuse_the_judgement_until_the_catalog_changes(
        catalog: SqlCatalog, catalog_pg: LocalPostgres, engine: PolicyEngine) -> None:
    owner = await asyncpg.connect(catalog_pg.dsn("postgres", database=DATABASE))
    try:
        await owner.execute("CREATE FUNCTION shape_probe(int) RETURNS int LANGUAGE sql "
                            "STABLE AS 'SELECT $1'")
        assert (await judge(catalog, engine, "SELECT shape_probe(1) FROM t"))[:2] == \
            ("allow", "reads")
        before = catalog.lookups
        for n in range(2, 6):
            assert (await judge(catalog, engine, f"SELECT shape_probe({n}) FROM t"))[:2] == \
                ("allow", "reads")
        assert catalog.lookups == before
        # The same shape, after the function became one that writes: judged afresh.
        await owner.execute("CREATE OR REPLACE FUNCTION shape_probe(int) RETURNS int "
                            "LANGUAGE sql VOLATILE AS 'SELECT $1'")
        catalog.invalidate()
        action, rule, facts = await judge(catalog, engine, "SELECT shape_probe(7) FROM t")
        assert (action, rule) == ("review", "writes-need-review")
        assert "write" in facts.kinds and facts.text == "SELECT shape_probe(7) FROM t"
        assert (await judge(catalog, engine, "SELECT shape_probe(8) FROM t"))[:2] == \
            ("review", "writes-need-review")
    finally:
        await owner.execute("DROP FUNCTION IF EXISTS shape_probe(int)")
        await owner.close()

"""The shape cache never conflates two statements whose facts differ.

Texts that differ only in literals share one cache entry (their shape) so that a new
literal costs a lookup, not a parse. That is only sound when no fact depends on a
literal's value: a setting named in ``set_config()``, an ``EXPLAIN`` option, a function
body, a ``COPY`` target, ... Each pair below differs only inside literals (or a literal
against a parameter); after the first is analysed, the second must still get exactly the
facts and the decision a fresh analysis gives it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hoopops.identity import Identity
from hoopops.policy import PolicyEngine, load_policies
from hoopops.sql import Analysis, Analyzer

POLICIES = Path(__file__).resolve().parent.parent / "policies"
BOT = Identity("agent-7", ("agents",), None, None, None)

# (first, second): the literal decides what the statement does.
LITERAL_DEPENDENT = [
    ("SELECT set_config('jit', 'off', false)",
     "SELECT set_config('role', 'postgres', false)"),
    ("SELECT set_config('statement_timeout', '1', false)",
     "SELECT set_config('standard_conforming_strings', 'off', false)"),
    ("SELECT pg_catalog.set_config('jit', 'off', false)",
     "SELECT pg_catalog.set_config('session_authorization', 'postgres', false)"),
    ("SELECT set_config('work_mem', '1MB', true) FROM t",
     "SELECT set_config('client_encoding', 'SJIS', true) FROM t"),
    ("SELECT set_config('jit', 'off', false)", "SELECT set_config($1, 'off', false)"),
    ("SELECT set_config('application_name', 'x', false)",
     "SELECT set_config('search_path', 'evil, public', false)"),
    ("SELECT 1 FROM t WHERE set_config('jit', 'on', false) IS NOT NULL",
     "SELECT 1 FROM t WHERE set_config('role', 'admin', false) IS NOT NULL"),
    ("WITH s AS (SELECT set_config('jit', 'off', false)) SELECT * FROM s",
     "WITH s AS (SELECT set_config('role', 'x', false)) SELECT * FROM s"),
    ("SET standard_conforming_strings = 'on'", "SET standard_conforming_strings = 'off'"),
    ("SET client_encoding = 'UTF8'", "SET client_encoding = 'SJIS'"),
    ("SET client_encoding = 'UTF8'", "SET client_encoding = 'BIG5'"),
    ("SET SESSION AUTHORIZATION DEFAULT", "SET SESSION AUTHORIZATION 'postgres'"),
    ("EXPLAIN (ANALYZE 'off') DELETE FROM t", "EXPLAIN (ANALYZE 'on') DELETE FROM t"),
    ("EXPLAIN (ANALYZE 0) DELETE FROM t", "EXPLAIN (ANALYZE 1) DELETE FROM t"),
    ("EXPLAIN (ANALYZE false) UPDATE t SET a = 1",
     "EXPLAIN (ANALYZE true) UPDATE t SET a = 1"),
    ("UPDATE pg_settings SET setting = 'on' WHERE name = 'jit'",
     "UPDATE pg_settings SET setting = 'off' WHERE name = 'standard_conforming_strings'"),
    ("CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
     "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT pg_terminate_backend(1)'"),
    ("CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS 'BEGIN RETURN 1; END'",
     "CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS "
     "'BEGIN EXECUTE ''DROP TABLE t''; RETURN 1; END'"),
    ("CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
     "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT nextval(''s'')'"),
    ("DO 'BEGIN PERFORM 1; END'", "DO 'BEGIN EXECUTE ''DROP TABLE t''; END'"),
    ("COPY t FROM STDIN", "COPY t FROM '/etc/passwd'"),
    ("COPY (SELECT 1) TO STDOUT", "COPY (SELECT 1) TO '/tmp/x'"),
    ("ALTER SYSTEM SET work_mem = '1MB'", "ALTER SYSTEM SET archive_command = 'rm -rf /'"),
    ("ALTER ROLE agent SET work_mem = '1MB'",
     "ALTER ROLE agent SET standard_conforming_strings = 'off'"),
    ("CREATE TABLE x AS SELECT 1", "CREATE TABLE x AS SELECT set_config('role', 'x', false)"),
    ("PREPARE p AS SELECT set_config('jit', 'off', false)",
     "PREPARE p AS SELECT set_config('role', 'x', false)"),
    ("DECLARE c CURSOR FOR SELECT set_config('jit', 'off', false)",
     "DECLARE c CURSOR FOR SELECT set_config('role', 'x', false)"),
    ("SELECT 'a' -- DELETE", "SELECT 'b' -- DELETE"),
    ("SELECT 1 /* x */", "SELECT 2 /* x */; DELETE FROM t"),
    # Where the statement ends depends on how backslashes in literals are read.
    ("SELECT 'a\\'", "SELECT 'a\\'; DELETE FROM t; --'"),
    ("SELECT E'a'", "SELECT E'a\\'; DELETE FROM t; --'"),
    ("SELECT 'x;y'", "SELECT 'x'; DELETE FROM t"),
]

# (first, second): only values change; both texts have one shape and the same facts.
SAME_SHAPE = [
    ("SELECT abalance FROM pgbench_accounts WHERE aid = 1;",
     "SELECT abalance FROM pgbench_accounts WHERE aid = 99999;"),
    ("SELECT abalance FROM pgbench_accounts WHERE aid = 1",
     "SELECT abalance FROM pgbench_accounts WHERE aid = $1"),
    ("UPDATE pgbench_accounts SET abalance = abalance + 5 WHERE aid = 7",
     "UPDATE pgbench_accounts SET abalance = abalance + -3 WHERE aid = 8"),
    ("INSERT INTO orders (customer_id, total, status) VALUES (1, 19.99, 'paid')",
     "INSERT INTO orders (customer_id, total, status) VALUES (2, 5, 'it''s')"),
    ("DELETE FROM sessions WHERE expires < 10", "DELETE FROM sessions WHERE expires < 'now'"),
    ("UPDATE t SET a = 1 WHERE true", "UPDATE t SET a = 2 WHERE false"),
    ("UPDATE t SET a = 1 WHERE 1 = 1", "UPDATE t SET a = 1 WHERE 1 = 2"),
    ("SELECT * FROM t ORDER BY 1 LIMIT 5", "SELECT * FROM t ORDER BY 1 LIMIT 6"),
    ("SELECT $$a$$ FROM t", "SELECT $$b$$ FROM t"),
    ("SELECT E'\\n' FROM t", "SELECT 'x' FROM t"),
    ("SELECT nextval('s')", "SELECT nextval('other')"),
    ("SELECT pg_read_file('a')", "SELECT pg_read_file('/etc/passwd')"),
    ("SELECT dblink_exec('dbname=x', 'SELECT 1')",
     "SELECT dblink_exec('dbname=y', 'DELETE FROM t')"),
    ("SELECT query_to_xml('SELECT 1', true, true, '')",
     "SELECT query_to_xml('DELETE FROM t', true, true, '')"),
    ("MERGE INTO t USING u ON t.id = u.id WHEN MATCHED THEN UPDATE SET a = 1",
     "MERGE INTO t USING u ON t.id = u.id WHEN MATCHED THEN UPDATE SET a = 2"),
    ("  SELECT 1 FROM t WHERE a = 3 ;  ", "  SELECT 1 FROM t WHERE a = 4 ;  "),
]

# (first, second): constants the normaliser keeps (positions, type modifiers): two shapes.
DISTINCT_SHAPES = [
    ("SELECT a, b FROM t ORDER BY 1", "SELECT a, b FROM t ORDER BY 2"),
    ("SELECT a::varchar(10) FROM t", "SELECT a::varchar(20) FROM t"),
    ("SELECT 1 FROM t", "SELECT 1 FROM t;;"),
    ("SELECT 1 FROM t", "SELECT 1 FROM t -- 1"),
]


def _facts(analysis: Analysis) -> list[dict[str, object]]:
    return [st.to_dict() for st in analysis.statements]


def _fresh(sql: str) -> Analysis:
    return Analyzer().analyze_uncached(sql, shapes=False)


@pytest.fixture(scope="module")
def engine() -> PolicyEngine:
    return PolicyEngine.from_policies(load_policies(POLICIES))


@pytest.mark.parametrize(("first", "second"), LITERAL_DEPENDENT)
def test_literal_dependent_statements_are_not_conflated(engine: PolicyEngine, first: str,
                                                        second: str) -> None:
    analyzer = Analyzer()
    for _ in range(2):  # the second round runs on whatever the first one cached
        analyzer.analyze(first)
        got = analyzer.analyze(second)
        assert _facts(got) == _facts(_fresh(second)), second
        assert (got.parse_error, got.unanalysable) == (_fresh(second).parse_error,
                                                       _fresh(second).unanalysable)
        warm = engine.decide(BOT, "appdb", got)
        cold = PolicyEngine.from_policies(load_policies(POLICIES)).decide(
            BOT, "appdb", _fresh(second))
        assert (warm.action, warm.rule_id) == (cold.action, cold.rule_id), second


def test_the_pairs_do_differ() -> None:
    """Each pair is a real test: a cache that conflated them would give wrong facts."""
    for first, second in LITERAL_DEPENDENT:
        assert _facts(_fresh(first)) != _facts(_fresh(second)) or first == second or \
            len(_fresh(second).statements) != 1, (first, second)


@pytest.mark.parametrize(("first", "second"), SAME_SHAPE)
def test_new_literals_are_served_by_their_shape(engine: PolicyEngine, first: str,
                                                second: str) -> None:
    analyzer = Analyzer()
    one = analyzer.analyze(first)
    two = analyzer.analyze(second)
    assert len(analyzer._shapes) == 1, "the two texts should share one shape"
    assert two.statements[0]._shape is one.statements[0]._shape is not None
    assert _facts(two) == _facts(_fresh(second))
    assert two.statements[0].text == _fresh(second).statements[0].text
    assert two.statements[0].location == _fresh(second).statements[0].location
    # What sql: rules read is the same for every text of the shape.
    assert two.statements[0].normalized == one.statements[0].normalized
    warm = engine.decide(BOT, "appdb", two)
    cold = PolicyEngine.from_policies(load_policies(POLICIES)).decide(
        BOT, "appdb", _fresh(second))
    assert (warm.action, warm.rule_id, warm.message) == (cold.action, cold.rule_id,
                                                         cold.message)


@pytest.mark.parametrize(("first", "second"), DISTINCT_SHAPES)
def test_kept_constants_make_another_shape(first: str, second: str) -> None:
    analyzer = Analyzer()
    one = analyzer.analyze(first)
    two = analyzer.analyze(second)
    assert two.statements[0]._shape is None or \
        two.statements[0]._shape is not one.statements[0]._shape
    assert _facts(two) == _facts(_fresh(second))


def test_a_shape_hit_carries_its_own_text(engine: PolicyEngine) -> None:
    analyzer = Analyzer()
    engine.decide(BOT, "appdb", analyzer.analyze("SELECT ssn FROM customers WHERE id = 1"))
    decision = engine.decide(BOT, "appdb",
                             analyzer.analyze("SELECT ssn FROM customers WHERE id = 424242"))
    out = decision.to_dict()
    assert out["statements"][0]["text"] == "SELECT ssn FROM customers WHERE id = 424242"
    assert "= 1" not in str(out)
    assert decision.analysis.statements[0].pretty().endswith("424242")


def test_derived_facts_leave_the_shape() -> None:
    """Facts changed after analysis (catalog, EXECUTE, masking) are no longer the shape's:
    nothing keyed by the shape may be served for them."""
    facts = Analyzer().analyze("SELECT a FROM t WHERE id = 1").statements[0]
    assert facts._shape is not None
    assert facts.replace(kinds=frozenset({"write"}))._shape is None
    from hoopops.sql.facts import add_effects, merge_facts

    assert add_effects(facts, effect="write")._shape is None
    assert merge_facts(facts, facts)._shape is None


def test_re_parsed_statements_hit_the_text_cache() -> None:
    """pgbench -M extended sends the same text in a new Parse for every statement; simple
    mode a new literal each time, which is not worth keeping by its text."""
    analyzer = Analyzer()
    analyzer.analyze("SELECT abalance FROM pgbench_accounts WHERE aid = 1")
    text = "SELECT abalance FROM pgbench_accounts WHERE aid = $1"
    first = analyzer.analyze(text)
    assert first.statements[0]._shape is not None  # served by the shape
    assert analyzer.analyze(text) is first
    for n in range(2000):
        got = analyzer.analyze(f"SELECT abalance FROM pgbench_accounts WHERE aid = {n}")
        assert got.statements[0].text.endswith(f"= {n}")
    assert len(analyzer._exact) == 2


# Skeletons: texts without quotes, dollars, backslashes or comments are keyed without
# parsing, by their lone integers. Each template is tried with several values; whenever a
# skeleton serves a text, the text must normalise to the very shape it was served.
SKELETON_TEMPLATES = [
    "SELECT abalance FROM pgbench_accounts WHERE aid = {};",
    "select abalance from pgbench_accounts where aid = {}",
    "UPDATE pgbench_accounts SET abalance = abalance + {} WHERE aid = {}",
    "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ({}, 2, {}, -{}, now())",
    "SELECT a FROM t1 WHERE b2 = {} LIMIT {} OFFSET {}",
    "SELECT a, b FROM t ORDER BY {}",
    "SELECT a, b FROM t GROUP BY {} HAVING count(*) > {}",
    "SELECT a::varchar({}) FROM t WHERE id = {}",
    "SELECT a::numeric(10, {}) FROM t",
    "SELECT a FROM t WHERE b = {}.5",
    "SELECT a FROM t WHERE b = 1{}",
    "SELECT a FROM t WHERE b = {}e3",
    "SELECT a FROM t WHERE b = 0x{}",
    "SELECT a FROM t WHERE b = 1_{}",
    "SELECT a FROM t WHERE b = -{} AND c = - {}",
    "SELECT a FROM t WHERE b = ANY (ARRAY[{}, {}, 3])",
    "SELECT a[{}:{}] FROM t",
    "SELECT t{} FROM t",
    "SELECT x FROM generate_series(1, {}) x",
    "DELETE FROM t WHERE a IN ({}, {})",
    "SELECT a FROM t WHERE b = {} FOR UPDATE",
    "SELECT pg_terminate_backend({})",
    "SELECT pg_sleep({})",
    "SELECT nextval({}::regclass)",
    "SELECT lo_unlink({})",
    "SELECT set_config({}, {}, false)",
    "SELECT a FROM t WHERE b = {} OR true",
    "UPDATE t SET a = {} WHERE {} = {}",
    "SELECT a FROM t WHERE b = {}; DELETE FROM t",
    "WITH d AS (DELETE FROM t WHERE a = {} RETURNING a) SELECT count(*) FROM d",
    "EXPLAIN ANALYZE DELETE FROM t WHERE a = {}",
    "PREPARE p{} AS SELECT {}",
    "EXECUTE p({})",
    "FETCH {} FROM c",
    "SELECT a FROM t WHERE b = {} AND c = 'x'",
    "SELECT a FROM t WHERE b = {} -- c",
]
VALUES = ["1", "0", "42", "007", "999999999", "1000000000", "99999999999999999999"]


@pytest.mark.parametrize("template", SKELETON_TEMPLATES)
def test_skeletons_serve_only_their_own_shape(template: str) -> None:
    from pglast.parser import normalize

    analyzer = Analyzer()
    for value in VALUES * 2:
        sql = template.replace("{}", value)
        got = analyzer.analyze(sql)
        assert _facts(got) == _facts(_fresh(sql)), sql
        skeleton = analyzer._skeleton(sql)
        linked = analyzer._skeletons.get(skeleton) if skeleton is not None else None
        if linked is not None:
            assert got.statements[0]._shape is linked._shape
            assert normalize(sql) == linked._shape.key, sql


def test_skeletons_are_used() -> None:
    analyzer = Analyzer()
    analyzer.analyze("SELECT abalance FROM pgbench_accounts WHERE aid = 1;")
    analyzer._shapes.clear()  # only a skeleton can serve what follows
    got = analyzer.analyze("SELECT abalance FROM pgbench_accounts WHERE aid = 2;")
    assert got.statements[0]._shape is not None
    assert got.statements[0].text == "SELECT abalance FROM pgbench_accounts WHERE aid = 2"
    for sql in ("SELECT a, b FROM t ORDER BY 1", "SELECT a::varchar(10) FROM t",
                "SELECT a FROM t WHERE b = 1234567890", "SELECT a FROM t WHERE b = 'x'"):
        analyzer.analyze(sql)
        skeleton = analyzer._skeleton(sql)
        assert skeleton is None or skeleton not in analyzer._skeletons, sql


def test_lone_integers() -> None:
    from hoopops.sql.analyzer import _LONE_INTEGER

    cases = {
        "aid = 51234;": "aid = $;",
        "t1 x2y 1x 1_0 _1 a.1 1.5 .5 5. 1e5 0x1F": "t1 x2y 1x 1_0 _1 a.1 1.5 .5 5. 1e5 0x1F",
        "1234567890 123456789 007": "1234567890 $ $",
        "(1,2)-3+-4 a[5:6] 7": "($,$)-$+-$ a[$:$] $",
    }
    for text, skeleton in cases.items():
        assert _LONE_INTEGER.sub("$", text) == skeleton, text

"""The policy's hot path (issue 3): digit keys in the analyser, the catalog's epoch, and the
enforcer's synchronous verdict lookup.

Each cache here answers a text without parsing it; each test feeds texts that such a cache
could wrongly take for one it has seen (a digit inside a name, "$" or NUL where a digit
was, a digit that is not ASCII, a longer run) and compares with facts, or decisions,
worked out from scratch.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from pglast.parser import normalize

from hoopops.devdb import LocalPostgres
from hoopops.sql import Analysis, Analyzer, StatementFacts
from tests.test_policy_verdict_cache import RULES, enforcer, folder, oracle, sh, simple
from tests.test_sql_shapes import SKELETON_TEMPLATES, VALUES, _facts, _fresh

# -- the analyser's digit keys -------------------------------------------------------------


def _served_by_digit_key(analyzer: Analyzer, sql: str) -> StatementFacts | None:
    key = analyzer._digit_key_of(sql)
    return None if key is None else analyzer._digit_keys.get(key)


@pytest.mark.parametrize("template", SKELETON_TEMPLATES)
def test_digit_keys_serve_only_their_own_shape(template: str) -> None:
    analyzer = Analyzer()
    for value in VALUES * 2:
        sql = template.replace("{}", value)
        got = analyzer.analyze(sql)
        assert _facts(got) == _facts(_fresh(sql)), sql
        linked = _served_by_digit_key(analyzer, sql)
        if linked is not None:
            assert linked._shape is not None and normalize(sql) == linked._shape.key, sql
            assert got.statements[0]._shape is linked._shape


def test_digit_keys_are_used_for_pgbench_texts() -> None:
    analyzer = Analyzer()
    for n in (1, 22, 333, 4444, 55555):
        analyzer.analyze(f"SELECT abalance FROM pgbench_accounts WHERE aid = {n};")
    analyzer._shapes.clear()
    analyzer._skeletons.clear()  # only a digit key can serve what follows
    for n in (7, 86, 901, 1234, 99999):
        sql = f"SELECT abalance FROM pgbench_accounts WHERE aid = {n};"
        assert isinstance(analyzer.source(sql), StatementFacts)
        got = analyzer.analyze(sql)
        assert got.statements[0].text == sql[:-1]
        assert _facts(got) == _facts(_fresh(sql))


# A linked text, then texts equal to it except where its digits are: each has facts of its
# own, and may only be served from the linked facts if it normalises to the same shape.
LINKED = "SELECT 11 AS a, v FROM t WHERE id = 11 LIMIT 11"
LOOKALIKES = [
    "SELECT $$ AS a, v FROM t WHERE id = $$ LIMIT 11",  # a dollar-quoted string
    "SELECT $1 AS a, v FROM t WHERE id = 11 LIMIT 11",  # a parameter
    "SELECT 1\x00 AS a, v FROM t WHERE id = 11 LIMIT 11",  # NUL ends the text early
    "SELECT \u0661\u0661 AS a, v FROM t WHERE id = 11 LIMIT 11",  # Arabic-Indic digits
    "SELECT \ud800\ud800 AS a, v FROM t WHERE id = 11 LIMIT 11",  # lone surrogates
    "SELECT 11 AS a, v FROM t WHERE id = 1111111111 LIMIT 11",  # ten digits: numeric
]


def test_lookalikes_of_a_linked_text_are_not_served_its_facts() -> None:
    analyzer = Analyzer()
    for sql in (LINKED, LINKED.replace("11", "22"), LINKED.replace("11", "3")):
        analyzer.analyze(sql)
    assert _served_by_digit_key(analyzer, LINKED.replace("11", "45")) is not None
    for sql in LOOKALIKES:
        source = analyzer.source(sql)
        assert not isinstance(source, StatementFacts) or \
            normalize(sql) == source._shape.key, repr(sql)  # type: ignore[union-attr]
        assert _facts(analyzer.analyze(sql)) == _facts(_fresh(sql)), repr(sql)


def test_a_digit_inside_a_name_gets_no_digit_key() -> None:
    analyzer = Analyzer()
    for n in range(1, 4):
        analyzer.analyze(f"SELECT v FROM t1 WHERE id = {n}")
    assert not analyzer._digit_keys  # t1 and t2 would share one
    got = analyzer.analyze("SELECT v FROM t2 WHERE id = 1")
    assert got.statements[0].tables_read == frozenset({"t2"})


# -- through the gateway -------------------------------------------------------------------

# Table names without digits, so that texts naming them get digit keys.
_LETTERS = str.maketrans("0123456789", "ghijklmnop")


def _tag() -> str:
    return uuid.uuid4().hex[:8].translate(_LETTERS)


@pytest.fixture
async def lettered(pg: LocalPostgres) -> AsyncIterator[tuple[str, str, str]]:
    """(an open table, a secret one, an open one whose name ends in x2 beside one in x1)."""
    tag = _tag()
    open_, secret, named = f"vc_open_{tag}", f"vc_secret_{tag}", f"vc_named_{tag}_x"
    await sh(pg, f"CREATE TABLE {open_} (id int, v int); CREATE TABLE {secret} (id int, v int);"
                 f" CREATE TABLE {named}1 (id int, v int); CREATE TABLE {named}2 (id int, v int);"
                 f" INSERT INTO {open_} VALUES (1, 1), (2, 2)")
    try:
        yield open_, secret, named
    finally:
        await sh(pg, f"DROP TABLE IF EXISTS {open_}, {secret}, {named}1, {named}2")


def _cached(gw: Any) -> list[tuple[Any, Any, Any]]:
    return [hit for table in enforcer(gw)._verdicts.values() for hit in table.values()]


async def test_new_literals_are_judged_like_their_text_and_names_are_not_conflated(
        gateway_factory: Any, tmp_path: Path, lettered: tuple[str, str, str]) -> None:
    open_, secret, named = lettered
    rules = RULES.replace('  - id: reads\n', '  - id: no-x2\n    when: {tables_read: ["*_x2"]}'
                          '\n    action: block\n  - id: reads\n')
    gw = await gateway_factory(policies=folder(tmp_path, rules))
    conn = await asyncpg.connect(gw.dsn())
    try:
        texts = [f"SELECT v FROM {open_} WHERE id = {n}" for n in (1, 22, 333, 4, 55, 6666)]
        texts += [f"SELECT v FROM {secret} WHERE id = {n}" for n in (1, 22, 3)]
        texts += [f"SELECT v FROM {named}1 WHERE id = {n}" for n in (1, 2, 3)]
        texts += [f"SELECT v FROM {named}2 WHERE id = {n}" for n in (1, 2, 3)]
        texts += [f"SELECT v FROM {open_} WHERE id = {n} LIMIT 1" for n in (7, 88)]
        texts += [f"SELECT v FROM {open_} WHERE id = {n}" for n in (9, 10, 111111)]
        for sql in texts:
            assert await simple(conn, sql) == oracle(gw, sql), sql
        assert {oracle(gw, t) for t in texts} == {"allow", "block"}
        # The open table's texts were served by one cached verdict, through a digit key.
        sources = {id(source) for source, _, _ in _cached(gw)}
        analyzer = enforcer(gw)._source.__self__
        served = _served_by_digit_key(analyzer, f"SELECT v FROM {open_} WHERE id = 98")
        assert served is not None and id(served) in sources
        assert _served_by_digit_key(analyzer, f"SELECT v FROM {named}2 WHERE id = 4") is None
    finally:
        await conn.close()


DDL_RULES = RULES.replace("  - id: reads\n", "  - id: ddl\n    when: {kinds: [ddl]}\n"
                          "    action: allow\n  - id: reads\n")


async def _stable_function(pg: LocalPostgres, name: str) -> None:
    await sh(pg, f"CREATE FUNCTION public.{name}() RETURNS int LANGUAGE sql STABLE "
                 f"AS 'SELECT 1'")


async def _judged(conn: asyncpg.Connection, table: str, fn: str, ids: tuple[int, ...],
                  expected: str) -> None:
    """Each id's statement (a new literal each time) gets ``expected``."""
    for n in ids:
        sql = f"SELECT v, public.{fn}() FROM {table} WHERE id = {n}"
        assert await simple(conn, sql) == expected, sql


async def test_a_function_turned_volatile_through_the_gateway_is_judged_anew(
        gateway_factory: Any, tmp_path: Path, pg: LocalPostgres,
        lettered: tuple[str, str, str]) -> None:
    open_, _, _ = lettered
    fn = f"vc_fn_{_tag()}"
    await _stable_function(pg, fn)
    gw = await gateway_factory(policies=folder(tmp_path, DDL_RULES))
    conn = await asyncpg.connect(gw.dsn())
    try:
        await _judged(conn, open_, fn, (1, 22, 3), "allow")
        assert any(fn in str(source) for source, _, _ in _cached(gw))
        # DDL through the gateway: the catalog is invalidated, its epoch moves, and the
        # cached ALLOW no longer serves the shape, which now calls a VOLATILE function.
        assert await simple(conn, f"ALTER FUNCTION public.{fn}() VOLATILE") == "allow"
        await _judged(conn, open_, fn, (4, 55, 1), "block")
    finally:
        await conn.close()
        await sh(pg, f"DROP FUNCTION IF EXISTS public.{fn}()")


async def test_a_function_turned_volatile_behind_the_gateway_is_judged_anew_after_the_ttl(
        gateway_factory: Any, tmp_path: Path, pg: LocalPostgres,
        lettered: tuple[str, str, str]) -> None:
    open_, _, _ = lettered
    fn = f"vc_fn_{_tag()}"
    await _stable_function(pg, fn)
    gw = await gateway_factory(policies=folder(tmp_path))
    for catalog in enforcer(gw).catalogs.values():
        catalog.ttl = 1.0
    conn = await asyncpg.connect(gw.dsn())
    try:
        await _judged(conn, open_, fn, (1, 22, 3), "allow")
        assert any(fn in str(source) for source, _, _ in _cached(gw))
        await sh(pg, f"ALTER FUNCTION public.{fn}() VOLATILE")  # not through the gateway
        await asyncio.sleep(1.2)
        await _judged(conn, open_, fn, (4, 55, 1), "block")
    finally:
        await conn.close()
        await sh(pg, f"DROP FUNCTION IF EXISTS public.{fn}()")


async def test_a_subclass_that_decides_itself_is_never_answered_from_the_cache(
        gateway_factory: Any, tmp_path: Path, lettered: tuple[str, str, str]) -> None:
    """The replay's gate overrides decide(); decided() must then always defer to it."""
    from hoopops.proxy.enforcer import Enforcer
    from hoopops.proxy.gate import Verdict

    open_, _, _ = lettered
    gw = await gateway_factory(policies=folder(tmp_path))
    conn = await asyncpg.connect(gw.dsn())
    try:
        for n in (1, 22, 3):
            assert await simple(conn, f"SELECT v FROM {open_} WHERE id = {n}") == "allow"
        assert _cached(gw)

        class Refusing(Enforcer):
            async def decide(self, session: Any, sql: str, statement_name: str | None
                             ) -> Verdict:
                return Verdict("block", message="hoopops blocked this statement (test)")

        gate = enforcer(gw)
        gate.__class__ = Refusing
        gate._own_decide = False  # what __init__ works out for such a class
        assert type(gate)(gate.config, gate.bus, gate.engine, gate.store, gate.broker,
                          gate.catalogs, gate.column_catalogs)._own_decide is False
        for n in (4, 1):
            assert await simple(conn, f"SELECT v FROM {open_} WHERE id = {n}") == "block"
    finally:
        await conn.close()


def test_sources_are_what_analyze_serves() -> None:
    """source() names the object analyze() copies its facts from, for every cache."""
    analyzer = Analyzer()
    exact = "SELECT v FROM t WHERE id = $1"
    first = analyzer.analyze(exact)
    assert analyzer.source(exact) is first
    for n in (1, 2, 30):
        analyzer.analyze(f"SELECT v FROM t1 WHERE id = {n}")  # skeleton, no digit key
        analyzer.analyze(f"SELECT v FROM t WHERE id = {n}")  # digit key
    for sql in ("SELECT v FROM t1 WHERE id = 999", "SELECT v FROM t WHERE id = 77"):
        source = analyzer.source(sql)
        assert isinstance(source, StatementFacts)
        got = analyzer.analyze(sql)
        assert isinstance(got, Analysis) and got.statements[0]._shape is source._shape


async def test_a_session_with_cached_verdicts_of_its_own_gets_none_of_another_identity(
        gateway_factory: Any, tmp_path: Path, lettered: tuple[str, str, str]) -> None:
    open_, _, named = lettered
    gw = await gateway_factory(policies=folder(tmp_path))  # only-agent-2: open_ blocked
    one = await asyncpg.connect(gw.dsn(gw.token("agent-1")))
    two = await asyncpg.connect(gw.dsn(gw.token("agent-2")))
    try:
        for n in (1, 22, 3):  # each session has verdicts cached for it
            assert await simple(two, f"SELECT v FROM {named}1 WHERE id = {n}") == "allow"
            assert await simple(one, f"SELECT v FROM {open_} WHERE id = {n}") == "allow"
        for n in (4, 55, 1):
            sql = f"SELECT v FROM {open_} WHERE id = {n}"
            assert await simple(two, sql) == "block" == oracle(gw, sql, "agent-2")
            assert await simple(one, sql) == "allow"
    finally:
        await one.close()
        await two.close()

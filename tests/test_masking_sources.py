"""Parse-tree tracing of result columns to source columns, against a fake catalog."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import pytest

from hoopops.masking.sources import (
    OutputSources,
    RelationInfo,
    RelationName,
    Spread,
    StatementSources,
    analyze,
    parse_search_path,
    view_lineage,
)

T, I4, I8, N = "pg_catalog.text", "pg_catalog.int4", "pg_catalog.int8", "pg_catalog.numeric"
RELATIONS = [
    RelationInfo(1, "public", "customers", "r", (
        ("id", I4), ("name", T), ("ssn", T), ("email", T), ("card", I8))),
    RelationInfo(2, "public", "accounts", "r", (("id", I4), ("customer_id", I4), ("iban", T))),
    RelationInfo(3, "public", "orders", "r", (
        ("id", I4), ("customer_id", I4), ("total", N), ("note", T))),
    RelationInfo(4, "public", "v_cust", "v", (("id", I4), ("mail", T), ("tax", T)),
                 "SELECT id, upper(email) AS mail, ssn AS tax FROM customers"),
    RelationInfo(5, "public", "v_nested", "v", (("t", T),), "SELECT tax AS t FROM v_cust"),
    RelationInfo(7, "public", "v_leak", "v", (("x", T),), "SELECT leak(1) AS x"),
]
ARCHIVE = RelationInfo(6, "archive", "customers", "r", (("id", I4), ("ssn", T)))
SYSTEM = {"upper", "lower", "row_to_json", "to_jsonb", "string_agg", "count", "concat",
          "format", "generate_series", "json_agg", "array_agg", "substr", "md5", "unnest",
          "json_each", "jsonb_each", "query_to_xml", "first_value", "json_populate_record",
          "xmlelement", "||", "=", "->>", "~~", "+", "<", ">", "lag", "now"}
USER = {"leak": "public", "scrub": "public", "leak_rows": "public", "###": "public"}


class FakeCatalog:
    def __init__(self, extra: Sequence[RelationInfo] = ()) -> None:
        self.known = [*RELATIONS, *extra]

    async def relations(self, names: Collection[RelationName]
                        ) -> Mapping[RelationName, Sequence[RelationInfo]]:
        return {(s, n): [r for r in self.known if r.name == n and s in (None, r.schema)]
                for s, n in names}

    async def functions(self, names: Collection[str]) -> Mapping[str, frozenset[str]]:
        out = {}
        for name in names:
            if name in SYSTEM:
                out[name] = frozenset({"pg_catalog"})
            elif name in USER:
                out[name] = frozenset({USER[name]})
        return out


Shape = tuple[tuple[str, ...], bool, bool]


def shape(out: OutputSources) -> Shape:
    return (tuple(sorted(s.qualified.removeprefix("public.") for s in out.sources)),
            out.direct, bool(out.opaque))


async def run(sql: str, trusted: Collection[str] = (),
              extra: Sequence[RelationInfo] = ()) -> StatementSources:
    results = await analyze(sql, FakeCatalog(extra), trusted)
    assert len(results) == 1
    return results[0]


async def outs(sql: str, width: int | None = None, trusted: Collection[str] = ()
               ) -> list[Shape]:
    result = await run(sql, trusted)
    if width is None:
        assert result.outputs is not None
        width = len(result.outputs)
    return [shape(o) for o in result.outputs_for(width)]


SSN = ("customers.ssn",)
ALL = ("customers.card", "customers.email", "customers.id", "customers.name",
       "customers.ssn")
DIRECT_SSN = [(SSN, True, False)]
DERIVED_SSN = [(SSN, False, False)]
WHOLE_ROW = [(ALL, False, False)]
NOTHING = [((), False, False)]


@pytest.mark.parametrize(("sql", "expected"), [
    ("SELECT ssn AS x FROM customers", DIRECT_SSN),
    ("SELECT c.ssn FROM customers c", DIRECT_SSN),
    ("SELECT customers.ssn FROM customers", DIRECT_SSN),
    ("SELECT public.customers.ssn FROM customers", DIRECT_SSN),
    ("SELECT ssn COLLATE \"C\" FROM customers", DIRECT_SSN),
    ("SELECT ssn::text || '' FROM customers", DERIVED_SSN),
    ("SELECT ssn::varchar(3) FROM customers", DERIVED_SSN),
    ("SELECT substr(ssn, 1, 4) FROM customers", DERIVED_SSN),
    ("SELECT upper(ssn) FROM customers", DERIVED_SSN),
    ("SELECT string_agg(ssn, ',') FROM customers", DERIVED_SSN),
    ("SELECT array_agg(ssn ORDER BY id) FROM customers", DERIVED_SSN),
    ("SELECT json_agg(ssn) FILTER (WHERE id > 1) FROM customers", DERIVED_SSN),
    ("SELECT first_value(ssn) OVER (ORDER BY id) FROM customers", DERIVED_SSN),
    ("SELECT CASE WHEN ssn LIKE '1%' THEN 1 ELSE 0 END FROM customers", DERIVED_SSN),
    ("SELECT ROW(ssn, 1) FROM customers", DERIVED_SSN),
    ("SELECT ARRAY[ssn] FROM customers", DERIVED_SSN),
    ("SELECT xmlelement(name x, ssn) FROM customers", DERIVED_SSN),
    ("SELECT format('%s', ssn) FROM customers", DERIVED_SSN),
    ("SELECT row_to_json(c) FROM customers c", WHOLE_ROW),
    ("SELECT to_jsonb(c.*) FROM customers c", WHOLE_ROW),
    ("SELECT row_to_json(customers) FROM customers", WHOLE_ROW),
    ("SELECT c FROM customers c", WHOLE_ROW),
    ("SELECT (c).ssn FROM customers c", DIRECT_SSN),
    ("SELECT to_jsonb(c)->>'ssn' FROM customers c", WHOLE_ROW),
    ("SELECT count(*) FROM customers", NOTHING),
    ("SELECT count(ssn) FROM customers", NOTHING),
    ("SELECT ssn IS NULL FROM customers", NOTHING),
    ("SELECT now()", NOTHING),
    ("SELECT $1::text", NOTHING),
    ("SELECT x FROM (SELECT ssn AS x FROM customers) s", DIRECT_SSN),
    ("SELECT s.a FROM (SELECT ssn FROM customers) AS s(a)", DIRECT_SSN),
    ("SELECT a FROM (SELECT * FROM (SELECT ssn AS a FROM customers) i) o", DIRECT_SSN),
    ("WITH t(a) AS (SELECT ssn FROM customers) SELECT a FROM t", DIRECT_SSN),
    ("WITH t AS (SELECT ssn AS a FROM customers), u AS (SELECT a || 'x' AS b FROM t) "
     "SELECT b FROM u", DERIVED_SSN),
    ("WITH d AS (DELETE FROM customers RETURNING ssn) SELECT * FROM d", DIRECT_SSN),
    ("SELECT (SELECT ssn FROM customers LIMIT 1)", DIRECT_SSN),
    ("SELECT ARRAY(SELECT ssn FROM customers)", DERIVED_SSN),
    ("SELECT EXISTS (SELECT 1 FROM customers WHERE ssn = '1')", NOTHING),
    ("SELECT 'x' IN (SELECT ssn FROM customers)", DERIVED_SSN),
    ("SELECT t.x FROM customers c, unnest(ARRAY[c.ssn]) AS t(x)", DERIVED_SSN),
    ("SELECT l.s FROM orders o, LATERAL (SELECT ssn AS s FROM customers c "
     "WHERE c.id = o.customer_id) l", DIRECT_SSN),
    ("SELECT j.value FROM customers c, jsonb_each(to_jsonb(c)) j", WHOLE_ROW),
    ("SELECT g FROM generate_series(1, 3) g", NOTHING),
    ("SELECT * FROM generate_series(1, 3)", NOTHING),
    ("SELECT scrub(ssn) FROM customers", [(SSN, False, True)]),
    ("SELECT normalize(ssn) FROM customers", DERIVED_SSN),  # SQL syntax: pg_catalog.normalize
    ("SELECT leak(1)", [((), False, True)]),
    ("SELECT query_to_xml('select ssn from customers', true, true, '')", [((), False, True)]),
    ("SELECT 1 ### 2", [((), False, True)]),
    ("SELECT ssn FROM nowhere", [((), False, True)]),
    ("SELECT x FROM v_leak", [(("v_leak.x",), False, True)]),
    ("SELECT * FROM leak_rows() AS r(a text)", [((), False, True)]),
    ("SELECT t FROM v_nested", [(("customers.ssn", "v_cust.tax", "v_nested.t"), True, False)]),
    ("UPDATE customers SET name = 'x' RETURNING ssn", DIRECT_SSN),
    ("INSERT INTO customers (id) VALUES (1) RETURNING new.ssn", DIRECT_SSN),
    ("SELECT o.id, (SELECT c.ssn FROM customers c WHERE c.id = o.customer_id) FROM orders o",
     [(("orders.id",), True, False), (SSN, True, False)]),
    ("SELECT name FROM customers UNION SELECT ssn FROM customers",
     [(("customers.name", "customers.ssn"), True, False)]),
    ("SELECT ssn FROM customers UNION ALL SELECT 'none'", DIRECT_SSN),
    ("SELECT ssn FROM customers EXCEPT SELECT upper(email) FROM customers",
     [(("customers.email", "customers.ssn"), False, False)]),
    ("SELECT mail, tax FROM v_cust",
     [(("customers.email", "v_cust.mail"), False, False),
      (("customers.ssn", "v_cust.tax"), True, False)]),
    ("WITH RECURSIVE r(n, s) AS (SELECT 1, ssn FROM customers UNION ALL "
     "SELECT n + 1, s || 'x' FROM r WHERE n < 3) SELECT s FROM r", DERIVED_SSN),
    ("SELECT (SELECT ssn FROM json_populate_record(null::customers, '{}')) FROM customers",
     [(SSN, True, False)]),
    # A subquery whose columns include an unknown-width spread cannot hide the outer ssn.
    ("SELECT (SELECT ssn FROM (SELECT * FROM json_populate_record(null::customers, '{}')) i) "
     "FROM customers", [(SSN, True, False)]),
])
async def test_traces(sql: str, expected: list[Shape]) -> None:
    assert await outs(sql) == expected


async def test_trusted_functions_are_transparent() -> None:
    assert await outs("SELECT scrub(ssn) FROM customers",
                      trusted={"public.scrub"}) == DERIVED_SSN
    assert await outs("SELECT public.scrub(ssn) FROM customers",
                      trusted={"public.scrub"}) == DERIVED_SSN
    assert await outs("SELECT scrub(ssn) FROM customers", trusted={"other.scrub"}) == [
        (SSN, False, True)]


async def test_star_expansion_and_join_using() -> None:
    assert await outs("SELECT * FROM customers") == [
        ((f"customers.{c}",), True, False) for c in ("id", "name", "ssn", "email", "card")]
    assert await outs("TABLE accounts") == await outs("SELECT * FROM accounts")
    joined = await outs("SELECT * FROM orders JOIN accounts USING (id)")
    assert joined[0] == (("accounts.id", "orders.id"), True, False)
    assert len(joined) == 6 and joined[-1] == (("accounts.iban",), True, False)
    natural = await outs("SELECT * FROM orders NATURAL JOIN accounts")
    assert len(natural) == 5
    assert [n[0] for n in natural[:2]] == [("accounts.id", "orders.id"),
                                           ("accounts.customer_id", "orders.customer_id")]
    assert (await outs("SELECT a.*, 1 FROM accounts a"))[-1] == ((), False, False)


async def test_unknown_width_spread_takes_the_remaining_columns() -> None:
    result = await run("SELECT 1, *, c.ssn, ssn FROM leak_rows(), customers c")
    assert isinstance(result.outputs[1], Spread)  # type: ignore[index]
    shapes = [shape(o) for o in result.outputs_for(10)]
    assert shapes[0] == ((), False, False)
    assert all(s[2] for s in shapes[1:3])  # leak_rows() columns: opaque, so masked
    assert shapes[3:8] == [((f"customers.{c}",), True, False)
                           for c in ("id", "name", "ssn", "email", "card")]
    assert shapes[8] == (SSN, True, False)
    # An unqualified name may also be a column of leak_rows(), whose shape is unknown.
    assert shapes[9] == (SSN, True, True)


async def test_width_mismatch_fails_closed() -> None:
    result = await run("SELECT ssn FROM customers")
    assert all(o.opaque for o in result.outputs_for(2))


async def test_ambiguous_unqualified_names_union_all_schemas() -> None:
    # Two relations named customers (public, archive): without the session's search_path
    # either may be meant, so both count; a schema-qualified name picks one.
    result = await run("SELECT ssn, name FROM customers", extra=[ARCHIVE])
    assert result.outputs is not None
    got = [shape(o) for o in result.outputs]
    assert got == [(("archive.customers.ssn", "customers.ssn"), True, False),
                   (("customers.name",), True, False)]
    star = await run("SELECT * FROM customers", extra=[ARCHIVE])
    assert isinstance(star.outputs[0], Spread)  # type: ignore[index]  # layouts differ
    qualified = await run("SELECT ssn FROM archive.customers", extra=[ARCHIVE])
    assert [shape(o) for o in qualified.outputs_for(1)] == [
        (("archive.customers.ssn",), True, False)]


async def test_search_path_resolves_unqualified_names_exactly() -> None:
    catalog = FakeCatalog([ARCHIVE])
    public_first = await analyze("SELECT * FROM customers", catalog, (), '"$user", public',
                                 "agent")
    assert [shape(o) for o in public_first[0].outputs_for(5)][2] == (SSN, True, False)
    archive_first = await analyze("SELECT * FROM customers", catalog, (), "archive, public")
    assert [shape(o) for o in archive_first[0].outputs_for(2)] == [
        (("archive.customers.id",), True, False), (("archive.customers.ssn",), True, False)]
    # SET earlier in the same Query changes how later statements resolve.
    switched = await analyze("SET search_path = archive; SELECT ssn FROM customers; "
                             "RESET search_path; SELECT ssn FROM customers", catalog, (),
                             "public")
    assert [shape(o) for o in switched[1].outputs_for(1)] == [
        (("archive.customers.ssn",), True, False)]
    assert [shape(o) for o in switched[3].outputs_for(1)] == [
        (("archive.customers.ssn", "customers.ssn"), True, False)]  # unknown again: all
    assert parse_search_path('"$user", public, "My Schema"', "bob") == [
        "bob", "public", "My Schema"]
    assert parse_search_path('"$user", public') is None
    assert parse_search_path("Public") == ["public"]


async def test_facts_predicates_writes_and_targets() -> None:
    result = await run("SELECT name FROM customers WHERE ssn LIKE '1%' ORDER BY email")
    assert {s.column for s in result.predicates} == {"ssn", "email"}
    assert {s.column for s in result.referenced} == {"name", "ssn", "email"}
    grouped = await run("SELECT ssn AS s, count(*) FROM customers GROUP BY s HAVING count(*) > 1")
    assert {s.column for s in grouped.predicates} == {"ssn"}
    copy = await run("INSERT INTO orders (note) SELECT ssn FROM customers")
    assert {s.column for s in copy.written} == {"ssn"}
    assert {s.qualified for s in copy.targets} == {"public.orders.note"}
    update = await run("UPDATE customers SET ssn = '***-**-6789' WHERE id = 1")
    assert {s.column for s in update.targets} == {"ssn"}
    into = await run("SELECT ssn INTO t2 FROM customers")
    assert into.kind == "select_into" and into.outputs == ()
    assert {s.column for s in into.written} == {"ssn"}
    ctas = await run("CREATE TABLE t3 AS SELECT email FROM customers")
    assert {s.column for s in ctas.written} == {"email"}
    do = await run("DO $$ BEGIN RAISE NOTICE '%', 1; END $$")
    assert do.opaque and do.outputs == ()


async def test_copy_options_and_outputs() -> None:
    plain = await run("COPY customers TO STDOUT")
    assert plain.copy is not None and plain.copy.format == "text"
    assert (plain.copy.delimiter, plain.copy.null) == (b"\t", b"\\N")
    assert len(plain.outputs_for(5)) == 5
    csv = await run("COPY (SELECT ssn, name FROM customers) TO STDOUT "
                    "WITH (FORMAT csv, HEADER, DELIMITER ';', QUOTE '''', NULL 'NULL')")
    assert csv.copy is not None
    assert (csv.copy.format, csv.copy.delimiter, csv.copy.quote, csv.copy.escape,
            csv.copy.null, csv.copy.header) == ("csv", b";", b"'", b"'", b"NULL", True)
    assert shape(csv.outputs_for(2)[0]) == (SSN, True, False)
    legacy = await run("COPY customers (ssn) TO STDOUT CSV HEADER")
    assert legacy.copy is not None and legacy.copy.header and legacy.copy.delimiter == b","
    assert [shape(o) for o in legacy.outputs_for(1)] == DIRECT_SSN
    binary = await run("COPY customers TO STDOUT WITH (FORMAT binary)")
    assert binary.copy is not None and binary.copy.format == "binary"
    load = await run("COPY customers (ssn) FROM STDIN")
    assert load.kind == "copy_from" and {s.column for s in load.targets} == {"ssn"}
    server_file = await run("COPY customers TO '/tmp/x'")
    assert server_file.outputs == () and server_file.opaque


async def test_statements_whose_rows_come_later() -> None:
    prepare = await run("PREPARE p AS SELECT ssn FROM customers")
    assert prepare.prepare == "p" and [shape(o) for o in prepare.outputs] == DIRECT_SSN  # type: ignore[union-attr]
    execute = await run("EXECUTE p")
    assert execute.execute == "p" and execute.outputs is None
    assert all(o.opaque for o in execute.outputs_for(3))
    declare = await run("DECLARE c CURSOR FOR SELECT email FROM customers")
    assert declare.cursor == "c" and declare.outputs is not None
    fetch = await run("FETCH 10 FROM c")
    assert fetch.fetch_cursor == "c" and fetch.outputs is None
    move = await run("MOVE 10 IN c")
    assert move.outputs == ()
    assert (await run("EXPLAIN ANALYZE SELECT ssn FROM customers")).outputs == (OutputSources(),)
    assert (await run("SHOW search_path")).outputs == (OutputSources(),)
    assert (await run("CALL p(1)")).outputs is None


async def test_multiple_statements_and_parse_errors() -> None:
    results = await analyze("SELECT 1; SELECT ssn FROM customers; SET x = 1", FakeCatalog())
    assert [r.kind for r in results] == ["select", "select", "variableset"]
    assert [shape(o) for o in results[1].outputs_for(1)] == DIRECT_SSN
    broken = await analyze("SELEC ssn FROM", FakeCatalog())
    assert len(broken) == 1 and broken[0].error and broken[0].outputs is None
    assert all(o.opaque for o in broken[0].outputs_for(2))
    no_catalog = await analyze("SELECT ssn FROM customers", None)
    assert no_catalog[0].outputs_for(1)[0].opaque


async def test_view_lineage_for_catalog_origins() -> None:
    view = next(r for r in RELATIONS if r.name == "v_cust")
    lineage = await view_lineage(view, FakeCatalog())
    assert [shape(o) for o in lineage] == [
        (("customers.id", "v_cust.id"), True, False),
        (("customers.email", "v_cust.mail"), False, False),
        (("customers.ssn", "v_cust.tax"), True, False)]
    table = next(r for r in RELATIONS if r.name == "orders")
    first = (await view_lineage(table, None))[0]
    assert shape(first) == (("orders.id",), True, False)

"""Trace every result column of a statement back to the table columns it derives from.

RowDescription names the table column behind a plain column reference, but a computed
column (``ssn::text || ''``, ``row_to_json(c)``, ``string_agg(ssn, ',')``, a UNION) has
table OID 0. This module binds the parse tree the way PostgreSQL's analyzer does, far
enough to say, for each output position, which source columns feed it and whether the
value passes through *unchanged* (``direct``: aliases, subqueries, CTEs, UNION branches)
or is *derived* from them (casts, operators, functions, aggregates, whole-row values).

It fails closed: where it cannot see (a user-defined function, a set-returning function
of unknown shape, an unknown relation, SQL it cannot parse) the output carries an
``opaque`` reason and the plan masks it. Views are expanded through their definitions,
so a view that renames or computes a sensitive column still traces to it.

Relations and functions are resolved through a :class:`RelationLookup` (the catalog in
``hoopops.proxy.catalog``). An unqualified relation name is resolved along the session's
``search_path`` when the caller knows it (PostgreSQL 18 reports it in ParameterStatus),
following ``SET search_path`` statements earlier in the same Query; otherwise it is
matched in *every* schema, which can only over-mask.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from pglast.parser import ParseError, parse_sql_json

RelationName = tuple[str | None, str]
Node = Any  # a JSON-decoded pglast node: dict, list, str, int, bool or None

SYSTEM_SCHEMAS = frozenset({"pg_catalog", "information_schema"})
_MAX_VIEW_DEPTH = 8
_MAX_RECURSION_PASSES = 8

# System functions whose result is not a function of their arguments: they run SQL given
# as text, read files, large objects, WAL, statistics samples or other sessions' queries.
OPAQUE_SYSTEM_FUNCTIONS = frozenset({
    "query_to_xml", "query_to_xmlschema", "query_to_xml_and_xmlschema",
    "cursor_to_xml", "cursor_to_xmlschema", "table_to_xml", "table_to_xmlschema",
    "table_to_xml_and_xmlschema", "schema_to_xml", "schema_to_xmlschema",
    "schema_to_xml_and_xmlschema", "database_to_xml", "database_to_xmlschema",
    "database_to_xml_and_xmlschema", "ts_stat", "ts_rewrite", "pg_read_file",
    "pg_read_binary_file",
    "lo_get", "loread", "pg_stat_get_activity", "pg_stat_get_backend_activity",
    "pg_logical_slot_get_changes", "pg_logical_slot_peek_changes",
    "pg_logical_slot_get_binary_changes", "pg_logical_slot_peek_binary_changes",
    "pg_mcv_list_items", "pg_get_statisticsobjdef_expressions",
})
# System functions whose arguments leave by another way than the result, where masking
# cannot reach them: a notification (to any listening session), a setting (read back with
# current_setting() or SHOW), a sequence value, an advisory lock key (visible in pg_locks),
# a WAL message. Sensitive values passed to them are ``exported``.
SIDE_CHANNEL_FUNCTIONS = frozenset({
    "pg_notify", "set_config", "setval", "pg_logical_emit_message",
    "pg_advisory_lock", "pg_advisory_lock_shared", "pg_advisory_xact_lock",
    "pg_advisory_xact_lock_shared", "pg_try_advisory_lock", "pg_try_advisory_lock_shared",
    "pg_try_advisory_xact_lock", "pg_try_advisory_xact_lock_shared", "pg_advisory_unlock",
    "pg_advisory_unlock_shared",
})
# How ``opaque`` names a function the catalog does not know (the server will refuse the
# statement unless it is created meanwhile).
UNKNOWN_FUNCTION = "unknown function "
# System functions whose result says nothing about the argument values.
VALUE_FREE_FUNCTIONS = frozenset({"count", "pg_typeof", "num_nulls", "num_nonnulls"})
# Set-returning system functions: how many rows they return depends on their arguments
# (generate_series(1, ascii(ssn)), regexp_matches(ssn, '5', 'g'), unnest(...)), so those
# are compared like a WHERE clause, wherever the call stands. A function in FROM counts
# as one whatever its name.
SET_RETURNING_FUNCTIONS = frozenset({
    "generate_series", "generate_subscripts", "unnest", "regexp_matches",
    "regexp_split_to_table", "string_to_table", "json_array_elements",
    "json_array_elements_text", "jsonb_array_elements", "jsonb_array_elements_text",
    "json_each", "json_each_text", "jsonb_each", "jsonb_each_text", "json_object_keys",
    "jsonb_object_keys", "jsonb_path_query", "jsonb_path_query_tz",
    "json_populate_recordset", "jsonb_populate_recordset", "json_to_recordset",
    "jsonb_to_recordset", "ts_debug", "ts_parse", "ts_token_type", "pg_options_to_table",
    "aclexplode", "txid_snapshot_xip", "pg_snapshot_xip", "pg_partition_tree",
    "pg_partition_ancestors", "pg_get_keywords",
})
# System functions whose arguments decide how long the statement takes: a timing channel,
# compared like a WHERE clause (pg_sleep(substr(ssn, 1, 1)::int) times out a digit).
TIMING_FUNCTIONS = frozenset({"pg_sleep", "pg_sleep_for", "pg_sleep_until"})
# Whether a computation fails (division by zero, a cast that does not parse, chr() of a
# number too large) answers a question about its input even where its result is masked:
# sensitive values reaching an argument that can make the call fail are compared like a
# WHERE clause. These system functions cannot fail on any argument...
TOTAL_FUNCTIONS = frozenset({
    "upper", "lower", "initcap", "reverse", "md5", "length", "char_length",
    "character_length", "octet_length", "bit_length", "concat", "concat_ws", "row_to_json",
    "to_json", "to_jsonb", "array_to_json",
    "json_build_array", "jsonb_build_array", "json_agg", "jsonb_agg", "json_agg_strict",
    "jsonb_agg_strict", "array_agg", "string_agg", "min", "max", "count", "translate",
    "replace", "btrim", "ltrim", "rtrim", "quote_literal", "quote_ident", "quote_nullable",
    "position", "strpos", "starts_with", "ascii", "to_hex", "sha224", "sha256", "sha384",
    "sha512", "num_nulls", "num_nonnulls", "pg_typeof", "array_to_string", "array_length",
    "array_position", "array_positions", "cardinality", "json_extract_path",
    "json_extract_path_text", "jsonb_extract_path", "jsonb_extract_path_text", "bool_and",
    "bool_or", "every", "first_value", "last_value", "row_number", "rank", "dense_rank",
    "percent_rank", "cume_dist",
})
# ... these only on their first N arguments (the string, not the position, length, count,
# pattern or format that comes after it; not jsonb_path_*: a path's filter can branch on
# the document, '$ ? (@.ssn like_regex "^5").x' fails in strict mode or not) ...
TOTAL_LEADING_ARGS = {
    "substr": 1, "substring": 1, "left": 1, "right": 1, "split_part": 2, "regexp_replace": 1,
    "regexp_split_to_array": 1, "string_to_array": 3, "lpad": 1, "rpad": 1, "repeat": 1,
    "overlay": 2, "encode": 1, "lag": 1, "lead": 1, "nth_value": 1,
}
# ... and these on their values, not their keys (a NULL key fails).
TOTAL_VALUES = frozenset({"json_build_object", "jsonb_build_object"})
# Operators that cannot fail whatever their operands (comparisons, concatenation, JSON
# field access); pattern matches fail only on a bad pattern (their right side).
TOTAL_OPERATORS = frozenset({"||", "=", "<>", "!=", "<", ">", "<=", ">=", "->", "->>", "#>",
                             "#>>", "?", "?|", "?&", "@>", "<@", "&&"})
PATTERN_OPERATORS = frozenset({"~", "~*", "!~", "!~*", "~~", "~~*", "!~~", "!~~*"})
TOTAL_EXPRESSIONS = frozenset({"AEXPR_OP_ANY", "AEXPR_OP_ALL", "AEXPR_DISTINCT",
                               "AEXPR_NOT_DISTINCT", "AEXPR_NULLIF", "AEXPR_IN",
                               "AEXPR_BETWEEN", "AEXPR_NOT_BETWEEN", "AEXPR_BETWEEN_SYM",
                               "AEXPR_NOT_BETWEEN_SYM"})
PATTERN_EXPRESSIONS = frozenset({"AEXPR_LIKE", "AEXPR_ILIKE", "AEXPR_SIMILAR"})
# Arrays of arrays must have matching dimensions (ARRAY[...], array_agg, ||): an array
# whose length comes from a masked value makes them fail or not. These return arrays.
ARRAY_FUNCTIONS = frozenset({
    "string_to_array", "regexp_split_to_array", "regexp_match", "array_agg", "array_append",
    "array_prepend", "array_cat", "array_remove", "array_replace", "array_fill",
    "array_positions", "array_sample", "array_shuffle", "trim_array", "array_reverse",
    "array_sort",
})
# Expressions that parse or check their input and fail on it (XMLPARSE and xmlelement,
# JSON(), JSON_VALUE/QUERY/EXISTS with ERROR ON ERROR, JSON_OBJECT keys).
FALLIBLE_NODES = frozenset({"XmlExpr", "XmlSerialize", "JsonParseExpr", "JsonFuncExpr",
                            "JsonObjectConstructor", "JsonObjectAgg"})
# Casts that cannot fail: to text-like types (a too long value is cut, not refused).
TOTAL_CAST_TYPES = frozenset({"text", "varchar", "bpchar", "name", "char", "unknown"})
# Set-returning system functions and how many columns they return.
_SRF_WIDTH = {
    **dict.fromkeys((
        "generate_series", "generate_subscripts", "regexp_matches", "regexp_split_to_table",
        "string_to_table", "json_array_elements", "json_array_elements_text",
        "jsonb_array_elements", "jsonb_array_elements_text", "json_object_keys",
        "jsonb_object_keys", "jsonb_path_query", "unnest"), 1),
    **dict.fromkeys(("json_each", "json_each_text", "jsonb_each", "jsonb_each_text"), 2),
}
_PAIR_NAMES = ("key", "value")


# -- results ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, order=True)
class SourceColumn:
    """A column of a table or view; ``type_name`` is ``schema.type`` when known."""

    schema: str
    table: str
    column: str
    type_name: str | None = None

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.table}.{self.column}"

    def __str__(self) -> str:
        return self.qualified


@dataclass(frozen=True, slots=True)
class OutputSources:
    """What one result column carries.

    ``direct``: the value *is* one of ``sources``' values, unchanged. Otherwise it is
    derived from them (or a constant, when ``sources`` is empty). ``opaque`` lists why
    the value cannot be traced; a non-empty ``opaque`` must be masked.
    """

    sources: frozenset[SourceColumn] = frozenset()
    direct: bool = False
    opaque: frozenset[str] = frozenset()

    @staticmethod
    def of(column: SourceColumn) -> OutputSources:
        return OutputSources(frozenset((column,)), True)

    @staticmethod
    def unknown(reason: str) -> OutputSources:
        return OutputSources(opaque=frozenset((reason,)))

    def derived(self) -> OutputSources:
        return self if not self.direct else OutputSources(self.sources, False, self.opaque)

    def merge(self, other: OutputSources) -> OutputSources:
        """Either value may appear (UNION branches, USING columns, alternatives)."""
        if not other.sources and not other.opaque:
            return self if self.sources or self.opaque else other
        if not self.sources and not self.opaque:
            return other
        sources = self.sources | other.sources
        direct = ((self.direct or not self.sources) and (other.direct or not other.sources)
                  and bool(sources))
        return OutputSources(sources, direct, self.opaque | other.opaque)

    def __bool__(self) -> bool:
        return bool(self.sources or self.opaque)


EMPTY = OutputSources()


@dataclass(frozen=True, slots=True)
class Spread:
    """An unknown number of result columns that all carry ``sources`` (``f(x).*`` or
    ``*`` over something whose width the analysis cannot know)."""

    sources: OutputSources


Output = OutputSources | Spread


@dataclass(frozen=True, slots=True)
class CopyOptions:
    """How ``COPY ... TO STDOUT`` lays out its rows (from the statement's options)."""

    format: str = "text"  # text | csv | binary
    delimiter: bytes = b"\t"
    null: bytes = b"\\N"
    quote: bytes = b'"'
    escape: bytes = b'"'
    header: bool = False

    @staticmethod
    def build(format: str = "text", delimiter: str | None = None, null: str | None = None,
              quote: str | None = None, escape: str | None = None,
              header: bool = False) -> CopyOptions:
        csv = format == "csv"
        default_delim = "," if csv else "\t"
        default_null = "" if csv else "\\N"
        q = quote if quote is not None else '"'
        return CopyOptions(
            format, (delimiter or default_delim).encode(),
            (null if null is not None else default_null).encode(), q.encode(),
            (escape if escape is not None else q).encode(), header)


@dataclass(frozen=True)
class StatementSources:
    """The analysis of one statement: the ``source_hints`` that plans are built from.

    ``outputs`` describes the rows the statement returns; for PREPARE and DECLARE CURSOR
    (which return none) it describes the rows a later EXECUTE or FETCH will return, so
    the relay can remember them under ``prepare`` / ``cursor``. It is None when the
    result cannot be known from the text (FETCH, EXECUTE, CALL, a parse error): the relay
    substitutes what it remembered, or every computed column is masked.

    ``referenced`` holds every source column read anywhere, ``predicates`` those read in
    WHERE, JOIN, GROUP BY, HAVING, ORDER BY, DISTINCT ON, window or aggregate ordering
    (they can leak values by inference), ``written`` the sources whose values flow into
    INSERT/UPDATE/MERGE/SELECT INTO/CREATE TABLE AS, ``targets`` the columns written, and
    ``exported`` the sources passed to side-channel functions (``pg_notify``,
    ``set_config``, ... see :data:`SIDE_CHANNEL_FUNCTIONS`), which no result masking sees,
    and ``opaque_args`` the sources passed to code the analysis cannot see through (a
    user function or operator, an opaque system function): it may compare or copy them.
    ``predicates`` also holds the conditions of CASE and NULLIF wherever they appear and
    the arguments of ``count()`` and friends when computed (``count(CASE WHEN ssn LIKE
    '1%' THEN 1 END)``): there the result's NULLs or counts answer the condition. A
    predicate the analysis cannot resolve counts every column in scope (fail closed).
    ``closes`` / ``deallocates`` name the cursor / prepared statement a CLOSE, DEALLOCATE
    or DISCARD ALL forgets (``"*"``: all of them). ``identifiers`` are the names the
    statement spells (see :func:`identifiers`).
    """

    kind: str
    outputs: tuple[Output, ...] | None = ()
    referenced: frozenset[SourceColumn] = frozenset()
    predicates: frozenset[SourceColumn] = frozenset()
    written: frozenset[SourceColumn] = frozenset()
    targets: frozenset[SourceColumn] = frozenset()
    opaque: frozenset[str] = frozenset()
    copy: CopyOptions | None = None
    cursor: str | None = None
    fetch_cursor: str | None = None
    prepare: str | None = None
    execute: str | None = None
    error: str | None = None
    exported: frozenset[SourceColumn] = frozenset()
    closes: str | None = None
    deallocates: str | None = None
    identifiers: frozenset[str] = frozenset()
    opaque_args: frozenset[SourceColumn] = frozenset()

    @staticmethod
    def unknown(reason: str, kind: str = "unknown") -> StatementSources:
        return StatementSources(kind, None, opaque=frozenset((reason,)), error=reason)

    def aligned(self, width: int) -> bool:
        """Whether the analysis accounts for a ``width``-column result column by column
        (so its outputs can be laid over RowDescription's columns)."""
        if self.outputs is None:
            return False
        spreads = sum(1 for o in self.outputs if isinstance(o, Spread))
        fixed = len(self.outputs) - spreads
        return fixed == width if not spreads else fixed <= width

    def outputs_for(self, width: int) -> list[OutputSources]:
        """One :class:`OutputSources` per result column of a ``width``-column result.

        A single :class:`Spread` takes whatever width the fixed outputs leave; with more
        than one, every column from the first spread on carries all their sources. A
        width the analysis cannot account for masks every column (fail closed).
        """
        if self.outputs is None:
            reason = self.error or f"result of {self.kind} cannot be traced"
            return [OutputSources.unknown(reason)] * width
        spreads = [i for i, o in enumerate(self.outputs) if isinstance(o, Spread)]
        fixed = len(self.outputs) - len(spreads)
        mismatch = OutputSources.unknown(
            f"{self.kind} returned {width} columns, the analysis expected "
            f"{fixed}{'+' if spreads else ''}")
        if not spreads:
            if fixed != width:
                return [mismatch] * width
            return [o for o in self.outputs if isinstance(o, OutputSources)]
        if fixed > width:
            return [mismatch] * width
        head = [o for o in self.outputs[:spreads[0]] if isinstance(o, OutputSources)]
        if len(spreads) == 1:
            tail = [o for o in self.outputs[spreads[0] + 1:] if isinstance(o, OutputSources)]
            spread = self.outputs[spreads[0]]
            assert isinstance(spread, Spread)
            return head + [spread.sources] * (width - fixed) + tail
        rest = EMPTY
        for out in self.outputs[spreads[0]:]:
            rest = rest.merge(out.sources if isinstance(out, Spread) else out)
        return head + [rest.derived()] * (width - len(head))


# -- what the analysis needs from the catalog ---------------------------------------------


@dataclass(frozen=True)
class RelationInfo:
    """A table, view or other relation: columns in attribute order, without dropped ones."""

    oid: int
    schema: str
    name: str
    kind: str  # pg_class.relkind: r, p, v, m, f, S, ...
    columns: tuple[tuple[str, str | None], ...]  # (name, "schema.type")
    view_sql: str | None = None

    def source(self, column: str, type_name: str | None) -> SourceColumn:
        return SourceColumn(self.schema, self.name, column, type_name)


class RelationLookup(Protocol):
    """Catalog lookups the analysis needs; :class:`hoopops.proxy.catalog.Catalog` is one."""

    async def relations(
        self, names: Collection[RelationName]
    ) -> Mapping[RelationName, Sequence[RelationInfo]]:
        """For each name, every relation it may mean (all schemas when unqualified)."""
        ...

    async def functions(self, names: Collection[str]) -> Mapping[str, frozenset[str]]:
        """For each function or operator name, the schemas that define one by that name
        (names absent from the answer are unknown)."""
        ...


# -- entry points ---------------------------------------------------------------------------------


def parse(sql: str) -> list[Node] | str:
    """The statements of ``sql`` as JSON nodes, or the parse error text."""
    try:
        tree = json.loads(parse_sql_json(sql))
    except ParseError as exc:
        return f"cannot parse the statement: {exc}"
    return [item["stmt"] for item in tree.get("stmts", [])]


async def analyze(sql: str, lookup: RelationLookup | None,
                  trusted_functions: Collection[str] = (), search_path: str | None = None,
                  user: str | None = None) -> list[StatementSources]:
    """One :class:`StatementSources` per statement in ``sql`` (a simple Query may carry
    several; their results arrive in order, each ending with CommandComplete).

    ``trusted_functions`` (``name`` or ``schema.name``) are user functions whose result
    depends only on their arguments; any other user function is opaque.
    ``search_path`` is the session's value as ParameterStatus reports it (``"$user",
    public``) and ``user`` the session user that ``$user`` stands for; without them,
    unqualified names match every schema. Catalog errors propagate, so the caller fails
    closed.
    """
    stmts = parse(sql)
    if isinstance(stmts, str):
        return [StatementSources.unknown(stmts)]
    relation_names: set[RelationName] = set()
    function_names: set[str] = set()
    _collect(stmts, relation_names, function_names)
    relations: dict[RelationName, Sequence[RelationInfo]] = {}
    views: dict[int, Node | None] = {}
    pending = relation_names
    for _ in range(_MAX_VIEW_DEPTH):
        if not pending or lookup is None:
            break
        found = await lookup.relations(sorted(pending, key=lambda n: (n[0] or "", n[1])))
        relations.update(found)
        for name in pending:
            relations.setdefault(name, ())
        more: set[RelationName] = set()
        for infos in found.values():
            for info in infos:
                if info.view_sql is None or info.oid in views:
                    continue
                parsed = parse(info.view_sql)
                views[info.oid] = parsed[0] if isinstance(parsed, list) and parsed else None
                if views[info.oid] is not None:
                    _collect([views[info.oid]], more, function_names)
        pending = more - relations.keys()
    functions: Mapping[str, frozenset[str]] = {}
    if lookup is not None and function_names:
        functions = await lookup.functions(sorted(function_names))
    analyzer = _Analyzer(relations, functions, views, frozenset(trusted_functions))
    path = parse_search_path(search_path, user)
    results = []
    for stmt in stmts:
        analyzer.search_path = path
        found = analyzer.statement(stmt)
        results.append(replace(found, identifiers=identifiers(stmt)))
        path = _path_after(stmt, path, user)
    return results


def parse_search_path(value: str | None, user: str | None = None) -> list[str] | None:
    """A ``search_path`` setting as schema names in order; None when it cannot be known
    (not given, or ``$user`` without the user's name)."""
    if value is None:
        return None
    schemas = []
    for raw in value.split(","):
        name = raw.strip()
        if name.startswith('"') and name.endswith('"') and len(name) >= 2:
            name = name[1:-1].replace('""', '"')
        else:
            name = name.lower()
        if name == "$user":
            if user is None:
                return None
            name = user
        if name:
            schemas.append(name)
    return schemas


def _path_after(stmt: Node, path: list[str] | None, user: str | None) -> list[str] | None:
    """The search_path in force after ``stmt`` ran, as far as its text tells."""
    kind, body = _only(stmt)
    if kind == "VariableSetStmt" and body.get("name") == "search_path":
        values = []
        for arg in body.get("args", []) or []:
            _, const = _only(arg)
            sval = const.get("sval", {}).get("sval") if isinstance(const, dict) else None
            if sval is None:
                return None
            values.append('"' + sval.replace('"', '""') + '"')
        if body.get("kind") != "VAR_SET_VALUE" or not values:
            return None  # RESET, DEFAULT, FROM CURRENT: the value is not in the text
        return parse_search_path(", ".join(values), user)
    names: set[RelationName] = set()
    functions: set[str] = set()
    _collect([stmt], names, functions)
    # set_config() can change the path to anything; fall back to every schema.
    return None if "set_config" in functions else path


async def view_lineage(info: RelationInfo, lookup: RelationLookup | None,
                       trusted_functions: Collection[str] = ()) -> list[OutputSources]:
    """What each column of a view (or materialized view) carries: the view column itself
    plus whatever its definition derives it from, traced through nested views."""
    own = [OutputSources.of(info.source(name, typ)) for name, typ in info.columns]
    if info.view_sql is None:
        return own
    analysis = (await analyze(info.view_sql, lookup, trusted_functions))[0]
    upstream = analysis.outputs_for(len(own))
    return [_view_column(mine, theirs) for mine, theirs in zip(own, upstream, strict=True)]


def _view_column(own: OutputSources, upstream: OutputSources) -> OutputSources:
    # A view column is its own value (rules may name it) and, unchanged or derived,
    # the value its definition computes.
    direct = (upstream.direct or not upstream.sources) and not upstream.opaque
    return OutputSources(own.sources | upstream.sources, direct, upstream.opaque)


_NAME_KEYS = ("relname", "schemaname", "aliasname", "colname", "name", "portalname",
              "ctename", "conname", "idxname", "catalogname", "defname")


def identifiers(node: Node) -> frozenset[str]:
    """Every name the statement itself spells (relations, columns, functions, types,
    aliases, cursors, prepared statements, option names), not its literals: error texts
    may quote these back without revealing anything the agent did not write."""
    found: set[str] = set()
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if "A_Const" in item:
                continue  # literals are values
            text = item.get("String", {}).get("sval") if isinstance(
                item.get("String"), dict) else None
            if isinstance(text, str):
                found.add(text)
            for key in _NAME_KEYS:
                value = item.get(key)
                if isinstance(value, str):
                    found.add(value)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return frozenset(found)


def _collect(node: Node, relations: set[RelationName], functions: set[str]) -> None:
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if "relname" in item and isinstance(item.get("relname"), str):
                relations.add((item.get("schemaname"), item["relname"]))
            funcname = item.get("funcname")
            if isinstance(funcname, list) and funcname:
                name = _strings(funcname)
                if name:
                    functions.add(name[-1])
            operator = item.get("A_Expr")
            if isinstance(operator, dict):
                name = _strings(operator.get("name", []))
                if name and not name[-1][:1].isalpha():
                    functions.add(name[-1])
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


# -- the binder ---------------------------------------------------------------------------------


def _only(node: Node) -> tuple[str, Any]:
    """``{"Kind": body}`` → ``("Kind", body)``; anything else → ``("", node)``."""
    if isinstance(node, dict) and len(node) == 1:
        key = next(iter(node))
        if key[:1].isupper():
            return key, node[key]
    return "", node


def _strings(items: Iterable[Node]) -> list[str]:
    out = []
    for item in items:
        kind, body = _only(item)
        if kind == "String":
            out.append(body.get("sval", ""))
    return out


def _list_items(node: Node) -> list[Node]:
    kind, body = _only(node)
    if kind == "List":
        return list(body.get("items", []))
    return []


Columns = list[tuple[str, Output]]


class _Entry:
    """One FROM item visible by name: a table, view, subquery, CTE or function."""

    __slots__ = ("columns", "exact", "fallback", "name", "schema")

    def __init__(self, name: str, columns: Columns | None, fallback: OutputSources = EMPTY,
                 schema: str | None = None, exact: bool = True) -> None:
        self.name = name
        self.schema = schema
        self.columns = columns
        self.fallback = fallback
        # False when several same-named relations disagree: names still resolve, but a
        # star cannot be laid out column by column.
        self.exact = exact

    def known(self, name: str) -> OutputSources | None:
        """The column called ``name`` if this entry certainly has one."""
        found = None
        for col, out in self.columns or ():
            if col == name and isinstance(out, OutputSources):
                found = out if found is None else found.merge(out)
        return found

    def maybe(self) -> OutputSources | None:
        """What a name this entry does not list could still carry: entries of unknown
        shape (or with columns of unknown width) may define any name."""
        if self.columns is None:
            return self.fallback
        spreads = [o.sources for _, o in self.columns if isinstance(o, Spread)]
        if not spreads:
            return None
        merged = self.fallback
        for sources in spreads:
            merged = merged.merge(sources)
        return merged

    def column(self, name: str) -> OutputSources | None:
        known = self.known(name)
        return known if known is not None else self.maybe()

    def whole_row(self) -> OutputSources:
        if self.columns is None:
            return self.fallback.derived()
        merged = self.fallback
        for _, out in self.columns:
            merged = merged.merge(out.sources if isinstance(out, Spread) else out)
        return merged.derived()

    def star(self) -> Columns:
        if self.columns is None:
            return [("?column?", Spread(self.fallback))]
        if not self.exact:
            return [("?column?", Spread(self.whole_row()))]
        return list(self.columns)


class _Join:
    __slots__ = ("left", "natural", "right", "using")

    def __init__(self, left: _Item, right: _Item, using: list[str], natural: bool) -> None:
        self.left = left
        self.right = right
        self.using = using
        self.natural = natural


_Item = _Entry | _Join


def _expand(item: _Item) -> Columns:
    """Star expansion of a FROM item; USING/NATURAL join columns come first, merged."""
    if isinstance(item, _Entry):
        return item.star()
    left = _expand(item.left)
    right = _expand(item.right)
    if any(isinstance(o, Spread) for _, o in left + right):
        merged = EMPTY
        for _, out in left + right:
            merged = merged.merge(out.sources if isinstance(out, Spread) else out)
        return [("?column?", Spread(merged))]
    using = list(item.using)
    if item.natural:
        right_names = {n for n, _ in right}
        using = [n for n, _ in left if n in right_names]
    if not using:
        return left + right
    out: Columns = []
    for name in using:
        value = EMPTY
        for col, src in left + right:
            if col == name and isinstance(src, OutputSources):
                value = value.merge(src)
        out.append((name, value))
    out += [(n, o) for n, o in left if n not in using]
    out += [(n, o) for n, o in right if n not in using]
    return out


class _Scope:
    __slots__ = ("ctes", "entries", "items", "outputs", "parent")

    def __init__(self, parent: _Scope | None, ctes: Mapping[str, Columns | None]) -> None:
        self.parent = parent
        self.ctes = ctes
        self.items: list[_Item] = []
        self.entries: list[_Entry] = []
        self.outputs: Columns = []  # for ORDER BY / GROUP BY output-name references

    def levels(self) -> Iterator[_Scope]:
        scope: _Scope | None = self
        while scope is not None:
            yield scope
            scope = scope.parent


def _figure_name(node: Node) -> str:
    """The column name PostgreSQL gives an unaliased expression (FigureColname)."""
    kind, body = _only(node)
    if kind == "ColumnRef":
        names = _strings(body.get("fields", []))
        return names[-1] if names and len(names) == len(body.get("fields", [])) else "?column?"
    if kind == "A_Indirection":
        last = _strings(body.get("indirection", [])[-1:])
        return last[0] if last else _figure_name(body.get("arg"))
    if kind == "FuncCall":
        names = _strings(body.get("funcname", []))
        return names[-1] if names else "?column?"
    if kind == "TypeCast":
        inner = _figure_name(body.get("arg"))
        if inner != "?column?":
            return inner
        names = _strings(body.get("typeName", {}).get("names", []))
        return names[-1] if names else "?column?"
    if kind == "SubLink":
        link = body.get("subLinkType")
        if link == "EXISTS_SUBLINK":
            return "exists"
        if link == "ARRAY_SUBLINK":
            return "array"
        if link == "EXPR_SUBLINK":
            _, select = _only(body.get("subselect"))
            targets = select.get("targetList", []) if isinstance(select, dict) else []
            if len(targets) == 1:
                _, target = _only(targets[0])
                return target.get("name") or _figure_name(target.get("val"))
        return "?column?"
    simple = {"CaseExpr": "case", "A_ArrayExpr": "array", "RowExpr": "row",
              "CoalesceExpr": "coalesce", "NullIfExpr": "nullif", "GroupingFunc": "grouping",
              "XmlSerialize": "xmlserialize"}
    if kind in simple:
        return simple[kind]
    if kind == "MinMaxExpr":
        return "greatest" if body.get("op") == "IS_GREATEST" else "least"
    return "?column?"


class _Analyzer:
    def __init__(self, relations: Mapping[RelationName, Sequence[RelationInfo]],
                 functions: Mapping[str, frozenset[str]], views: Mapping[int, Node | None],
                 trusted: frozenset[str]) -> None:
        self.relations = relations
        self.functions = functions
        self.views = views
        self.trusted = trusted
        self._view_outputs: dict[int, list[OutputSources] | None] = {}
        self._views_open: set[int] = set()
        self.search_path: list[str] | None = None
        self._reset()

    def _reset(self) -> None:
        self.referenced: set[SourceColumn] = set()
        self.predicates: set[SourceColumn] = set()
        self.written: set[SourceColumn] = set()
        self.targets: set[SourceColumn] = set()
        self.opaque: set[str] = set()
        self.exported: set[SourceColumn] = set()
        self.opaque_args: set[SourceColumn] = set()
        self._in_view = 0

    # -- statements -----------------------------------------------------------------------

    def statement(self, stmt: Node) -> StatementSources:
        self._reset()
        kind, body = _only(stmt)
        extra: dict[str, Any] = {}
        outputs: Sequence[Output] | None
        label = kind.removesuffix("Stmt").lower() or "unknown"
        if kind in ("SelectStmt", "InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"):
            columns = self._query(stmt, None, {})
            outputs = [o for _, o in columns]
            if kind == "SelectStmt" and body.get("intoClause"):
                outputs = []
                label = "select_into"
        elif kind == "CopyStmt":
            outputs, extra = self._copy(body)
            label = "copy_from" if body.get("is_from") else "copy"
        elif kind == "DeclareCursorStmt":
            outputs = [o for _, o in self._query(body.get("query"), None, {})]
            extra["cursor"] = body.get("portalname")
        elif kind == "FetchStmt":
            outputs = [] if body.get("ismove") else None
            label = "move" if body.get("ismove") else "fetch"
            extra["fetch_cursor"] = body.get("portalname")
        elif kind == "PrepareStmt":
            outputs = [o for _, o in self._query(body.get("query"), None, {})]
            extra["prepare"] = body.get("name")
        elif kind == "ExecuteStmt":
            outputs = None
            extra["execute"] = body.get("name")
        elif kind == "ExplainStmt":
            self._query(body.get("query"), None, {})
            outputs = [EMPTY]
        elif kind == "CreateTableAsStmt":
            columns = self._query(body.get("query"), None, {})
            for _, out in columns:
                self._write(out.sources if isinstance(out, Spread) else out)
            outputs = []
        elif kind == "VariableShowStmt":
            outputs = [EMPTY]
        elif kind == "CallStmt":
            self._expr(body.get("funccall"), _Scope(None, {}))
            self.opaque.add("a procedure's OUT parameters cannot be traced")
            outputs = None
        elif kind == "DoStmt":
            self.opaque.add("a DO block runs code the analysis cannot see")
            outputs = []
        elif kind == "ClosePortalStmt":
            outputs = []
            extra["closes"] = body.get("portalname") or "*"
        elif kind == "DeallocateStmt":
            outputs = []
            extra["deallocates"] = "*" if body.get("isall") or not body.get("name") else (
                body.get("name"))
        elif kind == "DiscardStmt":
            outputs = []
            if body.get("target") == "DISCARD_ALL":
                extra["closes"] = extra["deallocates"] = "*"
        elif kind == "":
            return StatementSources.unknown("empty statement")
        else:
            outputs = []
        return StatementSources(
            label, tuple(outputs) if outputs is not None else None,
            frozenset(self.referenced), frozenset(self.predicates), frozenset(self.written),
            frozenset(self.targets), frozenset(self.opaque),
            exported=frozenset(self.exported), opaque_args=frozenset(self.opaque_args),
            **extra)

    def _query(self, node: Node, parent: _Scope | None,
               ctes: Mapping[str, Columns | None]) -> Columns:
        """Output columns of a SELECT or of a data-modifying statement's RETURNING."""
        kind, body = _only(node)
        if kind == "SelectStmt":
            return self._select(body, parent, ctes)
        if kind in ("InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"):
            return self._modify(kind, body, parent, ctes)
        self.opaque.add(f"cannot trace the result of {kind or 'an unknown statement'}")
        return [("?column?", Spread(OutputSources.unknown(f"{kind} result")))]

    def _with(self, clause: Node, parent: _Scope | None,
              ctes: Mapping[str, Columns | None]) -> Mapping[str, Columns | None]:
        if not clause:
            return ctes
        env: dict[str, Columns | None] = dict(ctes)
        recursive = bool(clause.get("recursive"))
        for item in clause.get("ctes", []):
            _, cte = _only(item)
            name = cte.get("ctename", "")
            query = cte.get("ctequery")
            aliases = _strings(cte.get("aliascolnames", []))
            if recursive and _mentions(query, name):
                env[name] = self._recursive_cte(name, query, aliases, parent, env)
            else:
                env[name] = _rename(self._query(query, parent, env), aliases)
            env[name] = _search_cycle_columns(env[name], cte)
        return env

    def _recursive_cte(self, name: str, query: Node, aliases: list[str],
                       parent: _Scope | None, env: dict[str, Columns | None]) -> Columns | None:
        # Iterate to a fixed point: the recursive term may feed any column into any other.
        env[name] = None
        _, body = _only(query)
        if body.get("op", "SETOP_NONE") != "SETOP_NONE":
            env[name] = _rename(self._query({"SelectStmt": body["larg"]}, parent, env), aliases)
        previous = env[name]
        for _ in range(_MAX_RECURSION_PASSES):
            current = _rename(self._query(query, parent, env), aliases)
            if current == previous:
                return current
            env[name] = previous = current
        self.opaque.add(f"recursive CTE {name} did not settle")
        return None

    def _select(self, body: dict[str, Any], parent: _Scope | None,
                ctes: Mapping[str, Columns | None]) -> Columns:
        ctes = self._with(body.get("withClause"), parent, ctes)
        if body.get("op", "SETOP_NONE") != "SETOP_NONE":
            left = self._select(body["larg"], parent, ctes)
            right = self._select(body["rarg"], parent, ctes)
            columns = _union(left, right)
            scope = _Scope(parent, ctes)
            scope.outputs = columns
            if body["op"] != "SETOP_UNION" or not body.get("all"):
                # INTERSECT, EXCEPT and UNION's de-duplication compare whole rows:
                # SELECT ssn ... INTERSECT SELECT '123-45-6789' answers a guess.
                self._compared(_merge_all(left + right), scope)
            self._predicate(_by_position(body.get("sortClause"), columns), scope)
            for key in ("limitCount", "limitOffset"):
                self._predicate(body.get(key), scope)
            return columns
        scope = _Scope(parent, ctes)
        for item in body.get("fromClause", []) or []:
            scope.items.append(self._from_item(item, scope))
        columns: Columns = []
        if body.get("valuesLists"):
            rows = [_list_items(row) for row in body["valuesLists"]]
            width = max((len(r) for r in rows), default=0)
            for index in range(width):
                value = EMPTY
                for row in rows:
                    if index < len(row):
                        value = value.merge(self._expr(row[index], scope))
                columns.append((f"column{index + 1}", value))
        for target in body.get("targetList", []) or []:
            _, res = _only(target)
            columns += self._target(res, scope)
        scope.outputs = columns
        for key in ("whereClause", "havingClause", "limitCount", "limitOffset"):
            self._predicate(body.get(key), scope)
        for key in ("groupClause", "sortClause", "distinctClause"):
            self._predicate(_by_position(body.get(key), columns), scope)
        distinct = body.get("distinctClause")
        if distinct and not any(distinct):
            # Plain DISTINCT compares whole rows: how many come back answers whether two
            # values are equal (SELECT DISTINCT left(ssn, 1) ... UNION ALL SELECT '5').
            self._compared(_merge_all(columns), scope)
        for window in body.get("windowClause", []) or []:
            self._predicate(window, scope)
        if body.get("intoClause"):
            for _, out in columns:
                self._write(out.sources if isinstance(out, Spread) else out)
        return columns

    def _target(self, res: dict[str, Any], scope: _Scope) -> Columns:
        val = res.get("val")
        kind, body = _only(val)
        if kind == "ColumnRef" and body.get("fields") and _is_star(body["fields"][-1]):
            return self._star(body["fields"][:-1], scope)
        if kind == "A_Indirection" and body.get("indirection") and _is_star(
                body["indirection"][-1]):
            entry = self._entry_ref(body.get("arg"), scope)
            if entry is not None and len(body["indirection"]) == 1:
                return self._record(entry.star())
            inner = self._expr(body.get("arg"), scope)
            return [("?column?", Spread(inner.derived()))]
        name = res.get("name") or _figure_name(val)
        return [(name, self._expr(val, scope))]

    def _record(self, columns: Columns) -> Columns:
        for _, out in columns:
            self.referenced.update(out.sources.sources if isinstance(out, Spread)
                                   else out.sources)
        return columns

    def _star(self, qualifier: list[Node], scope: _Scope) -> Columns:
        names = _strings(qualifier)
        if not names:
            columns: Columns = []
            for item in scope.items:
                columns += _expand(item)
            return self._record(columns)
        entry = self._find_entry(names, scope)
        if entry is None:
            return [("?column?", Spread(OutputSources.unknown(
                f"unknown relation {'.'.join(names)}")))]
        return self._record(entry.star())

    def _modify(self, kind: str, body: dict[str, Any], parent: _Scope | None,
                ctes: Mapping[str, Columns | None]) -> Columns:
        ctes = self._with(body.get("withClause"), parent, ctes)
        scope = _Scope(parent, ctes)
        relation = body.get("relation") or {}
        target = self._relation_entry(relation, scope)
        scope.items.append(target)
        target_names = [n for n, _ in target.columns or []]
        # What each target column is set to: RETURNING reports these new values under
        # the target table's OID, so they must carry what was written, not the table.
        assigned: dict[str | None, OutputSources] = {}
        if kind == "InsertStmt":
            cols = [_only(c)[1].get("name") for c in body.get("cols", []) or []]
            written = self._query(body["selectStmt"], parent, ctes) if body.get(
                "selectStmt") else []
            for index, (_, out) in enumerate(written):
                value = out.sources if isinstance(out, Spread) else out
                self._write(value)
                if isinstance(out, Spread):  # unknown width: any column may get it
                    for name in [*target_names, *cols, None]:
                        _assign(assigned, name, value)
                    continue
                name = cols[index] if index < len(cols) else (
                    target_names[index] if index < len(target_names) else None)
                self._target_column(target, name)
                _assign(assigned, name, value)
            conflict = body.get("onConflictClause") or {}
            if conflict:
                excluded = _Entry("excluded", _with_assigned(target.columns, assigned),
                                  target.fallback)
                scope.entries.append(excluded)
                self._assignments(conflict.get("targetList", []), target, scope, assigned)
                self._predicate(conflict.get("whereClause"), scope)
        else:
            extra_from = body.get("fromClause") or body.get("usingClause") or []
            if kind == "MergeStmt":
                extra_from = [body["sourceRelation"]] if body.get("sourceRelation") else []
            for item in extra_from:
                scope.items.append(self._from_item(item, scope))
            self._predicate(body.get("whereClause"), scope)
            self._predicate(body.get("joinCondition"), scope)
            if kind == "UpdateStmt":
                self._assignments(body.get("targetList", []), target, scope, assigned)
            for clause in body.get("mergeWhenClauses", []) or []:
                _, when = _only(clause)
                self._predicate(when.get("condition"), scope)
                if when.get("values"):
                    names = [_only(t)[1].get("name") for t in when.get("targetList", [])]
                    for index, value in enumerate(when["values"]):
                        out = self._expr(value, scope)
                        self._write(out)
                        name = names[index] if index < len(names) else (
                            target_names[index] if index < len(target_names) else None)
                        self._target_column(target, name)
                        _assign(assigned, name, out)
                else:
                    self._assignments(when.get("targetList", []), target, scope, assigned)
        returning = body.get("returningClause") or {}
        exprs = returning.get("exprs", []) if isinstance(returning, dict) else []
        exprs = exprs or body.get("returningList", []) or []
        if not exprs:
            return []
        # RETURNING sees the new values; it may also name the old and new row versions
        # (PostgreSQL 18).
        if assigned:
            updated = _Entry(target.name, _with_assigned(target.columns, assigned),
                             target.fallback.merge(assigned.get(None, EMPTY)), target.schema,
                             target.exact)
            scope.items = [updated if item is target else item for item in scope.items]
            scope.entries = [updated if e is target else e for e in scope.entries]
            target = updated
        for alias in ("old", "new"):
            scope.entries.append(_Entry(alias, target.columns, target.fallback))
        columns: Columns = []
        for item in exprs:
            _, res = _only(item)
            columns += self._target(res, scope)
        return columns

    def _assignments(self, targets: list[Node], relation: _Entry, scope: _Scope,
                     assigned: dict[str | None, OutputSources]) -> None:
        for item in targets or []:
            _, res = _only(item)
            out = self._expr(res.get("val"), scope)
            self._write(out)
            self._target_column(relation, res.get("name"))
            _assign(assigned, res.get("name"), out)

    def _target_column(self, relation: _Entry, name: str | None) -> None:
        if name is None:
            return
        out = relation.column(name)
        if out is not None:
            self.targets.update(out.sources)

    def _write(self, out: OutputSources) -> None:
        self.written.update(out.sources)

    def _copy(self, body: dict[str, Any]) -> tuple[list[Output], dict[str, Any]]:
        options: dict[str, Any] = {}
        for item in body.get("options", []) or []:
            _, opt = _only(item)
            kind, arg = _only(opt.get("arg"))
            if kind == "String":
                value: Any = arg.get("sval")
            elif kind == "Boolean":
                value = bool(arg.get("boolval"))
            elif kind == "Integer":
                value = bool(arg.get("ival"))
            else:
                value = True if opt.get("arg") is None else None
            options[opt.get("defname", "")] = value
        if body.get("is_from"):
            entry = self._relation_entry(body.get("relation") or {}, _Scope(None, {}))
            for name in _strings(body.get("attlist", [])) or [n for n, _ in entry.columns or []]:
                self._target_column(entry, name)
            return [], {}
        if body.get("filename") is not None or body.get("is_program"):
            self.opaque.add("COPY TO a server file or program")
            return [], {}
        if body.get("query") is not None:
            columns = self._query(body["query"], None, {})
        else:
            scope = _Scope(None, {})
            entry = self._relation_entry(body.get("relation") or {}, scope)
            wanted = _strings(body.get("attlist", []))
            if wanted:
                columns = [(n, entry.column(n) or OutputSources.unknown(f"unknown column {n}"))
                           for n in wanted]
            else:
                columns = entry.star()
            self._record(columns)
        fmt = str(options.get("format") or "text").lower()
        header = options.get("header")
        copy = CopyOptions.build(
            fmt, options.get("delimiter"), options.get("null"), options.get("quote"),
            options.get("escape"), header is True or (isinstance(header, str) and header.lower()
                                                       in ("true", "on", "1", "match")))
        return [o for _, o in columns], {"copy": copy}

    # -- FROM ---------------------------------------------------------------------------------

    def _from_item(self, node: Node, scope: _Scope) -> _Item:
        kind, body = _only(node)
        if kind == "RangeVar":
            return self._relation_entry(body, scope)
        if kind == "JoinExpr":
            left = self._from_item(body["larg"], scope)
            right = self._from_item(body["rarg"], scope)
            self._predicate(body.get("quals"), scope)
            join = _Join(left, right, _strings(body.get("usingClause", [])),
                         bool(body.get("isNatural")))
            self._join_keys(join, scope)
            alias = (body.get("alias") or {}).get("aliasname")
            if alias:
                columns = _rename(_expand(join), _strings(body["alias"].get("colnames", [])))
                scope.entries.append(_Entry(alias, columns))
            return join
        if kind == "RangeSubselect":
            parent = scope if body.get("lateral") else scope.parent
            columns = self._query(body.get("subquery"), parent, scope.ctes)
            alias = body.get("alias") or {}
            entry = _Entry(alias.get("aliasname", "?subquery?"),
                           _rename(columns, _strings(alias.get("colnames", []))))
            scope.entries.append(entry)
            return entry
        if kind == "RangeFunction":
            return self._function_entry(body, scope)
        if kind == "RangeTableSample":
            item = self._from_item(body.get("relation"), scope)
            # The sample size and seed may be sub-selects: they decide how many rows come.
            self._predicate([body.get("args"), body.get("repeatable")], scope)
            return item
        if kind in ("RangeTableFunc", "JsonTable"):
            return self._table_function(kind, body, scope)
        entry = _Entry("?unknown?", None, OutputSources.unknown(f"cannot trace {kind}"))
        scope.entries.append(entry)
        return entry

    def _relation_entry(self, rangevar: dict[str, Any], scope: _Scope) -> _Entry:
        schema = rangevar.get("schemaname")
        name = rangevar.get("relname", "")
        alias = (rangevar.get("alias") or {})
        refname = alias.get("aliasname") or name
        renames = _strings(alias.get("colnames", []))
        entry: _Entry
        cte = None if schema else _cte(scope, name)
        if cte is not None:
            columns, known = cte
            entry = (_Entry(refname, _rename(columns, renames)) if known and columns is not None
                     else _Entry(refname, None, OutputSources.unknown(f"CTE {name}")))
        else:
            infos = list(self.relations.get((schema, name), ()))
            if schema is None and self.search_path is not None and not self._in_view:
                infos = _along_path(infos, self.search_path)
            if not infos:
                entry = _Entry(refname, None, OutputSources.unknown(
                    f"unknown relation {schema + '.' if schema else ''}{name}"), schema)
            else:
                per = [self._relation_columns(info) for info in infos]
                columns = per[0]
                exact = True
                for other in per[1:]:
                    if [n for n, _ in other] != [n for n, _ in columns]:
                        exact = False
                        columns = columns + other
                    else:
                        columns = [(n, a.merge(b)) for (n, a), (_, b) in zip(
                            columns, other, strict=True)
                            if isinstance(a, OutputSources) and isinstance(b, OutputSources)]
                entry = _Entry(refname, _rename(columns, renames), schema=(
                    schema or (infos[0].schema if len(infos) == 1 else None)), exact=exact)
        if alias.get("aliasname"):
            entry.schema = None  # an alias hides the table name, as in PostgreSQL
        scope.entries.append(entry)
        return entry

    def _relation_columns(self, info: RelationInfo) -> list[tuple[str, Output]]:
        own = [(name, OutputSources.of(info.source(name, typ))) for name, typ in info.columns]
        if info.kind not in ("v", "m"):
            return list(own)
        inner = self._view(info)
        if inner is None or len(inner) != len(own):
            reason = f"view {info.schema}.{info.name} cannot be traced"
            merged = EMPTY if inner is None else _merge_all(inner)
            return [(name, OutputSources(out.sources | merged.sources, False,
                                         merged.opaque | {reason} if inner is None
                                         else merged.opaque))
                    for name, out in own]
        return [(name, _view_column(out, upstream))
                for (name, out), upstream in zip(own, inner, strict=True)]

    def _view(self, info: RelationInfo) -> list[OutputSources] | None:
        if info.oid in self._view_outputs:
            return self._view_outputs[info.oid]
        stmt = self.views.get(info.oid)
        if stmt is None or info.oid in self._views_open:
            return None
        self._views_open.add(info.oid)
        saved = (self.predicates, self.written, self.targets, self.opaque_args)
        self.predicates, self.written, self.targets = set(), set(), set()
        self.opaque_args = set()
        self._in_view += 1
        try:
            columns = self._query(stmt, None, {})
        finally:
            self._in_view -= 1
            self.predicates, self.written, self.targets, self.opaque_args = saved
            self._views_open.discard(info.oid)
        if any(isinstance(o, Spread) for _, o in columns):
            result = [_merge_all(columns)] * len(info.columns)
        else:
            result = [o for _, o in columns if isinstance(o, OutputSources)]
        self._view_outputs[info.oid] = result
        return result

    def _function_entry(self, body: dict[str, Any], scope: _Scope) -> _Entry:
        alias = body.get("alias") or {}
        renames = _strings(alias.get("colnames", []))
        columns: Columns | None = []
        fallback = EMPTY
        first_name = None
        for item in body.get("functions", []) or []:
            parts = _list_items(item)
            call = parts[0] if parts else None
            coldefs = _list_items(parts[1]) if len(parts) > 1 else []
            _, fbody = _only(call)
            fname = (_strings(fbody.get("funcname", [])) or ["?function?"])[-1] if isinstance(
                fbody, dict) else "?function?"
            first_name = first_name or fname
            value = self._expr(call, scope).derived()
            self._compared(value, scope)  # (its arguments decide how many rows come)
            fallback = fallback.merge(value)
            if not coldefs and len(body.get("functions", [])) == 1:
                coldefs = list(body.get("coldeflist", []) or [])
            defs = [_only(c)[1].get("colname", "?column?") for c in coldefs]
            width = len(defs) or self._srf_width(fname, fbody)
            if width is None or columns is None:
                columns = None
                continue
            names = defs or (list(_PAIR_NAMES) if width == 2 and fname in _SRF_WIDTH
                             else [alias.get("aliasname") or fname] * width)
            columns += [(n, value) for n in names[:width]]
        if body.get("ordinality") and columns is not None:
            columns.append(("ordinality", EMPTY))
        if columns is not None:
            columns = _rename(columns, renames)
        entry = _Entry(alias.get("aliasname") or first_name or "?function?", columns, fallback)
        scope.entries.append(entry)
        return entry

    def _srf_width(self, fname: str, fbody: dict[str, Any]) -> int | None:
        if fname == "unnest":
            return max(1, len(fbody.get("args", []) or []))
        if fname in _SRF_WIDTH and self._function_kind(
                _strings(fbody.get("funcname", []))) == "system":
            return _SRF_WIDTH[fname]
        return None

    def _table_function(self, kind: str, body: dict[str, Any], scope: _Scope) -> _Entry:
        value = EMPTY
        names: list[str] = []
        if kind == "RangeTableFunc":
            for key in ("docexpr", "rowexpr", "namespaces"):
                value = value.merge(self._expr(body.get(key), scope))
            for col in body.get("columns", []) or []:
                _, c = _only(col)
                names.append(c.get("colname", "?column?"))
                value = value.merge(self._expr([c.get("colexpr"), c.get("coldefexpr")], scope))
        else:
            value = self._expr(body.get("context_item"), scope).merge(
                self._expr(body.get("passing"), scope))
            names = _json_table_names(body.get("columns", []))
        alias = body.get("alias") or {}
        value = value.derived()
        self._compared(value, scope)  # (the document decides how many rows come)
        columns: Columns = _rename([(n, value) for n in names],
                                   _strings(alias.get("colnames", [])))
        entry = _Entry(alias.get("aliasname") or kind.lower(), columns, value)
        scope.entries.append(entry)
        return entry

    # -- expressions ------------------------------------------------------------------------

    def _predicate(self, node: Node, scope: _Scope) -> None:
        if node:
            self._compared(self._expr(node, scope, outputs_visible=True), scope)

    def _compared(self, out: OutputSources, scope: _Scope) -> None:
        """``out`` decides which rows or values come back (it is filtered, grouped,
        ordered or branched on), so its sources can be inferred from the result."""
        if self._in_view:
            return
        self.predicates.update(out.sources)
        if out.opaque:
            # An unresolved name or invisible code may stand for any column in scope.
            for level in scope.levels():
                for entry in level.entries:
                    self.predicates.update(entry.whole_row().sources)

    def _join_keys(self, join: _Join, scope: _Scope) -> None:
        """USING / NATURAL compare the same-named columns of both sides."""
        if not join.using and not join.natural:
            return
        both = _expand(join.left) + _expand(join.right)
        names = set(join.using)
        if join.natural:
            left = {n for n, _ in _expand(join.left)}
            names = left & {n for n, _ in _expand(join.right)}
        for name, out in both:
            if isinstance(out, Spread):  # unknown width: any of its columns may be a key
                self._compared(out.sources, scope)
            elif name in names:
                self._compared(out, scope)

    def _expr(self, node: Node, scope: _Scope, outputs_visible: bool = False) -> OutputSources:
        if isinstance(node, list):
            merged = EMPTY
            for item in node:
                merged = merged.merge(self._expr(item, scope, outputs_visible))
            return merged.derived()
        if isinstance(node, _Output):
            return node.value.sources if isinstance(node.value, Spread) else node.value
        if not isinstance(node, dict):
            return EMPTY
        kind, body = _only(node)
        if kind == "ColumnRef":
            return self._column_ref(body.get("fields", []), scope, outputs_visible)
        if kind in ("A_Const", "ParamRef", "SQLValueFunction", "SetToDefault"):
            return EMPTY
        if kind == "FuncCall":
            return self._function(body, scope)
        if kind == "SubLink":
            return self._sublink(body, scope)
        if kind == "A_Indirection":
            return self._indirection(body, scope)
        if kind == "CollateClause":
            return self._expr(body.get("arg"), scope, outputs_visible)
        if kind == "A_Expr":
            return self._operator(body, scope, outputs_visible)
        if kind in ("NullTest", "BooleanTest"):
            value = self._expr(body.get("arg"), scope, outputs_visible)
            if kind == "BooleanTest" or _only(body.get("arg"))[0] != "ColumnRef":
                # The unmasked answer answers the condition: (ssn > '5') IS TRUE,
                # substring(ssn from '^5') IS NULL (a plain ssn IS NULL does not).
                self._compared(value, scope)
            return EMPTY
        if kind == "CaseExpr":
            return self._case(body, scope, outputs_visible)
        if kind == "A_ArrayExpr":
            elements = body.get("elements", []) or []
            value = self._expr(elements, scope, outputs_visible)
            if value.sources and any(_array_valued(e) for e in elements):
                self._compared(value, scope)  # (sub-arrays of unequal length fail)
            return value
        if kind == "TypeCast":
            value = self._expr(body.get("arg"), scope, outputs_visible)
            target = body.get("typeName") or {}
            names = _strings(target.get("names", []))
            if value.sources and (target.get("arrayBounds") or not names
                                  or names[-1] not in TOTAL_CAST_TYPES):
                self._compared(value, scope)  # ('x' || ssn)::int fails or not
            return value.derived()
        if kind in ("SelectStmt", "InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"):
            return _merge_all(self._query(node, scope, scope.ctes))
        if kind in FALLIBLE_NODES:
            value = self._expr(list(body.values()) if isinstance(body, dict) else [],
                               scope, outputs_visible)
            if value.sources:
                self._compared(value, scope)  # (XMLPARSE, JSON(), JSON_VALUE ... fail)
            return value
        # Any other node (operators, casts, CASE, ROW(), arrays, JSON constructors...):
        # the result is derived from everything inside it.
        return self._expr(list(body.values()) if isinstance(body, dict) else [],
                          scope, outputs_visible)

    def _case(self, body: dict[str, Any], scope: _Scope,
              outputs_visible: bool) -> OutputSources:
        # Which branch runs (or whether the result is NULL) answers the conditions, even
        # where the value itself is masked: CASE WHEN ssn LIKE '1%' THEN 1 END.
        whens = [_only(w)[1] for w in body.get("args", []) or []]
        conditions = self._expr([body.get("arg"), *(w.get("expr") for w in whens)], scope,
                                outputs_visible)
        self._compared(conditions, scope)
        results = self._expr([*(w.get("result") for w in whens), body.get("defresult")],
                             scope, outputs_visible)
        return conditions.merge(results).derived()

    def _column_ref(self, fields: list[Node], scope: _Scope,
                    outputs_visible: bool = False) -> OutputSources:
        if fields and _is_star(fields[-1]):
            names = _strings(fields[:-1])
            if not names:
                merged = EMPTY
                for item in scope.items:
                    merged = merged.merge(_merge_all(_expand(item)))
                return self._seen(merged.derived())
            entry = self._find_entry(names, scope)
            return self._seen(entry.whole_row() if entry is not None else OutputSources.unknown(
                f"unknown relation {'.'.join(names)}"))
        names = _strings(fields)
        if not names or len(names) != len(fields):
            return OutputSources.unknown("unsupported column reference")
        found: OutputSources | None = None
        for level in scope.levels():
            value, certain = self._resolve_at(names, level)
            if value is not None:
                found = value if found is None else found.merge(value)
            if certain:
                return self._seen(found if found is not None else EMPTY)
            if outputs_visible and len(names) == 1 and level is scope:
                for name, out in level.outputs:
                    if name == names[0]:
                        return out.sources if isinstance(out, Spread) else out
        if found is not None:
            return self._seen(found)
        return OutputSources.unknown(f"unresolved reference {'.'.join(names)}")

    def _resolve_at(self, names: list[str], level: _Scope) -> tuple[OutputSources | None, bool]:
        """What ``names`` means at one query level, and whether that is certain.

        An entry whose columns are unknown (a function of unknown shape) *may* define any
        name, so its fallback is included but the search goes on outward: otherwise it
        could hide a correlated reference to a sensitive column of an outer query.
        """
        if len(names) == 1:
            column = names[0]
            found: OutputSources | None = None
            certain = False
            for entry in level.entries:
                value = entry.known(column)
                if value is not None:
                    certain = True
                else:
                    value = entry.maybe()
                if value is not None:
                    found = value if found is None else found.merge(value)
            if certain:
                return found, True
            for entry in level.entries:
                if entry.name == column:
                    whole = entry.whole_row()
                    return (whole if found is None else found.merge(whole)), True
            return found, False
        # a.b: column b of relation a, else field b of composite column a.
        for split in range(len(names) - 1, 0, -1):
            entry = self._entry_at(names[:split], level)
            if entry is None:
                continue
            value = entry.column(names[split])
            if value is None:
                return OutputSources.unknown(f"unresolved reference {'.'.join(names)}"), True
            return (value if split == len(names) - 1 else value.derived()), True
        base, certain = self._resolve_at(names[:1], level)
        return (base.derived() if base is not None else None), certain

    def _entry_at(self, names: list[str], level: _Scope) -> _Entry | None:
        if len(names) > 2:
            names = names[-2:]  # database.schema.table: the database is always the current one
        for entry in level.entries:
            if len(names) == 1 and entry.name == names[0]:
                return entry
            if len(names) == 2 and entry.name == names[1] and entry.schema == names[0]:
                return entry
        return None

    def _find_entry(self, names: list[str], scope: _Scope) -> _Entry | None:
        for level in scope.levels():
            entry = self._entry_at(names, level)
            if entry is not None:
                return entry
        return None

    def _entry_ref(self, node: Node, scope: _Scope) -> _Entry | None:
        """The FROM entry a bare ``c`` or ``c.*`` names as a whole row, if it does."""
        kind, body = _only(node)
        if kind != "ColumnRef":
            return None
        fields = body.get("fields", [])
        if fields and _is_star(fields[-1]):
            names = _strings(fields[:-1])
            return self._find_entry(names, scope) if names else None
        names = _strings(fields)
        if len(names) != 1 or len(names) != len(fields):
            return None
        for level in scope.levels():
            if any(e.known(names[0]) is not None for e in level.entries):
                return None
            entry = self._entry_at(names, level)
            if entry is not None:
                return entry
        return None

    def _seen(self, out: OutputSources) -> OutputSources:
        self.referenced.update(out.sources)
        return out

    def _indirection(self, body: dict[str, Any], scope: _Scope) -> OutputSources:
        indirection = body.get("indirection", [])
        entry = self._entry_ref(body.get("arg"), scope)
        first = _strings(indirection[:1])
        if entry is not None and first:
            value = entry.column(first[0]) or OutputSources.unknown(
                f"unresolved field {first[0]}")
            self._seen(value)
            rest = indirection[1:]
            if not rest:
                return value
            return value.merge(self._expr(rest, scope)).derived()
        base = self._expr(body.get("arg"), scope)
        return base.merge(self._expr(indirection, scope)).derived()

    def _function_kind(self, names: list[str]) -> str:
        if not names:
            return "unknown"
        name = names[-1]
        if len(names) >= 2:
            schema = names[-2]
            if schema in SYSTEM_SCHEMAS:
                return "system"
            return "trusted" if f"{schema}.{name}" in self.trusted else "user"
        schemas = self.functions.get(name)
        if schemas is None:
            return "unknown"
        if schemas <= SYSTEM_SCHEMAS:
            return "system"
        if name in self.trusted or all(
                s in SYSTEM_SCHEMAS or f"{s}.{name}" in self.trusted for s in schemas):
            return "trusted"
        return "user"

    def _function(self, body: dict[str, Any], scope: _Scope) -> OutputSources:
        names = _strings(body.get("funcname", []))
        name = names[-1] if names else "?"
        each = [self._expr(arg, scope) for arg in body.get("args", []) or []]
        args = EMPTY
        for value in each:
            args = args.merge(value)
        args = args.derived()
        for key in ("agg_order", "agg_filter", "over"):
            self._predicate(body.get(key), scope)
        kind = self._function_kind(names)
        if kind == "system" and (name in SET_RETURNING_FUNCTIONS or name in TIMING_FUNCTIONS):
            self._compared(args, scope)
        elif kind == "system" and name == "array_agg" and args.sources and any(
                _array_valued(a) for a in body.get("args", []) or []):
            self._compared(args, scope)  # (arrays of unequal length fail to accumulate)
        elif kind == "system" and args.sources and name not in TOTAL_FUNCTIONS:
            # (only the arguments that can make it fail: the string substr() cuts cannot)
            fallible = each[0::2] if name in TOTAL_VALUES else each[
                TOTAL_LEADING_ARGS.get(name, 0):]
            for value in fallible:
                self._compared(value, scope)
        if kind in ("user", "unknown"):
            reason = (f"function {'.'.join(names)} is not a system function; list it in "
                      "masking.trusted_functions if its result depends only on its arguments"
                      if kind == "user" else f"{UNKNOWN_FUNCTION}{'.'.join(names)}")
            self.opaque.add(reason)
            self._opaque_call(args)
            return args.merge(OutputSources.unknown(reason)).derived()
        if kind == "system" and name in OPAQUE_SYSTEM_FUNCTIONS:
            reason = f"{name}() reads data the analysis cannot see"
            self.opaque.add(reason)
            self._opaque_call(args)
            return args.merge(OutputSources.unknown(reason)).derived()
        if kind == "system" and name in SIDE_CHANNEL_FUNCTIONS:
            self.exported.update(args.sources)
        if body.get("agg_star") or (kind == "system" and name in VALUE_FREE_FUNCTIONS):
            plain = all(_only(a)[0] == "ColumnRef" for a in body.get("args", []) or [])
            if body.get("agg_distinct") or (args.sources and not plain):
                # count(DISTINCT ssn) tells equal values apart; count(nullif(ssn, '...'))
                # counts the rows where a computed condition holds.
                self._compared(args, scope)
            return EMPTY
        return args.derived()

    def _operator(self, body: dict[str, Any], scope: _Scope,
                  outputs_visible: bool) -> OutputSources:
        right = self._expr(body.get("rexpr"), scope, outputs_visible)
        value = self._expr(body.get("lexpr"), scope, outputs_visible).merge(right).derived()
        if value.sources:
            op = body.get("kind", "AEXPR_OP")
            symbol = (_strings(body.get("name", [])) or ["?"])[-1]
            if op in PATTERN_EXPRESSIONS or (op == "AEXPR_OP" and symbol in PATTERN_OPERATORS):
                # (a pattern that does not parse fails: ssn on the right side)
                self._compared(right, scope)
            elif (op not in TOTAL_EXPRESSIONS and not (
                    op == "AEXPR_OP" and symbol in TOTAL_OPERATORS)) or (
                    symbol == "||" and (_array_valued(body.get("lexpr"))
                                        or _array_valued(body.get("rexpr")))):
                self._compared(value, scope)  # 1 / (ascii(ssn) - 53) fails or not
        if body.get("kind") == "AEXPR_NULLIF":
            # NULL exactly when the two are equal: the result answers the comparison.
            self._compared(value, scope)
        names = _strings(body.get("name", []))
        # BETWEEN and friends carry keywords, not operator names.
        if names and not names[-1][:1].isalpha() and self._function_kind(names) == "user":
            reason = (f"operator {'.'.join(names)} is defined outside the system schemas, "
                      "so it may run any function")
            self.opaque.add(reason)
            self._opaque_call(value)
            return value.merge(OutputSources.unknown(reason)).derived()
        return value

    def _opaque_call(self, args: OutputSources) -> None:
        if not self._in_view:
            self.opaque_args.update(args.sources)

    def _sublink(self, body: dict[str, Any], scope: _Scope) -> OutputSources:
        columns = self._query(body.get("subselect"), scope, scope.ctes)
        link = body.get("subLinkType")
        if link == "EXISTS_SUBLINK":
            return EMPTY
        first: OutputSources
        if len(columns) == 1 and isinstance(columns[0][1], OutputSources):
            first = columns[0][1]
        else:
            first = _merge_all(columns).derived()
        if link == "EXPR_SUBLINK":
            return first
        test = self._expr(body.get("testexpr"), scope)
        return test.merge(_merge_all(columns)).derived()


@dataclass(frozen=True, slots=True)
class _Output:
    """An output column standing in the parse tree where ``ORDER BY 2`` names it."""

    value: Output


def _by_position(items: Node, columns: Columns) -> Node:
    """GROUP BY / ORDER BY / DISTINCT ON items, with ``ORDER BY 2`` replaced by the output
    column it names (an :class:`_Output` marker): a bare integer there is a position, not
    a constant. Grouping sets (``ROLLUP (2)``) are looked into."""
    if not isinstance(items, list):
        return items
    out: list[Node] = []
    for item in items:
        kind, body = _only(item)
        if kind == "GroupingSet" and isinstance(body, dict):
            out.append(_by_position(body.get("content") or [], columns))
            continue
        inner_kind, inner = _only(body.get("node")) if kind == "SortBy" else (kind, body)
        position = inner.get("ival") if inner_kind == "A_Const" and isinstance(
            inner, dict) else None
        if isinstance(position, dict):
            index = position.get("ival", 0) - 1
            if 0 <= index < len(columns):
                out.append(_Output(columns[index][1]))
                continue
        out.append(item)
    return out


def _search_cycle_columns(columns: Columns | None, cte: dict[str, Any]) -> Columns | None:
    """A recursive CTE's extra columns: SEARCH's sequence and CYCLE's path hold (rows of)
    the listed columns' values; CYCLE's mark is a constant."""
    search = cte.get("search_clause") or {}
    cycle = cte.get("cycle_clause") or {}
    if columns is None or not (search or cycle):
        return columns

    def of(names: list[Node]) -> OutputSources:
        wanted = set(_strings(names))
        found = [out.sources if isinstance(out, Spread) else out for col, out in columns
                 if col in wanted or isinstance(out, Spread)]
        return _merge_all(found).derived() if found else OutputSources.unknown(
            "unknown SEARCH/CYCLE column")

    extra: Columns = []
    if search:
        extra.append((search.get("search_seq_column", "?column?"),
                      of(search.get("search_col_list", []))))
    if cycle:
        extra.append((cycle.get("cycle_mark_column", "?column?"), EMPTY))
        extra.append((cycle.get("cycle_path_column", "?column?"),
                      of(cycle.get("cycle_col_list", []))))
    return [*columns, *extra]


def _assign(assigned: dict[str | None, OutputSources], name: str | None,
            value: OutputSources) -> None:
    """Record that a target column (None: an unknown one) may be set to ``value``."""
    if value:
        assigned[name] = assigned.get(name, EMPTY).merge(value)


def _with_assigned(columns: Columns | None, assigned: dict[str | None, OutputSources]
                   ) -> Columns | None:
    """A target's columns as RETURNING sees them: each may also hold what was written
    to it (or to a column the analysis could not name)."""
    if columns is None:
        return None
    anywhere = assigned.get(None, EMPTY)
    out: Columns = []
    for name, value in columns:
        extra = assigned.get(name, EMPTY).merge(anywhere)
        if isinstance(value, Spread):
            out.append((name, Spread(value.sources.merge(extra))))
        else:
            out.append((name, value.merge(extra)))
    return out


def _along_path(infos: list[RelationInfo], path: list[str]) -> list[RelationInfo]:
    """The relations an unqualified name means under ``path``: the first schema in the
    path that has one (pg_catalog is searched first unless the path places it), plus any
    temporary table of that name, since temporary schemas are searched before the path
    and this session's own cannot be told from others' here."""
    temporary = [i for i in infos if i.schema.startswith("pg_temp_")]
    order = path if "pg_catalog" in path else ["pg_catalog", *path]
    for schema in order:
        found = [i for i in infos if i.schema == schema]
        if found:
            return temporary + found
    return temporary or infos


def _is_star(node: Node) -> bool:
    return _only(node)[0] == "A_Star"


def _array_valued(node: Node) -> bool:
    """Whether an expression is an array by its form (its type is not known here)."""
    kind, body = _only(node)
    if kind == "A_ArrayExpr":
        return True
    if kind == "SubLink":
        return body.get("subLinkType") == "ARRAY_SUBLINK"
    if kind == "TypeCast":
        return bool((body.get("typeName") or {}).get("arrayBounds"))
    if kind == "FuncCall":
        return (_strings(body.get("funcname", [])) or [""])[-1] in ARRAY_FUNCTIONS
    return False


def _merge_all(columns: Iterable[tuple[str, Output]] | Iterable[OutputSources]) -> OutputSources:
    merged = EMPTY
    for item in columns:
        out = item[1] if isinstance(item, tuple) else item
        merged = merged.merge(out.sources if isinstance(out, Spread) else out)
    return merged


def _rename(columns: Columns, names: list[str]) -> Columns:
    if not names:
        return columns
    return [(names[i] if i < len(names) else n, o) for i, (n, o) in enumerate(columns)]


def _union(left: Columns, right: Columns) -> Columns:
    if any(isinstance(o, Spread) for _, o in left + right) or len(left) != len(right):
        return [("?column?", Spread(_merge_all(left + right)))]
    return [(name, a.merge(b)) for (name, a), (_, b) in zip(left, right, strict=True)
            if isinstance(a, OutputSources) and isinstance(b, OutputSources)]


def _cte(scope: _Scope, name: str) -> tuple[Columns | None, bool] | None:
    if name in scope.ctes:
        columns = scope.ctes[name]
        return columns, columns is not None
    return None


def _mentions(node: Node, name: str) -> bool:
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if item.get("relname") == name and not item.get("schemaname"):
                return True
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _json_table_names(columns: list[Node]) -> list[str]:
    names: list[str] = []
    for item in columns or []:
        _, col = _only(item)
        if col.get("coltype") == "JTC_NESTED":
            names += _json_table_names(col.get("columns", []))
        else:
            names.append(col.get("name", "?column?"))
    return names


__all__ = [
    "EMPTY", "OPAQUE_SYSTEM_FUNCTIONS", "SYSTEM_SCHEMAS", "CopyOptions", "Output",
    "OutputSources", "RelationInfo", "RelationLookup", "RelationName", "SourceColumn",
    "Spread", "StatementSources", "analyze", "parse", "parse_search_path", "view_lineage",
]

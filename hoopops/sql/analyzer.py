"""Turn SQL text into :class:`StatementFacts` with PostgreSQL's own parser.

The hot path is ``parse_sql_json`` (libpg_query, in C) plus ``json.loads`` plus one
iterative walk over plain dicts and lists: no pglast node objects and no Python recursion,
so a deep tree cannot exhaust the interpreter stack. libpg_query bounds its own C stack
(it reports "stack depth limit exceeded" / "memory exhausted" instead of crashing), the
input size is bounded before parsing, and ``json.loads`` turns excessive depth into a
RecursionError; each of those is reported as an ``unanalysable`` fact, never raised.

Shapes of the JSON tree: a node is ``{"TypeName": {fields}}``; fields whose C type is a
specific struct (``RangeVar *relation``, ``Alias *alias``, ...) are emitted without the
wrapper; false, zero and empty fields are omitted; locations are byte offsets.
"""

from __future__ import annotations

import gc
import json
import re
import time
from functools import lru_cache
from typing import Any

from pglast.parser import ParseError, normalize, parse_plpgsql_json, parse_sql_json

from hoopops.sql.effects import EffectTable, builtin_effects
from hoopops.sql.facts import (
    Analysis,
    OutputColumn,
    StatementFacts,
    join_name,
    normalise_kinds,
    quote_part,
)

DEFAULT_MAX_BYTES = 1024 * 1024
CACHE_SIZE = 4096
# Longer texts are analysed every time: caching them would pin megabytes per entry.
CACHE_MAX_CHARS = 16 * 1024
GC_PAUSE_CHARS = 64 * 1024
SHAPE_CACHE_SIZE = 4096
SHAPE_MAX_CHARS = 4096
_SHAPE_TYPES = frozenset({"SelectStmt", "InsertStmt", "UpdateStmt", "DeleteStmt",
                          "MergeStmt"})
# Bodies of functions (and SQL inside them) are analysed for dangerous calls this deep.
MAX_BODY_DEPTH = 3

RESET_REASON = ("returns standard_conforming_strings and client_encoding to the session's "
                "defaults, which the gateway has not verified")
# The C scanner behind json.loads, called directly: libpg_query's output is well formed.
_scan_json = json.JSONDecoder().scan_once
TOO_DEEP = "the statement is nested too deeply to analyse safely"

_FILTER = 1  # inside WHERE / JOIN ON / GROUP BY / ORDER BY / HAVING / window / LIMIT
_NOEXEC = 2  # defined or explained, not run now (CREATE VIEW, EXPLAIN without ANALYZE)
_DDL = 4  # relations met here are objects being changed

_TRUE_WORDS = frozenset({"on", "t", "tr", "tru", "true", "y", "ye", "yes", "1"})
_FALSE_WORDS = frozenset({"off", "of", "f", "fa", "fal", "fals", "false", "n", "no", "0"})
_UTF8_NAMES = frozenset({"utf8", "unicode"})
_LEXING_SETTINGS = frozenset({"standard_conforming_strings", "client_encoding"})

_BASE_KINDS: dict[str, tuple[str, ...]] = {}
for _names, _kinds in (
    ("AlterCollationStmt AlterDomainStmt AlterEnumStmt AlterExtensionContentsStmt "
     "AlterFunctionStmt AlterObjectDependsStmt AlterObjectSchemaStmt AlterOpFamilyStmt "
     "AlterOperatorStmt AlterSeqStmt AlterStatsStmt AlterTSConfigurationStmt "
     "AlterTSDictionaryStmt AlterTableStmt AlterTypeStmt CommentStmt CompositeTypeStmt "
     "CreateAmStmt CreateCastStmt CreateConversionStmt CreateDomainStmt CreateEnumStmt "
     "CreateForeignTableStmt CreateFunctionStmt CreateOpClassStmt CreateOpFamilyStmt "
     "CreateRangeStmt CreateSchemaStmt CreateSeqStmt CreateStatsStmt CreateStmt "
     "CreateTransformStmt CreateTrigStmt DefineStmt DropStmt IndexStmt RenameStmt "
     "ReplicaIdentityStmt RuleStmt SecLabelStmt ViewStmt CreateExtensionStmt "
     "AlterExtensionStmt CreateFdwStmt AlterFdwStmt CreateForeignServerStmt "
     "AlterForeignServerStmt ImportForeignSchemaStmt CreatePLangStmt CreateEventTrigStmt "
     "AlterEventTrigStmt CreatePublicationStmt AlterPublicationStmt", ("ddl",)),
    ("CreatePolicyStmt AlterPolicyStmt AlterOwnerStmt DropOwnedStmt", ("ddl", "dcl")),
    ("GrantStmt GrantRoleStmt CreateRoleStmt AlterRoleStmt AlterRoleSetStmt DropRoleStmt "
     "AlterDefaultPrivilegesStmt ReassignOwnedStmt CreateUserMappingStmt "
     "AlterUserMappingStmt DropUserMappingStmt", ("dcl",)),
    ("CreateSubscriptionStmt AlterSubscriptionStmt DropSubscriptionStmt "
     "CreateTableSpaceStmt DropTableSpaceStmt AlterTableSpaceOptionsStmt CreatedbStmt "
     "DropdbStmt AlterDatabaseStmt AlterDatabaseSetStmt AlterDatabaseRefreshCollStmt "
     "AlterTableMoveAllStmt", ("ddl", "admin")),
    ("AlterSystemStmt CheckPointStmt VacuumStmt ClusterStmt ReindexStmt LockStmt LoadStmt "
     "DoStmt", ("admin",)),
    ("TransactionStmt ConstraintsSetStmt", ("tcl",)),
    ("SelectStmt VariableShowStmt FetchStmt ExplainStmt", ("read",)),
    ("InsertStmt UpdateStmt DeleteStmt MergeStmt TruncateStmt RefreshMatViewStmt CallStmt "
     "NotifyStmt", ("write",)),
    ("CreateTableAsStmt", ("ddl", "write")),
    ("VariableSetStmt DiscardStmt ListenStmt UnlistenStmt DeallocateStmt ClosePortalStmt "
     "PLAssignStmt ReturnStmt", ("utility",)),
    ("PrepareStmt ExecuteStmt DeclareCursorStmt CopyStmt", ()),
):
    for _name in _names.split():
        _BASE_KINDS[_name] = _kinds

STATEMENT_TYPES = frozenset(_BASE_KINDS)

_CHANGES_SERVER = frozenset({
    "AlterSystemStmt", "CheckPointStmt", "CreatedbStmt", "DropdbStmt", "AlterDatabaseStmt",
    "AlterDatabaseSetStmt", "AlterDatabaseRefreshCollStmt", "CreateTableSpaceStmt",
    "DropTableSpaceStmt", "AlterTableSpaceOptionsStmt", "AlterTableMoveAllStmt",
    "CreateRoleStmt", "AlterRoleStmt", "AlterRoleSetStmt", "DropRoleStmt", "GrantRoleStmt",
    "CreateSubscriptionStmt", "AlterSubscriptionStmt", "DropSubscriptionStmt",
    "CreateEventTrigStmt", "AlterEventTrigStmt", "LoadStmt"})

_DANGEROUS: dict[str, str] = {
    "CreateExtensionStmt": "creates an extension (installs server code)",
    "AlterExtensionStmt": "changes an extension (installs server code)",
    "CreateFdwStmt": "creates a foreign-data wrapper (reaches other servers)",
    "AlterFdwStmt": "changes a foreign-data wrapper (reaches other servers)",
    "CreateForeignServerStmt": "defines a foreign server (reaches other servers)",
    "AlterForeignServerStmt": "changes a foreign server (reaches other servers)",
    "CreateUserMappingStmt": "stores credentials for another server",
    "AlterUserMappingStmt": "changes credentials for another server",
    "DropUserMappingStmt": "drops credentials for another server",
    "ImportForeignSchemaStmt": "imports tables from another server",
    "CreatePLangStmt": "creates a procedural language",
    "CreateEventTrigStmt": "creates an event trigger (runs code on every DDL statement)",
    "AlterEventTrigStmt": "changes an event trigger",
    "CreateSubscriptionStmt": "subscribes to another server",
    "AlterSubscriptionStmt": "changes a subscription to another server",
    "DropSubscriptionStmt": "drops a subscription to another server",
    "CreatePublicationStmt": "publishes table changes to other servers",
    "AlterPublicationStmt": "changes what is published to other servers",
    "CreateTableSpaceStmt": "creates a tablespace (a server directory)",
    "DropTableSpaceStmt": "drops a tablespace",
    "AlterTableSpaceOptionsStmt": "changes a tablespace",
    "AlterTableMoveAllStmt": "moves every table of a tablespace",
    "AlterSystemStmt": "changes the server configuration (ALTER SYSTEM)",
    "LoadStmt": "loads a shared library into the server",
    "DoStmt": "runs an anonymous code block (DO) that the gateway cannot inspect",
    "CreatedbStmt": "creates a database",
    "DropdbStmt": "drops a database",
    "AlterDatabaseStmt": "changes a database",
    "AlterDatabaseRefreshCollStmt": "changes a database",
    "CreateRoleStmt": "creates a role",
    "AlterRoleStmt": "changes a role",
    "AlterRoleSetStmt": "changes a role's settings",
    "DropRoleStmt": "drops a role",
    "GrantRoleStmt": "changes role membership",
    "ReassignOwnedStmt": "reassigns every object a role owns",
    "DropOwnedStmt": "drops every object a role owns",
}

# DDL whose expressions are stored for later, not evaluated now (no existing rows).
_DEFINES_ONLY = frozenset({"CreateStmt", "CreateDomainStmt", "CompositeTypeStmt",
                           "CreateSeqStmt", "DefineStmt", "CreateForeignTableStmt",
                           "CreatePolicyStmt", "AlterPolicyStmt", "CreateSchemaStmt"})
_TABLE_OBJECTS = frozenset({"OBJECT_TABLE", "OBJECT_VIEW", "OBJECT_MATVIEW",
                            "OBJECT_FOREIGN_TABLE", "OBJECT_SEQUENCE", "OBJECT_INDEX"})
# Wrapper nodes with nothing a policy can use inside.
_SKIP = frozenset({"A_Const", "String", "Integer", "Float", "Boolean", "BitString",
                   "ParamRef", "A_Star", "SQLValueFunction", "TypeName", "SetToDefault",
                   "CurrentOfExpr", "Alias"})


class _Scope:
    """The FROM items of one SELECT/UPDATE/DELETE: alias -> table name or derived source."""

    __slots__ = ("aliases", "derived", "tables", "target")

    def __init__(self) -> None:
        self.aliases: dict[str, str | _Derived | None] = {}
        self.tables: list[str] = []
        self.derived: list[_Derived] = []
        # The names by which an UPDATE/DELETE target can be referred to.
        self.target: set[str] = set()


class _Derived:
    """A subquery or CTE used as a FROM item: which source columns each output comes from."""

    __slots__ = ("cols", "star")

    def __init__(self) -> None:
        self.cols: dict[str, list[Any]] = {}
        self.star: list[Any] = []

    def column(self, name: str) -> list[Any]:
        sink = self.cols.get(name)
        if sink is None:
            sink = self.cols[name] = []
        return sink


class _Outputs:
    """The result columns of the top-level statement, by position."""

    __slots__ = ("columns",)

    def __init__(self) -> None:
        self.columns: list[tuple[str, list[Any], bool]] = []

    def sink(self, index: int, name: str, direct: bool) -> list[Any]:
        if index < len(self.columns):
            old_name, sink, old_direct = self.columns[index]
            self.columns[index] = (old_name, sink, old_direct and direct)
            return sink
        sink = []
        self.columns.append((name, sink, direct))
        return sink


class _Ref:
    """A reference to a derived source's column (None = every column) inside a sink."""

    __slots__ = ("derived", "name")

    def __init__(self, derived: _Derived, name: str | None) -> None:
        self.derived = derived
        self.name = name


Ctx = tuple[tuple[_Scope, ...], dict[str, _Derived], int, Any]


class _Builder:
    """Mutable facts of one statement while its tree is walked."""

    def __init__(self, analyzer: Analyzer, text: str, depth: int) -> None:
        self.analyzer = analyzer
        self.text = text
        self.depth = depth
        self.kinds: set[str] = set()
        self.changes_data = False
        self.changes_schema = False
        self.changes_server = False
        self.tables_read: set[str] = set()
        self.tables_written: set[str] = set()
        self.columns: set[str] = set()
        self.columns_written: set[str] = set()
        self.filter_columns: set[str] = set()
        self.functions: set[str] = set()
        self.called: set[str] = set()
        self.operators: set[str] = set()
        self.types: set[str] = set()
        self.unbounded = False
        self.reasons: list[str] = []
        self.lexing: list[str] = []
        self.resets = False
        self.row_locks = False
        self.unanalysable: str | None = None
        self.wrapped: list[str] = []
        self.prepares: str | None = None
        self.executes: str | None = None
        self.deallocates: str | None = None
        self.notes: list[str] = []
        self.outputs: _Outputs | None = None
        # References to derived columns met in filters (resolved to sources at the end).
        self.filter_refs: list[Any] = []
        self.stack: list[tuple[Any, Ctx]] = []

    # -- small recorders -----------------------------------------------------------------

    def danger(self, reason: str) -> None:
        if reason not in self.reasons:
            self.reasons.append(reason)

    def lexing_risk(self, reason: str) -> None:
        if reason not in self.lexing:
            self.lexing.append(reason)

    def add_column(self, name: str, ctx: Ctx) -> None:
        self.columns.add(name)
        if ctx[2] & _FILTER:
            self.filter_columns.add(name)
        sink = ctx[3]
        if type(sink) is list:
            sink.append(name)

    # -- the walk ------------------------------------------------------------------------

    def run(self) -> None:
        stack = self.stack
        pop = stack.pop
        push = stack.append
        handlers = _HANDLERS
        while stack:
            node, ctx = pop()
            if type(node) is list:
                for item in node:
                    if type(item) is dict or type(item) is list:
                        push((item, ctx))
                continue
            if len(node) == 1:
                ((key, value),) = node.items()
                if key in _SKIP:
                    continue
                handler = handlers.get(key)
                if handler is not None:
                    handler(self, value, ctx)
                    continue
                if type(value) is dict and key[0].isupper():
                    node = value
            if "relname" in node:
                self.range_var(node, ctx, None)
                continue
            for value in node.values():
                if type(value) is dict or type(value) is list:
                    push((value, ctx))

    def push(self, node: Any, ctx: Ctx) -> None:
        if node is not None:
            self.stack.append((node, ctx))

    # -- relations and columns ----------------------------------------------------------

    def range_var(self, rv: dict[str, Any], ctx: Ctx, scope: _Scope | None) -> None:
        relname = rv.get("relname", "")
        schema = rv.get("schemaname")
        alias = rv.get("alias")
        alias_name = alias.get("aliasname") if alias else None
        if not schema and relname in ctx[1]:
            if scope is not None:
                derived = ctx[1][relname]
                scope.aliases[alias_name or relname] = derived
                scope.derived.append(derived)
            return
        name = join_name(schema, relname)
        if ctx[2] & _DDL:
            self.tables_written.add(name)
        else:
            self.tables_read.add(name)
        if scope is not None:
            if alias_name:
                scope.aliases[alias_name] = name
            else:
                scope.aliases[relname] = name
                if schema:
                    scope.aliases[join_name(schema, relname)] = name
            scope.tables.append(name)

    def column_ref(self, fields: dict[str, Any], ctx: Ctx) -> None:
        names: list[str] = []
        star = False
        for item in fields.get("fields", ()):
            s = item.get("String")
            if s is not None:
                names.append(s.get("sval", ""))
            else:
                star = True
        scopes = ctx[0]
        sink = ctx[3]
        if star:
            if names:
                self._qualified(names, None, ctx)
                return
            for scope in reversed(scopes):
                if scope.tables or scope.derived:
                    for table in scope.tables:
                        self.add_column(f"{table}.*", ctx)
                    if type(sink) is list:
                        sink.extend(_Ref(d, None) for d in scope.derived)
                    return
            return
        if len(names) == 1:
            col = names[0]
            found = False
            for scope in scopes:
                for table in scope.tables:
                    self.add_column(f"{table}.{quote_part(col)}", ctx)
                    found = True
                if scope.derived:
                    found = True
                    refs = [_Ref(d, col) for d in scope.derived]
                    if type(sink) is list:
                        sink.extend(refs)
                    if ctx[2] & _FILTER:
                        self.filter_refs.extend(refs)
                whole = scope.aliases.get(col)
                if whole is not None:
                    # A bare range name is a whole-row reference (row_to_json(c), SELECT c).
                    if type(whole) is str:
                        self.add_column(f"{whole}.*", ctx)
                    elif type(sink) is list:
                        sink.append(_Ref(whole, None))
            if not found:
                self.add_column(quote_part(col), ctx)
            return
        self._qualified(names[:-1], names[-1], ctx)

    def _qualified(self, qual: list[str], col: str | None, ctx: Ctx) -> None:
        source = _resolve(qual, ctx[0])
        if source is None and len(qual) >= 2:
            # alias.column.field: a field of a composite column.
            first = _resolve(qual[:1], ctx[0])
            if first is not None:
                source, col = first, qual[1]
        if type(source) is str:
            self.add_column(f"{source}.{quote_part(col) if col else '*'}", ctx)
        elif source is not None:
            ref = _Ref(source, col)  # type: ignore[arg-type]
            if type(ctx[3]) is list:
                ctx[3].append(ref)
            if ctx[2] & _FILTER:
                self.filter_refs.append(ref)
        else:
            self.add_column(join_name(*qual, col or "*"), ctx)

    # -- statements ----------------------------------------------------------------------

    def with_clause(self, with_: dict[str, Any] | None, ctx: Ctx) -> Ctx:
        """Push the CTE bodies; return the context the main statement sees them in."""
        if not with_:
            return ctx
        scopes, ctes, flags, _sink = ctx
        recursive = bool(with_.get("recursive"))
        entries = []
        for item in with_.get("ctes", ()):
            cte = item.get("CommonTableExpr")
            if cte:
                entries.append((cte.get("ctename", ""), cte.get("ctequery"), _Derived()))
        visible = dict(ctes)
        if recursive:
            for name, _query, derived in entries:
                visible[name] = derived
            for _name, query, derived in entries:
                self.push(query, (scopes, visible, flags, derived))
            return (scopes, visible, flags, ctx[3])
        for name, query, derived in entries:
            self.push(query, (scopes, dict(visible), flags, derived))
            visible[name] = derived
        return (scopes, visible, flags, ctx[3])

    def from_items(self, items: list[Any] | None, ctx: Ctx, scope: _Scope,
                   deferred: list[tuple[Any, int]]) -> None:
        """Fill ``scope`` from FROM items; expressions inside are deferred to ``deferred``."""
        if not items:
            return
        work = list(reversed(items))
        while work:
            item = work.pop()
            if type(item) is not dict or len(item) != 1:
                continue
            ((key, value),) = item.items()
            if key == "RangeVar":
                self.range_var(value, ctx, scope)
            elif key == "JoinExpr":
                work.append(value.get("rarg"))
                work.append(value.get("larg"))
                if "quals" in value:
                    deferred.append((value["quals"], _FILTER))
                for using in value.get("usingClause", ()):
                    col = using.get("String", {}).get("sval", "")
                    deferred.append(({"ColumnRef": {"fields": [{"String": {"sval": col}}]}},
                                     _FILTER))
            elif key == "RangeSubselect":
                derived = _Derived()
                alias = value.get("alias")
                if alias:
                    scope.aliases[alias.get("aliasname", "")] = derived
                scope.derived.append(derived)
                deferred.append((value.get("subquery"), -1, derived))  # type: ignore[arg-type]
            elif key == "RangeTableSample":
                work.append(value.get("relation"))
                deferred.append(({"_": [value.get("args"), value.get("repeatable")]}, 0))
            elif key == "RangeFunction":
                derived = _Derived()
                alias = value.get("alias")
                if alias:
                    scope.aliases[alias.get("aliasname", "")] = derived
                scope.derived.append(derived)
                deferred.append((value.get("functions"), 0))
            else:
                derived = _Derived()
                alias = value.get("alias") if type(value) is dict else None
                if alias:
                    scope.aliases[alias.get("aliasname", "")] = derived
                scope.derived.append(derived)
                deferred.append((value, 0))

    def push_deferred(self, deferred: list[Any], ctx: Ctx) -> None:
        scopes, ctes, flags, _sink = ctx
        for entry in deferred:
            node, extra = entry[0], entry[1]
            if extra == -1:
                self.push(node, (scopes, ctes, flags & ~_FILTER, entry[2]))
            else:
                self.push(node, (scopes, ctes, flags | extra, None))

    def targets(self, targets: list[Any] | None, ctx: Ctx, key: str = "val") -> None:
        """Push a target list, giving each output column its own sink when tracked."""
        if not targets:
            return
        sink = ctx[3]
        scopes, ctes, flags, _ = ctx
        if type(sink) is _Outputs or type(sink) is _Derived:
            for index, item in enumerate(targets):
                rt = item.get("ResTarget", item)
                val = rt.get(key)
                name = rt.get("name") or _output_name(val)
                direct = type(val) is dict and "ColumnRef" in val
                if type(sink) is _Outputs:
                    target_sink = sink.sink(index, name, direct)
                elif _is_star(val):
                    target_sink = sink.star
                else:
                    target_sink = sink.column(name)
                self.push(val, (scopes, ctes, flags, target_sink))
                if rt.get("indirection"):
                    self.push(rt["indirection"], (scopes, ctes, flags, None))
        else:
            self.push(targets, ctx)

    def select(self, s: dict[str, Any] | None, ctx: Ctx) -> None:
        if not s:
            return
        if not ctx[2] & _NOEXEC:
            self.kinds.add("read")
        if ctx[2] & _DDL:
            ctx = (ctx[0], ctx[1], ctx[2] & ~_DDL, ctx[3])
        if "withClause" in s:
            ctx = self.with_clause(s["withClause"], ctx)
        scopes, ctes, flags, sink = ctx
        if s.get("op", "SETOP_NONE") != "SETOP_NONE":
            branch_sink = sink if type(sink) in (_Outputs, _Derived, list) else None
            self.push({"SelectStmt": s.get("rarg")}, (scopes, ctes, flags, branch_sink))
            self.push({"SelectStmt": s.get("larg")}, (scopes, ctes, flags, branch_sink))
            for key in ("sortClause", "limitCount", "limitOffset"):
                self.push(s.get(key), (scopes, ctes, flags | _FILTER, None))
            return
        scope = _Scope()
        deferred: list[Any] = []
        self.from_items(s.get("fromClause"), ctx, scope, deferred)
        inner: Ctx = ((*scopes, scope), ctes, flags, sink)
        self.push_deferred(deferred, inner)
        if "valuesLists" in s:
            self.values(s["valuesLists"], inner)
        self.targets(s.get("targetList"), inner)
        plain = ((*scopes, scope), ctes, flags | _FILTER, None)
        for key in ("whereClause", "havingClause", "groupClause", "sortClause",
                    "windowClause", "distinctClause", "limitCount", "limitOffset"):
            value = s.get(key)
            if value:
                self.push(value, plain)
        if "lockingClause" in s:
            self.row_locks = True
        into = s.get("intoClause")
        if into:
            self.into(into, ctx)

    def values(self, rows: list[Any], ctx: Ctx) -> None:
        sink = ctx[3]
        scopes, ctes, flags, _ = ctx
        if type(sink) is _Outputs:
            for row in rows:
                items = row.get("List", {}).get("items", ())
                for index, val in enumerate(items):
                    target = sink.sink(index, f"column{index + 1}", False)
                    self.push(val, (scopes, ctes, flags, target))
        elif type(sink) is _Derived:
            for row in rows:
                for index, val in enumerate(row.get("List", {}).get("items", ())):
                    self.push(val, (scopes, ctes, flags, sink.column(f"column{index + 1}")))
        else:
            self.push(rows, ctx)

    def into(self, into: dict[str, Any], ctx: Ctx) -> None:
        rel = into.get("rel") or {}
        name = join_name(rel.get("schemaname"), rel.get("relname", ""))
        self.tables_written.add(name)
        self.kinds.update(("ddl", "write"))
        self.changes_schema = True
        self.changes_data = True

    def dml_target(self, rv: dict[str, Any], ctx: Ctx, scope: _Scope) -> str:
        relname = rv.get("relname", "")
        name = join_name(rv.get("schemaname"), relname)
        alias = rv.get("alias")
        if ctx[2] & _NOEXEC:
            self.tables_read.add(name)
        else:
            self.tables_written.add(name)
            self.kinds.add("write")
            self.changes_data = True
        key = alias["aliasname"] if alias else relname
        scope.aliases[key] = name
        scope.target.add(key)
        if rv.get("schemaname") and not alias:
            scope.aliases[name] = name
            scope.target.add(name)
        scope.tables.append(name)
        return name

    def returning(self, stmt: dict[str, Any], ctx: Ctx) -> None:
        clause = stmt.get("returningClause")
        targets = clause.get("exprs") if clause else stmt.get("returningList")
        if targets:
            self.targets(targets, ctx)

    def insert(self, s: dict[str, Any], ctx: Ctx) -> None:
        ctx = _no_ddl(ctx)
        if "withClause" in s:
            ctx = self.with_clause(s["withClause"], ctx)
        scopes, ctes, flags, sink = ctx
        scope = _Scope()
        target = self.dml_target(s.get("relation", {}), ctx, scope)
        cols = s.get("cols")
        written = self.columns_written
        if cols:
            for item in cols:
                written.add(f"{target}.{quote_part(item.get('ResTarget', {}).get('name', ''))}")
        elif not ctx[2] & _NOEXEC:
            written.add(f"{target}.*")
        self.push(s.get("selectStmt"), (scopes, ctes, flags, None))
        inner: Ctx = ((*scopes, scope), ctes, flags, sink)
        conflict = s.get("onConflictClause")
        if conflict:
            scope.aliases["excluded"] = target
            for item in conflict.get("targetList", ()):
                rt = item.get("ResTarget", {})
                written.add(f"{target}.{quote_part(rt.get('name', ''))}")
                self.push(rt.get("val"), (inner[0], ctes, flags, None))
            self.push(conflict.get("whereClause"), (inner[0], ctes, flags | _FILTER, None))
            self.push(conflict.get("infer"), (inner[0], ctes, flags | _FILTER, None))
        self.returning(s, inner)

    def update(self, s: dict[str, Any], ctx: Ctx) -> None:
        ctx = _no_ddl(ctx)
        if "withClause" in s:
            ctx = self.with_clause(s["withClause"], ctx)
        scopes, ctes, flags, sink = ctx
        scope = _Scope()
        target = self.dml_target(s.get("relation", {}), ctx, scope)
        deferred: list[Any] = []
        self.from_items(s.get("fromClause"), ctx, scope, deferred)
        inner: Ctx = ((*scopes, scope), ctes, flags, sink)
        self.push_deferred(deferred, inner)
        for item in s.get("targetList", ()):
            rt = item.get("ResTarget", {})
            self.columns_written.add(f"{target}.{quote_part(rt.get('name', ''))}")
            self.push(rt.get("val"), (inner[0], ctes, flags, None))
        where = s.get("whereClause")
        self.push(where, (inner[0], ctes, flags | _FILTER, None))
        if not flags & _NOEXEC and _unbounded(where, scope):
            self.unbounded = True
        self.returning(s, inner)

    def delete(self, s: dict[str, Any], ctx: Ctx) -> None:
        ctx = _no_ddl(ctx)
        if "withClause" in s:
            ctx = self.with_clause(s["withClause"], ctx)
        scopes, ctes, flags, sink = ctx
        scope = _Scope()
        target = self.dml_target(s.get("relation", {}), ctx, scope)
        if not flags & _NOEXEC:
            self.columns_written.add(f"{target}.*")
        deferred: list[Any] = []
        self.from_items(s.get("usingClause"), ctx, scope, deferred)
        inner: Ctx = ((*scopes, scope), ctes, flags, sink)
        self.push_deferred(deferred, inner)
        where = s.get("whereClause")
        self.push(where, (inner[0], ctes, flags | _FILTER, None))
        if not flags & _NOEXEC and _unbounded(where, scope):
            self.unbounded = True
        self.returning(s, inner)

    def merge(self, s: dict[str, Any], ctx: Ctx) -> None:
        ctx = _no_ddl(ctx)
        if "withClause" in s:
            ctx = self.with_clause(s["withClause"], ctx)
        scopes, ctes, flags, sink = ctx
        scope = _Scope()
        target = self.dml_target(s.get("relation", {}), ctx, scope)
        deferred: list[Any] = []
        self.from_items([s["sourceRelation"]] if "sourceRelation" in s else None, ctx, scope,
                        deferred)
        inner: Ctx = ((*scopes, scope), ctes, flags, sink)
        self.push_deferred(deferred, inner)
        plain: Ctx = (inner[0], ctes, flags, None)
        filtered: Ctx = (inner[0], ctes, flags | _FILTER, None)
        self.push(s.get("joinCondition"), filtered)
        for item in s.get("mergeWhenClauses", ()):
            clause = item.get("MergeWhenClause", {})
            command = clause.get("commandType", "")
            if command in ("CMD_UPDATE", "CMD_DELETE") and not clause.get("condition") and \
                    clause.get("matchKind") == "MERGE_WHEN_NOT_MATCHED_BY_SOURCE" and \
                    not flags & _NOEXEC:
                self.unbounded = True
            self.push(clause.get("condition"), filtered)
            for target_item in clause.get("targetList", ()):
                rt = target_item.get("ResTarget", {})
                if rt.get("name"):
                    self.columns_written.add(f"{target}.{quote_part(rt['name'])}")
                self.push(rt.get("val"), plain)
            if command == "CMD_DELETE" or (command == "CMD_INSERT"
                                           and not clause.get("targetList")):
                self.columns_written.add(f"{target}.*")
            self.push(clause.get("values"), plain)
        self.returning(s, inner)

    # -- expressions ---------------------------------------------------------------------

    def func_call(self, f: dict[str, Any], ctx: Ctx) -> None:
        parts = [item.get("String", {}).get("sval", "") for item in f.get("funcname", ())]
        name = join_name(*parts)
        self.functions.add(name)
        if not ctx[2] & _NOEXEC:
            self.called.add(name)
        if parts and parts[-1].lower() == "set_config":
            self.set_config(f.get("args", ()))
        for key in ("args", "agg_order", "agg_filter", "over"):
            value = f.get(key)
            if value:
                self.stack.append((value, ctx))

    def a_expr(self, e: dict[str, Any], ctx: Ctx) -> None:
        name = e.get("name")
        if name:
            parts = [item.get("String", {}).get("sval", "") for item in name]
            if parts[-1] and not parts[-1][0].isalpha():
                self.operators.add(".".join(parts))
        for key in ("lexpr", "rexpr"):
            value = e.get(key)
            if value:
                self.stack.append((value, ctx))

    # -- settings ------------------------------------------------------------------------

    def setting_change(self, name: str, value: str | None, reset: bool) -> None:
        """Judge a change of setting ``name`` to ``value`` (None: not a constant)."""
        name = name.lower()
        reason = self.analyzer.effects.settings.get(name)
        if reason:
            self.danger(f"{name}: {reason}")
            if name in ("role", "session_authorization"):
                self.kinds.add("dcl")
        if name not in _LEXING_SETTINGS:
            return
        if reset:
            self.resets = True
            self.lexing_risk(f"resetting {name} {RESET_REASON}")
            return
        if value is None:
            self.lexing_risk(f"{name} would be set to a value the gateway cannot see")
        elif name == "standard_conforming_strings" and value.lower() not in _TRUE_WORDS:
            self.lexing_risk(f"standard_conforming_strings = {value} would make the server "
                             "read string literals differently from the gateway")
        elif name == "client_encoding" and \
                re.sub(r"[^a-z0-9]", "", value.lower()) not in _UTF8_NAMES:
            self.lexing_risk(f"client_encoding = {value} would make the server read the text "
                             "in another encoding than the gateway (only UTF8 is allowed)")

    def set_config(self, args: Any) -> None:
        args = list(args)
        setting = _constant(args[0]) if args else None
        value = _constant(args[1]) if len(args) > 1 else None
        if setting is None:
            self.danger("set_config() with a setting name the gateway cannot see")
            self.lexing_risk("set_config() with a setting name the gateway cannot see")
            return
        self.setting_change(setting, value, reset=False)


# -- node handlers (module level: one dict lookup per wrapper node) ---------------------


def _h_select(b: _Builder, v: dict[str, Any], ctx: Ctx) -> None:
    b.select(v, ctx)


def _h_insert(b: _Builder, v: dict[str, Any], ctx: Ctx) -> None:
    b.insert(v, ctx)


def _h_update(b: _Builder, v: dict[str, Any], ctx: Ctx) -> None:
    b.update(v, ctx)


def _h_delete(b: _Builder, v: dict[str, Any], ctx: Ctx) -> None:
    b.delete(v, ctx)


def _h_merge(b: _Builder, v: dict[str, Any], ctx: Ctx) -> None:
    b.merge(v, ctx)


def _h_column(b: _Builder, v: dict[str, Any], ctx: Ctx) -> None:
    b.column_ref(v, ctx)


def _h_func(b: _Builder, v: dict[str, Any], ctx: Ctx) -> None:
    b.func_call(v, ctx)


def _h_aexpr(b: _Builder, v: dict[str, Any], ctx: Ctx) -> None:
    b.a_expr(v, ctx)


def _h_range_var(b: _Builder, v: dict[str, Any], ctx: Ctx) -> None:
    b.range_var(v, ctx, None)


def _h_execute(b: _Builder, v: dict[str, Any], ctx: Ctx) -> None:
    b.executes = v.get("name", "")
    b.wrapped.append("ExecuteStmt")
    b.push(v.get("params"), ctx)


def _h_type_cast(b: _Builder, v: dict[str, Any], ctx: Ctx) -> None:
    names = v.get("typeName", {}).get("names")
    if names and (len(names) == 1 or
                  names[0].get("String", {}).get("sval") != "pg_catalog"):
        b.types.add(join_name(*_string_list(names)))
    arg = v.get("arg")
    if arg is not None:
        b.stack.append((arg, ctx))


def _h_res_target(b: _Builder, v: dict[str, Any], ctx: Ctx) -> None:
    val = v.get("val")
    if val is not None:
        b.stack.append((val, ctx))
    ind = v.get("indirection")
    if ind is not None:
        b.stack.append((ind, ctx))


_HANDLERS = {
    "SelectStmt": _h_select,
    "InsertStmt": _h_insert,
    "UpdateStmt": _h_update,
    "DeleteStmt": _h_delete,
    "MergeStmt": _h_merge,
    "ColumnRef": _h_column,
    "FuncCall": _h_func,
    "A_Expr": _h_aexpr,
    "RangeVar": _h_range_var,
    "ExecuteStmt": _h_execute,
    "TypeCast": _h_type_cast,
    "ResTarget": _h_res_target,
}


# -- helpers ---------------------------------------------------------------------------


def _no_ddl(ctx: Ctx) -> Ctx:
    return (ctx[0], ctx[1], ctx[2] & ~_DDL, ctx[3]) if ctx[2] & _DDL else ctx


def _resolve(qual: list[str], scopes: tuple[_Scope, ...]) -> str | _Derived | None:
    key = qual[0] if len(qual) == 1 else join_name(*qual[-2:])
    for scope in reversed(scopes):
        found = scope.aliases.get(key)
        if found is not None:
            return found
    return None


def _output_name(val: Any) -> str:
    while type(val) is dict and len(val) == 1:
        ((key, inner),) = val.items()
        if key == "ColumnRef":
            fields = inner.get("fields", ())
            last = fields[-1] if fields else {}
            return last.get("String", {}).get("sval", "*") if "String" in last else "*"
        if key == "FuncCall":
            names = inner.get("funcname", ())
            return names[-1].get("String", {}).get("sval", "?column?") if names else "?column?"
        if key == "TypeCast":
            val = inner.get("arg")
            continue
        break
    return "?column?"


def _is_star(val: Any) -> bool:
    if type(val) is not dict or "ColumnRef" not in val:
        return False
    fields = val["ColumnRef"].get("fields", ())
    return bool(fields) and "A_Star" in fields[-1]


def _constant(node: Any) -> str | None:
    """The text of a constant argument (through casts), or None when it is not one."""
    while type(node) is dict:
        if "TypeCast" in node:
            node = node["TypeCast"].get("arg")
            continue
        const = node.get("A_Const")
        if const is None:
            return None
        if "sval" in const:
            return str(const["sval"].get("sval", ""))
        if "ival" in const:
            return str(const["ival"].get("ival", 0))
        if "boolval" in const:
            return "on" if const["boolval"].get("boolval") else "off"
        if "fval" in const:
            return str(const["fval"].get("fval", ""))
        if const.get("isnull"):
            return None
        return ""
    return None


def _refs_target(node: Any, scope: _Scope) -> bool:
    """Does ``node`` mention a column that can belong to the UPDATE/DELETE target?"""
    target_names = scope.target
    work = [node]
    while work:
        item = work.pop()
        if type(item) is list:
            work.extend(item)
        elif type(item) is dict:
            ref = item.get("ColumnRef")
            if ref is not None:
                fields = ref.get("fields", ())
                names = [f["String"].get("sval", "") for f in fields if "String" in f]
                if len(names) <= 1 or names[0] in target_names or \
                        join_name(*names[:2]) in target_names:
                    return True
                continue
            work.extend(v for v in item.values() if type(v) in (dict, list))
    return False


def _unbounded(where: Any, scope: _Scope) -> bool:
    """True when a WHERE clause cannot be relied on to limit the rows touched.

    No WHERE; a WHERE that mentions no column of the target (``WHERE true``, ``1=1``);
    ``col = col``; an OR with such an arm; an AND made only of such arms.
    """
    if not where:
        return True
    if type(where) is not dict or "CurrentOfExpr" in where:
        return False
    expr = where.get("BoolExpr")
    if expr is not None:
        op = expr.get("boolop")
        args = expr.get("args", ())
        if op == "OR_EXPR":
            return any(_unbounded(arg, scope) for arg in args)
        if op == "AND_EXPR":
            return all(_unbounded(arg, scope) for arg in args)
    a_expr = where.get("A_Expr")
    if a_expr is not None and a_expr.get("kind") == "AEXPR_OP":
        left, right = a_expr.get("lexpr"), a_expr.get("rexpr")
        if type(left) is dict and "ColumnRef" in left and type(right) is dict and \
                "ColumnRef" in right and \
                left["ColumnRef"].get("fields") == right["ColumnRef"].get("fields"):
            return True
    return not _refs_target(where, scope)


def _def_elems(options: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in options or ():
        elem = item.get("DefElem") if type(item) is dict else None
        if elem:
            out[elem.get("defname", "")] = elem.get("arg")
    return out


def _explain_analyzes(options: Any) -> bool:
    for item in options or ():
        elem = item.get("DefElem", {})
        if elem.get("defname") != "analyze":
            continue
        arg = elem.get("arg")
        if arg is None:
            return True
        if "Boolean" in arg:
            return bool(arg["Boolean"].get("boolval"))
        text = _constant({"A_Const": {"sval": arg["String"]}}) if "String" in arg else None
        if "Integer" in arg:
            text = str(arg["Integer"].get("ival", 0))
        return text is None or text.lower() not in _FALSE_WORDS
    return False


def _string_list(node: Any) -> list[str]:
    return [item.get("String", {}).get("sval", "") for item in node or ()
            if type(item) is dict]


def _names_of(obj: Any) -> list[str]:
    """Object names in a DropStmt ``objects`` entry (a List of Strings, or a TypeName)."""
    if type(obj) is dict:
        if "List" in obj:
            return _string_list(obj["List"].get("items"))
        if "String" in obj:
            return [obj["String"].get("sval", "")]
    return []


class Analyzer:
    """Analyses SQL text with one side-effect table; results are cached by exact text."""

    def __init__(self, effects: EffectTable | None = None, *,
                 max_bytes: int = DEFAULT_MAX_BYTES, cache_size: int = CACHE_SIZE) -> None:
        self.effects = effects or builtin_effects()
        self.max_bytes = max_bytes
        self._cached = lru_cache(maxsize=cache_size)(self._analyze_top)
        self._shapes: dict[str, StatementFacts] = {}

    def analyze(self, text: str) -> Analysis:
        """Facts for every statement in ``text``; never raises."""
        if len(text) <= CACHE_MAX_CHARS:
            return self._cached(text)
        return self._analyze_top(text)

    def analyze_uncached(self, text: str, *, shapes: bool = True) -> Analysis:
        """Analyse without the exact-text cache (``shapes=False``: without any cache)."""
        return self._analyze_top(text) if shapes else self._timed(text)

    def cache_clear(self) -> None:
        self._cached.cache_clear()
        self._shapes.clear()

    # -- the shape cache -----------------------------------------------------------------
    #
    # Clients that inline literals (pgbench's simple mode, most ORMs' logging paths) send
    # a new text every time, so the exact-text cache never hits. For plain SELECT / DML
    # statements no fact depends on the value of a literal, so facts are cached by the
    # normalised text (literals replaced by $n, which only a successful parse produces).
    # Statements whose facts do read literals (SET, set_config(), EXPLAIN options, COPY,
    # utility statements) and texts with comments or several statements are never cached
    # this way.

    def _shape_key(self, text: str) -> str | None:
        if len(text) > SHAPE_MAX_CHARS or "--" in text or "/*" in text or "\x00" in text:
            return None
        if len(text) * 4 > self.max_bytes and \
                len(text.encode("utf-8", "surrogatepass")) > self.max_bytes:
            return None
        body = text.strip()
        semicolons = body.count(";")
        if semicolons > 1 or (semicolons == 1 and not body.endswith(";")):
            return None
        try:
            return normalize(text)
        except Exception:
            return None

    def _from_shape(self, text: str, key: str) -> Analysis | None:
        shape = self._shapes.get(key)
        if shape is None:
            return None
        body = text.strip()
        if body.endswith(";"):
            body = body[:-1].rstrip()
        location = len(text) - len(text.lstrip())
        return Analysis(text, (shape.replace(text=body, location=location),))

    def _remember_shape(self, key: str, analysis: Analysis) -> None:
        if len(analysis.statements) != 1:
            return
        facts = analysis.statements[0]
        if facts.statement_type not in _SHAPE_TYPES or facts.parse_error or \
                facts.unanalysable or facts.lexing_risk or facts.wrapped or \
                any(name.rpartition(".")[2].lower() == "set_config" for name in facts.functions):
            return
        if len(self._shapes) >= SHAPE_CACHE_SIZE:
            try:
                del self._shapes[next(iter(self._shapes))]
            except (KeyError, StopIteration, RuntimeError):
                self._shapes.clear()
        self._shapes[key] = facts

    # -- top level -----------------------------------------------------------------------

    def _analyze_top(self, text: str) -> Analysis:
        key = self._shape_key(text)
        if key is None:
            return self._timed(text)
        started = time.perf_counter()
        found = self._from_shape(text, key)
        if found is not None:
            return Analysis(found.text, found.statements, None, None,
                            (time.perf_counter() - started) * 1e6)
        analysis = self._timed(text)
        self._remember_shape(key, analysis)
        return analysis

    def _timed(self, text: str) -> Analysis:
        started = time.perf_counter()
        # A big statement becomes millions of short-lived dicts; the cyclic collector would
        # rescan them over and over (5x slower) though none of them can form a cycle.
        pause_gc = len(text) > GC_PAUSE_CHARS and gc.isenabled()
        if pause_gc:
            gc.disable()
        try:
            analysis = self._analyze(text, 0)
        except RecursionError:
            analysis = _failed(text, None, TOO_DEEP)
        except Exception as exc:  # the analyser must never take a session down
            analysis = _failed(text, None, f"the statement could not be analysed "
                                           f"({type(exc).__name__}: {exc})")
        finally:
            if pause_gc:
                gc.enable()
        elapsed = (time.perf_counter() - started) * 1e6
        return Analysis(analysis.text, analysis.statements, analysis.parse_error,
                        analysis.unanalysable, elapsed)

    def _analyze(self, text: str, depth: int) -> Analysis:
        if "\x00" in text:
            return _failed(text, None, "the text contains a NUL byte, which ends the text "
                           "early for PostgreSQL; send the statement without it")
        if not text.strip():
            return Analysis(text, ())
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:
            return _failed(text, None, "the text is not valid UTF-8")
        if len(data) > self.max_bytes:
            return _failed(text, None, f"the statement is {len(data)} bytes long; hoopops "
                           f"analyses at most {self.max_bytes} bytes")
        try:
            raw = parse_sql_json(text)
        except ParseError as exc:
            message = str(exc.args[0]) if exc.args else str(exc)
            if "stack depth" in message or "memory exhausted" in message:
                return _failed(text, None, TOO_DEEP)
            return _failed(text, message, None)
        try:
            tree = _scan_json(raw, 0)[0]
        except RecursionError:
            return _failed(text, None, TOO_DEEP)
        stmts = tree.get("stmts") or ()
        if not stmts:
            return Analysis(text, ())
        ascii_only = len(data) == len(text)
        facts = []
        for raw_stmt in stmts:
            start = raw_stmt.get("stmt_location", 0)
            length = raw_stmt.get("stmt_len", 0)
            end = start + length if length else len(data)
            if ascii_only:
                piece = text[start:end]
                char_start = start
            else:
                piece = data[start:end].decode("utf-8", "replace")
                char_start = len(data[:start].decode("utf-8", "replace"))
            stripped = piece.strip()
            char_start += len(piece) - len(piece.lstrip())
            ((stmt_type, fields),) = raw_stmt["stmt"].items()
            facts.append(self._statement(stmt_type, fields, stripped, char_start, depth))
        return Analysis(text, tuple(facts))

    # -- one statement -------------------------------------------------------------------

    def _statement(self, stmt_type: str, fields: dict[str, Any], text: str, location: int,
                   depth: int) -> StatementFacts:
        b = _Builder(self, text, depth)
        base = _BASE_KINDS.get(stmt_type)
        if base is None:
            b.kinds.add("admin")
            b.danger(f"{stmt_type} is a statement type hoopops does not know")
        else:
            b.kinds.update(base)
        reason = _DANGEROUS.get(stmt_type)
        if reason:
            b.danger(reason)
        if stmt_type in _CHANGES_SERVER:
            b.changes_server = True
        ctx: Ctx = ((), {}, 0, None)
        special = _STATEMENTS.get(stmt_type)
        if special is not None:
            special(b, fields, ctx)
        elif base is not None and ("ddl" in base or "dcl" in base):
            flags = _DDL | _NOEXEC if stmt_type in _DEFINES_ONLY else _DDL
            b.push(fields, ((), {}, flags, None))
        else:
            b.push(fields, ctx)
        b.run()
        return self._finish(b, stmt_type, text, location)

    def _finish(self, b: _Builder, stmt_type: str, text: str, location: int
                ) -> StatementFacts:
        effects = self.effects
        for name in b.functions:
            effect = effects.lookup(name)
            if effect is None:
                continue
            if effect.dangerous:
                b.danger(f"{name}(): {effect.dangerous}")
            if name not in b.called:
                continue
            if effect.effect == "write":
                b.kinds.add("write")
                b.changes_data = True
            elif effect.effect == "admin":
                b.kinds.add("admin")
                b.changes_server = True
        kinds = normalise_kinds(b.kinds)
        if "write" in kinds:
            b.changes_data = True
        if "ddl" in kinds or "dcl" in _BASE_KINDS.get(stmt_type, ()):
            b.changes_schema = True
        outputs: tuple[OutputColumn, ...] = ()
        if b.outputs is not None and b.outputs.columns:
            outputs = tuple(OutputColumn(name, frozenset(_flatten(sink)), direct)
                            for name, sink, direct in b.outputs.columns)
        if b.filter_refs:
            b.filter_columns.update(_flatten(b.filter_refs))
        unanalysable = b.unanalysable
        if b.executes is not None and unanalysable is None:
            unanalysable = (f"EXECUTE {b.executes}: the prepared statement is not known to "
                            "the gateway")
        return StatementFacts(
            text=text,
            statement_type=stmt_type,
            kinds=kinds,
            changes_data=b.changes_data,
            changes_schema=b.changes_schema,
            changes_server=b.changes_server,
            tables_read=_frozen(b.tables_read),
            tables_written=_frozen(b.tables_written),
            columns=_frozen(b.columns),
            columns_written=_frozen(b.columns_written),
            filter_columns=_frozen(b.filter_columns),
            output_columns=outputs,
            functions=_frozen(b.functions),
            functions_called=_frozen(b.called),
            operators=_frozen(b.operators),
            types=_frozen(b.types),
            unbounded=b.unbounded,
            dangerous=bool(b.reasons),
            dangerous_reasons=tuple(b.reasons),
            lexing_risk=tuple(b.lexing),
            resets_session=b.resets,
            row_locks=b.row_locks,
            unanalysable=unanalysable,
            wrapped=tuple(dict.fromkeys(w for w in b.wrapped if w != stmt_type)),
            prepares=b.prepares,
            executes=b.executes,
            deallocates=b.deallocates,
            notes=tuple(b.notes),
            location=location,
        )

    # -- bodies of functions -------------------------------------------------------------

    def body_facts(self, sql: str, depth: int) -> list[StatementFacts]:
        """Facts of SQL found inside a function body (for dangerous calls it makes)."""
        if depth >= MAX_BODY_DEPTH:
            return []
        try:
            return list(self._analyze(sql, depth + 1).statements)
        except RecursionError:
            return []

    def plpgsql_facts(self, create_text: str, depth: int
                      ) -> tuple[bool, list[StatementFacts]] | None:
        """(runs dynamic SQL, facts of each embedded statement) of a PL/pgSQL function.

        ``create_text`` is the whole CREATE FUNCTION statement; None when it does not parse.
        """
        try:
            raw = parse_plpgsql_json(create_text)
        except Exception:
            return None
        dynamic = any(marker in raw for marker in (
            '"PLpgSQL_stmt_dynexecute"', '"PLpgSQL_stmt_dynfors"', '"dynquery"'))
        try:
            tree = json.loads(raw)
        except RecursionError:
            return True, []
        queries: list[tuple[str, int]] = []
        work: list[Any] = [tree]
        while work:
            item = work.pop()
            if type(item) is list:
                work.extend(item)
            elif type(item) is dict:
                expr = item.get("PLpgSQL_expr")
                if expr is not None and "query" in expr:
                    queries.append((expr["query"], expr.get("parseMode", 0)))
                    continue
                work.extend(v for v in item.values() if type(v) in (dict, list))
        facts: list[StatementFacts] = []
        for query, mode in queries:
            if mode != 0:
                rhs = query.split(":=", 1)[1] if mode >= 3 and ":=" in query else query
                query = "SELECT " + rhs
            facts.extend(self.body_facts(query, depth))
        return dynamic, facts


_EMPTY: frozenset[str] = frozenset()


def _frozen(items: set[str]) -> frozenset[str]:
    return frozenset(items) if items else _EMPTY


def _failed(text: str, parse_error: str | None, unanalysable: str | None) -> Analysis:
    facts = StatementFacts(text=text.strip() or text, parse_error=parse_error,
                           unanalysable=unanalysable)
    return Analysis(text, (facts,), parse_error, unanalysable)


def _flatten(sink: list[Any]) -> set[str]:
    out: set[str] = set()
    seen: set[int] = set()
    work = list(sink)
    while work:
        item = work.pop()
        if type(item) is str:
            out.add(item)
            continue
        key = id(item.derived) * 31 + hash(item.name)
        if key in seen:
            continue
        seen.add(key)
        derived = item.derived
        if item.name is None:
            for cols in derived.cols.values():
                work.extend(cols)
            work.extend(derived.star)
        else:
            work.extend(derived.cols.get(item.name, ()))
            work.extend(derived.star)
    return out


# -- statement-specific handling -------------------------------------------------------


def _s_select(b: _Builder, s: dict[str, Any], ctx: Ctx) -> None:
    b.outputs = _Outputs()
    b.select(s, (ctx[0], ctx[1], ctx[2], b.outputs))


def _s_dml(b: _Builder, s: dict[str, Any], ctx: Ctx, kind: str) -> None:
    b.outputs = _Outputs()
    ctx = (ctx[0], ctx[1], ctx[2], b.outputs)
    getattr(b, kind)(s, ctx)


def _s_explain(b: _Builder, s: dict[str, Any], ctx: Ctx) -> None:
    query = s.get("query") or {}
    analyze = _explain_analyzes(s.get("options"))
    b.wrapped.extend(query.keys())
    flags = 0 if analyze else _NOEXEC
    if not analyze:
        b.notes.append("EXPLAIN without ANALYZE: the statement is planned, not run")
    b.push(query, ((), {}, flags, None))


def _s_copy(b: _Builder, s: dict[str, Any], ctx: Ctx) -> None:
    is_from = bool(s.get("is_from"))
    if s.get("is_program"):
        b.danger("COPY ... PROGRAM runs a program on the database server")
        b.kinds.add("admin")
        b.changes_server = True
    elif "filename" in s:
        b.danger("COPY with a file name reads or writes files on the database server")
    scope = _Scope()
    rel = s.get("relation")
    if rel:
        name = join_name(rel.get("schemaname"), rel.get("relname", ""))
        scope.aliases[rel.get("relname", "")] = name
        scope.tables.append(name)
        cols = _string_list(s.get("attlist")) or ["*"]
        if is_from:
            b.tables_written.add(name)
            b.kinds.add("write")
            b.changes_data = True
            b.columns_written.update(f"{name}.{quote_part(c)}" for c in cols)
        else:
            b.tables_read.add(name)
            b.kinds.add("read")
            b.outputs = _Outputs()
            for index, col in enumerate(cols):
                column = f"{name}.{quote_part(col)}"
                b.columns.add(column)
                b.outputs.sink(index, col, True).append(column)
    query = s.get("query")
    if query:
        b.wrapped.extend(query.keys())
        b.outputs = _Outputs()
        b.push(query, ((), {}, 0, b.outputs))
    b.push(s.get("whereClause"), ((scope,), {}, _FILTER, None))


def _s_prepare(b: _Builder, s: dict[str, Any], ctx: Ctx) -> None:
    b.prepares = s.get("name", "")
    query = s.get("query") or {}
    b.wrapped.extend(query.keys())
    b.outputs = _Outputs()
    b.push(query, ((), {}, 0, b.outputs))


def _s_execute(b: _Builder, s: dict[str, Any], ctx: Ctx) -> None:
    b.executes = s.get("name", "")
    b.push(s.get("params"), ctx)


def _s_declare(b: _Builder, s: dict[str, Any], ctx: Ctx) -> None:
    query = s.get("query") or {}
    b.wrapped.extend(query.keys())
    b.push(query, ctx)


def _s_ctas(b: _Builder, s: dict[str, Any], ctx: Ctx) -> None:
    into = s.get("into") or {}
    b.into(into, ctx)
    query = s.get("query") or {}
    b.wrapped.extend(query.keys())
    flags = _NOEXEC if into.get("skipData") else 0
    b.push(query, ((), {}, flags, None))


def _s_view(b: _Builder, s: dict[str, Any], ctx: Ctx) -> None:
    view = s.get("view") or {}
    b.tables_written.add(join_name(view.get("schemaname"), view.get("relname", "")))
    b.push(s.get("query"), ((), {}, _NOEXEC, None))


def _s_rule(b: _Builder, s: dict[str, Any], ctx: Ctx) -> None:
    rel = s.get("relation") or {}
    b.tables_written.add(join_name(rel.get("schemaname"), rel.get("relname", "")))
    scope = _Scope()
    scope.aliases["new"] = scope.aliases["old"] = join_name(rel.get("schemaname"),
                                                            rel.get("relname", ""))
    b.push(s.get("whereClause"), ((scope,), {}, _NOEXEC, None))
    b.push(s.get("actions"), ((scope,), {}, _NOEXEC, None))


def _s_trigger(b: _Builder, s: dict[str, Any], ctx: Ctx) -> None:
    rel = s.get("relation") or {}
    name = join_name(rel.get("schemaname"), rel.get("relname", ""))
    b.tables_written.add(name)
    b.functions.add(join_name(*_string_list(s.get("funcname"))))
    scope = _Scope()
    scope.aliases["new"] = scope.aliases["old"] = name
    b.push(s.get("whenClause"), ((scope,), {}, _NOEXEC, None))


def _s_function(b: _Builder, s: dict[str, Any], ctx: Ctx) -> None:
    options = _def_elems(s.get("options"))
    language_node = options.get("language")
    language = (language_node.get("String", {}).get("sval", "sql")
                if type(language_node) is dict else "sql").lower()
    if language not in b.analyzer.effects.trusted_languages:
        b.danger(f"creates a function in the untrusted language {language}")
    security = options.get("security")
    if type(security) is dict and security.get("Boolean", {}).get("boolval"):
        b.notes.append("SECURITY DEFINER: the function runs with its owner's rights")
    if "sql_body" in s:
        b.push(s["sql_body"], ((), {}, _NOEXEC, None))
    body_node = options.get("as")
    body = ""
    if type(body_node) is dict and "List" in body_node:
        items = _string_list(body_node["List"].get("items"))
        body = items[0] if items else ""
    elif type(body_node) is dict and "String" in body_node:
        body = body_node["String"].get("sval", "")
    inner: list[StatementFacts] = []
    if body and language == "sql":
        inner = b.analyzer.body_facts(body, b.depth)
    elif body and language == "plpgsql":
        parsed = b.analyzer.plpgsql_facts(b.text, b.depth)
        if parsed is None:
            b.notes.append("the PL/pgSQL body does not parse; the server will check it")
        dynamic, inner = parsed if parsed is not None else (False, [])
        if dynamic:
            b.danger("the function body runs dynamic SQL (EXECUTE) that the gateway cannot "
                     "inspect")
    _absorb_body(b, inner)


def _absorb_body(b: _Builder, inner: list[StatementFacts]) -> None:
    for facts in inner:
        for reason in facts.dangerous_reasons:
            # Calls found in the body are re-judged with the statement's own functions.
            if reason.partition("(): ")[0] not in facts.functions:
                b.danger(f"function body: {reason}")
        b.functions.update(facts.functions)
        if facts.unanalysable:
            b.notes.append(f"part of the function body could not be analysed: "
                           f"{facts.unanalysable}")


def _s_do(b: _Builder, s: dict[str, Any], ctx: Ctx) -> None:
    options = _def_elems(s.get("args"))
    language_node = options.get("language")
    language = (language_node.get("String", {}).get("sval", "plpgsql")
                if type(language_node) is dict else "plpgsql").lower()
    if language not in b.analyzer.effects.trusted_languages:
        b.danger(f"runs code in the untrusted language {language}")
    b.kinds.update(("write", "ddl"))


def _s_set(b: _Builder, s: dict[str, Any], ctx: Ctx) -> None:
    kind = s.get("kind", "")
    name = s.get("name", "")
    if kind == "VAR_RESET_ALL":
        b.resets = True
        b.lexing_risk(f"RESET ALL {RESET_REASON}")
        return
    if kind == "VAR_SET_MULTI":
        if name.upper().startswith("TRANSACTION") or name.upper() == "SESSION CHARACTERISTICS":
            b.kinds.discard("utility")
            b.kinds.add("tcl")
        return
    reset = kind in ("VAR_RESET", "VAR_SET_DEFAULT")
    args = s.get("args") or ()
    value = _constant(args[0]) if len(args) == 1 else None
    if len(args) > 1:
        value = ",".join(_constant(a) or "" for a in args)
    if kind == "VAR_SET_CURRENT":
        value = None
    b.setting_change(name, value, reset)
    if name.lower() == "search_path":
        b.notes.append("search_path changes how unqualified names resolve")


def _s_alter_db_set(b: _Builder, s: dict[str, Any], ctx: Ctx) -> None:
    _s_set(b, s.get("setstmt") or {}, ctx)
    b.kinds.discard("utility")
    b.resets = False


def _s_discard(b: _Builder, s: dict[str, Any], ctx: Ctx) -> None:
    if s.get("target") == "DISCARD_ALL":
        b.resets = True
        b.deallocates = "*"
        b.lexing_risk(f"DISCARD ALL {RESET_REASON}")


def _s_deallocate(b: _Builder, s: dict[str, Any], ctx: Ctx) -> None:
    b.deallocates = "*" if s.get("isall") or not s.get("name") else s["name"]


def _s_transaction(b: _Builder, s: dict[str, Any], ctx: Ctx) -> None:
    if s.get("kind") in ("TRANS_STMT_PREPARE", "TRANS_STMT_COMMIT_PREPARED",
                         "TRANS_STMT_ROLLBACK_PREPARED"):
        b.kinds.add("admin")
        b.notes.append("two-phase commit outlives the session")


def _s_truncate(b: _Builder, s: dict[str, Any], ctx: Ctx) -> None:
    for item in s.get("relations", ()):
        rv = item.get("RangeVar", {})
        name = join_name(rv.get("schemaname"), rv.get("relname", ""))
        b.tables_written.add(name)
        b.columns_written.add(f"{name}.*")
    b.unbounded = True
    b.changes_data = True


def _s_refresh(b: _Builder, s: dict[str, Any], ctx: Ctx) -> None:
    rv = s.get("relation") or {}
    b.tables_written.add(join_name(rv.get("schemaname"), rv.get("relname", "")))


def _s_drop(b: _Builder, s: dict[str, Any], ctx: Ctx) -> None:
    remove = s.get("removeType", "")
    if s.get("behavior") == "DROP_CASCADE":
        b.notes.append("CASCADE also drops everything that depends on these objects")
    for obj in s.get("objects", ()):
        if remove in _TABLE_OBJECTS:
            names = _names_of(obj)
            if names:
                b.tables_written.add(join_name(*names[-2:]))
        elif remove in ("OBJECT_FUNCTION", "OBJECT_PROCEDURE", "OBJECT_ROUTINE"):
            owa = obj.get("ObjectWithArgs", {}) if type(obj) is dict else {}
            names = _string_list(owa.get("objname"))
            if names:
                b.functions.add(join_name(*names))
        elif remove == "OBJECT_SCHEMA":
            names = _names_of(obj)
            if names:
                b.tables_written.add(join_name(names[-1], "*"))
    if remove == "OBJECT_EXTENSION":
        b.notes.append("drops an extension")


_ACCESS_CONTROL_CMDS = frozenset({"AT_ChangeOwner", "AT_EnableRowSecurity",
                                  "AT_DisableRowSecurity", "AT_ForceRowSecurity",
                                  "AT_NoForceRowSecurity"})


def _s_alter_table(b: _Builder, s: dict[str, Any], ctx: Ctx) -> None:
    for item in s.get("cmds", ()):
        if item.get("AlterTableCmd", {}).get("subtype") in _ACCESS_CONTROL_CMDS:
            b.kinds.add("dcl")
    b.push(s, ((), {}, _DDL, None))


def _s_call(b: _Builder, s: dict[str, Any], ctx: Ctx) -> None:
    b.notes.append("procedures can read, write and commit; CALL is treated as a write")
    call = s.get("funccall")
    if call:
        b.func_call(call, ctx)


def _s_notify(b: _Builder, s: dict[str, Any], ctx: Ctx) -> None:
    b.changes_data = False


_STATEMENTS = {
    "SelectStmt": _s_select,
    "InsertStmt": lambda b, s, ctx: _s_dml(b, s, ctx, "insert"),
    "UpdateStmt": lambda b, s, ctx: _s_dml(b, s, ctx, "update"),
    "DeleteStmt": lambda b, s, ctx: _s_dml(b, s, ctx, "delete"),
    "MergeStmt": lambda b, s, ctx: _s_dml(b, s, ctx, "merge"),
    "ExplainStmt": _s_explain,
    "CopyStmt": _s_copy,
    "PrepareStmt": _s_prepare,
    "ExecuteStmt": _s_execute,
    "DeclareCursorStmt": _s_declare,
    "CreateTableAsStmt": _s_ctas,
    "ViewStmt": _s_view,
    "RuleStmt": _s_rule,
    "CreateTrigStmt": _s_trigger,
    "CreateFunctionStmt": _s_function,
    "DoStmt": _s_do,
    "VariableSetStmt": _s_set,
    "AlterDatabaseSetStmt": _s_alter_db_set,
    "AlterRoleSetStmt": _s_alter_db_set,
    "DiscardStmt": _s_discard,
    "DeallocateStmt": _s_deallocate,
    "TransactionStmt": _s_transaction,
    "TruncateStmt": _s_truncate,
    "RefreshMatViewStmt": _s_refresh,
    "DropStmt": _s_drop,
    "CallStmt": _s_call,
    "AlterTableStmt": _s_alter_table,
    "NotifyStmt": _s_notify,
}

"""The walk over libpg_query's JSON parse tree that collects a statement's facts.

Iterative (an explicit stack, no Python recursion), over plain dicts and lists. A node is
``{"TypeName": {fields}}``; fields whose C type is a specific struct (``RangeVar
*relation``, ``Alias *alias``, ...) are emitted without the wrapper; false, zero and empty
fields are omitted. Each stack entry carries a context: the FROM scopes in force (for
column resolution), the CTE names visible, flags (in a filter, not executed now, a DDL
object) and a sink that collects the source columns of the result column being computed.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from hoopops.sql.facts import join_name, quote_part

if TYPE_CHECKING:
    from hoopops.sql.analyzer import Analyzer

RESET_REASON = ("returns standard_conforming_strings and client_encoding to the session's "
                "defaults, which the gateway has not verified")

_FILTER = 1  # inside WHERE / JOIN ON / GROUP BY / ORDER BY / HAVING / window / LIMIT
_NOEXEC = 2  # defined or explained, not run now (CREATE VIEW, EXPLAIN without ANALYZE)
_DDL = 4  # relations met here are objects being changed

_TRUE_WORDS = frozenset({"on", "t", "tr", "tru", "true", "y", "ye", "yes", "1"})
_FALSE_WORDS = frozenset({"off", "of", "f", "fa", "fal", "fals", "false", "n", "no", "0"})
_UTF8_NAMES = frozenset({"utf8", "unicode"})
_LEXING_SETTINGS = frozenset({"standard_conforming_strings", "client_encoding"})
# Settings that only tune this session's own planning, time-outs and output formats.
# Drivers change them through set_config() (asyncpg turns JIT off around its type
# introspection); doing so is no more a write than the equivalent SET statement.
_SESSION_KNOBS = frozenset({
    "jit", "statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout",
    "idle_session_timeout", "application_name", "work_mem", "extra_float_digits",
    "datestyle", "timezone", "intervalstyle", "bytea_output",
})

# SELECT clauses whose columns decide which rows come back rather than what they show.
_FILTER_CLAUSES = frozenset({"whereClause", "havingClause", "groupClause", "sortClause",
                             "windowClause", "distinctClause", "limitCount", "limitOffset"})
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
        # set_config() is a side effect, unless every call sets a harmless session knob
        # (what `SET name = value` would set, which policies treat as session utility).
        self.set_config_calls = 0
        self.set_config_unsafe = False
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

    def range_var(self, rv: dict[str, Any], ctx: Ctx, scope: _Scope | None = None) -> None:
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
                   deferred: list[tuple[Any, int, Any]]) -> None:
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
                    deferred.append((value["quals"], _FILTER, None))
                for using in value.get("usingClause", ()):
                    col = using.get("String", {}).get("sval", "")
                    deferred.append(({"ColumnRef": {"fields": [{"String": {"sval": col}}]}},
                                     _FILTER, None))
            elif key == "RangeSubselect":
                derived = _Derived()
                alias = value.get("alias")
                if alias:
                    scope.aliases[alias.get("aliasname", "")] = derived
                scope.derived.append(derived)
                deferred.append((value.get("subquery"), 0, derived))
            elif key == "RangeTableSample":
                work.append(value.get("relation"))
                deferred.append(([value.get("args"), value.get("repeatable")], 0, None))
            elif key == "RangeFunction":
                derived = _Derived()
                alias = value.get("alias")
                if alias:
                    scope.aliases[alias.get("aliasname", "")] = derived
                scope.derived.append(derived)
                deferred.append((value.get("functions"), 0, None))
            else:
                derived = _Derived()
                alias = value.get("alias") if type(value) is dict else None
                if alias:
                    scope.aliases[alias.get("aliasname", "")] = derived
                scope.derived.append(derived)
                deferred.append((value, 0, None))

    def push_deferred(self, deferred: list[tuple[Any, int, Any]], ctx: Ctx) -> None:
        scopes, ctes, flags, _sink = ctx
        for node, extra, sink in deferred:
            self.push(node, (scopes, ctes, flags | extra, sink))

    def targets(self, targets: list[Any] | None, ctx: Ctx) -> None:
        """Push a target list, giving each output column its own sink when tracked."""
        if not targets:
            return
        sink = ctx[3]
        scopes, ctes, flags, _ = ctx
        if type(sink) is _Outputs or type(sink) is _Derived:
            for index, item in enumerate(targets):
                rt = item.get("ResTarget", item)
                val = rt.get("val")
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
        deferred: list[tuple[Any, int, Any]] = []
        self.from_items(s.get("fromClause"), ctx, scope, deferred)
        inner: Ctx = ((*scopes, scope), ctes, flags, sink)
        self.push_deferred(deferred, inner)
        if "valuesLists" in s:
            self.values(s["valuesLists"], inner)
        self.targets(s.get("targetList"), inner)
        plain = (inner[0], ctes, flags | _FILTER, None)
        stack = self.stack
        for key, value in s.items():
            if key in _FILTER_CLAUSES and value:
                stack.append((value, plain))
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
            if relname.lower() == "pg_settings" and \
                    rv.get("schemaname", "pg_catalog").lower() == "pg_catalog":
                # pg_settings' update rule calls set_config() with values the text hides.
                self.lexing_risk("writing pg_settings changes session settings (like SET) "
                                 "in a way the gateway cannot follow")
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
        deferred: list[tuple[Any, int, Any]] = []
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
        deferred: list[tuple[Any, int, Any]] = []
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
        deferred: list[tuple[Any, int, Any]] = []
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
        self.set_config_calls += 1
        # Any value of a session knob is harmless (asyncpg restores jit with a parameter);
        # what must be known is which setting changes.
        if setting is None or setting.lower() not in _SESSION_KNOBS:
            self.set_config_unsafe = True
        if setting is None:
            self.danger("set_config() with a setting name the gateway cannot see")
            self.lexing_risk("set_config() with a setting name the gateway cannot see")
            return
        self.setting_change(setting, value, reset=False)


# -- node handlers without a builder method ---------------------------------------------


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


# Handlers take (builder, fields, ctx); unbound methods save a call per node.
_HANDLERS: dict[str, Any] = {
    "SelectStmt": _Builder.select,
    "InsertStmt": _Builder.insert,
    "UpdateStmt": _Builder.update,
    "DeleteStmt": _Builder.delete,
    "MergeStmt": _Builder.merge,
    "ColumnRef": _Builder.column_ref,
    "FuncCall": _Builder.func_call,
    "A_Expr": _Builder.a_expr,
    "RangeVar": _Builder.range_var,
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


_EMPTY: frozenset[str] = frozenset()


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

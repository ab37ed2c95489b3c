"""Consult the server's catalog so that names are judged by what they are, not how they look.

A call to ``innocent()`` may be a user function that deletes rows; ``SELECT * FROM
report`` may read a view that calls one; an INSERT may fire triggers; a user-defined
operator is a function call in disguise; and ``search_path`` decides which of several
same-named objects a bare name means. :class:`SqlCatalog` looks those objects up (asyncpg,
on the gateway's service credential), caches what it learns, and makes the facts
stronger:

* a user-defined function (OID above the built-in range) that is volatile, a procedure,
  or written in an untrusted language, is a write; the bodies of SQL and PL/pgSQL
  functions are analysed for dangerous calls and for the functions they call in turn;
* views (their rewrite rules), row-level security policies, rules, triggers and column
  defaults contribute the functions they call, judged the same way;
* an unqualified name counts every object of that name in every schema the search path
  could reach (all schemas unless the caller knows the session's search path).

Any lookup failure fails closed: every statement of the analysis becomes
``unanalysable`` and is refused.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from hoopops.sql import Analysis, Analyzer, StatementFacts, default_analyzer, split_name
from hoopops.sql.facts import add_effects

FIRST_NORMAL_OID = 16384  # objects below this OID ship with PostgreSQL itself
WRITE_KINDS = frozenset({"write", "ddl", "dcl", "admin"})

_FUNCS_BY_NAME = """
SELECT p.oid, n.nspname, p.proname, p.provolatile, p.prokind, l.lanname, p.prosecdef,
       CASE WHEN p.oid < 16384 OR p.prokind = 'a' THEN NULL
            WHEN l.lanname = 'plpgsql' THEN pg_get_functiondef(p.oid)
            WHEN l.lanname = 'sql' THEN coalesce(nullif(p.prosrc, ''), pg_get_functiondef(p.oid))
       END AS src,
       (SELECT array_remove(ARRAY[a.aggtransfn::oid, a.aggfinalfn::oid, a.aggcombinefn::oid,
                                  a.aggmtransfn::oid, a.aggminvtransfn::oid,
                                  a.aggmfinalfn::oid], 0::oid)
        FROM pg_aggregate a WHERE a.aggfnoid = p.oid) AS parts
FROM pg_proc p
JOIN pg_namespace n ON n.oid = p.pronamespace
JOIN pg_language l ON l.oid = p.prolang
WHERE p.proname = ANY($1::text[])
"""
_FUNCS_BY_OID = _FUNCS_BY_NAME.replace("p.proname = ANY($1::text[])", "p.oid = ANY($1::oid[])")
_RELS_BY_NAME = """
SELECT c.oid, n.nspname, c.relname, c.relkind, c.relhasrules, c.relhastriggers,
       c.relrowsecurity
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relname = ANY($1::text[]) AND c.relkind IN ('r', 'v', 'm', 'f', 'p')
"""
_RELS_BY_OID = _RELS_BY_NAME.replace("c.relname = ANY($1::text[])", "c.oid = ANY($1::oid[])")
# Functions that run when a value is cast to a type: user-defined casts, the type's own
# input function, and functions used by a domain's constraints.
_TYPE_FUNCS = """
SELECT t.typname, c.castfunc::oid AS func
FROM pg_type t JOIN pg_cast c ON c.casttarget = t.oid
WHERE t.typname = ANY($1::text[]) AND c.castfunc::oid >= 16384
UNION
SELECT t.typname, t.typinput::oid
FROM pg_type t
WHERE t.typname = ANY($1::text[]) AND t.typinput::oid >= 16384
UNION
SELECT t.typname, d.refobjid
FROM pg_type t
JOIN pg_constraint con ON con.contypid IN (t.oid, t.typbasetype)
JOIN pg_depend d ON d.classid = 'pg_constraint'::regclass AND d.objid = con.oid
WHERE t.typname = ANY($1::text[]) AND d.refclassid = 'pg_proc'::regclass
"""
_OPERATORS = """
SELECT o.oprname, o.oprcode::oid AS func
FROM pg_operator o
WHERE o.oprname = ANY($1::text[]) AND o.oid >= 16384 AND o.oprcode <> 0
"""
# What runs when a relation is read or written: rule actions (views are ON SELECT rules),
# triggers, row security policies and column defaults, as function OIDs (operators
# resolved to their functions) plus the relations rule actions touch.
_RELATION_DEPS = """
SELECT r.ev_class AS relid,
       CASE WHEN r.ev_type = '1' THEN 'select' ELSE 'write' END AS mode,
       CASE WHEN d.refclassid = 'pg_class'::regclass THEN 'rel' ELSE 'func' END AS what,
       CASE WHEN d.refclassid = 'pg_operator'::regclass
            THEN (SELECT o.oprcode::oid FROM pg_operator o WHERE o.oid = d.refobjid)
            ELSE d.refobjid END AS oid
FROM pg_rewrite r
JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
WHERE r.ev_class = ANY($1::oid[])
  AND d.refclassid IN ('pg_proc'::regclass, 'pg_class'::regclass, 'pg_operator'::regclass)
  AND d.refobjid <> r.ev_class
UNION
SELECT t.tgrelid, 'trigger', 'func', t.tgfoid
FROM pg_trigger t
WHERE t.tgrelid = ANY($1::oid[]) AND NOT t.tgisinternal AND t.tgenabled <> 'D'
UNION
SELECT p.polrelid, 'policy', 'func', d.refobjid
FROM pg_policy p
JOIN pg_depend d ON d.classid = 'pg_policy'::regclass AND d.objid = p.oid
WHERE p.polrelid = ANY($1::oid[]) AND d.refclassid = 'pg_proc'::regclass
UNION
SELECT a.adrelid, 'default', 'func', d.refobjid
FROM pg_attrdef a
JOIN pg_depend d ON d.classid = 'pg_attrdef'::regclass AND d.objid = a.oid
WHERE a.adrelid = ANY($1::oid[]) AND d.refclassid = 'pg_proc'::regclass
"""


@dataclass(frozen=True)
class _Func:
    oid: int
    schema: str
    name: str
    volatility: str
    kind: str
    language: str
    security_definer: bool
    source: str | None
    parts: tuple[int, ...] = ()  # an aggregate's transition/final functions

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass(frozen=True)
class _Rel:
    oid: int
    schema: str
    name: str
    relkind: str
    has_rules: bool
    has_triggers: bool
    row_security: bool

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass
class _Deps:
    funcs: dict[str, set[int]] = field(default_factory=dict)  # mode -> function OIDs
    rels: dict[str, set[int]] = field(default_factory=dict)  # mode -> relation OIDs


@dataclass(frozen=True)
class Effect:
    """What reaching an object can do beyond what the statement's own text shows."""

    writes: bool = False
    reasons: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    functions: frozenset[str] = frozenset()

    def __or__(self, other: Effect) -> Effect:
        return Effect(self.writes or other.writes,
                      tuple(dict.fromkeys((*self.reasons, *other.reasons))),
                      tuple(dict.fromkeys((*self.notes, *other.notes))),
                      self.functions | other.functions)


NO_EFFECT = Effect()


class CatalogError(Exception):
    pass


Connector = Callable[[], Awaitable[Any]]


class SqlCatalog:
    """Cached catalog lookups that make statement facts reflect what names really are.

    ``connect`` is an async callable returning an asyncpg Connection or Pool (service
    credential). One Connection is used under a lock; a Pool is used as is. Cached
    entries live ``ttl`` seconds; call :meth:`invalidate` after DDL ran.
    """

    def __init__(self, connect: Connector, *, ttl: float = 30.0, timeout: float = 5.0,
                 max_depth: int = 4, analyzer: Analyzer | None = None) -> None:
        self._connect = connect
        self._conn: Any = None
        self.ttl = ttl
        self.timeout = timeout
        self.max_depth = max_depth
        self.analyzer = analyzer or default_analyzer()
        self._lock = asyncio.Lock()
        self._loaded_at = time.monotonic()
        self._funcs_by_name: dict[str, list[_Func]] = {}
        self._funcs_by_oid: dict[int, _Func] = {}
        self._rels_by_name: dict[str, list[_Rel]] = {}
        self._rels_by_oid: dict[int, _Rel] = {}
        self._ops: dict[str, list[int]] = {}
        self._types: dict[str, list[int]] = {}
        self._deps: dict[int, _Deps] = {}
        self._func_effects: dict[int, Effect] = {}
        self._rel_effects: dict[tuple[int, str], Effect] = {}
        self.lookups = 0  # round trips made (for tests and the console)

    def invalidate(self) -> None:
        """Forget everything (after DDL, or when objects may have changed)."""
        self._funcs_by_name.clear()
        self._funcs_by_oid.clear()
        self._rels_by_name.clear()
        self._rels_by_oid.clear()
        self._ops.clear()
        self._types.clear()
        self._deps.clear()
        self._func_effects.clear()
        self._rel_effects.clear()
        self._loaded_at = time.monotonic()

    # -- public --------------------------------------------------------------------------

    async def enrich(self, analysis: Analysis, search_path: str | None = None) -> Analysis:
        """``analysis`` with catalog knowledge added; fails closed on any lookup error."""
        todo = [st for st in analysis.statements
                if st.parse_error is None and st.unanalysable is None
                and (st.functions_called or st.operators or st.tables_read
                     or st.tables_written or st.types)]
        if not todo:
            return analysis
        if time.monotonic() - self._loaded_at > self.ttl:
            self.invalidate()
        path = _parse_search_path(search_path)
        try:
            async with asyncio.timeout(self.timeout):
                await self._load_names(todo)
                out: list[StatementFacts] = []
                changed = False
                for facts in analysis.statements:
                    new = facts
                    if facts in todo:
                        new = await self._enrich_statement(facts, path)
                    changed = changed or new is not facts
                    out.append(new)
        except Exception as exc:
            self._conn = None
            reason = (f"the catalog could not be consulted ({type(exc).__name__}: {exc}); "
                      "statements are refused until it can be")
            return analysis.with_statements(
                [st if st.unanalysable else st.replace(unanalysable=reason)
                 for st in analysis.statements])
        return analysis.with_statements(out) if changed else analysis

    # -- judging -------------------------------------------------------------------------

    async def _enrich_statement(self, facts: StatementFacts, path: list[str] | None
                                ) -> StatementFacts:
        effect = NO_EFFECT
        for name in facts.functions_called:
            for func in self._candidates_func(name, path):
                effect = effect | await self._function_effect(func, 0)
        for op in facts.operators:
            parts = split_name(op)
            for oid in self._ops.get(parts[-1], ()):
                func = await self._func_by_oid(oid)
                if func is not None:
                    effect = effect | await self._function_effect(func, 0)
        for name in facts.types:
            for oid in self._types.get(split_name(name)[-1], ()):
                func = await self._func_by_oid(oid)
                if func is not None:
                    effect = effect | await self._function_effect(func, 0)
        for name in facts.tables_read:
            for rel in self._candidates_rel(name, path):
                effect = effect | await self._relation_effect(rel, "read", 0)
        for name in facts.tables_written:
            for rel in self._candidates_rel(name, path):
                effect = effect | await self._relation_effect(rel, "write", 0)
        if effect == NO_EFFECT:
            return facts
        new = add_effects(facts, effect="write" if effect.writes else None,
                          reasons=effect.reasons, notes=effect.notes)
        extra = effect.functions - facts.functions
        if extra:
            new = new.replace(functions=new.functions | extra,
                              functions_called=new.functions_called | extra)
        return new

    async def _function_effect(self, func: _Func, depth: int) -> Effect:
        if func.oid < FIRST_NORMAL_OID:
            return self._builtin_effect(func)
        known = self._func_effects.get(func.oid)
        if known is not None:
            return known
        # Recursive functions meet themselves: their own body is being judged already.
        self._func_effects[func.oid] = NO_EFFECT
        name = func.qualified
        effects = self.analyzer.effects
        writes = False
        reasons: list[str] = []
        notes: list[str] = []
        functions = {name}
        if func.kind == "p":
            writes = True
            notes.append(f"{name} is a procedure")
        if func.volatility == "v" and not effects.is_volatile_safe(func.name):
            writes = True
            notes.append(f"{name} is a volatile user-defined function (treated as a write)")
        language = func.language
        if language not in effects.trusted_languages and language not in ("c", "internal"):
            writes = True
            notes.append(f"{name} is written in the untrusted language {language}")
        if func.security_definer:
            notes.append(f"{name} runs with its owner's rights (SECURITY DEFINER)")
        for oid in func.parts:
            part = await self._func_by_oid(oid)
            if part is not None and part.oid != func.oid:
                inner = await self._function_effect(part, depth + 1)
                writes = writes or inner.writes
                reasons.extend(inner.reasons)
                notes.extend(inner.notes)
                functions |= inner.functions
        if func.source is not None:
            if depth >= self.max_depth:
                writes = True
                notes.append(f"{name} calls functions nested too deeply to follow")
            else:
                body = await self._body_effect(func, depth)
                writes = writes or body.writes
                reasons.extend(body.reasons)
                notes.extend(body.notes)
                functions |= body.functions
        effect = Effect(writes, tuple(dict.fromkeys(reasons)), tuple(dict.fromkeys(notes)),
                        frozenset(functions))
        self._func_effects[func.oid] = effect
        return effect

    def _builtin_effect(self, func: _Func) -> Effect:
        """A built-in reached through a view, trigger, cast...: judged by the shipped table."""
        effect = self.analyzer.effects.lookup(func.name)
        if effect is None:
            return NO_EFFECT
        reasons = (f"{func.qualified}(): {effect.dangerous}",) if effect.dangerous else ()
        return Effect(effect.effect in ("write", "admin"), reasons, (),
                      frozenset({func.qualified}))

    async def _body_effect(self, func: _Func, depth: int) -> Effect:
        name = func.qualified
        source = func.source or ""
        analyzer = self.analyzer
        notes: list[str] = []
        writes = False
        facts_list: list[StatementFacts] = []
        if func.language == "plpgsql":
            # The source is the whole CREATE FUNCTION (pg_get_functiondef), which is what
            # the PL/pgSQL parser needs to know the return type, trigger variables, etc.
            parsed = analyzer.plpgsql_facts(source, 0)
            if parsed is None:
                writes = True
                notes.append(f"the body of {name} could not be analysed (treated as a write)")
            else:
                dynamic, facts_list = parsed
                if dynamic:
                    writes = True
                    notes.append(f"{name} runs dynamic SQL (treated as a write)")
        else:
            facts_list = analyzer.body_facts(source, 0)
        reasons: list[str] = []
        called: set[str] = set()
        for facts in facts_list:
            if facts.parse_error or facts.unanalysable:
                writes = True
                notes.append(f"part of the body of {name} could not be analysed")
                continue
            # A BEGIN ATOMIC body comes back as its CREATE FUNCTION: judge what is inside.
            if facts.statement_type != "CreateFunctionStmt" and \
                    not WRITE_KINDS.isdisjoint(facts.kinds):
                writes = True
            for reason in facts.dangerous_reasons:
                reasons.append(f"{name}: {reason}")
            for fn in facts.functions:
                effect = analyzer.effects.lookup(fn)
                if effect is not None and effect.effect in ("write", "admin"):
                    writes = True
            called |= facts.functions
        effect = Effect(writes, tuple(reasons), tuple(notes), frozenset())
        missing = {split_name(n)[-1] for n in called} - set(self._funcs_by_name)
        if missing:
            await self._fetch_funcs_by_name(missing)
        for fn in called:
            for inner in self._candidates_func(fn, None):
                if inner.oid != func.oid:
                    effect = effect | await self._function_effect(inner, depth + 1)
        return effect

    async def _relation_effect(self, rel: _Rel, mode: str, depth: int) -> Effect:
        if rel.oid < FIRST_NORMAL_OID:
            return NO_EFFECT
        key = (rel.oid, mode)
        known = self._rel_effects.get(key)
        if known is not None:
            return known
        self._rel_effects[key] = NO_EFFECT
        name = rel.qualified
        notes: list[str] = []
        if rel.relkind == "f":
            notes.append(f"{name} is a foreign table (its data lives on another server)")
        deps = await self._relation_deps(rel)
        if mode == "read":
            func_modes = ("select", "policy")
            rel_modes = ("select",)
        else:
            func_modes = ("select", "write", "trigger", "policy", "default")
            rel_modes = ("select", "write")
            if deps.funcs.get("trigger"):
                notes.append(f"writing {name} fires triggers")
            if deps.funcs.get("write") or deps.rels.get("write"):
                notes.append(f"{name} has rules that rewrite writes to it")
        effect = Effect(notes=tuple(notes))
        for func_mode in func_modes:
            for oid in sorted(deps.funcs.get(func_mode, ())):
                func = await self._func_by_oid(oid)
                if func is not None:
                    effect = effect | await self._function_effect(func, depth)
        if depth < self.max_depth:
            for rel_mode in rel_modes:
                for oid in sorted(deps.rels.get(rel_mode, ())):
                    inner = await self._rel_by_oid(oid)
                    if inner is not None:
                        effect = effect | await self._relation_effect(inner, mode, depth + 1)
        self._rel_effects[key] = effect
        return effect

    # -- candidates ----------------------------------------------------------------------

    def _candidates_func(self, name: str, path: list[str] | None) -> list[_Func]:
        parts = split_name(name)
        found = self._funcs_by_name.get(parts[-1], [])
        return _narrow(found, parts, path)

    def _candidates_rel(self, name: str, path: list[str] | None) -> list[_Rel]:
        parts = split_name(name)
        if parts[-1] == "*":
            return []
        found = self._rels_by_name.get(parts[-1], [])
        return _narrow(found, parts, path)

    # -- loading -------------------------------------------------------------------------

    async def _load_names(self, statements: Iterable[StatementFacts]) -> None:
        funcs: set[str] = set()
        rels: set[str] = set()
        ops: set[str] = set()
        types: set[str] = set()
        for facts in statements:
            types.update(split_name(n)[-1] for n in facts.types)
            funcs.update(split_name(n)[-1] for n in facts.functions_called)
            rels.update(split_name(n)[-1] for n in facts.tables_read | facts.tables_written)
            ops.update(split_name(n)[-1] for n in facts.operators)
        funcs -= self._funcs_by_name.keys()
        rels.discard("*")
        rels -= self._rels_by_name.keys()
        ops -= self._ops.keys()
        types -= self._types.keys()
        if types:
            for row in await self._fetch(_TYPE_FUNCS, sorted(types)):
                self._types.setdefault(row["typname"], []).append(int(row["func"]))
            for name in types:
                self._types.setdefault(name, [])
            await self._prefetch_funcs(o for name in types for o in self._types[name])
        if funcs:
            await self._fetch_funcs_by_name(funcs)
        if rels:
            for row in await self._fetch(_RELS_BY_NAME, sorted(rels)):
                rel = _rel(row)
                self._rels_by_name.setdefault(rel.name, []).append(rel)
                self._rels_by_oid[rel.oid] = rel
            for name in rels:
                self._rels_by_name.setdefault(name, [])
        if ops:
            for row in await self._fetch(_OPERATORS, sorted(ops)):
                self._ops.setdefault(row["oprname"], []).append(int(row["func"]))
            for name in ops:
                self._ops.setdefault(name, [])
            await self._prefetch_funcs(o for name in ops for o in self._ops[name])

    async def _fetch_funcs_by_name(self, names: set[str]) -> None:
        for row in await self._fetch(_FUNCS_BY_NAME, sorted(names)):
            func = _func(row)
            self._funcs_by_name.setdefault(func.name, []).append(func)
            self._funcs_by_oid[func.oid] = func
        for name in names:
            self._funcs_by_name.setdefault(name, [])

    async def _prefetch_funcs(self, oids: Iterable[int]) -> None:
        missing = sorted(set(oids) - self._funcs_by_oid.keys())
        if missing:
            for row in await self._fetch(_FUNCS_BY_OID, missing):
                func = _func(row)
                self._funcs_by_oid[func.oid] = func

    async def _func_by_oid(self, oid: int) -> _Func | None:
        if oid not in self._funcs_by_oid:
            rows = await self._fetch(_FUNCS_BY_OID, [oid])
            if not rows:
                return None
            func = _func(rows[0])
            self._funcs_by_oid[oid] = func
        return self._funcs_by_oid[oid]

    async def _rel_by_oid(self, oid: int) -> _Rel | None:
        if oid not in self._rels_by_oid:
            rows = await self._fetch(_RELS_BY_OID, [oid])
            if not rows:
                return None
            self._rels_by_oid[oid] = _rel(rows[0])
        return self._rels_by_oid[oid]

    async def _relation_deps(self, rel: _Rel) -> _Deps:
        deps = self._deps.get(rel.oid)
        if deps is None:
            deps = _Deps()
            for row in await self._fetch(_RELATION_DEPS, [rel.oid]):
                if row["oid"] is None:
                    continue
                target = deps.rels if row["what"] == "rel" else deps.funcs
                target.setdefault(row["mode"], set()).add(int(row["oid"]))
            await self._prefetch_funcs(set().union(*deps.funcs.values()) if deps.funcs
                                       else set())
            self._deps[rel.oid] = deps
        return deps

    async def _fetch(self, query: str, arg: list[Any]) -> list[Any]:
        async with self._lock:
            if self._conn is None:
                self._conn = await self._connect()
                if self._conn is None:
                    raise CatalogError("no catalog connection")
            self.lookups += 1
            return list(await self._conn.fetch(query, arg))


def _char(value: Any) -> str:
    # asyncpg returns PostgreSQL's one-byte "char" type as bytes.
    return value.decode() if isinstance(value, bytes) else str(value)


def _func(row: Any) -> _Func:
    return _Func(int(row["oid"]), row["nspname"], row["proname"], _char(row["provolatile"]),
                 _char(row["prokind"]), row["lanname"], bool(row["prosecdef"]), row["src"],
                 tuple(int(o) for o in row["parts"] or ()))


def _rel(row: Any) -> _Rel:
    return _Rel(int(row["oid"]), row["nspname"], row["relname"], _char(row["relkind"]),
                bool(row["relhasrules"]), bool(row["relhastriggers"]),
                bool(row["relrowsecurity"]))


def _narrow(found: list[Any], parts: tuple[str, ...], path: list[str] | None) -> list[Any]:
    if len(parts) >= 2:
        schema = parts[-2]
        if schema == "pg_temp":
            return [o for o in found if o.schema.startswith("pg_temp")]
        return [o for o in found if o.schema == schema]
    if path is None:
        return list(found)
    return [o for o in found if o.schema in path or o.schema == "pg_catalog"
            or o.schema.startswith("pg_temp")]


def _parse_search_path(value: str | None) -> list[str] | None:
    """Schemas of a search_path setting; None when unknown or when it names ``$user``."""
    if not value:
        return None
    schemas = []
    for raw in value.split(","):
        item = raw.strip()
        if item.startswith('"') and item.endswith('"') and len(item) >= 2:
            item = item[1:-1].replace('""', '"')
        else:
            item = item.lower()
        if item == "$user":
            return None
        if item:
            schemas.append(item)
    return schemas

"""Consult the server's catalog so that names are judged by what they are, not how they look.

A call to ``innocent()`` may be a user function that deletes rows; ``SELECT * FROM
report`` may read a view that calls one; an INSERT may fire triggers; a user-defined
operator, aggregate, cast or domain check is a function call in disguise; and
``search_path`` decides which of several same-named objects a bare name means.
:class:`SqlCatalog` looks those objects up (asyncpg, on the gateway's service credential),
caches what it learns, and makes the facts stronger:

* a user-defined function (OID above the built-in range) that is volatile, a procedure,
  or written in an untrusted language, is a write; the bodies of SQL and PL/pgSQL
  functions are analysed for side effects, dangerous calls, dynamic SQL and the functions
  they call in turn; built-ins reached this way are judged by the shipped side-effect
  table;
* views and rules (by their definitions), row-level security policies, column defaults,
  triggers, aggregates' transition functions, casts, type input functions and domain
  constraints contribute the functions they call, judged the same way;
* an unqualified name counts every object of that name in every schema the search path
  could reach (all schemas unless the caller knows the session's search path).

Definitions are read as text (``pg_get_ruledef``, ``pg_get_expr``, ...) and analysed with
the same analyser as client SQL, because PostgreSQL does not record dependencies on
built-in objects in ``pg_depend``. Any lookup failure fails closed: every statement of the
analysis becomes ``unanalysable`` and is refused.
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

_FUNCS = """
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
"""
_FUNCS_BY_NAME = _FUNCS + "WHERE p.proname = ANY($1::text[])"
_FUNCS_BY_OID = _FUNCS + "WHERE p.oid = ANY($1::oid[])"
_RELS_BY_NAME = """
SELECT c.oid, n.nspname, c.relname, c.relkind
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relname = ANY($1::text[]) AND c.relkind IN ('r', 'v', 'm', 'f', 'p')
"""
_OPERATORS = """
SELECT o.oprname AS name, o.oprcode::oid AS func, NULL::text AS def
FROM pg_operator o
WHERE o.oprname = ANY($1::text[]) AND o.oid >= 16384 AND o.oprcode::oid <> 0
"""
# What runs when a value is cast to a type: user-defined casts, the type's own input
# function, and a domain's constraints (as text).
_TYPES = """
SELECT t.typname AS name, c.castfunc::oid AS func, NULL::text AS def
FROM pg_type t JOIN pg_cast c ON c.casttarget = t.oid
WHERE t.typname = ANY($1::text[]) AND c.castfunc::oid <> 0
UNION ALL
SELECT t.typname, t.typinput::oid, NULL
FROM pg_type t
WHERE t.typname = ANY($1::text[]) AND t.typinput::oid >= 16384
UNION ALL
SELECT t.typname, NULL, pg_get_constraintdef(con.oid)
FROM pg_type t
JOIN pg_constraint con ON con.contypid IN (t.oid, t.typbasetype)
WHERE t.typname = ANY($1::text[]) AND con.contype = 'c'
"""
# What runs when a relation is read or written: its rules (views are ON SELECT rules),
# row security policies and column defaults as definition text; triggers as functions.
_RELATION_DEPS = """
SELECT CASE WHEN r.ev_type = '1' THEN 'select' ELSE 'write' END AS mode,
       pg_get_ruledef(r.oid) AS def, NULL::oid AS func
FROM pg_rewrite r WHERE r.ev_class = $1::oid
UNION ALL
SELECT 'policy', concat_ws(' AND ', pg_get_expr(p.polqual, p.polrelid),
                           pg_get_expr(p.polwithcheck, p.polrelid)), NULL
FROM pg_policy p WHERE p.polrelid = $1::oid
UNION ALL
SELECT 'default', pg_get_expr(a.adbin, a.adrelid), NULL
FROM pg_attrdef a WHERE a.adrelid = $1::oid
UNION ALL
SELECT 'trigger', NULL, t.tgfoid
FROM pg_trigger t WHERE t.tgrelid = $1::oid AND NOT t.tgisinternal AND t.tgenabled <> 'D'
"""
_READ_MODES = ("select", "policy")
_WRITE_MODES = ("select", "write", "policy", "default", "trigger")


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

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass
class _Uses:
    """What an object makes run: function OIDs, and names found in definition text."""

    funcs: set[int] = field(default_factory=set)
    func_names: set[str] = field(default_factory=set)
    reads: set[str] = field(default_factory=set)
    writes: set[str] = field(default_factory=set)
    reasons: list[str] = field(default_factory=list)
    lexing: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    unanalysable: bool = False
    always_writes: bool = False

    def add_definition(self, facts_list: Iterable[StatementFacts] | None) -> None:
        if facts_list is None:
            self.unanalysable = True
            return
        for facts in facts_list:
            if facts.parse_error or facts.unanalysable:
                self.unanalysable = True
            self.func_names |= facts.functions
            self.reads |= facts.tables_read
            self.writes |= facts.tables_written
            self.reasons.extend(facts.dangerous_reasons)
            self.lexing.extend(facts.lexing_risk)
            if not WRITE_KINDS.isdisjoint(facts.kinds):
                self.always_writes = True


@dataclass(frozen=True)
class Effect:
    """What reaching an object can do beyond what the statement's own text shows."""

    writes: bool = False
    reasons: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    functions: frozenset[str] = frozenset()
    lexing: tuple[str, ...] = ()

    def __or__(self, other: Effect) -> Effect:
        if other is NO_EFFECT:
            return self
        return Effect(self.writes or other.writes,
                      tuple(dict.fromkeys((*self.reasons, *other.reasons))),
                      tuple(dict.fromkeys((*self.notes, *other.notes))),
                      self.functions | other.functions,
                      tuple(dict.fromkeys((*self.lexing, *other.lexing))))


NO_EFFECT = Effect()


class CatalogError(Exception):
    """The catalog connection could not be obtained."""


Connector = Callable[[], Awaitable[Any]]


class SqlCatalog:
    """Cached catalog lookups that make statement facts reflect what names really are.

    ``connect`` is an async callable returning an asyncpg Connection or Pool (service
    credential). It is called once and the result kept (called again after a failure);
    lookups are serialised, so one Connection is enough. Cached entries live ``ttl``
    seconds; call :meth:`invalidate` after DDL ran.

    Judging what is not cached yet runs one statement at a time (``_judging``): an object
    whose effect is still being worked out is never taken as the finished answer by
    another session, and an invalidation that arrives meanwhile takes effect when the
    judgement in progress ends, so no judgement runs on half-cleared caches. Cycles
    (recursive functions, views that call functions reading them) are followed once; an
    effect worked out while an enclosing object was still open is used but not cached,
    because it may lack what that object does.
    """

    def __init__(self, connect: Connector, *, ttl: float = 30.0, timeout: float = 5.0,
                 max_depth: int = 4, analyzer: Analyzer | None = None) -> None:
        self._connect = connect
        self._conn: Any = None
        self._loaded_at = time.monotonic()
        self.ttl = ttl
        self.timeout = timeout
        self.max_depth = max_depth
        self.analyzer = analyzer or default_analyzer()
        self._lock = asyncio.Lock()
        # Moves on every invalidation (and whenever a cached judgement is dropped): what
        # follows from judgements made at one epoch holds while it is current (see
        # :meth:`current`), with no call into enrich().
        self.epoch = 0
        self._funcs_by_name: dict[str, list[_Func]] = {}
        self._funcs_by_oid: dict[int, _Func] = {}
        self._rels_by_name: dict[str, list[_Rel]] = {}
        self._ops: dict[str, _Uses] = {}
        self._types: dict[str, _Uses] = {}
        self._rel_uses: dict[int, dict[str, _Uses]] = {}
        self._func_effects: dict[int, Effect] = {}
        self._rel_effects: dict[tuple[int, str], Effect] = {}
        self._statement_effects: dict[tuple[Any, ...], Effect] = {}
        # Analyser shapes (hoopops.sql.analyzer.Shape) known to reach nothing that acts.
        self._no_effect_shapes: set[Any] = set()
        self.lookups = 0  # round trips made (for tests and the console)
        self._judging = asyncio.Lock()
        self._invalidate_later = False
        # Objects whose effect is being worked out, and per open object, which enclosing
        # open objects it reached through a cycle (its effect then lacks theirs).
        self._open: set[tuple[Any, ...]] = set()
        self._cycles: list[set[tuple[Any, ...]]] = []

    def invalidate(self) -> None:
        """Forget everything (after DDL, or when objects may have changed)."""
        self.epoch += 1  # at once, even when the caches are cleared later
        if self._judging.locked():
            # A judgement is under way on what it loaded: clear when it ends.
            self._invalidate_later = True
            return
        self._clear()

    def _clear(self) -> None:
        self._invalidate_later = False
        self.epoch += 1
        for cache in (self._funcs_by_name, self._funcs_by_oid, self._rels_by_name,
                      self._ops, self._types, self._rel_uses, self._func_effects,
                      self._rel_effects, self._statement_effects, self._no_effect_shapes):
            cache.clear()
        self._loaded_at = time.monotonic()
        self.fresh_until = self._loaded_at + self._ttl

    @property
    def ttl(self) -> float:
        return self._ttl

    @ttl.setter
    def ttl(self, value: float) -> None:
        self._ttl = value
        self.fresh_until = self._loaded_at + value  # what is cached is reloaded after this

    # -- public --------------------------------------------------------------------------

    def current(self, epoch: int) -> bool:
        """Whether judgements made at ``epoch`` still stand: nothing was invalidated or
        dropped since, and the cache has not outlived its TTL (enrich() would reload)."""
        return epoch == self.epoch and time.monotonic() <= self.fresh_until

    async def enrich(self, analysis: Analysis, search_path: str | None = None) -> Analysis:
        """``analysis`` with catalog knowledge added; fails closed on any lookup error.

        ``search_path``: the session's effective search path if known; None (the safe
        choice) counts same-named objects in every schema.
        """
        statements = analysis.statements
        shape = statements[0]._shape if len(statements) == 1 and search_path is None \
            else None
        if shape is not None and shape in self._no_effect_shapes and \
                time.monotonic() <= self.fresh_until:
            return analysis
        # What was looked up is only remembered for the shape if no invalidation (DDL,
        # expiry) came in while this call waited for the catalog.
        generation = self._loaded_at
        todo = [st for st in statements
                if st.parse_error is None and st.unanalysable is None
                and (st.functions_called or st.operators or st.tables_read
                     or st.tables_written or st.types)]
        if not todo:
            if shape is not None:
                self._no_effect_shapes.add(shape)  # nothing to look up, ever
            return analysis
        if time.monotonic() > self.fresh_until:
            self.invalidate()
        path = _parse_search_path(search_path)
        path_key = tuple(path) if path is not None else None
        effects: dict[int, Effect] = {}
        missing: list[StatementFacts] = []
        for facts in todo:
            found = self._statement_effects.get(_effect_key(facts, path_key))
            if found is None:
                missing.append(facts)
            else:
                effects[id(facts)] = found
        if missing:
            if len(self._statement_effects) > 50_000:
                self._statement_effects.clear()
                self.epoch += 1
            try:
                async with asyncio.timeout(self.timeout), self._judging:
                    try:
                        await self._load_statement_names(missing)
                        for facts in missing:
                            key = _effect_key(facts, path_key)
                            effect = self._statement_effects.get(key)
                            if effect is None:
                                effect = await self._statement_effect(facts, path)
                                self._statement_effects[key] = effect
                            effects[id(facts)] = effect
                    finally:
                        self._open.clear()
                        self._cycles.clear()
                        if self._invalidate_later:
                            self._clear()
            except Exception as exc:
                self._conn = None
                reason = (f"the catalog could not be consulted ({type(exc).__name__}: "
                          f"{exc}); statements are refused until it can be")
                return analysis.with_statements(
                    [st if st.unanalysable else st.replace(unanalysable=reason)
                     for st in analysis.statements])
        out: list[StatementFacts] = []
        changed = False
        for facts in analysis.statements:
            effect = effects.get(id(facts))
            new = facts if effect is None or effect == NO_EFFECT else _apply(facts, effect)
            changed = changed or new is not facts
            out.append(new)
        if changed:
            return analysis.with_statements(out)
        if shape is not None and self._loaded_at == generation:
            # Every text of this shape reaches the same names: a new literal is a lookup.
            if len(self._no_effect_shapes) >= 50_000:
                self._no_effect_shapes.clear()
                self.epoch += 1
            self._no_effect_shapes.add(shape)
        return analysis

    # -- judging statements --------------------------------------------------------------

    async def _statement_effect(self, facts: StatementFacts, path: list[str] | None
                                ) -> Effect:
        """Everything the names in ``facts`` can do, beyond what its text shows."""
        effect = NO_EFFECT
        for name in facts.functions_called:
            for func in self._candidates_func(name, path):
                effect = effect | await self._function_effect(func, 0)
        for op in facts.operators:
            uses = self._ops.get(split_name(op)[-1])
            if uses is not None:
                effect = effect | await self._uses_effect(uses, "read", 0)
        for name in facts.types:
            uses = self._types.get(split_name(name)[-1])
            if uses is not None:
                effect = effect | await self._uses_effect(uses, "read", 0)
        for name in facts.tables_read:
            for rel in self._candidates_rel(name, path):
                effect = effect | await self._relation_effect(rel, "read", 0)
        for name in facts.tables_written:
            for rel in self._candidates_rel(name, path):
                effect = effect | await self._relation_effect(rel, "write", 0)
        return effect

    # -- judging objects -----------------------------------------------------------------

    async def _function_effect(self, func: _Func, depth: int) -> Effect:
        if func.oid < FIRST_NORMAL_OID:
            return self._builtin_effect(func)
        known = self._func_effects.get(func.oid)
        if known is not None:
            return known
        key = ("f", func.oid)
        if self._reached_open(key):
            return NO_EFFECT
        self._enter(key)
        try:
            effect = await self._function_effect_uncached(func, depth)
        finally:
            complete = self._leave(key)
        if complete:
            self._func_effects[func.oid] = effect
        return effect

    def _reached_open(self, key: tuple[Any, ...]) -> bool:
        """True when ``key`` is being worked out further up (a cycle): what it does is
        added there, and whatever is being worked out now lacks it until then."""
        if key not in self._open:
            return False
        self._cycles[-1].add(key)
        return True

    def _enter(self, key: tuple[Any, ...]) -> None:
        self._open.add(key)
        self._cycles.append(set())

    def _leave(self, key: tuple[Any, ...]) -> bool:
        """Close ``key``; True when its effect is complete (safe to cache)."""
        self._open.discard(key)
        reached = self._cycles.pop() if self._cycles else set()
        reached.discard(key)
        if self._cycles:
            self._cycles[-1] |= reached
        return not reached

    async def _function_effect_uncached(self, func: _Func, depth: int) -> Effect:
        name = func.qualified
        effects = self.analyzer.effects
        effect = Effect(functions=frozenset({name}))
        notes: list[str] = []
        writes = False
        if func.kind == "p":
            writes = True
            notes.append(f"{name} is a procedure")
        if func.volatility == "v" and not effects.is_volatile_safe(func.name):
            writes = True
            notes.append(f"{name} is a volatile user-defined function (treated as a write)")
        if func.language not in effects.trusted_languages and \
                func.language not in ("c", "internal"):
            writes = True
            notes.append(f"{name} is written in the untrusted language {func.language}")
        if func.security_definer:
            notes.append(f"{name} runs with its owner's rights (SECURITY DEFINER)")
        effect = effect | Effect(writes, (), tuple(notes))
        if depth >= self.max_depth:
            effect = effect | Effect(True, (), (f"{name} calls functions nested too deeply "
                                                "to follow (treated as a write)",))
        else:
            parts = _Uses(funcs=set(func.parts) - {func.oid})
            if func.source is not None:
                parts = parts_from_body(self.analyzer, func, parts)
            effect = effect | await self._uses_effect(parts, "read", depth + 1, owner=name)
        return effect

    def _builtin_effect(self, func: _Func) -> Effect:
        """A built-in reached through a view, trigger, body...: judged by the shipped table."""
        effect = self.analyzer.effects.lookup(func.name)
        if effect is None:
            return NO_EFFECT
        reasons = (f"{func.qualified}(): {effect.dangerous}",) if effect.dangerous else ()
        return Effect(effect.effect in ("write", "admin"), reasons, (),
                      frozenset({func.qualified}))

    async def _relation_effect(self, rel: _Rel, mode: str, depth: int) -> Effect:
        if rel.oid < FIRST_NORMAL_OID:
            return NO_EFFECT
        key = (rel.oid, mode)
        known = self._rel_effects.get(key)
        if known is not None:
            return known
        open_key = ("r", rel.oid, mode)
        if self._reached_open(open_key):
            return NO_EFFECT
        self._enter(open_key)
        try:
            effect = await self._relation_effect_uncached(rel, mode, depth)
        finally:
            complete = self._leave(open_key)
        if complete:
            self._rel_effects[key] = effect
        return effect

    async def _relation_effect_uncached(self, rel: _Rel, mode: str, depth: int) -> Effect:
        name = rel.qualified
        notes: list[str] = []
        if rel.relkind == "f":
            notes.append(f"{name} is a foreign table (its data lives on another server)")
        uses_by_mode = await self._relation_uses(rel)
        if mode == "write":
            if uses_by_mode.get("trigger"):
                notes.append(f"writing {name} fires triggers")
            if uses_by_mode.get("write"):
                notes.append(f"{name} has rules that rewrite writes to it")
        effect = Effect(notes=tuple(notes))
        if depth >= self.max_depth:
            effect = effect | Effect(True, (), (f"{name} depends on objects nested too "
                                                "deeply to follow (treated as a write)",))
        else:
            for use_mode in (_READ_MODES if mode == "read" else _WRITE_MODES):
                uses = uses_by_mode.get(use_mode)
                if uses is not None:
                    # Writing through a view writes the relations it reads.
                    inner_mode = "write" if mode == "write" and use_mode == "select" \
                        else "read"
                    effect = effect | await self._uses_effect(uses, inner_mode, depth + 1,
                                                              owner=name)
        return effect

    async def _uses_effect(self, uses: _Uses, mode: str, depth: int,
                           owner: str | None = None) -> Effect:
        """The effect of running what ``uses`` names (functions, relations)."""
        effect = NO_EFFECT
        if uses.unanalysable:
            effect = Effect(True, (), (f"part of {owner or 'a definition'} could not be "
                                       "analysed (treated as a write)",))
        if uses.always_writes or uses.notes:
            effect = effect | Effect(uses.always_writes, (), tuple(uses.notes))
        if uses.reasons or uses.lexing:
            prefix = f"{owner}: " if owner else ""
            effect = effect | Effect(False, tuple(prefix + r for r in uses.reasons),
                                     lexing=tuple(prefix + r for r in uses.lexing))
        await self._ensure_names(uses.func_names, uses.reads | uses.writes)
        await self._prefetch_funcs(uses.funcs)
        for oid in sorted(uses.funcs):
            func = self._funcs_by_oid.get(oid)
            if func is not None:
                effect = effect | await self._function_effect(func, depth)
        for fname in uses.func_names:
            for func in self._candidates_func(fname, None):
                effect = effect | await self._function_effect(func, depth)
        for rname in uses.reads:
            for rel in self._candidates_rel(rname, None):
                effect = effect | await self._relation_effect(rel, mode, depth)
        for rname in uses.writes:
            for rel in self._candidates_rel(rname, None):
                effect = effect | await self._relation_effect(rel, "write", depth)
        if uses.writes:
            effect = effect | Effect(True)
        return effect

    # -- candidates ----------------------------------------------------------------------

    def _candidates_func(self, name: str, path: list[str] | None) -> list[_Func]:
        parts = split_name(name)
        return _narrow(self._funcs_by_name.get(parts[-1].lower(), []), parts, path)

    def _candidates_rel(self, name: str, path: list[str] | None) -> list[_Rel]:
        parts = split_name(name)
        if parts[-1] == "*":
            return []
        return _narrow(self._rels_by_name.get(parts[-1], []), parts, path)

    # -- loading -------------------------------------------------------------------------

    async def _load_statement_names(self, statements: Iterable[StatementFacts]) -> None:
        funcs: set[str] = set()
        rels: set[str] = set()
        ops: set[str] = set()
        types: set[str] = set()
        for facts in statements:
            funcs |= facts.functions_called
            rels |= facts.tables_read | facts.tables_written
            ops.update(split_name(n)[-1] for n in facts.operators)
            types.update(split_name(n)[-1] for n in facts.types)
        await self._ensure_names(funcs, rels)
        for names, cache, query in ((ops, self._ops, _OPERATORS),
                                    (types, self._types, _TYPES)):
            missing = sorted(names - cache.keys())
            if not missing:
                continue
            found: dict[str, _Uses] = {name: _Uses() for name in missing}
            for row in await self._fetch(query, missing):
                uses = found[row["name"]]
                if row["func"] is not None:
                    uses.funcs.add(int(row["func"]))
                if row["def"]:
                    uses.add_definition(_definition_facts(self.analyzer, row["def"]))
            cache.update(found)

    async def _ensure_names(self, funcs: Iterable[str], rels: Iterable[str]) -> None:
        func_names = {split_name(n)[-1].lower() for n in funcs} - self._funcs_by_name.keys()
        rel_names = {split_name(n)[-1] for n in rels} - {"*"} - self._rels_by_name.keys()
        if func_names:
            for row in await self._fetch(_FUNCS_BY_NAME, sorted(func_names)):
                func = _func(row)
                self._funcs_by_name.setdefault(func.name, []).append(func)
                self._funcs_by_oid[func.oid] = func
            for name in func_names:
                self._funcs_by_name.setdefault(name, [])
        if rel_names:
            for row in await self._fetch(_RELS_BY_NAME, sorted(rel_names)):
                rel = _Rel(int(row["oid"]), row["nspname"], row["relname"],
                           _char(row["relkind"]))
                self._rels_by_name.setdefault(rel.name, []).append(rel)
            for name in rel_names:
                self._rels_by_name.setdefault(name, [])

    async def _prefetch_funcs(self, oids: Iterable[int]) -> None:
        missing = sorted(set(oids) - self._funcs_by_oid.keys())
        if missing:
            for row in await self._fetch(_FUNCS_BY_OID, missing):
                func = _func(row)
                self._funcs_by_oid[func.oid] = func

    async def _relation_uses(self, rel: _Rel) -> dict[str, _Uses]:
        found = self._rel_uses.get(rel.oid)
        if found is None:
            found = {}
            for row in await self._fetch(_RELATION_DEPS, rel.oid):
                uses = found.setdefault(row["mode"], _Uses())
                if row["func"] is not None:
                    uses.funcs.add(int(row["func"]))
                if row["def"] and row["mode"] in ("select", "write"):
                    uses.add_definition(self.analyzer.rule_actions(row["def"]))
                elif row["def"]:
                    uses.add_definition(_definition_facts(self.analyzer, row["def"]))
            self._rel_uses[rel.oid] = found
        return found

    async def _fetch(self, query: str, arg: Any) -> list[Any]:
        async with self._lock:
            if self._conn is None:
                self._conn = await self._connect()
                if self._conn is None:
                    raise CatalogError("no catalog connection")
            self.lookups += 1
            return list(await self._conn.fetch(query, arg))


def parts_from_body(analyzer: Analyzer, func: _Func, uses: _Uses) -> _Uses:
    """What a SQL or PL/pgSQL body runs: its functions, relations and dangerous calls."""
    source = func.source or ""
    if func.language == "plpgsql":
        # The source is the whole CREATE FUNCTION (pg_get_functiondef), which is what the
        # PL/pgSQL parser needs to know the return type, trigger variables and so on.
        parsed = analyzer.plpgsql_facts(source, 0)
        if parsed is None:
            uses.unanalysable = True
            return uses
        dynamic, facts_list = parsed
        if dynamic:
            uses.always_writes = True
            uses.notes.append(f"{func.qualified} runs dynamic SQL (treated as a write)")
    else:
        facts_list = analyzer.body_facts(source, 0)
    for facts in facts_list:
        if facts.parse_error or facts.unanalysable:
            uses.unanalysable = True
            continue
        uses.func_names |= facts.functions
        uses.reads |= facts.tables_read
        uses.writes |= facts.tables_written
        uses.reasons.extend(facts.dangerous_reasons)
        uses.lexing.extend(facts.lexing_risk)
        # A BEGIN ATOMIC body comes back as its CREATE FUNCTION: judge what is inside.
        if facts.statement_type != "CreateFunctionStmt" and \
                not WRITE_KINDS.isdisjoint(facts.kinds):
            uses.always_writes = True
    return uses


def _definition_facts(analyzer: Analyzer, text: str) -> list[StatementFacts]:
    """Facts of an expression definition (policy, column default, CHECK), judged as run."""
    stripped = text.strip()
    if stripped[:7].upper() == "CHECK (":
        stripped = stripped[6:].strip()
    return list(analyzer.analyze("SELECT " + stripped).statements)


def _effect_key(facts: StatementFacts, path: tuple[str, ...] | None) -> tuple[Any, ...]:
    # The names a statement reaches decide the effect; shapes that differ only in literals
    # share these frozensets (and their cached hashes).
    return (facts.functions_called, facts.operators, facts.types, facts.tables_read,
            facts.tables_written, path)


def _apply(facts: StatementFacts, effect: Effect) -> StatementFacts:
    new = add_effects(facts, effect="write" if effect.writes else None,
                      reasons=effect.reasons, notes=effect.notes)
    if effect.lexing:
        new = new.replace(lexing_risk=tuple(dict.fromkeys((*new.lexing_risk,
                                                           *effect.lexing))))
    extra = effect.functions - facts.functions
    if extra:
        new = new.replace(functions=new.functions | extra,
                          functions_called=new.functions_called | extra)
    return new


def _char(value: Any) -> str:
    # asyncpg returns PostgreSQL's one-byte "char" type as bytes.
    return value.decode() if isinstance(value, bytes) else str(value)


def _func(row: Any) -> _Func:
    return _Func(int(row["oid"]), row["nspname"], row["proname"], _char(row["provolatile"]),
                 _char(row["prokind"]), row["lanname"], bool(row["prosecdef"]), row["src"],
                 tuple(int(o) for o in row["parts"] or ()))


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

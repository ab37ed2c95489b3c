"""Column origins from the upstream catalog: table OID + attnum → ``schema.table.column``.

RowDescription names the table and attribute behind every plain column reference, so
masking can follow the column itself instead of the name a query gives it. This module
resolves those numbers (and the relations and functions a statement names) with asyncpg
on the gateway's service credential, caches the answers, and expands view columns
through their definitions so that a view over a sensitive column stays sensitive.

OIDs are per database: use one :class:`Catalog` per upstream database. Call
:meth:`Catalog.note_command` with every CommandComplete tag (DDL empties the caches) or
:meth:`Catalog.invalidate` directly; entries also expire after ``max_age`` seconds, which
bounds staleness from DDL run by other sessions.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Protocol

from hoopops.masking.codec import ColumnInfo
from hoopops.masking.sources import (
    OutputSources,
    RelationInfo,
    RelationName,
    view_lineage,
)

FIRST_NORMAL_OID = 16384  # OIDs below this are built into PostgreSQL
_TEXT_OID = 25
_RELKINDS = ["r", "p", "v", "m", "f", "S"]
_DDL_VERBS = frozenset({"CREATE", "ALTER", "DROP", "IMPORT"})

_RELATION_COLUMNS = """
SELECT c.oid, n.nspname, c.relname, c.relkind::text AS relkind,
       CASE WHEN c.relkind IN ('v', 'm') THEN pg_catalog.pg_get_viewdef(c.oid) END AS viewdef,
       a.attnum, a.attname, tn.nspname || '.' || t.typname AS typname
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_catalog.pg_attribute a
       ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
LEFT JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_catalog.pg_namespace tn ON tn.oid = t.typnamespace
WHERE {where}
ORDER BY c.oid, a.attnum
"""
_BY_OID = _RELATION_COLUMNS.format(where="c.oid = ANY($1::oid[])")
_BY_NAME = _RELATION_COLUMNS.format(
    where="c.relname = ANY($1::text[]) AND c.relkind::text = ANY($2::text[])")
_FUNCTIONS = """
SELECT p.proname::text AS name, n.nspname::text AS schema
FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
WHERE p.proname = ANY($1::text[])
UNION
SELECT o.oprname::text, n.nspname::text
FROM pg_catalog.pg_operator o JOIN pg_catalog.pg_namespace n ON n.oid = o.oprnamespace
WHERE o.oprname = ANY($1::text[])
"""
# Follow domains down to their base type; enums and string-category types (citext)
# behave as text on the wire.
_BASE_TYPES = """
WITH RECURSIVE chain(oid, base, depth) AS (
    SELECT t.oid, t.oid, 0 FROM pg_catalog.pg_type t WHERE t.oid = ANY($1::oid[])
    UNION ALL
    SELECT c.oid, t.typbasetype, c.depth + 1
    FROM chain c JOIN pg_catalog.pg_type t ON t.oid = c.base
    WHERE t.typtype = 'd' AND c.depth < 32
)
SELECT c.oid, c.base, t.typtype::text AS typtype, t.typcategory::text AS typcategory
FROM chain c JOIN pg_catalog.pg_type t ON t.oid = c.base
WHERE t.typtype <> 'd'
"""


class Fetcher(Protocol):
    """What the catalog needs from asyncpg: a Connection or a Pool both fit."""

    async def fetch(self, query: str, *args: Any) -> list[Any]: ...


class _Relation:
    __slots__ = ("attnums", "info", "lineage")

    def __init__(self, info: RelationInfo, attnums: tuple[int, ...]) -> None:
        self.info = info
        self.attnums = attnums
        self.lineage: dict[frozenset[str], list[OutputSources]] = {}


class Catalog:
    """Cached catalog lookups for one database; also the analysis' ``RelationLookup``."""

    def __init__(self, conn: Fetcher, max_age: float = 300.0, max_entries: int = 10_000) -> None:
        self._conn = conn
        self.max_age = max_age
        self.max_entries = max_entries
        # One query at a time: an asyncpg Connection cannot run two concurrently.
        self._lock = asyncio.Lock()
        self._by_oid: dict[int, _Relation] = {}
        self._by_name: dict[RelationName, list[RelationInfo]] = {}
        self._functions: dict[str, frozenset[str]] = {}
        self._types: dict[int, int] = {}
        self._born = time.monotonic()
        self.queries = 0  # how many catalog queries ran (tests and diagnostics)

    # -- cache control ------------------------------------------------------------------------

    def invalidate(self) -> None:
        """Forget everything; the next lookups query the catalog again."""
        self._by_oid.clear()
        self._by_name.clear()
        self._functions.clear()
        self._types.clear()
        self._born = time.monotonic()

    def note_command(self, tag: str) -> bool:
        """Feed every CommandComplete tag; DDL (CREATE/ALTER/DROP/IMPORT ...) invalidates.
        Returns True when it did."""
        if tag.split(" ", 1)[0].upper() in _DDL_VERBS:
            self.invalidate()
            return True
        return False

    def _fresh(self) -> None:
        size = len(self._by_oid) + len(self._by_name) + len(self._functions) + len(self._types)
        if time.monotonic() - self._born > self.max_age or size > self.max_entries:
            self.invalidate()

    async def _fetch(self, query: str, *args: Any) -> list[Any]:
        async with self._lock:
            self.queries += 1
            return await self._conn.fetch(query, *args)

    # -- RowDescription ----------------------------------------------------------------------

    async def resolve(self, columns: Sequence[ColumnInfo],
                      trusted_functions: Collection[str] = ()) -> list[ColumnInfo]:
        """Columns with ``origin`` (for table OIDs) and ``base_type_oid`` (for user types)
        filled in. A column whose relation or attribute no longer exists keeps
        ``origin=None``, which the plan treats as untraceable (masked)."""
        self._fresh()
        await self._load_oids({c.table_oid for c in columns if c.table_oid})
        await self._load_types({c.type_oid for c in columns if c.type_oid >= FIRST_NORMAL_OID})
        trusted = frozenset(trusted_functions)
        out = []
        for column in columns:
            changes: dict[str, Any] = {}
            if column.table_oid:
                origin = await self._origin(column.table_oid, column.attnum, trusted)
                if origin is not None:
                    changes["origin"] = origin
            if column.type_oid >= FIRST_NORMAL_OID:
                changes["base_type_oid"] = self._types.get(column.type_oid, 0)
            out.append(replace(column, **changes) if changes else column)
        return out

    async def _origin(self, table_oid: int, attnum: int,
                      trusted: frozenset[str]) -> OutputSources | None:
        relation = self._by_oid.get(table_oid)
        if relation is None:
            return None
        if attnum < 0:
            return OutputSources()  # ctid, xmin, tableoid...: system columns hold no data
        info = relation.info
        if info.kind in ("v", "m"):
            lineage = relation.lineage.get(trusted)
            if lineage is None:
                lineage = await view_lineage(info, self, trusted)
                relation.lineage[trusted] = lineage
        else:
            lineage = [OutputSources.of(info.source(name, typ)) for name, typ in info.columns]
        if attnum == 0:
            # A whole-row reference (SELECT c FROM customers c) reports attnum 0: the value
            # is derived from every column of the row.
            whole = OutputSources()
            for out in lineage:
                whole = whole.merge(out)
            return whole.derived()
        if attnum not in relation.attnums:
            return None
        return lineage[relation.attnums.index(attnum)]

    async def _load_oids(self, oids: Iterable[int]) -> None:
        missing = sorted(o for o in oids if o not in self._by_oid)
        if not missing:
            return
        # A miss is not remembered: the service connection sees committed catalog rows
        # only, so a relation a client created in a transaction still open is missing
        # here until that commits, and a remembered miss would mask its columns (as
        # untraceable) for every session until the cache expired.
        for relation in _group(await self._fetch(_BY_OID, missing)):
            self._by_oid[relation.info.oid] = relation

    async def _load_types(self, oids: Iterable[int]) -> None:
        missing = sorted(o for o in oids if o not in self._types)
        if not missing:
            return
        for row in await self._fetch(_BASE_TYPES, missing):
            base = int(row["base"])
            if base < FIRST_NORMAL_OID:
                wire = base
            elif row["typtype"] == "e" or row["typcategory"] == "S":
                wire = _TEXT_OID
            else:
                wire = 0
            self._types[int(row["oid"])] = wire
        for oid in missing:
            self._types.setdefault(oid, 0)

    # -- RelationLookup ----------------------------------------------------------------------

    async def relations(self, names: Collection[RelationName]
                        ) -> Mapping[RelationName, Sequence[RelationInfo]]:
        """Every relation each name may mean: the named schema, or all schemas (so an
        unqualified name can only over-mask, whatever the session's search_path)."""
        self._fresh()
        missing = sorted({n for n in names if n not in self._by_name},
                         key=lambda n: (n[0] or "", n[1]))
        if missing:
            rows = await self._fetch(_BY_NAME, sorted({n for _, n in missing}), _RELKINDS)
            found = _group(rows)
            for relation in found:
                self._by_oid.setdefault(relation.info.oid, relation)
            for schema, name in missing:
                infos = [r.info for r in found if r.info.name == name and _schema_matches(
                    schema, r.info.schema)]
                if infos:  # (a miss is not remembered: see _load_oids)
                    self._by_name[(schema, name)] = infos
        return {n: self._by_name.get(n, []) for n in names}

    async def functions(self, names: Collection[str]) -> Mapping[str, frozenset[str]]:
        """Schemas defining a function or operator of each name (unknown names absent)."""
        self._fresh()
        missing = sorted(n for n in set(names) if n not in self._functions)
        if missing:
            found: dict[str, set[str]] = {}
            for row in await self._fetch(_FUNCTIONS, missing):
                found.setdefault(row["name"], set()).add(row["schema"])
            for name, schemas in found.items():  # (misses are not remembered: _load_oids)
                self._functions[name] = frozenset(schemas)
        return {n: self._functions[n] for n in names if self._functions.get(n)}


def _schema_matches(wanted: str | None, actual: str) -> bool:
    if wanted is None:
        return True
    if wanted == "pg_temp":  # the session's own temporary schema, whichever number it has
        return actual.startswith("pg_temp_")
    return wanted == actual


def _group(rows: Iterable[Any]) -> list[_Relation]:
    relations: list[_Relation] = []
    current: dict[str, Any] | None = None
    columns: list[tuple[str, str | None]] = []
    attnums: list[int] = []

    def close() -> None:
        if current is not None:
            info = RelationInfo(int(current["oid"]), current["nspname"], current["relname"],
                                current["relkind"], tuple(columns), current["viewdef"])
            relations.append(_Relation(info, tuple(attnums)))

    for row in rows:
        if current is None or current["oid"] != row["oid"]:
            close()
            current = dict(row)
            columns = []
            attnums = []
        if row["attnum"] is not None:
            columns.append((row["attname"], row["typname"]))
            attnums.append(int(row["attnum"]))
    close()
    return relations


__all__ = ["FIRST_NORMAL_OID", "Catalog", "Fetcher"]

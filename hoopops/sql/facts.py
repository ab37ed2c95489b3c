"""The facts hoopops knows about a statement: what it reads, writes and can do.

Facts are immutable and shared (the analyser caches them by text), so anything that
changes them — the catalog, a session's prepared statements, a policy's extra side-effect
functions — builds a new object with :func:`dataclasses.replace`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hoopops.masking.rules import MaskingFacts

KINDS = ("read", "write", "ddl", "dcl", "tcl", "admin", "utility")
# "read" means "reads and does nothing more": it is dropped when a stronger kind is present.
_STRONG = frozenset({"write", "ddl", "dcl", "admin"})


def normalise_kinds(kinds: set[str] | frozenset[str]) -> frozenset[str]:
    if "read" in kinds and not _STRONG.isdisjoint(kinds):
        return frozenset(kinds - {"read"})
    return frozenset(kinds)


def quote_part(part: str) -> str:
    """An identifier as it appears in a fact name: quoted only when it holds a dot or quote."""
    if "." in part or '"' in part:
        return '"' + part.replace('"', '""') + '"'
    return part


def join_name(*parts: str | None) -> str:
    return ".".join(quote_part(p) for p in parts if p)


def split_name(name: str) -> tuple[str, ...]:
    """The parts of a fact name (``schema.table.column``), honouring quoted parts."""
    if '"' not in name:
        return tuple(name.split("."))
    parts: list[str] = []
    buf: list[str] = []
    quoted = False
    i = 0
    while i < len(name):
        ch = name[i]
        if quoted:
            if ch == '"':
                if i + 1 < len(name) and name[i + 1] == '"':
                    buf.append('"')
                    i += 1
                else:
                    quoted = False
            else:
                buf.append(ch)
        elif ch == '"':
            quoted = True
        elif ch == ".":
            parts.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
        i += 1
    parts.append("".join(buf))
    return tuple(parts)


@dataclass(frozen=True, slots=True)
class OutputColumn:
    """One column of the result, and the source columns its value is computed from.

    ``direct`` is true when the value is a plain column reference (masking can follow the
    table OID and attribute number in RowDescription); otherwise it is computed from
    ``sources`` (``table.column`` or ``table.*`` for whole-row references).
    """

    name: str
    sources: frozenset[str]
    direct: bool

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "sources": sorted(self.sources), "direct": self.direct}


@dataclass(slots=True, eq=False)
class StatementFacts:
    """What one statement of a query string reads, writes and can do.

    Treat instances as immutable: they are shared through the analysis cache. (Not a
    frozen dataclass only because frozen construction costs microseconds on the hot path;
    derive changed copies with :meth:`replace`.)

    Names are as written in the SQL (``schema.table`` when qualified, ``table`` when not;
    unquoted identifiers folded to lower case by the parser). Column facts over-approximate:
    an unqualified column is attributed to every table in scope, ``table.*`` stands for a
    whole-row or star reference.
    """

    text: str
    statement_type: str = ""
    kinds: frozenset[str] = frozenset()
    changes_data: bool = False
    changes_schema: bool = False
    changes_server: bool = False
    tables_read: frozenset[str] = frozenset()
    tables_written: frozenset[str] = frozenset()
    columns: frozenset[str] = frozenset()
    columns_written: frozenset[str] = frozenset()
    filter_columns: frozenset[str] = frozenset()
    output_columns: tuple[OutputColumn, ...] = ()
    functions: frozenset[str] = frozenset()
    functions_called: frozenset[str] = frozenset()
    operators: frozenset[str] = frozenset()
    types: frozenset[str] = frozenset()
    unbounded: bool = False
    dangerous: bool = False
    dangerous_reasons: tuple[str, ...] = ()
    lexing_risk: tuple[str, ...] = ()
    resets_session: bool = False
    row_locks: bool = False
    parse_error: str | None = None
    unanalysable: str | None = None
    wrapped: tuple[str, ...] = ()
    prepares: str | None = None
    executes: str | None = None
    deallocates: str | None = None
    notes: tuple[str, ...] = ()
    location: int = 0
    # What the statement does with sensitive columns (set by the gateway from the
    # masking analysis, only when it involves one; see hoopops.masking.inference).
    masking: MaskingFacts | None = None
    _lazy: dict[str, Any] = field(default_factory=dict, init=False, repr=False,
                                  compare=False)
    # The analyser's shape (hoopops.sql.analyzer.Shape) when these facts are exactly the
    # facts every text of that shape has; caches keyed by it skip the work for new
    # literals. Anything that derives changed facts leaves it None.
    _shape: Any = field(default=None, init=False, repr=False, compare=False)

    # -- derived, computed on demand (off the hot path) ----------------------------------

    @property
    def fingerprint(self) -> str | None:
        """pglast's fingerprint (constants ignored); None when the text does not parse."""
        cache = self._lazy
        if "fingerprint" not in cache:
            from pglast.parser import fingerprint

            try:
                cache["fingerprint"] = fingerprint(self.text) if self.parse_error is None \
                    and self.unanalysable is None else None
            except Exception:
                cache["fingerprint"] = None
        return cache["fingerprint"]  # type: ignore[no-any-return]

    @property
    def normalized(self) -> str:
        """The text with constants replaced by ``$n`` (what ``sql:`` regexes see)."""
        cache = self._lazy
        if "normalized" not in cache:
            from pglast.parser import normalize

            try:
                cache["normalized"] = normalize(self.text) if self.parse_error is None \
                    and self.unanalysable is None else self.text
            except Exception:
                cache["normalized"] = self.text
        return cache["normalized"]  # type: ignore[no-any-return]

    def pretty(self) -> str:
        """A pretty-printed form for the console; the original text if it cannot be printed."""
        cache = self._lazy
        if "pretty" not in cache:
            cache["pretty"] = _prettify(self.text) if self.parse_error is None \
                and self.unanalysable is None else self.text
        return cache["pretty"]  # type: ignore[no-any-return]

    @property
    def statement_types(self) -> frozenset[str]:
        """The statement's own type and the types of statements it wraps."""
        return frozenset((self.statement_type, *self.wrapped))

    @property
    def tables(self) -> frozenset[str]:
        return self.tables_read | self.tables_written

    def replace(self, **changes: Any) -> StatementFacts:
        # dataclasses.replace re-runs __init__ over ~30 fields (~20 µs); on the hot path
        # (the shape cache serves every pgbench statement) copy the slots instead.
        new = StatementFacts.__new__(StatementFacts)
        for name in _FIELD_NAMES:
            setattr(new, name, changes[name] if name in changes else getattr(self, name))
        unknown = changes.keys() - _FIELD_SET
        if unknown:
            raise TypeError(f"unknown StatementFacts field(s): {sorted(unknown)}")
        new._lazy = {}
        new._shape = None
        return new

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (sorted lists) for the CLI, events and the audit log."""
        return {
            "text": self.text,
            "statement_type": self.statement_type,
            "wrapped": list(self.wrapped),
            "kinds": [k for k in KINDS if k in self.kinds],
            "changes_data": self.changes_data,
            "changes_schema": self.changes_schema,
            "changes_server": self.changes_server,
            "tables_read": sorted(self.tables_read),
            "tables_written": sorted(self.tables_written),
            "columns": sorted(self.columns),
            "columns_written": sorted(self.columns_written),
            "filter_columns": sorted(self.filter_columns),
            "output_columns": [c.to_dict() for c in self.output_columns],
            "functions": sorted(self.functions),
            "operators": sorted(self.operators),
            "types": sorted(self.types),
            "unbounded": self.unbounded,
            "dangerous": self.dangerous,
            "dangerous_reasons": list(self.dangerous_reasons),
            "lexing_risk": list(self.lexing_risk),
            "row_locks": self.row_locks,
            "parse_error": self.parse_error,
            "unanalysable": self.unanalysable,
            "prepares": self.prepares,
            "executes": self.executes,
            "deallocates": self.deallocates,
            "notes": list(self.notes),
            "fingerprint": self.fingerprint,
            **({"masking": self.masking.to_dict()} if self.masking is not None else {}),
        }


def _prettify(text: str) -> str:
    try:
        from pglast import prettify

        return prettify(text)
    except (Exception, RecursionError):
        return text


def _unique(*groups: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(item for group in groups for item in group))


def merge_facts(outer: StatementFacts, inner: StatementFacts) -> StatementFacts:
    """``outer`` with everything ``inner`` can do added (e.g. EXECUTE and its statement)."""
    kinds = normalise_kinds(set(outer.kinds) | set(inner.kinds))
    reasons = _unique(outer.dangerous_reasons, inner.dangerous_reasons)
    return dataclasses.replace(
        outer,
        kinds=kinds,
        changes_data=outer.changes_data or inner.changes_data,
        changes_schema=outer.changes_schema or inner.changes_schema,
        changes_server=outer.changes_server or inner.changes_server,
        tables_read=outer.tables_read | inner.tables_read,
        tables_written=outer.tables_written | inner.tables_written,
        columns=outer.columns | inner.columns,
        columns_written=outer.columns_written | inner.columns_written,
        filter_columns=outer.filter_columns | inner.filter_columns,
        output_columns=outer.output_columns or inner.output_columns,
        functions=outer.functions | inner.functions,
        functions_called=outer.functions_called | inner.functions_called,
        operators=outer.operators | inner.operators,
        types=outer.types | inner.types,
        unbounded=outer.unbounded or inner.unbounded,
        dangerous=bool(reasons),
        dangerous_reasons=reasons,
        lexing_risk=_unique(outer.lexing_risk, inner.lexing_risk),
        resets_session=outer.resets_session or inner.resets_session,
        row_locks=outer.row_locks or inner.row_locks,
        parse_error=outer.parse_error or inner.parse_error,
        unanalysable=inner.unanalysable,
        wrapped=_unique(outer.wrapped, (inner.statement_type,), inner.wrapped),
        notes=_unique(outer.notes, inner.notes),
    )


def add_effects(facts: StatementFacts, *, effect: str | None = None,
                reasons: tuple[str, ...] = (), notes: tuple[str, ...] = ()) -> StatementFacts:
    """``facts`` made stronger: ``effect`` (write/admin) and dangerous ``reasons`` added."""
    kinds = set(facts.kinds)
    changes_data = facts.changes_data
    changes_server = facts.changes_server
    if effect == "write":
        kinds.add("write")
        changes_data = True
    elif effect == "admin":
        kinds.add("admin")
        changes_server = True
    all_reasons = _unique(facts.dangerous_reasons, reasons)
    return dataclasses.replace(
        facts, kinds=normalise_kinds(kinds), changes_data=changes_data,
        changes_server=changes_server, dangerous=bool(all_reasons),
        dangerous_reasons=all_reasons, notes=_unique(facts.notes, notes))


# Not frozen (frozen construction costs ~2 µs, paid per statement); treat as immutable.
@dataclass(slots=True, eq=False)
class Analysis:
    """Facts for every statement of one query string.

    ``statements`` is empty for empty or comment-only text. When the text cannot be
    analysed at all (does not parse, too long, too deeply nested, invalid text) there is
    exactly one statement covering the whole text, with ``parse_error`` or
    ``unanalysable`` set, and the same reason is on the Analysis.
    """

    text: str
    statements: tuple[StatementFacts, ...]
    parse_error: str | None = None
    unanalysable: str | None = None
    elapsed_us: float = 0.0

    @property
    def kinds(self) -> frozenset[str]:
        out: set[str] = set()
        for st in self.statements:
            out |= st.kinds
        return normalise_kinds(out)

    @property
    def dangerous(self) -> bool:
        return any(st.dangerous for st in self.statements)

    @property
    def changes_schema(self) -> bool:
        for st in self.statements:  # noqa: SIM110 - asked per statement; any() is slower
            if st.changes_schema:
                return True
        return False

    @property
    def needs_session(self) -> bool:
        """True when a session's prepared statements or settings change these facts."""
        # A loop, not any() over a generator: asked once per statement on the hot path.
        for st in self.statements:  # noqa: SIM110
            if st.executes is not None or st.resets_session:
                return True
        return False

    def with_statements(self, statements: tuple[StatementFacts, ...] | list[StatementFacts]
                        ) -> Analysis:
        return dataclasses.replace(self, statements=tuple(statements))

    def to_dict(self) -> dict[str, Any]:
        return {
            "parse_error": self.parse_error,
            "unanalysable": self.unanalysable,
            "elapsed_us": round(self.elapsed_us, 1),
            "statements": [st.to_dict() for st in self.statements],
        }


_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(StatementFacts) if f.init)
_FIELD_SET = frozenset(_FIELD_NAMES)


def _make_located() -> Any:
    # One straight-line function (as dataclasses builds __init__): a loop of getattr /
    # setattr over ~30 fields costs ~9 µs, and the shape cache pays it per statement.
    copied = "\n".join(f"    new.{name} = facts.{name}" for name in _FIELD_NAMES
                       if name not in ("text", "location"))
    source = ("def located(facts, text, location):\n"
              "    new = _new(_cls)\n"
              "    new.text = text\n"
              "    new.location = location\n"
              f"{copied}\n"
              "    new._lazy = {}\n"
              "    new._shape = facts._shape\n"
              "    return new\n")
    namespace: dict[str, Any] = {"_new": object.__new__, "_cls": StatementFacts}
    exec(source, namespace)  # generated from the dataclass's own field names
    return namespace["located"]


located: Any = _make_located()
located.__doc__ = ("located(facts, text, location): ``facts`` (same shape, same facts) for "
                   "another text; lazily derived values are recomputed for that text.")

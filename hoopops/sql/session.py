"""Per-session SQL state: prepared statements, so ``EXECUTE`` is judged as what it runs.

SQL-level ``PREPARE`` and protocol-level named Parse share one namespace on the server,
so both are tracked here. The model errs towards refusing: a name the gateway did not
see prepared makes ``EXECUTE`` unanalysable (blocked); ``PREPARE`` of a name already in
use keeps the old statement (the server refuses to replace it); ``DEALLOCATE`` and
``DISCARD ALL`` forget names even if the server then fails them.
"""

from __future__ import annotations

from typing import Any

from hoopops.sql.analyzer import RESET_REASON
from hoopops.sql.effects import EffectTable
from hoopops.sql.facts import Analysis, StatementFacts, add_effects, merge_facts


class SessionSqlState:
    """What one client session has prepared, and whether its defaults are known safe.

    ``lexing_defaults_verified``: the gateway has checked (from the server's
    ParameterStatus at startup) that the session's default standard_conforming_strings is
    on and client_encoding is UTF8, so RESET ALL / DISCARD ALL return to safe values.
    """

    def __init__(self, *, lexing_defaults_verified: bool = False,
                 max_prepared: int = 10_000) -> None:
        self.lexing_defaults_verified = lexing_defaults_verified
        self.max_prepared = max_prepared
        self.prepared: dict[str, StatementFacts] = {}
        # The gate's handle on the verdicts its policy gave this session's identity and
        # target (hoopops.proxy.enforcer keeps it), so a cache hit needs no key built.
        self.verdicts: Any = None

    # -- judging -------------------------------------------------------------------------

    def resolve(self, analysis: Analysis) -> Analysis:
        """``analysis`` with each EXECUTE replaced by what it runs (in statement order)."""
        if not analysis.needs_session:
            return analysis
        prepared = dict(self.prepared)
        out: list[StatementFacts] = []
        changed = False
        for facts in analysis.statements:
            new = facts
            if facts.executes is not None:
                target = prepared.get(facts.executes)
                if target is not None:
                    new = merge_facts(facts, target)
            if new.resets_session and self.lexing_defaults_verified:
                kept = tuple(r for r in new.lexing_risk if not r.endswith(RESET_REASON))
                new = new.replace(lexing_risk=kept)
            _apply_names(prepared, new)
            changed = changed or new is not facts
            out.append(new)
        return analysis.with_statements(out) if changed else analysis

    # -- following what ran --------------------------------------------------------------

    def observe(self, analysis: Analysis) -> None:
        """Record PREPARE / DEALLOCATE / DISCARD ALL of statements that were let through."""
        for facts in analysis.statements:
            if facts.prepares is not None or facts.deallocates is not None:
                _apply_names(self.prepared, facts, self.max_prepared)

    def on_parse(self, name: str, analysis: Analysis) -> None:
        """A protocol-level Parse of a named statement was let through."""
        if not name or name in self.prepared or len(self.prepared) >= self.max_prepared:
            return
        statements = analysis.statements
        if len(statements) == 1:
            self.prepared[name] = _as_prepared(statements[0])
        elif statements:
            merged = statements[0]
            for other in statements[1:]:
                merged = merge_facts(merged, other)
            self.prepared[name] = _as_prepared(merged)

    def on_close(self, name: str) -> None:
        """A protocol-level Close of a named statement."""
        self.prepared.pop(name, None)

    def reset(self) -> None:
        self.prepared.clear()


def _as_prepared(facts: StatementFacts) -> StatementFacts:
    return facts.replace(prepares=None, deallocates=None)


def _apply_names(prepared: dict[str, StatementFacts], facts: StatementFacts,
                 limit: int = 10_000) -> None:
    if facts.deallocates is not None:
        if facts.deallocates == "*":
            prepared.clear()
        else:
            prepared.pop(facts.deallocates, None)
    name = facts.prepares
    if name is not None and name not in prepared and len(prepared) < limit:
        prepared[name] = _as_prepared(facts.replace(
            statement_type=facts.wrapped[0] if facts.wrapped else facts.statement_type,
            wrapped=facts.wrapped[1:]))


def apply_function_effects(analysis: Analysis, table: EffectTable) -> Analysis:
    """``analysis`` re-judged with extra side-effect functions (a policy's extension)."""
    out: list[StatementFacts] = []
    changed = False
    for facts in analysis.statements:
        new = facts
        for name in facts.functions:
            effect = table.lookup(name)
            if effect is None:
                continue
            reasons = (f"{name}(): {effect.dangerous}",) if effect.dangerous else ()
            called = name in facts.functions_called
            kind = effect.effect if called and effect.effect != "read" else None
            if kind is None and not reasons:
                continue
            new = add_effects(new, effect=kind, reasons=reasons)
        changed = changed or new is not facts
        out.append(new)
    return analysis.with_statements(out) if changed else analysis

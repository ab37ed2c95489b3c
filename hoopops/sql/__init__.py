"""SQL analysis: what each statement of a query string reads, writes and can do.

``analyze(text)`` is the entry point the gateway calls for every Query and Parse; it never
raises. It caches by exact text, and for SELECT / DML whose facts cannot depend on a
literal, by shape (the text up to its literals), so a new literal costs a lookup and a
copy, not a parse; see the shape cache in :mod:`hoopops.sql.analyzer`.
:class:`SessionSqlState` follows one client session's prepared statements so that
``EXECUTE`` is judged as the statement it runs.
"""

from __future__ import annotations

from hoopops.sql.analyzer import (
    CACHE_MAX_CHARS,
    DEFAULT_MAX_BYTES,
    RESET_REASON,
    STATEMENT_TYPES,
    Analyzer,
)
from hoopops.sql.effects import EffectTable, FunctionEffect, builtin_effects
from hoopops.sql.facts import (
    KINDS,
    Analysis,
    OutputColumn,
    StatementFacts,
    join_name,
    split_name,
)
from hoopops.sql.session import SessionSqlState, apply_function_effects

__all__ = [
    "CACHE_MAX_CHARS",
    "DEFAULT_MAX_BYTES",
    "KINDS",
    "RESET_REASON",
    "STATEMENT_TYPES",
    "Analysis",
    "Analyzer",
    "EffectTable",
    "FunctionEffect",
    "OutputColumn",
    "SessionSqlState",
    "StatementFacts",
    "analyze",
    "apply_function_effects",
    "builtin_effects",
    "default_analyzer",
    "join_name",
    "split_name",
]

_default: Analyzer | None = None


def default_analyzer() -> Analyzer:
    """The shared analyser with the shipped side-effect table (and its cache)."""
    global _default
    if _default is None:
        _default = Analyzer()
    return _default


def analyze(text: str) -> Analysis:
    """Facts for every statement in ``text``; never raises; cached by text and by shape."""
    return default_analyzer().analyze(text)

"""What masking cannot fix, for the policy to decide: masking facts on statement facts.

Masking rewrites the values a statement returns; it cannot stop a statement from asking
*about* them (``WHERE ssn LIKE '123-45-%'`` bisects a masked SSN through which rows come
back), copying them where masking does not look (``INSERT INTO notes SELECT ssn ...``),
writing a masked placeholder back over the real value (``UPDATE customers SET ssn =
'***-**-6789'``), or handing them to code the analysis cannot see through. The masking
analysis (:mod:`hoopops.masking.sources`) already traces every column reference to its
source column; :meth:`MaskingRules.policy_facts` turns that into
:class:`~hoopops.masking.rules.MaskingFacts`, and this module hangs them on the
statement facts the policy engine matches (``StatementFacts.masking``).

Cost: the hints are cached per statement shape, the facts per hints object, and a
statement involving no sensitive column gets None and leaves the analysis untouched. Only
a write to a sensitive column parses its text again, to look at its literals (they are
not part of the shape).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import replace

from pglast.parser import ParseError, parse_sql_json

from hoopops.identity import Identity
from hoopops.masking.rules import MaskingFacts, MaskingRules
from hoopops.masking.sources import StatementSources
from hoopops.sql.facts import Analysis, StatementFacts

# What masking output looks like: redact (****), keep_last (***-**-6789,
# ************1111), email_domain (***@example.com), hash (hmac:<32 hex digits>).
# Stored sensitive values do not start with '*' or hold three in a row.
_MASKED = re.compile(r"^\s*\*|\*\*\*|^hmac:[0-9a-f]{32}$")
# (id(analysis), id(facts)) -> (analysis, facts, the analysis with the facts): the objects
# are kept so that their ids cannot be reused while an entry lives.
_enriched: dict[tuple[int, int], tuple[Analysis, MaskingFacts, Analysis]] = {}
_ENRICHED_LIMIT = 4096


def looks_masked(value: str) -> bool:
    """Whether ``value`` looks like what masking shows instead of a sensitive value."""
    return _MASKED.search(value) is not None


def masked_literals(sql: str) -> list[str]:
    """The string constants in ``sql`` that look like masking output (none if it does
    not parse: such text never reaches the server)."""
    try:
        tree = json.loads(parse_sql_json(sql))
    except (ParseError, ValueError):
        return []
    found: list[str] = []
    stack: list[object] = [tree]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            const = item.get("A_Const")
            if isinstance(const, dict):
                sval = const.get("sval")
                text = sval.get("sval") if isinstance(sval, dict) else None
                if isinstance(text, str) and looks_masked(text):
                    found.append(text)
                continue
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


def statement_facts(rules: MaskingRules, hints: StatementSources, text: str,
                    identity: Identity | None) -> MaskingFacts | None:
    """The masking facts of one statement (None: it involves no sensitive column)."""
    facts = rules.policy_facts(hints, identity)
    if facts is None or not facts.sensitive_targets:
        return facts
    if masked_literals(text):
        # The literal cannot be tied to its column without the values themselves, so
        # every sensitive column the statement writes counts.
        facts = replace(facts, sensitive_placeholders=facts.sensitive_targets)
    return facts


def with_masking_facts(analysis: Analysis, hints: Sequence[StatementSources],
                       rules: MaskingRules, identity: Identity | None,
                       reads_matter: bool = True) -> Analysis:
    """``analysis`` with each statement's masking facts set, or ``analysis`` itself
    (the same object) when no statement involves a sensitive column.

    ``reads_matter=False`` (no policy rule asks about ``sensitive_read``) leaves a
    statement that merely reads masked columns as it is: masking handles what it returns
    (and the audit trail records that), and it keeps the policy's shape cache."""
    statements = analysis.statements
    if not statements or not hints or not rules.active:
        return analysis
    if len(statements) == 1 and len(hints) == 1:  # the common case, without the lists
        only = _decisive(statement_facts(rules, hints[0], statements[0].text, identity),
                         reads_matter)
        if only is None:
            return analysis
        key = (id(analysis), id(only))
        known = _enriched.get(key)
        if known is not None and known[0] is analysis and known[1] is only:
            return known[2]  # the same text again (prepared statements, drivers' caches)
        enriched = analysis.with_statements((statements[0].replace(masking=only),))
        if len(_enriched) >= _ENRICHED_LIMIT:
            _enriched.clear()
        _enriched[key] = (analysis, only, enriched)
        return enriched
    if len(hints) == len(statements):
        found = [_decisive(statement_facts(rules, h, st.text, identity), reads_matter)
                 for h, st in zip(hints, statements, strict=True)]
    else:
        # The two parses disagree on where statements start: every statement gets what
        # any of them does (fail closed).
        merged = _union([statement_facts(rules, h, analysis.text, identity) for h in hints])
        found = [_decisive(merged, reads_matter)] * len(statements)
    if not any(found):
        return analysis
    out: list[StatementFacts] = [
        st if facts is None else st.replace(masking=facts)
        for st, facts in zip(statements, found, strict=True)]
    return analysis.with_statements(out)


def _decisive(facts: MaskingFacts | None, reads_matter: bool) -> MaskingFacts | None:
    if facts is None or reads_matter:
        return facts
    if (facts.sensitive_in_predicates or facts.sensitive_copied or facts.sensitive_targets
            or facts.sensitive_opaque or facts.sensitive_placeholders):
        return facts
    return None


def _union(items: Sequence[MaskingFacts | None]) -> MaskingFacts | None:
    present = [f for f in items if f is not None]
    if not present:
        return None

    def merged(name: str) -> tuple[str, ...]:
        return tuple(sorted({n for f in present for n in getattr(f, name)}))

    return MaskingFacts(merged("sensitive_read"), merged("sensitive_in_predicates"),
                        merged("sensitive_copied"), merged("sensitive_targets"),
                        merged("opaque"), merged("sensitive_opaque"),
                        merged("sensitive_placeholders"))


__all__ = ["looks_masked", "masked_literals", "statement_facts", "with_masking_facts"]

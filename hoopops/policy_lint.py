"""``hoopops policy lint``: find mistakes in policy files before they are loaded.

Errors are what loading would refuse (unknown keys, bad values, invalid regexes). Warnings
are rules that load but cannot do what their author meant: globs that can never match a
PostgreSQL name, rules that can never match a statement, and rules shadowed by an earlier
rule that already matches everything they match.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

from hoopops.policy import (
    BOOL_KEYS,
    IDENTITY_KEYS,
    MASKING_KEYS,
    NAME_KEYS,
    NameMatcher,
    PolicyProblem,
    PolicySet,
    Rule,
    load_policy_folder,
)

# For each condition key of an earlier rule, the keys of a later rule that it includes.
_NARROWER = {
    "tables": ("tables", "tables_read", "tables_written"),
    "columns": ("columns", "columns_read", "columns_written"),
}
_MAX_PARTS = {"tables": 3, "tables_read": 3, "tables_written": 3, "columns": 4,
              "columns_read": 4, "columns_written": 4, "filter_columns": 4, "functions": 2,
              **dict.fromkeys(MASKING_KEYS, 3)}
_FACT_KEYS = frozenset(k for k in (*NAME_KEYS, *BOOL_KEYS, *MASKING_KEYS, "kinds",
                                   "statement_types") if k != "parse_error")


def lint_folder(folder: Path) -> list[PolicyProblem]:
    policies, problems = load_policy_folder(Path(folder))
    if policies is None:
        return problems
    found = list(problems)
    masking_on = _masking_configured(policies)
    for rule in policies.rules:
        found.extend(_glob_problems(rule))
        found.extend(_never_matches(rule))
        if not masking_on:
            found.extend(_without_masking(rule))
    found.extend(_shadowed(policies))
    return found


def _masking_configured(policies: PolicySet) -> bool:
    from hoopops.masking import MaskingRules

    try:
        # A placeholder secret: only whether any rule exists matters here.
        return MaskingRules.from_sections(policies.masking_sections, "lint").active
    except Exception:
        return True  # loading reports a broken masking section; do not pile on


def _without_masking(rule: Rule) -> list[PolicyProblem]:
    when = rule.raw.get("when") or {}
    return [_warn(rule, f"when.{key}", f"rule '{rule.id}' can never match: no masking "
                  "section in the folder marks any column sensitive")
            for key in when if key in MASKING_KEYS and when[key] is not False]


def _warn(rule: Rule, key: str, message: str) -> PolicyProblem:
    return PolicyProblem(rule.file, _line(rule, key), key, message, "warning")


def _line(rule: Rule, key: str) -> int | None:
    from hoopops.yamlfile import load_located

    # Lines of nested keys are not kept on the rule; look them up once per warning.
    try:
        doc = load_located(rule.file)
    except Exception:
        return rule.line
    rules = doc.data.get("rules", []) if isinstance(doc.data, dict) else []
    for index, raw in enumerate(rules):
        if isinstance(raw, dict) and raw.get("id") == rule.id:
            return doc.line_of(f"rules.{index}.{key}") if key else doc.line_of(f"rules.{index}")
    return rule.line


def _patterns(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else [v for v in value if isinstance(v, str)]


def _glob_problems(rule: Rule) -> list[PolicyProblem]:
    out: list[PolicyProblem] = []
    for part in ("when", "unless"):
        cond = rule.raw.get(part) or {}
        for key, value in cond.items():
            if key not in NAME_KEYS and key not in IDENTITY_KEYS and key not in MASKING_KEYS:
                continue
            if isinstance(value, bool):
                continue
            for pattern in _patterns(value):
                where = f"{part}.{key}"
                if pattern.count("[") != pattern.count("]"):
                    out.append(_warn(rule, where, f"glob '{pattern}' has an unbalanced '[' "
                                     "and matches only that literal text"))
                if any(ch.isspace() for ch in pattern):
                    out.append(_warn(rule, where, f"glob '{pattern}' contains white space; "
                                     "PostgreSQL names in facts never do unless quoted"))
                if key in NAME_KEYS or key in MASKING_KEYS:
                    parts = pattern.split(".")
                    if any(p == "" for p in parts):
                        out.append(_warn(rule, where, f"'{pattern}' has an empty name part"))
                    elif len(parts) > _MAX_PARTS[key]:
                        out.append(_warn(rule, where, f"'{pattern}' has more name parts "
                                         f"than a {key.rstrip('s').replace('_', ' ')} "
                                         "name can have"))
    return out


def _never_matches(rule: Rule) -> list[PolicyProblem]:
    when = rule.raw.get("when") or {}
    out: list[PolicyProblem] = []
    if when.get("parse_error") is True:
        for key in when:
            if key in _FACT_KEYS:
                out.append(_warn(rule, f"when.{key}", f"rule '{rule.id}' can never match: "
                                 f"text that does not parse has no {key}"))
    kinds = set(_patterns(when.get("kinds", [])))
    if when.get("unbounded") is True and kinds and "write" not in kinds:
        out.append(_warn(rule, "when.unbounded", f"rule '{rule.id}' can never match: only "
                         "writes are unbounded, and kinds does not include write"))
    if kinds == {"read"}:
        for key in ("tables_written", "columns_written"):
            if key in when:
                out.append(_warn(rule, f"when.{key}", f"rule '{rule.id}' can never match: "
                                 "statements of kind read write nothing"))
    return out


def _shadowed(policies: PolicySet) -> list[PolicyProblem]:
    out: list[PolicyProblem] = []
    rules = policies.rules
    for j, later in enumerate(rules):
        for earlier in rules[:j]:
            if _covers(earlier, later):
                if earlier.action == later.action:
                    message = (f"rule '{later.id}' is redundant: rule '{earlier.id}' "
                               f"({earlier.where}) already matches every statement it "
                               f"matches, with the same action")
                else:
                    message = (f"rule '{later.id}' is shadowed by rule '{earlier.id}' "
                               f"({earlier.where}), which matches every statement it "
                               f"matches first; it never takes effect")
                out.append(PolicyProblem(later.file, later.line, "id", message, "warning"))
                break
    return out


def _covers(a: Rule, b: Rule) -> bool:
    """Does every statement (and identity) that ``b`` matches also match ``a``?"""
    if a.unless is not None:
        return False
    if a.when.parse_error != b.when.parse_error:
        return False
    a_when = a.raw.get("when") or {}
    b_when = b.raw.get("when") or {}
    for key, a_value in a_when.items():
        if key == "parse_error":
            continue
        candidates = [k for k in _NARROWER.get(key, (key,)) if k in b_when]
        if not candidates:
            return False
        if not all(_narrower(key, a_value, b_when[k]) for k in candidates):
            return False
        if key in _NARROWER and len(candidates) < 1:
            return False
    return True


def _narrower(key: str, a_value: Any, b_value: Any) -> bool:
    if key in BOOL_KEYS:
        return bool(a_value == b_value)
    if key in MASKING_KEYS and (isinstance(a_value, bool) or isinstance(b_value, bool)):
        # true covers every list of names; a list covers neither true nor false.
        return (a_value is True and b_value is not False) or a_value == b_value
    if key == "sql":
        return bool(a_value == b_value)
    a_list, b_list = _patterns(a_value), _patterns(b_value)
    if key in ("kinds", "statement_types"):
        return set(b_list) <= set(a_list)
    if key in IDENTITY_KEYS:
        return all(any(fnmatch.fnmatchcase(b, a) for a in a_list) for b in b_list)
    matcher = NameMatcher(a_list)
    return all(matcher.match(b) for b in b_list)

"""Policies: load ``policies/*.yaml``, decide each statement, reload safely.

A policy folder holds YAML files read in file-name order; their ``rules`` form one list.
Each statement is decided by the first rule whose ``when`` matches (and whose ``unless``
does not), else by ``default``. A query string with several statements gets the
strictest decision of its statements (block > review > allow). See policies/README.md
for the language.

Built in, before any rule and not overridable: text that cannot be analysed (too long,
too deeply nested, NUL bytes, invalid UTF-8, an EXECUTE of an unknown statement, a failed
catalog lookup) and text the server could read differently from the gateway
(``lexing_risk``) are blocked. Text that does not parse is blocked unless a rule with
``parse_error: true`` matches it.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hoopops.events import POLICY_RELOADED, EventBus
from hoopops.identity import Identity
from hoopops.sql import (
    KINDS,
    STATEMENT_TYPES,
    Analysis,
    EffectTable,
    FunctionEffect,
    StatementFacts,
    apply_function_effects,
    builtin_effects,
    split_name,
)
from hoopops.sql.effects import parse_function_entries
from hoopops.yamlfile import LocatedYaml, YamlFileError, load_located

ACTIONS = ("allow", "review", "block")
STRICTNESS = {"allow": 0, "review": 1, "block": 2}
DEFAULT_ACTION = "block"

TOP_KEYS = frozenset({"default", "rules", "masking", "side_effect_functions", "description"})
RULE_KEYS = frozenset({"id", "description", "when", "unless", "action"})
IDENTITY_KEYS = ("subjects", "groups", "targets")
NAME_KEYS = {
    "tables": ("tables_read", "tables_written"),
    "tables_read": ("tables_read",),
    "tables_written": ("tables_written",),
    "columns": ("columns", "columns_written"),
    "columns_read": ("columns",),
    "columns_written": ("columns_written",),
    "filter_columns": ("filter_columns",),
    "functions": ("functions",),
}
BOOL_KEYS = ("dangerous", "unbounded", "parse_error", "changes_data", "changes_schema",
             "changes_server", "row_locks")
SET_KEYS = ("kinds", "statement_types")
# What a statement does with columns masking covers (StatementFacts.masking): true / false,
# or globs over the sensitive schema.table.column names involved.
MASKING_KEYS = ("sensitive_read", "sensitive_in_predicates", "sensitive_copied",
                "sensitive_targets", "sensitive_opaque", "sensitive_placeholders")
CONDITION_KEYS = frozenset((*IDENTITY_KEYS, *NAME_KEYS, *BOOL_KEYS, *SET_KEYS, *MASKING_KEYS,
                            "sql"))
_RULE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")


class PolicyError(YamlFileError):
    """A policy folder that cannot be used (file, line, key and reason in the message)."""


@dataclass(frozen=True)
class PolicyProblem:
    """One finding of loading or linting: an error (unusable) or a warning."""

    file: str
    line: int | None
    key: str | None
    message: str
    severity: str = "error"

    def __str__(self) -> str:
        where = self.file + (f":{self.line}" if self.line else "")
        what = f" {self.key}:" if self.key else ""
        return f"{where}: {self.severity}:{what} {self.message}"

    @classmethod
    def from_error(cls, exc: YamlFileError, severity: str = "error") -> PolicyProblem:
        return cls(exc.file, exc.line, exc.key, exc.reason, severity)


# -- matching ------------------------------------------------------------------------------


class NameMatcher:
    """Globs over dotted names (``schema.table.column``), compared from the right.

    A pattern with fewer parts than a name ignores the name's leading parts
    (``customers.ssn`` matches ``public.customers.ssn``); a name with fewer parts than a
    pattern is compared on the parts it has (``customers`` written unqualified in SQL
    matches ``public.customers``, since the search path may resolve it there). A ``*``
    name part (``customers.*``: every column) matches any pattern part. Case-insensitive.
    """

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = tuple(patterns)
        self._compiled = [tuple(re.compile(fnmatch.translate(part), re.IGNORECASE)
                                for part in split_name(p)) for p in self.patterns]
        self._memo: dict[str, bool] = {}

    def match(self, name: str) -> bool:
        found = self._memo.get(name)
        if found is None:
            found = self._match(name)
            if len(self._memo) > 50_000:
                self._memo.clear()
            self._memo[name] = found
        return found

    def any(self, names: Iterable[str]) -> bool:
        memo = self._memo
        for name in names:
            found = memo.get(name)
            if found is None:
                found = self.match(name)
            if found:
                return True
        return False

    def _match(self, name: str) -> bool:
        parts = split_name(name)
        for compiled in self._compiled:
            depth = min(len(parts), len(compiled))
            for i in range(1, depth + 1):
                part = parts[-i]
                if part != "*" and not compiled[-i].match(part):
                    break
            else:
                return True
        return False


def _glob_list(value: Any, doc: LocatedYaml, key: str) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise doc.error(key, "expected a name or a non-empty list of names (globs allowed)")
    out = []
    for index, item in enumerate(items):
        if not isinstance(item, str) or not item.strip():
            raise doc.error(f"{key}.{index}" if isinstance(value, list) else key,
                            "expected a non-empty name or glob")
        out.append(item.strip())
    return out


Predicate = Callable[[StatementFacts], bool]


@dataclass
class Condition:
    """A compiled ``when`` / ``unless``: every key must match (keys are ANDed)."""

    raw: dict[str, Any]
    subjects: tuple[str, ...] | None = None
    groups: tuple[str, ...] | None = None
    targets: tuple[str, ...] | None = None
    predicates: list[Predicate] = field(default_factory=list)
    parse_error: bool = False
    match: Predicate = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.match = _combine(self.predicates)

    def identity_matches(self, identity: Identity | None, target: str | None) -> bool:
        if self.subjects is not None and (identity is None or not any(
                fnmatch.fnmatchcase(identity.subject, p) for p in self.subjects)):
            return False
        if self.groups is not None and (identity is None or not any(
                fnmatch.fnmatchcase(g, p) for g in identity.groups for p in self.groups)):
            return False
        return self.targets is None or (target is not None and any(
            fnmatch.fnmatchcase(target, p) for p in self.targets))



def _always(facts: StatementFacts) -> bool:
    return True


def _combine(predicates: list[Predicate]) -> Predicate:
    """One callable for a list of predicates (cheapest first), for the hot path."""
    if not predicates:
        return _always
    if len(predicates) == 1:
        return predicates[0]
    items = tuple(predicates)

    def match(facts: StatementFacts) -> bool:
        # A plain loop: all() over a generator costs a frame per call on the hot path.
        for predicate in items:  # noqa: SIM110
            if not predicate(facts):
                return False
        return True

    return match


def compile_condition(raw: Any, doc: LocatedYaml, key: str) -> Condition:
    if raw is None:
        return Condition({})
    if not isinstance(raw, dict):
        raise doc.error(key, "expected a mapping of conditions, e.g. {kinds: [read]}")
    identity: dict[str, tuple[str, ...]] = {}
    parse_error = False
    cheap: list[Predicate] = []
    costly: list[Predicate] = []
    for name, value in raw.items():
        where = f"{key}.{name}"
        if name not in CONDITION_KEYS:
            hint = _suggest(str(name), CONDITION_KEYS)
            raise doc.error(where, f"unknown condition '{name}'{hint}; conditions are: "
                            + ", ".join(sorted(CONDITION_KEYS)))
        if name in IDENTITY_KEYS:
            identity[name] = tuple(_glob_list(value, doc, where))
        elif name in BOOL_KEYS:
            if not isinstance(value, bool):
                raise doc.error(where, "expected true or false")
            if name == "parse_error":
                # Checked once per rule, before any predicate (see decide_statement).
                parse_error = value
            else:
                cheap.append(_bool_predicate(name, value))
        elif name == "kinds":
            kinds = _glob_list(value, doc, where)
            unknown = [k for k in kinds if k not in KINDS]
            if unknown:
                raise doc.error(where, f"unknown kind '{unknown[0]}'; kinds are: "
                                + ", ".join(KINDS))
            wanted = frozenset(kinds)
            cheap.append(lambda f, w=wanted: not f.kinds.isdisjoint(w))
        elif name == "statement_types":
            types = _glob_list(value, doc, where)
            unknown = [t for t in types if t not in STATEMENT_TYPES]
            if unknown:
                hint = _suggest(unknown[0], STATEMENT_TYPES)
                raise doc.error(where, f"unknown statement type '{unknown[0]}'{hint} "
                                "(use PostgreSQL parse-node names such as SelectStmt)")
            wanted = frozenset(types)
            cheap.append(lambda f, w=wanted: f.statement_type in w
                         or any(t in w for t in f.wrapped))
        elif name in NAME_KEYS:
            matcher = NameMatcher(_glob_list(value, doc, where))
            attrs = NAME_KEYS[name]
            if len(attrs) == 1:
                attr = attrs[0]
                costly.append(lambda f, m=matcher, a=attr: m.any(getattr(f, a)))
            else:
                costly.append(lambda f, m=matcher, a=attrs: any(m.any(getattr(f, x))
                                                                for x in a))
        elif name in MASKING_KEYS:
            if isinstance(value, bool):
                cheap.append(_masking_any(name, value))
            else:
                if isinstance(value, (list, str)) and value:
                    globs = _glob_list(value, doc, where)
                else:
                    raise doc.error(where, "expected true, false, or column globs "
                                    "(schema.table.column, e.g. [\"*.customers.ssn\"])")
                costly.append(_masking_names(name, NameMatcher(globs)))
        elif name == "sql":
            if not isinstance(value, str) or not value:
                raise doc.error(where, "expected a regular expression")
            try:
                pattern = re.compile(value)
            except re.error as exc:
                raise doc.error(where, f"invalid regular expression: {exc}") from None
            costly.append(lambda f, p=pattern: p.search(f.normalized) is not None)
    return Condition(dict(raw), identity.get("subjects"), identity.get("groups"),
                     identity.get("targets"), cheap + costly, parse_error)


def _bool_predicate(name: str, value: bool) -> Predicate:
    return lambda f: bool(getattr(f, name)) is value


def _masking_any(name: str, value: bool) -> Predicate:
    # ``masking`` is None for every statement that involves no sensitive column.
    if value:
        return lambda f: f.masking is not None and bool(getattr(f.masking, name))
    return lambda f: f.masking is None or not getattr(f.masking, name)


def _masking_names(name: str, matcher: NameMatcher) -> Predicate:
    return lambda f: f.masking is not None and matcher.any(getattr(f.masking, name))


def _suggest(word: str, choices: Iterable[str]) -> str:
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


# -- rules and policy sets -----------------------------------------------------------------


@dataclass
class Rule:
    id: str
    action: str
    description: str | None
    when: Condition
    unless: Condition | None
    file: str
    line: int | None
    raw: dict[str, Any]

    @property
    def where(self) -> str:
        return self.file + (f":{self.line}" if self.line else "")


Applicable = tuple[tuple[Rule, Condition | None], ...]


@dataclass
class PolicySet:
    """One loaded version of a policy folder."""

    folder: Path
    files: tuple[Path, ...]
    rules: tuple[Rule, ...]
    default: str
    default_where: str | None
    version: str
    masking_sections: list[tuple[str, LocatedYaml, Any]]
    side_effect_functions: dict[str, FunctionEffect]
    effects: EffectTable | None
    _rules_for: dict[tuple[Any, ...], Applicable] = field(default_factory=dict,
                                                               repr=False)
    # (analyser shape, subject, groups, target) -> the decision on one text of that shape.
    # Lives and dies with this version of the policy, so a reload starts it empty.
    _decided: dict[tuple[Any, ...], Decision] = field(default_factory=dict, repr=False)
    _uses: dict[str, bool] = field(default_factory=dict, repr=False)

    def uses(self, key: str) -> bool:
        """Whether any rule's ``when`` or ``unless`` names the condition ``key``."""
        found = self._uses.get(key)
        if found is None:
            found = self._uses[key] = any(
                key in (rule.raw.get(part) or {}) for rule in self.rules
                for part in ("when", "unless"))
        return found

    def rules_for(self, identity: Identity | None, target: str | None) -> Applicable:
        """The rules whose identity and target conditions hold (cached per identity)."""
        key = (identity.subject, identity.groups, target) if identity is not None \
            else (None, (), target)
        rules = self._rules_for.get(key)
        if rules is None:
            found = (_applicable(r, identity, target) for r in self.rules)
            rules = tuple(entry for entry in found if entry is not None)
            if len(self._rules_for) > 10_000:
                self._rules_for.clear()
            self._rules_for[key] = rules
        return rules


def _applicable(rule: Rule, identity: Identity | None, target: str | None
                ) -> tuple[Rule, Condition | None] | None:
    """(rule, the `unless` that applies to this identity) or None if the rule cannot apply."""
    if not rule.when.identity_matches(identity, target):
        return None
    unless = rule.unless
    if unless is None or not unless.identity_matches(identity, target):
        return rule, None
    if not unless.predicates:
        return None
    return rule, unless


def policy_files(folder: Path) -> list[Path]:
    return sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")], key=lambda p: p.name)


def load_policy_folder(folder: Path) -> tuple[PolicySet | None, list[PolicyProblem]]:
    """Load ``folder``, collecting every problem instead of stopping at the first."""
    folder = Path(folder)
    problems: list[PolicyProblem] = []
    if not folder.is_dir():
        problems.append(PolicyProblem(str(folder), None, None,
                                      "is not a folder of policy files"))
        return None, problems
    files = policy_files(folder)
    if not files:
        problems.append(PolicyProblem(str(folder), None, None,
                                      "holds no policy files (*.yaml); with no policy "
                                      "every statement would be refused"))
        return None, problems
    digest = hashlib.sha256()
    rules: list[Rule] = []
    ids: dict[str, Rule] = {}
    default: str | None = None
    default_where: str | None = None
    masking: list[tuple[str, LocatedYaml, Any]] = []
    extra: dict[str, FunctionEffect] = {}
    for path in files:
        try:
            raw_bytes = path.read_bytes()
        except OSError as exc:
            problems.append(PolicyProblem(str(path), None, None,
                                          f"cannot read file: {exc.strerror}"))
            continue
        digest.update(path.name.encode() + b"\0" + raw_bytes + b"\0")
        try:
            doc = load_located(path, raw_bytes.decode("utf-8"))
        except UnicodeDecodeError:
            problems.append(PolicyProblem(str(path), None, None, "file is not valid UTF-8"))
            continue
        except YamlFileError as exc:
            problems.append(PolicyProblem.from_error(exc))
            continue
        data = doc.data
        if data is None:
            continue
        if not isinstance(data, dict):
            problems.append(PolicyProblem(str(path), 1, None, "expected a mapping with "
                                          "'rules' and/or 'default'"))
            continue
        for key in data:
            if key not in TOP_KEYS:
                err = doc.error(str(key), f"unknown top-level key '{key}'"
                                f"{_suggest(str(key), TOP_KEYS)}; allowed: "
                                + ", ".join(sorted(TOP_KEYS)))
                problems.append(PolicyProblem.from_error(err))
        if "default" in data:
            value = data["default"]
            if value not in ACTIONS:
                problems.append(PolicyProblem.from_error(doc.error(
                    "default", f"expected one of {', '.join(ACTIONS)}")))
            elif default is not None and value != default:
                problems.append(PolicyProblem.from_error(doc.error(
                    "default", f"conflicts with default: {default} in {default_where}")))
            else:
                default = value
                default_where = f"{path}:{doc.line_of('default')}"
        if "description" in data and not isinstance(data["description"], str):
            problems.append(PolicyProblem.from_error(doc.error("description",
                                                               "expected text")))
        if "masking" in data:
            masking.append((str(path), doc, data["masking"]))
        if "side_effect_functions" in data:
            try:
                extra.update(parse_function_entries(data["side_effect_functions"], doc,
                                                    "side_effect_functions"))
            except YamlFileError as exc:
                problems.append(PolicyProblem.from_error(exc))
        raw_rules = data.get("rules", [])
        if raw_rules is None:
            raw_rules = []
        if not isinstance(raw_rules, list):
            problems.append(PolicyProblem.from_error(doc.error(
                "rules", "expected a list of rules")))
            continue
        for index, raw in enumerate(raw_rules):
            try:
                rule = _compile_rule(raw, doc, f"rules.{index}")
            except YamlFileError as exc:
                problems.append(PolicyProblem.from_error(exc))
                continue
            if rule.id in ids:
                problems.append(PolicyProblem.from_error(doc.error(
                    f"rules.{index}.id", f"duplicate rule id '{rule.id}' (first used at "
                    f"{ids[rule.id].where})")))
                continue
            ids[rule.id] = rule
            rules.append(rule)
    if any(p.severity == "error" for p in problems):
        return None, problems
    effects = builtin_effects().extended(extra) if extra else None
    return PolicySet(
        folder=folder, files=tuple(files), rules=tuple(rules),
        default=default or DEFAULT_ACTION, default_where=default_where,
        version=digest.hexdigest(), masking_sections=masking,
        side_effect_functions=extra, effects=effects,
    ), problems


def _compile_rule(raw: Any, doc: LocatedYaml, key: str) -> Rule:
    if not isinstance(raw, dict):
        raise doc.error(key, "expected a rule: a mapping with id, when and action")
    for name in raw:
        if name not in RULE_KEYS:
            raise doc.error(f"{key}.{name}", f"unknown rule key '{name}'"
                            f"{_suggest(str(name), RULE_KEYS)}; a rule has: "
                            + ", ".join(sorted(RULE_KEYS)))
    rule_id = raw.get("id")
    if not isinstance(rule_id, str) or not _RULE_ID.match(rule_id):
        raise doc.error(f"{key}.id" if "id" in raw else key,
                        "every rule needs an id: letters, digits, '-', '_', '.', ':'")
    if rule_id.startswith("builtin:") or rule_id == "default":
        raise doc.error(f"{key}.id", f"the rule id '{rule_id}' is reserved")
    action = raw.get("action")
    if action not in ACTIONS:
        raise doc.error(f"{key}.action" if "action" in raw else key,
                        f"expected action: {' | '.join(ACTIONS)}")
    description = raw.get("description")
    if description is not None and not isinstance(description, str):
        raise doc.error(f"{key}.description", "expected text")
    when = compile_condition(raw.get("when"), doc, f"{key}.when")
    unless = compile_condition(raw["unless"], doc, f"{key}.unless") \
        if raw.get("unless") is not None else None
    if unless is not None and unless.parse_error:
        raise doc.error(f"{key}.unless.parse_error",
                        "parse_error belongs in 'when' (unparseable text has no facts)")
    return Rule(rule_id, action, description.strip() if description else None, when, unless,
                doc.file, doc.line_of(key), raw)


def load_policies(folder: Path) -> PolicySet:
    """Load a policy folder; raises PolicyError naming file, line and key of the first error."""
    policies, problems = load_policy_folder(folder)
    for problem in problems:
        if problem.severity == "error":
            raise PolicyError(problem.file, problem.line, problem.key, problem.message)
    assert policies is not None
    return policies


# -- decisions -----------------------------------------------------------------------------


# Decisions are built per statement on the hot path, where frozen construction costs
# microseconds: slotted and mutable, but treat them as immutable (they are shared).
@dataclass(slots=True, eq=False)
class StatementDecision:
    action: str
    rule_id: str
    rule_description: str | None


@dataclass(slots=True, eq=False)
class Decision:
    """The verdict on one query string (the strictest of its statements)."""

    action: str
    rule_id: str
    rule_description: str | None
    message: str
    analysis: Analysis
    elapsed_us: float
    statement_index: int | None = None
    statements: tuple[StatementDecision, ...] = ()
    policy_version: str | None = None

    @property
    def allowed(self) -> bool:
        return self.action == "allow"

    def to_dict(self) -> dict[str, Any]:
        facts = self.analysis.statements
        return {
            "decision": self.action,
            "rule": self.rule_id,
            "rule_description": self.rule_description,
            "message": self.message,
            "policy_version": self.policy_version,
            "elapsed_us": round(self.elapsed_us, 1),
            "analysis_us": round(self.analysis.elapsed_us, 1),
            "statements": [
                {**facts[i].to_dict(), "decision": d.action, "rule": d.rule_id}
                for i, d in enumerate(self.statements)
            ],
        }


BUILTIN_DESCRIPTIONS = {
    "builtin:empty": "empty statements do nothing",
    "builtin:unanalysable": "statements hoopops cannot analyse are refused",
    "builtin:lexing-risk": "the server must read SQL text exactly as the gateway does",
    "builtin:parse-error": "statements that do not parse are refused",
    "builtin:no-policy": "no policy is loaded",
}


def _builtin(facts: StatementFacts) -> tuple[str, str] | None:
    if facts.unanalysable is not None:
        return "builtin:unanalysable", facts.unanalysable
    if facts.lexing_risk:
        return "builtin:lexing-risk", facts.lexing_risk[0]
    return None


def decide_statement(policies: PolicySet, rules: Applicable, facts: StatementFacts
                     ) -> tuple[str, str, str | None]:
    """(action, rule id, description) for one statement."""
    if facts.unanalysable is not None or facts.lexing_risk:
        builtin = _builtin(facts)
        if builtin is not None:
            return "block", builtin[0], builtin[1]
    unparsed = facts.parse_error is not None
    for rule, unless in rules:
        when = rule.when
        if when.parse_error is not unparsed or not when.match(facts):
            continue
        if unless is not None and unless.match(facts):
            continue
        return rule.action, rule.id, rule.description
    if facts.parse_error is not None:
        return "block", "builtin:parse-error", f"the statement does not parse: " \
            f"{facts.parse_error}"
    return policies.default, "default", "no rule matched; the policy default applies"


def _message(action: str, rule_id: str, description: str | None, index: int | None,
             count: int) -> str:
    if action == "allow":
        return ""
    about = f"rule {rule_id}" + (f": {description}" if description else "")
    where = f"statement {index + 1} of {count}: " if index is not None and count > 1 else ""
    if action == "block":
        return f"hoopops blocked this statement ({where}{about})"
    return f"hoopops: this statement needs approval ({where}{about})"


@dataclass(frozen=True)
class ReloadResult:
    changed: bool
    version: str | None
    error: YamlFileError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class PolicyEngine:
    """Holds the policy in force; decides statements; reloads without ever going blank."""

    def __init__(self, folder: Path | str, *, bus: EventBus | None = None) -> None:
        self.folder = Path(folder)
        self.bus = bus
        # The policy in force: one attribute, replaced whole by a reload (read for every
        # statement, so not behind a property).
        self.policies: PolicySet = load_policies(self.folder)
        self._signature = _folder_signature(self.folder)
        self.last_error: YamlFileError | None = None

    @classmethod
    def from_policies(cls, policies: PolicySet, *, bus: EventBus | None = None
                      ) -> PolicyEngine:
        engine = cls.__new__(cls)
        engine.folder = policies.folder
        engine.bus = bus
        engine.policies = policies
        engine._signature = _folder_signature(policies.folder)
        engine.last_error = None
        return engine

    @property
    def version(self) -> str:
        return self.policies.version

    def decide(self, identity: Identity | None, target: str | None, analysis: Analysis
               ) -> Decision:
        started = time.perf_counter()
        policies = self.policies
        statements = analysis.statements
        # One statement whose facts are its shape's (a new literal, or a text seen before):
        # the decision follows from the shape, the identity and this policy version alone.
        key = None
        if len(statements) == 1:
            shape = statements[0]._shape
            if shape is not None:
                key = (shape, identity.subject, identity.groups, target) if identity \
                    is not None else (shape, None, None, target)
                hit = policies._decided.get(key)
                if hit is not None:
                    return Decision(hit.action, hit.rule_id, hit.rule_description,
                                    hit.message, analysis,
                                    (time.perf_counter() - started) * 1e6, 0,
                                    hit.statements, hit.policy_version)
        decision = self._decide(policies, identity, target, analysis, started)
        if key is not None and decision.analysis is analysis:
            # Not when the policy's side_effect_functions changed the facts: a hit hands
            # back the analysis it was given, which would lack those effects.
            decided = policies._decided
            if len(decided) >= 50_000:
                decided.clear()
            decided[key] = decision
        return decision

    def _decide(self, policies: PolicySet, identity: Identity | None, target: str | None,
                analysis: Analysis, started: float) -> Decision:
        if policies.effects is not None:
            analysis = apply_function_effects(analysis, policies.effects)
        statements = analysis.statements
        if not statements:
            return Decision("allow", "builtin:empty", BUILTIN_DESCRIPTIONS["builtin:empty"],
                            "", analysis, (time.perf_counter() - started) * 1e6, None, (),
                            policies.version)
        rules = policies.rules_for(identity, target)
        per: list[StatementDecision] = []
        worst = -1
        worst_index = 0
        for index, facts in enumerate(statements):
            action, rule_id, description = decide_statement(policies, rules, facts)
            per.append(StatementDecision(action, rule_id, description))
            if STRICTNESS[action] > worst:
                worst = STRICTNESS[action]
                worst_index = index
        chosen = per[worst_index]
        message = _message(chosen.action, chosen.rule_id, chosen.rule_description,
                           worst_index, len(statements))
        return Decision(chosen.action, chosen.rule_id, chosen.rule_description, message,
                        analysis, (time.perf_counter() - started) * 1e6, worst_index,
                        tuple(per), policies.version)

    # -- reloading -----------------------------------------------------------------------

    def reload(self) -> ReloadResult:
        """Load the folder again; on error keep the policy in force and report why."""
        signature = _folder_signature(self.folder)
        try:
            policies = load_policies(self.folder)
        except Exception as exc:  # whatever goes wrong, the policy in force stays
            error = exc if isinstance(exc, YamlFileError) else PolicyError(
                self.folder, None, None, f"could not be loaded: {exc}")
            self._signature = signature
            self.last_error = error
            self._publish(None, error)
            return ReloadResult(False, self.policies.version, error)
        self._signature = signature
        self.last_error = None
        if policies.version == self.policies.version:
            return ReloadResult(False, policies.version)
        self.policies = policies
        self._publish(policies, None)
        return ReloadResult(True, policies.version)

    def changed_on_disk(self) -> bool:
        return _folder_signature(self.folder) != self._signature

    async def watch(self, interval: float = 1.0,
                    on_reload: Callable[[ReloadResult], Any] | None = None) -> None:
        """Poll the folder and reload when a file changes; runs until cancelled."""
        while True:
            await asyncio.sleep(interval)
            if await asyncio.to_thread(self.changed_on_disk):
                result = await asyncio.to_thread(self.reload)
                if on_reload is not None:
                    on_reload(result)

    def _publish(self, policies: PolicySet | None, error: YamlFileError | None) -> None:
        if self.bus is None:
            return
        current = policies or self.policies
        self.bus.publish(POLICY_RELOADED, version=current.version,
                         files=[str(p) for p in current.files],
                         error=str(error) if error else None)


def _folder_signature(folder: Path) -> tuple[tuple[str, int, int], ...]:
    out = []
    try:
        for path in policy_files(folder):
            try:
                stat = path.stat()
            except OSError:
                continue
            out.append((path.name, stat.st_mtime_ns, stat.st_size))
    except OSError:
        return ()
    return tuple(out)

"""Masking rules from the ``masking:`` sections of the policy files, and the plans they make.

Shape of a section (every key optional; sections of several files are merged)::

    masking:
      columns:                          # by source column, globs allowed, right-aligned:
        public.customers.ssn: last4     #   schema.table.column
        "*.email": email_domain         #   table.column in any schema
        public.accounts.iban:           # long form
          strategy: keep_last
          keep: 6
          unmasked_groups: [finance]    # these groups see this column unmasked
      names: {ssn: redact}              # any column with this name, in any table
      types: {public.ssn_t: redact}     # any column of this type (pg_type name)
      detectors: [ssn, credit_card, email, iban]   # or {ssn: last4, email: email_domain}
      custom_detectors:
        employee_id: {pattern: 'EMP-\\d{6}', strategy: redact}
      unmasked_groups: [breakglass]     # exempt from all masking, reported in the audit
      trusted_functions: [public.normalize_phone]  # user functions that only transform args
      on_unknown: redact                # or refuse: what to do with untraceable columns

Strategies: ``redact``, ``null``, ``lastN`` / ``keep_last``, ``email_domain``, ``hash``, and
``detect`` for free-text columns (``"*.customers.note": detect``): read as they are, their
values go through the detectors; any value derived from them is redacted whole.

When several rules cover a column, an exact ``schema.table.column`` rule wins; otherwise
the strictest strategy wins, so a broad rule cannot be weakened by a narrower one.
Names and globs match case-insensitively, which can only mask more.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from hoopops.identity import Identity
from hoopops.masking import detectors as det
from hoopops.masking.codec import (
    CodecError,
    ColumnInfo,
    CopyResponse,
    build_fields,
    build_notification,
    build_parameter_status,
    parse_copy_response,
    parse_fields,
    parse_notification,
    parse_parameter_status,
)
from hoopops.masking.plan import ColumnDecision, MaskingAction, ResultPlan
from hoopops.masking.rewrite import (
    MaskingError,
    MaskingRefused,
    raised_in_function,
    rewrite_fields,
)
from hoopops.masking.sources import (
    UNKNOWN_FUNCTION,
    CopyOptions,
    OutputSources,
    RelationLookup,
    SourceColumn,
    StatementSources,
    analyze,
)
from hoopops.masking.strategies import (
    NULL,
    REDACT,
    Strategy,
    StrategyError,
    combine,
    parse_strategy,
)
from hoopops.yamlfile import LocatedYaml, YamlFileError

Section = tuple[str, LocatedYaml | None, Any]

_SECTION_KEYS = ("columns", "names", "types", "detectors", "custom_detectors",
                 "unmasked_groups", "trusted_functions", "on_unknown")
_RULE_KEYS = ("strategy", "keep", "unmasked_groups")
_ON_UNKNOWN = ("redact", "refuse")
_GLOB = re.compile(r"[*?\[]")
_MATCH_CACHE_LIMIT = 50_000

# Catalog columns that expose other rows' values or other sessions' statements. The
# default policy keeps agents away from them; masking nulls them as a second line.
BUILTIN_SENSITIVE = (
    "pg_catalog.pg_stats.most_common_vals", "pg_catalog.pg_stats.most_common_elems",
    "pg_catalog.pg_stats.histogram_bounds", "pg_catalog.pg_stats_ext.most_common_vals",
    "pg_catalog.pg_stats_ext_exprs.most_common_vals",
    "pg_catalog.pg_stats_ext_exprs.most_common_elems",
    "pg_catalog.pg_stats_ext_exprs.histogram_bounds", "pg_catalog.pg_statistic.stavalues?",
    "pg_catalog.pg_stat_activity.query", "*.pg_stat_statements.query",
)


@dataclass(frozen=True)
class ColumnRule:
    """One sensitive-column rule and where it was written."""

    key: str
    kind: str  # column | name | type
    parts: tuple[str, ...]
    strategy: Strategy
    unmasked_groups: frozenset[str]
    file: str
    line: int | None

    @property
    def exact(self) -> bool:
        return self.kind == "column" and len(self.parts) == 3 and not any(
            _GLOB.search(p) for p in self.parts)

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}" if self.line else self.file

    def matches(self, source: SourceColumn) -> bool:
        if self.kind == "type":
            if source.type_name is None:
                return False
            name = source.type_name.lower()
            pattern = self.parts[0]
            return fnmatch.fnmatchcase(name if "." in pattern else name.rpartition(".")[2],
                                       pattern)
        names = (source.schema.lower(), source.table.lower(), source.column.lower())
        return all(fnmatch.fnmatchcase(n, p) for n, p in zip(
            names[-len(self.parts):], self.parts, strict=True))


@dataclass(frozen=True)
class MaskingFacts:
    """What a statement does with sensitive columns, for the policy engine to decide on.

    Masking cannot stop inference (``WHERE ssn LIKE '1%'``), copies into other tables
    (``INSERT INTO t SELECT ssn ...``), masked placeholders written back, or code it cannot
    see through; these facts let the policy review or block such statements.
    """

    sensitive_read: tuple[str, ...] = ()
    sensitive_in_predicates: tuple[str, ...] = ()
    sensitive_copied: tuple[str, ...] = ()
    sensitive_targets: tuple[str, ...] = ()
    opaque: tuple[str, ...] = ()
    # Sensitive columns passed to code the analysis cannot see through, and sensitive
    # columns a value that looks like masking output (``***-**-6789``) is written to.
    sensitive_opaque: tuple[str, ...] = ()
    sensitive_placeholders: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, list[str]]:
        return {k: list(getattr(self, k)) for k in (
            "sensitive_read", "sensitive_in_predicates", "sensitive_copied",
            "sensitive_targets", "sensitive_opaque", "sensitive_placeholders", "opaque")}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MaskingFacts:
        """The facts :meth:`to_dict` wrote (an audit record's ``masking``)."""
        def names(key: str) -> tuple[str, ...]:
            value = data.get(key)
            return tuple(str(v) for v in value) if isinstance(value, list) else ()

        return cls(names("sensitive_read"), names("sensitive_in_predicates"),
                   names("sensitive_copied"), names("sensitive_targets"), names("opaque"),
                   names("sensitive_opaque"), names("sensitive_placeholders"))

    def __bool__(self) -> bool:
        """Whether any sensitive column is involved (``opaque`` alone does not count)."""
        return bool(self.sensitive_read or self.sensitive_in_predicates
                    or self.sensitive_copied or self.sensitive_targets
                    or self.sensitive_opaque or self.sensitive_placeholders)

    def without(self, columns: Collection[str]) -> MaskingFacts:
        """These facts with ``columns`` left out (columns the identity sees unmasked)."""
        def keep(names: tuple[str, ...]) -> tuple[str, ...]:
            return tuple(n for n in names if n not in columns)

        return MaskingFacts(keep(self.sensitive_read), keep(self.sensitive_in_predicates),
                            keep(self.sensitive_copied), keep(self.sensitive_targets),
                            self.opaque, keep(self.sensitive_opaque),
                            keep(self.sensitive_placeholders))


class MaskingRules:
    """All masking rules in force; immutable, so a policy reload swaps the whole object."""

    def __init__(self, rules: Sequence[ColumnRule], detectors: Sequence[det.Detector],
                 unmasked_groups: Collection[str] = (), trusted_functions: Collection[str] = (),
                 on_unknown: str = "redact") -> None:
        self.rules = tuple(rules)
        self.detectors = det.DetectorSet(detectors)
        self.unmasked_groups = frozenset(unmasked_groups)
        self.trusted_functions = frozenset(trusted_functions)
        self.on_unknown = on_unknown
        self.active = bool(self.rules) or bool(self.detectors)
        if self.active:
            self.rules += tuple(
                ColumnRule(key, "column", tuple(key.split(".")), NULL, frozenset(),
                           "<built-in>", None) for key in BUILTIN_SENSITIVE)
        self._match_cache: dict[SourceColumn, ColumnRule | None] = {}
        # id(hints) -> (hints, facts, per-column unmasked groups); the hints object is kept
        # so that its id cannot be reused while the entry lives.
        self._facts_cache: dict[int, tuple[StatementSources, MaskingFacts | None,
                                           dict[str, frozenset[str]]]] = {}

    # -- building -----------------------------------------------------------------------------

    @classmethod
    def from_sections(cls, sections: Iterable[Section],
                      hmac_secret: str | bytes | None = None) -> MaskingRules:
        """Rules from each policy file's ``masking:`` section, as ``(file, located, data)``.

        ``located`` gives line numbers for errors (None: errors name the file only).
        Raises :class:`YamlFileError` naming file, line and key. No sections, or sections
        without rules or detectors, mean masking is off.
        """
        rules: list[ColumnRule] = []
        seen_rules: dict[tuple[str, str], ColumnRule] = {}
        detectors: dict[str, tuple[det.Detector, str]] = {}
        groups: set[str] = set()
        trusted: set[str] = set()
        on_unknown = "redact"
        for file, located, section in sections:
            reader = _Reader(file, located)
            if section is None:
                continue
            body = reader.mapping(section, "masking", _SECTION_KEYS)
            for kind, key in (("column", "columns"), ("name", "names"), ("type", "types")):
                entries = reader.mapping(body.get(key), f"masking.{key}")
                for pattern, spec in entries.items():
                    rule = reader.rule(kind, str(pattern), spec, f"masking.{key}.{pattern}",
                                       hmac_secret)
                    other = seen_rules.get((kind, rule.key.lower()))
                    if other is not None:
                        raise reader.fail(f"masking.{key}.{pattern}",
                                          f"already set in {other.where}")
                    seen_rules[(kind, rule.key.lower())] = rule
                    rules.append(rule)
            for name, detector in reader.detectors(body.get("detectors"), hmac_secret):
                _add_detector(reader, detectors, name, detector, "masking.detectors")
            custom = reader.mapping(body.get("custom_detectors"), "masking.custom_detectors")
            for name, spec in custom.items():
                key = f"masking.custom_detectors.{name}"
                _add_detector(reader, detectors, str(name),
                              reader.custom(str(name), spec, key, hmac_secret), key)
            groups |= set(reader.strings(body.get("unmasked_groups"), "masking.unmasked_groups"))
            trusted |= set(reader.strings(body.get("trusted_functions"),
                                          "masking.trusted_functions"))
            if "on_unknown" in body:
                value = body["on_unknown"]
                if value not in _ON_UNKNOWN:
                    raise reader.fail("masking.on_unknown",
                                      f"expected one of {', '.join(_ON_UNKNOWN)}")
                if value == "refuse":
                    on_unknown = "refuse"  # the stricter setting wins across files
        return cls(rules, [d for d, _ in detectors.values()], groups, trusted, on_unknown)

    # -- queries ----------------------------------------------------------------------------------

    def __bool__(self) -> bool:
        return self.active

    def enabled_for(self, identity: Identity | None) -> bool:
        """Whether the relay must inspect results for this identity (resolve RowDescription
        origins, build plans). True whenever masking is configured, even for exempt
        identities: their unmasked results are still counted into the audit trail."""
        return self.active

    def exempt_group(self, identity: Identity | None,
                     extra: frozenset[str] = frozenset()) -> str | None:
        """The identity's group that exempts it (globally, or via ``extra``), if any."""
        if identity is None:
            return None
        hits = sorted(set(identity.groups) & (self.unmasked_groups | extra))
        return hits[0] if hits else None

    def match(self, source: SourceColumn) -> ColumnRule | None:
        """The rule covering ``source``: an exact rule, else the strictest match."""
        cached = self._match_cache.get(source, False)
        if cached is not False:
            return cached  # type: ignore[return-value]
        found = [r for r in self.rules if r.matches(source)]
        rule = None
        if found:
            exact = [r for r in found if r.exact]
            rule = exact[0] if exact else min(found, key=lambda r: r.strategy.rank)
        if len(self._match_cache) >= _MATCH_CACHE_LIMIT:
            self._match_cache.clear()
        self._match_cache[source] = rule
        return rule

    async def analyze(self, sql: str, lookup: RelationLookup | None,
                      search_path: str | None = None, user: str | None = None
                      ) -> list[StatementSources]:
        """Source hints for every statement in ``sql`` (see :func:`sources.analyze`):
        pass the session's reported ``search_path`` and user for exact name resolution."""
        return await analyze(sql, lookup, self.trusted_functions, search_path, user)

    def touches_sensitive(self, hints: StatementSources | None) -> bool:
        """Whether the statement reads any sensitive column anywhere (or cannot be traced):
        then error texts get their quoted values redacted (``strict`` mode)."""
        if not self.active:
            return False
        if hints is None or hints.error:
            return True
        return any(self.match(s) is not None for s in hints.referenced)

    def untraceable(self, hints: StatementSources | None) -> bool:
        """Whether the statement runs code the analysis cannot see through (a user
        function, a procedure, a prepared statement or cursor it did not see defined,
        SQL it could not parse): then its errors and notices may carry any value in any
        form, and :meth:`rewrite_error` should withhold their texts."""
        if not self.active:
            return False
        if hints is None or hints.error:
            return True
        # A function the catalog does not know runs nothing: the server refuses the
        # statement ("function ... does not exist"), and that message should get through.
        if any(not reason.startswith(UNKNOWN_FUNCTION) for reason in hints.opaque):
            return True
        return hints.outputs is None and hints.kind in ("execute", "fetch", "call")

    def facts(self, hints: StatementSources) -> MaskingFacts:
        def sensitive(columns: Iterable[SourceColumn]) -> tuple[str, ...]:
            return tuple(sorted({c.qualified for c in columns if self.match(c) is not None}))

        if not self.active:
            return MaskingFacts(opaque=tuple(sorted(hints.opaque)))
        return MaskingFacts(sensitive(hints.referenced), sensitive(hints.predicates),
                            sensitive(hints.written | hints.exported),
                            sensitive(hints.targets), tuple(sorted(hints.opaque)),
                            sensitive(hints.opaque_args))

    def policy_facts(self, hints: StatementSources, identity: Identity | None
                     ) -> MaskingFacts | None:
        """The facts the policy decides on for ``identity``, or None when the statement
        involves no sensitive column it would see masked (the common case, answered
        from a cache per hints object, and the hints are cached per statement shape).

        An identity exempt from masking (``unmasked_groups``, globally or per rule) is
        exempt from these facts the same way: it sees the values anyway."""
        if not self.active:
            return None
        entry = self._facts_cache.get(id(hints))
        if entry is None or entry[0] is not hints:
            entry = (hints, *self._sensitive_facts(hints))
            if len(self._facts_cache) >= _MATCH_CACHE_LIMIT // 10:
                self._facts_cache.clear()
            self._facts_cache[id(hints)] = entry
        facts, groups = entry[1], entry[2]
        if facts is None or self.exempt_group(identity) is not None:
            return None
        if not groups or identity is None:
            return facts
        mine = set(identity.groups)
        exempt = {name for name, allowed in groups.items() if mine & allowed}
        if not exempt:
            return facts
        narrowed = facts.without(exempt)
        return narrowed if narrowed else None

    def _sensitive_facts(self, hints: StatementSources
                         ) -> tuple[MaskingFacts | None, dict[str, frozenset[str]]]:
        involved = (hints.referenced | hints.predicates | hints.written | hints.exported
                    | hints.targets | hints.opaque_args)
        rules = {c.qualified: rule for c in involved if (rule := self.match(c)) is not None}
        if not rules:
            return None, {}
        facts = self.facts(hints)
        groups = {name: rule.unmasked_groups for name, rule in rules.items()
                  if rule.unmasked_groups}
        return (facts if facts else None), groups

    def refusal(self, identity: Identity | None,
                hints: Sequence[StatementSources] | None) -> str | None:
        """Why the statements must not run at all, or None.

        A sensitive value passed to a side-channel function (``pg_notify``,
        ``set_config``, ``setval``, advisory locks: ``StatementSources.exported``) leaves
        where no result masking reaches it (a notification goes to whichever session
        listens), so the statement is refused unless the identity is exempt."""
        if not self.active or not hints or self.exempt_group(identity) is not None:
            return None
        for index, item in enumerate(hints):
            names = sorted({s.qualified for s in item.exported if self.match(s) is not None})
            if names:
                where = f"statement {index + 1} of {len(hints)}: " if len(hints) > 1 else ""
                return (f"hoopops refused this statement: {where}it passes sensitive values "
                        f"({', '.join(names)}) to a function whose effects leave the result "
                        "(a notification, a setting, a sequence or a lock), where they cannot "
                        "be masked; pass the values themselves in a SELECT instead")
        return None

    # -- plans ----------------------------------------------------------------------------------

    def plan(self, identity: Identity | None, columns: Sequence[ColumnInfo],
             source_hints: StatementSources | None) -> ResultPlan | None:
        """The plan for a result with these columns, or None when rows can pass untouched.

        ``columns`` come from RowDescription (with Bind's result formats applied) and the
        catalog's ``origin`` for every column with a table OID; ``source_hints`` is the
        statement's analysis, used for computed columns (table OID 0). A column whose
        table OID has no resolved origin is treated as untraceable.
        Raises :class:`MaskingRefused` when ``on_unknown: refuse`` meets such a column.
        """
        if not self.active:
            return None
        hints = source_hints.outputs_for(len(columns)) if source_hints is not None else None
        # A column with a table OID is that table column's value, except where the
        # statement wrote it (INSERT/UPDATE/MERGE ... RETURNING report the new values under
        # the target's OID): when the analysis lines up with the result, its sources for
        # the column are added, which can only mask more.
        overlay = source_hints is not None and source_hints.aligned(len(columns))
        decisions = []
        for index, column in enumerate(columns):
            if column.table_oid:
                out = column.origin if column.origin is not None else OutputSources.unknown(
                    f"origin of table {column.table_oid} column {column.attnum} not resolved")
                if overlay and hints is not None:
                    out = out.merge(hints[index])
            elif hints is not None:
                out = hints[index]
            else:
                out = OutputSources.unknown("the statement was not analysed")
            decisions.append(self._decide(index, column.name, out, identity))
        return self._make_plan(identity, columns, decisions)

    def plan_copy(self, identity: Identity | None, response: CopyResponse | bytes,
                  source_hints: StatementSources | None) -> ResultPlan | None:
        """The plan for ``COPY ... TO STDOUT``, from its CopyOutResponse (payload or parsed)
        and the COPY statement's analysis (which carries the text/CSV options)."""
        if not self.active:
            return None
        try:
            parsed = parse_copy_response(response) if isinstance(response, bytes) else response
        except CodecError as exc:
            raise MaskingError(str(exc)) from None
        columns = [ColumnInfo(f"column{i + 1}", format_code=f)
                   for i, f in enumerate(parsed.column_formats)]
        hints = source_hints.outputs_for(len(columns)) if source_hints is not None else [
            OutputSources.unknown("the COPY statement was not analysed")] * len(columns)
        decisions = [self._decide(i, c.name, hints[i], identity) for i, c in enumerate(columns)]
        plan = self._make_plan(identity, columns, decisions,
                               source_hints.copy if source_hints is not None else None,
                               parsed.format == 1)
        if plan is not None and not plan.passthrough and plan.copy is None and parsed.format != 1:
            raise MaskingRefused("cannot tell the layout of this COPY output, so it cannot be "
                                 "masked; run COPY as a plain statement")
        return plan

    def _decide(self, index: int, name: str, out: OutputSources,
                identity: Identity | None) -> ColumnDecision:
        matched = [(s, r) for s in sorted(out.sources) if (r := self.match(s)) is not None]
        if out.opaque:
            reason = "; ".join(sorted(out.opaque))
            exempt = self.exempt_group(identity)
            if self.on_unknown == "refuse" and exempt is None:
                raise MaskingRefused(f"result column {name!r} cannot be traced ({reason}), "
                                     "and masking.on_unknown is refuse")
            strategies = [REDACT] + [r.strategy for _, r in matched]
            return ColumnDecision(index, name, f"unknown({name})",
                                  combine(strategies, False), reason, exempt)
        if not matched:
            return ColumnDecision(index, name, "", None, "no rule", detect=True)
        names = "+".join(sorted({s.qualified for s, _ in matched}))
        strategy = combine([r.strategy for _, r in matched], out.direct)
        label = names if out.direct else f"derived({names})"
        reason = "; ".join(sorted({f"{r.key} ({r.where})" for _, r in matched}))
        if strategy.kind == "detect":
            if not self.detectors:  # nothing to look through it with: fail closed
                strategy = REDACT
            else:
                # Free text read as it is: only the detectors (the value is not derived,
                # so they see it exactly as stored).
                return ColumnDecision(index, name, label, None, reason, detect=True)
        groups = [self.exempt_group(identity, r.unmasked_groups) for _, r in matched]
        exempt = groups[0] if all(g is not None for g in groups) else None
        return ColumnDecision(index, name, label, strategy, reason, exempt)

    def _make_plan(self, identity: Identity | None, columns: Sequence[ColumnInfo],
                   decisions: list[ColumnDecision], copy: CopyOptions | None = None,
                   copy_binary: bool = False) -> ResultPlan | None:
        detectors_exempt = self.exempt_group(identity) if self.detectors else None
        if detectors_exempt is not None or not self.detectors:
            decisions = [d if not d.detect else ColumnDecision(
                d.index, d.name, d.label, d.strategy, d.reason, d.exempt, False)
                for d in decisions]
        if not any(d.strategy is not None for d in decisions) and not any(
                d.detect for d in decisions) and detectors_exempt is None:
            return None  # the fast path: forward the rows as bytes
        return ResultPlan(columns, decisions, self.detectors if self.detectors else None,
                          detectors_exempt, copy, copy_binary)

    # -- free text ---------------------------------------------------------------------------

    def mask_bytes(self, data: bytes, identity: Identity | None = None
                   ) -> tuple[bytes, list[MaskingAction]]:
        """Detectors over raw text (no column rules apply to free text)."""
        if not self.detectors or self.exempt_group(identity) is not None:
            return data, []
        if not self.detectors.may_match(data):
            return data, []
        counts: dict[str, int] = {}
        out = self.detectors.scan(data, counts)
        return out, self._detector_actions(counts)

    def mask_text(self, text: str, identity: Identity | None = None
                  ) -> tuple[str, list[MaskingAction]]:
        """Detectors over a string (an error field, a notification payload, ...)."""
        data = text.encode("utf-8", "surrogateescape")
        out, actions = self.mask_bytes(data, identity)
        return (text if out is data else out.decode("utf-8", "surrogateescape")), actions

    def rewrite_error(self, payload: bytes, identity: Identity | None = None,
                      strict: bool = False, withhold: bool = False,
                      keep: Collection[str] = (), numbers: bool = True
                      ) -> tuple[bytes, list[MaskingAction]]:
        """An ErrorResponse or NoticeResponse payload with values masked in its texts.

        Detectors run over every field but severity, SQLSTATE, positions and source
        location. ``strict`` (use :meth:`touches_sensitive`) also redacts quoted values and
        ``Key (...)=(...)`` / ``Failing row contains (...)`` lists in the message, detail,
        context, hint and internal-query fields, which is how errors quote the value they
        failed on; that catches values no detector recognises; with ``numbers`` (use
        :meth:`touches_sensitive`), unquoted words holding a digit too. ``withhold`` (use
        :meth:`untraceable`) replaces those texts entirely: code the analysis cannot see
        (``RAISE NOTICE '%', reverse(card)`` in a user function) can word a value any way.
        In strict mode a message whose context says it was raised in a function (PL/pgSQL,
        SQL or another language: triggers, check constraints, defaults, row security) is
        withheld the same way, whatever the statement. ``keep``: quoted names not to
        redact (``StatementSources.identifiers``: ``relation "x" does not exist`` quotes
        what the statement itself spelled).
        """
        if not self.active or self.exempt_group(identity) is not None:
            return payload, []
        try:
            fields = parse_fields(payload)
        except CodecError as exc:
            raise MaskingError(str(exc)) from None
        counts: dict[str, int] = {}
        # Raised in (or through) user code: a trigger, a check or default function, row
        # security... whatever statement ran, its text may word a value any way.
        withhold = withhold or (strict and raised_in_function(fields))
        names = frozenset(n.encode("utf-8", "surrogateescape") for n in keep)
        if not rewrite_fields(fields, self.detectors or None, counts, strict, withhold, names,
                              numbers):
            return payload, []
        redacted = counts.pop("error_text", 0)
        actions = self._detector_actions(counts)
        if redacted:
            actions.append(MaskingAction("error_text", "redact", redacted))
        return build_fields(fields), actions

    def rewrite_notification(self, payload: bytes, identity: Identity | None = None
                             ) -> tuple[bytes, list[MaskingAction]]:
        """A NotificationResponse payload with detectors run over channel and payload."""
        if not self.detectors or self.exempt_group(identity) is not None:
            return payload, []
        try:
            pid, channel, body = parse_notification(payload)
        except CodecError as exc:
            raise MaskingError(str(exc)) from None
        new_channel, first = self.mask_bytes(channel)
        new_body, second = self.mask_bytes(body)
        if not first and not second:
            return payload, []
        return build_notification(pid, new_channel, new_body), _merge(first + second)

    def rewrite_parameter_status(self, payload: bytes, identity: Identity | None = None
                                 ) -> tuple[bytes, list[MaskingAction]]:
        """A ParameterStatus payload with detectors run over the value."""
        if not self.detectors or self.exempt_group(identity) is not None:
            return payload, []
        try:
            name, value = parse_parameter_status(payload)
        except CodecError as exc:
            raise MaskingError(str(exc)) from None
        new, actions = self.mask_bytes(value)
        if not actions:
            return payload, []
        return build_parameter_status(name, new), actions

    def _detector_actions(self, counts: dict[str, int]) -> list[MaskingAction]:
        labels = {d.name: d.strategy.label for d in self.detectors.detectors}
        return [MaskingAction(f"detector:{name}", labels.get(name, "redact"), count)
                for name, count in sorted(counts.items()) if count]


def _merge(actions: list[MaskingAction]) -> list[MaskingAction]:
    totals: dict[tuple[str, str], int] = {}
    for action in actions:
        key = (action.column, action.strategy)
        totals[key] = totals.get(key, 0) + action.count
    return [MaskingAction(c, s, n) for (c, s), n in sorted(totals.items())]


def _add_detector(reader: _Reader, found: dict[str, tuple[det.Detector, str]], name: str,
                  detector: det.Detector, key: str) -> None:
    previous = found.get(name)
    if previous is not None and previous[0].strategy != detector.strategy:
        raise reader.fail(key, f"detector '{name}' already set with strategy "
                               f"{previous[0].strategy.label} in {previous[1]}")
    found[name] = (detector, reader.where(key))


class _Reader:
    """Validation helpers that raise errors naming file, line and key."""

    def __init__(self, file: str, located: LocatedYaml | None) -> None:
        self.file = file
        self.located = located

    def fail(self, key: str, reason: str) -> YamlFileError:
        if self.located is not None:
            return self.located.error(key, reason)
        return YamlFileError(self.file, None, key, reason)

    def where(self, key: str) -> str:
        line = self.located.line_of(key) if self.located is not None else None
        return f"{self.file}:{line}" if line else self.file

    def line(self, key: str) -> int | None:
        return self.located.line_of(key) if self.located is not None else None

    def mapping(self, value: Any, key: str, allowed: Sequence[str] | None = None
                ) -> dict[Any, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(key, "expected a mapping")
        if allowed is not None:
            for name in value:
                if name not in allowed:
                    raise self.fail(f"{key}.{name}",
                                    f"unknown key; expected one of: {', '.join(allowed)}")
        return value

    def strings(self, value: Any, key: str) -> list[str]:
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.fail(key, "expected a list of names")
        return list(value)

    def strategy(self, spec: Any, key: str, hmac_secret: str | bytes | None,
                 keep: Any = None) -> Strategy:
        if spec is None:
            spec = "null"  # YAML reads `ssn: null` as None; also the strictest reading
        try:
            return parse_strategy(spec, hmac_secret, keep)
        except StrategyError as exc:
            raise self.fail(key, str(exc)) from None

    def rule(self, kind: str, pattern: str, spec: Any, key: str,
             hmac_secret: str | bytes | None) -> ColumnRule:
        parts = tuple(p.strip().lower() for p in pattern.split(".")) if kind == "column" else (
            pattern.strip().lower(),)
        if kind == "type":
            parts = (pattern.strip().lower(),)
        if not pattern.strip() or any(not p for p in parts) or len(parts) > 3:
            what = {"column": "[[schema.]table.]column, globs allowed",
                    "name": "a column name", "type": "a type name, optionally schema.type"}
            raise self.fail(key, f"expected {what[kind]}")
        if isinstance(spec, dict):
            body = self.mapping(spec, key, _RULE_KEYS)
            if "strategy" not in body:
                raise self.fail(key, "missing 'strategy'")
            strategy = self.strategy(body["strategy"], f"{key}.strategy", hmac_secret,
                                     body.get("keep"))
            groups = frozenset(self.strings(body.get("unmasked_groups"),
                                            f"{key}.unmasked_groups"))
        else:
            strategy = self.strategy(spec, key, hmac_secret)
            groups = frozenset()
        return ColumnRule(pattern.strip(), kind, parts, strategy, groups, self.file,
                          self.line(key))

    def detectors(self, value: Any, hmac_secret: str | bytes | None
                  ) -> list[tuple[str, det.Detector]]:
        key = "masking.detectors"
        if value is None:
            return []
        if isinstance(value, list):
            items: list[tuple[Any, Any, str]] = [(n, None, f"{key}.{i}")
                                                 for i, n in enumerate(value)]
        elif isinstance(value, dict):
            items = [(n, s, f"{key}.{n}") for n, s in value.items()]
        else:
            raise self.fail(key, "expected a list of detector names or a mapping name: strategy")
        out = []
        for name, spec, item_key in items:
            if name not in det.BUILTIN:
                raise self.fail(item_key, f"unknown detector {name!r}; built-in detectors are "
                                          f"{', '.join(sorted(det.BUILTIN))} (add others under "
                                          "masking.custom_detectors)")
            strategy = None if spec is None else self.strategy(spec, item_key, hmac_secret)
            out.append((name, det.builtin(name, strategy)))
        return out

    def custom(self, name: str, spec: Any, key: str, hmac_secret: str | bytes | None
               ) -> det.Detector:
        if name in det.BUILTIN:
            raise self.fail(key, f"'{name}' is a built-in detector; list it under "
                                 "masking.detectors instead")
        body = self.mapping(spec, key, ("pattern", "strategy"))
        pattern = body.get("pattern")
        if not isinstance(pattern, str) or not pattern:
            raise self.fail(key, "missing 'pattern' (a regular expression)")
        strategy = self.strategy(body.get("strategy", "redact"), f"{key}.strategy", hmac_secret)
        try:
            return det.custom(name, pattern, strategy)
        except re.error as exc:
            raise self.fail(f"{key}.pattern", f"invalid regular expression: {exc}") from None


__all__ = ["BUILTIN_SENSITIVE", "ColumnRule", "MaskingFacts", "MaskingRules"]

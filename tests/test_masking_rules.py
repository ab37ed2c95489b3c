"""Rules from policy YAML: the accepted shapes, precedence, exemptions, facts, and errors
that name file, line and key."""

from __future__ import annotations

import textwrap
from typing import Any

import pytest

from hoopops.identity import Identity
from hoopops.masking import (
    ColumnInfo,
    MaskingRefused,
    MaskingRules,
    OutputSources,
    SourceColumn,
    StatementSources,
)
from hoopops.yamlfile import YamlFileError, load_located


def section(text: str, file: str = "policies/masking.yaml") -> tuple[str, Any, Any]:
    doc = load_located(file, textwrap.dedent(text))
    return file, doc, doc.data.get("masking")


def rules_from(*texts: str, secret: str | None = "s3cret") -> MaskingRules:
    return MaskingRules.from_sections(
        [section(t, f"policies/p{i}.yaml") for i, t in enumerate(texts)], secret)


def src(column: str, table: str = "customers", schema: str = "public",
        type_name: str | None = "pg_catalog.text") -> SourceColumn:
    return SourceColumn(schema, table, column, type_name)


AGENT = Identity("agent-7", ("agents",), None, None, None)
BREAKGLASS = Identity("oncall", ("agents", "breakglass"), None, None, None)

FULL = """
masking:
  columns:
    public.customers.ssn: last4
    "*.email": email_domain
    public.accounts.iban: {strategy: keep_last, keep: 6, unmasked_groups: [finance]}
  names: {tax_id: redact}
  types: {public.ssn_t: hash}
  detectors: [ssn, credit_card, email, iban]
  custom_detectors:
    employee_id: {pattern: 'EMP-\\d{6}', strategy: redact}
  unmasked_groups: [breakglass]
  trusted_functions: [public.normalize]
"""


def test_full_section_parses() -> None:
    rules = rules_from(FULL)
    assert rules.active and rules.enabled_for(AGENT)
    assert rules.match(src("ssn")).strategy.label == "last4"  # type: ignore[union-attr]
    assert rules.match(src("email", "orders", "sales")).strategy.label == "email_domain"  # type: ignore[union-attr]
    iban = rules.match(src("iban", "accounts"))
    assert iban is not None and iban.strategy.label == "last6"
    assert iban.unmasked_groups == {"finance"} and iban.where == "policies/p0.yaml:6"
    assert rules.match(src("tax_id", "anything", "x")).strategy.label == "redact"  # type: ignore[union-attr]
    assert rules.match(src("id", type_name="public.ssn_t")).strategy.label == "hash"  # type: ignore[union-attr]
    assert rules.match(src("name")) is None
    assert rules.detectors.names == ("email", "iban", "credit_card", "ssn", "employee_id")
    assert rules.unmasked_groups == {"breakglass"}
    assert rules.trusted_functions == {"public.normalize"}


def test_empty_sections_mean_masking_off() -> None:
    assert not MaskingRules.from_sections([])
    assert not rules_from("masking: {}\n")
    assert not rules_from("masking: null\n")
    assert not rules_from("masking:\n  unmasked_groups: [x]\n")
    off = rules_from("other: 1\n")
    assert off.plan(AGENT, [ColumnInfo("ssn")], None) is None
    assert off.rewrite_error(b"Mx\0\0") == (b"Mx\0\0", [])


def test_detectors_mapping_form_sets_strategies() -> None:
    rules = rules_from("masking:\n  detectors: {ssn: last4, email: email_domain}\n")
    assert {d.name: d.strategy.label for d in rules.detectors.detectors} == {
        "email": "email_domain", "ssn": "last4"}


def test_precedence_exact_rule_wins_else_strictest() -> None:
    rules = rules_from("""
        masking:
          columns:
            public.customers.email: hash
            "*.email": email_domain
            "customers.*": null
          names: {email: redact}
    """)
    assert rules.match(src("email")).strategy.label == "hash"  # type: ignore[union-attr]
    assert rules.match(src("email", schema="archive")).strategy.label == "null"  # type: ignore[union-attr]
    assert rules.match(src("email", "orders")).strategy.label == "redact"  # type: ignore[union-attr]


def test_globs_and_names_match_case_insensitively() -> None:
    rules = rules_from("masking:\n  columns:\n    Public.Customers.SSN: redact\n")
    assert rules.match(src("ssn")) is not None
    assert rules.match(SourceColumn("public", "Customers", "SSN")) is not None


def test_builtin_catalog_columns_are_nulled_when_masking_is_on() -> None:
    rules = rules_from("masking:\n  detectors: [ssn]\n")
    stats = SourceColumn("pg_catalog", "pg_stats", "most_common_vals", "pg_catalog.anyarray")
    activity = SourceColumn("pg_catalog", "pg_stat_activity", "query")
    assert rules.match(stats).strategy.kind == "null"  # type: ignore[union-attr]
    assert rules.match(activity).strategy.kind == "null"  # type: ignore[union-attr]
    assert rules.match(SourceColumn("pg_catalog", "pg_stat_activity", "pid")) is None


def test_sections_merge_across_files_and_conflicts_name_both_places() -> None:
    merged = rules_from("masking:\n  columns: {a.b.c: redact}\n  detectors: [ssn]\n",
                        "masking:\n  columns: {a.b.d: null}\n  detectors: [ssn, email]\n")
    assert merged.match(SourceColumn("a", "b", "d")) is not None
    assert set(merged.detectors.names) == {"ssn", "email"}
    with pytest.raises(YamlFileError) as info:
        rules_from("masking:\n  columns: {a.b.c: redact}\n",
                   "masking:\n  columns:\n    a.b.c: null\n")
    assert info.value.file == "policies/p1.yaml" and info.value.line == 3
    assert "already set in policies/p0.yaml:2" in str(info.value)
    with pytest.raises(YamlFileError, match="already set with strategy redact"):
        rules_from("masking:\n  detectors: [ssn]\n", "masking:\n  detectors: {ssn: last4}\n")


def test_on_unknown_refuse_wins_across_files() -> None:
    rules = rules_from("masking:\n  detectors: [ssn]\n  on_unknown: refuse\n",
                       "masking:\n  on_unknown: redact\n")
    assert rules.on_unknown == "refuse"


@pytest.mark.parametrize(("text", "line", "key", "message"), [
    ("masking: [1]\n", 1, "masking", "expected a mapping"),
    ("masking:\n  colums: {}\n", 2, "masking.colums", "unknown key"),
    ("masking:\n  columns:\n    a.b.c: shuffle\n", 3, "masking.columns.a.b.c",
     "unknown strategy"),
    ("masking:\n  columns:\n    a.b.c.d: redact\n", 3, "masking.columns.a.b.c.d",
     "[[schema.]table.]column"),
    ("masking:\n  columns:\n    x.y:\n      keep: 3\n", 3, "masking.columns.x.y",
     "missing 'strategy'"),
    ("masking:\n  columns:\n    x.y: {strategy: keep_last}\n", 3, "masking.columns.x.y.strategy",
     "needs 'keep"),
    ("masking:\n  columns:\n    x.y: {strategy: redact, groups: [a]}\n", 3,
     "masking.columns.x.y.groups", "unknown key"),
    ("masking:\n  detectors: [ssn, passport]\n", 2, "masking.detectors.1", "unknown detector"),
    ("masking:\n  detectors: ssn\n", 2, "masking.detectors", "expected a list"),
    ("masking:\n  custom_detectors:\n    emp: {pattern: '(x'}\n", 3,
     "masking.custom_detectors.emp.pattern", "invalid regular expression"),
    ("masking:\n  custom_detectors:\n    emp: {strategy: redact}\n", 3,
     "masking.custom_detectors.emp", "missing 'pattern'"),
    ("masking:\n  custom_detectors:\n    ssn: {pattern: 'x'}\n", 3,
     "masking.custom_detectors.ssn", "built-in detector"),
    ("masking:\n  unmasked_groups: breakglass\n", 2, "masking.unmasked_groups",
     "list of names"),
    ("masking:\n  on_unknown: ignore\n", 2, "masking.on_unknown", "redact, refuse"),
])
def test_errors_name_file_line_and_key(text: str, line: int, key: str, message: str) -> None:
    with pytest.raises(YamlFileError) as info:
        rules_from(text)
    error = info.value
    assert (error.file, error.line, error.key) == ("policies/p0.yaml", line, key)
    assert message in str(error)
    assert str(error).startswith(f"policies/p0.yaml:{line}:")


def test_hash_without_secret_is_an_error_at_the_rule() -> None:
    with pytest.raises(YamlFileError) as info:
        rules_from("masking:\n  columns:\n    a.b.c: hash\n", secret=None)
    assert info.value.line == 3 and "hmac_secret" in str(info.value)


def test_errors_without_located_yaml_name_the_file() -> None:
    with pytest.raises(YamlFileError) as info:
        MaskingRules.from_sections([("p.yaml", None, {"columns": {"x": "nope"}})])
    assert info.value.file == "p.yaml" and info.value.line is None


def hints(*outputs: OutputSources, **kw: Any) -> StatementSources:
    return StatementSources("select", tuple(outputs), **kw)


def test_plan_decisions_by_origin_and_hints() -> None:
    rules = rules_from(FULL)
    columns = [
        ColumnInfo("x", 16400, 3, 25, origin=OutputSources.of(src("ssn"))),  # ssn AS x
        ColumnInfo("?column?", 0, 0, 25),  # ssn::text || ''
        ColumnInfo("n", 16400, 2, 25, origin=OutputSources.of(src("name"))),
        ColumnInfo("f", 0, 0, 25),  # an untraceable function result
        ColumnInfo("lost", 16400, 9, 25),  # origin not resolved by the catalog
    ]
    plan = rules.plan(AGENT, columns, hints(
        OutputSources.of(src("ssn")), OutputSources.of(src("ssn")).derived(), OutputSources(),
        OutputSources.unknown("function f is not a system function"), OutputSources()))
    assert plan is not None
    got = [(d.label, d.strategy.label if d.strategy else None, d.detect) for d in plan.decisions]
    assert got == [
        ("public.customers.ssn", "last4", False),
        ("derived(public.customers.ssn)", "redact", False),
        ("", None, True),
        ("unknown(f)", "redact", False),
        ("unknown(lost)", "redact", False),
    ]


def test_plan_is_none_without_sensitive_columns_and_detectors() -> None:
    rules = rules_from("masking:\n  columns: {public.customers.ssn: redact}\n")
    columns = [ColumnInfo("name", 16400, 2, 25, origin=OutputSources.of(src("name")))]
    assert rules.plan(AGENT, columns, None) is None
    assert rules_from(FULL).plan(AGENT, columns, None) is not None  # detectors on


def test_exemptions_are_reported_not_silent() -> None:
    rules = rules_from(FULL)
    columns = [ColumnInfo("ssn", 16400, 3, 25, origin=OutputSources.of(src("ssn"))),
               ColumnInfo("iban", 16401, 2, 25, origin=OutputSources.of(src("iban", "accounts")))]
    plan = rules.plan(BREAKGLASS, columns, None)
    assert plan is not None and plan.passthrough
    assert [d.exempt for d in plan.decisions] == ["breakglass", "breakglass"]
    finance = Identity("cfo", ("finance",), None, None, None)
    mixed = rules.plan(finance, columns, None)
    assert mixed is not None and not mixed.passthrough
    assert [d.exempt for d in mixed.decisions] == [None, "finance"]


def test_on_unknown_refuse() -> None:
    rules = rules_from("masking:\n  columns: {a.b.c: redact}\n  on_unknown: refuse\n"
                       "  unmasked_groups: [breakglass]\n")
    with pytest.raises(MaskingRefused, match="cannot be traced"):
        rules.plan(AGENT, [ColumnInfo("f")], hints(OutputSources.unknown("udf")))
    assert MaskingRefused.sqlstate == "42501"
    exempt = rules.plan(BREAKGLASS, [ColumnInfo("f")], hints(OutputSources.unknown("udf")))
    assert exempt is not None and exempt.passthrough
    assert exempt.rewrite_data_row(b"\x00\x01\x00\x00\x00\x01x") == b"\x00\x01\x00\x00\x00\x01x"
    assert [a.to_dict() for a in exempt.actions()] == [
        {"column": "unknown(f)", "strategy": "unmasked:breakglass", "count": 1}]


def test_facts_and_strict_error_mode() -> None:
    rules = rules_from(FULL)
    statement = hints(OutputSources(), referenced=frozenset({src("ssn"), src("name")}),
                      predicates=frozenset({src("ssn")}), written=frozenset({src("email")}),
                      targets=frozenset({src("name")}), opaque=frozenset({"DO block"}))
    facts = rules.facts(statement)
    assert facts.sensitive_read == ("public.customers.ssn",)
    assert facts.sensitive_in_predicates == ("public.customers.ssn",)
    assert facts.sensitive_copied == ("public.customers.email",)
    assert facts.sensitive_targets == ()
    assert facts.to_dict()["opaque"] == ["DO block"]
    assert rules.touches_sensitive(statement)
    assert not rules.touches_sensitive(hints(OutputSources(), referenced=frozenset({src("name")})))
    assert rules.touches_sensitive(None)

"""Masking facts: what a statement does with sensitive columns that masking cannot fix.

Each statement is traced through the masking analysis against a fake catalog and the
shipped masking rules (policies/masking.yaml); the facts the policy decides on must name
exactly the sensitive columns a statement filters, joins, groups, orders or branches on,
copies, overwrites or hands to code the analysis cannot see through, however it spells
them. Then the policy language's keys for these facts, and their lint.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import pytest

from hoopops.identity import Identity
from hoopops.masking import MaskingRules
from hoopops.masking.inference import looks_masked, statement_facts, with_masking_facts
from hoopops.masking.rules import MaskingFacts
from hoopops.masking.sources import RelationInfo, RelationName, analyze
from hoopops.policy import PolicyEngine, load_policies
from hoopops.policy_lint import lint_folder
from hoopops.sql import Analyzer

ROOT = Path(__file__).resolve().parent.parent
T, I4 = "pg_catalog.text", "pg_catalog.int4"
CUSTOMER_COLUMNS = (("id", I4), ("name", T), ("ssn", T), ("email", T), ("card_number", T),
                    ("phone", T), ("note", T))
RELATIONS = [
    RelationInfo(1, "public", "customers", "r", CUSTOMER_COLUMNS),
    RelationInfo(2, "archive", "customers", "r", (("id", I4), ("ssn", T))),
    RelationInfo(3, "public", "notes", "r", (("id", I4), ("body", T))),
    RelationInfo(4, "public", "prospects", "r", (("id", I4), ("ssn", T))),
    RelationInfo(5, "public", "v_cust", "v", (("id", I4), ("mail", T), ("tax", T)),
                 "SELECT id, upper(email) AS mail, ssn AS tax FROM customers"),
    RelationInfo(6, "public", "v_filtered", "v", (("id", I4),),
                 "SELECT id FROM customers WHERE ssn LIKE '9%'"),
    RelationInfo(7, "crm", "Clients", "r", (("id", I4), ("SSN", T))),
    RelationInfo(8, "public", "orders", "r", (("id", I4), ("customer_id", I4), ("total", T))),
]
USER_FUNCTIONS = {"leak": "public"}


class FakeCatalog:
    async def relations(self, names: Collection[RelationName]
                        ) -> Mapping[RelationName, Sequence[RelationInfo]]:
        return {(s, n): [r for r in RELATIONS if r.name == n and s in (None, r.schema)]
                for s, n in names}

    async def functions(self, names: Collection[str]) -> Mapping[str, frozenset[str]]:
        return {n: frozenset({USER_FUNCTIONS.get(n, "pg_catalog")}) for n in names}


AGENT = Identity("agent-1", ("agents",), None, None, None)
RULES = MaskingRules.from_sections(load_policies(ROOT / "policies").masking_sections, "k")
SENSITIVE = ("customers.card_number", "customers.email", "customers.note", "customers.phone",
             "customers.ssn")  # every sensitive column of public.customers


def short(names: Collection[str]) -> set[str]:
    return {n.removeprefix("public.") for n in names}


async def facts_of(sql: str, identity: Identity | None = AGENT, rules: MaskingRules = RULES,
                   search_path: str | None = "public") -> MaskingFacts | None:
    hints = await analyze(sql, FakeCatalog(), rules.trusted_functions, search_path, "agent")
    assert len(hints) == 1
    return statement_facts(rules, hints[0], sql, identity)


# (statement, the sensitive columns it decides rows or values on)
INFERENCE: list[tuple[str, tuple[str, ...]]] = [
    # the issue's own examples
    ("SELECT id FROM customers WHERE ssn LIKE '123-45-%'", ("customers.ssn",)),
    ("SELECT id FROM customers ORDER BY ssn", ("customers.ssn",)),
    ("SELECT count(*) FROM customers GROUP BY left(card_number, 6)",
     ("customers.card_number",)),
    ("SELECT a.id FROM customers a JOIN notes b ON a.ssn = b.body", ("customers.ssn",)),
    # spelling: aliases, quoting, schema qualification, casts, functions
    ("SELECT c.id FROM customers AS c WHERE c.ssn = '123-45-6789'", ("customers.ssn",)),
    ('SELECT "id" FROM "customers" WHERE "ssn" LIKE \'1%\'', ("customers.ssn",)),
    ("SELECT id FROM public.customers WHERE public.customers.email LIKE 'a%'",
     ("customers.email",)),
    ('SELECT id FROM crm."Clients" WHERE "SSN" LIKE \'1%\'', ("crm.Clients.SSN",)),
    ("SELECT id FROM customers WHERE ssn::text LIKE '1%'", ("customers.ssn",)),
    ("SELECT id FROM customers WHERE substr(ssn, 1, 3) = '123'", ("customers.ssn",)),
    ("SELECT id FROM customers WHERE upper(reverse(email)) > 'M'", ("customers.email",)),
    ("SELECT id FROM customers c WHERE row_to_json(c)::text LIKE '%123-45%'", SENSITIVE),
    # through subqueries, CTEs, views, joins
    ("WITH x AS (SELECT id, ssn AS s FROM customers) SELECT id FROM x WHERE s > '5'",
     ("customers.ssn",)),
    ("SELECT id FROM (SELECT id, ssn AS t FROM customers) sub WHERE t LIKE '1%'",
     ("customers.ssn",)),
    # a view's own names resolve in every schema (the session's path does not apply)
    ("SELECT id FROM v_cust WHERE tax LIKE '1%'", ("customers.ssn", "archive.customers.ssn")),
    ("SELECT name FROM customers JOIN prospects USING (ssn)",
     ("customers.ssn", "prospects.ssn")),
    ("SELECT 1 FROM customers NATURAL JOIN prospects", ("customers.ssn", "prospects.ssn")),
    ("SELECT id FROM notes WHERE id IN (SELECT id FROM customers WHERE ssn LIKE '1%')",
     ("customers.ssn",)),
    ("SELECT n.id FROM notes n WHERE EXISTS (SELECT 1 FROM customers c WHERE c.id = n.id "
     "AND c.email LIKE 'a%')", ("customers.email",)),
    ("SELECT body FROM notes WHERE body IN (SELECT ssn FROM customers)", ("customers.ssn",)),
    ("SELECT o.id FROM orders o JOIN (SELECT id, phone FROM customers) c "
     "ON c.id = o.customer_id AND c.phone LIKE '+1%'", ("customers.phone",)),
    # every clause that picks, orders or groups rows
    ("SELECT name FROM customers GROUP BY name HAVING max(ssn) > '5'", ("customers.ssn",)),
    ("SELECT id, rank() OVER (PARTITION BY ssn ORDER BY id) FROM customers",
     ("customers.ssn",)),
    ("SELECT id, row_number() OVER w FROM customers WINDOW w AS (ORDER BY card_number)",
     ("customers.card_number",)),
    ("SELECT DISTINCT ON (ssn) id FROM customers", ("customers.ssn",)),
    ("SELECT id FROM customers LIMIT (SELECT length(ssn) FROM customers WHERE id = 1)",
     ("customers.ssn",)),
    ("SELECT id, ssn FROM customers ORDER BY 2", ("customers.ssn",)),
    ("SELECT ssn AS k FROM customers ORDER BY k", ("customers.ssn",)),
    ("SELECT email, count(*) FROM customers GROUP BY 1", ("customers.email",)),
    ("SELECT id, phone, count(*) FROM customers GROUP BY ROLLUP (1, (2))",
     ("customers.phone",)),
    ("SELECT string_agg(name, ',' ORDER BY ssn) FROM customers", ("customers.ssn",)),
    ("SELECT count(*) FILTER (WHERE ssn LIKE '1%') FROM customers", ("customers.ssn",)),
    ("SELECT ssn FROM customers WHERE id = 1 INTERSECT SELECT '123-45-6789'",
     ("customers.ssn",)),
    ("UPDATE notes SET body = 'x' WHERE id IN (SELECT id FROM customers WHERE ssn LIKE '1%')",
     ("customers.ssn",)),
    ("DELETE FROM notes USING customers c WHERE c.id = notes.id AND c.ssn LIKE '1%'",
     ("customers.ssn",)),
    # inference through the output: which branch, NULL or not, how many
    ("SELECT CASE WHEN ssn LIKE '1%' THEN 1 END FROM customers", ("customers.ssn",)),
    ("SELECT CASE ssn WHEN '123-45-6789' THEN 'hit' END FROM customers", ("customers.ssn",)),
    ("SELECT count(CASE WHEN ssn LIKE '1%' THEN 1 END) FROM customers", ("customers.ssn",)),
    ("SELECT count(nullif(ssn, '123-45-6789')) FROM customers", ("customers.ssn",)),
    ("SELECT count(DISTINCT card_number) FROM customers", ("customers.card_number",)),
    ("SELECT id, nullif(ssn, '123-45-6789') FROM customers", ("customers.ssn",)),
    # fail closed: a name the analysis cannot resolve may be any column in scope
    ("SELECT c.id FROM customers c, mystery m WHERE m.k LIKE '1%'", SENSITIVE),
    ("SELECT id FROM customers WHERE leak(id) = 1", SENSITIVE),
]


@pytest.mark.parametrize(("sql", "expected"), INFERENCE, ids=[s for s, _ in INFERENCE])
async def test_inference_facts(sql: str, expected: tuple[str, ...]) -> None:
    facts = await facts_of(sql)
    assert facts is not None, sql
    assert short(facts.sensitive_in_predicates) == set(expected)


def test_enough_inference_cases() -> None:
    assert len(INFERENCE) >= 30


NOT_INFERENCE = [
    "SELECT ssn, card_number FROM customers WHERE id = 1",  # masked output, plain filter
    "SELECT ssn FROM customers ORDER BY id LIMIT 5",
    "SELECT count(ssn) FROM customers",
    "SELECT CASE WHEN id > 2 THEN ssn END FROM customers",  # branches on id, returns masked
    "SELECT id FROM v_filtered",  # the view's own WHERE is not the statement's
    "SELECT ssn FROM customers UNION ALL SELECT ssn FROM archive.customers",
]


@pytest.mark.parametrize("sql", NOT_INFERENCE)
async def test_reads_without_inference(sql: str) -> None:
    facts = await facts_of(sql)
    assert facts is not None and facts.sensitive_read, sql
    assert facts.sensitive_in_predicates == ()
    assert facts.sensitive_copied == facts.sensitive_targets == facts.sensitive_opaque == ()


@pytest.mark.parametrize("sql", [
    "SELECT id, name FROM customers WHERE name = 'x' ORDER BY id",
    "SELECT body FROM notes WHERE body LIKE '%123-45%' ORDER BY body",
    "SELECT o.total FROM orders o JOIN notes n ON n.id = o.id GROUP BY o.total",
    "SELECT id FROM customers JOIN orders ON orders.customer_id = customers.id",
    "SELECT 1",
    "UPDATE notes SET body = 'x' WHERE id = 3",
])
async def test_no_sensitive_column_no_facts(sql: str) -> None:
    """The common case costs nothing more: no facts, so no second decision."""
    assert await facts_of(sql) is None


async def test_search_path_decides_which_customers() -> None:
    sql = "SELECT id FROM customers WHERE ssn LIKE '1%'"
    archive = await facts_of(sql, search_path="archive")
    assert archive is not None and archive.sensitive_in_predicates == ("archive.customers.ssn",)
    public = await facts_of(sql, search_path='"$user", public')
    assert public is not None and public.sensitive_in_predicates == ("public.customers.ssn",)
    unknown = await facts_of(sql, search_path=None)  # unknown: every schema, fail closed
    assert unknown is not None and set(unknown.sensitive_in_predicates) == {
        "archive.customers.ssn", "public.customers.ssn"}


@pytest.mark.parametrize(("sql", "copied", "targets", "placeholders"), [
    ("INSERT INTO notes (body) SELECT ssn FROM customers", ("customers.ssn",), (), ()),
    ("INSERT INTO notes SELECT id, email || '' FROM customers", ("customers.email",), (), ()),
    ("CREATE TABLE stash AS SELECT card_number FROM customers", ("customers.card_number",),
     (), ()),
    ("SELECT ssn INTO stash FROM customers", ("customers.ssn",), (), ()),
    ("UPDATE notes SET body = c.phone FROM customers c WHERE c.id = notes.id",
     ("customers.phone",), (), ()),
    ("WITH s AS (SELECT ssn FROM customers) INSERT INTO prospects (ssn) SELECT ssn FROM s",
     ("customers.ssn",), ("prospects.ssn",), ()),
    ("UPDATE customers SET ssn = '***-**-1234' WHERE id = 1", (), ("customers.ssn",),
     ("customers.ssn",)),
    ("UPDATE customers SET ssn = '123-45-6789' WHERE id = 1", (), ("customers.ssn",), ()),
    ("INSERT INTO customers (id, email) VALUES (9, '***@example.com')", (),
     ("customers.email",), ("customers.email",)),
    ("UPDATE customers SET card_number = 'hmac:0123456789abcdef0123456789abcdef'", (),
     ("customers.card_number",), ("customers.card_number",)),
    ("UPDATE customers SET note = '****' WHERE id = 2", (), ("customers.note",),
     ("customers.note",)),
    ("INSERT INTO notes (body) VALUES ('***-**-1234')", (), (), ()),  # not a sensitive column
])
async def test_copies_and_placeholders(sql: str, copied: tuple[str, ...],
                                       targets: tuple[str, ...],
                                       placeholders: tuple[str, ...]) -> None:
    facts = await facts_of(sql)
    if not (copied or targets):
        assert facts is None
        return
    assert facts is not None
    assert short(facts.sensitive_copied) == set(copied)
    assert short(facts.sensitive_targets) == set(targets)
    assert short(facts.sensitive_placeholders) == set(placeholders)


@pytest.mark.parametrize(("value", "masked"), [
    ("***-**-6789", True), ("************1111", True), ("***@example.com", True),
    ("****", True), ("hmac:0123456789abcdef0123456789abcdef", True), (" *1234", True),
    ("123-45-6789", False), ("alice@example.com", False), ("4111111111111111", False),
    ("a*b", False), ("hmac:short", False),
])
def test_looks_masked(value: str, masked: bool) -> None:
    assert looks_masked(value) is masked


async def test_opaque_code_over_sensitive_columns() -> None:
    facts = await facts_of("SELECT leak(ssn), leak(id) FROM customers")
    assert facts is not None and facts.sensitive_opaque == ("public.customers.ssn",)
    whole = await facts_of("SELECT leak(c::text) FROM customers c")
    assert whole is not None and short(whole.sensitive_opaque) == set(SENSITIVE)
    xml = await facts_of("SELECT query_to_xml(ssn, true, false, '') FROM customers")
    assert xml is not None and xml.sensitive_opaque == ("public.customers.ssn",)
    assert await facts_of("SELECT leak(id) FROM notes") is None


async def test_breakglass_is_exempt() -> None:
    sql = "SELECT id FROM customers WHERE ssn LIKE '1%'"
    glass = Identity("oncall-7", ("agents", "breakglass"), None, None, None)
    assert await facts_of(sql, glass) is None
    assert await facts_of(sql, AGENT) is not None


async def test_per_column_exemption_narrows_the_facts() -> None:
    rules = MaskingRules.from_sections([("t.yaml", None, {"columns": {
        "public.customers.ssn": "last4",
        "public.customers.email": {"strategy": "email_domain",
                                   "unmasked_groups": ["support"]}}})])
    sql = "SELECT id FROM customers WHERE ssn LIKE '1%' OR email LIKE 'a%'"
    support = Identity("s-1", ("support",), None, None, None)
    agent = await facts_of(sql, AGENT, rules)
    assert agent is not None and short(agent.sensitive_in_predicates) == {
        "customers.ssn", "customers.email"}
    narrowed = await facts_of(sql, support, rules)
    assert narrowed is not None and narrowed.sensitive_in_predicates == ("public.customers.ssn",)
    only_email = await facts_of("SELECT id FROM customers WHERE email LIKE 'a%'", support, rules)
    assert only_email is None


async def test_facts_cached_per_hints_object() -> None:
    hints = (await analyze("SELECT id FROM customers WHERE ssn = 'x'", FakeCatalog()))[0]
    first = RULES.policy_facts(hints, AGENT)
    assert first is not None and RULES.policy_facts(hints, AGENT) is first


# -- on the statement facts, and in the policy language ---------------------------------


async def _decide(engine: PolicyEngine, sql: str, identity: Identity = AGENT) -> str:
    analysis = Analyzer().analyze(sql)
    hints = await analyze(sql, FakeCatalog(), (), "public")
    enriched = with_masking_facts(analysis, hints, RULES, identity)
    return engine.decide(identity, "appdb", enriched).rule_id


async def test_shipped_policy_rules() -> None:
    engine = PolicyEngine(ROOT / "policies")
    assert await _decide(engine, "SELECT id FROM customers WHERE ssn LIKE '123-45-%'") == \
        "sensitive-inference-needs-review"
    assert await _decide(engine, "SELECT id, ssn FROM customers WHERE id = 1") == "reads"
    assert await _decide(engine, "INSERT INTO notes (body) SELECT ssn FROM customers") == \
        "no-sensitive-copies"
    assert await _decide(engine, "UPDATE customers SET ssn = '***-**-1234' WHERE id = 1") == \
        "no-masked-placeholders-written"
    assert await _decide(engine, "UPDATE customers SET ssn = $1 WHERE id = 1") == \
        "sensitive-writes-need-review"
    assert await _decide(engine, "SELECT leak(ssn) FROM customers") == \
        "sensitive-to-opaque-code-needs-review"
    glass = Identity("oncall-7", ("breakglass",), None, None, None)
    assert await _decide(engine, "SELECT id FROM customers WHERE ssn LIKE '1%'", glass) == \
        "reads"


async def test_multi_statement_facts_land_on_their_statement() -> None:
    sql = "SELECT 1; SELECT id FROM customers WHERE ssn LIKE '1%'"
    analysis = Analyzer().analyze(sql)
    hints = await analyze(sql, FakeCatalog(), (), "public")
    enriched = with_masking_facts(analysis, hints, RULES, AGENT)
    first, second = enriched.statements
    assert first.masking is None and second.masking is not None
    assert "masking" not in first.to_dict()
    assert second.to_dict()["masking"]["sensitive_in_predicates"] == ["public.customers.ssn"]
    unchanged = Analyzer().analyze("SELECT id FROM customers WHERE id = 1")
    hints = await analyze("SELECT id FROM customers WHERE id = 1", FakeCatalog())
    assert with_masking_facts(unchanged, hints, RULES, AGENT) is unchanged


def _folder(tmp_path: Path, rules: str, masking: bool = True) -> Path:
    text = "default: allow\nrules:\n" + rules
    if masking:
        text += "masking:\n  columns: {public.customers.ssn: last4}\n"
    (tmp_path / "p.yaml").write_text(text)
    return tmp_path


async def test_policy_keys_bool_and_globs(tmp_path: Path) -> None:
    engine = PolicyEngine(_folder(tmp_path, """\
  - id: ssn-filter
    when: {sensitive_in_predicates: ["*.ssn"]}
    action: block
  - id: any-filter
    when: {sensitive_in_predicates: true}
    action: review
  - id: plain-read
    when: {sensitive_read: true, sensitive_in_predicates: false}
    action: allow
"""))
    assert await _decide(engine, "SELECT id FROM customers WHERE ssn LIKE '1%'") == "ssn-filter"
    assert await _decide(engine, "SELECT id FROM customers ORDER BY email") == "any-filter"
    assert await _decide(engine, "SELECT email FROM customers") == "plain-read"
    assert await _decide(engine, "SELECT id FROM notes") == "default"


@pytest.mark.parametrize("value", ["1", "[]", "{a: b}", "[1]"])
def test_policy_key_values_checked(tmp_path: Path, value: str) -> None:
    _folder(tmp_path, f"  - id: r\n    when: {{sensitive_copied: {value}}}\n    action: block\n")
    with pytest.raises(Exception, match="sensitive_copied"):
        load_policies(tmp_path)


def test_lint_masking_keys(tmp_path: Path) -> None:
    rules = """\
  - id: broad
    when: {sensitive_targets: true}
    action: review
  - id: narrow
    when: {sensitive_targets: ["customers.ssn"]}
    action: block
  - id: too-deep
    when: {sensitive_read: ["a.b.c.d"]}
    action: block
"""
    (tmp_path / "on").mkdir()
    found = [str(p) for p in lint_folder(_folder(tmp_path / "on", rules))]
    assert any("'narrow' is shadowed by rule 'broad'" in p for p in found), found
    assert any("more name parts" in p for p in found), found
    assert not any("no masking section" in p for p in found), found
    (tmp_path / "off").mkdir()
    off = [str(p) for p in lint_folder(_folder(tmp_path / "off", rules, masking=False))]
    assert sum("no masking section" in p for p in off) == 3, off
    assert [str(p) for p in lint_folder(ROOT / "policies")] == []


async def test_policy_diff_judges_recorded_masking_facts() -> None:
    """``hoopops replay diff`` has no catalog: it takes the masking facts the gateway
    recorded, so a candidate policy is judged on what the gateway saw."""
    from hoopops.replay import with_recorded_effects

    sql = "SELECT id FROM customers WHERE ssn LIKE '1%'"
    analysis = Analyzer().analyze(sql)
    hints = await analyze(sql, FakeCatalog(), (), "public")
    recorded = with_masking_facts(analysis, hints, RULES, AGENT).statements[0]
    assert recorded.masking is not None
    assert MaskingFacts.from_dict(recorded.masking.to_dict()) == recorded.masking
    restored = with_recorded_effects(analysis, {"statements": [recorded.to_dict()]})
    engine = PolicyEngine(ROOT / "policies")
    assert engine.decide(AGENT, "appdb", analysis).rule_id == "reads"
    assert engine.decide(AGENT, "appdb", restored).rule_id == "sensitive-inference-needs-review"


async def test_plain_masked_reads_keep_the_fast_path() -> None:
    """Without a rule on sensitive_read, a statement that only reads masked columns gets
    no facts (masking handles its result); one that infers still does."""
    engine = PolicyEngine(ROOT / "policies")
    assert not engine.policies.uses("sensitive_read")
    assert engine.policies.uses("sensitive_in_predicates")
    for sql, kept in (("SELECT id, ssn FROM customers WHERE id = 1", True),
                      ("SELECT id FROM customers WHERE ssn LIKE '1%'", False)):
        analysis = Analyzer().analyze(sql)
        hints = await analyze(sql, FakeCatalog(), (), "public")
        out = with_masking_facts(analysis, hints, RULES, AGENT, reads_matter=False)
        assert (out is analysis) is kept, sql
        assert (with_masking_facts(analysis, hints, RULES, AGENT) is analysis) is False


async def test_shape_cache_never_serves_a_decision_made_without_the_facts() -> None:
    """The policy caches decisions per statement shape; a statement with masking facts
    must be decided on them even when its shape was decided before without them."""
    engine = PolicyEngine(ROOT / "policies")
    analyzer = Analyzer()
    template = "SELECT id FROM customers WHERE ssn LIKE '{}%'"
    for n in range(5):
        assert engine.decide(AGENT, "appdb", analyzer.analyze(template.format(n))).rule_id \
            == "reads"
    sql = template.format(9)
    hints = await analyze(sql, FakeCatalog(), (), "public")
    enriched = with_masking_facts(analyzer.analyze(sql), hints, RULES, AGENT)
    assert engine.decide(AGENT, "appdb", enriched).rule_id == "sensitive-inference-needs-review"

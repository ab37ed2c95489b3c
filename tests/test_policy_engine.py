"""The policy language: loading, matching, decisions, errors with file and line, reloads."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path

import pytest

from hoopops.events import POLICY_RELOADED, EventBus
from hoopops.identity import Identity
from hoopops.policy import (
    NameMatcher,
    PolicyEngine,
    PolicyError,
    load_policies,
    load_policy_folder,
)
from hoopops.sql import Analyzer, analyze

ALICE = Identity("alice@example.com", ("analysts", "oncall"), None, None, None)
BOT = Identity("agent-7", ("agents",), None, None, None)


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def engine_for(tmp_path: Path, text: str, name: str = "p.yaml") -> PolicyEngine:
    write(tmp_path / "pol", name, text)
    return PolicyEngine(tmp_path / "pol")


def decide(engine: PolicyEngine, sql: str, identity: Identity | None = None,
           target: str | None = None) -> tuple[str, str]:
    d = engine.decide(identity, target, analyze(sql))
    return d.action, d.rule_id


ISSUE_EXAMPLE = """
    default: review
    rules:
      - id: no-dangerous
        description: Server files, programs, roles and backends are off limits
        when: {dangerous: true}
        action: block
      - id: pii-reads-need-review
        when: {kinds: [read], columns: ["public.customers.ssn"]}
        action: review
      - id: reads
        when: {kinds: [read]}
        action: allow
"""


def test_the_issue_example(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, ISSUE_EXAMPLE)
    assert decide(engine, "SELECT name FROM customers") == ("allow", "reads")
    assert decide(engine, "SELECT ssn FROM customers") == ("review", "pii-reads-need-review")
    assert decide(engine, "SELECT c.ssn FROM public.customers c") == \
        ("review", "pii-reads-need-review")
    assert decide(engine, "SELECT * FROM customers") == ("review", "pii-reads-need-review")
    assert decide(engine, "SELECT 1 FROM customers WHERE ssn LIKE '1%'") == \
        ("review", "pii-reads-need-review")
    assert decide(engine, "SELECT x.s FROM (SELECT ssn AS s FROM customers) x") == \
        ("review", "pii-reads-need-review")
    assert decide(engine, "SELECT ssn FROM other.customers") == ("allow", "reads")
    assert decide(engine, "SELECT pg_cancel_backend(1)") == ("block", "no-dangerous")
    assert decide(engine, "UPDATE t SET a = 1 WHERE id = 1") == ("review", "default")
    decision = engine.decide(None, None, analyze("SELECT pg_cancel_backend(1)"))
    assert decision.message == ("hoopops blocked this statement (rule no-dangerous: Server "
                                "files, programs, roles and backends are off limits)")
    assert decision.rule_description == "Server files, programs, roles and backends are " \
        "off limits"


def test_strictest_statement_wins(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, ISSUE_EXAMPLE)
    d = engine.decide(None, None, analyze("SELECT 1; UPDATE t SET a = 1; SELECT 2"))
    assert (d.action, d.rule_id, d.statement_index) == ("review", "default", 1)
    assert [s.action for s in d.statements] == ["allow", "review", "allow"]
    assert "statement 2 of 3" in d.message
    d = engine.decide(None, None, analyze("UPDATE t SET a = 1; SELECT lo_import('x')"))
    assert (d.action, d.statement_index) == ("block", 1)


def test_identity_and_target_conditions(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, """
        default: block
        rules:
          - id: oncall-writes
            when: {groups: [oncall], targets: ["prod-*"], kinds: [write]}
            action: review
          - id: bots-read-staging
            when: {subjects: ["agent-*"], targets: [staging], kinds: [read]}
            action: allow
          - id: analysts-read
            when: {groups: ["analyst?"], kinds: [read]}
            action: allow
    """)
    write_sql = "UPDATE t SET a = 1 WHERE id = 1"
    assert decide(engine, write_sql, ALICE, "prod-eu") == ("review", "oncall-writes")
    assert decide(engine, write_sql, ALICE, "staging") == ("block", "default")
    assert decide(engine, "SELECT 1", BOT, "staging") == ("allow", "bots-read-staging")
    assert decide(engine, "SELECT 1", BOT, "prod-eu") == ("block", "default")
    assert decide(engine, "SELECT 1", ALICE, None) == ("allow", "analysts-read")
    assert decide(engine, "SELECT 1", None, "staging") == ("block", "default")


def test_unless(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, """
        default: allow
        rules:
          - id: writes-outside-scratch
            when: {kinds: [write]}
            unless: {tables_written: ["scratch.*"]}
            action: review
          - id: no-writes-for-bots
            when: {kinds: [write]}
            unless: {subjects: ["alice@*"]}
            action: block
    """)
    assert decide(engine, "UPDATE app.t SET a = 1") == ("review", "writes-outside-scratch")
    assert decide(engine, "UPDATE scratch.t SET a = 1", BOT) == \
        ("block", "no-writes-for-bots")
    assert decide(engine, "UPDATE scratch.t SET a = 1", ALICE) == ("allow", "default")


def test_name_matching_semantics() -> None:
    m = NameMatcher(["public.customers.ssn"])
    assert m.match("public.customers.ssn")
    assert m.match("customers.ssn")  # unqualified in SQL: could be public.customers
    assert m.match("customers.*")  # a star reads every column
    assert m.match("ssn")  # a bare column with no known table
    assert m.match("PUBLIC.Customers.SSN")
    assert not m.match("other.customers.ssn")
    assert not m.match("customers.name")
    t = NameMatcher(["pg_catalog.pg_auth*", "audit.*"])
    assert t.match("pg_authid") and t.match("pg_catalog.pg_authid")
    assert t.match("audit.log") and not t.match("public.log")
    assert NameMatcher(['"my.schema".t']).match('"my.schema".t')
    assert not NameMatcher(['"my.schema".t']).match("schema.t")


def test_table_and_column_keys(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, """
        default: allow
        rules:
          - id: audit-is-append-only
            when: {tables_written: ["audit.*"], statement_types: [UpdateStmt, DeleteStmt,
                                                                  TruncateStmt, DropStmt]}
            action: block
          - id: salary-filter
            when: {filter_columns: ["*.salary"]}
            action: review
          - id: salary-write
            when: {columns_written: ["hr.employees.salary"]}
            action: review
          - id: pg-sleep
            when: {functions: ["pg_sleep*"]}
            action: block
          - id: regex
            when: {sql: "(?i)\\\\bgenerate_series\\\\(\\\\$1, \\\\$2\\\\)"}
            action: review
    """)
    assert decide(engine, "DELETE FROM audit.log WHERE id = 1") == \
        ("block", "audit-is-append-only")
    assert decide(engine, "TRUNCATE audit.log") == ("block", "audit-is-append-only")
    assert decide(engine, "DROP TABLE audit.log") == ("block", "audit-is-append-only")
    assert decide(engine, "EXPLAIN ANALYZE DELETE FROM audit.log") == \
        ("block", "audit-is-append-only")
    assert decide(engine, "INSERT INTO audit.log VALUES (1)") == ("allow", "default")
    assert decide(engine, "SELECT name FROM hr.employees WHERE salary > 100000") == \
        ("review", "salary-filter")
    assert decide(engine, "SELECT salary FROM hr.employees") == ("allow", "default")
    assert decide(engine, "UPDATE hr.employees SET salary = 1 WHERE id = 2") == \
        ("review", "salary-write")
    assert decide(engine, "SELECT pg_catalog.pg_sleep_for('1s')") == ("block", "pg-sleep")
    assert decide(engine, "SELECT generate_series(1, 10)") == ("review", "regex")


def test_parse_errors_need_an_explicit_rule(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, """
        default: allow
        rules:
          - id: everyone
            when: {}
            action: allow
    """)
    assert decide(engine, "SELEC 1") == ("block", "builtin:parse-error")
    engine = engine_for(tmp_path, """
        default: block
        rules:
          - id: let-the-server-explain
            description: The server's own syntax error is more useful
            when: {parse_error: true, subjects: ["alice@*"]}
            action: allow
    """, name="p.yaml")
    assert decide(engine, "SELEC 1", ALICE) == ("allow", "let-the-server-explain")
    assert decide(engine, "SELEC 1", BOT) == ("block", "builtin:parse-error")
    assert decide(engine, "SELECT 1", ALICE) == ("block", "default")


def test_builtin_blocks_cannot_be_overridden(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, """
        default: allow
        rules:
          - id: anything-goes
            action: allow
    """)
    assert decide(engine, "SET client_encoding = 'SJIS'") == ("block", "builtin:lexing-risk")
    assert decide(engine, "EXECUTE unknown") == ("block", "builtin:unanalysable")
    assert decide(engine, "SELECT 1\x00") == ("block", "builtin:unanalysable")
    assert decide(engine, "SELECT pg_read_file('x')") == ("allow", "anything-goes")
    assert decide(engine, "") == ("allow", "builtin:empty")


def test_default_is_block_when_no_file_sets_it(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, "rules: []\n")
    assert decide(engine, "SELECT 1") == ("block", "default")


def test_side_effect_functions_extension(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, """
        default: allow
        side_effect_functions:
          audit_touch: write
          purge_everything: {effect: write, dangerous: deletes every tenant's data}
          my_ext_*: admin
        rules:
          - id: dangerous
            when: {dangerous: true}
            action: block
          - id: writes
            when: {kinds: [write, admin]}
            action: review
    """)
    assert decide(engine, "SELECT audit_touch(1)") == ("review", "writes")
    assert decide(engine, "SELECT app.purge_everything()") == ("block", "dangerous")
    assert decide(engine, "SELECT my_ext_reset()") == ("review", "writes")
    assert decide(engine, "SELECT nextval('s')") == ("review", "writes")
    assert decide(engine, "SELECT lower('x')") == ("allow", "default")
    decision = engine.decide(None, None, analyze("SELECT app.purge_everything()"))
    assert "deletes every tenant's data" in decision.analysis.statements[0].dangerous_reasons[0]


def test_masking_sections_are_accepted_and_kept(tmp_path: Path) -> None:
    folder = tmp_path / "pol"
    write(folder, "10-rules.yaml", ISSUE_EXAMPLE)
    write(folder, "20-masking.yaml", """
        masking:
          columns:
            public.customers.ssn: last4
    """)
    policies = load_policies(folder)
    assert len(policies.masking_sections) == 1
    file, doc, raw = policies.masking_sections[0]
    assert file.endswith("20-masking.yaml")
    assert raw == {"columns": {"public.customers.ssn": "last4"}}
    assert doc.line_of("masking.columns") == 2
    assert [p.name for p in policies.files] == ["10-rules.yaml", "20-masking.yaml"]


def test_files_are_read_in_name_order_and_versioned(tmp_path: Path) -> None:
    folder = tmp_path / "pol"
    write(folder, "20-b.yml", """
        rules:
          - {id: b, when: {kinds: [read]}, action: block}
    """)
    write(folder, "10-a.yaml", """
        default: review
        rules:
          - {id: a, when: {kinds: [read]}, action: allow}
    """)
    policies = load_policies(folder)
    assert [r.id for r in policies.rules] == ["a", "b"]
    version = policies.version
    assert len(version) == 64
    assert load_policies(folder).version == version
    (folder / "20-b.yml").write_text((folder / "20-b.yml").read_text() + "\n")
    assert load_policies(folder).version != version


@pytest.mark.parametrize(("text", "line", "key", "fragment"), [
    ("rules:\n  - id: a\n    when: {kind: [read]}\n    action: allow\n", 3,
     "rules.0.when.kind", "did you mean 'kinds'"),
    ("rules:\n  - id: a\n    action: allow\n    whne: {}\n", 4, "rules.0.whne",
     "unknown rule key"),
    ("rules:\n  - id: a\n    when: {kinds: [reads]}\n    action: allow\n", 3,
     "rules.0.when.kinds", "unknown kind 'reads'"),
    ("rules:\n  - id: a\n    when: {statement_types: [SelectStatement]}\n"
     "    action: allow\n", 3, "rules.0.when.statement_types", "SelectStmt"),
    ("rules:\n  - id: a\n    when: {sql: '(unclosed'}\n    action: allow\n", 3,
     "rules.0.when.sql", "invalid regular expression"),
    ("rules:\n  - id: a\n    when: {dangerous: yes please}\n    action: allow\n", 3,
     "rules.0.when.dangerous", "true or false"),
    ("rules:\n  - id: a\n    action: permit\n", 3, "rules.0.action",
     "allow | review | block"),
    ("rules:\n  - when: {}\n    action: allow\n", 2, "rules.0", "needs an id"),
    ("rules:\n  - {id: a, action: allow}\n  - {id: a, action: block}\n", 3, "rules.1.id",
     "duplicate rule id"),
    ("default: maybe\n", 1, "default", "allow, review, block"),
    ("rule:\n  - {id: a, action: allow}\n", 1, "rule", "did you mean 'rules'"),
    ("rules: {id: a}\n", 1, "rules", "list of rules"),
    ("rules:\n  - id: a\n    when: {tables: []}\n    action: allow\n", 3,
     "rules.0.when.tables", "non-empty"),
    ("side_effect_functions:\n  bad.name: write\n", 2, "side_effect_functions.bad.name",
     "not a function name"),
    ("side_effect_functions:\n  f: destroy\n", 2, "side_effect_functions.f",
     "unknown effect"),
    ("rules:\n  - id: a\n    action: allow\n  - id: b\n    action: [allow\n", 6, None,
     "invalid YAML"),
])
def test_errors_name_file_line_and_key(tmp_path: Path, text: str, line: int,
                                       key: str | None, fragment: str) -> None:
    path = write(tmp_path / "pol", "bad.yaml", text)
    with pytest.raises(PolicyError) as caught:
        load_policies(tmp_path / "pol")
    err = caught.value
    assert (err.file, err.line, err.key) == (str(path), line, key)
    assert fragment in str(err)
    assert f"bad.yaml:{line}:" in str(err)


def test_empty_or_missing_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="not a folder"):
        load_policies(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PolicyError, match="no policy files"):
        load_policies(tmp_path / "empty")


def test_conflicting_defaults(tmp_path: Path) -> None:
    write(tmp_path / "pol", "a.yaml", "default: allow\n")
    write(tmp_path / "pol", "b.yaml", "default: block\n")
    with pytest.raises(PolicyError, match="conflicts with default: allow"):
        load_policies(tmp_path / "pol")


def test_all_problems_are_collected(tmp_path: Path) -> None:
    write(tmp_path / "pol", "a.yaml", "rules:\n  - {id: a, action: nope}\n"
          "  - {id: b, action: allow, when: {kinds: [x]}}\n")
    write(tmp_path / "pol", "b.yaml", "defaults: allow\n")
    policies, problems = load_policy_folder(tmp_path / "pol")
    assert policies is None
    assert [(Path(p.file).name, p.line) for p in problems] == \
        [("a.yaml", 2), ("a.yaml", 3), ("b.yaml", 1)]


def test_reload_keeps_the_old_policy_on_error(tmp_path: Path) -> None:
    bus = EventBus()
    events = bus.subscribe([POLICY_RELOADED])
    path = write(tmp_path / "pol", "p.yaml", ISSUE_EXAMPLE)
    engine = PolicyEngine(tmp_path / "pol", bus=bus)
    old_version = engine.version
    assert decide(engine, "SELECT 1") == ("allow", "reads")

    path.write_text(ISSUE_EXAMPLE.replace("action: allow", "action: sometimes"))
    result = engine.reload()
    assert not result.ok and not result.changed
    assert result.error is not None and result.error.line == 13
    assert engine.version == old_version
    assert decide(engine, "SELECT 1") == ("allow", "reads")

    path.write_text(textwrap.dedent(ISSUE_EXAMPLE).replace("kinds: [read]}\n    action: "
                                                            "allow", "kinds: [read]}\n    "
                                                            "action: block"))
    result = engine.reload()
    assert result.ok and result.changed and engine.version != old_version
    assert decide(engine, "SELECT 1") == ("block", "reads")
    assert engine.reload().changed is False
    kinds = [(e.data["error"] is None) for e in events.drain()]
    assert kinds == [False, True]


async def test_watch_reloads_changed_files(tmp_path: Path) -> None:
    path = write(tmp_path / "pol", "p.yaml", ISSUE_EXAMPLE)
    engine = PolicyEngine(tmp_path / "pol")
    results = []
    task = asyncio.create_task(engine.watch(interval=0.05, on_reload=results.append))
    try:
        await asyncio.sleep(0.15)
        assert results == []
        path.write_text(ISSUE_EXAMPLE.replace("default: review", "default: block"))
        for _ in range(100):
            if results:
                break
            await asyncio.sleep(0.05)
        assert results and results[0].changed
        assert decide(engine, "UPDATE t SET a = 1") == ("block", "default")
        write(tmp_path / "pol", "q.yaml", "rules: [{id: x}]\n")
        for _ in range(100):
            if len(results) > 1:
                break
            await asyncio.sleep(0.05)
        assert results[1].error is not None and engine.last_error is not None
        assert decide(engine, "UPDATE t SET a = 1") == ("block", "default")
    finally:
        task.cancel()


def test_decision_to_dict(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, ISSUE_EXAMPLE)
    out = engine.decide(BOT, "appdb", analyze("SELECT ssn FROM customers")).to_dict()
    assert out["decision"] == "review" and out["rule"] == "pii-reads-need-review"
    assert out["statements"][0]["columns"] == ["customers.ssn"]
    assert out["statements"][0]["decision"] == "review"


def test_decide_is_fast_once_warm(tmp_path: Path) -> None:
    policies = Path(__file__).resolve().parent.parent / "policies"
    engine = PolicyEngine(policies)
    analysis = analyze("SELECT abalance FROM pgbench_accounts WHERE aid = 1")
    for _ in range(50):
        engine.decide(BOT, "appdb", analysis)
    best = min(engine.decide(BOT, "appdb", analysis).elapsed_us for _ in range(200))
    assert best < 50


# -- decisions cached per shape: a new literal is a lookup, never another statement's verdict


def test_cached_decisions_follow_identity_and_target(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, """
        default: block
        rules:
          - id: bots-read-staging
            when: {subjects: ["agent-*"], targets: [staging], kinds: [read]}
            action: allow
          - id: oncall-read
            when: {groups: [oncall], kinds: [read]}
            action: review
    """)
    cases = [(BOT, "staging", ("allow", "bots-read-staging")),
             (BOT, "prod", ("block", "default")),
             (ALICE, "staging", ("review", "oncall-read")),
             (None, "staging", ("block", "default")),
             (Identity("agent-9", ("oncall",), None, None, None), "prod",
              ("review", "oncall-read"))]
    for round_ in range(3):
        for n, (identity, target, expected) in enumerate(cases):
            sql = f"SELECT a FROM t WHERE id = {round_ * 100 + n}"
            assert decide(engine, sql, identity, target) == expected, (identity, target)


def test_cached_decisions_match_sql_rules_like_fresh_ones(tmp_path: Path) -> None:
    text = """
        default: allow
        rules:
          - id: no-big-limits
            when: {sql: "LIMIT \\\\$1$"}
            action: review
          - id: ids-by-equality
            when: {sql: "WHERE id = \\\\$"}
            action: block
    """
    engine = engine_for(tmp_path, text)
    statements = ["SELECT a FROM t LIMIT 5", "SELECT a FROM t LIMIT 500000",
                  "SELECT a FROM t WHERE id = 7", "SELECT a FROM t WHERE id = $1",
                  "SELECT a FROM t WHERE id = 'x'", "SELECT a FROM t WHERE id > 7",
                  "SELECT a FROM t WHERE id > 8 LIMIT 1", "SELECT a FROM t ORDER BY 1"]
    for _ in range(2):
        for sql in statements:
            # A just-loaded policy on a fresh analysis: nothing cached anywhere.
            fresh = PolicyEngine.from_policies(load_policies(tmp_path / "pol"))
            cold = fresh.decide(None, None, Analyzer().analyze_uncached(sql, shapes=False))
            assert decide(engine, sql) == (cold.action, cold.rule_id), sql
    assert [decide(engine, sql)[1] for sql in statements] == [
        "no-big-limits", "no-big-limits", "ids-by-equality", "ids-by-equality",
        "ids-by-equality", "default", "default", "default"]


def test_cached_decisions_end_with_their_policy_version(tmp_path: Path) -> None:
    path = write(tmp_path / "pol", "p.yaml", ISSUE_EXAMPLE)
    engine = PolicyEngine(tmp_path / "pol")
    assert decide(engine, "SELECT a FROM t WHERE id = 1") == ("allow", "reads")
    assert decide(engine, "SELECT a FROM t WHERE id = 2") == ("allow", "reads")
    path.write_text(textwrap.dedent(ISSUE_EXAMPLE).replace(
        "kinds: [read]}\n    action: allow", "kinds: [read]}\n    action: block"))
    assert engine.reload().changed
    assert decide(engine, "SELECT a FROM t WHERE id = 3") == ("block", "reads")
    decision = engine.decide(None, None, analyze("SELECT a FROM t WHERE id = 4"))
    assert decision.policy_version == engine.version


def test_cached_decisions_keep_policy_side_effect_functions(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, """
        default: allow
        side_effect_functions:
          audit_touch: write
        rules:
          - id: writes
            when: {kinds: [write]}
            action: review
    """)
    for n in range(3):
        decision = engine.decide(None, None, analyze(f"SELECT audit_touch({n}) FROM t"))
        assert (decision.action, decision.rule_id) == ("review", "writes")
        assert "write" in decision.analysis.statements[0].kinds
    assert decide(engine, "SELECT lower('x') FROM t") == ("allow", "default")


def test_cached_decision_carries_this_statement(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, ISSUE_EXAMPLE)
    first = engine.decide(BOT, "appdb", analyze("SELECT ssn FROM customers WHERE id = 11"))
    again = engine.decide(BOT, "appdb", analyze("SELECT ssn FROM customers WHERE id = 22"))
    assert (again.action, again.rule_id) == (first.action, first.rule_id)
    assert again.analysis.text == "SELECT ssn FROM customers WHERE id = 22"
    assert again.to_dict()["statements"][0]["text"].endswith("22")
    assert first.to_dict()["statements"][0]["text"].endswith("11")


def test_verdict_fields_keep_the_order_the_enforcer_builds_them_in() -> None:
    """Enforcer.decide builds allow verdicts positionally (per statement, it is cheaper)."""
    import dataclasses

    from hoopops.proxy.gate import Verdict

    assert [f.name for f in dataclasses.fields(Verdict)][:8] == [
        "action", "sqlstate", "message", "hint", "rule_id", "decision", "approval_id",
        "masking_hints"]
    assert Verdict("allow").sqlstate == "42501" and Verdict("allow").message == ""

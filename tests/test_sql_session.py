"""SessionSqlState: EXECUTE is judged as the statement it runs; the model errs to refusal."""

from __future__ import annotations

from pathlib import Path

import pytest

from hoopops.policy import PolicyEngine, load_policies
from hoopops.sql import SessionSqlState, analyze

POLICIES = Path(__file__).resolve().parent.parent / "policies"


@pytest.fixture(scope="module")
def engine() -> PolicyEngine:
    return PolicyEngine.from_policies(load_policies(POLICIES))


def _run(state: SessionSqlState, engine: PolicyEngine, sql: str) -> str:
    """What the gateway does per Query: resolve, decide, observe when let through."""
    analysis = state.resolve(analyze(sql))
    decision = engine.decide(None, None, analysis)
    if decision.action == "allow":
        state.observe(analysis)
    return f"{decision.action}:{decision.rule_id}"


def test_execute_is_judged_as_the_prepared_statement(engine: PolicyEngine) -> None:
    state = SessionSqlState()
    assert _run(state, engine, "PREPARE r(int) AS SELECT * FROM t WHERE id = $1") == \
        "allow:reads"
    assert _run(state, engine, "EXECUTE r(1)") == "allow:reads"
    facts = state.resolve(analyze("EXECUTE r(1)")).statements[0]
    assert facts.statement_type == "ExecuteStmt"
    assert facts.wrapped == ("SelectStmt",)
    assert facts.tables_read == {"t"}
    assert facts.text == "EXECUTE r(1)"


def test_unknown_execute_is_refused(engine: PolicyEngine) -> None:
    assert _run(SessionSqlState(), engine, "EXECUTE nope") == "block:builtin:unanalysable"


def test_prepared_write_is_reviewed_at_prepare_and_at_every_execute(
        engine: PolicyEngine) -> None:
    state = SessionSqlState()
    analysis = state.resolve(analyze("PREPARE d AS DELETE FROM t"))
    assert engine.decide(None, None, analysis).rule_id == "unbounded-writes-need-review"
    state.observe(analysis)  # approved by a human, ran
    assert _run(state, engine, "EXECUTE d") == "review:unbounded-writes-need-review"
    assert _run(state, engine, "EXPLAIN ANALYZE EXECUTE d") == \
        "review:unbounded-writes-need-review"
    assert _run(state, engine, "EXPLAIN EXECUTE d") == "review:unbounded-writes-need-review"


def test_prepare_of_a_name_in_use_keeps_the_first_statement(engine: PolicyEngine) -> None:
    """The server refuses to redefine a name, so the gateway must not believe it either."""
    state = SessionSqlState()
    first = state.resolve(analyze("PREPARE p AS DELETE FROM t WHERE id = 1"))
    state.observe(first)
    assert _run(state, engine, "PREPARE p AS SELECT 1") == "allow:reads"
    assert _run(state, engine, "EXECUTE p") == "review:writes-need-review"


def test_deallocate_and_discard_forget(engine: PolicyEngine) -> None:
    state = SessionSqlState(lexing_defaults_verified=True)
    _run(state, engine, "PREPARE a AS SELECT 1")
    _run(state, engine, "PREPARE b AS SELECT 2")
    assert _run(state, engine, "DEALLOCATE a") == "allow:session-utility"
    assert _run(state, engine, "EXECUTE a") == "block:builtin:unanalysable"
    assert _run(state, engine, "EXECUTE b") == "allow:reads"
    assert _run(state, engine, "DISCARD ALL") == "allow:session-utility"
    assert _run(state, engine, "EXECUTE b") == "block:builtin:unanalysable"
    _run(state, engine, "PREPARE c AS SELECT 3")
    _run(state, engine, "DEALLOCATE ALL")
    assert state.prepared == {}


def test_prepare_and_execute_in_one_string(engine: PolicyEngine) -> None:
    state = SessionSqlState()
    sql = "PREPARE x AS SELECT nextval('s'); EXECUTE x"
    decision = engine.decide(None, None, state.resolve(analyze(sql)))
    assert decision.action == "review"
    assert [d.rule_id for d in decision.statements] == ["writes-need-review"] * 2
    sql = "PREPARE y AS SELECT 1; DEALLOCATE y; EXECUTE y"
    assert engine.decide(None, None, state.resolve(analyze(sql))).rule_id == \
        "builtin:unanalysable"


def test_protocol_level_names_share_the_namespace(engine: PolicyEngine) -> None:
    state = SessionSqlState()
    state.on_parse("s1", analyze("UPDATE t SET a = 1 WHERE id = $1"))
    assert _run(state, engine, "EXECUTE s1(5)") == "review:writes-need-review"
    state.on_close("s1")
    assert _run(state, engine, "EXECUTE s1(5)") == "block:builtin:unanalysable"
    state.on_parse("", analyze("SELECT 1"))
    assert state.prepared == {}


def test_execute_parameters_are_judged_too(engine: PolicyEngine) -> None:
    state = SessionSqlState()
    _run(state, engine, "PREPARE r(bigint) AS SELECT $1")
    assert _run(state, engine, "EXECUTE r(nextval('s'))") == "review:writes-need-review"
    assert _run(state, engine, "EXECUTE r(pg_terminate_backend(1))") == \
        "block:no-dangerous"


def test_reset_all_is_allowed_only_with_verified_defaults(engine: PolicyEngine) -> None:
    for sql in ("RESET ALL", "DISCARD ALL", "RESET client_encoding",
                "SET standard_conforming_strings TO DEFAULT"):
        assert _run(SessionSqlState(), engine, sql) == "block:builtin:lexing-risk"
        verified = SessionSqlState(lexing_defaults_verified=True)
        assert _run(verified, engine, sql) == "allow:session-utility", sql
    verified = SessionSqlState(lexing_defaults_verified=True)
    assert _run(verified, engine, "SET standard_conforming_strings = off") == \
        "block:builtin:lexing-risk"


def test_asyncpg_pool_reset_query(engine: PolicyEngine) -> None:
    """What asyncpg sends when a pooled connection is released."""
    sql = "SELECT pg_advisory_unlock_all();\nCLOSE ALL;\nUNLISTEN *;\nRESET ALL;"
    state = SessionSqlState(lexing_defaults_verified=True)
    decision = engine.decide(None, None, state.resolve(analyze(sql)))
    assert decision.action == "allow"
    assert [d.rule_id for d in decision.statements] == ["reads"] + ["session-utility"] * 3
    unverified = engine.decide(None, None, SessionSqlState().resolve(analyze(sql)))
    assert unverified.rule_id == "builtin:lexing-risk"


def test_resolve_returns_the_same_object_when_nothing_changes() -> None:
    analysis = analyze("SELECT 1")
    assert SessionSqlState().resolve(analysis) is analysis

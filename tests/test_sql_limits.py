"""Hostile input must never take the process down, and is refused when it cannot be analysed.

The nastiest inputs also run in a child process, so that a crash in C code (a segfault,
which no try/except can catch) shows up as a clean test failure instead of killing pytest.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import pytest

from hoopops.policy import decide_statement
from hoopops.sql import DEFAULT_MAX_BYTES, Analyzer, analyze
from hoopops.sql.analyzer import TOO_DEEP


def _one(sql: str):  # type: ignore[no-untyped-def]
    analysis = Analyzer().analyze(sql)
    assert len(analysis.statements) == 1
    return analysis, analysis.statements[0]


def test_one_megabyte_insert_is_analysed() -> None:
    rows, size, i = [], 0, 0
    while size < DEFAULT_MAX_BYTES - 100_000:
        row = f"({i}, 'name {i}', {i * 3.5})"
        rows.append(row)
        size += len(row) + 1
        i += 1
    sql = "INSERT INTO t (a, b, c) VALUES " + ",".join(rows)
    assert len(sql) > 900_000
    analysis, facts = _one(sql)
    assert analysis.unanalysable is None and analysis.parse_error is None
    assert facts.kinds == {"write"}
    assert facts.tables_written == {"t"}


def test_text_over_the_limit_is_refused_without_parsing() -> None:
    sql = "SELECT 1 -- " + "x" * (DEFAULT_MAX_BYTES + 1)
    analysis, facts = _one(sql)
    assert facts.unanalysable and "bytes long" in facts.unanalysable
    assert analysis.elapsed_us < 200_000


def test_limit_is_in_utf8_bytes() -> None:
    analyzer = Analyzer(max_bytes=100)
    assert analyzer.analyze("SELECT '" + "é" * 40 + "'").unanalysable is None
    assert analyzer.analyze("SELECT '" + "é" * 60 + "'").unanalysable is not None


@pytest.mark.parametrize("sql", [
    "SELECT " + "(" * 100_000 + "1" + ")" * 100_000,
    "SELECT " + "+".join(["1"] * 100_000),
    "SELECT " + "||".join(["'a'"] * 5_000),
    "SELECT " + "(SELECT " * 3_000 + "1" + ")" * 3_000,
    "SELECT " + "ARRAY[" * 5_000 + "1" + "]" * 5_000,
    "SELECT " + "f(" * 20_000 + "1" + ")" * 20_000,
    "SELECT 1 WHERE " + "NOT " * 50_000 + "true",
    "SELECT " + "1 + (" * 30_000 + "1" + ")" * 30_000,
    "SELECT CASE WHEN " * 5_000 + "true THEN 1" + " END" * 5_000,
], ids=["parens", "plus-chain", "concat-chain", "subqueries", "arrays", "calls", "not",
        "mixed", "case"])
def test_deep_nesting_fails_closed(sql: str) -> None:
    analysis = Analyzer().analyze(sql)
    facts = analysis.statements[0]
    assert facts.unanalysable == TOO_DEEP or facts.parse_error is not None
    action, rule, _ = decide_statement(_policies(), (), facts)
    assert action == "block"
    assert rule in ("builtin:unanalysable", "builtin:parse-error")


def test_moderate_nesting_is_analysed() -> None:
    sql = "SELECT " + "+".join(["x"] * 200) + " FROM t"
    analysis, facts = _one(sql)
    assert analysis.unanalysable is None
    assert facts.columns == {"t.x"}


def test_wide_but_flat_statements_are_analysed() -> None:
    sql = "SELECT * FROM t WHERE id IN (" + ",".join(str(i) for i in range(50_000)) + ")"
    _, facts = _one(sql)
    assert facts.kinds == {"read"}
    sql = "SELECT 1 FROM t WHERE " + " AND ".join(f"a{i} = {i}" for i in range(5_000))
    _, facts = _one(sql)
    assert len(facts.filter_columns) == 5_000


def test_analysis_in_a_thread_with_a_small_stack_survives() -> None:
    results: list[object] = []

    def work() -> None:
        for sql in ("SELECT " + "+".join(["1"] * 20_000),
                    "SELECT " + "(" * 50_000 + "1" + ")" * 50_000):
            results.append(Analyzer().analyze(sql).statements[0].unanalysable)

    old = threading.stack_size(256 * 1024)
    try:
        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
    finally:
        threading.stack_size(old)
    assert results == [TOO_DEEP, TOO_DEEP]


def test_nul_bytes_and_invalid_text_are_refused() -> None:
    for sql in ("SELECT 1\x00; DROP TABLE x", "\x00", "SELECT '\udc80'"):
        facts = analyze(sql).statements[0]
        assert facts.unanalysable is not None


def test_empty_and_comment_only() -> None:
    for sql in ("", " ", ";", "-- c", "/* c */", "/* a */ ; -- b\n;"):
        assert analyze(sql).statements == ()


def test_parse_errors_are_reported_not_raised() -> None:
    analysis = analyze("SELECT FROM WHERE")
    assert analysis.parse_error is not None
    assert analysis.statements[0].parse_error == analysis.parse_error
    assert analysis.statements[0].fingerprint is None


def test_lazy_forms_never_raise() -> None:
    facts = analyze("SELECT a, b FROM t WHERE c = 1").statements[0]
    assert facts.fingerprint and facts.normalized == "SELECT a, b FROM t WHERE c = $1"
    assert "FROM t" in facts.pretty()
    bad = analyze("SELEC").statements[0]
    assert bad.pretty() == "SELEC" and bad.normalized == "SELEC"


def test_hostile_inputs_in_a_child_process() -> None:
    code = textwrap.dedent("""
        from hoopops.sql import Analyzer
        a = Analyzer()
        inputs = [
            "SELECT " + "(" * 1_000_000,
            "SELECT " + "(" * 300_000 + "1" + ")" * 300_000,
            "SELECT " + "+".join(["1"] * 300_000),
            "SELECT " + "||".join(["'x'"] * 100_000),
            "SELECT " + "ARRAY[" * 100_000 + "]" * 100_000,
            "SELECT " + "(SELECT " * 50_000 + "1" + ")" * 50_000,
            "SELECT " + "'" * 999_999,
            "/*" * 300_000 + "*/" * 300_000 + "SELECT 1",
            "$$" + "x" * 999_000,
        ]
        for sql in inputs:
            r = a.analyze(sql)
            st = r.statements[0]
            facts = (st.parse_error, st.unanalysable, st.fingerprint, st.pretty()[:10])
        print("survived", len(inputs))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "survived 9" in result.stdout


def _policies():  # type: ignore[no-untyped-def]
    from pathlib import Path

    from hoopops.policy import load_policies

    return load_policies(Path(__file__).resolve().parent.parent / "policies")


# -- the shape cache: literals never change facts it serves -------------------------------


def test_shape_cache_serves_new_literals() -> None:
    analyzer = Analyzer()
    first = analyzer.analyze("SELECT abalance FROM pgbench_accounts WHERE aid = 1;")
    second = analyzer.analyze("SELECT abalance FROM pgbench_accounts WHERE aid = 99999;")
    assert second.statements[0].text == "SELECT abalance FROM pgbench_accounts WHERE aid = 99999"
    assert second.statements[0].columns == first.statements[0].columns
    assert len(analyzer._shapes) == 1


def test_shape_cache_never_serves_literal_dependent_facts() -> None:
    analyzer = Analyzer()
    pairs = [
        ("SELECT set_config('standard_conforming_strings', 'on', false)",
         "SELECT set_config('standard_conforming_strings', 'off', false)"),
        ("SELECT set_config('statement_timeout', '1', false)",
         "SELECT set_config('role', 'postgres', false)"),
        ("SET standard_conforming_strings = 'on'", "SET standard_conforming_strings = 'off'"),
        ("EXPLAIN (ANALYZE 'off') DELETE FROM t", "EXPLAIN (ANALYZE 'on') DELETE FROM t"),
        ("SELECT 'x' -- ok", "SELECT 'y' -- ok"),
    ]
    for safe, risky in pairs:
        analyzer.analyze(safe)
        slow = Analyzer().analyze_uncached(risky, shapes=False)
        assert analyzer.analyze(risky).statements[0].to_dict() == \
            slow.statements[0].to_dict(), risky
    assert analyzer._shapes == {}


def test_shape_cache_gives_the_same_facts_as_a_full_analysis() -> None:
    from tests.test_sql_evasions import CASES

    analyzer = Analyzer()
    hits = 0
    for sql, *_ in CASES:
        slow = Analyzer().analyze_uncached(sql, shapes=False)
        analyzer.analyze_uncached(sql)
        before = len(analyzer._shapes)
        again = analyzer.analyze_uncached(sql)
        hits += before > 0 and sql.strip().upper().startswith(("SELECT", "INSERT", "UPDATE",
                                                                "DELETE", "WITH", "MERGE"))
        assert [s.to_dict() for s in again.statements] == \
            [s.to_dict() for s in slow.statements], sql
        assert (again.parse_error, again.unanalysable) == (slow.parse_error,
                                                           slow.unanalysable)
    assert hits > 50


def test_facts_are_built_in_field_order() -> None:
    """The analyser builds StatementFacts positionally for speed: keep the order in step."""
    import dataclasses

    from hoopops.sql import StatementFacts

    names = [f.name for f in dataclasses.fields(StatementFacts) if f.init]
    assert names == [
        "text", "statement_type", "kinds", "changes_data", "changes_schema",
        "changes_server", "tables_read", "tables_written", "columns", "columns_written",
        "filter_columns", "output_columns", "functions", "functions_called", "operators",
        "types", "unbounded", "dangerous", "dangerous_reasons", "lexing_risk",
        "resets_session", "row_locks", "parse_error", "unanalysable", "wrapped", "prepares",
        "executes", "deallocates", "notes", "location", "masking"]
    facts = analyze("PREPARE p AS DELETE FROM t USING u WHERE u.a = t.b "
                    "RETURNING pg_sleep(1)").statements[0]
    assert facts.statement_type == "PrepareStmt" and facts.prepares == "p"
    assert facts.tables_written == {"t"} and facts.tables_read == {"u"}
    assert facts.functions == {"pg_sleep"} and facts.location == 0
    assert facts.wrapped == ("DeleteStmt",) and facts.unanalysable is None

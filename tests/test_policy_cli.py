"""``hoopops policy check`` and ``hoopops policy lint``."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from hoopops.cli import main
from hoopops.policy_lint import lint_folder

POLICIES = Path(__file__).resolve().parent.parent / "policies"


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_check_text(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "policy", "check", "--policies", str(POLICIES),
                       "COMMIT; DROP TABLE accounts")
    assert code == 0
    assert out.startswith("decision: review  (rule ddl-needs-review: Schema changes need "
                          "a human)")
    assert "statement 2: DROP TABLE accounts" in out
    assert "tables written: accounts" in out


def test_check_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "policy", "check", "--policies", str(POLICIES), "--json",
                       "--sub", "agent-1", "--groups", "agents,readers", "--target", "app",
                       "WITH d AS (DELETE FROM t WHERE id = 1 RETURNING *) SELECT * FROM d")
    assert code == 0
    data = json.loads(out)
    assert data["decision"] == "review"
    assert data["rule"] == "writes-need-review"
    assert data["statements"][0]["kinds"] == ["write"]
    assert data["statements"][0]["tables_written"] == ["t"]
    assert data["statements"][0]["decision"] == "review"


def test_check_reads_the_folder_from_the_config(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path / "rules", "p.yaml", "default: block\nrules: []\n")
    config = write(tmp_path, "hoopops.yaml", "policies: rules\n")
    code, out, _ = run(capsys, "policy", "check", "--config", str(config), "--json",
                       "SELECT 1")
    assert code == 0
    assert json.loads(out)["decision"] == "block"
    assert json.loads(out)["policies"] == str(tmp_path / "rules")


def test_check_reports_policy_errors(tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path / "pol", "p.yaml", "rules:\n  - id: a\n    action: maybe\n")
    code, _, err = run(capsys, "policy", "check", "--policies", str(tmp_path / "pol"),
                       "SELECT 1")
    assert code == 2
    assert "p.yaml:3:" in err and "rules.0.action" in err


def test_lint_shipped_policies_are_clean(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "policy", "lint", str(POLICIES))
    assert (code, out.strip()) == (0, f"{POLICIES}: no problems")


def test_lint_finds_problems_with_file_and_line(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "pol"
    path = write(folder, "p.yaml", """
        default: review
        rules:
          - id: reads
            when: {kinds: [read]}
            action: allow
          - id: pii
            description: Never reached
            when: {kinds: [read], tables_read: [customers]}
            action: review
          - id: writes
            when: {kinds: [write]}
            action: review
          - id: more-writes
            when: {kinds: [write], tables: ["public.*"]}
            action: review
          - id: nonsense
            when: {parse_error: true, kinds: [read]}
            action: allow
          - id: globs
            when: {tables: ["a.b.c.d", "pub[lic.x", "x..y"]}
            action: review
          - id: unbounded-reads
            when: {unbounded: true, kinds: [read]}
            action: block
          - id: all
            action: block
          - id: after-all
            when: {kinds: [ddl]}
            action: review
    """)
    problems = lint_folder(folder)
    messages = "\n".join(str(p) for p in problems)
    assert all(p.file == str(path) for p in problems)
    assert "rule 'pii' is shadowed by rule 'reads'" in messages
    assert "rule 'more-writes' is redundant: rule 'writes'" in messages
    assert "rule 'nonsense' can never match" in messages
    assert "'a.b.c.d' has more name parts" in messages
    assert "unbalanced '['" in messages
    assert "'x..y' has an empty name part" in messages
    assert "rule 'unbounded-reads' can never match" in messages
    assert "rule 'after-all' is shadowed by rule 'all'" in messages
    lines = {p.line for p in problems}
    assert {6, 13, 17, 20, 23, 27} <= lines
    code, out, err = run(capsys, "policy", "lint", str(folder))
    assert code == 1
    assert f"{path}:6: warning: id: rule 'pii' is shadowed" in out
    assert "0 error(s)" in err
    code, out, _ = run(capsys, "policy", "lint", "--json", str(folder))
    assert code == 1
    assert len(json.loads(out)["problems"]) == len(problems)


def test_lint_reports_every_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "pol"
    write(folder, "a.yaml", "rules:\n  - {id: a, when: {tabels: [x]}, action: allow}\n")
    write(folder, "b.yaml", "rules:\n  - {id: b, when: {sql: '['}, action: allow}\n")
    code, out, _ = run(capsys, "policy", "lint", str(folder))
    assert code == 1
    assert "a.yaml:2: error: rules.0.when.tabels: unknown condition 'tabels' (did you mean " \
           "'tables'?)" in out
    assert "b.yaml:2: error: rules.0.when.sql: invalid regular expression" in out

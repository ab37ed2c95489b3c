"""``hoopops audit``: sessions, show, export, verify, prune, found through --config."""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import sqlite3
import time
import uuid
from pathlib import Path

import pytest

from hoopops.audit import (
    ApprovalRequest,
    MaskingAction,
    SessionRecord,
    SQLiteAuditStore,
    StatementRecord,
    StatementResult,
)
from hoopops.cli import audit as audit_cli
from tests.clients.offline import store_config

CONFIG = store_config("trail/audit.db")
DAY = 86400.0


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """The subcommand through its own parser, as ``hoopops audit ...`` would run it."""
    parser = argparse.ArgumentParser(prog="hoopops")
    audit_cli.register(parser.add_subparsers())
    args = parser.parse_args(["audit", *argv])
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, out, err


async def _populate(path: Path) -> list[str]:
    store = await SQLiteAuditStore.open(path)
    now = time.time()
    ids = []
    for n, (subject, at) in enumerate([("agent-old", now - 500 * DAY), ("agent-a", now - 60),
                                       ("agent-b", now - 30)]):
        sid = str(uuid.uuid4())
        ids.append(sid)
        await store.session_started(SessionRecord(sid, subject, ("agents",), "iss", "tok",
                                                  "app", "10.1.1.1", 5000 + n, "agent-cli",
                                                  "main", True, at))
        stmt = await store.statement_received(StatementRecord(
            sid, 1, at, "SELECT email FROM users", None, {}, "allow", "read-ok"))
        await store.masking_actions(stmt, sid, [MaskingAction("users.email", "redact", 3)],
                                    at=at)
        await store.statement_finished(stmt, StatementResult(
            at, at + 0.004, 3, "SELECT 3", None, None, "a" * 64,
            {"columns": ["email"], "rows": [["***"]], "truncated": True}))
        blocked = await store.statement_received(StatementRecord(
            sid, 2, at + 1, "DROP TABLE users", None, {}, "block", "no-ddl"))
        await store.statement_finished(blocked, StatementResult(
            None, at + 1, None, None, "42501", "blocked by no-ddl"))
        review = await store.statement_received(StatementRecord(
            sid, 3, at + 2, "DELETE FROM users WHERE id = $1", ["7"], {}, "review", "rw"))
        approval = await store.approval_requested(ApprovalRequest(
            sid, review, subject, ("agents",), "iss", "tok", "DELETE FROM users WHERE id = $1",
            ["7"], "fp", "rw", "writes", at + 2, at + 302, "c" * 64))
        await store.approval_decided(approval, True, "once", "analyst", "ticket 12", at + 3)
        await store.statement_finished(review, StatementResult(at + 3, at + 3.01, 1,
                                                               "DELETE 1"))
        await store.session_ended(sid, "client closed", at + 4, 100, 200, 3)
    await store.close()
    return ids


@pytest.fixture
def config(tmp_path: Path) -> tuple[Path, list[str]]:
    path = tmp_path / "hoopops.yaml"
    path.write_text(CONFIG)
    ids = asyncio.run(_populate(tmp_path / "trail" / "audit.db"))
    return path, ids


def test_sessions(config, capsys) -> None:
    path, ids = config
    code, out, _ = run(capsys, "sessions", "--config", str(path))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["STARTED", "(UTC)", "ENDED"]
    assert ids[2] in lines[1] and ids[0] in lines[3] and "agent-b" in lines[1]

    code, out, _ = run(capsys, "sessions", "-c", str(path), "--json", "--since", "1h")
    data = json.loads(out)
    assert [s["id"] for s in data] == [ids[2], ids[1]]
    assert data[0]["statements"] == 3 and data[0]["blocked"] == 1 and data[0]["tls"] is True

    code, out, _ = run(capsys, "sessions", "-c", str(path), "--json", "--identity", "agent-a",
                       "--decision", "block")
    assert [s["id"] for s in json.loads(out)] == [ids[1]]
    code, out, _ = run(capsys, "sessions", "-c", str(path), "--until", "2001-01-01")
    assert out.strip() == "no sessions match"


def test_show(config, capsys) -> None:
    path, ids = config
    code, out, _ = run(capsys, "show", ids[1], "-c", str(path))
    assert code == 0
    assert f"session {ids[1]}" in out and "agent-a" in out
    assert "DROP TABLE users" in out and "blocked by no-ddl" in out
    assert "approval #" in out and "approved (once) by analyst" in out and "ticket 12" in out
    assert "masked users.email with redact x3" in out
    assert "(truncated)" in out

    code, out, _ = run(capsys, "show", ids[1], "-c", str(path), "--json")
    data = json.loads(out)
    assert data["session"]["id"] == ids[1]
    assert [s["decision"] for s in data["statements"]] == ["allow", "block", "review"]
    assert data["statements"][2]["approval"]["decided_by"] == "analyst"

    code, _, err = run(capsys, "show", "nope", "-c", str(path))
    assert code == 1 and "no session nope" in err


def test_export(config, capsys, tmp_path: Path) -> None:
    path, ids = config
    code, out, _ = run(capsys, "export", "-c", str(path), "--identity", "agent-b")
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(rows) == 3 and {r["session_id"] for r in rows} == {ids[2]}
    assert rows[2]["approval_decided_by"] == "analyst" and rows[2]["params"] == ["7"]

    target = tmp_path / "out.csv"
    code, _, err = run(capsys, "export", "-c", str(path), "--format", "csv", "--decision",
                       "block", "--output", str(target))
    assert code == 0 and "exported 3 statements" in err
    with target.open(newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [r["sql"] for r in table] == ["DROP TABLE users"] * 3
    assert table[0]["sqlstate"] == "42501" and table[0]["masking"] == "[]"

    code, out, _ = run(capsys, "export", "-c", str(path), "--records", "--session", ids[0])
    kinds = [json.loads(line)["kind"] for line in out.splitlines()]
    assert kinds[0] == "session.started" and kinds[-1] == "session.ended"


def test_verify_ok_and_broken(config, capsys) -> None:
    path, _ = config
    code, out, _ = run(capsys, "verify", "-c", str(path))
    assert code == 0 and out.startswith("audit trail OK")
    head = next(line.split()[1] for line in out.splitlines() if line.startswith("head "))
    code, out, _ = run(capsys, "verify", "-c", str(path), "--expect", head, "--json")
    assert code == 0 and json.loads(out)["ok"] is True

    db = sqlite3.connect(path.parent / "trail" / "audit.db", isolation_level=None)
    db.execute("DROP TRIGGER chain_no_update")
    db.execute("UPDATE chain SET payload = replace(payload, 'DROP', 'drop') WHERE seq = 5")
    db.close()
    code, out, err = run(capsys, "verify", "-c", str(path))
    assert code == 1
    assert out.startswith("audit trail BROKEN at record #5: record #5 (statement.received) "
                          "was changed")
    assert "guard trigger" in err
    code, out, _ = run(capsys, "verify", "-c", str(path), "--json")
    assert code == 1 and json.loads(out)["first_problem"]["record"] == 5


def test_prune(config, capsys) -> None:
    path, ids = config
    code, out, _ = run(capsys, "prune", "-c", str(path), "--older-than", "400d", "--dry-run")
    assert code == 0 and out.startswith("would prune 11 records (1 sessions)")
    code, out, _ = run(capsys, "prune", "-c", str(path), "--older-than", "400d")
    assert code == 0 and out.startswith("pruned 11 records (1 sessions)")
    code, out, _ = run(capsys, "prune", "-c", str(path), "--older-than", "400d", "--json")
    assert json.loads(out)["records"] == 0
    code, out, _ = run(capsys, "verify", "-c", str(path))
    assert code == 0 and "were pruned (anchored)" in out
    code, out, _ = run(capsys, "sessions", "-c", str(path), "--json")
    assert ids[0] not in out
    code, _, err = run(capsys, "prune", "-c", str(path), "--older-than", "soon")
    assert code == 2 and "--older-than" in err


def test_missing_store_and_bad_config(tmp_path: Path, capsys) -> None:
    path = tmp_path / "hoopops.yaml"
    path.write_text(CONFIG)
    code, _, err = run(capsys, "sessions", "-c", str(path))
    assert code == 1 and "no audit store at" in err
    assert not (tmp_path / "trail" / "audit.db").exists()
    path.write_text("targets: {}\n")
    with pytest.raises(SystemExit) as exc:
        run(capsys, "verify", "-c", str(path))
    assert exc.value.code == 2
    assert "configuration error" in capsys.readouterr().err


def test_time_arguments() -> None:
    assert abs(audit_cli.when("2h") - (time.time() - 7200)) < 5
    assert audit_cli.when("2026-01-01") == 1767225600.0
    with pytest.raises(argparse.ArgumentTypeError):
        audit_cli.when("yesterday-ish")


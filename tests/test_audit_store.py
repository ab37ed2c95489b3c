"""The SQLite audit store: records, read API, export, group commit, failing closed."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import sqlite3
import time
import uuid
from pathlib import Path

import pytest

from hoopops.audit import (
    ApprovalNotPending,
    ApprovalRequest,
    AuditError,
    AuditStoreMissing,
    AuditWriteError,
    Filters,
    MaskingAction,
    NullAuditStore,
    ResultSampler,
    SessionRecord,
    SQLiteAuditStore,
    StatementRecord,
    StatementResult,
    approval_binding,
    open_store,
)
from hoopops.audit.export import RECORD_FIELDS, STATEMENT_FIELDS
from hoopops.audit.journal import read_lines
from hoopops.audit.schema import SCHEMA_VERSION
from hoopops.config import AuditConfig


def session_record(subject: str = "agent-1", target: str = "prod",
                   at: float | None = None) -> SessionRecord:
    return SessionRecord(id=str(uuid.uuid4()), subject=subject, groups=("agents", "ro"),
                         issuer="https://idp.example", token_id=f"tok-{subject}",
                         claimed_user="app", client_addr="10.0.0.5", client_port=50123,
                         application_name="psql", target=target, tls=True,
                         started_at=time.time() if at is None else at)


async def mixed_workload(store: SQLiteAuditStore, sessions: int = 3,
                         statements: int = 6) -> list[str]:
    """Sessions with allowed, blocked and reviewed statements, results, masking,
    approvals (approved, denied, withdrawn) and gateway events."""
    await store.gateway_event("gateway.started", {"listen": "127.0.0.1:6432"})
    ids = []
    for n in range(sessions):
        s = session_record(subject=f"agent-{n}", target="prod" if n % 2 == 0 else "staging")
        ids.append(s.id)
        await store.session_started(s)
        for i in range(statements):
            decision = ("allow", "block", "review")[i % 3]
            now = time.time()
            stmt = await store.statement_received(StatementRecord(
                session_id=s.id, seq=i + 1, received_at=now,
                sql=f"SELECT ssn, email FROM customers WHERE id = $1 /* {n}.{i} */",
                params=[str(i)], facts={"kind": "select", "tables": ["public.customers"]},
                decision=decision, rule_id=f"rule-{decision}"))
            if decision == "review":
                approval = await store.approval_requested(ApprovalRequest(
                    session_id=s.id, statement_id=stmt, subject=s.subject, groups=s.groups,
                    issuer=s.issuer, token_id=s.token_id, sql="SELECT 1", params=None,
                    fingerprint="fp", rule_id="rule-review", reason="touches PII",
                    created_at=now, expires_at=now + 300,
                    binding_sha256=approval_binding(s.id, s.subject, s.issuer, "SELECT 1",
                                                    None)))
                if i % 2:
                    await store.approval_decided(approval, True, "once", "analyst", "ok",
                                                 time.time())
                else:
                    await store.approval_closed(approval, "withdrawn", time.time(), "cancel")
            if decision == "block":
                await store.statement_finished(stmt, StatementResult(
                    None, time.time(), None, None, "42501", "blocked by rule-block"))
                continue
            sampler = ResultSampler(10, 4096)
            sampler.set_columns(["ssn", "email"])
            sampler.add_row(["***-**-1234", "a***@example.com"])
            sampler.update(b"D\x00\x00\x00\x10")
            await store.masking_actions(stmt, s.id, [
                MaskingAction("public.customers.ssn", "last4", 1),
                MaskingAction("detector:email", "redact", 1)])
            await store.statement_finished(stmt, sampler.result(
                started_at=now, finished_at=time.time(), rows=1, command_tag="SELECT 1"))
        await store.session_ended(s.id, "client closed", time.time(), 1000, 2000, statements)
    await store.gateway_event("policy.reloaded", {"version": "abc123", "files": 3})
    return ids


@pytest.fixture
async def store(tmp_path: Path):
    s = await SQLiteAuditStore.open(tmp_path / "audit.db")
    yield s
    await s.close()


async def test_mixed_workload_verifies(store: SQLiteAuditStore) -> None:
    await mixed_workload(store)
    report = await store.verify()
    assert report.ok, report.to_json()
    assert report.projections_checked
    assert report.first_seq == 1 and report.last_seq == report.records
    assert not report.warnings


async def test_store_settings(store: SQLiteAuditStore, tmp_path: Path) -> None:
    await store.gateway_event("gateway.started", {})
    db = sqlite3.connect(tmp_path / "audit.db")
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental
        indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        assert {"sessions_started", "sessions_subject", "approvals_pending",
                "statements_session"} <= indexes
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            db.execute("UPDATE chain SET kind = 'x'")
        with pytest.raises(sqlite3.IntegrityError, match="only by hoopops audit prune"):
            db.execute("DELETE FROM chain")
    finally:
        db.close()


async def test_read_api(store: SQLiteAuditStore) -> None:
    ids = await mixed_workload(store, sessions=3, statements=6)
    sessions = await store.list_sessions()
    assert [s.id for s in sessions] == list(reversed(ids))
    assert sessions[0].statements == 6 and sessions[0].blocked == 2
    assert sessions[0].reviewed == 2 and not sessions[0].open
    assert [s.id for s in await store.list_sessions(identity="agent-1")] == [ids[1]]
    assert {s.id for s in await store.list_sessions(target="prod")} == {ids[0], ids[2]}
    assert len(await store.list_sessions(text="/* 2.3 */")) == 1
    assert len(await store.list_sessions(decision="review")) == 3
    assert await store.list_sessions(until=time.time() - 3600) == []
    assert len(await store.list_sessions(limit=2)) == 2

    statements = await store.session_statements(ids[0])
    assert [s.seq for s in statements] == [1, 2, 3, 4, 5, 6]
    allowed, blocked, reviewed = statements[0], statements[1], statements[2]
    assert allowed.params == ["0"] and allowed.rows == 1 and allowed.finished
    assert allowed.result_sample == {"columns": ["ssn", "email"],
                                     "rows": [["***-**-1234", "a***@example.com"]],
                                     "truncated": False}
    assert len(allowed.result_sha256 or "") == 64
    assert [(m.column_or_detector, m.strategy, m.count) for m in allowed.masking] == [
        ("public.customers.ssn", "last4", 1), ("detector:email", "redact", 1)]
    assert blocked.sqlstate == "42501" and blocked.masking == ()
    assert reviewed.approval is not None and reviewed.approval.status == "withdrawn"
    assert statements[5].approval is not None and statements[5].approval.status == "approved"
    assert statements[5].approval.decided_by == "analyst"

    session = await store.get_session(ids[0])
    assert session is not None and session.subject == "agent-0"
    assert session.groups == ("agents", "ro") and session.bytes_out == 2000
    assert await store.get_session("nope") is None
    masking = await store.recent_masking(3)
    assert len(masking) == 3 and masking[0].subject == "agent-2"
    assert await store.pending_approvals() == []


async def test_export_schemas(store: SQLiteAuditStore) -> None:
    await mixed_workload(store, sessions=2, statements=3)
    out = io.StringIO()
    assert await store.export(out) == 6
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert list(rows[0]) == list(STATEMENT_FIELDS)
    assert rows[0]["schema"] == "hoopops.audit.statement/1"
    assert rows[0]["groups"] == ["agents", "ro"] and rows[0]["masking"][0]["strategy"] == "last4"
    assert rows[2]["approval_status"] == "withdrawn"
    assert len(rows[0]["received_hash"]) == 64

    out = io.StringIO()
    assert await store.export(out, format="csv", filters=Filters(identity="agent-1")) == 3
    table = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert len(table) == 3 and {r["subject"] for r in table} == {"agent-1"}
    assert table[0]["tls"] == "true" and json.loads(table[0]["params"]) == ["0"]

    out = io.StringIO()
    count = await store.export(out, what="records")
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert count == len(records) == (await store.verify()).records
    assert list(records[0]) == list(RECORD_FIELDS)
    assert records[1]["prev_hash"] == records[0]["hash"]


async def test_group_commit_under_50_writers(store: SQLiteAuditStore) -> None:
    """50 sessions recording at once: each statement is durable (in the journal, flushed
    to disk under FULL) when statement_received returns, the flushes are shared, and the
    chain takes the records in a few large transactions, not one per statement."""
    s = session_record()
    await store.session_started(s)
    before = store.stats.batches

    async def writer(n: int) -> list[int]:
        ids = []
        for i in range(20):
            ids.append(await store.statement_received(StatementRecord(
                s.id, n * 100 + i, time.time(), f"SELECT {n}, {i}", None, {}, "allow", None)))
        return ids

    results = await asyncio.gather(*(writer(n) for n in range(50)))
    ids = [i for r in results for i in r]
    assert len(set(ids)) == 1000
    journal = store._journal
    assert journal is not None and journal.sync
    lines = [line for path in sorted(journal.directory.glob(f"{journal.run}.*.log"))
             for line, _ in read_lines(path)]
    assert sum(1 for line in lines if line.kind == "statement.received") >= 1000 - \
        50 * (store.stats.records - 1)  # whatever is not chained yet is in the journal
    # Every writer waited for its own flush, so 50 of them share each fdatasync.
    assert journal.syncs < 1000 / 10, journal.syncs
    views = await store.session_statements(s.id)  # a read sees everything queued
    assert sorted(v.id for v in views) == sorted(ids)
    assert store.stats.batches - before < 1000 / 100, store.stats.batches - before
    assert store.stats.largest_batch >= 100
    assert (await store.verify()).ok


@pytest.mark.parametrize("synchronous", ["FULL", "NORMAL"])
async def test_write_failure_is_a_clear_error(tmp_path: Path, synchronous: str) -> None:
    store = await SQLiteAuditStore.open(tmp_path / "audit.db", busy_timeout=0.05,
                                        synchronous=synchronous)
    s = session_record()
    await store.session_started(s)
    blocker = sqlite3.connect(tmp_path / "audit.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another writer holds the lock and never lets go
    try:
        with pytest.raises(AuditWriteError, match="statement was not run"):
            await store.statement_received(StatementRecord(
                s.id, 1, time.time(), "SELECT 1", None, {}, "allow", None))
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    # Once the lock is gone the store works again, and nothing half-written remains.
    await store.statement_received(StatementRecord(s.id, 2, time.time(), "SELECT 2", None, {},
                                                   "allow", None))
    assert (await store.verify()).ok
    await store.close()
    with pytest.raises(AuditWriteError, match="closed"):
        await store.gateway_event("gateway.stopped", {})


async def test_one_bad_record_does_not_sink_its_batch(store: SQLiteAuditStore) -> None:
    s = session_record()
    await store.session_started(s)
    duplicate = store.session_started(s)  # same id: the projection refuses it
    good = [store.statement_received(StatementRecord(s.id, i, time.time(), "SELECT 1", None,
                                                     {}, "allow", None)) for i in range(5)]
    results = await asyncio.gather(duplicate, *good, return_exceptions=True)
    assert isinstance(results[0], AuditWriteError)
    assert all(isinstance(r, int) for r in results[1:])
    assert (await store.verify()).ok


async def test_a_record_that_cannot_be_encoded_fails_alone(store: SQLiteAuditStore) -> None:
    """Event data with a lone surrogate cannot be stored as UTF-8: that record is refused,
    and the session starts waiting in the same batch are written all the same."""
    starts = [session_record() for _ in range(3)]
    bad = store.gateway_event("gateway.error", {"detail": "bad \ud800 text"})
    results = await asyncio.gather(bad, *(store.session_started(s) for s in starts),
                                   return_exceptions=True)
    assert isinstance(results[0], AuditWriteError), results[0]
    assert all(isinstance(r, int) for r in results[1:]), results
    assert {v.id for v in await store.list_sessions()} >= {s.id for s in starts}
    assert (await store.verify()).ok


async def test_statement_finished_from_another_store_instance(tmp_path: Path) -> None:
    first = await SQLiteAuditStore.open(tmp_path / "audit.db")
    s = session_record()
    await first.session_started(s)
    stmt = await first.statement_received(StatementRecord(s.id, 1, time.time(), "SELECT 1",
                                                          None, {}, "allow", None))
    await first.close()
    second = await SQLiteAuditStore.open(tmp_path / "audit.db")
    await second.statement_finished(stmt, StatementResult(time.time(), time.time(), 1,
                                                          "SELECT 1"))
    with pytest.raises(AuditWriteError, match="no statement #999"):
        await second.statement_finished(999, StatementResult(None, time.time(), 0, None))
    assert (await second.session_statements(s.id))[0].command_tag == "SELECT 1"
    assert (await second.verify()).ok
    await second.close()


async def test_approval_transitions_happen_once(store: SQLiteAuditStore) -> None:
    s = session_record()
    await store.session_started(s)
    now = time.time()
    approval = await store.approval_requested(ApprovalRequest(
        s.id, None, s.subject, s.groups, s.issuer, s.token_id, "DELETE FROM t", None, "fp",
        "r", None, now, now + 60, "b" * 64))
    assert [a.id for a in await store.pending_approvals()] == [approval]
    decided = await store.approval_decided(approval, False, None, "analyst", "no", now)
    assert decided.status == "denied" and decided.comment == "no"
    with pytest.raises(ApprovalNotPending, match="denied by analyst"):
        await store.approval_decided(approval, True, "once", "other", None, now)
    # A late time-out does not override the decision; it reports it.
    assert (await store.approval_closed(approval, "expired", now, "late")).status == "denied"
    assert await store.pending_approvals() == []
    assert (await store.verify()).ok


async def test_close_orphaned_sessions(store: SQLiteAuditStore) -> None:
    s = session_record()
    await store.session_started(s)
    now = time.time()
    await store.approval_requested(ApprovalRequest(
        s.id, None, s.subject, s.groups, s.issuer, s.token_id, "SELECT 1", None, "fp", None,
        None, now, now + 60, "b" * 64))
    assert await store.close_orphaned_sessions("gateway restarted") == 1
    view = await store.get_session(s.id)
    assert view is not None and view.end_reason == "gateway restarted"
    assert await store.pending_approvals() == []
    assert (await store.verify()).ok


async def test_open_store_from_config(tmp_path: Path) -> None:
    with pytest.raises(AuditStoreMissing, match="no audit store"):
        await SQLiteAuditStore.open(tmp_path / "missing.db", create=False)
    store = await open_store(AuditConfig(tmp_path / "deep" / "a.db", result_rows=1,
                                         result_bytes=100))
    assert isinstance(store, SQLiteAuditStore)
    s = session_record()
    await store.session_started(s)
    stmt = await store.statement_received(StatementRecord(s.id, 1, time.time(), "SELECT", None,
                                                          {}, "allow", None))
    # The configured cap holds even when the caller sends more.
    await store.statement_finished(stmt, StatementResult(
        None, time.time(), 3, "SELECT 3", result_sample={
            "columns": ["a"], "rows": [["1"], ["2"], ["3"]], "truncated": False}))
    sample = (await store.session_statements(s.id))[0].result_sample
    assert sample == {"columns": ["a"], "rows": [["1"]], "truncated": True}
    await store.close()
    null = await open_store(AuditConfig(tmp_path / "x.db", enabled=False))
    assert isinstance(null, NullAuditStore) and not (tmp_path / "x.db").exists()


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    await (await SQLiteAuditStore.open(path)).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(AuditError, match="upgrade hoopops"):
        await SQLiteAuditStore.open(path)


def test_result_sampler_caps_rows_and_bytes() -> None:
    sampler = ResultSampler(max_rows=2, max_bytes=1000)
    sampler.set_columns(["a", "b"])
    for i in range(5):
        sampler.add_row([str(i), b"\x01\x02"])
    assert sampler.sample() == {"columns": ["a", "b"],
                                "rows": [["0", "\\x0102"], ["1", "\\x0102"]],
                                "truncated": True}
    assert sampler.rows_seen == 5
    small = ResultSampler(max_rows=100, max_bytes=10)
    small.add_row(["x" * 20])
    assert small.sample()["rows"] == [] and small.truncated


async def test_unawaited_result_is_durable_before_the_next_statement(
        store: SQLiteAuditStore) -> None:
    s = session_record()
    await store.session_started(s)
    first = await store.statement_received(StatementRecord(
        s.id, 1, time.time(), "SELECT 1", None, {"tables": {"b", "a"}}, "allow", None))
    assert await store.statement_finished(first, StatementResult(
        time.time(), time.time(), 1, "SELECT 1"), wait=False) is None
    assert await store.masking_actions(first, s.id, [MaskingAction("c", "hash", 1)],
                                       wait=False) is None
    # The session's next statement is committed after (or with) the queued records.
    await store.statement_received(StatementRecord(s.id, 2, time.time(), "SELECT 2", None,
                                                   {}, "allow", None))
    statements = await store.session_statements(s.id)
    assert statements[0].command_tag == "SELECT 1" and len(statements[0].masking) == 1
    # Facts that are not plain JSON (a set) are converted, deterministically.
    assert statements[0].facts == {"tables": ["a", "b"]}
    assert (await store.verify()).ok


async def test_gateway_event_kinds_cannot_impersonate_audit_records(
        store: SQLiteAuditStore) -> None:
    for kind in ("session.started", "audit.pruned", "started"):
        with pytest.raises(ValueError, match="gateway event kind"):
            await store.gateway_event(kind, {})
    await store.gateway_event("policy.reloaded", {"sha256": "ab", "files": ("a.yaml",)})
    assert (await store.verify()).ok


async def test_statement_records_are_canonical_and_match_their_projection(
        store: SQLiteAuditStore) -> None:
    """The writer splices statement payloads from parts and fills their rows itself;
    both must be exactly what the documented definition (canonical JSON, and the
    projection triggers verify rebuilds with) gives, for awkward values too."""
    s = session_record()
    await store.session_started(s)
    awkward = 'SELECT "é\u2028", E\'\\n\\t\' , \'"}{\' /* \u00e9 \U0001f600 */'
    first = await store.statement_received(StatementRecord(
        s.id, 1, time.time(), awkward, ["ü", None, b"\x00\xff", 'q"'],
        {"z": 1.5, "a": [None, True], "nan": float("nan"), "set": {"b", "a"}},
        "review", None, approval_id=7))
    await store.statement_finished(first, StatementResult(
        time.time(), time.time(), 0, None, "XX000", 'quote " and é',
        result_sha256="ab" * 32, result_sample={"columns": ["é"], "rows": [[None, "\\x00"]],
                                                "truncated": True}))
    second = await store.statement_received(StatementRecord(
        s.id, 2, time.time(), "SELECT 1", None, {}, "allow", "rule-é"))
    await store.statement_finished(second, StatementResult(None, time.time(), None, None))
    report = await store.verify()
    assert report.ok and report.projections_checked, report.problems
    db = sqlite3.connect(store.path)
    try:
        for kind, payload in db.execute("SELECT kind, payload FROM chain"):
            assert payload == json.dumps(json.loads(payload), sort_keys=True,
                                         separators=(",", ":"), ensure_ascii=False), kind
    finally:
        db.close()
    views = await store.session_statements(s.id)
    assert views[0].sql == awkward and views[0].params == ["ü", None, {"hex": "00ff"}, 'q"']
    assert views[0].facts["set"] == ["a", "b"] and views[0].error_message.endswith("é")
    assert views[1].facts == {} and views[1].finished and views[1].rule_id == "rule-é"


async def test_a_version_1_store_migrates_and_still_verifies(tmp_path: Path) -> None:
    """A store written by the previous version (statement rows filled by triggers) opens,
    is migrated, keeps its evidence, and verifies with records of both versions."""
    from hoopops.audit.chain import GENESIS, canonical_json, record_hash
    from hoopops.audit.schema import GUARD_TRIGGERS, MIGRATIONS

    path = tmp_path / "v1.db"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("BEGIN")
    for statement in MIGRATIONS[1]("main"):
        db.execute(statement)
    db.execute("PRAGMA user_version = 1")
    db.execute("COMMIT")
    old = session_record()
    at = "2026-05-09T07:35:25.123456Z"
    records = [
        ("session.started", old.id, {
            "id": old.id, "subject": old.subject, "groups": list(old.groups),
            "issuer": old.issuer, "token_id": old.token_id, "claimed_user": old.claimed_user,
            "client_addr": old.client_addr, "client_port": old.client_port,
            "application_name": old.application_name, "target": old.target, "tls": True,
            "started_at": at}),
        ("statement.received", old.id, {
            "session_id": old.id, "seq": 1, "received_at": at, "sql": "SELECT 'v1'",
            "params": None, "facts": {"kinds": ["read"]}, "decision": "allow",
            "rule_id": "reads", "approval_id": None}),
        ("statement.finished", old.id, {
            "statement_id": 2, "started_at": at, "finished_at": at, "duration_us": 0,
            "rows": 1, "command_tag": "SELECT 1", "sqlstate": None, "error_message": None,
            "result_sha256": "cd" * 32,
            "result_sample": {"columns": ["v"], "rows": [["v1"]], "truncated": False}}),
    ]
    prev = GENESIS
    for seq, (kind, session_id, payload) in enumerate(records, start=1):
        digest = record_hash(seq, kind, at, session_id, payload, prev)
        db.execute("INSERT INTO chain VALUES (?, ?, ?, ?, ?, ?, ?)",
                   (seq, kind, at, session_id, canonical_json(payload), prev, digest))
        prev = digest
    db.close()

    store = await SQLiteAuditStore.open(path)
    try:
        db = sqlite3.connect(path)
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        triggers = {r[0] for r in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'trigger'")}
        db.close()
        # Only the guards stay on the chain; the writer projects (see audit/schema.py).
        assert triggers == set(GUARD_TRIGGERS)
        stmt = await store.statement_received(StatementRecord(
            old.id, 2, time.time(), "SELECT 'v2'", None, {"kinds": ["read"]}, "allow",
            "reads"))
        await store.statement_finished(stmt, StatementResult(time.time(), time.time(), 1,
                                                             "SELECT 1"))
        views = await store.session_statements(old.id)
        assert [v.sql for v in views] == ["SELECT 'v1'", "SELECT 'v2'"]
        assert views[0].command_tag == views[1].command_tag == "SELECT 1"
        assert views[0].result_sample == {"columns": ["v"], "rows": [["v1"]],
                                          "truncated": False}
        report = await store.verify()
        assert report.ok and report.projections_checked and report.records == 5
    finally:
        await store.close()
    # Editing a statement row the writer filled is still caught.
    db = sqlite3.connect(path)
    db.execute("UPDATE statements SET command_tag = 'SELECT 9' WHERE id = ?", (stmt,))
    db.commit()
    db.close()
    store = await SQLiteAuditStore.open(path)
    try:
        report = await store.verify()
        assert not report.ok and report.first_problem is not None
        assert "command_tag" in report.first_problem.message
    finally:
        await store.close()


async def test_a_held_write_lock_delays_the_batch_not_the_loop(tmp_path: Path) -> None:
    """When another process holds the write lock, the batch waits on the writer thread
    while the event loop runs on, and commits once the lock is free."""
    path = tmp_path / "audit.db"
    store = await SQLiteAuditStore.open(path, synchronous="NORMAL", busy_timeout=10)
    try:
        s = session_record()
        await store.session_started(s)
        blocker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        blocker.execute("BEGIN IMMEDIATE")
        write = asyncio.ensure_future(store.statement_received(StatementRecord(
            s.id, 1, time.time(), "SELECT 1", None, {}, "allow", None)))
        ticks = 0
        for _ in range(20):
            await asyncio.sleep(0.01)
            ticks += 1
        assert ticks == 20 and not write.done()
        blocker.execute("ROLLBACK")
        blocker.close()
        first = await asyncio.wait_for(write, 10)
        # Concurrent sessions share batches as before.
        await asyncio.gather(*(store.statement_received(StatementRecord(
            s.id, n, time.time(), f"SELECT {n}", None, {}, "allow", None))
            for n in range(2, 40)))
        await store.statement_finished(first, StatementResult(None, time.time(), 1, "SELECT 1"))
        statements = await store.session_statements(s.id)
        assert len(statements) == 39 and statements[0].command_tag == "SELECT 1"
        assert store.stats.batches < 39 and (await store.verify()).ok
        assert (await store.prune(400 * 86400)).records == 0
    finally:
        await store.close()


def test_cap_sample_keeps_what_a_sampler_keeps() -> None:
    """The shortcut for samples already within the caps gives what the ResultSampler
    gives, and anything over them still goes through the sampler."""
    from hoopops.audit.records import cap_sample

    samples = [
        {"columns": ["a", 2], "rows": [["x", None], ["é" * 10, "y"]], "truncated": False},
        {"columns": ["a"], "rows": [["1"], ["2"], ["3"]], "truncated": False},
        {"columns": ["a"], "rows": [["x" * 60]], "truncated": 0},
        {"columns": ["b"], "rows": [[b"\x01"]], "truncated": True},
        {"columns": [], "rows": []},
    ]
    for sample in samples:
        for max_rows, max_bytes in ((100, 1000), (2, 1000), (100, 30), (1, 8)):
            sampler = ResultSampler(max_rows, max_bytes)
            sampler.set_columns([str(c) for c in sample["columns"]])
            for row in sample["rows"]:
                sampler.add_row(list(row))
            expected = sampler.sample()
            expected["truncated"] = bool(sample.get("truncated")) or sampler.truncated
            assert cap_sample(sample, max_rows, max_bytes) == expected, (sample, max_rows)

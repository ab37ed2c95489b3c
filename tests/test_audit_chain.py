"""Tamper evidence and retention: every edit, deletion or re-ordering made to the SQLite
file by hand is named by verify; prune keeps what remains verifiable."""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from hoopops.audit import (
    ApprovalRequest,
    MaskingAction,
    SessionRecord,
    SQLiteAuditStore,
    StatementRecord,
    StatementResult,
    VerifyReport,
    record_hash,
)
from hoopops.audit.chain import record_hash_text

DAY = 86400.0


async def add_session(store: SQLiteAuditStore, at: float, statements: int = 3,
                      end: bool = True) -> str:
    """One session at time ``at``: statements with results and masking, one approval."""
    sid = str(uuid.uuid4())
    await store.session_started(SessionRecord(sid, "agent", ("g",), "iss", "tok", "u",
                                              "127.0.0.1", 4000, "psql", "prod", False, at))
    for i in range(statements):
        stmt = await store.statement_received(StatementRecord(
            sid, i + 1, at + i, f"SELECT {i}", None, {"kind": "select"}, "allow", "r"))
        await store.masking_actions(stmt, sid, [MaskingAction("t.c", "redact", 2)], at=at + i)
        await store.statement_finished(stmt, StatementResult(at + i, at + i + 0.5, 1,
                                                             "SELECT 1", None, None, "0" * 64))
    approval = await store.approval_requested(ApprovalRequest(
        sid, None, "agent", ("g",), "iss", "tok", "DELETE FROM t", None, "fp", "r", None,
        at + statements, at + statements + 300, "b" * 64))
    await store.approval_decided(approval, True, "once", "analyst", None, at + statements + 1)
    if end:
        await store.session_ended(sid, "closed", at + statements + 2, 1, 2, statements)
    return sid


@pytest.fixture
async def populated(tmp_path: Path):
    path = tmp_path / "audit.db"
    store = await SQLiteAuditStore.open(path)
    now = time.time()
    await store.gateway_event("gateway.started", {"listen": "x"}, at=now - 10)
    for n in range(3):
        await add_session(store, now - 9 + n)
    report = await store.verify()
    assert report.ok
    await store.close()
    return path, report


async def verify(path: Path, expect: list[tuple[int, str]] | None = None) -> VerifyReport:
    store = await SQLiteAuditStore.open(path)
    try:
        return await store.verify(expect or [])
    finally:
        await store.close()


def tamper(path: Path, *statements: str, params: tuple[object, ...] = ()) -> None:
    """What someone with write access to the file can do with the sqlite3 shell,
    including dropping the guard triggers first."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("DROP TRIGGER IF EXISTS chain_no_update")
        db.execute("DROP TRIGGER IF EXISTS chain_no_delete")
        db.execute("DROP TRIGGER IF EXISTS chain_in_order")
        for sql in statements:
            db.execute(sql, params if "?" in sql else ())
    finally:
        db.close()


def row(path: Path, seq: int) -> tuple[str, str, str | None, str, str]:
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT kind, at, session_id, payload, prev_hash FROM chain "
                          "WHERE seq = ?", (seq,)).fetchone()
    finally:
        db.close()


def assert_names(report: VerifyReport, seq: int | None, *words: str) -> None:
    assert not report.ok
    first = report.first_problem
    assert first is not None
    assert first.seq == seq, report.to_json()
    for word in words:
        assert word in first.message, first.message


async def test_guard_triggers_refuse_accidental_edits(populated) -> None:
    path, _ = populated
    db = sqlite3.connect(path)
    try:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            db.execute("UPDATE chain SET payload = '{}' WHERE seq = 3")
        with pytest.raises(sqlite3.IntegrityError, match="only by hoopops audit prune"):
            db.execute("DELETE FROM chain WHERE seq = 3")
    finally:
        db.close()


EDITS: dict[str, Callable[[Path], None]] = {
    "payload": lambda p: tamper(p, "UPDATE chain SET payload = replace(payload, 'SELECT 1', "
                                "'SELECT 2') WHERE seq = 8"),
    "timestamp": lambda p: tamper(p, "UPDATE chain SET at = '2020-01-01T00:00:00.000000Z' "
                                  "WHERE seq = 8"),
    "session": lambda p: tamper(p, "UPDATE chain SET session_id = 'other' WHERE seq = 8"),
    "kind": lambda p: tamper(p, "UPDATE chain SET kind = 'gateway.noise' WHERE seq = 8"),
    "prev_hash": lambda p: tamper(p, "UPDATE chain SET prev_hash = hash WHERE seq = 8"),
}


@pytest.mark.parametrize("what", sorted(EDITS))
async def test_editing_a_record_is_named(populated, what: str) -> None:
    path, _ = populated
    EDITS[what](path)
    assert_names(await verify(path), 8, "#8", "changed")


async def test_edit_with_recomputed_hash_is_named(populated) -> None:
    path, _ = populated
    kind, at, sid, payload, prev = row(path, 8)
    forged = payload.replace("SELECT 1", "SELECT 9")
    assert forged != payload
    digest = record_hash_text(8, kind, at, sid, forged, prev)
    tamper(path, "UPDATE chain SET payload = ?, hash = ? WHERE seq = 8",
           params=(forged, digest))
    report = await verify(path)
    assert_names(report, 8, "#8", "changed or replaced", "#9")


async def test_deleting_a_record_is_named(populated) -> None:
    path, _ = populated
    tamper(path, "DELETE FROM chain WHERE seq = 9")
    assert_names(await verify(path), 9, "#9", "missing")


async def test_deleting_and_renumbering_is_named(populated) -> None:
    path, _ = populated
    # Close the gap so no sequence number is missing: the hashes still cover the numbers.
    tamper(path, "DELETE FROM chain WHERE seq = 9",
           "UPDATE chain SET seq = -seq WHERE seq > 9",
           "UPDATE chain SET seq = -seq - 1 WHERE seq < 0",
           "UPDATE chain_head SET seq = seq - 1")
    assert_names(await verify(path), 9, "#9")


async def test_reordering_records_is_named(populated) -> None:
    path, _ = populated
    # Swap records 5 and 6 wholesale, hashes included.
    tamper(path, "UPDATE chain SET seq = -1 WHERE seq = 5",
           "UPDATE chain SET seq = 5 WHERE seq = 6",
           "UPDATE chain SET seq = 6 WHERE seq = -1")
    assert_names(await verify(path), 5, "#5", "changed")


async def test_reordering_contents_is_named(populated) -> None:
    path, _ = populated
    moved = row(path, 15)
    tamper(path, "UPDATE chain SET kind = ?, at = ?, session_id = ?, payload = ? WHERE seq = 12",
           params=moved[:4])
    assert_names(await verify(path), 12, "#12")


async def test_cutting_off_the_tail_is_named(populated) -> None:
    path, before = populated
    last = before.last_seq
    assert last is not None
    tamper(path, f"DELETE FROM chain WHERE seq > {last - 3}")
    assert_names(await verify(path), last - 2, f"#{last - 2}", "missing from the end")


async def test_cut_tail_with_forged_head_is_caught_by_a_kept_head(populated) -> None:
    path, before = populated
    last = before.last_seq
    assert last is not None
    tamper(path, f"DELETE FROM chain WHERE seq > {last - 3}",
           f"UPDATE chain_head SET seq = {last - 3}, hash = (SELECT hash FROM chain "
           f"WHERE seq = {last - 3})")
    # The file alone is now self-consistent (only the query tables still remember) ...
    report = await verify(path)
    assert not report.ok and report.first_problem is not None
    assert report.first_problem.table != "chain"
    # ... and a head kept outside the file names the cut.
    report = await verify(path, [(last, before.head_hash)])
    assert any(p.seq == last and "not in the chain" in p.message for p in report.problems)


async def test_a_kept_head_passes_on_an_intact_chain(populated) -> None:
    path, before = populated
    assert before.last_seq is not None
    assert (await verify(path, [(before.last_seq, before.head_hash)])).ok
    report = await verify(path, [(before.last_seq, "f" * 64)])
    assert_names(report, before.last_seq, "rewritten")


QUERY_TABLE_EDITS = {
    "statement sql": ("UPDATE statements SET sql = 'SELECT 42' WHERE received_seq = 3", 3, "sql"),
    "statement result": ("UPDATE statements SET rows = 999 WHERE received_seq = 3", 5, "rows"),
    "session identity": ("UPDATE sessions SET subject = 'someone-else' "
                         "WHERE started_seq = 2", 2, "subject"),
    "approval decider": ("UPDATE approvals SET decided_by = 'mallory'", 13, "decided_by"),
    "masking deleted": ("DELETE FROM masking_actions WHERE seq = 4", 4, "deleted"),
    "statement deleted": ("DELETE FROM statements WHERE received_seq = 6", 6, "deleted"),
    "event inserted": ("INSERT INTO gateway_events VALUES (1000, 'x', 'gateway.x', '{}')",
                       1000, "not backed"),
}


@pytest.mark.parametrize("what", sorted(QUERY_TABLE_EDITS))
async def test_editing_a_query_table_is_named(populated, what: str) -> None:
    path, _ = populated
    sql, seq, word = QUERY_TABLE_EDITS[what]
    tamper(path, sql)
    report = await verify(path)
    assert_names(report, seq, word)


async def test_verify_notices_dropped_guards(populated) -> None:
    path, _ = populated
    tamper(path)
    report = await verify(path)
    assert report.ok and any("guard trigger" in w for w in report.warnings)


async def test_hash_definition_is_reproducible(populated) -> None:
    """The documented formula, recomputed from the raw rows without the store."""
    path, _ = populated
    db = sqlite3.connect(path)
    try:
        prev = "0" * 64
        for seq, kind, at, sid, payload, prev_hash, digest in db.execute(
                "SELECT seq, kind, at, session_id, payload, prev_hash, hash FROM chain "
                "ORDER BY seq"):
            assert prev_hash == prev
            assert digest == record_hash(seq, kind, at, sid, json.loads(payload), prev_hash)
            prev = digest
    finally:
        db.close()


# --- prune -----------------------------------------------------------------------------


async def test_prune_keeps_the_rest_verifiable(tmp_path: Path) -> None:
    store = await SQLiteAuditStore.open(tmp_path / "audit.db")
    now = time.time()
    old = [await add_session(store, now - 500 * DAY + n) for n in range(3)]
    await store.gateway_event("gateway.stopped", {}, at=now - 450 * DAY)
    recent = [await add_session(store, now - 10 * DAY + n) for n in range(2)]
    total = (await store.verify()).records

    dry = await store.prune(400 * DAY, dry_run=True)
    assert dry.dry_run and dry.sessions == 3 and (await store.verify()).records == total

    report = await store.prune(400 * DAY)
    assert report.sessions == 3 and report.records == dry.records
    assert report.anchor_seq == total + 1
    after = await store.verify()
    assert after.ok, after.to_json()
    assert after.pruned_through == report.through_seq
    assert after.records == total - report.records + 1
    assert [await store.get_session(s) for s in old] == [None, None, None]
    assert None not in [await store.get_session(s) for s in recent]

    # Nothing older is left: a second prune changes nothing and verify still passes.
    assert (await store.prune(400 * DAY)).records == 0
    assert (await store.verify()).ok
    await store.close()


async def test_prune_never_cuts_through_a_session(tmp_path: Path) -> None:
    store = await SQLiteAuditStore.open(tmp_path / "audit.db")
    now = time.time()
    gone = await add_session(store, now - 600 * DAY)
    # Started long ago, still writing recently: it stays whole, and so does what follows.
    straddler = await add_session(store, now - 500 * DAY, end=False)
    await add_session(store, now - 450 * DAY)
    await store.session_ended(straddler, "closed", now - DAY, 0, 0, 3)
    report = await store.prune(400 * DAY)
    assert report.sessions == 1
    assert await store.get_session(gone) is None
    kept = await store.get_session(straddler)
    assert kept is not None and len(await store.session_statements(straddler)) == 3
    assert (await store.verify()).ok
    await store.close()


async def test_prune_everything_then_keep_writing(tmp_path: Path) -> None:
    store = await SQLiteAuditStore.open(tmp_path / "audit.db")
    now = time.time()
    await add_session(store, now - 900 * DAY)
    report = await store.prune(400 * DAY)
    await add_session(store, now)
    after = await store.verify()
    assert after.ok and after.first_seq == report.anchor_seq
    await store.close()


async def test_deleting_after_a_prune_is_named(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    store = await SQLiteAuditStore.open(path)
    now = time.time()
    await add_session(store, now - 500 * DAY)
    await add_session(store, now - DAY)
    report = await store.prune(400 * DAY)
    await store.close()
    assert report.through_seq is not None
    first_kept = report.through_seq + 1
    tamper(path, f"DELETE FROM chain WHERE seq = {first_kept}")
    assert_names(await verify(path), first_kept, f"#{first_kept}", "missing")


async def test_forging_the_prune_anchor_is_named(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    store = await SQLiteAuditStore.open(path)
    now = time.time()
    await add_session(store, now - 500 * DAY)
    await add_session(store, now - DAY)
    report = await store.prune(400 * DAY)
    await store.close()
    anchor = report.anchor_seq
    # Pretend more was pruned than really was, to hide the deletion of the next records.
    tamper(path, "UPDATE chain SET payload = json_set(payload, '$.through_seq', "
           f"json_extract(payload, '$.through_seq') + 2) WHERE seq = {anchor}",
           f"DELETE FROM chain WHERE seq <= {(report.through_seq or 0) + 2}")
    assert not (await verify(path)).ok

"""The audit journal: statements are durable before they are chained, a dead gateway's
journal is recovered exactly once, a live one's is left alone, and a store that cannot
take records refuses new statements without losing the ones it already acknowledged."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from hoopops.audit import SQLiteAuditStore, StatementRecord, StatementResult
from hoopops.audit.journal import journal_dir, read_lines
from hoopops.audit.records import SessionRecord
from hoopops.audit.store import AuditWriteError

ROOT = Path(__file__).resolve().parents[1]

# Records statements and their results, prints each id once statement_received returned
# (from then on the gateway may forward it), then kills itself before the store has had
# a chance to chain them: everything it printed lives only in its journal.
WRITER = textwrap.dedent("""
    import asyncio, os, signal, sys, time
    from hoopops.audit import (SQLiteAuditStore, SessionRecord, StatementRecord,
                               StatementResult)

    async def main(path, sid, count, sync, settle_at):
        store = await SQLiteAuditStore.open(path, synchronous=sync)
        await store.session_started(SessionRecord(sid, "agent", (), None, None, None, None,
                                                  None, None, "prod", False, time.time()))
        for i in range(count):
            if i == settle_at:
                await store.session_statements(sid)  # chains everything so far
            stmt = await store.statement_received(StatementRecord(
                sid, i + 1, time.time(), f"SELECT {i} /* é\\t */", None, {"n": i}, "allow",
                None))
            await store.statement_finished(stmt, StatementResult(
                time.time(), time.time(), 1, "SELECT 1", result_sha256="ab" * 32),
                wait=False)
            print(stmt, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])))
""")


def session(sid: str | None = None) -> SessionRecord:
    return SessionRecord(sid or str(uuid.uuid4()), "agent", ("agents",), None, None, None,
                         None, None, None, "prod", False, time.time())


async def run_writer(tmp_path: Path, path: Path, sid: str, count: int,
                     sync: str = "NORMAL", settle_at: int = -1) -> list[int]:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), str(path), sid, str(count), sync, str(settle_at),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == -signal.SIGKILL, err.decode()
    return [int(line) for line in out.split()]


async def test_a_killed_gateways_journal_is_recovered_on_the_next_open(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    sid = str(uuid.uuid4())
    acknowledged = await run_writer(tmp_path, path, sid, 300, "FULL")
    assert len(acknowledged) == 300
    journal = journal_dir(path)
    assert any(journal.glob("*.log")), "the writer died before leaving a journal"

    store = await SQLiteAuditStore.open(path)
    try:
        views = await store.session_statements(sid)
        assert [v.id for v in views] == acknowledged
        assert all(v.finished and v.result_sha256 == "ab" * 32 for v in views)
        assert views[7].sql == "SELECT 7 /* é\t */" and views[7].facts == {"n": 7}
        report = await store.verify()
        assert report.ok, report.to_json()
    finally:
        await store.close()
    # Recovered once: its files and mark are gone, and opening again adds nothing.
    assert not list(journal.glob("*.log")) and not list(journal.glob("*.lock"))
    db = sqlite3.connect(path)
    try:
        assert db.execute("SELECT COUNT(*) FROM journal_marks").fetchone()[0] == 0
        chained = db.execute("SELECT COUNT(*) FROM chain").fetchone()[0]
    finally:
        db.close()
    store = await SQLiteAuditStore.open(path)
    try:
        assert len(await store.session_statements(sid)) == 300
        assert (await store.verify()).ok
    finally:
        await store.close()
    db = sqlite3.connect(path)
    try:
        assert db.execute("SELECT COUNT(*) FROM chain").fetchone()[0] == chained
    finally:
        db.close()


async def test_a_torn_journal_tail_is_ignored_and_the_rest_recovered(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    sid = str(uuid.uuid4())
    acknowledged = await run_writer(tmp_path, path, sid, 40)
    files = sorted(journal_dir(path).glob("*.log"))
    assert files
    last = files[-1]
    intact = list(read_lines(last))
    # A power loss can leave half a line, or a line whose bytes never reached the disk.
    with last.open("ab") as file:
        file.write(b"0badc0de\tstatement.received\t2026-01-01T00:00:00Z\t\t{\"sql\":")
    assert list(read_lines(last)) == intact
    flipped = bytearray(last.read_bytes())
    cut = intact[-2][1]  # corrupt the last intact line: it and the torn one are dropped
    flipped[cut + 12] ^= 0x01
    last.write_bytes(bytes(flipped))

    store = await SQLiteAuditStore.open(path)
    try:
        views = await store.session_statements(sid)
        ids = [v.id for v in views]
        assert ids == acknowledged[:len(ids)] and len(ids) >= len(acknowledged) - 1
        assert (await store.verify()).ok
    finally:
        await store.close()


async def test_a_live_gateways_journal_is_not_taken_by_another_opener(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    gateway = await SQLiteAuditStore.open(path, synchronous="NORMAL")
    try:
        s = session()
        await gateway.session_started(s)
        ids = [await gateway.statement_received(StatementRecord(
            s.id, i, time.time(), f"SELECT {i}", None, {}, "allow", None)) for i in range(5)]
        assert gateway._pending, "expected records still waiting for the chain"
        # The CLI opens the same store meanwhile: the gateway's run is alive (locked).
        cli = await SQLiteAuditStore.open(path, create=False)
        await cli.close()
        assert list(journal_dir(path).glob("*.log"))
        views = await gateway.session_statements(s.id)
        assert [v.id for v in views] == ids
    finally:
        await gateway.close()
    store = await SQLiteAuditStore.open(path)
    try:
        assert [v.id for v in await store.session_statements(s.id)] == ids  # once each
        assert (await store.verify()).ok
    finally:
        await store.close()


async def test_a_store_that_cannot_write_refuses_statements_and_loses_none(
        tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    store = await SQLiteAuditStore.open(path, synchronous="NORMAL", busy_timeout=0.2)
    s = session()
    await store.session_started(s)
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        acknowledged = [await store.statement_received(StatementRecord(
            s.id, 1, time.time(), "SELECT 1", None, {}, "allow", None))]
        # Another process holds the write lock longer than the store waits for it.
        blocker.execute("BEGIN IMMEDIATE")
        acknowledged.append(await store.statement_received(StatementRecord(
            s.id, 2, time.time(), "SELECT 2", None, {}, "allow", None)))
        # A read waits for the chain, which cannot take records now: it says so.
        with pytest.raises(AuditWriteError):
            await store.session_statements(s.id)
        assert store._ingest_error is not None
        try:
            await store.statement_received(StatementRecord(
                s.id, 3, time.time(), "SELECT 3", None, {}, "allow", None))
        except AuditWriteError as exc:
            assert "was not run" in str(exc)
        else:
            raise AssertionError("a statement was accepted while the store could not write")
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    try:
        views = await store.session_statements(s.id)  # retried once the lock is gone
        assert [v.id for v in views] == acknowledged
        await store.statement_received(StatementRecord(
            s.id, 3, time.time(), "SELECT 3", None, {}, "allow", None))
        assert (await store.verify()).ok
    finally:
        await store.close()


async def test_a_statement_and_its_result_are_chained_as_one_record(tmp_path: Path) -> None:
    """The usual statement is one chain record; a later result (a portal resumed) and a
    result after an approval are records of their own; all of it verifies, and editing
    the row the one record projects is caught."""
    path = tmp_path / "audit.db"
    store = await SQLiteAuditStore.open(path, synchronous="NORMAL")
    try:
        s = session()
        await store.session_started(s)
        quick = await store.statement_received(StatementRecord(
            s.id, 1, time.time(), "SELECT * FROM big", None, {"kinds": ["read"]}, "allow",
            "reads"))
        await store.statement_finished(quick, StatementResult(
            time.time(), time.time(), 100, None, result_sha256="aa" * 32), wait=False)
        await store.statement_finished(quick, StatementResult(
            time.time(), time.time(), 42, "SELECT 142", result_sha256="bb" * 32), wait=False)
        held = await store.statement_received(StatementRecord(
            s.id, 2, time.time(), "DELETE FROM t", None, {"kinds": ["write"]}, "review",
            "writes"))
        await store.gateway_event("policy.reloaded", {"hash": "x"})  # awaited, in between
        await store.statement_finished(held, StatementResult(
            time.time(), time.time(), 3, "DELETE 3", result_sha256="cc" * 32), wait=False)
        views = {v.id: v for v in await store.session_statements(s.id)}
        assert views[quick].rows == 42 and views[quick].command_tag == "SELECT 142"
        assert views[quick].result_sha256 == "bb" * 32 and views[quick].rule_id == "reads"
        assert views[held].rows == 3 and views[held].decision == "review"
        assert (await store.verify()).ok
    finally:
        await store.close()
    db = sqlite3.connect(path)
    try:
        kinds = [r[0] for r in db.execute("SELECT kind FROM chain WHERE session_id = ? "
                                          "ORDER BY seq", (s.id,))]
        received_seq = db.execute("SELECT received_seq FROM statements WHERE id = ?",
                                  (quick,)).fetchone()[0]
    finally:
        db.close()
    assert kinds == ["session.started", "statement", "statement.finished",
                     "statement.received", "statement.finished"], kinds

    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("UPDATE statements SET sql = 'SELECT 1' WHERE id = ?", (quick,))
    finally:
        db.close()
    store = await SQLiteAuditStore.open(path)
    try:
        report = await store.verify()
    finally:
        await store.close()
    assert not report.ok and report.first_problem is not None
    assert report.first_problem.seq == received_seq
    assert "sql" in report.first_problem.message


async def test_recovery_starts_at_the_mark_of_what_was_chained(tmp_path: Path) -> None:
    """A run killed after part of its journal was chained: the rest is recovered, and
    nothing twice."""
    path = tmp_path / "audit.db"
    sid = str(uuid.uuid4())
    acknowledged = await run_writer(tmp_path, path, sid, 120, "FULL", settle_at=70)
    db = sqlite3.connect(path)
    try:
        [(chained,)] = db.execute("SELECT COUNT(*) FROM statements").fetchall()
        [(marks,)] = db.execute("SELECT COUNT(*) FROM journal_marks").fetchall()
    finally:
        db.close()
    assert chained >= 70 and marks == 1  # part of it chained, with its mark, before the kill
    store = await SQLiteAuditStore.open(path)
    try:
        views = await store.session_statements(sid)
        assert [v.id for v in views] == acknowledged
        assert all(v.finished for v in views)
        assert (await store.verify()).ok
    finally:
        await store.close()
    db = sqlite3.connect(path)
    try:
        kinds = [r[0] for r in db.execute("SELECT kind FROM chain WHERE session_id = ?",
                                          (sid,))]
    finally:
        db.close()
    assert kinds.count("statement") + kinds.count("statement.received") == 120
    assert kinds.count("statement") + kinds.count("statement.finished") == 120


async def test_statement_ids_come_in_reserved_blocks(tmp_path: Path, monkeypatch) -> None:
    import hoopops.audit.sqlite as sqlite_store

    monkeypatch.setattr(sqlite_store, "_ID_BLOCK", 8)
    path = tmp_path / "audit.db"
    store = await SQLiteAuditStore.open(path, synchronous="NORMAL")
    s = session()
    try:
        await store.session_started(s)
        ids = []
        for i in range(50):  # six blocks and then some, refilled as they run low
            ids.append(await store.statement_received(StatementRecord(
                s.id, i, time.time(), f"SELECT {i}", None, {}, "allow", None)))
        assert len(set(ids)) == 50 and ids == sorted(ids)
        assert (await store.verify()).ok
    finally:
        await store.close()
    store = await SQLiteAuditStore.open(path, synchronous="NORMAL")
    try:
        later = await store.statement_received(StatementRecord(
            s.id, 51, time.time(), "SELECT 51", None, {}, "allow", None))
        assert later > max(ids)  # a new run never hands out an id again
    finally:
        await store.close()


async def test_chained_journal_files_are_deleted(tmp_path: Path) -> None:
    """Files wholly chained go: at once under NORMAL, after a checkpoint under FULL (not
    before: until then the journal is what survives a power loss)."""
    from hoopops.audit.journal import Journal

    for sync in ("NORMAL", "FULL"):
        path = tmp_path / f"audit-{sync}.db"
        store = await SQLiteAuditStore.open(path, synchronous=sync)
        store._journal = Journal(journal_dir(path), sync=sync == "FULL", rotate_bytes=2048)
        try:
            s = session()
            await store.session_started(s)
            for i in range(40):
                await store.statement_received(StatementRecord(
                    s.id, i, time.time(), f"SELECT {i}", None, {}, "allow", None))
            assert len(list(journal_dir(path).glob("*.log"))) > 3
            await store.session_statements(s.id)  # chained now
            if sync == "NORMAL":
                assert len(list(journal_dir(path).glob("*.log"))) == 1  # the one in use
            else:
                assert len(list(journal_dir(path).glob("*.log"))) > 3
                for _ in range(50):  # the checkpoint runs every half second
                    if len(list(journal_dir(path).glob("*.log"))) == 1:
                        break
                    await asyncio.sleep(0.1)
                assert len(list(journal_dir(path).glob("*.log"))) == 1
        finally:
            await store.close()
        assert not list(journal_dir(path).glob("*"))  # a clean stop leaves nothing

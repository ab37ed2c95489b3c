"""An insider with the SQLite file against ``hoopops audit verify`` (issue 4's evidence).

The trail is written by a real gateway session (psql and asyncpg, simple and extended
protocol); each test then edits a copy of the file with the sqlite3 module, as someone
with write access to it would, and runs the real CLI (``python -m hoopops audit verify``)
to check its exit code and the record it names. What a file cannot prove on its own (a
rewritten tail with every hash recomputed) is caught by a head kept elsewhere
(``--expect``), which is what the docs tell the auditor to do.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import resource
import shutil
import sqlite3
import subprocess
import sys
import uuid
import zlib
from pathlib import Path

import asyncpg
import pytest

from hoopops.audit import SQLiteAuditStore
from hoopops.audit.chain import GENESIS, canonical_json, record_hash_text
from hoopops.audit.journal import journal_dir
from hoopops.audit.schema import CHAIN_COLUMNS, PROJECTIONS, schema_statements
from tests.clients.offline import store_config
from tests.clients.util import psql_args, run
from tests.conftest import RunningGateway, psql_path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = store_config()
_PRISTINE: dict[str, Path] = {}


async def _record_a_session(gateway_factory: object, pg: object, folder: Path) -> Path:
    """A real gateway trail: psql (simple protocol, an error, a multi-statement string)
    and asyncpg (extended protocol with parameters), copied once both sessions ended."""
    gw: RunningGateway = await gateway_factory(audit=True)  # type: ignore[operator]
    done = await run(psql_args(psql_path(pg), gw.port, "-c", "SELECT 42 AS answer",  # type: ignore[arg-type]
                               "-c", "SELECT no_such_column", "-c",
                               "CREATE TEMP TABLE t (x int); INSERT INTO t VALUES (1), (2)"),
                     env=gw.env())
    assert "42" in done.stdout, done
    conn = await asyncpg.connect(gw.dsn())
    try:
        assert await conn.fetchval("SELECT $1::int + $2::int", 40, 2) == 42
        assert await conn.fetchval("SELECT $1::text", "secret-ish") == "secret-ish"
    finally:
        await conn.close()
    store = gw.gateway.store  # type: ignore[attr-defined]
    assert (await store.verify()).ok
    copy = folder / "pristine.db"
    live = sqlite3.connect(gw.config.audit.path)
    target = sqlite3.connect(copy)
    try:
        live.backup(target)
    finally:
        target.close()
        live.close()
    return copy


@pytest.fixture
async def trail(gateway_factory: object, pg: object, tmp_path: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh copy of the recorded trail, with a hoopops.yaml that finds it."""
    if "db" not in _PRISTINE:
        _PRISTINE["db"] = await _record_a_session(gateway_factory, pg,
                                                  tmp_path_factory.mktemp("tamper-pristine"))
    folder = tmp_path / "trail"
    folder.mkdir()
    shutil.copy(_PRISTINE["db"], folder / "audit.db")
    (folder / "hoopops.yaml").write_text(CONFIG)
    return folder


def cli(folder: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """``hoopops audit ARGV --config`` as a separate process, as an auditor runs it."""
    done = subprocess.run([sys.executable, "-m", "hoopops", "audit", *argv, "--config",
                           str(folder / "hoopops.yaml")], cwd=folder, text=True,
                          capture_output=True, timeout=120)
    assert "Traceback" not in done.stderr, done.stderr
    return done


def verify(folder: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return cli(folder, "verify", *extra)


def verify_json(folder: Path, *extra: str) -> dict[str, object]:
    done = verify(folder, "--json", *extra)
    report = json.loads(done.stdout)
    assert done.returncode == (0 if report["ok"] else 1)
    return report


def named(report: dict[str, object]) -> int | None:
    first = report["first_problem"]
    assert isinstance(first, dict), report
    return first["record"]


def edit(folder: Path, *statements: str, params: tuple[object, ...] = ()) -> None:
    """The insider's sqlite3 session: guard triggers dropped first, then the edits."""
    db = sqlite3.connect(folder / "audit.db", isolation_level=None)
    try:
        for trigger in ("chain_no_update", "chain_no_delete", "chain_in_order"):
            db.execute(f"DROP TRIGGER IF EXISTS {trigger}")
        for sql in statements:
            db.execute(sql, params if "?" in sql else ())
    finally:
        db.close()


def rows(folder: Path) -> list[tuple[int, str, str, str | None, str, str, str]]:
    db = sqlite3.connect(folder / "audit.db")
    try:
        return db.execute("SELECT seq, kind, at, session_id, payload, prev_hash, hash "
                          "FROM chain ORDER BY seq").fetchall()
    finally:
        db.close()


def seq_of(folder: Path, text: str) -> int:
    """The first record whose payload contains ``text``."""
    return next(r[0] for r in rows(folder) if text in r[4])


def rechain(folder: Path, records: list[tuple[str, str, str | None, str]], start: int) -> None:
    """Rewrite the chain from ``start`` on with these (kind, at, session, payload), every
    hash recomputed and the head moved: the careful forger."""
    db = sqlite3.connect(folder / "audit.db", isolation_level=None)
    try:
        for trigger in ("chain_no_update", "chain_no_delete", "chain_in_order",
                        "chain_head_follows"):
            db.execute(f"DROP TRIGGER IF EXISTS {trigger}")
        db.execute("BEGIN")
        prev = GENESIS if start == 1 else db.execute(
            "SELECT hash FROM chain WHERE seq = ?", (start - 1,)).fetchone()[0]
        db.execute("DELETE FROM chain WHERE seq >= ?", (start,))
        seq = start - 1
        for kind, at, session, payload in records:
            seq += 1
            digest = record_hash_text(seq, kind, at, session, payload, prev)
            db.execute("INSERT INTO chain VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (seq, kind, at, session, payload, prev, digest))
            prev = digest
        db.execute("UPDATE chain_head SET seq = ?, hash = ? WHERE id = 1", (seq, prev))
        db.execute("COMMIT")
    finally:
        db.close()


def reproject(folder: Path) -> None:
    """Rebuild the query tables from the (edited) chain, exactly as verify does: what a
    forger who read the docs does after rewriting records."""
    db = sqlite3.connect(folder / "audit.db", isolation_level=None)
    try:
        db.execute("ATTACH DATABASE '' AS rebuilt")
        for statement in schema_statements("rebuilt", guards=False):
            db.execute(statement)
        columns = ", ".join(CHAIN_COLUMNS)
        db.execute(f"INSERT INTO rebuilt.chain ({columns}) SELECT {columns} FROM main.chain "
                   "ORDER BY seq")
        db.execute("BEGIN")
        for projection in PROJECTIONS:
            table = projection.table
            names = ", ".join(r[1] for r in db.execute(f"PRAGMA rebuilt.table_info({table})"))
            db.execute(f"DELETE FROM main.{table}")
            db.execute(f"INSERT INTO main.{table} ({names}) SELECT {names} "
                       f"FROM rebuilt.{table}")
        db.execute("COMMIT")
    finally:
        db.close()


def head(folder: Path) -> str:
    done = verify(folder)
    assert done.returncode == 0, done
    line = next(x for x in done.stdout.splitlines() if x.startswith("head "))
    return line.split()[1]


# -- what a single file proves -------------------------------------------------------------


async def test_an_untouched_trail_verifies_and_tells_the_auditor_to_keep_the_head(
        trail: Path) -> None:
    done = verify(trail)
    assert done.returncode == 0, done
    assert "audit trail OK" in done.stdout
    assert "keep the head somewhere else" in done.stdout
    assert "--expect" in done.stdout
    kinds = {r[1] for r in rows(trail)}
    assert {"session.started", "session.ended"} <= kinds
    assert any(k.startswith("statement") for k in kinds)


@pytest.mark.parametrize("column", ["payload", "at", "session_id", "kind"])
async def test_one_field_changed_names_the_record(trail: Path, column: str) -> None:
    target = seq_of(trail, "SELECT 42")
    value = {"payload": None, "at": "'2020-01-01T00:00:00.000000Z'",
             "session_id": "'someone-else'", "kind": "'gateway.noise'"}[column]
    if column == "payload":
        edit(trail, "UPDATE chain SET payload = replace(payload, 'SELECT 42', 'SELECT 43') "
             f"WHERE seq = {target}")
    else:
        edit(trail, f"UPDATE chain SET {column} = {value} WHERE seq = {target}")
    done = verify(trail)
    assert done.returncode == 1
    assert f"BROKEN at record #{target}" in done.stdout, done.stdout
    assert "changed" in done.stdout


@pytest.mark.parametrize("change", [
    "UPDATE statements SET sql = 'SELECT 1' WHERE sql LIKE '%SELECT 42%'",
    "UPDATE statements SET params = '[\"1\",\"1\"]' WHERE params IS NOT NULL",
    "UPDATE statements SET sqlstate = NULL WHERE sqlstate IS NOT NULL",
    "DELETE FROM statements WHERE sql LIKE '%no_such_column%'",
    "UPDATE sessions SET subject = 'nobody'",
    "DELETE FROM sessions",
    "INSERT INTO gateway_events (seq, at, kind, data) VALUES (999999, 'x', 'gateway.x', '{}')",
])
async def test_a_query_table_edited_alone_is_caught(trail: Path, change: str) -> None:
    edit(trail, change)
    report = verify_json(trail)
    assert report["ok"] is False
    assert report["first_problem"]["table"] != "chain", report  # type: ignore[index]


async def test_deleting_a_record_in_the_middle_names_it(trail: Path) -> None:
    middle = len(rows(trail)) // 2
    edit(trail, f"DELETE FROM chain WHERE seq = {middle}")
    report = verify_json(trail)
    assert named(report) == middle
    assert "missing" in report["first_problem"]["message"]  # type: ignore[index]


async def test_deleting_the_first_record_names_it(trail: Path) -> None:
    edit(trail, "DELETE FROM chain WHERE seq = 1")
    assert named(verify_json(trail)) == 1


async def test_cutting_the_tail_and_moving_the_head_needs_the_kept_head(trail: Path) -> None:
    kept = head(trail)
    last = int(kept.split(":")[0])
    edit(trail, f"DELETE FROM chain WHERE seq > {last - 3}",
         "UPDATE chain_head SET seq = (SELECT MAX(seq) FROM chain), "
         "hash = (SELECT hash FROM chain ORDER BY seq DESC LIMIT 1)")
    reproject(trail)
    # The file alone is consistent again: this is the documented limit ...
    assert verify(trail).returncode == 0
    # ... and the head kept elsewhere is the documented answer.
    report = verify_json(trail, "--expect", kept)
    assert named(report) == last
    assert "not in the chain" in report["first_problem"]["message"]  # type: ignore[index]


async def test_cutting_the_tail_alone_is_named(trail: Path) -> None:
    last = len(rows(trail))
    edit(trail, f"DELETE FROM chain WHERE seq > {last - 2}")
    assert named(verify_json(trail)) == last - 1


async def test_reordering_two_records_names_the_first(trail: Path) -> None:
    a, b = 3, 5
    edit(trail, f"UPDATE chain SET seq = -1 WHERE seq = {a}",
         f"UPDATE chain SET seq = {a} WHERE seq = {b}",
         f"UPDATE chain SET seq = {b} WHERE seq = -1")
    assert named(verify_json(trail)) == a


async def test_swapping_records_and_recomputing_every_hash_needs_the_kept_head(
        trail: Path) -> None:
    kept = head(trail)
    chain = rows(trail)
    records = [(r[1], r[2], r[3], r[4]) for r in chain[2:]]
    records[0], records[1] = records[1], records[0]
    rechain(trail, records, start=3)
    reproject(trail)
    # Every link recomputed: the file is self-consistent (what no file can refuse) ...
    assert verify(trail).returncode == 0
    # ... but not with the head the auditor kept.
    report = verify_json(trail, "--expect", kept)
    assert named(report) == int(kept.split(":")[0])
    assert "rewritten" in report["first_problem"]["message"]  # type: ignore[index]
    # A head kept before the swap point still verifies: the damage is after it.
    early = f"2:{chain[1][6]}"
    assert verify(trail, "--expect", early).returncode == 0


async def test_a_forged_record_inserted_in_the_middle_is_named(trail: Path) -> None:
    chain = rows(trail)
    at = chain[4]
    forged = canonical_json({"sql": "SELECT 'never ran'"})
    edit(trail, "UPDATE chain SET seq = seq + 1000000 WHERE seq > 4",
         "UPDATE chain SET seq = seq - 1000000 + 1 WHERE seq > 1000000")
    edit(trail, "INSERT INTO chain VALUES (?, ?, ?, ?, ?, ?, ?)",
         params=(5, "gateway.note", at[2], None, forged, chain[3][6],
                 record_hash_text(5, "gateway.note", at[2], None, forged, chain[3][6])))
    assert named(verify_json(trail)) == 6  # the genuine record that no longer links


async def test_dropped_guards_are_reported_even_before_any_edit(trail: Path) -> None:
    edit(trail)
    done = verify(trail)
    assert "guard trigger(s) dropped" in done.stderr
    edit(trail, "UPDATE chain SET payload = replace(payload, '42', '24') WHERE seq = "
         f"{seq_of(trail, 'SELECT 42')}")
    assert verify(trail).returncode == 1


async def test_vacuum_and_a_rewritten_file_still_verify(trail: Path) -> None:
    kept = head(trail)
    db = sqlite3.connect(trail / "audit.db", isolation_level=None)
    try:
        db.execute("VACUUM")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()
    assert verify(trail, "--expect", kept).returncode == 0
    # The same contents dumped and reloaded into a new file are the same evidence.
    source = sqlite3.connect(trail / "audit.db")
    dump = list(source.iterdump())
    version = source.execute("PRAGMA user_version").fetchone()[0]
    source.close()
    (trail / "audit.db").unlink()
    fresh = sqlite3.connect(trail / "audit.db", isolation_level=None)
    try:
        fresh.executescript("\n".join(dump))
        fresh.execute(f"PRAGMA user_version = {version}")
    finally:
        fresh.close()
    assert verify(trail, "--expect", kept).returncode == 0


async def test_a_deleted_wal_loses_only_what_the_kept_head_reveals(trail: Path) -> None:
    """Records committed to the WAL but not yet checkpointed vanish with it, together with
    the head that named them: consistent again, so only a kept head tells."""
    kept = head(trail)
    db = sqlite3.connect(trail / "audit.db", isolation_level=None)
    db.execute("PRAGMA wal_autocheckpoint = 0")
    seq, prev = db.execute("SELECT seq, hash FROM chain_head").fetchone()
    payload = canonical_json({"note": "after the kept head"})
    at = "2030-01-01T00:00:00.000000Z"
    db.execute("INSERT INTO chain VALUES (?, ?, ?, ?, ?, ?, ?)",
               (seq + 1, "gateway.note", at, None, payload, prev,
                record_hash_text(seq + 1, "gateway.note", at, None, payload, prev)))
    db.execute("INSERT INTO gateway_events VALUES (?, ?, ?, ?)",
               (seq + 1, at, "gateway.note", payload))
    later = f"{seq + 1}:{db.execute('SELECT hash FROM chain_head').fetchone()[0]}"
    wal = trail / "audit.db-wal"
    shutil.copy(trail / "audit.db", trail / "main-only.db")  # the file without its WAL
    db.close()
    shutil.copy(trail / "main-only.db", trail / "audit.db")
    for leftover in (wal, trail / "audit.db-shm"):
        leftover.unlink(missing_ok=True)
    assert verify(trail, "--expect", kept).returncode == 0
    report = verify_json(trail, "--expect", later)
    assert named(report) == seq + 1


# -- files that are not (intact) stores ----------------------------------------------------


async def test_a_file_that_is_not_sqlite_is_a_clear_error(trail: Path) -> None:
    (trail / "audit.db").write_bytes(b"not a database at all\n" * 500)
    done = verify(trail)
    assert done.returncode == 1
    assert "cannot open the audit store" in done.stderr and "not a database" in done.stderr


async def test_another_sqlite_file_is_refused_not_turned_into_a_store(trail: Path) -> None:
    (trail / "audit.db").unlink()
    db = sqlite3.connect(trail / "audit.db")
    db.execute("CREATE TABLE invoices (id int)")
    db.commit()
    db.close()
    done = verify(trail)
    assert done.returncode == 1
    assert "is not a hoopops audit store" in done.stderr and "invoices" in done.stderr
    db = sqlite3.connect(trail / "audit.db")
    try:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
    finally:
        db.close()
    assert tables == {"invoices"}


async def test_a_store_wiped_back_to_schema_zero_is_refused(trail: Path) -> None:
    db = sqlite3.connect(trail / "audit.db", isolation_level=None)
    for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                              "AND name NOT LIKE 'sqlite_%'").fetchall():
        db.execute(f"DROP TABLE {name}")
    db.execute("PRAGMA user_version = 0")
    db.close()
    done = verify(trail)
    assert done.returncode == 1
    assert "is not a hoopops audit store" in done.stderr


async def test_a_damaged_page_is_a_broken_trail_not_a_traceback(tmp_path: Path) -> None:
    folder = tmp_path / "big"
    folder.mkdir()
    (folder / "hoopops.yaml").write_text(CONFIG)
    await asyncio.to_thread(bulk_store, folder / "audit.db", 3000, 600)
    size = (folder / "audit.db").stat().st_size
    with (folder / "audit.db").open("r+b") as file:
        file.seek((size // 4096 // 2) * 4096)
        file.write(b"\x0d" + b"\xff" * 4095)
    done = verify(folder)
    assert done.returncode == 1
    assert "damaged" in done.stdout + done.stderr, done


# -- the journal window --------------------------------------------------------------------


def journal_line(kind: str, at: str, session: str | None, payload: str) -> bytes:
    """A line exactly as the gateway writes it: its CRC is a checksum, not a seal."""
    body = f"{kind}\t{at}\t{session or ''}\t{payload}".encode()
    return b"%08x\t%b\n" % (zlib.crc32(body), body)


async def test_a_stopped_gateways_journal_accepts_only_what_a_gateway_writes(
        trail: Path) -> None:
    session = rows(trail)[0][3] or str(uuid.uuid4())
    directory = journal_dir(trail / "audit.db")
    directory.mkdir()
    at = "2030-01-01T00:00:00.000000Z"
    lines = [
        journal_line("audit.pruned", at, None, canonical_json(
            {"through_seq": 3, "through_hash": "0" * 64})),
        journal_line("approval.decided", at, session, canonical_json(
            {"approval_id": 1, "status": "approved"})),
        journal_line("statement.received", at, session, "not json"),
        journal_line("statement.finished", "yesterday", session, "{}"),
        journal_line("masking.applied", at, None, "{}"),
    ]
    (directory / "00000000000000000001-1.000001.log").write_bytes(b"".join(lines))
    before = len(rows(trail))
    done = verify(trail)
    assert done.returncode == 0, done
    chain = rows(trail)
    kinds = [r[1] for r in chain[before:]]
    assert kinds == ["audit.recovered"], kinds
    note = json.loads(chain[-1][4])
    assert note["records"] == 0 and note["refused_count"] == len(lines)
    assert [r["kind"] for r in note["refused"]] == [
        "audit.pruned", "approval.decided", "statement.received", "statement.finished",
        "masking.applied"]


async def test_a_forged_but_well_formed_journal_line_is_chained_and_marked_recovered(
        trail: Path) -> None:
    """The documented window: between a gateway's death and the next start, its journal
    is as trustworthy as the directory's permissions. A well-formed forged line is chained,
    and the ``audit.recovered`` record after it says which records came that way."""
    session = next(r[3] for r in rows(trail) if r[1] == "session.started")
    directory = journal_dir(trail / "audit.db")
    directory.mkdir()
    at = "2030-01-01T00:00:00.000000Z"
    forged = canonical_json({"statement_id": 999999, "actions": []})
    (directory / "00000000000000000001-1.000001.log").write_bytes(
        journal_line("masking.applied", at, session, forged))
    before = len(rows(trail))
    assert verify(trail).returncode == 0
    chain = rows(trail)
    assert [r[1] for r in chain[before:]] == ["masking.applied", "audit.recovered"]
    note = json.loads(chain[-1][4])
    assert (note["first_seq"], note["last_seq"], note["records"]) == (before + 1, before + 1, 1)


# -- retention and export ------------------------------------------------------------------


def prune_all(folder: Path) -> None:
    done = cli(folder, "prune", "--older-than", "0s")
    assert done.returncode == 0 and "pruned" in done.stdout, done


async def test_prune_then_a_forged_anchor_is_named(trail: Path) -> None:
    prune_all(trail)
    assert verify(trail).returncode == 0
    anchor = next(r for r in rows(trail) if r[1] == "audit.pruned")
    edit(trail, "UPDATE chain SET payload = replace(payload, '\"through_hash\":\"', "
         f"'\"through_hash\":\"0') WHERE seq = {anchor[0]}")
    report = verify_json(trail)
    assert report["ok"] is False


async def test_a_prune_after_the_kept_head_is_pointed_out(trail: Path) -> None:
    kept = head(trail)
    prune_all(trail)
    done = verify(trail, "--expect", kept)
    # The kept record itself was pruned: the anchor vouches for its hash exactly.
    assert done.returncode == 0, done
    chain = rows(trail)
    anchor = json.loads(next(r for r in chain if r[1] == "audit.pruned")[4])
    assert anchor["through_seq"] == int(kept.split(":")[0])
    forged = f"{kept.split(':')[0]}:{'f' * 64}"
    report = verify_json(trail, "--expect", forged)
    assert "rewritten before the prune" in report["first_problem"]["message"]  # type: ignore[index]
    earlier = f"2:{'e' * 64}"
    done = verify(trail, "--expect", earlier)
    assert done.returncode == 0
    assert "was pruned by record" in done.stderr and "retention run" in done.stderr


async def test_a_records_export_verifies_without_the_database(trail: Path) -> None:
    kept = head(trail)
    out = trail / "records.jsonl"
    done = cli(trail, "export", "--records", "--output", str(out))
    assert done.returncode == 0, done
    (trail / "audit.db").unlink()  # the auditor has only the export and the kept head
    assert check_export(out.read_text().splitlines(), kept) is None
    lines = out.read_text().splitlines()
    tampered = json.loads(lines[2])
    tampered["payload"]["tampered"] = True
    lines[2] = json.dumps(tampered)
    assert check_export(lines, kept) == 3
    # Record #2 removed: #3 no longer follows on.
    assert check_export(lines[:1] + lines[2:], kept) == 3
    assert check_export(out.read_text().splitlines()[:-1], kept) == int(kept.split(":")[0])


def check_export(lines: list[str], kept: str) -> int | None:
    """docs/audit.md's check of a records export: the first record that fails, or None."""
    want_seq, want_hash = kept.split(":")
    prev = None
    last = None
    for line in lines:
        r = json.loads(line)
        body = json.dumps({"seq": r["seq"], "kind": r["kind"], "at": r["at"],
                           "session": r["session_id"], "payload": r["payload"],
                           "prev": r["prev_hash"]},
                          sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        if hashlib.sha256(body.encode()).hexdigest() != r["hash"]:
            return int(r["seq"])
        if prev is not None and (r["prev_hash"] != prev[1] or r["seq"] != prev[0] + 1):
            return int(r["seq"])
        prev = last = (r["seq"], r["hash"])
    if last is None or last != (int(want_seq), want_hash):
        return int(want_seq)
    return None


# -- scale ---------------------------------------------------------------------------------


def bulk_store(path: Path, records: int, size: int) -> None:
    """A valid store of ``records`` gateway events of ``size`` bytes, written directly."""
    async def create() -> None:
        store = await SQLiteAuditStore.open(path)
        await store.close()
    asyncio.run(create())
    db = sqlite3.connect(path, isolation_level=None)
    try:
        seq, prev = db.execute("SELECT seq, hash FROM chain_head").fetchone()
        at = "2030-01-01T00:00:00.000000Z"
        db.execute("BEGIN")
        for n in range(records):
            seq += 1
            payload = canonical_json({"n": n, "filler": "x" * size})
            digest = record_hash_text(seq, "gateway.bulk", at, None, payload, prev)
            db.execute("INSERT INTO chain VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (seq, "gateway.bulk", at, None, payload, prev, digest))
            db.execute("INSERT INTO gateway_events VALUES (?, ?, ?, ?)",
                       (seq, at, "gateway.bulk", payload))
            prev = digest
        db.execute("COMMIT")
    finally:
        db.close()


def verify_peak_kib(folder: Path) -> int:
    """Peak RSS of one ``audit verify`` process (a child of a fresh measuring process)."""
    probe = ("import resource, subprocess, sys\n"
             "done = subprocess.run([sys.executable, '-m', 'hoopops', 'audit', 'verify', "
             f"'--config', {str(folder / 'hoopops.yaml')!r}], capture_output=True)\n"
             "assert done.returncode == 0, done\n"
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")
    done = subprocess.run([sys.executable, "-c", probe], text=True, capture_output=True,
                          timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip())


async def test_verify_memory_does_not_grow_with_the_store(tmp_path: Path) -> None:
    peaks = {}
    for records in (2000, 30000):
        folder = tmp_path / str(records)
        folder.mkdir()
        (folder / "hoopops.yaml").write_text(CONFIG)
        await asyncio.to_thread(bulk_store, folder / "audit.db", records, 1000)
        peaks[records] = await asyncio.to_thread(verify_peak_kib, folder)
    # 15x the records (about 30 MB more) must not cost more than a few MB of memory.
    assert peaks[30000] - peaks[2000] < 8 * 1024, peaks
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > 0

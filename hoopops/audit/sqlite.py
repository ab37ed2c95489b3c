"""The SQLite audit store (WAL): a hash chain, its query tables, and the journal in front.

Durability before forwarding is the whole point, and it must not serialise the gateway.
The records every statement writes (received, finished, masking) are made durable by the
journal (``journal.py``): one ``write(2)`` on the event loop, plus, under
``synchronous=FULL``, an fdatasync shared by every session waiting at that moment. The
statement's id comes from a block of ids reserved in the store beforehand, so nothing on
the statement's path waits for SQLite. Those records are then chained in batches: one
writer task drains a list and appends *everything* waiting to the chain in one
``BEGIN IMMEDIATE`` transaction, at least every ``_INGEST_EVERY`` seconds, sooner when a
thousand wait. The same transaction records how far the journal is chained, so a gateway
that dies loses nothing: the next open chains the rest of its journal.

Rare records (sessions, approvals, events) are not journaled: their callers await the
transaction that chains them, which the writer starts at once, taking every journaled
record queued before them along, so the chain keeps the order things happened in. A read
through this store first waits for everything queued before it to be chained, so the
process that wrote a record always reads it back; another process (the CLI) sees
journaled records once they are chained, a fraction of a second later.

The statement records are serialised once, by splicing pre-encoded parts in canonical
key order, and the same values fill their query-table row (see ``schema.py``). The write
connection is a plain ``sqlite3`` connection owned by one dedicated thread, and a whole
batch (begin, read the head, insert, commit) is a single hand-off to it. Reads, verify,
export and checkpoints use aiosqlite connections of their own: WAL readers never block the
writer, and a long verify or export never stalls the console's reads.

``synchronous=FULL`` is the default: the journal is flushed before a statement is
forwarded and SQLite fsyncs its log at every commit, so a recorded statement survives not
only SIGKILL of the process (which NORMAL also survives: the journal and the log are in
the OS page cache) but also a kernel panic or power loss, which NORMAL does not.
``benchmarks/bench_audit.py`` measures both settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TextIO

import aiosqlite

from hoopops.audit import export as export_format
from hoopops.audit.chain import (
    PRUNE_KIND,
    ChainChecker,
    ChainRow,
    Problem,
    VerifyReport,
    canonical_json,
    json_string,
    json_text,
    record_hash_text,
)
from hoopops.audit.journal import (
    Journal,
    JournalError,
    JournalLine,
    OrphanRun,
    encode,
    journal_dir,
    orphaned_runs,
    read_lines,
    refusal,
)
from hoopops.audit.records import (
    ApprovalRequest,
    ApprovalView,
    Filters,
    MaskingAction,
    MaskingView,
    SessionRecord,
    SessionView,
    StatementRecord,
    StatementResult,
    StatementView,
    cap_sample,
    from_iso,
    iso,
    json_params,
    opt_from_iso,
    opt_iso,
)
from hoopops.audit.schema import (
    CHAIN_COLUMNS,
    GUARD_TRIGGERS,
    INBOX,
    MIGRATIONS,
    PROJECTIONS,
    REPLAY,
    SCHEMA_VERSION,
    STATEMENT_COMPLETE,
    STATEMENT_FINISH,
    STATEMENT_INSERT,
    Projection,
    added_column,
    inbox_statements,
    replay_statements,
    schema_statements,
)
from hoopops.audit.store import (
    ApprovalNotFound,
    ApprovalNotPending,
    AuditError,
    AuditStore,
    AuditStoreMissing,
    AuditWriteError,
    PruneReport,
)

log = logging.getLogger(__name__)

_RESERVED_PREFIXES = ("session.", "statement.", "approval.", "masking.", "audit.")
_INSERT_CHAIN = f"INSERT INTO chain ({', '.join(CHAIN_COLUMNS)}) VALUES (?, ?, ?, ?, ?, ?, ?)"
_INSERT_INBOX = (f"INSERT INTO temp.{INBOX} (seq, kind, at, session_id, payload) "
                 "VALUES (?, ?, ?, ?, ?)")
_INSERT_REPLAY = (f"INSERT INTO temp.{REPLAY} (seq, kind, at, session_id, payload) "
                  "VALUES (?, ?, ?, ?, ?)")
_SET_MARK = "INSERT OR REPLACE INTO journal_marks (run, file_no, offset) VALUES (?, ?, ?)"
_SYNC_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")
# Bounded so one transaction (and the memory it holds) stays small under a flood.
_MAX_BATCH = 2000
# Chained after the records recovered from a dead gateway's journal (see _recover_run).
RECOVERY_KIND = "audit.recovered"
# Refused journal lines listed in that record; the count covers the rest.
_MAX_REFUSALS_KEPT = 50
# Journaled records (made durable by the journal, awaited by nobody) are chained in
# batches at least this often, or as soon as this many wait, or at once when anyone
# awaits a record or reads the store.
_INGEST_EVERY = 0.1
_INGEST_AT = 1000
# Statement ids are reserved from the store this many at a time; a new block is fetched
# in the background when fewer than half are left.
_ID_BLOCK = 8192
# What one record can fail with on its own (the others of its batch are then written
# one by one); anything else (I/O, locks) fails the whole batch.
_RECORD_ERRORS = (sqlite3.IntegrityError, UnicodeError)
# After a failed batch, journaled records are retried this often (and new statements are
# refused meanwhile: they could not be chained).
_RETRY_EVERY = 1.0
_CHECKPOINT_EVERY = 0.5
_WAL_BACKSTOP_PAGES = 8000


class _Rejected(Exception):
    """A guard refused one record; only that record's caller gets ``error``."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


Guard = Callable[[sqlite3.Connection], str | None]


@dataclass(eq=False, slots=True)
class _Item:
    kind: str
    at: str
    session_id: str | None
    payload_text: str
    # None when nobody awaits the record (``wait=False``): the writer logs its failure.
    future: asyncio.Future[int] | None
    # Checked inside the transaction, after everything queued before it: returns the
    # session id the record belongs to, or raises _Rejected. Runs on the writer thread.
    guard: Guard | None = None
    # A statement record's row for the statements table, which the writer fills itself
    # (schema version 2): the STATEMENT_INSERT values after the id, or the
    # STATEMENT_FINISH values after finished_seq.
    insert: tuple[Any, ...] | None = None
    finish: tuple[Any, ...] | None = None
    # Where a journaled record's line ends in this run's journal: (file, offset past it).
    mark: tuple[int, int] | None = None
    # Not a record: resolved once everything queued before it is committed.
    barrier: bool = False
    # A statement.received record's payload splits here for a ``result`` member (before
    # ``"rule_id"``, in canonical key order): see _pair_results.
    split: int = 0
    # Paired in one batch: the received record carries its first result (``partner``),
    # and that result is not chained on its own (``merged``).
    partner: _Item | None = None
    merged: bool = False


@dataclass
class WriterStats:
    records: int = 0
    batches: int = 0
    largest_batch: int = 0
    failed_batches: int = 0

    def to_json(self) -> dict[str, int]:
        return asdict(self)


Outcome = tuple[_Item, int | Exception]


class SQLiteAuditStore(AuditStore):
    """See the module docstring. Create with ``await SQLiteAuditStore.open(path)``."""

    def __init__(self, path: Path, *, result_rows: int, result_bytes: int,
                 synchronous: str, busy_timeout: float) -> None:
        self.path = path
        self.result_rows = result_rows
        self.result_bytes = result_bytes
        self.synchronous = synchronous
        self.busy_timeout = busy_timeout
        # False for readers (the CLI): they must never turn some other file into a store.
        self.create = True
        self.stats = WriterStats()
        # The write connection lives on one dedicated thread and is touched nowhere else;
        # the executor's own queue serialises batches, prune and migrations.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-writer")
        self._wdb: sqlite3.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        # Records waiting for the next batch, and the writer's wake-up when it is idle:
        # handing over a record is a list append, not an asyncio.Queue round trip.
        self._pending: list[_Item] = []
        self._wake: asyncio.Future[None] | None = None
        self._stopping = False
        self._writer: asyncio.Task[None] | None = None
        self._checkpointer: asyncio.Task[None] | None = None
        self._checkpoint_db: aiosqlite.Connection | None = None
        self._read_lock = asyncio.Lock()
        self._closed = False
        # statement id -> session id for statements received here and not yet finished,
        # so the hot path never has to read back a row it just wrote.
        self._open_statements: dict[int, str] = {}
        # Created at the first journaled record, so reading the store writes no journal.
        self._journal: Journal | None = None
        self._urgent = 0  # awaited records and barriers waiting in _pending
        self._committing = False  # a batch is on the writer thread
        # The writer connection's synchronous setting now (see _durably) and the journal
        # position of the newest committed record.
        self._sync_now = synchronous
        self._chained: tuple[int, int] | None = None
        self._ingest_error: Exception | None = None
        # The reserved statement ids not yet handed out: [next, end).
        self._ids_next = self._ids_end = 0
        self._ids_refill: asyncio.Future[None] | None = None
        self._ids_spare: tuple[int, int] | None = None

    # --- opening and closing -------------------------------------------------------------

    @classmethod
    async def open(cls, path: str | Path, *, create: bool = True, result_rows: int = 100,
                   result_bytes: int = 64 * 1024, synchronous: str = "FULL",
                   busy_timeout: float = 5.0) -> SQLiteAuditStore:
        path = Path(path)
        synchronous = synchronous.upper()
        if synchronous not in _SYNC_MODES:
            raise ValueError(f"synchronous must be one of {', '.join(_SYNC_MODES)}")
        if not create and not await asyncio.to_thread(path.exists):
            raise AuditStoreMissing(f"no audit store at {path} (has the gateway run with this "
                                    "configuration? check audit.path in hoopops.yaml)")
        store = cls(path, result_rows=result_rows, result_bytes=result_bytes,
                    synchronous=synchronous, busy_timeout=busy_timeout)
        store.create = create
        try:
            await store._on_writer(store._open_writer)
            store._reader = await store._connect()
            store._reader.row_factory = sqlite3.Row
            await store._reader.execute("PRAGMA query_only = 1")
            store._checkpoint_db = await store._connect()
        except (sqlite3.Error, OSError) as exc:
            await store._shutdown()
            raise AuditError(f"cannot open the audit store {path}: {exc}") from exc
        except BaseException:
            await store._shutdown()
            raise
        store._writer = asyncio.create_task(store._write_loop(), name="audit-writer")
        store._checkpointer = asyncio.create_task(store._checkpoint_loop(),
                                                  name="audit-checkpoint")
        return store

    async def _on_writer(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` on the writer thread: one hop per batch, whatever the batch holds."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _connect(self) -> aiosqlite.Connection:
        db = await aiosqlite.connect(self.path, isolation_level=None, iter_chunk_size=1024)
        await db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
        return db

    def _open_writer(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None,
                             timeout=self.busy_timeout)
        self._wdb = db
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version == 0 and not self.create:
            tables = [r[0] for r in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name LIMIT 6")]
            held = f"it holds tables {', '.join(tables)}" if tables else "it is empty"
            raise AuditError(f"{self.path} is not a hoopops audit store (no schema version; "
                             f"{held}); check audit.path, or whether the file was replaced")
        if version == 0:
            # Only possible before the first table exists; lets prune hand pages back.
            db.execute("PRAGMA auto_vacuum = INCREMENTAL")
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise AuditError(f"the audit store {self.path} cannot use WAL mode (got {mode}); "
                             "put it on a local file system")
        db.execute(f"PRAGMA synchronous = {self.synchronous}")
        self._sync_now = self.synchronous
        # Checkpoints (copying the log into the database, with an fsync of the database
        # under FULL) run on their own connection, so no batch waits for one; this is
        # only the backstop should that fall behind (pages of 4 KiB: about 32 MiB).
        db.execute(f"PRAGMA wal_autocheckpoint = {_WAL_BACKSTOP_PAGES}")
        self._migrate(db)
        for statement in (*inbox_statements(), *replay_statements()):
            db.execute(statement)
        self._recover(db)

    def _migrate(self, db: sqlite3.Connection) -> None:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise AuditError(f"the audit store {self.path} has schema version {version}, newer "
                             f"than this hoopops understands ({SCHEMA_VERSION}); upgrade hoopops")
        if version == SCHEMA_VERSION:
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            # Another process may have migrated while we waited for the lock.
            version = db.execute("PRAGMA user_version").fetchone()[0]
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[step]("main"):
                    adds = added_column(statement)
                    if adds is not None and adds[2] in {r[1] for r in db.execute(
                            f"PRAGMA {adds[0]}.table_info({adds[1]})")}:
                        continue
                    db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _recover(self, db: sqlite3.Connection) -> None:
        """Chain what the journals of dead gateway runs hold beyond their marks."""
        for orphan in orphaned_runs(journal_dir(self.path)):
            try:
                recovered = self._recover_run(db, orphan)
                # Ids the dead run reserved but whose reservation a power loss undid must
                # not be handed out again.
                db.execute("UPDATE statement_ids SET next = max(next, (SELECT "
                           "COALESCE(MAX(id), 0) + 1 FROM statements)) WHERE id = 1")
            except BaseException:
                orphan.abandon()
                self._rollback()
                raise
            db.execute("DELETE FROM journal_marks WHERE run = ?", (orphan.run,))
            orphan.release()
            if recovered:
                log.warning("audit: recovered %d record(s) from the journal of a gateway that "
                            "stopped before storing them (run %s)", recovered, orphan.run)

    def _recover_run(self, db: sqlite3.Connection, orphan: OrphanRun) -> int:
        row = db.execute("SELECT file_no, offset FROM journal_marks WHERE run = ?",
                         (orphan.run,)).fetchone()
        done = (0, 0) if row is None else (int(row[0]), int(row[1]))
        recovered = 0
        first_seq = self._head(db)[0] + 1
        refused: list[dict[str, Any]] = []
        refused_count = 0
        last: tuple[int, int] | None = None

        def refuse(file_no: int, end: int, line: JournalLine, reason: str) -> None:
            nonlocal refused_count
            refused_count += 1
            log.error("audit: journal record of run %s refused (%s): %s %s", orphan.run,
                      reason, line.kind, line.at)
            if len(refused) < _MAX_REFUSALS_KEPT:
                refused.append({"file": file_no, "line_ends_at": end, "kind": line.kind,
                                "reason": reason})

        for file_no, path in orphan.files:
            if file_no < done[0]:
                continue
            start = done[1] if file_no == done[0] else 0
            lines = []
            for line, end in read_lines(path, start):
                reason = refusal(line)
                if reason is None:
                    lines.append((line, end))
                else:
                    refuse(file_no, end, line, reason)
                last = (file_no, end)
            for chunk in range(0, len(lines), _MAX_BATCH):
                part = lines[chunk:chunk + _MAX_BATCH]
                try:
                    recovered += self._replay(db, orphan.run, file_no, part)
                except sqlite3.IntegrityError:
                    # One record the store refuses must not cost the others.
                    self._rollback()
                    for one in part:
                        try:
                            recovered += self._replay(db, orphan.run, file_no, [one])
                        except sqlite3.IntegrityError as exc:
                            self._rollback()
                            refuse(file_no, one[1], one[0], f"the store refused it: {exc}")
        if last is not None and (recovered or refused_count):
            # Chained after them: these records were not chained by the process that wrote
            # them, and until now rested only on the journal file (whose CRC is no seal).
            note = {"run": orphan.run, "records": recovered,
                    "first_seq": first_seq if recovered else None,
                    "last_seq": first_seq + recovered - 1 if recovered else None,
                    "refused": refused, "refused_count": refused_count}
            self._replay(db, orphan.run, last[0], [(JournalLine(
                RECOVERY_KIND, iso(time.time()), None, canonical_json(note)), last[1])])
        return recovered

    def _replay(self, db: sqlite3.Connection, run: str, file_no: int,
                lines: list[tuple[JournalLine, int]]) -> int:
        db.execute("BEGIN IMMEDIATE")
        seq, prev = self._head(db)
        rows = []
        for line, _ in lines:
            seq += 1
            digest = record_hash_text(seq, line.kind, line.at, line.session_id, line.payload,
                                      prev)
            rows.append((seq, line.kind, line.at, line.session_id, line.payload, prev, digest))
            prev = digest
        db.executemany(_INSERT_CHAIN, rows)
        db.executemany(_INSERT_REPLAY, [r[:5] for r in rows])
        db.execute(f"DELETE FROM temp.{REPLAY}")
        db.execute(_SET_MARK, (run, file_no, lines[-1][1]))
        db.execute("COMMIT")
        return len(lines)

    @staticmethod
    def _head(db: sqlite3.Connection) -> tuple[int, str]:
        head = db.execute("SELECT seq, hash FROM chain_head WHERE id = 1").fetchone()
        if head is None:
            raise AuditWriteError("the audit store has no chain head; run hoopops audit "
                                  "verify")
        return int(head[0]), str(head[1])

    @staticmethod
    async def _scalar(db: aiosqlite.Connection, sql: str, params: Sequence[Any] = ()) -> Any:
        async with db.execute(sql, params) as cursor:
            row = await cursor.fetchone()
        return None if row is None else row[0]

    async def _checkpoint_loop(self) -> None:
        written = self.stats.records
        while not self._closed:
            await asyncio.sleep(_CHECKPOINT_EVERY)
            db = self._checkpoint_db
            if db is None or self.stats.records == written:
                continue
            written = self.stats.records
            chained = self._chained
            try:
                # PASSIVE never blocks the writer or readers; what it cannot copy now it
                # copies next time.
                async with db.execute("PRAGMA wal_checkpoint(PASSIVE)") as cursor:
                    row = await cursor.fetchone()
            except sqlite3.Error as exc:
                log.debug("audit checkpoint skipped: %s", exc)
                continue
            journal = self._journal
            if row is not None and row[0] == 0 and row[1] == row[2] and \
                    chained is not None and journal is not None and journal.sync:
                # A whole checkpoint syncs the log and then the database: what was
                # chained before it began is on disk, so its journal files can go.
                journal.ingested(chained)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._checkpointer is not None:
            self._checkpointer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checkpointer
        if self._writer is not None:
            # Everything queued before close is still written, then the writer stops.
            self._stopping = True
            self._wake_writer()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        if self._ids_refill is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self._ids_refill
        journal = self._journal
        if journal is not None:
            # Everything chained: the run leaves neither files nor a mark behind. Otherwise
            # its files stay for the next start to recover.
            clean = not self._pending and self._ingest_error is None
            if clean:
                with contextlib.suppress(sqlite3.Error, RuntimeError):
                    await self._on_writer(self._forget_run, journal.run)
            journal.close(all_ingested=clean)
        await self._shutdown()

    def _forget_run(self, run: str) -> None:
        # Committed durably, so everything before it is on disk: the run's journal files,
        # deleted next, are no longer needed.
        if self._wdb is not None:
            self._durably(self._wdb, True)
            self._wdb.execute("DELETE FROM journal_marks WHERE run = ?", (run,))

    async def _shutdown(self) -> None:
        for db in (self._reader, self._checkpoint_db):
            if db is not None:
                with contextlib.suppress(sqlite3.Error, ValueError):
                    await db.close()
        self._reader = self._checkpoint_db = None
        with contextlib.suppress(sqlite3.Error, RuntimeError):
            await self._on_writer(self._close_writer)
        self._executor.shutdown(wait=False)

    def _close_writer(self) -> None:
        if self._wdb is not None:
            self._wdb.close()
            self._wdb = None

    # --- the writer ----------------------------------------------------------------------

    def _journaled(self, item: _Item) -> tuple[int, int]:
        """Make ``item`` durable through the journal and queue it for the chain; nobody
        waits for the chain. Returns where its line ends, for ``Journal.synced``."""
        if self._closed:
            raise AuditWriteError("the audit store is closed")
        if self._ingest_error is not None:
            raise AuditWriteError(
                f"the audit store cannot store records ({self._ingest_error}); the statement "
                f"was not run. Check that {self.path} is writable and its disk has space")
        journal = self._journal
        try:
            if journal is None:
                journal = self._journal = Journal(journal_dir(self.path),
                                                  sync=self.synchronous in ("FULL", "EXTRA"))
            mark = journal.append(encode(item.kind, item.at, item.session_id,
                                         item.payload_text))
        except (JournalError, OSError, UnicodeError) as exc:
            raise AuditWriteError(f"audit write failed ({exc}); the statement was not run")\
                from exc
        item.mark = mark
        pending = self._pending
        pending.append(item)
        if len(pending) == 1 or len(pending) >= _INGEST_AT:
            self._wake_writer()
        return mark

    def _put(self, item: _Item) -> _Item:
        if self._closed:
            raise AuditWriteError("the audit store is closed")
        self._pending.append(item)
        self._urgent += 1
        self._wake_writer()
        return item

    def _wake_writer(self) -> None:
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    def _awaitable(self, item: _Item) -> asyncio.Future[int]:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        # If the caller was cancelled meanwhile, a failure is still seen and logged.
        future.add_done_callback(_consume)
        item.future = future
        self._put(item)
        return future

    async def _append(self, kind: str, at: str, session_id: str | None, payload: Any,
                      guard: Guard | None = None) -> int:
        # A caller cancelled while waiting cancels only its own future: the record stays
        # in its batch and is written anyway (the writer skips futures already done).
        return await self._awaitable(_Item(kind, at, session_id, _text_of(payload, kind),
                                           None, guard))

    async def _settle(self) -> None:
        """Return once everything queued so far is chained, so a read sees it."""
        if (self._pending or self._committing) and not self._closed:
            await self._awaitable(_Item("", "", None, "", None, barrier=True))

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            pending = self._pending
            if not pending:
                if self._stopping:
                    break
                self._wake = loop.create_future()
                await self._wake
                self._wake = None
                continue
            if not (self._urgent or self._stopping or len(pending) >= _INGEST_AT):
                # Only journaled records wait: give others a moment to join them, so that
                # one transaction takes many. Whatever wakes us, the batch goes next.
                self._wake = loop.create_future()
                timer = loop.call_later(_INGEST_EVERY, self._wake_writer)
                await self._wake
                self._wake = None
                timer.cancel()
            batch = pending[:_MAX_BATCH]
            del pending[:_MAX_BATCH]
            self._urgent -= sum(1 for item in batch if item.future is not None)
            self._committing = True
            try:
                outcomes = await self._on_writer(self._commit, batch)
            except Exception as exc:
                # Whatever it was (I/O error, full disk, a lock held too long), nothing of
                # this batch is durable in the store, so nobody may proceed as if it were.
                log.error("audit write failed: %s", exc)
                self.stats.failed_batches += 1
                error = AuditWriteError(
                    f"audit write failed ({exc}); the statement was not run. Check that "
                    f"{self.path} is writable and its disk has space")
                _fail(batch, error)
                # Journaled records are safe in the journal: keep them for the next try,
                # and refuse new statements until the store takes records again.
                kept = [item for item in batch if item.mark is not None]
                if kept:
                    self._ingest_error = exc
                    self._pending[:0] = kept
                    if self._stopping:
                        break  # they stay in the journal, for the next start to recover
                    await asyncio.sleep(_RETRY_EVERY)
                continue
            finally:
                self._committing = False
            self._ingest_error = None
            written = sum(1 for i, o in outcomes if not i.barrier and not isinstance(o, Exception))
            self.stats.records += written
            self.stats.batches += 1
            self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
            mark = None
            for pending_item, outcome in outcomes:
                future = pending_item.future
                if pending_item.mark is not None:
                    mark = pending_item.mark
                if future is None:
                    if isinstance(outcome, Exception):
                        log.error("audit write failed: %s", outcome)
                elif future.done():
                    continue
                elif isinstance(outcome, Exception):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)
            if mark is not None and self._journal is not None:
                self._chained = mark
                if not self._journal.sync:
                    # Nothing is flushed in this mode, so the journal is no safer than the
                    # store's own log: its chained files can go now.
                    self._journal.ingested(mark)

    def _commit(self, batch: list[_Item]) -> list[Outcome]:
        """On the writer thread: the whole batch in one transaction, or each record alone
        if one of them is refused (one bad record must not sink the others, which may be
        other sessions' starts or approvals): a constraint it breaks, or text it carries
        that cannot be encoded (a lone surrogate in event data, say)."""
        try:
            return self._transact(batch)
        except _RECORD_ERRORS as exc:
            self._rollback()
            if len(batch) == 1:
                return [(batch[0], AuditWriteError(f"audit write refused: {exc}"))]
        except BaseException:
            self._rollback()
            raise
        outcomes: list[Outcome] = []
        for item in batch:
            try:
                outcomes += self._transact([item])
            except _RECORD_ERRORS as single:
                self._rollback()
                outcomes.append((item, AuditWriteError(f"audit write refused: {single}")))
            except BaseException:
                self._rollback()
                raise
        return outcomes

    def _rollback(self) -> None:
        if self._wdb is not None and self._wdb.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._wdb.execute("ROLLBACK")

    def _durably(self, db: sqlite3.Connection, needed: bool) -> None:
        """Under ``synchronous=FULL``, fsync at commit only when the commit itself must
        be durable: journaled records already are (the journal was flushed before their
        statements ran), and their journal files are kept until a checkpoint has put them
        on disk in the store (``_checkpoint_loop``). Awaited records (sessions, approvals,
        reservations) are in no journal, so their commits still flush."""
        want = self.synchronous if needed or self.synchronous not in ("FULL", "EXTRA") \
            else "NORMAL"
        if want != self._sync_now:
            db.execute(f"PRAGMA synchronous = {want}")
            self._sync_now = want

    def _transact(self, batch: list[_Item]) -> list[Outcome]:
        db = self._wdb
        if db is None:
            raise AuditWriteError("the audit store is closed")
        self._durably(db, any(item.mark is None and not item.barrier for item in batch))
        db.execute("BEGIN IMMEDIATE")
        # Read the head under the write lock: another process (the CLI deciding an
        # approval) may have appended since our last batch.
        seq, prev = self._head(db)
        mark: tuple[int, int] | None = None
        _pair_results(batch)
        rows: list[tuple[Any, ...]] = []
        inserts: list[tuple[Any, ...]] = []
        completes: list[tuple[Any, ...]] = []
        finishes: list[tuple[Any, ...]] = []
        inbox: list[tuple[Any, ...]] = []
        used_inbox = False

        # Chain rows first (their guard triggers check the order), then what they
        # project, in record order: statement inserts before the updates that may finish
        # them; only one of statement rows and inbox is pending at a time.
        in_order = ((_INSERT_CHAIN, rows), (STATEMENT_INSERT, inserts),
                    (STATEMENT_COMPLETE, completes), (STATEMENT_FINISH, finishes),
                    (_INSERT_INBOX, inbox))

        def flush() -> None:
            for sql, values in in_order:
                if values:
                    db.executemany(sql, values)
                    values.clear()

        outcomes: list[Outcome] = []
        for item in batch:
            if item.barrier:
                outcomes.append((item, 0))
                continue
            if item.mark is not None:
                mark = item.mark
            if item.merged:
                outcomes.append((item, seq))  # chained with its statement, just before
                continue
            session_id = item.session_id
            if item.guard is not None:
                # The guard must see the records queued before its own.
                flush()
                try:
                    session_id = item.guard(db)
                except _Rejected as rejected:
                    outcomes.append((item, rejected.error))
                    continue
            statement = item.insert is not None or item.finish is not None
            if (inbox if statement else inserts or finishes):
                # An approval naming a statement must find the statement rows queued
                # before it (and so on): project in record order.
                flush()
            seq += 1
            kind, text = item.kind, item.payload_text
            result = item.partner
            if result is not None:
                kind = "statement"
                text = f'{text[:item.split]},"result":{result.payload_text}{text[item.split:]}'
            digest = record_hash_text(seq, kind, item.at, session_id, text, prev)
            rows.append((seq, kind, item.at, session_id, text, prev, digest))
            if result is not None:
                assert item.insert is not None and result.finish is not None
                completes.append((*item.insert, seq, *result.finish[:-1], seq))
            elif item.insert is not None:
                inserts.append((*item.insert, seq))
            elif item.finish is not None:
                finishes.append((seq, *item.finish))
            else:
                inbox.append((seq, item.kind, item.at, session_id, item.payload_text))
                used_inbox = True
            prev = digest
            outcomes.append((item, seq))
        flush()
        if used_inbox:
            db.execute(f"DELETE FROM temp.{INBOX}")
        if mark is not None and self._journal is not None:
            db.execute(_SET_MARK, (self._journal.run, *mark))
        db.execute("COMMIT")
        return outcomes

    # --- writes --------------------------------------------------------------------------

    async def session_started(self, session: SessionRecord) -> int:
        payload = {"id": session.id, "subject": session.subject,
                   "groups": list(session.groups), "issuer": session.issuer,
                   "token_id": session.token_id, "claimed_user": session.claimed_user,
                   "client_addr": session.client_addr, "client_port": session.client_port,
                   "application_name": session.application_name, "target": session.target,
                   "tls": bool(session.tls), "started_at": iso(session.started_at)}
        return await self._append("session.started", payload["started_at"], session.id,
                                  payload)

    async def session_ended(self, session_id: str, reason: str, ended_at: float,
                            bytes_in: int | None, bytes_out: int | None,
                            statements: int | None) -> int:
        payload = {"session_id": session_id, "reason": reason, "ended_at": iso(ended_at),
                   "bytes_in": bytes_in, "bytes_out": bytes_out, "statements": statements}
        seq = await self._append("session.ended", payload["ended_at"], session_id, payload)
        # Statements of this session that never got a result (client vanished mid-query)
        # are not going to: stop remembering them.
        for statement_id in [k for k, v in self._open_statements.items() if v == session_id]:
            del self._open_statements[statement_id]
        return seq

    async def statement_received(self, statement: StatementRecord, *,
                                 flushed: bool = True) -> int:
        kind = "statement.received"
        received_at = iso(statement.received_at)
        facts = statement.facts
        facts_text = facts if isinstance(facts, str) else _text_of(facts, kind)
        params_text = None if statement.params is None else _text_of(
            json_params(statement.params), kind)
        session_id, sql, decision = statement.session_id, statement.sql, statement.decision
        seq, rule_id, approval_id = statement.seq, statement.rule_id, statement.approval_id
        statement_id = self._next_id()
        while statement_id is None:
            await self._ids_reserved()
            statement_id = self._next_id()
        # canonical_json of the payload, spliced from its parts in sorted key order: the
        # parts are what the statements row holds too, so nothing is serialised twice.
        head = (f'{{"approval_id":{_scalar_text(approval_id, kind)},"decision":'
                f'{_scalar_text(decision, kind)},"facts":{facts_text},"id":{statement_id},'
                f'"params":{params_text or "null"},"received_at":{json_string(received_at)}')
        text = (f'{head},"rule_id":{_scalar_text(rule_id, kind)},"seq":'
                f'{_scalar_text(seq, kind)},"session_id":{_scalar_text(session_id, kind)},'
                f'"sql":{_scalar_text(sql, kind)}}}')
        mark = self._journaled(_Item(
            kind, received_at, session_id, text, None,
            insert=(statement_id, session_id, seq, received_at, sql, params_text, facts_text,
                    decision, rule_id, approval_id), split=len(head)))
        self._open_statements[statement_id] = session_id
        if flushed:
            await self._synced(mark)
        return statement_id

    @property
    def journal_flushes(self) -> int:
        """How many times this run's journal was flushed to disk (``synchronous=FULL``)."""
        return self._journal.syncs if self._journal is not None else 0

    async def records_flushed(self) -> None:
        journal = self._journal
        if journal is not None:
            await self._synced(journal.end)

    async def _synced(self, mark: tuple[int, int]) -> None:
        journal = self._journal
        if journal is not None and journal.sync:
            try:
                await journal.synced(mark)
            except JournalError as exc:
                raise AuditWriteError(f"audit write failed ({exc}); the statement was not "
                                      "run") from exc

    def _next_id(self) -> int | None:
        """A reserved statement id, or None when the reserve is empty."""
        next_id = self._ids_next
        if next_id >= self._ids_end:
            spare = self._ids_spare
            if spare is None:
                return None
            (next_id, self._ids_end), self._ids_spare = spare, None
        self._ids_next = next_id + 1
        if self._ids_spare is None and self._ids_refill is None and \
                self._ids_end - next_id < _ID_BLOCK // 2:
            self._ids_refill = asyncio.ensure_future(self._refill_ids())
        return next_id

    async def _ids_reserved(self) -> None:
        if self._ids_refill is None:
            self._ids_refill = asyncio.ensure_future(self._refill_ids())
        try:
            await asyncio.shield(self._ids_refill)
        except (sqlite3.Error, OSError) as exc:
            raise AuditWriteError(f"audit write failed (cannot reserve statement ids: {exc}); "
                                  "the statement was not run") from exc

    async def _refill_ids(self) -> None:
        try:
            self._ids_spare = await self._on_writer(self._take_ids, _ID_BLOCK)
        finally:
            self._ids_refill = None

    def _take_ids(self, count: int) -> tuple[int, int]:
        db = self._wdb
        if db is None:
            raise AuditWriteError("the audit store is closed")
        self._durably(db, True)
        db.execute("BEGIN IMMEDIATE")
        try:
            start = int(db.execute("SELECT next FROM statement_ids WHERE id = 1").fetchone()[0])
            db.execute("UPDATE statement_ids SET next = ? WHERE id = 1", (start + count,))
            db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        return start, start + count

    async def statement_finished(self, statement_id: int, result: StatementResult, *,
                                 wait: bool = True) -> int | None:
        session_id = self._open_statements.pop(statement_id, None)
        if session_id is None:
            session_id = await self._statement_session(statement_id)
        kind = "statement.finished"
        duration = None
        if result.started_at is not None:
            duration = max(0, round((result.finished_at - result.started_at) * 1_000_000))
        started_at, finished_at = opt_iso(result.started_at), iso(result.finished_at)
        sample = cap_sample(result.result_sample, self.result_rows, self.result_bytes)
        sample_text = None if sample is None else _text_of(sample, kind)
        rows, tag, sqlstate = result.rows, result.command_tag, result.sqlstate
        error, sha = result.error_message, result.result_sha256
        # Spliced in sorted key order, as for statement_received.
        text = (f'{{"command_tag":{_scalar_text(tag, kind)},"duration_us":'
                f'{_scalar_text(duration, kind)},"error_message":{_scalar_text(error, kind)},'
                f'"finished_at":{json_string(finished_at)},"result_sample":{sample_text or "null"},'
                f'"result_sha256":{_scalar_text(sha, kind)},"rows":{_scalar_text(rows, kind)},'
                f'"sqlstate":{_scalar_text(sqlstate, kind)},"started_at":{json_string(started_at)},'
                f'"statement_id":{_scalar_text(statement_id, kind)}}}')
        item = _Item(kind, finished_at, session_id, text, None,
                     finish=(started_at, finished_at, duration, rows, tag, sqlstate, error,
                             sha, sample_text, statement_id))
        if not wait:
            self._journaled(item)
            return None
        return await self._awaitable(item)

    async def _statement_session(self, statement_id: int) -> str:
        await self._settle()
        async with self._read_lock:
            session_id = await self._scalar(self._reader_db(),
                                            "SELECT session_id FROM statements WHERE id = ?",
                                            (statement_id,))
        if session_id is None:
            raise AuditWriteError(f"no statement #{statement_id} in the audit store")
        return str(session_id)

    async def masking_actions(self, statement_id: int, session_id: str,
                              actions: Sequence[MaskingAction],
                              at: float | None = None, *, wait: bool = True) -> int | None:
        if not actions:
            return None
        when = iso(time.time() if at is None else at)
        payload = {"statement_id": statement_id, "actions": [
            {"column": a.column_or_detector, "strategy": a.strategy, "count": int(a.count)}
            for a in actions]}
        if not wait:
            self._journaled(_Item("masking.applied", when, session_id,
                                  _text_of(payload, "masking.applied"), None))
            return None
        return await self._append("masking.applied", when, session_id, payload)

    async def gateway_event(self, kind: str, data: dict[str, Any],
                            at: float | None = None) -> int:
        if kind.startswith(_RESERVED_PREFIXES) or "." not in kind:
            raise ValueError(f"gateway event kind {kind!r} must be dotted (gateway.started, "
                             "policy.reloaded) and not one of the audit's own record kinds")
        return await self._append(kind, iso(time.time() if at is None else at), None, data)

    async def approval_requested(self, request: ApprovalRequest) -> int:
        payload = {"session_id": request.session_id, "statement_id": request.statement_id,
                   "subject": request.subject, "groups": list(request.groups),
                   "issuer": request.issuer, "token_id": request.token_id, "sql": request.sql,
                   "params": json_params(request.params), "fingerprint": request.fingerprint,
                   "rule_id": request.rule_id, "reason": request.reason,
                   "created_at": iso(request.created_at), "expires_at": iso(request.expires_at),
                   "binding_sha256": request.binding_sha256}
        return await self._append("approval.requested", payload["created_at"],
                                  request.session_id, payload)

    def _pending_guard(self, approval_id: int) -> Guard:
        def guard(db: sqlite3.Connection) -> str | None:
            row = db.execute("SELECT session_id, status, decided_by FROM approvals "
                             "WHERE id = ?", (approval_id,)).fetchone()
            if row is None:
                raise _Rejected(ApprovalNotFound(f"no approval #{approval_id}"))
            if row[1] != "pending":
                by = f" by {row[2]}" if row[2] else ""
                raise _Rejected(ApprovalNotPending(
                    f"approval #{approval_id} is no longer pending: it was {row[1]}{by}"))
            return str(row[0])
        return guard

    async def approval_decided(self, approval_id: int, approved: bool, scope: str | None,
                               decided_by: str, comment: str | None,
                               decided_at: float) -> ApprovalView:
        if approved and scope not in ("once", "session"):
            raise ValueError("an approval's scope is 'once' or 'session'")
        payload = {"approval_id": approval_id, "status": "approved" if approved else "denied",
                   "scope": scope if approved else None, "decided_by": decided_by,
                   "decided_at": iso(decided_at), "comment": comment}
        try:
            await self._append("approval.decided", payload["decided_at"], None, payload,
                               self._pending_guard(approval_id))
        except ApprovalNotPending as exc:
            raise ApprovalNotPending(str(exc), await self.get_approval(approval_id)) from None
        return await self._must_get_approval(approval_id)

    async def approval_closed(self, approval_id: int, status: str, at: float,
                              reason: str | None) -> ApprovalView:
        if status not in ("withdrawn", "expired"):
            raise ValueError("an approval is closed as 'withdrawn' or 'expired'")
        payload = {"approval_id": approval_id, "status": status, "scope": None,
                   "decided_by": None, "decided_at": iso(at), "comment": reason}
        with contextlib.suppress(ApprovalNotPending):
            await self._append(f"approval.{status}", payload["decided_at"], None, payload,
                               self._pending_guard(approval_id))
        return await self._must_get_approval(approval_id)

    async def _must_get_approval(self, approval_id: int) -> ApprovalView:
        view = await self.get_approval(approval_id)
        if view is None:
            raise ApprovalNotFound(f"no approval #{approval_id}")
        return view

    async def close_orphaned_sessions(self, reason: str, at: float | None = None) -> int:
        when = time.time() if at is None else at
        await self._settle()
        async with self._read_lock:
            db = self._reader_db()
            async with db.execute("SELECT id FROM approvals WHERE status = 'pending'") as cur:
                approvals = [int(r[0]) for r in await cur.fetchall()]
            async with db.execute(
                    "SELECT s.id, (SELECT COUNT(*) FROM statements t WHERE t.session_id = s.id) "
                    "FROM sessions s WHERE s.ended_seq IS NULL") as cur:
                sessions = [(str(r[0]), int(r[1])) for r in await cur.fetchall()]
        for approval_id in approvals:
            await self.approval_closed(approval_id, "withdrawn", when, reason)
        for session_id, count in sessions:
            await self.session_ended(session_id, reason, when, None, None, count)
        return len(sessions)

    # --- prune ---------------------------------------------------------------------------

    async def prune(self, older_than: float, *, now: float | None = None,
                    dry_run: bool = False) -> PruneReport:
        """Remove whole sessions and events older than ``older_than`` seconds.

        Only a prefix of the chain is removed, and never through the middle of a session
        (a session still writing keeps its start). The removal is itself a chained record,
        ``audit.pruned``, naming the last removed record and its hash, which is where the
        surviving chain now begins; verify checks that link.
        """
        when = time.time() if now is None else now
        if self._closed:
            raise AuditWriteError("the audit store is closed")
        # On the writer thread, so it is ordered with the batches like any other write.
        await self._settle()
        report: PruneReport = await self._on_writer(self._prune, when, older_than, dry_run)
        if report.anchor_seq is not None:
            self.stats.records += 1
        return report

    def _prune(self, when: float, older_than: float, dry_run: bool) -> PruneReport:
        db = self._wdb
        if db is None:
            raise AuditWriteError("the audit store is closed")
        cutoff = iso(when - older_than)
        self._durably(db, True)
        db.execute("BEGIN IMMEDIATE")
        try:
            report = self._prune_locked(db, cutoff, when, older_than, dry_run)
        except BaseException:
            self._rollback()
            raise
        if report.anchor_seq is not None:
            with contextlib.suppress(sqlite3.Error):
                db.execute("PRAGMA incremental_vacuum")
        return report

    def _prune_locked(self, db: sqlite3.Connection, cutoff: str, when: float,
                      older_than: float, dry_run: bool) -> PruneReport:
        def scalar(sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> Any:
            row = db.execute(sql, params).fetchone()
            return None if row is None else row[0]

        head_seq, head_hash = db.execute("SELECT seq, hash FROM chain_head WHERE id = 1"
                                         ).fetchone()
        first_kept = scalar("SELECT seq FROM chain WHERE at >= ? ORDER BY seq LIMIT 1",
                            (cutoff,))
        through = int(head_seq) if first_kept is None else int(first_kept) - 1
        while True:
            # Pull the cut back to the start of any session that straddles it: one that
            # started by the cut and had not ended by then (its end is its last record:
            # the gateway completes and closes everything of a session before ending it).
            straddler = scalar("""
                SELECT MIN(started_seq) FROM sessions
                WHERE started_seq <= :k AND (ended_seq IS NULL OR ended_seq > :k)
            """, {"k": through})
            if straddler is None:
                break
            through = int(straddler) - 1
        lowest = scalar("SELECT MIN(seq) FROM chain")
        if lowest is None or through < int(lowest):
            db.execute("ROLLBACK")
            return PruneReport(cutoff, dry_run, 0, 0, None, None, None)
        records = int(scalar("SELECT COUNT(*) FROM chain WHERE seq <= ?", (through,)))
        sessions = int(scalar("SELECT COUNT(*) FROM chain WHERE seq <= ? "
                              "AND kind = 'session.started'", (through,)))
        through_hash = str(scalar("SELECT hash FROM chain WHERE seq = ?", (through,)))
        if dry_run:
            db.execute("ROLLBACK")
            return PruneReport(cutoff, True, records, sessions, through, through_hash, None)
        db.execute("UPDATE chain_head SET pruning = 1 WHERE id = 1")
        db.execute("DELETE FROM chain WHERE seq <= ?", (through,))
        for table, column in (("sessions", "started_seq"), ("statements", "received_seq"),
                              ("approvals", "id"), ("masking_actions", "seq"),
                              ("gateway_events", "seq")):
            db.execute(f"DELETE FROM {table} WHERE {column} <= ?", (through,))
        db.execute("UPDATE chain_head SET pruning = 0 WHERE id = 1")
        anchor_seq = int(head_seq) + 1
        at = iso(when)
        payload_text = canonical_json({
            "cutoff": cutoff, "older_than_s": older_than, "through_seq": through,
            "through_hash": through_hash, "records": records, "sessions": sessions})
        digest = record_hash_text(anchor_seq, PRUNE_KIND, at, None, payload_text,
                                  str(head_hash))
        db.execute(_INSERT_CHAIN, (anchor_seq, PRUNE_KIND, at, None, payload_text,
                                   str(head_hash), digest))
        db.execute(_INSERT_INBOX, (anchor_seq, PRUNE_KIND, at, None, payload_text))
        db.execute(f"DELETE FROM temp.{INBOX}")
        db.execute("COMMIT")
        return PruneReport(cutoff, False, records, sessions, through, through_hash, anchor_seq)

    # --- reads ---------------------------------------------------------------------------

    def _reader_db(self) -> aiosqlite.Connection:
        if self._reader is None:
            raise AuditError("the audit store is closed")
        return self._reader

    async def _fetch(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()
                     ) -> list[sqlite3.Row]:
        await self._settle()
        async with self._read_lock, self._reader_db().execute(sql, params) as cursor:
            return list(await cursor.fetchall())

    async def list_sessions(self, since: float | None = None, until: float | None = None,
                            identity: str | None = None, target: str | None = None,
                            decision: str | None = None, text: str | None = None,
                            limit: int = 100) -> list[SessionView]:
        where, params = _session_filters(Filters(since=since, until=until, identity=identity,
                                                 target=target, decision=decision, text=text))
        params["limit"] = int(limit)
        rows = await self._fetch(f"{_SESSION_SELECT} WHERE {where} "
                                 "ORDER BY s.started_at DESC, s.started_seq DESC LIMIT :limit",
                                 params)
        return [_session_view(r) for r in rows]

    async def get_session(self, session_id: str) -> SessionView | None:
        rows = await self._fetch(f"{_SESSION_SELECT} WHERE s.id = :id", {"id": session_id})
        return _session_view(rows[0]) if rows else None

    async def session_statements(self, session_id: str) -> list[StatementView]:
        await self._settle()
        async with self._read_lock:
            db = self._reader_db()
            # One snapshot, so a statement and its approval or masking never disagree.
            await db.execute("BEGIN")
            try:
                async with db.execute("SELECT * FROM statements WHERE session_id = ? "
                                      "ORDER BY seq, id", (session_id,)) as cursor:
                    statements = list(await cursor.fetchall())
                async with db.execute(
                        "SELECT * FROM approvals WHERE session_id = ? OR id IN (SELECT "
                        "approval_id FROM statements WHERE session_id = ?)",
                        (session_id, session_id)) as cursor:
                    approvals = {int(r["id"]): _approval_view(r)
                                 for r in await cursor.fetchall()}
                async with db.execute(
                        f"{_MASKING_SELECT} WHERE m.session_id = ? ORDER BY m.seq, m.idx",
                        (session_id,)) as cursor:
                    masking = [_masking_view(r) for r in await cursor.fetchall()]
            finally:
                await db.execute("COMMIT")
        by_statement: dict[int, list[MaskingView]] = {}
        for m in masking:
            by_statement.setdefault(m.statement_id, []).append(m)
        views = []
        for row in statements:
            approval_id = row["approval_id"]
            views.append(_statement_view(
                row, approvals.get(int(approval_id)) if approval_id is not None else None,
                tuple(by_statement.get(int(row["id"]), ()))))
        return views

    async def pending_approvals(self) -> list[ApprovalView]:
        rows = await self._fetch("SELECT * FROM approvals WHERE status = 'pending' ORDER BY id")
        return [_approval_view(r) for r in rows]

    async def get_approval(self, approval_id: int) -> ApprovalView | None:
        rows = await self._fetch(f"{_APPROVAL_SELECT} WHERE a.id = ?", (int(approval_id),))
        return _backed_approval_view(rows[0]) if rows else None

    async def get_approvals(self, approval_ids: Sequence[int]) -> dict[int, ApprovalView]:
        ids = [int(i) for i in approval_ids]
        if not ids:
            return {}
        rows = await self._fetch(f"{_APPROVAL_SELECT} WHERE a.id IN "
                                 "(SELECT value FROM json_each(?))", (json.dumps(ids),))
        return {int(r["id"]): _backed_approval_view(r) for r in rows}

    async def recent_masking(self, limit: int = 100) -> list[MaskingView]:
        rows = await self._fetch(f"{_MASKING_SELECT} ORDER BY m.seq DESC, m.idx LIMIT ?",
                                 (int(limit),))
        return [_masking_view(r) for r in rows]

    # --- verify --------------------------------------------------------------------------

    async def verify(self, expect: Sequence[tuple[int, str]] = ()) -> VerifyReport:
        """Walk the chain, check head and prune anchor, then rebuild and compare the
        query tables. Runs on its own connection inside one read snapshot."""
        started = time.perf_counter()
        report = VerifyReport()
        await self._settle()
        db = await self._connect()
        try:
            await db.execute("ATTACH DATABASE '' AS rebuilt")
            await db.execute("BEGIN")
            try:
                await self._verify_chain(db, report, expect)
                if report.ok:
                    await self._verify_projections(db, report)
                else:
                    report.warnings.append("query tables were not compared: the chain itself "
                                           "is broken")
                await self._verify_triggers(db, report)
            finally:
                with contextlib.suppress(sqlite3.Error):
                    await db.execute("ROLLBACK")
        except sqlite3.DatabaseError as exc:
            # A damaged page is found only when the walk reaches it: that is a broken
            # trail to report, not a crash.
            report.add(Problem(None, f"the store file is damaged (SQLite: {exc}) after "
                               f"{report.records} record(s) were read; nothing past that "
                               "point can be checked: restore the file from a backup"))
        finally:
            await db.close()
        report.elapsed_s = time.perf_counter() - started
        return report

    async def _verify_chain(self, db: aiosqlite.Connection, report: VerifyReport,
                            expect: Sequence[tuple[int, str]]) -> None:
        async with db.execute("SELECT seq, hash FROM chain_head WHERE id = 1") as cursor:
            head_row = await cursor.fetchone()
        head = (int(head_row[0]), str(head_row[1])) if head_row else None
        anchor: tuple[int, str] | None = None
        anchored_by: tuple[int, str] = (0, "")  # the prune record behind ``anchor``
        async with db.execute("SELECT seq, at, payload FROM chain WHERE kind = ? ORDER BY seq",
                              (PRUNE_KIND,)) as cursor:
            async for (prune_seq, prune_at, payload) in cursor:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    data = json.loads(payload)
                    candidate = (int(data["through_seq"]), str(data["through_hash"]))
                    if anchor is None or candidate[0] > anchor[0]:
                        anchor = candidate
                        anchored_by = (int(prune_seq), str(prune_at))
        checker = ChainChecker(report, anchor)
        checker.want_hashes({seq for seq, _ in expect})
        async with db.execute(f"SELECT {', '.join(CHAIN_COLUMNS)} FROM chain "
                              "ORDER BY seq") as cursor:
            async for row in cursor:
                checker.feed(ChainRow(int(row[0]), str(row[1]), str(row[2]),
                                      None if row[3] is None else str(row[3]), str(row[4]),
                                      str(row[5]), str(row[6])))
        checker.finish(head)
        for seq, digest in expect:
            found = checker.hashes.get(seq)
            if found is None:
                if anchor is not None and seq == anchor[0] and digest.lower() != anchor[1]:
                    report.add(Problem(seq, f"record #{seq} was pruned, but the prune anchor "
                                       f"(record #{anchored_by[0]}) gives it hash "
                                       f"{anchor[1][:16]}…, not the {digest[:16]}… you kept: "
                                       "the chain was rewritten before the prune"))
                elif anchor is not None and seq <= anchor[0]:
                    # Removing a prefix and chaining a prune record is what prune does, and
                    # also what someone with the file could do; only the time says which.
                    report.warnings.append(
                        f"record #{seq}, whose hash you kept, was pruned by record "
                        f"#{anchored_by[0]} at {anchored_by[1]}; that prune was chained after "
                        "your kept head, so check it was your retention run, and keep the "
                        "new head")
                else:
                    report.add(Problem(seq, f"record #{seq}, whose hash you kept, is not in "
                                       "the chain (the tail was cut off or rewritten)"))
            elif found != digest.lower():
                report.add(Problem(seq, f"record #{seq} has hash {found[:16]}…, not the "
                                   f"{digest[:16]}… you kept: the chain was rewritten from "
                                   "here"))

    async def _verify_projections(self, db: aiosqlite.Connection,
                                  report: VerifyReport) -> None:
        for statement in schema_statements("rebuilt", guards=False):
            await db.execute(statement)
        # The same triggers that maintain the live tables replay the chain into scratch.
        columns = ", ".join(CHAIN_COLUMNS)
        await db.execute(f"INSERT INTO rebuilt.chain ({columns}) SELECT {columns} "
                         "FROM main.chain ORDER BY seq")
        kinds: dict[int, str] = {}
        for projection in PROJECTIONS:
            await self._compare_projection(db, projection, report, kinds)
        report.projections_checked = True

    async def _compare_projection(self, db: aiosqlite.Connection, projection: Projection,
                                  report: VerifyReport, kinds: dict[int, str]) -> None:
        table = projection.table
        async with db.execute(f"PRAGMA rebuilt.table_info({table})") as cursor:
            columns = [str(r[1]) for r in await cursor.fetchall()]
        column_list = ", ".join(columns)
        key_index = [columns.index(k) for k in projection.key]

        async def diff(left: str, right: str) -> dict[tuple[Any, ...], tuple[Any, ...]]:
            sql = (f"SELECT {column_list} FROM {left}.{table} EXCEPT "
                   f"SELECT {column_list} FROM {right}.{table} LIMIT 200")
            async with db.execute(sql) as cursor:
                return {tuple(r[i] for i in key_index): tuple(r)
                        for r in await cursor.fetchall()}

        live = await diff("main", "rebuilt")
        truth = await diff("rebuilt", "main")
        for key in sorted(set(live) | set(truth), key=repr):
            name = f"{table} row {'/'.join(str(k) for k in key)}"
            if key in live and key in truth:
                changed = [c for i, c in enumerate(columns) if live[key][i] != truth[key][i]]
                origin = projection.origins.get(changed[0], projection.default_origin)
                seq = truth[key][columns.index(origin)] or truth[key][
                    columns.index(projection.default_origin)]
                kind = await _kind_of(db, int(seq), kinds)
                report.add(Problem(int(seq), f"{name} was edited: {', '.join(changed)} "
                                   f"differs from chain record #{seq} ({kind})", table))
            elif key in truth:
                seq = truth[key][columns.index(projection.default_origin)]
                kind = await _kind_of(db, int(seq), kinds)
                report.add(Problem(int(seq), f"{name} was deleted from the query table "
                                   f"(chain record #{seq}, {kind}, still has it)", table))
            else:
                claimed = live[key][columns.index(projection.default_origin)]
                seq = int(claimed) if isinstance(claimed, int) else None
                report.add(Problem(seq, f"{name} is not backed by any chain record (inserted "
                                   "behind the store's back)", table))

    async def _verify_triggers(self, db: aiosqlite.Connection, report: VerifyReport) -> None:
        async with db.execute("SELECT name FROM main.sqlite_master WHERE type = 'trigger'"
                              ) as cursor:
            present = {str(r[0]) for r in await cursor.fetchall()}
        missing = [t for t in GUARD_TRIGGERS if t not in present]
        if missing:
            report.warnings.append("guard trigger(s) dropped: " + ", ".join(missing)
                                   + " (someone has been editing the file by hand)")

    # --- export --------------------------------------------------------------------------

    async def export(self, out: TextIO, *, format: str = "jsonl", what: str = "statements",
                     filters: Filters | None = None) -> int:
        if format not in ("jsonl", "csv"):
            raise ValueError("export format is jsonl or csv")
        if what not in ("statements", "records"):
            raise ValueError("export what is 'statements' or 'records'")
        filters = filters or Filters()
        await self._settle()
        if what == "statements":
            where, params = _statement_filters(filters)
            sql = f"{export_format.STATEMENT_EXPORT_SELECT} WHERE {where} ORDER BY t.id"
            fields = export_format.STATEMENT_FIELDS
            convert: Callable[[sqlite3.Row], dict[str, Any]] = export_format.statement_row
        else:
            where, params = _record_filters(filters)
            sql = f"SELECT c.* FROM chain c WHERE {where} ORDER BY c.seq"
            fields = export_format.RECORD_FIELDS
            convert = export_format.record_row
        writer = export_format.RowWriter(out, format, fields)
        db = await self._connect()
        db.row_factory = sqlite3.Row
        count = 0
        try:
            await db.execute("BEGIN")
            async with db.execute(sql, params) as cursor:
                async for row in cursor:
                    writer.add(convert(row))
                    count += 1
                    if writer.pending >= 500:
                        # File writes off the event loop, in chunks, so memory stays flat.
                        await asyncio.to_thread(writer.flush)
            await db.execute("COMMIT")
        finally:
            await db.close()
        await asyncio.to_thread(writer.flush)
        return count


def _text_of(value: Any, kind: str) -> str:
    try:
        return json_text(value)
    except (TypeError, ValueError) as exc:
        raise AuditWriteError(f"audit record {kind} is not serialisable: {exc}") from exc


def _scalar_text(value: Any, kind: str) -> str:
    """``canonical_json`` of one payload field, without the encoder round trip for the
    strings, integers and nulls the statement records are made of."""
    if value is None:
        return "null"
    if type(value) is str:
        return json_string(value)
    if type(value) is int:
        return str(value)
    return _text_of(value, kind)


def _pair_results(batch: list[_Item]) -> None:
    """Pair each statement.received record with its first result in the same batch, so
    the two are chained as one ``statement`` record: half the hashing and inserting, and
    no update of the row just inserted. Never across a record someone awaits (an approval,
    a session's end), so the chain keeps the order things were decided in."""
    for item in batch:  # a batch can be tried again, alone or whole
        item.partner = None
        item.merged = False
    received: dict[int, _Item] = {}
    for item in batch:
        if item.future is not None or item.guard is not None:
            received.clear()
        elif item.insert is not None:
            received[item.insert[0]] = item
        elif item.finish is not None:
            statement = received.pop(item.finish[-1], None)
            if statement is not None:
                statement.partner = item
                item.merged = True


def _consume(future: asyncio.Future[int]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.debug("audit write failed: %s", future.exception())


def _fail(batch: list[_Item], error: Exception) -> None:
    for item in batch:
        if item.future is not None and not item.future.done():
            item.future.set_exception(error)


async def _kind_of(db: aiosqlite.Connection, seq: int, cache: dict[int, str]) -> str:
    if seq not in cache:
        async with db.execute("SELECT kind FROM main.chain WHERE seq = ?", (seq,)) as cursor:
            row = await cursor.fetchone()
        cache[seq] = str(row[0]) if row else "missing"
    return cache[seq]


# --- row mapping ------------------------------------------------------------------------

_SESSION_SELECT = """
SELECT s.*,
  (SELECT COUNT(*) FROM statements t WHERE t.session_id = s.id) AS n_statements,
  (SELECT COUNT(*) FROM statements t WHERE t.session_id = s.id AND t.decision = 'block')
    AS n_blocked,
  (SELECT COUNT(*) FROM statements t WHERE t.session_id = s.id AND t.decision = 'review')
    AS n_reviewed
FROM sessions s"""

_MASKING_SELECT = """
SELECT m.*, s.subject AS subject FROM masking_actions m
LEFT JOIN sessions s ON s.id = m.session_id"""


def _session_filters(f: Filters) -> tuple[str, dict[str, Any]]:
    """WHERE clause for sessions overlapping [since, until] and matching the rest."""
    clauses = ["1 = 1"]
    params: dict[str, Any] = {}
    if f.since is not None:
        clauses.append("(s.ended_at IS NULL OR s.ended_at >= :since)")
        params["since"] = iso(f.since)
    if f.until is not None:
        clauses.append("s.started_at <= :until")
        params["until"] = iso(f.until)
    if f.identity:
        clauses.append("s.subject = :identity")
        params["identity"] = f.identity
    if f.target:
        clauses.append("s.target = :target")
        params["target"] = f.target
    if f.session_id:
        clauses.append("s.id = :session_id")
        params["session_id"] = f.session_id
    if f.decision:
        clauses.append("EXISTS (SELECT 1 FROM statements t WHERE t.session_id = s.id "
                       "AND t.decision = :decision)")
        params["decision"] = f.decision
    if f.text:
        clauses.append("EXISTS (SELECT 1 FROM statements t WHERE t.session_id = s.id "
                       "AND instr(lower(t.sql), lower(:text)) > 0)")
        params["text"] = f.text
    return " AND ".join(clauses), params


def _statement_filters(f: Filters) -> tuple[str, dict[str, Any]]:
    clauses = ["1 = 1"]
    params: dict[str, Any] = {}
    if f.since is not None:
        clauses.append("t.received_at >= :since")
        params["since"] = iso(f.since)
    if f.until is not None:
        clauses.append("t.received_at <= :until")
        params["until"] = iso(f.until)
    if f.identity:
        clauses.append("s.subject = :identity")
        params["identity"] = f.identity
    if f.target:
        clauses.append("s.target = :target")
        params["target"] = f.target
    if f.session_id:
        clauses.append("t.session_id = :session_id")
        params["session_id"] = f.session_id
    if f.decision:
        clauses.append("t.decision = :decision")
        params["decision"] = f.decision
    if f.text:
        clauses.append("instr(lower(t.sql), lower(:text)) > 0")
        params["text"] = f.text
    return " AND ".join(clauses), params


def _record_filters(f: Filters) -> tuple[str, dict[str, Any]]:
    """Raw records narrow by time, session, and the sessions' identity or target only."""
    clauses = ["1 = 1"]
    params: dict[str, Any] = {}
    if f.since is not None:
        clauses.append("c.at >= :since")
        params["since"] = iso(f.since)
    if f.until is not None:
        clauses.append("c.at <= :until")
        params["until"] = iso(f.until)
    if f.session_id:
        # Nothing of a session precedes its start: the seq bound reads only the rest.
        clauses.append("c.session_id = :session_id AND c.seq >= COALESCE((SELECT "
                       "started_seq FROM sessions WHERE id = :session_id), 0)")
        params["session_id"] = f.session_id
    if f.identity or f.target:
        sub = ["1 = 1"]
        if f.identity:
            sub.append("s.subject = :identity")
            params["identity"] = f.identity
        if f.target:
            sub.append("s.target = :target")
            params["target"] = f.target
        clauses.append(f"c.session_id IN (SELECT s.id FROM sessions s WHERE {' AND '.join(sub)})")
    return " AND ".join(clauses), params


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _session_view(r: sqlite3.Row) -> SessionView:
    return SessionView(
        id=r["id"], subject=r["subject"], groups=tuple(_loads(r["groups"]) or ()),
        issuer=r["issuer"], token_id=r["token_id"], claimed_user=r["claimed_user"],
        client_addr=r["client_addr"], client_port=r["client_port"],
        application_name=r["application_name"], target=r["target"], tls=bool(r["tls"]),
        started_at=from_iso(r["started_at"]), ended_at=opt_from_iso(r["ended_at"]),
        end_reason=r["end_reason"], bytes_in=r["bytes_in"], bytes_out=r["bytes_out"],
        statements=int(r["n_statements"]), blocked=int(r["n_blocked"]),
        reviewed=int(r["n_reviewed"]))


def _approval_view(r: sqlite3.Row) -> ApprovalView:
    return ApprovalView(
        id=int(r["id"]), session_id=r["session_id"], statement_id=r["statement_id"],
        subject=r["subject"], groups=tuple(_loads(r["groups"]) or ()), sql=r["sql"],
        params=_loads(r["params"]), fingerprint=r["fingerprint"], rule_id=r["rule_id"],
        reason=r["reason"], created_at=from_iso(r["created_at"]),
        expires_at=from_iso(r["expires_at"]), binding_sha256=r["binding_sha256"],
        status=r["status"], scope=r["scope"], decided_by=r["decided_by"],
        decided_at=opt_from_iso(r["decided_at"]), comment=r["comment"])


# An approval's row with the chain record that settled it: a gateway releases a statement
# on what the approvals table says, and that table is only a projection anyone with the
# file can edit, so a decision counts only when its chain record says the same.
_APPROVAL_SELECT = ("SELECT a.*, c.kind AS c_kind, c.at AS c_at, c.session_id AS c_session, "
                    "c.payload AS c_payload, c.prev_hash AS c_prev, c.hash AS c_hash "
                    "FROM approvals a LEFT JOIN chain c ON c.seq = a.decided_seq")


def _decision_problem(r: sqlite3.Row) -> str | None:
    """Why an approved row is not backed by the chain, or None when it is."""
    if r["c_hash"] is None:
        return "no chain record settles it"
    if r["c_kind"] != "approval.decided" or record_hash_text(
            int(r["decided_seq"]), r["c_kind"], r["c_at"], r["c_session"], r["c_payload"],
            r["c_prev"]) != r["c_hash"]:
        return f"chain record #{r['decided_seq']} is not an intact decision"
    try:
        data = json.loads(r["c_payload"])
    except ValueError:
        return f"chain record #{r['decided_seq']} is unreadable"
    claimed = {"approval_id": r["id"], "status": r["status"], "scope": r["scope"],
               "decided_by": r["decided_by"]}
    if not isinstance(data, dict) or any(data.get(k) != v for k, v in claimed.items()):
        return f"chain record #{r['decided_seq']} records a different decision"
    return None


def _backed_approval_view(r: sqlite3.Row) -> ApprovalView:
    """The approval as its row says, except that an approval the chain does not back
    reads as withdrawn (fail closed: the statement must not run on an edited row)."""
    view = _approval_view(r)
    if view.status != "approved":
        return view
    problem = _decision_problem(r)
    if problem is None:
        return view
    log.error("audit: approval #%s reads approved in the approvals table, but %s; treated "
              "as withdrawn (the store was edited by hand: run hoopops audit verify)",
              view.id, problem)
    return replace(view, status="withdrawn", scope=None, decided_by=None,
                   comment=f"refused: the approvals table says approved, but {problem} "
                   "(edited by hand?)")


def _masking_view(r: sqlite3.Row) -> MaskingView:
    return MaskingView(record=int(r["seq"]), at=from_iso(r["at"]),
                       statement_id=int(r["statement_id"]), session_id=r["session_id"],
                       subject=r["subject"], column_or_detector=r["column_or_detector"],
                       strategy=r["strategy"], count=int(r["count"]))


def _statement_view(r: sqlite3.Row, approval: ApprovalView | None,
                    masking: tuple[MaskingView, ...]) -> StatementView:
    duration = r["duration_us"]
    return StatementView(
        id=int(r["id"]), session_id=r["session_id"], seq=int(r["seq"]),
        received_at=from_iso(r["received_at"]), sql=r["sql"], params=_loads(r["params"]),
        facts=_loads(r["facts"]) or {}, decision=r["decision"], rule_id=r["rule_id"],
        approval_id=r["approval_id"], started_at=opt_from_iso(r["started_at"]),
        finished_at=opt_from_iso(r["finished_at"]),
        duration_ms=None if duration is None else duration / 1000.0, rows=r["rows"],
        command_tag=r["command_tag"], sqlstate=r["sqlstate"],
        error_message=r["error_message"], result_sha256=r["result_sha256"],
        result_sample=_loads(r["result_sample"]), approval=approval, masking=masking)

"""The audit journal: how a statement's record is durable before the statement runs,
without a database transaction per statement.

Committing each statement to SQLite before forwarding it made every statement wait for a
writer thread, a transaction and (under ``synchronous=FULL``) an fsync, and that wait, not
the disk, capped the gateway at a few thousand statements a second. Instead, the gateway
appends the record, already serialised as it will be chained, to this append-only file
with one ``write(2)`` on the event loop, and the SQLite writer chains and indexes records
in large batches moments later. A ``write(2)`` that returned is in the operating system's
cache, so a killed gateway loses nothing; under ``synchronous=FULL`` the statement also
waits for an ``fdatasync`` that many sessions share (group commit), so a power loss loses
nothing either.

Each gateway run writes its own numbered files in ``<store>.journal/`` and holds an
exclusive lock on ``<run>.lock`` while it lives. The store records, in the same
transaction as each batch, how far it has ingested each run (``journal_marks``); files
entirely below that mark are deleted. When a store opens, runs whose lock nobody holds
(their gateway died) are ingested from their mark on, then removed: that is crash
recovery.

A line is ``crc32 TAB kind TAB at TAB session TAB payload LF``: canonical JSON escapes
every control character, so neither TAB nor LF can occur inside a field, and the CRC
rejects a line torn by a power loss (the journal is read up to the first bad line).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import re
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

# A file is closed and a new one started past this size, so ingested files can be deleted
# while the gateway keeps writing.
ROTATE_BYTES = 8 * 1024 * 1024
_SUFFIX = ".log"
# The only records a gateway journals (the rest are chained directly). The CRC detects a
# torn line, not a forged one: anyone who can write the journal directory can compute it,
# so recovery also refuses any line a gateway could not have written.
JOURNAL_KINDS = frozenset({"statement.received", "statement.finished", "masking.applied"})
_ISO_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z\Z")


class JournalError(Exception):
    """The journal could not be written; the record is not durable."""


@dataclass(frozen=True, slots=True)
class JournalLine:
    kind: str
    at: str
    session_id: str | None
    payload: str


def journal_dir(store_path: Path) -> Path:
    return store_path.with_name(store_path.name + ".journal")


def encode(kind: str, at: str, session_id: str | None, payload: str) -> bytes:
    body = f"{kind}\t{at}\t{session_id or ''}\t{payload}".encode()
    return b"%08x\t%b\n" % (zlib.crc32(body), body)


def _decode(line: bytes) -> JournalLine | None:
    crc, sep, body = line.partition(b"\t")
    if not sep or len(crc) != 8:
        return None
    try:
        if int(crc, 16) != zlib.crc32(body):
            return None
        kind, at, session_id, payload = body.decode().split("\t")
    except ValueError:
        return None
    return JournalLine(kind, at, session_id or None, payload)


def refusal(line: JournalLine) -> str | None:
    """Why an intact line cannot be a record a gateway journaled, or None if it can be."""
    if line.kind not in JOURNAL_KINDS:
        return f"kind {line.kind!r} is never journaled"
    if not _ISO_TIME.match(line.at):
        return f"time {line.at!r} is not in the form the gateway writes"
    if line.session_id is None:
        return "it names no session"
    try:
        payload = json.loads(line.payload)
    except ValueError:
        return "its payload is not JSON"
    if not isinstance(payload, dict):
        return "its payload is not a JSON object"
    return None


def read_lines(path: Path, offset: int = 0) -> Iterator[tuple[JournalLine, int]]:
    """The complete, intact lines of one journal file after ``offset``, each with the
    offset just past it; stops at the first torn or corrupted line."""
    with path.open("rb") as file:
        file.seek(offset)
        position = offset
        for raw in file:
            if not raw.endswith(b"\n"):
                return
            line = _decode(raw[:-1])
            if line is None:
                return
            position += len(raw)
            yield line, position


@dataclass(frozen=True)
class OrphanRun:
    """A run whose gateway is gone, with its lock held by us until ``release``."""

    run: str
    files: list[tuple[int, Path]]
    lock_fd: int
    lock_path: Path

    def release(self) -> None:
        """Remove the run's files and lock: call only after everything is ingested."""
        for _, path in self.files:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        with contextlib.suppress(FileNotFoundError):
            self.lock_path.unlink()
        os.close(self.lock_fd)

    def abandon(self) -> None:
        os.close(self.lock_fd)


def _run_files(directory: Path) -> dict[str, list[tuple[int, Path]]]:
    runs: dict[str, list[tuple[int, Path]]] = {}
    for path in directory.glob(f"*{_SUFFIX}"):
        run, _, number = path.stem.rpartition(".")
        if run and number.isdigit():
            runs.setdefault(run, []).append((int(number), path))
    for files in runs.values():
        files.sort()
    return runs


def orphaned_runs(directory: Path) -> list[OrphanRun]:
    """Runs in ``directory`` whose gateway no longer holds their lock, oldest first."""
    if not directory.is_dir():
        return []
    runs = _run_files(directory)
    for lock in directory.glob("*.lock"):
        runs.setdefault(lock.stem, [])
    found = []
    for run in sorted(runs):
        lock_path = directory / f"{run}.lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)  # a live gateway's run
            continue
        found.append(OrphanRun(run, runs[run], fd, lock_path))
    return found


class Journal:
    """This gateway run's journal. ``append`` runs on the event loop; nothing else writes."""

    def __init__(self, directory: Path, *, sync: bool, rotate_bytes: int = ROTATE_BYTES
                 ) -> None:
        self.directory = directory
        self.sync = sync
        self.rotate_bytes = rotate_bytes
        self.run = f"{time.time_ns():020d}-{os.getpid()}"
        directory.mkdir(parents=True, exist_ok=True)
        self._lock_path = directory / f"{self.run}.lock"
        self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.file_no = 0
        self._kept_from = 1  # the oldest file ``ingested`` has not deleted
        self._fd = -1
        self._size = 0
        self._open_next()
        # Under ``sync``: how far the current file is known to be on disk, and who waits.
        self._synced = (self.file_no, 0)
        self._waiters: list[tuple[tuple[int, int], asyncio.Future[None]]] = []
        self._syncer: asyncio.Task[None] | None = None
        self._sync_thread: ThreadPoolExecutor | None = None
        self._closed = False
        self.syncs = 0

    def _path(self, file_no: int) -> Path:
        return self.directory / f"{self.run}.{file_no:06d}{_SUFFIX}"

    def _open_next(self) -> None:
        old = self._fd
        if old >= 0:
            if self.sync:
                os.fdatasync(old)  # what was written there stays durable once it is closed
            os.close(old)
        self.file_no += 1
        self._fd = os.open(self._path(self.file_no),
                           os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_EXCL, 0o600)
        self._size = 0
        if self.sync:
            # The new file's directory entry must survive a power loss too.
            dir_fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
            self._synced = (self.file_no, 0)

    @property
    def end(self) -> tuple[int, int]:
        """Where the next line will start: the mark of everything written so far."""
        return self.file_no, self._size

    def append(self, data: bytes) -> tuple[int, int]:
        """Write one encoded line; returns (file number, offset past it). Raises
        JournalError: the caller must then treat the record as not written."""
        if self._closed:
            raise JournalError("the audit journal is closed")
        try:
            if self._size >= self.rotate_bytes:
                self._open_next()
            written = os.write(self._fd, data)
            if written != len(data):
                # A short write to a regular file means the disk is full; the torn line is
                # ignored on recovery, and the next line starts a fresh file.
                self._size = self.rotate_bytes
                raise JournalError(f"short write to the audit journal ({written} of "
                                   f"{len(data)} bytes): is the disk full?")
        except OSError as exc:
            raise JournalError(f"cannot write the audit journal in {self.directory}: "
                               f"{exc}") from exc
        self._size += written
        return self.file_no, self._size

    async def synced(self, mark: tuple[int, int]) -> None:
        """Return once everything up to ``mark`` is on disk (``sync`` journals only);
        one fdatasync serves every session waiting at that moment."""
        if not self.sync or mark <= self._synced:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((mark, future))
        if self._syncer is None:
            self._syncer = asyncio.ensure_future(self._sync_loop())
        await future

    async def _sync_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._sync_thread is None:
            self._sync_thread = ThreadPoolExecutor(1, thread_name_prefix="audit-journal")
        try:
            while self._waiters:
                target = (self.file_no, self._size)
                try:
                    await loop.run_in_executor(self._sync_thread, os.fdatasync, self._fd)
                except OSError as exc:
                    error = JournalError(f"cannot flush the audit journal to disk: {exc}")
                    waiters, self._waiters = self._waiters, []
                    for _, future in waiters:
                        if not future.done():
                            future.set_exception(error)
                    return
                self.syncs += 1
                self._synced = max(self._synced, target)
                still = []
                for mark, future in self._waiters:
                    if mark <= self._synced:
                        if not future.done():
                            future.set_result(None)
                    else:
                        still.append((mark, future))
                self._waiters = still
        finally:
            self._syncer = None

    def ingested(self, mark: tuple[int, int]) -> None:
        """Everything up to ``mark`` is in the store: delete the files wholly before it.
        Each file is deleted once (the store calls this after every batch, and trying
        every earlier file each time would cost more the longer the gateway runs)."""
        for file_no in range(self._kept_from, mark[0]):
            with contextlib.suppress(FileNotFoundError):
                self._path(file_no).unlink()
        self._kept_from = max(self._kept_from, mark[0])

    def close(self, *, all_ingested: bool) -> None:
        """Stop writing; with ``all_ingested`` the run leaves nothing behind."""
        if self._closed:
            return
        self._closed = True
        if self._sync_thread is not None:
            self._sync_thread.shutdown(wait=True)
        with contextlib.suppress(OSError):
            os.close(self._fd)
        if all_ingested:
            for file_no in range(1, self.file_no + 1):
                with contextlib.suppress(FileNotFoundError):
                    self._path(file_no).unlink()
            with contextlib.suppress(FileNotFoundError):
                self._lock_path.unlink()
        os.close(self._lock_fd)

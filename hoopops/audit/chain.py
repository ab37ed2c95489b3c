"""The hash chain: how a record's hash is computed, and how a chain is checked.

Every record is hashed together with the hash of the record before it, so changing,
removing or re-ordering any record breaks every link after it. The definition below is
the one documented in ``docs/audit.md``; an auditor can recompute it without hoopops:

    hash = SHA-256( canonical_json({"seq": seq, "kind": kind, "at": at,
                                    "session": session_id, "payload": payload,
                                    "prev": prev_hash}) )

where ``canonical_json`` sorts keys, uses no whitespace and writes UTF-8 unescaped. The
first record links to ``GENESIS`` (64 zeros); after a prune, the first remaining record
links to the hash named by the newest ``audit.pruned`` anchor.

This module is storage-free: ``ChainChecker`` is fed rows in sequence order by whichever
store holds them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, is_dataclass
from enum import Enum
from json.encoder import encode_basestring as _encode_string
from typing import Any

GENESIS = "0" * 64
PRUNE_KIND = "audit.pruned"
# Enough to point an auditor at the damage without printing a whole broken store.
MAX_PROBLEMS = 50


# Built once: json.dumps with any non-default option constructs a new encoder per call,
# which was most of the cost of writing a record.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                              allow_nan=False)


def canonical_json(value: Any) -> str:
    return _CANONICAL.encode(value)


def plain(value: Any) -> Any:
    """``value`` as JSON-native data (facts and event data come from many places)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) \
            else str(value)
    if isinstance(value, Enum):
        return plain(value.value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, set | frozenset):
        return sorted((plain(v) for v in value), key=lambda v: canonical_json(v))
    if is_dataclass(value) and not isinstance(value, type):
        return plain(asdict(value))
    if isinstance(value, bytes | bytearray | memoryview):
        return {"hex": bytes(value).hex()}
    return str(value)


def json_text(value: Any) -> str:
    """``canonical_json`` of data from anywhere: facts and event data are usually plain
    JSON already, and are only converted (sets, tuple keys, NaN, dataclasses) when they
    are not, to keep the common case short. Raises TypeError or ValueError."""
    try:
        return canonical_json(value)
    except (TypeError, ValueError):
        return canonical_json(plain(value))


def record_hash(seq: int, kind: str, at: str, session_id: str | None, payload: Any,
                prev_hash: str) -> str:
    body = canonical_json({"seq": seq, "kind": kind, "at": at, "session": session_id,
                           "payload": payload, "prev": prev_hash})
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def record_hash_text(seq: int, kind: str, at: str, session_id: str | None, payload_text: str,
                     prev_hash: str) -> str:
    """``record_hash`` for a payload already in canonical JSON, without re-serialising it.

    The keys are spliced in the order ``canonical_json`` would sort them (at, kind,
    payload, prev, seq, session), so both functions give the same hash; the writer uses
    this one because it already holds the payload's text.
    """
    body = (f'{{"at":{json_string(at)},"kind":{json_string(kind)},"payload":{payload_text},'
            f'"prev":{json_string(prev_hash)},"seq":{int(seq)},'
            f'"session":{json_string(session_id)}}}')
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def json_string(value: str | None) -> str:
    """What canonical_json writes for a string (or null), without the encoder round trip."""
    return "null" if value is None else _encode_string(value)


@dataclass(frozen=True)
class ChainRow:
    seq: int
    kind: str
    at: str
    session_id: str | None
    payload: str
    prev_hash: str
    hash: str


@dataclass(frozen=True)
class Problem:
    """One thing wrong. ``seq`` is the chain record it concerns (None: the store as a whole)."""

    seq: int | None
    message: str
    table: str = "chain"

    def to_json(self) -> dict[str, Any]:
        return {"record": self.seq, "table": self.table, "message": self.message}


@dataclass
class VerifyReport:
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    head_hash: str = GENESIS
    pruned_through: int | None = None
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    projections_checked: bool = False
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first_problem(self) -> Problem | None:
        if not self.problems:
            return None
        return min(self.problems, key=lambda p: (p.seq is None, p.seq or 0))

    def add(self, problem: Problem) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(problem)

    def to_json(self) -> dict[str, Any]:
        first = self.first_problem
        return {"ok": self.ok, "records": self.records, "first_seq": self.first_seq,
                "last_seq": self.last_seq, "head": f"{self.last_seq or 0}:{self.head_hash}",
                "pruned_through": self.pruned_through,
                "projections_checked": self.projections_checked,
                "first_problem": first.to_json() if first else None,
                "problems": [p.to_json() for p in sorted(
                    self.problems, key=lambda p: (p.seq is None, p.seq or 0))],
                "warnings": self.warnings, "elapsed_s": round(self.elapsed_s, 3)}


class ChainChecker:
    """Walks chain rows in ascending ``seq`` and records every break it finds.

    ``anchor`` is ``(through_seq, through_hash)`` from the newest prune anchor, or None
    when nothing was ever pruned; it says where the surviving chain must begin.
    """

    def __init__(self, report: VerifyReport, anchor: tuple[int, str] | None) -> None:
        self.report = report
        self.anchor = anchor
        self._prev_seq: int | None = None
        self._prev_hash: str | None = None
        self.hashes: dict[int, str] = {}
        self._want: set[int] = set()

    def want_hashes(self, seqs: set[int]) -> None:
        """Remember the hashes of these records (for checking externally kept heads)."""
        self._want = set(seqs)

    def feed(self, row: ChainRow) -> None:
        report = self.report
        report.records += 1
        if row.seq in self._want:
            self.hashes[row.seq] = row.hash
        gap = False
        if self._prev_seq is None:
            report.first_seq = row.seq
            gap = self._check_start(row)
        elif row.seq != self._prev_seq + 1:
            gap = True
            missing = _span(self._prev_seq + 1, row.seq - 1)
            report.add(Problem(self._prev_seq + 1,
                               f"{missing} missing between #{self._prev_seq} and #{row.seq} "
                               "(deleted, or the records were renumbered)"))
        computed: str | None = record_hash_text(row.seq, row.kind, row.at, row.session_id,
                                                row.payload, row.prev_hash)
        if computed != row.hash:
            # The stored text may be the same JSON written differently (a tool reformatted
            # it); the hash is defined over the canonical form, so compare that.
            try:
                computed = record_hash(row.seq, row.kind, row.at, row.session_id,
                                       json.loads(row.payload), row.prev_hash)
            except (ValueError, TypeError):
                computed = None
        if computed != row.hash:
            report.add(Problem(row.seq, f"record #{row.seq} ({row.kind}) was changed: its "
                               "contents no longer match its hash"))
        elif not gap and self._prev_hash is not None and row.prev_hash != self._prev_hash:
            # The row is self-consistent but does not link: something before it was
            # rewritten (hash recomputed), or this row was moved here from elsewhere.
            report.add(Problem(row.seq - 1,
                               f"record #{row.seq - 1} was changed or replaced: record "
                               f"#{row.seq} ({row.kind}) no longer links to it"))
        self._prev_seq = row.seq
        self._prev_hash = row.hash

    def _check_start(self, row: ChainRow) -> bool:
        report = self.report
        if self.anchor is None:
            if row.seq != 1:
                report.add(Problem(1, f"{_span(1, row.seq - 1)} missing from the start "
                                   "and no prune anchor accounts for them"))
                return True
            if row.prev_hash != GENESIS:
                report.add(Problem(1, "record #1 does not start the chain (its previous "
                                   "hash is not the genesis value)"))
            return False
        through_seq, through_hash = self.anchor
        report.pruned_through = through_seq
        if row.seq != through_seq + 1:
            if row.seq > through_seq + 1:
                report.add(Problem(through_seq + 1, f"{_span(through_seq + 1, row.seq - 1)} "
                                   f"missing: the newest prune anchor covers only up to "
                                   f"#{through_seq}"))
            else:
                report.add(Problem(row.seq, f"record #{row.seq} should have been pruned "
                                   f"(the prune anchor covers up to #{through_seq})"))
            return True
        if row.prev_hash != through_hash:
            report.add(Problem(row.seq, f"record #{row.seq} does not link to the hash the "
                               f"prune anchor recorded for #{through_seq}"))
        return False

    def finish(self, head: tuple[int, str] | None) -> None:
        """Compare the walked tail with the stored head (catches a cut-off tail)."""
        report = self.report
        report.last_seq = self._prev_seq
        report.head_hash = self._prev_hash or GENESIS
        if head is None:
            report.add(Problem(None, "the chain head record is missing"))
            return
        head_seq, head_hash = head
        last = self._prev_seq or 0
        if head_seq > last:
            report.add(Problem(last + 1, f"{_span(last + 1, head_seq)} missing from the end "
                               f"of the chain (the head says it ends at #{head_seq})"))
        elif head_seq < last:
            report.add(Problem(head_seq + 1, f"the head says the chain ends at #{head_seq} "
                               f"but it continues to #{last}: the head was altered or records "
                               "were added behind the store's back"))
        elif last and head_hash != self._prev_hash:
            report.add(Problem(last, f"record #{last} differs from the head's copy of its "
                               "hash (the last record was replaced)"))


def _span(first: int, last: int) -> str:
    return f"record #{first} is" if first == last else f"records #{first}..#{last} are"

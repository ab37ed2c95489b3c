"""What the gateway hands the audit store, and what the store hands back to readers.

Input records (``SessionRecord``, ``StatementRecord``, ``StatementResult``,
``MaskingAction``, ``ApprovalRequest``) carry times as epoch seconds (``time.time()``),
because that is what the gateway has at hand. The store writes them into the chain as
ISO-8601 UTC text with microseconds, so the evidence reads the same in any language and
never depends on how a float is printed.

Views (``SessionView``, ``StatementView``, ``ApprovalView``, ``MaskingView``) are what the
read API returns: plain frozen dataclasses with epoch-second times for the console, and a
``to_json()`` that renders the stable export names with ISO times.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from hoopops.identity import Identity

# Parameter values arrive as text (text format), bytes (binary format) or NULL.
ParamValue = str | bytes | None


# (second, its text): one tuple, replaced whole, so a reader on another thread never
# pairs one second with another's text.
_iso_second: tuple[int, str] = (-1, "")


def iso(epoch: float) -> str:
    """``2026-05-09T07:35:25.123456Z``: fixed width, so text order is time order.

    Built from ``time.gmtime`` rather than ``datetime.strftime``, which costs several
    times more and runs for every record on the gateway's event loop; and the text up to
    the second is kept, since thousands of records share each second.
    """
    whole = math.floor(epoch)
    micros = round((epoch - whole) * 1_000_000)
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    global _iso_second
    second, prefix = _iso_second
    if second != whole:
        t = time.gmtime(whole)
        prefix = (f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T{t.tm_hour:02d}:"
                  f"{t.tm_min:02d}:{t.tm_sec:02d}.")
        _iso_second = (whole, prefix)
    return f"{prefix}{micros:06d}Z"


def from_iso(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def opt_from_iso(text: str | None) -> float | None:
    return None if text is None else from_iso(text)


def opt_iso(epoch: float | None) -> str | None:
    return None if epoch is None else iso(epoch)


def json_param(value: ParamValue) -> str | dict[str, str] | None:
    """A parameter as JSON: text stays text, binary becomes ``{"hex": "..."}``.

    Binary parameters are kept exactly (hex) rather than decoded, because the evidence must
    show what the server received, not our guess at its meaning.
    """
    if isinstance(value, bytes | bytearray | memoryview):
        return {"hex": bytes(value).hex()}
    return value


def json_params(params: Sequence[ParamValue] | None) -> list[Any] | None:
    return None if params is None else [json_param(p) for p in params]


def sample_value(value: ParamValue) -> str | None:
    """A result cell for the stored sample: bytes in PostgreSQL's ``\\x`` hex form."""
    if isinstance(value, bytes | bytearray | memoryview):
        return "\\x" + bytes(value).hex()
    return value


@dataclass(frozen=True)
class SessionRecord:
    """One client connection, written when authentication succeeded."""

    id: str
    subject: str
    groups: tuple[str, ...]
    issuer: str | None
    token_id: str | None
    claimed_user: str | None
    client_addr: str | None
    client_port: int | None
    application_name: str | None
    target: str
    tls: bool
    started_at: float

    @classmethod
    def for_identity(cls, session_id: str, identity: Identity, *, claimed_user: str | None,
                     client_addr: str | None, client_port: int | None,
                     application_name: str | None, target: str, tls: bool,
                     started_at: float) -> SessionRecord:
        return cls(id=session_id, subject=identity.subject, groups=tuple(identity.groups),
                   issuer=identity.issuer, token_id=identity.token_id,
                   claimed_user=claimed_user, client_addr=client_addr,
                   client_port=client_port, application_name=application_name,
                   target=target, tls=tls, started_at=started_at)


# The two records every statement builds are plain slotted classes, not frozen ones: a
# frozen dataclass sets each field through object.__setattr__, which made building them a
# visible share of a statement's cost in the relay. Nothing changes them once built.
@dataclass(slots=True)
class StatementRecord:
    """A statement as received, written (durably) before it is forwarded.

    ``decision`` is the policy's answer (``allow``, ``block`` or ``review``); ``approval_id``
    is set when an earlier session-scope approval lets this statement through without a
    new review. A fresh review links itself when the approval is requested.

    ``facts`` may also be given already as its ``json_text`` (canonical JSON): the gateway
    keeps that text per policy decision, since a prepared statement's one decision serves
    every execution, and serialising it was the largest cost of a record.
    """

    session_id: str
    seq: int
    received_at: float
    sql: str
    params: Sequence[ParamValue] | None
    facts: dict[str, Any] | str
    decision: str
    rule_id: str | None
    approval_id: int | None = None


@dataclass(slots=True)
class StatementResult:
    """How a statement ended. ``result_sample`` is the masked result as sent, capped."""

    started_at: float | None
    finished_at: float
    rows: int | None
    command_tag: str | None
    sqlstate: str | None = None
    error_message: str | None = None
    result_sha256: str | None = None
    result_sample: dict[str, Any] | None = None


@dataclass(frozen=True)
class MaskingAction:
    """How many values one column (or detector) had masked, and how. Never the values."""

    column_or_detector: str
    strategy: str
    count: int


@dataclass(frozen=True)
class ApprovalRequest:
    """A held statement waiting for an analyst; written by the approvals broker."""

    session_id: str
    statement_id: int | None
    subject: str
    groups: tuple[str, ...]
    issuer: str | None
    token_id: str | None
    sql: str
    params: Sequence[ParamValue] | None
    fingerprint: str
    rule_id: str | None
    reason: str | None
    created_at: float
    expires_at: float
    binding_sha256: str


def approval_binding(session_id: str, subject: str, issuer: str | None, sql: str,
                     params: Sequence[ParamValue] | None) -> str:
    """SHA-256 over exactly what an approval authorises: who, where, which text, which values.

    Stored with the approval so both the gateway (before forwarding) and an auditor (later)
    can check that an approval was used for the statement it was granted for and no other.
    """
    body = {"session_id": session_id, "subject": subject, "issuer": issuer, "sql": sql,
            "params": json_params(params)}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


class ResultSampler:
    """Builds ``result_sha256`` and the capped ``result_sample`` while a result streams.

    Feed it the bytes exactly as sent to the client (``update``) and the masked cell values
    (``add_row``); it keeps at most ``max_rows`` rows and about ``max_bytes`` of cell text,
    so memory stays flat whatever the result size.
    """

    def __init__(self, max_rows: int, max_bytes: int) -> None:
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self._hash = hashlib.sha256()
        self._columns: list[str] = []
        self._rows: list[list[str | None]] = []
        self._bytes = 0
        self.rows_seen = 0
        self.truncated = False

    def update(self, wire: bytes | bytearray | memoryview) -> None:
        self._hash.update(wire)

    def set_columns(self, names: Sequence[str]) -> None:
        self._columns = list(names)

    def add_row(self, values: Sequence[ParamValue]) -> None:
        self.rows_seen += 1
        if self.truncated:
            return
        row = [sample_value(v) for v in values]
        size = sum(len(v) if v is not None else 4 for v in row) + 2 * len(row)
        if len(self._rows) >= self.max_rows or self._bytes + size > self.max_bytes:
            self.truncated = True
            return
        self._bytes += size
        self._rows.append(row)

    def sha256(self) -> str:
        return self._hash.hexdigest()

    def sample(self) -> dict[str, Any]:
        return _Capped({"columns": list(self._columns), "rows": [list(r) for r in self._rows],
                        "truncated": self.truncated}, self.max_rows, self.max_bytes)

    def result(self, *, started_at: float | None, finished_at: float, rows: int | None,
               command_tag: str | None, sqlstate: str | None = None,
               error_message: str | None = None) -> StatementResult:
        return StatementResult(started_at=started_at, finished_at=finished_at, rows=rows,
                               command_tag=command_tag, sqlstate=sqlstate,
                               error_message=error_message, result_sha256=self.sha256(),
                               result_sample=self.sample())


class _Capped(dict[str, Any]):
    """A sample a ResultSampler built, remembering the caps it was built under."""

    def __init__(self, value: dict[str, Any], max_rows: int, max_bytes: int) -> None:
        super().__init__(value)
        self.max_rows = max_rows
        self.max_bytes = max_bytes


def cap_sample(sample: dict[str, Any] | None, max_rows: int,
               max_bytes: int) -> dict[str, Any] | None:
    """Enforce the configured cap on a sample built elsewhere (never trust the caller);
    one a ResultSampler built under caps at least as tight passes as it is."""
    if sample is None:
        return None
    if isinstance(sample, _Capped) and sample.max_rows <= max_rows \
            and sample.max_bytes <= max_bytes:
        return sample
    rows = sample.get("rows", [])
    if len(rows) <= max_rows:
        # Within the caps as it is (the usual case): what a ResultSampler would keep,
        # without building one for every statement.
        size = 0
        plain_text = True
        for row in rows:
            for value in row:
                if value is None:
                    size += 6
                elif type(value) is str:
                    size += len(value) + 2
                else:
                    plain_text = False
        if plain_text and size <= max_bytes:
            return {"columns": [str(c) for c in sample.get("columns", [])],
                    "rows": [list(r) for r in rows],
                    "truncated": bool(sample.get("truncated"))}
    sampler = ResultSampler(max_rows, max_bytes)
    sampler.set_columns([str(c) for c in sample.get("columns", [])])
    for row in sample.get("rows", []):
        sampler.add_row(list(row))
    capped = sampler.sample()
    capped["truncated"] = bool(sample.get("truncated")) or sampler.truncated
    return capped


# ---------------------------------------------------------------------------------------
# Views returned by the read API.


@dataclass(frozen=True)
class SessionView:
    id: str
    subject: str
    groups: tuple[str, ...]
    issuer: str | None
    token_id: str | None
    claimed_user: str | None
    client_addr: str | None
    client_port: int | None
    application_name: str | None
    target: str
    tls: bool
    started_at: float
    ended_at: float | None
    end_reason: str | None
    bytes_in: int | None
    bytes_out: int | None
    statements: int
    blocked: int
    reviewed: int

    @property
    def open(self) -> bool:
        return self.ended_at is None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "subject": self.subject, "groups": list(self.groups),
                "issuer": self.issuer, "token_id": self.token_id,
                "claimed_user": self.claimed_user, "client_addr": self.client_addr,
                "client_port": self.client_port, "application_name": self.application_name,
                "target": self.target, "tls": self.tls, "started_at": iso(self.started_at),
                "ended_at": opt_iso(self.ended_at), "end_reason": self.end_reason,
                "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
                "statements": self.statements, "blocked": self.blocked,
                "reviewed": self.reviewed}


@dataclass(frozen=True)
class ApprovalView:
    id: int
    session_id: str
    statement_id: int | None
    subject: str
    groups: tuple[str, ...]
    sql: str
    params: list[Any] | None
    fingerprint: str
    rule_id: str | None
    reason: str | None
    created_at: float
    expires_at: float
    binding_sha256: str
    # pending | approved | denied | withdrawn | expired
    status: str
    scope: str | None
    decided_by: str | None
    decided_at: float | None
    comment: str | None

    @property
    def pending(self) -> bool:
        return self.status == "pending"

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "session": self.session_id, "statement": self.statement_id,
                "identity": self.subject, "groups": list(self.groups), "sql": self.sql,
                "params": self.params, "fingerprint": self.fingerprint, "rule": self.rule_id,
                "reason": self.reason, "created": iso(self.created_at),
                "expires": iso(self.expires_at), "status": self.status, "scope": self.scope,
                "decided_by": self.decided_by, "decided_at": opt_iso(self.decided_at),
                "comment": self.comment, "binding_sha256": self.binding_sha256}


@dataclass(frozen=True)
class MaskingView:
    record: int
    at: float
    statement_id: int
    session_id: str
    subject: str | None
    column_or_detector: str
    strategy: str
    count: int

    def to_json(self) -> dict[str, Any]:
        return {"record": self.record, "at": iso(self.at), "statement": self.statement_id,
                "session": self.session_id, "identity": self.subject,
                "column_or_detector": self.column_or_detector, "strategy": self.strategy,
                "count": self.count}


@dataclass(frozen=True)
class StatementView:
    id: int
    session_id: str
    seq: int
    received_at: float
    sql: str
    params: list[Any] | None
    facts: dict[str, Any]
    decision: str
    rule_id: str | None
    approval_id: int | None
    started_at: float | None
    finished_at: float | None
    duration_ms: float | None
    rows: int | None
    command_tag: str | None
    sqlstate: str | None
    error_message: str | None
    result_sha256: str | None
    result_sample: dict[str, Any] | None
    approval: ApprovalView | None = None
    masking: tuple[MaskingView, ...] = field(default_factory=tuple)

    @property
    def finished(self) -> bool:
        return self.finished_at is not None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "session": self.session_id, "seq": self.seq,
                "received_at": iso(self.received_at), "sql": self.sql,
                "params": self.params, "facts": self.facts, "decision": self.decision,
                "rule": self.rule_id, "approval_id": self.approval_id,
                "started_at": opt_iso(self.started_at),
                "finished_at": opt_iso(self.finished_at), "duration_ms": self.duration_ms,
                "rows": self.rows, "command_tag": self.command_tag, "sqlstate": self.sqlstate,
                "error_message": self.error_message, "result_sha256": self.result_sha256,
                "result_sample": self.result_sample,
                "approval": self.approval.to_json() if self.approval else None,
                "masking": [m.to_json() for m in self.masking]}


@dataclass(frozen=True)
class Filters:
    """What the console, ``audit sessions`` and ``audit export`` narrow by (all optional).

    ``identity`` is a token subject; ``decision`` keeps sessions (or statements) with at
    least one statement so decided; ``text`` searches statement SQL (substring).
    """

    since: float | None = None
    until: float | None = None
    identity: str | None = None
    target: str | None = None
    decision: str | None = None
    text: str | None = None
    session_id: str | None = None

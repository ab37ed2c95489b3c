"""The one interface every audit store implements, and the errors it raises.

The gateway, the approvals broker, the console and the CLI use only this interface, so a
PostgreSQL store (for several gateways sharing one trail) can follow the SQLite one
without touching them. Writes return the chain sequence number of the record they added
and return only after it is durable; a statement's records are durable before they are
chained (see ``journal.py``), so ``statement_received`` returns the statement's own id.
"""

from __future__ import annotations

import abc
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, TextIO

from hoopops.audit.chain import VerifyReport
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
    iso,
    json_params,
)

# How an approval can end; "approved" carries a scope of "once" or "session".
APPROVAL_FINAL = ("approved", "denied", "withdrawn", "expired")


class AuditError(Exception):
    """Anything the audit store cannot do; the message says what and what to do."""


class AuditWriteError(AuditError):
    """A record could not be made durable. The gateway must refuse the statement."""


class AuditStoreMissing(AuditError):
    """Opened for reading, but there is no store at that path."""


class ApprovalNotFound(AuditError):
    pass


class ApprovalNotPending(AuditError):
    """The approval was already decided, withdrawn or expired; ``view`` says how."""

    def __init__(self, message: str, view: ApprovalView | None = None) -> None:
        super().__init__(message)
        self.view = view


@dataclass(frozen=True)
class PruneReport:
    cutoff: str
    dry_run: bool
    records: int
    sessions: int
    through_seq: int | None
    through_hash: str | None
    anchor_seq: int | None

    def to_json(self) -> dict[str, Any]:
        return {"cutoff": self.cutoff, "dry_run": self.dry_run, "records": self.records,
                "sessions": self.sessions, "through_seq": self.through_seq,
                "through_hash": self.through_hash, "anchor_seq": self.anchor_seq}


class AuditStore(abc.ABC):
    """Append-only, hash-chained audit trail with a read API for the console and CLI."""

    # --- writes: each returns the chain sequence number once the record is committed ----

    @abc.abstractmethod
    async def session_started(self, session: SessionRecord) -> int: ...

    @abc.abstractmethod
    async def session_ended(self, session_id: str, reason: str, ended_at: float,
                            bytes_in: int | None, bytes_out: int | None,
                            statements: int | None) -> int: ...

    @abc.abstractmethod
    async def statement_received(self, statement: StatementRecord, *,
                                 flushed: bool = True) -> int:
        """Record a statement before it is forwarded; returns once the record is durable,
        with the statement's id (which other records name it by).

        ``flushed=False`` returns once the record is written but maybe not yet on disk:
        the caller must await :meth:`records_flushed` before it forwards the statement.
        A pipeline of statements read at once then shares one flush instead of waiting
        for one per statement."""

    async def records_flushed(self) -> None:
        """Return once every record written so far is as durable as ``statement_received``
        makes one; raises AuditWriteError when that cannot be done."""
        return None

    @abc.abstractmethod
    async def statement_finished(self, statement_id: int, result: StatementResult, *,
                                 wait: bool = True) -> int | None:
        """Record how a statement ended.

        ``wait=False`` journals the record and returns at once (None): a killed gateway
        does not lose it, and under ``synchronous=FULL`` it reaches the disk with the next
        flush any session waits for. The client is not held for it.
        """

    @abc.abstractmethod
    async def masking_actions(self, statement_id: int, session_id: str,
                              actions: Sequence[MaskingAction],
                              at: float | None = None, *, wait: bool = True) -> int | None:
        """Record what masking did to one result; None when there was nothing to record
        (or ``wait=False``, as for ``statement_finished``)."""

    @abc.abstractmethod
    async def gateway_event(self, kind: str, data: dict[str, Any],
                            at: float | None = None) -> int: ...

    @abc.abstractmethod
    async def approval_requested(self, request: ApprovalRequest) -> int:
        """Record a pending approval; the returned number is the approval's id."""

    @abc.abstractmethod
    async def approval_decided(self, approval_id: int, approved: bool, scope: str | None,
                               decided_by: str, comment: str | None,
                               decided_at: float) -> ApprovalView:
        """Approve or deny a pending approval; ApprovalNotPending if it is no longer."""

    @abc.abstractmethod
    async def approval_closed(self, approval_id: int, status: str, at: float,
                              reason: str | None) -> ApprovalView:
        """Withdraw or expire a pending approval. If it was decided first, nothing is
        written and the returned view says how it was decided."""

    @abc.abstractmethod
    async def close_orphaned_sessions(self, reason: str, at: float | None = None) -> int:
        """End sessions (and withdraw their approvals) left open by a gateway that died."""

    @abc.abstractmethod
    async def prune(self, older_than: float, *, now: float | None = None,
                    dry_run: bool = False) -> PruneReport: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    # --- reads ---------------------------------------------------------------------------

    @abc.abstractmethod
    async def list_sessions(self, since: float | None = None, until: float | None = None,
                            identity: str | None = None, target: str | None = None,
                            decision: str | None = None, text: str | None = None,
                            limit: int = 100) -> list[SessionView]: ...

    @abc.abstractmethod
    async def get_session(self, session_id: str) -> SessionView | None: ...

    @abc.abstractmethod
    async def session_statements(self, session_id: str) -> list[StatementView]: ...

    @abc.abstractmethod
    async def pending_approvals(self) -> list[ApprovalView]: ...

    @abc.abstractmethod
    async def get_approval(self, approval_id: int) -> ApprovalView | None: ...

    @abc.abstractmethod
    async def get_approvals(self, approval_ids: Sequence[int]) -> dict[int, ApprovalView]: ...

    @abc.abstractmethod
    async def recent_masking(self, limit: int = 100) -> list[MaskingView]: ...

    @abc.abstractmethod
    async def verify(self, expect: Sequence[tuple[int, str]] = ()) -> VerifyReport: ...

    @abc.abstractmethod
    async def export(self, out: TextIO, *, format: str = "jsonl", what: str = "statements",
                     filters: Filters | None = None) -> int:
        """Write the trail to ``out`` (see docs/audit.md); returns the rows written."""


class NullAuditStore(AuditStore):
    """``audit: {enabled: false}``: nothing is recorded.

    Approvals still work inside this process (their state is kept in memory, so the broker
    behaves the same), but no other process can see or decide them. This exists for
    measuring what audit costs and for throwaway demos, never for production.
    """

    def __init__(self) -> None:
        self._seq = itertools.count(1)
        self._approvals: dict[int, ApprovalView] = {}

    async def session_started(self, session: SessionRecord) -> int:
        return next(self._seq)

    async def session_ended(self, session_id: str, reason: str, ended_at: float,
                            bytes_in: int | None, bytes_out: int | None,
                            statements: int | None) -> int:
        return next(self._seq)

    async def statement_received(self, statement: StatementRecord, *,
                                 flushed: bool = True) -> int:
        return next(self._seq)

    async def statement_finished(self, statement_id: int, result: StatementResult, *,
                                 wait: bool = True) -> int | None:
        return next(self._seq) if wait else None

    async def masking_actions(self, statement_id: int, session_id: str,
                              actions: Sequence[MaskingAction],
                              at: float | None = None, *, wait: bool = True) -> int | None:
        return next(self._seq) if actions and wait else None

    async def gateway_event(self, kind: str, data: dict[str, Any],
                            at: float | None = None) -> int:
        return next(self._seq)

    async def approval_requested(self, request: ApprovalRequest) -> int:
        approval_id = next(self._seq)
        self._approvals[approval_id] = ApprovalView(
            id=approval_id, session_id=request.session_id, statement_id=request.statement_id,
            subject=request.subject, groups=tuple(request.groups), sql=request.sql,
            params=json_params(request.params), fingerprint=request.fingerprint,
            rule_id=request.rule_id, reason=request.reason, created_at=request.created_at,
            expires_at=request.expires_at, binding_sha256=request.binding_sha256,
            status="pending", scope=None, decided_by=None, decided_at=None, comment=None)
        return approval_id

    def _pending(self, approval_id: int) -> ApprovalView:
        view = self._approvals.get(approval_id)
        if view is None:
            raise ApprovalNotFound(f"no approval #{approval_id}")
        if not view.pending:
            raise ApprovalNotPending(f"approval #{approval_id} is already {view.status}", view)
        return view

    async def approval_decided(self, approval_id: int, approved: bool, scope: str | None,
                               decided_by: str, comment: str | None,
                               decided_at: float) -> ApprovalView:
        view = replace(self._pending(approval_id), status="approved" if approved else "denied",
                       scope=scope if approved else None, decided_by=decided_by,
                       decided_at=decided_at, comment=comment)
        self._approvals[approval_id] = view
        return view

    async def approval_closed(self, approval_id: int, status: str, at: float,
                              reason: str | None) -> ApprovalView:
        try:
            view = self._pending(approval_id)
        except ApprovalNotPending as exc:
            assert exc.view is not None
            return exc.view
        view = replace(view, status=status, decided_at=at, comment=reason)
        self._approvals[approval_id] = view
        return view

    async def close_orphaned_sessions(self, reason: str, at: float | None = None) -> int:
        return 0

    async def prune(self, older_than: float, *, now: float | None = None,
                    dry_run: bool = False) -> PruneReport:
        return PruneReport(iso((now or time.time()) - older_than), dry_run, 0, 0, None, None,
                           None)

    async def close(self) -> None:
        self._approvals.clear()

    async def list_sessions(self, since: float | None = None, until: float | None = None,
                            identity: str | None = None, target: str | None = None,
                            decision: str | None = None, text: str | None = None,
                            limit: int = 100) -> list[SessionView]:
        return []

    async def get_session(self, session_id: str) -> SessionView | None:
        return None

    async def session_statements(self, session_id: str) -> list[StatementView]:
        return []

    async def pending_approvals(self) -> list[ApprovalView]:
        return sorted((v for v in self._approvals.values() if v.pending), key=lambda v: v.id)

    async def get_approval(self, approval_id: int) -> ApprovalView | None:
        return self._approvals.get(approval_id)

    async def get_approvals(self, approval_ids: Sequence[int]) -> dict[int, ApprovalView]:
        return {i: self._approvals[i] for i in approval_ids if i in self._approvals}

    async def recent_masking(self, limit: int = 100) -> list[MaskingView]:
        return []

    async def verify(self, expect: Sequence[tuple[int, str]] = ()) -> VerifyReport:
        report = VerifyReport()
        report.warnings.append("audit is disabled in the configuration; nothing to verify")
        return report

    async def export(self, out: TextIO, *, format: str = "jsonl", what: str = "statements",
                     filters: Filters | None = None) -> int:
        return 0

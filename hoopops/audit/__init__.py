"""The audit trail: an append-only, hash-chained record of sessions, statements,
approvals, masking and gateway events, kept apart from the database it describes.

    store = await open_store(config.audit)
    statement_id = await store.statement_received(StatementRecord(...))  # durable now
    ... forward, stream the result through a ResultSampler ...
    await store.statement_finished(statement_id, sampler.result(...))

See ``docs/audit.md`` for the record schema, the hash definition and the export format.
"""

from __future__ import annotations

from hoopops.audit.chain import (
    GENESIS,
    Problem,
    VerifyReport,
    canonical_json,
    json_text,
    record_hash,
)
from hoopops.audit.records import (
    ApprovalRequest,
    ApprovalView,
    Filters,
    MaskingAction,
    MaskingView,
    ResultSampler,
    SessionRecord,
    SessionView,
    StatementRecord,
    StatementResult,
    StatementView,
    approval_binding,
)
from hoopops.audit.sqlite import SQLiteAuditStore
from hoopops.audit.store import (
    ApprovalNotFound,
    ApprovalNotPending,
    AuditError,
    AuditStore,
    AuditStoreMissing,
    AuditWriteError,
    NullAuditStore,
    PruneReport,
)
from hoopops.config import AuditConfig


async def open_store(config: AuditConfig, *, create: bool = True,
                     synchronous: str = "FULL") -> AuditStore:
    """The store ``config`` describes: SQLite at ``config.path``, or a null store when
    audit is disabled. Raises AuditError (with the path and a fix) if it cannot open."""
    if not config.enabled:
        return NullAuditStore()
    return await SQLiteAuditStore.open(config.path, create=create,
                                       result_rows=config.result_rows,
                                       result_bytes=config.result_bytes,
                                       synchronous=synchronous)


__all__ = [
    "GENESIS",
    "ApprovalNotFound",
    "ApprovalNotPending",
    "ApprovalRequest",
    "ApprovalView",
    "AuditError",
    "AuditStore",
    "AuditStoreMissing",
    "AuditWriteError",
    "Filters",
    "MaskingAction",
    "MaskingView",
    "NullAuditStore",
    "Problem",
    "PruneReport",
    "ResultSampler",
    "SQLiteAuditStore",
    "SessionRecord",
    "SessionView",
    "StatementRecord",
    "StatementResult",
    "StatementView",
    "VerifyReport",
    "approval_binding",
    "canonical_json",
    "json_text",
    "open_store",
    "record_hash",
]

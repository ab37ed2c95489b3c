"""Masking: raw sensitive values never leave the gateway, whichever way a query asks.

Columns are masked by where their values *come from* (the catalog's origin of each
RowDescription column, and a parse-tree trace for computed columns), values by what they
*look like* (detectors), on every exit: DataRow in text and binary formats, COPY TO
STDOUT in text, CSV and binary, and the texts of errors, notices, notifications and
parameter statuses. Where the origin cannot be traced, the value is masked (or the
result refused). Only counts are recorded, never values.

How the relay drives it (``rules`` = ``MaskingRules.from_sections(policy.masking_sections,
config.masking.hmac_secret)``, ``catalog`` = one ``hoopops.proxy.catalog.Catalog`` per
upstream database; skip everything when ``not rules.enabled_for(identity)``):

1. Query / Parse: ``hints = await rules.analyze(sql, catalog, search_path, user)`` — one
   ``StatementSources`` per statement, in order; ``search_path`` is the session's latest
   ParameterStatus value (PostgreSQL 18 reports it), ``user`` the upstream role. Keep the
   list per prepared statement; cache by ``(sql, search_path)`` if you like. Remember
   ``hints.prepare`` / ``hints.cursor`` names: a later ``EXECUTE name`` / ``FETCH ... name``
   (whose ``outputs`` is None) must use the remembered hints, or its computed columns
   are masked.
2. RowDescription (for statement *i* of a simple Query: *i* = CommandCompletes seen so
   far): ``cols = columns_from_fields(fields)`` or ``parse_row_description(payload)``;
   for a portal ``apply_result_formats(cols, bind.result_formats)`` (a statement
   Describe always says text); ``cols = await catalog.resolve(cols, rules.trusted_functions)``;
   ``plan = rules.plan(identity, cols, hints[i])``. None: forward DataRows untouched.
   Keep the plan per portal: Execute may run again after PortalSuspended. DataRows with
   no RowDescription known (Execute without Describe) need one: Describe the portal
   yourself, or fail the statement.
3. DataRow: ``plan.rewrite_data_row(payload)``; or, the fast form for a relay holding
   many rows in its read buffer, ``out, end = plan.rewrite_rows_at(buffer, pos)``: every
   whole framed 'D' message from ``pos`` up to the first other or incomplete message,
   masked in one call (``plan.rewrite_data_rows(messages)`` when it holds nothing else).
4. CopyOutResponse: ``plan = rules.plan_copy(identity, payload, hints[i])``; each
   CopyData: ``out = plan.rewrite_copy_data(payload)`` (send nothing when ``b""``), or
   ``out, end = plan.rewrite_copy_at(buffer, pos)`` for all the whole 'd' messages at
   once (framed, one per row); CopyDone: ``plan.finish_copy()``.
5. CommandComplete / PortalSuspended / ErrorResponse: ``plan.take_actions()`` → audit
   record and the ``masking.applied`` event; ``catalog.note_command(tag)`` after
   CommandComplete (DDL empties its caches).
6. ErrorResponse / NoticeResponse: ``rules.rewrite_error(payload, identity,
   strict=rules.touches_sensitive(hints[i]))``; NotificationResponse:
   ``rules.rewrite_notification``; ParameterStatus: ``rules.rewrite_parameter_status``.
   Each returns ``(payload, actions)``.

``MaskingError`` (and ``MaskingRefused``, with SQLSTATE 42501) mean the statement must
end with an ErrorResponse, never with the data. What masking cannot fix (sensitive
columns in predicates, copies, placeholders written back, code it cannot see through)
goes to the policy engine before the decision: ``inference.with_masking_facts(analysis,
hints, rules, identity)`` sets ``StatementFacts.masking`` from ``rules.policy_facts``.
"""

from hoopops.masking.codec import (
    ColumnInfo,
    CopyResponse,
    apply_result_formats,
    build_data_row,
    columns_from_fields,
    parse_copy_response,
    parse_row_description,
    split_data_row,
)
from hoopops.masking.plan import ColumnDecision, MaskingAction, ResultPlan
from hoopops.masking.rewrite import MaskingError, MaskingRefused
from hoopops.masking.rules import MaskingFacts, MaskingRules
from hoopops.masking.sources import (
    CopyOptions,
    OutputSources,
    RelationInfo,
    RelationLookup,
    SourceColumn,
    StatementSources,
    analyze,
)
from hoopops.masking.strategies import Strategy

__all__ = [
    "ColumnDecision", "ColumnInfo", "CopyOptions", "CopyResponse", "MaskingAction",
    "MaskingError", "MaskingFacts", "MaskingRefused", "MaskingRules", "OutputSources",
    "RelationInfo", "RelationLookup", "ResultPlan", "SourceColumn", "StatementSources",
    "Strategy", "analyze", "apply_result_formats", "build_data_row", "columns_from_fields",
    "parse_copy_response",
    "parse_row_description", "split_data_row",
]

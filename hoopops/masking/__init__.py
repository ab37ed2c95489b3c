"""Masking: raw sensitive values never leave the gateway, whichever way a query asks.

Columns are masked by where their values *come from* (the catalog's origin of each
RowDescription column, and a parse-tree trace for computed columns), values by what they
*look like* (detectors), on every exit: DataRow in text and binary formats, COPY TO
STDOUT in text, CSV and binary, and the texts of errors, notices, notifications and
parameter statuses. Where the origin cannot be traced, the value is masked (or the
result refused). Only counts are recorded, never values.

How the relay uses it, per statement:

1. ``hints = await rules.analyze(sql, catalog)`` at Query/Parse (one entry per
   statement of a simple Query); keep the list per prepared statement.
2. At RowDescription: ``cols = await catalog.resolve(parse_row_description(payload))``
   (apply Bind's result formats with ``apply_result_formats`` for portals), then
   ``plan = rules.plan(identity, cols, hints[i])``; None means forward DataRows as bytes.
3. Each DataRow: ``payload = plan.rewrite_data_row(payload)``.
4. At CommandComplete / PortalSuspended / ErrorResponse: ``plan.take_actions()`` →
   audit and the ``masking.applied`` event.

See ``rules.MaskingRules`` for COPY, errors, notices, notifications and parameter status.
"""

from hoopops.masking.codec import (
    ColumnInfo,
    CopyResponse,
    apply_result_formats,
    build_data_row,
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
    "Strategy", "analyze", "apply_result_formats", "build_data_row", "parse_copy_response",
    "parse_row_description", "split_data_row",
]

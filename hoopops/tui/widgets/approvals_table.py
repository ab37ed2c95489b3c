"""Pending approvals, newest first, each with the time it has left."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from rich.text import Text

from hoopops.audit.records import ApprovalView
from hoopops.tui.format import countdown, one_line, plain
from hoopops.tui.widgets.keyed_table import KeyedTable


def approval_key(approval_id: int) -> str:
    return str(approval_id)


class ApprovalsTable(KeyedTable):
    """Keyed by approval id; the analyst's decision always names the row's key."""

    COLUMNS = (
        ("id", "#", 5),
        ("left", "left", 7),
        ("identity", "identity", 14),
        ("rule", "rule", 16),
        ("sql", "statement", 60),
    )

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.approvals: dict[str, ApprovalView] = {}

    def show(self, approvals: Sequence[ApprovalView], now: float,
             decided_here: Collection[int] = ()) -> None:
        """``decided_here``: approvals this console decided; when the selected one goes
        for that reason, the cursor moving on is expected, not a surprise to guard."""
        before = self.selected_key
        self.approvals = {approval_key(a.id): a for a in approvals}
        rows = [(approval_key(a.id), (
            Text(str(a.id), style="bold"), countdown(a.expires_at, now), plain(a.subject, 40),
            plain(a.rule_id or "—", 40), one_line(a.sql, 300)))
            for a in sorted(approvals, key=lambda a: a.id, reverse=True)]
        # Newest first: a new approval appears on top, the cursor stays on its row.
        self.sync(rows, sort_column="id", sort_key=lambda c: -int(c.plain))
        if before is not None and int(before) in decided_here:
            self.selection_moved_by_refresh = False

    @property
    def selected(self) -> ApprovalView | None:
        key = self.selected_key
        return self.approvals.get(key) if key is not None else None

"""A session's recorded statements (session detail)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from rich.text import Text
from textual.binding import Binding, BindingType

from hoopops.audit.records import StatementView
from hoopops.tui.format import clock, decision_text, one_line, plain
from hoopops.tui.widgets.keyed_table import KeyedTable


class StatementsTable(KeyedTable):
    COLUMNS = (
        ("seq", "#", 4),
        ("at", "time", 8),
        ("decision", "decision", 8),
        ("rule", "rule", 16),
        ("rows", "rows", 6),
        ("ms", "ms", 8),
        ("sql", "statement", 80),
    )

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter", "screen.replay_here", "Replay here", id="session.replay_here",
                tooltip="Open the replay at the selected statement"),
    ]

    def show(self, statements: Sequence[StatementView]) -> None:
        rows = []
        for s in statements:
            ms = Text(f"{s.duration_ms:.1f}") if s.duration_ms is not None else Text("—")
            rows.append((str(s.id), (
                Text(str(s.seq)), Text(clock(s.received_at)), decision_text(s.decision),
                plain(s.rule_id or "—", 40),
                Text("—" if s.rows is None else str(s.rows)), ms, one_line(s.sql, 300))))
        self.sync(rows)

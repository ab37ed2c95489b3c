"""A recorded result sample, exactly as the agent received it (masked)."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.widgets import DataTable

from hoopops.tui.format import plain


class ResultGrid(DataTable[Any]):
    """Columns and rows of a ``result_sample``; every cell is literal text."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("cursor_type", "row")
        kwargs.setdefault("zebra_stripes", True)
        super().__init__(**kwargs)
        self.truncated = False

    def show(self, sample: dict[str, Any] | None) -> None:
        # Each step is a different result with different columns: a full reset is right
        # here (nothing to keep), unlike the live tables.
        self.clear(columns=True)
        self.truncated = False
        if not sample:
            return
        columns = [str(c) for c in sample.get("columns") or []]
        for index, name in enumerate(columns):
            self.add_column(plain(name, 40), key=f"c{index}")
        for row in sample.get("rows") or []:
            cells = list(row)[: len(columns)]
            cells += [None] * (len(columns) - len(cells))
            self.add_row(*(plain(v, 200) for v in cells))
        self.truncated = bool(sample.get("truncated"))

    @staticmethod
    def caption(sample: dict[str, Any] | None, rows: int | None) -> Text:
        if not sample or not sample.get("columns"):
            return Text("no result rows recorded", style="dim")
        shown = len(sample.get("rows") or [])
        text = Text(f"{shown} row(s) recorded")
        if rows is not None and rows != shown:
            text.append(f" of {rows}", style="bold")
        if sample.get("truncated"):
            text.append(" (sample capped by audit.result_rows / result_bytes)", style="dim")
        return text

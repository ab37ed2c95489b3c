"""A DataTable updated in place by row key (the Dolphie lesson).

Refreshing by clearing and refilling a table throws away the analyst's cursor and scroll
position several times a second. ``KeyedTable.sync`` instead drops the rows that are
gone, ``update_cell``s only the cells that changed and adds the new rows, then puts the
cursor back on the row *key* it was on, wherever that row now sits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from rich.text import Text
from textual.widgets import DataTable
from textual.widgets.data_table import CellDoesNotExist, RowKey


class KeyedTable(DataTable[Any]):
    """Rows identified by a stable string key; see the module docstring."""

    # (key, label, width) for each column; width None sizes to content.
    COLUMNS: Sequence[tuple[str, str, int | None]] = ()

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("cursor_type", "row")
        kwargs.setdefault("zebra_stripes", False)
        super().__init__(**kwargs)
        self._cells: dict[str, tuple[Any, ...]] = {}
        #: Set when a refresh removed the row under the cursor, so the cursor now rests
        #: on a row the analyst did not choose. Cleared when they move it themselves.
        self.selection_moved_by_refresh = False
        #: How many times ``sync`` changed anything (tests assert no clear-and-refill).
        self.rows_added = 0
        self.rows_removed = 0
        self.cells_updated = 0

    def on_mount(self) -> None:
        self.ensure_columns()

    def ensure_columns(self) -> None:
        # Also called from sync(): data may arrive before this widget's Mount event.
        if not self.columns:
            for key, label, width in self.COLUMNS:
                self.add_column(label, key=key, width=width)

    # -- the cursor ----------------------------------------------------------------------

    @property
    def selected_key(self) -> str | None:
        """The key of the row under the cursor, read now (never cached)."""
        if self.row_count == 0 or not self.is_valid_row_index(self.cursor_row):
            return None
        try:
            row_key, _ = self.coordinate_to_cell_key(self.cursor_coordinate)
        except CellDoesNotExist:
            return None
        return row_key.value

    def select_key(self, key: str) -> bool:
        if key not in self._cells:
            return False
        self.move_cursor(row=self.get_row_index(key))
        return True

    def _user_moved(self) -> None:
        self.selection_moved_by_refresh = False

    def action_cursor_up(self) -> None:
        self._user_moved()
        super().action_cursor_up()

    def action_cursor_down(self) -> None:
        self._user_moved()
        super().action_cursor_down()

    def action_page_up(self) -> None:
        self._user_moved()
        super().action_page_up()

    def action_page_down(self) -> None:
        self._user_moved()
        super().action_page_down()

    def action_scroll_top(self) -> None:
        self._user_moved()
        super().action_scroll_top()

    def action_scroll_bottom(self) -> None:
        self._user_moved()
        super().action_scroll_bottom()

    # -- the diff ------------------------------------------------------------------------

    def sync(self, rows: Sequence[tuple[str, Sequence[Any]]],
             sort_column: str | None = None,
             sort_key: Callable[[Any], Any] | None = None, reverse: bool = False) -> None:
        """Make the table show exactly ``rows`` (key, cells), touching only differences.

        New rows are appended; pass ``sort_column``/``sort_key`` to keep an order other
        than arrival (approvals: newest first).
        """
        self.ensure_columns()
        wanted = {key: tuple(cells) for key, cells in rows}
        before = self.selected_key
        column_keys = [key for key, _, _ in self.COLUMNS]
        added = False
        with self.app.batch_update():
            for key in [k for k in self._cells if k not in wanted]:
                self.remove_row(key)
                del self._cells[key]
                self.rows_removed += 1
            for key, cells in wanted.items():
                old = self._cells.get(key)
                if old is None:
                    self.add_row(*cells, key=key)
                    self.rows_added += 1
                    added = True
                elif old != cells:
                    for column, was, now in zip(column_keys, old, cells, strict=True):
                        if was != now:
                            self.update_cell(key, column, now)
                            self.cells_updated += 1
                self._cells[key] = cells
            if added and sort_column is not None:
                self.sort(sort_column, key=sort_key, reverse=reverse)
            if before is not None and before in self._cells:
                index = self.get_row_index(before)
                if index != self.cursor_row:
                    self.move_cursor(row=index, animate=False)
            elif before is not None and self._cells:
                self.selection_moved_by_refresh = True

    def key_at(self, row_key: RowKey) -> str | None:
        return row_key.value


def cell(value: object) -> Text:
    """Shorthand for a literal cell (see ``format.plain``)."""
    from hoopops.tui.format import plain

    return plain(value)

"""Browse past sessions in the audit store; ``/`` filters, ``enter`` replays."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Input, Static

from hoopops.audit.records import Filters
from hoopops.tui.format import FilterError, parse_filter
from hoopops.tui.source import filters_summary
from hoopops.tui.widgets.history_table import HistoryTable

if TYPE_CHECKING:
    from hoopops.tui.app import ConsoleApp

LIMIT = 500


class FilterInput(Input):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "leave", "Cancel filter", id="history.filter_cancel", show=False),
    ]

    def action_leave(self) -> None:
        screen = self.screen
        if isinstance(screen, HistoryScreen):
            screen.close_filter(apply=False)


class HistoryScreen(Screen[None]):
    HELP_VIEW = "history"

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("slash", "filter", "Filter", id="history.filter", key_display="/",
                tooltip="Filter by identity:, target:, decision:, since:, until: or text"),
        Binding("e", "export", "Export", id="history.export",
                tooltip="Write the selected session's evidence to a JSON file"),
        Binding("r", "reload", "Reload", id="history.reload", show=False),
        Binding("x", "clear_filter", "Clear filter", id="history.clear", show=False),
    ]

    PALETTE: ClassVar[list[tuple[str, str, str]]] = [
        ("Filter history", "identity:, target:, decision:, since:, until:, text", "filter"),
        ("Clear filter", "Show all sessions again", "clear_filter"),
        ("Export evidence", "Write the selected session's evidence to JSON", "export"),
    ]

    def __init__(self, query: str = "") -> None:
        super().__init__(classes="history")
        self.query_text = query
        self.filters = Filters()
        self.table = HistoryTable(id="history-table")
        self.loaded = 0

    @property
    def console(self) -> ConsoleApp:
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        yield Static(Text("History", style="bold"), id="history-head")
        yield FilterInput(placeholder="identity:alice target:appdb decision:block since:2h "
                          "drop table", id="history-filter")
        with Vertical(id="history-panel", classes="panel"):
            yield self.table
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#history-filter").display = False
        if self.query_text:
            self._set_query(self.query_text)
        self.table.focus()
        self.load()

    def on_screen_resume(self) -> None:
        if self.is_mounted:
            self.load()

    def _set_query(self, query: str) -> bool:
        try:
            self.filters = parse_filter(query, self.console.clock())
        except FilterError as exc:
            self.notify(str(exc), title="Filter", severity="error", markup=False)
            return False
        self.query_text = query
        return True

    @work(group="history", exclusive=True, exit_on_error=False)
    async def load(self) -> None:
        sessions = await self.console.source.history(self.filters, LIMIT)
        self.loaded = len(sessions)
        self.table.show(sessions)
        self._show_head()
        self.refresh_bindings()

    def _show_head(self) -> None:
        head = Text("History ", style="bold")
        head.append(f"{self.loaded} session(s)")
        if self.loaded >= LIMIT:
            head.append(f" (newest {LIMIT}; narrow with /)", style="dim")
        summary = filters_summary(self.filters)
        if summary:
            head.append("  filter: ", style="dim")
            head.append(summary, style="bold yellow")
        self.query_one("#history-head", Static).update(head)

    # -- the filter ----------------------------------------------------------------------

    def action_filter(self) -> None:
        field = self.query_one("#history-filter", Input)
        field.value = self.query_text
        field.display = True
        field.focus()

    @on(Input.Submitted, "#history-filter")
    def _submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.close_filter(apply=True)

    def close_filter(self, apply: bool) -> None:
        field = self.query_one("#history-filter", Input)
        if apply and not self._set_query(field.value.strip()):
            return  # keep the input open so the analyst can fix it
        field.display = False
        self.table.focus()
        if apply:
            self.load()

    def action_clear_filter(self) -> None:
        self._set_query("")
        self.load()

    def action_reload(self) -> None:
        self.load()

    # -- drilling in ---------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("replay", "export"):
            return True if self.table.selected_key is not None else None
        return True

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        # A mouse click on a row (enter is the table's own binding).
        event.stop()
        self.action_replay()

    def action_replay(self) -> None:
        session_id = self.table.selected_key
        if session_id is not None:
            self.console.open_replay(session_id)

    def action_export(self) -> None:
        session_id = self.table.selected_key
        if session_id is not None:
            self._export(session_id)

    @work(group="export", exit_on_error=False)
    async def _export(self, session_id: str) -> None:
        from hoopops.tui.source import SourceError

        app = self.console
        try:
            path, count = await app.source.export_session(session_id, app.export_dir,
                                                          app.decided_by, now=app.clock())
        except (SourceError, OSError) as exc:
            self.notify(f"Export failed: {exc}", severity="error", markup=False)
            return
        app.actions.append(f"exported {session_id} to {path}")
        self.notify(f"Evidence for {count} statement(s) written to {path}", title="Exported",
                    markup=False, timeout=10)

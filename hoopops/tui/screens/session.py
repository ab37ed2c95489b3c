"""One live (or past) session: who it is, and every statement it has sent so far."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from rich.table import Table
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import DataTable, Footer, Static

from hoopops.audit.records import SessionView
from hoopops.tui.format import ago, one_line, plain, stamp, state_text
from hoopops.tui.screens.confirm import Confirm
from hoopops.tui.widgets.statements_table import StatementsTable

if TYPE_CHECKING:
    from hoopops.tui.app import ConsoleApp


class SessionScreen(Screen[None]):
    HELP_VIEW = "session"

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("r", "replay_start", "Replay", id="session.replay",
                tooltip="Replay the session from its first statement"),
        Binding("k", "kill_session", "Kill", id="session.kill",
                tooltip="End this session (asks first)"),
    ]

    def __init__(self, session_id: str) -> None:
        super().__init__(classes="session")
        self.session_id = session_id
        self.table = StatementsTable(id="session-statements")
        self._timer: Timer | None = None

    @property
    def console(self) -> ConsoleApp:
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        yield Static(Text(f"Session {self.session_id[:12]}", style="bold"), id="session-head")
        with Vertical(id="session-panel", classes="panel"):
            yield self.table
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#session-panel").border_title = "Statements (from the audit trail)"
        self.table.focus()
        self.load()

    @property
    def live(self) -> bool:
        return any(s.id == self.session_id for s in self.console.sessions)

    @work(group="session", exclusive=True, exit_on_error=False)
    async def load(self) -> None:
        try:
            source = self.console.source
            view = await source.session(self.session_id)
            statements = await source.statements(self.session_id)
            self.table.show(statements)
            self._show_head(view)
            self.refresh_bindings()
        finally:
            # Self-rescheduling while the session is live; a past one does not change.
            if self.is_mounted and self.live and self.console.live_updates:
                self._timer = self.set_timer(2.0, self.load, name="session-refresh")

    def _show_head(self, view: SessionView | None) -> None:
        app = self.console
        now = app.clock()
        live = next((s for s in app.sessions if s.id == self.session_id), None)
        grid = Table.grid(padding=(0, 1))
        grid.add_column(style="bold", no_wrap=True)
        grid.add_column()
        if live is not None:
            grid.add_row("identity", plain(f"{live.subject} ({', '.join(live.groups)})"))
            grid.add_row("client", plain(f"{live.client}  {live.application}"))
            grid.add_row("target", plain(live.target))
            row = state_text(live.state)
            row.append(f"   since {ago(live.started_at, now)}   {live.statements} statements, "
                       f"{live.blocked} refused")
            grid.add_row("state", row)
            grid.add_row("last", one_line(live.last_sql, 300))
        elif view is not None:
            grid.add_row("identity", plain(f"{view.subject} ({', '.join(view.groups)})"))
            grid.add_row("client", plain(f"{view.client_addr}:{view.client_port}  "
                                         f"{view.application_name or ''}"))
            grid.add_row("target", plain(view.target))
            ended = (f"{stamp(view.ended_at)}Z {view.end_reason or ''}"
                     if view.ended_at is not None else "open")
            grid.add_row("ended", plain(ended))
        else:
            grid.add_row("session", Text("not live and not in the audit store", style="dim"))
        head = Table.grid()
        head.add_row(Text(f"Session {self.session_id}", style="bold"))
        head.add_row(grid)
        self.query_one("#session-head", Static).update(head)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.action_replay_here()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "kill_session":
            return True if self.console.source.can_kill and self.live else None
        if action in ("replay_here", "replay_start"):
            return True if self.table.row_count else None
        return True

    def action_replay_here(self) -> None:
        index = self.table.cursor_row if self.table.row_count else 0
        self.console.open_replay(self.session_id, step=max(0, index))

    def action_replay_start(self) -> None:
        self.console.open_replay(self.session_id, step=0)

    def action_kill_session(self) -> None:
        session_id = self.session_id  # fixed for this screen
        question = Text("Kill session ", style="bold")
        question.append(session_id[:12])
        question.append("?")

        def answered(yes: bool | None) -> None:
            if yes:
                self.console.kill_session(session_id)

        self.app.push_screen(Confirm(question), answered)

"""The analyst's home: status, live sessions, pending approvals, masking hits."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer

from hoopops.tui.format import one_line, plain
from hoopops.tui.screens.confirm import Confirm
from hoopops.tui.screens.deny_prompt import DenyPrompt
from hoopops.tui.widgets.approval_detail import ApprovalDetail
from hoopops.tui.widgets.approvals_table import ApprovalsTable
from hoopops.tui.widgets.masking_feed import MaskingFeed
from hoopops.tui.widgets.sessions_table import SessionsTable
from hoopops.tui.widgets.status_bar import StatusBar

if TYPE_CHECKING:
    from hoopops.tui.app import ConsoleApp


class DashboardScreen(Screen[None]):
    """See the module docstring. Data arrives from the app (``render_state``)."""

    HELP_VIEW = "dashboard"

    # Screen bindings, so a/s/d work whichever panel has focus: at 3 a.m. the analyst
    # should not have to tab to the approvals list first.
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("a", "approve('once')", "Approve", id="approvals.approve_once",
                tooltip="Approve the selected held statement, this once"),
        Binding("s", "approve('session')", "Session", id="approvals.approve_session",
                tooltip="Approve this statement's fingerprint for the rest of the session"),
        Binding("d", "deny", "Deny", id="approvals.deny",
                tooltip="Deny the selected held statement (optional reason)"),
        Binding("p", "pause", "Pause", id="dashboard.pause", show=False,
                tooltip="Freeze the sessions table and masking feed (approvals keep "
                "updating)"),
        Binding("1", "focus_panel('sessions')", "Sessions", id="dashboard.focus_sessions",
                show=False),
        Binding("2", "focus_panel('approvals')", "Approvals", id="dashboard.focus_approvals",
                show=False),
        Binding("3", "focus_panel('masking-log')", "Masking", id="dashboard.focus_masking",
                show=False),
    ]

    # Wider terminals put the masking feed beside the sessions instead of below.
    HORIZONTAL_BREAKPOINTS: ClassVar[list[tuple[int, str]] | None] = [
        (0, "-narrow"), (140, "-wide")]

    def __init__(self) -> None:
        super().__init__(id="dashboard")
        self.status_bar = StatusBar(id="status")
        self.sessions = SessionsTable(id="sessions")
        self.approvals = ApprovalsTable(id="approvals")
        self.detail = ApprovalDetail(id="approval-detail")
        self.masking = MaskingFeed(id="masking")
        #: Set once mounted; the app renders into it only from then on.
        self.ready = False
        self._enabled: tuple[bool, bool] | None = None

    @property
    def console(self) -> ConsoleApp:
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        yield self.status_bar
        with Vertical(id="dash"):
            with Horizontal(id="top"):
                with Vertical(id="sessions-panel", classes="panel"):
                    yield self.sessions
                with Vertical(id="masking-panel", classes="panel"):
                    yield self.masking
            with Horizontal(id="approvals-panel", classes="panel"):
                yield self.approvals
                yield self.detail
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#sessions-panel").border_title = "Live sessions"
        self.query_one("#masking-panel").border_title = "Masking hits"
        self.query_one("#approvals-panel").border_title = "Pending approvals"
        self.sessions.focus()
        self.ready = True
        # Whatever the app already knows (a refresh may have finished before we mounted).
        self.console.render_dashboard()

    def on_screen_resume(self) -> None:
        if self.ready:
            self.console.render_dashboard()

    # -- rendering (called by the app after each refresh) --------------------------------

    def render_state(self, now: float, *, live: bool = True) -> None:
        app = self.console
        self.status_bar.show(app.status_info, app.counters)
        if live:
            self.sessions.show(app.sessions, now)
            self._title("#sessions-panel", f"Live sessions ({len(app.sessions)})")
        had_focus_target = self.approvals.row_count
        self.approvals.show(app.approvals, now, app.decided_here)
        self._title("#approvals-panel", f"Pending approvals ({len(app.approvals)})")
        if not had_focus_target and self.approvals.row_count and self.focused is None:
            self.approvals.focus()
        self._show_detail(now)
        # Footer keys dim when nothing is selected; only redraw it when that changes.
        enabled = (self.approvals.selected is not None, self.sessions.selected_key is not None)
        if enabled != self._enabled:
            self._enabled = enabled
            self.refresh_bindings()

    def _title(self, panel: str, title: str) -> None:
        widget = self.query_one(panel)
        if widget.border_title != title:  # setting it repaints the panel
            widget.border_title = title

    def _show_detail(self, now: float) -> None:
        approval = self.approvals.selected
        facts = self.console.facts_for(approval) if approval is not None else None
        target = self.console.target_of(approval.session_id) if approval is not None else None
        self.detail.show(approval, now, facts, target)

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.data_table is self.approvals:
            self._show_detail(self.console.clock())

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if event.data_table is self.sessions:
            self.action_open_session()

    # -- actions -------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("approve", "deny"):
            return True if self.approvals.selected is not None else None
        if action == "kill_session":
            if not self.console.source.can_kill:
                return None
            return True if self.sessions.selected_key is not None else None
        if action == "open_session":
            return True if self.sessions.selected_key is not None else None
        return True

    def _captured_approval(self) -> int | None:
        """The approval id under the cursor *now*, at the key press."""
        if self.approvals.selection_moved_by_refresh:
            # The one the analyst was looking at was settled elsewhere (or expired) and
            # the cursor slid onto another: make them look before deciding that one.
            self.approvals.selection_moved_by_refresh = False
            selected = self.approvals.selected
            if selected is not None:
                self.notify(f"The approval you had selected is gone; #{selected.id} is now "
                            "selected. Press again to act on it.", severity="warning",
                            markup=False)
            return None
        selected = self.approvals.selected
        return selected.id if selected is not None else None

    def action_approve(self, scope: str) -> None:
        approval_id = self._captured_approval()
        if approval_id is not None:
            self.console.decide(approval_id, approve=True, scope=scope)

    def action_deny(self) -> None:
        approval_id = self._captured_approval()
        if approval_id is None:
            return
        approval = self.approvals.approvals.get(str(approval_id))
        if approval is None:
            return

        def denied(reason: str | None) -> None:
            if reason is not None:  # None: cancelled with esc, nothing is denied
                self.console.decide(approval_id, approve=False, scope=None,
                                    comment=reason or None)

        self.app.push_screen(DenyPrompt(approval), denied)

    def action_kill_session(self) -> None:
        session_id = self.sessions.selected_key
        if session_id is None:
            return
        live = {s.id: s for s in self.console.sessions}.get(session_id)
        who = live.subject if live is not None else "?"
        question = Text("Kill session ", style="bold")
        question.append(session_id[:12])
        question.append(" of ")
        question.append_text(plain(who, 80, layout=False, style="bold"))
        question.append("?")
        detail = Text("The agent gets a FATAL error and its running query is cancelled.",
                      style="dim")
        if live is not None and live.last_sql:
            detail.append("\nlast: ")
            detail.append_text(one_line(live.last_sql, 120))

        def answered(yes: bool | None) -> None:
            if yes:
                self.console.kill_session(session_id)

        self.app.push_screen(Confirm(question, detail), answered)

    def action_open_session(self) -> None:
        session_id = self.sessions.selected_key
        if session_id is not None:
            self.console.open_session(session_id)

    def action_pause(self) -> None:
        self.console.toggle_pause()

    def action_focus_panel(self, panel: str) -> None:
        self.query_one(f"#{panel}").focus()


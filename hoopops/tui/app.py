"""The hoopops console: a Textual app the on-call analyst keeps open beside the gateway.

It runs in the gateway's own event loop (``hoopops console``), so it must never make that
loop wait: store reads and writes happen in workers (aiosqlite does the I/O in its own
thread), the refresh is a self-rescheduling timer so fetches never overlap, bus events
are drained in batches at most ten times a second however busy the gateway is, and the
screen is repainted about once a second (a repaint of a big terminal costs tens of
milliseconds of the loop the gateway relays on; see ``_queue_hits``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

from rich.text import Text
from textual import work
from textual.app import App, SystemCommand
from textual.binding import Binding, BindingType
from textual.notifications import SeverityLevel
from textual.screen import ModalScreen, Screen
from textual.timer import Timer
from textual.worker import Worker, WorkerState

from hoopops import events
from hoopops.audit.records import ApprovalView
from hoopops.display import terminal
from hoopops.tui.format import one_line
from hoopops.tui.screens.confirm import Confirm
from hoopops.tui.screens.connect import ConnectScreen
from hoopops.tui.screens.dashboard import DashboardScreen
from hoopops.tui.screens.deny_prompt import DenyPrompt
from hoopops.tui.screens.help import HelpScreen
from hoopops.tui.source import ConsoleSource, LiveSession, SourceError, default_decider
from hoopops.tui.widgets.masking_feed import MaskingHit, hits_from_event, hits_from_views
from hoopops.tui.widgets.status_bar import Counters

log = logging.getLogger("hoopops.tui")

# The bus kinds the console listens to. Not statement.*: those come once per statement,
# and the console learns rates from session counters instead, so watching costs the
# gateway nothing per statement.
WATCHED = (
    events.SESSION_STARTED, events.SESSION_ENDED, events.APPROVAL_REQUESTED,
    events.APPROVAL_DECIDED, events.MASKING_APPLIED, events.POLICY_RELOADED,
    events.GATEWAY_ERROR, events.GATEWAY_STOPPED,
)


# Seconds between masking feed updates (see ConsoleApp._queue_hits).
HIT_FLUSH_INTERVAL = 1.0
# Masking hits kept while paused (the feed shows at most this many lines anyway).
MAX_BUFFERED_HITS = 2000


class ConsoleApp(App[None]):
    """See the module docstring."""

    TITLE = "hoopops console"
    CSS_PATH = "hoopops.tcss"
    ENABLE_COMMAND_PALETTE = True

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("h", "history", "History", id="app.history",
                tooltip="Past sessions from the audit store"),
        Binding("question_mark", "help", "Help", id="app.help", key_display="?",
                tooltip="What this view shows and every key it takes"),
        Binding("c", "connect_info", "Connect", id="app.connect", show=False),
        Binding("q", "quit_console", "Quit", id="app.quit", show=False,
                tooltip="Quit the console (asks first: the gateway stops with it)"),
        Binding("escape", "back", "Back", id="app.back"),
    ]

    def __init__(self, source: ConsoleSource, *, clock: Callable[[], float] = time.time,
                 keymap: dict[str, str] | None = None, decided_by: str | None = None,
                 export_dir: Path | None = None, refresh_interval: float = 1.0,
                 connect_line: str | None = None, connect_note: str = "",
                 live_updates: bool = True) -> None:
        super().__init__()
        self.source = source
        self.clock = clock
        self.decided_by = decided_by or default_decider()
        self.export_dir = export_dir or Path.cwd()
        self.refresh_interval = refresh_interval
        self.connect_line = connect_line
        self.connect_note = connect_note
        # Tests (and snapshots) switch the timers and the bus pump off and feed state
        # themselves, the memray lesson: deterministic, and no sleeping in tests.
        self.live_updates = live_updates
        self.status_info = source.status()
        self.counters = Counters(policy_version=self.status_info.policy_version)
        self.sessions: list[LiveSession] = []
        self.approvals: list[ApprovalView] = []
        self.paused = False
        self._buffered_hits: list[MaskingHit] = []
        self._known_approvals: set[int] | None = None
        self._facts: dict[int, dict[str, Any] | None] = {}
        self._event_facts: dict[int, dict[str, Any]] = {}
        self._event_seq = 0
        self._hit_buffer: list[MaskingHit] = []
        self._hit_timer: Timer | None = None
        self._hit_flushed_at = 0.0
        self._last_counts: dict[str, tuple[int, int]] = {}
        self._last_count_at: float | None = None
        self._refresh_timer: Timer | None = None
        self._refreshing = False
        self._refresh_again = False
        self._refresh_error: str | None = None
        self._refreshed_at = 0.0
        self._unknown_keymap = self._apply_keymap(keymap or {})
        self.dashboard = DashboardScreen()
        #: Approvals decided from this console (their rows going away is expected).
        self.decided_here: set[int] = set()
        #: What the console did lately ("denied #4", "killed ..."), for tests and the log.
        self.actions: deque[str] = deque(maxlen=500)
        #: The sandbox DSN typed into the prompt (when hoopops.yaml names none); memory
        #: only, never shown.
        self.sandbox_dsn: str | None = None

    # -- start and stop ------------------------------------------------------------------

    def notify(self, message: str, *, title: str = "", severity: SeverityLevel = "information",
               timeout: float | None = None, markup: bool = True) -> None:
        """Every toast goes through here (screens' and widgets' ``notify`` too). Many
        quote agent text (a subject, a statement, an error): never markup, and escapes
        spelled out (``hoopops.display``), whatever the caller passed."""
        super().notify(terminal(message, layout=True), title=terminal(title),
                       severity=severity, timeout=timeout, markup=False)

    def _apply_keymap(self, keymap: dict[str, str]) -> list[str]:
        known = binding_ids()
        self.set_keymap({k: v for k, v in keymap.items() if k in known})
        return sorted(k for k in keymap if k not in known)

    def get_default_screen(self) -> Screen[Any]:
        return self.dashboard

    def on_mount(self) -> None:
        if self._unknown_keymap:
            self.notify("console.keymap names unknown binding ids: "
                        + ", ".join(self._unknown_keymap) + " (press ? for the ids)",
                        severity="warning", markup=False, timeout=10)
        self.render_dashboard()
        if self.live_updates:
            if self.source.bus is not None:
                self._pump_events()
            self._preload_masking()
            self.request_refresh()
        if self.connect_line:
            self.push_screen(ConnectScreen(self.connect_line, self.connect_note))

    async def on_unmount(self) -> None:
        if self._refresh_timer is not None:
            self._refresh_timer.stop()

    # -- refresh: self-rescheduling, never overlapping (the Dolphie lesson) -------------

    def request_refresh(self) -> None:
        """Refresh now, or right after the refresh in flight."""
        if self._refreshing:
            self._refresh_again = True
            return
        if self._refresh_timer is not None:
            self._refresh_timer.stop()
            self._refresh_timer = None
        self._refreshing = True
        self._refresh_worker()

    def _schedule_refresh(self, delay: float) -> None:
        if not self.live_updates or not self.is_running:
            return
        self._refresh_timer = self.set_timer(delay, self.request_refresh,
                                             name="console-refresh")

    @work(group="refresh", exit_on_error=False)
    async def _refresh_worker(self) -> None:
        try:
            await self.refresh_once()
            if self._refresh_error is not None:
                self._refresh_error = None
                self.notify("The console is reading the gateway and store again.",
                            markup=False)
        except Exception as exc:  # keep refreshing; say so once, not every second
            message = f"{type(exc).__name__}: {exc}"
            if message != self._refresh_error:
                self._refresh_error = message
                log.error("console refresh failed: %s", message)
                self.notify(message, title="Refresh failed", severity="error",
                            markup=False, timeout=10)
        finally:
            self._refreshing = False
            again, self._refresh_again = self._refresh_again, False
            self._schedule_refresh(0.05 if again else self.refresh_interval)

    async def refresh_once(self) -> None:
        """One fetch of everything the dashboard shows, then one render."""
        self._refreshed_at = time.monotonic()
        self.status_info = self.source.status()
        sessions = await self.source.live_sessions()
        approvals = await self.source.pending_approvals()
        hits: list[MaskingHit] = []
        if self.source.bus is None:
            hits = hits_from_views(await self.source.recent_masking(200))
        self.apply(sessions, approvals, hits)

    def apply(self, sessions: list[LiveSession], approvals: list[ApprovalView],
              hits: Iterable[MaskingHit] = ()) -> None:
        """Take a fresh snapshot and show it (tests call this directly)."""
        now = self.clock()
        self._update_rates(sessions, now)
        self.sessions = sessions
        self._announce_new(approvals)
        self.approvals = approvals
        self.counters.sessions = len(sessions)
        self.counters.pending = len(approvals)
        self.add_masking_hits(hits)
        self.render_dashboard()

    def render_dashboard(self) -> None:
        self.counters.paused = self.paused
        self.counters.buffered = len(self._buffered_hits)
        if not self.dashboard.ready or not self.screen_stack:
            # Not drawn yet, or the app is closing (a refresh in flight may land after
            # the last screen has gone).
            return
        if isinstance(self.screen, DenyPrompt | Confirm) and self.screen_stack[-2:-1] == [
                self.dashboard]:
            # A decision prompt is open over the dashboard (the Dolphie rule: keep still
            # behind it). The data is fetched and new approvals still ring; the tables
            # catch up when the prompt closes (DashboardScreen.on_screen_resume).
            return
        self.dashboard.render_state(self.clock(), live=not self.paused)

    def _update_rates(self, sessions: list[LiveSession], now: float) -> None:
        counts = {s.id: (s.statements, s.blocked) for s in sessions}
        if self._last_count_at is not None and now > self._last_count_at:
            elapsed = now - self._last_count_at
            statements = blocked = 0
            for session_id, (n, b) in counts.items():
                was_n, was_b = self._last_counts.get(session_id, (0, 0))
                statements += max(0, n - was_n)
                blocked += max(0, b - was_b)
            # Smoothed, so the figure is readable rather than flickering.
            self.counters.statements_per_s = (0.5 * self.counters.statements_per_s
                                              + 0.5 * statements / elapsed)
            self.counters.blocked_per_s = (0.5 * self.counters.blocked_per_s
                                           + 0.5 * blocked / elapsed)
        self._last_counts = counts
        self._last_count_at = now

    def _announce_new(self, approvals: list[ApprovalView]) -> None:
        ids = {a.id for a in approvals}
        if self._known_approvals is not None:
            fresh = [a for a in approvals if a.id not in self._known_approvals]
        else:
            fresh = list(approvals)
        self._known_approvals = ids
        if not fresh:
            return
        self.bell()
        for approval in sorted(fresh, key=lambda a: a.id)[-3:]:
            message = f"#{approval.id} {approval.subject}: {one_line(approval.sql, 70).plain}"
            self.notify(message, title="Approval needed", severity="warning", markup=False,
                        timeout=8)

    # -- the bus (gateway in this process) -------------------------------------------

    @work(group="events", exit_on_error=False)
    async def _pump_events(self) -> None:
        bus = self.source.bus
        assert bus is not None
        subscription = bus.subscribe(WATCHED, maxsize=5000)
        try:
            while True:
                first = await subscription.get()
                batch = [first, *subscription.drain()]
                self.handle_events(batch)
                # Coalesce and back off (the Toolong lesson): one update per 100 ms, and
                # fewer still while the gateway is busy, so a flood of masking events
                # costs the gateway (which shares this loop) next to nothing.
                await asyncio.sleep(0.1 if len(batch) < 50 else 0.5)
        finally:
            subscription.close()

    def handle_events(self, batch: list[events.Event]) -> None:
        refresh = urgent = False
        hits: list[MaskingHit] = []
        for event in batch:
            kind, data = event.kind, event.data
            if kind == events.MASKING_APPLIED:
                self._event_seq += 1
                hits += hits_from_event(data, event.at, self._event_seq)
            elif kind == events.APPROVAL_REQUESTED:
                facts = data.get("facts")
                if isinstance(facts, dict) and "approval_id" in data:
                    self._event_facts[int(data["approval_id"])] = facts
                refresh = urgent = True
            elif kind == events.APPROVAL_DECIDED:
                refresh = urgent = True
            elif kind in (events.SESSION_STARTED, events.SESSION_ENDED):
                refresh = True
            elif kind == events.POLICY_RELOADED:
                error = data.get("error")
                self.counters.policy_error = str(error) if error else None
                if data.get("version") is not None:
                    self.counters.policy_version = str(data["version"])
                if error:
                    self.notify(f"Policy reload failed (the previous policy stays in force): "
                                f"{error}", severity="error", markup=False, timeout=15)
            elif kind == events.GATEWAY_ERROR:
                self.notify(f"{data.get('where', 'gateway')}: {data.get('message', '')}",
                            title="Gateway error", severity="error", markup=False)
            elif kind == events.GATEWAY_STOPPED:
                self.counters.gateway_error = "gateway stopped"
        if hits:
            self._queue_hits(hits)
        # An approval cannot wait for the next tick; sessions coming and going can (a
        # client that connects per statement must not make the console repaint 10x/s).
        if urgent or (refresh and time.monotonic() - self._refreshed_at > 0.5):
            self.request_refresh()

    def _queue_hits(self, hits: list[MaskingHit]) -> None:
        """Feed updates at most once a second: each one re-lays out the screen, and the
        screen shares the gateway's loop. Hits in between are merged (``coalesce``)."""
        self._hit_buffer += hits
        if self._hit_timer is None:
            wait = max(0.01, HIT_FLUSH_INTERVAL - (time.monotonic() - self._hit_flushed_at))
            self._hit_timer = self.set_timer(wait, self._flush_hits, name="masking-flush")

    def _flush_hits(self) -> None:
        self._hit_timer = None
        self._hit_flushed_at = time.monotonic()
        hits, self._hit_buffer = self._hit_buffer, []
        self.add_masking_hits(coalesce(hits))

    @work(group="refresh", exit_on_error=False)
    async def _preload_masking(self) -> None:
        if self.source.bus is not None and self.source.store is not None:
            self.add_masking_hits(hits_from_views(await self.source.recent_masking(50)))

    def add_masking_hits(self, hits: Iterable[MaskingHit]) -> None:
        hits = list(hits)
        if not hits:
            return
        if self.paused:
            # Bounded: a long pause on a busy gateway keeps the newest window only.
            self._buffered_hits = (self._buffered_hits + hits)[-MAX_BUFFERED_HITS:]
            return
        self.dashboard.masking.add(hits)

    # -- what screens ask of the app ---------------------------------------------------

    def facts_for(self, approval: ApprovalView) -> dict[str, Any] | None:
        """Tables and columns a held statement touches: from its event, else analysed
        here (cached; one parse for the selected approval only)."""
        if approval.id in self._event_facts:
            return self._event_facts[approval.id]
        if approval.id not in self._facts:
            self._facts[approval.id] = analyse(approval.sql)
        return self._facts[approval.id]

    def target_of(self, session_id: str) -> str | None:
        for session in self.sessions:
            if session.id == session_id:
                return session.target
        return None

    def toggle_pause(self) -> None:
        self.paused = not self.paused
        if not self.paused and self._buffered_hits:
            hits, self._buffered_hits = self._buffered_hits, []
            self.dashboard.masking.add(hits)
        self.render_dashboard()
        self.actions.append("paused" if self.paused else "resumed")

    def decide(self, approval_id: int, *, approve: bool, scope: str | None,
               comment: str | None = None) -> Worker[None]:
        """Decide one approval, named by id (captured when the key was pressed)."""
        return self._decide(approval_id, approve, scope, comment)

    @work(group="decide", exit_on_error=False)
    async def _decide(self, approval_id: int, approve: bool, scope: str | None,
                      comment: str | None) -> None:
        verb = ("approved for the session" if scope == "session" else "approved once") \
            if approve else "denied"
        self.decided_here.add(approval_id)
        try:
            await self.source.decide(approval_id, approve, scope, self.decided_by, comment)
        except SourceError as exc:
            self.notify(str(exc), title=f"Approval #{approval_id} not {verb.split()[0]}",
                        severity="error", markup=False, timeout=10)
            self.actions.append(f"failed #{approval_id}: {exc}")
            return
        self.actions.append(f"{verb} #{approval_id}")
        self.notify(f"#{approval_id} {verb}" + (f": {comment}" if comment else ""),
                    severity="information", markup=False)
        self.request_refresh()

    def kill_session(self, session_id: str) -> bool:
        try:
            killed = self.source.kill_session(session_id)
        except SourceError as exc:
            self.notify(str(exc), severity="error", markup=False)
            return False
        if killed:
            self.actions.append(f"killed {session_id}")
            self.notify(f"Session {session_id[:12]} killed.", markup=False)
        else:
            self.notify(f"Session {session_id[:12]} had already ended.", severity="warning",
                        markup=False)
        self.request_refresh()
        return killed

    def open_session(self, session_id: str) -> None:
        from hoopops.tui.screens.session import SessionScreen

        self.push_screen(SessionScreen(session_id))

    def open_replay(self, session_id: str, step: int = 0) -> None:
        from hoopops.tui.screens.replay import ReplayScreen

        self.push_screen(ReplayScreen(session_id, step=step))

    # -- app-wide actions ----------------------------------------------------------------

    def action_history(self) -> None:
        from hoopops.tui.screens.history import HistoryScreen

        if not isinstance(self.screen, HistoryScreen):
            self.push_screen(HistoryScreen())

    def action_back(self) -> None:
        if len(self.screen_stack) > 1 and not isinstance(self.screen, ModalScreen):
            self.pop_screen()

    def action_help(self) -> None:
        if isinstance(self.screen, HelpScreen):
            return
        view = getattr(self.screen, "HELP_VIEW", "dashboard")
        self.push_screen(HelpScreen(view, self.key_rows()))

    def key_rows(self) -> list[tuple[str, str, str]]:
        """The console's own keys on the current screen, as remapped, for ``?``.

        Only bindings with an id (ours): Textual's generic ones (cursor, page, copy) would
        bury the few that matter."""
        rows: dict[str, tuple[str, str, str]] = {}
        for active in self.screen.active_bindings.values():
            binding = active.binding
            if not binding.id or binding.id in rows:
                continue
            rows[binding.id] = (self.get_key_display(binding),
                                binding.tooltip or binding.description, binding.id)
        return sorted(rows.values(), key=lambda r: r[2])

    def action_connect_info(self) -> None:
        if self.connect_line and not isinstance(self.screen, ConnectScreen):
            self.push_screen(ConnectScreen(self.connect_line, self.connect_note))

    def action_quit_console(self) -> None:
        if self.source.bus is None:
            self.exit()
            return
        question = Text("Quit hoopops console?", style="bold")
        detail = Text(f"The gateway in this process stops: {len(self.sessions)} live "
                      "session(s) are closed and held statements are withdrawn.")

        def answered(yes: bool | None) -> None:
            if yes:
                self.exit()

        self.push_screen(Confirm(question, detail), answered)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "back":
            # Hidden on the dashboard: there is nowhere to go back to.
            return len(self.screen_stack) > 1
        if action == "connect_info":
            return self.connect_line is not None
        if action == "history":
            from hoopops.tui.screens.history import HistoryScreen

            if isinstance(self.screen, HistoryScreen):
                return False
            return True if self.source.store is not None else None
        return True

    def get_system_commands(self, screen: Screen[Any]) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield SystemCommand("Dashboard", "Back to live sessions and approvals",
                            self._to_dashboard)
        if self.source.store is not None:
            yield SystemCommand("History", "Browse past sessions in the audit store",
                                self.action_history)
        if isinstance(screen, DashboardScreen):
            yield SystemCommand("Approve once", "Approve the selected held statement",
                                lambda: screen.run_action("approve('once')"))
            yield SystemCommand("Approve for session", "Approve this fingerprint for the "
                                "rest of the session",
                                lambda: screen.run_action("approve('session')"))
            yield SystemCommand("Deny", "Deny the selected held statement",
                                lambda: screen.run_action("deny"))
            if self.source.can_kill:
                yield SystemCommand("Kill session", "End the selected live session",
                                    lambda: screen.run_action("kill_session"))
            yield SystemCommand("Pause / resume", "Freeze or resume the live tables",
                                self.toggle_pause)
        for name, help_text, action in getattr(screen, "PALETTE", ()):
            yield SystemCommand(name, help_text,
                                lambda action=action: screen.run_action(action))
        reload_policy = getattr(self.source, "reload_policy", None)
        if reload_policy is not None:
            yield SystemCommand("Reload policy", "Re-read the policy folder (a broken new "
                                "version leaves the current one in force)", reload_policy)
        if self.connect_line:
            yield SystemCommand("Connect line", "Show the psql line to act as an agent",
                                self.action_connect_info)

    def _to_dashboard(self) -> None:
        while len(self.screen_stack) > 1:
            self.pop_screen()

    # -- errors from workers become messages, never a crash (the Harlequin lesson) ------

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state is WorkerState.ERROR:
            error = event.worker.error
            log.error("console worker %s failed", event.worker.name, exc_info=error)
            self.notify(f"{type(error).__name__}: {error}", title=f"{event.worker.group} failed",
                        severity="error", markup=False, timeout=10)


def coalesce(hits: list[MaskingHit]) -> list[MaskingHit]:
    """One feed row per session, column and strategy per batch, counts summed: a busy
    agent reading the same PII column 500 times a second is one line, not 500."""
    merged: dict[tuple[str, str, str], MaskingHit] = {}
    for hit in hits:
        key = (hit.session_id, hit.column, hit.strategy)
        seen = merged.get(key)
        merged[key] = hit if seen is None else replace(seen, count=seen.count + hit.count,
                                                      at=hit.at)
    return list(merged.values())


def analyse(sql: str) -> dict[str, Any] | None:
    """The statement analyser's facts for ``sql`` (cached by the analyser); never raises."""
    with contextlib.suppress(Exception):
        from hoopops.sql import analyze

        return {"statements": [facts.to_dict() for facts in analyze(sql).statements]}
    return None


def binding_ids() -> set[str]:
    """Every binding id the console defines (for validating ``console.keymap``)."""
    from hoopops.tui.screens.confirm import Confirm
    from hoopops.tui.screens.deny_prompt import DenyPrompt
    from hoopops.tui.screens.drift import DriftScreen
    from hoopops.tui.screens.history import FilterInput, HistoryScreen
    from hoopops.tui.screens.replay import ReplayScreen
    from hoopops.tui.screens.sandbox_prompt import SandboxPrompt
    from hoopops.tui.screens.session import SessionScreen
    from hoopops.tui.widgets.drift_table import DriftTable
    from hoopops.tui.widgets.history_table import HistoryTable
    from hoopops.tui.widgets.masking_feed import FeedLog
    from hoopops.tui.widgets.sessions_table import SessionsTable
    from hoopops.tui.widgets.statements_table import StatementsTable

    ids: set[str] = set()
    for owner in (ConsoleApp, DashboardScreen, HistoryScreen, ReplayScreen, SessionScreen,
                  SessionsTable, HistoryTable, StatementsTable, FeedLog, FilterInput,
                  Confirm, DenyPrompt, HelpScreen, ConnectScreen, DriftScreen, DriftTable,
                  SandboxPrompt):
        for binding in owner.BINDINGS:
            if isinstance(binding, Binding) and binding.id:
                ids.add(binding.id)
    return ids

"""Replay one session from the audit store, statement by statement or at recorded pace.

``r`` also re-runs it against a sandbox database (``hoopops replay``, in a worker thread
with its own event loop and gateway) and opens the drift report.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import Footer, Static
from textual.worker import get_current_worker

from hoopops.audit.records import SessionView, StatementView
from hoopops.tui.format import plain, stamp
from hoopops.tui.source import SourceError
from hoopops.tui.widgets.result_grid import ResultGrid
from hoopops.tui.widgets.step_view import StepView

if TYPE_CHECKING:
    from hoopops.config import Config
    from hoopops.replay import ReplayReport
    from hoopops.tui.app import ConsoleApp

SPEEDS = (1, 4, 16)
# Recorded gaps longer than this are compressed: a session idle for an hour should not
# make the analyst wait an hour (the step line says so).
MAX_GAP = 5.0
MIN_GAP = 0.05
# Seconds the sandbox may take over one statement before the replay gives up (the CLI's
# --timeout); a console replay is interactive, so shorter than the CLI's default.
SANDBOX_STATEMENT_TIMEOUT = 60.0


class SandboxProgress(Message):
    """From the replay thread: ``done`` of ``total`` statements replayed so far."""

    def __init__(self, done: int, total: int) -> None:
        super().__init__()
        self.done = done
        self.total = total


class SandboxFinished(Message):
    def __init__(self, report: ReplayReport) -> None:
        super().__init__()
        self.report = report


class SandboxFailed(Message):
    def __init__(self, error: str) -> None:
        super().__init__()
        self.error = error


class ReplayScreen(Screen[None]):
    HELP_VIEW = "replay"

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("left_square_bracket", "step(-1)", "Prev", id="replay.prev", key_display="[",
                tooltip="Previous statement"),
        Binding("right_square_bracket", "step(1)", "Next", id="replay.next", key_display="]",
                tooltip="Next statement"),
        Binding("g", "jump('first')", "First", id="replay.first", show=False,
                tooltip="First statement"),
        Binding("G", "jump('last')", "Last", id="replay.last", show=False,
                tooltip="Last statement"),
        Binding("space", "play", "Play", id="replay.play",
                tooltip="Play at the recorded pace (again to pause)"),
        Binding("x", "speed", "Speed", id="replay.speed",
                tooltip="Cycle playback speed 1x, 4x, 16x"),
        Binding("e", "export", "Export", id="replay.export",
                tooltip="Write this session's evidence to a JSON file"),
        Binding("r", "sandbox_replay", "Sandbox", id="replay.sandbox",
                tooltip="Re-run the session in the sandbox database and show the drift "
                "report"),
        Binding("D", "show_drift", "Drift", id="replay.drift", show=False,
                tooltip="Show the last sandbox replay's drift report again"),
    ]

    PALETTE: ClassVar[list[tuple[str, str, str]]] = [
        ("Export evidence", "Write this session's evidence to a JSON file", "export"),
        ("Sandbox replay", "Re-run this session in the sandbox database and show what "
         "drifted", "sandbox_replay"),
        ("Play / pause", "Replay at the recorded pace", "play"),
        ("First statement", "Jump to the first statement", "jump('first')"),
        ("Last statement", "Jump to the last statement", "jump('last')"),
    ]

    def __init__(self, session_id: str, step: int = 0) -> None:
        super().__init__(classes="replay")
        self.session_id = session_id
        self.index = step
        self.session: SessionView | None = None
        self.statements: list[StatementView] = []
        self.playing = False
        self.speed = SPEEDS[0]
        self.last_export: str | None = None
        self._timer: Timer | None = None
        self._loaded = False
        #: (done, total) while a sandbox replay runs, else None.
        self.sandbox_progress: tuple[int, int] | None = None
        self.last_report: ReplayReport | None = None
        self._sandbox_asked = False

    @property
    def console(self) -> ConsoleApp:
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        yield Static(Text(f"Replay {self.session_id[:12]} — loading…"), id="replay-head")
        yield Static("", id="replay-position")
        with Vertical(id="replay-body"):
            with VerticalScroll(id="replay-step-scroll", classes="panel"):
                yield StepView(id="replay-step")
            with Vertical(id="replay-result-panel", classes="panel"):
                yield ResultGrid(id="replay-result")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#replay-step-scroll").border_title = "Statement"
        self.query_one("#replay-result-panel").border_title = "Result (masked, as sent)"
        self.load()

    @work(group="replay", exit_on_error=False)
    async def load(self) -> None:
        source = self.console.source
        self.session = await source.session(self.session_id)
        self.statements = await source.statements(self.session_id)
        self._loaded = True
        self.index = max(0, min(self.index, len(self.statements) - 1))
        self.show_step()

    # -- rendering -----------------------------------------------------------------------

    @property
    def current(self) -> StatementView | None:
        if not self.statements:
            return None
        return self.statements[self.index]

    def show_step(self) -> None:
        s = self.session
        head = Text("Replay ", style="bold")
        if s is not None:
            head.append_text(plain(s.subject, 80, layout=False, style="bold"))
            head.append(" → ")
            head.append_text(plain(s.target, 80, layout=False))
            head.append("  ")
            head.append(f"{stamp(s.started_at)}Z", style="dim")
            head.append("  session ")
            head.append(s.id[:12])
            if s.application_name:
                head.append("  ")
                head.append_text(plain(s.application_name, 80, layout=False,
                                       style="dim"))
            if s.ended_at is None:
                head.append("  (still open)", style="yellow")
            elif s.end_reason:
                head.append("  ended: ")
                head.append_text(plain(s.end_reason, 200, layout=False, style="dim"))
        else:
            head.append(f"session {self.session_id[:12]}")
            if self._loaded:
                head.append(" is not in the audit store", style="bold red")
        self.query_one("#replay-head", Static).update(head)
        self.query_one("#replay-position", Static).update(self.position_text())
        current = self.current
        self.query_one(StepView).show(current)
        grid = self.query_one(ResultGrid)
        grid.show(current.result_sample if current is not None else None)
        self.query_one("#replay-result-panel").border_subtitle = ResultGrid.caption(
            current.result_sample if current else None, current.rows if current else None
        ).plain
        self.refresh_bindings()

    def position_text(self) -> Text:
        total = len(self.statements)
        text = Text()
        text.append(f" step {self.index + 1 if total else 0}/{total} ", style="bold reverse")
        if self.playing:
            text.append(f"  ▶ playing {self.speed}x", style="bold green")
        else:
            text.append(f"  ⏸ speed {self.speed}x", style="dim")
        if self.sandbox_progress is not None:
            done, total = self.sandbox_progress
            text.append(f"  ⟳ sandbox replay running: statement {min(done + 1, total)}/{total}"
                        if total else "  ⟳ sandbox replay starting…", style="bold cyan")
        elif self.last_report is not None:
            drifted = len(self.last_report.drifted)
            text.append(f"  sandbox: {drifted} of {len(self.last_report.statements)} drifted"
                        if drifted else "  sandbox: no drift",
                        style="bold red" if drifted else "bold green")
        if self.last_export:
            text.append("  exported to ")
            text.append(self.last_export, style="bold")
        return text

    # -- keys ----------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("step", "jump", "play"):
            return True if len(self.statements) > 1 else None
        if action == "export":
            return True if self.session is not None else None
        if action == "sandbox_replay":
            config = self.console.source.config
            ready = self.session is not None and config is not None \
                and config.audit.enabled and self.sandbox_progress is None
            return True if ready else None
        if action == "show_drift":
            return True if self.last_report is not None else None
        return True

    def go(self, index: int) -> None:
        if not self.statements:
            return
        index = max(0, min(index, len(self.statements) - 1))
        if index != self.index:
            self.index = index
            self.show_step()

    def action_step(self, delta: int) -> None:
        self._stop_playing()
        self.go(self.index + delta)

    def action_jump(self, where: str) -> None:
        self._stop_playing()
        self.go(0 if where == "first" else len(self.statements) - 1)

    def action_play(self) -> None:
        if self.playing:
            self._stop_playing()
            return
        if self.index >= len(self.statements) - 1:
            self.go(0)
        self.playing = True
        self._schedule_next()
        self.show_step()

    def action_speed(self) -> None:
        self.speed = SPEEDS[(SPEEDS.index(self.speed) + 1) % len(SPEEDS)]
        if self.playing:
            self._schedule_next()
        self.query_one("#replay-position", Static).update(self.position_text())

    def gap(self) -> float:
        """Seconds until the next step at the current speed (recorded gap, compressed)."""
        if self.index + 1 >= len(self.statements):
            return 0.0
        now, nxt = self.statements[self.index], self.statements[self.index + 1]
        recorded = max(0.0, nxt.received_at - now.received_at)
        return max(MIN_GAP, min(MAX_GAP, recorded / self.speed))

    def _schedule_next(self) -> None:
        if self._timer is not None:
            self._timer.stop()
        self._timer = self.set_timer(self.gap(), self._advance, name="replay-play")

    def _advance(self) -> None:
        if not self.playing:
            return
        self.go(self.index + 1)
        if self.index >= len(self.statements) - 1:
            self._stop_playing()
        else:
            self._schedule_next()

    def _stop_playing(self) -> None:
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
        if self.playing:
            self.playing = False
            self.query_one("#replay-position", Static).update(self.position_text())

    def action_export(self) -> None:
        self.export()

    @work(group="export", exit_on_error=False)
    async def export(self) -> None:
        app = self.console
        try:
            path, count = await app.source.export_session(self.session_id, app.export_dir,
                                                          app.decided_by, now=app.clock())
        except (SourceError, OSError) as exc:
            self.notify(f"Export failed: {exc}", severity="error", markup=False)
            return
        self.last_export = str(path)
        app.actions.append(f"exported {self.session_id} to {path}")
        self.notify(f"Evidence for {count} statement(s) written to {path}", title="Exported",
                    markup=False, timeout=10)
        self.query_one("#replay-position", Static).update(self.position_text())

    # -- sandbox replay ------------------------------------------------------------------

    def action_sandbox_replay(self) -> None:
        from hoopops.tui.screens.sandbox_prompt import SandboxPrompt

        config = self.console.source.config
        if config is None or self.session is None or self.sandbox_progress is not None:
            return
        session_id = self.session.id  # fixed now, whatever the prompt takes
        if config.replay.sandbox is not None:
            self.start_sandbox_replay(config, session_id, config.replay.sandbox)
            return
        if self.console.sandbox_dsn is not None:
            self.start_sandbox_replay(config, session_id, self.console.sandbox_dsn, asked=True)
            return

        def answered(entered: str | None) -> None:
            if entered:
                # Kept for this console's lifetime only, never shown (display is redacted).
                self.console.sandbox_dsn = entered
                self.start_sandbox_replay(config, session_id, entered, asked=True)

        self.app.push_screen(SandboxPrompt(config), answered)

    def start_sandbox_replay(self, config: Config, session_id: str, dsn: str,
                             asked: bool = False) -> None:
        """``asked``: the DSN came from the prompt (forgotten if the replay fails)."""
        self._sandbox_asked = asked
        self.sandbox_progress = (0, 0)
        self.refresh_bindings()
        self.query_one("#replay-position", Static).update(self.position_text())
        self.console.actions.append(f"sandbox replay of {session_id} started")
        self._sandbox_worker(config, session_id, dsn)

    @work(thread=True, group="sandbox-replay", exclusive=True, exit_on_error=False)
    def _sandbox_worker(self, config: Config, session_id: str, dsn: str) -> None:
        # A thread with its own loop and gateway (replay_session_blocking): the console's
        # loop, which may be the serving gateway's, never waits for the sandbox.
        from hoopops.replay import ReplayError, replay_session_blocking

        worker = get_current_worker()
        try:
            report = replay_session_blocking(
                config, session_id, dsn, config.replay.policies,
                statement_timeout=SANDBOX_STATEMENT_TIMEOUT,
                progress=lambda done, total: self.post_message(SandboxProgress(done, total)),
                cancelled=lambda: worker.is_cancelled)
        except ReplayError as exc:
            self.post_message(SandboxFailed(str(exc)))
            return
        except Exception as exc:  # never let a sandbox problem end the console
            self.post_message(SandboxFailed(f"{type(exc).__name__}: {exc}"))
            return
        self.post_message(SandboxFinished(report))

    def on_sandbox_progress(self, message: SandboxProgress) -> None:
        if self.sandbox_progress is not None:
            self.sandbox_progress = (message.done, message.total)
            self.query_one("#replay-position", Static).update(self.position_text())

    def on_sandbox_failed(self, message: SandboxFailed) -> None:
        self.sandbox_progress = None
        self.refresh_bindings()
        self.query_one("#replay-position", Static).update(self.position_text())
        self.console.actions.append(f"sandbox replay of {self.session_id} failed: "
                                    f"{message.error}")
        error = message.error
        if self._sandbox_asked:
            # A typo in the prompt must not stick for the rest of the run.
            self.console.sandbox_dsn = None
            error += " (press r to give another sandbox)"
        self.notify(error, title="Sandbox replay failed", severity="error", markup=False,
                    timeout=15)

    def on_sandbox_finished(self, message: SandboxFinished) -> None:
        report = message.report
        self.sandbox_progress = None
        self.last_report = report
        self.refresh_bindings()
        self.query_one("#replay-position", Static).update(self.position_text())
        self.console.actions.append(f"sandbox replay of {report.session_id}: "
                                    f"{len(report.statements)} statements, "
                                    f"{len(report.drifted)} drifted")
        if self.app.screen is not self:
            # The analyst moved on (help, a modal): say so rather than take the screen.
            self.notify(f"Sandbox replay done: {len(report.drifted)} drifted; press D in "
                        "the replay viewer for the report.", markup=False)
            return
        self.show_drift()

    def action_show_drift(self) -> None:
        self.show_drift()

    def show_drift(self) -> None:
        from hoopops.tui.screens.drift import DriftScreen

        if self.last_report is None:
            return

        def back_at(statement_id: int | None) -> None:
            index = next((i for i, s in enumerate(self.statements) if s.id == statement_id),
                         None)
            if index is not None:
                self._stop_playing()
                self.go(index)

        self.app.push_screen(DriftScreen(self.last_report), back_at)

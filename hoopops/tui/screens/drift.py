"""The drift report of a sandbox replay: what was recorded against what happens now."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

from hoopops.tui.format import highlighted_sql, plain
from hoopops.tui.widgets.drift_table import DRIFT_STYLE, DriftTable, masking_text

if TYPE_CHECKING:
    from hoopops.replay import ReplayReport, StatementReplay
    from hoopops.tui.app import ConsoleApp


def summary_text(report: ReplayReport) -> Text:
    """``12 statements, 2 drifted (...)``: the line an analyst reads first."""
    c = report.counts()
    drifted = len(report.drifted)
    text = Text(f" {c['statements']} statements, ", style="bold")
    text.append(f"{drifted} drifted", style="bold white on red" if drifted else "bold green")
    if drifted:
        text.append(f" ({c['decision_drift']} decision, {c['result_drift']} result, "
                    f"{c['masking_drift']} masking)", style="bold")
    text.append(f"   {c['ran']} ran, {c['not_run']} not run, {c['skipped']} skipped"
                " · rolled back", style="dim")
    return text


def head_text(report: ReplayReport) -> Text:
    text = Text("Sandbox replay ", style="bold")
    text.append_text(plain(report.subject, 80, layout=False, style="bold"))
    text.append(f" → {report.target}  session {report.session_id[:12]}  into ")
    text.append(report.sandbox)  # password-free (Upstream.display)
    text.append("\npolicies: ", style="dim")
    text.append(report.policies or "none configured (every statement allowed)")
    if report.policy_version:
        text.append(f" (version {report.policy_version[:12]})", style="dim")
    return text


def _sample_table(sample: dict[str, Any] | None) -> RenderableType:
    if not sample or not sample.get("columns"):
        return Text("(no rows recorded)", style="dim")
    table = Table(box=None, padding=(0, 1), show_edge=False)
    for column in sample["columns"]:
        table.add_column(header=plain(column))
    for row in sample.get("rows", [])[:5]:
        table.add_row(*[plain(v, 40) for v in row])
    return table


def detail(st: StatementReplay) -> RenderableType:
    """Everything the report knows about one statement (values as literal text)."""
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    status = Text(f"#{st.statement_id}  seq {st.seq}  {st.status}")
    if st.drift:
        status.append("  DRIFT", style=DRIFT_STYLE)
    grid.add_row("statement", status)
    decision = Text(f"then {st.decision_then} by {st.rule_then or '—'}   now "
                    f"{st.decision_now or '?'} by {st.rule_now or '—'}")
    if st.decision_drift:
        decision.stylize(DRIFT_STYLE)
    grid.add_row("decision", decision)
    if st.compared:
        result = Text(f"sha256 then {(st.hash_then or '—')[:16]}  now {(st.hash_now or '—')[:16]}"
                      f"   tag {st.tag_then} → {st.tag_now}")
        if st.sqlstate_then or st.sqlstate_now:
            result.append(f"   error {st.sqlstate_then or '—'} → {st.sqlstate_now or '—'}")
        if st.result_drift:
            result.stylize(DRIFT_STYLE)
        grid.add_row("result", result)
    else:
        grid.add_row("result", Text("not compared (it did not run both then and now)",
                                    style="dim"))
    if st.error_now:
        grid.add_row("error now", plain(st.error_now, 500))
    masking = plain(f"then {masking_text(st.masking_then)}   now "
                    f"{masking_text(st.masking_now)}", layout=False)
    if st.masking_drift:
        masking.stylize(DRIFT_STYLE)
    grid.add_row("masking", masking)
    if st.note:
        grid.add_row("note", plain(st.note, 500))
    parts: list[RenderableType] = [grid]
    if st.result_drift:
        # Samples are the masked rows as sent: safe to show, and they say what changed.
        parts += [Text("\nrows then (masked, as sent)", style="bold"),
                  _sample_table(st.sample_then),
                  Text("\nrows now", style="bold"), _sample_table(st.sample_now)]
    parts += [Text(""), highlighted_sql(st.sql)]
    return Group(*parts)


class DriftScreen(Screen[int | None]):
    """Dismissed with the id of the statement to show in the replay viewer, or None."""

    HELP_VIEW = "drift"

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("n", "next_drift", "Next drift", id="drift.next",
                tooltip="Move to the next statement that drifted"),
        Binding("e", "export", "Export", id="drift.export",
                tooltip="Write the drift report to a JSON file"),
    ]

    PALETTE: ClassVar[list[tuple[str, str, str]]] = [
        ("Next drift", "Move to the next statement that drifted", "next_drift"),
        ("Export drift report", "Write the drift report to a JSON file", "export"),
    ]

    def __init__(self, report: ReplayReport) -> None:
        super().__init__(classes="drift")
        self.report = report
        self.table = DriftTable(id="drift-table")
        self.last_export: str | None = None

    @property
    def console(self) -> ConsoleApp:
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        yield Static(head_text(self.report), id="drift-head")
        yield Static(summary_text(self.report), id="drift-summary")
        with Vertical(id="drift-body"):
            with Vertical(id="drift-table-panel", classes="panel"):
                yield self.table
            with VerticalScroll(id="drift-detail-scroll", classes="panel"):
                yield Static("", id="drift-detail")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#drift-table-panel").border_title = "Recorded vs now"
        self.query_one("#drift-detail-scroll").border_title = "Statement"
        self.table.show(self.report)
        self.table.focus()
        first = next((i for i, st in enumerate(self.report.statements) if st.drift), 0)
        if self.report.statements:
            self.table.move_cursor(row=first, animate=False)
        self.show_detail()

    @property
    def selected(self) -> int | None:
        if not self.report.statements or not self.table.row_count:
            return None
        return max(0, min(self.table.cursor_row, len(self.report.statements) - 1))

    def show_detail(self) -> None:
        index = self.selected
        body: RenderableType = Text("no statements were recorded in this session",
                                    style="dim") if index is None else detail(
            self.report.statements[index])
        self.query_one("#drift-detail", Static).update(body)

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        event.stop()
        self.show_detail()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.action_show_step()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "next_drift":
            return True if self.report.drift else None
        return True

    def action_next_drift(self) -> None:
        drifted = [i for i, st in enumerate(self.report.statements) if st.drift]
        if not drifted:
            return
        current = self.selected or 0
        index = next((i for i in drifted if i > current), drifted[0])
        self.table.move_cursor(row=index)

    def action_show_step(self) -> None:
        index = self.selected
        self.dismiss(None if index is None else self.report.statements[index].statement_id)

    def action_export(self) -> None:
        self.export()

    @work(group="export", exit_on_error=False)
    async def export(self) -> None:
        app = self.console
        when = app.clock()
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(when))
        path = app.export_dir / f"hoopops-replay-{self.report.session_id[:12]}-{stamp}.json"
        document = {**self.report.to_json(), "exported_by": app.decided_by}
        try:
            # File I/O off the event loop: the gateway may share it.
            await asyncio.to_thread(_write, path, json.dumps(document, indent=2,
                                                             ensure_ascii=False, default=str))
        except OSError as exc:
            self.notify(f"Export failed: {exc}", severity="error", markup=False)
            return
        self.last_export = str(path)
        app.actions.append(f"exported drift report of {self.report.session_id} to {path}")
        self.notify(f"Drift report written to {path}", title="Exported", markup=False,
                    timeout=10)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n", encoding="utf-8")

"""One recorded statement: what was asked, what was decided, what came back."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from hoopops.audit.records import StatementView
from hoopops.tui.format import decision_text, highlighted_sql, plain, stamp
from hoopops.tui.widgets.approval_detail import masking_summary


def _approval(s: StatementView) -> Text:
    a = s.approval
    if a is None:
        if s.approval_id is not None:
            return plain(f"#{s.approval_id}")
        return Text("—", style="dim")
    text = Text(f"#{a.id} {a.status}", style="bold green" if a.status == "approved"
                else "bold red")
    if a.scope:
        text.append(f" ({a.scope})")
    if a.decided_by:
        text.append(" by ")
        text.append_text(plain(a.decided_by, 80, layout=False, style="bold"))
    if a.decided_at is not None:
        text.append(f" at {stamp(a.decided_at)}Z", style="dim")
    if a.comment:
        text.append(": ")
        text.append_text(plain(a.comment, 500))
    return text


def _masking(s: StatementView) -> Text:
    if not s.masking:
        return Text("none", style="dim")
    text = Text()
    for index, m in enumerate(s.masking):
        if index:
            text.append(", ")
        text.append_text(plain(m.column_or_detector, 80, layout=False, style="cyan"))
        text.append(f" {m.strategy} x{m.count}")
    return text


def _outcome(s: StatementView) -> Text:
    if not s.finished:
        return Text("no result recorded (still running, or the session ended first)",
                    style="dim")
    parts: list[Text] = []
    if s.command_tag:
        parts.append(plain(s.command_tag, 80, layout=False, style="bold"))
    elif s.sqlstate:
        parts.append(Text("refused" if s.decision in ("block", "review") else "failed",
                          style="bold red"))
    if s.rows is not None:
        parts.append(Text(f"{s.rows} row(s)"))
    if s.duration_ms is not None and s.started_at is not None:
        parts.append(Text(f"{s.duration_ms:.1f} ms"))
    if s.sqlstate:
        error = Text(f"{s.sqlstate} ", style="bold red")
        # Error texts quote the agent's input.
        error.append_text(plain(s.error_message or "", 2000, style="red"))
        parts.append(error)
    return Text("  ").join(parts)


class StepView(Static):
    """Header fields and the highlighted statement of one replay step."""

    def show(self, s: StatementView | None, facts_extra: dict[str, Any] | None = None) -> None:
        if s is None:
            self.update(Text("This session has no recorded statements.", style="dim"))
            return
        grid = Table.grid(padding=(0, 1))
        grid.add_column(style="bold", no_wrap=True)
        grid.add_column()
        received = Text(f"{stamp(s.received_at)}Z", style="")
        received.append(f"  statement #{s.id}, seq {s.seq}", style="dim")
        grid.add_row("received", received)
        decision = decision_text(s.decision)
        if s.rule_id:
            decision.append("  rule ")
            decision.append_text(plain(s.rule_id, 80, layout=False, style="bold"))
        grid.add_row("decision", decision)
        grid.add_row("approval", _approval(s))
        grid.add_row("masking", _masking(s))
        sensitive = masking_summary(s.facts)
        if sensitive:
            grid.add_row("masked", plain(sensitive))
        grid.add_row("result", _outcome(s))
        grid.add_row("sha256", plain(s.result_sha256 or "—"))
        if s.params:
            grid.add_row("params", plain(", ".join(repr(p) for p in s.params), 300))
        self.update(Group(grid, Text(""), highlighted_sql(s.sql)))

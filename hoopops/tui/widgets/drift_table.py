"""One row per replayed statement: recorded vs now decision, result hash, masking."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from rich.text import Text
from textual.binding import Binding, BindingType

from hoopops.tui.format import DECISION_STYLES, one_line, plain
from hoopops.tui.widgets.keyed_table import KeyedTable

if TYPE_CHECKING:
    from hoopops.replay import ReplayReport, StatementReplay

DRIFT_STYLE = "bold red"


def masking_text(actions: dict[tuple[str, str], int] | None) -> str:
    """``ssn last4 x3, email redact x3``: short column names, the strategy and a count."""
    if actions is None:
        return "?"
    if not actions:
        return "none"
    return ", ".join(f"{column.rpartition('.')[2]} {strategy} x{count}"
                     for (column, strategy), count in sorted(actions.items()))


def decision_cell(st: StatementReplay) -> Text:
    text = Text(st.decision_then, style=DECISION_STYLES.get(st.decision_then, ""))
    text.append(" → ", style="dim")
    now = st.decision_now or "?"
    text.append(now, style=DRIFT_STYLE if st.decision_drift else DECISION_STYLES.get(now, ""))
    if st.rule_changed:
        text.append(" (rule)", style="yellow")
    return text


def result_cell(st: StatementReplay) -> Text:
    if not st.compared:
        # Nothing to compare: it did not run then, or does not run now.
        return Text(st.status if st.status != "ran" else "not recorded", style="dim")
    if st.result_drift:
        what = "hash" if st.hash_now != st.hash_then else (
            "error" if st.sqlstate_now != st.sqlstate_then else "tag")
        return Text(f"DRIFT ({what})", style=DRIFT_STYLE)
    return Text("match", style="green")


def masking_cell(st: StatementReplay) -> Text:
    then = masking_text(st.masking_then)
    if not st.compared or st.masking_now is None:
        return plain(then, layout=False, style="dim")
    if st.masking_drift:
        text = plain(then, layout=False)
        text.append(" → ", style="dim")
        text.append_text(plain(masking_text(st.masking_now), layout=False, style=DRIFT_STYLE))
        return text
    return plain(then if st.masking_then else "none", layout=False,
                 style="" if st.masking_then else "dim")


class DriftTable(KeyedTable):
    COLUMNS = (
        ("mark", "", 7),
        ("seq", "#", 4),
        ("status", "status", 8),
        ("decision", "decision then → now", 22),
        ("result", "result hash", 14),
        ("masking", "masking then → now", 30),
        ("sql", "statement", 80),
    )

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter", "screen.show_step", "Show step", id="drift.show_step",
                tooltip="Back to the replay viewer at the selected statement"),
    ]

    def show(self, report: ReplayReport) -> None:
        rows = []
        for st in report.statements:
            mark = Text(" DRIFT ", style="bold white on red") if st.drift else Text(
                "  ok", style="green")
            sql = one_line(st.sql, 300)
            if st.drift:
                sql.stylize(DRIFT_STYLE)
            rows.append((str(st.statement_id), (
                mark, Text(str(st.seq)), Text(st.status, style="" if st.status == "ran"
                                              else "dim"),
                decision_cell(st), result_cell(st), masking_cell(st), sql)))
        self.sync(rows)

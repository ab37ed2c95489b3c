"""Everything the analyst needs to decide one held statement, on one pane."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.containers import VerticalScroll
from textual.widgets import Static

from hoopops.audit.records import ApprovalView
from hoopops.display import hidden_characters
from hoopops.tui.format import clock, countdown, highlighted_sql, plain


def touched(facts: dict[str, Any] | None) -> tuple[list[str], list[str]]:
    """Tables and columns a statement touches, from analyzer facts: one statement's
    (``StatementFacts.to_dict()``) or a decision's (``{"statements": [...]}``)."""
    if not facts:
        return [], []
    parts = facts.get("statements") if isinstance(facts.get("statements"), list) else [facts]
    tables: list[str] = []
    columns: list[str] = []
    for part in parts:
        if not isinstance(part, dict):
            continue
        tables += [str(t) for key in ("tables_written", "tables_read")
                   for t in part.get(key) or ()]
        columns += [str(c) for key in ("columns_written", "columns")
                    for c in part.get(key) or ()]
    return list(dict.fromkeys(tables)), list(dict.fromkeys(columns))


_MASKING_FACTS = (("sensitive_in_predicates", "decides rows on"),
                  ("sensitive_copied", "copies"),
                  ("sensitive_placeholders", "writes a masked value into"),
                  ("sensitive_targets", "writes"),
                  ("sensitive_opaque", "passes to code hoopops cannot see"))


def masking_summary(facts: dict[str, Any] | None) -> str:
    """What the statement does with masked columns (``masking`` in the facts), in words:
    why an inference, copy or placeholder rule held it."""
    if not facts:
        return ""
    parts = facts.get("statements") if isinstance(facts.get("statements"), list) else [facts]
    found: dict[str, list[str]] = {}
    for part in parts:
        masking = part.get("masking") if isinstance(part, dict) else None
        if not isinstance(masking, dict):
            continue
        for key, label in _MASKING_FACTS:
            for name in masking.get(key) or ():
                if str(name) not in found.setdefault(label, []):
                    found[label].append(str(name))
    return "; ".join(f"{label} {', '.join(names)}" for label, names in found.items() if names)


class ApprovalDetail(VerticalScroll, can_focus=True):
    """The selected approval: pretty SQL, who, where, why, what it touches."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.approval: ApprovalView | None = None
        self.facts: dict[str, Any] | None = None
        self.target: str | None = None
        self._shown: object = "initial"
        self._body = Static(Text("No statement is waiting for approval.", style="dim"),
                            id="approval-body")

    def compose(self):  # type: ignore[no-untyped-def]
        yield self._body

    def show(self, approval: ApprovalView | None, now: float,
             facts: dict[str, Any] | None = None, target: str | None = None) -> None:
        same = (approval is not None and self.approval is not None
                and approval.id == self.approval.id)
        self.approval, self.facts, self.target = approval, facts, target
        # Redraw only when what is shown changes (the countdown ticks once a second).
        key = None if approval is None else (approval.id, int(approval.expires_at - now),
                                             target, id(facts))
        if key == self._shown:
            return
        self._shown = key
        if approval is None:
            self._body.update(Text("No statement is waiting for approval.", style="dim"))
            return
        self._body.update(self.render_approval(approval, now))
        if not same:
            self.scroll_home(animate=False)

    def render_approval(self, a: ApprovalView, now: float) -> Group:
        head = Table.grid(padding=(0, 1))
        head.add_column(style="bold", no_wrap=True)
        head.add_column()
        title = Text(f"#{a.id} ", style="bold")
        title.append_text(countdown(a.expires_at, now))
        title.append(f"  requested {clock(a.created_at)}", style="dim")
        head.add_row("approval", title)
        who = plain(a.subject, 80, layout=False)
        if a.groups:
            who.append_text(plain(f"  ({', '.join(a.groups)})", 200, layout=False,
                                  style="dim"))
        head.add_row("identity", who)
        head.add_row("session", plain(a.session_id[:12]))
        if self.target:
            head.add_row("target", plain(self.target))
        head.add_row("rule", plain(a.rule_id or "—"))
        if a.reason:
            head.add_row("reason", plain(a.reason))
        tables, columns = touched(self.facts)
        if tables:
            head.add_row("tables", plain(", ".join(tables)))
        if columns:
            head.add_row("columns", plain(", ".join(columns)))
        masking = masking_summary(self.facts)
        if masking:
            head.add_row("masked", plain(masking))
        hidden = hidden_characters(a.sql)
        if hidden:
            # Bidi controls can make the statement read differently from how it runs.
            head.add_row(Text("warning", style="bold red"),
                         Text(f"the statement contains {hidden}, shown as escapes",
                              style="bold red"))
        if a.params:
            head.add_row("params", plain(", ".join(_param(p) for p in a.params), 400))
        keys = Text("a", style="bold reverse")
        keys.append(" approve once  ")
        keys.append("s", style="bold reverse")
        keys.append(" approve for session  ")
        keys.append("d", style="bold reverse")
        keys.append(" deny")
        return Group(head, Text(""), highlighted_sql(a.sql), Text(""), keys)


def _param(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, dict) and "hex" in value:
        return f"\\x{value['hex'][:32]}"
    return repr(str(value))

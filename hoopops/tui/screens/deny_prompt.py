"""Ask for an optional reason before denying a held statement."""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Static

from hoopops.audit.records import ApprovalView
from hoopops.tui.format import one_line, plain


class DenyPrompt(ModalScreen[str | None]):
    """Dismisses with the reason ("" when skipped with enter), or None when cancelled.

    The approval id is fixed when the prompt opens (it was captured when ``d`` was
    pressed); nothing that happens behind the modal can change which approval is denied.
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "cancel", "Cancel", id="deny.cancel"),
    ]

    def __init__(self, approval: ApprovalView) -> None:
        super().__init__()
        self.approval = approval

    def compose(self) -> ComposeResult:
        with Vertical(id="deny-box"):
            title = Text(f"Deny approval #{self.approval.id}", style="bold")
            title.append_text(plain(f"  ({self.approval.subject})", 84, layout=False,
                                    style="dim"))
            yield Static(title, id="deny-title")
            yield Static(one_line(self.approval.sql, 160), id="deny-sql")
            yield Input(placeholder="reason (optional, shown to the agent and audited)",
                        id="deny-reason", max_length=500)
            yield Static(Text("enter: deny   esc: cancel, nothing is denied", style="dim"),
                         id="deny-help")

    def on_mount(self) -> None:
        self.query_one(Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.dismiss(event.value.strip())

    def action_cancel(self) -> None:
        self.dismiss(None)

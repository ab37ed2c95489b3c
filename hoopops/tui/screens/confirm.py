"""A yes/no question for actions that cannot be undone (kill a session, quit)."""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Static


class Confirm(ModalScreen[bool]):
    """``y``/``enter`` confirms, ``n``/``esc`` does not."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y,enter", "answer(True)", "Yes", id="confirm.yes"),
        Binding("n,escape", "answer(False)", "No", id="confirm.no"),
    ]

    def __init__(self, question: Text, detail: Text | None = None) -> None:
        super().__init__()
        self.question = question
        self.detail = detail

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm-box"):
            yield Static(self.question, id="confirm-question")
            if self.detail is not None:
                yield Static(self.detail, id="confirm-detail")
            yield Static(Text("y: yes    n / esc: no", style="dim"), id="confirm-help")

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)

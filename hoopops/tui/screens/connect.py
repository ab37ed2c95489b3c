"""The demo's "connect yourself as an agent" line, shown at start and on ``c``."""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Static


class ConnectScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,enter,c,q", "close", "Close", id="connect.close"),
        Binding("y", "copy", "Copy", id="connect.copy"),
    ]

    def __init__(self, line: str, note: str = "") -> None:
        super().__init__()
        self.line = line
        self.note = note

    def compose(self) -> ComposeResult:
        with Vertical(id="connect-box"):
            yield Static(Text("Act as an agent yourself: run this in another terminal",
                              style="bold"))
            # The token is plain text; it must never be read as markup.
            yield Static(Text(self.line), id="connect-line")
            if self.note:
                yield Static(Text(self.note, style="dim"))
            yield Static(Text("y: copy (terminal clipboard)   enter / esc: close   "
                              "c: show again later", style="dim"))

    def action_copy(self) -> None:
        self.app.copy_to_clipboard(self.line)
        self.app.notify("Copied the psql line to the clipboard.", markup=False)

    def action_close(self) -> None:
        self.dismiss(None)

"""``?``: what this view shows and every key it answers to (as remapped)."""

from __future__ import annotations

from importlib import resources
from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown


def help_text(view: str) -> str:
    """The Markdown help beside this module's package (``help-<view>.md``)."""
    try:
        return resources.files("hoopops.tui").joinpath(f"help-{view}.md").read_text("utf-8")
    except (FileNotFoundError, OSError):
        return f"# {view}\n\nNo help written for this view yet."


def keys_table(rows: list[tuple[str, str, str]]) -> str:
    """Markdown table of (key, what it does, binding id)."""
    lines = ["", "## Keys (as configured)", "", "| key | does | id for `console.keymap` |",
             "| --- | --- | --- |"]
    for key, description, binding_id in rows:
        safe = description.replace("|", "/")
        lines.append(f"| `{key}` | {safe} | `{binding_id}` |")
    lines += ["", "`tab` moves between panels, `ctrl+p` opens the command palette, `esc` goes "
              "back."]
    return "\n".join(lines) + "\n"


class HelpScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,q,question_mark", "dismiss_help", "Close", id="help.close"),
    ]

    def __init__(self, view: str, keys: list[tuple[str, str, str]]) -> None:
        super().__init__()
        self.view = view
        self.keys = keys

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-box"):
            yield Markdown(help_text(self.view) + keys_table(self.keys), id="help-text")

    def on_mount(self) -> None:
        self.query_one("#help-box").focus()

    def action_dismiss_help(self) -> None:
        self.dismiss(None)

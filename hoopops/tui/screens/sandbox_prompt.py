"""Ask for the sandbox database when hoopops.yaml names none (``replay.sandbox``)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, ClassVar
from urllib.parse import quote, urlsplit

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Static

from hoopops.config import parse_upstream, redact_dsn
from hoopops.sandbox import target_refusal

if TYPE_CHECKING:
    from hoopops.config import Config


def sandbox_problem(config: Config, dsn: str) -> str | None:
    """What ``hoopops replay`` would refuse about ``dsn``, or None (password never shown)."""
    try:
        sandbox = parse_upstream(dsn)
    except ValueError as exc:
        return f"sandbox {redact_dsn(dsn)}: {exc}"
    return target_refusal(config.targets.values(), sandbox)


def with_password(url: str, password: str) -> str:
    """``url`` with ``password`` put in its user part (the URL must not carry one)."""
    if not password:
        return url
    try:
        parts = urlsplit(url)
        has_password = parts.password is not None
    except ValueError:
        return url  # sandbox_problem says what is wrong with it
    if has_password:
        raise ValueError("the URL already has a password; give it in one place only")
    if not parts.username:
        raise ValueError("the URL names no user for the password")
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{parts.username}:{quote(password, safe='')}@{host}"
    return parts._replace(netloc=netloc).geturl()


class SandboxPrompt(ModalScreen[str | None]):
    """Dismisses with a sandbox DSN that passed the CLI's checks, or None when cancelled.

    The password has a field of its own that shows only dots; everywhere else the console
    shows the sandbox without it.
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "cancel", "Cancel", id="sandbox.cancel"),
    ]

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config

    def compose(self) -> ComposeResult:
        with Vertical(id="sandbox-box"):
            yield Static(Text("Replay into which sandbox database?", style="bold"))
            yield Static(Text("A copy of the target with the same schema and data, never a "
                              "configured target. Everything runs in one transaction that "
                              "is rolled back. Set replay.sandbox in hoopops.yaml to skip "
                              "this question.", style="dim"), id="sandbox-note")
            yield Input(placeholder="postgresql://user@host:5432/sandbox_db",
                        id="sandbox-url")
            yield Input(placeholder="password (if not in the URL)", password=True,
                        id="sandbox-password")
            yield Static("", id="sandbox-error")
            yield Static(Text("enter: replay   tab: next field   esc: cancel", style="dim"))

    def on_mount(self) -> None:
        self.query_one("#sandbox-url", Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        url = self.query_one("#sandbox-url", Input).value.strip()
        if not url:
            self.query_one("#sandbox-url", Input).focus()
            return
        try:
            dsn = with_password(url, self.query_one("#sandbox-password", Input).value)
        except ValueError as exc:
            self.show_error(str(exc))
            return
        self.validate(dsn)

    @work(group="sandbox-check", exclusive=True, exit_on_error=False)
    async def validate(self, dsn: str) -> None:
        self.show_error("checking…", style="dim")
        # Off the loop: comparing hosts may resolve names.
        problem = await asyncio.to_thread(sandbox_problem, self.config, dsn)
        if problem is not None:
            self.show_error(problem)
            return
        self.dismiss(dsn)

    def show_error(self, message: str, style: str = "bold red") -> None:
        self.query_one("#sandbox-error", Static).update(Text(message, style=style))

    def action_cancel(self) -> None:
        self.dismiss(None)

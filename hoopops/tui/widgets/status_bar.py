"""The one line that says whether everything is all right."""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.text import Text
from textual.widget import Widget

from hoopops.tui.source import Status


@dataclass
class Counters:
    """What changes every refresh."""

    sessions: int = 0
    statements_per_s: float = 0.0
    blocked_per_s: float = 0.0
    pending: int = 0
    paused: bool = False
    buffered: int = 0
    policy_version: str | None = None
    policy_error: str | None = None
    gateway_error: str | None = None
    target_health: dict[str, str] = field(default_factory=dict)


_HEALTH = {"ok": ("✓", "green"), "up": ("✓", "green"), "down": ("✗", "bold red"),
           "error": ("✗", "bold red"), "unknown": ("?", "yellow")}


class StatusBar(Widget):
    """Listen address, targets and health, policy, rates, pending approvals, paused.

    A plain Widget with a fixed height of one line, not a Static: ``Static.update``
    re-lays out the whole screen, and this line changes every second on a busy gateway
    whose event loop the console shares. ``refresh()`` here repaints one line only.
    """

    DEFAULT_CSS = """
    StatusBar {
        height: 1;
    }
    """

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._text = Text()

    def render(self) -> Text:
        return self._text

    @property
    def text(self) -> Text:
        return self._text

    def show(self, status: Status, c: Counters) -> None:
        text = Text(no_wrap=True, overflow="ellipsis")
        if status.mode == "attached":
            text.append(" ATTACHED ", style="bold reverse yellow")
            text.append(f" {status.audit} ", style="bold")
        else:
            text.append(f" {status.listen} ", style="bold reverse")
        health = {**status.target_health, **c.target_health}
        for name in status.targets:
            mark, style = _HEALTH.get(health.get(name, ""), ("", ""))
            text.append(" ")
            text.append(name, style="cyan")
            if mark:
                text.append(mark, style=style)
        version = c.policy_version or status.policy_version
        text.append(" │ ", style="dim")
        text.append("policy ")
        if c.policy_error:
            text.append("ERROR", style="bold red")
        else:
            # Versions may be content hashes; twelve characters identify one.
            text.append((version or "—")[:12])
        text.append(" │ ", style="dim")
        text.append(f"{c.sessions}", style="bold")
        text.append(" sess ")
        text.append(f"{c.statements_per_s:.1f}", style="bold")
        text.append(" st/s ")
        text.append(f"{c.blocked_per_s:.1f}", style="bold red" if c.blocked_per_s else "bold")
        text.append(" blk/s")
        text.append(" │ ", style="dim")
        if c.pending:
            text.append(f" {c.pending} pending ", style="bold reverse magenta")
        else:
            text.append("0 pending", style="dim")
        if c.paused:
            text.append(" ")
            label = " PAUSED " + (f"+{c.buffered} " if c.buffered else "")
            text.append(label, style="bold reverse yellow")
        if c.gateway_error:
            text.append(" ")
            text.append(f" {c.gateway_error} ", style="bold reverse red")
        if text != self._text:
            self._text = text
            self.refresh()

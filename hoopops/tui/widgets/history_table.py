"""Past sessions from the audit store."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from rich.text import Text
from textual.binding import Binding, BindingType

from hoopops.audit.records import SessionView
from hoopops.tui.format import plain, stamp
from hoopops.tui.widgets.keyed_table import KeyedTable


class HistoryTable(KeyedTable):
    COLUMNS = (
        ("started", "started (UTC)", 19),
        ("identity", "identity", 16),
        ("target", "target", 8),
        ("statements", "stmts", 5),
        ("blocked", "blk", 4),
        ("reviewed", "rev", 4),
        ("ended", "ended", 19),
        ("application", "application", 16),
        ("client", "client", 21),
        ("reason", "end reason", 30),
    )

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter", "screen.replay", "Replay", id="history.replay",
                tooltip="Replay the selected session"),
    ]

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.sessions: dict[str, SessionView] = {}

    def show(self, sessions: Sequence[SessionView]) -> None:
        self.sessions = {s.id: s for s in sessions}
        rows = []
        for s in sessions:
            client = f"{s.client_addr}:{s.client_port}" if s.client_addr else ""
            rows.append((s.id, (
                Text(stamp(s.started_at)), plain(s.subject, 40, layout=False), plain(s.target),
                Text(str(s.statements)),
                Text(str(s.blocked), style="bold red" if s.blocked else "dim"),
                Text(str(s.reviewed), style="bold yellow" if s.reviewed else "dim"),
                Text(stamp(s.ended_at)) if s.ended_at is not None
                else Text("open", style="green"),
                plain(s.application_name or "", 60, layout=False), plain(client, layout=False),
                plain(s.end_reason or "", 120, layout=False))))
        # Newest first, as the store returns them; a refresh adds new sessions on top.
        self.sync(rows, sort_column="started", sort_key=lambda c: c.plain, reverse=True)

"""Live sessions: who is connected, to what, doing what, right now."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from rich.text import Text
from textual.binding import Binding, BindingType

from hoopops.tui.format import ago, one_line, plain, state_text
from hoopops.tui.source import LiveSession
from hoopops.tui.widgets.keyed_table import KeyedTable


class SessionsTable(KeyedTable):
    """One row per live session, keyed by session id (cursor never jumps)."""

    # Most important first, so an 80-column terminal shows who, what state and what SQL.
    COLUMNS = (
        ("identity", "identity", 16),
        ("state", "state", 20),
        ("target", "target", 8),
        ("since", "since", 6),
        ("statements", "stmts", 6),
        ("last", "last statement", 48),
        ("groups", "groups", 16),
        ("client", "client", 21),
        ("application", "application", 18),
    )

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("k", "screen.kill_session", "Kill", id="sessions.kill",
                tooltip="End the selected session: the agent gets a FATAL and its backend "
                "query is cancelled"),
        Binding("enter", "screen.open_session", "Open", id="sessions.open",
                tooltip="Show the selected session's statements"),
    ]

    def rows_for(self, sessions: Sequence[LiveSession], now: float
                 ) -> list[tuple[str, tuple[Text, ...]]]:
        rows = []
        for s in sorted(sessions, key=lambda s: (s.started_at, s.id)):
            statements = Text(str(s.statements))
            if s.blocked:
                statements.append(f"/{s.blocked}", style="red")
            rows.append((s.id, (
                plain(s.subject, 40, layout=False), state_text(s.state), plain(s.target),
                Text(ago(
                    s.started_at, now)), statements, one_line(s.last_sql, 300),
                plain(",".join(s.groups), 60, layout=False), plain(s.client, layout=False),
                plain(s.application, 60, layout=False))))
        return rows

    def show(self, sessions: Sequence[LiveSession], now: float) -> None:
        self.sync(self.rows_for(sessions, now))

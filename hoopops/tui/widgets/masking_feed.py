"""Masking hits as they happen: a feed that follows the tail until the analyst scrolls.

The Toolong lesson: scrolling up means "I am reading this", so new entries must not yank
the view away. While the analyst is scrolled up, new entries are counted and shown as
"+N new"; scrolling back to the bottom (or ``end``) resumes following.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.widgets import DataTable, Static

from hoopops.tui.format import clock, plain

# The feed is a window on recent activity, not the record (that is the audit store).
MAX_ROWS = 1000


@dataclass(frozen=True)
class MaskingHit:
    key: str
    at: float
    session_id: str
    subject: str | None
    column: str
    strategy: str
    count: int


class FeedTable(DataTable[Any]):
    """The feed's rows; scrolling (not a cursor) is how the analyst reads back."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("end,G", "follow", "Follow", id="feed.follow", show=False,
                tooltip="Jump to the newest masking hit and follow the tail again"),
    ]

    def action_follow(self) -> None:
        feed = self.parent
        if isinstance(feed, MaskingFeed):
            feed.follow()


class MaskingFeed(Vertical):
    """See the module docstring."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.table = FeedTable(cursor_type="none", show_header=False, id="masking-table")
        self.unseen = 0
        self.total = 0
        #: Following the tail; false from the moment the analyst scrolls up.
        self.following = True
        self._seen_keys: set[str] = set()
        self._order: list[str] = []
        self._indicator = Static("", id="masking-new")

    def compose(self) -> ComposeResult:
        yield self.table
        yield self._indicator

    def on_mount(self) -> None:
        self._ensure_columns()
        self._indicator.display = False
        self.watch(self.table, "scroll_y", self._on_scroll, init=False)

    def _ensure_columns(self) -> None:
        # Hits may arrive before this widget's Mount event.
        if not self.table.columns:
            for key, label, width in (("at", "time", 8), ("session", "session", 8),
                                      ("identity", "identity", 14),
                                      ("column", "column / detector", 22),
                                      ("strategy", "strategy", 8), ("count", "n", 5)):
                self.table.add_column(label, key=key, width=width)

    @property
    def at_end(self) -> bool:
        return self.table.scroll_y >= self.table.max_scroll_y

    def _on_scroll(self, _old: float, _new: float) -> None:
        # Only a scroll changes this: adding rows grows max_scroll_y, not scroll_y.
        self.following = self.at_end
        if self.following and self.unseen:
            self.unseen = 0
            self._show_indicator()

    def follow(self) -> None:
        self.following = True
        self.unseen = 0
        self._show_indicator()
        self.table.scroll_end(animate=False, immediate=True)

    def add(self, hits: Iterable[MaskingHit]) -> int:
        """Append hits not seen before; returns how many were new."""
        fresh = [h for h in hits if h.key not in self._seen_keys]
        if not fresh:
            return 0
        self._ensure_columns()
        with self.app.batch_update():
            for hit in fresh:
                self._seen_keys.add(hit.key)
                self._order.append(hit.key)
                self.table.add_row(
                    Text(clock(hit.at)), plain(hit.session_id[:8]), plain(hit.subject, 40),
                    plain(hit.column, 80), plain(hit.strategy), Text(str(hit.count)),
                    key=hit.key)
            while len(self._order) > MAX_ROWS:
                oldest = self._order.pop(0)
                self._seen_keys.discard(oldest)
                self.table.remove_row(oldest)
        self.total += len(fresh)
        if self.following:
            # After layout, when max_scroll_y knows about the new rows.
            self.call_after_refresh(self.table.scroll_end, animate=False, immediate=True)
        else:
            self.unseen += len(fresh)
            self._show_indicator()
        return len(fresh)

    def _show_indicator(self) -> None:
        if self.unseen:
            self._indicator.update(Text(f" +{self.unseen} new  (end: follow) ",
                                        style="bold reverse"))
        self._indicator.display = bool(self.unseen)


def hits_from_event(data: dict[str, Any], at: float, seq: int) -> list[MaskingHit]:
    """MASKING_APPLIED event data -> feed entries (one per column or detector)."""
    hits = []
    for index, action in enumerate(data.get("actions") or ()):
        if not isinstance(action, dict):
            continue
        hits.append(MaskingHit(
            key=f"e{seq}.{index}", at=at, session_id=str(data.get("session_id", "")),
            subject=data.get("subject"),
            column=str(action.get("column") or action.get("column_or_detector") or "?"),
            strategy=str(action.get("strategy", "?")), count=int(action.get("count", 0))))
    return hits


def hits_from_views(views: Iterable[Any]) -> list[MaskingHit]:
    """Store rows (``MaskingView``, newest first) -> feed entries, oldest first."""
    hits = [MaskingHit(key=f"r{v.record}.{v.column_or_detector}.{v.strategy}", at=v.at,
                       session_id=v.session_id, subject=v.subject,
                       column=v.column_or_detector, strategy=v.strategy, count=v.count)
            for v in views]
    hits.sort(key=lambda h: (h.at, h.key))
    return hits

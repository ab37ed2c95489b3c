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
from textual.widgets import Log, Static

from hoopops.tui.format import clock, plain

# The feed is a window on recent activity, not the record (that is the audit store).
MAX_LINES = 2000


@dataclass(frozen=True)
class MaskingHit:
    key: str
    at: float
    session_id: str
    subject: str | None
    column: str
    strategy: str
    count: int


def _cell(value: object, width: int) -> str:
    # plain(): control characters made visible, long values cut with an ellipsis.
    return plain(value, width, layout=False).plain.ljust(width)


def hit_line(hit: MaskingHit) -> str:
    """One fixed-width line. A Log, not a DataTable: it draws plain strings (never markup)
    and costs next to nothing per line, which matters when a busy gateway masks hundreds
    of values a second and shares its event loop with this widget."""
    return " ".join((clock(hit.at), _cell(hit.session_id[:8], 8), _cell(hit.subject, 12),
                     _cell(hit.column, 26), _cell(hit.strategy, 8), f"{hit.count:>6}"))


class FeedLog(Log):
    """The feed's lines; scrolling up is how the analyst reads back."""

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
        self.log_view = FeedLog(max_lines=MAX_LINES, auto_scroll=True, id="masking-log")
        self.unseen = 0
        self.total = 0
        #: Following the tail; false from the moment the analyst scrolls up.
        self.following = True
        self._seen_keys: dict[str, None] = {}
        self._indicator = Static("", id="masking-new")
        # Lines that arrived before the Log was mounted (it cannot take writes until then:
        # it measures them in a worker, which needs the running app).
        self._early: list[str] = []

    def compose(self) -> ComposeResult:
        yield self.log_view
        yield self._indicator

    def on_mount(self) -> None:
        self._indicator.display = False
        self.watch(self.log_view, "scroll_y", self._on_scroll, init=False)
        self.call_after_refresh(self._write_early)

    def _write_early(self) -> None:
        if self._early:
            lines, self._early = self._early, []
            self.log_view.write_lines(lines, scroll_end=True)
            self.call_after_refresh(self._settle_at_end)

    def _settle_at_end(self) -> None:
        if self.following:
            self.log_view.scroll_end(animate=False, immediate=True)

    @property
    def at_end(self) -> bool:
        return self.log_view.scroll_y >= self.log_view.max_scroll_y

    def _on_scroll(self, old: float, new: float) -> None:
        # Scrolling *up* is the analyst reading back; following the tail only ever moves
        # down (sometimes short of the end, before the layout knows the new height).
        if new < old and not self.at_end:
            self.following = False
        elif self.at_end:
            self.following = True
        self.log_view.auto_scroll = self.following
        if self.following and self.unseen:
            self.unseen = 0
            self._show_indicator()

    def follow(self) -> None:
        self.following = True
        self.log_view.auto_scroll = True
        self.unseen = 0
        self._show_indicator()
        self.log_view.scroll_end(animate=False, immediate=True)

    def add(self, hits: Iterable[MaskingHit]) -> int:
        """Append hits not seen before; returns how many were new."""
        fresh = [h for h in hits if h.key not in self._seen_keys]
        if not fresh:
            return 0
        for hit in fresh:
            self._seen_keys[hit.key] = None
        while len(self._seen_keys) > MAX_LINES * 2:
            del self._seen_keys[next(iter(self._seen_keys))]
        lines = [hit_line(h) for h in fresh]
        if not self.log_view.is_mounted or self._early:
            self._early += lines
        else:
            self.log_view.write_lines(lines, scroll_end=self.following)
            if self.following:
                # Once the layout knows the new height, land exactly on the end.
                self.call_after_refresh(self._settle_at_end)
        self.total += len(fresh)
        if not self.following:
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

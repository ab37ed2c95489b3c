"""Turning agent-supplied text and times into things safe and short enough to show.

Everything an agent controls (SQL, values, application names, subjects) becomes a
``rich.text.Text`` here: a ``str`` handed to a Textual widget is parsed as markup, and
``[/foo]`` in a statement must show as ``[/foo]``, not break (or restyle) the screen.
"""

from __future__ import annotations

import functools
import re
import shlex
import time
from datetime import UTC, datetime

from rich.syntax import Syntax
from rich.text import Text

from hoopops.audit.records import Filters
from hoopops.config import parse_duration
from hoopops.display import visible

# Beyond this, pretty-printing (a full parse) is not worth blocking the loop for.
_PRETTY_LIMIT = 20_000
# Beyond this, the screen shows the head only (the export and the store have it all).
_SHOW_LIMIT = 100_000
# How escapes and flood counts (hoopops.display) look: never like the agent's own text.
MARK_STYLE = "bold reverse red"


def shown(value: str, *, layout: bool = False, style: str = "") -> Text:
    """Agent text as a ``Text``: never markup, every character a terminal would obey (or
    that shows as nothing) spelled out and marked (see ``hoopops.display``)."""
    safe = visible(value, layout=layout)
    text = Text(safe.text, style=style)
    for start, end in safe.marks:
        text.stylize(MARK_STYLE, start, end)
    return text


def plain(value: object, limit: int | None = None, *, layout: bool = True,
          style: str = "") -> Text:
    """Any value as literal text (never markup), control characters made visible.

    ``layout=False`` escapes line feeds and tabs too: for table cells, which show one
    line and would silently hide whatever follows a line feed."""
    if value is None:
        return Text("∅", style="dim italic")
    text = str(value)
    if limit is not None and len(text) > limit:
        # Cut before escaping (escapes only lengthen it), then cut the escaped form.
        text = text[:limit]
        cut = shown(text, layout=layout, style=style)
        cut.truncate(max(1, limit - 1))
        cut.append("…")
        return cut
    return shown(text, layout=layout, style=style)


def one_line(sql: str, limit: int = 200) -> Text:
    """A statement squeezed onto one line for a table cell."""
    # Only the head can show; never split a multi-megabyte statement every refresh.
    # Only layout whitespace folds into a space: anything else is spelled out (plain).
    return plain(_LAYOUT_SPACE.sub(" ", sql[: limit * 4]).strip(" "), limit, layout=False)


_LAYOUT_SPACE = re.compile(r"[ \t\r\n]+")


def pretty_sql(sql: str) -> str:
    """The statement laid out by PostgreSQL's own grammar (pglast), or as sent if it
    does not parse (the policy engine has already said what it thinks of that)."""
    if len(sql) > _PRETTY_LIMIT:
        return sql
    try:
        import pglast

        return str(pglast.prettify(sql))
    except Exception:  # any parse or deparse failure: show the exact text instead
        return sql


def highlighted_sql(sql: str, pretty: bool = True) -> Text:
    """Syntax-highlighted SQL as a ``Text`` (Syntax never interprets markup).

    Parsing and highlighting cost milliseconds and the detail pane redraws every second
    (the countdown), so results are cached; callers get their own copy."""
    return _highlighted(sql, pretty).copy()


@functools.lru_cache(maxsize=256)
def _highlighted(sql: str, pretty: bool) -> Text:
    shown_chars = min(len(sql), _SHOW_LIMIT)
    code = sql[:shown_chars] if len(sql) > shown_chars else (pretty_sql(sql) if pretty
                                                            else sql)
    safe = visible(code, layout=True)
    if len(safe.text) > _SHOW_LIMIT:
        # Escapes take up to ten characters each: show as much of the head as fits the
        # same budget, or a statement of escapes costs the gateway's loop seconds.
        # (As sent, not pretty-printed: the pretty form is for statements that fit.)
        shown_chars = max(1, min(shown_chars, len(code) * _SHOW_LIMIT // len(safe.text)))
        safe = visible(sql[:shown_chars], layout=True)
    cut = shown_chars < len(sql)
    code = safe.text
    text = Syntax(code, "sql", theme="ansi_dark", word_wrap=True,
                  background_color="default").highlight(code)
    for start, end in safe.marks:
        text.stylize(MARK_STYLE, start, end)
    text.rstrip()
    if cut:
        text.append(f"\n… {len(sql) - shown_chars:,} more characters (export the session "
                    "for the full text)", style="bold yellow")
    return text


def ago(then: float, now: float) -> str:
    """``12s``, ``4m``, ``3h05``: how long ago, compactly."""
    seconds = max(0, int(now - then))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}"
    if seconds < 86400:
        return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}"
    return f"{seconds // 86400}d{(seconds % 86400) // 3600:02d}h"


def countdown(expires: float, now: float) -> Text:
    """Time left before a held statement times out, red when it is nearly gone."""
    left = expires - now
    if left <= 0:
        return Text("expired", style="bold red")
    seconds = int(left)
    label = f"{seconds // 60}:{seconds % 60:02d}"
    style = "bold red" if left < 30 else "yellow" if left < 120 else "green"
    return Text(label, style=style)


def clock(epoch: float | None) -> str:
    """``HH:MM:SS`` in UTC, like every time in the audit trail and the evidence."""
    if epoch is None:
        return "—"
    return time.strftime("%H:%M:%S", time.gmtime(epoch))


def stamp(epoch: float | None) -> str:
    """UTC date and time for history rows and evidence."""
    if epoch is None:
        return "—"
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S")


STATE_STYLES = {
    "active": "bold green",
    "idle": "dim",
    "in transaction": "yellow",
    "failed transaction": "bold red",
    "waiting": "bold magenta",
    "open": "",
}

DECISION_STYLES = {"allow": "green", "block": "bold red", "review": "bold yellow"}


def state_text(state: str) -> Text:
    label = "waiting for approval" if state == "waiting" else state
    return Text(label, style=STATE_STYLES.get(state, ""))


def decision_text(decision: str | None) -> Text:
    if not decision:
        return Text("—", style="dim")
    return Text(decision, style=DECISION_STYLES.get(decision, ""))


class FilterError(ValueError):
    pass


_FILTER_KEYS = ("identity", "target", "decision", "since", "until", "text")


def parse_filter(query: str, now: float) -> Filters:
    """``identity:alice target:appdb decision:block since:2h until:30m drop table``.

    ``since``/``until`` take a duration back from now (``90s``, ``2h``, ``7d``) or a
    date/time (``2026-05-09`` or ``2026-05-09T07:35``, UTC); words without a key search
    the statement text.
    """
    try:
        words = shlex.split(query)
    except ValueError as exc:
        raise FilterError(f"cannot read the filter: {exc}") from None
    values: dict[str, str] = {}
    free: list[str] = []
    for word in words:
        key, sep, value = word.partition(":")
        if sep and key.lower() in _FILTER_KEYS:
            if not value:
                raise FilterError(f"{key}: needs a value")
            values[key.lower()] = value
        elif sep and key.isalpha() and not key.lower().startswith("http"):
            raise FilterError(f"unknown filter {key!r}; use one of " + ", ".join(_FILTER_KEYS))
        else:
            free.append(word)
    if free:
        values["text"] = " ".join([values["text"], *free]) if "text" in values \
            else " ".join(free)
    decision = values.get("decision")
    if decision is not None and decision not in ("allow", "block", "review"):
        raise FilterError("decision: is one of allow, block, review")
    return Filters(since=_when(values.get("since"), now, "since"),
                   until=_when(values.get("until"), now, "until"),
                   identity=values.get("identity"), target=values.get("target"),
                   decision=decision, text=values.get("text"))


def _when(value: str | None, now: float, key: str) -> float | None:
    if value is None:
        return None
    try:
        return now - parse_duration(value)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise FilterError(f"{key}: expected a duration (2h, 7d) or a date like "
                          "2026-05-09T07:35 (UTC)") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()

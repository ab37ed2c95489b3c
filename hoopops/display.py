"""Agent-controlled text made safe to put on a human's terminal: one path for all of it.

An agent controls much of what the analyst reads: its SQL, ``application_name``, error
texts that quote its input, values in result samples. A terminal obeys what it is sent:
ESC/CSI/OSC sequences (and their 8-bit C1 forms such as ``\\x9b``) clear the screen,
retitle the window, plant hyperlinks or move the cursor to overwrite what the analyst is
reading; bidi overrides reorder the statement being approved; zero-width characters hide
text; thousands of line breaks push the real statement out of view.

``visible`` never drops or rewrites a character silently: each one a terminal would
obey, or that shows as nothing, becomes its escape (``\\x1b``, ``\\u202e``), and a flood
of blank lines or spaces becomes a count (``⟪4,998 line breaks⟫``). The console styles
these marks so they cannot pass for the agent's own text; plain-text output (the CLI)
shows the same marks unstyled. Exports (JSON, CSV) keep the exact data instead.

No Textual or Rich here: the CLI uses it too.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

# Every character of Unicode categories Cc (controls: C0, DEL, C1), Cf (format: bidi
# controls, zero-width characters, the soft hyphen, tag characters), Cs (lone surrogates,
# which cannot even be encoded for output) and Zl/Zp (line and paragraph separators, which
# some renderers break lines at). tests/test_display_injection.py checks this list
# against the running Python's Unicode database. Tab and line feed are allowed only where
# the caller says layout may use them.
_UNSAFE_CLASS = (
    "\x00-\x08\x0b-\x1f\x7f-\x9f\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891"
    "\u08e2\u180e\u200b-\u200f\u2028-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb"
    "\ud800-\udfff\U000110bd\U000110cd\U00013430-\U0001343f\U0001bca0-\U0001bca3"
    "\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f"
)
_UNSAFE_ONE_LINE = re.compile(f"[\t\n{_UNSAFE_CLASS}]")
_UNSAFE_LAYOUT = re.compile(f"[{_UNSAFE_CLASS}]")
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e"
                  "\u2066\u2067\u2068\u2069")

# More blank lines than this in a row, or more spaces, are summarised as a count: a real
# statement never needs them, and a hostile one uses them to push its tail out of view.
MAX_BLANK_LINES = 2
MAX_SPACES = 64
_FLOOD = re.compile(f"(?:[ \\t]*\\n){{{MAX_BLANK_LINES + 2},}}|[ \\t]{{{MAX_SPACES + 1},}}")


def escape_char(char: str) -> str:
    """``\\x1b``, ``\\u202e``, ``\\U000e0041``: the code point, spelled out."""
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


@dataclass(frozen=True)
class Shown:
    """Text made safe to show, and where in it the marks are (for styling them)."""

    text: str
    #: (start, end) of each escape or flood count in ``text``.
    marks: tuple[tuple[int, int], ...] = ()


def visible(value: str, *, layout: bool = False) -> Shown:
    """``value`` with every character a terminal would obey, or that shows as nothing,
    spelled as its escape.

    ``layout``: keep line feeds and tabs (multi-line SQL, reports), summarising floods of
    blank lines and spaces. Otherwise the result is one line: line feeds and tabs are
    escaped too, so a value cannot hide its tail below a table row.
    """
    unsafe = _UNSAFE_LAYOUT if layout else _UNSAFE_ONE_LINE
    if unsafe.search(value) is None and not (layout and _FLOOD.search(value)):
        return Shown(value)  # the common case: nothing to do, no copy
    pattern = _FLOOD_OR_UNSAFE if layout else _UNSAFE_ONE_LINE
    parts: list[str] = []
    marks: list[tuple[int, int]] = []
    length = 0
    last = 0
    for match in pattern.finditer(value):
        start = match.start()
        if start > last:
            parts.append(value[last:start])
            length += start - last
        found = match.group()
        if len(found) == 1 and unsafe.match(found):
            mark = escape_char(found)
            parts.append(mark)
            marks.append((length, length + len(mark)))
            length += len(mark)
        else:
            kept, mark, tail = _flood(found)
            parts.append(kept)
            length += len(kept)
            parts.append(mark)
            marks.append((length, length + len(mark)))
            length += len(mark)
            parts.append(tail)
            length += len(tail)
        last = match.end()
    parts.append(value[last:])
    return Shown("".join(parts), tuple(marks))


_FLOOD_OR_UNSAFE = re.compile(f"{_FLOOD.pattern}|[{_UNSAFE_CLASS}]")


def _flood(run: str) -> tuple[str, str, str]:
    """A run of blank lines or spaces -> (kept head, count mark, kept tail)."""
    breaks = run.count("\n")
    if breaks:
        hidden = breaks - MAX_BLANK_LINES
        return "\n", f"⟪{hidden:,} more line breaks⟫", "\n" * (MAX_BLANK_LINES - 1)
    return " ", f"⟪{len(run):,} spaces⟫", " "


def terminal(value: object, *, layout: bool = False) -> str:
    """``visible`` as a plain string, for printing (the CLI's human output)."""
    return visible("" if value is None else str(value), layout=layout).text


_LAYOUT_SPACE = re.compile(r"[ \t\r\n]+")


def folded(value: str | None, limit: int) -> str:
    """One line of at most ``limit`` characters for a table: runs of spaces, tabs and line
    breaks become one space (only those; anything else is spelled out), then cut with
    ``…``. Only the head is looked at, so a megabyte statement costs nothing."""
    flat = terminal(_LAYOUT_SPACE.sub(" ", (value or "")[: limit * 4]).strip(" "))
    return flat if len(flat) <= limit else flat[: max(1, limit - 1)] + "…"


@functools.lru_cache(maxsize=256)
def hidden_characters(value: str) -> str:
    """What an analyst should be warned of before approving ``value``, in words (``""``
    when nothing): bidi controls reorder what they read, invisible and control
    characters hide or change it. Counted in C (str.count, re.sub), not per character
    in Python: a megabyte of them must not stall the loop the gateway shares."""
    if _UNSAFE_LAYOUT.search(value) is None:
        return ""
    total = len(value) - len(_UNSAFE_LAYOUT.sub("", value))
    control = len(value) - len(_CONTROL.sub("", value))
    bidi = sum(map(value.count, _BIDI))
    invisible = total - control - bidi
    found = [f"{n} {what}" for n, what in ((bidi, "bidi control(s)"),
                                           (invisible, "invisible character(s)"),
                                           (control, "control character(s)")) if n]
    return ", ".join(found)

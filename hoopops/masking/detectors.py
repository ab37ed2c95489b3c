"""Value detectors: find sensitive values by what they look like, whatever column they are in.

Detectors are the backstop behind column rules (arithmetic or string tricks defeat any
pattern), so they favour cheap, well-validated matches: card numbers must pass Luhn and
IBANs the ISO 7064 mod-97 check. Numbers count only as whole tokens, not inside a run of
letters and digits nor as the fraction of a decimal number, so hashes, UUIDs, hex or
base64 tokens (``98f1370821...``) and ``2488.4200000000000000`` are not taken for phone or
card numbers, which would change results that hold no sensitive data. Everything runs on
raw bytes in the client encoding.

Speed comes from a *probe* that can only answer "nothing here" or "maybe": Python's
regex engine costs tens of nanoseconds per candidate position, far too much per DataRow,
so the probe maps the bytes to a *shape* with one ``bytes.translate`` (digits and
capitals become ``0``; space, ``-``, ``.``, ``(`` and ``)`` become ``-``) and runs one
regex whose literal prefix ``0000`` lets the engine skip ahead at C speed: every SSN,
card, IBAN (``GB82 WEST ...`` is ``0000-0000-...``) and North American phone number
has a run of four, and ordinary data (ids, dates, amounts) has few, so few positions are
tried. Shapes whose run of four comes last (``000-00-0000``) are matched by fixed-width
lookbehind from it. ``@`` (email) and ``+`` (international phone) are single-byte tests.
A probe has no anchors, boundaries or lookaround beyond the characters of the value
itself, so a match inside a field is also a match in a whole payload (length headers
included); headers can only cause extra "maybe" answers, never a missed value. The one
exception is the probe for framed buffers (``DetectorSet.framed_probes``), which passes
over digit runs glued to a word where the value's own bytes, or its length, show that
no detector could match there (see ``_run_finder``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from hoopops.masking.strategies import REDACT, Strategy

Validator = Callable[[bytes], bool]

SHAPE = bytes(48 if 48 <= b <= 57 or 65 <= b <= 90 else 45 if b in b" -.()" else b
              for b in range(256))


@dataclass(frozen=True)
class Detector:
    """A named pattern, an optional validator of each match, and the strategy for hits.

    The probe fields say where a match can possibly be: ``needs_at`` (an ``@``),
    ``needs_plus`` (a ``+``), ``shape_tails`` (regex alternatives following a ``0000`` in
    the shape) or ``prefilter`` (a raw bytes regex, for custom detectors). A detector
    with none of them is scanned on every value.
    """

    name: str
    pattern: re.Pattern[bytes]
    strategy: Strategy = REDACT
    validate: Validator | None = None
    needs_at: bool = False
    needs_plus: bool = False
    shape_tails: tuple[bytes, ...] = ()
    prefilter: bytes | None = None
    # IBAN candidates may run into the next word; ``trim`` says where the IBAN ends.
    trim: Callable[[bytes], int] | None = None

    @property
    def probed(self) -> bool:
        return bool(self.needs_at or self.needs_plus or self.shape_tails or self.prefilter)

    def with_strategy(self, strategy: Strategy) -> Detector:
        return Detector(self.name, self.pattern, strategy, self.validate, self.needs_at,
                        self.needs_plus, self.shape_tails, self.prefilter, self.trim)


# -- validators ---------------------------------------------------------------------------------


def digits_of(text: bytes) -> bytes:
    return bytes(c for c in text if 48 <= c <= 57)


def luhn_ok(digits: bytes) -> bool:
    """The Luhn (mod 10) check every payment card number carries."""
    total = 0
    double = False
    for char in reversed(digits):
        value = char - 48
        if double:
            value *= 2
            if value > 9:
                value -= 9
        total += value
        double = not double
    return total % 10 == 0


def _card_ok(match: bytes) -> bool:
    digits = digits_of(match)
    # Issuer ranges in use start with 2-6 (Mastercard 2/5, Amex/Diners/JCB 3, Visa 4,
    # Discover/UnionPay 6); this removes most Luhn coincidences in ordinary numbers.
    return 13 <= len(digits) <= 19 and 50 <= digits[0] <= 54 and luhn_ok(digits)


def _ssn_ok(match: bytes) -> bool:
    digits = digits_of(match)
    area, group, serial = digits[:3], digits[3:5], digits[5:]
    # The SSA never issues area 000, 666 or 900-999, group 00 or serial 0000.
    return (area not in (b"000", b"666") and area[0] != 57 and group != b"00"
            and serial != b"0000")


# Registry lengths per country (ISO 13616); a candidate from another country only needs
# a plausible length and the checksum.
IBAN_LENGTHS: dict[bytes, int] = {
    k.encode(): v for k, v in {
        "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22,
        "BH": 22, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22,
        "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FO": 18, "FR": 27,
        "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28,
        "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20,
        "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MD": 24,
        "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18, "NO": 15, "PK": 24,
        "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24, "SC": 31,
        "SE": 24, "SI": 19, "SK": 24, "SM": 27, "ST": 25, "SV": 28, "TL": 23, "TN": 24,
        "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
    }.items()
}


def iban_ok(compact: bytes) -> bool:
    """ISO 7064 mod 97-10 over an IBAN without spaces (country, check digits, BBAN)."""
    if not 15 <= len(compact) <= 34:
        return False
    expected = IBAN_LENGTHS.get(compact[:2])
    if expected is not None and expected != len(compact):
        return False
    rearranged = compact[4:] + compact[:4]
    remainder = 0
    for char in rearranged:
        if 48 <= char <= 57:
            remainder = (remainder * 10 + char - 48) % 97
        elif 65 <= char <= 90:
            remainder = (remainder * 100 + char - 55) % 97
        else:
            return False
    return remainder == 1


def _iban_trim(match: bytes) -> int:
    """Length of the longest valid IBAN at the start of ``match`` (0 if none).

    The pattern is greedy over groups of letters and digits, so ``DE89 3704 ... 00 BIS``
    can swallow a following word; the registry length says where the IBAN ends.
    """
    compact_positions = [i for i, c in enumerate(match) if c != 32]
    expected = IBAN_LENGTHS.get(match[:2])
    lengths = [expected] if expected is not None else range(
        min(34, len(compact_positions)), 14, -1)
    for length in lengths:
        if length > len(compact_positions):
            continue
        end = compact_positions[length - 1] + 1
        if iban_ok(match[:end].replace(b" ", b"")):
            return end
    return 0


# -- the built-in detectors ------------------------------------------------------------------

_SSN = Detector(
    "ssn",
    re.compile(rb"(?<![0-9A-Za-z])(?<![0-9]\.)[0-9]{3}([- ])[0-9]{2}\1[0-9]{4}(?![0-9A-Za-z])"),
    validate=_ssn_ok,
    shape_tails=(rb"(?<=000-00-0000)",),
)
_CARD = Detector(
    "credit_card",
    # Contiguous, 4-4-4-4(-3) or 4-6-5/4-6-4 groups with one consistent separator.
    re.compile(rb"(?<![0-9A-Za-z])(?<![0-9]\.)(?:[0-9]{13,19}|[0-9]{4}([ -])[0-9]{4}\1[0-9]{4}\1"
               rb"[0-9]{1,4}(?:\1[0-9]{1,3})?|[0-9]{4}([ -])[0-9]{6}\2[0-9]{4,5})"
               rb"(?![0-9A-Za-z])"),
    validate=_card_ok,
    shape_tails=(rb"000000000", rb"-0000-0000-0", rb"-000000-0000"),
)
_EMAIL = Detector(
    "email",
    # Bounded repeats keep the scan linear on long values with a stray '@'.
    re.compile(rb"[A-Za-z0-9._%+'-]{1,64}@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)"
               rb"{1,8}[A-Za-z]{2,24}(?![A-Za-z0-9-])"),
    needs_at=True,
)
_IBAN = Detector(
    "iban",
    # Electronic (compact) or printed (groups of four) form, as ISO 13616 writes them.
    re.compile(rb"(?<![A-Za-z0-9])[A-Z]{2}[0-9]{2}(?:[A-Z0-9]{11,30}|(?: [A-Z0-9]{4}){2,7}"
               rb"(?: [A-Z0-9]{1,4})?)(?![a-z0-9])"),
    # 15+ letters and digits: either one run, or 0000-0000-0000-0 in the shape.
    shape_tails=(rb"00000000000", rb"-0000-0000-0"),
    trim=_iban_trim,
)
_PHONE = Detector(
    "phone",
    re.compile(
        rb"(?<![0-9A-Za-z+])(?<![0-9]\.)(?:\+?1[-. ]?)?(?:\([2-9][0-9]{2}\)|[2-9][0-9]{2})[-. ]?"
        rb"[2-9][0-9]{2}[-. ]?[0-9]{4}(?![0-9A-Za-z])"
        rb"|(?<![0-9A-Za-z+])(?<![0-9]\.)\+[1-9](?:[ .-]?[0-9]){6,14}(?![0-9A-Za-z])"),
    # The run of four is the line number: look back over exchange and area code, with
    # up to two separators after the area code ("(555) ") and one after the exchange.
    shape_tails=(rb"000000", *(b"(?<=000" + a + b"000" + b + b"0000)"
                              for a in (b"", b"-", b"--") for b in (b"", b"-"))),
    needs_plus=True,
)

# Buffer probes (see DetectorSet.buffer_probes); each starts with a literal, so the regex
# engine skips to candidates at C speed.
_AT_PROBE = re.compile(rb"@(?<=[A-Za-z0-9._%+'-]@)[A-Za-z0-9]").search
_BARE_AT = re.compile(rb"@").search
_PLUS_PROBE = re.compile(rb"\+[1-9]").search
_BARE_PLUS = re.compile(rb"\+").search

BUILTIN: dict[str, Detector] = {d.name: d for d in (_EMAIL, _IBAN, _CARD, _SSN, _PHONE)}
# The patterns whose matches start after a byte that is not a letter or digit and hold no
# lower-case letter (see _run_finder).
_BOUNDED = frozenset(d.pattern for d in (_IBAN, _CARD, _SSN, _PHONE))
# Longer, more specific shapes first: a phone pattern must not eat the middle of a card.
_ORDER = ("email", "iban", "credit_card", "ssn", "phone")


def builtin(name: str, strategy: Strategy | None = None) -> Detector:
    base = BUILTIN[name]
    return base if strategy is None else base.with_strategy(strategy)


# Anything that makes a match depend on its surroundings: anchors, boundaries, lookaround
# and backreferences. A pattern without them matches a field exactly when it matches
# somewhere in a payload holding that field. Escaped literals are flagged too; that only
# costs speed (the detector then scans every value), never a missed value.
_CONTEXT_SENSITIVE = re.compile(r"[\^$]|\\[bBAZ0-9]|\(\?(?:[=!(]|<[=!]|P=)")


def custom(name: str, pattern: str, strategy: Strategy) -> Detector:
    r"""A user-defined detector. The pattern is a Python regex matched against raw bytes,
    so ``\d`` and ``\w`` mean ASCII; raises ``re.error`` for a bad pattern."""
    raw = pattern.encode("utf-8")
    compiled = re.compile(raw)
    if compiled.search(b"") is not None:
        raise re.error("pattern matches the empty string, so it would match every value")
    safe = _CONTEXT_SENSITIVE.search(pattern) is None
    return Detector(name, compiled, strategy, prefilter=raw if safe else None)


class DetectorSet:
    """Detectors in their scan order, with one combined probe."""

    def __init__(self, detectors: Iterable[Detector]) -> None:
        chosen = {d.name: d for d in detectors}
        ordered = [chosen[n] for n in _ORDER if n in chosen]
        ordered += [d for n, d in chosen.items() if n not in _ORDER]
        self.detectors: tuple[Detector, ...] = tuple(ordered)
        self.always_scan = any(not d.probed for d in self.detectors)
        self._needs_at = any(d.needs_at for d in self.detectors)
        self._needs_plus = any(d.needs_plus for d in self.detectors)
        tails = list(dict.fromkeys(t for d in self.detectors for t in d.shape_tails))
        self._shape_rx = re.compile(b"0000" + _alternation(tails)).search if tails else None
        self._raw = tuple(re.compile(d.prefilter).search for d in self.detectors
                          if d.prefilter is not None)
        self._quick = [_quick_check(d) for d in self.detectors]
        self._subs = [_substitute(d) for d in self.detectors]
        #: ``may_match(data)``: False guarantees that no detector matches anywhere inside
        #: ``data``. A closure specialised to the configured detectors, because it runs
        #: once per DataRow.
        self.may_match: Callable[[bytes], bool] = self._probe()
        #: The probe for a buffer of many rows: ``(search, on_shape)`` pairs, where
        #: ``search(text, pos=0)`` finds the next place a detector could match in the
        #: buffer (``on_shape``: in ``buffer.translate(SHAPE)``), or ``(None, False)``
        #: when some detector has no probe and every value must be scanned.
        self.buffer_probes: tuple[tuple[Any, bool], ...] = self._buffer_probes()
        #: :attr:`buffer_probes` for *framed* text: buffers where every value is preceded
        #: by a byte that is not an ASCII letter or digit, or by an Int32 length whose
        #: first byte is below ``0x30`` (DataRows, COPY text with such a delimiter).
        #: There a run of digits glued to the end of a word (hex digests, tokens) can be
        #: passed over: no built-in detector starts a match inside a word.
        self.framed_probes: tuple[tuple[Any, bool], ...] = self._buffer_probes(framed=True)

    def _buffer_probes(self, framed: bool = False) -> tuple[tuple[Any, bool], ...]:
        if self.always_scan:
            return ((None, False),)
        probes: list[tuple[Any, bool]] = []
        tails = [t for d in self.detectors for t in d.shape_tails]
        needles = _shape_needles(tails)
        if needles is not None:
            # Every bytes.find is a pass over the whole buffer, and digit-heavy shapes
            # make each pass slow: needles holding the anchor share one pass.
            grouped = [n for n in needles if _ANCHOR in n]
            if len(grouped) > 1:
                probes.append((_anchored_finder(grouped), True))
                needles = [n for n in needles if _ANCHOR not in n]
            # Every shape probe here belongs to a built-in detector, whose matches begin
            # after a byte that is not a letter or digit; a custom one could begin anywhere.
            bounded = framed and all(d.pattern in _BOUNDED for d in self.detectors
                                     if d.shape_tails)
            probes += [(_run_finder(needle) if bounded and needle.strip(b"0") == b""
                        else _finder(needle), True) for needle in needles]
        elif self._shape_rx is not None:
            probes.append((_span(self._shape_rx), True))
        # A buffer of masked rows holds an "@" in every masked email ("***@example.com"),
        # so the buffer probe asks for what the email pattern needs around its "@": a
        # local-part character before it and a letter or digit after it.
        searches = []
        for detector in self.detectors:
            if detector.needs_at:
                searches.append(_AT_PROBE if detector.pattern is _EMAIL.pattern else _BARE_AT)
            if detector.needs_plus:
                searches.append(_PLUS_PROBE if detector.pattern is _PHONE.pattern
                                else _BARE_PLUS)
        searches += [re.compile(d.prefilter).search for d in self.detectors
                     if d.prefilter is not None]
        probes += [(_span(search), False) for search in dict.fromkeys(searches)]
        return tuple(probes)

    def _probe(self) -> Callable[[bytes], bool]:
        if self.always_scan:
            return lambda data: True
        rx = self._shape_rx
        raw = self._raw
        at = self._needs_at
        plus = self._needs_plus
        table = SHAPE
        # ``64 in data`` is a bare memchr; ``b"@" in data`` costs ten times more.
        if rx is not None and at and not plus and not raw:
            return lambda data: 64 in data or rx(data.translate(table)) is not None
        if rx is not None and not at and not plus and not raw:
            return lambda data: rx(data.translate(table)) is not None

        def probe(data: bytes) -> bool:
            if (at and 64 in data) or (plus and 43 in data):
                return True
            if rx is not None and rx(data.translate(table)) is not None:
                return True
            return any(search(data) is not None for search in raw)

        return probe

    def __bool__(self) -> bool:
        return bool(self.detectors)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.detectors)

    def scan(self, value: bytes, counts: dict[str, int]) -> bytes:
        """``value`` with every validated match replaced by its detector's strategy.

        ``counts[detector name]`` grows by one per replacement. Returns ``value`` itself
        (the same object) when nothing matched, so callers can test with ``is``.
        """
        out = value
        shape = value.translate(SHAPE)
        for detector, sub, quick in zip(self.detectors, self._subs, self._quick, strict=True):
            if quick is not None and not quick(out, shape):
                continue
            hits = [0]
            replaced = sub(out, hits)
            if hits[0]:
                counts[detector.name] = counts.get(detector.name, 0) + hits[0]
                out = replaced
                shape = out.translate(SHAPE)
        return out

    def first_match(self, value: bytes) -> str | None:
        """The first detector with a validated match anywhere in ``value``, or None."""
        shape = value.translate(SHAPE)
        for detector, sub, quick in zip(self.detectors, self._subs, self._quick, strict=True):
            if quick is not None and not quick(value, shape):
                continue
            hits = [0]
            sub(value, hits)
            if hits[0]:
                return detector.name
        return None


def _span(search: Callable[..., re.Match[bytes] | None]
          ) -> Callable[[bytes, int], tuple[int, int] | None]:
    def find(text: bytes, pos: int = 0) -> tuple[int, int] | None:
        match = search(text, pos)
        return None if match is None else match.span()
    return find


def _finder(needle: bytes) -> Callable[[bytes, int], tuple[int, int] | None]:
    size = len(needle)

    def find(text: bytes, pos: int = 0) -> tuple[int, int] | None:
        at = text.find(needle, pos)
        return None if at < 0 else (at, at + size)
    return find


# Shape bytes of ASCII letters and digits (digits and capitals are "0").
_WORD = frozenset(b"0abcdefghijklmnopqrstuvwxyz")
_NOT_DIGIT = re.compile(rb"[^0]")  # in the shape: the end of a run of digits
# A value at the start of a run is preceded by its Int32 length, whose first byte is below
# 0x30 (not a letter or digit) for any value shorter than this, so a buffer shorter than
# this cannot hold a value that looks glued to a word.
_FRAMED_LIMIT = 0x30000000


def _run_finder(needle: bytes) -> Callable[[bytes, int], tuple[int, int] | None]:
    """:func:`_finder` for a needle of digits only (``0000000000000``) in framed text,
    skipping runs glued to the end of a word: ``d7dca89a1678042477183b7ac``, where the
    run ``1678042477183`` follows ``ca89a``.

    Every built-in detector that a run of digits could trigger (card, IBAN, SSN, phone)
    starts its match after a byte that is not a letter or digit (its first lookbehind)
    and never takes a lower-case letter; so a match overlapping such a run cannot reach
    back over the letter before it, and cannot start inside it or at its first byte.
    That letter is part of the value too, unless the run starts the value: then the four
    bytes before it are the value's length, and those four are not all letters and
    digits in a buffer shorter than :data:`_FRAMED_LIMIT` (the length's first byte is
    below 0x30). So a run is skipped only when the four bytes before it are all letters
    or digits and the last of them a letter: the detectors on the value would not match
    there either.
    """
    size = len(needle)
    word = _WORD
    run_end = _NOT_DIGIT.search

    def find(text: bytes, pos: int = 0) -> tuple[int, int] | None:
        at = text.find(needle, pos)
        if len(text) >= _FRAMED_LIMIT:
            return None if at < 0 else (at, at + size)
        while at >= 0:
            # The leftmost match starts its run, unless the run began before ``pos``: a
            # run found before and not skipped, so this part is a candidate as well.
            if at < 4 or text[at - 1] == 48 or text[at - 1] not in word or \
                    text[at - 2] not in word or text[at - 3] not in word or \
                    text[at - 4] not in word:
                return at, at + size
            after = run_end(text, at + size)  # past the run, in C however long it is
            if after is None:
                return None
            at = text.find(needle, after.start())
        return None

    return find


# Anchors one search looks at before it falls back to a pass per needle, which bounds
# the Python work per search whatever the text holds.
_ANCHOR_TRIES = 16
# In the shape of every separated layout (SSN, grouped cards and IBANs, phone numbers),
# rare in ordinary data (dates are ``0000-00-00``, masked SSNs ``***-**-0000``).
_ANCHOR = b"0-0000"


def _anchored_finder(needles: list[bytes]) -> Callable[[bytes, int], tuple[int, int] | None]:
    """``find(text, pos)``: the leftmost occurrence of any of ``needles`` (each holding
    :data:`_ANCHOR`) that starts at ``pos`` or later, as ``(start, end)``, found by one
    pass for the anchor and a ``startswith`` per needle at each anchor found.

    Leftmost over all needles is what keeps the buffer probe sound (see
    ``RowRewriter._scan``): an occurrence at ``s`` is enumerated through the first anchor
    inside it, at ``s + offset`` >= ``pos``; anchors further on cannot give an occurrence
    starting before the best one found once they lie more than the largest offset past it.
    """
    table = [(needle, needle.find(_ANCHOR)) for needle in needles]
    furthest = max(offset for _, offset in table)

    def find(text: bytes, pos: int = 0) -> tuple[int, int] | None:
        best = -1
        size = 0
        at = text.find(_ANCHOR, pos)
        tries = _ANCHOR_TRIES
        while at >= 0:
            if best >= 0 and at - furthest > best:
                break
            tries -= 1
            if not tries:
                # Anchors without needles (text made of them): a pass per needle, in C.
                found = [(start, len(needle)) for needle in needles
                         if (start := text.find(needle, pos)) >= 0]
                if not found:
                    return None
                start, length = min(found)
                return start, start + length
            for needle, offset in table:
                start = at - offset
                if start >= pos and (best < 0 or start < best) and text.startswith(
                        needle, start):
                    best, size = start, len(needle)
            at = text.find(_ANCHOR, at + 1)
        return None if best < 0 else (best, best + size)

    return find


_SHAPE_LITERAL = re.compile(rb"[0-]+")


def _shape_needles(tails: list[bytes]) -> list[bytes] | None:
    """The shape probe as plain substrings, when every tail is a literal: ``0000`` plus
    the tail, or the body of a lookbehind. ``bytes.find`` skips through a buffer many
    times faster than the regex engine tries each ``0000`` in it (dates, amounts and
    hex digests are full of them). Needles holding a shorter one are left out: the
    shorter one is found wherever they would be."""
    literals = set()
    for tail in tails:
        if tail.startswith(b"(?<=") and tail.endswith(b")"):
            literal = tail[4:-1]
            if not literal.endswith(b"0000"):
                return None
        else:
            literal = b"0000" + tail
        if not _SHAPE_LITERAL.fullmatch(literal):
            return None
        literals.add(literal)
    return sorted(n for n in literals if not any(o != n and o in n for o in literals)) \
        if literals else None


_LITERAL = re.compile(rb"[0-9A-Za-z -]+")


def _alternation(tails: list[bytes]) -> bytes:
    """A regex group matching any of ``tails``, literal ones factored into a trie.

    The engine tries the group at every ``0000`` in the shape, and digits are common;
    with shared prefixes factored out, a failing attempt costs a character or two
    instead of one comparison per alternative.
    """
    literal = [t for t in tails if _LITERAL.fullmatch(t)]
    other = [t for t in tails if not _LITERAL.fullmatch(t)]

    def trie(words: list[bytes]) -> bytes:
        if words == [b""]:
            return b""
        groups: dict[bytes, list[bytes]] = {}
        for word in words:
            groups.setdefault(word[:1], []).append(word[1:])
        branches = []
        for first, rests in sorted(groups.items()):
            if first == b"":
                continue
            rest = trie(sorted(set(rests)))
            branches.append(re.escape(first) + rest)
        optional = b"" in groups
        body = branches[0] if len(branches) == 1 else b"(?:" + b"|".join(branches) + b")"
        return b"(?:" + body + b")?" if optional else body

    parts = ([trie(sorted(set(literal)))] if literal else []) + other
    return b"(?:" + b"|".join(parts) + b")"


def _quick_check(detector: Detector) -> Callable[[bytes, bytes], bool] | None:
    """The probe of one detector, given a value and its shape."""
    if not detector.probed:
        return None
    tails = (re.compile(b"0000" + _alternation(list(detector.shape_tails))).search
             if detector.shape_tails else None)
    raw = re.compile(detector.prefilter).search if detector.prefilter is not None else None
    needs_at = detector.needs_at
    needs_plus = detector.needs_plus

    def quick(value: bytes, shape: bytes) -> bool:
        return ((needs_at and 64 in value) or (needs_plus and 43 in value)
                or (tails is not None and tails(shape) is not None)
                or (raw is not None and raw(value) is not None))

    return quick


def _substitute(detector: Detector) -> Callable[[bytes, list[int]], bytes]:
    """``run(value, hits)``: every validated match masked, ``hits[0]`` counting them."""
    pattern = detector.pattern
    validate = detector.validate
    trim = detector.trim
    strategy = detector.strategy

    def mask(text: bytes) -> bytes:
        masked = strategy.apply(text)
        # In free text there is no NULL to give: a null strategy redacts the span.
        return b"****" if masked is None else masked

    search = pattern.search

    def run(value: bytes, hits: list[int]) -> bytes:
        # Not pattern.sub: a candidate that fails validation must not hide a valid value
        # overlapping it ("555-867-5309 4111 1111 1111 1111" reads as the candidate card
        # "5309 4111 1111 1111" first), so the search resumes one byte after its start.
        out: list[bytes] = []
        copied = 0
        match = search(value)
        while match is not None:
            text = match.group(0)
            start, end = match.span()
            if trim is not None:
                cut = trim(text)
                if cut:
                    hits[0] += 1
                    out += (value[copied:start], mask(text[:cut]), run(text[cut:], hits))
                    copied = end
                    match = search(value, end)
                    continue
            elif validate is None or validate(text):
                hits[0] += 1
                out += (value[copied:start], mask(text))
                copied = end
                match = search(value, max(end, start + 1))
                continue
            match = search(value, start + 1)
        if not out:
            return value
        out.append(value[copied:])
        return b"".join(out)

    return run


__all__ = [
    "BUILTIN", "IBAN_LENGTHS", "SHAPE", "Detector", "DetectorSet", "builtin", "custom",
    "digits_of", "iban_ok", "luhn_ok",
]

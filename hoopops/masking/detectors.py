"""Value detectors: find sensitive values by what they look like, whatever column they are in.

Detectors are the backstop behind column rules (arithmetic or string tricks defeat any
pattern), so they favour cheap, well-validated matches: card numbers must pass Luhn and
IBANs the ISO 7064 mod-97 check. Everything runs on raw bytes in the client encoding.

Each detector also has a *prefilter*: a bytes pattern without anchors, boundaries or
lookaround that matches wherever the detector could. Because such a pattern matches any
string containing a match, it can run over a whole DataRow payload (length headers and
all) in one ``search`` call; only payloads that hit are split into fields.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from hoopops.masking.strategies import REDACT, Strategy

Validator = Callable[[bytes], bool]


@dataclass(frozen=True)
class Detector:
    """A named pattern, an optional validator of each match, and the strategy for hits."""

    name: str
    pattern: re.Pattern[bytes]
    strategy: Strategy = REDACT
    validate: Validator | None = None
    prefilter: bytes | None = None  # None: no safe prefilter, always scan
    # IBAN candidates may run into the next word; the validator then trims them.
    trim: Callable[[bytes], int] | None = None


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
    re.compile(rb"(?<![0-9])[0-9]{3}([- ])[0-9]{2}\1[0-9]{4}(?![0-9])"),
    validate=_ssn_ok,
    prefilter=rb"[0-9]{3}[- ][0-9]{2}[- ][0-9]{4}",
)
_CARD = Detector(
    "credit_card",
    re.compile(rb"(?<![0-9])[0-9](?:[ -]?[0-9]){12,18}(?![0-9])"),
    validate=_card_ok,
    prefilter=rb"[0-9](?:[ -]?[0-9]){12}",
)
_EMAIL = Detector(
    "email",
    # Bounded repeats keep the scan linear on long values with a stray '@'.
    re.compile(rb"[A-Za-z0-9._%+'-]{1,64}@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)"
               rb"{1,8}[A-Za-z]{2,24}(?![A-Za-z0-9-])"),
    prefilter=rb"@",
)
_IBAN = Detector(
    "iban",
    re.compile(rb"(?<![A-Za-z0-9])[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]){11,30}(?![a-z0-9])"),
    prefilter=rb"[A-Z]{2}[0-9]{2}",
    trim=_iban_trim,
)
_PHONE = Detector(
    "phone",
    re.compile(
        rb"(?<![0-9+])(?:\+?1[-. ]?)?(?:\([2-9][0-9]{2}\)|[2-9][0-9]{2})[-. ]?[2-9][0-9]{2}"
        rb"[-. ]?[0-9]{4}(?![0-9])"
        rb"|(?<![0-9+])\+[1-9](?:[ .-]?[0-9]){6,14}(?![0-9])"),
    prefilter=rb"[0-9]{3}\)?[-. ]?[0-9]{3}[-. ]?[0-9]{4}|\+[1-9][ .-]?[0-9]",
)

BUILTIN: dict[str, Detector] = {d.name: d for d in (_EMAIL, _IBAN, _CARD, _SSN, _PHONE)}
# Longer, more specific shapes first: a phone pattern must not eat the middle of a card.
_ORDER = ("email", "iban", "credit_card", "ssn", "phone")


def builtin(name: str, strategy: Strategy | None = None) -> Detector:
    base = BUILTIN[name]
    if strategy is None:
        return base
    return Detector(base.name, base.pattern, strategy, base.validate, base.prefilter, base.trim)


# Anything that makes a match depend on its surroundings: anchors, boundaries, lookaround
# and backreferences. A pattern without them matches a field exactly when it matches
# somewhere in a payload holding that field. Escaped literals are flagged too; that only
# costs speed (the detector then scans every field), never a missed value.
_CONTEXT_SENSITIVE = re.compile(r"[\^$]|\\[bBAZ0-9]|\(\?(?:[=!]|<[=!]|P=)")


def custom(name: str, pattern: str, strategy: Strategy) -> Detector:
    """A user-defined detector. The pattern is a Python regex matched against raw bytes,
    so ``\\d`` and ``\\w`` mean ASCII; raises ``re.error`` for a bad pattern."""
    raw = pattern.encode("utf-8")
    compiled = re.compile(raw)
    if compiled.search(b"") is not None:
        raise re.error("pattern matches the empty string, so it would match every value")
    safe = _CONTEXT_SENSITIVE.search(pattern) is None
    return Detector(name, compiled, strategy, prefilter=raw if safe else None)


class DetectorSet:
    """Detectors in their scan order, with one combined prefilter."""

    def __init__(self, detectors: Iterable[Detector]) -> None:
        chosen = {d.name: d for d in detectors}
        ordered = [chosen[n] for n in _ORDER if n in chosen]
        ordered += [d for n, d in chosen.items() if n not in _ORDER]
        self.detectors: tuple[Detector, ...] = tuple(ordered)
        self.always_scan = any(d.prefilter is None for d in self.detectors)
        # Built-in prefilters share one alternation (one pass over the bytes); custom ones
        # stay separate because their inline flags cannot be combined into one pattern.
        combined = b"|".join(b"(?:" + d.prefilter + b")" for d in self.detectors
                             if d.name in BUILTIN and d.prefilter is not None)
        self._prefilters = [re.compile(combined).search] if combined else []
        self._prefilters += [re.compile(d.prefilter).search for d in self.detectors
                             if d.name not in BUILTIN and d.prefilter is not None]
        self._subs = [self._substitute(d) for d in self.detectors]
        self._each = [None if d.prefilter is None else re.compile(d.prefilter).search
                      for d in self.detectors]

    def __bool__(self) -> bool:
        return bool(self.detectors)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.detectors)

    def may_match(self, data: bytes, start: int = 0, end: int | None = None) -> bool:
        """Cheap test: False guarantees no detector matches inside ``data[start:end]``."""
        if self.always_scan:
            return True
        stop = len(data) if end is None else end
        return any(search(data, start, stop) is not None for search in self._prefilters)

    def scan(self, value: bytes, counts: dict[str, int]) -> bytes:
        """``value`` with every validated match replaced by its detector's strategy.

        ``counts[detector name]`` is increased per replacement. Returns ``value`` itself
        (the same object) when nothing matched, so callers can test with ``is``.
        """
        out = value
        for detector, sub, quick in zip(self.detectors, self._subs, self._each, strict=True):
            if quick is not None and quick(out) is None:
                continue
            hits = [0]
            replaced = sub(out, hits)
            if hits[0]:
                counts[detector.name] = counts.get(detector.name, 0) + hits[0]
                out = replaced
        return out

    def matches(self, value: bytes) -> str | None:
        """The first detector with a validated match anywhere in ``value``, or None."""
        for detector, sub in zip(self.detectors, self._subs, strict=True):
            hits = [0]
            sub(value, hits)
            if hits[0]:
                return detector.name
        return None

    @staticmethod
    def _substitute(detector: Detector) -> Callable[[bytes, list[int]], bytes]:
        pattern = detector.pattern
        validate = detector.validate
        trim = detector.trim
        strategy = detector.strategy

        def mask(text: bytes) -> bytes:
            masked = strategy.apply(text)
            # In free text there is no NULL to give: a null strategy redacts the span.
            return b"****" if masked is None else masked

        def run(value: bytes, hits: list[int]) -> bytes:
            def replace(match: re.Match[bytes]) -> bytes:
                text = match.group(0)
                if trim is not None:
                    end = trim(text)
                    if not end:
                        return text
                    hits[0] += 1
                    return mask(text[:end]) + run(text[end:], hits)
                if validate is not None and not validate(text):
                    return text
                hits[0] += 1
                return mask(text)

            return pattern.sub(replace, value)

        return run


__all__ = [
    "BUILTIN", "IBAN_LENGTHS", "Detector", "DetectorSet", "builtin", "custom", "digits_of",
    "iban_ok", "luhn_ok",
]

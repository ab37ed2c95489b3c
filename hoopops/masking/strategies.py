"""Masking strategies: what a sensitive value becomes before it leaves the gateway.

Every strategy works on the raw bytes of a value as the server sent them (the client
encoding), so nothing is decoded on the hot path and a value that is not valid UTF-8
cannot slip through a decode error. ``None`` stands for SQL NULL.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

REDACTED = b"****"

# Strictness ranks: when several rules cover one result column the strictest wins, so a
# broad rule can never be weakened by a narrower-looking one elsewhere.
_RANK_NULL = 0
_RANK_REDACT = 1
_RANK_HASH = 2
_RANK_PARTIAL = 3
_RANK_DETECT = 4

_ALNUM = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
# ASCII letters and digits plus every byte of a multi-byte character are masked; only
# lead bytes count as characters, so a cut never lands inside a character.
_MASKED_BYTES = frozenset(_ALNUM) | frozenset(range(0x80, 0x100))
_COUNTED = frozenset(_ALNUM) | frozenset(range(0xC0, 0x100))
# Shape of a value for keep_last: counted characters become '*', the other bytes of
# multi-byte characters '+', everything else stays. The masked prefix of a value is the
# prefix of its shape with '+' turned into '*'.
_SHAPE_TABLE = bytes(42 if b in _COUNTED else 43 if b in _MASKED_BYTES else b
                     for b in range(256))
_SHAPE_CACHE = 4096
_HASH_HEX_CHARS = 32  # 128 bits of HMAC-SHA256: collisions are out of reach, tokens stay short


class StrategyError(ValueError):
    """A strategy spec that cannot be used; the message says what is accepted."""


@dataclass(frozen=True)
class Strategy:
    """One way to mask a value.

    ``kind`` is one of ``redact``, ``null``, ``keep_last``, ``email_domain``, ``hash``,
    ``detect``; ``label`` is what the audit trail shows (``last4`` for ``keep_last`` with
    4). ``detect`` is for free text that may hold sensitive values (notes, comments): the
    column's own values pass through the detectors, but a value *derived* from it is
    redacted whole, since a transformation (spacing digits out, reversing, translating)
    defeats any detector.
    """

    kind: str
    keep: int = 0
    key: bytes = field(default=b"", repr=False, compare=False)

    @property
    def label(self) -> str:
        return f"last{self.keep}" if self.kind == "keep_last" else self.kind

    @property
    def partial(self) -> bool:
        """True when the output reveals part of the input (unsafe on derived values)."""
        return self.kind in ("keep_last", "email_domain", "detect")

    @property
    def rank(self) -> int:
        return {"null": _RANK_NULL, "redact": _RANK_REDACT, "hash": _RANK_HASH,
                "detect": _RANK_DETECT}.get(self.kind, _RANK_PARTIAL)

    def whole(self) -> Strategy:
        """The strategy for a value merely derived from a sensitive one.

        ``substr(ssn, 1, 4)`` under ``last4`` would show the first four digits, so partial
        strategies become ``redact``; ``hash`` and ``null`` reveal nothing either way.
        """
        return REDACT if self.partial else self

    def field_function(self) -> Callable[[bytes], bytes] | None:
        """``f(value) -> Int32 length + masked value``: the strategy as it writes a
        DataRow field in one step (None for null, which has no value)."""
        kind = self.kind
        if kind in ("redact", "detect"):  # detect is applied by the plan; never raw here
            field = len(REDACTED).to_bytes(4, "big") + REDACTED
            return lambda value: field
        if kind == "keep_last":
            return keep_last_function(self.keep, prefixed=True)
        if kind == "email_domain":
            return _email_domain_field
        if kind == "hash":
            return partial(_hmac_field, self.key)
        return None

    def value_function(self) -> Callable[[bytes], bytes | None]:
        """:meth:`apply` specialised to this strategy (no dispatch per value)."""
        kind = self.kind
        if kind in ("redact", "detect"):
            return lambda value: REDACTED
        if kind == "null":
            return lambda value: None
        if kind == "keep_last":
            return keep_last_function(self.keep)
        if kind == "email_domain":
            return email_domain
        return partial(hmac_token, self.key)

    def apply(self, value: bytes) -> bytes | None:
        kind = self.kind
        if kind in ("redact", "detect"):
            return REDACTED
        if kind == "null":
            return None
        if kind == "keep_last":
            return keep_last_function(self.keep)(value)
        if kind == "email_domain":
            return email_domain(value)
        return hmac_token(self.key, value)


def keep_last(value: bytes, keep: int) -> bytes:
    """Mask every letter and digit but the last ``keep`` ones; punctuation stays.

    ``123-45-6789`` → ``***-**-6789``. A value with ``keep`` or fewer such characters is
    redacted whole, since "the last four" of a four-character value is all of it. Bytes
    of multi-byte characters count as letters, and the cut never splits a character, so
    the output stays valid UTF-8.
    """
    return keep_last_function(keep)(value)


_keepers: dict[tuple[int, bool], Callable[[bytes], bytes]] = {}


def keep_last_function(keep: int, prefixed: bool = False) -> Callable[[bytes], bytes]:
    """``keep_last`` for one ``keep``, specialised because it runs once per masked value.

    Values of one layout (SSNs, cards, phone numbers) share a *shape*; the masked prefix
    and the cut depend on the shape alone, so each layout is worked out once and later
    values cost a translate, a dict lookup and a concatenation. ``prefixed`` returns the
    result with its Int32 length prefix, as a DataRow field (the length also depends on
    the shape alone, so it is cached with the prefix).
    """
    known = _keepers.get((keep, prefixed))
    if known is not None:
        return known
    shapes: dict[bytes, tuple[int, bytes]] = {}
    lookup = shapes.get
    table = _SHAPE_TABLE

    def keeper(value: bytes) -> bytes:
        shape = value.translate(table)
        found = lookup(shape)
        if found is None:
            cut, head = _cut(shape, keep)
            if prefixed:
                size = len(head) if cut < 0 else len(shape)
                head = size.to_bytes(4, "big") + head
            found = (cut, head)
            if len(shapes) >= _SHAPE_CACHE:
                shapes.clear()
            shapes[shape] = found
        cut, head = found
        return head if cut < 0 else head + value[cut:]

    # The generated DataRow rewriters look shapes up inline and call the keeper only
    # for a shape not seen yet (see hoopops.masking.rewrite).
    keeper.shapes = shapes  # type: ignore[attr-defined]
    _keepers[(keep, prefixed)] = keeper
    return keeper


def _cut(shape: bytes, keep: int) -> tuple[int, bytes]:
    """(cut, masked head) for a shape; cut -1 means the whole value is redacted."""
    cut = len(shape)
    for _ in range(keep):
        cut = shape.rfind(42, 0, cut)
        if cut < 0:
            return -1, REDACTED
    if shape.find(42, 0, cut) < 0 and shape.find(43, 0, cut) < 0:
        return -1, REDACTED
    return cut, shape[:cut].replace(b"+", b"*")


#: What a host name may hold. The kept part of an email must be nothing but a domain:
#: keeping "everything after the @" would pass ``x @example.com 123-45-6789`` through raw.
DOMAIN_CHARS = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-"
MAX_DOMAIN = 253


def _keeps_domain(value: bytes, at: int) -> bool:
    return (0 < at < len(value) - 1 and len(value) - at - 1 <= MAX_DOMAIN
            and not value[at + 1:].translate(None, DOMAIN_CHARS))


def email_domain(value: bytes) -> bytes:
    """``alice@example.com`` → ``***@example.com``; anything else is redacted whole."""
    at = value.rfind(64)  # an int needle is a bare memrchr
    if not _keeps_domain(value, at):
        return REDACTED
    return b"***" + value[at:]


_REDACTED_FIELD = len(REDACTED).to_bytes(4, "big") + REDACTED
#: ``LENGTH_STARS[n]``: the Int32 length ``n`` followed by ``***``, the head of an
#: email_domain field, so a masked email costs one concatenation.
LENGTH_STARS = tuple(n.to_bytes(4, "big") + b"***" for n in range(4096))
_HASH_FIELD_PREFIX = (5 + _HASH_HEX_CHARS).to_bytes(4, "big") + b"hmac:"


def _email_domain_field(value: bytes) -> bytes:
    at = value.rfind(64)
    if not _keeps_domain(value, at):
        return _REDACTED_FIELD
    size = len(value) - at + 3
    if size < 4096:
        return LENGTH_STARS[size] + value[at:]
    return size.to_bytes(4, "big") + b"***" + value[at:]


def _hmac_field(key: bytes, value: bytes) -> bytes:
    return _HASH_FIELD_PREFIX + hmac.digest(key, value, hashlib.sha256).hex()[
        :_HASH_HEX_CHARS].encode()


def hmac_token(key: bytes, value: bytes) -> bytes:
    """Keyed HMAC-SHA256: equal inputs give equal tokens (joins still work) but the
    input cannot be recovered, nor guessed by hashing candidates, without the key."""
    return b"hmac:" + hmac.digest(key, value, hashlib.sha256).hex()[:_HASH_HEX_CHARS].encode()


REDACT = Strategy("redact")
NULL = Strategy("null")

STRATEGY_NAMES = ("redact", "null", "lastN (e.g. last4)", "keep_last", "email_domain", "hash",
                  "detect")


def parse_strategy(spec: object, hmac_secret: str | bytes | None, keep: object = None) -> Strategy:
    """A strategy from its YAML spelling: ``redact``, ``null``, ``last4``, ``keep_last``
    (with ``keep``), ``email_domain``, ``hash`` (alias ``hmac``), ``detect``."""
    if not isinstance(spec, str) or not spec:
        raise StrategyError(f"expected a strategy name, one of: {', '.join(STRATEGY_NAMES)}")
    name = spec.strip().lower()
    if name in ("redact", "null", "email_domain", "detect"):
        if keep is not None:
            raise StrategyError(f"'keep' only applies to keep_last, not {name}")
        return Strategy(name)
    if name in ("hash", "hmac"):
        if keep is not None:
            raise StrategyError("'keep' only applies to keep_last, not hash")
        if not hmac_secret:
            raise StrategyError(
                "strategy 'hash' needs a secret: set masking.hmac_secret (or "
                "masking.hmac_secret_env) in hoopops.yaml")
        key = hmac_secret.encode() if isinstance(hmac_secret, str) else bytes(hmac_secret)
        return Strategy("hash", key=key)
    if name.startswith("last") and name[4:].isdigit():
        if keep is not None:
            raise StrategyError(f"'{name}' already says how many to keep; drop 'keep'")
        return Strategy("keep_last", keep=_keep_count(int(name[4:])))
    if name == "keep_last":
        if keep is None:
            raise StrategyError("keep_last needs 'keep: N' (or write lastN, e.g. last4)")
        if isinstance(keep, bool) or not isinstance(keep, int):
            raise StrategyError("'keep' must be a whole number")
        return Strategy("keep_last", keep=_keep_count(keep))
    raise StrategyError(
        f"unknown strategy '{spec}'; expected one of: {', '.join(STRATEGY_NAMES)}")


def _keep_count(count: int) -> int:
    if not 1 <= count <= 16:
        raise StrategyError("keep_last keeps between 1 and 16 characters")
    return count


def combine(strategies: list[Strategy], direct: bool) -> Strategy:
    """One strategy for a column that several rules cover.

    A direct reference under exactly one strategy keeps it; anything else (a derived
    value, or a value that may come from differently-masked sources, as in a UNION) is
    masked whole with the strictest of them.
    """
    unique = set(strategies)
    if direct and len(unique) == 1:
        return strategies[0]
    strictest = min(strategies, key=lambda s: s.rank)
    return strictest.whole()

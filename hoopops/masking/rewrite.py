"""Rewrite message payloads: DataRow, COPY data, and the free text of server messages.

Everything here is pure (bytes in, bytes out) and keeps the protocol exact: field counts,
length prefixes, COPY escaping and quoting are rebuilt for every value that changes, and
values that do not change are copied as byte ranges without being decoded.

What a masked value becomes depends on its wire type, because the client must still be
able to decode it: text-like types get the strategy's output (their binary format is the
same bytes), json/jsonb get it as a JSON string, and every other type becomes NULL. So a
masked value is never sent raw, whatever format the client asked for.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import json
import re
import struct
from collections.abc import Callable, Sequence
from types import CodeType
from typing import Any

from hoopops.masking.codec import I16, I32, NULL_FIELD
from hoopops.masking.detectors import SHAPE, DetectorSet
from hoopops.masking.sources import CopyOptions
from hoopops.masking.strategies import _SHAPE_TABLE as KEEP_SHAPE
from hoopops.masking.strategies import (
    DOMAIN_CHARS,
    LENGTH_STARS,
    MAX_DOMAIN,
    REDACTED,
    Strategy,
)


class MaskingError(Exception):
    """Masking cannot go on safely; the relay must answer with an error, never the data."""

    sqlstate = "XX000"


class MaskingRefused(MaskingError):
    """The policy says this result may not be returned at all."""

    sqlstate = "42501"


# -- wire types ---------------------------------------------------------------------------------

TEXT_TYPES = frozenset({25, 1043, 1042, 19, 705, 18, 2275})  # text, varchar, bpchar, name, ...
JSON_OID = 114
JSONB_OID = 3802
INT4_OID = 23
INT8_OID = 20
NUMERIC_OID = 1700
# Types whose values cannot carry free text or long digit runs: detectors skip them.
SKIP_TYPES = frozenset({
    16, 17, 21, 26, 27, 28, 29, 5069, 650, 700, 701, 774, 829, 869, 1082, 1083, 1114, 1184,
    1186, 1266, 1560, 1562, 2202, 2203, 2204, 2205, 2206, 24, 4089, 4096, 2950, 3220,
})

# How a masked value of a column is written.
M_RAW, M_JSON, M_JSONB_BIN, M_NULL = range(4)
# How detectors treat an unmasked column.
(D_SKIP, D_TEXT, D_JSON, D_JSONB_BIN, D_NUMBER_TEXT, D_INT_BIN, D_NUMERIC_BIN,
 D_OPAQUE_BIN) = range(8)


def mask_class(type_oid: int, format_code: int) -> int:
    if type_oid in TEXT_TYPES:
        return M_RAW
    if type_oid == JSON_OID or (type_oid == JSONB_OID and format_code == 0):
        return M_JSON
    if type_oid == JSONB_OID:
        return M_JSONB_BIN
    return M_NULL


def detect_class(type_oid: int, format_code: int) -> int:
    if type_oid in SKIP_TYPES:
        return D_SKIP
    if type_oid in TEXT_TYPES:
        return D_TEXT
    if type_oid == JSON_OID or (type_oid == JSONB_OID and format_code == 0):
        return D_JSON
    if type_oid == JSONB_OID:
        return D_JSONB_BIN
    if type_oid == INT8_OID:
        return D_NUMBER_TEXT if format_code == 0 else D_INT_BIN
    if type_oid == INT4_OID:
        # Ten digits at most: no card fits, and a phone number in an int is no text.
        return D_NUMBER_TEXT if format_code == 0 else D_SKIP
    if type_oid == NUMERIC_OID:
        return D_NUMBER_TEXT if format_code == 0 else D_NUMERIC_BIN
    # Arrays, records, enums, tsvector and other types: their text form may hold any text
    # and a token keeps it well-formed; their binary form is opaque, so a hit nulls it.
    return D_TEXT if format_code == 0 else D_OPAQUE_BIN


def _json_string(value: bytes) -> bytes:
    return json.dumps(value.decode("utf-8", "replace")).encode()


# ("const", field bytes) | ("field", f) | ("check", f) | ("email", f) | ("keep", f)
FieldMask = tuple[str, object]


def field_mask(strategy: Strategy, klass: int) -> FieldMask:
    """How the row rewriter writes one masked column.

    ``const``: the same field bytes for every value (redact, null); ``field``: a function
    from the value to the whole length-prefixed field that replaces it.
    """
    if strategy.kind == "null" or klass == M_NULL:
        return ("const", NULL_FIELD)
    if strategy.kind == "redact":
        token = {M_RAW: REDACTED, M_JSON: _json_string(REDACTED),
                 M_JSONB_BIN: b"\x01" + _json_string(REDACTED)}[klass]
        return ("const", I32.pack(len(token)) + token)
    field = strategy.field_function()
    if klass == M_RAW and field is not None:
        # email_domain and keep_last are written inline by the generated rewriters, with
        # ``field`` for what the inline code does not cover (long values, new shapes).
        if strategy.kind == "email_domain":
            return ("email", field)
        if strategy.kind == "keep_last":
            return ("keep", field)
        return ("field", field)
    return ("field", field_encoder(strategy, klass))


def field_encoder(strategy: Strategy, klass: int) -> Callable[[bytes], bytes]:
    """``encode(value) -> length-prefixed field`` for one masked column."""
    pack = I32.pack
    apply = strategy.apply
    if strategy.kind == "null" or klass == M_NULL:
        return lambda value: NULL_FIELD
    if klass == M_RAW:
        def raw(value: bytes) -> bytes:
            out = apply(value)
            return NULL_FIELD if out is None else pack(len(out)) + out
        return raw
    prefix = b"\x01" if klass == M_JSONB_BIN else b""
    skip = len(prefix)

    def as_json(value: bytes) -> bytes:
        body = value[skip:]
        # A JSON string is masked as the text it holds (so hashes match the text column
        # and last4 keeps the right characters); any other document is masked whole.
        if body[:1] == b'"':
            try:
                inner = json.loads(body)
            except ValueError:
                inner = None
            if isinstance(inner, str):
                body = inner.encode("utf-8", "surrogatepass")
        out = apply(body)
        if out is None:
            return NULL_FIELD
        text = prefix + _json_string(out)
        return pack(len(text)) + text

    return as_json


#: Domains :func:`_domain_ok` has seen to be host names. A result's emails share a few
#: domains, and ``translate`` with deletions builds a 256-byte table on every call.
_DOMAINS: set[bytes] = set()
_DOMAINS_KEPT = 4096


def _domain_ok(domain: bytes) -> bool:
    """Whether ``domain`` (what follows the ``@``) is nothing but host-name characters,
    which is what email_domain may keep; remembered in :data:`_DOMAINS` when it is. The
    domains are what every masked email shows anyway, never a local part."""
    if domain.translate(None, DOMAIN_CHARS):
        return False
    if len(_DOMAINS) >= _DOMAINS_KEPT:
        _DOMAINS.clear()
    _DOMAINS.add(domain)
    return True


# -- detectors on single values --------------------------------------------------------------


class ValueDetector:
    """Runs detectors over one value according to its column's detector class."""

    def __init__(self, detectors: DetectorSet) -> None:
        self.detectors = detectors
        self.replaced: dict[str, int] = {}  # detector → spans replaced in place
        self.nulled: dict[str, int] = {}  # detector → values nulled (not rewritable)
        self.whole: dict[str, int] = {}  # detector → JSON documents replaced by a token

    def value(self, klass: int, value: bytes) -> bytes | None:
        """The value to send: ``value`` itself when untouched, new bytes, or None (NULL)."""
        ds = self.detectors
        if klass == D_TEXT:
            return ds.scan(value, self.replaced)
        if klass == D_JSON:
            return self._json(value)
        if klass == D_JSONB_BIN:
            if value[:1] != b"\x01":  # jsonb's binary format: a version byte, then text
                return self._null_if_hit(value)
            body = value[1:]
            new = self._json(body)
            return value if new is body else b"\x01" + new
        if klass == D_NUMBER_TEXT:
            return self._null_if_hit(value)
        if klass == D_INT_BIN:
            if len(value) != 8:
                return self._null_if_hit(value)
            number = int.from_bytes(value, "big", signed=True)
            if -_CARD_MIN < number < _CARD_MIN:
                return value
            return self._null_if_hit(value, str(number).encode())
        if klass == D_NUMERIC_BIN:
            # weight counts base-10000 digit groups before the point: < 3 means < 10^12.
            if len(value) < 4 or I16.unpack_from(value, 2)[0] < 3:
                return value
            return self._null_if_hit(value, numeric_text(value))
        if klass == D_OPAQUE_BIN:
            return self._null_if_hit(value)
        return value

    def _null_if_hit(self, value: bytes, text: bytes | None = None) -> bytes | None:
        probe = value if text is None else text
        if not self.detectors.may_match(probe):
            return value
        name = self.detectors.first_match(probe)
        if name is None:
            return value
        self.nulled[name] = self.nulled.get(name, 0) + 1
        return None

    def _json(self, text: bytes) -> bytes:
        counts: dict[str, int] = {}
        out = self.detectors.scan(text, counts)
        if out is text:
            return text
        try:
            json.loads(out)
        except ValueError:
            # The hit was not inside a JSON string (a card number as a JSON number, say);
            # the document cannot be patched, so the whole value becomes a token.
            for name in counts:
                self.whole[name] = self.whole.get(name, 0) + 1
            return _json_string(REDACTED)
        for name, count in counts.items():
            self.replaced[name] = self.replaced.get(name, 0) + count
        return out


_CARD_MIN = 10 ** 12  # a binary number below this has too few digits for a card number


def numeric_text(value: bytes) -> bytes:
    """Digits of a binary ``numeric`` (base-10000 digit groups), enough for detectors."""
    if len(value) < 8:
        return b""
    ndigits, weight, sign, _scale = struct.unpack_from("!hhHh", value)
    if sign not in (0x0000, 0x4000) or ndigits < 0 or len(value) < 8 + 2 * ndigits:
        return b""
    groups = struct.unpack_from(f"!{ndigits}H", value, 8)
    whole = b"".join(b"%04d" % groups[i] if 0 <= i < ndigits else b"0000"
                     for i in range(weight + 1)).lstrip(b"0") or b"0"
    fraction = b"".join(b"%04d" % g for g in groups[max(weight + 1, 0):])
    return (b"-" if sign == 0x4000 else b"") + whole + (b"." + fraction if fraction else b"")


# -- DataRow ------------------------------------------------------------------------------

_unpack_i32 = I32.unpack_from
_pack_i32 = I32.pack
_HEADER = struct.Struct("!ci")  # message type and length, packed in one call
_ROW_HEAD = struct.Struct("!Bih")  # type, length and field count of a DataRow, in one call


def _row_starts(rows: bytes, pieces: list[bytes] | None = None) -> list[int]:
    """Where each message of a buffer of complete messages starts; from ``pieces`` (each
    message's header and payload, which make up ``rows``) when given."""
    if pieces is not None:
        ends = list(itertools.accumulate(map(len, pieces)))
        return [0, *ends[1:-1:2]]
    starts = []
    pos = 0
    size = len(rows)
    while pos < size:
        starts.append(pos)
        pos += 1 + _unpack_i32(rows, pos + 1)[0]
    return starts


def probe_spans(probes: Sequence[tuple[Any, bool]] | None, text: bytes
                ) -> list[tuple[int, int]] | None:
    """Where the detectors' buffer probes match in ``text``: ``(first, end)`` spans, at
    least one byte each, in order per probe; None when a detector has no probe (then
    everything is a candidate). Probes on the shape (digits and letters folded to one
    class each) search ``text`` translated once for all of them."""
    if probes is None or any(search is None for search, _ in probes):
        return None
    spans: list[tuple[int, int]] = []
    shape: bytes | None = None
    for search, on_shape in probes:
        if on_shape:
            shape = text.translate(SHAPE) if shape is None else shape
            haystack = shape
        else:
            haystack = text
        span = search(haystack)
        while span is not None:
            first, end = span
            end = max(end, first + 1)
            spans.append((first, end))
            span = search(haystack, end)
    return spans


class _Short(Exception):
    """A field length pointed past the end of the DataRow."""


def _walk(kinds: Sequence[str], targets: Sequence[int], ncols: int, buf: str, first: str,
          last: str, pad: str, merge: bool = False
          ) -> tuple[list[str], list[str], list[str], list[str]]:
    """Unrolled field walk over one DataRow in ``buf[first:last]``, fields from ``p``.

    Returns the source lines, the piece names (unmasked byte ranges ``r*`` alternating
    with masked fields ``f*``, so their concatenation is the new payload), the names of
    the ranges that hold fields, and the per-field length changes.

    ``merge``: a masked field becomes a head ``f*`` and the offset ``c*`` where the copy
    of the source resumes, so what a strategy keeps of the value (the last four of
    ``last4``, the domain of ``email_domain``) is copied in one slice with the unmasked
    fields after it, and a checked number that stays is not copied apart at all. The
    per-field length changes are not returned then (the pieces are joined).
    """
    lines: list[str] = []
    pieces: list[str] = []
    regions: list[str] = []
    deltas: list[str] = []
    col = 0
    for k, target in enumerate(targets):
        for _ in range(target - col):
            lines += [f"{pad}n = _u({buf}, p)[0]", f"{pad}p += 4 + n if n > 0 else 4"]
        if merge:
            start = first if k == 0 else f"c{k - 1}"
            lines.append(f"{pad}r{k} = {buf}[{start}:p]")
            pieces.append(f"r{k}")
            if target > col:
                regions.append(f"r{k}")
        elif k == 0 or target > col:
            start = first if k == 0 else f"e{k - 1}"
            lines.append(f"{pad}r{k} = {buf}[{start}:p]")
            pieces.append(f"r{k}")
            if target > col:
                regions.append(f"r{k}")
        value_of = f"{buf}[s{k} + 4:p]"
        resume = [f"{pad}    c{k} = p"] if merge else []
        if kinds[k] == "const":
            value = [f"{pad}    f{k} = _m{k}", *resume]
        elif kinds[k] == "check" and merge:
            value = [f"{pad}    v = _m{k}({value_of})",
                     f"{pad}    if v is None:", f"{pad}        f{k} = b''",
                     f"{pad}        c{k} = s{k}", f"{pad}    else:",
                     f"{pad}        f{k} = v", f"{pad}        c{k} = p"]
        elif kinds[k] == "check":
            value = [f"{pad}    v = _m{k}({value_of})",
                     f"{pad}    f{k} = {buf}[s{k}:p] if v is None else v"]
        elif kinds[k] == "email":
            # email_domain in place: the length prefix and "***" come from a table.
            value = [f"{pad}    a = {buf}.rfind(64, s{k} + 4, p)",
                     f"{pad}    if (s{k} + 4 < a < p - 1 and p - a <= {MAX_DOMAIN + 1}"
                     f" and ({buf}[a + 1:p] in _DC or _dok({buf}[a + 1:p]))):"]
            if merge:
                value += [f"{pad}        f{k} = _LS[p - a + 3]", f"{pad}        c{k} = a"]
            else:
                value += [f"{pad}        f{k} = _LS[p - a + 3] + {buf}[a:p]"]
            value += [f"{pad}    else:", f"{pad}        f{k} = _m{k}({value_of})",
                      *(f"    {line}" for line in resume)]
        elif kinds[k] == "keep":
            # keep_last: the value's shape decides the masked head and the cut.
            value = [f"{pad}    v = {value_of}",
                     f"{pad}    kc = _g{k}(v.translate(_KT))",
                     f"{pad}    if kc is None:",
                     f"{pad}        f{k} = _m{k}(v)",
                     *(f"    {line}" for line in resume),
                     f"{pad}    elif kc[0] < 0:",
                     f"{pad}        f{k} = kc[1]",
                     *(f"    {line}" for line in resume),
                     f"{pad}    else:"]
            if merge:
                value += [f"{pad}        f{k} = kc[1]", f"{pad}        c{k} = s{k} + 4 + kc[0]"]
            else:
                value += [f"{pad}        f{k} = kc[1] + v[kc[0]:]"]
        else:
            value = [f"{pad}    f{k} = _m{k}({value_of})", *resume]
        # NULLs are counted, not masked values (masked = rows - NULLs): NULL is rare.
        lines += [f"{pad}s{k} = p", f"{pad}n = _u({buf}, p)[0]", f"{pad}if n >= 0:",
                  f"{pad}    p += 4 + n", *value, f"{pad}else:", f"{pad}    p += 4",
                  f"{pad}    f{k} = _NULL", *resume, f"{pad}    _z[{k}] += 1",
                  f"{pad}e{k} = p"]
        pieces.append(f"f{k}")
        deltas.append(f"len(f{k}) - (e{k} - s{k})")
        col = target + 1
    tail = f"t = {buf}[{'c' if merge else 'e'}{len(targets) - 1}:{last}]"
    pieces.append("t")
    if col < ncols:
        regions.append("t")
    return [*lines, pad + tail], pieces, regions, [] if merge else deltas


_DEFAULTS = ("_u=_u, _z=_z, _rows=_rows, _NULL=_NULL, _hd=_hd, _COUNT=_COUNT, "
             "_probe=_probe, _slow=_slow, _bad=_bad, _error=_error, _Truncated=_Truncated, "
             "_ih=_ih, _NC=_NC, _LS=_LS, _KT=_KT, _DC=_DC, _dok=_dok, _scan=_scan")


def _probe_expr(regions: Sequence[str]) -> str:
    if len(regions) <= 2:
        return " + ".join(regions)
    return "b''.join((" + ", ".join(regions) + ",))"


@functools.lru_cache(maxsize=512)
def _rewriter_source(kinds: tuple[str, ...], targets: tuple[int, ...], ncols: int,
                     detecting: bool) -> str:
    """Source of ``rewrite(payload)`` and ``rewrite_run(data, start)``, unrolled for one
    result.

    A per-field loop costs several bytecodes per column on every row, and every extra
    Python call costs as much as the work itself; so each plan gets generated functions
    that check the field count, read each length prefix once up to the last masked
    column, write the strategy inline, and join the unmasked byte ranges (copied as
    slices, the tail after the last masked column as one) with the masked fields. Binary
    numbers, which a byte probe cannot read, are "check" fields: their checker returns
    None (unchanged) or the replacement field.

    ``rewrite(payload)`` masks one DataRow; with detectors on, its unmasked ranges are
    joined into one probe and only rows whose probe hits go to the slow path (``_slow``).

    ``rewrite_run(data, start)`` masks every complete DataRow message from ``start`` up
    to the first message that is not one (or is incomplete) and returns ``(bytes to
    send, where it stopped)``: one loop, one header unpack per row, one join per buffer.
    Every row adds two items to ``out`` (header, payload), which gives the row count. With
    detectors on, the probe then runs once over the whole masked buffer, in C
    (``_scan``): masked values no longer look like anything, so only rows with a
    candidate in an unmasked value are decoded.
    """
    defaults = _DEFAULTS + "".join(f", _m{k}=_m{k}" for k in range(len(targets)))
    defaults += "".join(f", _g{k}=_g{k}" for k, kind in enumerate(kinds) if kind == "keep")
    row = [f"def rewrite(payload, {defaults}):",
           "    if payload[:2] != _COUNT:", "        _bad(payload)", "    _rows[0] += 1"]
    run = [f"def rewrite_run(data, start, {defaults}):",
           "    pos = start", "    size = len(data)", "    try:",
           "        while pos + 7 <= size:",
           "            mt, n, nc = _ih(data, pos)",
           "            if mt != 68:", "                break",
           "            end = pos + 1 + n",
           "            if end > size:", "                break",
           "            if nc != _NC or n < 6:", "                _bad(data[pos + 5:end])"]
    if not targets:
        row += ["    if _probe(payload):", "        return _slow(payload, (payload,))",
                "    return payload"]
        run[1:1] = ["    rows = 0"]
        run += ["            rows += 1", "            pos = end", "    except _error:",
                "        raise _Truncated('truncated DataRow') from None",
                "    _rows[0] += rows", "    out = data[start:pos]"]
        if detecting and ncols:
            run.append("    out = _scan(out)")
        run.append("    return out, pos")
        return "\n".join(row) + "\n\n\n" + "\n".join(run)
    lines, pieces, regions, _ = _walk(kinds, targets, ncols, "payload", "", "", "        ")
    joined = ", ".join(pieces)
    row += ["    try:", "        p = 2", *lines,
            "    except _error:", "        raise _Truncated('truncated DataRow') from None",
            "    if p > len(payload):", "        raise _Truncated('truncated DataRow')"]
    if detecting and regions:
        row += [f"    if _probe({_probe_expr(regions)}):",
                f"        return _slow(payload, ({joined},))"]
    row.append(f"    return b''.join(({joined},))")
    lines, pieces, regions, _ = _walk(kinds, targets, ncols, "data", "pos + 5", "end",
                                      "            ", merge=True)
    run[1:1] = ["    out = []", "    extend = out.extend"]
    run += ["            p = pos + 7", *lines,
            "            if p > end:", "                raise _Truncated('truncated DataRow')",
            f"            row = b''.join(({', '.join(pieces)},))",
            "            extend((_hd(b'D', len(row) + 4), row))",
            "            pos = end", "    except _error:",
            "        raise _Truncated('truncated DataRow') from None",
            "    _rows[0] += len(out) // 2"]
    if detecting and regions:
        run += ["    return _scan(b''.join(out), out), pos"]
    else:
        run += ["    return b''.join(out), pos"]
    return "\n".join(row) + "\n\n\n" + "\n".join(run)


def _regions(targets: Sequence[int], ncols: int) -> list[tuple[int, int]]:
    """``(piece index, first column)`` of each unmasked range in a rewriter's pieces
    that holds at least one field (the first range also holds the field count)."""
    if not targets:
        return [(0, 0)] if ncols else []
    regions = []
    index = 0
    col = 0
    for k, target in enumerate(targets):
        if k == 0 or target > col:
            if target > col:
                regions.append((index, col))
            index += 1
        index += 1
        col = target + 1
    if col < ncols:
        regions.append((index, col))
    return regions


def _number_checker(klass: int, detector: ValueDetector) -> Callable[[bytes], bytes | None]:
    """``check(value)``: None when a binary int8/numeric cannot be a card number (the
    common case, decided without decoding digits), else the field to send instead."""
    def check_int8(value: bytes) -> bytes | None:
        if len(value) == 8 and -_CARD_MIN < int.from_bytes(value, "big", signed=True) < _CARD_MIN:
            return None
        return None if detector.value(klass, value) is not None else NULL_FIELD

    def check_numeric(value: bytes) -> bytes | None:
        # weight counts base-10000 digit groups before the point: < 3 means < 10^12.
        if len(value) >= 4 and I16.unpack_from(value, 2)[0] < 3:
            return None
        return None if detector.value(klass, value) is not None else NULL_FIELD

    return check_int8 if klass == D_INT_BIN else check_numeric


@functools.lru_cache(maxsize=512)
def _compiled(source: str, name: str) -> CodeType:
    # Results of the same shape recur on every execution of a statement; compiling the
    # generated rewriter costs far more than a whole small result, so compile it once.
    return compile(source, name, "exec")


class RowRewriter:
    """Masks the listed columns of every DataRow and runs detectors over the others.

    ``rewrite(payload)`` and ``rewrite_messages(framed DataRows)`` are generated for the
    result's shape (see :func:`_rewriter_source`); ``rewrite`` returns the payload itself
    when nothing changed.
    """

    def __init__(self, ncols: int, masks: dict[int, FieldMask],
                 detect: Sequence[int] | None, detector: ValueDetector | None) -> None:
        self.ncols = ncols
        self.count_bytes = I16.pack(ncols)
        self._rows = [0]
        self._detect = list(detect) if detect is not None and detector is not None else None
        self.detecting = self._detect is not None
        self._detector = detector
        masks = dict(masks)
        if self._detect is not None and detector is not None:
            # Binary numbers hold no digit text for the byte probe to see: they are read
            # and checked inline, and the probe covers only the text between them.
            for col, klass in enumerate(self._detect):
                if klass in (D_INT_BIN, D_NUMERIC_BIN) and col not in masks:
                    masks[col] = ("check", _number_checker(klass, detector))
        targets = sorted(masks)
        self.target_index = targets
        self._nulls = [0] * len(targets)
        self._regions = _regions(targets, ncols)
        # What the buffer scan looks at in the rewritten rows: masked and checked
        # columns are done with.
        self._detect_out = None if self._detect is None else [
            D_SKIP if col in masks else klass for col, klass in enumerate(self._detect)]
        kinds = [masks[t][0] for t in targets]
        namespace: dict[str, object] = {
            "_u": _unpack_i32, "_z": self._nulls, "_rows": self._rows,
            "_NULL": NULL_FIELD, "_COUNT": self.count_bytes,
            "_probe": detector.detectors.may_match if detector is not None else None,
            "_slow": self._slow, "_bad": self._bad, "_error": struct.error,
            "_hd": _HEADER.pack, "_ih": _ROW_HEAD.unpack_from, "_NC": ncols,
            "_LS": LENGTH_STARS, "_KT": KEEP_SHAPE, "_DC": _DOMAINS, "_dok": _domain_ok,
            "_scan": self._scan,
            "_Truncated": MaskingError,
            **{f"_m{k}": masks[t][1] for k, t in enumerate(targets)},
            **{f"_g{k}": masks[t][1].shapes.get  # type: ignore[attr-defined]
               for k, t in enumerate(targets) if kinds[k] == "keep"}}
        # A statement's results all have the same shape: its source is generated once.
        source = _rewriter_source(tuple(kinds), tuple(targets), ncols, self.detecting)
        exec(_compiled(source, f"<masking rewriter {targets} of {ncols}>"), namespace)
        self.rewrite: Callable[[bytes], bytes] = namespace["rewrite"]  # type: ignore[assignment]
        #: ``rewrite_run(data, start) -> (bytes to send, end)``: every complete DataRow
        #: message from ``start`` on, up to the first other or incomplete message.
        self.rewrite_run: Callable[[bytes, int], tuple[bytes, int]] = namespace[
            "rewrite_run"]  # type: ignore[assignment]
        # The buffer scan reads complete DataRows: every value follows its length.
        self._buffer_probes = detector.detectors.framed_probes if detector is not None \
            else None

    def rewrite_messages(self, messages: bytes) -> bytes:
        """Complete framed DataRow messages (nothing else) → the messages to send."""
        out, end = self.rewrite_run(messages, 0)
        if end != len(messages):
            if messages[end] != 68:
                raise MaskingError("expected complete DataRow messages only")
            raise MaskingError("incomplete DataRow message")
        return out

    @property
    def rows(self) -> int:
        return self._rows[0]

    @property
    def mask_counts(self) -> list[int]:
        """Non-NULL values seen per target column (masked, or checked for "check")."""
        return [self._rows[0] - nulls for nulls in self._nulls]

    def count_rows(self, count: int) -> None:
        """Count rows forwarded without rewriting (exempt identities)."""
        self._rows[0] += count

    def __call__(self, payload: bytes) -> bytes:
        return self.rewrite(payload)

    def _bad(self, payload: bytes) -> None:
        if not payload:
            raise MaskingError("expected complete DataRow messages only")
        count = I16.unpack_from(payload)[0] if len(payload) >= 2 else 0
        raise MaskingError(f"DataRow has {count} columns but its RowDescription had "
                           f"{self.ncols}")

    def _slow(self, payload: bytes, pieces: tuple[bytes, ...]) -> bytes:
        """Detectors over the unmasked fields of a row whose probe hit."""
        changed = list(pieces)
        for index, col in self._regions:
            changed[index] = self._detect_region(pieces[index], col)
        if len(changed) == 1:
            return changed[0]
        return b"".join(changed)

    def _scan(self, rows: bytes, pieces: list[bytes] | None = None) -> bytes:
        """Detectors over ``rows``, complete DataRow messages already masked: one probe
        over the whole buffer, then the full detectors on the rows it points at.

        A probe match says "maybe" for every row it overlaps. That is sound although
        the buffer also holds framing bytes and masked values: a value a detector would
        match holds a probe match of its own (probes have no context beyond the value,
        except what the framed probes read before a digit run: bytes of the value, or
        its length, see ``detectors._run_finder``), so the search that passes over its
        first byte returns a match overlapping it, and the search resumes only after the
        end of the match it found.

        ``pieces``: the header and payload of each row, in order, when the caller has
        them (where rows start is then summed up in C instead of walked in Python).
        """
        spans = probe_spans(self._buffer_probes, rows)
        if spans is not None and not spans:
            return rows
        starts = _row_starts(rows, pieces)
        flagged: set[int] = set()
        if spans is None:  # a detector without a probe: every row is a candidate
            flagged.update(range(len(starts)))
        for first, end in spans or ():
            index = bisect.bisect_right(starts, first) - 1
            last = bisect.bisect_right(starts, end - 1) - 1
            flagged.update(range(index, last + 1))
        if not flagged:
            return rows
        out: list[bytes] = []
        copied = 0
        size = len(rows)
        for index in sorted(flagged):
            begin = starts[index]
            finish = starts[index + 1] if index + 1 < len(starts) else size
            payload = rows[begin + 5:finish]
            new = self._detect_region(payload, 0, self._detect_out)
            if new is not payload:
                out.append(rows[copied:begin])
                out.append(_HEADER.pack(b"D", len(new) + 4))
                out.append(new)
                copied = finish
        if not out:
            return rows
        out.append(rows[copied:])
        return b"".join(out)

    def _detect_region(self, region: bytes, col: int,
                       detect_classes: list[int] | None = None) -> bytes:
        """Detectors over the whole fields in ``region`` (a DataRow payload when col is 0
        and it starts with the field count)."""
        assert self._detect is not None and self._detector is not None
        detect = self._detect if detect_classes is None else detect_classes
        detector = self._detector
        probe = detector.detectors.may_match
        out: list[bytes] = []
        pos = 2 if col == 0 else 0
        copied = 0
        end = len(region)
        try:
            while pos < end:
                size = _unpack_i32(region, pos)[0]
                if size > 0:
                    value = region[pos + 4:pos + 4 + size]
                    klass = detect[col]
                    if klass != D_SKIP and probe(value):
                        new = detector.value(klass, value)
                        if new is not value:
                            out.append(region[copied:pos])
                            out.append(NULL_FIELD if new is None else _pack_i32(len(new)) + new)
                            copied = pos + 4 + size
                    pos += 4 + size
                else:
                    pos += 4
                col += 1
        except (struct.error, IndexError):
            raise MaskingError("truncated DataRow") from None
        if not copied:
            return region
        out.append(region[copied:])
        return b"".join(out)


# -- COPY TO STDOUT -------------------------------------------------------------------------------

_BINARY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
_TEXT_UNESCAPE = {ord("b"): b"\b", ord("f"): b"\f", ord("n"): b"\n", ord("r"): b"\r",
                  ord("t"): b"\t", ord("v"): b"\v"}


def unescape_text(field: bytes) -> bytes:
    """A COPY text-format field back to its value (the "Text Format" rules of COPY)."""
    if b"\\" not in field:
        return field
    out = bytearray()
    i = 0
    size = len(field)
    while i < size:
        char = field[i]
        if char == 92 and i + 1 < size:
            nxt = field[i + 1]
            if nxt in _TEXT_UNESCAPE:
                out += _TEXT_UNESCAPE[nxt]
                i += 2
                continue
            if 48 <= nxt <= 55:
                j = i + 1
                while j < size and j < i + 4 and 48 <= field[j] <= 55:
                    j += 1
                out.append(int(field[i + 1:j], 8) & 0xFF)
                i = j
                continue
            if nxt == ord("x") and i + 2 < size and chr(field[i + 2]) in "0123456789abcdefABCDEF":
                j = i + 2
                while j < size and j < i + 4 and chr(field[j]) in "0123456789abcdefABCDEF":
                    j += 1
                out.append(int(field[i + 2:j], 16))
                i = j
                continue
            out.append(nxt)
            i += 2
            continue
        out.append(char)
        i += 1
    return bytes(out)


def escape_text(value: bytes, delimiter: bytes) -> bytes:
    out = value.replace(b"\\", b"\\\\").replace(b"\n", b"\\n").replace(b"\r", b"\\r")
    out = out.replace(b"\t", b"\\t")
    if delimiter not in (b"\t", b"\\"):
        out = out.replace(delimiter, b"\\" + delimiter)
    return out


def split_text_row(line: bytes, delimiter: bytes) -> list[bytes]:
    """Fields of one text-format row; an escaped delimiter does not split."""
    if b"\\" not in line:
        return line.split(delimiter)
    fields = []
    begin = 0
    i = 0
    size = len(line)
    delim = delimiter[0]
    while i < size:
        char = line[i]
        if char == 92:
            i += 2
            continue
        if char == delim:
            fields.append(line[begin:i])
            begin = i + 1
        i += 1
    fields.append(line[begin:])
    return fields


@functools.lru_cache(maxsize=256)
def _text_masker_source(indices: tuple[int, ...], kinds: tuple[str, ...]) -> str:
    """``mask_lines(lines) -> (lines, counts)`` for COPY text rows without escapes,
    unrolled for the masked column indices: each row is split only up to the last of
    them and the strategies are called inline (see :meth:`CopyRewriter.feed_messages`).
    ``kinds``: ``keep`` and ``email`` are written inline as in the DataRow rewriters (a
    call per value costs more than the masking); anything else calls its function."""
    last = indices[-1]
    args = "".join(f", _f{k}=_f{k}" for k in range(len(indices)))
    args += "".join(f", _g{k}=_g{k}" for k, kind in enumerate(kinds) if kind == "keep")
    counters = [f"n{k}" for k in range(len(indices))]
    lines = [f"def mask_lines(lines, _d=_d, _null=_null, _short=_short, _KT=_KT, _DC=_DC, "
             "_dok=_dok"
             f"{args}):",
             "    out = []", "    append = out.append", f"    {' = '.join(counters)} = 0",
             "    for line in lines:", f"        f = line.split(_d, {last + 1})",
             f"        if len(f) <= {last}:", "            append(_short(f))",
             "            continue"]
    for k, (index, kind) in enumerate(zip(indices, kinds, strict=True)):
        lines += [f"        v = f[{index}]", "        if v != _null:", f"            n{k} += 1"]
        if kind == "keep":
            # keep_last: the value's shape decides the masked head and the cut.
            lines += [f"            kc = _g{k}(v.translate(_KT))",
                      "            if kc is None:", f"                v = _f{k}(v)",
                      "            elif kc[0] < 0:", "                v = kc[1]",
                      "            else:", "                v = kc[1] + v[kc[0]:]",
                      f"            f[{index}] = v"]
        elif kind == "email":
            lines += ["            a = v.rfind(64)",
                      f"            if (0 < a < len(v) - 1 and len(v) - a <= {MAX_DOMAIN + 1}"
                      " and (v[a + 1:] in _DC or _dok(v[a + 1:]))):",
                      f"                f[{index}] = b'***' + v[a:]",
                      "            else:", f"                f[{index}] = _f{k}(v)"]
        else:
            lines += [f"            v = _f{k}(v)",
                      f"            f[{index}] = _null if v is None else v"]
    lines += ["        append(_d.join(f))", f"    return out, ({', '.join(counters)},)"]
    return "\n".join(lines)


def _inline_kind(strategy: Strategy, function: Callable[[bytes], bytes | None]) -> str:
    """How the COPY text masker writes a strategy: ``keep`` and ``email`` inline."""
    if strategy.kind == "keep_last" and hasattr(function, "shapes"):
        return "keep"
    if strategy.kind == "email_domain":
        return "email"
    return "call"


class CopyRewriter:
    """Rewrites the CopyData stream of one ``COPY ... TO STDOUT``.

    The protocol docs promise one CopyData message per row in copy-out mode ("COPY
    Operations" in "Message Flow"), but this parser does not rely on it: incomplete rows
    are kept until the next chunk, and :meth:`finish` refuses a stream that ends mid-row.
    """

    def __init__(self, options: CopyOptions, binary: bool, ncols: int,
                 masks: dict[int, Strategy], detector: ValueDetector | None,
                 detect_columns: Sequence[bool]) -> None:
        self.options = options
        self.binary = binary
        self.ncols = ncols
        self.masks = masks
        self.mask_counts: dict[int, int] = dict.fromkeys(masks, 0)
        self.detector = detector
        self.detect_columns = list(detect_columns)
        self.rows = 0
        self._buffer = b""
        self._started = False
        self._ended = False
        self._text_masker: Callable[[list[bytes]], tuple[list[bytes], tuple[int, ...]]] | \
            None = None
        delimiter = options.delimiter
        # Masked values hold stars, "@", dots, hex digits and "hmac:" besides bytes of the
        # value itself: with another delimiter they would need escaping (the slow path).
        self._fast_text = (options.format == "text" and not binary and len(delimiter) == 1
                           and delimiter not in b"*@.:0123456789abcdefhm\\\n\r")
        if options.format == "csv" and not binary:
            quote = re.escape(options.quote)
            escape = re.escape(options.escape)
            delim = re.escape(options.delimiter)
            body = (rb"(?:[^" + quote + rb"]|" + quote + quote + rb")*" if options.escape ==
                    options.quote else rb"(?:[^" + quote + escape + rb"]|" + escape + rb".)*")
            self._csv_field = re.compile(
                quote + body + quote + rb"|[^" + delim + quote + rb"\n]*", re.S)

    def feed(self, chunk: bytes) -> bytes:
        """The rewritten bytes for every complete row so far (may be empty: send nothing)."""
        if self._ended and chunk:
            raise MaskingError("COPY data after the end-of-data marker")
        data = self._buffer + chunk if self._buffer else chunk
        if self.binary:
            out, used = self._binary(data)
        elif self.options.format == "csv":
            out, used = self._rows(data, self._csv_row)
        else:
            out, used = self._rows(data, self._text_row)
        self._buffer = data[used:]
        return out

    def finish(self) -> None:
        """Call at CopyDone: raises if the stream ended inside a row."""
        if self._buffer:
            raise MaskingError("COPY data ended in the middle of a row")

    # text and CSV

    def _rows(self, data: bytes, row: Callable[[bytes, int], tuple[bytes, int] | None]
              ) -> tuple[bytes, int]:
        out: list[bytes] = []
        pos = 0
        size = len(data)
        if (self._started or not self.options.header) and not self.masks and (
                self.detector is None or not self.detector.detectors.may_match(data)) and (
                self.options.format != "csv" and data.endswith(b"\n")) and (
                self.detector is None or b"\\" not in data):
            # Nothing to mask and no detector can match (escapes may hide a value from the
            # probe): whole text rows pass as they are.
            self._started = True
            self.rows += data.count(b"\n")
            return data, size
        while pos < size:
            if not self._started and self.options.header:
                end = data.find(b"\n", pos)
                if end < 0:
                    break
                out.append(data[pos:end + 1])
                pos = end + 1
                self._started = True
                continue
            self._started = True
            result = row(data, pos)
            if result is None:
                break
            text, pos = result
            out.append(text)
        return b"".join(out), pos

    def _text_row(self, data: bytes, pos: int) -> tuple[bytes, int] | None:
        end = data.find(b"\n", pos)
        if end < 0:
            return None
        line = data[pos:end]
        if line == b"\\.":
            self._ended = True
            return data[pos:end + 1], end + 1
        self.rows += 1
        fields = split_text_row(line, self.options.delimiter)
        changed = False
        null = self.options.null
        for index, strategy in self.masks.items():
            if index < len(fields) and fields[index] != null:
                masked = strategy.apply(unescape_text(fields[index]))
                fields[index] = null if masked is None else escape_text(
                    masked, self.options.delimiter)
                self.mask_counts[index] += 1
                changed = True
        if self.detector is not None and self._detect_text_fields(fields):
            changed = True
        if not changed:
            return data[pos:end + 1], end + 1
        return self.options.delimiter.join(fields) + b"\n", end + 1

    def _detect_text_fields(self, fields: list[bytes]) -> bool:
        """Detectors over the unmasked fields of a text row, in place; True if changed."""
        assert self.detector is not None
        changed = False
        null = self.options.null
        for index, value in enumerate(fields):
            if index in self.masks or value == null or not self._detects(index):
                continue
            # Detectors read the value, not its escaped form: with DELIMITER '-' an SSN
            # arrives as 123\-45\-6789.
            raw = unescape_text(value)
            if self.detector.detectors.may_match(raw):
                new = self.detector.value(D_TEXT, raw)
                if new is not raw and new is not None:
                    fields[index] = escape_text(new, self.options.delimiter)
                    changed = True
        return changed

    def feed_messages(self, data: bytes, start: int) -> tuple[bytes, int]:
        """Every complete CopyData *message* in ``data`` from ``start`` on, up to the
        first other or incomplete message → ``(CopyData messages to send, where they
        ended)``, one message per row as the server sends them.

        Text rows without a backslash (so without escapes, NULLs or the end marker)
        take a batch path: each row is split only up to its last masked column, masked
        values need no escaping (no strategy writes a tab, newline or backslash), and
        detectors probe all the rows at once. Everything else goes through :meth:`feed`.
        """
        pos = start
        size = len(data)
        payloads = []
        while size - pos >= 5 and data[pos] == 100:
            end = pos + 1 + _unpack_i32(data, pos + 1)[0]
            if end > size or end < pos + 5:
                break
            payloads.append(data[pos + 5:end])
            pos = end
        chunk = b"".join(payloads)
        if not chunk:
            return b"", pos
        if (self._fast_text and not self._buffer and not self._ended
                and (self._started or not self.options.header)
                and chunk[-1] == 10 and 92 not in chunk):
            self._started = True
            lines = chunk.split(b"\n")
            lines.pop()
            if self.masks:
                lines = self._mask_text_lines(lines)
            self.rows += len(lines)
            if self.detector is not None:
                self._detect_text_lines(lines)
            pack = _HEADER.pack
            return b"".join([pack(b"d", len(line) + 5) + line + b"\n" for line in lines]), pos
        out = []
        for payload in payloads:
            new = self.feed(payload)
            if new:
                out.append(_HEADER.pack(b"d", len(new) + 4) + new)
        return b"".join(out), pos

    def _mask_text_lines(self, lines: list[bytes]) -> list[bytes]:
        if self._text_masker is None:
            indices = tuple(sorted(self.masks))
            functions = [self.masks[index].value_function() for index in indices]
            kinds = tuple(_inline_kind(self.masks[index], function)
                          for index, function in zip(indices, functions, strict=True))
            namespace: dict[str, object] = {
                "_d": self.options.delimiter, "_null": self.options.null,
                "_short": self._mask_short_line, "_KT": KEEP_SHAPE, "_DC": _DOMAINS,
                "_dok": _domain_ok,
                **{f"_f{k}": function for k, function in enumerate(functions)},
                **{f"_g{k}": function.shapes.get  # type: ignore[attr-defined]
                   for k, function in enumerate(functions) if kinds[k] == "keep"}}
            exec(_compiled(_text_masker_source(indices, kinds),
                           f"<COPY text masker {indices}>"), namespace)
            self._text_masker = namespace["mask_lines"]  # type: ignore[assignment]
        assert self._text_masker is not None
        out, counts = self._text_masker(lines)
        for index, count in zip(sorted(self.masks), counts, strict=True):
            self.mask_counts[index] += count
        return out

    def _mask_short_line(self, fields: list[bytes]) -> bytes:
        """A text row with fewer fields than the masked columns need (not from COPY of
        this result's shape, but masked all the same)."""
        null = self.options.null
        for index, strategy in self.masks.items():
            if index < len(fields) and fields[index] != null:
                new = strategy.apply(fields[index])
                fields[index] = null if new is None else new
                self.mask_counts[index] += 1
        return self.options.delimiter.join(fields)

    def _detect_text_lines(self, lines: list[bytes]) -> None:
        """Detectors over already masked text rows: one probe over all of them, then the
        full detectors on each row a probe match touches (see :meth:`RowRewriter._scan`
        for why a match overlapping a row is enough)."""
        assert self.detector is not None
        text = b"\n".join(lines)
        detectors = self.detector.detectors
        # Rows joined by newlines: framed unless the delimiter is a letter or digit.
        spans = probe_spans(detectors.buffer_probes if self.options.delimiter.isalnum()
                            else detectors.framed_probes, text)
        flagged: set[int] = set()
        if spans is None:
            flagged.update(range(len(lines)))
        counted = line = 0  # newlines in text[:counted]: spans come sorted
        for first, end in sorted(spans or ()):
            line += text.count(b"\n", counted, first)
            counted = first
            flagged.update(range(line, line + 1 + text.count(b"\n", first, end - 1)))
        delim = self.options.delimiter
        for index in sorted(flagged):
            if index >= len(lines):
                continue
            fields = split_text_row(lines[index], delim)
            if self._detect_text_fields(fields):
                lines[index] = delim.join(fields)

    def _detects(self, index: int) -> bool:
        return index >= len(self.detect_columns) or self.detect_columns[index]

    def _csv_row(self, data: bytes, pos: int) -> tuple[bytes, int] | None:
        row_start = pos
        fields: list[bytes] = []
        size = len(data)
        delim = self.options.delimiter
        while True:
            match = self._csv_field.match(data, pos)
            assert match is not None  # the unquoted branch matches the empty string
            if not match.group(0) and data[pos:pos + 1] == self.options.quote:
                return None  # a quoted value whose closing quote is still to come
            fields.append(match.group(0))
            pos = match.end()
            if pos >= size:
                return None
            char = data[pos:pos + 1]
            if char == delim:
                pos += 1
                continue
            if char == b"\n":
                pos += 1
                break
            raise MaskingError("malformed CSV row in COPY data")
        self.rows += 1
        changed = False
        for index, strategy in self.masks.items():
            if index >= len(fields) or self._csv_is_null(fields[index]):
                continue
            masked = strategy.apply(self._unquote(fields[index]))
            fields[index] = self.options.null if masked is None else self._quote(masked)
            self.mask_counts[index] += 1
            changed = True
        if self.detector is not None:
            for index, raw in enumerate(fields):
                if index in self.masks or not self._detects(index) or self._csv_is_null(raw):
                    continue
                if self.detector.detectors.may_match(raw):
                    value = self._unquote(raw)
                    new = self.detector.value(D_TEXT, value)
                    if new is not value and new is not None:
                        fields[index] = self._quote(new)
                        changed = True
        if not changed:
            return data[row_start:pos], pos
        return delim.join(fields) + b"\n", pos

    def _csv_is_null(self, raw: bytes) -> bool:
        return raw == self.options.null and not raw.startswith(self.options.quote)

    def _unquote(self, raw: bytes) -> bytes:
        quote = self.options.quote
        if not raw.startswith(quote):
            return raw
        inner = raw[len(quote):-len(quote)]
        escape = self.options.escape
        if escape == quote:
            return inner.replace(quote + quote, quote)
        return re.sub(re.escape(escape) + rb"(.)", rb"\1", inner, flags=re.S)

    def _quote(self, value: bytes) -> bytes:
        quote = self.options.quote
        escape = self.options.escape
        if escape != quote:
            value = value.replace(escape, escape + escape)
        return quote + value.replace(quote, escape + quote) + quote

    # binary

    def _binary(self, data: bytes) -> tuple[bytes, int]:
        out: list[bytes] = []
        pos = 0
        size = len(data)
        if not self._started:
            if size < 19:
                return b"", 0
            if data[:11] != _BINARY_SIGNATURE:
                raise MaskingError("binary COPY data without the PGCOPY signature")
            extension = I32.unpack_from(data, 15)[0]
            if extension < 0:
                raise MaskingError("malformed binary COPY header")
            if size < 19 + extension:
                return b"", 0
            pos = 19 + extension
            out.append(data[:pos])
            self._started = True
        while pos + 2 <= size:
            count = I16.unpack_from(data, pos)[0]
            if count == -1:
                out.append(data[pos:pos + 2])
                pos += 2
                self._ended = True
                if pos != size:
                    raise MaskingError("binary COPY data after the end-of-data marker")
                break
            if count != self.ncols:
                raise MaskingError(f"binary COPY row has {count} fields, expected {self.ncols}")
            cursor = pos + 2
            fields: list[bytes | None] = []
            complete = True
            for _ in range(count):
                if cursor + 4 > size:
                    complete = False
                    break
                length = I32.unpack_from(data, cursor)[0]
                cursor += 4
                if length < 0:
                    fields.append(None)
                    continue
                if cursor + length > size:
                    complete = False
                    break
                fields.append(data[cursor:cursor + length])
                cursor += length
            if not complete:
                break
            self.rows += 1
            out.append(self._binary_row(data, pos, cursor, fields))
            pos = cursor
        return b"".join(out), pos

    def _binary_row(self, data: bytes, start: int, end: int, fields: list[bytes | None]) -> bytes:
        changed = False
        for index in self.masks:
            if fields[index] is not None:
                # Column types are not on the wire in COPY: a masked value becomes NULL.
                fields[index] = None
                self.mask_counts[index] += 1
                changed = True
        if self.detector is not None:
            for index, value in enumerate(fields):
                if value is None or index in self.masks or not self._detects(index):
                    continue
                if self.detector.detectors.may_match(value):
                    new = self.detector.value(D_OPAQUE_BIN, value)
                    if new is None:
                        fields[index] = None
                        changed = True
        if not changed:
            return data[start:end]
        return I16.pack(len(fields)) + b"".join(
            NULL_FIELD if v is None else I32.pack(len(v)) + v for v in fields)


# -- free text of server messages ---------------------------------------------------------------

# ErrorResponse/NoticeResponse fields that never carry data: severity, SQLSTATE, cursor
# positions and the server's source location ("Error and Notice Message Fields").
_STRUCTURAL_FIELDS = frozenset(b"SVCPpFLR")
# Fields that quote values when a statement fails on them (detail, context, hint, ...).
_VALUE_FIELDS = frozenset(b"MDWHq")
# Schema, table, column, data type and constraint names (sent as they are).
_NAME_FIELDS = frozenset(b"stcdn")
_QUOTED = re.compile(rb"\"(?:[^\"]|\"\")*\"|'(?:[^']|'')*'")
_KEY_VALUES = re.compile(rb"(=\(|row contains \().*?(\)(?:\s|\.|$))", re.S)
# Input echoed after a position: JSON's "JSON data, line 1: <input>..." context and
# libxml's "line 1: <message>\n<input>\n^" detail quote the value unquoted.
_ECHO = re.compile(rb"(line \d+: ).*", re.S)
# Numbers a message prints unquoted ("index 504931791 out of valid range", "date out of
# range: 504931791-01-01", "0xe2 0x80"): any word with a digit, quoted spans passed over.
# (Words are matched whole and tested for a digit after: \w*\d\w* would backtrack.)
_NUMBER_WORDS = re.compile(rb"\"(?:[^\"]|\"\")*\"|'(?:[^']|'')*'|\w+")
_DIGIT = re.compile(rb"\d")
WITHHELD = (b"hoopops withheld this message's text: the statement passes values to code "
            b"the gateway cannot see through (a function or prepared statement it could "
            b"not trace), which could put a sensitive value in it")


def redact_quoted(text: bytes, names: frozenset[bytes] = frozenset(), numbers: bool = False
                  ) -> tuple[bytes, int]:
    """Quoted literals and ``Key (...)=(...)``/``Failing row contains (...)`` value lists
    replaced by ``****``: how error texts carry the values they failed on. ``names`` are
    quoted strings to keep: the object names the same message carries in its own schema,
    table, column, type and constraint fields (``relation "leak_sink"``). ``numbers``:
    unquoted words holding a digit go too (``chr()``, ``set_byte()``, ``make_date()`` and
    many more print the number they failed on bare), unless they are among ``names``."""
    count = 0

    def quoted(match: re.Match[bytes]) -> bytes:
        nonlocal count
        whole = match.group(0)
        mark = whole[:1]
        if names and whole[1:-1].replace(mark + mark, mark) in names:
            return whole
        count += 1
        return mark + REDACTED + mark

    def values(match: re.Match[bytes]) -> bytes:
        nonlocal count
        count += 1
        return match.group(1) + REDACTED + match.group(2)

    def echo(match: re.Match[bytes]) -> bytes:
        nonlocal count
        count += 1
        return match.group(1) + REDACTED

    def number(match: re.Match[bytes]) -> bytes:
        nonlocal count
        whole = match.group(0)
        if whole[:1] in b"\"'" or whole in names or _DIGIT.search(whole) is None:
            return whole
        count += 1
        return REDACTED

    out = _KEY_VALUES.sub(values, text)
    out = _QUOTED.sub(quoted, out)
    out = _ECHO.sub(echo, out)
    if numbers:
        out = _NUMBER_WORDS.sub(number, out)
    return out, count


_IN_FUNCTION = re.compile(rb"(?:^|\n)(?:PL/[A-Za-z0-9]+|SQL) function ")


def raised_in_function(fields: list[tuple[int, bytes]]) -> bool:
    """Whether an ErrorResponse/NoticeResponse was raised while a function ran (its
    context, ``W``, names a PL/pgSQL, SQL or other PL function), so user code may have
    written its text."""
    return any(code == 87 and _IN_FUNCTION.search(value) is not None for code, value in fields)


def rewrite_fields(fields: list[tuple[int, bytes]], detectors: DetectorSet | None,
                   counts: dict[str, int], strict: bool, withhold: bool = False,
                   keep: frozenset[bytes] = frozenset(), numbers: bool = True) -> bool:
    """Mask the text fields of an ErrorResponse/NoticeResponse in place; True if changed.

    ``withhold``: the message may carry any value in any form (user code raised it), so
    its texts go entirely: the message becomes :data:`WITHHELD`, the detail, hint,
    context and internal query are dropped; severity, SQLSTATE and positions stay.
    ``keep``: quoted strings that strict mode leaves (names the statement spelled), for
    a message with a statement position only: that is an error of parse analysis, which
    reads no row. A statement may spell any name as an alias (``AS "5a"``), so a message
    raised while rows are read could otherwise quote a value back as a kept "name".
    ``numbers``: strict mode also redacts unquoted words holding a digit.
    """
    if withhold:
        kept: list[tuple[int, bytes]] = []
        dropped = 0
        for code, value in fields:
            if code == ord("M"):
                kept.append((code, WITHHELD))
                dropped += 1
            elif code in _VALUE_FIELDS:
                dropped += 1
            else:
                kept.append((code, value))
        if dropped:
            counts["error_text"] = counts.get("error_text", 0) + dropped
            fields[:] = kept
        return bool(dropped)
    changed = False
    positioned = any(code == 80 for code, _ in fields)  # 'P'
    names = (keep if positioned else frozenset()) | {
        value for code, value in fields if code in _NAME_FIELDS and value}
    for index, (code, value) in enumerate(fields):
        if code in _STRUCTURAL_FIELDS:
            continue
        new = value
        if strict and code in _VALUE_FIELDS:
            new, hits = redact_quoted(new, names, numbers)
            if hits:
                counts["error_text"] = counts.get("error_text", 0) + hits
        if detectors and detectors.may_match(new):
            new = detectors.scan(new, counts)
        if new != value:
            fields[index] = (code, new)
            changed = True
    return changed


__all__ = [
    "WITHHELD",
    "CopyRewriter",
    "FieldMask",
    "MaskingError",
    "MaskingRefused",
    "RowRewriter",
    "ValueDetector",
    "detect_class",
    "field_encoder",
    "field_mask",
    "mask_class",
    "numeric_text",
    "redact_quoted",
    "rewrite_fields",
]

"""The batch paths a relay uses (all the rows of a read buffer in one call) against the
row-at-a-time paths, on random rows, random plans and random splits of the stream.

``ResultPlan.rewrite_rows_at`` masks DataRows with the detectors probing the whole masked
buffer at once; ``ResultPlan.rewrite_data_row`` masks one row and probes its unmasked
bytes. They share no detector code path, so equal output on random data (values a
detector must catch included, placed anywhere, rows cut anywhere across reads) is a real
check of both. Likewise ``rewrite_copy_at`` (batch text COPY) against
``rewrite_copy_data``.
"""

from __future__ import annotations

import random
import struct

import pytest

from hoopops.identity import Identity
from hoopops.masking import (
    ColumnInfo,
    CopyOptions,
    MaskingError,
    MaskingRules,
    OutputSources,
    ResultPlan,
    SourceColumn,
    StatementSources,
    build_data_row,
    split_data_row,
)

AGENT = Identity("agent-7", ("agents",), None, None, None)
TEXT, INT4, INT8, NUMERIC, JSON, TIMESTAMPTZ = 25, 23, 20, 1700, 114, 1184
STRATEGIES = ("last4", "email_domain", "hash", "redact", "null", "keep_last")
SENSITIVE = [b"123-45-6789", b"4111 1111 1111 1111", b"4111111111111111",
             b"alice.smith@example.com", b"GB82 WEST 1234 5698 7654 32", b"GB82WEST12345698765432",
             b"5500-0000-0000-0004", b"078-05-1120"]
FILLER = [b"", b"regular customer", b"TCK-123", b"Customer 1234", b"2024-01-15 10:22:33+00",
          b"x" * 300, b"98f13708210194c475687be6106a3b84", b"+", b"@", b"a@b", b"***@example.com",
          b"\xc3\xa9t\xc3\xa9 \xe2\x82\xac", b"1234567890123", b"call 555-867-5309"]


def random_value(rng: random.Random) -> bytes | None:
    roll = rng.random()
    if roll < 0.08:
        return None
    parts = [rng.choice(FILLER) for _ in range(rng.randint(0, 3))]
    if roll < 0.35:
        parts.insert(rng.randint(0, len(parts)), rng.choice(SENSITIVE))
    return b" ".join(parts)


def random_rules(rng: random.Random, ncols: int, detectors: bool) -> tuple[MaskingRules, int]:
    masked = rng.sample(range(ncols), rng.randint(0, min(3, ncols)))
    columns = {}
    for index in masked:
        strategy = rng.choice(STRATEGIES)
        columns[f"public.t.c{index}"] = ({"strategy": "keep_last", "keep": rng.randint(1, 6)}
                                         if strategy == "keep_last" else strategy)
    section: dict[str, object] = {"columns": columns}
    if detectors:
        section["detectors"] = ["ssn", "credit_card", "email", "iban", "phone"]
        # Custom detectors: one the probe can prefilter, one (a word boundary) it cannot,
        # which makes every row a candidate.
        custom = rng.choice(({}, {"ticket": {"pattern": r"TCK-[0-9]{3}", "strategy": "redact"}},
                             {"word": {"pattern": r"\bcustomer\b", "strategy": "redact"}}))
        if custom:
            section["custom_detectors"] = custom
    return MaskingRules.from_sections([("t.yaml", None, section)], "s3cret"), len(masked)


def columns(ncols: int, types: list[int]) -> list[ColumnInfo]:
    return [ColumnInfo(f"c{i}", 16400, i + 1, types[i], 0, origin=OutputSources.of(
        SourceColumn("public", "t", f"c{i}", "pg_catalog.text"))) for i in range(ncols)]


def framed(kind: bytes, payload: bytes) -> bytes:
    return kind + struct.pack("!i", len(payload) + 4) + payload


def messages(data: bytes) -> list[bytes]:
    out = []
    pos = 0
    while pos < len(data):
        end = pos + 1 + struct.unpack_from("!i", data, pos + 1)[0]
        out.append(data[pos:end])
        pos = end
    assert pos == len(data)
    return out


def feed_in_pieces(plan: ResultPlan, stream: bytes, cuts: list[int], copy: bool = False
                   ) -> bytes:
    """What a relay does: append each read to a buffer, hand over every whole message."""
    out = []
    buffer = b""
    previous = 0
    for cut in [*cuts, len(stream)]:
        buffer += stream[previous:cut]
        previous = cut
        while buffer:
            sent, used = (plan.rewrite_copy_at if copy else plan.rewrite_rows_at)(buffer, 0)
            if not used:
                break
            out.append(sent)
            buffer = buffer[used:]
    assert not buffer
    return b"".join(out)


@pytest.mark.parametrize("seed", range(40))
def test_batch_rows_equal_row_at_a_time(seed: int) -> None:
    rng = random.Random(seed)
    ncols = rng.randint(1, 8)
    types = [rng.choice((TEXT, TEXT, TEXT, INT4, JSON, TIMESTAMPTZ)) for _ in range(ncols)]
    rules, _ = random_rules(rng, ncols, detectors=rng.random() < 0.8)
    cols = columns(ncols, types)
    rows = []
    for _ in range(rng.randint(1, 300)):
        values = [random_value(rng) for _ in range(ncols)]
        values = [v if v is None or types[i] in (TEXT, JSON) else b"42"
                  for i, v in enumerate(values)]
        values = [b'"' + v.replace(b'"', b"") + b'"' if v is not None and types[i] == JSON
                  else v for i, v in enumerate(values)]
        rows.append(build_data_row(values))
    got = batch_equals_row_at_a_time(rules, cols, rows, rng)
    assert got is None or got[1].rows == got[2].rows == len(rows)


def batch_equals_row_at_a_time(rules: MaskingRules, cols: list[ColumnInfo], rows: list[bytes],
                               rng: random.Random
                               ) -> tuple[bytes, ResultPlan, ResultPlan] | None:
    """Rewrite ``rows`` with one plan row by row and with another fed the framed stream
    cut at random places; both must give the same messages and actions. Returns the
    batch's output and the two plans, or None when nothing is masked."""
    one = rules.plan(AGENT, cols, None)
    batch = rules.plan(AGENT, cols, None)
    if one is None:
        assert batch is None
        return None
    assert batch is not None
    expected = b"".join(framed(b"D", one.rewrite_data_row(row)) for row in rows)
    stream = b"".join(framed(b"D", row) for row in rows)
    cuts = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, rng.randint(0, 12))))
    got = feed_in_pieces(batch, stream, cuts)
    assert messages(got) == messages(expected)
    assert batch.take_actions() == one.take_actions()
    return got, batch, one


def binary_value(rng: random.Random, oid: int) -> bytes | None:
    """A binary-format value of ``oid``: numbers that may or may not hold a card."""
    if rng.random() < 0.1:
        return None
    if oid == INT8:
        return struct.pack("!q", rng.choice((42, -7, 4111111111111111, 5500000000000004,
                                             4111111111111112, 10 ** 12 + 1)))
    if oid == NUMERIC:
        # 4111111111111111 as base-10000 digit groups, or a small amount.
        return rng.choice((struct.pack("!hhHh4H", 4, 3, 0, 0, 4111, 1111, 1111, 1111),
                           struct.pack("!hhHh2H", 2, 0, 0, 2, 12, 5000)))
    value = random_value(rng)
    return value


@pytest.mark.parametrize("seed", range(30))
def test_batch_binary_rows_equal_row_at_a_time(seed: int) -> None:
    """Binary results: int8 and numeric columns are checked inline (a card number in a
    bigint), and what a strategy keeps is copied with the fields after it."""
    rng = random.Random(500 + seed)
    ncols = rng.randint(1, 7)
    types = [rng.choice((TEXT, TEXT, INT8, NUMERIC)) for _ in range(ncols)]
    rules, _ = random_rules(rng, ncols, detectors=rng.random() < 0.8)
    cols = [ColumnInfo(c.name, c.table_oid, c.attnum, c.type_oid, 1, origin=c.origin)
            for c in columns(ncols, types)]
    rows = [build_data_row([binary_value(rng, types[i]) for i in range(ncols)])
            for _ in range(rng.randint(1, 200))]
    got = batch_equals_row_at_a_time(rules, cols, rows, rng)
    for message in messages(got[0]) if got is not None and rules.detectors else ():
        assert b"4111111111111111" not in message
        assert struct.pack("!q", 4111111111111111) not in message


def test_a_value_split_across_reads_is_masked_once_whole() -> None:
    rules = MaskingRules.from_sections([("t.yaml", None, {"detectors": ["credit_card"]})])
    cols = columns(2, [TEXT, TEXT])
    plan = rules.plan(AGENT, cols, None)
    assert plan is not None
    row = framed(b"D", build_data_row([b"x" * 70000, b"card 4111 1111 1111 1111 on file"]))
    stream = framed(b"D", build_data_row([b"a", b"b"])) + row
    # Cut inside the card number: the first read may only release the complete row.
    cut = stream.index(b"1111 1111 1111") + 5
    sent, used = plan.rewrite_rows_at(stream[:cut], 0)
    assert sent == stream[:used] and used == len(framed(b"D", build_data_row([b"a", b"b"])))
    rest, used2 = plan.rewrite_rows_at(stream[used:], 0)
    assert used2 == len(stream) - used
    assert b"4111" not in rest and split_data_row(rest[5:])[1] == b"card **** on file"


def test_batch_stops_at_other_messages_and_fails_closed_on_a_bad_row() -> None:
    rules = MaskingRules.from_sections([("t.yaml", None, {
        "columns": {"public.t.c0": "last4"}, "detectors": ["ssn"]})])
    plan = rules.plan(AGENT, columns(2, [TEXT, TEXT]), None)
    assert plan is not None
    rows = framed(b"D", build_data_row([b"123-45-6789", b"ok"])) * 3
    complete = framed(b"C", b"SELECT 3\x00")
    sent, used = plan.rewrite_rows_at(rows + complete, 0)
    assert used == len(rows) and sent.count(b"***-**-6789") == 3 and b"123-45" not in sent
    # From the middle of a buffer (the relay passes its read buffer and a position).
    again, end = plan.rewrite_rows_at(complete + rows + complete, len(complete))
    assert again == sent and end == len(complete) + len(rows)
    with pytest.raises(MaskingError, match="columns"):
        plan.rewrite_rows_at(rows + framed(b"D", build_data_row([b"1"])), 0)
    # A length that points backwards is refused, not looped on.
    with pytest.raises(MaskingError):
        plan.rewrite_rows_at(b"D\xff\xff\xff\xf0\x00\x02" + b"\x00" * 8, 0)


def copy_plan(rules: MaskingRules, ncols: int, options: CopyOptions) -> ResultPlan | None:
    hints = StatementSources("copy", tuple(OutputSources.of(SourceColumn(
        "public", "t", f"c{i}", "pg_catalog.text")) for i in range(ncols)), copy=options)
    response = b"\x00" + struct.pack(f"!h{ncols}h", ncols, *[0] * ncols)
    return rules.plan_copy(AGENT, response, hints)


def copy_field(value: bytes | None) -> bytes:
    if value is None:
        return b"\\N"
    return value.replace(b"\\", b"\\\\").replace(b"\t", b"\\t").replace(b"\n", b"\\n")


@pytest.mark.parametrize("seed", range(30))
def test_batch_copy_equals_message_at_a_time(seed: int) -> None:
    rng = random.Random(1000 + seed)
    ncols = rng.randint(1, 6)
    rules, _ = random_rules(rng, ncols, detectors=rng.random() < 0.8)
    options = CopyOptions.build("text", delimiter=rng.choice(("\t", "\t", "|", ",")))
    lines = []
    # Half the streams hold no backslash at all, so every chunk takes the batch path.
    clean = rng.choice((1.0, 1.0, 0.95, 0.7))
    for _ in range(rng.randint(1, 200)):
        values = [random_value(rng) for _ in range(ncols)]
        if rng.random() < clean:
            values = [b"v" if v is None else v.replace(b"\\", b"") for v in values]
        line = options.delimiter.join(
            copy_field(v).replace(options.delimiter, b"\\" + options.delimiter)
            for v in values) + b"\n"
        lines.append(line)
    one = copy_plan(rules, ncols, options)
    batch = copy_plan(rules, ncols, options)
    if one is None or batch is None:  # nothing to mask: the relay passes COPY data as is
        assert one is batch is None
        return
    expected = b"".join(one.rewrite_copy_data(line) for line in lines)
    stream = b"".join(framed(b"d", line) for line in lines)
    cuts = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, rng.randint(0, 8))))
    got = feed_in_pieces(batch, stream, cuts, copy=True)
    payloads = [m[5:] for m in messages(got)]
    assert b"".join(payloads) == expected
    assert all(p.endswith(b"\n") and p.count(b"\n") == 1 for p in payloads)  # a row each
    one.finish_copy()
    batch.finish_copy()
    assert batch.take_actions() == one.take_actions()


def test_the_fail_closed_plan_withholds_every_value_of_a_batch() -> None:
    from hoopops.proxy.enforcer import _WithholdAll

    plan = _WithholdAll(0, "cannot tell")
    rows = framed(b"D", build_data_row([b"123-45-6789", None])) * 2
    tail = framed(b"D", build_data_row([b"x"]))[:-2]  # incomplete: left for the next read
    sent, used = plan.rewrite_rows_at(rows + tail, 0)
    assert used == len(rows) and plan.rows == 2
    assert [split_data_row(m[5:]) for m in messages(sent)] == [[None, None], [None, None]]
    copy = framed(b"d", b"1\t123-45-6789\n") * 3
    assert plan.rewrite_copy_at(copy + b"d\x00", 0) == (b"", len(copy))
    assert plan.take_actions()[0].count == 5


@pytest.mark.parametrize("value, masked", [
    (b"alice@example.com", b"***@example.com"),
    (b"x @example.com 123-45-6789", b"****"),          # the tail is not a domain
    (b"bob@example.com\n4111 1111 1111 1111", b"****"),
    (b"carol@" + b"a" * 300 + b".com", b"****"),       # longer than any host name
    (b"@example.com", b"****"),
])
def test_email_domain_keeps_nothing_but_a_domain(value: bytes, masked: bytes) -> None:
    rules = MaskingRules.from_sections([("t.yaml", None, {
        "columns": {"public.t.c0": "email_domain"}})])
    plan = rules.plan(AGENT, columns(2, [TEXT, TEXT]), None)
    assert plan is not None
    stream = framed(b"D", build_data_row([value, b"tail"]))
    sent, used = plan.rewrite_rows_at(stream, 0)
    assert used == len(stream)
    assert split_data_row(sent[5:]) == [masked, b"tail"]


def detecting_rules() -> MaskingRules:
    return MaskingRules.from_sections([("t.yaml", None, {
        "columns": {"public.t.c0": "last4"},
        "detectors": ["ssn", "credit_card", "email", "iban"]})])


@pytest.mark.parametrize("size", [97, 0x61 * 256 + 0x62, 0x61 * 65536 + 0x62 * 256 + 0x63])
def test_card_starting_a_value_whose_length_looks_like_letters_is_masked(size: int) -> None:
    """The buffer probe passes over digit runs glued to a word; a value's own length
    bytes (here ``a``, ``ab``, ``abc``) in front of a card are not a word."""
    card = b"4111111111111111"
    rows = [build_data_row([b"123-45-6789", card + b" " + b"x" * (size - len(card) - 1)]),
            build_data_row([b"123-45-6789", b"deadbeefa1234567890123456"])]
    plan = detecting_rules().plan(AGENT, columns(2, [TEXT, TEXT]), None)
    assert plan is not None
    stream = b"".join(framed(b"D", row) for row in rows)
    sent, used = plan.rewrite_rows_at(stream, 0)
    assert used == len(stream)
    first, second = (split_data_row(m[5:]) for m in messages(sent))
    assert first[1] is not None and card not in first[1] and first[1].startswith(b"****")
    assert second[1] == b"deadbeefa1234567890123456"  # a hex token, not a card


def test_hex_digest_runs_are_not_candidates_in_framed_buffers() -> None:
    """Digits glued to a word cannot start a card, IBAN, SSN or phone match: the framed
    probe (DataRows) passes over them, the plain one (any text) cannot."""
    from hoopops.masking.rewrite import probe_spans

    detectors = detecting_rules().detectors
    digest = b"\x00\x00\x00\x19regular d7dca89a1678042477183b7ac"
    assert probe_spans(detectors.buffer_probes, digest)
    assert probe_spans(detectors.framed_probes, digest) == []
    # The same run after a space, or at the start of a value, stays a candidate.
    assert probe_spans(detectors.framed_probes, b"\x00\x00\x00\x10x 1678042477183")
    assert probe_spans(detectors.framed_probes, b"\x00\x00\x00\x0d1678042477183")


def test_copy_with_a_letter_delimiter_still_finds_cards_after_it() -> None:
    """COPY text fields follow their delimiter, not a length: with a letter as the
    delimiter a card after it looks glued to a word, so the plain probe is used."""
    rules = detecting_rules()
    options = CopyOptions.build("text", delimiter="x")
    plan = copy_plan(rules, 3, options)
    assert plan is not None
    line = b"123-45-6789x12345x4111111111111111\n"
    sent, used = plan.rewrite_copy_at(framed(b"d", line), 0)
    assert used == len(line) + 5
    assert b"4111111111111111" not in sent and b"x12345x****" in sent

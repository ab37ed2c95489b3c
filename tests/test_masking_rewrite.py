"""Rewriting wire bytes: DataRow (text and binary), COPY (text, CSV, binary), and the texts
of errors, notices, notifications and parameter statuses."""

from __future__ import annotations

import json
import struct
import textwrap

import pytest

from hoopops.identity import Identity
from hoopops.masking import (
    ColumnInfo,
    CopyOptions,
    MaskingError,
    MaskingRefused,
    MaskingRules,
    OutputSources,
    SourceColumn,
    StatementSources,
    apply_result_formats,
    build_data_row,
    columns_from_fields,
    parse_copy_response,
    parse_row_description,
    split_data_row,
)
from hoopops.masking.codec import (
    CodecError,
    build_fields,
    build_notification,
    build_parameter_status,
    parse_fields,
    parse_notification,
    parse_parameter_status,
)
from hoopops.masking.rewrite import numeric_text, redact_quoted
from hoopops.yamlfile import load_located

POLICY = """
masking:
  columns:
    public.customers.ssn: last4
    "*.email": email_domain
    public.customers.secret: hash
    public.customers.card: redact
    public.customers.profile: redact
  detectors: [ssn, credit_card, email, iban]
  unmasked_groups: [breakglass]
"""
AGENT = Identity("agent-7", ("agents",), None, None, None)
BREAKGLASS = Identity("oncall", ("breakglass",), None, None, None)
TEXT, INT4, INT8, NUMERIC, JSON, JSONB, TIMESTAMPTZ = 25, 23, 20, 1700, 114, 3802, 1184


def make_rules(text: str = POLICY) -> MaskingRules:
    doc = load_located("policies/masking.yaml", textwrap.dedent(text))
    return MaskingRules.from_sections([("policies/masking.yaml", doc, doc.data["masking"])],
                                      "s3cret")


RULES = make_rules()


def col(name: str, type_oid: int = TEXT, fmt: int = 0, attnum: int = 1,
        sensitive_source: str | None = None) -> ColumnInfo:
    source = SourceColumn("public", "customers", sensitive_source or name, "pg_catalog.text")
    return ColumnInfo(name, 16400, attnum, type_oid, fmt, origin=OutputSources.of(source))


def computed(name: str, type_oid: int = TEXT, fmt: int = 0) -> ColumnInfo:
    return ColumnInfo(name, 0, 0, type_oid, fmt)


def rewrite(columns: list[ColumnInfo], values: list[bytes | None],
            hints: StatementSources | None = None,
            identity: Identity = AGENT) -> list[bytes | None]:
    plan = RULES.plan(identity, columns, hints)
    assert plan is not None
    return split_data_row(plan.rewrite_data_row(build_data_row(values)))


CUSTOMER = [col("id", INT4), col("name"), col("ssn"), col("email"),
            col("created", TIMESTAMPTZ), col("note")]
ROW = [b"7", b"Alice Smith", b"123-45-6789", b"alice@example.com", b"2024-01-15 10:22:33+00",
       b"regular"]


def test_text_row_masks_columns_by_origin() -> None:
    assert rewrite(CUSTOMER, ROW) == [b"7", b"Alice Smith", b"***-**-6789", b"***@example.com",
                                      b"2024-01-15 10:22:33+00", b"regular"]


def test_alias_does_not_matter_origin_does() -> None:
    aliased = [col("x", sensitive_source="ssn"), col("y", sensitive_source="name")]
    assert rewrite(aliased, [b"123-45-6789", b"Bob"]) == [b"***-**-6789", b"Bob"]


def test_nulls_stay_null_and_are_not_counted() -> None:
    plan = RULES.plan(AGENT, CUSTOMER, None)
    assert plan is not None
    out = plan.rewrite_data_row(build_data_row([b"1", None, None, None, None, None]))
    assert split_data_row(out) == [b"1", None, None, None, None, None]
    assert plan.actions() == []


def test_untouched_rows_are_the_same_bytes() -> None:
    plan = RULES.plan(AGENT, [col("id", INT4), col("name")], None)
    assert plan is not None  # detectors are on
    payload = build_data_row([b"1", b"Bob"])
    assert plan.rewrite_data_row(payload) is payload


def test_detectors_catch_values_in_unmasked_columns() -> None:
    row = [*ROW[:5], b"call me: bob@corp.example, card 4111 1111 1111 1111"]
    plan = RULES.plan(AGENT, CUSTOMER, None)
    assert plan is not None
    out = split_data_row(plan.rewrite_data_row(build_data_row(row)))
    assert out[5] == b"call me: ****, card ****"
    assert {a.column: (a.strategy, a.count) for a in plan.actions()} == {
        "detector:credit_card": ("redact", 1), "detector:email": ("redact", 1),
        "public.customers.email": ("email_domain", 1), "public.customers.ssn": ("last4", 1)}


def test_computed_columns_use_the_parse_tree_hints() -> None:
    columns = [computed("?column?"), computed("row_to_json", JSON), computed("n", INT4)]
    ssn = OutputSources.of(SourceColumn("public", "customers", "ssn"))
    hints = StatementSources("select", (ssn.derived(), ssn.derived(), OutputSources()))
    out = rewrite(columns, [b"123-45-6789", b'{"ssn": "123-45-6789"}', b"5"], hints)
    assert out == [b"****", b'"****"', b"5"]  # derived: masked whole, never last4


def test_untraceable_computed_columns_are_masked() -> None:
    out = rewrite([computed("f"), computed("n", INT4)], [b"secret", b"5"], None)
    assert out == [b"****", None]  # non-text types cannot carry a token: NULL


@pytest.mark.parametrize(("type_oid", "fmt", "value", "expected"), [
    (TEXT, 1, b"123-45-6789", b"***-**-6789"),  # binary text is the same bytes
    (1043, 1, b"123-45-6789", b"***-**-6789"),
    (INT8, 1, struct.pack("!q", 123456789), None),
    (NUMERIC, 0, b"123456789", None),
    (JSON, 1, b'"123-45-6789"', None),
    (JSONB, 1, b'\x01"123-45-6789"', None),
    (17, 1, b"\xde\xad", None),  # bytea
])
def test_binary_and_non_text_sensitive_columns_never_pass_raw(
        type_oid: int, fmt: int, value: bytes, expected: bytes | None) -> None:
    out = rewrite([col("ssn", type_oid, fmt)], [value])[0]
    if type_oid in (JSON, JSONB):
        assert out is not None
        text = out[1:] if type_oid == JSONB else out
        assert (out[:1] == b"\x01") == (type_oid == JSONB)
        assert json.loads(text).endswith("6789") and b"123" not in out
    else:
        assert out == expected
    assert value not in (out or b"")


def test_hash_is_joinable_across_results() -> None:
    first = rewrite([col("secret")], [b"tok-1"])[0]
    second = rewrite([col("x", sensitive_source="secret", fmt=1)], [b"tok-1"])[0]
    assert first == second and first is not None and first.startswith(b"hmac:")


def test_binary_numbers_in_the_buffer_path() -> None:
    columns = [col("amount", INT8, 1), col("ssn", TEXT, 1), col("note")]
    plan = RULES.plan(AGENT, columns, None)
    assert plan is not None
    payloads = [build_data_row([struct.pack("!q", 4111111111111111), b"123-45-6789", b"x"]),
                build_data_row([struct.pack("!q", 5), None, b"mail a@b.co"])]
    out = plan.rewrite_data_rows(b"".join(framed(p) for p in payloads))
    assert out == b"".join(framed(plan.rewrite_data_row(p)) for p in payloads)
    assert split_data_row(plan.rewrite_data_row(payloads[0])) == [None, b"***-**-6789", b"x"]


def test_binary_numbers_are_checked_by_detectors() -> None:
    columns = [col("amount", INT8, 1), col("total", NUMERIC, 1), col("n", INT4, 1),
               col("small", INT8, 1)]
    card = 4111111111111111
    numeric = struct.pack("!hhHh4H", 4, 3, 0, 0, 4111, 1111, 1111, 1111)
    assert numeric_text(numeric) == b"4111111111111111"
    plan = RULES.plan(AGENT, columns, None)
    assert plan is not None
    out = split_data_row(plan.rewrite_data_row(build_data_row(
        [struct.pack("!q", card), numeric, struct.pack("!i", 42), struct.pack("!q", 7)])))
    assert out == [None, None, struct.pack("!i", 42), struct.pack("!q", 7)]
    assert {(a.column, a.strategy, a.count) for a in plan.actions()} == {
        ("detector:credit_card", "null", 2)}


def test_numeric_text_decoding() -> None:
    value = struct.pack("!hhHh3H", 3, 1, 0x4000, 2, 12, 3456, 7800)
    assert numeric_text(value) == b"-123456.7800"
    assert numeric_text(struct.pack("!hhHh", 0, 0, 0xC000, 0)) == b""  # NaN


def test_json_detection_keeps_documents_valid() -> None:
    columns = [col("doc", JSONB), col("raw", JSON), col("bin", JSONB, 1)]
    plan = RULES.plan(AGENT, columns, None)
    assert plan is not None
    out = split_data_row(plan.rewrite_data_row(build_data_row([
        b'{"ssn": "123-45-6789", "ok": 1}', b'{"card": 4111111111111111}',
        b'\x01{"mail": "bob@corp.example"}'])))
    assert json.loads(out[0]) == {"ssn": "****", "ok": 1}  # type: ignore[arg-type]
    assert json.loads(out[1]) == "****"  # type: ignore[arg-type]  # a number: whole value
    assert {(a.column, a.strategy, a.count) for a in plan.actions()} == {
        ("detector:ssn", "redact", 1), ("detector:email", "redact", 1),
        ("detector:credit_card", "redact", 1)}
    assert out[2] is not None and out[2][:1] == b"\x01"
    assert json.loads(out[2][1:]) == {"mail": "****"}


def test_other_types_text_form_patched_binary_form_nulled() -> None:
    columns = [col("tags", 1009), col("tags_bin", 1009, 1), col("when", TIMESTAMPTZ)]
    out = rewrite(columns, [b'{"a","123-45-6789"}', b"\x00\x00\x00\x01123-45-6789",
                            b"2024-01-15"])
    assert out == [b'{"a","****"}', None, b"2024-01-15"]


def test_exempt_identity_gets_raw_rows_and_an_audit_record() -> None:
    plan = RULES.plan(BREAKGLASS, CUSTOMER, None)
    assert plan is not None and plan.passthrough
    payload = build_data_row(ROW)
    assert plan.rewrite_data_row(payload) is payload
    assert plan.rewrite_data_row(payload) is payload
    assert {(a.column, a.strategy, a.count) for a in plan.actions()} == {
        ("public.customers.ssn", "unmasked:breakglass", 2),
        ("public.customers.email", "unmasked:breakglass", 2),
        ("detectors", "unmasked:breakglass", 2)}


def test_take_actions_reports_each_execution_once() -> None:
    plan = RULES.plan(AGENT, CUSTOMER, None)
    assert plan is not None
    payload = build_data_row(ROW)
    plan.rewrite_data_row(payload)
    first = plan.take_actions()
    assert {a.column: a.count for a in first} == {"public.customers.ssn": 1,
                                                   "public.customers.email": 1}
    assert plan.take_actions() == []
    plan.rewrite_data_row(payload)
    plan.rewrite_data_row(payload)
    assert {a.column: a.count for a in plan.take_actions()} == {
        "public.customers.ssn": 2, "public.customers.email": 2}
    assert plan.rows == 3
    assert next(a.to_dict() for a in plan.actions()) == {
        "column": "public.customers.email", "strategy": "email_domain", "count": 3}


def test_malformed_rows_fail_closed() -> None:
    plan = RULES.plan(AGENT, CUSTOMER, None)
    assert plan is not None
    with pytest.raises(MaskingError, match="columns"):
        plan.rewrite_data_row(build_data_row([b"1"]))
    truncated = build_data_row(ROW)[:20]
    with pytest.raises(MaskingError, match="truncated"):
        plan.rewrite_data_row(truncated)
    lying = b"\x00\x06" + struct.pack("!i", 999) + b"x"
    with pytest.raises(MaskingError):
        plan.rewrite_data_row(lying)


def framed(payload: bytes) -> bytes:
    return b"D" + struct.pack("!i", len(payload) + 4) + payload


@pytest.mark.parametrize("masked", [[], [0], [5], [0, 5], [1, 2], [0, 1, 2, 3, 4, 5], [2, 4]])
@pytest.mark.parametrize("detectors", [True, False])
def test_every_mask_layout_rebuilds_a_valid_row(masked: list[int], detectors: bool) -> None:
    section: dict[str, object] = {"columns": {f"public.t.c{i}": "redact" for i in masked}}
    if detectors:
        section["detectors"] = ["email"]
    rules = MaskingRules.from_sections([("p.yaml", None, section)])
    columns = [ColumnInfo(f"c{i}", 1, i + 1, TEXT, origin=OutputSources.of(
        SourceColumn("public", "t", f"c{i}"))) for i in range(6)]
    plan = rules.plan(AGENT, columns, None)
    if not masked and not detectors:
        assert plan is None
        return
    assert plan is not None
    rows: list[list[bytes | None]] = [
        [b"v0", None, b"v2@example.com", b"", b"v4", b"x@y.org"],
        [None, None, None, None, None, None],
        [b"a", b"b", b"c", b"d", b"e", b"f"],
    ]
    for values in rows:
        out = split_data_row(plan.rewrite_data_row(build_data_row(values)))
        expected = [None if v is None else b"****" if i in masked or (
            detectors and b"@" in v) else v for i, v in enumerate(values)]
        assert out == expected
    # The buffer form gives exactly the per-row results, framed.
    payloads = [build_data_row(v) for v in rows]
    assert plan.rewrite_data_rows(b"".join(framed(p) for p in payloads)) == b"".join(
        framed(plan.rewrite_data_row(p)) for p in payloads)


def test_batch_of_data_row_messages() -> None:
    plan = RULES.plan(AGENT, CUSTOMER, None)
    assert plan is not None
    clean = build_data_row([b"1", b"Bob", None, None, b"2024-01-01", b"x"])
    dirty = build_data_row(ROW)

    message = framed
    data = message(clean) + message(dirty) + message(clean)
    out = plan.rewrite_data_rows(data)
    assert out[:len(message(clean))] == message(clean)
    pos = len(message(clean))
    length = struct.unpack_from("!i", out, pos + 1)[0]
    assert split_data_row(out[pos + 5:pos + 1 + length])[2:4] == [b"***-**-6789",
                                                                 b"***@example.com"]
    assert out.endswith(message(clean))
    assert plan.rewrite_data_rows(message(clean)) == message(clean)  # one framed message
    with pytest.raises(MaskingError):
        plan.rewrite_data_rows(data + b"C\x00\x00\x00\x05x")
    with pytest.raises(MaskingError):
        plan.rewrite_data_rows(data[:-3])
    with pytest.raises(MaskingError, match="columns"):
        plan.rewrite_data_rows(message(build_data_row([b"1"])))
    exempt = RULES.plan(BREAKGLASS, CUSTOMER, None)
    assert exempt is not None and exempt.rewrite_data_rows(data) == data
    assert exempt.rows == 3


# -- COPY -------------------------------------------------------------------------------------

COPY_HINTS = [OutputSources(), OutputSources.of(SourceColumn("public", "customers", "ssn")),
              OutputSources.of(SourceColumn("public", "customers", "email")), OutputSources()]


def copy_plan(options: CopyOptions, fmt: int = 0, identity: Identity = AGENT):
    hints = StatementSources("copy", tuple(COPY_HINTS), copy=options)
    response = bytes([fmt]) + struct.pack("!h4h", 4, fmt, fmt, fmt, fmt)
    plan = RULES.plan_copy(identity, response, hints)
    assert plan is not None
    return plan


def test_copy_text_rows() -> None:
    plan = copy_plan(CopyOptions.build("text"))
    rows = [b"1\t123-45-6789\talice@example.com\tnote\n",
            b"2\t\\N\tbob\\tx@corp.example\tcard 4111111111111111\n",
            b"3\t987-65-4321\\\\\tc@d.io\tplain\n"]
    out = [plan.rewrite_copy_data(r) for r in rows]
    assert out[0] == b"1\t***-**-6789\t***@example.com\tnote\n"
    # NULL stays NULL; the escaped tab is unescaped before masking and re-escaped after.
    assert out[1] == b"2\t\\N\t***@corp.example\tcard ****\n"
    assert out[2] == b"3\t***-**-4321\\\\\t***@d.io\tplain\n"
    assert out[2].split(b"\t")[1] == b"***-**-4321\\\\"
    plan.finish_copy()
    assert {(a.column, a.count) for a in plan.actions()} == {
        ("public.customers.ssn", 2), ("public.customers.email", 3), ("detector:credit_card", 1)}


def test_copy_text_custom_delimiter_and_header() -> None:
    plan = copy_plan(CopyOptions.build("text", delimiter="|", null="NULL", header=True))
    assert plan.rewrite_copy_data(b"id|ssn|email|note\n") == b"id|ssn|email|note\n"
    # The escaped delimiter is part of the value: unescaped, masked, escaped again.
    assert plan.rewrite_copy_data(b"1|12\\|3-45-6789|NULL|a\\|b\n") == (
        b"1|**\\|*-**-6789|NULL|a\\|b\n")


def test_copy_csv_rows_with_quotes_and_newlines() -> None:
    plan = copy_plan(CopyOptions.build("csv", header=True))
    assert plan.rewrite_copy_data(b"id,ssn,email,note\n") == b"id,ssn,email,note\n"
    row = b'1,"123-45-6789","a""b@example.com","line1\nline2, alice@example.com"\n'
    out = plan.rewrite_copy_data(row)
    assert out == b'1,"***-**-6789","***@example.com","line1\nline2, ****"\n'
    assert plan.rewrite_copy_data(b'2,,"",x\n') == b'2,,"****",x\n'  # NULL vs empty string


def test_copy_rows_split_across_chunks_are_buffered() -> None:
    plan = copy_plan(CopyOptions.build("csv"))
    first = plan.rewrite_copy_data(b'1,123-45-6789,"x@y.com","multi\n')
    assert first == b""
    assert plan.rewrite_copy_data(b'line"\n2,') == b'1,"***-**-6789","***@y.com","multi\nline"\n'
    with pytest.raises(MaskingError, match="middle of a row"):
        plan.finish_copy()


def copy_binary(rows: list[list[bytes | None]]) -> bytes:
    out = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
    for row in rows:
        out += struct.pack("!h", len(row)) + b"".join(
            b"\xff\xff\xff\xff" if v is None else struct.pack("!i", len(v)) + v for v in row)
    return out + struct.pack("!h", -1)


def test_copy_binary_nulls_masked_columns_and_detector_hits() -> None:
    plan = copy_plan(CopyOptions.build("binary"), fmt=1)
    data = copy_binary([[struct.pack("!i", 1), b"123-45-6789", b"a@b.com", b"ok"],
                        [struct.pack("!i", 2), None, b"c@d.com", b"mail e@f.org"]])
    chunks = [data[:30], data[30:31], data[31:]]  # not row-aligned on purpose
    out = b"".join(plan.rewrite_copy_data(c) for c in chunks)
    plan.finish_copy()
    assert out == copy_binary([[struct.pack("!i", 1), None, None, b"ok"],
                               [struct.pack("!i", 2), None, None, None]])
    assert b"123-45" not in out and b"@" not in out
    with pytest.raises(MaskingError, match="after the end"):
        plan.rewrite_copy_data(b"\x00")


def test_copy_without_analysis_is_refused_when_it_needs_masking() -> None:
    with pytest.raises(MaskingRefused, match="layout"):
        RULES.plan_copy(AGENT, b"\x00\x00\x01\x00\x00", None)
    assert parse_copy_response(b"\x01\x00\x02\x00\x01\x00\x01").column_formats == (1, 1)


# -- texts of server messages --------------------------------------------------------------


def error(**fields: str) -> bytes:
    return build_fields([(ord(k), v.encode()) for k, v in fields.items()])


def test_error_fields_detectors_and_strict_mode() -> None:
    payload = error(S="ERROR", V="ERROR", C="23505", M='duplicate key value violates unique '
                    'constraint "customers_ssn_key"', D="Key (ssn)=(123-45-6789) already exists.")
    out, actions = RULES.rewrite_error(payload, AGENT)
    fields = dict(parse_fields(out))
    assert fields[ord("D")] == b"Key (ssn)=(****) already exists."
    assert fields[ord("C")] == b"23505"
    assert [(a.column, a.count) for a in actions] == [("detector:ssn", 1)]
    # A value no detector recognises, quoted by the error: only strict mode hides it.
    quoted = error(S="ERROR", C="22P02", M='invalid input syntax for type integer: "Alice Smith"')
    assert RULES.rewrite_error(quoted, AGENT) == (quoted, [])
    strict, strict_actions = RULES.rewrite_error(quoted, AGENT, strict=True)
    assert b"Alice" not in strict and b'"****"' in strict
    assert [(a.column, a.strategy) for a in strict_actions] == [("error_text", "redact")]
    assert RULES.rewrite_error(payload, BREAKGLASS) == (payload, [])


def test_redact_quoted() -> None:
    text = b'new row violates check constraint "c" Failing row contains (1, Alice, x).'
    assert redact_quoted(text) == (
        b'new row violates check constraint "****" Failing row contains (****).', 2)
    assert redact_quoted(b"Key (a, b)=(1, it's) exists")[0] == b"Key (a, b)=(****) exists"


def test_notice_notification_and_parameter_status() -> None:
    notice = error(S="NOTICE", C="00000", M="customer alice@example.com has card 4111111111111111")
    out, actions = RULES.rewrite_error(notice, AGENT)
    assert dict(parse_fields(out))[ord("M")] == b"customer **** has card ****"
    assert len(actions) == 2
    note = build_notification(42, b"changes", b'{"ssn": "123-45-6789"}')
    new, actions = RULES.rewrite_notification(note, AGENT)
    assert parse_notification(new) == (42, b"changes", b'{"ssn": "****"}')
    assert actions[0].column == "detector:ssn"
    status = build_parameter_status(b"application_name", b"agent for bob@corp.example")
    new, actions = RULES.rewrite_parameter_status(status, AGENT)
    assert parse_parameter_status(new) == (b"application_name", b"agent for ****")
    quiet = build_parameter_status(b"TimeZone", b"UTC")
    assert RULES.rewrite_parameter_status(quiet, AGENT) == (quiet, [])


def test_mask_text() -> None:
    text, actions = RULES.mask_text("ssn 123-45-6789 — ok")
    assert text == "ssn **** — ok" and actions[0].count == 1
    same = "nothing here"
    assert RULES.mask_text(same) == (same, [])


# -- codec ------------------------------------------------------------------------------------


def row_description(columns: list[tuple[str, int, int, int, int]]) -> bytes:
    return struct.pack("!h", len(columns)) + b"".join(
        name.encode() + b"\0" + struct.pack("!IhIhih", table, attnum, typ, -1, -1, fmt)
        for name, table, attnum, typ, fmt in columns)


def test_row_description_and_bind_formats() -> None:
    payload = row_description([("id", 16400, 1, INT4, 0), ("ssn", 16400, 3, TEXT, 0),
                               ("?column?", 0, 0, TEXT, 0)])
    columns = parse_row_description(payload)
    assert [(c.name, c.table_oid, c.attnum, c.type_oid) for c in columns] == [
        ("id", 16400, 1, INT4), ("ssn", 16400, 3, TEXT), ("?column?", 0, 0, TEXT)]
    assert [c.format_code for c in apply_result_formats(columns, [1])] == [1, 1, 1]
    assert [c.format_code for c in apply_result_formats(columns, [0, 1, 0])] == [0, 1, 0]
    assert apply_result_formats(columns, []) == columns
    with pytest.raises(CodecError):
        apply_result_formats(columns, [0, 1])
    with pytest.raises(CodecError):
        parse_row_description(payload[:-3])
    with pytest.raises(CodecError):
        parse_row_description(payload + b"x")


def test_columns_from_another_codecs_fields() -> None:
    from hoopops.proxy.protocol import decode_row_description

    payload = row_description([("ssn", 16400, 3, TEXT, 1)])
    assert columns_from_fields(decode_row_description(payload)) == parse_row_description(
        payload)


def test_data_row_codec_roundtrip_and_errors() -> None:
    values: list[bytes | None] = [b"", None, b"abc"]
    assert split_data_row(build_data_row(values)) == values
    with pytest.raises(CodecError):
        split_data_row(build_data_row(values) + b"x")
    with pytest.raises(CodecError):
        split_data_row(b"\x00\x01\x00\x00\x00\x09ab")
    with pytest.raises(CodecError):
        parse_fields(b"Mno terminator")
    with pytest.raises(CodecError):
        parse_notification(b"\x00\x00")

"""Detectors: true positives, checksum false positives rejected, and a probe that never
misses what a detector would find."""

from __future__ import annotations

import random
import re

import pytest

from hoopops.masking import detectors as det
from hoopops.masking.codec import build_data_row
from hoopops.masking.strategies import Strategy


def scan(names: list[str], value: bytes) -> tuple[bytes, dict[str, int]]:
    counts: dict[str, int] = {}
    out = det.DetectorSet(det.builtin(n) for n in names).scan(value, counts)
    return out, counts


@pytest.mark.parametrize("value", [
    b"123-45-6789", b"ssn: 123-45-6789.", b"078-05-1120", b"(123 45 6789)", b"x=123-45-6789;",
])
def test_ssn_true_positives(value: bytes) -> None:
    out, counts = scan(["ssn"], value)
    assert counts == {"ssn": 1}
    assert b"45" not in out


@pytest.mark.parametrize("value", [
    b"000-12-3456", b"666-12-3456", b"912-34-5678", b"123-00-4567", b"123-45-0000",
    b"123-45 6789",  # mixed separators are not an SSN layout
    b"1123-45-6789", b"123-45-67890", b"2024-01-15", b"123456789",
])
def test_ssn_rejects_invalid_and_lookalikes(value: bytes) -> None:
    assert scan(["ssn"], value) == (value, {})


@pytest.mark.parametrize("value", [
    b"4111111111111111", b"4111 1111 1111 1111", b"4111-1111-1111-1111", b"5555555555554444",
    b"378282246310005", b"3782 822463 10005", b"6011111111111117", b"30569309025904",
    b"card=4012888888881881;", b"4222222222222",
])
def test_card_true_positives(value: bytes) -> None:
    out, counts = scan(["credit_card"], value)
    assert counts == {"credit_card": 1}
    assert b"1111 1111" not in out and b"4444" not in out


@pytest.mark.parametrize("value", [
    b"4111111111111112",  # Luhn fails
    b"5555555555554445", b"378282246310006",
    b"1111111111111117",  # Luhn passes, but no issuer uses a leading 1
    b"8111111111111119",
    b"41111111111111111111",  # 20 digits: too long for a card
    b"4111 1111-1111 1111",  # inconsistent separators
    b"order 2024011512345678",
])
def test_card_rejects_luhn_failures_and_lookalikes(value: bytes) -> None:
    assert scan(["credit_card"], value) == (value, {})


def test_luhn() -> None:
    assert det.luhn_ok(b"79927398713")
    assert not det.luhn_ok(b"79927398710")


@pytest.mark.parametrize("value", [
    b"alice@example.com", b"Mail bob.smith+tag@mail.example.co.uk now", b"x_y%z@sub-domain.io",
    b"<o'neil@example.org>",
])
def test_email_true_positives(value: bytes) -> None:
    out, counts = scan(["email"], value)
    assert counts == {"email": 1}
    assert b"example" not in out or value.startswith(b"Mail")  # whole address replaced
    assert b"@" not in out


@pytest.mark.parametrize("value", [b"@handle", b"a@b", b"user@localhost", b"50 @ 3.5%"])
def test_email_lookalikes(value: bytes) -> None:
    assert scan(["email"], value) == (value, {})


def test_email_scan_stays_linear_on_long_values() -> None:
    value = b"a" * 200_000 + b"@example.com"
    out, counts = scan(["email"], value)
    assert counts == {"email": 1}
    assert out.endswith(b"****")


@pytest.mark.parametrize("value", [
    b"GB82WEST12345698765432", b"GB82 WEST 1234 5698 7654 32", b"DE89370400440532013000",
    b"DE89 3704 0044 0532 0130 00", b"NL91ABNA0417164300", b"FR1420041010050500013M02606",
    b"pay to GB82 WEST 1234 5698 7654 32 PLEASE",
])
def test_iban_true_positives(value: bytes) -> None:
    out, counts = scan(["iban"], value)
    assert counts == {"iban": 1}
    assert b"WEST" not in out and b"3704" not in out and b"ABNA" not in out
    if value.endswith(b"PLEASE"):
        assert out == b"pay to **** PLEASE"


@pytest.mark.parametrize("value", [
    b"GB82WEST12345698765433",  # checksum fails
    b"DE89370400440532013001", b"NL91ABNA0417164301",
    b"GB82WEST123456987654",  # wrong length for GB
    b"AB12 CDEF GHIJ KLMN",
])
def test_iban_rejects_checksum_failures(value: bytes) -> None:
    assert scan(["iban"], value) == (value, {})


def test_iban_mod97() -> None:
    assert det.iban_ok(b"GB82WEST12345698765432")
    assert not det.iban_ok(b"GB83WEST12345698765432")


@pytest.mark.parametrize("value", [
    b"(555) 234-5678", b"555-234-5678", b"555.234.5678", b"+1 555 234 5678", b"5552345678",
    b"+44 20 7946 0958",
])
def test_phone_true_positives(value: bytes) -> None:
    assert scan(["phone"], value)[1] == {"phone": 1}


def test_two_iban_in_one_run_both_masked() -> None:
    out, counts = scan(["iban"], b"DE89370400440532013000 GB82WEST12345698765432")
    assert counts == {"iban": 2}
    assert out == b"**** ****"


def test_detector_strategy_applies_to_the_match() -> None:
    ds = det.DetectorSet([det.builtin("ssn", Strategy("keep_last", 4)),
                          det.builtin("email", Strategy("email_domain"))])
    counts: dict[str, int] = {}
    assert ds.scan(b"id 123-45-6789 / bob@corp.example", counts) == (
        b"id ***-**-6789 / ***@corp.example")
    assert counts == {"ssn": 1, "email": 1}


def test_scan_returns_the_same_object_when_nothing_matches() -> None:
    value = b"nothing to see 2024-01-15"
    ds = det.DetectorSet(det.BUILTIN.values())
    assert ds.scan(value, {}) is value
    assert ds.first_match(value) is None


def test_custom_detector_and_its_prefilter() -> None:
    emp = det.custom("employee_id", r"EMP-\d{6}", Strategy("redact"))
    assert emp.prefilter == rb"EMP-\d{6}"
    ds = det.DetectorSet([emp])
    counts: dict[str, int] = {}
    assert ds.scan(b"owner EMP-123456", counts) == b"owner ****"
    assert ds.may_match(b"EMP-123456") and not ds.may_match(b"EMP-12")
    anchored = det.custom("anchored", r"^X\d+$", Strategy("redact"))
    assert anchored.prefilter is None  # anchors: scanned on every value, never prefiltered
    assert det.DetectorSet([anchored]).always_scan
    with pytest.raises(re.error):
        det.custom("bad", r"(unclosed", Strategy("redact"))
    with pytest.raises(re.error):
        det.custom("empty", r"x*", Strategy("redact"))


SAMPLES = {
    "ssn": [b"123-45-6789", b"234 56 7890"],
    "credit_card": [b"4111111111111111", b"4111 1111 1111 1111", b"3782-822463-10005",
                    b"4222222222222"],
    "email": [b"a@b.co", b"first.last@example.com"],
    "iban": [b"GB82WEST12345698765432", b"DE89 3704 0044 0532 0130 00", b"NO9386011117947"],
    "phone": [b"(555) 234-5678", b"555.234.5678", b"+44 20 7946 0958", b"+1-555-234-5678"],
}
NOISE = [b"", b"x", b" ", b"-", b"9", b"A", b"(", b"\x00\x00\x00\x0b", b"\xff\xff", b"2024-",
         b"Z", b"0)", b"@", b"+"]


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_probe_never_misses_a_detectable_value(name: str) -> None:
    """The payload-level probe must say "maybe" wherever the detector would match,
    whatever bytes (length headers, other fields) surround the value."""
    rng = random.Random(7)
    ds = det.DetectorSet(det.BUILTIN.values())
    for sample in SAMPLES[name]:
        assert ds.first_match(sample) is not None, sample
        for _ in range(300):
            left = b"".join(rng.choice(NOISE) for _ in range(rng.randint(0, 3)))
            right = b"".join(rng.choice(NOISE) for _ in range(rng.randint(0, 3)))
            text = left + sample + right
            if ds.first_match(text) is not None:
                assert ds.may_match(text), text
            row = build_data_row([b"1", text, b"tail"])
            assert ds.may_match(row), row


def test_probe_answers_no_for_ordinary_rows() -> None:
    ds = det.DetectorSet(det.builtin(n) for n in ("ssn", "credit_card", "email", "iban"))
    row = build_data_row([b"12345", b"Alice Smith", b"2024-01-15 10:22:33+00",
                          b"regular customer", b"1234.50", b"t"])
    assert not ds.may_match(row)


def test_anchored_finder_returns_the_leftmost_needle() -> None:
    """The buffer probe finds the separated layouts in one pass for a shared anchor; it
    must return exactly what the leftmost of separate searches would, from any start
    (that is what keeps the buffer probe from skipping a value)."""
    needles = [b"000-00-0000", b"0000-0000-0000-0", b"0000-000000-0000"]
    find = det._anchored_finder(needles)
    rng = random.Random(7)
    for _ in range(5000):
        text = bytes(rng.choice(b"00000--a*") for _ in range(rng.randint(0, 80)))
        pos = rng.randint(0, 12)
        starts = [(text.find(n, pos), len(n)) for n in needles]
        found = [(s, s + size) for s, size in starts if s >= 0]
        got = find(text, pos)
        if not found:
            assert got is None, (text, pos)
        else:
            assert got is not None and got[0] == min(s for s, _ in found), (text, pos, got)
            assert text[got[0]:got[1]] in needles


def test_default_detectors_share_one_pass_for_separated_layouts() -> None:
    probes = det.DetectorSet([det.builtin(n) for n in ("ssn", "credit_card", "email",
                                                       "iban")]).buffer_probes
    assert len(probes) == 3  # separated layouts, digit runs, "@"


def test_anchored_finder_falls_back_to_a_pass_per_needle_on_dense_anchors() -> None:
    """Text made of anchors without needles costs a bounded number of Python steps per
    search: the finder falls back to one C pass per needle, with the same answer."""
    needles = [b"000-00-0000", b"0000-0000-0000-0", b"0000-000000-0000"]
    find = det._anchored_finder(needles)
    text = b"0-0000*" * 200_000 + b"000-00-0000" + b"0-0000*" * 100
    assert find(text, 0) == (1_400_000, 1_400_011)
    assert find(text, 1_400_001) is None


def test_run_finder_passes_over_a_long_glued_run_at_once() -> None:
    """A digit run glued to a word is skipped whole (found in C, not walked byte by
    byte), and a run after a space is still reported, from any start inside it."""
    find = det._run_finder(b"0" * 13)
    glued = b"\x00\x00\x00\x05abcd" + b"0" * 5_000_000
    assert find(glued, 0) is None
    text = glued + b"-" + b"0" * 40
    start = len(glued) + 1
    assert find(text, 0) == (start, start + 13)
    assert find(text, start + 13) == (start + 13, start + 26)  # rest of a reported run

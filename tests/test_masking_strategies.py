"""Strategies: each output, the derived-value rule, and HMAC joinability."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from hoopops.masking.strategies import (
    NULL,
    REDACT,
    Strategy,
    StrategyError,
    combine,
    email_domain,
    hmac_token,
    keep_last,
    parse_strategy,
)


def test_redact_and_null() -> None:
    assert REDACT.apply(b"123-45-6789") == b"****"
    assert REDACT.apply(b"") == b"****"  # a fixed token: the length does not leak
    assert NULL.apply(b"x") is None


@pytest.mark.parametrize(("value", "keep", "expected"), [
    (b"123-45-6789", 4, b"***-**-6789"),
    (b"4111111111111111", 4, b"************1111"),
    (b"4111 1111 1111 1111", 4, b"**** **** **** 1111"),
    (b"GB82WEST12345698765432", 6, b"****************765432"),
    (b"1234", 4, b"****"),  # keeping four of four would reveal everything
    (b"12-34", 4, b"****"),
    (b"", 4, b"****"),
    (b"--12345--", 4, b"--*2345--"),
    ("José García".encode(), 4, "***** **rcía".encode()),
])
def test_keep_last(value: bytes, keep: int, expected: bytes) -> None:
    assert keep_last(value, keep) == expected


def test_keep_last_output_stays_valid_utf8() -> None:
    value = "ééééé€€".encode()
    out = keep_last(value, 3)
    assert out.decode("utf-8").endswith("é€€")


@pytest.mark.parametrize(("value", "expected"), [
    (b"alice@example.com", b"***@example.com"),
    (b"a.b+c@mail.example.co.uk", b"***@mail.example.co.uk"),
    (b"not an email", b"****"),
    (b"@example.com", b"****"),
    (b"trailing@", b"****"),
])
def test_email_domain(value: bytes, expected: bytes) -> None:
    assert email_domain(value) == expected


def test_hmac_is_keyed_deterministic_and_joinable() -> None:
    key = b"s3cret"
    a = Strategy("hash", key=key)
    same = parse_strategy("hash", "s3cret")
    other = parse_strategy("hmac", "different")
    token = a.apply(b"123-45-6789")
    assert token == same.apply(b"123-45-6789")  # equal inputs → equal tokens: joins work
    assert token != a.apply(b"123-45-6780")
    assert token != other.apply(b"123-45-6789")  # the key matters
    assert token is not None and token.startswith(b"hmac:") and len(token) == 37
    expected = hmac.new(key, b"123-45-6789", hashlib.sha256).hexdigest()[:32].encode()
    assert token == b"hmac:" + expected
    assert b"6789" not in token
    assert hmac_token(key, b"x") == a.apply(b"x")


def test_whole_and_partial() -> None:
    last4 = parse_strategy("last4", None)
    assert last4.partial and last4.whole() == REDACT
    assert parse_strategy("email_domain", None).whole() == REDACT
    hashed = parse_strategy("hash", "k")
    assert hashed.whole() is hashed
    assert NULL.whole() is NULL


def test_combine() -> None:
    last4 = parse_strategy("last4", None)
    domain = parse_strategy("email_domain", None)
    hashed = parse_strategy("hash", "k")
    assert combine([last4], direct=True) == last4
    assert combine([last4], direct=False) == REDACT  # derived: never a partial reveal
    assert combine([last4, domain], direct=True) == REDACT  # UNION of differently masked
    assert combine([hashed, hashed], direct=False) == hashed
    assert combine([hashed, NULL, last4], direct=True) == NULL


@pytest.mark.parametrize(("spec", "keep", "label"), [
    ("redact", None, "redact"), ("null", None, "null"), ("last4", None, "last4"),
    ("LAST6", None, "last6"), ("keep_last", 2, "last2"), ("email_domain", None, "email_domain"),
    ("hash", None, "hash"), ("hmac", None, "hash"),
])
def test_parse_strategy(spec: str, keep: int | None, label: str) -> None:
    assert parse_strategy(spec, "k", keep).label == label


@pytest.mark.parametrize(("spec", "secret", "keep", "message"), [
    ("shuffle", "k", None, "unknown strategy"),
    (5, "k", None, "expected a strategy name"),
    ("hash", None, None, "needs a secret"),
    ("keep_last", "k", None, "needs 'keep"),
    ("keep_last", "k", 0, "between 1 and 16"),
    ("keep_last", "k", True, "whole number"),
    ("last99", "k", None, "between 1 and 16"),
    ("redact", "k", 3, "only applies to keep_last"),
])
def test_parse_strategy_errors(spec: object, secret: str | None, keep: object,
                               message: str) -> None:
    with pytest.raises(StrategyError, match=message):
        parse_strategy(spec, secret, keep)


@pytest.mark.parametrize("spec", ["redact", "last4", "last2", "email_domain", "hash"])
def test_field_function_is_apply_with_a_length_prefix(spec: str) -> None:
    strategy = parse_strategy(spec, "k")
    field = strategy.field_function()
    assert field is not None
    for value in [b"", b"1", b"1234", b"123-45-6789", b"123-45-6780", b"a@b.co", b"@x",
                  "José García".encode(), b"4111 1111 1111 1111"]:
        masked = strategy.apply(value)
        assert masked is not None
        assert field(value) == len(masked).to_bytes(4, "big") + masked, (spec, value)
    assert NULL.field_function() is None

"""Token verification: every way a password-JWT can be wrong, and the CLI that mints them."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import hmac
import io
import ipaddress
import json
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from hoopops import cli
from hoopops.config import IdentityConfig
from hoopops.identity import (
    MAX_TOKEN_BYTES,
    AuthError,
    Identity,
    KeyRefreshNeeded,
    KeySourceError,
    MintError,
    TokenVerifier,
    mint_token,
    parse_groups,
)

ISSUER = "https://idp.example.test"
AUDIENCE = "hoopops"
SECRET = "test-secret-0123456789abcdef-0123456789"


# --------------------------------------------------------------------------- helpers


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_token(header: dict[str, Any], payload: dict[str, Any] | bytes,
              sign: Callable[[bytes], bytes] | None = None) -> str:
    """A compact JWS built by hand, so tests can produce what pyjwt refuses to encode."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(body)}"
    signature = sign(signing_input.encode()) if sign else b""
    return f"{signing_input}.{b64(signature)}"


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": "agent-7",
                            "groups": ["analysts", "oncall"], "iat": now, "nbf": now,
                            "exp": now + 300, "jti": "tok-1"}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def hs_config(**overrides: Any) -> IdentityConfig:
    return replace(IdentityConfig(issuer=ISSUER, audience=AUDIENCE, hs256_secret=SECRET),
                   **overrides)


def hs_token(secret: str = SECRET, headers: dict[str, Any] | None = None, **overrides: Any) -> str:
    return jwt.encode(claims(**overrides), secret, algorithm="HS256", headers=headers)


def pem_public(key: Any) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def pem_private(key: Any) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def jwk_of(private_key: Any, kid: str, alg: str | None = None) -> dict[str, Any]:
    public = private_key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        jwk = ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        jwk = OKPAlgorithm.to_jwk(public, as_dict=True)
    jwk.update(kid=kid, use="sig")
    if alg:
        jwk["alg"] = alg
    return jwk


def reason(verifier: TokenVerifier, token: str | bytes) -> str:
    with pytest.raises(AuthError) as caught:
        verifier.verify(token)
    return caught.value.reason


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def rsa_key2() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def rsa_config(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> IdentityConfig:
    path = tmp_path / "idp.pub.pem"
    path.write_bytes(pem_public(rsa_key))
    return IdentityConfig(issuer=ISSUER, audience=AUDIENCE, public_key_file=path)


@pytest.fixture
def jwks_config(tmp_path: Path, rsa_key: rsa.RSAPrivateKey,
                ec_key: ec.EllipticCurvePrivateKey) -> IdentityConfig:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk_of(rsa_key, "rsa-1", "RS256"),
                                         jwk_of(ec_key, "ec-1")]}))
    return IdentityConfig(issuer=ISSUER, audience=AUDIENCE, jwks_file=path)


# --------------------------------------------------------------------------- good tokens


def test_valid_hs256_token_gives_identity() -> None:
    verifier = TokenVerifier(hs_config())
    token = hs_token()
    identity = verifier.verify(token)
    assert isinstance(identity, Identity)
    assert identity.subject == "agent-7"
    assert identity.groups == ("analysts", "oncall")
    assert identity.issuer == ISSUER
    assert identity.token_id == "tok-1"
    assert identity.expires_at == pytest.approx(time.time() + 300, abs=5)
    assert identity.claims["aud"] == AUDIENCE
    # The gateway hands over the PasswordMessage bytes; surrounding whitespace is harmless.
    assert verifier.verify(token.encode()) == identity
    assert verifier.verify(f" {token}\n").subject == "agent-7"


@pytest.mark.parametrize("alg", ["RS256", "PS256"])
def test_rsa_public_key_file(rsa_config: IdentityConfig, rsa_key: rsa.RSAPrivateKey,
                             alg: str) -> None:
    token = jwt.encode(claims(), rsa_key, algorithm=alg)
    assert TokenVerifier(rsa_config).verify(token).subject == "agent-7"


def test_es256_public_key_file(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey) -> None:
    path = tmp_path / "ec.pub.pem"
    path.write_bytes(pem_public(ec_key))
    verifier = TokenVerifier(IdentityConfig(issuer=ISSUER, audience=AUDIENCE,
                                            public_key_file=path))
    assert verifier.accepted_algorithms == {"ES256"}
    token = jwt.encode(claims(sub="ec-agent"), ec_key, algorithm="ES256")
    assert verifier.verify(token).subject == "ec-agent"


def test_public_key_from_certificate(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(rsa_key.public_key()).serial_number(1)
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .sign(rsa_key, hashes.SHA256()))
    path = tmp_path / "idp.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    verifier = TokenVerifier(IdentityConfig(issuer=ISSUER, audience=AUDIENCE,
                                            public_key_file=path))
    assert verifier.verify(jwt.encode(claims(), rsa_key, algorithm="RS256")).subject


def test_jwks_file_picks_key_by_kid(jwks_config: IdentityConfig, rsa_key: rsa.RSAPrivateKey,
                                    ec_key: ec.EllipticCurvePrivateKey) -> None:
    verifier = TokenVerifier(jwks_config)
    rs = jwt.encode(claims(sub="rs"), rsa_key, algorithm="RS256", headers={"kid": "rsa-1"})
    es = jwt.encode(claims(sub="es"), ec_key, algorithm="ES256", headers={"kid": "ec-1"})
    assert verifier.verify(rs).subject == "rs"
    assert verifier.verify(es).subject == "es"
    # The RSA JWK names alg RS256, so PS256 with that key is refused even though RSA could.
    ps = jwt.encode(claims(), rsa_key, algorithm="PS256", headers={"kid": "rsa-1"})
    assert reason(verifier, ps) == (
        "algorithm PS256 not accepted (the gateway verifies ES256, RS256)")
    # An ES256 token claiming the RSA key's id does not get verified with the RSA key.
    swapped = jwt.encode(claims(), ec_key, algorithm="ES256", headers={"kid": "rsa-1"})
    assert "not accepted for signing key rsa-1" in reason(verifier, swapped)
    unknown = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "gone"})
    assert reason(verifier, unknown) == "unknown signing key id gone"


def test_jwks_file_without_kid(tmp_path: Path, rsa_key: rsa.RSAPrivateKey,
                               ec_key: ec.EllipticCurvePrivateKey) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk_of(rsa_key, "rsa-1"), jwk_of(ec_key, "ec-1")]}))
    verifier = TokenVerifier(IdentityConfig(issuer=ISSUER, audience=AUDIENCE, jwks_file=path))
    # One key fits ES256, so a kid-less ES256 token is unambiguous.
    assert verifier.verify(jwt.encode(claims(), ec_key, algorithm="ES256")).subject
    path.write_text(json.dumps({"keys": [jwk_of(rsa_key, "rsa-1"), jwk_of(rsa_key, "rsa-2")]}))
    verifier = TokenVerifier(IdentityConfig(issuer=ISSUER, audience=AUDIENCE, jwks_file=path))
    assert "no key id" in reason(verifier, jwt.encode(claims(), rsa_key, algorithm="RS256"))


def test_leeway_tolerates_small_clock_skew() -> None:
    now = int(time.time())
    verifier = TokenVerifier(hs_config(leeway=30.0))
    assert verifier.verify(hs_token(exp=now - 10, iat=now - 100, nbf=now + 10)).subject


def test_require_exp_can_be_turned_off() -> None:
    assert reason(TokenVerifier(hs_config()), hs_token(exp=None)) == "token has no expiry (exp)"
    identity = TokenVerifier(hs_config(require_exp=False)).verify(hs_token(exp=None))
    assert identity.expires_at is None


def test_audience_list_and_unconfigured_audience() -> None:
    verifier = TokenVerifier(hs_config())
    assert verifier.verify(hs_token(aud=["other", AUDIENCE])).subject
    # No audience configured: the gateway is not a named audience, aud is not checked.
    assert TokenVerifier(hs_config(audience=None)).verify(hs_token(aud="anything")).subject


# --------------------------------------------------------------------------- bad tokens


def test_expired() -> None:
    token = hs_token(exp=1_700_000_000, iat=1_699_999_000, nbf=1_699_999_000)
    assert reason(TokenVerifier(hs_config()), token) == "token expired at 2023-11-14T22:13:20Z"


def test_not_yet_valid() -> None:
    future = int(time.time()) + 3600
    text = reason(TokenVerifier(hs_config()), hs_token(nbf=future, exp=future + 300))
    assert text.startswith("token not yet valid")


def test_issued_in_the_future() -> None:
    future = int(time.time()) + 3600
    assert "issued in the future" in reason(TokenVerifier(hs_config()), hs_token(iat=future))


def test_wrong_and_missing_audience() -> None:
    verifier = TokenVerifier(hs_config())
    assert reason(verifier, hs_token(aud="billing")) == "wrong audience (expected hoopops)"
    assert reason(verifier, hs_token(aud=["a", "b"])) == "wrong audience (expected hoopops)"
    assert reason(verifier, hs_token(aud=None)) == "token has no audience (expected hoopops)"


def test_wrong_and_missing_issuer() -> None:
    verifier = TokenVerifier(hs_config())
    assert reason(verifier, hs_token(iss="https://evil.test")) == (
        f"wrong issuer (expected {ISSUER})")
    assert reason(verifier, hs_token(iss=None)) == f"token has no issuer (expected {ISSUER})"


def test_bad_signature() -> None:
    other = "another-secret-0123456789abcdef-012345"
    assert reason(TokenVerifier(hs_config()), hs_token(secret=other)) == "bad signature"


def test_bad_signature_rsa(rsa_config: IdentityConfig, rsa_key2: rsa.RSAPrivateKey) -> None:
    token = jwt.encode(claims(), rsa_key2, algorithm="RS256")
    assert reason(TokenVerifier(rsa_config), token) == "bad signature"


def test_tampered_payload() -> None:
    header, _, signature = hs_token().split(".")
    forged = b64(json.dumps(claims(sub="admin", groups=["dba"])).encode())
    token = f"{header}.{forged}.{signature}"
    assert reason(TokenVerifier(hs_config()), token) == "bad signature"


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
def test_alg_none_refused(alg: str) -> None:
    token = raw_token({"alg": alg, "typ": "JWT"}, claims())
    assert reason(TokenVerifier(hs_config()), token) == "algorithm none is not accepted"


def test_alg_none_refused_for_public_keys(rsa_config: IdentityConfig) -> None:
    token = raw_token({"alg": "none"}, claims())
    assert reason(TokenVerifier(rsa_config), token) == "algorithm none is not accepted"


def test_hs256_signed_with_public_key_pem_is_refused(rsa_config: IdentityConfig,
                                                     rsa_key: rsa.RSAPrivateKey) -> None:
    # The classic confusion attack: the public key is public, so an attacker HMACs a token
    # with its PEM bytes, hoping the verifier uses "the key" with the header's algorithm.
    pem = pem_public(rsa_key)
    for secret in (pem, pem.strip()):
        token = raw_token({"alg": "HS256", "typ": "JWT"}, claims(sub="admin"),
                          lambda data, s=secret: hmac.new(s, data, hashlib.sha256).digest())
        text = reason(TokenVerifier(rsa_config), token)
        assert text.startswith("algorithm HS256 not accepted (the gateway verifies ")
        assert "RS256" in text and "HS" not in text.split("verifies")[1]


def test_rs256_against_hs_secret(rsa_key: rsa.RSAPrivateKey) -> None:
    token = jwt.encode(claims(), rsa_key, algorithm="RS256")
    assert reason(TokenVerifier(hs_config()), token) == (
        "algorithm RS256 not accepted (the gateway verifies HS256)")


def test_es256_against_rsa_key(rsa_config: IdentityConfig,
                               ec_key: ec.EllipticCurvePrivateKey) -> None:
    token = jwt.encode(claims(), ec_key, algorithm="ES256")
    assert reason(TokenVerifier(rsa_config), token).startswith("algorithm ES256 not accepted")


def test_config_algorithms_restrict_further(rsa_config: IdentityConfig,
                                            rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = TokenVerifier(replace(rsa_config, algorithms=("RS256",)))
    assert verifier.verify(jwt.encode(claims(), rsa_key, algorithm="RS256")).subject
    ps = jwt.encode(claims(), rsa_key, algorithm="PS256")
    assert reason(verifier, ps) == "algorithm PS256 not accepted (the gateway verifies RS256)"
    with pytest.raises(KeySourceError, match=r"identity\.algorithms allows none"):
        TokenVerifier(replace(rsa_config, algorithms=("ES256",)))


@pytest.mark.parametrize("garbage", [
    "hunter2", "a.b", "a.b.c.d", "Bearer abc.def.ghi", "ey!!.ey!!.sig", "....",
    "eyJhbGciOiJIUzI1NiJ9", "bm90IGpzb24.e30.c2ln", "W10.e30.c2ln",
])
def test_not_a_jwt(garbage: str) -> None:
    assert reason(TokenVerifier(hs_config()), garbage) == (
        "not a JWT (expected a token as the password)")


def test_deeply_nested_json_is_refused_not_crashed() -> None:
    verifier = TokenVerifier(hs_config())
    deep_header = f"{b64(b'[' * 20000)}.e30.c2ln"
    assert reason(verifier, deep_header).startswith("not a JWT")
    deep_claims = raw_token({"alg": "HS256"}, b"[" * 20000,
                            lambda data: hmac.new(SECRET.encode(), data,
                                                  hashlib.sha256).digest())
    assert reason(verifier, deep_claims).startswith("malformed token")


def test_non_ascii_bytes_are_not_a_jwt() -> None:
    assert reason(TokenVerifier(hs_config()), "pässword".encode()).startswith("not a JWT")


def test_jwe_is_named() -> None:
    assert "JWE" in reason(TokenVerifier(hs_config()), "aaa.bbb.ccc.ddd.eee")


@pytest.mark.parametrize("empty", ["", "   ", b"", "\n"])
def test_empty_password(empty: str | bytes) -> None:
    assert reason(TokenVerifier(hs_config()), empty) == (
        "no token given (expected a JWT as the password)")


def test_huge_token_is_refused_before_parsing() -> None:
    huge = hs_token(padding="x" * (1024 * 1024))
    assert len(huge) > 1024 * 1024
    started = time.perf_counter()
    text = reason(TokenVerifier(hs_config()), huge)
    assert text == f"token too large ({len(huge)} bytes; at most {MAX_TOKEN_BYTES})"
    assert time.perf_counter() - started < 0.05


def test_claims_must_be_well_formed() -> None:
    verifier = TokenVerifier(hs_config())
    assert "not a time" in reason(verifier, hs_token(exp="tomorrow"))
    assert "not a time" in reason(verifier, hs_token(exp=True))
    # Hand-signed so the payload can hold what json.dumps would not write by default.
    def sign(data: bytes) -> bytes:
        return hmac.new(SECRET.encode(), data, hashlib.sha256).digest()

    infinite = raw_token({"alg": "HS256"}, b'{"sub": "a", "exp": Infinity}', sign)
    assert reason(verifier, infinite).startswith("malformed token")
    duplicate = raw_token({"alg": "HS256"}, json.dumps(claims()).encode()[:-1]
                          + b', "sub": "root"}', sign)
    assert reason(verifier, duplicate).startswith("malformed token")
    array = raw_token({"alg": "HS256"}, b"[1, 2]", sign)
    assert reason(verifier, array) == "malformed token (its claims are not a JSON object)"


def test_unsupported_header_extensions() -> None:
    token = hs_token(headers={"crit": ["exp"]})
    assert "header extensions" in reason(TokenVerifier(hs_config()), token)


# --------------------------------------------------------------------------- claims


def test_subject_missing_or_bad() -> None:
    verifier = TokenVerifier(hs_config())
    assert reason(verifier, hs_token(sub=None)) == "token has no subject (claim sub)"
    assert reason(verifier, hs_token(sub="  ")) == "token has no subject (claim sub)"
    assert "not text" in reason(verifier, hs_token(sub=["a"]))
    assert "control characters" in reason(verifier, hs_token(sub="evil\x1b[2J"))


def test_custom_subject_claim() -> None:
    verifier = TokenVerifier(hs_config(subject_claim="email"))
    assert verifier.verify(hs_token(email="bot@example.test")).subject == "bot@example.test"
    assert reason(verifier, hs_token()) == "token has no subject (claim email)"


@pytest.mark.parametrize(("value", "expected"), [
    (["a", "b"], ("a", "b")),
    ("a b", ("a", "b")),
    ("a,b, c", ("a", "b", "c")),
    ("a  ,, b a", ("a", "b")),
    ([], ()),
    ("", ()),
    (None, ()),
])
def test_groups_as_list_or_string(value: Any, expected: tuple[str, ...]) -> None:
    assert TokenVerifier(hs_config()).verify(hs_token(groups=value)).groups == expected
    assert parse_groups(value) == expected


@pytest.mark.parametrize("bad", [5, ["a", 1], {"a": True}])
def test_groups_of_wrong_type(bad: Any) -> None:
    text = reason(TokenVerifier(hs_config()), hs_token(groups=bad))
    assert text.startswith("token claim groups must be a list")


def test_groups_from_nested_and_custom_claims() -> None:
    verifier = TokenVerifier(hs_config(groups_claim="realm_access.roles"))
    token = hs_token(groups=None, realm_access={"roles": ["dba", "ops"]})
    assert verifier.verify(token).groups == ("dba", "ops")
    url_claim = "https://example.test/groups"
    verifier = TokenVerifier(hs_config(groups_claim=url_claim))
    assert verifier.verify(hs_token(**{url_claim: "x y"})).groups == ("x", "y")


# --------------------------------------------------------------------------- never echo


def test_reasons_never_contain_the_token(rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = TokenVerifier(hs_config())
    future = int(time.time()) + 3600
    header, _, signature = hs_token().split(".")
    bad = [
        hs_token(exp=1_700_000_000),
        hs_token(nbf=future, exp=future + 60),
        hs_token(aud="x"), hs_token(iss="y"), hs_token(sub=None),
        hs_token(secret="another-secret-0123456789abcdef-012345"),
        f"{header}.{b64(json.dumps(claims(sub='admin')).encode())}.{signature}",
        raw_token({"alg": "none"}, claims()),
        raw_token({"alg": "HS256", "kid": "x" * 200}, claims()),
        raw_token({"alg": "\x1b[31mRS256"}, claims()),
        jwt.encode(claims(), rsa_key, algorithm="RS256"),
        "not-a-token-but-a-long-password-1234567890",
        hs_token(groups=12345),
    ]
    for token in bad:
        text = reason(verifier, token)
        assert token not in text
        for part in token.split("."):
            if len(part) >= 8:
                assert part not in text, text
        assert "\x1b" not in text


# --------------------------------------------------------------------------- key sources


def test_private_key_as_public_key_file_is_refused(tmp_path: Path,
                                                  rsa_key: rsa.RSAPrivateKey) -> None:
    path = tmp_path / "oops.pem"
    path.write_bytes(pem_private(rsa_key))
    with pytest.raises(KeySourceError, match="holds a private key"):
        TokenVerifier(IdentityConfig(issuer=None, audience=None, public_key_file=path))


def test_weak_rsa_key_is_refused(tmp_path: Path) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    path = tmp_path / "weak.pem"
    path.write_bytes(pem_public(weak))
    with pytest.raises(KeySourceError, match="too weak"):
        TokenVerifier(IdentityConfig(issuer=None, audience=None, public_key_file=path))


def test_unreadable_and_garbage_key_files(tmp_path: Path) -> None:
    with pytest.raises(KeySourceError, match="cannot read"):
        TokenVerifier(IdentityConfig(issuer=None, audience=None,
                                     public_key_file=tmp_path / "missing.pem"))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello")
    with pytest.raises(KeySourceError, match="not a PEM public key"):
        TokenVerifier(IdentityConfig(issuer=None, audience=None, public_key_file=garbage))
    with pytest.raises(KeySourceError, match="not JSON"):
        TokenVerifier(IdentityConfig(issuer=None, audience=None, jwks_file=garbage))


def test_symmetric_key_in_jwks_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [{"kty": "oct", "kid": "k", "k": b64(b"x" * 32)}]}))
    with pytest.raises(KeySourceError, match="symmetric"):
        TokenVerifier(IdentityConfig(issuer=None, audience=None, jwks_file=path))


def test_jwks_skips_encryption_keys(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    enc = jwk_of(rsa_key, "enc-1")
    enc["use"] = "enc"
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [enc, jwk_of(rsa_key, "sig-1")]}))
    verifier = TokenVerifier(IdentityConfig(issuer=ISSUER, audience=AUDIENCE, jwks_file=path))
    token = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "enc-1"})
    assert reason(verifier, token) == "unknown signing key id enc-1"


def test_pem_as_hs256_secret_is_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(KeySourceError, match="looks like a public or private key"):
        TokenVerifier(hs_config(hs256_secret=pem_public(rsa_key).decode()))


def test_exactly_one_key_source(rsa_config: IdentityConfig) -> None:
    with pytest.raises(KeySourceError, match="exactly one"):
        TokenVerifier(replace(rsa_config, hs256_secret=SECRET))
    with pytest.raises(KeySourceError, match="https"):
        TokenVerifier(IdentityConfig(issuer=None, audience=None,
                                     jwks_url="http://127.0.0.1/jwks.json"))


# --------------------------------------------------------------------------- minting


def test_mint_token_round_trip() -> None:
    config = hs_config()
    token = mint_token(config, "alice", ["a", "b"], 60, extra_claims={"purpose": "demo"})
    identity = TokenVerifier(config).verify(token)
    assert identity.subject == "alice"
    assert identity.groups == ("a", "b")
    assert identity.token_id and len(identity.token_id) == 32
    assert identity.claims["purpose"] == "demo"
    assert identity.expires_at == pytest.approx(time.time() + 60, abs=5)
    assert jwt.get_unverified_header(token)["alg"] == "HS256"


def test_mint_needs_private_key_for_public_key_configs(rsa_config: IdentityConfig,
                                                      rsa_key: rsa.RSAPrivateKey,
                                                      rsa_key2: rsa.RSAPrivateKey) -> None:
    with pytest.raises(MintError, match="minting needs the private key"):
        mint_token(rsa_config, "alice", [], 60)
    token = mint_token(rsa_config, "alice", ["x"], 60, private_key=pem_private(rsa_key))
    assert TokenVerifier(rsa_config).verify(token).groups == ("x",)
    with pytest.raises(MintError, match="matches no key"):
        mint_token(rsa_config, "alice", [], 60, private_key=rsa_key2)


def test_mint_with_jwks_file_uses_the_matching_kid(jwks_config: IdentityConfig,
                                                   ec_key: ec.EllipticCurvePrivateKey) -> None:
    token = mint_token(jwks_config, "bot", [], 60, private_key=ec_key)
    assert jwt.get_unverified_header(token) == {"alg": "ES256", "kid": "ec-1", "typ": "JWT"}
    assert TokenVerifier(jwks_config).verify(token).subject == "bot"


def test_mint_rejects_bad_input() -> None:
    with pytest.raises(MintError, match="subject"):
        mint_token(hs_config(), "", [], 60)
    with pytest.raises(MintError, match="ttl"):
        mint_token(hs_config(), "a", [], 0)


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOOPOPS_TEST_JWT_SECRET", SECRET)
    path = tmp_path / "hoopops.yaml"
    path.write_text(
        "targets:\n  appdb:\n    upstream: postgresql://svc:pw@127.0.0.1:5432/app\n"
        f"identity:\n  issuer: {ISSUER}\n  audience: {AUDIENCE}\n"
        "  hs256_secret_env: HOOPOPS_TEST_JWT_SECRET\n")
    return path


def test_cli_mint_then_verify(config_file: Path, capsys: pytest.CaptureFixture[str],
                              monkeypatch: pytest.MonkeyPatch) -> None:
    status = cli.main(["token", "mint", "--config", str(config_file), "--sub", "agent-9",
                       "--groups", "analysts,oncall", "--groups", "extra", "--ttl", "15m"])
    out, err = capsys.readouterr()
    assert status == 0 and err == ""
    token = out.strip()
    assert out == token + "\n"  # nothing but the token, so $(...) captures exactly it
    identity = TokenVerifier(hs_config()).verify(token)
    assert identity.subject == "agent-9"
    assert identity.groups == ("analysts", "oncall", "extra")
    assert identity.expires_at == pytest.approx(time.time() + 900, abs=5)

    monkeypatch.setattr("sys.stdin", io.StringIO(token + "\n"))
    assert cli.main(["token", "verify", "--config", str(config_file)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["subject"] == "agent-9" and shown["groups"] == ["analysts", "oncall", "extra"]


def test_cli_verify_reports_reason(config_file: Path, capsys: pytest.CaptureFixture[str],
                                   tmp_path: Path) -> None:
    path = tmp_path / "token"
    token = hs_token(aud="elsewhere")
    path.write_text(token)
    assert cli.main(["token", "verify", "-c", str(config_file), "--token-file", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "hoopops: token refused: wrong audience (expected hoopops)\n"


def test_cli_mint_errors_are_one_line(config_file: Path, capsys: pytest.CaptureFixture[str],
                                      rsa_config: IdentityConfig, tmp_path: Path,
                                      rsa_key: rsa.RSAPrivateKey) -> None:
    assert cli.main(["token", "mint", "-c", str(config_file), "--sub", "a",
                     "--ttl", "soon"]) == 2
    assert capsys.readouterr().err == (
        "hoopops: --ttl: expected a duration like 30s, 5m, 1h or 400d\n")

    rsa_file = tmp_path / "rsa.yaml"
    rsa_file.write_text(
        "targets:\n  appdb:\n    upstream: postgresql://svc:pw@127.0.0.1:5432/app\n"
        f"identity:\n  issuer: {ISSUER}\n  audience: {AUDIENCE}\n"
        f"  public_key_file: {rsa_config.public_key_file}\n")
    assert cli.main(["token", "mint", "-c", str(rsa_file), "--sub", "a"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("hoopops: minting needs the private key")
    assert err.count("\n") == 1

    key_file = tmp_path / "idp.key"
    key_file.write_bytes(pem_private(rsa_key))
    assert cli.main(["token", "mint", "-c", str(rsa_file), "--sub", "a",
                     "--private-key", str(key_file)]) == 0
    token = capsys.readouterr().out.strip()
    assert TokenVerifier(rsa_config).verify(token).subject == "a"

    assert cli.main(["token", "mint", "-c", str(rsa_file), "--sub", "a",
                     "--private-key", str(tmp_path / "missing.key")]) == 1
    assert "cannot read it" in capsys.readouterr().err


def test_cli_token_without_action_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["token"]) == 2
    assert "mint" in capsys.readouterr().out


# --------------------------------------------------------------------------- JWKS over HTTPS


class _Jwks:
    """What the local identity provider serves, and how often it was asked."""

    def __init__(self) -> None:
        self.document: dict[str, Any] = {"keys": []}
        self.status = 200
        self.hits = 0
        self.delay = 0.0
        self.redirect_to: str | None = None


def _tls_material(folder: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hoopops test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                       crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False,
                                       decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_path, cert_path, key_path = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(pem_private(key))
    return ca_path, cert_path, key_path


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, _Jwks, ssl.SSLContext]]:
    """A real HTTPS server on 127.0.0.1 serving a JWKS, plus a client context trusting it."""
    ca_path, cert_path, key_path = _tls_material(tmp_path_factory.mktemp("tls"))
    state = _Jwks()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.hits += 1
            if state.redirect_to:
                self.send_response(302)
                self.send_header("Location", state.redirect_to)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if state.delay:
                time.sleep(state.delay)
            body = json.dumps(state.document).encode()
            self.send_response(state.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert_path, key_path)
    server.socket = server_context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    client_context = ssl.create_default_context(cafile=str(ca_path))
    url = f"https://127.0.0.1:{server.server_address[1]}/.well-known/jwks.json"
    try:
        yield url, state, client_context
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def jwks_url(idp: tuple[str, _Jwks, ssl.SSLContext],
             rsa_key: rsa.RSAPrivateKey) -> tuple[str, _Jwks, ssl.SSLContext]:
    url, state, context = idp
    state.document = {"keys": [jwk_of(rsa_key, "rsa-1", "RS256")]}
    state.status, state.hits, state.delay, state.redirect_to = 200, 0, 0.0, None
    return url, state, context


class FakeClock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def test_jwks_url_fetched_on_first_use(jwks_url: tuple[str, _Jwks, ssl.SSLContext],
                                             rsa_key: rsa.RSAPrivateKey) -> None:
    url, state, context = jwks_url
    verifier = TokenVerifier(IdentityConfig(issuer=ISSUER, audience=AUDIENCE, jwks_url=url),
                             ssl_context=context)
    token = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "rsa-1"})
    # The synchronous path never touches the network; it says a refresh is needed.
    with pytest.raises(KeyRefreshNeeded) as caught:
        verifier.verify(token)
    assert isinstance(caught.value, AuthError) and caught.value.kid == "rsa-1"
    assert state.hits == 0
    assert (await verifier.verify_async(token)).subject == "agent-7"
    assert state.hits == 1
    # Now cached: the sync path works and nothing more is fetched.
    assert verifier.verify(token).subject == "agent-7"
    assert (await verifier.verify_async(token)).subject == "agent-7"
    assert state.hits == 1


async def test_jwks_url_key_rotation(jwks_url: tuple[str, _Jwks, ssl.SSLContext],
                                     rsa_key: rsa.RSAPrivateKey,
                                     ec_key: ec.EllipticCurvePrivateKey) -> None:
    url, state, context = jwks_url
    clock = FakeClock()
    verifier = TokenVerifier(IdentityConfig(issuer=ISSUER, audience=AUDIENCE, jwks_url=url),
                             ssl_context=context, min_refresh_interval=30, clock=clock)
    assert await verifier.refresh() == 1
    state.document = {"keys": [jwk_of(rsa_key, "rsa-1"), jwk_of(ec_key, "ec-2")]}
    token = jwt.encode(claims(), ec_key, algorithm="ES256", headers={"kid": "ec-2"})
    # Within the rate-limit window an unknown kid is refused without asking the IdP.
    clock.now += 5
    with pytest.raises(AuthError) as caught:
        await verifier.verify_async(token)
    assert caught.value.reason == "unknown signing key id ec-2"
    assert not isinstance(caught.value, KeyRefreshNeeded)
    assert state.hits == 1
    clock.now += 30
    assert (await verifier.verify_async(token)).subject == "agent-7"
    assert state.hits == 2


async def test_jwks_url_unknown_kid_flood_is_rate_limited(
        jwks_url: tuple[str, _Jwks, ssl.SSLContext], rsa_key: rsa.RSAPrivateKey) -> None:
    url, state, context = jwks_url
    state.delay = 0.05  # keep the fetch in flight while the other logins arrive
    verifier = TokenVerifier(IdentityConfig(issuer=ISSUER, audience=AUDIENCE, jwks_url=url),
                             ssl_context=context)
    tokens = [jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": f"k{i}"})
              for i in range(25)]
    results = await asyncio.gather(*(verifier.verify_async(t) for t in tokens),
                                   return_exceptions=True)
    assert all(isinstance(r, AuthError) and r.reason.startswith("unknown signing key id")
               for r in results)
    assert state.hits == 1


async def test_logins_during_the_first_fetch_wait_for_it(
        jwks_url: tuple[str, _Jwks, ssl.SSLContext], rsa_key: rsa.RSAPrivateKey) -> None:
    url, state, context = jwks_url
    state.delay = 0.1
    verifier = TokenVerifier(IdentityConfig(issuer=ISSUER, audience=AUDIENCE, jwks_url=url),
                             ssl_context=context)
    token = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "rsa-1"})
    results = await asyncio.gather(*(verifier.verify_async(token) for _ in range(10)))
    assert {r.subject for r in results} == {"agent-7"}
    assert state.hits == 1


async def test_jwks_url_stale_keys_are_refreshed(jwks_url: tuple[str, _Jwks, ssl.SSLContext],
                                                 rsa_key: rsa.RSAPrivateKey,
                                                 rsa_key2: rsa.RSAPrivateKey) -> None:
    url, state, context = jwks_url
    clock = FakeClock()
    verifier = TokenVerifier(IdentityConfig(issuer=ISSUER, audience=AUDIENCE, jwks_url=url),
                             ssl_context=context, max_key_age=600, clock=clock)
    token = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "rsa-1"})
    assert (await verifier.verify_async(token)).subject
    # The IdP withdraws rsa-1 (say it leaked); once the cache is old it stops working.
    state.document = {"keys": [jwk_of(rsa_key2, "rsa-2")]}
    clock.now += 601
    with pytest.raises(AuthError, match="unknown signing key id rsa-1"):
        await verifier.verify_async(token)
    assert state.hits == 2


async def test_jwks_url_refuses_redirect_to_http(jwks_url: tuple[str, _Jwks, ssl.SSLContext]
                                                 ) -> None:
    url, state, context = jwks_url
    state.redirect_to = "http://127.0.0.1:9/jwks.json"
    verifier = TokenVerifier(IdentityConfig(issuer=None, audience=None, jwks_url=url),
                             ssl_context=context)
    with pytest.raises(KeySourceError, match="refused redirect to non-https"):
        await verifier.refresh()


async def test_jwks_url_failure_fails_closed(jwks_url: tuple[str, _Jwks, ssl.SSLContext],
                                             rsa_key: rsa.RSAPrivateKey) -> None:
    url, state, context = jwks_url
    state.status = 500
    verifier = TokenVerifier(IdentityConfig(issuer=ISSUER, audience=AUDIENCE, jwks_url=url),
                             ssl_context=context)
    token = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "rsa-1"})
    with pytest.raises(AuthError, match="signing keys are unavailable"):
        await verifier.verify_async(token)
    with pytest.raises(KeySourceError, match="HTTP 500"):
        await verifier.refresh()


async def test_jwks_url_requires_a_trusted_certificate(
        jwks_url: tuple[str, _Jwks, ssl.SSLContext], rsa_key: rsa.RSAPrivateKey) -> None:
    url, _state, _context = jwks_url
    # The default context does not trust the test CA: the fetch must fail, not fall back.
    verifier = TokenVerifier(IdentityConfig(issuer=ISSUER, audience=AUDIENCE, jwks_url=url))
    with pytest.raises(KeySourceError, match="CERTIFICATE_VERIFY_FAILED"):
        await verifier.refresh()
    token = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "rsa-1"})
    with pytest.raises(AuthError, match="signing keys are unavailable"):
        await verifier.verify_async(token)


async def test_jwks_url_timeout(jwks_url: tuple[str, _Jwks, ssl.SSLContext]) -> None:
    url, state, context = jwks_url
    state.delay = 1.0
    verifier = TokenVerifier(IdentityConfig(issuer=None, audience=None, jwks_url=url),
                             ssl_context=context, fetch_timeout=0.2)
    started = time.perf_counter()
    with pytest.raises(KeySourceError, match="timed out"):
        await verifier.refresh()
    assert time.perf_counter() - started < 1.5


async def test_verify_async_for_local_keys() -> None:
    assert (await TokenVerifier(hs_config()).verify_async(hs_token())).subject == "agent-7"
    with pytest.raises(AuthError, match="bad signature"):
        await TokenVerifier(hs_config()).verify_async(
            hs_token(secret="another-secret-0123456789abcdef-012345"))


def test_ed25519_jwks(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk_of(key, "ed-1")]}))
    verifier = TokenVerifier(IdentityConfig(issuer=ISSUER, audience=AUDIENCE, jwks_file=path))
    token = jwt.encode(claims(), key, algorithm="EdDSA", headers={"kid": "ed-1"})
    assert verifier.verify(token).subject == "agent-7"

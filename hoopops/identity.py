"""Verify agent JWTs and turn their claims into an Identity.

An agent's Postgres password is a JWT. :class:`TokenVerifier` checks it against exactly one
key source from ``identity`` in ``hoopops.yaml`` (an HS256 development secret, a PEM public
key, a JWKS file or a JWKS URL) and returns an :class:`Identity`, or raises
:class:`AuthError` whose ``reason`` the gateway sends as ``FATAL 28P01``.

How the gateway calls it: ``identity = await verifier.verify_async(password)``. That never
blocks the event loop: the signature check is CPU-only and fast (keys are parsed once), and
the only network I/O — fetching a JWKS URL — runs in a worker thread with a timeout, at
most once per ``min_refresh_interval`` however many unknown key ids clients send.
``verify()`` is the synchronous core; for a JWKS URL it raises :class:`KeyRefreshNeeded`
(an ``AuthError``, so a caller that ignores it still fails closed) when the key id is unknown
and a refresh is allowed, and ``verify_async`` answers that by refreshing and retrying once.

Algorithm policy: the accepted algorithms are those the configured key can verify (an HMAC
secret verifies HS*, an RSA key RS*/PS*, an EC key the ES* of its curve, an Ed25519/Ed448
key EdDSA), narrowed by ``identity.algorithms`` and by a JWK's own ``alg``. ``none`` is
never accepted, and because the family comes from the key rather than the token header, an
HS256 token cannot be checked against a public key used as an HMAC secret (or the reverse).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import math
import re
import secrets
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from jwt.algorithms import ECAlgorithm, HMACAlgorithm, OKPAlgorithm, RSAAlgorithm

from hoopops.config import IdentityConfig

log = logging.getLogger("hoopops.identity")

# A JWT carried as a password is normally 0.5-4 KiB; IdPs that inline many groups reach
# ~10 KiB. Anything far beyond that is misuse or an attempt to make us parse megabytes, so
# it is refused before any decoding.
MAX_TOKEN_BYTES = 32 * 1024
# A real JWKS holds a handful of keys; a bigger answer is a misconfigured URL or hostile.
MAX_JWKS_BYTES = 1024 * 1024
MIN_RSA_BITS = 2048

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
_EC_ALGORITHM_BY_CURVE = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512",
                          "secp256k1": "ES256K"}
EC_ALGORITHMS = tuple(_EC_ALGORITHM_BY_CURVE.values())
EDDSA_ALGORITHMS = ("EdDSA",)
ASYMMETRIC_ALGORITHMS = RSA_ALGORITHMS + EC_ALGORITHMS + EDDSA_ALGORITHMS
# An HMAC key shorter than the hash output weakens it (RFC 7518 §3.2), so HS384/HS512 are
# only offered when the secret is long enough.
_HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
# The order mint_token prefers when a key can sign several algorithms.
_PREFERENCE = ("HS256", "RS256", "ES256", "ES384", "ES512", "ES256K", "EdDSA", "PS256",
               "RS384", "RS512", "PS384", "PS512", "HS384", "HS512")

_JWS_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
# JWE compact form: header.encrypted_key.iv.ciphertext.tag (the key part may be empty).
_JWE_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+"
                        r"\.[A-Za-z0-9_-]+")
# Header values end up in error messages and logs; only echo ones that look harmless.
_SAFE_ECHO = re.compile(r"[A-Za-z0-9+._:/-]{1,64}")
_JWK_LOADERS: dict[str, Any] = {"RSA": RSAAlgorithm, "EC": ECAlgorithm, "OKP": OKPAlgorithm}
_PRIVATE_TYPES = (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey,
                  ed448.Ed448PrivateKey)
_MAX_SUBJECT_CHARS = 512


@dataclass(frozen=True)
class Identity:
    """Who is connected, as proven by a verified token."""

    subject: str
    groups: tuple[str, ...]
    issuer: str | None
    token_id: str | None
    expires_at: float | None
    claims: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


class AuthError(Exception):
    """A token was refused. ``reason`` is short, user-facing and never contains the token."""

    sqlstate = "28P01"  # invalid_password: what libpq clients expect for a bad credential

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class KeyRefreshNeeded(AuthError):
    """The token names a key id we do not hold yet, and the JWKS URL may be fetched now.

    Raised only by the synchronous :meth:`TokenVerifier.verify` when a JWKS URL is
    configured; :meth:`TokenVerifier.verify_async` handles it. It is an ``AuthError`` so
    code that does not handle it still refuses the login.
    """

    def __init__(self, kid: str | None) -> None:
        super().__init__(_unknown_kid_reason(kid))
        self.kid = kid


class KeySourceError(Exception):
    """The configured key material cannot be used (bad file, unusable JWKS, fetch failed).

    The message names the file or URL and what is wrong; it is for the operator, not the
    agent.
    """


class MintError(Exception):
    """A token cannot be minted with this configuration; the message says what to do."""


@dataclass(frozen=True)
class _Key:
    """One verification key, parsed once, with the algorithms it may verify."""

    kid: str | None
    key: bytes | PublicKeyTypes
    algorithms: frozenset[str]
    label: str


# --------------------------------------------------------------------------- key loading


class _FilteredOut(KeySourceError):
    """A valid key that identity.algorithms rules out: skipped quietly inside a JWKS."""


def _key_family(key: PublicKeyTypes) -> tuple[str, ...]:
    """The algorithms a public key can verify at all, from its type (never from a token)."""
    if isinstance(key, rsa.RSAPublicKey):
        return RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey):
        alg = _EC_ALGORITHM_BY_CURVE.get(key.curve.name)
        return (alg,) if alg else ()
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return EDDSA_ALGORITHMS
    return ()


def _describe(key: PublicKeyTypes) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}-bit key"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name} key"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519 key"
    if isinstance(key, ed448.Ed448PublicKey):
        return "Ed448 key"
    return f"{type(key).__name__}"


def _public_key(key: PublicKeyTypes, label: str, config_algs: frozenset[str] | None,
                jwk_alg: Any = None, kid: str | None = None) -> _Key:
    """Wrap a public key with its allowed algorithms; KeySourceError if none remain."""
    family = _key_family(key)
    if not family:
        raise KeySourceError(f"{label}: {_describe(key)} cannot verify JWTs "
                             "(use RSA, EC P-256/P-384/P-521 or Ed25519)")
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        raise KeySourceError(f"{label}: an RSA key of {key.key_size} bits is too weak; "
                             f"at least {MIN_RSA_BITS} bits are required")
    allowed = set(family)
    if jwk_alg is not None:
        # A JWK that names its algorithm may only be used with that one (RFC 7517 §4.4).
        if jwk_alg not in family:
            raise KeySourceError(f"{label}: its alg {_echo(jwk_alg)} does not fit a "
                                 f"{_describe(key)}")
        allowed = {jwk_alg}
    if config_algs is not None:
        allowed &= config_algs
        if not allowed:
            raise _FilteredOut(f"{label}: identity.algorithms allows none of what a "
                               f"{_describe(key)} verifies ({', '.join(sorted(family))})")
    return _Key(kid=kid, key=key, algorithms=frozenset(allowed),
                label=f"{_describe(key)}" + (f" (kid {kid})" if kid else ""))


def _hmac_key(secret: str, config_algs: frozenset[str] | None) -> _Key:
    raw = secret.encode()
    try:
        # pyjwt refuses PEM/JWK-looking HMAC secrets; learn that now rather than per login.
        HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(raw)
    except jwt.InvalidKeyError:
        raise KeySourceError("identity.hs256_secret looks like a public or private key, "
                             "not a shared secret; use public_key_file for keys") from None
    wanted = config_algs if config_algs is not None else frozenset({"HS256"})
    allowed = {a for a in HMAC_ALGORITHMS if a in wanted and len(raw) >= _HMAC_MIN_BYTES[a]}
    if not allowed:
        raise KeySourceError("identity.algorithms allows no HMAC algorithm the "
                             f"{len(raw)}-byte hs256_secret can verify (HS256 needs 32 bytes, "
                             "HS384 48, HS512 64)")
    return _Key(kid=None, key=raw, algorithms=frozenset(allowed), label="HS256 secret")


def load_public_key_file(path: Path) -> PublicKeyTypes:
    """A public key from a PEM file holding a public key or an X.509 certificate."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeySourceError(f"identity.public_key_file {path}: cannot read it "
                             f"({exc.strerror or exc})") from None
    if b"PRIVATE KEY-----" in data:
        # Refuse rather than derive: the gateway host should never hold the signing key.
        raise KeySourceError(f"identity.public_key_file {path}: holds a private key; give the "
                             "gateway the public key only (openssl pkey -pubout)")
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            return x509.load_pem_x509_certificate(data).public_key()  # type: ignore[return-value]
        return serialization.load_pem_public_key(data)
    except (ValueError, TypeError, x509.InvalidVersion):
        raise KeySourceError(f"identity.public_key_file {path}: not a PEM public key or "
                             "certificate (expected -----BEGIN PUBLIC KEY-----)") from None


def _strict_json(data: bytes | str) -> Any:
    """JSON that refuses duplicate keys and NaN/Infinity.

    Duplicate claims are a known parser-differential trick (two ``sub`` values read
    differently by two systems), and ``exp: Infinity`` would mean "never expires".
    """
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, value in items:
            if name in out:
                raise ValueError(f"duplicate member {name!r}")
            out[name] = value
        return out

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    return json.loads(data, object_pairs_hook=pairs, parse_constant=constant)


def _parse_jwks(data: Any, source: str, config_algs: frozenset[str] | None,
                ) -> tuple[list[_Key], list[str]]:
    """Usable signing keys from a JWKS document, plus a description of each broken one."""
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise KeySourceError(f'{source}: expected a JSON Web Key Set ({{"keys": [...]}})')
    keys: list[_Key] = []
    problems: list[str] = []
    for index, jwk in enumerate(data["keys"]):
        if not isinstance(jwk, dict):
            problems.append(f"{source}: key #{index} is not a JSON object")
            continue
        kid = jwk.get("kid")
        label = f"{source}: key #{index}" + (f" (kid {_echo(kid)})" if kid is not None else "")
        if kid is not None and not isinstance(kid, str):
            problems.append(f"{label}: kid must be text")
            continue
        # Encryption keys in the same set are not ours to use (RFC 7517 §4.2, §4.3).
        if jwk.get("use") not in (None, "sig"):
            continue
        ops = jwk.get("key_ops")
        if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
            continue
        kty = jwk.get("kty")
        loader = _JWK_LOADERS.get(kty) if isinstance(kty, str) else None
        if kty == "oct":
            # A published symmetric key lets anyone sign; mixing it in invites confusion.
            problems.append(f"{label}: symmetric (oct) keys do not belong in a JWKS; "
                            "use identity.hs256_secret for a shared secret")
            continue
        if loader is None:
            problems.append(f"{label}: unsupported key type {_echo(kty)}")
            continue
        try:
            key: Any = loader.from_jwk(jwk)
        except (jwt.PyJWTError, ValueError, TypeError, KeyError) as exc:
            problems.append(f"{label}: cannot load it ({exc})")
            continue
        if isinstance(key, _PRIVATE_TYPES):
            # A private JWK (with "d") in a verification set is a leak; use its public half.
            log.warning("%s: holds private key material; only the public part is used", label)
            key = key.public_key()
        try:
            keys.append(_public_key(key, label, config_algs, jwk.get("alg"), kid))
        except _FilteredOut as exc:
            log.debug("%s", exc)
        except KeySourceError as exc:
            problems.append(str(exc))
    return keys, problems


# --------------------------------------------------------------------------- JWKS over HTTPS


class _HttpsOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to https: a downgrade would let anyone on path swap the keys."""

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str,
                         headers: Any, newurl: str) -> urllib.request.Request | None:
        if not newurl.lower().startswith("https://"):
            fp.close()  # the base class would close it after a successful redirect
            raise urllib.error.URLError(f"refused redirect to non-https URL ({code})")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _fetch_jwks(url: str, timeout: float, context: ssl.SSLContext | None) -> Any:
    """GET a JWKS document (blocking; run it in a thread). KeySourceError on any failure."""
    # Built here, in the worker thread: loading the system CA store takes milliseconds.
    context = context or ssl.create_default_context()
    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context),
                                         _HttpsOnlyRedirects())
    request = urllib.request.Request(url, headers={"Accept": "application/json",
                                                   "User-Agent": "hoopops"})
    try:
        with opener.open(request, timeout=timeout) as response:
            body = response.read(MAX_JWKS_BYTES + 1)
    except urllib.error.HTTPError as exc:
        exc.close()  # it holds the response socket
        raise KeySourceError(f"identity.jwks_url {url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise KeySourceError(f"identity.jwks_url {url}: {exc.reason}") from None
    except (TimeoutError, OSError) as exc:
        raise KeySourceError(f"identity.jwks_url {url}: {exc or 'timed out'}") from None
    if len(body) > MAX_JWKS_BYTES:
        raise KeySourceError(f"identity.jwks_url {url}: answer larger than "
                             f"{MAX_JWKS_BYTES} bytes")
    try:
        return _strict_json(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise KeySourceError(f"identity.jwks_url {url}: not JSON ({exc})") from None


# --------------------------------------------------------------------------- helpers


def _echo(value: Any) -> str:
    """A header or claim value safe to put in a message (short, no control characters)."""
    if isinstance(value, str) and _SAFE_ECHO.fullmatch(value):
        return value
    return "(unprintable)"


def _hidden(text: str) -> bool:
    """Whether ``text`` has characters that do not show as themselves: controls (C0, and
    C1, where an 8-bit CSI starts a terminal escape), bidi overrides and zero-width
    characters, line separators, spaces other than the ASCII one. Identity text lands in
    logs, the audit trail and the analyst's terminal as is, where "agent\u202eevil"
    would read as another name."""
    return not text.isprintable()


def _unknown_kid_reason(kid: str | None) -> str:
    return f"unknown signing key id {_echo(kid)}" if kid else "unknown signing key"


def format_utc(timestamp: float) -> str:
    """A Unix time as 2026-01-31T12:00:00Z (or the raw number if out of range)."""
    try:
        return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return f"{timestamp:.0f} (seconds since 1970)"


def _b64url(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _claim(payload: Mapping[str, Any], name: str) -> Any:
    """``payload[name]``, or a dotted path into nested objects (``realm_access.roles``).

    The literal name is read so URL-style claim names containing dots keep working; a
    token that has both, the literal name and the nested path, says two things at once
    (a mapper copying a user-set attribute into a top-level claim, say) and is refused.
    """
    node: Any = payload
    for part in name.split("."):
        if not isinstance(node, dict) or part not in node:
            node = None
            break
        node = node[part]
    if name in payload:
        if node is not None and "." in name:
            raise AuthError(f"token has both a claim named {_echo(name)} and that path "
                            "into nested claims; refused as ambiguous")
        return payload[name]
    return node


def _time_claim(payload: Mapping[str, Any], name: str) -> float | None:
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AuthError(f"token claim {name} is not a time (seconds since 1970)")
    try:
        number = float(value)
    except OverflowError:
        raise AuthError(f"token claim {name} is out of range") from None
    if not math.isfinite(number):
        raise AuthError(f"token claim {name} is out of range")
    return number


def parse_groups(value: Any, claim: str = "groups") -> tuple[str, ...]:
    """Groups from a claim value: a list of strings or a space/comma separated string."""
    if value is None:
        return ()
    if isinstance(value, str):
        items: Iterable[str] = re.split(r"[\s,]+", value)
    elif isinstance(value, list) and all(isinstance(item, str) for item in value):
        items = value
    else:
        raise AuthError(f"token claim {claim} must be a list of group names or a "
                        "space/comma separated string")
    groups: list[str] = []
    for item in items:
        name = item.strip()
        if not name or name in groups:
            continue
        if _hidden(name):
            raise AuthError(f"token claim {claim} has a group name with control "
                            "characters or invisible characters")
        groups.append(name)
    return tuple(groups)


# --------------------------------------------------------------------------- the verifier


class TokenVerifier:
    """Verify agent JWTs against the configured key source.

    ``verify(token)`` is synchronous and CPU-only; ``await verify_async(token)`` is what the
    gateway calls, since with a JWKS URL it may need to fetch keys (in a worker thread).
    Construction reads key files now and raises :class:`KeySourceError` if they are unusable;
    a JWKS URL is fetched on first need (or call ``await refresh()`` at start to fail fast).
    """

    def __init__(self, config: IdentityConfig, *, fetch_timeout: float = 5.0,
                 min_refresh_interval: float = 30.0, max_key_age: float = 3600.0,
                 ssl_context: ssl.SSLContext | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self._clock = clock
        self._config_algs = frozenset(config.algorithms) if config.algorithms else None
        if self._config_algs is not None and any(a.lower() == "none" for a in self._config_algs):
            raise KeySourceError("identity.algorithms: 'none' is never accepted")
        # enforce_minimum_key_length: a second line behind the checks made while loading keys.
        self._jws = jwt.PyJWS(options={"enforce_minimum_key_length": True})
        self._single: _Key | None = None
        self._by_kid: dict[str, list[_Key]] = {}
        self._all: list[_Key] = []
        self._url = config.jwks_url
        self._fetch_timeout = fetch_timeout
        self._min_refresh_interval = min_refresh_interval
        self._max_key_age = max_key_age
        self._ssl_context = ssl_context
        self._fetched_at: float | None = None
        self._last_attempt: float | None = None
        self._last_error: str | None = None
        # Completed fetch attempts; lets a task that waited on the lock see that another
        # task fetched meanwhile (single flight).
        self._generation = 0
        self._fetching = False
        self._lock = asyncio.Lock()

        sources = [s for s in (config.hs256_secret, config.public_key_file, config.jwks_file,
                               config.jwks_url) if s]
        if len(sources) != 1:
            raise KeySourceError("identity: set exactly one of hs256_secret, public_key_file, "
                                 "jwks_file or jwks_url")
        if config.hs256_secret:
            self._single = _hmac_key(config.hs256_secret, self._config_algs)
            self.key_source = "HS256 development secret"
        elif config.public_key_file:
            label = f"identity.public_key_file {config.public_key_file}"
            try:
                self._single = _public_key(load_public_key_file(config.public_key_file), label,
                                           self._config_algs)
            except _FilteredOut as exc:
                raise KeySourceError(str(exc)) from None
            self.key_source = f"{self._single.label} from {config.public_key_file}"
        elif config.jwks_file:
            self._install(self._load_jwks_file(config.jwks_file))
            self.key_source = f"JWKS file {config.jwks_file} ({len(self._all)} keys)"
        else:
            assert self._url is not None
            if not self._url.startswith("https://"):
                raise KeySourceError(f"identity.jwks_url {self._url}: must be an https:// URL")
            self.key_source = f"JWKS URL {self._url}"

    # ----------------------------------------------------------------- key tables

    def _load_jwks_file(self, path: Path) -> list[_Key]:
        source = f"identity.jwks_file {path}"
        try:
            data = _strict_json(path.read_bytes())
        except OSError as exc:
            raise KeySourceError(f"{source}: cannot read it ({exc.strerror or exc})") from None
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise KeySourceError(f"{source}: not JSON ({exc})") from None
        keys, problems = _parse_jwks(data, source, self._config_algs)
        if problems:
            # The operator owns this file, so a broken entry is a mistake to fix, not skip.
            raise KeySourceError(problems[0])
        if not keys:
            raise KeySourceError(f"{source}: no signing key usable with identity.algorithms")
        return keys

    def _install(self, keys: list[_Key]) -> None:
        by_kid: dict[str, list[_Key]] = {}
        for key in keys:
            if key.kid is not None:
                by_kid.setdefault(key.kid, []).append(key)
        # Swap whole tables so a concurrent verify sees either the old or the new set.
        self._by_kid, self._all = by_kid, list(keys)

    @property
    def accepted_algorithms(self) -> frozenset[str]:
        """Algorithms a token may use with this configuration (before key selection)."""
        if self._single is not None:
            return self._single.algorithms
        if self._url is not None:
            base = frozenset(ASYMMETRIC_ALGORITHMS)
            return base & self._config_algs if self._config_algs is not None else base
        return frozenset().union(*(k.algorithms for k in self._all))

    # ----------------------------------------------------------------- verification

    def verify(self, token: str | bytes) -> Identity:
        """The identity a token proves, or AuthError (KeyRefreshNeeded: see verify_async)."""
        text = self._as_text(token)
        header = self._header(text)
        alg = self._algorithm(header)
        key = self._select_key(header, alg)
        payload = self._signed_payload(text, key, alg)
        return self._identity(payload)

    async def verify_async(self, token: str | bytes) -> Identity:
        """``verify``, fetching the JWKS URL first when needed; never blocks the loop."""
        if self._url is not None and self._stale() and self._may_fetch():
            # A failed refresh is logged; the cached keys stay in use until one succeeds.
            with contextlib.suppress(KeySourceError):
                await self._refresh_once()
        try:
            return self.verify(token)
        except KeyRefreshNeeded as exc:
            kid = exc.kid
        try:
            await self._refresh_once()
        except KeySourceError:
            if not self._all:
                raise AuthError("signing keys are unavailable (the identity provider's key set "
                                "could not be fetched); try again shortly") from None
            raise AuthError(_unknown_kid_reason(kid)) from None
        try:
            return self.verify(token)
        except KeyRefreshNeeded as exc:
            # Just refreshed: the key really is unknown.
            raise AuthError(exc.reason) from None

    def _as_text(self, token: str | bytes) -> str:
        if len(token) > MAX_TOKEN_BYTES:
            raise AuthError(f"token too large ({len(token)} bytes; at most {MAX_TOKEN_BYTES})")
        if isinstance(token, bytes):
            try:
                token = token.decode("ascii")
            except UnicodeDecodeError:
                raise AuthError("not a JWT (expected a token as the password)") from None
        text = token.strip()
        if not text:
            raise AuthError("no token given (expected a JWT as the password)")
        return text

    def _header(self, text: str) -> dict[str, Any]:
        if not _JWS_SHAPE.fullmatch(text):
            if _JWE_SHAPE.fullmatch(text):
                raise AuthError("encrypted tokens (JWE) are not accepted; send a signed JWT")
            raise AuthError("not a JWT (expected a token as the password)")
        try:
            header = _strict_json(_b64url(text.split(".", 1)[0]))
        except (ValueError, binascii.Error, UnicodeDecodeError, RecursionError):
            # RecursionError: a 32 KiB header of "[[[[..." nests deeper than json can go.
            raise AuthError("not a JWT (expected a token as the password)") from None
        if not isinstance(header, dict):
            raise AuthError("not a JWT (expected a token as the password)")
        if "crit" in header or "b64" in header:
            # Extensions we do not implement must be refused (RFC 7515 §4.1.11); b64=false
            # would change what the signature covers.
            raise AuthError("token uses header extensions the gateway does not support")
        return header

    def _algorithm(self, header: Mapping[str, Any]) -> str:
        alg = header.get("alg")
        if not isinstance(alg, str) or not alg:
            raise AuthError("token header names no algorithm")
        if alg.lower() == "none":
            raise AuthError("algorithm none is not accepted")
        accepted = self.accepted_algorithms
        if alg not in accepted:
            raise AuthError(f"algorithm {_echo(alg)} not accepted (the gateway verifies "
                            f"{', '.join(sorted(accepted))})")
        return alg

    def _select_key(self, header: Mapping[str, Any], alg: str) -> _Key:
        if self._single is not None:
            # A single configured key has no id: any kid in the header is irrelevant.
            return self._single
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise AuthError("token header kid is not text")
        if kid is not None:
            candidates = self._by_kid.get(kid)
            if not candidates:
                if self._url_may_have_it():
                    raise KeyRefreshNeeded(kid)
                if self._url is not None and not self._all:
                    raise AuthError("signing keys are unavailable (the identity provider's "
                                    "key set could not be fetched); try again shortly")
                raise AuthError(_unknown_kid_reason(kid))
            for key in candidates:
                if alg in key.algorithms:
                    return key
            allowed = sorted(set().union(*(k.algorithms for k in candidates)))
            raise AuthError(f"algorithm {alg} not accepted for signing key {_echo(kid)} "
                            f"(it verifies {', '.join(allowed)})")
        # No kid: acceptable only when exactly one key could have signed it.
        fitting = [k for k in self._all if alg in k.algorithms]
        if len(fitting) == 1:
            return fitting[0]
        if not fitting and self._url_may_have_it():
            raise KeyRefreshNeeded(None)
        if not fitting:
            raise AuthError(f"no signing key for algorithm {alg}")
        raise AuthError("token has no key id (kid) and the key set holds several keys")

    def _signed_payload(self, text: str, key: _Key, alg: str) -> dict[str, Any]:
        try:
            decoded = self._jws.decode_complete(text, key.key, algorithms=[alg])
        except jwt.InvalidSignatureError:
            raise AuthError("bad signature") from None
        except jwt.PyJWTError:
            raise AuthError("malformed token (its parts could not be decoded)") from None
        try:
            payload = _strict_json(decoded["payload"])
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise AuthError("malformed token (its claims are not valid JSON)") from None
        if not isinstance(payload, dict):
            raise AuthError("malformed token (its claims are not a JSON object)")
        return payload

    def _identity(self, payload: dict[str, Any]) -> Identity:
        config = self.config
        now = self._clock()
        leeway = config.leeway
        exp = _time_claim(payload, "exp")
        if exp is None and config.require_exp:
            raise AuthError("token has no expiry (exp)")
        if exp is not None and now >= exp + leeway:
            raise AuthError(f"token expired at {format_utc(exp)}")
        nbf = _time_claim(payload, "nbf")
        if nbf is not None and now + leeway < nbf:
            raise AuthError(f"token not yet valid (valid from {format_utc(nbf)})")
        iat = _time_claim(payload, "iat")
        if iat is not None and now + leeway < iat:
            raise AuthError("token issued in the future (check the clocks of the gateway and "
                            "the identity provider)")
        issuer = payload.get("iss")
        if config.issuer is not None:
            if issuer is None:
                raise AuthError(f"token has no issuer (expected {config.issuer})")
            if issuer != config.issuer:
                raise AuthError(f"wrong issuer (expected {config.issuer})")
        if config.audience is not None:
            # When no audience is configured, a token's aud is not checked: the operator has
            # said this gateway is not a named audience. With one configured it is required.
            aud = payload.get("aud")
            if aud is None:
                raise AuthError(f"token has no audience (expected {config.audience})")
            audiences = [aud] if isinstance(aud, str) else aud
            if not isinstance(audiences, list) or config.audience not in audiences:
                raise AuthError(f"wrong audience (expected {config.audience})")
        subject = _claim(payload, config.subject_claim)
        if isinstance(subject, int) and not isinstance(subject, bool):
            subject = str(subject)
        if subject is None or (isinstance(subject, str) and not subject.strip()):
            raise AuthError(f"token has no subject (claim {config.subject_claim})")
        if not isinstance(subject, str):
            raise AuthError(f"token subject (claim {config.subject_claim}) is not text")
        if _hidden(subject) or len(subject) > _MAX_SUBJECT_CHARS:
            # The subject lands in audit records, logs and the console as is.
            raise AuthError("token subject has control characters, invisible characters "
                            "or is too long")
        groups = parse_groups(_claim(payload, config.groups_claim), config.groups_claim)
        jti = payload.get("jti")
        return Identity(
            subject=subject,
            groups=groups,
            issuer=issuer if isinstance(issuer, str) else None,
            token_id=jti if isinstance(jti, str) else None,
            expires_at=exp,
            claims=payload,
        )

    # ----------------------------------------------------------------- JWKS URL

    def _stale(self) -> bool:
        return self._fetched_at is not None and (
            self._clock() - self._fetched_at > self._max_key_age)

    def _url_may_have_it(self) -> bool:
        # A fetch in flight counts: the login should wait for it (in verify_async) rather
        # than be refused because the first key set has not arrived yet.
        return self._url is not None and (self._fetching or self._may_fetch())

    def _may_fetch(self) -> bool:
        # Rate limit: tokens with random key ids must not turn the gateway into a
        # request amplifier against the identity provider.
        return self._last_attempt is None or (
            self._clock() - self._last_attempt >= self._min_refresh_interval)

    async def refresh(self) -> int:
        """Fetch the JWKS URL now (ignoring the rate limit); the number of usable keys.

        Raises KeySourceError when the fetch fails or yields no usable key; the previous
        keys stay in use. A no-op returning the key count for file and secret sources.
        """
        if self._url is None:
            return len(self._all) or (1 if self._single else 0)
        async with self._lock:
            await self._fetch_now()
        return len(self._all)

    async def _refresh_once(self) -> None:
        """Fetch unless another task fetched while we waited (single flight)."""
        seen = self._generation
        async with self._lock:
            if self._generation != seen:
                if self._last_error is not None:
                    raise KeySourceError(self._last_error)
                return
            await self._fetch_now()

    async def _fetch_now(self) -> None:
        assert self._url is not None
        self._last_attempt = self._clock()
        self._fetching = True
        try:
            await self._fetch_and_install(self._url)
        finally:
            self._fetching = False
            self._generation += 1

    async def _fetch_and_install(self, url: str) -> None:
        try:
            data = await asyncio.wait_for(
                asyncio.to_thread(_fetch_jwks, url, self._fetch_timeout, self._ssl_context),
                self._fetch_timeout + 1.0)
            keys, problems = _parse_jwks(data, f"identity.jwks_url {url}",
                                         self._config_algs)
            for problem in problems:
                log.warning("skipping key: %s", problem)
            if not keys:
                raise KeySourceError(f"identity.jwks_url {url}: no signing key usable "
                                     "with identity.algorithms")
        except TimeoutError:
            self._last_error = (f"identity.jwks_url {url}: timed out after "
                                f"{self._fetch_timeout:g}s")
            log.warning("%s", self._last_error)
            raise KeySourceError(self._last_error) from None
        except KeySourceError as exc:
            self._last_error = str(exc)
            log.warning("%s", exc)
            raise
        self._last_error = None
        self._install(keys)
        self._fetched_at = self._clock()
        log.info("loaded %d signing keys from %s", len(keys), url)


# --------------------------------------------------------------------------- minting


def _load_private_key(source: Path | bytes | PrivateKeyTypes) -> PrivateKeyTypes:
    if not isinstance(source, Path | bytes):
        return source
    label = f"private key {source}" if isinstance(source, Path) else "private key"
    try:
        data = source.read_bytes() if isinstance(source, Path) else source
    except OSError as exc:
        raise MintError(f"{label}: cannot read it ({exc.strerror or exc})") from None
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise MintError(f"{label}: is encrypted; decrypt a copy first "
                        "(openssl pkey -in KEY -out PLAIN)") from None
    except ValueError:
        raise MintError(f"{label}: not a PEM private key "
                        "(expected -----BEGIN PRIVATE KEY-----)") from None


def _spki(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def _preferred(algorithms: Iterable[str]) -> str:
    available = set(algorithms)
    return next(a for a in _PREFERENCE if a in available)


def mint_token(config: IdentityConfig, subject: str, groups: Sequence[str],
               ttl_seconds: float, extra_claims: Mapping[str, Any] | None = None, *,
               private_key: Path | bytes | PrivateKeyTypes | None = None,
               kid: str | None = None) -> str:
    """A signed token the gateway configured with ``config`` accepts (for development).

    Signs with ``identity.hs256_secret``; for public-key configurations pass the matching
    ``private_key`` (a PEM file path, PEM bytes or a key object): it is checked against
    ``public_key_file`` / ``jwks_file`` and the matching JWK's ``kid`` is used. With a JWKS
    URL the keys cannot be checked offline, so give ``kid`` yourself. ``extra_claims`` are
    added last and may override the standard ones. Raises MintError or KeySourceError.
    """
    if not isinstance(subject, str) or not subject.strip() or _hidden(subject):
        raise MintError("the subject must be a non-empty name without control characters")
    if not math.isfinite(ttl_seconds) or ttl_seconds <= 0:
        raise MintError("the lifetime (ttl) must be a positive duration, like 15m")
    names = [g.strip() for g in groups if g.strip()]
    if any(_hidden(g) for g in names):
        raise MintError("group names cannot contain control or invisible characters")

    verifier = TokenVerifier(config)
    signing_key: Any
    header: dict[str, str] = {}
    if private_key is None:
        if config.hs256_secret is None:
            raise MintError(f"minting needs the private key: identity uses "
                            f"{verifier.key_source}; pass --private-key FILE (the PEM private "
                            "key matching it)")
        assert verifier._single is not None
        signing_key = config.hs256_secret.encode()
        algorithm = _preferred(verifier._single.algorithms)
    else:
        if config.hs256_secret is not None:
            raise MintError("identity uses an HS256 secret, which mint_token signs with; "
                            "leave out the private key")
        signing_key = _load_private_key(private_key)
        if not hasattr(signing_key, "public_key"):
            raise MintError("the private key type cannot sign JWTs")
        public = signing_key.public_key()
        if config.jwks_url is not None:
            # Offline we cannot see the published keys; sign what the key type allows.
            try:
                match = _public_key(public, "private key", verifier._config_algs, kid=kid)
            except KeySourceError as exc:
                raise MintError(str(exc)) from None
        else:
            keys = [verifier._single] if verifier._single else verifier._all
            fingerprint = _spki(public)
            matches = [k for k in keys if k is not None and not isinstance(k.key, bytes)
                       and _spki(k.key) == fingerprint]
            if kid is not None:
                matches = [k for k in matches if k.kid == kid] or matches
            if not matches:
                where = ("identity.public_key_file" if config.public_key_file
                         else "identity.jwks_file")
                raise MintError(f"the private key matches no key in {where}; the gateway "
                                "would refuse tokens it signs")
            match = matches[0]
        algorithm = _preferred(match.algorithms)
        if match.kid:
            header["kid"] = match.kid

    now = int(time.time())
    claims: dict[str, Any] = {}
    if config.issuer is not None:
        claims["iss"] = config.issuer
    if config.audience is not None:
        claims["aud"] = config.audience
    claims[config.subject_claim] = subject.strip()
    claims[config.groups_claim] = names
    claims.update(iat=now, nbf=now, exp=now + math.ceil(ttl_seconds),
                  jti=secrets.token_hex(16))
    if extra_claims:
        claims.update(extra_claims)
    return jwt.encode(claims, signing_key, algorithm=algorithm, headers=header or None)

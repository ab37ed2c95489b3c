"""Attacks on identity: tokens that expire while something is under way, identity text
that would display as something else, and claims that say two things at once.

A token that expires closes its session with a clear FATAL, and then nothing it started
goes on: not a running statement, not a COPY, not an open transaction, not a statement
waiting for an analyst. Identity text (subject, groups) lands in the audit trail, logs
and the analyst's terminal as is: characters that reorder or hide text are refused.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from hoopops.config import IdentityConfig
from hoopops.devdb import LocalPostgres
from hoopops.identity import AuthError, TokenVerifier, mint_token
from tests.clients.rawpg import RawClient, error_fields, message
from tests.clients.util import admin, poll, wait_active
from tests.conftest import AUDIENCE, ISSUER, JWT_SECRET, RunningGateway

TTL = 3  # seconds: long enough to log in and start something, short enough to wait for

HELD_POLICY = """\
default: allow
rules:
  - id: held-writes
    description: writes to the expiry test's table wait for a human
    when: {tables_written: [public.expiry_held]}
    action: review
"""


def _config(**over: object) -> IdentityConfig:
    values: dict[str, object] = {"issuer": ISSUER, "audience": AUDIENCE,
                                 "hs256_secret": JWT_SECRET}
    values.update(over)
    return IdentityConfig(**values)  # type: ignore[arg-type]


async def _expiring_session(gw: RunningGateway, app: str) -> RawClient:
    raw = await RawClient.open(gw.port)
    reply = await raw.login(gw.token("short-lived", ttl=TTL), extra={"application_name": app})
    assert reply.types().endswith(b"Z"), reply.errors()
    return raw


async def _expiry_fatal(raw: RawClient) -> dict[str, str]:
    """The FATAL the expired session ends with (whatever else arrived before it)."""
    data = await raw.wait_closed_by_peer(TTL + 10)
    at = data.rfind(b"E\x00")
    assert at >= 0, data[-200:]
    fields = error_fields(data[at + 5:])
    assert fields["S"] == "FATAL" and fields["C"] == "28000", fields
    assert "token expired" in fields["M"]
    return fields


async def _backends(pg: LocalPostgres, app: str) -> int:
    conn = await admin(pg)
    try:
        return int(await conn.fetchval(
            "select count(*) from pg_stat_activity where application_name = $1", app))
    finally:
        await conn.close()


async def _no_backend_left(pg: LocalPostgres, app: str, within: float = 5) -> None:
    async def gone() -> bool:
        return await _backends(pg, app) == 0
    await poll(gone, within, what=f"the expired session's backend ({app}) to end")


@pytest.fixture
async def table(pg: LocalPostgres) -> str:
    name = f"expiry_{uuid.uuid4().hex[:8]}"
    conn = await admin(pg)
    try:
        await conn.execute(f"create table {name} (v int); grant all on {name} to public")
    finally:
        await conn.close()
    return name


async def _rows(pg: LocalPostgres, table: str) -> int:
    conn = await admin(pg)
    try:
        return int(await conn.fetchval(f"select count(*) from {table}"))
    finally:
        await conn.close()


# -- a token expiring while something is under way -------------------------------------


async def test_expiry_mid_statement_cancels_it_on_the_server(gateway: RunningGateway,
                                                            pg: LocalPostgres) -> None:
    app = f"expiry-{uuid.uuid4().hex[:8]}"
    raw = await _expiring_session(gateway, app)
    try:
        await raw.send(message(b"Q", b"select pg_sleep(60)\0"))
        await wait_active(pg, "pg_sleep(60)")
        await _expiry_fatal(raw)
        # Closing the socket is not enough: a backend reads it only between statements.
        await _no_backend_left(pg, app)
    finally:
        await raw.close()


async def test_expiry_mid_copy_commits_nothing(gateway: RunningGateway, pg: LocalPostgres,
                                               table: str) -> None:
    app = f"expiry-{uuid.uuid4().hex[:8]}"
    raw = await _expiring_session(gateway, app)
    try:
        await raw.send(message(b"Q", f"copy {table} from stdin\0".encode()))
        assert (await raw.read_message())[0] == b"G"
        await raw.send(message(b"d", b"1\n2\n3\n"))
        await _expiry_fatal(raw)
        await _no_backend_left(pg, app)
        assert await _rows(pg, table) == 0
    finally:
        await raw.close()


async def test_expiry_mid_transaction_rolls_it_back(gateway: RunningGateway,
                                                    pg: LocalPostgres, table: str) -> None:
    app = f"expiry-{uuid.uuid4().hex[:8]}"
    raw = await _expiring_session(gateway, app)
    try:
        await raw.simple("begin")
        reply = await raw.simple(f"insert into {table} values (1)")
        assert not reply.errors(), reply.errors()
        await _expiry_fatal(raw)
        await _no_backend_left(pg, app)
        assert await _rows(pg, table) == 0
    finally:
        await raw.close()


async def test_expiry_while_held_withdraws_the_approval(gateway_factory, pg: LocalPostgres,
                                                       tmp_path: Path) -> None:
    conn = await admin(pg)
    try:
        await conn.execute("create table if not exists expiry_held (v int);"
                           "grant all on expiry_held to public")
    finally:
        await conn.close()
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "held.yaml").write_text(HELD_POLICY)
    gw = await gateway_factory(policies=policies, audit=True)
    broker = gw.gateway.broker  # type: ignore[attr-defined]
    app = f"expiry-{uuid.uuid4().hex[:8]}"
    raw = await _expiring_session(gw, app)
    try:
        await raw.send(message(b"Q", b"insert into expiry_held values (1)\0"))

        async def held() -> bool:
            return bool(broker.pending())
        await poll(held, 5, what="the insert to be held for approval")
        await _expiry_fatal(raw)

        async def withdrawn() -> bool:
            return not broker.pending()
        await poll(withdrawn, 5, what="the held statement's approval to be withdrawn")
        await _no_backend_left(pg, app)
    finally:
        await raw.close()


async def test_far_future_expiry_is_served(gateway: RunningGateway) -> None:
    # exp = 1e308 is a finite number: accepted, and the session's expiry timer copes.
    token = mint_token(gateway.config.identity, "far-future", ["agents"], 600,
                       extra_claims={"exp": 1e308})
    raw = await RawClient.open(gateway.port)
    try:
        reply = await raw.login(token)
        assert reply.types().endswith(b"Z"), reply.errors()
        assert (await raw.simple("select 'on'")).rows() == [["on"]]
    finally:
        await raw.close()


# -- identity text that displays as something else -------------------------------------

DECEPTIVE = {
    "right-to-left override": "agent\u202eevil",
    "zero-width space": "agent-1\u200b",
    "C1 control (8-bit CSI)": "agent\x9b31m",
    "line separator": "agent\u2028forged log line",
    "byte order mark": "\ufeffagent",
}


@pytest.mark.parametrize("case", list(DECEPTIVE))
def test_deceptive_subject_refused(case: str) -> None:
    verifier = TokenVerifier(_config())
    token = _raw_mint({"sub": DECEPTIVE[case]})
    with pytest.raises(AuthError) as info:
        verifier.verify(token)
    assert "subject" in info.value.reason
    assert token not in info.value.reason


@pytest.mark.parametrize("case", list(DECEPTIVE))
def test_deceptive_group_refused(case: str) -> None:
    verifier = TokenVerifier(_config())
    with pytest.raises(AuthError) as info:
        verifier.verify(_raw_mint({"groups": ["agents", DECEPTIVE[case]]}))
    assert "group" in info.value.reason


def test_ordinary_unicode_names_still_accepted() -> None:
    verifier = TokenVerifier(_config())
    identity = verifier.verify(_raw_mint({"sub": "agent-Ø-测试", "groups": ["équipe"]}))
    assert identity.subject == "agent-Ø-测试" and identity.groups == ("équipe",)


# -- claims that say two things at once ------------------------------------------------


def test_literal_dotted_claim_cannot_shadow_the_nested_one() -> None:
    # groups_claim realm_access.roles: a token carrying a literal "realm_access.roles"
    # member as well as the nested path says two different things; refused.
    verifier = TokenVerifier(_config(groups_claim="realm_access.roles"))
    token = _raw_mint({"realm_access": {"roles": ["agents"]},
                       "realm_access.roles": ["admins"]})
    with pytest.raises(AuthError) as info:
        verifier.verify(token)
    assert "realm_access.roles" in info.value.reason
    # Either alone is fine.
    assert verifier.verify(_raw_mint({"realm_access": {"roles": ["agents"]}})).groups == (
        "agents",)
    assert verifier.verify(_raw_mint({"realm_access.roles": ["agents"]})).groups == (
        "agents",)


def _raw_mint(claims: dict[str, object]) -> str:
    """An HS256 token with exactly these claims over the standard ones (pyjwt's encoder
    is bypassed: it refuses some shapes an attacker is free to send)."""
    import base64
    import hashlib
    import hmac
    import json

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    now = int(time.time())
    body: dict[str, object] = {"iss": ISSUER, "aud": AUDIENCE, "sub": "agent-x",
                               "groups": ["agents"], "iat": now, "exp": now + 600}
    body.update(claims)
    signing_input = (b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + "."
                     + b64(json.dumps(body).encode()))
    signature = hmac.new(JWT_SECRET.encode(), signing_input.encode(), hashlib.sha256)
    return signing_input + "." + b64(signature.digest())



# -- nothing secret in error texts and logs --------------------------------------------


async def test_no_token_or_service_password_in_errors_or_logs(
        pg: LocalPostgres, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from tests.clients.gw import GatewayPool

    wrong = "Wr0ngServicePassw0rd"
    pool = GatewayPool(tmp_path)
    caplog.set_level(logging.DEBUG)
    gw = await pool.start({
        "appdb": pg.dsn(),
        "badpass": pg.dsn(password=wrong),
        "down": f"postgresql://hoopops_svc:{wrong}@127.0.0.1:1/app",
    })
    try:
        now = int(time.time())
        tokens = [
            gw.token(),  # valid
            _raw_mint({"exp": now - 10}),
            _raw_mint({"aud": "someone-else"}),
            _raw_mint({"sub": "agent\u202eevil"}),
            gw.token()[:-4] + "AAAA",  # bad signature
            gw.token() + " trailing-garbage",
            "x" * 40_000,
        ]
        answers: list[str] = []
        for token in tokens:
            for database in ("appdb", "badpass", "down"):
                raw = await RawClient.open(gw.port)
                try:
                    reply = await raw.login(token, database=database)
                    answers += [e.get("M", "") + e.get("D", "") for e in reply.errors()]
                finally:
                    await raw.close()
        assert any("token" in a for a in answers) and any("'badpass'" in a for a in answers)
        secrets_ = [pg.service_password, wrong] + [t for t in tokens if len(t) < 40_000]
        secrets_ += [t.split(".")[-1] for t in tokens if t.count(".") == 2]  # signatures
        logged = [r.getMessage() + (r.exc_text or "") for r in caplog.records]
        for secret in secrets_:
            assert not any(secret in a for a in answers), secret
            assert not any(secret in line for line in logged), secret
    finally:
        await pool.close()


# -- signatures of the wrong shape -------------------------------------------------------


@pytest.mark.parametrize("alg", ["ES256", "EdDSA"])
def test_malformed_signatures_are_bad_signatures(tmp_path: Path, alg: str) -> None:
    import base64

    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey = (
        ec.generate_private_key(ec.SECP256R1()) if alg == "ES256"
        else ed25519.Ed25519PrivateKey.generate())
    pem = tmp_path / "pub.pem"
    pem.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    verifier = TokenVerifier(_config(hs256_secret=None, public_key_file=pem))
    token = jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": "agent",
                        "exp": int(time.time()) + 60}, key, algorithm=alg)
    head = token.rsplit(".", 1)[0]

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    for signature in ("", b64(b"\0" * 10), b64(b"\0" * 64), b64(b"\xff" * 20_000),
                      b64(bytes.fromhex("3006020101020101")), b64(b"\xff" * 64)):
        with pytest.raises(AuthError) as info:
            verifier.verify(f"{head}.{signature}")
        assert info.value.reason == "bad signature"
    # The same key's family only: an HS256 token is not checked against it at all.
    with pytest.raises(AuthError, match="HS256 not accepted"):
        verifier.verify(jwt.encode({"sub": "agent"}, "x" * 32, algorithm="HS256"))

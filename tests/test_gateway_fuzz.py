"""A seeded, structured fuzzer of the post-authentication protocol.

Each iteration logs in on a raw socket and sends a random sequence of client messages:
valid ones (simple and extended query, COPY, transactions, errors, policy blocks and
holds) mixed with corrupted ones (wrong counts, negative lengths, missing terminators,
unknown Describe/Close kinds, CopyData outside COPY, FunctionCall, unknown types, Parse
with thousands of parameter types, pipelines of 10k messages without Sync, Sync
storms, refusal text that echoes the gateway's dollar tag), cut into reads at random
byte boundaries (every one, sometimes), with pauses that let the server answer part of a
pipeline before the rest arrives. Both a plain relay and a gateway that audits, masks,
blocks and holds (approvals time out at once) are attacked. After each iteration:

1. the attacked connection answers a probe or is closed: never a hang (bounded time);
2. it never got an internal error (XX000), and the gateway logged no unexpected error;
3. an honest session on the same gateway, running all along, got every answer right
   (and, where a column is masked, never the raw value);
4. once the probe is answered, the gateway awaits no reply for that session (its
   expectation queue matches the server's state).

At the end no upstream backend is left behind. The seed and the iteration count are
fixed so a failure replays (its bytes are kept in the test's tmp folder);
``HOOPOPS_FUZZ_ITERATIONS`` and ``HOOPOPS_FUZZ_SEED`` run it longer or differently, e.g.
``HOOPOPS_FUZZ_ITERATIONS=2000 HOOPOPS_FUZZ_SEED=7 pytest tests/test_gateway_fuzz.py``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest

from hoopops.devdb import LocalPostgres
from tests.clients.rawpg import RawClient, error_fields, message
from tests.clients.util import admin, poll
from tests.conftest import RunningGateway

SEED = int(os.environ.get("HOOPOPS_FUZZ_SEED", "20261130"))
ITERATIONS = int(os.environ.get("HOOPOPS_FUZZ_ITERATIONS", "40"))
RAW_SECRET = "987-65-4321"
# The attacking sessions' name, which the gateway passes upstream: their backends are
# told apart by it on a server other tests share.
APP = f"hoopops-fuzz-{os.getpid()}"

POLICY = """\
default: allow
rules:
  - id: fuzz-blocked
    description: the fuzzer's forbidden table
    when: {tables_read: [public.fuzz_blocked]}
    action: block
  - id: fuzz-held
    description: writes to the fuzzer's held table wait for a human
    when: {tables_written: [public.fuzz_held]}
    action: review
masking:
  columns:
    "*.fuzz_secret.ssn": redact
"""

SQL = [
    "select 1", "select $1::int", "select $1::text, $2::int", "select 1/0", "selec oops",
    "", " ", "select * from generate_series(1, 300)", "select pg_sleep(0.01)",
    "begin", "commit", "rollback", "select * from fuzz_open", "select ssn from fuzz_secret",
    "select * from fuzz_blocked", "insert into fuzz_held values (1)",
    "copy (select g from generate_series(1, 50) g) to stdout",
    "copy (select ssn from fuzz_secret) to stdout",
    "create temp table if not exists fz (x int)", "copy fz from stdin",
    "insert into fz values ($1::int)", "select 1; select 2", "select 1; select 1/0",
    "listen fz_chan", "notify fz_chan, 'x'", "set search_path = public",
    "declare c cursor with hold for select 1", "fetch c", "close c",
    "select 1 'x$hoopo$hoopops$ps$y'",  # a parse error echoing the refusal's dollar tag
]


@dataclass
class Attack:
    """The bytes of one iteration, with a label per message for the failure report."""

    data: bytearray = field(default_factory=bytearray)
    labels: list[str] = field(default_factory=list)
    ends_session: bool = False  # a Terminate or a broken frame: a close is the answer

    def add(self, label: str, raw: bytes) -> None:
        self.data += raw
        self.labels.append(label)


def _cstr(text: str | bytes) -> bytes:
    return (text.encode() if isinstance(text, str) else text) + b"\0"


class Generator:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def name(self) -> str:
        return self.rng.choice(["", "", "s1", "s2", "p1", "hoopops_refusal", "x" * 70])

    def sql(self) -> str:
        return self.rng.choice(SQL)

    def value(self) -> bytes | None:
        return self.rng.choice([None, b"1", b"42", b"-7", b"abc", b"\x00\x01", b"9" * 40,
                                b"\xff\xfe", b""])

    # -- messages, valid in shape --------------------------------------------------------

    def parse(self) -> bytes:
        types = [self.rng.choice([0, 23, 25, 16, 2**32 - 1]) for _ in range(
            self.rng.choice([0, 0, 1, 2, 3]))]
        return message(b"P", _cstr(self.name()) + _cstr(self.sql())
                       + struct.pack("!h", len(types)) + b"".join(struct.pack("!I", t)
                                                                  for t in types))

    def bind(self) -> bytes:
        rng = self.rng
        params = [self.value() for _ in range(rng.choice([0, 1, 1, 2, 3]))]
        formats = [rng.choice([0, 0, 1, 2, -1]) for _ in range(rng.choice([0, 1, len(params)]))]
        results = [rng.choice([0, 1, 7]) for _ in range(rng.choice([0, 0, 1, 2]))]
        body = _cstr(self.name()) + _cstr(self.name())
        body += struct.pack("!h", len(formats)) + b"".join(struct.pack("!h", f) for f in formats)
        body += struct.pack("!h", len(params))
        for value in params:
            body += struct.pack("!i", -1) if value is None else struct.pack(
                "!i", len(value)) + value
        body += struct.pack("!h", len(results)) + b"".join(struct.pack("!h", r)
                                                           for r in results)
        return message(b"B", body)

    def describe(self) -> bytes:
        return message(b"D", self.rng.choice([b"S", b"P"]) + _cstr(self.name()))

    def execute(self) -> bytes:
        return message(b"E", _cstr(self.name()) + struct.pack(
            "!i", self.rng.choice([0, 0, 0, 1, 5, -1])))

    def close(self) -> bytes:
        return message(b"C", self.rng.choice([b"S", b"P"]) + _cstr(self.name()))

    def query(self) -> bytes:
        return message(b"Q", _cstr(self.sql()))

    def copy_data(self) -> bytes:
        return message(b"d", self.rng.choice([b"1\n", b"2\n3\n", b"x\n", b"", b"\\.\n"]))

    def function_call(self) -> bytes:
        return message(b"F", struct.pack("!Ihh", 1397, 1, 0) + struct.pack("!hi", 1, 2)
                       + b"-5" + struct.pack("!h", 0))

    # -- hostile shapes ------------------------------------------------------------------

    def hostile(self) -> tuple[str, bytes]:
        rng = self.rng
        choice = rng.randrange(16)
        if choice == 0:
            return "describe unknown kind", message(b"D", b"Z" + _cstr("s1"))
        if choice == 1:
            return "close unknown kind", message(b"C", b"\0")
        if choice == 2:
            count = rng.choice([5000, 32767])
            return "parse many types", message(b"P", b"\0select 1\0" + struct.pack(
                "!h", count) + b"\0\0\0\x17" * count)
        if choice == 3:
            return "parse negative type count", message(b"P", b"\0select 1\0\xff\xff")
        if choice == 4:
            return "bind negative length", message(b"B", b"\0\0\0\0\0\1" + struct.pack(
                "!i", -5) + b"\0\0")
        if choice == 5:
            return "bind count mismatch", message(b"B", b"\0\0\0\0\0\3" + struct.pack(
                "!i", 1) + b"1\0\0")
        if choice == 6:
            return "bind formats longer than params", message(
                b"B", b"\0\0\0\5" + b"\0\1" * 5 + b"\0\1" + struct.pack("!i", 1) + b"1\0\0")
        if choice == 7:
            return "bind huge length", message(b"B", b"\0\0\0\0\0\1" + struct.pack(
                "!i", 0x7FFFFFF0) + b"\0\0")
        if choice == 8:
            return "execute missing terminator", message(b"E", b"portal")
        if choice == 9:
            return "query missing terminator", message(b"Q", b"select 1")
        if choice == 10:
            return "copy done/fail out of copy", rng.choice(
                [message(b"c"), message(b"f", b"nope\0"), message(b"f", b"")])
        if choice == 11:
            return "sync storm", message(b"S") * rng.choice([10, 200])
        if choice == 12:
            return "flush with payload", message(b"H", b"junk")
        if choice == 13:
            return "sync with payload", message(b"S", b"junk")
        if choice == 14:
            # Up to 10k messages without a Sync (of a cheap statement: the server runs it).
            one = message(b"P", b"\0select 1\0\0\0") + message(b"B", b"\0\0" + b"\0" * 6) \
                + message(b"E", b"\0\0\0\0\0")
            count = rng.choice([50, 3334])
            return f"pipeline of {count * 3} messages without sync", one * count
        return "truncated payload", self.truncated()

    def coherent(self) -> tuple[str, bytes]:
        """A well-formed exchange whose names match (so the relay's fast paths and
        caches see what real drivers send), sometimes with one message corrupted."""
        rng = self.rng
        name = rng.choice(["", "", "c1"])
        portal = rng.choice(["", "", "cp"])
        sql, params = rng.choice([
            ("select $1::int", [b"5"]), ("select * from fuzz_open where id < $1::int", [b"9"]),
            ("select ssn from fuzz_secret", []), ("insert into fuzz_held values (1)", []),
            ("copy fz from stdin", []), ("select * from fuzz_blocked", []),
            ("select g from generate_series(1, 400) g", []), ("begin", []), ("commit", []),
        ])
        parts = [message(b"P", _cstr(name) + _cstr(sql) + b"\0\0")]
        bind = _cstr(portal) + _cstr(name) + b"\0\0" + struct.pack("!h", len(params))
        bind += b"".join(struct.pack("!i", len(v)) + v for v in params)
        parts.append(message(b"B", bind + rng.choice([b"\0\0", b"\0\1\0\1"])))
        if rng.random() < 0.5:
            parts.append(message(b"D", b"P" + _cstr(portal)))
        rows = rng.choice([0, 0, 2])
        parts.append(message(b"E", _cstr(portal) + struct.pack("!i", rows)))
        if rows:
            parts.append(message(b"E", _cstr(portal) + struct.pack("!i", rows)))
        if sql.startswith("copy"):
            parts += [message(b"d", b"1\n2\n"), rng.choice([message(b"c"),
                                                           message(b"f", b"stop\0")])]
        if rng.random() < 0.8:
            parts.append(message(b"S"))
        if rng.random() < 0.1:
            at = rng.randrange(len(parts))
            parts[at] = self.corrupt(parts[at])
        return f"coherent {sql!r}", b"".join(parts)

    def truncated(self) -> bytes:
        """A message whose payload lost its tail, framed with the shorter length."""
        raw = self.rng.choice([self.parse, self.bind, self.describe, self.execute,
                               self.close, self.query])()
        cut = self.rng.randrange(5, len(raw)) if len(raw) > 5 else 5
        return raw[:1] + struct.pack("!I", cut - 1) + raw[5:cut]

    def corrupt(self, raw: bytes) -> bytes:
        """Flip, drop or append payload bytes, keeping the frame's length consistent."""
        rng = self.rng
        body = bytearray(raw[5:])
        how = rng.randrange(3)
        if how == 0 and body:
            for _ in range(rng.randint(1, 3)):
                body[rng.randrange(len(body))] = rng.randrange(256)
        elif how == 1 and body:
            del body[rng.randrange(len(body)):]
        else:
            body += bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        return raw[:1] + struct.pack("!I", len(body) + 4) + bytes(body)

    def attack(self) -> Attack:
        rng = self.rng
        attack = Attack()
        makers: list[tuple[str, Callable[[], bytes]]] = [
            ("parse", self.parse), ("bind", self.bind), ("describe", self.describe),
            ("execute", self.execute), ("close", self.close), ("query", self.query),
            ("copydata", self.copy_data), ("function call", self.function_call),
            ("sync", lambda: message(b"S")), ("flush", lambda: message(b"H")),
        ]
        for _ in range(rng.randint(1, 14)):
            roll = rng.random()
            if roll < 0.12:
                attack.add(*self.hostile())
            elif roll < 0.3:
                attack.add(*self.coherent())
            elif roll < 0.22:
                label, make = rng.choice(makers)
                attack.add(f"corrupted {label}", self.corrupt(make()))
            else:
                label, make = rng.choice(makers)
                attack.add(label, make())
        roll = rng.random()
        if roll < 0.03:
            attack.add("unknown type", message(rng.choice([b"z", b"\x00", b"p", b"A"]), b"x"))
        elif roll < 0.06:
            attack.add("terminate", message(b"X"))
            attack.ends_session = True
        elif roll < 0.09:
            attack.add("bad length", b"Q" + struct.pack("!I", rng.choice([0, 3, 2**31 + 5])))
            attack.ends_session = True
        return attack

    def chunks(self, data: bytes) -> list[bytes]:
        rng = self.rng
        how = rng.random()
        if how < 0.5:
            return [data]
        if how < 0.6 and len(data) < 400:
            return [data[i:i + 1] for i in range(len(data))]  # every byte boundary
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 6))))
        return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


# -- the honest neighbour --------------------------------------------------------------


async def honest_session(gw: RunningGateway, policed: bool, stop: asyncio.Event,
                         failures: list[str]) -> int:
    """Queries with known answers, over and over, until ``stop``; returns how many ran."""
    conn = await asyncpg.connect(gw.dsn(gw.token("honest-neighbour")))
    done = 0
    try:
        while not stop.is_set():
            n = done * 7 + 3
            got = await asyncio.wait_for(conn.fetchval("select $1::int * 2", n), 10)
            if got != n * 2:
                failures.append(f"honest session: select {n}*2 gave {got!r}")
            rows = await asyncio.wait_for(conn.fetch("select id from fuzz_open order by id"), 10)
            if [r["id"] for r in rows] != list(range(1, 21)):
                failures.append(f"honest session: fuzz_open gave {rows!r}")
            if policed:
                ssn = await asyncio.wait_for(conn.fetchval("select ssn from fuzz_secret"), 10)
                if ssn == RAW_SECRET:
                    failures.append("honest session: the masked column came back raw")
            done += 1
            await asyncio.sleep(0.01)
    except Exception as exc:  # (any failure is the finding)
        failures.append(f"honest session failed: {type(exc).__name__}: {exc}")
    finally:
        await conn.close()
    return done


# -- one iteration -----------------------------------------------------------------------


async def probe(raw: RawClient, tag: str, within: float) -> str:
    """Sync, then a query with a known answer: 'answered', 'closed', or AssertionError
    when neither happens in time (a hang). Replies still streaming in (a 10k-message
    pipeline's) count as progress; only a quiet second has the probe sent again."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    # (a rollback first: the attack may have left a failed transaction open)
    ask = message(b"S") + message(b"Q", b"rollback\0") + message(
        b"Q", _cstr(f"select '{tag}'"))
    sent = 1
    seen = False  # the tag's row arrived; its ReadyForQuery ends the probe
    try:
        await raw.send(ask)
        while loop.time() < deadline:
            try:
                mtype, payload = await raw.read_message(
                    max(0.05, min(1.0, deadline - loop.time())))
            except TimeoutError:
                if sent < 4:
                    # Swallowed (a COPY FROM STDIN fails on it, say): asked again.
                    await raw.send(ask)
                    sent += 1
                continue
            if mtype == b"E":
                error = error_fields(payload)
                # (the server's own XX000s name its source file: 'cache lookup failed'
                # for a made-up type OID is PostgreSQL's answer, not the gateway's)
                if error.get("C") == "XX000" and "F" not in error:
                    raise AssertionError(f"internal error reached the client: {error}")
            elif mtype == b"D" and tag.encode() in payload:
                seen = True
            elif mtype == b"Z" and seen:
                return "answered"
    except (ConnectionError, asyncio.IncompleteReadError):
        return "closed"
    raise AssertionError(f"no answer and no close within {within}s (a hang)")


async def attack_once(gw: RunningGateway, gen: Generator, attack: Attack, index: int,
                      keep: Path) -> str:
    raw = await RawClient.open(gw.port)
    try:
        subject = f"fuzz-{index}"
        reply = await raw.login(gw.token(subject), extra={"application_name": APP})
        assert reply.types().endswith(b"Z"), reply.errors()
        try:
            for chunk in gen.chunks(bytes(attack.data)):
                await raw.send(chunk)
                if gen.rng.random() < 0.3:
                    # Let the server answer part of it first (errors arriving mid-stream).
                    await asyncio.sleep(gen.rng.choice([0.001, 0.02]))
        except ConnectionError:
            return "closed"
        if attack.ends_session:
            data = await raw.wait_closed_by_peer(10)
            assert b"the gateway hit an internal error" not in data, data[-200:]
            return "closed"
        outcome = await probe(raw, f"alive-{index}", 30)
        if outcome == "answered":
            # Whatever repeated probes are still answering arrives before this answer.
            assert await probe(raw, f"final-{index}", 30) == "answered"
            # Idle, the session awaits no reply: a stale expectation would pin later
            # replies on the wrong statements (masking, audit).
            stale = [pending.kind for session in gw.gateway.sessions.values()  # type: ignore[attr-defined]
                     if session.info.identity.subject == subject
                     for pending in session.pending]
            assert not stale, f"idle session still awaits replies to request kinds {stale}"
        return outcome
    except AssertionError as exc:
        kept = keep / f"attack-{SEED}-{index}.bin"  # the bytes, to replay the failure
        kept.write_bytes(bytes(attack.data))
        raise AssertionError(f"iteration {index} (seed {SEED}): {exc}\n  sent: "
                             f"{attack.labels}\n  bytes: {kept}") from None
    finally:
        await raw.close()


# -- the test ----------------------------------------------------------------------------


@pytest.fixture
async def fuzz_tables(pg: LocalPostgres) -> AsyncIterator[None]:
    conn = await admin(pg)
    try:
        await conn.execute(
            "create table if not exists fuzz_open (id int);"
            "create table if not exists fuzz_secret (ssn text);"
            "create table if not exists fuzz_blocked (id int);"
            "create table if not exists fuzz_held (id int);"
            "truncate fuzz_open, fuzz_secret, fuzz_blocked, fuzz_held;"
            "insert into fuzz_open select generate_series(1, 20);"
            f"insert into fuzz_secret values ('{RAW_SECRET}');"
            "grant all on fuzz_open, fuzz_secret, fuzz_blocked, fuzz_held to public")
        yield
    finally:
        await conn.close()


# relay: nothing inspected (the pass-through fast paths); audited: statements recorded,
# nothing masked (the fast paths that carry runs); policed: audit, masking, blocks and
# holds (the general path).
@pytest.mark.parametrize("mode", ["relay", "audited", "policed"])
async def test_fuzzed_sessions_never_crash_hang_or_disturb_others(
        gateway_factory, pg: LocalPostgres, tmp_path: Path, fuzz_tables: None,
        caplog: pytest.LogCaptureFixture, mode: str) -> None:
    policed = mode == "policed"
    policies = None
    extra = "limits:\n  max_message_size: 1MiB\n"
    if mode != "relay":
        policies = tmp_path / "policies"
        policies.mkdir()
        (policies / "fuzz.yaml").write_text(POLICY if policed else "default: allow\n")
        extra += "approvals:\n  timeout: 0.3s\n"
    gw = await gateway_factory(extra, policies=policies, audit=mode != "relay")
    caplog.set_level(logging.WARNING, logger="hoopops")
    stop = asyncio.Event()
    failures: list[str] = []
    neighbour = asyncio.create_task(honest_session(gw, policed, stop, failures))
    rng = random.Random(f"{SEED}-{mode}")
    outcomes: dict[str, int] = {}
    try:
        for index in range(ITERATIONS):
            gen = Generator(rng)
            attack = gen.attack()
            outcome = await attack_once(gw, gen, attack, index, tmp_path)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            assert not failures, failures
            unexpected = [r for r in caplog.records if r.levelno >= logging.ERROR]
            assert not unexpected, (f"iteration {index} (seed {SEED}): the gateway logged "
                                    f"{unexpected[0].getMessage()} {unexpected[0].exc_text}"
                                    f"\n  sent: {attack.labels}")
    finally:
        stop.set()
        ran = await neighbour
    assert not failures, failures
    assert ran > 0
    assert outcomes.get("answered", 0) > ITERATIONS // 4, outcomes  # not all just refused

    async def released() -> bool:
        conn = await admin(pg)
        try:
            return not await conn.fetchval(
                "select count(*) from pg_stat_activity where application_name = $1", APP)
        finally:
            await conn.close()
    await poll(released, 10, what="every fuzzed session's upstream backend to close")


def test_error_fields_helper_reads_what_the_gateway_writes() -> None:
    # The probe reads SQLSTATEs with this helper: a broken one would hide XX000.
    from hoopops.proxy import protocol as p
    assert error_fields(p.error_response("XX000", "m")[5:])["C"] == "XX000"

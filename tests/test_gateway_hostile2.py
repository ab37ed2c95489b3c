"""Hostile and unusual clients, second round: cases the first round did not cover.

Each test names the class of input it stands for. Every one checks what the offending
client gets (a clear error or a close, never an internal error or a hang) and that the
gateway keeps serving.
"""

from __future__ import annotations

import asyncio
import struct
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hoopops.devdb import LocalPostgres
from tests.clients.gw import logged_in, serves
from tests.clients.rawpg import RawClient, message
from tests.clients.util import admin, poll, wait_active
from tests.conftest import RunningGateway

FUZZ_POLICY = """\
default: allow
masking:
  columns:
    "*.nothing_here.secret": redact
"""


def cstr(text: str) -> bytes:
    return text.encode() + b"\0"


def parse(sql: str, name: str = "") -> bytes:
    return message(b"P", cstr(name) + cstr(sql) + b"\0\0")


def bind(portal: str = "", statement: str = "") -> bytes:
    return message(b"B", cstr(portal) + cstr(statement) + b"\0\0\0\0\0\0")


def execute(portal: str = "") -> bytes:
    return message(b"E", cstr(portal) + b"\0\0\0\0")


SYNC = message(b"S")
FLUSH = message(b"H")
FUNCTION_CALL = message(b"F", struct.pack("!Ihh", 1397, 1, 0) + struct.pack("!hi", 1, 2)
                        + b"-5" + struct.pack("!h", 0))


@pytest.fixture(params=["relay", "policed"])
async def gw(request: pytest.FixtureRequest, gateway_factory, tmp_path: Path
             ) -> AsyncIterator[RunningGateway]:
    """A plain relay, and a gateway that audits and masks (the relay's other paths)."""
    if request.param == "relay":
        gateway = await gateway_factory()
    else:
        policies = tmp_path / "policies"
        policies.mkdir()
        (policies / "p.yaml").write_text(FUZZ_POLICY)
        gateway = await gateway_factory(policies=policies, audit=True)
    yield gateway
    await serves(gateway)


def expectations(gw: RunningGateway) -> list[int]:
    """What the gateway's sessions still await from the server (by request kind)."""
    sessions = gw.gateway.sessions.values()  # type: ignore[attr-defined]
    return [pending.kind for session in sessions for pending in session.pending]


async def in_step(gw: RunningGateway, raw: RawClient) -> None:
    """The session still answers exactly what it is asked, twice over, and, idle, the
    gateway awaits no reply (a stale expectation would pin the next reply on the wrong
    request: masking and audit then judge a statement by another's result)."""
    for n in (7, 8):
        reply = await raw.simple(f"select {n}")
        assert reply.rows() == [[str(n)]], (reply.types(), reply.errors())
        assert reply.messages[-1] == (b"Z", b"I")
    assert expectations(gw) == []


# -- the server skips to Sync after an extended-protocol error ---------------------------
# Requests that reach the server after such an error, up to the next Sync, get no reply
# at all, whenever the client sent them: the gateway must not wait for replies to them.


async def test_requests_sent_after_a_pipeline_error_are_skipped(gw: RunningGateway) -> None:
    raw = await logged_in(gw)
    try:
        # The error is read (Flush) before the rest of the pipeline is sent, as libpq's
        # pipeline mode and drivers that stream a batch do.
        await raw.send(parse("select 1/0") + bind() + execute() + FLUSH)
        reply = await raw.read_until(b"E")
        assert reply.errors()[0]["C"] == "22012"
        await raw.send(parse("select 1") + bind() + execute() + FUNCTION_CALL
                       + message(b"Q", b"select 'skipped'\0") + SYNC)
        reply = await raw.read_until(b"Z")
        assert reply.types() == b"Z", reply.messages
        await in_step(gw, raw)
    finally:
        await raw.close()


async def test_error_before_a_later_sync_group(gw: RunningGateway) -> None:
    raw = await logged_in(gw)
    try:
        # Two reads: a request run without a Sync, then a whole Bind/Execute/Sync group.
        await raw.send(parse("select 1/0") + bind() + execute())
        await asyncio.sleep(0.2)
        await raw.send(bind() + execute() + SYNC)
        reply = await raw.read_until(b"Z")
        assert [e["C"] for e in reply.errors()] == ["22012"], reply.messages
        await in_step(gw, raw)
    finally:
        await raw.close()


async def test_function_call_behind_a_failing_execute(gw: RunningGateway) -> None:
    raw = await logged_in(gw)
    try:
        # The FunctionCall's refusal goes to the server as a query, which the server
        # skips (it is still skipping to Sync): what the client gets is the server's.
        await raw.send(parse("select 1/0") + bind() + execute() + FUNCTION_CALL
                       + message(b"Q", b"select 1\0") + bind("", "s1") + SYNC)
        reply = await raw.read_until(b"Z")
        assert [e["C"] for e in reply.errors()] == ["22012"], reply.messages
        await in_step(gw, raw)
    finally:
        await raw.close()


# -- messages whose shape the server would refuse ---------------------------------------
# The server answers a malformed Flush with an error and then skips to Sync, which the
# gateway cannot foresee: it refuses every message shape the server would, before
# forwarding it.


@pytest.mark.parametrize(("name", "data"), [
    ("Flush", message(b"H", b"junk")),
    ("Sync", message(b"S", b"\0")),
    ("CopyDone", message(b"c", b"x")),
    ("CopyFail", message(b"f", b"no terminator")),
    ("CopyFail", message(b"f", b"two\0strings\0")),
], ids=["flush", "sync", "copydone", "copyfail-unterminated", "copyfail-two-strings"])
async def test_malformed_payloadless_messages_are_refused(gw: RunningGateway, name: str,
                                                          data: bytes) -> None:
    raw = await logged_in(gw)
    try:
        await raw.send(message(b"Q", b"select 1\0") + data + message(b"Q", b"select 2\0")
                       + SYNC)
        rest = await raw.wait_closed_by_peer(10)
        fatal = [e for t, e in _messages(rest) if t == b"E"]
        assert fatal and fatal[-1]["S"] == "FATAL", rest
        assert fatal[-1]["C"] == "08P01" and name in fatal[-1]["M"], fatal
    finally:
        await raw.close()


async def test_copy_messages_outside_copy_are_ignored(gw: RunningGateway) -> None:
    raw = await logged_in(gw)
    try:
        # As the server does ("Accept but ignore these messages, per protocol spec").
        await raw.send(message(b"d", b"1\n") + message(b"c") + message(b"f", b"stop\0")
                       + FLUSH + message(b"Q", b"select $1::int\0"))
        reply = await raw.read_until(b"Z")
        assert reply.errors()[0]["C"] == "42P02"
        await in_step(gw, raw)
    finally:
        await raw.close()


def _messages(data: bytes) -> list[tuple[bytes, dict[str, str]]]:
    from tests.clients.rawpg import error_fields

    out, pos = [], 0
    while pos + 5 <= len(data):
        (length,) = struct.unpack_from("!I", data, pos + 1)
        if data[pos:pos + 1] == b"E":
            out.append((b"E", error_fields(data[pos + 5:pos + 1 + length])))
        pos += 1 + length
    return out


# -- startup text the gateway cannot read exactly -----------------------------------------


def _startup(pairs: list[tuple[bytes, bytes]]) -> bytes:
    body = struct.pack("!I", 196608) + b"".join(k + b"\0" + v + b"\0" for k, v in pairs) + b"\0"
    return struct.pack("!I", len(body) + 4) + body


@pytest.mark.parametrize("pairs", [
    [(b"user", b"agent\xff"), (b"database", b"appdb")],
    [(b"user", b"agent"), (b"database", b"appdb"), (b"application_name", b"app\xfe")],
    [(b"user", b"agent"), (b"database", b"app\xc3")],
    [(b"us\xe9r", b"agent"), (b"database", b"appdb")],
], ids=["user", "application_name", "database", "parameter name"])
async def test_startup_text_must_be_utf8(gw: RunningGateway,
                                         pairs: list[tuple[bytes, bytes]]) -> None:
    # Startup parameters land in the audit trail, events and the console: bytes that are
    # not UTF-8 are refused at the door (they once failed the audit write of the session
    # start, and the session then hung).
    raw = await RawClient.open(gw.port)
    try:
        await raw.send(_startup(pairs))
        fatal = [e for t, e in _messages(await raw.wait_closed_by_peer(5)) if t == b"E"]
        assert fatal and fatal[0]["S"] == "FATAL", fatal
        assert fatal[0]["C"] == "08P01" and "UTF-8" in fatal[0]["M"], fatal
    finally:
        await raw.close()


async def test_session_refused_by_the_audit_trail_is_closed(gateway_factory,
                                                            tmp_path: Path) -> None:
    # A session the gate closes before it ever ran (the audit trail cannot record its
    # start) must end: its client gets the FATAL *and* a closed socket, not a hang.
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "p.yaml").write_text(FUZZ_POLICY)
    gw = await gateway_factory(policies=policies, audit=True)
    await gw.gateway.store.close()  # type: ignore[attr-defined]
    raw = await RawClient.open(gw.port)
    try:
        await raw.login(gw.token())
        rest = await raw.wait_closed_by_peer(5)
        fatal = [e for t, e in _messages(rest) if t == b"E"]
        assert fatal and fatal[-1]["S"] == "FATAL", fatal
        assert fatal[-1]["C"] == "57P01" and "audit trail" in fatal[-1]["M"], fatal
        assert gw.gateway.sessions == {}  # type: ignore[attr-defined]
    finally:
        await raw.close()


# -- client text inside the gateway's own refusals -----------------------------------------
# A refusal is raised by the server from a DO block the gateway writes, with the message
# inside a dollar-quoted body. Messages can carry client text (the parser's "at or near"
# echoes the statement): text that forms the closing dollar tag once the gateway strips
# it must neither end the body early nor hide the refusal.

BREAKOUT = "x$hoopo$hoopops$ps$y"


@pytest.fixture
async def policed(gateway_factory, tmp_path: Path) -> RunningGateway:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "p.yaml").write_text(FUZZ_POLICY)
    return await gateway_factory(policies=policies, audit=True)


async def test_refusal_text_cannot_end_the_do_block_simple(policed: RunningGateway) -> None:
    raw = await logged_in(policed)
    try:
        await raw.simple("begin")  # in a transaction the server raises the refusal
        reply = await raw.simple(f"select 1 '{BREAKOUT}'")
        (error,) = reply.errors()
        assert error["C"] == "42501", error
        assert BREAKOUT in error["M"], error
        assert reply.messages[-1] == (b"Z", b"E")
        await raw.simple("rollback")
        await in_step(policed, raw)
    finally:
        await raw.close()


async def test_refusal_text_cannot_end_the_do_block_extended(policed: RunningGateway) -> None:
    raw = await logged_in(policed)
    try:
        await raw.send(parse(f"select 1 '{BREAKOUT}'") + bind() + execute() + SYNC)
        reply = await raw.read_until(b"Z")
        errors = reply.errors()
        assert [e["C"] for e in errors] == ["42501"], reply.messages
        assert BREAKOUT in errors[0]["M"]
        await in_step(policed, raw)
    finally:
        await raw.close()


# -- nothing a closed session started goes on running ------------------------------------


async def test_protocol_error_mid_statement_cancels_it(gateway: RunningGateway,
                                                       pg: LocalPostgres) -> None:
    # The gateway closes a client that breaks the protocol; the statement it was running
    # must not run on, unseen, for its full length (a backend reads its socket only
    # between statements).
    app = f"hostile-{uuid.uuid4().hex[:8]}"
    raw = await RawClient.open(gateway.port)
    try:
        reply = await raw.login(gateway.token(), extra={"application_name": app})
        assert reply.types().endswith(b"Z"), reply.errors()
        await raw.send(message(b"Q", b"select pg_sleep(60)\0"))
        await wait_active(pg, "pg_sleep(60)")
        await raw.send(message(b"z", b"garbage"))
        fatal = [e for t, e in _messages(await raw.wait_closed_by_peer(10)) if t == b"E"]
        assert fatal[-1]["S"] == "FATAL" and fatal[-1]["C"] == "08P01", fatal
    finally:
        await raw.close()

    async def gone() -> bool:
        conn = await admin(pg)
        try:
            return not await conn.fetchval(
                "select count(*) from pg_stat_activity where application_name = $1", app)
        finally:
            await conn.close()
    await poll(gone, 5, what="the closed session's backend to end")


# -- startup shapes the first round did not try --------------------------------------------


def _negotiation(code: int) -> bytes:
    return struct.pack("!II", 8, code)


async def test_encryption_requests_then_startup(gw: RunningGateway) -> None:
    # No TLS configured: each request is answered 'N' and the plaintext startup proceeds.
    for first, second in ((80877103, 80877103), (80877104, 80877103)):
        raw = await RawClient.open(gw.port)
        try:
            await raw.send(_negotiation(first))
            assert await raw.read_byte() == b"N"
            await raw.send(_negotiation(second))
            assert await raw.read_byte() == b"N"
            assert (await raw.login(gw.token())).types().endswith(b"Z")
        finally:
            await raw.close()
    raw = await RawClient.open(gw.port)
    try:
        for _ in range(2):
            await raw.send(_negotiation(80877103))
            assert await raw.read_byte() == b"N"
        await raw.send(_negotiation(80877104))
        fatal = [e for t, e in _messages(await raw.wait_closed_by_peer(5)) if t == b"E"]
        assert fatal[0]["C"] == "08P01" and "encryption requests" in fatal[0]["M"]
    finally:
        await raw.close()


async def test_password_before_being_asked_and_its_shapes(gw: RunningGateway) -> None:
    startup = _startup([(b"user", b"agent"), (b"database", b"appdb")])
    token = gw.token().encode()
    cases = {
        b"\0": "Z",  # sent before being asked (pipelined with the startup): fine
        b"": "Z",  # not NUL-terminated: read as the token all the same
        b"\0\0\0": "Z",
        b"\0trailing": "28P01",
        b"\n": "Z",
    }
    for tail, outcome in cases.items():
        raw = await RawClient.open(gw.port)
        try:
            await raw.send(startup + message(b"p", token + tail))
            reply = await raw.read_until(b"ZE")
            if outcome == "Z":
                assert reply.types().endswith(b"Z"), (tail, reply.errors())
            else:
                (error,) = reply.errors()
                assert error["C"] == outcome and token.decode() not in error["M"]
        finally:
            await raw.close()


async def test_dribbled_startup_meets_the_deadline(gateway_factory) -> None:
    gw = await gateway_factory("limits:\n  startup_timeout: 1s\n")
    raw = await RawClient.open(gw.port)
    loop = asyncio.get_running_loop()
    started = loop.time()
    data = _startup([(b"user", b"agent"), (b"database", b"appdb")])
    try:
        with_error = b""
        for byte in data:  # one byte every 0.2 s: slower than any real client
            try:
                await raw.send(bytes((byte,)))
            except ConnectionError:
                break
            await asyncio.sleep(0.2)
            if raw.reader.at_eof() or raw.reader._buffer:  # type: ignore[attr-defined]
                break
        with_error = await raw.wait_closed_by_peer(5)
        assert loop.time() - started < 4
        fatal = [e for t, e in _messages(with_error) if t == b"E"]
        assert fatal and "limits.startup_timeout" in fatal[0]["M"], with_error
    finally:
        await raw.close()
    await serves(gw)


@pytest.mark.parametrize(("code", "outcome"), [
    # (1234.5679 is the SSLRequest code: with parameters after it, a malformed one)
    (3 << 16 | 99, "Z"), (1234 << 16 | 5679, "08P01"), (2 << 16, "0A000"),
    (0xFFFFFFFF, "0A000"),
], ids=["3.99", "1234.5679", "2.0", "65535.65535"])
async def test_protocol_versions(gw: RunningGateway, code: int, outcome: str) -> None:
    raw = await RawClient.open(gw.port)
    try:
        body = struct.pack("!I", code) + b"user\0agent\0database\0appdb\0\0"
        await raw.send(struct.pack("!I", len(body) + 4) + body)
        reply = await raw.read_until(b"RE")
        if outcome == "Z":
            assert reply.types() == b"vR", reply.messages
            await raw.send(message(b"p", gw.token().encode() + b"\0"))
            assert (await raw.read_until(b"ZE")).types().endswith(b"Z")
        else:
            assert reply.errors()[0]["C"] == outcome
    finally:
        await raw.close()


@pytest.mark.parametrize("key", [b"", b"k" * 3, b"k" * 4, b"k" * 256, b"k" * 257],
                         ids=["none", "3 bytes", "4 bytes", "256 bytes", "257 bytes"])
async def test_cancel_request_key_lengths(gw: RunningGateway, key: bytes) -> None:
    raw = await RawClient.open(gw.port)
    try:
        body = struct.pack("!Ii", 80877102, 1234) + key
        await raw.send(struct.pack("!I", len(body) + 4) + body)
        rest = await raw.wait_closed_by_peer(5)
        if 4 <= len(key) <= 256:
            assert rest == b""  # a forged key cancels nothing, and says nothing
        else:
            fatal = [e for t, e in _messages(rest) if t == b"E"]
            assert fatal[0]["C"] == "08P01" and "CancelRequest" in fatal[0]["M"]
    finally:
        await raw.close()


# -- memory one session can make the gateway keep --------------------------------------


def test_wide_row_descriptions_are_not_kept_for_everyone() -> None:
    # Decoded RowDescriptions are shared by all sessions (a cache by their bytes). One
    # agent selecting 1600 columns under ever new names made each entry ~0.8 MB and the
    # cache up to ~3 GB: the whole gateway's memory, from one session's queries.
    import tracemalloc

    from hoopops.proxy import enforcer
    from hoopops.proxy import session as relay

    def wide(i: int) -> bytes:
        fields = b"".join(f"c{i}_{n}_".ljust(63, "x").encode() + b"\0"
                          + struct.pack("!IhIhih", 0, 0, 25, -1, -1, 0) for n in range(1600))
        return struct.pack("!h", 1600) + fields

    payloads = [wide(i) for i in range(60)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for payload in payloads:
            fields = relay._row_description(payload)
            # (and the audit sample's column names for it, shared alike)
            assert len(enforcer._sample_shape(fields, ())[0]) == 1600
        del fields
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 5 * 1024 * 1024, f"{kept / 1e6:.0f} MB kept after 60 wide results"


# -- COPY FROM STDIN left by other messages --------------------------------------------


@pytest.mark.parametrize("intruder", [message(b"Q", b"select 'never run'\0"),
                                      parse("select 'never run'") + bind() + execute() + SYNC],
                         ids=["query", "parse"])
async def test_other_messages_during_copy_in(gw: RunningGateway, pg: LocalPostgres,
                                             intruder: bytes) -> None:
    # The server ends the connection ("protocol synchronization was lost"): the gateway
    # relays its errors, closes the client, commits nothing, and keeps serving others.
    table = f"cin_{uuid.uuid4().hex[:8]}"
    conn = await admin(pg)
    try:
        await conn.execute(f"create table {table} (v int); grant all on {table} to public")
    finally:
        await conn.close()
    raw = await logged_in(gw)
    try:
        await raw.send(message(b"Q", f"copy {table} from stdin\0".encode()))
        assert (await raw.read_message())[0] == b"G"
        await raw.send(message(b"d", b"1\n") + intruder)
        errors = [e for t, e in _messages(await raw.wait_closed_by_peer(10)) if t == b"E"]
        assert errors[0]["C"] == "08P01" and "during COPY" in errors[0]["M"], errors
        assert errors[-1]["S"] == "FATAL" and "XX000" not in {e["C"] for e in errors}
    finally:
        await raw.close()
    conn = await admin(pg)
    try:
        assert await conn.fetchval(f"select count(*) from {table}") == 0
    finally:
        await conn.close()


# -- a client that stops reading -----------------------------------------------------------


def _gateway_holds_socket(local_port: int, peer_port: int) -> bool:
    """Whether a socket from ``local_port`` to ``peer_port`` is still open in this process
    (the gateway runs in it): an entry of /proc/net/tcp whose inode one of our fds is."""
    inodes = set()
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = fd.readlink()
        except OSError:
            continue
        if str(target).startswith("socket:["):
            inodes.add(str(target)[8:-1])
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        local, remote, inode = parts[1], parts[2], parts[9]
        if int(local.split(":")[1], 16) == local_port and \
                int(remote.split(":")[1], 16) == peer_port and inode in inodes:
            return True
    return False


async def test_session_ended_while_its_client_does_not_read(gateway: RunningGateway) -> None:
    # The gateway ends a session (here: the client breaks the protocol) whose client has
    # stopped reading a large result. The socket must be let go, not kept open until the
    # client reads what is buffered for it (which it may never do): held sockets are not
    # counted by limits.max_connections once their session has ended.
    raw = await logged_in(gateway)
    try:
        client_port = raw.writer.get_extra_info("sockname")[1]
        await raw.send(message(b"Q", b"select repeat('x', 100000) "
                                     b"from generate_series(1, 2000)\0"))
        await asyncio.sleep(1)  # the result fills every buffer on the way; nothing is read
        raw.writer.transport.write(message(b"z"))  # (past drain: the socket may be full)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 8
        while _gateway_holds_socket(gateway.port, client_port):
            assert loop.time() < deadline, "the gateway still holds the ended session's socket"
            await asyncio.sleep(0.2)
        assert gateway.gateway.sessions == {}  # type: ignore[attr-defined]
    finally:
        raw.writer.transport.abort()


# -- the same rules on bytes alone ---------------------------------------------------------


@pytest.mark.parametrize("text", [BREAKOUT, "$hoopops$", "$hoopops_$ and $hoopops$",
                                  "a$hoopops$hoopops$$b", "it's"])
def test_refusal_do_block_quotes_any_text(text: str) -> None:
    from hoopops.proxy.session import _refusal_do_block

    sql = _refusal_do_block("42501", text, text)
    tag = sql[3:sql.index("BEGIN")]
    assert sql.endswith(f"END{tag}") and sql.count(tag) == 2, sql
    assert text.replace("'", "''") in sql


def test_check_bare_on_bytes() -> None:
    from hoopops.proxy import protocol as p

    for ok in (message(b"S"), message(b"H"), message(b"c"), message(b"f", b"why\0"),
               message(b"f", b"\0")):
        p.check_bare(ok[0], ok)
    for bad in (message(b"S", b"x"), message(b"H", b"\0"), message(b"c", b"\0\0"),
                message(b"f"), message(b"f", b"a\0b"), message(b"f", b"a\0\0")):
        with pytest.raises(p.ProtocolError):
            p.check_bare(bad[0], bad)


def test_parse_startup_refuses_bytes_that_are_not_utf8() -> None:
    from hoopops.proxy import protocol as p

    good = _startup([(b"user", "agent-é".encode()), (b"database", b"appdb")])
    assert p.parse_startup(good[4:]).params["user"] == "agent-é"
    with pytest.raises(p.ProtocolError, match="UTF-8"):
        p.parse_startup(_startup([(b"user", b"\xc3(")])[4:])

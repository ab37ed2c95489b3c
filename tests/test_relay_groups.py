"""The pass-through relay's shortcuts, against a real server: one expectation per
Bind…Sync group, and the byte-for-byte memos of the last Bind, Parse, Describe/Execute/Sync
and reply (``Session._client_fast`` / ``_server_fast``). Each test warms the memos with
repeats first, then sends what must not be mistaken for a repeat."""

from __future__ import annotations

import struct
from typing import Any

from tests.clients.rawpg import RawClient, message
from tests.conftest import RunningGateway


def _bind(statement: bytes, *values: bytes | None, portal: bytes = b"") -> bytes:
    params = b"".join(struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v
                      for v in values)
    return message(b"B", portal + b"\0" + statement + b"\0" + struct.pack("!h", 0)
                   + struct.pack("!h", len(values)) + params + struct.pack("!h", 0))


def _run(statement: bytes, *values: bytes | None, portal: bytes = b"") -> bytes:
    """Bind/Describe/Execute/Sync of a prepared statement, as libpq pipelines it."""
    return (_bind(statement, *values, portal=portal) + message(b"D", b"P" + portal + b"\0")
            + message(b"E", portal + b"\0\0\0\0\0") + message(b"S"))


def _session(gateway: RunningGateway) -> Any:
    sessions = list(gateway.gateway.sessions.values())  # type: ignore[attr-defined]
    assert len(sessions) == 1
    return sessions[0]


async def _login(gateway: RunningGateway) -> RawClient:
    raw = await RawClient.open(gateway.port)
    assert (await raw.login(gateway.token())).types().endswith(b"Z")
    return raw


async def test_repeats_and_lookalikes_stay_in_step(gateway: RunningGateway) -> None:
    raw = await _login(gateway)
    try:
        await raw.send(message(b"P", b"twice\0select $1::int * 2\0\0\0") + message(b"S"))
        assert (await raw.read_until()).types() == b"1Z"
        # Parameter values of every length (and NULL) behind the same Bind head.
        for value in (b"1", b"12345", None, b"7", b"123456789", b"0"):
            await raw.send(_run(b"twice", value))
            reply = await raw.read_until()
            assert reply.types() == b"2TDCZ", reply.types()
            assert reply.rows() == [[None if value is None else str(int(value) * 2)]]
        # A value made of the very bytes that follow the Bind: it is a value, not a
        # Describe/Execute/Sync (and holds NULs, so the server refuses it at Bind).
        tail = message(b"D", b"P\0") + message(b"E", b"\0\0\0\0\0") + message(b"S")
        await raw.send(_run(b"twice", tail))
        reply = await raw.read_until()
        assert reply.types() == b"EZ" and reply.errors()[0]["C"] == "22021", reply.types()
        # The same Describe/Execute/Sync after a Bind of another portal: they name a
        # portal that Bind did not bind, so the server says it does not exist.
        await raw.send(_bind(b"twice", b"4", portal=b"other") + tail)
        reply = await raw.read_until()
        assert reply.types() == b"2EZ", reply.types()
        assert reply.errors()[0]["C"] == "34000"
        await raw.send(_run(b"twice", b"4", portal=b"other"))
        reply = await raw.read_until()
        assert reply.types() == b"2TDCZ" and reply.rows() == [["8"]]
        # Three groups in one read, the middle one failing: each gets its own answer.
        await raw.send(_run(b"twice", b"5") + _run(b"twice", b"x") + _run(b"twice", b"6"))
        replies = [await raw.read_until() for _ in range(3)]
        assert [r.types() for r in replies] == [b"2TDCZ", b"EZ", b"2TDCZ"]
        assert replies[0].rows() == [["10"]] and replies[2].rows() == [["12"]]
        assert (await raw.simple("select 'in step'")).rows() == [["in step"]]
        session = _session(gateway)
        assert not session.pending and session.tx_status == b"I"
        # Every Execute forwarded counted once (the server skipped some after an error:
        # the gateway counts what it forwarded), plus the Query.
        assert session.info.stats.statements == 13
    finally:
        await raw.close()


async def test_unnamed_parse_repeats_and_a_new_text(gateway: RunningGateway) -> None:
    raw = await _login(gateway)
    try:
        parse = message(b"P", b"\0select $1::text || '!'\0\0\0")
        for value in (b"a", b"bb", b"ccc"):
            await raw.send(parse + _run(b"", value))
            reply = await raw.read_until()
            assert reply.types() == b"12TDCZ" and reply.rows() == [[value.decode() + "!"]]
        # The same length, another text: read again, not taken for the last one.
        other = message(b"P", b"\0select $1::text || '?'\0\0\0")
        assert len(other) == len(parse)
        await raw.send(other + _run(b"", b"d"))
        reply = await raw.read_until()
        assert reply.types() == b"12TDCZ" and reply.rows() == [["d?"]]
        assert _session(gateway).statements[""].sql == "select $1::text || '?'"
    finally:
        await raw.close()


async def test_replies_shaped_like_the_last_but_not_quite(gateway: RunningGateway) -> None:
    """Notices among the rows, and a ParameterStatus before ReadyForQuery, reach the gate
    after replies that were all rows: the reply memo frames only DataRows."""
    raw = await _login(gateway)
    try:
        await raw.send(message(b"Q", b"create function pg_temp.two(n int) returns setof int "
                                    b"language plpgsql as $$ begin return next 1; "
                                    b"if n = 1 then raise notice 'noted'; end if; "
                                    b"return next 2; end $$\0"))
        assert (await raw.read_until()).errors() == []
        await raw.send(message(b"P", b"rows\0select pg_temp.two($1::int)\0\0\0")
                       + message(b"P", b"name\0select set_config('application_name', $1, "
                                 b"false)\0\0\0") + message(b"S"))
        assert (await raw.read_until()).types() == b"11Z"
        for n in (b"0", b"2", b"1", b"3", b"1"):
            await raw.send(_run(b"rows", n))
            reply = await raw.read_until()
            assert reply.rows() == [["1"], ["2"]]
            assert reply.types() == (b"2TNDDCZ" if n == b"1" else b"2TDDCZ"), reply.types()
        session = _session(gateway)
        for name in (b"same", b"same", b"same", b"changed"):
            await raw.send(_run(b"name", name))
            reply = await raw.read_until()
            assert reply.rows() == [[name.decode()]]
        assert b"S" in reply.types()  # the change is reported before ReadyForQuery...
        # ... and the gate heard it (it keeps the server's parameters current).
        assert session.upstream.parameters["application_name"] == "changed"
        assert not session.pending and session.tx_status == b"I"
    finally:
        await raw.close()


async def test_transaction_status_follows_each_reply(gateway: RunningGateway) -> None:
    """ReadyForQuery's status byte is part of what the reply memo compares."""
    raw = await _login(gateway)
    try:
        await raw.send(message(b"P", b"one\0select 1\0\0\0") + message(b"S"))
        assert (await raw.read_until()).types() == b"1Z"
        for _ in range(3):
            await raw.send(_run(b"one"))
            assert (await raw.read_until()).messages[-1] == (b"Z", b"I")
        assert (await raw.simple("begin")).messages[-1] == (b"Z", b"T")
        await raw.send(_run(b"one"))
        assert (await raw.read_until()).messages[-1] == (b"Z", b"T")
        assert _session(gateway).tx_status == b"T"
        assert _session(gateway).info.state == "in transaction"
        await raw.simple("rollback")
        await raw.send(_run(b"one"))
        assert (await raw.read_until()).messages[-1] == (b"Z", b"I")
        assert _session(gateway).info.state == "idle"
    finally:
        await raw.close()


def test_bind_layout_and_params_end_bytes_alone() -> None:
    from hoopops.proxy import protocol as p

    raw = _bind(b"st", b"12", None, b"", portal=b"po")
    end = len(raw)
    portal, statement, results, at, count, results_at = p.bind_layout_at(raw, 5, end)
    assert (portal, statement, results, count) == ("po", "st", (), 3)
    assert raw[5:at] == b"po\0st\0\0\0\0\3" and raw[results_at:] == b"\0\0"
    assert p.params_end_at(raw, at, count, end) == results_at
    assert p.params_end_at(raw, at, count + 1, end) == -1  # runs into the result formats
    assert p.params_end_at(raw, at, count, results_at - 1) == -1  # past the end
    forged = raw[:at] + struct.pack("!i", -2) + raw[at + 4:]
    assert p.params_end_at(forged, at, count, end) == -1  # below -1 is no length

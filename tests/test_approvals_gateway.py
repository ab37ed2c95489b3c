"""Held statements through the real gateway, with real clients (issue 4, approvals).

Under the shipped default policy an ``UPDATE ... WHERE`` is a ``review``: the gateway holds
it on the live connection, tells the client ``awaiting approval #ID by an analyst; cancel
to withdraw`` (a NoticeResponse), and runs it only once an analyst approves, in this
process (``gateway.broker.decide``) or from another terminal (``hoopops approvals``).
Denied: 42501 with the reason. Nobody decided in time: 57014 naming the approval. The
client cancelled or went away: the approval is withdrawn (57014 for a cancel). Either
way the session goes on, and every held statement is one statement record in the trail,
linked to its approval.
"""

from __future__ import annotations

import asyncio
import re
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg import errors as pgerr

from hoopops.approvals import ApprovalError, Decision
from hoopops.audit import AuditStore
from hoopops.devdb import LocalPostgres
from tests.clients.rawpg import RawClient, query
from tests.clients.util import poll, psql_args, run
from tests.conftest import RunningGateway, psql_path

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ROOT / "policies"
HOOPOPS = [sys.executable, "-m", "hoopops"]
NOTICE = re.compile(r"awaiting approval #(\d+) by an analyst; cancel to withdraw")
APPROVALS = "approvals:\n  timeout: 30s\n  poll_interval: 0.1\n"


# -- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture
async def table(pg: LocalPostgres) -> AsyncIterator[str]:
    """A fresh table of 60 accounts, owned by the gateway's upstream role."""
    name = f"appr_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(pg.dsn())
    try:
        await conn.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, balance int NOT NULL, "
                           "note text)")
        await conn.execute(f"INSERT INTO {name} SELECT g, 100, NULL "
                           "FROM generate_series(1, 60) g")
        yield name
        await conn.execute(f"DROP TABLE {name}")
    finally:
        await conn.close()


@pytest.fixture
async def gw(gateway_factory: object) -> RunningGateway:
    """The default policy (writes need review), audit on, quick polling."""
    return await gateway_factory(APPROVALS, policies=POLICIES, audit=True)  # type: ignore


def store_of(gw: RunningGateway) -> AuditStore:
    store = gw.gateway.store  # type: ignore[attr-defined]
    assert store is not None
    return store


class Client:
    """A psycopg (async) connection through the gateway that collects notices."""

    def __init__(self, conn: psycopg.AsyncConnection, session_id: str) -> None:
        self.conn = conn
        self.session_id = session_id
        self.notices: list[str] = []
        conn.add_notice_handler(lambda diag: self.notices.append(diag.message_primary or ""))

    @classmethod
    async def open(cls, gw: RunningGateway, sub: str = "agent-1",
                   app: str | None = None) -> Client:
        app = app or f"appr-{uuid.uuid4().hex[:8]}"
        conn = await psycopg.AsyncConnection.connect(
            gw.dsn(gw.token(sub)), autocommit=True, application_name=app)
        sessions = gw.gateway.sessions  # type: ignore[attr-defined]
        [sid] = [s for s, v in sessions.items() if v.info.application_name == app]
        return cls(conn, sid)

    async def held(self, sql: str, *params: object) -> tuple[asyncio.Task[object], int]:
        """Send ``sql``; return the task running it and the approval id from the notice."""
        before = len(self.notices)

        async def execute() -> list[tuple[object, ...]]:
            cur = await self.conn.execute(sql, params or None)
            return await cur.fetchall() if cur.description else []
        task = asyncio.ensure_future(execute())

        async def noticed() -> bool:
            if task.done():
                task.result()  # raise what went wrong instead of timing out
                raise AssertionError(f"{sql!r} was not held")
            return any(NOTICE.search(n) for n in self.notices[before:])
        await poll(noticed, 10, 0.01, what=f"the approval notice for {sql!r}")
        [approval_id] = [int(m.group(1)) for n in self.notices[before:]
                         if (m := NOTICE.search(n))]
        return task, approval_id

    async def rows(self, sql: str, *params: object) -> list[tuple[object, ...]]:
        cur = await self.conn.execute(sql, params or None)
        return await cur.fetchall() if cur.description else []

    async def close(self) -> None:
        await self.conn.close()


async def status(gw: RunningGateway, approval_id: int) -> str:
    view = await store_of(gw).get_approval(approval_id)
    assert view is not None
    return view.status


async def statements(gw: RunningGateway, session_id: str, text: str) -> list[Any]:
    """The session's statement records whose SQL contains ``text``, once all of them have
    their outcome (results are recorded behind the client, not before it sees them)."""
    found: list[Any] = []

    async def finished() -> bool:
        found[:] = [s for s in await store_of(gw).session_statements(session_id)
                    if text in s.sql]
        return bool(found) and all(s.finished for s in found)
    await poll(finished, 5, what=f"the outcome records of {text!r}")
    return found


# -- approve --------------------------------------------------------------------------------


async def test_held_update_runs_after_approval_and_returns_rows(gw: RunningGateway,
                                                                table: str) -> None:
    client = await Client.open(gw)
    broker = gw.gateway.broker  # type: ignore[attr-defined]
    try:
        sql = f"UPDATE {table} SET balance = balance + 5 WHERE id = 1 RETURNING id, balance"
        started = time.monotonic()
        task, approval_id = await client.held(sql)
        assert time.monotonic() - started < 2, "the notice must come at once"
        assert f"hoopops: awaiting approval #{approval_id} by an analyst; cancel to " \
               "withdraw" in client.notices
        await asyncio.sleep(0.3)
        assert not task.done(), "a held statement must not run before a decision"
        assert await status(gw, approval_id) == "pending"
        [pending] = [p for p in broker.pending() if p.id == approval_id]
        assert pending.session_id == client.session_id

        await broker.decide(approval_id, Decision.APPROVED_ONCE, "analyst-1")
        assert await asyncio.wait_for(task, 5) == [(1, 105)]
        # It really ran, once.
        assert await client.rows(f"SELECT balance FROM {table} WHERE id = 1") == [(105,)]

        # Once means once: the very same statement is held again, under a new approval.
        again, second = await client.held(sql)
        assert second != approval_id
        await broker.decide(second, "denied", "analyst-1", "enough")
        with pytest.raises(pgerr.InsufficientPrivilege):
            await asyncio.wait_for(again, 5)
    finally:
        await client.close()

    # The trail: one statement record, decided 'review', linked to its approval, with its
    # result; the approval names the statement and who decided.
    [record, _denied] = await statements(gw, client.session_id, "balance + 5")
    assert record.decision == "review" and record.approval_id == approval_id
    assert record.command_tag == "UPDATE 1" and record.rows == 1 and record.sqlstate is None
    assert record.result_sha256 and record.started_at is not None
    assert record.approval is not None and record.approval.status == "approved"
    assert record.approval.scope == "once" and record.approval.decided_by == "analyst-1"
    view = await store_of(gw).get_approval(approval_id)
    assert view is not None and view.statement_id == record.id
    assert view.subject == "agent-1" and view.session_id == client.session_id


async def test_approve_from_another_process_with_psql(gw: RunningGateway, table: str,
                                                      pg: LocalPostgres) -> None:
    """psql shows the notice on stderr; ``hoopops approvals approve`` in another process
    releases the statement within about a second (default poll interval 0.5 s)."""
    broker = gw.gateway.broker  # type: ignore[attr-defined]
    broker.poll_interval = 0.5
    config = str(gw.config.file)
    sql = f"UPDATE {table} SET note = 'cli' WHERE id = 7 RETURNING id, note"
    psql = asyncio.ensure_future(run(
        psql_args(psql_path(pg), gw.port, "-At", "-c", sql), env=gw.env(), within=30))

    async def held() -> bool:
        assert not psql.done(), psql.done() and psql.result()
        return any(p.view.sql == sql for p in broker.pending())
    await poll(held, 10, what="psql's UPDATE to be held")
    [pending] = [p for p in broker.pending() if p.view.sql == sql]

    listed = await run([*HOOPOPS, "approvals", "list", "--json", "--config", config])
    assert listed.returncode == 0, listed.stderr
    assert f'"id": {pending.id}' in listed.stdout

    approved = await run([*HOOPOPS, "approvals", "approve", str(pending.id), "--by",
                          "analyst-2", "--config", config])
    assert approved.returncode == 0, approved.stderr

    async def released() -> bool:
        return pending.done
    await poll(released, 5, interval=0.01, what="the gateway to notice the approval")
    view = await store_of(gw).get_approval(pending.id)
    assert view is not None and view.status == "approved" and view.decided_by == "analyst-2"
    assert view.decided_at is not None
    # From the decision's commit (by the other process) to the statement's release here:
    # at most one poll interval (0.5 s), plus a little.
    latency = time.time() - view.decided_at
    assert latency < 1.0, f"the gateway took {latency:.2f}s to notice the CLI's approval"
    print(f"\nCLI approval noticed after {latency:.2f}s (poll interval 0.5 s)")
    done = await asyncio.wait_for(psql, 10)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "7|cli"
    assert f"awaiting approval #{pending.id} by an analyst; cancel to withdraw" in done.stderr


async def test_approve_for_session_covers_the_fingerprint_in_that_session_only(
        gw: RunningGateway, table: str) -> None:
    broker = gw.gateway.broker  # type: ignore[attr-defined]
    one, two = await Client.open(gw), await Client.open(gw)
    try:
        task, approval_id = await one.held(
            f"UPDATE {table} SET balance = balance - 1 WHERE id = 10 RETURNING balance")
        await broker.decide(approval_id, Decision.APPROVED_SESSION, "analyst-1")
        assert await asyncio.wait_for(task, 5) == [(99,)]

        # Same fingerprint (other constants, extended protocol with parameters too): runs
        # at once, no notice, no new approval, recorded against the granting approval.
        before = len(one.notices)
        assert await one.rows(
            f"UPDATE {table} SET balance = balance - 1 WHERE id = 11 RETURNING balance"
        ) == [(99,)]
        assert await asyncio.wait_for(one.rows(
            f"UPDATE {table} SET balance = balance - 1 WHERE id = %s RETURNING balance", 12),
            5) == [(99,)]
        assert one.notices[before:] == []
        assert not [p for p in broker.pending() if p.session_id == one.session_id]
        for text in ("id = 11", "id = $1"):
            [record] = await statements(gw, one.session_id, text)
            assert record.approval_id == approval_id and record.rows == 1

        # A different statement in the same session is still reviewed.
        other, other_id = await one.held(f"UPDATE {table} SET note = 'x' WHERE id = 10")
        await broker.decide(other_id, "denied", "analyst-1")
        with pytest.raises(pgerr.InsufficientPrivilege):
            await asyncio.wait_for(other, 5)

        # Another session (same identity) gets no benefit from the grant.
        held, held_id = await two.held(
            f"UPDATE {table} SET balance = balance - 1 WHERE id = 13 RETURNING balance")
        assert held_id not in (approval_id, other_id)
        await broker.decide(held_id, "denied", "analyst-1", "not in this session")
        with pytest.raises(pgerr.InsufficientPrivilege):
            await asyncio.wait_for(held, 5)
    finally:
        await one.close()
        await two.close()


# -- deny, time out -------------------------------------------------------------------------


async def test_denied_is_42501_with_the_reason_and_the_session_goes_on(
        gw: RunningGateway, table: str) -> None:
    broker = gw.gateway.broker  # type: ignore[attr-defined]
    client = await Client.open(gw)
    try:
        task, approval_id = await client.held(f"UPDATE {table} SET note = 'no' WHERE id = 2")
        await broker.decide(approval_id, Decision.DENIED, "analyst-1", "INC-42: not today")
        with pytest.raises(pgerr.InsufficientPrivilege) as info:
            await asyncio.wait_for(task, 5)
        assert info.value.sqlstate == "42501"
        message = str(info.value)
        assert "INC-42: not today" in message and f"#{approval_id}" in message
        assert await client.rows("SELECT 'still here'") == [("still here",)]
        assert await client.rows(f"SELECT note FROM {table} WHERE id = 2") == [(None,)]

        # Inside a transaction (extended protocol, parameters): the transaction is aborted
        # on the server as well, exactly as for a server error; ROLLBACK and go on.
        conn = client.conn
        await conn.set_autocommit(False)
        await client.rows("SELECT 1")
        task, approval_id = await client.held(
            f"UPDATE {table} SET note = %s WHERE id = %s", "no", 3)
        await broker.decide(approval_id, "denied", "analyst-1", "nope")
        with pytest.raises(pgerr.InsufficientPrivilege):
            await asyncio.wait_for(task, 5)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        with pytest.raises(pgerr.InFailedSqlTransaction):
            await client.rows("SELECT 1")
        await conn.rollback()
        assert await client.rows("SELECT 2") == [(2,)]
        await conn.commit()
    finally:
        await client.close()
    denied = await statements(gw, client.session_id, "SET note")
    assert [s.sqlstate for s in denied] == ["42501", "42501"]
    assert all(s.started_at is None and s.decision == "review" for s in denied)
    assert all(s.approval is not None and s.approval.status == "denied" for s in denied)
    # psycopg sends the int in binary: kept exactly, as hex (docs/audit.md).
    assert denied[1].params == ["no", {"hex": "0003"}]


async def test_timed_out_is_57014_naming_the_approval(gateway_factory: object,
                                                      table: str) -> None:
    gw = await gateway_factory("approvals:\n  timeout: 2s\n  poll_interval: 0.1\n",  # type: ignore
                               policies=POLICIES, audit=True)
    client = await Client.open(gw)
    try:
        started = time.monotonic()
        task, approval_id = await client.held(f"UPDATE {table} SET note = 't' WHERE id = 4")
        with pytest.raises(pgerr.QueryCanceled) as info:
            await asyncio.wait_for(task, 10)
        waited = time.monotonic() - started
        assert 1.8 < waited < 4, waited
        assert info.value.sqlstate == "57014"
        assert f"approval #{approval_id} timed out" in str(info.value)
        assert await status(gw, approval_id) == "expired"
        assert await client.rows("SELECT 'goes on'") == [("goes on",)]
        # An expired approval cannot be approved afterwards.
        with pytest.raises(ApprovalError, match="no longer pending"):
            await gw.gateway.broker.decide(approval_id, "approved_once", "analyst-1")  # type: ignore
    finally:
        await client.close()
    [record] = await statements(gw, client.session_id, "note = 't'")
    assert record.sqlstate == "57014" and record.approval_id == approval_id


# -- cancel and disconnect withdraw ---------------------------------------------------------


async def test_cancel_withdraws_psycopg(gw: RunningGateway, table: str) -> None:
    client = await Client.open(gw)
    try:
        task, approval_id = await client.held(f"UPDATE {table} SET note = 'c' WHERE id = 5")
        await client.conn.cancel_safe()
        with pytest.raises(pgerr.QueryCanceled) as info:
            await asyncio.wait_for(task, 5)
        assert info.value.sqlstate == "57014"
        assert await status(gw, approval_id) == "withdrawn"
        # The withdrawn approval can no longer be used by anyone.
        with pytest.raises(ApprovalError, match="withdrawn"):
            await gw.gateway.broker.decide(approval_id, "approved_once", "analyst-1")  # type: ignore
        assert await client.rows(f"SELECT note FROM {table} WHERE id = 5") == [(None,)]
    finally:
        await client.close()
    [record] = await statements(gw, client.session_id, "note = 'c'")
    assert record.sqlstate == "57014" and record.started_at is None
    assert record.approval is not None and record.approval.status == "withdrawn"


async def test_ctrl_c_in_psql_withdraws(gw: RunningGateway, table: str,
                                        pg: LocalPostgres) -> None:
    """psql's Ctrl-C: SIGINT makes it send a CancelRequest (blocking PQcancel)."""
    broker = gw.gateway.broker  # type: ignore[attr-defined]
    sql = f"UPDATE {table} SET note = 'ctrl-c' WHERE id = 15"
    proc = await asyncio.create_subprocess_exec(
        *psql_args(psql_path(pg), gw.port, "-At", "-v", "VERBOSITY=verbose", "-c", sql),
        env=gw.env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async def held() -> bool:
            return any(p.view.sql == sql for p in broker.pending())
        await poll(held, 10, what="psql's UPDATE to be held")
        [pending] = [p for p in broker.pending() if p.view.sql == sql]
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), 10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert "57014" in err.decode() and "withdrawn" in err.decode(), err.decode()
    assert f"awaiting approval #{pending.id}" in err.decode()
    assert await status(gw, pending.id) == "withdrawn"


async def test_cancel_withdraws_asyncpg_timeout(gw: RunningGateway, table: str) -> None:
    """asyncpg's ``timeout=`` sends a CancelRequest when it fires."""
    conn = await asyncpg.connect(gw.dsn())
    notices: list[str] = []
    conn.add_log_listener(lambda _c, msg: notices.append(msg.message))
    try:
        with pytest.raises(TimeoutError):
            await conn.fetch(f"UPDATE {table} SET note = $1 WHERE id = $2 RETURNING id",
                             "a", 6, timeout=1.0)
        [approval_id] = [int(m.group(1)) for n in notices if (m := NOTICE.search(n))]

        async def withdrawn() -> bool:
            return await status(gw, approval_id) == "withdrawn"
        await poll(withdrawn, 5, what="the approval to be withdrawn")
        assert await conn.fetchval("SELECT 'usable'") == "usable"
        assert await conn.fetchval(f"SELECT note FROM {table} WHERE id = 6") is None
    finally:
        await conn.close()


async def test_disconnect_while_waiting_withdraws(gw: RunningGateway, table: str) -> None:
    client = await RawClient.open(gw.port)
    reply = await client.login(gw.token())
    assert reply.messages[-1][0] == b"Z"
    await client.send(query(f"UPDATE {table} SET note = 'gone' WHERE id = 8"))
    mtype, payload = await client.read_message()
    assert mtype == b"N"
    match = NOTICE.search(payload.decode())
    assert match, payload
    approval_id = int(match.group(1))
    await client.close()

    async def withdrawn() -> bool:
        return await status(gw, approval_id) == "withdrawn"
    await poll(withdrawn, 5, what="the approval to be withdrawn")
    view = await store_of(gw).get_approval(approval_id)
    assert view is not None

    async def ended() -> bool:
        session = await store_of(gw).get_session(view.session_id)
        return session is not None and not session.open
    await poll(ended, 5, what="the session to end in the trail")
    session = await store_of(gw).get_session(view.session_id)
    assert session is not None and "awaiting approval" in (session.end_reason or "")
    [record] = await statements(gw, view.session_id, "note = 'gone'")
    assert record.started_at is None and record.sqlstate == "57014"
    with pytest.raises(ApprovalError, match="withdrawn"):
        await gw.gateway.broker.decide(approval_id, "approved_once", "analyst-1")  # type: ignore


# -- many at once ---------------------------------------------------------------------------


async def test_fifty_sessions_waiting_are_each_decided_correctly(gw: RunningGateway,
                                                                 table: str) -> None:
    broker = gw.gateway.broker  # type: ignore[attr-defined]
    clients = await asyncio.gather(*(Client.open(gw, sub=f"agent-{n}") for n in range(1, 51)))
    try:
        started = time.monotonic()
        held = await asyncio.gather(*(
            c.held(f"UPDATE {table} SET balance = balance + {n} WHERE id = {n} "
                   "RETURNING id, balance")
            for n, c in enumerate(clients, start=1)))
        holding = time.monotonic() - started
        ids = [approval_id for _, approval_id in held]
        assert len(set(ids)) == 50
        assert {p.id for p in broker.pending()} >= set(ids)
        pending = {v.id: v for v in await store_of(gw).pending_approvals()}
        # Decide from each approval's own record: odd ids of rows approved, even denied.
        decisions = []
        for approval_id in ids:
            view = pending[approval_id]
            n = int(re.search(r"WHERE id = (\d+)", view.sql).group(1))  # type: ignore[union-attr]
            assert view.subject == f"agent-{n}"
            if n % 2:
                decisions.append(broker.decide(approval_id, "approved_once", "analyst-1"))
            else:
                decisions.append(broker.decide(approval_id, "denied", "analyst-1",
                                               f"even row {n}"))
        deciding = time.monotonic()
        await asyncio.gather(*decisions)
        decided = time.monotonic() - deciding
        outcomes = await asyncio.gather(*(asyncio.wait_for(t, 10) for t, _ in held),
                                        return_exceptions=True)
        for n, outcome in enumerate(outcomes, start=1):
            if n % 2:
                assert outcome == [(n, 100 + n)], (n, outcome)
            else:
                assert isinstance(outcome, pgerr.InsufficientPrivilege), (n, outcome)
                assert f"even row {n}" in str(outcome)
        # Every session goes on.
        assert await asyncio.gather(*(c.rows("SELECT 1") for c in clients)) == [[(1,)]] * 50
        print(f"\n50 held: notices after {holding:.2f}s, 50 decisions in {decided:.2f}s")
    finally:
        await asyncio.gather(*(c.close() for c in clients))


# -- replay and four eyes -------------------------------------------------------------------


async def test_an_approval_authorises_only_its_own_statement(gw: RunningGateway,
                                                             table: str) -> None:
    broker = gw.gateway.broker  # type: ignore[attr-defined]
    one, two = await Client.open(gw), await Client.open(gw, sub="agent-2")
    try:
        sql = f"UPDATE {table} SET note = %s WHERE id = %s"
        task, approval_id = await one.held(sql, "bound", "20")
        [pending] = [p for p in broker.pending() if p.id == approval_id]
        waiter = asyncio.ensure_future(pending.wait())
        await broker.decide(approval_id, "approved_once", "analyst-1")
        outcome = await waiter
        await asyncio.wait_for(task, 5)
        sessions = gw.gateway.sessions  # type: ignore[attr-defined]
        me = sessions[one.session_id].info.identity
        other = sessions[two.session_id].info.identity
        text = sql.replace("%s", "$1", 1).replace("%s", "$2", 1)
        assert outcome.authorises(one.session_id, me, text, ["bound", "20"])
        assert not outcome.authorises(one.session_id, me, text, ["bound", "21"])
        assert not outcome.authorises(one.session_id, me, text + " ", ["bound", "20"])
        assert not outcome.authorises(two.session_id, me, text, ["bound", "20"])
        assert not outcome.authorises(one.session_id, other, text, ["bound", "20"])

        # Decided once: deciding it again (to replay it) is refused.
        with pytest.raises(ApprovalError, match="no longer pending"):
            await broker.decide(approval_id, "approved_once", "analyst-2")
        with pytest.raises(ApprovalError, match="no approval"):
            await broker.decide(10**9, "approved_once", "analyst-2")

        # The client withdraws and sends something else: the old id cannot release the
        # new statement, and the new one waits for its own approval.
        task, old_id = await one.held(sql, "first", "21")
        await one.conn.cancel_safe()
        with pytest.raises(pgerr.QueryCanceled):
            await asyncio.wait_for(task, 5)
        task, new_id = await one.held(sql, "second", "22")
        assert new_id != old_id
        with pytest.raises(ApprovalError, match="withdrawn"):
            await broker.decide(old_id, "approved_once", "analyst-1")
        await asyncio.sleep(0.3)
        assert not task.done()
        await broker.decide(new_id, "approved_once", "analyst-1")
        await asyncio.wait_for(task, 5)
        assert await one.rows(f"SELECT id, note FROM {table} WHERE id IN (21, 22) "
                              "ORDER BY id") == [(21, None), (22, "second")]
    finally:
        await one.close()
        await two.close()


async def test_the_requester_cannot_approve_their_own(gw: RunningGateway, table: str) -> None:
    broker = gw.gateway.broker  # type: ignore[attr-defined]
    client = await Client.open(gw, sub="dana")
    config = str(gw.config.file)
    try:
        task, approval_id = await client.held(f"UPDATE {table} SET note = 'own' WHERE id = 9")
        for who in ("dana", "DANA", " dana "):
            with pytest.raises(ApprovalError, match="cannot approve"):
                await broker.decide(approval_id, "approved_once", who)
        refused = await run([*HOOPOPS, "approvals", "approve", str(approval_id), "--by",
                             "dana", "--scope", "session", "--config", config])
        assert refused.returncode != 0
        assert "cannot approve" in refused.stderr + refused.stdout
        assert await status(gw, approval_id) == "pending"
        assert not task.done()
        await broker.decide(approval_id, "approved_once", "erin")
        await asyncio.wait_for(task, 5)
    finally:
        await client.close()
    view = await store_of(gw).get_approval(approval_id)
    assert view is not None and view.decided_by == "erin"


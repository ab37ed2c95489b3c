"""The approvals broker against a real SQLite audit store."""

from __future__ import annotations

import asyncio
import io
import json
import random
import time
import uuid
from pathlib import Path

import pytest

from hoopops import events
from hoopops.approvals import ApprovalBroker, ApprovalError, Decision
from hoopops.audit import NullAuditStore, SessionRecord, SQLiteAuditStore, StatementRecord
from hoopops.events import EventBus
from hoopops.identity import Identity

AGENT = Identity(subject="agent-7", groups=("agents",), issuer="https://idp", token_id="t1",
                 expires_at=None)
SQL = "DELETE FROM orders WHERE id = $1"
RULE = "writes-need-review"


@pytest.fixture
async def store(tmp_path: Path):
    s = await SQLiteAuditStore.open(tmp_path / "audit.db")
    yield s
    await s.close()


@pytest.fixture
async def bus() -> EventBus:
    return EventBus()


@pytest.fixture
async def broker(store: SQLiteAuditStore, bus: EventBus):
    b = ApprovalBroker(store, bus, timeout=10, poll_interval=0.05)
    yield b
    await b.close()


async def new_session(store: SQLiteAuditStore, identity: Identity = AGENT) -> str:
    sid = str(uuid.uuid4())
    await store.session_started(SessionRecord.for_identity(
        sid, identity, claimed_user="app", client_addr="127.0.0.1", client_port=1,
        application_name="psql", target="prod", tls=False, started_at=time.time()))
    return sid


async def held(broker: ApprovalBroker, store: SQLiteAuditStore, sid: str, sql: str = SQL,
               params: list[str | None] | None = None, fingerprint: str = "fp-delete"):
    params = ["42"] if params is None else params
    stmt = await store.statement_received(StatementRecord(
        sid, 1, time.time(), sql, params, {}, "review", RULE))
    return await broker.create(sid, AGENT, sql, params, fingerprint, RULE,
                               "writes to orders", statement_id=stmt)


async def test_approve_once(broker: ApprovalBroker, store: SQLiteAuditStore,
                            bus: EventBus) -> None:
    feed = bus.subscribe([events.APPROVAL_REQUESTED, events.APPROVAL_DECIDED])
    sid = await new_session(store)
    pending = await held(broker, store, sid)
    assert pending.notice == f"awaiting approval #{pending.id} by an analyst; cancel to withdraw"
    requested = await feed.get()
    assert requested.data["approval_id"] == pending.id and requested.data["sql"] == SQL
    assert [p.id for p in broker.pending()] == [pending.id]
    assert [a.id for a in await store.pending_approvals()] == [pending.id]

    view = await broker.decide(pending.id, Decision.APPROVED_ONCE, "analyst", "looks fine")
    assert view.status == "approved" and view.scope == "once"
    outcome = await pending.wait()
    assert outcome.decision is Decision.APPROVED_ONCE and outcome.approved
    assert outcome.sqlstate is None and outcome.decided_by == "analyst"
    assert outcome.authorises(sid, AGENT, SQL, ["42"])
    assert not broker.session_allows(sid, "fp-delete", RULE)
    decided = await feed.get()
    assert decided.data == {"approval_id": pending.id, "session_id": sid,
                            "decision": "approved_once", "decided_by": "analyst",
                            "reason": "looks fine"}
    statements = await store.session_statements(sid)
    assert statements[0].approval is not None and statements[0].approval.id == pending.id
    assert (await store.verify()).ok


async def test_approve_for_the_session(broker: ApprovalBroker, store: SQLiteAuditStore) -> None:
    sid, other = await new_session(store), await new_session(store)
    pending = await held(broker, store, sid)
    await broker.decide(pending.id, "approved_session", "analyst")
    outcome = await pending.wait()
    assert outcome.decision is Decision.APPROVED_SESSION
    assert broker.session_allows(sid, "fp-delete", RULE)
    assert broker.session_approval(sid, "fp-delete", RULE) == pending.id
    assert not broker.session_allows(sid, "fp-other", RULE)
    assert not broker.session_allows(other, "fp-delete", RULE)
    await broker.session_closed(sid)
    assert not broker.session_allows(sid, "fp-delete", RULE)


async def test_deny(broker: ApprovalBroker, store: SQLiteAuditStore) -> None:
    sid = await new_session(store)
    pending = await held(broker, store, sid)
    await broker.decide(pending.id, Decision.DENIED, "analyst", "not during business hours")
    outcome = await pending.wait()
    assert outcome.decision is Decision.DENIED and not outcome.approved
    assert outcome.sqlstate == "42501"
    assert f"#{pending.id}" in outcome.message and "business hours" in outcome.message
    assert not outcome.authorises(sid, AGENT, SQL, ["42"])


async def test_timeout(store: SQLiteAuditStore, bus: EventBus) -> None:
    broker = ApprovalBroker(store, bus, timeout=0.2, poll_interval=0.05)
    sid = await new_session(store)
    pending = await held(broker, store, sid)
    started = time.monotonic()
    outcome = await pending.wait()
    assert 0.15 < time.monotonic() - started < 2
    assert outcome.decision is Decision.TIMED_OUT and outcome.sqlstate == "57014"
    assert f"approval #{pending.id} timed out" in outcome.message
    view = await store.get_approval(pending.id)
    assert view is not None and view.status == "expired"
    with pytest.raises(ApprovalError, match="no longer pending"):
        await broker.decide(pending.id, Decision.APPROVED_ONCE, "analyst")
    await broker.close()


async def test_withdraw(broker: ApprovalBroker, store: SQLiteAuditStore) -> None:
    sid = await new_session(store)
    pending = await held(broker, store, sid)
    waiter = asyncio.create_task(pending.wait())
    await asyncio.sleep(0.01)
    outcome = await pending.withdraw()
    assert outcome.decision is Decision.WITHDRAWN and outcome.sqlstate == "57014"
    assert (await waiter) == outcome
    view = await store.get_approval(pending.id)
    assert view is not None and view.status == "withdrawn"
    with pytest.raises(ApprovalError, match="withdrawn"):
        await broker.decide(pending.id, Decision.APPROVED_ONCE, "analyst")


async def test_disconnect_while_waiting_withdraws(broker: ApprovalBroker,
                                                  store: SQLiteAuditStore) -> None:
    sid = await new_session(store)
    pending = await held(broker, store, sid)
    waiter = asyncio.create_task(pending.wait())
    await asyncio.sleep(0.01)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    view = await store.get_approval(pending.id)
    assert view is not None and view.status == "withdrawn"


async def test_session_closed_withdraws_its_pending(broker: ApprovalBroker,
                                                   store: SQLiteAuditStore) -> None:
    sid, other = await new_session(store), await new_session(store)
    mine, theirs = await held(broker, store, sid), await held(broker, store, other)
    await broker.session_closed(sid)
    assert (await mine.wait()).decision is Decision.WITHDRAWN
    assert not theirs.done and [p.id for p in broker.pending()] == [theirs.id]


async def test_requester_cannot_approve(broker: ApprovalBroker, store: SQLiteAuditStore) -> None:
    sid = await new_session(store)
    pending = await held(broker, store, sid)
    for who in ("agent-7", "AGENT-7"):
        with pytest.raises(ApprovalError, match="cannot approve"):
            await broker.decide(pending.id, Decision.APPROVED_ONCE, who)
    with pytest.raises(ApprovalError, match="name who"):
        await broker.decide(pending.id, Decision.APPROVED_ONCE, " ")
    with pytest.raises(ApprovalError, match="not a decision"):
        await broker.decide(pending.id, Decision.TIMED_OUT, "analyst")
    with pytest.raises(ApprovalError, match="no approval #9999"):
        await broker.decide(9999, Decision.DENIED, "analyst")
    assert not pending.done
    view = await store.get_approval(pending.id)
    assert view is not None and view.pending


async def test_fifty_concurrent_each_decided_correctly(broker: ApprovalBroker,
                                                       store: SQLiteAuditStore) -> None:
    sessions = await asyncio.gather(*(new_session(store) for _ in range(50)))
    pendings = await asyncio.gather(*(
        held(broker, store, sid, sql=f"UPDATE t SET x = {n}", fingerprint=f"fp{n}")
        for n, sid in enumerate(sessions)))
    waits = [asyncio.create_task(p.wait()) for p in pendings]
    plan = {p.id: (Decision.APPROVED_ONCE, Decision.APPROVED_SESSION, Decision.DENIED)[n % 3]
            for n, p in enumerate(pendings)}
    order = list(pendings)
    random.Random(7).shuffle(order)
    await asyncio.gather(*(broker.decide(p.id, plan[p.id], "analyst", f"reason {p.id}")
                           for p in order))
    outcomes = await asyncio.gather(*waits)
    for pending, sid, outcome in zip(pendings, sessions, outcomes, strict=True):
        assert outcome.approval_id == pending.id and outcome.session_id == sid
        assert outcome.decision is plan[pending.id]
        assert outcome.reason == f"reason {pending.id}"
    assert await store.pending_approvals() == []
    assert (await store.verify()).ok


async def test_an_approval_cannot_be_replayed(broker: ApprovalBroker,
                                             store: SQLiteAuditStore) -> None:
    sid, other = await new_session(store), await new_session(store)
    first = await held(broker, store, sid)
    await broker.decide(first.id, Decision.APPROVED_ONCE, "analyst")
    outcome = await first.wait()
    assert outcome.authorises(sid, AGENT, SQL, ["42"])
    # Not for other text, other values, another session or another identity.
    assert not outcome.authorises(sid, AGENT, SQL + " OR true", ["42"])
    assert not outcome.authorises(sid, AGENT, SQL, ["43"])
    assert not outcome.authorises(sid, AGENT, SQL, None)
    assert not outcome.authorises(other, AGENT, SQL, ["42"])
    impostor = Identity("agent-8", (), AGENT.issuer, None, None)
    assert not outcome.authorises(sid, impostor, SQL, ["42"])
    # Not again: the same statement later in the session needs its own approval ...
    assert not broker.session_allows(sid, "fp-delete", RULE)
    second = await held(broker, store, sid)
    assert second.id != first.id and not second.done
    # ... and the spent approval cannot be decided again.
    with pytest.raises(ApprovalError, match="no longer pending"):
        await broker.decide(first.id, Decision.APPROVED_ONCE, "analyst")
    # A session grant does not travel to another session either.
    third = await held(broker, store, other)
    await broker.decide(third.id, Decision.APPROVED_SESSION, "analyst")
    await third.wait()
    assert broker.session_allows(other, "fp-delete", RULE) and not broker.session_allows(
        sid, "fp-delete", RULE)


async def test_decision_from_another_store_instance_is_noticed(
        broker: ApprovalBroker, store: SQLiteAuditStore, tmp_path: Path) -> None:
    sid = await new_session(store)
    pending = await held(broker, store, sid)
    elsewhere = await SQLiteAuditStore.open(tmp_path / "audit.db")
    try:
        remote = ApprovalBroker(elsewhere, EventBus())
        await remote.decide(pending.id, Decision.DENIED, "analyst", "from the other terminal")
        started = time.monotonic()
        outcome = await asyncio.wait_for(pending.wait(), 2)
        assert time.monotonic() - started < 1
        assert outcome.decision is Decision.DENIED
        assert outcome.reason == "from the other terminal"
        await remote.close()
    finally:
        await elsewhere.close()


async def test_timeout_racing_a_decision_keeps_the_decision(
        store: SQLiteAuditStore, bus: EventBus) -> None:
    broker = ApprovalBroker(store, bus, timeout=5, poll_interval=60)
    sid = await new_session(store)
    pending = await held(broker, store, sid)
    # Decided in the store by someone else; this broker has not polled yet.
    await store.approval_decided(pending.id, True, "once", "analyst", None, time.time())
    outcome = await broker._close(pending, "expired", "timer fired")
    assert outcome.decision is Decision.APPROVED_ONCE
    await broker.close()


async def test_requests_and_decisions_are_in_the_chain(broker: ApprovalBroker,
                                                      store: SQLiteAuditStore) -> None:
    sid = await new_session(store)
    pending = await held(broker, store, sid)
    await broker.decide(pending.id, Decision.DENIED, "analyst", "no")
    await pending.wait()
    out = io.StringIO()
    await store.export(out, what="records")
    kinds = [json.loads(line)["kind"] for line in out.getvalue().splitlines()]
    assert kinds == ["session.started", "statement.received", "approval.requested",
                     "approval.decided"]


async def test_works_in_process_with_audit_disabled(bus: EventBus) -> None:
    broker = ApprovalBroker(NullAuditStore(), bus, timeout=5, poll_interval=0.05)
    pending = await broker.create("s", AGENT, SQL, None, "fp", None, None)
    await broker.decide(pending.id, Decision.APPROVED_SESSION, "analyst")
    assert (await pending.wait()).approved and broker.session_allows("s", "fp", None)
    await broker.close()


async def test_close_withdraws_everything_held(store: SQLiteAuditStore, bus: EventBus) -> None:
    broker = ApprovalBroker(store, bus, timeout=5, poll_interval=0.05)
    sid = await new_session(store)
    pending = await held(broker, store, sid)
    await broker.close()
    assert (await pending.wait()).decision is Decision.WITHDRAWN
    with pytest.raises(ApprovalError, match="stopped"):
        await held(broker, store, sid)

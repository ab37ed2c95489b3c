"""Attacks on approvals (issue 4): an approval authorises exactly what it was granted for,
by someone other than the requester, once, and the trail says so.

Real gateway, real PostgreSQL, psycopg clients, and ``hoopops approvals`` run as separate
processes the way a second analyst (or an insider) would run them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import sqlite3
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from psycopg import errors as pgerr

from hoopops.approvals import ApprovalError
from hoopops.devdb import LocalPostgres
from tests.clients.util import poll, run
from tests.conftest import RunningGateway
from tests.test_approvals_gateway import APPROVALS, HOOPOPS, POLICIES, Client, status, store_of


@pytest.fixture
async def table(pg: LocalPostgres) -> AsyncIterator[str]:
    name = f"att_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(pg.dsn())
    try:
        await conn.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, note text)")
        await conn.execute(f"INSERT INTO {name} SELECT g, NULL FROM generate_series(1, 9) g")
        yield name
        await conn.execute(f"DROP TABLE {name}")
    finally:
        await conn.close()


@pytest.fixture
async def gw(gateway_factory: object) -> RunningGateway:
    return await gateway_factory(APPROVALS, policies=POLICIES, audit=True)  # type: ignore


async def note_of(pg: LocalPostgres, table: str, row: int) -> str | None:
    conn = await asyncpg.connect(pg.dsn())
    try:
        return await conn.fetchval(f"SELECT note FROM {table} WHERE id = $1", row)
    finally:
        await conn.close()


def chain_records(gw: RunningGateway, kind: str, approval_id: int) -> list[dict[str, object]]:
    """The chained ``kind`` records about one approval (read as an auditor would)."""
    db = sqlite3.connect(gw.config.audit.path)
    try:
        payloads = [json.loads(p) for (p,) in db.execute(
            "SELECT payload FROM chain WHERE kind = ? ORDER BY seq", (kind,))]
    finally:
        db.close()
    return [p for p in payloads if p.get("approval_id") == approval_id]


async def test_an_approval_written_into_the_query_table_does_not_release(
        gw: RunningGateway, table: str, pg: LocalPostgres) -> None:
    """The approvals table is a projection anyone with the file can edit; the gateway
    polls it. An edited row with no chain record behind it must not run the statement."""
    client = await Client.open(gw)
    try:
        task, approval_id = await client.held(
            f"UPDATE {table} SET note = 'forged' WHERE id = 1")
        db = sqlite3.connect(gw.config.audit.path)
        try:
            db.execute("UPDATE approvals SET status = 'approved', scope = 'once', "
                       "decided_by = 'nobody', decided_at = '2030-01-01T00:00:00.000000Z' "
                       "WHERE id = ?", (approval_id,))
            db.commit()
        finally:
            db.close()
        with pytest.raises(pgerr.QueryCanceled, match=f"#{approval_id}"):
            await asyncio.wait_for(task, 10)
        assert await note_of(pg, table, 1) is None
        # A forged row pointing at some other chain record is no better.
        task, second = await client.held(f"UPDATE {table} SET note = 'forged' WHERE id = 2")
        db = sqlite3.connect(gw.config.audit.path)
        try:
            db.execute("UPDATE approvals SET status = 'approved', scope = 'session', "
                       "decided_by = 'nobody', decided_seq = 1 WHERE id = ?", (second,))
            db.commit()
        finally:
            db.close()
        with pytest.raises(pgerr.QueryCanceled):
            await asyncio.wait_for(task, 10)
        assert await note_of(pg, table, 2) is None
        # The session goes on, and a real decision still works.
        task, third = await client.held(f"UPDATE {table} SET note = 'real' WHERE id = 3")
        await gw.gateway.broker.decide(third, "approved_once", "analyst")  # type: ignore[attr-defined]
        await asyncio.wait_for(task, 5)
        assert await note_of(pg, table, 3) == "real"
    finally:
        await client.close()
    assert chain_records(gw, "approval.decided", approval_id) == []
    report = await store_of(gw).verify()
    assert not report.ok and report.first_problem is not None
    assert report.first_problem.table == "approvals"


@pytest.mark.parametrize("name", ["dana\u200b", "\u200bdana", "\uff44\uff41\uff4e\uff41",
                                  "\u217eana", "Dana\u00ad", "da\u2060na", "DANA\t"])
async def test_the_requester_cannot_approve_under_a_lookalike_name(
        gw: RunningGateway, table: str, name: str) -> None:
    client = await Client.open(gw, sub="dana")
    try:
        task, approval_id = await client.held(f"UPDATE {table} SET note = 'own' WHERE id = 4")
        refused = await run([*HOOPOPS, "approvals", "approve", str(approval_id), "--by",
                             name, "--config", str(gw.config.file)])
        assert refused.returncode != 0, refused
        assert "cannot approve" in refused.stderr or "invisible" in refused.stderr, refused
        assert await status(gw, approval_id) == "pending"
        assert not task.done()
        await gw.gateway.broker.decide(approval_id, "denied", "erin", "no")  # type: ignore[attr-defined]
        with pytest.raises(pgerr.InsufficientPrivilege):
            await asyncio.wait_for(task, 5)
    finally:
        await client.close()


async def test_two_analysts_deciding_at_once_one_decision_stands(
        gw: RunningGateway, table: str, pg: LocalPostgres) -> None:
    client = await Client.open(gw)
    config = str(gw.config.file)
    try:
        for round_ in range(3):
            task, approval_id = await client.held(
                f"UPDATE {table} SET note = 'raced {round_}' WHERE id = 5")
            approve, deny = await asyncio.gather(
                run([*HOOPOPS, "approvals", "approve", str(approval_id), "--by", "erin",
                     "--config", config]),
                run([*HOOPOPS, "approvals", "deny", str(approval_id), "--by", "frank",
                     "--reason", "raced", "--config", config]))
            assert sorted([approve.returncode, deny.returncode]) == [0, 1], (approve, deny)
            loser = approve if approve.returncode else deny
            assert "no longer pending" in loser.stderr, loser
            decided = chain_records(gw, "approval.decided", approval_id)
            assert len(decided) == 1, decided
            if decided[0]["status"] == "approved":
                await asyncio.wait_for(task, 5)
                assert await note_of(pg, table, 5) == f"raced {round_}"
            else:
                with pytest.raises(pgerr.InsufficientPrivilege, match="raced"):
                    await asyncio.wait_for(task, 5)
    finally:
        await client.close()


async def test_deciding_what_is_already_settled_is_refused_with_the_reason(
        gateway_factory: object, table: str) -> None:
    gw: RunningGateway = await gateway_factory(  # type: ignore[operator]
        "approvals:\n  timeout: 1s\n  poll_interval: 0.1\n", policies=POLICIES, audit=True)
    config = str(gw.config.file)
    client = await Client.open(gw)
    try:
        task, denied = await client.held(f"UPDATE {table} SET note = 'x' WHERE id = 6")
        await gw.gateway.broker.decide(denied, "denied", "erin", "no")  # type: ignore[attr-defined]
        with pytest.raises(pgerr.InsufficientPrivilege):
            await asyncio.wait_for(task, 5)
        again = await run([*HOOPOPS, "approvals", "approve", str(denied), "--by", "frank",
                           "--config", config])
        assert again.returncode == 1
        assert f"approval #{denied} is no longer pending: it was denied by erin" in again.stderr

        task, expired = await client.held(f"UPDATE {table} SET note = 'y' WHERE id = 6")
        with pytest.raises(pgerr.QueryCanceled, match=f"#{expired}"):
            await asyncio.wait_for(task, 5)
        late = await run([*HOOPOPS, "approvals", "approve", str(expired), "--by", "frank",
                          "--config", config])
        assert late.returncode == 1 and "no longer pending" in late.stderr, late
        with pytest.raises(ApprovalError, match="no longer pending"):
            await gw.gateway.broker.decide(expired, "approved_once", "frank")  # type: ignore[attr-defined]
    finally:
        await client.close()
    assert len(chain_records(gw, "approval.expired", expired)) == 1
    assert chain_records(gw, "approval.decided", expired) == []


async def test_a_session_approval_ends_with_its_session(gw: RunningGateway, table: str,
                                                        pg: LocalPostgres) -> None:
    first = await Client.open(gw)
    try:
        task, approval_id = await first.held(f"UPDATE {table} SET note = 's1' WHERE id = 7")
        await gw.gateway.broker.decide(approval_id, "approved_session", "erin")  # type: ignore[attr-defined]
        await asyncio.wait_for(task, 5)
        await first.rows(f"UPDATE {table} SET note = 's2' WHERE id = 7")  # covered
    finally:
        await first.close()
    assert await note_of(pg, table, 7) == "s2"

    async def forgotten() -> bool:
        return first.session_id not in gw.gateway.broker._grants  # type: ignore[attr-defined]
    await poll(forgotten, 5, what="the ended session's grants to be dropped")
    second = await Client.open(gw)  # same subject, new session: held again
    try:
        task, other = await second.held(f"UPDATE {table} SET note = 's3' WHERE id = 7")
        assert other != approval_id
        await gw.gateway.broker.decide(other, "denied", "erin")  # type: ignore[attr-defined]
        with pytest.raises(pgerr.InsufficientPrivilege):
            await asyncio.wait_for(task, 5)
    finally:
        await second.close()
    assert await note_of(pg, table, 7) == "s2"
    requested = chain_records(gw, "approval.decided", approval_id)
    assert [r["scope"] for r in requested] == ["session"]


async def test_cancel_racing_an_approval_runs_it_at_most_once_and_says_which(
        gw: RunningGateway, table: str, pg: LocalPostgres) -> None:
    """CancelRequest arriving while the approval is being written: whichever lands first
    is the one record that settles the approval, and the row changed only if the client
    was told the statement ran."""
    client = await Client.open(gw)
    broker = gw.gateway.broker  # type: ignore[attr-defined]
    try:
        for round_ in range(6):
            task, approval_id = await client.held(
                f"UPDATE {table} SET note = 'race {round_}' WHERE id = 8")
            delay = 0.0 if round_ % 2 else 0.002

            async def approve(approval_id: int, delay: float) -> None:
                await asyncio.sleep(delay)
                with contextlib.suppress(ApprovalError):  # the withdrawal won
                    await broker.decide(approval_id, "approved_once", "erin")
            await asyncio.gather(client.conn.cancel_safe(), approve(approval_id, delay))
            try:
                await asyncio.wait_for(task, 5)
                ran = True
            except pgerr.QueryCanceled:
                ran = False
            closing = [r for kind in ("approval.decided", "approval.withdrawn")
                       for r in chain_records(gw, kind, approval_id)]
            assert len(closing) == 1, closing
            assert (await note_of(pg, table, 8) == f"race {round_}") == ran
            if ran:
                assert closing[0]["status"] == "approved"
    finally:
        await client.close()


async def reloaded_gateway(gateway_factory: object, tmp_path: Path
                           ) -> tuple[RunningGateway, Path]:
    folder = tmp_path / "policies"
    shutil.copytree(POLICIES, folder)
    gw: RunningGateway = await gateway_factory(APPROVALS, policies=folder,  # type: ignore
                                               audit=True)
    return gw, folder / "default.yaml"


def rewrite_policy(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new))


WRITES_RULE = ("  - id: writes-need-review\n"
               "    description: Statements that change data (including sequences, locks "
               "and settings changed by functions) need a human\n"
               "    when: {kinds: [write]}\n"
               "    action: review\n")


async def session_grant(gw: RunningGateway, client: Client, table: str) -> None:
    task, approval_id = await client.held(f"UPDATE {table} SET note = 'g1' WHERE id = 9")
    await gw.gateway.broker.decide(approval_id, "approved_session", "erin")  # type: ignore
    await asyncio.wait_for(task, 5)
    await client.rows(f"UPDATE {table} SET note = 'g2' WHERE id = 9")  # the grant covers it


async def test_a_session_grant_does_not_outlive_a_reload_that_blocks(
        gateway_factory: object, tmp_path: Path, table: str, pg: LocalPostgres) -> None:
    gw, policy = await reloaded_gateway(gateway_factory, tmp_path)
    client = await Client.open(gw)
    try:
        await session_grant(gw, client, table)
        rewrite_policy(policy, WRITES_RULE, WRITES_RULE.replace("action: review",
                                                                "action: block"))
        gw.gateway.reload()  # type: ignore[attr-defined]
        with pytest.raises(pgerr.InsufficientPrivilege):
            await client.rows(f"UPDATE {table} SET note = 'g3' WHERE id = 9")
    finally:
        await client.close()
    assert await note_of(pg, table, 9) == "g2"


async def test_a_session_grant_covers_only_the_rule_it_was_granted_under(
        gateway_factory: object, tmp_path: Path, table: str, pg: LocalPostgres) -> None:
    gw, policy = await reloaded_gateway(gateway_factory, tmp_path)
    client = await Client.open(gw)
    try:
        await session_grant(gw, client, table)
        rewrite_policy(policy, WRITES_RULE, """  - id: writes-now-need-a-second-look
    description: After the incident, every write is looked at again
    when: {kinds: [write]}
    action: review

""" + WRITES_RULE)
        gw.gateway.reload()  # type: ignore[attr-defined]
        task, approval_id = await client.held(f"UPDATE {table} SET note = 'g3' WHERE id = 9")
        await gw.gateway.broker.decide(approval_id, "denied", "erin")  # type: ignore
        with pytest.raises(pgerr.InsufficientPrivilege):
            await asyncio.wait_for(task, 5)
    finally:
        await client.close()
    assert await note_of(pg, table, 9) == "g2"

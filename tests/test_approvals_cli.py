"""Deciding from another terminal: ``hoopops approvals`` as a separate process, while a
broker in this process holds the statements."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from pathlib import Path

import pytest

from hoopops.approvals import ApprovalBroker, Decision
from hoopops.audit import SessionRecord, SQLiteAuditStore
from hoopops.events import EventBus
from hoopops.identity import Identity
from tests.clients.offline import store_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = store_config(extra="approvals:\n  timeout: 60s\n  poll_interval: 0.2\n")
AGENT = Identity("agent-cli", ("agents",), "https://idp", "tok", None)


async def hoopops(*argv: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hoopops", *argv, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
async def setup(tmp_path: Path):
    config = tmp_path / "hoopops.yaml"
    config.write_text(CONFIG)
    store = await SQLiteAuditStore.open(tmp_path / "audit.db")
    broker = ApprovalBroker(store, EventBus(), timeout=60, poll_interval=0.2)
    sid = str(uuid.uuid4())
    await store.session_started(SessionRecord.for_identity(
        sid, AGENT, claimed_user="app", client_addr="127.0.0.1", client_port=1,
        application_name="psql", target="main", tls=False, started_at=time.time()))
    yield str(config), store, broker, sid
    await broker.close()
    await store.close()


async def test_list_and_approve_from_another_process(setup) -> None:
    config, _store, broker, sid = setup
    pending = await broker.create(sid, AGENT, "UPDATE accounts SET frozen = true", None,
                                  "fp-freeze", "writes", "writes to accounts")
    code, out, _ = await hoopops("approvals", "list", "--json", "--config", config)
    assert code == 0
    [item] = json.loads(out)
    assert item["id"] == pending.id and item["session"] == sid
    assert item["identity"] == "agent-cli" and item["rule"] == "writes"
    assert item["sql"] == "UPDATE accounts SET frozen = true" and item["expires"]

    code, out, _ = await hoopops("approvals", "list", "-c", config)
    assert code == 0 and f"#{pending.id}" in out and "agent-cli" in out

    code, out, _ = await hoopops("approvals", "approve", f"#{pending.id}", "--by", "dana",
                                 "--reason", "INC-7", "-c", config)
    assert code == 0 and f"approved #{pending.id} once (by dana)" in out
    decided = time.monotonic()
    outcome = await asyncio.wait_for(pending.wait(), 5)
    # Noticed within the poll interval, well inside a second.
    assert time.monotonic() - decided < 1
    assert outcome.decision is Decision.APPROVED_ONCE and outcome.decided_by == "dana"
    assert outcome.reason == "INC-7"


async def test_session_scope_and_deny_from_another_process(setup) -> None:
    config, _store, broker, sid = setup
    first = await broker.create(sid, AGENT, "DELETE FROM t WHERE id = $1", ["1"], "fp-del",
                                "writes", None)
    second = await broker.create(sid, AGENT, "TRUNCATE t", None, "fp-trunc", "ddl", None)
    code, _, _ = await hoopops("approvals", "approve", str(first.id), "--scope", "session",
                               "--by", "dana", "-c", config)
    assert code == 0
    code, out, _ = await hoopops("approvals", "deny", str(second.id), "--reason",
                                 "not on prod", "--by", "dana", "--json", "-c", config)
    assert code == 0 and json.loads(out)["status"] == "denied"
    assert (await asyncio.wait_for(first.wait(), 5)).decision is Decision.APPROVED_SESSION
    denied = await asyncio.wait_for(second.wait(), 5)
    assert denied.decision is Decision.DENIED and "not on prod" in denied.message
    assert broker.session_allows(sid, "fp-del", "writes")


async def test_requester_cannot_approve_from_the_cli(setup) -> None:
    config, store, broker, sid = setup
    pending = await broker.create(sid, AGENT, "DROP TABLE t", None, "fp", "ddl", None)
    code, _, err = await hoopops("approvals", "approve", str(pending.id), "--by", "agent-cli",
                                 "-c", config)
    assert code == 1 and "cannot approve" in err
    code, _, err = await hoopops("approvals", "approve", "twelve", "-c", config)
    assert code == 2 and "not an approval id" in err
    code, _, err = await hoopops("approvals", "deny", "999", "--by", "dana", "-c", config)
    assert code == 1 and "no approval #999" in err
    view = await store.get_approval(pending.id)
    assert view is not None and view.pending and not pending.done

"""SIGKILL mid-workload: the store reopens, the chain verifies, and every statement whose
write was acknowledged (and so could have been forwarded) is in the trail."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
import textwrap
import time
from pathlib import Path

from hoopops.audit import SQLiteAuditStore

ROOT = Path(__file__).resolve().parents[1]

WRITER = textwrap.dedent("""
    import asyncio, sys, time, uuid
    from hoopops.audit import (SQLiteAuditStore, SessionRecord, StatementRecord,
                               StatementResult)

    async def main(path):
        store = await SQLiteAuditStore.open(path)
        sid = str(uuid.uuid4())
        await store.session_started(SessionRecord(sid, "agent", (), None, None, None, None,
                                                  None, None, "prod", False, time.time()))

        async def client(n):
            i = 0
            while True:
                i += 1
                stmt = await store.statement_received(StatementRecord(
                    sid, n * 1_000_000 + i, time.time(), f"SELECT {n}, {i}", None, {},
                    "allow", None))
                # Acknowledged: from here on the gateway may forward it.
                print(stmt, flush=True)
                await store.statement_finished(stmt, StatementResult(
                    time.time(), time.time(), 1, "SELECT 1"))

        await asyncio.gather(*(client(n) for n in range(8)))

    asyncio.run(main(sys.argv[1]))
""")


async def test_sigkill_mid_writes_loses_nothing_acknowledged(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), str(path), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env)
    assert proc.stdout is not None
    acknowledged: list[int] = []
    deadline = time.monotonic() + 30
    try:
        while len(acknowledged) < 400 and time.monotonic() < deadline:
            line = await asyncio.wait_for(proc.stdout.readline(), 20)
            if not line:
                break
            acknowledged.append(int(line))
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    if len(acknowledged) < 400:
        assert proc.stderr is not None
        raise AssertionError((await proc.stderr.read()).decode())
    assert proc.returncode == -signal.SIGKILL

    store = await SQLiteAuditStore.open(path)
    try:
        report = await store.verify()
        assert report.ok, report.to_json()
    finally:
        await store.close()
    db = sqlite3.connect(path)
    try:
        stored = {r[0] for r in db.execute("SELECT id FROM statements")}
    finally:
        db.close()
    assert set(acknowledged) <= stored

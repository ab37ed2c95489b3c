"""End to end: the real ``hoopops console`` in tmux, a real psql agent, one key press.

The console runs as its own process in a tmux pane (a real terminal); psql connects
through the gateway it started, sends an UPDATE the shipped policy holds for review, the
test presses ``a`` in the pane, and the row psql prints is the proof.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from hoopops.config import load_config
from hoopops.devdb import free_port
from hoopops.identity import mint_token
from tests.clients.tmux import tmux, wait_pane
from tests.conftest import psql_path, write_config

POLICIES = Path(__file__).resolve().parent.parent / "policies"
ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None,
                                reason="tmux is not installed (.ci/run installs it)")


async def test_console_in_tmux_approves_a_psql_statement(tmp_path: Path, pg: Any) -> None:
    seed = await asyncpg.connect(pg.dsn())
    try:
        await seed.execute("CREATE TABLE IF NOT EXISTS tmux_orders (id int primary key, "
                           "status text)")
        await seed.execute("INSERT INTO tmux_orders VALUES (7, 'paid') "
                           "ON CONFLICT (id) DO UPDATE SET status = 'paid'")
    finally:
        await seed.close()
    port = free_port()
    config_path = write_config(tmp_path, pg, policies=POLICIES, audit=True)
    text = config_path.read_text().replace("listen: 127.0.0.1:0", f"listen: 127.0.0.1:{port}")
    config_path.write_text(text)
    config = load_config(config_path)
    log = tmp_path / "console.log"
    name = f"hoopops-e2e-{uuid.uuid4().hex[:8]}"
    command = (f"cd {ROOT} && {sys.executable} -m hoopops console --config {config_path} "
               f"--log-file {log} --export-dir {tmp_path}; sleep 30")
    tmux("new-session", "-d", "-s", name, "-x", "120", "-y", "36", command)
    psql: asyncio.subprocess.Process | None = None
    try:
        screen = await wait_pane(name, "Live sessions")
        assert f"127.0.0.1:{port}" in screen
        token = mint_token(config.identity, "psql-agent", ["agents"], 600)
        psql = await asyncio.create_subprocess_exec(
            psql_path(pg), "-X", "-At", "-h", "127.0.0.1", "-p", str(port), "-U", "agent",
            "-d", "appdb", "-c",
            "UPDATE tmux_orders SET status = 'shipped' WHERE id = 7 RETURNING id, status",
            env={"PGPASSWORD": token, "PGCONNECT_TIMEOUT": "10", "PATH": "/usr/bin:/bin"},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        await wait_pane(name, "Pending approvals (1)")
        await wait_pane(name, "psql-agent")
        assert psql.returncode is None, "psql must be waiting for the analyst"
        await asyncio.to_thread(tmux, "send-keys", "-t", name, "a")
        out, err = await asyncio.wait_for(psql.communicate(), 15)
        assert psql.returncode == 0, err.decode()
        assert out.decode().strip().splitlines()[0] == "7|shipped"
        assert "awaiting approval" in err.decode()  # the NOTICE psql printed while held
        await wait_pane(name, "Pending approvals (0)")
        # Quit (asks first, because the gateway stops with the console).
        await asyncio.to_thread(tmux, "send-keys", "-t", name, "q")
        await wait_pane(name, "Quit hoopops console?")
        await asyncio.to_thread(tmux, "send-keys", "-t", name, "y")
        await wait_pane(name, "", within=1)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                conn = await asyncpg.connect(host="127.0.0.1", port=port, user="agent",
                                             password=token, database="appdb", ssl=False,
                                             timeout=1)
            except (OSError, asyncpg.PostgresError, TimeoutError):
                break
            await conn.close()
            await asyncio.sleep(0.2)
        else:
            raise AssertionError("the gateway kept listening after the console quit")
    finally:
        if psql is not None and psql.returncode is None:
            psql.kill()
            await psql.wait()
        tmux("kill-session", "-t", name)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_sighup_reloads_policies_and_a_hangup_still_quits(tmp_path: Path,
                                                                pg: Any) -> None:
    """``kill -HUP`` re-reads the policies (as for hoopops serve) and the console stays;
    the terminal going away (tmux closing the pane) still ends it, gateway and all."""
    port = free_port()
    config_path = write_config(tmp_path, pg, policies=POLICIES, audit=True)
    text = config_path.read_text().replace("listen: 127.0.0.1:0", f"listen: 127.0.0.1:{port}")
    config_path.write_text(text)
    name = f"hoopops-hup-{uuid.uuid4().hex[:8]}"
    command = (f"cd {ROOT} && exec {sys.executable} -m hoopops console --config "
               f"{config_path} --log-file {tmp_path / 'console.log'}")
    tmux("new-session", "-d", "-s", name, "-x", "120", "-y", "36", command)
    pid: int | None = None
    try:
        await wait_pane(name, "Live sessions")
        pid = int(tmux("display-message", "-p", "-t", name, "#{pane_pid}").strip())
        os.kill(pid, signal.SIGHUP)
        await wait_pane(name, "SIGHUP: policy folder re-read")
        assert _pid_alive(pid)
        conn = await asyncpg.connect(host="127.0.0.1", port=port, user="agent",
                                     password=mint_token(load_config(config_path).identity,
                                                         "hup-agent", ["agents"], 600),
                                     database="appdb", ssl=False, timeout=10)
        try:
            assert await conn.fetchval("SELECT 1") == 1
        finally:
            await conn.close()
    finally:
        tmux("kill-session", "-t", name)
    deadline = time.monotonic() + 15
    while pid is not None and _pid_alive(pid):
        assert time.monotonic() < deadline, "the console outlived its terminal"
        await asyncio.sleep(0.1)

"""The ``hoopops`` command as a person runs it: serve, token mint, help.

``hoopops serve`` runs as a real subprocess: it serves psql, and on SIGTERM or SIGINT it
stops accepting, lets a running statement finish within the grace period, closes idle
sessions with a clear FATAL and exits 0.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from pathlib import Path

import psycopg
import pytest

from hoopops.devdb import LocalPostgres, free_port
from tests.clients.gw import config_text, env_with
from tests.clients.util import poll, psql_args, run, wait_active
from tests.conftest import psql_path

HOOPOPS = [sys.executable, "-m", "hoopops"]


def _write_config(folder: Path, pg: LocalPostgres, port: int, extra: str = "") -> Path:
    path = folder / "hoopops.yaml"
    path.write_text(config_text({"appdb": pg.dsn()}, extra, listen=f"127.0.0.1:{port}"))
    return path


async def _mint(config: Path, sub: str = "cli-agent", *more: str) -> str:
    done = await run([*HOOPOPS, "token", "mint", "--config", str(config), "--sub", sub,
                      *more])
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _accepting(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


async def _serve(config: Path, port: int) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        *HOOPOPS, "serve", "--config", str(config), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)

    async def up() -> bool:
        if proc.returncode is not None:
            err = await proc.stderr.read() if proc.stderr else b""
            raise AssertionError(f"hoopops serve exited early: {err.decode()}")
        return _accepting(port)
    await poll(up, 20, interval=0.1, what="hoopops serve to listen")
    return proc


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


async def test_help_lists_commands() -> None:
    done = await run([*HOOPOPS, "--help"])
    assert done.returncode == 0
    for command in ("serve", "token"):
        assert command in done.stdout
    done = await run([*HOOPOPS, "serve", "--help"])
    assert done.returncode == 0 and "SIGTERM" in done.stdout and "--config" in done.stdout
    done = await run([*HOOPOPS, "token", "mint", "--help"])
    assert done.returncode == 0 and "--sub" in done.stdout and "--ttl" in done.stdout


async def test_token_mint_prints_a_working_token(tmp_path: Path, pg: LocalPostgres) -> None:
    port = free_port()
    config = _write_config(tmp_path, pg, port)
    token = await _mint(config, "alice", "--groups", "analysts,agents", "--ttl", "5m")
    assert token.count(".") == 2 and "\n" not in token
    proc = await _serve(config, port)
    try:
        done = await run(psql_args(psql_path(pg), port, "-At", "-c", "select 'minted ok'"),
                         env=env_with(token))
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "minted ok"
    finally:
        await _stop(proc)


async def test_serve_bad_config_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: nowhere\ntargets: {}\n")
    done = await run([*HOOPOPS, "serve", "--config", str(bad)])
    assert done.returncode == 2
    assert done.stderr.startswith("hoopops: configuration error:")
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_serve_shuts_down_cleanly(tmp_path: Path, pg: LocalPostgres,
                                        sig: signal.Signals) -> None:
    port = free_port()
    config = _write_config(tmp_path, pg, port, "limits:\n  shutdown_grace: 2s\n")
    proc = await _serve(config, port)
    try:
        token = await _mint(config)
        done = await run(psql_args(psql_path(pg), port, "-At", "-c", "select 'served'"),
                         env=env_with(token))
        assert done.stdout.strip() == "served", done.stderr
        dsn = f"postgresql://agent:{token}@127.0.0.1:{port}/appdb?sslmode=disable"
        idle = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        busy = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        running = asyncio.create_task(
            busy.execute("select pg_sleep(0.5), 'finished in grace' /* in-grace */"))
        await wait_active(pg, "in-grace")  # the statement is running when the signal comes
        loop = asyncio.get_running_loop()
        started = loop.time()
        proc.send_signal(sig)
        # New connections are refused once shutdown begins.
        await poll(lambda: asyncio.sleep(0, not _accepting(port)), 5,
                   what="the listener to close")
        # The statement in flight finishes within the grace period.
        cur = await asyncio.wait_for(running, 10)
        assert await cur.fetchone() == ("", "finished in grace")
        # The process exits 0 after at most the grace period; idle sessions are closed.
        await asyncio.wait_for(proc.wait(), 15)
        assert loop.time() - started < 8
        assert proc.returncode == 0
        err = (await proc.stderr.read()).decode() if proc.stderr else ""
        assert "Traceback" not in err, err
        with pytest.raises(psycopg.OperationalError) as info:
            await idle.execute("select 1")
        assert "closed because the gateway is shutting down" in str(info.value), info.value
        await idle.close()
        await busy.close()
    finally:
        await _stop(proc)

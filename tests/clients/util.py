"""Shared helpers: run client programs, watch the real server, poll with deadlines."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg

from hoopops.devdb import LocalPostgres


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str


async def run(args: list[str], env: dict[str, str] | None = None, stdin: str | None = None,
              within: float = 60) -> Done:
    """Run a program to completion (killed and failed if it outlives ``within``)."""
    proc = await asyncio.create_subprocess_exec(
        *args, env=env, stdin=asyncio.subprocess.PIPE if stdin is not None else
        asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(
            proc.communicate(stdin.encode() if stdin is not None else None), within)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(
            f"{os.path.basename(args[0])} did not finish within {within}s") from None
    assert proc.returncode is not None
    return Done(proc.returncode, out.decode(), err.decode())


def psql_args(psql: str, port: int, *extra: str, database: str = "appdb") -> list[str]:
    return [psql, "-X", "-h", "127.0.0.1", "-p", str(port), "-U", "agent", "-d", database,
            "-v", "ON_ERROR_STOP=0", *extra]


async def poll(check: Callable[[], Awaitable[bool]], within: float = 10,
               interval: float = 0.05, what: str = "condition") -> None:
    """Await ``check()`` until it is true; fail after ``within`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        if await check():
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(interval)


async def admin(pg: LocalPostgres) -> asyncpg.Connection:
    """A direct superuser connection to the real server (not through the gateway)."""
    return await asyncpg.connect(pg.dsn("postgres", database="app"))


async def wait_active(pg: LocalPostgres, needle: str, within: float = 10) -> int:
    """Wait until a backend runs a statement containing ``needle``; return its pid."""
    conn = await admin(pg)
    found: list[int] = []
    try:
        async def check() -> bool:
            rows = await conn.fetch(
                "select pid from pg_stat_activity where state = 'active' and "
                "position($1 in query) > 0 and pid <> pg_backend_pid()", needle)
            found[:] = [r["pid"] for r in rows]
            return bool(found)
        await poll(check, within, what=f"a running statement containing {needle!r}")
    finally:
        await conn.close()
    return found[0]


async def service_backends(pg: LocalPostgres) -> int:
    """How many backends the gateway's service account has open on the real server."""
    conn = await admin(pg)
    try:
        return int(await conn.fetchval(
            "select count(*) from pg_stat_activity where usename = 'hoopops_svc'"))
    finally:
        await conn.close()

"""The relay's flow control and ordering, through the real gateway.

The relay runs on ``asyncio.Protocol`` callbacks (``proxy/session.py``): a client that
stops reading must stop the gateway reading from the server (memory stays flat), what a
client pipelines behind a held statement must wait for it (and die with it when the
client goes away), and the same relay must work on uvloop over TLS, which is how
``hoopops serve`` runs when uvloop is installed.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from hoopops.devdb import LocalPostgres, free_port, write_self_signed_cert
from tests.clients.gw import config_text, env_with
from tests.clients.rawpg import RawClient, query
from tests.clients.util import poll, psql_args, run
from tests.conftest import RunningGateway, psql_path

ROOT = Path(__file__).resolve().parents[1]
HOOPOPS = [sys.executable, "-m", "hoopops"]
ROWS = 40_000
ROW_BYTES = 1000  # 40 MB of result: more than the sockets between us can hold


def _session(gw: RunningGateway, app: str) -> object:
    sessions = gw.gateway.sessions  # type: ignore[attr-defined]
    [session] = [s for s in sessions.values() if s.info.application_name == app]
    return session


async def test_slow_reader_pauses_the_server_side(gateway: RunningGateway) -> None:
    """A client that stops reading: the gateway stops reading the server (its buffers
    stay small) instead of queueing the whole result in memory; all rows arrive once the
    client reads again, and reading resumes."""
    app = f"slow-{uuid.uuid4().hex[:8]}"
    client = await RawClient.open(gateway.port)
    try:
        reply = await client.login(gateway.token(), extra={"application_name": app})
        assert reply.messages[-1][0] == b"Z", reply.errors()
        session = _session(gateway, app)
        await client.send(query(f"select repeat('x', {ROW_BYTES}) "
                                f"from generate_series(1, {ROWS})"))

        async def paused() -> bool:
            return bool(session._server.paused)  # type: ignore[attr-defined]
        await poll(paused, 10, 0.02, what="the gateway to stop reading the server")
        await asyncio.sleep(0.5)  # nothing piles up while the client does not read
        assert session._server.paused  # type: ignore[attr-defined]
        assert len(session._sbuf) < 2 << 20  # type: ignore[attr-defined]
        written = session._client.transport.get_write_buffer_size()  # type: ignore
        assert written < 4 << 20, written

        reply = await client.read_until(b"Z", within=60)
        assert reply.types().count(b"D") == ROWS
        assert reply.messages[-2][0] == b"C" and reply.messages[-2][1] == b"SELECT 40000\0"
        assert not session._server.paused  # type: ignore[attr-defined]
        await client.send(query("select 'after'"))
        assert (await client.read_until(b"Z")).rows() == [["after"]]
    finally:
        await client.close()


async def test_copy_in_larger_than_any_buffer(gateway: RunningGateway, pg: LocalPostgres
                                              ) -> None:
    """COPY FROM STDIN of more than the server reads at once: the client side is paused
    while the server's socket is full, and every row arrives in order."""
    table = f"relay_copy_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(gateway.dsn())
    try:
        await conn.execute(f"create table {table} (n int, pad text)")
        pad = "p" * 500
        records = [(i, pad) for i in range(60_000)]
        await conn.copy_records_to_table(table, records=records)
        assert await conn.fetchval(f"select count(*) from {table}") == 60_000
        assert await conn.fetchval(f"select sum(n) from {table}") == sum(range(60_000))
    finally:
        await conn.execute(f"drop table if exists {table}")
        await conn.close()


# -- what waits behind a held statement ----------------------------------------------------

@pytest.fixture(params=["inspecting", "fast-path"])
async def reviewing(request: pytest.FixtureRequest, gateway_factory: object,
                    pg: LocalPostgres, tmp_path: Path
                    ) -> AsyncIterator[tuple[RunningGateway, str]]:
    """The shipped policy (UPDATE ... WHERE is held for review) and a table to update;
    with audit and masking on (the relay's general path), or both off (its fast path)."""
    table = f"relay_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(pg.dsn())
    await conn.execute(f"create table {table} (id int primary key, note text)")
    await conn.execute(f"insert into {table} values (1, null)")
    folder = tmp_path / "policies"
    shutil.copytree(ROOT / "policies", folder)
    fast = request.param == "fast-path"
    if fast:
        (folder / "masking.yaml").unlink()
    gw = await gateway_factory("approvals:\n  timeout: 30s\n  poll_interval: 0.1\n",  # type: ignore
                               policies=folder, audit=not fast)
    gate = gw.gateway.gate  # type: ignore[attr-defined]
    assert fast != bool(gate.audits or gate.masks or gate.observes_results)
    try:
        yield gw, table
    finally:
        await conn.execute(f"drop table {table}")
        await conn.close()


async def test_pipelined_behind_a_hold_dies_with_the_client(
        reviewing: tuple[RunningGateway, str], pg: LocalPostgres) -> None:
    """Statements pipelined behind a held one wait in order; when the client goes away
    mid-hold the approval is withdrawn and nothing queued behind it runs."""
    gw, table = reviewing
    client = await RawClient.open(gw.port)
    reply = await client.login(gw.token())
    assert reply.messages[-1][0] == b"Z"
    await client.send(query(f"UPDATE {table} SET note = 'held' WHERE id = 1")
                      + query(f"INSERT INTO {table} VALUES (2, 'behind')"))
    mtype, payload = await client.read_message()
    assert mtype == b"N" and b"awaiting approval" in payload, payload
    broker = gw.gateway.broker  # type: ignore[attr-defined]
    assert len(list(broker.pending())) == 1
    await client.close()

    async def withdrawn() -> bool:
        return not list(broker.pending())
    await poll(withdrawn, 10, what="the approval to be withdrawn")

    async def gone() -> bool:
        return not gw.gateway.sessions  # type: ignore[attr-defined]
    await poll(gone, 10, what="the session to end")
    conn = await asyncpg.connect(pg.dsn())
    try:
        assert await conn.fetch(f"select id, note from {table} order by id") == [(1, None)]
    finally:
        await conn.close()


async def test_pipelined_behind_a_hold_runs_after_it(
        reviewing: tuple[RunningGateway, str], pg: LocalPostgres) -> None:
    """Approved: the held statement runs, then what was pipelined behind it, in order."""
    gw, table = reviewing
    client = await RawClient.open(gw.port)
    try:
        reply = await client.login(gw.token())
        assert reply.messages[-1][0] == b"Z"
        behind = query(f"SELECT note FROM {table} WHERE id = 1")
        await client.send(query(f"UPDATE {table} SET note = 'first' WHERE id = 1")
                          + behind[:-3])
        mtype, payload = await client.read_message()
        assert mtype == b"N" and b"awaiting approval" in payload, payload
        broker = gw.gateway.broker  # type: ignore[attr-defined]
        [held] = list(broker.pending())
        # The rest of the second Query arrives while the first is held.
        await client.send(behind[-3:])
        await broker.decide(held.id, "approved_once", "analyst-1")
        first = await client.read_until(b"Z", within=15)
        assert first.errors() == [] and b"C" in first.types()
        second = await client.read_until(b"Z", within=15)
        assert second.rows() == [["first"]], second.errors()
    finally:
        await client.close()


@pytest.fixture
async def blocking(gateway_factory: object, pg: LocalPostgres, tmp_path: Path
                   ) -> AsyncIterator[tuple[RunningGateway, str]]:
    """The shipped policy with every review made a block, audit off: the relay decides
    on its fast path (nothing records or masks)."""
    folder = tmp_path / "policies"
    shutil.copytree(ROOT / "policies", folder)
    (folder / "masking.yaml").unlink()  # (masking would take the general path)
    default = folder / "default.yaml"
    default.write_text(default.read_text().replace("action: review", "action: block")
                       .replace("default: review", "default: block"))
    table = f"relay_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(pg.dsn())
    await conn.execute(f"create table {table} (id int primary key, note text)")
    await conn.execute(f"insert into {table} values (1, null)")
    gw = await gateway_factory("", policies=folder)  # type: ignore[operator]
    gate = gw.gateway.gate  # type: ignore[attr-defined]
    assert not (gate.audits or gate.masks or gate.observes_results)
    try:
        yield gw, table
    finally:
        await conn.execute(f"drop table {table}")
        await conn.close()


async def test_blocked_statements_never_reach_the_server(
        blocking: tuple[RunningGateway, str], pg: LocalPostgres) -> None:
    """Refused on the fast path, in both protocols, even pipelined behind allowed
    statements: the client gets the refusal in order, the server never runs them."""
    gw, table = blocking
    client = await RawClient.open(gw.port)
    try:
        reply = await client.login(gw.token())
        assert reply.messages[-1][0] == b"Z"
        await client.send(query(f"SELECT note FROM {table} WHERE id = 1")
                          + query(f"UPDATE {table} SET note = 'simple' WHERE id = 1")
                          + query(f"SELECT coalesce(note, 'untouched') FROM {table}"))
        first = await client.read_until(b"Z")
        assert first.rows() == [[None]], first.errors()
        refused = await client.read_until(b"Z")
        [error] = refused.errors()
        assert error["C"] == "42501", error
        after = await client.read_until(b"Z")
        assert after.rows() == [["untouched"]], after.errors()
    finally:
        await client.close()
    conn = await asyncpg.connect(gw.dsn())
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(f"UPDATE {table} SET note = $1 WHERE id = $2", "extended", 1)
        assert await conn.fetchval("SELECT 'still serving'") == "still serving"
    finally:
        await conn.close()
    direct = await asyncpg.connect(pg.dsn())
    try:
        assert await direct.fetchval(f"select note from {table} where id = 1") is None
    finally:
        await direct.close()


# -- uvloop and TLS, as `hoopops serve` runs ----------------------------------------------

async def test_serve_on_uvloop_over_tls(tmp_path: Path, pg: LocalPostgres) -> None:
    """``hoopops serve`` (uvloop when installed) with TLS: psql over sslmode=require runs
    statements and COPY both ways, a direct TLS client is served; pgbench runs in every
    protocol mode."""
    pytest.importorskip("uvloop")
    port = free_port()
    cert, key = write_self_signed_cert(tmp_path)
    config = tmp_path / "hoopops.yaml"
    config.write_text(config_text({"appdb": pg.dsn()},
                                  f"tls:\n  cert: {cert}\n  key: {key}\n",
                                  listen=f"127.0.0.1:{port}"))
    proc = await asyncio.create_subprocess_exec(
        *HOOPOPS, "serve", "--config", str(config), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        async def up() -> bool:
            if proc.returncode is not None:
                raise AssertionError("hoopops serve exited early")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                return False
            writer.close()
            return True
        await poll(up, 20, 0.1, what="hoopops serve to listen")
        minted = await run([*HOOPOPS, "token", "mint", "--config", str(config), "--sub",
                            "tls-agent"])
        assert minted.returncode == 0, minted.stderr
        env = {**env_with(minted.stdout.strip()), "PGSSLMODE": "require"}
        table = f"relay_tls_{uuid.uuid4().hex[:8]}"
        script = (f"create table {table} (n int);\n"
                  f"\\copy {table} from stdin\n" + "".join(f"{i}\n" for i in range(5000))
                  + "\\.\n"
                  f"select count(*), sum(n) from {table};\n"
                  f"\\copy (select n from {table} order by n limit 3) to stdout\n"
                  f"drop table {table};\n")
        psql = psql_path(pg)
        done = await run(psql_args(psql, port, "-Atq", "-v", "ON_ERROR_STOP=1"), env=env,
                         stdin=script)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["5000|12497500", "0", "1", "2"], done.stdout
        # Direct TLS (sslnegotiation=direct: TLS from the first byte, ALPN postgresql).
        ctx = ssl.create_default_context(cafile=str(cert))
        ctx.set_alpn_protocols(["postgresql"])
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                                       server_hostname="localhost")
        direct = RawClient(reader, writer)
        try:
            reply = await direct.login(minted.stdout.strip())
            assert reply.types().endswith(b"Z"), reply.errors()
            await direct.send(query("select 'direct on uvloop'"))
            assert (await direct.read_until(b"Z")).rows() == [["direct on uvloop"]]
        finally:
            await direct.close()
        bench_script = tmp_path / "bench.sql"
        bench_script.write_text("\\set x random(1, 1000)\nselect :x::int * 2;\n")
        for mode in ("simple", "extended", "prepared"):
            # (the bundled pgbench has no TLS: plaintext from loopback is allowed)
            bench = await run([pg.tool("pgbench"), "-n", "-f", str(bench_script), "-c", "4",
                               "-j", "2", "-t", "200", "-M", mode, "-h", "127.0.0.1", "-p",
                               str(port), "-U", "agent", "appdb"],
                              env={**env, "PGSSLMODE": "disable"})
            assert bench.returncode == 0, (mode, bench.stderr)
            assert "number of transactions actually processed: 800/800" in bench.stdout
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        err = (await proc.stderr.read()).decode() if proc.stderr else ""
        assert "Traceback" not in err, err

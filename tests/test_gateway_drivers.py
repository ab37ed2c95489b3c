"""asyncpg and psycopg 3 through the gateway: everything their users rely on.

Binary and text formats, prepared statements, executemany, cursors (portal suspension and
server-side named cursors), pipeline mode, COPY in both directions, LISTEN/NOTIFY,
notices, ParameterStatus, and cancellation: the client's own cancel reaches the right
query, and a forged key cancels nothing.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import io
import json
import secrets
import uuid

import asyncpg
import psycopg
import pytest
from psycopg import errors as pgerr

from hoopops.devdb import LocalPostgres
from tests.clients.rawpg import send_cancel
from tests.clients.util import admin, poll, wait_active
from tests.conftest import RunningGateway


async def _asyncpg(gw: RunningGateway, **kwargs: object) -> asyncpg.Connection:
    return await asyncpg.connect(gw.dsn(), **kwargs)


async def _psycopg(gw: RunningGateway, **kwargs: object) -> psycopg.AsyncConnection:
    return await psycopg.AsyncConnection.connect(gw.dsn(), **kwargs)


# -- asyncpg ------------------------------------------------------------------------------


async def test_asyncpg_binary_types_and_prepared_statements(gateway: RunningGateway) -> None:
    conn = await _asyncpg(gateway)
    try:
        when = dt.datetime(2024, 2, 29, 12, 30, 15, 123456, tzinfo=dt.UTC)
        ident = uuid.uuid4()
        row = await conn.fetchrow(
            "select $1::int8 + 1 as n, $2::text as t, $3::numeric as d, $4::timestamptz as ts,"
            " $5::bytea as b, $6::uuid as u, $7::int4[] as a, $8::jsonb as j, $9::text as nul,"
            " $10::float8 as f",
            2**40, "héllo ✓", decimal.Decimal("12345.6789"), when, b"\x00\xff\x10",
            ident, [1, None, 3], json.dumps({"k": [1, 2]}), None, 1.5)
        assert row["n"] == 2**40 + 1
        assert row["t"] == "héllo ✓"
        assert row["d"] == decimal.Decimal("12345.6789")
        assert row["ts"] == when
        assert row["b"] == b"\x00\xff\x10"
        assert row["u"] == ident
        assert row["a"] == [1, None, 3]
        assert json.loads(row["j"]) == {"k": [1, 2]}
        assert row["nul"] is None
        assert row["f"] == 1.5

        stmt = await conn.prepare("select $1::int * $2::int")
        assert [await stmt.fetchval(i, i) for i in range(1, 6)] == [1, 4, 9, 16, 25]
        assert stmt.get_attributes()[0].type.name == "int4"
        # A prepared statement's error does not poison the next use.
        div = await conn.prepare("select 10 / $1::int")
        with pytest.raises(asyncpg.DivisionByZeroError):
            await div.fetchval(0)
        assert await div.fetchval(5) == 2
    finally:
        await conn.close()


async def test_asyncpg_executemany_transactions_and_errors(gateway: RunningGateway) -> None:
    conn = await _asyncpg(gateway)
    try:
        await conn.execute("create temp table em (id int primary key, v text)")
        await conn.executemany("insert into em values ($1, $2)",
                               [(i, f"v{i}") for i in range(1, 501)])
        assert await conn.fetchval("select count(*) from em") == 500
        # A failing executemany inside a transaction rolls back as a whole.
        with pytest.raises(asyncpg.UniqueViolationError):
            async with conn.transaction():
                await conn.executemany("insert into em values ($1, $2)",
                                       [(1000, "a"), (1001, "b"), (1, "dup")])
        assert await conn.fetchval("select count(*) from em") == 500
        # Errors in and out of a transaction keep the session usable.
        with pytest.raises(asyncpg.UndefinedTableError):
            await conn.fetch("select * from no_such_table")
        tx = conn.transaction()
        await tx.start()
        with pytest.raises(asyncpg.DivisionByZeroError):
            await conn.fetchval("select 1/0")
        with pytest.raises(asyncpg.InFailedSQLTransactionError):
            await conn.fetchval("select 1")
        await tx.rollback()
        assert await conn.fetchval("select 'fine'") == "fine"
    finally:
        await conn.close()


async def test_asyncpg_cursors(gateway: RunningGateway) -> None:
    conn = await _asyncpg(gateway)
    try:
        async with conn.transaction():
            total = 0
            count = 0
            async for record in conn.cursor("select g from generate_series(1, 5000) g",
                                             prefetch=64):
                total += record["g"]
                count += 1
            assert (count, total) == (5000, sum(range(1, 5001)))
            cur = await conn.cursor("select g from generate_series(1, 100) g")
            assert [r["g"] for r in await cur.fetch(3)] == [1, 2, 3]
            assert await cur.forward(10) == 10
            assert (await cur.fetchrow())["g"] == 14
        assert await conn.fetchval("select 1") == 1
    finally:
        await conn.close()


async def test_asyncpg_copy_records_and_copy_from_query(gateway: RunningGateway) -> None:
    conn = await _asyncpg(gateway)
    try:
        await conn.execute("create temp table cp (id int, name text, at date)")
        records = [(i, f"name-{i}", dt.date(2024, 1, 1) + dt.timedelta(days=i % 365))
                   for i in range(4000)]
        result = await conn.copy_records_to_table("cp", records=records)
        assert result == "COPY 4000"
        assert await conn.fetchval("select count(*) from cp") == 4000
        out = io.BytesIO()
        result = await conn.copy_from_query("select id, name from cp where id < $1 order by id",
                                            3, output=out, format="csv")
        assert result == "COPY 3"
        assert out.getvalue().decode() == "0,name-0\n1,name-1\n2,name-2\n"
        buf = io.BytesIO()
        await conn.copy_from_table("cp", output=buf, columns=["id"], format="text")
        assert sorted(int(x) for x in buf.getvalue().split()) == list(range(4000))
        await conn.copy_to_table("cp", source=io.BytesIO(b"9000\tcsv\t2020-01-01\n"),
                                 format="text")
        assert await conn.fetchval("select name from cp where id = 9000") == "csv"
    finally:
        await conn.close()


async def test_asyncpg_listen_notify(gateway: RunningGateway) -> None:
    listener = await _asyncpg(gateway)
    sender = await _asyncpg(gateway)
    got: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    try:
        await listener.add_listener("hoopops_chan",
                                    lambda _c, _pid, channel, payload:
                                    got.put_nowait((channel, payload)))
        await sender.execute("notify hoopops_chan, 'first'")
        await sender.execute("select pg_notify('hoopops_chan', 'second')")
        assert await asyncio.wait_for(got.get(), 5) == ("hoopops_chan", "first")
        assert await asyncio.wait_for(got.get(), 5) == ("hoopops_chan", "second")
        # The listener stays a normal connection while notifications arrive.
        assert await listener.fetchval("select 7") == 7
    finally:
        await listener.close()
        await sender.close()


async def test_asyncpg_notice_and_log_listener(gateway: RunningGateway) -> None:
    conn = await _asyncpg(gateway)
    notices: list[str] = []
    try:
        conn.add_log_listener(lambda _c, msg: notices.append(msg.message))
        await conn.execute("do $$ begin raise notice 'notice one'; "
                           "raise warning 'warning two'; end $$")
        await poll(lambda: asyncio.sleep(0, len(notices) >= 2), 5, what="both notices")
        assert notices == ["notice one", "warning two"]
    finally:
        await conn.close()


async def test_asyncpg_command_timeout_cancels_on_the_server(gateway: RunningGateway,
                                                             pg: LocalPostgres) -> None:
    conn = await _asyncpg(gateway, command_timeout=1)
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(asyncio.TimeoutError):
            await conn.fetch("select pg_sleep(30) /* asyncpg-timeout */")
        assert loop.time() - started < 5
        assert await conn.fetchval("select 'usable'") == "usable"
        check = await admin(pg)
        try:
            async def stopped() -> bool:
                return not await check.fetchval(
                    "select count(*) from pg_stat_activity where state = 'active' and "
                    "query like '%asyncpg-timeout%' and pid <> pg_backend_pid()")
            await poll(stopped, 5, what="the server to stop the timed-out statement")
        finally:
            await check.close()
    finally:
        await conn.close()


# -- psycopg 3 ----------------------------------------------------------------------------


async def test_psycopg_text_and_binary(gateway: RunningGateway) -> None:
    async with await _psycopg(gateway) as conn:
        values = (42, "text ✓", decimal.Decimal("-1.50"), dt.date(2000, 1, 2),
                  b"\x01\x02", [1, 2, 3], None, True)
        sql = ("select %s::int, %s::text, %s::numeric, %s::date, %s::bytea, %s::int[], "
               "%s::text, %s::bool")
        for binary in (False, True):
            async with conn.cursor(binary=binary) as cur:
                await cur.execute(sql, values)
                assert await cur.fetchone() == values
                fmt = cur.pgresult.fformat(0) if cur.pgresult else None
                assert fmt == (1 if binary else 0)
        cur = conn.cursor()
        await cur.execute("select g, g::text from generate_series(1, 1000) g")
        rows = await cur.fetchall()
        assert len(rows) == 1000 and rows[-1] == (1000, "1000")
        await cur.executemany("select %s::int", [(i,) for i in range(10)])
        with pytest.raises(pgerr.DivisionByZero):
            await cur.execute("select 1/0")
        await conn.rollback()
        await cur.execute("select 'after'")
        assert await cur.fetchone() == ("after",)


async def test_psycopg_pipeline_mode(gateway: RunningGateway) -> None:
    async with await _psycopg(gateway, autocommit=True) as conn:
        await conn.execute("create temp table pl (id int primary key, v text)")
        async with conn.pipeline():
            cur = conn.cursor()
            for i in range(200):
                await cur.execute("insert into pl values (%s, %s)", (i, f"v{i}"))
            q1 = await conn.execute("select count(*) from pl")
            q2 = await conn.execute("select v from pl where id = %s", (199,))
            q3 = await conn.execute("select sum(id) from pl", binary=True)
        assert await q1.fetchone() == (200,)
        assert await q2.fetchone() == ("v199",)
        assert await q3.fetchone() == (sum(range(200)),)
        # An error inside a pipeline aborts up to the sync; the connection goes on.
        with pytest.raises(pgerr.UniqueViolation):
            async with conn.pipeline():
                await conn.execute("insert into pl values (1, 'dup')")
                await conn.execute("select 1")
        async with conn.pipeline():
            after = await conn.execute("select count(*) from pl")
        assert await after.fetchone() == (200,)


async def test_psycopg_server_side_cursor(gateway: RunningGateway) -> None:
    async with await _psycopg(gateway) as conn:
        async with conn.cursor(name="big_cursor") as cur:
            cur.itersize = 250
            await cur.execute("select g, repeat('x', 100) from generate_series(1, 20000) g")
            first = await cur.fetchmany(10)
            assert [r[0] for r in first] == list(range(1, 11))
            await cur.scroll(90)
            assert (await cur.fetchone())[0] == 101
            count = 0
            async for _row in cur:
                count += 1
            assert count == 20000 - 101
        async with conn.cursor(name="bin_cursor", binary=True) as cur:
            await cur.execute("select %s::int + g from generate_series(1, 5) g", (10,))
            assert [r[0] for r in await cur.fetchall()] == [11, 12, 13, 14, 15]
        await conn.commit()


async def test_psycopg_copy_both_ways(gateway: RunningGateway) -> None:
    async with await _psycopg(gateway) as conn:
        cur = conn.cursor()
        await cur.execute("create temp table pc (id int, label text, amount numeric)")
        async with cur.copy("copy pc (id, label, amount) from stdin") as copy:
            for i in range(3000):
                await copy.write_row((i, f"label\t{i}", decimal.Decimal(i) / 4))
        assert cur.rowcount == 3000
        async with cur.copy("copy (select id, label from pc order by id) to stdout") as copy:
            got = [row async for row in copy.rows()]
        assert len(got) == 3000
        assert got[5] == ("5", "label\t5")
        # Binary COPY, both ways.
        async with cur.copy("copy pc (id, label, amount) from stdin (format binary)") as copy:
            copy.set_types(["int4", "text", "numeric"])
            for i in range(3000, 3100):
                await copy.write_row((i, "bin", decimal.Decimal("0.5")))
        async with cur.copy("copy (select id, amount from pc where id >= 3000 order by id) "
                            "to stdout (format binary)") as copy:
            copy.set_types(["int4", "numeric"])
            binrows = [row async for row in copy.rows()]
        assert binrows[0] == (3000, decimal.Decimal("0.5")) and len(binrows) == 100
        await conn.commit()
        await cur.execute("select count(*) from pc")
        assert await cur.fetchone() == (3100,)


async def test_psycopg_notifies(gateway: RunningGateway) -> None:
    async with await _psycopg(gateway, autocommit=True) as listener, \
            await _psycopg(gateway, autocommit=True) as sender:
        await listener.execute("listen psy_chan")
        await sender.execute("notify psy_chan, 'payload-1'")
        received = [n async for n in listener.notifies(timeout=5, stop_after=1)]
        assert [(n.channel, n.payload) for n in received] == [("psy_chan", "payload-1")]
        assert received[0].pid == sender.info.backend_pid or received[0].pid > 0


async def test_psycopg_notice_and_parameter_status(gateway: RunningGateway) -> None:
    async with await _psycopg(gateway, autocommit=True,
                              application_name="agent-startup") as conn:
        assert conn.info.parameter_status("application_name") == "agent-startup"
        notices: list[str] = []
        conn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
        await conn.execute("do $$ begin raise notice 'psycopg sees this'; end $$")
        assert notices == ["psycopg sees this"]
        await conn.execute("set application_name = 'renamed-agent'")
        assert conn.info.parameter_status("application_name") == "renamed-agent"
        await conn.execute("set timezone = 'Asia/Tokyo'")
        assert conn.info.parameter_status("TimeZone") == "Asia/Tokyo"
        cur = await conn.execute("select now()")
        ts = (await cur.fetchone())[0]
        assert ts.utcoffset() == dt.timedelta(hours=9)
        cur = await conn.execute("select current_setting('application_name')")
        assert await cur.fetchone() == ("renamed-agent",)


async def test_psycopg_cancel_running_query(gateway: RunningGateway,
                                            pg: LocalPostgres) -> None:
    async with await _psycopg(gateway, autocommit=True) as conn:
        loop = asyncio.get_running_loop()
        task = asyncio.create_task(conn.execute("select pg_sleep(30) /* psy-cancel */"))
        await wait_active(pg, "psy-cancel")
        started = loop.time()
        await conn.cancel_safe()
        with pytest.raises(pgerr.QueryCanceled) as info:
            await asyncio.wait_for(task, 10)
        assert loop.time() - started < 5
        assert info.value.sqlstate == "57014"
        cur = await conn.execute("select 'usable after cancel'")
        assert await cur.fetchone() == ("usable after cancel",)
        # (The blocking PQcancel path is psql's Ctrl-C: see test_gateway_psql. psycopg's
        # conn.cancel() holds the GIL while it waits, so it cannot be driven against a
        # gateway running in this same process.)


async def test_client_sees_gateway_cancel_key_not_upstream(gateway: RunningGateway) -> None:
    async with await _psycopg(gateway) as conn:
        cur = await conn.execute("select pg_backend_pid()")
        (server_pid,) = await cur.fetchone()
        assert conn.info.backend_pid != server_pid


async def test_forged_cancel_key_cancels_nothing(gateway: RunningGateway,
                                                 pg: LocalPostgres) -> None:
    async with await _psycopg(gateway, autocommit=True) as conn:
        gateway_pid = conn.info.backend_pid
        cur = await conn.execute("select pg_backend_pid()")
        (server_pid,) = await cur.fetchone()
        task = asyncio.create_task(
            conn.execute("select pg_sleep(1.5), 'completed' /* forged-cancel */"))
        await wait_active(pg, "forged-cancel")
        # Right gateway pid, wrong key; the real server pid with a guessed key; and a
        # random pid. Each CancelRequest is fully handled when send_cancel returns.
        await send_cancel(gateway.port, gateway_pid, secrets.token_bytes(4))
        await send_cancel(gateway.port, server_pid, secrets.token_bytes(4))
        await send_cancel(gateway.port, secrets.randbits(31), secrets.token_bytes(4))
        cur = await asyncio.wait_for(task, 10)
        assert await cur.fetchone() == ("", "completed")



async def test_copy_in_over_extended_protocol(gateway: RunningGateway) -> None:
    """COPY FROM STDIN sent as Parse/Bind/Execute/Sync, the way libpq's PQexecParams and
    tokio-postgres do it: the server ignores Sync during copy-in, so libpq sends a second
    one after CopyDone and gets a single ReadyForQuery. The relay must stay in step."""
    from tests.clients.rawpg import RawClient, message

    raw = await RawClient.open(gateway.port)
    try:
        assert (await raw.login(gateway.token())).types().endswith(b"Z")
        assert (await raw.simple("create temp table xc (id int, v text)")).errors() == []
        for rows, finish in ((b"1\ta\n2\tb\n", message(b"c")),
                             (b"3\tc\n", message(b"f", b"client gave up\0"))):
            await raw.send(message(b"P", b"\0copy xc from stdin\0\0\0")
                           + message(b"B", b"\0\0" + b"\0\0" * 3)
                           + message(b"E", b"\0\0\0\0\0") + message(b"S"))
            reply = await raw.read_until(b"G")
            assert reply.types() == b"12G", reply.types()
            await raw.send(message(b"d", rows) + finish + message(b"S"))
            reply = await raw.read_until(b"Z")
            if finish[:1] == b"c":
                assert reply.types() == b"CZ", reply.types()
            else:
                assert reply.types() == b"EZ" and "client gave up" in reply.errors()[0]["M"]
        # Extended and simple queries afterwards are answered in step.
        await raw.send(message(b"P", b"\0select count(*)::text from xc\0\0\0")
                       + message(b"B", b"\0\0" + b"\0\0" * 3) + message(b"D", b"P\0")
                       + message(b"E", b"\0\0\0\0\0") + message(b"S"))
        reply = await raw.read_until(b"Z")
        assert reply.types() == b"12TDCZ", reply.types()
        assert reply.rows() == [["2"]]
        assert (await raw.simple("select 'in step'")).rows() == [["in step"]]
    finally:
        await raw.close()


async def test_server_terminating_the_backend_reaches_the_client(gateway: RunningGateway,
                                                                 pg: LocalPostgres) -> None:
    async with await _psycopg(gateway, autocommit=True) as conn:
        cur = await conn.execute("select pg_backend_pid()")
        (server_pid,) = await cur.fetchone()
        check = await admin(pg)
        try:
            assert await check.fetchval("select pg_terminate_backend($1)", server_pid)
        finally:
            await check.close()
        with pytest.raises(psycopg.OperationalError) as info:
            for _ in range(50):  # the FATAL arrives asynchronously
                await conn.execute("select 1")
                await asyncio.sleep(0.1)
        assert "terminating connection due to administrator command" in str(info.value)
    await (await _asyncpg(gateway)).close()  # the gateway itself is fine


async def test_session_events_published(gateway: RunningGateway) -> None:
    from hoopops import events

    bus = gateway.gateway.bus  # type: ignore[attr-defined]
    sub = bus.subscribe([events.SESSION_STARTED, events.SESSION_ENDED])
    try:
        conn = await _asyncpg(gateway, server_settings={"application_name": "evt-app"})
        await conn.fetchval("select 1")
        await conn.fetchval("select 2")
        await conn.close()
        started = await asyncio.wait_for(sub.get(), 5)
        ended = await asyncio.wait_for(sub.get(), 5)
        assert started.kind == events.SESSION_STARTED
        assert started.data["subject"] == "agent-1"
        assert started.data["application"] == "evt-app"
        assert started.data["target"] == "appdb"
        assert started.data["client"].startswith("127.0.0.1:")
        assert ended.kind == events.SESSION_ENDED
        assert ended.data["session_id"] == started.data["session_id"]
        assert ended.data["statements"] >= 2
        assert ended.data["bytes_in"] > 0 and ended.data["bytes_out"] > 0
        assert ended.data["reason"] == "client terminated the session"
    finally:
        sub.close()

"""Issue 3, end to end: statements decided by policy through the real gateway.

Everything is real: ``build_gateway`` with a copy of the shipped policy folder, the real
PostgreSQL, and the clients agents use (psql, asyncpg, psycopg) plus a raw-socket
frontend for extended-protocol pipelines. Most tests use the *strict* copy of the shipped
policy, where every ``review`` is a ``block`` (same rules, same ids, no human to wait for);
the ``review`` path itself runs against the unmodified copy with a 2 s approval timeout.

After every refusal the session must still be usable and the client and the server must
agree on the transaction state: a refusal inside a transaction block aborts it exactly
as a server error would, and a refusal in a pipeline rolls back the statements before it
in the same implicit transaction and skips those after it up to Sync. Those pipelines are
compared message by message with the same pipeline sent straight to PostgreSQL with a
real error in place of the refused statement.

Two regressions found here are pinned too: sessions asking the catalog about the same
hidden write at the same moment (one used to take another's half-finished answer as "no
effect"), and a cycle of functions (the inner one used to be cached without the write
it reaches); and statements prepared before a policy reload are judged under the new one.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import struct
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import psycopg
import pytest
import yaml
from psycopg import errors as pgerr
from psycopg.pq import TransactionStatus

from hoopops.config import load_config
from hoopops.devdb import SERVICE_USER, LocalPostgres
from hoopops.proxy import protocol as p
from hoopops.proxy.upstream import connect as upstream_connect
from tests.clients.rawpg import RawClient, error_fields
from tests.clients.util import poll, psql_args, run
from tests.conftest import RunningGateway, psql_path, write_config

POLICIES = Path(__file__).resolve().parent.parent / "policies"
DESCRIPTIONS = {rule["id"]: rule["description"] for rule in
                yaml.safe_load((POLICIES / "default.yaml").read_text())["rules"]}

# Rules of the test folder, tried before the shipped ones (file-name order): the tests
# need to insert rows into their own tables to see them rolled back.
E2E_RULES = """\
rules:
  - id: e2e-inserts
    description: Inserts into the test tables run
    when: {statement_types: [InsertStmt], tables_written: ["e2e_*"]}
    unless: {dangerous: true}
    action: allow
"""

# Fields of an ErrorResponse that would show the gateway's machinery (the injected DO
# block) rather than the refusal itself.
INTERNALS = ("$hoopops$", "RAISE", "DO $", "PL/pgSQL", "statement_types", "tables_written",
             "when:", "inline_code_block")


# -- helpers -------------------------------------------------------------------------------


def policy_folder(root: Path, name: str = "policies", *, strict: bool = True,
                  extra: dict[str, str] | None = None) -> Path:
    """A copy of the shipped folder (strict: every review becomes a block)."""
    folder = root / name
    shutil.copytree(POLICIES, folder)
    if strict:
        default = folder / "default.yaml"
        text = default.read_text()
        assert "action: review" in text and "default: review" in text
        default.write_text(text.replace("action: review", "action: block")
                           .replace("default: review", "default: block"))
    (folder / "00-e2e.yaml").write_text(E2E_RULES)
    for file_name, text in (extra or {}).items():
        (folder / file_name).write_text(text)
    return folder


def refused(rule: str) -> str:
    """The message a client sees for a statement refused by ``rule`` of default.yaml."""
    return f"rule {rule}: {DESCRIPTIONS[rule]}"


def assert_refusal(message: str, rule: str, *, detail: str | None = None) -> None:
    if rule.startswith("builtin:"):
        assert f"rule {rule}" in message, message
    else:
        assert refused(rule) in message, message
    assert message.startswith("hoopops blocked this statement ("), message
    if detail is not None:
        assert detail in message, message
    for noise in INTERNALS:
        assert noise not in message, message


def assert_clean_diag(exc: psycopg.Error, rule: str) -> None:
    """A psycopg error that is the refusal and nothing of the DO block behind it."""
    diag = exc.diag
    assert diag.sqlstate == "42501", (diag.sqlstate, diag.message_primary)
    assert_refusal(diag.message_primary or "", rule)
    assert diag.context is None
    assert diag.internal_query is None
    assert diag.statement_position is None
    assert diag.source_function is None and diag.source_file is None


async def sh(pg: LocalPostgres, sql: str, user: str = "postgres") -> str:
    """Run SQL straight on the server (not through the gateway)."""
    return (await asyncio.to_thread(pg.psql, sql, "app", user)).strip()


async def make_table(pg: LocalPostgres, rows: int = 3) -> str:
    name = f"e2e_{uuid.uuid4().hex[:10]}"
    await sh(pg, f"CREATE TABLE {name} (id int PRIMARY KEY, v text); INSERT INTO {name} "
                 f"SELECT g, 'v' || g FROM generate_series(1, {rows}) g", SERVICE_USER)
    return name


async def ids(pg: LocalPostgres, table: str) -> str:
    return await sh(pg, f"SELECT coalesce(string_agg(id::text, ',' ORDER BY id), '') "
                        f"FROM {table}")


async def start(factory: object, folder: Path, extra: str = "", audit: bool = False
                ) -> RunningGateway:
    return await factory(extra, policies=folder, audit=audit)  # type: ignore[operator]


@pytest.fixture(scope="module")
async def strict(tmp_path_factory: pytest.TempPathFactory, pg: LocalPostgres
                 ) -> AsyncIterator[RunningGateway]:
    """One gateway on the strict copy of the shipped policy for the read-only cases."""
    from hoopops.gateway import build_gateway

    root = tmp_path_factory.mktemp("strict")
    config = load_config(write_config(root, pg, "", policy_folder(root)))
    gateway = await build_gateway(config)
    await gateway.start()
    try:
        yield RunningGateway(gateway, config, gateway.port)
    finally:
        await gateway.stop(grace=1)


# -- raw extended-protocol pipelines ---------------------------------------------------------


def peb(sql: str, name: str = "", params: tuple[str, ...] = ()) -> bytes:
    """Parse, Bind, Describe (portal), Execute: one statement of a pipeline."""
    bind = (p.cstr("") + p.cstr(name) + struct.pack("!h", 0) + struct.pack("!h", len(params))
            + b"".join(struct.pack("!i", len(v.encode())) + v.encode() for v in params)
            + struct.pack("!h", 0))
    return (p.parse_message(name, sql) + p.frame(p.BIND, bind) + p.frame(p.DESCRIBE, b"P\0")
            + p.execute_message(""))


SYNC = p.SYNC_MESSAGE


def summary(messages: list[tuple[bytes, bytes]]) -> list[str]:
    """What a client can observe, error texts left out: types, tags, rows, statuses."""
    out = []
    for mtype, payload in messages:
        if mtype in (b"N", b"S"):
            continue
        if mtype == b"E":
            out.append("E")
        elif mtype == b"C":
            out.append("C:" + payload.rstrip(b"\0").decode())
        elif mtype == b"Z":
            out.append("Z:" + payload.decode())
        elif mtype == b"D":
            (count,) = struct.unpack_from("!h", payload)
            pos, row = 2, []
            for _ in range(count):
                (size,) = struct.unpack_from("!i", payload, pos)
                pos += 4
                row.append(None if size < 0 else payload[pos:pos + size].decode())
                pos += max(size, 0)
            out.append(f"D:{row}")
        else:
            out.append(mtype.decode())
    return out


async def exchange(client: RawClient, data: bytes, ready: int) -> tuple[list[str],
                                                                        list[dict[str, str]]]:
    """Send ``data``; read until ``ready`` ReadyForQuery messages came back."""
    await client.send(data)
    messages: list[tuple[bytes, bytes]] = []
    for _ in range(ready):
        reply = await client.read_until(b"Z", within=15)
        assert not reply.closed, summary(messages + reply.messages)
        messages += reply.messages
    return summary(messages), [error_fields(x) for t, x in messages if t == b"E"]


async def raw_gateway(gw: RunningGateway) -> RawClient:
    client = await RawClient.open(gw.port)
    reply = await client.login(gw.token())
    assert reply.types().endswith(b"Z"), reply.types()
    return client


async def raw_direct(gw: RunningGateway) -> RawClient:
    """A raw connection straight to PostgreSQL (SCRAM done by the gateway's own code)."""
    conn = await upstream_connect(gw.config.targets["appdb"].upstream, "appdb", {})
    return RawClient(conn.reader, conn.writer)


# -- psycopg -----------------------------------------------------------------------------------


async def test_psycopg_refusals_outside_and_inside_a_transaction(
        gateway_factory: object, pg: LocalPostgres, tmp_path: Path) -> None:
    gw = await start(gateway_factory, policy_folder(tmp_path))
    table = await make_table(pg)
    async with await psycopg.AsyncConnection.connect(gw.dsn(), autocommit=True) as conn:
        # Simple query protocol (no parameters) and extended (parameters).
        with pytest.raises(pgerr.InsufficientPrivilege) as info:
            await conn.execute(f"DELETE FROM {table} WHERE id = 1")
        assert_clean_diag(info.value, "writes-need-review")
        assert conn.info.transaction_status == TransactionStatus.IDLE
        with pytest.raises(pgerr.InsufficientPrivilege) as info:
            await conn.execute(f"DELETE FROM {table} WHERE id = %s", (1,))
        assert_clean_diag(info.value, "writes-need-review")
        assert conn.info.transaction_status == TransactionStatus.IDLE
        cur = await conn.execute(f"SELECT count(*) FROM {table} WHERE id > %s", (0,))
        assert await cur.fetchone() == (3,)
        cur = await conn.execute("SELECT 'still usable'")
        assert await cur.fetchone() == ("still usable",)

    for params in (False, True):
        async with await psycopg.AsyncConnection.connect(gw.dsn()) as conn:
            await conn.execute(f"INSERT INTO {table} VALUES (100, 'new')")
            assert conn.info.transaction_status == TransactionStatus.INTRANS
            with pytest.raises(pgerr.InsufficientPrivilege) as info:
                if params:
                    await conn.execute(f"DELETE FROM {table} WHERE id = %s", (2,))
                else:
                    await conn.execute(f"DELETE FROM {table} WHERE id = 2")
            assert_clean_diag(info.value, "writes-need-review")
            assert conn.info.transaction_status == TransactionStatus.INERROR
            with pytest.raises(pgerr.InFailedSqlTransaction):
                await conn.execute("SELECT 1")
            with pytest.raises(pgerr.InFailedSqlTransaction):
                await conn.execute("SELECT %s::int", (1,))
            await conn.rollback()
            assert conn.info.transaction_status == TransactionStatus.IDLE
            cur = await conn.execute(f"SELECT count(*) FROM {table}")
            assert await cur.fetchone() == (3,)
        assert await ids(pg, table) == "1,2,3"


async def test_psycopg_pipeline_matches_a_server_error(
        gateway_factory: object, pg: LocalPostgres, tmp_path: Path) -> None:
    """psycopg's pipeline mode: the refusal behaves as a server error in its place."""
    gw = await start(gateway_factory, policy_folder(tmp_path))
    through, direct = await make_table(pg, 0), await make_table(pg, 0)

    async def pipeline(dsn: str, table: str, bad: str) -> tuple[type[BaseException], str]:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            caught: BaseException | None = None
            try:
                async with conn.pipeline() as pipe:
                    await conn.execute(f"INSERT INTO {table} VALUES (%s, 'a')", (1,))
                    await conn.execute(f"INSERT INTO {table} VALUES (%s, 'b')", (2,))
                    await pipe.sync()
                    await conn.execute(f"INSERT INTO {table} VALUES (%s, 'c')", (3,))
                    await conn.execute(bad, (1,))
                    await conn.execute(f"INSERT INTO {table} VALUES (%s, 'd')", (4,))
                    await pipe.sync()
                    await conn.execute(f"INSERT INTO {table} VALUES (%s, 'e')", (5,))
            except psycopg.Error as exc:
                caught = exc
            assert caught is not None
            assert conn.info.transaction_status == TransactionStatus.IDLE
            # The session goes on, in and out of pipeline mode.
            async with conn.pipeline():
                cur = await conn.execute(f"SELECT count(*) FROM {table} WHERE id > %s", (0,))
            count = await cur.fetchone()
            cur = await conn.execute("SELECT 'on'")
            assert await cur.fetchone() == ("on",)
            rows = await ids(pg, table)
            assert count == (len(rows.split(",")),)
            return type(caught), rows

    got = await pipeline(gw.dsn(), through, f"DELETE FROM {through} WHERE id = %s")
    want = await pipeline(pg.dsn(), direct, "SELECT * FROM e2e_no_such_table WHERE 1 = %s")
    assert want[0] is pgerr.UndefinedTable
    assert got[0] is pgerr.InsufficientPrivilege
    # 1 and 2 were committed at the first Sync; 3 ran and was rolled back with the error;
    # 4 never ran; psycopg raises at the second Sync, so 5 was never sent.
    assert want[1] == "1,2"
    assert got[1] == want[1]


# -- raw extended-protocol pipelines ---------------------------------------------------------


async def test_raw_pipelines_match_a_server_error(strict: RunningGateway, pg: LocalPostgres
                                                  ) -> None:
    """Several Parse/Bind/Execute before Sync, refused in the middle, compared message by
    message with PostgreSQL raising a real error (at Parse) in the refused statement's
    place: same replies, same rollback, same transaction status."""
    cases = {
        "implicit transaction": lambda t, bad: (
            peb(f"INSERT INTO {t} VALUES (1, 'a')") + SYNC
            + peb(f"INSERT INTO {t} VALUES (2, 'b')") + peb(bad)
            + peb(f"INSERT INTO {t} VALUES (3, 'c')") + SYNC
            + peb(f"SELECT string_agg(id::text, ',' ORDER BY id) FROM {t}") + SYNC, 3),
        "named statements": lambda t, bad: (
            peb(f"INSERT INTO {t} VALUES (1, 'a')", "s_ins") + peb(bad, "s_bad")
            + peb("SELECT 'skipped'", "s_sel") + SYNC
            + peb(f"SELECT count(*) FROM {t}", "s_sel") + SYNC, 2),
        "explicit transaction": lambda t, bad: (
            p.query("BEGIN") + peb(f"INSERT INTO {t} VALUES (1, 'a')") + peb(bad)
            + peb(f"INSERT INTO {t} VALUES (3, 'c')") + SYNC + p.query("SELECT 1")
            + peb("SELECT 2") + SYNC + p.query("ROLLBACK")
            + peb(f"SELECT count(*) FROM {t}") + SYNC, 6),
        "flush before the refusal": lambda t, bad: (
            peb(f"INSERT INTO {t} VALUES (1, 'a')") + p.FLUSH_MESSAGE + peb(bad)
            + p.FLUSH_MESSAGE + peb("SELECT 'skipped'") + SYNC + p.query(
                f"SELECT count(*) FROM {t}"), 2),
    }
    for name, build in cases.items():
        through_table, direct_table = await make_table(pg, 0), await make_table(pg, 0)
        client = await raw_gateway(strict)
        direct = await raw_direct(strict)
        try:
            data, ready = build(through_table, f"DELETE FROM {through_table} WHERE id = 1")
            got, got_errors = await exchange(client, data, ready)
            data, ready = build(direct_table, "SELECT * FROM e2e_no_such_table")
            want, want_errors = await exchange(direct, data, ready)
            assert got == want, name
            got_codes, want_codes = [e["C"] for e in got_errors], [e["C"] for e in want_errors]
            assert (got_codes[0], want_codes[0]) == ("42501", "42P01"), name
            assert got_codes[1:] == want_codes[1:], name
            assert_refusal(got_errors[0]["M"], "writes-need-review")
            assert not {"W", "q", "P", "F", "L", "R"} & set(got_errors[0]), got_errors[0]
            # And the session goes on.
            assert (await exchange(client, p.query("SELECT 'on'"), 1))[0][-3:] == [
                "D:['on']", "C:SELECT 1", "Z:I"]
        finally:
            await client.close()
            await direct.close()
        assert await ids(pg, through_table) == await ids(pg, direct_table), name


# -- asyncpg -----------------------------------------------------------------------------------


async def test_asyncpg_refusals_prepared_executemany_and_transactions(
        strict: RunningGateway, pg: LocalPostgres) -> None:
    table = await make_table(pg)
    conn = await asyncpg.connect(strict.dsn())
    try:
        # Simple protocol (execute without arguments), extended (fetch), prepared, many.
        with pytest.raises(asyncpg.InsufficientPrivilegeError) as info:
            await conn.execute(f"DELETE FROM {table} WHERE id = 1")
        assert_refusal(str(info.value), "writes-need-review")
        with pytest.raises(asyncpg.InsufficientPrivilegeError) as info:
            await conn.fetch(f"DELETE FROM {table} WHERE id = $1 RETURNING id", 1)
        assert_refusal(str(info.value), "writes-need-review")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.prepare(f"UPDATE {table} SET v = $1 WHERE id = $2")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.executemany(f"DELETE FROM {table} WHERE id = $1", [(1,), (2,), (3,)])
        stmt = await conn.prepare(f"SELECT v FROM {table} WHERE id = $1")
        assert [await stmt.fetchval(i) for i in (1, 2, 3)] == ["v1", "v2", "v3"]
        assert not conn.is_in_transaction()

        for protocol in ("simple", "extended", "executemany"):
            tx = conn.transaction()
            await tx.start()
            await conn.executemany(f"INSERT INTO {table} VALUES ($1, $2)",
                                   [(10, "x"), (11, "y")])
            await conn.execute(f"INSERT INTO {table} VALUES (12, 'z')")
            with pytest.raises(asyncpg.InsufficientPrivilegeError) as info:
                if protocol == "simple":
                    await conn.execute(f"DELETE FROM {table}")
                elif protocol == "extended":
                    await conn.fetchval(f"DELETE FROM {table} WHERE id = $1 RETURNING 1", 1)
                else:
                    await conn.executemany(f"UPDATE {table} SET v = $1", [("a",), ("b",)])
            rule = ("unbounded-writes-need-review" if protocol != "extended"
                    else "writes-need-review")
            assert_refusal(str(info.value), rule)
            with pytest.raises(asyncpg.InFailedSQLTransactionError):
                await conn.fetchval("SELECT 1")
            with pytest.raises(asyncpg.InFailedSQLTransactionError):
                await conn.execute("SELECT 1")
            await tx.rollback()
            assert not conn.is_in_transaction()
            assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 3
        assert await stmt.fetchval(2) == "v2"
    finally:
        await conn.close()
    assert await ids(pg, table) == "1,2,3"


# -- psql --------------------------------------------------------------------------------------


async def test_psql_refusals_transactions_and_multistatement_strings(
        strict: RunningGateway, pg: LocalPostgres) -> None:
    table = await make_table(pg)
    script = f"""
select 'start';
delete from {table} where id = 1;
select 'after a refusal';
begin;
insert into {table} values (10, 'ten');
delete from {table} where id = 1;
select 'not run: transaction aborted';
rollback;
select count(*) from {table};
select 1 \\; drop table {table};
select 'x' \\; delete from {table} where id = 2 \\; select 'y';
commit \\; drop table {table};
select count(*) from {table};
"""
    done = await run(psql_args(psql_path(pg), strict.port, "-At", "-v", "VERBOSITY=verbose"),
                     env=strict.env(), stdin=script)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "start", "after a refusal", "BEGIN", "INSERT 0 1", "ROLLBACK", "3", "3"], done.stdout
    errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR:")]
    writes = refused("writes-need-review")
    ddl = refused("ddl-needs-review")
    assert errors == [
        f"ERROR:  42501: hoopops blocked this statement ({writes})",
        f"ERROR:  42501: hoopops blocked this statement ({writes})",
        "ERROR:  25P02: current transaction is aborted, commands ignored until end of "
        "transaction block",
        f"ERROR:  42501: hoopops blocked this statement (statement 2 of 2: {ddl})",
        f"ERROR:  42501: hoopops blocked this statement (statement 2 of 3: {writes})",
        f"ERROR:  42501: hoopops blocked this statement (statement 2 of 2: {ddl})",
    ], done.stderr
    # Nothing of the injected DO block shows (only the server's own 25P02 has a location).
    assert "CONTEXT" not in done.stderr, done.stderr
    assert done.stderr.count("LOCATION") == 1, done.stderr
    assert "HINT:  policy version" in done.stderr
    assert await ids(pg, table) == "1,2,3"


async def test_psql_extended_protocol_bind(strict: RunningGateway, pg: LocalPostgres) -> None:
    """psql's ``\\bind`` (libpq's extended protocol), bundled psql 18."""
    table = await make_table(pg)
    script = f"""
select $1::int + 1 \\bind 41 \\g
delete from {table} where id = $1 \\bind 1 \\g
begin;
insert into {table} values ($1, 'b') \\bind 20 \\g
delete from {table} where id = $1 \\bind 2 \\g
select $1 \\bind 'not run' \\g
rollback;
select count(*) from {table} where id > $1 \\bind 0 \\g
"""
    done = await run(psql_args(pg.tool("psql"), strict.port, "-At"), env=strict.env(),
                     stdin=script)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["42", "BEGIN", "INSERT 0 1", "ROLLBACK", "3"], \
        done.stdout
    assert done.stderr.count("ERROR:  hoopops blocked this statement (rule "
                             "writes-need-review") == 2, done.stderr
    assert "current transaction is aborted" in done.stderr
    assert await ids(pg, table) == "1,2,3"


# -- evasions ----------------------------------------------------------------------------------


EVASIONS = [
    # (label, SQL with {t} the table and {f} a user function that deletes, rule, detail)
    ("delete in a CTE", "WITH d AS (DELETE FROM {t} WHERE id = 1 RETURNING *) SELECT * FROM d",
     "writes-need-review", None),
    ("EXPLAIN ANALYZE DELETE", "EXPLAIN ANALYZE DELETE FROM {t} WHERE id = 1",
     "writes-need-review", None),
    ("COMMIT; DROP TABLE", "COMMIT; DROP TABLE {t}", "ddl-needs-review", "statement 2 of 2"),
    ("SELECT 1; DROP TABLE", "SELECT 1; DROP TABLE {t}", "ddl-needs-review",
     "statement 2 of 2"),
    ("comment between verb and table", "DELETE/**/FROM {t} WHERE id = 1",
     "writes-need-review", None),
    ("comment before the verb", "/* SELECT */ DELETE FROM {t} WHERE id = 1",
     "writes-need-review", None),
    ("verb split by a comment", "DE/**/LETE FROM {t} WHERE id = 1", "builtin:parse-error",
     "does not parse"),
    ("unbounded delete", "delete from {t}", "unbounded-writes-need-review", None),
    ("terminate a backend", "SELECT pg_terminate_backend(pg_backend_pid())", "no-dangerous",
     None),
    ("read a server file", "SELECT pg_read_file('/etc/passwd')", "no-dangerous", None),
    ("COPY TO PROGRAM", "COPY {t} TO PROGRAM 'cat > /dev/null'", "no-dangerous", None),
    ("DO block", "DO $$BEGIN DELETE FROM {t}; END$$", "no-dangerous", None),
    ("SET ROLE", "SET ROLE postgres", "no-dangerous", None),
    ("standard_conforming_strings", "SET standard_conforming_strings = off",
     "builtin:lexing-risk", None),
    ("client_encoding", "SET client_encoding = 'LATIN1'", "builtin:lexing-risk", None),
    ("SET NAMES", "SET NAMES 'LATIN1'", "builtin:lexing-risk", None),
    ("set_config lexing", "SELECT set_config('standard_conforming_strings', 'off', false)",
     "builtin:lexing-risk", None),
    ("user function that deletes", "SELECT {f}()", "writes-need-review", None),
    ("user function in a WHERE", "SELECT * FROM {t} WHERE id = {f}()",
     "writes-need-review", None),
    ("view that hides a write", "SELECT * FROM {v}", "writes-need-review", None),
    ("secret catalog", "SELECT rolpassword FROM pg_authid", "no-secret-catalogs", None),
    ("EXECUTE of an unknown name", "EXECUTE e2e_never_prepared", "builtin:unanalysable",
     None),
    ("nextval", "SELECT nextval('e2e_seq')", "writes-need-review", None),
    ("SELECT INTO", "SELECT * INTO e2e_copy FROM {t}", "ddl-needs-review", None),
]


@pytest.fixture(scope="module")
async def hidden_writes(pg: LocalPostgres) -> AsyncIterator[dict[str, str]]:
    """A table, a volatile user function that deletes from it and a view that calls it,
    made directly on the server as the superuser (the agent never sees them made)."""
    table = await make_table(pg)
    suffix = uuid.uuid4().hex[:8]
    func, view = f"e2e_innocent_{suffix}", f"e2e_report_{suffix}"
    await sh(pg, f"""
CREATE FUNCTION public.{func}() RETURNS int LANGUAGE sql VOLATILE
    AS $$ DELETE FROM public.{table} WHERE id = 3; SELECT 3 $$;
CREATE VIEW public.{view} AS SELECT {func}() AS n;
GRANT SELECT ON public.{view} TO {SERVICE_USER};
CREATE SEQUENCE IF NOT EXISTS public.e2e_seq;
GRANT USAGE ON SEQUENCE public.e2e_seq TO {SERVICE_USER};
""")
    yield {"t": table, "f": func, "v": view}
    await sh(pg, f"DROP VIEW public.{view}; DROP FUNCTION public.{func}()")


@pytest.mark.parametrize(("label", "template", "rule", "detail"), EVASIONS,
                         ids=[e[0] for e in EVASIONS])
async def test_evasions_are_judged_by_what_runs(
        strict: RunningGateway, pg: LocalPostgres, hidden_writes: dict[str, str], label: str,
        template: str, rule: str, detail: str | None) -> None:
    sql = template.format(**hidden_writes)
    conn = await asyncpg.connect(strict.dsn())
    try:
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        # Simple protocol, then extended (a multi-statement string is refused before the
        # server could say it cannot be prepared).
        for send in (conn.execute, conn.fetch):
            with pytest.raises(asyncpg.InsufficientPrivilegeError) as info:
                await send(sql)
            assert_refusal(str(info.value), rule, detail=detail)
            assert await conn.fetchval("SELECT pg_backend_pid()") == pid
        # Inside a transaction block, the refusal aborts it as a server error would.
        tx = conn.transaction()
        await tx.start()
        assert await conn.fetchval("SELECT 7") == 7
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(sql)
        with pytest.raises(asyncpg.InFailedSQLTransactionError):
            await conn.fetchval("SELECT 1")
        await tx.rollback()
        assert await conn.fetchval("SHOW standard_conforming_strings") == "on"
        assert await conn.fetchval("SHOW client_encoding") == "UTF8"
        assert await conn.fetchval("SELECT current_user") == SERVICE_USER
    finally:
        await conn.close()
    assert await ids(pg, hidden_writes["t"]) == "1,2,3"


async def test_concurrent_sessions_do_not_race_the_catalog(
        gateway_factory: object, pg: LocalPostgres, tmp_path: Path,
        hidden_writes: dict[str, str]) -> None:
    """Sessions asking about the same hidden write at the same moment all see it: an
    object whose effect one session is still working out is never another's answer."""
    gw = await start(gateway_factory, policy_folder(tmp_path))
    conns = [await asyncpg.connect(gw.dsn()) for _ in range(6)]
    statements = [f"SELECT {hidden_writes['f']}()", f"SELECT * FROM {hidden_writes['v']}",
                  f"SELECT * FROM {hidden_writes['t']} WHERE id = {hidden_writes['f']}()"]

    async def attempt(conn: asyncpg.Connection, sql: str) -> str:
        try:
            await conn.execute(sql)
        except asyncpg.InsufficientPrivilegeError as exc:
            return str(exc).split("\n")[0]
        return "ran"

    try:
        for _ in range(3):
            gw.gateway.reload()  # type: ignore[attr-defined]  # as SIGHUP: empties the cache
            outcomes = await asyncio.gather(*(
                attempt(conn, statements[i % len(statements)])
                for i, conn in enumerate(conns)))
            for outcome in outcomes:
                assert_refusal(outcome, "writes-need-review")
    finally:
        for conn in conns:
            await conn.close()
    assert await ids(pg, hidden_writes["t"]) == "1,2,3"


async def test_mutually_recursive_functions_do_not_hide_a_write(
        gateway_factory: object, pg: LocalPostgres, tmp_path: Path) -> None:
    """A stable function that reaches a deleting one through a cycle is a write, whichever
    of the two the catalog met first."""
    gw = await start(gateway_factory, policy_folder(tmp_path))
    table = await make_table(pg)
    suffix = uuid.uuid4().hex[:8]
    a, b = f"e2e_loop_a_{suffix}", f"e2e_loop_b_{suffix}"
    await sh(pg, f"""
CREATE FUNCTION public.{a}(n int) RETURNS int LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF n > 0 THEN RETURN public.{b}(n - 1); END IF;
    DELETE FROM public.{table} WHERE id = 2;
    RETURN 0;
END $$;
CREATE FUNCTION public.{b}(n int) RETURNS int LANGUAGE plpgsql STABLE AS $$
BEGIN RETURN public.{a}(n); END $$;
""")
    conn = await asyncpg.connect(gw.dsn())
    try:
        for sql in (f"SELECT {a}(1)", f"SELECT {b}(1)", f"SELECT {b}(0) + {a}(0)"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError) as info:
                await conn.execute(sql)
            assert_refusal(str(info.value), "writes-need-review")
    finally:
        await conn.close()
        await sh(pg, f"DROP FUNCTION public.{b}(int); DROP FUNCTION public.{a}(int)")
    assert await ids(pg, table) == "1,2,3"


async def test_prepare_is_judged_at_execute(gateway_factory: object, pg: LocalPostgres,
                                            tmp_path: Path) -> None:
    """With a policy that lets any PREPARE through, EXECUTE is still judged as the
    statement it runs (SQL-level and protocol-level names share one namespace)."""
    allow_prepare = """\
rules:
  - id: e2e-prepare
    description: Preparing runs nothing
    when: {statement_types: [PrepareStmt]}
    action: allow
"""
    gw = await start(gateway_factory, policy_folder(tmp_path, extra={
        "01-prepare.yaml": allow_prepare}))
    table = await make_table(pg)
    conn = await asyncpg.connect(gw.dsn())
    try:
        await conn.execute(f"PREPARE del AS DELETE FROM {table} WHERE id = $1")
        with pytest.raises(asyncpg.InsufficientPrivilegeError) as info:
            await conn.execute("EXECUTE del(1)")
        assert_refusal(str(info.value), "writes-need-review")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetch("EXECUTE del(1)")
        # A harmless name re-prepared as a write after DEALLOCATE is judged as the write.
        await conn.execute("PREPARE sel AS SELECT 1")
        assert await conn.execute("EXECUTE sel") == "SELECT 1"
        await conn.execute(f"DEALLOCATE sel; PREPARE sel AS DELETE FROM {table}")
        with pytest.raises(asyncpg.InsufficientPrivilegeError) as info:
            await conn.execute("EXECUTE sel")
        assert_refusal(str(info.value), "unbounded-writes-need-review")
        # A PREPARE refused with the rest of its string is unknown to both sides.
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(f"PREPARE later AS SELECT 1; DROP TABLE {table}")
        with pytest.raises(asyncpg.InsufficientPrivilegeError) as info:
            await conn.execute("EXECUTE later")
        assert_refusal(str(info.value), "builtin:unanalysable")
        async with conn.transaction():
            await conn.execute(f"INSERT INTO {table} VALUES (50, 'p')")
        assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 4
    finally:
        await conn.close()
    assert await ids(pg, table) == "1,2,3,50"
    # The same through psql, in a transaction.
    script = f"""
prepare d2 as delete from {table} where id = $1;
begin;
execute d2(50);
rollback;
execute d2(50);
select count(*) from {table};
"""
    done = await run(psql_args(psql_path(pg), gw.port, "-At"), env=gw.env(), stdin=script)
    assert done.stdout.splitlines() == ["PREPARE", "BEGIN", "ROLLBACK", "4"], done.stdout
    assert done.stderr.count("rule writes-need-review") == 2, done.stderr


# -- review without an analyst ------------------------------------------------------------------


async def test_review_times_out_with_57014_and_the_session_goes_on(
        gateway_factory: object, pg: LocalPostgres, tmp_path: Path,
        hidden_writes: dict[str, str]) -> None:
    gw = await start(gateway_factory, policy_folder(tmp_path, strict=False),
                     "approvals:\n  timeout: 2s\n  poll_interval: 0.1\n", audit=True)
    table = hidden_writes["t"]

    async def psycopg_simple() -> float:
        notices: list[str] = []
        async with await psycopg.AsyncConnection.connect(gw.dsn(), autocommit=True) as conn:
            conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
            began = time.monotonic()
            with pytest.raises(pgerr.QueryCanceled) as info:
                await conn.execute(f"DELETE FROM {table} WHERE id = 1")
            waited = time.monotonic() - began
            message = info.value.diag.message_primary or ""
            assert message.startswith("hoopops: approval #"), message
            assert "timed out after 2 s" in message
            approval = message.split("#")[1].split()[0]
            assert any(f"approval #{approval}" in n for n in notices), notices
            assert conn.info.transaction_status == TransactionStatus.IDLE
            assert await (await conn.execute("SELECT 'on'")).fetchone() == ("on",)
            return waited

    async def asyncpg_extended() -> float:
        conn = await asyncpg.connect(gw.dsn())
        try:
            began = time.monotonic()
            with pytest.raises(asyncpg.QueryCanceledError) as info:
                await conn.fetch(f"DELETE FROM {table} WHERE id = $1 RETURNING id", 2)
            waited = time.monotonic() - began
            assert "approval #" in str(info.value)
            assert await conn.fetchval("SELECT $1::int", 5) == 5
            return waited
        finally:
            await conn.close()

    async def asyncpg_executemany() -> float:
        conn = await asyncpg.connect(gw.dsn())
        try:
            began = time.monotonic()
            with pytest.raises(asyncpg.QueryCanceledError):
                await conn.executemany(f"DELETE FROM {table} WHERE id = $1",
                                       [(1,), (2,), (3,)])
            waited = time.monotonic() - began
            assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 3
            return waited
        finally:
            await conn.close()

    async def in_a_transaction() -> float:
        async with await psycopg.AsyncConnection.connect(gw.dsn()) as conn:
            assert await (await conn.execute(f"SELECT count(*) FROM {table}")).fetchone() \
                == (3,)
            began = time.monotonic()
            with pytest.raises(pgerr.QueryCanceled):
                await conn.execute(f"UPDATE {table} SET v = %s WHERE id = %s", ("u", 1))
            waited = time.monotonic() - began
            assert conn.info.transaction_status == TransactionStatus.INERROR
            with pytest.raises(pgerr.InFailedSqlTransaction):
                await conn.execute("SELECT 1")
            await conn.rollback()
            assert await (await conn.execute("SELECT 2")).fetchone() == (2,)
            return waited

    async def hidden(sql: str) -> float:
        conn = await asyncpg.connect(gw.dsn())
        try:
            began = time.monotonic()
            with pytest.raises(asyncpg.QueryCanceledError):
                await conn.execute(sql)
            waited = time.monotonic() - began
            assert await conn.fetchval("SELECT 1") == 1
            return waited
        finally:
            await conn.close()

    async def raw_pipeline() -> float:
        """Held at Bind in the middle of a pipeline: the same replies as PostgreSQL gives
        for an error at Bind in its place."""
        through, direct_table = await make_table(pg, 0), await make_table(pg, 0)

        def build(t: str, bad: str, value: str) -> bytes:
            return (peb(f"INSERT INTO {t} VALUES (1, 'a')") + peb(bad, params=(value,))
                    + peb(f"INSERT INTO {t} VALUES (3, 'c')") + SYNC
                    + peb(f"SELECT count(*) FROM {t}") + SYNC)

        client, direct = await raw_gateway(gw), await raw_direct(gw)
        try:
            began = time.monotonic()
            got, got_errors = await exchange(
                client, build(through, f"DELETE FROM {through} WHERE id = $1::int", "1"), 2)
            waited = time.monotonic() - began
            want, want_errors = await exchange(
                direct, build(direct_table, "SELECT $1::int", "not a number"), 2)
        finally:
            await client.close()
            await direct.close()
        assert got == want
        assert [e["C"] for e in got_errors] == ["57014"]
        assert [e["C"] for e in want_errors] == ["22P02"]
        assert got[-2:] == ["C:SELECT 1", "Z:I"] and "D:['0']" in got
        return waited

    async def strictest_is_not_held() -> float:
        conn = await asyncpg.connect(gw.dsn())
        try:
            began = time.monotonic()
            with pytest.raises(asyncpg.InsufficientPrivilegeError) as info:
                await conn.execute(f"DELETE FROM {table} WHERE id = 1; "
                                   "SELECT pg_terminate_backend(pg_backend_pid())")
            assert time.monotonic() - began < 1.5
            assert_refusal(str(info.value), "no-dangerous", detail="statement 2 of 2")
            return 2.0  # refused at once: review is not the strictest decision here
        finally:
            await conn.close()

    waits = await asyncio.gather(
        psycopg_simple(), asyncpg_extended(), asyncpg_executemany(), in_a_transaction(),
        hidden(f"SELECT {hidden_writes['f']}()"), hidden(f"SELECT * FROM {hidden_writes['v']}"),
        raw_pipeline(), strictest_is_not_held())
    for waited in waits:
        assert 1.8 <= waited < 8, waits
    assert await ids(pg, table) == "1,2,3"


# -- parse errors, huge and deeply nested statements ---------------------------------------------


async def test_parse_errors_are_refused_clearly(strict: RunningGateway) -> None:
    conn = await asyncpg.connect(strict.dsn())
    try:
        for send in (conn.execute, conn.fetch):
            with pytest.raises(asyncpg.InsufficientPrivilegeError) as info:
                await send("SELEC 1")
            assert_refusal(str(info.value), "builtin:parse-error",
                           detail='syntax error at or near "SELEC"')
        tx = conn.transaction()
        await tx.start()
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("SELECT (1")
        with pytest.raises(asyncpg.InFailedSQLTransactionError):
            await conn.execute("SELECT 1")
        await tx.rollback()
        assert await conn.fetchval("SELECT 'ok'") == "ok"
    finally:
        await conn.close()


DEEP = "nested too deeply to analyse safely"
HOSTILE = {
    "1 MiB literal": ("SELECT '" + "x" * (1 << 20) + "'", "bytes long"),
    "100k nested parentheses": ("SELECT " + "(" * 100_000 + "1" + ")" * 100_000, DEEP),
    "150k chained additions": ("SELECT 1" + "+1" * 150_000, DEEP),
    "100k nested NOTs": ("SELECT " + "NOT " * 100_000 + "true", DEEP),
    "50k nested ARRAYs": ("SELECT " + "ARRAY[" * 50_000 + "1" + "]" * 50_000, DEEP),
    "20k nested subqueries": ("SELECT " + "(SELECT " * 20_000 + "1" + ")" * 20_000, DEEP),
}


async def test_huge_and_deeply_nested_statements_never_crash_the_gateway(
        strict: RunningGateway) -> None:
    bystander = await asyncpg.connect(strict.dsn())
    try:
        async with bystander.transaction():
            # Its own backend, its transaction still open and still writing nothing (the
            # server-wide snapshot is no measure: autovacuum's ANALYZE takes xids too).
            snapshot = await bystander.prepare("SELECT pg_current_xact_id_if_assigned() IS NULL,"
                                               " pg_backend_pid(), now()")
            before = await snapshot.fetchrow()
            for label, (sql, detail) in HOSTILE.items():
                conn = await asyncpg.connect(strict.dsn())
                try:
                    for send in (conn.execute, conn.fetch):
                        began = time.monotonic()
                        with pytest.raises(asyncpg.InsufficientPrivilegeError) as info:
                            await send(sql)
                        assert time.monotonic() - began < 10, label
                        message = str(info.value)
                        assert_refusal(message.split("\n")[0], "builtin:unanalysable",
                                       detail=detail)
                        assert len(message) < 2000, label
                        assert await conn.fetchval("SELECT 1") == 1, label
                finally:
                    await conn.close()
                # A session in the middle of its own transaction is unaffected.
                assert await snapshot.fetchrow() == before, label
                assert bystander.is_in_transaction()
        # Big but within the limit: analysed and run like any other read.
        conn = await asyncpg.connect(strict.dsn())
        try:
            big = "SELECT length('" + "y" * ((1 << 20) - 64) + "')"
            assert await conn.fetchval(big) == (1 << 20) - 64
            assert await conn.execute(big) == "SELECT 1"
        finally:
            await conn.close()
    finally:
        await bystander.close()


# -- reloading the policy --------------------------------------------------------------------


async def test_policy_reload_applies_and_an_invalid_version_is_refused(
        gateway_factory: object, pg: LocalPostgres, tmp_path: Path) -> None:
    folder = policy_folder(tmp_path)
    gw = await start(gateway_factory, folder)
    table = await make_table(pg)
    conn = await asyncpg.connect(gw.dsn())
    sql = f"SELECT id FROM {table} ORDER BY id"
    # Prepared before the reload: its decision was made at Parse, under the old policy.
    prepared = await conn.prepare(sql)

    async def outcomes() -> list[str]:
        """In simple protocol, extended, and with the old prepared statement."""
        found = []
        for run_it in (lambda: conn.execute(sql), lambda: conn.fetch(sql),
                       lambda: prepared.fetch()):
            try:
                await run_it()
                found.append("allowed")
            except asyncpg.InsufficientPrivilegeError as exc:
                found.append(str(exc).split("\n")[0])
        assert not conn.is_in_transaction()
        return found

    async def decision() -> str:
        found = await outcomes()
        assert len(set(found)) == 1, found  # all three agree
        return found[0]

    async def all_changed(before: str) -> bool:
        return before not in await outcomes()

    try:
        assert await decision() == "allowed"
        engine = gw.gateway.engine  # type: ignore[attr-defined]
        version = engine.version
        rules = folder / "00-reload.yaml"
        rules.write_text(f"""\
rules:
  - id: e2e-hide-{table}
    description: This table is closed for maintenance
    when: {{tables_read: [{table}]}}
    action: block
""")
        began = time.monotonic()
        await poll(lambda: all_changed("allowed"), within=6, interval=0.1,
                   what="the new rule to apply")
        assert time.monotonic() - began < 3
        blocked = await decision()
        assert blocked == (f"hoopops blocked this statement (rule e2e-hide-{table}: "
                           "This table is closed for maintenance)"), blocked
        in_force = engine.version
        assert in_force != version

        # An invalid new version is refused; the one in force stays, decisions unchanged.
        rules.write_text(rules.read_text() + "    unles: {kinds: [read]}\n")
        await poll(lambda: _true(engine.last_error is not None), within=6, interval=0.1,
                   what="the invalid version to be refused")
        error = str(engine.last_error)
        assert "00-reload.yaml:6" in error and "unles" in error, error
        assert engine.version == in_force
        assert await decision() == blocked
        await asyncio.sleep(1.5)
        assert await decision() == blocked

        # Fixing it (here: removing the file) applies again.
        rules.unlink()
        await poll(lambda: all_changed(blocked), within=6, interval=0.1,
                   what="the rule to go away")
        assert await decision() == "allowed"
        assert engine.last_error is None
        assert await prepared.fetchval() == 1
    finally:
        await conn.close()


async def _true(value: bool) -> bool:
    return value


# -- the CLI -----------------------------------------------------------------------------------


async def test_policy_check_json_cli(tmp_path: Path) -> None:
    folder = policy_folder(tmp_path, strict=False)
    cases = {
        "WITH d AS (DELETE FROM t WHERE id = 1 RETURNING *) SELECT * FROM d":
            ("review", "writes-need-review", 1),
        "SELECT 1; DROP TABLE accounts": ("review", "ddl-needs-review", 2),
        "SELECT pg_terminate_backend(42)": ("block", "no-dangerous", 1),
        "SET standard_conforming_strings = off": ("block", "builtin:lexing-risk", 1),
        "SELEC 1": ("block", "builtin:parse-error", 1),
        "SELECT id FROM accounts WHERE id = 3": ("allow", "reads", 1),
    }

    async def check(sql: str) -> dict[str, object]:
        done = await run([sys.executable, "-m", "hoopops", "policy", "check", "--json",
                          "--policies", str(folder), "--sub", "agent-1", "--groups",
                          "agents", "--target", "appdb", sql])
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    results = await asyncio.gather(*(check(sql) for sql in cases))
    for (sql, (action, rule, count)), data in zip(cases.items(), results, strict=True):
        assert (data["decision"], data["rule"]) == (action, rule), (sql, data)
        statements = data["statements"]
        assert isinstance(statements, list) and len(statements) == count, (sql, data)
    cte = results[0]["statements"][0]  # type: ignore[index]
    assert cte["kinds"] == ["write"] and cte["tables_written"] == ["t"]
    both = results[1]["statements"]  # type: ignore[index]
    assert [s["decision"] for s in both] == ["allow", "review"]
    assert "pg_terminate_backend" in json.dumps(results[2])

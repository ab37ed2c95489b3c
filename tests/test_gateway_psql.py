"""psql through the gateway, checked the way a person at a terminal would check it.

Queries, multi-statement strings, errors that leave the session usable, transactions,
``\\copy`` both ways, notices, Ctrl-C (SIGINT) cancelling a running statement, libpq 18
asking for protocol 3.2, and GSS encryption negotiation.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess

import pytest

from hoopops.devdb import LocalPostgres
from tests.clients.util import poll, psql_args, run, wait_active
from tests.conftest import RunningGateway, psql_path


def _psql(pg: LocalPostgres, gw: RunningGateway, *extra: str) -> list[str]:
    return psql_args(psql_path(pg), gw.port, *extra)


async def test_queries_multistatement_errors_and_transactions(
        gateway: RunningGateway, pg: LocalPostgres) -> None:
    script = """
select 40 + 2 as answer;
select 'first' \\; select 'second';
select 1/0;
select 'still here after an error';
create table psql_tx_probe (id int);
begin;
insert into psql_tx_probe values (1), (2), (3);
select count(*) from psql_tx_probe;
rollback;
select count(*) from psql_tx_probe;
begin;
select 1/0;
select 'not run: transaction aborted';
rollback;
begin;
insert into psql_tx_probe values (7);
commit;
select sum(id) from psql_tx_probe;
drop table psql_tx_probe;
"""
    done = await run(_psql(pg, gateway, "-At", "-v", "VERBOSITY=verbose"),
                     env=gateway.env(), stdin=script)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "42", "first", "second", "still here after an error", "CREATE TABLE",
        "BEGIN", "INSERT 0 3", "3", "ROLLBACK", "0",
        "BEGIN", "ROLLBACK",
        "BEGIN", "INSERT 0 1", "COMMIT", "7", "DROP TABLE"]
    assert "ERROR:  22012: division by zero" in done.stderr
    assert "25P02: current transaction is aborted" in done.stderr


async def test_multistatement_c_string(gateway: RunningGateway, pg: LocalPostgres) -> None:
    # One Query message with several statements; psql shows every result.
    done = await run(_psql(pg, gateway, "-At", "-c",
                           "select 1; select 2; select current_database()"),
                     env=gateway.env())
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "2", "app"]


async def test_copy_from_stdin_and_to_stdout(gateway: RunningGateway, pg: LocalPostgres,
                                            tmp_path) -> None:
    rows = [f"{i},name {i},{'x' * (i % 50)}" for i in range(1, 3001)]
    source = tmp_path / "in.csv"
    source.write_text("\n".join(rows) + "\n")
    target = tmp_path / "out.csv"
    script = f"""
create table psql_copy (id int primary key, name text, pad text);
\\copy psql_copy from '{source}' with (format csv)
select count(*), sum(id), max(length(pad)) from psql_copy;
\\copy (select * from psql_copy order by id) to '{target}' with (format csv)
\\copy psql_copy to stdout with (format csv)
drop table psql_copy;
"""
    done = await run(_psql(pg, gateway, "-At", "-v", "ON_ERROR_STOP=1"),
                     env=gateway.env(), stdin=script)
    assert done.returncode == 0, done.stderr
    out = done.stdout.split("\n")
    assert out[0] == "CREATE TABLE"
    assert out[1] == "COPY 3000"
    assert out[2] == f"3000|{sum(range(1, 3001))}|49"
    assert out[3] == "COPY 3000"
    # \copy ... to stdout: the rows themselves land on psql's stdout
    assert sorted(out[4:3004], key=lambda line: int(line.split(",")[0])) == rows
    assert target.read_text() == "\n".join(rows) + "\n"


async def test_copy_with_a_bad_row_reports_and_continues(gateway: RunningGateway,
                                                        pg: LocalPostgres, tmp_path) -> None:
    good = [f"{i}\tok" for i in range(1, 2001)]
    source = tmp_path / "bad.tsv"
    source.write_text("\n".join([*good[:1000], "not-a-number\tbad", *good[1000:]]) + "\n")
    script = f"""
create table psql_copy_bad (id int, v text);
\\copy psql_copy_bad from '{source}'
select 'after copy', count(*) from psql_copy_bad;
drop table psql_copy_bad;
"""
    done = await run(_psql(pg, gateway, "-At"), env=gateway.env(), stdin=script)
    assert done.returncode == 0, done.stderr
    assert 'invalid input syntax for type integer: "not-a-number"' in done.stderr
    assert "after copy|0" in done.stdout.split("\n")


async def test_notice_reaches_psql(gateway: RunningGateway, pg: LocalPostgres) -> None:
    done = await run(_psql(pg, gateway, "-At", "-c",
                           "do $$ begin raise notice 'hello from the server %', 42; end $$"),
                     env=gateway.env())
    assert done.returncode == 0, done.stderr
    assert "NOTICE:  hello from the server 42" in done.stderr


async def test_sigint_cancels_running_statement(gateway: RunningGateway,
                                                pg: LocalPostgres) -> None:
    proc = await asyncio.create_subprocess_exec(
        *_psql(pg, gateway, "-At", "-v", "VERBOSITY=verbose", "-c",
               "select pg_sleep(30) /* psql-sigint */"),
        env=gateway.env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        await wait_active(pg, "psql-sigint")
        loop = asyncio.get_running_loop()
        started = loop.time()
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), 10)
        elapsed = loop.time() - started
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert "57014: canceling statement due to user request" in err.decode()
    assert elapsed < 5
    # And the gateway still serves psql right after.
    done = await run(_psql(pg, gateway, "-At", "-c", "select 'alive'"), env=gateway.env())
    assert done.stdout.strip() == "alive", done.stderr


def _bundled_psql_version(pg: LocalPostgres) -> int:
    out = subprocess.run([pg.tool("psql"), "--version"], capture_output=True, text=True,
                         check=True).stdout
    return int(out.split()[-1].split(".")[0])


async def test_libpq18_psql_with_max_protocol_latest(gateway: RunningGateway,
                                                      pg: LocalPostgres) -> None:
    if _bundled_psql_version(pg) < 18:
        pytest.skip("the bundled psql is older than 18 (no protocol 3.2 to negotiate)")
    psql = pg.tool("psql")
    # Through the environment ...
    done = await run([psql, "-X", "-At", "-h", "127.0.0.1", "-p", str(gateway.port), "-U",
                      "agent", "-d", "appdb", "-c", "select 'negotiated'"],
                     env=gateway.env() | {"PGMAXPROTOCOLVERSION": "latest"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "negotiated"
    # ... and in the conninfo string, with the session then used for real work.
    conninfo = (f"host=127.0.0.1 port={gateway.port} user=agent dbname=appdb "
                "max_protocol_version=latest")
    done = await run([psql, "-X", "-At", "-d", conninfo, "-c",
                      "select sum(g) from generate_series(1, 100) g"], env=gateway.env())
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "5050"


async def test_psql_with_gssencmode_prefer(gateway: RunningGateway, pg: LocalPostgres) -> None:
    conninfo = f"host=127.0.0.1 port={gateway.port} user=agent dbname=appdb gssencmode=prefer"
    done = await run([psql_path(pg), "-X", "-At", "-d", conninfo, "-c", "select 'gss-ok'"],
                     env=gateway.env())
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "gss-ok"


async def test_many_sequential_psql_sessions_leave_no_upstream_backends(
        gateway: RunningGateway, pg: LocalPostgres) -> None:
    from tests.clients.util import service_backends

    before = await service_backends(pg)
    for i in range(5):
        done = await run(_psql(pg, gateway, "-At", "-c", f"select {i}"), env=gateway.env())
        assert done.stdout.strip() == str(i), done.stderr

    async def settled() -> bool:
        return await service_backends(pg) <= before
    await poll(settled, what="upstream backends of finished psql sessions to close")


@pytest.mark.parametrize(("locale", "expected"), [("C.UTF-8", "UTF8"), ("C", "SQL_ASCII")])
async def test_psql_client_encoding_auto_from_locale(gateway: RunningGateway, pg: LocalPostgres,
                                                     locale: str, expected: str) -> None:
    # An interactive psql asks for client_encoding=auto: libpq sends the locale's.
    done = await run(_psql(pg, gateway, "-At", "-c", "show client_encoding"),
                     env=gateway.env() | {"PGCLIENTENCODING": "auto", "LC_ALL": locale})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == expected


async def test_psql_latin1_client_encoding_refused_clearly(gateway: RunningGateway,
                                                           pg: LocalPostgres) -> None:
    done = await run(_psql(pg, gateway, "-At", "-c", "select 1"),
                     env=gateway.env() | {"PGCLIENTENCODING": "LATIN1"})
    assert done.returncode == 2
    assert "client_encoding 'LATIN1' is not allowed through hoopops: use UTF8" in done.stderr

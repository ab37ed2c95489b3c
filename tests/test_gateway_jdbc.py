"""pgjdbc (the PostgreSQL JDBC driver) through the gateway, as a Java agent would use it.

``tests/clients/jdbc/Probe.java`` runs one scenario per JVM against a JDBC URL and prints
what it saw; these tests assert on that. Covered: the token as password (and refused
tokens), TLS (``sslmode=require`` and ``verify-full``), simple and extended queries with
pgjdbc's switch to named server-side statements (after ``prepareThreshold`` uses, or from
the first with ``prepareThreshold=-1``), typed parameters (timestamptz, uuid, numeric,
bytea, arrays), ``setFetchSize`` portals read in slices, batches, transactions and
savepoints, ``CopyManager``, ``setQueryTimeout`` and ``Statement.cancel()`` (CancelRequest
through the gateway), a policy refusal (42501, the session goes on) and masked columns.

The driver is Debian's ``libpostgresql-jdbc-java`` (``.ci/run`` installs it); without
java, javac or the jar the tests skip and say which is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hoopops.devdb import LocalPostgres, write_self_signed_cert
from tests.clients.guarded import REFUSAL, expired_token, people_table, policy_folder
from tests.clients.util import run
from tests.conftest import RunningGateway

PROBE = Path(__file__).resolve().parent / "clients" / "jdbc" / "Probe.java"
JAR_PATHS = (os.environ.get("HOOPOPS_PGJDBC_JAR", ""), "/usr/share/java/postgresql.jar")


class Jdbc:
    """The compiled probe and how to run it."""

    def __init__(self, java: str, jar: str, classes: Path) -> None:
        self.java = java
        self.classpath = f"{jar}{os.pathsep}{classes}"

    async def probe(self, scenario: str, url: str, token: str, *args: str) -> dict[str, str]:
        """Run one scenario; its key=value lines (fails on an unexpected exception)."""
        env = {**os.environ, "HOOPOPS_TOKEN": token}
        done = await run([self.java, "-cp", self.classpath, "Probe", scenario, url, *args],
                         env=env, within=120)
        lines = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
        assert done.returncode == 0 and "unexpected" not in lines, (
            f"{scenario}: exit {done.returncode}\n{done.stdout}\n{done.stderr[-2000:]}")
        return lines


@pytest.fixture(scope="session")
def jdbc(tmp_path_factory: pytest.TempPathFactory) -> Jdbc:
    java, javac = shutil.which("java"), shutil.which("javac")
    jar = next((p for p in JAR_PATHS if p and os.path.isfile(p)), None)
    if java is None or javac is None:
        lacking = " and ".join(n for n, f in (("java", java), ("javac", javac)) if f is None)
        pytest.skip(f"JDBC tests need a JDK: no {lacking} on PATH "
                    "(apt-get install default-jdk-headless)")
    if jar is None:
        pytest.skip("JDBC tests need pgjdbc: no /usr/share/java/postgresql.jar "
                    "(apt-get install libpostgresql-jdbc-java) and no HOOPOPS_PGJDBC_JAR")
    classes = tmp_path_factory.mktemp("jdbc-classes")
    # Compiled once (java Probe.java would compile again for every run).
    done = subprocess.run([javac, "-d", str(classes), "-cp", jar, str(PROBE)],
                          capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr
    return Jdbc(java, jar, classes)




def url(gw: RunningGateway, **params: str) -> str:
    query = "&".join(f"{k}={v}" for k, v in {"sslmode": "disable", **params}.items())
    return f"jdbc:postgresql://127.0.0.1:{gw.port}/appdb?{query}"


@pytest.fixture(scope="module")
def people(pg: LocalPostgres) -> str:
    """A table in the target database with one person whose ssn masking covers."""
    return people_table(pg, "jdbc")


@pytest.fixture
async def guarded(gateway_factory, tmp_path: Path, people: str
                  ) -> AsyncIterator[RunningGateway]:
    yield await gateway_factory(policies=policy_folder(tmp_path, people))


# Default settings, and named server-side statements from the first execution.
THRESHOLDS = [pytest.param({}, id="default"),
              pytest.param({"prepareThreshold": "-1"}, id="server-prepared")]


@pytest.mark.parametrize("params", THRESHOLDS)
async def test_jdbc_queries_and_typed_parameters(jdbc: Jdbc, gateway: RunningGateway,
                                                 params: dict[str, str]) -> None:
    got = await jdbc.probe("basic", url(gateway, **params), gateway.token())
    assert got["select"] == "42"
    assert got["multi"] == "1,two,update:0"
    assert got["undefined.sqlstate"] == "42P01"
    assert got["after_error"] == "still here"
    assert got["meta_tables"] == "true"

    got = await jdbc.probe("prepared", url(gateway, **params), gateway.token())
    assert got["squares"] == " ".join(f"{i * i}:n{i}" for i in range(1, 13))
    assert got["ts"] == "2024-02-29T12:30:15.123456Z"
    assert got["uuid"] == "6f1c8a5e-2f7b-4a8e-9d3c-0b1e2f3a4b5c"
    assert got["numeric"] == "12345.6789"
    assert got["bytea"] == "00ff1027"
    assert got["date"] == "2000-01-01"
    assert got["null"] == "true"
    assert got["array"] == "[1, null, 3]"
    assert got["int8"] == str(1 << 40)
    assert got["float8"] == "1.5"
    assert got["jsonb"] == '{"k": [1, 2]}'
    # The failing execution is reported and the statement goes on being used.
    assert got["division"] == "10 5 2 10 5 22012 2 1"
    # A cached plan invalidated by ALTER TABLE is re-prepared by the driver.
    assert got["reshaped"] == "1 1 1 1 1 1 2 2"


@pytest.mark.parametrize("audit", [False, True], ids=["relay", "audited"])
@pytest.mark.parametrize("params", THRESHOLDS)
async def test_jdbc_fetch_size_batches_and_transactions(jdbc: Jdbc, gateway_factory,
                                                        params: dict[str, str],
                                                        audit: bool) -> None:
    # (an audited session records every Bind's values: its relay takes other paths)
    gateway = await gateway_factory(audit=audit)
    got = await jdbc.probe("fetch", url(gateway, **params), gateway.token())
    assert got["fetched"] == f"10000 {sum(range(1, 10001))}"
    # Two portals suspended and resumed in turn.
    assert got["interleaved_rows"] == "300"
    assert got["interleaved"] == "100/b100 200/b200 300/b300"
    assert got["after"] == "ok"

    got = await jdbc.probe("batch", url(gateway, **params), gateway.token())
    assert got["batch"] == "1000 1000"
    assert got["rows"] == f"1000 {sum(range(1, 1001))}"
    assert got["failing_batch.sqlstate"] == "23505"
    assert got["rows_after_failure"] == "1000"
    assert got["statement_batch"] == "[1, 10, 1]"

    got = await jdbc.probe("tx", url(gateway, **params), gateway.token())
    assert got["after_rollback"] == "0"
    assert got["committed"] == "2,4"
    assert (got["in_tx.sqlstate"], got["aborted.sqlstate"]) == ("22012", "25P02")
    assert got["after_abort"] == "usable"


async def test_jdbc_copy_manager(jdbc: Jdbc, gateway: RunningGateway) -> None:
    got = await jdbc.probe("copy", url(gateway), gateway.token())
    assert got["copy_in"] == "5000"
    assert got["copy_out"] == "3"
    assert got["copy_out_text"] == "0,name-0|1,name-1|2,name-2|"
    assert got["copy_bad.sqlstate"] == "22P02"
    assert got["after"] == "5000"


@pytest.mark.parametrize("params", THRESHOLDS)
async def test_jdbc_query_timeout_and_cancel(jdbc: Jdbc, gateway: RunningGateway,
                                             params: dict[str, str]) -> None:
    got = await jdbc.probe("cancel", url(gateway, **params), gateway.token())
    # setQueryTimeout(1) and cancel() after 0.7 s stop pg_sleep(30) through the gateway's
    # cancel key: the statement ends with 57014 long before it would have.
    assert got["timeout.sqlstate"] == "57014", got
    assert int(got["timeout_ms"]) < 10_000
    assert got["cancelled.sqlstate"] == "57014", got
    assert int(got["cancel_ms"]) < 10_000
    assert (got["after_timeout"], got["after_cancel"]) == ("alive", "alive")


async def test_jdbc_tls(jdbc: Jdbc, gateway_factory, gateway: RunningGateway,
                        tmp_path: Path) -> None:
    cert, key = write_self_signed_cert(tmp_path)
    other, _ = write_self_signed_cert(tmp_path, stem="other")
    tls = await gateway_factory(f"tls:\n  cert: {cert}\n  key: {key}\n")
    got = await jdbc.probe("basic", url(tls, sslmode="require"), tls.token())
    assert got["select"] == "42"
    got = await jdbc.probe("prepared", url(tls, sslmode="verify-full", sslrootcert=str(cert)),
                           tls.token())
    assert got["bytea"] == "00ff1027"
    # pgjdbc sends its CancelRequest over TLS as well.
    got = await jdbc.probe("cancel", url(tls, sslmode="require"), tls.token())
    assert (got["timeout.sqlstate"], got["cancelled.sqlstate"]) == ("57014", "57014"), got
    # The certificate really is checked, and require really asks for TLS.
    got = await jdbc.probe("connect", url(tls, sslmode="verify-full", sslrootcert=str(other)),
                           tls.token())
    assert got["connect.sqlstate"] == "08006", got
    got = await jdbc.probe("connect", url(gateway, sslmode="require"), gateway.token())
    assert got["connect.sqlstate"] == "08004", got
    assert "does not support SSL" in got["connect.message"]


async def test_jdbc_refused_tokens(jdbc: Jdbc, gateway: RunningGateway) -> None:
    got = await jdbc.probe("connect", url(gateway), gateway.token())
    assert got["connected"] == "yes"
    got = await jdbc.probe("connect", url(gateway), expired_token())
    assert got["connect.sqlstate"] == "28P01"
    assert "token expired" in got["connect.message"], got
    bad = gateway.token()[:-4] + "AAAA"
    got = await jdbc.probe("connect", url(gateway), bad)
    assert got["connect.sqlstate"] == "28P01"
    assert "signature" in got["connect.message"], got
    assert bad not in got["connect.message"]
    got = await jdbc.probe("connect", url(gateway), "not-a-token")
    assert got["connect.sqlstate"] == "28P01"
    assert "not a JWT" in got["connect.message"], got


@pytest.mark.parametrize("params", THRESHOLDS)
async def test_jdbc_policy_refusal_and_masking(jdbc: Jdbc, guarded: RunningGateway,
                                               people: str, params: dict[str, str]) -> None:
    got = await jdbc.probe("policy", url(guarded, **params), guarded.token())
    for key in ("simple", "prepared0", "prepared1", "in_tx"):
        assert got[f"{key}.sqlstate"] == "42501", (key, got)
        assert REFUSAL in got[f"{key}.message"], (key, got)
    assert got["aborted.sqlstate"] == "25P02"
    assert got["batch.sqlstate"] == "42501"
    # The table is still there and the session went on after every refusal.
    assert got["after_simple"] == got["after_prepared"] == got["after_all"] == "0"

    got = await jdbc.probe("mask", url(guarded, **params), guarded.token(), people)
    assert got["simple"] == "***-**-6789"
    assert got["prepared0"] == got["prepared6"] == "***-**-6789 Ann"


async def test_jdbc_table_made_in_a_transaction_reads_back(jdbc: Jdbc,
                                                           guarded: RunningGateway) -> None:
    # Autocommit off: CREATE TABLE, INSERT and COMMIT in one transaction. The gateway's
    # catalog lookups (on its own connection) missed the table until the commit and
    # remembered that, so masking took every column for untraceable: NULL and ****.
    got = await jdbc.probe("ddl_tx", url(guarded), guarded.token())
    assert got["row"] == "7 seven 2024-01-02"
    assert got["sum"] == "7"

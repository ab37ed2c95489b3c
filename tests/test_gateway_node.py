"""node-postgres (``pg``) through the gateway, as a Node.js agent would use it.

``tests/clients/node/probe.js`` runs one scenario per process and prints what it saw;
these tests assert on that. Covered: the token as password (refused, expired and expiring
mid-session tokens), TLS (``ssl`` without and with verification), parameterized queries
with arrays, json, bytea and timestamps, named prepared statements (``{name, text,
values}``), simple multi-statement queries, transactions, pg's pipeline mode, ``Pool``,
pg's own cancel (a CancelRequest with the gateway's key), a policy refusal (42501, the
session goes on) and masked columns.

``pg`` is installed once with npm into a cache outside the repository
(``~/.cache/hoopops-tests`` or ``$HOOPOPS_NODE_CACHE``); without node, or when npm cannot
install it, the tests skip and say which.
"""

from __future__ import annotations

import fcntl
import json
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

PROBE = Path(__file__).resolve().parent / "clients" / "node" / "probe.js"
PG_VERSION = "8.23.1"


class Node:
    def __init__(self, node: str, modules: Path) -> None:
        self.node = node
        self.modules = modules

    async def probe(self, scenario: str, gw: RunningGateway, token: str, ssl: str = "off",
                    *args: str) -> dict[str, str]:
        """Run one scenario; its key=value lines (fails on an unexpected exception)."""
        env = {**os.environ, "NODE_PATH": str(self.modules), "PGHOST": "127.0.0.1",
               "PGPORT": str(gw.port), "PGDATABASE": "appdb", "PGUSER": "agent",
               "PGPASSWORD": token, "PROBE_SSL": ssl}
        done = await run([self.node, "--no-deprecation", str(PROBE), scenario, *args],
                         env=env, within=90)
        lines = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
        assert done.returncode == 0 and "unexpected" not in lines, (
            f"{scenario}: exit {done.returncode}\n{done.stdout}\n{done.stderr[-2000:]}")
        return lines


def _cache() -> Path:
    root = os.environ.get("HOOPOPS_NODE_CACHE") or Path.home() / ".cache" / "hoopops-tests"
    return Path(root) / f"node-pg-{PG_VERSION}"


def _installed(cache: Path) -> bool:
    package = cache / "node_modules" / "pg" / "package.json"
    return package.is_file() and json.loads(package.read_text()).get("version") == PG_VERSION


def _npm_error(stderr: str) -> str:
    """npm's own summary of a failed install (its code and message, not the stack)."""
    lines = [line.removeprefix("npm error").removeprefix("npm ERR!").strip()
             for line in stderr.splitlines() if line.startswith(("npm error", "npm ERR!"))]
    summary = [line for line in lines if line.startswith(("code ", "FetchError", "network",
                                                           "404", "notarget"))]
    return "; ".join(summary[:3] or lines[:3] or [stderr.strip()[-300:]])


@pytest.fixture(scope="session")
def node_pg() -> Node:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node-postgres tests need Node.js: no node on PATH")
    cache = _cache()
    if not _installed(cache):
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip(f"node-postgres tests need pg@{PG_VERSION} in {cache}: no npm on PATH "
                        "to install it (apt-get install npm)")
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            pytest.skip(f"node-postgres tests need pg@{PG_VERSION}: cannot create {cache} "
                        f"to install it ({exc}); set HOOPOPS_NODE_CACHE")
        with (cache / ".install-lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent runs install it once
            if not _installed(cache):
                try:
                    done = subprocess.run(
                        [npm, "install", "--prefix", str(cache), "--no-audit", "--no-fund",
                         "--fetch-retries=1", f"pg@{PG_VERSION}"],
                        capture_output=True, text=True, timeout=300, check=False)
                    failure = _npm_error(done.stderr) if done.returncode else None
                except subprocess.TimeoutExpired:
                    failure = "timed out after 300 s"
                if failure is not None or not _installed(cache):
                    pytest.skip(f"node-postgres tests need pg@{PG_VERSION}: npm could not "
                                f"install it into {cache}: {failure}")
    return Node(node, cache / "node_modules")




@pytest.fixture(scope="module")
def people(pg: LocalPostgres) -> str:
    """A table in the target database with one person whose ssn masking covers."""
    return people_table(pg, "node")


@pytest.fixture
async def guarded(gateway_factory, tmp_path: Path, people: str
                  ) -> AsyncIterator[RunningGateway]:
    yield await gateway_factory(policies=policy_folder(tmp_path, people))


def _assert_basic(got: dict[str, str]) -> None:
    assert got["select"] == "42"
    assert got["n"] == "1099511627777"  # int8 and numeric arrive as strings in pg
    assert got["t"] == "héllo ✓"
    assert got["d"] == "12345.6789"
    assert got["ts"] == "2024-02-29T12:30:15.123Z"
    assert got["b"] == "00ff10"
    assert json.loads(got["a"]) == [1, None, 3]
    assert json.loads(got["j"]) == {"k": [1, 2]}
    assert got["nul"] == "null"
    assert json.loads(got["ta"]) == ["a", "b,c", 'd"e']
    assert got["u"] == "6f1c8a5e-2f7b-4a8e-9d3c-0b1e2f3a4b5c"
    assert json.loads(got["js"]) == [{"x": 1}]
    # The named statement is parsed once and re-bound seven times.
    assert json.loads(got["squares"]) == [i * i for i in range(1, 9)]
    assert json.loads(got["row_mode_array"]) == [[1, 2]]
    assert json.loads(got["multi"]) == [{"one": 1}, {"two": "two"}]
    assert got["undefined.code"] == "42P01"
    assert got["division.code"] == "22012"
    assert got["division_again"] == "2"
    assert got["rolled_back.code"] == "42P01"
    assert got["committed"] == "7"


async def test_node_queries_types_prepared_and_transactions(node_pg: Node,
                                                            gateway: RunningGateway) -> None:
    got = await node_pg.probe("basic", gateway, gateway.token())
    assert got["tls"] == "none"
    _assert_basic(got)


async def test_node_pipeline_pool_and_cancel(node_pg: Node, gateway: RunningGateway) -> None:
    got = await node_pg.probe("pipeline", gateway, gateway.token())
    # 200 queries on the wire at once, one failing in the middle: every answer in order.
    assert (got["pipelined"], got["pipelined_error"]) == ("true", "22012")

    got = await node_pg.probe("pool", gateway, gateway.token())
    assert got["pool_values"] == "true"
    assert got["pool_backends"] == "4"
    assert got["pool_tx"] == "in tx"

    got = await node_pg.probe("cancel", gateway, gateway.token())
    assert got["cancel.code"] == "57014"
    assert int(got["cancel_ms"]) < 10_000
    assert got["after_cancel"] == "alive"


async def test_node_tls(node_pg: Node, gateway_factory, tmp_path: Path) -> None:
    cert, key = write_self_signed_cert(tmp_path)
    other, _ = write_self_signed_cert(tmp_path, stem="other")
    tls = await gateway_factory(f"tls:\n  cert: {cert}\n  key: {key}\n")
    got = await node_pg.probe("basic", tls, tls.token(), "require")
    assert got["tls"].startswith("TLSv1."), got["tls"]
    _assert_basic(got)
    got = await node_pg.probe("pipeline", tls, tls.token(), str(cert))
    assert got["pipelined"] == "true"
    # The CancelRequest comes over TLS as well.
    got = await node_pg.probe("cancel", tls, tls.token(), str(cert))
    assert (got["cancel.code"], got["after_cancel"]) == ("57014", "alive")
    got = await node_pg.probe("connect", tls, tls.token(), str(other))
    assert "connected" not in got
    assert "certificate" in got["connect.message"], got


async def test_node_refused_and_expiring_tokens(node_pg: Node, gateway: RunningGateway
                                                ) -> None:
    got = await node_pg.probe("connect", gateway, gateway.token())
    assert got["connected"] == "yes"
    got = await node_pg.probe("connect", gateway, expired_token())
    assert got["connect.code"] == "28P01"
    assert "token expired" in got["connect.message"], got
    bad = gateway.token()[:-4] + "AAAA"
    got = await node_pg.probe("connect", gateway, bad)
    assert got["connect.code"] == "28P01"
    assert "signature" in got["connect.message"], got
    assert bad not in got["connect.message"]
    got = await node_pg.probe("connect", gateway, "not-a-token")
    assert got["connect.code"] == "28P01"
    assert "not a JWT" in got["connect.message"], got
    # A token that runs out mid-session: the gateway closes the session with a FATAL.
    got = await node_pg.probe("expiry", gateway, gateway.token(ttl=3))
    assert got["before"] == "ok"
    assert got["expired.code"] == "28000", got
    assert "your token expired" in got["expired.message"]


async def test_node_policy_refusal_and_masking(node_pg: Node, guarded: RunningGateway,
                                               people: str) -> None:
    got = await node_pg.probe("policy", guarded, guarded.token())
    for key in ("simple", "named", "named_again", "params", "in_tx"):
        assert got[f"{key}.code"] == "42501", (key, got)
        assert got[f"{key}.message"] == REFUSAL, (key, got)
    assert got["aborted.code"] == "25P02"
    assert got["after"] == got["after_tx"] == "0"

    # A refused named statement in pipeline mode: its later Binds (sent before the
    # refusal arrived) are refused as well, not answered "prepared statement does not
    # exist" by a server that never saw the Parse.
    got = await node_pg.probe("pipeline", guarded, guarded.token(), "off", "blocked")
    assert got["pipelined"] == "true", got["pipelined_wrong"]

    got = await node_pg.probe("mask", guarded, guarded.token(), "off", people)
    assert got["simple"] == "***-**-6789"
    assert json.loads(got["prepared"]) == json.loads(got["prepared_again"]) == {
        "ssn": "***-**-6789", "name": "Ann"}

    # Everything else reads back as stored with masking on, including a table created,
    # filled and committed in one transaction (the catalog missed it until the commit
    # and remembered that: its columns came back NULL).
    got = await node_pg.probe("basic", guarded, guarded.token())
    _assert_basic(got)

"""``hoopops replay`` and ``hoopops policy diff`` against sessions the real gateway recorded.

Each test records sessions through a gateway with audit on (asyncpg: extended protocol
with binary results and parameters; psycopg: extended protocol, text; psql: simple
protocol), then replays them into a sandbox: a second database on the same server with
the same schema and data as the target had before the sessions ran.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import textwrap
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import psycopg
import pytest

from hoopops.approvals import Decision
from hoopops.audit import StatementView
from hoopops.cli import main
from hoopops.devdb import SERVICE_USER, LocalPostgres
from hoopops.replay import (
    EMPTY_SHA256,
    ReplayError,
    ReplayReport,
    StatementReplay,
    diff_policies,
    replay_session,
)
from tests.clients.util import poll, psql_args, run
from tests.conftest import RunningGateway, psql_path

RULES = """\
default: block
rules:
{extra}
  - id: reads
    when: {{kinds: [read]}}
    action: allow
  - id: {write_rule}
    when: {{kinds: [write]}}
    action: {write_action}
  - id: transactions
    when: {{kinds: [tcl]}}
    action: allow
  - id: typos
    when: {{parse_error: true}}
    action: allow
masking:
  columns:
    "*.customers.ssn": {ssn}
"""
SSN_REVIEW = """\
  - id: ssn-needs-review
    when: {columns: [customers.ssn]}
    action: review
"""


def _policy(folder: Path, *, strict: bool = False, ssn: str = "last4",
            writes: str | None = None) -> Path:
    folder.mkdir()
    (folder / "policy.yaml").write_text(RULES.format(
        extra=SSN_REVIEW if strict else "", write_rule="no-writes" if strict else "writes",
        write_action=writes or ("block" if strict else "allow"), ssn=ssn))
    return folder


def _seed(schema: str) -> str:
    return textwrap.dedent(f"""
        CREATE SCHEMA {schema};
        CREATE TABLE {schema}.customers (id int PRIMARY KEY, name text NOT NULL,
                                         ssn text NOT NULL, email text);
        CREATE TABLE {schema}.orders (id serial PRIMARY KEY, customer_id int NOT NULL,
                                      amount numeric(10, 2) NOT NULL);
        INSERT INTO {schema}.customers VALUES
            (1, 'Ada', '123-45-6789', 'ada@example.com'),
            (2, 'Grace', '987-65-4321', 'grace@example.com'),
            (3, 'Linus', '555-12-3456', 'linus@example.com');
        INSERT INTO {schema}.orders (customer_id, amount) VALUES (1, 10.50), (2, 20.00);
    """)


@dataclass
class Recording:
    gw: RunningGateway
    schema: str
    sandbox_db: str
    sandbox_dsn: str
    sessions: dict[str, str]  # client name -> session id
    permissive: Path
    strict: Path
    remask: Path


async def _psql_admin(pg: LocalPostgres, sql: str, database: str = "postgres",
                      user: str = "postgres") -> str:
    return await asyncio.to_thread(pg.psql, sql, database, user)


@pytest.fixture
async def recording(gateway_factory: object, pg: LocalPostgres, tmp_path: Path
                    ) -> Recording:
    schema = "rp_" + secrets.token_hex(4)
    sandbox_db = "rp_sandbox_" + secrets.token_hex(4)
    # The target ("app") and the sandbox start from the same schema and data.
    await _psql_admin(pg, _seed(schema), "app", SERVICE_USER)
    await _psql_admin(pg, f"CREATE DATABASE {sandbox_db} OWNER {SERVICE_USER}")
    await _psql_admin(pg, _seed(schema), sandbox_db, SERVICE_USER)
    permissive = _policy(tmp_path / "permissive")
    gw: RunningGateway = await gateway_factory(  # type: ignore[operator]
        policies=permissive, audit=True)
    s = schema
    sessions: dict[str, str] = {}

    # asyncpg first: it reads every customer, before the psycopg session renames one.
    conn = await asyncpg.connect(gw.dsn(), server_settings={"application_name": "rp-asyncpg"})
    try:
        rows = await conn.fetch(f"SELECT id, name, ssn FROM {s}.customers ORDER BY id")
        assert [r["ssn"] for r in rows] == ["***-**-6789", "***-**-4321", "***-**-3456"]
        assert await conn.fetchval(f"SELECT name FROM {s}.customers WHERE id = $1", 2) \
            == "Grace"
    finally:
        await conn.close()

    async with await psycopg.AsyncConnection.connect(
            gw.dsn(), autocommit=True, application_name="rp-psycopg") as pconn:
        await pconn.execute(f"SELECT id, name, ssn FROM {s}.customers ORDER BY id")  # 1
        await pconn.execute(f"SELECT name FROM {s}.customers WHERE id = %s", (2,))  # 2
        await pconn.execute(f"INSERT INTO {s}.orders (customer_id, amount) "  # 3
                            "VALUES (%s, %s)", (3, "7.25"))
        await pconn.execute(f"UPDATE {s}.customers SET name = %s WHERE id = %s",  # 4
                            ("Linus T", 3))
        await pconn.execute(f"SELECT id, name FROM {s}.customers WHERE id = 3")  # 5
        await pconn.execute(f"SELECT count(*), sum(amount) FROM {s}.orders")  # 6
        async with pconn.transaction():  # 7 BEGIN, 8, 9 COMMIT
            await pconn.execute(f"SELECT email FROM {s}.customers WHERE id = 1")
        with pytest.raises(psycopg.errors.SyntaxError):  # 10: the server refuses it
            await pconn.execute(f"SELEC name FROM {s}.customers WHERE id = %s", (1,))

    env = {**gw.env(), "PGAPPNAME": "rp-psql"}
    done = await run(psql_args(psql_path(pg), gw.port, "-At",
                               "-c", f"SELECT id, name, ssn FROM {s}.customers WHERE id = 1",
                               "-c", f"UPDATE {s}.customers SET email = 'ada@new.example' "
                               "WHERE id = 1",
                               "-c", f"SELECT id, email FROM {s}.customers ORDER BY id"),
                     env=env)
    assert done.returncode == 0, done.stderr

    store = gw.gateway.store  # type: ignore[attr-defined]

    async def all_ended() -> bool:
        found = {v.application_name: v for v in await store.list_sessions()}
        if all(name in found and found[name].ended_at is not None
               for name in ("rp-asyncpg", "rp-psycopg", "rp-psql")):
            sessions.update({name.removeprefix("rp-"): found[name].id
                             for name in ("rp-asyncpg", "rp-psycopg", "rp-psql")})
            return True
        return False

    # A session's end is recorded after its statements' outcomes are on disk.
    await poll(all_ended, what="the three recorded sessions to end")
    recording = Recording(gw, schema, sandbox_db, pg.dsn(database=sandbox_db), sessions,
                          permissive, _policy(tmp_path / "strict", strict=True),
                          _policy(tmp_path / "remask", ssn="redact"))
    yield recording
    await _psql_admin(pg, f"DROP DATABASE {sandbox_db} WITH (FORCE)")
    await _psql_admin(pg, f"DROP SCHEMA {schema} CASCADE", "app", SERVICE_USER)


async def _replay(rec: Recording, client: str, policies: Path | None = None
                  ) -> ReplayReport:
    return await replay_session(rec.gw.config, rec.sessions[client], rec.sandbox_dsn,
                                policies, statement_timeout=30)


def _by_seq(report: ReplayReport) -> dict[int, StatementReplay]:
    return {s.seq: s for s in report.statements}


async def _main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- same database, same policy: nothing drifts ---------------------------------------------


async def test_replay_with_the_same_policy_reproduces_every_hash(
        recording: Recording, pg: LocalPostgres, capsys: pytest.CaptureFixture[str]) -> None:
    for client in ("asyncpg", "psycopg", "psql"):
        report = await _replay(recording, client)
        assert not report.drift, report.render()
        ran = [s for s in report.statements if s.status == "ran"]
        assert ran and all(s.compared and s.hash_now == s.hash_then for s in ran)
        assert all(s.decision_now == s.decision_then == "allow" for s in report.statements)
    # psycopg: reads with masking, writes, reads of what the writes changed, a transaction.
    report = await _replay(recording, "psycopg")
    st = _by_seq(report)
    assert [st[n].status for n in sorted(st)] == ["ran"] * 6 + ["skipped", "ran", "skipped",
                                                                "ran"]
    assert st[10].sqlstate_then == st[10].sqlstate_now == "42601"
    assert st[7].sql == "BEGIN" and st[9].sql == "COMMIT"
    assert st[1].masking_then == st[1].masking_now == {
        (f"{recording.schema}.customers.ssn", "last4"): 3}
    assert st[1].hash_now != EMPTY_SHA256 and st[5].tag_now == "SELECT 1"
    assert st[4].tag_now == "UPDATE 1" and st[4].hash_now == EMPTY_SHA256
    # asyncpg asked for binary results, which the trail does not say; the replay found them
    # (a lone text column reads the same either way, so text already matches there).
    asyncpg_report = _by_seq(await _replay(recording, "asyncpg"))
    assert asyncpg_report[1].result_formats == "binary"
    assert asyncpg_report[2].result_formats == "text"

    # The sandbox transaction was rolled back: the replayed UPDATE and INSERT left nothing.
    sandbox = await asyncpg.connect(recording.sandbox_dsn)
    try:
        s = recording.schema
        assert await sandbox.fetchval(f"SELECT name FROM {s}.customers WHERE id = 3") == "Linus"
        assert await sandbox.fetchval(f"SELECT count(*) FROM {s}.orders") == 2
        assert await sandbox.fetchval(f"SELECT email FROM {s}.customers WHERE id = 1") \
            == "ada@example.com"
    finally:
        await sandbox.close()

    code, out, err = await _main(capsys, "replay", recording.sessions["psycopg"][:12],
                                 "--sandbox", recording.sandbox_dsn, "--config",
                                 str(recording.gw.config.file), "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["drift"] is False and data["counts"]["ran"] == 8
    assert data["counts"]["skipped"] == 2
    code, out, _ = await _main(capsys, "replay", recording.sessions["psql"], "--sandbox",
                               recording.sandbox_dsn, "--config",
                               str(recording.gw.config.file))
    assert code == 0 and "no drift" in out and "rolled back" in out


async def test_replay_refuses_a_configured_target(recording: Recording, pg: LocalPostgres,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    # The target itself, also spelt differently (localhost for 127.0.0.1, another user).
    for dsn in (pg.dsn(), pg.dsn(host="localhost"), pg.dsn("postgres", database="app")):
        with pytest.raises(ReplayError, match="configured target 'appdb'"):
            await replay_session(recording.gw.config, recording.sessions["psql"], dsn)
    code, out, err = await _main(capsys, "replay", recording.sessions["psql"], "--sandbox",
                                 pg.dsn(host="localhost"), "--config",
                                 str(recording.gw.config.file))
    assert code == 2 and out == ""
    assert "refusing to replay into localhost:" in err and "target 'appdb'" in err
    with pytest.raises(ReplayError, match="no session 'nope-"):
        await replay_session(recording.gw.config, "nope-not-a-session",
                             recording.sandbox_dsn)


# -- a stricter policy: decision drift for exactly the statements it now refuses ------------


async def test_replay_with_a_stricter_policy_reports_decision_drift(
        recording: Recording, capsys: pytest.CaptureFixture[str]) -> None:
    report = await _replay(recording, "psycopg", recording.strict)
    st = _by_seq(report)
    decision_drift = {n for n, s in st.items() if s.decision_drift}
    assert decision_drift == {1, 3, 4}
    assert (st[1].decision_now, st[1].rule_now) == ("review", "ssn-needs-review")
    assert (st[3].decision_now, st[3].rule_now) == ("block", "no-writes")
    assert (st[4].decision_now, st[4].rule_now) == ("block", "no-writes")
    assert all(st[n].status == "not run" for n in (1, 3, 4))
    assert "holds it for approval" in (st[1].note or "")
    assert "blocks it" in (st[3].note or "")
    # What the refused writes would have changed now reads differently: result drift.
    assert {n for n, s in st.items() if s.result_drift} == {5, 6}
    assert st[2].status == "ran" and not st[2].drift
    assert st[5].hash_now != st[5].hash_then

    code, out, _ = await _main(capsys, "replay", recording.sessions["psycopg"], "--sandbox",
                               recording.sandbox_dsn, "--policies", str(recording.strict),
                               "--config", str(recording.gw.config.file), "--json")
    assert code == 1
    data = json.loads(out)
    assert data["drift"] is True
    assert data["counts"]["decision_drift"] == 3 and data["counts"]["result_drift"] == 2
    assert [s["seq"] for s in data["statements"] if s["decision"]["drift"]] == [1, 3, 4]

    # Masking drift: the same reads under a policy that redacts SSNs instead.
    report = await _replay(recording, "psycopg", recording.remask)
    st = _by_seq(report)
    assert {n for n, s in st.items() if s.masking_drift} == {1}
    assert st[1].masking_now == {(f"{recording.schema}.customers.ssn", "redact"): 3}
    assert st[1].result_drift and not st[1].decision_drift


# -- a changed row in the sandbox: result-hash drift for the statements that read it --------


async def test_replay_reports_result_drift_for_a_changed_row(
        recording: Recording, capsys: pytest.CaptureFixture[str]) -> None:
    sandbox = await asyncpg.connect(recording.sandbox_dsn)
    try:
        await sandbox.execute(f"UPDATE {recording.schema}.customers SET name = 'Grace H' "
                              "WHERE id = 2")
    finally:
        await sandbox.close()
    report = await _replay(recording, "psycopg")
    st = _by_seq(report)
    assert {n for n, s in st.items() if s.result_drift} == {1, 2}
    assert not any(s.decision_drift or s.masking_drift for s in report.statements)
    assert st[2].sample_then == {"columns": ["name"], "rows": [["Grace"]], "truncated": False}
    assert st[2].sample_now == {"columns": ["name"], "rows": [["Grace H"]], "truncated": False}
    # Binary results (asyncpg) drift the same way; so does the simple protocol (psql) not,
    # since it never reads Grace's row.
    report = await _replay(recording, "asyncpg")
    assert {s.seq for s in report.statements if s.result_drift} == {1, 2}
    assert not (await _replay(recording, "psql")).drift

    code, out, _ = await _main(capsys, "replay", recording.sessions["psycopg"], "--sandbox",
                               recording.sandbox_dsn, "--config",
                               str(recording.gw.config.file))
    assert code == 1
    assert "DRIFT in 2 statement(s): 0 decision, 2 result, 0 masking" in out
    assert "Grace" not in out  # the text report shows hashes, not data


# -- policy diff: no database, just the recorded statements under a candidate ---------------


async def test_policy_diff_lists_exactly_the_decisions_that_change(
        recording: Recording, capsys: pytest.CaptureFixture[str]) -> None:
    config = recording.gw.config
    same = await diff_policies(config, recording.permissive)
    assert same.changes == [] and same.rule_changes == []
    assert same.sessions == 3 and same.statements == 2 + 10 + 3

    report = await diff_policies(config, recording.strict)
    changed = {(c.session_id, c.seq): (c.old_decision, c.old_rule, c.new_decision, c.new_rule)
               for c in report.changes}
    a, p, q = (recording.sessions[n] for n in ("asyncpg", "psycopg", "psql"))
    assert changed == {
        (a, 1): ("allow", "reads", "review", "ssn-needs-review"),
        (p, 1): ("allow", "reads", "review", "ssn-needs-review"),
        (p, 3): ("allow", "writes", "block", "no-writes"),
        (p, 4): ("allow", "writes", "block", "no-writes"),
        (q, 1): ("allow", "reads", "review", "ssn-needs-review"),
        (q, 2): ("allow", "writes", "block", "no-writes"),
    }
    assert all(c.subject == "agent-1" for c in report.changes)

    code, out, _ = await _main(capsys, "policy", "diff", "--policies", str(recording.strict),
                               "--config", str(config.file), "--since", "1h", "--json")
    assert code == 1
    data = json.loads(out)
    assert data["changed"] == 6
    first = data["changes"][0]
    assert set(first) >= {"statement_id", "session_id", "identity", "sql", "old", "new"}
    code, out, _ = await _main(capsys, "policy", "diff", "--policies", str(recording.strict),
                               "--config", str(config.file))
    assert code == 1 and "6 decision(s) would change" in out
    assert "allow (writes) -> block (no-writes)" in out
    # Nothing recorded before a day ago: nothing to change.
    code, out, _ = await _main(capsys, "policy", "diff", "--policies", str(recording.strict),
                               "--config", str(config.file), "--until", "1d")
    assert code == 0 and "no decision would change" in out


# -- approvals: what ran on an approval runs again; what was denied never runs -------------


async def test_replay_of_reviewed_statements(gateway_factory: object, pg: LocalPostgres,
                                             tmp_path: Path) -> None:
    schema = "rp_" + secrets.token_hex(4)
    sandbox_db = "rp_sandbox_" + secrets.token_hex(4)
    await _psql_admin(pg, _seed(schema), "app", SERVICE_USER)
    await _psql_admin(pg, f"CREATE DATABASE {sandbox_db} OWNER {SERVICE_USER}")
    await _psql_admin(pg, _seed(schema), sandbox_db, SERVICE_USER)
    reviewed = _policy(tmp_path / "reviewed", writes="review")
    gw: RunningGateway = await gateway_factory(  # type: ignore[operator]
        policies=reviewed, audit=True)
    broker = gw.gateway.broker  # type: ignore[attr-defined]
    store = gw.gateway.store  # type: ignore[attr-defined]

    async def decide(decision: Decision) -> None:
        async def pending() -> bool:
            return bool(await store.pending_approvals())
        await poll(pending, what="a pending approval")
        (view,) = await store.pending_approvals()
        await broker.decide(view.id, decision, "analyst")

    try:
        async with await psycopg.AsyncConnection.connect(
                gw.dsn(), autocommit=True, application_name="rp-reviewed") as conn:
            update = asyncio.ensure_future(conn.execute(
                f"UPDATE {schema}.customers SET name = 'Ada L' WHERE id = 1"))
            await decide(Decision.APPROVED_ONCE)
            await update
            delete = asyncio.ensure_future(conn.execute(
                f"DELETE FROM {schema}.customers WHERE id = 2"))
            await decide(Decision.DENIED)
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                await delete
            await conn.execute(f"SELECT id, name FROM {schema}.customers ORDER BY id")

        async def ended() -> bool:
            return all(v.ended_at is not None for v in await store.list_sessions())
        await poll(ended, what="the session to end")
        (session,) = await store.list_sessions()

        report = await replay_session(gw.config, session.id, pg.dsn(database=sandbox_db))
        st = _by_seq(report)
        assert not report.drift, report.render()
        assert st[1].status == "ran" and "recorded approval" in (st[1].note or "")
        assert st[2].status == "not run" and "did not run when recorded" in (st[2].note or "")
        assert st[3].status == "ran" and st[3].hash_now == st[3].hash_then

        # Under a policy that allows writes, both decisions drift; the denied DELETE still
        # does not run (it never ran), so what the SELECT returns is unchanged.
        permissive = _policy(tmp_path / "permissive")
        report = await replay_session(gw.config, session.id, pg.dsn(database=sandbox_db),
                                      permissive)
        st = _by_seq(report)
        assert {n for n, s in st.items() if s.decision_drift} == {1, 2}
        assert st[2].status == "not run"
        assert not st[3].drift
    finally:
        await _psql_admin(pg, f"DROP DATABASE {sandbox_db} WITH (FORCE)")
        await _psql_admin(pg, f"DROP SCHEMA {schema} CASCADE", "app", SERVICE_USER)


# -- the pieces that make hashes reproducible, and the sandbox check -------------------------


def test_same_database_normalises_hosts() -> None:
    from hoopops.config import parse_upstream
    from hoopops.replay import same_database

    base = parse_upstream("postgresql://svc:pw@127.0.0.1:5432/app")
    assert same_database(base, parse_upstream("postgresql://other@LOCALHOST/app"))
    assert same_database(base, parse_upstream("postgres://x@[::1]:5432/app"))
    assert same_database(base, parse_upstream("postgresql://x@/app?host=/var/run/postgresql"))
    assert not same_database(base, parse_upstream("postgresql://svc@127.0.0.1:5433/app"))
    assert not same_database(base, parse_upstream("postgresql://svc@127.0.0.1/app_sandbox"))


def test_binary_parameters_and_result_formats() -> None:
    from hoopops.replay import adapt_param, format_candidates, wire_params

    assert wire_params(["7", None, {"hex": "0002"}]) == [
        (0, b"7"), (0, None), (1, b"\x00\x02")]
    # An int2 sent where the server infers int4 or numeric: the same number, as text.
    assert adapt_param(1, b"\x00\x02", 23) == (0, b"2")
    assert adapt_param(1, b"\xff\xfe", 1700) == (0, b"-2")
    # The right width, or a type that is not fixed-width: exactly as recorded.
    assert adapt_param(1, b"\x00\x00\x00\x02", 23) == (1, b"\x00\x00\x00\x02")
    assert adapt_param(1, b"ab", 25) == (1, b"ab")
    assert adapt_param(0, b"12", 21) == (0, b"12")

    view = StatementView(
        id=1, session_id="s", seq=1, received_at=0.0, sql="SELECT a, b", params=[],
        facts={}, decision="allow", rule_id=None, approval_id=None, started_at=0.0,
        finished_at=0.0, duration_ms=0.0, rows=1, command_tag="SELECT 1", sqlstate=None,
        error_message=None, result_sha256="0" * 64,
        result_sample={"columns": ["a", "b"], "rows": [["\\x00000001", "x"]],
                       "truncated": False})
    assert [f for _, f in format_candidates(view)] == [(), (1, 0), (1,)]

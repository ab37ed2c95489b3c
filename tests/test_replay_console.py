"""Sandbox replay from the console's replay viewer, against a real gateway and PostgreSQL.

A real gateway (audit on, a permissive policy that masks SSNs) records an asyncpg
session; the console opens it in the replay viewer, ``r`` re-runs it in a sandbox (a
second database on the same server, seeded like the target) through the replay's own
in-process gateway in a worker thread, and the drift report is read off the screen.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from textual.message import Message

from hoopops.cli import main
from hoopops.config import ConfigError, load_config, parse_upstream
from hoopops.devdb import SERVICE_USER, LocalPostgres
from hoopops.tui.app import ConsoleApp
from hoopops.tui.screens.drift import DriftScreen
from hoopops.tui.screens.help import HelpScreen
from hoopops.tui.screens.replay import ReplayScreen, SandboxProgress
from hoopops.tui.screens.sandbox_prompt import SandboxPrompt
from hoopops.tui.source import GatewaySource
from tests.clients.util import poll
from tests.conftest import RunningGateway, write_config
from tests.test_tui_console import _plain, until, until_async

POLICY = """\
default: block
rules:
  - id: reads
    when: {kinds: [read]}
    action: allow
masking:
  columns:
    "*.customers.ssn": last4
"""


def _seed(schema: str) -> str:
    return textwrap.dedent(f"""
        CREATE SCHEMA {schema};
        CREATE TABLE {schema}.customers (id int PRIMARY KEY, name text NOT NULL,
                                         ssn text NOT NULL);
        INSERT INTO {schema}.customers VALUES (1, 'Ada', '123-45-6789'),
                                              (2, 'Grace', '987-65-4321');
    """)


@dataclass
class Rig:
    gw: RunningGateway
    pg: LocalPostgres
    schema: str
    sandbox_db: str
    sandbox_dsn: str
    session_id: str

    def app(self) -> ConsoleApp:
        return ConsoleApp(GatewaySource(self.gw.gateway), refresh_interval=0.25,
                          decided_by="auditor@test", export_dir=self.evidence)

    @property
    def evidence(self) -> Path:
        return self.gw.config.file.parent / "evidence"


async def _admin(pg: LocalPostgres, sql: str, database: str = "postgres",
                 user: str = "postgres") -> None:
    await asyncio.to_thread(pg.psql, sql, database, user)


@pytest.fixture
async def sandbox(pg: LocalPostgres) -> AsyncIterator[tuple[str, str, str]]:
    """(schema, sandbox database, its DSN): the target "app" and the sandbox alike."""
    schema = "rc_" + secrets.token_hex(4)
    sandbox_db = "rc_sandbox_" + secrets.token_hex(4)
    await _admin(pg, _seed(schema), "app", SERVICE_USER)
    await _admin(pg, f"CREATE DATABASE {sandbox_db} OWNER {SERVICE_USER}")
    await _admin(pg, _seed(schema), sandbox_db, SERVICE_USER)
    yield schema, sandbox_db, pg.dsn(database=sandbox_db)
    await _admin(pg, f"DROP DATABASE {sandbox_db} WITH (FORCE)")
    await _admin(pg, f"DROP SCHEMA {schema} CASCADE", "app", SERVICE_USER)


async def _record(gw: RunningGateway, schema: str) -> str:
    conn = await asyncpg.connect(gw.dsn(), server_settings={"application_name": "rc-agent"})
    try:
        rows = await conn.fetch(f"SELECT id, name, ssn FROM {schema}.customers ORDER BY id")
        assert [r["ssn"] for r in rows] == ["***-**-6789", "***-**-4321"]
        assert await conn.fetchval(f"SELECT name FROM {schema}.customers WHERE id = $1",
                                   2) == "Grace"
        assert await conn.fetchval(f"SELECT count(*) FROM {schema}.customers") == 2
    finally:
        await conn.close()
    store = gw.gateway.store  # type: ignore[attr-defined]
    found: list[str] = []

    async def ended() -> bool:
        for view in await store.list_sessions():
            if view.application_name == "rc-agent" and view.ended_at is not None:
                found.append(view.id)
                return True
        return False

    await poll(ended, what="the recorded session to end")
    return found[0]


async def _rig(gateway_factory: Any, pg: LocalPostgres, tmp_path: Path,
               sandbox: tuple[str, str, str], extra: str) -> Rig:
    schema, sandbox_db, sandbox_dsn = sandbox
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "policy.yaml").write_text(POLICY)
    gw: RunningGateway = await gateway_factory(extra, policies=policies, audit=True)
    return Rig(gw, pg, schema, sandbox_db, sandbox_dsn, await _record(gw, schema))


@pytest.fixture
async def configured(gateway_factory: Any, pg: LocalPostgres, tmp_path: Path,
                     sandbox: tuple[str, str, str], monkeypatch: pytest.MonkeyPatch) -> Rig:
    """A gateway whose hoopops.yaml names the sandbox (replay.sandbox_env)."""
    variable = "HOOPOPS_TEST_SANDBOX_" + secrets.token_hex(3).upper()
    monkeypatch.setenv(variable, sandbox[2])
    return await _rig(gateway_factory, pg, tmp_path, sandbox,
                      f"replay:\n  sandbox_env: {variable}\n")


@pytest.fixture
async def unconfigured(gateway_factory: Any, pg: LocalPostgres, tmp_path: Path,
                       sandbox: tuple[str, str, str]) -> Rig:
    return await _rig(gateway_factory, pg, tmp_path, sandbox, "")


async def _open_replay(pilot: Any, app: ConsoleApp, session_id: str) -> ReplayScreen:
    app.open_replay(session_id)
    await until(pilot, lambda: isinstance(app.screen, ReplayScreen), what="the replay viewer")
    screen = app.screen
    assert isinstance(screen, ReplayScreen)
    await until(pilot, lambda: len(screen.statements) == 3, what="the recorded statements")
    return screen


async def _drift_report(pilot: Any, app: ConsoleApp) -> DriftScreen:
    await until(pilot, lambda: isinstance(app.screen, DriftScreen), within=60,
                what="the drift report")
    screen = app.screen
    assert isinstance(screen, DriftScreen)
    await until(pilot, lambda: screen.table.row_count == len(screen.report.statements),
                what="the drift table")
    return screen


def _mark(screen: DriftScreen, statement_id: int) -> str:
    return screen.table.get_cell(str(statement_id), "mark").plain.strip()


async def test_r_replays_into_the_configured_sandbox_and_reports_drift(
        configured: Rig) -> None:
    rig = configured
    app = rig.app()
    seen: list[Message] = []
    async with app.run_test(size=(140, 40), message_hook=seen.append) as pilot:
        replay = await _open_replay(pilot, app, rig.session_id)
        assert replay.check_action("sandbox_replay", ()) is True
        # Like every key: in ? (with its id for console.keymap) and in the palette.
        assert "Sandbox replay" in [c.title for c in app.get_system_commands(replay)]
        await pilot.press("question_mark")
        await until(pilot, lambda: isinstance(app.screen, HelpScreen), what="help")
        assert ("r", "Re-run the session in the sandbox database and show the drift report",
                "replay.sandbox") in app.screen.keys  # type: ignore[attr-defined]
        await pilot.press("escape")
        await until(pilot, lambda: app.screen is replay, what="help to close")
        await pilot.press("r")
        drift = await _drift_report(pilot, app)
        # The replay thread reported each statement as it went (the position line showed
        # "statement n/3" meanwhile; see test_tui_snapshots).
        assert [(m.done, m.total) for m in seen if isinstance(m, SandboxProgress)] == [
            (0, 3), (1, 3), (2, 3)]
        report = drift.report
        assert [s.status for s in report.statements] == ["ran", "ran", "ran"]
        assert not report.drift, report.render()
        assert all(s.result_drift is False and s.compared for s in report.statements)
        assert "3 statements, 0 drifted" in _plain(drift.query_one("#drift-summary"))
        assert {_mark(drift, s.statement_id) for s in report.statements} == {"ok"}
        masking = drift.table.get_cell(str(report.statements[0].statement_id), "masking")
        assert masking.plain == "ssn last4 x2"
        # The DSN's password is nowhere on the screen (head shows user@host:port/db).
        head = _plain(drift.query_one("#drift-head"))
        assert f"{SERVICE_USER}@127.0.0.1:{rig.pg.port}/{rig.sandbox_db}" in head
        assert rig.pg.service_password not in head

        # A row changed in the sandbox: the two reads that return it no longer match the
        # recording; the count does.
        await _admin(rig.pg, f"UPDATE {rig.schema}.customers SET name = 'Gracie' "
                     "WHERE id = 2", rig.sandbox_db, SERVICE_USER)
        await pilot.press("escape")
        await until(pilot, lambda: app.screen is replay, what="back to the replay viewer")
        assert "sandbox: no drift" in _plain(replay.query_one("#replay-position"))
        await pilot.press("r")
        drift = await _drift_report(pilot, app)
        report = drift.report
        every, by_id, count = replay.statements
        assert [s.statement_id for s in report.drifted] == [every.id, by_id.id]
        for st, recorded in zip(report.drifted, (every, by_id), strict=True):
            assert st.result_drift and not st.decision_drift and not st.masking_drift
            assert st.hash_now != st.hash_then == recorded.result_sha256
        # Rows then and now read alike, also asyncpg's binary-format ids (masked as sent).
        assert every.result_sample is not None and report.drifted[0].sample_now is not None
        assert every.result_sample["rows"][1] == ["2", "Grace", "***-**-4321"]
        assert report.drifted[0].sample_now["rows"] == [["1", "Ada", "***-**-6789"],
                                                        ["2", "Gracie", "***-**-4321"]]
        assert "3 statements, 2 drifted (0 decision, 2 result, 0 masking)" in _plain(
            drift.query_one("#drift-summary"))
        assert [_mark(drift, s.id) for s in (every, by_id, count)] == ["DRIFT", "DRIFT", "ok"]
        assert drift.table.get_cell(str(by_id.id), "result").plain == "DRIFT (hash)"
        assert drift.table.get_cell(str(count.id), "result").plain == "match"
        # The cursor starts on the first drifted row; n moves to the next one, whose
        # detail shows the (masked) rows then and now.
        assert drift.table.selected_key == str(every.id)
        await pilot.press("n")
        assert drift.table.selected_key == str(by_id.id)
        detail = _plain(drift.query_one("#drift-detail"))
        assert detail.index("Grace") < detail.index("rows now") < detail.index("Gracie")
        # e: the report as evidence (the `hoopops replay --json` document).
        await pilot.press("e")
        await until(pilot, lambda: drift.last_export is not None, what="the export")
        text = await asyncio.to_thread(Path(drift.last_export or "").read_text)
        exported = json.loads(text)
        assert exported["schema"] == "hoopops.replay/1" and exported["drift"] is True
        assert exported["exported_by"] == "auditor@test"
        assert Path(drift.last_export or "").parent == rig.evidence
        assert rig.pg.service_password not in text
        # enter: back to the replay viewer, at that statement.
        await pilot.press("enter")
        await until(pilot, lambda: app.screen is replay, what="back to the replay viewer")
        assert replay.index == 1
        assert "sandbox: 2 of 3 drifted" in _plain(replay.query_one("#replay-position"))
        assert any("2 drifted" in a for a in app.actions)


async def test_leaving_the_viewer_stops_a_replay_stuck_on_the_sandbox(configured: Rig) -> None:
    """A sandbox statement that hangs (a lock held elsewhere) does not keep the replay, or
    the console, waiting once the analyst leaves the viewer."""
    rig = configured
    lock = await asyncpg.connect(rig.pg.dsn(database=rig.sandbox_db))
    watch = await asyncpg.connect(rig.pg.admin_dsn)

    async def replay_backends() -> int:
        return int(await watch.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND "
            "application_name LIKE 'hoopops replay %'", rig.sandbox_db))

    try:
        tx = lock.transaction()
        await tx.start()
        await lock.execute(f"LOCK TABLE {rig.schema}.customers IN ACCESS EXCLUSIVE MODE")
        app = rig.app()
        async with app.run_test(size=(120, 36)) as pilot:
            replay = await _open_replay(pilot, app, rig.session_id)
            await pilot.press("r")
            await until_async(pilot, lambda: _is(replay_backends(), 1), within=20,
                              what="the replay to reach the locked table")
            assert replay.sandbox_progress is not None
            assert "sandbox replay running" in _plain(replay.query_one("#replay-position"))
            await pilot.press("escape")
            # The lock is still held: only the cancellation can end the replay's session.
            await until_async(pilot, lambda: _is(replay_backends(), 0), within=5,
                              what="the cancelled replay to close its sandbox session")
            assert not isinstance(app.screen, DriftScreen)
        await tx.rollback()
    finally:
        await lock.close()
        await watch.close()


async def _is(count: Any, expected: int) -> bool:
    return await count == expected


async def test_without_a_configured_sandbox_the_console_asks_and_refuses_a_target(
        unconfigured: Rig) -> None:
    rig = unconfigured
    app = rig.app()
    async with app.run_test(size=(120, 36)) as pilot:
        replay = await _open_replay(pilot, app, rig.session_id)
        await pilot.press("r")
        await until(pilot, lambda: isinstance(app.screen, SandboxPrompt), what="the prompt")
        prompt = app.screen
        assert isinstance(prompt, SandboxPrompt)
        from textual.widgets import Input

        url = prompt.query_one("#sandbox-url", Input)
        password = prompt.query_one("#sandbox-password", Input)
        assert password.password  # typed as dots
        # The target's own database, spelled differently: refused, the prompt stays.
        url.value = f"postgresql://{SERVICE_USER}@localhost:{rig.pg.port}/app"
        password.value = rig.pg.service_password
        await pilot.press("enter")
        await until(pilot, lambda: "refusing" in _plain(prompt.query_one("#sandbox-error")),
                    what="the refusal")
        error = _plain(prompt.query_one("#sandbox-error"))
        assert "target 'appdb'" in error and rig.pg.service_password not in error
        assert app.screen is prompt and app.sandbox_dsn is None
        # A server that is not there passes the checks but fails the replay: a
        # notification, and the next r asks again rather than retrying the typo.
        url.value = f"postgresql://{SERVICE_USER}@127.0.0.1:1/{rig.sandbox_db}"
        url.focus()
        await pilot.press("enter")
        await until(pilot, lambda: any(n.title == "Sandbox replay failed"
                                       for n in app._notifications), within=30,
                    what="the failure notification")
        assert app.screen is replay and app.sandbox_dsn is None
        await pilot.press("r")
        await until(pilot, lambda: isinstance(app.screen, SandboxPrompt), what="asked again")
        prompt = app.screen
        assert isinstance(prompt, SandboxPrompt)
        url = prompt.query_one("#sandbox-url", Input)
        password = prompt.query_one("#sandbox-password", Input)
        # The sandbox, with the password in its own field.
        url.value = f"postgresql://{SERVICE_USER}@127.0.0.1:{rig.pg.port}/{rig.sandbox_db}"
        password.value = rig.pg.service_password
        url.focus()
        await pilot.press("enter")
        drift = await _drift_report(pilot, app)
        assert not drift.report.drift, drift.report.render()
        assert rig.pg.service_password not in drift.report.sandbox
        # Asked once per console; kept in memory with the password from its own field.
        assert app.sandbox_dsn is not None
        assert parse_upstream(app.sandbox_dsn) == parse_upstream(rig.sandbox_dsn)
        await pilot.press("escape")
        await until(pilot, lambda: app.screen is replay, what="back to the replay viewer")
        await pilot.press("r")
        await _drift_report(pilot, app)


async def test_the_sandbox_key_is_remappable(unconfigured: Rig) -> None:
    app = ConsoleApp(GatewaySource(unconfigured.gw.gateway), keymap={"replay.sandbox": "S"},
                     decided_by="auditor@test")
    async with app.run_test(size=(120, 36)) as pilot:
        assert not any("unknown binding" in n.message for n in app._notifications)
        await _open_replay(pilot, app, unconfigured.session_id)
        await pilot.press("r")
        await pilot.pause(0.2)
        assert not isinstance(app.screen, SandboxPrompt)
        await pilot.press("S")
        await until(pilot, lambda: isinstance(app.screen, SandboxPrompt), what="the prompt")
        await pilot.press("escape")
        await until(pilot, lambda: isinstance(app.screen, ReplayScreen), what="cancelled")


async def test_a_sandbox_that_cannot_be_reached_is_a_notification(
        gateway_factory: Any, pg: LocalPostgres, tmp_path: Path,
        sandbox: tuple[str, str, str]) -> None:
    # Port 1 on loopback: nothing listens there, so the connection is refused at once.
    rig = await _rig(gateway_factory, pg, tmp_path, sandbox,
                     "replay:\n  sandbox: postgresql://nobody:pw-xyz@127.0.0.1:1/nodb\n")
    app = rig.app()
    async with app.run_test(size=(120, 36)) as pilot:
        replay = await _open_replay(pilot, app, rig.session_id)
        await pilot.press("r")
        await until(pilot, lambda: any(n.title == "Sandbox replay failed"
                                       for n in app._notifications), within=30,
                    what="the failure notification")
        note = next(n for n in app._notifications if n.title == "Sandbox replay failed")
        assert "sandbox" in note.message and "127.0.0.1:1" in note.message
        assert "unreachable" in note.message and "pw-xyz" not in note.message
        # Still usable: same screen, r available again, stepping works.
        assert app.screen is replay and replay.sandbox_progress is None
        assert replay.check_action("sandbox_replay", ()) is True
        await pilot.press("right_square_bracket")
        assert replay.index == 1


# -- hoopops.yaml and the CLI ------------------------------------------------------------


def _config_with(tmp_path: Path, pg: LocalPostgres, replay: str) -> Path:
    return write_config(tmp_path, pg, "replay:\n" + textwrap.indent(replay, "  "),
                        audit=True)


@pytest.mark.parametrize(("replay", "key", "reason"), [
    ("sandboxx: postgresql://u@h/db\n", "replay.sandboxx", "unknown key"),
    ("sandbox: mysql://u:pw-secret@h/db\n", "replay.sandbox",
     "expected a postgresql://"),
    ("sandbox: env:HOOPOPS_TEST_NO_SUCH_VARIABLE\n", "replay.sandbox",
     "HOOPOPS_TEST_NO_SUCH_VARIABLE is not set"),
    ("policies: no-such-folder\n", "replay.policies", "file not found"),
])
def test_bad_replay_section_names_file_line_and_key(
        tmp_path: Path, pg: LocalPostgres, replay: str, key: str, reason: str) -> None:
    path = _config_with(tmp_path, pg, replay)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    error = caught.value
    lines = path.read_text().splitlines()
    assert error.file == str(path) and error.key == key
    assert error.line == lines.index("replay:") + 2
    assert reason in str(error) and "pw-secret" not in str(error)


def test_a_configured_target_as_sandbox_is_refused(tmp_path: Path, pg: LocalPostgres) -> None:
    # The target is 127.0.0.1:PORT/app; localhost is the same server.
    path = _config_with(tmp_path, pg, f"sandbox: postgresql://{SERVICE_USER}:pw-secret@"
                        f"localhost:{pg.port}/app\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.key == "replay.sandbox"
    assert "configured target 'appdb'" in str(caught.value)
    assert "pw-secret" not in str(caught.value)
    # Another database on that server is a sandbox.
    path = _config_with(tmp_path, pg, f"sandbox: postgresql://{SERVICE_USER}:pw-secret@"
                        f"localhost:{pg.port}/app_copy\npolicies: .\n")
    config = load_config(path)
    assert config.replay.sandbox is not None and config.replay.policies == tmp_path
    assert "pw-secret" not in repr(config)


async def test_cli_uses_the_configured_sandbox_by_default(
        configured: Rig, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(configured.gw.config.file)
    code = await asyncio.to_thread(main, ["replay", configured.session_id, "--config",
                                          config])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert f"into sandbox {SERVICE_USER}@127.0.0.1:{configured.pg.port}/" \
           f"{configured.sandbox_db}" in out and "no drift" in out


def test_cli_without_any_sandbox_says_how_to_give_one(
        tmp_path: Path, pg: LocalPostgres, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, pg, audit=True)
    assert main(["replay", "abcdef123456", "--config", str(path)]) == 2
    assert "give --sandbox DSN or set replay.sandbox" in capsys.readouterr().err


def test_the_password_field_joins_the_url_once() -> None:
    from hoopops.tui.screens.sandbox_prompt import with_password

    url = "postgresql://svc@db.example:5432/app_copy?sslmode=require"
    joined = with_password(url, "p@ss:w/rd")
    assert parse_upstream(joined).password == "p@ss:w/rd"
    assert parse_upstream(joined).host == "db.example"
    assert with_password(url, "") == url
    with pytest.raises(ValueError, match="one place"):
        with_password("postgresql://svc:pw@db/app", "other")
    with pytest.raises(ValueError, match="no user"):
        with_password("postgresql://db/app", "pw")

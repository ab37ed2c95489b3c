"""Hostile agent text on the analyst's screens: the console and the CLI show it, never obey it.

An agent controls its SQL, its ``application_name``, error texts that quote its input and
the values recorded in result samples. Sent through a real gateway to a real PostgreSQL,
that text must reach the analyst's terminal with every escape sequence, C1 control, bidi
override and zero-width character spelled out (``\\x1b``, ``\\u202e``), Rich/Textual markup
left as literal brackets, and floods of blank lines counted instead of pushing the real
statement out of view; exports keep the exact data, and CSV cannot run as a formula.
"""

from __future__ import annotations

import asyncio
import csv
import html
import io
import json
import re
import shutil
import sys
import time
import unicodedata
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from hoopops.config import load_config
from hoopops.devdb import free_port
from hoopops.display import folded, hidden_characters, visible
from hoopops.identity import mint_token
from hoopops.tui.app import ConsoleApp
from hoopops.tui.source import GatewaySource
from tests.clients.tmux import tmux, wait_pane
from tests.conftest import RunningGateway, psql_path, write_config

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ROOT / "policies"
FAST_POLL = "approvals:\n  poll_interval: 0.1\n"

# What a terminal would obey, or shows as nothing: none of it may reach the screen raw.
RAW = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u00ad\u061c\u200b-\u200f\u2028-\u202e"
                 "\u2060-\u2064\u2066-\u2069\ufeff\U000e0000-\U000e007f]")

# Clear the screen, retitle the window, a hyperlink, a cursor move, the 8-bit CSI, a
# right-to-left override, a zero-width space, and Textual/Rich markup with an action.
APP_NAME = ("[@click=app.quit]q[/] \x1b[2J\x1b]0;pwned\x1b\\\x1b]8;;http://evil/\x1b\\"
            "x\x1b]8;;\x1b\\\x1b[5A\x9b31m\u202eevil\u200b [link=http://e]l[/link] [bold")
# Starts like a formula: a spreadsheet would run it if the CSV cell were left as is.
FORMULA_APP = '=HYPERLINK("http://evil/","click")'
FLOOD = 5000


def screen(app: ConsoleApp) -> str:
    """The characters the console draws (the screenshot keeps them as sent)."""
    svg = app.export_screenshot()
    text = html.unescape("".join(re.findall(r"<text[^>]*>(.*?)</text>", svg, re.S)))
    return text.replace("\xa0", " ")


def raw_in(text: str) -> list[str]:
    return sorted({f"U+{ord(c):04X}" for c in RAW.findall(text)})


@dataclass
class Rig:
    running: RunningGateway
    pg: Any

    @property
    def gateway(self) -> Any:
        return self.running.gateway

    def app(self) -> ConsoleApp:
        return ConsoleApp(GatewaySource(self.gateway), refresh_interval=0.25,
                          decided_by="oncall@test")

    async def connect(self, application: str, subject: str = "display-agent"
                      ) -> asyncpg.Connection:
        return await asyncpg.connect(self.running.dsn(self.running.token(subject)),
                                     server_settings={"application_name": application})

    def cli(self, *argv: str) -> list[str]:
        return [sys.executable, "-m", "hoopops", *argv, "-c", str(self.running.config.file)]


@pytest.fixture
async def rig(gateway_factory: Any, pg: Any) -> AsyncIterator[Rig]:
    running = await gateway_factory(FAST_POLL, policies=POLICIES, audit=True)
    admin = await asyncpg.connect(pg.dsn())
    try:
        await admin.execute("CREATE TABLE IF NOT EXISTS display_orders "
                            "(id int primary key, status text)")
        await admin.execute("INSERT INTO display_orders VALUES (1, 'paid') "
                            "ON CONFLICT (id) DO UPDATE SET status = 'paid'")
    finally:
        await admin.close()
    yield Rig(running, pg)


async def until(pilot: Any, check: Callable[[], bool], what: str, within: float = 15) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await pilot.pause(0.05)


async def run(argv: list[str]) -> tuple[int, bytes, bytes]:
    process = await asyncio.create_subprocess_exec(
        *argv, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out, err


# -- the one escaping path -------------------------------------------------------------


def test_every_control_format_and_separator_character_is_spelled_out() -> None:
    """Against this Python's Unicode database: a new invisible character in a future
    Unicode version fails here rather than reaching a terminal."""
    missed = [f"U+{code:04X}" for code in range(sys.maxunicode + 1)
              if unicodedata.category(chr(code)) in ("Cc", "Cf", "Cs", "Zl", "Zp")
              and visible(chr(code)).text == chr(code)]
    assert missed == []
    assert visible("a\x1b[2Jb\x9bc\u202ed").text == "a\\x1b[2Jb\\x9bc\\u202ed"
    # One line unless layout is asked for; then only floods are summarised, counted.
    assert visible("a\nb\tc").text == "a\\x0ab\\x09c"
    assert visible("a\nb\tc", layout=True).text == "a\nb\tc"
    flood = visible("x" + "\n" * FLOOD + "WHERE", layout=True).text
    assert flood.count("\n") == 2 and "4,998 more line breaks" in flood
    assert flood.endswith("WHERE")
    assert folded("SELECT\r\n  1\t\x1b", 80) == "SELECT 1 \\x1b"
    assert hidden_characters("a\u202eb\u200b\x1b") == (
        "1 bidi control(s), 1 invisible character(s), 1 control character(s)")
    # A megabyte costs a scan, not a copy, when there is nothing to escape.
    big = "SELECT 1 " * 120_000
    assert visible(big, layout=True).text is big


# -- the console -------------------------------------------------------------------------


async def test_live_session_with_hostile_application_and_sql(rig: Rig) -> None:
    app = rig.app()
    async with app.run_test(size=(160, 40)) as pilot:
        conn = await rig.connect(APP_NAME)
        try:
            await conn.fetchval("SELECT '\u202e\x1b[2J\x9b1;1H' || $1::text AS x", "v")
            table = app.dashboard.sessions
            await until(pilot, lambda: table.row_count == 1, "the session row")
            await until(pilot, lambda: "\\u202e" in screen(app), "the statement")
            shown = screen(app)
            assert raw_in(shown) == []
            assert "\\x1b[2J" in shown and "\\x9b" in shown
            key = table.selected_key
            assert key is not None
            application = table.get_cell(key, "application").plain
            assert application.startswith("[@click=app.quit]q[/] \\x1b[2J\\x1b]0;pwned")
            # The session screen shows it whole: markup is text, the action no link.
            app.open_session(key)
            await until(pilot, lambda: "[@click=app.quit]q[/]" in screen(app),
                        "the application name on the session screen")
            shown = screen(app)
            assert raw_in(shown) == []
            assert "\\u202e" in shown and "[link=http://e]l[/link] [bold" in shown
            assert app.is_running
        finally:
            await conn.close()


async def test_approval_shows_the_statement_that_runs(rig: Rig) -> None:
    """A bidi override, escapes and 5000 line breaks in a held UPDATE: the analyst sees
    the escapes, a warning, and the WHERE clause that was being pushed out of view."""
    sql = ("UPDATE display_orders SET status = 'ok\u202e \x1b[8m" + "\n" * FLOOD
           + "' WHERE id = 1 RETURNING id")
    app = rig.app()
    async with app.run_test(size=(160, 50)) as pilot:
        conn = await rig.connect("approver-test")
        task = asyncio.create_task(conn.fetch(sql))
        try:
            await until(pilot, lambda: app.dashboard.approvals.row_count == 1,
                        "the pending approval")
            await pilot.press("2")
            await until(pilot, lambda: "WHERE" in screen(app), "the WHERE clause on screen")
            shown = screen(app)
            assert raw_in(shown) == []
            assert "\\u202e" in shown and "\\x1b[8m" in shown
            assert "more line breaks" in shown
            assert "bidi control" in shown  # the warning row
            assert not task.done()
            await pilot.press("a")
            assert [tuple(r) for r in await asyncio.wait_for(task, 15)] == [(1,)]
        finally:
            if not task.done():
                task.cancel()
            await conn.close()


async def test_replay_of_errors_and_samples_quoting_hostile_text(rig: Rig) -> None:
    conn = await rig.connect("replay-test")
    try:
        await conn.fetchval("SELECT '\x1b]0;pwned\x1b\\\x9b2J\u2067[red]v' AS \"\x1b[31mcol\"")
        with pytest.raises(asyncpg.PostgresError):
            # The server's error quotes the name the agent chose.
            await conn.execute('SELECT * FROM "\x1b[2J\x1b]8;;http://evil/\x1b\\\u202etable"')
        session_id = next(iter(rig.gateway.sessions))
    finally:
        await conn.close()
    store = rig.gateway.store
    deadline = time.monotonic() + 15
    while True:
        statements = await store.session_statements(session_id)
        if any(s.sqlstate == "42P01" for s in statements) and all(
                s.finished for s in statements):
            break
        assert time.monotonic() < deadline, "the statements never reached the store"
        await asyncio.sleep(0.1)
    app = rig.app()
    async with app.run_test(size=(160, 45)) as pilot:
        app.open_replay(session_id)
        await until(pilot, lambda: "\\x9b2J" in screen(app), "the result sample")
        assert raw_in(screen(app)) == []
        for _ in statements:
            if "42P01" in screen(app):
                break
            await pilot.press("right_square_bracket")
            await pilot.pause()
        shown = screen(app)
        assert "42P01" in shown
        assert raw_in(shown) == []
        assert "\\x1b]8;;http://evil/" in shown
        assert app.is_running


# -- the CLI ----------------------------------------------------------------------------


async def test_cli_human_output_shows_escapes_json_and_csv_keep_the_data(rig: Rig) -> None:
    conn = await rig.connect(APP_NAME)
    formula = await rig.connect(FORMULA_APP, subject="formula-agent")
    sql = ("UPDATE display_orders SET status = '\x1b]0;pwned\x1b\\\u202e" + "\n" * FLOOD
           + "' WHERE id = 1")
    held = asyncio.create_task(conn.execute(sql))
    try:
        await formula.fetchval("SELECT 1")
        deadline = time.monotonic() + 15
        while not await rig.gateway.store.pending_approvals():
            assert time.monotonic() < deadline, "the UPDATE was never held"
            await asyncio.sleep(0.1)

        code, out, err = await run(rig.cli("approvals", "list"))
        assert code == 0, err
        text = out.decode()
        assert raw_in(text) == [] and "\\u202e" in text
        assert len(text.splitlines()) == 2  # the header and one row, flood or not

        code, out, err = await run(rig.cli("approvals", "list", "--json"))
        assert code == 0, err
        assert json.loads(out)[0]["sql"] == sql  # exact data
        approval_id = json.loads(out)[0]["id"]
        code, _, err = await run(rig.cli("approvals", "deny", str(approval_id), "--reason",
                                         "no \x1b[2J thanks"))
        assert code == 0, err
        with pytest.raises(asyncpg.PostgresError):
            await asyncio.wait_for(held, 15)
    finally:
        if not held.done():
            held.cancel()
        await conn.close()
        await formula.close()

    code, out, err = await run(rig.cli("audit", "sessions"))
    assert code == 0, err
    assert raw_in(out.decode()) == []
    session_id = next(line.split()[-1] for line in out.decode().splitlines()
                      if "display-agent" in line)

    code, out, err = await run(rig.cli("audit", "show", session_id))
    assert code == 0, err
    text = out.decode()
    assert raw_in(text) == []
    assert "\\x1b]0;pwned" in text and "\\u202e" in text and "more line breaks" in text
    assert "WHERE id = 1" in text
    assert len(text.splitlines()) < 40  # not 5000 blank lines
    assert "no \\x1b[2J thanks" in text  # the deny reason too

    code, out, err = await run(rig.cli("audit", "export", "--format", "jsonl"))
    assert code == 0, err
    rows = [json.loads(line) for line in out.decode().splitlines()]
    assert sql in {r["sql"] for r in rows}
    assert APP_NAME in {r["application_name"] for r in rows}

    code, out, err = await run(rig.cli("audit", "export", "--format", "csv"))
    assert code == 0, err
    table = list(csv.DictReader(io.StringIO(out.decode(), newline="")))
    names = {r["application_name"] for r in table}
    # Never a formula in a spreadsheet; one leading quote dropped gives the exact value.
    assert FORMULA_APP not in names and "'" + FORMULA_APP in names
    assert not any(v.startswith(("=", "+", "-", "@")) for r in table for v in r.values())
    assert {v[1:] if v.startswith("'") else v for v in names} >= {FORMULA_APP, APP_NAME}
    assert sql in {r["sql"] for r in table}


# -- a real terminal ----------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
async def test_console_in_tmux_keeps_its_title_and_screen(tmp_path: Path, pg: Any) -> None:
    """``hoopops console`` in a tmux pane, a psql agent whose application name and
    statement retitle the window and clear the screen: the pane keeps its title and shows
    the escapes as text."""
    port = free_port()
    config_path = write_config(tmp_path, pg, policies=POLICIES, audit=True,
                               listen=f"127.0.0.1:{port}")
    config = load_config(config_path)
    name = f"hoopops-display-{uuid.uuid4().hex[:8]}"
    command = (f"cd {ROOT} && {sys.executable} -m hoopops console --config {config_path} "
               f"--log-file {tmp_path / 'console.log'} --export-dir {tmp_path}; sleep 30")
    tmux("new-session", "-d", "-s", name, "-x", "120", "-y", "36", command)
    try:
        await wait_pane(name, "Live sessions")
        tmux("select-pane", "-t", name, "-T", "analyst")
        token = mint_token(config.identity, "tmux-agent", ["agents"], 600)
        env = {"PGPASSWORD": token, "PGCONNECT_TIMEOUT": "10", "PATH": "/usr/bin:/bin",
               "PGAPPNAME": "\x1b]2;pwned\x1b\\\x1b[2J"}
        psql = await asyncio.create_subprocess_exec(
            psql_path(pg), "-X", "-At", "-h", "127.0.0.1", "-p", str(port), "-U", "agent",
            "-d", "appdb", "-c", "SELECT '\x1b]2;pwned-too\x1b\\\x1b[2J\x1b[H' AS x; "
            "SELECT pg_sleep(60)",  # live for the whole check, however slow the machine
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            await wait_pane(name, "tmux-agent")
            await asyncio.sleep(1.5)  # a repaint or two with the agent's text on screen
            title = tmux("display-message", "-p", "-t", name, "#{pane_title}").strip()
            assert title == "analyst"  # never retitled by the agent
            shown = await wait_pane(name, "SELECT '\\x1")
            assert "Live sessions (1)" in shown
            # The session screen shows the application name and the statement whole.
            await asyncio.to_thread(tmux, "send-keys", "-t", name, "Enter")
            shown = await wait_pane(name, "\\x1b]2;pwned\\x1b\\\\")
            assert "\\x1b]2;pwned-too" in shown
            title = tmux("display-message", "-p", "-t", name, "#{pane_title}").strip()
            assert title == "analyst"  # never retitled by the agent
        finally:
            if psql.returncode is None:
                psql.terminate()  # the agent goes away mid-statement; the session ends
            await asyncio.wait_for(psql.communicate(), 30)
        await _audit_show_in_tmux(config_path)
    finally:
        tmux("kill-session", "-t", name)


async def _audit_show_in_tmux(config_path: Path) -> None:
    """The auditor's ``hoopops audit show`` of that session, in a real terminal too."""
    deadline = time.monotonic() + 15
    while True:
        code, out, err = await run([sys.executable, "-m", "hoopops", "audit", "sessions",
                                    "--json", "-c", str(config_path)])
        assert code == 0, err
        sessions = [s for s in json.loads(out) if s["subject"] == "tmux-agent"]
        if sessions and sessions[0]["statements"] >= 1:
            break
        assert time.monotonic() < deadline, "the session never reached the audit store"
        await asyncio.sleep(0.2)
    name = f"hoopops-audit-{uuid.uuid4().hex[:8]}"
    tmux("new-session", "-d", "-s", name, "-x", "120", "-y", "36",
          f"sleep 1; cd {ROOT} && {sys.executable} -m hoopops audit show {sessions[0]['id']} "
          f"-c {config_path}; echo END-OF-SHOW; sleep 30")
    try:
        tmux("select-pane", "-t", name, "-T", "auditor")
        shown = await wait_pane(name, "END-OF-SHOW")
        assert "\\x1b]2;pwned" in shown
        title = tmux("display-message", "-p", "-t", name, "#{pane_title}").strip()
        assert title == "auditor"  # never retitled by the recorded agent text
    finally:
        tmux("kill-session", "-t", name)


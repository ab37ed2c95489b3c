"""The console driven by Textual's pilot against a real gateway and a real PostgreSQL.

Everything is real: ``build_gateway`` with the shipped policy set (``policies/``: reads
run, writes wait for a human), the SQLite audit store, the approvals broker, and real
clients (asyncpg). The tests press the keys an analyst would and watch the client.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from rich.text import Text

from hoopops.audit import (
    ApprovalRequest,
    AuditStore,
    MaskingAction,
    SessionRecord,
    StatementRecord,
    StatementResult,
    approval_binding,
    open_store,
)
from hoopops.config import load_config
from hoopops.identity import Identity
from hoopops.tui.app import ConsoleApp
from hoopops.tui.screens.deny_prompt import DenyPrompt
from hoopops.tui.screens.help import HelpScreen
from hoopops.tui.screens.history import HistoryScreen
from hoopops.tui.screens.replay import ReplayScreen
from hoopops.tui.screens.session import SessionScreen
from hoopops.tui.source import AttachedSource, GatewaySource
from hoopops.tui.widgets.result_grid import ResultGrid
from hoopops.tui.widgets.step_view import StepView
from tests.conftest import RunningGateway, write_config

POLICIES = Path(__file__).resolve().parent.parent / "policies"
# Decisions made in another process (--attach) are noticed on the broker's next poll.
FAST_POLL = "approvals:\n  poll_interval: 0.1\n"


@dataclass
class Rig:
    running: RunningGateway
    pg: Any

    @property
    def gateway(self) -> Any:
        return self.running.gateway

    @property
    def store(self) -> AuditStore:
        return self.gateway.store

    @property
    def broker(self) -> Any:
        return self.gateway.broker

    @property
    def config_path(self) -> Path:
        return self.running.config.file

    def app(self, **kwargs: Any) -> ConsoleApp:
        kwargs.setdefault("refresh_interval", 0.25)
        kwargs.setdefault("decided_by", "oncall@test")
        return ConsoleApp(GatewaySource(self.gateway), **kwargs)

    async def connect(self, subject: str = "agent-1", application: str = "tests"
                      ) -> asyncpg.Connection:
        return await asyncpg.connect(self.running.dsn(self.running.token(subject)),
                                     server_settings={"application_name": application})


@pytest.fixture
async def rig(gateway_factory: Any, pg: Any) -> AsyncIterator[Rig]:
    running = await gateway_factory(FAST_POLL, policies=POLICIES, audit=True)
    assert running.gateway.broker is not None and running.gateway.store is not None
    yield Rig(running, pg)


async def until(pilot: Any, check: Callable[[], bool], within: float = 10,
                what: str = "condition") -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await pilot.pause(0.05)


async def until_async(pilot: Any, check: Callable[[], Awaitable[bool]], within: float = 10,
                      what: str = "condition") -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await pilot.pause(0.05)


def cell(table: Any, row_key: str, column: str) -> str:
    value = table.get_cell(row_key, column)
    assert isinstance(value, Text), f"{column} cell is {type(value).__name__}, not Text"
    return value.plain


# --- live sessions ---------------------------------------------------------------------


async def test_session_appears_live_and_markup_stays_text(rig: Rig) -> None:
    app = rig.app()
    async with app.run_test(size=(120, 36)) as pilot:
        conn = await rig.connect("claude-code", "[bold]agent[/bold]")
        try:
            await conn.fetchval("SELECT '[/foo] [red]x[/red]'::text")
            table = app.dashboard.sessions
            await until(pilot, lambda: table.row_count == 1, what="the session row")
            key = table.selected_key
            assert key is not None
            await until(pilot, lambda: "[/foo]" in cell(table, key, "last"),
                        what="the last statement")
            assert cell(table, key, "identity") == "claude-code"
            assert cell(table, key, "application") == "[bold]agent[/bold]"
            assert cell(table, key, "last") == "SELECT '[/foo] [red]x[/red]'::text"
            # And the screen really draws it literally (no markup error, no styling).
            assert "[/foo]" in app.export_screenshot()
        finally:
            await conn.close()
        await until(pilot, lambda: app.dashboard.sessions.row_count == 0,
                    what="the session to end")


async def test_cursor_stays_on_its_row_while_rows_change(rig: Rig) -> None:
    app = rig.app()
    async with app.run_test(size=(120, 36)) as pilot:
        first = await rig.connect("agent-a")
        second = third = None
        try:
            table = app.dashboard.sessions
            await until(pilot, lambda: table.row_count == 1, what="first session")
            chosen = table.selected_key
            second = await rig.connect("agent-b")
            await until(pilot, lambda: table.row_count == 2, what="second session")
            assert table.selected_key == chosen
            # Move to the second; the first one's counters change and a third arrives.
            table.focus()
            await pilot.press("down")
            chosen = table.selected_key
            assert cell(table, chosen, "identity") == "agent-b"
            for _ in range(3):
                await first.fetchval("SELECT 1")
            third = await rig.connect("agent-c")
            await until(pilot, lambda: table.row_count == 3, what="third session")
            first_key = next(k for k in table._cells if cell(table, k, "identity") == "agent-a")
            await until(pilot, lambda: cell(table, first_key, "statements").startswith("3"),
                        what="the first session's counter")
            assert table.selected_key == chosen
            # Updated in place: nothing removed, cells updated, never clear-and-refill.
            assert table.rows_removed == 0
            assert table.rows_added == 3
            assert table.cells_updated > 0
            await first.close()
            await until(pilot, lambda: table.row_count == 2, what="first session to end")
            assert table.selected_key == chosen
        finally:
            for conn in (first, second, third):
                if conn is not None and not conn.is_closed():
                    await conn.close()


# --- approvals ---------------------------------------------------------------------------


async def _held(rig: Rig, conn: asyncpg.Connection, sql: str) -> asyncio.Task[Any]:
    return asyncio.create_task(conn.fetch(sql))


async def _setup_table(rig: Rig) -> None:
    # Directly on the server as the gateway's service account (writes through the
    # gateway would wait for approval, which is the point of the tests below).
    admin = await asyncpg.connect(rig.pg.dsn())
    try:
        await admin.execute("CREATE TABLE IF NOT EXISTS tui_orders "
                            "(id int primary key, status text)")
        await admin.execute("INSERT INTO tui_orders VALUES (1, 'paid'), (2, 'paid'), "
                            "(3, 'paid') ON CONFLICT (id) DO UPDATE SET status = 'paid'")
    finally:
        await admin.close()


async def test_held_statement_approved_with_a(rig: Rig) -> None:
    await _setup_table(rig)
    app = rig.app()
    async with app.run_test(size=(120, 36)) as pilot:
        conn = await rig.connect("cursor-agent")
        try:
            task = await _held(rig, conn, "UPDATE tui_orders SET status = 'shipped' "
                               "WHERE id = 1 RETURNING id, status")
            table = app.dashboard.approvals
            await until(pilot, lambda: table.row_count == 1, what="the pending approval")
            await pilot.pause()
            assert app.dashboard.detail.approval is not None
            assert not task.done()
            await pilot.press("a")
            rows = await asyncio.wait_for(task, 10)
            assert [tuple(r) for r in rows] == [(1, "shipped")]
            await until(pilot, lambda: table.row_count == 0, what="the approval to go")
            assert any(a.startswith("approved once #") for a in app.actions)
            statements = await rig.store.session_statements(
                next(iter(rig.gateway.sessions)))
            approval = statements[-1].approval
            assert approval is not None and approval.status == "approved"
            assert approval.decided_by == "oncall@test"
        finally:
            await conn.close()


async def test_held_statement_denied_with_d_and_reason(rig: Rig) -> None:
    await _setup_table(rig)
    app = rig.app()
    async with app.run_test(size=(120, 36)) as pilot:
        conn = await rig.connect("cursor-agent")
        try:
            task = await _held(rig, conn, "DELETE FROM tui_orders WHERE id = 2")
            await until(pilot, lambda: app.dashboard.approvals.row_count == 1,
                        what="the pending approval")
            await pilot.press("d")
            await until(pilot, lambda: isinstance(app.screen, DenyPrompt), what="prompt")
            await pilot.press(*"no deletes [/foo]", "enter")
            with pytest.raises(asyncpg.InsufficientPrivilegeError) as raised:
                await asyncio.wait_for(task, 10)
            assert "no deletes [/foo]" in str(raised.value)
            assert "oncall@test" in str(raised.value)
            assert await conn.fetchval("SELECT count(*) FROM tui_orders WHERE id = 2") == 1
        finally:
            await conn.close()


async def test_deny_prompt_escape_denies_nothing_and_enter_skips_reason(rig: Rig) -> None:
    await _setup_table(rig)
    app = rig.app()
    async with app.run_test(size=(120, 36)) as pilot:
        conn = await rig.connect("cursor-agent")
        try:
            task = await _held(rig, conn, "UPDATE tui_orders SET status = 'x' WHERE id = 3")
            await until(pilot, lambda: app.dashboard.approvals.row_count == 1,
                        what="the pending approval")
            await pilot.press("d")
            await until(pilot, lambda: isinstance(app.screen, DenyPrompt), what="prompt")
            await pilot.press("escape")
            await pilot.pause(0.3)
            assert not task.done()
            assert app.dashboard.approvals.row_count == 1
            await pilot.press("d")
            await until(pilot, lambda: isinstance(app.screen, DenyPrompt), what="prompt")
            await pilot.press("enter")
            with pytest.raises(asyncpg.InsufficientPrivilegeError) as raised:
                await asyncio.wait_for(task, 10)
            assert "denied by oncall@test" in str(raised.value)
        finally:
            await conn.close()


async def test_decision_goes_to_the_approval_selected_at_the_key_press(rig: Rig) -> None:
    """A refresh (a new approval arriving on top) while the deny prompt is open must not
    change which approval is denied."""
    await _setup_table(rig)
    app = rig.app()
    async with app.run_test(size=(120, 36)) as pilot:
        first = await rig.connect("agent-one")
        second = await rig.connect("agent-two")
        try:
            older = await _held(rig, first, "UPDATE tui_orders SET status = 'a' WHERE id = 1")
            table = app.dashboard.approvals
            await until(pilot, lambda: table.row_count == 1, what="first approval")
            captured = table.selected
            assert captured is not None
            await pilot.press("d")
            await until(pilot, lambda: isinstance(app.screen, DenyPrompt), what="prompt")
            newer = await _held(rig, second, "UPDATE tui_orders SET status = 'b' WHERE id = 2")
            # The new approval lands (newest first, on top of the list) behind the modal.
            await until_async(pilot, lambda: _pending_count(rig, 2), what="second approval")
            app.apply(await app.source.live_sessions(), await app.source.pending_approvals())
            await pilot.pause()
            await pilot.press("enter")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await asyncio.wait_for(older, 10)
            assert not newer.done()
            pending = await rig.store.pending_approvals()
            assert [p.id for p in pending] != [captured.id]
            assert captured.id not in [p.id for p in pending]
            # The cursor stayed on its row key; now approve the newer one explicitly.
            await until(pilot, lambda: table.row_count == 1, what="one left")
            await pilot.press("a")
            await asyncio.wait_for(newer, 10)
        finally:
            await first.close()
            await second.close()


async def _pending_count(rig: Rig, n: int) -> bool:
    return len(await rig.store.pending_approvals()) == n


async def test_settled_elsewhere_slides_cursor_and_first_key_only_warns(rig: Rig) -> None:
    await _setup_table(rig)
    app = rig.app()
    async with app.run_test(size=(120, 36)) as pilot:
        first = await rig.connect("agent-one")
        second = await rig.connect("agent-two")
        try:
            a1 = await _held(rig, first, "UPDATE tui_orders SET status = 'a' WHERE id = 1")
            table = app.dashboard.approvals
            await until(pilot, lambda: table.row_count == 1, what="first approval")
            a2 = await _held(rig, second, "UPDATE tui_orders SET status = 'b' WHERE id = 2")
            await until(pilot, lambda: table.row_count == 2, what="second approval")
            table.focus()
            # The older one (second row, newest first) is what the analyst looks at.
            await pilot.press("down")
            looked_at = table.selected
            assert looked_at is not None
            # Another analyst approves it from the CLI, through the store.
            await rig.broker.decide(looked_at.id, "approved_once", "someone-else")
            await asyncio.wait_for(a1, 10)
            await until(pilot, lambda: table.row_count == 1, what="the list to shrink")
            await pilot.press("a")
            await pilot.pause(0.3)
            assert not a2.done(), "the first key press after the slide must only warn"
            await pilot.press("a")
            await asyncio.wait_for(a2, 10)
        finally:
            await first.close()
            await second.close()


async def test_approve_for_session_lets_the_same_statement_through(rig: Rig) -> None:
    await _setup_table(rig)
    app = rig.app()
    async with app.run_test(size=(120, 36)) as pilot:
        conn = await rig.connect("etl-bot")
        try:
            sql = "UPDATE tui_orders SET status = 'paid' WHERE id = 3"
            task = await _held(rig, conn, sql)
            await until(pilot, lambda: app.dashboard.approvals.row_count == 1,
                        what="the pending approval")
            await pilot.press("s")
            await asyncio.wait_for(task, 10)
            # Same fingerprint, same session: no new approval needed.
            await asyncio.wait_for(conn.execute(sql), 5)
            assert await rig.store.pending_approvals() == []
        finally:
            await conn.close()


async def test_new_approval_rings_the_bell_and_toasts(rig: Rig, monkeypatch: Any) -> None:
    await _setup_table(rig)
    app = rig.app()
    bells: list[bool] = []
    monkeypatch.setattr(app, "bell", lambda: bells.append(True))
    async with app.run_test(size=(120, 36)) as pilot:
        conn = await rig.connect("cursor-agent")
        try:
            task = await _held(rig, conn, "UPDATE tui_orders SET status = '[/foo]' "
                               "WHERE id = 1")
            await until(pilot, lambda: app.dashboard.approvals.row_count == 1,
                        what="the pending approval")
            assert bells == [True]
            toasts = [n.message for n in app._notifications]
            assert any("cursor-agent" in m and "[/foo]" in m for m in toasts)
            await pilot.press("a")
            await asyncio.wait_for(task, 10)
        finally:
            await conn.close()


# --- kill and session detail -------------------------------------------------------------


async def test_k_kills_a_session_and_cancels_its_backend(rig: Rig, pg: Any) -> None:
    app = rig.app()
    async with app.run_test(size=(120, 36)) as pilot:
        conn = await rig.connect("runaway-agent")
        try:
            task = asyncio.create_task(conn.fetchval("SELECT pg_sleep(60)"))
            table = app.dashboard.sessions
            await until(pilot, lambda: table.row_count == 1, what="the session")
            table.focus()
            await pilot.press("k")
            await pilot.pause()
            await pilot.press("y")
            with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError,
                                ConnectionError)) as raised:
                await asyncio.wait_for(task, 10)
            assert "terminated by an analyst" in str(raised.value) or isinstance(
                raised.value, asyncpg.ConnectionDoesNotExistError)
            await until(pilot, lambda: table.row_count == 0, what="the row to go")
            admin = await asyncpg.connect(pg.dsn("postgres", database="app"))
            try:
                async def sleeping_gone() -> bool:
                    n = await admin.fetchval("SELECT count(*) FROM pg_stat_activity "
                                             "WHERE query = 'SELECT pg_sleep(60)'")
                    return n == 0
                await until_async(pilot, sleeping_gone, what="the backend to stop")
            finally:
                await admin.close()
        finally:
            if not conn.is_closed():
                conn.terminate()


async def test_enter_opens_session_detail_with_its_statements(rig: Rig) -> None:
    app = rig.app()
    async with app.run_test(size=(120, 36)) as pilot:
        conn = await rig.connect("claude-code")
        try:
            await conn.fetchval("SELECT 41 + 1")
            table = app.dashboard.sessions
            await until(pilot, lambda: table.row_count == 1, what="the session")
            table.focus()
            await pilot.press("enter")
            await until(pilot, lambda: isinstance(app.screen, SessionScreen), what="detail")
            screen = app.screen
            assert isinstance(screen, SessionScreen)
            await until(pilot, lambda: screen.table.row_count >= 1, what="statements")
            assert any("41 + 1" in cell(screen.table, k, "sql") for k in screen.table._cells)
            await pilot.press("escape")
            await until(pilot, lambda: app.screen is app.dashboard, what="back")
        finally:
            await conn.close()


# --- history, replay, export (real store) ------------------------------------------------


async def record_session(store: AuditStore, subject: str, *, base: float,
                         with_masking: bool = True) -> str:
    """One session written through the store's write API, as the gateway writes it."""
    session_id = f"sess-{subject}-{int(base)}"
    identity = Identity(subject, ("agents",), "https://idp.example.test", "tok", None)
    await store.session_started(SessionRecord.for_identity(
        session_id, identity, claimed_user="agent", client_addr="127.0.0.1",
        client_port=50001, application_name="[i]replay-test[/i]", target="appdb", tls=False,
        started_at=base))
    sid = await store.statement_received(StatementRecord(
        session_id, 1, base + 1, "SELECT id, email, ssn FROM customers WHERE note = '[/foo]'",
        None, {"tables_read": ["public.customers"]}, "allow", "mask-pii"))
    await store.statement_finished(sid, StatementResult(
        base + 1, base + 1.004, 2, "SELECT 2", result_sha256="ab" * 32,
        result_sample={"columns": ["id", "email", "ssn"], "rows": [
            ["1", "[REDACTED]", "***-**-6789"], ["2", "[REDACTED]", "[/foo]"]],
            "truncated": False}))
    if with_masking:
        await store.masking_actions(sid, session_id, [
            MaskingAction("public.customers.email", "redact", 2),
            MaskingAction("public.customers.ssn", "last4", 2)], at=base + 1.004)
    held = await store.statement_received(StatementRecord(
        session_id, 2, base + 3, "UPDATE orders SET status = 'shipped' WHERE id = 7", None,
        {}, "review", "review-writes"))
    approval_id = await store.approval_requested(ApprovalRequest(
        session_id, held, subject, ("agents",), None, None,
        "UPDATE orders SET status = 'shipped' WHERE id = 7", None, "fp", "review-writes",
        "writes need a human", base + 3, base + 303,
        approval_binding(session_id, subject, None, "UPDATE ...", None)))
    await store.approval_decided(approval_id, True, "once", "alice@soc", "ticket 42", base + 9)
    await store.statement_finished(held, StatementResult(base + 9, base + 9.002, 1,
                                                         "UPDATE 1", result_sha256="cd" * 32))
    blocked = await store.statement_received(StatementRecord(
        session_id, 3, base + 12, "DROP TABLE orders", None, {}, "block", "no-ddl"))
    await store.statement_finished(blocked, StatementResult(
        None, base + 12, None, None, "42501", "DDL is not allowed"))
    await store.session_ended(session_id, "client terminated the session", base + 20, 10, 20,
                              3)
    return session_id


@pytest.fixture
async def attached(tmp_path: Path, pg: Any) -> AsyncIterator[tuple[AttachedSource, str, str]]:
    path = write_config(tmp_path, pg, audit=True)
    config = load_config(path)
    writer = await open_store(config.audit)
    now = time.time()
    alice = await record_session(writer, "alice", base=now - 7200)
    bob = await record_session(writer, "bob", base=now - 3600, with_masking=False)
    await writer.close()
    store = await open_store(config.audit, create=False)
    source = AttachedSource(config, store)
    try:
        yield source, alice, bob
    finally:
        await source.close()


async def test_history_filter_and_replay_steps(attached: Any, tmp_path: Path) -> None:
    source, alice, bob = attached
    app = ConsoleApp(source, refresh_interval=0.2, decided_by="auditor@test",
                     export_dir=tmp_path / "evidence")
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("h")
        await until(pilot, lambda: isinstance(app.screen, HistoryScreen), what="history")
        history = app.screen
        assert isinstance(history, HistoryScreen)
        await until(pilot, lambda: history.table.row_count == 2, what="both sessions")
        await pilot.press("slash", *"identity:alice", "enter")
        await until(pilot, lambda: history.table.row_count == 1, what="the filter")
        assert history.table.selected_key == alice
        # Typed once above; set directly below (typing is slow and proves nothing more).
        await _filter(pilot, history, "decision:block since:3h")
        await until(pilot, lambda: history.table.row_count == 2, what="the second filter")
        await _filter(pilot, history, "shipped identity:bob")
        await until(pilot, lambda: history.table.selected_key == bob
                    and history.table.row_count == 1, what="text filter")
        await _filter(pilot, history, "since:1h identity:alice")
        await until(pilot, lambda: history.table.row_count == 0, what="time filter")
        await pilot.press("x")
        await until(pilot, lambda: history.table.row_count == 2, what="cleared filter")
        history.table.select_key(alice)
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, ReplayScreen), what="replay")
        replay = app.screen
        assert isinstance(replay, ReplayScreen)
        await until(pilot, lambda: len(replay.statements) == 3, what="statements")

        def grid_rows() -> list[list[str]]:
            grid = replay.query_one(ResultGrid)
            return [[c.plain for c in grid.get_row_at(i)] for i in range(grid.row_count)]

        current = replay.current
        assert current is not None and current.sql.endswith("'[/foo]'")
        assert [m.column_or_detector for m in current.masking] == [
            "public.customers.email", "public.customers.ssn"]
        assert grid_rows() == [["1", "[REDACTED]", "***-**-6789"], ["2", "[REDACTED]", "[/foo]"]]
        await pilot.press("right_square_bracket")
        current = replay.current
        assert current is not None and current.approval is not None
        assert current.approval.decided_by == "alice@soc"
        assert "alice@soc" in _plain(replay.query_one(StepView))
        await pilot.press("G")
        assert replay.index == 2 and replay.current is not None
        assert replay.current.sqlstate == "42501"
        assert "DROP TABLE" in _plain(replay.query_one(StepView))
        await pilot.press("g")
        assert replay.index == 0
        await pilot.press("left_square_bracket")
        assert replay.index == 0
        # Play at recorded pace (gaps 2 s and 9 s): at 16x both steps pass within a second.
        await pilot.press("x", "x")
        assert replay.speed == 16
        await pilot.press("space")
        await until(pilot, lambda: replay.index == 2 and not replay.playing, within=5,
                    what="playback to reach the end")
        # Export the evidence.
        await pilot.press("e")
        await until(pilot, lambda: replay.last_export is not None, what="the export")
        exported = json.loads(await asyncio.to_thread(Path(replay.last_export or "").read_text))
        assert exported["session"]["id"] == alice
        assert exported["exported_by"] == "auditor@test"
        assert exported["statements"][0]["sql"].endswith("'[/foo]'")
        assert str(tmp_path / "evidence") in replay.last_export
        assert str(tmp_path / "evidence") in _plain(replay.query_one("#replay-position"))


async def _filter(pilot: Any, history: HistoryScreen, query: str) -> None:
    from textual.widgets import Input

    await pilot.press("slash")
    history.query_one("#history-filter", Input).value = query
    await pilot.press("enter")


def _plain(widget: Any) -> str:
    """What a Static shows, as plain text (rendered to a wide console)."""
    from rich.console import Console

    console = Console(width=200, record=True, color_system=None)
    console.print(widget.content)
    return console.export_text()


async def test_attached_console_decides_for_the_gateway_holding_the_statement(
        rig: Rig) -> None:
    """--attach: the console has only the store; the gateway's broker polls it."""
    await _setup_table(rig)
    config = load_config(rig.config_path)
    store = await open_store(config.audit, create=False)
    source = AttachedSource(config, store)
    app = ConsoleApp(source, refresh_interval=0.2, decided_by="oncall@elsewhere")
    try:
        async with app.run_test(size=(120, 36)) as pilot:
            conn = await rig.connect("cursor-agent")
            try:
                task = await _held(rig, conn, "UPDATE tui_orders SET status = 'p' "
                                   "WHERE id = 2 RETURNING status")
                await until(pilot, lambda: app.dashboard.approvals.row_count == 1,
                            what="the approval, read from the store")
                await until(pilot, lambda: app.dashboard.sessions.row_count >= 1,
                            what="the open session, read from the store")
                assert app.check_action("kill_session", ()) is True  # app-level: not ours
                assert app.dashboard.check_action("kill_session", ()) is None
                await pilot.press("a")
                rows = await asyncio.wait_for(task, 10)
                assert rows[0]["status"] == "p"
            finally:
                await conn.close()
    finally:
        await source.close()


# --- keys, help, palette, feed ----------------------------------------------------------


async def test_keymap_remaps_by_binding_id_and_help_shows_it(rig: Rig) -> None:
    await _setup_table(rig)
    app = rig.app(keymap={"approvals.approve_once": "y", "no.such.binding": "z"})
    async with app.run_test(size=(120, 36)) as pilot:
        assert any("no.such.binding" in n.message for n in app._notifications)
        conn = await rig.connect("cursor-agent")
        try:
            task = await _held(rig, conn, "UPDATE tui_orders SET status = 'k' WHERE id = 1")
            await until(pilot, lambda: app.dashboard.approvals.row_count == 1,
                        what="the pending approval")
            await pilot.press("a")
            await pilot.pause(0.3)
            assert not task.done(), "a no longer approves once remapped"
            await pilot.press("question_mark")
            await until(pilot, lambda: isinstance(app.screen, HelpScreen), what="help")
            assert ("y", "Approve the selected held statement, this once",
                    "approvals.approve_once") in app.screen.keys  # type: ignore[attr-defined]
            await pilot.press("escape")
            await pilot.press("y")
            await asyncio.wait_for(task, 10)
        finally:
            await conn.close()


async def test_command_palette_offers_console_commands(rig: Rig) -> None:
    app = rig.app()
    async with app.run_test(size=(120, 36)) as pilot:
        titles = [c.title for c in app.get_system_commands(app.screen)]
        for expected in ("Approve once", "Deny", "Kill session", "History", "Pause / resume"):
            assert expected in titles
        await pilot.press("ctrl+p")
        await pilot.pause()
        assert app.screen.__class__.__name__ == "CommandPalette"


async def test_masking_feed_follows_until_scrolled_then_counts_new(rig: Rig) -> None:
    from hoopops.tui.widgets.masking_feed import MaskingHit

    app = rig.app(live_updates=False)
    async with app.run_test(size=(100, 30)) as pilot:
        feed = app.dashboard.masking

        def hits(start: int, n: int) -> list[MaskingHit]:
            return [MaskingHit(f"k{i}", time.time(), "sess", "agent", f"t.col{i}", "redact", 1)
                    for i in range(start, start + n)]

        app.add_masking_hits(hits(0, 30))
        await pilot.pause()
        await until(pilot, lambda: feed.at_end and feed.log_view.max_scroll_y > 0,
                    what="the feed to follow the tail")
        feed.log_view.scroll_home(animate=False, immediate=True)
        await pilot.pause()
        assert not feed.following
        app.add_masking_hits(hits(30, 5))
        await pilot.pause()
        assert feed.unseen == 5
        assert feed.log_view.scroll_y == 0
        assert "+5 new" in _plain(feed.query_one("#masking-new"))
        feed.log_view.focus()
        await pilot.press("end")
        await until(pilot, lambda: feed.at_end, what="following again")
        assert feed.unseen == 0 and feed.following
        # Paused: hits are buffered, not shown, and counted in the status bar.
        await pilot.press("p")
        app.add_masking_hits(hits(35, 2))
        assert app.counters.paused or app.paused
        assert feed.total == 35
        await pilot.press("p")
        assert feed.total == 37

"""Snapshot tests of the console (pytest-textual-snapshot), with a frozen clock.

The data here is fixed (a ``FixedSource`` standing in for gateway and store) and the app's
timers and bus pump are off, so every render is identical run after run. The pilot tests
in ``test_tui_console.py`` cover the same flows against a real gateway and PostgreSQL.

Snapshots live in ``tests/snapshots/`` (not syrupy's default ``__snapshots__``).
Update them after an intended change with ``pytest tests/test_tui_snapshots.py
--snapshot-update`` and look at the report before committing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hoopops.audit.records import (
    ApprovalView,
    Filters,
    MaskingView,
    SessionView,
    StatementView,
)
from hoopops.tui.app import ConsoleApp
from hoopops.tui.source import ConsoleSource, LiveSession, SourceError, Status

NOW = 1778312125.0  # 2026-05-09T07:35:25Z
SNAPSHOT_DIR = Path(__file__).parent / "snapshots"

pytest_textual_snapshot = pytest.importorskip("pytest_textual_snapshot")


class _SnapshotsHere(pytest_textual_snapshot.SVGImageExtension):  # type: ignore[misc,name-defined]
    @classmethod
    def dirname(cls, *, test_location: Any) -> str:
        return str(SNAPSHOT_DIR / test_location.basename)


@pytest.fixture(autouse=True)
def _snapshot_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    # snap_compare looks the extension up at call time; point it at tests/snapshots/.
    monkeypatch.setattr(pytest_textual_snapshot, "SVGImageExtension", _SnapshotsHere)


def _session(i: int, subject: str, *, ended: bool = True, blocked: int = 0,
             reviewed: int = 0, statements: int = 3) -> SessionView:
    started = NOW - 3600 * (i + 1)
    return SessionView(
        id=f"{i:02d}" + "a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5"[: 30], subject=subject,
        groups=("agents",), issuer="https://idp.example.test", token_id=f"t{i}",
        claimed_user="agent", client_addr="127.0.0.1", client_port=50000 + i,
        application_name=f"{subject}/demo", target="appdb", tls=False, started_at=started,
        ended_at=started + 600 if ended else None,
        end_reason="client terminated the session" if ended else None, bytes_in=1000,
        bytes_out=5000, statements=statements, blocked=blocked, reviewed=reviewed)


def _approval(approval_id: int, subject: str, sql: str, *, created: float,
              session_id: str = "s-cursor-0001", rule: str = "review-writes") -> ApprovalView:
    return ApprovalView(
        id=approval_id, session_id=session_id, statement_id=approval_id - 1, subject=subject,
        groups=("agents",), sql=sql, params=None, fingerprint="f" * 16, rule_id=rule,
        reason="writes to orders need a human", created_at=created, expires_at=created + 300,
        binding_sha256="0" * 64, status="pending", scope=None, decided_by=None,
        decided_at=None, comment=None)


LIVE = [
    LiveSession("s-claude-0001", "claude-code", ("agents",), "127.0.0.1:50101",
                "claude-code/demo", "appdb", NOW - 754, "idle", 42, 1,
                "SELECT id, full_name, city FROM customers ORDER BY id LIMIT 5"),
    LiveSession("s-cursor-0001", "cursor-agent", ("agents",), "127.0.0.1:50102",
                "cursor-agent/demo", "appdb", NOW - 512, "waiting", 17, 0,
                "UPDATE orders SET status = 'shipped' WHERE id = 7"),
    LiveSession("s-etl-00001", "etl-bot", ("agents", "etl"), "127.0.0.1:50103",
                "etl-bot/demo", "appdb", NOW - 65, "in transaction", 8, 2,
                "SELECT note FROM customers WHERE note = '[/foo] [bold]x[/bold]'"),
]

APPROVALS = [
    _approval(41, "cursor-agent", "UPDATE orders SET status = 'shipped' WHERE id = 7",
              created=NOW - 40),
    _approval(44, "etl-bot", "DELETE FROM orders WHERE note = '[/foo]' AND id IN "
              "(SELECT id FROM orders WHERE status = 'cancelled')", created=NOW - 5,
              session_id="s-etl-00001", rule="review-deletes"),
]

MASKING = [
    MaskingView(100 + i, NOW - 30 + i, 7, "s-cursor-0001", "cursor-agent", column, strategy,
                count)
    for i, (column, strategy, count) in enumerate([
        ("public.customers.email", "redact", 3), ("public.customers.ssn", "last4", 3),
        ("public.accounts.iban", "hash", 3), ("detector:card", "redact", 2)])
]

HISTORY = [
    _session(0, "claude-code", blocked=1),
    _session(1, "cursor-agent", reviewed=1),
    _session(2, "etl-bot", blocked=2, statements=5),
    _session(3, "claude-code"),
]


def _statements(session: SessionView) -> list[StatementView]:
    base = session.started_at
    approval = ApprovalView(
        id=9, session_id=session.id, statement_id=3, subject=session.subject,
        groups=session.groups, sql="UPDATE orders SET status = 'shipped' WHERE id = 7",
        params=None, fingerprint="f" * 16, rule_id="review-writes", reason=None,
        created_at=base + 20, expires_at=base + 320, binding_sha256="0" * 64,
        status="approved", scope="once", decided_by="oncall@soc (console)",
        decided_at=base + 31, comment=None)
    masking = tuple(MaskingView(20 + i, base + 11, 2, session.id, session.subject, column,
                                strategy, 2)
                    for i, (column, strategy) in enumerate([
                        ("public.customers.email", "redact"),
                        ("public.customers.ssn", "last4")]))

    def statement(seq: int, sql: str, decision: str, rule: str | None, at: float, *,
                  rows: int | None = None, tag: str | None = None,
                  sample: dict[str, Any] | None = None, sqlstate: str | None = None,
                  error: str | None = None, approval_view: ApprovalView | None = None,
                  masks: tuple[MaskingView, ...] = ()) -> StatementView:
        finished = at + 0.004 if decision != "block" else at
        return StatementView(
            id=seq + 1, session_id=session.id, seq=seq, received_at=at, sql=sql, params=None,
            facts={}, decision=decision, rule_id=rule,
            approval_id=approval_view.id if approval_view else None, started_at=at,
            finished_at=finished, duration_ms=4.2 if decision != "block" else 0.0, rows=rows,
            command_tag=tag, sqlstate=sqlstate, error_message=error,
            result_sha256=("9f2c" * 16) if decision != "block" else None,
            result_sample=sample, approval=approval_view, masking=masks)

    return [
        statement(1, "SELECT count(*) FROM orders WHERE status = 'paid'", "allow", None,
                  base + 1, rows=1, tag="SELECT 1",
                  sample={"columns": ["count"], "rows": [["12"]], "truncated": False}),
        statement(2, "SELECT id, full_name, email, ssn FROM customers ORDER BY id LIMIT 2",
                  "allow", "mask-pii", base + 11, rows=2, tag="SELECT 2", masks=masking,
                  sample={"columns": ["id", "full_name", "email", "ssn"], "rows": [
                      ["1", "Ada [/foo] Lovelace", "[REDACTED]", "***-**-6789"],
                      ["2", "Alan Turing", "[REDACTED]", None]], "truncated": False}),
        statement(3, "UPDATE orders SET status = 'shipped' WHERE id = 7", "review",
                  "review-writes", base + 20, rows=1, tag="UPDATE 1", approval_view=approval),
        statement(4, "DROP TABLE orders", "block", "no-ddl", base + 40, sqlstate="42501",
                  error="hoopops: DDL is not allowed for agents (rule no-ddl)"),
    ]


class FixedSource(ConsoleSource):
    """Fixed data for snapshots (and for trying layouts without a gateway)."""

    can_kill = True

    def __init__(self, *, attached: bool = False) -> None:
        self.attached = attached
        self.decisions: list[tuple[int, bool, str | None, str | None]] = []

    @property
    def store(self) -> Any:
        return object()  # truthy: history and export are available

    def status(self) -> Status:
        return Status(mode="attached" if self.attached else "gateway",
                      listen="127.0.0.1:6432", targets=("appdb",),
                      target_health={"appdb": "ok"}, policy_version="v7",
                      audit="/var/lib/hoopops/audit.db")

    async def live_sessions(self) -> list[LiveSession]:
        return list(LIVE)

    async def pending_approvals(self) -> list[ApprovalView]:
        return list(APPROVALS)

    async def decide(self, approval_id: int, approve: bool, scope: str | None,
                     decided_by: str, comment: str | None) -> ApprovalView | None:
        self.decisions.append((approval_id, approve, scope, comment))
        return None

    def kill_session(self, session_id: str) -> bool:
        raise SourceError("not in snapshots")

    async def recent_masking(self, limit: int = 200) -> list[MaskingView]:
        return list(MASKING)

    async def history(self, filters: Filters, limit: int = 500) -> list[SessionView]:
        rows = HISTORY
        if filters.identity:
            rows = [s for s in rows if s.subject == filters.identity]
        if filters.decision == "block":
            rows = [s for s in rows if s.blocked]
        return rows

    async def session(self, session_id: str) -> SessionView | None:
        return next((s for s in HISTORY if s.id == session_id), None)

    async def statements(self, session_id: str) -> list[StatementView]:
        session = await self.session(session_id)
        return _statements(session) if session is not None else []


def make_app(source: FixedSource | None = None, **kwargs: Any) -> ConsoleApp:
    from hoopops.tui.widgets.masking_feed import hits_from_views

    app = ConsoleApp(source or FixedSource(), clock=lambda: NOW, decided_by="oncall@soc",
                     live_updates=False, **kwargs)

    async def fill() -> None:
        # What one refresh would have fetched, applied without timers or workers.
        src = app.source
        app.apply(await src.live_sessions(), await src.pending_approvals(),
                  hits_from_views(await src.recent_masking()))

    app.call_later(fill)
    return app


async def _settle(pilot: Any) -> None:
    await pilot.pause()
    while not pilot.app.approvals:  # make_app's fill() has not run yet
        await pilot.pause(0.01)
    await pilot.app.workers.wait_for_complete()
    # Toasts (the new-approval alert) are transient; they would make the frame depend
    # on timing. test_tui_console checks they are raised.
    pilot.app.clear_notifications()
    await pilot.pause()


def test_dashboard_with_data(snap_compare: Any) -> None:
    """Status bar, live sessions, approvals (newest first) with detail, masking feed."""
    assert snap_compare(make_app(), terminal_size=(80, 24), run_before=_settle)


def test_dashboard_wide(snap_compare: Any) -> None:
    """At 160 columns the masking feed sits beside the sessions."""
    assert snap_compare(make_app(), terminal_size=(160, 40), run_before=_settle)


def test_approval_detail(snap_compare: Any) -> None:
    """The selected approval's detail: pretty SQL as text (the [/foo] stays literal)."""
    async def run_before(pilot: Any) -> None:
        await _settle(pilot)
        await pilot.press("2")
        await pilot.pause()

    assert snap_compare(make_app(), terminal_size=(120, 36), run_before=run_before)


def test_deny_prompt(snap_compare: Any) -> None:
    async def run_before(pilot: Any) -> None:
        await _settle(pilot)
        await pilot.press("2", "d")
        await pilot.pause()
        await pilot.press(*"needs a ticket")
        await pilot.pause()

    assert snap_compare(make_app(), terminal_size=(80, 24), run_before=run_before)


def test_history_with_filter(snap_compare: Any) -> None:
    async def run_before(pilot: Any) -> None:
        await _settle(pilot)
        await pilot.press("h")
        await _settle(pilot)
        await pilot.press("slash", *"decision:block", "enter")
        await _settle(pilot)

    assert snap_compare(make_app(), terminal_size=(100, 24), run_before=run_before)


def test_replay_first_step(snap_compare: Any) -> None:
    async def run_before(pilot: Any) -> None:
        await _settle(pilot)
        pilot.app.open_replay(HISTORY[0].id)
        await _settle(pilot)

    assert snap_compare(make_app(), terminal_size=(100, 30), run_before=run_before)


def test_replay_last_step(snap_compare: Any) -> None:
    async def run_before(pilot: Any) -> None:
        await _settle(pilot)
        pilot.app.open_replay(HISTORY[0].id)
        await _settle(pilot)
        await pilot.press("G")
        await pilot.pause()

    assert snap_compare(make_app(), terminal_size=(100, 30), run_before=run_before)


def test_replay_masked_rows(snap_compare: Any) -> None:
    """The step with masking: masked values and a literal [/foo] in the result grid."""
    async def run_before(pilot: Any) -> None:
        await _settle(pilot)
        pilot.app.open_replay(HISTORY[0].id, step=1)
        await _settle(pilot)

    assert snap_compare(make_app(), terminal_size=(100, 30), run_before=run_before)


def test_help(snap_compare: Any) -> None:
    async def run_before(pilot: Any) -> None:
        await _settle(pilot)
        await pilot.press("question_mark")
        await pilot.pause()
        # The end of the help: the key table, with approvals.deny remapped to x.
        await pilot.press("end")
        await pilot.pause()

    assert snap_compare(make_app(keymap={"approvals.deny": "x"}), terminal_size=(100, 36),
                        run_before=run_before)


def _drift_report() -> Any:
    """A sandbox replay of HISTORY[0] in which the masked read's rows changed."""
    from hoopops.replay import ReplayReport, StatementReplay

    session = HISTORY[0]
    statements = _statements(session)
    ssn = {("public.customers.email", "redact"): 2, ("public.customers.ssn", "last4"): 2}
    rows = []
    for s in statements:
        ran = s.decision != "block"
        drifted = s.seq == 2
        rows.append(StatementReplay(
            statement_id=s.id, seq=s.seq, sql=s.sql, params=None,
            status="ran" if ran else "not run",
            note=None if ran else "it did not run when recorded (block by no-ddl, 42501)",
            decision_then=s.decision, rule_then=s.rule_id, decision_now=s.decision,
            rule_now=s.rule_id, ran_then=ran, hash_then=s.result_sha256,
            hash_now=("0be1" * 16) if drifted else s.result_sha256, tag_then=s.command_tag,
            tag_now=s.command_tag, masking_then=ssn if s.seq == 2 else {},
            masking_now=(ssn if s.seq == 2 else {}) if ran else None,
            sample_then=s.result_sample,
            sample_now={"columns": ["id", "full_name", "email", "ssn"], "rows": [
                ["1", "Ada King [/foo]", "[REDACTED]", "***-**-6789"],
                ["2", "Alan Turing", "[REDACTED]", None]], "truncated": False}
            if drifted else s.result_sample))
    return ReplayReport(session_id=session.id, subject=session.subject,
                        groups=session.groups, target=session.target,
                        sandbox="hoopops_svc@127.0.0.1:5432/app_sandbox",
                        policies="/etc/hoopops/policies", policy_version="4c58593444a2a446",
                        started_at=NOW, finished_at=NOW + 1, statements=rows)


def test_replay_sandbox_running(snap_compare: Any) -> None:
    """The position line while a sandbox replay runs in its thread."""
    async def run_before(pilot: Any) -> None:
        await _settle(pilot)
        pilot.app.open_replay(HISTORY[0].id)
        await _settle(pilot)
        screen = pilot.app.screen
        screen.sandbox_progress = (1, 4)
        screen.show_step()
        await pilot.pause()
        assert "sandbox replay running: statement 2/4" in str(
            screen.query_one("#replay-position").content)

    assert snap_compare(make_app(), terminal_size=(100, 30), run_before=run_before)


def test_drift_report(snap_compare: Any) -> None:
    """One drifted statement (result hash), highlighted and selected, its rows then/now."""
    from hoopops.tui.screens.drift import DriftScreen

    async def run_before(pilot: Any) -> None:
        await _settle(pilot)
        pilot.app.open_replay(HISTORY[0].id)
        await _settle(pilot)
        pilot.app.push_screen(DriftScreen(_drift_report()))
        await _settle(pilot)
        assert isinstance(pilot.app.screen, DriftScreen)  # mounted, not crashed

    assert snap_compare(make_app(), terminal_size=(120, 40), run_before=run_before)


def test_sandbox_prompt_refuses_a_target(snap_compare: Any, tmp_path: Path) -> None:
    """No replay.sandbox configured: r asks; the password field shows dots; the target's
    own database is refused in place."""
    from hoopops.config import load_config
    from hoopops.tui.screens.sandbox_prompt import SandboxPrompt

    path = tmp_path / "hoopops.yaml"
    path.write_text("targets:\n  appdb:\n    upstream: postgresql://svc:pw@localhost:5432/app\n"
                    "identity:\n  hs256_secret: " + "k" * 40 + "\n")
    config = load_config(path)

    async def run_before(pilot: Any) -> None:
        await _settle(pilot)
        pilot.app.open_replay(HISTORY[0].id)
        await _settle(pilot)
        prompt = SandboxPrompt(config)
        pilot.app.push_screen(prompt)
        await pilot.pause()
        await pilot.press(*"postgresql://svc@127.0.0.1:5432/app", "tab", *"hunter2", "enter")
        await pilot.app.workers.wait_for_complete()
        await pilot.pause()
        assert "refusing" in str(prompt.query_one("#sandbox-error").content)

    assert snap_compare(make_app(), terminal_size=(100, 30), run_before=run_before)

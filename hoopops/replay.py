"""Re-check recorded sessions: replay them into a sandbox, or diff a candidate policy.

Two questions an auditor asks of the trail:

* ``replay_session`` — *does what was recorded match what the policy says, and would it
  give the same result today?* It re-runs one recorded session against a sandbox
  database (never a configured target) through an in-process gateway pointed at the
  sandbox, so the decision, the masking and the result hash come from exactly the code
  that produced the recording, not from a re-implementation that could drift from it.
  Everything runs inside one transaction that is rolled back at the end, with a
  SAVEPOINT per statement so one failing statement does not abort the rest.
* ``diff_policies`` — *which recorded decisions would a candidate policy change?* It
  re-decides recorded statements without running anything.

Both return plain report objects with ``to_json()``; the CLI (``hoopops replay``,
``hoopops policy diff``) prints them and the console can show them. The console should
call :func:`replay_session_blocking` from a worker thread (it runs its own event loop, its
own gateway and its own read-only handle on the audit store).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import secrets
import struct
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg

from hoopops import events
from hoopops.audit import SQLiteAuditStore, StatementView
from hoopops.audit.records import iso
from hoopops.audit.store import AuditError, AuditStore, NullAuditStore
from hoopops.config import (
    AuditConfig,
    Config,
    IdentityConfig,
    Target,
    Upstream,
    parse_upstream,
    redact_dsn,
)
from hoopops.gateway import Gateway
from hoopops.identity import Identity, mint_token
from hoopops.masking.rules import MaskingFacts
from hoopops.policy import Decision, PolicyEngine
from hoopops.proxy import protocol as p
from hoopops.proxy.catalog import Catalog
from hoopops.proxy.enforcer import Enforcer
from hoopops.proxy.enforcer import _sample as recorded_sample
from hoopops.proxy.gate import ALLOW, Verdict
from hoopops.sandbox import same_database, target_refusal
from hoopops.sql import Analysis, SessionSqlState, StatementFacts, analyze
from hoopops.sql.facts import add_effects
from hoopops.sql_catalog import SqlCatalog
from hoopops.yamlfile import YamlFileError

if TYPE_CHECKING:
    from hoopops.audit import SessionView
    from hoopops.proxy.session import Run, Session

_INT16 = struct.Struct("!h")
_INT32 = struct.Struct("!i")

# Statements the replay never executes itself: they would end (or nest inside) the one
# transaction that guarantees the sandbox is left as it was found.
TRANSACTION_CONTROL = "TransactionStmt"

# A hex digest of nothing: the result hash of a statement that returned no rows.
EMPTY_SHA256 = hashlib.sha256().hexdigest()


# Called before each statement with (statements done, total); an exception raised from it
# stops the replay (the sandbox connection closes, so its transaction is rolled back).
Progress = Callable[[int, int], None]
# Seconds between checks of replay_session_blocking's ``cancelled``.
CANCEL_POLL = 0.2


class ReplayError(Exception):
    """The replay could not be done (or finished); the message says why and what to do."""


# ---------------------------------------------------------------------------------------
# Reports


@dataclass
class StatementReplay:
    """One recorded statement: what was recorded, what happens now, and what drifted."""

    statement_id: int
    seq: int
    sql: str
    params: list[Any] | None
    # ran (executed in the sandbox now) | not run | skipped (transaction control)
    status: str
    note: str | None
    decision_then: str
    rule_then: str | None
    decision_now: str | None
    rule_now: str | None
    ran_then: bool
    hash_then: str | None
    hash_now: str | None = None
    tag_then: str | None = None
    tag_now: str | None = None
    sqlstate_then: str | None = None
    sqlstate_now: str | None = None
    error_now: str | None = None
    rows_now: int | None = None
    masking_then: dict[tuple[str, str], int] = field(default_factory=dict)
    masking_now: dict[tuple[str, str], int] | None = None
    result_formats: str | None = None
    sample_then: dict[str, Any] | None = None
    sample_now: dict[str, Any] | None = None

    @property
    def decision_drift(self) -> bool:
        return self.decision_now is not None and self.decision_now != self.decision_then

    @property
    def rule_changed(self) -> bool:
        return not self.decision_drift and self.decision_now is not None \
            and self.rule_now != self.rule_then

    @property
    def compared(self) -> bool:
        """Whether a result comparison was possible: it ran then (with a recorded
        outcome) and ran now."""
        return self.status == "ran" and self.ran_then and self.hash_then is not None

    @property
    def result_drift(self) -> bool:
        if not self.compared:
            return False
        # The hash covers the rows; an UPDATE's rows-affected count (its command tag) and
        # an error are part of the outcome too, and the hash alone cannot see them.
        return (self.hash_now != self.hash_then or self.tag_now != self.tag_then
                or self.sqlstate_now != self.sqlstate_then)

    @property
    def masking_drift(self) -> bool:
        return self.compared and self.masking_now is not None \
            and self.masking_now != self.masking_then

    @property
    def drift(self) -> bool:
        return self.decision_drift or self.result_drift or self.masking_drift

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "statement_id": self.statement_id, "seq": self.seq, "sql": self.sql,
            "params": self.params, "status": self.status, "note": self.note,
            "drift": self.drift,
            "decision": {"then": self.decision_then, "rule_then": self.rule_then,
                         "now": self.decision_now, "rule_now": self.rule_now,
                         "drift": self.decision_drift, "rule_changed": self.rule_changed},
            "result": {"compared": self.compared, "drift": self.result_drift,
                       "sha256_then": self.hash_then, "sha256_now": self.hash_now,
                       "command_tag_then": self.tag_then, "command_tag_now": self.tag_now,
                       "sqlstate_then": self.sqlstate_then, "sqlstate_now": self.sqlstate_now,
                       "error_now": self.error_now, "rows_now": self.rows_now,
                       "formats": self.result_formats},
            "masking": {"drift": self.masking_drift,
                        "then": _masking_json(self.masking_then),
                        "now": None if self.masking_now is None
                        else _masking_json(self.masking_now)},
        }
        if self.result_drift:
            # Only when it helps to see what changed: samples are masked, and capped.
            out["result"]["sample_then"] = self.sample_then
            out["result"]["sample_now"] = self.sample_now
        return out


def _masking_json(actions: dict[tuple[str, str], int]) -> list[dict[str, Any]]:
    return [{"column": c, "strategy": s, "count": n} for (c, s), n in sorted(actions.items())]


@dataclass
class ReplayReport:
    session_id: str
    subject: str
    groups: tuple[str, ...]
    target: str
    sandbox: str  # password-free
    policies: str | None
    policy_version: str | None
    started_at: float
    finished_at: float | None = None
    statements: list[StatementReplay] = field(default_factory=list)

    @property
    def drifted(self) -> list[StatementReplay]:
        return [s for s in self.statements if s.drift]

    @property
    def drift(self) -> bool:
        return bool(self.drifted)

    @property
    def exit_status(self) -> int:
        return 1 if self.drift else 0

    def counts(self) -> dict[str, int]:
        return {
            "statements": len(self.statements),
            "ran": sum(s.status == "ran" for s in self.statements),
            "not_run": sum(s.status == "not run" for s in self.statements),
            "skipped": sum(s.status == "skipped" for s in self.statements),
            "decision_drift": sum(s.decision_drift for s in self.statements),
            "result_drift": sum(s.result_drift for s in self.statements),
            "masking_drift": sum(s.masking_drift for s in self.statements),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": "hoopops.replay/1",
            "session_id": self.session_id, "identity": self.subject,
            "groups": list(self.groups), "target": self.target, "sandbox": self.sandbox,
            "policies": self.policies, "policy_version": self.policy_version,
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at) if self.finished_at else None,
            "drift": self.drift, "counts": self.counts(),
            "statements": [s.to_json() for s in self.statements],
        }

    def render(self) -> str:
        """The human report: one line per statement, details for what drifted."""
        lines = [f"replay of session {self.session_id} ({self.subject}, target "
                 f"{self.target}) into sandbox {self.sandbox}",
                 f"policies: {self.policies or 'none configured (every statement allowed)'}"
                 + (f" (version {self.policy_version[:12]})" if self.policy_version else ""),
                 ""]
        for st in self.statements:
            mark = "DRIFT" if st.drift else "ok"
            decision = f"{st.decision_then} -> {st.decision_now or '?'}"
            lines.append(f"  {mark:5}  #{st.statement_id:<6} {st.status:8} {decision:16} "
                         f"{_one_line(st.sql, 70)}")
            if st.decision_drift or st.rule_changed:
                lines.append(f"         decision: {st.decision_then} by {st.rule_then} "
                             f"-> {st.decision_now} by {st.rule_now}")
            if st.result_drift:
                lines.append(f"         result:   sha256 {_short(st.hash_then)} -> "
                             f"{_short(st.hash_now)}; tag {st.tag_then} -> {st.tag_now}"
                             + (f"; error {st.sqlstate_then} -> {st.sqlstate_now}"
                                if st.sqlstate_then != st.sqlstate_now else ""))
                if st.error_now:
                    lines.append(f"         error now: {st.error_now}")
            if st.masking_drift:
                lines.append(f"         masking:  {_masking_text(st.masking_then)} -> "
                             f"{_masking_text(st.masking_now or {})}")
            if st.note and st.status != "skipped":
                lines.append(f"         note:     {st.note}")
        c = self.counts()
        lines += ["", f"{c['statements']} statements: {c['ran']} ran, {c['not_run']} not run, "
                  f"{c['skipped']} skipped (transaction control)"]
        if self.drift:
            lines.append(f"DRIFT in {len(self.drifted)} statement(s): {c['decision_drift']} "
                         f"decision, {c['result_drift']} result, {c['masking_drift']} masking")
        else:
            lines.append("no drift: every decision, result hash and masking action matches "
                         "the recording")
        lines.append("the sandbox transaction was rolled back")
        return "\n".join(lines)


def _short(digest: str | None) -> str:
    return digest[:12] + "…" if digest else "-"


def _one_line(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[:width - 1] + "…"


def _masking_text(actions: dict[tuple[str, str], int]) -> str:
    if not actions:
        return "(none)"
    return ", ".join(f"{c} {s} x{n}" for (c, s), n in sorted(actions.items()))


# ---------------------------------------------------------------------------------------
# Which database is the sandbox? (never a configured target)


def check_sandbox(config: Config, sandbox_dsn: str) -> Upstream:
    """The sandbox's upstream, or ReplayError if it is unusable or a configured target."""
    try:
        sandbox = parse_upstream(sandbox_dsn)
    except ValueError as exc:
        raise ReplayError(f"sandbox {redact_dsn(sandbox_dsn)}: {exc}") from None
    refusal = target_refusal(config.targets.values(), sandbox)
    if refusal is not None:
        raise ReplayError(refusal)
    return sandbox


# ---------------------------------------------------------------------------------------
# Reading the recording


def _identity(session: SessionView) -> Identity:
    return Identity(session.subject, tuple(session.groups), session.issuer, session.token_id,
                    None)


def ran_then(view: StatementView) -> bool:
    """Whether the recorded statement was forwarded to the database."""
    if view.finished:
        return view.started_at is not None
    # Recorded before forwarding but its outcome never made it to the trail (the gateway
    # died): refusals write both records at once, so this one was let through.
    return view.decision == "allow" or view.approval_id is not None


def _masking_then(view: StatementView) -> dict[tuple[str, str], int]:
    out: Counter[tuple[str, str]] = Counter()
    for m in view.masking:
        out[(m.column_or_detector, m.strategy)] += m.count
    return dict(out)


def _is_transaction_control(analysis: Analysis) -> bool:
    return any(st.statement_type == TRANSACTION_CONTROL for st in analysis.statements)


def _not_run_reason(view: StatementView, was_run: bool, now: str) -> str | None:
    """Why a statement must not be executed in the sandbox, or None if it may.

    It runs only if it ran when recorded and the policy now lets it run: never something
    the policy now blocks, and never something that was refused then. A statement that
    needed approval then and still does now ran on the strength of its recorded approval.
    """
    if not was_run:
        return f"it did not run when recorded ({view.decision} by {view.rule_id}" + (
            f", {view.sqlstate}" if view.sqlstate else "") + ")"
    if now == "allow":
        return None
    if now == "review" and view.decision == "review":
        return None
    if now == "review":
        return "the policy now holds it for approval, and the replay cannot approve it"
    return "the policy now blocks it"


async def _open_store(config: Config) -> AuditStore:
    if not config.audit.enabled:
        raise ReplayError("audit is disabled in the configuration (audit.enabled: false); "
                          "there is no recording to replay")
    try:
        return await SQLiteAuditStore.open(config.audit.path, create=False)
    except AuditError as exc:
        raise ReplayError(f"audit store: {exc}") from None


def _engine(folder: Path | str | None) -> PolicyEngine | None:
    if folder is None:
        return None
    try:
        return PolicyEngine(folder)
    except YamlFileError as exc:
        raise ReplayError(f"policy error: {exc}") from None


# ---------------------------------------------------------------------------------------
# The in-process gateway the replay runs through


@dataclass
class _Attempt:
    """The recorded statement the replay client is sending right now."""

    view: StatementView
    ran_then: bool
    verdict: Verdict | None = None
    not_run: str | None = None
    run: Run | None = None
    outcome: dict[str, Any] | None = None
    masking: Counter[tuple[str, str]] = field(default_factory=Counter)


class _ReplayGate(Enforcer):
    """The gateway's own enforcer, with three changes for a replay.

    * The replay's own transaction statements (BEGIN, SAVEPOINT, ...; exact texts only this
      process knows) pass without a decision.
    * Statements the policy now holds for review are never held: they run if the recording
      shows an approval for them, else they are refused like a block (see
      ``_not_run_reason``); statements that must not run are refused the same way the
      gateway refuses a block, so nothing reaches the sandbox for them.
    * Results are hashed with audit disabled (the enforcer only hashes for the audit
      trail), and the hash, outcome and masking actions are captured for the report.
    """

    def __init__(self, config: Config, bus: events.EventBus, engine: PolicyEngine | None,
                 catalogs: dict[str, SqlCatalog], column_catalogs: dict[str, Catalog],
                 control: frozenset[str]) -> None:
        super().__init__(config, bus, engine, NullAuditStore(), None, catalogs,
                         column_catalogs)
        self.control = control
        self.current: _Attempt | None = None
        # The relay calls before_forward only for a gate that audits; this one does not
        # write a trail, but before_forward is where the result hash is armed.
        self.audits = True

    @property
    def observes_results(self) -> bool:
        return True  # after_result is where the outcome is captured

    async def decide(self, session: Session, sql: str, statement_name: str | None) -> Verdict:
        if sql in self.control:
            return ALLOW
        attempt = self.current
        if attempt is None or sql != attempt.view.sql:
            return Verdict("block", "42501", "hoopops replay: unexpected statement")
        verdict = await super().decide(session, sql, statement_name)
        attempt.verdict = verdict
        now = verdict.decision.action if verdict.decision is not None else verdict.action
        attempt.not_run = _not_run_reason(attempt.view, attempt.ran_then, now)
        if attempt.not_run is not None:
            return Verdict("block", "42501", f"hoopops replay: not run: {attempt.not_run}")
        if verdict.action != "allow":
            # Held for review then and now: it runs on the recorded approval (the replay
            # has no analyst to ask, and must not wait for one).
            verdict = dataclasses.replace(verdict, action="allow", message="", hint=None)
        return verdict

    async def before_forward(self, session: Session, run: Run, *, flushed: bool = True
                             ) -> Verdict | None:
        refusal = await super().before_forward(session, run, flushed=flushed)
        attempt = self.current
        if refusal is None and attempt is not None and run.sql == attempt.view.sql \
                and run.sql not in self.control:
            # Exactly what the gateway sets up when it records: the session hashes every
            # DataRow as sent (after masking) into run.hasher.
            run.hasher = hashlib.sha256()
            run.sample = []
            attempt.run = run
        return refusal

    async def after_result(self, session: Session, run: Run) -> None:
        await super().after_result(session, run)
        attempt = self.current
        if attempt is not None and run is attempt.run and run.hasher is not None:
            attempt.outcome = {"sha256": run.hasher.hexdigest(), "rows": run.rows,
                               "tag": run.tag, "sqlstate": run.sqlstate, "error": run.error,
                               "sample": _sample(run)}

    def _report_masking(self, session: Session, run: Run | None, actions: list[Any]) -> None:
        # The one place the enforcer hands over a result's masking actions (it would write
        # them to the audit trail); capture them for the report as well.
        super()._report_masking(session, run, actions)
        attempt = self.current
        if attempt is not None and run is not None and run is attempt.run:
            for action in actions:
                attempt.masking[(action.column, action.strategy)] += action.count


def _sample(run: Run) -> dict[str, Any] | None:
    """The masked rows as sent, in the audit trail's sample form (for the drift view).

    The enforcer's own function, the one that wrote ``sample_then``: binary-format values
    read the same way then and now (the RowDescription always says text; the formats that
    apply are the client's, from Bind)."""
    return recorded_sample(run)


class _Fetcher:
    """One asyncpg connection to the sandbox for catalog lookups, closed at the end."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.connections: list[Any] = []

    async def connect(self) -> Any:
        conn = await asyncpg.connect(**self.upstream.asyncpg_kwargs())
        self.connections.append(conn)
        return conn

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        live = [c for c in self.connections if not c.is_closed()]
        conn = live[-1] if live else await self.connect()
        return list(await conn.fetch(query, *args))

    async def close(self) -> None:
        for conn in self.connections:
            with contextlib.suppress(Exception):
                await conn.close()


# ---------------------------------------------------------------------------------------
# A minimal frontend: just what replaying needs, with full control of the formats


@dataclass
class _Reply:
    tx_status: bytes = b"I"
    error: dict[str, str] | None = None
    tags: list[str] = field(default_factory=list)
    copy_in: bool = False
    param_types: tuple[int, ...] = ()


class _Wire:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 timeout: float) -> None:
        self.reader = reader
        self.writer = writer
        self.timeout = timeout

    @classmethod
    async def connect(cls, port: int, database: str, token: str, application_name: str,
                      wait: float) -> _Wire:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        wire = cls(reader, writer, wait)
        writer.write(p.startup_message({"user": "hoopops-replay", "database": database,
                                        "application_name": application_name}))
        await writer.drain()
        while True:
            mtype, payload = await wire._read()
            if mtype == p.AUTHENTICATION:
                code, _ = p.decode_auth(payload)
                if code == 3:
                    writer.write(p.password_message(token.encode() + b"\0"))
                    await writer.drain()
                elif code != 0:
                    raise ReplayError(f"replay gateway asked for authentication {code}")
            elif mtype == p.ERROR_RESPONSE:
                fields = p.parse_error_fields(payload)
                raise ReplayError(f"could not open the replay session on the sandbox: "
                                  f"{fields.get('M')} ({fields.get('C')})")
            elif mtype == p.READY_FOR_QUERY:
                return wire

    async def _read(self) -> tuple[int, bytes]:
        try:
            async with asyncio.timeout(self.timeout):
                header = await self.reader.readexactly(5)
                mtype, length = header[0], struct.unpack("!I", header[1:])[0]
                payload = await self.reader.readexactly(length - 4)
        except TimeoutError:
            raise ReplayError(f"no answer within {self.timeout:g}s; the replay stopped "
                              "(its transaction is rolled back when the connection closes)"
                              ) from None
        except (asyncio.IncompleteReadError, ConnectionError):
            raise ReplayError("the replay gateway closed the connection; the replay stopped "
                              "(its transaction is rolled back with the connection)") from None
        return mtype, payload

    async def _until_ready(self, extended: bool) -> _Reply:
        reply = _Reply()
        while True:
            mtype, payload = await self._read()
            if mtype == p.READY_FOR_QUERY:
                reply.tx_status = payload[:1]
                return reply
            if mtype == p.ERROR_RESPONSE and reply.error is None:
                reply.error = p.parse_error_fields(payload)
            elif mtype == p.COMMAND_COMPLETE:
                reply.tags.append(p.decode_command_tag(payload))
            elif mtype == p.PARAMETER_DESCRIPTION:
                (count,) = _INT16.unpack_from(payload, 0)
                reply.param_types = struct.unpack_from(f"!{count}I", payload, 2)
            elif mtype == p.COPY_IN_RESPONSE:
                # The rows a client sent with COPY FROM STDIN are not in the trail.
                reply.copy_in = True
                message = p.frame(p.COPY_FAIL, p.cstr("hoopops replay: the COPY data was "
                                                      "not recorded"))
                # The server ignored the Sync sent with Execute while copying; send another.
                self.writer.write(message + (p.SYNC_MESSAGE if extended else b""))
                await self.writer.drain()

    async def simple(self, sql: str) -> _Reply:
        self.writer.write(p.query(sql))
        await self.writer.drain()
        return await self._until_ready(False)

    async def extended(self, sql: str, params: Sequence[tuple[int, bytes | None]],
                       result_formats: Sequence[int], max_rows: int = 0) -> _Reply:
        # Parse and Describe first, as drivers do: the server's parameter types tell how
        # to send recorded binary values whose declared type the trail does not keep.
        self.writer.write(p.parse_message("", sql) + p.frame(p.DESCRIBE, b"S\0")
                          + p.SYNC_MESSAGE)
        await self.writer.drain()
        described = await self._until_ready(True)
        if described.error is not None:
            return described
        params = [adapt_param(fmt, value, oid) for (fmt, value), oid in zip(
            params, described.param_types or (0,) * len(params), strict=False)]
        body = p.cstr("") + p.cstr("") + _INT16.pack(len(params))
        body += b"".join(_INT16.pack(fmt) for fmt, _ in params)
        body += _INT16.pack(len(params))
        for _, value in params:
            body += _INT32.pack(-1) if value is None else _INT32.pack(len(value)) + value
        body += _INT16.pack(len(result_formats)) + b"".join(
            _INT16.pack(f) for f in result_formats)
        self.writer.write(p.frame(p.BIND, body) + p.execute_message("", max_rows)
                          + p.SYNC_MESSAGE)
        await self.writer.drain()
        return await self._until_ready(True)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.write(p.TERMINATE_MESSAGE)
            await self.writer.drain()
        with contextlib.suppress(Exception):
            self.writer.close()
            await self.writer.wait_closed()


def wire_params(recorded: Sequence[Any]) -> list[tuple[int, bytes | None]]:
    """Recorded parameter values as (format code, bytes) for Bind.

    Text stays text. ``{"hex": ...}`` (the documented form of a binary value) is sent as
    binary. The gateway currently records binary values as decoded text; a value holding a
    NUL character cannot have been sent as text (the server refuses NUL in text values),
    so it is sent back as the binary value it was.
    """
    out: list[tuple[int, bytes | None]] = []
    for value in recorded:
        if value is None:
            out.append((0, None))
        elif isinstance(value, dict) and "hex" in value:
            out.append((1, bytes.fromhex(str(value["hex"]))))
        elif "\x00" in str(value):
            out.append((1, str(value).encode("utf-8", "surrogateescape")))
        else:
            out.append((0, str(value).encode("utf-8", "surrogateescape")))
    return out


# Fixed-width integer types by OID: int2, int4, int8, oid.
_INT_WIDTHS = {21: 2, 23: 4, 20: 8, 26: 4}
_FLOAT_OR_NUMERIC = frozenset({700, 701, 1700})


def adapt_param(fmt: int, value: bytes | None, oid: int) -> tuple[int, bytes | None]:
    """A recorded binary value made acceptable to the type the server now infers.

    Drivers that declare parameter types in Parse (psycopg sends a Python int as int2,
    int4 or int8 by its size) can send a binary integer whose width differs from the
    column's type; the server converted it then, but the declared type is not in the
    trail. A binary value whose width cannot be the inferred fixed-width type's must have
    been such an integer, so it is sent as the same number in text, which the server
    parses into whatever type it inferred. Anything else is sent exactly as recorded.
    """
    if fmt != 1 or value is None or len(value) not in (2, 4, 8):
        return fmt, value
    width = _INT_WIDTHS.get(oid)
    integer = (width is not None and len(value) != width) or (
        oid in _FLOAT_OR_NUMERIC and len(value) in (2, 4) and oid != 700)
    if integer:
        return 0, str(int.from_bytes(value, "big", signed=True)).encode()
    return fmt, value


def format_candidates(view: StatementView) -> list[tuple[str, tuple[int, ...]]]:
    """Result format codes to try for an extended-protocol statement, likeliest first.

    The hash covers the DataRows as sent, so it depends on the formats the client asked
    for in Bind, which the trail does not keep. The recorded sample shows binary cells in
    ``\\x`` form: a column whose sampled values all look like that was probably binary
    (asyncpg asks for binary; psycopg, JDBC and node-postgres for text). Text first, then
    that per-column guess, then everything binary.
    """
    candidates: list[tuple[str, tuple[int, ...]]] = [("text", ())]
    sample = view.result_sample or {}
    columns = list(sample.get("columns") or [])
    rows = list(sample.get("rows") or [])
    if columns and rows:
        guess = []
        for index in range(len(columns)):
            values = [r[index] for r in rows if index < len(r) and r[index] is not None]
            guess.append(1 if values and all(str(v).startswith("\\x") for v in values) else 0)
        if any(guess) and not all(guess):
            candidates.append(("per column, guessed from the recorded sample", tuple(guess)))
    candidates.append(("binary", (1,)))
    return candidates


# ---------------------------------------------------------------------------------------
# Replaying one session


class _Replayer:
    def __init__(self, config: Config, session: SessionView, statements: list[StatementView],
                 sandbox: Upstream, engine: PolicyEngine | None, timeout: float) -> None:
        self.config = config
        self.session = session
        self.statements = statements
        self.sandbox = sandbox
        self.engine = engine
        self.timeout = timeout
        self.savepoint = "hoopops_replay_" + secrets.token_hex(6)
        self.control = frozenset({
            "BEGIN", "ROLLBACK", f"SAVEPOINT {self.savepoint}",
            f"RELEASE SAVEPOINT {self.savepoint}", f"ROLLBACK TO SAVEPOINT {self.savepoint}"})
        self.gate: _ReplayGate | None = None
        self.gateway: Gateway | None = None
        self.fetchers: list[_Fetcher] = []
        self.wire: _Wire | None = None

    async def run(self, report: ReplayReport, progress: Progress | None = None) -> None:
        total = len(self.statements)
        finished = False
        try:
            await self._start()
            await self._control("BEGIN")
            for done, view in enumerate(self.statements):
                if progress is not None:
                    progress(done, total)
                report.statements.append(await self._statement(view))
            await self._control("ROLLBACK")
            finished = True
        finally:
            await self._stop(abandoned=not finished)

    async def _start(self) -> None:
        name = self.session.target
        secret = secrets.token_urlsafe(48)
        identity = IdentityConfig(issuer=self.session.issuer or "hoopops-replay",
                                  audience="hoopops-replay", hs256_secret=secret)
        # The recorded target's name (policies match on it) pointed at the sandbox; audit
        # off (nothing of the replay belongs in the trail); only loopback, no TLS.
        config = dataclasses.replace(
            self.config, listen_host="127.0.0.1", listen_port=0,
            targets={name: Target(name, self.sandbox)}, identity=identity, tls=None,
            policies=self.engine.folder if self.engine else None,
            audit=AuditConfig(path=self.config.audit.path, enabled=False,
                              result_rows=self.config.audit.result_rows,
                              result_bytes=self.config.audit.result_bytes))
        bus = events.EventBus()
        catalogs: dict[str, SqlCatalog] = {}
        column_catalogs: dict[str, Catalog] = {}
        if self.engine is not None:
            fetcher = _Fetcher(self.sandbox)
            self.fetchers.append(fetcher)
            catalogs[name] = SqlCatalog(fetcher.connect)
            column_catalogs[name] = Catalog(fetcher)
        try:
            self.gate = _ReplayGate(config, bus, self.engine, catalogs, column_catalogs,
                                    self.control)
        except YamlFileError as exc:
            raise ReplayError(f"masking policy error: {exc}") from None
        self.gateway = Gateway(config, bus, self.gate)
        await self.gateway.start()
        try:
            token = mint_token(identity, self.session.subject, list(self.session.groups), 3600)
        except Exception as exc:
            raise ReplayError(f"cannot act as the recorded identity "
                              f"'{self.session.subject}': {exc}") from None
        self.wire = await _Wire.connect(self.gateway.port, name, token,
                                        f"hoopops replay {self.session.id[:12]}", self.timeout)

    async def _stop(self, abandoned: bool = False) -> None:
        if abandoned and self.gateway is not None:
            # Cancelled, timed out or failed mid-statement: the statement may still run
            # (or wait on a lock) in the sandbox, and closing our end does not stop a
            # backend that is not reading. Cancel it there, as the gateway's kill does.
            await asyncio.gather(*(session.cancel_upstream()
                                   for session in list(self.gateway.sessions.values())),
                                 return_exceptions=True)
        if self.wire is not None:
            await self.wire.close()
        if self.gateway is not None:
            await self.gateway.stop(grace=1)
        for fetcher in self.fetchers:
            await fetcher.close()

    async def _control(self, sql: str) -> _Reply:
        assert self.wire is not None
        reply = await self.wire.simple(sql)
        if reply.error is not None:
            raise ReplayError(f"the sandbox refused '{sql}': {reply.error.get('M')} "
                              f"({reply.error.get('C')}); the replay stopped")
        return reply

    def _decide_offline(self, sql: str) -> Decision | None:
        if self.engine is None:
            return None
        return self.engine.decide(_identity(self.session), self.session.target, analyze(sql))

    async def _statement(self, view: StatementView) -> StatementReplay:
        was_run = ran_then(view)
        base = StatementReplay(
            statement_id=view.id, seq=view.seq, sql=view.sql, params=view.params,
            status="not run", note=None, decision_then=view.decision, rule_then=view.rule_id,
            decision_now=None, rule_now=None, ran_then=was_run,
            hash_then=view.result_sha256 if was_run else None, tag_then=view.command_tag,
            sqlstate_then=view.sqlstate, masking_then=_masking_then(view),
            sample_then=view.result_sample)
        if _is_transaction_control(analyze(view.sql)):
            decision = self._decide_offline(view.sql)
            base.decision_now = decision.action if decision else "allow"
            base.rule_now = decision.rule_id if decision else None
            base.status = "skipped"
            base.note = ("transaction control is not executed: the whole replay runs in one "
                         "transaction that is rolled back")
            return base
        await self._control(f"SAVEPOINT {self.savepoint}")
        candidates = format_candidates(view) if view.params is not None else [("text", ())]
        chosen: tuple[_Attempt, _Reply, str] | None = None
        reply: _Reply | None = None
        for index, (label, formats) in enumerate(candidates):
            if index:
                # Undo the previous try (a read, see _may_retry) before the next one.
                await self._control(f"ROLLBACK TO SAVEPOINT {self.savepoint}")
            attempt, reply = await self._send(view, was_run, formats)
            outcome = attempt.outcome
            if chosen is None:
                chosen = (attempt, reply, label)
            if outcome is None or attempt.not_run is not None \
                    or not _may_retry(view, attempt, outcome):
                break
            if outcome["sha256"] == view.result_sha256:
                chosen = (attempt, reply, label)
                break
        assert chosen is not None and reply is not None
        # The transaction is as the last try left it.
        if reply.tx_status == b"E":
            await self._control(f"ROLLBACK TO SAVEPOINT {self.savepoint}")
        elif reply.tx_status == b"I":
            raise ReplayError(f"statement #{view.id} ended the replay transaction; the replay "
                              "stopped. Check the sandbox: its effects may have been kept")
        await self._control(f"RELEASE SAVEPOINT {self.savepoint}")
        attempt, first_reply, label = chosen
        return self._result(base, attempt, first_reply,
                            label if view.params is not None else None)

    async def _send(self, view: StatementView, was_run: bool, formats: tuple[int, ...]
                    ) -> tuple[_Attempt, _Reply]:
        assert self.gate is not None and self.wire is not None
        attempt = _Attempt(view, was_run)
        self.gate.current = attempt
        try:
            if view.params is None:
                reply = await self.wire.simple(view.sql)
            else:
                reply = await self.wire.extended(view.sql, wire_params(view.params), formats,
                                                 suspended_after(view))
        finally:
            self.gate.current = None
        return attempt, reply

    def _result(self, base: StatementReplay, attempt: _Attempt, reply: _Reply,
                formats: str | None) -> StatementReplay:
        verdict = attempt.verdict
        if verdict is not None:
            decision = verdict.decision
            base.decision_now = decision.action if decision is not None else verdict.action
            base.rule_now = decision.rule_id if decision is not None else verdict.rule_id
        if attempt.not_run is not None:
            base.status = "not run"
            base.note = attempt.not_run
            return base
        if verdict is None:
            base.status = "not run"
            base.note = ("the replay gateway refused it before deciding: "
                         f"{(reply.error or {}).get('M')}")
            return base
        base.status = "ran"
        outcome = attempt.outcome
        if outcome is None and reply.error is not None:
            # The server refused it at Parse, before any Execute: the gateway records that
            # as the Execute's outcome, an error with no rows (the hash of nothing).
            outcome = {"sha256": EMPTY_SHA256, "rows": 0, "tag": None,
                       "sqlstate": reply.error.get("C"), "error": reply.error.get("M")}
        outcome = outcome or {}
        base.hash_now = outcome.get("sha256")
        base.tag_now = outcome.get("tag")
        base.sqlstate_now = outcome.get("sqlstate")
        base.error_now = outcome.get("error")
        base.rows_now = outcome.get("rows")
        base.sample_now = outcome.get("sample")
        base.masking_now = dict(attempt.masking)
        base.result_formats = formats
        if reply.copy_in:
            base.status = "not run"
            base.note = ("COPY FROM STDIN: the data the client sent is not in the trail, so "
                         "it cannot be replayed (the COPY was failed and rolled back)")
        elif verdict.action == "review" or (
                verdict.decision is not None and verdict.decision.action == "review"):
            base.note = (f"needs approval now as then; ran on the recorded approval "
                         f"#{_approval_ref(attempt.view)}")
        elif not base.ran_then or base.hash_then is None:
            base.note = "no recorded result to compare (the recording has no outcome)"
        return base


def suspended_after(view: StatementView) -> int:
    """The row limit the client's Execute had, when the recording shows one (else 0).

    A client fetching in chunks (asyncpg's fetchrow and cursors, JDBC's fetch size) gives
    Execute a row limit; the portal is then suspended with no command tag after that many
    rows, and the recorded hash covers just those. The limit itself is not recorded, but
    an extended-protocol statement that ended without error and without a tag stopped at
    exactly the rows it returned.
    """
    if view.params is None or not view.finished or view.sqlstate is not None \
            or view.command_tag is not None or not view.rows:
        return 0
    return int(view.rows)


def _approval_ref(view: StatementView) -> str:
    return str(view.approval_id) if view.approval_id is not None else "?"


def _may_retry(view: StatementView, attempt: _Attempt, outcome: dict[str, Any]) -> bool:
    """Whether trying other result formats could explain a hash difference, safely.

    Only for reads that returned rows (formats change nothing else), and only when there
    is a recorded hash: re-running a write could differ for other reasons (sequences are
    not rolled back by a savepoint).
    """
    if not view.result_sha256 or not outcome.get("rows") or outcome.get("sqlstate"):
        return False
    verdict = attempt.verdict
    if verdict is None or verdict.decision is None:
        return True
    return not any(st.changes_data or st.changes_schema or st.changes_server
                   for st in verdict.decision.analysis.statements)


async def replay_session(config: Config, session_id: str, sandbox_dsn: str,
                         policies: Path | str | None = None, *,
                         store: AuditStore | None = None,
                         statement_timeout: float = 300.0,
                         progress: Progress | None = None) -> ReplayReport:
    """Replay one recorded session into the sandbox and report drift per statement.

    ``policies``: the folder to judge by now (default: the config's ``policies:``).
    ``store``: an open audit store to read from (default: open the config's, read-only).
    ``statement_timeout``: seconds to wait for any one statement.
    ``progress``: see :data:`Progress` (the console shows "statement 3/12").
    Raises ReplayError (message says why) when the replay cannot be done; the sandbox is
    never a configured target, and its transaction is always rolled back.
    """
    sandbox = check_sandbox(config, sandbox_dsn)
    engine = _engine(policies if policies is not None else config.policies)
    own_store = store is None
    if store is None:
        store = await _open_store(config)
    try:
        session = await _find_session(store, session_id)
        statements = await store.session_statements(session.id)
    finally:
        if own_store:
            await store.close()
    report = ReplayReport(
        session_id=session.id, subject=session.subject, groups=tuple(session.groups),
        target=session.target, sandbox=sandbox.display,
        policies=str(engine.folder) if engine else None,
        policy_version=engine.version if engine else None, started_at=time.time())
    try:
        await _Replayer(config, session, statements, sandbox, engine,
                        statement_timeout).run(report, progress)
    except ReplayError:
        raise
    except (OSError, asyncpg.PostgresError) as exc:
        raise ReplayError(f"sandbox {sandbox.display}: {exc}") from None
    report.finished_at = time.time()
    return report


def replay_session_blocking(config: Config, session_id: str, sandbox_dsn: str,
                            policies: Path | str | None = None, *,
                            statement_timeout: float = 300.0,
                            progress: Progress | None = None,
                            cancelled: Callable[[], bool] | None = None) -> ReplayReport:
    """:func:`replay_session` on an event loop of its own, for a worker thread.

    The console calls this off its UI loop (``@work(thread=True)``); it opens its own
    read-only handle on the audit store and its own gateway, so nothing is shared with the
    console's loop. ``cancelled`` is polled a few times a second: once it says yes, the
    replay stops mid-statement (ReplayError), so an analyst who leaves or quits never
    waits for a slow sandbox.
    """
    async def run() -> ReplayReport:
        task = asyncio.ensure_future(replay_session(
            config, session_id, sandbox_dsn, policies, statement_timeout=statement_timeout,
            progress=progress))
        while cancelled is not None:
            done, _ = await asyncio.wait({task}, timeout=CANCEL_POLL)
            if done:
                break
            if cancelled():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                raise ReplayError("the replay was cancelled; the sandbox transaction was "
                                  "rolled back")
        return await task

    return asyncio.run(run())


async def _find_session(store: AuditStore, session_id: str) -> SessionView:
    session = await store.get_session(session_id)
    if session is not None:
        return session
    # A prefix, as the console and `audit sessions` show them.
    matches = [s for s in await store.list_sessions(limit=1_000_000)
               if s.id.startswith(session_id)] if len(session_id) >= 6 else []
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ReplayError(f"session id '{session_id}' is ambiguous ({len(matches)} sessions "
                          "start with it); give more of it")
    raise ReplayError(f"no session '{session_id}' in the audit trail (see `hoopops audit "
                      "sessions`)")


# ---------------------------------------------------------------------------------------
# policy diff: re-decide recorded statements under a candidate policy, running nothing


@dataclass(frozen=True)
class DecisionChange:
    statement_id: int
    session_id: str
    seq: int
    subject: str
    target: str
    received_at: float
    sql: str
    old_decision: str
    old_rule: str | None
    new_decision: str
    new_rule: str
    new_message: str

    def to_json(self) -> dict[str, Any]:
        return {"statement_id": self.statement_id, "session_id": self.session_id,
                "seq": self.seq, "identity": self.subject, "target": self.target,
                "received_at": iso(self.received_at), "sql": self.sql,
                "old": {"decision": self.old_decision, "rule": self.old_rule},
                "new": {"decision": self.new_decision, "rule": self.new_rule,
                        "message": self.new_message}}


@dataclass
class PolicyDiffReport:
    policies: str
    policy_version: str
    since: float | None
    until: float | None
    sessions: int = 0
    statements: int = 0
    changes: list[DecisionChange] = field(default_factory=list)
    rule_changes: list[DecisionChange] = field(default_factory=list)

    @property
    def exit_status(self) -> int:
        return 1 if self.changes else 0

    def to_json(self) -> dict[str, Any]:
        return {"schema": "hoopops.policy-diff/1", "policies": self.policies,
                "policy_version": self.policy_version,
                "since": iso(self.since) if self.since is not None else None,
                "until": iso(self.until) if self.until is not None else None,
                "sessions": self.sessions, "statements": self.statements,
                "changed": len(self.changes),
                "changes": [c.to_json() for c in self.changes],
                "rule_changes": [c.to_json() for c in self.rule_changes]}

    def render(self) -> str:
        window = ""
        if self.since is not None:
            window += f" since {iso(self.since)}"
        if self.until is not None:
            window += f" until {iso(self.until)}"
        lines = [f"policy diff: {self.policies} (version {self.policy_version[:12]}) against "
                 f"the recorded decisions of {self.statements} statement(s) in "
                 f"{self.sessions} session(s){window}"]
        if not self.changes:
            lines.append("no decision would change")
        else:
            lines.append(f"{len(self.changes)} decision(s) would change:")
            for c in self.changes:
                lines.append(f"  #{c.statement_id:<6} session {c.session_id[:12]}  "
                             f"{c.subject}  {c.old_decision} ({c.old_rule}) -> "
                             f"{c.new_decision} ({c.new_rule})")
                lines.append(f"          {_one_line(c.sql, 100)}")
        if self.rule_changes:
            lines.append(f"{len(self.rule_changes)} statement(s) keep their decision under "
                         "another rule:")
            for c in self.rule_changes:
                lines.append(f"  #{c.statement_id:<6} {c.old_decision}: {c.old_rule} -> "
                             f"{c.new_rule}  {_one_line(c.sql, 60)}")
        return "\n".join(lines)


def with_recorded_effects(analysis: Analysis, recorded: dict[str, Any]) -> Analysis:
    """``analysis`` strengthened by what the gateway's catalog lookups found at the time.

    The diff runs no database, so it cannot ask the catalog what a function or a view
    really does (writes, dangerous calls). The recorded facts hold what the gateway found
    then; adding them back judges the statement as the gateway saw it. Only ever adds
    (never removes) effects, so a candidate policy is judged on facts at least as strong.
    """
    recorded_statements = recorded.get("statements") if isinstance(recorded, dict) else None
    if not isinstance(recorded_statements, list) \
            or len(recorded_statements) != len(analysis.statements):
        return analysis
    out: list[StatementFacts] = []
    for facts, then in zip(analysis.statements, recorded_statements, strict=True):
        if not isinstance(then, dict):
            out.append(facts)
            continue
        kinds = set(then.get("kinds") or ())
        new = facts
        for effect in ("write", "admin"):
            if effect in kinds and effect not in new.kinds:
                new = add_effects(new, effect=effect)
        reasons = tuple(r for r in then.get("dangerous_reasons") or ()
                        if r not in new.dangerous_reasons)
        notes = tuple(n for n in then.get("notes") or () if n not in new.notes)
        if reasons or notes:
            new = add_effects(new, reasons=reasons, notes=notes)
        extra = frozenset(then.get("functions") or ()) - new.functions
        if extra:
            new = new.replace(functions=new.functions | extra,
                              functions_called=new.functions_called | extra)
        lexing = tuple(r for r in then.get("lexing_risk") or () if r not in new.lexing_risk)
        if lexing:
            new = new.replace(lexing_risk=new.lexing_risk + lexing)
        if then.get("unanalysable") and not new.unanalysable:
            new = new.replace(unanalysable=str(then["unanalysable"]))
        masking = then.get("masking")
        if isinstance(masking, dict) and new.masking is None:
            # What the statement did with masked columns needs the catalog too.
            new = new.replace(masking=MaskingFacts.from_dict(masking))
        out.append(new)
    return analysis.with_statements(out)


async def diff_policies(config: Config, policies: Path | str, *, since: float | None = None,
                        until: float | None = None, identity: str | None = None,
                        target: str | None = None,
                        store: AuditStore | None = None) -> PolicyDiffReport:
    """Every recorded decision (received in [since, until]) the candidate would change."""
    engine = _engine(policies)
    assert engine is not None
    own_store = store is None
    if store is None:
        store = await _open_store(config)
    report = PolicyDiffReport(str(engine.folder), engine.version, since, until)
    try:
        sessions = await store.list_sessions(since=since, until=until, identity=identity,
                                             target=target, limit=1_000_000)
        for session in sorted(sessions, key=lambda s: s.started_at):
            statements = await store.session_statements(session.id)
            counted = _diff_session(engine, session, statements, since, until, report)
            if counted:
                report.sessions += 1
    finally:
        if own_store:
            await store.close()
    return report


def _diff_session(engine: PolicyEngine, session: SessionView,
                  statements: list[StatementView], since: float | None, until: float | None,
                  report: PolicyDiffReport) -> int:
    who = _identity(session)
    # The session's prepared statements decide what an EXECUTE runs, so every statement
    # feeds the state in order, also those before the window. The defaults the gateway
    # verifies at startup are taken as verified: they are for nearly every server.
    state = SessionSqlState(lexing_defaults_verified=True)
    counted = 0
    for view in statements:
        analysis = state.resolve(analyze(view.sql))
        analysis = with_recorded_effects(analysis, view.facts)
        decision = engine.decide(who, session.target, analysis)
        if decision.action != "block" and view.params is None:
            state.observe(analysis)
        if (since is not None and view.received_at < since) or (
                until is not None and view.received_at > until):
            continue
        counted += 1
        report.statements += 1
        if decision.action == view.decision and decision.rule_id == view.rule_id:
            continue
        change = DecisionChange(
            statement_id=view.id, session_id=session.id, seq=view.seq,
            subject=session.subject, target=session.target, received_at=view.received_at,
            sql=view.sql, old_decision=view.decision, old_rule=view.rule_id,
            new_decision=decision.action, new_rule=decision.rule_id,
            new_message=decision.message)
        if decision.action != view.decision:
            report.changes.append(change)
        else:
            report.rule_changes.append(change)
    return counted


def diff_policies_blocking(config: Config, policies: Path | str, **kwargs: Any
                           ) -> PolicyDiffReport:
    """:func:`diff_policies` on an event loop of its own (CLI, worker threads)."""
    return asyncio.run(diff_policies(config, policies, **kwargs))


__all__ = [
    "DecisionChange",
    "PolicyDiffReport",
    "ReplayError",
    "ReplayReport",
    "StatementReplay",
    "check_sandbox",
    "diff_policies",
    "diff_policies_blocking",
    "format_candidates",
    "ran_then",
    "replay_session",
    "replay_session_blocking",
    "same_database",
    "wire_params",
    "with_recorded_effects",
]

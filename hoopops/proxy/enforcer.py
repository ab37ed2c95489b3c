"""The gate that enforces: policy decisions, held approvals, audit records, events.

Every statement is analysed (pglast, through ``hoopops.sql``), resolved against what the
session prepared, enriched from the catalog, and decided by the policy in force. Allowed
statements are durably recorded before they are forwarded; if the record cannot be
written the statement is refused (fail closed). Results are hashed exactly as sent and a
capped sample is kept for the audit trail.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from hoopops import events
from hoopops.approvals import ApprovalBroker, ApprovalError
from hoopops.audit.chain import json_text
from hoopops.audit.records import MaskingAction as AuditMaskingAction
from hoopops.audit.records import SessionRecord, StatementRecord, StatementResult
from hoopops.audit.store import AuditError, AuditStore, NullAuditStore
from hoopops.masking import (
    ColumnInfo,
    MaskingError,
    MaskingRules,
    apply_result_formats,
)
from hoopops.masking.inference import with_masking_facts
from hoopops.policy import PolicyEngine
from hoopops.proxy import protocol as p
from hoopops.proxy.gate import ALLOW, StatementGate, Verdict
from hoopops.proxy.lane import resume
from hoopops.sql import Analysis, analyze, default_analyzer
from hoopops.sql.session import SessionSqlState

if TYPE_CHECKING:
    from hoopops.config import Config
    from hoopops.proxy.catalog import Catalog
    from hoopops.proxy.session import Run, Session
    from hoopops.sql_catalog import SqlCatalog

log = logging.getLogger("hoopops.enforcer")

AUDIT_FAILED = ("hoopops could not record this statement in the audit trail, so it was "
                "not run (fail closed); retry, and tell the operator if it persists")


def _param_text(params: tuple[bytes | None, ...] | None) -> list[str | bytes | None] | None:
    """Parameter values for the trail and the approval binding: text-format values as text,
    binary-format ones as the exact bytes (the store keeps them as ``{"hex": ...}``)."""
    if params is None:
        return None
    binary = getattr(params, "binary", ())
    return [None if v is None else v if i in binary else v.decode("utf-8", "backslashreplace")
            for i, v in enumerate(params)]


@dataclass
class _Held:
    """A reviewed statement's ``statement.received`` record, written before its approval was
    requested; its outcome (refusal or result) completes that same record."""

    statement_id: int
    sql: str
    params: list[str | bytes | None] | None
    approval_id: int | None = None
    approved: bool = False


def _fingerprint(decision: Any) -> str:
    if decision is None:
        return ""
    return "+".join(st.fingerprint or st.text for st in decision.analysis.statements)


class Enforcer(StatementGate):
    def __init__(self, config: Config, bus: events.EventBus, engine: PolicyEngine | None,
                 store: AuditStore, broker: ApprovalBroker | None,
                 catalogs: dict[str, SqlCatalog] | None = None,
                 column_catalogs: dict[str, Catalog] | None = None) -> None:
        self.config = config
        self.bus = bus
        self.engine = engine
        self.store = store
        self.broker = broker
        self.catalogs = catalogs or {}
        self.audit_on = not isinstance(store, NullAuditStore)
        self.sample_limits = (config.audit.result_rows, config.audit.result_bytes)
        self._background: set[asyncio.Task[Any]] = set()
        # session id -> the reviewed statement it holds (or was approved and not yet run)
        self._held: dict[str, _Held] = {}
        self.column_catalogs = column_catalogs or {}
        self._hints_cache: dict[tuple[str, str | None, str], Any] = {}
        # Per session: ("p"|"c", name) -> the PREPARE / DECLARE hints (None: ambiguous).
        self._names: dict[str, dict[tuple[str, str], Any]] = {}
        # id(decision) -> (decision, its facts as canonical JSON): a prepared statement's
        # one decision serves every execution, and serialising its facts was the largest
        # part of writing its audit record. Holds the decisions, so the ids stay theirs.
        self._facts_text: dict[int, tuple[Any, str]] = {}
        self.masking = self._masking_rules()
        self.audits = self.audit_on
        # (subject, groups, target) -> {id(analyser source): (source, the ALLOW verdict,
        # the catalog epoch it was judged at)}; see decided(). Every table is for the
        # policy version ``_verdicts_for``; a session keeps a handle on its own table.
        self._verdicts: dict[tuple[Any, ...], dict[int, tuple[Any, Verdict, int | None]]] = {}
        self._verdicts_for: Any = None
        # A subclass that decides differently (the replay) must not be answered from here.
        self._own_decide = type(self).decide is Enforcer.decide
        # Nor one that adds to the audit hooks (record_forward, record_result).
        self._own_audit = type(self).before_forward is Enforcer.before_forward and \
            type(self).after_result is Enforcer.after_result
        # What the analyser would serve a text from without parsing (see decided()).
        self._source = default_analyzer().source

    @property
    def masking(self) -> MaskingRules:
        return self._masking

    @masking.setter
    def masking(self, rules: MaskingRules) -> None:
        self._masking = rules
        self.masks = rules.active
        self._hints_cache.clear()

    @property
    def observes_results(self) -> bool:
        return self.audit_on or self.bus.wants(events.STATEMENT_FINISHED)

    def _masking_rules(self) -> MaskingRules:
        if self.engine is None:
            return MaskingRules([], [])
        return MaskingRules.from_sections(self.engine.policies.masking_sections,
                                          self.config.masking.hmac_secret)

    # -- policy -----------------------------------------------------------------------------

    def new_session_state(self, server_parameters: dict[str, str]) -> SessionSqlState:
        # RESET ALL / DISCARD ALL return to the session defaults; they are only safe when
        # the server reported those defaults as the ones the gateway lexes with.
        return SessionSqlState(lexing_defaults_verified=_lexing_safe(server_parameters))

    def policies_changed(self) -> None:
        """The policy engine loaded a new version: rebuild the masking rules from it."""
        try:
            self.masking = self._masking_rules()
        except Exception as exc:  # a bad masking section keeps the rules in force
            log.error("masking rules in the new policy are invalid; the previous rules stay "
                      "in force: %s", exc)
        self._verdicts.clear()
        for catalog in self.catalogs.values():
            catalog.invalidate()
        for column_catalog in self.column_catalogs.values():
            column_catalog.invalidate()

    def decided(self, session: Session, sql: str, statement_name: str | None
                ) -> Verdict | None:
        """The verdict when it is known without waiting or analysing (no policy, or an
        ALLOW in the verdict cache), else None: the relay then awaits :meth:`decide`.
        A plain function: the relay's hot path creates no coroutine for a cache hit, and
        it runs for every statement, so it is written for as few steps as it can take.
        """
        # (policies, identity, table, catalog): set by _remember_verdict for this session,
        # which only the policy's own decide() reaches.
        mine = session.sql_state.verdicts
        if mine is None:
            return ALLOW if self.engine is None and self._own_decide else None
        # Besides: the conditions of ``quiet`` in decide().
        if statement_name or not self._own_decide or mine[0] is not self.engine.policies \
                or mine[1] is not session.info.identity or self.audits or \
                self._masking.active or self.bus.wants(events.STATEMENT_DECIDED):
            return None
        source = self._source(sql)
        if source is None:
            return None
        hit = mine[2].get(id(source))
        if hit is None or hit[0] is not source:
            return None
        catalog = mine[3]
        # catalog.current(), inline.
        if catalog is not None and (hit[2] != catalog.epoch or
                                    time.monotonic() > catalog.fresh_until):
            return None
        return hit[1]

    async def decide(self, session: Session, sql: str, statement_name: str | None) -> Verdict:
        engine = self.engine
        if engine is None:
            return ALLOW
        # Nothing records the facts (``audits``: a replay reads them too), masks, or hears
        # of the decision, and no name is prepared: an ALLOW judged on the same facts can
        # be handed back as it is.
        quiet = not statement_name and not self.audits and not self._masking.active and \
            not self.bus.wants(events.STATEMENT_DECIDED)
        if quiet:
            verdict = self.decided(session, sql, statement_name)
            if verdict is not None:
                return verdict
        state: SessionSqlState = session.sql_state
        raw = analyze(sql)
        analysis = resolved = state.resolve(raw)
        catalog = self.catalogs.get(session.target.name)
        epoch = None
        if catalog is not None:
            # Taken before the catalog is asked: an invalidation while it answers makes
            # what is remembered below stale at once.
            epoch = catalog.epoch
            analysis = await catalog.enrich(analysis)
        identity = session.info.identity
        hints = None
        # Text refused before any rule (too long, too deep, lexing risk) is not analysed
        # again for masking: the analyser refused it to stay safe.
        if self.masking.active and analysis.unanalysable is None and not any(
                st.unanalysable is not None or st.lexing_risk for st in analysis.statements):
            try:
                hints = await self._masking_hints(session, sql)
            except Exception:
                # The catalog failed: a statement the policy refuses anyway is refused
                # as before; any other fails closed, as it did without these facts.
                if engine.decide(identity, session.target.name, analysis).action != "block":
                    raise
            else:
                # What masking cannot fix (inference, copies, placeholders written back,
                # code it cannot see) is the policy's to decide: these facts join the
                # others. A statement without sensitive columns is left as it is.
                analysis = with_masking_facts(analysis, self._peek_named(session, hints),
                                              self.masking, identity,
                                              engine.policies.uses("sensitive_read"))
        decision = engine.decide(identity, session.target.name, analysis)
        action = decision.action
        masking_refusal = None
        if hints is not None and action != "block":
            # Values passed to pg_notify()/set_config()/... cannot be masked: refuse.
            masking_refusal = self.masking.refusal(identity, hints)
            if masking_refusal is not None:
                action = "block"
            else:
                hints = self._named_hints(session, hints)
        elif action == "block":
            hints = None
        approval_id = None
        if action == "review" and self.broker is not None:
            approval_id = self.broker.session_approval(session.id, _fingerprint(decision),
                                                       decision.rule_id)
            if approval_id is not None:
                action = "allow"
        if action != "block":
            if statement_name is None:
                state.observe(analysis)
            else:
                state.on_parse(statement_name, analysis)
                state.observe(analysis)  # a PREPARE / DEALLOCATE sent with Parse
            if catalog is not None and analysis.changes_schema:
                catalog.invalidate()
        if self.bus.wants(events.STATEMENT_DECIDED):
            self.bus.publish(events.STATEMENT_DECIDED, session_id=session.id,
                             subject=session.info.identity.subject, sql=sql, action=action,
                             rule=decision.rule_id if masking_refusal is None
                             else "masking:side-channel", elapsed_us=decision.elapsed_us)
        if masking_refusal is not None:
            return Verdict("block", "42501", masking_refusal, None, "masking:side-channel")
        if action == "allow":
            # Positional (tests/test_policy_engine.py guards the order): from keywords this
            # frozen dataclass costs twice as much, and every allowed statement builds one.
            verdict = Verdict("allow", "42501", "", None, decision.rule_id, decision,
                              approval_id, hints)
            # Decided on the text's own facts as the catalog saw them (what the catalog
            # adds depends only on the names, the same for every text of the source, and
            # stays while its epoch does; see decided()), with nothing else added.
            if quiet and approval_id is None and decision.action == "allow" and \
                    resolved is raw and decision.analysis is analysis:
                self._remember_verdict(session, sql, raw, verdict, epoch)
            return verdict
        hint = None
        if action == "block":
            hint = f"policy version {decision.policy_version or '?'}; ask an analyst if this " \
                   "statement is needed"
        return Verdict(action, "42501", decision.message, hint, decision.rule_id, decision,
                       masking_hints=hints)

    # -- the verdict cache ------------------------------------------------------------------
    #
    # A plain SELECT / DML statement the analyser serves from its caches (the same text, or
    # a new literal whose skeleton it linked to a shape) has the facts of that source; the
    # policy's decision follows from those facts, the identity, the target and the policy
    # version (the engine's own shape cache rests on the same), and the session state does
    # not change them (no EXECUTE, PREPARE, DEALLOCATE or reset). What remains is the
    # catalog, which can change its judgement of a name (a function turned VOLATILE).
    # What enrich() adds to facts follows from the names they reach alone (its effects are
    # cached by those names, the same for every text of one source), so a verdict decided
    # on enriched facts holds for the whole source while the catalog keeps what it
    # judged: it is served (by decided()) only while the catalog's epoch is the one taken
    # before that enrich() (any invalidation, dropped judgement or expiry moves it), and a
    # hit asks nothing of the catalog.

    def _remember_verdict(self, session: Session, sql: str, analysis: Analysis,
                          verdict: Verdict, epoch: int | None) -> None:
        engine = self.engine
        statements = analysis.statements
        if engine is None or len(statements) != 1:
            return
        facts = statements[0]
        shape = facts._shape
        if shape is None or analysis.needs_session or analysis.changes_schema or \
                facts.prepares is not None or facts.deallocates is not None:
            return
        source = self._source(sql)
        # The source must be what this analysis came from: the text's own cached analysis,
        # or the shape facts its skeleton is linked to (normalisation agreed on the link).
        if source is None or (source is not analysis and (
                isinstance(source, Analysis) or source._shape is not shape)):
            return
        policies = engine.policies
        if _decision_version(verdict) != policies.version:
            return
        tables = self._verdicts
        if policies is not self._verdicts_for or len(tables) >= 1024:
            # Sessions holding a handle on a dropped table see it is for another version
            # (or still hold this version's verdicts for their own identity and target).
            tables.clear()
            self._verdicts_for = policies
        identity = session.info.identity
        target = session.target.name
        who = (identity.subject, identity.groups, target) if identity is not None \
            else (None, None, target)
        table = tables.get(who)
        if table is None or len(table) >= 4096:
            table = tables[who] = {}
        table[id(source)] = (source, verdict, epoch)
        catalog = self.catalogs.get(target)
        if (catalog is None) != (epoch is None):
            return  # (the catalogs are fixed at start; never serve without the check)
        session.sql_state.verdicts = (policies, identity, table, catalog)

    def outdated(self, session: Session, verdict: Verdict) -> bool:
        decision = verdict.decision
        return (self.engine is not None and decision is not None
                and decision.policy_version != self.engine.policies.version)

    def session_allows(self, session: Session, verdict: Verdict) -> bool:
        if self.broker is None:
            return False
        decision = verdict.decision
        return self.broker.session_allows(session.id, _fingerprint(decision),
                                          decision.rule_id if decision is not None else None)

    # -- approvals --------------------------------------------------------------------------

    async def request_approval(self, session: Session, verdict: Verdict, sql: str,
                               params: tuple[bytes | None, ...] | None) -> Verdict:
        if self.broker is None:
            return await super().request_approval(session, verdict, sql, params)
        identity = session.info.identity
        decision = verdict.decision
        text_params = _param_text(params)
        statement_id = None
        if self.audit_on:
            # The statement is recorded first (decision "review") and the approval names it,
            # so the trail holds one statement record per held statement whatever happens
            # next: its result, its refusal, or the client going away.
            await self._finish_held(session, "the client sent another statement first")
            # A simple Query was counted on arrival; an extended one is counted at Execute.
            seq = session.info.stats.statements + (0 if params is None else 1)
            try:
                statement_id = await self.store.statement_received(self._record(
                    session, sql, params, verdict, time.time(), "review", seq=seq))
            except AuditError as exc:
                log.error("audit write failed, statement refused: %s", exc)
                return Verdict("block", "58030", AUDIT_FAILED)
            self._held[session.id] = _Held(statement_id, sql, text_params)
        try:
            pending = await self.broker.create(
                session.id, identity, sql, text_params, _fingerprint(decision),
                verdict.rule_id, decision.rule_description if decision else None,
                statement_id=statement_id,
                facts=decision.to_dict() if decision is not None else None)
        except (AuditError, ApprovalError) as exc:
            log.error("cannot create approval: %s", exc)
            return Verdict("block", "58030", f"{AUDIT_FAILED} ({exc})")
        held = self._held.get(session.id)
        if held is not None and held.statement_id == statement_id:
            held.approval_id = pending.id
        session.notify_client(f"hoopops: {pending.notice}")
        outcome = await pending.wait()
        if outcome.approved and outcome.authorises(session.id, identity, sql, text_params):
            if held is not None and held.statement_id == statement_id:
                held.approved = True
            return Verdict("allow", rule_id=verdict.rule_id, decision=decision,
                           approval_id=outcome.approval_id, masking_hints=verdict.masking_hints)
        return Verdict("block", outcome.sqlstate or "42501", f"hoopops: {outcome.message}",
                       rule_id=verdict.rule_id, decision=decision,
                       approval_id=outcome.approval_id)

    def withdrawn_verdict(self, session: Session) -> Verdict:
        held = self._held.get(session.id)
        return Verdict("block", "57014", "canceling statement due to user request; the "
                       "pending approval was withdrawn",
                       approval_id=held.approval_id if held is not None else None)

    def _take_held(self, session: Session, sql: str,
                   params: tuple[bytes | None, ...] | None) -> _Held | None:
        """The held record of exactly this statement (text and values), if any."""
        held = self._held.get(session.id)
        if held is None or held.sql != sql or held.params != _param_text(params):
            return None
        del self._held[session.id]
        return held

    async def _finish_held(self, session: Session, reason: str) -> None:
        """Complete a held record that will never run: the client went away while it waited,
        or never executed what was approved."""
        held = self._held.pop(session.id, None)
        if held is None:
            return
        if held.approved:
            sqlstate, why = None, f"approved but never executed ({reason})"
        else:
            sqlstate, why = "57014", f"not run: the pending approval was withdrawn ({reason})"
        try:
            await self.store.statement_finished(held.statement_id, StatementResult(
                started_at=None, finished_at=time.time(), rows=None, command_tag=None,
                sqlstate=sqlstate, error_message=why), wait=False)
        except AuditError as exc:
            log.error("could not record a held statement's end: %s", exc)

    # -- audit ------------------------------------------------------------------------------

    def _record(self, session: Session, sql: str, params: tuple[bytes | None, ...] | None,
                verdict: Verdict, received_at: float, action: str, *,
                seq: int | None = None, approval_id: int | None = None) -> StatementRecord:
        decision = verdict.decision
        facts = self._facts(decision) if decision is not None else {}
        return StatementRecord(
            session_id=session.id,
            seq=session.info.stats.statements if seq is None else seq,
            received_at=received_at, sql=sql, params=_param_text(params), facts=facts,
            decision=action, rule_id=verdict.rule_id,
            approval_id=verdict.approval_id if approval_id is None else approval_id)

    def _facts(self, decision: Any) -> str:
        cached = self._facts_text.get(id(decision))
        if cached is not None and cached[0] is decision:
            return cached[1]
        text = json_text(decision.to_dict())
        if len(self._facts_text) >= 256:
            self._facts_text.clear()
        self._facts_text[id(decision)] = (decision, text)
        return text

    async def record_refusal(self, session: Session, sql: str,
                             params: tuple[bytes | None, ...] | None, verdict: Verdict,
                             received_at: float) -> None:
        if not self.audit_on:
            return
        # (no policy decision: the verdict's own action — a refusal, or a statement the
        # server itself failed, which the policy had allowed)
        action = verdict.decision.action if verdict.decision is not None else verdict.action
        try:
            held = self._take_held(session, sql, params)
            if held is not None:
                statement_id = held.statement_id  # recorded when it was held
            else:
                statement_id = await self.store.statement_received(
                    self._record(session, sql, params, verdict, received_at, action))
            await self.store.statement_finished(statement_id, StatementResult(
                started_at=None, finished_at=time.time(), rows=None, command_tag=None,
                sqlstate=verdict.sqlstate, error_message=verdict.message), wait=False)
        except AuditError as exc:
            log.error("could not record a refused statement: %s", exc)

    def record_forward(self, session: Session, run: Run) -> Any:
        """:meth:`before_forward` as a plain call for the relay's fast paths: None
        (recorded), a Verdict (refused), or an awaitable of one of those when the record
        has to wait (under ``synchronous=FULL``, for the journal's fdatasync)."""
        if self._own_audit:
            return self._record_forward(session, run)
        return self.before_forward(session, run)  # (a subclass adds to it: the replay)

    async def before_forward(self, session: Session, run: Run, *, flushed: bool = True
                             ) -> Verdict | None:
        outcome = self._record_forward(session, run, flushed)
        if outcome is None or isinstance(outcome, Verdict):
            return outcome
        return await outcome  # type: ignore[no-any-return]

    async def records_flushed(self, session: Session) -> None:
        if self.audit_on:
            await self.store.records_flushed()

    def _record_forward(self, session: Session, run: Run, flushed: bool = True) -> Any:
        if not self.audit_on:
            return None
        verdict = run.decision if isinstance(run.decision, Verdict) else ALLOW
        action = verdict.decision.action if verdict.decision is not None else "allow"
        held = self._take_held(session, run.sql, run.params) \
            if verdict.approval_id is not None else None
        approval_id = None
        if verdict.action == "review" and self.broker is not None:
            # Let through by a session-scope approval granted after it was parsed.
            decision = verdict.decision
            approval_id = self.broker.session_approval(
                session.id, _fingerprint(decision),
                decision.rule_id if decision is not None else None)
        if held is not None:
            run.audit_id = held.statement_id  # recorded, durably, before it was held
        else:
            # The store's coroutine is driven by hand: under synchronous=NORMAL it ends
            # without suspending (one journal write), and no task or event-loop round
            # trip is spent on it; when it does suspend, the caller awaits the rest.
            received = self.store.statement_received(self._record(
                session, run.sql, run.params, verdict, run.received_at, action,
                approval_id=approval_id), flushed=flushed)
            try:
                yielded = received.send(None)
            except StopIteration as done:
                run.audit_id = done.value
            except AuditError as exc:
                log.error("audit write failed, statement refused: %s", exc)
                return Verdict("block", "58030", AUDIT_FAILED)
            else:
                return self._received_later(run, resume(received, yielded))
        run.hasher = hashlib.sha256()
        run.sample = []
        return None

    async def _received_later(self, run: Run, rest: Any) -> Verdict | None:
        try:
            run.audit_id = await rest
        except AuditError as exc:
            log.error("audit write failed, statement refused: %s", exc)
            return Verdict("block", "58030", AUDIT_FAILED)
        run.hasher = hashlib.sha256()
        run.sample = []
        return None

    # -- masking ----------------------------------------------------------------------------

    async def _masking_hints(self, session: Session, sql: str) -> Any:
        """Where each output column comes from, cached by text (or by shape, since
        literals never change where a column comes from) until the catalog changes."""
        search_path = session.upstream.parameters.get("search_path")
        user = session.target.upstream.user
        shape = default_analyzer().shape_key(sql)
        if shape is not None and _POSITIONS_NORMALISED.search(shape):
            # The shape turned the positions of DISTINCT ON / ROLLUP / CUBE / GROUPING SETS
            # into parameters: DISTINCT ON (1) and (2) would share what is predicated on.
            shape = None
        key = (session.target.name, search_path, shape or sql)
        hints = self._hints_cache.get(key)
        if hints is None:
            hints = await self.masking.analyze(
                sql, self.column_catalogs.get(session.target.name), search_path, user)
            if any(getattr(h, "error", None) for h in hints):
                return hints  # not cached: a failed analysis may be transient (catalog)
            if len(self._hints_cache) >= 4096:
                self._hints_cache.clear()
            self._hints_cache[key] = hints
        return hints

    def _peek_named(self, session: Session, hints: list[Any]) -> list[Any]:
        """``hints`` with EXECUTE / FETCH given what the session's PREPARE / DECLARE said,
        remembering nothing (the statement is not decided yet): for its masking facts."""
        names = self._names.get(session.id)
        if not names:
            return hints
        out = []
        for item in hints:
            key = ("p", item.execute) if item.execute is not None else (
                ("c", item.fetch_cursor) if item.fetch_cursor is not None else None)
            known = names.get(key) if key is not None and item.outputs is None and \
                not _shadowed(session, key) else None
            out.append(item if known is None else known)
        return out

    def _named_hints(self, session: Session, hints: list[Any]) -> list[Any]:
        """``hints`` with EXECUTE / FETCH given what the session's PREPARE / DECLARE
        said their rows are, and those names remembered (masking contract, step 1).

        A name defined twice is forgotten for good (until CLOSE / DEALLOCATE): the second
        definition may have failed on the server, and masking by the wrong statement's
        sources could leak; an unknown name leaves its result untraceable (masked)."""
        names = self._names.setdefault(session.id, {})
        out = []
        for item in hints:
            if item.deallocates is not None:
                _forget(names, "p", item.deallocates)
            if item.closes is not None:
                _forget(names, "c", item.closes)
            key = ("p", item.execute) if item.execute is not None else (
                ("c", item.fetch_cursor) if item.fetch_cursor is not None else None)
            known = names.get(key) if key is not None and item.outputs is None and \
                not _shadowed(session, key) else None
            if known is not None:
                item = replace(known, kind=item.kind, prepare=None, cursor=None,
                               execute=item.execute, fetch_cursor=item.fetch_cursor)
            for key, name in (("p", item.prepare), ("c", item.cursor)):
                if name is not None:
                    names[(key, name)] = None if (key, name) in names else item
            # SQL names prepared statements and cursors in the protocol's namespaces: a
            # statement or portal the gateway saw under the same name is no longer the
            # one the server holds, so binding or executing it is refused from now on.
            for name in (item.prepare, item.deallocates):
                if name is not None:
                    _drop_names(session.statements, name)
            for name in (item.cursor, item.closes):
                if name is not None:
                    _drop_names(session.portals, name)
            out.append(item)
        return out

    def _error_masking(self, session: Session) -> dict[str, Any]:
        """How to mask an error or notice of the statement the server is answering: its
        texts are withheld when it runs code masking cannot see through, and the names
        it spelled itself may be quoted back."""
        from hoopops.proxy.session import K_BIND, K_CLOSE, K_DESCRIBE, K_PARSE

        head = session.pending[0] if session.pending else None
        if head is None:
            return {}
        if head.run is not None:
            hints = self._hints(head.run)
        elif head.kind == K_PARSE and head.name in session.statements:
            # An error at Parse (an unknown relation, say): the statement being parsed.
            verdict = session.statements[head.name].decision
            found = getattr(verdict, "masking_hints", None)
            hints = found[0] if found else None
        elif head.kind in (K_BIND, K_DESCRIBE, K_CLOSE):
            # About the request (the parameters the client sent, a name), not about rows.
            return {"numbers": False}
        else:
            return {}
        # Bare numbers go only where a statement reads sensitive data (or cannot be
        # traced): elsewhere the limits and sizes errors print stay readable.
        return {"withhold": self.masking.untraceable(hints),
                "keep": getattr(hints, "identifiers", ()),
                "numbers": self.masking.touches_sensitive(hints)}

    def _hints(self, run: Run) -> Any:
        verdict = run.decision
        hints = getattr(verdict, "masking_hints", None)
        if not hints:
            return None
        index = run.statement_index
        return hints[index] if index < len(hints) else None

    async def on_row_description(self, session: Session, run: Run) -> None:
        if not self.masking.active or run.fields is None:
            return
        columns = [ColumnInfo(f.name, f.table_oid, f.attnum, f.type_oid, f.format_code,
                              f.type_size, f.type_mod) for f in run.fields]
        if run.result_formats:
            columns = apply_result_formats(columns, run.result_formats)
        catalog = self.column_catalogs.get(session.target.name)
        try:
            if catalog is not None:
                columns = await catalog.resolve(columns, self.masking.trusted_functions)
            run.plan = self.masking.plan(session.info.identity, columns, self._hints(run))
        except Exception as exc:
            # Cannot tell how to mask: every value of this result is withheld (fail closed).
            log.warning("masking plan failed, withholding the result's values: %s", exc)
            run.plan = _WithholdAll(len(columns), str(exc))

    async def on_copy_out(self, session: Session, run: Run, payload: bytes) -> None:
        if not self.masking.active:
            return
        try:
            run.plan = self.masking.plan_copy(session.info.identity, payload, self._hints(run))
        except Exception as exc:
            log.warning("COPY masking plan failed, withholding the data: %s", exc)
            run.plan = _WithholdAll(0, str(exc))

    async def rewrite_row(self, session: Session, run: Run, message: bytes) -> bytes:
        plan = run.plan
        if plan is not None:
            try:
                message = p.frame(p.DATA_ROW, plan.rewrite_data_row(message[5:]))
            except MaskingError as exc:
                run.plan = _WithholdAll(0, str(exc))
                message = run.plan.rewrite_message(message)
        if run.hasher is not None:
            run.hasher.update(message)
        if run.sample_fits(len(message), self.sample_limits):
            # Rows an exempt (break-glass) identity saw raw are kept masked.
            sample_row = getattr(run.plan, "sample_row", None)
            run.keep_sample(message[5:] if sample_row is None else sample_row(message[5:]),
                            len(message))
        return message

    def rewrite_rows(self, session: Session, run: Run, data: bytes, start: int
                     ) -> tuple[bytes, int]:
        """The batch form of :meth:`rewrite_row` for a run with a masking plan: every
        complete DataRow in ``data`` (the relay's read buffer) from ``start``, where one
        begins → ``(messages to send, where they ended)``, in one call instead of several
        coroutines per row."""
        plan = run.plan
        before = plan.rows
        out, end = _rewrite_batch(run, "rewrite_rows_at", data, start, "DataRow")
        if run.plan is not plan:
            plan, before = run.plan, 0
        run.rows += plan.rows - before
        if run.hasher is not None:
            run.hasher.update(out)
        if run.sample is not None:
            # Rows an exempt (break-glass) identity saw raw are kept masked.
            sample_row = getattr(plan, "sample_row", None)
            limits = self.sample_limits
            pos = 0
            size = len(out)
            while pos < size and len(run.sample) < limits[0]:
                nxt = pos + 1 + int.from_bytes(out[pos + 1:pos + 5], "big")
                if run.sample_fits(nxt - pos, limits):
                    row = out[pos + 5:nxt]
                    run.keep_sample(row if sample_row is None else sample_row(row), nxt - pos)
                pos = nxt
        return out, end

    def rewrite_copy_rows(self, session: Session, run: Run, data: bytes, start: int
                          ) -> tuple[bytes, int]:
        """The batch form of :meth:`rewrite_copy` for a run with a masking plan: every
        complete CopyData in ``data`` from ``start`` → ``(messages to send, where they
        ended)``."""
        out, end = _rewrite_batch(run, "rewrite_copy_at", data, start, "CopyData")
        if run.hasher is not None:
            run.hasher.update(out)
        return out, end

    async def rewrite_copy(self, session: Session, run: Run, message: bytes) -> bytes:
        plan = run.plan
        if plan is not None:
            try:
                message = p.frame(p.COPY_DATA, plan.rewrite_copy_data(message[5:]))
            except MaskingError as exc:
                run.plan = _WithholdAll(0, str(exc))
                message = p.frame(p.COPY_DATA, b"")
        if run.hasher is not None:
            run.hasher.update(message)
        return message

    async def on_error(self, session: Session, fields: dict[str, str], payload: bytes
                       ) -> bytes | None:
        if not self.masking.active:
            return None
        new, actions = self.masking.rewrite_error(payload, session.info.identity, strict=True,
                                                  **self._error_masking(session))
        self._report_masking(session, None, actions)
        return None if new is payload else p.frame(p.ERROR_RESPONSE, new)

    async def on_async_message(self, session: Session, mtype: int, payload: bytes
                               ) -> bytes | None:
        identity = session.info.identity
        if mtype == p.PARAMETER_STATUS:
            name, value = p.decode_parameter_status(payload)
            # Keep the server's view current: masking resolves names by search_path.
            session.upstream.parameters[name] = value
            if not _lexing_safe({name: value}):
                # Something the analysis could not see changed how the server reads text.
                session.kill(f"closed: the server reported {name}={value}, which would make "
                             "the gateway and the server read statements differently")
        if not self.masking.active:
            return None
        if mtype == p.NOTICE_RESPONSE:
            new, actions = self.masking.rewrite_error(payload, identity, strict=True,
                                                      **self._error_masking(session))
        elif mtype == p.NOTIFICATION_RESPONSE:
            new, actions = self.masking.rewrite_notification(payload, identity)
        else:
            new, actions = self.masking.rewrite_parameter_status(payload, identity)
        self._report_masking(session, None, actions)
        return None if new is payload else p.frame(mtype, new)

    async def on_statement_complete(self, session: Session, run: Run) -> None:
        catalog = self.column_catalogs.get(session.target.name)
        if catalog is not None and run.tag and catalog.note_command(run.tag):
            self._hints_cache.clear()
        plan = run.plan
        if plan is not None:
            finish = getattr(plan, "finish_copy", None)
            if finish is not None:
                finish()
            self._report_masking(session, run, plan.take_actions())

    def _report_masking(self, session: Session, run: Run | None, actions: list[Any]) -> None:
        if not actions:
            return
        if self.bus.has_listeners:
            self.bus.publish(events.MASKING_APPLIED, session_id=session.id,
                             subject=session.info.identity.subject,
                             actions=[{"column": a.column, "strategy": a.strategy,
                                       "count": a.count} for a in actions])
        if self.audit_on and run is not None and run.audit_id is not None:
            records = [AuditMaskingAction(a.column, a.strategy, a.count) for a in actions]
            self._spawn(self.store.masking_actions(run.audit_id, session.id, records,
                                                   wait=False))

    # -- results -----------------------------------------------------------------------------

    def record_result(self, session: Session, run: Run) -> Any:
        """:meth:`after_result` as a plain call for the relay's fast paths: None when
        done, else an awaitable that finishes it."""
        if self._own_audit:
            return self._record_result(session, run)
        return self.after_result(session, run)  # (a subclass adds to it: the replay)

    async def after_result(self, session: Session, run: Run) -> None:
        later = self._record_result(session, run)
        if later is not None:
            await later

    def _record_result(self, session: Session, run: Run) -> Any:
        if self.bus.wants(events.STATEMENT_FINISHED):
            self.bus.publish(events.STATEMENT_FINISHED, session_id=session.id,
                             rows=run.rows, tag=run.tag, sqlstate=run.sqlstate,
                             duration_ms=(time.time() - run.started_at) * 1000)
        if not self.audit_on or run.audit_id is None:
            return None
        result = StatementResult(
            started_at=run.started_at, finished_at=time.time(), rows=run.rows,
            command_tag=run.tag, sqlstate=run.sqlstate, error_message=run.error,
            result_sha256=run.hasher.hexdigest() if run.hasher is not None else None,
            result_sample=_sample(run))
        # Not on the durability path (the statement was recorded before it ran): queued,
        # and committed in order before the session's next statement is forwarded. Driven
        # by hand, as in _record_forward: with wait=False it does not suspend.
        finished = self.store.statement_finished(run.audit_id, result, wait=False)
        try:
            yielded = finished.send(None)
        except StopIteration:
            return None
        except AuditError as exc:
            log.error("could not record a statement's result: %s", exc)
            return None
        return self._finished_later(resume(finished, yielded))

    async def _finished_later(self, rest: Any) -> None:
        try:
            await rest
        except AuditError as exc:
            log.error("could not record a statement's result: %s", exc)

    def _spawn(self, coro: Any) -> None:
        # Masking-action records are not on the durability path (the statement was
        # recorded before it ran), so the relay does not wait for them.
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("audit write failed: %s", task.exception())

    async def drain(self) -> None:
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    # -- session lifecycle -------------------------------------------------------------------

    async def session_opened(self, session: Session) -> None:
        if not self.audit_on:
            return
        info = session.info
        identity = info.identity
        try:
            await self.store.session_started(SessionRecord(
                id=info.id, subject=identity.subject, groups=tuple(identity.groups),
                issuer=identity.issuer, token_id=identity.token_id,
                claimed_user=info.claimed_user, client_addr=info.client_addr,
                client_port=info.client_port, application_name=info.application_name,
                target=info.target, tls=info.tls, started_at=info.started_at))
        except AuditError as exc:
            log.error("cannot record session start: %s", exc)
            session.kill("closed: the audit trail is unavailable (fail closed)")

    async def session_closed(self, session: Session) -> None:
        self._names.pop(session.id, None)
        if self.broker is not None:
            with contextlib.suppress(Exception):
                await self.broker.session_closed(session.id, session.end_reason)
        if not self.audit_on:
            return
        await self._finish_held(session, session.end_reason)
        stats = session.info.stats
        await self.drain()
        try:
            await self.store.session_ended(session.id, session.end_reason, time.time(),
                                           stats.bytes_in, stats.bytes_out, stats.statements)
        except AuditError as exc:
            log.error("cannot record session end: %s", exc)


def _rewrite_batch(run: Run, method: str, data: bytes, start: int, what: str
                   ) -> tuple[bytes, int]:
    """``run.plan.<method>(data, start)``, failing closed: when the plan cannot mask the
    batch, it and every later message of the result are withheld (``run.plan`` becomes
    the plan that withholds everything)."""
    try:
        out, end = getattr(run.plan, method)(data, start)
        if end == start:
            raise MaskingError(f"malformed {what}")
    except MaskingError as exc:
        run.plan = _WithholdAll(0, str(exc))
        out, end = getattr(run.plan, method)(data, start)
    return out, end  # type: ignore[no-any-return]


def _decision_version(verdict: Verdict) -> str | None:
    decision = verdict.decision
    return decision.policy_version if decision is not None else None


# Clauses whose integer constants are output positions, which shape keys normalise away.
_POSITIONS_NORMALISED = re.compile(r"(?i)\b(?:DISTINCT\s+ON|ROLLUP|CUBE|GROUPING\s+SETS)\b")


def _shadowed(session: Session, key: tuple[str, str]) -> bool:
    """Whether a Parse or Bind on the protocol has used the name PREPARE / DECLARE gave (the
    namespaces are shared): the server's statement or portal is then that one, and what
    PREPARE said (or a PREPARE that failed on the server) says nothing about it."""
    return key[1] in (session.statements if key[0] == "p" else session.portals)


def _drop_names(known: dict[str, Any], name: str) -> None:
    if name == "*":
        known.clear()
    else:
        known.pop(name, None)


def _forget(names: dict[tuple[str, str], Any], kind: str, name: str) -> None:
    for key in [k for k in names if k[0] == kind and name in ("*", k[1])]:
        del names[key]


def _sample(run: Run) -> dict[str, Any] | None:
    if run.sample is None:
        return None
    columns, kinds = _sample_shape(run.fields, run.result_formats)
    rows = []
    count = len(kinds)
    for payload in run.sample:
        row: list[str | None] = []
        for index, value in enumerate(p.decode_data_row(payload)):
            if value is None:
                row.append(None)
            elif index < count and kinds[index] is not None:
                row.append(_binary_text(kinds[index], value))  # type: ignore[arg-type]
            else:
                row.append(value.decode("utf-8", "replace"))
        rows.append(row)
    return {"columns": list(columns), "rows": rows, "truncated": run.rows > len(rows)}


# (id(fields), result formats) -> (fields, column names, per column: the type OID when
# its values are binary, else None). Every statement's result sample needs this, and a
# statement's fields are one cached list (session._row_description), kept here so its id
# stays its own.
_SAMPLE_SHAPES: dict[tuple[int, tuple[int, ...]],
                     tuple[Any, list[str], tuple[int | None, ...]]] = {}
_SAMPLE_SHAPE_MAX_COLUMNS = 100


def _sample_shape(fields: list[Any] | None, formats: tuple[int, ...]
                  ) -> tuple[list[str], tuple[int | None, ...]]:
    key = (id(fields), formats)
    known = _SAMPLE_SHAPES.get(key)
    if known is not None and known[0] is fields:
        return known[1], known[2]
    listed = fields or []
    columns = [f.name for f in listed]
    # A statement's RowDescription always says text; the formats that apply are the ones
    # the client asked for in Bind (none: text; one: all columns; else one per column).
    if not formats:
        binary = [f.format_code == 1 for f in listed]
    elif len(formats) == 1:
        binary = [formats[0] == 1] * len(listed)
    else:
        binary = [f == 1 for f in formats]
    kinds = tuple((listed[i].type_oid if i < len(listed) else 0) if is_binary else None
                  for i, is_binary in enumerate(binary))
    if len(listed) <= _SAMPLE_SHAPE_MAX_COLUMNS:
        # (shared by every session: one agent's ever new 1,600-column results must not
        # fill it with lists of that size)
        if len(_SAMPLE_SHAPES) >= 1024:
            _SAMPLE_SHAPES.clear()
        _SAMPLE_SHAPES[key] = (fields, columns, kinds)
    return columns, kinds


def _whole_messages(data: bytes, start: int, mtype: int) -> Iterator[tuple[int, int]]:
    """(start, end) of each complete message of type ``mtype`` from ``start`` on, up to the
    first of another type or an incomplete one. (The masking plans' per-row loops frame
    inline instead: a generator step per row is too dear there; this serves the rare
    fail-closed plan.)"""
    pos = start
    size = len(data)
    while size - pos >= 5 and data[pos] == mtype:
        nxt = pos + 1 + int.from_bytes(data[pos + 1:pos + 5], "big")
        if nxt > size:
            return
        yield pos, nxt
        pos = nxt


class _WithholdAll:
    """The fail-closed plan: every value of the result becomes NULL (never the raw value)."""

    def __init__(self, columns: int, reason: str) -> None:
        self.reason = reason
        self.count = 0
        self.rows = 0  # DataRows withheld by rewrite_rows_at (never reset)

    def rewrite_data_row(self, payload: bytes) -> bytes:
        columns = int.from_bytes(payload[:2], "big")
        self.count += 1
        return columns.to_bytes(2, "big") + b"\xff\xff\xff\xff" * columns

    def rewrite_message(self, message: bytes) -> bytes:
        return p.frame(p.DATA_ROW, self.rewrite_data_row(message[5:]))

    def rewrite_rows_at(self, data: bytes, start: int) -> tuple[bytes, int]:
        """Every complete DataRow from ``start`` with all its values NULL."""
        out = []
        end = start
        for begin, end in _whole_messages(data, start, p.DATA_ROW):
            out.append(self.rewrite_message(data[begin:end]))
            self.rows += 1
        return b"".join(out), end

    def rewrite_copy_data(self, chunk: bytes) -> bytes:
        self.count += 1
        return b""

    def rewrite_copy_at(self, data: bytes, start: int) -> tuple[bytes, int]:
        """Every complete CopyData from ``start`` withheld (nothing is sent)."""
        spans = list(_whole_messages(data, start, p.COPY_DATA))
        self.count += len(spans)
        return b"", spans[-1][1] if spans else start

    def take_actions(self) -> list[Any]:
        from hoopops.masking import MaskingAction

        count, self.count = self.count, 0
        return [MaskingAction("withheld: " + self.reason[:200], "null", count)] if count else []


def _lexing_safe(parameters: dict[str, str]) -> bool:
    scs = parameters.get("standard_conforming_strings", "on").lower()
    encoding = parameters.get("client_encoding", "UTF8").upper().replace("-", "")
    return scs == "on" and encoding in ("UTF8", "SQL_ASCII")


_TEXT_LIKE = frozenset({25, 1043, 1042, 19, 114, 18, 142})  # text, varchar, bpchar, name, json
_INTEGERS = frozenset({20, 21, 23, 26})  # int8, int2, int4, oid


def _binary_text(type_oid: int, value: bytes) -> str:
    """A binary-format value as the text a person reads (hex when its type is opaque)."""
    if type_oid in _TEXT_LIKE:
        return value.decode("utf-8", "replace")
    if type_oid in _INTEGERS:
        return str(int.from_bytes(value, "big", signed=type_oid != 26))
    if type_oid == 16 and len(value) == 1:
        return "t" if value[0] else "f"
    return "\\x" + value.hex()

"""Hold a statement on the live connection until an analyst decides.

The audit store is the single source of truth for an approval's state: every request and
every transition (approved, denied, withdrawn, expired) is a chained audit record, and a
transition is refused unless the approval is still pending, atomically, inside the store's
write transaction. That is what lets a decision come from anywhere that can write the
store (the console in this process, ``hoopops approvals approve`` in another terminal) and
still resolve exactly once: whichever transition commits first wins, and everyone else
(including a time-out racing an approval) learns the winner instead of overriding it.

Per held statement the gateway does::

    pending = await broker.create(session_id=..., identity=..., sql=..., params=...,
                                  fingerprint=..., rule_id=..., reason=...,
                                  statement_id=statement_id)
    send NoticeResponse(pending.notice)
    outcome = await pending.wait()     # CancelRequest elsewhere: await pending.withdraw()
    if outcome.authorises(session_id, identity, sql, params): forward
    else: ErrorResponse(outcome.sqlstate, outcome.message)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from hoopops import events
from hoopops.audit import (
    ApprovalNotPending,
    ApprovalRequest,
    ApprovalView,
    AuditError,
    AuditStore,
    approval_binding,
)
from hoopops.audit.records import ParamValue, iso
from hoopops.config import ApprovalsConfig
from hoopops.events import EventBus
from hoopops.identity import Identity

log = logging.getLogger(__name__)


class Decision(StrEnum):
    APPROVED_ONCE = "approved_once"
    APPROVED_SESSION = "approved_session"
    DENIED = "denied"
    TIMED_OUT = "timed_out"
    WITHDRAWN = "withdrawn"


# What an analyst may choose; time-outs and withdrawals are not decisions anyone makes.
ANALYST_DECISIONS = (Decision.APPROVED_ONCE, Decision.APPROVED_SESSION, Decision.DENIED)


class ApprovalError(Exception):
    """A decision that cannot be made; the message says why (shown to the analyst)."""


@dataclass(frozen=True)
class ApprovalOutcome:
    """How one held statement was resolved, and exactly what it was resolved for."""

    approval_id: int
    decision: Decision
    decided_by: str | None
    reason: str | None
    session_id: str
    fingerprint: str
    binding_sha256: str
    timeout: float

    @property
    def approved(self) -> bool:
        return self.decision in (Decision.APPROVED_ONCE, Decision.APPROVED_SESSION)

    def authorises(self, session_id: str, identity: Identity, sql: str,
                   params: Sequence[ParamValue] | None) -> bool:
        """True only for the approved statement itself: same session, identity, text and
        parameter values. Check it before forwarding, so no code path can reuse an
        approval for a statement it was not granted for."""
        return self.approved and approval_binding(
            session_id, identity.subject, identity.issuer, sql, params) == self.binding_sha256

    @property
    def sqlstate(self) -> str | None:
        """42501 for a denial, 57014 (query_canceled) for a time-out or withdrawal."""
        if self.approved:
            return None
        return "42501" if self.decision is Decision.DENIED else "57014"

    @property
    def message(self) -> str:
        if self.decision is Decision.DENIED:
            why = f": {self.reason}" if self.reason else ""
            return f"statement denied by {self.decided_by or 'an analyst'} " \
                   f"(approval #{self.approval_id}){why}"
        if self.decision is Decision.TIMED_OUT:
            return (f"approval #{self.approval_id} timed out after {self.timeout:g} s with no "
                    "decision; the statement was not run (ask an analyst, then retry)")
        if self.decision is Decision.WITHDRAWN:
            return f"canceling statement due to user request (approval #{self.approval_id} " \
                   "withdrawn)"
        scope = "for this session" if self.decision is Decision.APPROVED_SESSION else "once"
        return f"approval #{self.approval_id} approved {scope} by {self.decided_by}"


class PendingApproval:
    """A held statement. ``id`` is known as soon as ``broker.create`` returns."""

    def __init__(self, broker: ApprovalBroker, view: ApprovalView, timeout: float) -> None:
        self._broker = broker
        self.view = view
        self.id = view.id
        self.session_id = view.session_id
        self.fingerprint = view.fingerprint
        self.expires_at = view.expires_at
        self.timeout = timeout
        self._future: asyncio.Future[ApprovalOutcome] = (
            asyncio.get_running_loop().create_future())

    @property
    def notice(self) -> str:
        """The NoticeResponse text the client sees while it waits."""
        return f"awaiting approval #{self.id} by an analyst; cancel to withdraw"

    @property
    def done(self) -> bool:
        return self._future.done()

    async def wait(self) -> ApprovalOutcome:
        """Until decided, withdrawn or timed out. If the waiting task is cancelled (the
        client disconnected), the approval is withdrawn so it can never be used."""
        remaining = max(0.0, self.expires_at - self._broker.clock())
        try:
            return await asyncio.wait_for(asyncio.shield(self._future), remaining)
        except TimeoutError:
            return await self._broker._close(self, "expired",
                                             f"no decision within {self.timeout:g} s")
        except asyncio.CancelledError:
            await asyncio.shield(self._broker._close(
                self, "withdrawn", "the client went away while waiting"))
            raise

    async def withdraw(self, reason: str = "cancelled by the client") -> ApprovalOutcome:
        """CancelRequest or disconnect. If an analyst decided first, that decision stands
        in the record (and is returned), but the caller must still not run the statement."""
        return await self._broker._close(self, "withdrawn", reason)


class ApprovalBroker:
    """Pending approvals of this gateway process, their decisions, time-outs and
    session-scope grants. All state changes go through the audit store first."""

    def __init__(self, store: AuditStore, bus: EventBus, timeout: float = 300.0,
                 poll_interval: float = 0.5, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.bus = bus
        self.timeout = timeout
        self.poll_interval = poll_interval
        self.clock = clock
        self._pending: dict[int, PendingApproval] = {}
        # session id -> (fingerprint, rule) -> the approval that granted it for the session.
        # The rule is part of the grant: after a reload that reviews the same statement
        # under another rule (another reason to look), the analyst's earlier yes is not
        # an answer to the new question.
        self._grants: dict[str, dict[tuple[str, str | None], int]] = {}
        self._poller: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    def from_config(cls, store: AuditStore, bus: EventBus,
                    config: ApprovalsConfig) -> ApprovalBroker:
        return cls(store, bus, timeout=config.timeout, poll_interval=config.poll_interval)

    # --- requests ------------------------------------------------------------------------

    async def create(self, session_id: str, identity: Identity, sql: str,
                     params: Sequence[ParamValue] | None, fingerprint: str,
                     rule_id: str | None, reason: str | None, *,
                     statement_id: int | None = None,
                     expires_in: float | None = None,
                     facts: dict[str, Any] | None = None) -> PendingApproval:
        """Record a pending approval (durably) and announce it; does not wait.

        ``facts`` (the decision's, as the audit trail records them) go with the
        announcement, so the console shows what the gateway knew (masking facts need
        the catalog, which the console does not have).

        Raises AuditWriteError if it cannot be recorded: the statement must then be
        refused, as for any audit failure.
        """
        if self._closed:
            raise ApprovalError("the approvals broker is stopped")
        timeout = self.timeout if expires_in is None else expires_in
        now = self.clock()
        request = ApprovalRequest(
            session_id=session_id, statement_id=statement_id, subject=identity.subject,
            groups=tuple(identity.groups), issuer=identity.issuer, token_id=identity.token_id,
            sql=sql, params=None if params is None else list(params), fingerprint=fingerprint,
            rule_id=rule_id, reason=reason, created_at=now, expires_at=now + timeout,
            binding_sha256=approval_binding(session_id, identity.subject, identity.issuer, sql,
                                            params))
        approval_id = await self.store.approval_requested(request)
        view = await self.store.get_approval(approval_id)
        if view is None:
            raise ApprovalError(f"approval #{approval_id} vanished right after it was recorded")
        pending = PendingApproval(self, view, timeout)
        self._pending[approval_id] = pending
        self._ensure_poller()
        self.bus.publish(events.APPROVAL_REQUESTED, approval_id=approval_id,
                         session_id=session_id, statement_id=statement_id,
                         subject=identity.subject, sql=sql, params=view.params,
                         fingerprint=fingerprint, rule=rule_id, reason=reason,
                         created=now, expires=view.expires_at,
                         **({"facts": facts} if facts is not None else {}))
        return pending

    async def request(self, session_id: str, identity: Identity, sql: str,
                      params: Sequence[ParamValue] | None, fingerprint: str,
                      rule_id: str | None, reason: str | None, *,
                      statement_id: int | None = None) -> ApprovalOutcome:
        """``create`` then ``wait`` in one call, for callers with no notice to send."""
        pending = await self.create(session_id, identity, sql, params, fingerprint, rule_id,
                                    reason, statement_id=statement_id)
        return await pending.wait()

    def pending(self) -> list[PendingApproval]:
        """This process's held statements, oldest first."""
        return sorted(self._pending.values(), key=lambda p: p.id)

    # --- session scope -------------------------------------------------------------------

    def session_allows(self, session_id: str, fingerprint: str, rule_id: str | None) -> bool:
        return self.session_approval(session_id, fingerprint, rule_id) is not None

    def session_approval(self, session_id: str, fingerprint: str,
                         rule_id: str | None) -> int | None:
        """The approval that granted this fingerprint, under this rule, for the rest of the
        session, if any (record it as the statement's ``approval_id``)."""
        return self._grants.get(session_id, {}).get((fingerprint, rule_id))

    async def session_closed(self, session_id: str, reason: str = "session closed") -> None:
        """Withdraw the session's held statements and forget its grants."""
        for pending in [p for p in self._pending.values() if p.session_id == session_id]:
            await self._close(pending, "withdrawn", reason)
        # After the withdrawals: one may have lost a race to a session-scope approval.
        self._grants.pop(session_id, None)

    # --- decisions -----------------------------------------------------------------------

    async def decide(self, approval_id: int, decision: Decision | str, decided_by: str,
                     reason: str | None = None) -> ApprovalView:
        """Approve once, approve for the session, or deny. Works for any approval in the
        store; one held here is released at once, one held by another gateway process on
        its next poll. Raises ApprovalError when the decision cannot be made."""
        try:
            decision = Decision(decision)
        except ValueError:
            raise ApprovalError(f"unknown decision {decision!r}; expected one of "
                                + ", ".join(d.value for d in ANALYST_DECISIONS)) from None
        if decision not in ANALYST_DECISIONS:
            raise ApprovalError(f"{decision.value} is not a decision an analyst makes")
        decided_by = (decided_by or "").strip()
        if not decided_by:
            raise ApprovalError("a decision must name who made it")
        if any(unicodedata.category(c) in ("Cc", "Cf") for c in decided_by):
            raise ApprovalError(f"the name {decided_by!r} contains invisible or control "
                                "characters; decide under your plain name")
        view = await self.store.get_approval(approval_id)
        if view is None:
            raise ApprovalError(f"no approval #{approval_id}")
        if not view.pending:
            by = f" by {view.decided_by}" if view.decided_by else ""
            raise ApprovalError(f"approval #{approval_id} is no longer pending: it was "
                                f"{view.status}{by}")
        approving = decision is not Decision.DENIED
        if approving and same_person(decided_by, view.subject):
            raise ApprovalError(f"{decided_by} requested approval #{approval_id} and cannot "
                                "approve it; another analyst must decide")
        now = self.clock()
        if now >= view.expires_at:
            raise ApprovalError(f"approval #{approval_id} expired at {iso(view.expires_at)}; "
                                "the client has been told it timed out")
        scope = ("session" if decision is Decision.APPROVED_SESSION else "once") \
            if approving else None
        try:
            view = await self.store.approval_decided(approval_id, approving, scope, decided_by,
                                                     reason, now)
        except ApprovalNotPending as exc:
            raise ApprovalError(str(exc)) from None
        pending = self._pending.get(approval_id)
        if pending is not None:
            self._resolve(pending, view)
        else:
            self._publish_decided(view)
        return view

    # --- internals -----------------------------------------------------------------------

    async def _close(self, pending: PendingApproval, status: str,
                     reason: str) -> ApprovalOutcome:
        if pending.done:
            return pending._future.result()
        try:
            view = await self.store.approval_closed(pending.id, status, self.clock(), reason)
        except AuditError as exc:
            # Fail closed: the statement does not run even though the store could not say
            # so; the approval stays pending there, with nobody waiting on it.
            log.error("could not record approval #%s as %s: %s", pending.id, status, exc)
            self.bus.publish(events.GATEWAY_ERROR, where="approvals", message=str(exc))
            outcome = self._outcome(pending, Decision.TIMED_OUT if status == "expired"
                                    else Decision.WITHDRAWN, None, reason)
            self._finish(pending, outcome)
            return outcome
        return self._resolve(pending, view)

    def _resolve(self, pending: PendingApproval, view: ApprovalView) -> ApprovalOutcome:
        if pending.done:
            return pending._future.result()
        decision = _decision_of(view)
        outcome = self._outcome(pending, decision, view.decided_by, view.comment)
        if decision is Decision.APPROVED_SESSION:
            self._grants.setdefault(pending.session_id, {})[
                (pending.fingerprint, pending.view.rule_id)] = pending.id
        self._finish(pending, outcome)
        self._publish_decided(view)
        return outcome

    def _outcome(self, pending: PendingApproval, decision: Decision, decided_by: str | None,
                 reason: str | None) -> ApprovalOutcome:
        return ApprovalOutcome(approval_id=pending.id, decision=decision,
                               decided_by=decided_by, reason=reason,
                               session_id=pending.session_id, fingerprint=pending.fingerprint,
                               binding_sha256=pending.view.binding_sha256,
                               timeout=pending.timeout)

    def _finish(self, pending: PendingApproval, outcome: ApprovalOutcome) -> None:
        self._pending.pop(pending.id, None)
        if not pending._future.done():
            pending._future.set_result(outcome)

    def _publish_decided(self, view: ApprovalView) -> None:
        self.bus.publish(events.APPROVAL_DECIDED, approval_id=view.id,
                         session_id=view.session_id, decision=_decision_of(view).value,
                         decided_by=view.decided_by, reason=view.comment)

    def _ensure_poller(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll(), name="approvals-poll")

    async def _poll(self) -> None:
        """Notice decisions written by other processes, and expire the forgotten."""
        while not self._closed:
            await asyncio.sleep(self.poll_interval)
            if not self._pending:
                continue
            try:
                views = await self.store.get_approvals(list(self._pending))
            except AuditError as exc:
                log.warning("approvals poll failed: %s", exc)
                continue
            now = self.clock()
            for approval_id, pending in list(self._pending.items()):
                view = views.get(approval_id)
                try:
                    if view is not None and not view.pending:
                        self._resolve(pending, view)
                    elif now >= pending.expires_at:
                        # Normally wait() expires it; this covers a caller that never waits.
                        await self._close(pending, "expired",
                                          f"no decision within {pending.timeout:g} s")
                except Exception:  # one odd approval must not stop noticing the others
                    log.exception("approvals poll could not settle approval #%s", approval_id)

    async def close(self, reason: str = "the gateway is stopping") -> None:
        """Withdraw everything still held and stop polling."""
        for pending in list(self._pending.values()):
            await self._close(pending, "withdrawn", reason)
        self._closed = True
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None


def same_person(a: str, b: str) -> bool:
    """Whether two names read as the same to a person: compatibility forms (fullwidth
    letters, roman numerals), invisible characters, spacing and case do not tell people
    apart, so they must not get a requester past four eyes either."""
    def plain(name: str) -> str:
        folded = unicodedata.normalize("NFKC", name)
        return "".join(c for c in folded if unicodedata.category(c) not in ("Cc", "Cf")
                       and not c.isspace()).casefold()
    return plain(a) == plain(b)


def _decision_of(view: ApprovalView) -> Decision:
    """The outcome a settled approval stands for (a pending one reads as withdrawn)."""
    if view.status == "approved":
        return Decision.APPROVED_SESSION if view.scope == "session" else Decision.APPROVED_ONCE
    return {"denied": Decision.DENIED, "expired": Decision.TIMED_OUT}.get(
        view.status, Decision.WITHDRAWN)

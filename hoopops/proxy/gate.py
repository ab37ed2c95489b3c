"""The seam between the relay and the gateway's judgement.

The session asks the gate what to do with each statement and tells it what came back;
the gate consults policy, approvals, audit and masking. ``StatementGate`` itself lets
everything through untouched (a plain relay); ``hoopops.gateway`` supplies the real one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hoopops.proxy.session import Run, Session


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do with one statement, and what to tell the client if it may not run."""

    action: str  # allow | block | review
    sqlstate: str = "42501"
    message: str = ""
    hint: str | None = None
    rule_id: str | None = None
    decision: Any = None  # the policy engine's full Decision (facts, timing)
    approval_id: Any = None
    masking_hints: Any = None  # per statement: where each output column comes from


ALLOW = Verdict("allow")


class StatementGate:
    """Pass-through gate: allows everything, records nothing, masks nothing."""

    sample_limits: tuple[int, int] = (0, 0)
    # What the relay must call the gate for; False lets the hot path skip the calls.
    audits: bool = False  # before_forward records statements
    masks: bool = False  # results need row descriptions and rewriting

    @property
    def observes_results(self) -> bool:
        """Whether after_result wants to hear about finished statements."""
        return False

    def new_session_state(self, server_parameters: dict[str, str]) -> Any:
        return None

    async def decide(self, session: Session, sql: str, statement_name: str | None) -> Verdict:
        return ALLOW

    def decided(self, session: Session, sql: str, statement_name: str | None
                ) -> Verdict | None:
        """What :meth:`decide` would answer, when that is known without waiting; None:
        await decide. (The relay's hot path then creates no coroutine.)"""
        return None

    def session_allows(self, session: Session, verdict: Verdict) -> bool:
        return True

    def outdated(self, session: Session, verdict: Verdict) -> bool:
        """True when the policy changed since ``verdict`` was made (kept from Parse)."""
        return False

    async def request_approval(self, session: Session, verdict: Verdict, sql: str,
                               params: tuple[bytes | None, ...] | None) -> Verdict:
        return Verdict("block", message=verdict.message or "approval is required and no "
                       "approvals broker is configured")

    async def record_refusal(self, session: Session, sql: str,
                             params: tuple[bytes | None, ...] | None, verdict: Verdict,
                             received_at: float) -> None:
        return None

    async def before_forward(self, session: Session, run: Run, *, flushed: bool = True
                             ) -> Verdict | None:
        """Called just before a statement goes to the server; a Verdict refuses it.
        ``flushed=False``: the record may not be on disk yet, and the session awaits
        :meth:`records_flushed` before forwarding (statements of a pipeline share it)."""
        return None

    async def records_flushed(self, session: Session) -> None:
        """Return once what ``before_forward(flushed=False)`` recorded is durable; raises
        hoopops.audit.AuditWriteError when it cannot be made so."""
        return None

    def record_forward(self, session: Session, run: Run) -> Any:
        """:meth:`before_forward` for the relay's fast paths, as a plain call: None (go
        ahead), a Verdict (refused), or an awaitable of one of those to wait for."""
        return self.before_forward(session, run)

    def withdrawn_verdict(self, session: Session) -> Verdict:
        return Verdict("block", sqlstate="57014", message="canceling statement due to user "
                       "request; the pending approval was withdrawn")

    async def after_result(self, session: Session, run: Run) -> None:
        return None

    def record_result(self, session: Session, run: Run) -> Any:
        """:meth:`after_result` for the relay's fast paths, as a plain call: None when
        done, else an awaitable that finishes it."""
        return self.after_result(session, run)

    async def on_row_description(self, session: Session, run: Run) -> None:
        return None

    async def rewrite_row(self, session: Session, run: Run, message: bytes) -> bytes:
        if run.hasher is not None:
            run.hasher.update(message)
        return message

    async def rewrite_copy(self, session: Session, run: Run, message: bytes) -> bytes:
        return message

    async def on_copy_out(self, session: Session, run: Run, payload: bytes) -> None:
        return None

    async def on_statement_complete(self, session: Session, run: Run) -> None:
        """One statement's result ended (CommandComplete); a Query may hold several."""
        return None

    async def on_error(self, session: Session, fields: dict[str, str], payload: bytes
                       ) -> bytes | None:
        return None

    async def on_async_message(self, session: Session, mtype: int, payload: bytes
                               ) -> bytes | None:
        return None

    async def session_opened(self, session: Session) -> None:
        return None

    async def session_closed(self, session: Session) -> None:
        return None

"""Where the console gets its data, and where the analyst's decisions go.

The console never reaches into the gateway's internals beyond this seam (ARCHITECTURE.md:
"events, the approvals broker and the audit store's read API"). Two sources:

* ``GatewaySource``: the gateway runs in this process. Live sessions come from the
  gateway's registry (in memory, cheap), events from the bus, decisions go to the
  approvals broker so the held statement wakes at once.
* ``AttachedSource``: ``hoopops console --attach``. Everything comes from the audit store;
  decisions are written to the store, where the gateway holding the statement finds them
  on its next poll (``approvals.poll_interval``).

Every method that may touch the disk is ``async`` and is only called from workers, so the
UI loop (which is also the gateway's loop) never waits on sqlite.
"""

from __future__ import annotations

import abc
import asyncio
import getpass
import io
import json
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hoopops.audit.records import (
    ApprovalView,
    Filters,
    MaskingView,
    SessionView,
    StatementView,
    iso,
)

if TYPE_CHECKING:
    from hoopops.audit.store import AuditStore
    from hoopops.config import Config
    from hoopops.events import EventBus
    from hoopops.gateway import Gateway


@dataclass(frozen=True)
class LiveSession:
    """One row of the live sessions table."""

    id: str
    subject: str
    groups: tuple[str, ...]
    client: str
    application: str
    target: str
    started_at: float
    state: str
    statements: int
    blocked: int
    last_sql: str


@dataclass(frozen=True)
class Status:
    """What the status bar shows that does not change per statement."""

    mode: str  # "gateway" or "attached"
    listen: str
    targets: tuple[str, ...]
    target_health: dict[str, str] = field(default_factory=dict)
    policy_version: str | None = None
    audit: str | None = None


class SourceError(Exception):
    """An action the source cannot perform; the message is shown to the analyst."""


def default_decider() -> str:
    """Who the audit trail says decided: the OS user at this console's host."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()} (console)"


class ConsoleSource(abc.ABC):
    """The console's whole view of the world."""

    #: Events from an in-process gateway; None when attached to a store.
    bus: EventBus | None = None
    #: Whether ``kill_session`` can work (only with the gateway in this process).
    can_kill: bool = False
    #: The loaded hoopops.yaml (targets, replay.sandbox); None for fixed test data.
    config: Config | None = None

    @property
    @abc.abstractmethod
    def store(self) -> AuditStore | None: ...

    @abc.abstractmethod
    def status(self) -> Status: ...

    @abc.abstractmethod
    async def live_sessions(self) -> list[LiveSession]: ...

    async def pending_approvals(self) -> list[ApprovalView]:
        store = self.store
        return await store.pending_approvals() if store is not None else []

    @abc.abstractmethod
    async def decide(self, approval_id: int, approve: bool, scope: str | None,
                     decided_by: str, comment: str | None) -> ApprovalView | None:
        """Approve (scope ``once`` or ``session``) or deny one approval, by id."""

    def kill_session(self, session_id: str) -> bool:
        raise SourceError("killing a session needs the gateway in this process "
                          "(run hoopops console without --attach)")

    async def recent_masking(self, limit: int = 200) -> list[MaskingView]:
        store = self.store
        return await store.recent_masking(limit) if store is not None else []

    async def history(self, filters: Filters, limit: int = 500) -> list[SessionView]:
        store = self._need_store()
        return await store.list_sessions(since=filters.since, until=filters.until,
                                         identity=filters.identity, target=filters.target,
                                         decision=filters.decision, text=filters.text,
                                         limit=limit)

    async def session(self, session_id: str) -> SessionView | None:
        store = self.store
        return await store.get_session(session_id) if store is not None else None

    async def statements(self, session_id: str) -> list[StatementView]:
        store = self.store
        return await store.session_statements(session_id) if store is not None else []

    async def export_session(self, session_id: str, folder: Path, exported_by: str,
                             now: float | None = None) -> tuple[Path, int]:
        """Write one session's evidence to a JSON file in ``folder``; (path, statements).

        The statements come from the store's own stable export (which carries each
        record's chain hash, so the file can be checked against ``hoopops audit verify``);
        the session header and the export's provenance are added around them.
        """
        store = self._need_store()
        when = time.time() if now is None else now
        session = await store.get_session(session_id)
        if session is None:
            raise SourceError(f"session {session_id} is not in the audit store")
        buffer = io.StringIO()
        count = await store.export(buffer, format="jsonl", what="statements",
                                   filters=Filters(session_id=session_id))
        rows = [json.loads(line) for line in buffer.getvalue().splitlines() if line.strip()]
        if not rows:
            # A store without the stable export (or an empty session): the read API's view.
            rows = [s.to_json() for s in await store.session_statements(session_id)]
            count = len(rows)
        document = {
            "schema": "hoopops.console.evidence/1",
            "exported_at": iso(when),
            "exported_by": exported_by,
            "session": session.to_json(),
            "statements": rows,
        }
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(when))
        path = folder / f"hoopops-evidence-{session_id[:12]}-{stamp}.json"
        text = json.dumps(document, indent=2, ensure_ascii=False, default=str) + "\n"
        # File I/O off the event loop: the gateway shares it.
        await asyncio.to_thread(_write_new, path, text)
        return path, count

    def _need_store(self) -> AuditStore:
        store = self.store
        if store is None:
            raise SourceError("no audit store: history, replay and export need audit "
                              "enabled in hoopops.yaml")
        return store

    async def close(self) -> None:
        return None


def _write_new(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _session_row(session: Any) -> LiveSession:
    info = session.info
    identity = info.identity
    stats = info.stats
    return LiveSession(
        id=info.id, subject=identity.subject, groups=tuple(identity.groups),
        client=f"{info.client_addr}:{info.client_port}",
        application=info.application_name or "", target=info.target,
        started_at=info.started_at, state=info.state, statements=stats.statements,
        blocked=stats.blocked, last_sql=info.last_sql)


class GatewaySource(ConsoleSource):
    """The gateway runs in this process (``hoopops console``, ``hoopops demo``)."""

    can_kill = True

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.bus = gateway.bus
        self.config = gateway.config

    @property
    def store(self) -> AuditStore | None:
        return getattr(self.gateway, "store", None)

    @property
    def broker(self) -> Any:
        return getattr(self.gateway, "broker", None)

    def status(self) -> Status:
        config = self.gateway.config
        health = getattr(self.gateway, "target_health", None)
        audit = str(config.audit.path) if config.audit.enabled else "disabled"
        return Status(mode="gateway", listen=f"{config.listen_host}:{self.gateway.port}",
                      targets=tuple(sorted(config.targets)),
                      target_health=dict(health() if callable(health) else health or {}),
                      policy_version=_policy_version(self.gateway), audit=audit)

    async def live_sessions(self) -> list[LiveSession]:
        # The registry is a plain dict mutated on this loop; a snapshot is consistent.
        return [_session_row(s) for s in list(self.gateway.sessions.values())]

    async def pending_approvals(self) -> list[ApprovalView]:
        # The store sees every pending approval (also those held by another gateway on
        # the same store); the broker only this process's. Without a store, the broker.
        if self.store is not None:
            return await self.store.pending_approvals()
        broker = self.broker
        return [p.view for p in broker.pending()] if broker is not None else []

    async def decide(self, approval_id: int, approve: bool, scope: str | None,
                     decided_by: str, comment: str | None) -> ApprovalView | None:
        broker = self.broker
        if broker is None:
            raise SourceError("this gateway has no approvals broker (no policy holds "
                              "statements for review)")
        return await _decide(broker, approval_id, approve, scope, decided_by, comment)

    def kill_session(self, session_id: str) -> bool:
        return self.gateway.kill_session(session_id)

    def reload_policy(self) -> None:
        """What SIGHUP does for ``hoopops serve`` (a bad new policy leaves the old one)."""
        self.gateway.reload()


class AttachedSource(ConsoleSource):
    """``hoopops console --attach``: only the audit store, shared with a running gateway."""

    def __init__(self, config: Config, store: AuditStore) -> None:
        self.config = config
        self._store = store
        self._broker: Any = None

    @property
    def store(self) -> AuditStore:
        return self._store

    def status(self) -> Status:
        return Status(mode="attached", listen=self.config.listen,
                      targets=tuple(sorted(self.config.targets)),
                      audit=str(self.config.audit.path))

    async def live_sessions(self) -> list[LiveSession]:
        # Open sessions, as far as the trail knows. "since now" keeps those not ended.
        views = await self._store.list_sessions(since=time.time(), limit=1000)
        return [LiveSession(
            id=v.id, subject=v.subject, groups=v.groups,
            client=f"{v.client_addr}:{v.client_port}" if v.client_addr else "",
            application=v.application_name or "", target=v.target, started_at=v.started_at,
            state="open", statements=v.statements, blocked=v.blocked, last_sql="")
            for v in views if v.open]

    async def decide(self, approval_id: int, approve: bool, scope: str | None,
                     decided_by: str, comment: str | None) -> ApprovalView | None:
        # A broker of our own over the shared store applies the same checks (expired,
        # self-approval, already decided); the gateway holding the statement sees the
        # decision on its next poll of the store.
        if self._broker is None:
            from hoopops.approvals import ApprovalBroker
            from hoopops.events import EventBus

            self._broker = ApprovalBroker(self._store, EventBus())
        return await _decide(self._broker, approval_id, approve, scope, decided_by, comment)

    async def close(self) -> None:
        if self._broker is not None:
            await self._broker.close()
        await self._store.close()


async def _decide(broker: Any, approval_id: int, approve: bool, scope: str | None,
                  decided_by: str, comment: str | None) -> ApprovalView | None:
    from hoopops.approvals import ApprovalError, Decision

    if not approve:
        decision = Decision.DENIED
    elif scope == "session":
        decision = Decision.APPROVED_SESSION
    else:
        decision = Decision.APPROVED_ONCE
    try:
        return await broker.decide(approval_id, decision, decided_by, comment)
    except ApprovalError as exc:
        raise SourceError(str(exc)) from None


def _policy_version(gateway: Any) -> str | None:
    """The loaded policy's version, wherever the gateway keeps it (it is optional)."""
    for owner in (getattr(gateway, "engine", None), gateway, getattr(gateway, "gate", None)):
        if owner is None:
            continue
        for name in ("policy_version", "version"):
            value = getattr(owner, name, None)
            if isinstance(value, str | int):
                return str(value)
        policy = getattr(owner, "policy", None)
        value = getattr(policy, "version", None)
        if isinstance(value, str | int):
            return str(value)
    return None


def filters_summary(filters: Filters) -> str:
    parts: list[str] = []
    for name in ("identity", "target", "decision", "text"):
        value = getattr(filters, name)
        if value:
            parts.append(f"{name}:{value}")
    if filters.since is not None:
        parts.append(f"since:{iso(filters.since)[:19]}")
    if filters.until is not None:
        parts.append(f"until:{iso(filters.until)[:19]}")
    return " ".join(parts)


def sessions_by_id(sessions: Sequence[LiveSession]) -> dict[str, LiveSession]:
    return {s.id: s for s in sessions}

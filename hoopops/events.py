"""The in-process event bus: the gateway publishes, audit and the console listen.

Publishing is synchronous and cheap (nothing to do when nobody listens). Each subscriber
gets a bounded queue; a slow subscriber loses its oldest events and is told how many,
instead of slowing the gateway down.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Event:
    """One thing that happened. ``kind`` is a dotted name, ``data`` plain JSON-able values."""

    kind: str
    data: dict[str, Any]
    at: float = field(default_factory=time.time)


# The kinds the gateway publishes (data keys in comments).
SESSION_STARTED = "session.started"  # session_id, subject, groups, client, application, target
SESSION_ENDED = "session.ended"  # session_id, reason, bytes_in, bytes_out, statements
SESSION_STATE = "session.state"  # session_id, state (idle|active|in_transaction|waiting|failed)
STATEMENT_DECIDED = "statement.decided"  # session_id, sql, action, rule, facts, elapsed_us
STATEMENT_FINISHED = "statement.finished"  # session_id, rows, tag, sqlstate, duration_ms
APPROVAL_REQUESTED = "approval.requested"  # approval_id, session_id, subject, sql, rule, expires
APPROVAL_DECIDED = "approval.decided"  # approval_id, decision, decided_by, reason
MASKING_APPLIED = "masking.applied"  # session_id, subject, actions: [{column, strategy, count}]
POLICY_RELOADED = "policy.reloaded"  # version, files, error
GATEWAY_STARTED = "gateway.started"  # listen, targets
GATEWAY_STOPPED = "gateway.stopped"
GATEWAY_ERROR = "gateway.error"  # where, message


class Subscription:
    """A bounded stream of events for one listener."""

    def __init__(self, bus: EventBus, kinds: frozenset[str] | None, maxsize: int) -> None:
        self._bus = bus
        self.kinds = kinds
        self.queue: asyncio.Queue[Event] = asyncio.Queue(maxsize)
        self.dropped = 0

    def offer(self, event: Event) -> None:
        if self.kinds is not None and event.kind not in self.kinds:
            return
        if self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(event)

    async def get(self) -> Event:
        return await self.queue.get()

    def drain(self) -> list[Event]:
        """Everything queued now, without waiting."""
        items = []
        while not self.queue.empty():
            items.append(self.queue.get_nowait())
        return items

    def close(self) -> None:
        self._bus.unsubscribe(self)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        return await self.queue.get()


class EventBus:
    def __init__(self) -> None:
        self._subscriptions: list[Subscription] = []
        # wants() is asked once or more per statement; subscriptions change rarely.
        self._wanted: dict[str, bool] = {}

    @property
    def has_listeners(self) -> bool:
        return bool(self._subscriptions)

    def wants(self, kind: str) -> bool:
        """Whether anyone listens for ``kind`` (so building the event can be skipped)."""
        wanted = self._wanted.get(kind)
        if wanted is None:
            wanted = self._wanted[kind] = any(
                sub.kinds is None or kind in sub.kinds for sub in self._subscriptions)
        return wanted

    def subscribe(self, kinds: Iterable[str] | None = None, maxsize: int = 10_000) -> Subscription:
        sub = Subscription(self, frozenset(kinds) if kinds is not None else None, maxsize)
        self._subscriptions.append(sub)
        self._wanted.clear()
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if sub in self._subscriptions:
            self._subscriptions.remove(sub)
            self._wanted.clear()

    def publish(self, kind: str, **data: Any) -> None:
        if not self._subscriptions:
            return
        event = Event(kind, data)
        for sub in self._subscriptions:
            sub.offer(event)

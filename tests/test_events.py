"""The event bus tells the relay whether anyone listens, so unread events are never built."""

from __future__ import annotations

from hoopops.events import EventBus


def test_wants_follows_subscriptions_as_they_come_and_go() -> None:
    bus = EventBus()
    assert not bus.wants("statement.finished")
    masking = bus.subscribe(["masking.applied"])
    assert bus.wants("masking.applied") and not bus.wants("statement.finished")
    everything = bus.subscribe()
    assert bus.wants("statement.finished")
    everything.close()
    assert not bus.wants("statement.finished") and bus.wants("masking.applied")
    masking.close()
    assert not bus.wants("masking.applied")


def test_published_events_reach_only_their_subscribers() -> None:
    bus = EventBus()
    masking = bus.subscribe(["masking.applied"])
    bus.publish("statement.finished", sql="SELECT 1")
    bus.publish("masking.applied", count=2)
    assert [event.kind for event in masking.drain()] == ["masking.applied"]

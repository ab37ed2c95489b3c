"""Run one direction of a session inline in the transport callback, on a task only when it
must wait.

Almost every chunk a session relays is handled without waiting for anything: the gate's
coroutines return at once (policy cache hits, nothing to record), so switching to a task
per chunk would cost more than the work itself. A ``Lane`` therefore starts the step
coroutine right inside ``data_received`` and drives it by hand. Only when the coroutine
really suspends (a catalog lookup, an audit commit, an approval hold) is it handed to the
lane's own task, which awaits the rest; data that arrives meanwhile waits in the
session's buffer, so messages are still handled strictly in order.

While driven inline the coroutine runs *as* the lane's task (``current_task()`` is that
task), so ``asyncio.timeout`` and friends inside the gate behave as they would on a task,
and a timeout cancels the task that goes on to await the suspended coroutine.
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Callable, Coroutine, Generator
from typing import Any, TypeVar

T = TypeVar("T")
Step = Callable[[], Coroutine[Any, Any, None]]

_FRESH = object()  # handed over unstarted: the task runs it from the beginning


@types.coroutine
def resume(coro: Coroutine[Any, Any, T], yielded: Any) -> Generator[Any, Any, T]:
    """Await what ``coro`` already yielded, then drive it to its end, inside this task;
    returns what ``coro`` returns."""
    while True:
        try:
            sent = yield yielded
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # cancellation (or a timeout) thrown into the task
            try:
                yielded = coro.throw(exc)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
        else:
            try:
                yielded = coro.send(sent)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]


class Lane:
    """One session direction's processing: inline when it can, on ``task`` when it waits.

    ``step`` processes everything buffered so far; ``kick`` runs it after new bytes (or
    an end of stream) arrived. The task ends with the first exception a step raises,
    which is how the session learns that this direction is finished.
    """

    __slots__ = ("_again", "_handoff", "_loop", "_step", "busy", "task")

    def __init__(self, loop: asyncio.AbstractEventLoop, step: Step, name: str) -> None:
        self._loop = loop
        self._step = step
        self._handoff: asyncio.Future[tuple[Coroutine[Any, Any, None], Any]] = (
            loop.create_future())
        self._again = False
        self.busy = False  # a step is suspended (or queued) on the task
        self.task: asyncio.Task[None] = loop.create_task(self._main(), name=name)

    @property
    def done(self) -> bool:
        return self.task.done()

    def kick(self) -> None:
        if self.busy:
            self._again = True  # the task runs another step when the current one ends
            return
        if self.task.done():
            return
        coro = self._step()
        loop = self._loop
        task = self.task
        try:
            asyncio.tasks._enter_task(loop, task)
        except RuntimeError:
            # Called from inside another task (the end of startup): let ours run it.
            self.busy = True
            self._handoff.set_result((coro, _FRESH))
            return
        try:
            yielded = coro.send(None)
        except StopIteration:
            return
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            self.busy = True
            self._handoff.set_exception(exc)
            return
        finally:
            asyncio.tasks._leave_task(loop, task)
        self.busy = True
        self._handoff.set_result((coro, yielded))

    def attempt(self, coro: Coroutine[Any, Any, T]) -> tuple[bool, Any]:
        """Start ``coro`` inline as the lane's task: ``(True, result)`` when it finished
        without waiting, else ``(False, awaitable)`` whose await finishes it (pass that
        to a coroutine given to ``adopt``). Only while the lane is idle."""
        loop = self._loop
        task = self.task
        try:
            asyncio.tasks._enter_task(loop, task)
        except RuntimeError:  # inside another task: run it from the start when awaited
            return False, coro
        try:
            yielded = coro.send(None)
        except StopIteration as stop:
            return True, stop.value
        finally:
            asyncio.tasks._leave_task(loop, task)
        return False, resume(coro, yielded)

    def adopt(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` (not started) on the task, before any further step: a fast path
        began something that must be awaited. Only while the lane is idle."""
        self.busy = True
        self._handoff.set_result((coro, _FRESH))

    def fail(self, exc: BaseException) -> None:
        """End the lane with ``exc`` (raised by a fast path outside any step)."""
        if not self.busy and not self.task.done():
            self.busy = True
            self._handoff.set_exception(exc)

    async def _main(self) -> None:
        loop = self._loop
        while True:
            coro, yielded = await self._handoff
            self._handoff = loop.create_future()
            if yielded is _FRESH:
                await coro
            else:
                await resume(coro, yielded)
            while self._again:
                self._again = False
                await self._step()
            self.busy = False

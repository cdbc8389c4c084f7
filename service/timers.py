"""Many deadlines on one event-loop timer: every socket's keepalive ping and pong deadline, and
token expiries (issue 17: a loop timer costs about 0.6 KB per socket under uvloop; an entry here
about 0.1 KB).

`wheel(loop).call_later(delay, func, owner)` runs `func(owner)` after `delay` seconds unless the
returned `Due` is cancelled first, in the order of the deadlines, as `loop.call_later` would. The
entries are a heap, and the one loop timer is set for the earliest.
"""

from __future__ import annotations

import asyncio
import heapq
import weakref
from collections.abc import Callable
from typing import Any


class Due:
    """One deadline on a `Wheel`: `func(owner)` at `when`, unless cancelled first (the part of
    asyncio's TimerHandle uvicorn uses is `cancel`)."""

    __slots__ = ("func", "owner", "when")

    def __init__(self, when: float, func: Callable[[Any], object], owner: Any) -> None:
        self.when = when
        self.func: Callable[[Any], object] | None = func
        self.owner = owner

    def __lt__(self, other: Due) -> bool:
        return self.when < other.when

    def cancel(self) -> None:
        self.func = None
        self.owner = None

    def cancelled(self) -> bool:
        return self.func is None


class Wheel:
    """Every socket's keepalive deadlines on one event-loop timer: a heap of `Due`, the loop timer
    set for the earliest. Cancelled entries stay in the heap until their time and are skipped."""

    __slots__ = ("__weakref__", "_heap", "_loop", "_timer", "_timer_when")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._heap: list[Due] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = 0.0

    def call_later(self, delay: float, func: Callable[[Any], object], owner: Any) -> Due:
        due = Due(self._loop.time() + delay, func, owner)
        heapq.heappush(self._heap, due)
        if self._timer is None or due.when < self._timer_when:
            self._arm(due.when)
        return due

    def __len__(self) -> int:
        return len(self._heap)

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_when = when
        self._timer = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer = None
        heap = self._heap
        now = self._loop.time()
        while heap and heap[0].when <= now:
            due = heapq.heappop(heap)
            func, owner = due.func, due.owner
            if func is None:
                continue
            due.cancel()
            try:
                func(owner)
            except Exception as exc:  # as the loop does for a failing callback: report, go on
                self._loop.call_exception_handler(
                    {"message": "keepalive callback failed", "exception": exc, "protocol": owner}
                )
        if heap:
            self._arm(heap[0].when)


_wheels: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Wheel] = weakref.WeakKeyDictionary()


def wheel(loop: asyncio.AbstractEventLoop) -> Wheel:
    """The keepalive wheel of `loop`."""
    found = _wheels.get(loop)
    if found is None:
        found = _wheels[loop] = Wheel(loop)
    return found

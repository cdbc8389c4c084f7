"""Fakes for unit tests of pure logic only: an ASGI send that behaves like uvicorn's, and a memory
broker whose subscribe/unsubscribe a test can hold open."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from service.broker import RESYNC, Envelope, History, Retention
from service.broker.memory import MemoryBroker, MemoryBus


class FakeSocket:
    """An ASGI `send` shaped like uvicorn's: it awaits `writable` (cleared while the transport is
    paused) and then writes without suspending."""

    def __init__(self) -> None:
        self.writable = asyncio.Event()
        self.writable.set()
        self.sent: list[dict[str, Any]] = []
        self.broken = False

    async def send(self, message: dict[str, Any]) -> None:
        await self.writable.wait()
        if self.broken:
            raise OSError("client disconnected")
        self.sent.append(message)

    @property
    def texts(self) -> list[str]:
        return [m["text"] for m in self.sent if m["type"] == "websocket.send"]

    @property
    def close_codes(self) -> list[int]:
        return [m["code"] for m in self.sent if m["type"] == "websocket.close"]


Op = Literal["subscribe", "unsubscribe", "history"]


class GatedBroker(MemoryBroker):
    """A MemoryBroker whose subscribe or unsubscribe can be held open, as a Redis round trip is.

    MemoryBroker never suspends, so a hub call over it runs to the end in one step and no race with
    another hub call can happen. After `hold(op)`, each `op` call suspends before it takes effect
    until `release(op)`; `arrived(op)` waits until one is suspended there. Every call is recorded
    in `calls`."""

    def __init__(self, bus: MemoryBus) -> None:
        super().__init__(bus)
        self.calls: list[tuple[Op, tuple[str, ...]]] = []
        self._gates: dict[Op, asyncio.Event] = {}
        self._arrivals: dict[Op, asyncio.Event] = {}

    def hold(self, op: Op) -> None:
        self._gates[op] = asyncio.Event()
        self._arrivals[op] = asyncio.Event()

    async def arrived(self, op: Op, timeout: float = 1.0) -> None:
        await asyncio.wait_for(self._arrivals[op].wait(), timeout)

    def release(self, op: Op) -> None:
        self._gates.pop(op).set()

    async def _gate(self, op: Op, channels: tuple[str, ...]) -> None:
        self.calls.append((op, channels))
        gate = self._gates.get(op)
        if gate is not None:
            self._arrivals[op].set()
            await gate.wait()

    async def subscribe(self, *channels: str) -> None:
        await self._gate("subscribe", channels)
        await super().subscribe(*channels)

    async def unsubscribe(self, *channels: str) -> None:
        await self._gate("unsubscribe", channels)
        await super().unsubscribe(*channels)

    async def history(
        self, channel: str, after: int | None, limit: int, start: Retention | None = None
    ) -> History:
        await self._gate("history", (channel,))
        return await super().history(channel, after, limit, start)


class LossyBroker(GatedBroker):
    """A GatedBroker that loses what `dropping` picks on the way to its pod, as a pod whose link to
    Redis was down misses messages; `resync()` then says the link came back, as RedisBroker does."""

    def __init__(self, bus: MemoryBus) -> None:
        super().__init__(bus)
        self.dropping: Callable[[Envelope], bool] = lambda envelope: False

    async def messages(self) -> AsyncIterator[Envelope]:
        async for envelope in super().messages():
            if envelope is RESYNC or not self.dropping(envelope):
                yield envelope

    def resync(self) -> None:
        self._queue.put_nowait(RESYNC)

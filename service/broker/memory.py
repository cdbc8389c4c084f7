"""The in-process bus: a stand-in for Redis pub/sub inside one process.

`memory://` gives a pod its own bus (one pod, `make run`). Tests hand one `MemoryBus` to several
pods in one event loop to act as a shared Redis. A full subscriber queue makes the publisher wait
(backpressure inside one process), so the memory bus never drops.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from service.broker import Envelope

QUEUE_SIZE = 65536


class MemoryBus:
    """Channel -> subscribed brokers. Plays the part of the Redis server."""

    def __init__(self) -> None:
        self.subscribers: dict[str, set[MemoryBroker]] = {}

    async def publish(self, envelope: Envelope) -> int:
        receivers = self.subscribers.get(envelope.channel, ())
        for broker in tuple(receivers):
            await broker.deliver(envelope)
        return len(receivers)


class MemoryBroker:
    """One pod's link to a MemoryBus."""

    def __init__(self, bus: MemoryBus) -> None:
        self._bus = bus
        self._channels: set[str] = set()
        self._queue: asyncio.Queue[Envelope | None] = asyncio.Queue(QUEUE_SIZE)
        self._closed = False

    async def deliver(self, envelope: Envelope) -> None:
        if not self._closed:
            await self._queue.put(envelope)

    async def publish(self, envelope: Envelope) -> int:
        return await self._bus.publish(envelope)

    async def subscribe(self, *channels: str) -> None:
        for channel in channels:
            self._bus.subscribers.setdefault(channel, set()).add(self)
            self._channels.add(channel)

    async def unsubscribe(self, *channels: str) -> None:
        for channel in channels:
            receivers = self._bus.subscribers.get(channel)
            if receivers is not None:
                receivers.discard(self)
                if not receivers:
                    del self._bus.subscribers[channel]
            self._channels.discard(channel)

    async def messages(self) -> AsyncIterator[Envelope]:
        while (envelope := await self._queue.get()) is not None:
            yield envelope

    @property
    def ready(self) -> bool:
        return not self._closed

    @property
    def alive(self) -> bool:
        return True  # nothing in process can stop delivering on its own

    @property
    def channels(self) -> frozenset[str]:
        """What this broker is subscribed to (tests check that nothing is left behind)."""
        return frozenset(self._channels)

    async def close(self) -> None:
        if self._closed:
            return
        await self.unsubscribe(*self._channels)
        self._closed = True
        while self._queue.full():  # make room for the end marker; the hub is stopping anyway
            self._queue.get_nowait()
        self._queue.put_nowait(None)

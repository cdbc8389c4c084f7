"""The in-process bus: a stand-in for Redis pub/sub and history inside one process.

`memory://` gives a pod its own bus (one pod, `make run`). Tests hand one `MemoryBus` to several
pods in one event loop to act as a shared Redis. A full subscriber queue makes the publisher wait
(backpressure inside one process), so the memory bus never drops. History has the semantics of
service/broker/history.py: capped, expiring, an epoch that changes when it is lost, idempotency keys.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

import orjson

from service import channels
from service.broker import (
    Appended,
    Envelope,
    History,
    Member,
    Position,
    PresenceBatch,
    PresenceTerms,
    Present,
    Retention,
)
from service.broker.history import DEDUPE_WINDOW

QUEUE_SIZE = 65536


@dataclass
class _Stream:
    epoch: str
    expires: float  # monotonic
    offset: int = 0
    entries: deque[tuple[int, str]] = field(default_factory=deque)
    seen: OrderedDict[str, int] = field(default_factory=OrderedDict)  # idempotency key -> offset


@dataclass
class _Presence:
    """One group's presence, as the Redis keys of service/broker/presence.py hold it."""

    conns: dict[str, tuple[float, str, str]] = field(default_factory=dict)  # id -> (expires, user, claims)
    users: dict[str, int] = field(default_factory=dict)
    claims: dict[str, str] = field(default_factory=dict)
    announced: set[str] = field(default_factory=set)
    leaving: dict[str, float] = field(default_factory=dict)  # user -> when the leave is due


class MemoryBus:
    """Channel -> subscribed brokers, and each group's history. Plays the part of the Redis server."""

    def __init__(self) -> None:
        self.subscribers: dict[str, set[MemoryBroker]] = {}
        self.streams: dict[str, _Stream] = {}
        self.denied: dict[str, tuple[float, float]] = {}  # key -> (revoked at, expires: monotonic)
        self.presence: dict[str, _Presence] = {}  # group channel -> its presence

    async def publish(self, envelope: Envelope) -> int:
        receivers = self.subscribers.get(envelope.channel, ())
        for broker in tuple(receivers):
            await broker.deliver(envelope)
        return len(receivers)

    async def append(self, envelope: Envelope, retention: Retention, key: str) -> Appended:
        now = time.monotonic()
        stream = self._live(envelope.channel, now)
        if stream is not None and key and key in stream.seen:
            return Appended(Position(stream.epoch, stream.seen[key]), 0, duplicate=True)
        if stream is None:
            stream = self.streams[envelope.channel] = _Stream(secrets.token_hex(6), now)
        stream.offset += 1
        stream.expires = now + retention.ttl
        stream.entries.append((stream.offset, envelope.frame))
        while len(stream.entries) > retention.size:
            stream.entries.popleft()
        if key:
            stream.seen[key] = stream.offset
            while len(stream.seen) > max(DEDUPE_WINDOW, retention.size):
                stream.seen.popitem(last=False)
        position = Position(stream.epoch, stream.offset)
        pods = await self.publish(replace(envelope, epoch=position.epoch, offset=position.offset))
        return Appended(position, pods)

    async def history(
        self, channel: str, after: int | None, limit: int, start: Retention | None = None
    ) -> History:
        now = time.monotonic()
        stream = self._live(channel, now)
        if stream is None and start is not None:
            stream = self.streams[channel] = _Stream(secrets.token_hex(6), now + start.ttl)
        if stream is None:
            return History("", 0, [])
        if after is None:
            entries = list(stream.entries)[-limit:] if limit > 0 else []
        else:
            entries = [e for e in stream.entries if e[0] > after][:limit]
        return History(stream.epoch, stream.offset, entries)

    def deny(self, key: str, revoked_at: float, seconds: float) -> None:
        self.denied[key] = (revoked_at, time.monotonic() + seconds)

    def revoked_at(self, key: str) -> float | None:
        entry = self.denied.get(key)
        if entry is None:
            return None
        if time.monotonic() >= entry[1]:
            del self.denied[key]
            return None
        return entry[0]

    async def presence_update(self, channel: str, terms: PresenceTerms, batch: PresenceBatch) -> list[str]:
        now = time.monotonic()
        group = self.presence.setdefault(channel, _Presence())
        events = await self._clean(channel, group, terms, now)
        for conn_id in batch.departures:
            self._drop(group, terms, conn_id, now + terms.grace)
        for arrival in batch.arrivals:
            if arrival.conn_id in group.conns:
                continue
            group.conns[arrival.conn_id] = (now + terms.ttl, arrival.user, arrival.claims)
            if not arrival.user:
                continue
            group.claims[arrival.user] = arrival.claims
            group.users[arrival.user] = count = group.users.get(arrival.user, 0) + 1
            if count == 1 and terms.events:
                group.leaving.pop(arrival.user, None)
                if arrival.user not in group.announced:
                    group.announced.add(arrival.user)
                    events.append(_event(channel, "join", arrival.user, arrival.claims))
        missing = []
        for conn_id in batch.refresh:
            entry = group.conns.get(conn_id)
            if entry is None:
                missing.append(conn_id)
            else:
                group.conns[conn_id] = (now + terms.ttl, entry[1], entry[2])
        for event in events:
            await self.publish(event)
        if not group.conns and not group.leaving and not group.announced:
            del self.presence[channel]
        return missing

    async def presence_read(self, channel: str, terms: PresenceTerms, limit: int) -> Present:
        group = self.presence.get(channel)
        if group is None:
            return Present(0, 0, [], False)
        for event in await self._clean(channel, group, terms, time.monotonic()):
            await self.publish(event)
        listed = sorted(group.users)[:limit] if limit > 0 else []
        members = [Member(u, group.users[u], group.claims.get(u, "{}")) for u in listed]
        return Present(len(group.conns), len(group.users), members, 0 < limit < len(group.users))

    @staticmethod
    def _drop(group: _Presence, terms: PresenceTerms, conn_id: str, due: float) -> None:
        entry = group.conns.pop(conn_id, None)
        if entry is None or not entry[1]:
            return
        user = entry[1]
        group.users[user] -= 1
        if group.users[user] <= 0:
            del group.users[user]
            group.claims.pop(user, None)
            if terms.events:
                group.leaving[user] = due

    async def _clean(
        self, channel: str, group: _Presence, terms: PresenceTerms, now: float
    ) -> list[Envelope]:
        """Drop expired entries; the leave events now due (published by the caller, after)."""
        for conn_id in [c for c, entry in group.conns.items() if entry[0] <= now]:
            self._drop(group, terms, conn_id, now)
        events = []
        for user in [u for u, due in group.leaving.items() if due <= now]:
            del group.leaving[user]
            if user in group.announced:  # a user back in time is no longer in `leaving`
                group.announced.discard(user)
                events.append(_event(channel, "leave", user, None))
        return events

    def _live(self, channel: str, now: float) -> _Stream | None:
        stream = self.streams.get(channel)
        if stream is not None and now >= stream.expires:
            del self.streams[channel]  # expired: the next message begins a new epoch
            return None
        return stream


def _event(channel: str, kind: str, user: str, claims: str | None) -> Envelope:
    """A presence event as the Redis functions write it (service/broker/presence.py)."""
    body = {"event": kind, "user": user}
    text = orjson.dumps({"group": channels.group_of(channel), "presence": body}).decode()
    if claims is not None:
        text = text[:-2] + ',"claims":' + claims + "}}"
    return Envelope(channel, text, time.time(), event=True)


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

    async def append(self, envelope: Envelope, retention: Retention, key: str) -> Appended:
        return await self._bus.append(envelope, retention, key)

    async def history(
        self, channel: str, after: int | None, limit: int, start: Retention | None = None
    ) -> History:
        return await self._bus.history(channel, after, limit, start)

    async def deny(self, key: str, revoked_at: float, seconds: float) -> None:
        self._bus.deny(key, revoked_at, seconds)

    async def denied(self, key: str) -> float | None:
        return self._bus.revoked_at(key)

    async def presence_update(self, channel: str, terms: PresenceTerms, batch: PresenceBatch) -> list[str]:
        return await self._bus.presence_update(channel, terms, batch)

    async def presence_read(self, channel: str, terms: PresenceTerms, limit: int) -> Present:
        return await self._bus.presence_read(channel, terms, limit)

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

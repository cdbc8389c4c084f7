"""Listening to Django Channels' RedisPubSubChannelLayer: its group messages reach relay members too.

An app on `channels_redis.pubsub.RedisPubSubChannelLayer` publishes `group_send(G, event)` as one
PUBLISH of the msgpack-encoded event to `<prefix>__group__G`, on the one of its Redis hosts that
`channels_redis.utils._consistent_hash` picks for that channel name. With RELAY_CHANNELS_PUBSUB_URLS
(the same hosts, in the same order) relay pods subscribe there too, for the groups they have
members of, and deliver each event as the frame the app's consumer would have sent:
`{"message": event["message"]}`, encoded as Channels' `send_json` does. Nothing in the app changes.

`BridgedBroker` is relay's broker plus one listening RedisBroker per Channels host: publishes and
history go to relay's own Redis; subscriptions to groups are made on both; deliveries are merged.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import json
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import msgpack
import structlog

from service import channels, metrics
from service.broker import (
    Appended,
    Broker,
    BrokerUnavailable,
    Envelope,
    History,
    PresenceBatch,
    PresenceTerms,
    Present,
    Retention,
)
from service.broker.wire import BadPayload

log = structlog.get_logger("relay.channels_pubsub")


def shard(channel_name: str, hosts: int) -> int:
    """Which of `hosts` channels_redis uses for `channel_name` (its `_consistent_hash`)."""
    if hosts == 1:
        return 0
    value = binascii.crc32(channel_name.encode()) & 0xFFF
    return int(value / (4096 / float(hosts)))


def group_channel(prefix: str, group: str) -> str:
    """The channel RedisPubSubChannelLayer publishes group `group` on."""
    return f"{prefix}__group__{group}"


def naming(prefix: str) -> Any:
    """How a listener names relay's group channel `g:{G}` on the app's Redis."""
    return lambda channel: group_channel(prefix, channels.group_of(channel)).encode()


def decode(channel: str, payload: bytes) -> Envelope:
    """A Channels event on `channel` (relay's `g:{G}`) as the frame the app's consumer would send."""
    try:
        event: Any = msgpack.unpackb(payload)
        frame = json.dumps({"message": event["message"]})  # json.dumps's defaults, as send_json's
    except (ValueError, TypeError, KeyError, msgpack.UnpackException) as exc:
        raise BadPayload(b"not a Channels event with a message") from exc
    return Envelope(channel, frame, time.time())


class BridgedBroker:
    """relay's broker, plus listeners on the Channels pub/sub layer's hosts. Satisfies `Broker`."""

    def __init__(self, primary: Broker, listeners: Sequence[Broker], prefix: str) -> None:
        self._primary = primary
        self._listeners = list(listeners)
        self._prefix = prefix
        self._queue: asyncio.Queue[Envelope | None] = asyncio.Queue()
        self._pumps: list[asyncio.Task[None]] = []

    def _listener(self, channel: str) -> Broker | None:
        """The listener a group channel is subscribed on; None for other channels (a pod's)."""
        if not channel.startswith("g:{"):
            return None
        name = group_channel(self._prefix, channels.group_of(channel))
        return self._listeners[shard(name, len(self._listeners))]

    async def publish(self, envelope: Envelope) -> int:
        return await self._primary.publish(envelope)

    async def append(self, envelope: Envelope, retention: Retention, key: str) -> Appended:
        return await self._primary.append(envelope, retention, key)

    async def history(
        self, channel: str, after: int | None, limit: int, start: Retention | None = None
    ) -> History:
        return await self._primary.history(channel, after, limit, start)

    async def deny(self, key: str, revoked_at: float, seconds: float) -> None:
        await self._primary.deny(key, revoked_at, seconds)

    async def denied(self, key: str) -> float | None:
        return await self._primary.denied(key)

    async def presence_update(self, channel: str, terms: PresenceTerms, batch: PresenceBatch) -> list[str]:
        return await self._primary.presence_update(channel, terms, batch)

    async def presence_read(self, channel: str, terms: PresenceTerms, limit: int) -> Present:
        return await self._primary.presence_read(channel, terms, limit)

    async def subscribe(self, *names: str) -> None:
        await self._primary.subscribe(*names)
        for name in names:
            listener = self._listener(name)
            if listener is not None:
                # The app's layer is optional traffic: its Redis being down must not refuse a
                # join. The channel stays wanted and is subscribed when that link is back.
                with contextlib.suppress(BrokerUnavailable):
                    await listener.subscribe(name)

    async def unsubscribe(self, *names: str) -> None:
        await self._primary.unsubscribe(*names)
        for name in names:
            listener = self._listener(name)
            if listener is not None:
                await listener.unsubscribe(name)

    async def messages(self) -> AsyncIterator[Envelope]:
        if not self._pumps:
            loop = asyncio.get_running_loop()
            self._pumps = [loop.create_task(self._pump(b)) for b in (self._primary, *self._listeners)]
        while (envelope := await self._queue.get()) is not None:
            yield envelope

    async def _pump(self, broker: Broker) -> None:
        async for envelope in broker.messages():
            if broker is not self._primary:
                metrics.CHANNELS_PUBSUB_MESSAGES.inc()
            self._queue.put_nowait(envelope)
        if broker is self._primary:
            self._queue.put_nowait(None)  # the pod's own link closed: the hub is done

    @property
    def ready(self) -> bool:
        return self._primary.ready  # the app's hosts are extra traffic, not a reason to be unready

    @property
    def alive(self) -> bool:
        return all(b.alive for b in (self._primary, *self._listeners))

    async def close(self) -> None:
        for listener in self._listeners:
            await listener.close()
        await self._primary.close()
        for pump in self._pumps:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(pump, 5)

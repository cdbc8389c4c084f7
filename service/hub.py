"""The hub: this pod's members by group and by id, and the only caller of the broker.

Publishing goes hub -> broker; delivery comes back broker.messages() -> hub.run -> connection.offer,
for the publishing pod too (one delivery path, one ordering rule). The pod subscribes to a group's
channel when its first local member joins and unsubscribes when the last one leaves, under a
per-group lock so that a join racing a leave never ends unsubscribed.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from service import channels, metrics
from service.broker import Broker, BrokerUnavailable, Envelope
from service.connection import Connection
from service.limits import KeyedLock
from service.protocol import group_frame, pod_of

log = structlog.get_logger("relay.hub")


class TooManyGroups(Exception):
    """A connection asked to join more groups than RELAY_MAX_GROUPS allows."""


class Hub:
    """Local membership and fan-out for one pod."""

    def __init__(self, broker: Broker, pod_id: str, *, max_groups: int = 100) -> None:
        self.pod_id = pod_id
        self._broker = broker
        self._max_groups = max_groups
        self._members: dict[str, set[Connection]] = {}  # broker channel -> local members
        self._connections: dict[str, Connection] = {}  # connection id -> connection
        self._locks = KeyedLock()
        self.empty = asyncio.Event()  # set while the pod has no connections (the drain waits on it)
        self.empty.set()

    @property
    def connections(self) -> list[Connection]:
        return list(self._connections.values())

    def connection_count(self) -> int:
        return len(self._connections)

    def group_count(self) -> int:
        return len(self._members)

    def channels(self) -> set[str]:
        """Broker channels this pod has members for (what it must be subscribed to)."""
        return set(self._members)

    async def start(self) -> None:
        """Listen on this pod's own channel for direct sends; call once before `run`. With the
        broker down the channel stays wanted and is subscribed as soon as the link is up."""
        try:
            await self._broker.subscribe(channels.pod(self.pod_id))
        except BrokerUnavailable:
            log.warning("hub.pod_channel_pending", reason="broker unavailable at start")

    def register(self, conn: Connection) -> None:
        """Make `conn` reachable by direct send."""
        self._connections[conn.id] = conn
        self.empty.clear()
        metrics.CONNECTIONS.set(len(self._connections))

    async def join(self, conn: Connection, group: str) -> None:
        """Add `conn` to `group`; the first local member subscribes the pod. If the broker cannot
        confirm that (BrokerUnavailable), nothing was recorded and the error propagates."""
        channel = channels.group(group)
        if channel in conn.groups:
            return
        if len(conn.groups) >= self._max_groups:
            raise TooManyGroups(f"a connection may join at most {self._max_groups} groups")
        members = self._members.get(channel)
        if not members:  # an empty set means a last leave is unsubscribing right now
            async with self._locks.hold(channel):
                members = self._members.get(channel)
                if not members:
                    try:
                        await self._broker.subscribe(channel)
                    except BrokerUnavailable:
                        await self._broker.unsubscribe(channel)  # nobody here wants it after all
                        raise
                    members = self._members[channel] = set()
                    metrics.GROUPS.set(len(self._members))
        members.add(conn)
        conn.groups.add(channel)

    async def leave(self, conn: Connection, group: str) -> None:
        """Remove `conn` from `group`; the last local member unsubscribes the pod."""
        await self._leave(conn, channels.group(group))

    async def _leave(self, conn: Connection, channel: str) -> None:
        conn.groups.discard(channel)
        members = self._members.get(channel)
        if members is None or conn not in members:
            return
        members.discard(conn)
        if members:
            return
        async with self._locks.hold(channel):
            if self._members.get(channel) is members and not members:
                try:
                    await self._broker.unsubscribe(channel)
                finally:
                    del self._members[channel]
                    metrics.GROUPS.set(len(self._members))

    async def leave_all(self, conn: Connection) -> None:
        """Take `conn` out of every group: it receives nothing more. Safe to call twice."""
        for channel in list(conn.groups):
            await self._leave(conn, channel)

    def unregister(self, conn: Connection) -> None:
        """Forget `conn` once its socket is really gone: it stops counting against the caps."""
        if self._connections.pop(conn.id, None) is not None:
            metrics.CONNECTIONS.set(len(self._connections))
            if not self._connections:
                self.empty.set()

    async def disconnect(self, conn: Connection) -> None:
        """`leave_all`, then `unregister`: for a connection whose socket is already gone."""
        await self.leave_all(conn)
        self.unregister(conn)

    async def publish(self, group: str, frame: str) -> int:
        """Send `frame` to every member of `group` on every pod; returns the pods reached."""
        return await self._broker.publish(Envelope(channels.group(group), frame, time.time()))

    async def send_direct(self, channel_id: str, frame: str) -> int:
        """Send `frame` to one connection, on whichever pod holds it; returns the pods reached."""
        channel = channels.pod(pod_of(channel_id))
        return await self._broker.publish(Envelope(channel, frame, time.time(), target=channel_id))

    async def run(self) -> None:
        """Deliver everything the broker receives to local members, until the broker closes."""
        async for envelope in self._broker.messages():
            try:
                self._deliver(envelope)
            except Exception:  # a bug here must not stop delivery for everyone else
                log.exception("hub.deliver_failed", channel_kind=envelope.channel[:1])

    def _deliver(self, envelope: Envelope) -> None:
        if envelope.target:
            conn = self._connections.get(envelope.target)
            if conn is None:
                metrics.SEND_QUEUE_DROPPED.labels("unknown_channel").inc()
            elif conn.offer(envelope.frame):
                metrics.MESSAGES_SENT.inc()
            return
        members = self._members.get(envelope.channel)
        if not members:
            return
        started = time.perf_counter()
        frame = envelope.frame
        v1_frame = None  # the v1 form ({"group": G, "message": ...}), built once if anyone needs it
        sent = 0
        # offer() never awaits and never changes membership, so the set can be walked in place.
        for conn in members:
            if conn.v1:
                if v1_frame is None:
                    v1_frame = group_frame(channels.group_of(envelope.channel), frame)
                sent += conn.offer(v1_frame)
            else:
                sent += conn.offer(frame)
        finished = time.perf_counter()
        count = len(members)
        metrics.MESSAGES_SENT.inc(sent)  # dropped offers are counted in relay_send_queue_dropped_total
        metrics.FANOUT_RECIPIENTS.observe(count)
        metrics.LOCAL_FANOUT_DURATION.observe(finished - started)
        metrics.GROUP_FANOUT_LATENCY.observe(time.time() - envelope.sent_at)

"""The hub: this pod's members by group and by id, and the broker's caller for members' traffic.

Publishing goes hub -> broker; delivery comes back broker.messages() -> hub.run -> connection.offer,
for the publishing pod too (one delivery path, one ordering rule). The pod subscribes to a group's
channel when its first local member joins and unsubscribes when the last one leaves, under a
per-group lock so that a join racing a leave never ends unsubscribed. Untargeted envelopes on
channels with no members (the control channel, this pod's own channel) go to whoever `listen`ed
for them: the server API's commands and answers (service/control.py).

Groups that keep history (service/rules.py) are published with a position, delivered in order by
the sequencer (service/sequencer.py), and a member may join from a position it last saw: what it
missed is read from history and sent first, while live messages for it are held and merged by
offset at the seam, so it gets each message once and in order (docs/history.md).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from service import channels, metrics
from service.broker import RESYNC, Broker, BrokerUnavailable, Envelope, History, Position, Retention
from service.connection import Connection
from service.limits import KeyedLock
from service.presence import Presence
from service.protocol import GROUP_NAME, Since, group_frame, pod_of
from service.rules import GroupRule, GroupRules
from service.sequencer import Sequencer

log = structlog.get_logger("relay.hub")


class TooManyGroups(Exception):
    """A connection asked to join more groups than RELAY_MAX_GROUPS allows."""


@dataclass(frozen=True, slots=True)
class Published:
    """What a publish did: pods reached, and for a group with history its position (and whether
    the same idempotency key had stored it before)."""

    pods: int
    position: Position | None = None
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class Joined:
    """What a join did, for a group with history: where the group stands, and for a join with
    `since`, whether everything missed follows (`recovered`) or why not (`reason`)."""

    position: Position | None = None
    recovered: bool | None = None
    reason: str | None = None  # epoch_changed | trimmed | unavailable


class Hub:
    """Local membership and fan-out for one pod."""

    def __init__(
        self,
        broker: Broker,
        pod_id: str,
        *,
        max_groups: int = 100,
        rules: GroupRules | None = None,
        presence: Presence | None = None,
    ) -> None:
        self.pod_id = pod_id
        self._presence = presence  # told of joins and leaves in groups that keep presence
        self._broker = broker
        self._max_groups = max_groups
        self._rules = rules or GroupRules([])
        self._members: dict[str, set[Connection]] = {}  # broker channel -> local members
        self._connections: dict[str, Connection] = {}  # connection id -> connection
        self._held: dict[str, dict[Connection, list[Envelope]]] = {}  # members mid-recovery
        self._sequencer = Sequencer(broker, self._fan_out)
        self._tasks: set[asyncio.Task[None]] = set()  # backends' group changes under way
        self._locks = KeyedLock()
        self._listeners: dict[str, Callable[[Envelope], object]] = {}  # channel -> not-member traffic
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

    def listen(self, channel: str, callback: Callable[[Envelope], object]) -> None:
        """Hand `channel`'s untargeted envelopes to `callback` (the control channel and this pod's
        own channel carry the server API's commands and answers, service/control.py)."""
        self._listeners[channel] = callback

    def connection(self, conn_id: str) -> Connection | None:
        return self._connections.get(conn_id)

    def group_sizes(self) -> dict[str, int]:
        """Local members by group name."""
        return {channels.group_of(channel): len(members) for channel, members in self._members.items()}

    def register(self, conn: Connection) -> None:
        """Make `conn` reachable by direct send."""
        self._connections[conn.id] = conn
        self.empty.clear()
        metrics.CONNECTIONS.set(len(self._connections))

    async def join(
        self,
        conn: Connection,
        group: str,
        since: Since | None = None,
        on_joined: Callable[[Joined], object] = lambda joined: None,
    ) -> Joined:
        """Add `conn` to `group`; the first local member subscribes the pod. If the broker cannot
        confirm that (BrokerUnavailable), nothing was recorded and the error propagates. For a
        group with history: with `since`, what `conn` missed is sent first if history still holds
        all of it (else nothing of it); with the `latest` rule, the latest message is sent first.
        `on_joined` runs once the join took effect, before any message of the group is offered to
        `conn` (the endpoint sends its welcome or its ack there)."""
        channel = channels.group(group)
        if channel in conn.groups:
            joined = Joined()
            on_joined(joined)
            return joined
        if len(conn.groups) >= self._max_groups:
            raise TooManyGroups(f"a connection may join at most {self._max_groups} groups")
        rule = self._rules.history_for(group)
        members = await self._subscribed(channel, rule)
        if rule is not None:
            joined = await self._join_history(conn, group, channel, rule, since, on_joined)
        else:
            members.add(conn)
            conn.groups.add(channel)
            joined = Joined()
            on_joined(joined)
        if self._presence is not None and channel in conn.groups:
            self._presence.joined(conn, channel)
        return joined

    async def _subscribed(self, channel: str, rule: GroupRule | None) -> set[Connection]:
        """The members of `channel`, subscribing the pod first if it has none."""
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
                    if rule is not None:
                        self._sequencer.track(channel, rule.history)
        return members

    async def _join_history(
        self,
        conn: Connection,
        group: str,
        channel: str,
        rule: GroupRule,
        since: Since | None,
        on_joined: Callable[[Joined], object],
    ) -> Joined:
        """Join a group that keeps history: read where it stands (a group with none yet begins its
        epoch now) and, with `since`, what `conn` missed, or with the `latest` rule its latest
        message; send that first. Live messages for `conn` are held meanwhile and merged by offset
        afterwards, so none is lost or sent twice at the seam."""
        held: list[Envelope] = []
        self._held.setdefault(channel, {})[conn] = held
        self._members[channel].add(conn)
        conn.groups.add(channel)
        history: History | None = None
        purpose = "recovery" if since is not None else "latest" if rule.latest else "position"
        try:
            metrics.HISTORY_READS.labels(purpose).inc()
            if since is not None:
                history = await self._broker.history(channel, since.offset, rule.history)
            else:
                start = Retention(rule.history, rule.ttl)
                history = await self._broker.history(channel, None, 1 if rule.latest else 0, start)
        except BrokerUnavailable:
            pass
        finally:
            joining = self._release(channel, conn, held)
        if not joining:  # it left, or its socket went, while history was read (and may be back)
            return Joined()
        if history is not None:
            self._sequencer.begin(channel, history.epoch, history.top)
        reason = _unrecoverable(since, history) if since is not None else None
        entries = history.entries if history is not None and reason is None else []
        epoch = history.epoch if history is not None else ""
        position = Position(epoch, history.top) if history is not None and epoch else None
        if since is None:
            joined = Joined(position)
        else:
            metrics.RECOVERIES.labels(reason or "recovered").inc()
            joined = Joined(position, reason is None, reason)
        on_joined(joined)
        for offset, frame in entries:
            conn.offer(group_frame(group, frame, epoch, offset) if conn.v1 else frame)
        metrics.RECOVERED_MESSAGES.inc(len(entries))
        last = entries[-1][0] if entries else (since.offset if since is not None and reason is None else 0)
        self._flush(conn, group, held, epoch, last)
        return joined

    def _release(self, channel: str, conn: Connection, held: list[Envelope]) -> bool:
        """Stop holding live messages for `conn` in `held` (it joined, or gave up). False when that
        was no longer this join's to do: `conn` left meanwhile, and a join since holds its own."""
        waiting = self._held.get(channel, {})
        joining = waiting.get(conn) is held
        if joining:
            del waiting[conn]
        if not waiting:
            self._held.pop(channel, None)
        return joining

    @staticmethod
    def _flush(conn: Connection, group: str, held: list[Envelope], epoch: str, last: int) -> None:
        """Offer what was held for `conn`, but what history already gave it (epoch, up to last). A
        message without a position (a Channels app's, service/broker/channels_pubsub.py) is never
        one of those, also when the join found no history and so no epoch ("")."""
        for envelope in held:
            if envelope.offset and envelope.epoch == epoch and envelope.offset <= last:
                continue  # the seam: history gave it already
            if conn.v1:
                conn.offer(group_frame(group, envelope.frame, envelope.epoch, envelope.offset))
            else:
                conn.offer(envelope.frame)

    async def leave(self, conn: Connection, group: str) -> None:
        """Remove `conn` from `group`; the last local member unsubscribes the pod."""
        await self._leave(conn, channels.group(group))

    async def _leave(self, conn: Connection, channel: str) -> None:
        conn.groups.discard(channel)
        waiting = self._held.get(channel)
        if waiting is not None:
            waiting.pop(conn, None)
        members = self._members.get(channel)
        if members is None or conn not in members:
            return
        members.discard(conn)
        if self._presence is not None:
            self._presence.left(conn, channel)
        if members:
            return
        async with self._locks.hold(channel):
            if self._members.get(channel) is members and not members:
                try:
                    await self._broker.unsubscribe(channel)
                finally:
                    del self._members[channel]
                    self._sequencer.forget(channel)
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

    async def publish(self, group: str, frame: str, key: str | None = None) -> Published:
        """Send `frame` to every member of `group` on every pod. A group with history gets it
        stored with a position; `key` (else a fresh one, for the broker's own retries) makes a
        retried publish stored once."""
        envelope = Envelope(channels.group(group), frame, time.time())
        rule = self._rules.history_for(group)
        if rule is None:
            return Published(await self._broker.publish(envelope))
        retention = Retention(rule.history, rule.ttl)
        appended = await self._broker.append(envelope, retention, key or secrets.token_urlsafe(9))
        return Published(appended.pods, appended.position, appended.duplicate)

    async def send_direct(self, channel_id: str, frame: str) -> int:
        """Send `frame` to one connection, on whichever pod holds it; returns the pods reached."""
        channel = channels.pod(pod_of(channel_id))
        return await self._broker.publish(Envelope(channel, frame, time.time(), target=channel_id))

    async def run(self) -> None:
        """Deliver everything the broker receives to local members, until the broker closes."""
        try:
            async for envelope in self._broker.messages():
                try:
                    self._deliver(envelope)
                except Exception:  # a bug here must not stop delivery for everyone else
                    log.exception("hub.deliver_failed", channel_kind=envelope.channel[:1])
        finally:
            self._sequencer.stop()

    def _deliver(self, envelope: Envelope) -> None:
        if envelope.target:
            conn = self._connections.get(envelope.target)
            if conn is None:
                metrics.SEND_QUEUE_DROPPED.labels("unknown_channel").inc()
                if envelope.command:
                    metrics.CONTROL_COMMANDS.labels("unknown_channel").inc()
            elif envelope.command:
                self._tasks.add(task := asyncio.get_running_loop().create_task(self._control(conn, envelope)))
                task.add_done_callback(self._tasks.discard)
            elif conn.offer(envelope.frame):
                metrics.MESSAGES_SENT.inc()
            return
        if envelope.event:
            self._fan_out_event(envelope)
        elif envelope.offset:
            self._sequencer.accept(envelope)  # in order, once; it calls _fan_out
        elif envelope is RESYNC:
            self._sequencer.resync()
        else:
            self._fan_out(envelope)

    async def _control(self, conn: Connection, envelope: Envelope) -> None:
        """A backend's group change for one connection (the Django layer's group_add/discard)."""
        verb, _, group = envelope.command.partition(" ")
        metrics.CONTROL_COMMANDS.labels(await self.change(conn, verb, group)).inc()

    async def change(self, conn: Connection, verb: str, group: str) -> str:
        """Join (`verb` "join") or leave `group` for `conn` on a backend's behalf, in order with the
        connection's other such changes; returns "joined", "left" or "refused"."""
        if GROUP_NAME.fullmatch(group) is None:
            return "refused"
        try:
            async with self._locks.hold("conn " + conn.id):  # one connection's changes in order
                if verb == "join":
                    await self.join(conn, group)
                    return "joined"
                await self.leave(conn, group)
                return "left"
        except (TooManyGroups, BrokerUnavailable) as exc:
            log.warning("hub.control_refused", conn_id=conn.id, verb=verb, error=type(exc).__name__)
            return "refused"

    def _fan_out_event(self, envelope: Envelope) -> None:
        """A presence event: to v1 members only. A seed client would take it for a message."""
        sent = 0
        for conn in self._members.get(envelope.channel, ()):
            if conn.v1:
                sent += conn.offer(envelope.frame)
        metrics.PRESENCE_EVENTS.inc(sent)

    def _fan_out(self, envelope: Envelope) -> None:
        members = self._members.get(envelope.channel)
        if not members:
            listener = self._listeners.get(envelope.channel)
            if listener is not None:
                listener(envelope)
            return
        started = time.perf_counter()
        frame = envelope.frame
        v1_frame = None  # the v1 form ({"group": G, ...}), built once if anyone needs it
        held = self._held.get(envelope.channel)
        sent = 0
        # offer() never awaits and never changes membership, so the set can be walked in place.
        for conn in members:
            if held is not None and conn in held:
                held[conn].append(envelope)  # mid-recovery: merged once history has been sent
            elif conn.v1:
                if v1_frame is None:
                    group = channels.group_of(envelope.channel)
                    v1_frame = group_frame(group, frame, envelope.epoch, envelope.offset)
                sent += conn.offer(v1_frame)
            else:
                sent += conn.offer(frame)
        finished = time.perf_counter()
        count = len(members)
        metrics.MESSAGES_SENT.inc(sent)  # dropped offers are counted in relay_send_queue_dropped_total
        metrics.FANOUT_RECIPIENTS.observe(count)
        metrics.LOCAL_FANOUT_DURATION.observe(finished - started)
        if envelope.sent_at:  # 0 for a message filled in from history
            metrics.GROUP_FANOUT_LATENCY.observe(time.time() - envelope.sent_at)


def _unrecoverable(since: Since, history: History | None) -> str | None:
    """Why a member at `since` cannot be given everything it missed from `history`, or None."""
    if history is None:
        return "unavailable"
    if history.epoch != since.epoch or since.offset > history.top:
        return "epoch_changed"
    if since.offset == history.top:
        return None  # nothing was missed
    entries = history.entries
    if not entries or entries[0][0] != since.offset + 1 or entries[-1][0] != history.top:
        return "trimmed"
    return None

"""Presence on this pod: who of its members counts in which group, kept in the broker (docs/presence.md).

The hub tells `Presence` when a connection joins or leaves a group whose rule keeps presence
(service/rules.py); nothing here is awaited by the hub, so presence never holds up a join or a
message. A writer task sends the changes queued in one event-loop turn as one broker call per group
(service/broker/presence.py: one atomic step each, all of them pipelined), then the next turn's.
Every third of RELAY_PRESENCE_TTL a refresher pushes back the expiry of every local entry, one call
per group and batch of REFRESH_BATCH ids: what the store no longer holds (lost in an outage, or to a
Redis restarted empty) is added again, and departures that could not be written are sent again with
it. A failed write is counted (`relay_presence_failures_total`) and logged, never raised: a
connection outlives a Redis outage, and its presence is put right by the next refresh. On stop
(the drain's end) every entry still here is removed at once.

For groups with events, a user's leave is due RELAY_PRESENCE_GRACE after their last connection went:
the pod that saw it go asks the store to settle the group then (another pod's refresh would too, if
this one is gone), so a reload, or a pod's whole reconnect storm, within the grace is no leave and no
join at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field

import orjson
import structlog

from service import channels, metrics
from service.broker import Arrival, Broker, BrokerUnavailable, PresenceBatch, PresenceTerms, Present
from service.config import Settings
from service.connection import Connection
from service.rules import GroupRule, GroupRules

log = structlog.get_logger("relay.presence")

REFRESH_BATCH = 1000  # connection ids per refresh call: one FCALL each
SETTLE_LATE = 0.05  # seconds past the grace before the pod asks the store to settle a group


class PresenceOff(Exception):
    """The group's rule keeps no presence (or no rule matches it)."""


def answer(group: str, mode: str, present: Present) -> dict[str, object]:
    """What the v1 `presence` request's ack carries and `GET /api/presence/<group>` answers."""
    body: dict[str, object] = {
        "group": group,
        "mode": mode,
        "connections": present.connections,
        "users": present.users,
    }
    if mode == "full":
        body["members"] = [
            {"user": m.user, "connections": m.connections, "claims": _object(m.claims)}
            for m in present.members
        ]
        body["truncated"] = present.truncated
    return body


@dataclass
class _Changes:
    """What one group's next write carries: departures are applied before arrivals, so a connection
    that leaves and joins again within one batch ends present, and one that joins and leaves ends
    absent (it is no longer among the arrivals)."""

    arrivals: dict[str, Arrival] = field(default_factory=dict)
    departures: set[str] = field(default_factory=set)


def _object(text: str) -> object:
    """Stored claims as an object ({} if the store holds anything else: it is shared)."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


class Presence:
    """This pod's part of every group's presence."""

    def __init__(self, broker: Broker, rules: GroupRules, settings: Settings) -> None:
        self._broker = broker
        self._rules = rules
        self._ttl = settings.presence_ttl
        self._grace = settings.presence_grace
        self.max_members = settings.presence_max_members
        self._claims_bytes = settings.presence_claims_bytes
        self._local: dict[str, dict[str, Arrival]] = {}  # group channel -> conn id -> its entry
        self._pending: dict[str, _Changes] = {}  # group channel -> changes not yet sent
        self._retry: dict[str, set[str]] = {}  # departures whose write failed: sent again
        self._settle_at: dict[str, float] = {}  # group channel -> when its last leave is due
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._wake = asyncio.Event()
        self._queued = 0  # changes queued so far; `_sent` of them have been answered
        self._sent = 0
        self._progress = asyncio.Condition()
        self._tasks: list[asyncio.Task[None]] = []

    def terms(self, rule: GroupRule) -> PresenceTerms:
        return PresenceTerms(self._ttl, self._grace, rule.presence_events)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._rules.rules and any(rule.keeps_presence for rule in self._rules.rules):
            self._tasks = [
                loop.create_task(self._write(), name="presence.write"),
                loop.create_task(self._refresh(), name="presence.refresh"),
            ]

    # --- what the hub tells --------------------------------------------------------------------

    def joined(self, conn: Connection, channel: str) -> None:
        """`conn` is now a member of `channel`'s group."""
        rule = self._rules.presence_for(channels.group_of(channel))
        if rule is None:
            return
        local = self._local.setdefault(channel, {})
        if conn.id in local:  # told twice (a join the hub abandoned in a leave-and-join race)
            return
        arrival = Arrival(conn.id, conn.sub or "", self._claims(conn, rule))
        local[conn.id] = arrival
        self._queue(channel).arrivals[conn.id] = arrival
        metrics.PRESENCE_ENTRIES.inc()

    def left(self, conn: Connection, channel: str) -> None:
        """`conn` is no longer a member of `channel`'s group (it left, or its socket went)."""
        local = self._local.get(channel)
        if local is None or local.pop(conn.id, None) is None:
            return
        if not local:
            del self._local[channel]
        changes = self._queue(channel)
        changes.arrivals.pop(conn.id, None)
        changes.departures.add(conn.id)
        metrics.PRESENCE_ENTRIES.dec()
        rule = self._rules.presence_for(channels.group_of(channel))
        if rule is not None and rule.presence_events:
            self._settle_later(channel)

    def _queue(self, channel: str) -> _Changes:
        self._queued += 1
        self._wake.set()
        changes = self._pending.get(channel)
        if changes is None:
            changes = self._pending[channel] = _Changes()
        return changes

    def _claims(self, conn: Connection, rule: GroupRule) -> str:
        """The rule's allow-listed claims of `conn`'s token as JSON, within RELAY_PRESENCE_CLAIMS_BYTES
        (claims that do not fit are left out, the last named first)."""
        shown = {name: conn.claims[name] for name in rule.presence_claims if name in conn.claims}
        while shown:
            try:
                text = orjson.dumps(shown).decode()
            except TypeError:  # orjson refuses what JSON allows but it cannot hold (an int past 64 bits)
                return "{}"
            if len(text.encode()) <= self._claims_bytes:
                return text
            shown.pop(next(reversed(shown)))
        return "{}"  # fits: RELAY_PRESENCE_CLAIMS_BYTES is at least 2

    def _settle_later(self, channel: str) -> None:
        """Ask the store to settle `channel`'s group once the grace of its latest leave has passed."""
        self._settle_at[channel] = time.monotonic() + self._grace + SETTLE_LATE
        if channel not in self._timers:
            loop = asyncio.get_running_loop()
            self._timers[channel] = loop.call_later(self._grace + SETTLE_LATE, self._settle, channel)

    def _settle(self, channel: str) -> None:
        del self._timers[channel]
        self._queue(channel)  # an empty change: the store announces the leaves now due
        due = self._settle_at.pop(channel, 0.0)
        later = due - time.monotonic()
        if later > 0.001:  # a leave came after the timer was set: settle again for it
            self._settle_at[channel] = due
            self._timers[channel] = asyncio.get_running_loop().call_later(later, self._settle, channel)

    # --- reads ----------------------------------------------------------------------------------

    async def read(self, group: str, limit: int | None = None) -> dict[str, object]:
        """The group's presence across every pod (`answer`'s shape): counts, and for a `full` rule
        up to `limit` members (at most RELAY_PRESENCE_MAX_MEMBERS, the default). This pod's changes
        queued before the call are written first. Raises PresenceOff and BrokerUnavailable."""
        rule = self._rules.presence_for(group)
        if rule is None:
            raise PresenceOff(group)
        await self.flush()
        listed = min(limit or self.max_members, self.max_members) if rule.presence == "full" else 0
        present = await self._broker.presence_read(channels.group(group), self.terms(rule), listed)
        return answer(group, rule.presence, present)

    async def flush(self) -> None:
        """Until every change queued so far has been written (or has failed)."""
        if not self._tasks:
            return
        wanted = self._queued
        async with self._progress:
            await self._progress.wait_for(lambda: self._sent >= wanted or not self._tasks)

    # --- the writer and the refresher ------------------------------------------------------------

    async def _write(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._pending = self._pending, {}
            upto = self._queued
            await asyncio.gather(
                *(
                    self._update(ch, list(c.arrivals.values()), sorted(c.departures))
                    for ch, c in batch.items()
                )
            )
            async with self._progress:
                self._sent = upto
                self._progress.notify_all()

    async def _update(
        self, channel: str, arrivals: list[Arrival], departures: list[str], refresh: Sequence[str] = ()
    ) -> None:
        """One write for one group; a failure is counted and logged, and put right later."""
        rule = self._rules.presence_for(channels.group_of(channel))
        if rule is None:
            return
        kind = "refresh" if refresh else "write"
        try:
            batch = PresenceBatch(arrivals, departures, refresh)
            missing = await self._broker.presence_update(channel, self.terms(rule), batch)
        except Exception as exc:  # BrokerUnavailable, or a bug: never the connection's problem
            metrics.PRESENCE_FAILURES.labels(kind).inc()
            if departures:
                self._retry.setdefault(channel, set()).update(departures)
            if not isinstance(exc, BrokerUnavailable):
                log.exception("presence.write_failed", kind=kind)
            else:
                log.warning("presence.write_failed", kind=kind, error=str(exc))
            return
        local = self._local.get(channel, {})
        lost = [local[conn_id] for conn_id in missing if conn_id in local]
        if lost:  # the store lost them (an outage, a Redis restarted empty): add them again
            metrics.PRESENCE_REPAIRED.inc(len(lost))
            changes = self._queue(channel)
            for arrival in lost:
                changes.arrivals.setdefault(arrival.conn_id, arrival)

    async def _refresh(self) -> None:
        interval = self._ttl / 3
        while True:
            await asyncio.sleep(interval)
            await self.refresh()

    async def refresh(self) -> None:
        """Push back the expiry of every entry this pod holds, one call per group and batch of
        REFRESH_BATCH ids, and send again the departures that failed; what the store lost is
        queued to be added again."""
        calls: list[Awaitable[None]] = []
        retry, self._retry = self._retry, {}
        for channel in set(self._local) | set(retry):
            ids = list(self._local.get(channel, ()))
            again = sorted(retry.get(channel, ()))
            if not ids:
                calls.append(self._update(channel, [], again))
            for start in range(0, len(ids), REFRESH_BATCH):
                calls.append(self._update(channel, [], again, ids[start : start + REFRESH_BATCH]))
                again = []
        await asyncio.gather(*calls)

    async def stop(self, timeout: float) -> None:
        """Remove every entry this pod still holds, at once (the drain's end), then stop."""
        if not self._tasks:
            return
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for channel, local in list(self._local.items()):
            changes = self._queue(channel)
            for conn_id in local:
                changes.arrivals.pop(conn_id, None)
                changes.departures.add(conn_id)
            metrics.PRESENCE_ENTRIES.dec(len(local))
        self._local.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.flush(), timeout)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

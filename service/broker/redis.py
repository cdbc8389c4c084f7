"""RedisBroker: the pods' shared bus over Redis pub/sub (one server, Sentinel, or Cluster shards).

Per primary the link holds two connections: one for commands (pipelined: every publish queued in
one event-loop turn leaves in one write; replies come back in order, so per-publisher order holds)
and one pub/sub connection, read by a protocol callback that turns each chunk into envelopes.
A supervisor task opens the link, subscribes every wanted channel in batches (each confirmed within
`redis_timeout`), proves the link with a probe, then watches it: a closed socket, a protocol error,
a probe that does not come back within `redis_timeout` after `redis_probe_interval` of silence, a
publish left unanswered as long, or a Sentinel master that is no longer one, all end the link; it is
reopened with jittered exponential backoff. The supervisor survives any error (logged, counted,
retried), and `alive` turns false if it ever stops, so liveness fails instead of a pod that looks
healthy and never reconnects.

In a cluster, a MOVED reply refreshes the slot map and the command is sent again; ASK sends it once
to the importing node after ASKING, as the Cluster spec says; new primaries are connected and the
subscriptions of moved slots follow them, while the rest of the link carries on. Pub/sub is
at-most-once: what cannot be carried is counted in `relay_broker_lost_total` and logged once per
outage. See docs/redis.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import structlog

from service import metrics
from service.broker import (
    RESYNC,
    Appended,
    BrokerUnavailable,
    Envelope,
    History,
    Position,
    PresenceBatch,
    PresenceTerms,
    Present,
    Retention,
    history,
    presence,
    wire,
)
from service.broker.link import NOT_HERE, _Link, _Node, error_kind, redirect
from service.broker.resp import Address, ConnectionLost, ConnectOptions, Push, ReplyError, RespConnection
from service.broker.topology import Topology

log = structlog.get_logger("relay.broker")

BACKOFF_MIN = 0.05  # first retry delay; doubles up to redis_backoff_max
STABLE_AFTER = 2.0  # a link that lived this long resets the backoff
SUBSCRIBE_BATCH = 1000  # channels per SUBSCRIBE, and per batch confirmed within redis_timeout
SUBSCRIBE_WINDOW = 8  # batches in flight at once
MAX_BACKLOG = 200_000  # envelopes read from Redis but not yet taken by the hub
MAX_REDIRECTS = 5  # MOVED/ASK hops for one command before it is given up


class RedisBroker:
    """A pod's link to Redis (see the module docstring). Satisfies `service.broker.Broker`."""

    def __init__(
        self,
        topology: Topology,
        options: ConnectOptions,
        *,
        pod_id: str,
        prefix: str = "relay",
        probe_interval: float = 5.0,
        backoff_max: float = 5.0,
        announce: dict[bytes, bytes] | None = None,
        naming: Callable[[str], bytes] | None = None,
        decode: Callable[[str, bytes], Envelope] = wire.decode,
        history: bool = True,
    ) -> None:
        self._topology = topology
        self._options = options
        self._pod_id = pod_id
        self._prefix = prefix.encode() + b":"
        self._probe_base = self._prefix + b"probe:" + pod_id.encode()
        self._timeout = options.timeout
        self._probe_interval = probe_interval
        self._backoff_max = backoff_max
        self._publish = b"SPUBLISH" if topology.sharded else b"PUBLISH"
        self._subscribe = (
            (b"SSUBSCRIBE", b"SUNSUBSCRIBE") if topology.sharded else (b"SUBSCRIBE", b"UNSUBSCRIBE")
        )
        self._wanted: dict[bytes, str] = {}  # Redis channel -> logical channel
        self._link: _Link | None = None
        self._up = asyncio.Event()
        self._down = asyncio.Event()  # set from a link's failure until the next link is up
        self._connecting = False
        self._closed = False
        self._supervisor: asyncio.Task[None] | None = None
        self._inbox: asyncio.Queue[list[Envelope] | None] = asyncio.Queue()
        self._backlog = 0
        self._down_since: float | None = None  # monotonic start of the current outage
        self._refused = 0  # publishes refused during the current outage
        self._in_flight_lost = 0
        self._library_refused = False
        self._announce = announce or {}  # written under the prefix on every link: the group rules
        # How logical channels are named in Redis, and what a payload becomes: relay's own, unless
        # this link listens to another system's channels (service/broker/channels_pubsub.py).
        self._name = naming or (lambda channel: self._prefix + channel.encode())
        self._decode = decode
        self._history = history  # load relay's functions library on each primary

    # --- Broker ---------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._link is not None

    @property
    def alive(self) -> bool:
        supervisor = self._supervisor
        return self._closed or supervisor is None or not supervisor.done()

    async def publish(self, envelope: Envelope) -> int:
        channel = self._name(envelope.channel)
        started = time.perf_counter()
        reached = await self.command(channel, self._publish, channel, wire.encode(envelope))
        metrics.REDIS_PUBLISH_DURATION.observe(time.perf_counter() - started)
        return int(reached)

    async def command(self, key: bytes, *args: bytes | str | int, idempotent: bool = False) -> Any:
        """Run one command on the primary that owns `key` (its slot, in a cluster) and return the
        reply. MOVED refreshes the slot map and sends it again; ASK sends it once to the importing
        node after ASKING; an error that means "not carried out here" (READONLY, LOADING,
        CLUSTERDOWN, MASTERDOWN) ends the link and sends it once more on the next, and so does a
        history function missing from a primary (relay's library is loaded again on connecting).
        An `idempotent` command whose outcome the lost link left unknown is sent once more on the
        next link too. BrokerUnavailable when it cannot be carried; the loss is counted."""
        link = await self._usable_link()
        ask: Address | None = None
        resent = False
        for _ in range(MAX_REDIRECTS):
            try:
                if ask is not None:
                    node = await self._node(link, ask)
                    node.pub.send(b"ASKING").add_done_callback(_ignore)  # same write as the command
                else:
                    node = await self._node(link, self._topology.route(key))
                return await node.pub.send(*args)
            except ConnectionLost:
                next_link = await self._next_link(link) if idempotent and not resent else None
                if next_link is not None:
                    metrics.BROKER_RESENT.inc()
                    link, resent, ask = next_link, True, None
                    continue
                self._in_flight_lost += 1
                metrics.BROKER_LOST.labels("in_flight").inc()
                raise BrokerUnavailable("the Redis link was lost before Redis answered") from None
            except ReplyError as exc:
                moved = redirect(exc, node.address)
                if moved is not None and moved[0] == "MOVED":
                    self._topology.moved(moved[1], moved[2])
                    self._refresh_soon(link)  # one slot told us; the others probably moved too
                    ask = None
                    continue
                if moved is not None:  # ASK: this once, to the importing node; the map stands
                    ask = moved[2]
                    continue
                reason = NOT_HERE.get(error_kind(exc))
                if reason is not None:
                    link.fail(reason)  # this link cannot carry it: rebuild it, whatever happens next
                    next_link = None if resent else await self._next_link(link)
                    if next_link is not None:
                        metrics.BROKER_RESENT.inc()
                        link, resent, ask = next_link, True, None
                        continue
                metrics.BROKER_LOST.labels("rejected").inc()
                raise BrokerUnavailable(f"Redis refused the command: {exc}") from None
        metrics.BROKER_LOST.labels("rejected").inc()
        raise BrokerUnavailable(f"Redis redirected the command more than {MAX_REDIRECTS} times")

    async def append(self, envelope: Envelope, retention: Retention, key: str) -> Appended:
        stream, meta, seen = history.keys(self._prefix, envelope.channel)
        channel = self._name(envelope.channel)
        argv = (
            channel,
            self._publish,
            envelope.frame,
            repr(envelope.sent_at),
            retention.size,
            max(1, int(retention.ttl * 1000)),
            secrets.token_hex(6),  # the epoch, should this message begin one
            key,
        )
        started = time.perf_counter()
        epoch, offset, pods = await self.command(
            channel, b"FCALL", history.APPEND, 3, stream, meta, seen, *argv,
            idempotent=True,  # the idempotency key makes a second try store it once
        )  # fmt: skip
        metrics.REDIS_PUBLISH_DURATION.observe(time.perf_counter() - started)
        return Appended(Position(epoch.decode(), int(offset)), max(0, int(pods)), duplicate=int(pods) < 0)

    async def history(
        self, channel: str, after: int | None, limit: int, start: Retention | None = None
    ) -> History:
        stream, meta, seen = history.keys(self._prefix, channel)
        begin = (secrets.token_hex(6), max(1, int(start.ttl * 1000))) if start is not None else ("", "")
        argv = ("" if after is None else after, limit, *begin)
        reply = await self.command(stream, b"FCALL", history.READ, 3, stream, meta, seen, *argv)
        return history.parse_read(reply, newest_first=after is None)

    def _presence_call(self, function: bytes, channel: str, terms: PresenceTerms) -> list[bytes | str | int]:
        """FCALL `function` with the group's keys and the ARGV both presence functions begin with."""
        keys = presence.keys(self._prefix, channel)
        return [
            b"FCALL",
            function,
            len(keys),
            *keys,
            channel[3:-1],  # the group name (`g:{G}`)
            self._name(channel),
            self._publish,
            repr(time.time()),
            max(1, int(terms.ttl * 1000)),
            max(0, int(terms.grace * 1000)),
            b"1" if terms.events else b"0",
        ]

    async def presence_update(self, channel: str, terms: PresenceTerms, batch: PresenceBatch) -> list[str]:
        args = self._presence_call(presence.UPDATE, channel, terms)
        args += (len(batch.arrivals), len(batch.departures))
        for arrival in batch.arrivals:
            args += (arrival.conn_id, arrival.user, arrival.claims)
        args += batch.departures
        args += batch.refresh
        # Idempotent: sent twice, a batch leaves the same state (an arrival already there is kept).
        missing = await self.command(self._name(channel), *args, idempotent=True)
        return [conn_id.decode() for conn_id in missing]

    async def presence_read(self, channel: str, terms: PresenceTerms, limit: int) -> Present:
        args = self._presence_call(presence.READ, channel, terms)
        reply = await self.command(self._name(channel), *args, limit, idempotent=True)
        return presence.parse_read(reply, limit)

    def _deny_key(self, key: str) -> bytes:
        # Hashed: a `sub` may hold any characters and any length; the key stays short and plain.
        return self._prefix + b"deny:" + hashlib.sha256(key.encode()).hexdigest()[:32].encode()

    async def deny(self, key: str, revoked_at: float, seconds: float) -> None:
        name = self._deny_key(key)
        ms = max(1, int(seconds * 1000))
        await self.command(name, b"SET", name, repr(revoked_at), b"PX", ms, idempotent=True)

    async def denied(self, key: str) -> float | None:
        name = self._deny_key(key)
        value = await self.command(name, b"GET", name, idempotent=True)
        return float(value) if value is not None else None

    async def subscribe(self, *channels: str) -> None:
        """Returns once Redis confirmed. While the link is down (after a first connect has had up to
        `redis_timeout` to succeed) raises BrokerUnavailable; the channels stay wanted either way,
        so the next link subscribes them: a caller that gives up unsubscribes."""
        names = [self._name(c) for c in channels]
        self._wanted.update(zip(names, channels, strict=True))
        metrics.REDIS_SUBSCRIPTIONS.set(len(self._wanted))
        self._start()
        link = self._link
        if link is None and self._connecting:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._up.wait(), self._timeout)
            link = self._link
        for _ in range(2):  # once more if a slot moved under the first attempt
            if link is None or link.failed:
                break
            if await self._subscribe_on(link, names):
                return
            refreshing = link.refreshing
            if refreshing is None or refreshing.done():
                link.fail("subscribe_timeout")  # Redis did not confirm: rebuild the link
                break
            # Whatever became of the refresh (it may be cancelled, should the link end meanwhile):
            # only the caller's own cancellation may cancel the caller.
            await asyncio.wait([refreshing])
        raise BrokerUnavailable("the Redis link is down: the subscription could not be confirmed")

    async def unsubscribe(self, *channels: str) -> None:
        names = [self._name(c) for c in channels]
        for name in names:
            self._wanted.pop(name, None)
        metrics.REDIS_SUBSCRIPTIONS.set(len(self._wanted))
        link = self._link
        if link is None:
            return  # the next link subscribes only what is wanted
        for node in list(link.nodes.values()):
            asked = [n for n in names if n in node.subscribed]
            if asked and not await self._sync(link, node, (), asked):
                link.fail("subscribe_timeout")
                return

    async def messages(self) -> AsyncIterator[Envelope]:
        self._start()
        while (batch := await self._inbox.get()) is not None:
            self._backlog -= len(batch)
            for envelope in batch:
                yield envelope

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        link = self._link
        if link is not None:
            link.fail("closed")  # the supervisor wakes, sees _closed and returns
        if self._supervisor is not None:
            # Cancel as well, for an attempt under way; the supervisor also checks _closed after
            # each step, because asyncio.wait_for in Python 3.11 can swallow a cancellation.
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        if link is not None:
            await link.wait_closed()
        self._link = None
        metrics.REDIS_UP.set(0)
        self._inbox.put_nowait(None)

    # --- the supervisor: open, watch, reopen ---------------------------------------------------

    def _start(self) -> None:
        if self._supervisor is None and not self._closed:
            self._connecting = True
            self._supervisor = asyncio.get_running_loop().create_task(self._supervise(), name="redis.link")
            self._supervisor.add_done_callback(self._supervisor_ended)

    def _supervisor_ended(self, task: asyncio.Task[None]) -> None:
        if not self._closed:  # it must never end while the broker is open: liveness now fails
            error = None if task.cancelled() else task.exception()
            log.error("broker.supervisor_stopped", error=type(error).__name__ if error else "cancelled")

    async def _supervise(self) -> None:
        delay = BACKOFF_MIN
        failures = 0
        while not self._closed:
            try:
                self._connecting = True
                try:
                    link = await self._open()
                finally:
                    self._connecting = False
                if self._closed:
                    link.fail("closed")
                    await link.wait_closed()
                    return
                opened = time.monotonic()
                self._went_up(link, failures)
                failures = 0
                reason = await asyncio.shield(link.broken)  # cancelling the supervisor must not end it
                self._went_down(link, reason)
                if time.monotonic() - opened > STABLE_AFTER:
                    delay = BACKOFF_MIN
                continue
            except asyncio.CancelledError:
                if self._closed:
                    return
                raise
            except (OSError, TimeoutError, ConnectionLost, ReplyError) as exc:
                failures += 1
                metrics.REDIS_LINK_FAILURES.labels("connect_failed").inc()
                if failures == 1:
                    log.warning("broker.connect_failed", error=str(exc) or type(exc).__name__, retry_in=delay)
            except Exception:  # a bug, or a reply nobody foresaw: never the end of the link
                failures += 1
                log.exception("broker.supervisor_error", retry_in=delay)
                if self._link is not None:
                    self._went_down(self._link, "error")  # counts it
                else:
                    metrics.REDIS_LINK_FAILURES.labels("error").inc()
            await asyncio.sleep(random.uniform(delay / 2, delay))
            delay = min(delay * 2, self._backoff_max)

    async def _open(self) -> _Link:
        link = _Link()
        try:
            addresses = await self._topology.discover(self._options)
            for address in addresses:
                await self._open_node(link, address)
            if self._topology.checks_role:
                first = link.nodes[addresses[0]]
                role = await first.pub.call(b"ROLE", timeout=self._timeout)
                first.role_checked = time.monotonic()
                if role[0] != b"master":
                    raise ConnectionLost(f"{addresses[0]} is not a master yet")
            for name, value in self._announce.items():
                key = self._prefix + name
                await link.nodes[self._topology.route(key) or addresses[0]].pub.call(
                    b"SET", key, value, timeout=self._timeout
                )
            if not await self._reconcile(link):
                raise ConnectionLost(_unconfirmed(link))
            await asyncio.wait_for(
                asyncio.gather(*(self._probe(node) for node in link.nodes.values())), self._timeout
            )
            if not await self._reconcile(link):  # channels wanted or dropped while the probe was out
                raise ConnectionLost(_unconfirmed(link))
            if link.failed:
                raise ConnectionLost(_unconfirmed(link))
        except BaseException:
            link.fail("closed")
            await link.wait_closed()
            raise
        return link

    async def _open_node(self, link: _Link, address: Address) -> _Node:
        node = _Node(address, self._topology.probe_channel(self._probe_base, address))
        name = f"relay:{self._pod_id}"
        lost = self._on_lost(link, node)
        try:
            node.pub = await RespConnection.open(address, self._options, name=name, on_lost=lost)
            node.sub = await RespConnection.open(
                address, self._options, name=name, on_push=self._on_push(link, node), on_lost=lost
            )
        except BaseException:
            node.close()
            raise
        link.nodes[address] = node
        try:
            if self._history:
                await self._load_library(node)
            confirmed = await self._sync(link, node, [node.probe_channel], ())
        except BaseException:
            # Closed here: should the link have failed while this node was being connected,
            # link.fail closed only the nodes it had then, and this one would be left open.
            link.retire(node)
            raise
        if not confirmed:
            link.retire(node)
            raise ConnectionLost(f"{address} did not confirm the probe channel")
        return node

    async def _load_library(self, node: _Node) -> None:
        """relay's history and presence functions, on this primary (FUNCTION LOAD REPLACE: idempotent, and a
        newer pod's library of the same version is the same code). A Redis before 7.0 has no
        functions: relay runs without history there, and says so once."""
        try:
            for library in (history.LIBRARY, presence.LIBRARY):
                await node.pub.call(b"FUNCTION", b"LOAD", b"REPLACE", library, timeout=self._timeout)
        except ReplyError as exc:
            if not self._library_refused:
                self._library_refused = True
                log.error("broker.history_unavailable", error=str(exc)[:200], needs="Redis 7.0+ functions")

    async def _node(self, link: _Link, address: Address | None) -> _Node:
        """The link's node for `address`, connected now if the slot map has just named it."""
        if address is None:  # only before the first slot map: nothing to route by
            metrics.BROKER_LOST.labels("link_down").inc()
            raise BrokerUnavailable("no slot map yet")
        node = link.nodes.get(address)
        if node is not None:
            return node
        task = link.opening.get(address)
        if task is None:
            task = link.opening[address] = asyncio.get_running_loop().create_task(
                asyncio.wait_for(self._open_node(link, address), self._timeout)
            )
            task.add_done_callback(lambda _: link.opening.pop(address, None))
        # Not `shield`: the link's end cancels the opening, and that must not cancel this caller.
        await asyncio.wait([task])
        try:
            return task.result()
        except (OSError, TimeoutError, ConnectionLost, ReplyError, asyncio.CancelledError) as exc:
            metrics.BROKER_LOST.labels("link_down").inc()
            why = "the link ended" if isinstance(exc, asyncio.CancelledError) else exc
            raise BrokerUnavailable(f"cannot reach the primary at {address}: {why}") from None

    def _refresh_soon(self, link: _Link) -> None:
        if link.failed or not self._topology.sharded:
            return
        if link.refreshing is None or link.refreshing.done():
            link.refreshing = asyncio.get_running_loop().create_task(
                self._refresh(link), name="redis.refresh"
            )

    async def _refresh(self, link: _Link) -> None:
        """Follow a changed slot map: ask CLUSTER SLOTS, connect new primaries, retire nodes that
        own nothing now, move the subscriptions. If that fails, the whole link is rebuilt."""
        try:
            async with asyncio.timeout(self._timeout * 2):
                addresses = await self._topology.discover(self._options)
                for address in addresses:
                    await self._node(link, address)
                for node in list(link.nodes.values()):
                    if node.address not in addresses:
                        link.retire(node)
                if not await self._reconcile(link):
                    raise ConnectionLost("Redis did not confirm the moved subscriptions in time")
            metrics.REDIS_SLOT_MAP_REFRESHES.inc()
            log.info("broker.slot_map_refreshed", nodes=[str(a) for a in addresses])
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # BrokerUnavailable, timeouts, a node that will not answer
            log.warning("broker.slot_map_refresh_failed", error=str(exc) or type(exc).__name__)
            link.fail("topology_changed")

    async def _usable_link(self) -> _Link:
        """The link, waiting up to `redis_timeout` for one while it is (re)connecting: a blip
        (a killed connection, a failover) costs the caller a short wait, not a refusal."""
        link = self._link
        if link is not None and link.failed and not self._closed:
            # Ended, and the supervisor has not yet replaced it: wait for the next link as for one
            # that is down, rather than send the command down a closed connection and lose it.
            link = await self._next_link(link)
        elif link is None and not self._closed:
            self._start()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._up.wait(), self._timeout)
            link = self._link
        if link is None:
            self._refused += 1
            metrics.BROKER_LOST.labels("link_down").inc()
            raise BrokerUnavailable("the Redis link is down")
        return link

    async def _next_link(self, old: _Link) -> _Link | None:
        """Wait, at most the Redis timeout, for a link other than `old` to be up."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._timeout):
                if self._link is old:  # the supervisor has not yet seen `old` fail
                    await self._down.wait()
                await self._up.wait()
        link = self._link
        return link if link is not None and link is not old else None

    def _went_up(self, link: _Link, failures: int) -> None:
        self._link = link
        self._down.clear()
        self._up.set()
        metrics.REDIS_UP.set(1)
        link.monitor = asyncio.get_running_loop().create_task(self._watch(link), name="redis.watch")
        nodes = [str(a) for a in link.nodes]
        if self._down_since is None:
            log.info("broker.connected", nodes=nodes, channels=len(self._wanted))
            self._count_losses_anew()
            return
        metrics.REDIS_RECONNECTS.inc()
        self._inbox.put_nowait([RESYNC])  # the hub reads history for what it may have missed
        self._backlog += 1
        log.warning(  # the one line per outage that says what was lost
            "broker.reconnected",
            nodes=nodes,
            outage_seconds=round(time.monotonic() - self._down_since, 3),
            failed_attempts=failures,
            publishes_refused=self._refused,
            publishes_in_flight_lost=self._in_flight_lost,
            channels=len(self._wanted),
        )
        self._down_since = None
        self._count_losses_anew()

    def _count_losses_anew(self) -> None:
        # Reset when a link comes up, not when it goes down: the publishes in flight when a link
        # dies fail before the supervisor hears of it, and belong to the outage that follows.
        self._refused = 0
        self._in_flight_lost = 0

    def _went_down(self, link: _Link, reason: str) -> None:
        link.fail(reason)
        if self._link is link:
            self._link = None
        self._up.clear()
        self._down.set()
        metrics.REDIS_UP.set(0)
        if reason == "closed" or self._closed:
            return
        metrics.REDIS_LINK_FAILURES.labels(reason).inc()
        self._down_since = time.monotonic()
        log.warning("broker.link_lost", reason=reason, nodes=[str(a) for a in link.nodes])

    # --- subscriptions -------------------------------------------------------------------------

    async def _subscribe_on(self, link: _Link, names: Sequence[bytes]) -> bool:
        """Subscribe `names` where they live now; True once every one is confirmed."""
        by_node: dict[Address | None, list[bytes]] = {}
        for name in names:
            by_node.setdefault(self._topology.route(name), []).append(name)
        try:
            nodes = [(await self._node(link, address), group) for address, group in by_node.items()]
        except BrokerUnavailable:
            return False
        results = await asyncio.gather(*(self._sync(link, node, group, ()) for node, group in nodes))
        return all(results)

    async def _reconcile(self, link: _Link) -> bool:
        """Until stable: each node subscribed to exactly the wanted channels it carries. False when
        Redis did not confirm in time (the caller ends the link)."""
        while not link.failed:
            plans: list[tuple[_Node, list[bytes], list[bytes]]] = []
            route = self._topology.route
            for node in list(link.nodes.values()):
                here = node.address
                missing = [c for c in self._wanted if c not in node.subscribed and route(c) == here]
                extra = [
                    c
                    for c in node.subscribed
                    if c != node.probe_channel and (c not in self._wanted or route(c) != here)
                ]
                if missing or extra:
                    plans.append((node, missing, extra))
            if not plans:
                return True
            results = await asyncio.gather(*(self._sync(link, n, sub, unsub) for n, sub, unsub in plans))
            refreshing = link.refreshing
            if refreshing is not None and not refreshing.done() and refreshing is not asyncio.current_task():
                await asyncio.wait([refreshing])  # the map is changing: plan again on the new one
                continue
            if not all(results):
                return False
        return False

    async def _sync(
        self, link: _Link, node: _Node, subscribe: Sequence[bytes], unsubscribe: Sequence[bytes]
    ) -> bool:
        """(Un)subscribe on one node in batches of SUBSCRIBE_BATCH channels, up to SUBSCRIBE_WINDOW
        batches in flight, each confirmed within `redis_timeout` of being awaited. True when every
        confirmation came; False when one did not (timed out, the slot moved, the link ended)."""
        window: deque[list[asyncio.Future[bool]]] = deque()
        for command, channels in zip(self._subscribe, (subscribe, unsubscribe), strict=True):
            for start in range(0, len(channels), SUBSCRIBE_BATCH):
                if link.failed:
                    return False
                batch = list(channels[start : start + SUBSCRIBE_BATCH])
                if command is self._subscribe[0]:
                    node.subscribed.update(batch)
                else:
                    node.subscribed.difference_update(batch)
                window.append([node.expect(c) for c in batch])
                self._write(node.sub, command, batch)
                if len(window) >= SUBSCRIBE_WINDOW and not await self._confirmed(window.popleft()):
                    return False
        while window:
            if not await self._confirmed(window.popleft()):
                return False
        return True

    async def _confirmed(self, waiters: list[asyncio.Future[bool]]) -> bool:
        try:
            return all(await asyncio.wait_for(asyncio.gather(*waiters), self._timeout))
        except TimeoutError:
            return False

    def _write(self, conn: RespConnection, command: bytes, channels: list[bytes]) -> None:
        if self._topology.sharded:  # one slot per SSUBSCRIBE: one channel per command
            for channel in channels:
                conn.write(command, channel)
            return
        conn.write(command, *channels)

    # --- probes, the watch, pushes --------------------------------------------------------------

    def _send_probe(self, node: _Node) -> str:
        nonce = secrets.token_hex(6)
        node.probe = (nonce, time.monotonic())
        node.pub.send(self._publish, node.probe_channel, wire.probe(nonce)).add_done_callback(_ignore)
        return nonce

    async def _probe(self, node: _Node) -> None:
        node.answered.clear()
        self._send_probe(node)
        await node.answered.wait()

    async def _check_master(self, link: _Link, node: _Node) -> None:
        """Sentinel, every probe interval, busy or idle: is this still the master? A demoted one
        still takes PUBLISH and serves its own subscribers, unheard by pods on the new master. Ask
        it (ROLE) and ask Sentinel (which names the new master at once; the old one may stay a
        master for many seconds before Sentinel reconfigures it)."""
        try:
            role = await node.pub.call(b"ROLE", timeout=self._timeout)
            if role[0] != b"master" or not await self._topology.confirm(node.address, self._options):
                link.fail("not_master")
        except (TimeoutError, ConnectionLost, ReplyError):
            pass  # the probe and the publish timeouts judge an unanswering link

    async def _watch(self, link: _Link) -> None:
        """Probe idle links and end a link whose probe or publishes go unanswered too long. A bug
        here ends the link (logged, counted as `error`) for the supervisor to open another, rather
        than leave it unwatched: a Redis that stopped answering would then go unnoticed."""
        try:
            await self._watch_nodes(link)
        except Exception:
            log.exception("broker.watch_error")
            link.fail("error")  # the supervisor counts it and opens the next link

    async def _watch_nodes(self, link: _Link) -> None:
        tick = max(0.01, min(self._probe_interval, self._timeout) / 4)
        while not link.failed:
            await asyncio.sleep(tick)
            now = time.monotonic()
            for node in list(link.nodes.values()):
                oldest = node.pub.oldest_pending()
                if node.probe is not None and now - node.probe[1] > self._timeout:
                    link.fail("probe_timeout")
                elif oldest is not None and now - oldest > self._timeout:
                    link.fail("publish_timeout")
                elif node.probe is None and now - node.sub.last_read >= self._probe_interval:
                    self._send_probe(node)
                if (
                    self._topology.checks_role
                    and now - node.role_checked >= self._probe_interval
                    and (node.checking is None or node.checking.done())
                ):
                    node.role_checked = now
                    node.checking = asyncio.get_running_loop().create_task(self._check_master(link, node))

    def _on_lost(self, link: _Link, node: _Node) -> Any:
        def lost(reason: str) -> None:
            if node.address not in link.nodes or link.nodes[node.address] is node:
                link.fail(reason)  # (a retired node is closed by relay first: it never gets here)

        return lost

    def _on_push(self, link: _Link, node: _Node) -> Any:
        wanted = self._wanted

        def on_push(pushes: list[Push]) -> None:
            envelopes: list[Envelope] = []
            for push in pushes:
                if isinstance(push, ReplyError):
                    self._push_error(link, node, push)
                    continue
                kind, channel, payload = push
                if kind == b"message" or kind == b"smessage":
                    logical = wanted.get(channel)
                    if logical is not None:
                        try:
                            envelopes.append(self._decode(logical, payload))
                        except wire.BadPayload:
                            metrics.BROKER_LOST.labels("undecodable").inc()
                    elif (
                        channel == node.probe_channel
                        and node.probe is not None
                        and wire.probe_nonce(payload) == node.probe[0]
                    ):
                        node.probe = None
                        node.answered.set()
                    continue
                if not node.settle(channel, True) and kind == b"sunsubscribe":
                    # Unasked: Redis moved the slot away. Follow the new map (the channel is
                    # subscribed on its new owner; what was published meanwhile is not recovered).
                    node.subscribed.discard(channel)
                    self._refresh_soon(link)
            if envelopes:
                self._enqueue(envelopes)

        return on_push

    def _push_error(self, link: _Link, node: _Node, error: ReplyError) -> None:
        """An error answering a (S)SUBSCRIBE. MOVED: the slot map is stale; the channel is given up
        here and resubscribed where it lives. Anything else (an ACL refusal, say) ends the link."""
        moved = redirect(error, node.address)
        if moved is None:
            log.error("broker.subscribe_refused", error=str(error)[:200])
            link.fail("subscribe_refused")
            return
        _, slot, address = moved
        self._topology.moved(slot, address)
        for channel in list(node.waiters):
            if self._topology.route(channel) == address:
                node.subscribed.discard(channel)
                node.settle(channel, False)
                break
        self._refresh_soon(link)

    def _enqueue(self, envelopes: list[Envelope]) -> None:
        if self._backlog + len(envelopes) > MAX_BACKLOG:
            metrics.BROKER_LOST.labels("backlog").inc(len(envelopes))
            return
        self._backlog += len(envelopes)
        self._inbox.put_nowait(envelopes)


def _ignore(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved, so asyncio does not log it; the watch judges the link


def _unconfirmed(link: _Link) -> str:
    """Why a link being opened is given up: it ended (a connection lost, a subscription refused),
    or Redis did not confirm its subscriptions in time."""
    if link.failed:
        return f"the link failed while it was being opened ({link.broken.result()})"
    return "Redis did not confirm the subscriptions in time"

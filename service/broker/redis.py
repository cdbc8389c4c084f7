"""RedisBroker: the pods' shared bus over Redis pub/sub (one server, Sentinel, or Cluster shards).

Per primary the link holds two connections: one for PUBLISH (pipelined: every publish queued in
one event-loop turn leaves in one write; replies come back in order, so per-publisher order holds)
and one pub/sub connection, read by a protocol callback that turns each chunk into envelopes.
A supervisor task opens the link, re-subscribes every wanted channel in batches, proves the link
with a probe, then watches it: a closed socket, a probe that does not come back within
`redis_timeout` after `redis_probe_interval` of silence, or a publish left unanswered as long,
all end the link; it is reopened with jittered exponential backoff. Pub/sub is at-most-once:
what cannot be carried is counted in `relay_broker_lost_total` and logged once per outage.
See docs/redis.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable
from typing import Any

import structlog

from service import metrics
from service.broker import BrokerUnavailable, Envelope, wire
from service.broker.resp import Address, ConnectionLost, ConnectOptions, Push, ReplyError, RespConnection
from service.broker.topology import Topology

log = structlog.get_logger("relay.broker")

BACKOFF_MIN = 0.05  # first retry delay; doubles up to redis_backoff_max
STABLE_AFTER = 2.0  # a link that lived this long resets the backoff
SUBSCRIBE_BATCH = 1000  # channels per SUBSCRIBE command when re-subscribing
MAX_BACKLOG = 200_000  # envelopes read from Redis but not yet taken by the hub


class _Node:
    """The link to one primary: a publish connection and a pub/sub connection."""

    def __init__(self, address: Address, probe_channel: bytes) -> None:
        self.address = address
        self.probe_channel = probe_channel
        self.pub: RespConnection
        self.sub: RespConnection
        self.subscribed: set[bytes] = set()  # asked of Redis on this link (probe channel included)
        self.probe: tuple[str, float] | None = None  # nonce and monotonic send time
        self.answered = asyncio.Event()  # set when the probe came back (or the link ended)


class _Link:
    """One life of the connection to Redis: from opening to the first failure. Never reused."""

    def __init__(self) -> None:
        self.nodes: list[_Node] = []
        self.broken: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.waiters: dict[bytes, deque[asyncio.Future[None]]] = {}
        self.monitor: asyncio.Task[None] | None = None
        self.failed = False

    def fail(self, reason: str) -> None:
        """End this link (idempotent): close every connection, release everyone waiting on it."""
        if self.failed:
            return
        self.failed = True
        if not self.broken.done():
            self.broken.set_result(reason)
        for node in self.nodes:
            node.answered.set()
        for conn in self.connections():
            conn.close()
        for waiters in self.waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)  # the channel stays wanted: the next link subscribes it
        self.waiters.clear()
        if self.monitor is not None and self.monitor is not asyncio.current_task():
            self.monitor.cancel()

    def connections(self) -> list[RespConnection]:
        return [c for n in self.nodes for c in (getattr(n, "pub", None), getattr(n, "sub", None)) if c]

    async def wait_closed(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(c.wait_closed() for c in self.connections())), 1.0)

    def expect(self, channel: bytes) -> asyncio.Future[None]:
        """A future resolved by Redis's next (un)subscribe confirmation for `channel`."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.setdefault(channel, deque()).append(waiter)
        return waiter


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

    # --- Broker ---------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._link is not None

    async def publish(self, envelope: Envelope, *, resend: bool = True) -> int:
        link = self._link
        if link is None and self._down_since is None:  # never connected yet: wait for the first link
            self._start()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._up.wait(), self._timeout)
            link = self._link
        if link is None:
            self._refused += 1
            metrics.BROKER_LOST.labels("link_down").inc()
            raise BrokerUnavailable("the Redis link is down")
        channel = self._prefix + envelope.channel.encode()
        node = link.nodes[self._topology.route(channel)]
        started = time.perf_counter()
        try:
            reached = await node.pub.send(self._publish, channel, wire.encode(envelope))
        except ConnectionLost:
            self._in_flight_lost += 1
            metrics.BROKER_LOST.labels("in_flight").inc()
            raise BrokerUnavailable("the Redis link was lost before Redis answered") from None
        except ReplyError as exc:
            moved = str(exc).startswith(("MOVED", "ASK"))
            if moved or str(exc).startswith("CLUSTERDOWN"):
                link.fail("topology_changed")
            if moved and resend and await self._next_link(link):
                # The slot moved (resharding, or a failover seen here first): the new link follows
                # the new slot map, so send once more. The caller awaits this publish before its
                # next one, so its order holds.
                return await self.publish(envelope, resend=False)
            metrics.BROKER_LOST.labels("rejected").inc()
            raise BrokerUnavailable(f"Redis refused the publish: {exc}") from None
        metrics.REDIS_PUBLISH_DURATION.observe(time.perf_counter() - started)
        return int(reached)

    async def _next_link(self, old: _Link) -> bool:
        """Wait, at most the Redis timeout, for a link other than `old` to be up."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._timeout):
                if self._link is old:  # the supervisor has not yet seen `old` fail
                    await self._down.wait()
                await self._up.wait()
        return self._link is not None and self._link is not old

    async def subscribe(self, *channels: str) -> None:
        """Returns once Redis confirmed; while the link is down, at once: the channels are recorded
        and subscribed, with every other wanted channel, before the link is declared up again."""
        names = [self._prefix + c.encode() for c in channels]
        self._wanted.update(zip(names, channels, strict=True))
        metrics.REDIS_SUBSCRIPTIONS.set(len(self._wanted))
        self._start()
        link = self._link
        if link is None:
            if self._connecting:  # a first connect or a reconnect is under way: it takes these too
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._up.wait(), self._timeout)
            return
        await self._sync(link, names, ())

    async def unsubscribe(self, *channels: str) -> None:
        names = [self._prefix + c.encode() for c in channels]
        for name in names:
            self._wanted.pop(name, None)
        metrics.REDIS_SUBSCRIPTIONS.set(len(self._wanted))
        link = self._link
        if link is not None:
            await self._sync(link, (), names)

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

    async def _supervise(self) -> None:
        delay = BACKOFF_MIN
        failures = 0
        while not self._closed:
            self._connecting = True
            try:
                link = await self._open()
            except (OSError, TimeoutError, ConnectionLost, ReplyError) as exc:
                self._connecting = False
                failures += 1
                metrics.REDIS_LINK_FAILURES.labels("connect_failed").inc()
                if failures == 1:
                    log.warning("broker.connect_failed", error=str(exc) or type(exc).__name__, retry_in=delay)
                await asyncio.sleep(random.uniform(delay / 2, delay))
                delay = min(delay * 2, self._backoff_max)
                continue
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

    async def _open(self) -> _Link:
        link = _Link()
        try:
            addresses = await self._topology.discover(self._options)
            for index, address in enumerate(addresses):
                node = _Node(address, self._topology.probe_channel(self._probe_base, index))
                lost = self._on_lost(link)
                name = f"relay:{self._pod_id}"
                node.pub = await RespConnection.open(address, self._options, name=name, on_lost=lost)
                link.nodes.append(node)
                node.sub = await RespConnection.open(
                    address, self._options, name=name, on_push=self._on_push(link, node), on_lost=lost
                )
            if self._topology.checks_role:
                role = await link.nodes[0].pub.call(b"ROLE", timeout=self._timeout)
                if role[0] != b"master":
                    raise ConnectionLost(f"{addresses[0]} is not a master yet")
            await self._sync(link, [n.probe_channel for n in link.nodes], (), raw=True)
            await self._reconcile(link)
            await asyncio.wait_for(asyncio.gather(*(self._probe(link, n) for n in link.nodes)), self._timeout)
            await self._reconcile(link)  # channels wanted or dropped while the probe was out
            if link.failed:
                raise ConnectionLost(f"the link failed while it was being opened ({link.broken.result()})")
        except BaseException:
            link.fail("closed")
            await link.wait_closed()
            raise
        return link

    async def _reconcile(self, link: _Link) -> None:
        """Subscribe what is wanted and not asked for on `link`, unsubscribe the rest, until stable."""
        while not link.failed:
            asked = set().union(*(n.subscribed - {n.probe_channel} for n in link.nodes))
            missing = [c for c in self._wanted if c not in asked]
            extra = [c for c in asked if c not in self._wanted]
            if not missing and not extra:
                return
            await self._sync(link, missing, extra)

    def _went_up(self, link: _Link, failures: int) -> None:
        self._link = link
        self._down.clear()
        self._up.set()
        metrics.REDIS_UP.set(1)
        link.monitor = asyncio.get_running_loop().create_task(self._watch(link), name="redis.watch")
        nodes = [str(n.address) for n in link.nodes]
        if self._down_since is None:
            log.info("broker.connected", nodes=nodes, channels=len(self._wanted))
            return
        metrics.REDIS_RECONNECTS.inc()
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

    def _went_down(self, link: _Link, reason: str) -> None:
        self._link = None
        self._up.clear()
        self._down.set()
        metrics.REDIS_UP.set(0)
        if reason == "closed" or self._closed:
            return
        metrics.REDIS_LINK_FAILURES.labels(reason).inc()
        self._down_since = time.monotonic()
        self._refused = 0
        self._in_flight_lost = 0
        log.warning("broker.link_lost", reason=reason, nodes=[str(n.address) for n in link.nodes])

    # --- subscriptions, probes, the watch -------------------------------------------------------

    async def _sync(
        self, link: _Link, subscribe: Iterable[bytes], unsubscribe: Iterable[bytes], raw: bool = False
    ) -> None:
        """Ask for (un)subscriptions on `link` in batches and wait for every confirmation."""
        if link.failed:
            return
        waits: list[asyncio.Future[None]] = []
        for command, channels in ((b"SUBSCRIBE", subscribe), (b"UNSUBSCRIBE", unsubscribe)):
            by_node: dict[int, list[bytes]] = {}
            for channel in channels:
                index = (
                    next(i for i, n in enumerate(link.nodes) if n.probe_channel == channel)
                    if raw
                    else self._topology.route(channel)
                )
                by_node.setdefault(index, []).append(channel)
            for index, names in by_node.items():
                node = link.nodes[index]
                if command == b"SUBSCRIBE":
                    node.subscribed.update(names)
                else:
                    node.subscribed.difference_update(names)
                waits.extend(link.expect(c) for c in names)
                self._write(node.sub, command, names)
        if not waits:
            return
        try:
            await asyncio.wait_for(asyncio.gather(*waits), self._timeout)
        except TimeoutError:
            link.fail("subscribe_timeout")

    def _write(self, conn: RespConnection, command: bytes, channels: list[bytes]) -> None:
        if self._topology.sharded:  # one slot per SSUBSCRIBE: one channel per command
            for channel in channels:
                conn.write(b"S" + command, channel)
            return
        for start in range(0, len(channels), SUBSCRIBE_BATCH):
            conn.write(command, *channels[start : start + SUBSCRIBE_BATCH])

    def _send_probe(self, link: _Link, node: _Node) -> str:
        nonce = secrets.token_hex(6)
        node.probe = (nonce, time.monotonic())
        node.pub.send(self._publish, node.probe_channel, wire.probe(nonce)).add_done_callback(_ignore)
        if self._topology.checks_role:
            node.pub.send(b"ROLE").add_done_callback(lambda f: self._check_role(link, f))
        return nonce

    async def _probe(self, link: _Link, node: _Node) -> None:
        node.answered.clear()
        self._send_probe(link, node)
        await node.answered.wait()

    def _check_role(self, link: _Link, reply: asyncio.Future[Any]) -> None:
        if not reply.cancelled() and reply.exception() is None and reply.result()[0] != b"master":
            link.fail("not_master")

    async def _watch(self, link: _Link) -> None:
        """Probe idle links and end a link whose probe or publishes go unanswered too long."""
        tick = max(0.01, min(self._probe_interval, self._timeout) / 4)
        while not link.failed:
            await asyncio.sleep(tick)
            now = time.monotonic()
            for node in link.nodes:
                oldest = node.pub.oldest_pending()
                if node.probe is not None and now - node.probe[1] > self._timeout:
                    link.fail("probe_timeout")
                elif oldest is not None and now - oldest > self._timeout:
                    link.fail("publish_timeout")
                elif node.probe is None and now - node.sub.last_read >= self._probe_interval:
                    self._send_probe(link, node)

    def _on_lost(self, link: _Link) -> Any:
        def lost(exc: BaseException | None) -> None:
            link.fail("connection_lost")

        return lost

    def _on_push(self, link: _Link, node: _Node) -> Any:
        wanted = self._wanted

        def on_push(pushes: list[Push]) -> None:
            envelopes: list[Envelope] = []
            for push in pushes:
                if isinstance(push, ReplyError):  # e.g. MOVED for an SSUBSCRIBE: the map changed
                    link.fail("topology_changed")
                    return
                kind, channel, payload = push
                if kind == b"message" or kind == b"smessage":
                    logical = wanted.get(channel)
                    if logical is not None:
                        try:
                            envelopes.append(wire.decode(logical, payload))
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
                waiters = link.waiters.get(channel)
                if waiters:
                    waiter = waiters.popleft()
                    if not waiters:
                        del link.waiters[channel]
                    if not waiter.done():
                        waiter.set_result(None)
                elif kind == b"sunsubscribe":  # Redis moved the slot away: follow the new map
                    link.fail("topology_changed")
                    return
            if envelopes:
                self._enqueue(envelopes)

        return on_push

    def _enqueue(self, envelopes: list[Envelope]) -> None:
        if self._backlog + len(envelopes) > MAX_BACKLOG:
            metrics.BROKER_LOST.labels("backlog").inc(len(envelopes))
            return
        self._backlog += len(envelopes)
        self._inbox.put_nowait(envelopes)


def _ignore(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved, so asyncio does not log it; the watch judges the link

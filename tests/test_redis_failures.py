"""Redis goes away and comes back: the broker notices, counts what it lost, and delivers again.

Each test owns its redis-server (killed, restarted, paused) and uses short probe and backoff
timings (tests/brokers.py FAST_REDIS), so every recovery must happen within a few seconds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from structlog.testing import capture_logs

from service.broker import BrokerUnavailable, Envelope
from service.broker.redis import RedisBroker
from service.broker.resp import Address, ConnectOptions
from service.broker.topology import SingleTopology
from tests.brokers import Collector, delivered_again, eventually, redis_broker
from tests.helpers import metric
from tests.redis_servers import RedisServer
from tests.test_redis_links import ScriptedProxy

pytestmark = pytest.mark.integration


class RoleCheckedTopology(SingleTopology):
    """One server whose ROLE is asked before a link is let up, as SentinelTopology does (without
    a Sentinel, so a test can point it at a replica or through a proxy)."""

    checks_role = True


RECOVERY = 5.0  # seconds a recovery may take with the test timings


@pytest.fixture
async def pair(dedicated_redis: RedisServer, redis_prefix: str) -> AsyncIterator[tuple[Collector, Collector]]:
    a = Collector(redis_broker(dedicated_redis.url, redis_prefix, "a"))
    b = Collector(redis_broker(dedicated_redis.url, redis_prefix, "b"))
    await a.broker.subscribe("g:room")
    await b.broker.subscribe("g:room")
    yield a, b
    await a.stop()
    await b.stop()


def env(frame: str) -> Envelope:
    return Envelope("g:room", frame, time.time())


async def recovered(a: Collector, b: Collector) -> float:
    return await delivered_again(a, b, "g:room", RECOVERY)


async def test_redis_killed_and_restarted_delivery_resumes_and_the_loss_is_counted(
    dedicated_redis: RedisServer, pair: tuple[Collector, Collector]
) -> None:
    """Publishes while Redis is dead are refused and counted; after a restart both pods re-subscribe."""
    a, b = pair
    lost_before = metric("relay_broker_lost_total", reason="link_down")
    dedicated_redis.kill()
    await eventually(lambda: not a.broker.ready and not b.broker.ready, RECOVERY)
    with pytest.raises(BrokerUnavailable):
        await a.broker.publish(env("into the void"))
    assert metric("relay_broker_lost_total", reason="link_down") == lost_before + 1
    dedicated_redis.start()
    took = await recovered(a, b)
    # delivering again proves both links; readiness also waits for a probe's answer (on a loaded
    # machine a probe may time out once more and rebuild a link first)
    await eventually(lambda: a.broker.ready and b.broker.ready, RECOVERY)
    assert took < RECOVERY
    await a.wait_for(1)  # the publisher's own pod hears it too (one delivery path)


async def test_a_paused_redis_is_detected_by_the_probe(
    dedicated_redis: RedisServer, pair: tuple[Collector, Collector]
) -> None:
    """SIGSTOP leaves the sockets open and silent: only the probe can tell. Recovery follows SIGCONT."""
    a, b = pair
    failures = metric("relay_redis_link_failures_total", reason="probe_timeout")
    dedicated_redis.pause()
    try:
        detected = await eventually(lambda: not b.broker.ready, RECOVERY)
        assert detected < 0.2 + 0.5 + 0.5  # probe interval + timeout + a watch tick or two
        assert metric("relay_redis_link_failures_total", reason="probe_timeout") > failures
        with pytest.raises(BrokerUnavailable):
            await a.broker.publish(env("while paused"))
    finally:
        dedicated_redis.cont()
    await recovered(a, b)


async def test_client_kill_of_the_pubsub_connections_resubscribes(
    dedicated_redis: RedisServer, pair: tuple[Collector, Collector], redis_prefix: str
) -> None:
    """CLIENT KILL TYPE pubsub drops every subscriber; both pods reconnect and subscribe again."""
    a, b = pair
    reconnects = metric("relay_redis_reconnects_total")
    with capture_logs() as logs:
        dedicated_redis.call("CLIENT", "KILL", "TYPE", "pubsub")
        took = await recovered(a, b)
    assert took < 1.0
    assert metric("relay_redis_reconnects_total") >= reconnects + 2
    events = [e["event"] for e in logs]
    assert events.count("broker.link_lost") == 2  # once per pod per outage, never per message
    assert events.count("broker.reconnected") == 2
    channels = set(dedicated_redis.call("PUBSUB", "CHANNELS", "*"))
    assert {c for c in channels if ":g:" in c} == {redis_prefix + ":g:room"}
    assert dedicated_redis.call("PUBSUB", "NUMSUB", redis_prefix + ":g:room")[1] == 2


async def test_one_log_line_per_outage_says_how_many_publishes_were_refused(
    dedicated_redis: RedisServer, pair: tuple[Collector, Collector]
) -> None:
    """The reconnect line carries the outage's length and its refused publishes."""
    a, b = pair
    with capture_logs() as logs:
        dedicated_redis.kill()
        await eventually(lambda: not a.broker.ready, RECOVERY)
        for n in range(5):
            with pytest.raises(BrokerUnavailable):
                await a.broker.publish(env(f"lost {n}"))
        dedicated_redis.start()
        await recovered(a, b)
    reconnected = [e for e in logs if e["event"] == "broker.reconnected" and e["publishes_refused"] >= 5]
    assert len(reconnected) == 1
    assert reconnected[0]["outage_seconds"] > 0
    assert [e["event"] for e in logs].count("broker.connect_failed") <= 2  # once per pod, not per retry


async def test_a_broker_started_while_redis_is_down_connects_when_it_appears(
    dedicated_redis: RedisServer, redis_prefix: str
) -> None:
    """Nothing waits for Redis for long: subscribe says within redis_timeout that it could not be
    confirmed, the channel stays wanted, and the link comes up, subscribed, when Redis does."""
    dedicated_redis.kill()
    b = Collector(redis_broker(dedicated_redis.url, redis_prefix, "b"))
    a = Collector(redis_broker(dedicated_redis.url, redis_prefix, "a"))
    try:
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable):
            await b.broker.subscribe("g:room")
        assert time.monotonic() - started < 1.0  # bounded by redis_timeout
        assert not b.broker.ready
        dedicated_redis.start()
        await eventually(lambda: b.broker.ready, RECOVERY)
        await recovered(a, b)
    finally:
        await a.stop()
        await b.stop()


async def test_a_subscribe_on_a_broker_closed_before_it_ever_connected_is_refused_at_once(
    redis_prefix: str,
) -> None:
    """A broker closed before anything started it opens no link, and a subscribe after that is
    refused at once: not held for redis_timeout (5 s here) waiting on a link that never comes."""
    broker = redis_broker("redis://127.0.0.1:1", redis_prefix, "a", redis_timeout=5.0)
    await broker.close()
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        await broker.subscribe("g:room")
    assert time.monotonic() - started < 2.5
    assert not broker.ready


async def test_a_redis_that_holds_the_announced_rules_unanswered_is_given_up_after_redis_timeout(
    dedicated_redis: RedisServer, redis_prefix: str
) -> None:
    """Each link writes the group rules under the prefix while it is opened. A Redis that holds
    that SET unanswered (here CLIENT PAUSE WRITE) costs each attempt redis_timeout, counted and
    logged, not a link opening for ever; once Redis answers, the link comes up and the rules are
    there."""
    rules = b'{"group":[]}'
    broker = RedisBroker(
        SingleTopology(Address("127.0.0.1", dedicated_redis.port)),
        ConnectOptions(timeout=0.5),
        pod_id="a",
        prefix=redis_prefix,
        probe_interval=30.0,
        backoff_max=0.3,
        announce={b"rules": rules},
        history=False,  # no FUNCTION LOAD: the SET of the rules is the first write held
    )
    dedicated_redis.call("CLIENT", "PAUSE", 60_000, "WRITE")
    try:
        with capture_logs() as logs:
            with pytest.raises(BrokerUnavailable):
                await broker.subscribe("g:room")
            await eventually(lambda: any(e["event"] == "broker.connect_failed" for e in logs), 10)
        [line] = [e for e in logs if e["event"] == "broker.connect_failed"]
        assert line["error"] == "TimeoutError"
        dedicated_redis.call("CLIENT", "UNPAUSE")
        await eventually(lambda: broker.ready, 10)
        assert dedicated_redis.call("GET", f"{redis_prefix}:rules") == rules.decode()
    finally:
        dedicated_redis.call("CLIENT", "UNPAUSE")
        await broker.close()


def _role_checked_broker(port: int, prefix: str) -> RedisBroker:
    return RedisBroker(
        RoleCheckedTopology(Address("127.0.0.1", port)),
        ConnectOptions(timeout=0.5),
        pod_id="a",
        prefix=prefix,
        probe_interval=30.0,
        backoff_max=0.3,
        history=False,  # FUNCTION LOAD is a write, which a replica refuses
    )


async def test_a_server_that_is_not_a_master_yet_is_refused_saying_so_and_tried_again(
    dedicated_redis: RedisServer, redis_prefix: str
) -> None:
    """Where ROLE is checked (Sentinel), a server that answers it as a replica (one whose
    promotion has not happened yet) is no link: each attempt fails, counted under
    reason="connect_failed" and logged naming the server, not taken for a bug; once the server is
    a master, the link comes up."""
    dedicated_redis.call("REPLICAOF", "127.0.0.1", 1)  # nothing listens there: it stays a replica
    broker = _role_checked_broker(dedicated_redis.port, redis_prefix)
    failed = metric("relay_redis_link_failures_total", reason="connect_failed")
    try:
        with capture_logs() as logs:
            with pytest.raises(BrokerUnavailable):
                await broker.subscribe("g:room")
            await eventually(lambda: any(e["event"] == "broker.connect_failed" for e in logs), 10)
            dedicated_redis.call("REPLICAOF", "NO", "ONE")
            await eventually(lambda: broker.ready, 10)
        [line] = [e for e in logs if e["event"] == "broker.connect_failed"]
        assert line["error"] == f"127.0.0.1:{dedicated_redis.port} is not a master yet"
        assert not [e for e in logs if e["event"] == "broker.supervisor_error"]
        assert metric("relay_redis_link_failures_total", reason="connect_failed") > failed
    finally:
        dedicated_redis.call("REPLICAOF", "NO", "ONE")
        await broker.close()


async def test_a_role_check_left_unanswered_is_given_up_after_redis_timeout(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """ROLE's reply never comes (the proxy drops every reply that says "master"): the attempt is
    given up after redis_timeout, counted and logged, not left opening for ever; once the replies
    come through, the link comes up."""
    proxy = ScriptedProxy(redis_server.port)
    async with proxy:
        proxy.hiding = b"master"
        broker = _role_checked_broker(proxy.port, redis_prefix)
        try:
            with capture_logs() as logs:
                with pytest.raises(BrokerUnavailable):
                    await broker.subscribe("g:room")
                await eventually(lambda: any(e["event"] == "broker.connect_failed" for e in logs), 10)
            assert proxy.hidden >= 1
            [line] = [e for e in logs if e["event"] == "broker.connect_failed"]
            assert line["error"] == "TimeoutError"
            proxy.hiding = None
            await eventually(lambda: broker.ready, 10)
        finally:
            await broker.close()


async def test_a_group_joined_while_a_new_link_is_probed_and_never_confirmed_fails_that_attempt(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """A new link has subscribed every wanted group and waits for its probe to come back; a group
    joined just then is subscribed before the link is let up, and when Redis never confirms it the
    attempt fails with that reason (logged, counted), not let up without it; once Redis confirms,
    the link comes up carrying it."""
    proxy = ScriptedProxy(redis_server.port)
    async with proxy:
        broker = RedisBroker(
            SingleTopology(Address("127.0.0.1", proxy.port)),
            ConnectOptions(timeout=3.0),
            pod_id="a",
            prefix=redis_prefix,
            probe_interval=30.0,
            backoff_max=0.3,
            history=False,
        )
        real_probe = broker._probe
        holding, probing, go_on = False, asyncio.Event(), asyncio.Event()

        async def probe(node: Any) -> None:
            if holding:  # the probe of the link opened after the cut: held until the join began
                probing.set()
                await go_on.wait()
            await real_probe(node)

        broker._probe = probe  # type: ignore[method-assign]
        joined = f"{redis_prefix}:g:new".encode()
        failed = metric("relay_redis_link_failures_total", reason="connect_failed")
        try:
            await broker.subscribe("g:kept")
            first = broker._link
            holding = True
            with capture_logs() as logs:
                assert await proxy.cut(after=0.0) == 2
                await asyncio.wait_for(probing.wait(), 10)
                proxy.hiding = joined
                join = asyncio.get_running_loop().create_task(broker.subscribe("g:new"))
                await eventually(lambda: joined in broker._wanted)
                go_on.set()
                await eventually(lambda: any(e["event"] == "broker.connect_failed" for e in logs), 10)
                assert broker._link is None
                with pytest.raises(BrokerUnavailable):
                    await join
                proxy.hiding = None
                await eventually(lambda: broker._link not in (None, first), 10)
            assert proxy.hidden >= 1
            [line] = [e for e in logs if e["event"] == "broker.connect_failed"]
            assert line["error"] == "Redis did not confirm the subscriptions in time"
            assert metric("relay_redis_link_failures_total", reason="connect_failed") > failed
            assert redis_server.call("PUBSUB", "NUMSUB", joined.decode())[1] == 1
        finally:
            go_on.set()
            await broker.close()

"""Redis goes away and comes back: the broker notices, counts what it lost, and delivers again.

Each test owns its redis-server (killed, restarted, paused) and uses short probe and backoff
timings (tests/brokers.py FAST_REDIS), so every recovery must happen within a few seconds.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from structlog.testing import capture_logs

from service.broker import BrokerUnavailable, Envelope
from tests.brokers import Collector, delivered_again, eventually, redis_broker
from tests.helpers import metric
from tests.redis_servers import RedisServer

pytestmark = pytest.mark.integration


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
    """SIGSTOP leaves the sockets open and silent: only the probe can tell. Recovery follows SIGCONT.
    The probe left unanswered fails with its link, quietly: nothing is left for asyncio to report."""
    a, b = pair
    failures = metric("relay_redis_link_failures_total", reason="probe_timeout")
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
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
        gc.collect()  # a future's unretrieved exception is reported when it is collected
        assert errors == []
    finally:
        loop.set_exception_handler(None)


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

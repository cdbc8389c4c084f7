"""RedisBroker (service/broker/redis.py) against a real redis-server: what it does with payloads it
cannot read, a hub that stops reading, a reconnect the hub must hear about, and a command Redis
refuses. (The outage and failover tests are tests/test_redis_failures.py and test_redis_failover.py.)"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator

import pytest
from structlog.testing import capture_logs

from service.broker import RESYNC, BrokerUnavailable, Envelope, Retention
from service.broker import redis as redis_broker_module
from tests.brokers import Collector, delivered_again, eventually, redis_broker
from tests.helpers import metric
from tests.redis_servers import RedisServer

pytestmark = pytest.mark.integration


def env(frame: str, channel: str = "g:room") -> Envelope:
    return Envelope(channel, frame, time.time())


@pytest.fixture
async def pod(redis_server: RedisServer, redis_prefix: str) -> AsyncIterator[Collector]:
    collector = Collector(redis_broker(redis_server.url, redis_prefix, "a"))
    await collector.broker.subscribe("g:room")
    yield collector
    await collector.stop()


async def test_a_payload_that_is_not_an_envelope_is_counted_and_the_link_goes_on(
    redis_server: RedisServer, redis_prefix: str, pod: Collector
) -> None:
    """Another writer's garbage on a relay channel never reaches members and never ends the link."""
    lost = metric("relay_broker_lost_total", reason="undecodable")
    assert redis_server.call("PUBLISH", f"{redis_prefix}:g:room", "not an envelope") == 1
    await pod.broker.publish(env("after it"))
    (got,) = await pod.wait_for(1)
    assert got.frame == "after it"
    assert metric("relay_broker_lost_total", reason="undecodable") == lost + 1
    assert pod.broker.ready


async def test_a_hub_that_stops_reading_costs_what_exceeds_the_backlog_not_memory(
    redis_server: RedisServer, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_broker_module, "MAX_BACKLOG", 3)
    broker = redis_broker(redis_server.url, redis_prefix, "a")
    try:
        await broker.subscribe("g:room")
        lost = metric("relay_broker_lost_total", reason="backlog")
        for n in range(5):  # nobody reads messages() meanwhile
            await broker.publish(env(f"m{n}"))
        await eventually(lambda: metric("relay_broker_lost_total", reason="backlog") == lost + 2)
        messages = broker.messages()
        assert [(await anext(messages)).frame for _ in range(3)] == ["m0", "m1", "m2"]
        await broker.publish(env("room again"))  # the backlog drained: delivered again
        assert (await asyncio.wait_for(anext(messages), 5)).frame == "room again"
    finally:
        await broker.close()


async def test_after_a_reconnect_the_hub_is_told_to_resync_once_and_the_channels_are_back(
    dedicated_redis: RedisServer, redis_prefix: str
) -> None:
    a = Collector(redis_broker(dedicated_redis.url, redis_prefix, "a"))
    b = Collector(redis_broker(dedicated_redis.url, redis_prefix, "b"))
    try:
        await b.broker.subscribe("g:room", "g:other")
        await a.broker.publish(env("before"))
        assert [e.frame for e in await b.wait_for(1)] == ["before"]  # no RESYNC on the first link
        dedicated_redis.call("CLIENT", "KILL", "TYPE", "pubsub")
        await delivered_again(a, b, "g:other", 5.0)
        assert b.envelopes.count(RESYNC) == 1
        assert b.envelopes.index(RESYNC) == 1  # before anything the new link carried
        channels = set(dedicated_redis.call("PUBSUB", "CHANNELS", f"{redis_prefix}:g:*"))
        assert channels == {f"{redis_prefix}:g:room", f"{redis_prefix}:g:other"}
    finally:
        await a.stop()
        await b.stop()


async def test_a_command_redis_refuses_is_reported_and_counted_not_retried(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """A user whose ACL lets it publish but not call relay's history functions (a misconfigured
    Redis user): an append fails at once, with Redis's reason; the link stays up."""
    user, password = "relay-" + secrets.token_hex(4), secrets.token_hex(8)
    redis_server.call("ACL", "SETUSER", user, "on", ">" + password, "+@all", "-fcall", "~*", "&*")
    url = f"redis://{user}:{password}@127.0.0.1:{redis_server.port}"
    broker = redis_broker(url, redis_prefix, "a")
    try:
        await broker.subscribe("g:{h}")
        rejected = metric("relay_broker_lost_total", reason="rejected")
        resent = metric("relay_broker_resent_total")
        with (
            capture_logs() as logs,
            pytest.raises(BrokerUnavailable, match="Redis refused the command: NOPERM"),
        ):
            await broker.append(env("refused", "g:{h}"), Retention(5, 60), "key-1")
        assert metric("relay_broker_lost_total", reason="rejected") == rejected + 1
        assert metric("relay_broker_resent_total") == resent
        assert broker.ready  # a refusal is an answer: the link is fine
        assert not [e for e in logs if e["event"] == "broker.link_lost"]
        assert await broker.publish(env("publish may", "g:{h}")) == 1
    finally:
        await broker.close()
        redis_server.call("ACL", "DELUSER", user)

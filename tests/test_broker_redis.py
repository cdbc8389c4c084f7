"""RedisBroker (service/broker/redis.py) against a real redis-server: what it does with payloads it
cannot read, a hub that stops reading, a reconnect the hub must hear about, and a command Redis
refuses. (The outage and failover tests are tests/test_redis_failures.py and test_redis_failover.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from redis.crc import key_slot
from structlog.testing import capture_logs

from service.broker import (
    RESYNC,
    Arrival,
    BrokerUnavailable,
    Envelope,
    PresenceBatch,
    PresenceTerms,
    Retention,
)
from service.broker import redis as redis_broker_module
from service.broker.resp import Address, ConnectionLost, ConnectOptions
from service.broker.topology import SentinelTopology, SingleTopology
from tests.brokers import FAST_REDIS, Collector, delivered_again, eventually, redis_broker
from tests.helpers import free_port, metric
from tests.redis_proxy import RedisProxy
from tests.redis_servers import RedisCluster, RedisServer, SentinelSet, start_redis

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
        messages = broker.messages()
        for _ in range(2):  # the second time, a drained backlog must hold as many again
            lost = metric("relay_broker_lost_total", reason="backlog")
            for n in range(5):  # nobody reads messages() meanwhile
                await broker.publish(env(f"m{n}"))
            await eventually(lambda: metric("relay_broker_lost_total", reason="backlog") >= lost + 2)  # noqa: B023
            got = [(await asyncio.wait_for(anext(messages), 5)).frame for _ in range(3)]
            assert got == ["m0", "m1", "m2"]
            assert metric("relay_broker_lost_total", reason="backlog") == lost + 2
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


async def test_a_revocation_is_one_expiring_key_named_by_the_hash_of_the_sub(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """docs/security.md: `<prefix>:deny:<hash of sub>` holds the revocation's time and expires after
    `deny_seconds`; any `sub` (here one with spaces and non-ASCII) makes a short plain key."""
    broker = redis_broker(redis_server.url, redis_prefix, "a")
    sub = "Zoë Example <zoe@example.com>"
    try:
        await broker.deny(sub, 1764000000.25, 100)
        key = f"{redis_prefix}:deny:" + hashlib.sha256(sub.encode()).hexdigest()[:32]
        assert redis_server.call("KEYS", f"{redis_prefix}:deny:*") == [key]
        assert redis_server.call("GET", key) == "1764000000.25"
        assert 99_000 < int(redis_server.call("PTTL", key)) <= 100_000
        assert await broker.denied(sub) == 1764000000.25
    finally:
        await broker.close()


async def test_presence_expiry_and_leave_are_ttl_and_grace_after_one_reading_of_redis_time(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """docs/presence.md, "How it is kept": an entry's expiry and a user's due leave are Redis ms,
    the TTL and the grace after the same TIME (so exactly the TTL less the grace apart when one batch
    adds the one and departs the other); every key lives TTL + grace + 1 s."""
    broker = redis_broker(redis_server.url, redis_prefix, "a")
    try:
        for group, grace in (("exact", 5.0), ("nograce", 0.0)):
            terms = PresenceTerms(ttl=60, grace=grace, events=True)
            channel = f"g:{{{group}}}"
            await broker.presence_update(channel, terms, PresenceBatch([Arrival("c.1", "ann", "{}")]))
            batch = PresenceBatch([Arrival("c.2", "bob", "{}")], ["c.1"])
            await broker.presence_update(channel, terms, batch)
            expires = int(redis_server.call("ZSCORE", f"{redis_prefix}:pc:{{{group}}}", "c.2"))
            due = int(redis_server.call("ZSCORE", f"{redis_prefix}:pl:{{{group}}}", "ann"))
            assert expires - due == 60_000 - grace * 1000
            assert (
                55_000
                < int(redis_server.call("PTTL", f"{redis_prefix}:pc:{{{group}}}"))
                <= 61_000 + grace * 1000
            )
    finally:
        await broker.close()


class _Delays:
    """Stands in for redis.py's `random`: records each backoff range and sleeps its shortest."""

    def __init__(self) -> None:
        self.ranges: list[tuple[float, float]] = []

    def uniform(self, low: float, high: float) -> float:
        self.ranges.append((low, high))
        return low


async def test_retries_back_off_doubling_to_the_maximum_and_a_stable_link_starts_again(
    dedicated_redis: RedisServer, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each failed attempt waits a jittered delay that doubles from BACKOFF_MIN up to
    redis_backoff_max; a link that lived less than STABLE_AFTER keeps the delay it had,
    one that lived longer starts again from BACKOFF_MIN."""
    delays = _Delays()
    monkeypatch.setattr(redis_broker_module, "random", delays)
    broker = redis_broker(dedicated_redis.url, redis_prefix, "a")
    low, top = redis_broker_module.BACKOFF_MIN, FAST_REDIS["redis_backoff_max"]  # 0.05, 0.3
    try:
        await broker.subscribe("g:room")
        dedicated_redis.kill()
        await eventually(lambda: len(delays.ranges) >= 6)
        assert delays.ranges[:5] == [
            (low / 2, low),
            (low, 2 * low),
            (2 * low, 4 * low),
            (top / 2, top),
            (top / 2, top),
        ]
        dedicated_redis.start()
        await eventually(lambda: broker.ready)
        assert set(delays.ranges[4:]) == {(top / 2, top)}
        delays.ranges.clear()
        dedicated_redis.kill()  # the link lived less than STABLE_AFTER: still the longest delay
        await eventually(lambda: len(delays.ranges) >= 1)
        assert delays.ranges[0] == (top / 2, top)
        dedicated_redis.start()
        await eventually(lambda: broker.ready)
        monkeypatch.setattr(redis_broker_module, "STABLE_AFTER", 0.0)  # now every link is stable
        delays.ranges.clear()
        dedicated_redis.kill()
        await eventually(lambda: len(delays.ranges) >= 1)
        assert delays.ranges[0] == (low / 2, low)
    finally:
        await broker.close()


async def test_an_outage_shows_in_the_gauges_and_in_one_line_each_way(
    dedicated_redis: RedisServer, redis_prefix: str
) -> None:
    """relay_redis_up and relay_redis_subscriptions follow the link and the wanted channels; the
    logs say once that it connected, once that it was lost (why, where), once the first failed
    attempt, and once what the outage cost."""
    node = f"127.0.0.1:{dedicated_redis.port}"
    broker = redis_broker(dedicated_redis.url, redis_prefix, "a")
    connect_failed = metric("relay_redis_link_failures_total", reason="connect_failed")
    try:
        with capture_logs() as logs:
            await broker.subscribe("g:one", "g:two", "g:three")
            assert metric("relay_redis_up") == 1
            assert metric("relay_redis_subscriptions") == 3
            await broker.unsubscribe("g:three")
            assert metric("relay_redis_subscriptions") == 2
            dedicated_redis.kill()
            await eventually(lambda: not broker.ready)
            assert metric("relay_redis_up") == 0
            for n in range(3):
                with pytest.raises(BrokerUnavailable, match="the Redis link is down"):
                    await broker.publish(env(f"lost {n}"))
            await eventually(lambda: any(e["event"] == "broker.connect_failed" for e in logs))
            assert metric("relay_redis_link_failures_total", reason="connect_failed") > connect_failed
            dedicated_redis.start()
            await eventually(lambda: broker.ready)
            assert metric("relay_redis_up") == 1
        lines = {e["event"]: e for e in logs if e["event"].startswith("broker.")}
        assert lines["broker.connected"] == {
            "event": "broker.connected", "log_level": "info", "nodes": [node], "channels": 3,
        }  # fmt: skip
        assert lines["broker.link_lost"] == {
            "event": "broker.link_lost", "log_level": "warning", "reason": "connection_lost", "nodes": [node],
        }  # fmt: skip
        failed = lines["broker.connect_failed"]
        assert (failed["log_level"], failed["retry_in"]) == ("warning", redis_broker_module.BACKOFF_MIN)
        assert "Connect call failed" in failed["error"] or "refused" in failed["error"].lower()
        back = lines["broker.reconnected"]
        assert back["log_level"] == "warning" and back["nodes"] == [node] and back["channels"] == 2
        assert back["publishes_refused"] == 3 and back["publishes_in_flight_lost"] == 0
        assert back["failed_attempts"] >= 1 and 0 < back["outage_seconds"] < 5
    finally:
        await broker.close()
    assert metric("relay_redis_up") == 0


async def test_a_redis_that_refuses_relays_functions_runs_without_history_and_says_so_once(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """FUNCTION LOAD refused (a Redis before 7.0 has no functions; here an ACL): pub/sub carries on,
    and one error line says why history is unavailable, however often the link is rebuilt."""
    user, password = "relay-" + secrets.token_hex(4), secrets.token_hex(8)
    redis_server.call("ACL", "SETUSER", user, "on", ">" + password, "+@all", "-function", "~*", "&*")
    broker = redis_broker(f"redis://{user}:{password}@127.0.0.1:{redis_server.port}", redis_prefix, "a")
    assert isinstance(broker, redis_broker_module.RedisBroker)
    try:
        with capture_logs() as logs:
            await broker.subscribe("g:room")
            first = broker._link
            redis_server.call("CLIENT", "KILL", "USER", user)  # only this test's connections
            await eventually(lambda: broker._link not in (None, first))
        [line] = [e for e in logs if e["event"] == "broker.history_unavailable"]
        assert line["log_level"] == "error" and line["needs"] == "Redis 7.0+ functions"
        assert line["error"].startswith("NOPERM")
        assert await broker.publish(env("still carried")) == 1
    finally:
        await broker.close()
        redis_server.call("ACL", "DELUSER", user)


async def test_a_subscription_redis_refuses_ends_the_link_and_says_why(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """An ACL that does not allow a channel: Redis answers the SUBSCRIBE with an error, which ends
    the link (reason subscribe_refused) and is logged with Redis's words; the caller is refused."""
    user, password = "relay-" + secrets.token_hex(4), secrets.token_hex(8)
    allowed = [f"&{redis_prefix}:probe:*", f"&{redis_prefix}:g:ok"]
    redis_server.call("ACL", "SETUSER", user, "on", ">" + password, "+@all", "~*", "resetchannels", *allowed)
    broker = redis_broker(f"redis://{user}:{password}@127.0.0.1:{redis_server.port}", redis_prefix, "a")
    try:
        await broker.subscribe("g:ok")
        refused = metric("relay_redis_link_failures_total", reason="subscribe_refused")
        with capture_logs() as logs, pytest.raises(BrokerUnavailable):
            await broker.subscribe("g:forbidden")
        assert metric("relay_redis_link_failures_total", reason="subscribe_refused") == refused + 1
        [line] = [e for e in logs if e["event"] == "broker.subscribe_refused"]
        assert line["log_level"] == "error" and line["error"].startswith("NOPERM")
        await broker.unsubscribe("g:forbidden")  # wanted no more: the next link comes up
        await eventually(lambda: broker.ready)
        assert await broker.publish(env("on the next link", "g:ok")) == 1
    finally:
        await broker.close()
        redis_server.call("ACL", "DELUSER", user)


async def test_a_sentinel_link_asks_every_probe_interval_whether_its_master_still_is_one(
    sentinel_set: SentinelSet, redis_prefix: str
) -> None:
    """ROLE, then Sentinel, every probe interval: while both say master the link is kept; once
    Sentinel names another master the link ends (not_master) and is opened again."""
    broker = redis_broker(sentinel_set.url, redis_prefix, "a")
    assert isinstance(broker, redis_broker_module.RedisBroker)
    topology = broker._topology
    real = topology.confirm
    answers: list[bool] = []
    sentinel_agrees = [True]

    async def confirm(address: Any, options: Any) -> bool:
        answers.append(await real(address, options) and sentinel_agrees[0])
        return answers[-1]

    topology.confirm = confirm  # type: ignore[method-assign]
    try:
        await broker.subscribe("g:room")
        first = broker._link
        await eventually(lambda: len(answers) >= 3)
        assert set(answers) == {True} and broker._link is first
        not_master = metric("relay_redis_link_failures_total", reason="not_master")
        sentinel_agrees[0] = False
        await eventually(lambda: broker._link is not first)
        await eventually(lambda: metric("relay_redis_link_failures_total", reason="not_master") > not_master)
    finally:
        sentinel_agrees[0] = True
        await broker.close()


async def test_subscriptions_go_in_confirmed_batches_a_few_at_a_time(
    dedicated_redis: RedisServer, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SUBSCRIBE_BATCH channels per command, SUBSCRIBE_WINDOW commands in flight (3 and 2 here, so
    20 channels take seven batches): every channel is subscribed once, and unsubscribed the same way
    (19 channels, seven UNSUBSCRIBE commands)."""
    monkeypatch.setattr(redis_broker_module, "SUBSCRIBE_BATCH", 3)
    monkeypatch.setattr(redis_broker_module, "SUBSCRIBE_WINDOW", 2)
    channels = [f"g:batch{n}" for n in range(20)]
    names = [f"{redis_prefix}:{c}" for c in channels]
    broker = redis_broker(dedicated_redis.url, redis_prefix, "a")
    assert isinstance(broker, redis_broker_module.RedisBroker)

    def calls(command: str) -> int:  # only this test's broker uses this server
        return int(dedicated_redis.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))

    a = Collector(broker)
    try:
        await eventually(lambda: broker.ready)  # the link and its probe channel first
        subscribes = calls("subscribe")
        await a.broker.subscribe(*channels)
        assert calls("subscribe") == subscribes + 7
        first = broker._link
        assert dedicated_redis.call("PUBSUB", "NUMSUB", *names)[1::2] == [1] * 20
        for channel in channels:
            assert await a.broker.publish(env(channel, channel)) == 1
        assert sorted(e.frame for e in await a.wait_for(20)) == sorted(channels)
        unsubscribes = calls("unsubscribe")
        await a.broker.unsubscribe(*channels[:19])
        assert calls("unsubscribe") == unsubscribes + 7
        assert dedicated_redis.call("PUBSUB", "NUMSUB", *names)[1::2] == [0] * 19 + [1]
        assert first is not None and broker._link is first and not first.failed  # confirmed: kept
    finally:
        await a.stop()


@pytest.mark.xdist_group("redis-cluster")
@pytest.mark.parametrize("endpoint", ["ip", "unknown-endpoint"])
async def test_a_subscription_sent_to_a_slots_old_owner_follows_its_moved_answer(
    redis_cluster: RedisCluster, redis_prefix: str, endpoint: str
) -> None:
    """The pod's slot map is stale: its SSUBSCRIBE goes to the node that owned the slot, which
    answers MOVED on the pub/sub connection. The pod learns the slot's owner, refreshes its map and
    subscribes there within the same call; its link is not rebuilt, and a channel the old owner
    still carries, subscribed in the same call (confirmed right after the MOVED), is kept there.
    Another pod's SPUBLISH, also
    answered MOVED, is sent again to the new owner, which its map now names. With nodes that
    announce no endpoint, MOVED names only a port: the host is the one that answered."""
    channel = "g:late"
    slot = key_slot(f"{redis_prefix}:{channel}".encode())
    source = redis_cluster.node_for_slot(slot)
    target = next(p for p in redis_cluster.primaries() if p is not source)
    beside = next(
        name
        for name in (f"g:beside{n}" for n in range(10_000))
        if (s := key_slot(f"{redis_prefix}:{name}".encode())) != slot
        and redis_cluster.node_for_slot(s) is source
    )
    broker = redis_broker(redis_cluster.url, redis_prefix, "b")
    publisher = redis_broker(redis_cluster.url, redis_prefix, "a")
    assert isinstance(broker, redis_broker_module.RedisBroker)
    assert isinstance(publisher, redis_broker_module.RedisBroker)
    pod = Collector(broker)
    try:
        for node in redis_cluster.nodes_alive():
            node.call("CONFIG", "SET", "cluster-preferred-endpoint-type", endpoint)
        await eventually(lambda: broker.ready, 15)  # the link and its slot map, before the move
        await publisher.publish(env("before", "g:elsewhere"))  # the publisher's map, before it too
        first = broker._link
        refreshes = metric("relay_redis_slot_map_refreshes_total")
        redis_cluster.move_slot(slot, target)
        with capture_logs() as logs:
            await broker.subscribe(channel, beside)
        assert source.call("PUBSUB", "SHARDNUMSUB", f"{redis_prefix}:{beside}")[1] == 1
        [line, *_] = [e for e in logs if e["event"] == "broker.slot_map_refreshed"]
        assert line["log_level"] == "info"
        assert sorted(line["nodes"]) == sorted(p.address for p in redis_cluster.primaries())
        assert target.call("PUBSUB", "SHARDNUMSUB", f"{redis_prefix}:{channel}")[1] == 1
        assert source.call("PUBSUB", "SHARDNUMSUB", f"{redis_prefix}:{channel}")[1] == 0
        assert metric("relay_redis_slot_map_refreshes_total") > refreshes
        # the publisher's SPUBLISH goes to the old owner, is answered MOVED, and sent where it says
        assert await publisher.publish(env("found", channel)) == 1
        assert (await pod.wait_for(1))[0].frame == "found"
        assert publisher._topology.route(f"{redis_prefix}:{channel}".encode()) == Address(
            "127.0.0.1", target.port
        )
        assert broker._link is first
    finally:
        await pod.stop()
        await publisher.close()
        redis_cluster.give_back(slot, source)
        for node in redis_cluster.nodes_alive():
            node.call("CONFIG", "SET", "cluster-preferred-endpoint-type", "ip")


async def test_each_publish_and_append_is_timed_once(redis_server: RedisServer, redis_prefix: str) -> None:
    """relay_redis_publish_duration_seconds: one observation per publish and per append, of the
    time Redis took to answer (well under a second here)."""
    broker = redis_broker(redis_server.url, redis_prefix, "a")
    name = "relay_redis_publish_duration_seconds"
    try:
        await broker.subscribe("g:{timed}")
        count, total = metric(name + "_count"), metric(name + "_sum")
        assert await broker.publish(env("timed", "g:{timed}")) == 1
        appended = await broker.append(env("stored", "g:{timed}"), Retention(5, 60), "key-1")
        assert (appended.pods, appended.duplicate) == (1, False)
        assert metric(name + "_count") == count + 2
        assert 0 < metric(name + "_sum") - total < 1
    finally:
        await broker.close()


@pytest.mark.xdist_group("redis-cluster")
async def test_a_slot_map_that_cannot_be_refreshed_rebuilds_the_link(
    redis_cluster: RedisCluster, redis_prefix: str
) -> None:
    """As above, but no node answers CLUSTER SLOTS when the pod asks again: the refresh gives up,
    says why, and the whole link is rebuilt (topology_changed); the subscription is refused, stays
    wanted, and is made on the slot's new owner by the next link."""
    channel = "g:stranded"
    slot = key_slot(f"{redis_prefix}:{channel}".encode())
    source = redis_cluster.node_for_slot(slot)
    target = next(p for p in redis_cluster.primaries() if p is not source)
    broker = redis_broker(redis_cluster.url, redis_prefix, "b")
    assert isinstance(broker, redis_broker_module.RedisBroker)
    topology = broker._topology
    real = topology.discover
    unanswered = [True]

    async def discover(options: Any) -> Any:
        if unanswered[0]:
            raise ConnectionLost("no cluster node gave a usable slot map: (a test)")
        return await real(options)

    try:
        await broker.subscribe("g:first")  # the link and its slot map, before the move
        changed = metric("relay_redis_link_failures_total", reason="topology_changed")
        topology.discover = discover  # type: ignore[method-assign]
        redis_cluster.move_slot(slot, target)
        with capture_logs() as logs, pytest.raises(BrokerUnavailable):
            await broker.subscribe(channel)
        [line] = [e for e in logs if e["event"] == "broker.slot_map_refresh_failed"]
        assert line["log_level"] == "warning" and line["error"].endswith("(a test)")
        await eventually(
            lambda: metric("relay_redis_link_failures_total", reason="topology_changed") > changed
        )
        unanswered[0] = False
        name = f"{redis_prefix}:{channel}"
        await eventually(lambda: target.call("PUBSUB", "SHARDNUMSUB", name)[1] == 1, 10)
    finally:
        unanswered[0] = False
        await broker.close()
        redis_cluster.give_back(slot, source)


async def test_closing_is_quiet_and_final(redis_server: RedisServer, redis_prefix: str) -> None:
    """close(): the stream ends, the link and relay_redis_up go, nothing is logged as an error, the
    broker still counts as alive (it was closed, it did not die), and a publish after it is refused
    at once (not after waiting redis_timeout, 5 s here, for a link that will not come)."""
    a = Collector(redis_broker(redis_server.url, redis_prefix, "a", redis_timeout=5.0))
    await a.broker.subscribe("g:room")
    with capture_logs() as logs:
        await a.stop()  # close(), then the stream must end
    assert not a.broker.ready and a.broker.alive
    assert metric("relay_redis_up") == 0
    assert [e for e in logs if e["log_level"] in ("warning", "error")] == []
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable, match="the Redis link is down"):
        await a.broker.publish(env("too late"))
    assert time.monotonic() - started < 2.5
    await a.broker.close()  # again: nothing to do


async def test_a_broker_closed_while_down_refuses_at_once(redis_prefix: str) -> None:
    """Closed before any link came (nothing listens here): a publish is refused at once, not after
    waiting redis_timeout (5 s here) for a link that will not come."""
    broker = redis_broker(f"redis://127.0.0.1:{free_port()}", redis_prefix, "a", redis_timeout=5.0)
    await broker.close()
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable, match=r"^the Redis link is down$"):
        await broker.publish(env("too late"))
    assert time.monotonic() - started < 2.5


class _Fatal(BaseException):
    """Not an Exception, so the supervisor does not catch it (nor would it KeyboardInterrupt)."""


async def test_a_supervisor_that_dies_says_of_what_and_liveness_fails(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """The supervisor survives every Exception; should anything else end it, the error line names
    it and `alive` turns false (tests/test_redis_links.py covers a cancelled one)."""
    broker = redis_broker(redis_server.url, redis_prefix, "a")
    assert isinstance(broker, redis_broker_module.RedisBroker)

    async def fatal(options: Any) -> Any:
        raise _Fatal

    broker._topology.discover = fatal  # type: ignore[method-assign]
    try:
        with capture_logs() as logs:
            with pytest.raises(BrokerUnavailable):
                await broker.subscribe("g:room")
            assert broker._supervisor is not None
            await asyncio.gather(broker._supervisor, return_exceptions=True)
        assert not broker.alive
        [line] = [e for e in logs if e["event"] == "broker.supervisor_stopped"]
        assert (line["log_level"], line["error"]) == ("error", "_Fatal")
    finally:
        with contextlib.suppress(_Fatal):  # close() awaits the supervisor: what ended it comes back
            await broker.close()


async def test_a_channel_whose_primary_cannot_be_reached_is_refused(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """The topology routes a channel to a primary the link cannot open (here: nothing listens):
    subscribing it is refused, not reported as done."""
    broker = redis_broker(redis_server.url, redis_prefix, "a")
    assert isinstance(broker, redis_broker_module.RedisBroker)
    topology = broker._topology
    real = topology.route
    nowhere = Address("127.0.0.1", free_port())
    elsewhere = f"{redis_prefix}:g:elsewhere".encode()
    topology.route = lambda channel: nowhere if channel == elsewhere else real(channel)  # type: ignore[method-assign]
    try:
        await broker.subscribe("g:here")
        with pytest.raises(BrokerUnavailable):
            await broker.subscribe("g:elsewhere")
    finally:
        await broker.close()


@pytest.mark.xdist_group("redis-cluster")
async def test_a_command_redirected_more_than_max_redirects_times_is_given_up(
    redis_cluster: RedisCluster, redis_prefix: str
) -> None:
    """A slot map that keeps naming the wrong node (here: a topology that ignores MOVED and routes
    to a node that does not own the slot): after MAX_REDIRECTS tries the command is refused and
    counted, not chased forever."""
    key = f"{redis_prefix}:g:lost".encode()
    owner = redis_cluster.node_for_slot(key_slot(key))
    wrong = next(p for p in redis_cluster.primaries() if p is not owner)
    broker = redis_broker(redis_cluster.url, redis_prefix, "a")
    assert isinstance(broker, redis_broker_module.RedisBroker)
    try:
        await broker.publish(env("connected", "g:lost"))
        topology = broker._topology
        real = topology.route
        wrong_address = Address("127.0.0.1", wrong.port)
        topology.route = lambda channel: wrong_address if channel == key else real(channel)  # type: ignore[method-assign]
        topology.moved = lambda slot, address: None  # type: ignore[method-assign]
        rejected = metric("relay_broker_lost_total", reason="rejected")
        with pytest.raises(BrokerUnavailable, match="redirected the command more than 5 times"):
            await broker.publish(env("nowhere", "g:lost"))
        assert metric("relay_broker_lost_total", reason="rejected") == rejected + 1
        assert redis_broker_module.MAX_REDIRECTS == 5
    finally:
        await broker.close()


async def test_unsubscribing_what_was_never_subscribed_does_nothing(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """A channel never subscribed (or already unsubscribed) may be unsubscribed: nothing happens,
    the wanted channels and the link stay as they were."""
    broker = redis_broker(redis_server.url, redis_prefix, "a")
    assert isinstance(broker, redis_broker_module.RedisBroker)
    try:
        await broker.subscribe("g:kept")
        first = broker._link
        await broker.unsubscribe("g:never")
        await broker.unsubscribe("g:kept")
        await broker.unsubscribe("g:kept")  # twice
        assert broker._wanted == {} and broker._link is first and first is not None and not first.failed
    finally:
        await broker.close()


async def test_only_a_cluster_link_refreshes_a_slot_map(redis_server: RedisServer, redis_prefix: str) -> None:
    """One server (or Sentinel's master) has no slot map: nothing asks for a refresh of it."""
    broker = redis_broker(redis_server.url, redis_prefix, "a")
    assert isinstance(broker, redis_broker_module.RedisBroker)
    try:
        await broker.subscribe("g:room")
        link = broker._link
        assert link is not None
        broker._refresh_soon(link)
        assert link.refreshing is None
    finally:
        await broker.close()


async def test_a_sentinel_that_names_a_replica_fails_the_attempt_saying_it_is_not_a_master_yet(
    sentinel_set: SentinelSet, redis_prefix: str
) -> None:
    """Sentinel's answer is out of date and names a replica (here, once: discover is patched): ROLE
    says so, the attempt fails with where and why, and the next one reaches the master."""
    broker = redis_broker(sentinel_set.url, redis_prefix, "a")
    assert isinstance(broker, redis_broker_module.RedisBroker)
    topology = broker._topology
    real = topology.discover
    master = sentinel_set.master_port()
    replica = Address("127.0.0.1", next(s.port for s in sentinel_set.servers()[:2] if s.port != master))
    stale = [True]

    async def discover(options: Any) -> Any:
        if stale:
            stale.pop()
            return [replica]
        return await real(options)

    topology.discover = discover  # type: ignore[method-assign]
    a = Collector(broker)  # reading messages() opens the link
    try:
        with capture_logs() as logs:
            await eventually(lambda: broker.ready, 10)
        [line] = [e for e in logs if e["event"] == "broker.connect_failed"]
        assert line["error"] == f"{replica} is not a master yet"
        assert broker._link is not None and list(broker._link.nodes) == [Address("127.0.0.1", master)]
    finally:
        await a.stop()


async def test_a_master_that_holds_role_unanswered_while_the_link_opens_is_given_up_after_redis_timeout(
    sentinel_set: SentinelSet, redis_prefix: str
) -> None:
    """Sentinel names the master (here through a proxy that holds each reply 0.2 s); the link's
    command connection stops being answered just before ROLE is asked: the attempt is given up
    after redis_timeout (0.5 s) and logged, not held for ever, and the next one comes up."""
    async with RedisProxy(sentinel_set.master_port()) as proxy:
        sentinels = tuple(Address("127.0.0.1", s.port) for s in sentinel_set.sentinels)
        topology = SentinelTopology(sentinels, sentinel_set.name, None)
        broker = redis_broker_module.RedisBroker(  # without relay's functions: ROLE comes first
            topology, ConnectOptions(timeout=0.5), pod_id="a", prefix=redis_prefix, history=False
        )
        real = topology.discover

        async def discover(options: Any) -> Any:
            await real(options)
            topology._address = Address("127.0.0.1", proxy.port)  # where it routes, too
            return [topology._address]

        topology.discover = discover  # type: ignore[method-assign]
        proxy.delay(0.2)
        a = Collector(broker)  # reading messages() opens the link
        try:
            with capture_logs() as logs:
                await eventually(lambda: len(proxy._connections) >= 2)  # the pub/sub one is opening
                proxy.mute(0)  # the command connection, whose next command is ROLE
                await eventually(lambda: any(e["event"] == "broker.connect_failed" for e in logs), 10)
                await eventually(lambda: broker.ready, 10)
            [line] = [e for e in logs if e["event"] == "broker.connect_failed"]
            assert line["error"] == "TimeoutError"
        finally:
            await a.stop()


async def test_a_sentinel_link_asks_about_its_master_no_more_often_than_every_probe_interval(
    sentinel_set: SentinelSet, redis_prefix: str
) -> None:
    """Each master check opens a connection to a Sentinel: probe interval 1 s (a watch tick of
    0.25 s), and the checks come a probe interval apart, not on every tick."""
    timings = {"redis_probe_interval": 1.0, "redis_timeout": 2.0}
    broker = redis_broker(sentinel_set.url, redis_prefix, "a", **timings)
    assert isinstance(broker, redis_broker_module.RedisBroker)
    topology = broker._topology
    real = topology.confirm
    asked: list[float] = []

    async def confirm(address: Any, options: Any) -> bool:
        asked.append(time.monotonic())
        return await real(address, options)

    topology.confirm = confirm  # type: ignore[method-assign]
    try:
        await broker.subscribe("g:room")
        await eventually(lambda: len(asked) >= 3, 15)
        gaps = [later - earlier for earlier, later in itertools.pairwise(asked)]
        assert all(gap >= 0.9 for gap in gaps), gaps  # 1 s, less how much faster ROLE came back
    finally:
        await broker.close()


async def test_a_message_already_on_its_way_when_its_group_is_left_is_dropped_and_the_link_goes_on(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """Redis has sent a message to the pod (the test's blocking call holds the event loop until
    it has) when the hub unsubscribes its channel: it arrives for a channel nobody wants, is
    dropped, and the link carries on. Probes are 30 s apart, so none is outstanding."""
    broker = redis_broker(redis_server.url, redis_prefix, "a", redis_probe_interval=30.0)
    assert isinstance(broker, redis_broker_module.RedisBroker)
    a = Collector(broker)
    try:
        await broker.subscribe("g:left", "g:kept")
        first = broker._link
        assert redis_server.call("PUBLISH", f"{redis_prefix}:g:left", "1 0.0 \nin flight") == 1
        await broker.unsubscribe("g:left")
        assert await broker.publish(env("after", "g:kept")) == 1
        assert [e.frame for e in await a.wait_for(1)] == ["after"]
        assert broker._link is first and first is not None and not first.failed
    finally:
        await a.stop()


def _cluster_broker(redis_cluster: RedisCluster, prefix: str, pod_id: str, **overrides: Any) -> Any:
    broker = redis_broker(redis_cluster.url, prefix, pod_id, **overrides)
    assert isinstance(broker, redis_broker_module.RedisBroker)
    return broker


@pytest.mark.xdist_group("redis-cluster")
async def test_a_cluster_unsubscribe_is_confirmed_on_the_same_link_without_a_slot_map_refresh(
    redis_cluster: RedisCluster, redis_prefix: str
) -> None:
    """SUNSUBSCRIBE, confirmed: the channel is gone from its shard, the link is kept, and only an
    unasked sunsubscribe (a slot moved away) would make relay read the slot map again."""
    broker = _cluster_broker(redis_cluster, redis_prefix, "u" + secrets.token_hex(3))
    name = f"{redis_prefix}:g:go"
    shard = redis_cluster.node_for_slot(key_slot(name.encode()))
    try:
        await broker.subscribe("g:stay", "g:go")
        first = broker._link
        assert shard.call("PUBSUB", "SHARDNUMSUB", name)[1] == 1
        refreshes = metric("relay_redis_slot_map_refreshes_total")
        await broker.unsubscribe("g:go")
        if first.refreshing is not None:  # had one begun, it would count once done
            await asyncio.wait([first.refreshing])
        assert metric("relay_redis_slot_map_refreshes_total") == refreshes
        assert broker._link is first and not first.failed
        assert shard.call("PUBSUB", "SHARDNUMSUB", name)[1] == 0
        assert await broker.publish(env("kept", "g:stay")) == 1
    finally:
        await broker.close()


@pytest.mark.xdist_group("redis-cluster")
async def test_a_slot_map_refresh_has_twice_redis_timeout(
    redis_cluster: RedisCluster, redis_prefix: str
) -> None:
    """CLUSTER SLOTS, connecting new primaries and moving subscriptions get 2 x redis_timeout
    together: a refresh that takes 1.25 x is followed, one that takes 2.5 x gives up (the error
    names the timeout) and rebuilds the link."""
    timeout = 0.4
    broker = _cluster_broker(redis_cluster, redis_prefix, "a", redis_timeout=timeout)
    topology = broker._topology
    real = topology.discover
    delay = [0.0]

    async def slow(options: Any) -> Any:
        await asyncio.sleep(delay[0])
        return await real(options)

    try:
        await broker.subscribe("g:room")
        link = broker._link
        topology.discover = slow
        delay[0] = 1.25 * timeout
        with capture_logs() as logs:
            broker._refresh_soon(link)
            await link.refreshing
        assert [e["event"] for e in logs if e["event"].startswith("broker.slot_map")] == [
            "broker.slot_map_refreshed"
        ]
        assert broker._link is link and not link.failed
        delay[0] = 2.5 * timeout
        with capture_logs() as logs:
            broker._refresh_soon(link)
            await link.refreshing
        [line] = [e for e in logs if e["event"].startswith("broker.slot_map")]
        assert line == {
            "event": "broker.slot_map_refresh_failed", "log_level": "warning", "error": "TimeoutError"
        }  # fmt: skip
        assert link.failed and link.broken.result() == "topology_changed"
    finally:
        await broker.close()


@pytest.mark.xdist_group("redis-cluster")
async def test_a_refresh_whose_moved_subscriptions_go_unconfirmed_rebuilds_the_link(
    redis_cluster: RedisCluster, redis_prefix: str
) -> None:
    """A slot moves; its channel's new owner takes the SSUBSCRIBE but does not answer within
    redis_timeout (here: CLIENT PAUSE): the refresh gives up, says so, and the link is rebuilt,
    which subscribes the channel on its new owner once that answers again."""
    channel = "g:paused"
    name = f"{redis_prefix}:{channel}"
    slot = key_slot(name.encode())
    source = redis_cluster.node_for_slot(slot)
    target = next(p for p in redis_cluster.primaries() if p is not source)
    broker = _cluster_broker(redis_cluster, redis_prefix, "a", redis_probe_interval=30.0, redis_timeout=0.4)
    topology = broker._topology
    real = topology.discover
    pause = [True]

    async def then_pause(options: Any) -> Any:
        addresses = await real(options)
        if pause[0]:
            pause[0] = False
            target.call("CLIENT", "PAUSE", 1500, "ALL")
        return addresses

    try:
        await broker.subscribe(channel)
        first = broker._link
        topology.discover = then_pause
        with capture_logs() as logs:
            redis_cluster.move_slot(slot, target)  # the old owner tells the pod: sunsubscribe
            await eventually(lambda: first.failed)
        [line] = [e for e in logs if e["event"].startswith("broker.slot_map")]
        assert line == {
            "event": "broker.slot_map_refresh_failed",
            "log_level": "warning",
            "error": "Redis did not confirm the moved subscriptions in time",
        }
        assert first.broken.result() == "topology_changed"
        await eventually(lambda: target.call("PUBSUB", "SHARDNUMSUB", name)[1] == 1, 10)
    finally:
        pause[0] = False
        await broker.close()
        redis_cluster.give_back(slot, source)


@pytest.mark.xdist_group("redis-cluster")
async def test_a_primary_left_without_slots_is_let_go_and_the_link_carries_on(
    redis_cluster: RedisCluster, redis_prefix: str
) -> None:
    """After a reshard a primary may own no slot: a refresh closes the pod's connections to it
    and keeps the rest of the link. A command that was waiting there (here a BLPOP, idempotent) is
    not sent again on the same link, whose outcome there is unknown: it is refused after
    redis_timeout, as no new link comes. (The reshard is shown to the pod, not made: its CLUSTER
    SLOTS reply is rewritten so that one primary's ranges belong to another.)"""
    pod_id = "retire" + secrets.token_hex(3)
    broker = _cluster_broker(redis_cluster, redis_prefix, pod_id, redis_probe_interval=30.0)
    topology = broker._topology
    real = topology._load
    primaries = redis_cluster.primaries()
    # The pod's subscription stays where it is: a primary shown without slots that really held it
    # would answer MOVED to its resubscription, and the refresh would rightly fail the link.
    room = redis_cluster.node_for_slot(key_slot(f"{redis_prefix}:g:room".encode()))
    emptied, heir = [p for p in primaries if p is not room][:2]
    rewrite = [False]

    def load(reply: Any, seed: Any) -> Any:
        if rewrite[0]:
            heir_node = next(e[2] for e in reply if e[2][1] == heir.port)
            reply = [[s, e, heir_node if node[1] == emptied.port else node] for s, e, node, *_ in reply]
        return real(reply, seed)

    def ours(server: RedisServer) -> int:
        return str(server.call("CLIENT", "LIST")).count(f"name=relay:{pod_id} ")

    try:
        await broker.subscribe("g:room")
        link = broker._link
        assert ours(emptied) == 2  # commands and pub/sub
        keys = (f"{redis_prefix}:k{n}" for n in range(1000))
        key = next(k for k in keys if redis_cluster.node_for_slot(key_slot(k.encode())) is emptied)
        waiting = asyncio.create_task(broker.command(key.encode(), b"BLPOP", key, b"10", idempotent=True))
        await eventually(lambda: emptied.info("clients")["blocked_clients"] >= 1)
        topology._load = load
        rewrite[0] = True
        with capture_logs() as logs:
            broker._refresh_soon(link)
            await link.refreshing
        with pytest.raises(BrokerUnavailable, match="lost before Redis answered"):
            await asyncio.wait_for(waiting, 5)
        [line] = [e for e in logs if e["event"].startswith("broker.slot_map")]
        assert line["event"] == "broker.slot_map_refreshed"
        assert sorted(line["nodes"]) == sorted(p.address for p in primaries if p is not emptied)
        assert broker._link is link and not link.failed
        assert Address("127.0.0.1", emptied.port) not in link.nodes
        await eventually(lambda: ours(emptied) == 0)
        assert all(ours(p) == 2 for p in primaries if p is not emptied)
    finally:
        await broker.close()


class _LongDelays:
    """Stands in for redis.py's `random`: every backoff is a minute, so the supervisor waits."""

    def uniform(self, low: float, high: float) -> float:
        return 60.0


async def test_between_attempts_a_subscribe_is_refused_at_once(
    dedicated_redis: RedisServer, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only while a link is being opened does a subscribe wait (up to redis_timeout, 2 s here) for
    it; between attempts, in an outage, it is refused at once. The channel stays wanted."""
    monkeypatch.setattr(redis_broker_module, "random", _LongDelays())
    broker = redis_broker(dedicated_redis.url, redis_prefix, "a", redis_timeout=2.0)
    assert isinstance(broker, redis_broker_module.RedisBroker)
    try:
        await broker.subscribe("g:room")
        dedicated_redis.kill()
        await eventually(lambda: metric("relay_redis_up") == 0 and not broker._connecting)
        started = time.monotonic()
        down = r"^the Redis link is down: the subscription could not be confirmed$"
        with pytest.raises(BrokerUnavailable, match=down):
            await broker.subscribe("g:other")
        assert time.monotonic() - started < 1.0
        assert set(broker._wanted.values()) == {"g:room", "g:other"}
    finally:
        await broker.close()


async def test_a_broker_closed_before_it_was_used_refuses_a_subscribe_at_once(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """Nothing is being opened (nothing ever started the link): no wait for one (redis_timeout 5 s)."""
    broker = redis_broker(redis_server.url, redis_prefix, "a", redis_timeout=5.0)
    await broker.close()
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        await broker.subscribe("g:room")
    assert time.monotonic() - started < 1.0


async def test_while_a_lost_link_is_opened_again_a_subscribe_waits_for_it(
    dedicated_redis: RedisServer, redis_prefix: str
) -> None:
    """The other half of the test above: after the link is lost, while the next one is being opened
    (held here at the start, until the subscribe has begun), a subscribe waits for it and succeeds."""
    broker = redis_broker(dedicated_redis.url, redis_prefix, "a", redis_timeout=5.0)
    assert isinstance(broker, redis_broker_module.RedisBroker)
    topology = broker._topology
    real = topology.discover
    reopening, go_on = asyncio.Event(), asyncio.Event()

    async def discover(options: Any) -> Any:
        reopening.set()
        await go_on.wait()
        return await real(options)

    try:
        await broker.subscribe("g:room")
        first = broker._link
        topology.discover = discover  # type: ignore[method-assign]
        dedicated_redis.call("CLIENT", "KILL", "TYPE", "pubsub")
        await asyncio.wait_for(reopening.wait(), 5)
        assert broker._link is None
        asyncio.get_running_loop().call_soon(go_on.set)  # once the subscribe below waits
        await broker.subscribe("g:other")
        assert broker._link not in (None, first)
        assert dedicated_redis.call("PUBSUB", "NUMSUB", f"{redis_prefix}:g:other")[1] == 1
    finally:
        go_on.set()
        await broker.close()


@pytest.mark.xdist_group("redis-cluster")
async def test_a_subscribe_waiting_on_a_refresh_the_link_ends_under_is_refused_not_cancelled(
    redis_cluster: RedisCluster, redis_prefix: str
) -> None:
    """A subscribe answered MOVED waits for the slot map refresh before trying again; the link
    dies during that refresh (here one of the pod's connections is killed), which cancels the
    refresh. The subscribe is refused (BrokerUnavailable), not cancelled: a caller must not take
    the link's end for its own cancellation."""
    channel = "g:cut-refresh"
    slot = key_slot(f"{redis_prefix}:{channel}".encode())
    source = redis_cluster.node_for_slot(slot)
    target = next(p for p in redis_cluster.primaries() if p is not source)
    pod_id = "cut" + secrets.token_hex(3)
    broker = _cluster_broker(redis_cluster, redis_prefix, pod_id, redis_probe_interval=30.0)
    topology = broker._topology
    real = topology.discover
    cut = [False]

    async def cut_then_discover(options: Any) -> Any:
        if cut[0]:
            cut[0] = False
            await asyncio.sleep(0.2)  # the subscribe is waiting for this refresh now
            clients = target.call("CLIENT", "LIST").splitlines()
            ours = next(c.split()[0][3:] for c in clients if f"name=relay:{pod_id} " in c)
            target.call("CLIENT", "KILL", "ID", ours)
            await asyncio.sleep(1.0)  # cancelled, as the link ends
        return await real(options)

    try:
        await broker.subscribe("g:first")
        first = broker._link
        topology.discover = cut_then_discover
        cut[0] = True
        redis_cluster.move_slot(slot, target)
        with pytest.raises(BrokerUnavailable):
            await broker.subscribe(channel)
        assert first.failed
        await eventually(lambda: broker.ready and broker._link is not first)
    finally:
        cut[0] = False
        await broker.close()
        redis_cluster.give_back(slot, source)


@pytest.mark.xdist_group("redis-cluster")
async def test_a_link_that_ends_while_opening_waits_on_a_refresh_is_opened_again(
    redis_cluster: RedisCluster, redis_prefix: str
) -> None:
    """The same while a link is being opened: a slot moves between CLUSTER SLOTS and the
    subscriptions, so the opening waits for a refresh, and the link ends during it. The attempt
    fails and the supervisor tries again: it is not cancelled (liveness would fail for good)."""
    channel = "g:moving"
    slot = key_slot(f"{redis_prefix}:{channel}".encode())
    source = redis_cluster.node_for_slot(slot)
    target = next(p for p in redis_cluster.primaries() if p is not source)
    pod_id = "reopen" + secrets.token_hex(3)
    broker = _cluster_broker(redis_cluster, redis_prefix, pod_id, redis_probe_interval=30.0)
    topology = broker._topology
    real = topology.discover
    step = [0]

    def kill_one(server: RedisServer) -> None:
        clients = server.call("CLIENT", "LIST").splitlines()
        server.call(
            "CLIENT", "KILL", "ID", next(c.split()[0][3:] for c in clients if f"name=relay:{pod_id} " in c)
        )

    async def discover(options: Any) -> Any:
        step[0] += 1
        if step[0] == 2:  # the refresh the opening waits for: the link ends under it
            await asyncio.sleep(0.2)
            kill_one(target)
            await asyncio.sleep(1.0)
        addresses = await real(options)
        if step[0] == 1:  # the map just read is stale before it is used
            redis_cluster.move_slot(slot, target)
        return addresses

    try:
        await broker.subscribe(channel)
        first = broker._link
        step[0] = 0
        topology.discover = discover
        kill_one(source)  # the link is opened again
        await eventually(lambda: step[0] >= 3, 10)
        await eventually(lambda: broker.ready and broker._link is not first, 10)
        assert broker.alive
        assert target.call("PUBSUB", "SHARDNUMSUB", f"{redis_prefix}:{channel}")[1] == 1
    finally:
        step[0] = 99
        await broker.close()
        redis_cluster.give_back(slot, source)


async def test_both_connections_of_a_link_carry_the_pods_name(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """CLIENT LIST on Redis shows `relay:<pod id>` for the command and the pub/sub connection of a
    pod, so an operator can tell whose connection is whose (docs/redis.md)."""
    pod_id = f"named-{secrets.token_hex(4)}"
    collector = Collector(redis_broker(redis_server.url, redis_prefix, pod_id))
    try:
        await collector.broker.subscribe("g:room")
        clients = redis_server.call("CLIENT", "LIST").splitlines()
        assert sum(f" name=relay:{pod_id} " in line for line in clients) == 2
    finally:
        await collector.stop()


def _route_elsewhere(broker: Any, channel: str, address: Address) -> None:
    """Make the broker's topology route one channel to another primary (as a cluster's new one)."""
    topology = broker._topology
    real = topology.route
    name = f"{broker._prefix.decode()}{channel}".encode()
    topology.route = lambda c: address if c == name else real(c)


async def test_a_primary_opened_while_the_link_lives_is_probed_like_the_first(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """A new primary (here a proxy in front of the same Redis) joins the link for a publish: the
    watch probes it when it is idle, as it does the primaries the link was opened with."""
    async with RedisProxy(redis_server.port) as proxy:
        broker = redis_broker(redis_server.url, redis_prefix, "a")
        assert isinstance(broker, redis_broker_module.RedisBroker)
        elsewhere = Address("127.0.0.1", proxy.port)
        _route_elsewhere(broker, "g:new", elsewhere)
        probed: list[Address] = []
        real = broker._send_probe

        def send_probe(node: Any) -> str:
            probed.append(node.address)
            return real(node)

        broker._send_probe = send_probe  # type: ignore[method-assign]
        try:
            await broker.publish(env("here"))
            first = broker._link
            assert await broker.publish(env("there", "g:new")) == 0
            probed.clear()
            await eventually(lambda: probed.count(elsewhere) >= 2)
            assert first is not None and broker._link is first and not first.failed
        finally:
            await broker.close()


async def test_a_connection_lost_while_its_primary_is_being_opened_fails_the_attempt_and_leaves_nothing_open(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """The command connection is cut while the pub/sub one is still being opened (a proxy holds
    Redis's replies 0.4 s): the attempt fails, saying so, and is made again; the pub/sub connection
    of the failed attempt is closed (it was left open to Redis for good), and nothing is reported
    to asyncio's exception handler."""
    pod_id = "cut" + secrets.token_hex(3)

    def ours() -> int:
        return sum(
            f" name=relay:{pod_id} " in f" {c} " for c in redis_server.call("CLIENT", "LIST").splitlines()
        )

    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    async with RedisProxy(redis_server.port) as proxy:
        proxy.delay(0.4)
        broker = redis_broker(proxy.url, redis_prefix, pod_id, redis_timeout=3.0)
        a = Collector(broker)
        try:
            with capture_logs() as logs:
                await eventually(lambda: len(proxy._connections) >= 2)  # the pub/sub one is opening
                for writer in proxy._connections[0]:  # the command connection, both ways
                    writer.close()
                proxy.delay(0)
                await eventually(lambda: broker.ready, 10)
            [line, *_] = [e for e in logs if e["event"] == "broker.connect_failed"]
            assert line["error"] == "connection closed"
            await eventually(lambda: ours() == 2)  # the link's two connections, nothing else
            assert errors == []
        finally:
            await a.stop()
            loop.set_exception_handler(None)


async def test_a_primary_that_cannot_be_reached_is_refused_counted_and_tried_again_next_time(
    redis_server: RedisServer, redis_prefix: str, tmp_path: Path
) -> None:
    """A channel's primary that nothing answers at yet (a cluster's new primary still starting):
    the command is refused at once with where and why, counted as lost to a link that is down.
    The failure is not kept: the next command tries again, and once the primary listens it is
    carried, on the same link."""
    broker = redis_broker(redis_server.url, redis_prefix, "a")
    assert isinstance(broker, redis_broker_module.RedisBroker)
    port = free_port()
    _route_elsewhere(broker, "g:elsewhere", Address("127.0.0.1", port))
    late: RedisServer | None = None
    try:
        await broker.publish(env("here"))
        first = broker._link
        down = metric("relay_broker_lost_total", reason="link_down")
        with pytest.raises(BrokerUnavailable, match=rf"^cannot reach the primary at 127\.0\.0\.1:{port}: \S"):
            await broker.publish(env("nowhere", "g:elsewhere"))
        assert metric("relay_broker_lost_total", reason="link_down") == down + 1
        late = start_redis(tmp_path / "late", port=port)
        assert await broker.publish(env("now it listens", "g:elsewhere")) == 0
        assert broker._link is first and first is not None and not first.failed
    finally:
        await broker.close()
        if late is not None:
            late.kill()


async def test_concurrent_first_commands_to_a_new_primary_open_it_once(
    redis_server: RedisServer, dedicated_redis: RedisServer, redis_prefix: str
) -> None:
    """Five commands at once for a primary the link has not connected yet (dedicated_redis, as a
    cluster's new primary): it is opened once, two connections, and closing the broker leaves none
    of the pod's connections behind there."""
    pod_id = "once" + secrets.token_hex(3)
    broker = redis_broker(redis_server.url, redis_prefix, pod_id)
    assert isinstance(broker, redis_broker_module.RedisBroker)
    _route_elsewhere(broker, "g:new", Address("127.0.0.1", dedicated_redis.port))

    def ours() -> int:
        return str(dedicated_redis.call("CLIENT", "LIST")).count(f" name=relay:{pod_id} ")

    try:
        await broker.publish(env("here"))
        reached = await asyncio.gather(*(broker.publish(env(f"m{n}", "g:new")) for n in range(5)))
        assert reached == [0] * 5
        assert ours() == 2  # commands and pub/sub
    finally:
        await broker.close()
    await eventually(lambda: ours() == 0)


async def test_pods_sharing_a_redis_load_relays_functions_without_a_false_alarm(
    dedicated_redis: RedisServer, redis_prefix: str
) -> None:
    """Every pod loads relay's functions when it connects (FUNCTION LOAD REPLACE): the second pod
    on a Redis that holds them already replaces them quietly. No pod says history is unavailable,
    and appends from either are stored."""
    a = redis_broker(dedicated_redis.url, redis_prefix, "a")
    b = redis_broker(dedicated_redis.url, redis_prefix, "b")
    try:
        with capture_logs() as logs:
            first = await a.append(env("from a", "g:{h}"), Retention(5, 60), "key-a")
            second = await b.append(env("from b", "g:{h}"), Retention(5, 60), "key-b")
        assert (first.position.offset, second.position.offset) == (1, 2)
        assert [e for e in logs if e["log_level"] == "error"] == []
        assert not [e for e in logs if e["event"] == "broker.history_unavailable"]
    finally:
        await a.close()
        await b.close()


async def test_a_killed_command_connection_ends_the_link_at_once(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """Only the connection that carries a pod's commands is closed (CLIENT KILL, a proxy, a
    timeout on the server): the link is rebuilt at once (connection_lost), not left refusing every
    publish until a probe, 30 s apart here, notices."""
    pod_id = "cmd" + secrets.token_hex(3)
    broker = redis_broker(redis_server.url, redis_prefix, pod_id, redis_probe_interval=30.0)
    assert isinstance(broker, redis_broker_module.RedisBroker)
    try:
        await broker.subscribe("g:room")
        first = broker._link
        lost = metric("relay_redis_link_failures_total", reason="connection_lost")
        clients = redis_server.call("CLIENT", "LIST").splitlines()
        [command] = [c.split()[0][3:] for c in clients if f" name=relay:{pod_id} " in c and " flags=N " in c]
        redis_server.call("CLIENT", "KILL", "ID", command)
        await eventually(lambda: broker._link not in (None, first))
        assert metric("relay_redis_link_failures_total", reason="connection_lost") == lost + 1
        assert await broker.publish(env("carried")) == 1
    finally:
        await broker.close()


async def test_a_redis_that_refuses_relays_probe_channel_says_so_in_the_failed_attempt(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """An ACL that lets relay's groups through but not its probe channels: the link cannot be
    proven, so no attempt succeeds. The failed attempt is counted and its line names the primary
    and what it did not confirm (with Redis's own refusal beside it); it is not logged as a bug."""
    user, password = "relay-" + secrets.token_hex(4), secrets.token_hex(8)
    groups = f"&{redis_prefix}:g:*"
    redis_server.call("ACL", "SETUSER", user, "on", ">" + password, "+@all", "~*", "resetchannels", groups)
    broker = redis_broker(f"redis://{user}:{password}@127.0.0.1:{redis_server.port}", redis_prefix, "a")
    failed = metric("relay_redis_link_failures_total", reason="connect_failed")
    try:
        with capture_logs() as logs:
            with pytest.raises(BrokerUnavailable):
                await broker.subscribe("g:room")
            await eventually(lambda: any(e["event"] == "broker.connect_failed" for e in logs))
        [line] = [e for e in logs if e["event"] == "broker.connect_failed"]
        assert line["error"] == f"127.0.0.1:{redis_server.port} did not confirm the probe channel"
        assert any(e["error"].startswith("NOPERM") for e in logs if e["event"] == "broker.subscribe_refused")
        assert not [e for e in logs if e["event"] == "broker.supervisor_error"]
        assert metric("relay_redis_link_failures_total", reason="connect_failed") > failed
    finally:
        await broker.close()
        redis_server.call("ACL", "DELUSER", user)


async def test_subscriptions_unconfirmed_while_the_link_is_opened_fail_the_attempt_saying_so(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """The probe channel is confirmed, then Redis's replies on the pub/sub connection stop (the
    proxy drops them from the moment the wanted channels are subscribed): the attempt fails after
    redis_timeout, and its line says Redis did not confirm in time; the next attempt comes up."""
    async with RedisProxy(redis_server.port) as proxy:
        broker = redis_broker(proxy.url, redis_prefix, "a")
        assert isinstance(broker, redis_broker_module.RedisBroker)
        real = broker._reconcile
        muted: list[bool] = []

        async def reconcile(link: Any) -> bool:
            if not muted:
                muted.append(True)
                proxy.mute(-1)  # the newest connection: this link's pub/sub one
            return await real(link)

        broker._reconcile = reconcile  # type: ignore[method-assign]
        try:
            with capture_logs() as logs:
                with pytest.raises(BrokerUnavailable):
                    await broker.subscribe("g:room")
                await eventually(lambda: broker.ready, 10)
            [line] = [e for e in logs if e["event"] == "broker.connect_failed"]
            assert line["error"] == "Redis did not confirm the subscriptions in time"
        finally:
            await broker.close()


async def test_a_channel_wanted_while_the_opening_probe_is_out_and_left_unconfirmed_fails_the_attempt(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """As above, for the channels wanted while the link's first probe was out (subscribed after
    it): Redis stops confirming just then, the attempt fails saying so, the next one comes up
    subscribed to that channel too."""
    async with RedisProxy(redis_server.port) as proxy:
        broker = redis_broker(proxy.url, redis_prefix, "a")
        assert isinstance(broker, redis_broker_module.RedisBroker)
        real = broker._reconcile
        calls = 0
        late: list[asyncio.Task[None]] = []

        async def reconcile(link: Any) -> bool:
            nonlocal calls
            calls += 1
            if calls == 2:  # the second, after the probe: a hub join has come meanwhile
                late.append(asyncio.ensure_future(broker.subscribe("g:late")))
                await asyncio.sleep(0)  # (it is wanted as soon as it runs, and waits for the link)
                proxy.mute(-1)  # the newest connection: this link's pub/sub one
            return await real(link)

        broker._reconcile = reconcile  # type: ignore[method-assign]
        a = Collector(broker)  # reading messages() opens the link
        try:
            with capture_logs() as logs:
                await eventually(lambda: calls >= 2 and broker.ready, 10)
            [line] = [e for e in logs if e["event"] == "broker.connect_failed"]
            assert line["error"] == "Redis did not confirm the subscriptions in time"
            with contextlib.suppress(BrokerUnavailable):  # it may have waited for the next link
                await late[0]
            name = f"{redis_prefix}:g:late"
            await eventually(lambda: redis_server.call("PUBSUB", "NUMSUB", name)[1] == 1)
        finally:
            await a.stop()


async def test_a_link_that_ends_while_it_is_opened_says_why_in_the_failed_attempt(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """The pod holds a group; then its ACL loses that group and its connections are cut. Each new
    link ends while it is opened, as Redis refuses the group's subscription: the failed attempt says
    so, with the link's reason, rather than that Redis was too slow to confirm."""
    user, password = "relay-" + secrets.token_hex(4), secrets.token_hex(8)
    probes, groups = f"&{redis_prefix}:probe:*", f"&{redis_prefix}:g:*"
    redis_server.call(
        "ACL", "SETUSER", user, "on", ">" + password, "+@all", "~*", "resetchannels", probes, groups
    )
    broker = redis_broker(f"redis://{user}:{password}@127.0.0.1:{redis_server.port}", redis_prefix, "a")
    try:
        await broker.subscribe("g:room")
        with capture_logs() as logs:
            redis_server.call("ACL", "SETUSER", user, "resetchannels", probes)
            redis_server.call("CLIENT", "KILL", "USER", user)
            await eventually(lambda: any(e["event"] == "broker.connect_failed" for e in logs))
        line = next(e for e in logs if e["event"] == "broker.connect_failed")
        assert line["error"].startswith("the link failed while it was being opened (")
    finally:
        await broker.close()
        redis_server.call("ACL", "DELUSER", user)


async def test_a_redis_that_holds_relays_functions_unanswered_is_given_up_after_redis_timeout(
    dedicated_redis: RedisServer, redis_prefix: str
) -> None:
    """Redis accepts the connections and names them, then holds FUNCTION LOAD unanswered (here
    CLIENT PAUSE WRITE; a Redis busy in a long script alike): each attempt is given up after
    redis_timeout, counted and logged, instead of waiting for ever; once Redis answers, the link
    comes up."""
    dedicated_redis.call("CLIENT", "PAUSE", 60_000, "WRITE")
    broker = redis_broker(dedicated_redis.url, redis_prefix, "a")  # redis_timeout 0.5 s
    try:
        with capture_logs() as logs:
            with pytest.raises(BrokerUnavailable):
                await broker.subscribe("g:room")
            await eventually(lambda: any(e["event"] == "broker.connect_failed" for e in logs), 10)
        [line] = [e for e in logs if e["event"] == "broker.connect_failed"]
        assert line["error"] == "TimeoutError"
        dedicated_redis.call("CLIENT", "UNPAUSE")
        await eventually(lambda: broker.ready, 10)
        assert await broker.publish(env("carried")) == 1
    finally:
        dedicated_redis.call("CLIENT", "UNPAUSE")
        await broker.close()


async def test_a_redis_that_holds_the_announced_rules_unanswered_is_given_up_after_redis_timeout(
    dedicated_redis: RedisServer, redis_prefix: str
) -> None:
    """As above, for the group rules each link writes (SET) as it opens: held unanswered (CLIENT
    PAUSE WRITE; without relay's functions, nothing before it writes), each attempt is given up
    after redis_timeout and logged, and the link comes up once Redis answers."""
    dedicated_redis.call("CLIENT", "PAUSE", 60_000, "WRITE")
    broker = redis_broker_module.RedisBroker(
        SingleTopology(Address("127.0.0.1", dedicated_redis.port)),
        ConnectOptions(timeout=0.5),
        pod_id="a",
        prefix=redis_prefix,
        probe_interval=0.2,
        backoff_max=0.3,
        announce={b"rules": b"{}"},
        history=False,
    )
    try:
        with capture_logs() as logs:
            with pytest.raises(BrokerUnavailable):
                await broker.subscribe("g:room")
            await eventually(lambda: any(e["event"] == "broker.connect_failed" for e in logs), 10)
        [line] = [e for e in logs if e["event"] == "broker.connect_failed"]
        assert line["error"] == "TimeoutError"
        dedicated_redis.call("CLIENT", "UNPAUSE")
        await eventually(lambda: broker.ready, 10)
        assert dedicated_redis.call("GET", f"{redis_prefix}:rules") == "{}"
    finally:
        dedicated_redis.call("CLIENT", "UNPAUSE")
        await broker.close()


async def test_a_group_left_while_the_link_is_being_opened_is_not_left_subscribed(
    dedicated_redis: RedisServer, redis_prefix: str
) -> None:
    """A group is left while a new link is being opened, after that link subscribed it but before
    its probe came back (here CLIENT PAUSE WRITE holds the probe's PUBLISH): before the link is up
    it unsubscribes the group, so Redis does not go on sending the pod a group nobody there wants."""
    broker = redis_broker_module.RedisBroker(
        SingleTopology(Address("127.0.0.1", dedicated_redis.port)),
        ConnectOptions(timeout=5.0),
        pod_id="a",
        prefix=redis_prefix,
        probe_interval=30.0,
        backoff_max=0.3,
        history=False,  # FUNCTION LOAD is a write: the pause would hold it too
    )
    left, kept = f"{redis_prefix}:g:left", f"{redis_prefix}:g:kept"

    def subscribers(name: str) -> int:
        return int(dedicated_redis.call("PUBSUB", "NUMSUB", name)[1])

    try:
        await broker.subscribe("g:left", "g:kept")
        dedicated_redis.call("CLIENT", "PAUSE", 60_000, "WRITE")
        dedicated_redis.call("CLIENT", "KILL", "TYPE", "pubsub")
        # the old link is gone and the new one, not up yet, subscribed both again
        await eventually(lambda: broker._link is None and subscribers(left) == subscribers(kept) == 1, 10)
        await broker.unsubscribe("g:left")
        dedicated_redis.call("CLIENT", "UNPAUSE")
        await eventually(lambda: broker.ready, 10)
        assert (subscribers(left), subscribers(kept)) == (0, 1)
    finally:
        dedicated_redis.call("CLIENT", "UNPAUSE")
        await broker.close()


async def test_the_resync_notice_takes_its_place_in_the_backlog_like_any_envelope(
    dedicated_redis: RedisServer, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The notice of a new link (RESYNC) waits in the backlog with what was read before it, and
    counts as one envelope there: once the hub took all of it, the backlog holds MAX_BACKLOG (3
    here) again, no more and no fewer."""
    monkeypatch.setattr(redis_broker_module, "MAX_BACKLOG", 3)
    broker = redis_broker(dedicated_redis.url, redis_prefix, "a")
    assert isinstance(broker, redis_broker_module.RedisBroker)
    try:
        await broker.subscribe("g:room")
        messages = broker.messages()
        first = broker._link
        assert await broker.publish(env("before")) == 1  # not read before the link is rebuilt
        dedicated_redis.call("CLIENT", "KILL", "TYPE", "pubsub")
        await eventually(lambda: broker._link not in (None, first))
        got = [await asyncio.wait_for(anext(messages), 5) for _ in range(2)]
        assert [got[0].frame, got[1]] == ["before", RESYNC]
        lost = metric("relay_broker_lost_total", reason="backlog")
        for n in range(5):  # nobody reads messages() meanwhile
            await broker.publish(env(f"m{n}"))
        await eventually(lambda: metric("relay_broker_lost_total", reason="backlog") >= lost + 2)
        got = [await asyncio.wait_for(anext(messages), 5) for _ in range(3)]
        assert [e.frame for e in got] == ["m0", "m1", "m2"]
        assert metric("relay_broker_lost_total", reason="backlog") == lost + 2
    finally:
        await broker.close()


async def test_a_new_primary_too_slow_to_open_is_refused_after_redis_timeout(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """A channel's primary answers, but each reply takes 0.3 s (a proxy holds them): its two
    connections, relay's functions and the probe channel take five replies, 1.5 s, each in time
    but together more than the redis_timeout (1 s here) a primary has to open in. The command is
    refused after redis_timeout, not carried however late."""
    async with RedisProxy(redis_server.port) as proxy:
        broker = redis_broker(redis_server.url, redis_prefix, "a", redis_timeout=1.0)
        _route_elsewhere(broker, "g:slow", Address("127.0.0.1", proxy.port))
        try:
            await broker.publish(env("here"))
            proxy.delay(0.3)
            started = time.monotonic()
            with pytest.raises(
                BrokerUnavailable, match=rf"^cannot reach the primary at 127\.0\.0\.1:{proxy.port}: "
            ):
                await broker.publish(env("late", "g:slow"))
            assert time.monotonic() - started < 2.5
        finally:
            await broker.close()


async def test_a_command_waiting_on_a_primary_the_link_ends_under_is_refused_not_cancelled(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """The link ends while a new primary is being opened for a publish (its replies held by a
    proxy). Ending the link cancels the opening; the publish waiting on it is refused with
    BrokerUnavailable, which the hub turns into an answer, not cancelled as if its caller had gone."""
    async with RedisProxy(redis_server.port) as proxy:
        broker = redis_broker(redis_server.url, redis_prefix, "a", redis_timeout=5.0)
        assert isinstance(broker, redis_broker_module.RedisBroker)
        _route_elsewhere(broker, "g:slow", Address("127.0.0.1", proxy.port))
        try:
            await broker.publish(env("here"))
            link = broker._link
            assert link is not None
            proxy.delay(0.5)
            waiting = asyncio.create_task(broker.publish(env("late", "g:slow")))
            await eventually(lambda: bool(link.opening))
            link.fail("test")
            with pytest.raises(
                BrokerUnavailable,
                match=rf"^cannot reach the primary at 127\.0\.0\.1:{proxy.port}: the link ended$",
            ):
                await asyncio.wait_for(waiting, 5)
        finally:
            await broker.close()


async def test_a_subscription_redis_refuses_in_part_is_refused_whole(
    redis_server: RedisServer, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One channel per SUBSCRIBE, two in flight (monkeypatched): Redis confirms the first and
    refuses the second (an ACL), which ends the link. The call is refused, not reported done: the
    third channel was never sent on that link."""
    monkeypatch.setattr(redis_broker_module, "SUBSCRIBE_BATCH", 1)
    monkeypatch.setattr(redis_broker_module, "SUBSCRIBE_WINDOW", 2)
    user, password = "relay-" + secrets.token_hex(4), secrets.token_hex(8)
    allowed = [f"&{redis_prefix}:probe:*", f"&{redis_prefix}:g:ok*"]
    redis_server.call("ACL", "SETUSER", user, "on", ">" + password, "+@all", "~*", "resetchannels", *allowed)
    broker = redis_broker(f"redis://{user}:{password}@127.0.0.1:{redis_server.port}", redis_prefix, "a")
    try:
        await broker.subscribe("g:ok")
        with pytest.raises(BrokerUnavailable):
            await broker.subscribe("g:ok2", "g:forbidden", "g:ok3")
    finally:
        await broker.close()
        redis_server.call("ACL", "DELUSER", user)

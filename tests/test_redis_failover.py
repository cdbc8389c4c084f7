"""Failovers: the primary dies and a replica takes over; the broker follows it without a restart.

Sentinel and the cluster both wait ~1 s (down-after / node-timeout in tests/redis_servers.py)
before they promote, so these tests allow 15 s and report what it took.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
import redis
from prometheus_client import REGISTRY
from redis.crc import key_slot

from service.broker import BrokerUnavailable, Envelope
from service.broker.redis import RedisBroker
from service.broker.resp import Address
from tests.brokers import Collector, delivered_again, eventually, redis_broker
from tests.helpers import metric
from tests.redis_servers import RedisCluster, SentinelSet

pytestmark = pytest.mark.integration

FAILOVER = 15.0


@pytest.mark.xdist_group("redis-sentinel")
async def test_sentinel_master_killed_the_broker_finds_the_promoted_replica(
    dedicated_sentinel_set: SentinelSet, redis_prefix: str
) -> None:
    """SIGKILL the master: Sentinel promotes the replica, both pods re-discover it and deliver."""
    sentinels = dedicated_sentinel_set
    a = Collector(redis_broker(sentinels.url, redis_prefix, "a"))
    b = Collector(redis_broker(sentinels.url, redis_prefix, "b"))
    try:
        await b.broker.subscribe("g:room")
        assert await a.broker.publish(Envelope("g:room", "before", time.time())) == 1
        await b.wait_for(1)
        sentinels.primary.kill()
        await eventually(lambda: not b.broker.ready, 5)
        took = await delivered_again(a, b, "g:room", FAILOVER)
        assert sentinels.master_port() == sentinels.replica.port
        print(f"sentinel failover: delivery resumed {took:.2f} s after the master was killed")
    finally:
        await a.stop()
        await b.stop()


@pytest.mark.xdist_group("redis-cluster-failover")
async def test_cluster_primary_killed_the_broker_follows_the_new_slot_owner(
    dedicated_cluster: RedisCluster, redis_prefix: str
) -> None:
    """SIGKILL the primary owning a group's slot: its replica takes over and delivery resumes on that
    shard; groups on the other shards come back too."""
    cluster = dedicated_cluster
    a = Collector(redis_broker(cluster.url, redis_prefix, "a"))
    b = Collector(redis_broker(cluster.url, redis_prefix, "b"))
    try:
        await b.broker.subscribe("g:victim", "g:bystander")
        victim = cluster.node_for_slot(key_slot(f"{redis_prefix}:g:victim".encode()))
        assert await a.broker.publish(Envelope("g:victim", "before", time.time())) == 1
        await b.wait_for(1)
        victim.kill()
        took = await delivered_again(a, b, "g:victim", FAILOVER)
        assert cluster.node_for_slot(key_slot(f"{redis_prefix}:g:victim".encode())) is not victim
        await delivered_again(a, b, "g:bystander", 5)
        print(f"cluster failover: delivery resumed {took:.2f} s after the primary was killed")
    finally:
        await a.stop()
        await b.stop()


@pytest.mark.xdist_group("redis-cluster")
async def test_a_moved_slot_is_followed_without_dropping_the_link(
    redis_cluster: RedisCluster, redis_prefix: str
) -> None:
    """Resharding moves a group's slot. The publisher's next SPUBLISH is answered MOVED: the broker
    refreshes the slot map and sends it again, and that very message arrives. The subscriber's
    subscription follows the slot (Redis pushes an sunsubscribe when it leaves). Nothing else is
    torn down: no link is rebuilt, and a group on another shard never stops delivering."""
    cluster = redis_cluster
    channel, bystander = "g:moving", "g:bystander"
    slot = key_slot(f"{redis_prefix}:{channel}".encode())
    source = cluster.node_for_slot(slot)
    target = next(p for p in cluster.primaries() if p is not source)
    while cluster.node_for_slot(key_slot(f"{redis_prefix}:{bystander}".encode())) in (source, target):
        bystander += "x"  # a group on the third shard
    a = Collector(redis_broker(cluster.url, redis_prefix, "a"))
    b = Collector(redis_broker(cluster.url, redis_prefix, "b"))
    try:
        await b.broker.subscribe(channel, bystander)
        assert await a.broker.publish(Envelope(channel, "before", time.time())) == 1
        await b.wait_for(1)
        failures = sum_metric("relay_redis_link_failures_total")
        refreshes = metric("relay_redis_slot_map_refreshes_total")
        cluster.move_slot(slot, target)
        full_name = f"{redis_prefix}:{channel}"
        # b's subscription follows the slot: Redis dropped it on the source, b moves it.
        await eventually(lambda: target.call("PUBSUB", "SHARDNUMSUB", full_name)[1] == 1, 10)
        # a's map is stale: this SPUBLISH goes to the source, is answered MOVED and sent again.
        frame = "answered MOVED, then sent again"
        assert await a.broker.publish(Envelope(channel, frame, time.time())) == 1
        await eventually(lambda: metric("relay_redis_slot_map_refreshes_total") > refreshes, 5)
        assert await a.broker.publish(Envelope(bystander, "other shard", time.time())) == 1
        await eventually(lambda: {frame, "other shard"} <= {e.frame for e in b.envelopes}, 5)
        assert sum_metric("relay_redis_link_failures_total") == failures  # no link was rebuilt
        assert a.broker.ready and b.broker.ready
    finally:
        await a.stop()
        await b.stop()
        if cluster.node_for_slot(slot) is not source:
            cluster.move_slot(slot, source)


@pytest.mark.xdist_group("redis-cluster")
async def test_ask_sends_the_command_once_to_the_importing_node_and_keeps_the_map(
    redis_cluster: RedisCluster, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """During a migration the source answers ASK for a key it no longer holds: the command goes to
    the importing node after ASKING, this once, and the slot map is not changed (the Cluster spec).
    Keyed commands are what history (issue 11) sends; SPUBLISH itself never gets ASK."""
    cluster = redis_cluster
    key = f"{{{redis_prefix}}}:ask".encode()
    slot = key_slot(key)
    source = cluster.node_for_slot(slot)
    target = next(p for p in cluster.primaries() if p is not source)
    broker = redis_broker(cluster.url, redis_prefix, "a")
    assert isinstance(broker, RedisBroker)
    source.call("SET", key.decode(), "moved along")
    source_id, target_id = source.call("CLUSTER", "MYID"), target.call("CLUSTER", "MYID")
    try:
        await broker.command(b"", b"PING")  # connected, with the map as it is
        target.call("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        source.call("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        source.call("MIGRATE", "127.0.0.1", target.port, key.decode(), 0, 5000)
        refreshes = metric("relay_redis_slot_map_refreshes_total")
        assert await broker.command(key, b"GET", key) == b"moved along"
        assert broker._topology.route(key) == Address("127.0.0.1", source.port)  # the map stands
        assert metric("relay_redis_slot_map_refreshes_total") == refreshes
        await asyncio.sleep(0)  # the ASKING reply's callback has run
        assert not [r for r in caplog.records if r.name == "asyncio"]  # it is retrieved quietly
    finally:
        await broker.close()
        with redis.Redis(port=target.port, single_connection_client=True) as importing:
            importing.execute_command("ASKING")  # the target answers for the slot only after ASKING
            importing.delete(key)  # an empty slot can be handed back
        for node in cluster.primaries():
            node.call("CLUSTER", "SETSLOT", slot, "NODE", source_id)


@pytest.mark.xdist_group("redis-cluster")
async def test_nodes_announcing_no_endpoint_are_reached_where_they_were_asked(
    redis_cluster: RedisCluster, redis_prefix: str
) -> None:
    """`cluster-preferred-endpoint-type unknown-endpoint` (nodes behind a load balancer) makes
    CLUSTER SLOTS answer NULL endpoints, which mean "the host you asked, this port"."""
    cluster = redis_cluster
    for node in cluster.nodes_alive():
        node.call("CONFIG", "SET", "cluster-preferred-endpoint-type", "unknown-endpoint")
    try:
        slots = cluster.nodes_alive()[0].call("CLUSTER", "SLOTS")
        assert all(entry[2][0] is None for entry in slots), slots  # what relay must cope with
        a = Collector(redis_broker(cluster.url, redis_prefix, "a"))
        b = Collector(redis_broker(cluster.url, redis_prefix, "b"))
        try:
            groups = [f"g:{n}" for n in range(12)]  # on every shard
            await b.broker.subscribe(*groups)
            for group in groups:
                assert await a.broker.publish(Envelope(group, group, time.time())) == 1
            assert sorted(e.frame for e in await b.wait_for(len(groups))) == sorted(groups)
        finally:
            await a.stop()
            await b.stop()
    finally:
        for node in cluster.nodes_alive():
            node.call("CONFIG", "SET", "cluster-preferred-endpoint-type", "ip")


@pytest.mark.xdist_group("redis-sentinel")
async def test_a_demoted_master_is_left_even_while_the_link_is_busy(
    dedicated_sentinel_set: SentinelSet, redis_prefix: str
) -> None:
    """A demoted master still takes PUBLISH and serves its own subscribers, so a busy pod (never
    idle, so never probed) could go on publishing into it, unheard by pods on the new master. ROLE
    is asked every probe interval, busy or not."""
    sentinels = dedicated_sentinel_set
    a = Collector(redis_broker(sentinels.url, redis_prefix, "a"))
    try:
        await a.broker.subscribe("g:busy")
        stop = asyncio.Event()

        async def keep_busy() -> None:  # a's own messages keep its pub/sub link from going quiet
            n = 0
            while not stop.is_set():
                n += 1
                with contextlib.suppress(BrokerUnavailable):
                    await a.broker.publish(Envelope("g:busy", f"busy {n}", time.time()))
                await asyncio.sleep(0.02)

        busy = asyncio.create_task(keep_busy())
        sentinels.sentinels[0].call("SENTINEL", "FAILOVER", sentinels.name)
        await eventually(lambda: sentinels.master_port() == sentinels.replica.port, 15)
        c = Collector(redis_broker(sentinels.url, redis_prefix, "c"))  # on the new master
        try:
            await c.broker.subscribe("g:busy")
            took = await delivered_again(a, c, "g:busy", 10)
            print(f"busy pod followed the demotion within {took:.2f} s")
        finally:
            stop.set()
            await busy
            await c.stop()
    finally:
        await a.stop()


def sum_metric(name: str) -> float:
    """A labelled counter summed over its labels."""
    return sum(
        sample.value for family in REGISTRY.collect() for sample in family.samples if sample.name == name
    )

"""Failovers: the primary dies and a replica takes over; the broker follows it without a restart.

Sentinel and the cluster both wait ~1 s (down-after / node-timeout in tests/redis_servers.py)
before they promote, so these tests allow 15 s and report what it took.
"""

from __future__ import annotations

import time

import pytest
from redis.crc import key_slot

from service.broker import Envelope
from tests.brokers import Collector, delivered_again, eventually, redis_broker
from tests.helpers import metric
from tests.redis_servers import RedisCluster, RedisServer, SentinelSet, wait_until

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


def move_slot(cluster: RedisCluster, slot: int, source: RedisServer, target: RedisServer) -> None:
    """Reshard one (keyless) slot from `source` to `target`, as redis-cli --cluster reshard does."""
    source_id, target_id = source.call("CLUSTER", "MYID"), target.call("CLUSTER", "MYID")
    target.call("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
    source.call("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
    for node in (target, source, *cluster.primaries()):
        node.call("CLUSTER", "SETSLOT", slot, "NODE", target_id)
    wait_until(lambda: cluster.node_for_slot(slot) is target, 10, f"slot {slot} to move")


@pytest.mark.xdist_group("redis-cluster")
async def test_a_publish_answered_moved_during_resharding_is_sent_again(
    redis_cluster: RedisCluster, redis_prefix: str
) -> None:
    """Resharding moves a group's slot: the publisher's next SPUBLISH is answered MOVED; the broker
    follows the new slot map and sends it again instead of losing it, and delivery goes on."""
    cluster = redis_cluster
    channel = "g:moving"
    slot = key_slot(f"{redis_prefix}:{channel}".encode())
    source = cluster.node_for_slot(slot)
    target = next(p for p in cluster.primaries() if p is not source)
    a = Collector(redis_broker(cluster.url, redis_prefix, "a"))
    b = Collector(redis_broker(cluster.url, redis_prefix, "b"))
    try:
        await b.broker.subscribe(channel)
        assert await a.broker.publish(Envelope(channel, "before", time.time())) == 1
        await b.wait_for(1)
        move_slot(cluster, slot, source, target)
        rejected = metric("relay_broker_lost_total", reason="rejected")
        await a.broker.publish(Envelope(channel, "answered MOVED, then sent again", time.time()))
        assert metric("relay_broker_lost_total", reason="rejected") == rejected
        await delivered_again(a, b, channel, 10)  # b follows too, once its subscription is moved
    finally:
        await a.stop()
        await b.stop()
        if cluster.node_for_slot(slot) is not source:
            move_slot(cluster, slot, cluster.node_for_slot(slot), source)

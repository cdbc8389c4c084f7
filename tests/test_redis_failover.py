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

"""Several real pods (uvicorn on free ports, one event loop) meeting in a real Redis.

Clients are real WebSocket clients speaking the seed protocol; pods share nothing but Redis.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import httpx
import pytest
from redis.crc import key_slot

from service import channels
from service.server import PodServer
from tests.brokers import FAST_REDIS, eventually
from tests.helpers import Client, join, metric, running_pod, ws_url
from tests.redis_servers import RedisCluster, RedisServer, SentinelSet

pytestmark = pytest.mark.integration


@asynccontextmanager
async def pods(url: str, prefix: str, count: int, **overrides: Any) -> AsyncIterator[list[PodServer]]:
    async with AsyncExitStack() as stack:
        found = [
            await stack.enter_async_context(
                running_pod(broker_url=url, pod_id=f"pod{n}", redis_prefix=prefix, **FAST_REDIS, **overrides)
            )
            for n in range(count)
        ]
        yield found


async def close_all(*clients: Client) -> None:
    await asyncio.gather(*(c.ws.close() for c in clients))


async def exchange(sender: Client, group: str, receivers: list[Client], timeout: float = 5.0) -> None:
    """`sender` publishes once to `group`; every receiver gets exactly that frame."""
    body = await sender.publish(group, n=time.monotonic())
    for receiver in receivers:
        assert await receiver.next(timeout) == {"message": body}


async def status(server: PodServer, path: str) -> int:
    """The status of GET `path` on the pod's internal port (async: the pod runs in this loop)."""
    async with httpx.AsyncClient() as client:
        return (await client.get(f"http://127.0.0.1:{server.internal_port}{path}", timeout=5)).status_code


async def until_status(server: PodServer, path: str, code: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while await status(server, path) != code:
        assert time.monotonic() < deadline, f"{path} never answered {code}"
        await asyncio.sleep(0.05)


@pytest.mark.xdist_group("redis-single")
async def test_group_messages_and_direct_sends_cross_three_pods(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """A member on each pod gets what a client on any pod publishes; a direct send finds its pod."""
    async with pods(redis_server.url, redis_prefix, 3) as (p0, p1, p2):
        a = await join(ws_url(p0, "/room"))
        b = await join(ws_url(p1, "/room"))
        c = await join(ws_url(p2, "/lobby"))
        await exchange(a, "room", [a, b])
        await exchange(c, "room", [a, b])  # a non-member may publish
        marker = await c.publish("room", marker="no copies before me")
        await a.nothing_before(marker)
        await b.nothing_before(marker)
        body = await a.direct(c.channel_id, hello="c")
        assert await c.next() == {"message": body}
        await b.nothing_before(await a.direct(b.channel_id, marker="the direct send was not mine"))
        await close_all(a, b, c)


@pytest.mark.xdist_group("redis-single")
async def test_concurrent_publishers_on_two_pods_keep_order_and_never_duplicate(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """Four publishers on two pods, 200 messages each: every member sees each publisher's sequence
    once and in order."""
    async with pods(redis_server.url, redis_prefix, 2) as (p0, p1):
        members = [await join(ws_url(p, "/race")) for p in (p0, p1, p0, p1)]
        publishers = [await join(ws_url(p, "/elsewhere")) for p in (p0, p1, p0, p1)]

        async def publish(client: Client, name: str) -> None:
            for n in range(200):
                await client.publish("race", who=name, n=n)
            await client.publish("race", who=name, end=True)  # a duplicate would arrive before this

        await asyncio.gather(*(publish(c, f"p{i}") for i, c in enumerate(publishers)))
        for member in members:
            seen: dict[str, list[int]] = {}
            ended: set[str] = set()
            while len(ended) < 4:
                frame = (await member.next())["message"]
                assert frame["who"] not in ended, f"{frame} after its publisher's end marker"
                if frame.get("end"):
                    ended.add(frame["who"])
                else:
                    seen.setdefault(frame["who"], []).append(frame["n"])
            assert seen == {f"p{i}": list(range(200)) for i in range(4)}
        await close_all(*members, *publishers)


@pytest.mark.xdist_group("redis-single")
async def test_nothing_is_left_in_redis_after_every_member_leaves(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """Group subscriptions end with the last member on each pod; without history rules the relay
    writes one key, its (empty) rules for other writers, and nothing per group."""
    async with pods(redis_server.url, redis_prefix, 2) as (p0, p1):
        clients = [await join(ws_url(p, f"/g{n}")) for n in range(5) for p in (p0, p1)]
        groups = set(redis_server.call("PUBSUB", "CHANNELS", f"{redis_prefix}:g:*"))
        assert groups == {f"{redis_prefix}:{channels.group(f'g{n}')}" for n in range(5)}
        await close_all(*clients)
        await eventually(lambda: not redis_server.call("PUBSUB", "CHANNELS", f"{redis_prefix}:g:*"))
        assert redis_server.call("KEYS", f"{redis_prefix}*") == [f"{redis_prefix}:rules"]
        assert redis_server.call("GET", f"{redis_prefix}:rules") == '{"group":[]}'
    assert redis_server.call("PUBSUB", "CHANNELS", f"{redis_prefix}:*") == []  # pods gone: nothing


async def test_pods_stay_alive_through_a_redis_restart_and_deliver_again(
    dedicated_redis: RedisServer, redis_prefix: str
) -> None:
    """While Redis is down: healthz stays 200, readyz turns 503 (unless opted out), members stay
    connected, publishes are counted as failed. After the restart delivery resumes on its own."""
    async with (
        pods(dedicated_redis.url, redis_prefix, 2) as (p0, p1),
        running_pod(
            broker_url=dedicated_redis.url,
            pod_id="relaxed",
            redis_prefix=redis_prefix,
            ready_requires_broker=False,
            **FAST_REDIS,
        ) as relaxed,
    ):
        a = await join(ws_url(p0, "/room"))
        b = await join(ws_url(p1, "/room"))
        await exchange(a, "room", [a, b])
        failed = metric("relay_messages_received_total", outcome="broker_error")
        dedicated_redis.kill()
        await until_status(p0, "/readyz", 503)
        assert await status(p0, "/healthz") == 200
        assert await status(relaxed, "/readyz") == 200
        await a.publish("room", lost=True)
        await eventually(lambda: metric("relay_messages_received_total", outcome="broker_error") > failed)
        dedicated_redis.start()
        started = time.monotonic()
        await until_status(p0, "/readyz", 200)
        await until_status(p1, "/readyz", 200)
        await exchange(b, "room", [a, b])
        assert time.monotonic() - started < 5
        await close_all(a, b)


@pytest.mark.xdist_group("redis-sentinel")
async def test_pods_follow_a_sentinel_failover(
    dedicated_sentinel_set: SentinelSet, redis_prefix: str
) -> None:
    """SENTINEL FAILOVER promotes the replica; the pods re-discover the master and deliver again."""
    sentinels = dedicated_sentinel_set
    async with pods(sentinels.url, redis_prefix, 2) as (p0, p1):
        a = await join(ws_url(p0, "/room"))
        b = await join(ws_url(p1, "/room"))
        await exchange(a, "room", [a, b])
        old = sentinels.master_port()
        sentinels.sentinels[0].call("SENTINEL", "FAILOVER", sentinels.name)
        started = time.monotonic()
        await eventually(lambda: sentinels.master_port() != old, 10)
        took = await deliver_eventually(a, "room", [a, b], 10)
        assert time.monotonic() - started < 10, took
        await close_all(a, b)


async def deliver_eventually(sender: Client, group: str, receivers: list[Client], timeout: float) -> float:
    """Publish every half second until every receiver got the same frame; seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        body = await sender.publish(group, attempt=time.monotonic())
        try:
            for receiver in receivers:
                while await receiver.next(0.5) != {"message": body}:
                    pass  # an earlier attempt arriving late
        except TimeoutError:
            continue
        return time.monotonic() - started
    raise AssertionError(f"no delivery within {timeout} s")


@pytest.mark.xdist_group("redis-cluster")
async def test_cluster_spreads_groups_over_every_shard_and_delivers_across_pods(
    redis_cluster: RedisCluster, redis_prefix: str
) -> None:
    """Groups whose channels hash to each of the three primaries all deliver across pods, ride on
    sharded pub/sub (PUBSUB SHARDCHANNELS on their shard) and leave nothing behind."""
    primaries = redis_cluster.primaries()
    groups: dict[int, str] = {}
    n = 0
    while len(groups) < 3:
        name = f"shard{n}"
        owner = redis_cluster.node_for_slot(key_slot(f"{redis_prefix}:{channels.group(name)}".encode()))
        groups.setdefault(owner.port, name)
        n += 1
    assert set(groups) == {p.port for p in primaries}
    async with pods(redis_cluster.url, redis_prefix, 2) as (p0, p1):
        clients = {
            g: (await join(ws_url(p0, "/" + g)), await join(ws_url(p1, "/" + g))) for g in groups.values()
        }
        for port, group in groups.items():
            a, b = clients[group]
            await exchange(b, group, [a, b])
            owner = next(p for p in primaries if p.port == port)
            assert f"{redis_prefix}:{channels.group(group)}" in owner.call(
                "PUBSUB", "SHARDCHANNELS", f"{redis_prefix}:g:*"
            )
            assert owner.call("PUBSUB", "CHANNELS", f"{redis_prefix}:*") == []  # never classic pub/sub
        await close_all(*(c for pair in clients.values() for c in pair))
        await eventually(
            lambda: all(not p.call("PUBSUB", "SHARDCHANNELS", f"{redis_prefix}:g:*") for p in primaries)
        )

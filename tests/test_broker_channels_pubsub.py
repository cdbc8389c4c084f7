"""The Channels pub/sub bridge (service/broker/channels_pubsub.py) as pure logic: which of the app's
hosts carries a group, how its events become frames, and how BridgedBroker splits and merges traffic
(with memory brokers standing in for the Redis links; tests/test_channels_pubsub.py runs it against
real Redis and a real Django app)."""

from __future__ import annotations

import asyncio
import binascii
import json
import time
from pathlib import Path

import msgpack
import pytest

from service.broker import (
    Arrival,
    BrokerUnavailable,
    Envelope,
    Member,
    PresenceBatch,
    PresenceTerms,
    Present,
    Retention,
    memory,
    open_broker,
)
from service.broker.channels_pubsub import BridgedBroker, decode, group_channel, naming, shard
from service.broker.memory import MemoryBroker, MemoryBus
from service.broker.wire import BadPayload
from service.config import Settings
from tests.brokers import FAST_REDIS, Collector, eventually
from tests.helpers import metric
from tests.redis_servers import RedisServer, start_redis


def channels_redis_consistent_hash(value: str, ring_size: int) -> int:
    """channels_redis 4.x, channels_redis/utils.py `_consistent_hash`, copied as the oracle."""
    if ring_size == 1:
        return 0
    bigval = binascii.crc32(value.encode("utf8")) & 0xFFF
    ring_divisor = 4096 / float(ring_size)
    return int(bigval / ring_divisor)


@pytest.mark.parametrize("hosts", [1, 2, 3, 5])
def test_a_group_lives_on_the_host_channels_redis_picks(hosts: int) -> None:
    # 30,000 names cover every one of the 4,096 hash values, so every boundary between hosts.
    names = [group_channel("asgi", f"room-{n}") for n in range(30_000)]
    assert len({binascii.crc32(name.encode()) & 0xFFF for name in names}) == 4096
    picked = [shard(name, hosts) for name in names]
    assert picked == [channels_redis_consistent_hash(name, hosts) for name in names]
    assert set(picked) == set(range(hosts))


def test_the_group_channel_is_the_layers_name() -> None:
    assert group_channel("asgi", "chat") == "asgi__group__chat"
    assert naming("myapp")("g:{chat}") == b"myapp__group__chat"


def test_an_event_becomes_the_frame_the_consumer_would_send() -> None:
    before = time.time()
    event = {"type": "chat.message", "message": {"text": "hé", "n": [1, 2]}}
    got = decode("g:{chat}", msgpack.packb(event))
    assert got.channel == "g:{chat}" and got.target == "" and not got.command
    assert got.frame == json.dumps({"message": event["message"]})
    assert got.frame == '{"message": {"text": "h\\u00e9", "n": [1, 2]}}'
    assert before <= got.sent_at <= time.time()


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1",  # not msgpack
        b"",
        msgpack.packb({"type": "chat.message"}),  # no message
        msgpack.packb([1, 2]),
        msgpack.packb({"message": b"\xff"}),  # bytes: no JSON for it
    ],
)
def test_an_event_without_a_message_is_refused(payload: bytes) -> None:
    with pytest.raises(BadPayload):
        decode("g:{chat}", payload)


class Bridge:
    def __init__(self, hosts: int = 2) -> None:
        self.pods_bus = MemoryBus()
        self.app_buses = [MemoryBus() for _ in range(hosts)]
        self.primary = MemoryBroker(self.pods_bus)
        self.listeners = [MemoryBroker(bus) for bus in self.app_buses]
        self.broker = BridgedBroker(self.primary, self.listeners, "asgi")

    def listener_of(self, group: str) -> int:
        return shard(group_channel("asgi", group), len(self.listeners))


async def test_groups_are_subscribed_on_relays_redis_and_on_the_apps_host_pod_channels_only_on_relays() -> (
    None
):
    bridge = Bridge()
    groups = [f"room-{n}" for n in range(10)]
    await bridge.broker.subscribe("p:pod-a", *(f"g:{{{g}}}" for g in groups))
    assert bridge.primary.channels == {"p:pod-a", *(f"g:{{{g}}}" for g in groups)}
    for n, listener in enumerate(bridge.listeners):
        assert listener.channels == {f"g:{{{g}}}" for g in groups if bridge.listener_of(g) == n}
    assert all(listener.channels for listener in bridge.listeners)
    await bridge.broker.unsubscribe("p:pod-a", *(f"g:{{{g}}}" for g in groups[:5]))
    assert bridge.primary.channels == {f"g:{{{g}}}" for g in groups[5:]}
    assert set().union(*(listener.channels for listener in bridge.listeners)) == bridge.primary.channels
    await bridge.broker.close()


async def test_deliveries_of_both_are_merged_and_the_apps_are_counted() -> None:
    bridge = Bridge()
    collector = Collector(bridge.broker)
    await bridge.broker.subscribe("g:{chat}")
    counted = metric("relay_channels_pubsub_messages_total")
    await bridge.pods_bus.publish(Envelope("g:{chat}", "from relay", 1.0))
    app = bridge.app_buses[bridge.listener_of("chat")]
    await app.publish(Envelope("g:{chat}", "from the app", 2.0))
    await app.publish(Envelope("g:{chat}", "from the app again", 3.0))
    got = await collector.wait_for(3, 1.0)
    assert sorted(e.frame for e in got) == ["from relay", "from the app", "from the app again"]
    assert metric("relay_channels_pubsub_messages_total") == counted + 2  # the app's only
    await collector.stop()  # the pods' own link closing ends messages()
    assert not bridge.primary.channels and not any(listener.channels for listener in bridge.listeners)


async def test_a_listener_that_stops_does_not_end_the_stream_the_pods_link_does() -> None:
    bridge = Bridge()
    collector = Collector(bridge.broker)
    await bridge.broker.subscribe("g:{chat}")
    for n in range(3):  # the listener's end has long reached the pumps by the last one
        if n == 1:
            await bridge.listeners[0].close()
        await bridge.pods_bus.publish(Envelope("g:{chat}", f"still here {n}", 1.0))
        await collector.wait_for(n + 1, 1.0)
    assert [e.frame for e in collector.envelopes] == ["still here 0", "still here 1", "still here 2"]
    await bridge.primary.close()
    await asyncio.wait_for(collector._task, 1.0)  # messages() ended with the pods' link
    await bridge.broker.close()


async def test_publishes_and_history_go_to_relays_redis_only() -> None:
    bridge = Bridge()
    keep = Retention(10, 60)
    appended = await bridge.broker.append(Envelope("g:{h}", "m1", 1.0), keep, "k")
    assert appended.position.offset == 1
    assert (await bridge.broker.append(Envelope("g:{h}", "m1", 1.0), keep, "k")).duplicate
    await bridge.broker.append(Envelope("g:{h}", "m2", 1.0), keep, "")
    assert (await bridge.broker.history("g:{h}", 0, 1)).entries == [(1, "m1")]
    assert (await bridge.broker.history("g:{h}", None, 1)).entries == [(2, "m2")]
    started = await bridge.broker.history("g:{new}", None, 10, start=keep)
    assert started.epoch and started.top == 0
    assert await bridge.broker.publish(Envelope("g:{h}", "x", 1.0)) == 0
    assert set(bridge.pods_bus.streams) == {"g:{h}", "g:{new}"}
    assert not any(bus.streams for bus in bridge.app_buses)
    await bridge.broker.close()


async def test_the_deny_list_is_kept_on_relays_redis_only() -> None:
    """docs/security.md "Revocation": the record is relay's, read back exactly, for that key only."""
    bridge = Bridge()
    await bridge.broker.deny("user-1", 1764000000.5, 60)
    assert await bridge.primary.denied("user-1") == 1764000000.5
    assert await bridge.broker.denied("user-1") == 1764000000.5
    assert await bridge.broker.denied("user-2") is None
    assert not any(bus.denied for bus in bridge.app_buses)
    await bridge.broker.close()


async def test_presence_is_kept_on_relays_redis_only() -> None:
    """Presence, like history, is relay's own: written and read with the group's terms on relay's
    Redis (its events there too), never on the app's."""
    bridge = Bridge()
    collector = Collector(bridge.broker)
    await bridge.broker.subscribe("g:{chat}")
    terms, brief = PresenceTerms(60, 5, events=True), PresenceTerms(0.1, 5, events=True)
    batch = PresenceBatch([Arrival("c.1", "ann", '{"n":1}')], (), ["c.9"])
    assert await bridge.broker.presence_update("g:{chat}", terms, batch) == ["c.9"]
    await bridge.broker.presence_update("g:{chat}", brief, PresenceBatch([Arrival("c.2", "bob", "{}")]))
    assert await bridge.broker.presence_read("g:{chat}", terms, 5) == Present(
        2, 2, [Member("ann", 1, '{"n":1}'), Member("bob", 1, "{}")], False
    )
    await eventually(lambda: len(collector.envelopes) == 2, 1.0)  # the joins
    deadline = time.monotonic() + 5
    while (await bridge.broker.presence_read("g:{chat}", terms, 1)).users != 1:  # bob expires
        assert time.monotonic() < deadline, "bob's entry never expired"
        await asyncio.sleep(0.02)
    await collector.wait_for(3, 1.0)  # bob's leave, announced by the read that dropped him
    assert [e.event for e in collector.envelopes] == [True, True, True]
    assert set(bridge.pods_bus.presence) == {"g:{chat}"}
    assert not any(bus.presence for bus in bridge.app_buses)
    await collector.stop()


class Down(MemoryBroker):
    async def subscribe(self, *channels: str) -> None:
        raise BrokerUnavailable("the app's Redis is down")

    @property
    def alive(self) -> bool:
        return False


async def test_the_apps_redis_down_refuses_no_join_and_readiness_follows_relays_link() -> None:
    bridge = Bridge(1)
    bridge.broker = BridgedBroker(bridge.primary, [Down(MemoryBus())], "asgi")
    await bridge.broker.subscribe("g:{chat}")
    assert bridge.primary.channels == {"g:{chat}"}
    assert bridge.broker.ready
    assert not bridge.broker.alive  # a listener that can never deliver again: restart the pod
    await bridge.broker.close()
    assert not bridge.broker.ready


async def test_alive_while_every_link_is() -> None:
    bridge = Bridge()
    assert bridge.broker.alive and bridge.broker.ready
    await bridge.broker.close()


@pytest.mark.integration
async def test_open_broker_listens_on_each_of_the_apps_hosts_as_the_settings_say(
    redis_server: RedisServer, dedicated_redis: RedisServer, tmp_path: Path, redis_prefix: str
) -> None:
    """RELAY_CHANNELS_PUBSUB_URLS (two hosts) and _PREFIX: each group is heard on the host
    channels_redis picks, under the layer's name, as the consumer's frame. The listeners only
    listen: no rules, no history functions on the app's Redis. (tests/test_channels_pubsub.py does
    this with a real Django app.)"""
    other = start_redis(tmp_path / "app2")
    hosts = [dedicated_redis, other]
    settings = Settings(
        broker_url=redis_server.url,
        redis_prefix=redis_prefix,
        pod_id="a",
        channels_pubsub_urls=f"{dedicated_redis.url}, {other.url}",
        channels_pubsub_prefix="myapp",
        **FAST_REDIS,
    )
    broker = open_broker(settings)
    assert isinstance(broker, BridgedBroker)
    pod = Collector(broker)
    names = [f"room-{n}" for n in range(100)]
    on_host = [[g for g in names if shard(group_channel("myapp", g), 2) == n] for n in (0, 1)]
    groups = on_host[0][:3] + on_host[1][:3]
    try:
        await broker.subscribe(*(f"g:{{{g}}}" for g in groups))
        for group in groups:
            name, host = group_channel("myapp", group), hosts[shard(group_channel("myapp", group), 2)]
            await eventually(lambda: host.call("PUBSUB", "NUMSUB", name)[1] == 1)  # noqa: B023
            host.call("PUBLISH", name, msgpack.packb({"type": "chat.message", "message": group}))
        got = await pod.wait_for(len(groups))
        assert sorted((e.channel, e.frame) for e in got) == sorted(
            (f"g:{{{g}}}", json.dumps({"message": g})) for g in groups
        )
        for host in hosts:
            assert host.call("KEYS", "*") == [] and host.call("FUNCTION", "LIST") == []
            assert "name=relay:a " in host.call("CLIENT", "LIST")
        assert redis_server.call("GET", f"{redis_prefix}:rules") == '{"group":[]}'
    finally:
        await pod.stop()
        other.kill()


class MovedClock:
    """The monotonic clock memory.py reads, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def test_a_memory_deny_entry_lasts_its_seconds_and_is_gone_at_that_instant(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Denied until `seconds` have passed (docs/security.md, "Revocation"), as service/revocations.py
    keeps its local copy: at the instant itself the entry is gone, and forgotten. The memory bus
    here; the Redis brokers leave expiry to Redis (`PX`), whose clock a test cannot move."""
    clock = MovedClock()
    monkeypatch.setattr(memory, "time", clock)
    bus = MemoryBus()
    bus.deny("user-1", 1764000000.5, 30.0)
    clock.now = 1029.999
    assert bus.revoked_at("user-1") == 1764000000.5
    clock.now = 1030.0
    assert bus.revoked_at("user-1") is None
    assert "user-1" not in bus.denied

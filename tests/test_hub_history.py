"""The hub's side of groups with history, on the memory bus and on a real Redis: what a joining
member is sent first, what is counted, and a live message arriving while history is read."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from service.broker import Broker
from service.broker.memory import MemoryBroker, MemoryBus
from service.connection import Connection
from service.hub import Hub, Joined
from service.protocol import Since
from service.rules import GroupRule, GroupRules
from tests.brokers import eventually, redis_broker
from tests.fakes import FakeSocket, GatedBroker
from tests.helpers import metric
from tests.redis_servers import RedisServer

RULES = GroupRules([GroupRule("chat", 100, 60.0, False), GroupRule("dash", 10, 60.0, True)])


class Member:
    def __init__(self, hub: Hub, name: str, *, v1: bool = False) -> None:
        self.sock = FakeSocket()
        self.conn = Connection(f"{hub.pod_id}.{name}", self.sock.send, outbox_size=100, v1=v1)
        hub.register(self.conn)


@asynccontextmanager
async def running(broker: Broker) -> AsyncIterator[Hub]:
    hub = Hub(broker, "pod-a", rules=RULES)
    await hub.start()
    run = asyncio.create_task(hub.run())
    try:
        yield hub
    finally:
        await broker.close()
        await run


@pytest.fixture(params=["memory", "redis"])
def open_broker(request: pytest.FixtureRequest) -> Callable[[], Broker]:
    """Both brokers: the memory bus hands the hub's arguments over as objects, Redis must encode them."""
    if request.param == "memory":
        bus = MemoryBus()
        return lambda: MemoryBroker(bus)
    server: RedisServer = request.getfixturevalue("redis_server")
    prefix: str = request.getfixturevalue("redis_prefix")
    return lambda: redis_broker(server.url, prefix, "pod-a")


async def test_a_member_joining_from_a_position_gets_what_it_missed_then_live(
    open_broker: Callable[[], Broker],
) -> None:
    async with running(open_broker()) as hub:
        frames = [f'{{"message":"m{n}"}}' for n in range(5)]
        first = await hub.publish("chat", frames[1])
        assert first.position is not None
        await hub.publish("chat", frames[2])
        await hub.publish("chat", frames[3])
        a = Member(hub, "a", v1=True)
        recovered = metric("relay_recoveries_total", result="recovered")
        joined = await hub.join(a.conn, "chat", Since(first.position.epoch, 1))
        assert joined.recovered is True and joined.reason is None
        assert metric("relay_recoveries_total", result="recovered") == recovered + 1
        assert joined.position is not None and joined.position.offset == 3
        await hub.publish("chat", frames[4])
        epoch = first.position.epoch
        want = [f'{{"group":"chat","epoch":"{epoch}","offset":{n},"message":"m{n}"}}' for n in (2, 3, 4)]
        await eventually(lambda: len(a.sock.texts) == 3)
        assert a.sock.texts == want


async def test_a_latest_group_sends_a_joiner_only_the_latest_message(
    open_broker: Callable[[], Broker],
) -> None:
    async with running(open_broker()) as hub:
        for n in (1, 2, 3):
            await hub.publish("dash", f'{{"message":{n}}}')
        a = Member(hub, "a")
        recovered = metric("relay_recovered_messages_total")
        joined = await hub.join(a.conn, "dash")
        assert joined.recovered is None and joined.position is not None and joined.position.offset == 3
        assert a.sock.texts == ['{"message":3}']
        assert metric("relay_recovered_messages_total") == recovered + 1


async def test_history_reads_are_counted_by_purpose() -> None:
    def reads() -> dict[str, float]:
        return {p: metric("relay_history_reads_total", purpose=p) for p in ("recovery", "latest", "position")}

    async with running(MemoryBroker(MemoryBus())) as hub:
        before = reads()
        await hub.join(Member(hub, "a").conn, "chat")
        await hub.join(Member(hub, "b").conn, "dash")
        await hub.join(Member(hub, "c").conn, "chat", Since("E1", 0))
        await hub.join(Member(hub, "d").conn, "chat", Since("E1", 0))
        after = reads()
        assert {p: after[p] - before[p] for p in after} == {"recovery": 2, "latest": 1, "position": 1}


async def test_a_message_published_while_history_is_read_follows_it_once() -> None:
    broker = GatedBroker(MemoryBus())
    async with running(broker) as hub:
        first = await hub.publish("chat", "m1")
        assert first.position is not None
        await hub.publish("chat", "m2")
        other = Member(hub, "other")
        await hub.join(other.conn, "chat")  # the pod is subscribed: live messages arrive meanwhile
        a = Member(hub, "a")
        broker.hold("history")
        joining = asyncio.create_task(hub.join(a.conn, "chat", Since(first.position.epoch, 1)))
        await broker.arrived("history")
        await hub.publish("chat", "m3")  # stored after the read began: live, and held for a
        await eventually(lambda: other.sock.texts == ["m3"])
        assert a.sock.texts == []  # held until history has been sent
        broker.release("history")
        joined = await joining
        assert joined == Joined(joined.position, True, None)
        await eventually(lambda: len(a.sock.texts) >= 2)
        await asyncio.sleep(0.05)  # a duplicate would arrive right behind
        assert a.sock.texts == ["m2", "m3"]


async def test_a_member_that_missed_nothing_is_recovered_with_nothing_to_send(
    open_broker: Callable[[], Broker],
) -> None:
    async with running(open_broker()) as hub:
        top = (await hub.publish("chat", '{"message":1}')).position
        assert top is not None
        a = Member(hub, "a")
        joined = await hub.join(a.conn, "chat", Since(top.epoch, top.offset))
        assert joined == Joined(top, True, None)
        assert a.sock.texts == []


@pytest.mark.parametrize(
    ("since", "reason"),
    [(Since("Egone", 1), "epoch_changed"), (Since("current", 99), "epoch_changed")],
)
async def test_a_member_from_another_epoch_or_the_future_is_told_nothing_can_be_recovered(
    since: Since, reason: str
) -> None:
    async with running(MemoryBroker(MemoryBus())) as hub:
        top = (await hub.publish("chat", '{"message":1}')).position
        assert top is not None
        if since.epoch == "current":
            since = Since(top.epoch, since.offset)
        a = Member(hub, "a")
        failed = metric("relay_recoveries_total", result=reason)
        joined = await hub.join(a.conn, "chat", since)
        assert joined == Joined(top, False, reason)
        assert a.sock.texts == []  # nothing of the old history: the client starts over
        assert metric("relay_recoveries_total", result=reason) == failed + 1


async def test_a_join_from_a_position_in_a_group_with_no_history_yet_has_no_position() -> None:
    async with running(MemoryBroker(MemoryBus())) as hub:
        a = Member(hub, "a")
        joined = await hub.join(a.conn, "chat", Since("E1", 4))
        assert joined == Joined(None, False, "epoch_changed")  # the ack carries no epoch or offset

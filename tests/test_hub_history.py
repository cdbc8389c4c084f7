"""The hub's side of groups with history, on the memory bus and on a real Redis: what a joining
member is sent first, what is counted, and a live message arriving while history is read."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from service import channels
from service.broker import Broker, BrokerUnavailable, Envelope, History, Position, Retention
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


class SlowReply(GatedBroker):
    """History read at once but its reply held back until `answer()`, as a Redis reply in flight:
    messages published meanwhile are not in it."""

    def __init__(self, bus: MemoryBus) -> None:
        super().__init__(bus)
        self.replying = asyncio.Event()
        self._answer = asyncio.Event()
        self.slow = False

    def answer(self) -> None:
        self._answer.set()

    async def history(
        self, channel: str, after: int | None, limit: int, start: Retention | None = None
    ) -> History:
        found = await super().history(channel, after, limit, start)
        if self.slow:
            self.replying.set()
            await self._answer.wait()
        return found


@pytest.mark.parametrize("v1", [False, True])
async def test_messages_around_the_history_read_reach_a_recovering_member_once_and_in_order(v1: bool) -> None:
    broker = SlowReply(MemoryBus())
    async with running(broker) as hub:
        frames = [f'{{"message":"m{n}"}}' for n in range(6)]
        first = await hub.publish("chat", frames[1])
        assert first.position is not None
        epoch = first.position.epoch
        await hub.publish("chat", frames[2])
        other = Member(hub, "other")
        await hub.join(other.conn, "chat")  # the pod is subscribed: live messages keep arriving
        a = Member(hub, "a", v1=v1)
        broker.hold("history")
        broker.slow = True
        joining = asyncio.create_task(hub.join(a.conn, "chat", Since(epoch, 1)))
        await broker.arrived("history")
        await hub.publish("chat", frames[3])  # before the read: in history, and held for a as well
        await eventually(lambda: len(other.sock.texts) == 1)
        broker.release("history")
        await asyncio.wait_for(broker.replying.wait(), 5)
        await hub.publish("chat", frames[4])  # after the read: only held
        await eventually(lambda: len(other.sock.texts) == 2)
        broker.answer()
        await joining
        await hub.publish("chat", frames[5])  # live again
        await eventually(lambda: len(a.sock.texts) >= 4)
        await asyncio.sleep(0.05)  # a duplicate would arrive right behind
        if v1:
            want = [
                f'{{"group":"chat","epoch":"{epoch}","offset":{n},"message":"m{n}"}}' for n in (2, 3, 4, 5)
            ]
        else:
            want = frames[2:]
        assert a.sock.texts == want


async def test_a_message_a_member_saw_elsewhere_is_not_sent_again_when_it_arrives_late() -> None:
    """The client saw offset 3 on another pod and reconnects here before this pod delivered 3."""
    broker = GatedBroker(MemoryBus())
    async with running(broker) as hub:
        first = await hub.publish("chat", '{"message":1}')
        assert first.position is not None
        await hub.publish("chat", '{"message":2}')
        await hub.join(Member(hub, "other").conn, "chat")
        a = Member(hub, "a")
        broker.hold("history")
        joining = asyncio.create_task(hub.join(a.conn, "chat", Since(first.position.epoch, 3)))
        await broker.arrived("history")
        await hub.publish("chat", '{"message":3}')
        broker.release("history")
        assert await joining == Joined(Position(first.position.epoch, 3), True, None)
        await asyncio.sleep(0.05)
        assert a.sock.texts == []


@pytest.mark.parametrize("since", [None, Since("current", 99)], ids=["plain", "unrecoverable"])
async def test_a_message_published_during_a_join_that_recovers_nothing_is_delivered(
    since: Since | None,
) -> None:
    broker = GatedBroker(MemoryBus())
    async with running(broker) as hub:
        if since is not None:
            first = (await hub.publish("chat", '{"message":1}')).position
            assert first is not None
            since = Since(first.epoch, since.offset)
        await hub.join(Member(hub, "other").conn, "chat")
        a = Member(hub, "a")
        broker.hold("history")
        joining = asyncio.create_task(hub.join(a.conn, "chat", since))
        await broker.arrived("history")
        await hub.publish("chat", '{"message":"live"}')
        broker.release("history")
        await joining
        await eventually(lambda: a.sock.texts == ['{"message":"live"}'])


async def test_two_members_recovering_at_once_each_get_history_before_live() -> None:
    broker = SlowReply(MemoryBus())
    async with running(broker) as hub:
        first = await hub.publish("chat", '{"message":1}')
        assert first.position is not None
        await hub.join(Member(hub, "other").conn, "chat")
        a, b = Member(hub, "a"), Member(hub, "b")
        broker.slow = True
        joining_a = asyncio.create_task(hub.join(a.conn, "chat", Since(first.position.epoch, 0)))
        await asyncio.wait_for(broker.replying.wait(), 5)  # a's reply is in flight
        broker.slow = False
        broker.hold("history")
        joining_b = asyncio.create_task(hub.join(b.conn, "chat", Since(first.position.epoch, 0)))
        await broker.arrived("history")  # b is reading too
        broker.answer()
        await joining_a
        await hub.publish("chat", '{"message":2}')
        await eventually(lambda: len(a.sock.texts) == 2)
        assert b.sock.texts == []  # held for b until its history is out
        broker.release("history")
        await joining_b
        await eventually(lambda: len(b.sock.texts) == 2)
        await asyncio.sleep(0.05)
        assert a.sock.texts == b.sock.texts == ['{"message":1}', '{"message":2}']


async def test_a_member_gone_while_its_history_is_read_is_not_joined() -> None:
    broker = GatedBroker(MemoryBus())
    async with running(broker) as hub:
        first = await hub.publish("chat", '{"message":1}')
        assert first.position is not None
        a = Member(hub, "a")
        broker.hold("history")
        joining = asyncio.create_task(hub.join(a.conn, "chat", Since(first.position.epoch, 0)))
        await broker.arrived("history")
        await hub.disconnect(a.conn)  # the socket went meanwhile
        broker.release("history")
        assert await joining == Joined()
        assert a.conn.groups == set() and hub.group_count() == 0
        assert a.sock.texts == []


async def test_members_recovering_together_when_one_goes_midway() -> None:
    broker = SlowReply(MemoryBus())
    async with running(broker) as hub:
        first = await hub.publish("chat", '{"message":1}')
        assert first.position is not None
        since = Since(first.position.epoch, 0)
        a, b = Member(hub, "a"), Member(hub, "b")
        broker.slow = True
        joining_b = asyncio.create_task(hub.join(b.conn, "chat", since))
        await asyncio.wait_for(broker.replying.wait(), 5)  # b's reply is in flight
        broker.slow = False
        broker.hold("history")
        joining_a = asyncio.create_task(hub.join(a.conn, "chat", since))
        await broker.arrived("history")  # a is reading too
        await hub.disconnect(b.conn)  # b goes before its reply came
        broker.release("history")
        assert (await joining_a).recovered is True  # a finishes first, the last one waiting
        broker.answer()
        assert await joining_b == Joined()
        await hub.publish("chat", '{"message":2}')
        await eventually(lambda: len(a.sock.texts) == 2)
        assert a.sock.texts == ['{"message":1}', '{"message":2}'] and b.sock.texts == []


async def test_a_member_leaving_while_another_recovers_leaves_only_itself() -> None:
    broker = GatedBroker(MemoryBus())
    async with running(broker) as hub:
        first = await hub.publish("chat", '{"message":1}')
        assert first.position is not None
        other, a = Member(hub, "other"), Member(hub, "a")
        await hub.join(other.conn, "chat")
        broker.hold("history")
        joining = asyncio.create_task(hub.join(a.conn, "chat", Since(first.position.epoch, 0)))
        await broker.arrived("history")
        await hub.leave(other.conn, "chat")  # a settled member goes while a is still recovering
        await hub.publish("chat", '{"message":2}')
        broker.release("history")
        assert (await joining).recovered is True
        await eventually(lambda: len(a.sock.texts) == 2)
        assert a.sock.texts == ['{"message":1}', '{"message":2}'] and other.sock.texts == []


class Unreadable(GatedBroker):
    """History that cannot be read: the reply, once released, is that Redis is unreachable."""

    async def history(
        self, channel: str, after: int | None, limit: int, start: Retention | None = None
    ) -> History:
        await super().history(channel, after, limit, start)
        raise BrokerUnavailable("redis down")


@pytest.mark.parametrize("history", ["unreachable", "none yet"])
async def test_a_message_without_a_position_arriving_during_a_join_is_delivered(history: str) -> None:
    """Not every message of a history group has a position: a Django app on Channels' pub/sub layer
    publishes straight to the group's channel (service/broker/channels_pubsub.py). One arriving while
    a member's join reads history is held for it like any other, and sent after; also when the
    join found no history to send (none yet, or Redis unreachable), where there is no epoch."""
    broker = Unreadable(MemoryBus()) if history == "unreachable" else GatedBroker(MemoryBus())
    async with running(broker) as hub:
        a = Member(hub, "a")
        broker.hold("history")
        joining = asyncio.create_task(hub.join(a.conn, "chat", Since("E1", 4)))
        await broker.arrived("history")  # the pod is subscribed to the group by now
        await broker.publish(Envelope(channels.group("chat"), '{"message":"from django"}', time.time()))
        broker.release("history")
        joined = await joining
        assert joined.recovered is False and joined.position is None
        await eventually(lambda: a.sock.texts == ['{"message":"from django"}'])


async def test_no_recovery_state_is_kept_for_a_group_once_its_joins_are_done() -> None:
    """What the hub holds for members mid-join lives as long as those joins: a pod sees many groups
    over its life and must not keep an entry for each. No message shows such a leak, so this reads
    the hub's one private table of it."""
    async with running(MemoryBroker(MemoryBus())) as hub:
        a = Member(hub, "a")
        await hub.join(a.conn, "chat", Since("E1", 0))
        await hub.join(a.conn, "dash")
        assert a.conn.groups == {channels.group("chat"), channels.group("dash")}
        assert hub._held == {}


async def test_a_recovering_join_overtaken_by_a_backends_leave_and_join_sends_nothing_twice() -> None:
    """A client's join from a position reads history; meanwhile a backend takes the connection out
    of the group and puts it back (two group changes, which do not wait for the client's join). The
    client's join was left, so it is abandoned as for any leave during the read; the backend's join
    alone makes it a member, from now on: every message reaches it once."""
    broker = GatedBroker(MemoryBus())
    async with running(broker) as hub:
        first = await hub.publish("chat", '{"message":1}')
        assert first.position is not None
        await hub.join(Member(hub, "other").conn, "chat")
        a = Member(hub, "a")
        broker.hold("history")
        recovering = asyncio.create_task(hub.join(a.conn, "chat", Since(first.position.epoch, 0)))
        await broker.arrived("history")
        assert await hub.change(a.conn, "leave", "chat") == "left"
        rejoining = asyncio.create_task(hub.change(a.conn, "join", "chat"))  # reads history too
        await eventually(lambda: [op for op, _ in broker.calls].count("history") == 2)
        await hub.publish("chat", '{"message":2}')  # held for the backend's join
        broker.release("history")
        assert await recovering == Joined()
        assert await rejoining == "joined"
        await hub.publish("chat", '{"message":3}')
        await eventually(lambda: len(a.sock.texts) >= 2)
        await asyncio.sleep(0.05)  # a duplicate would arrive right behind
        assert a.sock.texts == ['{"message":2}', '{"message":3}']

"""The hub over the memory bus: membership, first/last subscribe, fan-out, direct send, limits."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from structlog.testing import capture_logs

from service import channels
from service.broker import BrokerUnavailable, Envelope, History, Retention
from service.broker.memory import MemoryBroker, MemoryBus
from service.connection import Connection
from service.hub import Hub, Joined, TooManyGroups
from service.protocol import Since
from service.rules import GroupRule, GroupRules
from tests.brokers import eventually, redis_broker
from tests.fakes import FakeSocket, GatedBroker
from tests.helpers import metric
from tests.redis_servers import RedisServer


class Member:
    def __init__(self, hub: Hub, name: str) -> None:
        self.sock = FakeSocket()
        self.conn = Connection(f"{hub.pod_id}.{name}", self.sock.send, outbox_size=8)
        hub.register(self.conn)


@pytest.fixture
async def pods() -> AsyncIterator[tuple[Hub, Hub, MemoryBroker, MemoryBroker]]:
    bus = MemoryBus()
    brokers = MemoryBroker(bus), MemoryBroker(bus)
    hubs = Hub(brokers[0], "pod-a", max_groups=3), Hub(brokers[1], "pod-b", max_groups=3)
    runs = []
    for hub in hubs:
        await hub.start()
        runs.append(asyncio.create_task(hub.run()))
    yield hubs[0], hubs[1], brokers[0], brokers[1]
    for broker in brokers:
        await broker.close()
    await asyncio.gather(*runs)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_first_member_subscribes_and_last_member_unsubscribes(
    pods: tuple[Hub, Hub, MemoryBroker, MemoryBroker],
) -> None:
    hub, _, broker, _ = pods
    a, b = Member(hub, "a"), Member(hub, "b")
    await hub.join(a.conn, "g")
    await hub.join(b.conn, "g")
    assert channels.group("g") in broker.channels and hub.group_count() == 1
    await hub.leave(a.conn, "g")
    assert channels.group("g") in broker.channels
    await hub.disconnect(b.conn)
    assert broker.channels == {channels.pod("pod-a")}
    assert hub.group_count() == 0


async def test_a_message_reaches_members_on_both_pods_as_the_same_string(
    pods: tuple[Hub, Hub, MemoryBroker, MemoryBroker],
) -> None:
    hub_a, hub_b, _, _ = pods
    a, b, outsider = Member(hub_a, "a"), Member(hub_b, "b"), Member(hub_b, "c")
    await hub_a.join(a.conn, "g")
    await hub_b.join(b.conn, "g")
    await hub_b.join(outsider.conn, "other")
    frame = '{"message":{"x":1}}'
    assert (await hub_a.publish("g", frame)).pods == 2  # two pods reached
    await settle()
    assert a.sock.texts == [frame] and b.sock.texts == [frame] and outsider.sock.texts == []
    assert a.sock.texts[0] is b.sock.texts[0] is frame  # encoded once, never copied per member


async def test_direct_send_reaches_one_connection_on_its_own_pod(
    pods: tuple[Hub, Hub, MemoryBroker, MemoryBroker],
) -> None:
    hub_a, hub_b, _, _ = pods
    a, b = Member(hub_a, "a"), Member(hub_b, "b")
    assert await hub_a.send_direct(b.conn.id, "hi") == 1
    await settle()
    assert b.sock.texts == ["hi"] and a.sock.texts == []


async def test_direct_send_to_an_unknown_id_is_counted(
    pods: tuple[Hub, Hub, MemoryBroker, MemoryBroker],
) -> None:
    hub_a, _, _, _ = pods
    before = metric("relay_send_queue_dropped_total", reason="unknown_channel")
    assert await hub_a.send_direct("pod-b.nobody", "hi") == 1
    await settle()
    assert metric("relay_send_queue_dropped_total", reason="unknown_channel") == before + 1
    assert await hub_a.send_direct("no-such-pod.x", "hi") == 0  # no pod listens: the origin learns it


async def test_joining_more_groups_than_allowed_is_refused(
    pods: tuple[Hub, Hub, MemoryBroker, MemoryBroker],
) -> None:
    hub, _, _, _ = pods
    a = Member(hub, "a")
    for g in ("g1", "g2", "g3"):
        await hub.join(a.conn, g)
    await hub.join(a.conn, "g1")  # already a member: not a new group
    with pytest.raises(
        TooManyGroups, match=r"^a connection may join at most 3 groups$"
    ):  # a v1 error's detail
        await hub.join(a.conn, "g4")
    assert len(a.conn.groups) == 3


@pytest.fixture
async def gated() -> AsyncIterator[tuple[Hub, GatedBroker]]:
    """One hub over a broker whose subscribe/unsubscribe the test can hold open."""
    broker = GatedBroker(MemoryBus())
    hub = Hub(broker, "pod-a")
    await hub.start()
    run = asyncio.create_task(hub.run())
    yield hub, broker
    await broker.close()
    await run


async def test_join_racing_the_last_leave_ends_subscribed(gated: tuple[Hub, GatedBroker]) -> None:
    """A join that arrives while the last leave is still unsubscribing waits for it, then subscribes
    again: the pod never ends up unsubscribed from a group that has a member."""
    hub, broker = gated
    a, b = Member(hub, "a"), Member(hub, "b")
    await hub.join(a.conn, "g")
    broker.hold("unsubscribe")
    leaving = asyncio.create_task(hub.leave(a.conn, "g"))
    await broker.arrived("unsubscribe")  # the last leave is inside UNSUBSCRIBE now
    joining = asyncio.create_task(hub.join(b.conn, "g"))
    await settle()  # the join runs as far as it can while the unsubscribe is in flight
    broker.release("unsubscribe")
    await asyncio.gather(leaving, joining)
    assert channels.group("g") in broker.channels and hub.channels() == {channels.group("g")}
    assert broker.calls[-2:] == [
        ("unsubscribe", (channels.group("g"),)),
        ("subscribe", (channels.group("g"),)),
    ]
    await hub.publish("g", "x")
    await settle()
    assert b.sock.texts == ["x"] and a.sock.texts == []


async def test_two_first_joins_racing_subscribe_once_and_both_receive(gated: tuple[Hub, GatedBroker]) -> None:
    """A second join that arrives while the first one is still subscribing waits for it: one
    SUBSCRIBE, and neither member is lost."""
    hub, broker = gated
    a, b = Member(hub, "a"), Member(hub, "b")
    broker.hold("subscribe")
    first = asyncio.create_task(hub.join(a.conn, "g"))
    await broker.arrived("subscribe")
    second = asyncio.create_task(hub.join(b.conn, "g"))
    await settle()
    broker.release("subscribe")
    await asyncio.gather(first, second)
    await hub.publish("g", "x")
    await settle()
    assert a.sock.texts == ["x"] and b.sock.texts == ["x"]
    assert [call for call in broker.calls if call[1] == (channels.group("g"),)] == [
        ("subscribe", (channels.group("g"),))
    ]


async def test_a_failed_subscribe_records_nothing(pods: tuple[Hub, Hub, MemoryBroker, MemoryBroker]) -> None:
    hub, _, broker, _ = pods
    a = Member(hub, "a")

    async def refuse(*channels: str) -> None:
        raise ConnectionError("bus down")

    broker.subscribe = refuse  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        await hub.join(a.conn, "g")
    assert hub.group_count() == 0 and a.conn.groups == set()


async def test_a_slow_member_is_closed_without_holding_up_the_others(
    pods: tuple[Hub, Hub, MemoryBroker, MemoryBroker],
) -> None:
    hub, _, _, _ = pods
    slow, fast = Member(hub, "slow"), Member(hub, "fast")
    await hub.join(slow.conn, "g")
    await hub.join(fast.conn, "g")
    slow.sock.writable.clear()
    for i in range(20):
        await hub.publish("g", str(i))
    await settle()
    assert fast.sock.texts == [str(i) for i in range(20)]
    assert slow.conn.close_code == 4008


async def test_frames_sent_counts_only_what_reached_a_socket(
    pods: tuple[Hub, Hub, MemoryBroker, MemoryBroker],
) -> None:
    hub, _, _, _ = pods
    alive, gone = Member(hub, "alive"), Member(hub, "gone")
    await hub.join(alive.conn, "g")
    await hub.join(gone.conn, "g")
    gone.conn.gone()
    sent, dropped = (
        metric("relay_messages_sent_total"),
        metric("relay_send_queue_dropped_total", reason="closed"),
    )
    await hub.publish("g", "x")
    await settle()
    assert metric("relay_messages_sent_total") == sent + 1
    assert metric("relay_send_queue_dropped_total", reason="closed") == dropped + 1


def histogram(name: str) -> tuple[float, float]:
    """(count, sum) of an in-process histogram."""
    return metric(name + "_count"), metric(name + "_sum")


async def test_v1_members_get_the_group_form_and_every_member_is_counted(
    pods: tuple[Hub, Hub, MemoryBroker, MemoryBroker],
) -> None:
    hub, _, _, _ = pods
    seed, v1, v1b = Member(hub, "seed"), Member(hub, "v1"), Member(hub, "v1b")
    v1.conn.v1 = v1b.conn.v1 = True
    for member in (seed, v1, v1b):
        await hub.join(member.conn, "g")
    sent = metric("relay_messages_sent_total")
    recipients = histogram("relay_fanout_recipients")
    durations = histogram("relay_local_fanout_duration_seconds")
    latencies = histogram("relay_group_fanout_latency_seconds")
    await hub.publish("g", '{"message":{"x":1}}')
    await settle()
    assert seed.sock.texts == ['{"message":{"x":1}}']
    assert v1.sock.texts == v1b.sock.texts == ['{"group":"g","message":{"x":1}}']
    assert v1.sock.texts[0] is v1b.sock.texts[0]  # the v1 form is built once per message
    assert metric("relay_messages_sent_total") == sent + 3
    assert histogram("relay_fanout_recipients") == (recipients[0] + 1, recipients[1] + 3)
    assert histogram("relay_local_fanout_duration_seconds")[0] == durations[0] + 1
    count, total = histogram("relay_group_fanout_latency_seconds")
    assert count == latencies[0] + 1 and 0 <= total - latencies[1] < 5  # seconds since the publish


async def test_a_message_without_a_send_time_is_not_a_latency_sample(
    pods: tuple[Hub, Hub, MemoryBroker, MemoryBroker],
) -> None:
    hub, _, broker, _ = pods
    a = Member(hub, "a")
    await hub.join(a.conn, "g")
    latencies = histogram("relay_group_fanout_latency_seconds")
    await broker.publish(Envelope(channels.group("g"), "x", 0.0))
    await settle()
    assert a.sock.texts == ["x"]
    assert histogram("relay_group_fanout_latency_seconds") == latencies


async def test_the_pod_is_empty_only_while_it_holds_no_connection(
    pods: tuple[Hub, Hub, MemoryBroker, MemoryBroker],
) -> None:
    hub, _, _, _ = pods
    assert hub.empty.is_set() and hub.connection_count() == 0
    a, b = Member(hub, "a"), Member(hub, "b")
    assert not hub.empty.is_set() and metric("relay_connections") == 2
    assert {c.id for c in hub.connections} == {a.conn.id, b.conn.id}
    hub.unregister(a.conn)
    hub.unregister(a.conn)  # twice: no effect
    assert not hub.empty.is_set() and hub.connection_count() == 1 and metric("relay_connections") == 1
    await hub.disconnect(b.conn)
    assert hub.empty.is_set() and metric("relay_connections") == 0


async def test_a_direct_send_delivered_is_counted_as_sent(
    pods: tuple[Hub, Hub, MemoryBroker, MemoryBroker],
) -> None:
    hub_a, hub_b, _, _ = pods
    b = Member(hub_b, "b")
    sent = metric("relay_messages_sent_total")
    await hub_a.send_direct(b.conn.id, "hi")
    await settle()
    assert b.sock.texts == ["hi"] and metric("relay_messages_sent_total") == sent + 1
    b.conn.gone()
    await hub_a.send_direct(b.conn.id, "again")
    await settle()
    assert metric("relay_messages_sent_total") == sent + 1  # dropped: counted as dropped, not sent


async def command(broker: MemoryBroker, conn: Connection, verb: str) -> None:
    """A backend's group change for one connection, as the Django channel layer publishes it."""
    pod_id = conn.id.partition(".")[0]
    await broker.publish(Envelope(channels.pod(pod_id), "", 0.0, target=conn.id, command=verb))
    await settle()


async def test_a_backend_adds_a_connection_to_a_group_and_removes_it(
    pods: tuple[Hub, Hub, MemoryBroker, MemoryBroker],
) -> None:
    hub_a, hub_b, broker_a, _ = pods
    b = Member(hub_b, "b")
    joined, left = (
        metric("relay_control_commands_total", outcome="joined"),
        metric("relay_control_commands_total", outcome="left"),
    )
    await command(broker_a, b.conn, "join news")
    assert b.conn.groups == {channels.group("news")}
    assert metric("relay_control_commands_total", outcome="joined") == joined + 1
    await hub_a.publish("news", "n1")
    await settle()
    assert b.sock.texts == ["n1"]
    await command(broker_a, b.conn, "leave news")
    assert b.conn.groups == set() and hub_b.group_count() == 0
    assert metric("relay_control_commands_total", outcome="left") == left + 1


async def test_a_backend_group_change_the_pod_cannot_make_is_counted_as_refused(
    pods: tuple[Hub, Hub, MemoryBroker, MemoryBroker],
) -> None:
    _, hub_b, broker_a, _ = pods
    b = Member(hub_b, "b")
    refused = metric("relay_control_commands_total", outcome="refused")
    unknown = metric("relay_control_commands_total", outcome="unknown_channel")
    await command(broker_a, b.conn, "join bad name")  # not a valid group name
    await command(broker_a, b.conn, "join ")
    assert b.conn.groups == set()
    assert metric("relay_control_commands_total", outcome="refused") == refused + 2
    for g in ("g1", "g2", "g3", "g4"):  # max_groups=3: the fourth is refused
        await command(broker_a, b.conn, "join " + g)
    assert len(b.conn.groups) == 3
    assert metric("relay_control_commands_total", outcome="refused") == refused + 3
    dropped = metric("relay_send_queue_dropped_total", reason="unknown_channel")
    await broker_a.publish(Envelope(channels.pod("pod-b"), "", 0.0, target="pod-b.nobody", command="join g"))
    await settle()
    assert metric("relay_control_commands_total", outcome="unknown_channel") == unknown + 1
    assert metric("relay_send_queue_dropped_total", reason="unknown_channel") == dropped + 1


async def test_a_refused_backend_group_change_is_logged_with_who_what_and_why(
    pods: tuple[Hub, Hub, MemoryBroker, MemoryBroker],
) -> None:
    _, hub_b, broker_a, _ = pods
    b = Member(hub_b, "b")
    for g in ("g1", "g2", "g3"):
        await hub_b.join(b.conn, g)
    with capture_logs() as logs:
        await command(broker_a, b.conn, "join g4")
    assert [e for e in logs if e["event"] == "hub.control_refused"] == [
        {
            "event": "hub.control_refused",
            "log_level": "warning",
            "conn_id": b.conn.id,
            "verb": "join",
            "error": "TooManyGroups",
        }
    ]


async def test_a_join_since_while_history_is_unreachable_joins_and_says_why_nothing_was_recovered() -> None:
    class NoHistory(MemoryBroker):
        async def history(
            self, channel: str, after: int | None, limit: int, start: Retention | None = None
        ) -> History:
            raise BrokerUnavailable("redis down")

    broker = NoHistory(MemoryBus())
    hub = Hub(broker, "pod-a", rules=GroupRules([GroupRule("chat", 100, 60.0, False)]))
    await hub.start()
    run = asyncio.create_task(hub.run())
    try:
        a = Member(hub, "a")
        before = metric("relay_recoveries_total", result="unavailable")
        joined = await hub.join(a.conn, "chat", Since("E1", 5))
        assert joined == Joined(position=None, recovered=False, reason="unavailable")
        assert metric("relay_recoveries_total", result="unavailable") == before + 1
        assert a.conn.groups == {channels.group("chat")}  # a member all the same: live messages flow
    finally:
        await broker.close()
        await run


async def test_group_and_direct_sends_cross_pods_over_redis(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """The memory bus passes envelopes as objects; Redis carries them as bytes (service/broker/wire.py):
    everything the hub puts in an envelope must survive that."""
    brokers = [redis_broker(redis_server.url, redis_prefix, pod) for pod in ("pod-a", "pod-b")]
    hubs = [Hub(broker, pod) for broker, pod in zip(brokers, ("pod-a", "pod-b"), strict=True)]
    runs = []
    for hub in hubs:
        await hub.start()
        runs.append(asyncio.create_task(hub.run()))
    try:
        hub_a, hub_b = hubs
        b = Member(hub_b, "b")
        await hub_b.join(b.conn, "g")
        assert (await hub_a.publish("g", "to the group")).pods == 1
        assert await hub_a.send_direct(b.conn.id, "to b alone") == 1
        await eventually(lambda: len(b.sock.texts) == 2)
        assert b.sock.texts == ["to the group", "to b alone"]
    finally:
        for broker in brokers:
            await broker.close()
        await asyncio.gather(*runs)


async def test_joining_a_group_twice_still_answers_the_join(
    pods: tuple[Hub, Hub, MemoryBroker, MemoryBroker],
) -> None:
    hub, _, _, _ = pods
    a = Member(hub, "a")
    answers: list[Joined] = []
    await hub.join(a.conn, "g", on_joined=answers.append)
    assert await hub.join(a.conn, "g", on_joined=answers.append) == Joined()
    assert answers == [Joined(), Joined()]  # the endpoint acks both requests


async def test_leaving_a_group_one_is_not_in_changes_nothing(
    pods: tuple[Hub, Hub, MemoryBroker, MemoryBroker],
) -> None:
    hub, _, broker, _ = pods
    a, b = Member(hub, "a"), Member(hub, "b")
    await hub.join(a.conn, "g")
    await hub.leave(b.conn, "g")  # b never joined g
    await hub.leave(b.conn, "nobody-here")  # and no one is in this one
    assert channels.group("g") in broker.channels and hub.group_count() == 1
    await hub.publish("g", "x")
    await settle()
    assert a.sock.texts == ["x"] and b.sock.texts == []


async def test_a_pod_starting_while_the_broker_is_down_starts_and_says_so() -> None:
    class Down(MemoryBroker):
        async def subscribe(self, *channels: str) -> None:
            raise BrokerUnavailable("redis down")

    broker = Down(MemoryBus())
    with capture_logs() as logs:
        await Hub(broker, "pod-a").start()
    assert {
        "event": "hub.pod_channel_pending",
        "log_level": "warning",
        "reason": "broker unavailable at start",
    } in logs
    await broker.close()


class Broken(Connection):
    """A connection whose offer fails: a bug in delivery, which must stay this member's problem."""

    def offer(self, frame: str) -> bool:
        raise RuntimeError("bug")


async def test_a_failed_delivery_is_logged_and_the_next_message_still_arrives(
    pods: tuple[Hub, Hub, MemoryBroker, MemoryBroker],
) -> None:
    hub, _, _, _ = pods
    broken = Broken("pod-a.broken", FakeSocket().send, outbox_size=8)
    hub.register(broken)
    await hub.join(broken, "g")
    with capture_logs() as logs:
        await hub.publish("g", "x")
        await settle()
    assert [(e["event"], e["channel_kind"], e["log_level"]) for e in logs] == [
        ("hub.deliver_failed", "g", "error")
    ]
    await hub.leave(broken, "g")
    a = Member(hub, "a")
    await hub.join(a.conn, "g")
    await hub.publish("g", "y")
    await settle()
    assert a.sock.texts == ["y"]  # the hub's delivery loop is still running


async def test_untargeted_messages_on_a_channel_without_members_go_to_its_listener(
    pods: tuple[Hub, Hub, MemoryBroker, MemoryBroker],
) -> None:
    """The control channel has no members: what arrives there goes to whoever listens for it (the
    server API, service/control.py). Elsewhere a message for no one is dropped without a fuss."""
    hub, _, broker, _ = pods
    heard: list[Envelope] = []
    hub.listen(channels.CONTROL, heard.append)
    await broker.subscribe(channels.CONTROL)
    command = Envelope(channels.CONTROL, '{"id":"1"}', 0.0)
    with capture_logs() as logs:
        await broker.publish(command)
        await broker.publish(Envelope(channels.pod("pod-a"), "for no one", 0.0))  # nobody listens here
        await settle()
    assert heard == [command]
    assert logs == []


async def test_connections_are_found_by_id_and_members_counted_by_group(
    pods: tuple[Hub, Hub, MemoryBroker, MemoryBroker],
) -> None:
    """What the server API reads of a pod (service/commands.py): one connection by its channel id,
    and the local members of each group."""
    hub, _, _, _ = pods
    a, b = Member(hub, "a"), Member(hub, "b")
    await hub.join(a.conn, "g")
    await hub.join(b.conn, "g")
    await hub.join(b.conn, "h.1")
    assert hub.connection(a.conn.id) is a.conn and hub.connection("pod-a.nobody") is None
    assert hub.group_sizes() == {"g": 2, "h.1": 1}


async def test_the_local_fan_out_duration_is_the_time_the_fan_out_took(
    pods: tuple[Hub, Hub, MemoryBroker, MemoryBroker],
) -> None:
    hub, _, _, _ = pods
    for name in ("a", "b"):
        await hub.join(Member(hub, name).conn, "g")
    count, total = histogram("relay_local_fanout_duration_seconds")
    started = time.perf_counter()
    await hub.publish("g", "x")
    await settle()
    took = time.perf_counter() - started  # the fan-out happened inside this
    assert histogram("relay_local_fanout_duration_seconds")[0] == count + 1
    assert 0 <= histogram("relay_local_fanout_duration_seconds")[1] - total <= took


async def test_a_leave_queued_behind_a_fresh_subscribe_leaves_the_new_members_alone(
    gated: tuple[Hub, GatedBroker],
) -> None:
    """a's join is still subscribing when b's join queues behind it; a then leaves at once, and its
    leave queues behind b's join, which finds the group empty and subscribes it afresh. a's leave
    must see that the group it emptied is not the group any more, and leave b subscribed."""
    hub, broker = gated
    a, b = Member(hub, "a"), Member(hub, "b")
    broker.hold("subscribe")

    async def join_and_leave() -> None:
        await hub.join(a.conn, "g")
        await hub.leave(a.conn, "g")

    first = asyncio.create_task(join_and_leave())
    await broker.arrived("subscribe")
    second = asyncio.create_task(hub.join(b.conn, "g"))
    await settle()  # b waits for the group's lock
    broker.release("subscribe")
    await asyncio.gather(first, second)
    assert hub.channels() == {channels.group("g")} and channels.group("g") in broker.channels
    await hub.publish("g", "x")
    await settle()
    assert b.sock.texts == ["x"] and a.sock.texts == []


async def test_one_connections_group_change_waiting_on_the_broker_holds_up_no_other(
    gated: tuple[Hub, GatedBroker],
) -> None:
    """Backend group changes are in order per connection, not across connections: a's change
    waits for a SUBSCRIBE (its group is new to the pod); b's, to a group the pod already has,
    needs no broker and is done meanwhile."""
    hub, broker = gated
    a, b, c = Member(hub, "a"), Member(hub, "b"), Member(hub, "c")
    await hub.join(c.conn, "busy")
    broker.hold("subscribe")
    waiting = asyncio.create_task(hub.change(a.conn, "join", "new"))
    await broker.arrived("subscribe")
    changed = asyncio.create_task(hub.change(b.conn, "join", "busy"))
    await settle()
    assert changed.done() and changed.result() == "joined" and not waiting.done()
    broker.release("subscribe")
    assert await waiting == "joined"


async def test_a_backend_group_change_leaves_no_error_for_the_loop_to_report(
    pods: tuple[Hub, Hub, MemoryBroker, MemoryBroker],
) -> None:
    """Each backend change runs in a task of its own; when it ends, nothing may surface in the
    loop's exception handler (asyncio logs each such report as an error)."""
    _, hub_b, broker_a, _ = pods
    b = Member(hub_b, "b")
    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        await command(broker_a, b.conn, "join news")
        await command(broker_a, b.conn, "leave news")
        await settle()
    finally:
        loop.set_exception_handler(None)
    assert b.conn.groups == set() and errors == []

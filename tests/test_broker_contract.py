"""One contract for every broker: memory, one Redis, Sentinel, Cluster (sharded pub/sub).

Two brokers play two pods. Redis flavours share session servers and keep apart by prefix.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

import orjson
import pytest

from service.broker import (
    Appended,
    Arrival,
    Broker,
    Envelope,
    Member,
    Position,
    PresenceBatch,
    PresenceTerms,
    Retention,
)
from service.broker import presence as presence_keys
from service.broker.history import DEDUPE_WINDOW
from service.broker.memory import MemoryBroker, MemoryBus
from service.broker.redis import RedisBroker
from tests.brokers import Collector, eventually, redis_broker
from tests.redis_servers import RedisCluster, RedisServer, SentinelSet

FLAVOURS = [
    "memory",
    pytest.param("redis", marks=[pytest.mark.integration, pytest.mark.xdist_group("redis-single")]),
    pytest.param("sentinel", marks=[pytest.mark.integration, pytest.mark.xdist_group("redis-sentinel")]),
    pytest.param("cluster", marks=[pytest.mark.integration, pytest.mark.xdist_group("redis-cluster")]),
]


@dataclass
class Pods:
    a: Collector
    b: Collector
    leftover: Callable[[], set[str]]  # relay channels still subscribed on the bus (probes aside)
    stored: Callable[[str], Awaitable[dict[str, int]]]  # a group's presence structures, by size


# Parametrized on the tests (indirect) rather than on the fixture: marks of a fixture's params do
# not reach xdist's loadgroup reliably, and each flavour's tests must share one worker and server.
pytestmark = pytest.mark.parametrize("pods", FLAVOURS, indirect=True)


@pytest.fixture
async def pods(request: pytest.FixtureRequest, redis_prefix: str) -> AsyncIterator[Pods]:
    flavour: str = request.param
    if flavour == "memory":
        bus = MemoryBus()
        found = Pods(
            Collector(MemoryBroker(bus)),
            Collector(MemoryBroker(bus)),
            lambda: set(bus.subscribers),
            lambda channel: _stored_in_memory(bus, channel),
        )
    else:
        fixture = {"redis": "redis_server", "sentinel": "sentinel_set", "cluster": "redis_cluster"}[flavour]
        servers = request.getfixturevalue(fixture)
        url = servers.url
        found = Pods(
            Collector(redis_broker(url, redis_prefix, "a")),
            Collector(redis_broker(url, redis_prefix, "b")),
            lambda: _leftover(servers, redis_prefix),
            lambda channel: _stored_in_redis(found.a.broker, redis_prefix, channel),
        )
        # The contract is about what a link carries, not how fast it opens: on a loaded machine (a
        # mutation run at nice 19 beside a test suite) the first connect can take longer than the
        # pods' 0.5 s Redis timeout, and a subscribe before it would be refused.
        await eventually(lambda: found.a.broker.ready and found.b.broker.ready, 15)
    yield found
    await found.a.stop()
    await found.b.stop()


def _leftover(servers: RedisServer | SentinelSet | RedisCluster, prefix: str) -> set[str]:
    if isinstance(servers, RedisCluster):
        names = set()
        for node in servers.primaries():
            names |= set(node.call("PUBSUB", "SHARDCHANNELS", prefix + ":*"))
    else:
        server = servers if isinstance(servers, RedisServer) else _master(servers)
        names = set(server.call("PUBSUB", "CHANNELS", prefix + ":*"))
    return {n.removeprefix(prefix + ":") for n in names if ":probe:" not in n}


async def _stored_in_memory(bus: MemoryBus, channel: str) -> dict[str, int]:
    group = bus.presence.get(channel)
    if group is None:
        return {}
    sizes = [len(group.conns), len(group.conns), len(group.users), len(group.claims)]
    sizes += [len(group.announced), len(group.leaving)]
    held = {
        kind: size for kind, size in zip(("pc", "pi", "pu", "pn", "pa", "pl"), sizes, strict=True) if size
    }
    return held or {"an empty group": 0}  # Redis holds no empty key


async def _stored_in_redis(broker: Broker, prefix: str, channel: str) -> dict[str, int]:
    """The size of each of the group's presence keys that exists (Redis deletes emptied ones)."""
    assert isinstance(broker, RedisBroker)
    held = {}
    keys = presence_keys.keys(prefix.encode() + b":", channel)
    for key, size in zip(keys, (b"ZCARD", b"HLEN", b"HLEN", b"HLEN", b"SCARD", b"ZCARD"), strict=True):
        if n := await broker.command(key, size, key):
            held[key.decode()[len(prefix) + 1 : len(prefix) + 3]] = n
    return held


def _master(sentinels: SentinelSet) -> RedisServer:
    port = sentinels.master_port()
    return next(s for s in (sentinels.primary, sentinels.replica) if s.port == port)


def env(channel: str, frame: str, target: str = "") -> Envelope:
    return Envelope(channel, frame, time.time(), target)


async def test_a_publish_reaches_every_subscribed_pod_intact(pods: Pods) -> None:
    """Frame text, origin stamp and target travel unchanged, to the publishing pod too."""
    await pods.a.broker.subscribe("g:chat")
    await pods.b.broker.subscribe("g:chat")
    sent = env("g:chat", '{"message": {"text": "héllo\\nwörld ✓", "n": 1}}', target="")
    assert await pods.a.broker.publish(sent) == 2
    for pod in (pods.a, pods.b):
        assert (await pod.wait_for(1)) == [sent]


async def test_a_direct_send_carries_its_target(pods: Pods) -> None:
    """A direct send names its connection; only the pod channel's owner gets it."""
    await pods.b.broker.subscribe("p:b")
    sent = env("p:b", '{"message": "hi"}', target="b.xyz")
    assert await pods.a.broker.publish(sent) == 1
    assert (await pods.b.wait_for(1))[0].target == "b.xyz"
    await pods.a.quiet(0.1)


async def test_publish_to_a_channel_nobody_wants_reaches_nobody(pods: Pods) -> None:
    """The reply counts pods reached: zero is not an error."""
    assert await pods.a.broker.publish(env("g:empty", "{}")) == 0


async def test_unsubscribe_stops_delivery_and_leaves_nothing_behind(pods: Pods) -> None:
    """After the last unsubscribe nothing published on the channel is delivered, and no
    subscription remains on the bus. A marker published after it, on a channel both pods still
    hear, in the same slot (the hash tag `{x}`), shows nothing came first: no fixed window."""
    await pods.a.broker.subscribe("g:{x}", "g:{y}")
    await pods.b.broker.subscribe("g:{x}")
    assert pods.leftover() == {"g:{x}", "g:{y}"}
    await pods.a.broker.unsubscribe("g:{x}", "g:{y}")
    await pods.b.broker.unsubscribe("g:{x}")
    await pods.a.broker.subscribe("g:{x}marker")
    await pods.b.broker.subscribe("g:{x}marker")
    seen = len(pods.a.envelopes), len(pods.b.envelopes)
    reached = await pods.a.broker.publish(env("g:{x}", "{}"))
    marker = env("g:{x}marker", "marker")
    assert await pods.a.broker.publish(marker) == 2
    await pods.a.nothing_before(marker, since=seen[0])
    await pods.b.nothing_before(marker, since=seen[1])
    assert reached == 0
    await pods.a.broker.unsubscribe("g:{x}marker")
    await pods.b.broker.unsubscribe("g:{x}marker")
    assert pods.leftover() == set()


async def test_concurrent_publishers_keep_their_own_order_without_duplicates(pods: Pods) -> None:
    """Three publishers interleave 300 publishes each; each one's sequence arrives in order, once."""
    await pods.b.broker.subscribe("g:order", "g:other")

    async def publisher(name: str, channel: str) -> None:
        for n in range(300):
            await pods.a.broker.publish(env(channel, f"{name} {n}"))

    async def burst(name: str) -> None:  # pipelined: all in flight at once
        await asyncio.gather(*(pods.a.broker.publish(env("g:order", f"{name} {n}")) for n in range(300)))

    await asyncio.gather(publisher("p1", "g:order"), publisher("p2", "g:other"), burst("p3"))
    got = await pods.b.wait_for(900)
    assert len(got) == 900
    for name in ("p1", "p2", "p3"):
        numbers = [int(e.frame.split()[1]) for e in got if e.frame.startswith(name + " ")]
        assert numbers == list(range(300)), name


async def test_many_channels_subscribe_in_one_call(pods: Pods) -> None:
    """Subscribing 200 channels at once is confirmed before it returns: a publish right after lands."""
    channels = [f"g:many{n}" for n in range(200)]
    await pods.b.broker.subscribe(*channels)
    for channel in channels:
        assert await pods.a.broker.publish(env(channel, channel)) == 1
    got = await pods.b.wait_for(200)
    assert sorted(e.frame for e in got) == sorted(channels)


async def test_the_link_is_ready_and_close_ends_messages(pods: Pods) -> None:
    """`ready` holds while the link works; `close()` ends the stream."""
    await pods.a.broker.subscribe("g:r")
    assert pods.a.broker.ready
    await pods.a.stop()
    assert not pods.a.broker.ready


# History (groups with a history rule): the same semantics on every broker (docs/history.md).
KEEP_3 = Retention(size=3, ttl=60)


async def append(pods: Pods, channel: str, frame: str, key: str = "", keep: Retention = KEEP_3) -> Appended:
    return await pods.a.broker.append(env(channel, frame), keep, key)


async def test_appends_get_consecutive_offsets_in_one_epoch_and_reach_subscribers(pods: Pods) -> None:
    """Each message of a group with history gets the next offset, and travels with its position."""
    await pods.b.broker.subscribe("g:{h}")
    appended = [await append(pods, "g:{h}", f"m{n}", f"k{n}") for n in range(5)]
    assert [a.position.offset for a in appended] == [1, 2, 3, 4, 5]
    assert len({a.position.epoch for a in appended}) == 1 and appended[0].position.epoch
    assert all(a.pods == 1 and not a.duplicate for a in appended)
    got = await pods.b.wait_for(5)
    assert [(e.frame, e.epoch, e.offset) for e in got] == [
        (f"m{n}", appended[0].position.epoch, n + 1) for n in range(5)
    ]


async def test_history_keeps_the_last_entries_in_order(pods: Pods) -> None:
    """Capped at its size; read after an offset, or the last few; `top` is the last offset."""
    for n in range(5):
        appended = await append(pods, "g:{capped}", f"m{n + 1}")
        assert (appended.pods, appended.duplicate) == (0, False)  # nobody subscribed: not a duplicate
    history = await pods.b.broker.history("g:{capped}", 0, 10)
    assert (history.top, history.entries) == (5, [(3, "m3"), (4, "m4"), (5, "m5")])
    assert (await pods.b.broker.history("g:{capped}", 4, 10)).entries == [(5, "m5")]
    assert (await pods.b.broker.history("g:{capped}", 2, 1)).entries == [(3, "m3")]
    assert (await pods.b.broker.history("g:{capped}", None, 1)).entries == [(5, "m5")]
    assert (await pods.b.broker.history("g:{capped}", None, 2)).entries == [(4, "m4"), (5, "m5")]
    assert (await pods.b.broker.history("g:{capped}", None, 0)).entries == []
    nothing = await pods.b.broker.history("g:{never}", 0, 10)
    assert (nothing.epoch, nothing.top, nothing.entries) == ("", 0, [])


async def test_a_repeated_idempotency_key_is_stored_and_published_once(pods: Pods) -> None:
    """A retried publish (same key) gets its first position back and reaches nobody twice."""
    await pods.b.broker.subscribe("g:{once}")
    first = await append(pods, "g:{once}", "hello", "key-1")
    again = await append(pods, "g:{once}", "hello", "key-1")
    other = await append(pods, "g:{once}", "world", "key-2")
    assert again.duplicate and again.position == first.position and again.pods == 0
    assert other.position.offset == 2
    assert [e.frame for e in await pods.b.wait_for(2)] == ["hello", "world"]
    assert (await pods.b.broker.history("g:{once}", 0, 10)).entries == [(1, "hello"), (2, "world")]


async def test_history_expires_and_the_next_message_begins_a_new_epoch(pods: Pods) -> None:
    """Once its ttl has passed since the last message the history is gone; offsets start again at 1
    under a new epoch, so a client at the old position knows it cannot recover."""
    short = Retention(size=10, ttl=0.2)
    first = await append(pods, "g:{brief}", "old", keep=short)
    await _until_expired(pods, "g:{brief}")
    later = await append(pods, "g:{brief}", "new", keep=short)
    assert later.position.offset == 1 and later.position.epoch != first.position.epoch
    assert (await pods.b.broker.history("g:{brief}", 0, 10)).entries == [(1, "new")]


async def _until_expired(pods: Pods, channel: str) -> None:
    deadline = time.monotonic() + 5
    while (await pods.b.broker.history(channel, 0, 1)).epoch:
        assert time.monotonic() < deadline, "the history never expired"
        await asyncio.sleep(0.05)


async def test_a_group_read_with_start_gets_an_epoch_at_offset_0_that_its_first_message_keeps(
    pods: Pods,
) -> None:
    """A member joining a quiet group gets a position to recover from before any message."""
    started = await pods.b.broker.history("g:{fresh}", None, 10, start=KEEP_3)
    assert started.epoch and started.epoch.isalnum()
    assert (started.top, started.entries) == (0, [])
    again = await pods.b.broker.history("g:{fresh}", None, 10, start=KEEP_3)
    assert again.epoch == started.epoch  # only a group without history gets a new one
    first = await append(pods, "g:{fresh}", "m1")
    assert first.position == Position(started.epoch, 1)
    assert (await pods.b.broker.history("g:{fresh}", 0, 10)).entries == [(1, "m1")]


async def test_an_epoch_begun_by_a_read_expires_as_start_says(pods: Pods) -> None:
    started = await pods.b.broker.history("g:{blink}", None, 10, start=Retention(size=3, ttl=0.2))
    assert started.epoch
    await _until_expired(pods, "g:{blink}")
    later = await append(pods, "g:{blink}", "m1")
    assert later.position.offset == 1 and later.position.epoch != started.epoch


async def test_idempotency_keys_are_remembered_for_the_last_1000_messages(pods: Pods) -> None:
    """A retry within the last max(1000, size) messages is recognised; an older key is forgotten
    (docs/history.md, the `<prefix>:i:{G}` set), so that retry is stored as a new message."""
    for n in range(DEDUPE_WINDOW + 1):
        await append(pods, "g:{window}", f"m{n}", f"key-{n}")
    kept = await append(pods, "g:{window}", "m1", "key-1")
    assert kept.duplicate and kept.position.offset == 2
    newest = await append(pods, "g:{window}", "again", f"key-{DEDUPE_WINDOW}")
    assert newest.duplicate and newest.position.offset == DEDUPE_WINDOW + 1
    forgotten = await append(pods, "g:{window}", "m0", "key-0")
    assert not forgotten.duplicate and forgotten.position.offset == DEDUPE_WINDOW + 2


# Presence (groups with a presence rule): the same semantics on every broker (docs/presence.md).
TERMS = PresenceTerms(ttl=60, grace=0.2, events=True)
NOTHING: dict[str, int] = {}


def arrival(conn_id: str, user: str, claims: str = "{}") -> Arrival:
    return Arrival(conn_id, user, claims)


async def update(
    broker: Broker,
    channel: str,
    terms: PresenceTerms,
    arrivals: Sequence[Arrival] = (),
    departures: Sequence[str] = (),
    refresh: Sequence[str] = (),
) -> list[str]:
    return await broker.presence_update(channel, terms, PresenceBatch(arrivals, departures, refresh))


def presence_events(collector: Collector) -> list[object]:
    """The presence events a pod received, in order (each envelope must be one)."""
    assert all(e.event for e in collector.envelopes)
    return [orjson.loads(e.frame)["presence"] for e in collector.envelopes]


def join(user: str, claims: object = None) -> dict[str, object]:
    return {"event": "join", "user": user, "claims": {} if claims is None else claims}


def leave(user: str) -> dict[str, object]:
    return {"event": "leave", "user": user}


async def test_presence_counts_connections_and_distinct_users_across_pods(pods: Pods) -> None:
    """Two pods add connections of the same users; either reads the same counts and members."""
    await update(pods.a.broker, "g:{room}", TERMS, [arrival("a.1", "ann"), arrival("a.2", "bob")])
    await update(  # an anonymous connection counts, and the rest of its batch too
        pods.b.broker, "g:{room}", TERMS, [arrival("b.2", ""), arrival("b.1", "ann", '{"name":"Ann"}')]
    )
    present = await pods.a.broker.presence_read("g:{room}", TERMS, 10)
    assert (present.connections, present.users, present.truncated) == (4, 2, False)
    assert present.members == [Member("ann", 2, '{"name":"Ann"}'), Member("bob", 1, "{}")]
    counts = await pods.b.broker.presence_read("g:{room}", TERMS, 0)  # counts only: not truncated
    assert (counts.connections, counts.users, counts.members, counts.truncated) == (4, 2, [], False)
    assert await pods.b.broker.presence_read("g:{room}", TERMS, -1) == counts  # below 0: the same
    assert not (await pods.b.broker.presence_read("g:{room}", TERMS, 2)).truncated  # as many as there are
    await update(pods.b.broker, "g:{room}", TERMS, departures=["b.1", "b.2", "b.unknown"])
    present = await pods.b.broker.presence_read("g:{room}", TERMS, 1)
    assert (present.connections, present.users, present.members) == (
        2,
        2,
        [Member("ann", 1, '{"name":"Ann"}')],
    )
    assert present.truncated
    odd = "line\nbreak {x} \u2603"  # a token `sub` may hold anything
    await update(pods.a.broker, "g:{room}", TERMS, [arrival("a.3", odd, '{"a":"b\\nc"}')])
    assert (
        Member(odd, 1, '{"a":"b\\nc"}') in (await pods.b.broker.presence_read("g:{room}", TERMS, 10)).members
    )
    await update(pods.a.broker, "g:{room}", TERMS, departures=["a.3"])
    assert (await pods.b.broker.presence_read("g:{room}", TERMS, 10)).users == 2
    # A batch sent again (its link was lost): an arrival already there is kept once, the rest counts.
    await update(pods.a.broker, "g:{room}", TERMS, [arrival("a.1", "ann"), arrival("a.4", "cy")])
    present = await pods.b.broker.presence_read("g:{room}", TERMS, 10)
    assert (present.connections, present.users) == (3, 3)
    assert [(m.user, m.connections) for m in present.members] == [("ann", 1), ("bob", 1), ("cy", 1)]
    empty = await pods.b.broker.presence_read("g:{nobody}", TERMS, 10)
    assert (empty.connections, empty.users, empty.members, empty.truncated) == (0, 0, [], False)


async def test_presence_entries_expire_unless_refreshed_and_refresh_names_the_lost(pods: Pods) -> None:
    """A pod that stops refreshing (it crashed) loses its entries at the TTL; one that refreshes
    keeps them, and learns which of its ids the store no longer holds. When the last entry goes,
    nothing of the group is left in the store."""
    brief = PresenceTerms(ttl=0.4, grace=0.1, events=False)
    await update(pods.a.broker, "g:{lapse}", brief, [arrival("a.1", "ann")])
    await update(pods.b.broker, "g:{lapse}", brief, [arrival("b.1", "bob", '{"n":2}')])
    deadline = time.monotonic() + 5
    while (await pods.a.broker.presence_read("g:{lapse}", brief, 10)).users != 1:
        assert time.monotonic() < deadline, "the unrefreshed entry never expired"
        assert await update(pods.b.broker, "g:{lapse}", brief, refresh=["b.1"]) == []
        await asyncio.sleep(0.05)
    present = await pods.a.broker.presence_read("g:{lapse}", brief, 10)
    assert present.members == [Member("bob", 1, '{"n":2}')] and present.connections == 1
    assert await update(pods.a.broker, "g:{lapse}", brief, refresh=["a.1", "b.1"]) == ["a.1"]
    await update(pods.b.broker, "g:{lapse}", brief, departures=["b.1"])  # refreshed, then gone
    present = await pods.a.broker.presence_read("g:{lapse}", brief, 10)
    assert (present.connections, present.users, present.members) == (0, 0, [])
    assert await pods.stored("g:{lapse}") == NOTHING


async def test_presence_events_mark_a_users_first_arrival_and_last_departure_after_grace(pods: Pods) -> None:
    """Join when the user's first connection arrives; no leave while one remains, nor for a
    departure followed by an arrival within the grace (not even once the grace has passed); a
    leave once the grace passed after the last departure (settled by a read as by a write); a join
    again when the user comes back after it."""
    terms = PresenceTerms(ttl=60, grace=0.5, events=True)
    await pods.b.broker.subscribe("g:{ev}")
    before = time.time()
    await update(pods.a.broker, "g:{ev}", terms, [arrival("a.1", "ann", '{"n":1}')])
    await update(pods.a.broker, "g:{ev}", terms, [arrival("a.2", "ann")])
    await update(pods.a.broker, "g:{ev}", terms, departures=["a.1"])
    await update(pods.a.broker, "g:{ev}", terms, departures=["a.2"])
    await update(pods.b.broker, "g:{ev}", terms, [arrival("b.1", "ann")])  # back in time
    got = await pods.b.wait_for(1)
    assert got[0].event and got[0].channel == "g:{ev}"
    assert before <= got[0].sent_at <= time.time()
    assert orjson.loads(got[0].frame) == {
        "group": "ev",
        "presence": {"event": "join", "user": "ann", "claims": {"n": 1}},
    }
    await asyncio.sleep(terms.grace)  # the leave called off would be due by now
    await pods.a.broker.presence_read("g:{ev}", terms, 0)
    await update(pods.a.broker, "g:{ev}", terms)
    await pods.b.quiet(0.1)
    assert presence_events(pods.b) == [join("ann", {"n": 1})]
    await update(pods.b.broker, "g:{ev}", terms, departures=["b.1"])
    await asyncio.sleep(terms.grace)
    await eventually_settled(pods, lambda: pods.a.broker.presence_read("g:{ev}", terms, 10))
    got = await pods.b.wait_for(2)
    assert orjson.loads(got[1].frame) == {"group": "ev", "presence": {"event": "leave", "user": "ann"}}
    assert before <= got[1].sent_at <= time.time()
    await update(pods.a.broker, "g:{ev}", terms, [arrival("a.3", "ann")])  # back after the leave
    await pods.b.wait_for(3)
    await pods.b.quiet(0.1)
    assert presence_events(pods.b) == [join("ann", {"n": 1}), leave("ann"), join("ann")]


async def test_a_member_whose_refresh_stopped_leaves_at_its_expiry_without_a_further_grace(
    pods: Pods,
) -> None:
    """A crashed pod's user has been gone for the TTL when their entry expires: the write that
    drops it announces the leave at once, whatever the grace, and keeps nothing of that user."""
    terms = PresenceTerms(ttl=0.4, grace=60, events=True)
    await pods.b.broker.subscribe("g:{crash}")
    await update(pods.a.broker, "g:{crash}", terms, [arrival("a.1", "ann", '{"n":1}')])  # a crashes
    await update(pods.b.broker, "g:{crash}", terms, [arrival("b.1", "bob")])
    await pods.b.wait_for(2)
    deadline = time.monotonic() + 5
    while len(pods.b.envelopes) == 2:
        assert time.monotonic() < deadline, "no leave for the member whose entry expired"
        assert await update(pods.b.broker, "g:{crash}", terms, refresh=["b.1"]) == []
        await asyncio.sleep(0.05)
    assert presence_events(pods.b) == [join("ann", {"n": 1}), join("bob"), leave("ann")]
    assert await pods.stored("g:{crash}") == {"pc": 1, "pi": 1, "pu": 1, "pn": 1, "pa": 1}
    await update(pods.b.broker, "g:{crash}", terms, departures=["b.1"])  # a leave due in 60 s
    assert await pods.stored("g:{crash}") == {"pa": 1, "pl": 1}
    await pods.b.quiet(0.1)
    assert len(pods.b.envelopes) == 3


async def test_a_group_without_presence_events_gets_none_and_keeps_nothing_for_them(pods: Pods) -> None:
    terms = PresenceTerms(ttl=60, grace=0, events=False)
    await pods.b.broker.subscribe("g:{still}")
    await update(pods.a.broker, "g:{still}", terms, [arrival("a.1", "ann"), arrival("a.2", "bob")])
    await update(pods.a.broker, "g:{still}", terms, departures=["a.1"])
    await pods.a.broker.presence_read("g:{still}", terms, 10)
    await update(pods.a.broker, "g:{still}", terms)
    await pods.b.quiet(0.2)
    assert pods.b.envelopes == []
    assert await pods.stored("g:{still}") == {"pc": 1, "pi": 1, "pu": 1, "pn": 1}


async def eventually_settled(pods: Pods, settle: Callable[[], Awaitable[object]]) -> None:
    """Ask the store to settle until the leave event arrives (a pod does that after the grace)."""
    before = len(pods.b.envelopes)
    deadline = time.monotonic() + 5
    while len(pods.b.envelopes) == before:
        assert time.monotonic() < deadline, "no leave event"
        await settle()
        await asyncio.sleep(0.05)


# The deny list (service/revocations.py, docs/security.md "Revocation"): one pod records, all read.


async def test_a_denied_key_is_read_by_every_pod_until_it_expires(pods: Pods) -> None:
    """What one pod records, another reads back exactly (the revocation's wall time), for that key
    only, until `seconds` have passed."""
    assert await pods.b.broker.denied("user-1") is None
    await pods.a.broker.deny("user-1", 1764000000.123456, 0.3)
    assert await pods.b.broker.denied("user-1") == 1764000000.123456
    assert await pods.b.broker.denied("user-2") is None
    deadline = time.monotonic() + 5
    while await pods.b.broker.denied("user-1") is not None:
        assert time.monotonic() < deadline, "the deny entry never expired"
        await asyncio.sleep(0.05)

"""Presence across real pods and real Redis: counts and members, expiry of a killed pod's, drain,
user-level events through a reconnect storm, and bad input (docs/presence.md).

Pods are real uvicorn servers in this event loop (processes for the one that is SIGKILLed); clients
are real WebSocket clients; Redis is a real redis-server.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from service import metrics
from service.broker.memory import MemoryBroker, MemoryBus
from service.connection import Connection
from service.presence import Presence, PresenceOff
from service.rules import GroupRules
from service.server import PodServer
from tests.brokers import FAST_REDIS, eventually
from tests.helpers import Client, join, metric, running_pod, settings, start_pod_process
from tests.redis_servers import RedisCluster, RedisServer
from tests.test_schema import schema
from tests.test_server_api import AUTH, api, url
from tests.tokens import SECRET

pytestmark = pytest.mark.integration

RULES = """
[[group]]
match = "room*"
presence = "full"
presence_events = true
presence_claims = ["name"]

[[group]]
match = "count*"
presence = "counts"
"""


@pytest.fixture
def rules_file(tmp_path: Path) -> str:
    path = tmp_path / "groups.toml"
    path.write_text(RULES)
    return str(path)


@asynccontextmanager
async def pods(
    url_: str, prefix: str, count: int, rules_file: str, **overrides: Any
) -> AsyncIterator[list[PodServer]]:
    settings = {**FAST_REDIS, **AUTH, "group_rules_file": rules_file, **overrides}
    async with AsyncExitStack() as stack:
        if url_ == "memory://":
            bus = MemoryBus()  # plays the shared Redis for pods in one process
            yield [
                await stack.enter_async_context(running_pod(MemoryBroker(bus), pod_id=f"pod{n}", **settings))
                for n in range(count)
            ]
            return
        yield [
            await stack.enter_async_context(
                running_pod(broker_url=url_, pod_id=f"pod{n}", redis_prefix=prefix, **settings)
            )
            for n in range(count)
        ]


async def presence(pod: PodServer | int, group: str, query: str = "") -> dict[str, Any]:
    response = await api(pod, "GET", f"/api/presence/{group}{query}")
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> float:
    """Poll the async `check` until true; the seconds it took."""
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < timeout, f"condition not met within {timeout} s"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def counted(
    pod: PodServer | int, group: str, connections: int, users: int, timeout: float = 5.0
) -> float:
    async def check() -> bool:
        answer = await presence(pod, group)
        return bool(answer["connections"] == connections and answer["users"] == users)

    return await until(check, timeout)


SERVER_FRAME = schema("server-frame.schema.json")


def fits(text: str | bytes) -> dict[str, Any]:
    """The frame in `text`, once it is checked against docs/schema/server-frame.schema.json."""
    frame: dict[str, Any] = json.loads(text)
    jsonschema.validate(frame, SERVER_FRAME)
    return frame


class V1:
    """A v1 client (relay.v1 subprotocol): requests by ref, and every other frame kept in order.
    Every frame it reads must fit the server frame schema."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []
        self._ref = 0

    @classmethod
    async def open(cls, address: str) -> V1:
        # Unbounded: a client that reads nothing (the storm's) must still take the close frame.
        ws = await websockets.connect(address, subprotocols=["relay.v1"], open_timeout=5, max_queue=None)  # type: ignore[list-item]
        json.loads(await asyncio.wait_for(ws.recv(), 5))  # the welcome
        return cls(ws)

    async def request(self, **body: Any) -> dict[str, Any]:
        self._ref += 1
        await self.ws.send(json.dumps({**body, "ref": self._ref}))
        while True:
            frame = fits(await asyncio.wait_for(self.ws.recv(), 5))
            if frame.get("ack") == self._ref or frame.get("error", {}).get("ref") == self._ref:
                return frame
            self.frames.append(frame)

    async def until(
        self, wanted: Callable[[dict[str, Any]], bool], timeout: float = 5.0
    ) -> list[dict[str, Any]]:
        """Read frames until one satisfies `wanted`; every frame read (kept too)."""
        read: list[dict[str, Any]] = []
        while not read or not wanted(read[-1]):
            frame = fits(await asyncio.wait_for(self.ws.recv(), timeout))
            self.frames.append(frame)
            read.append(frame)
        return read


def events(frames: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(f["presence"]["event"], f["presence"]["user"]) for f in frames if "presence" in f]


async def close_all(*clients: Client | V1) -> None:
    await asyncio.gather(*(c.ws.close() for c in clients))


async def counts_and_members_follow_clients_across_three_pods(found: list[PodServer]) -> None:
    p0, p1, p2 = found
    alice = [await join(url(p0, "/room", "alice")), await join(url(p1, "/room", "alice"))]
    bob = await join(url(p1, "/room", "bob", name="Bob", email="not shown"))
    carol = await join(url(p2, "/room", "carol", name="C" * 1000))  # over the claims cap: not shown
    await counted(p2, "room", 4, 3)
    for pod in found:
        assert await presence(pod, "room") == {
            "group": "room",
            "mode": "full",
            "connections": 4,
            "users": 3,
            "members": [
                {"user": "alice", "connections": 2, "claims": {}},
                {"user": "bob", "connections": 1, "claims": {"name": "Bob"}},
                {"user": "carol", "connections": 1, "claims": {}},
            ],
            "truncated": False,
        }
    await alice[0].ws.close()
    await counted(p2, "room", 3, 3)
    await carol.ws.close()
    await counted(p0, "room", 2, 2)
    watcher = await V1.open(url(p2, "/", "dave"))  # not a member: reading is not joining
    ack = await watcher.request(task="presence", group_name="room")
    assert ack == {"ack": 1, "presence": await presence(p0, "room")}
    assert [m["user"] for m in ack["presence"]["members"]] == ["alice", "bob"]
    counter = [await join(url(pod, "/count1", f"u{n}")) for n, pod in enumerate(found)]
    await counted(p1, "count1", 3, 3)
    assert await presence(p1, "count1") == {"group": "count1", "mode": "counts", "connections": 3, "users": 3}
    await close_all(alice[1], bob, watcher, *counter)
    await counted(p0, "room", 0, 0)
    await counted(p0, "count1", 0, 0)


@pytest.mark.xdist_group("redis-single")
async def test_counts_and_members_follow_clients_across_three_pods(
    redis_server: RedisServer, redis_prefix: str, rules_file: str
) -> None:
    async with pods(redis_server.url, redis_prefix, 3, rules_file) as found:
        await counts_and_members_follow_clients_across_three_pods(found)
    # Everyone left: no entry is left behind, only the users whose leave event is still within its
    # grace (announced, leaving), and those keys expire by themselves.
    left = redis_server.call("KEYS", f"{redis_prefix}:p[a-z]:*")
    assert sorted(left) == [f"{redis_prefix}:pa:{{room}}", f"{redis_prefix}:pl:{{room}}"]
    assert all(0 < int(redis_server.call("PTTL", key)) <= (60 + 5 + 1) * 1000 for key in left)


@pytest.mark.xdist_group("redis-cluster")
async def test_counts_and_members_through_a_cluster(
    redis_cluster: RedisCluster, redis_prefix: str, rules_file: str
) -> None:
    """Every key of a group under its hash tag: one slot, one FCALL, on whichever shard owns it."""
    async with pods(redis_cluster.url, redis_prefix, 3, rules_file) as found:
        await counts_and_members_follow_clients_across_three_pods(found)


async def test_counts_and_members_over_the_memory_bus(rules_file: str) -> None:
    async with pods("memory://", "", 3, rules_file) as found:
        await counts_and_members_follow_clients_across_three_pods(found)


@pytest.mark.xdist_group("redis-single")
async def test_a_killed_pods_members_vanish_within_the_ttl(
    redis_server: RedisServer, redis_prefix: str, rules_file: str
) -> None:
    """SIGKILL: the pod says nothing, so its members stay until their entries expire, at most the
    TTL after its last refresh (every TTL/3); then every pod's answer leaves them out."""
    ttl = 1.5
    env = {
        "RELAY_BROKER_URL": redis_server.url,
        "RELAY_REDIS_PREFIX": redis_prefix,
        "RELAY_GROUP_RULES_FILE": rules_file,
        "RELAY_PRESENCE_TTL": str(ttl),
        "RELAY_JWT_SECRET": SECRET,
        "RELAY_POD_ID": "victim",
    }
    victim = start_pod_process(env)
    try:
        async with pods(redis_server.url, redis_prefix, 1, rules_file, presence_ttl=ttl) as (survivor,):
            doomed = [await join(url(victim.port, "/room", f"v{n}")) for n in range(3)]
            kept = await join(url(survivor, "/room", "kept"))
            await counted(survivor, "room", 4, 4)
            await asyncio.sleep(ttl / 2)  # past at least one of the victim's refreshes
            victim.terminate(signal.SIGKILL)
            killed = time.monotonic()
            victim.wait()
            assert (await presence(survivor, "room"))["users"] == 4  # not gone at once: nobody said
            started = next(line for line in victim.logs() if line.get("event") == "pod.started")
            assert started["presence"] == {"room*": "full with events", "count*": "counts"}  # said at start
            await counted(survivor, "room", 1, 1, timeout=ttl * 3)
            assert time.monotonic() - killed <= ttl + 0.5  # (the slack: noticing it, on a busy machine)
            await close_all(kept, *doomed)
    finally:
        if victim.proc.poll() is None:
            victim.terminate(signal.SIGKILL)
            victim.wait()


@pytest.mark.xdist_group("redis-single")
async def test_a_drain_removes_the_pods_members_at_once(
    redis_server: RedisServer, redis_prefix: str, rules_file: str
) -> None:
    """A drained pod's members leave as their sockets close, long before the TTL."""
    async with pods(redis_server.url, redis_prefix, 2, rules_file, presence_ttl=60.0) as (p0, p1):
        leaving = [await join(url(p0, "/room", f"d{n}")) for n in range(5)]
        staying = await join(url(p1, "/room", "stay"))
        await counted(p1, "room", 6, 6)
        entries = metric("relay_presence_entries")
        started = time.monotonic()
        await p0.pod.drain()
        assert time.monotonic() - started < 5
        await counted(p1, "room", 1, 1, timeout=2)  # at once: not the 60 s TTL
        assert metric("relay_presence_entries") == entries - 5
        await close_all(staying, *leaving)


GRACE = 2.5  # the storm below takes well under a second; room for a loaded machine


@pytest.mark.xdist_group("redis-single")
async def test_a_reconnect_storm_within_the_grace_is_no_leave_and_no_join(
    redis_server: RedisServer, redis_prefix: str, rules_file: str
) -> None:
    """Every client of a pod reconnects to another within a second: the watcher hears no leave and
    no join for any of them; only the user who did not come back leaves, once the grace passed.
    A seed-protocol member of the group never receives a presence frame."""
    async with pods(redis_server.url, redis_prefix, 2, rules_file, presence_grace=GRACE) as (p0, p1):
        seed = await join(url(p1, "/room", "seed"))
        watcher = await V1.open(url(p1, "/room", "watch"))
        users = [f"s{n}" for n in range(20)]
        storm = [await V1.open(url(p0, "/room", user)) for user in users]
        gone = await V1.open(url(p0, "/room", "gone", name="Gone"))
        heard = await watcher.until(lambda f: events([f]) == [("join", "gone")])
        # The seed client's join went out before the watcher was there to hear it, or in one batch
        # with the watcher's own.
        assert [e for e in events(heard) if e != ("join", "seed")] == [
            ("join", u) for u in ["watch", *users, "gone"]
        ]
        assert {
            "group": "room",
            "presence": {"event": "join", "user": "gone", "claims": {"name": "Gone"}},
        } in heard

        started = time.monotonic()
        await close_all(*storm)
        storm = [await V1.open(url(p1, "/room", user)) for user in users]  # back, on the other pod
        await gone.ws.close()
        storm_took = time.monotonic() - started
        assert storm_took < GRACE  # within the grace, or the leaves would be due (a second here)

        heard = await watcher.until(lambda f: "presence" in f, timeout=10)
        assert events(heard) == [("leave", "gone")]
        assert time.monotonic() - started >= GRACE  # not before the grace
        assert heard[-1] == {"group": "room", "presence": {"event": "leave", "user": "gone"}}
        # Every storm user's leave was due before gone's: had one been announced, it came first.
        marker = await seed.publish("room", marker=True)
        heard = await watcher.until(lambda f: "group" in f and f.get("message") == marker)
        assert events(heard) == []
        await seed.nothing_before(marker)  # the seed client saw 26 joins and a leave go by: none reached it
        await counted(p0, "room", 22, 22)
        await close_all(seed, watcher, *storm)


@pytest.mark.xdist_group("redis-single")
async def test_bad_presence_requests_get_clear_answers(
    redis_server: RedisServer, redis_prefix: str, rules_file: str
) -> None:
    """Unknown keys, invalid names, groups without presence, out-of-range limits; and lists capped
    at RELAY_PRESENCE_MAX_MEMBERS with `truncated`."""
    async with pods(redis_server.url, redis_prefix, 1, rules_file, presence_max_members=3) as (p0,):
        clients = [await join(url(p0, "/room", f"u{n}")) for n in range(5)]
        await counted(p0, "room", 5, 5)
        capped = await presence(p0, "room")
        assert len(capped["members"]) == 3 and capped["truncated"] is True and capped["users"] == 5
        two = await presence(p0, "room", "?limit=2")
        assert [m["user"] for m in two["members"]] == sorted(m["user"] for m in two["members"])
        assert len(two["members"]) == 2 and two["truncated"] is True

        async def refused(path: str, **options: Any) -> tuple[int, str]:
            response = await api(p0, "GET", path, **options)
            return response.status_code, response.json()["error"]["code"]

        assert await refused("/api/presence/room", headers={}) == (401, "unauthorized")
        assert await refused("/api/presence/room", headers={"Authorization": "Bearer nope"}) == (
            403,
            "forbidden",
        )
        assert await refused("/api/presence/other") == (404, "presence_off")
        assert await refused("/api/presence/no%20spaces") == (400, "invalid_group")
        assert await refused("/api/presence/" + "x" * 100) == (400, "invalid_group")
        for limit in ("0", "4", "-1", "1.5", "many"):
            assert await refused(f"/api/presence/room?limit={limit}") == (400, "bad_request"), limit

        member = await V1.open(url(p0, "/", "v1", groups=["room*", "other"]))
        off = await member.request(task="presence", group_name="other")
        assert off["error"]["code"] == "presence_off"
        assert (await member.request(task="presence", group_name="count9"))["error"]["code"] == "forbidden"
        assert (await member.request(task="presence", group_name="bad name"))["error"][
            "code"
        ] == "invalid_group"
        # A seed client's presence frame without a ref is ignored in silence, as before.
        await clients[0].ws.send(json.dumps({"task": "presence", "group_name": "room"}))
        marker = await clients[0].publish("room", n=1)
        await clients[0].nothing_before(marker)
        await close_all(member, *clients)


async def test_a_redis_outage_keeps_every_connection_and_the_refresh_puts_presence_back(
    dedicated_redis: RedisServer, redis_prefix: str, rules_file: str
) -> None:
    """Redis dies and comes back empty: the members stay connected throughout, the writes that fail
    meanwhile are counted, and the next refresh adds every entry again."""
    async with pods(dedicated_redis.url, redis_prefix, 2, rules_file, presence_ttl=1.5) as (p0, p1):
        a = await join(url(p0, "/room", "ann"))
        b = await join(url(p1, "/room", "ben"))
        await counted(p0, "room", 2, 2)
        repaired = metric("relay_presence_repaired_total")
        failed = metric("relay_presence_failures_total", kind="refresh")
        dedicated_redis.kill()
        late = await join(url(p0, "/room", "cat"))  # joins while Redis is down: not refused for it
        await eventually(lambda: metric("relay_presence_failures_total", kind="refresh") > failed)
        dedicated_redis.start()  # empty: no persistence
        await counted(p1, "room", 3, 3, timeout=10)
        assert metric("relay_presence_repaired_total") >= repaired + 2  # ann's and ben's, re-added
        marker = await b.publish("room", n=1)  # everyone was served all along
        for client in (a, b, late):
            await client.nothing_before(marker)
        await close_all(a, b, late)


async def test_claims_past_the_cap_are_left_out_the_last_named_first() -> None:
    """Only allow-listed claims are shown, within RELAY_PRESENCE_CLAIMS_BYTES: the rule's last named
    claims go first until the rest fits (and a connection without a sub counts, unlisted)."""
    rules = GroupRules.parse(
        {"group": [{"match": "*", "presence": "full", "presence_claims": ["name", "role", "avatar"]}]}
    )
    presence = Presence(MemoryBroker(MemoryBus()), rules, settings(presence_claims_bytes=40))
    presence.start()
    try:
        claims = {"name": "Ann", "role": "admin", "avatar": "x" * 30, "email": "never shown"}
        presence.joined(Connection("p.1", _send, outbox_size=1, sub="ann", claims=claims), "g:{room}")
        presence.joined(Connection("p.2", _send, outbox_size=1), "g:{room}")
        assert await presence.read("room") == {
            "group": "room",
            "mode": "full",
            "connections": 2,
            "users": 1,
            "members": [{"user": "ann", "connections": 1, "claims": {"name": "Ann", "role": "admin"}}],
            "truncated": False,
        }
        with pytest.raises(PresenceOff):
            await Presence(MemoryBroker(MemoryBus()), GroupRules([]), settings()).read("room")
    finally:
        await presence.stop(1.0)


async def _send(message: dict[str, Any]) -> None:
    return None


async def test_a_connection_told_twice_counts_once_and_one_leave_removes_it() -> None:
    """The hub may report a join twice (a recovering join abandoned in a backend's leave-and-join
    race): the entry, the store's counts and relay_presence_entries count it once."""
    rules = GroupRules.parse({"group": [{"match": "*", "presence": "counts"}]})
    presence = Presence(MemoryBroker(MemoryBus()), rules, settings())
    presence.start()
    entries = metrics.PRESENCE_ENTRIES._value.get()
    try:
        conn = Connection("p.1", _send, outbox_size=1, sub="ann")
        presence.joined(conn, "g:{room}")
        presence.joined(conn, "g:{room}")
        assert metrics.PRESENCE_ENTRIES._value.get() == entries + 1
        assert (await presence.read("room"))["connections"] == 1
        presence.left(conn, "g:{room}")
        assert metrics.PRESENCE_ENTRIES._value.get() == entries
        assert (await presence.read("room"))["connections"] == 0
    finally:
        await presence.stop(1.0)

"""The server API (disconnect, subscribe, unsubscribe, groups, info) across real pods and real Redis.

Pods are real uvicorn servers (in this event loop, or processes for the pod that never answers);
clients are real WebSocket clients; Redis is a real redis-server (single, Sentinel and Cluster).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, ExitStack, asynccontextmanager
from typing import Any

import httpx
import pytest
import websockets
from websockets.sync.client import connect

from service.broker.memory import MemoryBroker, MemoryBus
from service.server import PodServer
from tests.brokers import FAST_REDIS
from tests.helpers import Client, closed_with, join, metric, running_pod, start_pod_process, ws_url
from tests.redis_servers import RedisCluster, RedisServer, SentinelSet
from tests.tokens import SECRET, hs256

pytestmark = pytest.mark.integration

KEY = {"Authorization": "Bearer backend-key"}
AUTH: dict[str, Any] = {"jwt_secret": SECRET, "api_keys": "backend-key"}


@asynccontextmanager
async def pods(url: str, prefix: str, count: int, **overrides: Any) -> AsyncIterator[list[PodServer]]:
    settings = {**FAST_REDIS, **AUTH, **overrides}
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(
                running_pod(broker_url=url, pod_id=f"pod{n}", redis_prefix=prefix, **settings)
            )
            for n in range(count)
        ]


@asynccontextmanager
async def memory_pods(count: int) -> AsyncIterator[list[PodServer]]:
    bus = MemoryBus()  # plays the shared Redis for pods in one process
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(running_pod(MemoryBroker(bus), pod_id=f"pod{n}", **AUTH))
            for n in range(count)
        ]


def url(pod: PodServer | int, path: str, sub: str = "alice", **claims: Any) -> str:
    groups = claims.pop("groups", ["*"])
    return ws_url(pod, f"{path}?token={hs256(sub=sub, groups=groups, publish=['*'], **claims)}")


async def api(pod: PodServer | int, method: str, path: str, **options: Any) -> httpx.Response:
    port = pod if isinstance(pod, int) else pod.internal_port
    options.setdefault("headers", KEY)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=20) as http:
        return await http.request(method, path, **options)


async def closed(client: Client) -> tuple[int, str]:
    """Wait for the server to close `client`: the code and reason it sent."""
    try:
        while True:
            await asyncio.wait_for(client.ws.recv(), 5)
    except websockets.ConnectionClosed as exc:
        assert exc.rcvd is not None
        return exc.rcvd.code, exc.rcvd.reason


async def exchange(sender: Client, group: str, receivers: list[Client]) -> None:
    body = await sender.publish(group, n=time.monotonic())
    for receiver in receivers:
        assert await receiver.next() == {"message": body}


async def disconnect_by_user_reaches_every_pod(found: list[PodServer]) -> None:
    alice = [await join(url(pod, "/room")) for pod in found]
    bob = await join(url(found[-1], "/room", sub="bob"))
    response = await api(found[0], "POST", "/api/disconnect", json={"user": "alice", "reason": "logged out"})
    assert response.status_code == 200, response.text
    names = [pod.settings.pod_id for pod in found]
    assert response.json() == {
        "connections": len(found),
        "code": 4010,
        "reconnect": True,
        "pods": len(found),
        "answered": names,
        "complete": True,
    }
    for client in alice:
        assert await closed(client) == (4010, "logged out")
    await exchange(bob, "room", [bob])  # bob is still there and still served
    await bob.ws.close()


@pytest.mark.xdist_group("redis-single")
async def test_disconnect_by_user_reaches_connections_on_three_pods(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    async with pods(redis_server.url, redis_prefix, 3) as found:
        await disconnect_by_user_reaches_every_pod(found)


@pytest.mark.xdist_group("redis-sentinel")
async def test_disconnect_by_user_through_sentinel(sentinel_set: SentinelSet, redis_prefix: str) -> None:
    async with pods(sentinel_set.url, redis_prefix, 2) as found:
        await disconnect_by_user_reaches_every_pod(found)


@pytest.mark.xdist_group("redis-cluster")
async def test_disconnect_by_user_through_a_cluster(redis_cluster: RedisCluster, redis_prefix: str) -> None:
    async with pods(redis_cluster.url, redis_prefix, 2) as found:
        await disconnect_by_user_reaches_every_pod(found)


async def test_disconnect_by_user_over_the_memory_bus() -> None:
    async with memory_pods(2) as found:
        await disconnect_by_user_reaches_every_pod(found)


@pytest.mark.xdist_group("redis-single")
async def test_disconnect_one_channel_id(redis_server: RedisServer, redis_prefix: str) -> None:
    async with pods(redis_server.url, redis_prefix, 2) as (p0, p1):
        first, second = await join(url(p0, "/room")), await join(url(p1, "/room"))
        response = await api(
            p0, "POST", "/api/disconnect", json={"channel_id": second.channel_id, "code": 4321}
        )
        assert response.json()["connections"] == 1 and response.json()["reconnect"] is True
        assert await closed(second) == (4321, "disconnected by the server")
        await exchange(first, "room", [first])
        await first.ws.close()


async def revoked_users_cannot_come_back(found: list[PodServer]) -> None:
    token_url = {pod.port: url(pod, "/room") for pod in found}
    alice = await join(token_url[found[0].port])
    response = await api(
        found[-1], "POST", "/api/disconnect", json={"user": "alice", "reconnect": False, "deny_seconds": 60}
    )
    assert response.status_code == 200, response.text
    assert response.json()["connections"] == 1 and response.json()["denied_seconds"] == 60
    assert await closed(alice) == (4510, "access revoked")
    before = metric("relay_connections_rejected_total", reason="revoked")
    for pod in found:  # the same still-valid token, on every pod
        assert await closed_with(token_url[pod.port]) == 4510
    assert metric("relay_connections_rejected_total", reason="revoked") == before + len(found)
    bob = await join(url(found[0], "/room", sub="bob"))  # other users are not affected
    fresh = await join(url(found[0], "/room", iat=int(time.time()) + 2))  # issued after the revocation
    await exchange(bob, "room", [bob, fresh])
    await asyncio.gather(bob.ws.close(), fresh.ws.close())


@pytest.mark.xdist_group("redis-single")
async def test_revoked_users_cannot_come_back_with_the_old_token(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    async with pods(redis_server.url, redis_prefix, 2) as found:
        await revoked_users_cannot_come_back(found)
        keys = redis_server.call("KEYS", f"{redis_prefix}:deny:*")
        assert len(keys) == 1 and 0 < int(redis_server.call("PTTL", keys[0])) <= 60_000


@pytest.mark.xdist_group("redis-single")
async def test_a_pod_started_after_the_revocation_refuses_too(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """The deny list lives in Redis: a pod that was not there when the command went out knows it."""
    async with pods(redis_server.url, redis_prefix, 1) as (p0,):
        response = await api(
            p0, "POST", "/api/disconnect", json={"user": "alice", "code": 4599, "deny_seconds": 30}
        )
        assert response.json()["connections"] == 0 and response.json()["reconnect"] is False
        async with running_pod(
            broker_url=redis_server.url, pod_id="late", redis_prefix=redis_prefix, **FAST_REDIS, **AUTH
        ) as late:
            assert await closed_with(url(late, "/room")) == 4510


@pytest.mark.xdist_group("redis-cluster")
async def test_revocation_through_a_cluster(redis_cluster: RedisCluster, redis_prefix: str) -> None:
    async with pods(redis_cluster.url, redis_prefix, 2) as found:
        await revoked_users_cannot_come_back(found)


@pytest.mark.xdist_group("redis-single")
async def test_a_revocation_wins_against_clients_reconnecting_all_the_while(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """Clients of the revoked user reconnect in a loop on both pods while the disconnect goes out:
    once it has answered, none of them is connected, and every later attempt is refused."""
    async with pods(redis_server.url, redis_prefix, 2, user_connect_rate=1000.0) as found:
        revoked = asyncio.Event()
        refusals_after: list[int] = []
        stop = asyncio.Event()

        async def reconnect_forever(pod: PodServer) -> None:
            while not stop.is_set():
                after = revoked.is_set()
                async with websockets.connect(url(pod, "/room"), open_timeout=5) as ws:
                    try:
                        while True:
                            await asyncio.wait_for(ws.recv(), 10)
                    except websockets.ConnectionClosed as exc:
                        assert exc.rcvd is not None and exc.rcvd.code == 4510
                        if after:
                            refusals_after.append(exc.rcvd.code)

        loops = [asyncio.create_task(reconnect_forever(pod)) for pod in found for _ in range(3)]
        await until(lambda: sum(c.sub == "alice" for pod in found for c in pod.pod.hub.connections) >= 6)
        response = await api(
            found[0],
            "POST",
            "/api/disconnect",
            json={"user": "alice", "reconnect": False, "deny_seconds": 60},
        )
        revoked.set()
        assert response.json()["complete"] and response.json()["connections"] >= 1
        await until(lambda: len(refusals_after) >= 20)  # every loop keeps trying, and keeps being refused
        stop.set()
        for loop in loops:
            await asyncio.wait_for(loop, 10)  # a socket that got in would hold its loop: this times out
        opened = [
            c
            for pod in found
            for c in pod.pod.hub.connections
            if c.sub == "alice" and c.state.value == "open"
        ]
        assert opened == []


async def until(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_with_redis_down_a_pod_still_refuses_what_it_was_told(dedicated_redis: RedisServer) -> None:
    """Redis unreachable at the handshake: each pod falls back on its own copy of the deny list,
    filled by the disconnect command, and lets other users in (counted as `unavailable`)."""
    async with pods(dedicated_redis.url, "down", 2) as found:
        response = await api(
            found[0],
            "POST",
            "/api/disconnect",
            json={"user": "alice", "reconnect": False, "deny_seconds": 60},
        )
        assert response.json()["complete"]
        dedicated_redis.pause()
        try:
            v1 = {"subprotocols": [websockets.Subprotocol("relay.v1")]}  # path "/": no group, no broker
            before = metric("relay_revocation_checks_total", result="unavailable")
            for pod in found:
                assert await closed_with(url(pod, "/"), **v1) == 4510
                bob = await join(url(pod, "/", sub="bob"), **v1)
                await bob.ws.close()
            assert metric("relay_revocation_checks_total", result="unavailable") == before + 2
        finally:
            dedicated_redis.cont()


async def test_revocation_over_the_memory_bus() -> None:
    async with memory_pods(2) as found:
        await revoked_users_cannot_come_back(found)


@pytest.mark.xdist_group("redis-single")
async def test_server_side_subscribe_on_two_pods(redis_server: RedisServer, redis_prefix: str) -> None:
    async with pods(redis_server.url, redis_prefix, 2) as (p0, p1):
        on_p0 = await join(url(p0, "/lobby", groups=["lobby"]))
        on_p1 = await join(url(p1, "/lobby", groups=["lobby"]))
        bob = await join(url(p1, "/lobby", sub="bob"))
        response = await api(p1, "POST", "/api/subscribe", json={"users": ["alice"], "group": "news"})
        assert response.status_code == 200, response.text
        assert response.json() == {
            "group": "news",
            "connections": 2,
            "refused": 0,
            "pods": 2,
            "answered": ["pod0", "pod1"],
            "complete": True,
        }  # the token does not list "news": the backend's word is enough
        published = await api(p0, "POST", "/api/publish", json={"group": "news", "message": "hello"})
        assert published.json()["pods"] == 2
        for client in (on_p0, on_p1):
            assert await client.next() == {"message": "hello"}
        groups = (await api(p0, "GET", "/api/groups")).json()
        assert (
            groups["groups"]
            == [
                {"group": "lobby", "connections": 3},
                {"group": "news", "connections": 2},
            ]
            and groups["complete"]
        )
        response = await api(p0, "POST", "/api/unsubscribe", json={"user": "alice", "group": "news"})
        assert response.json()["connections"] == 2
        await api(p0, "POST", "/api/publish", json={"group": "news", "message": "gone"})
        for client in (on_p0, on_p1):  # the direct send follows the group message through one Redis
            marker = await api(
                p0, "POST", "/api/publish", json={"channel_id": client.channel_id, "message": "m"}
            )
            assert marker.status_code == 202
            assert await client.next() == {"message": "m"}
        response = await api(p0, "POST", "/api/unsubscribe", json={"user": "alice", "group": "news"})
        assert response.status_code == 404 and response.json()["error"]["code"] == "unknown_group"
        await asyncio.gather(on_p0.ws.close(), on_p1.ws.close(), bob.ws.close())


async def test_info_and_groups_are_cluster_wide() -> None:
    async with memory_pods(2) as (p0, p1):
        clients = [await join(url(p0, "/a")), await join(url(p1, "/a")), await join(url(p1, "/b"))]
        info = (await api(p1, "GET", "/api/info")).json()
        assert info["pod"] == "pod1" and info["connections"] == 3 and info["answered"] == ["pod0", "pod1"]
        assert info["nodes"]["pod0"]["connections"] == 1 and info["nodes"]["pod1"]["groups"] == 2
        listed = (await api(p0, "GET", "/api/groups?limit=1")).json()
        assert listed["groups"] == [{"group": "a", "connections": 2}] and listed["truncated"] is True
        await asyncio.gather(*(c.ws.close() for c in clients))


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [
        ("POST", "/api/disconnect", {}, 400, "bad_request"),
        ("POST", "/api/disconnect", {"user": ""}, 400, "bad_request"),
        ("POST", "/api/disconnect", {"user": "a", "users": ["b"]}, 400, "bad_request"),
        ("POST", "/api/disconnect", {"users": "alice"}, 400, "bad_request"),
        ("POST", "/api/disconnect", {"users": [f"u{n}" for n in range(1001)]}, 400, "too_many"),
        ("POST", "/api/disconnect", {"channel_id": "nodot"}, 400, "bad_request"),
        ("POST", "/api/disconnect", {"user": "a", "code": 1000}, 400, "bad_code"),
        ("POST", "/api/disconnect", {"user": "a", "code": 4600, "reconnect": True}, 400, "bad_code"),
        ("POST", "/api/disconnect", {"user": "a", "reason": "x" * 124}, 400, "bad_request"),
        ("POST", "/api/disconnect", {"user": "a", "deny_seconds": 10}, 400, "bad_request"),
        (
            "POST",
            "/api/disconnect",
            {"user": "a", "reconnect": False, "deny_seconds": 1e9},
            400,
            "bad_request",
        ),
        ("POST", "/api/disconnect", {"user": "a", "timeout": 60}, 400, "bad_request"),
        ("POST", "/api/disconnect", b"{not json", 400, "bad_json"),
        ("POST", "/api/disconnect", [1, 2], 400, "bad_request"),
        ("POST", "/api/subscribe", {"user": "a"}, 400, "invalid_group"),
        ("POST", "/api/subscribe", {"user": "a", "group": "no spaces"}, 400, "invalid_group"),
        ("POST", "/api/subscribe", {"group": "g"}, 400, "bad_request"),
        ("POST", "/api/unsubscribe", {"user": "a", "group": "nobody-here"}, 404, "unknown_group"),
        ("GET", "/api/groups?limit=0", None, 400, "bad_request"),
        ("GET", "/api/groups?limit=5000", None, 400, "bad_request"),
        ("GET", "/api/info?timeout=nan", None, 400, "bad_request"),
    ],
)
async def test_bad_input_is_refused_with_a_message(
    method: str, path: str, body: Any, status: int, code: str
) -> None:
    async with running_pod(api_keys="backend-key") as pod:
        content = body if isinstance(body, bytes) else None
        options: dict[str, Any] = {"content": content} if content is not None else {}
        if body is not None and content is None:
            options["json"] = body
        response = await api(pod, method, path, **options)
        assert response.status_code == status, response.text
        assert response.json()["error"]["code"] == code and response.json()["error"]["detail"]


@pytest.mark.parametrize("path", ["/api/disconnect", "/api/subscribe", "/api/unsubscribe"])
async def test_keys_are_required(path: str) -> None:
    async with running_pod(api_keys="backend-key") as pod:
        body = {"user": "a", "group": "g"}
        assert (await api(pod, "POST", path, json=body, headers={})).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert (await api(pod, "POST", path, json=body, headers=wrong)).json()["error"]["code"] == "forbidden"
    async with running_pod() as pod:
        assert (await api(pod, "GET", "/api/info")).status_code == 404  # no keys: the API is off


async def test_a_large_body_is_refused() -> None:
    async with running_pod(api_keys="backend-key", max_frame_bytes=1000) as pod:
        response = await api(pod, "POST", "/api/disconnect", json={"users": ["x" * 200] * 10})
        assert response.status_code == 413 and response.json()["error"]["code"] == "too_large"


@pytest.mark.xdist_group("redis-single")
def test_a_pod_that_never_answers_still_gets_a_bounded_answer(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    env = {
        "RELAY_BROKER_URL": redis_server.url,
        "RELAY_REDIS_PREFIX": redis_prefix,
        "RELAY_API_KEYS": "backend-key",
        "RELAY_JWT_SECRET": SECRET,
        "RELAY_DRAIN_DELAY": "0",
    }
    asking = start_pod_process({**env, "RELAY_POD_ID": "asking"})
    stopped = start_pod_process({**env, "RELAY_POD_ID": "stopped"})
    token = hs256(sub="alice", groups=["*"])
    stack = ExitStack()
    try:
        info = httpx.get(f"http://127.0.0.1:{asking.internal_port}/api/info", headers=KEY, timeout=10)
        assert info.json()["answered"] == ["asking", "stopped"]
        late = stack.enter_context(
            connect(f"ws://127.0.0.1:{stopped.port}/room?token={token}", open_timeout=5)
        )
        late.recv(5)  # the welcome
        stopped.terminate(signal.SIGSTOP)
        started = time.monotonic()
        response = httpx.post(
            f"http://127.0.0.1:{asking.internal_port}/api/disconnect",
            json={"user": "alice", "timeout": 0.5},
            headers=KEY,
            timeout=10,
        )
        took = time.monotonic() - started
        assert response.status_code == 200, response.text
        assert response.json()["pods"] == 2 and response.json()["answered"] == ["asking"]
        assert response.json()["complete"] is False
        assert 0.5 <= took < 3.0
        unanswered = httpx.get(f"http://127.0.0.1:{asking.internal_port}/metrics", timeout=5).text
        assert "relay_server_api_unanswered_pods_total 1.0" in unanswered
        stopped.terminate(signal.SIGCONT)  # the command waited in its socket: carried out late
        with pytest.raises(websockets.ConnectionClosed) as closed_late:
            late.recv(10)
        assert closed_late.value.rcvd is not None and closed_late.value.rcvd.code == 4010
    finally:
        stopped.terminate(signal.SIGCONT)
        stack.close()
        for pod in (asking, stopped):
            pod.terminate()
            pod.wait()

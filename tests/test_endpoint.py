"""End to end over real sockets: a real uvicorn pod in the test's loop, real WebSocket clients."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import websockets
from structlog.testing import capture_logs

from service import channels
from service.broker.memory import MemoryBroker, MemoryBus
from tests.brokers import eventually
from tests.helpers import join, metric, running_pod, stalled_client, ws_url

pytestmark = pytest.mark.integration


async def test_first_frame_is_a_channel_id_that_starts_with_the_pod_id() -> None:
    async with running_pod(pod_id="pod-x") as pod:
        a, b = await join(ws_url(pod, "/chat")), await join(ws_url(pod, "/chat"))
        assert a.channel_id.startswith("pod-x.") and b.channel_id.startswith("pod-x.")
        assert a.channel_id != b.channel_id


async def test_group_message_reaches_every_member_and_the_sender_unchanged() -> None:
    async with running_pod() as pod:
        a, b = await join(ws_url(pod, "/room/1")), await join(ws_url(pod, "/room_1"))
        other = await join(ws_url(pod, "/room"))
        sent = await a.publish("room_1", payload={"n": [1, 2.5, "é"]})
        assert await a.next() == {"message": sent}
        assert await b.next() == {"message": sent}
        await other.nothing_before(await a.publish("room", marker=True))  # "room" is not "room_1"


async def test_a_client_may_publish_to_a_group_it_has_not_joined() -> None:
    async with running_pod() as pod:
        member, outsider = await join(ws_url(pod, "/news")), await join(ws_url(pod, "/elsewhere"))
        sent = await outsider.publish("news", headline="hi")
        assert await member.next() == {"message": sent}
        await outsider.nothing_before(await outsider.publish("elsewhere", marker=True))  # not a member


async def test_bad_frames_are_ignored_counted_and_the_connection_stays_open() -> None:
    async with running_pod() as pod:
        a = await join(ws_url(pod, "/g"))
        before = {
            k: metric("relay_messages_received_total", outcome=k)
            for k in ("bad_json", "not_object", "unknown_task", "binary")
        }
        for frame in ("not json", "[1]", '"x"', '{"task": "dance"}', b"\x00\x01"):
            await a.ws.send(frame)
        await a.nothing_before(await a.publish("g", still="open"))  # no error frames for a seed client
        assert metric("relay_messages_received_total", outcome="bad_json") == before["bad_json"] + 1
        assert metric("relay_messages_received_total", outcome="not_object") == before["not_object"] + 2
        assert metric("relay_messages_received_total", outcome="unknown_task") == before["unknown_task"] + 1
        assert metric("relay_messages_received_total", outcome="binary") == before["binary"] + 1


async def test_direct_send_reaches_only_its_channel() -> None:
    async with running_pod() as pod:
        sender, target, bystander = [await join(ws_url(pod, "/g")) for _ in range(3)]
        sent = await sender.direct(target.channel_id, note="just you")
        assert await target.next() == {"message": sent}
        await sender.nothing_before(await sender.direct(sender.channel_id, marker=True))
        await bystander.nothing_before(await sender.direct(bystander.channel_id, marker=True))


async def test_direct_send_to_an_unknown_channel_is_counted_and_ignored() -> None:
    async with running_pod(pod_id="solo") as pod:
        a = await join(ws_url(pod, "/g"))
        before = metric("relay_send_queue_dropped_total", reason="unknown_channel")
        await a.direct("solo.doesnotexist", x=1)
        await a.nothing_before(await a.direct(a.channel_id, marker=True))  # and the first one was handled
        assert metric("relay_send_queue_dropped_total", reason="unknown_channel") == before + 1
        sent = await a.publish("g", alive=True)
        assert await a.next() == {"message": sent}


async def test_members_on_two_pods_sharing_a_bus_act_as_one_relay() -> None:
    bus = MemoryBus()
    async with (
        running_pod(MemoryBroker(bus), pod_id="a") as pa,
        running_pod(MemoryBroker(bus), pod_id="b") as pb,
    ):
        x, y = await join(ws_url(pa, "/g")), await join(ws_url(pb, "/g"))
        sent = await x.publish("g", hello="pods")
        assert await x.next() == {"message": sent} and await y.next() == {"message": sent}
        direct = await x.direct(y.channel_id, only="y")
        assert await y.next() == {"message": direct}


@pytest.mark.parametrize("path", ["/", "/a%20b", "/" + "x" * 100, "/caf%C3%A9", "/a*b"])
async def test_invalid_group_paths_close_with_4500_after_the_handshake(path: str) -> None:
    async with running_pod() as pod:
        before = metric("relay_connections_rejected_total", reason="invalid_group")
        ws = await websockets.connect(ws_url(pod, path))  # the handshake succeeds: no bare 403
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4500
        assert metric("relay_connections_rejected_total", reason="invalid_group") == before + 1


async def test_a_frame_over_the_size_limit_closes_with_1009() -> None:
    async with running_pod(max_frame_bytes=1024) as pod:
        a = await join(ws_url(pod, "/g"))
        before = metric("relay_messages_received_total", outcome="too_large")
        await a.ws.send(json.dumps({"task": "send_message_to_group", "group_name": "g", "pad": "x" * 2000}))
        assert await a.close_code() == 1009
        assert metric("relay_messages_received_total", outcome="too_large") == before + 1


async def test_connections_past_the_cap_close_with_1013_and_readiness_turns_false() -> None:
    async with running_pod(max_connections=3, ready_connection_ratio=0.5) as pod:
        ready = f"http://127.0.0.1:{pod.internal_port}/readyz"
        async with httpx.AsyncClient() as http:
            assert (await http.get(ready)).status_code == 200
            clients = [await join(ws_url(pod, "/g")) for _ in range(2)]
            body = (await http.get(ready)).json()
            assert body["ready"] is False and body["checks"]["below_connection_limit"] is False
            await join(ws_url(pod, "/g"))
            extra = await websockets.connect(ws_url(pod, "/g"))
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(extra.recv(), 5)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
            sent = await clients[0].publish("g", still="served")
            assert await clients[1].next() == {"message": sent}


async def test_with_reject_publishing_faster_than_the_rate_limit_closes_with_4029() -> None:
    async with running_pod(publish_rate=1, publish_burst=3, rate_limit_action="reject") as pod:
        a, watcher = await join(ws_url(pod, "/g")), await join(ws_url(pod, "/g"))
        for i in range(5):
            await a.publish("g", i=i)
        assert await a.close_code() == 4029
        received = [(await watcher.next())["message"]["i"] for _ in range(3)]
        assert received == [0, 1, 2]  # the burst went through, the rest did not
        await watcher.nothing_before(await watcher.publish("g", marker=True))


async def test_a_client_that_stops_reading_is_closed_as_slow_and_others_keep_up() -> None:
    async with running_pod(outbox_size=16, close_timeout=1.0, publish_rate=0) as pod:
        slow = await asyncio.to_thread(stalled_client, pod.port, "/g")
        fast = await join(ws_url(pod, "/g"))
        before = metric("relay_slow_consumer_disconnects_total")
        publisher = await join(ws_url(pod, "/pub"))
        seen = []
        for i in range(400):  # in lockstep with the fast reader: only the stalled one falls behind
            await publisher.publish("g", i=i, blob="x" * 30000)
            seen.append((await fast.next(10))["message"]["i"])
        assert seen == list(range(400))
        assert metric("relay_slow_consumer_disconnects_total") == before + 1
        await eventually(lambda: pod.pod.hub.connection_count() == 2)  # the slow socket is released
        slow.close()


async def test_a_closed_connection_leaves_its_group() -> None:
    bus = MemoryBus()
    broker = MemoryBroker(bus)
    async with running_pod(broker) as pod:
        a = await join(ws_url(pod, "/g"))
        assert channels.group("g") in broker.channels
        await a.ws.close()
        await eventually(lambda: pod.pod.hub.group_count() == 0)
        assert channels.group("g") not in broker.channels
        b = await join(ws_url(pod, "/g"))
        sent = await b.publish("g", after="close")
        assert await b.next() == {"message": sent}


async def test_internal_port_serves_health_readiness_and_every_documented_metric() -> None:
    async with (
        running_pod() as pod,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{pod.internal_port}") as http,
    ):
        a = await join(ws_url(pod, "/g"))
        sent = await a.publish("g", m=1)
        assert await a.next() == {"message": sent}
        assert (await http.get("/healthz")).json()["status"] == "ok"
        assert (await http.get("/readyz")).json()["ready"] is True
        text = (await http.get("/metrics")).text
        for name in (
            "relay_connections",
            "relay_connections_opened_total",
            "relay_groups",
            "relay_messages_received_total",
            "relay_messages_sent_total",
            "relay_group_fanout_latency_seconds_bucket",
            "relay_local_fanout_duration_seconds_bucket",
            "relay_fanout_recipients_bucket",
            "relay_build_info",
        ):
            assert f"\n{name}" in text, name
        # The public port serves no metrics.
        assert (await http.get(f"http://127.0.0.1:{pod.port}/metrics")).status_code == 404


async def test_the_tests_run_on_uvloop_like_the_pods_do() -> None:
    assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")


async def test_the_socket_closed_line_says_how_long_the_socket_lived_and_what_it_carried() -> None:
    """One log line per closed socket (README, "Measured"): its duration and its frame counts are
    what an operator reads about a client, so they must be this socket's own."""
    with capture_logs() as logs:
        async with running_pod() as pod:
            opened = time.monotonic()
            a = await join(ws_url(pod, "/g"))  # frame out: the welcome
            for n in range(2):  # frames in: two publishes, each sent back to a as a member
                sent = await a.publish("g", n=n)
                assert await a.next() == {"message": sent}
            await a.ws.close()
            await eventually(lambda: any(e["event"] == "socket.closed" for e in logs))
            lived = time.monotonic() - opened
    [closed] = [e for e in logs if e["event"] == "socket.closed"]
    assert closed["conn_id"] == a.channel_id and closed["by"] == "client"
    assert (closed["frames_in"], closed["frames_out"]) == (2, 3)
    assert 0 <= closed["duration"] <= round(lived, 3) + 0.001

"""Protocol v1 and security over real sockets: acks, errors, join/leave, tokens, origins, limits."""

from __future__ import annotations

import asyncio
import time

import pytest
import websockets

from service.client import RelayClient, RelayError
from tests import tokens
from tests.helpers import Client, join, metric, running_pod, start_pod_process, ws_url

pytestmark = pytest.mark.integration


async def closed_with(url: str, **options: object) -> int | None:
    ws = await websockets.connect(url, **options)  # type: ignore[arg-type]
    try:
        while True:
            await asyncio.wait_for(ws.recv(), 5)
    except websockets.ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd else None


async def join_once_admitted(url: str, refused_with: int, timeout: float = 5.0) -> Client:
    """Join `url` as soon as the pod admits it (it frees a slot a moment after the client has seen
    its close); until then every try must be refused with `refused_with`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await join(url)
        except websockets.ConnectionClosed as exc:
            assert exc.rcvd is not None and exc.rcvd.code == refused_with, exc
            assert time.monotonic() < deadline, f"still refused after {timeout} s"
            await asyncio.sleep(0.01)


async def test_v1_join_publish_leave_with_acks_and_group_in_every_frame() -> None:
    async with running_pod() as pod:
        a = await RelayClient.connect(ws_url(pod, "/"))  # v1 clients may start in no group
        b = await RelayClient.connect(ws_url(pod, "/chat"))
        assert a.ws.subprotocol == "relay.v1"
        await a.join("chat")
        await a.join("news")
        await b.publish("chat", {"text": "hi"})
        for client in (a, b):
            got = await client.receive(5)
            assert got.group == "chat" and got.message["text"] == "hi" and got.message["group_name"] == "chat"
        await a.leave("chat")
        await b.publish("chat", {"text": "after"})
        assert (await b.receive(5)).message["text"] == "after"
        await b.send(a.channel_id, {"text": "direct"})
        direct = await a.receive(5)  # b's frames keep their order: "after" would have come first
        assert direct.group is None and direct.message["text"] == "direct"
        await a.close()
        await b.close()


async def test_v1_clients_get_errors_without_a_ref_and_seed_clients_get_none() -> None:
    async with running_pod() as pod:
        v1 = await websockets.connect(ws_url(pod, "/g"), subprotocols=["relay.v1"])  # type: ignore[list-item]
        await v1.recv()  # welcome
        for frame, code in (("nope", "bad_json"), ("[1]", "not_object"), ('{"task": "x"}', "unknown_task")):
            await v1.send(frame)
            reply = await asyncio.wait_for(v1.recv(), 5)
            assert f'"code":"{code}"' in str(reply)
        seed = await join(ws_url(pod, "/g"))
        for frame in (
            "nope",
            "[1]",
            '{"task": "x"}',
            '{"task": "send_message_to_group", "group_name": "bad name"}',
        ):
            await seed.ws.send(frame)
        # No error frames before it, and exactly the seed form: no group, no ack.
        await seed.nothing_before(await seed.publish("g", plain=True))
        await v1.close()


async def test_a_seed_client_that_sends_a_ref_gets_an_ack_and_errors() -> None:
    async with running_pod() as pod:
        seed = await join(ws_url(pod, "/g"))
        sent = await seed.publish("g", ref="r1")
        replies = [await seed.next(), await seed.next()]
        assert {"ack": "r1"} in replies and {"message": sent} in replies
        await seed.ws.send('{"task": "send_message_to_group", "group_name": "no spaces", "ref": 7}')
        error = await seed.next()
        assert error["error"]["code"] == "invalid_group" and error["error"]["ref"] == 7


async def test_too_many_groups_and_rate_limits_are_errors_for_v1_clients() -> None:
    async with running_pod(max_groups=2, publish_rate=1, publish_burst=4, rate_limit_action="reject") as pod:
        client = await RelayClient.connect(ws_url(pod, "/a"))
        await client.join("b")
        with pytest.raises(RelayError) as too_many:
            await client.join("c")
        assert too_many.value.code == "too_many_groups"
        await client.publish("a", {"n": 1})
        with pytest.raises(RelayError) as limited:
            for n in range(5):
                await client.publish("a", {"n": n})
        assert limited.value.code == "rate_limited"
        assert client.ws.close_code is None  # v1 clients are told, not disconnected
        await client.close()


async def test_authentication_refuses_missing_bad_expired_and_unpermitted_tokens() -> None:
    async with running_pod(jwt_secret=tokens.SECRET) as pod:
        assert await closed_with(ws_url(pod, "/chat")) == 4501
        assert await closed_with(ws_url(pod, "/chat?token=garbage")) == 4501
        assert await closed_with(ws_url(pod, "/chat?token=" + tokens.unsigned())) == 4501
        expired = tokens.hs256(exp=int(time.time()) - 60)
        assert await closed_with(ws_url(pod, "/chat?token=" + expired)) == 4001
        assert await closed_with(ws_url(pod, "/secret?token=" + tokens.hs256())) == 4503
        assert metric("relay_connections_rejected_total", reason="forbidden") >= 1
        # The header works as well as the query parameter.
        other = await join(ws_url(pod, "/chat?token=" + tokens.hs256()))
        ok = await join(
            ws_url(pod, "/team.red"), additional_headers={"Authorization": "Bearer " + tokens.hs256()}
        )
        sent = await ok.publish("chat", x=1)  # allowed by the publish claim
        assert await other.next() == {"message": sent}
        marker = await join(ws_url(pod, "/chat?token=" + tokens.hs256(sub="m", direct=True)))
        await ok.nothing_before(await marker.direct(ok.channel_id, marker=True))  # no ack, not in chat


async def test_publish_and_direct_permissions_come_from_the_token() -> None:
    async with running_pod(jwt_secret=tokens.SECRET) as pod:
        client = await RelayClient.connect(ws_url(pod, "/chat"), token=tokens.hs256())
        with pytest.raises(RelayError) as forbidden:
            await client.publish("team.red", {"x": 1})
        assert forbidden.value.code == "forbidden"
        with pytest.raises(RelayError) as no_direct:
            await client.send(client.channel_id, {"x": 1})
        assert no_direct.value.code == "forbidden"
        with pytest.raises(RelayError):
            await client.join("elsewhere")
        direct = await RelayClient.connect(ws_url(pod, "/chat"), token=tokens.hs256(direct=True))
        await direct.send(client.channel_id, {"x": 2})
        assert (await client.receive(5)).message["x"] == 2
        await client.close()
        await direct.close()


async def test_a_token_expiring_while_connected_closes_with_4001() -> None:
    async with running_pod(jwt_secret=tokens.SECRET, jwt_leeway=0) as pod:
        soon = tokens.hs256(exp=int(time.time()) + 2)
        client = await join(ws_url(pod, "/chat?token=" + soon))
        assert await client.close_code(10) == 4001


async def test_origins_outside_the_allow_list_are_refused_with_1008() -> None:
    async with running_pod(allowed_origins="https://app.example,https://*.app.example") as pod:
        assert await closed_with(ws_url(pod, "/g"), origin="https://evil.example") == 1008
        ok = await join(ws_url(pod, "/g"), origin="https://x.app.example")
        sent = await ok.publish("g", fine=True)
        assert await ok.next() == {"message": sent}


async def test_per_user_connection_cap_and_connect_rate() -> None:
    async with running_pod(jwt_secret=tokens.SECRET, user_max_connections=2, user_connect_rate=100) as pod:
        url = ws_url(pod, "/chat?token=" + tokens.hs256())
        first, _second = await join(url), await join(url)
        assert await closed_with(url) == 4030
        bob = ws_url(pod, "/chat?token=" + tokens.hs256(sub="bob"))
        await join(bob)  # another user is not affected
        await first.ws.close()
        await join_once_admitted(url, refused_with=4030)  # a slot is free again
    async with running_pod(connect_rate=1) as pod:  # bursts of 2 per pod
        await join(ws_url(pod, "/g"))
        await join(ws_url(pod, "/g"))
        assert await closed_with(ws_url(pod, "/g")) == 1013


def test_tokens_never_reach_the_logs() -> None:
    token = tokens.hs256()
    pod = start_pod_process({"RELAY_JWT_SECRET": tokens.SECRET, "RELAY_LOG_LEVEL": "DEBUG"})

    async def scenario() -> None:
        client = await join(ws_url(pod.port, "/chat?token=" + token))
        await client.publish("chat", x=1)
        await client.next()
        await closed_with(ws_url(pod.port, "/chat?token=" + token[:-4] + "AAAA"))
        by_header = await join(
            ws_url(pod.port, "/chat"), additional_headers={"Authorization": f"Bearer {token}"}
        )
        await by_header.ws.close()
        await client.ws.close()

    asyncio.run(scenario())
    pod.terminate()
    assert pod.wait() == 0
    text = "\n".join(pod.output)
    assert "socket.closed" in text and "token=[redacted]" in text
    assert token not in text and token[:-4] not in text and tokens.SECRET not in text

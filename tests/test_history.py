"""History, recovery and gap fill through real pods (in the test's loop, on the memory bus; the same
paths on Redis are in tests/test_history_redis.py and the broker contract)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.broker.memory import MemoryBus
from service.client import MessagesMissed, RelayClient
from service.protocol import SUBPROTOCOL, CloseCode
from tests.fakes import GatedBroker, LossyBroker
from tests.helpers import Client, join, metric, running_pod, ws_url

pytestmark = pytest.mark.integration

RULES = """
[[group]]
match = "chat*"
history = 100
ttl = 60

[[group]]
match = "tiny"
history = 3

[[group]]
match = "dash.*"
latest = true
"""


@pytest.fixture
def rules(tmp_path: Path) -> str:
    path = tmp_path / "groups.toml"
    path.write_text(RULES)
    return str(path)


async def v1(url: str) -> Client:
    return await join(url, subprotocols=[SUBPROTOCOL])


async def request(client: Client, **frame: Any) -> dict[str, Any]:
    """Send a v1 request with a ref and return its ack (frames before it are not expected)."""
    await client.ws.send(json.dumps({"ref": 1, **frame}))
    answer: dict[str, Any] = await client.next()
    assert answer.get("ack") == 1, answer
    return answer


async def publish(pod_port: int, group: str, count: int, start: int = 1) -> None:
    publisher = await join(f"ws://127.0.0.1:{pod_port}/publisher")
    for n in range(start, start + count):
        await request(publisher, task="send_message_to_group", group_name=group, n=n)
    await publisher.ws.close()


def numbers(frames: list[dict[str, Any]]) -> list[int]:
    return [f["message"]["n"] for f in frames]


async def test_messages_of_a_history_group_carry_positions_for_v1_and_nothing_new_for_seed(
    rules: str,
) -> None:
    async with running_pod(group_rules_file=rules) as pod:
        member = await v1(ws_url(pod, "/"))
        seed = await join(ws_url(pod, "/chat"))
        joined = await request(member, task="join", group_name="chat")  # an empty group: its epoch begins
        epoch = joined["epoch"]
        assert joined == {"ack": 1, "epoch": epoch, "offset": 0} and epoch
        publisher = await v1(ws_url(pod, "/"))
        ack = await request(publisher, task="send_message_to_group", group_name="chat", n=1)
        assert (ack["epoch"], ack["offset"]) == (epoch, 1)
        delivery = await member.next()
        assert delivery == {"group": "chat", "epoch": epoch, "offset": 1, "message": delivery["message"]}
        assert await seed.next() == {"message": delivery["message"]}  # the seed protocol, unchanged
        ack = await request(publisher, task="send_message_to_group", group_name="chat", n=2)
        assert (ack["epoch"], ack["offset"]) == (epoch, 2)
        late = await v1(ws_url(pod, "/"))
        assert await request(late, task="join", group_name="chat") == {"ack": 1, "epoch": epoch, "offset": 2}


async def test_a_client_that_rejoins_from_its_last_position_gets_what_it_missed_then_live(
    rules: str,
) -> None:
    async with running_pod(group_rules_file=rules) as pod:
        first = await v1(ws_url(pod, "/"))
        await request(first, task="join", group_name="chat")
        await publish(pod.port, "chat", 2)
        seen = [await first.next(), await first.next()]
        epoch, offset = seen[-1]["epoch"], seen[-1]["offset"]
        await first.ws.close()
        await publish(pod.port, "chat", 4, start=3)  # missed while away
        back = await v1(ws_url(pod, "/"))
        ack = await request(back, task="join", group_name="chat", since={"epoch": epoch, "offset": offset})
        assert ack == {"ack": 1, "epoch": epoch, "offset": 6, "recovered": True}
        recovered = [await back.next() for _ in range(4)]
        assert numbers(recovered) == [3, 4, 5, 6] and [f["offset"] for f in recovered] == [3, 4, 5, 6]
        await publish(pod.port, "chat", 1, start=7)
        assert numbers([await back.next()]) == [7]
        assert metric("relay_recoveries_total", result="recovered") >= 1


async def test_nothing_partial_is_sent_when_history_no_longer_holds_everything(rules: str) -> None:
    """`tiny` keeps 3 messages: a client at offset 1 after 6 were published cannot be given 2."""
    async with running_pod(group_rules_file=rules) as pod:
        await publish(pod.port, "tiny", 6)
        member = await v1(ws_url(pod, "/"))
        since = {"epoch": (await request(member, task="join", group_name="tiny"))["epoch"], "offset": 1}
        again = await v1(ws_url(pod, "/"))
        trimmed = metric("relay_recoveries_total", result="trimmed")
        ack = await request(again, task="join", group_name="tiny", since=since)
        assert (ack["recovered"], ack["reason"], ack["offset"]) == (False, "trimmed", 6)
        assert metric("relay_recoveries_total", result="trimmed") == trimmed + 1
        other = await v1(ws_url(pod, "/"))
        ack = await request(other, task="join", group_name="tiny", since={"epoch": "another1", "offset": 3})
        assert (ack["recovered"], ack["reason"]) == (False, "epoch_changed")
        await publish(pod.port, "tiny", 1, start=7)
        assert numbers([await again.next()]) == [7]  # live goes on; nothing of history came first
        assert numbers([await other.next()]) == [7]


async def test_a_bad_since_is_answered_with_an_error(rules: str) -> None:
    async with running_pod(group_rules_file=rules) as pod:
        member = await v1(ws_url(pod, "/"))
        for since in ({"epoch": "e"}, {"epoch": "not ok!", "offset": 1}, {"epoch": "e", "offset": -1}, "x"):
            await member.ws.send(json.dumps({"task": "join", "group_name": "chat", "since": since, "ref": 2}))
            assert (await member.next())["error"]["code"] == "bad_since"


async def test_the_seam_between_history_and_live_has_no_gap_and_no_duplicate(rules: str) -> None:
    """Messages published while the member's history is being read are held and merged by offset."""
    broker = GatedBroker(MemoryBus())
    async with running_pod(broker, group_rules_file=rules) as pod:
        await publish(pod.port, "chat", 3)
        member = await v1(ws_url(pod, "/"))
        epoch = (await request(member, task="join", group_name="chat"))["epoch"]
        await request(member, task="leave", group_name="chat")
        broker.hold("history")
        await member.ws.send(
            json.dumps(
                {"task": "join", "group_name": "chat", "ref": 5, "since": {"epoch": epoch, "offset": 1}}
            )
        )
        await broker.arrived("history")
        await publish(pod.port, "chat", 3, start=4)  # live, while the history read is held
        broker.release("history")
        ack = await member.next()
        assert ack["ack"] == 5 and ack["recovered"] is True
        frames = [await member.next() for _ in range(5)]
        assert [f["offset"] for f in frames] == [2, 3, 4, 5, 6]
        await publish(pod.port, "chat", 1, start=7)
        assert numbers([await member.next()]) == [7]  # and nothing twice before it


async def test_a_member_joining_a_latest_group_first_gets_its_latest_message(rules: str) -> None:
    async with running_pod(group_rules_file=rules) as pod:
        await publish(pod.port, "dash.cpu", 3)
        seed = await join(ws_url(pod, "/dash.cpu"))  # the welcome, then the latest value
        assert numbers([await seed.next()]) == [3]
        member = await v1(ws_url(pod, "/"))
        ack = await request(member, task="join", group_name="dash.cpu")
        assert ack["offset"] == 3
        latest = await member.next()
        assert latest["offset"] == 3 and numbers([latest]) == [3]
        await publish(pod.port, "dash.cpu", 1, start=4)
        assert numbers([await seed.next()]) == [4] and numbers([await member.next()]) == [4]


async def test_a_pod_that_missed_messages_fills_the_gap_from_history(rules: str) -> None:
    bus = MemoryBus()
    lossy = LossyBroker(bus)
    lossy.dropping = lambda envelope: 2 <= envelope.offset <= 4
    async with (
        running_pod(GatedBroker(bus), group_rules_file=rules) as a,
        running_pod(lossy, group_rules_file=rules) as b,
    ):
        member = await join(ws_url(b, "/chat"))
        filled = metric("relay_gap_messages_total", outcome="filled")
        await publish(a.port, "chat", 6)
        assert numbers([await member.next() for _ in range(6)]) == [1, 2, 3, 4, 5, 6]
        assert metric("relay_gap_messages_total", outcome="filled") == filled + 3
        await publish(a.port, "chat", 1, start=7)
        assert numbers([await member.next()]) == [7]


async def test_after_a_resync_a_quiet_group_is_filled(rules: str) -> None:
    """No later message shows the gap: the RESYNC a reconnect brings makes the pod read history."""
    bus = MemoryBus()
    lossy = LossyBroker(bus)
    async with (
        running_pod(GatedBroker(bus), group_rules_file=rules) as a,
        running_pod(lossy, group_rules_file=rules) as b,
    ):
        member = await join(ws_url(b, "/chat"))
        await publish(a.port, "chat", 2)
        assert numbers([await member.next() for _ in range(2)]) == [1, 2]
        lossy.dropping = lambda envelope: envelope.offset >= 3
        await publish(a.port, "chat", 3, start=3)  # all lost on the way to b
        lossy.dropping = lambda envelope: False
        lossy.resync()
        assert numbers([await member.next() for _ in range(3)]) == [3, 4, 5]


async def test_only_what_history_no_longer_holds_is_counted_lost(rules: str) -> None:
    bus = MemoryBus()
    lossy = LossyBroker(bus)
    lossy.dropping = lambda envelope: 2 <= envelope.offset <= 7
    async with (
        running_pod(GatedBroker(bus), group_rules_file=rules) as a,
        running_pod(lossy, group_rules_file=rules) as b,
    ):
        member = await join(ws_url(b, "/tiny"))
        lost = metric("relay_gap_messages_total", outcome="lost")
        await publish(a.port, "tiny", 8)
        # 1 live; 2-5 gone from history (it keeps 3); 6 and 7 filled; 8 live.
        assert numbers([await member.next() for _ in range(4)]) == [1, 6, 7, 8]
        assert metric("relay_gap_messages_total", outcome="lost") == lost + 4


async def test_the_publish_api_returns_the_position_and_stores_a_retry_once(rules: str) -> None:
    async with running_pod(group_rules_file=rules, api_keys="k") as pod:
        member = await join(ws_url(pod, "/chat"))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{pod.internal_port}") as http:
            headers = {"Authorization": "Bearer k"}
            body = {"group": "chat", "message": {"n": 1}, "idempotency_key": "order-17"}
            first = (await http.post("/api/publish", json=body, headers=headers)).json()
            again = (await http.post("/api/publish", json=body, headers=headers)).json()
            by_header = await http.post(
                "/api/publish",
                json={"group": "chat", "message": {"n": 2}},
                headers={**headers, "Idempotency-Key": "order-18"},
            )
        assert first["offset"] == 1 and first["pods"] == 1 and "duplicate" not in first
        assert again == {"pods": 0, "epoch": first["epoch"], "offset": 1, "duplicate": True}
        assert by_header.json()["offset"] == 2
        assert numbers([await member.next(), await member.next()]) == [1, 2]  # 1 once, then 2


async def test_the_python_client_recovers_by_itself_and_says_when_it_cannot(rules: str) -> None:
    """RelayClient(reconnect=True): a lost pod is followed by a rejoin from the last position; what
    history still holds arrives in order, and where it no longer does, receive() says so once."""
    bus = MemoryBus()
    async with (
        running_pod(GatedBroker(bus), group_rules_file=rules) as a,
        running_pod(GatedBroker(bus), group_rules_file=rules) as b,
    ):
        urls = [ws_url(a, "/"), ws_url(b, "/")]
        client = await RelayClient.connect(urls, reconnect=True, backoff=(1.0, 2.0))  # away 0.5-1 s
        await client.join("chat")
        await client.join("tiny")
        await publish(b.port, "chat", 1)
        assert (await client.receive(5)).message["n"] == 1
        await a.pod.close_all(CloseCode.SERVICE_RESTART, 0.0)  # its pod drains
        await publish(b.port, "chat", 3, start=2)  # published while it is away
        await publish(b.port, "tiny", 5)  # more than `tiny` keeps
        got = [(await client.receive(5)).message["n"] for _ in range(3)]  # chat is rejoined first
        assert got == [2, 3, 4] and client.reconnects == 1
        with pytest.raises(MessagesMissed) as missed:
            await client.receive(5)
        assert (missed.value.group, missed.value.reason) == ("tiny", "trimmed")
        await publish(b.port, "tiny", 1, start=6)
        assert (await client.receive(5)).message["n"] == 6  # and it goes on
        await client.close()


async def test_the_python_client_gets_a_latest_groups_message_on_join(rules: str) -> None:
    """The join's ack names the latest message's position, and that message follows it: the client
    must not take it for one it already had."""
    async with running_pod(group_rules_file=rules) as pod:
        await publish(pod.port, "dash.temp", 2)
        client = await RelayClient.connect(ws_url(pod, "/"))
        await client.join("dash.temp")
        latest = await client.receive(5)
        assert (latest.group, latest.offset, latest.message["n"]) == ("dash.temp", 2, 2)
        await publish(pod.port, "dash.temp", 1, start=3)
        assert (await client.receive(5)).message["n"] == 3
        await client.close()


async def test_a_pod_that_misses_a_groups_first_messages_still_fills_them(rules: str) -> None:
    """The pod subscribed and has seen no message of the group yet when its link drops: where it
    stood comes from the join's read of history, so the resync reads what it missed."""
    bus = MemoryBus()
    lossy = LossyBroker(bus)
    async with (
        running_pod(GatedBroker(bus), group_rules_file=rules) as a,
        running_pod(lossy, group_rules_file=rules) as b,
    ):
        member = await join(ws_url(b, "/chat.first"))
        lossy.dropping = lambda envelope: True  # b's link is down from the first message on
        await publish(a.port, "chat.first", 3)
        lossy.dropping = lambda envelope: False
        lossy.resync()
        assert numbers([await member.next() for _ in range(3)]) == [1, 2, 3]

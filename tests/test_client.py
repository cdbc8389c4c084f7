"""service.client.RelayClient's bookkeeping of positions: pure logic, no socket."""

from __future__ import annotations

from service.client import RelayClient


def client() -> RelayClient:
    return RelayClient(["ws://relay/"], {"origin": None, "timeout": 1.0}, reconnect=True, backoff=(0.1, 1.0))


async def test_a_latest_groups_message_is_delivered_though_the_join_ack_named_its_position() -> None:
    relay = client()
    relay._groups["dash"] = ("e1", 2)  # what join() records from {"ack": .., "epoch": "e1", "offset": 2}
    relay._deliver({"group": "dash", "epoch": "e1", "offset": 2, "message": "latest"})
    assert (await relay.receive(0.1)).message == "latest"
    assert relay._groups["dash"] == ("e1", 2)


async def test_repeats_are_dropped_and_a_new_epoch_starts_afresh() -> None:
    relay = client()
    relay._groups["g"] = None
    for offset, epoch in ((1, "e1"), (2, "e1"), (2, "e1"), (1, "e1"), (1, "e2"), (2, "e2")):
        relay._deliver({"group": "g", "epoch": epoch, "offset": offset, "message": f"{epoch}/{offset}"})
    got = [(await relay.receive(0.1)).message for _ in range(4)]
    assert got == ["e1/1", "e1/2", "e2/1", "e2/2"]
    assert relay._groups["g"] == ("e2", 2)  # where a rejoin starts from

"""docs/schema: every frame relay really sends, and every client frame it accepts, fits the schemas."""

from __future__ import annotations

import asyncio
import json
import typing
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import websockets

from service import protocol
from tests.helpers import ROOT, join, running_pod, ws_url

SCHEMAS = Path(ROOT, "docs", "schema")


def schema(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((SCHEMAS / name).read_text())
    jsonschema.Draft202012Validator.check_schema(loaded)
    return loaded


def test_the_error_codes_in_the_schema_are_the_relays() -> None:
    enum = schema("server-frame.schema.json")["oneOf"][4]["properties"]["error"]["properties"]["code"]["enum"]
    assert set(enum) == set(typing.get_args(protocol.ErrorCode))


@pytest.mark.parametrize(
    "frame",
    [
        {"task": "send_message_to_group", "group_name": "a.b-c_d", "x": {"y": 1}},
        {"task": "send_message_to_channel", "channel_id": "pod-1.Ab_9", "ref": 3},
        {"task": "join", "group_name": "g", "ref": "r"},
        {"task": "leave", "group_name": "g"},
        {"task": "presence", "group_name": "g", "ref": 1},
    ],
)
def test_client_frames_the_relay_accepts_fit_the_schema(frame: dict[str, Any]) -> None:
    jsonschema.validate(frame, schema("client-frame.schema.json"))
    assert not isinstance(protocol.decode(json.dumps(frame)), protocol.Rejected)


@pytest.mark.parametrize(
    "frame",
    [
        {"task": "send_message_to_group", "group_name": "bad name"},
        {"task": "join"},
        {"task": "dance"},
        {"task": "send_message_to_group", "group_name": "g", "ref": True},
    ],
)
def test_client_frames_the_relay_rejects_do_not_fit_the_schema(frame: dict[str, Any]) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(frame, schema("client-frame.schema.json"))
    assert isinstance(protocol.decode(json.dumps(frame)), protocol.Rejected)


@pytest.mark.integration
async def test_every_frame_a_pod_sends_fits_the_server_schema() -> None:
    server_schema = schema("server-frame.schema.json")
    received: list[Any] = []
    async with running_pod() as pod:
        seed = await join(ws_url(pod, "/g"))
        v1 = await websockets.connect(ws_url(pod, "/g"), subprotocols=["relay.v1"])  # type: ignore[list-item]
        received.append(json.loads(await v1.recv()))
        await seed.publish("g", ref=1, n=1)
        await seed.direct(seed.channel_id, n=2)
        for bad in ("nope", '{"task": "x", "ref": "r"}'):
            await v1.send(bad)
        await v1.send('{"task": "join", "group_name": "h", "ref": 5}')
        received.extend([await seed.next() for _ in range(3)])
        received.extend([json.loads(await asyncio.wait_for(v1.recv(), 5)) for _ in range(4)])
        await v1.close()
    kinds = set()
    for frame in received:
        jsonschema.validate(frame, server_schema)
        kinds.add(next(iter(sorted(frame))))
    assert kinds == {"ack", "error", "group", "message"}

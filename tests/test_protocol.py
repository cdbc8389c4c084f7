"""The wire format: pure functions, table-driven."""

from __future__ import annotations

import json

import pytest

from service import protocol
from service.protocol import Rejected, SendToChannel, SendToGroup

SEND = '{"task": "send_message_to_group", "group_name": "chat", "x": 1.50, "y": "\\u00e9"}'
DIRECT = '{"task":"send_message_to_channel","channel_id":"pod-1.AbC_d-9","hi":true}'


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (SEND, SendToGroup("chat", '{"message":' + SEND + "}")),
        (DIRECT, SendToChannel("pod-1.AbC_d-9", '{"message":' + DIRECT + "}")),
        ("not json", Rejected("bad_json")),
        ("", Rejected("bad_json")),
        ('{"task": "send_message_to_group", "group_name": "a"', Rejected("bad_json")),
        ("[1, 2]", Rejected("not_object")),
        ('"send_message_to_group"', Rejected("not_object")),
        ("null", Rejected("not_object")),
        ('{"task": "something_else"}', Rejected("unknown_task")),
        ("{}", Rejected("unknown_task")),
        ('{"task": "send_message_to_group"}', Rejected("invalid_group")),
        ('{"task": "send_message_to_group", "group_name": 5}', Rejected("invalid_group")),
        ('{"task": "send_message_to_group", "group_name": "a b"}', Rejected("invalid_group")),
        ('{"task": "send_message_to_group", "group_name": "a\\n"}', Rejected("invalid_group")),
        ('{"task": "send_message_to_group", "group_name": ""}', Rejected("invalid_group")),
        ('{"task": "send_message_to_channel", "channel_id": "nodot"}', Rejected("invalid_channel")),
        ('{"task": "send_message_to_channel", "channel_id": null}', Rejected("invalid_channel")),
    ],
)
def test_decode(text: str, expected: object) -> None:
    assert protocol.decode(text) == expected


def test_forwarded_frame_carries_the_object_exactly_as_sent() -> None:
    command = protocol.decode(SEND)
    assert isinstance(command, SendToGroup)
    assert json.loads(command.frame) == {"message": json.loads(SEND)}
    assert command.frame.endswith(SEND + "}")  # 1.50 stays 1.50, the escape stays an escape


@pytest.mark.parametrize(
    ("path", "group"),
    [
        ("/chat", "chat"),
        ("/a/b", "a_b"),
        ("/a/b/", "a_b_"),
        ("/A-z_0.9", "A-z_0.9"),
        ("/" + "x" * 99, "x" * 99),
        ("/" + "x" * 100, None),
        ("/", None),
        ("", None),
        ("/a b", None),
        ("/caf\u00e9", None),
        ("/a\n", None),
        ("/a?b", None),
        ("/a%2Fb", None),
    ],
)
def test_group_from_path(path: str, group: str | None) -> None:
    assert protocol.group_from_path(path) == group


def test_welcome_frame_is_the_seed_protocol_announcement() -> None:
    assert json.loads(protocol.welcome("p.x")) == {"message": {"channel_id": "p.x"}}


def test_pod_of_channel_id() -> None:
    assert protocol.pod_of("relay-7d9f-abc.Zx_9") == "relay-7d9f-abc"


def test_close_codes_follow_the_reconnect_ranges() -> None:
    codes = protocol.CloseCode
    assert 4000 <= codes.SLOW_CONSUMER < 4500 and 4000 <= codes.RATE_LIMITED < 4500
    assert 4500 <= codes.BAD_GROUP_NAME < 5000
    assert (int(codes.SERVICE_RESTART), int(codes.TRY_AGAIN_LATER), int(codes.MESSAGE_TOO_BIG)) == (
        1012,
        1013,
        1009,
    )

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


def send(**fields: object) -> str:
    return json.dumps({"task": "send_message_to_group", "group_name": "chat", **fields})


@pytest.mark.parametrize(
    ("ref", "valid"),
    [
        (0, True),
        (2**53 - 1, True),  # the largest integer every JSON client holds exactly
        (-(2**53) + 1, True),
        (2**53, False),
        (-(2**53), False),
        ("", True),
        ("r" * 64, True),
        ("r" * 65, False),
        (True, False),  # a bool is not a request id, although Python calls it an int
        (False, False),
        (1.5, False),
        ([1], False),
        ({"id": 1}, False),
    ],
)
def test_refs_are_short_strings_or_exact_integers(ref: object, valid: bool) -> None:
    command = protocol.decode(send(ref=ref))
    if valid:
        assert isinstance(command, SendToGroup) and command.ref == ref and type(command.ref) is type(ref)
    else:
        assert command == Rejected("bad_ref")  # no ref echoed: it is the thing that is wrong


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"task":"nope","ref":7}', Rejected("unknown_task", 7)),
        ('{"task":"send_message_to_group","group_name":"a b","ref":"r"}', Rejected("invalid_group", "r")),
        ('{"task":"send_message_to_channel","channel_id":"x","ref":"r"}', Rejected("invalid_channel", "r")),
        ('{"task":"join","group_name":"a","since":{"epoch":"e"},"ref":3}', Rejected("bad_since", 3)),
        ('{"task":"join","group_name":"a","ref":3}', protocol.Join("a", 3)),
        ('{"task":"leave","group_name":"a","ref":3}', protocol.Leave("a", 3)),
        ('{"task":"leave","group_name":"*"}', Rejected("invalid_group")),
    ],
)
def test_rejections_and_v1_commands_carry_the_ref_they_answer(text: str, expected: object) -> None:
    assert protocol.decode(text) == expected


@pytest.mark.parametrize(
    ("since", "expected"),
    [
        ({"epoch": "E1", "offset": 0}, protocol.Since("E1", 0)),
        ({"epoch": "E1", "offset": 2**53 - 1}, protocol.Since("E1", 2**53 - 1)),
        ({"epoch": "e" * 64, "offset": 5}, protocol.Since("e" * 64, 5)),
        ({"epoch": "E1", "offset": 2**53}, None),
        ({"epoch": "E1", "offset": -1}, None),
        ({"epoch": "E1", "offset": True}, None),
        ({"epoch": "E1", "offset": 1.0}, None),
        ({"epoch": "E1", "offset": "1"}, None),
        ({"epoch": "E1"}, None),
        ({"epoch": "", "offset": 1}, None),
        ({"epoch": "e" * 65, "offset": 1}, None),
        ({"epoch": "E-1", "offset": 1}, None),
        ({"epoch": 1, "offset": 1}, None),
        ({"offset": 1}, None),
        ([1, 2], None),
        ("E1:2", None),
    ],
)
def test_join_since_needs_an_epoch_and_an_exact_offset(
    since: object, expected: protocol.Since | None
) -> None:
    text = json.dumps({"task": "join", "group_name": "g", "since": since})
    want = protocol.Join("g", None, expected) if expected is not None else Rejected("bad_since")
    assert protocol.decode(text) == want


@pytest.mark.parametrize(
    ("key", "kept"),
    [("k", True), ("k" * 64, True), ("k" * 65, False), ("", False), (5, False), (None, False)],
)
def test_idempotency_keys_are_non_empty_strings_of_at_most_64(key: object, kept: bool) -> None:
    command = protocol.decode(send(idempotency_key=key))
    assert isinstance(command, SendToGroup)
    assert command.key == (key if kept else None)


def test_error_frames_carry_code_detail_and_the_ref_only_when_there_is_one() -> None:
    assert json.loads(protocol.error("forbidden", "no", "r1")) == {
        "error": {"code": "forbidden", "detail": "no", "ref": "r1"}
    }
    assert json.loads(protocol.error("bad_json", "oops")) == {"error": {"code": "bad_json", "detail": "oops"}}
    assert json.loads(protocol.error("bad_ref", "x", 0)) == {
        "error": {"code": "bad_ref", "detail": "x", "ref": 0}
    }


def test_ack_frames_carry_the_ref_and_the_details() -> None:
    assert json.loads(protocol.ack(4)) == {"ack": 4}
    assert json.loads(protocol.ack(None)) == {"ack": None}
    assert json.loads(protocol.ack("r", epoch="E", offset=3)) == {"ack": "r", "epoch": "E", "offset": 3}


def test_group_frames_say_the_group_and_with_history_the_position() -> None:
    seed = '{"message":{"text":"hi","n":1.50}}'
    assert protocol.group_frame("chat", seed) == '{"group":"chat","message":{"text":"hi","n":1.50}}'
    positioned = protocol.group_frame("chat", seed, "E7", 12)
    assert positioned == '{"group":"chat","epoch":"E7","offset":12,"message":{"text":"hi","n":1.50}}'
    assert json.loads(positioned) == {
        "group": "chat",
        "epoch": "E7",
        "offset": 12,
        "message": {"text": "hi", "n": 1.5},
    }

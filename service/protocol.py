"""The wire format, and nothing else: client text in, commands out; frames and close codes out.

Pure functions. `decode` never raises on client input: it returns a command or a `Rejected` whose
reason is one of a small fixed set (it doubles as a metric label and, later, an error code).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import IntEnum
from typing import Literal

import orjson

GROUP_NAME = re.compile(r"[A-Za-z0-9._-]{1,99}")  # always fullmatch: "$" would let a trailing newline in
CHANNEL_ID = re.compile(r"[A-Za-z0-9_-]{1,63}\.[A-Za-z0-9_-]{1,64}")

RejectReason = Literal["bad_json", "not_object", "unknown_task", "invalid_group", "invalid_channel"]


class CloseCode(IntEnum):
    """Why the server closed a socket, and whether the client should reconnect.

    1000-1015 are the standard codes. 4000-4499: the application closed the socket, reconnecting
    (with backoff) is fine. 4500-4999: the application closed it and reconnecting as-is will fail
    the same way. A close always follows the handshake's accept, so browsers see the code.
    """

    NORMAL = 1000
    GOING_AWAY = 1001
    POLICY_VIOLATION = 1008  # origin, authentication or permission refused
    MESSAGE_TOO_BIG = 1009  # a client frame exceeded RELAY_MAX_FRAME_BYTES
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012  # the pod is draining: reconnect, the Service routes you elsewhere
    TRY_AGAIN_LATER = 1013  # the pod is full (RELAY_MAX_CONNECTIONS): reconnect with backoff
    SLOW_CONSUMER = 4008  # fell more than RELAY_OUTBOX_SIZE frames behind
    RATE_LIMITED = 4029  # published faster than RELAY_PUBLISH_RATE / RELAY_PUBLISH_BURST allow
    BAD_GROUP_NAME = 4500  # the path does not name a valid group: fix the URL


@dataclass(frozen=True, slots=True)
class SendToGroup:
    """`send_message_to_group`: `frame` is what every member receives, encoded once."""

    group: str
    frame: str


@dataclass(frozen=True, slots=True)
class SendToChannel:
    """`send_message_to_channel`: a direct send to one connection, on whichever pod holds it."""

    channel_id: str
    frame: str


@dataclass(frozen=True, slots=True)
class Rejected:
    """A frame the relay does not act on; seed clients never hear about it."""

    reason: RejectReason


Command = SendToGroup | SendToChannel


def decode(text: str) -> Command | Rejected:
    """Parse one client text frame. The forwarded object is the client's own text, byte for byte."""
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError:
        return Rejected("bad_json")
    if not isinstance(obj, dict):
        return Rejected("not_object")
    task = obj.get("task")
    if task == "send_message_to_group":
        group = obj.get("group_name")
        if not isinstance(group, str) or GROUP_NAME.fullmatch(group) is None:
            return Rejected("invalid_group")
        return SendToGroup(group, message_frame(text))
    if task == "send_message_to_channel":
        channel_id = obj.get("channel_id")
        if not isinstance(channel_id, str) or CHANNEL_ID.fullmatch(channel_id) is None:
            return Rejected("invalid_channel")
        return SendToChannel(channel_id, message_frame(text))
    return Rejected("unknown_task")


def message_frame(object_text: str) -> str:
    """`{"message": <object>}` around JSON text that is already known to be an object.

    Splicing the client's text in, rather than re-encoding the parsed object, keeps it exactly as
    sent (number formats, key order, escapes) and costs one string join.
    """
    return '{"message":' + object_text + "}"


def welcome(channel_id: str) -> str:
    """The first frame on every connection: the seed protocol's channel id announcement."""
    return orjson.dumps({"message": {"channel_id": channel_id}}).decode()


def group_from_path(path: str) -> str | None:
    """The group a path names (`/a/b` -> `a_b`), or None when the name would be invalid."""
    name = path.removeprefix("/").replace("/", "_")
    return name if GROUP_NAME.fullmatch(name) else None


def pod_of(channel_id: str) -> str:
    """The pod id a channel id starts with (ids are `<pod_id>.<random>`)."""
    return channel_id.partition(".")[0]

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

RejectReason = Literal[
    "bad_json", "not_object", "unknown_task", "invalid_group", "invalid_channel", "bad_ref", "bad_since"
]
Ref = str | int | None  # a client's request id, echoed in the ack or error that answers it
SUBPROTOCOL = "relay.v1"
MAX_REF_LENGTH = 64
MAX_KEY_LENGTH = 64  # idempotency keys
EPOCH = re.compile(r"[A-Za-z0-9]{1,64}")


class CloseCode(IntEnum):
    """Why the server closed a socket, and whether the client should reconnect.

    1000-1015 are the standard codes. 4000-4499: the application closed the socket, reconnecting
    (with backoff) is fine. 4500-4999: the application closed it and reconnecting as-is will fail
    the same way. A close always follows the handshake's accept, so browsers see the code.
    """

    NORMAL = 1000
    GOING_AWAY = 1001
    POLICY_VIOLATION = 1008  # the Origin is not in RELAY_ALLOWED_ORIGINS
    MESSAGE_TOO_BIG = 1009  # a client frame exceeded RELAY_MAX_FRAME_BYTES
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012  # the pod is draining: reconnect, the Service routes you elsewhere
    TRY_AGAIN_LATER = 1013  # the pod is full or opening sockets too fast: reconnect with backoff
    TOKEN_EXPIRED = 4001  # the token reached its exp: reconnect with a fresh token
    DISCONNECTED = 4010  # a backend disconnected this user or socket (server API): reconnect is fine
    SLOW_CONSUMER = 4008  # fell more than RELAY_OUTBOX_SIZE frames behind
    RATE_LIMITED = 4029  # published faster than the publish limits allow (seed clients)
    TOO_MANY_CONNECTIONS = 4030  # this user already holds RELAY_USER_MAX_CONNECTIONS sockets
    BAD_GROUP_NAME = 4500  # the path does not name a valid group: fix the URL
    UNAUTHORIZED = 4501  # no token, or a token that fails verification
    FORBIDDEN = 4503  # the token does not allow the path's group
    REVOKED = 4510  # a backend cut this user off (server API): do not reconnect with the same token


@dataclass(frozen=True, slots=True)
class Since:
    """A v1 join's `since`: the last position the client saw of the group."""

    epoch: str
    offset: int


@dataclass(frozen=True, slots=True)
class SendToGroup:
    """`send_message_to_group`: `frame` is what every member receives, encoded once. A string
    `idempotency_key` (groups with history) makes a retried publish stored once."""

    group: str
    frame: str
    ref: Ref = None
    key: str | None = None


@dataclass(frozen=True, slots=True)
class SendToChannel:
    """`send_message_to_channel`: a direct send to one connection, on whichever pod holds it."""

    channel_id: str
    frame: str
    ref: Ref = None


@dataclass(frozen=True, slots=True)
class Join:
    """v1 `join`: become a member of another group; with `since`, recover what was missed."""

    group: str
    ref: Ref = None
    since: Since | None = None


@dataclass(frozen=True, slots=True)
class Leave:
    """v1 `leave`: stop being a member of a group."""

    group: str
    ref: Ref = None


@dataclass(frozen=True, slots=True)
class Rejected:
    """A frame the relay does not act on; seed clients never hear about it, v1 clients get an error."""

    reason: RejectReason
    ref: Ref = None


@dataclass(frozen=True, slots=True)
class PresenceQuery:
    """v1 `presence`: who is in a group that keeps presence (docs/presence.md)."""

    group: str
    ref: Ref = None


Command = SendToGroup | SendToChannel | Join | Leave | PresenceQuery


def decode(text: str) -> Command | Rejected:
    """Parse one client text frame. The forwarded object is the client's own text, byte for byte."""
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError:
        return Rejected("bad_json")
    if not isinstance(obj, dict):
        return Rejected("not_object")
    ref = obj.get("ref")
    if ref is not None and not _valid_ref(ref):
        return Rejected("bad_ref")
    task = obj.get("task")
    if task in ("send_message_to_group", "join", "leave", "presence"):
        group = obj.get("group_name")
        if not isinstance(group, str) or GROUP_NAME.fullmatch(group) is None:
            return Rejected("invalid_group", ref)
        if task == "join":
            since = obj.get("since")
            if since is None:
                return Join(group, ref)
            parsed = _since(since)
            return Join(group, ref, parsed) if parsed is not None else Rejected("bad_since", ref)
        if task == "leave":
            return Leave(group, ref)
        if task == "presence":
            return PresenceQuery(group, ref)
        key = obj.get("idempotency_key")
        if not (isinstance(key, str) and 0 < len(key) <= MAX_KEY_LENGTH):
            key = None
        return SendToGroup(group, message_frame(text), ref, key)
    if task == "send_message_to_channel":
        channel_id = obj.get("channel_id")
        if not isinstance(channel_id, str) or CHANNEL_ID.fullmatch(channel_id) is None:
            return Rejected("invalid_channel", ref)
        return SendToChannel(channel_id, message_frame(text), ref)
    return Rejected("unknown_task", ref)


def _since(value: object) -> Since | None:
    if not isinstance(value, dict):
        return None
    epoch, offset = value.get("epoch"), value.get("offset")
    if not isinstance(epoch, str) or EPOCH.fullmatch(epoch) is None:
        return None
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < 2**53:
        return None
    return Since(epoch, offset)


def _valid_ref(ref: object) -> bool:
    if isinstance(ref, bool):
        return False
    if isinstance(ref, int):
        return -(2**53) < ref < 2**53  # exact in every JSON client
    return isinstance(ref, str) and len(ref) <= MAX_REF_LENGTH


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


ErrorCode = Literal[
    "bad_json",
    "not_object",
    "unknown_task",
    "invalid_group",
    "invalid_channel",
    "bad_ref",
    "forbidden",
    "rate_limited",
    "too_many_groups",
    "broker_unavailable",
    "unknown_channel",
    "bad_since",
    "presence_off",
]


def ack(ref: Ref, **details: object) -> str:
    """`{"ack": ref}`: the request `ref` was carried out (a publish: the broker accepted it). For a
    group with history it also says where the group stands (`epoch`, `offset`) and, for a join
    with `since`, whether every missed message follows (`recovered`)."""
    return orjson.dumps({"ack": ref, **details}).decode()


def error(code: ErrorCode, detail: str, ref: Ref = None) -> str:
    """`{"error": {...}}` with a stable machine-readable code; `ref` names the request it answers."""
    body: dict[str, object] = {"code": code, "detail": detail}
    if ref is not None:
        body["ref"] = ref
    return orjson.dumps({"error": body}).decode()


def group_frame(group: str, frame: str, epoch: str = "", offset: int = 0) -> str:
    """The v1 form of a group message, `{"group": G, "message": ...}`, from the seed form; with its
    position, `{"group": G, "epoch": E, "offset": N, "message": ...}`.

    Built once per message per pod, and only when the pod has v1 members; group names and epochs
    need no escaping (GROUP_NAME and EPOCH allow none of the characters JSON escapes)."""
    if offset:
        return '{"group":"' + group + '","epoch":"' + epoch + '","offset":' + str(offset) + "," + frame[1:]
    return '{"group":"' + group + '",' + frame[1:]

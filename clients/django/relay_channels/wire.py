"""What this package writes into relay's Redis, byte for byte: the contract with the relay pods.

It restates, for writers outside the pods, the server's `service/broker/wire.py` (payloads),
`service/channels.py` (channel names), `service/broker/history.py` (history keys and the
`relay_append_v1` function) and `service/protocol.py` (group names, channel ids). The relay repo's
tests/test_relay_channels_contract.py decodes every payload built here with the pods' own code and
delivers it through real pods, so the two sides cannot drift apart. Pure functions, no imports
beyond the standard library.

    <prefix>:g:{G}   group G's channel: b"1 <sent_at> \\n<frame>" (target empty)
    <prefix>:p:<pod> one pod's channel: b"1 <sent_at> <channel_id>\\n<frame>" (a direct send), or
                     b"C join|leave <channel_id> <group>\\n" (a change to one connection's groups)
    <prefix>:h:{G}, <prefix>:m:{G}, <prefix>:i:{G}   a history group's keys (FCALL relay_append_v1)
    <prefix>:rules   the pods' group rules as JSON, written by every pod on every Redis link
"""

from __future__ import annotations

import re
from typing import Literal

GROUP_NAME = re.compile(r"[A-Za-z0-9._-]{1,99}")  # always fullmatch: "$" would let a trailing newline in
CHANNEL_ID = re.compile(r"[A-Za-z0-9_-]{1,63}\.[A-Za-z0-9_-]{1,64}")  # "<pod_id>.<random>"
PREFIX = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # RELAY_REDIS_PREFIX
MAX_KEY_LENGTH = 64  # idempotency keys, as the pods accept them from clients
APPEND = "relay_append_v1"  # the pods' Redis Functions library, loaded by every pod on every primary
RULES = "rules"


def group_channel(prefix: str, group: str) -> str:
    """The Redis channel of group `group`. The braces are a Cluster hash tag shared with its history."""
    return prefix + ":g:{" + group + "}"


def pod_channel(prefix: str, pod_id: str) -> str:
    """The Redis channel one pod listens on for direct sends and group changes."""
    return prefix + ":p:" + pod_id


def pod_of(channel_id: str) -> str:
    """The pod a relay channel id belongs to (ids are `<pod_id>.<random>`)."""
    return channel_id.partition(".")[0]


def rules_key(prefix: str) -> str:
    """The key the pods write their group rules to (JSON; absent until a pod has connected)."""
    return prefix + ":" + RULES


def history_keys(prefix: str, group: str) -> tuple[str, str, str]:
    """The stream, hash and idempotency set of a history group, in the slot of its channel."""
    tag = "{" + group + "}"
    return prefix + ":h:" + tag, prefix + ":m:" + tag, prefix + ":i:" + tag


def message(frame: str, sent_at: float, target: str = "") -> bytes:
    """A frame for a group's members (`target` empty) or for one connection (`target` its id)."""
    return f"1 {sent_at!r} {target}\n{frame}".encode()


def control(verb: Literal["join", "leave"], channel_id: str, group: str) -> bytes:
    """Join or leave: the pod holding `channel_id` adds it to `group` or takes it out."""
    return f"C {verb} {channel_id} {group}\n".encode()


def append_args(
    prefix: str,
    group: str,
    frame: str,
    sent_at: float,
    *,
    history: int,
    ttl: float,
    sharded: bool,
    epoch: str,
    key: str,
) -> tuple[str | int, ...]:
    """The whole `FCALL relay_append_v1 ...` command for a message to a history group: the pods'
    library stores it at the group's next offset and publishes it, atomically. `epoch` begins a
    new history should the group have none; `key` ("" for none) stores a retried message once."""
    stream, meta, seen = history_keys(prefix, group)
    publish = "SPUBLISH" if sharded else "PUBLISH"
    ttl_ms = max(1, int(ttl * 1000))
    return (
        "FCALL", APPEND, 3, stream, meta, seen,
        group_channel(prefix, group), publish, frame, repr(sent_at), history, ttl_ms, epoch, key,
    )  # fmt: skip

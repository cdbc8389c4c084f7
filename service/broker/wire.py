"""The envelope as it travels through Redis: a one-line header, then the frame text untouched.

    b"1 <sent_at> <target>\\n<frame>"      a message (target empty for a group message)
    b"2 <sent_at> <epoch> <offset>\\n<frame>"  a message of a group that keeps history, written
                                          by the history script (service/broker/history.py)
    b"C <verb> <target> <group>\\n"        join or leave: a backend changes one connection's groups
    b"E <sent_at>\\n<frame>"                a presence event of the group, written by the presence
                                          functions (service/broker/presence.py): v1 members only
    b"P <nonce>\\n"                        a link probe; never reaches the hub

The frame is already the exact JSON text members receive, so it is never parsed or re-encoded
here: encoding is one f-string and one `encode`, decoding one `partition` and one `decode`.
The leading version digit lets a future format coexist with this one during a rolling upgrade.
"""

from __future__ import annotations

from service.broker import Envelope

VERSION = b"1"
POSITIONED = b"2"
CONTROL = b"C"
VERBS = (b"join", b"leave")
PROBE = b"P"
EVENT = b"E"


class BadPayload(ValueError):
    """A payload on a relay channel that this version cannot read (counted, never delivered)."""


def encode(envelope: Envelope) -> bytes:
    """The Redis payload for `envelope` (its channel travels as the Redis channel name)."""
    return f"1 {envelope.sent_at!r} {envelope.target}\n{envelope.frame}".encode()


def decode(channel: str, payload: bytes) -> Envelope:
    """The envelope carried by `payload` on logical `channel`; BadPayload if it is not one."""
    head, newline, frame = payload.partition(b"\n")
    parts = head.split(b" ")
    try:
        if newline and len(parts) == 3 and parts[0] == VERSION:
            return Envelope(channel, frame.decode(), float(parts[1]), parts[2].decode())
        if newline and len(parts) == 4 and parts[0] == CONTROL and parts[1] in VERBS and not frame:
            command = (parts[1] + b" " + parts[3]).decode()
            return Envelope(channel, "", 0.0, parts[2].decode(), command=command)
        if newline and len(parts) == 2 and parts[0] == EVENT:
            return Envelope(channel, frame.decode(), float(parts[1]), event=True)
        if newline and len(parts) == 4 and parts[0] == POSITIONED and parts[2].isalnum():
            offset = int(parts[3])
            if offset > 0:
                return Envelope(channel, frame.decode(), float(parts[1]), "", parts[2].decode(), offset)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadPayload(head[:40]) from exc
    raise BadPayload(head[:40])


def probe(nonce: str) -> bytes:
    """A probe payload: the pod publishes it to its own probe channel and waits for it."""
    return b"P " + nonce.encode() + b"\n"


def probe_nonce(payload: bytes) -> str | None:
    """The nonce if `payload` is a probe, else None."""
    if payload[:2] != b"P ":
        return None
    return payload[2:].rstrip(b"\n").decode(errors="replace")

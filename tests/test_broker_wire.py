"""The envelope as it travels through Redis (service/broker/wire.py): pure functions, table-driven.

Everything another pod, the history script or a backend (the Django channel layer) writes on a relay
channel passes through `decode`; what it cannot read must raise BadPayload (counted, never
delivered), never reach members half-read.
"""

from __future__ import annotations

import pytest

from service.broker import Envelope
from service.broker.wire import BadPayload, decode, encode, probe, probe_nonce


@pytest.mark.parametrize(
    "envelope",
    [
        Envelope("g:{room}", '{"t":"msg","data":1}', 1732700000.125),
        Envelope("p:pod-a", '{"t":"msg"}', 1732700000.5, "c7f3"),
        # Pretty-printed JSON from a seed client is forwarded verbatim: newlines in the frame.
        Envelope("g:{room}", '{\n  "t": "msg",\n  "data": "a\\nb"\n}\n', 0.25),
        Envelope("g:{room}", "", 3.0),
        Envelope("g:{ünï}", '{"data":"ünïcödé ✓"}', 1.5),
    ],
)
def test_what_is_encoded_decodes_to_the_same_envelope(envelope: Envelope) -> None:
    assert decode(envelope.channel, encode(envelope)) == envelope


def test_the_encoded_header_is_the_documented_one() -> None:
    # relay_channels (the Django layer) and older pods write this format; it must not drift.
    assert encode(Envelope("g:{x}", "{}", 2.5, "c1")) == b"1 2.5 c1\n{}"
    assert encode(Envelope("g:{x}", "{}", 2.5)) == b"1 2.5 \n{}"


def test_a_presence_event_carries_when_it_was_sent() -> None:
    """`E <sent_at>` (written by the presence functions): the time feeds the fan-out latency."""
    got = decode("g:{room}", b'E 1.5\n{"t":"presence"}')
    assert got == Envelope("g:{room}", '{"t":"presence"}', 1.5, event=True)


def test_a_positioned_message_carries_its_epoch_and_offset() -> None:
    got = decode("g:{room}", b'2 1.5 a1b2c3 42\n{"t":"msg"}\nmore')
    assert got == Envelope("g:{room}", '{"t":"msg"}\nmore', 1.5, "", "a1b2c3", 42)


@pytest.mark.parametrize(
    ("payload", "command", "target"),
    [(b"C join c7f3 lobby\n", "join lobby", "c7f3"), (b"C leave c9 g-2\n", "leave g-2", "c9")],
)
def test_a_control_message_changes_one_connections_groups(payload: bytes, command: str, target: str) -> None:
    assert decode("p:pod-a", payload) == Envelope("p:pod-a", "", 0.0, target, command=command)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"1 2.5 c1",  # no newline: the frame is missing
        b"1 2.5\n{}",  # two header fields
        b"1 2.5 c1 extra\n{}",  # four header fields
        b"9 2.5 c1\n{}",  # an unknown version
        b"1 soon c1\n{}",  # sent_at not a number
        b"1 2.5 c1\n\xff\xfe",  # the frame is not UTF-8
        b"1 2.5 \xff\n{}",  # the target is not UTF-8
        b"C join c1\n",  # a control message without its group
        b"C join c1 lobby extra\n",
        b"C kick c1 lobby\n",  # an unknown verb
        b"C join c1 lobby\n{}",  # a control message carries no frame
        b"C join c1 lobby",  # ... but does end its header
        b"C join c1 \xff\n",  # the group is not UTF-8
        b"2 1.5 e1 0\n{}",  # offsets start at 1
        b"2 1.5 e1 -3\n{}",
        b"2 1.5 e1 x\n{}",
        b"2 1.5 e-1 4\n{}",  # epochs are alphanumeric
        b"2 1.5 e1 4",  # no newline
        b"2 1.5 e1\n{}",  # three header fields
        b"2 1.5 e1 4 5\n{}",
        b"2 later e1 4\n{}",
        b"2 1.5 e1 4\n\xff",
        b"P abc\n",  # a probe is never an envelope
    ],
)
def test_a_payload_that_is_not_an_envelope_is_refused(payload: bytes) -> None:
    with pytest.raises(BadPayload):
        decode("g:{room}", payload)


def test_the_refusal_names_the_header_not_the_frame() -> None:
    with pytest.raises(BadPayload) as refused:
        decode("g:{room}", b"7 " + b"h" * 60 + b"\nsecret frame")
    assert refused.value.args == ((b"7 " + b"h" * 60)[:40],)
    with pytest.raises(BadPayload) as refused:
        decode("g:{room}", b"1 soon c1\nsecret frame")
    assert refused.value.args == (b"1 soon c1",)


@pytest.mark.parametrize("nonce", ["n1", "a5f0c3d2e1b4", "x y"])
def test_a_probe_carries_its_nonce_back(nonce: str) -> None:
    assert probe(nonce) == b"P " + nonce.encode() + b"\n"
    assert probe_nonce(probe(nonce)) == nonce


@pytest.mark.parametrize("payload", [b"1 2.5 c1\n{}", b"P", b"Px\n", b"2 1.5 e1 4\nP abc", b""])
def test_only_probes_have_a_nonce(payload: bytes) -> None:
    assert probe_nonce(payload) is None


def test_a_probe_nonce_that_is_not_utf8_is_still_read() -> None:
    assert probe_nonce(b"P \xffab\n") == "\ufffdab"

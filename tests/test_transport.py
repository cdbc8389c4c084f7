"""service/transport.py reaches below uvicorn's public API to make an idle socket cheaper. These
tests pin what it relies on, so that an upgrade of uvicorn or websockets that moves any of it fails
here, loudly, instead of quietly costing memory or breaking keepalive."""

from __future__ import annotations

import ast
import asyncio
import hashlib
import importlib.metadata
import inspect
import textwrap
from typing import Any

import pytest
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import Frame, Opcode
from websockets.server import ServerProtocol

from service import transport
from service.timers import Due
from service.transport import CHECKED_WITH, Gate, Inbox, SansIOProtocol
from tests.helpers import join, running_pod, ws_url

# sha256 of the source of each uvicorn method SansIOProtocol replaces, as checked (uvicorn 0.54.0).
REPLACED = {
    "receive": "1dc0e715390021a105cfe6abb35a730af9c5be3d71043329a39bbc1c5afe66bc",
    "schedule_ping": "002da2050fd252243efd25303d85b1e6ec1c0d0d4e7f049fe3299608e05ab38e",
    "send_keepalive_ping": "02da3945b3e6b11057f7082b4ef0c01e0f2d1d6102b1350fe5b0b25156b205e4",
}


def uvicorn_source() -> ast.Module:
    return ast.parse(textwrap.dedent(inspect.getsource(WebSocketsSansIOProtocol)))


def self_attributes_set(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        targets = (
            node.targets
            if isinstance(node, ast.Assign)
            else [node.target]
            if isinstance(node, ast.AnnAssign)
            else []
        )
        for target in targets:
            for one in target.elts if isinstance(target, ast.Tuple) else [target]:
                if (
                    isinstance(one, ast.Attribute)
                    and isinstance(one.value, ast.Name)
                    and one.value.id == "self"
                ):
                    names.add(one.attr)
    return names


def calls_on(tree: ast.AST, attribute: str) -> set[str]:
    """Every `self.<attribute>.<name>` uvicorn's protocol uses."""
    return {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == attribute
        and isinstance(node.value.value, ast.Name)
        and node.value.value.id == "self"
    }


def test_the_versions_installed_are_the_ones_transport_was_checked_against() -> None:
    for package, version in CHECKED_WITH.items():
        installed = importlib.metadata.version(package)
        assert installed == version, (
            f"{package} {installed} is installed; service/transport.py was checked against {version}. "
            "Check what it relies on against the new version (this file lists it), then update CHECKED_WITH."
        )


def test_the_slots_cover_every_attribute_uvicorn_sets() -> None:
    """An attribute uvicorn adds would land in a per-socket dict again (1.6 KB)."""
    missing = self_attributes_set(uvicorn_source()) - set(SansIOProtocol.__slots__)
    assert not missing, f"uvicorn's protocol sets {sorted(missing)}: add them to UVICORN_ATTRIBUTES"


def test_inbox_and_gate_offer_everything_uvicorn_calls_on_its_queue_and_event() -> None:
    tree = uvicorn_source()
    assert calls_on(tree, "queue") <= {n for n in dir(Inbox) if not n.startswith("_")}
    assert calls_on(tree, "writable") <= {n for n in dir(Gate) if not n.startswith("_")}
    assert calls_on(tree, "ping_timer") | calls_on(tree, "pong_timer") <= {"cancel"}


@pytest.mark.parametrize("name", sorted(REPLACED))
def test_the_methods_replaced_are_uvicorns_as_checked(name: str) -> None:
    source = inspect.getsource(getattr(WebSocketsSansIOProtocol, name))
    digest = hashlib.sha256(source.encode()).hexdigest()
    assert digest == REPLACED[name], (
        f"uvicorn's WebSocketsSansIOProtocol.{name} changed: bring SansIOProtocol.{name} in line with it, "
        "then record its new sha256 here"
    )


async def test_inbox_hands_items_in_order_and_wakes_its_reader() -> None:
    inbox = Inbox()
    assert inbox.empty() and inbox.qsize() == 0
    inbox.put_nowait(1)
    inbox.put_nowait(2)
    assert inbox.qsize() == 2
    assert await inbox.get() == 1 and await inbox.get() == 2
    assert inbox.empty()
    reader = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    assert not reader.done()
    with pytest.raises(RuntimeError, match="one reader"):
        await inbox.get()
    inbox.put_nowait(3)
    assert await reader == 3
    cancelled = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    cancelled.cancel()
    inbox.put_nowait(4)  # after a cancelled read the item stays for the next one
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert await inbox.get() == 4


async def test_gate_waits_only_while_closed() -> None:
    gate = Gate()
    assert gate.is_set()
    assert await gate.wait() is True
    gate.clear()
    waiters = [asyncio.ensure_future(gate.wait()) for _ in range(3)]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiters)
    gate.set()
    assert await asyncio.gather(*waiters) == [True, True, True]
    gate.clear()
    gone = asyncio.ensure_future(gate.wait())
    await asyncio.sleep(0)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    gate.set()
    assert gate.is_set()


async def test_an_accepted_socket_keeps_no_handshake_and_no_per_socket_dict() -> None:
    async with running_pod() as pod:
        client = await join(ws_url(pod, "/g"), additional_headers={"X-Padding": "y" * 2000})
        (conn,) = pod.pod.hub.connections
        protocol = conn.send.__self__  # type: ignore[attr-defined]
        assert isinstance(protocol, SansIOProtocol)
        assert vars(protocol) == {}
        assert protocol.scope is None and protocol.request is None and protocol.response is None
        assert protocol.client is None and protocol.server is None
        assert isinstance(protocol.queue, Inbox) and isinstance(protocol.writable, Gate)
        sent = await client.publish("g", n=1)
        assert await client.next() == {"message": sent}
        await client.ws.close()


async def test_keepalive_pings_go_out_from_the_wheel_and_a_silent_peer_is_closed() -> None:
    """The websockets client answers pings: it stays. A raw client that never answers is closed by
    the pong deadline, as uvicorn does (1011)."""
    async with running_pod(ping_interval=0.1, ping_timeout=0.2) as pod:
        client = await join(ws_url(pod, "/g"))
        (conn,) = pod.pod.hub.connections
        protocol = conn.send.__self__  # type: ignore[attr-defined]
        assert isinstance(protocol.ping_timer, Due) or isinstance(protocol.pong_timer, Due)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        answered = 0
        while answered < 3:  # three ping rounds, each answered in time: the socket stays
            sent_at = protocol.ping_sent_at
            while protocol.ping_sent_at == sent_at or protocol.pending_ping_payload is not None:
                assert loop.time() < deadline, "no keepalive ping was answered"
                await asyncio.sleep(0.01)
            answered += 1
        assert not transport.closing(conn.send)
        sent = await client.publish("g", n=1)
        assert await client.next() == {"message": sent}
        reader, writer = await asyncio.open_connection("127.0.0.1", pod.port)
        writer.write(
            b"GET /g HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        data = b""
        while not reader.at_eof():  # read (never answering the pings) until the server closes
            chunk = await asyncio.wait_for(reader.read(4096), 5)
            if not chunk:
                break
            data += chunk
        assert b"\x89\x04" in data  # it was pinged
        assert b"\x88\x18\x03\xf3keepalive ping timeout" in data  # then closed with 1011
        writer.close()
        await client.ws.close()


# Prepared frames: the hub's one `str` per message becomes one frame's bytes, written to every
# member's transport. They must be the very bytes uvicorn and websockets would write.


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_a_prepared_frame_is_what_websockets_serializes(size: int) -> None:
    text = ("é" * size)[: max(0, size - 1)] + ("x" if size else "")
    expected = Frame(Opcode.TEXT, text.encode()).serialize(mask=False)
    assert transport.text_frame(text) == expected
    assert transport.text_frame(text) is transport.text_frame(text)  # built once


def test_the_two_latest_frames_are_kept() -> None:
    seed, v1 = "".join(["{}"]), "".join(["{", "}"])  # equal, distinct objects: the cache is by identity
    first = transport.text_frame(seed)
    second = transport.text_frame(v1)
    assert first is not second
    assert transport.text_frame(seed) is first and transport.text_frame(v1) is second


def test_what_write_text_reads_is_still_there() -> None:
    """It checks uvicorn's and websockets' state before writing: if either renames what it checks,
    this fails instead of relay writing frames where it must not."""
    assert {"writable", "handshake_complete", "close_sent", "disconnected", "initial_response", "conn"} <= (
        self_attributes_set(uvicorn_source())
    )
    protocol = ServerProtocol()
    for name in ("_state", "extensions", "expect_continuation_frame", "debug"):
        assert hasattr(protocol, name), name


class Recorder:
    """A transport stand-in that keeps what is written and passes everything on."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))
        self.inner.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_a_prepared_frame_is_written_exactly_as_uvicorn_writes_it() -> None:
    async with running_pod() as pod:
        client = await join(ws_url(pod, "/g"))
        (conn,) = pod.pod.hub.connections
        protocol = conn.send.__self__  # type: ignore[attr-defined]
        recorder = Recorder(protocol.transport)
        protocol.transport = recorder
        text = '{"message":{"n":"' + "ü" * 200 + '"}}'
        await conn.send({"type": "websocket.send", "text": text})  # uvicorn's own path
        assert transport.write_text(protocol, text)
        assert len(recorder.written) == 2 and recorder.written[0] == recorder.written[1]
        assert await client.ws.recv() == text and await client.ws.recv() == text
        protocol.writable.clear()  # paused: uvicorn's send would wait, so write_text does nothing
        assert not transport.write_text(protocol, text)
        protocol.writable.set()
        protocol.transport = recorder.inner
        await client.ws.close()


async def test_group_messages_go_out_prepared_and_fall_back_under_permessage_deflate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Seed and v1 members of one group get the frame built for their form, without websockets'
    send_text; a member that negotiated permessage-deflate gets it through uvicorn's send."""
    sent_text: list[bytes] = []
    original = ServerProtocol.send_text

    def counting(self: ServerProtocol, data: bytes, fin: bool = True) -> None:
        sent_text.append(bytes(data))
        original(self, data, fin)

    monkeypatch.setattr(ServerProtocol, "send_text", counting)
    async with running_pod(ws_compression=True) as pod:
        plain = [await join(ws_url(pod, "/g"), compression=None) for _ in range(3)]
        v1 = await join(ws_url(pod, "/g"), compression=None, subprotocols=["relay.v1"])
        deflate = await join(ws_url(pod, "/g"))  # the websockets client offers permessage-deflate
        assert deflate.ws.protocol.extensions, "the client did not negotiate permessage-deflate"
        sent_text.clear()
        body = await plain[0].publish("g", n=1)
        for client in plain:
            assert await client.next() == {"message": body}
        assert await deflate.next() == {"message": body}
        got = await v1.next()
        assert got["message"] == body and got["group"] == "g"
        assert len(sent_text) == 1  # only the deflate member went through websockets
        for client in (*plain, v1, deflate):
            await client.ws.close()

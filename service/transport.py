"""The one place relay reaches below uvicorn's ASGI interface: the TCP socket under a WebSocket.

ASGI has no way to cut a connection. A client that stops reading keeps its receive window at zero,
so neither relay's close frame nor uvicorn's `transport.close()` (which waits for the write buffer
to drain) ever ends the socket: it stays ESTABLISHED with its buffers full for as long as the peer
likes. relay therefore aborts the transport (a TCP reset) when a socket has not gone within
`RELAY_CLOSE_TIMEOUT` of its close, and counts the socket against the caps until it is really gone.

Every uvicorn WebSocket implementation hands the application its protocol object's bound `send`
method; that protocol holds `transport` and the server-wide `connections` set, which it leaves in
`connection_lost`. tests/test_stalled.py checks these assumptions for each implementation against
the uvicorn version installed (checked with uvicorn 0.54), so an upgrade that breaks them fails the
tests loudly instead of leaking sockets quietly.

`SansIOProtocol` mends one gap of uvicorn's `websockets-sansio` implementation (relay's default):
a handshake the websockets parser refuses (a request line or header over 8 KiB, over 128 headers,
not HTTP at all) got no answer, so the client waited and the socket stayed open until it gave up.
tests/test_handshake_fuzz.py holds it to answering 414 or 431.

It also makes an idle socket cheaper (issue 17; measured with loadtest/conn_memory.py, the breakdown
in docs/performance.md), keeping uvicorn's behaviour:
- `__slots__` for every attribute uvicorn's protocol sets: uvicorn's ~37 attributes overflow
  CPython's shared-key instance dicts, so each protocol carried its own 1.6 KB dict.
- The receive queue and the `writable` event become `Inbox` and `Gate`, which hold no deque until
  they need one (asyncio's `Queue` is four deques and an event, about 3 KB; an `Event` 0.7 KB).
- Keepalive pings and pong deadlines go on the event loop's one `timers.Wheel` instead of a loop
  timer each.
- `shed` drops what uvicorn keeps of the handshake once the socket is accepted: the ASGI scope
  with its copy of the headers, websockets' request and response and their headers.

Prepared frames (`write_text`): the hub offers one message's `str` to every member; the frame's
bytes are built once (`text_frame`) and written to each member's transport, where uvicorn's `send`
would have framed the text again per member. Only where the bytes would be the same: no
permessage-deflate, not paused (a member with a backlog goes through `send` and its writer task),
open, past the handshake. tests/test_transport.py holds the bytes equal to uvicorn's.

tests/test_transport.py pins the uvicorn and websockets versions this was checked against and fails
loudly when an upgrade changes what it relies on (the attributes, the source of the methods
replaced here, the methods it calls).
"""

from __future__ import annotations

import asyncio
import random
import struct
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.protocol import OPEN

from service.timers import wheel

CHECKED_WITH = {"uvicorn": "0.54.0", "websockets": "17.4"}  # tests/test_transport.py holds these

# Every attribute uvicorn 0.54's WebSocketsSansIOProtocol sets (tests/test_transport.py reads them
# from its source), plus relay's own.
UVICORN_ATTRIBUTES = (
    "app", "app_state", "asgi_version", "client", "close_sent", "close_timeout", "close_timer",
    "config", "conn", "connections", "curr_msg_data_type", "default_headers", "disconnected",
    "frames", "handshake_complete", "handshake_initiated", "initial_response", "last_ping_rtt",
    "logger", "loop", "pending_ping_payload", "ping_interval", "ping_sent_at", "ping_timeout",
    "ping_timer", "pong_timer", "queue", "read_paused", "request", "response", "root_path", "scheme",
    "scope", "server", "tasks", "transport", "writable",
)  # fmt: skip


_EMPTY: Any = object()


class Inbox:
    """What uvicorn's protocol needs of its `asyncio.Queue` (put_nowait, get, empty) for its one
    reader, the application's `receive`: a list only while events wait, a future only while the
    reader does. A second concurrent reader is a bug and raises."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[Any] | None = None
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        if self._items is None:
            self._items = [item]
        else:
            self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items) if self._items else 0

    def take(self) -> Any:
        """The first item, or _EMPTY."""
        items = self._items
        if not items:
            return _EMPTY
        item = items.pop(0)
        if not items:
            self._items = None
        return item

    def waiter(self) -> asyncio.Future[None]:
        """A future done when the next item arrives (for a reader that found none)."""
        if self._waiter is not None and not self._waiter.done():
            raise RuntimeError("Inbox: one reader at a time")
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        return waiter

    async def get(self) -> Any:
        while (item := self.take()) is _EMPTY:
            await self.waiter()
        return item


class Gate:
    """What uvicorn's protocol needs of its `writable` `asyncio.Event` (set, clear, is_set, wait):
    a list of waiters only while the transport is paused and a send waits. Like `Event.wait`,
    `wait` does not suspend when the gate is open."""

    __slots__ = ("_open", "_waiters")

    def __init__(self) -> None:
        self._open = True
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._open

    def set(self) -> None:
        if self._open:
            return
        self._open = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._open = False

    async def wait(self) -> bool:
        if self._open:
            return True
        waiter = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            await waiter
            return True
        finally:
            if self._waiters is not None and waiter in self._waiters:
                self._waiters.remove(waiter)


class SansIOProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets-sansio protocol, answering the handshakes websockets refuses, lean."""

    __slots__ = (*UVICORN_ATTRIBUTES, "wheel")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue = Inbox()  # type: ignore[assignment]
        self.writable = Gate()  # type: ignore[assignment]
        self.wheel = wheel(self.loop)

    def shed(self) -> None:
        """Forget the handshake once the socket is accepted: uvicorn reads `scope`, `request`,
        `response` and the two addresses (`client`, `server`) only before it answers the
        handshake. websockets' parser keeps the request object as a local, so its headers are
        emptied instead."""
        request = self.request
        if request is not None:
            request.headers.clear()
        self.request = None  # type: ignore[assignment]
        self.response = None  # type: ignore[assignment]
        self.scope = None  # type: ignore[assignment]
        self.client = self.server = None  # the addresses: uvicorn logs them at TRACE level only, if set

    # uvicorn 0.54's `receive`, reading the Inbox without a coroutine of its own: the source of the
    # method replaced is pinned by tests/test_transport.py, like the two below.
    async def receive(self) -> Any:
        inbox: Inbox = self.queue  # type: ignore[assignment]
        while (message := inbox.take()) is _EMPTY:
            await inbox.waiter()
        if self.read_paused and inbox.empty():
            self.read_paused = False
            self.transport.resume_reading()
        return message

    # uvicorn 0.54's keepalive, with the wheel's deadlines instead of loop timers: the source of
    # the two methods replaced is pinned by tests/test_transport.py.
    def schedule_ping(self) -> None:
        assert self.ping_interval is not None
        delay = max(0.0, self.ping_interval - self.last_ping_rtt)
        self.ping_timer = self.wheel.call_later(delay, SansIOProtocol.send_keepalive_ping, self)  # type: ignore[assignment]

    def send_keepalive_ping(self) -> None:
        self.ping_timer = None
        if self.close_sent or self.transport.is_closing():
            return
        self.pending_ping_payload = struct.pack("!I", random.getrandbits(32))
        self.ping_sent_at = self.loop.time()
        self.conn.send_ping(self.pending_ping_payload)
        self.transport.write(b"".join(self.conn.data_to_send()))
        if self.ping_timeout is not None:
            self.pong_timer = self.wheel.call_later(self.ping_timeout, SansIOProtocol.keepalive_timeout, self)  # type: ignore[assignment]
        else:
            self.schedule_ping()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self.handshake_initiated and self.conn.handshake_exc is not None:
            # websockets prepared a 414/431 response, or only the end of the stream for a request
            # that is not HTTP; uvicorn writes neither and never closes. Send it and close.
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.transport.close()


def protocol_for(ws_impl: str) -> type[Any] | str:
    """What to hand uvicorn's `ws=` for RELAY_WS_IMPL."""
    return SansIOProtocol if ws_impl == "websockets-sansio" else ws_impl


def prepared(send: Callable[..., Any]) -> SansIOProtocol | None:
    """The protocol under `send` when relay may write prepared frames to it (`write_text`)."""
    protocol = _protocol(send)
    return protocol if isinstance(protocol, SansIOProtocol) else None


_recent: list[Any] = [None, b"", None, b""]  # the two latest (text, frame): a v1 form and a seed form


def text_frame(text: str) -> bytes:
    """The whole server frame for `text`: FIN, opcode text, not masked (RFC 6455 section 5.2), as
    websockets builds it. The hub offers one message's `str` to every member in a row, so keeping
    the two latest frames builds each once per message (twice where v1 and seed members mix)."""
    recent = _recent
    if recent[0] is text:
        return recent[1]  # type: ignore[no-any-return]
    if recent[2] is text:
        return recent[3]  # type: ignore[no-any-return]
    payload = text.encode()
    n = len(payload)
    if n < 126:
        frame = bytes((0x81, n)) + payload
    elif n < 65536:
        frame = b"\x81\x7e" + n.to_bytes(2, "big") + payload
    else:
        frame = b"\x81\x7f" + n.to_bytes(8, "big") + payload
    recent[2], recent[3], recent[0], recent[1] = recent[0], recent[1], text, frame
    return frame


def write_text(protocol: SansIOProtocol, text: str) -> bool:
    """Write `text` to the socket as a prepared frame, when uvicorn's `send` and websockets'
    `send_text` would write exactly these bytes and nothing else: the transport is not paused,
    the socket is open and past its handshake, no close sent, no extension (permessage-deflate
    compresses per connection), no debug logging. Otherwise False, and nothing was done: the
    caller goes through `send`, which also handles the cases that wait or raise."""
    conn = protocol.conn
    if (
        protocol.writable._open  # type: ignore[attr-defined]
        and protocol.handshake_complete
        and not protocol.close_sent
        and not protocol.disconnected
        and protocol.initial_response is None
        and conn._state is OPEN
        and not conn.extensions
        and not conn.expect_continuation_frame
        and not conn.debug
    ):
        protocol.transport.write(text_frame(text))
        return True
    return False


def shed(send: Callable[..., Any]) -> None:
    """After the handshake: drop what the server keeps of it, where relay knows how (sansio)."""
    protocol = _protocol(send)
    if isinstance(protocol, SansIOProtocol):
        protocol.shed()


def _protocol(send: Callable[..., Any]) -> Any:
    return getattr(send, "__self__", None)


def supported(send: Callable[..., Any]) -> bool:
    """True when `send` is a uvicorn protocol's bound method relay can reach the socket through."""
    protocol = _protocol(send)
    return protocol is not None and hasattr(protocol, "transport") and hasattr(protocol, "connections")


def gone(send: Callable[..., Any]) -> bool:
    """The socket under `send` is closed and released (its protocol saw `connection_lost`)."""
    protocol = _protocol(send)
    return protocol is None or protocol not in protocol.connections


def closing(send: Callable[..., Any]) -> bool:
    """The transport was told to close (by relay or by uvicorn, e.g. a keepalive timeout)."""
    protocol = _protocol(send)
    return protocol is not None and bool(protocol.transport.is_closing())


def abort(send: Callable[..., Any]) -> None:
    """Cut the connection now: a TCP reset, the buffers dropped, `connection_lost` on the next turn."""
    protocol = _protocol(send)
    if protocol is not None and protocol.transport is not None:
        protocol.transport.abort()

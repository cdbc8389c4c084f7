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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol


class SansIOProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets-sansio protocol, answering the handshakes websockets refuses."""

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

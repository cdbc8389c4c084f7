"""One connection to one Redis server, speaking RESP2: the few commands the relay broker needs.

Why not redis-py's asyncio client: measured side by side (docs/performance.md, "The Redis client";
loadtest/redis_clients.py), redis-py costs 25-32 times the CPU per publish when many publishers
await at once, as relay's do, and 4 times per received message; and the broker needs control over
pub/sub connections that redis-py hides (a subscribe that returns once confirmed, explicit timeouts,
one pub/sub connection per cluster shard). Parsing and packing are hiredis's C code, as in redis-py.

Commands written in one event-loop turn leave in one `write` (a pipeline); replies are matched to
callers in order. On a pub/sub connection, pushes (messages and subscribe confirmations) go to
`on_push` once per chunk read from the socket.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import hiredis

PUSH_KINDS = frozenset(
    (b"message", b"smessage", b"subscribe", b"ssubscribe", b"unsubscribe", b"sunsubscribe")
)


class ConnectionLost(ConnectionError):
    """The connection closed or failed; the outcome of any command still in flight is unknown."""


class ReplyError(Exception):
    """Redis answered a command with an error (`-ERR ...`, `-MOVED ...`, `-NOAUTH ...`)."""


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ConnectOptions:
    """How to open and authenticate a connection. The password never appears in a repr or log."""

    username: str | None = None
    password: str | None = None
    db: int = 0
    tls: ssl.SSLContext | None = None
    timeout: float = 3.0

    def __repr__(self) -> str:
        return f"ConnectOptions(db={self.db}, tls={self.tls is not None}, timeout={self.timeout})"


Push = list[Any] | ReplyError  # [kind, channel, payload-or-count] as bytes, or an unawaited error reply


class RespConnection(asyncio.Protocol):
    """A pipelined RESP2 connection. Build it with `await RespConnection.open(...)`."""

    def __init__(
        self,
        on_push: Callable[[list[Push]], None] | None = None,
        on_lost: Callable[[str], None] | None = None,
    ) -> None:
        self._on_push = on_push
        self._on_lost = on_lost
        # hiredis's default `maxbuf` (16 KiB): the read buffer a large reply grew is freed once it
        # is read. (maxbuf caps no reply; set to 512 MiB it kept such a buffer for the connection's life.)
        self._reader = hiredis.Reader(replyError=ReplyError)
        self._pending: deque[tuple[asyncio.Future[Any], float]] = deque()
        self._out: list[bytes] = []
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self.closed = False
        self.lost_reason = "connection_lost"  # why the connection ended, when relay did not end it
        self._closed_by_us = False
        self.last_read = time.monotonic()
        self._gone = self._loop.create_future()  # resolved once the socket is really closed

    @classmethod
    async def open(
        cls,
        address: Address,
        options: ConnectOptions,
        *,
        name: str = "",
        select_db: bool = True,
        on_push: Callable[[list[Push]], None] | None = None,
        on_lost: Callable[[str], None] | None = None,
    ) -> RespConnection:
        """Connect, authenticate, select the database and name the client, within `options.timeout`."""
        loop = asyncio.get_running_loop()
        conn: RespConnection | None = None

        async def connect() -> RespConnection:
            nonlocal conn
            _, conn = await loop.create_connection(
                lambda: cls(on_push, on_lost),
                address.host,
                address.port,
                ssl=options.tls,
                server_hostname=address.host if options.tls else None,
            )
            setup: list[asyncio.Future[Any]] = []
            if options.password:
                auth = (options.username, options.password) if options.username else (options.password,)
                setup.append(conn.send(b"AUTH", *auth))
            if select_db and options.db:
                setup.append(conn.send(b"SELECT", options.db))
            if name:
                setup.append(conn.send(b"CLIENT", b"SETNAME", name))
            for reply in setup:
                await reply
            return conn

        try:
            return await asyncio.wait_for(connect(), options.timeout)
        except BaseException:
            if conn is not None:
                conn.close()
                await conn.wait_closed()
            raise

    # --- commands -------------------------------------------------------------------------------

    def send(self, *args: bytes | str | int) -> asyncio.Future[Any]:
        """Queue a command whose reply comes back in order; the future holds the reply."""
        future: asyncio.Future[Any] = self._loop.create_future()
        if self.closed:
            future.set_exception(ConnectionLost("connection closed"))
            return future
        self._pending.append((future, time.monotonic()))
        self.write(*args)
        return future

    def write(self, *args: bytes | str | int) -> None:
        """Queue a command whose answer arrives as a push (SUBSCRIBE and friends)."""
        if self.closed:
            return
        if not self._out:
            self._loop.call_soon(self._flush)
        self._out.append(hiredis.pack_command(args))  # type: ignore[arg-type]

    async def call(self, *args: bytes | str | int, timeout: float) -> Any:
        """Send one command and wait for its reply; ReplyError for an error reply."""
        return await asyncio.wait_for(self.send(*args), timeout)

    def oldest_pending(self) -> float | None:
        """When the oldest unanswered command was sent (monotonic), or None."""
        return self._pending[0][1] if self._pending else None

    def close(self) -> None:
        """Close now (no `on_lost`: the caller knows). Commands in flight fail with ConnectionLost."""
        self._closed_by_us = True
        if self._transport is not None and not self.closed:
            self._transport.abort()  # no lingering on a peer that stopped reading
        self._fail(ConnectionLost("connection closed"))

    async def wait_closed(self) -> None:
        """After `close()`: until the transport has released its socket."""
        await asyncio.shield(self._gone)

    def _flush(self) -> None:
        out, self._out = self._out, []
        if self._transport is not None and not self.closed:
            self._transport.write(b"".join(out))

    def _fail(self, exc: BaseException) -> None:
        self.closed = True
        self._out.clear()
        pending, self._pending = self._pending, deque()
        for future, _ in pending:
            if not future.done():
                future.set_exception(exc)

    # --- asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # cast, not isinstance: uvloop's transports (what `python -m service` runs on) do not
        # subclass asyncio.Transport, and an assert here kept every pod from reaching Redis.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.last_read = time.monotonic()
        self._reader.feed(data)
        pushes: list[Push] = []
        try:
            while (reply := self._reader.gets()) is not False:
                if self._on_push is not None and (
                    (type(reply) is list and reply and reply[0] in PUSH_KINDS)
                    or (isinstance(reply, ReplyError) and not self._pending)
                ):
                    pushes.append(reply)
                elif self._pending:
                    future, _ = self._pending.popleft()
                    if future.done():
                        continue
                    if isinstance(reply, ReplyError):
                        future.set_exception(reply)
                    else:
                        future.set_result(reply)
        except hiredis.ProtocolError as exc:
            # Not RESP: the stream cannot be trusted from here on. Drop it and report it lost
            # (connection_lost calls on_lost), so the link is rebuilt rather than left half dead.
            self.lost_reason = "protocol_error"
            self._fail(ConnectionLost(f"protocol error: {exc}"))
            if self._transport is not None:
                self._transport.abort()
            return
        if pushes:
            assert self._on_push is not None
            self._on_push(pushes)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._gone.done():
            self._gone.set_result(None)
        self._fail(ConnectionLost(str(exc) if exc else "connection closed by Redis"))
        if self._on_lost is not None and not self._closed_by_us:
            self._on_lost(self.lost_reason)

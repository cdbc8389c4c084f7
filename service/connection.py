"""The send side of one member socket: hub -> connection.offer -> socket.

Most sockets keep up, so `offer` writes at once, without a task or a queue. On uvicorn's
websockets-sansio protocol (relay's default) it writes the prepared frame: the whole WebSocket
frame, built once per message and handed to every member's transport (`transport.write_text`),
when the bytes would be exactly what uvicorn writes. Otherwise (permessage-deflate, a paused
transport, a closing socket, another implementation) it starts the ASGI `send` coroutine and runs
it to its first suspension by hand. uvicorn's WebSocket `send` only
suspends while the transport is paused (the kernel buffer is full), so in the common case the frame
is written by then and the coroutine is finished. When it does suspend, the socket has fallen
behind: the rest of that send and every later frame move to a backlog drained by a writer task.
The backlog is bounded three ways, and a member past any bound is slow and closed with 4008: more
than `outbox_size` frames, more than `outbox_bytes` characters of frame text, or behind (a backlog
that never emptied) for more than `outbox_max_age` seconds. `offer` never awaits, so one stalled
client cannot hold up a fan-out.

This is what Python 3.12's eager tasks do for any coroutine; relay targets 3.11 too, and needs only
this one case. It relies on `send` not depending on which task runs it, which holds for every
uvicorn WebSocket implementation (they await only futures and events).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

from service import metrics, transport
from service.protocol import CloseCode

Message = dict[str, Any]
Send = Callable[[Message], Coroutine[Any, Any, None]]  # ASGI send: an async function

_DONE = object()


class State(enum.Enum):
    OPEN = "open"
    CLOSING = "closing"  # we sent a close, or are about to
    CLOSED = "closed"  # the client is gone


def _step(coro: Coroutine[Any, Any, None]) -> Any:
    """Run `coro` until it first suspends; returns what it yielded, or _DONE if it finished."""
    try:
        return coro.send(None)
    except StopIteration:
        return _DONE


async def _finish(coro: Coroutine[Any, Any, None], yielded: Any) -> None:
    """Run a coroutine that `_step` started to completion inside the current task, as a Task would:
    wait for what it yielded, then resume it, until it returns."""
    while True:
        # The coroutine reads the future's exception itself when it resumes: ignore it here.
        with contextlib.suppress(Exception):
            try:
                if yielded is None:
                    await asyncio.sleep(0)  # a bare yield asks for one trip round the loop
                else:
                    # The inner await marked the future as awaited; clear it as Task.__step does,
                    # or awaiting it again here fails with "await wasn't used with future".
                    yielded._asyncio_future_blocking = False
                    await yielded
            except asyncio.CancelledError:
                coro.close()
                raise
        try:
            yielded = coro.send(None)
        except StopIteration:
            return


class Connection:
    """One WebSocket's outgoing side plus the bookkeeping the hub and the endpoint share."""

    __slots__ = (
        "_backlog",
        "_backlog_bytes",
        "_behind_since",
        "_closer",
        "_outbox_bytes",
        "_outbox_max_age",
        "_outbox_size",
        "_wire",
        "_writer",
        "claims",
        "close_code",
        "closed_at",
        "frames_in",
        "frames_out",
        "groups",
        "id",
        "opened_at",
        "send",
        "state",
        "sub",
        "v1",
    )

    def __init__(
        self,
        conn_id: str,
        send: Send,
        *,
        outbox_size: int,
        outbox_bytes: int = 1 << 62,
        outbox_max_age: float = float("inf"),
        v1: bool = False,
        sub: str | None = None,
        claims: dict[str, Any] | None = None,
    ) -> None:
        self.id = conn_id
        self.sub = sub  # the token's user, for the server API's commands by user
        self.claims = claims or {}  # the token's claims, for the ones presence shows
        self.v1 = v1  # speaks protocol v1: group messages say their group
        self.state = State.OPEN
        self.groups: set[str] = set()  # broker channels this connection is a member of
        self.close_code: int | None = None
        self.frames_in = 0
        self.frames_out = 0
        self.opened_at = time.monotonic()
        self.closed_at: float | None = None  # monotonic time relay closed it or saw it go
        self.send = send
        self._wire = transport.prepared(send)  # uvicorn's protocol, to write prepared frames to
        self._outbox_size = outbox_size
        self._outbox_bytes = outbox_bytes
        self._outbox_max_age = outbox_max_age
        self._backlog: deque[str] | None = None  # not None while a writer task owns the socket
        self._backlog_bytes = 0
        self._behind_since = 0.0  # monotonic time the current backlog started
        self._writer: asyncio.Task[None] | None = None
        self._closer: asyncio.Task[None] | None = None

    def offer(self, frame: str) -> bool:
        """Hand `frame` to the socket without waiting. False when it was dropped (and counted)."""
        backlog = self._backlog
        if backlog is None:
            if self.state is not State.OPEN:
                metrics.SEND_QUEUE_DROPPED.labels("closed").inc()
                return False
            wire = self._wire
            try:
                if wire is not None and transport.write_text(wire, frame):
                    self.frames_out += 1  # the frame was built once for every member: written
                    return True
                coro = self.send({"type": "websocket.send", "text": frame})
                yielded = _step(coro)
            except Exception:
                self.gone()
                metrics.SEND_QUEUE_DROPPED.labels("closed").inc()
                return False
            self.frames_out += 1
            if yielded is not _DONE:
                metrics.SEND_BACKLOGGED.inc()
                self._backlog = deque()
                self._backlog_bytes = len(frame)  # the frame in flight is held until written
                self._behind_since = time.monotonic()
                self._writer = asyncio.get_running_loop().create_task(
                    self._write_backlog(coro, yielded, len(frame))
                )
            return True
        size = self._backlog_bytes + len(frame)
        if (
            len(backlog) >= self._outbox_size
            or size > self._outbox_bytes
            or time.monotonic() - self._behind_since > self._outbox_max_age
        ):
            metrics.SLOW_CONSUMER_DISCONNECTS.inc()
            metrics.SEND_QUEUE_DROPPED.labels("slow_consumer").inc(len(backlog) + 1)
            backlog.clear()
            self.close(CloseCode.SLOW_CONSUMER, "slow consumer")
            return False
        backlog.append(frame)
        self._backlog_bytes = size
        self.frames_out += 1
        return True

    @property
    def backlog(self) -> int:
        """Frames waiting for the writer task (0 while the socket keeps up)."""
        return len(self._backlog) if self._backlog is not None else 0

    async def _write_backlog(self, coro: Coroutine[Any, Any, None], yielded: Any, size: int) -> None:
        """Finish the send that stalled (`size` characters), then write the backlog in order. A frame
        counts against `outbox_bytes` until it is written."""
        try:
            await _finish(coro, yielded)
            self._backlog_bytes -= size
            while self._backlog:
                frame = self._backlog.popleft()
                await self.send({"type": "websocket.send", "text": frame})
                self._backlog_bytes -= len(frame)
        except Exception:
            self.gone()
            return
        self._backlog = None
        self._backlog_bytes = 0
        self._writer = None

    def close(self, code: int, reason: str = "") -> None:
        """Close with `code` now: drop the backlog and send the close frame. Idempotent.

        A socket too stalled to take even the close frame is cut by the pod's reaper once
        `closed_at` is RELAY_CLOSE_TIMEOUT old (service/pod.py)."""
        if self.state is not State.OPEN:
            return
        self.state = State.CLOSING
        self.close_code = code
        self.closed_at = time.monotonic()
        self._stop_writer()
        coro = self.send({"type": "websocket.close", "code": code, "reason": reason})
        try:
            yielded = _step(coro)
        except Exception:
            self.state = State.CLOSED
            return
        if yielded is not _DONE:
            self._closer = asyncio.get_running_loop().create_task(self._finish_close(coro, yielded))

    async def _finish_close(self, coro: Coroutine[Any, Any, None], yielded: Any) -> None:
        try:
            # A failed close means the client went away first (or was cut): the endpoint sees the
            # disconnect either way.
            with contextlib.suppress(Exception):
                await _finish(coro, yielded)
        finally:
            self._closer = None

    def gone(self) -> None:
        """The client is gone (disconnect received or a send failed): stop writing."""
        if self.closed_at is None:
            self.closed_at = time.monotonic()
        self.state = State.CLOSED
        self._stop_writer()
        if self._closer is not None:
            self._closer.cancel()

    def _stop_writer(self) -> None:
        if self._backlog:
            metrics.SEND_QUEUE_DROPPED.labels("closed").inc(len(self._backlog))
        self._backlog = None
        self._backlog_bytes = 0
        if self._writer is not None:
            self._writer.cancel()
            self._writer = None

"""The WebSocket endpoint: accept, admit, join the path's group, read frames, leave. No business rules.

A bare ASGI callable rather than a Starlette `WebSocket` handler: it keeps uvicorn's own `send`
(no wrapper coroutine per frame), which `Connection.offer` drives directly, and reading raw ASGI
events costs less per frame. It is served behind `app.PublicApp`, which routes plain HTTP to
Starlette.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog

from service import metrics, protocol
from service.broker import BrokerUnavailable
from service.channels import new_connection_id
from service.connection import Connection
from service.limits import TokenBucket
from service.pod import Pod
from service.protocol import CloseCode, Rejected, SendToGroup

log = structlog.get_logger("relay.socket")

Scope = dict[str, Any]
Receive = Any
Send = Any

KNOWN_CODES = frozenset(range(1000, 1016)) | frozenset(int(c) for c in CloseCode)


def code_label(code: int) -> str:
    """A bounded label value for a close code: clients may send any of thousands."""
    return str(code) if code in KNOWN_CODES else "other"


class Endpoint:
    """The ASGI app for every WebSocket path (the seed contract: the path names the group)."""

    def __init__(self, pod: Pod) -> None:
        self._pod = pod
        self._hub = pod.hub
        self._settings = pod.settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        # Accept first, then close with a code: a close before accept reaches the client as a bare 403.
        await send({"type": "websocket.accept"})
        group = protocol.group_from_path(scope["path"])
        refusal = "invalid_group" if group is None else self._pod.refusal()
        if refusal is not None or group is None:
            metrics.CONNECTIONS_REJECTED.labels(refusal).inc()
            code = {
                "invalid_group": CloseCode.BAD_GROUP_NAME,
                "capacity": CloseCode.TRY_AGAIN_LATER,
                "draining": CloseCode.SERVICE_RESTART,
            }[refusal or "invalid_group"]
            await send({"type": "websocket.close", "code": code, "reason": refusal or ""})
            return
        task = asyncio.current_task()
        assert task is not None
        abandoned = False

        def abandon() -> None:  # the socket would not even take its close frame: stop reading it
            nonlocal abandoned
            abandoned = True
            task.cancel()

        conn = Connection(
            new_connection_id(self._hub.pod_id),
            send,
            outbox_size=self._settings.outbox_size,
            close_timeout=self._settings.close_timeout,
            on_stuck=abandon,
        )
        client_code = 1006
        try:
            self._hub.register(conn)
            await self._hub.join(conn, group)
            metrics.CONNECTIONS_OPENED.inc()
            conn.offer(protocol.welcome(conn.id))
            client_code = await self._read(conn, receive)
        except asyncio.CancelledError:
            if not abandoned:
                raise
            task.uncancel()
        finally:
            conn.gone()
            await self._hub.disconnect(conn)
            final_code = conn.close_code or client_code
            metrics.DISCONNECTS.labels(code_label(final_code)).inc()
            log.info(
                "socket.closed",
                conn_id=conn.id,
                group=group,
                code=int(final_code),
                by="server" if conn.close_code else "client",
                duration=round(time.monotonic() - conn.opened_at, 3),
                frames_in=conn.frames_in,
                frames_out=conn.frames_out,
            )

    async def _read(self, conn: Connection, receive: Receive) -> int:
        """Read client frames until the socket closes; returns the close code the client gave."""
        bucket = TokenBucket(self._settings.publish_rate, self._settings.publish_burst, time.monotonic())
        while True:
            event = await receive()
            if event["type"] != "websocket.receive":
                code = int(event.get("code", 1005))
                if code == CloseCode.MESSAGE_TOO_BIG:  # uvicorn enforces RELAY_MAX_FRAME_BYTES itself
                    metrics.MESSAGES_RECEIVED.labels("too_large").inc()
                    conn.close_code = code
                return code
            conn.frames_in += 1
            text = event.get("text")
            if text is None:
                metrics.MESSAGES_RECEIVED.labels("binary").inc()
                continue
            command = protocol.decode(text)
            if isinstance(command, Rejected):
                metrics.MESSAGES_RECEIVED.labels(command.reason).inc()
                continue
            if not bucket.take(time.monotonic()):
                metrics.MESSAGES_RECEIVED.labels("rate_limited").inc()
                conn.close(CloseCode.RATE_LIMITED, "publish rate exceeded")
                continue  # the close arrives as a disconnect event
            try:
                if isinstance(command, SendToGroup):
                    await self._hub.publish(command.group, command.frame)
                    metrics.MESSAGES_RECEIVED.labels("published").inc()
                else:
                    await self._hub.send_direct(command.channel_id, command.frame)
                    metrics.MESSAGES_RECEIVED.labels("direct").inc()
            except BrokerUnavailable:
                metrics.MESSAGES_RECEIVED.labels("broker_error").inc()
                metrics.PUBLISH_FAILURES.inc()

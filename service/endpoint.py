"""The WebSocket endpoint: accept, admit, join the path's group, read frames, leave. No business rules
beyond asking `auth` and the quotas.

A bare ASGI callable rather than a Starlette `WebSocket` handler: it keeps uvicorn's own `send`
(no wrapper coroutine per frame), which `Connection.offer` drives directly, and reading raw ASGI
events costs less per frame. It is served behind `app.PublicApp`, which routes plain HTTP to
Starlette.

Compatibility rule: a client that offers no `relay.v1` subprotocol and sends no `ref` sees exactly
the seed protocol (bad frames silently ignored). Replies (`ack`, `error`) go to v1 clients and to any
frame that carries a `ref`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import structlog

from service import metrics, protocol, timers, transport
from service.auth import AuthError, Identity, origin_allowed, origin_of, token_from
from service.broker import BrokerUnavailable, Position
from service.channels import new_connection_id
from service.connection import Connection
from service.hub import Joined, TooManyGroups
from service.limits import TokenBucket
from service.logs import exception_summary
from service.pod import Pod
from service.presence import PresenceOff
from service.protocol import (
    SUBPROTOCOL,
    CloseCode,
    Command,
    ErrorCode,
    Join,
    Leave,
    PresenceQuery,
    Rejected,
    SendToChannel,
    SendToGroup,
)

log = structlog.get_logger("relay.socket")

Scope = dict[str, Any]
Receive = Any
Send = Any

KNOWN_CODES = frozenset(range(1000, 1016)) | frozenset(int(c) for c in CloseCode)

# Refusal reason (a metric label) -> the close code the client sees.
REFUSALS: dict[str, CloseCode] = {
    "origin": CloseCode.POLICY_VIOLATION,
    "invalid_group": CloseCode.BAD_GROUP_NAME,
    "draining": CloseCode.SERVICE_RESTART,
    "capacity": CloseCode.TRY_AGAIN_LATER,
    "unauthorized": CloseCode.UNAUTHORIZED,
    "token_expired": CloseCode.TOKEN_EXPIRED,
    "forbidden": CloseCode.FORBIDDEN,
    "connect_rate": CloseCode.TRY_AGAIN_LATER,
    "user_connect_rate": CloseCode.TRY_AGAIN_LATER,
    "user_connections": CloseCode.TOO_MANY_CONNECTIONS,
    "broker": CloseCode.TRY_AGAIN_LATER,
    "revoked": CloseCode.REVOKED,
}

DETAILS: dict[str, str] = {
    "bad_json": "the frame is not JSON",
    "not_object": "the frame is not a JSON object",
    "unknown_task": "unknown task",
    "invalid_group": "group_name must be 1-99 of A-Za-z0-9 . _ -",
    "invalid_channel": "channel_id is not a channel id",
    "bad_ref": "ref must be a string of up to 64 characters or an integer",
    "bad_since": 'since must be {"epoch": <string>, "offset": <integer >= 0>}',
}


def code_label(code: int) -> str:
    """A bounded label value for a close code: clients may send any of thousands."""
    return str(code) if code in KNOWN_CODES else "other"


metrics.export_at_zero(metrics.DISCONNECTS, [*map(str, sorted(KNOWN_CODES)), "other"])


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: str
    detail: str


class Endpoint:
    """The ASGI app for every WebSocket path (the seed contract: the path names the group)."""

    def __init__(self, pod: Pod) -> None:
        self._pod = pod
        self._hub = pod.hub
        self._settings = pod.settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        v1 = SUBPROTOCOL in scope.get("subprotocols", ())
        # Accept first, then close with a code: a close before accept reaches the client as a bare 403.
        await send({"type": "websocket.accept", "subprotocol": SUBPROTOCOL if v1 else None})
        try:
            admitted = self._admit(scope, v1)
        except Exception as exc:  # a bug in relay, not the client's fault: 1011, and a log line that
            # names the error and where, without its message or locals (they may hold the token).
            metrics.CONNECTIONS_REJECTED.labels("internal_error").inc()
            log.error("socket.admit_failed", **exception_summary(exc))
            await send(
                {"type": "websocket.close", "code": CloseCode.INTERNAL_ERROR, "reason": "internal error"}
            )
            return
        if isinstance(admitted, Refusal):
            metrics.CONNECTIONS_REJECTED.labels(admitted.reason).inc()
            code = REFUSALS[admitted.reason]
            await send({"type": "websocket.close", "code": code, "reason": admitted.detail})
            return
        identity, group = admitted
        # The handshake is over: neither relay nor uvicorn reads the scope again. Dropping it here
        # and in uvicorn's protocol saves a few KB per idle socket (docs/performance.md).
        del scope
        transport.shed(send)
        try:
            await self._serve(receive, send, identity, group, v1)
        finally:
            self._pod.quotas.release(identity.sub)

    def _admit(self, scope: Scope, v1: bool) -> tuple[Identity, str | None] | Refusal:
        """Everything that may refuse a new socket, cheapest first."""
        pod = self._pod
        if not origin_allowed(origin_of(scope), pod.allowed_origins):
            return Refusal("origin", "origin not allowed")
        group = protocol.group_from_path(scope["path"])
        if group is None and not (v1 and scope["path"] == "/"):  # v1 clients may start in no group
            return Refusal("invalid_group", "invalid group name in path")
        refusal = pod.refusal()
        if refusal is not None:
            return Refusal(refusal, {"draining": "service restart", "capacity": "pod full"}[refusal])
        try:
            identity = pod.auth.authenticate(token_from(scope))
        except AuthError as exc:
            reason = "token_expired" if exc.code == CloseCode.TOKEN_EXPIRED else "unauthorized"
            return Refusal(reason, exc.reason)
        if group is not None and not identity.may_join(group):
            return Refusal("forbidden", "token does not allow this group")
        quota = pod.quotas.admit(identity.sub, time.monotonic())
        if quota is not None:
            return Refusal(quota, quota.replace("_", " ") + " limit")
        return identity, group

    async def _serve(
        self, receive: Receive, send: Send, identity: Identity, group: str | None, v1: bool
    ) -> None:
        s = self._settings
        conn = Connection(
            new_connection_id(self._hub.pod_id),
            send,
            outbox_size=s.outbox_size,
            outbox_bytes=s.outbox_bytes,
            outbox_max_age=s.outbox_max_age or float("inf"),
            v1=v1,
            sub=identity.sub,
            claims={k: v for k, v in identity.claims.items() if k in self._pod.rules.claims_shown},
        )
        expiry = None
        if identity.expires_at is not None:  # on the loop's one timer for many deadlines, not a timer each
            delay = max(0.0, identity.expires_at - time.time())
            expiry = timers.wheel(asyncio.get_running_loop()).call_later(delay, _expire, conn)
        client_code = 1006
        try:
            self._hub.register(conn)
            # Asked once registered: a revocation recorded after this check is published after it
            # too, so the disconnect that follows it finds this socket (service/revocations.py).
            if await self._pod.revocations.refused(identity):
                metrics.CONNECTIONS_REJECTED.labels("revoked").inc()
                conn.close(CloseCode.REVOKED, "access revoked")
                return
            # Built where it is sent: a local would live in this frame as long as the socket.
            if group is not None:  # the welcome goes out once the join took effect, before anything else
                await self._hub.join(
                    conn, group, on_joined=lambda joined: conn.offer(protocol.welcome(conn.id))
                )
            else:
                conn.offer(protocol.welcome(conn.id))
            metrics.CONNECTIONS_OPENED.inc()
            client_code = await self._read(conn, receive, identity)
        except BrokerUnavailable:  # the path group could not be subscribed
            metrics.CONNECTIONS_REJECTED.labels("broker").inc()
            conn.close(CloseCode.TRY_AGAIN_LATER, "broker unavailable")
        finally:
            if expiry is not None:
                expiry.cancel()
            conn.gone()
            try:
                await self._hub.leave_all(conn)
                await self._until_gone(send)
            finally:
                self._hub.unregister(conn)
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

    async def _until_gone(self, send: Send) -> None:
        """Hold the socket's place in the caps until uvicorn has released it. A peer that will not
        finish the close is cut by the pod's reaper after RELAY_CLOSE_TIMEOUT; the cap on this wait
        only guards against a server that never reports the socket gone."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + 2 * self._settings.close_timeout + 1.0
        pause = 0.001
        while not transport.gone(send) and loop.time() < give_up:
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.1)

    async def _read(self, conn: Connection, receive: Receive, identity: Identity) -> int:
        """Read client frames until the socket closes; returns the close code the client gave.

        Every frame, ignored ones included, spends a token of the connection's and the pod's
        budgets (publishes also the user's). Over budget, by default the frame waits for its token
        while the socket is not read, so TCP slows the client down and nothing is lost; with
        RELAY_RATE_LIMIT_ACTION=reject, v1 clients get `rate_limited` and seed clients 4029."""
        bucket = TokenBucket(self._settings.publish_rate, self._settings.publish_burst, time.monotonic())
        quotas = self._pod.quotas
        delay = self._settings.rate_limit_action == "delay"
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
            command = protocol.decode(text) if text is not None else None  # None: a binary frame
            ref = command.ref if command is not None else None
            answered = conn.v1 or ref is not None
            publishes = isinstance(command, SendToGroup | SendToChannel)
            now = time.monotonic()
            if delay:
                wait = max(bucket.reserve(now), quotas.reserve(identity.sub, publishes, now))
                if wait > 0:
                    metrics.FRAMES_DELAYED.inc()
                    metrics.FRAME_DELAY_SECONDS.inc(wait)
                    await asyncio.sleep(wait)  # uvicorn stops reading the socket meanwhile
            elif not (bucket.take(now) and quotas.allow(identity.sub, publishes, now)):
                metrics.MESSAGES_RECEIVED.labels("rate_limited").inc()
                if answered:
                    conn.offer(protocol.error("rate_limited", "slow down", ref))
                else:
                    conn.close(CloseCode.RATE_LIMITED, "publish rate exceeded")
                continue  # a close arrives as a disconnect event
            if command is None:
                metrics.MESSAGES_RECEIVED.labels("binary").inc()
                if conn.v1:
                    conn.offer(protocol.error("bad_json", "binary frames are not supported"))
                continue
            if isinstance(command, Rejected):
                metrics.MESSAGES_RECEIVED.labels(command.reason).inc()
                if answered:
                    conn.offer(protocol.error(command.reason, DETAILS[command.reason], ref))
                continue
            outcome, result = await self._execute(conn, command, identity, answered)
            metrics.MESSAGES_RECEIVED.labels(outcome).inc()
            if answered and result is not None:
                if isinstance(result, dict):
                    conn.offer(protocol.ack(ref, **result))
                else:
                    conn.offer(protocol.error(result[0], result[1], ref))

    async def _execute(
        self, conn: Connection, command: Command, identity: Identity, answered: bool
    ) -> tuple[str, dict[str, object] | tuple[ErrorCode, str] | None]:
        """Carry out one command: (metric outcome, what the ack says, or (error code, detail), or
        None when it was answered already)."""
        hub = self._hub
        try:
            if isinstance(command, SendToGroup):
                if not identity.may_publish(command.group):
                    return "forbidden", ("forbidden", "token does not allow publishing to this group")
                published = await hub.publish(command.group, command.frame, command.key)
                return "published", _position(published.position)
            if isinstance(command, SendToChannel):
                if not identity.direct:
                    return "forbidden", ("forbidden", "token does not allow direct sends")
                if await hub.send_direct(command.channel_id, command.frame) == 0:
                    return "unknown_channel", ("unknown_channel", "no pod holds that channel id")
                return "direct", {}
            if isinstance(command, Join):
                if not identity.may_join(command.group):
                    return "forbidden", ("forbidden", "token does not allow this group")
                ref = command.ref

                def acknowledge(joined: Joined) -> None:  # before any message of the group
                    if answered:
                        details = _position(joined.position)
                        if joined.recovered is not None:
                            details["recovered"] = joined.recovered
                            if joined.reason is not None:
                                details["reason"] = joined.reason
                        conn.offer(protocol.ack(ref, **details))

                await hub.join(conn, command.group, command.since, acknowledge)
                return "joined", None
            if isinstance(command, PresenceQuery):
                if not identity.may_join(command.group):
                    return "forbidden", ("forbidden", "token does not allow this group")
                return "presence", {"presence": await self._pod.presence.read(command.group)}
            assert isinstance(command, Leave)
            await hub.leave(conn, command.group)
            return "left", {}
        except PresenceOff:
            return "presence_off", (
                "presence_off",
                "the group keeps no presence (no presence rule matches it)",
            )
        except TooManyGroups as exc:
            return "too_many_groups", ("too_many_groups", str(exc))
        except BrokerUnavailable:
            metrics.PUBLISH_FAILURES.inc()
            return "broker_error", ("broker_unavailable", "the broker is unreachable; retry later")


def _expire(conn: Connection) -> None:
    conn.close(CloseCode.TOKEN_EXPIRED, "token expired")


def _position(position: Position | None) -> dict[str, object]:
    """The ack fields for a group's position (none for a group without history)."""
    return {} if position is None else {"epoch": position.epoch, "offset": position.offset}

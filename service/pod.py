"""The pod: owns the broker link and the hub, decides admission and readiness, and drains.

Drain order (SIGTERM, or `/drain` from the preStop hook): turn unready, wait `drain_delay` for the
Service endpoints to drop this pod, close sockets with 1012 in jittered batches spread over
`drain_window` (never all at once: that is a reconnect stampede on the other pods), wait for them
to go, then close the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from typing import Literal

import structlog

from service import metrics, transport
from service.auth import Authenticator
from service.broker import Broker
from service.commands import Commands
from service.config import Settings, split
from service.control import Control
from service.hub import Hub
from service.limits import Quotas
from service.presence import Presence
from service.protocol import CloseCode
from service.revocations import Revocations
from service.rules import GroupRules

log = structlog.get_logger("relay.pod")

Refusal = Literal["draining", "capacity"]
BATCH_INTERVAL = 0.05  # seconds between drain batches at most; fewer sockets mean fewer batches


class Pod:
    """One relay process: what the public endpoint and the internal HTTP routes share."""

    def __init__(self, settings: Settings, broker: Broker, rules: GroupRules | None = None) -> None:
        self.settings = settings
        self.broker = broker
        self.rules = rules if rules is not None else GroupRules.load(settings.group_rules_file)
        self.presence = Presence(broker, self.rules, settings)
        self.hub = Hub(
            broker, settings.pod_id, max_groups=settings.max_groups, rules=self.rules, presence=self.presence
        )
        self.auth = Authenticator(settings)  # reads key files now: a bad one stops start-up
        self.allowed_origins = split(settings.allowed_origins)
        self.quotas = Quotas(
            connect_rate=settings.connect_rate,
            frame_rate=settings.pod_publish_rate,
            user_max_connections=settings.user_max_connections,
            user_connect_rate=settings.user_connect_rate,
            user_publish_rate=settings.user_publish_rate,
            now=time.monotonic(),
        )
        self.revocations = Revocations(broker)
        commands = Commands(self.hub, self.revocations, self.info)
        self.control = Control(broker, self.hub, settings.pod_id, commands)
        self.draining = False
        self.stopped = asyncio.Event()  # set once the drain is over: the servers exit
        self._run: asyncio.Task[None] | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._stopping = False  # stop() has begun: the pod's tasks end on purpose
        self._drain: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.hub.start()
        await self.control.start()
        self.presence.start()
        loop = asyncio.get_running_loop()
        self._run = loop.create_task(self.hub.run(), name="hub.run")
        self._reaper = loop.create_task(self._reap(), name="pod.reaper")
        for task in (self._run, self._reaper):
            task.add_done_callback(self._task_ended)

    def _task_ended(self, task: asyncio.Task[None]) -> None:
        if self._stopping:
            return  # the pod is stopping: these end with it
        error = None if task.cancelled() else task.exception()
        log.error("pod.task_stopped", task=task.get_name(), error=type(error).__name__ if error else None)

    async def _reap(self) -> None:
        """Cut (TCP reset) every socket that has been closing for longer than RELAY_CLOSE_TIMEOUT.

        A peer that stops reading never takes a close frame, and uvicorn's `transport.close()`
        waits for a write buffer that never drains: without this such a socket stays ESTABLISHED
        with full buffers for as long as the peer likes. Closing starts when relay closes the
        socket, the client goes, or uvicorn closes it itself (a keepalive timeout, for one); the
        socket keeps counting against the caps until it is really gone (the endpoint waits)."""
        timeout = self.settings.close_timeout
        while True:
            await asyncio.sleep(max(0.05, timeout / 4))
            now = time.monotonic()
            for conn in self.hub.connections:
                if conn.closed_at is None:
                    if not transport.closing(conn.send):
                        continue
                    conn.closed_at = now
                if now - conn.closed_at >= timeout and not transport.gone(conn.send):
                    metrics.SOCKETS_CUT.inc()
                    log.warning("socket.cut", conn_id=conn.id, closing_for=round(now - conn.closed_at, 3))
                    transport.abort(conn.send)

    def refusal(self) -> Refusal | None:
        """Why a new socket must be turned away now, or None to admit it."""
        if self.draining:
            return "draining"
        if self.hub.connection_count() >= self.settings.max_connections:
            return "capacity"
        return None

    def liveness(self) -> dict[str, bool]:
        """Each liveness check by name: the tasks that carry messages must still be running (the
        event loop answering is implied by the question being answered at all)."""
        stopping = self._stopping or self._drain is not None
        return {
            "delivery": stopping or (self._run is not None and not self._run.done()),
            "reaper": stopping or (self._reaper is not None and not self._reaper.done()),
            "broker": self.broker.alive,
        }

    def readiness(self) -> dict[str, bool]:
        """Each readiness check by name; the pod is ready when all are true."""
        limit = self.settings.max_connections * self.settings.ready_connection_ratio
        return {
            "not_draining": not self.draining,
            "below_connection_limit": self.hub.connection_count() < limit,
            "broker": self.broker.ready or not self.settings.ready_requires_broker,
        }

    def info(self) -> dict[str, object]:
        """What the server API's `info` says about this pod."""
        return {
            "connections": self.hub.connection_count(),
            "groups": self.hub.group_count(),
            "draining": self.draining,
            "ready": all(self.readiness().values()),
            "max_connections": self.settings.max_connections,
        }

    def drain(self) -> asyncio.Task[None]:
        """Start draining (idempotent); the task finishes when the pod has stopped."""
        if self._drain is None:
            # Marked here, not in the task: a second SIGTERM handled in this same loop turn, before
            # the task first runs, must see the drain under way (and force the exit), and no socket
            # may be admitted meanwhile.
            self.draining = True
            metrics.DRAINING.set(1)
            log.info("pod.draining", connections=self.hub.connection_count(), delay=self.settings.drain_delay)
            self._drain = asyncio.get_running_loop().create_task(self._drain_and_stop(), name="pod.drain")
        return self._drain

    async def _drain_and_stop(self) -> None:
        try:
            await asyncio.sleep(self.settings.drain_delay)
            closed = await self.close_all(CloseCode.SERVICE_RESTART, self.settings.drain_window)
            await self._wait_for_sockets(self.settings.close_timeout * 1.25 + 1.0)
            log.info("pod.drained", closed=closed, remaining=self.hub.connection_count())
        finally:
            await self.stop()

    async def close_all(self, code: CloseCode, window: float) -> int:
        """Close every socket with `code`, in random order, spread over about `window` seconds."""
        conns = self.hub.connections
        random.shuffle(conns)
        if not conns:
            return 0
        batches = max(1, min(len(conns), math.ceil(window / BATCH_INTERVAL)))
        size = math.ceil(len(conns) / batches)
        interval = window / batches
        for start in range(0, len(conns), size):
            for conn in conns[start : start + size]:
                conn.close(code, "service restart")
            if start + size < len(conns):
                await asyncio.sleep(interval * random.uniform(0.5, 1.5))
        return len(conns)

    async def _wait_for_sockets(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.hub.empty.wait(), timeout)

    async def stop(self) -> None:
        """Close the broker (ending hub.run) and tell the servers to exit. Idempotent."""
        if self.stopped.is_set():
            return
        self._stopping = True
        if self._reaper is not None:
            self._reaper.cancel()
        # Whatever presence this pod still holds goes at once, not at the TTL (docs/presence.md).
        await self.presence.stop(self.settings.redis_timeout)
        await self.broker.close()
        if self._run is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._run, timeout=5)
        self.stopped.set()

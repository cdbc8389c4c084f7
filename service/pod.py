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

from service import metrics
from service.auth import Authenticator
from service.broker import Broker
from service.config import Settings, split
from service.hub import Hub
from service.limits import Quotas
from service.protocol import CloseCode

log = structlog.get_logger("relay.pod")

Refusal = Literal["draining", "capacity"]
BATCH_INTERVAL = 0.05  # seconds between drain batches at most; fewer sockets mean fewer batches


class Pod:
    """One relay process: what the public endpoint and the internal HTTP routes share."""

    def __init__(self, settings: Settings, broker: Broker) -> None:
        self.settings = settings
        self.broker = broker
        self.hub = Hub(broker, settings.pod_id, max_groups=settings.max_groups)
        self.auth = Authenticator(settings)  # reads key files now: a bad one stops start-up
        self.allowed_origins = split(settings.allowed_origins)
        self.quotas = Quotas(
            connect_rate=settings.connect_rate,
            publish_rate=settings.pod_publish_rate,
            user_max_connections=settings.user_max_connections,
            user_connect_rate=settings.user_connect_rate,
            user_publish_rate=settings.user_publish_rate,
            now=time.monotonic(),
        )
        self.draining = False
        self.stopped = asyncio.Event()  # set once the drain is over: the servers exit
        self._run: asyncio.Task[None] | None = None
        self._drain: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.hub.start()
        self._run = asyncio.get_running_loop().create_task(self.hub.run(), name="hub.run")

    def refusal(self) -> Refusal | None:
        """Why a new socket must be turned away now, or None to admit it."""
        if self.draining:
            return "draining"
        if self.hub.connection_count() >= self.settings.max_connections:
            return "capacity"
        return None

    def readiness(self) -> dict[str, bool]:
        """Each readiness check by name; the pod is ready when all are true."""
        limit = self.settings.max_connections * self.settings.ready_connection_ratio
        return {
            "not_draining": not self.draining,
            "below_connection_limit": self.hub.connection_count() < limit,
            "broker": self.broker.ready or not self.settings.ready_requires_broker,
        }

    def drain(self) -> asyncio.Task[None]:
        """Start draining (idempotent); the task finishes when the pod has stopped."""
        if self._drain is None:
            self._drain = asyncio.get_running_loop().create_task(self._drain_and_stop(), name="pod.drain")
        return self._drain

    async def _drain_and_stop(self) -> None:
        self.draining = True
        metrics.DRAINING.set(1)
        log.info("pod.draining", connections=self.hub.connection_count(), delay=self.settings.drain_delay)
        try:
            await asyncio.sleep(self.settings.drain_delay)
            closed = await self.close_all(CloseCode.SERVICE_RESTART, self.settings.drain_window)
            await self._wait_for_sockets(self.settings.close_timeout + 1.0)
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
        await self.broker.close()
        if self._run is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._run, timeout=5)
        self.stopped.set()

"""Nothing lost across deploys: three pod processes on one Redis, v1 clients spread over them, a
backend publishing at a steady rate; every pod is replaced in turn, drained (SIGTERM) or killed
(SIGKILL). Each client reconnects to another pod, rejoins from its last position and recovers: every
client receives every message exactly once, in order.

The clients are relay's own (service/client.py, reconnect=True, with the three pods' URLs standing
in for the Service); the backend publishes through the publish API with an idempotency key per
message and retries on another pod when one refuses, as a backend behind a Service would.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from service.client import Delivery, RelayClient
from tests.helpers import PodProcess, free_port, start_pod_process
from tests.redis_servers import RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("rolling-deploy")]

GROUP = "deploy.orders"
RULES = '[[group]]\nmatch = "deploy.*"\nhistory = 10000\nttl = 300\n'
CLIENTS = 6
RATE = 40.0  # messages per second from the backend


@dataclass
class Cluster:
    """Three pod slots on fixed ports, so a replaced pod comes back where the clients look."""

    redis: RedisServer
    directory: Path
    ports: list[tuple[int, int]]
    pods: list[PodProcess | None] = field(default_factory=list)
    generation: itertools.count[int] = field(default_factory=itertools.count)

    def env(self, slot: int) -> dict[str, str]:
        rules = self.directory / "groups.toml"
        rules.write_text(RULES)
        return {
            "RELAY_BROKER_URL": self.redis.url,
            "RELAY_GROUP_RULES_FILE": str(rules),
            "RELAY_POD_ID": f"pod{slot}-{next(self.generation)}",
            "RELAY_PORT": str(self.ports[slot][0]),
            "RELAY_INTERNAL_PORT": str(self.ports[slot][1]),
            "RELAY_API_KEYS": "backend-key",
            "RELAY_DRAIN_DELAY": "0.3",
            "RELAY_DRAIN_WINDOW": "0.5",
            "RELAY_CLOSE_TIMEOUT": "1",
            "RELAY_REDIS_PROBE_INTERVAL": "0.5",
            "RELAY_REDIS_TIMEOUT": "1",
        }

    async def start(self, slot: int) -> None:
        log = self.directory / f"slot{slot}-{time.monotonic_ns()}.log"
        pod = await asyncio.to_thread(start_pod_process, self.env(slot), log_file=log)
        assert pod.proc.poll() is None, pod.wait()
        self.pods[slot] = pod

    async def replace(self, slot: int, how: signal.Signals) -> None:
        """Stop the pod in `slot` (drain or kill) and start its successor on the same ports."""
        pod = self.pods[slot]
        assert pod is not None
        pod.terminate(how)
        code = await asyncio.to_thread(pod.wait, 30)
        if how is signal.SIGTERM:
            assert code == 0, pod.output[-20:]
        self.pods[slot] = None
        await self.start(slot)

    def urls(self, first: int) -> list[str]:
        order = [(first + n) % len(self.ports) for n in range(len(self.ports))]
        return [f"ws://127.0.0.1:{self.ports[n][0]}/" for n in order]

    def api(self, slot: int) -> str:
        return f"http://127.0.0.1:{self.ports[slot][1]}/api/publish"


@pytest.fixture
async def cluster(dedicated_redis: RedisServer, tmp_path: Path) -> AsyncIterator[Cluster]:
    found = Cluster(dedicated_redis, tmp_path, [(free_port(), free_port()) for _ in range(3)])
    found.pods = [None, None, None]
    for slot in range(3):
        await found.start(slot)
    yield found
    for pod in found.pods:
        if pod is not None:
            pod.terminate(signal.SIGKILL)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(pod.wait, 10)


class Backend:
    """Publishes n = 1, 2, 3... at RATE through the publish API, each with its own idempotency key,
    retrying on the next pod until one accepts it: what a backend behind a Service does."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.accepted: dict[int, int] = {}  # n -> offset relay gave it
        self.retries = 0
        self._stop = asyncio.Event()

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=3) as http:
            slot = 0
            for n in itertools.count(1):
                if self._stop.is_set():
                    return
                key = secrets.token_urlsafe(9)
                body = {"group": GROUP, "message": {"n": n}, "idempotency_key": key}
                while True:
                    slot = (slot + 1) % 3
                    try:
                        response = await http.post(
                            self.cluster.api(slot), json=body, headers={"Authorization": "Bearer backend-key"}
                        )
                    except httpx.HTTPError:
                        response = None
                    if response is not None and response.status_code == 202:
                        self.accepted[n] = response.json()["offset"]
                        break
                    self.retries += 1
                    await asyncio.sleep(0.02)
                await asyncio.sleep(1 / RATE)

    def stop(self) -> None:
        self._stop.set()


async def collect(client: RelayClient, into: list[Delivery], arrived: asyncio.Event) -> None:
    while True:
        into.append(await client.receive())
        arrived.set()


async def run_deploy(cluster: Cluster, how: signal.Signals) -> None:
    clients = [
        # Clients wait 0.15-0.3 s before reconnecting, as clients spread their reconnects: messages
        # are published while every one of them is away.
        await RelayClient.connect(cluster.urls(n % 3), reconnect=True, timeout=5, backoff=(0.3, 2.0))
        for n in range(CLIENTS)
    ]
    for client in clients:
        await client.join(GROUP)
    received: list[list[Delivery]] = [[] for _ in clients]
    arrived = asyncio.Event()
    readers = [asyncio.create_task(collect(c, r, arrived)) for c, r in zip(clients, received, strict=True)]
    backend = Backend(cluster)
    publishing = asyncio.create_task(backend.run())
    try:
        for slot in range(3):
            await asyncio.sleep(0.5)  # traffic flows before each replacement: the subject is the deploy
            await cluster.replace(slot, how)
        await asyncio.sleep(0.5)
        backend.stop()
        await publishing
        total = max(backend.accepted)
        deadline = time.monotonic() + 15
        while any(len(r) < total for r in received) and time.monotonic() < deadline:
            arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(arrived.wait(), deadline - time.monotonic())
    finally:
        backend.stop()
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, publishing, return_exceptions=True)
        for client in clients:
            await client.close()
    expected = list(range(1, total + 1))
    offsets = [backend.accepted[n] for n in expected]
    assert offsets == sorted(offsets) and len(set(offsets)) == total  # each stored once, in order
    for n, deliveries in enumerate(received):
        got = [d.message["n"] for d in deliveries]
        assert got == expected, (
            f"client {n}: {len(got)} of {total}, first difference at {_first_gap(got, expected)}"
        )
    assert all(c.reconnects >= 1 for c in clients)  # every client lost its pod at least once
    print(f"{how.name}: {total} messages to {CLIENTS} clients, each exactly once, in order")
    print(f"backend retries: {backend.retries}; client reconnects: {[c.reconnects for c in clients]}")


def _first_gap(got: list[int], expected: list[int]) -> int | None:
    return next((i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b), None)


async def test_a_rolling_deploy_with_drains_loses_nothing(cluster: Cluster) -> None:
    await run_deploy(cluster, signal.SIGTERM)


async def test_a_rolling_deploy_with_killed_pods_loses_nothing(cluster: Cluster) -> None:
    await run_deploy(cluster, signal.SIGKILL)

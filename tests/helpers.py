"""Shared test helpers: real pods on free ports, real WebSocket clients, metric readers."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import websockets
from prometheus_client import REGISTRY
from websockets.asyncio.client import ClientConnection

from service.broker import Broker
from service.config import Settings
from service.limits import Quotas
from service.server import PodServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Small drain timings so tests finish fast; each test overrides what it checks.
FAST = {"drain_delay": 0.0, "drain_window": 0.2, "close_timeout": 1.0}


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"port": 0, "internal_port": 0, "log_format": "json", **FAST}
    values.update(overrides)
    return Settings(**values)


@asynccontextmanager
async def running_pod(broker: Broker | None = None, **overrides: Any) -> AsyncIterator[PodServer]:
    """A real pod (uvicorn on free loopback ports) inside the test's event loop."""
    server = PodServer(settings(**overrides), broker)
    await server.start()
    try:
        yield server
    finally:
        await server.shutdown()


def ws_url(server: PodServer | int, path: str = "/g") -> str:
    port = server if isinstance(server, int) else server.port
    return f"ws://127.0.0.1:{port}{path}"


@dataclass
class Client:
    """A seed-protocol client: the connection and the channel id it was given."""

    ws: ClientConnection
    channel_id: str

    async def publish(self, group: str, **fields: Any) -> dict[str, Any]:
        body = {"task": "send_message_to_group", "group_name": group, **fields}
        await self.ws.send(json.dumps(body))
        return body

    async def direct(self, channel_id: str, **fields: Any) -> dict[str, Any]:
        body = {"task": "send_message_to_channel", "channel_id": channel_id, **fields}
        await self.ws.send(json.dumps(body))
        return body

    async def next(self, timeout: float = 5.0) -> Any:
        return json.loads(await asyncio.wait_for(self.ws.recv(), timeout))

    async def nothing_before(self, marker: dict[str, Any], timeout: float = 5.0) -> None:
        """Assert the next frame is the `marker` just sent (what `publish` or `direct` returned), so
        nothing sent ahead of it reached this client. Sound only when whatever must not arrive would
        have travelled the marker's path ahead of it: one publisher's frames keep their order through
        a pod, through Redis and to every receiver, and a pod delivers its broker's messages in order.
        Prefer this to `nothing`: no fixed window to wait out, and no window too short to see a late frame."""
        frame = await self.next(timeout)
        if frame != {"message": marker}:
            raise AssertionError(f"unexpected frame before the marker: {frame!r}")

    async def nothing(self, within: float = 0.3) -> None:
        """Assert no frame arrives within `within` seconds (> 0: asyncio.wait_for with 0 never even
        starts the receive, so it cannot fail). Use `nothing_before` where a marker can be sent."""
        assert within > 0, "a zero window cannot see anything"
        try:
            frame = await asyncio.wait_for(self.ws.recv(), within)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected frame: {frame!r}")

    async def close_code(self, timeout: float = 5.0) -> int | None:
        """Wait for the server to close the socket; its close code."""
        try:
            while True:
                await asyncio.wait_for(self.ws.recv(), timeout)
        except websockets.ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd else None


async def closed_with(url: str, **options: Any) -> int | None:
    """Open a socket the pod is expected to refuse: the close code it sends after the handshake."""
    async with websockets.connect(url, open_timeout=5, **options) as ws:
        try:
            while True:
                await asyncio.wait_for(ws.recv(), 5)
        except websockets.ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd else None


async def join(url: str, **options: Any) -> Client:
    ws = await websockets.connect(url, open_timeout=5, **options)
    welcome = json.loads(await asyncio.wait_for(ws.recv(), 5))
    return Client(ws, welcome["message"]["channel_id"])


def metric(name: str, **labels: str) -> float:
    """The current value of an in-process metric sample (0 when never set)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def scrape(port: int, name: str, **labels: str) -> float:
    """A metric sample read over HTTP from a pod's /metrics (for pods in other processes)."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    return 0.0


def wait_until(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll `check()` until true (blocking: for tests that drive subprocesses); TimeoutError after
    `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    raise TimeoutError(f"gave up waiting for {what} after {timeout} s")


def http_status(url: str) -> int | None:
    """The status of GET `url`, or None while nothing answers."""
    try:
        return httpx.get(url, timeout=1).status_code
    except httpx.HTTPError:
        return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PodProcess:
    """`python -m service` in a subprocess: for signals, exit codes and start-up failures. Its
    output goes to a pipe read at the end, or to `log_file` for a pod that runs long (a pipe nobody
    reads would fill and stall it)."""

    proc: subprocess.Popen[str]
    port: int
    internal_port: int
    output: list[str] = field(default_factory=list)
    log_file: Path | None = None

    def terminate(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 20) -> int:
        out, _ = self.proc.communicate(timeout=timeout)
        if self.log_file is not None:
            out = self.log_file.read_text()
        self.output.extend(out.splitlines())
        return self.proc.returncode

    def logs(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.output if line.startswith("{")]


def start_pod_process(
    env: dict[str, str] | None = None, *args: str, log_file: Path | None = None
) -> PodProcess:
    """A pod process, once its /healthz answers (or it has exited). RELAY_PORT and
    RELAY_INTERNAL_PORT in `env` pick its ports, else free ones are used."""
    env = env or {}
    port = int(env.get("RELAY_PORT") or free_port())
    internal = int(env.get("RELAY_INTERNAL_PORT") or free_port())
    full_env = {
        **os.environ,
        "RELAY_LOG_FORMAT": "json",
        **env,
        "RELAY_PORT": str(port),
        "RELAY_INTERNAL_PORT": str(internal),
    }
    output = open(log_file, "w") if log_file is not None else subprocess.PIPE  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", *args],
        cwd=ROOT,
        env=full_env,
        stdout=output,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if log_file is not None:
        output.close()  # type: ignore[union-attr]  # the child has its own copy
    pod = PodProcess(proc, port, internal, log_file=log_file)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return pod
        try:
            if httpx.get(f"http://127.0.0.1:{internal}/healthz", timeout=1).status_code == 200:
                return pod
        except httpx.HTTPError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("pod process did not start within 20 s")


def idle_pod_metrics() -> str:
    """The /metrics text of a pod that has just started and done nothing (then stopped cleanly)."""
    pod = start_pod_process({"RELAY_DRAIN_DELAY": "0", "RELAY_DRAIN_WINDOW": "0.1"})
    try:
        return httpx.get(f"http://127.0.0.1:{pod.internal_port}/metrics", timeout=5).text
    finally:
        pod.terminate()
        assert pod.wait() == 0


def stalled_client(port: int, path: str = "/g") -> socket.socket:
    """A WebSocket client that completes the handshake and then never reads: a tiny receive
    buffer, set before connecting so the kernel cannot grow it, fills within a few frames."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def quotas(**kw: float) -> Quotas:
    """Per-user and per-pod limits, all off (0) unless given, on a clock that starts at 0."""
    values = {
        "connect_rate": 0.0,
        "frame_rate": 0.0,
        "user_max_connections": 0,
        "user_connect_rate": 0.0,
        "user_publish_rate": 0.0,
        **kw,
    }
    return Quotas(now=0.0, **values)  # type: ignore[arg-type]

"""Servers on loopback for load runs: redis-server, relay pods, the reference Django Channels app.

Each is a child process on free ports, owned by a `Servers` context manager that stops every one
of them (SIGTERM, then SIGKILL) however the run ends. Readers of /proc give each process's CPU
seconds and resident memory, which is how `bench.py` charges CPU per delivery and memory per idle
connection to the server side.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from types import TracebackType

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN_PYTHON = os.path.join(ROOT, ".venv", "bin", "python")  # relay's own venv
LOAD_PYTHON = os.path.join(ROOT, ".venv-load", "bin", "python")  # Django, daphne, channels
TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listened on 127.0.0.1:{port} within {timeout} s")


def tree(pid: int) -> list[int]:
    """`pid` and its live descendants (uvicorn's worker processes, for example), from /proc."""
    pids, i = [pid], 0
    while i < len(pids):
        for task in os.listdir(f"/proc/{pids[i]}/task") if os.path.exists(f"/proc/{pids[i]}/task") else ():
            try:
                with open(f"/proc/{pids[i]}/task/{task}/children") as f:
                    pids += [int(c) for c in f.read().split()]
            except OSError:
                continue
        i += 1
    return pids


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of a process and its live descendants (threads included)."""
    total = 0.0
    for one in tree(pid):
        try:
            with open(f"/proc/{one}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # it exited meanwhile
            continue
        total += (int(fields[11]) + int(fields[12])) / TICKS
    return total


def rss_bytes(pid: int) -> int:
    """Resident memory of a process and its live descendants."""
    total = 0
    for one in tree(pid):
        try:
            with open(f"/proc/{one}/statm") as f:
                total += int(f.read().split()[1]) * PAGE
        except OSError:
            continue
    return total


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    url: str
    log: str
    extra: dict[str, int] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid


class Servers:
    """Starts servers and guarantees they stop: `with Servers() as s: s.redis(); s.relay(...)`."""

    def __init__(self) -> None:
        self.all: list[Server] = []
        self.logdir = tempfile.mkdtemp(prefix="relay-load-")

    def __enter__(self) -> Servers:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop_all()

    def _spawn(self, name: str, argv: list[str], env: dict[str, str], port: int, url: str) -> Server:
        log = os.path.join(self.logdir, f"{name}.log")
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        server = Server(name, proc, port, url, log)
        self.all.append(server)
        try:
            wait_port(port, proc)
        except RuntimeError as exc:
            with open(log, errors="replace") as f:
                raise RuntimeError(f"{name}: {exc}\n{f.read()[-2000:]}") from None
        return server

    def redis(self) -> Server:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not on PATH (make redis-server installs it)")
        port = free_port()
        argv = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        return self._spawn("redis", argv, dict(os.environ), port, f"redis://127.0.0.1:{port}/0")

    def relay(self, broker_url: str, name: str = "relay", python: str = MAIN_PYTHON, **env: str) -> Server:
        port, internal = free_port(), free_port()
        full = {
            **os.environ,
            "RELAY_PORT": str(port),
            "RELAY_INTERNAL_PORT": str(internal),
            "RELAY_BROKER_URL": broker_url,
            "RELAY_POD_ID": name,
            "RELAY_PUBLISH_RATE": "0",  # no per-connection rate limit: publishers are few and fast
            "RELAY_MAX_CONNECTIONS": "20000",
            "RELAY_LOG_LEVEL": "WARNING",
            "RELAY_LOG_FORMAT": "json",
            "RELAY_DRAIN_DELAY": "0",
            "RELAY_DRAIN_WINDOW": "0.5",
            "RELAY_CONSOLE": "false",
            **env,
        }
        python = python if os.path.exists(python) else sys.executable
        server = self._spawn(name, [python, "-m", "service"], full, port, f"ws://127.0.0.1:{port}")
        server.extra["internal_port"] = internal
        return server

    def django(self, redis_url: str, name: str = "django", python: str = LOAD_PYTHON) -> Server:
        """The reference app (loadtest/peers/refapp) under daphne, as the original was served."""
        port = free_port()
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "refapp.settings",
            "REFAPP_REDIS_URL": redis_url,
            "PYTHONPATH": os.path.join(ROOT, "loadtest", "peers"),
        }
        daphne = os.path.join(os.path.dirname(python), "daphne")
        argv = [daphne, "-v", "0", "-b", "127.0.0.1", "-p", str(port), "refapp.asgi:application"]
        return self._spawn(name, argv, env, port, f"ws://127.0.0.1:{port}")

    def django_async(
        self, redis_url: str, workers: int, name: str = "django-async", python: str = LOAD_PYTHON
    ) -> Server:
        """The same app as an async consumer on RedisPubSubChannelLayer under uvicorn (uvloop,
        httptools) with `workers` processes: the strongest Django configuration for it."""
        port = free_port()
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "refapp.settings",
            "REFAPP_REDIS_URL": redis_url,
            "REFAPP_LAYER": "pubsub",
            "REFAPP_CONSUMER": "async",
            "PYTHONPATH": os.path.join(ROOT, "loadtest", "peers"),
        }
        uvicorn = os.path.join(os.path.dirname(python), "uvicorn")
        argv = [uvicorn, "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
                "--no-access-log", "--log-level", "warning", "refapp.asgi:application"]  # fmt: skip
        return self._spawn(name, argv, env, port, f"ws://127.0.0.1:{port}")

    def minimal(self, name: str = "minimal", python: str = LOAD_PYTHON) -> Server:
        """The physical limit (loadtest/peers/minimal.py): the seed protocol on asyncio + uvloop alone."""
        port = free_port()
        python = python if os.path.exists(python) else sys.executable
        argv = [python, "-m", "loadtest.peers.minimal", "--port", str(port)]
        return self._spawn(name, argv, {**os.environ, "PYTHONPATH": ROOT}, port, f"ws://127.0.0.1:{port}")

    def stop(self, server: Server, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        if server.proc.poll() is None:
            server.proc.send_signal(sig)
            try:
                server.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                server.proc.kill()
                server.proc.wait()
        if server in self.all:
            self.all.remove(server)

    def stop_all(self) -> None:
        for server in reversed(list(self.all)):
            self.stop(server)

"""Runs a pod: two uvicorn servers (public and internal) in one event loop, and the signals.

uvicorn's own signal handling is switched off: SIGTERM must start relay's drain (unready, wait,
close sockets in batches with 1012) rather than uvicorn's immediate shutdown. A second SIGTERM or
SIGINT during a drain stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import socket
from collections.abc import Callable, Iterator

import structlog
import uvicorn

from service import transport
from service.app import create_internal_app, create_public_app
from service.broker import Broker, open_broker
from service.config import Settings
from service.pod import Pod
from service.rules import GroupRules

log = structlog.get_logger("relay.server")

# The collector's thresholds for a running pod. CPython's default starts a young collection every
# 700 allocations of container objects, and a pod connecting sockets allocates tens per socket, all
# long-lived. With 10,000 sockets connecting: 56 young, 5 middle and no full collections instead of
# 778, 70 and 6, about a third of the collector's time, at the same memory (docs/performance.md,
# "Garbage collection"; docs/results/conn-memory-gc.json).
GC_THRESHOLDS = (10_000, 10, 10)


def settle_gc() -> None:
    """After start-up: what exists now (modules, settings, metrics, the app) lives as long as the
    pod, so it leaves the collector's sight (`gc.freeze`: no collection walks it again), and the
    collector runs less often (GC_THRESHOLDS)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # relay installs its own handlers (see PodServer.serve)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


class PodServer:
    """A pod with its two listening sockets; `start` returns once both accept connections."""

    def __init__(self, settings: Settings, broker: Broker | None = None) -> None:
        self.settings = settings
        rules = GroupRules.load(settings.group_rules_file)  # a bad file stops start-up
        self.pod = Pod(settings, broker or open_broker(settings, rules), rules)
        self.port = settings.port
        self.internal_port = settings.internal_port
        self._servers: list[tuple[_Server, socket.socket]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping: asyncio.Task[None] | None = None

    def _config(self, app: object, **options: object) -> uvicorn.Config:
        return uvicorn.Config(
            app,  # type: ignore[arg-type]
            http="httptools",
            lifespan="off",
            interface="asgi3",  # stated: PublicApp.__call__ is a plain function returning a coroutine
            log_config=None,
            access_log=False,
            server_header=False,
            # No X-Forwarded-* rewriting: relay never uses the client address, and the middleware
            # costs a coroutine frame per connection.
            proxy_headers=False,
            timeout_graceful_shutdown=int(self.settings.close_timeout) + 1,
            **options,  # type: ignore[arg-type]
        )

    async def start(self) -> None:
        s = self.settings
        await self.pod.start()
        public = self._config(
            create_public_app(self.pod),
            ws=transport.protocol_for(s.ws_impl),  # websockets-sansio measured fastest: docs/performance.md
            ws_per_message_deflate=s.ws_compression,
            ws_max_size=s.max_frame_bytes,
            ws_ping_interval=s.ping_interval or None,
            ws_ping_timeout=s.ping_timeout or None,
            backlog=4096,
        )
        internal = self._config(create_internal_app(self.pod), ws="none")
        for config, host, port in ((public, s.host, s.port), (internal, s.internal_host, s.internal_port)):
            sock = _bind(host, port)
            server = _Server(config)
            self._servers.append((server, sock))
            self._tasks.append(asyncio.get_running_loop().create_task(server.serve(sockets=[sock])))
        self.port = self._servers[0][1].getsockname()[1]
        self.internal_port = self._servers[1][1].getsockname()[1]
        while not all(server.started for server, _ in self._servers):
            if any(t.done() for t in self._tasks):
                await asyncio.gather(*self._tasks)  # re-raise a start-up failure
                raise RuntimeError("relay server stopped during start-up")
            await asyncio.sleep(0.01)
        # Which groups keep presence, and which of them send events: said once, so neither is a surprise.
        presence = {
            r.match: r.presence + (" with events" if r.presence_events else "")
            for r in self.pod.rules.rules
            if r.keeps_presence
        }
        log.info(
            "pod.started",
            pod=s.pod_id,
            websocket=f"ws://{s.host}:{self.port}/<group>",
            internal=f"http://{s.internal_host}:{self.internal_port}",
            broker=s.broker_url.partition("://")[0],
            **({"presence": presence} if presence else {}),
        )

    async def wait(self) -> None:
        """Until the pod has stopped (after a drain), then shut the servers down."""
        await self.pod.stopped.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        """Stop both servers now (uvicorn closes remaining sockets with 1012) and the broker."""
        for server, _ in self._servers:
            server.should_exit = True
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.pod.stop()

    async def serve(self, on_started: Callable[[], object] = lambda: None) -> None:
        """Run until drained: SIGTERM/SIGINT start a drain, a second one stops at once.
        `on_started` runs once both servers accept connections."""
        loop = asyncio.get_running_loop()

        def on_signal(signum: int) -> None:
            if self.pod.draining:
                log.warning("pod.forced_exit", signal=signal.Signals(signum).name)
                for server, _ in self._servers:
                    server.force_exit = True
                self._stopping = loop.create_task(self.pod.stop())
                return
            log.info("pod.signal", signal=signal.Signals(signum).name)
            self.pod.drain()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
        await self.start()
        on_started()
        await self.wait()


async def serve(settings: Settings) -> None:
    """`python -m service`: one pod, its collector settled after start-up (not in tests, which
    run many pods in one process)."""
    await PodServer(settings).serve(on_started=settle_gc)

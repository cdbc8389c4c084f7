"""A lean asyncio WebSocket load generator for the seed protocol (what `bench.py` drives).

Locust (locustfile.py) is the general tool; on a 2-core machine that also runs the server, its
gevent users cost tens of microseconds per received frame and saturate long before relay does. This
engine speaks just enough RFC 6455 on raw asyncio protocols (uvloop when present): one
`data_received` parses every frame in the chunk, client frames are masked with a zero key (legal,
and free), and each delivery costs a JSON decode, a histogram bucket and a sequence check. The
bookkeeping is `loadtest.stats`, shared with the Locust file.

    .venv-load/bin/python -m loadtest.engine --url ws://127.0.0.1:8000 --subscribers 1000 \
        --groups 100 --rate 500 --seconds 10 --slo-p99-ms 100 --json /tmp/run.json

A `Fleet` keeps its subscribers connected across steps, so a ramp pays for connecting once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import resource
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

try:
    import orjson

    _loads: Any = orjson.loads
    _dumps: Any = orjson.dumps
except ImportError:  # pragma: no cover - orjson is in both venvs
    _loads = json.loads

    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()


from loadtest.stats import LATE_SEND, Histogram, Ledger, Receiver, Slo, summarize

HANDSHAKE_KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455's sample key: the accept value is not checked


def raise_fd_limit() -> int:
    """Soft open-files limit up to the hard one (5,000 sockets need it); the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def frame(payload: bytes, opcode: int = 1) -> bytes:
    """A masked client frame (mask key 0: XOR with zeros leaves the payload as it is)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + b"\x00\x00\x00\x00" + payload


class WsClient(asyncio.Protocol):
    """One WebSocket connection. `on_text(payload, now)` gets every complete text frame."""

    def __init__(self, host: str, path: str) -> None:
        self.request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {HANDSHAKE_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        self.transport: asyncio.Transport | None = None
        self.upgraded = False
        self.buf = b""
        self.fragments: list[bytes] = []
        self.welcome: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self.close_code: int | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        transport = self.transport
        transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.welcome.done():
            self.welcome.set_exception(ConnectionError(f"closed before the welcome frame: {exc}"))
        if not self.closed.done():
            self.closed.set_result(self.close_code)

    def send_text(self, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame(payload))

    def close(self, code: int = 1000) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame(code.to_bytes(2, "big"), opcode=8))
            self.transport.close()

    def on_text(self, payload: bytes, now: float) -> None:
        if not self.welcome.done():
            self.welcome.set_result(payload)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            status = buf[: buf.find(b"\r\n")]
            if b" 101 " not in status + b" ":
                self.welcome.set_exception(ConnectionError(status.decode(errors="replace")))
                assert self.transport is not None
                self.transport.close()
                return
            self.upgraded = True
            buf = buf[end + 4 :]
        now = time.time()
        pos, n = 0, len(buf)
        while n - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            length, head = b1 & 0x7F, 2
            if length == 126:
                if n - pos < 4:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif length == 127:
                if n - pos < 10:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            end = pos + head + length
            if end > n:
                break
            payload = buf[pos + head : end]
            pos = end
            opcode = b0 & 0x0F
            if opcode == 1 or opcode == 2 or opcode == 0:
                if not b0 & 0x80:  # a fragment: keep it until the final one
                    self.fragments.append(payload)
                    continue
                if self.fragments:
                    payload = b"".join([*self.fragments, payload])
                    self.fragments.clear()
                self.on_text(payload, now)
            elif opcode == 9 and self.transport is not None:  # ping: answer with the same payload
                self.transport.write(frame(payload, opcode=10))
            elif opcode == 8:
                self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                if self.transport is not None:
                    self.transport.write(frame(payload[:2], opcode=8))
                    self.transport.close()
        self.buf = buf[pos:] if pos < n else b""


class Subscriber(WsClient):
    """A member of one group: every stamped frame is a delivery (latency, sequence check)."""

    def __init__(self, host: str, path: str, fleet: Fleet, group: str) -> None:
        super().__init__(host, path)
        self.fleet = fleet
        self.group = group
        self.receiver: Receiver | None = None

    def on_text(self, payload: bytes, now: float) -> None:
        if not self.welcome.done():
            self.welcome.set_result(payload)
            return
        receiver = self.receiver
        if receiver is None:
            return
        try:
            m = _loads(payload)["message"]
            p = m["p"]
        except (KeyError, TypeError, ValueError):
            return  # not ours: an error frame, a message from another tool
        if not p.startswith(self.fleet.tag):
            return  # a straggler from an earlier step
        self.fleet.histogram.record(now - m["t"])
        receiver.see(p, m["s"])
        self.fleet.on_delivery(m)


@dataclass
class Shape:
    """Subscribers per group and the share of publishes each group gets."""

    name: str
    sizes: list[int]
    weights: list[float] | None = None  # publish share per group; None: uniform

    @property
    def subscribers(self) -> int:
        return sum(self.sizes)

    @classmethod
    def uniform(cls, subscribers: int, groups: int) -> Shape:
        base, extra = divmod(subscribers, groups)
        return cls(f"{subscribers} in {groups} groups", [base + (i < extra) for i in range(groups)])

    @classmethod
    def skewed(cls, subscribers: int, groups: int, large: float = 0.5, s: float = 1.1) -> Shape:
        """One very large group with `large` of the subscribers; the rest over `groups - 1` groups by
        a Zipf law (group i gets a share proportional to 1/i**s); publishes follow the same law."""
        big = int(subscribers * large)
        rest = subscribers - big
        zipf = [1 / (i + 1) ** s for i in range(max(groups - 1, 0))]
        total = sum(zipf) or 1.0
        sizes = [max(1, round(rest * z / total)) for z in zipf]
        sizes[0] += rest - sum(sizes) if sizes else 0
        weights = [1 / (i + 1) ** s for i in range(groups)]
        return cls(f"{subscribers} skewed over {groups} groups", [big, *sizes], weights)


@dataclass
class Step:
    """The outcome of one measured step (a JSON summary plus what the fleet saw)."""

    rate: float
    summary: dict[str, Any]
    cpu: dict[str, float] = field(default_factory=dict)


class Fleet:
    """Subscribers connected to one or more pods, publishers, and the measurement of steps."""

    def __init__(
        self,
        urls: Sequence[str],
        shape: Shape,
        *,
        publishers: int = 4,
        payload: int = 0,
        connect_concurrency: int = 200,
        seed: int = 1,
    ) -> None:
        self.urls = list(urls)
        self.shape = shape
        self.run = uuid.uuid4().hex[:6]
        self.groups = [f"lt{self.run}g{i}" for i in range(len(shape.sizes))]
        self.n_publishers = publishers
        self.pad = "x" * payload
        self.connect_concurrency = connect_concurrency
        self.random = random.Random(seed)
        self.subscribers: list[Subscriber] = []
        self.publishers: list[WsClient] = []
        self.connections = {
            "ok": 0,
            "errors": 0,
            "error_kinds": Counter[str](),
            "close_codes": Counter[int](),
        }
        self.connect_seconds = 0.0
        self.tag = "-"
        self.histogram = Histogram()
        self.ledger = Ledger()
        self.lag = Histogram()
        self.watch: dict[str, Any] | None = None  # broadcast: {"id": ..., "left": n, "done": fut}

    def on_delivery(self, m: dict[str, Any]) -> None:
        watch = self.watch
        if watch is not None and m["p"] == watch["id"]:
            watch["times"].append(time.time() - m["t"])
            if len(watch["times"]) >= watch["want"] and not watch["done"].done():
                watch["done"].set_result(None)

    async def _open(self, url: str, path: str, factory: Any) -> WsClient | None:
        parts = urlsplit(url)
        loop = asyncio.get_running_loop()
        try:
            _, proto = await loop.create_connection(
                lambda: factory(parts.netloc, path), parts.hostname, parts.port or 80
            )
            await asyncio.wait_for(proto.welcome, 30)
        except (OSError, TimeoutError, ConnectionError) as exc:
            self.connections["errors"] += 1
            self.connections["error_kinds"][type(exc).__name__] += 1
            return None
        self.connections["ok"] += 1
        return cast(WsClient, proto)

    async def connect(self) -> float:
        """Open every subscriber and publisher; returns connections per second achieved."""
        gate = asyncio.Semaphore(self.connect_concurrency)
        urls = itertools.cycle(self.urls)

        async def one(group: str) -> None:
            async with gate:
                url = next(urls)
                sub = await self._open(url, "/" + group, lambda h, p: Subscriber(h, p, self, group))
                if isinstance(sub, Subscriber):
                    self.subscribers.append(sub)

        plan = [g for g, size in zip(self.groups, self.shape.sizes, strict=True) for _ in range(size)]
        start = time.perf_counter()
        await asyncio.gather(*(one(g) for g in plan))
        self.connect_seconds = time.perf_counter() - start
        for i in range(self.n_publishers):
            pub = await self._open(self.urls[i % len(self.urls)], f"/lt{self.run}pub{i}", WsClient)
            if pub is not None:
                self.publishers.append(pub)
        return len(plan) / self.connect_seconds if self.connect_seconds else 0.0

    async def close(self) -> None:
        for c in [*self.subscribers, *self.publishers]:
            c.close()
        await asyncio.sleep(0.2)
        for c in [*self.subscribers, *self.publishers]:
            if c.transport is not None:
                c.transport.abort()
            if c.close_code is not None:
                self.connections["close_codes"][c.close_code] += 1

    async def _ticker(self, stop: asyncio.Event, interval: float = 0.01) -> None:
        clock = time.perf_counter  # uvloop's loop.time() ticks in whole milliseconds
        while not stop.is_set():
            due = clock() + interval
            await asyncio.sleep(interval)
            self.lag.record(max(0.0, clock() - due))

    async def _publish(self, index: int, pub: WsClient, total: int, seconds: float, late: list[int]) -> None:
        """Open loop: message k leaves at start + k / rate whatever the server does; a tick sends
        everything that is due, so high rates cost one write per tick, not one timer per message."""
        pid = f"{self.tag}{index}"
        groups, weights = self.groups, self.shape.weights
        clock = time.perf_counter
        start = clock()
        sent = 0
        rate = total / seconds
        ledger = self.ledger
        while sent < total:
            now = clock()
            due = min(total, int((now - start) * rate) + 1)
            if due > sent:
                chunk = []
                wall = time.time()
                for k in range(sent, due):
                    if now - (start + k / rate) > LATE_SEND:
                        late[0] += 1
                    g = (
                        self.random.choices(groups, weights)[0]
                        if weights
                        else groups[(index + k) % len(groups)]
                    )
                    seq = ledger.sending(pid, g, wall)
                    body = {"task": "send_message_to_group", "group_name": g, "p": pid, "s": seq, "t": wall}
                    if self.pad:
                        body["pad"] = self.pad
                    chunk.append(frame(_dumps(body)))
                if pub.transport is not None and not pub.transport.is_closing():
                    pub.transport.write(b"".join(chunk))
                late[1] += due - sent
                sent = due
            await asyncio.sleep(max(0.0, min(0.002, start + sent / rate - clock())))

    def _reset(self, step: int) -> None:
        self.tag = f"{self.run}s{step}p"
        self.histogram = Histogram()
        self.ledger = Ledger()
        self.lag = Histogram()
        now = time.time()
        for i, sub in enumerate(self.subscribers):
            sub.receiver = self.ledger.receiver(f"r{i}", sub.group, now)

    async def step(
        self, rate: float, seconds: float, *, drain: float = 1.5, slo: Slo | None = None, index: int = 0
    ) -> dict[str, Any]:
        """Publish `rate` messages per second in total for `seconds`, wait `drain`, summarize."""
        self._reset(index)
        stop = asyncio.Event()
        ticker = asyncio.create_task(self._ticker(stop))
        late = [0, 0]
        cpu0, wall0 = time.process_time(), time.perf_counter()
        total, n = round(rate * seconds), max(1, len(self.publishers))
        counts = [total // n + (i < total % n) for i in range(n)]
        pairs = zip(self.publishers, counts, strict=False)
        await asyncio.gather(*(self._publish(i, p, c, seconds, late) for i, (p, c) in enumerate(pairs) if c))
        await asyncio.sleep(drain)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        stop.set()
        await ticker
        for sub in self.subscribers:
            if sub.closed.done() and sub.receiver is not None and sub.receiver.left is None:
                sub.receiver.left = time.time()
        health = {
            "cpu_seconds": cpu,
            "wall_seconds": wall,
            "lag": self.lag.to_dict(),
            "late_sends": late[0],
            "sends": late[1],
        }
        conns = {
            "ok": self.connections["ok"],
            "errors": self.connections["errors"],
            "open": sum(1 for s in self.subscribers if not s.closed.done()),
            "error_kinds": dict(self.connections["error_kinds"]),
            "close_codes": {
                str(k): v for k, v in Counter(s.close_code for s in self.subscribers).items() if k
            },
        }
        summary = summarize(
            histogram=self.histogram,
            ledger=self.ledger,
            connections=conns,
            generators=[health],
            seconds=seconds,
            slo=slo,
            profile=f"{self.shape.name} at {rate:g} msg/s",
            grace=drain * 0.9,
        )
        summary["target_rate"] = rate
        return summary

    async def broadcast(self, group_index: int = 0, timeout: float = 30.0) -> dict[str, float]:
        """One message to one group: seconds until the first, median and last member had it."""
        members = sum(1 for s in self.subscribers if s.group == self.groups[group_index])
        self._reset(10_000 + int(time.time() * 1000) % 1_000_000)
        pid = f"{self.tag}b"
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.watch = {"id": pid, "want": members, "times": [], "done": done}
        wall = time.time()
        body = {"task": "send_message_to_group", "group_name": self.groups[group_index], "p": pid, "s": 0}
        body["t"] = wall
        self.publishers[0].send_text(_dumps(body))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done, timeout)
        times = sorted(self.watch["times"])
        self.watch = None
        if not times:
            return {"members": members, "received": 0, "first_s": -1.0, "median_s": -1.0, "last_s": -1.0}
        return {
            "members": members,
            "received": len(times),
            "first_s": times[0],
            "median_s": times[len(times) // 2],
            "last_s": times[-1],
        }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.engine", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", action="append", required=True, help="ws://host:port (repeat for several pods)")
    p.add_argument("--subscribers", type=int, default=100)
    p.add_argument("--groups", type=int, default=10)
    p.add_argument("--skewed", action="store_true", help="one large group and a Zipf tail, not uniform")
    p.add_argument("--publishers", type=int, default=4)
    p.add_argument("--rate", type=float, default=100.0, help="publishes per second, all publishers together")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--payload", type=int, default=0, help="extra bytes of padding per message")
    p.add_argument("--slo-p99-ms", type=float, default=None)
    p.add_argument("--slo-max-loss", type=float, default=None, help="largest loss ratio allowed")
    p.add_argument("--json", default="", help="write the summary here (default: stdout)")
    return p.parse_args(argv)


async def amain(args: argparse.Namespace) -> int:
    raise_fd_limit()
    shape = (Shape.skewed if args.skewed else Shape.uniform)(args.subscribers, args.groups)
    fleet = Fleet(args.url, shape, publishers=args.publishers, payload=args.payload)
    try:
        rate = await fleet.connect()
        slo = Slo(p99_ms=args.slo_p99_ms, max_loss_ratio=args.slo_max_loss)
        summary = await fleet.step(args.rate, args.seconds, slo=slo)
        summary["connect_per_s"] = round(rate, 1)
    finally:
        await fleet.close()
    text = json.dumps(summary, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")  # noqa: ASYNC240 - once, after the run
    print(text)
    for why in summary["generator"]["saturated"]:
        print(f"WARNING: run invalid: {why}", file=sys.stderr)
    for why in summary["slo_violations"]:
        print(f"SLO broken: {why}", file=sys.stderr)
    return 0 if summary["ok"] else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import uvloop

        return uvloop.run(amain(args))
    except ImportError:
        return asyncio.run(amain(args))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())

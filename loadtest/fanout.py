"""Fan-out measurement with a minimal raw-asyncio WebSocket client (loopback only, bounded).

Measures what one pod costs, from outside: server CPU per delivered frame (from /proc), the time for
one broadcast to reach the last of N members, server memory per idle connection and the connect
rate. The client parses frame headers only and never decodes JSON, so on the same machine it costs
well under what the server does per frame; its own CPU is reported so a saturated client shows.

    python loadtest/fanout.py --members 5000 --broadcasts 20 --spawn
    python loadtest/fanout.py --url ws://127.0.0.1:8000 --pid $(pgrep -f 'python -m service')

`--spawn` starts `python -m service` itself on free ports (memory broker unless RELAY_BROKER_URL is
set in the environment); extra `--env KEY=VALUE` pairs go to that pod.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import urlparse

import uvloop

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def text_frame(payload: bytes) -> bytes:
    """A masked client text frame with an all-zero mask key (no XOR needed; servers accept any key)."""
    n = len(payload)
    if n < 126:
        head = bytes([0x81, 0x80 | n])
    elif n < 65536:
        head = bytes([0x81, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x81, 0x80 | 127]) + n.to_bytes(8, "big")
    return head + b"\x00\x00\x00\x00" + payload


@dataclass
class Stats:
    """Per frame index (0 is the welcome): how many members have it, and when the last one did."""

    expected: int = 0
    counts: dict[int, int] = field(default_factory=dict)
    last: dict[int, float] = field(default_factory=dict)
    complete: dict[int, asyncio.Event] = field(default_factory=dict)

    def arrived(self, index: int, now: float) -> None:
        count = self.counts.get(index, 0) + 1
        self.counts[index] = count
        if count == self.expected:
            self.last[index] = now
            self.complete.setdefault(index, asyncio.Event()).set()

    async def wait(self, index: int, timeout: float) -> float:
        await asyncio.wait_for(self.complete.setdefault(index, asyncio.Event()).wait(), timeout)
        return self.last[index]


class Member(asyncio.Protocol):
    """Counts frames and stamps the arrival of each; the first frame (the welcome) is index 0."""

    def __init__(self, path: str, stats: Stats, opened: asyncio.Future[None]) -> None:
        self.path, self.stats, self.opened = path, stats, opened
        self.buf = b""
        self.upgraded = False
        self.index = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        key = base64.b64encode(os.urandom(16)).decode()
        self.transport.write(
            f"GET {self.path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                self.opened.set_exception(RuntimeError(buf[:80].decode(errors="replace")))
                return
            self.upgraded = True
            buf = buf[end + 4 :]
        now = time.perf_counter()
        pos = 0
        while len(buf) - pos >= 2:
            n = buf[pos + 1] & 0x7F
            start = pos + 2
            if n == 126:
                if len(buf) - pos < 4:
                    break
                n, start = int.from_bytes(buf[pos + 2 : pos + 4], "big"), pos + 4
            elif n == 127:
                if len(buf) - pos < 10:
                    break
                n, start = int.from_bytes(buf[pos + 2 : pos + 10], "big"), pos + 10
            if len(buf) < start + n:
                break
            if buf[pos] & 0x0F == 1:  # text frame
                self.stats.arrived(self.index, now)
                if self.index == 0 and not self.opened.done():
                    self.opened.set_result(None)
                self.index += 1
            pos = start + n
        self.buf = buf[pos:]

    def send(self, payload: bytes) -> None:
        assert self.transport is not None
        self.transport.write(text_frame(payload))


async def open_members(
    host: str, port: int, path: str, count: int, stats: Stats, parallel: int
) -> tuple[list[Member], float]:
    loop = asyncio.get_running_loop()
    members: list[Member] = []
    gate = asyncio.Semaphore(parallel)

    async def one() -> None:
        async with gate:
            opened: asyncio.Future[None] = loop.create_future()
            _, member = await loop.create_connection(lambda: Member(path, stats, opened), host, port)
            await asyncio.wait_for(opened, 30)
            members.append(member)

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(count)))
    return members, time.perf_counter() - started


async def measure(
    url: str, pid: int, members: int, broadcasts: int, interval: float, parallel: int
) -> dict[str, float]:
    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 80
    stats = Stats(expected=members)
    rss_before = rss_bytes(pid)
    group, conns_elapsed = await open_members(host, port, "/bench", members, stats, parallel)
    await asyncio.sleep(1.0)  # let the server settle before reading its memory
    rss_after = rss_bytes(pid)
    pub_stats = Stats(expected=1)
    (publisher,), _ = await open_members(host, port, "/publisher", 1, pub_stats, 1)

    latencies = []
    cpu_before, client_before = cpu_seconds(pid), time.process_time()
    for i in range(1, broadcasts + 1):
        body = json.dumps({"task": "send_message_to_group", "group_name": "bench", "seq": i}).encode()
        sent = time.perf_counter()
        publisher.send(body)
        try:
            latencies.append(await stats.wait(i, 10) - sent)
        except TimeoutError:
            raise RuntimeError(
                f"broadcast {i} reached {stats.counts.get(i, 0)} of {members} in 10 s"
            ) from None
        await asyncio.sleep(interval)
    server_cpu = cpu_seconds(pid) - cpu_before
    client_cpu = time.process_time() - client_before
    deliveries = members * broadcasts
    for member in (*group, publisher):
        assert member.transport is not None
        member.transport.close()
    return {
        "members": members,
        "broadcasts": broadcasts,
        "connect_per_second": members / conns_elapsed,
        "memory_per_connection_kib": (rss_after - rss_before) / members / 1024,
        "broadcast_to_last_member_ms_median": statistics.median(latencies) * 1000,
        "broadcast_to_last_member_ms_max": max(latencies) * 1000,
        "server_cpu_us_per_delivery": server_cpu / deliveries * 1e6,
        "client_cpu_us_per_delivery": client_cpu / deliveries * 1e6,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(env_pairs: list[str], members: int) -> tuple[subprocess.Popen[bytes], str]:
    port, internal = free_port(), free_port()
    env = {
        **os.environ,
        "RELAY_PORT": str(port),
        "RELAY_INTERNAL_PORT": str(internal),
        "RELAY_LOG_LEVEL": "WARNING",
        "RELAY_PUBLISH_RATE": "0",
        "RELAY_MAX_CONNECTIONS": str(members + 100),
        **dict(pair.split("=", 1) for pair in env_pairs),
    }
    proc = subprocess.Popen([sys.executable, "-m", "service"], env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"ws://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the relay pod did not start")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="ws://127.0.0.1:8000")
    p.add_argument("--pid", type=int, help="server process id (for CPU and memory); implied by --spawn")
    p.add_argument("--spawn", action="store_true", help="start a relay pod for this run")
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE for the spawned pod")
    p.add_argument("--members", type=int, default=1000)
    p.add_argument("--broadcasts", type=int, default=20)
    p.add_argument("--interval", type=float, default=0.05, help="seconds between broadcasts")
    p.add_argument("--parallel", type=int, default=200, help="handshakes in flight while connecting")
    args = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, args.members * 2 + 100)), hard))
    proc = None
    if args.spawn:
        proc, args.url = spawn(args.env, args.members)
        args.pid = proc.pid
    if args.pid is None:
        p.error("--pid is required without --spawn")
    try:
        result = uvloop.run(
            measure(args.url, args.pid, args.members, args.broadcasts, args.interval, args.parallel)
        )
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    print(json.dumps({k: round(v, 2) for k, v in result.items()}))


if __name__ == "__main__":
    main()

"""Fan-out measurement with the engine's raw asyncio WebSocket client (loopback only, bounded).

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
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

import uvloop

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script too
from loadtest.engine import WsClient
from loadtest.servers import cpu_seconds, free_port, rss_bytes


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


class Member(WsClient):
    """The engine's WebSocket client, counting text frames: the first (the welcome) is index 0."""

    def __init__(self, host: str, path: str, stats: Stats) -> None:
        super().__init__(host, path)
        self.stats = stats
        self.index = 0

    def on_text(self, payload: bytes, now: float) -> None:
        super().on_text(payload, now)
        self.stats.arrived(self.index, now)
        self.index += 1


async def open_members(
    host: str, port: int, path: str, count: int, stats: Stats, parallel: int
) -> tuple[list[Member], float]:
    loop = asyncio.get_running_loop()
    members: list[Member] = []
    gate = asyncio.Semaphore(parallel)

    async def one() -> None:
        async with gate:
            _, member = await loop.create_connection(lambda: Member(host, path, stats), host, port)
            await asyncio.wait_for(member.welcome, 30)
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
        sent = time.time()  # the clock WsClient stamps arrivals with
        publisher.send_text(body)
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
        member.close()
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

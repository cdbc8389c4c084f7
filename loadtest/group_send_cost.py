"""What one `group_send` costs the Django process: relay_channels against channels_redis's two layers.

The same event (the original app's `{"type": "group.message", "message": {...}}`, about 200 bytes)
goes through each layer the two ways app code calls it:

- async: `await layer.group_send(...)`, one after another in one event loop (an async view);
- sync: `async_to_sync(layer.group_send)(...)` from plain sync code (a management command, a WSGI
  view), where asgiref runs every call in a new event loop in a new thread, so every layer opens
  its Redis connection anew each call.

Layers: relay_channels.RelayChannelLayer to a plain group, the same without a reply timeout
(CONFIG["timeout"] = None, as channels_redis runs), and to a group with history (FCALL
relay_append_v1); channels_redis.core.RedisChannelLayer (the original app's) with 1 member, and
with 100 members on 4 processes (its cost grows with them); channels_redis.pubsub's
RedisPubSubChannelLayer. relay's side is what its pods would see: the rules key and the functions
library are put in Redis as a pod puts them; no pod runs, so the figures are the Django side only.
Each round runs every variant once, in a rotated order; the figures are medians over rounds of
wall-clock microseconds per call (the caller waits that long) and CPU microseconds of this process
per call. Raw samples, the command, commit and versions go to --json. Needs .venv-load:

    .venv-load/bin/python -m loadtest.group_send_cost --json docs/results/group-send-cost.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVENT = {
    "type": "group.message",
    "message": {"task": "send_message_to_group", "group_name": "room", "seq": 1, "text": "x" * 150},
}


@dataclass
class Variant:
    name: str
    layer: Any
    group: str
    cleanup: Callable[[], None] = lambda: None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _redis_server() -> tuple[subprocess.Popen[bytes], int, str]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server is not on PATH (make redis-server installs it)")
    port, where = _free_port(), tempfile.mkdtemp(prefix="group-send-cost-")
    argv = [
        exe,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        where,
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit("redis-server did not start") from None
            time.sleep(0.02)
    version_line = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.split()
    return proc, port, next((w.partition("=")[2] for w in version_line if w.startswith("v=")), "?")


def _setup(url: str) -> list[Variant]:
    import django
    import redis
    from django.conf import settings

    settings.configure(INSTALLED_APPS=[], CHANNEL_LAYERS={})
    django.setup()
    from asgiref.sync import async_to_sync
    from channels_redis.core import RedisChannelLayer
    from channels_redis.pubsub import RedisPubSubChannelLayer
    from relay_channels import wire
    from relay_channels.layer import RelayChannelLayer

    # What a relay pod puts in its Redis (service/broker/redis.py): the rules and the functions library.
    sys.path.insert(0, ROOT)
    from service.broker.history import LIBRARY

    admin = redis.Redis.from_url(url)
    admin.set(
        wire.rules_key("relay"), '{"group":[{"match":"hist.*","history":100,"ttl":300,"latest":false}]}'
    )
    admin.execute_command("FUNCTION", "LOAD", "REPLACE", LIBRARY)

    def drain_core() -> None:  # members never read: empty their queues between runs, untimed
        keys = admin.keys("asgi:specific.*")
        if keys:
            admin.delete(*keys)

    core_one = RedisChannelLayer(hosts=[url], capacity=10**9)
    core_many = RedisChannelLayer(hosts=[url], capacity=10**9)
    processes = [RedisChannelLayer(hosts=[url]) for _ in range(4)]

    async def members() -> None:
        await core_one.group_add("room1", await core_one.new_channel())
        for n in range(100):
            process = processes[n % 4]
            await core_many.group_add("room100", await process.new_channel())

    async_to_sync(members)()
    relay = RelayChannelLayer(url=url, rules_cache_seconds=5)
    return [
        Variant("relay_channels", relay, "room"),
        Variant("relay_channels, timeout None", RelayChannelLayer(url=url, timeout=None), "room"),
        Variant("relay_channels, history group", relay, "hist.room"),
        Variant("channels_redis core, 1 member", core_one, "room1", drain_core),
        Variant("channels_redis core, 100 members on 4 processes", core_many, "room100", drain_core),
        Variant("channels_redis pubsub", RedisPubSubChannelLayer(hosts=[url]), "room"),
    ]


def _measure_async(variant: Variant, calls: int) -> tuple[float, float]:
    async def run() -> tuple[float, float]:
        await variant.layer.group_send(variant.group, EVENT)  # the loop's connection, made untimed
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(calls):
            await variant.layer.group_send(variant.group, EVENT)
        return time.perf_counter() - wall, time.process_time() - cpu

    wall, cpu = asyncio.run(run())
    return wall / calls * 1e6, cpu / calls * 1e6


def _measure_sync(variant: Variant, calls: int) -> tuple[float, float]:
    from asgiref.sync import async_to_sync

    send = async_to_sync(variant.layer.group_send)
    result: list[tuple[float, float]] = []

    def plain_thread() -> None:  # no event loop here, as in a management command
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(calls):
            send(variant.group, EVENT)
        result.append((time.perf_counter() - wall, time.process_time() - cpu))

    thread = threading.Thread(target=plain_thread)
    thread.start()
    thread.join()
    wall, cpu = result[0]
    return wall / calls * 1e6, cpu / calls * 1e6


def _git() -> tuple[str, list[str]]:
    def out(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True).stdout

    dirty = [line[3:] for line in out("status", "--porcelain").splitlines() if line.strip()]
    return out("rev-parse", "HEAD").strip(), dirty


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--async-calls", type=int, default=1000, help="awaited group_sends per variant per round"
    )
    parser.add_argument(
        "--sync-calls", type=int, default=200, help="async_to_sync group_sends per variant per round"
    )
    parser.add_argument("--json", help="write raw samples and medians here")
    args = parser.parse_args(argv)

    proc, port, redis_version = _redis_server()
    started, load_start = time.time(), os.getloadavg()
    samples: dict[str, dict[str, list[list[float]]]] = {}
    try:
        variants = _setup(f"redis://127.0.0.1:{port}/0")
        for n in range(args.rounds):
            order = variants[n % len(variants) :] + variants[: n % len(variants)]  # rotate: no fixed slot
            for variant in order:
                for mode, measure, calls in (
                    ("async", _measure_async, args.async_calls),
                    ("sync", _measure_sync, args.sync_calls),
                ):
                    variant.cleanup()
                    wall, cpu = measure(variant, calls)
                    samples.setdefault(variant.name, {}).setdefault(mode, []).append(
                        [round(wall, 1), round(cpu, 1)]
                    )
            print(f"round {n + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        proc.terminate()
        proc.wait(10)

    summary = []
    for name, modes in samples.items():
        for mode, values in modes.items():
            summary.append(
                {
                    "layer": name,
                    "mode": mode,
                    "us_wall_per_call_median": round(statistics.median(v[0] for v in values), 1),
                    "us_cpu_per_call_median": round(statistics.median(v[1] for v in values), 1),
                    "samples_us_wall_cpu": values,
                }
            )
    commit, dirty = _git()
    report = {
        "command": " ".join([".venv-load/bin/python -m loadtest.group_send_cost", *(argv or sys.argv[1:])]),
        "git_commit": commit,
        "git_dirty_files": dirty,
        "versions": {
            "python": platform.python_version(),
            **{name: version(name) for name in ("django", "channels", "channels-redis", "redis", "asgiref")},
            "relay-channels": version("relay-channels"),
            "redis-server": redis_version,
            "event loop": "asyncio (default policy)",
        },
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "loadavg_at_start": load_start,
            "loadavg_at_end": os.getloadavg(),
        },
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(time.time() - started, 1),
        "config": {"rounds": args.rounds, "async_calls": args.async_calls, "sync_calls": args.sync_calls},
        "event": EVENT,
        "summary": summary,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
    print("| layer | mode | us wall per call | us CPU per call |\n|---|---|---:|---:|")
    for row in summary:
        wall, cpu = row["us_wall_per_call_median"], row["us_cpu_per_call_median"]
        print(f"| {row['layer']} | {row['mode']} | {wall:,.0f} | {cpu:,.0f} |")


if __name__ == "__main__":
    main()

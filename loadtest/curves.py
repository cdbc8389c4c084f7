"""Curves a performance engineer asks for after the headline numbers, in one run on loopback:

- latency and server CPU per delivery against group size (one group of 1 to 5,000 members, at a
  fixed --deliveries budget per second, so the pod does the same work per second at every size);
- latency and CPU per delivery against payload size (100 B to 64 KiB frames, 1,000 subscribers in
  100 groups at --payload-rate messages per second);
- server CPU per delivery with 1, 2 and 3 pods on one Redis (1,000 subscribers in 100 groups,
  connections spread round-robin, at --pods-rate messages per second).

(Latency against publish rate is `make bench`'s ramp.) Every point is the median of --tries steps.
Writes the raw steps, the command, the commit and the versions to JSON and one PNG per curve:

    .venv-load/bin/python -m loadtest.curves --json docs/results/curves.json --plots docs/plots
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

from loadtest.bench import Target, _step, machine
from loadtest.engine import Fleet, Shape, raise_fd_limit
from loadtest.servers import ROOT, Server, Servers

SIZES = [1, 10, 100, 1000, 5000]
PAYLOADS = [100, 1024, 8192, 65000]  # 65,000: a frame just under relay's 64 KiB limit with its envelope
PODS = [1, 2, 3]


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.strip()


async def _points(
    target: Target, redis: Server, shape: Shape, rate: float, seconds: float, tries: int, payload: int = 0
) -> dict[str, Any]:
    """`tries` steps of one shape and rate; the median p50, p99 and CPU per delivery, and the raw steps."""
    fleet = Fleet(target.urls, shape, publishers=4, payload=payload)
    steps = []
    try:
        await fleet.connect()
        for attempt in range(tries):
            step, _ = await _step(fleet, target, redis, seconds, rate, len(steps), attempt)
            steps.append(step)
    finally:
        await fleet.close()
        await asyncio.sleep(0.5)

    def med(get: Callable[[dict[str, Any]], float]) -> float:
        return statistics.median(get(s) for s in steps)

    return {
        "rate": rate,
        "p50_ms": med(lambda s: s["summary"]["latency"]["p50_ms"]),
        "p99_ms": med(lambda s: s["summary"]["latency"]["p99_ms"]),
        "cpu_us_per_delivery": med(lambda s: s["server_cpu_us_per_delivery"]),
        "lost": sum(s["summary"]["accounting"]["lost"] for s in steps),
        "steps": steps,
    }


def plot(curves: dict[str, list[dict[str, Any]]], plot_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(plot_dir, exist_ok=True)
    files = []
    for key, xlabel in (("group_size", "members of the one group"), ("payload", "payload bytes"),
                        ("pods", "pods on one Redis")):  # fmt: skip
        points = curves.get(key)
        if not points:
            continue
        xs = [p["x"] for p in points]
        fig, (lat, cpu) = plt.subplots(1, 2, figsize=(10, 4))
        lat.plot(xs, [p["p50_ms"] for p in points], ":o", label="p50")
        lat.plot(xs, [p["p99_ms"] for p in points], "-o", label="p99")
        cpu.plot(xs, [p["cpu_us_per_delivery"] for p in points], "-o", color="tab:red")
        for ax in (lat, cpu):
            ax.set_xlabel(xlabel)
            ax.grid(True, which="both", alpha=0.3)
            if key != "pods":
                ax.set_xscale("log")
        lat.set_ylabel("delivery latency (ms)")
        lat.legend()
        cpu.set_ylabel("server CPU per delivery (µs, all pods)")
        fig.suptitle(f"relay: latency and CPU per delivery against {xlabel}")
        fig.tight_layout()
        name = f"curve-{key.replace('_', '-')}.png"
        fig.savefig(os.path.join(plot_dir, name), dpi=110)
        plt.close(fig)
        files.append(name)
    return files


async def run(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    curves: dict[str, list[dict[str, Any]]] = {"group_size": [], "payload": [], "pods": []}
    with Servers() as servers:
        redis = servers.redis()
        pods = [servers.relay(redis.url, f"relay-{i}") for i in range(max(PODS))]
        one = Target("relay 1 pod", pods[:1], "relay")
        for size in SIZES if not args.quick else [1, 100]:
            rate = min(args.deliveries / size, 1000.0)
            print(f"group size {size}: {rate:g} msg/s", flush=True)
            point = await _points(one, redis, Shape.uniform(size, 1), rate, args.seconds, args.tries)
            curves["group_size"].append({"x": size, **point})
        shape = Shape.uniform(args.subscribers, 100 if not args.quick else 10)
        for payload in PAYLOADS if not args.quick else [100, 8192]:
            print(f"payload {payload} B: {args.payload_rate:g} msg/s", flush=True)
            point = await _points(one, redis, shape, args.payload_rate, args.seconds, args.tries, payload)
            curves["payload"].append({"x": payload, **point})
        for n in PODS if not args.quick else [1, 2]:
            target = Target(f"relay {n} pods", pods[:n], "relay")
            print(f"{n} pods: {args.pods_rate:g} msg/s", flush=True)
            point = await _points(target, redis, shape, args.pods_rate, args.seconds, args.tries)
            curves["pods"].append({"x": n, **point})
    return curves


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=os.path.join(ROOT, "docs", "results", "curves.json"))
    p.add_argument("--plots", default=os.path.join(ROOT, "docs", "plots"))
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--tries", type=int, default=3)
    p.add_argument("--deliveries", type=float, default=10000.0, help="deliveries/s in the group-size curve")
    p.add_argument("--subscribers", type=int, default=1000)
    p.add_argument("--payload-rate", type=float, default=200.0)
    p.add_argument("--pods-rate", type=float, default=1000.0)
    p.add_argument("--quick", action="store_true", help="two points per curve, small shapes (a dry run)")
    args = p.parse_args()
    if args.quick:
        args.subscribers, args.seconds, args.tries = 100, 1.0, 1
    raise_fd_limit()
    commit, dirty = (
        _git("rev-parse", "HEAD"),
        [line[3:] for line in _git("status", "--porcelain").splitlines()],
    )
    started = time.perf_counter()
    curves = asyncio.run(run(args))
    files = plot(curves, args.plots)
    result = {
        "command": " ".join([".venv-load/bin/python -m loadtest.curves", *sys.argv[1:]]),
        "git_commit": commit,
        "git_dirty_files": dirty,  # before the run: its own plots are not a change
        "versions": {"python": platform.python_version(), "matplotlib": version("matplotlib")},
        "machine": machine(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": time.perf_counter() - started,
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "plots")},
        "plots": files,
        "curves": curves,
    }
    with open(args.json, "w") as f:
        f.write(json.dumps(result, indent=1, default=str) + "\n")
    for key, points in curves.items():
        for point in points:
            print(f"{key} {point['x']}: p50 {point['p50_ms']:.2f} p99 {point['p99_ms']:.2f} ms, "
                  f"{point['cpu_us_per_delivery']:.1f} us/delivery, lost {point['lost']}")  # fmt: skip
    print(f"wrote {args.json} in {result['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()

"""What presence costs Redis: commands per second and memory per 10,000 connections (docs/presence.md).

One pod's `Presence` (service/presence.py) on a real RedisBroker and its own redis-server (free
loopback port), fed `--connections` connections of distinct users in three shapes: all in one
group, in groups of 100, and each alone in its group (the refresh's worst case: one call per group).
Per shape: the FCALLs and Redis CPU the joins took (they are batched per event-loop turn); then
`--cycles` refresh cycles, each measured alone (FCALLs, the commands Redis ran inside them, Redis CPU
from INFO), and the steady state they make at `--ttl` (three cycles per TTL, nothing else); the
memory the entries hold (INFO used_memory, after minus before, per connection); then the leaves.
Connections are the pod's own objects with a send that does nothing: presence never sends to
sockets, so none are opened. `redis_commands` counts every command Redis ran in a cycle, those
inside the functions included (a ZADD per refreshed id); the link's rare probes are in it too.

    .venv/bin/python -m loadtest.presence_cost --json docs/results/presence-cost.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import redis

from loadtest.history_cost import environment
from loadtest.servers import Servers
from service.broker import open_broker
from service.config import Settings
from service.connection import Connection
from service.presence import Presence
from service.rules import GroupRules

SHAPES = {"one group": 0, "groups of 100": 100, "one per group": 1}  # connections per group (0: all)


@dataclass
class Config:
    connections: int = 10_000
    ttl: float = 60.0
    cycles: int = 3
    mode: str = "full"
    claims_bytes: int = 40  # `{"name": "user 1234"}` and the like


async def _noop(message: dict[str, Any]) -> None:
    return None


def _stats(admin: redis.Redis) -> dict[str, float]:
    info = admin.info("all")
    fcall = info.get("cmdstat_fcall", {"calls": 0, "usec": 0})
    return {
        "fcalls": float(fcall["calls"]),
        "fcall_usec": float(fcall["usec"]),
        "commands": float(info["total_commands_processed"]),
        "cpu": float(info["used_cpu_sys"]) + float(info["used_cpu_user"]),
        "memory": float(info["used_memory"]),
    }


def _delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in before}


async def shape(url: str, admin: redis.Redis, name: str, per_group: int, config: Config) -> dict[str, Any]:
    rules = GroupRules.parse({"group": [{"match": "*", "presence": config.mode}]})
    settings = Settings(
        broker_url=url,
        pod_id="cost",
        redis_prefix="cost" + str(per_group),
        presence_ttl=config.ttl,
        presence_claims_bytes=max(2, config.claims_bytes),
    )
    broker = open_broker(settings)
    presence = Presence(broker, rules, settings)
    presence.start()
    try:
        await broker.subscribe("p:cost")  # opens the link, as a pod's hub does at start
        size = per_group or config.connections
        conns = [
            Connection(f"cost.{n}", _noop, outbox_size=1, sub=f"user-{n}", claims={"name": f"user {n}"})
            for n in range(config.connections)
        ]
        before = _stats(admin)
        started = time.monotonic()
        for n, conn in enumerate(conns):
            presence.joined(conn, "g:{" + f"{name[:3]}-{n // size}" + "}")
        await presence.flush()
        join_seconds = time.monotonic() - started
        joined = _stats(admin)
        cycles = []
        for _ in range(config.cycles):  # what the refresher does every TTL/3, measured one by one
            cycle_from, cycle_started = _stats(admin), time.monotonic()
            await presence.refresh()
            cycles.append({**_delta(cycle_from, _stats(admin)), "seconds": time.monotonic() - cycle_started})
        cycle = {k: statistics.median(c[k] for c in cycles) for k in cycles[0]}
        per_second = 3 / config.ttl  # refresh cycles per second
        leave_from = _stats(admin)
        for n, conn in enumerate(conns):
            presence.left(conn, "g:{" + f"{name[:3]}-{n // size}" + "}")
        await presence.flush()
        left = _delta(leave_from, _stats(admin))
        joins = _delta(before, joined)
        per = 10_000 / config.connections
        return {
            "shape": name,
            "connections": config.connections,
            "groups": -(-config.connections // size),
            "join": {
                "seconds": round(join_seconds, 3),
                "fcalls": joins["fcalls"],
                "redis_cpu_seconds": round(joins["cpu"], 3),
            },
            "refresh_cycle": {  # medians of `cycles` cycles
                "fcalls": cycle["fcalls"],
                "redis_commands": cycle["commands"],  # inside the functions too (a ZADD per id...)
                "fcall_usec": cycle["fcall_usec"],
                "redis_cpu_seconds": round(cycle["cpu"], 4),
                "pod_seconds": round(cycle["seconds"], 4),
                "samples": cycles,
            },
            "steady": {  # at the TTL: 3 refresh cycles per TTL, nothing else
                "ttl_seconds": config.ttl,
                "fcalls_per_second_per_10k": round(cycle["fcalls"] * per_second * per, 2),
                "redis_commands_per_second_per_10k": round(cycle["commands"] * per_second * per, 1),
                "fcall_usec_per_second_per_10k": round(cycle["fcall_usec"] * per_second * per, 1),
                "redis_cpu_share_per_10k": round(cycle["cpu"] * per_second * per, 5),
            },
            "memory": {
                "bytes": joins["memory"],
                "bytes_per_connection": round(joins["memory"] / config.connections, 1),
                "mib_per_10k": round(joins["memory"] * per / 2**20, 2),
            },
            "leave": {
                "fcalls": left["fcalls"],
                "memory_bytes_after": _stats(admin)["memory"] - before["memory"],
            },
        }
    finally:
        await presence.stop(2.0)
        await broker.close()


async def measure(url: str, config: Config) -> list[dict[str, Any]]:
    admin = redis.Redis.from_url(url)
    results = []
    for name, per_group in SHAPES.items():
        result = await shape(url, admin, name, per_group, config)
        print(json.dumps(result), file=sys.stderr)
        results.append(result)
    return results


def markdown(results: list[dict[str, Any]], config: Config) -> str:
    rows = [
        f"| shape ({config.connections:,} connections, TTL {config.ttl:g} s, {config.mode}) | groups "
        "| FCALL/s per 10k | commands/s per 10k (inside FCALL too) | Redis CPU per 10k | memory per 10k "
        "| FCALLs for the 10k joins |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rows.append(
            f"| {r['shape']} | {r['groups']:,} | {r['steady']['fcalls_per_second_per_10k']:g} "
            f"| {r['steady']['redis_commands_per_second_per_10k']:g} "
            f"| {r['steady']['redis_cpu_share_per_10k'] * 100:.3f}% of a core "
            f"| {r['memory']['mib_per_10k']:g} MiB | {r['join']['fcalls']:g} |"
        )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.presence_cost", description=__doc__.split("\n")[0])
    for name, default in asdict(Config()).items():
        p.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)
    p.add_argument("--json", default="", help="write the results, the command, the commit and versions here")
    args = p.parse_args(argv)
    config = Config(**{k: getattr(args, k) for k in asdict(Config())})
    started = time.monotonic()
    with Servers() as servers:
        server = servers.redis()
        results = asyncio.run(measure(server.url, config))
    table = markdown(results, config)
    print(table)
    if args.json:
        record = {
            "command": " ".join([".venv/bin/python -m loadtest.presence_cost", *(argv or sys.argv[1:])]),
            **environment(),
            "config": asdict(config),
            "seconds": round(time.monotonic() - started, 1),
            "results": results,
            "table": table,
        }
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

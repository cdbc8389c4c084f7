"""What per-group history costs: relay with history off and on for every group, side by side.

Issue 11 stores every message of a group that keeps history (service/rules.py) through one Lua
script (service/broker/history.py: offset, XADD to a capped stream, expiry, idempotency key, PUBLISH)
instead of one PUBLISH, and pods deliver it in order (service/sequencer.py). This run measures the
price, in one run, alternating history off and on round by round (the machine is shared and noisy:
compare medians and ratios, never one sample). Two pods, each on its own redis-server (free loopback
ports, never 6379): "off" has no rules file, "on" has `match = "*"` with `--history` and `--ttl`.

- steady: 1,000 subscribers in 100 groups, four publishers at a fixed rate well below saturation
  (`--rate`, 2,000 msg/s): CPU of the pod per message and per delivery, CPU of redis-server per
  message (both from /proc), delivery latency p50/p99. Before measuring, every group of the "on" arm
  gets max(1000, history) messages, so its stream and idempotency set are at their steady size.
- ramp: the highest publish rate whose step keeps p99 <= 100 ms with nothing lost (a failed step
  passes on 2 of 3 tries, as `make bench` does); later rounds start two steps under the last maximum.
- Redis (loadtest/history_redis.py), on a third redis-server: bytes per group and per stored
  message of ~200-byte frames and the idempotency set's share, for sizing; and redis-server CPU per
  PUBLISH and per APPEND script at its best batching, for Redis's ceiling.

Raw samples, medians, ratios, the command, the commit and the versions go to `--json`; the Markdown
tables printed at the end are what docs quote. A full run takes three to four minutes:

    .venv/bin/python -m loadtest.history_cost --json docs/results/history-cost.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import version
from typing import Any

from loadtest.engine import Fleet, Shape, _dumps, raise_fd_limit
from loadtest.history_redis import (
    MemorySample,
    measure_memory,
    measure_redis_cpu,
    summarize_memory,
    summarize_redis_cpu,
    window,
)
from loadtest.history_report import ARMS, P99_MS, bottleneck, markdown, step_record, summarize
from loadtest.servers import ROOT, Server, Servers, cpu_seconds
from loadtest.stats import Slo
from service.broker import open_broker
from service.config import Settings
from service.hub import Hub
from service.rules import GroupRule, GroupRules

RAMP = "3000,4000,4500,5000,5500,6000,6500,7000,7500,8000,9000,10000,12000,15000"
Log = Callable[[str], None]


@dataclass
class Config:
    subscribers: int = 1000
    groups: int = 100
    publishers: int = 4
    rate: float = 2000.0
    seconds: float = 4.0
    drain: float = 1.0
    rounds: int = 3
    frame_bytes: int = 200
    history: int = 100
    ttl: float = 300.0
    prefill: int = -1  # messages per group before measuring; -1: max(1000, history)
    ramp: str = RAMP
    ramp_seconds: float = 2.5
    ramp_drain: float = 1.0
    warmup: float = 1.0
    memory_groups: int = 100
    cpu_messages: int = 300
    quiet_wait: float = 20.0
    void_share: float = 0.3
    void_retries: int = 3

    def rates(self) -> list[float]:
        return [float(x) for x in self.ramp.split(",") if x.strip()]


HELP = {
    "subscribers": "subscribers per arm",
    "groups": "groups they are spread over",
    "publishers": "publisher connections",
    "rate": "messages per second in the steady shape",
    "seconds": "publishing time of a steady step",
    "drain": "wait after a step for late deliveries",
    "rounds": "rounds; each measures off and on, alternating which goes first",
    "frame_bytes": "size of the frame members receive",
    "history": "history size of the 'on' rule",
    "ttl": "ttl of the 'on' rule",
    "prefill": "messages per group stored before measuring (-1: max(1000, history))",
    "ramp": "comma-separated publish rates of the ramp",
    "ramp_seconds": "publishing time of a ramp step",
    "ramp_drain": "wait after a ramp step",
    "warmup": "seconds of an unrecorded step per arm before the first round (0: none)",
    "memory_groups": "groups filled in the memory shape (and the Redis CPU shape)",
    "cpu_messages": "messages per group in a sample of the Redis CPU shape",
    "quiet_wait": "most seconds a step waits for the rest of the machine to be idle (shared machines)",
    "void_share": "a step while other processes used more than this share of a core is void",
    "void_retries": "times a void step is run again before it counts anyway",
}


@dataclass
class Arm:
    """One side of the comparison: its pod, its redis-server, its connected subscribers."""

    name: str
    pod: Server
    redis: Server
    fleet: Fleet
    rebuilt: int = 0  # times the fleet was reconnected because the pod had closed subscribers


def machine_busy() -> float:
    """Busy CPU seconds of the whole machine so far (every process, other users' included)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


# --- steps -----------------------------------------------------------------------------------------


class Steps:
    """Measured steps: every one with a fresh tag (late frames of the last one are not duplicates),
    the CPU of both pods and both redis-servers, and the machine's."""

    def __init__(
        self, arms: dict[str, Arm], quiet_wait: float = 0.0, void_share: float = 1.0, void_retries: int = 0
    ) -> None:
        self.arms = arms
        self.void_share, self.void_retries = void_share, void_retries
        self.count = 0
        self.quiet_wait = quiet_wait  # seconds a step may wait for other users' jobs to calm down
        self.waited = 0.0

    def _cpu(self) -> dict[str, float]:
        out = {f"pod {a.name}": cpu_seconds(a.pod.pid) for a in self.arms.values()}
        out |= {f"redis {a.name}": cpu_seconds(a.redis.pid) for a in self.arms.values()}
        return out | {"machine": machine_busy()}

    async def run(self, arm: Arm, rate: float, seconds: float, drain: float) -> dict[str, Any]:
        await self._ensure_connected(arm)
        waited, busy = await self._quiet()
        self.count += 1
        before, t0, mine0 = self._cpu(), time.perf_counter(), time.process_time()
        slo = Slo(p99_ms=P99_MS, max_loss_ratio=0)
        task = asyncio.create_task(arm.fleet.step(rate, seconds, drain=drain, slo=slo, index=self.count))
        # The CPU while publishing too: a share of a core over the whole step, drain included,
        # would hide a pod that was saturated while the messages came in.
        await asyncio.sleep(seconds)
        mid, mine_mid = self._cpu(), time.process_time()
        summary = await task
        wall, mine = time.perf_counter() - t0, time.process_time() - mine0
        used = {k: v - before[k] for k, v in self._cpu().items()}
        publishing = {k: v - before[k] for k, v in mid.items()}
        step = step_record(arm.name, rate, seconds, summary, used, publishing, wall, mine, mine_mid - mine0)
        step |= {"waited_for_quiet_s": round(waited, 1), "machine_busy_before": busy and round(busy, 2)}
        await self.settle(arm)
        return step

    async def clean(
        self,
        arm: Arm,
        rate: float,
        seconds: float,
        drain: float,
        r: int,
        what: str,
        record: list[dict[str, Any]],
        log: Log,
    ) -> dict[str, Any]:
        """A step that other processes disturbed (more than `void_share` of a core while it
        published) is void: recorded, counted for nothing, and run again, up to `void_retries`
        times; the last try counts whatever happened (`contended` says so)."""
        for attempt in range(self.void_retries + 1):
            step = await self.run(arm, rate, seconds, drain) | {"round": r}
            step["contended"] = step["others_cpu_share"] > self.void_share
            step["void"] = step["contended"] and attempt < self.void_retries
            record.append(step)
            verdict = "" if step["ok"] else f" [{bottleneck(step)}]"
            log(_line(r, step, what) + (" VOID: run again" if step["void"] else verdict))
            if not step["void"]:
                break
        return step

    async def _quiet(self, sample: float = 0.5, most: float = 0.25) -> tuple[float, float | None]:
        """Before a step, with this run's processes idle: wait (up to `quiet_wait`) while the
        machine is busier than `most` of a core, i.e. other users' jobs would share the cores.
        The seconds waited and the last busy share seen; every step records both."""
        if self.quiet_wait <= 0:
            return 0.0, None
        started = time.monotonic()
        while True:
            b0 = machine_busy()
            await asyncio.sleep(sample)
            busy = (machine_busy() - b0) / sample
            waited = time.monotonic() - started
            if busy <= most or waited >= self.quiet_wait:
                self.waited += waited
                return waited, busy

    async def _ensure_connected(self, arm: Arm) -> None:
        """A pod that closed subscribers (slow consumers after an overloaded step) gets a new fleet,
        on the same group names, so every step measures the whole shape."""
        fleet = arm.fleet
        if all(not s.closed.done() for s in fleet.subscribers):
            return
        await fleet.close()
        fresh = Fleet(fleet.urls, fleet.shape, publishers=fleet.n_publishers)
        fresh.groups, fresh.pad = fleet.groups, fleet.pad
        await fresh.connect()
        arm.fleet, arm.rebuilt = fresh, arm.rebuilt + 1

    async def settle(self, arm: Arm, timeout: float = 5.0) -> None:
        """Wait until the pod and its Redis are idle again (a backlog must not leak into the next step)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            c0 = cpu_seconds(arm.pod.pid) + cpu_seconds(arm.redis.pid)
            await asyncio.sleep(0.1)
            if cpu_seconds(arm.pod.pid) + cpu_seconds(arm.redis.pid) - c0 <= 0.01:  # one clock tick
                return


def _line(r: int, step: dict[str, Any], what: str) -> str:
    return (
        f"{what} round {r} | history {step['arm']:>3} | {step['rate']:>7,.0f} msg/s: "
        f"p50 {step['p50_ms']:7.2f} p99 {step['p99_ms']:8.2f} ms, lost {step['lost']}, "
        f"pod {step['pod_us_per_message']:6.1f} us/msg ({step['pod_cpu_share']:.0%}), "
        f"redis {step['redis_us_per_message']:5.1f} us/msg ({step['redis_cpu_share']:.0%}), "
        f"gen {step['generator_cpu_share']:.0%}, others {step['others_cpu_share']:.0%} "
        f"{'ok' if step['ok'] else 'FAIL'}"
    )


def _order(r: int) -> tuple[str, ...]:
    """Round 1 off first, round 2 on first, ..."""
    return ARMS if r % 2 else ARMS[::-1]


async def steady(steps: Steps, config: Config, log: Log) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for r in range(1, config.rounds + 1):
        for name in _order(r):
            await steps.clean(
                steps.arms[name], config.rate, config.seconds, config.drain, r, "steady", out, log
            )
    return out


async def _confirmed(
    steps: Steps, arm: Arm, rate: float, config: Config, r: int, record: list[Any], log: Log
) -> bool:
    """A step that fails is tried twice more and passes on 2 of 3 (a shared machine is noisy)."""
    passes = attempts = 0
    while attempts < 3 and passes < 2 and attempts - passes < 2:
        step = await steps.clean(arm, rate, config.ramp_seconds, config.ramp_drain, r, "ramp", record, log)
        attempts += 1
        passes += step["ok"]
        step["attempt"] = attempts
        if step["ok"] and attempts == 1:
            return True
    return passes >= 2


async def ramp_arm(steps: Steps, arm: Arm, config: Config, r: int, start: int, log: Log) -> dict[str, Any]:
    """Up from `rates[start]` to the first rate that fails; down from it if it fails at once."""
    rates = config.rates()
    record: list[dict[str, Any]] = []
    best: float | None = None
    i, going_down = start, False
    while 0 <= i < len(rates):
        if await _confirmed(steps, arm, rates[i], config, r, record, log):
            best = rates[i]
            if going_down:
                break
            i += 1
        elif best is not None:
            break
        else:
            going_down, i = True, i - 1
    failed = [s for s in record if not s["ok"] and not s["void"] and s["rate"] > (best or 0)]
    limit = bottleneck(failed[-1]) if failed else "not reached: the top of the ramp was sustained"
    others = statistics.median(s["others_cpu_share"] for s in record) if record else 0.0
    return {
        "arm": arm.name,
        "round": r,
        "max_rate": best or 0.0,
        "limit": limit,
        "others_cpu_share_median": others,  # other users' jobs, in a share of one core
        "steps": record,
    }


async def ramps(steps: Steps, config: Config, log: Log) -> list[dict[str, Any]]:
    rates = config.rates()
    out: list[dict[str, Any]] = []
    start = dict.fromkeys(ARMS, 0)
    for r in range(1, config.rounds + 1):
        for name in _order(r):
            result = await ramp_arm(steps, steps.arms[name], config, r, start[name], log)
            out.append(result)
            log(f"ramp round {r} | history {name:>3}: {result['max_rate']:,.0f} msg/s; {result['limit']}")
            if result["max_rate"] in rates:
                start[name] = max(0, rates.index(result["max_rate"]) - 2)
    return out


# --- setting up ------------------------------------------------------------------------------------


def _pad(fleet: Fleet, frame_bytes: int) -> str:
    """Padding that makes the engine's messages reach members as frames of about `frame_bytes`."""
    body: dict[str, Any] = {"task": "send_message_to_group", "group_name": fleet.groups[-1]}
    body["p"] = f"{fleet.run}s99p3"
    body |= {"s": 12345, "t": time.time(), "pad": ""}
    frame = len('{"message":') + len(_dumps(body)) + 1
    return "x" * max(0, frame_bytes - frame)


async def prefill(url: str, groups: list[str], config: Config) -> float:
    """Store max(1000, history) messages (or --prefill) in each group through relay's own publish
    path, before anyone subscribes, so the "on" arm is measured at its steady size; seconds taken."""
    count = window(config.history) if config.prefill < 0 else config.prefill
    broker = open_broker(Settings.from_env({}, broker_url=url, pod_id="history-cost-prefill"))
    rule = GroupRule(match="*", history=config.history, ttl=config.ttl, latest=False)
    hub = Hub(broker, "history-cost-prefill", rules=GroupRules([rule]))
    started = time.perf_counter()

    async def fill(group: str) -> None:
        frame = '{"message":{"prefill":"' + "x" * max(0, config.frame_bytes - 26) + '"}}'
        for _ in range(count):
            await hub.publish(group, frame)

    try:
        await asyncio.gather(*(fill(g) for g in groups))
    finally:
        await broker.close()
    return time.perf_counter() - started


async def measure(config: Config, servers: dict[str, tuple[Server, Server]], log: Log) -> dict[str, Any]:
    shape = Shape.uniform(config.subscribers, config.groups)
    arms = {
        name: Arm(name, pod, redis, Fleet([pod.url], shape, publishers=config.publishers))
        for name, (pod, redis) in servers.items()
    }
    for arm in arms.values():
        arm.fleet.pad = _pad(arm.fleet, config.frame_bytes)
    on = arms["on"]
    took = await prefill(on.redis.url, on.fleet.groups, config)
    log(f"prefill: {len(on.fleet.groups)} groups of the 'on' arm filled in {took:.1f} s")
    steps = Steps(arms, config.quiet_wait, config.void_share, config.void_retries)
    try:
        for arm in arms.values():
            rate = await arm.fleet.connect()
            if arm.fleet.connections["errors"]:
                raise RuntimeError(f"connect errors: {arm.fleet.connections['error_kinds']!r}")
            log(
                f"connected {len(arm.fleet.subscribers)} subscribers to the '{arm.name}' pod at {rate:,.0f}/s"
            )
        for arm in arms.values():  # not recorded: scripts loaded, caches and buffers grown
            if config.warmup > 0:
                await steps.run(arm, config.rate, config.warmup, config.drain)
        steady_steps = await steady(steps, config, log)
        ramp_results = await ramps(steps, config, log)
    finally:
        for arm in arms.values():
            await arm.fleet.close()
    return {
        "steady": steady_steps,
        "ramps": ramp_results,
        "fleets_rebuilt": {a.name: a.rebuilt for a in arms.values()},
        "prefill_seconds": round(took, 1),
        "waited_for_quiet_seconds": round(steps.waited, 1),
    }


# --- environment and main --------------------------------------------------------------------------


def _run(*argv: str) -> str:
    try:
        return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def environment() -> dict[str, Any]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in _run("lscpu").splitlines() if "Model name" in ln), "")
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    dirty = _run("git", "status", "--porcelain").splitlines()
    server = _run("redis-server", "--version")
    return {
        "git_commit": _run("git", "rev-parse", "HEAD"),
        "git_clean": not dirty,
        "git_dirty_files": [line[3:] for line in dirty],
        "versions": {
            "python": platform.python_version(),
            **{p: version(p) for p in ("uvicorn", "websockets", "starlette", "uvloop", "orjson", "redis")},
            "redis-server": server.split(" sha=")[0].removeprefix("Redis server v="),
        },
        "machine": {
            "cpu": cpu,
            "cpus": os.cpu_count(),
            "memory_gib": round(mem_kib / 2**20, 1),
            "kernel": platform.release(),
            "loadavg_at_start": os.getloadavg(),
        },
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def start_servers(servers: Servers, config: Config, rules_dir: str) -> dict[str, tuple[Server, Server]]:
    """Per arm (off, on): its redis-server and its pod; a third redis-server for the memory shape."""
    rules = os.path.join(rules_dir, "groups.toml")
    with open(rules, "w") as f:
        f.write(f'[[group]]\nmatch = "*"\nhistory = {config.history}\nttl = {config.ttl:g}\n')
    out = {}
    for name in ARMS:
        redis = servers.redis()
        extra = {"RELAY_GROUP_RULES_FILE": rules} if name == "on" else {}
        out[name] = (servers.relay(redis.url, f"relay-{name}", **extra), redis)
    return out


def _loop_run(coro: Any) -> Any:
    """uvloop when present, as the pods and the engine use."""
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def parse_args(argv: Sequence[str] | None) -> tuple[Config, argparse.Namespace]:
    first = (__doc__ or "").split("\n\n")
    p = argparse.ArgumentParser(
        prog="python -m loadtest.history_cost",
        description=first[0],
        epilog="\n\n".join(first[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults = Config()
    for name, text in HELP.items():
        default = getattr(defaults, name)
        p.add_argument(
            "--" + name.replace("_", "-"),
            type=type(default),
            default=default,
            help=f"{text} (default %(default)s)",
        )
    p.add_argument("--json", default="", help="write raw samples, summary, command and versions here")
    args = p.parse_args(argv)
    return Config(**{name: getattr(args, name) for name in HELP}), args


def main(argv: Sequence[str] | None = None) -> int:
    config, args = parse_args(argv)
    started = time.perf_counter()
    info = environment()
    raise_fd_limit()  # before the pods start: they inherit it

    def log(line: str) -> None:
        print(line, flush=True)

    workdir = tempfile.mkdtemp(prefix="relay-history-cost-")
    memory_samples: list[MemorySample] = []
    cpu_samples: list[dict[str, Any]] = []
    with Servers() as servers:
        try:
            pairs = start_servers(servers, config, workdir)
            memory_redis = servers.redis()
            result = _loop_run(measure(config, pairs, log))
            shape: dict[str, Any] = {
                "history": config.history,
                "ttl": config.ttl,
                "frame_bytes": config.frame_bytes,
            }
            shape |= {"groups": config.memory_groups, "rounds": config.rounds}
            memory_samples = _loop_run(measure_memory(memory_redis.url, **shape, log=log))
            cpu_samples = _loop_run(
                measure_redis_cpu(
                    memory_redis.url, memory_redis.pid, **shape, messages=config.cpu_messages, log=log
                )
            )
        finally:
            servers.stop_all()
            shutil.rmtree(workdir, ignore_errors=True)
    shutil.rmtree(servers.logdir, ignore_errors=True)
    summary = summarize(result["steady"], result["ramps"])
    memory = summarize_memory(memory_samples)
    redis_cpu = summarize_redis_cpu(cpu_samples)
    table = markdown(summary, memory, redis_cpu, asdict(config))
    print(table, flush=True)
    info["machine"]["loadavg_at_end"] = os.getloadavg()
    if args.json:
        out = {
            "command": " ".join(
                [
                    os.path.relpath(sys.executable, ROOT),
                    "-m",
                    "loadtest.history_cost",
                    *(argv or sys.argv[1:]),
                ]
            ),
            **info,
            "config": asdict(config) | {"dedupe_window": window(config.history)},
            "seconds": round(time.perf_counter() - started, 1),
            "summary": summary,
            "memory_summary": memory,
            "redis_cpu_summary": redis_cpu,
            "table_markdown": table,
            **result,
            "memory_samples": [s.to_dict() for s in memory_samples],
            "redis_cpu_samples": cpu_samples,
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
            f.write("\n")
        log(f"wrote {args.json} in {out['seconds']} s")
    return 0 if summary["all_steady_steps_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""CPU per delivered frame of one server for a fixed fan-out, counted deterministically (issue 17).

Starts the server under `valgrind --tool=callgrind --instr-atstart=no`, connects N members of one
group and a publisher (the load engine's raw client, in this process), sends a few broadcasts to
warm up, then switches instrumentation on (`callgrind_control -i on`), zeroes the counters, sends K
broadcasts one after another (each waits until every member has it), dumps the counters and divides
the server's instructions by N x K. That is user-space instructions of the server process (Python,
uvloop, libuv, libc); the kernel's send path is the same for every server and not counted. The
publisher's frame, the event loop's wake-ups and the rest of each message's path are in the count,
shared by the N deliveries of each message.

    .venv/bin/python -m loadtest.delivery_cost --members 1000 --broadcasts 20 \
        --target relay=. --target base=/work/lean-base --target minimal --json out.json

A target is `NAME=PATH` (relay's `python -m service` from the work tree at PATH, run with this
interpreter: compare two commits by checking one out elsewhere) or `minimal` (loadtest/peers/
minimal.py, the asyncio + uvloop floor). Pods use the memory broker (or `--broker URL`), no keepalive pings
(RELAY_PING_INTERVAL=0: they would land in the window at random) and no rate limits. `--cpu` runs
the same without valgrind and reports CPU seconds per delivery from /proc instead (noisy on a
shared machine: alternate targets over `--rounds`).

`--members` given twice also solves c(n) = d + m / n for each target: m, what one message costs
whatever its fan-out, and d, what each member adds (the Python limit pays both too):

    .venv/bin/python -m loadtest.delivery_cost --members 10 --members 1000 --broadcasts 40 \
        --target relay=. --target minimal

`--connections N` counts the other cost a server pays per client: N handshakes (each up to its
welcome frame, 50 at a time), then their N closes, each phase once the server is quiet:

    .venv/bin/python -m loadtest.delivery_cost --connections 500 --target relay=. --target minimal
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script too
from loadtest.engine import raise_fd_limit
from loadtest.fanout import Stats, open_members
from loadtest.servers import ROOT, cpu_seconds, free_port, wait_port


class Target:
    def __init__(self, spec: str, broker: str = "memory://") -> None:
        self.broker = broker
        self.name, _, path = spec.partition("=")
        self.root = os.path.abspath(path) if path else ROOT
        self.minimal = self.name == "minimal" and not path

    def argv(self, port: int, internal: int) -> tuple[list[str], dict[str, str]]:
        env = {**os.environ, "PYTHONPATH": self.root}
        if self.minimal:
            return [sys.executable, "-m", "loadtest.peers.minimal", "--port", str(port)], env
        env |= {
            "RELAY_PORT": str(port),
            "RELAY_INTERNAL_PORT": str(internal),
            "RELAY_BROKER_URL": self.broker,
            "RELAY_PUBLISH_RATE": "0",
            "RELAY_MAX_CONNECTIONS": "20000",
            "RELAY_LOG_LEVEL": "WARNING",
            "RELAY_CONSOLE": "false",
            "RELAY_PING_INTERVAL": "0",
            "RELAY_DRAIN_DELAY": "0",
        }
        return [sys.executable, "-m", "service"], env

    def commit(self) -> str:
        out = subprocess.run(["git", "-C", self.root, "rev-parse", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "-C", self.root, "status", "--porcelain"], capture_output=True, text=True
        )
        return out.stdout.strip() + (" (dirty)" if dirty.stdout.strip() else "")


def callgrind_total(directory: str) -> int:
    """Instructions in the latest callgrind dump in `directory`."""
    newest = max(glob.glob(os.path.join(directory, "cg.*")), key=os.path.getmtime)
    with open(newest) as f:
        for line in f:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise RuntimeError(f"no totals in {newest}")


def control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True, timeout=300)


def spawn(argv: list[str], env: dict[str, str], cwd: str, directory: str) -> subprocess.Popen[bytes]:
    with open(os.path.join(directory, "server.log"), "wb") as log:
        return subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)


async def quiet(pid: int, window: float) -> None:
    """Until the server spent under 2% of `window` on CPU over it (done with what it was sent)."""
    last = cpu_seconds(pid)
    while True:
        await asyncio.sleep(window)
        now = cpu_seconds(pid)
        if now - last < 0.02 * window:
            return
        last = now


async def handshakes(pid: int, port: int, n: int, directory: str | None) -> dict[str, float]:
    """The server's cost of n handshakes (up to the welcome frame each), then of their n closes:
    instructions under callgrind (`directory` holds its dumps), CPU seconds from /proc otherwise."""
    out: dict[str, float] = {}
    window = 2.0 if directory else 0.5
    members: list[Any] = []
    for phase in ("open", "close"):
        await quiet(pid, window)
        if directory:
            control("-z", str(pid))
        cpu0 = cpu_seconds(pid)
        if phase == "open":
            members, _ = await open_members("127.0.0.1", port, "/c", n, Stats(expected=n), 50)
        else:
            for member in members:
                member.close()
            await quiet(pid, window)
        if directory:
            control("-d", str(pid))
            out[f"instructions_per_{phase}"] = round(callgrind_total(directory) / n)
        else:
            out[f"cpu_us_per_{phase}"] = round((cpu_seconds(pid) - cpu0) / n * 1e6, 1)
    return out


async def one(
    target: Target, members: int, broadcasts: int, callgrind: bool, connections: int = 0
) -> dict[str, Any]:
    port, internal = free_port(), free_port()
    argv, env = target.argv(port, internal)
    directory = tempfile.mkdtemp(prefix="delivery-cost-")
    if callgrind:
        argv = [
            "valgrind", "--tool=callgrind", "--instr-atstart=no",
            f"--callgrind-out-file={directory}/cg.%p", *argv,
        ]  # fmt: skip
    proc = spawn(argv, env, target.root, directory)
    try:
        wait_port(port, proc, timeout=600)
        if connections:
            if callgrind:
                control("-i", "on", str(proc.pid))
            found = await handshakes(proc.pid, port, connections, directory if callgrind else None)
            return {"target": target.name, "connections": connections, **found}
        stats = Stats(expected=members)
        group, _ = await open_members("127.0.0.1", port, "/bench", members, stats, 50)
        (publisher,), _ = await open_members("127.0.0.1", port, "/publisher", 1, Stats(expected=1), 1)
        timeout = 600 if callgrind else 30

        async def broadcast(i: int) -> None:
            body = {"task": "send_message_to_group", "group_name": "bench", "seq": i, "pad": "x" * 60}
            publisher.send_text(json.dumps(body).encode())
            await stats.wait(i, timeout)

        warm = 3
        for i in range(1, warm + 1):
            await broadcast(i)
        if callgrind:
            control("-i", "on", str(proc.pid))
            control("-z", str(proc.pid))
        cpu0 = cpu_seconds(proc.pid)
        started = time.perf_counter()
        for i in range(warm + 1, warm + broadcasts + 1):
            await broadcast(i)
        elapsed = time.perf_counter() - started
        cpu = cpu_seconds(proc.pid) - cpu0
        result: dict[str, Any] = {"target": target.name, "members": members, "broadcasts": broadcasts}
        deliveries = members * broadcasts
        if callgrind:
            control("-d", str(proc.pid))
            result["instructions_per_delivery"] = round(callgrind_total(directory) / deliveries)
        else:
            result["cpu_us_per_delivery"] = round(cpu / deliveries * 1e6, 2)
            result["seconds"] = round(elapsed, 3)
        for member in (*group, publisher):
            member.close()
        return result
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(directory, ignore_errors=True)


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    raise_fd_limit()
    targets = [Target(spec, args.broker) for spec in args.target]
    results = []
    sizes = args.members or [1000]
    for round_ in range(1, args.rounds + 1):
        for target in targets:
            for members in sizes:
                result = await one(target, members, args.broadcasts, not args.cpu, args.connections)
                result["round"] = round_
                print(json.dumps(result), flush=True)
                results.append(result)
            if len(sizes) > 1 and not args.connections:
                found = split(results[-len(sizes) :])
                print(json.dumps(found), flush=True)
                results.append(found)
    return results


def split(results: list[dict[str, Any]]) -> dict[str, Any]:
    """A server's cost per delivery is c(n) = d + m / n for n members per message: m, what each
    message costs whatever its fan-out (reading the publisher's frame, the broker, waking tasks),
    and d, what each member adds. Solved from the smallest and the largest n of one round."""
    key = "instructions_per_delivery" if "instructions_per_delivery" in results[0] else "cpu_us_per_delivery"
    small, large = min(results, key=lambda r: r["members"]), max(results, key=lambda r: r["members"])
    n1, n2, c1, c2 = small["members"], large["members"], small[key], large[key]
    per_message = (c1 - c2) / (1 / n1 - 1 / n2)
    unit = key.removesuffix("_per_delivery")
    return {
        "target": small["target"],
        "round": small["round"],
        "split_from_members": [n1, n2],
        f"{unit}_per_message": round(per_message, 2 if unit.startswith("cpu") else None),
        f"{unit}_per_member": round(c2 - per_message / n2, 2 if unit.startswith("cpu") else None),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", action="append", required=True, help="NAME=PATH (relay work tree) or minimal")
    p.add_argument(
        "--members",
        type=int,
        action="append",
        help="members of the group (default 1,000); given twice or more, also splits each target's "
        "cost into a part per message and a part per member",
    )
    p.add_argument("--broadcasts", type=int, default=20)
    p.add_argument("--broker", default="memory://", help="relay's RELAY_BROKER_URL (default memory://)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument(
        "--connections",
        type=int,
        default=0,
        help="measure handshakes and closes of this many connections instead of deliveries",
    )
    p.add_argument("--cpu", action="store_true", help="no valgrind: CPU seconds from /proc instead")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    import uvloop

    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    results = uvloop.run(run(args))
    if args.json:
        out = {
            "command": ".venv/bin/python -m loadtest.delivery_cost " + " ".join(sys.argv[1:]),
            "date": date,
            "targets": {t.name: {"root": t.root, "commit": t.commit()} for t in map(Target, args.target)},
            "broker": args.broker,
            "python": platform.python_version(),
            "valgrind": ""
            if args.cpu
            else subprocess.run(["valgrind", "--version"], capture_output=True, text=True).stdout.strip(),
            "results": results,
        }
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()

"""A py-spy flame graph of one relay pod at the headline shape: where a pod's CPU goes.

One pod on its own redis-server (free loopback ports), started under `py-spy record` (sampling at
--sample-rate per second, native frames off); 1,000 subscribers in 100 groups connect, then four
publishers send --rate messages per second for --seconds, and the profile covers that whole window
(connecting included, at its start). Writes the SVG and a JSON with the command, the commit, the
versions and the load actually delivered:

    .venv-load/bin/python -m loadtest.flame --out docs/plots/flame-relay.svg
    .venv-load/bin/python -m loadtest.flame --connections 2000 --out docs/plots/flame-connect.svg

The second profiles handshakes instead: rounds of 2,000 new connections, each closed before the next.

Open the SVG in a browser (it is interactive: click to zoom, search with Ctrl+F).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from importlib.metadata import version
from typing import Any

from loadtest.engine import Fleet, Shape, raise_fd_limit
from loadtest.servers import MAIN_PYTHON, ROOT, Servers, free_port, wait_port


def git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.rstrip()  # not strip(): porcelain lines start with a space


async def drive(url: str, rate: float, seconds: float) -> dict[str, Any]:
    fleet = Fleet([url], Shape.uniform(1000, 100), publishers=4)
    connect_s = await fleet.connect()
    step = await fleet.step(rate, seconds)
    await fleet.close()
    return {"connect_seconds": connect_s, "step": step}


async def churn(url: str, connections: int, seconds: float) -> dict[str, Any]:
    """Rounds of `connections` new sockets (100 at a time), each round closed before the next."""
    rates: list[float] = []
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        fleet = Fleet([url], Shape("churn", [connections]), publishers=1, connect_concurrency=100)
        rates.append(await fleet.connect())
        await fleet.close()
    return {"connect_per_s": rates, "step": {"rounds": len(rates), "connections": connections}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "plots", "flame-relay.svg"))
    p.add_argument("--rate", type=float, default=2000.0, help="publishes per second (10 deliveries each)")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--sample-rate", type=int, default=250)
    p.add_argument(
        "--connections",
        type=int,
        default=0,
        help="profile handshakes instead: rounds of this many new connections, for --seconds",
    )
    p.add_argument("--native", action="store_true", help="py-spy --native: C frames (uvloop) too")
    args = p.parse_args()
    raise_fd_limit()
    commit, dirty = git("rev-parse", "HEAD"), [line[3:] for line in git("status", "--porcelain").splitlines()]
    pyspy = os.path.join(os.path.dirname(sys.executable), "py-spy")
    python = MAIN_PYTHON if os.path.exists(MAIN_PYTHON) else sys.executable
    with Servers() as servers:
        redis = servers.redis()
        port, internal = free_port(), free_port()
        env = {
            **os.environ,
            "RELAY_PORT": str(port),
            "RELAY_INTERNAL_PORT": str(internal),
            "RELAY_BROKER_URL": redis.url,
            "RELAY_PUBLISH_RATE": "0",
            "RELAY_LOG_LEVEL": "WARNING",
            "RELAY_CONSOLE": "false",
        }
        duration = int(args.seconds + 15)  # connecting, the publishing window, and the drain
        argv = [pyspy, "record", "--format", "flamegraph", "--rate", str(args.sample_rate), "--duration",
                str(duration), "-o", args.out, *(["--native"] if args.native else []),
                "--", python, "-m", "service"]  # fmt: skip
        with open(os.path.join(servers.logdir, "py-spy.log"), "wb") as log:
            proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_port(port, proc)
            url = f"ws://127.0.0.1:{port}"
            load = asyncio.run(
                churn(url, args.connections, args.seconds)
                if args.connections
                else drive(url, args.rate, args.seconds)
            )
        finally:
            proc.wait(timeout=duration + 60)  # py-spy stops at --duration, writes the SVG, ends the pod
    summary = load["step"].get("summary", load["step"])
    result = {
        "command": " ".join([".venv-load/bin/python -m loadtest.flame", *sys.argv[1:]]),
        "git_commit": commit,
        "git_dirty_files": dirty,  # before the run: its own output is not a change
        "versions": {"python": platform.python_version(), "py-spy": version("py-spy")},
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "shape": f"rounds of {args.connections} new connections, each round closed before the next"
        if args.connections
        else "1000 subscribers in 100 groups, 4 publishers",
        "rate": None if args.connections else args.rate,
        "seconds": args.seconds,
        "sample_rate": args.sample_rate,
        "svg": os.path.relpath(args.out, ROOT),
        "load": {k: v for k, v in load.items() if k != "step"} | {"summary": summary},
    }
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        f.write(json.dumps(result, indent=1, default=str) + "\n")
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()

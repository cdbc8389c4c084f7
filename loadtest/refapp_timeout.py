"""Why the reference app delivered 4,998 of 5,000 on the first broadcast and nothing on the next four.

redis-py 6 and later read every reply with a 5 s socket timeout by default; channels_redis's core
layer receives with `BZPOPMIN ... 5`, which Redis answers after 5 s when nothing came. On a loaded
event loop the reply loses that race, redis-py raises TimeoutError inside the consumer's receive,
and Channels closes the socket with 1011: members drop out one after another, and once the
benchmark's publisher is among them, later broadcasts are never sent. This experiment runs the
reference app (loadtest/peers/refapp under daphne, as `make bench` does) with N idle members and one
publisher, five broadcasts, with the layer's Redis connections as installed and with
`socket_timeout=None`, side by side:

    .venv-load/bin/python -m loadtest.refapp_timeout --members 1000 --json docs/results/refapp-timeout.json
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
from loadtest.servers import ROOT, Servers


async def broadcasts(url: str, members: int, count: int) -> list[dict[str, Any]]:
    fleet = Fleet([url], Shape("idle", [members]), publishers=1, connect_concurrency=100)
    await fleet.connect()
    await asyncio.sleep(3.0)
    out = []
    try:
        for _ in range(count):
            b = await fleet.broadcast(0, timeout=15)
            closed = [p.closed.result() for p in fleet.publishers if p.closed.done()]
            out.append(
                {
                    "received": b["received"],
                    "members": members,
                    "publisher_closed_with": closed[0] if closed else None,
                    "members_closed": sum(1 for s in fleet.subscribers if s.closed.done()),
                }
            )
            await asyncio.sleep(0.5)
    finally:
        await fleet.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--members", type=int, default=1000)
    p.add_argument("--broadcasts", type=int, default=5)
    p.add_argument("--json", default="")
    args = p.parse_args()
    raise_fd_limit()
    result: dict[str, Any] = {"arms": {}}
    for arm in ("installed", "none"):
        os.environ["REFAPP_SOCKET_TIMEOUT"] = arm
        with Servers() as servers:
            redis = servers.redis()
            django = servers.django(redis.url)
            runs = asyncio.run(broadcasts(django.url, args.members, args.broadcasts))
            with open(django.log, errors="replace") as f:
                log = f.read()
        result["arms"][arm] = {
            "broadcasts": runs,
            "consumer_exceptions": log.count("Exception inside application"),
            "redis_timeouts": log.count("redis.exceptions.TimeoutError: Timeout reading"),
        }
        print(arm, [b["received"] for b in runs], result["arms"][arm]["consumer_exceptions"], flush=True)

    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=False).stdout

    result |= {
        "command": " ".join([".venv-load/bin/python -m loadtest.refapp_timeout", *sys.argv[1:]]),
        "git_commit": git("rev-parse", "HEAD").strip(),
        "git_dirty_files": [line[3:] for line in git("status", "--porcelain").splitlines()],
        "versions": {n: version(n) for n in ("redis", "channels-redis", "channels", "daphne", "django")}
        | {"python": platform.python_version()},
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if args.json:
        with open(args.json, "w") as f:
            f.write(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

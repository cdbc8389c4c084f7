"""What one idle WebSocket costs a relay pod in memory, and where it goes (docs/performance.md).

Starts a fresh pod (a child process running `PodServer` as `python -m service` does, on uvloop),
opens N idle connections to one group with the load engine's raw client (a real RFC 6455 handshake,
then silence), and reports per connection:

- RSS growth of the pod (`/proc/<pid>/statm`), in a pod without tracemalloc. Kernel socket buffers
  are not in a process's RSS and so not counted.
- Python allocations still alive, from tracemalloc in a second fresh pod (snapshot after start-up
  against snapshot with N connections, after `gc.collect()` both times): in all, by library, and
  by allocation site. A site is the innermost frame outside the standard library (the code that
  asked: `asyncio.Queue()` in uvicorn is charged to that line of uvicorn), with the innermost frame
  itself (the allocator) beside it.
- Objects by type (`gc.get_objects()`, before and after): how many of each one connection adds.

    .venv/bin/python -m loadtest.conn_memory --connections 10000 --trace-connections 2000 \
        --json docs/results/conn-memory-before.json

`--root PATH` measures the relay work tree at PATH (another commit, checked out elsewhere) with
this script; `--broker redis` runs the pods on a redis-server started for the run (as `make bench` does);
`--env KEY=VALUE` passes settings to the pods; `--browser-headers` adds the headers a browser sends
(Origin, User-Agent, Sec-WebSocket-Extensions, ...) to every handshake.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import contextlib
import gc
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
import tracemalloc
from collections import Counter
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script too
from loadtest.engine import HANDSHAKE_KEY, WsClient, raise_fd_limit
from loadtest.servers import ROOT, Servers, free_port, rss_bytes

PACKAGES = ("uvicorn", "websockets", "starlette", "uvloop", "httptools", "structlog", "prometheus-client")
STDLIB = os.path.dirname(os.__file__)
MEASURED = [ROOT]  # the work tree whose `service` the pod runs (--root)
BROWSER_HEADERS = (
    "Origin: http://127.0.0.1\r\n"
    "User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36\r\n"
    "Accept-Encoding: gzip, deflate, br, zstd\r\nAccept-Language: en-GB,en;q=0.9\r\n"
    "Cache-Control: no-cache\r\nPragma: no-cache\r\n"
    "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
)


# ---------------------------------------------------------------------------------------------
# The pod side (a child process): `python -m loadtest.conn_memory --serve [--trace FRAMES]`


def library(filename: str) -> str:
    """Which library a source file belongs to: relay, a site-packages package, asyncio, stdlib."""
    if filename.startswith("<frozen") or filename == "<unknown>":
        return "C / interpreter" if filename == "<unknown>" else "stdlib"
    if "site-packages" in filename:
        return filename.split("site-packages" + os.sep, 1)[1].split(os.sep, 1)[0].removesuffix(".py")
    if filename.startswith(os.path.join(MEASURED[0], "service")):
        return "relay"
    if filename.startswith(os.path.join(STDLIB, "asyncio")):
        return "asyncio"
    if filename.startswith(STDLIB):
        return "stdlib"
    return "other"


def short(filename: str) -> str:
    for marker in ("site-packages" + os.sep, MEASURED[0] + os.sep, ROOT + os.sep, STDLIB + os.sep):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


LOOP = "uvloop (C: no Python frame)"


def owner(traceback: tracemalloc.Traceback) -> tuple[str, str, str]:
    """(site, library, function): the innermost frame outside the standard library, the code that
    asked. Allocations with only the event loop's runner on the stack were made by uvloop's C code
    (transports, sockets, handles), called from no Python code."""
    frames = list(traceback)  # oldest first
    for frame in reversed(frames):
        lib = library(frame.filename)
        if frame.filename == __file__ or frame.filename.endswith(os.path.join("loadtest", "conn_memory.py")):
            return LOOP, LOOP, LOOP
        if lib not in ("asyncio", "stdlib"):
            break
    site = f"{short(frame.filename)}:{frame.lineno}"
    return site, library(frame.filename), function_at(frame.filename, frame.lineno)


_functions: dict[str, list[tuple[int, int, str]]] = {}


def function_at(filename: str, lineno: int) -> str:
    """The qualified name of the innermost function or class around `lineno` of `filename`."""
    if filename not in _functions:
        spans: list[tuple[int, int, str]] = []
        try:
            with open(filename) as f:
                tree = ast.parse(f.read())
        except (OSError, SyntaxError):
            tree = ast.Module(body=[], type_ignores=[])

        def walk(node: ast.AST, prefix: str) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    name = prefix + child.name
                    spans.append((child.lineno, child.end_lineno or child.lineno, name))
                    walk(child, name + ".")

        walk(tree, "")
        _functions[filename] = spans
    inside = [(start, name) for start, end, name in _functions[filename] if start <= lineno <= end]
    return max(inside)[1] if inside else "<module>"


def type_counts() -> Counter[str]:
    return Counter(type(o).__qualname__ for o in gc.get_objects())


class Probe:
    """Answers the parent on stdin: `count` (connections held), `base` (remember now), `report`
    (what changed since base). Also times the collector's passes in between."""

    def __init__(self, pod: Any, trace: bool) -> None:
        self.pod = pod
        self.trace = trace
        self.base: tracemalloc.Snapshot | None = None
        self.types: Counter[str] = Counter()
        self.blocks = 0
        self.collections = [0, 0, 0]
        self.gc_seconds = 0.0
        self._gc_started = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self.gc_seconds += time.perf_counter() - self._gc_started

    def handle(self, line: str) -> dict[str, Any]:
        if line == "count":
            return {"connections": self.pod.hub.connection_count()}
        collections = [g["collections"] for g in gc.get_stats()]
        gc_seconds = self.gc_seconds
        rss_uncollected = rss_bytes(os.getpid())  # as `make bench` reads it: no collection forced
        gc.collect()
        if line == "base":
            self.types = type_counts()
            self.blocks = sys.getallocatedblocks()
            if self.trace:
                self.base = tracemalloc.take_snapshot()
            self.collections = [g["collections"] for g in gc.get_stats()]
            self.gc_seconds = 0.0
            return {"rss": rss_bytes(os.getpid())}
        types = type_counts() - self.types
        answer: dict[str, Any] = {
            "rss": rss_bytes(os.getpid()),
            "rss_uncollected": rss_uncollected,
            "connections": self.pod.hub.connection_count(),
            "allocated_blocks": sys.getallocatedblocks() - self.blocks,
            "types": dict(types.most_common(40)),
            "gc_while_connecting": {
                "collections_by_generation": [
                    a - b for a, b in zip(collections, self.collections, strict=True)
                ],
                "seconds": round(gc_seconds, 4),
                "frozen_objects": gc.get_freeze_count(),
                "thresholds": gc.get_threshold(),
            },
        }
        if self.trace and self.base is not None:
            snapshot = tracemalloc.take_snapshot()
            sites: dict[tuple[str, str, str, str], list[int]] = {}
            for stat in snapshot.compare_to(self.base, "traceback"):
                if stat.size_diff == 0 and stat.count_diff == 0:
                    continue
                site, lib, function = owner(stat.traceback)
                inner = stat.traceback[-1]
                key = (site, f"{short(inner.filename)}:{inner.lineno}", lib, function)
                entry = sites.setdefault(key, [0, 0])
                entry[0] += stat.size_diff
                entry[1] += stat.count_diff
            answer["sites"] = [
                {"site": s, "allocator": a, "library": lib, "function": fn, "bytes": b, "blocks": c}
                for (s, a, lib, fn), (b, c) in sorted(sites.items(), key=lambda kv: -kv[1][0])
            ]
        return answer


async def serve(trace: int, thresholds: list[int]) -> None:
    """The pod as `python -m service` runs it (`service.server.serve`: `PodServer.serve` with
    `settle_gc` after start-up where the tree has it), plus the probe."""
    from service import server as module
    from service.config import Settings

    settings = Settings.from_env()
    server = module.PodServer(settings)
    settle = getattr(module, "settle_gc", None)  # what `service.server.serve` runs after start-up
    serving = server.serve(on_started=settle) if settle else server.serve()
    running = asyncio.get_running_loop().create_task(serving)
    while True:  # until the pod accepts connections
        try:
            _, writer = await asyncio.open_connection(settings.host, settings.port)
        except OSError:
            if running.done():
                await running  # re-raise why it stopped
            await asyncio.sleep(0.05)
            continue
        writer.close()
        break
    if thresholds:
        gc.set_threshold(*thresholds)
    if trace:
        tracemalloc.start(trace)
    probe = Probe(server.pod, bool(trace))
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str] = asyncio.Queue()
    loop.add_reader(sys.stdin.fileno(), lambda: lines.put_nowait(sys.stdin.readline()))
    print(json.dumps({"port": settings.port}), flush=True)
    while (line := (await lines.get()).strip()) not in ("", "quit"):
        print(json.dumps(probe.handle(line)), flush=True)
    loop.remove_reader(sys.stdin.fileno())
    await server.shutdown()
    running.cancel()


def serve_main(trace: int, root: str, thresholds: list[int]) -> None:
    sys.path.insert(0, root)  # relay's `service` from the work tree measured
    MEASURED[0] = root
    import uvloop

    from service.logs import configure_logging

    configure_logging(True, "WARNING")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(trace, thresholds))


# ---------------------------------------------------------------------------------------------
# The measuring side


class Pod:
    """A child pod and the line protocol to its probe."""

    def __init__(self, env: dict[str, str], trace: int, root: str, gc_threshold: str) -> None:
        argv = [sys.executable, "-m", "loadtest.conn_memory", "--serve", "--trace", str(trace)]
        argv += ["--root", root, "--gc-threshold", gc_threshold]
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.port = int(self._read()["port"])

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the pod exited ({self.proc.wait()})")
        return json.loads(line)  # type: ignore[no-any-return]

    def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def stop(self) -> None:
        with contextlib.suppress(BrokenPipeError):
            assert self.proc.stdin is not None
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Idle(WsClient):
    def __init__(self, host: str, path: str, extra: str) -> None:
        super().__init__(host, path)
        if extra:
            self.request = self.request[:-2] + extra.encode() + b"\r\n"


async def connect(port: int, n: int, extra: str, parallel: int = 100) -> list[Idle]:
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(parallel)
    members: list[Idle] = []

    async def one() -> None:
        async with gate:
            _, member = await loop.create_connection(
                lambda: Idle("127.0.0.1", "/idle", extra), "127.0.0.1", port
            )
            await asyncio.wait_for(member.welcome, 60)
            members.append(member)

    await asyncio.gather(*(one() for _ in range(n)))
    return members


async def wait_count(pod: Pod, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (count := pod.ask("count")["connections"]) != n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the pod holds {count} connections, not {n}")
        await asyncio.sleep(0.2)


async def measure(
    env: dict[str, str], n: int, trace: int, extra: str, args: argparse.Namespace
) -> dict[str, Any]:
    pod = Pod(env, trace, args.root, args.gc_threshold)
    try:
        base = pod.ask("base")
        members = await connect(pod.port, n, extra)
        await wait_count(pod, n)
        after = pod.ask("report")
        for member in members:
            member.close()
    finally:
        pod.stop()
    result: dict[str, Any] = {
        "connections": n,
        "rss_growth_bytes": after["rss"] - base["rss"],
        "rss_kib_per_connection": round((after["rss"] - base["rss"]) / n / 1024, 2),
        "rss_kib_per_connection_before_collect": round(
            (after["rss_uncollected"] - base["rss"]) / n / 1024, 2
        ),
        "allocated_blocks_per_connection": round(after["allocated_blocks"] / n, 2),
        "objects_per_connection": {t: round(c / n, 2) for t, c in after["types"].items() if c >= n // 2},
        "gc_while_connecting": after["gc_while_connecting"],
    }
    if "sites" in after:
        sites = after["sites"]
        total = sum(s["bytes"] for s in sites)
        by_library: Counter[str] = Counter()
        for s in sites:
            by_library[s["library"]] += s["bytes"]
        result["traced_bytes_per_connection"] = round(total / n, 1)
        result["traced_by_library_per_connection"] = {k: round(v / n, 1) for k, v in by_library.most_common()}
        by_function: Counter[str] = Counter()
        for s in sites:
            by_function[f"{s['library']}: {s['function']}"] += s["bytes"]
        result["traced_by_function_per_connection"] = {
            k: round(v / n, 1) for k, v in by_function.most_common() if abs(v) >= n * 8
        }
        result["traced_sites_per_connection"] = [
            {**s, "bytes": round(s["bytes"] / n, 1), "blocks": round(s["blocks"] / n, 2)}
            for s in sites
            if abs(s["bytes"]) >= n * 8  # 8 bytes a connection and up; the rest is noise
        ]
    return result


def git(root: str, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", root, *args], capture_output=True, text=True, check=False
    ).stdout.strip()


def print_summary(name: str, result: dict[str, Any]) -> None:
    print(f"{name}: {result['connections']} connections", flush=True)
    print(
        f"  RSS {result['rss_kib_per_connection']:.2f} KiB per connection "
        f"({result['rss_kib_per_connection_before_collect']:.2f} before gc.collect())",
        flush=True,
    )
    print(f"  gc while connecting: {result['gc_while_connecting']}", flush=True)
    if "traced_bytes_per_connection" in result:
        print(f"  traced {result['traced_bytes_per_connection']:.0f} B per connection:", flush=True)
        for lib, b in result["traced_by_library_per_connection"].items():
            print(f"    {lib:>18} {b:8.0f} B", flush=True)
        for s in result["traced_sites_per_connection"][:25]:
            print(
                f"    {s['bytes']:8.0f} B {s['blocks']:6.2f} blk  {s['site']}  <- {s['allocator']}",
                flush=True,
            )


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    raise_fd_limit()
    extra = BROWSER_HEADERS if args.browser_headers else ""
    with Servers() as servers:
        broker = servers.redis().url if args.broker == "redis" else "memory://"
        env = {
            **os.environ,
            "PYTHONPATH": ROOT,
            "RELAY_PORT": str(free_port()),
            "RELAY_INTERNAL_PORT": str(free_port()),
            "RELAY_BROKER_URL": broker,
            "RELAY_PUBLISH_RATE": "0",
            "RELAY_MAX_CONNECTIONS": "20000",
            "RELAY_LOG_LEVEL": "WARNING",
            "RELAY_CONSOLE": "false",
            "RELAY_ALLOWED_ORIGINS": "*",
            **dict(pair.split("=", 1) for pair in args.env),
        }
        runs: dict[str, Any] = {}
        if args.connections:
            env["RELAY_PORT"], env["RELAY_INTERNAL_PORT"] = str(free_port()), str(free_port())
            runs["rss"] = await measure(env, args.connections, 0, extra, args)
            print_summary("RSS (no tracemalloc)", runs["rss"])
        if args.trace_connections:
            env["RELAY_PORT"], env["RELAY_INTERNAL_PORT"] = str(free_port()), str(free_port())
            runs["traced"] = await measure(env, args.trace_connections, args.frames, extra, args)
            print_summary("tracemalloc", runs["traced"])
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--trace", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--connections", type=int, default=10000, help="idle connections for RSS (0: skip)")
    p.add_argument("--trace-connections", type=int, default=2000, help="idle connections under tracemalloc")
    p.add_argument("--frames", type=int, default=30, help="tracemalloc frames kept per allocation")
    p.add_argument("--broker", choices=("memory", "redis"), default="memory")
    p.add_argument("--browser-headers", action="store_true", help="send a browser's handshake headers")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="a setting for the pods")
    p.add_argument("--gc-threshold", default="", help="a,b,c: gc.set_threshold in the pods after start-up")
    p.add_argument("--root", default=ROOT, help="the relay work tree to measure (default: this one)")
    p.add_argument("--json", help="write the result here")
    args = p.parse_args()
    if args.serve:
        serve_main(args.trace, args.root, [int(t) for t in args.gc_threshold.split(",") if t])
        return
    import uvloop

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    runs = uvloop.run(main_async(args))
    result = {
        "command": ".venv/bin/python -m loadtest.conn_memory " + " ".join(sys.argv[1:]),
        "date": started,
        "measured_tree": args.root,
        "git_commit": git(args.root, "rev-parse", "HEAD"),
        "git_dirty_files": [line[3:] for line in git(args.root, "status", "--porcelain").splitlines()],
        "versions": {"python": platform.python_version()}
        | {name: importlib.metadata.version(name) for name in PACKAGES},
        "client": "loadtest.engine.WsClient" + (" + browser headers" if args.browser_headers else ""),
        "handshake_key": HANDSHAKE_KEY,
        **runs,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()

"""Redis clients side by side: relay's own RESP client against redis-py at its best, CPU per message.

relay's broker speaks to Redis through `service.broker.resp.RespConnection` (pipelined sends, one
write per event-loop turn, pushes delivered per chunk) rather than redis-py's asyncio client. This
measures what that choice is worth, in one run, alternating the clients round by round (the machine
is shared and noisy: compare medians and ratios, never one sample):

- publish: 1,000 concurrent tasks each awaiting its own publish per turn (relay's many publishers),
  one task sending a batch of 1,000 (redis-py's explicit pipeline, its best case), and one awaited
  publish at a time. redis-py with hiredis: a connection pool, a BlockingConnectionPool, and its
  single-connection mode.
- receive: one subscriber on 100 channels while another process publishes 5,000 messages/s; relay's
  `on_push` callback against redis-py's `PubSub` read with `get_message`, `listen()` and `run()`.
- the same on a three-primary cluster (SPUBLISH / SSUBSCRIBE): one connection per primary routed by
  slot, against `redis.asyncio.RedisCluster`, its `ClusterPipeline` and `ClusterPubSub`.

The figure is CPU time of this process (user + system, `time.process_time`) per message. Redis runs
in its own processes (started here on free loopback ports, never the shared 6379), and so does the
publisher of the receive shapes. Raw samples, medians, ratios, the command, the commit and the
versions go to `--json`; the Markdown table printed at the end is the one docs/performance.md quotes.
A full run (5 rounds) takes about two and a half minutes:

    .venv/bin/python -m loadtest.redis_clients --json docs/results/redis-clients.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import platform
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.connection

from service.broker import Envelope, wire
from service.broker.cluster import ClusterTopology
from service.broker.resp import Address, ConnectOptions, Push, RespConnection

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIONS = ConnectOptions(timeout=10.0)
PublishFn = Callable[[bytes, bytes], Awaitable[Any]]


# --- Redis processes -------------------------------------------------------------------------------


def _free_port(cluster: bool = False) -> int:
    """A free loopback port; for a cluster node, one whose bus port (port + 10000) is free too."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if not cluster:
            return port
        if port + 10000 > 65535:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is not on PATH: `make redis-server` installs it (Redis 7.0+)")
    return path


def _wait(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(redis.RedisError, OSError):
            if check():
                return
        time.sleep(0.02)
    raise TimeoutError(f"gave up waiting for {what} after {timeout} s")


class RedisProcesses:
    """redis-server processes of this run, each in its own directory, all killed on exit."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.workdir = tempfile.mkdtemp(prefix="relay-rc-")

    def __enter__(self) -> RedisProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            with contextlib.suppress(OSError):
                proc.kill()
            proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def server(self, *extra: str, cluster: bool = False) -> Address:
        port = _free_port(cluster)
        where = os.path.join(self.workdir, str(port))
        os.mkdir(where)
        argv = [_binary("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--appendonly", "no", "--daemonize", "no", "--loglevel", "warning", "--dir", where, *extra]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(proc)
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)
        _wait(lambda: bool(client.ping()), 10, f"redis-server on port {port}")
        client.close()
        return Address("127.0.0.1", port)

    def cluster(self, primaries: int = 3) -> list[Address]:
        """A cluster of `primaries` nodes without replicas (sharded pub/sub is all the shapes need),
        built by hand: slots, epochs and MEET, which is quicker than `redis-cli --cluster create`."""
        extra = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")
        nodes = [self.server(*extra, cluster=True) for _ in range(primaries)]
        clients: list[Any] = [redis.Redis(host=n.host, port=n.port, socket_timeout=2) for n in nodes]
        per_node = -(-16384 // primaries)
        for index, client in enumerate(clients):
            first, last = index * per_node, min(16383, (index + 1) * per_node - 1)
            client.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
            client.execute_command("CLUSTER", "SET-CONFIG-EPOCH", index + 1)
        for node in nodes[1:]:
            clients[0].execute_command("CLUSTER", "MEET", node.host, node.port)
        for node, client in zip(nodes, clients, strict=True):
            _wait(
                lambda c=client: b"cluster_state:ok" in c.execute_command("CLUSTER", "INFO"),  # type: ignore[misc]
                30,
                f"cluster node {node} to report cluster_state:ok",
            )
            client.close()
        return nodes


def redis_server_version() -> str:
    out = subprocess.run([_binary("redis-server"), "--version"], capture_output=True, text=True).stdout
    match = re.search(r"v=(\S+)", out)
    return match.group(1) if match else out.strip()


# --- what travels ----------------------------------------------------------------------------------


def channel_names(groups: int) -> list[bytes]:
    return [b"relay:g:room%d" % i for i in range(groups)]


def relay_payload(size: int) -> bytes:
    """A relay envelope as it travels through Redis (`wire.encode`), its frame padded to `size` bytes."""
    head = wire.encode(Envelope("g:room17", "", 1764000000.123456))
    frame = '{"message":{"task":"send_message_to_group","group_name":"room17","p":3,"s":12345,"text":""}}'
    pad = max(0, size - len(head) - len(frame))
    frame = frame.replace('"text":""', '"text":"' + "x" * pad + '"')
    return wire.encode(Envelope("g:room17", frame, 1764000000.123456))


# --- measuring -------------------------------------------------------------------------------------


@dataclass
class Sample:
    shape: str
    variant: str
    round: int
    messages: int
    cpu_s: float
    user_s: float
    sys_s: float
    wall_s: float
    complete: bool = True

    @property
    def us_per_message(self) -> float:
        return self.per_message(self.cpu_s)

    def per_message(self, seconds: float) -> float:
        """Microseconds per message (NaN when nothing arrived)."""
        return seconds / self.messages * 1e6 if self.messages else float("nan")

    @property
    def per_second(self) -> float:
        return self.messages / self.wall_s if self.wall_s else 0.0


@dataclass
class Meter:
    """CPU (user, system) and wall time of this process between `start()` and `stop()`."""

    cpu: float = 0.0
    user: float = 0.0
    sys: float = 0.0
    wall: float = 0.0
    _marks: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)

    def start(self) -> None:
        gc.collect()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self._marks = (time.process_time(), usage.ru_utime, usage.ru_stime, time.perf_counter())

    def stop(self) -> None:
        wall = time.perf_counter()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu = time.process_time()
        self.cpu = cpu - self._marks[0]
        self.user = usage.ru_utime - self._marks[1]
        self.sys = usage.ru_stime - self._marks[2]
        self.wall = wall - self._marks[3]


@dataclass
class Config:
    tasks: int = 1000
    turns: int = 20
    batch: int = 1000
    batches: int = 20
    sequential: int = 5000
    groups: int = 100
    payload: int = 200
    receive: int = 8000
    receive_rate: float = 5000.0
    warmup: float = 0.15  # share of each measured amount run first, unmeasured
    pool_size: int = 50  # BlockingConnectionPool size

    def warm(self, n: int) -> int:
        return max(1, int(n * self.warmup))


CONFIG_HELP = {
    "tasks": "concurrent publishing tasks",
    "turns": "publishes per task per round",
    "batch": "publishes per batch (pipeline)",
    "batches": "batches per round",
    "sequential": "one-at-a-time publishes per round",
    "groups": "channels",
    "payload": "payload bytes",
    "receive": "messages received per round",
    "receive_rate": "the feeder's rate in messages/s, 0 for as fast as it can",
    "pool_size": "BlockingConnectionPool size",
}


@dataclass
class Env:
    config: Config
    single: Address
    cluster: list[Address] | None
    channels: list[bytes]
    payload: bytes
    feeders: dict[str, Feeder] = field(default_factory=dict)


# --- the publish path ------------------------------------------------------------------------------


@dataclass
class Publisher:
    """One client under test: an awaitable publish, and its best way to send a batch."""

    publish: PublishFn
    batch: Callable[[list[bytes], bytes], Awaitable[Any]]


async def run_concurrent(client: Publisher, env: Env, turns: int) -> Meter:
    """`tasks` tasks, each awaiting one publish per turn on its own channel, all released at once."""
    go = asyncio.Event()
    publish, channels, payload = client.publish, env.channels, env.payload

    async def publisher(channel: bytes) -> None:
        await go.wait()
        for _ in range(turns):
            await publish(channel, payload)

    jobs = [asyncio.create_task(publisher(channels[i % len(channels)])) for i in range(env.config.tasks)]
    await asyncio.sleep(0)  # every task is now waiting on `go`
    meter = Meter()
    meter.start()
    go.set()
    await asyncio.gather(*jobs)
    meter.stop()
    return meter


async def run_sequential(client: Publisher, env: Env, count: int) -> Meter:
    """One task, one awaited publish at a time."""
    publish, channels, payload, groups = client.publish, env.channels, env.payload, len(env.channels)
    meter = Meter()
    meter.start()
    for i in range(count):
        await publish(channels[i % groups], payload)
    meter.stop()
    return meter


async def run_batches(client: Publisher, env: Env, batches: int) -> Meter:
    """One task sends `batch` publishes at once and waits for every reply, `batches` times."""
    channels = [env.channels[i % len(env.channels)] for i in range(env.config.batch)]
    meter = Meter()
    meter.start()
    for _ in range(batches):
        await client.batch(channels, env.payload)
    meter.stop()
    return meter


def _relay_publisher(send: Callable[[bytes, bytes], asyncio.Future[Any]]) -> Publisher:
    async def batch(channels: list[bytes], payload: bytes) -> None:
        futures = [send(channel, payload) for channel in channels]  # they leave in one write
        for future in futures:
            await future

    return Publisher(send, batch)


@contextlib.asynccontextmanager
async def relay_single(env: Env) -> AsyncIterator[Publisher]:
    """relay's publish path on one server: one pipelined connection."""
    conn = await RespConnection.open(env.single, OPTIONS)
    try:
        yield _relay_publisher(lambda channel, payload: conn.send(b"PUBLISH", channel, payload))
    finally:
        conn.close()
        await conn.wait_closed()


@contextlib.asynccontextmanager
async def relay_cluster(env: Env) -> AsyncIterator[Publisher]:
    """relay's publish path on a cluster: one pipelined connection per primary, routed by hash slot."""
    assert env.cluster is not None
    topology = ClusterTopology(tuple(env.cluster))
    by_node = {a: await RespConnection.open(a, OPTIONS) for a in await topology.discover(OPTIONS)}
    route = topology.route
    try:
        yield _relay_publisher(
            lambda channel, payload: by_node[route(channel)].send(b"SPUBLISH", channel, payload)  # type: ignore[index]
        )
    finally:
        for conn in by_node.values():
            conn.close()
            await conn.wait_closed()


def _redis_py_publisher(client: redis.asyncio.Redis | redis.asyncio.RedisCluster, sharded: bool) -> Publisher:
    async def batch(channels: list[bytes], payload: bytes) -> None:
        pipe: Any = client.pipeline() if sharded else client.pipeline(transaction=False)
        queue = pipe.spublish if sharded else pipe.publish
        for channel in channels:
            queue(channel, payload)
        await pipe.execute()

    return Publisher(client.spublish if sharded else client.publish, batch)


@contextlib.asynccontextmanager
async def redis_py_single(env: Env, mode: str) -> AsyncIterator[Publisher]:
    """redis-py's asyncio client with its default parser (hiredis): mode `pool`, `blocking`, `single`."""
    host, port = env.single.host, env.single.port
    if mode == "blocking":
        pool: redis.asyncio.ConnectionPool = redis.asyncio.BlockingConnectionPool(
            host=host, port=port, max_connections=env.config.pool_size
        )
        client = redis.asyncio.Redis.from_pool(pool)
    elif mode == "pool":  # its default of 100 connections refuses a 101st concurrent command
        pool = redis.asyncio.ConnectionPool(host=host, port=port, max_connections=env.config.tasks)
        client = redis.asyncio.Redis.from_pool(pool)
    else:
        client = redis.asyncio.Redis(host=host, port=port, single_connection_client=True)
    try:
        await client.ping()
        yield _redis_py_publisher(client, sharded=False)
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def redis_py_cluster(env: Env) -> AsyncIterator[Publisher]:
    """redis-py's RedisCluster (asyncio): `spublish()`, and `ClusterPipeline` for batches."""
    assert env.cluster is not None
    seed = env.cluster[0]
    # Its default of 100 connections per node refuses a 101st concurrent command.
    client = redis.asyncio.RedisCluster(host=seed.host, port=seed.port, max_connections=env.config.tasks)
    try:
        await client.initialize()
        yield _redis_py_publisher(client, sharded=True)
    finally:
        await client.aclose()


Opener = Callable[[Env], contextlib.AbstractAsyncContextManager[Publisher]]
Variant = tuple[str, str, Callable[[Env], Awaitable[tuple[int, Meter]]]]


def measure_publish(shape: str, opener: Opener) -> Callable[[Env], Awaitable[tuple[int, Meter]]]:
    """Open the client, warm it up (connections opened, pools filled), measure, close it."""

    async def run(env: Env) -> tuple[int, Meter]:
        c = env.config
        async with opener(env) as client:
            if shape == "concurrent":
                await run_concurrent(client, env, max(1, c.turns // 5))
                return c.tasks * c.turns, await run_concurrent(client, env, c.turns)
            if shape == "batch":
                await run_batches(client, env, 1)
                return c.batch * c.batches, await run_batches(client, env, c.batches)
            await run_sequential(client, env, c.warm(c.sequential))
            return c.sequential, await run_sequential(client, env, c.sequential)

    return run


def publish_variants(cluster: bool, config: Config) -> list[Variant]:
    shapes = {
        "concurrent": f"publish: {config.tasks:,} tasks each awaiting its own",
        "batch": f"publish: one task, batches of {config.batch:,}",
        "sequential": "publish: one awaited at a time",
    }
    if cluster:
        clients: list[tuple[str, str, Opener]] = [
            ("concurrent batch sequential", "relay RespConnection per primary", relay_cluster),
            ("concurrent sequential", "redis-py RedisCluster spublish()", redis_py_cluster),
            ("batch", "redis-py ClusterPipeline", redis_py_cluster),
        ]
    else:
        pool = f"ConnectionPool({config.tasks:,})"
        blocking = f"BlockingConnectionPool({config.pool_size})"
        clients = [
            ("concurrent batch sequential", "relay RespConnection", relay_single),
            ("concurrent sequential", f"redis-py Redis, {pool}", lambda e: redis_py_single(e, "pool")),
            ("concurrent", f"redis-py Redis, {blocking}", lambda e: redis_py_single(e, "blocking")),
            (
                "concurrent sequential",
                "redis-py Redis, single_connection_client",
                lambda e: redis_py_single(e, "single"),
            ),
            ("batch", f"redis-py pipeline(transaction=False), {pool}", lambda e: redis_py_single(e, "pool")),
        ]
    prefix = "cluster " if cluster else ""
    return [
        (prefix + shapes[shape], name, measure_publish(shape, opener))
        for shape in shapes
        for shapes_of, name, opener in clients
        if shape in shapes_of.split()
    ]


# --- the receive path: a publisher in another process ----------------------------------------------


async def _feed(kind: str, addresses: list[Address], groups: int, size: int) -> None:
    """The feeder process: on `go N RATE` publish N messages round-robin over the channels at RATE
    per second (0: as fast as it can, 1,000 in flight), then answer `done`."""
    channels, payload = channel_names(groups), relay_payload(size)
    if kind == "cluster":
        topology = ClusterTopology(tuple(addresses))
        by_node = {a: await RespConnection.open(a, OPTIONS) for a in await topology.discover(OPTIONS)}
        targets = [(by_node[topology.route(c)], c) for c in channels]  # type: ignore[index]
        command = b"SPUBLISH"
    else:
        conn = await RespConnection.open(addresses[0], OPTIONS)
        targets = [(conn, c) for c in channels]
        command = b"PUBLISH"
    loop = asyncio.get_running_loop()
    print("ready", flush=True)
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        _, count_text, rate_text = line.split()
        count, rate = int(count_text), float(rate_text)
        started = time.perf_counter()
        sent = 0
        pending: list[asyncio.Future[Any]] = []
        while sent < count:
            due = count if rate <= 0 else min(count, int((time.perf_counter() - started) * rate) + 1)
            due = min(due, sent + 1000)
            while sent < due:
                target, channel = targets[sent % groups]
                pending.append(target.send(command, channel, payload))
                sent += 1
            if rate > 0:
                await asyncio.sleep(0.001)
            else:
                await pending[-1]
        await asyncio.gather(*pending)
        print(f"done {count} {time.perf_counter() - started:.3f}", flush=True)


def feeder_main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the feeder subprocess: `KIND GROUPS SIZE HOST:PORT...`."""
    kind, groups, size, *hosts = argv if argv is not None else sys.argv[1:]
    addresses = [Address(h.rsplit(":", 1)[0], int(h.rsplit(":", 1)[1])) for h in hosts]
    asyncio.run(_feed(kind, addresses, int(groups), int(size)))


class Feeder:
    """A publisher process for the receive shapes, so its CPU is not charged to the subscriber."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, kind: str, addresses: list[Address], config: Config) -> Feeder:
        code = "from loadtest.redis_clients import feeder_main; feeder_main()"
        hosts = [f"{a.host}:{a.port}" for a in addresses]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, kind, str(config.groups), str(config.payload), *hosts,
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )  # fmt: skip
        feeder = cls(proc)
        if await feeder._line(30) != "ready":
            raise RuntimeError(f"the {kind} feeder did not start")
        return feeder

    async def _line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        return (await asyncio.wait_for(self.proc.stdout.readline(), timeout)).decode().strip()

    def go(self, count: int, rate: float) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"go {count} {rate}\n".encode())

    async def done(self, timeout: float) -> str:
        return await self._line(timeout)

    async def stop(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 5)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


class Tally:
    """Messages counted by a receiver; `done` once `want` of them arrived."""

    def __init__(self, rate: float) -> None:
        self.rate = rate  # the feeder's, messages/s (0: as fast as it can)
        self.count = 0
        self.want = 0
        self.done = asyncio.Event()
        self.confirmed = 0
        self.all_confirmed = asyncio.Event()

    def expect(self, want: int) -> None:
        self.count, self.want = 0, want
        self.done.clear()


async def feed_and_count(env: Env, kind: str, tally: Tally, count: int) -> tuple[Meter, bool]:
    """Have the feeder publish `count` messages; the meter runs until the receiver counted them all."""
    feeder, rate = env.feeders[kind], tally.rate
    timeout = 10.0 + (count / rate if rate > 0 else count / 2000)
    tally.expect(count)
    meter = Meter()
    meter.start()
    feeder.go(count, rate)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(tally.done.wait(), timeout)
    meter.stop()
    await feeder.done(timeout)
    return meter, tally.done.is_set()


async def receive_with(env: Env, kind: str, tally: Tally) -> tuple[int, Meter, bool]:
    """Warm up with a few messages, then measure `receive` of them."""
    await asyncio.wait_for(tally.all_confirmed.wait(), 10)
    await feed_and_count(env, kind, tally, env.config.warm(env.config.receive))
    meter, complete = await feed_and_count(env, kind, tally, env.config.receive)
    return tally.count, meter, complete


async def custom_receive(env: Env, kind: str, rate: float) -> tuple[int, Meter, bool]:
    """relay's way: SUBSCRIBE (or one SSUBSCRIBE per channel on its shard), pushes per chunk."""
    tally = Tally(rate)
    groups = len(env.channels)

    def on_push(pushes: list[Push]) -> None:
        for push in pushes:
            what = push[0]  # type: ignore[index]
            if what == b"message" or what == b"smessage":
                tally.count += 1
            else:
                tally.confirmed += 1
                if tally.confirmed == groups:
                    tally.all_confirmed.set()
        if tally.count >= tally.want:
            tally.done.set()

    conns: list[RespConnection] = []
    try:
        if kind == "cluster":
            assert env.cluster is not None
            topology = ClusterTopology(tuple(env.cluster))
            by_node = {
                address: await RespConnection.open(address, OPTIONS, on_push=on_push)
                for address in await topology.discover(OPTIONS)
            }
            conns.extend(by_node.values())
            for channel in env.channels:
                by_node[topology.route(channel)].write(b"SSUBSCRIBE", channel)  # type: ignore[index]
        else:
            conns.append(await RespConnection.open(env.single, OPTIONS, on_push=on_push))
            conns[0].write(b"SUBSCRIBE", *env.channels)
        return await receive_with(env, kind, tally)
    finally:
        for conn in conns:
            conn.close()
            await conn.wait_closed()


async def redis_py_receive(env: Env, mode: str, rate: float) -> tuple[int, Meter, bool]:
    """redis-py's PubSub on one server: `get_message(timeout=1)`, `get_message(timeout=None)`,
    `listen()`, or `run()` with a handler per channel."""
    tally = Tally(rate)

    def handler(message: dict[str, Any]) -> None:
        tally.count += 1
        if tally.count >= tally.want:
            tally.done.set()

    async def read() -> None:
        if mode == "run":
            await pubsub.run(poll_timeout=1.0)
        elif mode == "listen":
            async for message in pubsub.listen():
                if message["type"] == "message":
                    handler(message)
        else:
            timeout = 1.0 if mode == "get_message" else None
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout)
                if message is not None:
                    handler(message)

    client = redis.asyncio.Redis(host=env.single.host, port=env.single.port)
    pubsub: Any = client.pubsub()  # its aclose() is untyped
    reader: asyncio.Task[None] | None = None
    try:
        if mode == "run":
            await pubsub.subscribe(**{c.decode(): handler for c in env.channels})
        else:
            await pubsub.subscribe(*env.channels)
        while tally.confirmed < len(env.channels):  # Redis's confirmations, read before measuring
            message = await pubsub.get_message(timeout=5.0)
            if message is not None and message["type"] == "subscribe":
                tally.confirmed += 1
        tally.all_confirmed.set()
        reader = asyncio.create_task(read())
        return await receive_with(env, "single", tally)
    finally:
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        await pubsub.aclose()
        await client.aclose()


async def redis_py_cluster_receive(env: Env, rate: float) -> tuple[int, Meter, bool]:
    """redis-py's ClusterPubSub: `ssubscribe`, then one task per shard reading with
    `get_sharded_message(target_node=...)` (its round-robin read without a target polls the shards
    one after the other, each for up to the timeout)."""
    assert env.cluster is not None
    tally = Tally(rate)
    client = redis.asyncio.RedisCluster(host=env.cluster[0].host, port=env.cluster[0].port)
    readers: list[asyncio.Task[None]] = []
    pubsub: Any = client.pubsub()  # its aclose() is untyped

    async def read(node: Any) -> None:
        while True:
            message = await pubsub.get_sharded_message(
                ignore_subscribe_messages=True, timeout=1.0, target_node=node
            )
            if message is not None:
                tally.count += 1
                if tally.count >= tally.want:
                    tally.done.set()

    try:
        await client.initialize()
        await pubsub.ssubscribe(*env.channels)
        nodes: dict[str, Any] = {}
        wanted: dict[str, int] = {}
        for channel in env.channels:
            owner = client.get_node_from_key(channel.decode())
            assert owner is not None
            nodes[owner.name] = owner
            wanted[owner.name] = wanted.get(owner.name, 0) + 1
        for node in nodes.values():
            seen = 0
            while seen < wanted[node.name]:
                message = await pubsub.get_sharded_message(timeout=5.0, target_node=node)
                if message is not None and message["type"] == "ssubscribe":
                    seen += 1
        tally.all_confirmed.set()
        readers = [asyncio.create_task(read(node)) for node in nodes.values()]
        return await receive_with(env, "cluster", tally)
    finally:
        for task in readers:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await pubsub.aclose()
        await client.aclose()


Receiver = Callable[[Env, float], Awaitable[tuple[int, Meter, bool]]]


def receive_variants(cluster: bool, config: Config) -> list[Variant]:
    """Each receiver at the configured rate, then as fast as the feeder process publishes."""
    receivers: list[tuple[str, Receiver]]
    if cluster:
        receivers = [
            ("relay RespConnection per primary, on_push", lambda e, r: custom_receive(e, "cluster", r)),
            ("redis-py ClusterPubSub get_sharded_message, task per shard", redis_py_cluster_receive),
        ]
    else:
        modes = {
            "get_message": "get_message(timeout=1.0)",
            "blocking": "get_message(timeout=None)",
            "listen": "listen()",
            "run": "run() with handlers",
        }
        receivers = [("relay RespConnection, on_push", lambda e, r: custom_receive(e, "single", r))]
        receivers += [(f"redis-py PubSub {label}", _pubsub_mode(mode)) for mode, label in modes.items()]

    def counted(receiver: Receiver, rate: float) -> Callable[[Env], Awaitable[tuple[int, Meter]]]:
        async def run(env: Env) -> tuple[int, Meter]:
            received, meter, complete = await receiver(env, rate)
            if not complete:
                raise IncompleteError(received, meter)
            return received, meter

        return run

    out: list[Variant] = []
    for rate in dict.fromkeys((config.receive_rate, 0.0)):
        pace = f"{rate:,.0f} msg/s" if rate > 0 else "as fast as one publisher process sends"
        channels = f"{config.groups:,} shard channels" if cluster else f"{config.groups:,} channels"
        shape = f"{'cluster ' if cluster else ''}receive: {channels}, {pace}"
        out += [(shape, name, counted(receiver, rate)) for name, receiver in receivers]
    return out


def _pubsub_mode(mode: str) -> Receiver:
    return lambda env, rate: redis_py_receive(env, mode, rate)


class IncompleteError(Exception):
    """A receive shape that did not get every message within its timeout (recorded, not fatal)."""

    def __init__(self, received: int, meter: Meter) -> None:
        super().__init__(f"received {received}")
        self.received, self.meter = received, meter


# --- the run ---------------------------------------------------------------------------------------


async def run_rounds(
    env: Env, variants: list[Variant], rounds: int, log: Callable[[str], None]
) -> list[Sample]:
    """Every variant once per round; the order rotates each round so none always runs first."""
    samples: list[Sample] = []
    for r in range(rounds):
        shift = r % len(variants)
        for shape, name, fn in variants[shift:] + variants[:shift]:
            complete = True
            try:
                messages, meter = await fn(env)
            except IncompleteError as exc:
                messages, meter, complete = exc.received, exc.meter, False
            sample = Sample(
                shape, name, r + 1, messages, meter.cpu, meter.user, meter.sys, meter.wall, complete
            )
            samples.append(sample)
            log(
                f"round {r + 1} | {shape} | {name}: {sample.us_per_message:.1f} µs CPU/msg, "
                f"{sample.per_second:,.0f} msg/s" + ("" if complete else f" INCOMPLETE ({messages})")
            )
    return samples


def summarize(samples: list[Sample]) -> list[dict[str, Any]]:
    """Per shape and variant: medians over rounds, and the ratio to relay's client in the same shape
    (ratio of medians, and the range of the per-round ratios)."""
    rows: list[dict[str, Any]] = []
    keys = list(dict.fromkeys((s.shape, s.variant) for s in samples))
    for shape, variant in keys:
        mine = [s for s in samples if s.shape == shape and s.variant == variant]
        base = [s for s in samples if s.shape == shape and s.variant.startswith("relay ")]
        per_round = {s.round: s.us_per_message for s in base}
        ratios = [s.us_per_message / per_round[s.round] for s in mine if s.round in per_round]
        us = [s.us_per_message for s in mine]
        row: dict[str, Any] = {
            "shape": shape,
            "variant": variant,
            "rounds": len(mine),
            "us_cpu_per_message": [round(x, 2) for x in us],
            "us_cpu_per_message_median": round(statistics.median(us), 2),
            # user / sys: Linux splits the exact total by tick samples, so only long samples say much
            "us_user_per_message_median": round(statistics.median(s.per_message(s.user_s) for s in mine), 2),
            "us_sys_per_message_median": round(statistics.median(s.per_message(s.sys_s) for s in mine), 2),
            "messages_per_second_median": round(statistics.median(s.per_second for s in mine)),
            "complete": all(s.complete for s in mine),
        }
        if base:
            relay_median = statistics.median(s.us_per_message for s in base)
            row["ratio_to_relay"] = round(row["us_cpu_per_message_median"] / relay_median, 2)
            row["ratio_to_relay_per_round"] = [round(x, 2) for x in ratios]
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """The summary as a Markdown table: CPU per message, its rounds, throughput, the ratio to relay."""
    out = [
        "| shape | client | µs CPU per message, median | rounds | messages/s | CPU vs relay (per round) |",
        "|---|---|---|---|---|---|",
    ]
    shape = ""
    for row in rows:
        rounds = ", ".join(f"{x:.1f}" for x in row["us_cpu_per_message"])
        spread = row.get("ratio_to_relay_per_round", [])
        ratio = "1"
        if not row["variant"].startswith("relay ") and "ratio_to_relay" in row:
            ratio = f"**{row['ratio_to_relay']:.1f}x** ({min(spread):.1f}-{max(spread):.1f})"
        flag = "" if row["complete"] else " (incomplete)"
        out.append(
            f"| {row['shape'] if row['shape'] != shape else ''} | {row['variant']}{flag} "
            f"| **{row['us_cpu_per_message_median']:.1f}** | {rounds} "
            f"| {row['messages_per_second_median']:,} | {ratio} |"
        )
        shape = row["shape"]
    return "\n".join(out)


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", "-C", ROOT, *args], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def environment(loop_name: str) -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    return {
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty_files": [
            line[3:]
            for line in _git("status", "--porcelain", "--", "service/broker", "loadtest").splitlines()
        ],
        "versions": {
            "python": platform.python_version(),
            "redis-py": version("redis"),
            "hiredis": version("hiredis"),
            "uvloop": version("uvloop"),
            "redis-server": redis_server_version(),
            "redis-py parser": redis.asyncio.connection.DefaultParser.__name__,
            "event loop": loop_name,
        },
        "machine": {
            "platform": platform.platform(),
            "cpu": model,
            "cpus": os.cpu_count(),
            "loadavg_at_start": os.getloadavg(),
        },
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


async def bench(
    config: Config, rounds: int, cluster: bool, only: str, log: Callable[[str], None]
) -> list[Sample]:
    with RedisProcesses() as procs:
        single = procs.server()
        nodes = procs.cluster() if cluster else None
        env = Env(config, single, nodes, channel_names(config.groups), relay_payload(config.payload))
        variants = publish_variants(False, config) + receive_variants(False, config)
        if nodes is not None:
            variants += publish_variants(True, config) + receive_variants(True, config)
        if only:
            variants = [v for v in variants if re.search(only, f"{v[0]} | {v[1]}")]
        try:
            env.feeders["single"] = await Feeder.start("single", [single], config)
            if nodes is not None:
                env.feeders["cluster"] = await Feeder.start("cluster", nodes, config)
            return await run_rounds(env, variants, rounds, log)
        finally:
            for feeder in env.feeders.values():
                await feeder.stop()


def main(argv: Sequence[str] | None = None) -> int:
    first = (__doc__ or "").split("\n\n")
    p = argparse.ArgumentParser(
        prog="python -m loadtest.redis_clients",
        description=first[0],
        epilog="\n\n".join(first[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--rounds", type=int, default=5, help="each runs every variant once (default %(default)s)")
    defaults = Config()
    for name, text in CONFIG_HELP.items():
        default = getattr(defaults, name)
        flag = "--" + name.replace("_", "-")
        p.add_argument(flag, type=type(default), default=default, help=f"{text} (default %(default)s)")
    p.add_argument("--no-cluster", action="store_true", help="skip the three-primary cluster shapes")
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop", help="relay runs uvloop")
    p.add_argument("--only", default="", help="regular expression over 'shape | variant' to run a subset")
    p.add_argument("--json", default="", help="write raw samples, summary, command and versions here")
    args = p.parse_args(argv)
    config = Config(**{name: getattr(args, name) for name in CONFIG_HELP})
    started = time.perf_counter()
    info = environment(args.loop)

    def log(line: str) -> None:
        print(line, flush=True)

    runner: Callable[[Any], Any]
    if args.loop == "uvloop":
        import uvloop

        runner = uvloop.run
    else:
        runner = asyncio.run
    samples: list[Sample] = runner(bench(config, args.rounds, not args.no_cluster, args.only, log))
    rows = summarize(samples)
    table = markdown(rows)
    print(table)
    info["machine"]["loadavg_at_end"] = os.getloadavg()
    if args.json:
        result = {
            "command": " ".join(
                [
                    os.path.relpath(sys.executable, ROOT),
                    "-m",
                    "loadtest.redis_clients",
                    *(argv or sys.argv[1:]),
                ]
            ),
            **info,
            "config": asdict(config)
            | {"rounds": args.rounds, "cluster_primaries": 0 if args.no_cluster else 3},
            "payload_example": relay_payload(config.payload).decode(),
            "seconds": round(time.perf_counter() - started, 1),
            "summary": rows,
            "samples": [asdict(s) | {"us_per_message": round(s.us_per_message, 3)} for s in samples],
            "table_markdown": table,
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
        print(f"wrote {args.json} in {result['seconds']} s", flush=True)
    return 0 if all(s.complete for s in samples) else 1


if __name__ == "__main__":
    sys.exit(main())

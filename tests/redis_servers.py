"""Real redis-server processes for the tests: one server, a Sentinel set, a six-node cluster.

Each starts on free loopback ports with its own directory and is killed at teardown (and at exit,
should pytest itself be interrupted). Session fixtures are shared by tests that do not harm them
(every test uses its own channel prefix); tests that kill, pause or fail over get a dedicated one.
Registered as a pytest plugin in tests/conftest.py. Never skips: no redis-server is a failure.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis

from tests.helpers import free_port

_live: set[subprocess.Popen[bytes]] = set()


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_live):
        with contextlib.suppress(OSError):
            proc.kill()


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is not on PATH: `make redis-server` installs it (Redis 7.0+)")
    return path


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(redis.RedisError, OSError, IndexError):
            if check():
                return
        time.sleep(0.02)
    raise TimeoutError(f"gave up waiting for {what} after {timeout} s")


@dataclass
class RedisServer:
    """One redis-server (or Sentinel) process on 127.0.0.1:port."""

    port: int
    directory: Path
    args: list[str]
    proc: subprocess.Popen[bytes] | None = None
    stopped: bool = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, decode_responses=True)

    def call(self, *args: str | int) -> Any:
        """One command, answered with decoded strings (redis-py's sync client, typed loosely)."""
        with self.client() as client:
            return client.execute_command(*args)

    def info(self, section: str) -> dict[str, Any]:
        reply = self.call("INFO", section)
        assert isinstance(reply, dict)
        return reply

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            [_binary("redis-server"), *self.args],
            cwd=self.directory,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _live.add(self.proc)
        wait_until(lambda: bool(self.call("PING")), 10, f"redis on port {self.port}")
        return self

    def kill(self) -> None:
        """SIGKILL: the process and its sockets vanish at once."""
        if self.proc is not None:
            if self.stopped:
                self.cont()
            self.proc.kill()
            self.proc.wait()
            _live.discard(self.proc)
            self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: sockets stay open and silent, the half-open case."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self.stopped = True

    def cont(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.stopped = False


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    import random
    import socket

    while True:
        port = random.randint(20000, 45000)
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port


def start_redis(directory: Path, *extra: str, port: int | None = None) -> RedisServer:
    port = port or free_port()
    directory.mkdir(parents=True, exist_ok=True)
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    args += ["--daemonize", "no", "--loglevel", "warning", "--dir", str(directory), *extra]
    return RedisServer(port, directory, args).start()


@dataclass
class SentinelSet:
    """A primary, a replica and three Sentinels watching them as `mymaster`."""

    primary: RedisServer
    replica: RedisServer
    sentinels: list[RedisServer] = field(default_factory=list)
    name: str = "mymaster"

    @property
    def url(self) -> str:
        return "redis+sentinel://" + ",".join(s.address for s in self.sentinels) + "/" + self.name

    def master_port(self) -> int:
        _host, port = self.sentinels[0].call("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.name)
        return int(port)

    def servers(self) -> list[RedisServer]:
        return [self.primary, self.replica, *self.sentinels]


def start_sentinel_set(directory: Path) -> SentinelSet:
    primary = start_redis(directory / "primary")
    replica = start_redis(directory / "replica", "--replicaof", "127.0.0.1", str(primary.port))
    wait_until(lambda: primary.info("replication")["connected_slaves"] == 1, 10, "the replica to sync")
    found = SentinelSet(primary, replica)
    for n in range(3):
        port = free_port()
        where = directory / f"sentinel{n}"
        where.mkdir(parents=True)
        conf = where / "sentinel.conf"
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {where}\n"
            f"sentinel monitor mymaster 127.0.0.1 {primary.port} 2\n"
            "sentinel down-after-milliseconds mymaster 1000\n"
            "sentinel failover-timeout mymaster 3000\n"
            "sentinel parallel-syncs mymaster 1\n"
        )
        found.sentinels.append(RedisServer(port, where, [str(conf), "--sentinel"]).start())
    wait_until(
        lambda: all(_sentinel_sees_all(s) for s in found.sentinels),
        15,
        "the Sentinels to find each other and the replica",
    )
    return found


def _sentinel_sees_all(sentinel: RedisServer) -> bool:
    reply = sentinel.call("SENTINEL", "MASTER", "mymaster")
    info = reply if isinstance(reply, dict) else dict(zip(reply[::2], reply[1::2], strict=True))
    return str(info["num-other-sentinels"]) == "2" and str(info["num-slaves"]) == "1"


@dataclass
class RedisCluster:
    """Six nodes: three primaries with one replica each."""

    nodes: list[RedisServer]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(n.address for n in self.nodes[:3])

    def client(self) -> redis.RedisCluster:
        return redis.RedisCluster(host="127.0.0.1", port=self.nodes[0].port, decode_responses=True)

    def primaries(self) -> list[RedisServer]:
        """Nodes that are primaries now (failovers change which)."""
        return [n for n in self.nodes if n.proc is not None and n.info("replication")["role"] == "master"]

    def node_for_slot(self, slot: int) -> RedisServer:
        for start, end, primary, *_ in self.nodes_alive()[0].call("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return next(n for n in self.nodes if n.port == int(primary[1]))
        raise LookupError(slot)

    def nodes_alive(self) -> list[RedisServer]:
        return [n for n in self.nodes if n.proc is not None and not n.stopped]

    def healthy(self) -> bool:
        return all("cluster_state:ok" in n.call("CLUSTER", "INFO") for n in self.nodes_alive())

    def give_back(self, slot: int, owner: RedisServer) -> None:
        """Move `slot` back to `owner` if a test left it elsewhere (the cluster is shared)."""
        if self.node_for_slot(slot) is not owner:
            self.move_slot(slot, owner)

    def move_slot(self, slot: int, target: RedisServer) -> None:
        """Reshard one (keyless) slot to `target`, as redis-cli --cluster reshard does."""
        source = self.node_for_slot(slot)
        source_id, target_id = source.call("CLUSTER", "MYID"), target.call("CLUSTER", "MYID")
        target.call("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        source.call("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        for node in (target, source, *self.primaries()):
            node.call("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        wait_until(lambda: self.node_for_slot(slot) is target, 10, f"slot {slot} to move")


def start_cluster(directory: Path) -> RedisCluster:
    cluster_args = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
    cluster_args += ["--cluster-node-timeout", "1000"]
    nodes = [start_redis(directory / f"node{n}", *cluster_args, port=free_cluster_port()) for n in range(6)]
    create = [_binary("redis-cli"), "--cluster", "create", *(n.address for n in nodes)]
    subprocess.run(
        [*create, "--cluster-replicas", "1", "--cluster-yes"], check=True, capture_output=True, timeout=60
    )
    cluster = RedisCluster(nodes)
    wait_until(cluster.healthy, 30, "the cluster to report cluster_state:ok")
    wait_until(lambda: len(cluster.primaries()) == 3, 30, "three primaries")
    # A replica that never finished its first sync refuses to fail over: wait for every link.
    wait_until(
        lambda: all(
            n.info("replication").get("master_link_status", "up") == "up" for n in cluster.nodes_alive()
        ),
        30,
        "every replica to sync",
    )
    return cluster


def _stop_all(servers: list[RedisServer]) -> None:
    for server in servers:
        server.kill()


def _workdir(name: str) -> Path:
    # Short paths: a Unix socket path (cluster bus, sentinel) must stay under about 100 bytes.
    return Path(tempfile.mkdtemp(prefix=f"relay-{name}-"))


# Shared servers are cached per process rather than held by session fixtures: pytest finalizes a
# session fixture early when a parametrized fixture asked for it with getfixturevalue (the broker
# contract does), which restarted a whole cluster per test. The autouse fixture stops them at the end.
_shared: dict[str, RedisServer | SentinelSet | RedisCluster] = {}


def _servers_of(found: RedisServer | SentinelSet | RedisCluster) -> list[RedisServer]:
    if isinstance(found, RedisServer):
        return [found]
    return found.servers() if isinstance(found, SentinelSet) else found.nodes


Shared = TypeVar("Shared", RedisServer, SentinelSet, RedisCluster)


def _shared_servers(key: str, start: Callable[[Path], Shared], kind: type[Shared]) -> Shared:
    """The servers `start` made for this process under `key`, started on first use (stopped at the
    end of the session by _stop_shared_servers)."""
    if key not in _shared:
        _shared[key] = start(_workdir(key))
    found = _shared[key]
    assert isinstance(found, kind)
    return found


@pytest.fixture(scope="session", autouse=True)
def _stop_shared_servers() -> Iterator[None]:
    yield
    for found in _shared.values():
        _stop_all(_servers_of(found))
    _shared.clear()


@pytest.fixture
def redis_server() -> RedisServer:
    """One redis-server for the whole session: tests keep apart by prefix, never by FLUSHALL."""
    return _shared_servers("single", start_redis, RedisServer)


@pytest.fixture
def dedicated_redis() -> Iterator[RedisServer]:
    """A redis-server this test alone may kill, restart or pause."""
    server = start_redis(_workdir("own"))
    yield server
    server.kill()
    shutil.rmtree(server.directory, ignore_errors=True)


@pytest.fixture
def sentinel_set() -> SentinelSet:
    """A Sentinel set shared by the tests that do not fail it over."""
    return _shared_servers("sentinel", start_sentinel_set, SentinelSet)


@pytest.fixture
def dedicated_sentinel_set() -> Iterator[SentinelSet]:
    found = start_sentinel_set(_workdir("sentinel-own"))
    yield found
    _stop_all(found.servers())


@pytest.fixture
def redis_cluster() -> RedisCluster:
    """A six-node cluster shared by the tests that do not kill its nodes."""
    return _shared_servers("cluster", start_cluster, RedisCluster)


@pytest.fixture
def dedicated_cluster() -> Iterator[RedisCluster]:
    cluster = start_cluster(_workdir("cluster-own"))
    yield cluster
    _stop_all(cluster.nodes)


@pytest.fixture
def redis_prefix() -> str:
    """A channel prefix of this test's own, so tests can share a Redis (as centrifuge's tests do)."""
    return "t" + secrets.token_hex(4) + os.environ.get("PYTEST_XDIST_WORKER", "")

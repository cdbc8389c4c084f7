"""Where the Redis primaries are: one server, a Sentinel-discovered master, or a cluster's shards.

The broker asks its topology for the primaries each time it (re)connects and for the shard that
carries a channel; it never caches an address across a reconnect, which is how a Sentinel failover
or a cluster failover is followed.

    redis://[[user]:password@]host[:port][/db]
    rediss://...                                      TLS (RELAY_REDIS_TLS_*)
    redis+sentinel://[[user]:password@]h1:26379,h2:26379/mastername[?sentinel_password=...]
    redis+cluster://[[user]:password@]h1:7000,h2:7001
The /db number is accepted and ignored: Redis pub/sub is server-wide; RELAY_REDIS_PREFIX is what
keeps several relays apart on one Redis.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, replace
from typing import Protocol
from urllib.parse import parse_qs, unquote

from service.broker.resp import Address, ConnectionLost, ConnectOptions, ReplyError, RespConnection
from service.config import Settings

DEFAULT_PORTS = {"redis": 6379, "sentinel": 26379, "cluster": 6379}


class Topology(Protocol):
    """**Protocol:** finds the primaries to connect to and routes channels to them."""

    sharded: bool  # SPUBLISH/SSUBSCRIBE (cluster) rather than PUBLISH/SUBSCRIBE
    checks_role: bool  # ask ROLE regularly: a demoted master must be left

    async def discover(self, options: ConnectOptions) -> list[Address]:
        """The primaries now (and, for a cluster, the slot map); ConnectionLost when none is found."""
        ...

    def route(self, channel: bytes) -> Address | None:
        """The primary carrying `channel` (a key: its slot's owner), None while unknown."""
        ...

    def moved(self, slot: int, address: Address) -> None:
        """Redis answered MOVED: `slot` now belongs to `address` (a cluster updates its map)."""
        ...

    async def confirm(self, address: Address, options: ConnectOptions) -> bool:
        """Whether `address` is still a primary as far as the topology's authority knows."""
        ...

    def probe_channel(self, base: bytes, address: Address) -> bytes:
        """A channel name starting with `base` that routes to the primary at `address`."""
        ...


@dataclass(frozen=True)
class RedisUrl:
    kind: str  # redis | sentinel | cluster
    tls: bool
    hosts: tuple[Address, ...]
    username: str | None
    password: str | None
    master: str  # sentinel only
    sentinel_password: str | None


def parse_url(url: str) -> RedisUrl:
    """Split a relay Redis URL; ValueError (naming the problem, never the password) when malformed."""
    scheme, sep, rest = url.partition("://")
    base, _, flavour = scheme.partition("+")
    if not sep or base not in ("redis", "rediss") or flavour not in ("", "sentinel", "cluster"):
        raise ValueError(f"unsupported Redis URL scheme {scheme!r}")
    kind = flavour or "redis"
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, at, hostlist = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    hosts = tuple(_address(h, DEFAULT_PORTS[kind]) for h in hostlist.split(",") if h)
    if not hosts:
        raise ValueError(f"no host in the {scheme}:// URL")
    if kind != "sentinel" and kind != "cluster" and len(hosts) > 1:
        raise ValueError(f"{scheme}:// takes one host; use redis+sentinel:// or redis+cluster://")
    master = unquote(path.split("/")[0]) if kind == "sentinel" else ""
    if kind == "sentinel" and not master:
        raise ValueError("redis+sentinel:// needs the master name as its path: .../mymaster")
    params = parse_qs(query)
    sentinel_password = params.get("sentinel_password", [None])[0]
    return RedisUrl(kind, base == "rediss", hosts, username, password, master, sentinel_password)


def _address(text: str, default_port: int) -> Address:
    if text.startswith("["):  # [v6::addr]:port
        host, _, port = text[1:].partition("]")
        port = port.lstrip(":")
    else:
        host, _, port = text.partition(":")
    try:
        return Address(host, int(port) if port else default_port)
    except ValueError:
        raise ValueError(f"bad port in Redis host {text!r}") from None


def tls_context(settings: Settings) -> ssl.SSLContext:
    """The client TLS context for rediss:// from RELAY_REDIS_TLS_*."""
    context = ssl.create_default_context(cafile=settings.redis_tls_ca_file or None)
    if settings.redis_tls_cert_file:
        context.load_cert_chain(settings.redis_tls_cert_file, settings.redis_tls_key_file or None)
    if not settings.redis_tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def connect_options(url: RedisUrl, settings: Settings) -> ConnectOptions:
    return ConnectOptions(
        username=url.username,
        password=url.password or settings.redis_password or None,
        tls=tls_context(settings) if url.tls else None,
        timeout=settings.redis_timeout,
    )


class SingleTopology:
    """One Redis server: it is always the primary."""

    sharded = False
    checks_role = False

    def __init__(self, address: Address) -> None:
        self._address = address

    async def discover(self, options: ConnectOptions) -> list[Address]:
        return [self._address]

    def route(self, channel: bytes) -> Address | None:
        return self._address

    def moved(self, slot: int, address: Address) -> None:
        pass  # no slots outside a cluster

    async def confirm(self, address: Address, options: ConnectOptions) -> bool:
        return True

    def probe_channel(self, base: bytes, address: Address) -> bytes:
        return base


class SentinelTopology(SingleTopology):
    """The master Sentinel names now: asked on every reconnect and every probe interval (with ROLE).

    After a failover the old master stays a master until Sentinel reconfigures it, which can take
    ten seconds and more; it still takes PUBLISH and serves its own subscribers, so a pod that only
    asked ROLE would go on publishing where the other pods no longer listen."""

    checks_role = True

    def __init__(self, sentinels: tuple[Address, ...], master: str, password: str | None) -> None:
        super().__init__(sentinels[0])
        self._sentinels = list(sentinels)
        self._master = master
        self._password = password

    async def discover(self, options: ConnectOptions) -> list[Address]:
        sentinel_options = replace(options, username=None, password=self._password)
        for sentinel in list(self._sentinels):
            conn: RespConnection | None = None
            try:
                conn = await RespConnection.open(sentinel, sentinel_options)
                reply = await conn.call(
                    b"SENTINEL", b"GET-MASTER-ADDR-BY-NAME", self._master, timeout=options.timeout
                )
            except (OSError, TimeoutError, ConnectionLost, ReplyError):
                continue
            finally:
                if conn is not None:
                    conn.close()
                    await conn.wait_closed()
            if reply:
                self._sentinels.remove(sentinel)  # ask the one that answered first next time
                self._sentinels.insert(0, sentinel)
                self._address = Address(reply[0].decode(), int(reply[1]))
                return [self._address]
        raise ConnectionLost(f"no Sentinel answered with a master named {self._master!r}")

    async def confirm(self, address: Address, options: ConnectOptions) -> bool:
        try:
            current = await self.discover(options)
        except ConnectionLost:
            return True  # no Sentinel answers: keep the master we have (ROLE is still asked)
        return current == [address]


def open_topology(url: RedisUrl) -> Topology:
    if url.kind == "sentinel":
        return SentinelTopology(url.hosts, url.master, url.sentinel_password)
    if url.kind == "cluster":
        from service.broker.cluster import ClusterTopology

        return ClusterTopology(url.hosts)
    return SingleTopology(url.hosts[0])

"""relay's Redis, as this package writes to it: one redis-py client per event loop.

Channels calls a layer from many event loops: the ASGI server's, and for each `async_to_sync` in
plain sync code (a management command, a WSGI worker) a new loop in a new thread that is closed
when the call returns. A redis-py client belongs to the loop it was made in, so each loop gets its
own on first use, closed by that loop's own shutdown (`shutdown_asyncgens`, which `asyncio.run`
calls): a server loop sends every call over the same connections, a loop per call pays one connect
per call (as channels_redis does). The pods' group rules (which groups keep history) are read from
`<prefix>:rules` and kept for `rules_cache_seconds`, for every loop.

Publishing is at most once, as in the pods: a plain PUBLISH is never sent twice (a lost reply
raises instead); a message to a history group carries an idempotency key, so it is sent once more
after a lost link and stored once.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio
import redis.exceptions
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from relay_channels import wire
from relay_channels.config import Config
from relay_channels.errors import RelayUnavailable
from relay_channels.rules import Rules

log = logging.getLogger("relay_channels")


@dataclass(frozen=True, slots=True)
class Published:
    """What a group message did: the pods it reached (those with members of the group), and for a
    group with history its position, and whether its idempotency key had stored it before."""

    pods: int
    epoch: str = ""
    offset: int = 0
    duplicate: bool = False


class _Link:
    """One event loop's client, and the async generator whose closing (at the loop's shutdown)
    closes it."""

    def __init__(self, client: Any, cluster: bool, others: list[Any] | None = None) -> None:
        self.client = client
        self.others = others or []  # Sentinel's own clients
        self.cluster = cluster
        self.publish = "SPUBLISH" if cluster else "PUBLISH"
        self.ready = not cluster  # a cluster client first learns the slot map
        self.guard: AsyncIterator[None] | None = None


class Publisher:
    """Writes frames, group changes and history appends into relay's Redis."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._links: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Link] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()  # the links of several loops, each in its own thread
        self._rules: tuple[float, Rules] | None = None

    async def group(self, group: str, frame: str, key: str | None = None) -> Published:
        """Send `frame` to every member of `group` on every pod (through the group's history when
        the pods' rules give it one)."""
        link = await self._link()
        rule = (await self._current_rules(link)).history_for(group)
        channel = wire.group_channel(self._config.prefix, group)
        if rule is None:
            pods = await self._call(link, channel, link.publish, channel, wire.message(frame, time.time()))
            return Published(int(pods))
        command = wire.append_args(
            self._config.prefix, group, frame, time.time(),
            history=rule.history, ttl=rule.ttl, sharded=link.cluster,
            epoch=secrets.token_hex(6), key=key or secrets.token_urlsafe(9),
        )  # fmt: skip
        epoch, offset, pods = await self._call(link, channel, *command, idempotent=True)
        return Published(max(0, int(pods)), epoch.decode(), int(offset), duplicate=int(pods) < 0)

    async def channel(self, channel_id: str, frame: str) -> int:
        """Send `frame` to the one relay connection `channel_id`; the pods reached (0 or 1)."""
        payload = wire.message(frame, time.time(), channel_id)
        return await self._to_pod(channel_id, payload, "send")

    async def control(self, verb: Literal["join", "leave"], channel_id: str, group: str) -> int:
        """Make relay connection `channel_id` join or leave `group`; the pods reached (0 or 1)."""
        return await self._to_pod(channel_id, wire.control(verb, channel_id, group), verb)

    async def close(self) -> None:
        """Close this event loop's client (the others close with their loops)."""
        link = self._links.get(asyncio.get_running_loop())
        if link is not None and link.guard is not None:
            await link.guard.aclose()  # type: ignore[attr-defined]

    async def _to_pod(self, channel_id: str, payload: bytes, what: str) -> int:
        link = await self._link()
        await self._current_rules(link)  # proves relay is there, under this prefix
        channel = wire.pod_channel(self._config.prefix, wire.pod_of(channel_id))
        pods = int(await self._call(link, channel, link.publish, channel, payload))
        if not pods:
            log.warning(
                "relay_channels: %s for %s reached no relay pod: the connection's pod %r is gone (the "
                "client will reconnect and get a new channel_id)",
                what, channel_id, wire.pod_of(channel_id),
            )  # fmt: skip
        return pods

    async def _current_rules(self, link: _Link) -> Rules:
        cached = self._rules
        if cached is not None and time.monotonic() < cached[0]:
            return cached[1]
        key = wire.rules_key(self._config.prefix)
        document = await self._call(link, key, "GET", key)
        if document is None:
            raise RelayUnavailable(
                f"no relay pod has connected to the Redis at {self._config.shown_url} with the prefix "
                f"{self._config.prefix!r} (the key {key!r} the pods write is missing): check "
                f"{self._config.setting(self._config.url_key)} against the pods' RELAY_BROKER_URL and "
                f"{self._config.setting('prefix')} against their RELAY_REDIS_PREFIX"
            )
        try:
            rules = Rules.parse(document)
        except ValueError as exc:
            raise RelayUnavailable(f"the key {key!r} does not hold relay's group rules: {exc}") from None
        self._rules = (time.monotonic() + self._config.rules_cache_seconds, rules)
        return rules

    async def _call(self, link: _Link, key: str, *args: Any, idempotent: bool = False) -> Any:
        """One command on the primary that owns `key`; RelayUnavailable, naming the setting, when
        it cannot be carried out. An `idempotent` command is sent once more after a lost link."""
        for attempt in (1, 2):
            try:
                if not link.cluster:
                    return await link.client.execute_command(*args)
                if not link.ready:
                    await link.client.initialize()
                    link.ready = True
                node = link.client.get_node_from_key(key)
                return await link.client.execute_command(*args, target_nodes=node)
            except redis.exceptions.AuthenticationError as exc:
                raise RelayUnavailable(
                    f"Redis at {self._config.shown_url} refused the credentials ({exc}): check the password "
                    f"in {self._config.setting(self._config.url_key)} or {self._config.setting('password')}"
                ) from None
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
                if idempotent and attempt == 1 and not isinstance(exc, redis.exceptions.TimeoutError):
                    continue
                raise RelayUnavailable(
                    f"cannot reach relay's Redis at {self._config.shown_url} ({type(exc).__name__}: {exc}): "
                    f"check {self._config.setting(self._config.url_key)}; it must be the Redis of the "
                    "pods' RELAY_BROKER_URL"
                ) from None
            except redis.exceptions.ResponseError as exc:
                if "function" in str(exc).lower():
                    raise RelayUnavailable(
                        f"relay's Redis functions library ({wire.APPEND}) is not loaded on the Redis at "
                        f"{self._config.shown_url}: the pods load it when they connect (Redis 7.0+); "
                        f"is {self._config.setting(self._config.url_key)} the pods' Redis? ({exc})"
                    ) from None
                raise RelayUnavailable(
                    f"the Redis at {self._config.shown_url} refused {args[0]}: {exc}"
                ) from None
            except redis.exceptions.RedisError as exc:  # cluster errors: no slot map, slot not covered
                raise RelayUnavailable(
                    f"relay's Redis at {self._config.shown_url} cannot take {args[0]} ({type(exc).__name__}: "
                    f"{exc}): check {self._config.setting(self._config.url_key)}"
                ) from None
        raise AssertionError("unreachable")

    async def _link(self) -> _Link:
        loop = asyncio.get_running_loop()
        link = self._links.get(loop)
        if link is None:
            link = self._open()
            with self._lock:
                self._links[loop] = link
            link.guard = self._guard(loop, link)
            await anext(link.guard)
        return link

    async def _guard(self, loop: asyncio.AbstractEventLoop, link: _Link) -> AsyncIterator[None]:
        """Suspended until the loop shuts down its async generators (asyncio.run does, before it
        closes the loop), then closes the client there, inside its own loop."""
        try:
            yield
        finally:
            with self._lock:
                if self._links.get(loop) is link:
                    del self._links[loop]
            for client in (link.client, *link.others):
                await client.aclose()

    def _open(self) -> _Link:
        url, config = self._config.url, self._config
        common: dict[str, Any] = {
            "username": url.username,
            "password": url.password,
            "socket_timeout": config.timeout,
            "socket_connect_timeout": config.timeout or 3.0,
            "retry": Retry(NoBackoff(), 0),  # at most once: see the module docstring
        }
        if url.tls:
            common.update(ssl=True, **config.tls)
        if url.kind == "cluster":
            nodes = [ClusterNode(host, port) for host, port in url.hosts]
            return _Link(RedisCluster(startup_nodes=nodes, **common), cluster=True)
        if url.kind == "sentinel":
            sentinel_options = {k: v for k, v in common.items() if k not in ("username", "password")}
            sentinel = Sentinel(  # type: ignore[no-untyped-call]
                list(url.hosts),
                sentinel_kwargs={**sentinel_options, "password": url.sentinel_password},
                **common,
            )
            return _Link(sentinel.master_for(url.master), cluster=False, others=list(sentinel.sentinels))
        host, port = url.hosts[0]
        return _Link(redis.asyncio.Redis(host=host, port=port, **common), cluster=False)

"""One life of a pod's connection to Redis, per primary: the pieces `RedisBroker` drives.

A `_Link` lives from opening to its first failure and is never reused: the broker opens a new one.
It holds a `_Node` per primary (two connections: pipelined commands, and pub/sub), what each node
was asked to subscribe, and the futures waiting for Redis's confirmations. A cluster link gains and
loses nodes while it lives, as the slot map changes; a node that leaves is closed quietly, without
failing the link.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from service.broker.resp import Address, ReplyError, RespConnection

# Errors that mean "this command was not carried out here, and will not be until the link changes":
# safe to send again once on the next link. Anything else Redis answers is final.
NOT_HERE = {
    "READONLY": "not_master",  # a demoted primary refuses writes (scripts, XADD; not PUBLISH)
    "MASTERDOWN": "not_master",
    "LOADING": "loading",  # Redis is loading its data set after a restart
    "CLUSTERDOWN": "topology_changed",
    # relay's function library is gone from that primary (FUNCTION FLUSH, a node that joined the
    # cluster empty): the next link loads it again.
    "function_missing": "function_missing",
}
MISSING_LIBRARY = "function_missing"


class _Node:
    """The link to one primary: a command connection, a pub/sub connection and their bookkeeping."""

    def __init__(self, address: Address, probe_channel: bytes) -> None:
        self.address = address
        self.probe_channel = probe_channel
        self.pub: RespConnection
        self.sub: RespConnection
        self.subscribed: set[bytes] = set()  # asked of Redis on this node (probe channel included)
        self.waiters: dict[bytes, deque[asyncio.Future[bool]]] = {}
        self.probe: tuple[str, float] | None = None  # nonce and monotonic send time
        self.answered = asyncio.Event()  # set when the probe came back (or the link ended)
        self.role_checked = 0.0  # monotonic time the last master check began (Sentinel)
        self.checking: asyncio.Task[None] | None = None

    def expect(self, channel: bytes) -> asyncio.Future[bool]:
        """A future resolved by Redis's next (un)subscribe confirmation for `channel` here: True
        when confirmed, False when it never will be (the link ended, the slot moved)."""
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.waiters.setdefault(channel, deque()).append(waiter)
        return waiter

    def settle(self, channel: bytes, confirmed: bool) -> bool:
        """Resolve the oldest waiter for `channel`; False when none was waiting."""
        waiters = self.waiters.get(channel)
        if not waiters:
            return False
        waiter = waiters.popleft()
        if not waiters:
            del self.waiters[channel]
        if not waiter.done():
            waiter.set_result(confirmed)
        return True

    def release(self) -> None:
        """Resolve every waiter as unconfirmed."""
        for waiters in self.waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(False)
        self.waiters.clear()

    def connections(self) -> list[RespConnection]:
        return [c for c in (getattr(self, "pub", None), getattr(self, "sub", None)) if c is not None]

    def close(self) -> None:
        self.answered.set()
        self.release()
        if self.checking is not None and self.checking is not asyncio.current_task():
            self.checking.cancel()
        for conn in self.connections():
            conn.close()


class _Link:
    """One life of the connection to Redis: from opening to the first failure. Never reused."""

    def __init__(self) -> None:
        self.nodes: dict[Address, _Node] = {}
        self.broken: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.monitor: asyncio.Task[None] | None = None
        self.refreshing: asyncio.Task[None] | None = None
        self.opening: dict[Address, asyncio.Task[_Node]] = {}
        self.failed = False
        self._retired: list[_Node] = []

    def fail(self, reason: str) -> None:
        """End this link (idempotent): close every connection, release everyone waiting on it."""
        if self.failed:
            return
        self.failed = True
        if not self.broken.done():
            self.broken.set_result(reason)
        for node in self.nodes.values():
            node.close()
        current = asyncio.current_task()
        for task in (self.monitor, self.refreshing, *self.opening.values()):
            if task is not None and task is not current:
                task.cancel()

    def retire(self, node: _Node) -> None:
        """Drop a node that no longer holds slots, without failing the link."""
        if self.nodes.get(node.address) is node:
            del self.nodes[node.address]
        self._retired.append(node)
        node.close()

    async def wait_closed(self) -> None:
        conns = [c for n in (*self.nodes.values(), *self._retired) for c in n.connections()]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(c.wait_closed() for c in conns)), 1.0)


def redirect(error: ReplyError, replied: Address) -> tuple[str, int, Address] | None:
    """`("MOVED" | "ASK", slot, where)` for a cluster redirection, else None. An empty host means
    the node that replied (the Cluster spec's "unknown endpoint")."""
    kind, _, rest = str(error).partition(" ")
    if kind not in ("MOVED", "ASK"):
        return None
    slot, _, endpoint = rest.partition(" ")
    host, _, port = endpoint.rpartition(":")
    host = host.strip("[]")
    if host in ("", "?"):
        host = replied.host
    try:
        return kind, int(slot), Address(host, int(port))
    except ValueError:
        return None


def error_kind(error: ReplyError) -> str:
    """The error's code word: `MOVED`, `READONLY`, `ERR`..., or MISSING_LIBRARY."""
    text = str(error)
    if text.startswith("ERR Function not found"):
        return MISSING_LIBRARY
    return text.partition(" ")[0]

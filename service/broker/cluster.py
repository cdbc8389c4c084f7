"""Redis Cluster topology: group channels spread over the shards by hash slot (sharded pub/sub).

With SPUBLISH/SSUBSCRIBE (Redis 7+) a message travels only inside the shard that owns its channel's
slot, instead of being copied over the cluster bus to every node as classic PUBLISH is. So bus
capacity grows with the number of primaries. The slot map comes from CLUSTER SLOTS, asked of any
reachable node each time the broker (re)connects and whenever Redis says the map changed (a MOVED
reply, or an `sunsubscribe` Redis pushes when a slot leaves a node): the broker then sends that
command again, opens connections to new primaries and moves the subscriptions, without dropping the
rest of the link.

Why not redis-py's asyncio `ClusterPubSub`: its sharded reader polls each node's pub/sub connection
in turn with `get_message(timeout)` (a poll loop, not one reader per shard), and its `ssubscribe`
does not wait for Redis's confirmation, which the Broker contract requires.
"""

from __future__ import annotations

import contextlib

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from service.broker.resp import Address, ConnectionLost, ConnectOptions, ReplyError, RespConnection


class ClusterTopology:
    """The cluster's primaries and which one owns each hash slot."""

    sharded = True
    checks_role = False

    def __init__(self, seeds: tuple[Address, ...]) -> None:
        self._seeds = list(seeds)
        self._owners: list[Address | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
        self._tags: dict[int, bytes] = {}  # slot -> a hash tag that lands in it (probe channels)

    async def discover(self, options: ConnectOptions) -> list[Address]:
        errors: list[str] = []
        for seed in list(self._seeds):
            conn: RespConnection | None = None
            try:
                conn = await RespConnection.open(seed, options)
                reply = await conn.call(b"CLUSTER", b"SLOTS", timeout=options.timeout)
            except (OSError, TimeoutError, ConnectionLost, ReplyError) as exc:
                errors.append(f"{seed}: {str(exc) or type(exc).__name__}")
                continue
            finally:
                if conn is not None:
                    conn.close()
                    await conn.wait_closed()
            try:
                return self._load(reply, seed)
            except ValueError as exc:  # a reply this node cannot give yet: ask the next one
                errors.append(f"{seed}: {exc}")
        raise ConnectionLost("no cluster node gave a usable slot map: " + "; ".join(errors))

    def _load(self, reply: object, seed: Address) -> list[Address]:
        """Read a CLUSTER SLOTS reply; ValueError (naming what) when it is not a full slot map."""
        if not isinstance(reply, list):
            raise ValueError("CLUSTER SLOTS answered with something other than a list")
        primaries: list[Address] = []
        owners: list[Address | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
        for entry in reply:
            if not isinstance(entry, list) or len(entry) < 3:
                raise ValueError(f"malformed CLUSTER SLOTS entry {entry!r:.80}")
            start, end, primary, *replicas = entry
            if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end < len(owners)):
                raise ValueError(f"malformed slot range {start!r:.20}-{end!r:.20}")
            address = _endpoint(primary, seed)
            if address not in primaries:
                primaries.append(address)
            owners[start : end + 1] = [address] * (end - start + 1)
            for replica in replicas:  # remember every node as a seed for the next discovery
                with contextlib.suppress(ValueError):
                    self._remember(_endpoint(replica, seed))
            self._remember(address)
        if None in owners:
            raise ValueError(f"slot {owners.index(None)} has no primary (failover under way?)")
        self._owners = owners
        return primaries

    def _remember(self, address: Address) -> None:
        if address not in self._seeds:
            self._seeds.append(address)

    def route(self, channel: bytes) -> Address | None:
        return self._owners[key_slot(channel)]

    def moved(self, slot: int, address: Address) -> None:
        if 0 <= slot < len(self._owners):
            self._owners[slot] = address
            self._remember(address)

    async def confirm(self, address: Address, options: ConnectOptions) -> bool:
        return True  # a demoted primary answers MOVED: the slot map follows

    def probe_channel(self, base: bytes, address: Address) -> bytes:
        # A hash tag picks the slot: one that lands in a slot `address` owns.
        slot = self._owners.index(address)
        tag = self._tags.get(slot)
        if tag is None:
            n = 0
            while key_slot(b"{%d}" % n) != slot:
                n += 1
            tag = self._tags[slot] = b"%d" % n
        return base + b"{" + tag + b"}"


def _endpoint(node: object, seed: Address) -> Address:
    """A node's address from its CLUSTER SLOTS entry. The Cluster spec: a NULL endpoint means "the
    address you asked, with this port" (nodes behind a load balancer), and so does an empty one (a
    node that does not know its own address); "?" is a node misconfigured to announce a hostname it
    does not have, and is read the same way rather than dialled."""
    if not isinstance(node, list) or len(node) < 2 or not isinstance(node[1], int):
        raise ValueError(f"malformed CLUSTER SLOTS node {node!r:.80}")
    host = node[0]
    if host is None or host in (b"", b"?"):
        return Address(seed.host, node[1])
    if not isinstance(host, bytes):
        raise ValueError(f"malformed CLUSTER SLOTS endpoint {host!r:.40}")
    return Address(host.decode(errors="replace"), node[1])

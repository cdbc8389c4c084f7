"""Redis Cluster topology: group channels spread over the shards by hash slot (sharded pub/sub).

With SPUBLISH/SSUBSCRIBE (Redis 7+) a message travels only inside the shard that owns its channel's
slot, instead of being copied over the cluster bus to every node as classic PUBLISH is. So bus
capacity grows with the number of primaries. The slot map comes from CLUSTER SLOTS, asked of any
reachable node each time the broker (re)connects; a failover or a MOVED reply breaks the link and
the next connect follows the new map (a publish answered MOVED is sent again on it).

Why not redis-py's asyncio `ClusterPubSub`: its sharded reader polls each node's pub/sub connection
in turn with `get_message(timeout)` (a poll loop, not one reader per shard), and its `ssubscribe`
does not wait for Redis's confirmation, which the Broker contract requires.
"""

from __future__ import annotations

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from service.broker.resp import Address, ConnectionLost, ConnectOptions, ReplyError, RespConnection


class ClusterTopology:
    """The cluster's primaries and which one owns each hash slot."""

    sharded = True
    checks_role = False

    def __init__(self, seeds: tuple[Address, ...]) -> None:
        self._seeds = list(seeds)
        self._slots: list[int] = [0] * REDIS_CLUSTER_HASH_SLOTS

    async def discover(self, options: ConnectOptions) -> list[Address]:
        errors: list[str] = []
        for seed in list(self._seeds):
            conn: RespConnection | None = None
            try:
                conn = await RespConnection.open(seed, options)
                reply = await conn.call(b"CLUSTER", b"SLOTS", timeout=options.timeout)
            except (OSError, TimeoutError, ConnectionLost, ReplyError) as exc:
                errors.append(f"{seed}: {exc or type(exc).__name__}")
                continue
            finally:
                if conn is not None:
                    conn.close()
                    await conn.wait_closed()
            return self._load(reply, seed)
        raise ConnectionLost("no cluster node answered CLUSTER SLOTS: " + "; ".join(errors))

    def _load(self, reply: list[list[object]], seed: Address) -> list[Address]:
        primaries: list[Address] = []
        slots = [-1] * REDIS_CLUSTER_HASH_SLOTS
        for start, end, primary, *replicas in reply:
            assert isinstance(start, int) and isinstance(end, int) and isinstance(primary, list)
            host = primary[0].decode() or seed.host  # an empty host means "the node you asked"
            address = Address(host, int(primary[1]))
            if address not in primaries:
                primaries.append(address)
            slots[start : end + 1] = [primaries.index(address)] * (end - start + 1)
            for replica in replicas:  # remember every node as a seed for the next discovery
                assert isinstance(replica, list)
                self._remember(Address(replica[0].decode() or seed.host, int(replica[1])))
            self._remember(address)
        if -1 in slots:
            raise ConnectionLost(f"cluster slot {slots.index(-1)} has no primary (failover under way?)")
        self._slots = slots
        return primaries

    def _remember(self, address: Address) -> None:
        if address not in self._seeds:
            self._seeds.append(address)

    def route(self, channel: bytes) -> int:
        return self._slots[key_slot(channel)]

    def probe_channel(self, base: bytes, index: int) -> bytes:
        # A hash tag picks the slot: try {0}, {1}, ... until one lands on primary `index`.
        tag = 0
        while self._slots[key_slot(b"%s{%d}" % (base, tag))] != index:
            tag += 1
        return b"%s{%d}" % (base, tag)

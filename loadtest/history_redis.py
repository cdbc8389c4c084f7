"""The Redis side of group history: memory per group and per stored message, CPU per message.

For `loadtest.history_cost`. Messages go through relay's own publish path in this process (a `Hub`
on a `RedisBroker`, so the same APPEND script, key names, retention and idempotency keys a pod
uses) into a redis-server of this run's own, with nobody subscribed.

Memory: a round empties Redis, publishes to `groups` groups and reads `INFO memory` `used_memory`
and `MEMORY USAGE ... SAMPLES 0` of every key at two points:

- after `history` messages per group: the stream is full, the idempotency set holds `history` keys;
- after max(DEDUPE_WINDOW, history) + `history` messages per group: the steady state, the
  idempotency set full at its window too. Every group that keeps getting messages looks like this.

The same round with history off (plain PUBLISH) is the control: it stores nothing.

CPU: on groups at that steady state, redis-server's own CPU (from /proc) per message for PUBLISH
(history off), APPEND as relay sends it (history on: a fresh idempotency key per message unless the
client gave one), and APPEND with no key (a what-if: the script's `key = ""` branch, which skips
the sorted set; relay does not publish this way today). Publishes are pipelined from every group at
once, so this is Redis's cost per message at its best batching, and 1 / cost its ceiling.
"""

from __future__ import annotations

import asyncio
import secrets
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis.asyncio

from loadtest.servers import cpu_seconds
from service import channels
from service.broker import Broker, Envelope, Retention, open_broker
from service.broker.history import DEDUPE_WINDOW
from service.config import Settings
from service.hub import Hub
from service.rules import GroupRule, GroupRules

KINDS = {b"h": "stream", b"m": "meta", b"i": "idempotency"}  # service/broker/history.py's keys


def window(history: int) -> int:
    """Idempotency keys service/broker/history.py keeps per group."""
    return max(DEDUPE_WINDOW, history)


def frame_of(size: int, group: str, n: int) -> str:
    """A frame as members receive it (`{"message": {...}}`), padded to `size` characters."""
    head = f'{{"message":{{"task":"send_message_to_group","group_name":"{group}","s":{n},"text":"'
    tail = '"}}'
    return head + "x" * max(0, size - len(head) - len(tail)) + tail


@dataclass
class MemorySample:
    arm: str  # off | on
    round: int
    groups: int
    messages_per_group: int
    frame_bytes: int
    used_memory_delta: int
    keys: int
    by_kind: dict[str, int] = field(default_factory=dict)  # MEMORY USAGE summed per kind of key
    stream_entries: int = 0
    idempotency_keys: int = 0
    seconds: float = 0.0

    @property
    def per_group(self) -> float:
        return self.used_memory_delta / self.groups

    @property
    def per_stream_entry(self) -> float:
        """Bytes of stream per stored message (MEMORY USAGE of the streams over their entries)."""
        return self.by_kind.get("stream", 0) / self.stream_entries if self.stream_entries else 0.0

    @property
    def per_idempotency_key(self) -> float:
        return self.by_kind.get("idempotency", 0) / self.idempotency_keys if self.idempotency_keys else 0.0

    @property
    def idempotency_share(self) -> float:
        total = sum(self.by_kind.values())
        return self.by_kind.get("idempotency", 0) / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {
            "bytes_per_group": round(self.per_group),
            "stream_bytes_per_entry": round(self.per_stream_entry, 1),
            "idempotency_bytes_per_key": round(self.per_idempotency_key, 1),
            "idempotency_share": round(self.idempotency_share, 3),
        }


class MemoryProbe:
    """One redis-server, a Hub with history on every group and one without, and the readings."""

    def __init__(self, url: str, history: int, ttl: float, frame_bytes: int) -> None:
        self.url, self.history, self.ttl, self.frame_bytes = url, history, ttl, frame_bytes
        settings = Settings.from_env({}, broker_url=url, pod_id="history-cost")
        self.broker: Broker = open_broker(settings)
        rules = GroupRules([GroupRule(match="*", history=history, ttl=ttl, latest=False)])
        self.hubs = {
            "off": Hub(self.broker, "history-cost"),
            "on": Hub(self.broker, "history-cost", rules=rules),
        }
        self.client = redis.asyncio.Redis.from_url(url)

    async def close(self) -> None:
        await self.client.aclose()
        await self.broker.close()

    async def warm_up(self) -> None:
        """A discarded round of each arm on two groups: the connections, their buffers grown by a
        burst, and the script cache are there before the first measured round, and not history."""
        for arm in self.hubs:
            await self.round(arm, 0, 2)

    def checkpoints(self) -> list[int]:
        return [self.history, window(self.history) + self.history]

    async def round(self, arm: str, index: int, groups: int) -> list[MemorySample]:
        """Empty Redis, then fill `groups` groups and read the memory at each checkpoint."""
        await self.client.flushall()
        base = await self._used()
        names = [f"mem{g}" for g in range(groups)]
        frames = {name: [frame_of(self.frame_bytes, name, n) for n in range(8)] for name in names}
        hub, done, out = self.hubs[arm], 0, []
        for target in self.checkpoints():
            started = time.perf_counter()

            async def fill(name: str, first: int, last: int) -> None:
                for n in range(first, last):
                    await hub.publish(name, frames[name][n % 8])

            await asyncio.gather(*(fill(name, done, target) for name in names))
            done = target
            sample = MemorySample(arm, index, groups, target, self.frame_bytes, await self._used() - base, 0)
            sample.seconds = round(time.perf_counter() - started, 2)
            await self._read_keys(sample)
            out.append(sample)
        return out

    async def _used(self) -> int:
        info = await self.client.info("memory")
        return int(info["used_memory"])

    async def _read_keys(self, sample: MemorySample) -> None:
        by_kind = dict.fromkeys(KINDS.values(), 0)
        async for key in self.client.scan_iter(count=1000):
            sample.keys += 1
            kind = KINDS.get(key.split(b":")[1], "other") if key.count(b":") >= 2 else "other"
            by_kind[kind] = by_kind.get(kind, 0) + int(await self.client.memory_usage(key, samples=0) or 0)
            if kind == "stream":
                sample.stream_entries += int(await self.client.xlen(key))
            elif kind == "idempotency":
                sample.idempotency_keys += int(await self.client.zcard(key))
        sample.by_kind = by_kind


async def measure_memory(
    url: str, *, history: int, ttl: float, frame_bytes: int, groups: int, rounds: int, log: Any = print
) -> list[MemorySample]:
    """`rounds` rounds, history off and on alternating which goes first."""
    probe = MemoryProbe(url, history, ttl, frame_bytes)
    samples: list[MemorySample] = []
    try:
        await probe.warm_up()
        for r in range(1, rounds + 1):
            for arm in ("off", "on") if r % 2 else ("on", "off"):
                for s in await probe.round(arm, r, groups):
                    samples.append(s)
                    log(
                        f"memory round {r} | history {arm:>3} | {s.messages_per_group:>5} msgs/group: "
                        f"{s.per_group:>9,.0f} B/group, stream {s.per_stream_entry:6.1f} B/entry, "
                        f"idempotency {s.per_idempotency_key:6.1f} B/key ({s.idempotency_share:.0%})"
                    )
    finally:
        await probe.close()
    return samples


def summarize_memory(samples: list[MemorySample]) -> list[dict[str, Any]]:
    """Medians over rounds, per arm and checkpoint."""
    rows = []
    for arm, messages in dict.fromkeys((s.arm, s.messages_per_group) for s in samples):
        mine = [s for s in samples if s.arm == arm and s.messages_per_group == messages]
        kinds = sorted({k for s in mine for k in s.by_kind})
        rows.append(
            {
                "arm": arm,
                "messages_per_group": messages,
                "rounds": len(mine),
                "groups": mine[0].groups,
                "frame_bytes": mine[0].frame_bytes,
                "bytes_per_group": [round(s.per_group) for s in mine],
                "bytes_per_group_median": round(statistics.median(s.per_group for s in mine)),
                "bytes_per_group_by_kind_median": {
                    k: round(statistics.median(s.by_kind.get(k, 0) / s.groups for s in mine)) for k in kinds
                },
                "stream_entries_per_group": mine[0].stream_entries / mine[0].groups,
                "idempotency_keys_per_group": mine[0].idempotency_keys / mine[0].groups,
                "stream_bytes_per_entry_median": round(
                    statistics.median(s.per_stream_entry for s in mine), 1
                ),
                "idempotency_bytes_per_key_median": round(
                    statistics.median(s.per_idempotency_key for s in mine), 1
                ),
                "idempotency_share_median": round(statistics.median(s.idempotency_share for s in mine), 3),
            }
        )
    return rows


# --- CPU -------------------------------------------------------------------------------------------

CPU_VARIANTS = ("publish", "append", "append without key")


async def measure_redis_cpu(
    url: str,
    pid: int,
    *,
    history: int,
    ttl: float,
    frame_bytes: int,
    groups: int,
    messages: int,
    rounds: int,
    log: Any = print,
) -> list[dict[str, Any]]:
    """redis-server CPU per message of each variant, `messages` per group per sample; the order
    rotates each round. Groups are first filled to their steady size."""
    probe = MemoryProbe(url, history, ttl, frame_bytes)
    names = [f"cpu{g}" for g in range(groups)]
    retention = Retention(history, ttl)
    broker = probe.broker
    samples: list[dict[str, Any]] = []

    async def send(variant: str, name: str, count: int) -> None:
        frame, channel = frame_of(frame_bytes, name, 0), channels.group(name)
        for _ in range(count):
            envelope = Envelope(channel, frame, time.time())
            if variant == "publish":
                await broker.publish(envelope)
            else:  # a fresh key per message, as Hub.publish makes when the client gave none
                await broker.append(
                    envelope, retention, secrets.token_urlsafe(9) if variant == "append" else ""
                )

    try:
        await probe.client.flushall()
        await asyncio.gather(*(send("append", n, window(history) + history) for n in names))
        for r in range(1, rounds + 1):
            shift = (r - 1) % len(CPU_VARIANTS)
            for variant in CPU_VARIANTS[shift:] + CPU_VARIANTS[:shift]:
                c0, t0 = cpu_seconds(pid), time.perf_counter()
                await asyncio.gather(*(send(variant, n, messages) for n in names))
                cpu, wall = cpu_seconds(pid) - c0, time.perf_counter() - t0
                total = messages * groups
                sample = {
                    "variant": variant,
                    "round": r,
                    "messages": total,
                    "redis_cpu_s": round(cpu, 3),
                    "wall_s": round(wall, 3),
                    "redis_us_per_message": round(cpu / total * 1e6, 2),
                    "messages_per_second": round(total / wall),
                }
                samples.append(sample)
                log(
                    f"redis cpu round {r} | {variant:>18}: {sample['redis_us_per_message']:5.1f} us/msg, "
                    f"{sample['messages_per_second']:,} msg/s from one client"
                )
    finally:
        await probe.close()
    return samples


def summarize_redis_cpu(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians per variant, and the ratio to PUBLISH."""
    rows = []
    base = statistics.median(s["redis_us_per_message"] for s in samples if s["variant"] == "publish")
    for variant in dict.fromkeys(s["variant"] for s in samples):
        us = [s["redis_us_per_message"] for s in samples if s["variant"] == variant]
        median = statistics.median(us)
        rows.append(
            {
                "variant": variant,
                "redis_us_per_message": us,
                "redis_us_per_message_median": round(median, 2),
                "ratio_to_publish": round(median / base, 1) if base else None,
                "messages_per_redis_cpu_second": round(1e6 / median) if median else None,
            }
        )
    return rows

"""The load generators' bookkeeping: exact latency percentiles, loss, duplicates and order.

Pure standard library, so the Locust file, the asyncio engine used by `bench.py` and the unit tests
share one implementation. Everything here merges: each worker keeps its own `Histogram` and
`Ledger`, ships `to_dict()` snapshots, and whoever writes the summary merges them.

Message stamps: every published object carries `p` (publisher id), `s` (that publisher's sequence
number *for that group*, from 0) and `t` (wall-clock send time, seconds). One receiver is a member of
one group (the seed protocol: the path names the group), so a receiver sees each publisher's stream
for its group as 0, 1, 2, ... and anything else is a hole, a duplicate or an order violation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

# Histogram: integer microseconds; values under 2,048 us are exact, above that 11 significant bits
# are kept (relative error under 0.1%), which is HdrHistogram's idea in a dozen lines.
_MANTISSA_BITS = 11
_MANTISSA = 1 << _MANTISSA_BITS
_HALF = _MANTISSA // 2


def _key(us: int) -> int:
    if us < _MANTISSA:
        return us
    shift = us.bit_length() - _MANTISSA_BITS
    return shift * _MANTISSA + (us >> shift)


def _value(key: int) -> float:
    """The middle of the bucket, in microseconds."""
    shift, mantissa = divmod(key, _MANTISSA)
    if shift == 0:
        return float(mantissa)
    return float((mantissa << shift) + ((1 << shift) - 1) / 2)


class Histogram:
    """Latencies in microseconds, mergeable, with percentiles within 0.1% (exact under 2 ms)."""

    __slots__ = ("counts", "max_us", "min_us", "n", "total_us")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.n = 0
        self.total_us = 0
        self.min_us = 0
        self.max_us = 0

    def record(self, seconds: float) -> None:
        us = int(seconds * 1_000_000)
        if us < 0:  # clocks of one machine; a negative value is rounding, not time travel
            us = 0
        key = us if us < _MANTISSA else _key(us)
        counts = self.counts
        counts[key] = counts.get(key, 0) + 1
        if self.n == 0 or us < self.min_us:
            self.min_us = us
        if us > self.max_us:
            self.max_us = us
        self.n += 1
        self.total_us += us

    def merge(self, other: Histogram) -> None:
        for key, count in other.counts.items():
            self.counts[key] = self.counts.get(key, 0) + count
        if other.n:
            self.min_us = other.min_us if self.n == 0 else min(self.min_us, other.min_us)
            self.max_us = max(self.max_us, other.max_us)
        self.n += other.n
        self.total_us += other.total_us

    def percentile(self, q: float) -> float:
        """The q-th percentile (0-100) in milliseconds; 0 when empty. The top is the exact max."""
        if self.n == 0:
            return 0.0
        if q >= 100:
            return self.max_us / 1000
        rank = max(1, math.ceil(self.n * q / 100))
        seen = 0
        for key in sorted(self.counts):
            seen += self.counts[key]
            if seen >= rank:
                return min(_value(key), float(self.max_us)) / 1000
        return self.max_us / 1000

    def mean_ms(self) -> float:
        return self.total_us / self.n / 1000 if self.n else 0.0

    def summary(self) -> dict[str, float]:
        return {
            "count": self.n,
            "min_ms": round(self.min_us / 1000, 3),
            "mean_ms": round(self.mean_ms(), 3),
            "p50_ms": round(self.percentile(50), 3),
            "p90_ms": round(self.percentile(90), 3),
            "p99_ms": round(self.percentile(99), 3),
            "p999_ms": round(self.percentile(99.9), 3),
            "max_ms": round(self.max_us / 1000, 3),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "counts": [[k, c] for k, c in self.counts.items()],
            "n": self.n,
            "total_us": self.total_us,
            "min_us": self.min_us,
            "max_us": self.max_us,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Histogram:
        h = cls()
        h.counts = {int(k): int(c) for k, c in data["counts"]}
        h.n, h.total_us = int(data["n"]), int(data["total_us"])
        h.min_us, h.max_us = int(data["min_us"]), int(data["max_us"])
        return h


# Holes wider than this are counted, not listed, so a lost link cannot exhaust memory.
MAX_HOLES = 100_000


IN_ORDER, LATE, DUPLICATE = 0, -1, -2  # what Stream.see saw (a positive number: messages skipped)


class Stream:
    """What one receiver saw of one publisher's sequence for its group."""

    __slots__ = ("dups", "first", "holes", "overflow", "reorders", "top", "unique")

    def __init__(self, seq: int) -> None:
        self.first = self.top = seq
        self.unique = 1
        self.dups = 0
        self.reorders = 0
        self.overflow = 0  # holes counted but not listed (gaps wider than MAX_HOLES)
        self.holes: set[int] | None = None

    def see(self, seq: int) -> int:
        """Record `seq`: IN_ORDER, LATE (it arrived after a later one), DUPLICATE, or the number of
        messages this one skipped (a hole opened: they are missing until they arrive late)."""
        top = self.top
        if seq == top + 1:  # the common case: in order, nothing missing
            self.top = seq
            self.unique += 1
            return IN_ORDER
        if seq > top:
            self._add_holes(top + 1, seq)
            self.top = seq
            self.unique += 1
            return seq - top - 1
        if seq < self.first:  # older than anything seen: late, and it opens holes below first
            self._add_holes(seq + 1, self.first)
            self.first = seq
            self.unique += 1
            self.reorders += 1
            return LATE
        if self.holes is not None and seq in self.holes:
            self.holes.discard(seq)
            self.unique += 1
            self.reorders += 1
            return LATE
        self.dups += 1
        return DUPLICATE

    def _add_holes(self, start: int, stop: int) -> None:
        if self.holes is None:
            self.holes = set()
        room = MAX_HOLES - len(self.holes)
        if stop - start > room:
            self.overflow += stop - start - max(room, 0)
            stop = start + max(room, 0)
        self.holes.update(range(start, stop))

    @property
    def missing(self) -> int:
        return (len(self.holes) if self.holes else 0) + self.overflow

    def to_list(self) -> list[int]:
        return [self.first, self.top, self.unique, self.dups, self.reorders, self.missing]


@dataclass
class Receiver:
    """One subscriber connection: its group, when it joined and left, and its streams."""

    group: str
    joined: float
    left: float | None = None
    streams: dict[str, Stream] = field(default_factory=dict)

    def see(self, publisher: str, seq: int) -> int:
        """Stream.see for `publisher`'s stream (a first message is in order)."""
        stream = self.streams.get(publisher)
        if stream is None:
            self.streams[publisher] = Stream(seq)
            return IN_ORDER
        return stream.see(seq)


@dataclass
class Sent:
    """One publisher's output to one group: how many (sequence 0..count-1) and when."""

    count: int = 0
    first: float = 0.0
    last: float = 0.0


class Ledger:
    """Receivers and publishers of one worker (or, merged, of the whole run)."""

    def __init__(self) -> None:
        self.receivers: dict[str, dict[str, Any]] = {}  # id -> to_dict() form, for merged ledgers
        self.live: dict[str, Receiver] = {}
        self.sent: dict[str, dict[str, Sent]] = {}  # publisher -> group -> Sent

    def receiver(self, rid: str, group: str, joined: float) -> Receiver:
        r = Receiver(group, joined)
        self.live[rid] = r
        return r

    def sending(self, publisher: str, group: str, now: float) -> int:
        """The next sequence number for `publisher` in `group`; records the send."""
        groups = self.sent.setdefault(publisher, {})
        s = groups.get(group)
        if s is None:
            s = groups[group] = Sent(first=now)
        seq = s.count
        s.count += 1
        s.last = now
        return seq

    def unsend(self, publisher: str, group: str) -> None:
        """Take back the last `sending`: the publisher's socket refused it (it never left)."""
        self.sent[publisher][group].count -= 1

    def to_dict(self) -> dict[str, Any]:
        receivers = dict(self.receivers)
        for rid, r in self.live.items():
            receivers[rid] = {
                "group": r.group,
                "joined": r.joined,
                "left": r.left,
                "streams": {p: s.to_list() for p, s in r.streams.items()},
            }
        sent = {p: {g: [s.count, s.first, s.last] for g, s in gs.items()} for p, gs in self.sent.items()}
        return {"receivers": receivers, "sent": sent}

    @classmethod
    def merged(cls, parts: Iterable[Mapping[str, Any]]) -> Ledger:
        ledger = cls()
        for part in parts:
            ledger.receivers.update(part["receivers"])
            for p, groups in part["sent"].items():
                mine = ledger.sent.setdefault(p, {})
                for g, (count, first, last) in groups.items():
                    mine[g] = Sent(int(count), float(first), float(last))
        return ledger

    def accounting(self, grace: float = 2.0) -> dict[str, int]:
        """Loss, duplicates and order violations over every receiver.

        A receiver that was a member for the whole of a publisher's stream to its group (joined
        before the first send, still there `grace` seconds after the last) owes every message:
        its loss is sent minus unique received, head, tail and never-seen streams included. A
        receiver that came or went in the middle (churn, pod kill) is held only to the holes
        inside what it saw.
        """
        parts: dict[str, dict[str, Any]] = self.to_dict()["receivers"]
        by_group: dict[str, list[tuple[str, Sent]]] = {}
        for p, groups in self.sent.items():
            for g, s in groups.items():
                by_group.setdefault(g, []).append((p, s))
        expected = unique = lost = dups = reorders = partial = 0
        for r in parts.values():
            streams: dict[str, list[int]] = r["streams"]
            for p, s in by_group.get(r["group"], []):
                st = streams.get(p)
                whole = r["joined"] <= s.first and (r["left"] is None or r["left"] >= s.last + grace)
                if whole:
                    expected += s.count
                    got = min(st[2], s.count) if st else 0
                    lost += s.count - got
                else:
                    partial += 1
                    if st:
                        expected += st[1] - st[0] + 1
                        lost += st[5]
            for st in streams.values():
                unique += st[2]
                dups += st[3]
                reorders += st[4]
        return {
            "expected": expected,
            "unique": unique,
            "lost": lost,
            "duplicates": dups,
            "order_violations": reorders,
            "partial_streams": partial,
        }


@dataclass
class Slo:
    """What a run must meet; None leaves a bound unchecked."""

    p99_ms: float | None = None
    p999_ms: float | None = None
    max_loss_ratio: float | None = None
    max_duplicates: int | None = None
    max_order_violations: int | None = None
    max_connect_error_ratio: float | None = None
    min_delivered_ratio: float | None = None  # of the deliveries the schedule asked for

    def violations(self, summary: Mapping[str, Any]) -> list[str]:
        lat, acc, conn = summary["latency"], summary["accounting"], summary["connections"]
        out: list[str] = []
        if self.p99_ms is not None and lat["p99_ms"] > self.p99_ms:
            out.append(f"p99 {lat['p99_ms']:.1f} ms > {self.p99_ms} ms")
        if self.p999_ms is not None and lat["p999_ms"] > self.p999_ms:
            out.append(f"p99.9 {lat['p999_ms']:.1f} ms > {self.p999_ms} ms")
        if self.max_loss_ratio is not None and acc["loss_ratio"] > self.max_loss_ratio:
            out.append(f"loss {acc['lost']} ({acc['loss_ratio']:.2%}) > {self.max_loss_ratio:.2%}")
        if self.max_duplicates is not None and acc["duplicates"] > self.max_duplicates:
            out.append(f"duplicates {acc['duplicates']} > {self.max_duplicates}")
        if self.max_order_violations is not None and acc["order_violations"] > self.max_order_violations:
            out.append(f"order violations {acc['order_violations']} > {self.max_order_violations}")
        attempts = conn["ok"] + conn["errors"]
        if self.max_connect_error_ratio is not None and attempts:
            ratio = conn["errors"] / attempts
            if ratio > self.max_connect_error_ratio:
                out.append(f"connect errors {conn['errors']}/{attempts} > {self.max_connect_error_ratio:.2%}")
        if self.min_delivered_ratio is not None and acc["expected"]:
            ratio = acc["unique"] / acc["expected"]
            if ratio < self.min_delivered_ratio:
                out.append(f"delivered {ratio:.2%} of expected < {self.min_delivered_ratio:.2%}")
        return out


@dataclass
class Health:
    """Is the load generator itself the bottleneck? One per generator process."""

    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0
    lag: Histogram = field(default_factory=Histogram)  # event-loop (or greenlet hub) lateness
    late_sends: int = 0  # publishes sent more than LATE_SEND seconds behind the open-loop schedule
    sends: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "cpu_seconds": self.cpu_seconds,
            "wall_seconds": self.wall_seconds,
            "lag": self.lag.to_dict(),
            "late_sends": self.late_sends,
            "sends": self.sends,
        }


# A generator process is saturated at this share of one core, or this event-loop lag at p99, or
# when this share of its publishes left later than LATE_SEND behind schedule.
SATURATED_CPU = 0.90
SATURATED_LAG_MS = 50.0
SATURATED_LATE_RATIO = 0.01
LATE_SEND = 0.010


def judge_generators(workers: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Merge generator health; `saturated` lists why the run is invalid (empty when it is not)."""
    why: list[str] = []
    cpu: list[float] = []
    lag = Histogram()
    late = sends = 0
    for w in workers:
        share = w["cpu_seconds"] / w["wall_seconds"] if w["wall_seconds"] > 0 else 0.0
        cpu.append(round(share, 3))
        lag.merge(Histogram.from_dict(w["lag"]))
        late += int(w["late_sends"])
        sends += int(w["sends"])
    if cpu and max(cpu) >= SATURATED_CPU:
        why.append(f"load generator CPU {max(cpu):.0%} of a core >= {SATURATED_CPU:.0%}")
    lag_p99 = lag.percentile(99)
    if lag_p99 > SATURATED_LAG_MS:
        why.append(f"load generator event-loop lag p99 {lag_p99:.0f} ms > {SATURATED_LAG_MS:.0f} ms")
    if sends and late / sends > SATURATED_LATE_RATIO:
        why.append(f"{late}/{sends} publishes left over {LATE_SEND * 1000:.0f} ms behind schedule")
    return {
        "cpu_share_per_process": cpu,
        "loop_lag_p99_ms": round(lag_p99, 2),
        "loop_lag_max_ms": round(lag.max_us / 1000, 2),
        "late_sends": late,
        "saturated": why,
    }


def summarize(
    *,
    histogram: Histogram,
    ledger: Ledger,
    connections: Mapping[str, Any],
    generators: Iterable[Mapping[str, Any]],
    seconds: float,
    slo: Slo | None = None,
    profile: str = "",
    grace: float = 2.0,
) -> dict[str, Any]:
    """The JSON summary of one run; `ok` is False when an SLO is broken or the run is invalid."""
    acc: dict[str, float] = dict(ledger.accounting(grace))
    acc["loss_ratio"] = acc["lost"] / acc["expected"] if acc["expected"] else 0.0
    sent = sum(s.count for groups in ledger.sent.values() for s in groups.values())
    gen = judge_generators(generators)
    summary: dict[str, Any] = {
        "profile": profile,
        "seconds": round(seconds, 2),
        "published": sent,
        "published_per_s": round(sent / seconds, 1) if seconds else 0.0,
        "deliveries": histogram.n,
        "delivered_per_s": round(histogram.n / seconds, 1) if seconds else 0.0,
        "latency": histogram.summary(),
        "accounting": acc,
        "connections": dict(connections),
        "generator": gen,
        "valid": not gen["saturated"],
    }
    broken = slo.violations(summary) if slo else []
    if slo and histogram.n == 0:
        broken.append("nothing was delivered: no latency to judge")
    summary["slo_violations"] = broken
    summary["ok"] = not broken and summary["valid"]
    return summary

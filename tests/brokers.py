"""Helpers for broker tests: open a broker of each flavour, collect what it delivers."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from service.broker import Broker, BrokerUnavailable, Envelope, open_broker
from service.config import Settings

# Short timings so failures are noticed and recovered from within a second or two.
FAST_REDIS: dict[str, Any] = {"redis_probe_interval": 0.2, "redis_timeout": 0.5, "redis_backoff_max": 0.3}


def redis_broker(url: str, prefix: str, pod_id: str = "a", **overrides: Any) -> Broker:
    values: dict[str, Any] = {"broker_url": url, "pod_id": pod_id, "redis_prefix": prefix, **FAST_REDIS}
    values.update(overrides)
    return open_broker(Settings(**values))


class Collector:
    """Reads a broker's `messages()` in a task; tests wait for what they expect."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.envelopes: list[Envelope] = []
        self._arrived = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._collect())

    async def _collect(self) -> None:
        async for envelope in self.broker.messages():
            self.envelopes.append(envelope)
            self._arrived.set()

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[Envelope]:
        """Until at least `count` envelopes arrived; all of them."""
        deadline = time.monotonic() + timeout
        while len(self.envelopes) < count:
            self._arrived.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{len(self.envelopes)} of {count} envelopes arrived in {timeout} s")
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                continue
        return self.envelopes

    async def quiet(self, within: float = 0.3) -> None:
        """Assert no envelope arrives within `within` seconds (> 0: a zero window sleeps not at all
        and so cannot see anything). Prefer `nothing_before`: a marker, no fixed window to wait out."""
        assert within > 0, "a zero window cannot see anything"
        before = len(self.envelopes)
        await asyncio.sleep(within)
        assert self.envelopes[before:] == [], "unexpected envelopes"

    async def nothing_before(self, marker: Envelope, since: int, timeout: float = 5.0) -> None:
        """Assert the first envelope after the first `since` is `marker` (published after whatever
        must not arrive), so nothing published ahead of it reached this pod. Take `since` as
        `len(envelopes)` before publishing: the marker may arrive before this is called. Sound only
        when what must not arrive would have come the marker's way ahead of it: one publisher, and in
        a cluster one slot (a hash tag shared by the channels), whose order Redis keeps."""
        arrived = await self.wait_for(since + 1, timeout)
        assert arrived[since] == marker, f"unexpected envelope before the marker: {arrived[since]!r}"

    async def stop(self) -> None:
        await self.broker.close()
        await asyncio.wait_for(self._task, 5)


async def eventually(check: Any, timeout: float = 5.0, interval: float = 0.02) -> float:
    """Poll `check()` until true; seconds it took. AssertionError on timeout."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)
    return time.monotonic() - started


async def delivered_again(a: Collector, b: Collector, channel: str, timeout: float) -> float:
    """Publish on `channel` from `a` until `b` receives one; the seconds it took. Publishes refused
    while the link is down are expected: each is retried after a short pause."""
    started = time.monotonic()
    n = 0
    while time.monotonic() - started < timeout:
        n += 1
        frame = f"after {n}"
        try:
            await a.broker.publish(Envelope(channel, frame, time.time()))
        except BrokerUnavailable:  # refused at once, without yielding: give the link a turn
            await asyncio.sleep(0.02)
            continue
        try:
            await asyncio.wait_for(_arrival(b, frame), 0.5)
        except TimeoutError:
            continue
        return time.monotonic() - started
    raise AssertionError(f"no delivery within {timeout} s")


async def _arrival(collector: Collector, frame: str) -> None:
    seen = 0
    while True:
        envelopes = await collector.wait_for(seen + 1, 1.0)
        if any(e.frame == frame for e in envelopes[seen:]):
            return
        seen = len(envelopes)

"""Token bucket and per-key locks: pure logic."""

from __future__ import annotations

import asyncio

import pytest

from service.limits import KeyedLock, TokenBucket


def test_bucket_allows_a_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate=10, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(0.05) is False  # half a token refilled
    assert bucket.take(0.1) is True  # one token after 1/rate seconds
    assert bucket.take(0.1) is False


def test_bucket_never_holds_more_than_its_burst() -> None:
    bucket = TokenBucket(rate=10, burst=2, now=0.0)
    assert [bucket.take(100.0) for _ in range(3)] == [True, True, False]


def test_zero_rate_disables_the_limit() -> None:
    bucket = TokenBucket(rate=0, burst=1, now=0.0)
    assert all(bucket.take(0.0) for _ in range(1000))


async def test_keyed_lock_serialises_one_key_and_forgets_it_after() -> None:
    locks = KeyedLock()
    order: list[str] = []

    async def worker(name: str, key: str) -> None:
        async with locks.hold(key):
            order.append(name + "+")
            await asyncio.sleep(0.01)
            order.append(name + "-")

    await asyncio.gather(worker("a", "k"), worker("b", "k"), worker("c", "other"))
    assert order.index("a-") < order.index("b+")  # same key: one after the other
    assert order.index("c+") < order.index("a-")  # another key: not held up
    assert len(locks) == 0


def test_reserve_borrows_and_says_how_long_to_wait() -> None:
    bucket = TokenBucket(rate=10, burst=2, now=0.0)
    assert [bucket.reserve(0.0) for _ in range(2)] == [0.0, 0.0]  # the burst
    assert bucket.reserve(0.0) == pytest.approx(0.1)  # one token borrowed: wait 1/rate
    assert bucket.reserve(0.0) == pytest.approx(0.2)  # waiters queue up behind each other
    assert bucket.reserve(0.3) == pytest.approx(0.0)  # the debt was repaid by 0.3 s
    assert bucket.take(0.3) is False  # reserving spent what take would have found


def test_reserve_with_zero_rate_never_waits() -> None:
    bucket = TokenBucket(rate=0, burst=1, now=0.0)
    assert all(bucket.reserve(0.0) == 0.0 for _ in range(1000))

"""Token bucket and per-key locks: pure logic."""

from __future__ import annotations

import asyncio

import pytest

from service.limits import SWEEP_INTERVAL, KeyedLock, Quotas, TokenBucket
from tests.helpers import quotas


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


def test_reserve_refills_from_the_last_call_not_from_time_zero() -> None:
    bucket = TokenBucket(rate=10, burst=2, now=1000.0)
    assert [bucket.reserve(1000.0) for _ in range(2)] == [0.0, 0.0]
    assert bucket.reserve(1000.05) == pytest.approx(0.05)  # half a token refilled: half the wait
    assert bucket.reserve(1000.2) == pytest.approx(0.0)
    assert bucket.reserve(1000.2) == pytest.approx(0.1)


def test_reserve_says_go_now_while_a_fraction_of_a_token_is_left_over() -> None:
    bucket = TokenBucket(rate=10, burst=2, now=0.0)
    assert bucket.reserve(0.0) == 0.0  # one token left
    assert bucket.reserve(0.05) == 0.0  # 1.5 tokens: one spent, half a token left, no wait


def test_reserve_with_zero_rate_never_waits() -> None:
    bucket = TokenBucket(rate=0, burst=1, now=0.0)
    assert all(bucket.reserve(0.0) == 0.0 for _ in range(1000))


def test_a_sweep_keeps_users_that_still_hold_a_socket_and_their_cap() -> None:
    q = quotas(user_max_connections=1)
    assert q.admit("held", 0) is None
    assert q.admit("gone", 0) is None
    q.release("gone")
    assert q.admit("x", SWEEP_INTERVAL + 1) is None  # sweeps: "gone" is forgotten, "held" is not
    assert q.users() == 2
    assert q.admit("held", SWEEP_INTERVAL + 1) == "user_connections"  # its one socket still counts


def test_users_are_swept_again_every_interval() -> None:
    q = quotas(user_max_connections=5)
    for round_ in range(1, 4):
        now = round_ * (SWEEP_INTERVAL + 1)
        assert q.admit(f"u{round_}", now) is None
        q.release(f"u{round_}")
        assert q.users() == 1  # the previous round's user went in this round's sweep


def test_no_sweep_before_the_interval_has_passed() -> None:
    q = quotas()
    q.admit("a", 0)
    q.release("a")
    q.admit("b", SWEEP_INTERVAL)  # exactly the interval: not yet
    assert q.users() == 2
    q.admit("b", SWEEP_INTERVAL + 0.001)
    assert q.users() == 1  # "b" holds a socket; "a" had none


def test_release_gives_back_exactly_one_socket() -> None:
    q = quotas(user_max_connections=3)
    assert [q.admit("u", 0) for _ in range(4)] == [None, None, None, "user_connections"]
    q.release("u")
    assert q.admit("u", 0) is None  # one freed, one taken
    assert q.admit("u", 0) == "user_connections"
    q.release("nobody")  # a user never admitted: nothing to give back, no error
    q.release(None)


def test_a_refused_connect_is_not_counted_against_the_user() -> None:
    q = quotas(connect_rate=0.5, user_max_connections=1)  # a pod burst of 1
    assert q.admit(None, 0) is None
    assert q.admit("u", 0) == "connect_rate"
    assert q.admit("u", 10) is None  # the refused attempt held no socket


def test_reserve_waits_for_the_slower_of_the_pod_and_the_user_budget() -> None:
    q = quotas(frame_rate=10, user_publish_rate=1)  # pod: burst 20; user: burst 2
    q.admit("u", 0)
    assert [q.reserve("u", True, 0) for _ in range(2)] == [0.0, 0.0]
    assert q.reserve("u", True, 0) == pytest.approx(1.0)  # the user's third publish: 1 s
    assert q.reserve("u", False, 0) == 0.0  # not a publish: only the pod's budget
    assert q.reserve(None, True, 0) == 0.0  # anonymous: only the pod's budget
    assert q.reserve("stranger", True, 0) == 0.0  # no socket admitted: no user budget


def test_a_publish_refused_by_the_user_budget_spends_nothing_of_the_pods() -> None:
    q = quotas(frame_rate=1, user_publish_rate=0.5)  # pod: a burst of 2; user: a burst of 1
    q.admit("u", 0)
    assert q.allow("u", True, 0) is True
    assert q.allow("u", True, 0) is False  # the user's budget is spent
    assert q.allow("v", False, 0) is True  # the pod's second token is still there
    assert q.allow("v", False, 0) is False


def test_closing_its_socket_does_not_reset_a_users_connect_rate() -> None:
    """Pods run on a monotonic clock far from zero: the user's bucket must outlive its socket until
    a sweep, or opening and closing would dodge the per-user connect rate."""
    q = Quotas(
        connect_rate=0,
        frame_rate=0,
        user_max_connections=0,
        user_connect_rate=0.5,  # a burst of 1
        user_publish_rate=0,
        now=5000.0,
    )
    assert q.admit("u", 5000.0) is None
    q.release("u")
    assert q.admit("u", 5001.0) == "user_connect_rate"

"""Pure rate and lock helpers with no I/O: token buckets, per-pod and per-user quotas, per-key locks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal


class TokenBucket:
    """Allows `rate` events per second on average and `burst` at once. `rate == 0` allows everything."""

    __slots__ = ("_burst", "_rate", "_stamp", "_tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._stamp = now

    def take(self, now: float) -> bool:
        """Spend one token if there is one; False means the caller is over its rate."""
        if self._rate == 0:
            return True
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def reserve(self, now: float) -> float:
        """Spend one token, borrowing it if there is none; returns the seconds to wait until the
        borrowed token would have been there (0: go now). Callers that wait queue up in order."""
        if self._rate == 0:
            return 0.0
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate) - 1.0
        self._stamp = now
        return 0.0 if self._tokens >= 0.0 else -self._tokens / self._rate


class KeyedLock:
    """One asyncio.Lock per key, created on first use and dropped when nobody holds or awaits it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key) or (asyncio.Lock(), 0)
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)


QuotaRefusal = Literal["connect_rate", "user_connections", "user_connect_rate"]
SWEEP_INTERVAL = 60.0  # seconds between sweeps of users with no sockets left


def bucket(rate: float, now: float) -> TokenBucket:
    """A bucket for `rate` per second with bursts of twice that (rate 0: unlimited)."""
    return TokenBucket(rate, max(1, int(2 * rate)), now)


class _User:
    __slots__ = ("connect", "connections", "publish")

    def __init__(self, connect: TokenBucket, publish: TokenBucket) -> None:
        self.connections = 0
        self.connect = connect
        self.publish = publish


class Quotas:
    """Per-pod and per-user (token `sub`) limits: sockets held, new sockets per second, client
    frames per second (per pod: every frame; per user: publishes). Per user means per user on this
    pod: pods share no state."""

    def __init__(
        self,
        *,
        connect_rate: float,
        frame_rate: float,
        user_max_connections: int,
        user_connect_rate: float,
        user_publish_rate: float,
        now: float,
    ) -> None:
        self._connect = bucket(connect_rate, now)
        self._frames = bucket(frame_rate, now)
        self._user_max = user_max_connections
        self._user_connect_rate = user_connect_rate
        self._user_publish_rate = user_publish_rate
        self._users: dict[str, _User] = {}
        self._swept = now

    def admit(self, sub: str | None, now: float) -> QuotaRefusal | None:
        """Count a new socket for `sub`, or say which limit refuses it."""
        if now - self._swept > SWEEP_INTERVAL:
            self._sweep(now)
        user = None
        if sub is not None:
            user = self._users.get(sub)
            if user is None:
                user = self._users[sub] = _User(
                    bucket(self._user_connect_rate, now), bucket(self._user_publish_rate, now)
                )
            if self._user_max and user.connections >= self._user_max:
                return "user_connections"
            if not user.connect.take(now):
                return "user_connect_rate"
        if not self._connect.take(now):
            return "connect_rate"
        if user is not None:
            user.connections += 1
        return None

    def release(self, sub: str | None) -> None:
        """A socket `admit` counted has closed."""
        if sub is not None and (user := self._users.get(sub)) is not None:
            user.connections -= 1

    def allow(self, sub: str | None, publishes: bool, now: float) -> bool:
        """Spend one client frame from the pod's budget and, for a publish, one from the user's;
        False when either is spent (nothing is taken from the pod's then)."""
        if (
            publishes
            and sub is not None
            and (user := self._users.get(sub)) is not None
            and not user.publish.take(now)
        ):
            return False
        return self._frames.take(now)

    def reserve(self, sub: str | None, publishes: bool, now: float) -> float:
        """Like `allow`, but borrowing: the seconds until both budgets would have had the token."""
        wait = self._frames.reserve(now)
        if publishes and sub is not None and (user := self._users.get(sub)) is not None:
            wait = max(wait, user.publish.reserve(now))
        return wait

    def users(self) -> int:
        return len(self._users)

    def _sweep(self, now: float) -> None:
        self._swept = now
        for sub in [s for s, u in self._users.items() if u.connections <= 0]:
            del self._users[sub]

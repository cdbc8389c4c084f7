"""The deny list: users (token `sub`) a backend cut off, refused at the handshake for a while.

A disconnect through the server API with `deny_seconds` records the user's `sub` with the time of
the revocation, with that expiry, in the broker (a Redis key every pod reads; for memory:// the
in-process bus) before any pod is told to disconnect, and every pod also keeps it in memory when the
command reaches it. The endpoint registers a new socket, then asks here: a socket that asked before
the record existed was registered before the disconnect was published, so the disconnect finds it;
one that asked after is refused with 4510. So a reconnect with the same still-valid token cannot
win the race (docs/security.md, "Revocation").

A token whose `iat` is later than the revocation is let in: the backend issued it knowing. With the
broker unreachable, the check falls back to this pod's memory and counts that
(`relay_revocation_checks_total{result="unavailable"}`): refusing every handshake while Redis is
down would turn a Redis outage into an outage of every socket.
"""

from __future__ import annotations

import time

from service import metrics
from service.auth import Identity
from service.broker import Broker, BrokerUnavailable

MAX_DENY_SECONDS = 86400.0  # a longer ban belongs in the token issuer, not in relay


class Revocations:
    """This pod's view of the deny list: the broker's record, and a local copy as a fallback."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self._local: dict[str, tuple[float, float]] = {}  # sub -> (revoked at: wall, until: monotonic)

    async def revoke(self, sub: str, revoked_at: float, seconds: float) -> None:
        """Record the revocation where every pod reads it; raises BrokerUnavailable if it could not."""
        self.remember(sub, revoked_at, seconds)
        await self._broker.deny(sub, revoked_at, seconds)

    def remember(self, sub: str, revoked_at: float, seconds: float) -> None:
        """Keep the revocation in this pod's memory (the control command carries it to every pod)."""
        self._local[sub] = (revoked_at, time.monotonic() + seconds)
        if len(self._local) > 100_000:  # bounded: forget what has expired
            now = time.monotonic()
            self._local = {k: v for k, v in self._local.items() if v[1] > now}

    def _local_revoked_at(self, sub: str) -> float | None:
        entry = self._local.get(sub)
        if entry is None:
            return None
        if time.monotonic() >= entry[1]:
            del self._local[sub]
            return None
        return entry[0]

    async def refused(self, identity: Identity) -> bool:
        """True when `identity`'s user was revoked and its token was issued before that."""
        if identity.sub is None:
            return False
        revoked_at = self._local_revoked_at(identity.sub)
        if revoked_at is None:
            try:
                revoked_at = await self._broker.denied(identity.sub)
            except BrokerUnavailable:
                metrics.REVOCATION_CHECKS.labels("unavailable").inc()
                return False
        if revoked_at is None:
            metrics.REVOCATION_CHECKS.labels("allowed").inc()
            return False
        if identity.issued_at is not None and identity.issued_at > revoked_at:
            metrics.REVOCATION_CHECKS.labels("reissued").inc()
            return False
        metrics.REVOCATION_CHECKS.labels("refused").inc()
        return True

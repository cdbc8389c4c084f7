"""The memory broker's edges in time (service/broker/memory.py), on a clock the test moves; what it
shares with the Redis brokers is tests/test_broker_contract.py."""

from __future__ import annotations

import pytest

from service.broker import memory
from service.broker.memory import MemoryBus


class Clock:
    """The monotonic clock memory.py reads, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def test_a_deny_entry_lasts_its_seconds_and_is_gone_at_that_instant(monkeypatch: pytest.MonkeyPatch) -> None:
    """Denied until `seconds` have passed (docs/security.md, "Revocation"), as service/revocations.py
    keeps its local copy: at the instant itself the entry is gone, and forgotten."""
    clock = Clock()
    monkeypatch.setattr(memory, "time", clock)
    bus = MemoryBus()
    bus.deny("user-1", 1764000000.5, 30.0)
    clock.now = 1029.999
    assert bus.revoked_at("user-1") == 1764000000.5
    clock.now = 1030.0
    assert bus.revoked_at("user-1") is None
    assert "user-1" not in bus.denied

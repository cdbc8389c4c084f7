"""Group history in Redis (service/broker/history.py): the keys are a documented contract
(docs/history.md, "What Redis holds") that other writers such as relay_channels rely on."""

from __future__ import annotations

import pytest

from service.broker import Envelope, Retention
from service.broker.history import keys
from tests.brokers import redis_broker
from tests.redis_servers import RedisServer


def test_a_groups_keys_share_its_hash_tag() -> None:
    assert keys(b"relay:", "g:{room-1}") == (b"relay:h:{room-1}", b"relay:m:{room-1}", b"relay:i:{room-1}")


@pytest.mark.integration
async def test_an_append_writes_the_documented_keys(redis_server: RedisServer, redis_prefix: str) -> None:
    broker = redis_broker(redis_server.url, redis_prefix)
    try:
        appended = await broker.append(Envelope("g:{doc}", "hello", 1.0), Retention(10, 60), "key-1")
    finally:
        await broker.close()
    stream, meta, seen = (f"{redis_prefix}:{kind}:{{doc}}" for kind in "hmi")
    assert [redis_server.call("TYPE", k) for k in (stream, meta, seen)] == ["stream", "hash", "zset"]
    assert redis_server.call("HGETALL", meta) == {"e": appended.position.epoch, "o": "1"}
    assert redis_server.call("ZRANGE", seen, 0, -1, "WITHSCORES") == [["key-1", 1.0]]
    ((entry_id, fields),) = redis_server.call("XRANGE", stream, "-", "+")
    assert (entry_id, fields) == ("1-1", {"f": "hello"})
    assert all(59_000 < redis_server.call("PTTL", k) <= 60_000 for k in (stream, meta, seen))


@pytest.mark.integration
async def test_a_read_with_start_writes_the_epoch_for_starts_ttl(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """A group read with `start` and no history yet: the hash alone, offset 0, expiring as `start` says."""
    broker = redis_broker(redis_server.url, redis_prefix)
    try:
        started = await broker.history("g:{quiet}", None, 10, start=Retention(10, 60))
    finally:
        await broker.close()
    stream, meta, seen = (f"{redis_prefix}:{kind}:{{quiet}}" for kind in "hmi")
    assert redis_server.call("HGETALL", meta) == {"e": started.epoch, "o": "0"}
    assert 59_000 < redis_server.call("PTTL", meta) <= 60_000
    assert redis_server.call("EXISTS", stream, seen) == 0

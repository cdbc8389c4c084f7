"""The Redis link never dies for good, says so when it cannot carry something, and recovers even a
large subscription set: against real redis-server processes (and, for corrupted replies, a proxy
in front of one)."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from service.broker import (
    RESYNC,
    Arrival,
    BrokerUnavailable,
    Envelope,
    PresenceBatch,
    PresenceTerms,
    Retention,
)
from service.broker import redis as redis_broker_module
from service.broker.redis import RedisBroker
from service.broker.resp import Address, ConnectOptions
from service.broker.topology import SingleTopology
from service.client import RelayClient, RelayError
from tests.brokers import Collector, delivered_again, eventually, redis_broker
from tests.helpers import closed_with, join, metric, running_pod, ws_url
from tests.redis_proxy import RedisProxy
from tests.redis_servers import RedisServer, start_redis

pytestmark = pytest.mark.integration

FAST: dict[str, Any] = {"redis_probe_interval": 0.2, "redis_timeout": 0.5, "redis_backoff_max": 0.3}


def surprise_discovery(broker: RedisBroker, times: int) -> list[int]:
    """Make the broker's next `times` slot-map discoveries raise what nobody foresaw (what an
    `assert` under `python -O` or an unexpected reply raises); the list holds the calls made."""
    topology = broker._topology
    real = topology.discover
    calls = [0]

    async def surprising(options: Any) -> Any:
        calls[0] += 1
        if calls[0] <= times:
            raise AttributeError("'NoneType' object has no attribute 'decode'")
        return await real(options)

    topology.discover = surprising  # type: ignore[method-assign]
    return calls


async def test_an_unexpected_error_while_connecting_is_logged_counted_and_retried(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """Anything the supervisor did not foresee (here: what an `assert` under `python -O` or a reply
    nobody expected raises) is one failed attempt, not the end of the link."""
    broker = redis_broker(redis_server.url, redis_prefix)
    assert isinstance(broker, RedisBroker)
    calls = surprise_discovery(broker, times=1)
    errors = metric("relay_redis_link_failures_total", reason="error")
    a = Collector(broker)
    try:
        with capture_logs() as logs:
            await eventually(lambda: broker.ready, 5)
        assert calls[0] >= 2 and broker.alive
        assert metric("relay_redis_link_failures_total", reason="error") == errors + 1
        [line] = [e for e in logs if e["event"] == "broker.supervisor_error"]
        assert line["log_level"] == "error" and "exc_info" in line
        assert line["retry_in"] == redis_broker_module.BACKOFF_MIN
        await a.broker.subscribe("g:x")
        assert await a.broker.publish(Envelope("g:x", "hello", time.time())) == 1
        assert (await a.wait_for(1))[0].frame == "hello"
    finally:
        await a.stop()


async def test_a_bug_in_the_links_watch_ends_the_link_which_is_opened_again(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """The watch probes the link and ends it when Redis stops answering. If it raised (a bug, a
    reply nobody foresaw), the link must not live on unwatched: it is ended, logged and counted as
    `error`, and the supervisor opens another that carries messages."""
    broker = redis_broker(redis_server.url, redis_prefix)
    assert isinstance(broker, RedisBroker)
    a = Collector(broker)
    try:
        await a.broker.subscribe("g:x")
        first = broker._link
        assert first is not None
        node = next(iter(first.nodes.values()))
        errors = metric("relay_redis_link_failures_total", reason="error")
        with capture_logs() as logs:
            node.probe = ("not a probe",)  # type: ignore[assignment]  # what a bug could leave there
            await eventually(lambda: broker._link not in (None, first))
        assert metric("relay_redis_link_failures_total", reason="error") == errors + 1
        [line] = [e for e in logs if e["event"] == "broker.watch_error"]
        assert line["log_level"] == "error" and "exc_info" in line
        assert await a.broker.publish(Envelope("g:x", "after", time.time())) == 1
        await eventually(lambda: any(e.frame == "after" for e in a.envelopes))
    finally:
        await a.stop()


async def test_unexpected_errors_while_reconnecting_count_as_failed_attempts(
    dedicated_redis: RedisServer, redis_prefix: str
) -> None:
    """After an outage, two attempts end in errors nobody foresaw: the line that says what the
    outage cost counts them as two failed attempts."""
    broker = redis_broker(dedicated_redis.url, redis_prefix)
    assert isinstance(broker, RedisBroker)
    a = Collector(broker)
    try:
        await broker.subscribe("g:room")
        first = broker._link
        surprise_discovery(broker, times=2)
        with capture_logs() as logs:
            dedicated_redis.call("CLIENT", "KILL", "TYPE", "pubsub")
            await eventually(lambda: broker._link not in (None, first))
        [back] = [e for e in logs if e["event"] == "broker.reconnected"]
        assert back["failed_attempts"] == 2
        assert len([e for e in logs if e["event"] == "broker.supervisor_error"]) == 2
    finally:
        await a.stop()


async def test_an_unexpected_error_once_the_link_is_up_ends_it_counted_as_an_error_and_it_is_reopened(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """The supervisor fails after the link went up (here: a surprise right after `_went_up`): that
    link is ended and counted (reason error), and the next one comes up."""
    broker = redis_broker(redis_server.url, redis_prefix)
    assert isinstance(broker, RedisBroker)
    real = broker._went_up
    links: list[Any] = []

    def went_up(link: Any, failures: int) -> None:
        real(link, failures)
        links.append(link)
        if len(links) == 1:
            raise AttributeError("'NoneType' object has no attribute 'decode'")

    broker._went_up = went_up  # type: ignore[method-assign]
    errors = metric("relay_redis_link_failures_total", reason="error")
    a = Collector(broker)
    try:
        await eventually(lambda: len(links) == 2 and broker.ready)
        assert links[0].failed and broker._link is links[1] and broker.alive
        assert metric("relay_redis_link_failures_total", reason="error") == errors + 1
    finally:
        await a.stop()


async def test_liveness_fails_when_the_task_carrying_messages_stops(redis_server: RedisServer) -> None:
    """/healthz answers for the event loop and for the tasks that carry messages: a pod whose Redis
    supervisor or delivery loop is gone must be restarted, not left looking healthy."""
    for victim in ("supervisor", "hub"):
        async with (
            running_pod(broker_url=redis_server.url, **FAST) as pod,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{pod.internal_port}") as http,
        ):
            assert (await http.get("/healthz")).status_code == 200
            broker = pod.pod.broker
            assert isinstance(broker, RedisBroker)
            task = broker._supervisor if victim == "supervisor" else pod.pod._run
            assert task is not None
            with capture_logs() as logs:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            health = await http.get("/healthz")
            assert health.status_code == 503, victim
            check = "broker" if victim == "supervisor" else "delivery"
            assert health.json()["checks"][check] is False, victim
            assert any(e["log_level"] == "error" for e in logs), victim
            if victim == "supervisor":
                [line] = [e for e in logs if e["event"] == "broker.supervisor_stopped"]
                assert (line["log_level"], line["error"]) == ("error", "cancelled")


async def test_a_protocol_error_reports_the_link_lost_and_it_is_rebuilt(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """Bytes that are not RESP on the link: the connection is dropped and the link rebuilt at once,
    not left half dead until a probe notices (probes are 30 s apart here)."""
    async with RedisProxy(redis_server.port) as proxy:
        slow_probes = {"redis_probe_interval": 30.0, "redis_timeout": 0.5, "redis_backoff_max": 0.3}
        a = Collector(redis_broker(proxy.url, redis_prefix, "a", **slow_probes))
        b = Collector(redis_broker(proxy.url, redis_prefix, "b", **slow_probes))
        try:
            await a.broker.subscribe("g:room")
            await b.broker.subscribe("g:room")
            broken = metric("relay_redis_link_failures_total", reason="protocol_error")
            assert proxy.corrupt(b"\x00 this is not RESP\r\n") == 4
            await eventually(
                lambda: metric("relay_redis_link_failures_total", reason="protocol_error") > broken, 2
            )
            took = await delivered_again(a, b, "g:room", 3)
            assert took < 3
        finally:
            await a.stop()
            await b.stop()


async def test_during_an_outage_a_join_is_refused_never_acked(dedicated_redis: RedisServer) -> None:
    """An ack means the join took effect; with Redis down it cannot: a v1 join gets
    broker_unavailable, a seed socket is closed with 1013 (come back later). Both work once Redis
    is back."""
    async with running_pod(broker_url=dedicated_redis.url, **FAST) as pod:
        client = await RelayClient.connect(ws_url(pod, "/lobby"))
        dedicated_redis.kill()
        await eventually(lambda: not pod.pod.broker.ready, 5)
        with pytest.raises(RelayError) as refused:
            await client.join("news")
        assert refused.value.code == "broker_unavailable"
        rejected = metric("relay_connections_rejected_total", reason="broker")
        assert await closed_with(ws_url(pod, "/news")) == 1013
        assert metric("relay_connections_rejected_total", reason="broker") == rejected + 1
        assert pod.pod.hub.group_count() == 1  # only the lobby: the failed join left nothing behind
        dedicated_redis.start()
        await eventually(lambda: pod.pod.broker.ready, 5)
        await client.join("news")  # acked: it took effect
        seed = await join(ws_url(pod, "/news"))
        sent = await seed.publish("news", after="outage")
        assert (await client.receive(5)).message == sent
        await client.close()


@pytest.mark.xdist_group("redis-large")
async def test_200000_channels_are_all_subscribed_again_after_a_reconnect(
    dedicated_redis: RedisServer, redis_prefix: str
) -> None:
    """Re-subscribing is batched, each batch confirmed within redis_timeout: the whole set may take
    longer than one timeout and still come back (with one timeout for the whole set, as before,
    it never did: 200,000 took 1.55 s here against 0.5 s)."""
    count = 200_000
    channels = [f"g:c{n}" for n in range(count)]
    timings = {**FAST, "redis_timeout": 1.0}  # a batch of 1,000 has a second, even on a loaded machine
    a = Collector(redis_broker(dedicated_redis.url, redis_prefix, "a", **timings))
    b = Collector(redis_broker(dedicated_redis.url, redis_prefix, "b", **timings))
    try:
        # the setup is not what is tested: let the first link open however long a loaded machine takes
        await eventually(lambda: a.broker.ready and b.broker.ready, 30)
        for start in range(0, count, 20_000):
            await a.broker.subscribe(*channels[start : start + 20_000])
        timeouts = metric("relay_redis_link_failures_total", reason="subscribe_timeout")
        broker = a.broker
        assert isinstance(broker, RedisBroker)
        old = broker._link
        dedicated_redis.call("CLIENT", "KILL", "TYPE", "pubsub")
        started = time.monotonic()
        await eventually(lambda: broker._link not in (None, old), 30)  # a new link, proven and up
        took = time.monotonic() - started
        assert metric("relay_redis_link_failures_total", reason="subscribe_timeout") == timeouts
        sample = [f"{redis_prefix}:{c}" for c in channels[-1000:]]
        counts = dedicated_redis.call("PUBSUB", "NUMSUB", *sample)[1::2]
        assert set(counts) == {1}
        assert int(dedicated_redis.call("PUBSUB", "NUMPAT")) == 0
        for channel in [*random.sample(channels, 20), channels[-1]]:
            await delivered_again(b, a, channel, 5)
        print(f"{count} channels subscribed again in {took:.2f} s")
    finally:
        await a.stop()
        await b.stop()


async def test_a_master_demoted_under_the_link_refuses_writes_which_end_the_link_not_the_pod(
    tmp_path: Path, redis_prefix: str
) -> None:
    """READONLY means "not carried out here": the link is rebuilt. A master turned into a replica
    (REPLICAOF) refuses the write; the pod does not keep a link to it, says why, and is back once
    the server is a master again."""
    server, other = start_redis(tmp_path / "a"), start_redis(tmp_path / "b")
    broker = redis_broker(server.url, redis_prefix, "a", **FAST)
    assert isinstance(broker, RedisBroker)
    try:
        await broker.command(b"k", b"SET", f"{redis_prefix}:k", b"v")  # a master: carried out
        not_master = metric("relay_redis_link_failures_total", reason="not_master")
        server.call("REPLICAOF", "127.0.0.1", other.port)
        with capture_logs() as logs, pytest.raises(BrokerUnavailable):
            await broker.command(b"k", b"SET", f"{redis_prefix}:k", b"w")
        assert metric("relay_redis_link_failures_total", reason="not_master") == not_master + 1
        assert not broker.ready
        assert any("READONLY" in str(e.get("error")) for e in logs if e["event"] == "broker.connect_failed")
        server.call("REPLICAOF", "NO", "ONE")
        await eventually(lambda: broker.ready, 5)
        await broker.command(b"k", b"SET", f"{redis_prefix}:k", b"x")
    finally:
        await broker.close()
        server.kill()
        other.kill()


async def test_commands_cut_off_with_the_link_are_sent_again_only_when_idempotent(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """Redis carried out seven commands but the link died before their replies came. Two publishes
    are given up (sending them again could deliver them twice) and counted as lost in flight; an
    append (its idempotency key), a deny record, a read of one, a presence update (an arrival
    already there is kept once) and a presence read are sent once more on the next link, and stored
    once."""
    async with RedisProxy(redis_server.port) as proxy:
        broker = redis_broker(proxy.url, redis_prefix, "a", redis_timeout=2.0)
        retention = Retention(5, 60)
        try:
            await broker.subscribe("g:{cut}")
            first = await broker.append(Envelope("g:{cut}", "m1", time.time()), retention, "key-1")
            await broker.deny("earlier", 1764000000.25, 60)
            in_flight = metric("relay_broker_lost_total", reason="in_flight")
            resent = metric("relay_broker_resent_total")
            with capture_logs() as logs:
                publishes = [
                    asyncio.create_task(broker.publish(Envelope("g:{cut}", f"cut off {n}", time.time())))
                    for n in range(2)
                ]
                append = asyncio.create_task(
                    broker.append(Envelope("g:{cut}", "m2", time.time()), retention, "key-2")
                )
                deny = asyncio.create_task(broker.deny("someone", 1764000000.5, 60))
                read = asyncio.create_task(broker.denied("earlier"))
                terms = PresenceTerms(ttl=60, grace=5, events=False)
                joined = asyncio.create_task(
                    broker.presence_update("g:{cut}", terms, PresenceBatch([Arrival("c.1", "ann", "{}")]))
                )
                present = asyncio.create_task(broker.presence_read("g:{cut}", terms, 10))
                assert await proxy.cut(after=0.2) > 0  # the replies are dropped, then the sockets closed
                for publish in publishes:
                    with pytest.raises(BrokerUnavailable, match="lost before Redis answered"):
                        await publish
                appended = await append
                await deny
                assert await read == 1764000000.25
                assert await joined == []
                assert ((await present).connections, (await present).users) == (1, 1)
                await eventually(lambda: broker.ready)
            assert metric("relay_broker_lost_total", reason="in_flight") == in_flight + 2
            assert metric("relay_broker_resent_total") == resent + 5
            assert appended.duplicate and appended.position.offset == 2  # carried out by the first try
            assert appended.position.epoch == first.position.epoch
            history = await broker.history("g:{cut}", 0, 10)
            assert history.entries == [(1, "m1"), (2, "m2")]
            assert await broker.denied("someone") == 1764000000.5
            assert (await broker.presence_read("g:{cut}", terms, 10)).connections == 1
            [back] = [e for e in logs if e["event"] == "broker.reconnected"]
            assert back["publishes_in_flight_lost"] == 2 and back["publishes_refused"] == 0
        finally:
            await broker.close()


async def test_a_primary_that_lost_relays_functions_gets_them_again_and_the_append_is_sent_again(
    dedicated_redis: RedisServer, redis_prefix: str
) -> None:
    """FUNCTION FLUSH (or a node that joined empty): the append is answered "Function not found",
    which means it was not carried out. The link is rebuilt, loading the library, and the append
    sent once more."""
    broker = redis_broker(dedicated_redis.url, redis_prefix, "a")
    retention = Retention(5, 60)
    try:
        await broker.append(Envelope("g:{f}", "m1", time.time()), retention, "key-1")
        dedicated_redis.call("FUNCTION", "FLUSH")
        missing = metric("relay_redis_link_failures_total", reason="function_missing")
        resent = metric("relay_broker_resent_total")
        appended = await broker.append(Envelope("g:{f}", "m2", time.time()), retention, "key-2")
        assert (appended.position.offset, appended.duplicate, appended.pods) == (2, False, 0)
        assert metric("relay_redis_link_failures_total", reason="function_missing") == missing + 1
        assert metric("relay_broker_resent_total") == resent + 1
        assert dedicated_redis.call("FUNCTION", "LIST")  # loaded again
    finally:
        await broker.close()


async def test_publishes_left_unanswered_end_the_link_even_while_probes_come_back(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """Redis stops answering the command connection only: the pub/sub side is lively (probes
    return), so only the age of the oldest unanswered publish can tell. After redis_timeout the link
    ends (publish_timeout), the publish is lost in flight, and the next link carries again."""
    async with RedisProxy(redis_server.port) as proxy:
        broker = redis_broker(proxy.url, redis_prefix, "a", **FAST)
        assert isinstance(broker, RedisBroker)
        a = Collector(broker)
        try:
            await broker.subscribe("g:room")
            timeouts = metric("relay_redis_link_failures_total", reason="publish_timeout")
            first = broker._link
            proxy.mute(0)  # the first connection a link opens carries the commands
            started = time.monotonic()
            with pytest.raises(BrokerUnavailable, match="lost before Redis answered"):
                await broker.publish(Envelope("g:room", "unanswered", time.time()))
            assert 0.5 <= time.monotonic() - started < 3  # redis_timeout, plus a watch tick or two
            await eventually(lambda: broker._link not in (None, first))
            assert metric("relay_redis_link_failures_total", reason="publish_timeout") == timeouts + 1
            assert await broker.publish(Envelope("g:room", "answered", time.time())) == 1
            got = await a.wait_for(3)  # what Redis did carry, then the news of the new link, then more
            assert [got[0].frame, got[1], got[2].frame] == ["unanswered", RESYNC, "answered"]
        finally:
            await a.stop()


async def test_subscription_changes_redis_does_not_confirm_end_the_link(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """Redis takes a SUBSCRIBE or UNSUBSCRIBE but never confirms it (its replies on the pub/sub
    connection stop): within redis_timeout the caller is told (subscribe) or the call returns
    (unsubscribe), and either way the link is rebuilt (subscribe_timeout), subscribed to exactly
    what is wanted. Probes are 30 s apart here, so only the confirmation can tell."""
    async with RedisProxy(redis_server.port) as proxy:
        slow_probes = {"redis_probe_interval": 30.0, "redis_timeout": 0.5, "redis_backoff_max": 0.3}
        broker = redis_broker(proxy.url, redis_prefix, "a", **slow_probes)
        assert isinstance(broker, RedisBroker)

        def timeouts() -> float:
            return metric("relay_redis_link_failures_total", reason="subscribe_timeout")

        before = timeouts()
        try:
            await broker.subscribe("g:kept", "g:dropped")
            first = broker._link
            proxy.mute(-1)  # the newest connection: this link's pub/sub one
            with pytest.raises(BrokerUnavailable):
                await broker.subscribe("g:unconfirmed")
            await eventually(lambda: broker._link not in (None, first))
            assert timeouts() == before + 1
            second = broker._link
            proxy.mute(-1)
            await broker.unsubscribe("g:dropped")
            await eventually(lambda: broker._link not in (None, second))
            assert timeouts() == before + 2
            channels = set(redis_server.call("PUBSUB", "CHANNELS", f"{redis_prefix}:g:*"))
            assert channels == {f"{redis_prefix}:g:kept", f"{redis_prefix}:g:unconfirmed"}
        finally:
            await broker.close()


async def test_an_idle_link_is_probed_once_per_probe_interval_and_a_slow_answer_in_time_keeps_it(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """Probe interval 1 s, redis_timeout 2 s (a watch tick of 0.25 s), and every reply held 0.5 s
    (a slow network): the idle link is probed only after a probe interval of silence, and a probe
    answered after more than a tick, but within redis_timeout, does not end the link."""
    async with RedisProxy(redis_server.port) as proxy:
        timings = {"redis_probe_interval": 1.0, "redis_timeout": 2.0, "redis_backoff_max": 0.3}
        broker = redis_broker(proxy.url, redis_prefix, "a", **timings)
        assert isinstance(broker, RedisBroker)
        sent: list[float] = []
        real = broker._send_probe

        def send_probe(node: Any) -> str:
            sent.append(time.monotonic())
            return real(node)

        broker._send_probe = send_probe  # type: ignore[method-assign]
        a = Collector(broker)
        try:
            await broker.subscribe("g:room")
            first = broker._link
            timeouts = metric("relay_redis_link_failures_total", reason="probe_timeout")
            proxy.delay(0.5)
            begun = len(sent)
            await eventually(lambda: len(sent) >= begun + 3, 15)
            gaps = [later - earlier for earlier, later in itertools.pairwise(sent[begun:])]
            assert all(gap >= 1.0 for gap in gaps), gaps
            assert first is not None and broker._link is first and not first.failed
            assert metric("relay_redis_link_failures_total", reason="probe_timeout") == timeouts
        finally:
            proxy.delay(0)
            await a.stop()


async def test_subscribe_window_batches_go_out_before_one_is_awaited_and_one_unconfirmed_refuses_the_call(
    dedicated_redis: RedisServer, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two channels per SUBSCRIBE and three SUBSCRIBEs in flight (monkeypatched), ten channels: the
    first three batches leave before any confirmation is awaited, then relay waits for the oldest.
    Redis takes them but its confirmations stop (the pub/sub connection's replies are dropped), so
    the call is refused, not reported done, and the link is rebuilt subscribed to all ten."""
    monkeypatch.setattr(redis_broker_module, "SUBSCRIBE_BATCH", 2)
    monkeypatch.setattr(redis_broker_module, "SUBSCRIBE_WINDOW", 3)
    channels = [f"g:window{n}" for n in range(10)]

    def subscribes() -> int:  # only this test's broker uses this server
        return int(dedicated_redis.info("commandstats").get("cmdstat_subscribe", {}).get("calls", 0))

    async with RedisProxy(dedicated_redis.port) as proxy:
        slow_probes = {"redis_probe_interval": 30.0, "redis_timeout": 2.0, "redis_backoff_max": 0.3}
        broker = redis_broker(proxy.url, redis_prefix, "a", **slow_probes)
        assert isinstance(broker, RedisBroker)
        a = Collector(broker)  # reading messages() opens the link
        try:
            await eventually(lambda: broker.ready)
            first = broker._link
            before = subscribes()
            proxy.mute(-1)  # the newest connection: this link's pub/sub one
            with pytest.raises(BrokerUnavailable):
                await broker.subscribe(*channels)
            # (The test's Redis calls block the event loop: the next link has sent nothing yet.)
            assert subscribes() == before + 3
            await eventually(lambda: broker._link not in (None, first))
            names = [f"{redis_prefix}:{c}" for c in channels]
            await eventually(lambda: dedicated_redis.call("PUBSUB", "NUMSUB", *names)[1::2] == [1] * 10)
        finally:
            await a.stop()


async def test_a_subscription_whose_link_ends_before_redis_confirms_is_refused_at_once(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """The link dies while a SUBSCRIBE awaits its confirmation: the caller is refused as soon as
    the link ends (link.py `_Node.release`), not told it is subscribed, and not kept waiting for
    redis_timeout (5 s here)."""
    async with RedisProxy(redis_server.port) as proxy:
        patient = {"redis_probe_interval": 30.0, "redis_timeout": 5.0, "redis_backoff_max": 0.3}
        broker = redis_broker(proxy.url, redis_prefix, "a", **patient)
        try:
            await broker.subscribe("g:first")
            proxy.mute(-1)  # the confirmation never comes...
            started = time.monotonic()
            subscribing = asyncio.create_task(broker.subscribe("g:cut"))
            await proxy.cut(after=0.1)  # ...and the link ends while it is awaited
            with pytest.raises(BrokerUnavailable):
                await subscribing
            assert time.monotonic() - started < 2.5
        finally:
            await broker.close()


async def test_a_command_refused_as_not_carried_out_is_sent_once_more_not_again_and_again(
    tmp_path: Path, redis_prefix: str
) -> None:
    """READONLY on the next link too (a link that, announcing nothing, can open on a replica): the
    command was sent twice, once per link, and then refused with Redis's reason, not sent around
    until the redirect limit."""
    server, other = start_redis(tmp_path / "a"), start_redis(tmp_path / "b")
    address = Address("127.0.0.1", server.port)
    broker = RedisBroker(
        SingleTopology(address), ConnectOptions(timeout=0.5), pod_id="a", prefix=redis_prefix
    )
    try:
        await broker.command(b"k", b"SET", f"{redis_prefix}:k", b"v")
        server.call("REPLICAOF", "127.0.0.1", other.port)
        resent = metric("relay_broker_resent_total")
        with pytest.raises(BrokerUnavailable, match="Redis refused the command: READONLY"):
            await broker.command(b"k", b"SET", f"{redis_prefix}:k", b"w")
        assert metric("relay_broker_resent_total") == resent + 1
    finally:
        await broker.close()
        server.kill()
        other.kill()


async def test_an_error_on_the_pubsub_connection_is_logged_cut_short_and_ends_the_link(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """An error reply on the pub/sub connection that is no redirection: the link ends
    (subscribe_refused) and one error line gives its first 200 characters."""
    async with RedisProxy(redis_server.port) as proxy:
        quiet = {"redis_probe_interval": 30.0, "redis_timeout": 0.5, "redis_backoff_max": 0.3}
        broker = redis_broker(proxy.url, redis_prefix, "a", **quiet)
        assert isinstance(broker, RedisBroker)
        try:
            await broker.subscribe("g:room")
            first = broker._link
            text = "ERR " + "why " * 100
            with capture_logs() as logs:
                assert proxy.corrupt(b"-" + text.encode() + b"\r\n") == 2
                await eventually(lambda: broker._link not in (None, first))
            [line] = [e for e in logs if e["event"] == "broker.subscribe_refused"]
            assert (line["log_level"], line["error"]) == ("error", text[:200])
            assert first is not None and first.broken.result() == "subscribe_refused"
        finally:
            await broker.close()


async def test_a_command_sent_again_is_not_sent_a_third_time(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """An idempotent command (here a BLPOP, so that it is in flight when its connection is killed)
    is sent once more on the next link; cut off there too, it is refused, not sent around again."""
    broker = redis_broker(redis_server.url, redis_prefix, "a")
    key = f"{redis_prefix}:blocked"
    killed: set[str] = set()

    def blocked() -> list[str]:
        clients = redis_server.call("CLIENT", "LIST").splitlines()
        return [c.split()[0][3:] for c in clients if "cmd=blpop" in c and c.split()[0][3:] not in killed]

    try:
        await broker.subscribe("g:room")
        lost = metric("relay_broker_lost_total", reason="in_flight")
        resent = metric("relay_broker_resent_total")
        assert isinstance(broker, RedisBroker)
        waiting = asyncio.create_task(broker.command(key.encode(), b"BLPOP", key, b"10", idempotent=True))
        for _ in range(2):
            await eventually(lambda: len(blocked()) == 1)
            [client] = blocked()
            killed.add(client)
            redis_server.call("CLIENT", "KILL", "ID", client)
        with pytest.raises(BrokerUnavailable, match=r"^the Redis link was lost before Redis answered$"):
            await asyncio.wait_for(waiting, 5)
        assert metric("relay_broker_resent_total") == resent + 1
        assert metric("relay_broker_lost_total", reason="in_flight") == lost + 1
    finally:
        await broker.close()


class ScriptedProxy(RedisProxy):
    """A RedisProxy that breaks what one test needs, and nothing else. While `hiding` names a
    channel, every chunk of Redis's replies that mentions it is dropped: Redis carries out the
    SUBSCRIBE, but its confirmation never reaches relay (the probe channel's passes). While
    `loading` is a byte string and `refusals` is above zero, a chunk of relay's commands holding it
    is not forwarded to Redis: the proxy answers it `-LOADING`, as a Redis loading its data set does,
    and counts one refusal down."""

    LOADING = b"-LOADING Redis is loading the dataset in memory\r\n"

    def __init__(self, target: int) -> None:
        super().__init__(target)
        self.hiding: bytes | None = None
        self.hidden = 0  # chunks of replies dropped
        self.loading: bytes | None = None
        self.refusals = 0

    async def _accept(self, from_relay: asyncio.StreamReader, to_relay: asyncio.StreamWriter) -> None:
        from_redis, to_redis = await asyncio.open_connection("127.0.0.1", self._target)
        self._towards_relay.append(to_relay)
        self._connections.append((to_relay, to_redis))
        for pump in (self._commands(from_relay, to_redis, to_relay), self._replies(from_redis, to_relay)):
            task = asyncio.get_running_loop().create_task(pump)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _commands(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, back: asyncio.StreamWriter
    ) -> None:
        try:
            while data := await source.read(65536):
                if self.loading is not None and self.refusals > 0 and self.loading in data:
                    self.refusals -= 1
                    back.write(self.LOADING)
                    continue
                sink.write(data)
                await sink.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            sink.close()

    async def _replies(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                if sink in self._muted:
                    continue
                if self.hiding is not None and self.hiding in data:
                    self.hidden += 1
                    continue
                sink.write(data)
                await sink.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            sink.close()


async def test_a_reconnect_whose_resubscription_redis_never_confirms_fails_after_redis_timeout(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """After a cut the new link subscribes every wanted channel again; Redis takes the SUBSCRIBE but
    its confirmation never comes. The attempt is given up after redis_timeout (1 s here), not left
    hanging and not let up unconfirmed: one broker.connect_failed line with the reason, counted
    under reason="connect_failed", and retried until Redis confirms, when the link comes up and
    carries the channel again."""
    proxy = ScriptedProxy(redis_server.port)
    async with proxy:
        timings = {"redis_probe_interval": 30.0, "redis_timeout": 1.0, "redis_backoff_max": 0.3}
        a = Collector(redis_broker(proxy.url, redis_prefix, "a", **timings))
        b = Collector(redis_broker(redis_server.url, redis_prefix, "b", **timings))  # no proxy
        broker = a.broker
        assert isinstance(broker, RedisBroker)

        def failed() -> float:
            return metric("relay_redis_link_failures_total", reason="connect_failed")

        try:
            await broker.subscribe("g:kept")
            first = broker._link
            before = failed()
            proxy.hiding = f"{redis_prefix}:g:kept".encode()
            with capture_logs() as logs:
                assert await proxy.cut(after=0.0) == 2
                started = time.monotonic()
                await eventually(lambda: failed() > before, 10)
                took = time.monotonic() - started
                assert proxy.hidden >= 1  # the SUBSCRIBE reached Redis; its confirmation was dropped
                assert broker._link is None
                assert 1.0 <= took < 5.0  # redis_timeout, plus a reconnect on a loaded machine
                proxy.hiding = None
                await eventually(lambda: broker._link not in (None, first), 10)
            [line] = [e for e in logs if e["event"] == "broker.connect_failed"]
            assert line["error"] == "Redis did not confirm the subscriptions in time"
            [up] = [e for e in logs if e["event"] == "broker.reconnected"]
            assert up["failed_attempts"] == failed() - before >= 1
            subscribers = redis_server.call("PUBSUB", "NUMSUB", f"{redis_prefix}:g:kept")
            assert subscribers[1] == 1
            await delivered_again(b, a, "g:kept", 5)
        finally:
            await a.stop()
            await b.stop()


async def test_a_command_answered_loading_ends_the_link_and_is_carried_once_on_the_next(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """A Redis loading its data set answers `-LOADING` (here the proxy answers so in its stead, and
    the command never reaches Redis): it was not carried out. As docs/redis.md says, the link ends
    (reason="loading"), is rebuilt, and the command is sent once more on the new link, where Redis
    carries it: the publish returns its receiver, and the message arrives once, nothing lost, nothing
    twice. A second -LOADING on the next link too is a refusal with Redis's reason, not a loop."""
    proxy = ScriptedProxy(redis_server.port)
    async with proxy:
        slow_probes = {"redis_probe_interval": 30.0, "redis_timeout": 1.0, "redis_backoff_max": 0.3}
        broker = redis_broker(proxy.url, redis_prefix, "a", **slow_probes)
        assert isinstance(broker, RedisBroker)
        a = Collector(broker)

        def loading() -> float:
            return metric("relay_redis_link_failures_total", reason="loading")

        try:
            await broker.subscribe("g:room")
            first = broker._link
            before, resent = loading(), metric("relay_broker_resent_total")
            proxy.loading, proxy.refusals = b"while loading", 1
            with capture_logs() as logs:
                sent = Envelope("g:room", "sent while loading", time.time())
                assert await broker.publish(sent) == 1
            assert proxy.refusals == 0  # the first try was answered -LOADING, never reached Redis
            assert broker._link not in (None, first)
            assert first is not None and first.broken.result() == "loading"
            assert loading() == before + 1
            assert metric("relay_broker_resent_total") == resent + 1
            [lost] = [e for e in logs if e["event"] == "broker.link_lost"]
            assert lost["reason"] == "loading"
            marker = Envelope("g:room", "marker", time.time())
            assert await broker.publish(marker) == 1
            await eventually(lambda: marker in a.envelopes)
            frames = [e.frame for e in a.envelopes if e is not RESYNC]
            assert frames == ["sent while loading", "marker"]

            second = broker._link
            proxy.loading, proxy.refusals = b"loading twice", 2
            with pytest.raises(
                BrokerUnavailable, match="Redis refused the command: LOADING Redis is loading"
            ):
                await broker.publish(Envelope("g:room", "loading twice", time.time()))
            assert proxy.refusals == 0
            assert loading() == before + 2  # the second link ended too: the third carries on
            # The third link ended with the refusal, before the supervisor could replace it: the
            # next publish waits for the fourth, as for any link that is down, and is carried.
            assert broker._link is not None and broker._link.failed
            assert await broker.publish(Envelope("g:room", "after", time.time())) == 1
            assert broker._link not in (None, second) and not broker._link.failed
        finally:
            await a.stop()

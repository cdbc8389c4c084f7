"""Where the Redis primaries are (service/broker/topology.py, cluster.py, link.py): the URLs an operator
writes, the TLS context and credentials they turn into, a Sentinel asked for its master, a cluster's
slot map read from CLUSTER SLOTS, and the redirections and errors Redis answers commands with.

URL parsing, slot maps and error replies are pure logic, tested table-driven; Sentinel and the
cluster's seed fallback against real servers."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.crc import key_slot

from service.broker import open_broker
from service.broker.cluster import ClusterTopology
from service.broker.link import MISSING_LIBRARY, _Link, _Node, error_kind, redirect
from service.broker.resp import Address, ConnectionLost, ConnectOptions, ReplyError, RespConnection
from service.broker.topology import (
    RedisUrl,
    SentinelTopology,
    SingleTopology,
    connect_options,
    open_topology,
    parse_url,
    tls_context,
)
from service.config import Settings
from service.rules import GroupRule, GroupRules
from tests.brokers import eventually
from tests.helpers import free_port
from tests.redis_servers import RedisCluster, RedisServer, SentinelSet
from tests.test_redis_tls import make_pki

A = Address("127.0.0.1", 7000)

# --- URLs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://redis:6380", RedisUrl("redis", False, (Address("redis", 6380),), None, None, "", None)),
        ("redis://redis", RedisUrl("redis", False, (Address("redis", 6379),), None, None, "", None)),
        (
            "redis://10.0.0.1:6379/3",
            RedisUrl("redis", False, (Address("10.0.0.1", 6379),), None, None, "", None),
        ),
        (
            "rediss://:s%40cret@redis",
            RedisUrl("redis", True, (Address("redis", 6379),), None, "s@cret", "", None),
        ),
        (
            "redis://relay:pw@redis",
            RedisUrl("redis", False, (Address("redis", 6379),), "relay", "pw", "", None),
        ),
        ("redis://relay@redis", RedisUrl("redis", False, (Address("redis", 6379),), "relay", None, "", None)),
        ("redis://a:b:c@h", RedisUrl("redis", False, (Address("h", 6379),), "a", "b:c", "", None)),
        ("redis://u:p@q@h", RedisUrl("redis", False, (Address("h", 6379),), "u", "p@q", "", None)),
        ("redis://[::1]:7000", RedisUrl("redis", False, (Address("::1", 7000),), None, None, "", None)),
        ("redis://[fd00::5]", RedisUrl("redis", False, (Address("fd00::5", 6379),), None, None, "", None)),
        (
            "redis+sentinel://s1,s2:26380/my%20master?sentinel_password=sp",
            RedisUrl(
                "sentinel", False, (Address("s1", 26379), Address("s2", 26380)), None, None, "my master", "sp"
            ),
        ),
        (
            "rediss+sentinel://:pw@s1/m/0",
            RedisUrl("sentinel", True, (Address("s1", 26379),), None, "pw", "m", None),
        ),
        (
            "redis+cluster://n1:7000,n2,",
            RedisUrl("cluster", False, (Address("n1", 7000), Address("n2", 6379)), None, None, "", None),
        ),
        ("rediss+cluster://n1:7000", RedisUrl("cluster", True, (Address("n1", 7000),), None, None, "", None)),
    ],
)
def test_a_redis_url_is_read_as_written(url: str, expected: RedisUrl) -> None:
    assert parse_url(url) == expected


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://redis:6379", "unsupported Redis URL scheme 'http'"),
        ("redis+memory://redis", "unsupported Redis URL scheme 'redis+memory'"),
        ("rediss+sentinel+x://h/m", "unsupported Redis URL scheme 'rediss+sentinel+x'"),
        ("redis:/redis", "unsupported Redis URL scheme 'redis:/redis'"),
        ("redis", "unsupported Redis URL scheme 'redis'"),
        ("redis://", "no host in the redis:// URL"),
        ("redis://:pw@/0", "no host in the redis:// URL"),
        ("redis://a:1,b:2", "redis:// takes one host; use redis+sentinel:// or redis+cluster://"),
        ("rediss://a,b", "rediss:// takes one host; use redis+sentinel:// or redis+cluster://"),
        ("redis+sentinel://s1:26379", "redis+sentinel:// needs the master name as its path: .../mymaster"),
        ("redis+sentinel://s1:26379/", "redis+sentinel:// needs the master name as its path: .../mymaster"),
        ("redis://redis:63x9", "bad port in Redis host 'redis:63x9'"),
        ("redis://[::1]:x", "bad port in Redis host '[::1]:x'"),
        # Only the first "]" closes an IPv6 address, and only a ":" may come before the port.
        ("redis://[::1]]:6379", "bad port in Redis host '[::1]]:6379'"),
        ("redis://[::1]:X6379", "bad port in Redis host '[::1]:X6379'"),
    ],
)
def test_a_malformed_url_is_refused_with_what_is_wrong(url: str, message: str) -> None:
    """The whole message, as the operator reads it when the pod refuses to start."""
    with pytest.raises(ValueError) as refused:
        parse_url(url)
    assert str(refused.value) == message


def test_the_refusal_never_shows_the_password() -> None:
    with pytest.raises(ValueError) as refused:
        parse_url("redis://relay:hunter2@redis:bad")
    assert "hunter2" not in str(refused.value)


@pytest.mark.parametrize(
    ("url", "kind", "sharded", "checks_role"),
    [
        ("redis://h", SingleTopology, False, False),
        ("redis+sentinel://s/m", SentinelTopology, False, True),
        ("redis+cluster://n", ClusterTopology, True, False),
    ],
)
def test_each_url_kind_opens_its_topology(url: str, kind: type, sharded: bool, checks_role: bool) -> None:
    topology = open_topology(parse_url(url))
    assert type(topology) is kind
    assert (topology.sharded, topology.checks_role) == (sharded, checks_role)


async def test_one_server_is_its_own_primary_for_every_channel() -> None:
    topology = open_topology(parse_url("redis://h:1"))
    assert await topology.discover(ConnectOptions()) == [Address("h", 1)]
    assert topology.route(b"relay:g:{x}") == Address("h", 1)
    assert topology.probe_channel(b"relay:probe:a", Address("h", 1)) == b"relay:probe:a"
    assert await topology.confirm(Address("h", 1), ConnectOptions())


# --- credentials and TLS ------------------------------------------------------------------------


def test_the_urls_password_wins_over_relay_redis_password() -> None:
    settings = Settings(redis_password="from-env", redis_timeout=1.5)
    options = connect_options(parse_url("redis://u:from-url@h"), settings)
    assert (options.username, options.password, options.tls, options.timeout) == ("u", "from-url", None, 1.5)
    options = connect_options(parse_url("redis://h"), settings)
    assert (options.username, options.password) == (None, "from-env")
    options = connect_options(parse_url("redis://h"), Settings())
    assert options.password is None


def test_rediss_gets_a_verifying_tls_context_by_default() -> None:
    options = connect_options(parse_url("rediss://h"), Settings())
    assert isinstance(options.tls, ssl.SSLContext)
    assert options.tls.check_hostname and options.tls.verify_mode == ssl.CERT_REQUIRED


def test_tls_verification_can_be_turned_off() -> None:
    context = tls_context(Settings(redis_tls_verify=False))
    assert not context.check_hostname and context.verify_mode == ssl.CERT_NONE


def test_tls_trusts_the_given_ca_and_presents_the_client_certificate(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    context = tls_context(
        Settings(
            redis_tls_ca_file=str(pki.ca),
            redis_tls_cert_file=str(pki.client_cert),
            redis_tls_key_file=str(pki.client_key),
        )
    )
    subjects = [str(c["subject"]) for c in context.get_ca_certs()]
    assert len(subjects) == 1 and "relay test CA" in subjects[0]
    assert context.verify_mode == ssl.CERT_REQUIRED
    with pytest.raises(ssl.SSLError):  # the key is needed: the certificate file holds none
        tls_context(Settings(redis_tls_cert_file=str(pki.client_cert)))


# --- Sentinel -----------------------------------------------------------------------------------


@pytest.mark.integration
async def test_sentinel_names_the_master_and_a_dead_sentinel_is_skipped(sentinel_set: SentinelSet) -> None:
    dead = Address("127.0.0.1", 1)  # nothing listens on port 1
    sentinels = tuple(Address("127.0.0.1", s.port) for s in sentinel_set.sentinels)
    topology = SentinelTopology((dead, *sentinels), sentinel_set.name, None)
    master = Address("127.0.0.1", sentinel_set.master_port())
    options = ConnectOptions(timeout=1.0)
    assert await topology.discover(options) == [master]
    assert topology.route(b"relay:g:{x}") == master
    assert await topology.confirm(master, options)
    assert not await topology.confirm(Address("127.0.0.1", 2), options)
    # The Sentinel that answered is asked first from now on: the dead one is not waited for again.
    assert topology._sentinels[0] == sentinels[0]


@pytest.mark.integration
async def test_an_unknown_master_name_is_no_master(sentinel_set: SentinelSet) -> None:
    sentinels = tuple(Address("127.0.0.1", s.port) for s in sentinel_set.sentinels)
    topology = SentinelTopology(sentinels, "nosuchmaster", None)
    with pytest.raises(ConnectionLost, match="no Sentinel answered with a master named 'nosuchmaster'"):
        await topology.discover(ConnectOptions(timeout=1.0))
    # No Sentinel answers at all: the current master is kept rather than dropped.
    assert await SentinelTopology((Address("127.0.0.1", 1),), "m", None).confirm(
        A, ConnectOptions(timeout=1.0)
    )


@pytest.mark.integration
async def test_the_sentinel_password_is_sent_to_sentinels_not_the_data_password(
    sentinel_set: SentinelSet,
) -> None:
    # These Sentinels have no password: sending one is refused, so discovery fails, and the data
    # nodes' username and password must not be sent to them either.
    sentinels = tuple(Address("127.0.0.1", s.port) for s in sentinel_set.sentinels)
    with pytest.raises(ConnectionLost):
        await SentinelTopology(sentinels, sentinel_set.name, "wrong").discover(ConnectOptions(timeout=1.0))
    data_credentials = ConnectOptions(username="relay", password="data-pw", timeout=1.0)
    topology = SentinelTopology(sentinels, sentinel_set.name, None)
    assert await topology.discover(data_credentials) == [Address("127.0.0.1", sentinel_set.master_port())]


@pytest.mark.integration
async def test_a_sentinel_that_never_answers_is_given_up_on_within_the_timeout(
    sentinel_set: SentinelSet,
) -> None:
    """A hung Sentinel (paused, half-open) listed first must not hold up every reconnect."""

    async def silent(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hung.append(writer)

    hung: list[asyncio.StreamWriter] = []
    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    first = Address("127.0.0.1", server.sockets[0].getsockname()[1])
    try:
        sentinels = tuple(Address("127.0.0.1", s.port) for s in sentinel_set.sentinels)
        topology = SentinelTopology((first, *sentinels), sentinel_set.name, None)
        found = await asyncio.wait_for(topology.discover(ConnectOptions(timeout=0.3)), 3.0)
        assert found == [Address("127.0.0.1", sentinel_set.master_port())]
    finally:
        for writer in hung:
            writer.close()
        server.close()
        await server.wait_closed()


@pytest.fixture
def guarded_sentinel(sentinel_set: SentinelSet, tmp_path: Path) -> Iterator[tuple[Address, str]]:
    """One more Sentinel watching the shared master, with a password (the shared ones have none)."""
    port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor {sentinel_set.name} 127.0.0.1 {sentinel_set.master_port()} 2\n"
    )
    sentinel = RedisServer(port, tmp_path, [str(conf), "--sentinel"]).start()
    sentinel.call("ACL", "SETUSER", "default", "resetpass", ">sentinel-pw")
    yield Address("127.0.0.1", port), sentinel_set.name
    sentinel.kill()


@pytest.mark.integration
async def test_sentinels_get_the_sentinel_password_never_the_data_nodes_credentials(
    sentinel_set: SentinelSet, guarded_sentinel: tuple[Address, str]
) -> None:
    address, name = guarded_sentinel
    data_credentials = ConnectOptions(username="relay", password="data-pw", timeout=1.0)
    master = [Address("127.0.0.1", sentinel_set.master_port())]
    assert await SentinelTopology((address,), name, "sentinel-pw").discover(data_credentials) == master
    with pytest.raises(ConnectionLost):  # refused, and there is no other Sentinel to ask
        await SentinelTopology((address,), name, "wrong").discover(data_credentials)
    with pytest.raises(ConnectionLost):
        await SentinelTopology((address,), name, None).discover(data_credentials)
    # As configured: the URL's sentinel_password is the one the Sentinels get.
    url = f"redis+sentinel://relay:data-pw@{address.host}:{address.port}/{name}?sentinel_password=sentinel-pw"
    assert await open_topology(parse_url(url)).discover(data_credentials) == master


# --- cluster slot maps --------------------------------------------------------------------------


def node(host: bytes | None, port: int, *rest: Any) -> list[Any]:
    return [host, port, *rest]


def full_map(*nodes: list[Any]) -> list[Any]:
    """CLUSTER SLOTS with the 16384 slots split evenly over `nodes` (each [host, port, id...])."""
    step = 16384 // len(nodes)
    return [[i * step, 16383 if i == len(nodes) - 1 else (i + 1) * step - 1, n] for i, n in enumerate(nodes)]


def test_a_slot_map_routes_every_slot_to_its_primary() -> None:
    topology = ClusterTopology((A,))
    primaries = topology._load(
        [
            [0, 5460, node(b"10.0.0.1", 7000, b"id1"), node(b"10.0.0.4", 7003, b"id4")],
            [5461, 10922, node(b"10.0.0.2", 7001, b"id2")],
            [10923, 16382, node(b"10.0.0.3", 7002, b"id3")],
            [16383, 16383, node(b"10.0.0.1", 7000, b"id1")],
        ],
        A,
    )
    one, two, three = Address("10.0.0.1", 7000), Address("10.0.0.2", 7001), Address("10.0.0.3", 7002)
    assert primaries == [one, two, three]
    for channel, owner in [(b"{a}", 15495), (b"x", 16287), (b"foo", 12182)]:
        assert key_slot(channel) == owner
    assert topology.route(b"{a}") == three
    assert topology.route(b"{user1000}.following") == one  # slot 3443
    assert topology._owners[0] == one and topology._owners[5460] == one
    assert topology._owners[5461] == two and topology._owners[10922] == two
    assert topology._owners[10923] == three and topology._owners[16382] == three
    assert topology._owners[16383] == one
    # Every node, replicas too, becomes a seed for the next discovery; each once.
    assert topology._seeds == [A, Address("10.0.0.4", 7003), one, two, three]


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (b"ERR", "CLUSTER SLOTS answered with something other than a list"),
        ([], "slot 0 has no primary"),
        ([[0, 8191, node(b"h", 1)], [8192, 16383]], "malformed CLUSTER SLOTS entry"),
        ([b"0 16383"], "malformed CLUSTER SLOTS entry"),
        ([[0, 16384, node(b"h", 1)]], "malformed slot range 0-16384"),
        ([[-1, 16383, node(b"h", 1)]], "malformed slot range -1-16383"),
        ([[9, 8, node(b"h", 1)]], "malformed slot range 9-8"),
        ([[b"0", 16383, node(b"h", 1)]], "malformed slot range b'0'-16383"),
        ([[0, b"16383", node(b"h", 1)]], "malformed slot range 0-b'16383'"),
        ([[0, 16383, [b"h"]]], "malformed CLUSTER SLOTS node"),
        ([[0, 16383, [b"h", b"7000"]]], "malformed CLUSTER SLOTS node"),
        ([[0, 16383, b"h:7000"]], "malformed CLUSTER SLOTS node"),
        ([[0, 16383, [7, 7000]]], "malformed CLUSTER SLOTS endpoint 7"),
        ([[0, 100, node(b"h", 1)], [102, 16383, node(b"h", 1)]], "slot 101 has no primary"),
        ([[0, 16382, node(b"h", 1)]], "slot 16383 has no primary"),
    ],
)
def test_a_slot_map_that_is_not_whole_is_refused(reply: Any, message: str) -> None:
    topology = ClusterTopology((A,))
    before = list(topology._owners)
    with pytest.raises(ValueError) as refused:
        topology._load(reply, A)
    assert str(refused.value).startswith(message)
    assert topology._owners == before  # the map in use is kept


def test_a_replica_with_a_malformed_entry_is_ignored_not_fatal() -> None:
    topology = ClusterTopology((A,))
    assert topology._load([[0, 16383, node(b"h", 1), [b"broken"]]], A) == [Address("h", 1)]
    assert topology._seeds == [A, Address("h", 1)]


def test_a_host_that_is_not_utf8_is_read_not_fatal() -> None:
    assert ClusterTopology((A,))._load([[0, 16383, node(b"\xffnode", 7005)]], A) == [
        Address("\ufffdnode", 7005)
    ]


@pytest.mark.parametrize("host", [None, b"", b"?"])
def test_a_node_with_no_usable_endpoint_is_the_seed_host_on_its_port(host: bytes | None) -> None:
    topology = ClusterTopology((A,))
    assert topology._load([[0, 16383, node(host, 7005)]], Address("seed.local", 7000)) == [
        Address("seed.local", 7005)
    ]


def test_moved_updates_one_slot_and_remembers_the_node() -> None:
    topology = ClusterTopology((A,))
    topology._load(full_map(node(b"h", 1)), A)
    slot = key_slot(b"relay:g:{room}")
    topology.moved(slot, Address("h", 2))
    assert topology.route(b"relay:g:{room}") == Address("h", 2)
    assert topology._owners[slot - 1] == topology._owners[slot + 1] == Address("h", 1)
    assert Address("h", 2) in topology._seeds
    topology.moved(0, Address("h", 4))  # slot 0 is a slot like any other
    assert topology._owners[0] == Address("h", 4)
    topology.moved(16384, Address("h", 3))  # out of range: ignored
    topology.moved(-1, Address("h", 3))
    assert Address("h", 3) not in topology._seeds and Address("h", 3) not in topology._owners


def test_a_probe_channel_lands_in_a_slot_its_node_owns() -> None:
    topology = ClusterTopology((A,))
    one, two = Address("h", 1), Address("h", 2)
    topology._load(full_map(node(b"h", 1), node(b"h", 2)), A)
    for owner in (one, two):
        channel = topology.probe_channel(b"relay:probe:a", owner)
        assert channel.startswith(b"relay:probe:a{") and channel.endswith(b"}")
        assert topology.route(channel) == owner
        assert topology.probe_channel(b"relay:probe:a", owner) == channel  # the same every time
    # The smallest such tag, found once: slot 0's is {3560}.
    assert topology.probe_channel(b"p", one) == b"p{3560}"
    assert [n for n in range(3561) if key_slot(b"{%d}" % n) == 0] == [3560]


@pytest.mark.integration
async def test_discovery_asks_the_next_seed_when_one_is_down(redis_cluster: RedisCluster) -> None:
    seeds = (Address("127.0.0.1", 1), *(Address("127.0.0.1", n.port) for n in redis_cluster.primaries()))
    topology = ClusterTopology(seeds)
    primaries = await topology.discover(ConnectOptions(timeout=1.0))
    assert sorted(primaries, key=lambda a: a.port) == sorted(
        (Address("127.0.0.1", n.port) for n in redis_cluster.primaries()), key=lambda a: a.port
    )
    assert topology.route(b"anything") in primaries
    assert await topology.confirm(primaries[0], ConnectOptions())


@pytest.mark.integration
async def test_a_seed_that_never_answers_is_given_up_on_and_named(redis_cluster: RedisCluster) -> None:
    async def silent(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hung.append(writer)

    hung: list[asyncio.StreamWriter] = []
    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    seed = Address("127.0.0.1", server.sockets[0].getsockname()[1])
    try:
        with pytest.raises(ConnectionLost) as lost:
            await asyncio.wait_for(ClusterTopology((seed,)).discover(ConnectOptions(timeout=0.3)), 3.0)
        assert str(lost.value) == f"no cluster node gave a usable slot map: {seed}: TimeoutError"
        live = Address("127.0.0.1", redis_cluster.primaries()[0].port)
        topology = ClusterTopology((seed, live))
        assert live in await asyncio.wait_for(topology.discover(ConnectOptions(timeout=0.3)), 3.0)
    finally:
        for writer in hung:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_node_without_a_whole_slot_map_is_skipped_and_named() -> None:
    """Mid-failover a node can answer CLUSTER SLOTS with slots that have no primary: ask the next."""

    async def empty_map(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)
        writer.write(b"*0\r\n")
        await writer.drain()
        await reader.read()  # until relay hangs up
        writer.close()

    server = await asyncio.start_server(empty_map, "127.0.0.1", 0)
    seed = Address("127.0.0.1", server.sockets[0].getsockname()[1])
    try:
        with pytest.raises(ConnectionLost) as lost:
            await ClusterTopology((seed,)).discover(ConnectOptions(timeout=1.0))
        assert str(lost.value) == (
            f"no cluster node gave a usable slot map: {seed}: slot 0 has no primary (failover under way?)"
        )
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.integration
async def test_a_node_that_is_not_in_cluster_mode_is_no_slot_map(redis_server: RedisServer) -> None:
    topology = ClusterTopology((Address("127.0.0.1", 1), Address("127.0.0.1", redis_server.port)))
    with pytest.raises(ConnectionLost) as lost:
        await topology.discover(ConnectOptions(timeout=1.0))
    text = str(lost.value)
    assert text.startswith("no cluster node gave a usable slot map: 127.0.0.1:1: ")
    assert f"; 127.0.0.1:{redis_server.port}: " in text and "cluster support disabled" in text


# --- redirections and errors --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        ("MOVED 3999 127.0.0.1:6381", ("MOVED", 3999, Address("127.0.0.1", 6381))),
        ("ASK 3999 10.0.0.9:7002", ("ASK", 3999, Address("10.0.0.9", 7002))),
        ("MOVED 12 [fd00::3]:7000", ("MOVED", 12, Address("fd00::3", 7000))),
        ("MOVED 12 :7004", ("MOVED", 12, Address("replied", 7004))),  # an unknown endpoint
        ("MOVED 12 ?:7004", ("MOVED", 12, Address("replied", 7004))),
        ("MOVED 12 redis-2.cluster.local:7004", ("MOVED", 12, Address("redis-2.cluster.local", 7004))),
        ("MOVED 0 X-node.local:7004", ("MOVED", 0, Address("X-node.local", 7004))),
        ("MOVED x h:1", None),
        ("MOVED 12 h:", None),
        ("MOVED 12", None),
        ("ERR unknown command", None),
        ("MOVEDX 12 h:1", None),
        ("CLUSTERDOWN The cluster is down", None),
    ],
)
def test_redirections_are_read_from_the_error_reply(
    error: str, expected: tuple[str, int, Address] | None
) -> None:
    assert redirect(ReplyError(error), Address("replied", 7000)) == expected


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        ("READONLY You can't write against a read only replica.", "READONLY"),
        ("LOADING Redis is loading the dataset in memory", "LOADING"),
        ("ERR Function not found", MISSING_LIBRARY),
        ("ERR unknown command 'FCALL'", "ERR"),
        ("NOSCRIPT", "NOSCRIPT"),
    ],
)
def test_an_error_reply_is_known_by_its_code_word(error: str, kind: str) -> None:
    assert error_kind(ReplyError(error)) == kind


async def test_a_retired_node_is_closed_and_released_without_failing_the_link(
    redis_server: RedisServer,
) -> None:
    """A primary that owns no slots now (link.py `_Link.retire`): its connections close, whoever
    waited on it is told "not confirmed", and the link lives on."""
    address = Address("127.0.0.1", redis_server.port)
    link = _Link()
    old, newer = _Node(address, b"probe"), _Node(address, b"probe")
    old.pub = old.sub = await RespConnection.open(address, ConnectOptions())
    newer.pub = newer.sub = await RespConnection.open(address, ConnectOptions())
    try:
        link.nodes[address] = old
        waiter = old.expect(b"channel")
        link.retire(old)
        assert link.nodes == {} and not link.failed and not link.broken.done()
        assert waiter.result() is False and old.answered.is_set() and old.pub.closed
        link.nodes[address] = newer
        link.retire(old)  # retired again, late: the node now at its address stays
        assert link.nodes == {address: newer} and not newer.pub.closed
    finally:  # closed whatever failed above: an open connection would hang the test's teardown
        link.fail("closed")
        for node in (old, newer):
            node.close()
        await link.wait_closed()


async def test_confirmations_settle_a_channels_waiters_oldest_first() -> None:
    """`_Node.settle`: two (un)subscribes of one channel in flight are confirmed in order, each
    once; True while someone was waiting (an unasked SUNSUBSCRIBE is what gets False)."""
    node = _Node(Address("h", 1), b"probe")
    first, second = node.expect(b"c"), node.expect(b"c")
    assert node.settle(b"c", True) is True and first.result() is True and not second.done()
    assert node.settle(b"c", False) is True and second.result() is False
    assert node.settle(b"c", True) is False and node.waiters == {}


async def test_failing_a_link_cancels_its_tasks_but_not_the_one_that_fails_it() -> None:
    """`_Link.fail`: the link says it failed, with its first reason for good; the watch, a slot-map
    refresh and node openings under way are cancelled (they would add connections to a dead link),
    except the task calling `fail`, which finishes what it was doing."""
    link = _Link()
    never = asyncio.Event()
    finished: list[str] = []

    async def refresh() -> None:
        await never.wait()

    async def open_node() -> _Node:
        await never.wait()
        raise AssertionError("never opened")

    async def watch() -> None:
        await asyncio.sleep(0)
        link.fail("probe_timeout")
        await asyncio.sleep(0)  # not cancelled: it is the task that failed the link
        finished.append("watch")

    link.refreshing = asyncio.create_task(refresh())
    opening = link.opening[Address("h", 1)] = asyncio.create_task(open_node())
    link.monitor = asyncio.create_task(watch())
    await link.monitor
    assert finished == ["watch"] and link.failed is True and link.broken.result() == "probe_timeout"
    await asyncio.wait([link.refreshing, opening], timeout=1.0)
    assert link.refreshing.cancelled() and opening.cancelled()
    link.fail("closed")
    assert link.failed is True and link.broken.result() == "probe_timeout"


async def test_closing_a_node_stops_its_master_check_unless_the_check_is_closing_it() -> None:
    """A Sentinel master check in flight (`_Node.checking`) is cancelled when its node closes; a
    check that found a demoted master closes the node itself and finishes."""
    node = _Node(Address("h", 1), b"probe")
    never = asyncio.Event()
    finished: list[str] = []

    async def hang() -> None:
        await never.wait()

    async def check() -> None:
        await asyncio.sleep(0)
        node.close()  # a demoted master found: the link, and this node, are ended from here
        await asyncio.sleep(0)
        finished.append("check")

    hanging = node.checking = asyncio.create_task(hang())
    node.close()
    await asyncio.wait([hanging], timeout=1.0)
    assert hanging.cancelled() and node.answered.is_set()
    node.checking = asyncio.create_task(check())
    await node.checking
    assert finished == ["check"]


async def test_a_socket_that_never_reports_closed_costs_closing_a_link_one_second() -> None:
    """`_Link.wait_closed` bounds the wait for the sockets to be released: a connection whose
    `connection_lost` never comes (here one never connected) does not hang or fail the close."""
    link = _Link()
    node = _Node(Address("h", 1), b"probe")
    node.pub = node.sub = RespConnection()
    link.nodes[node.address] = node
    link.fail("closed")
    started = time.monotonic()
    await link.wait_closed()
    assert 0.9 < time.monotonic() - started < 1.9


def test_open_broker_refuses_an_unknown_scheme_and_names_the_ones_it_knows() -> None:
    with pytest.raises(ValueError) as refused:
        open_broker(Settings(broker_url="nats://bus:4222"))
    assert str(refused.value) == (
        "unsupported broker URL scheme 'nats' in RELAY_BROKER_URL (expected memory://, "
        "redis://, rediss://, redis+sentinel:// or redis+cluster://)"
    )


async def test_a_redis_url_opens_a_redis_broker_that_has_not_connected_yet() -> None:
    broker = open_broker(Settings(broker_url="redis://127.0.0.1:1", pod_id="p"))
    try:
        assert not broker.ready and broker.alive
    finally:
        await broker.close()
    await asyncio.sleep(0)


@pytest.mark.parametrize(
    "rules", [None, GroupRules([GroupRule("hist.*", 10, 60.0, False), GroupRule("*", 0, 0.0, True)])]
)
async def test_a_redis_broker_announces_the_group_rules_for_other_writers(
    redis_server: RedisServer, redis_prefix: str, rules: GroupRules | None
) -> None:
    """`<prefix>:rules` is what the Django channel layer reads to know which groups keep history."""
    broker = open_broker(
        Settings(broker_url=redis_server.url, redis_prefix=redis_prefix, redis_probe_interval=0.2), rules
    )
    try:
        await broker.subscribe("g:{announce}")  # starts the link; the announcement is written on it
        await eventually(lambda: redis_server.call("GET", f"{redis_prefix}:rules") is not None)
        expected = rules.document() if rules is not None else '{"group":[]}'
        assert redis_server.call("GET", f"{redis_prefix}:rules") == expected
    finally:
        await broker.close()

"""The contract between relay_channels (clients/django, the Django channel layer) and the pods.

The package restates the pods' wire format for writers outside them; here every payload it builds
is decoded by the pods' own code, its names and patterns are compared with the pods', and then it
publishes through real pods (in this process) on real Redis: a single server, a cluster and a
Sentinel set, a group with history included. Runs in relay's own venv, without Django or Channels:
the layer itself (their API on top of this) is tested in tests/test_relay_channels_django.py.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from relay_channels import config as layer_config
from relay_channels import frames, wire
from relay_channels.errors import ConfigError, RelayUnavailable
from relay_channels.publisher import Publisher
from relay_channels.rules import Rules

from service import channels, protocol
from service.broker import Envelope, history, topology
from service.broker import wire as pod_wire
from service.config import REDIS_PREFIX
from service.rules import GroupRules
from service.server import PodServer
from tests.brokers import FAST_REDIS, eventually
from tests.helpers import Client, free_port, join, metric, running_pod, wait_until, ws_url
from tests.redis_servers import RedisCluster, RedisServer, SentinelSet

FRAMES = [
    '{"message": {"text": "hello"}}',
    '{"message": {"text": "line\\nbreak \\u2603 \\ud83d\\ude00", "n": 1e-07, "big": 12345678901234567890}}',
    '{"message": "r\u00e9sum\u00e9 \u2603 with a raw newline\nin the text"}',
    '{"message": {"b": 1, "a": [null, true, false, -0.0, NaN]}}',
]


# --- Payloads and names, against the pods' own code ----------------------------------------------


@pytest.mark.parametrize("frame", FRAMES)
@pytest.mark.parametrize("target", ["", "pod-a.Abc_-123xyz9"])
def test_messages_decode_as_the_pods_read_them_and_match_their_encoding(frame: str, target: str) -> None:
    sent_at = 1764000000.1234567
    payload = wire.message(frame, sent_at, target)
    assert pod_wire.decode("g:{room}", payload) == Envelope("g:{room}", frame, sent_at, target)
    assert payload == pod_wire.encode(Envelope("g:{room}", frame, sent_at, target))


@pytest.mark.parametrize("verb", ["join", "leave"])
def test_group_changes_decode_as_commands_for_one_connection(verb: Any) -> None:
    payload = wire.control(verb, "pod-a.Abc_-123xyz9", "side.room-1")
    envelope = pod_wire.decode("p:pod-a", payload)
    assert envelope == Envelope("p:pod-a", "", 0.0, "pod-a.Abc_-123xyz9", command=f"{verb} side.room-1")


def test_channel_and_key_names_are_the_pods() -> None:
    for prefix in ("relay", "t.1-x_y"):
        for group in ("room", "a.b-c_d", "x" * 99):
            assert wire.group_channel(prefix, group) == f"{prefix}:{channels.group(group)}"
            keys = history.keys(prefix.encode() + b":", channels.group(group))
            assert tuple(k.encode() for k in wire.history_keys(prefix, group)) == keys
        assert wire.pod_channel(prefix, "pod-7") == f"{prefix}:{channels.pod('pod-7')}"
        assert wire.rules_key(prefix) == f"{prefix}:rules"


def test_name_patterns_and_limits_are_the_pods() -> None:
    assert wire.GROUP_NAME.pattern == protocol.GROUP_NAME.pattern
    assert wire.CHANNEL_ID.pattern == protocol.CHANNEL_ID.pattern
    assert wire.PREFIX.pattern == REDIS_PREFIX.pattern
    assert wire.MAX_KEY_LENGTH == protocol.MAX_KEY_LENGTH
    assert wire.APPEND.encode() == history.APPEND
    assert b"register_function('" + history.APPEND + b"'" in history.LIBRARY
    for _ in range(20):
        channel_id = channels.new_connection_id("pod-a_1")
        assert wire.CHANNEL_ID.fullmatch(channel_id) and wire.pod_of(channel_id) == protocol.pod_of(
            channel_id
        )


def test_history_arguments_are_what_the_library_takes() -> None:
    args = wire.append_args(
        "relay", "hist.a", '{"message":1}', 1.5, history=100, ttl=2.5, sharded=True, epoch="ab12", key="k"
    )
    stream, meta, seen = (k.decode() for k in history.keys(b"relay:", "g:{hist.a}"))
    assert args == (
        "FCALL", "relay_append_v1", 3, stream, meta, seen,
        "relay:g:{hist.a}", "SPUBLISH", '{"message":1}', "1.5", 100, 2500, "ab12", "k",
    )  # fmt: skip


def test_the_rules_the_pods_publish_choose_the_same_groups() -> None:
    document = {
        "group": [
            {"match": "dash.*", "history": 100, "ttl": 60},
            {"match": "dash.none", "history": 5},  # shadowed: the first match wins
            {"match": "Quiet*", "history": 0},
            {"match": "q*", "history": 3, "latest": True},
            {"match": "[ab]?", "history": 7},
        ]
    }
    pods = GroupRules.parse(document)
    ours = Rules.parse(pods.document())
    for group in ("dash.x", "dash.none", "Quiet", "quiet", "q", "a1", "b", "ab", "other", "DASH.x"):
        theirs = pods.history_for(group)
        mine = ours.history_for(group)
        assert (mine and (mine.match, mine.history, mine.ttl, mine.latest)) == (
            theirs and (theirs.match, theirs.history, theirs.ttl, theirs.latest)
        ), group
    with pytest.raises(ValueError, match="not relay's group rules"):
        Rules.parse(b'{"groups": []}')


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "redis://h",
        "rediss://user:p%40ss@redis.example:6380/2",
        "redis://:secret@[::1]:7000",
        "redis+sentinel://s1:26379,s2,[::1]:26380/mymaster?sentinel_password=x",
        "rediss+sentinel://u:p@s1/master%2Dname",
        "redis+cluster://c1:7000,c2:7001",
        "rediss+cluster://:pw@c1",
    ],
)
def test_urls_are_read_as_the_pods_read_them(url: str) -> None:
    pods = topology.parse_url(url)
    ours = layer_config.parse_url(url)
    assert (ours.kind, ours.tls, ours.username, ours.password, ours.master, ours.sentinel_password) == (
        pods.kind, pods.tls, pods.username, pods.password, pods.master, pods.sentinel_password,
    )  # fmt: skip
    assert ours.hosts == tuple((a.host, a.port) for a in pods.hosts)


@pytest.mark.parametrize(
    "url", ["http://h", "redis:/h", "redis://", "redis://a,b", "redis+sentinel://s1", "redis://h:port"]
)
def test_urls_the_pods_refuse_are_refused(url: str) -> None:
    with pytest.raises(ValueError):
        topology.parse_url(url)
    with pytest.raises(ValueError):
        layer_config.parse_url(url)


def test_frames_are_encoded_as_send_json_does_and_must_be_objects() -> None:
    content = {"message": {"b": [1, 2.5, None], "a": "\u2603\n", "z": float("inf")}}
    assert frames.encode(content) == json.dumps(content)
    assert frames.encode('{"message": 1}') == '{"message": 1}'  # text as is
    bad: Any
    for bad in ({}, [1], "[1]", "{}", "{ }", "nope", 3):
        with pytest.raises(ValueError, match="JSON"):
            frames.encode(bad)


# --- CONFIG: every error names its key --------------------------------------------------------------


def test_config_defaults_and_the_forms_of_hosts() -> None:
    config = layer_config.parse({})
    assert (config.url.hosts, config.prefix, config.max_frame_bytes, config.timeout) == (
        (("127.0.0.1", 6379),), "relay", 65536, 3.0,
    )  # fmt: skip
    assert config.frames == {"*": frames.message}
    by_pair = layer_config.parse({"hosts": [("redis.local", 6390)]})
    assert by_pair.url.hosts == (("redis.local", 6390),) and by_pair.url_key == "hosts"
    by_dict = layer_config.parse({"hosts": [{"address": "redis://r:1/0", "password": "p@ss word"}]})
    assert by_dict.url.password == "p@ss word" and "p@ss" not in by_dict.shown_url
    by_setting = layer_config.parse({"url": "redis://r", "password": "s3cret"})
    assert by_setting.url.password == "s3cret"
    tls = layer_config.parse({"url": "rediss://r", "tls": {"ca_file": "/ca.pem", "verify": False}})
    assert tls.tls == {"ssl_cert_reqs": "none", "ssl_check_hostname": False, "ssl_ca_certs": "/ca.pem"}
    assert layer_config.parse({"timeout": None}).timeout is None
    assert layer_config.parse({"timeout": 1}).timeout == 1.0
    mapped = layer_config.parse({"frames": {"a.b": "json.dumps", "c": None}})
    assert mapped.frames == {"*": frames.message, "a.b": json.dumps, "c": None}


@pytest.mark.parametrize(
    ("config", "names"),
    [
        ({"capacity": 100}, ['["capacity"]', "channels_redis setting", "remove it"]),
        ({"symmetric_encryption_keys": ["k"]}, ['["symmetric_encryption_keys"]', "rediss://"]),
        ({"hots": []}, ['["hots"] is not a relay_channels setting', "hosts"]),
        ({"url": "redis://a", "hosts": ["redis://b"]}, ['"url" or "hosts"']),
        ({"hosts": ["redis://a", "redis://b"]}, ['["hosts"] must list exactly one', "redis+cluster://"]),
        ({"hosts": "redis://a"}, ['["hosts"] must list exactly one']),
        ({"hosts": [{"host": "a"}]}, ['["hosts"][0]']),
        ({"url": "http://a"}, ['["url"]', "unsupported Redis URL scheme 'http'"]),
        ({"url": 5}, ['["url"] must be a string']),
        ({"prefix": "has space"}, ['["prefix"]', "RELAY_REDIS_PREFIX"]),
        ({"prefix": ""}, ['["prefix"]']),
        ({"max_frame_bytes": 0}, ['["max_frame_bytes"] must be a whole number of at least 1']),
        ({"max_frame_bytes": 1.5}, ['["max_frame_bytes"]']),
        ({"max_frame_bytes": True}, ['["max_frame_bytes"]']),
        ({"timeout": "3"}, ['["timeout"] must be a number of seconds']),
        ({"rules_cache_seconds": -1}, ['["rules_cache_seconds"]']),
        ({"frames": ["x"]}, ['["frames"] must map event types']),
        ({"frames": {"a": "no.such.module.f"}}, ['["frames"]["a"]: cannot import']),
        ({"frames": {"a": "json.nothing"}}, ['["frames"]["a"]: cannot import']),
        ({"frames": {"a": 5}}, ['["frames"]["a"] must be a callable']),
        ({"password": 5}, ['["password"] must be a string']),
        ({"tls": {"ca": "x"}}, ['["tls"] takes only']),
        ({"tls": {"verify": "no"}}, ['["tls"]["verify"]']),
    ],
)
def test_config_errors_name_the_setting(config: dict[str, Any], names: list[str]) -> None:
    where = 'CHANNEL_LAYERS["live"]["CONFIG"]'
    with pytest.raises(ConfigError) as raised:
        layer_config.parse(config, where)
    for name in names:
        assert name in str(raised.value)
    assert str(raised.value).startswith(where)


def test_passwords_never_reach_a_message() -> None:
    assert layer_config.shown("redis://user:s3cret@h:1/0") == "redis://user:***@h:1/0"
    assert layer_config.shown("redis+sentinel://:s3cret@a,b/m?sentinel_password=s3cret") == (
        "redis+sentinel://:***@a,b/m?sentinel_password=***"
    )
    assert layer_config.shown("redis://h:1") == "redis://h:1"


# --- Through real pods on real Redis ---------------------------------------------------------------


@pytest.fixture
def rules_file(tmp_path: Path) -> str:
    path = tmp_path / "groups.toml"
    path.write_text('[[group]]\nmatch = "hist.*"\nhistory = 5\nttl = 60\n')
    return str(path)


@asynccontextmanager
async def two_pods(url: str, prefix: str, rules: str) -> AsyncIterator[list[PodServer]]:
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(
                running_pod(
                    broker_url=url, pod_id=name, redis_prefix=prefix, group_rules_file=rules, **FAST_REDIS
                )
            )
            for name in ("pa", "pb")
        ]


def publisher(url: str, prefix: str, **config: Any) -> Publisher:
    return Publisher(layer_config.parse({"url": url, "prefix": prefix, "rules_cache_seconds": 0, **config}))


async def text(client: Client, timeout: float = 5.0) -> str:
    frame = await asyncio.wait_for(client.ws.recv(), timeout)
    assert isinstance(frame, str)
    return frame


async def controlled(outcome: str, before: float) -> None:
    """Until a pod in this process has carried out one more group change (`joined` or `left`)."""
    await eventually(lambda: metric("relay_control_commands_total", outcome=outcome) > before)


async def through_pods(url: str, prefix: str, rules: str) -> None:
    """Group, direct, join, leave and history through two pods: the same steps on every topology."""
    async with two_pods(url, prefix, rules) as (pa, pb):
        a, b = await join(ws_url(pa, "/room")), await join(ws_url(pb, "/room"))
        hist = await join(ws_url(pb, "/hist.a"))
        pub = publisher(url, prefix)
        try:
            for frame in FRAMES:
                assert (await pub.group("room", frame)).pods == 2
                assert [await text(a), await text(b)] == [frame, frame]

            assert await pub.channel(b.channel_id, FRAMES[1]) == 1
            assert await text(b) == FRAMES[1]
            marker = '{"message": "marker"}'
            await pub.group("room", marker)
            assert [await text(a), await text(b)] == [marker, marker]  # a got nothing before it

            joined = metric("relay_control_commands_total", outcome="joined")
            assert await pub.control("join", a.channel_id, "side") == 1
            await controlled("joined", joined)
            assert (await pub.group("side", FRAMES[0])).pods == 1
            assert await text(a) == FRAMES[0]
            left = metric("relay_control_commands_total", outcome="left")
            await pub.control("leave", a.channel_id, "side")
            await controlled("left", left)
            assert (await pub.group("side", FRAMES[0])).pods == 0

            first = await pub.group("hist.a", FRAMES[2], key="once")
            assert (first.offset, first.duplicate, first.pods, len(first.epoch)) == (1, False, 1, 12)
            again = await pub.group("hist.a", FRAMES[2], key="once")
            assert (again.epoch, again.offset, again.duplicate) == (first.epoch, 1, True)
            second = await pub.group("hist.a", FRAMES[3])
            assert (second.epoch, second.offset) == (first.epoch, 2)
            assert [await text(hist), await text(hist)] == [FRAMES[2], FRAMES[3]]  # stored and sent once
        finally:
            await pub.close()
            await asyncio.gather(*(c.ws.close() for c in (a, b, hist)))


@pytest.mark.integration
async def test_group_direct_join_leave_and_history_through_pods_on_one_redis(
    redis_server: RedisServer, redis_prefix: str, rules_file: str
) -> None:
    await through_pods(redis_server.url, redis_prefix, rules_file)
    stream, _, _ = wire.history_keys(redis_prefix, "hist.a")
    assert redis_server.call("XLEN", stream) == 2  # the repeated key was stored once


@pytest.mark.integration
async def test_through_pods_on_a_cluster(
    redis_cluster: RedisCluster, redis_prefix: str, rules_file: str
) -> None:
    await through_pods(redis_cluster.url, redis_prefix, rules_file)


@pytest.mark.integration
async def test_through_pods_on_sentinel(
    sentinel_set: SentinelSet, redis_prefix: str, rules_file: str
) -> None:
    await through_pods(sentinel_set.url, redis_prefix, rules_file)


@pytest.mark.integration
async def test_a_v1_member_of_a_history_group_gets_the_position_the_library_assigned(
    redis_server: RedisServer, redis_prefix: str, rules_file: str
) -> None:
    async with two_pods(redis_server.url, redis_prefix, rules_file) as (pa, _):
        member = await join(ws_url(pa, "/hist.v1"), subprotocols=[protocol.SUBPROTOCOL])
        pub = publisher(redis_server.url, redis_prefix)
        try:
            published = await pub.group("hist.v1", '{"message": {"n": 1}}')
            got = json.loads(await text(member))
            assert got == {"group": "hist.v1", "epoch": published.epoch, "offset": 1, "message": {"n": 1}}
        finally:
            await pub.close()
            await member.ws.close()


@pytest.mark.integration
async def test_unreachable_redis_and_a_wrong_prefix_name_the_setting(
    redis_server: RedisServer, redis_prefix: str, rules_file: str
) -> None:
    closed = f"redis://:s3cret@127.0.0.1:{_closed_port()}"
    with pytest.raises(RelayUnavailable) as raised:
        await publisher(closed, redis_prefix).group("room", FRAMES[0])
    message = str(raised.value)
    assert 'CONFIG"]["url"]' in message and "RELAY_BROKER_URL" in message and "s3cret" not in message
    assert f"127.0.0.1:{closed.rpartition(':')[2]}" in message

    async with two_pods(redis_server.url, redis_prefix, rules_file):
        pub = publisher(redis_server.url, redis_prefix + "x")
        try:
            with pytest.raises(RelayUnavailable) as raised:
                await pub.channel("pa.abc", FRAMES[0])
        finally:
            await pub.close()
        assert 'CONFIG"]["prefix"]' in str(raised.value) and "RELAY_REDIS_PREFIX" in str(raised.value)


@pytest.mark.integration
async def test_a_direct_send_to_a_pod_that_is_gone_reaches_nobody_and_says_so(
    redis_server: RedisServer, redis_prefix: str, rules_file: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with two_pods(redis_server.url, redis_prefix, rules_file):
        pub = publisher(redis_server.url, redis_prefix)
        try:
            assert await pub.channel("gone.abc", FRAMES[0]) == 0
        finally:
            await pub.close()
    assert "reached no relay pod" in caplog.text and "'gone'" in caplog.text


@pytest.mark.integration
def test_each_event_loop_gets_its_own_client_closed_with_its_loop(
    dedicated_redis: RedisServer, redis_prefix: str
) -> None:
    """As async_to_sync does from plain sync code: a new loop in a new thread per call."""
    dedicated_redis.call("SET", wire.rules_key(redis_prefix), '{"group":[]}')  # as a pod would
    pub = publisher(dedicated_redis.url, redis_prefix)
    errors: list[BaseException] = []

    def others() -> int:  # connections other than the one asking
        return sum(
            "cmd=client|list" not in line for line in dedicated_redis.call("CLIENT", "LIST").splitlines()
        )

    async def burst() -> None:
        for n in range(5):
            await pub.group("room", json.dumps({"message": n}))
        assert others() == 1  # this loop's one connection, reused

    def in_a_thread() -> None:
        try:
            asyncio.run(burst())
        except BaseException as exc:
            errors.append(exc)

    for _ in range(3):
        thread = threading.Thread(target=in_a_thread)
        thread.start()
        thread.join(10)
        assert not errors, errors
        wait_until(lambda: others() == 0, 5, "the closed loop's connection to go")
    assert not pub._links


def _closed_port() -> int:
    return free_port()  # nothing listens there

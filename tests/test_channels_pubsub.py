"""Apps on Django Channels' RedisPubSubChannelLayer need no change at all: with
RELAY_CHANNELS_PUBSUB_URLS the pods listen on that layer's group channels, on its hosts, with its
prefix and its sharding, and its `group_send` reaches relay members as the app's consumer would
have sent it.

The publisher is a real process of the load venv (.venv-load: Django, channels, channels-redis)
calling `group_send` through `RedisPubSubChannelLayer` on two Redis hosts, as a Django app does.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import textwrap
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from service.broker.channels_pubsub import group_channel, shard
from tests.helpers import ROOT, join, metric, running_pod, ws_url
from tests.redis_servers import RedisServer, start_redis

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("channels-pubsub")]

LOAD_PYTHON = Path(ROOT, ".venv-load", "bin", "python")

PUBLISHER = textwrap.dedent(
    """
    import json, sys
    import django
    from django.conf import settings

    hosts, prefix, sends = sys.argv[1].split(","), sys.argv[2], json.loads(sys.argv[3])
    settings.configure(CHANNEL_LAYERS={"default": {
        "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
        "CONFIG": {"hosts": hosts, "prefix": prefix},
    }})
    django.setup()
    from asgiref.sync import async_to_sync
    from channels.layers import get_channel_layer

    layer = get_channel_layer()
    for group, event in sends:
        async_to_sync(layer.group_send)(group, event)
    """
)


def group_send(
    hosts: list[RedisServer], sends: Sequence[tuple[str, Mapping[str, Any]]], prefix: str = "asgi"
) -> None:
    """`group_send` each (group, event) from a Django process on RedisPubSubChannelLayer."""
    assert LOAD_PYTHON.exists(), "no .venv-load: `make load-venv` makes it (make test does)"
    urls = ",".join(h.url for h in hosts)
    subprocess.run(
        [str(LOAD_PYTHON), "-c", PUBLISHER, urls, prefix, json.dumps(sends)], check=True, timeout=60, cwd=ROOT
    )


@pytest.fixture
def app_hosts(tmp_path: Path) -> Iterator[list[RedisServer]]:
    """The Django app's two Redis hosts (its layer shards groups over them)."""
    hosts = [start_redis(tmp_path / f"app{n}") for n in range(2)]
    yield hosts
    for host in hosts:
        host.kill()


def channels_redis_shards(names: list[str], hosts: int) -> list[int]:
    """Where channels_redis itself puts each group channel (asked of the library, not of relay)."""
    program = (
        "import json, sys; from channels_redis.utils import _consistent_hash; "
        "print(json.dumps([_consistent_hash(n, int(sys.argv[2])) for n in json.loads(sys.argv[1])]))"
    )
    out = subprocess.run(
        [str(LOAD_PYTHON), "-c", program, json.dumps(names), str(hosts)],
        check=True,
        capture_output=True,
        text=True,
    )
    shards: list[int] = json.loads(out.stdout)
    return shards


def groups_on_each_shard(count: int, hosts: int = 2) -> list[str]:
    """Group names, `count` per shard, as channels_redis places them."""
    names = [f"room{n}" for n in range(40)]
    placed = channels_redis_shards([group_channel("asgi", name) for name in names], hosts)
    assert placed == [shard(group_channel("asgi", name), hosts) for name in names]  # relay agrees
    found: dict[int, list[str]] = {n: [] for n in range(hosts)}
    for name, where in zip(names, placed, strict=True):
        if len(found[where]) < count:
            found[where].append(name)
    assert all(len(v) == count for v in found.values())
    return [g for groups in found.values() for g in groups]


async def test_an_apps_pubsub_group_send_reaches_relay_members_on_every_shard(
    redis_server: RedisServer, app_hosts: list[RedisServer], redis_prefix: str
) -> None:
    groups = groups_on_each_shard(2)
    urls = ",".join(h.url for h in app_hosts)
    async with (
        running_pod(broker_url=redis_server.url, redis_prefix=redis_prefix, channels_pubsub_urls=urls) as a,
        running_pod(broker_url=redis_server.url, redis_prefix=redis_prefix, channels_pubsub_urls=urls) as b,
    ):
        members = {g: [await join(ws_url(pod, "/" + g)) for pod in (a, b)] for g in groups}
        for host in app_hosts:  # each pod listens where the app's layer publishes each group
            listened = set(host.call("PUBSUB", "CHANNELS", "asgi__group__*"))
            expected = {
                group_channel("asgi", g)
                for g in groups
                if app_hosts[shard(group_channel("asgi", g), 2)] is host
            }
            assert listened == expected and len(expected) == 2
        received = metric("relay_channels_pubsub_messages_total")
        sends = [
            (g, {"type": "group.message", "message": {"n": n, "text": f"héllo {g}"}})
            for n, g in enumerate(groups)
        ]
        group_send(app_hosts, sends)
        for n, group in enumerate(groups):
            for member in members[group]:
                raw = await asyncio.wait_for(member.ws.recv(), 5)
                # As the app's consumer would have sent it: send_json is json.dumps with defaults.
                assert raw == json.dumps({"message": {"n": n, "text": f"héllo {group}"}})
        assert metric("relay_channels_pubsub_messages_total") == received + 2 * len(groups)


async def test_events_relay_cannot_turn_into_a_frame_are_counted_not_delivered(
    redis_server: RedisServer, app_hosts: list[RedisServer], redis_prefix: str
) -> None:
    urls = ",".join(h.url for h in app_hosts)
    async with running_pod(
        broker_url=redis_server.url, redis_prefix=redis_prefix, channels_pubsub_urls=urls
    ) as pod:
        member = await join(ws_url(pod, "/lobby"))
        undecodable = metric("relay_broker_lost_total", reason="undecodable")
        group_send(app_hosts, [("lobby", {"type": "user.kicked", "user": 7})])  # no "message"
        group_send(app_hosts, [("lobby", {"type": "group.message", "message": "after"})])
        assert json.loads(await asyncio.wait_for(member.ws.recv(), 5)) == {
            "message": "after"
        }  # nothing first
        assert metric("relay_broker_lost_total", reason="undecodable") == undecodable + 1


async def test_the_apps_redis_being_down_does_not_stop_relay(
    redis_server: RedisServer, app_hosts: list[RedisServer], redis_prefix: str
) -> None:
    """The app's layer is extra traffic: a pod whose Channels hosts are down stays ready and serves
    its own groups; once they are back it hears them again."""
    for host in app_hosts:
        host.kill()
    urls = ",".join(h.url for h in app_hosts)
    async with running_pod(
        broker_url=redis_server.url, redis_prefix=redis_prefix, channels_pubsub_urls=urls
    ) as pod:
        assert pod.pod.readiness()["broker"] is True and all(pod.pod.liveness().values())
        member = await join(ws_url(pod, "/lobby"))
        sent = await member.publish("lobby", own="traffic")
        assert await member.next() == {"message": sent}
        for host in app_hosts:
            host.start()
        for _ in range(100):  # until the listeners are back and subscribed again (at most once)
            group_send(app_hosts, [("lobby", {"type": "group.message", "message": "from the app"})])
            try:
                raw = await asyncio.wait_for(member.ws.recv(), 0.5)
            except TimeoutError:
                continue
            assert json.loads(raw) == {"message": "from the app"}
            break
        else:
            raise AssertionError("the app's group_send never reached the pod after its Redis came back")

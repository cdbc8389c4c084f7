"""A real Django project migrated to relay with only CHANNEL_LAYERS changed, against itself on Channels.

tests/djangoproject is the original app (loadtest/peers/refapp's consumer and routing, as written)
plus server code that publishes: views (sync and async) and a management command (sync, and async
code under asyncio.run). It runs twice under daphne in .venv-load, in the same test: on
channels_redis, where Channels' own WebSocket clients connect to it, and on relay_channels, where
seed clients connect to two relay pods instead. Every publish goes through both, and the frames the
two kinds of client receive are compared byte for byte. Bad input goes through a harness
(tests/djangoproject/layer_calls.py) that calls the layer as app code does, from sync and async code.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from loadtest.servers import free_port, wait_port
from tests.helpers import ROOT, Client, PodProcess, join, scrape, start_pod_process, wait_until
from tests.redis_servers import RedisServer, start_redis

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("relay-channels-django")]

LOAD_BIN = Path(ROOT, ".venv-load", "bin")
PROJECT = Path(ROOT, "tests", "djangoproject")
PREFIX = "migrated"
RULES = '[[group]]\nmatch = "hist.*"\nhistory = 10\nttl = 60\n'
RELAY_LAYER = "relay_channels.RelayChannelLayer"

# What the app publishes: everything JSON can carry through both layers (channels_redis's msgpack
# cannot carry integers past 64 bits, so none here), in the shapes that catch re-encoding.
MESSAGES: list[Any] = [
    {"task": "send_message_to_group", "group_name": "room", "text": "hello"},
    {"b": 1, "a": [1, 2.5, -0.0, 1e-07, 1e300, None, True, False], "z": {"y": {}, "x": []}},
    {"text": 'quote " backslash \\ slash / tab \t newline \n nul \u0000 </script>'},
    {"unicode": "r\u00e9sum\u00e9 \u2603 \U0001f600 \u00ff \u4e2d\u6587", "nan": float("nan")},
    "a bare string",
    [1, "two", {"three": 3}],
    12345678901234,
    None,
]


@dataclass
class App:
    """The project under daphne with one layer or the other."""

    layer: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class World:
    redis: RedisServer
    pods: list[PodProcess]
    relay: App
    channels: App
    tmp: Path


def _django_env(layer: str, redis_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "DJANGO"))}
    env.update(
        DJANGO_SETTINGS_MODULE="chatproject.settings",
        PYTHONPATH=f"{PROJECT}{os.pathsep}{Path(ROOT, 'loadtest', 'peers')}",
        CHAT_LAYER=layer,
        CHAT_REDIS_URL=redis_url,
        CHAT_RELAY_PREFIX=PREFIX,
        **extra,
    )
    return env


def _daphne(layer: str, redis_url: str, tmp: Path) -> App:
    port, log = free_port(), tmp / f"daphne-{layer}.log"
    argv = [str(LOAD_BIN / "daphne"), "-b", "127.0.0.1", "-p", str(port), "chatproject.asgi:application"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=PROJECT, env=_django_env(layer, redis_url), stdout=out, stderr=out)
    return App(layer, proc, port, log)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    if not (LOAD_BIN / "daphne").exists():
        pytest.fail("the load venv is missing: `make load-venv` builds .venv-load (Django, Channels, daphne)")
    tmp = tmp_path_factory.mktemp("relay-channels-django")
    redis = start_redis(tmp / "redis")
    rules = tmp / "groups.toml"
    rules.write_text(RULES)
    apps = [_daphne("relay", redis.url, tmp), _daphne("channels", redis.url, tmp)]  # start while pods do
    pods: list[PodProcess] = []
    try:
        for name in ("pod-a", "pod-b"):
            env = {
                "RELAY_BROKER_URL": redis.url,
                "RELAY_POD_ID": name,
                "RELAY_REDIS_PREFIX": PREFIX,
                "RELAY_GROUP_RULES_FILE": str(rules),
                "RELAY_PUBLISH_RATE": "0",
                "RELAY_DRAIN_DELAY": "0",
                "RELAY_LOG_LEVEL": "WARNING",
            }
            pods.append(start_pod_process(env, log_file=tmp / f"{name}.log"))
            assert pods[-1].proc.poll() is None, (tmp / f"{name}.log").read_text()
        for app in apps:
            try:
                wait_port(app.port, app.proc)
            except RuntimeError as exc:
                raise RuntimeError(f"{exc}\n{app.log.read_text()[-3000:]}") from None
        wait_until(lambda: redis.call("EXISTS", f"{PREFIX}:rules") == 1, 10, "the pods' rules in Redis")
        yield World(redis, pods, apps[0], apps[1], tmp)
    finally:
        for app in apps:
            app.proc.terminate()
            app.proc.wait(10)
        for pod in pods:
            pod.terminate()
            pod.wait()
        redis.kill()
        shutil.rmtree(redis.directory, ignore_errors=True)


# --- Helpers -------------------------------------------------------------------------------------


async def text(client: Client, timeout: float = 5.0) -> str:
    frame = await asyncio.wait_for(client.ws.recv(), timeout)
    assert isinstance(frame, str)
    return frame


async def post(app: App, path: str, body: dict[str, Any]) -> None:
    async with httpx.AsyncClient() as http:
        response = await http.post(app.http + path, content=json.dumps(body), timeout=10)
    assert response.status_code == 204, (
        f"{app.layer} {path}: {response.status_code}\n{app.log.read_text()[-3000:]}"
    )


async def command(app: App, world: World, group: str, message: Any, *extra: str) -> None:
    argv = [
        str(LOAD_BIN / "python"),
        "manage.py",
        "send_message_to_group",
        group,
        json.dumps(message),
        *extra,
    ]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=PROJECT,
        env=_django_env(app.layer, world.redis.url),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, f"{app.layer}: {out.decode()[-3000:]}"


async def relay_client(world: World, pod: int, path: str) -> Client:
    return await join(f"ws://127.0.0.1:{world.pods[pod].port}{path}")


async def channels_client(world: World, path: str) -> Client:
    return await join(f"ws://127.0.0.1:{world.channels.port}{path}")


def pod_metric(world: World, pod: int, name: str, **labels: str) -> float:
    return scrape(world.pods[pod].internal_port, name, **labels)


async def group_changed(world: World, pod: int, outcome: str, before: float) -> None:
    """Until the pod has carried out a group change from Django (it happens after the view returns)."""
    await asyncio.to_thread(
        wait_until,
        lambda: pod_metric(world, pod, "relay_control_commands_total", outcome=outcome) > before,
        5,
        f"pod {pod} to report a group change ({outcome})",
    )


def call_layer(world: World, calls: list[dict[str, Any]], layers: dict[str, Any] | None = None) -> list[Any]:
    """The results of `calls` made by app code in .venv-load (tests/djangoproject/layer_calls.py)."""
    config = {"url": world.redis.url, "prefix": PREFIX, "rules_cache_seconds": 0}
    spec = {"layers": layers or {"default": {"BACKEND": RELAY_LAYER, "CONFIG": config}}, "calls": calls}
    run = subprocess.run(
        [str(LOAD_BIN / "python"), "layer_calls.py"],
        cwd=PROJECT,
        env=_django_env("relay", world.redis.url),
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results: list[Any] = json.loads(run.stdout)
    return results


# --- The migration: the same app, the same frames ----------------------------------------------


async def test_every_publish_path_delivers_to_relay_clients_what_channels_clients_receive(
    world: World,
) -> None:
    relay = [await relay_client(world, 0, "/room"), await relay_client(world, 1, "/room")]
    chans = [await channels_client(world, "/room"), await channels_client(world, "/room")]
    everyone = relay + chans
    try:

        async def both_then_compare(publish: Any, message: Any) -> str:
            await asyncio.gather(publish(world.relay, message), publish(world.channels, message))
            frames = [await text(c) for c in everyone]
            assert frames[:2] == frames[2:], f"relay {frames[:2]!r} != Channels {frames[2:]!r}"
            assert len(set(frames)) == 1
            return frames[0]

        async def view(app: App, message: Any) -> None:
            await post(app, "/publish", {"group": "room", "message": message})

        async def async_view(app: App, message: Any) -> None:
            await post(app, "/apublish", {"group": "room", "message": message})

        async def sync_command(app: App, message: Any) -> None:
            await command(app, world, "room", message)

        async def async_command(app: App, message: Any) -> None:
            await command(app, world, "room", message, "--async")

        for message in MESSAGES:
            frame = await both_then_compare(view, message)
            assert frame == json.dumps({"message": message})  # and it is what send_json makes
        for publish in (async_view, sync_command, async_command):
            await both_then_compare(publish, MESSAGES[3])
    finally:
        await asyncio.gather(*(c.ws.close() for c in everyone))


async def test_send_group_add_and_group_discard_by_the_welcome_frames_channel_id(world: World) -> None:
    r1, r2 = await relay_client(world, 0, "/lobby"), await relay_client(world, 1, "/lobby")
    c1, c2 = await channels_client(world, "/lobby"), await channels_client(world, "/lobby")
    try:
        message = {"direct": "\u2603", "n": [1.5, None]}
        await post(world.relay, "/send", {"channel_id": r2.channel_id, "message": message})
        await post(world.channels, "/send", {"channel_id": c2.channel_id, "message": message})
        assert await text(r2) == await text(c2) == json.dumps({"message": message})

        async def marker(n: int) -> None:  # on lobby: whatever should not have arrived would be before it
            body = {"group": "lobby", "message": {"marker": n}}
            await asyncio.gather(post(world.relay, "/publish", body), post(world.channels, "/publish", body))
            for client in (r1, r2, c1, c2):
                assert await text(client) == json.dumps({"message": {"marker": n}})

        await marker(1)  # the direct send reached r2 and c2 alone

        joined = pod_metric(world, 0, "relay_control_commands_total", outcome="joined")
        await post(world.relay, "/join", {"group": "side", "channel_id": r1.channel_id})
        await post(world.channels, "/join", {"group": "side", "channel_id": c1.channel_id})
        await group_changed(world, 0, "joined", joined)
        side = {"group_name": "side", "text": "only the joined"}
        await post(world.relay, "/publish", {"group": "side", "message": side})
        await post(world.channels, "/publish", {"group": "side", "message": side})
        assert await text(r1) == await text(c1) == json.dumps({"message": side})
        await marker(2)

        left = pod_metric(world, 0, "relay_control_commands_total", outcome="left")
        await post(world.relay, "/leave", {"group": "side", "channel_id": r1.channel_id})
        await post(world.channels, "/leave", {"group": "side", "channel_id": c1.channel_id})
        await group_changed(world, 0, "left", left)
        await post(world.relay, "/publish", {"group": "side", "message": side})
        await post(world.channels, "/publish", {"group": "side", "message": side})
        await marker(3)  # r1 and c1 left: nothing before the marker
    finally:
        await asyncio.gather(*(c.ws.close() for c in (r1, r2, c1, c2)))


async def test_a_history_group_gets_positions_and_the_same_frames(world: World) -> None:
    member = await relay_client(world, 1, "/hist.a")
    v1 = await join(f"ws://127.0.0.1:{world.pods[0].port}/hist.a", subprotocols=["relay.v1"])
    chan = await channels_client(world, "/hist.a")
    try:
        for n in (1, 2):
            message = {"n": n, "text": "kept"}
            await post(world.relay, "/publish", {"group": "hist.a", "message": message})
            await post(world.channels, "/publish", {"group": "hist.a", "message": message})
            assert await text(member) == await text(chan) == json.dumps({"message": message})
            positioned = json.loads(await text(v1))
            assert (positioned["offset"], positioned["message"]) == (n, message)
        stream = f"{PREFIX}:h:{{hist.a}}"
        assert world.redis.call("XLEN", stream) == 2  # through relay's functions library, stored once each
    finally:
        await asyncio.gather(*(c.ws.close() for c in (member, v1, chan)))


async def test_other_event_types_map_to_frames_as_the_settings_say(world: World) -> None:
    member = await relay_client(world, 0, "/notices")
    try:
        await post(
            world.relay, "/event", {"group": "notices", "event": {"type": "chat.notice", "text": "hi"}}
        )
        assert await text(member) == json.dumps({"notice": "hi", "from": "django"})
    finally:
        await member.ws.close()


async def test_a_websocket_that_still_reaches_django_fails_saying_why(world: World) -> None:
    """Consumers served by Django need a channel name; relay_channels cannot make one."""
    with pytest.raises((websockets.InvalidStatus, websockets.ConnectionClosed)):
        async with websockets.connect(f"ws://127.0.0.1:{world.relay.port}/room", open_timeout=5) as ws:
            await asyncio.wait_for(ws.recv(), 5)
    await asyncio.to_thread(
        wait_until, lambda: "relay_channels cannot make channels" in world.relay.log.read_text(), 5, "the log"
    )


# --- Bad input: a clear error, nothing sent ------------------------------------------------------


def _group_send(group: Any, message: Any, sync: bool = True, **extra: Any) -> dict[str, Any]:
    return {"call": "group_send", "args": [group, message], "sync": sync, **extra}


def _event(message: Any) -> dict[str, Any]:
    return {"type": "group.message", "message": message}


def test_bad_group_names_events_and_channels_are_refused_from_sync_and_async_code(world: World) -> None:
    relay_id = "pod-a.AbCdEf123456"
    calls = [
        *(
            _group_send(g, _event(1), sync)
            for g in ("", "a b", "x" * 100, "caf\u00e9", "grp\n", "\u0661")
            for sync in (True, False)
        ),
        _group_send(5, _event(1)),
        _group_send("room", _event({"$datetime": "2026-01-01T00:00:00"})),
        _group_send("room", _event({"$set": [1]}), False),
        _group_send("room", _event({"$bytes": "raw"})),
        _group_send("room", {"$circular": True}),
        _group_send("room", ["not", "a", "dict"]),
        _group_send("room", {"message": "no type"}),
        _group_send("room", {"type": "other.kind"}),
        _group_send("room", _event(1), kwargs={"idempotency_key": "x" * 65}),
        {"call": "send", "args": ["specific.abc!def", _event(1)]},
        {"call": "send", "args": ["nodot", _event(1)]},
        {"call": "group_add", "args": ["room", "specific.abc!def"]},
        {"call": "group_discard", "args": ["room", "not a channel"]},
        {"call": "group_add", "args": ["bad group", relay_id]},
        {"call": "receive", "args": ["specific.abc!def"]},
        {"call": "new_channel"},
        {"call": "flush", "sync": False},
    ]
    results = call_layer(world, calls)
    names = results[:12]
    assert all(r.get("error") == "builtins.TypeError" and "is not valid" in r["message"] for r in names), (
        names
    )
    assert results[12]["error"] == "builtins.TypeError"
    datetime_, set_, bytes_, circular = results[13:17]
    for result in (datetime_, set_, bytes_):
        assert result["error"] == "builtins.TypeError", result
        assert "not JSON serializable" in result["message"]
        assert 'CHANNEL_LAYERS["default"]["CONFIG"]["frames"]["group.message"]' in result["message"]
    assert circular["error"] == "builtins.ValueError" and "Circular reference" in circular["message"]
    assert results[17]["error"] == "builtins.TypeError" and "must be a dict" in results[17]["message"]
    assert results[18]["error"] == "builtins.ValueError" and '"type"' in results[18]["message"]
    no_message = results[19]
    assert no_message["error"] == "builtins.ValueError"
    assert '["frames"]["other.kind"]' in no_message["message"] and "'message'" in no_message["message"]
    assert results[20]["error"] == "builtins.ValueError" and "idempotency_key" in results[20]["message"]
    for result in results[21:25]:
        assert result["error"] == "relay_channels.errors.NotARelayChannel", result
        assert "builtins.ValueError" in result["bases"]
        assert "welcome frame" in result["message"] and "another alias" in result["message"]
    assert results[25]["error"] == "builtins.TypeError"  # the group is checked first
    receive, new_channel, flush = results[26:]
    for result in (receive, new_channel, flush):
        assert result["error"] == "relay_channels.errors.Unsupported", result
        assert "builtins.NotImplementedError" in result["bases"]
    assert "never to Django" in receive["message"] and "another alias" in receive["message"]
    assert "welcome frame" in new_channel["message"]
    assert "nothing to flush" in flush["message"]


def test_oversized_frames_raise_message_too_large_at_the_configured_limit(world: World) -> None:
    config = {"url": world.redis.url, "prefix": PREFIX, "max_frame_bytes": 1000}
    layers = {
        "default": {"BACKEND": RELAY_LAYER, "CONFIG": {"url": world.redis.url, "prefix": PREFIX}},
        "small": {"BACKEND": RELAY_LAYER, "CONFIG": config},
    }
    overhead = len(json.dumps({"message": ""}))  # the frame around the text
    calls = [
        _group_send("room", _event({"$text": 1000 - overhead}), alias="small"),  # exactly 1000 bytes
        _group_send("room", _event({"$text": 1001 - overhead}), alias="small"),
        _group_send("room", _event({"$text": 65536 - overhead})),  # the default limit, exactly
        _group_send("room", _event({"$text": 65537 - overhead}), False),
        {"call": "send", "args": ["pod-a.AbCdEf123456", _event({"$text": 70000})]},
    ]
    ok_small, big_small, ok_default, big_default, big_direct = call_layer(world, calls, layers)
    assert ok_small == ok_default == {"ok": "None"}
    for result in (big_small, big_default, big_direct):
        assert result["error"] == "channels.exceptions.MessageTooLarge", result
    assert 'CHANNEL_LAYERS["small"]["CONFIG"]["max_frame_bytes"] = 1000' in big_small["message"]
    assert "1001 bytes" in big_small["message"]
    assert 'CHANNEL_LAYERS["default"]["CONFIG"]["max_frame_bytes"] = 65536' in big_default["message"]


def test_unreachable_redis_wrong_prefix_and_bad_settings_name_what_to_check(world: World) -> None:
    closed = f"redis://:s3cret@127.0.0.1:{free_port()}/0"
    layers = {
        "down": {"BACKEND": RELAY_LAYER, "CONFIG": {"url": closed}},
        "down_hosts": {"BACKEND": RELAY_LAYER, "CONFIG": {"hosts": [("127.0.0.1", free_port())]}},
        "elsewhere": {"BACKEND": RELAY_LAYER, "CONFIG": {"url": world.redis.url, "prefix": "asgi"}},
        "leftover": {"BACKEND": RELAY_LAYER, "CONFIG": {"hosts": [world.redis.url], "capacity": 1500}},
        "bad_url": {"BACKEND": RELAY_LAYER, "CONFIG": {"url": "redis://a,b:1"}},
    }
    calls = [
        _group_send("room", _event(1), alias="down"),
        _group_send("room", _event(1), False, alias="down"),
        {"call": "group_add", "args": ["room", "pod-a.AbCdEf123456"], "alias": "down_hosts"},
        _group_send("room", _event(1), alias="elsewhere"),
        _group_send("room", _event(1), alias="leftover"),
        _group_send("room", _event(1), alias="bad_url"),
    ]
    down_sync, down_async, down_hosts, elsewhere, leftover, bad_url = call_layer(world, calls, layers)
    for result in (down_sync, down_async):
        assert result["error"] == "relay_channels.errors.RelayUnavailable", result
        assert "builtins.ConnectionError" in result["bases"]
        assert 'CHANNEL_LAYERS["down"]["CONFIG"]["url"]' in result["message"]
        assert "RELAY_BROKER_URL" in result["message"] and "s3cret" not in result["message"]
    assert 'CHANNEL_LAYERS["down_hosts"]["CONFIG"]["hosts"]' in down_hosts["message"]
    assert elsewhere["error"] == "relay_channels.errors.RelayUnavailable"
    assert 'CHANNEL_LAYERS["elsewhere"]["CONFIG"]["prefix"]' in elsewhere["message"]
    assert "RELAY_REDIS_PREFIX" in elsewhere["message"]
    assert leftover["error"] == "django.core.exceptions.ImproperlyConfigured"
    assert 'CHANNEL_LAYERS["leftover"]["CONFIG"]["capacity"]' in leftover["message"]
    assert bad_url["error"] == "django.core.exceptions.ImproperlyConfigured"
    assert (
        'CHANNEL_LAYERS["bad_url"]["CONFIG"]["url"]' in bad_url["message"]
        and "one host" in bad_url["message"]
    )


def test_a_repeated_idempotency_key_is_stored_once_and_publish_says_so(world: World) -> None:
    calls: list[dict[str, Any]] = [
        {"call": "publish", "args": ["hist.keyed", _event("once")], "kwargs": {"idempotency_key": "k-1"}},
        {"call": "publish", "args": ["hist.keyed", _event("once")], "kwargs": {"idempotency_key": "k-1"}},
        {"call": "publish", "args": ["room", _event("plain")], "sync": False},
    ]
    first, again, plain = call_layer(world, calls)
    assert "offset=1, duplicate=False" in first["ok"] and "offset=1, duplicate=True" in again["ok"]
    assert "epoch=''" in plain["ok"]  # no history: no position
    assert world.redis.call("XLEN", f"{PREFIX}:h:{{hist.keyed}}") == 1


def test_the_group_send_cost_script_measures_every_layer_both_ways(tmp_path: Path) -> None:
    out = tmp_path / "cost.json"
    argv = ["-m", "loadtest.group_send_cost", "--rounds", "1", "--async-calls", "20", "--sync-calls", "3"]
    run = subprocess.run(
        [str(LOAD_BIN / "python"), *argv, "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {(row["layer"], row["mode"]) for row in report["summary"]}
    layers = {layer for layer, _ in rows}
    assert len(layers) == 6 and rows == {(layer, mode) for layer in layers for mode in ("async", "sync")}
    assert all(row["us_wall_per_call_median"] > 0 for row in report["summary"])
    assert report["versions"]["relay-channels"] and report["git_commit"]

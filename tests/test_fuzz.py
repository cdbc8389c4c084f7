"""Random text and binary frames thrown at a real pod: it must keep relaying for everyone."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import PodProcess, join, start_pod_process, ws_url

pytestmark = pytest.mark.integration

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)
tasks = st.sampled_from(["send_message_to_group", "send_message_to_channel", "join", "", "x" * 50])
names = st.one_of(
    st.text(max_size=120), st.sampled_from(["g", "other", "fuzz.pod.x", "a/b", "g\n"]), json_values
)
commands = st.fixed_dictionaries(
    {"task": tasks},
    optional={"group_name": names, "channel_id": names, "payload": json_values},
).map(json.dumps)
frames = st.lists(
    st.one_of(st.text(max_size=200), st.binary(max_size=200), commands, json_values.map(json.dumps)),
    min_size=1,
    max_size=25,
)


@pytest.fixture(scope="module")
def pod() -> Iterator[PodProcess]:
    proc = start_pod_process({"RELAY_PUBLISH_RATE": "0", "RELAY_POD_ID": "fuzz"})
    yield proc
    proc.terminate()
    assert proc.wait() == 0
    errors = [line for line in proc.logs() if line.get("level") in ("error", "critical")]
    assert errors == [], errors


async def _round(port: int, batch: list[Any]) -> None:
    fuzzer = await join(ws_url(port, "/g"))
    watchers = [await join(ws_url(port, "/g")) for _ in range(2)]
    for frame in batch:
        await fuzzer.ws.send(frame)
    marker = str(uuid.uuid4())
    await watchers[0].publish("g", marker=marker)
    for watcher in watchers:  # fuzz frames that were valid publishes may arrive first
        while (await watcher.next())["message"].get("marker") != marker:
            pass
    for client in (fuzzer, *watchers):
        await client.ws.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=frames)
def test_random_frames_never_break_the_pod_for_anyone(pod: PodProcess, batch: list[Any]) -> None:
    asyncio.run(_round(pod.port, batch))
    assert pod.proc.poll() is None
    assert httpx.get(f"http://127.0.0.1:{pod.internal_port}/healthz", timeout=5).status_code == 200

"""Rate limits slow clients down instead of dropping them (RELAY_RATE_LIMIT_ACTION=delay, the default):
an over-rate frame waits for its token while relay stops reading the socket, so TCP pushes back on
the client. Every frame counts, ignored ones too. `reject` keeps the old answers (tests/test_endpoint.py,
tests/test_v1.py)."""

from __future__ import annotations

import asyncio
import time

import pytest

from service.client import RelayClient, RelayError
from tests.helpers import join, metric, running_pod, ws_url

pytestmark = pytest.mark.integration


async def test_a_seed_publisher_at_250_a_second_for_10_seconds_loses_nothing_on_default_settings() -> None:
    """The original app had no limit: a device publishing 250 messages a second on one socket
    worked there, so on relay's defaults (100 a second per connection, bursts of 200) it is slowed,
    never disconnected, and nothing it sent is lost."""
    rate, seconds = 250, 10
    count = rate * seconds
    async with running_pod() as pod:  # default limits: the subject of this test
        settings = pod.settings
        device = await join(ws_url(pod, "/device-7"))  # publishes to a group it has not joined
        dashboard = await join(ws_url(pod, "/telemetry"))
        delayed = metric("relay_frames_delayed_total")

        async def publish() -> None:
            started = time.monotonic()
            for n in range(count):
                await device.publish("telemetry", n=n)
                ahead = started + (n + 1) / rate - time.monotonic()
                if ahead > 0:
                    await asyncio.sleep(ahead)  # pacing the device at its own rate

        started = time.monotonic()
        sender = asyncio.create_task(publish())
        received = [(await dashboard.next(10))["message"]["n"] for _ in range(count)]
        took = time.monotonic() - started
        await sender
        assert received == list(range(count))  # everything, in order, once
        # Slowed, not merely passed: the budget allows the burst, then its rate.
        assert took >= (count - settings.publish_burst) / settings.publish_rate * 0.95
        assert metric("relay_frames_delayed_total") > delayed
        sent = await device.publish("telemetry", still="connected")  # the device was never cut off
        assert await dashboard.next() == {"message": sent}
        await device.ws.close()
        await dashboard.ws.close()


async def test_a_v1_client_over_its_rate_gets_every_ack_and_loses_nothing() -> None:
    async with running_pod(publish_rate=50, publish_burst=5) as pod:
        client = await RelayClient.connect(ws_url(pod, "/g"))
        watcher = await join(ws_url(pod, "/g"))
        await asyncio.gather(*(client.publish("g", {"n": n}) for n in range(30)))  # every one acked
        received = [(await watcher.next())["message"]["n"] for _ in range(30)]
        assert sorted(received) == list(range(30))
        await client.close()


async def test_ignored_frames_spend_the_budget_too() -> None:
    async with running_pod(publish_rate=1, publish_burst=3, rate_limit_action="reject") as pod:
        junk = await join(ws_url(pod, "/g"))
        for _ in range(4):
            await junk.ws.send("not json")  # ignored, but not free: the fourth is over the budget
        assert await junk.close_code() == 4029


async def test_joins_and_leaves_spend_the_budget_like_any_frame() -> None:
    """A v1 client that joins and leaves faster than its budget allows is slowed (every request
    answered, none lost), and with `reject` told `rate_limited`: group changes are not free."""
    async with running_pod(publish_rate=10, publish_burst=2) as pod:
        client = await RelayClient.connect(ws_url(pod, "/g"))
        delayed = metric("relay_frames_delayed_total")
        started = time.monotonic()
        for n in range(6):
            await client.join(f"room{n}")
            await client.leave(f"room{n}")
        assert time.monotonic() - started >= (12 - 2) / 10 * 0.95  # the burst, then the rate
        assert metric("relay_frames_delayed_total") >= delayed + 10
        await client.close()
    async with running_pod(publish_rate=1, publish_burst=2, rate_limit_action="reject") as pod:
        client = await RelayClient.connect(ws_url(pod, "/g"))
        await client.join("a")
        await client.leave("a")
        with pytest.raises(RelayError) as refused:
            await client.join("b")
        assert refused.value.code == "rate_limited"
        await client.close()


async def test_the_pod_budget_counts_every_frame_of_every_socket() -> None:
    async with running_pod(pod_publish_rate=1, rate_limit_action="reject") as pod:
        # bursts of twice the rate: two frames from anyone, then the pod is over its budget
        a, b = await join(ws_url(pod, "/g")), await join(ws_url(pod, "/g"))
        await a.ws.send('{"task": "dance"}')
        await b.ws.send("[]")
        await b.publish("g", third=True)
        assert await b.close_code() == 4029

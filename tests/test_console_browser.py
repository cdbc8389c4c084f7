"""The console page end to end in real headless Chromium (issue 7), driven by Playwright.

The browser is the system Chromium (`make chromium` installs Debian's package); Playwright never
downloads one. These tests FAIL, not skip, when it is missing: a CI without a browser must not look
green. Two pods meet in a real redis-server (started by the tests); the browser talks to them over
real WebSockets on loopback.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from service.server import PodServer
from tests.brokers import FAST_REDIS
from tests.helpers import ROOT, running_pod
from tests.redis_servers import RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("browser")]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-quic",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = Path(ROOT, "docs", "console.png")


def keep_screenshot(shot: bytes) -> None:
    if os.environ.get("RELAY_UPDATE_SCREENSHOTS") == "1" or not SCREENSHOT.exists():
        SCREENSHOT.write_bytes(shot)


LAPTOP: dict[str, Any] = {"viewport": {"width": 1280, "height": 800}}
PHONE: dict[str, Any] = {
    "viewport": {"width": 390, "height": 844},
    "device_scale_factor": 2,
    "is_mobile": True,
    "has_touch": True,
}


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} not found: the browser tests need Debian's chromium (run `make chromium`)")
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True, timeout=30_000
        )
        try:
            yield chromium
        finally:
            await chromium.close()


async def redis_pods(
    stack: AsyncExitStack, redis: RedisServer, prefix: str, *pod_ids: str
) -> list[PodServer]:
    """Pods that share nothing but one Redis."""
    return [
        await stack.enter_async_context(
            running_pod(broker_url=redis.url + "/0", redis_prefix=prefix, pod_id=pod_id, **FAST_REDIS)
        )
        for pod_id in pod_ids
    ]


class Console:
    """One browser tab on a pod's console page, with what the page logged as errors."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.errors: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(f"page error: {exc}"))
        page.on("console", lambda msg: self.errors.append(msg.text) if msg.type == "error" else None)

    @classmethod
    async def open(cls, browser: Browser, pod: PodServer, **context: Any) -> Console:
        page = await (await browser.new_context(**context)).new_page()
        console = cls(page)
        await page.goto(f"http://127.0.0.1:{pod.port}/")
        await expect(page.locator("#served-pod")).to_have_text(pod.settings.pod_id)
        await expect(page.locator("#close-codes tbody tr")).not_to_have_count(0)
        return console

    async def connect(self, group: str, token: str = "") -> str:
        await self.page.fill("#group", group)
        await self.page.fill("#token", token)
        await self.page.click("#connect")
        await expect(self.page.locator("#status")).to_have_attribute("data-state", "open")
        return await self.page.input_value("#channel-id")

    async def publish(self, group: str, fields: dict[str, Any]) -> dict[str, Any]:
        await self.page.fill("#publish-group", group)
        await self.page.fill("#publish-body", json.dumps(fields))
        await self.page.click("#publish")
        return {"task": "send_message_to_group", "group_name": group, **fields}

    async def direct(self, channel_id: str, fields: dict[str, Any]) -> dict[str, Any]:
        await self.page.fill("#direct-channel", channel_id)
        await self.page.fill("#direct-body", json.dumps(fields))
        await self.page.click("#direct")
        return {"task": "send_message_to_channel", "channel_id": channel_id, **fields}

    async def shows(self, frame: dict[str, Any]) -> None:
        """The frame appears exactly once in the log of received frames (with an arrival time)."""
        text = json.dumps({"message": frame}, separators=(",", ":"))
        row = self.page.locator('#frames li[data-kind="in"]').filter(has_text=text)
        await expect(row).to_have_count(1)
        await expect(row.locator("time")).to_have_text(_CLOCK)

    async def received(self) -> list[Any]:
        texts = await self.page.locator('#frames li[data-kind="in"] pre').all_text_contents()
        return [json.loads(t) for t in reversed(texts)]  # the log shows the newest first


_CLOCK = re.compile(r"^\d\d:\d\d:\d\d\.\d{3}$")


async def test_two_pods_one_group_both_pages_show_the_frame_and_another_group_shows_nothing(
    browser: Browser, tmp_path: Path, redis_server: RedisServer, redis_prefix: str
) -> None:
    async with AsyncExitStack() as stack:
        pod_a, pod_b = await redis_pods(stack, redis_server, redis_prefix, "pod-a", "pod-b")
        alice = await Console.open(browser, pod_a, **LAPTOP)
        bob = await Console.open(browser, pod_b, **LAPTOP)
        carol = await Console.open(browser, pod_b, **PHONE)

        alice_id = await alice.connect("room")
        bob_id = await bob.connect("room")
        carol_id = await carol.connect("elsewhere")
        assert alice_id.startswith("pod-a.")
        assert bob_id.startswith("pod-b.")
        await expect(alice.page.locator("#socket-pod")).to_have_text("pod-a")
        await expect(carol.page.locator("#socket-pod")).to_have_text("pod-b")

        hello = await alice.publish("room", {"text": "hello from a browser on pod-a"})
        await alice.shows(hello)
        await bob.shows(hello)
        reply = await bob.publish("room", {"text": "hi back from pod-b", "n": 2})
        await alice.shows(reply)
        await bob.shows(reply)

        # Carol's group got nothing; a direct send across pods reaches her and only her.
        note = await alice.direct(carol_id, {"text": "psst, carol"})
        await carol.shows(note)
        assert await carol.received() == [{"message": {"channel_id": carol_id}}, {"message": note}]
        assert await alice.received() == [
            {"message": {"channel_id": alice_id}},
            {"message": hello},
            {"message": reply},
        ]
        assert await bob.received() == [
            {"message": {"channel_id": bob_id}},
            {"message": hello},
            {"message": reply},
        ]
        await expect(alice.page.locator("#frame-count")).to_have_text("3 received")

        # Bad input is explained on the page and sends nothing.
        await carol.page.fill("#publish-body", "[1, 2]")
        await carol.page.click("#publish")
        await expect(carol.page.locator("#publish-error")).to_contain_text("must be a JSON object")
        await expect(carol.page.locator('#frames li[data-kind="out"]')).to_have_count(0)

        # Tidy on a phone: nothing wider than the screen.
        overflow = await carol.page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0
        await carol.page.screenshot(path=tmp_path / "console-phone.png", full_page=True)

        await alice.page.evaluate("window.scrollTo(0, 0)")  # filling the forms scrolled it
        shot = await alice.page.screenshot(path=tmp_path / "console.png")
        assert shot.startswith(b"\x89PNG") and len(shot) > 20_000  # a rendered page, not a blank one
        # docs/console.png (the README's picture) is refreshed on request, so `make test` leaves the
        # work tree clean: RELAY_UPDATE_SCREENSHOTS=1 make test.
        await asyncio.to_thread(keep_screenshot, shot)
        assert alice.errors == bob.errors == carol.errors == []


async def test_a_page_shows_the_close_code_when_its_pod_drains(browser: Browser) -> None:
    async with running_pod(pod_id="pod-drain", drain_delay=0.0, drain_window=0.2, api_keys="k") as pod:
        page = (await Console.open(browser, pod, **LAPTOP)).page
        async with page.expect_websocket() as opened:
            await Console(page).connect("room", token="s3cret tok&n")
        assert (await opened.value).url == f"ws://127.0.0.1:{pod.port}/room?token=s3cret%20tok%26n"
        assert "s3cret" not in await page.locator("#frames").inner_text()  # the log hides the token

        async with httpx.AsyncClient(timeout=5) as client:
            drained = await client.post(
                f"http://127.0.0.1:{pod.internal_port}/drain?wait=false",
                headers={"Authorization": "Bearer k"},
            )
        assert drained.status_code == 202

        last_close = page.locator("#last-close")
        await expect(last_close).to_have_attribute("data-code", "1012")
        await expect(last_close).to_contain_text("1012 Service restart: The pod is draining")
        await expect(page.locator("#status")).to_contain_text("reconnecting")
        await expect(page.locator("#channel-id")).to_have_value("")
        await expect(page.locator("#publish")).to_be_disabled()
        await page.context.close()


async def test_a_refused_group_name_shows_4500_and_does_not_reconnect(browser: Browser) -> None:
    async with running_pod(pod_id="pod-c") as pod:
        console = await Console.open(browser, pod, **LAPTOP)
        page = console.page
        await page.fill("#group", "no spaces allowed")
        await page.click("#connect")
        status = page.locator("#status")
        await expect(status).to_have_attribute("data-state", "stopped")
        await expect(status).to_contain_text("Closed with 4500 (Bad group name); not reconnecting")
        await expect(page.locator("#last-close")).to_have_attribute("data-code", "4500")
        await page.wait_for_timeout(1200)  # longer than the first backoff step (0.25-0.5 s)
        opens = page.locator('#frames li[data-kind="event"]').filter(has_text="open ws://")
        await expect(opens).to_have_count(1)
        await expect(status).to_have_attribute("data-state", "stopped")
        assert console.errors == []
        await page.context.close()

"""The console page end to end in real headless Chromium (issue 7), driven by Playwright.

The browser is the system Chromium (`make chromium` installs Debian's package); Playwright never
downloads one. These tests FAIL, not skip, when it is missing: a CI without a browser must not look
green. Two pods meet in a real redis-server (started by the tests); the browser talks to them over
real WebSockets on loopback. The page speaks protocol v1 and recovers by itself across reconnects
(issue 11): pods are restarted under it while another pod publishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, Page, WebSocketRoute, async_playwright, expect

from service.client import RelayClient
from service.server import PodServer
from tests.brokers import FAST_REDIS
from tests.helpers import ROOT, running_pod, ws_url
from tests.redis_servers import RedisServer
from tests.tokens import SECRET, hs256

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
RECONNECTED = 15_000  # ms: a page waits out its backoff (0.25 s, 0.5 s, ...) while its pod restarts

# Groups that keep history (service/rules.py): `room*` plenty, `tiny*` only the last two messages.
RULES = """
[[group]]
match = "room*"
history = 100
ttl = 60

[[group]]
match = "tiny*"
history = 2
ttl = 60
"""


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


@pytest.fixture
def rules(tmp_path: Path) -> str:
    path = tmp_path / "groups.toml"
    path.write_text(RULES)
    return str(path)


def redis_settings(redis: RedisServer, prefix: str, pod_id: str, **overrides: Any) -> dict[str, Any]:
    return {
        "broker_url": redis.url + "/0",
        "redis_prefix": prefix,
        "pod_id": pod_id,
        **FAST_REDIS,
        **overrides,
    }


async def redis_pods(
    stack: AsyncExitStack, redis: RedisServer, prefix: str, *pod_ids: str, **overrides: Any
) -> list[PodServer]:
    """Pods that share nothing but one Redis."""
    return [
        await stack.enter_async_context(running_pod(**redis_settings(redis, prefix, pod_id, **overrides)))
        for pod_id in pod_ids
    ]


async def restarted(stack: AsyncExitStack, pod: PodServer) -> PodServer:
    """The same pod started again on the same public port (uvicorn has closed its sockets with 1012),
    with the same settings: a page that reconnects to its host lands on it."""
    again = PodServer(dataclasses.replace(pod.settings, port=pod.port, internal_port=0))
    await again.start()
    stack.push_async_callback(again.shutdown)
    return again


class Publisher:
    """A v1 client on another pod that publishes {"n": 1}, {"n": 2} ... and waits for each ack, so
    every message is stored in the group's history before the next is sent."""

    def __init__(self, client: RelayClient, group: str) -> None:
        self.client = client
        self.group = group
        self.sent = 0
        self.epoch = ""
        self._progress = asyncio.Condition()

    async def publish(self, count: int) -> None:
        for _ in range(count):
            position = await self.client.publish(self.group, {"n": self.sent + 1})
            assert position is not None  # the group keeps history: the ack says where it was stored
            async with self._progress:
                self.epoch, self.sent = position
                self._progress.notify_all()

    async def reached(self, sent: int) -> None:
        async with self._progress:
            await self._progress.wait_for(lambda: self.sent >= sent)

    async def keep_publishing(self, stop: asyncio.Event) -> None:
        """Until `stop` is set; the publish under way finishes first, so `sent` counts them all."""
        while not stop.is_set():
            await self.publish(1)
            # This paces the stream, it waits for nothing: about 50 a second keeps the page's
            # 500-row log from overflowing during a reconnect of a second or two.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.02)


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
        """Publish from the page's form; what members receive, less the `ref` the page adds."""
        await self.page.fill("#publish-group", group)
        await self.page.fill("#publish-body", json.dumps(fields))
        await self.page.click("#publish")
        return {"task": "send_message_to_group", "group_name": group, **fields}

    async def direct(self, channel_id: str, fields: dict[str, Any]) -> dict[str, Any]:
        await self.page.fill("#direct-channel", channel_id)
        await self.page.fill("#direct-body", json.dumps(fields))
        await self.page.click("#direct")
        return {"task": "send_message_to_channel", "channel_id": channel_id, **fields}

    async def shows(self, fields: dict[str, Any]) -> None:
        """A message with these (unique) fields appears exactly once among the received frames,
        with an arrival time."""
        text = json.dumps(fields, separators=(",", ":"))[1:-1]
        row = self.page.locator('#frames li[data-kind="in"]').filter(has_text=text)
        await expect(row).to_have_count(1)
        await expect(row.locator("time")).to_have_text(_CLOCK)

    async def received(self) -> list[dict[str, Any]]:
        """Every frame received (welcome, acks, deliveries), oldest first."""
        texts = await self.page.locator('#frames li[data-kind="in"] pre').all_text_contents()
        return [json.loads(t) for t in reversed(texts)]  # the log shows the newest first

    async def deliveries(self) -> list[tuple[str | None, int | None, dict[str, Any]]]:
        """The messages shown, oldest first: (group, offset, message less its `ref`). Welcomes (one
        per socket), acks and errors are left out."""
        return [
            (f.get("group"), f.get("offset"), {k: v for k, v in f["message"].items() if k != "ref"})
            for f in await self.received()
            if "message" in f and f != {"message": {"channel_id": f["message"].get("channel_id")}}
        ]

    async def numbers(self) -> list[int]:
        """The `n` of every group message shown, oldest first."""
        return [message["n"] for group, _, message in await self.deliveries() if group is not None]

    def events(self, text: str) -> Any:
        return self.page.locator('#frames li[data-kind="event"]').filter(has_text=text)


_CLOCK = re.compile(r"^\d\d:\d\d:\d\d\.\d{3}$")


async def test_two_pods_one_group_both_pages_show_the_frame_and_another_group_shows_nothing(
    browser: Browser, tmp_path: Path, redis_server: RedisServer, redis_prefix: str, rules: str
) -> None:
    async with AsyncExitStack() as stack:
        pod_a, pod_b = await redis_pods(
            stack, redis_server, redis_prefix, "pod-a", "pod-b", group_rules_file=rules
        )
        alice = await Console.open(browser, pod_a, **LAPTOP)
        bob = await Console.open(browser, pod_b, **LAPTOP)
        carol = await Console.open(browser, pod_b, **PHONE)

        async with alice.page.expect_websocket() as opened:
            alice_id = await alice.connect("room")
        assert (await opened.value).url == f"ws://127.0.0.1:{pod_a.port}/"  # v1: the page joins by frame
        bob_id = await bob.connect("room")
        carol_id = await carol.connect("elsewhere")
        assert alice_id.startswith("pod-a.")
        assert bob_id.startswith("pod-b.")
        await expect(alice.page.locator("#socket-pod")).to_have_text("pod-a")
        await expect(carol.page.locator("#socket-pod")).to_have_text("pod-b")
        await expect(alice.page.locator("#position")).to_have_text(re.compile(r"^#0 · epoch \w+$"))
        await expect(carol.page.locator("#position")).to_have_text("none: this group keeps no history")

        hello = await alice.publish("room", {"text": "hello from a browser on pod-a"})
        await alice.shows(hello)
        await bob.shows(hello)
        reply = await bob.publish("room", {"text": "hi back from pod-b", "n": 2})
        await alice.shows(reply)
        await bob.shows(reply)

        # Carol's group got nothing; a direct send across pods reaches her and only her.
        note = await alice.direct(carol_id, {"text": "psst, carol"})
        await carol.shows(note)
        assert await carol.deliveries() == [(None, None, note)]
        # `room` keeps history: each delivery shows its offset in the group.
        assert await alice.deliveries() == [("room", 1, hello), ("room", 2, reply)]
        assert await bob.deliveries() == [("room", 1, hello), ("room", 2, reply)]
        offsets = alice.page.locator('#frames li[data-kind="in"][data-offset] .offset')
        await expect(offsets).to_have_text(["#2", "#1"])  # newest first
        await expect(alice.page.locator("#position")).to_have_text(re.compile(r"^#2 · epoch \w+$"))
        # The welcome, the join's ack, two deliveries, the acks of her publish and her direct send.
        await expect(alice.page.locator("#frame-count")).to_have_text("6 received")

        # Bad input is explained on the page and sends nothing.
        await carol.page.fill("#publish-body", "[1, 2]")
        await carol.page.click("#publish")
        await expect(carol.page.locator("#publish-error")).to_contain_text("must be a JSON object")
        await expect(carol.page.locator('#frames li[data-kind="out"]')).to_have_count(1)  # the join only
        # What the relay refuses is explained beside the form it came from.
        await carol.publish("not a group!", {"text": "x"})
        await expect(carol.page.locator("#publish-error")).to_contain_text(
            "The relay refused it (invalid_group"
        )

        # Joining again a group without history: nothing to recover, and the page says so.
        await carol.page.click("#disconnect")
        await carol.connect("elsewhere")
        await expect(carol.events("rejoined elsewhere: it keeps no history")).to_have_count(1)
        sent = await carol.page.locator('#frames li[data-kind="out"] pre').all_text_contents()
        rejoin = json.loads(sent[0])  # the newest
        assert (rejoin["task"], rejoin["group_name"], "since" in rejoin) == ("join", "elsewhere", False)

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


async def test_a_page_recovers_what_was_published_while_its_pod_restarted(
    browser: Browser, redis_server: RedisServer, redis_prefix: str, rules: str
) -> None:
    """Pod A restarts under the page while pod B publishes: after reconnecting, the page shows every
    message once, in order, what it missed first, and says how many it recovered."""
    async with AsyncExitStack() as stack:
        pod_a, pod_b = await redis_pods(
            stack, redis_server, redis_prefix, "pod-a", "pod-b", group_rules_file=rules
        )
        console = await Console.open(browser, pod_a, **LAPTOP)
        page = console.page
        await console.connect("room.live")
        client = await RelayClient.connect(ws_url(pod_b, "/"))
        stack.push_async_callback(client.close)
        publisher = Publisher(client, "room.live")
        await publisher.publish(3)
        await expect(page.locator("[data-offset]")).to_have_count(3)

        await pod_a.shutdown()  # uvicorn closes the page's socket with 1012
        await expect(page.locator("#last-close")).to_have_attribute("data-code", "1012")
        await publisher.publish(5)  # 4-8: stored while the page is away
        stop = asyncio.Event()
        streaming = asyncio.get_running_loop().create_task(publisher.keep_publishing(stop))
        try:
            await restarted(stack, pod_a)
            status = page.locator("#status")
            await expect(status).to_contain_text(
                re.compile(r"recovered \d+ missed messages"), timeout=RECONNECTED
            )
            await expect(status).to_have_attribute("data-state", "open")
            await expect(page.locator("#socket-pod")).to_have_text("pod-a")
            await asyncio.wait_for(publisher.reached(publisher.sent + 5), 10)  # and a few live ones
        finally:
            stop.set()
            await streaming

        sent = publisher.sent
        await expect(page.locator("[data-offset]")).to_have_count(sent)
        assert await console.numbers() == list(range(1, sent + 1))  # each once, in order
        assert [offset for _, offset, _ in await console.deliveries()] == list(range(1, sent + 1))
        # The page rejoined from the last message it had seen, and recovered from there.
        sent_frames = await page.locator('#frames li[data-kind="out"] pre').all_text_contents()
        joins = [json.loads(text) for text in reversed(sent_frames)]
        assert [{k: v for k, v in join.items() if k != "ref"} for join in joins] == [
            {"task": "join", "group_name": "room.live"},
            {"task": "join", "group_name": "room.live", "since": {"epoch": publisher.epoch, "offset": 3}},
        ]
        recovered = page.locator('#frames li[data-kind="in"]').filter(
            has=page.locator(".tag", has_text="recovered")
        )
        first, count = 4, await recovered.count()
        assert count >= 5  # at least the five published while the pod was down
        assert await recovered.locator(".offset").all_text_contents() == [
            f"#{n}" for n in reversed(range(first, first + count))
        ]
        noted = f"recovered {count} missed messages (#{first} to #{first + count - 1})"
        await expect(console.events(noted)).to_have_count(1)
        await expect(console.events("dropped a repeat")).to_have_count(0)
        assert console.errors == []


async def test_a_page_says_messages_were_missed_when_history_no_longer_holds_them(
    browser: Browser, redis_server: RedisServer, redis_prefix: str, rules: str
) -> None:
    """`tiny` keeps two messages: after five more were published while away, the page cannot be
    given what it missed, says so, and goes on from the group's position."""
    async with AsyncExitStack() as stack:
        pod_a, pod_b = await redis_pods(
            stack, redis_server, redis_prefix, "pod-a", "pod-b", group_rules_file=rules
        )
        console = await Console.open(browser, pod_a, **LAPTOP)
        page = console.page
        await console.connect("tiny")
        client = await RelayClient.connect(ws_url(pod_b, "/"))
        stack.push_async_callback(client.close)
        publisher = Publisher(client, "tiny")
        await publisher.publish(1)
        await expect(page.locator("[data-offset]")).to_have_count(1)

        await pod_a.shutdown()
        await expect(page.locator("#last-close")).to_have_attribute("data-code", "1012")
        await publisher.publish(5)  # 2-6; history keeps 5 and 6 only
        await restarted(stack, pod_a)

        status = page.locator("#status")
        await expect(status).to_have_attribute("data-state", "gap", timeout=RECONNECTED)
        await expect(status).to_contain_text("but messages were missed (trimmed)")
        await expect(status).to_contain_text("Reload the page")
        await expect(console.events("after #1: messages were missed (trimmed)")).to_have_count(1)
        await expect(page.locator("#position")).to_contain_text("#6 ·")
        await publisher.publish(1)  # live again, from the group's position
        await expect(page.locator("[data-offset]")).to_have_count(2)
        assert await console.numbers() == [1, 7]  # nothing of the missed range, not even 5 and 6
        await expect(page.locator("#position")).to_contain_text("#7 ·")
        assert console.errors == []


async def test_a_delivery_that_arrives_twice_is_shown_once(browser: Browser, rules: str) -> None:
    """The page drops a delivery whose position it has already shown (overlapping recoveries can
    send one twice). Here the network between page and pod repeats every delivery."""
    async with running_pod(None, pod_id="pod-d", group_rules_file=rules) as pod:
        console = await Console.open(browser, pod, **LAPTOP)
        page = console.page
        await page.route_web_socket(re.compile(r"^ws://"), repeat_deliveries)
        await console.connect("room")
        client = await RelayClient.connect(ws_url(pod, "/"))
        publisher = Publisher(client, "room")
        await publisher.publish(3)
        await expect(console.events("dropped a repeat of room #")).to_have_count(3)
        assert await console.numbers() == [1, 2, 3]
        await client.close()
        assert console.errors == []


def repeat_deliveries(route: WebSocketRoute) -> None:
    """Pass frames both ways, sending every delivery with a position to the page twice."""
    server = route.connect_to_server()

    def to_page(frame: str | bytes) -> None:
        route.send(frame)
        if isinstance(frame, str) and '"offset"' in frame and '"message"' in frame:
            route.send(frame)

    server.on_message(to_page)


async def test_a_page_shows_the_close_code_when_its_pod_drains(browser: Browser) -> None:
    async with running_pod(pod_id="pod-drain", drain_delay=0.0, drain_window=0.2, api_keys="k") as pod:
        page = (await Console.open(browser, pod, **LAPTOP)).page
        async with page.expect_websocket() as opened:
            await Console(page).connect("room", token="s3cret tok&n")
        assert (await opened.value).url == f"ws://127.0.0.1:{pod.port}/?token=s3cret%20tok%26n"
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


async def test_a_refused_join_is_explained_and_does_not_reconnect(browser: Browser) -> None:
    async with running_pod(pod_id="pod-c") as pod:
        console = await Console.open(browser, pod, **LAPTOP)
        page = console.page
        await page.fill("#group", "no spaces allowed")
        await page.click("#connect")
        status = page.locator("#status")
        await expect(status).to_have_attribute("data-state", "stopped")
        await expect(status).to_contain_text(
            "Joining group no spaces allowed failed (invalid_group: group_name must be"
        )
        await expect(status).to_contain_text("not reconnecting")
        await expect(page.locator("#channel-id")).to_have_value("")
        await page.wait_for_timeout(1200)  # longer than the first backoff step (0.25-0.5 s)
        opens = page.locator('#frames li[data-kind="event"]').filter(has_text="open ws://")
        await expect(opens).to_have_count(1)
        await expect(status).to_have_attribute("data-state", "stopped")
        assert console.errors == []
        await page.context.close()


PRESENCE_RULES = """
[[group]]
match = "room*"
presence = "full"
presence_events = true
presence_claims = ["name"]
"""


async def test_a_page_shows_who_is_in_its_group_and_follows_joins_and_leaves(
    browser: Browser, tmp_path: Path, redis_server: RedisServer, redis_prefix: str
) -> None:
    """Asked once, the page shows the group's presence across pods, and asks again on each join or
    leave event; a group without a presence rule says so."""
    rules = tmp_path / "presence.toml"
    rules.write_text(PRESENCE_RULES)
    auth = {"jwt_secret": SECRET, "group_rules_file": str(rules), "presence_grace": 0.2}
    async with AsyncExitStack() as stack:
        pod_a, pod_b = await redis_pods(stack, redis_server, redis_prefix, "pod-a", "pod-b", **auth)
        alice = await Console.open(browser, pod_a, **LAPTOP)
        await alice.connect("room", hs256(sub="alice", name="Alice", groups=["*"], publish=["*"]))
        presence = alice.page.locator("#presence")
        await expect(presence).to_have_text("\u2013")  # a dash: nothing is asked until the user asks
        await alice.page.click("#presence-ask")
        await expect(presence).to_have_text('1 connection, 1 user: alice "Alice"')
        bob_token = hs256(sub="bob", groups=["*"], publish=["*"])
        bob = await RelayClient.connect(ws_url(pod_b, f"/room?token={bob_token}"))
        await expect(alice.events("bob joined room")).to_have_count(1)
        await expect(presence).to_have_text('2 connections, 2 users: alice "Alice", bob')
        await bob.close()
        await expect(alice.events("bob left room")).to_have_count(1)
        await expect(presence).to_have_text('1 connection, 1 user: alice "Alice"')

        await alice.page.click("#disconnect")
        await alice.connect("lobby", hs256(sub="alice", groups=["*"], publish=["*"]))
        await alice.page.click("#presence-ask")
        await expect(presence).to_have_text("not kept for this group (no presence rule)")
        assert alice.errors == []

"""The console page over plain HTTP (issue 7); tests/test_console_browser.py drives it in Chromium."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import httpx
import websockets

from service.protocol import CloseCode
from tests.helpers import ROOT, join, running_pod, ws_url


async def get(port: int, path: str, method: str = "GET") -> httpx.Response:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
        return await client.request(method, path)


async def close_code_at(port: int, path: str) -> int | None:
    async with websockets.connect(ws_url(port, path), open_timeout=5) as ws:
        try:
            frame = await ws.recv()
        except websockets.ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd else None
        raise AssertionError(f"expected a close, got {frame!r}")


async def test_get_root_serves_the_page_with_the_pod_id() -> None:
    async with running_pod(pod_id="pod-console-a") as pod:
        response = await get(pod.port, "/")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    page = response.text
    assert '<code id="served-pod">pod-console-a</code>' in page
    assert "<title>relay console · pod-console-a</title>" in page
    assert "{{" not in page  # every placeholder was filled
    assert 'src="/console/console.js"' in page
    assert 'href="/console/console.css"' in page
    # Nothing from elsewhere: no CDN, no web fonts, no absolute URLs to other hosts.
    assert not re.search(r"(src|href)=\"(https?:)?//", page)
    csp = response.headers["content-security-policy"]
    assert "default-src 'none'" in csp
    assert "connect-src 'self'" in csp
    assert response.headers["x-content-type-options"] == "nosniff"


async def test_assets_are_served_with_their_types() -> None:
    async with running_pod() as pod:
        css = await get(pod.port, "/console/console.css")
        js = await get(pod.port, "/console/console.js")
        missing = await get(pod.port, "/console/other.js")
    assert css.status_code == 200
    assert css.headers["content-type"].startswith("text/css")
    assert js.status_code == 200
    assert js.headers["content-type"].startswith("text/javascript")
    assert "send_message_to_group" in js.text
    assert missing.status_code == 404
    for text in (css.text, js.text):
        assert "http://" not in text
        assert "https://" not in text
        assert "@import" not in text
        assert "url(" not in text


async def test_head_is_answered_and_other_methods_are_refused() -> None:
    async with running_pod() as pod:
        head = await get(pod.port, "/", "HEAD")
        post = await get(pod.port, "/", "POST")
    assert head.status_code == 200
    assert head.text == ""
    assert post.status_code == 405


async def test_console_off_is_a_404() -> None:
    async with running_pod(console=False) as pod:
        page = await get(pod.port, "/")
        asset = await get(pod.port, "/console/console.js")
    assert page.status_code == 404
    assert asset.status_code == 404
    assert "relay" not in page.text


async def test_a_websocket_at_root_is_still_the_empty_group_refused_with_4500() -> None:
    for console in (True, False):
        async with running_pod(console=console) as pod:
            assert await close_code_at(pod.port, "/") == CloseCode.BAD_GROUP_NAME


async def test_websockets_at_the_console_paths_still_join_groups() -> None:
    # The seed contract: the path names the group, whatever plain HTTP serves there.
    async with running_pod() as pod:
        a = await join(ws_url(pod, "/console/console.js"))
        b = await join(ws_url(pod, "/console/console.js"))
        sent = await a.publish("console_console.js", text="hi")
        assert await a.next() == {"message": sent}
        assert await b.next() == {"message": sent}
        await a.ws.close()
        await b.ws.close()


def test_the_page_describes_every_relay_close_code() -> None:
    script = Path(ROOT, "service", "console", "console.js").read_text(encoding="utf-8")
    described = {int(code) for code in re.findall(r"\bcode: (\d{4}),", script)}
    assert {int(code) for code in CloseCode} <= described


def test_the_console_files_ship_in_the_wheel() -> None:
    with open(Path(ROOT, "pyproject.toml"), "rb") as f:
        package_data = tomllib.load(f)["tool"]["setuptools"]["package-data"]["service"]
    assert "console/*" in package_data
    assert {p.name for p in Path(ROOT, "service", "console").iterdir()} == {
        "index.html",
        "console.css",
        "console.js",
    }

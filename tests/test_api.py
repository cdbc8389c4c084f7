"""The backend publish API on the internal port, over real HTTP and real sockets."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from service.client import RelayClient
from tests.helpers import join, metric, running_pod, ws_url

pytestmark = pytest.mark.integration


async def test_the_api_is_off_without_keys() -> None:
    async with (
        running_pod() as pod,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{pod.internal_port}") as http,
    ):
        response = await http.post("/api/publish", json={"group": "g", "message": {}})
        assert response.status_code == 404 and response.json()["error"]["code"] == "api_disabled"


async def test_a_backend_publishes_to_a_group_and_to_one_channel() -> None:
    async with running_pod(api_keys="old-key,new-key") as pod:
        seed = await join(ws_url(pod, "/orders"))
        v1 = await RelayClient.connect(ws_url(pod, "/orders"))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{pod.internal_port}") as http:
            before = metric("relay_api_requests_total", outcome="accepted")
            response = await http.post(
                "/api/publish",
                json={"group": "orders", "message": {"id": 7, "state": "paid"}},
                headers={"Authorization": "Bearer new-key"},
            )
            assert response.status_code == 202 and response.json() == {"pods": 1}
            assert await seed.next() == {"message": {"id": 7, "state": "paid"}}
            delivery = await v1.receive(5)
            assert delivery.group == "orders" and delivery.message == {"id": 7, "state": "paid"}
            response = await http.post(  # the old key still works while both are listed
                "/api/publish",
                json={"channel_id": seed.channel_id, "message": "just you"},
                headers={"Authorization": "Bearer old-key"},
            )
            assert response.status_code == 202
            assert await seed.next() == {"message": "just you"}
            assert metric("relay_api_requests_total", outcome="accepted") == before + 2
        await v1.close()


@pytest.mark.parametrize(
    ("headers", "body", "status", "code"),
    [
        ({}, {"group": "g", "message": 1}, 401, "unauthorized"),
        ({"Authorization": "Bearer wrong"}, {"group": "g", "message": 1}, 403, "forbidden"),
        ({"Authorization": "Basic key"}, {"group": "g", "message": 1}, 401, "unauthorized"),
        ({"Authorization": "Bearer key"}, b"{not json", 400, "bad_json"),
        ({"Authorization": "Bearer key"}, {"group": "g"}, 400, "bad_request"),
        ({"Authorization": "Bearer key"}, {"message": 1}, 400, "bad_request"),
        (
            {"Authorization": "Bearer key"},
            {"group": "g", "channel_id": "p.x", "message": 1},
            400,
            "bad_request",
        ),
        ({"Authorization": "Bearer key"}, {"group": "bad name", "message": 1}, 400, "invalid_group"),
        ({"Authorization": "Bearer key"}, {"channel_id": "nodot", "message": 1}, 400, "invalid_channel"),
        ({"Authorization": "Bearer key"}, {"group": "g", "message": "x" * 2000}, 413, "too_large"),
    ],
)
async def test_bad_requests_get_a_4xx_with_a_json_error(
    headers: dict[str, str], body: object, status: int, code: str
) -> None:
    async with (
        running_pod(api_keys="key", max_frame_bytes=1024) as pod,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{pod.internal_port}") as http,
    ):
        content = body if isinstance(body, bytes) else None
        response = await http.post(
            "/api/publish", headers=headers, content=content, json=None if content else body
        )
        assert response.status_code == status
        assert response.json()["error"]["code"] == code


async def test_the_api_is_not_on_the_public_port() -> None:
    async with running_pod(api_keys="key") as pod, httpx.AsyncClient() as http:
        response = await http.post(
            f"http://127.0.0.1:{pod.port}/api/publish",
            json={"group": "g", "message": 1},
            headers={"Authorization": "Bearer key"},
        )
        assert response.status_code in (404, 405)


async def _status_without_finishing(port: int, request: bytes) -> bytes:
    """Send the start of a request, never its end, and return the status line the server answers
    with: a server that waits for the whole body never answers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.readline(), 5)
    finally:
        writer.close()


async def test_an_oversized_body_is_refused_before_it_is_read() -> None:
    """A declared length over the limit is answered at once, without reading the body; a chunked
    body is refused as soon as it passes the limit, not once it has all been buffered."""
    async with running_pod(api_keys="key", max_frame_bytes=1000) as pod:
        head = (
            b"POST /api/publish HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer key\r\n"
            b"Content-Type: application/json\r\n"
        )
        declared = head + b"Content-Length: 100000000\r\n\r\n" + b"x" * 10
        assert (await _status_without_finishing(pod.internal_port, declared)).startswith(b"HTTP/1.1 413")
        piece = b"%x\r\n%s\r\n" % (600, b"x" * 600)
        chunked = head + b"Transfer-Encoding: chunked\r\n\r\n" + piece * 2  # 1,200 bytes, no last chunk
        assert (await _status_without_finishing(pod.internal_port, chunked)).startswith(b"HTTP/1.1 413")

"""Draining: unready first, then sockets closed with 1012 in jittered batches, then the pod stops."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

import httpx
import pytest
import websockets
from structlog.testing import capture_logs

from service.server import PodServer
from tests.helpers import http_status, join, running_pod, settings, start_pod_process, wait_until, ws_url

pytestmark = pytest.mark.integration

OPS = {"Authorization": "Bearer ops-key"}


async def test_drain_turns_unready_then_closes_sockets_with_1012_spread_over_the_window() -> None:
    async with running_pod(drain_delay=0.5, drain_window=1.0, api_keys="ops-key") as pod:
        clients = [await join(ws_url(pod, "/g")) for _ in range(40)]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{pod.internal_port}") as http:
            started = time.monotonic()
            assert (await http.post("/drain?wait=false", headers=OPS)).status_code == 202
            readiness = await http.get("/readyz")
            assert readiness.status_code == 503 and readiness.json()["checks"]["not_draining"] is False
            assert (await http.get("/healthz")).status_code == 200  # alive while draining

            late = await websockets.connect(ws_url(pod, "/g"))  # arrives during the delay
            with pytest.raises(websockets.ConnectionClosed) as refused:
                await asyncio.wait_for(late.recv(), 5)
            assert refused.value.rcvd is not None and refused.value.rcvd.code == 1012

            async def closed_at(client: object) -> tuple[int | None, float]:
                code = await client.close_code(10)  # type: ignore[attr-defined]
                return code, time.monotonic() - started

            results = await asyncio.gather(*(closed_at(c) for c in clients))
        assert {code for code, _ in results} == {1012}
        times = sorted(t for _, t in results)
        assert times[0] >= 0.45  # nothing closed before the drain delay
        assert times[-1] - times[0] >= 0.4  # spread out in batches, not all at once
        await asyncio.wait_for(pod.pod.stopped.wait(), 5)


async def test_drain_request_waits_until_the_pod_is_drained() -> None:
    async with running_pod(drain_delay=0.1, drain_window=0.1, api_keys="ops-key") as pod:
        client = await join(ws_url(pod, "/g"))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{pod.internal_port}") as http:
            response = await http.post("/drain", headers=OPS, timeout=10)
        assert response.json() == {"drained": True}
        assert await client.close_code() == 1012
        assert pod.pod.stopped.is_set()


async def test_drain_needs_an_api_key_and_is_off_without_keys() -> None:
    """Draining stops the pod: whoever reaches the internal port (a scraper, a backend) must not."""
    async with running_pod(api_keys="ops-key") as pod:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{pod.internal_port}") as http:
            assert (await http.post("/drain?wait=false")).status_code == 401
            wrong = {"Authorization": "Bearer nope"}
            assert (await http.post("/drain?wait=false", headers=wrong)).status_code == 403
            assert (await http.get("/drain?wait=false", headers=OPS)).status_code == 405
            assert (await http.get("/readyz")).status_code == 200  # none of those drained it
        assert not pod.pod.draining
    async with running_pod() as pod:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{pod.internal_port}") as http:
            refused = await http.post("/drain?wait=false", headers=OPS)
            assert refused.status_code == 404 and refused.json()["error"]["code"] == "api_disabled"
        assert not pod.pod.draining


def test_sigterm_drains_closes_with_1012_logs_each_socket_and_exits_0() -> None:
    pod = start_pod_process({"RELAY_DRAIN_DELAY": "0.3", "RELAY_DRAIN_WINDOW": "0.3", "RELAY_POD_ID": "sig"})

    async def scenario() -> list[int | None]:
        clients = [await join(ws_url(pod.port, "/g")) for _ in range(5)]
        await clients[0].publish("g", x=1)
        for c in clients:
            await c.next()
        pod.terminate(signal.SIGTERM)
        return list(await asyncio.gather(*(c.close_code(10) for c in clients)))

    codes = asyncio.run(scenario())
    assert codes == [1012] * 5
    assert pod.wait() == 0
    events = [line["event"] for line in pod.logs()]
    assert events.index("pod.draining") < events.index("pod.drained")
    closed = [line for line in pod.logs() if line["event"] == "socket.closed"]
    assert len(closed) == 5
    assert all(line["code"] == 1012 and line["by"] == "server" for line in closed)
    assert {"conn_id", "group", "duration", "frames_in", "frames_out"} <= set(closed[0])
    assert sum(line["frames_in"] for line in closed) == 1


def test_a_second_signal_during_the_drain_stops_at_once() -> None:
    pod = start_pod_process({"RELAY_DRAIN_DELAY": "30"})
    pod.terminate(signal.SIGTERM)
    ready = f"http://127.0.0.1:{pod.internal_port}/readyz"
    wait_until(lambda: http_status(ready) == 503, 10, "the pod to start draining")
    pod.terminate(signal.SIGINT)
    assert pod.wait(timeout=10) == 0
    assert "pod.forced_exit" in [line["event"] for line in pod.logs()]


async def test_two_signals_in_one_loop_turn_force_the_exit() -> None:
    """Both signals land before the loop runs again (a supervisor that sends SIGTERM twice, a double
    Ctrl+C): their handlers run back to back, so the drain must be marked started by the first one
    itself, not later by the drain task, or the second is taken for a first and the pod waits out
    the drain. The signals are real, sent to this process and handled by PodServer.serve."""
    loop = asyncio.get_running_loop()
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    server = PodServer(settings(drain_delay=30))
    serving = asyncio.create_task(server.serve())
    try:
        while server.internal_port == 0 or await status(server.internal_port, "/healthz") != 200:
            assert not serving.done(), serving
            await asyncio.sleep(0.01)
        assert signal.getsignal(signal.SIGTERM) not in previous.values()  # relay's handler, not the default
        with capture_logs() as logs:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)  # before the loop has run anything else
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(serving), 5)
        events = [entry["event"] for entry in logs]
        assert serving.done(), f"the second signal did not stop the pod: {events}"
        assert events.count("pod.signal") == 1 and "pod.forced_exit" in events
        assert server.pod.stopped.is_set()
    finally:
        if not serving.done():  # now that the drain is under way, a third signal is a second one
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.wait_for(serving, 10)
        drain = server.pod.drain()  # the drain task still sleeps out its delay: end it
        drain.cancel()
        await asyncio.gather(drain, return_exceptions=True)
        for signum, handler in previous.items():
            loop.remove_signal_handler(signum)
            signal.signal(signum, handler)


async def status(port: int, path: str) -> int | None:
    try:
        async with httpx.AsyncClient() as http:
            return (await http.get(f"http://127.0.0.1:{port}{path}", timeout=1)).status_code
    except httpx.HTTPError:
        return None

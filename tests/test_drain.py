"""Draining: unready first, then sockets closed with 1012 in jittered batches, then the pod stops."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import pytest
import websockets

from tests.helpers import join, running_pod, start_pod_process, ws_url

pytestmark = pytest.mark.integration


async def test_drain_turns_unready_then_closes_sockets_with_1012_spread_over_the_window() -> None:
    async with running_pod(drain_delay=0.5, drain_window=1.0) as pod:
        clients = [await join(ws_url(pod, "/g")) for _ in range(40)]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{pod.internal_port}") as http:
            started = time.monotonic()
            assert (await http.post("/drain?wait=false")).status_code == 202
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
    async with running_pod(drain_delay=0.1, drain_window=0.1) as pod:
        client = await join(ws_url(pod, "/g"))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{pod.internal_port}") as http:
            response = await http.get("/drain", timeout=10)  # GET: what a preStop httpGet hook sends
        assert response.json() == {"drained": True}
        assert await client.close_code() == 1012
        assert pod.pod.stopped.is_set()


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
    time.sleep(0.5)
    pod.terminate(signal.SIGINT)
    assert pod.wait(timeout=10) == 0
    assert "pod.forced_exit" in [line["event"] for line in pod.logs()]

"""service.selftest, the `helm test` pod's program, against real pods."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys

import pytest
import websockets.asyncio.server
from websockets.asyncio.server import ServerConnection

from service import selftest
from tests import tokens
from tests.helpers import ROOT, running_pod, start_pod_process, ws_url


async def test_two_clients_on_one_pod_both_receive_the_group_message() -> None:
    async with running_pod() as pod:
        ids = await selftest.run(ws_url(pod, ""), clients=2, timeout=5)
    assert len(ids) == 2 and ids[0] != ids[1]


async def test_three_clients_all_receive_it() -> None:
    async with running_pod() as pod:
        ids = await selftest.run(ws_url(pod, "/"), clients=3, timeout=5)
    assert len(set(ids)) == 3


async def test_nothing_listening_fails_with_a_clear_message() -> None:
    with pytest.raises(selftest.SelfTestFailed, match=re.escape("cannot open ws://127.0.0.1:9/")):
        await selftest.run("ws://127.0.0.1:9", clients=2, timeout=1)


async def test_a_server_that_is_not_relay_fails_on_the_first_frame() -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.send('{"hello": "world"}')
        await asyncio.sleep(1)

    async with websockets.asyncio.server.serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        with pytest.raises(selftest.SelfTestFailed, match="not a channel id announcement"):
            await selftest.run(f"ws://127.0.0.1:{port}", clients=2, timeout=1)


@pytest.mark.integration
def test_command_exits_0_against_a_pod_process_and_1_when_it_is_gone() -> None:
    pod = start_pod_process({"RELAY_DRAIN_DELAY": "0", "RELAY_DRAIN_WINDOW": "0.1"})
    url = f"ws://127.0.0.1:{pod.port}"
    try:
        ok = subprocess.run(
            [sys.executable, "-m", "service.selftest", "--url", url, "--timeout", "5"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        pod.terminate()
        assert pod.wait() == 0
    assert ok.returncode == 0, ok.stderr
    assert "relay selftest OK: 2 clients" in ok.stdout
    gone = subprocess.run(
        [sys.executable, "-m", "service.selftest", "--url", url, "--timeout", "1", "--attempts", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert gone.returncode == 1
    assert f"relay selftest FAILED against {url}: cannot open" in gone.stderr


async def test_with_auth_on_it_needs_a_token_that_allows_selftest_groups() -> None:
    token = tokens.hs256(groups=["selftest-*"], publish=["selftest-*"])
    async with running_pod(jwt_secret=tokens.SECRET) as pod:
        with pytest.raises(selftest.SelfTestFailed, match=r"socket closed \(code 4501\)"):
            await selftest.run(ws_url(pod, ""), clients=2, timeout=5)
        assert len(await selftest.run(ws_url(pod, ""), clients=2, timeout=5, token=token)) == 2

"""Clients that stop reading: they count against the caps until their socket is really gone, and a
peer that will not take a close frame is cut (TCP reset) after RELAY_CLOSE_TIMEOUT.

The stalled clients are real sockets that complete the handshake and never read again, with a tiny
receive buffer, so their receive window stays at zero (tests/helpers.py `stalled_client`). Whether
the server still holds the connection is read from the kernel's own table (/proc/net/tcp).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
import websockets

from service import channels, transport
from service.protocol import CloseCode
from service.server import PodServer
from tests import tokens
from tests.helpers import Client, closed_with, join, metric, running_pod, stalled_client, ws_url

pytestmark = pytest.mark.integration

ESTABLISHED = "01"


def server_side_established(server_port: int, client: socket.socket) -> bool:
    """Whether the kernel still has the server's end of `client`'s connection ESTABLISHED."""
    client_port = client.getsockname()[1]
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                local, remote, state = fields[1], fields[2], fields[3]
                if (
                    int(local.rsplit(":", 1)[1], 16) == server_port
                    and int(remote.rsplit(":", 1)[1], 16) == client_port
                ):
                    return state == ESTABLISHED
    return False


async def until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Wait for `condition`; the seconds it took. Fails naming `what`."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


@contextlib.asynccontextmanager
async def stalled(port: int, path: str = "/g") -> AsyncIterator[socket.socket]:
    """A client that never reads again; closed (unread data and all: a reset) however the test ends,
    so a failing test does not leave the pod waiting on it."""
    sock = await asyncio.to_thread(stalled_client, port, path)
    try:
        yield sock
    finally:
        sock.close()


async def close_as_slow(pod: PodServer, publisher: Client, reader: Client, group: str) -> float:
    """Publish big frames to `group` (`reader`, a member that keeps up, paces them) until a stalled
    member of it is closed as a slow consumer (4008); when relay closed it (time.monotonic), the
    instant the reaper's RELAY_CLOSE_TIMEOUT counts from."""
    before = metric("relay_slow_consumer_disconnects_total")
    i = 0
    while metric("relay_slow_consumer_disconnects_total") == before:
        await publisher.publish(group, i=i, blob="x" * 30000)
        assert (await reader.next(10))["message"]["i"] == i
        i += 1
        assert i < 2000, "the stalled client was never closed as slow"
    (closed,) = [c for c in pod.pod.hub.connections if c.close_code == CloseCode.SLOW_CONSUMER]
    assert closed.closed_at is not None
    return closed.closed_at


async def admitted_or_refused(url: str) -> Client | int | None:
    """Open a socket: the Client if the pod welcomes it, else the close code it was refused with."""
    try:
        return await join(url)
    except websockets.ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd else None


async def test_a_slow_consumer_counts_until_its_socket_is_cut_after_the_close_timeout() -> None:
    close_timeout = 1.0
    async with (
        running_pod(outbox_size=16, close_timeout=close_timeout, publish_rate=0, max_connections=3) as pod,
        stalled(pod.port) as slow,
    ):
        hub = pod.pod.hub
        fast = await join(ws_url(pod, "/g"))
        publisher = await join(ws_url(pod, "/pub"))
        cut = metric("relay_sockets_cut_total")
        before = metric("relay_slow_consumer_disconnects_total")
        i = 0
        while metric("relay_slow_consumer_disconnects_total") == before:
            await publisher.publish("g", i=i, blob="x" * 30000)
            assert (await fast.next(10))["message"]["i"] == i  # the others keep up throughout
            i += 1
            assert i < 2000, "the stalled client was never closed as slow"
        closed_at = time.monotonic()
        # relay has closed it with 4008, but the peer never reads the close frame: the socket is
        # still there, so it still counts: the pod is full.
        assert server_side_established(pod.port, slow)
        assert hub.connection_count() == 3
        assert await closed_with(ws_url(pod, "/g")) == 1013
        # After the close timeout it is cut with a reset, and only then released.
        await until(lambda: not server_side_established(pod.port, slow), 5, "the stalled socket to be cut")
        waited = time.monotonic() - closed_at
        assert close_timeout <= waited < close_timeout * 1.25 + 1.0, waited
        await until(lambda: hub.connection_count() == 2, 2, "the cut socket to be released")
        assert metric("relay_sockets_cut_total") == cut + 1
        again = await join(ws_url(pod, "/g"))  # room again
        sent = await publisher.publish("g", after="cut")
        assert await again.next() == {"message": sent}


async def test_a_socket_uvicorn_closes_itself_is_cut_too() -> None:
    """A stalled client with no traffic: uvicorn's keepalive ping goes unanswered and uvicorn closes
    the transport itself, which, with the write buffer full, would wait for ever."""
    async with (
        running_pod(
            outbox_size=10_000, publish_rate=0, close_timeout=0.5, ping_interval=0.2, ping_timeout=0.3
        ) as pod,
        stalled(pod.port) as slow,
    ):
        hub = pod.pod.hub
        publisher = await join(ws_url(pod, "/pub"))
        (conn,) = [c for c in hub.connections if c.groups == {channels.group("g")}]
        while not conn.backlog:  # fill every buffer on the way: the kernel's and the transport's
            await publisher.publish("g", blob="x" * 30000)
            await asyncio.sleep(0)
        # No more traffic: only the keepalive can notice, and the reaper must finish the job.
        await until(lambda: transport.closing(conn.send), 5, "uvicorn to give up on the keepalive")
        assert server_side_established(pod.port, slow)
        await until(lambda: not server_side_established(pod.port, slow), 5, "the socket to be cut")
        await until(lambda: hub.connection_count() == 1, 2, "the socket to be released")


async def test_a_peer_that_never_answers_a_close_counts_until_it_is_cut() -> None:
    """The close frame itself goes out (the buffers are empty), but the peer never reads it nor
    answers: relay must not forget the socket while uvicorn waits, nor let it linger."""
    async with running_pod(close_timeout=1.0) as pod, stalled(pod.port) as slow:
        hub = pod.pod.hub
        await until(lambda: hub.connection_count() == 1, 2, "the stalled client to be admitted")
        closed = time.monotonic()
        assert await pod.pod.close_all(CloseCode.SERVICE_RESTART, 0.0) == 1
        while server_side_established(pod.port, slow):  # until the cut, it counts all along
            assert hub.connection_count() == 1
            assert time.monotonic() - closed < 3, "the unanswered socket was never cut"
            await asyncio.sleep(0.02)
        assert time.monotonic() - closed >= 1.0  # not before the close timeout
        await until(lambda: hub.connection_count() == 0, 2, "the cut socket to be released")


# RELAY_WS_IMPL=websockets: uvicorn and websockets both warn that this implementation is deprecated.
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::uvicorn.config.UvicornDeprecationWarning")
async def test_every_uvicorn_websocket_implementation_exposes_what_the_reaper_needs() -> None:
    """service/transport.py reaches below ASGI; if a uvicorn upgrade moves what it relies on, this
    fails instead of relay quietly leaking stalled sockets."""
    for impl in ("websockets-sansio", "wsproto", "websockets"):
        async with running_pod(ws_impl=impl) as pod:
            client = await join(ws_url(pod, "/g"))
            (conn,) = pod.pod.hub.connections
            assert transport.supported(conn.send), impl
            assert not transport.gone(conn.send) and not transport.closing(conn.send), impl
            transport.abort(conn.send)
            await until(lambda c=conn: transport.gone(c.send), 2, f"{impl}: the aborted socket to go")  # type: ignore[misc]
            assert await client.close_code() in (None, 1006), impl
            await until(lambda: pod.pod.hub.connection_count() == 0, 2, f"{impl}: release")


async def test_a_slow_consumer_counts_against_its_users_cap_until_its_socket_is_cut() -> None:
    """RELAY_USER_MAX_CONNECTIONS: the stalled socket of a user at their cap, closed with 4008 but
    lingering, still holds its place: the user's next socket is refused with 4030 until the reaper
    cuts it, and admitted once it is gone."""
    close_timeout = 1.0
    alice_path = "/chat?token=" + tokens.hs256(sub="alice")
    async with running_pod(
        jwt_secret=tokens.SECRET,
        user_max_connections=1,
        user_connect_rate=0,  # only the cap under test refuses
        user_publish_rate=0,
        outbox_size=16,
        close_timeout=close_timeout,
        publish_rate=0,
    ) as pod:
        alice = ws_url(pod, alice_path)
        async with stalled(pod.port, alice_path) as slow:
            bob = await join(ws_url(pod, "/chat?token=" + tokens.hs256(sub="bob")))
            await until(lambda: pod.pod.hub.connection_count() == 2, 2, "her stalled socket to count")
            closed_at = await close_as_slow(pod, bob, bob, "chat")
            refusals = 0
            while True:
                answer = await admitted_or_refused(alice)
                if isinstance(answer, Client):
                    # Admitted: only right once the stalled socket is gone (checked after the fact,
                    # so a cut racing the attempt cannot fail the test).
                    assert not server_side_established(pod.port, slow), "admitted while the socket lingers"
                    break
                assert answer == CloseCode.TOO_MANY_CONNECTIONS, answer
                if server_side_established(pod.port, slow):
                    refusals += 1  # refused while the closed socket still lingered
                assert time.monotonic() - closed_at < close_timeout * 1.25 + 3, "alice never admitted again"
                await asyncio.sleep(0.05)
            assert refusals > 0, "the socket was never seen lingering"
            assert time.monotonic() - closed_at >= close_timeout  # not before the reaper's cut
            sent = await bob.publish("chat", after="cut")
            assert await answer.next() == {"message": sent}


async def test_lingering_sockets_keep_the_pod_unready_until_they_are_cut() -> None:
    """/readyz turns false at RELAY_READY_CONNECTION_RATIO of the cap; a stalled socket closed
    with 4008 still counts there until it is cut, and then the pod is ready again."""
    close_timeout = 1.0
    async with (
        running_pod(
            outbox_size=16,
            close_timeout=close_timeout,
            publish_rate=0,
            max_connections=4,
            ready_connection_ratio=0.5,  # unready at 2 sockets
        ) as pod,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{pod.internal_port}") as http,
    ):

        async def ready() -> bool:
            answer = await http.get("/readyz")
            body = answer.json()
            assert body["checks"]["not_draining"] and body["checks"]["broker"]  # only the count varies
            assert answer.status_code == (200 if body["ready"] else 503)
            return answer.status_code == 200

        fast = await join(ws_url(pod, "/g"))
        assert await ready()
        async with stalled(pod.port) as slow:
            await until(lambda: pod.pod.hub.connection_count() == 2, 2, "the stalled client to be admitted")
            assert not await ready()  # at the threshold
            closed_at = await close_as_slow(pod, fast, fast, "g")
            lingering = 0
            while not await ready():
                if server_side_established(pod.port, slow):
                    lingering += 1
                assert time.monotonic() - closed_at < close_timeout * 1.25 + 3, "never ready again"
                await asyncio.sleep(0.05)
            # Ready: only right once the stalled socket is gone (checked after the answer, so a cut
            # racing the probe cannot fail the test).
            assert not server_side_established(pod.port, slow), "ready while the closed socket lingers"
            assert lingering > 0, "the socket was never seen lingering"
            assert time.monotonic() - closed_at >= close_timeout  # not before the reaper's cut
            assert pod.pod.hub.connection_count() == 1

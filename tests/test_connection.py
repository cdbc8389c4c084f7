"""Connection.offer: direct writes while the socket keeps up, a bounded backlog when it stalls."""

from __future__ import annotations

import asyncio

from service.connection import Connection, State
from service.protocol import CloseCode
from tests.fakes import FakeSocket
from tests.helpers import metric


def conn_for(sock: FakeSocket, outbox: int = 4, **kw: object) -> Connection:
    return Connection("p.c", sock.send, outbox_size=outbox, close_timeout=0.2, **kw)  # type: ignore[arg-type]


async def test_a_socket_that_keeps_up_is_written_at_once_without_a_task() -> None:
    sock = FakeSocket()
    conn = conn_for(sock)
    tasks_before = len(asyncio.all_tasks())
    assert conn.offer("a") and conn.offer("b")
    assert sock.texts == ["a", "b"]  # written before offer returned
    assert conn.backlog == 0 and len(asyncio.all_tasks()) == tasks_before


async def test_a_stalled_socket_gets_a_backlog_written_in_order_once_it_drains() -> None:
    sock = FakeSocket()
    conn = conn_for(sock, outbox=10)
    backlogged = metric("relay_send_backlogged_total")
    sock.writable.clear()  # the transport paused: the kernel buffer is full
    for frame in "abcd":
        assert conn.offer(frame)
    assert sock.texts == [] and conn.backlog == 3
    assert metric("relay_send_backlogged_total") == backlogged + 1
    await asyncio.sleep(0.02)  # the writer task starts while the socket is still stalled
    assert sock.texts == []
    sock.writable.set()
    for _ in range(5):
        await asyncio.sleep(0)
    assert sock.texts == ["a", "b", "c", "d"]
    assert conn.backlog == 0
    assert conn.offer("e") and sock.texts[-1] == "e"  # back to direct writes


async def test_falling_further_behind_than_the_outbox_closes_with_4008() -> None:
    sock = FakeSocket()
    conn = conn_for(sock, outbox=2)
    slow = metric("relay_slow_consumer_disconnects_total")
    dropped = metric("relay_send_queue_dropped_total", reason="slow_consumer")
    sock.writable.clear()
    assert [conn.offer(f) for f in "abcd"] == [True, True, True, False]
    assert conn.state is State.CLOSING and conn.close_code == CloseCode.SLOW_CONSUMER
    assert metric("relay_slow_consumer_disconnects_total") == slow + 1
    assert metric("relay_send_queue_dropped_total", reason="slow_consumer") == dropped + 3
    sock.writable.set()
    await asyncio.sleep(0.01)
    # The stuck frame is never written after the close: only the close frame goes out.
    assert sock.texts == [] and sock.close_codes == [CloseCode.SLOW_CONSUMER]
    assert not conn.offer("e")


async def test_a_close_the_socket_cannot_take_abandons_the_connection() -> None:
    sock = FakeSocket()
    stuck = asyncio.Event()
    conn = conn_for(sock, on_stuck=stuck.set)
    sock.writable.clear()
    conn.close(CloseCode.SERVICE_RESTART)
    await asyncio.wait_for(stuck.wait(), 2)  # after close_timeout (0.2 s)
    assert sock.close_codes == []


async def test_a_failed_write_marks_the_client_gone_and_drops_later_frames() -> None:
    sock = FakeSocket()
    conn = conn_for(sock)
    sock.broken = True
    closed = metric("relay_send_queue_dropped_total", reason="closed")
    assert not conn.offer("a")
    assert conn.state is State.CLOSED
    assert not conn.offer("b")
    assert metric("relay_send_queue_dropped_total", reason="closed") == closed + 2


async def test_close_is_sent_once() -> None:
    sock = FakeSocket()
    conn = conn_for(sock)
    conn.close(CloseCode.NORMAL)
    conn.close(CloseCode.SERVICE_RESTART)
    assert sock.close_codes == [CloseCode.NORMAL]

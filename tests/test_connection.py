"""Connection.offer: direct writes while the socket keeps up, a bounded backlog when it stalls."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest

from service import connection
from service.connection import Connection, State
from service.protocol import CloseCode
from tests.fakes import FakeSocket
from tests.helpers import metric


def conn_for(sock: FakeSocket, outbox: int = 4, **kw: object) -> Connection:
    return Connection("p.c", sock.send, outbox_size=outbox, **kw)  # type: ignore[arg-type]


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


async def test_a_close_the_socket_cannot_take_waits_and_records_when_it_began() -> None:
    sock = FakeSocket()
    conn = conn_for(sock)
    sock.writable.clear()
    conn.close(CloseCode.SERVICE_RESTART)
    # The pod's reaper cuts the socket once closed_at is RELAY_CLOSE_TIMEOUT old (test_stalled.py).
    assert conn.state is State.CLOSING and conn.closed_at is not None
    await asyncio.sleep(0.02)  # the close waits in its own task for as long as the socket is stalled
    assert sock.close_codes == []
    sock.writable.set()  # the peer reads again: the close frame goes out after all
    for _ in range(5):
        await asyncio.sleep(0)
    assert sock.close_codes == [CloseCode.SERVICE_RESTART]


async def test_a_backlog_over_its_byte_bound_closes_with_4008() -> None:
    sock = FakeSocket()
    conn = conn_for(sock, outbox=1000, outbox_bytes=10)
    sock.writable.clear()
    assert conn.offer("aaaa")  # in flight: counts until written
    assert conn.offer("bbbb")  # 8 characters held
    assert not conn.offer("ccc")  # 11 > 10
    assert conn.close_code == CloseCode.SLOW_CONSUMER


async def test_written_frames_stop_counting_against_the_byte_bound() -> None:
    sock = FakeSocket()
    conn = conn_for(sock, outbox=1000, outbox_bytes=10)
    sock.writable.clear()
    assert conn.offer("aaaa") and conn.offer("bbbb")
    sock.writable.set()
    for _ in range(5):
        await asyncio.sleep(0)
    assert sock.texts == ["aaaa", "bbbb"] and conn.backlog == 0
    sock.writable.clear()
    assert conn.offer("cccccc") and conn.offer("dddd")  # 10: at the bound, not over it
    assert conn.state is State.OPEN


async def test_a_member_behind_for_longer_than_the_max_age_is_slow() -> None:
    sock = FakeSocket()
    conn = conn_for(sock, outbox=1000, outbox_max_age=0.05)
    sock.writable.clear()
    assert conn.offer("a") and conn.offer("b")
    await asyncio.sleep(0.06)  # the age bound is the subject: time must pass
    assert not conn.offer("c")
    assert conn.close_code == CloseCode.SLOW_CONSUMER


async def test_catching_up_resets_the_age_of_the_backlog() -> None:
    sock = FakeSocket()
    conn = conn_for(sock, outbox=1000, outbox_max_age=0.05)
    sock.writable.clear()
    assert conn.offer("a") and conn.offer("b")
    await asyncio.sleep(0.06)
    sock.writable.set()
    for _ in range(5):
        await asyncio.sleep(0)
    assert conn.backlog == 0
    sock.writable.clear()
    assert conn.offer("c") and conn.offer("d")  # a new backlog, young again
    assert conn.state is State.OPEN


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


async def test_the_slow_consumer_close_tells_the_client_why() -> None:
    sock = FakeSocket()
    conn = conn_for(sock, outbox=1)
    sock.writable.clear()
    assert [conn.offer(f) for f in "abc"] == [True, True, False]
    sock.writable.set()
    for _ in range(5):
        await asyncio.sleep(0)
    # Browsers show the reason in CloseEvent.reason: it says what happened, not just a number.
    assert sock.sent == [{"type": "websocket.close", "code": 4008, "reason": "slow consumer"}]


async def test_a_close_without_a_reason_sends_an_empty_one() -> None:
    sock = FakeSocket()
    conn = conn_for(sock)
    conn.close(CloseCode.SERVICE_RESTART)
    assert sock.sent == [{"type": "websocket.close", "code": 1012, "reason": ""}]


async def test_frames_out_counts_frames_handed_to_the_socket_but_not_dropped_ones() -> None:
    """frames_out is the socket.closed log line's count of what the client was sent."""
    sock = FakeSocket()
    conn = conn_for(sock, outbox=2)
    assert conn.offer("a") and conn.offer("b")
    assert conn.frames_out == 2
    sock.writable.clear()
    assert conn.offer("c") and conn.offer("d") and conn.offer("e")  # in flight, then a backlog of 2
    assert conn.frames_out == 5
    assert not conn.offer("f")  # over the outbox: dropped, and the socket is closed
    assert not conn.offer("g")
    assert conn.frames_out == 5


async def test_closing_with_a_backlog_counts_the_frames_it_drops() -> None:
    sock = FakeSocket()
    conn = conn_for(sock, outbox=10)
    closed = metric("relay_send_queue_dropped_total", reason="closed")
    sock.writable.clear()
    for frame in "abcd":
        assert conn.offer(frame)  # "a" in flight, three behind it
    conn.close(CloseCode.SERVICE_RESTART)
    assert conn.backlog == 0
    assert metric("relay_send_queue_dropped_total", reason="closed") == closed + 3
    sock.writable.set()
    for _ in range(5):
        await asyncio.sleep(0)
    assert sock.texts == [] and sock.close_codes == [CloseCode.SERVICE_RESTART]


async def test_a_client_gone_during_a_pending_close_keeps_when_the_close_began() -> None:
    sock = FakeSocket()
    conn = conn_for(sock)
    sock.writable.clear()
    conn.close(CloseCode.NORMAL)
    began = conn.closed_at
    assert began is not None
    await asyncio.sleep(0.01)
    conn.gone()  # the disconnect arrives before the close frame could be written
    assert conn.state is State.CLOSED and conn.closed_at == began
    sock.writable.set()
    for _ in range(5):
        await asyncio.sleep(0)
    assert sock.sent == []  # the pending close was abandoned, not written to a gone client


async def test_a_client_gone_while_open_is_closed_now() -> None:
    sock = FakeSocket()
    conn = conn_for(sock)
    assert conn.closed_at is None and conn.close_code is None
    conn.gone()
    assert conn.state is State.CLOSED and conn.closed_at is not None
    conn.close(CloseCode.NORMAL)  # nothing to close any more
    assert sock.sent == [] and conn.close_code is None


async def test_the_disconnect_after_a_delayed_close_was_written_is_quiet() -> None:
    sock = FakeSocket()
    conn = conn_for(sock)
    sock.writable.clear()
    conn.close(CloseCode.NORMAL)
    await asyncio.sleep(0.01)
    sock.writable.set()
    for _ in range(5):
        await asyncio.sleep(0)
    assert sock.close_codes == [CloseCode.NORMAL]
    conn.gone()  # the client answers the close and goes: the usual end of every socket
    assert conn.state is State.CLOSED


async def test_a_client_gone_while_its_close_was_pending_leaves_no_task_error() -> None:
    """A failed close frame means the client went first; that is normal and must not surface as an
    unhandled task exception (asyncio logs those as errors, one per such client)."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        sock = FakeSocket()
        conn = conn_for(sock)
        sock.writable.clear()
        conn.close(CloseCode.NORMAL)
        await asyncio.sleep(0.01)
        sock.broken = True  # the close frame's write fails: the peer is gone
        sock.writable.set()
        for _ in range(5):
            await asyncio.sleep(0)
        del conn
        gc.collect()  # an unretrieved task exception is reported when the task is collected
        assert errors == []
    finally:
        loop.set_exception_handler(None)


class MeteredSocket:
    """An ASGI send that writes one frame per credit, as a peer reading slowly lets a few through."""

    def __init__(self) -> None:
        self.credits: asyncio.Queue[None] = asyncio.Queue()
        self.texts: list[str] = []

    async def send(self, message: dict[str, Any]) -> None:
        await self.credits.get()
        if message["type"] == "websocket.send":
            self.texts.append(message["text"])

    async def let_through(self, count: int) -> None:
        before = len(self.texts)
        for _ in range(count):
            self.credits.put_nowait(None)
        for _ in range(20):
            await asyncio.sleep(0)
        assert len(self.texts) == before + count


async def test_each_frame_written_stops_counting_against_the_byte_bound_as_it_goes() -> None:
    sock = MeteredSocket()
    conn = Connection("p.c", sock.send, outbox_size=1000, outbox_bytes=12)
    assert conn.offer("aaaa") and conn.offer("bbbb") and conn.offer("cccc")  # 12: at the bound
    await sock.let_through(1)  # the stalled frame is written: 8 held
    assert conn.offer("dddd")  # 12 again
    await sock.let_through(1)  # one backlogged frame is written: 8 held
    assert conn.offer("eeee")  # 12
    assert not conn.offer("ffff")  # 16 > 12: slow
    assert conn.close_code == CloseCode.SLOW_CONSUMER
    assert sock.texts == ["aaaa", "bbbb"]


async def test_a_send_that_yields_to_the_loop_once_is_finished_on_the_next_turn() -> None:
    written: list[str] = []

    async def send(message: dict[str, Any]) -> None:
        await asyncio.sleep(0)  # a bare yield, as a send that lets others run before writing
        written.append(message["text"])

    conn = Connection("p.c", send, outbox_size=10)
    assert conn.offer("a") and conn.offer("b")
    for _ in range(5):
        await asyncio.sleep(0)
    assert written == ["a", "b"] and conn.backlog == 0


async def test_a_close_that_cannot_be_written_at_all_leaves_the_connection_closed() -> None:
    sock = FakeSocket()
    conn = conn_for(sock)
    sock.broken = True  # the peer is already gone: the close frame's write fails at once
    conn.close(CloseCode.NORMAL)
    assert conn.state is State.CLOSED and conn.close_code == CloseCode.NORMAL
    assert not conn.offer("a")


async def test_a_send_that_waits_by_yielding_to_the_loop_lets_the_loop_run_meanwhile() -> None:
    """A send may wait with bare yields (`await asyncio.sleep(0)` until something is ready): each one
    must be a trip round the loop, as a Task makes it, or what it waits for can never happen."""
    ready = False
    written: list[str] = []

    async def send(message: dict[str, Any]) -> None:
        for _ in range(100):
            if ready:
                written.append(message["text"])
                return
            await asyncio.sleep(0)
        raise OSError("what the send waited for never happened")

    async def make_ready() -> None:
        nonlocal ready
        for _ in range(3):  # a few turns of the loop, as a transport resuming writing takes
            await asyncio.sleep(0)
        ready = True

    conn = Connection("p.c", send, outbox_size=10)
    assert conn.offer("a")  # waits: the writer task finishes the send
    await make_ready()
    for _ in range(5):
        await asyncio.sleep(0)
    assert written == ["a"] and conn.state is State.OPEN and conn.backlog == 0


async def test_a_slow_consumer_closed_while_its_writer_waits_still_gets_the_close_frame() -> None:
    """The writer task is already waiting on the stalled socket when the backlog overflows: stopping
    it must not stop the close frame that follows, nor mark the client gone before it went."""
    sock = FakeSocket()
    conn = conn_for(sock, outbox=2)
    sock.writable.clear()
    assert conn.offer("a")
    for _ in range(5):
        await asyncio.sleep(0)  # the writer task runs and waits for the socket
    assert [conn.offer(f) for f in "bcd"] == [True, True, False]
    for _ in range(5):
        await asyncio.sleep(0)  # the writer task is stopped meanwhile
    assert conn.state is State.CLOSING
    sock.writable.set()
    for _ in range(5):
        await asyncio.sleep(0)
    assert sock.texts == [] and sock.close_codes == [CloseCode.SLOW_CONSUMER]


class Clock:
    """A monotonic clock the test moves, for the age bound at its exact edge."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


async def test_a_backlog_exactly_the_max_age_old_is_within_it_and_older_is_slow(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Behind for *more than* outbox_max_age is slow (RELAY_OUTBOX_MAX_AGE); at the age itself the
    member still keeps its place."""
    clock = Clock()
    monkeypatch.setattr(connection, "time", clock)
    sock = FakeSocket()
    conn = conn_for(sock, outbox=1000, outbox_max_age=5.0)
    sock.writable.clear()
    assert conn.offer("a")  # the backlog begins now
    clock.now += 5.0
    assert conn.offer("b") and conn.state is State.OPEN
    clock.now += 0.001
    assert not conn.offer("c") and conn.close_code == CloseCode.SLOW_CONSUMER

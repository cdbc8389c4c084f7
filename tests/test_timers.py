"""The one event-loop timer for many deadlines (service/timers.py)."""

from __future__ import annotations

import asyncio
from typing import Any

from service.timers import Due, Wheel, wheel


async def test_the_wheel_runs_deadlines_in_order_once_and_skips_cancelled_ones() -> None:
    loop = asyncio.get_running_loop()
    wheel = Wheel(loop)
    ran: list[str] = []
    done = loop.create_future()

    def record(name: str) -> None:
        ran.append(name)
        if name == "last":
            done.set_result(None)

    wheel.call_later(0.06, record, "c")
    wheel.call_later(0.02, record, "a")
    skipped = wheel.call_later(0.03, record, "cancelled")
    wheel.call_later(0.04, record, "b")
    wheel.call_later(0.1, record, "last")
    wheel.call_later(0.0, lambda owner: 1 / 0, None)  # a failing callback is reported, the rest run
    skipped.cancel()
    assert skipped.cancelled()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: errors.append(context))
    try:
        await asyncio.wait_for(done, 2)
    finally:
        loop.set_exception_handler(None)
    assert ran == ["a", "b", "c", "last"]
    assert len(wheel) == 0
    assert [type(e["exception"]) for e in errors] == [ZeroDivisionError]
    due = Due(1.0, record, "x")
    assert due < Due(2.0, record, "y")


async def test_each_loop_has_one_wheel() -> None:
    loop = asyncio.get_running_loop()
    assert wheel(loop) is wheel(loop)

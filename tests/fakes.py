"""Fakes for unit tests of pure logic only: an ASGI send that behaves like uvicorn's."""

from __future__ import annotations

import asyncio
from typing import Any


class FakeSocket:
    """An ASGI `send` shaped like uvicorn's: it awaits `writable` (cleared while the transport is
    paused) and then writes without suspending."""

    def __init__(self) -> None:
        self.writable = asyncio.Event()
        self.writable.set()
        self.sent: list[dict[str, Any]] = []
        self.broken = False

    async def send(self, message: dict[str, Any]) -> None:
        await self.writable.wait()
        if self.broken:
            raise OSError("client disconnected")
        self.sent.append(message)

    @property
    def texts(self) -> list[str]:
        return [m["text"] for m in self.sent if m["type"] == "websocket.send"]

    @property
    def close_codes(self) -> list[int]:
        return [m["code"] for m in self.sent if m["type"] == "websocket.close"]

"""A small asyncio client for relay's protocol v1, for backends, scripts and tests.

    async with await RelayClient.connect("ws://relay:8000/chat", token=token) as client:
        await client.join("news")
        await client.publish("chat", {"text": "hi"})      # returns once the broker accepted it
        delivery = await client.receive()                  # Delivery(group="chat", message={...})

`publish` and `send` put the fields beside `task`/`group_name` (the seed protocol forwards the whole
object), so receivers see them at the top level of `message`. Requests are answered by `{"ack": ref}`
or raise `RelayError` with the relay's error code.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import websockets
from websockets.asyncio.client import ClientConnection

from service.protocol import SUBPROTOCOL


class RelayError(Exception):
    """The relay answered a request with an error frame."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class Delivery:
    """A message received: `group` is None for a direct send."""

    group: str | None
    message: Any


class RelayClient:
    """One v1 connection. Create with `await RelayClient.connect(...)`."""

    def __init__(self, ws: ClientConnection, channel_id: str) -> None:
        self.ws = ws
        self.channel_id = channel_id
        self._refs = itertools.count(1)
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._deliveries: asyncio.Queue[Delivery | BaseException] = asyncio.Queue()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def connect(
        cls, url: str, *, token: str | None = None, origin: str | None = None, timeout: float = 10.0
    ) -> RelayClient:
        """Open a v1 socket at `url` (its path names a first group; `/` for none)."""
        if token is not None:
            parts = urlsplit(url)
            query = "&".join(q for q in (parts.query, urlencode({"token": token})) if q)
            url = urlunsplit(parts._replace(query=query))
        ws = await websockets.connect(
            url,
            subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
            origin=origin,  # type: ignore[arg-type]
            open_timeout=timeout,
        )
        try:
            welcome = json.loads(await asyncio.wait_for(ws.recv(), timeout))
            return cls(ws, welcome["message"]["channel_id"])
        except websockets.ConnectionClosed:
            await ws.close()
            raise

    async def join(self, group: str) -> None:
        await self._request({"task": "join", "group_name": group})

    async def leave(self, group: str) -> None:
        await self._request({"task": "leave", "group_name": group})

    async def publish(self, group: str, fields: dict[str, Any]) -> None:
        """Send to every member of `group`; returns once the broker accepted it."""
        await self._request({"task": "send_message_to_group", "group_name": group, **fields})

    async def send(self, channel_id: str, fields: dict[str, Any]) -> None:
        """Send to one connection by its channel id."""
        await self._request({"task": "send_message_to_channel", "channel_id": channel_id, **fields})

    async def receive(self, timeout: float | None = None) -> Delivery:
        """The next message; raises ConnectionClosed once the socket is closed."""
        item = await asyncio.wait_for(self._deliveries.get(), timeout)
        if isinstance(item, BaseException):
            self._deliveries.put_nowait(item)  # every later call sees the close too
            raise item
        return item

    async def close(self) -> None:
        await self.ws.close()
        await asyncio.gather(self._reader, return_exceptions=True)

    async def __aenter__(self) -> RelayClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _request(self, body: dict[str, Any], timeout: float = 10.0) -> None:
        ref = next(self._refs)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending[ref] = done
        try:
            await self.ws.send(json.dumps({**body, "ref": ref}))
            await asyncio.wait_for(done, timeout)
        finally:
            self._pending.pop(ref, None)

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                frame = json.loads(raw)
                if "ack" in frame:
                    self._settle(frame["ack"], None)
                elif "error" in frame:
                    error = frame["error"]
                    self._settle(error.get("ref"), RelayError(error["code"], error["detail"]))
                else:
                    self._deliveries.put_nowait(Delivery(frame.get("group"), frame["message"]))
            await self.ws.wait_closed()
        except websockets.ConnectionClosed:
            pass
        closed = self.ws.close_exc
        self._deliveries.put_nowait(closed)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(closed)

    def _settle(self, ref: Any, error: RelayError | None) -> None:
        future = self._pending.get(ref) if isinstance(ref, int) else None
        if future is None or future.done():
            return
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)

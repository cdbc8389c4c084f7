"""A small asyncio client for relay's protocol v1, for backends, scripts and tests.

    async with await RelayClient.connect("ws://relay:8000/chat", token=token) as client:
        await client.join("news")
        await client.publish("chat", {"text": "hi"})      # returns once the broker accepted it
        delivery = await client.receive()                  # Delivery(group="chat", message={...})

`publish` and `send` put the fields beside `task`/`group_name` (the seed protocol forwards the whole
object), so receivers see them at the top level of `message`. Requests are answered by `{"ack": ref}`
or raise `RelayError` with the relay's error code.

With `reconnect=True` (and one or more URLs: the Service, or several pods) the client survives its
socket: when a pod drains (1012) or dies, it connects again, to the next URL, with backoff, and joins
every group again from the last position it saw. For groups that keep history relay then sends what
was missed first, so `receive()` goes on with no gap and no duplicate; where history no longer holds
it, `receive()` raises `MessagesMissed` once for that group, and the application reloads its state.
A publish that was in flight is sent again with the same idempotency key, so it is stored once.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import websockets
from websockets.asyncio.client import ClientConnection

from service.protocol import SUBPROTOCOL

TERMINAL = range(4500, 5000)  # close codes after which reconnecting as-is fails the same way
BACKOFF = (0.05, 2.0)


class RelayError(Exception):
    """The relay answered a request with an error frame."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


class MessagesMissed(Exception):
    """After a reconnect, relay could not send everything `group` published meanwhile (its
    history was trimmed or lost: `reason`). Raised once by `receive()`; reload the group's state."""

    def __init__(self, group: str, reason: str) -> None:
        super().__init__(f"messages of {group!r} were missed while reconnecting ({reason})")
        self.group = group
        self.reason = reason


@dataclass(frozen=True)
class Delivery:
    """A message received: `group` is None for a direct send; `epoch` and `offset` are its
    position in a group that keeps history."""

    group: str | None
    message: Any
    epoch: str | None = None
    offset: int | None = None


class RelayClient:
    """One v1 connection, or with `reconnect` a session over successive ones. Create it with
    `await RelayClient.connect(...)`."""

    def __init__(
        self, urls: Sequence[str], options: dict[str, Any], reconnect: bool, backoff: tuple[float, float]
    ) -> None:
        self._urls = list(urls)
        self._options = options
        self._reconnect = reconnect
        self._backoff = backoff
        self._next_url = 0
        self._refs = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._deliveries: asyncio.Queue[Delivery | BaseException] = asyncio.Queue()
        # Per joined group: the position to rejoin from (the last delivery, or where a join's ack
        # said the group stood), and the last delivery given to the application (to drop repeats;
        # kept apart because a `latest` group's ack names the very message that follows it).
        self._groups: dict[str, tuple[str, int] | None] = {}
        self._seen: dict[str, tuple[str, int]] = {}
        self._connected = asyncio.Event()
        self._closing = False
        self.ws: ClientConnection
        self.channel_id = ""
        self.reconnects = 0
        self._reader: asyncio.Task[None] | None = None
        self._rejoining: asyncio.Task[None] | None = None

    @classmethod
    async def connect(
        cls,
        url: str | Sequence[str],
        *,
        token: str | None = None,
        origin: str | None = None,
        timeout: float = 10.0,
        reconnect: bool = False,
        backoff: tuple[float, float] = BACKOFF,
    ) -> RelayClient:
        """Open a v1 socket at `url` (its path names a first group; `/` for none). Several URLs
        are tried in turn when reconnecting, each attempt after a jittered delay that starts at
        `backoff[0]` seconds and doubles up to `backoff[1]` (no stampede when a pod drains)."""
        urls = [url] if isinstance(url, str) else list(url)
        if token is not None:
            urls = [_with_token(u, token) for u in urls]
        client = cls(urls, {"origin": origin, "timeout": timeout}, reconnect, backoff)
        first = urlsplit(urls[0]).path.strip("/").replace("/", "_")
        await client._open(urls[0])
        if first:
            client._groups[first] = None  # the path's group, joined by the handshake
        client._reader = asyncio.get_running_loop().create_task(client._run())
        return client

    async def join(self, group: str) -> None:
        answer = await self._request({"task": "join", "group_name": group})
        self._groups[group] = _position(answer) or self._groups.get(group)

    async def leave(self, group: str) -> None:
        await self._request({"task": "leave", "group_name": group})
        self._groups.pop(group, None)
        self._seen.pop(group, None)

    async def publish(
        self, group: str, fields: dict[str, Any], idempotency_key: str | None = None
    ) -> tuple[str, int] | None:
        """Send to every member of `group`; returns once the broker accepted it, with the
        message's position if the group keeps history. With `reconnect`, a publish cut off by a
        reconnect is sent again with the same idempotency key (one is made if none is given)."""
        key = idempotency_key or (secrets.token_urlsafe(12) if self._reconnect else None)
        body: dict[str, Any] = {"task": "send_message_to_group", "group_name": group, **fields}
        if key is not None:
            body["idempotency_key"] = key
        return _position(await self._request(body, resend=self._reconnect))

    async def send(self, channel_id: str, fields: dict[str, Any]) -> None:
        """Send to one connection by its channel id."""
        await self._request({"task": "send_message_to_channel", "channel_id": channel_id, **fields})

    async def receive(self, timeout: float | None = None) -> Delivery:
        """The next message. Raises ConnectionClosed once the socket is closed for good, and
        MessagesMissed (once) when a reconnect could not recover a group."""
        item = await asyncio.wait_for(self._deliveries.get(), timeout)
        if isinstance(item, MessagesMissed):
            raise item
        if isinstance(item, BaseException):
            self._deliveries.put_nowait(item)  # every later call sees the close too
            raise item
        return item

    async def close(self) -> None:
        self._closing = True
        await self.ws.close()
        for task in (self._reader, self._rejoining):
            if task is not None:
                await asyncio.gather(task, return_exceptions=True)

    async def __aenter__(self) -> RelayClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # --- the connection ------------------------------------------------------------------------

    async def _open(self, url: str) -> None:
        ws = await websockets.connect(
            url,
            subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
            origin=self._options["origin"],
            open_timeout=self._options["timeout"],
        )
        try:
            welcome = json.loads(await asyncio.wait_for(ws.recv(), self._options["timeout"]))
        except websockets.ConnectionClosed:
            await ws.close()
            raise
        self.ws = ws
        self.channel_id = welcome["message"]["channel_id"]
        self._connected.set()

    async def _run(self) -> None:
        """Read until the socket closes; with `reconnect`, open the next one and rejoin."""
        while True:
            await self._read()
            closed = self.ws.close_exc
            code = self.ws.close_code
            if self._closing or not self._reconnect or (code is not None and code in TERMINAL):
                self._deliveries.put_nowait(closed)
                self._fail_pending(closed)
                return
            self._connected.clear()
            self._fail_pending(_Interrupted())  # requests that allow it are sent again
            if not await self._reopen():
                self._deliveries.put_nowait(closed)
                return

    async def _reopen(self) -> bool:
        delay = self._backoff[0]
        while not self._closing:
            await asyncio.sleep(random.uniform(delay / 2, delay))
            delay = min(delay * 2, self._backoff[1])
            self._next_url = (self._next_url + 1) % len(self._urls)
            url = _at_root(self._urls[self._next_url])  # groups are joined again below, with since
            try:
                await self._open(url)
            except (OSError, TimeoutError, websockets.InvalidHandshake, websockets.ConnectionClosed):
                continue
            self.reconnects += 1
            self._rejoining = asyncio.get_running_loop().create_task(self._rejoin())
            return True
        return False

    async def _rejoin(self) -> None:
        for group, position in list(self._groups.items()):
            body: dict[str, Any] = {"task": "join", "group_name": group}
            if position is not None:
                body["since"] = {"epoch": position[0], "offset": position[1]}
            try:
                answer = await self._request(body)
            except (RelayError, websockets.ConnectionClosed, _Interrupted, TimeoutError):
                return  # the next reconnect tries again
            if answer.get("recovered") is False:
                self._deliveries.put_nowait(MessagesMissed(group, str(answer.get("reason"))))
            if group in self._groups:
                latest = _position(answer)
                if position is None or answer.get("recovered") is False:
                    self._groups[group] = latest

    async def _request(
        self, body: dict[str, Any], timeout: float = 10.0, resend: bool = False
    ) -> dict[str, Any]:
        while True:
            await asyncio.wait_for(self._connected.wait(), timeout)
            ref = next(self._refs)
            done: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
            self._pending[ref] = done
            try:
                await self.ws.send(json.dumps({**body, "ref": ref}))
                return await asyncio.wait_for(done, timeout)
            except (_Interrupted, websockets.ConnectionClosed):
                if not (resend and self._reconnect and not self._closing):
                    raise
            finally:
                self._pending.pop(ref, None)

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                frame = json.loads(raw)
                if "ack" in frame:
                    self._settle(frame["ack"], frame)
                elif "error" in frame:
                    error = frame["error"]
                    self._settle(error.get("ref"), RelayError(error["code"], error["detail"]))
                else:
                    self._deliver(frame)
            await self.ws.wait_closed()
        except websockets.ConnectionClosed:
            pass

    def _deliver(self, frame: dict[str, Any]) -> None:
        group, offset = frame.get("group"), frame.get("offset")
        if group is not None and offset is not None:
            seen = self._seen.get(group)
            if seen is not None and seen[0] == frame["epoch"] and offset <= seen[1]:
                return  # had it already (overlapping recoveries)
            self._seen[group] = (frame["epoch"], offset)
            if group in self._groups:
                self._groups[group] = (frame["epoch"], offset)
        self._deliveries.put_nowait(Delivery(group, frame["message"], frame.get("epoch"), offset))

    def _settle(self, ref: Any, answer: dict[str, Any] | RelayError) -> None:
        future = self._pending.get(ref) if isinstance(ref, int) else None
        if future is None or future.done():
            return
        if isinstance(answer, RelayError):
            future.set_exception(answer)
        else:
            future.set_result(answer)

    def _fail_pending(self, error: BaseException | None) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error or ConnectionError("closed"))


class _Interrupted(Exception):
    """The socket a request was sent on closed before its answer; a reconnect follows."""


def _position(answer: dict[str, Any]) -> tuple[str, int] | None:
    epoch, offset = answer.get("epoch"), answer.get("offset")
    return (epoch, offset) if isinstance(epoch, str) and isinstance(offset, int) else None


def _with_token(url: str, token: str) -> str:
    parts = urlsplit(url)
    query = "&".join(q for q in (parts.query, urlencode({"token": token})) if q)
    return urlunsplit(parts._replace(query=query))


def _at_root(url: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/"))

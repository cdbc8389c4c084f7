"""A TCP proxy between relay and a real redis-server, to break what Redis sends on purpose.

Everything passes through unchanged until the test breaks it: `corrupt()` writes bytes of its
choosing into the stream towards relay on every open connection (a middlebox gone wrong, a server
speaking something other than RESP); `mute()` drops Redis's replies on one connection and keeps it
open; `cut()` lets relay's commands through to Redis but drops Redis's replies, then closes the
connections: commands carried out whose outcome relay never learns, as when a network partition or
a dying node takes the replies with it. `delay()` holds each reply a while (a slow network or a
busy Redis).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable


class RedisProxy:
    """Listens on 127.0.0.1:<port> and forwards to 127.0.0.1:<target>."""

    def __init__(self, target: int) -> None:
        self._target = target
        self._server: asyncio.Server | None = None
        self._towards_relay: list[asyncio.StreamWriter] = []
        self._connections: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self._muted: set[asyncio.StreamWriter] = set()  # towards relay: replies dropped
        self._tasks: set[asyncio.Task[None]] = set()
        self._delay = 0.0  # seconds each chunk towards relay is held
        self.port = 0

    async def __aenter__(self) -> RedisProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._towards_relay:
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def corrupt(self, data: bytes) -> int:
        """Write `data` towards relay on every open connection; how many it went to."""
        live = [w for w in self._towards_relay if not w.is_closing()]
        for writer in live:
            writer.write(data)
        return len(live)

    def mute(self, connection: int) -> None:
        """Drop Redis's replies on one connection (an index into the connections in the order relay
        opened them; -1 the newest) and leave it open: a Redis that stopped answering it only."""
        self._muted.add(self._connections[connection][0])

    def delay(self, seconds: float) -> None:
        """Hold every chunk of replies towards relay `seconds` before passing it on, on every
        connection from now on (0: at once again)."""
        self._delay = seconds

    async def cut(self, after: float) -> int:
        """Drop every reply on the open connections from now on and close them `after` seconds
        later; connections made afterwards pass through. How many were cut."""
        cut = [c for c in self._connections if not c[0].is_closing()]
        self._muted.update(to_relay for to_relay, _ in cut)
        await asyncio.sleep(after)
        for to_relay, to_redis in cut:
            to_relay.close()
            to_redis.close()
        return len(cut)

    async def _accept(self, from_relay: asyncio.StreamReader, to_relay: asyncio.StreamWriter) -> None:
        from_redis, to_redis = await asyncio.open_connection("127.0.0.1", self._target)
        self._towards_relay.append(to_relay)
        self._connections.append((to_relay, to_redis))
        towards = ((from_relay, to_redis, lambda: 0.0), (from_redis, to_relay, lambda: self._delay))
        for source, sink, hold in towards:
            task = asyncio.get_running_loop().create_task(_pump(source, sink, self._muted, hold))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


async def _pump(
    source: asyncio.StreamReader,
    sink: asyncio.StreamWriter,
    muted: set[asyncio.StreamWriter],
    hold: Callable[[], float],
) -> None:
    try:
        while data := await source.read(65536):
            if sink in muted:
                continue
            if (seconds := hold()) > 0:
                await asyncio.sleep(seconds)
            sink.write(data)
            await sink.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        with contextlib.suppress(Exception):
            sink.close()

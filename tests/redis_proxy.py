"""A TCP proxy between relay and a real redis-server, to break what Redis sends on purpose.

Everything passes through unchanged until `corrupt()` writes bytes of the test's choosing into the
stream towards relay on every open connection: a middlebox gone wrong, or a server speaking
something other than RESP.
"""

from __future__ import annotations

import asyncio
import contextlib


class RedisProxy:
    """Listens on 127.0.0.1:<port> and forwards to 127.0.0.1:<target>."""

    def __init__(self, target: int) -> None:
        self._target = target
        self._server: asyncio.Server | None = None
        self._towards_relay: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()
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

    async def _accept(self, from_relay: asyncio.StreamReader, to_relay: asyncio.StreamWriter) -> None:
        from_redis, to_redis = await asyncio.open_connection("127.0.0.1", self._target)
        self._towards_relay.append(to_relay)
        for source, sink in ((from_relay, to_redis), (from_redis, to_relay)):
            task = asyncio.get_running_loop().create_task(_pump(source, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        with contextlib.suppress(Exception):
            sink.close()

"""The physical limit for Python on this machine: the seed protocol in one asyncio + uvloop process.

No framework, no Redis, no limits, no metrics, no history: an RFC 6455 handshake, the welcome frame,
`send_message_to_group` relayed to every member of the group as `{"message": <the object sent>}`
(the raw text, never re-encoded), each server frame built once per message and written to every
member's transport, and groups kept in a dict. Nothing a production relay needs, so every relay figure
in `make bench` is also a ratio to what Python itself can do here, in the same run.

    .venv-load/bin/python -m loadtest.peers.minimal --port 8010

It trusts its clients (loopback load generators): frames larger than 64 KiB, fragmented frames and
extensions are not supported, a malformed frame closes the connection.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import signal
import struct
from collections.abc import Callable

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_PAYLOAD = 65536


def server_frame(payload: bytes, opcode: int = 1) -> bytes:
    """A whole unmasked server frame (FIN set)."""
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 65536:
        return bytes((0x80 | opcode, 126)) + struct.pack("!H", n) + payload
    return bytes((0x80 | opcode, 127)) + struct.pack("!Q", n) + payload


class Hub:
    def __init__(self) -> None:
        self.groups: dict[str, set[Member]] = {}
        self.channels: dict[str, Member] = {}
        self.prefix = os.urandom(4).hex()
        self.count = 0

    def new_id(self) -> str:
        self.count += 1
        return f"{self.prefix}.{self.count}"


class Member(asyncio.Protocol):
    """One socket: the handshake, then frames. Writes go straight to the transport (no queue)."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.group = ""
        self.channel = ""
        self.open = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.open:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self._handshake(bytes(self.buf[:end]))
            del self.buf[: end + 4]
        self._frames()

    def _handshake(self, head: bytes) -> None:
        assert self.transport is not None
        lines = head.decode("latin-1").split("\r\n")
        path = lines[0].split(" ")[1]
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        accept = base64.b64encode(hashlib.sha1(headers["sec-websocket-key"].encode() + GUID).digest())
        self.transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        self.open = True
        self.group = path.strip("/").replace("/", "_") or "root"
        self.channel = self.hub.new_id()
        self.hub.groups.setdefault(self.group, set()).add(self)
        self.hub.channels[self.channel] = self
        welcome = json.dumps({"message": {"channel_id": self.channel}}).encode()
        self.transport.write(server_frame(welcome))

    def _frames(self) -> None:
        buf = self.buf
        while len(buf) >= 2:
            opcode, n, at = buf[0] & 0x0F, buf[1] & 0x7F, 2
            if n == 126:
                if len(buf) < 4:
                    return
                n, at = struct.unpack_from("!H", buf, 2)[0], 4
            elif n == 127:
                self._close(1009)
                return
            if len(buf) < at + 4 + n:
                return
            key = bytes(buf[at : at + 4]) * (n // 4 + 1)
            masked = int.from_bytes(buf[at + 4 : at + 4 + n], "big")
            payload = (masked ^ int.from_bytes(key[:n], "big")).to_bytes(n, "big")
            del buf[: at + 4 + n]
            if opcode == 8:
                self._close(1000)
                return
            if opcode == 9:  # ping
                assert self.transport is not None
                self.transport.write(server_frame(payload, 10))
            elif opcode == 1:
                self._text(payload)

    def _text(self, payload: bytes) -> None:
        try:
            message = json.loads(payload)
        except ValueError:
            return
        if not isinstance(message, dict):
            return
        frame = server_frame(b'{"message": ' + payload + b"}")
        if message.get("task") == "send_message_to_group":
            for member in self.hub.groups.get(str(message.get("group_name")), ()):
                if member.transport is not None:
                    member.transport.write(frame)
        elif message.get("task") == "send_message_to_channel":
            target = self.hub.channels.get(str(message.get("channel_id")))
            if target is not None and target.transport is not None:
                target.transport.write(frame)

    def _close(self, code: int) -> None:
        if self.transport is not None:
            self.transport.write(server_frame(struct.pack("!H", code), 8))
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.open:
            members = self.hub.groups.get(self.group)
            if members is not None:
                members.discard(self)
                if not members:
                    del self.hub.groups[self.group]
            self.hub.channels.pop(self.channel, None)
        self.transport = None


async def serve(host: str, port: int) -> None:
    hub = Hub()
    loop = asyncio.get_running_loop()
    factory: Callable[[], Member] = lambda: Member(hub)  # noqa: E731
    server = await loop.create_server(factory, host, port, backlog=4096, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8010)
    args = p.parse_args()
    import uvloop

    uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()

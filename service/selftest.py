"""`python -m service.selftest --url ws://relay:8000`: an end-to-end check of a running relay.

The `helm test` pod runs it through the chart's Service. Two seed-protocol clients join a fresh
random group, one publishes, and both must receive the frame: behind a Service with several pods
the two sockets usually land on different pods, so the message crosses the broker. Exit 0 when it
did, 1 with one line that says what went wrong.

With authentication on, give it a token (`--token` or RELAY_SELFTEST_TOKEN, which the chart fills
from a Secret) whose `groups` and `publish` claims allow `selftest-*`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlencode

import websockets
from websockets.asyncio.client import ClientConnection


class SelfTestFailed(Exception):
    """The relay did not behave as the seed protocol says; the message says how."""


async def _next_json(ws: ClientConnection, timeout: float, what: str) -> Any:
    try:
        raw = await asyncio.wait_for(ws.recv(), timeout)
    except TimeoutError:
        raise SelfTestFailed(f"no {what} within {timeout:g} s") from None
    except websockets.ConnectionClosed as exc:
        code = exc.rcvd.code if exc.rcvd else None
        raise SelfTestFailed(f"socket closed (code {code}) while waiting for {what}") from None
    try:
        return json.loads(raw)
    except (TypeError, ValueError):
        raise SelfTestFailed(f"{what} is not JSON: {raw!r:.200}") from None


async def _join(url: str, timeout: float) -> tuple[ClientConnection, str]:
    try:
        ws = await websockets.connect(url, open_timeout=timeout, close_timeout=2)
    except (OSError, TimeoutError, websockets.InvalidHandshake) as exc:
        raise SelfTestFailed(f"cannot open {url}: {exc!r}") from None
    welcome = await _next_json(ws, timeout, "welcome frame")
    channel_id = welcome.get("message", {}).get("channel_id") if isinstance(welcome, dict) else None
    if not isinstance(channel_id, str):
        await ws.close()
        raise SelfTestFailed(f"first frame is not a channel id announcement: {welcome!r:.200}")
    return ws, channel_id


async def run(base_url: str, clients: int = 2, timeout: float = 10.0, token: str | None = None) -> list[str]:
    """One round: `clients` sockets join a new group, the first publishes, all must receive it.

    Returns the channel ids (their prefix names the pod each socket landed on).
    """
    group = "selftest-" + secrets.token_hex(6)
    url = base_url.rstrip("/") + "/" + group + (f"?{urlencode({'token': token})}" if token else "")
    sockets: list[ClientConnection] = []
    try:
        ids: list[str] = []
        for _ in range(clients):
            ws, channel_id = await _join(url, timeout)
            sockets.append(ws)
            ids.append(channel_id)
        body = {"task": "send_message_to_group", "group_name": group, "nonce": secrets.token_hex(8)}
        await sockets[0].send(json.dumps(body))
        for i, ws in enumerate(sockets):
            frame = await _next_json(ws, timeout, f"published message on client {i + 1} ({ids[i]})")
            if frame != {"message": body}:
                raise SelfTestFailed(f"client {i + 1} ({ids[i]}) received {frame!r:.200}, not the message")
        return ids
    finally:
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)


async def run_with_retries(
    url: str, clients: int, timeout: float, attempts: int, token: str | None = None
) -> list[str]:
    """`run`, retried with a short backoff: a pod may still be joining the Service's endpoints."""
    for attempt in range(1, attempts + 1):
        try:
            return await run(url, clients, timeout, token)
        except SelfTestFailed as exc:
            if attempt == attempts:
                raise
            print(f"relay selftest: attempt {attempt} failed: {exc}; retrying", file=sys.stderr)
            await asyncio.sleep(min(2.0**attempt, 10.0))
    raise AssertionError("unreachable")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m service.selftest", description="End-to-end check of a running relay."
    )
    p.add_argument("--url", default="ws://127.0.0.1:8000", help="relay WebSocket base URL (ws:// or wss://)")
    p.add_argument("--clients", type=int, default=2, help="sockets that join the group (at least 2)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for each step")
    p.add_argument("--attempts", type=int, default=3, help="rounds to try before failing")
    p.add_argument(
        "--token",
        default=os.environ.get("RELAY_SELFTEST_TOKEN") or None,
        help="client token for pods with authentication on (default: $RELAY_SELFTEST_TOKEN)",
    )
    args = p.parse_args(argv)
    if args.clients < 2 or args.attempts < 1 or args.timeout <= 0:
        p.error("--clients must be at least 2, --attempts at least 1 and --timeout positive")
    started = time.monotonic()
    try:
        ids = asyncio.run(run_with_retries(args.url, args.clients, args.timeout, args.attempts, args.token))
    except SelfTestFailed as exc:
        print(f"relay selftest FAILED against {args.url}: {exc}", file=sys.stderr)
        return 1
    pods = sorted({channel_id.partition(".")[0] for channel_id in ids})
    elapsed = (time.monotonic() - started) * 1000
    print(
        f"relay selftest OK: {len(ids)} clients on pod(s) {', '.join(pods)} "
        f"received the group message ({elapsed:.0f} ms)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What one pod does with a server API command from the control channel, on its own connections.

Each returns what it did as JSON-ready values; service/server_api.py adds the pods' answers up.
The arguments were checked by the pod that took the HTTP request; here they are read defensively
all the same (anything on the control channel reached Redis, not necessarily through relay).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from service import channels, metrics
from service.connection import Connection, State
from service.hub import Hub
from service.protocol import GROUP_NAME
from service.revocations import MAX_DENY_SECONDS, Revocations

Args = dict[str, Any]
Result = dict[str, Any]


def _strings(value: object) -> set[str]:
    return {v for v in value if isinstance(v, str)} if isinstance(value, list) else set()


class Commands:
    """Carries out server API commands on this pod's connections."""

    def __init__(self, hub: Hub, revocations: Revocations, describe: Callable[[], Result]) -> None:
        self._hub = hub
        self._revocations = revocations
        self._describe = describe  # this pod's info (service/pod.py)

    async def __call__(self, command: str, args: Args) -> Result:
        if command not in metrics.SERVER_COMMANDS:
            return {"error": "unknown_command"}
        metrics.SERVER_API_COMMANDS.labels(command).inc()
        if command == "disconnect":
            return self.disconnect(args)
        if command in ("subscribe", "unsubscribe"):
            return await self.change(command, args)
        if command == "groups":
            return self.groups(args)
        return self._describe()

    def _targets(self, args: Args) -> list[Connection]:
        users = _strings(args.get("users"))
        found = [conn for conn in self._hub.connections if conn.sub is not None and conn.sub in users]
        for conn_id in _strings(args.get("channel_ids")):
            conn = self._hub.connection(conn_id)
            if conn is not None and conn.sub not in users:
                found.append(conn)
        return found

    def disconnect(self, args: Args) -> Result:
        deny = args.get("deny")
        if isinstance(deny, dict):
            at, seconds = deny.get("at"), deny.get("seconds")
            if isinstance(at, float | int) and isinstance(seconds, float | int):
                for sub in _strings(args.get("users")):
                    self._revocations.remember(sub, float(at), min(float(seconds), MAX_DENY_SECONDS))
        code, reason = args.get("code"), args.get("reason")
        if not isinstance(code, int) or not 4000 <= code <= 4999 or not isinstance(reason, str):
            return {"error": "bad_arguments"}
        closed = 0
        for conn in self._targets(args):
            if conn.state is State.OPEN:
                conn.close(code, reason)
                closed += 1
        metrics.SERVER_API_AFFECTED.labels("disconnect").inc(closed)
        return {"connections": closed}

    async def change(self, command: str, args: Args) -> Result:
        """subscribe: join the users' connections to the group; unsubscribe: take them out."""
        group = args.get("group")
        if not isinstance(group, str) or GROUP_NAME.fullmatch(group) is None:
            return {"error": "bad_arguments"}
        channel = channels.group(group)
        known = group in self._hub.group_sizes()
        targets = [c for c in self._targets(args) if c.state is State.OPEN]
        if command == "unsubscribe":
            targets = [c for c in targets if channel in c.groups]
        verb = "join" if command == "subscribe" else "leave"
        outcomes = await asyncio.gather(*(self._hub.change(conn, verb, group) for conn in targets))
        changed = sum(outcome != "refused" for outcome in outcomes)
        metrics.SERVER_API_AFFECTED.labels(command).inc(changed)
        return {"connections": changed, "refused": len(outcomes) - changed, "group_known": known}

    def groups(self, args: Args) -> Result:
        limit = args.get("limit")
        limit = limit if isinstance(limit, int) and limit > 0 else 100
        sizes = self._hub.group_sizes()
        largest = sorted(sizes.items(), key=lambda item: (-item[1], item[0]))[:limit]
        return {"groups": dict(largest), "total": len(sizes)}

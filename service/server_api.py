"""The server API: a backend disconnects users, changes their groups, and asks what is going on.

On the internal port with the publish API's keys (RELAY_API_KEYS). Every command acts on every pod:
this pod publishes it on the control channel (service/control.py), each pod carries it out on its
own connections (service/commands.py), and the answer adds up what they did, with which pods
answered within `timeout`. Reference: docs/server-api.md.

    POST /api/disconnect   {"user" | "users" | "channel_id" | "channel_ids", "reconnect", "code",
                            "reason", "deny_seconds", "timeout"}
    POST /api/subscribe    {"user" | "users", "group", "timeout"}
    POST /api/unsubscribe  {"user" | "users", "group", "timeout"}
    GET  /api/groups?limit=&timeout=
    GET  /api/info?timeout=
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service import metrics, protocol
from service.api import authorized, error, read_body
from service.broker import BrokerUnavailable
from service.config import split
from service.control import Gathered
from service.pod import Pod
from service.protocol import CloseCode
from service.revocations import MAX_DENY_SECONDS

MAX_TARGETS = 1000  # users plus channel ids in one request
MAX_SUB_LENGTH = 256
MAX_REASON_BYTES = 123  # what fits in a WebSocket close frame
MAX_GROUPS_LISTED = 1000
DEFAULT_TIMEOUT = 2.0
MAX_TIMEOUT = 10.0


class BadRequest(Exception):
    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


def _list(body: dict[str, Any], one: str, many: str, valid: Any, what: str) -> list[str]:
    """`body[one]` as a list of one, or `body[many]`; each checked by `valid`."""
    values: Any = [body[one]] if one in body else body.get(many, [])
    if one in body and many in body:
        raise BadRequest("bad_request", f'give "{one}" or "{many}", not both')
    if not isinstance(values, list):
        raise BadRequest("bad_request", f'"{many}" must be a list')
    if len(values) > MAX_TARGETS:
        raise BadRequest("too_many", f'"{many}": at most {MAX_TARGETS} in one request')
    for value in values:
        if not isinstance(value, str) or not valid(value):
            raise BadRequest("bad_request", f'"{many}": each must be {what}')
    return list(dict.fromkeys(values))


def _users(body: dict[str, Any]) -> list[str]:
    what = f"a token sub of 1-{MAX_SUB_LENGTH} characters"
    return _list(body, "user", "users", lambda v: 0 < len(v) <= MAX_SUB_LENGTH, what)


def _number(value: Any, name: str, low: float, high: float, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise BadRequest("bad_request", f'"{name}" must be a number from {low} to {high}')
    return float(value)


def _timeout(value: Any) -> float:
    return _number(value, "timeout", 0.05, MAX_TIMEOUT, DEFAULT_TIMEOUT)


def _group(body: dict[str, Any]) -> str:
    group = body.get("group")
    if not isinstance(group, str) or protocol.GROUP_NAME.fullmatch(group) is None:
        raise BadRequest("invalid_group", '"group": 1-99 of A-Za-z0-9 . _ -')
    return group


def _close(body: dict[str, Any]) -> tuple[int, str, bool]:
    """The close code, reason and whether the client may reconnect."""
    reconnect, code = body.get("reconnect"), body.get("code")
    if reconnect is not None and not isinstance(reconnect, bool):
        raise BadRequest("bad_request", '"reconnect" must be true or false')
    if code is not None:
        if isinstance(code, bool) or not isinstance(code, int) or not 4000 <= code <= 4999:
            raise BadRequest("bad_code", '"code" must be 4000-4499 (reconnect) or 4500-4999 (do not)')
        if reconnect is not None and reconnect != (code < 4500):
            raise BadRequest("bad_code", f'"code" {code} contradicts "reconnect": {str(reconnect).lower()}')
        reconnect = code < 4500
    if reconnect is None:
        reconnect = True
    if code is None:
        code = CloseCode.DISCONNECTED if reconnect else CloseCode.REVOKED
    reason = body.get("reason", "disconnected by the server" if reconnect else "access revoked")
    if not isinstance(reason, str) or len(reason.encode()) > MAX_REASON_BYTES:
        raise BadRequest("bad_request", f'"reason" must be a string of at most {MAX_REASON_BYTES} bytes')
    return int(code), reason, reconnect


def _pods(gathered: Gathered) -> dict[str, Any]:
    return {"pods": gathered.reached, "answered": sorted(gathered.answers), "complete": gathered.complete}


def _total(gathered: Gathered, field: str) -> int:
    return sum(int(a.get(field, 0)) for a in gathered.answers.values() if isinstance(a.get(field, 0), int))


def server_api_routes(pod: Pod) -> list[Route]:
    keys = [key.encode() for key in split(pod.settings.api_keys)]
    limit = pod.settings.max_frame_bytes

    async def json_body(request: Request) -> dict[str, Any]:
        body = await read_body(request, limit)
        if body is None:
            raise BadRequest("too_large", f"the body is over RELAY_MAX_FRAME_BYTES ({limit})")
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise BadRequest("bad_json", "the body is not JSON") from None
        if not isinstance(parsed, dict):
            raise BadRequest("bad_request", "the body must be a JSON object")
        return parsed

    async def handle(request: Request, run: Any) -> Response:
        refused = authorized(request, keys)
        if refused is not None:
            return refused
        try:
            answer, status = await run(request)
        except BadRequest as exc:
            if exc.code == "too_large":
                return error(413, "too_large", exc.code, exc.detail)
            return error(400, "bad_request", exc.code, exc.detail)
        except BrokerUnavailable:
            return error(503, "broker_error", "broker_unavailable", "the broker is unreachable; retry later")
        if status == 404:
            return error(404, "not_found", answer["code"], answer["detail"])
        metrics.API_REQUESTS.labels("accepted").inc()
        return JSONResponse(answer, status_code=status)

    async def disconnect(request: Request) -> Response:
        async def run(request: Request) -> tuple[dict[str, Any], int]:
            body = await json_body(request)
            users = _users(body)
            conn_ids = _list(body, "channel_id", "channel_ids", protocol.CHANNEL_ID.fullmatch, "a channel id")
            if not users and not conn_ids:
                raise BadRequest("bad_request", 'give "user", "users", "channel_id" or "channel_ids"')
            if len(users) + len(conn_ids) > MAX_TARGETS:
                raise BadRequest("too_many", f"at most {MAX_TARGETS} users and channel ids in one request")
            code, reason, reconnect = _close(body)
            deny = _number(body.get("deny_seconds"), "deny_seconds", 0, MAX_DENY_SECONDS, 0)
            timeout = _timeout(body.get("timeout"))
            args: dict[str, Any] = {"users": users, "channel_ids": conn_ids, "code": code, "reason": reason}
            if deny:
                if reconnect:
                    raise BadRequest("bad_request", '"deny_seconds" needs "reconnect": false or a 45xx code')
                if not users:
                    raise BadRequest("bad_request", '"deny_seconds" needs "user" or "users" (kept by sub)')
                # Recorded before any pod is told: a reconnect after this cannot get in.
                revoked_at = time.time()
                await asyncio.gather(*(pod.revocations.revoke(sub, revoked_at, deny) for sub in users))
                args["deny"] = {"at": revoked_at, "seconds": deny}
            gathered = await pod.control.ask("disconnect", args, timeout)
            answer: dict[str, Any] = {
                "connections": _total(gathered, "connections"),
                "code": code,
                "reconnect": reconnect,
            }
            if deny:
                answer["denied_seconds"] = deny
            return {**answer, **_pods(gathered)}, 200

        return await handle(request, run)

    def change(command: str) -> Any:
        async def endpoint(request: Request) -> Response:
            async def run(request: Request) -> tuple[dict[str, Any], int]:
                body = await json_body(request)
                users = _users(body)
                if not users:
                    raise BadRequest("bad_request", 'give "user" or "users"')
                group = _group(body)
                timeout = _timeout(body.get("timeout"))
                gathered = await pod.control.ask(command, {"users": users, "group": group}, timeout)
                known = any(a.get("group_known") for a in gathered.answers.values())
                if command == "unsubscribe" and not known and gathered.complete:
                    return {"code": "unknown_group", "detail": f"no pod has members in group {group!r}"}, 404
                answer = {
                    "group": group,
                    "connections": _total(gathered, "connections"),
                    "refused": _total(gathered, "refused"),
                }
                return {**answer, **_pods(gathered)}, 200

            return await handle(request, run)

        return endpoint

    async def groups(request: Request) -> Response:
        async def run(request: Request) -> tuple[dict[str, Any], int]:
            most = _query_number(request, "limit", 1, MAX_GROUPS_LISTED, 100)
            timeout = _timeout(_query_float(request, "timeout"))
            gathered = await pod.control.ask("groups", {"limit": int(most)}, timeout)
            sizes: Counter[str] = Counter()
            for answer in gathered.answers.values():
                listed = answer.get("groups", {})
                if isinstance(listed, dict):
                    sizes.update({k: v for k, v in listed.items() if isinstance(v, int)})
            largest = sizes.most_common(int(most))
            truncated = any(a.get("total", 0) > len(a.get("groups", {})) for a in gathered.answers.values())
            answer = {
                "groups": [{"group": name, "connections": count} for name, count in largest],
                "truncated": truncated or len(sizes) > len(largest),
            }
            return {**answer, **_pods(gathered)}, 200

        return await handle(request, run)

    async def info(request: Request) -> Response:
        async def run(request: Request) -> tuple[dict[str, Any], int]:
            timeout = _timeout(_query_float(request, "timeout"))
            gathered = await pod.control.ask("info", {}, timeout)
            answer = {
                "pod": pod.settings.pod_id,
                "connections": _total(gathered, "connections"),
                "nodes": dict(sorted(gathered.answers.items())),
            }
            return {**answer, **_pods(gathered)}, 200

        return await handle(request, run)

    return [
        Route("/api/disconnect", disconnect, methods=["POST"]),
        Route("/api/subscribe", change("subscribe"), methods=["POST"]),
        Route("/api/unsubscribe", change("unsubscribe"), methods=["POST"]),
        Route("/api/groups", groups, methods=["GET"]),
        Route("/api/info", info, methods=["GET"]),
    ]


def _query_float(request: Request, name: str) -> float | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise BadRequest("bad_request", f"?{name}= must be a number") from None
    if not math.isfinite(value):
        raise BadRequest("bad_request", f"?{name}= must be a number")
    return value


def _query_number(request: Request, name: str, low: float, high: float, default: float) -> float:
    value = _query_float(request, name)
    whole = int(value) if value is not None and value.is_integer() else value
    return _number(whole, name, low, high, default)

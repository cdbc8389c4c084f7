"""The backend publish API: `POST /api/publish` on the internal port.

How a Django (or any) backend sends to a group or one connection without holding a WebSocket:
`{"group": G, "message": M}` or `{"channel_id": C, "message": M}` with `Authorization: Bearer <key>`.
Members receive `{"message": M}` (v1 members `{"group": G, "message": M}`), exactly as if a client had
published. Keys come from RELAY_API_KEYS; listing two lets a key be rotated without downtime.
"""

from __future__ import annotations

import hmac

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service import metrics, protocol
from service.broker import BrokerUnavailable
from service.config import split
from service.pod import Pod
from service.presence import PresenceOff


def error(status: int, outcome: str, code: str, detail: str) -> Response:
    metrics.API_REQUESTS.labels(outcome).inc()
    return JSONResponse({"error": {"code": code, "detail": detail}}, status_code=status)


async def read_body(request: Request, limit: int) -> bytes | None:
    """The request body, or None as soon as it is known to be over `limit` bytes: from its
    Content-Length before reading anything, else while reading, so a client cannot make the pod
    buffer more than `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def authorized(request: Request, keys: list[bytes]) -> Response | None:
    """None when the request carries one of `keys` as a bearer token, else the 401/403 to answer
    (404 when no key is configured: the API is off)."""
    if not keys:
        return error(404, "disabled", "api_disabled", "the API is off: set RELAY_API_KEYS")
    header = request.headers.get("authorization", "")
    if not header.lower().startswith("bearer "):
        return error(401, "unauthorized", "unauthorized", "send Authorization: Bearer <api key>")
    given = header[7:].strip().encode()
    if not any(hmac.compare_digest(given, key) for key in keys):
        return error(403, "forbidden", "forbidden", "unknown API key")
    return None


def api_routes(pod: Pod) -> list[Route]:
    keys = [key.encode() for key in split(pod.settings.api_keys)]
    limit = pod.settings.max_frame_bytes

    async def publish(request: Request) -> Response:
        refused = authorized(request, keys)
        if refused is not None:
            return refused
        body = await read_body(request, limit)
        if body is None:
            return error(413, "too_large", "too_large", f"the body is over RELAY_MAX_FRAME_BYTES ({limit})")
        try:
            request_obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            return error(400, "bad_request", "bad_json", "the body is not JSON")
        if not isinstance(request_obj, dict) or "message" not in request_obj:
            return error(400, "bad_request", "bad_request", 'expected {"group" or "channel_id", "message"}')
        group, channel_id = request_obj.get("group"), request_obj.get("channel_id")
        if (group is None) == (channel_id is None):
            return error(400, "bad_request", "bad_request", 'give exactly one of "group" and "channel_id"')
        frame = orjson.dumps({"message": request_obj["message"]}).decode()
        key = request_obj.get("idempotency_key", request.headers.get("idempotency-key"))
        if key is not None and not (isinstance(key, str) and 0 < len(key) <= protocol.MAX_KEY_LENGTH):
            return error(400, "bad_request", "bad_request", "idempotency_key: a string of 1-64 characters")
        try:
            if group is not None:
                if not isinstance(group, str) or protocol.GROUP_NAME.fullmatch(group) is None:
                    return error(400, "bad_request", "invalid_group", "group: 1-99 of A-Za-z0-9 . _ -")
                published = await pod.hub.publish(group, frame, key)
                answer: dict[str, object] = {"pods": published.pods}
                if published.position is not None:
                    answer.update(epoch=published.position.epoch, offset=published.position.offset)
                    if published.duplicate:
                        answer["duplicate"] = True
            else:
                if not isinstance(channel_id, str) or protocol.CHANNEL_ID.fullmatch(channel_id) is None:
                    return error(400, "bad_request", "invalid_channel", "channel_id is not a channel id")
                answer = {"pods": await pod.hub.send_direct(channel_id, frame)}
        except BrokerUnavailable:
            return error(503, "broker_error", "broker_unavailable", "the broker is unreachable; retry later")
        metrics.API_REQUESTS.labels("accepted").inc()
        return JSONResponse(answer, status_code=202)

    async def presence(request: Request) -> Response:
        refused = authorized(request, keys)
        if refused is not None:
            return refused
        group = request.path_params["group"]
        if protocol.GROUP_NAME.fullmatch(group) is None:
            return error(400, "bad_request", "invalid_group", "group: 1-99 of A-Za-z0-9 . _ -")
        raw = request.query_params.get("limit")
        most = pod.presence.max_members
        if raw is not None and not (raw.isdigit() and 1 <= int(raw) <= most):
            return error(
                400, "bad_request", "bad_request", f"?limit= must be a whole number from 1 to {most}"
            )
        try:
            answer = await pod.presence.read(group, int(raw) if raw is not None else None)
        except PresenceOff:
            return error(404, "not_found", "presence_off", f"group {group!r} keeps no presence (no rule)")
        except BrokerUnavailable:
            return error(503, "broker_error", "broker_unavailable", "the broker is unreachable; retry later")
        metrics.API_REQUESTS.labels("accepted").inc()
        return Response(orjson.dumps(answer), media_type="application/json")

    return [
        Route("/api/publish", publish, methods=["POST"]),
        Route("/api/presence/{group:path}", presence, methods=["GET"]),
    ]

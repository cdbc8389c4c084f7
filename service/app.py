"""The two ASGI apps of a pod: the public one (WebSockets at any path) and the internal one.

Public port: every WebSocket upgrade goes straight to the endpoint (the seed contract: any path);
plain HTTP goes to Starlette. Internal port: `/metrics`, `/healthz`, `/readyz`, `/drain` and the
keyed `/api/...`, so probes and scrapes never touch the public port.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service import metrics
from service.api import api_routes, authorized
from service.config import split
from service.console import console_routes
from service.endpoint import Endpoint
from service.pod import Pod
from service.server_api import server_api_routes


class PublicApp:
    """Routes by scope type: WebSockets to the relay endpoint, HTTP to a Starlette app."""

    def __init__(self, websocket: Any, http: Any) -> None:
        self._websocket = websocket
        self._http = http

    def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Awaitable[None]:
        # Not `async def`: handing back the target's coroutine saves a frame per connection.
        if scope["type"] == "websocket":
            return self._websocket(scope, receive, send)  # type: ignore[no-any-return]
        return self._http(scope, receive, send)  # type: ignore[no-any-return]


def create_public_app(pod: Pod) -> PublicApp:
    # Plain HTTP: the browser console at GET / (service/console.py), or, with RELAY_CONSOLE=false, no
    # route at all (every path is a 404). WebSocket upgrades never reach Starlette, so `/` still means
    # the empty group name (refused with 4500) either way.
    routes = console_routes(pod.settings) if pod.settings.console else []
    return PublicApp(Endpoint(pod), Starlette(routes=routes))


def create_internal_app(pod: Pod) -> Starlette:
    keys = [key.encode() for key in split(pod.settings.api_keys)]

    async def scrape(request: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    async def healthz(request: Request) -> Response:
        # The event loop answered, and the tasks that carry messages still run. Never depends on
        # Redis being reachable (that is readiness): only on relay still trying to reach it.
        checks = pod.liveness()
        alive = all(checks.values())
        return JSONResponse(
            {"status": "ok" if alive else "failed", "pod": pod.settings.pod_id, "checks": checks},
            status_code=200 if alive else 503,
        )

    async def readyz(request: Request) -> Response:
        checks = pod.readiness()
        ready = all(checks.values())
        return JSONResponse(
            {"ready": ready, "checks": checks, "connections": pod.hub.connection_count()},
            status_code=200 if ready else 503,
        )

    async def drain(request: Request) -> Response:
        # It stops the pod, so it takes an API key like the publish API: whoever can reach the
        # internal port (a scraper, a backend) must not be able to take every pod down. Kubernetes
        # needs none of it: SIGTERM drains the same way (docs/security.md).
        refused = authorized(request, keys)
        if refused is not None:
            return refused
        metrics.API_REQUESTS.labels("accepted").inc()
        task = pod.drain()
        if request.query_params.get("wait", "true") != "false":
            await task
            return JSONResponse({"drained": True})
        return JSONResponse({"draining": True}, status_code=202)

    return Starlette(
        routes=[
            Route("/metrics", scrape),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/drain", drain, methods=["POST"]),
            *api_routes(pod),
            *server_api_routes(pod),
        ]
    )

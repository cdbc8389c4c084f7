"""The browser console: a static page at `GET /` on the public port (RELAY_CONSOLE, on by default).

Three files under `service/console/` (HTML, CSS and a small protocol v1 client in plain JavaScript),
shipped as package data: no build step, no CDN, nothing fetched from elsewhere, so it works offline.
They are read once when the app is built; the page gets the serving pod's id written into it.

Only plain HTTP reaches these routes: `app.PublicApp` sends every WebSocket upgrade, at any path
(`/` and `/console/...` included), to the relay endpoint first, so the seed contract is untouched.
"""

from __future__ import annotations

import html
from collections.abc import Awaitable, Callable
from importlib import resources

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from service import __version__
from service.config import Settings

ASSETS = {
    "console.css": "text/css",
    "console.js": "text/javascript",
}

# The page loads only its own two files and opens WebSockets back to its own host. 'self' covers
# ws:/wss: to the same host and port (CSP level 3).
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def read_asset(name: str) -> str:
    """One of the console's files, from the installed package."""
    return (resources.files("service") / "console" / name).read_text(encoding="utf-8")


def render_page(pod_id: str) -> str:
    """index.html with the serving pod's id and the relay version written in."""
    return (
        read_asset("index.html")
        .replace("{{pod_id}}", html.escape(pod_id))
        .replace("{{version}}", html.escape(__version__))
    )


def _static(body: str, media_type: str) -> Callable[[Request], Awaitable[Response]]:
    async def serve(request: Request) -> Response:
        return Response(body, media_type=media_type, headers=HEADERS)

    return serve


def console_routes(settings: Settings) -> list[BaseRoute]:
    """`GET /` (the page) and `GET /console/<asset>`; HEAD is answered too, other methods get 405."""
    routes: list[BaseRoute] = [Route("/", _static(render_page(settings.pod_id), "text/html"), name="console")]
    for name, media_type in ASSETS.items():
        routes.append(Route(f"/console/{name}", _static(read_asset(name), media_type)))
    return routes

"""Views that publish: POST a JSON body, get 204 once the layer has taken it."""

# Django and Channels live in .venv-load; mypy runs in .venv, where they are not installed.
# mypy: disable-error-code="import-not-found,import-untyped"

import json
from typing import Any

from django.http import HttpResponse
from django.views.decorators.csrf import csrf_exempt

from chat import publish as p


def _body(request: Any) -> Any:
    return json.loads(request.body)


@csrf_exempt  # type: ignore[untyped-decorator]
def publish(request: Any) -> Any:
    body = _body(request)
    p.send_message_to_group(body["group"], body["message"])
    return HttpResponse(status=204)


@csrf_exempt  # type: ignore[untyped-decorator]
async def apublish(request: Any) -> Any:
    body = _body(request)
    await p.asend_message_to_group(body["group"], body["message"])
    return HttpResponse(status=204)


@csrf_exempt  # type: ignore[untyped-decorator]
def event(request: Any) -> Any:
    body = _body(request)
    p.send_event(body["group"], body["event"])
    return HttpResponse(status=204)


@csrf_exempt  # type: ignore[untyped-decorator]
def send(request: Any) -> Any:
    body = _body(request)
    p.send_message_to_channel(body["channel_id"], body["message"])
    return HttpResponse(status=204)


@csrf_exempt  # type: ignore[untyped-decorator]
def join(request: Any) -> Any:
    body = _body(request)
    p.add_to_group(body["group"], body["channel_id"])
    return HttpResponse(status=204)


@csrf_exempt  # type: ignore[untyped-decorator]
def leave(request: Any) -> Any:
    body = _body(request)
    p.remove_from_group(body["group"], body["channel_id"])
    return HttpResponse(status=204)

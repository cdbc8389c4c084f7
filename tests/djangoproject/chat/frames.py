"""A frame for an event type the default does not cover (CONFIG["frames"]["chat.notice"])."""

from typing import Any


def notice(event: dict[str, Any]) -> dict[str, Any]:
    return {"notice": event["text"], "from": "django"}

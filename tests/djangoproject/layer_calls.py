"""Calls a channel layer the way app code does, for tests that run in relay's venv (no Django there).

    CHAT_LAYER=relay CHAT_REDIS_URL=... python layer_calls.py < calls.json > results.json

Input: {"layers": CHANNEL_LAYERS to use, "calls": [{"alias", "call", "args", "kwargs", "sync"}]};
arguments may carry values JSON cannot: {"$datetime": iso}, {"$set": [...]}, {"$bytes": text},
{"$circular": true}, {"$text": n} (n characters). Each call runs through async_to_sync (`sync`)
or asyncio.run, on the layer Channels builds from the settings, and answers
{"ok": repr(result)} or {"error": "module.Class", "bases": [...], "message": str}.
"""

# Django and Channels live in .venv-load; mypy runs in .venv, where they are not installed.
# mypy: disable-error-code="import-not-found,import-untyped"

import asyncio
import datetime
import json
import os
import sys
from typing import Any

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatproject.settings")

import django

django.setup()

from asgiref.sync import async_to_sync  # noqa: E402
from channels.layers import get_channel_layer  # noqa: E402
from django.test.utils import override_settings  # noqa: E402


def _value(raw: Any) -> Any:
    if isinstance(raw, list):
        return [_value(v) for v in raw]
    if not isinstance(raw, dict):
        return raw
    if "$datetime" in raw:
        return datetime.datetime.fromisoformat(raw["$datetime"])
    if "$set" in raw:
        return set(raw["$set"])
    if "$bytes" in raw:
        return raw["$bytes"].encode()
    if "$text" in raw:
        return "x" * raw["$text"]
    if "$circular" in raw:
        loop: dict[str, Any] = {"type": "group.message"}
        loop["message"] = {"self": loop}
        return loop
    return {k: _value(v) for k, v in raw.items()}


def _run(call: dict[str, Any]) -> dict[str, Any]:
    try:
        layer = get_channel_layer(call.get("alias", "default"))
        method = getattr(layer, call["call"])
        args, kwargs = _value(call.get("args", [])), _value(call.get("kwargs", {}))
        if call.get("sync", True):
            result = async_to_sync(method)(*args, **kwargs)
        else:
            result = asyncio.run(method(*args, **kwargs))
    except Exception as exc:
        kind = type(exc)
        return {
            "error": f"{kind.__module__}.{kind.__qualname__}",
            "bases": [f"{k.__module__}.{k.__qualname__}" for k in kind.__mro__],
            "message": str(exc),
        }
    return {"ok": repr(result)}


def main() -> None:
    spec = json.load(sys.stdin)
    with override_settings(CHANNEL_LAYERS=spec["layers"]):
        results = [_run(call) for call in spec["calls"]]
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()

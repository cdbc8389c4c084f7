"""Events to frames: what a relay client receives for a `group_send(group, event)`.

The original app's consumer answers `{"type": "group.message", "message": m}` with
`self.send_json({"message": m})`, and that is the default for every event type here. Other types
map to a callable in CONFIG["frames"]: it takes the event and returns what the consumer's handler
passed to `send_json` (encoded the same way, `json.dumps` with its defaults, as
`JsonWebsocketConsumer.encode_json` does), or a `str` that is the text frame itself (for a
consumer with its own `encode_json`). A frame must be a non-empty JSON object: relay's v1 clients
receive it as `{"group": G, ...the frame's members}`.
"""

from __future__ import annotations

import json
from typing import Any


def message(event: dict[str, Any]) -> Any:
    """The default, the original consumer's handler: `{"message": event["message"]}`."""
    return {"message": event["message"]}


def encode(content: Any) -> str:
    """`content` as JsonWebsocketConsumer.send_json would send it; a `str` is the frame as is.
    TypeError or ValueError when it cannot be, or is not a non-empty JSON object."""
    if isinstance(content, str):
        try:
            parsed = json.loads(content)
        except ValueError:
            raise ValueError(f"the frame text is not JSON: {content[:80]!r}") from None
        if not (isinstance(parsed, dict) and parsed and content.startswith("{")):
            raise ValueError(f"the frame text must be a non-empty JSON object, not {content[:80]!r}")
        return content
    if not isinstance(content, dict) or not content:
        raise ValueError(f"a frame must be a non-empty JSON object (a dict), not {type(content).__name__}")
    return json.dumps(content)

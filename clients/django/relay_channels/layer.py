"""RelayChannelLayer: the Channels layer API, carried out by relay's pods.

    group_send(group, event)        the event's frame to every member of `group`, on every pod
    send(channel_id, event)         the frame to one relay connection (its id from the welcome frame)
    group_add / group_discard       a relay connection joins or leaves a group
    receive, new_channel, flush     Unsupported: relay delivers to WebSocket clients, never to Django

Events become frames as the original consumer built them (frames.py), checked before anything is
sent: a bad name raises TypeError, an event that cannot be encoded TypeError or ValueError, a frame
over max_frame_bytes MessageTooLarge, an unreachable Redis RelayUnavailable naming the setting.
"""

from __future__ import annotations

from typing import Any, ClassVar

from channels.exceptions import MessageTooLarge
from django.core.exceptions import ImproperlyConfigured

from relay_channels import frames
from relay_channels.config import parse
from relay_channels.errors import ConfigError, NotARelayChannel, Unsupported
from relay_channels.publisher import Published, Publisher
from relay_channels.wire import CHANNEL_ID, GROUP_NAME, MAX_KEY_LENGTH

ELSEWHERE = (
    "Code that needs it (consumers served by Django, `runworker` workers) needs a Channels layer "
    "such as channels_redis: keep one under another alias in CHANNEL_LAYERS and use "
    "get_channel_layer(alias) there."
)


class RelayChannelLayer:
    """A Channels layer whose groups are relay's: CHANNEL_LAYERS[alias]["BACKEND"] =
    "relay_channels.RelayChannelLayer", CONFIG as in relay_channels.config."""

    extensions: ClassVar[list[str]] = ["groups"]

    def __init__(self, **config: Any) -> None:
        try:
            self.config = parse(config, _where(config))
        except ConfigError as exc:
            raise ImproperlyConfigured(f"relay_channels: {exc}") from None
        self._publisher = Publisher(self.config)

    async def group_send(
        self, group: str, message: dict[str, Any], *, idempotency_key: str | None = None
    ) -> None:
        """Deliver `message` (an event) to every member of `group` as the frame its type maps to.
        `idempotency_key` (1-64 characters), for groups with history: a retry is stored once."""
        await self.publish(group, message, idempotency_key=idempotency_key)

    async def publish(
        self, group: str, message: dict[str, Any], *, idempotency_key: str | None = None
    ) -> Published:
        """`group_send`, answering how many pods it reached and, for a history group, its position."""
        _check_group(group)
        if idempotency_key is not None and not (
            isinstance(idempotency_key, str) and 0 < len(idempotency_key) <= MAX_KEY_LENGTH
        ):
            raise ValueError(f"relay_channels: idempotency_key must be 1-{MAX_KEY_LENGTH} characters")
        return await self._publisher.group(group, self.frame(message, f"group {group!r}"), idempotency_key)

    async def send(self, channel: str, message: dict[str, Any]) -> None:
        """Deliver `message` to the one relay connection whose channel_id is `channel`."""
        _check_channel(channel, f"send({channel!r}, ...)")
        await self._publisher.channel(channel, self.frame(message, f"channel {channel!r}"))

    async def group_add(self, group: str, channel: str) -> None:
        """Add relay connection `channel` to `group` (it leaves when its socket closes)."""
        _check_group(group)
        _check_channel(channel, f"group_add({group!r}, {channel!r})")
        await self._publisher.control("join", channel, group)

    async def group_discard(self, group: str, channel: str) -> None:
        """Take relay connection `channel` out of `group`."""
        _check_group(group)
        _check_channel(channel, f"group_discard({group!r}, {channel!r})")
        await self._publisher.control("leave", channel, group)

    async def receive(self, channel: str) -> dict[str, Any]:
        raise Unsupported(
            f"relay_channels cannot receive({channel!r}): relay delivers messages to the WebSocket "
            f"clients connected to its pods, never to Django processes. {ELSEWHERE}"
        )

    async def new_channel(self, prefix: str = "specific.") -> str:
        raise Unsupported(
            "relay_channels cannot make channels: a relay connection's channel_id comes from the relay "
            'pod that holds its socket (the welcome frame, {"message": {"channel_id": ...}}), and '
            f"WebSocket clients connect to relay's pods rather than to Django. {ELSEWHERE}"
        )

    async def flush(self) -> None:
        raise Unsupported(
            "relay_channels has nothing to flush: it keeps no queues, and group membership lives in "
            "relay's pods (it ends when a socket closes)"
        )

    async def close(self) -> None:
        """Close the Redis client of the running event loop (each loop's closes with the loop)."""
        await self._publisher.close()

    def frame(self, event: dict[str, Any], to: str) -> str:
        """The text relay's clients receive for `event`, as the consumer's handler would send it."""
        if not isinstance(event, dict):
            raise TypeError(f"relay_channels: an event must be a dict, not {type(event).__name__}")
        kind = event.get("type")
        if not isinstance(kind, str):
            raise ValueError('relay_channels: an event needs a "type" (e.g. "group.message")')
        frames_key = self.config.setting("frames")
        mapper = self.config.frames[kind] if kind in self.config.frames else self.config.frames["*"]
        if mapper is None:
            raise ValueError(
                f'relay_channels: no frame for events of type {kind!r}: map it in {frames_key}["{kind}"]'
            )
        try:
            content = mapper(event)
        except KeyError as exc:
            if mapper is not frames.message:
                raise
            raise ValueError(
                f"relay_channels: the event of type {kind!r} has no {exc} for the default frame "
                f'{{"message": event["message"]}}: map the type in {frames_key}["{kind}"]'
            ) from None
        try:
            text = frames.encode(content)
            size = len(text) if text.isascii() else len(text.encode())
        except (TypeError, ValueError) as exc:
            kind_of_error = TypeError if isinstance(exc, TypeError) else ValueError
            raise kind_of_error(
                f"relay_channels: the frame for the event of type {kind!r} to {to} cannot be sent ({exc}); "
                f"frames are JSON objects, encoded as JsonWebsocketConsumer.send_json does: map the type "
                f'in {frames_key}["{kind}"] to a function returning one'
            ) from exc
        if size > self.config.max_frame_bytes:
            raise MessageTooLarge(
                f"relay_channels: the frame for {to} is {size} bytes, over "
                f"{self.config.setting('max_frame_bytes')} = {self.config.max_frame_bytes} (relay's pods "
                "refuse client frames over RELAY_MAX_FRAME_BYTES, 65536 by default)"
            )
        return text


def _check_group(group: Any) -> None:
    if not isinstance(group, str) or GROUP_NAME.fullmatch(group) is None:
        raise TypeError(
            f"relay_channels: group name {group!r} is not valid: 1-99 ASCII letters, digits, hyphens, "
            "underscores or periods (Channels' rule, and relay's)"
        )


def _check_channel(channel: Any, call: str) -> None:
    if not isinstance(channel, str):
        raise TypeError(f"relay_channels: {call}: a channel name is a string, not {type(channel).__name__}")
    if CHANNEL_ID.fullmatch(channel) is None:
        raise NotARelayChannel(
            f"relay_channels: {call}: {channel!r} is not a relay connection id (`<pod_id>.<random>`). "
            "WebSocket clients connect to relay's pods, which put each connection in the group its path "
            "names and tell it its channel_id in the welcome frame; Django can send to it, or add it to "
            "more groups, by that id. A channel name made by another Channels layer belongs to that layer. "
            + ELSEWHERE
        )


def _where(config: dict[str, Any]) -> str:
    """How to name this layer's CONFIG in messages: the alias whose CONFIG it is in settings."""
    from django.conf import settings

    try:
        layers = getattr(settings, "CHANNEL_LAYERS", {})
    except ImproperlyConfigured:  # settings not configured: a layer made by hand
        layers = {}
    aliases = [
        alias
        for alias, entry in layers.items()
        if str(entry.get("BACKEND", "")).startswith("relay_channels") and entry.get("CONFIG", {}) == config
    ]
    return (
        f'CHANNEL_LAYERS["{aliases[0]}"]["CONFIG"]'
        if len(aliases) == 1
        else 'CHANNEL_LAYERS[alias]["CONFIG"]'
    )

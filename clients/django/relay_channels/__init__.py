"""relay_channels: a Django Channels layer that publishes straight into relay's Redis, so an app's
`group_send` reaches relay's WebSocket clients with only CHANNEL_LAYERS changed.

    CHANNEL_LAYERS = {"default": {"BACKEND": "relay_channels.RelayChannelLayer",
                                  "CONFIG": {"url": "redis://redis:6379/0"}}}

The layer (relay_channels.layer) is imported only when asked for, so the wire contract
(relay_channels.wire) can be used and tested without Django or Channels installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from relay_channels.errors import ConfigError, NotARelayChannel, RelayUnavailable, Unsupported

if TYPE_CHECKING:
    from relay_channels.layer import RelayChannelLayer

__version__ = "0.1.0"
__all__ = ["ConfigError", "NotARelayChannel", "RelayChannelLayer", "RelayUnavailable", "Unsupported"]


def __getattr__(name: str) -> Any:
    if name == "RelayChannelLayer":
        from relay_channels.layer import RelayChannelLayer

        return RelayChannelLayer
    raise AttributeError(f"module 'relay_channels' has no attribute {name!r}")

"""The errors relay_channels raises of its own. Each message says what to do, and names the setting
to check when a setting is the likely cause. Invalid names raise TypeError and oversized frames
`channels.exceptions.MessageTooLarge`, as Channels' own layers do."""

from __future__ import annotations


class RelayUnavailable(ConnectionError):
    """Redis could not be reached, refused the command, or no relay pod has ever announced itself
    there under the configured prefix. Nothing was published."""


class NotARelayChannel(ValueError):
    """A channel name that is not a relay connection id (`<pod_id>.<random>`, from the welcome frame
    a relay pod sends each client): only relay's WebSocket connections can be sent to or grouped."""


class Unsupported(NotImplementedError):
    """A Channels layer call that has no meaning when the WebSockets live in relay (receive,
    new_channel, flush): the message says what to use instead."""


class ConfigError(ValueError):
    """A CONFIG value relay_channels cannot use; the layer raises it as Django's
    ImproperlyConfigured, with the setting named."""

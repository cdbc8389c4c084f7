"""The original app's server-side publishing: one group_send of its event, from sync or async code."""

# Django and Channels live in .venv-load; mypy runs in .venv, where they are not installed.
# mypy: disable-error-code="import-not-found,import-untyped"

from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer


def send_message_to_group(group_name: str, message: Any) -> None:
    event = {"type": "group.message", "message": message}
    async_to_sync(get_channel_layer().group_send)(group_name, event)


async def asend_message_to_group(group_name: str, message: Any) -> None:
    event = {"type": "group.message", "message": message}
    await get_channel_layer().group_send(group_name, event)


def send_event(group_name: str, event: dict[str, Any]) -> None:
    async_to_sync(get_channel_layer().group_send)(group_name, event)


def send_message_to_channel(channel_name: str, message: Any) -> None:
    event = {"type": "group.message", "message": message}
    async_to_sync(get_channel_layer().send)(channel_name, event)


def add_to_group(group_name: str, channel_name: str) -> None:
    async_to_sync(get_channel_layer().group_add)(group_name, channel_name)


def remove_from_group(group_name: str, channel_name: str) -> None:
    async_to_sync(get_channel_layer().group_discard)(group_name, channel_name)

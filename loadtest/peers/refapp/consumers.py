"""The original app's consumer, restated: a synchronous JsonWebsocketConsumer that joins the group
named by its path ('/' -> '_'), greets with its channel name, and relays group and direct sends; and
the same app as an async consumer (REFAPP_CONSUMER=async)."""

from typing import Any

from asgiref.sync import async_to_sync
from channels.generic.websocket import AsyncJsonWebsocketConsumer, JsonWebsocketConsumer


class GroupConsumer(JsonWebsocketConsumer):
    def connect(self) -> None:
        self.group_name = self.scope["path"].strip("/").replace("/", "_")
        async_to_sync(self.channel_layer.group_add)(self.group_name, self.channel_name)
        self.accept()
        self.send_json({"message": {"channel_id": self.channel_name}})

    def disconnect(self, code: int) -> None:
        async_to_sync(self.channel_layer.group_discard)(self.group_name, self.channel_name)

    def receive_json(self, content: Any, **kwargs: Any) -> None:
        if not isinstance(content, dict):
            return
        task = content.get("task")
        if task == "send_message_to_group":
            event = {"type": "group.message", "message": content}
            async_to_sync(self.channel_layer.group_send)(content.get("group_name"), event)
        elif task == "send_message_to_channel":
            event = {"type": "group.message", "message": content}
            async_to_sync(self.channel_layer.send)(content.get("channel_id"), event)

    def group_message(self, event: dict[str, Any]) -> None:
        self.send_json({"message": event["message"]})


class AsyncGroupConsumer(AsyncJsonWebsocketConsumer):
    """The strongest configuration a competent Django user would pick for the same app: the same
    behaviour as an async consumer (no thread hop per message), on RedisPubSubChannelLayer."""

    async def connect(self) -> None:
        self.group_name = self.scope["path"].strip("/").replace("/", "_")
        await self.channel_layer.group_add(self.group_name, self.channel_name)
        await self.accept()
        await self.send_json({"message": {"channel_id": self.channel_name}})

    async def disconnect(self, code: int) -> None:
        await self.channel_layer.group_discard(self.group_name, self.channel_name)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        if not isinstance(content, dict):
            return
        task = content.get("task")
        event = {"type": "group.message", "message": content}
        if task == "send_message_to_group":
            await self.channel_layer.group_send(content.get("group_name"), event)
        elif task == "send_message_to_channel":
            await self.channel_layer.send(content.get("channel_id"), event)

    async def group_message(self, event: dict[str, Any]) -> None:
        await self.send_json({"message": event["message"]})

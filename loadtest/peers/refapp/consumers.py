"""The original app's consumer, restated: a synchronous JsonWebsocketConsumer that joins the group
named by its path ('/' -> '_'), greets with its channel name, and relays group and direct sends."""

from typing import Any

from asgiref.sync import async_to_sync
from channels.generic.websocket import JsonWebsocketConsumer


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

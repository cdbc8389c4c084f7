"""`daphne refapp.asgi:application`: every WebSocket path goes to the one consumer (the original's
sync consumer, or with REFAPP_CONSUMER=async the async one)."""

import os

import django

django.setup()

from channels.routing import ProtocolTypeRouter  # noqa: E402

from refapp.consumers import AsyncGroupConsumer, GroupConsumer  # noqa: E402

consumer = AsyncGroupConsumer if os.environ.get("REFAPP_CONSUMER") == "async" else GroupConsumer
application = ProtocolTypeRouter({"websocket": consumer.as_asgi()})

"""`daphne refapp.asgi:application`: every WebSocket path goes to the one consumer."""

import django

django.setup()

from channels.routing import ProtocolTypeRouter  # noqa: E402

from refapp.consumers import GroupConsumer  # noqa: E402

application = ProtocolTypeRouter({"websocket": GroupConsumer.as_asgi()})

"""`daphne chatproject.asgi:application`: HTTP to Django, every WebSocket path to the original
app's consumer (loadtest/peers/refapp/consumers.py, as written)."""

# Django and Channels live in .venv-load; mypy runs in .venv, where they are not installed.
# mypy: disable-error-code="import-not-found,import-untyped"

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatproject.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter  # noqa: E402
from refapp.consumers import GroupConsumer  # noqa: E402

application = ProtocolTypeRouter({"http": django_asgi_app, "websocket": GroupConsumer.as_asgi()})

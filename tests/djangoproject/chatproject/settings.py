"""A Django project as the original app was, plus the views and the command that publish to its
groups. Only CHANNEL_LAYERS differs between the two ways the tests run it (CHAT_LAYER): Channels
with channels_redis, as the original, or relay_channels, the migration."""

import os
from typing import Any

SECRET_KEY = "tests-only-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
INSTALLED_APPS = ["channels", "chat"]
MIDDLEWARE: list[str] = []
ROOT_URLCONF = "chatproject.urls"
DATABASES: dict[str, Any] = {}
USE_TZ = True
ASGI_APPLICATION = "chatproject.asgi.application"
LOGGING = {  # errors in views to stderr (the daphne log the tests read when something fails)
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"django.request": {"handlers": ["console"], "level": "ERROR"}},
}

REDIS_URL = os.environ.get("CHAT_REDIS_URL", "redis://127.0.0.1:6379/0")

if os.environ.get("CHAT_LAYER") == "relay":
    # The migration: this block is the whole change.
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "relay_channels.RelayChannelLayer",
            "CONFIG": {
                "url": REDIS_URL,
                "prefix": os.environ.get("CHAT_RELAY_PREFIX", "relay"),
                "frames": {"chat.notice": "chat.frames.notice"},
            },
        }
    }
else:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL]},
        }
    }

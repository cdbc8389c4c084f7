"""Django settings for the reference app: no database, no HTTP views, one Redis channel layer."""

import os

SECRET_KEY = "benchmark-only-not-secret"  # loopback benchmarks only
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
INSTALLED_APPS = ["channels"]
DATABASES: dict[str, object] = {}
USE_TZ = True
ASGI_APPLICATION = "refapp.asgi.application"
# As the original: channels_redis's RedisChannelLayer (group_send writes to every member's channel).
# REFAPP_LAYER=pubsub: RedisPubSubChannelLayer (one PUBLISH per group_send), the strongest choice.
LAYERS = {
    "core": "channels_redis.core.RedisChannelLayer",
    "pubsub": "channels_redis.pubsub.RedisPubSubChannelLayer",
}
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": LAYERS[os.environ.get("REFAPP_LAYER", "core")],
        "CONFIG": {"hosts": [os.environ.get("REFAPP_REDIS_URL", "redis://127.0.0.1:6379/0")]},
    }
}

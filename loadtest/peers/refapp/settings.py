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
# REFAPP_SOCKET_TIMEOUT=none: no read timeout on the layer's Redis connections. redis-py 6+ reads with a
# 5 s timeout by default, exactly channels_redis's 5 s BZPOPMIN, and a loaded event loop loses that
# race: the consumer's receive raises TimeoutError and Channels closes its socket with 1011 (what the
# reference app did under 5,000 members; see docs/benchmarks-findings.md). Unset: as installed.
_URL = os.environ.get("REFAPP_REDIS_URL", "redis://127.0.0.1:6379/0")
HOST: object = (
    {"address": _URL, "socket_timeout": None} if os.environ.get("REFAPP_SOCKET_TIMEOUT") == "none" else _URL
)
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": LAYERS[os.environ.get("REFAPP_LAYER", "core")],
        "CONFIG": {"hosts": [HOST]},
    }
}

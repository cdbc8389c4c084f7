"""Settings: one frozen dataclass, read once at start-up from the environment and the command line.

`Settings.from_env` is the only reader of `os.environ`; tests pass a plain dict. Every field carries
its environment variable and help text in its metadata, so `--help`, the README table and the
parser cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

POD_ID = re.compile(r"[A-Za-z0-9_-]{1,63}")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
WS_IMPLS = ("websockets-sansio", "wsproto", "websockets")
# Never "none": an unsigned token is no token.
JWT_ALGORITHMS = (
    "HS256",
    "HS384",
    "HS512",
    "RS256",
    "RS384",
    "RS512",
    "ES256",
    "ES384",
    "ES512",
    "PS256",
    "EdDSA",
)
REDIS_PREFIX = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class SettingsError(ValueError):
    """A setting has a value the relay cannot run with; the message names the variable."""


def _setting(default: Any, env: str, help: str) -> Any:
    return field(default=default, metadata={"env": env, "help": help})


def _secret(env: str, help: str) -> Any:
    """A string setting kept out of repr(), so it never reaches a log line or a traceback."""
    return field(default="", repr=False, metadata={"env": env, "help": help})


def split(value: str) -> list[str]:
    """A comma-separated setting as a list, blanks dropped."""
    return [item.strip() for item in value.split(",") if item.strip()]


def default_pod_id() -> str:
    """The host name (the pod name in Kubernetes), reduced to the characters a pod id allows."""
    name = socket.gethostname().split(".")[0]
    return re.sub(r"[^A-Za-z0-9_-]", "-", name)[:63] or "relay"


@dataclass(frozen=True)
class Settings:
    """Everything a pod can be told. Defaults suit `make run`; the Helm chart sets the rest."""

    host: str = _setting("127.0.0.1", "RELAY_HOST", "address of the public WebSocket port")
    port: int = _setting(8000, "RELAY_PORT", "public WebSocket port (0 picks a free port)")
    internal_host: str = _setting(
        "127.0.0.1", "RELAY_INTERNAL_HOST", "address of the internal port (metrics, health, drain)"
    )
    internal_port: int = _setting(8001, "RELAY_INTERNAL_PORT", "internal HTTP port (0 picks a free port)")
    broker_url: str = _setting(
        "memory://",
        "RELAY_BROKER_URL",
        "memory:// (one pod), redis://, rediss://, redis+sentinel://, redis+cluster://",
    )
    pod_id: str = _setting(
        "", "RELAY_POD_ID", "this pod's id, the prefix of its channel ids (default: host name)"
    )
    max_frame_bytes: int = _setting(
        65536, "RELAY_MAX_FRAME_BYTES", "largest client frame; bigger closes with 1009"
    )
    max_connections: int = _setting(
        10000, "RELAY_MAX_CONNECTIONS", "connections per pod; past it new sockets close with 1013"
    )
    ready_connection_ratio: float = _setting(
        0.9, "RELAY_READY_CONNECTION_RATIO", "/readyz turns false at this share of max_connections"
    )
    outbox_size: int = _setting(
        1024, "RELAY_OUTBOX_SIZE", "frames a member may fall behind before it is closed with 4008"
    )
    outbox_bytes: int = _setting(
        262144,
        "RELAY_OUTBOX_BYTES",
        "characters of frame text a member may fall behind by before it is closed with 4008",
    )
    outbox_max_age: float = _setting(
        30.0,
        "RELAY_OUTBOX_MAX_AGE",
        "seconds a member may stay behind (its backlog never emptying) before it is closed with 4008; "
        "0 disables",
    )
    publish_rate: float = _setting(
        100.0,
        "RELAY_PUBLISH_RATE",
        "client frames per second per connection, every frame counted (token bucket refill); 0 disables",
    )
    publish_burst: int = _setting(
        200, "RELAY_PUBLISH_BURST", "token bucket size: client frames allowed in a burst"
    )
    rate_limit_action: str = _setting(
        "delay",
        "RELAY_RATE_LIMIT_ACTION",
        "over a frame or publish limit: delay (stop reading the socket until the budget refills; "
        "nothing is lost) or reject (v1: rate_limited error; seed clients: close 4029)",
    )
    max_groups: int = _setting(100, "RELAY_MAX_GROUPS", "groups one connection may be a member of")
    drain_delay: float = _setting(
        5.0, "RELAY_DRAIN_DELAY", "seconds between turning unready and closing sockets (endpoints update)"
    )
    drain_window: float = _setting(
        10.0, "RELAY_DRAIN_WINDOW", "seconds over which sockets are closed with 1012, in jittered batches"
    )
    close_timeout: float = _setting(
        5.0, "RELAY_CLOSE_TIMEOUT", "seconds a socket may take to finish a close before it is abandoned"
    )
    ping_interval: float = _setting(
        20.0, "RELAY_PING_INTERVAL", "WebSocket ping interval in seconds; 0 disables"
    )
    ping_timeout: float = _setting(20.0, "RELAY_PING_TIMEOUT", "seconds to wait for a pong before closing")
    log_format: str = _setting("auto", "RELAY_LOG_FORMAT", "json, console, or auto (console on a terminal)")
    log_level: str = _setting("INFO", "RELAY_LOG_LEVEL", "DEBUG, INFO, WARNING or ERROR")
    console: bool = _setting(
        True, "RELAY_CONSOLE", "serve the browser console page at GET / on the public port"
    )
    ws_impl: str = _setting(
        "websockets-sansio",
        "RELAY_WS_IMPL",
        "uvicorn WebSocket implementation: websockets-sansio (fastest), wsproto or websockets",
    )
    ws_compression: bool = _setting(
        False,
        "RELAY_WS_COMPRESSION",
        "offer permessage-deflate; costs CPU and ~40 KiB per member, defeats encode-once fan-out",
    )
    redis_prefix: str = _setting(
        "relay", "RELAY_REDIS_PREFIX", "prefix of every Redis channel, so several relays can share one Redis"
    )
    redis_password: str = _secret("RELAY_REDIS_PASSWORD", "Redis password when the URL carries none")
    redis_tls_ca_file: str = _setting(
        "", "RELAY_REDIS_TLS_CA_FILE", "rediss://: CA bundle to verify Redis with (default: system CAs)"
    )
    redis_tls_cert_file: str = _setting(
        "", "RELAY_REDIS_TLS_CERT_FILE", "rediss://: client certificate, for Redis with tls-auth-clients"
    )
    redis_tls_key_file: str = _setting(
        "", "RELAY_REDIS_TLS_KEY_FILE", "rediss://: the client certificate's key"
    )
    redis_tls_verify: bool = _setting(
        True, "RELAY_REDIS_TLS_VERIFY", "rediss://: verify the server certificate and host name"
    )
    redis_timeout: float = _setting(
        3.0,
        "RELAY_REDIS_TIMEOUT",
        "seconds Redis may take to answer (connect, subscribe, publish, probe) before the link is dead",
    )
    redis_probe_interval: float = _setting(
        5.0, "RELAY_REDIS_PROBE_INTERVAL", "seconds of silence on the pub/sub link before a probe is sent"
    )
    redis_backoff_max: float = _setting(
        5.0, "RELAY_REDIS_BACKOFF_MAX", "cap of the jittered exponential reconnect backoff, in seconds"
    )
    group_rules_file: str = _setting(
        "",
        "RELAY_GROUP_RULES_FILE",
        "TOML or JSON file of per-group rules (history, latest value): docs/history.md; empty: none",
    )
    presence_ttl: float = _setting(
        60.0,
        "RELAY_PRESENCE_TTL",
        "seconds a presence entry outlives its pod's last refresh (refreshed every third of it): how "
        "long a crashed pod's members linger at most (docs/presence.md)",
    )
    presence_grace: float = _setting(
        5.0,
        "RELAY_PRESENCE_GRACE",
        "seconds after a user's last connection left before their leave event (a reload within it: none)",
    )
    presence_max_members: int = _setting(
        1000, "RELAY_PRESENCE_MAX_MEMBERS", "most members one presence answer lists (more: truncated)"
    )
    presence_claims_bytes: int = _setting(
        256,
        "RELAY_PRESENCE_CLAIMS_BYTES",
        "most bytes of JSON claims shown per member; claims past it are left out, last first",
    )
    channels_pubsub_urls: str = _setting(
        "",
        "RELAY_CHANNELS_PUBSUB_URLS",
        "Redis URLs of a Django app's RedisPubSubChannelLayer (its hosts, in order, comma-separated): "
        "its group_send reaches relay members too; empty: off",
    )
    channels_pubsub_prefix: str = _setting(
        "asgi", "RELAY_CHANNELS_PUBSUB_PREFIX", "that layer's `prefix` setting"
    )
    ready_requires_broker: bool = _setting(
        True,
        "RELAY_READY_REQUIRES_BROKER",
        "/readyz is false while the broker link is down (false: ignore it)",
    )
    # Security (docs/security.md). Any RELAY_JWT_SECRET/PUBLIC_KEY_FILE/JWKS_FILE turns auth on.
    allowed_origins: str = _setting(
        "", "RELAY_ALLOWED_ORIGINS", "Origins allowed to open sockets, comma-separated globs; empty: any"
    )
    jwt_secret: str = _secret("RELAY_JWT_SECRET", "HS256 shared secret for client tokens (turns auth on)")
    jwt_public_key_file: str = _setting(
        "", "RELAY_JWT_PUBLIC_KEY_FILE", "PEM public key for RS256/ES256 client tokens (turns auth on)"
    )
    jwt_jwks_file: str = _setting(
        "", "RELAY_JWT_JWKS_FILE", "JWKS file whose keys (by kid) verify client tokens (turns auth on)"
    )
    jwt_algorithms: str = _setting(
        "",
        "RELAY_JWT_ALGORITHMS",
        "accepted token algorithms (default: HS256 with a secret, else RS256,ES256)",
    )
    jwt_audience: str = _setting(
        "", "RELAY_JWT_AUDIENCE", "required token audience (aud); empty: not checked"
    )
    jwt_issuer: str = _setting("", "RELAY_JWT_ISSUER", "required token issuer (iss); empty: not checked")
    jwt_required_claims: str = _setting(
        "exp", "RELAY_JWT_REQUIRED_CLAIMS", "claims every token must carry, comma-separated (exp, sub, ...)"
    )
    jwt_leeway: float = _setting(5.0, "RELAY_JWT_LEEWAY", "seconds of clock skew allowed on exp, nbf and iat")
    api_keys: str = _secret(
        "RELAY_API_KEYS",
        "keys for the internal port's API (publish, drain, server API), comma-separated (several: "
        "rotation); empty: API off",
    )
    connect_rate: float = _setting(
        0.0, "RELAY_CONNECT_RATE", "new sockets per second per pod (bursts of twice that); 0 disables"
    )
    pod_publish_rate: float = _setting(
        0.0,
        "RELAY_POD_PUBLISH_RATE",
        "client frames per second per pod, all sockets together, every frame counted; 0 disables",
    )
    user_max_connections: int = _setting(
        100, "RELAY_USER_MAX_CONNECTIONS", "sockets one token subject (sub) may hold per pod; 0 disables"
    )
    user_connect_rate: float = _setting(
        10.0,
        "RELAY_USER_CONNECT_RATE",
        "new sockets per second per sub per pod (bursts of twice); 0 disables",
    )
    user_publish_rate: float = _setting(
        200.0, "RELAY_USER_PUBLISH_RATE", "publishes per second per sub per pod, all its sockets; 0 disables"
    )

    def __post_init__(self) -> None:
        if not self.pod_id:
            object.__setattr__(self, "pod_id", default_pod_id())
        self._check("pod_id", POD_ID.fullmatch(self.pod_id) is not None, "1-63 letters, digits, '-' or '_'")
        for name in ("port", "internal_port"):
            self._check(name, 0 <= getattr(self, name) <= 65535, "a TCP port, 0-65535")
        self._check("internal_port", self.port != self.internal_port or self.port == 0, "unlike RELAY_PORT")
        for name in ("max_frame_bytes", "max_connections", "outbox_size", "publish_burst", "max_groups"):
            self._check(name, getattr(self, name) >= 1, "at least 1")
        for name in (
            "publish_rate",
            "drain_delay",
            "drain_window",
            "ping_interval",
            "ping_timeout",
            "outbox_max_age",
        ):
            self._check(name, getattr(self, name) >= 0, "zero or more")
        self._check(
            "outbox_bytes", self.outbox_bytes >= self.max_frame_bytes, "at least RELAY_MAX_FRAME_BYTES"
        )
        self._check("rate_limit_action", self.rate_limit_action in ("delay", "reject"), "delay or reject")
        self._check("close_timeout", self.close_timeout > 0, "more than 0")
        self._check("ready_connection_ratio", 0 < self.ready_connection_ratio <= 1, "in (0, 1]")
        self._check("ws_impl", self.ws_impl in WS_IMPLS, "one of " + ", ".join(WS_IMPLS))
        self._check("log_format", self.log_format in ("auto", "json", "console"), "json, console or auto")
        self._check("log_level", self.log_level.upper() in LEVELS, "one of " + ", ".join(LEVELS))
        self._check("broker_url", "://" in self.broker_url, "a URL such as memory:// or redis://host:6379/0")
        self._check(
            "redis_prefix", REDIS_PREFIX.fullmatch(self.redis_prefix) is not None, "1-64 of A-Za-z0-9_.-"
        )
        self._check("presence_ttl", 0.1 <= self.presence_ttl <= 86400, "0.1 to 86400 seconds")
        self._check("presence_grace", 0 <= self.presence_grace <= 3600, "0 to 3600 seconds")
        self._check("presence_max_members", 1 <= self.presence_max_members <= 100_000, "1 to 100000")
        self._check("presence_claims_bytes", 2 <= self.presence_claims_bytes <= 65536, "2 to 65536")
        for name in ("redis_timeout", "redis_probe_interval", "redis_backoff_max"):
            self._check(name, getattr(self, name) > 0, "more than 0")
        for name in (
            "jwt_leeway",
            "connect_rate",
            "pod_publish_rate",
            "user_connect_rate",
            "user_publish_rate",
        ):
            self._check(name, getattr(self, name) >= 0, "zero or more")
        self._check("user_max_connections", self.user_max_connections >= 0, "zero or more")
        self._check(
            "jwt_algorithms",
            all(a in JWT_ALGORITHMS for a in split(self.jwt_algorithms)),
            "a list from " + ", ".join(JWT_ALGORITHMS),
        )

    @property
    def auth_enabled(self) -> bool:
        """Client tokens are required: a key to verify them was configured."""
        return bool(self.jwt_secret or self.jwt_public_key_file or self.jwt_jwks_file)

    def _check(self, name: str, ok: bool, expected: str) -> None:
        if not ok:
            env = Settings.__dataclass_fields__[name].metadata["env"]
            raise SettingsError(f"{env}={getattr(self, name)!r} is invalid: must be {expected}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ, **overrides: Any) -> Settings:
        """Read every `RELAY_*` variable; `overrides` (already typed) win over the environment."""
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(f.metadata["env"])
            if raw is not None and raw != "":
                values[f.name] = _parse(f, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None, env: Mapping[str, str] = os.environ) -> Settings:
        """Command-line flags over environment variables over defaults; `--help` lists them all."""
        args = parser().parse_args(argv)
        return cls.from_env(env, **vars(args))


def parser() -> argparse.ArgumentParser:
    """The `python -m service` argument parser, one flag per setting."""
    p = argparse.ArgumentParser(
        prog="python -m service",
        description="relay: a WebSocket group relay pod. Every flag is also an environment variable.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for f in dataclasses.fields(Settings):
        kinds: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "bool": _bool}
        kind = kinds.get(str(f.type), str)
        p.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=kind,
            metavar=f.metadata["env"],
            help=f"{f.metadata['help']} [default: {_shown_default(f)}]".replace("%", "%%"),
        )
    return p


def _shown_default(f: dataclasses.Field[Any]) -> str:
    if f.name == "pod_id":
        return "host name"
    return "unset" if f.default == "" else str(f.default)


def describe() -> list[tuple[str, str, str]]:
    """(variable, default, meaning) for every setting: the README's settings table is checked against it."""
    return [(f.metadata["env"], str(f.default), f.metadata["help"]) for f in dataclasses.fields(Settings)]


def _parse(f: dataclasses.Field[Any], raw: str) -> Any:
    env = f.metadata["env"]
    kind = str(f.type)
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "bool":
            return _bool(raw)
    except ValueError:
        raise SettingsError(f"{env}={raw!r} is not a valid {kind}") from None
    return raw


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{raw!r} is not a boolean (true/false, 1/0, yes/no, on/off)")

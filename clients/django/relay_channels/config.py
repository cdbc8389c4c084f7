"""CHANNEL_LAYERS[alias]["CONFIG"] for relay_channels, checked once, with every error naming its key.

    CHANNEL_LAYERS = {"default": {
        "BACKEND": "relay_channels.RelayChannelLayer",
        "CONFIG": {
            "url": "redis://redis:6379/0",      # relay's RELAY_BROKER_URL (or channels_redis-style "hosts")
            "prefix": "relay",                   # relay's RELAY_REDIS_PREFIX
            "max_frame_bytes": 65536,            # larger frames raise MessageTooLarge
            "frames": {"chat.notice": "myapp.frames.notice"},  # event type -> frame; see frames.py
        },
    }}

URLs take every form relay's pods take (the server's service/broker/topology.py, `parse_url`):
redis://, rediss://, redis+sentinel://h1:26379,h2:26379/mastername[?sentinel_password=...],
redis+cluster://h1:7000,h2:7001, with [user[:password]@] before the hosts.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, quote, unquote

from relay_channels import frames as _frames
from relay_channels.errors import ConfigError
from relay_channels.wire import PREFIX

DEFAULT_URL = "redis://127.0.0.1:6379/0"
DEFAULT_PORTS = {"redis": 6379, "sentinel": 26379, "cluster": 6379}
FrameMapper = Callable[[dict[str, Any]], Any]

# channels_redis settings that mean nothing here: said so, rather than silently ignored.
CHANNELS_REDIS_ONLY = {
    "capacity": "relay keeps no per-channel queues; slow clients are handled by the pods (RELAY_OUTBOX_*)",
    "channel_capacity": "relay keeps no per-channel queues",
    "expiry": "relay keeps no queued messages to expire; history groups have their own ttl in the rules",
    "group_expiry": "group membership lives in the pods and ends when the socket closes",
    "symmetric_encryption_keys": "frames are the JSON clients receive; use rediss:// to protect the link",
    "serializer_format": "frames are JSON text, encoded as JsonWebsocketConsumer.send_json does",
    "on_disconnect": "there is no receive loop to notify",
    "on_reconnect": "there is no receive loop to notify",
}


@dataclass(frozen=True)
class RedisUrl:
    """A relay Redis URL, split (the same fields as the pods' topology.RedisUrl)."""

    kind: str  # redis | sentinel | cluster
    tls: bool
    hosts: tuple[tuple[str, int], ...]
    username: str | None
    password: str | None
    master: str  # sentinel only
    sentinel_password: str | None


@dataclass(frozen=True)
class Config:
    """The checked CONFIG. `where` is how messages name it: CHANNEL_LAYERS["default"]["CONFIG"]."""

    url: RedisUrl
    shown_url: str  # the URL without its password, for messages
    url_key: str  # "url" or "hosts": the setting the URL came from
    prefix: str = "relay"
    max_frame_bytes: int = 65536
    frames: dict[str, FrameMapper | None] = field(default_factory=dict)
    timeout: float | None = 3.0  # None: no reply timer (connecting still times out after 3 s)
    rules_cache_seconds: float = 5.0
    tls: dict[str, Any] = field(default_factory=dict)  # redis-py's ssl_* arguments, for rediss://
    where: str = 'CHANNEL_LAYERS["default"]["CONFIG"]'

    def setting(self, key: str) -> str:
        return f'{self.where}["{key}"]'


KNOWN = {
    "url", "hosts", "prefix", "max_frame_bytes", "frames", "timeout", "rules_cache_seconds",
    "password", "tls",
}  # fmt: skip
TLS_KEYS = {"ca_file", "cert_file", "key_file", "verify"}  # relay's RELAY_REDIS_TLS_* in one dict


def parse(config: Mapping[str, Any], where: str = 'CHANNEL_LAYERS["default"]["CONFIG"]') -> Config:
    """The checked CONFIG; ConfigError naming the key for anything it cannot use."""
    for key in config:
        if key in CHANNELS_REDIS_ONLY:
            raise ConfigError(
                f'{where}["{key}"] is a channels_redis setting with no meaning for relay '
                f"({CHANNELS_REDIS_ONLY[key]}): remove it"
            )
        if key not in KNOWN:
            known = ", ".join(sorted(KNOWN))
            raise ConfigError(f'{where}["{key}"] is not a relay_channels setting (known: {known})')
    if "url" in config and "hosts" in config:
        raise ConfigError(f'{where}: give "url" or "hosts", not both')
    url_key = "hosts" if "hosts" in config else "url"
    text = (
        _hosts(config["hosts"], f'{where}["hosts"]') if "hosts" in config else config.get("url", DEFAULT_URL)
    )
    if not isinstance(text, str):
        raise ConfigError(f'{where}["url"] must be a string such as "{DEFAULT_URL}"')
    try:
        url = parse_url(text)
    except ValueError as exc:
        raise ConfigError(f'{where}["{url_key}"]: {exc}') from None
    password = config.get("password")
    if password is not None:
        if not isinstance(password, str):
            raise ConfigError(f'{where}["password"] must be a string')
        if url.password is None:
            url = RedisUrl(
                url.kind, url.tls, url.hosts, url.username, password, url.master, url.sentinel_password
            )
    prefix = config.get("prefix", "relay")
    if not isinstance(prefix, str) or PREFIX.fullmatch(prefix) is None:
        raise ConfigError(
            f'{where}["prefix"] must be relay\'s RELAY_REDIS_PREFIX (1-64 of A-Za-z0-9_.-; '
            f'the pods\' default is "relay"), not {prefix!r}'
        )
    return Config(
        url=url,
        shown_url=shown(text),
        url_key=url_key,
        prefix=prefix,
        max_frame_bytes=_number(config, "max_frame_bytes", 65536, where, integer=True),
        frames=_mappers(config.get("frames", {}), f'{where}["frames"]'),
        timeout=None if config.get("timeout", 3.0) is None else _number(config, "timeout", 3.0, where),
        rules_cache_seconds=_number(config, "rules_cache_seconds", 5.0, where, minimum=0.0),
        tls=_tls(config.get("tls", {}), f'{where}["tls"]'),
        where=where,
    )


def _tls(tls: Any, where: str) -> dict[str, Any]:
    """CONFIG["tls"] ({"ca_file", "cert_file", "key_file", "verify"}, as relay's RELAY_REDIS_TLS_*)
    as redis-py's connection arguments."""
    if not isinstance(tls, Mapping) or set(tls) - TLS_KEYS:
        raise ConfigError(f"{where} takes only {', '.join(sorted(TLS_KEYS))} (relay's RELAY_REDIS_TLS_*)")
    for key in ("ca_file", "cert_file", "key_file"):
        if key in tls and not isinstance(tls[key], str):
            raise ConfigError(f'{where}["{key}"] must be a file path')
    verify = tls.get("verify", True)
    if not isinstance(verify, bool):
        raise ConfigError(f'{where}["verify"] must be True or False')
    found: dict[str, Any] = {"ssl_cert_reqs": "required" if verify else "none", "ssl_check_hostname": verify}
    for key, arg in (("ca_file", "ssl_ca_certs"), ("cert_file", "ssl_certfile"), ("key_file", "ssl_keyfile")):
        if key in tls:
            found[arg] = tls[key]
    return found


def _hosts(hosts: Any, where: str) -> str:
    """channels_redis's `hosts`, reduced to the one relay URL it can mean."""
    if not isinstance(hosts, list | tuple) or len(hosts) != 1:
        raise ConfigError(
            f"{where} must list exactly one Redis: relay's pods meet in one Redis, Sentinel set or "
            'cluster; for several, use "url": "redis+sentinel://h1,h2/name" or "redis+cluster://h1,h2"'
        )
    host = hosts[0]
    if isinstance(host, str):
        return host
    if isinstance(host, list | tuple) and len(host) == 2 and isinstance(host[1], int):
        return f"redis://{host[0]}:{host[1]}"
    if (
        isinstance(host, dict)
        and isinstance(host.get("address"), str)
        and set(host) <= {"address", "password"}
    ):
        address: str = host["address"]
        password = host.get("password")
        if isinstance(password, str) and "@" not in address:
            scheme, _, rest = address.partition("://")
            address = f"{scheme}://:{quote(password, safe='')}@{rest}"
        return address
    raise ConfigError(f'{where}[0] must be a URL, a (host, port) pair or {{"address": URL}}')


def _number(
    config: Mapping[str, Any],
    key: str,
    default: float,
    where: str,
    *,
    integer: bool = False,
    minimum: float = 1,
) -> Any:
    value: Any = config.get(key, default)
    valid = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not valid or value < minimum:
        kind = "a whole number" if integer else "a number of seconds"
        raise ConfigError(f'{where}["{key}"] must be {kind} of at least {minimum:g}, not {value!r}')
    return value if integer else float(value)


def _mappers(mapping: Any, where: str) -> dict[str, FrameMapper | None]:
    """CONFIG["frames"] over the default (`"*"`: `{"message": event["message"]}`), paths imported."""
    if not isinstance(mapping, Mapping):
        example = '{"chat.notice": "myapp.frames.notice"}'
        raise ConfigError(f"{where} must map event types to callables or their dotted paths, e.g. {example}")
    found: dict[str, FrameMapper | None] = {"*": _frames.message}
    for kind, target in mapping.items():
        if not isinstance(kind, str) or not kind:
            raise ConfigError(f"{where}: keys are event types (strings), not {kind!r}")
        found[kind] = None if target is None else _callable(target, f'{where}["{kind}"]')
    return found


def _callable(target: Any, where: str) -> FrameMapper:
    if isinstance(target, str):
        module, _, name = target.rpartition(".")
        try:
            target = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError) as exc:
            raise ConfigError(f"{where}: cannot import {target!r} ({exc})") from None
    if not callable(target):
        raise ConfigError(f"{where} must be a callable taking the event, or its dotted path")
    return target  # type: ignore[no-any-return]


def parse_url(url: str) -> RedisUrl:
    """Split a relay Redis URL exactly as the pods do; ValueError naming the problem (never the password)."""
    scheme, sep, rest = url.partition("://")
    base, _, flavour = scheme.partition("+")
    if not sep or base not in ("redis", "rediss") or flavour not in ("", "sentinel", "cluster"):
        raise ValueError(
            f"unsupported Redis URL scheme {scheme!r} (relay takes redis://, rediss://, "
            "redis+sentinel:// and redis+cluster://)"
        )
    kind = flavour or "redis"
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, at, hostlist = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    hosts = tuple(_address(h, DEFAULT_PORTS[kind]) for h in hostlist.split(",") if h)
    if not hosts:
        raise ValueError(f"no host in the {scheme}:// URL")
    if kind != "sentinel" and kind != "cluster" and len(hosts) > 1:
        raise ValueError(f"{scheme}:// takes one host; use redis+sentinel:// or redis+cluster://")
    master = unquote(path.split("/")[0]) if kind == "sentinel" else ""
    if kind == "sentinel" and not master:
        raise ValueError("redis+sentinel:// needs the master name as its path: .../mymaster")
    params = parse_qs(query)
    sentinel_password = params.get("sentinel_password", [None])[0]
    # A /db number is accepted and ignored, as the pods do: they keep their keys (the rules, history)
    # in database 0 whatever the URL says, so this package reads and writes there too.
    return RedisUrl(kind, base == "rediss", hosts, username, password, master, sentinel_password)


def _address(text: str, default_port: int) -> tuple[str, int]:
    if text.startswith("["):  # [v6::addr]:port
        host, _, port = text[1:].partition("]")
        port = port.lstrip(":")
    else:
        host, _, port = text.partition(":")
    try:
        return host, int(port) if port else default_port
    except ValueError:
        raise ValueError(f"bad port in Redis host {text!r}") from None


def shown(url: str) -> str:
    """`url` fit for a message or a log line: any password replaced by `***`."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, tail = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = userinfo.partition(":")[0] + ":***@" + hosts
    tail, question, query = tail.partition("?")
    if "sentinel_password" in query:
        query = "sentinel_password=***"
    return scheme + sep + netloc + slash + tail + question + query

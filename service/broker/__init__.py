"""The broker carries frames between pods. One Protocol, implementations chosen by URL scheme.

The broker knows channel names and envelopes, never sockets or groups: the hub, the control channel
(service/control.py) and the deny list (service/revocations.py) call it, and the hub pulls
deliveries from `messages()`; nothing below them holds a reference back up.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from service.config import Settings
    from service.rules import GroupRules

REDIS_SCHEMES = ("redis", "rediss", "redis+sentinel", "rediss+sentinel", "redis+cluster", "rediss+cluster")


@dataclass(frozen=True, slots=True)
class Envelope:
    """One message on the bus. `frame` is the exact text members receive, encoded once at the origin.

    `sent_at` is the origin pod's wall clock when it accepted the publish (for the cross-pod fan-out
    latency); `target` is a connection id for a direct send, empty for a group message. A message of
    a group that keeps history carries its position: `epoch` and `offset` (1, 2, 3... per epoch).
    `command` is a change to the target connection's groups instead of a frame (`join <group>`,
    `leave <group>`), sent by a backend (the Django channel layer's group_add and group_discard).
    `event` marks a presence event of the group (docs/presence.md): `frame` is the v1 frame, and
    only v1 members receive it.
    """

    channel: str
    frame: str
    sent_at: float
    target: str = ""
    epoch: str = ""
    offset: int = 0
    command: str = ""
    event: bool = False


# Yielded by `messages()` when the link to the bus came back after losing it: anything may have been
# missed meanwhile, so the hub reads what history holds (docs/history.md, "Gap fill").
RESYNC = Envelope("", "", 0.0)


@dataclass(frozen=True, slots=True)
class Position:
    """Where a message stands in its group's history: the epoch (which changes when the history is
    lost, e.g. Redis restarted empty) and the offset within it."""

    epoch: str
    offset: int


@dataclass(frozen=True, slots=True)
class Appended:
    """What `append` did: the message's position, how many pods it reached, and whether it had been
    stored before under the same idempotency key (then nothing was published again)."""

    position: Position
    pods: int
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class History:
    """A read of a group's history: its epoch ("" when it has none), the last offset assigned (0 for
    none), and the entries asked for, (offset, frame) in order."""

    epoch: str
    top: int
    entries: list[tuple[int, str]]


@dataclass(frozen=True, slots=True)
class Retention:
    """How long and how much of a group's history the broker keeps."""

    size: int
    ttl: float


@dataclass(frozen=True, slots=True)
class PresenceTerms:
    """How a group's presence is kept: entries live `ttl` seconds unless refreshed; with `events`,
    a user's leave is announced `grace` seconds after their last connection went, if none came back."""

    ttl: float
    grace: float
    events: bool


@dataclass(frozen=True, slots=True)
class Arrival:
    """A connection entering a group's presence: its id, its user (the token's `sub`, "" for
    none) and the allow-listed claims shown with it (JSON text of an object)."""

    conn_id: str
    user: str
    claims: str


@dataclass(frozen=True, slots=True)
class PresenceBatch:
    """Changes to one group's presence, carried out in this order: remove `departures`
    (connection ids), add `arrivals`, push back the expiry of `refresh` (connection ids)."""

    arrivals: Sequence[Arrival] = ()
    departures: Sequence[str] = ()
    refresh: Sequence[str] = ()


@dataclass(frozen=True, slots=True)
class Member:
    """A user present in a group: how many of the group's connections are theirs, and the
    allow-listed claims of their latest one (JSON text of an object)."""

    user: str
    connections: int
    claims: str


@dataclass(frozen=True, slots=True)
class Present:
    """A read of a group's presence: connections, distinct users, and up to the number asked of
    members (sorted by user); `truncated` when there are more users than were listed."""

    connections: int
    users: int
    members: list[Member]
    truncated: bool


class BrokerUnavailable(RuntimeError):
    """A publish could not be handed to the bus; the caller counts it and tells the publisher."""


class Broker(Protocol):
    """**Protocol:** carries envelopes between pods. At-most-once: what it cannot carry it counts."""

    async def publish(self, envelope: Envelope) -> int:
        """Send to every pod subscribed to `envelope.channel`; returns how many pods it reached
        (where the bus can tell; Redis can). Raises BrokerUnavailable when the bus is unreachable."""
        ...

    async def append(self, envelope: Envelope, retention: Retention, key: str) -> Appended:
        """Give the message the group's next position, store it in the group's capped, expiring
        history and publish it, atomically. A message stored before under the same idempotency
        `key` is not stored or published again: its first position comes back (`duplicate`).
        Raises BrokerUnavailable when the bus cannot say it was stored."""
        ...

    async def history(
        self, channel: str, after: int | None, limit: int, start: Retention | None = None
    ) -> History:
        """The group's position and up to `limit` entries: those after offset `after`, or the last
        `limit` when `after` is None. With `start`, a group that has no history yet gets an epoch
        now, at offset 0, kept as `start` says: a member joining it has a position to recover
        from even before the first message. Raises BrokerUnavailable."""
        ...

    async def deny(self, key: str, revoked_at: float, seconds: float) -> None:
        """Record that `key` (a user's token `sub`) was revoked at wall time `revoked_at`, for
        `seconds`, where every pod can read it (service/revocations.py). Raises BrokerUnavailable."""
        ...

    async def denied(self, key: str) -> float | None:
        """When `key` was revoked, if that is still recorded, else None. Raises BrokerUnavailable."""
        ...

    async def presence_update(self, channel: str, terms: PresenceTerms, batch: PresenceBatch) -> list[str]:
        """One atomic step on the presence of `channel`'s group (service/broker/presence.py):
        drop expired entries and announce the leaves that are due, then carry out `batch`. Returns
        the ids of `batch.refresh` the store did not hold (the caller adds them again). Raises
        BrokerUnavailable."""
        ...

    async def presence_read(self, channel: str, terms: PresenceTerms, limit: int) -> Present:
        """The presence of `channel`'s group, expired entries dropped first; up to `limit`
        members (0: the counts only). Raises BrokerUnavailable."""
        ...

    async def subscribe(self, *channels: str) -> None:
        """Start receiving these channels; returns once the bus has confirmed it. Raises
        BrokerUnavailable when it cannot confirm (the link is down); the channels stay wanted and
        are subscribed when the link is back, so a caller that gives up must unsubscribe them."""
        ...

    async def unsubscribe(self, *channels: str) -> None:
        """Stop receiving these channels."""
        ...

    def messages(self) -> AsyncIterator[Envelope]:
        """Every envelope for a subscribed channel, in bus order, until `close()`; and `RESYNC`
        after the link to the bus came back."""
        ...

    @property
    def ready(self) -> bool:
        """True while the link to the bus is proven to work; `/readyz` follows it."""
        ...

    @property
    def alive(self) -> bool:
        """False once the broker can never deliver again (the task that keeps its link up has
        stopped): `/healthz` fails, so Kubernetes restarts the pod."""
        ...

    async def close(self) -> None:
        """Release the link; `messages()` ends."""
        ...


def open_broker(settings: Settings, rules: GroupRules | None = None) -> Broker:
    """The broker for RELAY_BROKER_URL's scheme. Client libraries are imported only when used.
    With Redis, `rules` are published as `<prefix>:rules` for other writers to relay's groups."""
    url = settings.broker_url
    scheme = url.partition("://")[0]
    if scheme == "memory":
        from service.broker.memory import MemoryBroker, MemoryBus

        return MemoryBroker(MemoryBus())
    if scheme in REDIS_SCHEMES:
        from service.broker.redis import RedisBroker
        from service.broker.topology import connect_options, open_topology, parse_url

        def redis_broker(link_url: str, **extra: Any) -> RedisBroker:
            """A RedisBroker for `link_url` with the pod's own identity, prefix and timings."""
            parsed = parse_url(link_url)
            return RedisBroker(
                open_topology(parsed),
                connect_options(parsed, settings),
                pod_id=settings.pod_id,
                prefix=settings.redis_prefix,
                probe_interval=settings.redis_probe_interval,
                backoff_max=settings.redis_backoff_max,
                **extra,
            )

        rules_text = rules.document() if rules is not None else '{"group":[]}'
        broker = redis_broker(url, announce={b"rules": rules_text.encode()})
        if not settings.channels_pubsub_urls:
            return broker
        from service.broker import channels_pubsub
        from service.config import split

        prefix = settings.channels_pubsub_prefix
        listeners: list[Broker] = [
            redis_broker(
                host, naming=channels_pubsub.naming(prefix), decode=channels_pubsub.decode, history=False
            )
            for host in split(settings.channels_pubsub_urls)
        ]
        return channels_pubsub.BridgedBroker(broker, listeners, prefix)
    raise ValueError(
        f"unsupported broker URL scheme {scheme!r} in RELAY_BROKER_URL (expected memory://, "
        "redis://, rediss://, redis+sentinel:// or redis+cluster://)"
    )

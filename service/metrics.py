"""Every Prometheus metric the relay exports, in one place. Labels are small fixed sets: never a
group name, connection id or address, so cardinality stays bounded whatever clients do.

Every label value a counter can take is listed here and exported at zero from the start (Prometheus
practice): a dashboard or an alert sees the series before the first event, and `increase()` counts
the first one (a series born at 1 would look like no increase). tests/test_metrics.py checks that
the code counts no value missing from these lists, and that an idle pod exports every series the
dashboard and the alerts query. The close codes of relay_disconnects_total are set up in
service/endpoint.py, next to the codes it knows.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram, Info

from service import __version__

# Latency buckets from 0.5 ms to 10 s: local fan-out is sub-millisecond, cross-pod adds Redis.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

BUILD_INFO = Info("relay_build", "Version of the relay serving this pod")
BUILD_INFO.info({"version": __version__})

CONNECTIONS = Gauge("relay_connections", "Open WebSocket connections on this pod (also the HPA metric)")
CONNECTIONS_OPENED = Counter("relay_connections_opened", "WebSocket connections accepted into a group")
REJECT_REASONS = (
    "origin", "invalid_group", "draining", "capacity", "unauthorized", "token_expired", "forbidden",
    "connect_rate", "user_connect_rate", "user_connections", "broker", "internal_error", "revoked",
)  # fmt: skip
CONNECTIONS_REJECTED = Counter(
    "relay_connections_rejected", "Handshakes accepted and then closed at once, by reason", ["reason"]
)
DISCONNECTS = Counter(
    "relay_disconnects",
    "Closed connections by WebSocket close code (codes outside the known set count as 'other')",
    ["code"],
)
GROUPS = Gauge("relay_groups", "Groups with at least one member on this pod")
RECEIVED_OUTCOMES = (
    "published", "direct", "joined", "left", "forbidden", "unknown_channel", "too_many_groups",
    "broker_error", "too_large", "rate_limited", "binary", "presence", "presence_off",
    # frames the protocol rejects (protocol.RejectReason)
    "bad_json", "not_object", "unknown_task", "invalid_group", "invalid_channel", "bad_ref", "bad_since",
)  # fmt: skip
MESSAGES_RECEIVED = Counter("relay_messages_received", "Client frames by outcome", ["outcome"])
MESSAGES_SENT = Counter("relay_messages_sent", "Frames handed to member sockets on this pod")
GROUP_FANOUT_LATENCY = Histogram(
    "relay_group_fanout_latency_seconds",
    "From the origin pod accepting a publish to the last local member's frame being handed to its "
    "socket, once per delivering pod (includes clock skew between pods)",
    buckets=LATENCY_BUCKETS,
)
LOCAL_FANOUT_DURATION = Histogram(
    "relay_local_fanout_duration_seconds",
    "Time this pod spent handing one message to all its local members (no clock skew)",
    buckets=LATENCY_BUCKETS,
)
FANOUT_RECIPIENTS = Histogram(
    "relay_fanout_recipients",
    "Local members one message was handed to",
    buckets=(0, 1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000),
)
DROP_REASONS = ("slow_consumer", "closed", "unknown_channel")
SEND_QUEUE_DROPPED = Counter(
    "relay_send_queue_dropped", "Frames that never reached a member socket, by reason", ["reason"]
)
SLOW_CONSUMER_DISCONNECTS = Counter(
    "relay_slow_consumer_disconnects", "Sockets closed with 4008 for falling behind their outbox"
)
SEND_BACKLOGGED = Counter(
    "relay_send_backlogged",
    "Times a member socket stopped keeping up and its frames were queued for a writer task",
)
SOCKETS_CUT = Counter(
    "relay_sockets_cut",
    "Sockets cut with a TCP reset because the peer had not finished closing within RELAY_CLOSE_TIMEOUT",
)
FRAMES_DELAYED = Counter(
    "relay_frames_delayed",
    "Client frames held back by a rate limit (RELAY_RATE_LIMIT_ACTION=delay) until the budget refilled",
)
FRAME_DELAY_SECONDS = Counter(
    "relay_frame_delay_seconds", "Total time client frames were held back by rate limits"
)
PUBLISH_FAILURES = Counter(
    "relay_publish_failures", "Client publishes the broker did not accept (counted at the origin pod)"
)
DRAINING = Gauge("relay_draining", "1 while this pod is draining (unready, closing sockets with 1012)")

# Redis broker (redis://, rediss://, redis+sentinel://, redis+cluster://); see docs/redis.md.
REDIS_UP = Gauge("relay_redis_up", "1 while the Redis link is proven: connected, subscribed, probe answered")
REDIS_RECONNECTS = Counter("relay_redis_reconnects", "Times the Redis link came back after it was lost")
LINK_FAILURE_REASONS = (
    "connection_lost", "protocol_error", "probe_timeout", "publish_timeout", "subscribe_timeout",
    "subscribe_refused", "not_master", "loading", "topology_changed", "function_missing",
    "connect_failed", "error",
)  # fmt: skip
REDIS_LINK_FAILURES = Counter(
    "relay_redis_link_failures",
    "Times the Redis link was declared dead or an attempt to open it failed, by reason",
    ["reason"],
)
REDIS_SLOT_MAP_REFRESHES = Counter(
    "relay_redis_slot_map_refreshes",
    "Times a cluster link followed a changed slot map (MOVED, a slot moved away) without reconnecting",
)
REDIS_PUBLISH_DURATION = Histogram(
    "relay_redis_publish_duration_seconds",
    "From handing a publish to the Redis connection to Redis's reply (pipelined with its neighbours)",
    buckets=LATENCY_BUCKETS,
)
REDIS_SUBSCRIPTIONS = Gauge(
    "relay_redis_subscriptions", "Redis channels this pod wants: groups with local members, its own channels"
)
# link_down (publish refused: no link) | in_flight (link lost before Redis answered) | rejected (Redis
# answered with an error) | backlog (pod too far behind its pub/sub link) | undecodable (not relay's)
LOST_REASONS = ("link_down", "in_flight", "rejected", "backlog", "undecodable")
BROKER_LOST = Counter("relay_broker_lost", "Messages the broker could not carry, by reason", ["reason"])

BROKER_RESENT = Counter(
    "relay_broker_resent",
    "Commands sent again on a new Redis link: the lost link left their outcome unknown (history appends, "
    "made safe by their idempotency key) or Redis answered READONLY, LOADING, MASTERDOWN or CLUSTERDOWN",
)

CONTROL_OUTCOMES = ("joined", "left", "unknown_channel", "refused")
CONTROL_COMMANDS = Counter(
    "relay_control_commands",
    "A backend's changes to one connection's groups (the Django channel layer's group_add and "
    "group_discard for a relay channel id), by outcome",
    ["outcome"],
)

CHANNELS_PUBSUB_MESSAGES = Counter(
    "relay_channels_pubsub_messages",
    "Group messages received from a Django app's RedisPubSubChannelLayer (RELAY_CHANNELS_PUBSUB_URLS)",
)

API_OUTCOMES = (
    "accepted",
    "disabled",
    "unauthorized",
    "forbidden",
    "bad_request",
    "too_large",
    "broker_error",
    "not_found",
)
API_REQUESTS = Counter(
    "relay_api_requests",
    "Requests to the internal port's keyed API (/api/..., POST /drain) by outcome",
    ["outcome"],
)

# The server API's cluster commands (service/control.py, service/server_api.py; docs/server-api.md).
SERVER_COMMANDS = ("disconnect", "subscribe", "unsubscribe", "groups", "info")
SERVER_API_COMMANDS = Counter(
    "relay_server_api_commands",
    "Server API commands this pod carried out on its own connections (from the control channel)",
    ["command"],
)
SERVER_API_AFFECTED = Counter(
    "relay_server_api_connections",
    "Connections of this pod a server API command disconnected, subscribed or unsubscribed",
    ["command"],
)
SERVER_API_UNANSWERED = Counter(
    "relay_server_api_unanswered_pods",
    "Pods that did not answer a server API command this pod asked within its timeout",
)
REVOCATION_RESULTS = ("allowed", "refused", "reissued", "unavailable")
REVOCATION_CHECKS = Counter(
    "relay_revocation_checks",
    "Handshakes checked against the deny list (server API revocations), by result",
    ["result"],
)

# History, recovery and gap fill (groups with a history rule); see docs/history.md.
READ_PURPOSES = ("recovery", "latest", "position", "gap", "resync")
HISTORY_READS = Counter(
    "relay_history_reads", "Reads of a group's history from the broker, by purpose", ["purpose"]
)
RECOVERY_RESULTS = ("recovered", "epoch_changed", "trimmed", "unavailable")
RECOVERIES = Counter("relay_recoveries", "v1 joins with `since`, by result", ["result"])
RECOVERED_MESSAGES = Counter(
    "relay_recovered_messages",
    "Messages sent from history to a member as it joined (recovery and latest value)",
)
GAP_OUTCOMES = (
    "filled",
    "lost",
)  # filled: read from history and delivered; lost: history no longer held them
GAP_MESSAGES = Counter(
    "relay_gap_messages",
    "Messages of a history group this pod found missing from the sequence, by outcome",
    ["outcome"],
)
DUPLICATES_DROPPED = Counter(
    "relay_duplicates_dropped",
    "Messages of a history group this pod had already delivered (an overlap with a gap fill)",
)
EPOCH_CHANGES = Counter(
    "relay_epoch_changes",
    "Times a group's history epoch changed under this pod: its history was lost (expired, Redis emptied)",
)

# Presence (groups with a presence rule); see docs/presence.md.
PRESENCE_WRITES = ("write", "refresh")
PRESENCE_FAILURES = Counter(
    "relay_presence_failures",
    "Presence writes to the broker that failed (put right by the next refresh), by kind",
    ["kind"],
)
PRESENCE_REPAIRED = Counter(
    "relay_presence_repaired",
    "Presence entries a refresh found missing from the broker (an outage, Redis emptied) and added again",
)
PRESENCE_ENTRIES = Gauge(
    "relay_presence_entries", "This pod's (connection, group) presence entries, refreshed every TTL/3"
)
PRESENCE_EVENTS = Counter("relay_presence_events_sent", "Presence join/leave frames handed to v1 members")

# Every labelled counter above with every value it can take (the label sets of each, in one place).
LABEL_VALUES: dict[Counter, tuple[str, ...]] = {
    CONNECTIONS_REJECTED: REJECT_REASONS,
    MESSAGES_RECEIVED: RECEIVED_OUTCOMES,
    SEND_QUEUE_DROPPED: DROP_REASONS,
    REDIS_LINK_FAILURES: LINK_FAILURE_REASONS,
    BROKER_LOST: LOST_REASONS,
    CONTROL_COMMANDS: CONTROL_OUTCOMES,
    API_REQUESTS: API_OUTCOMES,
    SERVER_API_COMMANDS: SERVER_COMMANDS,
    SERVER_API_AFFECTED: SERVER_COMMANDS,
    REVOCATION_CHECKS: REVOCATION_RESULTS,
    HISTORY_READS: READ_PURPOSES,
    RECOVERIES: RECOVERY_RESULTS,
    GAP_MESSAGES: GAP_OUTCOMES,
    PRESENCE_FAILURES: PRESENCE_WRITES,
}


def export_at_zero(counter: Counter, values: Iterable[str]) -> None:
    """Create the series of `counter` for each label value, at zero."""
    for value in values:
        counter.labels(value)


for _counter, _values in LABEL_VALUES.items():
    export_at_zero(_counter, _values)

"""Logical channel names on the broker, and connection ids.

A group G travels on channel `g:{G}`; each pod listens on `p:<pod_id>` for direct sends
and on `c:control` for the server API's commands. The braces
are a Redis Cluster hash tag: a group's channel and its history keys (`h:{G}`, `m:{G}`, `i:{G}`,
service/broker/history.py) share one slot, so one script can store and publish a message on a
single Redis, Sentinel and Cluster alike (group names cannot contain braces). Connection ids
are `<pod_id>.<random>`: the pod id routes a direct send to one pod without a subscription per
socket, and the random part (not a counter) stays unique when a restarted pod keeps its name.
"""

from __future__ import annotations

import secrets


def group(name: str) -> str:
    """The broker channel carrying group `name`."""
    return "g:{" + name + "}"


def group_of(channel: str) -> str:
    """The group name a group channel carries (`g:{chat}` -> `chat`)."""
    return channel[3:-1]


def pod(pod_id: str) -> str:
    """The broker channel a pod listens on for direct sends and its own link probes."""
    return "p:" + pod_id


CONTROL = "c:control"  # every pod listens: the server API's commands (service/control.py)


def new_connection_id(pod_id: str) -> str:
    """A fresh id for a connection on `pod_id`, unique across pods and restarts."""
    return f"{pod_id}.{secrets.token_urlsafe(9)}"

"""A password-protected Redis: the password from the URL, from RELAY_REDIS_PASSWORD, or an ACL user;
a wrong one keeps the link down without ever printing it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.brokers import FAST_REDIS
from tests.helpers import closed_with, join, running_pod, ws_url
from tests.redis_servers import RedisServer, start_redis

pytestmark = pytest.mark.integration

PASSWORD = "pw-for-tests-only-7Hq"


@pytest.fixture
def locked_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = start_redis(tmp_path / "redis")
    server.call("ACL", "SETUSER", "relay", "on", ">acl-" + PASSWORD, "~*", "&*", "+@all")
    server.call("CONFIG", "SET", "requirepass", PASSWORD)  # the harness's own client is already in
    yield server
    server.kill()


async def relays_across_two_pods(url: str, **settings: Any) -> None:
    async with (
        running_pod(broker_url=url, pod_id="auth-a", **FAST_REDIS, **settings) as a,
        running_pod(broker_url=url, pod_id="auth-b", **FAST_REDIS, **settings) as b,
    ):
        x, y = await join(ws_url(a, "/g")), await join(ws_url(b, "/g"))
        sent = await x.publish("g", locked=True)
        assert await y.next() == {"message": sent}


@pytest.mark.parametrize("how", ["url", "setting", "acl-user"])
async def test_pods_authenticate_to_redis(locked_redis: RedisServer, how: str) -> None:
    address = f"127.0.0.1:{locked_redis.port}"
    if how == "url":
        await relays_across_two_pods(f"redis://:{PASSWORD}@{address}/0")
    elif how == "setting":
        await relays_across_two_pods(f"redis://{address}/0", redis_password=PASSWORD)
    else:
        await relays_across_two_pods(f"redis://relay:acl-{PASSWORD}@{address}/0")


async def test_a_wrong_password_keeps_the_link_down_and_is_never_logged(locked_redis: RedisServer) -> None:
    with capture_logs() as logs:
        async with running_pod(
            broker_url=f"redis://127.0.0.1:{locked_redis.port}/0",
            redis_password="wrong-" + PASSWORD,
            **FAST_REDIS,
        ) as pod:
            assert pod.pod.readiness()["broker"] is False
            assert pod.pod.liveness()["broker"] is True  # still trying: no restart needed
            # A socket cannot join a group it would hear nothing from: told to come back later.
            assert await closed_with(ws_url(pod, "/g")) == 1013
    assert any(line["event"] == "broker.connect_failed" for line in logs)
    assert PASSWORD not in repr(logs)

"""A real Prometheus on loopback scrapes two real pods sharing a real Redis; every dashboard query and
every alert rule is then evaluated by it.

The pods get traffic that exercises each panel: members on both pods, group and direct publishes,
bad frames, a refused handshake, an unknown channel, a backend API request, and a short Redis outage
(so the link-failure and lost-message counters exist). Each query must return at least one number.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
import yaml

from tests.charts import CHART, DASHBOARD, of_kind, render, tool
from tests.helpers import PodProcess, free_port, join, scrape, start_pod_process, wait_until

pytestmark = pytest.mark.integration
WINDOW = "2m"  # stands in for $__rate_interval: covers all the traffic of the test


# Named as a Deployment names its pods (<fullname>-<pod-template-hash>-<suffix>): the alerts match
# only such names, so that another release whose name starts with "relay" stays out.
POD_NAMES = ("relay-5c9f7d8b4-x2mqz", "relay-5c9f7d8b4-k7wqp")


class RedisServer:
    """A redis-server of this test's own on a free port, which it may kill and start again."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not on PATH: run `make redis-server`"
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(
            [binary, *args, "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def answers() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
                    conn.sendall(b"PING\r\n")
                    return conn.recv(16).startswith(b"+PONG")
            except OSError:
                return False

        wait_until(answers, 10, "redis-server")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


class Prometheus:
    """prometheus (Debian's build, from `make tools`) with a 1 s scrape interval on a free port."""

    def __init__(self, directory: Path, targets: dict[str, int], rules: dict[str, Any]) -> None:
        (directory / "rules.yaml").write_text(yaml.safe_dump(rules))
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": ["rules.yaml"],
            "scrape_configs": [
                {
                    "job_name": "relay",
                    "static_configs": [
                        {"targets": [f"127.0.0.1:{port}"], "labels": {"namespace": "realtime", "pod": pod}}
                        for pod, port in targets.items()
                    ],
                }
            ],
        }
        (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                tool("prometheus"),
                f"--config.file={directory / 'prometheus.yml'}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def api(self, path: str, **params: str) -> Any:
        response = httpx.get(f"http://127.0.0.1:{self.port}/api/v1/{path}", params=params, timeout=10)
        body = response.json()
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.api("query", query=expr)["result"]
        return result

    def wait_ready(self) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError("prometheus exited")
            try:
                return httpx.get(f"http://127.0.0.1:{self.port}/-/ready", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, 20, "prometheus to start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def empty_panels(prometheus: Prometheus, dashboard: dict[str, Any]) -> list[str]:
    """The dashboard's queries that return no number yet, as "panel title: query"."""
    empty = []
    for panel in (p for p in dashboard["panels"] if p["type"] != "row"):
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", WINDOW)
            expr = expr.replace("$namespace", "realtime").replace("$pod", "relay-.*")
            values = [s["value"][1] for s in prometheus.query(expr)]
            if not [v for v in values if v not in ("NaN", "+Inf", "-Inf")]:
                empty.append(f"{panel['title']}: {expr}")
    return empty


def alert_rules() -> dict[str, Any]:
    [rule] = of_kind(render(CHART / "ci" / "monitoring-values.yaml"), "PrometheusRule")
    spec: dict[str, Any] = rule["spec"]
    return spec


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.kill()


@pytest.fixture
def two_pods(redis_server: RedisServer) -> Iterator[dict[str, PodProcess]]:
    env = {
        "RELAY_BROKER_URL": redis_server.url,
        "RELAY_REDIS_PREFIX": "prom" + str(os.getpid()),
        "RELAY_DRAIN_DELAY": "0",
        "RELAY_DRAIN_WINDOW": "0.1",
        "RELAY_REDIS_BACKOFF_MAX": "0.2",
    }
    pods = {name: start_pod_process({**env, "RELAY_POD_ID": name}) for name in POD_NAMES}

    def ready(pod: PodProcess) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{pod.internal_port}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(lambda: all(ready(pod) for pod in pods.values()), 15, "both pods ready")
    except TimeoutError:
        for pod in pods.values():
            pod.terminate()
            pod.wait()
        errors = [line[:300] for pod in pods.values() for line in pod.output if '"level": "error"' in line]
        pytest.fail("pods never became ready with a Redis broker; their errors:\n" + "\n".join(errors[:6]))
    try:
        yield pods
    finally:
        for pod in pods.values():
            pod.terminate()
        for pod in pods.values():
            pod.wait()


async def traffic(pods: dict[str, PodProcess], redis: RedisServer) -> None:
    a, b = (f"ws://127.0.0.1:{pod.port}" for pod in pods.values())
    member_a, member_b = await join(a + "/lobby"), await join(b + "/lobby")
    for i in range(20):
        await member_a.publish("lobby", n=i)
        await member_b.next()
        await member_a.next()
    await member_a.direct(member_b.channel_id, hello=True)
    await member_b.next()
    await member_a.direct(f"{POD_NAMES[1]}.nobody", hello=True)  # an unknown channel on a live pod
    await member_a.ws.send("not json")
    await member_a.ws.send('{"task": "nope"}')
    refused = await websockets.connect(a + "/" + "x" * 120)  # no valid group: closed with 4500
    with pytest.raises(websockets.ConnectionClosed):
        await asyncio.wait_for(refused.recv(), 5)
    async with httpx.AsyncClient() as http:  # the backend API (off without RELAY_API_KEYS: still counted)
        internal = next(iter(pods.values())).internal_port
        await http.post(f"http://127.0.0.1:{internal}/api/publish", json={"group": "lobby"}, timeout=5)
    redis.kill()  # a short outage: link failures, and a publish the broker cannot carry
    deadline = time.monotonic() + 10
    while not all(scrape(pod.internal_port, "relay_redis_up") == 0 for pod in pods.values()):
        assert time.monotonic() < deadline, "the pods never noticed Redis was gone"
        await asyncio.sleep(0.05)
    await member_a.publish("lobby", during="outage")  # refused once the link has not come back in time
    a_port = next(iter(pods.values())).internal_port
    while scrape(a_port, "relay_broker_lost_total", reason="link_down") == 0:
        assert time.monotonic() < deadline + 10, "the publish during the outage was never refused"
        await asyncio.sleep(0.05)
    redis.start()
    await member_a.ws.close()
    await member_b.ws.close()


def test_every_dashboard_query_and_alert_rule_works_on_real_scrapes(
    two_pods: dict[str, PodProcess], redis_server: RedisServer, tmp_path: Path
) -> None:
    (tmp_path / "prometheus").mkdir()
    prometheus = Prometheus(
        tmp_path / "prometheus", {name: pod.internal_port for name, pod in two_pods.items()}, alert_rules()
    )
    try:
        prometheus.wait_ready()
        wait_until(lambda: len(prometheus.query('up{job="relay"} == 1')) == 2, 20, "both pods scraped")
        asyncio.run(traffic(two_pods, redis_server))
        wait_until(lambda: len(prometheus.query("relay_redis_up == 1")) == 2, 20, "Redis links back")

        dashboard = json.loads(DASHBOARD.read_text())
        pods = {s["metric"]["pod"] for s in prometheus.query('relay_build_info{namespace="realtime"}')}
        assert pods == set(POD_NAMES)  # what the pod variable's label_values query lists
        # Rates need a scrape or two after the traffic: wait for them, then say which never came.
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: not empty_panels(prometheus, dashboard), 20, "dashboard data", interval=0.5)
        empty = empty_panels(prometheus, dashboard)
        assert not empty, "dashboard queries without data:\n" + "\n".join(empty)

        # The alerts below must come from rules evaluated on that data: one more round of every group.
        seen = {g["name"]: g["lastEvaluation"] for g in prometheus.api("rules")["groups"]}
        wait_until(
            lambda: all(g["lastEvaluation"] != seen[g["name"]] for g in prometheus.api("rules")["groups"]),
            10,
            "the rule groups to be evaluated again",
        )
        groups = prometheus.api("rules")["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        assert len(rules) == 8
        for rule in rules:
            assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
        active = {a["labels"]["alertname"] for a in prometheus.api("alerts")["alerts"]}  # pending or firing
        assert active <= {"RelayMessagesLost", "RelayPublishFailures"}, active  # the outage's, nothing else
    finally:
        prometheus.stop()

"""The chart's own pods, for real: `helm template` with the in-chart Redis and two replicas, run by
`podman kube play` on the images tests/podman.py built.

What runs as rendered: both Deployments' pod specs (the relay Deployment's two replicas become two
pods, relay-pod-0 and relay-pod-1), with their env (the ConfigMap through envFrom, the Redis password
through secretKeyRef, RELAY_POD_ID through fieldRef), args and command, pod and container
securityContext (uid 10001, read-only root, no capabilities, seccomp), the /tmp emptyDir, and the
`helm test` pod with its args.

The edits `playable()` makes, each because `kube play` is not a cluster; nothing else is touched:
1. Image names: chart values, not edits (`image.repository`/`tag`, `redis.image.*` point at the
   local images; `--set`, as a user with a private registry would).
2. Secrets are created with `podman secret create` from the rendered Secret's `data` instead of
   being played: podman 4.3 stores a played Secret in a form its own secretKeyRef lookup cannot read.
3. Container `ports` are dropped: podman publishes every containerPort on the host (Kubernetes does
   not), so two replicas would collide on 8000. Pods are reached at their own address on podman's
   bridge network, as in a cluster.
4. Probes are dropped: kube play turns them into healthchecks whose timers need systemd, absent here
   (and a named port they use becomes 0 once `ports` is gone). Probes stay covered offline.
5. Services have no stand-in but /etc/hosts: `hostAliases` maps a Service name to a pod address
   (relay-redis to the Redis pod; relay, for the helm test pod, to one relay pod). There is no
   cluster DNS and no Service load balancing.
Services, probes, the HPA, PDB, NetworkPolicy, Ingress and monitoring objects are covered by the
offline chart tests only (tests/test_chart.py); docs/deploy.md lists which is which.

Traffic goes to the pods' addresses on podman's bridge (10.89.0.0/24 by default), which never
leaves this machine.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml

from service.client import RelayClient
from tests.charts import Manifest, of_kind, render
from tests.helpers import wait_until
from tests.podman import REDIS_IMAGE, RELAY_IMAGE, Podman, Provisioned

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("podman"), pytest.mark.timeout(900)]

RELEASE = "relay"  # pods are named <Deployment>-pod-<n> by kube play: relay-pod-0, relay-redis-pod-0
SETS = (
    f"image.repository={RELAY_IMAGE.rpartition(':')[0]}",
    f"image.tag={RELAY_IMAGE.rpartition(':')[2]}",
    f"redis.image.repository={REDIS_IMAGE.rpartition(':')[0]}",
    f"redis.image.tag={REDIS_IMAGE.rpartition(':')[2]}",
    "redis.enabled=true",
    "replicaCount=2",
)


def playable(manifest: Manifest, aliases: dict[str, str]) -> Manifest:
    """A Deployment or Pod as `kube play` can run it: no container ports, no probes, and the Service
    names in `aliases` (name -> address) in /etc/hosts. See the module docstring for why."""
    found = copy.deepcopy(manifest)
    spec = found["spec"]["template"]["spec"] if found["kind"] == "Deployment" else found["spec"]
    for container in spec["containers"]:
        for key in ("ports", "startupProbe", "livenessProbe", "readinessProbe"):
            container.pop(key, None)
    if aliases:
        spec["hostAliases"] = [{"ip": ip, "hostnames": [name]} for name, ip in aliases.items()]
    return found


def named(manifests: list[Manifest], kind: str, name: str) -> Manifest:
    [found] = [m for m in of_kind(manifests, kind) if m["metadata"]["name"] == name]
    return found


@dataclass
class ChartPods:
    podman: Podman
    manifests: list[Manifest]
    directory: Path
    redis_ip: str
    relay_ips: list[str]
    redis_password: str

    def play(self, name: str, *documents: Manifest) -> None:
        path = self.directory / f"{name}.yaml"
        path.write_text(yaml.safe_dump_all(documents))
        self.podman.run("kube", "play", str(path), timeout=180)

    def ready(self, ip: str) -> bool:
        try:
            return httpx.get(f"http://{ip}:8001/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def exec(self, container: str, *command: str) -> str:
        return self.podman.output("exec", container, *command)


@pytest.fixture(scope="module")
def chart_pods(podman_images: Provisioned, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChartPods]:
    podman = podman_images.podman
    manifests = render(sets=SETS)
    [secret] = of_kind(manifests, "Secret")  # the in-chart Redis password
    directory = tmp_path_factory.mktemp("chart-pods")
    secret_file = directory / "secret.json"
    secret_file.write_text(json.dumps(secret["data"]))
    podman.run("secret", "create", secret["metadata"]["name"], str(secret_file))
    found = ChartPods(
        podman, manifests, directory, "", [], base64.b64decode(secret["data"]["redis-password"]).decode()
    )
    try:
        found.play("redis", playable(named(manifests, "Deployment", f"{RELEASE}-redis"), {}))
        found.redis_ip = podman.ip_of(f"{RELEASE}-redis-pod-0")
        relay = playable(named(manifests, "Deployment", RELEASE), {f"{RELEASE}-redis": found.redis_ip})
        assert relay["spec"]["replicas"] == 2
        found.play("relay", *of_kind(manifests, "ConfigMap"), relay)
        found.relay_ips = [podman.ip_of(f"{RELEASE}-pod-{n}") for n in range(2)]
        for ip in found.relay_ips:
            wait_until(lambda ip=ip: found.ready(ip), 60, f"relay pod {ip} to be ready (Redis link up)")  # type: ignore[misc]
        yield found
    finally:
        podman.run("pod", "rm", "--force", "--all", timeout=180, check=False)
        podman.run("secret", "rm", "--all", check=False)


def test_pods_run_as_the_chart_says(chart_pods: ChartPods) -> None:
    """Env from the ConfigMap, the Secret and the pod's name; uid 10001, read-only root, no
    capabilities; /tmp (the emptyDir) writable; the Redis pod wants the chart's password, and its
    readiness probe's command passes."""
    for n in range(2):
        container = f"{RELEASE}-pod-{n}-relay"
        env = dict(line.partition("=")[::2] for line in chart_pods.exec(container, "env").splitlines())
        assert env["RELAY_POD_ID"] == f"{RELEASE}-pod-{n}"  # fieldRef metadata.name
        assert env["RELAY_BROKER_URL"] == f"redis://{RELEASE}-redis:6379/0"  # the ConfigMap, via envFrom
        assert env["RELAY_REDIS_PASSWORD"] == chart_pods.redis_password  # secretKeyRef
        assert chart_pods.exec(container, "id", "-u") == "10001"
        status = chart_pods.exec(container, "cat", "/proc/1/status")
        assert "CapEff:\t0000000000000000" in status
        assert "NoNewPrivs:\t1" in status  # allowPrivilegeEscalation: false
        denied = chart_pods.podman.run("exec", container, "touch", "/opt/relay/x", check=False)
        assert "Read-only file system" in denied.stderr
        chart_pods.exec(container, "touch", "/tmp/x")
        health = httpx.get(f"http://{chart_pods.relay_ips[n]}:8001/healthz", timeout=5).json()
        assert health["pod"] == f"{RELEASE}-pod-{n}"
    # kube play cannot run probes; the Redis readiness probe's own command, run in its container, works.
    redis_deployment = named(chart_pods.manifests, "Deployment", f"{RELEASE}-redis")
    [redis_container] = redis_deployment["spec"]["template"]["spec"]["containers"]
    chart_pods.exec(f"{RELEASE}-redis-pod-0-redis", *redis_container["readinessProbe"]["exec"]["command"])
    anonymous = redis.Redis(host=chart_pods.redis_ip, port=6379, socket_timeout=5)
    with pytest.raises(redis.AuthenticationError):
        anonymous.ping()
    anonymous.close()
    with redis.Redis(host=chart_pods.redis_ip, port=6379, password=chart_pods.redis_password) as client:
        assert client.ping()
        assert client.execute_command("ACL", "WHOAMI") == b"default"


async def test_two_pods_deliver_to_each_other_through_the_chart_redis(chart_pods: ChartPods) -> None:
    """A member on each relay pod gets what the other pod's member publishes: Redis carries it."""
    a_ip, b_ip = chart_pods.relay_ips
    a = await RelayClient.connect(f"ws://{a_ip}:8000/room")
    b = await RelayClient.connect(f"ws://{b_ip}:8000/room")
    try:
        await a.publish("room", {"from": "a"})
        assert (await b.receive(timeout=10)).message["from"] == "a"
        await b.publish("room", {"from": "b"})
        assert [(await a.receive(timeout=10)).message["from"] for _ in range(2)] == ["a", "b"]
    finally:
        await asyncio.gather(a.close(), b.close())


def test_helm_test_pod_passes_against_the_pods(chart_pods: ChartPods) -> None:
    """The chart's `helm test` pod, its command and args as rendered, with the Service name `relay`
    standing for relay-pod-1's address: python -m service.selftest exits 0."""
    [selftest] = [
        m for m in of_kind(chart_pods.manifests, "Pod") if m["metadata"]["name"].endswith("selftest")
    ]
    chart_pods.play("selftest", playable(selftest, {RELEASE: chart_pods.relay_ips[1]}))
    container = f"{selftest['metadata']['name']}-selftest"
    wait_until(
        lambda: chart_pods.podman.output("inspect", container, "--format", "{{.State.Status}}") == "exited",
        60,
        "the selftest pod to finish",
    )
    logs = chart_pods.podman.run("logs", container).stdout + chart_pods.podman.run("logs", container).stderr
    assert chart_pods.podman.output("inspect", container, "--format", "{{.State.ExitCode}}") == "0", logs


async def readyz(ip: str) -> dict[str, Any] | None:
    """A pod's /readyz answer, or None when nothing answers."""
    try:
        async with httpx.AsyncClient() as client:
            answer: dict[str, Any] = (await client.get(f"http://{ip}:8001/readyz", timeout=2)).json()
            return answer
    except httpx.HTTPError:
        return None


async def test_killing_one_relay_leaves_the_other_serving_and_its_clients_reconnect(
    chart_pods: ChartPods,
) -> None:
    """SIGKILL relay-pod-0's container: relay-pod-1 stays ready and serving, and a client of the
    killed pod (RelayClient with reconnect, both pod addresses) carries on through relay-pod-1.
    Runs last in this module: the killed container stays down."""
    a_ip, b_ip = chart_pods.relay_ips
    moving = await RelayClient.connect([f"ws://{a_ip}:8000/room", f"ws://{b_ip}:8000/room"], reconnect=True)
    staying = await RelayClient.connect(f"ws://{b_ip}:8000/room")
    try:
        await staying.publish("room", {"n": -1})
        assert (await moving.receive(timeout=10)).message["n"] == -1
        chart_pods.podman.run("kill", "--signal", "KILL", f"{RELEASE}-pod-0-relay")
        assert await readyz(a_ip) is None
        assert (await readyz(b_ip) or {}).get("ready") is True
        deadline = time.monotonic() + 20
        while moving.reconnects == 0:
            assert time.monotonic() < deadline, "the killed pod's client never reconnected"
            await asyncio.sleep(0.05)
        # Its rejoin runs on its own: publish until one arrives, then the rest keep their order.
        got: dict[str, Any] | None = None
        n = 0
        while got is None:
            assert time.monotonic() < deadline, "nothing reached the reconnected client"
            await staying.publish("room", {"n": n})
            try:
                got = (await moving.receive(timeout=0.5)).message
            except TimeoutError:
                n += 1
        await moving.publish("room", {"n": "back"})
        seen = [(await staying.receive(timeout=10)).message["n"] for _ in range(n + 3)]
        assert seen[-1] == "back" and seen[:-1] == [-1, *range(n + 1)]
        answer = await readyz(b_ip)
        assert answer is not None and answer["ready"] and answer["connections"] == 2
    finally:
        await asyncio.gather(moving.close(), staying.close())

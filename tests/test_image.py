"""The image, for real: built from the Dockerfile with podman (tests/podman.py) and run as a user
would run it, read-only root and all.

The container runs on the host's network with its ports moved to free ones (RELAY_PORT,
RELAY_INTERNAL_PORT), so clients reach it over loopback. It is started without `--user`: the uid
checked is the Dockerfile's USER (the chart pods' test covers runAsUser).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.helpers import free_port, join, wait_until, ws_url
from tests.podman import Podman, Provisioned

# The build (about two minutes) happens in the first test's setup; the group keeps every container
# test on the one xdist worker that built the images.
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("podman"), pytest.mark.timeout(900)]

# Short drain timings; the grace period covers them as the chart's formula does (delay + window +
# 1.25 x close timeout + 1 s), plus a margin.
DRAIN = {"RELAY_DRAIN_DELAY": "0.5", "RELAY_DRAIN_WINDOW": "1", "RELAY_CLOSE_TIMEOUT": "2"}
GRACE_SECONDS = 10


@dataclass
class Container:
    podman: Podman
    name: str
    port: int
    internal_port: int

    def http(self, path: str) -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{self.internal_port}{path}", timeout=5)

    def inspect(self, template: str) -> str:
        return self.podman.output("inspect", self.name, "--format", template)


@pytest.fixture
def container(podman_images: Provisioned, request: pytest.FixtureRequest) -> Iterator[Container]:
    podman = podman_images.podman
    port, internal = free_port(), free_port()
    name = f"relay-image-{request.node.name[:40].replace('_', '-')}"
    env = {"RELAY_PORT": str(port), "RELAY_INTERNAL_PORT": str(internal), **DRAIN}
    podman.run(
        "run", "--detach", "--name", name, "--network", "host", "--read-only", "--tmpfs", "/tmp",
        # The HEALTHCHECK's timer needs systemd, absent here: the test runs the check itself.
        "--health-interval", "disable",
        *[f"--env={key}={value}" for key, value in env.items()],
        podman_images.images.relay,
    )  # fmt: skip
    found = Container(podman, name, port, internal)
    try:
        wait_until(lambda: _answers(found), 30, f"{name}'s /healthz")
        yield found
    finally:
        podman.run("rm", "--force", "--time", "0", name, check=False)


def _answers(container: Container) -> bool:
    if container.inspect("{{.State.Status}}") != "running":
        logs = container.podman.run("logs", container.name, check=False)
        raise AssertionError(f"{container.name} stopped:\n{logs.stdout}{logs.stderr}")
    try:
        return container.http("/healthz").status_code == 200
    except httpx.HTTPError:
        return False


def test_image_labels_name_the_base_it_was_built_on(podman_images: Provisioned) -> None:
    """The OCI labels tell the truth: base.name is the base actually used, not the Dockerfile's default."""
    images, podman = podman_images.images, podman_images.podman
    labels = json.loads(podman.output("image", "inspect", images.relay, "--format", "{{json .Labels}}"))
    assert labels["org.opencontainers.image.base.name"] == images.base
    assert labels["org.opencontainers.image.title"] == "relay"
    assert labels["org.opencontainers.image.revision"] not in ("", "unknown")
    config = json.loads(podman.output("image", "inspect", images.relay, "--format", "{{json .Config}}"))
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["python", "-m", "service"]


def test_image_size_is_reported(
    podman_images: Provisioned, record_property: Callable[[str, object], None]
) -> None:
    """Prints (and records in the junit properties) the sizes and build times; a relay layer of
    more than 200 MB over its base would mean the runtime stage picked up the build's leftovers."""
    images = podman_images.images
    relay, base = images.bytes[images.relay], images.bytes[images.base]
    for key, value in {
        **images.bytes,
        **{f"seconds.{k}": round(v, 1) for k, v in images.seconds.items()},
    }.items():
        record_property(key, value)
    print(f"relay image {relay / 1e6:.0f} MB on a {base / 1e6:.0f} MB base; build seconds {images.seconds}")
    assert 0 < relay - base < 200e6


async def test_container_runs_as_10001_on_a_read_only_root_and_serves(container: Container) -> None:
    """uid 10001, nothing writable but /tmp; health, readiness, the welcome and a group round trip."""
    podman = container.podman
    assert podman.output("exec", container.name, "id", "-u") == "10001"
    assert container.inspect("{{.HostConfig.ReadonlyRootfs}}") == "true"
    denied = podman.run("exec", container.name, "touch", "/opt/relay/x", check=False)
    assert denied.returncode != 0 and "Read-only file system" in denied.stderr
    podman.run("exec", container.name, "touch", "/tmp/x")
    assert container.http("/healthz").json()["status"] == "ok"
    assert container.http("/readyz").status_code == 200

    a = await join(ws_url(container.port, "/room"))
    b = await join(ws_url(container.port, "/room"))
    assert a.channel_id != b.channel_id
    body = await a.publish("room", text="through the image")
    assert await a.next() == {"message": body}
    assert await b.next() == {"message": body}
    await asyncio.gather(a.ws.close(), b.ws.close())


def test_healthcheck_passes_and_fails_when_healthz_does_not_answer(container: Container) -> None:
    """The image's own HEALTHCHECK command, run by podman, passes; a container whose internal port
    moved under it (the check reads RELAY_INTERNAL_PORT) fails it."""
    podman = container.podman
    result = podman.run("healthcheck", "run", container.name, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert container.inspect("{{.State.Health.Status}}") == "healthy"
    broken = podman.run(
        "exec", "--env", f"RELAY_INTERNAL_PORT={free_port()}", container.name,
        *json.loads(container.inspect("{{json .Config.Healthcheck.Test}}"))[1:],
        check=False,
    )  # fmt: skip
    assert broken.returncode != 0


async def test_sigterm_drains_with_1012_and_exits_0_within_the_grace_period(container: Container) -> None:
    """`podman stop` sends SIGTERM, then SIGKILL after the grace period: the pod closes its sockets
    with 1012 and exits 0 before that."""
    clients = [await join(ws_url(container.port, f"/drain{n}")) for n in range(3)]
    started = time.monotonic()
    stop = await asyncio.create_subprocess_exec(
        "podman", "stop", "--time", str(GRACE_SECONDS), container.name, env=container.podman.env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    codes = await asyncio.gather(*(c.close_code(timeout=GRACE_SECONDS) for c in clients))
    _, err = await asyncio.wait_for(stop.communicate(), GRACE_SECONDS + 30)
    elapsed = time.monotonic() - started
    assert stop.returncode == 0, err.decode()
    assert codes == [1012, 1012, 1012]
    assert container.inspect("{{.State.ExitCode}}") == "0"
    assert elapsed < GRACE_SECONDS, f"stopping took {elapsed:.1f} s: SIGKILL, not the drain, ended it"
    logs = container.podman.run("logs", container.name).stdout
    events = [json.loads(line).get("event") for line in logs.splitlines() if line.startswith("{")]
    assert {"pod.signal", "pod.draining", "pod.drained"} <= set(events)

"""The relay image, built and run for real with podman, from Debian packages only (no registry).

`make podman` installs the tools. `provision()` then, in a fresh temporary directory that holds all of
podman's state (storage, runtime files, network configs, secrets):
1. makes a Debian root with mmdebstrap from the mirrors this machine's apt already uses (its own
   sources file is passed along; no host is named here) and imports it as `localhost/relay-base`;
2. builds the repository's Dockerfile on that base (`BASE_IMAGE` build argument; the image's
   `org.opencontainers.image.base.name` label says which base was used), with the host's CA bundle and
   pip settings mounted into the build steps only, since downloads go through this machine's proxy;
3. builds a Redis image for the chart's in-chart Redis (Debian's redis-server on the same base).

Two things this kind of sandbox needs, set in the run's containers.conf: runc (crun refuses the cgroup
layout) with cgroupfs, and default ulimits no higher than the host allows (setting them needs
CAP_SYS_RESOURCE otherwise). The session fixture `podman_images` provisions once per test run; the
container tests share the xdist group `podman` so they all run in the one worker that built it.
Every failure is a test failure, never a skip.

`python -m tests.podman --json FILE` provisions, writes the timings and sizes as JSON, and cleans up.
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import io
import json
import os
import platform
import resource
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ("podman", "buildah", "runc", "mmdebstrap", "fuse-overlayfs", "catatonit")
# Debian's own places for the apt sources list; RELAY_TEST_APT_SOURCES (paths, colon-separated) overrides.
APT_SOURCES = ("/etc/apt/sources.list.d/debian.sources", "/etc/apt/sources.list")
BASE_PACKAGES = "python3,python3-venv,python-is-python3,ca-certificates"
CA_BUNDLE = Path(os.environ.get("SSL_CERT_FILE") or "/etc/ssl/certs/ca-certificates.crt")
CA_IN_BUILD = "/etc/ssl/certs/ca-certificates.crt"  # where Debian's python (and pip) look for it
PIP_CONFIG_DIR = Path("/etc/xdg/pip")  # pip's site-wide configuration directory (constraints live here)
RELAY_IMAGE = "localhost/relay:test"
REDIS_IMAGE = "localhost/relay-test-redis:bookworm"
REDIS_CONTAINERFILE = """\
FROM {base}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update -qq \\
    && apt-get install -y -qq --no-install-recommends redis-server >/dev/null \\
    && rm -rf /var/lib/apt/lists/*
"""


class PodmanError(RuntimeError):
    """A podman (or mmdebstrap) step failed; the message carries its output's tail."""


def require_tools() -> None:
    missing = [name for name in TOOLS if shutil.which(name) is None]
    if missing:
        raise PodmanError(
            f"the image and chart-pod tests need {', '.join(missing)}: run `make podman` "
            "(apt-get install podman buildah runc fuse-overlayfs slirp4netns uidmap catatonit "
            "containernetworking-plugins golang-github-containers-common mmdebstrap)"
        )


def apt_sources() -> list[str]:
    """The apt sources files this machine uses for Debian, to hand to mmdebstrap."""
    override = os.environ.get("RELAY_TEST_APT_SOURCES")
    candidates = override.split(":") if override else list(APT_SOURCES)
    found = [path for path in candidates if Path(path).is_file() and Path(path).stat().st_size]
    if not found:
        raise PodmanError(
            f"no apt sources file among {candidates}: set RELAY_TEST_APT_SOURCES to the Debian sources "
            "file(s) mmdebstrap should use"
        )
    return found


def debian_suite() -> str:
    """This machine's Debian codename: its sources file names that suite, so the base is the same."""
    for line in Path("/etc/os-release").read_text().splitlines():
        key, _, value = line.partition("=")
        if key == "VERSION_CODENAME" and value.strip('"'):
            return value.strip('"')
    return "bookworm"


@dataclass
class Podman:
    """podman with every bit of state under `root` (a temporary directory of this test run)."""

    root: Path
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def create(cls, root: Path) -> Podman:
        for sub in ("storage", "run", "tmp", "net", "volumes"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        nofile = hard if hard != resource.RLIM_INFINITY else 1048576
        nproc_soft, _ = resource.getrlimit(resource.RLIMIT_NPROC)
        # nproc: podman sets it for every rootful container unless told; this sandbox refuses raising it
        # past a cap (even to the host's own value), and a relay container needs few processes.
        nproc = 4096 if nproc_soft == resource.RLIM_INFINITY else min(nproc_soft, 4096)
        (root / "containers.conf").write_text(
            "[containers]\n"
            f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
            'log_driver = "k8s-file"\n'
            "[engine]\n"
            'runtime = "runc"\n'
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            f'events_logfile_path = "{root}/events.log"\n'
            f'tmp_dir = "{root}/tmp"\n'
            f'volume_path = "{root}/volumes"\n'
            "[network]\n"
            f'network_config_dir = "{root}/net"\n'
        )
        (root / "storage.conf").write_text(
            "[storage]\n"
            'driver = "overlay"\n'
            f'graphroot = "{root}/storage"\n'
            f'runroot = "{root}/run"\n'
            "[storage.options.overlay]\n"
            'mount_program = "/usr/bin/fuse-overlayfs"\n'
        )
        # No registry is reachable: never try one (short names, pulls).
        (root / "registries.conf").write_text("unqualified-search-registries = []\n")
        env = {
            **os.environ,
            "CONTAINERS_CONF": str(root / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(root / "storage.conf"),
            "CONTAINERS_REGISTRIES_CONF": str(root / "registries.conf"),
        }
        return cls(root, env)

    def run(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["podman", *args], env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise PodmanError(f"podman {' '.join(args)} exited {result.returncode}:\n{_tail(result)}")
        return result

    def output(self, *args: str, timeout: float = 120) -> str:
        return self.run(*args, timeout=timeout).stdout.strip()

    def logged(self, name: str, command: list[str], timeout: float) -> None:
        """A long step (mmdebstrap, a build) with its output in <root>/<name>.log."""
        log = self.root / f"{name}.log"
        with log.open("w") as out:
            result = subprocess.run(
                ["nice", "-n", "10", *command], env=self.env, stdout=out, stderr=subprocess.STDOUT,
                timeout=timeout, check=False,
            )  # fmt: skip
        if result.returncode != 0:
            tail = "\n".join(log.read_text().splitlines()[-30:])
            raise PodmanError(f"{name} exited {result.returncode} ({log}):\n{tail}")

    def ip_of(self, pod: str) -> str:
        """The address of a pod (its infra container) on podman's bridge network."""
        infra = self.output("pod", "inspect", pod, "--format", "{{.InfraContainerID}}")
        return self.output(
            "inspect", infra, "--format", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}"
        )

    def clean(self) -> None:
        """Stop and remove everything, then the state directory itself."""
        for args in (
            ("pod", "rm", "--force", "--all"),
            ("rm", "--force", "--all"),
            ("rmi", "--force", "--all"),
        ):
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.run(*args, timeout=120, check=False)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.run("system", "reset", "--force", timeout=120, check=False)
        shutil.rmtree(self.root, ignore_errors=True)


def _tail(result: subprocess.CompletedProcess[str]) -> str:
    return "\n".join((result.stdout + result.stderr).splitlines()[-30:])


def pip_config(path: Path) -> Path:
    """The host's pip settings as one pip.conf for the build steps: its site-wide files, then the
    PIP_* environment (which pip ranks higher). Settings naming a host path the build cannot see
    (a local wheel directory or file index) are left out; the CA bundle and constraints are mounted."""
    merged = configparser.ConfigParser()
    merged.read([PIP_CONFIG_DIR / "pip.conf", "/etc/pip.conf"])
    if not merged.has_section("global"):
        merged.add_section("global")
    for key, value in os.environ.items():
        if key.startswith("PIP_") and value:
            merged.set("global", key.removeprefix("PIP_").lower().replace("_", "-"), value)
    if merged.has_option("global", "cert"):  # the bundle is mounted at Debian's path in the build
        merged.set("global", "cert", CA_IN_BUILD)
    visible = (CA_IN_BUILD, str(PIP_CONFIG_DIR))
    for section in merged.sections():
        for key, value in list(merged.items(section)):
            local = value.startswith(("/", "file:"))
            if local and not any(value.removeprefix("file://").startswith(v) for v in visible):
                merged.remove_option(section, key)
    text = io.StringIO()
    merged.write(text)
    path.write_text(text.getvalue())
    return path


@dataclass
class Images:
    """What `provision` built, and what it cost."""

    base: str
    relay: str
    redis: str
    suite: str
    seconds: dict[str, float]
    bytes: dict[str, int]
    versions: dict[str, str]


def provision(podman: Podman) -> Images:
    require_tools()
    seconds: dict[str, float] = {}
    suite = debian_suite()
    base = f"localhost/relay-base:{suite}"

    start = time.monotonic()
    tarball = podman.root / "base.tar"
    podman.logged(
        "mmdebstrap",
        ["mmdebstrap", "--variant=apt", f"--include={BASE_PACKAGES}", suite, str(tarball), *apt_sources()],
        timeout=600,
    )
    seconds["mmdebstrap"] = time.monotonic() - start

    start = time.monotonic()
    podman.run("import", "--change", "CMD=/bin/sh", str(tarball), base, timeout=300)
    tarball.unlink()
    seconds["import"] = time.monotonic() - start

    build = ["podman", "build", "--format", "docker", "--pull=never", "--network", "host"]
    mounts = ["-v", f"{CA_BUNDLE}:{CA_IN_BUILD}:ro"]
    mounts += ["-v", f"{pip_config(podman.root / 'pip.conf')}:/etc/pip.conf:ro"]
    if PIP_CONFIG_DIR.is_dir():
        mounts += ["-v", f"{PIP_CONFIG_DIR}:{PIP_CONFIG_DIR}:ro"]
    start = time.monotonic()
    podman.logged(
        "build-relay",
        [*build, *mounts, "--build-arg", f"BASE_IMAGE={base}", "--build-arg", f"REVISION={_revision()}",
         "-t", RELAY_IMAGE, str(ROOT)],
        timeout=900,
    )  # fmt: skip
    seconds["build"] = time.monotonic() - start

    start = time.monotonic()
    context = podman.root / "redis-context"
    context.mkdir()
    (context / "Containerfile").write_text(REDIS_CONTAINERFILE.format(base=base))
    podman.logged("build-redis", [*build, "-t", REDIS_IMAGE, str(context)], timeout=600)
    seconds["redis_image"] = time.monotonic() - start

    sizes = {
        name: int(podman.output("image", "inspect", name, "--format", "{{.Size}}"))
        for name in (base, RELAY_IMAGE)
    }
    versions = {
        "podman": podman.output("--version"),
        "runc": _first_line(["runc", "--version"]),
        "mmdebstrap": _first_line(["mmdebstrap", "--version"]),
        "image_python": podman.output(
            "run", "--rm", "--network", "none", "--entrypoint", "python", RELAY_IMAGE, "-V"
        ),
    }
    return Images(base, RELAY_IMAGE, REDIS_IMAGE, suite, seconds, sizes, versions)


def _first_line(command: list[str]) -> str:
    out = subprocess.run(command, capture_output=True, text=True, check=False).stdout
    return out.splitlines()[0] if out else ""


def _revision() -> str:
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return result.stdout.strip() or "unknown"


def new_podman() -> Podman:
    # A short path under /tmp: conmon's attach sockets live below it (unix socket paths: 107 bytes at most).
    return Podman.create(Path(tempfile.mkdtemp(prefix="relay-podman-")))


@dataclass
class Provisioned:
    podman: Podman
    images: Images


@pytest.fixture(scope="session")
def podman_images() -> Iterator[Provisioned]:
    """podman and the images, built once per test run (once per xdist worker: keep the tests that
    use this in xdist group `podman`, so one worker builds). A failed build fails those tests."""
    podman = new_podman()
    try:
        try:
            images = provision(podman)
        except (PodmanError, subprocess.TimeoutExpired) as error:
            pytest.fail(str(error), pytrace=False)
        yield Provisioned(podman, images)
    finally:
        podman.clean()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path, help="write the timings, sizes and versions here")
    options = parser.parse_args()
    podman = new_podman()
    try:
        images = provision(podman)
        report: dict[str, Any] = {
            "command": "python -m tests.podman" + (f" --json {options.json}" if options.json else ""),
            "commit": _revision(),
            "machine": {"cpus": os.cpu_count(), "kernel": platform.release()},
            **asdict(images),
        }
    finally:
        podman.clean()
    text = json.dumps(report, indent=2)
    print(text)
    if options.json:
        options.json.write_text(text + "\n")


if __name__ == "__main__":
    main()

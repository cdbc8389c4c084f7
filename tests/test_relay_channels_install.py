"""relay_channels installs into a fresh virtualenv with Django and Channels and nothing of the server.

pip resolves its dependencies from the configured indexes, as a Django project's would; the package
is built from a copy of clients/django so the working tree gets no build leftovers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

SERVER_ONLY = {
    "uvicorn",
    "starlette",
    "prometheus-client",
    "structlog",
    "orjson",
    "msgpack",
    "pyjwt",
    "relay",
}


def _run(*argv: str | Path, timeout: float = 60) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "VIRTUAL_ENV", "PYTHON"))}
    run = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout, env=env)
    assert run.returncode == 0, f"{argv}: {run.stdout[-2000:]}\n{run.stderr[-3000:]}"
    return run.stdout


@pytest.mark.integration
@pytest.mark.xdist_group("relay-channels-install")
@pytest.mark.timeout(400)
def test_the_package_installs_alone_and_brings_django_and_channels_only(tmp_path: Path) -> None:
    source = tmp_path / "relay-channels"
    shutil.copytree(
        Path(ROOT, "clients", "django"), source, ignore=shutil.ignore_patterns("*.egg-info", "build")
    )
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    _run(python, "-m", "pip", "install", "--quiet", source, timeout=360)

    installed = {p["name"].lower() for p in json.loads(_run(python, "-m", "pip", "list", "--format=json"))}
    assert {"relay-channels", "django", "channels", "redis", "asgiref"} <= installed, installed
    assert not installed & SERVER_ONLY, installed & SERVER_ONLY

    # And it is a working layer: Channels builds it from settings; a bad CONFIG names its key.
    script = (
        "import django; from django.conf import settings\n"
        "settings.configure(CHANNEL_LAYERS={'default': {'BACKEND': 'relay_channels.RelayChannelLayer',"
        " 'CONFIG': {'url': 'redis+cluster://a:7000,b:7001', 'prefix': 'relay'}},"
        " 'bad': {'BACKEND': 'relay_channels.RelayChannelLayer', 'CONFIG': {'expiry': 5}}})\n"
        "django.setup()\n"
        "from channels.layers import get_channel_layer\n"
        "layer = get_channel_layer()\n"
        "print(type(layer).__module__, layer.config.url.kind, layer.extensions)\n"
        "try:\n    get_channel_layer('bad')\nexcept Exception as exc:\n    print(type(exc).__name__, exc)\n"
    )
    out = _run(python, "-c", script).splitlines()
    assert out[0] == "relay_channels.layer cluster ['groups']"
    assert out[1].startswith('ImproperlyConfigured relay_channels: CHANNEL_LAYERS["bad"]["CONFIG"]["expiry"]')

"""Settings: one reader of the environment, clear errors for bad values."""

from __future__ import annotations

import subprocess
import sys

import pytest

from service import config
from service.config import Settings, SettingsError
from tests.helpers import ROOT


def test_defaults_match_the_documented_ones() -> None:
    s = Settings.from_env({})
    assert (s.host, s.port, s.internal_port, s.broker_url) == ("127.0.0.1", 8000, 8001, "memory://")
    assert (s.max_frame_bytes, s.outbox_size) == (65536, 1024)
    assert config.POD_ID.fullmatch(s.pod_id)


def test_environment_is_parsed_by_type() -> None:
    s = Settings.from_env(
        {"RELAY_PORT": "9000", "RELAY_PUBLISH_RATE": "2.5", "RELAY_CONSOLE": "off", "RELAY_POD_ID": "pod-a"}
    )
    assert (s.port, s.publish_rate, s.console, s.pod_id) == (9000, 2.5, False, "pod-a")


def test_flags_win_over_environment() -> None:
    s = Settings.from_args(["--port", "9100", "--pod-id", "cli"], env={"RELAY_PORT": "9000"})
    assert (s.port, s.pod_id) == (9100, "cli")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RELAY_PORT": "eighty"}, "RELAY_PORT='eighty' is not a valid int"),
        ({"RELAY_PORT": "70000"}, "RELAY_PORT=70000 is invalid"),
        ({"RELAY_POD_ID": "has.dot"}, "RELAY_POD_ID='has.dot' is invalid"),
        ({"RELAY_OUTBOX_SIZE": "0"}, "RELAY_OUTBOX_SIZE=0 is invalid"),
        ({"RELAY_READY_CONNECTION_RATIO": "1.5"}, "RELAY_READY_CONNECTION_RATIO=1.5 is invalid"),
        ({"RELAY_LOG_FORMAT": "xml"}, "RELAY_LOG_FORMAT='xml' is invalid"),
        ({"RELAY_CONSOLE": "maybe"}, "RELAY_CONSOLE='maybe' is not a valid bool"),
        ({"RELAY_BROKER_URL": "localhost"}, "RELAY_BROKER_URL='localhost' is invalid"),
        ({"RELAY_PORT": "8001"}, "RELAY_INTERNAL_PORT=8001 is invalid"),
    ],
)
def test_invalid_values_fail_with_the_variable_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace(".", r"\.")):
        Settings.from_env(env)


def test_default_pod_id_is_a_valid_id() -> None:
    assert config.POD_ID.fullmatch(config.default_pod_id())


@pytest.mark.integration
def test_help_lists_every_setting() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "service", "--help"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    for env, _, _ in config.describe():
        assert env in out


@pytest.mark.integration
def test_invalid_setting_stops_start_up_with_a_clear_message() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "service"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"RELAY_MAX_CONNECTIONS": "-1", "PATH": "/usr/bin"},
        timeout=30,
    )
    assert done.returncode == 1
    assert "relay: invalid setting: RELAY_MAX_CONNECTIONS=-1 is invalid: must be at least 1" in done.stderr

"""The README is what users read first: it must name every setting, metric and close code."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import REGISTRY

import service.metrics  # noqa: F401  (registers every metric)
from service import config
from service.protocol import CloseCode
from tests.helpers import ROOT

README = Path(ROOT, "README.md").read_text(encoding="utf-8")


def test_every_setting_is_in_the_readme() -> None:
    missing = [env for env, _, _ in config.describe() if f"`{env}`" not in README]
    assert missing == []


def test_every_metric_is_in_the_readme() -> None:
    names = set()
    for family in REGISTRY.collect():
        if family.name.startswith("relay_"):
            suffix = {"counter": "_total", "info": "_info"}.get(family.type, "")
            names.add(family.name + suffix)
    missing = sorted(name for name in names if f"`{name}" not in README)
    assert missing == []


def test_every_close_code_is_in_the_readme() -> None:
    missing = [code.name for code in CloseCode if f"| {int(code)} |" not in README]
    assert missing == []


def test_readme_shows_the_two_set_up_commands() -> None:
    assert "make run" in README and "make test" in README

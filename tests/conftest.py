"""Fixtures shared by every test module. Helpers live in tests/helpers.py."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import structlog
import uvloop

pytest_plugins = ["tests.redis_servers", "tests.podman"]


def pytest_configure() -> None:
    # Tests read structlog output with capture_logs; no cached loggers (structlog docs/testing.md).
    structlog.configure(cache_logger_on_first_use=False)


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> Mapping[str, Any]:
    """Every async test runs on uvloop, as `python -m service` does: a bug that only uvloop shows
    (its transports are not asyncio.Transport subclasses) once kept every pod from reaching Redis
    while the tests, on asyncio's default loop, passed."""
    return {"uvloop": uvloop.new_event_loop}

"""Fixtures shared by every test module. Helpers live in tests/helpers.py."""

from __future__ import annotations

import structlog

pytest_plugins = ["tests.redis_servers"]


def pytest_configure() -> None:
    # Tests read structlog output with capture_logs; no cached loggers (structlog docs/testing.md).
    structlog.configure(cache_logger_on_first_use=False)

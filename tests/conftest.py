"""Fixtures shared by every test module. Helpers live in tests/helpers.py."""

from __future__ import annotations

from collections.abc import Generator, Mapping
from typing import Any

import pytest
import structlog
import uvloop
from _pytest.nodeid import NodeId

pytest_plugins = ["tests.redis_servers", "tests.podman"]


def pytest_configure() -> None:
    # Tests read structlog output with capture_logs; no cached loggers (structlog docs/testing.md).
    structlog.configure(cache_logger_on_first_use=False)


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> Mapping[str, Any]:
    """Every async test runs on uvloop, as `python -m service` does: a bug that only uvloop shows
    (its transports are not asyncio.Transport subclasses) once kept every pod from reaching Redis
    while the tests, on asyncio's default loop, passed."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> Generator[None]:
    """Make `--dist loadgroup` keep each `xdist_group` on one worker again. pytest-xdist 3.8 marks a
    group by appending "@<group>" to `item._nodeid`, which pytest 9.2 no longer reads (a node's id
    lives in `item._id`), so every group's tests were spread over the workers: two workers built
    the podman images at once. Runs after every other implementation, xdist's included; workers only
    (xdist sets `loadgroup` there). Drop this once xdist sets the id pytest reads."""
    result = yield
    if getattr(config.option, "loadgroup", False):
        for item in items:
            marked = getattr(item, "_nodeid", None)
            if isinstance(marked, str) and marked != item.nodeid:
                item._id = NodeId.parse(marked)
    return result

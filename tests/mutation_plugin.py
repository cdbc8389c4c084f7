"""pytest plugin for `make mutate` only (loaded by [tool.mutmut] pytest_add_cli_args in pyproject.toml).

mutmut runs each mutant in a pytest session of its own, in a child forked from one parent process
that ran the whole selection first. tests/redis_servers.py stops the shared Redis servers at the end
of every session, so each child would start its own: six seconds for the cluster alone, for each of
about a thousand broker mutants. Here the shared servers outlive the session instead: the parent
starts them once, every child inherits them (the children leave by os._exit, so they never stop
them), and the parent's atexit hook in tests/redis_servers.py kills them when mutmut exits. Tests
keep apart on shared servers by channel prefix, as they do within one session; servers a test may
kill or pause are still its own (the dedicated_* fixtures).

mutmut stops a mutant that runs too long by a signal that kills its child at once, so nothing in the
child can stop the servers it started itself (dedicated_redis and the like); they would live on as
orphans. So every process the tests start here gets Linux's "parent death signal": it is killed when
the process that started it ends, however that ends.
"""

from __future__ import annotations

import ctypes
import json
import signal
import subprocess
import types
from collections.abc import Iterator
from typing import Any

import pytest

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    """Runs in the new process between fork and exec."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class _DiesWithParent(subprocess.Popen[Any]):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("preexec_fn", _die_with_parent)
        super().__init__(*args, **kwargs)


@pytest.fixture(scope="session", autouse=True, name="_stop_shared_servers")
def _keep_shared_servers() -> Iterator[None]:
    yield


def pytest_configure(config: pytest.Config) -> None:
    subprocess.Popen = _DiesWithParent  # type: ignore[misc]
    # A fixture of a plugin registered after tests/conftest.py loaded tests.redis_servers replaces
    # the one of the same name there; pytest reads fixtures of plugins from modules and classes.
    holder = types.ModuleType("relay_mutation_keep_shared_servers")
    holder._stop_shared_servers = _keep_shared_servers  # type: ignore[attr-defined]
    config.pluginmanager.register(holder, holder.__name__)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Fastest tests first. mutmut runs a mutant's tests with `-x` in the order of a set, so a
    mutant caught only by a quick test could first sit through a minute of slow pod tests; the
    durations of the clean run (mutants/mutmut-stats.json, written before any mutant runs) put the
    quick ones first (docs/mutation.md, "Running it")."""
    durations = _durations()
    if durations:
        items.sort(key=lambda item: durations.get(item.nodeid, 60.0))


def _durations() -> dict[str, float]:
    try:
        with open("mutmut-stats.json") as f:  # mutmut runs the tests from mutants/
            found: dict[str, float] = json.load(f)["duration_by_test"]
            return found
    except (OSError, ValueError, KeyError):
        return {}

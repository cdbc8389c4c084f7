"""The presence cost measurement (loadtest/presence_cost.py) in a small whole run, so it cannot rot.

The numbers themselves live in docs/results/presence-cost.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

SHAPES = ("one group", "groups of 100", "one per group")


@pytest.mark.integration
def test_a_small_run_batches_the_joins_and_counts_the_refreshes(tmp_path: Path) -> None:
    out = tmp_path / "cost.json"
    argv = ["--connections", "1500", "--ttl", "60", "--cycles", "2", "--json", str(out)]
    command = [sys.executable, "-m", "loadtest.presence_cost", *argv]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(out.read_text())
    assert record["git_commit"] and record["versions"]["redis-server"]
    assert "presence_cost" in record["command"]
    shapes = {r["shape"]: r for r in record["results"]}
    # 1,500 joins queued in one turn leave as one FCALL per group: 1, 15 and 1,500 of them.
    assert [shapes[s]["join"]["fcalls"] for s in SHAPES] == [1, 15, 1500]
    # A refresh is one call per group and batch of 1,000 connections; three of them per TTL.
    assert [shapes[s]["refresh_cycle"]["fcalls"] for s in SHAPES] == [2, 15, 1500]
    assert shapes["groups of 100"]["steady"]["fcalls_per_second_per_10k"] == 15 * 3 / 60 * 10_000 / 1500
    assert all(r["leave"]["fcalls"] == r["groups"] for r in shapes.values())
    assert shapes["one per group"]["memory"]["bytes_per_connection"] > 100  # six keys a group: never 0
    assert "| one per group | 1,500 |" in record["table"]

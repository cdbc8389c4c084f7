"""The presence cost measurement (loadtest/presence_cost.py) in a tiny whole run, so it cannot rot.

The numbers themselves live in docs/results/presence-cost.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT


@pytest.mark.integration
def test_a_tiny_run_batches_the_joins_and_counts_the_refreshes(tmp_path: Path) -> None:
    out = tmp_path / "cost.json"
    argv = ["--connections", "300", "--ttl", "0.9", "--window", "0.9", "--json", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.presence_cost", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(out.read_text())
    assert (
        record["git_commit"] and record["versions"]["redis-server"] and "presence_cost" in record["command"]
    )
    shapes = {r["shape"]: r for r in record["results"]}
    # 300 joins queued in one turn leave as one FCALL per group: 1, 3 and 300 of them.
    assert [shapes[s]["join"]["fcalls"] for s in ("one group", "groups of 100", "one per group")] == [
        1,
        3,
        300,
    ]
    # Refreshed every TTL/3: about three calls per group over a window of one TTL.
    assert 2 <= shapes["groups of 100"]["steady"]["fcalls_per_second"] * 0.9 / 3 <= 4
    assert all(
        r["memory"]["bytes_per_connection"] > 0 and r["leave"]["fcalls"] == r["groups"]
        for r in shapes.values()
    )
    assert "| one per group | 300 |" in record["table"]

"""The Redis client benchmark (loadtest/redis_clients.py): its summary arithmetic (unit), and a tiny
whole run against its own redis-server and three-primary cluster (integration), so it cannot rot.

The numbers themselves live in docs/results/redis-clients.json and docs/performance.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.redis_clients import Sample, markdown, summarize
from tests.helpers import ROOT


def _sample(variant: str, rnd: int, cpu_us: float, shape: str = "publish") -> Sample:
    return Sample(shape, variant, rnd, 1000, cpu_us * 1000 / 1e6, 0.0, 0.0, 0.5)


def test_summary_gives_medians_and_the_ratio_to_relay_per_round_and_of_medians() -> None:
    samples = [
        _sample("relay RespConnection", 1, 2.0),
        _sample("redis-py Redis", 1, 40.0),
        _sample("relay RespConnection", 2, 4.0),
        _sample("redis-py Redis", 2, 60.0),
        _sample("relay RespConnection", 3, 3.0),
        _sample("redis-py Redis", 3, 90.0),
    ]
    relay, other = summarize(samples)
    assert relay["us_cpu_per_message_median"] == 3.0 and relay["ratio_to_relay"] == 1.0
    assert other["us_cpu_per_message_median"] == 60.0
    assert other["ratio_to_relay"] == 20.0  # median over median
    assert other["ratio_to_relay_per_round"] == [20.0, 15.0, 30.0]  # each round against its own relay
    assert other["messages_per_second_median"] == 2000
    table = markdown([relay, other])
    assert "| publish | relay RespConnection | **3.0** | 2.0, 4.0, 3.0 | 2,000 | 1 |" in table
    assert "| **20.0x** (15.0-30.0) |" in table


def test_an_incomplete_receive_is_marked_in_the_summary_and_the_table() -> None:
    short = Sample("receive", "redis-py PubSub listen()", 1, 10, 0.001, 0.0, 0.0, 1.0, complete=False)
    (row,) = summarize([short])
    assert row["complete"] is False and "ratio_to_relay" not in row
    assert "listen() (incomplete)" in markdown([row])


@pytest.mark.integration
def test_a_tiny_run_measures_every_variant_and_records_how(tmp_path: Path) -> None:
    out = tmp_path / "rc.json"
    tiny = ["--rounds", "1", "--tasks", "20", "--turns", "2", "--batch", "20", "--batches", "2"]
    tiny += ["--sequential", "20", "--receive", "50", "--receive-rate", "20000", "--groups", "5"]
    run = subprocess.run(
        [sys.executable, "-m", "loadtest.redis_clients", *tiny, "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=45,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = {(r["shape"], r["variant"]): r for r in result["summary"]}
    expected = {"tasks each": 40, "batches of": 40, "one awaited": 20, "receive": 50}
    shapes = {shape for shape, _ in rows}
    assert len(shapes) == 10  # publish x3, receive paced and flat out: on one server and on the cluster
    assert len(rows) == 29
    for sample in result["samples"]:
        want = next(n for key, n in expected.items() if key in sample["shape"])
        assert sample["messages"] == want, sample
        assert sample["complete"] and sample["cpu_s"] > 0 and sample["wall_s"] > 0
    for shape in shapes:  # every shape has relay's client as its reference, and redis-py against it
        variants = [v for s, v in rows if s == shape]
        assert any(v.startswith("relay ") for v in variants)
        assert any(v.startswith("redis-py ") for v in variants)
        assert all("ratio_to_relay" in rows[(shape, v)] for v in variants)
    assert result["versions"]["redis-py parser"] == "_AsyncHiredisParser"
    assert {"redis-py", "hiredis", "redis-server", "python", "uvloop"} <= result["versions"].keys()
    assert "-m loadtest.redis_clients --rounds 1 --tasks 20" in result["command"]
    assert result["git_commit"] and result["machine"]["cpus"]
    assert result["table_markdown"] in run.stdout

"""The history cost benchmark (loadtest/history_cost.py): its arithmetic (unit), and a tiny whole run
with two pods and their own redis-servers (integration), so it cannot rot.

The numbers themselves live in docs/results/history-cost.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from loadtest.history_redis import MemorySample, frame_of, summarize_memory, summarize_redis_cpu, window
from loadtest.history_report import bottleneck, markdown, step_record, summarize
from tests.helpers import ROOT


def _step(arm: str, rnd: int, pod_us: float, **extra: Any) -> dict[str, Any]:
    step = {
        "arm": arm,
        "round": rnd,
        "ok": True,
        "pod_us_per_message": pod_us,
        "pod_us_per_delivery": pod_us / 10,
    }
    step |= {"redis_us_per_message": 10.0, "p50_ms": 1.0, "p99_ms": 5.0, "pod_cpu_share": 0.3}
    return step | {"redis_cpu_share": 0.1, "others_cpu_share": 0.0} | extra


def test_summary_gives_medians_and_the_ratio_on_off_of_medians_and_per_round() -> None:
    steady = [
        _step("off", 1, 900.0, void=True, ok=False),  # disturbed by other processes, run again: not counted
        _step("off", 1, 100.0),
        _step("on", 1, 150.0),
        _step("on", 2, 120.0),
        _step("off", 2, 80.0),
        _step("off", 3, 120.0, redis_us_per_message=12.0),
        _step("on", 3, 240.0, redis_us_per_message=36.0),
    ]
    ramps = [
        {"arm": a, "round": r, "max_rate": m, "limit": "x"}
        for a, r, m in [("off", 1, 9000.0), ("on", 1, 6000.0)]
    ]
    summary = summarize(steady, ramps)
    pod = summary["pod_us_per_message"]
    assert pod["off"] == [100.0, 80.0, 120.0] and pod["off_median"] == 100.0
    assert pod["on_median"] == 150.0 and pod["ratio_on_off"] == 1.5
    assert pod["ratio_on_off_per_round"] == [1.5, 1.5, 2.0]  # each round against its own "off"
    assert summary["redis_us_per_message"]["ratio_on_off_per_round"] == [1.0, 1.0, 3.0]
    assert summary["max_rate"]["ratio_on_off"] == 0.67
    assert summary["all_steady_steps_ok"] is True and summary["void_steps"] == 1
    config = {"subscribers": 1000, "groups": 100, "rate": 2000.0, "history": 100}
    table = markdown(summary, [], [], config)
    assert "| pod CPU per message (µs) at 2,000 msg/s | 100.0 | 150.0 | **1.50x** (1.50-2.00) |" in table
    assert "| max publish rate at p99 <= 100 ms (msg/s) | 9,000 | 6,000 | **0.67x** (0.67-0.67) |" in table


def test_a_step_charges_the_arms_own_pod_and_redis_and_the_rest_to_other_processes() -> None:
    summary = {"published": 10_000, "deliveries": 100_000, "slo_violations": [], "ok": True}
    summary |= {
        "latency": {"p50_ms": 0.7, "p99_ms": 3.0, "max_ms": 9.0},
        "accounting": {"lost": 0, "duplicates": 0},
    }
    summary |= {"generator": {"cpu_share_per_process": [0.2], "saturated": []}}
    used = {"pod on": 2.0, "pod off": 0.05, "redis on": 0.4, "redis off": 0.01, "machine": 4.0}
    publishing = {"pod on": 1.8, "pod off": 0.04, "redis on": 0.36, "redis off": 0.0, "machine": 3.0}
    step = step_record("on", 2000.0, 5.0, summary, used, publishing, 6.0, 1.0, 0.8)
    # per message and per delivery: the whole step, drain included
    assert step["pod_us_per_message"] == 200.0 and step["pod_us_per_delivery"] == 20.0
    assert step["redis_us_per_message"] == 40.0 and step["idle_pod_cpu_s"] == 0.05
    # shares of a core: while publishing (5 s)
    assert step["pod_cpu_share"] == 0.36 and step["redis_cpu_share"] == 0.072
    assert step["generator_cpu_share"] == 0.16 and step["machine_cpu_share"] == 0.6
    assert step["others_cpu_share"] == round((3.0 - 2.2 - 0.8) / 5.0, 3)
    assert step["others_cpu_share_whole_step"] == round((4.0 - 2.46 - 1.0) / 6.0, 3)
    off = step_record("off", 2000.0, 5.0, summary, used, publishing, 6.0, 1.0, 0.8)
    assert off["pod_cpu_s"] == 0.05 and off["redis_cpu_s"] == 0.01 and off["idle_pod_cpu_s"] == 2.0


def test_a_failed_step_names_other_users_before_the_pod_and_the_pod_before_redis() -> None:
    step = {"generator_saturated": [], "pod_cpu_share": 0.95, "redis_cpu_share": 0.95, "lost": 0}
    step |= {"machine_cpu_share": 1.9, "others_cpu_share": 0.5}
    assert bottleneck(step).startswith("other processes on the machine used 50%")
    assert bottleneck(step | {"others_cpu_share": 0.0}) == "the pod at 95% of a core"
    quiet = step | {
        "others_cpu_share": 0.0,
        "pod_cpu_share": 0.5,
        "redis_cpu_share": 0.2,
        "machine_cpu_share": 1.0,
    }
    assert bottleneck(quiet) == "latency with the pod at 50% of a core (queueing, not CPU)"


def test_frames_have_the_size_asked_for_and_are_json() -> None:
    frame = frame_of(200, "mem17", 3)
    assert len(frame) == 200
    assert json.loads(frame)["message"]["group_name"] == "mem17"


def test_memory_summary_gives_bytes_per_group_per_stored_message_and_the_idempotency_share() -> None:
    def sample(rnd: int, delta: int) -> MemorySample:
        s = MemorySample("on", rnd, 10, 1100, 200, delta, 30, stream_entries=1000, idempotency_keys=10_000)
        s.by_kind = {"stream": 300_000, "meta": 10_000, "idempotency": 1_000_000}
        return s

    (row,) = summarize_memory([sample(1, 1_400_000), sample(2, 1_300_000), sample(3, 1_350_000)])
    assert row["bytes_per_group"] == [140_000, 130_000, 135_000] and row["bytes_per_group_median"] == 135_000
    assert row["stream_bytes_per_entry_median"] == 300.0 and row["idempotency_bytes_per_key_median"] == 100.0
    assert row["idempotency_share_median"] == round(1_000_000 / 1_310_000, 3)
    assert row["stream_entries_per_group"] == 100 and row["idempotency_keys_per_group"] == 1000


def test_redis_cpu_summary_is_relative_to_publish() -> None:
    samples = [{"variant": v, "redis_us_per_message": us} for v, us in [("publish", 2.0), ("append", 15.0)]]
    publish, append = summarize_redis_cpu(samples)
    assert publish["ratio_to_publish"] == 1.0 and append["ratio_to_publish"] == 7.5
    assert append["messages_per_redis_cpu_second"] == 66_667


@pytest.mark.integration
def test_a_tiny_run_measures_both_arms_alternating_and_records_how(tmp_path: Path) -> None:
    out = tmp_path / "hc.json"
    tiny = ["--subscribers", "20", "--groups", "4", "--rate", "100", "--seconds", "0.2", "--drain", "0.15"]
    tiny += [
        "--rounds",
        "2",
        "--ramp",
        "100,200",
        "--ramp-seconds",
        "0.1",
        "--ramp-drain",
        "0.15",
        "--warmup",
        "0",
        "--quiet-wait",
        "0",
        "--void-retries",
        "0",
    ]
    tiny += ["--memory-groups", "3", "--history", "5", "--prefill", "10", "--cpu-messages", "20"]
    run = subprocess.run(
        [sys.executable, "-m", "loadtest.history_cost", *tiny, "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=45,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    result = json.loads(out.read_text())

    steady = result["steady"]
    assert [(s["round"], s["arm"]) for s in steady] == [(1, "off"), (1, "on"), (2, "on"), (2, "off")]
    for s in steady:  # every message reached the 5 members of its group, none lost
        assert s["published"] == 20 and s["deliveries"] == 100 and s["lost"] == 0 and s["ok"], s
        assert s["pod_cpu_s"] >= 0 and s["wall_s"] > 0
    assert [(r["round"], r["arm"]) for r in result["ramps"]] == [(1, "off"), (1, "on"), (2, "on"), (2, "off")]
    for r in result["ramps"]:  # each ramp stepped, and its maximum is a step it passed (or none, on a
        # machine too loaded for p99 <= 100 ms even at 100 msg/s: this test checks the tool, not speed)
        assert r["steps"] and r["max_rate"] in {0.0} | {s["rate"] for s in r["steps"] if s["ok"]}, r

    mem = {(s["arm"], s["round"], s["messages_per_group"]): s for s in result["memory_samples"]}
    assert set(mem) == {(a, r, n) for a in ("off", "on") for r in (1, 2) for n in (5, 1005)}
    full, early = mem[("on", 2, 1005)], mem[("on", 2, 5)]
    assert full["stream_entries"] == 3 * 5  # capped at the history size
    assert full["idempotency_keys"] == 3 * window(5) == 3000  # kept for max(1000, history)
    assert early["idempotency_keys"] == 15 and full["idempotency_share"] > 0.5
    assert full["used_memory_delta"] > 100_000 > mem[("off", 2, 1005)]["used_memory_delta"]
    assert {r["variant"] for r in result["redis_cpu_summary"]} == {"publish", "append", "append without key"}

    assert "-m loadtest.history_cost --subscribers 20" in result["command"]
    assert len(result["git_commit"]) == 40 and isinstance(result["git_clean"], bool)
    assert result["versions"]["redis-server"][0].isdigit()
    assert {"python", "uvicorn", "uvloop", "websockets"} <= result["versions"].keys()
    assert result["machine"]["cpus"] and result["config"]["dedupe_window"] == 1000
    assert result["table_markdown"] in run.stdout

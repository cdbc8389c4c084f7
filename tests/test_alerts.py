"""The chart's PrometheusRule, checked and unit-tested by a real promtool (Debian's `prometheus`).

The rules are rendered with ci/monitoring-values.yaml as release "relay" in namespace "realtime";
tests/alerts_test.yaml feeds them synthetic series and says which alerts must fire, with which labels
and annotations. promtool also lints a real /metrics scrape of a running pod.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.charts import CHART, ROOT, exported_metric_names, of_kind, promql_metric_names, render, tool
from tests.helpers import start_pod_process

pytestmark = pytest.mark.xdist_group("helm")


def rules() -> dict[str, Any]:
    [rule] = of_kind(render(CHART / "ci" / "monitoring-values.yaml"), "PrometheusRule")
    spec: dict[str, Any] = rule["spec"]
    return spec


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("promtool"), *args], capture_output=True, text=True, timeout=60, check=False, cwd=cwd
    )


def test_rules_pass_promtool_check(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rules()))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 7 rules found" in result.stdout


def test_alerts_fire_as_the_unit_tests_say(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules()))
    shutil.copy(ROOT / "tests" / "alerts_test.yaml", tmp_path / "alerts_test.yaml")
    result = promtool("test", "rules", "alerts_test.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_unit_test() -> None:
    tested = {
        case["alertname"]
        for test in yaml.safe_load((ROOT / "tests" / "alerts_test.yaml").read_text())["tests"]
        for case in test["alert_rule_test"]
    }
    assert tested == {rule["alert"] for group in rules()["groups"] for rule in group["rules"]}


def test_alerts_use_only_metrics_the_relay_exports() -> None:
    known = exported_metric_names()
    for group in rules()["groups"]:
        for rule in group["rules"]:
            unknown = promql_metric_names(rule["expr"]) - known
            assert not unknown, f"{rule['alert']} uses metrics no relay pod exports: {sorted(unknown)}"


def test_alerts_cover_the_failures_the_issue_names() -> None:
    exprs = " ".join(rule["expr"] for group in rules()["groups"] for rule in group["rules"])
    for metric in (
        "relay_redis_up",
        "relay_group_fanout_latency_seconds_bucket",
        "relay_slow_consumer_disconnects_total",
        "relay_connections",
        "relay_connections_rejected_total",
    ):
        assert metric in exprs


@pytest.mark.integration
def test_a_real_scrape_passes_promtool_and_matches_the_metrics_module() -> None:
    pod = start_pod_process({"RELAY_DRAIN_DELAY": "0", "RELAY_DRAIN_WINDOW": "0.1"})
    try:
        text = httpx.get(f"http://127.0.0.1:{pod.internal_port}/metrics", timeout=5).text
    finally:
        pod.terminate()
        assert pod.wait() == 0
    result = subprocess.run(
        [tool("promtool"), "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    scraped = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE relay_")}
    parsed = exported_metric_names()
    for family in scraped:  # counters appear as X_total, their creation stamps as X_created gauges
        assert family in parsed or family + "_bucket" in parsed or family + "_info" in parsed, family
    for name in parsed:  # and every name parsed from service/metrics.py is really exported
        base = re.sub(r"_(total|created|bucket|sum|count|info)$", "", name)
        assert any(f in (name, base) or f.startswith(base + "_") for f in scraped), name

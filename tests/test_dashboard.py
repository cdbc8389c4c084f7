"""The Grafana dashboard (deploy/grafana/relay.json, embedded by the chart as a byte-identical copy).

Checked: structure (variables, a unit and a description on every panel), every PromQL expression
parses (promtool, with the dashboard variables substituted), every metric it names is one the relay
exports, and every relay metric shows up in some panel or alert.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.charts import (
    CHART,
    DASHBOARD,
    METRICS_MODULE,
    ROOT,
    exported_metric_names,
    of_kind,
    promql_metric_names,
    render,
    tool,
)

pytestmark = pytest.mark.xdist_group("helm")


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def expressions() -> list[str]:
    return [t["expr"] for p in panels() for t in p["targets"]]


def concrete(expr: str) -> str:
    """The expression as Grafana sends it, for one namespace and every pod."""
    return expr.replace("$__rate_interval", "1m").replace("$namespace", "realtime").replace("$pod", ".*")


def test_the_chart_embeds_the_same_file() -> None:
    copy = CHART / "dashboards" / "relay.json"
    assert copy.read_bytes() == DASHBOARD.read_bytes(), (
        "deploy/helm/relay/dashboards/relay.json differs from deploy/grafana/relay.json: "
        "edit deploy/grafana/relay.json, then cp deploy/grafana/relay.json deploy/helm/relay/dashboards/"
    )


def test_the_chart_configmap_carries_the_dashboard() -> None:
    manifests = render(CHART / "ci" / "monitoring-values.yaml")
    [config] = [m for m in of_kind(manifests, "ConfigMap") if "relay.json" in m.get("data", {})]
    assert config["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config["metadata"]["namespace"] == "monitoring"
    assert json.loads(config["data"]["relay.json"]) == dashboard()


def test_variables_select_datasource_namespace_and_pods() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert "namespace" in variables["namespace"]["definition"]
    assert variables["pod"]["multi"] and variables["pod"]["includeAll"]
    assert "$namespace" in variables["pod"]["definition"]


def test_every_panel_has_a_unit_a_description_and_the_datasource_variable() -> None:
    ids = [p["id"] for p in dashboard()["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels():
        assert panel["fieldConfig"]["defaults"].get("unit"), panel["title"]
        assert len(panel.get("description", "")) > 20, panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for target in panel["targets"]:
            assert 'namespace="$namespace"' in target["expr"] and 'pod=~"$pod"' in target["expr"], panel[
                "title"
            ]


def test_rows_cover_the_issue_sections() -> None:
    rows = [p["title"] for p in dashboard()["panels"] if p["type"] == "row"]
    assert rows == [
        "Overview",
        "Delivery",
        "Backpressure and drops",
        "Connection lifecycle",
        "Redis",
        "History and recovery",
        "Process",
        "Server API",
        "Presence",
    ]


def test_every_expression_parses(tmp_path: Path) -> None:
    rules = [{"record": f"relay:dashboard_{i}", "expr": concrete(e)} for i, e in enumerate(expressions())]
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [tool("promtool"), "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


PROCESS_METRICS = {"process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"}


def test_every_metric_in_the_dashboard_is_exported() -> None:
    known = exported_metric_names() | PROCESS_METRICS  # process_*: prometheus_client's default collector
    for expr in expressions():
        unknown = promql_metric_names(concrete(expr)) - known
        assert not unknown, f"{expr} uses metrics no relay pod exports: {sorted(unknown)}"


def test_every_relay_metric_appears_in_a_panel_or_an_alert() -> None:
    [rule] = of_kind(render(CHART / "ci" / "monitoring-values.yaml"), "PrometheusRule")
    used = set()
    for expr in expressions() + [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]]:
        used |= promql_metric_names(concrete(expr))
    families = re.findall(r'\b(?:Counter|Gauge|Histogram|Info)\(\s*"([a-z_]+)"', METRICS_MODULE.read_text())
    unused = [
        family for family in families
        if not any(name == family or name.startswith(family + "_") for name in used)
    ]  # fmt: skip
    assert not unused, f"relay metrics in no panel and no alert: {unused}"


GRAFANA_DEFAULT_STEPS = [{"color": "green", "value": None}, {"color": "red", "value": 80}]


def colour(panel: dict[str, Any], value: float) -> str:
    """The colour a stat panel's own thresholds give `value`."""
    steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
    chosen: str = steps[0]["color"]
    for step in steps[1:]:
        if value >= step["value"]:
            chosen = step["color"]
    return chosen


def stat(title: str) -> dict[str, Any]:
    [panel] = [p for p in panels() if p["type"] == "stat" and p["title"] == title]
    return panel


def test_every_stat_panel_has_its_own_thresholds_and_unit() -> None:
    """Without thresholds of its own a stat panel takes Grafana's default (red above 80)."""
    stats = [p for p in panels() if p["type"] == "stat"]
    assert stats
    for panel in stats:
        defaults = panel["fieldConfig"]["defaults"]
        assert defaults.get("unit"), panel["title"]
        thresholds = defaults.get("thresholds")
        assert thresholds and thresholds["mode"] == "absolute", panel["title"]
        assert thresholds["steps"][0]["value"] is None, panel["title"]
        assert thresholds["steps"] != GRAFANA_DEFAULT_STEPS, panel["title"]
        assert defaults.get("color", {}).get("mode") == "thresholds", panel["title"]
    assert colour(stat("Open connections"), 50_000) != "red"
    redis = stat("Redis up")
    assert redis["fieldConfig"]["defaults"]["unit"] == "percentunit"
    assert colour(redis, 0) == "red" and colour(redis, 0.5) != "green" and colour(redis, 1) == "green"
    p99 = stat("Fan-out p99")
    assert colour(p99, 0.01) == "green" and colour(p99, 0.3) == "red"  # the alert's 0.25 s


def test_the_folder_annotation_is_the_one_the_docs_tell_grafana_to_read() -> None:
    manifests = render(
        CHART / "ci" / "monitoring-values.yaml",
        sets=("metrics.grafanaDashboard.folderAnnotation=k8s-folder",),
    )
    [config] = [m for m in of_kind(manifests, "ConfigMap") if "relay.json" in m.get("data", {})]
    assert config["metadata"]["annotations"] == {"k8s-folder": "relay"}
    docs = " ".join((ROOT / "docs" / "deploy.md").read_text().split())
    for setting in ("sidecar.dashboards.folderAnnotation", "foldersFromFilesStructure"):
        assert setting in docs
        assert setting in (CHART / "values.yaml").read_text()

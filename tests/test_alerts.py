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

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.charts import CHART, ROOT, exported_metric_names, of_kind, promql_metric_names, render, tool
from tests.helpers import idle_pod_metrics

pytestmark = pytest.mark.xdist_group("helm")
ALERTS = (
    "RelayRedisDown", "RelayFanoutLatencyHigh", "RelaySlowConsumerDisconnects", "RelayNearConnectionCapacity",
    "RelayHandshakeRejects", "RelayMessagesLost", "RelayPublishFailures", "RelayNoReadyPods",
)  # fmt: skip
# kube-state-metrics (part of kube-prometheus-stack): the Deployment's ready pods, which no pod can report.
KUBE_STATE_METRICS = {"kube_deployment_spec_replicas", "kube_deployment_status_replicas_available"}


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
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


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
    known = exported_metric_names() | KUBE_STATE_METRICS
    for group in rules()["groups"]:
        for rule in group["rules"]:
            unknown = promql_metric_names(rule["expr"]) - known
            assert not unknown, f"{rule['alert']} uses metrics no relay pod exports: {sorted(unknown)}"


def test_every_rule_links_its_runbook_in_docs() -> None:
    names = [rule["alert"] for group in rules()["groups"] for rule in group["rules"]]
    assert sorted(names) == sorted(ALERTS)
    runbook = (ROOT / "docs" / "runbook.md").read_text()
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
        for h in re.findall(r"^## (.+)$", runbook, re.M)
    }
    for group in rules()["groups"]:
        for rule in group["rules"]:
            url = rule["annotations"]["runbook_url"]
            assert re.fullmatch(r"https://\S+/docs/runbook\.md#[a-z0-9-]+", url), url
            assert url.split("#")[1] == rule["alert"].lower() and url.split("#")[1] in anchors, url


# Pod names of this release's Deployment (<fullname>-<pod-template-hash>-<suffix>), and of pods the
# alerts must not see: another release whose name starts with this one's, and the in-chart Redis.
OUR_PODS = ("relay-5c9f7d8b4-x2mqz", "relay-7d4b9c-abcde")
OTHER_PODS = ("relay-canary-5c9f7d8b4-x2mqz", "relay-redis-6b8d9f7c5-k4wzp", "relayx-5c9f7d8b4-x2mqz")


def test_the_pod_matcher_sees_this_release_only() -> None:
    for group in rules()["groups"]:
        for rule in group["rules"]:
            for pattern in re.findall(r'pod=~"([^"]+)"', rule["expr"]):
                for pod in OUR_PODS:
                    assert re.fullmatch(pattern, pod), (rule["alert"], pattern, pod)
                for pod in OTHER_PODS:
                    assert not re.fullmatch(pattern, pod), (rule["alert"], pattern, pod)
            metrics = promql_metric_names(rule["expr"]) - KUBE_STATE_METRICS
            if metrics:
                assert 'pod=~"' in rule["expr"], rule["alert"]


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
    text = idle_pod_metrics()
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


@pytest.mark.integration
def test_the_first_loss_on_a_clean_pod_fires(tmp_path: Path) -> None:
    """A pod that starts clean exports relay_broker_lost_total at 0 for every reason (scraped here, not
    assumed); the first message lost after that must fire RelayMessagesLost. A reason that was never
    exported before its first loss must fire too."""
    text = idle_pod_metrics()
    lost = {
        sample.labels["reason"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "relay_broker_lost_total"
    }
    assert lost and set(lost.values()) == {0.0}, lost
    first = sorted(lost)[0]
    name = "relay-5c9f7d8b4-x2mqz"
    series = [
        {
            "series": f'relay_broker_lost_total{{namespace="realtime", pod="{name}", reason="{reason}"}}',
            # scraped value for 3 minutes, then the first loss on one reason
            "values": f"{value:g}x3 {value + 1:g}x5" if reason == first else f"{value:g}x8",
        }
        for reason, value in lost.items()
    ]
    series.append(  # a reason the pod did not export at start: absent, then its first loss
        {"series": f'relay_broker_lost_total{{namespace="realtime", pod="{name}", reason="new_reason"}}',
         "values": "_ _ _ _ 1x4"}
    )  # fmt: skip
    [rule] = [r for g in rules()["groups"] for r in g["rules"] if r["alert"] == "RelayMessagesLost"]
    expected = [
        {
            "exp_labels": {
                "severity": "warning",
                "team": "realtime",
                "namespace": "realtime",
                "reason": reason,
            },
            "exp_annotations": {
                "summary": f"relay lost 1 messages in 10 minutes ({reason})",
                "description": rule["annotations"]["description"],
                "runbook_url": rule["annotations"]["runbook_url"],
            },
        }
        for reason in sorted((first, "new_reason"))
    ]
    test = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "alert_rule_test": [
                    {"eval_time": "2m", "alertname": "RelayMessagesLost", "exp_alerts": []},
                    {"eval_time": "6m", "alertname": "RelayMessagesLost", "exp_alerts": expected},
                ],
            }
        ],
    }
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules()))
    (tmp_path / "clean_pod_test.yaml").write_text(yaml.safe_dump(test))
    result = promtool("test", "rules", "clean_pod_test.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr

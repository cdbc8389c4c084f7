"""Every label value a counter can take is exported at zero from the start, and dashboards and alerts
find every series they query on an idle pod (Prometheus practice: a series that is born at 1 hides
the first event from `increase()`, and a panel with no series shows "No data" instead of 0).

The code names label values in a few ways: literal `.labels("x")` calls, the close codes and refusal
reasons of service/endpoint.py, the outcomes `_execute` and the API's `_error` return, and the
reasons a Redis link fails with. Each is checked against service/metrics.py's lists, so a new value
cannot be counted without being exported at zero.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import get_args

import pytest
from prometheus_client import Counter
from prometheus_client.parser import text_string_to_metric_families

from service import endpoint, metrics, protocol
from service.broker.link import NOT_HERE
from tests.charts import CHART, DASHBOARD, of_kind, render
from tests.helpers import ROOT, idle_pod_metrics

SERVICE = Path(ROOT, "service")
COUNTERS = {
    name: value
    for name, value in vars(metrics).items()
    if isinstance(value, Counter) and value in metrics.LABEL_VALUES
}


def _calls(path: Path) -> list[ast.Call]:
    return [node for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Call)]


def _literal(node: ast.expr) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def test_every_labelled_counter_has_its_values_listed() -> None:
    labelled = {
        name for name, value in vars(metrics).items() if isinstance(value, Counter) and value._labelnames
    }
    assert labelled == set(COUNTERS) | {"DISCONNECTS"}


def test_every_literal_label_value_in_the_code_is_exported_at_zero() -> None:
    seen = 0
    for path in SERVICE.rglob("*.py"):
        for call in _calls(path):
            func = call.func
            if not (isinstance(func, ast.Attribute) and func.attr == "labels" and call.args):
                continue
            owner = func.value
            name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
            value = _literal(call.args[0])
            if name in COUNTERS and value is not None:
                seen += 1
                assert value in metrics.LABEL_VALUES[COUNTERS[name]], f"{path.name}: {name}.labels({value!r})"
    assert seen > 20  # the scan finds the calls (it would pass vacuously if it found none)


def test_outcomes_and_reasons_named_elsewhere_are_exported_at_zero() -> None:
    assert set(endpoint.REFUSALS) <= set(metrics.REJECT_REASONS)
    assert set(get_args(protocol.RejectReason)) <= set(metrics.RECEIVED_OUTCOMES)
    assert set(NOT_HERE.values()) <= set(metrics.LINK_FAILURE_REASONS)
    returned = {
        value
        for node in ast.walk(ast.parse(Path(SERVICE, "endpoint.py").read_text()))
        if isinstance(node, ast.Return) and isinstance(node.value, ast.Tuple) and node.value.elts
        for value in [_literal(node.value.elts[0])]
        if value is not None
    }
    assert {"published", "joined", "broker_error"} <= returned <= set(metrics.RECEIVED_OUTCOMES)
    api = {
        _literal(c.args[1])
        for module in ("api.py", "server_api.py")
        for c in _calls(Path(SERVICE, module))
        if getattr(c.func, "id", "") == "error"
    }
    assert {"unauthorized", "not_found"} <= api <= set(metrics.API_OUTCOMES)
    failed: set[str | None] = set()
    for path in Path(SERVICE, "broker").glob("*.py"):
        for call in _calls(path):
            name = getattr(call.func, "attr", getattr(call.func, "id", ""))
            if name in ("fail", "_went_down") and call.args:
                failed.add(_literal(call.args[-1]))
        failed |= set(re.findall(r'lost_reason = "([a-z_]+)"', path.read_text()))
    failed -= {None, "closed"}  # None: a reason passed on; "closed": relay closing it, never counted
    assert "probe_timeout" in failed and failed <= set(metrics.LINK_FAILURE_REASONS), failed


TARGET_LABELS = ("namespace", "pod", "job", "instance", "service", "container", "endpoint")


def _selectors(expr: str) -> list[tuple[str, dict[str, str]]]:
    """(metric, {label: exact value}) for every relay_* selector in a PromQL expression."""
    found = []
    for metric, braces in re.findall(r"\b(relay_[a-z_]+)(?:\{([^}]*)\})?", expr):
        labels = dict(re.findall(r'(\w+)\s*=\s*"([^"$]*)"', braces))  # exact matches; not =~ or variables
        for target in TARGET_LABELS:  # added by Prometheus from the scrape target, not by the pod
            labels.pop(target, None)
        found.append((metric, labels))
    return found


def _queries() -> list[tuple[str, str]]:
    """(where, expression) for every dashboard panel target and every alert rule."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [
        (f"panel {p['title']!r}", t["expr"])
        for p in dashboard["panels"]
        if p["type"] != "row"
        for t in p["targets"]
    ]
    [rule] = of_kind(render(CHART / "ci" / "monitoring-values.yaml"), "PrometheusRule")
    queries += [(f"alert {r['alert']}", r["expr"]) for g in rule["spec"]["groups"] for r in g["rules"]]
    return queries


@pytest.mark.integration
@pytest.mark.xdist_group("helm")
def test_an_idle_pod_exports_every_series_the_dashboard_and_the_alerts_query() -> None:
    text = idle_pod_metrics()
    series = [
        (sample.name, sample.labels)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("relay_")
    ]
    missing = []
    for where, expr in _queries():
        for metric, wanted in _selectors(expr):
            if not any(name == metric and wanted.items() <= labels.items() for name, labels in series):
                missing.append(f"{where}: {metric}{wanted or ''}")
    assert not missing, "no series on an idle pod for:\n" + "\n".join(missing)
    # every label value is there, at zero, before anything happened
    for counter, values in metrics.LABEL_VALUES.items():
        name = counter._name + "_total"
        label = counter._labelnames[0]
        exported = {labels[label] for sample_name, labels in series if sample_name == name}
        assert exported == set(values), name
    disconnects = {labels["code"] for name, labels in series if name == "relay_disconnects_total"}
    assert {"1000", "1012", "4008", "4029", "other"} <= disconnects

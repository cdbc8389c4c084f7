"""Helpers for the chart, alert and dashboard tests: the real helm and promtool binaries, rendering.

`make tools` puts pinned binaries in .tools/bin; without them these tests fail (never skip), so a
CI that forgot the tools target cannot pass by testing nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.config import Settings

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "relay"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
DASHBOARD = ROOT / "deploy" / "grafana" / "relay.json"
# There is no published relay image, so the chart refuses an empty image.repository; every render in
# the tests starts from this file (values files given later override it).
IMAGE_VALUES = ROOT / "tests" / "chart_image_values.yaml"
RELEASE = "relay"
METRICS_MODULE = ROOT / "service" / "metrics.py"

Manifest = dict[str, Any]


def tool(name: str) -> str:
    """Path of a pinned tool from `make tools` (or PATH); fails the test when it is missing."""
    local = ROOT / ".tools" / "bin" / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        pytest.fail(
            f"{name} is not installed: run `make tools` (puts helm, kubectl and promtool in .tools/bin)"
        )
    return found


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("helm"), *args], capture_output=True, text=True, timeout=120, check=False, env=_helm_env()
    )


def _helm_env() -> dict[str, str]:
    # Keep helm away from the user's repositories, caches and kubeconfig: rendering is offline.
    home = ROOT / ".tools" / "helm-home"
    return {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
        "KUBECONFIG": os.devnull,
    }


@functools.cache
def render_text(
    values: tuple[str, ...] = (), sets: tuple[str, ...] = (), release: str = RELEASE, image: bool = True
) -> str:
    """`helm template` output; raises with helm's message when rendering fails.

    `image=False` leaves out IMAGE_VALUES, to see what a user who sets no image gets.
    """
    args = ["template", release, str(CHART), "--namespace", "realtime"]
    for path in ((str(IMAGE_VALUES),) if image else ()) + values:
        args += ["-f", path]
    for assignment in sets:  # "json:key=1.5" keeps the JSON type, which --set turns into a string
        json_value = assignment.startswith("json:")
        args += ["--set-json" if json_value else "--set", assignment.removeprefix("json:")]
    result = helm(*args)
    if result.returncode != 0:
        raise RenderError(result.stderr.strip())
    return result.stdout


class RenderError(Exception):
    """helm refused the values (schema or a `fail` in a template); the message is helm's."""


def render(*values: str | Path, sets: tuple[str, ...] = (), release: str = RELEASE) -> list[Manifest]:
    text = render_text(tuple(str(v) for v in values), sets, release)
    return [doc for doc in strict_load_all(text) if doc]


class StrictLoader(yaml.SafeLoader):
    """A YAML loader that refuses duplicate keys, as kustomize and GitOps post-renderers do."""


def _mapping_without_duplicates(loader: StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark, f"mapping key {key!r} already defined",
                key_node.start_mark,
            )  # fmt: skip
        seen.add(key)
    return loader.construct_mapping(node)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def strict_load_all(text: str) -> list[Any]:
    """Every document of a multi-document YAML text; raises ConstructorError on a duplicate key."""
    return list(yaml.load_all(text, Loader=StrictLoader))  # a SafeLoader subclass


def helm_args_for(*values: str | Path) -> list[str]:
    """-f arguments for helm install/lint: the test image first, then the given files."""
    args: list[str] = []
    for path in (IMAGE_VALUES, *values):
        args += ["-f", str(path)]
    return args


def of_kind(manifests: list[Manifest], kind: str) -> list[Manifest]:
    return [m for m in manifests if m["kind"] == kind]


def one(manifests: list[Manifest], kind: str, component: str | None = None) -> Manifest:
    found = [
        m
        for m in of_kind(manifests, kind)
        if component is None or m["metadata"]["labels"].get("app.kubernetes.io/component") == component
    ]
    assert len(found) == 1, f"expected one {kind} ({component}), found {len(found)}"
    return found[0]


def relay_config(manifests: list[Manifest]) -> dict[str, str]:
    """The data of the relay's own ConfigMap (not the dashboard's)."""
    [config] = [
        m for m in of_kind(manifests, "ConfigMap") if "RELAY_BROKER_URL" in m.get("data", {})
    ]  # fmt: skip
    data: dict[str, str] = config["data"]
    return data


def setting_env_names() -> set[str]:
    """Every RELAY_* variable service/config.py reads, from the Settings fields' metadata."""
    return {f.metadata["env"] for f in dataclasses.fields(Settings)}


def exported_metric_names() -> set[str]:
    """Every sample name the relay's metrics module defines, as Prometheus exposes them.

    Parsed from service/metrics.py rather than a scrape so that labelled metrics nobody has
    touched yet still count; tests/test_alerts.py cross-checks the result against a real scrape.
    """
    text = METRICS_MODULE.read_text()
    names: set[str] = set()
    for kind, name in re.findall(r'\b(Counter|Gauge|Histogram|Info|Summary)\(\s*"([a-z_:]+)"', text):
        names |= sample_names(kind.lower(), name)
    return names


def sample_names(kind: str, name: str) -> set[str]:
    """The sample names a metric family of `kind` exposes in the text format."""
    if kind == "counter":
        base = name.removesuffix("_total")
        return {base + "_total", base + "_created"}
    if kind == "histogram":
        return {name + "_bucket", name + "_sum", name + "_count", name + "_created"}
    if kind == "summary":
        return {name, name + "_sum", name + "_count", name + "_created"}
    if kind == "info":
        return {name + "_info"}
    return {name}


PROMQL_WORDS = {
    "sum", "max", "min", "avg", "count", "by", "without", "rate", "increase", "irate", "histogram_quantile",
    "and", "or", "unless", "on", "ignoring", "group_left", "group_right", "bool", "offset", "topk",
    "bottomk", "abs", "clamp_min", "clamp_max", "le", "humanize", "humanizeDuration",
}  # fmt: skip


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers not inside braces, not functions or keywords."""
    outside = re.sub(r"\{[^}]*\}", "{}", expr)  # label matchers
    outside = re.sub(r"\[[^\]]*\]", "", outside)  # ranges
    outside = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", outside)  # grouping labels
    outside = re.sub(r'"[^"]*"', "", outside)
    names = set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", outside))
    return {n for n in names if n not in PROMQL_WORDS and not re.fullmatch(r"[0-9.e]+", n)}


def notes(*values: str | Path, sets: tuple[str, ...] = (), release: str = RELEASE) -> str:
    """What `helm install` prints after NOTES: for these values (a client-side dry run)."""
    args = ["install", release, str(CHART), "--dry-run=client", "--namespace", "realtime"]
    args += helm_args_for(*values)
    for assignment in sets:
        json_value = assignment.startswith("json:")
        args += ["--set-json" if json_value else "--set", assignment.removeprefix("json:")]
    result = helm(*args)
    if result.returncode != 0:
        raise RenderError(result.stderr.strip())
    return result.stdout.split("NOTES:", 1)[1]

"""The Helm chart, rendered by a real helm over every values file in deploy/helm/relay/ci.

Checked offline: `helm lint --strict`, every manifest against the Kubernetes API schemas of the oldest
and newest supported versions (kubernetes-validate, strict), the custom resources against the parts
of their CRD schemas the chart uses, the invariants a rollout depends on, and values that must fail.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.charts import (
    CHART,
    CI_VALUES,
    Manifest,
    RenderError,
    helm,
    of_kind,
    one,
    relay_config,
    render,
    setting_env_names,
)

KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")  # Chart.yaml kubeVersion >=1.29, and the newest schemas
VALUES_IDS = [p.stem for p in CI_VALUES]
pytestmark = pytest.mark.xdist_group("helm")


def pod_specs(manifests: list[Manifest]) -> list[tuple[str, dict[str, Any]]]:
    specs = [(m["metadata"]["name"], m["spec"]["template"]["spec"]) for m in of_kind(manifests, "Deployment")]
    specs += [(m["metadata"]["name"], m["spec"]) for m in of_kind(manifests, "Pod")]
    return specs


def test_there_is_a_values_file_for_every_feature() -> None:
    names = set(VALUES_IDS)
    for expected in (
        "default-values", "ha-values", "hpa-cpu-values", "hpa-connections-values",
        "external-redis-secret-values", "external-redis-url-values", "sentinel-values", "cluster-values",
        "monitoring-values",
        "ingress-values", "httproute-values", "networkpolicy-values", "everything-off-values",
        "everything-on-values", "production-values",
    ):  # fmt: skip
        assert expected in names


@pytest.mark.parametrize("values", CI_VALUES, ids=VALUES_IDS)
def test_helm_lint_strict_passes(values: Path) -> None:
    result = helm("lint", "--strict", str(CHART), "-f", str(values))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("values", CI_VALUES, ids=VALUES_IDS)
def test_every_manifest_is_valid_for_kubernetes(values: Path, version: str) -> None:
    for manifest in render(values):
        if manifest["apiVersion"].split("/")[0] in CRD_SCHEMAS_GROUPS:
            continue  # custom resources: test_custom_resources_match_their_crd_schemas
        kubernetes_validate.validate(manifest, version, strict=True)


# The parts of the CRD schemas (prometheus-operator v0.7x, Gateway API v1) that the chart renders,
# with additionalProperties false so that a misspelt field fails here rather than at `kubectl apply`.
_STR = {"type": "string"}
_LABELS = {"type": "object", "additionalProperties": _STR}
_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"matchLabels": _LABELS},
    "required": ["matchLabels"],
}
_NS_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"matchNames": {"type": "array"}},
}
_ENDPOINT = {
    "type": "object",
    "additionalProperties": False,
    "required": ["port"],
    "properties": {"port": _STR, "path": _STR, "interval": _STR, "scrapeTimeout": _STR},
}
_RULE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["alert", "expr"],
    "properties": {"alert": _STR, "expr": _STR, "for": _STR, "labels": _LABELS, "annotations": _LABELS},
}


def _cr(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"spec": {"type": "object", "additionalProperties": False, **spec}},
    }


CRD_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): _cr(
        {
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": _SELECTOR,
                "namespaceSelector": _NS_SELECTOR,
                "endpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT},
            },
        }
    ),
    ("monitoring.coreos.com/v1", "PodMonitor"): _cr(
        {
            "required": ["selector", "podMetricsEndpoints"],
            "properties": {
                "selector": _SELECTOR,
                "namespaceSelector": _NS_SELECTOR,
                "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT},
            },
        }
    ),
    ("monitoring.coreos.com/v1", "PrometheusRule"): _cr(
        {
            "required": ["groups"],
            "properties": {
                "groups": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name", "rules"],
                        "properties": {"name": _STR, "rules": {"type": "array", "items": _RULE}},
                    },
                }
            },
        }
    ),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): _cr(
        {
            "properties": {
                "parentRefs": {
                    "type": "array",
                    "minItems": 1,
                    "items": {"type": "object", "required": ["name"]},
                },
                "hostnames": {"type": "array", "items": _STR},
                "rules": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "matches": {"type": "array"},
                            "backendRefs": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "required": ["name", "port"],
                                    "properties": {"name": _STR, "port": {"type": "integer"}},
                                },
                            },
                            "timeouts": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {"request": _STR, "backendRequest": _STR},
                            },
                        },
                    },
                },
            }
        }
    ),
}
CRD_SCHEMAS_GROUPS = {api.split("/")[0] for api, _ in CRD_SCHEMAS}


@pytest.mark.parametrize("values", CI_VALUES, ids=VALUES_IDS)
def test_custom_resources_match_their_crd_schemas(values: Path) -> None:
    for manifest in render(values):
        key = (manifest["apiVersion"], manifest["kind"])
        if key[0].split("/")[0] in CRD_SCHEMAS_GROUPS:
            assert key in CRD_SCHEMAS, f"no schema for {key}"
            jsonschema.validate(manifest, CRD_SCHEMAS[key])


@pytest.mark.parametrize("values", CI_VALUES, ids=VALUES_IDS)
def test_every_pod_runs_restricted(values: Path) -> None:
    for name, spec in pod_specs(render(values)):
        assert spec["automountServiceAccountToken"] is False, name
        pod_ctx = spec["securityContext"]
        assert pod_ctx["runAsNonRoot"] is True and pod_ctx["seccompProfile"]["type"] == "RuntimeDefault", name
        for container in spec["containers"]:
            ctx = container["securityContext"]
            assert ctx["allowPrivilegeEscalation"] is False, name
            assert ctx["readOnlyRootFilesystem"] is True, name
            assert ctx["capabilities"]["drop"] == ["ALL"], name
            assert ctx["runAsNonRoot"] is True, name
            assert container["resources"]["requests"], name
            assert ":" in container["image"] or "@" in container["image"], name


@pytest.mark.parametrize("values", CI_VALUES, ids=VALUES_IDS)
def test_relay_deployment_invariants(values: Path) -> None:
    manifests = render(values)
    deployment = one(manifests, "Deployment", "relay")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    [container] = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"ws": 8000, "internal": 8001}
    for probe, path in (
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ):
        assert container[probe]["httpGet"] == {"path": path, "port": "internal"}, probe
    assert container["lifecycle"]["preStop"]["httpGet"] == {"path": "/drain", "port": "internal"}
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    annotations = spec["template"]["metadata"]["annotations"]
    assert re.fullmatch(r"[0-9a-f]{64}", annotations["checksum/config"])
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()

    config = relay_config(manifests)
    drain = float(config["RELAY_DRAIN_DELAY"]) + float(config["RELAY_DRAIN_WINDOW"])
    drain += float(config["RELAY_CLOSE_TIMEOUT"]) + 1  # pod.py waits close_timeout + 1 for sockets
    assert pod["terminationGracePeriodSeconds"] > math.ceil(drain) + 5

    hpa = of_kind(manifests, "HorizontalPodAutoscaler")
    if hpa:
        assert "replicas" not in spec, "replicas must be left to the HPA"
        assert hpa[0]["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
        assert hpa[0]["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 600
    else:
        assert spec["replicas"] >= 1


@pytest.mark.parametrize("values", CI_VALUES, ids=VALUES_IDS)
def test_liveness_never_depends_on_redis(values: Path) -> None:
    container = one(render(values), "Deployment", "relay")["spec"]["template"]["spec"]["containers"][0]
    for probe in ("startupProbe", "livenessProbe"):
        assert "exec" not in container[probe] and container[probe]["httpGet"]["path"] == "/healthz"


@pytest.mark.parametrize("values", CI_VALUES, ids=VALUES_IDS)
def test_every_relay_variable_is_one_the_service_reads(values: Path) -> None:
    manifests = render(values)
    known = setting_env_names()
    names = set(relay_config(manifests))
    container = one(manifests, "Deployment", "relay")["spec"]["template"]["spec"]["containers"][0]
    names |= {e["name"] for e in container["env"] if e["name"].startswith("RELAY_")}
    unknown = names - known
    assert not unknown, f"the chart sets variables service/config.py does not read: {sorted(unknown)}"


def test_every_key_under_relay_in_values_is_a_setting() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    known = setting_env_names()
    for key in values["relay"]:
        env = "RELAY_" + re.sub(r"(?<!^)(?=[A-Z])", "_", key).upper()
        assert env in known, f"values.yaml relay.{key} maps to {env}, which service/config.py does not read"


@pytest.mark.parametrize("values", CI_VALUES, ids=VALUES_IDS)
def test_selectors_and_port_names_match_the_pods(values: Path) -> None:
    manifests = render(values)
    pods = {
        m["metadata"]["name"]: (m["spec"]["template"]["metadata"]["labels"], m["spec"]["template"]["spec"])
        for m in of_kind(manifests, "Deployment")
    }

    def matching(selector: dict[str, str]) -> list[str]:
        return [name for name, (labels, _) in pods.items() if selector.items() <= labels.items()]

    for service in of_kind(manifests, "Service"):
        [target] = matching(service["spec"]["selector"])
        names = {p["name"] for c in pods[target][1]["containers"] for p in c["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in names, (service["metadata"]["name"], port)
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        for m in of_kind(manifests, kind):
            selector = m["spec"].get("selector") or m["spec"]["podSelector"]
            assert len(matching(selector["matchLabels"])) == 1, m["metadata"]["name"]
    for monitor in of_kind(manifests, "ServiceMonitor"):
        services = [
            s for s in of_kind(manifests, "Service")
            if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
        ]  # fmt: skip
        assert [s["spec"]["ports"][0]["name"] for s in services] == ["internal"]


@pytest.mark.parametrize("values", CI_VALUES, ids=VALUES_IDS)
def test_secrets_and_their_references_agree(values: Path) -> None:
    manifests = render(values)
    secrets = {s["metadata"]["name"]: s for s in of_kind(manifests, "Secret")}
    source = yaml.safe_load(values.read_text()) or {}
    existing = (source.get("externalRedis") or {}).get("existingSecret")
    if existing:
        assert not secrets, "existingSecret is set: the chart must not render a password Secret"
    for _, spec in pod_specs(manifests):
        for container in spec["containers"]:
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref and ref["name"] in secrets:
                    assert ref["key"] in secrets[ref["name"]]["data"]
                elif ref:
                    assert ref["name"] == existing or ref["name"] == (source.get("redis") or {}).get(
                        "auth", {}
                    ).get("existingSecret")
    for config in of_kind(manifests, "ConfigMap"):
        url = config.get("data", {}).get("RELAY_BROKER_URL", "")
        assert not re.search(r"://[^/@]*:[^/@]*@", url), (
            "a password in the broker URL would sit in a ConfigMap"
        )


def test_default_install_uses_the_in_chart_redis_with_a_password() -> None:
    manifests = render(CHART / "ci" / "default-values.yaml")
    config = relay_config(manifests)
    assert config["RELAY_BROKER_URL"] == "redis://relay-redis:6379/0"
    redis = one(manifests, "Deployment", "redis")
    assert redis["spec"]["template"]["spec"]["containers"][0]["image"].startswith("docker.io/library/redis:")
    assert of_kind(manifests, "Secret")[0]["metadata"]["name"] == "relay-redis"
    assert "replicas" in one(manifests, "Deployment", "relay")["spec"]


@pytest.mark.parametrize(
    ("values", "url"),
    [
        ("sentinel-values", "redis+sentinel://redis-sentinel-0.redis-sentinel:26379,"),
        ("cluster-values", "redis+cluster://redis-cluster-0.redis-cluster:6379,"),
        ("external-redis-secret-values", "rediss://my-redis.cache.example.com:6380/0"),
        ("external-redis-url-values", "redis://redis.shared.svc.cluster.local:6379/0"),
    ],
)
def test_external_redis_becomes_the_broker_url(values: str, url: str) -> None:
    manifests = render(CHART / "ci" / f"{values}.yaml")
    config = relay_config(manifests)
    assert config["RELAY_BROKER_URL"].startswith(url)
    assert not [m for m in of_kind(manifests, "Deployment") if "redis" in m["metadata"]["name"]]


def test_production_example_turns_the_console_off_and_monitoring_on() -> None:
    manifests = render(CHART / "ci" / "production-values.yaml")
    config = relay_config(manifests)
    assert config["RELAY_CONSOLE"] == "false"
    for kind in ("HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy", "ServiceMonitor"):
        assert of_kind(manifests, kind), kind
    assert of_kind(manifests, "PrometheusRule") and of_kind(manifests, "Ingress")


def test_ingress_example_documents_websocket_timeouts() -> None:
    ingress = one(render(CHART / "ci" / "ingress-values.yaml"), "Ingress")
    annotations = ingress["metadata"]["annotations"]
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600
    assert "proxy-read-timeout" in (CHART / "values.yaml").read_text()


def test_helm_test_pod_runs_the_selftest_through_the_service() -> None:
    manifests = render()
    pod = one(manifests, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    container = pod["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", "service.selftest"]
    service = one(manifests, "Service", "relay")
    assert f"ws://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}" in container["args"]


def test_notes_give_the_port_forward_commands() -> None:
    result = helm("install", "relay", str(CHART), "--dry-run=client", "--namespace", "realtime")
    assert result.returncode == 0, result.stderr
    assert "kubectl -n realtime port-forward service/relay 8000:8000" in result.stdout
    assert "kubectl -n realtime port-forward service/relay-internal 8001:8001" in result.stdout


def test_networkpolicy_opens_the_internal_port_only_to_monitoring() -> None:
    manifests = render(CHART / "ci" / "networkpolicy-values.yaml")
    policy = next(m for m in of_kind(manifests, "NetworkPolicy") if m["metadata"]["name"] == "relay")
    internal = next(r for r in policy["spec"]["ingress"] if r["ports"][0]["port"] == "internal")
    assert internal["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    egress_ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]}
    assert egress_ports == {53, 6379}


def test_values_yaml_has_a_comment_on_every_key() -> None:
    """Every key has a comment line right above it, except inside free-form Kubernetes objects."""
    free_form = ("resources:", "podSecurityContext:", "securityContext:")
    lines = (CHART / "values.yaml").read_text().splitlines()
    missing = []
    skip_indent: int | None = None
    for i, line in enumerate(lines):
        stripped = line.lstrip(" -")
        indent = len(line) - len(line.lstrip(" "))
        if skip_indent is not None:
            if stripped and indent <= skip_indent:
                skip_indent = None
            else:
                continue
        if not re.match(r"[A-Za-z][\w.-]*:", stripped) or line.lstrip().startswith("#"):
            continue
        above = lines[i - 1].strip() if i else ""
        if not above.startswith("#") and not above.startswith("- #"):
            missing.append(f"{i + 1}: {line.strip()}")
        if stripped.startswith(free_form) and stripped.rstrip().endswith(":"):
            skip_indent = indent
    assert not missing, "values.yaml keys without a comment:\n" + "\n".join(missing)


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (("replicaCount=0",), "/replicaCount"),
        (("relay.logLevel=LOUD",), "/relay/logLevel"),
        (("relay.readyConnectionRatio=1.5",), "/relay/readyConnectionRatio"),
        (("relay.unknownSetting=1",), "unknownSetting"),
        (("securityContext.runAsNonRoot=false",), "/securityContext/runAsNonRoot"),
        (("image.digest=latest",), "/image/digest"),
        (("service.type=Headless",), "/service/type"),
        (("externalRedis.url=http://redis:6379",), "/externalRedis/url"),
        (("metrics.serviceMonitor.interval=often",), "/metrics/serviceMonitor/interval"),
        (("autoscaling.scaleDownStabilizationSeconds=7200",), "scaleDownStabilizationSeconds"),
    ],
)
def test_schema_rejects_bad_values(sets: tuple[str, ...], message: str) -> None:
    with pytest.raises(RenderError, match=re.escape(message)):
        render(sets=sets)


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (
            ("externalRedis.enabled=true", "externalRedis.host=redis"),
            "set exactly one of redis.enabled (Redis inside this release) and externalRedis.enabled "
            "(your own Redis); both are true",
        ),
        (("redis.enabled=false",), "both are false"),
        (
            ("redis.enabled=false", "externalRedis.enabled=true"),
            "needs externalRedis.url, externalRedis.host",
        ),
        (
            ("redis.enabled=false", "externalRedis.enabled=true", "externalRedis.sentinel.enabled=true"),
            "externalRedis.sentinel.enabled needs externalRedis.sentinel.hosts",
        ),
        (
            ("redis.enabled=false", "externalRedis.enabled=true", "externalRedis.host=r",
             "externalRedis.password=p", "externalRedis.existingSecret=s"),
            "set externalRedis.password or externalRedis.existingSecret, not both",
        ),
        (("terminationGracePeriodSeconds=20",), "terminationGracePeriodSeconds=20 must exceed"),
        (("relay.drainWindow=60", "terminationGracePeriodSeconds=70"), "must exceed"),
        (
            ("autoscaling.enabled=true", "autoscaling.minReplicas=5", "autoscaling.maxReplicas=2"),
            "minReplicas",
        ),
        (("httpRoute.enabled=true",), "httpRoute.enabled needs httpRoute.parentRefs"),
    ],
)  # fmt: skip
def test_inconsistent_values_fail_with_a_useful_message(sets: tuple[str, ...], message: str) -> None:
    with pytest.raises(RenderError, match=re.escape(message)):
        render(sets=sets)


def test_grace_period_follows_the_drain_settings_when_not_set() -> None:
    manifests = render(sets=("relay.drainDelay=7", "json:relay.drainWindow=30.5", "relay.closeTimeout=4"))
    pod = one(manifests, "Deployment", "relay")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == math.ceil(7 + 30.5 + 4 + 1) + 15

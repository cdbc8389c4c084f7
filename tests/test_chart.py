"""The Helm chart, rendered by a real helm over every values file in deploy/helm/relay/ci.

Checked offline: `helm lint --strict`, every manifest against the Kubernetes API schemas of the oldest
and newest supported versions (kubernetes-validate, strict), the custom resources against the parts
of their CRD schemas the chart uses, the invariants a rollout depends on, and values that must fail.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import re
import time
from pathlib import Path
from typing import Any

import jsonschema
import jwt
import kubernetes_validate
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from service.auth import Authenticator, AuthError
from service.config import Settings
from service.rules import GroupRules
from tests.charts import (
    CHART,
    CI_VALUES,
    Manifest,
    RenderError,
    helm,
    helm_args_for,
    notes,
    of_kind,
    one,
    relay_config,
    render,
    setting_env_names,
)

KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")  # Chart.yaml kubeVersion >=1.29, and the newest schemas
VALUES_IDS = [p.stem for p in CI_VALUES]
pytestmark = pytest.mark.xdist_group("helm")

# Token keys for the security tests: an ES256 pair made per run, its public half as a JWKS and a PEM.
SIGNING_KEY = ec.generate_private_key(ec.SECP256R1())
JWKS = {"keys": [{**json.loads(jwt.algorithms.ECAlgorithm.to_jwk(SIGNING_KEY.public_key())), "kid": "k1"}]}
JWKS_JSON = json.dumps(JWKS)
PEM = (
    SIGNING_KEY.public_key()
    .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    .decode()
)
PEM_JSON = json.dumps(PEM)
API_KEY = "test-api-key-0123456789"
HS256_SECRET = "an-hs256-secret-of-at-least-32-bytes!"
SECURITY_VALUES = CHART / "ci" / "security-values.yaml"
# The settings that are secrets: Settings keeps them out of repr(), the chart keeps them out of ConfigMaps.
SECRET_SETTINGS = {f.metadata["env"] for f in dataclasses.fields(Settings) if not f.repr}


def pod_specs(manifests: list[Manifest]) -> list[tuple[str, dict[str, Any]]]:
    specs = [(m["metadata"]["name"], m["spec"]["template"]["spec"]) for m in of_kind(manifests, "Deployment")]
    specs += [(m["metadata"]["name"], m["spec"]) for m in of_kind(manifests, "Pod")]
    return specs


def relay_container(manifests: list[Manifest]) -> dict[str, Any]:
    container: dict[str, Any] = one(manifests, "Deployment", "relay")["spec"]["template"]["spec"][
        "containers"
    ][0]
    return container


def test_there_is_a_values_file_for_every_feature() -> None:
    names = set(VALUES_IDS)
    for expected in (
        "default-values", "ha-values", "hpa-cpu-values", "hpa-connections-values",
        "external-redis-secret-values", "external-redis-url-values", "sentinel-values", "cluster-values",
        "monitoring-values",
        "ingress-values", "httproute-values", "networkpolicy-values", "everything-off-values",
        "everything-on-values", "production-values", "security-values", "auth-keysfrom-secret-values",
    ):  # fmt: skip
        assert expected in names


@pytest.mark.parametrize("values", CI_VALUES, ids=VALUES_IDS)
def test_helm_lint_strict_passes(values: Path) -> None:
    result = helm("lint", "--strict", str(CHART), *helm_args_for(values))
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
    assert "lifecycle" not in container  # SIGTERM drains; /drain needs a key no hook could carry
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    annotations = spec["template"]["metadata"]["annotations"]
    assert re.fullmatch(r"[0-9a-f]{64}", annotations["checksum/config"])
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()

    config = relay_config(manifests)
    drain = float(config["RELAY_DRAIN_DELAY"]) + float(config["RELAY_DRAIN_WINDOW"])
    drain += float(config["RELAY_CLOSE_TIMEOUT"]) * 1.25 + 1  # pod.py waits that long for sockets
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


# The relay.* groups the ConfigMap does not render key by key, and the variables each one sets.
RELAY_GROUPS = {
    "allowedOrigins": {"RELAY_ALLOWED_ORIGINS"},
    "auth": {
        "RELAY_JWT_JWKS_FILE", "RELAY_JWT_PUBLIC_KEY_FILE", "RELAY_JWT_SECRET", "RELAY_JWT_ALGORITHMS",
        "RELAY_JWT_AUDIENCE", "RELAY_JWT_ISSUER", "RELAY_JWT_REQUIRED_CLAIMS", "RELAY_JWT_LEEWAY",
    },
    "api": {"RELAY_API_KEYS"},
    "groupRules": {"RELAY_GROUP_RULES_FILE"},
}  # fmt: skip


def _env_name(key: str) -> str:
    return "RELAY_" + re.sub(r"(?<!^)(?=[A-Z])", "_", key).upper()


def test_every_key_under_relay_in_values_is_a_setting() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    known = setting_env_names()
    for key, value in values["relay"].items():
        if key == "limits":
            names = {_env_name(k) for k in value}
        elif key in RELAY_GROUPS:
            names = RELAY_GROUPS[key]
        else:
            assert not isinstance(value, dict | list), f"relay.{key} is a group the ConfigMap cannot render"
            names = {_env_name(key)}
        unknown = names - known
        assert not unknown, (
            f"values.yaml relay.{key} maps to {unknown}, which service/config.py does not read"
        )


def test_the_chart_carries_every_setting() -> None:
    """Every RELAY_* variable in service/config.py is set by some ci/ values file, so none needs extraEnv."""
    rendered: set[str] = set()
    for values in CI_VALUES:
        manifests = render(values)
        rendered |= set(relay_config(manifests))
        rendered |= {e["name"] for e in relay_container(manifests).get("env", [])}
    missing = setting_env_names() - rendered
    assert not missing, f"no values file makes the chart render {sorted(missing)}"


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


def _user_secrets(source: dict[str, Any]) -> dict[str, str]:
    """Secrets the values say the user made: name -> the values key that names it."""
    relay = source.get("relay") or {}
    named = {
        "externalRedis.existingSecret": (source.get("externalRedis") or {}).get("existingSecret"),
        "externalRedis.tls.existingSecret": ((source.get("externalRedis") or {}).get("tls") or {}).get(
            "existingSecret"
        ),
        "redis.auth.existingSecret": ((source.get("redis") or {}).get("auth") or {}).get("existingSecret"),
        "relay.auth.existingSecret": (relay.get("auth") or {}).get("existingSecret"),
        "relay.auth.keysFrom.secret": ((relay.get("auth") or {}).get("keysFrom") or {}).get("secret"),
        "relay.api.existingSecret": (relay.get("api") or {}).get("existingSecret"),
    }
    return {name: key for key, name in named.items() if name}


@pytest.mark.parametrize("values", CI_VALUES, ids=VALUES_IDS)
def test_secrets_and_their_references_agree(values: Path) -> None:
    manifests = render(values)
    secrets = {s["metadata"]["name"]: s for s in of_kind(manifests, "Secret")}
    source = yaml.safe_load(values.read_text()) or {}
    users = _user_secrets(source)
    assert not set(users) & set(secrets), "existingSecret is set: the chart must not render that Secret"
    if (source.get("externalRedis") or {}).get("existingSecret"):
        assert not [s for s in secrets if "redis" in s], "existingSecret: no chart password Secret"
    if ((source.get("relay") or {}).get("api") or {}).get("existingSecret"):
        assert "relay-api" not in secrets, "relay.api.existingSecret: no chart API key Secret"
    for _, spec in pod_specs(manifests):
        for container in spec["containers"]:
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref and ref["name"] in secrets:
                    assert ref["key"] in secrets[ref["name"]]["data"]
                elif ref:
                    assert ref["name"] in users, (
                        f"{env['name']} refers to Secret {ref['name']}, named nowhere"
                    )
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                name = volume["secret"]["secretName"]
                assert name in secrets or name in users, f"volume {volume['name']}: unknown Secret {name}"
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
    args = ("install", "relay", str(CHART), "--dry-run=client", "--namespace", "realtime", *helm_args_for())
    result = helm(*args)
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
        (("relay.redisPrefix=team:relay",), "/relay/redisPrefix"),
        (("relay.wsImpl=uvloop",), "/relay/wsImpl"),
        (("relay.limits.userMaxConnections=-1",), "/relay/limits/userMaxConnections"),
        (("relay.limits.connectRate=-0.5",), "/relay/limits/connectRate"),
        (('json:relay.limits.userPublishRate="fast"',), "/relay/limits/userPublishRate"),
        (("relay.limits.perGroupRate=1",), "additional properties 'perGroupRate' not allowed"),
        (("json:relay.allowedOrigins=[1]",), "/relay/allowedOrigins/0"),
        (('json:relay.allowedOrigins="https://app.example.com"',), "/relay/allowedOrigins"),
        (("relay.allowedOrigins={https://app.example.com/path}",), "/relay/allowedOrigins/0"),
        (("relay.auth.algorithms={none}",), "/relay/auth/algorithms/0"),
        (("relay.auth.leeway=-1",), "/relay/auth/leeway"),
        (("json:relay.auth.requiredClaims=[]",), "/relay/auth/requiredClaims"),
        (('json:relay.auth.jwks={"kid": "k"}',), "/relay/auth/jwks"),
        (("relay.auth.publicKey=secret",), "/relay/auth/publicKey"),
        (("relay.auth.secret=s3cret",), "additional properties 'secret' not allowed"),
        (("relay.api.keys={short}",), "/relay/api/keys/0"),
        (("relay.api.keys={key-with-a-comma\\,0123456789}",), "/relay/api/keys/0"),
        (('json:networkPolicy.apiFrom=[{"namespace": "backend"}]',), "/networkPolicy/apiFrom/0"),
    ],
)
def test_schema_rejects_bad_values(sets: tuple[str, ...], message: str) -> None:
    with pytest.raises(RenderError, match=re.escape(message)):
        render(sets=sets)


def _env_from_secret(name: str) -> str:
    return json.dumps([{"name": name, "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}])


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
        (("relay.auth.enabled=true",), "relay.auth.enabled needs a key to verify tokens with"),
        (("relay.auth.existingSecret=relay-jwt",), "relay.auth has key material"),
        (("relay.auth.enabled=true", "relay.auth.keysFrom.configMap=jwks"),
         "keysFrom needs jwksKey or publicKeyKey"),
        (("relay.auth.enabled=true", "relay.auth.keysFrom.jwksKey=jwks.json", "relay.auth.existingSecret=s"),
         "name a key of relay.auth.keysFrom.configMap or keysFrom.secret, and neither is set"),
        (("relay.auth.enabled=true", "relay.auth.keysFrom.configMap=a", "relay.auth.keysFrom.secret=b",
          "relay.auth.keysFrom.jwksKey=jwks.json"),
         "keysFrom.configMap or relay.auth.keysFrom.secret, not both"),
        (("relay.auth.enabled=true", f"json:relay.auth.jwks={JWKS_JSON}",
          f"json:relay.auth.publicKey={PEM_JSON}"),
         "set relay.auth.jwks or relay.auth.publicKey, not both"),
        (("relay.auth.enabled=true", f"json:relay.auth.jwks={JWKS_JSON}", "relay.auth.keysFrom.secret=k",
          "relay.auth.keysFrom.jwksKey=jwks.json"),
         "inline (relay.auth.jwks / publicKey) or through relay.auth.keysFrom"),
        (("relay.auth.enabled=true", 'json:relay.auth.jwks="{not json}"'), "relay.auth.jwks is not a JWKS"),
        (("relay.auth.enabled=true", f"json:relay.auth.jwks={JWKS_JSON}", "relay.auth.algorithms={HS256}"),
         "lists an HS algorithm, which needs the shared secret from relay.auth.existingSecret"),
        (("relay.auth.enabled=true", "relay.auth.existingSecret=s", "relay.auth.algorithms={RS256}"),
         "lists a public-key algorithm (RS/ES/PS/EdDSA), which needs relay.auth.jwks"),
        (("relay.auth.enabled=true", "relay.auth.existingSecret=s", f"json:relay.auth.jwks={JWKS_JSON}"),
         "list relay.auth.algorithms (e.g. [HS256, RS256])"),
        (("relay.auth.enabled=true", f"json:relay.auth.jwks={JWKS_JSON}", "relay.auth.existingSecret=s",
          "relay.auth.algorithms={RS256}"), "lists no HS algorithm"),
        (("relay.auth.enabled=true", f"json:relay.auth.jwks={JWKS_JSON}", "relay.auth.algorithms={HS512}",
          "relay.auth.existingSecret=s"), "lists only HS algorithms"),
        (("relay.api.enabled=true",), "relay.api.enabled needs API keys"),
        (("relay.api.enabled=true", "relay.api.existingSecret=a", f"relay.api.keys={{{API_KEY}}}"),
         "set relay.api.existingSecret or relay.api.keys, not both"),
        ((f"relay.api.keys={{{API_KEY}}}",),
         "relay.api has keys (existingSecret or keys) but relay.api.enabled is false"),
        (("relay.api.enabled=true", "relay.api.existingSecret=a", "networkPolicy.enabled=true"),
         "needs networkPolicy.apiFrom"),
        (('json:extraEnv=[{"name": "RELAY_API_KEYS", "value": "k"}]',),
         "extraEnv sets RELAY_API_KEYS; use relay.auth"),
        ((f"json:extraEnv={_env_from_secret('RELAY_JWT_SECRET')}",),
         "extraEnv sets RELAY_JWT_SECRET"),
        (('json:extraEnv=[{"name": "RELAY_REDIS_PASSWORD", "value": "p"}]', "redis.auth.enabled=false"),
         "extraEnv sets RELAY_REDIS_PASSWORD as a plain value"),
        ((f"json:extraEnv={_env_from_secret('RELAY_REDIS_PASSWORD')}",),
         "which the chart already sets from the Redis settings"),
    ],
)  # fmt: skip
def test_inconsistent_values_fail_with_a_useful_message(sets: tuple[str, ...], message: str) -> None:
    with pytest.raises(RenderError, match=re.escape(message)):
        render(sets=sets)


def test_grace_period_follows_the_drain_settings_when_not_set() -> None:
    manifests = render(sets=("relay.drainDelay=7", "json:relay.drainWindow=30.5", "relay.closeTimeout=4"))
    pod = one(manifests, "Deployment", "relay")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == math.ceil(7 + 30.5 + 4 * 1.25 + 1) + 15


# Security: tokens, origins, API keys, and who may reach the publish API.


def test_secret_settings_are_the_ones_the_chart_guards() -> None:
    assert {"RELAY_JWT_SECRET", "RELAY_API_KEYS", "RELAY_REDIS_PASSWORD"} == SECRET_SETTINGS


def _literal_secrets(source: dict[str, Any]) -> list[str]:
    """Secret values written in a values file: they may sit in a Secret's data, nowhere else."""
    relay = source.get("relay") or {}
    found = list((relay.get("api") or {}).get("keys") or [])
    found.append((source.get("externalRedis") or {}).get("password") or "")
    found.append(((source.get("redis") or {}).get("auth") or {}).get("password") or "")
    return [s for s in found if s]


@pytest.mark.parametrize("values", CI_VALUES, ids=VALUES_IDS)
def test_secrets_reach_the_pods_only_through_secret_key_refs(values: Path) -> None:
    manifests = render(values)
    for config in of_kind(manifests, "ConfigMap"):
        leaked = SECRET_SETTINGS & set(config.get("data") or {})
        assert not leaked, f"ConfigMap {config['metadata']['name']} holds {leaked}"
    for name, spec in pod_specs(manifests):
        for container in spec["containers"]:
            assert all("secretRef" not in source for source in container.get("envFrom", [])), name
            for env in container.get("env", []):
                if env["name"] in SECRET_SETTINGS:
                    assert "value" not in env, f"{name}: {env['name']} is a literal value"
                    assert list(env["valueFrom"]) == ["secretKeyRef"], f"{name}: {env['name']}"
    outside_secrets = yaml.safe_dump([m for m in manifests if m["kind"] != "Secret"])
    for literal in _literal_secrets(yaml.safe_load(values.read_text()) or {}):
        assert literal not in outside_secrets, "a secret from the values file is outside a Secret"


def test_inline_api_keys_become_a_chart_secret_the_pods_reference() -> None:
    manifests = render(SECURITY_VALUES)
    keys = yaml.safe_load(SECURITY_VALUES.read_text())["relay"]["api"]["keys"]
    secret = next(s for s in of_kind(manifests, "Secret") if s["metadata"]["name"] == "relay-api")
    [env] = [e for e in relay_container(manifests)["env"] if e["name"] == "RELAY_API_KEYS"]
    ref = env["valueFrom"]["secretKeyRef"]
    assert ref["name"] == "relay-api"
    assert base64.b64decode(secret["data"][ref["key"]]).decode() == ",".join(keys)
    annotations = one(manifests, "Deployment", "relay")["spec"]["template"]["metadata"]["annotations"]
    assert "checksum/api-keys" in annotations, "a changed key must roll the pods (env is read at start)"


def test_api_keys_from_an_existing_secret() -> None:
    manifests = render(CHART / "ci" / "production-values.yaml")
    [env] = [e for e in relay_container(manifests)["env"] if e["name"] == "RELAY_API_KEYS"]
    assert env["valueFrom"]["secretKeyRef"] == {"name": "relay-api", "key": "api-keys"}
    assert not of_kind(manifests, "Secret")


def test_no_api_keys_and_no_auth_by_default() -> None:
    manifests = render()
    names = set(relay_config(manifests)) | {e["name"] for e in relay_container(manifests)["env"]}
    assert not {n for n in names if n.startswith(("RELAY_JWT_", "RELAY_API_", "RELAY_ALLOWED_"))}
    assert [
        v["name"] for v in one(manifests, "Deployment", "relay")["spec"]["template"]["spec"]["volumes"]
    ] == ["tmp"]


def _mounted_key_file(manifests: list[Manifest], path: str) -> tuple[dict[str, Any], str | None]:
    """The volume that holds `path` in the relay container, and the file's text when the chart renders it."""
    container = relay_container(manifests)
    pod = one(manifests, "Deployment", "relay")["spec"]["template"]["spec"]
    directory, file_name = path.rsplit("/", 1)
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == directory]
    assert mount.get("readOnly") is True, f"{directory} must be mounted read-only"
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    source = volume.get("configMap") or volume.get("secret")
    assert source is not None, f"{path} must come from a ConfigMap or a Secret"
    assert source.get("defaultMode", 0o644) & 0o222 == 0, "key files are not writable"
    items = {i["path"]: i["key"] for i in source.get("items", [])}
    if items:
        assert file_name in items, f"{path}: no item of volume {volume['name']} is {file_name}"
    key = items.get(file_name, file_name)
    if "configMap" in volume:
        rendered = [m for m in of_kind(manifests, "ConfigMap") if m["metadata"]["name"] == source["name"]]
        if rendered:
            assert key in rendered[0]["data"], f"ConfigMap {source['name']} has no {key}"
            text: str = rendered[0]["data"][key]
            return volume, text
    return volume, None


AUTH_RENDERS: dict[str, tuple[tuple[Path, ...], tuple[str, ...]]] = {
    "security-values": ((SECURITY_VALUES,), ()),
    "production-values": ((CHART / "ci" / "production-values.yaml",), ()),
    "keysfrom-secret": ((CHART / "ci" / "auth-keysfrom-secret-values.yaml",), ()),
    "inline-public-key": ((), ("relay.auth.enabled=true", f"json:relay.auth.publicKey={PEM_JSON}")),
    "jwks-as-yaml-object": ((), ("relay.auth.enabled=true", f"json:relay.auth.jwks={JWKS_JSON}")),
    "keysfrom-configmap-pem": (
        (),
        ("relay.auth.enabled=true", "relay.auth.keysFrom.configMap=idp",
         "relay.auth.keysFrom.publicKeyKey=rs.pem"),
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", AUTH_RENDERS)
def test_key_files_are_mounted_read_only_where_the_settings_point(case: str) -> None:
    values, sets = AUTH_RENDERS[case]
    manifests = render(*values, sets=sets)
    config = relay_config(manifests)
    files = {k: v for k, v in config.items() if k in ("RELAY_JWT_JWKS_FILE", "RELAY_JWT_PUBLIC_KEY_FILE")}
    assert len(files) == 1, f"exactly one key file, got {files}"
    for setting, path in files.items():
        _, text = _mounted_key_file(manifests, path)
        if text is None:
            continue  # the user's ConfigMap or Secret
        if setting == "RELAY_JWT_JWKS_FILE":
            assert json.loads(text)["keys"], "the mounted JWKS has no keys"
        else:
            assert text.startswith("-----BEGIN PUBLIC KEY-----")
    annotations = one(manifests, "Deployment", "relay")["spec"]["template"]["metadata"]["annotations"]
    inline = any(m["metadata"]["name"] == "relay-auth" for m in of_kind(manifests, "ConfigMap"))
    assert ("checksum/auth" in annotations) == inline, "an inline key change must roll the pods"


def _service_settings(manifests: list[Manifest], root: Path) -> Settings:
    """The Settings a relay pod would build from this render: ConfigMap, secretKeyRefs and mounted files.

    Files of volumes the chart renders are written under `root`, and the paths in the settings moved
    there; Secret values are stand-ins (HS256_SECRET, API_KEY).
    """
    env = dict(relay_config(manifests))
    for name in ("RELAY_JWT_JWKS_FILE", "RELAY_JWT_PUBLIC_KEY_FILE"):
        if name in env:
            _, text = _mounted_key_file(manifests, env[name])
            assert text is not None, f"{name}: not rendered by the chart"
            local = root / env[name].lstrip("/")
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_text(text)
            env[name] = str(local)
    stand_ins = {"RELAY_JWT_SECRET": HS256_SECRET, "RELAY_API_KEYS": API_KEY, "RELAY_REDIS_PASSWORD": "p"}
    for item in relay_container(manifests)["env"]:
        if "secretKeyRef" in item.get("valueFrom", {}):
            env[item["name"]] = stand_ins[item["name"]]
    return Settings.from_env(env)


@pytest.mark.parametrize("values", CI_VALUES, ids=VALUES_IDS)
def test_every_values_file_gives_settings_the_service_accepts(values: Path) -> None:
    manifests = render(values)
    env = dict(relay_config(manifests))
    env |= {
        e["name"]: "stand-in"
        for e in relay_container(manifests)["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    Settings.from_env(env)  # raises SettingsError naming the variable


def test_the_security_example_starts_a_working_authenticator(tmp_path: Path) -> None:
    settings = _service_settings(render(SECURITY_VALUES), tmp_path)
    source = yaml.safe_load(SECURITY_VALUES.read_text())["relay"]
    assert settings.auth_enabled and settings.jwt_jwks_file.startswith(str(tmp_path))
    assert settings.allowed_origins == ",".join(source["allowedOrigins"])
    assert settings.user_max_connections == source["limits"]["userMaxConnections"]
    authenticator = Authenticator(settings)  # loads the mounted JWKS; raises if it is unusable
    claims = {"sub": "u1", "aud": "relay", "iss": "https://id.example.com", "exp": int(time.time()) + 60}
    assert authenticator.authenticate(jwt.encode(claims, HS256_SECRET, algorithm="HS256")).sub == "u1"
    with pytest.raises(AuthError):
        authenticator.authenticate(jwt.encode({**claims, "aud": "other"}, HS256_SECRET, algorithm="HS256"))


@pytest.mark.parametrize(
    "sets",
    [
        ("relay.auth.enabled=true", f"json:relay.auth.jwks={JWKS_JSON}"),
        ("relay.auth.enabled=true", f"json:relay.auth.publicKey={PEM_JSON}", "relay.auth.algorithms={ES256}"),
    ],
    ids=["jwks", "public-key"],
)
def test_tokens_signed_by_the_idp_verify_with_the_rendered_keys(
    sets: tuple[str, ...], tmp_path: Path
) -> None:
    sets += ("relay.auth.audience=relay", "relay.auth.requiredClaims={exp,sub}")
    authenticator = Authenticator(_service_settings(render(sets=sets), tmp_path))
    claims = {"sub": "user-42", "aud": "relay", "exp": int(time.time()) + 60, "groups": ["chat"]}
    token = jwt.encode(claims, SIGNING_KEY, algorithm="ES256", headers={"kid": "k1"})
    identity = authenticator.authenticate(token)
    assert identity.sub == "user-42" and identity.may_join("chat") and not identity.may_join("admin")
    without_sub = {k: v for k, v in claims.items() if k != "sub"}
    with pytest.raises(AuthError):
        authenticator.authenticate(
            jwt.encode(without_sub, SIGNING_KEY, algorithm="ES256", headers={"kid": "k1"})
        )


def _internal_port_sources(manifests: list[Manifest]) -> list[list[dict[str, Any]]]:
    policy = next(m for m in of_kind(manifests, "NetworkPolicy") if m["metadata"]["name"] == "relay")
    rules = [r for r in policy["spec"]["ingress"] if any(p["port"] == "internal" for p in r["ports"])]
    assert all(len(r["ports"]) == 1 for r in rules), "the internal port shares a rule with another port"
    return [r["from"] for r in rules]


MONITORING = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
BACKENDS = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "backend"}}}]


@pytest.mark.parametrize("values", CI_VALUES, ids=VALUES_IDS)
def test_the_internal_port_opens_to_backends_only_when_the_api_is_on(values: Path) -> None:
    manifests = render(values)
    if not of_kind(manifests, "NetworkPolicy"):
        return
    source = yaml.safe_load(values.read_text()) or {}
    api = ((source.get("relay") or {}).get("api") or {}).get("enabled", False)
    metrics = source["networkPolicy"].get("metricsFrom") or MONITORING
    expected = [metrics, source["networkPolicy"]["apiFrom"]] if api else [metrics]
    assert _internal_port_sources(manifests) == expected
    assert ("RELAY_API_KEYS" in {e["name"] for e in relay_container(manifests)["env"]}) == api


def test_api_from_without_the_api_renders_no_rule() -> None:
    sets = ("networkPolicy.enabled=true", f"json:networkPolicy.apiFrom={json.dumps(BACKENDS)}")
    assert _internal_port_sources(render(sets=sets)) == [MONITORING]
    api_on = (*sets, "relay.api.enabled=true", "relay.api.existingSecret=relay-api")
    assert _internal_port_sources(render(sets=api_on)) == [MONITORING, BACKENDS]


def _notes(*values: Path) -> str:
    return notes(*values)


def test_notes_warn_when_api_keys_are_inline_and_show_the_publish_call() -> None:
    notes = _notes(SECURITY_VALUES)
    assert "WARNING: the API keys come from relay.api.keys" in notes and "relay.api.existingSecret" in notes
    assert "http://relay-publish.realtime:8001/api/publish" in notes
    assert "Tokens are required" in notes
    production = _notes(CHART / "ci" / "production-values.yaml")
    assert "relay.api.keys" not in production and "WARNING: relay.auth.enabled is false" not in production
    assert "WARNING: relay.auth.enabled is false" in _notes()


def test_helm_test_is_left_out_when_tokens_are_required_and_none_is_given() -> None:
    """With auth on, service.selftest without a token could only fail, so the chart omits it unless
    tests.tokenSecret names one, which reaches the pod through a secretKeyRef."""
    assert not of_kind(render(SECURITY_VALUES), "Pod")
    assert "helm test` is not rendered" in _notes(SECURITY_VALUES)
    with_token = render(SECURITY_VALUES, sets=("tests.tokenSecret.name=selftest-token",))
    env = one(with_token, "Pod")["spec"]["containers"][0]["env"]
    assert env == [
        {
            "name": "RELAY_SELFTEST_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": "selftest-token", "key": "token"}},
        }
    ]


def test_group_rules_reach_the_pod_as_a_file_relay_accepts() -> None:
    """relay.groupRules become a mounted JSON file that relay's own validator reads as written, and a
    change of rules rolls the pods; without rules nothing is rendered."""
    rules = '[{"match": "chat.*", "history": 200, "ttl": 600}, {"match": "dash.*", "latest": true}]'
    manifests = render(sets=(f"json:relay.groupRules={rules}",))
    path = relay_config(manifests)["RELAY_GROUP_RULES_FILE"]
    [groups] = [m for m in of_kind(manifests, "ConfigMap") if m["metadata"]["name"].endswith("-groups")]
    parsed = GroupRules.parse(json.loads(groups["data"]["groups.json"]))
    assert [(r.match, r.history, r.ttl, r.latest) for r in parsed.rules] == [
        ("chat.*", 200, 600.0, False),
        ("dash.*", 1, 300.0, True),
    ]
    container = relay_container(manifests)
    [mount] = [m for m in container["volumeMounts"] if m["name"] == "group-rules"]
    assert path == mount["mountPath"] + "/groups.json" and mount["readOnly"]
    annotations = one(manifests, "Deployment", "relay")["spec"]["template"]["metadata"]["annotations"]
    changed = render(sets=('json:relay.groupRules=[{"match": "chat.*", "history": 100}]',))
    later = one(changed, "Deployment", "relay")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["checksum/groups"] != later["checksum/groups"]
    plain = render()
    assert "RELAY_GROUP_RULES_FILE" not in relay_config(plain)
    assert not [m for m in of_kind(plain, "ConfigMap") if m["metadata"]["name"].endswith("-groups")]
    with pytest.raises(RenderError, match="history"):
        render(sets=('json:relay.groupRules=[{"match": "x", "history": -1}]',))

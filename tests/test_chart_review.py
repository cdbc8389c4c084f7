"""Issue 16: what a platform team checks before the chart goes near a cluster, on every values file.

Each test names the review item it guards: duplicate YAML keys (1), the publish API's endpoint (2), the
generated Redis password (3), NetworkPolicy ports (4), the PDB (6), names and credentials (8), the
conventions users look for (9) and the in-chart Redis as a single point of failure (10). The alerts
(5) are in tests/test_alerts.py, the dashboard (7) in tests/test_dashboard.py.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.charts import (
    CHART,
    CI_VALUES,
    ROOT,
    Manifest,
    RenderError,
    notes,
    of_kind,
    one,
    relay_config,
    render,
    render_text,
    strict_load_all,
)

pytestmark = pytest.mark.xdist_group("helm")
VALUES_IDS = [p.stem for p in CI_VALUES]
BACKENDS = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "backend"}}}]


def source(values: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(values.read_text()) or {}
    return loaded


def api_enabled(values: Path) -> bool:
    return bool(((source(values).get("relay") or {}).get("api") or {}).get("enabled"))


def pod_templates(manifests: list[Manifest]) -> list[tuple[str, dict[str, Any]]]:
    """(name, pod template {metadata, spec}) of every Deployment, and the test Pod as one."""
    found = [(m["metadata"]["name"], m["spec"]["template"]) for m in of_kind(manifests, "Deployment")]
    found += [(m["metadata"]["name"], m) for m in of_kind(manifests, "Pod")]
    return found


# 1. Duplicate keys


def test_the_strict_loader_refuses_a_duplicate_key() -> None:
    with pytest.raises(yaml.constructor.ConstructorError, match="already defined"):
        strict_load_all("a: 1\nb:\n  c: 1\n  c: 2\n")


@pytest.mark.parametrize("values", CI_VALUES, ids=VALUES_IDS)
def test_every_render_parses_without_duplicate_keys(values: Path) -> None:
    strict_load_all(render_text((str(values),)))


def test_labels_the_user_repeats_are_not_emitted_twice() -> None:
    """alertLabels.severity, commonLabels and podLabels that name a label the chart sets itself."""
    text = render_text(
        (str(CHART / "ci" / "monitoring-values.yaml"),),
        (
            "metrics.prometheusRule.alertLabels.severity=page",
            "commonLabels.app\\.kubernetes\\.io/part-of=realtime",
            "podLabels.app\\.kubernetes\\.io/part-of=realtime",
        ),
    )
    manifests = [m for m in strict_load_all(text) if m]
    [rule] = of_kind(manifests, "PrometheusRule")
    assert {r["labels"]["severity"] for g in rule["spec"]["groups"] for r in g["rules"]} == {"page"}
    for manifest in manifests:
        assert manifest["metadata"]["labels"]["app.kubernetes.io/part-of"] == "realtime"


# 2. The publish API reaches ready pods only

API_VALUES = [p for p in CI_VALUES if api_enabled(p)]


@pytest.mark.parametrize("values", API_VALUES, ids=[p.stem for p in API_VALUES])
def test_backends_publish_through_a_service_of_ready_pods_only(values: Path) -> None:
    manifests = render(values)
    found = re.search(r"http://([a-z0-9-]+)\.realtime:(\d+)/api/publish", notes(values))
    assert found, "NOTES print no publish endpoint"
    [service] = [s for s in of_kind(manifests, "Service") if s["metadata"]["name"] == found[1]]
    assert not service["spec"].get("publishNotReadyAddresses"), "the publish endpoint includes unready pods"
    [port] = [p for p in service["spec"]["ports"] if p["port"] == int(found[2])]
    assert port["targetPort"] == "internal"
    relay = one(manifests, "Deployment", "relay")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= relay.items()
    docs = (ROOT / "docs" / "deploy.md").read_text()
    assert f"http://{found[1]}.realtime:{found[2]}/api/publish" in docs
    # metrics still come from every pod, ready or not
    internal = one(manifests, "Service", "relay-internal")
    assert internal["spec"]["publishNotReadyAddresses"] is True


def test_no_api_service_without_the_api() -> None:
    assert not [s for s in of_kind(render(), "Service") if s["metadata"]["name"].endswith("-publish")]


# 3. The generated Redis password: one value per render, used by every include


def _password_and_checksums(manifests: list[Manifest]) -> tuple[str, set[str]]:
    [secret] = [s for s in of_kind(manifests, "Secret") if s["metadata"]["name"] == "relay-redis"]
    password = base64.b64decode(secret["data"]["redis-password"]).decode()
    checksums = {
        template["metadata"]["annotations"]["checksum/secret"] for _, template in pod_templates(manifests)
        if "checksum/secret" in (template["metadata"].get("annotations") or {})
    }  # fmt: skip
    return password, checksums


def test_a_generated_password_is_drawn_once_per_render() -> None:
    password, checksums = _password_and_checksums(render())
    assert len(password) >= 32
    assert checksums == {hashlib.sha256(password.encode()).hexdigest()}, (
        "the relay and Redis pods must see the same password the Secret holds"
    )


def test_a_given_password_renders_the_same_twice() -> None:
    """What GitOps tools (no `lookup`) need: redis.auth.password or existingSecret give stable output."""
    for sets in (
        ("redis.auth.password=a-password-of-the-users-choice",),
        ("redis.auth.existingSecret=mine",),
    ):
        first = render_text((), sets)
        render_text.cache_clear()
        assert first == render_text((), sets)


def test_the_generated_password_is_kept_through_lookup_and_the_docs_say_so() -> None:
    template = (CHART / "templates" / "_helpers.tpl").read_text()
    assert 'lookup "v1" "Secret" .Release.Namespace' in template
    docs = (ROOT / "docs" / "deploy.md").read_text()
    assert "lookup" in docs and "redis.auth.existingSecret" in docs and "Argo CD" in docs


# 4. NetworkPolicy ports follow the Redis settings


def _redis_ports(url: str) -> set[int]:
    scheme = url.split("://", 1)[0]
    netloc = urlsplit(url).netloc
    ports = {int(h.rsplit(":", 1)[1]) if ":" in h else 6379 for h in netloc.split(",")}
    if scheme == "redis+sentinel":
        ports.add(6379)  # the master Sentinel names
    return ports


def _egress_ports(manifests: list[Manifest]) -> set[int]:
    policy = next(m for m in of_kind(manifests, "NetworkPolicy") if m["metadata"]["name"] == "relay")
    return {p["port"] for rule in policy["spec"]["egress"] for p in rule.get("ports", [])}


@pytest.mark.parametrize("values", CI_VALUES, ids=VALUES_IDS)
def test_networkpolicy_lets_relay_reach_its_redis(values: Path) -> None:
    sets = ("networkPolicy.enabled=true", f"json:networkPolicy.apiFrom={json.dumps(BACKENDS)}")
    manifests = render(values, sets=sets)
    url = relay_config(manifests)["RELAY_BROKER_URL"]
    assert _redis_ports(url) <= _egress_ports(manifests), url


def test_the_docs_cluster_example_is_allowed() -> None:
    sets = (
        "networkPolicy.enabled=true", "redis.enabled=false", "externalRedis.enabled=true",
        "externalRedis.cluster.enabled=true", "externalRedis.cluster.nodes={h1:7000,h2:7001}",
    )  # fmt: skip
    assert {7000, 7001} <= _egress_ports(render(sets=sets))
    url = (
        "externalRedis.url=redis://redis.shared:6390/0",
        "redis.enabled=false",
        "externalRedis.enabled=true",
    )
    assert 6390 in _egress_ports(render(sets=("networkPolicy.enabled=true", *url)))


def test_networkpolicy_escape_hatches() -> None:
    metrics_from = [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": name}}}
        for name in ("monitoring", "observability")
    ]
    extra_ingress = [{"ports": [{"port": 9000, "protocol": "TCP"}], "from": BACKENDS}]
    extra_egress = [{"ports": [{"port": 4317, "protocol": "TCP"}]}]
    manifests = render(
        sets=(
            "networkPolicy.enabled=true",
            f"json:networkPolicy.metricsFrom={json.dumps(metrics_from)}",
            f"json:networkPolicy.extraIngress={json.dumps(extra_ingress)}",
            f"json:networkPolicy.extraEgress={json.dumps(extra_egress)}",
        )
    )
    policy = next(m for m in of_kind(manifests, "NetworkPolicy") if m["metadata"]["name"] == "relay")
    internal = [r for r in policy["spec"]["ingress"] if r["ports"][0]["port"] == "internal"]
    assert [r["from"] for r in internal] == [metrics_from]
    assert extra_ingress[0] in policy["spec"]["ingress"]
    assert extra_egress[0] in policy["spec"]["egress"]


# 6. PodDisruptionBudget


@pytest.mark.parametrize("values", CI_VALUES, ids=VALUES_IDS)
def test_the_pdb_never_blocks_a_drain_on_unready_pods(values: Path) -> None:
    for pdb in of_kind(render(values), "PodDisruptionBudget"):
        assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert "unhealthyPodEvictionPolicy" in (ROOT / "docs" / "deploy.md").read_text()


# 8. Rendering edge cases

LONG_RELEASE = "a-release-name-as-long-as-helm-allows-it-to-be-xyz053"  # 53 characters, Helm's maximum


@pytest.mark.parametrize("values", CI_VALUES, ids=VALUES_IDS)
@pytest.mark.parametrize(
    "sets", [(), ("fullnameOverride=" + "r" * 63,)], ids=["long-release", "long-fullname"]
)
def test_names_fit_in_63_characters_and_stay_distinct(values: Path, sets: tuple[str, ...]) -> None:
    assert len(LONG_RELEASE) == 53
    manifests = render(values, sets=sets, release=LONG_RELEASE)
    names: dict[str, set[str]] = {}
    for manifest in manifests:
        name = manifest["metadata"]["name"]
        assert len(name) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name), name
        assert name not in names.setdefault(manifest["kind"], set()), f"two {manifest['kind']}s named {name}"
        names[manifest["kind"]].add(name)
        for label in (manifest["metadata"].get("labels") or {}).values():
            assert len(str(label)) <= 63, label


@pytest.mark.parametrize(
    ("sets", "where"),
    [
        (("externalRedis.url=redis://:hunter2hunter2@redis:6379/0",), "/externalRedis/url"),
        (("externalRedis.url=rediss://relay:hunter2hunter2@redis:6380/0",), "/externalRedis/url"),
        (("externalRedis.sentinel.hosts={relay:hunter2@sentinel:26379}",), "/externalRedis/sentinel/hosts/0"),
        (
            ("relay.channelsPubsubUrls=redis://:hunter2hunter2@django-redis:6379",),
            "/relay/channelsPubsubUrls",
        ),
    ],
    ids=["url-password", "url-user-password", "sentinel-host", "channels-url"],
)
def test_the_schema_refuses_credentials_in_urls(sets: tuple[str, ...], where: str) -> None:
    with pytest.raises(RenderError, match=re.escape(where)):
        render(sets=("redis.enabled=false", "externalRedis.enabled=true", "externalRedis.host=h", *sets))


@pytest.mark.parametrize("values", CI_VALUES, ids=VALUES_IDS)
def test_no_credentials_in_configmaps_or_notes(values: Path) -> None:
    manifests = render(values)
    text = notes(values) + yaml.safe_dump(of_kind(manifests, "ConfigMap"))
    assert not re.search(r"://[^/\s\"',]*@", text), "a URL with credentials"
    data = source(values)
    literals = [
        (data.get("externalRedis") or {}).get("password"),
        ((data.get("redis") or {}).get("auth") or {}).get("password"),
        *(((data.get("relay") or {}).get("api") or {}).get("keys") or []),
    ]
    for literal in filter(None, literals):
        assert literal not in text


def test_the_image_comment_names_the_relay_image() -> None:
    lines = (CHART / "values.yaml").read_text().splitlines()
    index = lines.index("image:")
    comments = []
    for line in reversed(lines[:index]):
        if not line.startswith("#") or line.startswith("####"):
            break
        comments.append(line)
    assert comments and "relay image" in " ".join(comments) and "Redis" not in " ".join(comments)


HPA_CONNECTIONS = [p for p in CI_VALUES if "connections" in json.dumps(source(p).get("autoscaling") or {})]


@pytest.mark.parametrize("values", HPA_CONNECTIONS, ids=[p.stem for p in HPA_CONNECTIONS])
def test_notes_say_the_connections_metric_needs_an_adapter(values: Path) -> None:
    text = " ".join(notes(values).split())
    assert "prometheus-adapter" in text and "scale down" in text
    assert "prometheus-adapter" not in notes(CHART / "ci" / "hpa-cpu-values.yaml")


# 9. Conventions


def test_chart_yaml_has_home_sources_maintainers_and_artifacthub_annotations() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["home"].startswith("https://") and chart["sources"]
    assert all(m.get("name") for m in chart["maintainers"])
    annotations = chart["annotations"]
    for key in ("artifacthub.io/license", "artifacthub.io/links", "artifacthub.io/images"):
        assert key in annotations, key
    images = yaml.safe_load(annotations["artifacthub.io/images"])
    redis = yaml.safe_load((CHART / "values.yaml").read_text())["redis"]["image"]
    assert {"name": "redis", "image": f"{redis['repository']}:{redis['tag']}"} in images


def test_common_labels_reach_every_object_and_every_pod() -> None:
    manifests = render(CHART / "ci" / "everything-on-values.yaml", sets=("commonLabels.team=realtime",))
    for manifest in manifests:
        assert manifest["metadata"]["labels"]["team"] == "realtime", manifest["metadata"]["name"]
    for name, template in pod_templates(manifests):
        assert template["metadata"]["labels"]["team"] == "realtime", name
    for deployment in of_kind(manifests, "Deployment"):
        assert "team" not in deployment["spec"]["selector"]["matchLabels"]  # selectors are immutable


def test_extra_volumes_and_mounts() -> None:
    volume = {"name": "certs", "configMap": {"name": "corp-ca"}}
    mount = {"name": "certs", "mountPath": "/etc/ssl/corp", "readOnly": True}
    manifests = render(
        sets=(f"json:extraVolumes={json.dumps([volume])}", f"json:extraVolumeMounts={json.dumps([mount])}")
    )
    pod = one(manifests, "Deployment", "relay")["spec"]["template"]["spec"]
    assert volume in pod["volumes"] and mount in pod["containers"][0]["volumeMounts"]


def test_pull_secrets_and_global_registry_reach_every_image() -> None:
    manifests = render(
        CHART / "ci" / "everything-on-values.yaml", sets=("global.imageRegistry=mirror.corp.example",)
    )
    for name, template in pod_templates(manifests):
        spec = template["spec"]
        assert spec.get("imagePullSecrets") == [{"name": "regcred"}], name
        for container in spec["containers"]:
            assert container["image"].startswith("mirror.corp.example/"), container["image"]
    redis = one(manifests, "Deployment", "redis")["spec"]["template"]["spec"]["containers"][0]
    assert redis["image"] == "mirror.corp.example/library/redis:7.4.2"


@pytest.mark.parametrize(
    ("values", "sets", "console"),
    [
        ("default-values", (), "true"),
        ("ingress-values", (), "false"),
        ("httproute-values", (), "false"),
        ("ingress-values", ("relay.console=true",), "true"),
        ("default-values", ("relay.console=false",), "false"),
    ],
)
def test_the_console_is_off_behind_an_ingress_unless_asked_for(
    values: str, sets: tuple[str, ...], console: str
) -> None:
    config = relay_config(render(CHART / "ci" / f"{values}.yaml", sets=sets))
    assert config["RELAY_CONSOLE"] == console


def test_an_install_without_an_image_fails_early_and_the_readme_says_how_to_build_one() -> None:
    with pytest.raises(RenderError, match=r"image\.repository"):
        render_text((), (), "relay", False)
    readme = (CHART / "README.md").read_text()
    assert "docker build" in readme and "docker push" in readme and "image.repository" in readme


# 10. The in-chart Redis is a single point of failure


def test_notes_and_docs_call_the_in_chart_redis_a_single_point_of_failure() -> None:
    assert "single point of failure" in " ".join(notes().split())
    assert "Sentinel" in notes()
    assert "single point of failure" not in notes(CHART / "ci" / "sentinel-values.yaml")
    for doc in (ROOT / "docs" / "deploy.md", CHART / "README.md", CHART / "values.yaml"):
        assert "single point of failure" in " ".join(doc.read_text().split()), doc

"""The Helm chart and the plain manifests, checked offline.

The chart is linted and rendered with the real Helm v4 SDK (``helm-python-sdk``) for several value sets;
the rendered objects are checked for what each value set promises (RBAC only for EndpointSlice
discovery, the Redis URL from a Secret, the restricted security context, probes…), every rendered
object is validated against the Kubernetes OpenAPI schemas (``kubernetes-validate``, strict: unknown
fields are errors), and the router's config file the chart writes is loaded by the router's own
settings code. ServiceMonitor and PrometheusRule are CRDs that kubernetes-validate has no schema for:
they are skipped there and checked field by field instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from router.config import HealthSettings, RouterSettings, TimeoutSettings, load_settings

helm = pytest.importorskip("helm_python", reason="needs helm-python-sdk (the test extra)")
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="needs kubernetes-validate (the test extra)")

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "fleetroute"
DEPLOY = ROOT / "deploy"
RELEASE = "fr"
NAMESPACE = "llm"
FULLNAME = "fr-fleetroute"
KUBE_VERSION = "1.30"
#: Custom resources: kubernetes-validate only knows the built-in API, so these are checked by the tests
#: below (test_monitoring_objects) rather than against an OpenAPI schema.
CRD_KINDS = frozenset({"ServiceMonitor", "PrometheusRule"})
#: Router settings the chart sets itself from other values (listen addresses, discovery, secrets).
CHART_MANAGED_SETTINGS = frozenset(
    {
        "host",
        "port",
        "admin_host",
        "admin_port",
        "admin_token",
        "replicas",
        "dns_service",
        "dns_port",
        "dns_interval_s",
        "k8s_service",
        "k8s_namespace",
        "k8s_port_name",
        "redis_url",
    }
)

STATIC = {"discovery": {"mode": "static", "static": {"replicas": ["http://vllm-0.vllm.llm.svc:8000"]}}}
SCENARIOS: dict[str, dict[str, Any]] = {
    "gateway": STATIC,
    "gateway-dns-autoscaling": {
        "discovery": {"mode": "dns", "dns": {"service": "vllm.llm.svc.cluster.local", "port": 8000}},
        "autoscaling": {"enabled": True, "targetMemoryUtilizationPercentage": 80},
        "podDisruptionBudget": {"minAvailable": 1},
        "admin": {"expose": True, "tokenSecret": {"name": "fleetroute-admin"}},
    },
    "sidecar": {**STATIC, "mode": "sidecar"},
    "sidecar-native": {**STATIC, "mode": "sidecar", "sidecar": {"native": True}},
    "redis-bundled": {**STATIC, "redis": {"enabled": True}},
    "redis-bundled-persistent": {**STATIC, "redis": {"enabled": True, "persistence": {"enabled": True}}},
    "redis-external-url": {**STATIC, "redis": {"external": {"url": "rediss://:s3cret@redis.example:6380/0"}}},
    "redis-existing-secret": {
        **STATIC,
        "redis": {"external": {"existingSecret": "shared-redis", "existingSecretKey": "url"}},
    },
    "kubernetes-discovery": {
        "discovery": {
            "mode": "kubernetes",
            "kubernetes": {"service": "vllm", "namespace": "models", "portName": "http"},
        }
    },
    "monitoring": {
        **STATIC,
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "prometheusRule": {"enabled": True},
        "dashboards": {"enabled": True, "annotations": {"grafana_folder": "LLM"}},
    },
    "policy-config": {
        **STATIC,
        "config": {
            "policy": "least_tokens",
            "policy_params": {"weight": 2},
            "engine_schedulers": {"default": "priority", "*": "fcfs"},
            "health": {"interval_s": 0.5},
            "timeouts": {"first_byte_s": 30.0},
            "scrape_interval_s": 0.5,
        },
    },
}


# ---------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def chart() -> Iterator[Any]:
    with helm.Chart.load(CHART) as c:
        yield c


class Rendered:
    """The objects one render produced, and its NOTES.txt."""

    def __init__(self, manifests: dict[str, str]) -> None:
        self.notes = ""
        self.objects: list[dict[str, Any]] = []
        for path, text in sorted(manifests.items()):
            if path.endswith("NOTES.txt"):
                self.notes = text
                continue
            self.objects.extend(doc for doc in yaml.safe_load_all(text) if doc)

    def kinds(self) -> set[str]:
        return {o["kind"] for o in self.objects}

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [o for o in self.all(kind) if name is None or o["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
        return found[0]

    def config(self) -> dict[str, Any]:
        data: dict[str, Any] = yaml.safe_load(self.one("ConfigMap", f"{FULLNAME}-config")["data"]["config.yaml"])
        return data

    def router_container(self) -> dict[str, Any]:
        containers = self.one("Deployment")["spec"]["template"]["spec"]["containers"]
        assert [c["name"] for c in containers] == ["fleetroute"]
        container: dict[str, Any] = containers[0]
        return container


def render(chart: Any, values: dict[str, Any]) -> Rendered:
    return Rendered(chart.render(values, name=RELEASE, namespace=NAMESPACE))


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def validate_k8s(obj: dict[str, Any], where: str) -> None:
    try:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{where}: {obj['kind']}/{obj['metadata'].get('name')} is invalid at {path}: {exc.message}")


def validate_all(objects: list[dict[str, Any]], where: str) -> set[str]:
    """Validates every built-in object; returns the kinds it skipped (CRDs)."""
    skipped: set[str] = set()
    for obj in objects:
        if obj["kind"] in CRD_KINDS:
            skipped.add(obj["kind"])
            continue
        validate_k8s(obj, where)
    return skipped


def assert_restricted(container: dict[str, Any], pod_security: dict[str, Any] | None) -> None:
    """The restricted Pod Security Standard, at container level (and pod level if given)."""
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["runAsNonRoot"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert "add" not in sc["capabilities"]
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    if pod_security is not None:
        assert pod_security["runAsNonRoot"] is True
        assert pod_security["seccompProfile"]["type"] == "RuntimeDefault"


def leaf_paths(value: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(value, dict) and value:
        for key, sub in value.items():
            yield from leaf_paths(sub, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix


def load_router_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: dict[str, Any]) -> RouterSettings:
    """The router's own settings loader, on the config file as the chart wrote it."""
    for name in list(os.environ):
        if name.startswith("FLEETROUTE_"):
            monkeypatch.delenv(name)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return load_settings(None, path)


# ------------------------------------------------------------------------------------ lint and schemas
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_lint_is_clean(scenario: str) -> None:
    report = helm.lint(CHART, SCENARIOS[scenario], strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


def test_lint_with_default_values() -> None:
    report = helm.lint(CHART, None, strict=True)
    assert report["errors"] == [], report


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_rendered_objects_match_the_kubernetes_schemas(chart: Any, scenario: str) -> None:
    rendered = render(chart, SCENARIOS[scenario])
    skipped = validate_all(rendered.objects, scenario)
    assert skipped <= CRD_KINDS
    if scenario == "monitoring":
        assert skipped == CRD_KINDS  # present, and checked by test_monitoring_objects


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"replicaCont": 3}, "replicaCont"),
        ({"config": {"polcy": "least_tokens"}}, "polcy"),
        ({"config": {"health": {"interval": 2}}}, "interval"),
        ({"redis": {"externl": {"url": "redis://r:6379"}}}, "externl"),
        ({"discovery": {"mode": "consul"}}, "/discovery/mode"),
        ({"discovery": {"mode": "dns"}}, "service"),
        ({"mode": "daemonset"}, "/mode"),
        ({"config": {"max_attempts": 0}}, "max_attempts"),
        ({"redis": {"external": {"url": "http://not-redis"}}}, "url"),
    ],
)
def test_schema_rejects_bad_values(chart: Any, values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=message):
        chart.validate_schema(values)
    with pytest.raises(helm.HelmValuesError):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    assert helm.lint(CHART, values)["errors"], "lint must report the schema error too"


def test_schema_accepts_every_scenario(chart: Any) -> None:
    for values in SCENARIOS.values():
        chart.validate_schema(values)


def test_schema_and_values_list_the_same_keys(chart: Any) -> None:
    schema = chart.schema
    assert schema is not None and schema["additionalProperties"] is False
    assert set(schema["properties"]) == set(chart.values) | {"global"}


def test_config_values_are_the_routers_settings_with_its_defaults(chart: Any) -> None:
    """values.config mirrors RouterSettings: same keys (less the chart-managed ones), same defaults."""
    config_schema = chart.schema["properties"]["config"]["properties"]
    fields = set(RouterSettings.model_fields)
    assert set(config_schema) <= fields, "the schema accepts keys the router does not know"
    missing = fields - set(config_schema) - CHART_MANAGED_SETTINGS
    assert not missing, f"router settings the chart cannot set: {sorted(missing)} (add them to values and schema)"
    for section, model in (("health", HealthSettings), ("timeouts", TimeoutSettings)):
        assert set(config_schema[section]["properties"]) == set(model.model_fields)
    defaults = RouterSettings.model_construct().model_dump()
    for key, value in chart.values["config"].items():
        assert value == defaults[key], f"config.{key}: chart default {value!r} != router default {defaults[key]!r}"


def test_readme_documents_every_value(chart: Any) -> None:
    readme = (CHART / "README.md").read_text()
    undocumented = [p for p in leaf_paths(chart.values) if f"`{p}`" not in readme]
    assert not undocumented, f"values missing from helm/fleetroute/README.md: {undocumented}"


# ----------------------------------------------------------------------------------------- the config
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_router_accepts_the_config_file(
    chart: Any, scenario: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rendered = render(chart, SCENARIOS[scenario])
    settings = load_router_config(tmp_path, monkeypatch, rendered.config())
    assert settings.host == "0.0.0.0" and settings.port == 8080
    assert settings.admin_port == 8081
    mode = SCENARIOS[scenario].get("discovery", {}).get("mode", "static")
    assert (settings.k8s_service is not None) == (mode == "kubernetes")
    assert (settings.dns_service is not None) == (mode == "dns")


def test_config_carries_policy_schedulers_health_and_timeouts(
    chart: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rendered = render(chart, SCENARIOS["policy-config"])
    settings = load_router_config(tmp_path, monkeypatch, rendered.config())
    assert settings.policy == "least_tokens"
    assert settings.policy_params == {"weight": 2}
    assert settings.engine_schedulers == {"default": "priority", "*": "fcfs"}
    assert settings.health.interval_s == 0.5 and settings.health.timeout_s == 1.0
    assert settings.timeouts.first_byte_s == 30.0
    assert settings.scrape_interval_s == 0.5
    assert settings.replicas == ["http://vllm-0.vllm.llm.svc:8000"]
    deployment = rendered.one("Deployment")
    container = rendered.router_container()
    assert container["args"] == ["serve", "--config", "/etc/fleetroute/config.yaml"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["fleetroute-config"]["mountPath"] == "/etc/fleetroute"
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["fleetroute-config"]["configMap"]["name"] == f"{FULLNAME}-config"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    default_annotations = render(chart, STATIC).one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["checksum/config"] != default_annotations["checksum/config"], "config changes roll the pods"


# ------------------------------------------------------------------------------------------- gateway
def test_gateway_objects_security_and_probes(chart: Any) -> None:
    rendered = render(chart, STATIC)
    assert rendered.kinds() == {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget"}
    deployment = rendered.one("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = rendered.router_container()
    assert_restricted(container, pod["securityContext"])
    assert pod["automountServiceAccountToken"] is False
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    assert container["resources"]["requests"]["cpu"] == "1"
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": 8080}
    assert "FLEETROUTE_REDIS_URL" not in env_of(container)
    service = rendered.one("Service")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert [(p["name"], p["targetPort"]) for p in service["spec"]["ports"]] == [("http", "http")]
    pdb = rendered.one("PodDisruptionBudget")
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]
    assert deployment["spec"]["replicas"] == 2
    assert "grafana_dashboard" not in json.dumps(rendered.objects)


def test_gateway_autoscaling_and_exposed_admin(chart: Any) -> None:
    rendered = render(chart, SCENARIOS["gateway-dns-autoscaling"])
    deployment = rendered.one("Deployment")
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    hpa = rendered.one("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": FULLNAME}
    assert {m["resource"]["name"] for m in hpa["spec"]["metrics"]} == {"cpu", "memory"}
    assert rendered.one("PodDisruptionBudget")["spec"] == {
        "minAvailable": 1,
        "selector": deployment["spec"]["selector"],
    }
    container = rendered.router_container()
    token = env_of(container)["FLEETROUTE_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert token == {"name": "fleetroute-admin", "key": "token"}
    assert {p["name"] for p in rendered.one("Service")["spec"]["ports"]} == {"http", "admin"}
    assert rendered.config()["admin_host"] == "0.0.0.0"
    assert render(chart, STATIC).config()["admin_host"] == "127.0.0.1"


def test_exposed_admin_needs_a_token(chart: Any) -> None:
    with pytest.raises(helm.HelmRenderError, match="tokenSecret"):
        render(chart, {**STATIC, "admin": {"expose": True}})


# ------------------------------------------------------------------------------------------ discovery
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_rbac_only_for_kubernetes_discovery(chart: Any, scenario: str) -> None:
    rendered = render(chart, SCENARIOS[scenario])
    kubernetes = SCENARIOS[scenario].get("discovery", {}).get("mode") == "kubernetes"
    rbac = {"Role", "RoleBinding", "ServiceAccount"} & rendered.kinds()
    assert rbac == ({"Role", "RoleBinding", "ServiceAccount"} if kubernetes else set())
    if rendered.all("Deployment"):
        pod = rendered.one("Deployment")["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is kubernetes


def test_kubernetes_discovery_rbac(chart: Any) -> None:
    rendered = render(chart, SCENARIOS["kubernetes-discovery"])
    account = rendered.one("ServiceAccount")
    role = rendered.one("Role")
    binding = rendered.one("RoleBinding")
    pod = rendered.one("Deployment")["spec"]["template"]["spec"]
    assert role["rules"] == [
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]}
    ]
    # Role and binding live in the Service's namespace; the subject is the router's account in its own.
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == "models"
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": NAMESPACE}
    ]
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert pod["automountServiceAccountToken"] is True
    config = rendered.config()
    assert (config["k8s_service"], config["k8s_namespace"], config["k8s_port_name"]) == ("vllm", "models", "http")


def test_kubernetes_discovery_with_an_existing_service_account(chart: Any) -> None:
    values = {**SCENARIOS["kubernetes-discovery"], "serviceAccount": {"create": False, "name": "llm-clients"}}
    rendered = render(chart, values)
    assert not rendered.all("ServiceAccount")
    assert rendered.one("RoleBinding")["subjects"][0]["name"] == "llm-clients"
    assert rendered.one("Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "llm-clients"
    always = render(chart, {**STATIC, "serviceAccount": {"create": True}})
    assert always.one("ServiceAccount")["automountServiceAccountToken"] is False
    assert not always.all("Role") and not always.all("RoleBinding")


def test_discovery_mode_needs_its_service(chart: Any) -> None:
    with pytest.raises(helm.HelmValuesError, match="service"):
        render(chart, {"discovery": {"mode": "kubernetes"}})


# ------------------------------------------------------------------------------------------------ redis
def test_bundled_redis(chart: Any) -> None:
    rendered = render(chart, SCENARIOS["redis-bundled"])
    statefulset = rendered.one("StatefulSet", f"{FULLNAME}-redis")
    service = rendered.one("Service", f"{FULLNAME}-redis")
    pod = statefulset["spec"]["template"]["spec"]
    assert service["spec"]["selector"] == statefulset["spec"]["selector"]["matchLabels"]
    assert service["spec"]["selector"] != rendered.one("Deployment")["spec"]["selector"]["matchLabels"]
    redis = pod["containers"][0]
    assert_restricted(redis, pod["securityContext"])
    assert "volumeClaimTemplates" not in statefulset["spec"], "no persistence by default"
    assert {"--save", "--appendonly"} <= set(redis["args"])
    url = env_of(rendered.router_container())["FLEETROUTE_REDIS_URL"]["value"]
    assert url == f"redis://{FULLNAME}-redis:6379/0"
    assert not rendered.all("Secret")
    persistent = render(chart, SCENARIOS["redis-bundled-persistent"]).one("StatefulSet")
    assert persistent["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "1Gi"


def test_external_redis_by_url_goes_through_a_secret(chart: Any) -> None:
    rendered = render(chart, SCENARIOS["redis-external-url"])
    secret = rendered.one("Secret")
    assert secret["stringData"] == {"redis-url": "rediss://:s3cret@redis.example:6380/0"}
    env = env_of(rendered.router_container())["FLEETROUTE_REDIS_URL"]
    assert env == {
        "name": "FLEETROUTE_REDIS_URL",
        "valueFrom": {"secretKeyRef": {"name": secret["metadata"]["name"], "key": "redis-url"}},
    }
    assert "s3cret" not in json.dumps(rendered.one("Deployment")), "the password stays in the Secret"
    assert "redis_url" not in rendered.config()
    assert not rendered.all("StatefulSet")


def test_external_redis_from_an_existing_secret(chart: Any) -> None:
    rendered = render(chart, SCENARIOS["redis-existing-secret"])
    assert not rendered.all("Secret") and not rendered.all("StatefulSet")
    env = env_of(rendered.router_container())["FLEETROUTE_REDIS_URL"]
    assert env["valueFrom"]["secretKeyRef"] == {"name": "shared-redis", "key": "url"}


def test_redis_bundled_and_external_conflict(chart: Any) -> None:
    with pytest.raises(helm.HelmRenderError, match="not both"):
        render(chart, {**STATIC, "redis": {"enabled": True, "external": {"url": "redis://r:6379"}}})


# ------------------------------------------------------------------------------------------- sidecar
@pytest.mark.parametrize("scenario", ["sidecar", "sidecar-native"])
def test_sidecar_snippet_makes_a_valid_pod(chart: Any, scenario: str) -> None:
    rendered = render(chart, SCENARIOS[scenario])
    assert rendered.kinds() == {"ConfigMap"}, "sidecar mode renders no workload"
    snippet = rendered.one("ConfigMap", f"{FULLNAME}-sidecar")["data"]
    containers = yaml.safe_load(snippet["container.yaml"])
    volumes = yaml.safe_load(snippet["volumes.yaml"])
    assert [c["name"] for c in containers] == ["fleetroute"]
    router = containers[0]
    assert_restricted(router, None)
    assert router["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert "livenessProbe" not in router, "the sidecar must not restart the user's pod on its own"
    assert router["args"] == ["serve", "--config", "/etc/fleetroute/config.yaml"]
    assert {v["name"] for v in volumes} == {m["name"] for m in router["volumeMounts"]}
    native = scenario == "sidecar-native"
    assert (router.get("restartPolicy") == "Always") is native
    app = {
        "name": "app",
        "image": "example/app:1",
        "env": [{"name": "OPENAI_BASE_URL", "value": "http://127.0.0.1:8080/v1"}],
    }
    pod_spec: dict[str, Any] = {"containers": [app], "volumes": volumes}
    if native:
        pod_spec["initContainers"] = containers
    else:
        pod_spec["containers"] = [app, *containers]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "app", "namespace": NAMESPACE}, "spec": pod_spec}
    validate_k8s(pod, scenario)
    # NOTES.txt prints the same snippet for copy and paste.
    assert snippet["container.yaml"].strip() in rendered.notes
    assert snippet["volumes.yaml"].strip() in rendered.notes
    assert ("initContainers" in rendered.notes) is native


PARENT_TEMPLATE = """\
{{- $ctx := dict "Values" .Values.fleetroute "Release" .Release
      "Chart" (dict "Name" "fleetroute" "AppVersion" "0.1.0") }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: app
spec:
  selector:
    matchLabels: {app: app}
  template:
    metadata:
      labels: {app: app}
    spec:
      containers:
        - name: app
          image: example/app:1
        {{- include "fleetroute.sidecarContainer" $ctx | nindent 8 }}
      volumes:
        {{- include "fleetroute.sidecarVolumes" $ctx | nindent 8 }}
"""


def test_sidecar_named_templates_from_a_parent_chart(tmp_path: Path) -> None:
    """A chart that depends on this one adds the router to its own pod with the named templates."""
    parent = tmp_path / "app"
    shutil.copytree(CHART, parent / "charts" / "fleetroute")
    (parent / "templates").mkdir()
    (parent / "templates" / "deployment.yaml").write_text(PARENT_TEMPLATE)
    (parent / "Chart.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v2",
                "name": "app",
                "version": "1.0.0",
                "dependencies": [{"name": "fleetroute", "version": "0.1.0"}],
            }
        )
    )
    values = {"fleetroute": {"mode": "sidecar", "discovery": {"mode": "dns", "dns": {"service": "vllm-headless"}}}}
    with helm.Chart.load(parent) as app:
        rendered = Rendered(app.render(values, name=RELEASE, namespace=NAMESPACE))
    validate_all(rendered.objects, "parent chart")
    pod = rendered.one("Deployment", "app")["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["app", "fleetroute"]
    config_volume = next(v for v in pod["volumes"] if v["name"] == "fleetroute-config")
    assert rendered.one("ConfigMap", config_volume["configMap"]["name"])["data"]["config.yaml"]


# ----------------------------------------------------------------------------------------- monitoring
def test_monitoring_objects(chart: Any) -> None:
    rendered = render(chart, SCENARIOS["monitoring"])
    service = rendered.one("Service")
    monitor = rendered.one("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics" and endpoint["interval"] == "15s"

    rule = rendered.one("PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    rules_file = yaml.safe_load((CHART / "files" / "alerts" / "fleetroute-rules.yaml").read_text())
    assert rule["spec"]["groups"] == rules_file["groups"]

    dashboards = rendered.one("ConfigMap", f"{FULLNAME}-dashboards")
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboards["metadata"]["annotations"] == {"grafana_folder": "LLM"}
    on_disk = (CHART / "files" / "dashboards" / "fleetroute-overview.json").read_text()
    assert json.loads(dashboards["data"]["fleetroute-overview.json"]) == json.loads(on_disk)


def test_no_monitoring_objects_by_default(chart: Any) -> None:
    kinds = render(chart, STATIC).kinds()
    assert not kinds & CRD_KINDS


def test_servicemonitor_needs_the_gateway_service(chart: Any) -> None:
    rendered = render(chart, {**SCENARIOS["sidecar"], "serviceMonitor": {"enabled": True}})
    assert not rendered.all("ServiceMonitor")


# ---------------------------------------------------------------------------- files shared with deploy/
@pytest.mark.parametrize(
    ("canonical", "copy_"),
    [
        ("files/dashboards/fleetroute-overview.json", "dashboards/fleetroute-overview.json"),
        ("files/alerts/fleetroute-rules.yaml", "alerts/fleetroute-rules.yaml"),
    ],
)
def test_deploy_copies_equal_the_charts(canonical: str, copy_: str) -> None:
    chart_file = CHART / canonical
    assert (DEPLOY / copy_).read_bytes() == chart_file.read_bytes(), (
        f"deploy/{copy_} differs from the canonical helm/fleetroute/{canonical}: cp {chart_file} deploy/{copy_}"
    )


def test_dashboard_is_well_formed() -> None:
    dashboard = json.loads((CHART / "files" / "dashboards" / "fleetroute-overview.json").read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] == "fleetroute-overview"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "job", "replica"} <= variables
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            assert target["expr"].strip()
    taken: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in taken, f"{panel['title']!r} overlaps {taken[(x, y)]!r}"
                taken[(x, y)] = panel["title"]


# ----------------------------------------------------------------------------------- deploy/ manifests
def deploy_objects(overlay: str) -> list[tuple[str, dict[str, Any]]]:
    kustomization = yaml.safe_load((DEPLOY / overlay / "kustomization.yaml").read_text())
    listed = kustomization["resources"]
    on_disk = sorted(p.name for p in (DEPLOY / overlay).glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk, f"deploy/{overlay}/kustomization.yaml must list every manifest"
    out: list[tuple[str, dict[str, Any]]] = []
    for name in listed:
        for doc in yaml.safe_load_all((DEPLOY / overlay / name).read_text()):
            if doc:
                out.append((f"deploy/{overlay}/{name}", doc))
    return out


@pytest.mark.parametrize("overlay", ["gateway", "sidecar"])
def test_deploy_manifests_match_the_kubernetes_schemas(
    overlay: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = deploy_objects(overlay)
    assert objects
    for where, obj in objects:
        assert obj["kind"] not in CRD_KINDS
        validate_k8s(obj, where)
    configs = [o for _, o in objects if o["kind"] == "ConfigMap" and "config.yaml" in o.get("data", {})]
    assert len(configs) == 1
    load_router_config(tmp_path, monkeypatch, yaml.safe_load(configs[0]["data"]["config.yaml"]))
    for _, obj in objects:
        template = obj.get("spec", {}).get("template", {}).get("spec")
        if template is None:
            continue
        for container in template["containers"] + template.get("initContainers", []):
            if container["name"] in ("fleetroute", "redis"):
                assert_restricted(container, template["securityContext"])


def test_deploy_gateway_has_rbac_for_endpointslices() -> None:
    objects = {(o["kind"], o["metadata"]["name"]): o for _, o in deploy_objects("gateway")}
    role = objects[("Role", "fleetroute-discovery")]
    assert role["rules"][0]["resources"] == ["endpointslices"]
    deployment = objects[("Deployment", "fleetroute")]
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "fleetroute"
    assert ("ServiceAccount", "fleetroute") in objects


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs kubectl (its built-in kustomize)")
@pytest.mark.parametrize("overlay", ["gateway", "sidecar"])
def test_kustomize_builds_valid_objects(overlay: str) -> None:
    kubectl = shutil.which("kubectl")
    assert kubectl is not None
    built = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY / overlay)], capture_output=True, text=True, timeout=60, check=False
    )
    assert built.returncode == 0, built.stderr
    objects = [doc for doc in yaml.safe_load_all(built.stdout) if doc]
    assert len(objects) == len(deploy_objects(overlay))
    for obj in objects:
        assert obj["metadata"]["namespace"] == "llm"
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "fleetroute"
        validate_k8s(obj, f"kubectl kustomize deploy/{overlay}")
    images = {
        c["image"]
        for obj in objects
        for c in obj.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])
        if c["name"] == "fleetroute"
    }
    assert images == {"fleetroute:0.1.0"}

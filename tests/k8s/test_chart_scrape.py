"""The chart's scrape source (streamer.source=scrape): a Deployment with Kubernetes discovery and the
minimal RBAC it needs, or a DaemonSet scraping each node's exporter; rendered with the real Helm
engine, validated strictly against Kubernetes schemas, topology and RBAC checked."""

from __future__ import annotations

import pytest
from chart_helpers import CHART_DIR, Rendered, deep_merge, env_of, main_container, pod_spec, require, values_file

RELEASE = "tel"
NAMESPACE = "telemetry"
NAME = f"{RELEASE}-telemetry-pipeline-streamer"
EDGE_REDIS = {"externalRedis": {"host": "redis.central.example.com", "password": "pw-edge"}}

SCENARIOS = {
    "scrape-discovery-pods": (None, {"streamer": {"source": "scrape"}}),
    "scrape-discovery-endpointslices": (None, {"streamer": {"source": "scrape", "scrape": {"discovery": {
        "role": "endpointslice", "selector": "kubernetes.io/service-name=nvidia-dcgm-exporter",
        "namespace": "nvidia"}}}}),
    "scrape-daemonset": ("values-edge-cluster.yaml", {**EDGE_REDIS, "streamer": {"scrape": {
        "mode": "daemonset", "interval": "30s"}, "nodeSelector": {"nvidia.com/gpu.present": "true"}}}),
    "edge-default": ("values-edge-cluster.yaml", EDGE_REDIS),
}


@pytest.fixture(scope="module")
def helm():
    try:
        import helm_python
    except Exception as err:  # noqa: BLE001 (ImportError, or its native library failing to load)
        require(False, f"helm_python (pip install helm-python-sdk) is not importable: {err}")
    return helm_python


@pytest.fixture(scope="module")
def chart(helm):
    with helm.Chart.load(str(CHART_DIR)) as loaded:
        yield loaded


def _values(name: str) -> dict:
    file, overrides = SCENARIOS[name]
    return deep_merge(values_file(file) if file else {}, overrides)


@pytest.fixture(scope="module")
def render(chart):
    cache: dict[str, Rendered] = {}

    def _render(name: str) -> Rendered:
        if name not in cache:
            cache[name] = Rendered(chart.render(_values(name), name=RELEASE, namespace=NAMESPACE))
        return cache[name]

    return _render


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_renders_lints_and_validates_strictly(helm, render, scenario):
    import kubernetes_validate
    from kubernetes_validate import utils

    rendered = render(scenario)
    failures = []
    for version in ("1.29.0", utils.latest_version()):
        for doc in rendered.docs:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as err:
                failures.append(f"{version} {doc['kind']}/{doc['metadata']['name']}: {err.message}")
    assert not failures, "\n".join(failures)
    report = helm.lint(str(CHART_DIR), _values(scenario), namespace=NAMESPACE)
    assert not report["errors"] and not [m for m in report["messages"] if m["severity"] >= 2], report
    # the scraper replaces the CSV streamer: no StatefulSet, no CSV ConfigMap, one streamer workload
    assert not rendered.by_component("streamer", "StatefulSet")
    assert not [c for c in rendered.of_kind("ConfigMap") if c["metadata"]["name"].endswith("-input")]
    rendered.one("streamer")


def _args(w: dict) -> list[str]:
    return main_container(w)["args"]


def _flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


@pytest.mark.parametrize("scenario,resource,group,exporter_ns,selector", [
    ("scrape-discovery-pods", "pods", "", "gpu-operator", "app=nvidia-dcgm-exporter"),
    ("scrape-discovery-endpointslices", "endpointslices", "discovery.k8s.io", "nvidia",
     "kubernetes.io/service-name=nvidia-dcgm-exporter"),
    ("edge-default", "pods", "", "gpu-operator", "app=nvidia-dcgm-exporter"),
])
def test_discovery_deployment_and_minimal_rbac(render, scenario, resource, group, exporter_ns, selector):
    rendered = render(scenario)
    dep = rendered.one("streamer")
    assert dep["kind"] == "Deployment" and dep["spec"]["replicas"] == 1
    args = _args(dep)
    assert args[0] == "scrape" and "--kubernetes" in args
    assert (_flag(args, "--namespace"), _flag(args, "--selector"), _flag(args, "--port")) == \
        (exporter_ns, selector, "9400")
    assert _flag(args, "--role") == ("endpointslice" if resource == "endpointslices" else "pod")
    assert (_flag(args, "--interval"), _flag(args, "--timeout")) == ("15s", "5s")
    spec = pod_spec(dep)
    sa = spec["serviceAccountName"]
    assert sa == f"{NAME}-discovery" and spec["automountServiceAccountToken"] is True
    assert rendered.get("ServiceAccount", sa)["metadata"]["namespace"] == NAMESPACE

    # exactly one Role and RoleBinding for discovery, in the exporter's namespace; no cluster-wide RBAC
    assert not rendered.of_kind("ClusterRole", "ClusterRoleBinding")
    roles = [r for r in rendered.of_kind("Role") if r["metadata"]["name"].endswith("-discovery")]
    assert len(roles) == 1
    role = roles[0]
    assert role["metadata"]["namespace"] == exporter_ns
    assert role["rules"] == [{"apiGroups": [group], "resources": [resource], "verbs": ["get", "list", "watch"]}]
    binding = rendered.get("RoleBinding", role["metadata"]["name"])
    assert binding["metadata"]["namespace"] == exporter_ns
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}]
    # the only other Role is the helm-test's read-only one in the release's namespace
    others = [r for r in rendered.of_kind("Role") if r is not role]
    assert all(r["metadata"]["namespace"] == NAMESPACE and "deployment-check" in r["metadata"]["name"]
               for r in others)


def test_daemonset_scrapes_its_own_node_without_api_access(render):
    rendered = render("scrape-daemonset")
    ds = rendered.one("streamer")
    assert ds["kind"] == "DaemonSet"
    args = _args(ds)
    assert args[0] == "scrape" and "--kubernetes" not in args
    assert _flag(args, "--target") == "http://$(NODE_IP):9400/metrics" and _flag(args, "--interval") == "30s"
    env = env_of(main_container(ds))
    assert env["NODE_IP"] == {"name": "NODE_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "redis-password"
    spec = pod_spec(ds)
    assert spec["automountServiceAccountToken"] is False
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert not [r for r in rendered.of_kind("Role", "RoleBinding") if r["metadata"]["name"].endswith("-discovery")]
    assert not rendered.of_kind("ClusterRole", "ClusterRoleBinding")


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_scraper_pods_meet_restricted_pod_security_and_expose_metrics(render, scenario):
    rendered = render(scenario)
    w = rendered.one("streamer")
    spec = pod_spec(w)
    assert spec["securityContext"]["runAsNonRoot"] is True
    sc = main_container(w)["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["readOnlyRootFilesystem"] is True
    ports = {p["name"]: p["containerPort"] for p in main_container(w)["ports"]}
    svc = rendered.get("Service", NAME)
    assert svc["spec"]["ports"][0]["targetPort"] == "metrics" and ports["metrics"] == 9100
    assert main_container(w)["livenessProbe"]["httpGet"]["path"] == "/health"


def test_edge_values_default_to_scrape_with_discovery_and_csv_still_works(render, chart):
    edge = values_file("values-edge-cluster.yaml")
    assert edge["streamer"]["source"] == "scrape" and edge["streamer"]["scrape"]["mode"] == "discovery"
    csv = Rendered(chart.render(deep_merge(edge, {**EDGE_REDIS, "streamer": {"source": "csv"}}), name=RELEASE,
                                namespace=NAMESPACE))
    assert csv.one("streamer")["kind"] == "StatefulSet" and _args(csv.one("streamer"))[0] == "stream"
    assert not csv.of_kind("Role") or all("deployment-check" in r["metadata"]["name"] for r in csv.of_kind("Role"))
    assert values_file("values.yaml")["streamer"]["source"] == "csv"  # the same-cluster default is unchanged


BAD = [
    ({"streamer": {"source": "kafka"}}, "/streamer/source"),
    ({"streamer": {"scrape": {"mode": "sidecar"}}}, "/streamer/scrape/mode"),
    ({"streamer": {"scrape": {"interval": "soon"}}}, "/streamer/scrape/interval"),
    ({"streamer": {"scrape": {"discovery": {"role": "service"}}}}, "/streamer/scrape/discovery/role"),
    ({"streamer": {"scrape": {"discovery": {"port": 0}}}}, "/streamer/scrape/discovery/port"),
    ({"streamer": {"scrape": {"daemonset": {"target": "node:9400"}}}}, "/streamer/scrape/daemonset/target"),
    ({"streamer": {"scrape": {"discovery": {"verbs": ["create"]}}}}, "verbs"),
]


@pytest.mark.parametrize(("values", "where"), BAD, ids=[w for _, w in BAD])
def test_schema_rejects_bad_scrape_values(helm, chart, values, where):
    with pytest.raises(helm.HelmValuesError) as info:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    assert where in str(info.value)

"""The Helm chart k8s/helm/telemetry-pipeline, rendered with the real Helm engine (helm-python-sdk)
and every manifest validated strictly against Kubernetes' OpenAPI schemas (kubernetes-validate)."""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import re
import subprocess
import sys
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from chart_helpers import (
    APP_COMPONENTS,
    CHART_DIR,
    REPO,
    Rendered,
    containers,
    deep_merge,
    env_of,
    main_container,
    pod_labels,
    pod_spec,
    require,
    values_file,
)

RELEASE = "tel"
NAMESPACE = "telemetry"
PREFIX = f"{RELEASE}-telemetry-pipeline"
API_SVC = f"{PREFIX}-api-gateway"

REDIS_PW = "r3dis-Pa55-edge!x"
DB_PW = "pg-Pa55-central#y"
EXT_DB_PW = "ext-pg-Pa55-hybrid%z"
PASSWORDS = (REDIS_PW, DB_PW, EXT_DB_PW)

# name -> (values file or None for the defaults, overrides). Rendering a values file here is what
# `helm template -f <file> --set ...` does: the file and the overrides are user values coalesced
# with values.yaml.
SCENARIOS: dict[str, tuple[str | None, dict[str, Any]]] = {
    "same-cluster": (None, {}),
    "same-cluster-passwords": (None, {"redis": {"auth": {"password": REDIS_PW}},
                                      "postgresql": {"auth": {"password": DB_PW}}}),
    "edge": ("values-edge-cluster.yaml", {
        "externalRedis": {"host": "redis.central.example.com", "port": 6380, "password": REDIS_PW}}),
    "edge-tls-existing-secret": ("values-edge-cluster.yaml", {
        "externalRedis": {"host": "redis.tls.example.com", "port": 6390, "existingSecret": "my-redis",
                          "existingSecretPasswordKey": "pw",
                          "tls": {"enabled": True, "caSecret": "redis-ca"}}}),
    "central": ("values-central-cluster.yaml", {
        "externalRedis": {"host": "10.1.2.3", "port": 30379, "existingSecret": "telemetry-redis-auth"},
        "postgresql": {"auth": {"password": DB_PW}}}),
    "central-existing-db-secret": ("values-central-cluster.yaml", {
        "externalRedis": {"host": "10.1.2.3", "password": REDIS_PW},
        "postgresql": {"auth": {"existingSecret": "telemetry-postgresql-auth"}}}),
    "hybrid": ("values-hybrid.yaml", {
        "externalRedis": {"host": "redis.managed.example.com", "password": REDIS_PW},
        "externalDatabase": {"host": "pg.managed.example.com", "password": EXT_DB_PW}}),
    "hybrid-existing-secrets": ("values-hybrid.yaml", {
        "externalRedis": {"host": "redis.managed.example.com", "existingSecret": "redis-auth",
                          "tls": {"insecureSkipVerify": True}},
        "externalDatabase": {"host": "pg.managed.example.com", "existingSecret": "db-auth",
                             "existingSecretPasswordKey": "password", "sslmode": "verify-full"}}),
    "ingress-hpa-networkpolicy": (None, {
        "apiGateway": {"ingress": {"enabled": True, "className": "nginx",
                                   "annotations": {"nginx.ingress.kubernetes.io/proxy-read-timeout": "60"},
                                   "tls": [{"hosts": ["telemetry.example.com"], "secretName": "tls"}]},
                       "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 5}},
        "dashboard": {"ingress": {"enabled": True}},
        "collector": {"autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 12,
                                      "targetCPUUtilizationPercentage": 60}},
        "networkPolicy": {"enabled": True, "redisExtraFrom": [{"ipBlock": {"cidr": "10.20.0.0/16"}}],
                          "apiGatewayFrom": [{"namespaceSelector": {"matchLabels": {"name": "ingress"}}}]}}),
    "input-pvc": (None, {"streamer": {"replicas": 3, "input": {
        "type": "pvc", "pvc": {"claimName": "dcgm-exports", "subPath": "exports/dcgm.csv"}}}}),
    "input-url": (None, {"streamer": {"input": {
        "type": "url", "url": {"url": "https://exports.example.com/dcgm.csv", "sha256": "ab" * 32}}}}),
    "input-existing-configmap": (None, {"streamer": {"input": {
        "type": "configMap", "configMap": {"name": "my-dcgm-csv", "key": "dcgm.csv"}}}}),
    "maintenance-cronjob": (None, {
        "maintenance": {"inCollectors": False, "cronJob": {"enabled": True, "schedule": "*/10 * * * *"}},
        "retention": {"partition": "6h", "raw": "30d", "rollup1h": 0},
        "networkPolicy": {"enabled": True}}),
    "no-auth-no-persistence": (None, {
        "redis": {"auth": {"enabled": False}, "persistence": {"enabled": False}},
        "postgresql": {"persistence": {"enabled": False}},
        "streamer": {"nodeSelector": {"nvidia.com/gpu.present": "true"},
                     "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
                         "weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                                            "labelSelector": {"matchLabels": {"a": "b"}}}}]}}}}),
}

# Secrets the scenario says exist outside the chart (existingSecret): name -> keys.
EXTERNAL_SECRETS = {
    "edge-tls-existing-secret": {"my-redis": {"pw"}},
    "central": {"telemetry-redis-auth": {"redis-password"}},
    "central-existing-db-secret": {"telemetry-postgresql-auth": {"postgres-password"}},
    "hybrid-existing-secrets": {"redis-auth": {"redis-password"}, "db-auth": {"password"}},
}


# --------------------------------------------------------------------------- fixtures -------


@pytest.fixture(scope="module")
def helm():
    try:
        import helm_python
    except Exception as err:  # ImportError, or the bundled native library failing to load
        helm_python = None
        reason = f"helm_python (pip install helm-python-sdk) is not importable: {err}"
    require(helm_python is not None, reason if helm_python is None else "")
    return helm_python


@pytest.fixture(scope="module")
def kv():
    try:
        import kubernetes_validate
        from kubernetes_validate import utils
    except ImportError as err:
        kubernetes_validate = None
        reason = f"kubernetes_validate (pip install kubernetes-validate) is not importable: {err}"
    require(kubernetes_validate is not None, reason if kubernetes_validate is None else "")
    return kubernetes_validate, utils


@pytest.fixture(scope="module")
def chart(helm):
    with helm.Chart.load(str(CHART_DIR)) as loaded:
        yield loaded


def scenario_values(name: str) -> dict[str, Any]:
    file, overrides = SCENARIOS[name]
    base = values_file(file) if file else {}
    return deep_merge(base, overrides)


@pytest.fixture(scope="module")
def render(chart):
    @functools.cache
    def _render_scenario(name: str) -> Rendered:
        return Rendered(chart.render(scenario_values(name), name=RELEASE, namespace=NAMESPACE))

    def _render(name_or_values: str | dict[str, Any], release: str = RELEASE) -> Rendered:
        if isinstance(name_or_values, str):
            return _render_scenario(name_or_values)
        return Rendered(chart.render(name_or_values, name=release, namespace=NAMESPACE))

    return _render


def k8s_versions(utils) -> list[str]:
    """Kubernetes 1.29 (the chart's minimum) and the newest schema kubernetes-validate ships."""
    newest = utils.latest_version()
    versions = ["1.29.0", newest]
    assert tuple(int(x) for x in newest.split(".")[:2]) > (1, 29), f"newest schema is only {newest}"
    return versions


# ------------------------------------------------------------------- render + lint ---------


def test_chart_metadata(helm, chart):
    meta = chart.metadata
    assert meta["apiVersion"] == "v2"
    assert meta["name"] == "telemetry-pipeline"
    assert chart.schema is not None, "values.schema.json must ship with the chart"
    assert chart.schema["$schema"] == "http://json-schema.org/draft-07/schema#"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_scenario_renders(render, scenario):
    rendered = render(scenario)
    assert rendered.docs, "nothing rendered"
    names = [(d["kind"], d["metadata"]["name"]) for d in rendered.docs]
    assert len(names) == len(set(names)), f"duplicate objects: {sorted(names)}"
    for doc in rendered.docs:
        if doc["kind"] in ("Role", "RoleBinding") and doc["metadata"]["name"].endswith("-discovery"):
            assert doc["metadata"]["namespace"] == "gpu-operator"  # scrape discovery: the exporter's namespace
        else:
            assert doc["metadata"].get("namespace") in (None, NAMESPACE)
        assert len(doc["metadata"]["name"]) <= 63, doc["metadata"]["name"]
    assert "telemetry-pipeline/templates/NOTES.txt" in rendered.templates


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_lint_reports_no_errors(helm, scenario):
    for kube_version in ("v1.29.0", None):
        report = helm.lint(str(CHART_DIR), scenario_values(scenario), namespace=NAMESPACE,
                           kube_version=kube_version)
        errors = [m for m in report["messages"] if m["severity"] >= 3]
        assert not errors and not report["errors"], report
        warnings = [m for m in report["messages"] if m["severity"] == 2]
        assert not warnings, warnings


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("version_index", [0, 1], ids=["k8s-1.29", "k8s-newest"])
def test_manifests_validate_strict(render, kv, scenario, version_index):
    kubernetes_validate, utils = kv
    version = k8s_versions(utils)[version_index]
    failures = []
    for doc in render(scenario).docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            path = ".".join(str(p) for p in err.path)
            failures.append(f"{doc['kind']}/{doc['metadata']['name']}: {path}: {err.message}")
        except kubernetes_validate.SchemaNotFoundError as err:
            failures.append(f"{doc['kind']}/{doc['metadata']['name']}: {err.message}")
    assert not failures, f"against Kubernetes {version}:\n" + "\n".join(failures)


def test_strict_validation_catches_unknown_fields(render, kv):
    """Negative control: the validator really rejects a misspelt field in a rendered manifest."""
    kubernetes_validate, utils = kv
    deployment = json.loads(json.dumps(render("same-cluster").one("collector", "Deployment")))
    main_container(deployment)["readinesProbe"] = main_container(deployment).pop("readinessProbe")
    for version in k8s_versions(utils):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(deployment, version, strict=True)


# ------------------------------------------------------------------------- topology --------


@pytest.mark.parametrize(("scenario", "expected"), [
    ("same-cluster", {"streamer", "collector", "api-gateway", "dashboard", "redis", "postgresql"}),
    ("edge", {"streamer"}),
    ("edge-tls-existing-secret", {"streamer"}),
    ("central", {"collector", "api-gateway", "dashboard", "postgresql"}),
    ("hybrid", {"streamer", "collector", "api-gateway", "dashboard"}),
])
def test_topology(render, scenario, expected):
    rendered = render(scenario)
    assert rendered.components() == expected
    if "api-gateway" not in expected:
        assert not rendered.by_component("api-gateway", "Service")
    if "postgresql" not in expected:
        assert not [s for s in rendered.of_kind("Secret") if s["metadata"]["name"].endswith("-postgresql")]
        assert "DATABASE_URL" not in rendered.env_configmap() or scenario.startswith("hybrid")
    if "streamer" not in expected:
        assert not rendered.by_component("streamer", "ConfigMap", "Service")


def test_workload_kinds(render):
    rendered = render("same-cluster")
    assert rendered.one("streamer")["kind"] == "StatefulSet"
    assert rendered.one("collector")["kind"] == "Deployment"
    assert rendered.one("api-gateway")["kind"] == "Deployment"
    assert rendered.one("dashboard")["kind"] == "Deployment"
    assert rendered.one("redis")["kind"] == "StatefulSet"
    assert rendered.one("postgresql")["kind"] == "StatefulSet"


def test_disabling_each_component(render):
    values = {"dashboard": {"enabled": False}, "collector": {"enabled": False}}
    assert render(values).components() == {"streamer", "api-gateway", "redis", "postgresql"}


# ------------------------------------------------------------------- labels / wiring -------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_labels_and_selectors(render, scenario):
    rendered = render(scenario)
    for w in rendered.workloads():
        meta_labels = w["metadata"]["labels"]
        labels = pod_labels(w)
        component = meta_labels["app.kubernetes.io/component"]
        assert component in (*APP_COMPONENTS, "redis", "postgresql", "deployment-check", "maintain")
        for lab in (meta_labels, labels):
            assert lab["app.kubernetes.io/name"] == "telemetry-pipeline"
            assert lab["app.kubernetes.io/instance"] == RELEASE
            assert lab["app.kubernetes.io/component"] == component
            assert lab["app.kubernetes.io/version"] == "0.1.0"
            assert lab["helm.sh/chart"] == "telemetry-pipeline-0.1.0"
        if w["kind"] not in ("Pod", "CronJob"):  # the only kinds without a selector
            selector = w["spec"]["selector"]["matchLabels"]
            assert selector == {"app.kubernetes.io/name": "telemetry-pipeline",
                                "app.kubernetes.io/instance": RELEASE,
                                "app.kubernetes.io/component": component}
            assert selector.items() <= labels.items()
    # Every Service selects the pods of exactly one workload, on a port those pods declare.
    for svc in rendered.of_kind("Service"):
        targets = [w for w in rendered.workloads() if svc["spec"]["selector"].items() <= pod_labels(w).items()]
        assert len(targets) == 1, f"Service {svc['metadata']['name']} selects {len(targets)} workloads"
        port_names = {p["name"] for c in containers(targets[0]) for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in port_names
    # StatefulSets name an existing (headless for the streamers) Service.
    for sts in rendered.of_kind("StatefulSet"):
        rendered.get("Service", sts["spec"]["serviceName"])


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_env_configmap_and_secret_refs_resolve(render, scenario):
    rendered = render(scenario)
    configmaps = {d["metadata"]["name"] for d in rendered.of_kind("ConfigMap")}
    external = EXTERNAL_SECRETS.get(scenario, {})
    for w in rendered.workloads():
        for c in containers(w):
            for src in c.get("envFrom", []):
                assert src["configMapRef"]["name"] in configmaps
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if not ref:
                    continue
                if ref["name"] in external:
                    assert ref["key"] in external[ref["name"]], (ref, external)
                else:
                    assert rendered.secret_value(ref["name"], ref["key"]) is not None, \
                        f"{w['metadata']['name']}/{c['name']}: {e['name']} refers to missing {ref}"
        for vol in pod_spec(w).get("volumes", []):
            if "configMap" in vol and vol["configMap"]["name"] != "my-dcgm-csv":
                assert vol["configMap"]["name"] in configmaps


def test_app_containers_get_the_env_configmap(render):
    rendered = render("same-cluster")
    for component in APP_COMPONENTS:
        c = main_container(rendered.one(component))
        assert c["envFrom"] == [{"configMapRef": {"name": f"{PREFIX}-env"}}]
    cm = rendered.env_configmap()
    assert cm["TELEMETRY_STREAM"] == "telemetry"
    assert cm["TELEMETRY_GROUP"] == "collectors"
    assert cm["TELEMETRY_BATCH_SIZE"] == "2000"
    assert cm["TELEMETRY_METRICS_PORT"] == "9100"
    assert cm["TELEMETRY_NB_HOME"].startswith("/tmp/")
    assert cm["TELEMETRY_API_URL"] == f"http://{API_SVC}:8000"
    assert all(isinstance(v, str) for v in cm.values())


def test_config_values_reach_the_configmap(render):
    cm = render({"config": {"stream": "gpu", "group": "writers", "batchSize": 250, "metricsPort": 9200,
                            "extraEnv": {"TELEMETRY_HIGH_WATER": 5000}}}).env_configmap()
    assert (cm["TELEMETRY_STREAM"], cm["TELEMETRY_GROUP"], cm["TELEMETRY_BATCH_SIZE"]) == ("gpu", "writers", "250")
    assert cm["TELEMETRY_METRICS_PORT"] == "9200"
    assert cm["TELEMETRY_HIGH_WATER"] == "5000"


def test_stream_partitions_reach_streamer_scraper_collector_api_and_helm_test(render):
    assert render("same-cluster").env_configmap()["TELEMETRY_STREAM_PARTITIONS"] == "1"  # the single key
    for values in ({"streamPartitions": 6}, {"streamPartitions": 6, "streamer": {"source": "scrape"}}):
        rendered = render(values)
        assert rendered.env_configmap()["TELEMETRY_STREAM_PARTITIONS"] == "6"
        for component in ("streamer", "collector", "api-gateway", "deployment-check"):
            envs = main_container(rendered.one(component))["envFrom"]
            assert {"configMapRef": {"name": f"{PREFIX}-env"}} in envs, component


def test_external_redis_cluster_url(render):
    from telemetry_nb.pipeline.streams import is_cluster_url

    base = {"redis": {"enabled": False}, "streamPartitions": 6,
            "externalRedis": {"host": "redis-0.example.com", "port": 7000, "cluster": True, "password": "pw-123456"}}
    url = render(base).env_configmap()["REDIS_URL"]
    assert url == "redis+cluster://redis-0.example.com:7000" and is_cluster_url(url)
    seeds = deep_merge(base, {"externalRedis": {"clusterNodes": ["redis-1.example.com:7000", "10.0.0.3:7001"],
                                                "tls": {"enabled": True, "caSecret": "ca"}}})
    url = render(seeds).env_configmap()["REDIS_URL"]
    assert url == ("rediss+cluster://redis-0.example.com:7000,redis-1.example.com:7000,10.0.0.3:7001"
                   "?ssl_ca_certs=/etc/telemetry/redis-ca/ca.crt")
    assert "pw-123456" not in url


# -------------------------------------------------------------- redis + database ---------


def redis_password_ref(rendered: Rendered, component: str) -> dict[str, str]:
    env = env_of(main_container(rendered.one(component)))
    assert "REDIS_PASSWORD" in env, f"{component} has no REDIS_PASSWORD"
    assert "value" not in env["REDIS_PASSWORD"]
    return env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]


def test_external_redis_with_password(render):
    rendered = render("edge")
    assert rendered.env_configmap()["REDIS_URL"] == "redis://redis.central.example.com:6380/0"
    ref = redis_password_ref(rendered, "streamer")
    assert ref == {"name": f"{PREFIX}-external-redis", "key": "redis-password"}
    secret = rendered.get("Secret", ref["name"])
    assert secret["data"][ref["key"]] == base64.b64encode(REDIS_PW.encode()).decode()


def test_external_redis_tls_and_existing_secret(render):
    rendered = render("edge-tls-existing-secret")
    url = rendered.env_configmap()["REDIS_URL"]
    parts = urlsplit(url)
    assert (parts.scheme, parts.hostname, parts.port, parts.path) == ("rediss", "redis.tls.example.com", 6390, "/0")
    assert parse_qs(parts.query) == {"ssl_ca_certs": ["/etc/telemetry/redis-ca/ca.crt"]}
    assert redis_password_ref(rendered, "streamer") == {"name": "my-redis", "key": "pw"}
    assert not rendered.of_kind("Secret"), "an existingSecret must not be created by the chart"
    streamer = rendered.one("streamer")
    mounts = {m["mountPath"]: m["name"] for m in main_container(streamer)["volumeMounts"]}
    assert mounts["/etc/telemetry/redis-ca"] == "redis-ca"
    vols = {v["name"]: v for v in pod_spec(streamer)["volumes"]}
    assert vols["redis-ca"]["secret"]["secretName"] == "redis-ca"


def test_external_redis_reaches_collectors_and_api(render):
    rendered = render("central")
    assert rendered.env_configmap()["REDIS_URL"] == "redis://10.1.2.3:30379/0"
    for component in ("collector", "api-gateway"):
        assert redis_password_ref(rendered, component) == {"name": "telemetry-redis-auth", "key": "redis-password"}


def test_hybrid_uses_external_redis_tls_and_external_database(render):
    rendered = render("hybrid")
    cm = rendered.env_configmap()
    assert cm["REDIS_URL"] == "rediss://redis.managed.example.com:6380/0"
    assert cm["DATABASE_URL"] == "postgresql://telemetry@pg.managed.example.com:5432/telemetry?sslmode=require"
    env = env_of(main_container(rendered.one("collector")))
    ref = env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]
    assert rendered.secret_value(ref["name"], ref["key"]) == EXT_DB_PW
    assert rendered.secret_value(redis_password_ref(rendered, "streamer")["name"], "redis-password") == REDIS_PW

    rendered = render("hybrid-existing-secrets")
    cm = rendered.env_configmap()
    assert cm["REDIS_URL"] == "rediss://redis.managed.example.com:6380/0?ssl_cert_reqs=none"
    assert cm["DATABASE_URL"].endswith("?sslmode=verify-full")
    env = env_of(main_container(rendered.one("api-gateway")))
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "db-auth", "key": "password"}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "redis-auth", "key": "redis-password"}


def test_builtin_redis_and_postgresql(render):
    rendered = render("same-cluster-passwords")
    cm = rendered.env_configmap()
    assert cm["REDIS_URL"] == f"redis://{PREFIX}-redis:6379/0"
    assert cm["DATABASE_URL"] == f"postgresql://telemetry@{PREFIX}-postgresql:5432/telemetry?sslmode=disable"
    rendered.get("Service", f"{PREFIX}-redis")
    rendered.get("Service", f"{PREFIX}-postgresql")

    redis = rendered.one("redis")
    rc = main_container(redis)
    assert rc["image"] == "redis:7-alpine"
    script = " ".join(rc["command"])
    assert '--requirepass "$REDIS_PASSWORD"' in script and REDIS_PW not in script
    assert env_of(rc)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": f"{PREFIX}-redis",
                                                                         "key": "redis-password"}
    assert rendered.secret_value(f"{PREFIX}-redis", "redis-password") == REDIS_PW
    assert [t["metadata"]["name"] for t in redis["spec"]["volumeClaimTemplates"]] == ["data"]

    pg = rendered.one("postgresql")
    pc = main_container(pg)
    assert pc["image"] == "postgres:16-alpine"
    ref = env_of(pc)["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert rendered.secret_value(ref["name"], ref["key"]) == DB_PW
    assert [t["metadata"]["name"] for t in pg["spec"]["volumeClaimTemplates"]] == ["data"]
    mounts = {m["mountPath"] for m in pc["volumeMounts"]}
    assert {"/var/run/postgresql", "/var/lib/postgresql/data", "/tmp"} <= mounts
    for component in ("collector", "api-gateway"):
        env = env_of(main_container(rendered.one(component)))
        assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == ref
    assert "PGPASSWORD" not in env_of(main_container(rendered.one("streamer")))


def test_generated_passwords_when_none_given(render):
    rendered = render("same-cluster")
    redis_pw = rendered.secret_value(f"{PREFIX}-redis", "redis-password")
    pg_pw = rendered.secret_value(f"{PREFIX}-postgresql", "postgres-password")
    assert redis_pw and len(redis_pw) >= 24 and pg_pw and len(pg_pw) >= 24 and redis_pw != pg_pw


def test_redis_without_auth_has_no_password_env(render):
    rendered = render("no-auth-no-persistence")
    for component in ("streamer", "collector", "api-gateway", "redis"):
        assert "REDIS_PASSWORD" not in env_of(main_container(rendered.one(component)))
    assert "--requirepass" not in " ".join(main_container(rendered.one("redis"))["command"])
    assert "volumeClaimTemplates" not in rendered.one("redis")["spec"]
    assert {"name": "data", "emptyDir": {}} in pod_spec(rendered.one("postgresql"))["volumes"]


# ------------------------------------------------------------------------ secrets ----------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_no_password_in_configmaps_or_literal_env(render, scenario):
    rendered = render(scenario)
    secrets = [p for p in (*PASSWORDS, *rendered.secret_values()) if p]
    for cm in rendered.of_kind("ConfigMap"):
        for key, value in (cm.get("data") or {}).items():
            for pw in secrets:
                assert pw not in value, f"a password is in ConfigMap {cm['metadata']['name']} key {key}"
            assert not re.search(r"(?i)password|secret|token", key), key
    for w in rendered.workloads():
        for c in containers(w):
            for e in c.get("env", []):
                if "value" in e:
                    for pw in secrets:
                        assert pw not in str(e["value"]), f"{w['metadata']['name']}/{c['name']} env {e['name']}"
                if re.search(r"(?i)PASSWORD|REDISCLI_AUTH", e["name"]):
                    assert "value" not in e and "secretKeyRef" in e["valueFrom"], e
            for arg in [*c.get("command", []), *c.get("args", [])]:
                for pw in secrets:
                    assert pw not in arg
    cm = rendered.env_configmap()
    for key in ("REDIS_URL", "DATABASE_URL"):
        if key in cm:
            parts = urlsplit(cm[key])
            assert parts.password is None and ":" not in (parts.username or ""), f"{key} carries credentials"


def test_credential_like_extra_env_is_refused(helm, chart):
    with pytest.raises(helm.HelmError, match="looks like a credential"):
        chart.render({"config": {"extraEnv": {"DB_PASSWORD": "hunter2"}}}, name=RELEASE, namespace=NAMESPACE)


# ------------------------------------------------------------------------ schema -----------


BAD_VALUES = [
    ({"streamer": {"replicas": "two"}}, "/streamer/replicas"),
    ({"collector": {"replicas": 1.5}}, "/collector/replicas"),
    ({"apiGateway": {"replicas": -1}}, "/apiGateway/replicas"),
    ({"apiGateway": {"dbConnections": 0}}, "/apiGateway/dbConnections"),
    ({"apiGateway": {"queueTimeout": "soon"}}, "/apiGateway/queueTimeout"),
    ({"collector": {"autoscaling": {"enabled": "yes"}}}, "/collector/autoscaling/enabled"),
    ({"collector": {"autoscaling": {"maxReplicas": "10"}}}, "/collector/autoscaling/maxReplicas"),
    ({"apiGateway": {"service": {"port": 70000}}}, "/apiGateway/service/port"),
    ({"apiGateway": {"ingress": {"enabled": "on"}}}, "/apiGateway/ingress/enabled"),
    ({"externalRedis": {"port": "6379"}}, "/externalRedis/port"),
    ({"externalRedis": {"tls": {"enabled": "true"}}}, "/externalRedis/tls/enabled"),
    ({"externalDatabase": {"sslmode": "sometimes"}}, "/externalDatabase/sslmode"),
    ({"streamer": {"input": {"type": "s3"}}}, "/streamer/input/type"),
    ({"streamer": {"timestamps": "yesterday"}}, "/streamer/timestamps"),
    ({"streamer": {"nodeSelector": ["gpu"]}}, "/streamer/nodeSelector"),
    ({"streamer": {"tolerations": {"key": "x"}}}, "/streamer/tolerations"),
    ({"streamer": {"resources": "lots"}}, "/streamer/resources"),
    ({"securityContext": {"runAsUser": 0}}, "/securityContext/runAsUser"),
    ({"networkPolicy": {"enabled": 1}}, "/networkPolicy/enabled"),
    ({"config": {"batchSize": 0}}, "/config/batchSize"),
    ({"streamPartitions": 0}, "/streamPartitions"),
    ({"externalRedis": {"clusterNodes": ["a:1,b:2"]}}, "/externalRedis/clusterNodes/0"),
    ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ({"notebookImage": {"pullPolicy": "Sometimes"}}, "/notebookImage/pullPolicy"),
    ({"redis": {"replicas": 3}}, "/redis/replicas"),
    ({"apiAuth": {"tokens": ["short"]}}, "/apiAuth/tokens/0"),
    ({"apiAuth": {"enabled": "yes"}}, "/apiAuth/enabled"),
    ({"streamr": {"replicas": 2}}, "streamr"),
    ({"collector": {"replica": 2}}, "replica"),
]


@pytest.mark.parametrize(("values", "where"), BAD_VALUES, ids=[w for _, w in BAD_VALUES])
def test_schema_rejects_wrong_types(helm, chart, values, where):
    with pytest.raises(helm.HelmValuesError) as info:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    assert where in str(info.value)
    report = helm.lint(str(CHART_DIR), values)
    assert any(where in e for e in report["errors"]), report


def test_schema_covers_every_values_key(chart):
    schema = chart.schema
    assert schema["additionalProperties"] is False
    defaults = chart.values

    def walk(values: dict[str, Any], node: dict[str, Any], path: str) -> None:
        if "$ref" in node:
            node = schema["definitions"][node["$ref"].rsplit("/", 1)[1]]
        assert "type" in node, f"{path}: no type in the schema"
        props = node.get("properties")
        if props is None:
            return
        for key, value in values.items():
            assert key in props, f"{path}.{key} is not in values.schema.json"
            if isinstance(value, dict):
                walk(value, props[key], f"{path}.{key}")

    walk(defaults, schema, "")
    for name in ("values-edge-cluster.yaml", "values-central-cluster.yaml", "values-hybrid.yaml"):
        chart.validate_schema(values_file(name))


@pytest.mark.parametrize(("values", "message"), [
    (values_file("values-edge-cluster.yaml"), "externalRedis.host is required"),
    (values_file("values-central-cluster.yaml"), "externalRedis.host is required"),
    (deep_merge(values_file("values-hybrid.yaml"), {"externalRedis": {"host": "r"}}),
     "externalDatabase.host is required"),
    ({"externalRedis": {"host": "redis.example.com"}}, "set redis.enabled=false"),
    ({"postgresql": {"enabled": True}, "externalDatabase": {"host": "pg"}}, "set postgresql.enabled=false"),
    ({"streamer": {"input": {"type": "pvc"}}}, "streamer.input.pvc.claimName"),
    ({"streamer": {"input": {"type": "url"}}}, "streamer.input.url.url"),
    ({"streamer": {"input": {"configMap": {"data": ""}}}}, "streamer.input.configMap.name"),
    ({"apiGateway": {"enabled": False}}, "dashboard.apiUrl is required"),
    ({"externalRedis": {"cluster": True}}, "externalRedis.cluster=true needs redis.enabled=false"),
    ({"redis": {"enabled": False}, "externalRedis": {"host": "r", "cluster": True, "db": 2}},
     "externalRedis.cluster=true needs externalRedis.db=0"),
], ids=["edge-no-redis-host", "central-no-redis-host", "hybrid-no-db-host", "redis-twice", "db-twice",
        "pvc-no-claim", "url-no-url", "configmap-no-data", "dashboard-no-api", "cluster-builtin-redis",
        "cluster-db"])
def test_incomplete_values_fail_with_a_clear_message(helm, chart, values, message):
    with pytest.raises(helm.HelmError, match=re.escape(message)):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


# ------------------------------------------------------------- pod security --------------

ALLOWED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                        "projected", "secret"}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_pod_security_restricted(render, scenario):
    """Every container of every workload (hook pods included) meets Pod Security "restricted"."""
    rendered = render(scenario)
    for w in rendered.workloads():
        name = w["metadata"]["name"]
        spec = pod_spec(w)
        psc = spec.get("securityContext", {})
        for host in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(host), f"{name}: {host}"
        for vol in spec.get("volumes", []):
            kinds = set(vol) - {"name"}
            assert kinds <= ALLOWED_VOLUME_TYPES, f"{name}: volume {vol['name']} is {kinds}"
        for c in containers(w):
            where = f"{name}/{c['name']}"
            sc = c.get("securityContext", {})
            assert sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, f"{where}: runAsNonRoot"
            uid = sc.get("runAsUser", psc.get("runAsUser"))
            assert uid is not None and uid != 0, f"{where}: runAsUser {uid}"
            assert sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation"
            assert sc.get("privileged", False) is False, f"{where}: privileged"
            assert "ALL" in sc.get("capabilities", {}).get("drop", []), f"{where}: capabilities.drop ALL"
            assert set(sc.get("capabilities", {}).get("add", [])) <= {"NET_BIND_SERVICE"}, where
            seccomp = sc.get("seccompProfile", psc.get("seccompProfile", {})).get("type")
            assert seccomp == "RuntimeDefault", f"{where}: seccompProfile {seccomp}"
            assert sc.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem"
            for port in c.get("ports", []):
                assert "hostPort" not in port, f"{where}: hostPort"


def test_uids_and_writable_paths(render):
    rendered = render("same-cluster")
    expected = {"streamer": 10001, "collector": 10001, "api-gateway": 10001, "dashboard": 10001,
                "deployment-check": 10001, "redis": 999, "postgresql": 70}
    for component, uid in expected.items():
        w = rendered.one(component)
        assert pod_spec(w)["securityContext"]["runAsUser"] == uid
        for c in containers(w):
            assert c["securityContext"]["runAsUser"] == uid
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{component}/{c['name']}: no writable /tmp"
            vols = {v["name"]: v for v in pod_spec(w)["volumes"]}
            assert "emptyDir" in vols[mounts["/tmp"]]
    assert rendered.env_configmap()["TELEMETRY_NB_HOME"] == "/tmp/telemetry-nb"
    pg_vols = {v["name"]: v for v in pod_spec(rendered.one("postgresql"))["volumes"]}
    pg_mounts = {m["mountPath"]: m["name"] for m in main_container(rendered.one("postgresql"))["volumeMounts"]}
    assert "emptyDir" in pg_vols[pg_mounts["/var/run/postgresql"]]


# -------------------------------------------------------------------- streamer ------------


@pytest.mark.parametrize("replicas", [1, 3, 7])
def test_streamer_shard_env_from_pod_index(render, replicas):
    sts = render({"streamer": {"replicas": replicas}}).one("streamer", "StatefulSet")
    assert sts["spec"]["replicas"] == replicas
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    env = env_of(main_container(sts))
    assert env["TELEMETRY_SHARD_INDEX"]["valueFrom"] == {
        "fieldRef": {"fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']"}}
    assert env["TELEMETRY_SHARD_COUNT"]["value"] == str(replicas)


def test_streamer_command_probes_and_default_input(render):
    rendered = render("same-cluster")
    sts = rendered.one("streamer")
    c = main_container(sts)
    assert c["args"] == ["stream", "--csv", "/data/input.csv", "--loop", "--timestamps", "now"]
    assert "command" not in c, "the image's ENTRYPOINT (telemetry-nb) must run"
    assert {"name": "metrics", "containerPort": 9100, "protocol": "TCP"} in c["ports"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "metrics"}  # 503 while a dependency is down
    assert rendered.env_configmap()["TELEMETRY_METRICS_PORT"] == "9100"
    assert rendered.env_configmap()["TELEMETRY_SIDE_MAXLEN"] == "100000"
    assert rendered.env_configmap()["TELEMETRY_CONSUMER_IDLE_LIMIT"] == "1h"
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/data"]["name"] == "input" and mounts["/data"]["readOnly"] is True
    vol = {v["name"]: v for v in pod_spec(sts)["volumes"]}["input"]
    assert vol["configMap"] == {"name": f"{PREFIX}-input", "items": [{"key": "input.csv", "path": "input.csv"}]}
    csv_text = rendered.get("ConfigMap", f"{PREFIX}-input")["data"]["input.csv"]
    assert csv_text.splitlines()[0].startswith("timestamp,metric_name,gpu_id")


def test_default_sample_csv_parses_with_the_package(render):
    """The CSV the chart ships for the same-cluster default is one the streamer can read."""
    import io

    try:
        from telemetry_nb.model import Rejected
        from telemetry_nb.sources.dcgm_csv import read_samples
    except ImportError as err:
        read_samples = None
        reason = f"telemetry_nb's CSV parser is not importable: {err}"
    require(read_samples is not None, reason if read_samples is None else "")

    text = render("same-cluster").get("ConfigMap", f"{PREFIX}-input")["data"]["input.csv"]
    rows = list(read_samples(io.StringIO(text)))
    assert rows and not [r for r in rows if isinstance(r, Rejected)]


def test_streamer_input_existing_configmap(render):
    sts = render("input-existing-configmap").one("streamer")
    vol = {v["name"]: v for v in pod_spec(sts)["volumes"]}["input"]
    assert vol["configMap"] == {"name": "my-dcgm-csv", "items": [{"key": "dcgm.csv", "path": "input.csv"}]}
    assert not render("input-existing-configmap").by_component("streamer", "ConfigMap")


def test_streamer_input_pvc(render):
    sts = render("input-pvc").one("streamer")
    mounts = {m["name"]: m for m in main_container(sts)["volumeMounts"]}
    assert mounts["input"] == {"name": "input", "mountPath": "/data/input.csv", "subPath": "exports/dcgm.csv",
                               "readOnly": True}
    vol = {v["name"]: v for v in pod_spec(sts)["volumes"]}["input"]
    assert vol["persistentVolumeClaim"] == {"claimName": "dcgm-exports", "readOnly": True}
    assert env_of(main_container(sts))["TELEMETRY_SHARD_COUNT"]["value"] == "3"


def test_streamer_input_url_init_container(render):
    sts = render("input-url").one("streamer")
    spec = pod_spec(sts)
    (init,) = spec["initContainers"]
    main = main_container(sts)
    assert init["image"] == main["image"]
    assert init["command"][:2] == ["python", "-c"] and "urllib" in init["command"][2]
    env = env_of(init)
    assert env["INPUT_URL"]["value"] == "https://exports.example.com/dcgm.csv"
    assert env["INPUT_SHA256"]["value"] == "ab" * 32
    assert {"name": "input", "mountPath": "/data"} in init["volumeMounts"]
    assert {"name": "input", "mountPath": "/data", "readOnly": True} in main["volumeMounts"]
    vol = {v["name"]: v for v in spec["volumes"]}["input"]
    assert "emptyDir" in vol


def test_url_init_script_downloads_and_checks_sha256(render, tmp_path):
    """Run the initContainer's Python for real against a file:// URL (its /data pointed at tmp)."""
    code = render("input-url").one("streamer")["spec"]["template"]["spec"]["initContainers"][0]["command"][2]
    code = code.replace("/data/", f"{tmp_path}/data/")
    (tmp_path / "data").mkdir()
    src = tmp_path / "src.csv"
    src.write_bytes(b"timestamp,metric_name\n1,x\n")
    good = hashlib.sha256(src.read_bytes()).hexdigest()

    def run(sha: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "INPUT_URL": src.as_uri(), "INPUT_SHA256": sha}
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30)

    ok = run(good)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "data" / "input.csv").read_bytes() == src.read_bytes()
    (tmp_path / "data" / "input.csv").unlink()
    bad = run("0" * 64)
    assert bad.returncode != 0 and "sha256 mismatch" in bad.stderr
    assert not (tmp_path / "data" / "input.csv").exists()


# ------------------------------------------------- collector / api / dashboard ---------


def test_collector(render):
    rendered = render("same-cluster")
    dep = rendered.one("collector")
    c = main_container(dep)
    assert c["args"] == ["collect"]
    assert dep["spec"]["replicas"] == 2
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "metrics"}  # 503 while a dependency is down
    assert {"name": "metrics", "containerPort": 9100, "protocol": "TCP"} in c["ports"]
    assert env_of(c)["TELEMETRY_CONSUMER"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    pdb = rendered.one("collector", "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    assert not rendered.of_kind("HorizontalPodAutoscaler")


def test_retention_values_reach_the_configmap_and_the_cronjob_runs_maintain(render):
    default = render("same-cluster")
    cm = default.env_configmap()
    assert (cm["TELEMETRY_PARTITION"], cm["TELEMETRY_RETENTION_RAW"], cm["TELEMETRY_RETENTION_1M"],
            cm["TELEMETRY_RETENTION_1H"], cm["TELEMETRY_LATE_WINDOW"]) == ("1d", "14d", "90d", "730d", "1d")
    assert cm["TELEMETRY_MAINTAIN"] == "1" and not default.of_kind("CronJob")
    rendered = render("maintenance-cronjob")
    cm = rendered.env_configmap()
    assert (cm["TELEMETRY_PARTITION"], cm["TELEMETRY_RETENTION_RAW"], cm["TELEMETRY_RETENTION_1H"],
            cm["TELEMETRY_MAINTAIN"]) == ("6h", "30d", "0", "0")
    job = rendered.one("maintain", "CronJob")
    assert job["spec"]["schedule"] == "*/10 * * * *" and job["spec"]["concurrencyPolicy"] == "Forbid"
    c = main_container(job)
    assert c["args"] == ["maintain", "--once"]
    assert c["envFrom"] == [{"configMapRef": {"name": f"{PREFIX}-env"}}]
    assert "secretKeyRef" in env_of(c)["PGPASSWORD"]["valueFrom"] and "REDIS_PASSWORD" not in env_of(c)
    pg = next(p for p in rendered.of_kind("NetworkPolicy")
              if p["metadata"]["labels"]["app.kubernetes.io/component"] == "postgresql")
    allowed = [f["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for f in pg["spec"]["ingress"][0]["from"]]
    assert "maintain" in allowed


def test_collector_and_api_autoscaling(render):
    rendered = render("ingress-hpa-networkpolicy")
    for component, (lo, hi, cpu) in {"collector": (3, 12, 60), "api-gateway": (2, 5, 70)}.items():
        dep = rendered.one(component, "Deployment")
        assert "replicas" not in dep["spec"], "the HPA owns replicas"
        hpa = rendered.one(component, "HorizontalPodAutoscaler")
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                                 "name": dep["metadata"]["name"]}
        assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (lo, hi)
        assert hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"] == cpu


def test_api_gateway(render):
    rendered = render("same-cluster")
    dep = rendered.one("api-gateway")
    c = main_container(dep)
    assert c["args"] == ["serve", "--host", "0.0.0.0", "--port", "8000"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert {"name": "http", "containerPort": 8000, "protocol": "TCP"} in c["ports"]
    svc = rendered.get("Service", API_SVC)
    assert svc["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]
    pdb = rendered.one("api-gateway", "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    assert not rendered.of_kind("Ingress")


def test_api_gateway_workers_and_connections(render):
    """Workers follow the container's CPU limit (downward API) unless set; the connection budget and the
    overload bounds reach the process as the env variables `serve` reads."""
    env = env_of(main_container(render("same-cluster").one("api-gateway")))
    assert env["TELEMETRY_API_WORKERS"]["valueFrom"] == {"resourceFieldRef": {
        "containerName": "api-gateway", "resource": "limits.cpu", "divisor": "1"}}
    assert (env["TELEMETRY_API_DB_CONNECTIONS"]["value"], env["TELEMETRY_API_QUEUE_TIMEOUT"]["value"],
            env["TELEMETRY_API_MAX_WAITING"]["value"]) == ("8", "500ms", "64")
    env = env_of(main_container(render({"apiGateway": {"workers": 3, "dbConnections": 12, "queueTimeout": "1s",
                                                       "maxWaiting": 0}}).one("api-gateway")))
    assert {k: env[k]["value"] for k in env if k.startswith("TELEMETRY_API_") and "value" in env[k]
            and k != "TELEMETRY_API_TOKENS_FILE"} == {
        "TELEMETRY_API_WORKERS": "3", "TELEMETRY_API_DB_CONNECTIONS": "12", "TELEMETRY_API_QUEUE_TIMEOUT": "1s",
        "TELEMETRY_API_MAX_WAITING": "0"}


def test_collector_writers(render):
    """The collector's parallel writers reach the process as the env variable `collect` reads."""
    env = env_of(main_container(render("same-cluster").one("collector")))
    assert env["TELEMETRY_COLLECTOR_WRITERS"]["value"] == "2"
    env = env_of(main_container(render({"collector": {"writers": 4}}).one("collector")))
    assert env["TELEMETRY_COLLECTOR_WRITERS"]["value"] == "4"


def test_default_connection_budget_fits_a_default_postgresql():
    """At the chart's largest default scale (autoscaling maxReplicas) every database client fits in 100 - 3."""
    v = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    api, col = v["apiGateway"], v["collector"]
    used = (api["autoscaling"]["maxReplicas"] * api["dbConnections"]
            + col["autoscaling"]["maxReplicas"] * (col["writers"] + 1) + 2)
    assert used == 80 <= 97


def test_ingress(render):
    rendered = render("ingress-hpa-networkpolicy")
    ing = rendered.one("api-gateway", "Ingress")
    assert ing["spec"]["ingressClassName"] == "nginx"
    assert ing["spec"]["tls"] == [{"hosts": ["telemetry.example.com"], "secretName": "tls"}]
    (rule,) = ing["spec"]["rules"]
    assert rule["host"] == "telemetry.example.com"
    assert rule["http"]["paths"][0]["backend"] == {"service": {"name": API_SVC, "port": {"number": 8000}}}
    dash = rendered.one("dashboard", "Ingress")
    assert dash["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["port"]["number"] == 8866


def test_dashboard(render):
    rendered = render("same-cluster")
    c = main_container(rendered.one("dashboard"))
    assert c["args"] == ["dashboard", "--host", "0.0.0.0", "--port", "8866"]
    assert rendered.env_configmap()["TELEMETRY_API_URL"] == f"http://{API_SVC}:8000"
    assert rendered.get("Service", f"{PREFIX}-dashboard")["spec"]["ports"][0]["port"] == 8866
    cm = render({"dashboard": {"apiUrl": "https://api.central.example.com"}}).env_configmap()
    assert cm["TELEMETRY_API_URL"] == "https://api.central.example.com"


def test_network_policies(render):
    assert not render("same-cluster").of_kind("NetworkPolicy")
    rendered = render("ingress-hpa-networkpolicy")
    policies = {p["metadata"]["labels"]["app.kubernetes.io/component"]: p for p in rendered.of_kind("NetworkPolicy")}
    assert set(policies) == {"streamer", "collector", "api-gateway", "dashboard", "redis", "postgresql"}
    for component, policy in policies.items():
        selector = policy["spec"]["podSelector"]["matchLabels"]
        assert selector == rendered.one(component)["spec"]["selector"]["matchLabels"]
    redis_from = policies["redis"]["spec"]["ingress"][0]["from"]
    assert {"ipBlock": {"cidr": "10.20.0.0/16"}} in redis_from
    assert {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "telemetry-pipeline",
                                            "app.kubernetes.io/instance": RELEASE}}} in redis_from
    pg_from = [f["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
               for f in policies["postgresql"]["spec"]["ingress"][0]["from"]]
    assert sorted(pg_from) == ["api-gateway", "collector", "deployment-check"]
    assert policies["api-gateway"]["spec"]["ingress"][0]["ports"] == [{"port": 8000, "protocol": "TCP"}]


def test_scheduling_values_reach_pods(render):
    spec = pod_spec(render("no-auth-no-persistence").one("streamer"))
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert "podAntiAffinity" in spec["affinity"]
    spec = pod_spec(render("edge").one("streamer"))
    assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    for component in ("collector", "api-gateway"):
        res = main_container(render("same-cluster").one(component))["resources"]
        assert res["requests"] and res["limits"]


NOTEBOOK_COMPONENTS = ("dashboard", "deployment-check")  # the full image; the rest run the services image


def test_image_values(render):
    rendered = render({"image": {"repository": "registry.example.com/telemetry-nb", "tag": "1.2.3",
                                 "pullPolicy": "Always"}})
    for component in (*APP_COMPONENTS, "deployment-check"):
        repo = "telemetry-nb-notebooks" if component in NOTEBOOK_COMPONENTS else "telemetry-nb"
        for c in containers(rendered.one(component)):
            assert c["image"] == f"registry.example.com/{repo}:1.2.3"
            assert c["imagePullPolicy"] == "Always"
    same = render("same-cluster")
    assert main_container(same.one("collector"))["image"] == "telemetry-nb:0.1.0"
    assert main_container(same.one("dashboard"))["image"] == "telemetry-nb-notebooks:0.1.0"


def test_notebook_image_values(render):
    rendered = render({"image": {"repository": "r.example.com/svc", "tag": "1.0"},
                       "notebookImage": {"repository": "r.example.com/nb", "tag": "2.0", "pullPolicy": "Never"}})
    for component in NOTEBOOK_COMPONENTS:
        (c,) = containers(rendered.one(component))
        assert (c["image"], c["imagePullPolicy"]) == ("r.example.com/nb:2.0", "Never")
    assert main_container(rendered.one("api-gateway"))["image"] == "r.example.com/svc:1.0"


def test_long_release_names_stay_within_limits(render):
    rendered = render({}, release="a-very-long-release-name-for-the-telemetry-pipeline-x")
    for doc in rendered.docs:
        limit = 52 if doc["kind"] == "StatefulSet" else 63
        assert len(doc["metadata"]["name"]) <= limit, doc["metadata"]["name"]


# --------------------------------------------------------------------- helm test ---------


def papermill_params(command: list[str]) -> dict[str, str]:
    return {command[i + 1]: command[i + 2] for i, arg in enumerate(command) if arg == "-p"}


def papermill_yaml(command: list[str]) -> dict[str, Any]:
    """The `-y` parameters (YAML) of a papermill command line."""
    (i,) = [i for i, arg in enumerate(command) if arg in ("-y", "--parameters_yaml")]
    return yaml.safe_load(command[i + 1])


def test_helm_test_hook_runs_the_deployment_check_notebook(render):
    rendered = render("same-cluster")
    assert "telemetry-pipeline/templates/tests/deployment-check-job.yaml" in rendered.templates
    hooks = [w for w in rendered.workloads() if w["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"]
    assert len(hooks) == 1
    (hook,) = hooks
    assert hook["kind"] in ("Pod", "Job")
    spec = pod_spec(hook)
    assert spec["restartPolicy"] == "Never"
    c = main_container(hook)
    cmd = c["command"]
    assert cmd[:3] == ["papermill", "/app/notebooks/01_deployment_check.ipynb", "/tmp/out.ipynb"]
    params = papermill_params(cmd)
    assert params["api_url"] == f"http://{API_SVC}:8000"
    assert params["namespace"] == NAMESPACE
    assert params["release"] == RELEASE
    assert set(params["expected_components"].split(",")) == {
        "streamer", "collector", "api-gateway", "dashboard", "redis", "postgresql"}
    assert params["kube_context"] == "in-cluster"
    assert papermill_yaml(cmd) == {"expected": {"streamer": 2, "collector": 2, "api-gateway": 2, "dashboard": 1,
                                                "redis": 1, "postgresql": 1}}
    rendered.get("Service", API_SVC)
    # Its account may list the release's pods, nothing more.
    sa = spec["serviceAccountName"]
    binding = next(b for b in rendered.of_kind("RoleBinding") if b["subjects"][0]["name"] == sa)
    role = rendered.get("Role", binding["roleRef"]["name"])
    verbs = {v for rule in role["rules"] for v in rule["verbs"]}
    assert verbs <= {"get", "list", "watch"} and "pods" in role["rules"][0]["resources"]


def test_helm_test_hook_on_edge_checks_streamers_only(render):
    hook = render("edge").one("deployment-check")
    params = papermill_params(main_container(hook)["command"])
    assert params["api_url"] == ""
    assert params["expected_components"] == "streamer"
    assert papermill_yaml(main_container(hook)["command"]) == {"expected": {"streamer": 1}}  # one scraper
    hook = render("ingress-hpa-networkpolicy").one("deployment-check")
    assert papermill_yaml(main_container(hook)["command"])["expected"]["collector"] == 3  # the HPA's minimum


def test_helm_test_can_be_disabled(render):
    assert not render({"tests": {"enabled": False}}).by_component("deployment-check")


def test_deployment_check_notebook_takes_the_hook_parameters(render):
    """When notebooks/01_deployment_check.ipynb exists, its parameters cell declares what the hook passes."""
    nb_path = REPO / "notebooks" / "01_deployment_check.ipynb"
    if not nb_path.is_file():
        pytest.skip("notebooks/01_deployment_check.ipynb is not in the repository yet")
    nb = json.loads(nb_path.read_text())
    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert cells, "the notebook needs a cell tagged 'parameters' for papermill"
    source = "".join(cells[0]["source"])
    hook = render("same-cluster").one("deployment-check")
    for name in ("api_url", "namespace"):
        assert name in papermill_params(main_container(hook)["command"])
        assert re.search(rf"^{name}\s*=", source, re.M), f"parameters cell does not define {name}"


# -------------------------------------------------------------------- values files --------


def test_values_files_describe_the_three_layouts():
    same = values_file("values.yaml")
    edge = values_file("values-edge-cluster.yaml")
    central = values_file("values-central-cluster.yaml")
    hybrid = values_file("values-hybrid.yaml")
    assert same["redis"]["enabled"] and same["postgresql"]["enabled"] and same["streamer"]["enabled"]
    assert edge["streamer"]["enabled"] and not edge["collector"]["enabled"] and not edge["redis"]["enabled"]
    assert not central["streamer"]["enabled"] and central["postgresql"]["enabled"] and not central["redis"]["enabled"]
    assert hybrid["streamer"]["enabled"] and not hybrid["redis"]["enabled"] and not hybrid["postgresql"]["enabled"]
    for doc in (same, edge, central, hybrid):
        yaml.safe_dump(doc)  # plain data, no anchors trickery


# ------------------------------------------------------------------------ API tokens -------


API_TOKENS = f"{PREFIX}-api-tokens"
GIVEN_TOKENS = ["tnb-chart-token-aaaaaaaaaaaa", "tnb-chart-token-bbbbbbbbbbbb"]


def _outside_secrets(rendered: Rendered) -> str:
    """Everything rendered except Secret objects: other manifests (as YAML) and NOTES.txt."""
    docs = [yaml.safe_dump(d) for d in rendered.docs if d["kind"] != "Secret"]
    notes = [t for path, t in rendered.templates.items() if not path.endswith((".yaml", ".yml"))]
    return "\n".join(docs + notes)


@pytest.mark.parametrize("scenario", [*SCENARIOS, "given-tokens"])
def test_api_token_never_appears_outside_secrets(render, scenario):
    values = {"apiAuth": {"tokens": GIVEN_TOKENS}} if scenario == "given-tokens" else scenario_values(scenario)
    rendered = render(values)
    tokens = [t for t in (rendered.secret_value(API_TOKENS, "tokens") or "").splitlines() if t]
    if scenario == "given-tokens":
        assert tokens == GIVEN_TOKENS and rendered.secret_value(API_TOKENS, "token") == GIVEN_TOKENS[0]
    text = _outside_secrets(rendered)
    for token in tokens:
        assert token not in text


def test_api_tokens_are_generated_and_reach_gateway_dashboard_and_helm_test(render):
    rendered = render("same-cluster")
    token = rendered.secret_value(API_TOKENS, "token")
    assert token and len(token) >= 32 and rendered.secret_value(API_TOKENS, "tokens") == token
    api = rendered.one("api-gateway")
    env = env_of(main_container(api))
    path = env["TELEMETRY_API_TOKENS_FILE"]["value"]
    mount = next(m for m in main_container(api)["volumeMounts"] if m["name"] == "api-tokens")
    assert path == f"{mount['mountPath']}/tokens" and mount["readOnly"] and "subPath" not in mount
    volume = next(v for v in pod_spec(api)["volumes"] if v["name"] == "api-tokens")
    assert volume["secret"] == {"secretName": API_TOKENS, "items": [{"key": "tokens", "path": "tokens"}]}
    for component in ("dashboard", "deployment-check"):
        env = env_of(main_container(rendered.one(component)))
        assert env["TELEMETRY_API_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": API_TOKENS, "key": "token"}
    notes = next(t for p, t in rendered.templates.items() if p.endswith("NOTES.txt"))
    assert f"get secret {API_TOKENS} -o jsonpath='{{.data.token}}' | base64 -d" in notes
    assert 'Authorization: Bearer $TOKEN' in notes


def test_api_auth_off_or_from_an_existing_secret(render):
    off = render({"apiAuth": {"enabled": False}})
    assert not [s for s in off.of_kind("Secret") if s["metadata"]["name"] == API_TOKENS]
    assert "TELEMETRY_API_TOKENS_FILE" not in env_of(main_container(off.one("api-gateway")))
    assert "TELEMETRY_API_TOKEN" not in env_of(main_container(off.one("dashboard")))
    assert "bearer token" not in next(t for p, t in off.templates.items() if p.endswith("NOTES.txt"))
    own = render({"apiAuth": {"existingSecret": "my-api-tokens", "existingSecretTokensKey": "accepted",
                              "existingSecretClientKey": "mine"}})
    assert not [s for s in own.of_kind("Secret") if "api-tokens" in s["metadata"]["name"]]
    volume = next(v for v in pod_spec(own.one("api-gateway"))["volumes"] if v["name"] == "api-tokens")
    assert volume["secret"] == {"secretName": "my-api-tokens", "items": [{"key": "accepted", "path": "tokens"}]}
    env = env_of(main_container(own.one("dashboard")))
    assert env["TELEMETRY_API_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "my-api-tokens", "key": "mine"}


def test_edge_cluster_without_api_has_no_token_secret(render):
    rendered = render("edge")
    assert "api-gateway" not in rendered.components()
    assert not [s for s in rendered.of_kind("Secret") if s["metadata"]["name"] == API_TOKENS]

"""Helpers for the k8s tests: prerequisites, rendering the chart with the real Helm engine, and
walking the rendered manifests."""

from __future__ import annotations

import base64
import copy
import os
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
CHART_DIR = K8S / "helm" / "telemetry-pipeline"
SCRIPTS_DIR = K8S / "scripts"
IN_CI = os.environ.get("CI") == "true"

WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "Pod")
APP_COMPONENTS = ("streamer", "collector", "api-gateway", "dashboard")


def require(condition: object, reason: str) -> None:
    """A missing prerequisite fails the test under CI=true and skips it (with the reason) elsewhere."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"prerequisite missing under CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


# ----------------------------------------------------------------------------- values -------


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Helm's coalescing for user values: maps merge recursively, everything else is replaced."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def values_file(name: str) -> dict[str, Any]:
    """A values file of the chart, as `helm -f` would read it."""
    data = yaml.safe_load((CHART_DIR / name).read_text())
    return data or {}


def nested(path: str, value: Any) -> dict[str, Any]:
    """`a.b.c`, v -> {"a": {"b": {"c": v}}} (what `--set-string a.b.c=v` means)."""
    keys = path.split(".")
    out: dict[str, Any] = {keys[-1]: value}
    for key in reversed(keys[:-1]):
        out = {key: out}
    return out


def helm_values_from_argv(helm_module: Any, argv: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The user values a `helm upgrade --install ...` command line amounts to, and its other flags.

    -f files merge in order, then --set / --set-string in order (they win over files, as in Helm).
    """
    files: list[str] = []
    sets: list[tuple[str, str]] = []
    flags: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-f", "--values"):
            files.append(argv[i + 1])
            i += 2
        elif arg in ("--set", "--set-string"):
            sets.append((arg, argv[i + 1]))
            i += 2
        elif arg in ("--kube-context", "--namespace", "-n", "--timeout"):
            flags[arg] = argv[i + 1]
            i += 2
        else:
            i += 1
    values: dict[str, Any] = {}
    for f in files:
        values = deep_merge(values, yaml.safe_load(Path(f).read_text()) or {})
    for kind, expr in sets:
        if kind == "--set":
            values = deep_merge(values, helm_module.parse_set_string(expr))
        else:
            key, _, val = expr.partition("=")
            values = deep_merge(values, nested(key, val))
    return values, flags


def traced_commands(output: str) -> list[list[str]]:
    """The `+ cmd args` lines a script printed, split like the shell would (comments dropped)."""
    return [shlex.split(line[2:], comments=True) for line in output.splitlines() if line.startswith("+ ")]


# ---------------------------------------------------------------------------- manifests -----


class Rendered:
    """The parsed manifests of one render, with lookups the tests need."""

    def __init__(self, manifests: dict[str, str]):
        self.templates = manifests
        self.docs: list[dict[str, Any]] = []
        self.source: dict[int, str] = {}
        for path, text in sorted(manifests.items()):
            if not path.endswith((".yaml", ".yml")):
                continue
            for doc in yaml.safe_load_all(text):
                if doc:
                    self.source[id(doc)] = path
                    self.docs.append(doc)

    def of_kind(self, *kinds: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] in kinds]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        for d in self.docs:
            if d["kind"] == kind and d["metadata"]["name"] == name:
                return d
        raise KeyError(f"no {kind}/{name} rendered; have {[(d['kind'], d['metadata']['name']) for d in self.docs]}")

    def workloads(self) -> list[dict[str, Any]]:
        return self.of_kind(*WORKLOAD_KINDS)

    def by_component(self, component: str, *kinds: str) -> list[dict[str, Any]]:
        kinds = kinds or WORKLOAD_KINDS
        return [d for d in self.of_kind(*kinds)
                if d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component]

    def one(self, component: str, *kinds: str) -> dict[str, Any]:
        found = self.by_component(component, *kinds)
        assert len(found) == 1, f"expected one {kinds or 'workload'} of component {component}, got {len(found)}"
        return found[0]

    def components(self) -> set[str]:
        """Components that have a workload (hook pods excluded)."""
        return {d["metadata"]["labels"]["app.kubernetes.io/component"] for d in self.workloads()
                if "helm.sh/hook" not in d["metadata"].get("annotations", {})}

    def env_configmap(self) -> dict[str, str]:
        cms = [d for d in self.of_kind("ConfigMap") if d["metadata"]["name"].endswith("-env")]
        assert len(cms) == 1, "expected exactly one <release>-env ConfigMap"
        return cms[0]["data"]

    def secret_value(self, name: str, key: str) -> str | None:
        for d in self.of_kind("Secret"):
            if d["metadata"]["name"] == name:
                if key in d.get("data", {}):
                    return base64.b64decode(d["data"][key]).decode()
                if key in d.get("stringData", {}):
                    return d["stringData"][key]
        return None

    def secret_values(self) -> list[str]:
        out = []
        for d in self.of_kind("Secret"):
            out += [base64.b64decode(v).decode() for v in d.get("data", {}).values()]
            out += list(d.get("stringData", {}).values())
        return out


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    kind = workload["kind"]
    if kind == "Pod":
        return workload["spec"]
    if kind == "CronJob":
        return workload["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return workload["spec"]["template"]["spec"]


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    if workload["kind"] == "Pod":
        return workload["metadata"]["labels"]
    if workload["kind"] == "CronJob":
        return workload["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    return workload["spec"]["template"]["metadata"]["labels"]


def containers(workload: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = pod_spec(workload)
    yield from spec.get("initContainers", []) or []
    yield from spec.get("containers", []) or []
    yield from spec.get("ephemeralContainers", []) or []


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", []) or []}


def main_container(workload: dict[str, Any]) -> dict[str, Any]:
    cs = pod_spec(workload)["containers"]
    assert len(cs) == 1, f"{workload['metadata']['name']}: expected one container"
    return cs[0]

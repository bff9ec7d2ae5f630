"""The fixed dataset and live stack the recorded notebooks run on (shared by the tests and `tests.notebooks.record`).

The data: the real DCGM export (247 GPUs, 2025-07-18T20:42:34Z–20:42:37Z) and a generated fleet with a fixed seed and
fixed timestamps (2 hosts x 4 GPUs, every 10 s from 2025-07-18T21:00:00Z for 10 minutes). Nothing depends on `now`:
notebooks get fixed windows as parameters, everything else defaults from the stack's environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
import redis

from telemetry_nb.embedded import free_port
from telemetry_nb.pipeline.streams import Queue
from tests.conftest import REPO, Servers, run_cli, start_cli, wait_http

RECORDED = REPO / "tests" / "notebooks" / "recorded"
SANITIZE = RECORDED / "sanitize.cfg"
GENERATED = ["--hosts", "2", "--gpus-per-host", "4", "--seed", "11", "--duration", "10m", "--interval", "10s",
             "--start", "2025-07-18T21:00:00Z"]
GENERATED_ROWS = 2 * 4 * 10 * 60
REAL_ROWS = 2470

# notebook -> its fixed parameters; the rest (API, Redis, PostgreSQL, stream) default from the stack's environment
NOTEBOOKS: dict[str, dict[str, object]] = {
    "01_deployment_check.ipynb": {"max_staleness_s": None, "report_path": "deployment_check.json"},
    "02_data_flow_verification.ipynb": {"rows": 50, "spacing_s": 0.05, "report_path": "data_flow_report.json"},
    "03_gpu_telemetry_exploration.ipynb": {"start_time": "2025-07-18T21:00:00Z", "end_time": "2025-07-18T21:10:00Z"},
}


def write_kernelspec(root: Path) -> dict[str, str]:
    """A `python3` kernelspec for this interpreter under `root`; returns the environment that selects it."""
    spec = root / "kernels" / "python3"
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (telemetry-nb tests)", "language": "python", "metadata": {"debugger": False}}))
    return {"JUPYTER_PATH": os.pathsep.join(p for p in (str(root), os.environ.get("JUPYTER_PATH", "")) if p),
            "JUPYTER_PLATFORM_DIRS": "1", "PYDEVD_DISABLE_FILE_VALIDATION": "1"}


@dataclass
class FixtureStack:
    api_url: str
    env: dict[str, str]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)


def _until(what: str, fn, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not fn():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.2)


@contextmanager
def fixture_stack(servers: Servers, tmp: Path, kernel_env: dict[str, str], real_csv: Path) -> Iterator[FixtureStack]:
    """A database and stream of their own holding exactly the fixture, a running collector and the API."""
    name, stream = f"rec_{uuid.uuid4().hex[:10]}", f"recorded-{uuid.uuid4().hex[:10]}"
    admin = servers.database("postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    port = free_port()
    api_url = f"http://127.0.0.1:{port}"
    (tmp / "home").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **kernel_env, "REDIS_URL": servers.redis_url, "DATABASE_URL": servers.database(name),
           "TELEMETRY_STREAM": stream, "TELEMETRY_NB_HOME": str(tmp / "home"), "TELEMETRY_API_URL": api_url,
           "PYTHONUNBUFFERED": "1",
           # a fixed 2025 dataset: the maintainer's retention (counted back from now) would drop it a minute in
           "TELEMETRY_RETENTION_RAW": "0", "TELEMETRY_RETENTION_1M": "0", "TELEMETRY_RETENTION_1H": "0"}
    env.pop("REDIS_PASSWORD", None)
    s = FixtureStack(api_url, env)
    client = redis.Redis.from_url(servers.redis_url)
    try:
        generated = tmp / "generated.csv"
        run_cli("generate", *GENERATED, "--out", str(generated), env=env)
        s.procs["collector"] = start_cli("collect", env=env, log_path=tmp / "collector.log")
        s.procs["api"] = start_cli("serve", "--port", str(port), env=env, log_path=tmp / "api.log")
        run_cli("stream", "--csv", str(real_csv), env=env)
        run_cli("stream", "--csv", str(generated), env=env)
        wait_http(f"{api_url}/health")
        want = REAL_ROWS + GENERATED_ROWS
        queue = Queue(client, stream, "collectors")
        _until(f"{want} rows stored and acknowledged", lambda: _stored(api_url) == want and queue.backlog() == 0)
        yield s
    finally:
        stop_stack(s.procs.values(), admin, name)
        client.delete(stream, f"{stream}:dead", f"{stream}:rejected")
        client.close()


def stop_stack(procs, admin_url: str, database: str) -> None:
    """Stop a test stack's processes (killed after 20 s) and drop its database."""
    procs = list(procs)
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


def _stored(api_url: str) -> int:
    return sum(m["rows"] for m in httpx.get(f"{api_url}/api/v1/metrics", timeout=10).json()["items"])

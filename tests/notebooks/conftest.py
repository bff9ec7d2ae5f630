"""A live stack for the notebook tests: 1M+ rows in PostgreSQL, collector, API and a live streamer.

Session-scoped, on the session's servers (`servers`), with a database and stream of its own:
  - a generated history of 16 hosts x 8 GPUs, 10 metrics, every second for 800 s ending now (1,024,000 rows),
  - the real DCGM export (247 GPUs that stopped reporting in 2025),
  - a collector and the API running, and a streamer replaying the same GPUs live every 5 s.
Notebooks run with papermill in-process, on a `python3` kernel pinned to this interpreter.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg
import pytest
import redis

from telemetry_nb.embedded import free_port
from tests.conftest import REPO, run_cli, start_cli, wait_http
from tests.notebooks.fixture import FixtureStack, fixture_stack, stop_stack, write_kernelspec

NOTEBOOKS = REPO / "notebooks"
HOSTS, GPUS_PER_HOST, HISTORY_S, SEED = 16, 8, 800, 7
HISTORY_ROWS = HOSTS * GPUS_PER_HOST * 10 * HISTORY_S


@dataclass
class Stack:
    api_url: str
    redis_url: str
    database_url: str
    stream: str
    env: dict[str, str]
    history_csv: Path
    real_csv: Path
    tmp: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)


@pytest.fixture(scope="session")
def kernel_env(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A `python3` kernelspec for this interpreter on a private JUPYTER_PATH (for papermill, nbval, Voilà)."""
    extra = write_kernelspec(tmp_path_factory.mktemp("jupyter"))
    with pytest.MonkeyPatch.context() as mp:
        for k, v in extra.items():
            mp.setenv(k, v)
        yield extra


@pytest.fixture(scope="session")
def recorded_stack(servers, real_csv, kernel_env, tmp_path_factory) -> Iterator[FixtureStack]:
    """The fixed fixture (tests/notebooks/fixture.py) the recorded notebooks were recorded on, live."""
    with fixture_stack(servers, tmp_path_factory.mktemp("recorded"), kernel_env, real_csv) as s:
        yield s


def _wait_for(what: str, fn, timeout_s: float = 120, interval_s: float = 0.25):
    deadline = time.monotonic() + timeout_s
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


def stored_rows(api_url: str) -> int:
    return sum(m["rows"] for m in httpx.get(f"{api_url}/api/v1/metrics", timeout=10).json()["items"])


@pytest.fixture(scope="session")
def stack(servers, real_csv, kernel_env, tmp_path_factory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("stack")
    name = f"nb_{uuid.uuid4().hex[:10]}"
    admin = servers.database("postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    database_url, stream, port = servers.database(name), f"nb-{uuid.uuid4().hex[:10]}", free_port()
    api_url = f"http://127.0.0.1:{port}"
    env = {**os.environ, **kernel_env, "REDIS_URL": servers.redis_url, "DATABASE_URL": database_url,
           "TELEMETRY_STREAM": stream, "TELEMETRY_NB_HOME": str(tmp / "home"), "TELEMETRY_API_URL": api_url,
           "PYTHONUNBUFFERED": "1",
           # the stack mixes live data with the 2025 export: keep every sample (retention counts back from now)
           "TELEMETRY_RETENTION_RAW": "0", "TELEMETRY_RETENTION_1M": "0", "TELEMETRY_RETENTION_1H": "0"}
    (tmp / "home").mkdir()
    start = (datetime.now(UTC) - timedelta(seconds=HISTORY_S)).replace(microsecond=0)
    history, live = tmp / "history.csv", tmp / "live.csv"
    common = ["--hosts", str(HOSTS), "--gpus-per-host", str(GPUS_PER_HOST), "--seed", str(SEED)]
    run_cli("generate", *common, "--duration", f"{HISTORY_S}s", "--interval", "1s", "--start", start.isoformat(),
            "--out", str(history), env=env)
    run_cli("generate", *common, "--duration", "10m", "--interval", "5s", "--out", str(live), env=env)
    s = Stack(api_url, servers.redis_url, database_url, stream, env, history, real_csv, tmp)
    try:
        s.procs["collector"] = start_cli("collect", env=env, log_path=tmp / "collector.log")
        s.procs["api"] = start_cli("serve", "--port", str(port), env=env, log_path=tmp / "api.log")
        run_cli("stream", "--csv", str(history), env=env)
        run_cli("stream", "--csv", str(real_csv), env=env)
        wait_http(f"{api_url}/health")
        want = HISTORY_ROWS + 2470
        _wait_for(f"{want} rows stored", lambda: stored_rows(api_url) >= want)
        s.procs["streamer"] = start_cli("stream", "--csv", str(live), "--loop", "--timestamps", "now", env=env,
                                        log_path=tmp / "streamer.log")
        yield s
    finally:
        stop_stack(s.procs.values(), admin, name)
        client = redis.Redis.from_url(servers.redis_url)
        client.delete(stream, f"{stream}:dead", f"{stream}:rejected")
        client.close()


def run_notebook(name: str, out_dir: Path, **parameters):
    """Execute notebooks/<name> with papermill (kernel `python3`, cwd `out_dir`); returns the executed notebook."""
    import papermill as pm

    out_dir.mkdir(parents=True, exist_ok=True)
    return pm.execute_notebook(str(NOTEBOOKS / name), str(out_dir / name), parameters=parameters,
                               kernel_name="python3", cwd=str(out_dir), progress_bar=False,
                               execution_timeout=300)

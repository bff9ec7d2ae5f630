"""Shared fixtures: real Redis and PostgreSQL (embedded, or REDIS_URL/DATABASE_URL), fresh names per test."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
import pytest
import redis

from telemetry_nb.embedded import Embedded, free_port

REPO = Path(__file__).resolve().parent.parent
REAL_CSV = REPO.parent / "shared" / "data" / "dcgm_metrics_20250718_134233.csv"
IN_CI = os.environ.get("CI") == "true"
# API servers the tests start run one worker process unless a test asks for more (`serve` defaults to one
# per CPU: N interpreters per test server would only slow the suite; tests/test_api_load.py covers the default)
os.environ.setdefault("TELEMETRY_API_WORKERS", "1")


def require(condition: bool, reason: str) -> None:
    """Skip outside CI when a prerequisite is missing; in CI (CI=true) a missing prerequisite fails."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"prerequisite missing in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def real_csv() -> Path:
    require(REAL_CSV.is_file(), f"real DCGM export not found at {REAL_CSV}")
    return REAL_CSV


@dataclass
class Servers:
    redis_url: str
    database_url: str
    home: Path | None

    def database(self, name: str) -> str:
        """URL of database `name` on the same server."""
        parts = urlsplit(self.database_url)
        return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


@pytest.fixture(scope="session")
def servers(tmp_path_factory) -> Iterator[Servers]:
    """The servers under test: $REDIS_URL/$DATABASE_URL when set, else embedded ones started for the session."""
    redis_url, database_url = os.environ.get("REDIS_URL", ""), os.environ.get("DATABASE_URL", "")
    emb = None
    if not (redis_url and database_url):
        home = tmp_path_factory.mktemp("embedded")
        emb = Embedded(home)
        env = emb.env()
        redis_url, database_url = redis_url or env["REDIS_URL"], database_url or env["DATABASE_URL"]
    yield Servers(redis_url, database_url, emb.home if emb else None)
    if emb is not None:
        emb.stop()


@pytest.fixture
def redis_client(servers) -> redis.Redis:
    client = redis.Redis.from_url(servers.redis_url)
    yield client
    client.close()


@pytest.fixture
def stream(redis_client) -> Iterator[str]:
    """A stream name of this test alone; its keys are deleted afterwards."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    yield name
    redis_client.delete(name, f"{name}:dead", f"{name}:rejected", f"{name}:dead:total", f"{name}:rejected:total")


@pytest.fixture
def database_url(servers) -> Iterator[str]:
    """A fresh, empty database of this test alone, dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = servers.database("postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield servers.database(name)
    try:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    except psycopg.OperationalError as err:  # the server went first: the database went with it
        warnings.warn(f"could not drop test database {name}: {err}", stacklevel=1)


@pytest.fixture
def cli_env(servers, stream, database_url, tmp_path) -> dict[str, str]:
    """Environment for CLI subprocesses: this test's servers, stream and database."""
    return {**os.environ, "REDIS_URL": servers.redis_url, "DATABASE_URL": database_url,
            "TELEMETRY_STREAM": stream, "TELEMETRY_NB_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"}


def run_cli(*args: str, env: dict[str, str], timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run `telemetry-nb ARGS` the way a user does, in a subprocess."""
    proc = subprocess.run([sys.executable, "-m", "telemetry_nb.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"telemetry-nb {' '.join(args)} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def start_cli(*args: str, env: dict[str, str], log_path: Path | None = None) -> subprocess.Popen:
    out = open(log_path, "w") if log_path else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, "-m", "telemetry_nb.cli", *args], env=env, stdout=out,
                            stderr=subprocess.STDOUT)


def wait_http(url: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} did not come up within {timeout_s}s")
        time.sleep(0.2)


@contextmanager
def serving(env: dict[str, str], log_path: Path, *args: str) -> Iterator[str]:
    """`telemetry-nb serve [args]` on a free port with `env`, until the block ends; yields its base URL."""
    port = free_port()
    proc = start_cli("serve", "--port", str(port), *args, env=env, log_path=log_path)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + "/health")
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=15)


@pytest.fixture
def api_server(cli_env, tmp_path) -> Iterator[str]:
    """`telemetry-nb serve` on a free port over this test's database; yields its base URL."""
    with serving(cli_env, tmp_path / "api.log") as base:
        yield base

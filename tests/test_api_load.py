"""The API under load: worker count and connection budget, and the fast 503 + Retry-After of an overloaded
worker, made deterministic by holding its only database connection on a table lock (no clocks involved)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import psycopg
import pytest

from telemetry_nb import store
from telemetry_nb.analysis.client import APIError, TelemetryClient
from telemetry_nb.api.limits import ApiLimits, default_workers, serve_workers
from telemetry_nb.embedded import free_port
from tests.conftest import serving


def test_workers_default_to_the_cpus_this_process_may_use():
    assert default_workers() == len(os.sched_getaffinity(0))
    assert serve_workers(None, {}) == default_workers()
    assert serve_workers(None, {"TELEMETRY_API_WORKERS": "3"}) == 3
    assert serve_workers(2, {"TELEMETRY_API_WORKERS": "3"}) == 2  # the flag wins
    with pytest.raises(ValueError, match="TELEMETRY_API_WORKERS must be at least 1"):
        serve_workers(None, {"TELEMETRY_API_WORKERS": "0"})


def test_connection_budget_is_split_among_the_workers():
    assert ApiLimits.from_env({}, workers=3) == ApiLimits(pool_size=4, queue_timeout_s=0.5, max_waiting=64)
    limits = ApiLimits.from_env({"TELEMETRY_API_DB_CONNECTIONS": "10", "TELEMETRY_API_QUEUE_TIMEOUT": "250ms",
                                 "TELEMETRY_API_MAX_WAITING": "0"}, workers=4)
    assert (limits.pool_size, limits.queue_timeout_s, limits.max_waiting) == (2, 0.25, 0)
    assert ApiLimits.from_env({"TELEMETRY_API_DB_CONNECTIONS": "2"}, workers=8).pool_size == 1
    with pytest.raises(ValueError, match="TELEMETRY_API_QUEUE_TIMEOUT"):
        ApiLimits.from_env({"TELEMETRY_API_QUEUE_TIMEOUT": "soon"})
    with pytest.raises(ValueError, match="TELEMETRY_API_DB_CONNECTIONS must be an integer"):
        ApiLimits.from_env({"TELEMETRY_API_DB_CONNECTIONS": "many"})


def _serve(cli_env: dict[str, str], log_path, **limits: str):
    return serving({**cli_env, **limits}, log_path, "--workers", "1")


@contextmanager
def _locked(database_url: str, table: str = "gpus") -> Iterator[psycopg.Connection]:
    """`table` locked by another session: a request reading it holds its connection until release."""
    with psycopg.connect(database_url) as conn:
        conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        yield conn
        conn.rollback()


def _wait_for_blocked_api_query(database_url: str, deadline_s: float = 30) -> None:
    """Until a backend of this database waits on a lock (the first request holds the API's connection)."""
    name = database_url.rsplit("/", 1)[1]
    give_up = time.monotonic() + deadline_s
    with psycopg.connect(database_url, autocommit=True) as conn:
        while conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'",
                           (name,)).fetchone()[0] == 0:
            assert time.monotonic() < give_up, "the first request never reached the database"
            time.sleep(0.05)


def _in_thread(fn) -> tuple[threading.Thread, dict]:
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(result=fn()), daemon=True)
    t.start()
    return t, out


@pytest.fixture
def migrated(database_url) -> str:
    with psycopg.connect(database_url, autocommit=True) as conn:
        store.migrate(conn)
    return database_url


def test_a_worker_with_its_connection_busy_answers_503_with_retry_after_at_once(migrated, cli_env, tmp_path):
    with _serve(cli_env, tmp_path / "api.log", TELEMETRY_API_DB_CONNECTIONS="1", TELEMETRY_API_MAX_WAITING="0",
                TELEMETRY_API_QUEUE_TIMEOUT="60s") as base, _locked(migrated) as lock:
        first, out = _in_thread(lambda: httpx.get(f"{base}/api/v1/gpus", timeout=60))
        _wait_for_blocked_api_query(migrated)
        metrics = httpx.get(f"{base}/metrics").text
        assert "api_requests_running 1.0" in metrics and "api_requests_waiting 0.0" in metrics
        r = httpx.get(f"{base}/api/v1/gpus/GPU-0/telemetry")
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["detail"] == ("overloaded: 0 requests already waiting for a database connection; "
                                      "retry later")
        assert httpx.get(f"{base}/health").status_code == 200  # the service routes are never gated

        # the notebook client honours Retry-After: here its wait is the moment the slow request finishes
        waits: list[float] = []

        def release(seconds: float) -> None:
            waits.append(seconds)
            lock.rollback()
            first.join(60)

        with TelemetryClient(base, sleep=release) as client:
            assert client.gpus() == []
        assert waits == [1.0]
        assert out["result"].status_code == 200 and out["result"].json()["items"] == []
        assert 'api_requests_total{route="overloaded",status="503"} 2.0' in httpx.get(f"{base}/metrics").text


def test_a_request_waits_for_a_connection_at_most_the_queue_timeout(migrated, cli_env, tmp_path):
    with _serve(cli_env, tmp_path / "api.log", TELEMETRY_API_DB_CONNECTIONS="1", TELEMETRY_API_MAX_WAITING="1",
                TELEMETRY_API_QUEUE_TIMEOUT="100ms") as base:
        with _locked(migrated):
            first, out = _in_thread(lambda: httpx.get(f"{base}/api/v1/gpus", timeout=60))
            _wait_for_blocked_api_query(migrated)
            r = httpx.get(f"{base}/api/v1/gpus", timeout=60)
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert r.json()["detail"] == "overloaded: no database connection free within 0.1s; retry later"
            with TelemetryClient(base, retries=0) as client, pytest.raises(APIError) as err:
                client.gpus()
            assert err.value.status == 503
        first.join(60)
        assert out["result"].status_code == 200


def test_heavy_routes_hold_at_most_half_of_the_connections(migrated, cli_env, tmp_path):
    """A fleet view in flight takes the one heavy slot of two connections: the next fleet view is refused,
    a cheap request still runs."""
    with _serve(cli_env, tmp_path / "api.log", TELEMETRY_API_DB_CONNECTIONS="2", TELEMETRY_API_MAX_WAITING="0",
                TELEMETRY_API_QUEUE_TIMEOUT="60s") as base:
        fleet = f"{base}/api/v1/fleet/aggregate?metric=DCGM_FI_DEV_GPU_UTIL"
        with _locked(migrated, "metrics"):
            first, out = _in_thread(lambda: httpx.get(fleet, timeout=60))
            _wait_for_blocked_api_query(migrated)
            r = httpx.get(fleet)
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert httpx.get(f"{base}/api/v1/gpus/GPU-0").status_code == 404  # a light request gets through
        first.join(60)
        assert out["result"].status_code == 422  # no such metric stored: the request ran to its answer


def test_an_unreachable_database_is_a_503_with_retry_after(cli_env, tmp_path):
    nowhere = f"postgresql://postgres@127.0.0.1:{free_port()}/none"  # nothing listens there
    with _serve({**cli_env, "DATABASE_URL": nowhere}, tmp_path / "api.log") as base:
        r = httpx.get(f"{base}/api/v1/gpus", timeout=60)
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["detail"].startswith("database unavailable: ")

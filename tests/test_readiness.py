"""/ready of streamer and collector: 503 while Redis or PostgreSQL is unreachable, 200 once it is back."""

from __future__ import annotations

import time
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from telemetry_nb.embedded import free_port
from telemetry_nb.observability import Readiness
from tests.conftest import start_cli
from tests.relay import Relay


def _via(relay: Relay, url: str) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")
    host = f"{netloc[0]}{netloc[1]}127.0.0.1:{relay.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def _relay(url: str) -> Relay:
    parts = urlsplit(url)
    return Relay((parts.hostname, parts.port))


def _ready(base: str) -> tuple[int, dict]:
    try:
        r = httpx.get(base + "/ready", timeout=5)
        return r.status_code, r.json()
    except httpx.HTTPError:
        return 0, {}


def _until(base: str, code: int, timeout_s: float = 30) -> dict:
    """Poll /ready until it answers `code` (a generous deadline, not a timing assertion)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status, body = _ready(base)
        if status == code:
            return body
        if time.monotonic() > deadline:
            pytest.fail(f"/ready did not answer {code} within {timeout_s}s (last: {status} {body})")
        time.sleep(0.2)


def test_collector_ready_follows_redis_and_postgres(cli_env, servers, database_url, tmp_path):
    redis_relay, pg_relay = _relay(servers.redis_url), _relay(database_url)
    port = free_port()
    env = {**cli_env, "REDIS_URL": _via(redis_relay, servers.redis_url), "DATABASE_URL": _via(pg_relay, database_url),
           "TELEMETRY_RETRY_MAX": "1"}
    proc = start_cli("collect", "--metrics-port", str(port), env=env, log_path=tmp_path / "collector.log")
    base = f"http://127.0.0.1:{port}"
    try:
        assert _until(base, 200)["detail"] == {"redis": "ok", "postgresql": "ok"}
        assert httpx.get(base + "/health", timeout=5).status_code == 200
        redis_relay.cut()
        body = _until(base, 503)
        assert body["failed"] == ["redis"] and body["status"] == "not ready"
        assert httpx.get(base + "/health", timeout=5).status_code == 200  # alive, only not ready
        redis_relay.restore()
        _until(base, 200)
        pg_relay.cut()
        assert _until(base, 503)["failed"] == ["postgresql"]
        pg_relay.restore()
        _until(base, 200)
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        redis_relay.close()
        pg_relay.close()


def test_streamer_ready_follows_redis(cli_env, servers, tmp_path, real_csv):
    relay = _relay(servers.redis_url)
    port = free_port()
    env = {**cli_env, "REDIS_URL": _via(relay, servers.redis_url), "TELEMETRY_RETRY_MAX": "1"}
    proc = start_cli("stream", "--csv", str(real_csv), "--loop", "--rate", "500", "--metrics-port", str(port),
                     env=env, log_path=tmp_path / "streamer.log")
    base = f"http://127.0.0.1:{port}"
    try:
        assert _until(base, 200)["detail"] == {"redis": "ok"}
        relay.cut()
        assert _until(base, 503)["failed"] == ["redis"]
        relay.restore()
        _until(base, 200)
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        relay.close()


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_readiness_is_cached_and_goes_stale():
    clock, calls = _Clock(), []
    state = {"up": True}

    def probe():
        calls.append(1)
        if not state["up"]:
            raise ConnectionError("connection refused")

    ready = Readiness({"redis": probe}, interval_s=1, stale_s=5, clock=clock)
    assert ready() == (False, {"redis": "not probed yet"})
    ready.probe_once()
    assert ready() == (True, {"redis": "ok"}) and ready() == (True, {"redis": "ok"})
    assert len(calls) == 1  # answering reads the cached result, it does not probe
    state["up"] = False
    ready.probe_once()
    assert ready() == (False, {"redis": "ConnectionError: connection refused"})
    state["up"] = True
    ready.probe_once()
    clock.t += 6  # no probe round finished for longer than stale_s: a hanging probe
    ok, detail = ready()
    assert not ok and "no probe result for 6s" in detail["redis"]

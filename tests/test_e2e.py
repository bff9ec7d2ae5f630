"""End to end through the real CLI, the way a user runs it: CSV → streamer → Redis → collector → PostgreSQL → API."""

from __future__ import annotations

import csv
import signal
import time
from collections import defaultdict

import httpx
import psycopg
import pytest

from telemetry_nb.timeparse import parse_timestamp
from tests.conftest import run_cli, start_cli


def _csv_rows(path) -> dict[str, list[tuple[str, str, float]]]:
    by_gpu: dict[str, list] = defaultdict(list)
    with open(path, newline="", encoding="utf-8-sig") as fh:
        for r in csv.DictReader(fh):
            ts = parse_timestamp(r["timestamp"]).isoformat().replace("+00:00", "Z")
            by_gpu[r["uuid"]].append((ts, r["metric_name"], float(r["value"])))
    return by_gpu


def _all_gpus(base: str) -> list[dict]:
    items, cursor = [], None
    while True:
        page = httpx.get(f"{base}/api/v1/gpus", params={"limit": 100, **({"cursor": cursor} if cursor else {})}).json()
        items += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return items


def test_real_export_end_to_end_exactly_once(cli_env, api_server, real_csv, database_url):
    out = run_cli("stream", "--csv", str(real_csv), env=cli_env)
    assert out.stdout.strip().splitlines()[-1] == "published=2470 rejected=0"
    assert "Published 2470 rows" in out.stderr
    col = run_cli("collect", "--drain", env=cli_env)
    assert "Consumed 2470 rows" in col.stderr and "Stored 2470 rows" in col.stderr

    expected = _csv_rows(real_csv)
    gpus = _all_gpus(api_server)
    assert len(gpus) == 247 and {g["uuid"] for g in gpus} == set(expected)
    assert len({g["hostname"] for g in gpus}) == 31
    uuid0 = "GPU-5fd4f087-86f3-7a43-b711-4771313afc50"
    one = next(g for g in gpus if g["uuid"] == uuid0)
    stamps = sorted(ts for ts, _, _ in expected[uuid0])
    assert one == {"uuid": uuid0, "hostname": "mtv5-dgx1-hgpu-031", "gpu_index": 0, "device": "nvidia0",
                   "model_name": "NVIDIA H100 80GB HBM3", "first_seen": stamps[0], "last_seen": stamps[-1],
                   # labels_raw kept: every static label (not __name__), the driver version from its label
                   "pci_bus_id": "", "driver_version": "535.129.03", "parent_uuid": None, "mig_profile": None,
                   "mig_instance": None,
                   "labels": {"DCGM_FI_DRIVER_VERSION": "535.129.03", "Hostname": "mtv5-dgx1-hgpu-031", "UUID": uuid0,
                              "device": "nvidia0", "gpu": "0", "instance": "mtv5-dgx1-hgpu-031:9400",
                              "job": "dgx_dcgm_exporter", "modelName": "NVIDIA H100 80GB HBM3"}}

    for uuid in sorted(expected)[::25]:  # every 25th GPU: exactly the CSV's rows, timestamps and values
        body = httpx.get(f"{api_server}/api/v1/gpus/{uuid}/telemetry").json()
        got = sorted((i["timestamp"], i["metric"], i["value"]) for i in body["items"])
        assert got == sorted(expected[uuid])
        assert body["gpu"]["uuid"] == uuid

    # streaming the same file again changes nothing
    run_cli("stream", "--csv", str(real_csv), env=cli_env)
    again = run_cli("collect", "--drain", env=cli_env)
    assert "Consumed 2470 rows" in again.stderr and "Stored 0 rows (2470 duplicates)" in again.stderr
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM telemetry").fetchone()[0] == 2470
    metrics = httpx.get(f"{api_server}/api/v1/metrics").json()["items"]
    assert len(metrics) == 10 and all(m["rows"] == 247 for m in metrics)


def test_sigkill_collector_mid_stream_then_another_drains(cli_env, tmp_path, database_url):
    csv_path = tmp_path / "big.csv"
    run_cli("generate", "--hosts", "10", "--gpus-per-host", "8", "--duration", "150s", "--interval", "1s",
            "--out", str(csv_path), env=cli_env)
    total = 10 * 8 * 150 * 10
    assert total >= 100_000
    # small entries, one per transaction: the victim needs seconds, so the kill lands mid-stream
    env = {**cli_env, "TELEMETRY_VISIBILITY_TIMEOUT": "2", "TELEMETRY_READ_COUNT": "1", "TELEMETRY_BATCH_SIZE": "100"}
    run_cli("stream", "--csv", str(csv_path), "--high-water", "0", env=env)
    victim = start_cli("collect", "--consumer", "victim", env=env, log_path=tmp_path / "victim.log")

    def stored() -> int:
        with psycopg.connect(database_url) as conn:
            try:
                return conn.execute("SELECT count(*) FROM telemetry").fetchone()[0]
            except psycopg.errors.UndefinedTable:
                return 0

    deadline = time.monotonic() + 60
    while stored() < 10_000:
        assert time.monotonic() < deadline, "collector made no progress"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    partial = stored()
    assert 0 < partial < total  # killed mid-stream

    heir = run_cli("collect", "--drain", "--consumer", "heir", env=env, timeout=300)
    assert "Drained" in heir.stderr
    with psycopg.connect(database_url) as conn:
        n, distinct = conn.execute(
            "SELECT count(*), count(DISTINCT (gpu_id, ts, metric_id)) FROM telemetry").fetchone()
    assert n == distinct == total


@pytest.mark.parametrize("path", ["/health", "/openapi.json", "/docs", "/metrics"])
def test_service_endpoints(api_server, path):
    r = httpx.get(api_server + path)
    assert r.status_code == 200
    if path == "/openapi.json":
        assert "/api/v1/gpus/{uuid}/telemetry" in r.json()["paths"]
    if path == "/metrics":
        assert "api_requests" in r.text


def test_streamer_and_collector_expose_metrics_and_health(cli_env, real_csv, tmp_path):
    from telemetry_nb.embedded import free_port
    from tests.conftest import wait_http

    port = free_port()
    run_cli("stream", "--csv", str(real_csv), env=cli_env)
    proc = start_cli("collect", "--metrics-port", str(port), env=cli_env, log_path=tmp_path / "c.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/health")
        deadline = time.monotonic() + 30
        while "telemetry_rows_stored_total 2470.0" not in (text := httpx.get(f"http://127.0.0.1:{port}/metrics").text):
            assert time.monotonic() < deadline, text
            time.sleep(0.2)
        assert "telemetry_consumer_lag" in text and "telemetry_batch_seconds_bucket" in text
        assert httpx.get(f"http://127.0.0.1:{port}/ready").json()["status"] == "ready"
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0  # SIGTERM is a clean stop


def test_streamer_memory_stays_flat_on_a_big_file(cli_env, tmp_path):
    """Peak RSS of the streamer and its parser workers stays far below 200 MB for a 90 MB export."""
    import subprocess
    import sys

    from telemetry_nb.observability import peak_rss_kib

    path = tmp_path / "big.csv"
    run_cli("generate", "--hosts", "20", "--gpus-per-host", "8", "--duration", "125s", "--out", str(path),
            env=cli_env)
    assert path.stat().st_size > 80e6
    proc = subprocess.Popen([sys.executable, "-m", "telemetry_nb.cli", "stream", "--csv", str(path),
                             "--high-water", "0", "--workers", "2"], env=cli_env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, peak_rss_kib(proc.pid))
        time.sleep(0.02)
    assert proc.returncode == 0
    assert 20 * 1024 < peak < 200 * 1024, f"peak RSS {peak / 1024:.0f} MB"

"""telemetry_nb.analysis.client against a real API over the real DCGM export, streamed and collected first."""

from __future__ import annotations

import csv
from collections import defaultdict
from datetime import UTC, datetime, timedelta

import pytest

from telemetry_nb import store
from telemetry_nb.analysis.client import APIError, Gpu, TelemetryClient, format_bucket, format_ts, parse_ts
from telemetry_nb.embedded import free_port
from tests.conftest import run_cli, start_cli, wait_http


@pytest.fixture
def loaded(cli_env, api_server, real_csv):
    """The API over a database holding the real export; yields (client, rows of the CSV as dicts)."""
    run_cli("stream", "--csv", str(real_csv), env=cli_env)
    run_cli("collect", "--drain", env=cli_env)
    with open(real_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    with TelemetryClient(api_server) as client:
        yield client, rows


def test_inventory_follows_every_cursor_and_matches_the_export(loaded):
    client, rows = loaded
    by_uuid = {r["uuid"]: r for r in rows}
    gpus = client.gpus(page_size=40)  # 247 GPUs: 7 pages
    assert len(gpus) == len({g.uuid for g in gpus}) == len(by_uuid) == 247
    assert [g.uuid for g in gpus] == sorted(by_uuid)
    g = gpus[0]
    assert isinstance(g, Gpu) and isinstance(g.last_seen, datetime) and g.last_seen.tzinfo is not None
    src = by_uuid[g.uuid]
    assert (g.hostname, g.gpu_index, g.device, g.model_name) == (src["Hostname"], int(src["gpu_id"]), src["device"],
                                                                 src["modelName"])
    one = client.gpu(g.uuid)
    assert one == g
    host = src["Hostname"]
    on_host = client.gpus(hostname=host)
    assert {x.uuid for x in on_host} == {r["uuid"] for r in rows if r["Hostname"] == host}
    assert client.gpus(model_name="no such model") == []
    assert {m.name: m.rows for m in client.metrics()} == {name: 247 for name in {r["metric_name"] for r in rows}}


def test_telemetry_values_are_the_exported_ones_across_pages(loaded):
    client, rows = loaded
    want = defaultdict(dict)
    for r in rows:
        want[r["uuid"]][(r["metric_name"], parse_ts(r["timestamp"]))] = float(r["value"])
    uuid = sorted(want)[3]
    full = client.telemetry(uuid)
    assert full.gpu.uuid == uuid
    assert {(p.metric, p.timestamp): p.value for p in full.items} == want[uuid]
    paged = client.telemetry(uuid, page_size=3)  # 10 rows: 4 pages
    assert paged.items == full.items
    assert [p.timestamp for p in full.items] == sorted(p.timestamp for p in full.items)
    util = client.telemetry(uuid, metric="DCGM_FI_DEV_GPU_UTIL")
    assert [p.metric for p in util.items] == ["DCGM_FI_DEV_GPU_UTIL"]
    two = client.telemetry(uuid, metric=["DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_GPU_TEMP"])
    assert {p.metric for p in two.items} == {"DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_GPU_TEMP"}
    first = full.items[0].timestamp
    after = client.telemetry(uuid, start_time=(first + timedelta(seconds=1)).replace(tzinfo=None))  # naive = UTC
    assert after.items and all(p.timestamp > first for p in after.items)
    assert len(client.telemetry(uuid, max_rows=4).items) == 4
    empty = client.telemetry(uuid, end_time="2000-01-01T00:00:00Z")
    assert empty.items == [] and empty.gpu.uuid == uuid


def test_aggregate_is_computed_by_the_server(loaded):
    client, rows = loaded
    uuid = rows[0]["uuid"]
    agg = client.aggregate(uuid, bucket="1h")
    assert agg.bucket_seconds == 3600
    assert sum(b.count for b in agg.items) == 10
    assert {b.metric for b in agg.items} == {r["metric_name"] for r in rows if r["uuid"] == uuid}
    power = [float(r["value"]) for r in rows if r["uuid"] == uuid and r["metric_name"] == "DCGM_FI_DEV_POWER_USAGE"]
    (b,) = client.aggregate(uuid, metric="DCGM_FI_DEV_POWER_USAGE", bucket=60).items
    assert b.min == b.max == pytest.approx(power[0]) and b.count == 1 and b.bucket.tzinfo is not None


def test_errors_carry_status_and_the_apis_detail(loaded):
    client, rows = loaded
    with pytest.raises(APIError) as err:
        client.gpu("GPU-does-not-exist")
    assert err.value.status == 404 and "not found" in err.value.detail and "GPU-does-not-exist" in str(err.value)
    with pytest.raises(APIError) as err:
        client.telemetry(rows[0]["uuid"], start_time="yesterday-ish")
    assert err.value.status == 422 and err.value.detail.startswith("start_time")
    with pytest.raises(APIError) as err:
        client.telemetry(rows[0]["uuid"], metric="DCGM_FI_NOPE")
    assert err.value.status == 422 and "unknown metric" in err.value.detail
    with pytest.raises(APIError) as err:
        client.aggregate(rows[0]["uuid"], bucket="soon")
    assert err.value.status == 422 and err.value.detail.startswith("bucket")
    assert client.health() == {"status": "ok"}
    assert client.ready()["status"] == "ready"


def test_ready_raises_503_naming_the_failed_dependency(cli_env, database_url, tmp_path):
    with store.connect(database_url, autocommit=True) as conn:  # the schema is there: only Redis is down
        store.migrate(conn)
    port = free_port()
    env = {**cli_env, "REDIS_URL": "redis://127.0.0.1:1/0"}
    proc = start_cli("serve", "--port", str(port), env=env, log_path=tmp_path / "api.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/health")
        with TelemetryClient(f"http://127.0.0.1:{port}") as client:
            assert client.health()["status"] == "ok"
            with pytest.raises(APIError) as err:
                client.ready()
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    assert err.value.status == 503 and err.value.body["failed"] == ["redis"]
    assert "redis" in err.value.detail


def test_unreachable_api_is_a_clear_error():
    with TelemetryClient(f"http://127.0.0.1:{free_port()}", timeout=2) as client:
        with pytest.raises(APIError) as err:
            client.health()
    assert err.value.status == 0 and "ConnectError" in str(err.value)


def test_default_url_and_time_formatting(monkeypatch):
    monkeypatch.setenv("TELEMETRY_API_URL", "http://api.example:9000/")
    assert TelemetryClient().base_url == "http://api.example:9000"
    monkeypatch.delenv("TELEMETRY_API_URL")
    assert TelemetryClient().base_url == "http://127.0.0.1:8000"
    assert format_ts(datetime(2025, 7, 18, 20, 42, 34)) == "2025-07-18T20:42:34Z"
    assert format_ts(datetime(2025, 7, 18, 20, 42, 34, 5, tzinfo=UTC)) == "2025-07-18T20:42:34.000005Z"
    assert format_ts("2025-07-18T20:42:34Z") == "2025-07-18T20:42:34Z" and format_ts(None) is None
    assert parse_ts("2025-07-18T20:42:34Z") == datetime(2025, 7, 18, 20, 42, 34, tzinfo=UTC)


def test_bucket_text_fits_the_apis_pattern_and_token_comes_from_env(monkeypatch):
    import re

    from telemetry_nb.api.params import BUCKET_PATTERN, parse_bucket

    for seconds, text in ((60, "60s"), (0.25, "250ms"), (1.5, "1500ms"), (86400 * 2000, "48000h"), ("5m", "5m")):
        assert format_bucket(seconds) == text
        assert re.match(BUCKET_PATTERN, text) and parse_bucket(text) == (seconds if seconds != "5m" else 300)
    monkeypatch.setenv("TELEMETRY_API_TOKEN", "tnb-env-token-1234")
    with TelemetryClient("http://127.0.0.1:1") as client:
        assert client.authenticated and "tnb-env" not in repr(client) and "token=***" in repr(client)
    monkeypatch.delenv("TELEMETRY_API_TOKEN")
    with TelemetryClient("http://127.0.0.1:1") as client:
        assert not client.authenticated and repr(client) == "TelemetryClient('http://127.0.0.1:1')"

"""The REST API over a real PostgreSQL: pagination, filters, aggregates, errors, readiness."""

from __future__ import annotations

import statistics
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from telemetry_nb.config import Settings
from telemetry_nb.model import Sample
from telemetry_nb.pipeline.collector import Collector
from telemetry_nb.pipeline.streamer import Streamer
from telemetry_nb.pipeline.streams import Queue
from tests.conftest import start_cli, wait_http

T0 = datetime(2025, 7, 18, 20, 0, 0, tzinfo=UTC)
METRICS = ("DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_POWER_USAGE")
N_TS = 250


def _iso(ts: datetime) -> str:
    return ts.isoformat().replace("+00:00", "Z")


def _value(gpu: int, metric: int, i: int) -> float:
    return round(gpu * 1000 + metric * 100 + (i * 7) % 97 + 0.25, 3)


def _samples() -> list[Sample]:
    out = []
    for g in range(3):
        for i in range(N_TS):
            for m, name in enumerate(METRICS):
                out.append(Sample(f"GPU-{g}", name, T0 + timedelta(seconds=i), _value(g, m, i),
                                  f"host-{g % 2}", g, f"nvidia{g}", "H100" if g < 2 else "A100"))
    return out


@pytest.fixture
def api(redis_client, stream, database_url, api_server) -> str:
    settings = Settings(stream=stream, group="g", batch_size=500, block_ms=100)
    Streamer(Queue(redis_client, stream, "g", "s"), settings).run(_samples)
    Collector(Queue(redis_client, stream, "g", "c"), database_url, settings).run(drain=True)
    return api_server


def test_gpu_list_filters_and_cursor_pagination(api):
    seen, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = httpx.get(f"{api}/api/v1/gpus", params=params).json()
        seen += [g["uuid"] for g in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ["GPU-0", "GPU-1", "GPU-2"]
    host0 = httpx.get(f"{api}/api/v1/gpus", params={"hostname": "host-0"}).json()["items"]
    assert [g["uuid"] for g in host0] == ["GPU-0", "GPU-2"]
    a100 = httpx.get(f"{api}/api/v1/gpus", params={"model_name": "A100"}).json()["items"]
    assert [g["uuid"] for g in a100] == ["GPU-2"]
    one = httpx.get(f"{api}/api/v1/gpus/GPU-1").json()
    assert one["first_seen"] == _iso(T0) and one["last_seen"] == _iso(T0 + timedelta(seconds=N_TS - 1))


def test_telemetry_pages_return_every_row_once_in_order(api):
    items, cursor, pages = [], None, 0
    while True:
        params = {"limit": 77, **({"cursor": cursor} if cursor else {})}
        body = httpx.get(f"{api}/api/v1/gpus/GPU-1/telemetry", params=params).json()
        items += body["items"]
        cursor, pages = body["next_cursor"], pages + 1
        if cursor is None:
            break
    assert pages == -(-N_TS * 3 // 77)
    assert len(items) == N_TS * 3
    keys = [(i["timestamp"], i["metric"]) for i in items]
    assert len(set(keys)) == len(keys)
    assert [i["timestamp"] for i in items] == sorted(i["timestamp"] for i in items)
    expected = {(_iso(T0 + timedelta(seconds=i)), name): _value(1, m, i)
                for i in range(N_TS) for m, name in enumerate(METRICS)}
    assert {(i["timestamp"], i["metric"]): i["value"] for i in items} == expected


def test_time_window_is_inclusive_and_metric_filter_repeatable(api):
    start, end = T0 + timedelta(seconds=10), T0 + timedelta(seconds=19)
    body = httpx.get(f"{api}/api/v1/gpus/GPU-0/telemetry", params=[
        ("start_time", _iso(start)), ("end_time", "2025-07-18T22:00:19+02:00"),
        ("metric", METRICS[0]), ("metric", METRICS[2])]).json()
    assert len(body["items"]) == 10 * 2
    assert body["items"][0]["timestamp"] == _iso(start) and body["items"][-1]["timestamp"] == _iso(end)
    assert {i["metric"] for i in body["items"]} == {METRICS[0], METRICS[2]}


def test_aggregate_matches_the_raw_rows(api):
    body = httpx.get(f"{api}/api/v1/gpus/GPU-2/telemetry/aggregate",
                     params={"metric": METRICS[1], "bucket": "1m"}).json()
    assert body["bucket_seconds"] == 60
    assert [b["bucket"] for b in body["items"]] == [_iso(T0 + timedelta(minutes=k)) for k in range(5)]
    for k, b in enumerate(body["items"]):
        values = [_value(2, 1, i) for i in range(N_TS) if k * 60 <= i < (k + 1) * 60]
        assert b["count"] == len(values) and b["min"] == min(values) and b["max"] == max(values)
        assert b["avg"] == pytest.approx(statistics.fmean(values))


def test_metrics_listing(api):
    assert httpx.get(f"{api}/api/v1/metrics").json()["items"] == [
        {"name": n, "rows": 3 * N_TS} for n in sorted(METRICS)]


@pytest.mark.parametrize("path, params, names", [
    ("/api/v1/gpus/GPU-0/telemetry", {"start_time": "2025-07-18T21:00:00Z", "end_time": "2025-07-18T20:00:00Z"},
     "end_time"),
    ("/api/v1/gpus/GPU-0/telemetry", {"start_time": "not-a-time"}, "start_time"),
    ("/api/v1/gpus/GPU-0/telemetry", {"end_time": "2025-99-01T00:00:00Z"}, "end_time"),
    ("/api/v1/gpus/GPU-0/telemetry", {"limit": 10001}, "limit"),
    ("/api/v1/gpus/GPU-0/telemetry", {"limit": 0}, "limit"),
    ("/api/v1/gpus/GPU-0/telemetry", {"cursor": "garbage!"}, "cursor"),
    ("/api/v1/gpus/GPU-0/telemetry", {"metric": "NO_SUCH_METRIC"}, "metric"),
    ("/api/v1/gpus", {"limit": 1001}, "limit"),
    ("/api/v1/gpus/GPU-0/telemetry/aggregate", {"bucket": "fortnight"}, "bucket"),
])
def test_bad_parameters_are_422_naming_the_parameter(api, path, params, names):
    r = httpx.get(api + path, params=params)
    assert r.status_code == 422
    assert r.json()["detail"].startswith(names), r.json()


def test_unknown_gpu_is_404_json(api):
    for path in ("/api/v1/gpus/GPU-nope", "/api/v1/gpus/GPU-nope/telemetry",
                 "/api/v1/gpus/GPU-nope/telemetry/aggregate"):
        r = httpx.get(api + path)
        assert r.status_code == 404 and "GPU-nope" in r.json()["detail"]


def test_ready_names_the_dependency_that_failed(api, cli_env, tmp_path, servers):
    assert httpx.get(f"{api}/ready").json()["status"] == "ready"
    from telemetry_nb.embedded import free_port
    port = free_port()
    env = {**cli_env, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}  # nothing listens there
    proc = start_cli("serve", "--port", str(port), env=env, log_path=tmp_path / "api2.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/health")
        r = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=10)
        assert r.status_code == 503 and r.json()["failed"] == ["redis"]
        assert "redis" in r.json()["detail"]
        # the data endpoints keep working without Redis
        assert httpx.get(f"http://127.0.0.1:{port}/api/v1/gpus").status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=10)


_HOT = "/api/v1/gpus/{uuid}/telemetry"


@pytest.mark.parametrize("uuid, params", [
    ("GPU-1", []),
    ("GPU-1", [("limit", "77")]),
    ("GPU-0", [("metric", METRICS[0]), ("metric", METRICS[2]), ("start_time", "2025-07-18T20:00:10Z"),
               ("end_time", "2025-07-18T22:00:19+02:00"), ("limit", "7")]),
    ("GPU-2", [("cursor", "1752868810000000.2"), ("limit", "3")]),
    ("GPU-2", [("end_time", "2000-01-01T00:00:00Z")]),
    ("GPU-nope", []),
    ("GPU-0", [("metric", "NO_SUCH_METRIC")]),
    ("GPU-0", [("start_time", "2025-07-18T21:00:00Z"), ("end_time", "2025-07-18T20:00:00Z")]),
    ("GPU-0", [("start_time", "not-a-time")]),
])
def test_hot_path_answers_byte_for_byte_what_the_fastapi_route_answers(api, uuid, params):
    """A plainly valid request is answered by `hotpath.HotTelemetry`; one with an extra parameter (which the
    route ignores) goes through FastAPI: status, headers and body must be the same."""
    url = api + _HOT.format(uuid=uuid)
    hot = httpx.get(url, params=params)
    routed = httpx.get(url, params=[*params, ("unrelated", "1")])
    assert hot.status_code == routed.status_code
    assert hot.content == routed.content
    assert [(k, v) for k, v in hot.headers.multi_items() if k != "date"] == \
        [(k, v) for k, v in routed.headers.multi_items() if k != "date"]
    metrics = httpx.get(f"{api}/metrics").text
    assert f'api_requests_total{{route="{_HOT}",status="{hot.status_code}"}} 2.0' in metrics


def test_hot_path_takes_only_plainly_valid_requests():
    """Which requests the hot path answers itself (the rest, FastAPI validates and answers)."""
    from telemetry_nb.api.auth import Tokens
    from telemetry_nb.api.hotpath import HotTelemetry

    class Pool:
        max_size = 1

    class Store:
        pool = Pool()

    hot = HotTelemetry(None, api=None, route=None, store=Store(), tokens=None)

    def params(path: str, query: str = "") -> tuple | None:
        return hot._params({"path": path, "query_string": query.encode(), "root_path": ""})

    ok = "/api/v1/gpus/GPU-1/telemetry"
    assert params(ok) == ("GPU-1", None, None, None, 1000, None)
    assert params(ok, "metric=A&metric=B&limit=10000&cursor=-1.2&start_time=x&end_time=y") == \
        ("GPU-1", "x", "y", ["A", "B"], 10000, "-1.2")
    assert params("/api/v1/gpus/a%20b/telemetry".replace("%20", " ")) == ("a b", None, None, None, 1000, None)
    for query in ("limit=0", "limit=10001", "limit=010", "limit=+5", "limit= 5", "limit=5&limit=6", "metric=",
                  "metric=A%0A", "start_time=", "cursor=1.2%0A", "cursor=abc", "other=1", "start_time=" + "9" * 65,
                  "end_time=a&end_time=b"):
        assert params(ok, query) is None, query
    for path in ("/api/v1/gpus//telemetry", "/api/v1/gpus/a\x01b/telemetry", "/api/v1/gpus/" + "x" * 1025
                 + "/telemetry"):
        assert params(path) is None, path
    hot.tokens = Tokens(["t0k"])
    headers = [(b"host", b"h")]
    assert not hot._authorized({"headers": headers})
    assert hot._authorized({"headers": [*headers, (b"authorization", b"bearer  t0k ")]})
    for value in (b"Bearer t0kx", b"Basic t0k", b"t0k", b"Bearer", b"Bearer "):
        assert not hot._authorized({"headers": [(b"authorization", value)]}), value
    assert not hot._authorized({"headers": [(b"authorization", b"Bearer t0k"), (b"authorization", b"Bearer t0k")]})

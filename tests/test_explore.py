"""telemetry_nb.analysis.explore: windows, loading through the API, tables with known answers, small charts."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import altair as alt
import numpy as np
import pandas as pd
import pytest

from telemetry_nb.analysis import explore as ex
from telemetry_nb.analysis.client import Gpu, TelemetryClient
from tests.conftest import run_cli

T0 = datetime(2025, 7, 18, 20, 0, tzinfo=UTC)


def gpu(uuid, host="h1", index=0, first=T0, last=T0 + timedelta(hours=1)):
    return Gpu(uuid, host, index, f"nvidia{index}", "H100", first, last)


def test_choose_bucket_gives_nice_sizes_within_the_target():
    assert ex.choose_bucket(T0, T0 + timedelta(minutes=2), 120) == 1
    assert ex.choose_bucket(T0, T0 + timedelta(hours=1), 120) == 30
    assert ex.choose_bucket(T0, T0 + timedelta(hours=1), 60) == 60
    assert ex.choose_bucket(T0, T0 + timedelta(days=7), 120) == 7200
    assert ex.choose_bucket(T0, T0 + timedelta(days=400), 100) % 86400 == 0
    assert ex.choose_bucket(T0, T0, 120) == 1


def test_rollup_bucket_moves_big_fleet_windows_onto_the_hourly_rollup():
    day = T0 + timedelta(days=1)
    assert ex.rollup_bucket(900, 1024, T0, day) == 3600  # 1.5 M one-minute rows: the 1 h rollup instead
    assert ex.rollup_bucket(900, 100, T0, day) == 900  # 144 k: fine at 1 m
    assert ex.rollup_bucket(30, 1024, T0, T0 + timedelta(hours=1)) == 30  # short windows keep their detail
    assert ex.rollup_bucket(7200, 1024, T0, T0 + timedelta(days=7)) == 7200


def test_align_start_moves_a_window_start_onto_its_bucket_grid():
    off = datetime(2025, 7, 1, 13, 47, 12, tzinfo=UTC)
    assert ex.align_start(off, 3600) == datetime(2025, 7, 1, 13, tzinfo=UTC)
    assert ex.align_start(off, 900) == datetime(2025, 7, 1, 13, 45, tzinfo=UTC)
    assert ex.align_start(off, 15) == datetime(2025, 7, 1, 13, 47, tzinfo=UTC)
    assert ex.align_start(datetime(2025, 7, 1, 14, tzinfo=UTC), 3600) == datetime(2025, 7, 1, 14, tzinfo=UTC)
    assert ex.align_start(off, 7 * 86400) == off  # not a divisor of a day: the API's grid is not midnight-based


def test_resolve_window_ends_at_the_newest_sample_by_default():
    gpus = [gpu("a", last=T0 + timedelta(minutes=5)), gpu("b", last=T0 + timedelta(minutes=9)),
            gpu("c", last=None)]
    assert ex.resolve_window(gpus, window="1h") == (T0 + timedelta(minutes=9) - timedelta(hours=1),
                                                   T0 + timedelta(minutes=9))
    assert ex.resolve_window(gpus, window=90)[0] == T0 + timedelta(minutes=9, seconds=-90)
    start, end = ex.resolve_window(gpus, start_time="2025-07-18T19:00:00Z", end_time="2025-07-18T19:30:00")
    assert (start, end) == (T0 - timedelta(hours=1), T0 - timedelta(minutes=30))  # naive = UTC
    with pytest.raises(ValueError, match="before"):
        ex.resolve_window(gpus, start_time="2025-07-18T21:00:00Z", end_time="2025-07-18T20:00:00Z")


def test_select_gpus_by_host_and_window():
    gpus = [gpu("a", "h1", 1), gpu("b", "h2", 0), gpu("c", "h1", 0, last=T0 - timedelta(days=1)),
            gpu("d", "h3", 0, first=T0 + timedelta(days=1), last=T0 + timedelta(days=2))]
    assert [g.uuid for g in ex.select_gpus(gpus)] == ["c", "a", "b", "d"]  # host, index order
    assert [g.uuid for g in ex.select_gpus(gpus, hostnames="h1")] == ["c", "a"]
    assert [g.uuid for g in ex.select_gpus(gpus, start=T0, end=T0 + timedelta(hours=1))] == ["a", "b"]
    assert [g.uuid for g in ex.select_gpus(gpus, uuids=["b", "d"])] == ["b", "d"]


def synthetic_raw(n_gpus=128, ticks=2000, metrics=(ex.UTIL, ex.TEMP, ex.POWER, ex.FB_USED), seed=0) -> pd.DataFrame:
    """n_gpus × ticks × metrics rows (1,024,000 by default); GPU i is idle when i % 4 == 0, GPU 5 runs hottest."""
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(n_gpus), ticks)
    t = np.tile(np.arange(ticks), n_gpus)
    idle = g % 4 == 0
    util = np.where(idle, rng.uniform(0, 2, g.size), rng.uniform(40, 100, g.size))
    values = {ex.UTIL: util, ex.TEMP: 30 + 0.4 * util + (g == 5) * 20, ex.POWER: 70 + 6 * util,
              ex.FB_USED: np.where(idle, 0, 60000)}
    frames = []
    for m in metrics:
        frames.append(pd.DataFrame({"gi": g, "t": t, "metric": m, "value": values[m].astype(float)}))
    df = pd.concat(frames, ignore_index=True)
    df["uuid"] = "GPU-" + df["gi"].astype(str)
    df["hostname"] = "host-" + (df["gi"] // 8).astype(str)
    df["gpu_index"] = df["gi"] % 8
    df["gpu"] = df["hostname"] + "/" + df["gpu_index"].astype(str)
    df["timestamp"] = pd.Timestamp(T0) + pd.to_timedelta(df["t"], unit="s")
    return df[["uuid", "hostname", "gpu_index", "gpu", "timestamp", "metric", "value"]]


@pytest.fixture(scope="module")
def million() -> pd.DataFrame:
    raw = synthetic_raw()
    assert len(raw) == 1_024_000
    return ex.raw_to_aggregates(raw, 30)


def test_charts_from_a_million_rows_stay_under_altairs_row_limit(million):
    assert alt.data_transformers.options.get("max_rows", 5000) == 5000  # the default guard is on
    with pytest.raises(alt.MaxRowsError):
        alt.Chart(million).mark_point().encode(x="bucket:T", y="avg:Q").to_dict()  # the naive chart would fail
    charts = {"heatmap": ex.utilization_heatmap(million), "per_host": ex.utilization_per_host(million),
              "temp_power": ex.temperature_vs_power(million), "framebuffer": ex.framebuffer_chart(million),
              "distributions": ex.metric_distributions(million), "timeseries": ex.metric_timeseries(million, ex.UTIL),
              "host_timeseries": ex.metric_timeseries(million, ex.TEMP, by="hostname")}
    for name, chart in charts.items():
        chart.to_dict()  # raises MaxRowsError if a chart embeds more than 5000 rows
        assert 0 < ex.chart_rows(chart) <= ex.MAX_CHART_ROWS, name
    assert 128 * 20 <= ex.chart_rows(charts["heatmap"]) <= 5000  # coarser, but still a useful grid


def test_heatmap_keeps_the_busiest_gpus_when_there_are_too_many():
    raw = synthetic_raw(n_gpus=700, ticks=20, metrics=(ex.UTIL,))
    chart = ex.utilization_heatmap(ex.raw_to_aggregates(raw, 1))
    spec = chart.to_dict()
    assert "busiest 500 of 700 GPUs" in spec["title"]
    assert ex.chart_rows(chart) <= ex.MAX_CHART_ROWS


def test_big_fleets_chart_per_host():
    raw = synthetic_raw(n_gpus=800, ticks=20, metrics=(ex.UTIL,))  # 100 hosts of 8
    df = ex.raw_to_aggregates(raw, 1)
    heat = ex.utilization_heatmap(df, max_rows=1500, by="hostname")
    spec = heat.to_dict()
    assert spec["encoding"]["y"]["field"] == "hostname" and "mean per host" in spec["title"]
    assert ex.chart_rows(heat) <= 1500 and len(spec["encoding"]["y"]["sort"]) == 100  # every host, fewer bins
    means = df.assign(w=df["avg"] * df["count"]).groupby("hostname").sum(numeric_only=True)
    order = (means["w"] / means["count"]).sort_values(ascending=False).index
    bars = ex.utilization_per_host(df, lines=False, max_hosts=10)
    shown = [r["hostname"] for r in bars.to_dict()["datasets"][bars.to_dict()["data"]["name"]]]
    assert "busiest 5 and idlest 5 of 100 hosts" in bars.to_dict()["title"]
    assert shown == [*order[:5], *order[-5:]]


def test_tables_have_the_known_answers(million):
    idle = ex.idle_gpus(million, threshold=5)
    assert set(idle["uuid"]) == {f"GPU-{i}" for i in range(0, 128, 4)}
    assert (idle["max_util"] < 2).all() and (idle["avg_fb_used_mib"] == 0).all()
    assert idle["idle_hours"].iloc[0] == pytest.approx(2000 / 3600, abs=0.01)
    hot = ex.hottest_gpus(million, n=3)
    assert hot["uuid"].iloc[0] == "GPU-5" and len(hot) == 3
    assert hot["max_temp_c"].iloc[0] > hot["max_temp_c"].iloc[1]
    summary = ex.fleet_summary({"data": million, "all_gpus": [gpu(f"GPU-{i}", f"host-{i // 8}") for i in range(130)],
                                "start": T0, "end": T0 + timedelta(seconds=2000), "bucket_s": 30})
    assert summary["gpus"] == 130 and summary["reporting_gpus"] == 128 and summary["idle_gpus"] == 32
    assert summary["hosts"] == 17 and summary["reporting_hosts"] == 16 and 40 < summary["utilization_now"] < 60
    assert ex.infer_interval(million) == pytest.approx(1.0, rel=0.02)


def test_per_gpu_has_one_row_per_gpu_even_without_an_index():
    raw = synthetic_raw(n_gpus=8, ticks=20)
    raw["gpu_index"] = raw["gpu_index"].astype("Int64").mask(raw["uuid"] == "GPU-3")  # one GPU reports no index
    g = ex.per_gpu(ex.raw_to_aggregates(raw, 1))
    assert sorted(g["uuid"]) == [f"GPU-{i}" for i in range(8)]  # not the uuid x hostname x index x label product
    assert g["GPU_UTIL_count"].eq(20).all()
    hot = ex.hottest_gpus(ex.raw_to_aggregates(raw, 1), n=10)
    assert len(hot) == 8 and hot["max_temp_c"].notna().all()


def test_stopped_reporting():
    newest = T0 + timedelta(hours=1)
    gpus = [gpu("a", last=newest), gpu("b", last=newest - timedelta(seconds=2)),
            gpu("c", last=newest - timedelta(seconds=10)), gpu("d", "h2", 3, last=newest - timedelta(days=1))]
    out = ex.stopped_reporting(gpus, interval_s=1, intervals=3)
    assert list(out["uuid"]) == ["d", "c"] and out["behind_s"].tolist() == [86400.0, 10.0]
    assert out["gpu"].tolist() == ["h2/3", "h1/0"]
    assert ex.stopped_reporting(gpus, interval_s=5, intervals=3)["uuid"].tolist() == ["d"]
    assert ex.stopped_reporting([], interval_s=1).empty


def test_empty_data_gives_placeholder_charts_and_empty_tables():
    empty = ex.raw_to_aggregates(synthetic_raw(n_gpus=1, ticks=1).iloc[0:0], 10)
    for chart in (ex.utilization_heatmap(empty), ex.utilization_per_host(empty), ex.temperature_vs_power(empty),
                  ex.framebuffer_chart(empty), ex.metric_distributions(empty), ex.metric_timeseries(empty, ex.UTIL)):
        spec = chart.to_dict()
        assert "no " in str(spec["datasets"]) and ex.chart_rows(chart) == 1
    assert ex.idle_gpus(empty).empty and ex.hottest_gpus(empty).empty


def test_svg_rendering_needs_no_browser(million):
    svg = ex.to_svg(ex.utilization_per_host(million))
    assert svg.lstrip().startswith("<svg") and "GPU_UTIL per host" in svg


def test_svg_workers_render_what_this_process_renders_and_survive_a_dead_worker(million):
    chart = ex.utilization_heatmap(million)
    renderer = ex.SvgRenderer(workers=2)
    try:
        futures = [renderer.submit(chart) for _ in range(3)]

        def same(svg: str) -> str:  # Vega numbers gradients per process: gradient_0, gradient_1, …
            return re.sub(r"gradient_\d+", "gradient", svg)

        assert all(same(f.result(timeout=120)) == same(ex.to_svg(chart)) for f in futures)
        assert len(renderer._procs) == 2  # two worker processes, both used
        for proc in renderer._procs:
            proc.kill()
            proc.wait()
        again = renderer.submit(ex.utilization_per_host(million)).result(timeout=120)
        assert "GPU_UTIL per host" in again  # rendered here while that worker was replaced
        assert "GPU_UTIL per host" in renderer.submit(ex.utilization_per_host(million)).result(timeout=120)
        assert any(p.poll() is None for p in renderer._procs)  # a new worker took over
        bad = alt.Chart(pd.DataFrame({"x": [1]})).mark_point().encode(x="x:Q")
        bad_spec = bad.to_dict()
        bad_spec["mark"] = "no-such-mark"
        with pytest.raises(ValueError, match="vl-convert"):
            renderer._threads.submit(renderer._render, __import__("json").dumps(bad_spec)).result(timeout=120)
    finally:
        renderer.close()


def _samples(start: datetime, minutes: int, step_s: int = 10):
    """4 GPUs × UTIL/TEMP every `step_s` for `minutes` from `start`, as one batch for the store."""
    from telemetry_nb.pipeline.codec import gpu_key, metric_key
    from telemetry_nb.store.rows import GpuRow, MetricRow, RowBatch

    ids = {m: metric_key(m) for m in (ex.UTIL, ex.TEMP)}
    lines = []
    for i in range(minutes * 60 // step_s):
        ts = (start + timedelta(seconds=i * step_s)).isoformat()
        for g in range(4):
            for mid in ids.values():
                lines.append(f"{gpu_key(f'GPU-{g}')}\t{ts}\t{mid}\t{(i * 7 + g * 13 + mid % 5) % 100}\t\\N\n")
    return RowBatch(n=len(lines), rows="".join(lines).encode(),
                    gpus=[GpuRow(gpu_key(f"GPU-{g}"), f"GPU-{g}", f"host-{g // 2}", g % 2, f"nvidia{g}", "H100")
                          for g in range(4)],
                    metrics=[MetricRow(mid, m, len(lines) // 2) for m, mid in ids.items()])


class CountingClient(TelemetryClient):
    """A real client that also records the windows of its fleet requests."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fleet_starts: list = []

    def fleet_aggregate(self, metric, **kwargs):
        self.fleet_starts.append(kwargs["start_time"])
        return super().fleet_aggregate(metric, **kwargs)


def test_a_sliding_refresh_equals_a_full_load_and_asks_only_for_the_newest_buckets(database_url, api_server):
    import psycopg

    from telemetry_nb import store

    t0 = datetime(2025, 7, 20, 10, 0, 3, tzinfo=UTC)
    with psycopg.connect(database_url, autocommit=True) as conn:
        store.migrate(conn)
        writer = store.Writer(conn)
        writer.write([_samples(t0, 30)])
        with CountingClient(api_server) as client:
            kw = {"window": "15m", "metrics": [ex.UTIL, ex.TEMP], "target_buckets": 30}
            first = ex.load_window(client, **kw)
            assert first["bucket_s"] == 30 and not first["data"].empty
            writer.write([_samples(t0 + timedelta(minutes=30), 7)])  # 7 more minutes arrive
            client.fleet_starts.clear()
            slid = ex.load_window(client, previous=first, **kw)
            asked = set(client.fleet_starts)
            full = ex.load_window(client, **kw)
    assert slid["end"] == full["end"] > first["end"]
    # only the buckets from 2 minutes before the previous end on were asked for again
    assert asked == {ex.align_start(first["end"] - ex.REFRESH_OVERLAP, 30)}
    key = ["uuid", "metric", "bucket"]
    a = slid["data"].sort_values(key).reset_index(drop=True)
    b = full["data"].sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a[ex.AGG_COLUMNS], b[ex.AGG_COLUMNS])
    # a different bucket size (or GPU set, or metrics) is a full load
    with CountingClient(api_server) as client:
        other = ex.load_window(client, previous=full, window="15m", metrics=[ex.UTIL, ex.TEMP], target_buckets=15)
    assert other["bucket_s"] == 60 and set(client.fleet_starts) == {ex.align_start(other["start"], 60)}


def test_load_window_through_the_api(cli_env, api_server, real_csv):
    run_cli("stream", "--csv", str(real_csv), env=cli_env)
    run_cli("collect", "--drain", env=cli_env)
    real = pd.read_csv(real_csv)
    with TelemetryClient(api_server) as client:
        loaded = ex.load_window(client, window="1h", metrics=list(ex.UNITS))
        assert loaded["end"] == datetime(2025, 7, 18, 20, 42, 37, tzinfo=UTC)  # the newest sample, not now
        assert loaded["bucket_s"] == 30 and len(loaded["gpus"]) == 247
        df = loaded["data"]
        assert int(df["count"].sum()) == len(real)
        per = df.groupby(["uuid", "metric"])["avg"].mean()
        truth = real.set_index(["uuid", "metric_name"])["value"]
        assert np.allclose(per.sort_index().to_numpy(), truth.sort_index().to_numpy())
        host = sorted(real["Hostname"].unique())[0]
        one = ex.load_window(client, window="1h", hostnames=[host])
        assert set(one["data"]["hostname"]) == {host}
        assert len(one["gpus"]) == real[real["Hostname"] == host]["uuid"].nunique()
        raw = ex.load_raw(client, one["gpus"], start=one["start"], end=one["end"], metrics=[ex.UTIL])
        assert len(raw) == len(one["gpus"]) and set(raw["metric"]) == {ex.UTIL}
        nothing = ex.load_window(client, start_time="2020-01-01T00:00:00Z", end_time="2020-01-01T01:00:00Z")
        assert nothing["gpus"] == [] and nothing["data"].empty
        assert ex.fleet_summary(nothing)["reporting_gpus"] == 0

"""Data lifecycle against a real PostgreSQL: partitions, packing, rollups, retention, the fleet API, crashes.

Clocks are injected (the maintainer's `clock`, the data's own timestamps); nothing here sleeps to wait.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import httpx
import psycopg
import pytest

from telemetry_nb import store
from telemetry_nb.observability import PipelineMetrics
from telemetry_nb.pipeline.maintainer import Maintainer
from telemetry_nb.store import lifecycle
from telemetry_nb.store.rows import GpuRow, MetricRow, RowBatch

T0 = datetime(2025, 7, 10, tzinfo=UTC)
UTIL, TEMP = 11, 12
ORIGIN = "TIMESTAMPTZ '2000-01-01 00:00:00+00'"


def batch(gpus: list[int], start: datetime, n: int, step_s: float = 10.0, metrics=(UTIL, TEMP),
          seed: int = 0) -> RowBatch:
    """n ticks × gpus × metrics rows with values that differ per row (so min/max/avg mean something)."""
    lines = []
    for i in range(n):
        ts = (start + timedelta(seconds=i * step_s)).isoformat()
        for g in gpus:
            for m in metrics:
                v = ((i * 7919 + g * 104729 + m * 13 + seed) % 1000) / 7.0
                lines.append(f"{g}\t{ts}\t{m}\t{v!r}\t\\N\n")
    return RowBatch(n=len(lines), rows="".join(lines).encode(),
                    gpus=[GpuRow(g, f"GPU-{g}", f"host-{g % 2}", g, f"nvidia{g}", "H100" if g < 3 else "A100")
                          for g in gpus],
                    metrics=[MetricRow(m, {UTIL: "UTIL", TEMP: "TEMP"}[m], n * len(gpus)) for m in metrics])


def direct(conn, metric: int, bucket: timedelta, start: datetime | None, end: datetime | None,
           gpu: int | None = None) -> list[tuple]:
    """The same aggregate straight from the stored samples (the `telemetry` view: raw ∪ packed)."""
    where, params = ["t.metric_id = %s"], [bucket, metric]
    if start:
        where.append("t.ts >= %s")
        params.append(start)
    if end:
        where.append("t.ts <= %s")
        params.append(end)
    if gpu is not None:
        where.append("t.gpu_id = %s")
        params.append(gpu)
    return conn.execute(f"SELECT g.uuid, date_bin(%s, t.ts, {ORIGIN}), min(t.value), max(t.value), count(*), "
                        f"avg(t.value) FROM telemetry t JOIN gpus g ON g.id = t.gpu_id WHERE {' AND '.join(where)} "
                        "GROUP BY 1, 2 ORDER BY 1, 2", params).fetchall()


def assert_same(api: dict, truth: list[tuple]) -> None:
    got = list(zip(api["uuid"], api["bucket"], api["min"], api["max"], api["count"], api["avg"], strict=True))
    assert len(got) == len(truth)
    for (u, b, mn, mx, c, avg), (tu, tb, tmn, tmx, tc, tavg) in zip(got, truth, strict=True):
        assert (u, datetime.fromisoformat(b), mn, mx, c) == (tu, tb, tmn, tmx, tc)
        assert math.isclose(avg, tavg, rel_tol=1e-9)


@pytest.fixture
def conn(database_url):
    with psycopg.connect(database_url, autocommit=True) as c:  # autocommit: no idle transaction holds locks
        store.migrate(c, partition=lifecycle.HOUR * 6)
        yield c


def test_v2_database_migrates_in_place_keeping_every_row(database_url):
    with psycopg.connect(database_url, autocommit=True) as c:
        c.execute("CREATE TABLE schema_version (version int PRIMARY KEY, applied_at timestamptz NOT NULL "
                  "DEFAULT now())")
        for version, sql in store.schema.MIGRATIONS[:2]:
            c.execute(sql)
            c.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))
        c.execute("INSERT INTO gpus (id, uuid) SELECT g, 'GPU-' || g FROM generate_series(1, 5) g")
        c.execute("INSERT INTO metrics VALUES (11, 'UTIL'), (12, 'TEMP')")
        c.execute("INSERT INTO telemetry SELECT g, %s + make_interval(secs => s * 30), m, s * 0.5 + g, NULL "
                  "FROM generate_series(1, 5) g, generate_series(0, 3 * 2880 - 1) s, (VALUES (11), (12)) v(m)",
                  (T0,))
        c.execute("INSERT INTO metric_rows SELECT metric_id, count(*) FROM telemetry GROUP BY 1")
        before = c.execute("SELECT count(*), sum(value), min(ts), max(ts), "
                           "sum(hashtext(gpu_id || ts::text || metric_id)) FROM telemetry").fetchone()
        assert before[0] == 5 * 2 * 3 * 2880
        assert store.migrate(c) == store.SCHEMA_VERSION == 6
        after = c.execute("SELECT count(*), sum(value), min(ts), max(ts), "
                          "sum(hashtext(gpu_id || ts::text || metric_id)) FROM telemetry").fetchone()
        assert after == before
        assert [p.name for p in lifecycle.partitions(c, "telemetry_raw")] == [
            "telemetry_raw_p20250710_0000", "telemetry_raw_p20250711_0000", "telemetry_raw_p20250712_0000"]
        assert store.Reader(c).summary()["rows"] == before[0]  # the counts moved into their slots
        assert c.execute("SELECT count(*) FROM metric_rows").fetchone()[0] == 0
        with Maintainer(database_url, lifecycle.Policy(), clock=lambda: T0 + timedelta(days=3)) as m:
            m.run_once()
        # the closed days are packed now, and still every row is there, once
        assert c.execute("SELECT count(*) FROM telemetry_packed").fetchone()[0] > 0
        assert c.execute("SELECT count(*), sum(value), min(ts), max(ts), sum(hashtext(gpu_id || ts::text || "
                         "metric_id)) FROM telemetry").fetchone() == before
        assert c.execute("SELECT sum(count) FROM telemetry_1h").fetchone()[0] == before[0]
        # every rollup bucket counts its idle samples (values here: s * 0.5 + g, under 5 for the first ticks)
        assert c.execute("SELECT count(*) FROM telemetry_1h WHERE idle IS NULL").fetchone()[0] == 0
        assert c.execute("SELECT sum(idle) FROM telemetry_1m").fetchone()[0] == c.execute(
            "SELECT count(*) FROM telemetry WHERE value < 5").fetchone()[0] > 0


def test_aggregates_equal_raw_across_rollups_packed_ranges_open_tail_late_rows_and_replays(conn, database_url,
                                                                                            api_server):
    policy = lifecycle.Policy(partition=lifecycle.HOUR * 6, late_window=lifecycle.HOUR * 6)
    writer = store.Writer(conn, partition=policy.partition)
    gpus = [1, 2, 3, 4]
    assert writer.write([batch(gpus, T0, 4322)]).stored == 4322 * 4 * 2  # 12 h 10 s at 10 s
    maint = Maintainer(database_url, policy, clock=lambda: T0 + timedelta(days=30))
    maint.run_once()
    # the first partition is closed (6 h before the newest sample): packed; the rest rolled up
    assert lifecycle.read_state(conn).packed_before == T0 + policy.partition
    # open tail (not refreshed), a late row into a rolled-up bucket, a late row into the packed range,
    # and replays of both: nothing twice
    tail = writer.write([batch(gpus, T0 + timedelta(hours=12, seconds=20), 90)])
    late = writer.write([batch([2], T0 + timedelta(hours=4, seconds=5), 30, seed=3)])
    packed_late = writer.write([batch([3], T0 + timedelta(hours=1, seconds=3), 12, seed=5)])
    assert (tail.stored, late.stored, packed_late.stored) == (90 * 4 * 2, 60, 24)
    assert writer.write([batch([3], T0 + timedelta(hours=1, seconds=3), 12, seed=5),
                         batch(gpus, T0 + timedelta(hours=2), 30)]).stored == 0
    assert conn.execute("SELECT count(*) FROM telemetry_changes").fetchone()[0] > 0

    windows = [(T0 + timedelta(minutes=17, seconds=3), T0 + timedelta(hours=6, minutes=11, seconds=1)),
               (None, None), (T0 + timedelta(hours=3, seconds=1), None), (None, T0 + timedelta(hours=12, minutes=7)),
               # ends after the newest sample, off the bucket grid: its last bucket may come whole from a rollup
               (T0 + timedelta(hours=2, seconds=7), T0 + timedelta(hours=12, minutes=40, seconds=13))]
    cases = [("15m", "1m"), ("2h", "1h"), ("7s", "raw"), ("1m", "1m"), ("1h", "1h")]

    def check(expect_dirty: bool) -> None:
        for start, end in windows:
            for bucket, res in cases:
                params = {"metric": "UTIL", "bucket": bucket}
                if start:
                    params["start_time"] = start.isoformat()
                params["end_time"] = (end or T0 + timedelta(days=1)).isoformat()
                body = httpx.get(f"{api_server}/api/v1/fleet/aggregate", params=params, timeout=30).json()
                assert body["resolution"] == res and body["metric"] == "UTIL"
                width = timedelta(seconds=body["bucket_seconds"])
                fleet_end = end or T0 + timedelta(days=1)
                fleet_start = start or fleet_end - timedelta(hours=1)  # the fleet's default window: 1 h
                assert_same(body, direct(conn, UTIL, width, fleet_start, fleet_end))
                per = httpx.get(f"{api_server}/api/v1/gpus/GPU-2/telemetry/aggregate",
                                params={k: v for k, v in params.items() if k != "metric"}, timeout=30).json()
                rows = [i for i in per["items"] if i["metric"] == "UTIL"]
                truth = direct(conn, UTIL, width, start, end or T0 + timedelta(days=1), gpu=2)
                assert_same({"uuid": ["GPU-2"] * len(rows), "bucket": [i["bucket"] for i in rows],
                             "min": [i["min"] for i in rows], "max": [i["max"] for i in rows],
                             "count": [i["count"] for i in rows], "avg": [i["avg"] for i in rows]}, truth)
        assert bool(lifecycle.dirty_ranges(conn)) == expect_dirty

    def pages(uuid: str, **params) -> list[tuple]:
        out, cursor = [], None
        while True:
            q = {**params, "limit": 700, **({"cursor": cursor} if cursor else {})}
            body = httpx.get(f"{api_server}/api/v1/gpus/{uuid}/telemetry", params=q, timeout=30).json()
            out += [(datetime.fromisoformat(i["timestamp"]), i["metric"], i["value"]) for i in body["items"]]
            cursor = body["next_cursor"]
            if not cursor:
                return out

    # per-GPU raw reads page through packed hours and raw partitions alike, every sample once, in order
    names = {UTIL: "UTIL", TEMP: "TEMP"}
    every = [(ts, names[m], v) for ts, m, v in conn.execute(
        "SELECT ts, metric_id, value FROM telemetry WHERE gpu_id = 3 ORDER BY ts, metric_id").fetchall()]
    assert len(every) == (4322 + 12 + 90) * 2
    assert pages("GPU-3") == every
    a, b = T0 + timedelta(minutes=59, seconds=30), T0 + timedelta(hours=6, minutes=2)
    assert pages("GPU-3", start_time=a.isoformat(), end_time=b.isoformat(), metric="TEMP") == [
        r for r in every if a <= r[0] <= b and r[1] == "TEMP"]
    check(expect_dirty=True)  # tail and late rows come from raw rows until the refresh
    maint.run_once()
    check(expect_dirty=False)
    maint.run_once()  # a second refresh with nothing new changes nothing
    maint.close()
    check(expect_dirty=False)
    filtered = httpx.get(f"{api_server}/api/v1/fleet/aggregate",
                         params=[("metric", "TEMP"), ("bucket", "1h"), ("hostname", "host-1"),
                                 ("start_time", T0.isoformat()), ("end_time", (T0 + timedelta(days=1)).isoformat())]
                         ).json()
    assert set(filtered["uuid"]) == {"GPU-1", "GPU-3"}
    both = httpx.get(f"{api_server}/api/v1/fleet/aggregate",
                     params=[("metric", "TEMP"), ("bucket", "1h"), ("hostname", "host-1"), ("model_name", "A100"),
                             ("start_time", T0.isoformat()), ("end_time", (T0 + timedelta(days=1)).isoformat())]
                     ).json()
    assert set(both["uuid"]) == {"GPU-3"}  # host-1 has GPU-1 (H100) and GPU-3 (A100)


def test_fleet_aggregate_refuses_bad_parameters_naming_them(conn, api_server):
    store.Writer(conn).write([batch([1], T0, 3)])
    for params, detail in [
        ({"metric": "UTIL", "bucket": "500ms"}, "bucket: "),
        ({"metric": "UTIL", "bucket": "0.5"}, "bucket: "),
        ({"metric": "UTIL", "bucket": "fortnight"}, "bucket: "),
        ({"metric": "NOPE"}, "metric: unknown metric NOPE"),
        ({}, "metric: Field required"),
        ({"metric": "UTIL", "bucket": "1s", "start_time": "2025-07-10T00:00:00Z",
          "end_time": "2025-08-10T00:00:00Z"}, "more than 1,000,000"),
        ({"metric": "UTIL", "start_time": "2025-07-11T00:00:00Z", "end_time": "2025-07-10T00:00:00Z"},
         "end_time: 2025-07-10T00:00:00Z is before start_time"),
    ]:
        resp = httpx.get(f"{api_server}/api/v1/fleet/aggregate", params=params, timeout=30)
        assert resp.status_code == 422 and detail in resp.json()["detail"], (params, resp.text)
    ok = httpx.get(f"{api_server}/api/v1/fleet/aggregate", params={"metric": "UTIL", "bucket": "1m"}).json()
    assert ok["count"] == [3] and ok["uuid"] == ["GPU-1"]  # default window: the hour up to the newest sample


def test_retention_drops_exactly_the_partitions_past_their_limit(conn, database_url):
    policy = lifecycle.Policy(partition=lifecycle.DAY, retention_raw=timedelta(days=3),
                              retention_1m=timedelta(days=5), retention_1h=timedelta(days=65),
                              late_window=lifecycle.DAY)
    writer = store.Writer(conn, partition=policy.partition)
    for day in range(10):
        writer.write([batch([1, 2], T0 + timedelta(days=day), 24, step_s=3600)])
    newest = T0 + timedelta(days=9, hours=23)
    metrics = PipelineMetrics()
    with Maintainer(database_url, policy, metrics=metrics, clock=lambda: newest + timedelta(days=400)) as m:
        report = m.run_once()
    assert report.reference == newest  # the data's clock, not the wall clock: nothing "expires" on replay
    # raw/packed keep partitions ending after newest - 3 d (days 6..9), 1m after newest - 5 d (4..9)
    days = {t: sorted(p.lo.day for p in lifecycle.partitions(conn, t)) for t in lifecycle.SAMPLE_TABLES}
    assert days["telemetry_packed"] == [16, 17] and days["telemetry_raw"][:2] == [18, 19]
    assert sorted(p.lo.day for p in lifecycle.partitions(conn, "telemetry_1m"))[:6] == [14, 15, 16, 17, 18, 19]
    assert [p.lo for p in lifecycle.partitions(conn, "telemetry_1h")][0] <= T0  # 30-day partition, kept
    assert sum(len(v) for v in report.dropped.values()) == 6 + 4
    assert metrics.partitions_dropped.labels("telemetry_packed")._value.get() == 6
    assert conn.execute("SELECT min(ts) FROM telemetry").fetchone()[0] == T0 + timedelta(days=6)
    assert store.Reader(conn).summary()["rows"] == 4 * 24 * 2 * 2
    # a late row for a dropped day is counted and skipped; the rest of its batch is stored
    mixed = batch([1], T0 + timedelta(days=1), 1)
    fresh = batch([2], newest + timedelta(minutes=1), 1)
    result = writer.write([mixed, fresh])
    assert (result.consumed, result.stored, result.expired) == (4, 2, 2)
    assert conn.execute("SELECT count(*) FROM telemetry WHERE ts = %s", (newest + timedelta(minutes=1),)
                        ).fetchone()[0] == 2
    assert not lifecycle.partitions(conn, "telemetry_raw")[0].lo < T0 + timedelta(days=6)  # none re-created


def _maintain_cli(database_url: str, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "telemetry_nb.cli", "maintain", "--once"],
                            env={**os.environ, "DATABASE_URL": database_url, "TELEMETRY_PARTITION": "6h",
                                 "TELEMETRY_LATE_WINDOW": "6h", "TELEMETRY_RETENTION_RAW": "1d",
                                 "PGAPPNAME": "maintainer-under-test", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_blocked(conn, pid: int, what: str) -> None:
    """Until the process's PostgreSQL backend waits on a lock inside a statement containing `what`."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        row = conn.execute("SELECT query FROM pg_stat_activity WHERE application_name = 'maintainer-under-test' "
                           "AND wait_event_type = 'Lock'").fetchone()
        if row and what in row[0]:
            return
        time.sleep(0.05)
    raise AssertionError(f"maintainer {pid} never blocked in {what}")


def test_sigkilled_maintainer_leaves_no_double_counts_and_no_gaps(conn, database_url, servers):
    policy = lifecycle.Policy(partition=lifecycle.HOUR * 6, late_window=lifecycle.HOUR * 6,
                              retention_raw=lifecycle.DAY)
    writer = store.Writer(conn, partition=policy.partition)
    writer.write([batch([1, 2, 3], T0, 8640, step_s=10)])  # 24 h
    with conn.transaction():  # partitions the maintainer will want, so it blocks only where we make it
        lifecycle.create_ahead(conn, policy, [datetime.now(UTC), T0 + timedelta(days=1)])
        for table in lifecycle.ROLLUPS:
            lifecycle.ensure_partitions(conn, table, T0, T0 + timedelta(days=1), policy.step(table))
    observer = psycopg.connect(database_url, autocommit=True)
    # 1. killed while refreshing the rollups (held up by our lock on the rollup table)
    blocker = psycopg.connect(database_url)  # not autocommit: its locks last until rollback()
    blocker.execute("LOCK TABLE telemetry_1m IN SHARE MODE")
    proc = _maintain_cli(database_url)
    _wait_blocked(observer, proc.pid, "DELETE FROM telemetry_1m")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    blocker.rollback()
    assert conn.execute("SELECT count(*) FROM telemetry_changes").fetchone()[0] == 1  # rolled back, still logged
    # 2. killed while dropping a partition past retention (data now reaches a day later)
    writer.write([batch([1], T0 + timedelta(days=1, hours=12), 2)])
    with Maintainer(database_url, policy, clock=lambda: T0 + timedelta(days=9)) as m:
        m.run_once()
    writer.write([batch([1], T0 + timedelta(days=2, hours=7), 2)])
    with conn.transaction():
        lifecycle.create_ahead(conn, policy, [T0 + timedelta(days=2, hours=7)])
    victim = lifecycle.partitions(conn, "telemetry_packed")[0]
    rows_before = store.Reader(conn).summary()["rows"]
    blocker.execute(f'LOCK TABLE "{victim.name}" IN ACCESS SHARE MODE')
    proc = _maintain_cli(database_url)
    _wait_blocked(observer, proc.pid, f'LOCK TABLE "{victim.name}"')
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    blocker.rollback()
    assert victim in lifecycle.partitions(conn, "telemetry_packed")
    assert store.Reader(conn).summary()["rows"] == rows_before  # nothing subtracted by the killed drop
    # the next leader finishes: every bucket equals the samples, once; the dropped range is gone once
    with Maintainer(database_url, policy, clock=lambda: T0 + timedelta(days=9)) as m:
        report = m.run_once()
    assert victim.name in report.dropped["telemetry_packed"]
    left = conn.execute("SELECT count(*), min(ts) FROM telemetry").fetchone()
    assert store.Reader(conn).summary()["rows"] == left[0]
    truth = conn.execute(f"SELECT gpu_id, metric_id, date_bin('1 minute', ts, {ORIGIN}), count(*), sum(value), "
                         "min(value), max(value) FROM telemetry WHERE ts >= %s GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
                         (left[1],)).fetchall()
    rolled = conn.execute("SELECT gpu_id, metric_id, bucket, count, sum, min, max FROM telemetry_1m "
                          "WHERE bucket >= %s ORDER BY 1, 2, 3", (left[1],)).fetchall()
    assert len(rolled) == len(truth)
    for a, b in zip(rolled, truth, strict=True):
        assert a[:4] == b[:4] and a[5:] == b[5:] and math.isclose(a[4], b[4], rel_tol=1e-12)
    hourly = conn.execute("SELECT sum(count) FROM telemetry_1h WHERE bucket >= %s", (left[1],)).fetchone()[0]
    assert hourly == left[0]
    observer.close()
    blocker.close()

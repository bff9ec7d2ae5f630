"""Fleet-scale read benchmark: partitioned storage, packing, rollups and the one-query fleet API.

    python bench/fleet.py                      # 1,024 GPUs x 10 metrics x 24 h at 30 s, and 128 GPUs x 7 d
    python bench/fleet.py --gpus 64 --week-gpus 16 --runs 3     # a quick look

Loads both fleets straight into PostgreSQL (generate_series, no pipeline: the point is the read side),
runs one maintenance pass (rollups, packing of closed days), then prints, each as the median of
`--runs` runs: bytes per sample (raw, closed/packed, rollups), fleet/aggregate latency for 1 h / 24 h /
7 d windows, `explore.load_window` for 24 h and 7 d, one dashboard refresh, one GPU's 1 h raw read p99,
rollup refresh throughput and the time to drop a day partition. Uses $DATABASE_URL or an embedded
PostgreSQL in a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from telemetry_nb import store  # noqa: E402
from telemetry_nb.analysis import explore  # noqa: E402
from telemetry_nb.analysis.client import TelemetryClient  # noqa: E402
from telemetry_nb.embedded import Embedded, free_port  # noqa: E402
from telemetry_nb.pipeline.codec import gpu_key, metric_key  # noqa: E402
from telemetry_nb.pipeline.maintainer import Maintainer  # noqa: E402
from telemetry_nb.sources.generate import METRICS  # noqa: E402
from telemetry_nb.store import lifecycle  # noqa: E402

T0 = datetime(2025, 7, 1, tzinfo=UTC)


def _db(url: str, name: str) -> str:
    p = urlsplit(url)
    return urlunsplit((p.scheme, p.netloc, f"/{name}", p.query, p.fragment))


class Figures(dict):
    """The printed figures; each is also printed the moment it is measured (a long run shows progress)."""

    def __setitem__(self, key: str, value: str) -> None:
        print(f"  {key}: {value}", flush=True)
        super().__setitem__(key, value)


def _median(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def load_fleet(url: str, gpus: int, seconds: int, interval_s: int) -> tuple[int, float]:
    """GPUs (8 per host) × METRICS × samples every `interval_s` from T0, inserted in time order."""
    ticks = seconds // interval_s
    with psycopg.connect(url, autocommit=True) as conn:
        store.migrate(conn)
        gpu_rows = [(gpu_key(f"GPU-{i:05d}"), f"GPU-{i:05d}", f"host-{i // 8:04d}", i % 8, f"nvidia{i % 8}",
                     "NVIDIA H100 80GB HBM3" if i % 3 else "NVIDIA A100-SXM4-80GB") for i in range(gpus)]
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO gpus VALUES (%s, %s, %s, %s, %s, %s)", gpu_rows)
            cur.executemany("INSERT INTO metrics VALUES (%s, %s)", [(metric_key(m), m) for m in METRICS])
        end = T0 + timedelta(seconds=(ticks - 1) * interval_s)
        with conn.transaction():
            lifecycle.ensure_partitions(conn, "telemetry_raw", T0, end, lifecycle.DAY)
        started = time.perf_counter()
        chunk = 3600 // interval_s  # one hour of the fleet per statement, in time order like live ingestion
        for first in range(0, ticks, chunk):
            last = min(ticks, first + chunk) - 1
            conn.execute(
                "INSERT INTO telemetry_raw SELECT g.id, %s + make_interval(secs => s * %s), m.id, "
                "((abs(g.id %% 9973) + s * 31 + abs(m.id %% 101)) %% 10007) / 100.0, NULL "
                "FROM generate_series(%s::int, %s::int) s CROSS JOIN gpus g CROSS JOIN metrics m",
                (T0, interval_s, first, last))
            done = (last + 1) * gpus * len(METRICS)
            print(f"\r  loaded {done:,} rows ({(last + 1) * interval_s / 3600:.0f} h) "
                  f"in {time.perf_counter() - started:.0f}s", end="", flush=True)
        print()
        rows = ticks * gpus * len(METRICS)
        conn.execute("INSERT INTO telemetry_changes (lo, hi) VALUES (%s, %s)", (T0, end))
        conn.execute("INSERT INTO metric_rows SELECT id, %s FROM metrics", (ticks * gpus,))
        conn.execute("VACUUM ANALYZE")
    return rows, time.perf_counter() - started


def sizes(url: str) -> dict[str, tuple[int, int]]:
    """table → (bytes incl. indexes and TOAST, samples it holds)."""
    out = {}
    with psycopg.connect(url) as conn:
        for table, count in (("telemetry_raw", "count(*)"), ("telemetry_packed", "coalesce(sum(n), 0)"),
                             ("telemetry_1m", "coalesce(sum(count), 0)"), ("telemetry_1h", "coalesce(sum(count), 0)")):
            size = conn.execute("SELECT coalesce(sum(pg_total_relation_size(i.inhrelid)), 0) FROM pg_inherits i "
                                "WHERE i.inhparent = %s::regclass", (table,)).fetchone()[0]
            n = conn.execute(f"SELECT {count} FROM {table}").fetchone()[0]
            out[table] = (int(size), int(n))
    return out


def serve(url: str, tmp: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "DATABASE_URL": url, "TELEMETRY_NB_HOME": str(tmp / "home"), "TELEMETRY_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", "telemetry_nb.cli", "serve", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError("API did not start")


def fleet_latency(base: str, end: datetime, window: timedelta, bucket: str, runs: int) -> tuple[float, int, str]:
    params = {"metric": "DCGM_FI_DEV_GPU_UTIL", "bucket": bucket, "start_time": (end - window).isoformat(),
              "end_time": end.isoformat()}
    body = httpx.get(f"{base}/api/v1/fleet/aggregate", params=params, timeout=120).json()
    t = _median(lambda: httpx.get(f"{base}/api/v1/fleet/aggregate", params=params, timeout=120).raise_for_status(),
                runs)
    return t, len(body["uuid"]), body["resolution"]


def one_gpu_latency(base: str, gpus: int, start: datetime, n: int = 200) -> tuple[float, float]:
    """(p50, p99) of one GPU's 1 h of raw rows (all metrics), random GPUs and hours, one client."""
    rng = random.Random(1)
    times = []
    with httpx.Client(base_url=base, timeout=30) as http:
        for _ in range(n):
            uuid_ = f"GPU-{rng.randrange(gpus):05d}"
            a = start + timedelta(minutes=rng.randrange(0, 60 * 20))
            t = time.perf_counter()
            r = http.get(f"/api/v1/gpus/{uuid_}/telemetry", params={"start_time": a.isoformat(),
                                                                     "end_time": (a + timedelta(hours=1)).isoformat(),
                                                                     "limit": 10000})
            r.raise_for_status()
            times.append(time.perf_counter() - t)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.99) - 1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=1024, help="GPUs of the 24 h fleet (default 1024)")
    parser.add_argument("--week-gpus", type=int, default=128, help="GPUs of the 7 d fleet (default 128)")
    parser.add_argument("--interval", type=int, default=30, help="seconds between samples (default 30)")
    parser.add_argument("--runs", type=int, default=5, help="runs per latency figure (default 5)")
    parser.add_argument("--keep", action="store_true", help="keep the two databases (their names are printed)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="tnb-fleet-") as tmp_s:
        tmp = Path(tmp_s)
        db_url = os.environ.get("DATABASE_URL", "")
        emb = None
        if not db_url:
            emb = Embedded(tmp / "pg", services=("postgresql",))
            db_url = emb.env()["DATABASE_URL"]
        admin = _db(db_url, "postgres")
        names = {"day": f"bench_day_{uuid.uuid4().hex[:8]}", "week": f"bench_week_{uuid.uuid4().hex[:8]}"}
        procs: list[subprocess.Popen] = []
        try:
            with psycopg.connect(admin, autocommit=True) as conn:
                for n in names.values():
                    conn.execute(f"CREATE DATABASE {n}")
            day, week = _db(admin, names["day"]), _db(admin, names["week"])
            fig = Figures()

            print(f"fleet A: {args.gpus} GPUs x {len(METRICS)} metrics x 24 h at {args.interval} s")
            rows_a, load_a = load_fleet(day, args.gpus, 86400, args.interval)
            print(f"fleet B: {args.week_gpus} GPUs x {len(METRICS)} metrics x 7 d at {args.interval} s")
            rows_b, load_b = load_fleet(week, args.week_gpus, 7 * 86400, args.interval)
            raw_a = sizes(day)["telemetry_raw"]
            fig["raw bytes/sample (24 h fleet, as loaded)"] = f"{raw_a[0] / raw_a[1]:.1f}"

            policy = lifecycle.Policy()
            reports = {}
            for label, url in (("A", day), ("B", week)):
                with Maintainer(url, policy) as m:
                    t = time.perf_counter()
                    reports[label] = m.run_once()
                    reports[label].refresh.seconds = reports[label].refresh.seconds or (time.perf_counter() - t)
                r = reports[label]
                print(f"maintain on fleet {label}: refresh {r.refresh.seconds:.1f}s "
                      f"({r.refresh.rows_1m:,} 1m + {r.refresh.rows_1h:,} 1h rows), packed {len(r.packed)} partitions")
                with psycopg.connect(url, autocommit=True) as conn:  # settled, as autovacuum would leave it
                    conn.execute("VACUUM ANALYZE")
            rr = reports["A"].refresh
            fig["rollup refresh throughput (raw rows/s, 24 h fleet)"] = f"{rows_a / rr.seconds:,.0f}"
            sz_b = sizes(week)
            packed = sz_b["telemetry_packed"]
            fig["closed ranges bytes/sample (packed, 7 d fleet)"] = f"{packed[0] / packed[1]:.1f}"
            fig["open raw bytes/sample (7 d fleet, last 2 days)"] = (
                f"{sz_b['telemetry_raw'][0] / max(sz_b['telemetry_raw'][1], 1):.1f}")
            for label, url, rows in (("24 h fleet", day, rows_a), ("7 d fleet", week, rows_b)):
                s = sizes(url)
                fig[f"1m rollup bytes per raw sample ({label})"] = f"{s['telemetry_1m'][0] / rows:.1f}"
                fig[f"1h rollup bytes per raw sample ({label})"] = f"{s['telemetry_1h'][0] / rows:.2f}"

            proc_a, base_a = serve(day, tmp)
            proc_b, base_b = serve(week, tmp)
            procs += [proc_a, proc_b]
            end_a = T0 + timedelta(days=1) - timedelta(seconds=args.interval)
            end_b = T0 + timedelta(days=7) - timedelta(seconds=args.interval)
            for label, base, end, window, bucket in (
                    (f"1 h, {args.gpus:,} GPUs, bucket 1m", base_a, end_a, timedelta(hours=1), "1m"),
                    (f"24 h, {args.gpus:,} GPUs, bucket 15m", base_a, end_a, timedelta(days=1), "15m"),
                    (f"24 h, {args.gpus:,} GPUs, bucket 1h", base_a, end_a, timedelta(days=1), "1h"),
                    (f"7 d, {args.week_gpus:,} GPUs, bucket 1h", base_b, end_b, timedelta(days=7), "1h")):
                t, n, res = fleet_latency(base, end, window, bucket, args.runs)
                fig[f"fleet/aggregate {label} ({n:,} elements, {res})"] = f"{t * 1000:.0f} ms"

            with TelemetryClient(base_a, timeout=120) as client:
                known = [m.name for m in client.metrics()]
                t = _median(lambda: explore.load_window(client, window="24h", known_metrics=known), args.runs)
                fig[f"explore.load_window 24 h ({args.gpus:,} GPUs)"] = f"{t:.2f} s"
            with TelemetryClient(base_b, timeout=120) as client:
                known = [m.name for m in client.metrics()]
                t = _median(lambda: explore.load_window(client, window="7d", known_metrics=known), args.runs)
                fig[f"explore.load_window 7 d ({args.week_gpus:,} GPUs)"] = f"{t:.2f} s"
            from telemetry_nb.analysis.dashboard import Dashboard

            for window in ("15m", "24h"):
                dash = Dashboard(base_a, refresh_s=0, window=window)
                t = time.perf_counter()
                dash.refresh()  # the page opening: a full load, and the SVG workers starting
                fig[f"dashboard first load incl. SVG rendering, window {window} ({args.gpus:,} GPUs)"] = (
                    f"{time.perf_counter() - t:.2f} s")
                full = []
                for _ in range(args.runs):
                    dash.refreshes = 0  # the next refresh is a full one (as every 20th is)
                    t = time.perf_counter()
                    dash.refresh(reload=True)
                    full.append(time.perf_counter() - t)
                fig[f"dashboard full reload incl. SVG rendering, window {window}"] = f"{statistics.median(full):.2f} s"
                fig[f"dashboard refresh incl. SVG rendering, window {window}"] = (
                    f"{_median(lambda d=dash: d.refresh(reload=True), args.runs):.2f} s")
                assert not dash.errors, dash.errors[-1]
            for label, base, n in (("24 h fleet, raw partitions", base_a, args.gpus),
                                   ("7 d fleet, packed days", base_b, args.week_gpus)):
                p50, p99 = one_gpu_latency(base, n, T0)
                fig[f"one GPU 1 h read p50 / p99 ({label})"] = f"{p50 * 1000:.0f} / {p99 * 1000:.0f} ms"
            for label, base, end, window in ((f"24 h, {args.gpus:,} GPUs", base_a, end_a, timedelta(days=1)),
                                             (f"7 d, {args.week_gpus:,} GPUs", base_b, end_b, timedelta(days=7))):
                params = {"group_by": "namespace", "start_time": (end - window).isoformat(),
                          "end_time": end.isoformat()}
                t = _median(lambda p=params, b=base: httpx.get(f"{b}/api/v1/usage", params=p,
                                                               timeout=120).raise_for_status(), args.runs)
                fig[f"usage?group_by=namespace {label}"] = f"{t * 1000:.0f} ms"

            with psycopg.connect(week, autocommit=True) as conn:
                ref = lifecycle.reference_time(conn, datetime.now(UTC))
                t = time.perf_counter()
                dropped = lifecycle.enforce_retention(conn, lifecycle.Policy(retention_raw=timedelta(days=5, hours=1)),
                                                      ref)
                took = time.perf_counter() - t
            names_dropped = ", ".join(v for vs in dropped.values() for v in vs)
            fig[f"drop one day partition ({names_dropped})"] = f"{took * 1000:.0f} ms"

            print(f"\nloaded {rows_a:,} rows in {load_a:.0f}s and {rows_b:,} rows in {load_b:.0f}s; "
                  f"medians of {args.runs} runs\n")
            width = max(len(k) for k in fig)
            for k, v in fig.items():
                print(f"{k:<{width}}  {v:>12}")
        finally:
            for p in procs:
                p.terminate()
                p.wait(timeout=15)
            if args.keep:
                print(f"kept databases {', '.join(names.values())}")
            else:
                with psycopg.connect(admin, autocommit=True) as conn:
                    for n in names.values():
                        conn.execute(f"DROP DATABASE IF EXISTS {n} WITH (FORCE)")
            if emb is not None and not args.keep:
                emb.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

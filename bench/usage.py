"""GPU accounting benchmark: `/api/v1/usage?group_by=namespace` latency over 24 h and 7 days.

    python bench/usage.py                         # 1,024 GPUs x 24 h and 128 GPUs x 7 d, at 30 s
    python bench/usage.py --gpus 64 --week-gpus 1024 --runs 3     # e.g. the 1,024-GPU week

Loads fleets straight into PostgreSQL (generate_series, like bench/fleet.py, whose helpers it reuses) with
workloads on the rows: pods of 8 namespaces scheduled onto GPUs for 4-hour stretches, some GPU-hours
unattributed (0 %), one pod in five holding its GPUs at 0 % utilization, the others at 30–100 %, so attribution
and idle accounting are
non-trivial. Two metrics per GPU (GPU_UTIL and GPU_TEMP: usage reads only the first). One maintenance pass
(rollups, packing of closed days), then prints medians of `--runs` runs of /api/v1/usage for the whole window,
per fleet, and the per-group figures' check sum (Σ gpu_hours == fleet GPU-hours).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path

import httpx
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from fleet import T0, _db, _median, serve  # noqa: E402

from telemetry_nb import store  # noqa: E402
from telemetry_nb.embedded import Embedded  # noqa: E402
from telemetry_nb.pipeline.codec import gpu_key, metric_key  # noqa: E402
from telemetry_nb.pipeline.maintainer import Maintainer  # noqa: E402
from telemetry_nb.store import lifecycle  # noqa: E402

METRICS = ("DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_GPU_TEMP")
PODS, NAMESPACES, STRETCH_S = 64, 8, 4 * 3600


def load(url: str, gpus: int, seconds: int, interval_s: int, metrics: tuple[str, ...] = METRICS) -> int:
    """GPUs × 2 metrics × samples every `interval_s`, each sample attributed to its GPU's pod of the stretch."""
    ticks = seconds // interval_s
    per_stretch = STRETCH_S // interval_s
    with psycopg.connect(url, autocommit=True) as conn:
        store.migrate(conn)
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO gpus VALUES (%s, %s, %s, %s, %s, %s)",
                            [(gpu_key(f"GPU-{i:05d}"), f"GPU-{i:05d}", f"host-{i // 8:04d}", i % 8, f"nvidia{i % 8}",
                              "NVIDIA H100 80GB HBM3") for i in range(gpus)])
            cur.executemany("INSERT INTO metrics VALUES (%s, %s)", [(metric_key(m), m) for m in metrics])
            cur.executemany("INSERT INTO workloads VALUES (%s, %s, %s, %s)",
                            [(1000 + p, f"ns-{p % NAMESPACES}", f"pod-{p:03d}", "main") for p in range(PODS)])
        end = T0 + timedelta(seconds=(ticks - 1) * interval_s)
        with conn.transaction():
            lifecycle.ensure_partitions(conn, "telemetry_raw", T0, end, lifecycle.DAY)
        started = time.perf_counter()
        chunk = 3600 // interval_s
        # pod of (GPU, stretch): 8 GPUs of a host share one pod; every 10th (host, stretch) is unattributed
        # (0 %); pods ≡ 0 mod 5 hold their GPUs at 0 %, the others run at 30–100 %
        pod = f"((g.n / 8 + s / {per_stretch}) %% {PODS})"
        unattributed = f"((g.n / 8 * 7 + s / {per_stretch}) %% 10 = 0)"
        for first in range(0, ticks, chunk):
            last = min(ticks, first + chunk) - 1
            conn.execute(
                "INSERT INTO telemetry_raw SELECT g.id, %s + make_interval(secs => s * %s), m.id, "
                f"CASE WHEN {unattributed} OR {pod} %% 5 = 0 THEN 0 "
                "ELSE 30 + ((abs(g.id %% 9973) + s * 31 + abs(m.id %% 101)) %% 71) END, "
                f"CASE WHEN {unattributed} THEN NULL ELSE 1000 + {pod} END "
                "FROM generate_series(%s::int, %s::int) s CROSS JOIN "
                "(SELECT id, row_number() OVER (ORDER BY uuid) - 1 AS n FROM gpus) g CROSS JOIN metrics m",
                (T0, interval_s, first, last))
            print(f"\r  loaded {(last + 1) * gpus * len(metrics):,} rows ({(last + 1) * interval_s / 3600:.0f} h) "
                  f"in {time.perf_counter() - started:.0f}s", end="", flush=True)
        print()
        conn.execute("INSERT INTO telemetry_changes (lo, hi) VALUES (%s, %s)", (T0, end))
        conn.execute("INSERT INTO metric_rows SELECT id, %s FROM metrics", (ticks * gpus,))
        conn.execute("VACUUM ANALYZE")
    return ticks * gpus * len(metrics)


def usage_latency(base: str, days: int, interval_s: int, runs: int) -> tuple[float, dict]:
    end = T0 + timedelta(days=days) - timedelta(seconds=interval_s)
    params = {"group_by": "namespace", "start_time": T0.isoformat(), "end_time": end.isoformat()}
    body = httpx.get(f"{base}/api/v1/usage", params=params, timeout=300).json()
    t = _median(lambda: httpx.get(f"{base}/api/v1/usage", params=params, timeout=300).raise_for_status(), runs)
    return t, body


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=1024, help="GPUs of the 24 h fleet (default 1024; 0 skips)")
    parser.add_argument("--week-gpus", type=int, default=128, help="GPUs of the 7 d fleet (default 128; 0 skips)")
    parser.add_argument("--interval", type=int, default=30, help="seconds between samples (default 30)")
    parser.add_argument("--runs", type=int, default=5, help="runs per latency figure (default 5)")
    parser.add_argument("--util-only", action="store_true", help="load GPU_UTIL only (halves load and rollup time)")
    args = parser.parse_args()
    metrics = METRICS[:1] if args.util_only else METRICS
    fleets = [(f"24 h, {args.gpus:,} GPUs", args.gpus, 1), (f"7 d, {args.week_gpus:,} GPUs", args.week_gpus, 7)]
    fleets = [f for f in fleets if f[1] > 0]
    with tempfile.TemporaryDirectory(prefix="tnb-usage-") as tmp_s:
        tmp = Path(tmp_s)
        db_url = os.environ.get("DATABASE_URL", "")
        emb = None
        if not db_url:
            emb = Embedded(tmp / "pg", services=("postgresql",))
            db_url = emb.env()["DATABASE_URL"]
        admin = _db(db_url, "postgres")
        names = [f"bench_usage_{uuid.uuid4().hex[:8]}" for _ in fleets]
        procs: list[subprocess.Popen] = []
        fig: dict[str, str] = {}
        try:
            for (label, gpus, days), name in zip(fleets, names, strict=True):
                with psycopg.connect(admin, autocommit=True) as conn:
                    conn.execute(f"CREATE DATABASE {name}")
                url = _db(admin, name)
                print(f"fleet {label} x {len(metrics)} metrics at {args.interval} s")
                t = time.perf_counter()
                rows = load(url, gpus, days * 86400, args.interval, metrics)
                print(f"  loaded {rows:,} rows in {time.perf_counter() - t:.0f}s")
                t = time.perf_counter()
                with Maintainer(url, lifecycle.Policy()) as m:
                    r = m.run_once()
                print(f"  maintain: {r.refresh.rows_1m:,} 1m + {r.refresh.rows_1h:,} 1h rows, "
                      f"packed {len(r.packed)} partitions, {time.perf_counter() - t:.0f}s")
                proc, base = serve(url, tmp)
                procs.append(proc)
                t, body = usage_latency(base, days, args.interval, args.runs)
                total = sum(i["gpu_hours"] for i in body["items"])
                share = next((i["gpu_hours"] for i in body["items"] if i["group"] is None), 0.0) / total
                fig[f"usage?group_by=namespace, {label} ({len(body['items'])} groups)"] = f"{t * 1000:.0f} ms"
                fig[f"  Σ gpu_hours / (GPUs × window), {label}"] = f"{total / (gpus * days * 24):.6f}"
                fig[f"  unattributed share, {label}"] = f"{share:.1%}"
                proc.terminate()
                proc.wait(timeout=15)
            print(f"\nmedians of {args.runs} runs\n")
            width = max(len(k) for k in fig)
            for k, v in fig.items():
                print(f"{k:<{width}}  {v:>12}")
        finally:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
                    p.wait(timeout=15)
            with psycopg.connect(admin, autocommit=True) as conn:
                for n in names:
                    conn.execute(f"DROP DATABASE IF EXISTS {n} WITH (FORCE)")
            if emb is not None:
                emb.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""API under load: req/s and latency percentiles of `telemetry-nb serve --workers N` at 8, 32 and 128 clients.

    python bench/api.py                                   # embedded PostgreSQL, fleet built, dropped after
    python bench/api.py --database-url postgresql://postgres@127.0.0.1:44317/apibench --keep   # build once
    python bench/api.py --database-url postgresql://postgres@127.0.0.1:44317/apibench          # reuse it
    python bench/api.py --workers 1,2 --concurrency 32 --duration 5                           # compare

The fleet is bench/fleet.py's (1,024 GPUs x 10 metrics x 24 h at 30 s = 29.5 M rows, one maintenance pass,
VACUUM ANALYZE), loaded by its functions. A database given by `--database-url` is created when missing and
reused when it already holds that fleet. The server runs as a subprocess; the load comes from another
process (asyncio + aiohttp, one connection per client, each client sending its next request as soon as the
last one is answered). Two request kinds:

- gpu:   one random GPU's 1 h of one metric (120 rows): /api/v1/gpus/{uuid}/telemetry?metric=…
- fleet: the dashboard's default fleet view: /api/v1/fleet/aggregate, GPU utilization, 15 min in 1 min
         buckets for every GPU (16 k elements, from the 1 min rollups)

For each (kind, clients) it prints req/s, p50/p99/max latency of every answer, the count of 503s (with
their own max latency: overload must be answered fast) and of other errors, and the server's CPU per answer
(its processes' user + system time over the run, warm-up included, from /proc): on a shared machine req/s
moves with the neighbours' load, CPU per answer much less. Environment variables of the
server (TELEMETRY_API_POOL_SIZE, TELEMETRY_API_MAX_IN_FLIGHT, …) pass through to it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path

import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fleet  # noqa: E402  (bench/fleet.py: the loader this bench shares; it puts the repo on sys.path)

from telemetry_nb.api.limits import default_workers  # noqa: E402
from telemetry_nb.embedded import Embedded, free_port  # noqa: E402
from telemetry_nb.pipeline.maintainer import Maintainer  # noqa: E402
from telemetry_nb.sources.generate import METRICS  # noqa: E402
from telemetry_nb.store import lifecycle  # noqa: E402

METRIC = "DCGM_FI_DEV_GPU_UTIL"


# -- the fleet database -------------------------------------------------------------------------
def ensure_fleet(url: str, gpus: int, interval_s: int) -> str:
    """Create the database of `url` when missing and load the 24 h fleet unless it already holds it."""
    admin = fleet._db(url, "postgres")
    name = url.rsplit("/", 1)[1].split("?")[0]
    with psycopg.connect(admin, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            conn.execute(f'CREATE DATABASE "{name}"')
    expected = (86400 // interval_s) * gpus * len(METRICS)
    with psycopg.connect(url, autocommit=True) as conn:
        have = conn.execute("SELECT to_regclass('metric_rows') IS NOT NULL").fetchone()[0] and \
            conn.execute("SELECT coalesce(sum(rows), 0) FROM metric_rows").fetchone()[0]
    if have == expected:
        print(f"reusing {name}: {expected:,} rows ({gpus} GPUs x {len(METRICS)} metrics x 24 h at {interval_s} s)")
        return "reused"
    if have:
        raise SystemExit(f"{name} holds {have:,} rows, not the {expected:,} of this fleet: use another database")
    print(f"building {name}: {gpus} GPUs x {len(METRICS)} metrics x 24 h at {interval_s} s = {expected:,} rows")
    rows, took = fleet.load_fleet(url, gpus, 86400, interval_s)
    with Maintainer(url, lifecycle.Policy()) as m:
        t = time.perf_counter()
        m.run_once()
        print(f"  maintenance pass (rollups, packing) {time.perf_counter() - t:.0f}s")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
    print(f"  loaded {rows:,} rows in {took:.0f}s")
    return "built"


def prewarm(url: str) -> float:
    """Read the fleet's raw rows, their primary key and the 1 min rollups once; returns the seconds it took.

    So that every run measures a database whose pages are in memory, as a serving deployment's are: right
    after PostgreSQL starts (or after other work evicted the OS cache), the first run would measure the disk.
    """
    started = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT count(*) FROM telemetry_raw")  # the heap (sequential scan)
        conn.execute("SELECT count(*) FROM telemetry_1m")
        conn.execute("SET enable_seqscan = off")
        conn.execute("SET enable_bitmapscan = off")
        conn.execute("SELECT count(*) FROM telemetry_raw WHERE gpu_id >= %s", (-(2 ** 63),))  # the whole key index
    return time.perf_counter() - started


# -- the server ---------------------------------------------------------------------------------
def serve(url: str, workers: int, home: Path) -> tuple[subprocess.Popen, str]:
    """`telemetry-nb serve --workers N` over `url` on a free port; waits until every worker answers."""
    port = free_port()
    env = {**os.environ, "DATABASE_URL": url, "TELEMETRY_NB_HOME": str(home), "TELEMETRY_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", "telemetry_nb.cli", "serve", "--port", str(port),
                             "--workers", str(workers)], env=env, stdout=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve exited with {proc.returncode}")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                time.sleep(1.0 + 0.2 * workers)  # the other workers finish starting too
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.terminate()
    raise RuntimeError("API did not start")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- the load (run in its own process: `--load-spec`) ---------------------------------------------
def _paths(kind: str, gpus: int, interval_s: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    t0, end = fleet.T0, fleet.T0 + timedelta(days=1) - timedelta(seconds=interval_s)
    if kind == "fleet":
        a = (end - timedelta(minutes=15)).replace(second=0)
        return [f"/api/v1/fleet/aggregate?metric={METRIC}&bucket=1m&start_time={a.isoformat()}"
                f"&end_time={end.isoformat()}".replace("+00:00", "Z")]
    out = []
    for _ in range(4096):
        a = t0 + timedelta(seconds=interval_s * rng.randrange(0, (86400 - 3600) // interval_s))
        b = a + timedelta(hours=1) - timedelta(seconds=1)
        out.append(f"/api/v1/gpus/GPU-{rng.randrange(gpus):05d}/telemetry?metric={METRIC}"
                   f"&start_time={a.isoformat()}&end_time={b.isoformat()}".replace("+00:00", "Z"))
    return out


async def _load(spec: dict) -> dict:
    import aiohttp

    paths = _paths(spec["kind"], spec["gpus"], spec["interval"], spec["seed"])
    lat: list[float] = []
    lat_503: list[float] = []
    errors: dict[str, int] = {}
    counting = False
    answered = [0]  # every answer, warm-up included (the server's CPU is read over the whole run)
    stop_at = 0.0
    timeout = aiohttp.ClientTimeout(total=spec["timeout"])
    connector = aiohttp.TCPConnector(limit=spec["clients"], force_close=False)
    async with aiohttp.ClientSession(spec["base"], connector=connector, timeout=timeout) as http:
        async def client(i: int) -> None:
            n = i
            while time.perf_counter() < stop_at:
                path = paths[n % len(paths)]
                n += spec["clients"]
                t = time.perf_counter()
                try:
                    async with http.get(path) as r:
                        await r.read()
                        status = r.status
                        rows = None
                except (TimeoutError, aiohttp.ClientError) as err:
                    status, rows = None, type(err).__name__
                took = time.perf_counter() - t
                answered[0] += 1
                if not counting:
                    continue
                if status == 200:
                    lat.append(took)
                elif status == 503:
                    lat_503.append(took)
                else:
                    key = rows or str(status)
                    errors[key] = errors.get(key, 0) + 1
                    lat.append(took)

        stop_at = time.perf_counter() + spec["warmup"] + spec["duration"]
        tasks = [asyncio.create_task(client(i)) for i in range(spec["clients"])]
        await asyncio.sleep(spec["warmup"])
        counting, started, cpu = True, time.perf_counter(), time.process_time()
        await asyncio.gather(*tasks)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {"ok": lat, "503": lat_503, "errors": errors, "elapsed": elapsed, "client_cpu_s": cpu,
            "answered": answered[0]}


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` and its direct children (serve's workers), from /proc."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:  # not Linux
        return float("nan")
    total = 0
    for p in [pid, *map(int, children)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def run_load(spec: dict) -> dict:
    """The load of `spec` from a separate Python process (its CPU is not the server's)."""
    out = subprocess.run([sys.executable, __file__, "--load-spec", json.dumps(spec)], capture_output=True,
                         text=True, check=True, timeout=spec["warmup"] + spec["duration"] + spec["timeout"] + 60)
    return json.loads(out.stdout)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))]


def summarize(res: dict) -> dict:
    everything = res["ok"] + res["503"]
    n = len(everything)
    return {"req/s": n / res["elapsed"], "ok/s": len(res["ok"]) / res["elapsed"],
            "p50": statistics.median(everything) if everything else float("nan"),
            "p99": _pct(everything, 0.99), "max": max(everything, default=float("nan")),
            "503": len(res["503"]), "503 max": max(res["503"], default=0.0),
            "errors": sum(res["errors"].values()), "error kinds": res["errors"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", help="PostgreSQL database for the fleet (created when missing, reused "
                                               "when it holds the fleet, kept); default: an embedded server's")
    parser.add_argument("--keep", action="store_true", help="without --database-url: build (or reuse) database "
                                                            "bench_api of the embedded server under .telemetry-nb "
                                                            "and keep it")
    parser.add_argument("--gpus", type=int, default=1024, help="GPUs of the fleet (default 1024)")
    parser.add_argument("--interval", type=int, default=30, help="seconds between samples (default 30)")
    parser.add_argument("--workers", default=str(default_workers()),
                        help="serve --workers; a comma list compares several (default: the CPU count)")
    parser.add_argument("--concurrency", default="8,32,128", help="concurrent clients (default 8,32,128)")
    parser.add_argument("--kinds", default="gpu,fleet", help="request kinds: gpu, fleet (default both)")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per step (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each (default 2)")
    parser.add_argument("--timeout", type=float, default=30.0, help="client timeout per request (default 30)")
    parser.add_argument("--load-spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load_spec:
        print(json.dumps(asyncio.run(_load(json.loads(args.load_spec)))))
        return 0

    workers = [int(w) for w in args.workers.split(",")]
    clients = [int(c) for c in args.concurrency.split(",")]
    kinds = [k.strip() for k in args.kinds.split(",")]
    with tempfile.TemporaryDirectory(prefix="tnb-api-") as tmp_s:
        tmp = Path(tmp_s)
        emb, url, drop = None, args.database_url, None
        if not url:  # kept: in the default embedded home, where the next --keep run finds it again
            emb = Embedded(Path(".telemetry-nb") if args.keep else tmp / "pg", services=("postgresql",))
            name = "bench_api" if args.keep else f"bench_api_{uuid.uuid4().hex[:8]}"
            url = fleet._db(emb.env()["DATABASE_URL"], name)
            drop = None if args.keep else url
        try:
            ensure_fleet(url, args.gpus, args.interval)
            print(f"prewarm: read the fleet's rows, key index and rollups once in {prewarm(url):.1f}s")
            table = []
            for w in workers:
                proc, base = serve(url, w, tmp / "home")
                try:
                    for kind in kinds:
                        for c in clients:
                            spec = {"base": base, "kind": kind, "clients": c, "gpus": args.gpus,
                                    "interval": args.interval, "seed": c, "warmup": args.warmup,
                                    "duration": args.duration, "timeout": args.timeout}
                            cpu0 = process_cpu_s(proc.pid)
                            res = run_load(spec)
                            s = summarize(res)
                            # robust on a shared machine, unlike req/s: what one answer costs the server
                            s["server ms"] = (process_cpu_s(proc.pid) - cpu0) * 1000 / max(1, res["answered"])
                            s["client ms"] = res["client_cpu_s"] * 1000 / max(1, len(res["ok"]) + len(res["503"]))
                            row = (w, kind, c, s)
                            table.append(row)
                            print(f"  workers={w} {kind:<5} clients={c:<4} {s['req/s']:7.0f} req/s "
                                  f"(200: {s['ok/s']:.0f}/s)  p50 {s['p50'] * 1000:6.1f} ms  "
                                  f"p99 {s['p99'] * 1000:6.1f} ms  max {s['max'] * 1000:7.1f} ms  "
                                  f"503: {s['503']} (max {s['503 max'] * 1000:.0f} ms)  "
                                  f"errors: {s['errors']} {s['error kinds'] or ''}  CPU per answer: server "
                                  f"{s['server ms']:.2f} ms, load generator {s['client ms']:.2f} ms", flush=True)
                finally:
                    stop(proc)
            print(f"\n{'workers':>7} {'kind':<6} {'clients':>7} {'req/s':>8} {'200/s':>8} {'p50 ms':>8} "
                  f"{'p99 ms':>8} {'max ms':>8} {'503s':>6} {'503 max':>8} {'errors':>6} {'srv ms/ans':>10}")
            for w, kind, c, s in table:
                print(f"{w:>7} {kind:<6} {c:>7} {s['req/s']:>8.0f} {s['ok/s']:>8.0f} {s['p50'] * 1000:>8.1f} "
                      f"{s['p99'] * 1000:>8.1f} {s['max'] * 1000:>8.0f} {s['503']:>6} {s['503 max'] * 1000:>8.0f} "
                      f"{s['errors']:>6} {s['server ms']:>10.2f}")
            for w, kind, c, s in table:
                if kind == "gpu" and c == 32:
                    print(f"workers={w}: gpu at 32 clients {s['req/s']:.0f} req/s = {s['req/s'] / 238:.2f}x the "
                          f"issue's 238 req/s (target >= 3x), p99 {s['p99'] * 1000:.0f} ms (target <= 150)")
                if c == 128:
                    print(f"workers={w}: {kind} at 128 clients max {s['max'] * 1000:.0f} ms (target <= 2000), "
                          f"errors other than 503: {s['errors']} (target 0)")
        finally:
            if drop:
                with psycopg.connect(fleet._db(drop, "postgres"), autocommit=True) as conn:
                    conn.execute(f"DROP DATABASE IF EXISTS {drop.rsplit('/', 1)[1]} WITH (FORCE)")
            elif emb is not None or args.database_url:
                print(f"kept database {url}")
            if emb is not None and not args.keep:
                emb.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

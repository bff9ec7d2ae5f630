"""End-to-end ingest benchmark: streamer → Redis → collector → PostgreSQL, against a raw COPY of the same rows.

    python bench/ingest.py --rows 1000000

Uses $REDIS_URL/$DATABASE_URL or starts embedded servers in a temporary folder. Prints both rates,
their ratio, and the streamer's peak RSS.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from telemetry_nb.embedded import Embedded  # noqa: E402
from telemetry_nb.observability import peak_rss_kib  # noqa: E402
from telemetry_nb.sources.dcgm_csv import read_samples  # noqa: E402
from telemetry_nb.sources.generate import METRICS, generate_rows, write_csv  # noqa: E402


def _db(url: str, name: str) -> str:
    p = urlsplit(url)
    return urlunsplit((p.scheme, p.netloc, f"/{name}", p.query, p.fragment))


def _cli(*args: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "telemetry_nb.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def raw_copy_rate(admin_url: str, csv_path: Path, rows: int) -> float:
    """COPY the same rows (as ids) into an empty table keyed like `telemetry`; returns rows/s of the COPY alone.

    Its ids are narrower (`int`/`smallint`) than the store's (`bigint`/`int`), so the ceiling is slightly high.
    """
    name = f"bench_raw_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        gpu_ids: dict[str, int] = {}
        metric_ids = {m: i + 1 for i, m in enumerate(METRICS)}
        lines = []
        for s in read_samples(csv_path, with_labels=False):
            gid = gpu_ids.setdefault(s.uuid, len(gpu_ids) + 1)
            lines.append(f"{gid}\t{s.ts.isoformat()}\t{metric_ids.get(s.metric, 99)}\t{s.value!r}\t\\N\n")
        payload = "".join(lines).encode()
        with psycopg.connect(_db(admin_url, name)) as conn:
            conn.execute("CREATE TABLE telemetry (gpu_id int NOT NULL, ts timestamptz NOT NULL, "
                         "metric_id smallint NOT NULL, value double precision NOT NULL, workload_id int, "
                         "PRIMARY KEY (gpu_id, ts, metric_id))")
            conn.commit()
            started = time.perf_counter()
            with conn.cursor() as cur, cur.copy("COPY telemetry FROM STDIN") as copy:
                for i in range(0, len(payload), 1 << 20):
                    copy.write(payload[i:i + (1 << 20)])
            conn.commit()
            elapsed = time.perf_counter() - started
            assert conn.execute("SELECT count(*) FROM telemetry").fetchone()[0] == rows
        return rows / elapsed
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def end_to_end(redis_url: str, admin_url: str, csv_path: Path, rows: int, collectors: int,
               workers: str = "auto") -> tuple[float, int]:
    """Stream the file and collect it until drained; returns (rows/s, streamer peak RSS in KiB)."""
    name = f"bench_e2e_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    stream = f"bench-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "REDIS_URL": redis_url, "DATABASE_URL": _db(admin_url, name),
           "TELEMETRY_STREAM": stream, "TELEMETRY_LOG_LEVEL": "WARNING"}
    try:
        subprocess.run([sys.executable, "-c", "from telemetry_nb import store; import os; "
                        "store.migrate(store.connect(os.environ['DATABASE_URL']))"], env=env, check=True)
        started = time.perf_counter()
        streamer = _cli("stream", "--csv", str(csv_path), "--workers", workers, "--parser", "fast", env=env)
        # not --drain: a collector that starts before the streamer's first entry would find nothing to drain
        workers = [_cli("collect", "--consumer", f"bench-{i}", env=env) for i in range(collectors)]
        peak_kib = 0
        while streamer.poll() is None:  # VmHWM of the streamer and its parser workers
            peak_kib = max(peak_kib, peak_rss_kib(streamer.pid))
            time.sleep(0.02)
        if streamer.returncode != 0:
            raise RuntimeError(f"streamer failed: {streamer.stderr.read()[-2000:]}")
        with psycopg.connect(_db(admin_url, name), autocommit=True) as conn:
            while (conn.execute("SELECT coalesce(sum(rows), 0) FROM metric_rows").fetchone()[0] < rows
                   and all(w.poll() is None for w in workers)):
                time.sleep(0.05)
        elapsed = time.perf_counter() - started
        for w in workers:
            w.terminate()
            out, err = w.communicate()
            if w.returncode not in (0, -15):
                raise RuntimeError(f"collector failed: {err[-2000:]}")
        with psycopg.connect(_db(admin_url, name)) as conn:
            stored = conn.execute("SELECT count(*) FROM telemetry").fetchone()[0]
        if stored != rows:
            raise RuntimeError(f"stored {stored} rows, expected {rows}")
        return rows / elapsed, peak_kib
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def collector_alone(redis_url: str, admin_url: str, csv_path: Path, rows: int) -> float:
    """Publish everything first, then time one collector draining it: the write path on its own."""
    name = f"bench_col_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    env = {**os.environ, "REDIS_URL": redis_url, "DATABASE_URL": _db(admin_url, name),
           "TELEMETRY_STREAM": f"bench-{uuid.uuid4().hex[:8]}", "TELEMETRY_LOG_LEVEL": "WARNING"}
    try:
        subprocess.run([sys.executable, "-c", "from telemetry_nb import store; import os; "
                        "store.migrate(store.connect(os.environ['DATABASE_URL']))"], env=env, check=True)
        subprocess.run([sys.executable, "-m", "telemetry_nb.cli", "stream", "--csv", str(csv_path),
                        "--high-water", "0"], env=env, check=True, capture_output=True)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "telemetry_nb.cli", "collect", "--drain"], env=env, check=True,
                       capture_output=True)
        return rows / (time.perf_counter() - started)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def parser_rates(csv_path: Path, tmp: Path) -> dict[str, float]:
    """rows/s of the exact and the fast CSV parser (parse + validate + encode, one process), clean and dirty.

    The dirty copy has 1 % bad rows (an unparseable timestamp, a short row, in turn). Timed in this
    process's CPU time (both parsers use one thread), so other load on a shared machine moves it less.
    """
    from telemetry_nb.pipeline.streamer import FAST_CHUNK_BYTES, encode_chunk
    from telemetry_nb.sources.dcgm_csv import split_records

    dirty = tmp / "dirty.csv"
    with open(csv_path, "rb") as src, open(dirty, "wb") as dst:
        for i, line in enumerate(src):
            if i and i % 100 == 0:
                line = line.replace(b'"', b'"x', 1) if i % 200 else line.split(b",", 3)[0] + b"\r\n"
            dst.write(line)
    rates = {}
    for parser in ("exact", "fast"):  # imports and per-process caches warm, as in a long load
        encode_chunk(next(split_records(csv_path)), 1000, (0, 1), None, parser)
    for name, path in (("clean", csv_path), ("dirty", dirty)):
        for parser in ("exact", "fast"):
            started, rows = time.process_time(), 0
            for chunk in split_records(path, FAST_CHUNK_BYTES if parser == "fast" else 4 << 20):  # as `stream`
                entries, rejected, _ = encode_chunk(chunk, 1000, (0, 1), None, parser)
                rows += sum(n for _, n in entries) + len(rejected)
            rates[f"{parser} {name}"] = rows / (time.process_time() - started)
    dirty.unlink()
    return rates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows to ingest (default 1,000,000)")
    parser.add_argument("--collectors", type=int, default=1, help="collector processes (default 1)")
    parser.add_argument("--csv", help="reuse this generated CSV instead of generating one")
    parser.add_argument("--workers", default="auto", help="streamer parser processes (default auto)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="tnb-bench-") as tmp:
        redis_url, db_url = os.environ.get("REDIS_URL", ""), os.environ.get("DATABASE_URL", "")
        emb = None
        if not (redis_url and db_url):
            emb = Embedded(Path(tmp) / "home")
            env = emb.env()
            redis_url, db_url = redis_url or env["REDIS_URL"], db_url or env["DATABASE_URL"]
        admin = _db(db_url, "postgres")
        try:
            gpus = 800
            ticks = max(1, args.rows // (gpus * len(METRICS)))
            rows = ticks * gpus * len(METRICS)
            csv_path = Path(args.csv) if args.csv else Path(tmp) / "bench.csv"
            if not args.csv:
                t = time.perf_counter()
                write_csv(csv_path, generate_rows(100, 8, ticks, 1.0, seed=1))
                print(f"generated {rows:,} rows ({csv_path.stat().st_size / 1e6:.0f} MB) "
                      f"in {time.perf_counter() - t:.1f}s")
            rates = parser_rates(csv_path, Path(tmp))
            for kind in ("clean", "dirty"):
                exact, fast = rates[f"exact {kind}"], rates[f"fast {kind}"]
                print(f"CSV parser, one process, parse + validate + encode, {kind}"
                      f"{' (1 % bad rows)' if kind == 'dirty' else ''}: exact {exact:,.0f} rows/s, "
                      f"fast {fast:,.0f} rows/s ({fast / exact:.1f}x)")
            e2e, peak_kib = end_to_end(redis_url, admin, csv_path, rows, args.collectors, args.workers)
            col = collector_alone(redis_url, admin, csv_path, rows)
            raw = raw_copy_rate(admin, csv_path, rows)
            print(f"raw COPY into (gpu, ts, metric)-keyed table: {raw:,.0f} rows/s")
            print(f"collector alone, draining a pre-filled stream: {col:,.0f} rows/s ({col / raw:.2f}x raw COPY)")
            print(f"end to end (stream [{args.workers} parser(s)] -> Redis -> {args.collectors} collector(s) -> "
                  "PostgreSQL, drained): "
                  f"{e2e:,.0f} rows/s")
            print(f"ratio end-to-end / raw COPY: {e2e / raw:.2f}x (target >= 0.5x)")
            print(f"streamer peak RSS: {peak_kib / 1024:.0f} MB (limit 200 MB)")
        finally:
            if emb is not None:
                emb.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

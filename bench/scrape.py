"""Scrape benchmark: 1,000 local targets × 8 GPUs × 40 fields served by one local server process.

    python bench/scrape.py [--targets 1000] [--gpus 8] [--fields 40] [--cycles 5] [--workers N] [--parser exact]

Times full scrape cycles (fetch every target, parse, publish to Redis) after one warm-up cycle,
prints wall time and scraper CPU per cycle against the 1 s target, the scraper's RSS, and the
parsers' samples/s (the fast path, the exact parser, prometheus_client's text parser) on the same text.
Uses $REDIS_URL or an embedded Redis in a temporary folder; nothing consumes the stream (the
stream is deleted afterwards).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from telemetry_nb.config import Settings  # noqa: E402
from telemetry_nb.embedded import Embedded, free_port  # noqa: E402
from telemetry_nb.observability import PipelineMetrics, ScrapeMetrics  # noqa: E402
from telemetry_nb.pipeline.scraper import FAST_GROUP, PARSERS, Scraper, _series  # noqa: E402
from telemetry_nb.pipeline.streamer import Streamer  # noqa: E402
from telemetry_nb.pipeline.streams import Queue, connect  # noqa: E402
from telemetry_nb.sources.fake_exporter import render_target, target_urls  # noqa: E402
from telemetry_nb.sources.scrape import ExpositionParser  # noqa: E402
from telemetry_nb.sources.scrape_fast import FastParser  # noqa: E402
from telemetry_nb.sources.targets import StaticTargets  # noqa: E402


def _cpu(pids: list[int]) -> float:
    """CPU seconds of this process and its worker processes (from /proc: they are still running)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    total = r.ru_utime + r.ru_stime
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _hwm(pid: int | str) -> int:
    """Peak RSS (VmHWM, KiB) of one process, not its children (the exporter server is a child here)."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _wait(url: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit(f"exporter at {url} did not come up")


def parser_rates(gpus: int, fields: int, repeat: int = 5) -> tuple[float, float, float, int]:
    """Samples/s (best of `repeat`, CPU time) of the fast path, the exact parser and prometheus_client's parser on
    the same text: 64 targets' bodies, each parsed as the scraper does (the fast path FAST_GROUP at a time),
    label sets cached."""
    from prometheus_client.parser import text_string_to_metric_families

    bodies = [render_target(i, gpus, fields) for i in range(64)]
    hosts = [f"gpu-node-{i}" for i in range(64)]
    texts = [b.decode() for b in bodies]
    ts = datetime.now(UTC)
    exact, fast = ExpositionParser(series_factory=_series), FastParser(ExpositionParser(series_factory=_series))
    best = {"fast": float("inf"), "exact": float("inf"), "prometheus_client": float("inf")}
    n = 0
    for _ in range(repeat + 1):  # the first round fills the label-set caches, as the first scrape does
        t0 = time.process_time()
        parsed = [fast.parse_many(bodies[g:g + FAST_GROUP], hosts[g:g + FAST_GROUP])
                  for g in range(0, len(bodies), FAST_GROUP)]
        t1 = time.process_time()
        n = sum(1 for text, host in zip(texts, hosts, strict=True) for _ in exact.rows(text, ts, default_host=host))
        t2 = time.process_time()
        m = sum(len(f.samples) for text in texts for f in text_string_to_metric_families(text))
        t3 = time.process_time()
        assert m == n == sum(len(p.values) for p in parsed) and fast.fallbacks.total() == 0, (m, n, fast.fallbacks)
        for key, seconds in (("fast", t1 - t0), ("exact", t2 - t1), ("prometheus_client", t3 - t2)):
            best[key] = min(best[key], seconds)
    return n / best["fast"], n / best["exact"], n / best["prometheus_client"], n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", type=int, default=1000)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--fields", type=int, default=40)
    ap.add_argument("--cycles", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=100)
    ap.add_argument("--workers", type=int, default=1, help="scraper worker processes (`scrape --workers`)")
    ap.add_argument("--parser", choices=PARSERS, default="fast", help="`scrape --parser` (default fast)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        redis_url = os.environ.get("REDIS_URL") or Embedded(Path(tmp), services=("redis",)).env()["REDIS_URL"]
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "telemetry_nb.cli", "fake-exporter", "--port", str(port),
                                   "--targets", str(args.targets), "--gpus", str(args.gpus), "--fields",
                                   str(args.fields), "--log-level", "WARNING"])
        try:
            base = f"http://127.0.0.1:{port}"
            _wait(base + "/metrics")
            body = httpx.get(base + "/metrics").content
            print(f"server: {args.targets} targets x {args.gpus} GPUs x {args.fields} fields, "
                  f"{len(body) / 1024:.0f} KiB per target, {len(body) * args.targets / 1e6:.0f} MB per cycle")
            stream = f"bench-scrape-{uuid.uuid4().hex[:8]}"
            settings = Settings(redis_url=redis_url, stream=stream, high_water=0)
            client = connect(redis_url)
            streamer = Streamer(Queue(client, stream), settings)
            metrics = PipelineMetrics()
            targets = StaticTargets(target_urls(base, args.targets))

            def make_worker() -> Scraper:
                return Scraper(Streamer(Queue(connect(redis_url), stream), settings), targets,
                               ScrapeMetrics(PipelineMetrics().registry), timeout_s=30.0, concurrency=args.concurrency,
                               parser=args.parser)

            scraper = Scraper(streamer, targets, ScrapeMetrics(metrics.registry), interval_s=1.0, timeout_s=30.0,
                              concurrency=args.concurrency, workers=args.workers, make_worker=make_worker,
                              parser=args.parser)
            warm = scraper.cycle()
            print(f"warm-up cycle: {warm.seconds:.2f} s, {warm.up}/{warm.targets} up, {warm.samples} samples")
            walls, cpus, fetches = [], [], []
            pids = [p.pid for p in scraper._pool.procs] if scraper._pool else []
            rss = 0
            for _ in range(args.cycles):
                c0 = _cpu(pids)
                r = scraper.cycle()
                cpus.append(_cpu(pids) - c0)
                rss = max(rss, _hwm("self"), *(_hwm(p) for p in pids))
                walls.append(r.seconds)
                fetches.append(r.fetch_seconds)
                assert r.up == args.targets and r.rejected == 0, r
            samples = r.samples
            scraper.close()
            entries = client.xlen(stream)
            client.delete(stream, f"{stream}:rejected")
        finally:
            server.terminate()
            server.wait(10)
    walls.sort()
    med = walls[len(walls) // 2]
    print(f"scraper: {args.workers} worker process(es), --parser {args.parser}; cycles: {args.cycles}, "
          f"samples per cycle: {samples}, stream entries: {entries}")
    print(f"full cycle (fetch, parse, publish): median {med:.2f} s, min {walls[0]:.2f} s, max {walls[-1]:.2f} s "
          f"-> {samples / med:,.0f} samples/s; target <= 1 s: {'met' if med <= 1 else 'NOT met'} "
          f"({med:.2f}x the target)")
    print(f"  of which fetch (HTTP, all targets): median {sorted(fetches)[len(fetches) // 2]:.2f} s")
    print(f"scraper CPU per cycle: median {sorted(cpus)[len(cpus) // 2]:.2f} s")
    print(f"scraper RSS: peak {rss / 1024:.0f} MB (VmHWM, the largest of its {1 + len(pids)} process(es))")
    fast, exact, theirs, n = parser_rates(args.gpus, args.fields)
    print(f"parser on {n} samples (64 targets, CPU time): fast path {fast:,.0f} samples/s, exact parser "
          f"{exact:,.0f} samples/s, prometheus_client {theirs:,.0f} samples/s (fast {fast / exact:.1f}x exact, "
          f"{fast / theirs:.1f}x prometheus_client; exact {exact / theirs:.1f}x prometheus_client)")


if __name__ == "__main__":
    main()

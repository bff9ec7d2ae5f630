"""The pipeline's own Prometheus metrics, and a tiny HTTP server for /metrics, /health and /ready."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)


class PipelineMetrics:
    """Counters and gauges for streamers and collectors, in a registry of their own (injectable in tests)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.published = Counter("telemetry_rows_published", "Rows published to the stream", registry=r)
        self.rejected = Counter("telemetry_rows_rejected", "Source rows rejected by the parser", registry=r)
        self.consumed = Counter("telemetry_rows_consumed", "Rows read from the stream", registry=r)
        self.stored = Counter("telemetry_rows_stored", "New rows committed to PostgreSQL", registry=r)
        self.duplicates = Counter("telemetry_rows_duplicate", "Rows already stored (redelivery/replay)",
                                  registry=r)
        self.dead = Counter("telemetry_entries_dead_lettered", "Stream entries moved to the dead-letter stream",
                            registry=r)
        self.dead_rows = Counter("telemetry_rows_dead_lettered",
                                 "Rows PostgreSQL refused, dead-lettered alone (the rest of their entry stored)",
                                 registry=r)
        self.side_totals = Gauge("telemetry_side_stream_total", "Lifetime records added to a side stream "
                                 "(<stream>:rejected, <stream>:dead), also those trimmed since", ["side"], registry=r)
        self.lost = Counter("telemetry_entries_lost", "Pending entries deleted from the stream before ack",
                            registry=r)
        self.claimed = Counter("telemetry_entries_claimed", "Stale entries claimed from other consumers",
                               registry=r)
        self.retries = Counter("telemetry_retries", "Retries after a dependency failure", ["dependency"],
                               registry=r)
        self.lag = Gauge("telemetry_consumer_lag", "Stream entries not yet acknowledged by the group",
                         registry=r)
        self.backpressure = Counter("telemetry_backpressure_waits", "Times the streamer waited for the consumers",
                                    registry=r)
        self.expired = Counter("telemetry_rows_expired", "Rows older than the retention horizon, skipped",
                               registry=r)
        self.partitions_created = Counter("telemetry_partitions_created", "Partitions created ahead of the data",
                                          registry=r)
        self.partitions_packed = Counter("telemetry_partitions_packed", "Raw partitions rewritten as packed rows",
                                         registry=r)
        self.partitions_dropped = Counter("telemetry_partitions_dropped", "Partitions dropped by retention",
                                          ["table"], registry=r)
        self.rollup_rows = Counter("telemetry_rollup_rows", "Rollup rows recomputed by refreshes", registry=r)
        self.rollup_seconds = Histogram("telemetry_rollup_refresh_seconds", "Time of one rollup refresh",
                                        registry=r, buckets=(.01, .05, .1, .5, 1, 5, 10, 30, 60, 300))
        self.maintenance_runs = Counter("telemetry_maintenance_runs", "Maintenance passes run as leader",
                                        registry=r)
        self.batch_seconds = Histogram("telemetry_batch_seconds", "Time to write one transaction of batches",
                                       registry=r, buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class ScrapeMetrics:
    """Per-target metrics of the scraper (`telemetry_scrape_*{target}`), in the pipeline's registry."""

    def __init__(self, registry: CollectorRegistry):
        r = registry
        self.up = Gauge("telemetry_scrape_up", "1 if the last scrape of the target succeeded, else 0", ["target"],
                        registry=r)
        self.duration = Gauge("telemetry_scrape_duration_seconds", "Duration of the last scrape of the target",
                              ["target"], registry=r)
        self.samples = Gauge("telemetry_scrape_samples", "Samples read in the last scrape of the target",
                             ["target"], registry=r)
        self.failures = Counter("telemetry_scrape_failures", "Failed scrapes of the target", ["target"], registry=r)
        self.cycle_seconds = Histogram("telemetry_scrape_cycle_seconds", "Duration of a whole scrape cycle "
                                       "(fetch, parse, publish)", registry=r,
                                       buckets=(.05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.targets = Gauge("telemetry_scrape_targets", "Targets known in the last cycle", registry=r)

    def forget(self, target: str) -> None:
        """A target that is gone: drop its series."""
        for metric in (self.up, self.duration, self.samples, self.failures):
            try:
                metric.remove(target)
            except KeyError:
                pass


def peak_rss_kib(pid: int | str = "self") -> int:
    """Largest peak resident set (VmHWM, since exec) of a process and its live descendants, in KiB; 0 if gone.

    Unlike getrusage's ru_maxrss this does not count the parent's memory from before the exec.
    """
    try:
        status = open(f"/proc/{pid}/status").read()
    except OSError:
        return 0
    peak = 0
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1])
            break
    real = pid if pid != "self" else os.getpid()
    try:
        children = open(f"/proc/{real}/task/{real}/children").read().split()
    except OSError:
        children = []
    return max([peak, *(peak_rss_kib(c) for c in children)])


class Readiness:
    """/ready from cached probes: a background thread runs every probe each `interval_s`; a request only reads.

    A probe is a callable that raises when its dependency is unreachable. The answer is "not ready"
    before the first round, while any probe failed in the last round, and when the last round is older
    than `stale_s` (a probe hangs, e.g. on a black-holed network).
    """

    def __init__(self, probes: Mapping[str, Callable[[], object]], *, interval_s: float = 1.0,
                 stale_s: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.probes = dict(probes)
        self.interval_s = interval_s
        self.stale_s = stale_s if stale_s is not None else max(10.0, 3 * interval_s)
        self.clock = clock
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._result: dict[str, str] | None = None
        self._at = 0.0

    def probe_once(self) -> dict[str, str]:
        """Run every probe now; name → "ok" or the error."""
        out = {}
        for name, probe in self.probes.items():
            try:
                probe()
                out[name] = "ok"
            except Exception as err:  # noqa: BLE001 (any failure means not ready)
                text = str(err).strip().splitlines()[0] if str(err).strip() else ""
                out[name] = f"{type(err).__name__}: {text}"[:300]
        with self._lock:
            self._result, self._at = out, self.clock()
        return out

    def start(self) -> Readiness:
        threading.Thread(target=self._loop, daemon=True, name="readiness").start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            before = self._result
            now = self.probe_once()
            if before is not None and (before == {k: "ok" for k in before}) != (now == {k: "ok" for k in now}):
                log.warning("Readiness: %s", ", ".join(f"{k} {v}" for k, v in now.items()))
            self._stop.wait(self.interval_s)

    def __call__(self) -> tuple[bool, dict[str, str]]:
        """(ready, name → "ok" or why not), from the last round of probes."""
        with self._lock:
            result, at = self._result, self._at
        if result is None:
            return False, {name: "not probed yet" for name in self.probes}
        if self.clock() - at > self.stale_s:
            return False, {name: f"no probe result for {self.clock() - at:.0f}s (hanging?)" for name in self.probes}
        return all(v == "ok" for v in result.values()), dict(result)


def serve_metrics(port: int, metrics: PipelineMetrics, ready: Callable[[], tuple[bool, object]],
                  host: str = "0.0.0.0") -> ThreadingHTTPServer:
    """Serve /metrics, /health (process alive) and /ready (dependencies reachable) in a daemon thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server API)
            if self.path.startswith("/metrics"):
                self._send(200, metrics.exposition(), CONTENT_TYPE_LATEST)
            elif self.path.startswith("/health"):
                self._send(200, b'{"status":"ok"}', "application/json")
            elif self.path.startswith("/ready"):
                ok, detail = ready()
                failed = [k for k, v in detail.items() if v != "ok"] if isinstance(detail, dict) else []
                body = json.dumps({"status": "ready" if ok else "not ready", "detail": detail,
                                   "failed": failed}).encode()
                self._send(200 if ok else 503, body, "application/json")
            else:
                self._send(404, b'{"detail":"not found"}', "application/json")

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True, name="metrics-http").start()
    log.info("Serving /metrics, /health and /ready on port %d", server.server_address[1])
    return server

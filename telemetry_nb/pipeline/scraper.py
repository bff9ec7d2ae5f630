"""Exporters → queue: scrape every target each interval, parse, and publish through the `Streamer`.

Targets are fetched concurrently (aiohttp on one asyncio loop, keep-alive connections reused across
cycles, at most `concurrency` at a time, `timeout_s` each; aiohttp's C HTTP parser fetches ~10x
faster than httpx here, which decides whether 1,000 targets fit in a cycle). A target that fails is logged once when
it goes down and once when it comes back, counted, and retried next interval; the others are
published as usual. Samples are stamped with the target's scrape start (in milliseconds, as
Prometheus does) unless they carry their own timestamp. By default (`parser="fast"`) the answers are
parsed FAST_GROUP at a time by the vectorized parser (`sources.scrape_fast`; irregular texts by the
exact one) and published as columns (`pipeline.columnar`): the same entries as `parser="exact"`.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import aiohttp

from telemetry_nb.model import Rejected, Sample
from telemetry_nb.observability import ScrapeMetrics
from telemetry_nb.pipeline import codec, columnar
from telemetry_nb.pipeline.streamer import Streamer
from telemetry_nb.sources.scrape import ExpositionParser, SeriesInfo
from telemetry_nb.sources.scrape_fast import FastParser
from telemetry_nb.sources.targets import Targets

log = logging.getLogger(__name__)
PUBLISH_EVERY = 50_000  # rows parsed before they are published, within a cycle
FAST_GROUP = 16  # targets the fast parser reads in one go (numpy and Arrow calls are made per group)
PARSERS = ("fast", "exact")


@dataclass
class Fetched:
    """One target's answer in one cycle: the body (or the error) and when the scrape started."""

    url: str
    started: float
    seconds: float
    body: bytes | None = None
    error: str = ""


@dataclass
class CycleResult:
    """What one scrape cycle did."""

    targets: int = 0
    up: int = 0
    samples: int = 0
    rejected: int = 0
    published: int = 0
    seconds: float = 0.0
    fetch_seconds: float = 0.0
    down: list[str] = field(default_factory=list)


class Scraper:
    """Scrape `targets` every `interval_s` and publish the samples with `streamer`."""

    def __init__(self, streamer: Streamer, targets: Targets, metrics: ScrapeMetrics, *, interval_s: float = 15.0,
                 timeout_s: float = 5.0, concurrency: int = 100, clock: Callable[[], float] = time.time,
                 workers: int = 1, make_worker: Callable[[], Scraper] | None = None, parser: str = "fast"):
        if parser not in PARSERS:
            raise ValueError(f"parser must be one of {', '.join(PARSERS)}, not {parser!r}")
        self.streamer = streamer
        self.targets = targets
        self.metrics = metrics
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.concurrency = concurrency
        self.clock = clock
        self.parser = ExpositionParser(series_factory=_series)
        self.fast = FastParser(self.parser) if parser == "fast" else None  # None: every target by `parser`
        self._fallbacks_logged: set[str] = set()
        self.stop_event = streamer.stop_event
        self._down: dict[str, str] = {}  # target → error, for targets that are down
        self._known: set[str] = set()
        self._loop = asyncio.new_event_loop()
        self._client: aiohttp.ClientSession | None = None
        self.cycles = 0
        self.published = self.rejected = 0
        self._pool = _Workers(workers, make_worker) if workers > 1 and make_worker is not None else None

    # -- fetching ------------------------------------------------------------------------------
    def _http(self) -> aiohttp.ClientSession:
        if self._client is None:  # created on the loop that uses it
            self._client = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.concurrency, ttl_dns_cache=300),
                timeout=aiohttp.ClientTimeout(total=self.timeout_s), headers={"Accept": "text/plain;version=0.0.4"})
        return self._client

    async def _fetch(self, client: aiohttp.ClientSession, url: str) -> Fetched:
        started = self.clock()
        t0 = time.perf_counter()
        try:
            async with client.get(url) as resp:
                body = await resp.read()
                if resp.status != 200:
                    return Fetched(url, started, time.perf_counter() - t0, error=f"HTTP {resp.status}")
            return Fetched(url, started, time.perf_counter() - t0, body=body)
        except TimeoutError:
            return Fetched(url, started, time.perf_counter() - t0, error=f"timed out after {self.timeout_s:g}s")
        except (aiohttp.ClientError, OSError, ValueError) as err:
            return Fetched(url, started, time.perf_counter() - t0,
                           error=f"{type(err).__name__}: {str(err) or 'connection failed'}")

    async def _fetch_all(self, urls: list[str]) -> list[Fetched]:
        client = self._http()  # its connector lets `concurrency` requests run at once, the rest queue
        return list(await asyncio.gather(*(self._fetch(client, u) for u in urls)))

    # -- one cycle -----------------------------------------------------------------------------
    def cycle(self) -> CycleResult:
        """Fetch every target once, parse and publish what answered; never raises for a target's failure."""
        t0 = time.perf_counter()
        urls = self.targets.current()
        for gone in self._known - set(urls):
            self.metrics.forget(gone)
            self._down.pop(gone, None)
        self._known = set(urls)
        self.metrics.targets.set(len(urls))
        if self._pool is None:
            result, per_target = self.scrape(urls)
        else:  # each worker process scrapes, parses and publishes its share of the targets
            result, per_target = CycleResult(targets=len(urls)), []
            for part, targets in self._pool.scrape(urls):
                per_target += targets
                result.up += part.up
                result.samples += part.samples
                result.rejected += part.rejected
                result.published += part.published
                result.fetch_seconds = max(result.fetch_seconds, part.fetch_seconds)
                self.streamer.metrics.published.inc(part.published)  # the workers' own counters are not served
                self.streamer.metrics.rejected.inc(part.rejected)
        for url, seconds, samples, error in per_target:
            self.metrics.duration.labels(url).set(seconds)
            if error is None:
                self._mark_up(url)
                self.metrics.samples.labels(url).set(samples)
            else:
                self._mark_down(url, error)
                result.down.append(url)
        result.seconds = time.perf_counter() - t0
        self.metrics.cycle_seconds.observe(result.seconds)
        self.cycles += 1
        self.published += result.published
        self.rejected += result.rejected
        return result

    def scrape(self, urls: list[str]) -> tuple[CycleResult, list[tuple[str, float, int, str | None]]]:
        """Fetch, parse and publish `urls` once; returns the totals and (url, seconds, samples, error) per target."""
        t0 = time.perf_counter()
        result = CycleResult(targets=len(urls))
        fetched = self._loop.run_until_complete(self._fetch_all(urls)) if urls else []
        result.fetch_seconds = time.perf_counter() - t0
        per_target: list[tuple[str, float, int, str | None]] = []
        if self.fast is None:
            self._publish_exact(fetched, result, per_target)
        else:
            self._publish_fast(fetched, result, per_target)
        result.seconds = time.perf_counter() - t0
        return result, per_target

    def _publish_exact(self, fetched: list[Fetched], result: CycleResult, per_target: list) -> None:
        """Parse every answer with the exact parser and publish the rows tuple by tuple (`--parser exact`)."""
        rows: list[tuple[codec.Series, str, str, float] | Rejected] = []
        ts_text: dict[datetime, str] = {}
        for f in fetched:
            if f.body is None:
                per_target.append((f.url, f.seconds, 0, f.error))
                continue
            result.up += 1
            n = 0
            for row in self._exact_rows(f, ts_text):
                if type(row) is Rejected:
                    result.rejected += 1
                else:
                    n += 1
                rows.append(row)
            f.body = None  # parsed: let the text go
            per_target.append((f.url, f.seconds, n, None))
            result.samples += n
            if len(rows) >= PUBLISH_EVERY:  # memory stays bounded whatever the number of targets
                result.published += self.streamer.publish_series(rows)
                rows = []
        if rows:
            result.published += self.streamer.publish_series(rows)

    def _publish_fast(self, fetched: list[Fetched], result: CycleResult, per_target: list) -> None:
        """Parse answers FAST_GROUP at a time with the vectorized parser (the exact one for irregular texts) and
        publish them as columns: the same entries and rejected rows as `_publish_exact`, in the same batches."""
        assert self.fast is not None
        items: list[columnar.Columns | Rejected] = []
        pending = 0
        ts_text: dict[datetime, str] = {}
        for g in range(0, len(fetched), FAST_GROUP):
            group = fetched[g:g + FAST_GROUP]
            live = [f for f in group if f.body is not None]
            parsed = self.fast.parse_many([f.body for f in live], [_host_of(f.url) for f in live])
            spans = iter(parsed.spans)
            for f in group:
                if f.body is None:
                    per_target.append((f.url, f.seconds, 0, f.error))
                    continue
                result.up += 1
                span = next(spans)
                rejected = 0
                if span is not None:
                    cols = columnar.Columns(parsed.series, parsed.sidx[span], parsed.names, parsed.midx[span],
                                            [_scrape_ts(f).isoformat()], None, parsed.values[span])
                else:
                    rows = []
                    for row in self._exact_rows(f, ts_text):
                        if type(row) is Rejected:
                            rejected += 1
                            items.append(row)
                        else:
                            rows.append(row)
                    cols = columnar.Columns.from_rows(rows)
                n = len(cols)
                if n:
                    items.append(cols)
                f.body = None
                per_target.append((f.url, f.seconds, n, None))
                result.samples += n
                result.rejected += rejected
                pending += n + rejected
                if pending >= PUBLISH_EVERY:  # where `_publish_exact` publishes too: the same entries
                    result.published += self.streamer.publish_columns(items)
                    items, pending = [], 0
        if items:
            result.published += self.streamer.publish_columns(items)
        self._log_fallbacks()

    def _exact_rows(self, f: Fetched, ts_text: dict[datetime, str]
                    ) -> Iterator[tuple[codec.Series, str, str, float] | Rejected]:
        """The exact parser's rows of one answer: (series, metric, timestamp text, value), or `Rejected`."""
        scrape_ts = _scrape_ts(f)
        scrape_text = scrape_ts.isoformat()
        assert f.body is not None
        for row in self.parser.rows(f.body.decode("utf-8", errors="replace"), scrape_ts,
                                    default_host=_host_of(f.url)):
            if type(row) is Rejected:
                row.source = f.url
                yield row
                continue
            _, series, name, ts, value = row
            if ts is scrape_ts:
                text = scrape_text
            else:
                text = ts_text.get(ts)
                if text is None:
                    text = ts_text[ts] = ts.isoformat()
            yield series, name, text, value

    def _log_fallbacks(self) -> None:
        assert self.fast is not None
        for reason, count in self.fast.fallbacks.items():
            if reason not in self._fallbacks_logged:
                self._fallbacks_logged.add(reason)
                log.info("Some targets' text is read by the exact parser, not the fast path (%s: %d target "
                         "scrapes so far); their samples are the same, only slower to parse", reason, count)

    def _mark_down(self, url: str, error: str) -> None:
        self.metrics.up.labels(url).set(0)
        self.metrics.failures.labels(url).inc()
        if url not in self._down:
            log.warning("Target %s is down: %s (retrying every %gs)", url, error, self.interval_s)
        self._down[url] = error

    def _mark_up(self, url: str) -> None:
        self.metrics.up.labels(url).set(1)
        self.metrics.failures.labels(url)  # the series exists (0) before the first failure
        if url in self._down:
            del self._down[url]
            log.info("Target %s is up again", url)

    # -- the loop ------------------------------------------------------------------------------
    def run(self, *, cycles: int | None = None) -> int:
        """Scrape every interval until stopped (or `cycles` done); returns the cycles run."""
        next_at = self.clock()
        done = 0
        try:
            while not self.stop_event.is_set():
                result = self.cycle()
                done += 1
                log.log(logging.INFO if done == 1 or result.down else logging.DEBUG,
                        "Scrape cycle %d: %d/%d targets up, %d samples, %d rejected, %.0f ms (fetch %.0f ms)",
                        done, result.up, result.targets, result.samples, result.rejected, result.seconds * 1000,
                        result.fetch_seconds * 1000)
                if cycles is not None and done >= cycles:
                    break
                next_at += self.interval_s
                now = self.clock()
                if now > next_at:
                    skipped = int((now - next_at) // self.interval_s) + 1
                    log.warning("Scrape cycle took %.1fs, longer than the %gs interval; skipping %d", result.seconds,
                                self.interval_s, skipped)
                    next_at += skipped * self.interval_s
                self.stop_event.wait(max(0.0, next_at - self.clock()))
        finally:
            self.streamer.flush()
            self.close()
        return done

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self._client is not None:
            self._loop.run_until_complete(self._client.close())
            self._client = None
        if not self._loop.is_closed():
            self._loop.close()

    def stop(self) -> None:
        self.stop_event.set()


class _Workers:
    """Worker processes (forked), each with its own Scraper, Redis connection and keep-alive connections.

    Parsing is per-sample Python work that only more processes spread over more cores. A target always
    goes to the same worker (stable hash of its URL). A worker whose parent died exits within a second.
    """

    def __init__(self, n: int, make_worker: Callable[[], Scraper]):
        ctx = multiprocessing.get_context("fork")
        self.conns, self.procs = [], []
        for i in range(n):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(theirs, make_worker, os.getpid()), daemon=True,
                               name=f"scrape-worker-{i}")
            proc.start()
            theirs.close()
            self.conns.append(mine)
            self.procs.append(proc)
        log.info("Scraping with %d worker processes", n)

    def scrape(self, urls: list[str]) -> list[tuple[CycleResult, list]]:
        parts: list[list[str]] = [[] for _ in self.conns]
        for url in urls:
            parts[zlib.crc32(url.encode()) % len(parts)].append(url)
        for conn, part in zip(self.conns, parts, strict=True):
            conn.send(part)
        return [conn.recv() for conn in self.conns]

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(None)
            except OSError:
                pass
        for proc in self.procs:
            proc.join(timeout=30)


def _worker_main(conn, make_worker: Callable[[], Scraper], parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us, after the cycle in progress
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    scraper = make_worker()
    try:
        while True:
            if not conn.poll(1.0):
                if os.getppid() != parent:
                    return
                continue
            urls = conn.recv()
            if urls is None:
                return
            conn.send(scraper.scrape(urls))
    except (EOFError, OSError):
        return
    finally:
        scraper.close()


def _scrape_ts(f: Fetched) -> datetime:
    """The time that stamps a target's samples without one: its scrape start, in milliseconds as Prometheus."""
    return datetime.fromtimestamp(int(f.started * 1000) / 1000, UTC)


def _series(info: SeriesInfo) -> codec.Series:
    """The codec's per-series record for a series the parser met for the first time."""
    return codec.Series(Sample(info.uuid, "", _EPOCH, 0.0, info.hostname, info.gpu_index, info.device,
                               info.model_name, info.container, info.pod, info.namespace, info.labels,
                               info.pci_bus_id, info.driver_version, info.parent_uuid, info.mig_profile,
                               info.mig_instance))


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _host_of(url: str) -> str:
    """The target's host, for samples whose labels name none (Prometheus' `instance` without the port)."""
    rest = url.split("://", 1)[-1]
    host = rest.split("/", 1)[0]
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if ":" in host else host


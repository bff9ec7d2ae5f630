"""Source → Redis stream: batch samples into stream entries, with pacing, re-stamping, sharding, backpressure.

With stream partitions each GPU's samples go to its own partition (`placement.partition_of`), batched per
partition, and backpressure watches the partitions about to be published to.

Publishing never skips a row: a Redis outage is retried with backoff (a retried pipeline may add an
entry twice, which the idempotent database write absorbs). Rejected rows go to `<stream>:rejected`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np

from telemetry_nb.config import Settings
from telemetry_nb.model import Rejected, Sample
from telemetry_nb.observability import PipelineMetrics
from telemetry_nb.pipeline import codec, columnar
from telemetry_nb.pipeline.chunk_pool import ChunkPool
from telemetry_nb.pipeline.placement import partition_of, shard_of
from telemetry_nb.pipeline.streams import Partitions, Queue, T, as_partitions, retry_redis

log = logging.getLogger(__name__)
MAX_LOGGED_REJECTS = 100
LOG_EVERY_S = 5.0


@dataclass
class Summary:
    published: int = 0
    rejected: int = 0
    entries: int = 0
    passes: int = 0
    fast_rows: int = 0  # CSV rows the fast parser read vectorized
    exact_lines: int = 0  # lines it handed to the exact parser
    exact_chunks: int = 0  # chunks it read row by row whole


class Streamer:
    """Publish samples from a source to `queue` in entries of `settings.batch_size` rows.

    `clock` (epoch seconds) and `sleep` drive re-stamping to "now", pacing and backpressure waits, so tests
    pass a fake clock instead of waiting; with the default `time.sleep`, `stop()` interrupts a wait.
    """

    def __init__(self, queue: Queue | Partitions, settings: Settings, *, metrics: PipelineMetrics | None = None,
                 clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep,
                 pipeline_depth: int = 10, progress: Callable[[int], None] | None = None):
        self.queue = as_partitions(queue)
        self.settings = settings
        self.metrics = metrics or PipelineMetrics()
        self.clock = clock
        self.sleep = sleep
        self.pipeline_depth = pipeline_depth
        self.progress = progress
        self.stop_event = threading.Event()
        self.summary = Summary()
        self._pending: list[tuple[int, dict[bytes, bytes]]] = []  # (partition, entry fields)
        self._pending_rows = 0
        self._rejects: list[Rejected] = []
        self._repeat_rejects = 0
        self._started = 0.0
        self._entries_at_check = -(10 ** 9)
        self._last_log = 0.0
        self._logged_rows = self._logged_entries = 0
        self.source_name = ""
        self._group_ready = False

    def _redis(self, fn: Callable[[], T], what: str = "Redis") -> T:
        return retry_redis(fn, what=what, log=log, retry_max_s=self.settings.retry_max_s,
                           on_retry=self.metrics.retries.labels("redis").inc, should_stop=self.stop_event.is_set)

    def run(self, source: Callable[[], Iterable[Sample | Rejected]], *, loop: bool = False,
            timestamps: str = "source", rate: float | None = None) -> Summary:
        """Publish one pass of `source()` (or forever with `loop`), then flush; returns the totals."""
        if timestamps not in ("source", "now"):
            raise ValueError("timestamps must be 'source' or 'now'")
        self._redis(self.queue.ensure_group)
        self._started = self.clock()
        next_start: datetime | None = None
        try:
            while not self.stop_event.is_set():
                last = self._one_pass(source(), timestamps, rate, next_start)
                self.summary.passes += 1
                if not loop or last is None:
                    break
                next_start = last + timedelta(seconds=1)
        finally:
            self.flush()
        self._done_log()
        return self.summary

    def publish_series(self, rows: Iterable[tuple[codec.Series, str, str, float] | Rejected]) -> int:
        """Publish one lot of a live source's rows (series, metric, timestamp text, value) now, and flush.

        The same entries, sharding, rejects, backpressure and retries as `run`, with the per-series
        work done once per series instead of once per sample (`codec.encode_series`). Returns rows kept.
        """
        if not self._group_ready:
            self._redis(self.queue.ensure_group)
            self._group_ready = True
        shard_i, shard_n = self.settings.shard_index, self.settings.shard_count
        parts = len(self.queue)
        size = self.settings.batch_size
        batches: dict[int, list[tuple[codec.Series, str, str, float]]] = {}
        kept = 0
        for row in rows:
            if type(row) is Rejected:
                self._reject(row)
                continue
            series = row[0]
            if shard_n > 1 and series.shard(shard_n, shard_of) != shard_i:
                continue
            p = partition_of(series.uuid, parts) if parts > 1 else 0
            batch = batches.get(p)
            if batch is None:
                batch = batches[p] = []
            batch.append(row)
            if len(batch) >= size:
                kept += len(batch)
                self._take(([(codec.encode_series(batch), len(batch), p)], []))
                batches[p] = []
        for p, batch in batches.items():
            if batch:
                kept += len(batch)
                self._take(([(codec.encode_series(batch), len(batch), p)], []))
        self.flush()
        return kept

    def publish_columns(self, items: Iterable[columnar.Columns | Rejected]) -> int:
        """`publish_series` for rows given as `Columns` (the scraper's fast path): the same entries, built with numpy.

        Batches are cut where `publish_series` cuts them (every `batch_size` rows kept after sharding).
        """
        if not self._group_ready:
            self._redis(self.queue.ensure_group)
            self._group_ready = True
        shard_i, shard_n = self.settings.shard_index, self.settings.shard_count
        count = len(self.queue)
        parts: list[columnar.Columns] = []
        masks: dict[int, np.ndarray] = {}
        partition: dict[int, np.ndarray] = {}
        lists: list = []
        for item in items:
            if type(item) is Rejected:
                self._reject(item)
                continue
            if shard_n > 1:  # the series lists are shared by many items: each is looked at once
                mine = masks.get(id(item.series))
                if mine is None:
                    mine = masks[id(item.series)] = np.array(
                        [s is not None and s.shard(shard_n, shard_of) == shard_i for s in item.series], dtype=bool)
                    lists.append(item.series)  # kept alive while its id is a key
                item = item.select(mine[item.sidx])
            if count > 1 and id(item.series) not in partition:
                partition[id(item.series)] = np.array(
                    [partition_of(s.uuid, count) if s is not None else -1 for s in item.series], dtype=np.int64)
                lists.append(item.series)
            parts.append(item)
        kept = 0
        for p in range(count):  # each partition's rows batched as `publish_series` batches them
            mine = parts if count == 1 else [item.select(partition[id(item.series)][item.sidx] == p)
                                              for item in parts]
            for fields, n in columnar.encode_batches(mine, self.settings.batch_size):
                self._take(([(fields, n, p)], []))
                kept += n
        self.flush()
        return kept

    def _done_log(self) -> None:
        if self.summary.published > self._logged_rows:
            log.info("Published %d rows in %d entries since the last report (%d in all) to %s",
                     self.summary.published - self._logged_rows, self.summary.entries - self._logged_entries,
                     self.summary.published, self._where())
        log.info("Streamer done: published=%d rejected=%d entries=%d passes=%d", self.summary.published,
                 self.summary.rejected, self.summary.entries, self.summary.passes)

    def run_parallel(self, path: str, workers: int, limits=None, parser: str = "exact") -> Summary:
        """One pass over a CSV file in chunks, parsed and encoded by `workers` processes, published in order.

        For bulk loads with source timestamps; CSV parsing is the streamer's bottleneck. `parser`
        "fast" reads chunks vectorized (`dcgm_fast`, the same entries as "exact", row by row); with
        one worker the chunks are read in this process. `limits` (a `RowLimits`) bound what is accepted.
        """
        with ChunkPool.from_settings(self.settings, path, workers, limits, parser) as pool:
            return self.run_chunks(pool)

    def run_chunks(self, pool: ChunkPool) -> Summary:
        """Publish every chunk a started `ChunkPool` parses, in file order; on `stop()` the chunks in flight end it."""
        self._redis(self.queue.ensure_group)
        self._started = self.clock()
        try:
            for result in pool.results(should_stop=self.stop_event.is_set):
                self._take(result)
        finally:
            self.flush()
        self.summary.passes = 1
        if pool.parser == "fast":
            log.info("Fast CSV parser: %d rows read vectorized, %d lines row by row (%d whole chunks)",
                     self.summary.fast_rows, self.summary.exact_lines, self.summary.exact_chunks)
        self._done_log()
        return self.summary

    def _take(self, result: tuple) -> None:
        """Queue (entries of (fields, rows, partition), rejected rows[, fast parser counts]) from a chunk or a lot."""
        entries, rejected, *counts = result
        if counts:
            fast, exact_lines, exact_chunks = counts[0]
            self.summary.fast_rows += fast
            self.summary.exact_lines += exact_lines
            self.summary.exact_chunks += exact_chunks
        for row in rejected:
            self._reject(row)
        for fields, n, p in entries:
            self._pending.append((p, fields))
            self._pending_rows += n
            if len(self._pending) >= self.pipeline_depth:
                self.flush()

    def _one_pass(self, rows: Iterable[Sample | Rejected], timestamps: str, rate: float | None,
                  not_before: datetime | None) -> datetime | None:
        shard_i, shard_n = self.settings.shard_index, self.settings.shard_count
        parts = len(self.queue)
        batches: dict[int, list[Sample]] = {}
        size = self.settings.batch_size
        offset: timedelta | None = None
        last: datetime | None = None
        for row in _with_stop(rows, self.stop_event):
            if isinstance(row, Rejected):
                self._reject(row)
                continue
            if shard_n > 1 and shard_of(row.uuid, shard_n) != shard_i:
                continue
            if timestamps == "now":
                if offset is None:
                    start = datetime.fromtimestamp(self.clock(), UTC)
                    if not_before is not None and start < not_before:
                        start = not_before
                    offset = start - row.ts
                row.ts = row.ts + offset
                wait = row.ts.timestamp() - self.clock()
                if wait > 0:
                    for p in list(batches):
                        self._emit(batches.pop(p), p)
                    self.flush()
                    self._sleep(wait)
                    if self.stop_event.is_set():
                        break
            if last is None or row.ts > last:
                last = row.ts
            p = partition_of(row.uuid, parts) if parts > 1 else 0
            batch = batches.get(p)
            if batch is None:
                batch = batches[p] = []
            batch.append(row)
            if len(batch) >= size:
                self._emit(batches.pop(p), p)
                if rate:
                    self._pace(rate)
        for p in list(batches):
            self._emit(batches.pop(p), p)
        return last

    def _emit(self, batch: list[Sample], partition: int = 0) -> None:
        if not batch:
            return
        self._pending.append((partition, codec.encode(batch)))
        self._pending_rows += len(batch)
        if len(self._pending) >= self.pipeline_depth:
            self.flush()

    def flush(self) -> None:
        """Publish buffered entries and rejected rows (pipelined), waiting out backpressure first."""
        if self._rejects:
            rejects, self._rejects = self._rejects, []
            self._redis(lambda: self.queue.reject(rejects, self.source_name))
        if self._repeat_rejects:
            repeats, self._repeat_rejects = self._repeat_rejects, 0
            self._redis(lambda: self.queue.count_rejected(repeats, self.source_name))
        if not self._pending:
            return
        self._wait_for_consumers({p for p, _ in self._pending})
        entries, rows = self._pending, self._pending_rows
        self._pending, self._pending_rows = [], 0
        self._redis(lambda: self.queue.publish(entries))
        self.summary.published += rows
        self.summary.entries += len(entries)
        self.metrics.published.inc(rows)
        if self.progress is not None:
            self.progress(rows)
        now = self.clock()
        if now - self._last_log >= LOG_EVERY_S:
            log.info("Published %d rows in %d entries since the last report (%d in all) to %s",
                     self.summary.published - self._logged_rows, self.summary.entries - self._logged_entries,
                     self.summary.published, self._where())
            self._last_log, self._logged_rows, self._logged_entries = now, self.summary.published, self.summary.entries

    def _reject(self, row: Rejected) -> None:
        """Count a rejected row; publish it to `<stream>:rejected` on a source's first pass only."""
        self.summary.rejected += 1
        self.metrics.rejected.inc()
        if self.summary.passes:  # a looped file rejects the same rows again: count them, do not repeat them
            self._repeat_rejects += 1
            return
        if self.summary.rejected <= MAX_LOGGED_REJECTS:
            log.warning("Rejected %sline %d: %s", f"{row.source} " if row.source else "", row.line, row.reason)
        elif self.summary.rejected == MAX_LOGGED_REJECTS + 1:
            log.warning("More rejected rows: no longer logging each one; all are in %s", self.queue.rejected_stream)
        self._rejects.append(row)
        if len(self._rejects) >= 1000:
            self.flush()

    def _where(self) -> str:
        n = len(self.queue)
        return self.queue.stream if n == 1 else f"{self.queue.stream} ({n} partitions)"

    def _wait_for_consumers(self, partitions: set[int]) -> None:
        """Wait while a partition about to be published to has more than high-water entries unacknowledged."""
        high = self.settings.high_water
        if high <= 0:
            return
        # look at the group's backlog every quarter high-water mark of entries, so it overshoots by at most that
        if self.summary.entries - self._entries_at_check < max(1, high // 4):
            return
        self._entries_at_check = self.summary.entries
        backlogs = self._redis(lambda: self.queue.backlogs(partitions))
        if max(backlogs.values(), default=0) <= high:
            return
        waited = False
        while not self.stop_event.is_set():
            self._redis(lambda: self.queue.safe_trim(partitions))  # backlog is read-only: trim what was acked since
            backlogs = self._redis(lambda: self.queue.backlogs(partitions))
            worst = max(backlogs, key=backlogs.__getitem__)
            self.metrics.lag.set(sum(backlogs.values()))
            if backlogs[worst] <= high * 0.8:
                break
            if not waited:
                log.info("Backpressure: %d entries unacknowledged by group %r in %s (high-water %d); waiting",
                         backlogs[worst], self.queue.group, self.queue[worst].stream, high)
                self.metrics.backpressure.inc()
                waited = True
            self._sleep(0.2)
        if waited:
            log.info("Backpressure released: %d entries unacknowledged", sum(backlogs.values()))

    def _pace(self, rate: float) -> None:
        due = self._started + (self.summary.published + self._pending_rows) / rate
        wait = due - self.clock()
        if wait > 0:
            self.flush()
            self._sleep(wait)

    def _sleep(self, seconds: float) -> None:
        self.stop_event.wait(seconds) if self.sleep is time.sleep else self.sleep(seconds)

    def stop(self) -> None:
        self.stop_event.set()


def _with_stop(rows: Iterable, stop: threading.Event) -> Iterator:
    for i, row in enumerate(rows):
        if i % 1000 == 0 and stop.is_set():
            return
        yield row

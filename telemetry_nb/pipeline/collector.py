"""Redis stream → store → ack: a consumer-group member that commits before it acknowledges.

Each read of up to `read_count` entries becomes one PostgreSQL transaction (thousands of rows);
`writers` connections write reads in parallel (a COPY keeps one server process busy, so two use two
cores), and the next read from Redis runs in a thread while the current ones are being written. On start it
re-reads its own pending entries; it periodically claims entries other (dead) collectors left
idle past the visibility timeout; an entry that cannot be decoded, or that was delivered more than
`max_deliveries` times, moves to `<stream>:dead` with its error. Errors are told apart by SQLSTATE:
an outage is retried, a refusal of the data is isolated to the refused rows, which alone are
dead-lettered (every other row of the entry is stored).

With stream partitions a collector is a member of the group on every partition: one reader thread per
partition (Redis spreads each partition's entries among the collectors), one writer; acks, claims,
dead letters, trimming and consumer clean-up go to the partition an entry came from.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import psycopg

from telemetry_nb import store
from telemetry_nb.backoff import Backoff, retry
from telemetry_nb.config import Settings
from telemetry_nb.observability import PipelineMetrics
from telemetry_nb.pipeline import codec
from telemetry_nb.pipeline.codec import CodecError, decode
from telemetry_nb.pipeline.maintainer import Maintainer
from telemetry_nb.pipeline.streams import REDIS_ERRORS, Entry, Partitions, Queue, T, as_partitions, retry_redis
from telemetry_nb.store import RowBatch
from telemetry_nb.store.isolate import isolate, refused_by_data

log = logging.getLogger(__name__)
LOG_EVERY_S = 5.0
_NOTHING = object()


@dataclass
class _Window:
    """What was written since the last progress line."""

    since: float
    consumed: int = 0
    stored: int = 0
    refused: int = 0
    entries: int = 0
    transactions: int = 0
    seconds: float = 0.0

    def add(self, consumed: int, stored: int, entries: int, seconds: float, refused: int = 0) -> None:
        self.consumed += consumed
        self.stored += stored
        self.refused += refused
        self.entries += entries
        self.transactions += 1
        self.seconds += seconds


class Collector:
    """Consume `queue` into the database at `database_url`; `run()` until stopped or drained."""

    def __init__(self, queue: Queue | Partitions, database_url: str, settings: Settings, *,
                 metrics: PipelineMetrics | None = None, clock: Callable[[], float] = time.monotonic,
                 join_wait_s: float = 0.05):
        self.partitions = as_partitions(queue)
        self.join_wait_s = join_wait_s  # how long a short read waits for a running write to join the next one
        self.queue = self.partitions[0]  # the partition `process` acks to when it is not told which
        self.database_url = database_url
        self.settings = settings
        self.metrics = metrics or PipelineMetrics()
        self.clock = clock
        self.stop_event = threading.Event()
        self._local = threading.local()  # each writer thread's own store.Writer (its own connection)
        self._writers: list[store.Writer] = []  # every open one, for close()
        self._lock = threading.Lock()  # totals and the progress window, updated by the writer threads
        self._pool: ThreadPoolExecutor | None = None
        self._held: object = _NOTHING  # the read (or a reader's end, None) `_next_read` could not merge
        self.totals = {"consumed": 0, "stored": 0, "dead": 0, "lost": 0, "expired": 0}
        self._leftover: list[tuple[Queue, list[Entry]]] = []
        # entries the reader threads decoded ahead, by (partition key, entry id): ids repeat across partitions
        self._decoded: dict[tuple[str, bytes], RowBatch | CodecError] = {}
        self._window = _Window(clock())

    # -- dependencies, with retry ----------------------------------------------------------------
    def _redis(self, fn: Callable[[], T], what: str = "Redis") -> T:
        return retry_redis(fn, what=what, log=log, retry_max_s=self.settings.retry_max_s,
                           on_retry=self.metrics.retries.labels("redis").inc, should_stop=self.stop_event.is_set)

    def _db_writer(self) -> store.Writer:
        """This thread's writer, opened (and the schema migrated) on first use, with retry."""
        writer = getattr(self._local, "writer", None)
        if writer is None:
            def open_writer() -> store.Writer:
                conn = store.connect(self.database_url)
                try:
                    store.migrate(conn, partition=self.settings.policy().partition)
                    return store.Writer(conn, partition=self.settings.policy().partition)
                except BaseException:
                    conn.close()
                    raise
            writer = retry(open_writer, what="PostgreSQL", errors=(Exception,), retryable=store.is_outage,
                           log=log, backoff=Backoff(self.settings.retry_max_s),
                           on_retry=lambda e: self.metrics.retries.labels("postgresql").inc(),
                           should_stop=self.stop_event.is_set)
            self._local.writer = writer
            with self._lock:
                self._writers.append(writer)
        return writer

    def _drop_db(self) -> None:
        """Close this thread's connection (after an outage); the next write opens a new one."""
        writer = getattr(self._local, "writer", None)
        self._local.writer = None
        if writer is not None:
            with self._lock:
                if writer in self._writers:
                    self._writers.remove(writer)
            _close(writer.conn)

    def close(self) -> None:
        with self._lock:
            writers, self._writers = self._writers, []
        for writer in writers:
            _close(writer.conn)

    # -- processing ------------------------------------------------------------------------------
    def process(self, entries: list[Entry], queue: Queue | None = None) -> int:
        """Decode, write in one transaction, then ack to `queue` (the entries' partition); returns rows stored.

        Retries the DB until it works.
        """
        if not entries:
            return 0
        q = queue or self.queue
        good: list[tuple[bytes, RowBatch]] = []
        for eid, fields in entries:
            batch = self._decoded.pop((q.stream, eid), None)
            if batch is None:
                batch = _decode(fields)
            if isinstance(batch, CodecError):
                self._dead(q, eid, fields, str(batch))
            else:
                good.append((eid, batch))
        if not good:
            return 0
        stored = self._write(q, good, {eid: fields for eid, fields in entries})
        return stored

    def _write(self, q: Queue, good: list[tuple[bytes, RowBatch]], raw: dict[bytes, dict]) -> int:
        """Write entries in one transaction, then ack them; a refused group is split until each refusal is isolated."""
        started = self.clock()
        try:
            result = self._commit([b for _, b in good])
        except Exception as err:
            if not refused_by_data(err):
                raise
            if len(good) > 1:
                log.warning("PostgreSQL refused a transaction of %d entries (%s); splitting it to isolate the "
                            "refused rows", len(good), store.reason(err))
                mid = len(good) // 2
                return self._write(q, good[:mid], raw) + self._write(q, good[mid:], raw)
            return self._isolate(q, good[0][0], good[0][1], raw[good[0][0]], err)
        elapsed = self.clock() - started
        ids = [eid for eid, _ in good]
        self._redis(lambda: q.ack(ids), what="Redis (ack after commit)")
        self._count(result.consumed, result.stored, len(ids), elapsed, expired=result.expired)
        return result.stored

    def _commit(self, batches: list[RowBatch]) -> store.WriteResult:
        """One transaction; outages (by SQLSTATE) are retried with backoff, refusals of the data raised."""
        backoff = Backoff(self.settings.retry_max_s)
        while True:
            writer = self._db_writer()
            try:
                return writer.write(batches)
            except Exception as err:
                if not store.is_outage(err):
                    raise
                self._drop_db()
                if self.stop_event.is_set():
                    raise
                delay = backoff.next_delay()
                self.metrics.retries.labels("postgresql").inc()
                log.warning("PostgreSQL unavailable (%s); %d batches stay pending; retrying in %.1fs",
                            store.reason(err), len(batches), delay)
                backoff.sleep(delay)

    def _isolate(self, q: Queue, eid: bytes, batch: RowBatch, fields: dict, err: BaseException) -> int:
        """Store every row of a refused entry the database accepts; dead-letter the others with its reason, ack."""
        log.warning("PostgreSQL refused entry %s (%s); isolating the refused rows among its %d", eid.decode(),
                    store.reason(err), batch.n)
        started = self.clock()
        done = isolate(batch, lambda part: self._commit([part]))
        parts = [(codec.encode_batch(part), f"database rejected the batch: {why} ({part.n} of {batch.n} rows "
                  "refused; the others are stored)", {b"rows": str(part.n).encode(), b"row": part.describe().encode()})
                 for part, why in done.refused]
        for part, why in done.refused:
            log.error("Dead-lettering %d of %d rows of entry %s to %s: %s (%s)", part.n, batch.n, eid.decode(),
                      q.dead_stream, why, part.describe(1))
        deliveries = self._redis(lambda: q.deliveries([eid])).get(eid, 1) if parts else 0
        self._redis(lambda: q.dead_letter_parts(eid, parts, deliveries), what="Redis (dead letters and ack)")
        self.metrics.dead.inc(len(parts))
        self.metrics.dead_rows.inc(done.refused_rows)
        with self._lock:
            self.totals["dead"] += len(parts)
        self._count(done.consumed, done.stored, 1, self.clock() - started, done.refused_rows, done.expired)
        log.info("Entry %s: stored %d rows, dead-lettered %d (%d transactions)", eid.decode(), done.stored,
                 done.refused_rows, done.transactions)
        return done.stored

    def _count(self, consumed: int, stored: int, entries: int, elapsed: float, refused: int = 0,
               expired: int = 0) -> None:
        with self._lock:  # the writer threads count at once
            self.metrics.batch_seconds.observe(elapsed)
            self.metrics.consumed.inc(consumed)
            self.metrics.stored.inc(stored)
            self.metrics.duplicates.inc(consumed - stored - refused - expired)
            self.metrics.expired.inc(expired)
            self.totals["consumed"] += consumed
            self.totals["stored"] += stored
            self.totals["expired"] += expired
            if expired:
                log.warning("Skipped %d rows older than the retention horizon (telemetry_rows_expired)", expired)
            log.debug("Consumed %d rows from %d entries; Stored %d rows (%d duplicates) in %.0f ms",
                      consumed, entries, stored, consumed - stored - refused, elapsed * 1000)
            self._window.add(consumed, stored, entries, elapsed, refused)
            if self.clock() - self._window.since >= LOG_EVERY_S:
                self._report()

    def _report(self) -> None:
        """One INFO line per few seconds of work, not one per transaction."""
        w = self._window
        if w.entries:
            log.info("Consumed %d rows from %d entries; Stored %d rows (%d duplicates%s) in %d transactions, "
                     "%.0f ms writing", w.consumed, w.entries, w.stored, w.consumed - w.stored - w.refused,
                     f", {w.refused} dead-lettered" if w.refused else "", w.transactions, w.seconds * 1000)
        self._window = _Window(self.clock())

    def _dead(self, q: Queue, eid: bytes, fields: dict, error: str, deliveries: int = 0) -> None:
        log.error("Dead-lettering entry %s to %s: %s", eid.decode(), q.dead_stream, error)
        self._redis(lambda: q.dead_letter(eid, fields, error, deliveries))
        self.metrics.dead.inc()
        with self._lock:
            self.totals["dead"] += 1

    # -- recovery --------------------------------------------------------------------------------
    def recover_own(self) -> None:
        """Re-process entries this consumer name read before a restart but never acked (every partition)."""
        for q in self.partitions:
            while not self.stop_event.is_set():
                entries = self._redis(lambda q=q: q.read(self.settings.read_count, pending=True))
                if not entries:
                    break
                log.info("Recovering %d pending entries of consumer %s in %s", len(entries), q.consumer, q.stream)
                self._process_now(self._screen(q, entries), q)

    def claim_stale(self) -> int:
        """Claim and process entries idle past the visibility timeout on every partition; returns how many."""
        return sum(self._claim_stale(q) for q in self.partitions)

    def _claim_stale(self, q: Queue) -> int:
        total = 0
        cursor: bytes | str = b"0-0"
        while not self.stop_event.is_set():
            claimed = self._redis(lambda c=cursor: q.claim_stale(
                int(self.settings.visibility_timeout_s * 1000), self.settings.read_count, c))
            if claimed.deleted:
                self.metrics.lost.inc(len(claimed.deleted))
                self.totals["lost"] += len(claimed.deleted)
                log.error("DATA LOSS: %d pending entries were deleted from %s before being acknowledged: %s",
                          len(claimed.deleted), q.stream,
                          ", ".join(d.decode() if isinstance(d, bytes) else str(d) for d in claimed.deleted[:10]))
            if claimed.entries:
                log.info("Claimed %d entries of %s idle for more than %.0fs from other consumers",
                         len(claimed.entries), q.stream, self.settings.visibility_timeout_s)
                self.metrics.claimed.inc(len(claimed.entries))
                total += len(claimed.entries)
                self._process_now(self._screen(q, claimed.entries), q)
            cursor = claimed.cursor
            if cursor in (b"0-0", "0-0"):
                break
        return total

    def _screen(self, q: Queue, entries: list[Entry]) -> list[Entry]:
        """Dead-letter redelivered entries that have already failed `max_deliveries` times."""
        counts = self._redis(lambda: q.deliveries([eid for eid, _ in entries]))
        keep = []
        for eid, fields in entries:
            n = counts.get(eid, 1)
            if n > self.settings.max_deliveries:
                self._dead(q, eid, fields, f"delivered {n} times without being acknowledged "
                           f"(limit {self.settings.max_deliveries}): a collector failed on it each time", n)
            else:
                keep.append((eid, fields))
        return keep

    # -- main loop -------------------------------------------------------------------------------
    def _reader(self, q: Queue, out: queue.Queue, block_ms: int) -> None:
        """Read one partition into `out` as (partition queue, entries) until stopped."""
        while not self.stop_event.is_set():
            try:
                entries = self._redis(lambda: q.read(self.settings.read_count, block_ms), what=f"Redis ({q.stream})")
            except REDIS_ERRORS:
                break
            for eid, fields in entries:  # decoding here overlaps the write of the previous read
                self._decoded[(q.stream, eid)] = _decode(fields)
            while not self.stop_event.is_set():  # the queue is full while the writers are busy
                try:
                    out.put((q, entries), timeout=0.05)  # short: a stop is noticed soon
                    break
                except queue.Full:
                    continue
            else:
                if entries:
                    self._leftover.append((q, entries))
        try:
            out.put_nowait(None)
        except queue.Full:
            pass

    def _process_now(self, entries: list[Entry], q: Queue) -> int:
        """`process` on a writer thread (recovery and claims), waiting for it; directly when not running."""
        if self._pool is None:
            return self.process(entries, q)
        return self._pool.submit(self.process, entries, q).result()

    def _next_read(self, prefetched: queue.Queue) -> tuple[Queue, list[Entry]] | None:
        """The next read, merged with the reads queued behind it from the same partition up to `read_count`.

        While the writers are busy (a commit waits for its WAL flush) the readers queue small reads;
        writing them as one transaction makes the commits fewer exactly when commits are the bottleneck.
        """
        if self._held is not _NOTHING:
            item, self._held = self._held, _NOTHING
        else:
            item = prefetched.get(timeout=self.settings.block_ms / 1000 + 1)
        if item is None or not item[1]:
            return item
        source, entries = item
        return source, self._merge_queued(source, entries, prefetched)

    def _merge_queued(self, source: Queue, entries: list[Entry], prefetched: queue.Queue) -> list[Entry]:
        """`entries` and the reads queued behind them from `source`, up to `read_count` in all."""
        if self._held is not _NOTHING:
            return entries
        while len(entries) < self.settings.read_count:
            try:
                more = prefetched.get_nowait()
            except queue.Empty:
                break
            if more is None or more[0] is not source or len(entries) + len(more[1]) > self.settings.read_count:
                self._held = more
                break
            entries = entries + more[1]
        return entries

    def run(self, *, drain: bool = False) -> dict[str, int]:
        """Consume until `stop()`; with `drain`, until no undelivered or pending entries remain."""
        self._redis(self.partitions.ensure_group)
        writers = max(1, self.settings.writers)
        self._pool = ThreadPoolExecutor(max_workers=writers, thread_name_prefix="writer")
        self._pool.submit(self._db_writer).result()  # reach PostgreSQL (and migrate) before reading
        maintainer = self._start_maintainer()
        prefetched: queue.Queue = queue.Queue(maxsize=4)
        # while draining, a reader blocks briefly (10 ms), so the end is noticed and the readers joined soon
        block_ms = min(self.settings.block_ms, 10) if drain else self.settings.block_ms
        readers = [threading.Thread(target=self._reader, args=(q, prefetched, block_ms), daemon=True,
                                    name=f"stream-reader-{i}") for i, q in enumerate(self.partitions)]
        writing: set[Future] = set()  # reads being written, at most `writers`
        try:
            self.recover_own()
            for reader in readers:
                reader.start()
            next_sweep = self.clock()
            sweep_every = max(1.0, self.settings.visibility_timeout_s / 2)
            idle_reads = 0  # empty reads since the last sweep: one per partition makes an idle sweep
            while not self.stop_event.is_set():
                try:
                    item = self._next_read(prefetched)
                except queue.Empty:
                    item = (self.queue, [])
                if item is None:
                    break
                source, entries = item
                if entries and writing and len(entries) < self.settings.read_count:
                    # a short read while a write runs: the stream is caught up and one writer keeps pace.
                    # Waiting briefly for that write lets the reads behind this one join it in one
                    # transaction (2 writers taking every short read cost more CPU per row); a write stuck
                    # on a lock holds the next one up only for `join_wait_s`
                    wait(writing, timeout=self.join_wait_s, return_when=FIRST_COMPLETED)
                    writing = _settle(writing, full=False)
                    entries = self._merge_queued(source, entries, prefetched)
                if entries:
                    writing.add(self._pool.submit(self.process, entries, source))
                writing = _settle(writing, full=len(writing) >= writers)
                now = self.clock()
                idle_reads = 0 if entries else idle_reads + 1
                if idle_reads >= len(self.partitions) or now >= next_sweep:
                    next_sweep, idle_reads = now + sweep_every, 0
                    self.claim_stale()
                    self._housekeeping()
                    if not entries and drain and not writing and self._drained():
                        log.info("Drained: no undelivered or pending entries remain in %s", self._where())
                        break
            _settle(writing, full=True, every=True)
        finally:
            self.stop_event.set()
            if maintainer is not None:
                maintainer[0].stop()
            for reader in readers:
                if reader.is_alive():
                    reader.join(timeout=self.settings.block_ms / 1000 + 5)
            if self._held is not _NOTHING and self._held is not None and self._held[1]:
                self._leftover.append(self._held)
            self._held = _NOTHING
            while not prefetched.empty():
                item = prefetched.get_nowait()
                if item is not None and item[1]:
                    self._leftover.append(item)
            for f in writing:  # after a failure: let the other writes finish (or fail: they stay pending)
                err = None if f.cancelled() else f.exception()
                if err is not None:
                    log.warning("A write did not complete (%s); its entries stay pending for another collector", err)
            if self._leftover:
                log.info("Writing %d entries read before the stop", sum(len(e) for _, e in self._leftover))
                try:
                    for source, entries in self._leftover:
                        self._process_now(entries, source)
                except Exception as err:  # noqa: BLE001 (they stay pending and will be claimed)
                    log.warning("Could not write them (%s); they stay pending for another collector", err)
            self._pool.shutdown(wait=True)
            self._pool = None
            self.close()
            if maintainer is not None:
                maintainer[1].join(timeout=30)
        self._report()
        log.info("Collector done: consumed=%d stored=%d dead=%d lost=%d expired=%d", self.totals["consumed"],
                 self.totals["stored"], self.totals["dead"], self.totals["lost"], self.totals["expired"])
        return dict(self.totals)

    def _housekeeping(self) -> None:
        """Trim what every group acknowledged, drop consumers left by restarts, refresh the gauges."""
        self._redis(self.partitions.safe_trim)
        removed = self._redis(lambda: self.partitions.prune_consumers(self.settings.consumer_idle_limit_s))
        if removed:
            log.info("Removed %d consumers idle for more than %.0fs with nothing pending: %s", len(removed),
                     self.settings.consumer_idle_limit_s, ", ".join(removed[:10]))
        self.metrics.lag.set(self._redis(self.partitions.backlog))
        self.metrics.side_totals.labels("dead").set(self._redis(self.partitions.dead_count))
        self.metrics.side_totals.labels("rejected").set(self._redis(self.partitions.rejected_count))

    def _start_maintainer(self) -> tuple[Maintainer, threading.Thread] | None:
        """The background maintenance leader candidate (one per collector; only the lock holder works)."""
        if not self.settings.maintain:
            return None
        m = Maintainer(self.database_url, self.settings.policy(), metrics=self.metrics)
        t = threading.Thread(target=m.run, args=(self.settings.maintain_interval_s,), daemon=True, name="maintainer")
        t.start()
        return m, t

    def _where(self) -> str:
        n = len(self.partitions)
        return self.queue.stream if n == 1 else f"{self.partitions.stream} ({n} partitions)"

    def _drained(self) -> bool:
        backlog = self._redis(self.partitions.backlog)
        if backlog:
            log.info("Draining: %d entries still undelivered or pending (claimable after %.0fs idle)",
                     backlog, self.settings.visibility_timeout_s)
        return backlog == 0

    def stop(self) -> None:
        self.stop_event.set()


def _settle(writing: set[Future], *, full: bool, every: bool = False) -> set[Future]:
    """Drop finished writes, re-raising the first failure; when `full`, wait for one (`every`: all) first."""
    if full and writing:
        wait(writing, return_when="ALL_COMPLETED" if every else FIRST_COMPLETED)
    done = {f for f in writing if f.done()}
    for f in done:
        f.result()
    return writing - done


def _close(conn: psycopg.Connection) -> None:
    try:
        conn.close()
    except Exception:  # noqa: BLE001 (already broken)
        pass


def _decode(fields: dict) -> RowBatch | CodecError:
    try:
        return decode(fields)
    except CodecError as err:
        return err

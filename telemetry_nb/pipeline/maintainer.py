"""`telemetry-nb maintain`: partitions ahead, rollup refresh, packing of closed ranges, retention.

One leader at a time: a maintainer acts only while it holds a PostgreSQL session advisory lock on its
own connection, so collectors can all run one in the background and only one works; when the leader
dies its connection closes, the lock frees and the next one takes over. Each step is a transaction
of its own (see `store.lifecycle`), so a leader killed mid-step leaves nothing half done.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import psycopg

from telemetry_nb import store
from telemetry_nb.observability import PipelineMetrics
from telemetry_nb.store import lifecycle

log = logging.getLogger(__name__)
LEADER_LOCK = 0x7E1E_9A29


@dataclass
class Report:
    """What one maintenance pass did."""

    leader: bool = True
    created: list[str] = field(default_factory=list)
    refresh: lifecycle.RefreshReport | None = None
    packed: list[str] = field(default_factory=list)
    dropped: dict[str, list[str]] = field(default_factory=dict)
    reference: datetime | None = None


class Maintainer:
    """Run the lifecycle steps against `database_url` as the single leader; `clock` gives the wall time."""

    def __init__(self, database_url: str, policy: lifecycle.Policy, *, metrics: PipelineMetrics | None = None,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)):
        self.database_url = database_url
        self.policy = policy
        self.metrics = metrics or PipelineMetrics()
        self.clock = clock
        self._conn: psycopg.Connection | None = None
        self.stop_event = threading.Event()

    def _leader_conn(self) -> psycopg.Connection | None:
        """Our connection if we hold (or just won) the leader lock, else None."""
        if self._conn is not None and not self._conn.closed:
            return self._conn
        conn = store.connect(self.database_url, autocommit=True)
        try:
            store.migrate(conn, partition=self.policy.partition)
            if not conn.execute("SELECT pg_try_advisory_lock(%s)", (LEADER_LOCK,)).fetchone()[0]:
                conn.close()
                return None
        except BaseException:
            conn.close()
            raise
        log.info("Maintenance leader: this process runs partitions, rollups, packing and retention")
        self._conn = conn
        return conn

    def __enter__(self) -> Maintainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection, which gives up the leader lock."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def run_once(self) -> Report:
        """One pass if this process is (or becomes) the leader; `Report(leader=False)` otherwise."""
        conn = self._leader_conn()
        if conn is None:
            return Report(leader=False)
        try:
            return self._pass(conn)
        except psycopg.Error:
            self.close()
            raise

    def _pass(self, conn: psycopg.Connection) -> Report:
        report = Report()
        now = self.clock()
        ref = lifecycle.reference_time(conn, now)
        report.created = lifecycle.create_ahead(conn, self.policy, [now] + ([ref] if ref else []))
        self.metrics.partitions_created.inc(len(report.created))
        # summarize new BRIN ranges so the refresh finds the newest rows without scanning whole partitions
        conn.execute("SELECT brin_summarize_new_values(c.oid) FROM pg_class c JOIN pg_inherits i "
                     "ON i.inhrelid = c.oid WHERE i.inhparent = 'telemetry_raw_ts'::regclass")
        while True:
            r = lifecycle.refresh_rollups(conn, self.policy)
            if report.refresh is None or r.changes:
                report.refresh = r if report.refresh is None else _merged(report.refresh, r)
            if r.changes:
                self.metrics.rollup_seconds.observe(r.seconds)
                self.metrics.rollup_rows.inc(r.rows_1m + r.rows_1h)
                log.info("Rollups refreshed: %d change(s) over %d range(s), %d 1m + %d 1h rows in %.2fs",
                         r.changes, len(r.ranges), r.rows_1m, r.rows_1h, r.seconds)
                if r.rows_1m > 50_000:  # fresh statistics, or the planner takes a big new partition for empty
                    lifecycle.analyze_touched(conn, r.ranges)
            if r.changes < 100_000 or self.stop_event.is_set():
                break
        ref = lifecycle.reference_time(conn, now)
        report.reference = ref
        if ref is not None:
            report.packed = lifecycle.pack_closed(conn, self.policy, ref)
            self.metrics.partitions_packed.inc(len(report.packed))
            report.dropped = lifecycle.enforce_retention(conn, self.policy, ref)
            for table, names in report.dropped.items():
                self.metrics.partitions_dropped.labels(table).inc(len(names))
        self.metrics.maintenance_runs.inc()
        return report

    def run(self, interval_s: float = 60.0, *, sleep: Callable[[float], bool] | None = None) -> None:
        """Pass every `interval_s` until `stop()`; errors are logged and retried next time."""
        wait = sleep or self.stop_event.wait
        try:
            while not self.stop_event.is_set():
                try:
                    self.run_once()
                except (psycopg.Error, OSError) as err:
                    self.metrics.retries.labels("postgresql").inc()
                    log.warning("Maintenance pass failed (%s: %s); retrying in %.0fs", type(err).__name__,
                                str(err).strip().splitlines()[0] if str(err).strip() else "", interval_s)
                if wait(interval_s):
                    break
        finally:
            self.close()

    def stop(self) -> None:
        self.stop_event.set()


def _merged(a: lifecycle.RefreshReport, b: lifecycle.RefreshReport) -> lifecycle.RefreshReport:
    return lifecycle.RefreshReport(a.changes + b.changes, a.ranges + b.ranges, a.rows_1m + b.rows_1m,
                                   a.rows_1h + b.rows_1h, a.seconds + b.seconds)

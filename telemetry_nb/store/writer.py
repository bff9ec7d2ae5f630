"""The collector's write path: many batches of rows in one transaction, exactly once, and the canary's clean-up."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import psycopg

from telemetry_nb.store import binary, counts, lifecycle
from telemetry_nb.store.events import labels_json, record_changes
from telemetry_nb.store.rows import EventRow, GpuRow, InventoryRow, RowBatch, WorkloadRow
from telemetry_nb.timeparse import parse_timestamp

STAGING = """
CREATE TEMP TABLE IF NOT EXISTS staging (
    gpu_id bigint, ts timestamptz, metric_id int, value double precision, workload_id bigint
) ON COMMIT DELETE ROWS
"""

LAYOUT_TTL_S = 30.0  # horizons and partitions are re-read at least this often


class IdCollision(psycopg.DataError):
    """Two names hashed to the same id: the batch is refused rather than mislabelled."""


class BadTimestamp(psycopg.DataError):
    """A batch row whose timestamp cannot be read: the batch is refused (PostgreSQL would refuse it too)."""


@dataclass
class WriteResult:
    consumed: int
    stored: int
    expired: int = 0  # rows older than the retention horizon: counted and skipped


_UTC_SUFFIX = b"+00:00"


def batch_span(batch: RowBatch) -> tuple[datetime, datetime] | None:
    """(oldest, newest) timestamp of a batch's COPY rows, without parsing every row.

    The rows are `gpu\tts\tmetric\tvalue\tworkload\n`, so every 4th tab-separated field is a timestamp;
    UTC ISO texts (what the codec writes) order like the times they name, so only two get parsed.
    """
    if batch.plain is not None:
        return binary.span(batch.rows, batch.plain)
    texts = set(batch.rows.split(b"\t")[1::4])
    if not texts:
        return None
    if all(t.endswith(_UTC_SUFFIX) for t in texts):
        return _parse(min(texts)), _parse(max(texts))
    parsed = [_parse(t) for t in texts]
    return min(parsed), max(parsed)


def _parse(text: bytes) -> datetime:
    try:
        ts = datetime.fromisoformat(text.decode(errors="replace"))  # fast: what the codec writes
        if ts.tzinfo is not None:
            return ts
    except ValueError:
        pass
    try:
        return parse_timestamp(text.decode(errors="replace"))
    except ValueError as err:
        raise BadTimestamp(f"batch has an unreadable timestamp {text.decode(errors='replace')!r:.80}: {err}") from None


class Writer:
    """The collector's write path: many batches → one transaction → exactly-once rows.

    Rows are COPYed straight into `telemetry` under a savepoint. Only when that hits a row that is
    already stored (a redelivery, a replayed file) does the transaction fall back to COPY into a
    staging table plus `INSERT … ON CONFLICT DO NOTHING`, which is slower but skips duplicates.
    """

    def __init__(self, conn: psycopg.Connection, *, partition: timedelta = lifecycle.DAY,
                 clock: Callable[[], float] = time.monotonic):
        self.conn = conn
        self.partition = partition
        self.clock = clock
        self._loaded_at = 0.0
        conn.execute(STAGING)
        conn.commit()
        self._known_metrics: dict[int, str] = {}
        self._known_workloads: dict[int, WorkloadRow] = {}
        self._known_gpus: dict[int, GpuRow] = {}
        self._known_inventory: dict[int, InventoryRow] = {}
        self._state: lifecycle.State | None = None
        self._partitions: list[lifecycle.Partition] = []
        self.fallbacks = 0
        self.events_added = 0
        self._slot = 0  # the count slot this writer's last transaction took: tried first next time

    def _load_layout(self) -> None:
        """Re-read horizons and raw partitions (after a maintainer packed, dropped or created some).

        A stale copy is safe: rows for a range that was dropped or packed meanwhile find no partition,
        the COPY fails, and the write is redone with a fresh layout on the careful path.
        """
        with self.conn.transaction():
            self._state = lifecycle.read_state(self.conn)
            self._partitions = lifecycle.partitions(self.conn, "telemetry_raw")
        self._loaded_at = self.clock()

    def _covered(self, lo: datetime, hi: datetime) -> bool:
        return not lifecycle.missing_ranges(self._partitions, lo, hi, self.partition)

    def _prepare(self, spans: list[tuple[datetime, datetime]]) -> bool:
        """Make sure partitions exist for the batch's rows; returns True when rows must take the careful path.

        The careful path (staging + filters) is for rows older than the retention horizon (skipped) or
        inside packed ranges (merged into packed rows, deduplicated against them).
        """
        if self._state is None or self.clock() - self._loaded_at > LAYOUT_TTL_S:
            self._load_layout()
        state = self._state
        lo = min(a for a, _ in spans)
        careful = lo < state.packed_before or lo < state.expired()
        if all(self._covered(a, b) for a, b in spans):
            return careful
        floor = max(state.packed_before, state.expired())
        with self.conn.transaction():
            for a, b in spans:
                if b >= floor:
                    lifecycle.ensure_partitions(self.conn, "telemetry_raw", max(a, floor), b, self.partition)
                if a < state.packed_before and b >= state.expired():
                    lifecycle.ensure_partitions(self.conn, "telemetry_packed", max(a, state.expired()),
                                                min(b, state.packed_before), self.partition)
        self._partitions = lifecycle.partitions(self.conn, "telemetry_raw")
        self.conn.commit()
        return careful

    def write(self, batches: Sequence[RowBatch]) -> WriteResult:
        """Write `batches` in one transaction; raises on failure with nothing committed.

        When a maintainer changed the partitions meanwhile (a dropped or packed range), the layout is
        re-read and the write redone once.
        """
        spans = [s for s in (batch_span(b) for b in batches if b.n) if s is not None]
        for attempt in (1, 2, 3):
            careful = self._prepare(spans) if spans else False
            try:
                return self._write(batches, spans, careful or attempt > 1)
            except (psycopg.errors.CheckViolation, psycopg.errors.UndefinedTable) as err:
                if attempt == 3 or not (isinstance(err, psycopg.errors.UndefinedTable)
                                        or "no partition" in str(err)):
                    raise
                self._load_layout()
        raise AssertionError("unreachable")

    def _write(self, batches: Sequence[RowBatch], spans: list[tuple[datetime, datetime]],
               careful: bool) -> WriteResult:
        gpus: dict[int, GpuRow] = {}
        metrics: dict[int, str] = {}
        workloads: dict[int, WorkloadRow] = {}
        inventory: dict[int, InventoryRow] = {}
        events: list[EventRow] = []
        consumed = 0
        for b in batches:
            consumed += b.n
            for m in b.metrics:
                if self._known_metrics.get(m.id) != m.name:
                    metrics[m.id] = m.name
            for w in b.workloads:
                if w.id not in self._known_workloads:
                    workloads[w.id] = w
            for g in b.gpus:
                if self._known_gpus.get(g.id) != g:
                    gpus[g.id] = g
            for i in b.inventory:
                if self._known_inventory.get(i.id) != i:
                    inventory[i.id] = _merge(inventory.get(i.id), i)
            events.extend(b.events)
        conn = self.conn
        with conn.transaction(), conn.cursor() as cur:
            if metrics:
                self._upsert_metrics(cur, metrics)
            if workloads:
                w = sorted(workloads.values())
                cur.execute("INSERT INTO workloads (id, namespace, pod, container) "
                            "SELECT * FROM unnest(%b::bigint[], %b::text[], %b::text[], %b::text[]) "
                            "ON CONFLICT DO NOTHING", [list(c) for c in zip(*w, strict=True)])
            if gpus:
                cols = [list(c) for c in zip(*sorted(gpus.values()), strict=True)]
                cur.execute(
                    "INSERT INTO gpus AS g (id, uuid, hostname, gpu_index, device, model_name) "
                    "SELECT * FROM unnest(%b::bigint[], %b::text[], %b::text[], %b::int[], %b::text[], %b::text[]) "
                    "ON CONFLICT (uuid) DO UPDATE SET hostname = EXCLUDED.hostname, gpu_index = EXCLUDED.gpu_index, "
                    "device = EXCLUDED.device, model_name = EXCLUDED.model_name "
                    "WHERE (g.hostname, g.gpu_index, g.device, g.model_name) IS DISTINCT FROM "
                    "(EXCLUDED.hostname, EXCLUDED.gpu_index, EXCLUDED.device, EXCLUDED.model_name)", cols)
            if inventory:
                _update_inventory(cur, inventory)
            if careful:
                stored, per_metric, expired = self._careful_rows(cur, batches)
            else:
                stored, per_metric = self._copy_rows(cur, batches, consumed)
                expired = 0
            slot = counts.add(cur, per_metric, self._slot)
            if stored:  # the rollup refresh recomputes these ranges; readers take them from raw rows until then
                ranges = lifecycle.merge_ranges((a, b + timedelta(microseconds=1)) for a, b in spans)
                cur.execute("INSERT INTO telemetry_changes (lo, hi) SELECT * FROM unnest(%b::timestamptz[], "
                            "%b::timestamptz[])", ([a for a, _ in ranges],
                                                   [b - timedelta(microseconds=1) for _, b in ranges]))
            added = record_changes(cur, events) if events else 0
        # remember only what is committed, so a rolled-back transaction is redone in full
        self._known_metrics.update(metrics)
        self._known_workloads.update(workloads)
        self._known_gpus.update(gpus)
        self._known_inventory.update(inventory)
        self.events_added += added
        if slot is not None:
            self._slot = slot
        return WriteResult(consumed=consumed, stored=stored, expired=expired)

    def _upsert_metrics(self, cur: psycopg.Cursor, metrics: dict[int, str]) -> None:
        new = metrics
        cur.execute("INSERT INTO metrics (id, name) SELECT * FROM unnest(%b::int[], %b::text[]) "
                    "ON CONFLICT DO NOTHING", (sorted(new), [new[i] for i in sorted(new)]))
        stored = dict(cur.execute("SELECT id, name FROM metrics WHERE id = ANY(%s)", (list(new),)).fetchall())
        for i, name in new.items():
            if stored.get(i) != name:
                raise IdCollision(f"metric {name!r} hashes to id {i}, already used by {stored.get(i)!r}")

    def _copy_rows(self, cur: psycopg.Cursor, batches: Sequence[RowBatch], consumed: int) -> tuple[int, dict[int, int]]:
        """COPY the rows; returns how many were new, and how many of those per metric id."""
        try:
            with self.conn.transaction():
                copy_rows(cur, "telemetry_raw", batches)
            per_metric: dict[int, int] = {}
            for b in batches:
                for m in b.metrics:
                    per_metric[m.id] = per_metric.get(m.id, 0) + m.rows
            return consumed, per_metric
        except psycopg.errors.UniqueViolation:
            self.fallbacks += 1
        copy_rows(cur, "staging", batches)
        rows = cur.execute("WITH new AS (INSERT INTO telemetry_raw SELECT * FROM staging ON CONFLICT DO NOTHING "
                           "RETURNING metric_id) SELECT metric_id, count(*) FROM new GROUP BY metric_id").fetchall()
        return sum(n for _, n in rows), dict(rows)


    def _careful_rows(self, cur: psycopg.Cursor, batches: Sequence[RowBatch]) -> tuple[int, dict[int, int], int]:
        """Staging path for rows that may be expired or fall into packed ranges: (stored, per metric, expired)."""
        self.fallbacks += 1
        state = self._state
        copy_rows(cur, "staging", batches)
        expired = cur.execute("SELECT count(*) FROM staging WHERE ts < %s", (state.expired(),)).fetchone()[0]
        per_metric: dict[int, int] = {}
        rows = cur.execute("WITH new AS (INSERT INTO telemetry_raw SELECT * FROM staging WHERE ts >= %s "
                           "ON CONFLICT DO NOTHING RETURNING metric_id) SELECT metric_id, count(*) FROM new "
                           "GROUP BY metric_id", (max(state.expired(), state.packed_before),)).fetchall()
        for i, n in rows:
            per_metric[i] = per_metric.get(i, 0) + n
        if state.packed_before > state.expired():
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (lifecycle.PACK_LOCK,))
            rows = cur.execute(
                "WITH late AS (SELECT DISTINCT ON (gpu_id, ts, metric_id) * FROM staging s "
                "  WHERE s.ts >= %(expired)s AND s.ts < %(packed)s AND NOT EXISTS ("
                "    SELECT 1 FROM telemetry_packed p WHERE p.gpu_id = s.gpu_id AND p.metric_id = s.metric_id "
                "    AND p.hour = date_bin('1 hour', s.ts, TIMESTAMPTZ '2000-01-01 00:00:00+00') "
                "    AND s.ts = ANY(p.ts))), "
                "new AS (" + lifecycle.PACK_SQL.format(src="late") + " RETURNING metric_id, n) "
                "SELECT metric_id, sum(n) FROM new GROUP BY metric_id",
                {"expired": state.expired(), "packed": state.packed_before}).fetchall()
            for i, n in rows:
                per_metric[i] = per_metric.get(i, 0) + int(n)
        return sum(per_metric.values()), per_metric, expired


def copy_rows(cur: psycopg.Cursor, table: str, batches: Sequence[RowBatch]) -> None:
    """COPY the batches' rows into `table`: one text COPY for text rows, one binary COPY for binary rows."""
    text = [b for b in batches if b.plain is None and b.n]
    packed = [b for b in batches if b.plain is not None and b.n]
    if text:
        with cur.copy(f"COPY {table} FROM STDIN") as copy:
            for b in text:
                copy.write(b.rows)
    if packed:
        with cur.copy(f"COPY {table} FROM STDIN (FORMAT binary)") as copy:
            copy.write(binary.HEADER)
            for b in packed:
                copy.write(b.rows)
            copy.write(binary.TRAILER)


def _merge(old: InventoryRow | None, new: InventoryRow) -> InventoryRow:
    """Two inventory rows of one GPU in one write: labels merged, non-empty values win."""
    if old is None:
        return new
    return InventoryRow(new.id, new.pci_bus_id or old.pci_bus_id, new.driver_version or old.driver_version,
                        {**old.labels, **new.labels}, new.parent_uuid or old.parent_uuid,
                        new.mig_profile or old.mig_profile,
                        new.mig_instance if new.mig_instance is not None else old.mig_instance)


def _update_inventory(cur: psycopg.Cursor, inventory: dict[int, InventoryRow]) -> None:
    """Labels are merged into the stored ones and empty values never overwrite known ones (ids in order)."""
    rows = [inventory[i] for i in sorted(inventory)]
    cur.execute(
        "UPDATE gpus AS g SET pci_bus_id = n.pci_bus_id, driver_version = n.driver_version, labels = n.labels, "
        "parent_uuid = n.parent_uuid, mig_profile = n.mig_profile, mig_instance = n.mig_instance "
        "FROM (SELECT g0.id, COALESCE(NULLIF(u.pci, ''), g0.pci_bus_id) AS pci_bus_id, "
        "COALESCE(NULLIF(u.drv, ''), g0.driver_version) AS driver_version, g0.labels || u.lab::jsonb AS labels, "
        "COALESCE(NULLIF(u.par, ''), g0.parent_uuid) AS parent_uuid, "
        "COALESCE(NULLIF(u.prof, ''), g0.mig_profile) AS mig_profile, "
        "COALESCE(u.inst, g0.mig_instance) AS mig_instance "
        "FROM unnest(%b::bigint[], %b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %b::int[]) "
        "AS u(id, pci, drv, lab, par, prof, inst) JOIN gpus g0 ON g0.id = u.id ORDER BY g0.id) n "
        "WHERE g.id = n.id AND (g.pci_bus_id, g.driver_version, g.labels, g.parent_uuid, g.mig_profile, "
        "g.mig_instance) IS DISTINCT FROM (n.pci_bus_id, n.driver_version, n.labels, n.parent_uuid, n.mig_profile, "
        "n.mig_instance)",
        ([r.id for r in rows], [r.pci_bus_id for r in rows], [r.driver_version for r in rows],
         [labels_json(r.labels) for r in rows], [r.parent_uuid for r in rows], [r.mig_profile for r in rows],
         [r.mig_instance for r in rows]))


def delete_gpu(conn: psycopg.Connection, uuid: str) -> int:
    """Remove a GPU and all its rows (canary clean-up); returns the number of telemetry rows removed."""
    with conn.transaction(), conn.cursor() as cur:
        gpu = cur.execute("SELECT id FROM gpus WHERE uuid = %s", (uuid,)).fetchone()
        if gpu is None:
            return 0
        gone = cur.execute(
            "WITH gone AS (DELETE FROM telemetry_raw WHERE gpu_id = %s RETURNING metric_id, 1 AS n), "
            "packed AS (DELETE FROM telemetry_packed WHERE gpu_id = %s RETURNING metric_id, n) "
            "SELECT metric_id, sum(n)::bigint FROM (SELECT * FROM gone UNION ALL SELECT * FROM packed) g "
            "GROUP BY metric_id", (gpu[0], gpu[0])).fetchall()
        counts.add(cur, {i: -n for i, n in gone})
        cur.execute("DELETE FROM gpu_events WHERE gpu_id = %s", (gpu[0],))
        for table in lifecycle.ROLLUPS:
            cur.execute(f"DELETE FROM {table} WHERE gpu_id = %s", (gpu[0],))
        cur.execute("DELETE FROM gpus WHERE id = %s", (gpu[0],))
    return sum(n for _, n in gone)

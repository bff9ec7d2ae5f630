"""The collector's write path: many batches of rows in one transaction, exactly once, and the canary's clean-up."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import psycopg

from telemetry_nb.store.rows import GpuRow, RowBatch, WorkloadRow

STAGING = """
CREATE TEMP TABLE IF NOT EXISTS staging (
    gpu_id bigint, ts timestamptz, metric_id int, value double precision, workload_id bigint
) ON COMMIT DELETE ROWS
"""

class IdCollision(psycopg.DataError):
    """Two names hashed to the same id: the batch is refused rather than mislabelled."""


@dataclass
class WriteResult:
    consumed: int
    stored: int


class Writer:
    """The collector's write path: many batches → one transaction → exactly-once rows.

    Rows are COPYed straight into `telemetry` under a savepoint. Only when that hits a row that is
    already stored (a redelivery, a replayed file) does the transaction fall back to COPY into a
    staging table plus `INSERT … ON CONFLICT DO NOTHING`, which is slower but skips duplicates.
    """

    def __init__(self, conn: psycopg.Connection):
        self.conn = conn
        conn.execute(STAGING)
        conn.commit()
        self._known_metrics: dict[int, str] = {}
        self._known_workloads: dict[int, WorkloadRow] = {}
        self._known_gpus: dict[int, GpuRow] = {}
        self.fallbacks = 0

    def write(self, batches: Sequence[RowBatch]) -> WriteResult:
        """Write `batches` in one transaction; raises on failure with nothing committed."""
        gpus: dict[int, GpuRow] = {}
        metrics: dict[int, str] = {}
        workloads: dict[int, WorkloadRow] = {}
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
        conn = self.conn
        with conn.transaction(), conn.cursor() as cur:
            if metrics:
                self._upsert_metrics(cur, metrics)
            if workloads:
                w = sorted(workloads.values())
                cur.execute("INSERT INTO workloads (id, namespace, pod, container) "
                            "SELECT * FROM unnest(%s::bigint[], %s::text[], %s::text[], %s::text[]) "
                            "ON CONFLICT DO NOTHING", [list(c) for c in zip(*w, strict=True)])
            if gpus:
                cols = [list(c) for c in zip(*sorted(gpus.values()), strict=True)]
                cur.execute(
                    "INSERT INTO gpus AS g (id, uuid, hostname, gpu_index, device, model_name) "
                    "SELECT * FROM unnest(%s::bigint[], %s::text[], %s::text[], %s::int[], %s::text[], %s::text[]) "
                    "ON CONFLICT (uuid) DO UPDATE SET hostname = EXCLUDED.hostname, gpu_index = EXCLUDED.gpu_index, "
                    "device = EXCLUDED.device, model_name = EXCLUDED.model_name "
                    "WHERE (g.hostname, g.gpu_index, g.device, g.model_name) IS DISTINCT FROM "
                    "(EXCLUDED.hostname, EXCLUDED.gpu_index, EXCLUDED.device, EXCLUDED.model_name)", cols)
            stored, per_metric = self._copy_rows(cur, batches, consumed)
            _add_metric_rows(cur, per_metric)
        # remember only what is committed, so a rolled-back transaction is redone in full
        self._known_metrics.update(metrics)
        self._known_workloads.update(workloads)
        self._known_gpus.update(gpus)
        return WriteResult(consumed=consumed, stored=stored)

    def _upsert_metrics(self, cur: psycopg.Cursor, metrics: dict[int, str]) -> None:
        new = metrics
        cur.execute("INSERT INTO metrics (id, name) SELECT * FROM unnest(%s::int[], %s::text[]) "
                    "ON CONFLICT DO NOTHING", (sorted(new), [new[i] for i in sorted(new)]))
        stored = dict(cur.execute("SELECT id, name FROM metrics WHERE id = ANY(%s)", (list(new),)).fetchall())
        for i, name in new.items():
            if stored.get(i) != name:
                raise IdCollision(f"metric {name!r} hashes to id {i}, already used by {stored.get(i)!r}")

    def _copy_rows(self, cur: psycopg.Cursor, batches: Sequence[RowBatch], consumed: int) -> tuple[int, dict[int, int]]:
        """COPY the rows; returns how many were new, and how many of those per metric id."""
        try:
            with self.conn.transaction(), cur.copy("COPY telemetry FROM STDIN") as copy:
                for b in batches:
                    copy.write(b.rows)
            per_metric: dict[int, int] = {}
            for b in batches:
                for m in b.metrics:
                    per_metric[m.id] = per_metric.get(m.id, 0) + m.rows
            return consumed, per_metric
        except psycopg.errors.UniqueViolation:
            self.fallbacks += 1
        with cur.copy("COPY staging FROM STDIN") as copy:
            for b in batches:
                copy.write(b.rows)
        rows = cur.execute("WITH new AS (INSERT INTO telemetry SELECT * FROM staging ON CONFLICT DO NOTHING "
                           "RETURNING metric_id) SELECT metric_id, count(*) FROM new GROUP BY metric_id").fetchall()
        return sum(n for _, n in rows), dict(rows)


def _add_metric_rows(cur: psycopg.Cursor, per_metric: dict[int, int]) -> None:
    """Add (or, negative, subtract) row counts per metric; ids in order so collectors never deadlock."""
    ids = sorted(i for i, n in per_metric.items() if n)
    if ids:
        cur.execute("INSERT INTO metric_rows AS r (metric_id, rows) SELECT * FROM unnest(%s::int[], %s::bigint[]) "
                    "ON CONFLICT (metric_id) DO UPDATE SET rows = r.rows + EXCLUDED.rows",
                    (ids, [per_metric[i] for i in ids]))



def delete_gpu(conn: psycopg.Connection, uuid: str) -> int:
    """Remove a GPU and all its rows (canary clean-up); returns the number of telemetry rows removed."""
    with conn.transaction(), conn.cursor() as cur:
        gpu = cur.execute("SELECT id FROM gpus WHERE uuid = %s", (uuid,)).fetchone()
        if gpu is None:
            return 0
        gone = cur.execute("WITH gone AS (DELETE FROM telemetry WHERE gpu_id = %s RETURNING metric_id) "
                           "SELECT metric_id, count(*) FROM gone GROUP BY metric_id", (gpu[0],)).fetchall()
        _add_metric_rows(cur, {i: -n for i, n in gone})
        cur.execute("DELETE FROM gpus WHERE id = %s", (gpu[0],))
    return sum(n for _, n in gone)

"""The collector's write path: many batches of rows in one transaction, exactly once, and the canary's clean-up."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import psycopg

from telemetry_nb.store.events import labels_json, record_changes
from telemetry_nb.store.rows import EventRow, GpuRow, InventoryRow, RowBatch, WorkloadRow

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
        self._known_inventory: dict[int, InventoryRow] = {}
        self.fallbacks = 0
        self.events_added = 0

    def write(self, batches: Sequence[RowBatch]) -> WriteResult:
        """Write `batches` in one transaction; raises on failure with nothing committed."""
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
            if inventory:
                _update_inventory(cur, inventory)
            stored, per_metric = self._copy_rows(cur, batches, consumed)
            _add_metric_rows(cur, per_metric)
            added = record_changes(cur, events) if events else 0
        # remember only what is committed, so a rolled-back transaction is redone in full
        self._known_metrics.update(metrics)
        self._known_workloads.update(workloads)
        self._known_gpus.update(gpus)
        self._known_inventory.update(inventory)
        self.events_added += added
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
        "FROM unnest(%s::bigint[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::int[]) "
        "AS u(id, pci, drv, lab, par, prof, inst) JOIN gpus g0 ON g0.id = u.id ORDER BY g0.id) n "
        "WHERE g.id = n.id AND (g.pci_bus_id, g.driver_version, g.labels, g.parent_uuid, g.mig_profile, "
        "g.mig_instance) IS DISTINCT FROM (n.pci_bus_id, n.driver_version, n.labels, n.parent_uuid, n.mig_profile, "
        "n.mig_instance)",
        ([r.id for r in rows], [r.pci_bus_id for r in rows], [r.driver_version for r in rows],
         [labels_json(r.labels) for r in rows], [r.parent_uuid for r in rows], [r.mig_profile for r in rows],
         [r.mig_instance for r in rows]))


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
        cur.execute("DELETE FROM gpu_events WHERE gpu_id = %s", (gpu[0],))
        cur.execute("DELETE FROM gpus WHERE id = %s", (gpu[0],))
    return sum(n for _, n in gone)

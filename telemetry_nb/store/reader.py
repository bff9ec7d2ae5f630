"""The read queries behind the API and the checks."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

import psycopg
from psycopg.rows import dict_row


def _time_window(where: list[str], params: list, start: datetime | None, end: datetime | None) -> None:
    """Add start ≤ ts ≤ end (either bound optional) to a WHERE clause under construction."""
    if start is not None:
        where.append("t.ts >= %s")
        params.append(start)
    if end is not None:
        where.append("t.ts <= %s")
        params.append(end)


# -- reads --------------------------------------------------------------------------------------
GPU_COLUMNS = ("uuid, hostname, gpu_index, device, model_name, first_seen, last_seen, "
               "pci_bus_id, driver_version, labels, parent_uuid, mig_profile, mig_instance")


class Reader:
    """The read queries behind the API and the checks; every call uses a connection from `conn`.

    With `missing_schema_is_empty` (an autocommit connection), a database no collector has migrated yet
    reads as an empty store instead of raising `UndefinedTable`.
    """

    def __init__(self, conn: psycopg.Connection, *, missing_schema_is_empty: bool = False):
        self.conn = conn
        self.missing_schema_is_empty = missing_schema_is_empty

    def _all(self, sql: str, params: Sequence | dict = ()) -> list[dict]:
        with self.conn.cursor(row_factory=dict_row) as cur:
            try:
                cur.execute(sql, params)
            except psycopg.errors.UndefinedTable:
                if not self.missing_schema_is_empty:
                    raise
                return []
            return cur.fetchall()

    def schema_version(self) -> int | None:
        """The applied schema version; None when no collector has created the schema yet."""
        with self.conn.cursor() as cur:
            cur.execute("SELECT to_regclass('schema_version') IS NOT NULL")
            if not cur.fetchone()[0]:
                return None
            cur.execute("SELECT max(version) FROM schema_version")
            return cur.fetchone()[0]

    def list_gpus(self, *, hostname: str | None = None, model_name: str | None = None,
                  after: str | None = None, limit: int = 100, parent_uuid: str | None = None) -> list[dict]:
        """GPUs ordered by uuid, after the cursor `after`, at most `limit` + 1 (to tell if more follow)."""
        where, params = [], []
        if parent_uuid:
            where.append("parent_uuid = %s")
            params.append(parent_uuid)
        if hostname:
            where.append("hostname = %s")
            params.append(hostname)
        if model_name:
            where.append("model_name = %s")
            params.append(model_name)
        if after:
            where.append("uuid > %s")
            params.append(after)
        sql = f"SELECT {GPU_COLUMNS} FROM gpu_inventory"
        if where:
            sql += " WHERE " + " AND ".join(where)
        return self._all(sql + " ORDER BY uuid LIMIT %s", [*params, limit + 1])

    def get_gpu(self, uuid: str) -> dict | None:
        rows = self._all(f"SELECT id, {GPU_COLUMNS} FROM gpu_inventory WHERE uuid = %s", (uuid,))
        return rows[0] if rows else None

    def metric_ids(self, names: Sequence[str]) -> dict[str, int]:
        rows = self._all("SELECT id, name FROM metrics WHERE name = ANY(%s)", (list(names),))
        return {r["name"]: r["id"] for r in rows}

    def telemetry(self, gpu_id: int, *, start: datetime | None, end: datetime | None,
                  metric_ids: Sequence[int] | None, after: tuple[datetime, int] | None, limit: int) -> list[dict]:
        """Rows of one GPU with start ≤ ts ≤ end, ordered by (ts, metric), after the keyset cursor."""
        where = ["t.gpu_id = %s"]
        params: list = [gpu_id]
        _time_window(where, params, start, end)
        if metric_ids is not None:
            where.append("t.metric_id = ANY(%s)")
            params.append(list(metric_ids))
        if after is not None:
            where.append("(t.ts, t.metric_id) > (%s, %s)")
            params.extend(after)
        sql = ("SELECT t.ts AS timestamp, m.name AS metric, t.metric_id, t.value FROM telemetry t "
               "JOIN metrics m ON m.id = t.metric_id WHERE " + " AND ".join(where) +
               " ORDER BY t.ts, t.metric_id LIMIT %s")
        return self._all(sql, [*params, limit + 1])

    def aggregate(self, gpu_id: int, metric_ids: Sequence[int], bucket: timedelta, *,
                  start: datetime | None, end: datetime | None) -> list[dict]:
        """Per-bucket min/avg/max/count per metric, computed in PostgreSQL (date_bin, PG ≥ 14)."""
        where = ["t.gpu_id = %s", "t.metric_id = ANY(%s)"]
        params: list = [bucket, gpu_id, list(metric_ids)]
        _time_window(where, params, start, end)
        sql = ("SELECT date_bin(%s, t.ts, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS bucket, m.name AS metric, "
               "min(t.value) AS min, avg(t.value) AS avg, max(t.value) AS max, count(*) AS count "
               "FROM telemetry t JOIN metrics m ON m.id = t.metric_id WHERE " + " AND ".join(where) +
               " GROUP BY 1, 2 ORDER BY 1, 2")
        return self._all(sql, params)

    def events(self, *, uuid: str | None = None, kind: str | None = None, start: datetime | None = None,
               end: datetime | None = None, after: tuple[datetime, int, str] | None = None,
               limit: int = 100) -> list[dict]:
        """GPU events with start ≤ ts ≤ end, ordered by (ts, gpu, kind), after the keyset cursor; `limit` + 1."""
        where: list[str] = []
        params: list = []
        if uuid:
            where.append("g.uuid = %s")
            params.append(uuid)
        if kind:
            where.append("t.kind = %s")
            params.append(kind)
        _time_window(where, params, start, end)
        if after is not None:
            where.append("(t.ts, t.gpu_id, t.kind) > (%s, %s, %s)")
            params.extend(after)
        sql = ("SELECT t.ts, t.gpu_id, g.uuid, g.hostname, t.kind, t.code, t.message FROM gpu_events t "
               "JOIN gpus g ON g.id = t.gpu_id")
        if where:
            sql += " WHERE " + " AND ".join(where)
        return self._all(sql + " ORDER BY t.ts, t.gpu_id, t.kind LIMIT %s", [*params, limit + 1])

    def metric_names(self) -> list[str]:
        return [r["name"] for r in self._all("SELECT name FROM metrics ORDER BY name")]

    def metric_counts(self) -> list[dict]:
        """Metric names with their row counts (kept by the collectors, not counted here)."""
        return self._all("SELECT m.name, coalesce(r.rows, 0) AS rows FROM metrics m "
                         "LEFT JOIN metric_rows r ON r.metric_id = m.id ORDER BY m.name")

    def summary(self) -> dict:
        """Schema version, row and GPU counts, newest sample time: what a deployment check looks at."""
        rows = self._all("SELECT (SELECT max(version) FROM schema_version) AS schema_version, "
                         "(SELECT coalesce(sum(rows), 0)::bigint FROM metric_rows) AS rows, "
                         "(SELECT count(*) FROM gpus) AS gpus, "
                         "(SELECT max(last_seen) FROM gpu_inventory) AS newest")
        return rows[0]


"""PostgreSQL: schema and migrations, the idempotent bulk write, and the queries the API needs.

Rows are narrow (`gpu_id int, metric_id smallint, ts, value, workload_id`) with primary key
(gpu_id, ts, metric_id): it makes a replayed row a no-op (`ON CONFLICT DO NOTHING`) and it is the
index behind the API's per-GPU, time-ordered, cursor-paginated reads.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import psycopg
from psycopg.rows import dict_row

from telemetry_nb.codec import Batch

log = logging.getLogger(__name__)

MIGRATIONS: list[tuple[int, str]] = [
    (1, """
    CREATE TABLE IF NOT EXISTS gpus (
        id bigint PRIMARY KEY,
        uuid text NOT NULL UNIQUE,
        hostname text NOT NULL DEFAULT '',
        gpu_index int,
        device text NOT NULL DEFAULT '',
        model_name text NOT NULL DEFAULT ''
    );
    CREATE INDEX IF NOT EXISTS gpus_hostname ON gpus (hostname);
    CREATE TABLE IF NOT EXISTS metrics (
        id int PRIMARY KEY,
        name text NOT NULL UNIQUE
    );
    CREATE TABLE IF NOT EXISTS workloads (
        id bigint PRIMARY KEY,
        namespace text NOT NULL DEFAULT '',
        pod text NOT NULL DEFAULT '',
        container text NOT NULL DEFAULT '',
        UNIQUE (namespace, pod, container)
    );
    CREATE TABLE IF NOT EXISTS telemetry (
        gpu_id bigint NOT NULL,
        ts timestamptz NOT NULL,
        metric_id int NOT NULL,
        value double precision NOT NULL,
        workload_id bigint,
        PRIMARY KEY (gpu_id, ts, metric_id)
    );
    -- first/last seen come from the primary key (two index probes per GPU), not from a column that
    -- every batch would have to update
    CREATE OR REPLACE VIEW gpu_inventory AS
    SELECT g.id, g.uuid, g.hostname, g.gpu_index, g.device, g.model_name,
           (SELECT t.ts FROM telemetry t WHERE t.gpu_id = g.id ORDER BY t.ts LIMIT 1) AS first_seen,
           (SELECT t.ts FROM telemetry t WHERE t.gpu_id = g.id ORDER BY t.ts DESC LIMIT 1) AS last_seen
    FROM gpus g;
    """),
    (2, """
    -- row counts per metric, kept by the collectors, so GET /api/v1/metrics need not count the table
    CREATE TABLE IF NOT EXISTS metric_rows (
        metric_id int PRIMARY KEY,
        rows bigint NOT NULL
    );
    INSERT INTO metric_rows (metric_id, rows)
    SELECT metric_id, count(*) FROM telemetry GROUP BY metric_id
    ON CONFLICT (metric_id) DO UPDATE SET rows = EXCLUDED.rows;
    """),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]
_MIGRATION_LOCK = 0x7E1E_4E7B  # advisory lock id: collectors starting together migrate one at a time

STAGING = """
CREATE TEMP TABLE IF NOT EXISTS staging (
    gpu_id bigint, ts timestamptz, metric_id int, value double precision, workload_id bigint
) ON COMMIT DELETE ROWS
"""

RETRYABLE = (psycopg.OperationalError, psycopg.errors.DeadlockDetected,
             psycopg.errors.SerializationFailure, psycopg.InterfaceError)


class SchemaTooNew(RuntimeError):
    """The database was migrated by a newer telemetry-nb; this one must not write to it."""


class IdCollision(psycopg.DataError):
    """Two names hashed to the same id: the batch is refused rather than mislabelled."""


def connect(url: str, **kwargs) -> psycopg.Connection:
    """A connection with a short connect timeout, so outages surface as retryable errors."""
    kwargs.setdefault("connect_timeout", 10)
    return psycopg.connect(url, **kwargs)


def migrate(conn: psycopg.Connection) -> int:
    """Apply pending migrations once, under an advisory lock; returns the schema version."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version int PRIMARY KEY, "
                     "applied_at timestamptz NOT NULL DEFAULT now())")
        current = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0]
        if current > SCHEMA_VERSION:
            raise SchemaTooNew(f"database schema version {current} is newer than this telemetry-nb knows "
                               f"({SCHEMA_VERSION}); upgrade telemetry-nb before running it against this database")
        for version, sql in MIGRATIONS:
            if version > current:
                log.info("Applying schema migration %d", version)
                conn.execute(sql)
                conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))
                current = version
    return current


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
        self._known_workloads: dict[int, tuple] = {}
        self._known_gpus: dict[int, tuple] = {}
        self.fallbacks = 0

    def write(self, batches: Sequence[Batch]) -> WriteResult:
        """Write `batches` in one transaction; raises on failure with nothing committed."""
        gpus: dict[int, tuple] = {}
        metrics: dict[int, str] = {}
        workloads: dict[int, tuple] = {}
        consumed = 0
        for b in batches:
            consumed += b.n
            for m in b.metrics:
                if self._known_metrics.get(m[0]) != m[1]:
                    metrics[m[0]] = m[1]
            for w in b.workloads:
                if w[0] not in self._known_workloads:
                    workloads[w[0]] = tuple(w)
            for g in b.gpus:
                meta = tuple(g[:6])
                if self._known_gpus.get(g[0]) != meta:
                    gpus[g[0]] = meta
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

    def _copy_rows(self, cur: psycopg.Cursor, batches: Sequence[Batch], consumed: int) -> tuple[int, dict[int, int]]:
        """COPY the rows; returns how many were new, and how many of those per metric id."""
        try:
            with self.conn.transaction(), cur.copy("COPY telemetry FROM STDIN") as copy:
                for b in batches:
                    copy.write(b.rows)
            per_metric: dict[int, int] = {}
            for b in batches:
                for m in b.metrics:
                    per_metric[m[0]] = per_metric.get(m[0], 0) + (m[2] if len(m) > 2 else 0)
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


def _time_window(where: list[str], params: list, start: datetime | None, end: datetime | None) -> None:
    """Add start ≤ ts ≤ end (either bound optional) to a WHERE clause under construction."""
    if start is not None:
        where.append("t.ts >= %s")
        params.append(start)
    if end is not None:
        where.append("t.ts <= %s")
        params.append(end)


# -- reads --------------------------------------------------------------------------------------
GPU_COLUMNS = "uuid, hostname, gpu_index, device, model_name, first_seen, last_seen"


class Reader:
    """The read queries behind the API and the checks; every call uses a connection from `conn`."""

    def __init__(self, conn: psycopg.Connection):
        self.conn = conn

    def _all(self, sql: str, params: Sequence | dict = ()) -> list[dict]:
        with self.conn.cursor(row_factory=dict_row) as cur:
            cur.execute(sql, params)
            return cur.fetchall()

    def list_gpus(self, *, hostname: str | None = None, model_name: str | None = None,
                  after: str | None = None, limit: int = 100) -> list[dict]:
        """GPUs ordered by uuid, after the cursor `after`, at most `limit` + 1 (to tell if more follow)."""
        where, params = [], []
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

    def delete_gpu(self, uuid: str) -> int:
        """Remove a GPU and all its rows (canary clean-up); returns the number of telemetry rows removed."""
        with self.conn.transaction():
            gpu = self.get_gpu(uuid)
            if gpu is None:
                return 0
            with self.conn.cursor() as cur:
                gone = cur.execute("WITH gone AS (DELETE FROM telemetry WHERE gpu_id = %s RETURNING metric_id) "
                                   "SELECT metric_id, count(*) FROM gone GROUP BY metric_id", (gpu["id"],)).fetchall()
                _add_metric_rows(cur, {i: -n for i, n in gone})
                cur.execute("DELETE FROM gpus WHERE id = %s", (gpu["id"],))
        return sum(n for _, n in gone)

"""PostgreSQL schema: the migrations, applied once under an advisory lock, and the connection helper.

Rows are narrow (`gpu_id bigint, ts, metric_id int, value, workload_id bigint`) with primary key
(gpu_id, ts, metric_id): it makes a replayed row a no-op (`ON CONFLICT DO NOTHING`) and it is the
index behind the API's per-GPU, time-ordered, cursor-paginated reads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta

import psycopg

from telemetry_nb.store import lifecycle

log = logging.getLogger(__name__)

MIGRATIONS: list[tuple[int, str | Callable[[psycopg.Connection, timedelta], None]]] = [
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
    (3, lambda conn, partition: _partitioned(conn, partition)),
    (4, """
    -- every label kept, and MIG instances as their own inventory rows keyed by (parent uuid, instance)
    ALTER TABLE gpus ADD COLUMN IF NOT EXISTS pci_bus_id text NOT NULL DEFAULT '',
                     ADD COLUMN IF NOT EXISTS driver_version text NOT NULL DEFAULT '',
                     ADD COLUMN IF NOT EXISTS labels jsonb NOT NULL DEFAULT '{}',
                     ADD COLUMN IF NOT EXISTS parent_uuid text NOT NULL DEFAULT '',
                     ADD COLUMN IF NOT EXISTS mig_profile text NOT NULL DEFAULT '',
                     ADD COLUMN IF NOT EXISTS mig_instance int;
    CREATE INDEX IF NOT EXISTS gpus_parent ON gpus (parent_uuid) WHERE parent_uuid <> '';
    CREATE UNIQUE INDEX IF NOT EXISTS gpus_mig_instance ON gpus (parent_uuid, mig_instance)
        WHERE mig_instance IS NOT NULL;
    -- changes of the last XID code (and other event kinds) per GPU
    CREATE TABLE IF NOT EXISTS gpu_events (
        gpu_id bigint NOT NULL,
        ts timestamptz NOT NULL,
        kind text NOT NULL,
        code int NOT NULL,
        message text NOT NULL DEFAULT '',
        PRIMARY KEY (gpu_id, kind, ts)
    );
    CREATE UNIQUE INDEX IF NOT EXISTS gpu_events_ts ON gpu_events (ts, gpu_id, kind);
    -- same columns as before, the new ones appended (CREATE OR REPLACE VIEW may only add at the end)
    CREATE OR REPLACE VIEW gpu_inventory AS
    SELECT g.id, g.uuid, g.hostname, g.gpu_index, g.device, g.model_name,
           least((SELECT t.ts FROM telemetry_raw t WHERE t.gpu_id = g.id ORDER BY t.ts LIMIT 1),
                 (SELECT min(p.ts[1]) FROM telemetry_packed p WHERE p.gpu_id = g.id
                  AND p.hour = (SELECT min(q.hour) FROM telemetry_packed q WHERE q.gpu_id = g.id))) AS first_seen,
           greatest((SELECT t.ts FROM telemetry_raw t WHERE t.gpu_id = g.id ORDER BY t.ts DESC LIMIT 1),
                    (SELECT max(p.ts[p.n]) FROM telemetry_packed p WHERE p.gpu_id = g.id
                     AND p.hour = (SELECT max(q.hour) FROM telemetry_packed q WHERE q.gpu_id = g.id))) AS last_seen,
           g.pci_bus_id, g.driver_version, g.labels, g.parent_uuid, g.mig_profile, g.mig_instance
    FROM gpus g;
    """),
    (5, """
    -- samples under the default idle threshold per rollup bucket: GPU accounting reads idle time from the
    -- rollups instead of their samples (NULL: rolled before this column, the samples are read instead)
    ALTER TABLE telemetry_1m ADD COLUMN IF NOT EXISTS idle bigint;
    ALTER TABLE telemetry_1h ADD COLUMN IF NOT EXISTS idle bigint;
    """),
    (6, """
    -- row counts per metric without a hot row: every writing transaction adds to a slot no other running
    -- transaction holds (store/counts.py); totals are summed on read. The counts move here in one go;
    -- collectors of schema <= 5 still running during an upgrade keep adding to metric_rows, also summed.
    CREATE TABLE IF NOT EXISTS metric_row_counts (
        slot int NOT NULL,
        metric_id int NOT NULL,
        rows bigint NOT NULL,
        PRIMARY KEY (slot, metric_id)
    );
    WITH moved AS (DELETE FROM metric_rows RETURNING metric_id, rows)
    INSERT INTO metric_row_counts (slot, metric_id, rows) SELECT 0, metric_id, sum(rows) FROM moved
    GROUP BY metric_id ON CONFLICT (slot, metric_id) DO UPDATE SET rows = metric_row_counts.rows + EXCLUDED.rows;
    """),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]
_MIGRATION_LOCK = 0x7E1E_4E7B  # advisory lock id: collectors starting together migrate one at a time


class SchemaTooNew(RuntimeError):
    """The database was migrated by a newer telemetry-nb; this one must not write to it."""


V3_TABLES = """
CREATE TABLE telemetry_raw (
    gpu_id bigint NOT NULL,
    ts timestamptz NOT NULL,
    metric_id int NOT NULL,
    value double precision NOT NULL,
    workload_id bigint,
    PRIMARY KEY (gpu_id, ts, metric_id)
) PARTITION BY RANGE (ts);
-- fleet-wide time-range scans (rollup refresh of the newest minutes) without reading a whole day
CREATE INDEX telemetry_raw_ts ON telemetry_raw USING brin (ts) WITH (pages_per_range = 32);
-- closed ranges: one row per (gpu, metric, hour, workload), samples in ts order
CREATE TABLE telemetry_packed (
    gpu_id bigint NOT NULL,
    metric_id int NOT NULL,
    hour timestamptz NOT NULL,
    workload_id bigint,
    n int NOT NULL,
    ts timestamptz[] NOT NULL,
    value double precision[] NOT NULL
) PARTITION BY RANGE (hour);
CREATE INDEX telemetry_packed_gpu ON telemetry_packed (gpu_id, hour, metric_id);
""" + "".join(f"""
CREATE TABLE telemetry_{res} (
    gpu_id bigint NOT NULL,
    metric_id int NOT NULL,
    bucket timestamptz NOT NULL,
    workload_id bigint NOT NULL,  -- 0: no workload
    min double precision NOT NULL,
    max double precision NOT NULL,
    sum double precision NOT NULL,
    count bigint NOT NULL,
    PRIMARY KEY (gpu_id, metric_id, bucket, workload_id)
) PARTITION BY RANGE (bucket);
CREATE INDEX telemetry_{res}_fleet ON telemetry_{res} (metric_id, bucket);""" for res in ("1m", "1h")) + """
CREATE TABLE telemetry_changes (
    id bigserial PRIMARY KEY,
    lo timestamptz NOT NULL,
    hi timestamptz NOT NULL
);
CREATE TABLE telemetry_lifecycle (
    name text PRIMARY KEY,
    ts timestamptz NOT NULL
);
CREATE VIEW telemetry AS
SELECT gpu_id, ts, metric_id, value, workload_id FROM telemetry_raw
UNION ALL
SELECT p.gpu_id, u.ts, p.metric_id, u.value, p.workload_id
FROM telemetry_packed p CROSS JOIN LATERAL unnest(p.ts, p.value) AS u(ts, value);
-- first/last seen: index probes into the raw partitions, plus the first/last packed hour
CREATE VIEW gpu_inventory AS
SELECT g.id, g.uuid, g.hostname, g.gpu_index, g.device, g.model_name,
       least((SELECT t.ts FROM telemetry_raw t WHERE t.gpu_id = g.id ORDER BY t.ts LIMIT 1),
             (SELECT min(p.ts[1]) FROM telemetry_packed p WHERE p.gpu_id = g.id
              AND p.hour = (SELECT min(q.hour) FROM telemetry_packed q WHERE q.gpu_id = g.id))) AS first_seen,
       greatest((SELECT t.ts FROM telemetry_raw t WHERE t.gpu_id = g.id ORDER BY t.ts DESC LIMIT 1),
                (SELECT max(p.ts[p.n]) FROM telemetry_packed p WHERE p.gpu_id = g.id
                 AND p.hour = (SELECT max(q.hour) FROM telemetry_packed q WHERE q.gpu_id = g.id))) AS last_seen
FROM gpus g;
"""


def _partitioned(conn: psycopg.Connection, partition: timedelta) -> None:
    """Schema 3: `telemetry` becomes partitioned raw rows + packed closed ranges + rollups; rows move over."""
    conn.execute("DROP VIEW gpu_inventory")
    conn.execute("ALTER TABLE telemetry RENAME TO telemetry_v2")
    conn.execute(V3_TABLES)
    lo, hi, n = conn.execute("SELECT min(ts), max(ts), count(*) FROM telemetry_v2").fetchone()
    if n:
        log.info("Moving %d rows (%s to %s) into partitions of %s", n, lo, hi, partition)
        lifecycle.ensure_partitions(conn, "telemetry_raw", lo, hi, partition)
        conn.execute("INSERT INTO telemetry_raw SELECT * FROM telemetry_v2")
        conn.execute("INSERT INTO telemetry_changes (lo, hi) VALUES (%s, %s)", (lo, hi))  # rolled up next
    conn.execute("DROP TABLE telemetry_v2")


def connect(url: str, **kwargs) -> psycopg.Connection:
    """A connection with a short connect timeout, so outages surface as retryable errors."""
    kwargs.setdefault("connect_timeout", 10)
    return psycopg.connect(url, **kwargs)


def postgres_probe(url: str, timeout_s: int = 2) -> Callable[[], object]:
    """A cheap readiness probe: `SELECT 1` on a connection of its own, reopened after a failure; raises when down."""
    state: dict[str, psycopg.Connection | None] = {"conn": None}

    def probe() -> object:
        conn = state["conn"]
        try:
            if conn is None or conn.closed:
                conn = state["conn"] = connect(url, autocommit=True, connect_timeout=timeout_s,
                                               options=f"-c statement_timeout={timeout_s * 1000}")
            return conn.execute("SELECT 1").fetchone()
        except Exception:
            if conn is not None:
                conn.close()
            state["conn"] = None
            raise

    return probe


def migrate(conn: psycopg.Connection, *, partition: timedelta = lifecycle.DAY) -> int:
    """Apply pending migrations once, under an advisory lock; returns the schema version.

    `partition` is the raw partition width used when rows of an older schema move into partitions.
    """
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
                if callable(sql):
                    sql(conn, partition)
                else:
                    conn.execute(sql)
                conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))
                current = version
    return current



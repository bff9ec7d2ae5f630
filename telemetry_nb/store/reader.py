"""The read queries behind the API and the checks."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg.rows import dict_row, tuple_row

from telemetry_nb.store import counts, lifecycle
from telemetry_nb.store.lifecycle import HOUR, MINUTE, NEG_INF, POS_INF, ceil_to, floor_to, merge_ranges

ONE_US = timedelta(microseconds=1)
_ORIGIN = "TIMESTAMPTZ '2000-01-01 00:00:00+00'"


def _subtract(span: tuple[datetime, datetime], holes: Sequence[tuple[datetime, datetime]]
              ) -> list[tuple[datetime, datetime]]:
    """[a, b) minus sorted, disjoint `holes`."""
    out, a = [], span[0]
    for lo, hi in holes:
        if lo > a:
            out.append((a, min(lo, span[1])))
        a = max(a, hi)
    if a < span[1]:
        out.append((a, span[1]))
    return [(x, y) for x, y in out if x < y]


def resolution(bucket: timedelta) -> str:
    """The coarsest stored resolution whose buckets tile `bucket`: `1h`, `1m` or `raw`."""
    if bucket % HOUR == timedelta(0):
        return "1h"
    if bucket % MINUTE == timedelta(0):
        return "1m"
    return "raw"


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

    @contextmanager
    def _snapshot(self) -> Iterator[None]:
        """One snapshot for several statements: a REPEATABLE READ transaction (or the caller's own)."""
        if self.conn.autocommit:
            with self.conn.transaction():
                self.conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                yield
        else:
            yield

    def _all(self, sql: str, params: Sequence | dict = (), *, row_factory: Any = dict_row,
             binary: bool | None = None) -> list:
        with self.conn.cursor(row_factory=row_factory) as cur:
            try:
                cur.execute(sql, params, binary=binary)
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

    def telemetry_tuples(self, gpu_id: int, *, start: datetime | None, end: datetime | None,
                         metric_ids: Sequence[int] | None, after: tuple[datetime, int] | None,
                         limit: int) -> list[tuple[datetime, str, int, float]]:
        """(timestamp, metric, metric_id, value) of one GPU with start ≤ ts ≤ end, ordered by (ts, metric),
        after the keyset cursor, at most `limit` + 1 (tuples in binary: the API's hot route decodes no more).

        Raw partitions are read through the primary key; packed hours only as far as the first `limit` + 1
        samples can reach (a running count of samples per hour tells where to stop).
        """
        low = start
        if after is not None and (low is None or after[0] > low):
            low = after[0]
        lo_b, hi_b = low or NEG_INF, (end + ONE_US) if end else POS_INF
        hour_lo = lo_b - HOUR if lo_b > NEG_INF + HOUR else lo_b

        def where(gpu: str, ts: str, metric: str, params: list) -> str:
            w = [f"{gpu} = %s"]
            params.append(gpu_id)
            if metric_ids is not None:
                w.append(f"{metric} = ANY(%s)")
                params.append(list(metric_ids))
            if start is not None:
                w.append(f"{ts} >= %s")
                params.append(start)
            if end is not None:
                w.append(f"{ts} <= %s")
                params.append(end)
            if after is not None:
                w.append(f"({ts}, {metric}) > (%s, %s)")
                params.extend(after)
            return " AND ".join(w)

        params: list = []
        raw = f"SELECT ts, metric_id, value FROM telemetry_raw WHERE {where('gpu_id', 'ts', 'metric_id', params)}"
        # the packed hour by which limit + 1 samples wholly inside the bounds have been seen
        params += [hour_lo, hi_b, lo_b, gpu_id]
        metric_cut = ""
        if metric_ids is not None:
            metric_cut = " AND metric_id = ANY(%s)"
            params.append(list(metric_ids))
        params += [hour_lo, hi_b, limit + 1]
        cut = ("(SELECT coalesce(min(hour), 'infinity') FROM (SELECT hour, sum(sum(n) FILTER (WHERE hour > %s)) "
               f"OVER (ORDER BY hour) AS cum FROM telemetry_packed WHERE gpu_id = %s{metric_cut} AND hour > %s "
               "AND hour < %s GROUP BY hour) h WHERE cum >= %s)")
        packed = ("SELECT u.ts, p.metric_id, u.value FROM telemetry_packed p CROSS JOIN LATERAL "
                  f"unnest(p.ts, p.value) AS u(ts, value) WHERE p.hour > %s AND p.hour < %s AND p.hour <= {cut} "
                  f"AND {where('p.gpu_id', 'u.ts', 'p.metric_id', params)}")
        sql = (f"SELECT x.ts AS timestamp, m.name AS metric, x.metric_id, x.value FROM ({raw} UNION ALL {packed}) x "
               "JOIN metrics m ON m.id = x.metric_id ORDER BY x.ts, x.metric_id LIMIT %s")
        return self._all(sql, [*params, limit + 1], row_factory=tuple_row, binary=True)

    def aggregate(self, gpu_id: int, metric_ids: Sequence[int], bucket: timedelta, *,
                  start: datetime | None, end: datetime | None) -> list[dict]:
        """Per-bucket min/avg/max/count per metric of one GPU: rollups where complete, raw rows elsewhere."""
        _, rows = self.buckets(metric_ids, bucket, start=start, end=end, gpu_ids=[gpu_id])
        return [{"bucket": r["bucket"], "metric": r["metric"], "min": r["min"], "avg": r["sum"] / r["count"],
                 "max": r["max"], "count": r["count"]} for r in sorted(rows, key=lambda r: (r["bucket"], r["metric"]))]

    def gpu_ids(self, *, hostnames: Sequence[str] | None = None, model_names: Sequence[str] | None = None
                ) -> list[int]:
        """Ids of the GPUs on any of `hostnames` and of any of `model_names` (None: no filter)."""
        where, params = [], []
        if hostnames:
            where.append("hostname = ANY(%s)")
            params.append(list(hostnames))
        if model_names:
            where.append("model_name = ANY(%s)")
            params.append(list(model_names))
        sql = "SELECT id FROM gpus" + (" WHERE " + " AND ".join(where) if where else "")
        return [r["id"] for r in self._all(sql, params)]

    def newest(self) -> datetime | None:
        """The newest stored sample time as the lifecycle tables know it (no scan)."""
        return lifecycle.reference_time(self.conn, POS_INF)

    def buckets(self, metric_ids: Sequence[int], bucket: timedelta, *, start: datetime | None,
                end: datetime | None, gpu_ids: Sequence[int] | None = None) -> tuple[str, list[dict]]:
        """(resolution, rows of uuid, metric, bucket, min, max, sum, count) for start ≤ ts ≤ end.

        Whole rollup buckets inside the window that no unrefreshed write touched come from the coarsest
        rollup that tiles `bucket`; the window's ragged edges and the touched buckets come from the
        samples. Every sample is counted once, so the result equals an aggregate over raw rows.
        One REPEATABLE READ snapshot covers the change log and both sources.
        """
        res = resolution(bucket)
        lo = start or NEG_INF
        hi = (end + ONE_US) if end else POS_INF
        filters, fparams = "metric_id = ANY(%s)", [list(metric_ids)]
        if gpu_ids is not None:
            filters += " AND gpu_id = ANY(%s)"
            fparams.append(list(gpu_ids))
        with self._snapshot():
            parts: list[str] = []
            params: list = []
            raw_ranges = [(lo, hi)]
            tiers = {"1h": [("telemetry_1h", HOUR), ("telemetry_1m", MINUTE)], "1m": [("telemetry_1m", MINUTE)],
                     "raw": []}[res]
            state = lifecycle.read_state(self.conn) if tiers else None
            changed = lifecycle.dirty_ranges(self.conn) if tiers else []
            if tiers:
                hi = lifecycle.past_newest(self.conn, hi, tiers[0][1])
            for table, width in tiers:  # whole hours from 1h, the ragged rest in whole minutes from 1m
                rest: list[tuple[datetime, datetime]] = []
                clean: list[tuple[datetime, datetime]] = []
                horizon = state.expired(table)
                dirty = merge_ranges((floor_to(a, width), ceil_to(b, width)) for a, b in changed)
                for a, b in raw_ranges:
                    rs, re_ = ceil_to(max(a, horizon), width), floor_to(b, width)
                    if rs >= re_:
                        rest.append((a, b))
                        continue
                    inner = [(max(x, rs), min(y, re_)) for x, y in dirty if x < re_ and y > rs]
                    rest += [(a, rs), (re_, b), *inner]
                    clean += _subtract((rs, re_), inner)
                raw_ranges = [(x, y) for x, y in merge_ranges(rest) if x < y]
                if clean:
                    params += [bucket, *fparams]
                    pred = lifecycle.ranges_predicate("bucket", clean, params)
                    parts.append(f"SELECT gpu_id, metric_id, date_bin(%s, bucket, {_ORIGIN}) AS b, "
                                 f"min(min) AS mn, max(max) AS mx, sum(sum) AS s, sum(count)::bigint AS c "
                                 f"FROM {table} WHERE {filters} AND {pred} GROUP BY 1, 2, 3")
            raw_ranges = merge_ranges(raw_ranges)
            if raw_ranges:
                params.append(bucket)
                src = lifecycle.samples_sql(raw_ranges, filters, fparams, params)
                parts.append(f"SELECT gpu_id, metric_id, date_bin(%s, ts, {_ORIGIN}) AS b, min(value) AS mn, "
                             f"max(value) AS mx, sum(value) AS s, count(*) AS c FROM ({src}) r GROUP BY 1, 2, 3")
            if not parts:
                return res, []
            # the planner guesses ~100× too few groups for date_bin keys and would then join the inventory in a
            # nested loop over every aggregated row (32 M comparisons for 1,024 GPUs × 15 min): hash joins only
            prev = self.conn.execute("SELECT current_setting('enable_nestloop'), "
                                     "set_config('enable_nestloop', 'off', true)").fetchone()[0]
            sql = (f"SELECT g.uuid, m.name AS metric, z.b AS bucket, min(z.mn) AS min, max(z.mx) AS max, "
                   f"sum(z.s) AS sum, sum(z.c)::bigint AS count FROM ({' UNION ALL '.join(parts)}) z "
                   "JOIN gpus g ON g.id = z.gpu_id JOIN metrics m ON m.id = z.metric_id "
                   "GROUP BY 1, 2, 3 ORDER BY 1, 3, 2")
            rows = self._all(sql, params)
            if not self.conn.autocommit:  # the caller's transaction goes on: give it its planner back
                self.conn.execute("SELECT set_config('enable_nestloop', %s, true)", (prev,))
            return res, rows

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
                         f"LEFT JOIN ({counts.TOTALS}) r ON r.metric_id = m.id ORDER BY m.name")

    def summary(self) -> dict:
        """Schema version, row and GPU counts, newest sample time: what a deployment check looks at."""
        rows = self._all("SELECT (SELECT max(version) FROM schema_version) AS schema_version, "
                         f"(SELECT coalesce(sum(rows), 0)::bigint FROM ({counts.TOTALS}) c) AS rows, "
                         "(SELECT count(*) FROM gpus) AS gpus, "
                         "(SELECT max(last_seen) FROM gpu_inventory) AS newest")
        return rows[0]


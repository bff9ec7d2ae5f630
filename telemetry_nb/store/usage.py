"""GPU accounting queries: who held which GPU, for how long, and how busy it was (issue 13).

A GPU's owner at a sample is the workload on its utilization row (`DCGM_FI_DEV_GPU_UTIL`, or
`DCGM_FI_PROF_GR_ENGINE_ACTIVE` × 100 on GPUs that report only that, e.g. MIG instances). Each such sample
stands for one sampling interval of its GPU (the median spacing of its samples), so a GPU that stops
reporting stops accruing: a gap is never usage. Per (GPU, workload) the store answers sample count, Σ util
and the count of samples under the idle threshold, reading

- the 1h rollup for whole clean hours (at the default threshold its own idle count answers; at another,
  an hour whose min/max leave the idle count open descends to its 1m rows, a minute of more than two
  samples that is still open descends to its samples),
- the 1m rollup for whole clean minutes at the window's edges,
- raw ∪ packed samples for the ragged edges and for ranges written since the last rollup refresh,

so long windows read ~one row per GPU-hour, and every sample is counted exactly once.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta

import psycopg

from telemetry_nb.store import lifecycle
from telemetry_nb.store.lifecycle import HOUR, MINUTE, NEG_INF, POS_INF, ceil_to, floor_to, merge_ranges
from telemetry_nb.store.reader import ONE_US, _subtract

UTIL = "DCGM_FI_DEV_GPU_UTIL"
ENGINE_ACTIVE = lifecycle.ENGINE_ACTIVE  # a 0–1 ratio: × 100 to compare with GPU_UTIL
DEFAULT_INTERVAL_S = 30.0  # dcgm-exporter's default collection interval, for GPUs with a single sample
INTERVAL_SAMPLES = 33  # newest timestamps per GPU the interval is inferred from (slow path)
RECENT = timedelta(minutes=16)  # fast path: every GPU's samples in the window's last minutes
_ORIGIN = "TIMESTAMPTZ '2000-01-01 00:00:00+00'"


@dataclass(frozen=True)
class Plan:
    """Which source covers which part of [lo, hi): whole clean hours, whole clean minutes, samples."""

    hours: list[tuple[datetime, datetime]]
    minutes: list[tuple[datetime, datetime]]
    samples: list[tuple[datetime, datetime]]


def plan(lo: datetime, hi: datetime, state: lifecycle.State, dirty: Sequence[tuple[datetime, datetime]]) -> Plan:
    """Split [lo, hi) into rollup hours, rollup minutes and sample ranges (disjoint, covering it)."""
    base = max(lo, state.expired("telemetry_1h"), state.expired("telemetry_1m"))
    dirty_h = merge_ranges((floor_to(a, HOUR), ceil_to(b, HOUR)) for a, b in dirty)
    dirty_m = merge_ranges((floor_to(a, MINUTE), ceil_to(b, MINUTE)) for a, b in dirty)
    hs, he = ceil_to(base, HOUR), floor_to(hi, HOUR)
    hours = _subtract((hs, he), dirty_h) if hs < he else []
    ms, me = ceil_to(base, MINUTE), floor_to(hi, MINUTE)
    minutes = _subtract((ms, me), merge_ranges([*hours, *dirty_m])) if ms < me else []
    samples = _subtract((lo, hi), merge_ranges([*hours, *minutes]))
    return Plan(hours, minutes, samples)


class UsageStore:
    """The accounting reads over one connection (autocommit or the caller's transaction)."""

    def __init__(self, conn: psycopg.Connection):
        self.conn = conn

    def util_metrics(self) -> dict[str, int]:
        """{name: id} of the utilization metrics present (GPU_UTIL and/or GR_ENGINE_ACTIVE)."""
        rows = self.conn.execute("SELECT name, id FROM metrics WHERE name = ANY(%s)", ([UTIL, ENGINE_ACTIVE],))
        return dict(rows.fetchall())

    def totals(self, lo: datetime, hi: datetime, threshold: float, metrics: dict[str, int]) -> list[tuple]:
        """(gpu_id, metric_id, workload_id, samples, Σ util, samples under `threshold`) over [lo, hi).

        `workload_id` 0 is no workload; GR_ENGINE_ACTIVE is scaled × 100 before it is compared.
        """
        ids = list(metrics.values())
        if not ids:
            return []
        if not math.isfinite(threshold):
            raise ValueError("threshold must be finite")
        p = plan(lo, lifecycle.past_newest(self.conn, hi, HOUR), lifecycle.read_state(self.conn),
                 lifecycle.dirty_ranges(self.conn))
        engine = metrics.get(ENGINE_ACTIVE)
        t = repr(float(threshold))  # a finite float's repr is a valid SQL numeric literal

        def scaled(expr: str, metric: str) -> str:
            return expr if engine is None else f"({expr} * CASE WHEN {metric} = {int(engine)} THEN 100.0 ELSE 1.0 END)"

        stored = float(threshold) == lifecycle.IDLE_THRESHOLD  # the rollups count these idle samples themselves

        def idle(a: str) -> str:  # NULL where min/max (and the stored count) leave the count open
            return (f"CASE WHEN {scaled(a + '.max', a + '.metric_id')} < {t} THEN {a}.count "
                    f"WHEN {scaled(a + '.min', a + '.metric_id')} >= {t} THEN 0 WHEN {a}.count = 2 THEN 1 "
                    + (f"ELSE {a}.idle " if stored else "") + "END")

        params: list = []

        def where(ranges: list[tuple[datetime, datetime]]) -> str:
            params.append(ids)
            return f"metric_id = ANY(%s) AND {lifecycle.ranges_predicate('bucket', ranges, params)}"

        # h: the clean hours whose idle count min/max leave open (usually few); m: their 1m rows and the
        # open edge minutes; s0: the samples of the minutes still open. Whole-table sums are taken directly.
        h = f"SELECT gpu_id, metric_id, bucket, workload_id FROM telemetry_1h h WHERE {where(p.hours)} " \
            f"AND ({idle('h')}) IS NULL"
        m = (f"SELECT x.gpu_id, x.metric_id, x.bucket, x.workload_id, ({idle('x')}) AS idle FROM h JOIN telemetry_1m x "
             "ON x.gpu_id = h.gpu_id AND x.metric_id = h.metric_id AND x.bucket >= h.bucket "
             "AND x.bucket < h.bucket + interval '1 hour' AND x.workload_id = h.workload_id "
             "UNION ALL SELECT gpu_id, metric_id, bucket, workload_id, NULL FROM telemetry_1m e "
             f"WHERE {where(p.minutes)} AND ({idle('e')}) IS NULL")
        s0 = ("SELECT r.gpu_id, r.metric_id, r.value AS v, coalesce(r.workload_id, 0) AS workload_id "
              "FROM m JOIN telemetry_raw r ON m.idle IS NULL AND r.gpu_id = m.gpu_id AND r.metric_id = m.metric_id "
              "AND r.ts >= m.bucket AND r.ts < m.bucket + interval '1 minute' "
              "AND coalesce(r.workload_id, 0) = m.workload_id "
              "UNION ALL SELECT k.gpu_id, k.metric_id, u.value, coalesce(k.workload_id, 0) "
              "FROM m JOIN telemetry_packed k ON m.idle IS NULL AND k.gpu_id = m.gpu_id AND k.metric_id = m.metric_id "
              f"AND k.hour = date_bin('1 hour', m.bucket, {_ORIGIN}) AND coalesce(k.workload_id, 0) = m.workload_id "
              "CROSS JOIN LATERAL unnest(k.ts, k.value) AS u(ts, value) "
              "WHERE u.ts >= m.bucket AND u.ts < m.bucket + interval '1 minute'")

        def sample_idle(col: str) -> str:
            return f"CASE WHEN {scaled(col, 'metric_id')} < {t} THEN 1 ELSE 0 END"

        head = f"WITH h AS MATERIALIZED ({h}), m AS MATERIALIZED ({m}), s0 AS ({s0}) "
        sums = ("SELECT gpu_id, metric_id, workload_id, sum(count) AS n, sum(sum) AS total, "
                "sum(coalesce({idle}, 0)) AS idle FROM {table} {a} WHERE {where} GROUP BY 1, 2, 3")
        parts = [sums.format(idle=idle("a"), table="telemetry_1h", a="a", where=where(p.hours)),
                 "SELECT gpu_id, metric_id, workload_id, 0, 0, coalesce(idle, 0) FROM m",
                 sums.format(idle=idle("a"), table="telemetry_1m", a="a", where=where(p.minutes)),
                 f"SELECT gpu_id, metric_id, workload_id, 0, 0, {sample_idle('v')} FROM s0"]
        if p.samples:
            src = lifecycle.samples_sql(p.samples, "metric_id = ANY(%s)", [ids], params)
            parts.append(f"SELECT gpu_id, metric_id, coalesce(workload_id, 0), 1, value, {sample_idle('value')} "
                         f"FROM ({src}) z")
        sql = (head + "SELECT gpu_id, metric_id, workload_id, sum(n)::bigint, sum(total)::float8, sum(idle)::bigint "
               f"FROM ({' UNION ALL '.join(parts)}) t GROUP BY 1, 2, 3")
        return self.conn.execute(sql, params).fetchall()

    def intervals(self, metric_of: dict[int, int], lo: datetime, hi: datetime) -> dict[int, float]:
        """Per GPU (→ its utilization metric id), the median spacing in seconds of its newest samples before `hi`.

        Raw rows first (the newest `INTERVAL_SAMPLES`, one backward index probe per GPU), then the newest
        packed hour for GPUs whose raw rows do not tell; GPUs with fewer than two samples are left out.
        """
        if not metric_of:
            return {}
        ctx = lo - HOUR if lo > NEG_INF + HOUR else lo
        gids = list(metric_of)
        mids = [metric_of[g] for g in gids]
        times: dict[int, list[datetime]] = {}
        out: dict[int, float] = {}
        # fast path: the fleet's last minutes before `hi` in one time-range scan (BRIN on ts), median in SQL
        recent = max(ctx, hi - RECENT) if hi < POS_INF - RECENT else ctx
        for gid, median in self.conn.execute(
                "SELECT gpu_id, percentile_cont(0.5) WITHIN GROUP (ORDER BY d) FROM (SELECT r.gpu_id, "
                "date_part('epoch', r.ts - lag(r.ts) OVER (PARTITION BY r.gpu_id ORDER BY r.ts)) AS d "
                "FROM telemetry_raw r JOIN unnest(%s::bigint[], %s::int[]) g(id, m) ON r.gpu_id = g.id "
                "AND r.metric_id = g.m WHERE r.metric_id = ANY(%s) AND r.ts >= %s AND r.ts < %s) x "
                "WHERE d IS NOT NULL GROUP BY 1 HAVING count(*) >= 2", (gids, mids, sorted(set(mids)), recent, hi)):
            out[gid] = median
        slow = [g for g in gids if g not in out]
        if slow:  # GPUs that stopped earlier or sample slowly: the newest samples, one backward index probe each
            rows = self.conn.execute(
                "SELECT g.id, x.ts FROM unnest(%s::bigint[], %s::int[]) g(id, m) CROSS JOIN LATERAL (SELECT r.ts "
                "FROM telemetry_raw r WHERE r.gpu_id = g.id AND r.metric_id = g.m AND r.ts >= %s AND r.ts < %s "
                "ORDER BY r.ts DESC LIMIT %s) x", (slow, [metric_of[g] for g in slow], ctx, hi, INTERVAL_SAMPLES))
            for gid, ts in rows:
                times.setdefault(gid, []).append(ts)
        missing = [g for g in slow if len(times.get(g, ())) < INTERVAL_SAMPLES]
        if missing:
            rows = self.conn.execute(
                "SELECT g.id, x.ts FROM unnest(%s::bigint[], %s::int[]) g(id, m) CROSS JOIN LATERAL (SELECT p.ts "
                "FROM telemetry_packed p WHERE p.gpu_id = g.id AND p.metric_id = g.m AND p.hour >= %s AND p.hour < %s "
                "ORDER BY p.hour DESC, p.n DESC LIMIT 1) x",
                (missing, [metric_of[g] for g in missing], ctx - HOUR, hi))
            for gid, ts in rows:
                times.setdefault(gid, []).extend(t for t in ts if ctx <= t < hi)
        for gid, ts in times.items():
            uniq = sorted(set(ts))
            deltas = [(b - a).total_seconds() for a, b in zip(uniq, uniq[1:], strict=False)]
            if deltas:
                out[gid] = statistics.median(deltas)
        return out

    def workload_spans(self, lo: datetime, hi: datetime, metric_ids: Sequence[int]) -> list[tuple]:
        """(workload_id, gpu_id, first_seen, last_seen) of every attributed (workload, GPU) pair in [lo, hi).

        Coarse bounds come from the same hour/minute/sample plan as `totals`; then the first and last
        sample inside the first and last bucket are looked up (index probes, one hour of samples at most).
        """
        ids = list(metric_ids)
        if not ids:
            return []
        p = plan(lo, lifecycle.past_newest(self.conn, hi, HOUR), lifecycle.read_state(self.conn),
                 lifecycle.dirty_ranges(self.conn))
        params: list = [ids]
        parts = [f"SELECT workload_id, gpu_id, min(bucket) AS a, max(bucket) + interval '1 hour' AS b "
                 f"FROM telemetry_1h WHERE metric_id = ANY(%s) AND workload_id <> 0 AND "
                 f"{lifecycle.ranges_predicate('bucket', p.hours, params)} GROUP BY 1, 2"]
        params.append(ids)
        parts.append(f"SELECT workload_id, gpu_id, min(bucket), max(bucket) + interval '1 minute' "
                     f"FROM telemetry_1m WHERE metric_id = ANY(%s) AND workload_id <> 0 AND "
                     f"{lifecycle.ranges_predicate('bucket', p.minutes, params)} GROUP BY 1, 2")
        if p.samples:
            src = lifecycle.samples_sql(p.samples, "metric_id = ANY(%s)", [ids], params)
            parts.append(f"SELECT workload_id, gpu_id, min(ts), max(ts) + interval '1 microsecond' FROM ({src}) z "
                         "WHERE workload_id IS NOT NULL AND workload_id <> 0 GROUP BY 1, 2")
        coarse = self.conn.execute(f"SELECT workload_id, gpu_id, min(a), max(b) FROM ({' UNION ALL '.join(parts)}) "
                                   "q GROUP BY 1, 2", params).fetchall()
        if not coarse:
            return []
        w, g, a, b = (list(c) for c in zip(*coarse, strict=True))
        a = [max(x, lo) for x in a]
        b = [min(x, hi) for x in b]
        sql = (
            "SELECT p.w, p.g, "
            "least((SELECT min(r.ts) FROM telemetry_raw r WHERE r.gpu_id = p.g AND r.metric_id = ANY(%(m)s) "
            "AND r.ts >= p.a AND r.ts < least(p.a + interval '1 hour', p.b) AND r.workload_id = p.w), "
            " (SELECT min(u.ts) FROM telemetry_packed k CROSS JOIN LATERAL unnest(k.ts) u(ts) WHERE k.gpu_id = p.g "
            f"AND k.metric_id = ANY(%(m)s) AND k.hour = date_bin('1 hour', p.a, {_ORIGIN}) AND k.workload_id = p.w "
            "AND u.ts >= p.a AND u.ts < p.b)), "
            "greatest((SELECT max(r.ts) FROM telemetry_raw r WHERE r.gpu_id = p.g AND r.metric_id = ANY(%(m)s) "
            "AND r.ts < p.b AND r.ts >= greatest(p.b - interval '1 hour', p.a) AND r.workload_id = p.w), "
            " (SELECT max(u.ts) FROM telemetry_packed k CROSS JOIN LATERAL unnest(k.ts) u(ts) WHERE k.gpu_id = p.g "
            f"AND k.metric_id = ANY(%(m)s) AND k.hour = date_bin('1 hour', p.b - interval '1 microsecond', {_ORIGIN}) "
            "AND k.workload_id = p.w AND u.ts >= p.a AND u.ts < p.b)) "
            "FROM unnest(%(w)s::bigint[], %(g)s::bigint[], %(a)s::timestamptz[], %(b)s::timestamptz[]) p(w, g, a, b)")
        return self.conn.execute(sql, {"m": ids, "w": w, "g": g, "a": a, "b": b}).fetchall()


def window_bounds(start: datetime, end: datetime) -> tuple[datetime, datetime]:
    """The API's closed window [start, end] as the half-open [lo, hi) the queries take."""
    return start, end + ONE_US


GROUP_BY = ("namespace", "pod", "hostname", "model_name")


@contextmanager
def snapshot(conn: psycopg.Connection) -> Iterator[None]:
    """One REPEATABLE READ snapshot for the change log, the rollups and the samples (or the caller's own)."""
    if conn.autocommit:
        with conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            yield
    else:
        yield


@dataclass
class Group:
    """One row of the usage report: GPU-seconds allocated, utilization-weighted and idle, and the GPUs."""

    group: str | None
    seconds: float = 0.0
    busy_seconds: float = 0.0
    idle_seconds: float = 0.0
    gpus: set[int] | None = None

    @property
    def avg_util(self) -> float | None:
        return 100.0 * self.busy_seconds / self.seconds if self.seconds else None


def _group_key(group_by: str, gpu: tuple[str, str], workload: tuple[str, str, str] | None) -> str | None:
    if group_by in ("hostname", "model_name"):
        value = gpu[0] if group_by == "hostname" else gpu[1]
        return value or None
    if workload is None or not (workload[0] or workload[1]):
        return None
    ns, pod, _ = workload
    return (ns or None) if group_by == "namespace" else f"{ns}/{pod}" if ns else pod


def usage(conn: psycopg.Connection, start: datetime, end: datetime, *, group_by: str = "namespace",
          idle_threshold: float = 5.0, default_interval_s: float = DEFAULT_INTERVAL_S) -> list[Group]:
    """The usage report over [start, end], one `Group` per group (None: unattributed / unknown), largest first.

    Per GPU the utilization source is GPU_UTIL when it reports any in the window, else GR_ENGINE_ACTIVE × 100;
    each sample counts one interval of its GPU (GPUs with a single sample: the fleet's median interval,
    else `default_interval_s`). Busy = Σ util/100 × interval, idle = interval × samples under the threshold.
    """
    if group_by not in GROUP_BY:
        raise ValueError(f"group_by must be one of {', '.join(GROUP_BY)}")
    lo, hi = window_bounds(start, end)
    store = UsageStore(conn)
    with snapshot(conn):
        metrics = store.util_metrics()
        rows = store.totals(lo, hi, idle_threshold, metrics)
        util_id = metrics.get(UTIL)
        has_util = {g for g, m, _, n, _, _ in rows if m == util_id and n}
        engine_id = metrics.get(ENGINE_ACTIVE)
        chosen = [r for r in rows if r[3] and (r[1] == util_id if r[0] in has_util else r[1] == engine_id)]
        gpu_ids = sorted({r[0] for r in chosen})
        intervals = store.intervals({r[0]: r[1] for r in chosen}, lo, hi)
        gpus = {gid: (host, model) for gid, host, model in conn.execute(
            "SELECT id, hostname, model_name FROM gpus WHERE id = ANY(%s)", (gpu_ids,))}
        wids = sorted({r[2] for r in chosen if r[2]})
        workloads = {wid: (ns, pod, c) for wid, ns, pod, c in conn.execute(
            "SELECT id, namespace, pod, container FROM workloads WHERE id = ANY(%s)", (wids,))}
    fallback = statistics.median(intervals.values()) if intervals else default_interval_s
    groups: dict[str | None, Group] = {}
    for gid, mid, wid, n, total, idle in chosen:
        interval = intervals.get(gid, fallback)
        scale = 100.0 if mid == engine_id else 1.0
        key = _group_key(group_by, gpus.get(gid, ("", "")), workloads.get(wid))
        g = groups.get(key)
        if g is None:
            g = groups[key] = Group(key, gpus=set())
        g.seconds += n * interval
        g.busy_seconds += total * scale / 100.0 * interval
        g.idle_seconds += idle * interval
        g.gpus.add(gid)
    return sorted(groups.values(), key=lambda g: (-g.seconds, g.group is None, g.group or ""))


def workloads(conn: psycopg.Connection, start: datetime, end: datetime, *, namespace: str | None = None,
              pod: str | None = None) -> list[dict]:
    """Workloads seen on utilization rows in [start, end], ordered by (namespace, pod, container), with their
    GPUs and first/last seen (per GPU and overall)."""
    lo, hi = window_bounds(start, end)
    store = UsageStore(conn)
    with snapshot(conn):
        spans = store.workload_spans(lo, hi, list(store.util_metrics().values()))
    if not spans:
        return []
    wids = sorted({s[0] for s in spans})
    where, params = ["id = ANY(%s)", "(namespace <> '' OR pod <> '')"], [wids]
    if namespace:
        where.append("namespace = %s")
        params.append(namespace)
    if pod:
        where.append("pod = %s")
        params.append(pod)
    meta = {r[0]: r[1:] for r in conn.execute(
        f"SELECT id, namespace, pod, container FROM workloads WHERE {' AND '.join(where)}", params)}
    gids = sorted({s[1] for s in spans})
    gpus = {r[0]: r[1:] for r in conn.execute("SELECT id, uuid, hostname FROM gpus WHERE id = ANY(%s)", (gids,))}
    out: dict[int, dict] = {}
    for wid, gid, first, last in spans:
        if wid not in meta or first is None:
            continue
        ns, p, c = meta[wid]
        w = out.setdefault(wid, {"namespace": ns, "pod": p, "container": c, "gpus": []})
        uuid, host = gpus.get(gid, (str(gid), ""))
        w["gpus"].append({"uuid": uuid, "hostname": host, "first_seen": first, "last_seen": last})
    items = []
    for w in out.values():
        w["gpus"].sort(key=lambda g: (g["first_seen"], g["uuid"]))
        w["first_seen"] = min(g["first_seen"] for g in w["gpus"])
        w["last_seen"] = max(g["last_seen"] for g in w["gpus"])
        items.append(w)
    return sorted(items, key=lambda w: (w["namespace"], w["pod"], w["container"]))

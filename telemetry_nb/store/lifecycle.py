"""Data lifecycle in PostgreSQL: time partitions, packing of closed ranges, rollups, retention.

Tables (all range-partitioned, every key starts with `gpu_id`):
- `telemetry_raw` (gpu_id, ts, metric_id, value, workload_id): recent samples, one row each.
- `telemetry_packed` (gpu_id, metric_id, hour, workload_id, n, ts[], value[]): closed ranges (older than the
  late-data window), one row per GPU, metric, hour and workload; ~17 bytes per sample instead of ~100.
- `telemetry_1m`, `telemetry_1h` (gpu_id, metric_id, bucket, workload_id, min, max, sum, count, idle): rollups;
  `idle` counts the samples under `IDLE_THRESHOLD` % utilization (NULL in buckets rolled before schema 5).
- `telemetry_changes` (lo, hi): time ranges written since the last rollup refresh; the refresh recomputes
  the buckets they touch (never adds to them), readers take those buckets from raw rows.
- `telemetry_lifecycle` (name, ts): horizons (`expired_before:<table>`, `packed_before`) and `newest`.
The view `telemetry` is raw ∪ unpacked, so `SELECT … FROM telemetry` sees every stored sample.

Every operation here is one transaction, so a process killed in the middle leaves the previous state.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import psycopg

from telemetry_nb.store import counts

log = logging.getLogger(__name__)

ORIGIN = datetime(2000, 1, 1, tzinfo=UTC)  # date_bin origin: buckets and partitions are aligned to it
MINUTE, HOUR, DAY = timedelta(minutes=1), timedelta(hours=1), timedelta(days=1)
NEG_INF = datetime.min.replace(tzinfo=UTC)
POS_INF = datetime.max.replace(tzinfo=UTC)
PARTITION_LOCK = 0x7E1E_9A27  # advisory lock: partitions are created one caller at a time
PACK_LOCK = 0x7E1E_9A28  # advisory lock: packing and late writes into packed ranges never interleave
MAX_NEW_PARTITIONS = 400  # a batch needing more partitions than this is refused, not silently spread out
ROLLUPS = {"telemetry_1m": MINUTE, "telemetry_1h": HOUR}
# rollups also count the samples under this utilization (%): the default idle threshold of GPU accounting
IDLE_THRESHOLD = 5.0
ENGINE_ACTIVE = "DCGM_FI_PROF_GR_ENGINE_ACTIVE"  # a 0–1 ratio: × 100 to compare with GPU_UTIL
SAMPLE_TABLES = ("telemetry_raw", "telemetry_packed")


class PartitionLimit(psycopg.DataError):
    """A batch would need more new partitions than `MAX_NEW_PARTITIONS` (timestamps far off, likely wrong)."""


@dataclass(frozen=True)
class Policy:
    """How data is partitioned and how long each resolution is kept (`None` keeps it forever)."""

    partition: timedelta = DAY
    retention_raw: timedelta | None = timedelta(days=14)
    retention_1m: timedelta | None = timedelta(days=90)
    retention_1h: timedelta | None = timedelta(days=730)
    late_window: timedelta = DAY
    ahead: int = 2  # partitions created ahead of the newest data

    def step(self, table: str) -> timedelta:
        """Partition width of `table`: raw/packed as configured, 1m rollups ≥ 1 day, 1h rollups 30 days."""
        if table == "telemetry_1m":
            return max(self.partition, DAY)
        if table == "telemetry_1h":
            return max(self.partition, timedelta(days=30))
        return self.partition

    def retention(self, table: str) -> timedelta | None:
        return {"telemetry_1m": self.retention_1m, "telemetry_1h": self.retention_1h}.get(table, self.retention_raw)


@dataclass(frozen=True)
class Partition:
    name: str
    lo: datetime
    hi: datetime


@dataclass
class State:
    """The horizons writers and readers need: below `expired_before[t]` table t holds nothing any more."""

    expired_before: dict[str, datetime] = field(default_factory=dict)
    packed_before: datetime = NEG_INF
    newest: datetime | None = None

    def expired(self, table: str = "telemetry_raw") -> datetime:
        return self.expired_before.get(table, NEG_INF)


def floor_to(ts: datetime, step: timedelta) -> datetime:
    """Start of the `step`-wide bucket (aligned to ORIGIN) holding `ts`."""
    if ts <= NEG_INF + step or ts >= POS_INF - step:
        return ts
    return ORIGIN + ((ts - ORIGIN) // step) * step


def ceil_to(ts: datetime, step: timedelta) -> datetime:
    f = floor_to(ts, step)
    return f if f == ts or ts >= POS_INF - step else f + step


def merge_ranges(ranges: Iterable[tuple[datetime, datetime]]) -> list[tuple[datetime, datetime]]:
    """Union of half-open ranges [lo, hi), sorted, touching ones joined."""
    out: list[list[datetime]] = []
    for lo, hi in sorted(r for r in ranges if r[0] < r[1]):
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(a, b) for a, b in out]


# -- state ---------------------------------------------------------------------------------------
def read_state(conn: psycopg.Connection) -> State:
    s = State()
    for name, ts in conn.execute("SELECT name, ts FROM telemetry_lifecycle").fetchall():
        if name.startswith("expired_before:"):
            s.expired_before[name.split(":", 1)[1]] = ts
        elif name == "packed_before":
            s.packed_before = ts
        elif name == "newest":
            s.newest = ts
    return s


def _raise_mark(conn: psycopg.Connection, name: str, ts: datetime) -> None:
    conn.execute("INSERT INTO telemetry_lifecycle AS l (name, ts) VALUES (%s, %s) "
                 "ON CONFLICT (name) DO UPDATE SET ts = greatest(l.ts, EXCLUDED.ts)", (name, ts))


# -- partitions ----------------------------------------------------------------------------------
_BOUNDS = r"FROM \('([^']+)'\) TO \('([^']+)'\)"


def partitions(conn: psycopg.Connection, table: str) -> list[Partition]:
    """The partitions of `table`, oldest first."""
    rows = conn.execute(
        "SELECT c.relname, b[1]::timestamptz, b[2]::timestamptz FROM pg_inherits i "
        "JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent "
        "CROSS JOIN LATERAL regexp_match(pg_get_expr(c.relpartbound, c.oid), %s) b "
        "WHERE p.relname = %s AND p.relnamespace = current_schema()::regnamespace ORDER BY 2",
        (_BOUNDS, table)).fetchall()
    return [Partition(*r) for r in rows]


def missing_ranges(existing: Sequence[Partition], lo: datetime, hi: datetime,
                   step: timedelta) -> list[tuple[datetime, datetime]]:
    """Aligned ranges of width ≤ `step` that cover [lo, hi] where no existing partition does.

    Each aligned range minus what exists, so a changed TELEMETRY_PARTITION never overlaps old partitions.
    """
    out = []
    parts = sorted(existing, key=lambda p: p.lo)
    t = floor_to(lo, step)
    while t <= hi:
        pieces = [(t, t + step)]
        for p in parts:
            nxt = []
            for a, b in pieces:
                if p.hi <= a or p.lo >= b:
                    nxt.append((a, b))
                    continue
                if a < p.lo:
                    nxt.append((a, p.lo))
                if p.hi < b:
                    nxt.append((p.hi, b))
            pieces = nxt
        out += [(a, b) for a, b in pieces if a <= hi and b > lo]
        t += step
    return out


def ensure_partitions(conn: psycopg.Connection, table: str, lo: datetime, hi: datetime,
                      step: timedelta) -> list[str]:
    """Create the partitions of `table` covering [lo, hi] that do not exist yet (in the caller's transaction)."""
    existing = partitions(conn, table)
    if not missing_ranges(existing, lo, hi, step):
        return []
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (PARTITION_LOCK,))
    state = read_state(conn)  # under the lock: never re-create a range retention or packing just removed
    floor = state.expired(table)
    if table == "telemetry_raw":
        floor = max(floor, state.packed_before)
    if hi < floor:
        return []
    lo = max(lo, floor)
    existing = partitions(conn, table)  # another process may have created them meanwhile
    todo = missing_ranges(existing, lo, hi, step)
    if len(todo) > MAX_NEW_PARTITIONS:
        raise PartitionLimit(f"rows from {lo.isoformat()} to {hi.isoformat()} would need {len(todo)} new "
                             f"partitions of {table} (limit {MAX_NEW_PARTITIONS}); are the timestamps right?")
    made = []
    for a, b in todo:
        name = f"{table}_p{a.astimezone(UTC):%Y%m%d_%H%M}"
        conn.execute(f'CREATE TABLE "{name}" PARTITION OF {table} FOR VALUES FROM (%s) TO (%s)'
                     .replace("%s", "'{}'").format(a.isoformat(), b.isoformat()))
        made.append(name)
    if made:
        log.info("Created %d partition(s) of %s: %s", len(made), table, ", ".join(made))
    return made


def create_ahead(conn: psycopg.Connection, policy: Policy, times: Iterable[datetime]) -> list[str]:
    """Partitions for the current and the next `policy.ahead` ranges around each of `times`, every table."""
    made: list[str] = []
    with conn.transaction():
        for t in times:
            for table in ("telemetry_raw", *ROLLUPS):
                step = policy.step(table)
                made += ensure_partitions(conn, table, floor_to(t, step), t + policy.ahead * step, step)
    return made


# -- reading samples in time ranges (raw ∪ packed) -----------------------------------------------
def ranges_predicate(column: str, ranges: Sequence[tuple[datetime, datetime]], params: list) -> str:
    """`(col >= a AND col < b) OR …` for half-open ranges; appends their bounds to `params`."""
    parts = []
    for a, b in ranges:
        parts.append(f"({column} >= %s AND {column} < %s)")
        params.extend((a, b))
    return "(" + " OR ".join(parts) + ")" if parts else "false"


def samples_sql(ranges: Sequence[tuple[datetime, datetime]], filters: str, filter_params: Sequence,
                params: list) -> str:
    """SQL for (gpu_id, metric_id, ts, value, workload_id) of every stored sample in `ranges`.

    `filters` (over `gpu_id`/`metric_id`, with `filter_params`) applies to both sources; the packed
    source is pruned by hour before its arrays are unnested.
    """
    p_raw: list = [*filter_params]
    raw = ("SELECT gpu_id, metric_id, ts, value, workload_id FROM telemetry_raw WHERE "
           f"{filters} AND {ranges_predicate('ts', ranges, p_raw)}")
    p_packed: list = [*filter_params]
    hours = [(a - HOUR if a > NEG_INF + HOUR else a, b) for a, b in ranges]
    hour_pred = ranges_predicate("p.hour", hours, p_packed)
    u_pred = ranges_predicate("u.ts", ranges, p_packed)
    packed = ("SELECT p.gpu_id, p.metric_id, u.ts, u.value, p.workload_id FROM telemetry_packed p "
              "CROSS JOIN LATERAL unnest(p.ts, p.value) AS u(ts, value) WHERE "
              f"{filters.replace('gpu_id', 'p.gpu_id').replace('metric_id', 'p.metric_id')} AND {hour_pred} "
              f"AND {u_pred}")
    params.extend(p_raw)
    params.extend(p_packed)
    return f"{raw} UNION ALL {packed}"


# -- rollups -------------------------------------------------------------------------------------
@dataclass
class RefreshReport:
    changes: int = 0
    ranges: list[tuple[datetime, datetime]] = field(default_factory=list)
    rows_1m: int = 0
    rows_1h: int = 0
    seconds: float = 0.0


def refresh_rollups(conn: psycopg.Connection, policy: Policy, *, max_changes: int = 100_000) -> RefreshReport:
    """Recompute every 1m and 1h bucket touched by the logged changes, in one transaction.

    Buckets are deleted and recomputed from the stored samples, so running it twice, or after a replay,
    never adds anything twice; a crash rolls the whole refresh back and the changes stay logged.
    """
    started = time.perf_counter()
    report = RefreshReport()
    with conn.transaction():
        rows = conn.execute("DELETE FROM telemetry_changes WHERE id IN (SELECT id FROM telemetry_changes "
                            "ORDER BY id LIMIT %s) RETURNING lo, hi", (max_changes,)).fetchall()
        if not rows:
            return report
        report.changes = len(rows)
        conn.execute("SET LOCAL work_mem = '256MB'")  # the aggregates sort/hash in memory, not on disk
        _raise_mark(conn, "newest", max(hi for _, hi in rows))
        state = read_state(conn)
        minute = merge_ranges((floor_to(lo, MINUTE), floor_to(hi, MINUTE) + MINUTE) for lo, hi in rows)
        hour = merge_ranges((floor_to(a, HOUR), ceil_to(b, HOUR)) for a, b in minute)
        report.ranges = minute
        report.rows_1m = _recompute(conn, "telemetry_1m", minute, state, policy, _from_samples)
        report.rows_1h = _recompute(conn, "telemetry_1h", hour, state, policy, _from_1m)
    report.seconds = time.perf_counter() - started
    return report


def analyze_touched(conn: psycopg.Connection, ranges: Sequence[tuple[datetime, datetime]]) -> list[str]:
    """ANALYZE the rollup partitions overlapping `ranges`, so the planner knows what a big refresh wrote."""
    done = []
    for table in ROLLUPS:
        for p in partitions(conn, table):
            if any(p.lo < b and a < p.hi for a, b in ranges):
                conn.execute(f'ANALYZE "{p.name}"')
                done.append(p.name)
    return done


def utilization_pct(value: str, metric: str) -> str:
    """SQL for a utilization sample in percent: GR_ENGINE_ACTIVE (a 0–1 ratio) × 100, GPU_UTIL as it is."""
    return (f"({value} * CASE WHEN {metric} = (SELECT id FROM metrics WHERE name = '{ENGINE_ACTIVE}') "
            "THEN 100.0 ELSE 1.0 END)")


def _from_samples(ranges: list[tuple[datetime, datetime]], params: list) -> str:
    src = samples_sql(ranges, "true", [], params)
    return ("SELECT gpu_id, metric_id, date_bin('1 minute', ts, TIMESTAMPTZ '2000-01-01 00:00:00+00'), "
            "coalesce(workload_id, 0), min(value), max(value), sum(value), count(*), "
            f"count(*) FILTER (WHERE {utilization_pct('value', 'metric_id')} < {IDLE_THRESHOLD!r}) "
            f"FROM ({src}) s GROUP BY 1, 2, 3, 4 ORDER BY 2, 3, 1")


def _from_1m(ranges: list[tuple[datetime, datetime]], params: list) -> str:
    pred = ranges_predicate("bucket", ranges, params)
    return ("SELECT gpu_id, metric_id, date_bin('1 hour', bucket, TIMESTAMPTZ '2000-01-01 00:00:00+00'), "
            "workload_id, min(min), max(max), sum(sum), sum(count), "
            "CASE WHEN count(idle) = count(*) THEN sum(idle) END "  # unknown when a minute predates the column
            f"FROM telemetry_1m WHERE {pred} GROUP BY 1, 2, 3, 4 ORDER BY 2, 3, 1")


def _recompute(conn: psycopg.Connection, table: str, ranges: list[tuple[datetime, datetime]], state: State,
               policy: Policy, source) -> int:
    horizon = state.expired(table)
    ranges = [(max(a, horizon), b) for a, b in ranges if b > horizon]
    if not ranges:
        return 0
    step = policy.step(table)
    for a, b in ranges:
        ensure_partitions(conn, table, a, b - timedelta(microseconds=1), step)
    params: list = []
    pred = ranges_predicate("bucket", ranges, params)
    conn.execute(f"DELETE FROM {table} WHERE {pred}", params)
    params = []
    sql = source(ranges, params)
    return conn.execute(f"INSERT INTO {table} (gpu_id, metric_id, bucket, workload_id, min, max, sum, count, idle) "
                        f"{sql}", params).rowcount


def dirty_ranges(conn: psycopg.Connection) -> list[tuple[datetime, datetime]]:
    """Time ranges written since the last refresh ([lo, hi] closed, returned as [lo, hi + 1µs))."""
    rows = conn.execute("SELECT lo, hi FROM telemetry_changes").fetchall()
    return merge_ranges((lo, hi + timedelta(microseconds=1)) for lo, hi in rows)


# -- packing closed ranges -----------------------------------------------------------------------
PACK_SQL = ("INSERT INTO telemetry_packed (gpu_id, metric_id, hour, workload_id, n, ts, value) "
            "SELECT gpu_id, metric_id, date_bin('1 hour', ts, TIMESTAMPTZ '2000-01-01 00:00:00+00'), workload_id, "
            "count(*), array_agg(ts ORDER BY ts), array_agg(value ORDER BY ts) FROM {src} GROUP BY 1, 2, 3, 4 "
            "ORDER BY 1, 3, 2")


def pack_closed(conn: psycopg.Connection, policy: Policy, reference: datetime) -> list[str]:
    """Rewrite raw partitions that ended a late-data window before `reference` into packed rows.

    One transaction per partition: lock it against writes, copy it packed, raise `packed_before`, drop it.
    """
    done = []
    cutoff = reference - policy.late_window
    for p in partitions(conn, "telemetry_raw"):
        if p.hi > cutoff:
            break
        started = time.perf_counter()
        with conn.transaction():
            conn.execute(f'LOCK TABLE "{p.name}" IN SHARE MODE')
            conn.execute("SELECT pg_advisory_xact_lock(%s), pg_advisory_xact_lock(%s)", (PACK_LOCK, PARTITION_LOCK))
            ensure_partitions(conn, "telemetry_packed", p.lo, p.hi - timedelta(microseconds=1), p.hi - p.lo)
            n = conn.execute(PACK_SQL.format(src=f'"{p.name}"')).rowcount
            _raise_mark(conn, "packed_before", p.hi)
            conn.execute(f'DROP TABLE "{p.name}"')
        packed = next((q.name for q in partitions(conn, "telemetry_packed") if q.lo <= p.lo < q.hi), None)
        if packed:
            conn.execute(f'ANALYZE "{packed}"')
        log.info("Packed partition %s into %d rows of telemetry_packed in %.1fs", p.name, n,
                 time.perf_counter() - started)
        done.append(p.name)
    return done


# -- retention -----------------------------------------------------------------------------------
def enforce_retention(conn: psycopg.Connection, policy: Policy, reference: datetime) -> dict[str, list[str]]:
    """Drop whole partitions that ended more than their table's retention before `reference`."""
    dropped: dict[str, list[str]] = {}
    for table in (*SAMPLE_TABLES, *ROLLUPS):
        keep = policy.retention(table)
        if keep is None:
            continue
        horizon = reference - keep
        for p in partitions(conn, table):
            if p.hi > horizon:
                break
            with conn.transaction():
                conn.execute(f'LOCK TABLE "{p.name}" IN ACCESS EXCLUSIVE MODE')
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (PARTITION_LOCK,))
                if table in SAMPLE_TABLES:
                    count = "count(*)" if table == "telemetry_raw" else "sum(n)"
                    gone = conn.execute(f'SELECT metric_id, {count} FROM "{p.name}" GROUP BY 1').fetchall()
                    with conn.cursor() as cur:
                        counts.add(cur, {i: -int(n) for i, n in gone})
                    for t in SAMPLE_TABLES:
                        _raise_mark(conn, f"expired_before:{t}", p.hi)
                else:
                    _raise_mark(conn, f"expired_before:{table}", p.hi)
                conn.execute(f'DROP TABLE "{p.name}"')
            log.info("Retention: dropped partition %s (%s to %s, older than %s)", p.name, p.lo.isoformat(),
                     p.hi.isoformat(), keep)
            dropped.setdefault(table, []).append(p.name)
    return dropped


def reference_time(conn: psycopg.Connection, now: datetime) -> datetime | None:
    """The clock retention and packing run on: the newest stored sample, but never later than `now`.

    Using the data's own clock keeps a replayed historical export from being expired as it lands.
    """
    newest = conn.execute("SELECT greatest((SELECT ts FROM telemetry_lifecycle WHERE name = 'newest'), "
                          "(SELECT max(hi) FROM telemetry_changes))").fetchone()[0]
    return None if newest is None else min(newest, now)


def past_newest(conn: psycopg.Connection, hi: datetime, step: timedelta) -> datetime:
    """`hi` rounded up to a whole `step` when no stored sample is at or after it, else `hi` itself.

    A window that ends after the newest sample then reads its last bucket whole from a rollup instead of
    re-aggregating that bucket's samples: the two hold the same rows.
    """
    newest = reference_time(conn, POS_INF)
    if newest is not None and newest < hi < POS_INF:
        return ceil_to(hi, step)
    return hi

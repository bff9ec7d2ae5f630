"""Load fleet telemetry through the API into pandas, and build small Altair charts and tables from it.

The loader asks the API for server-side aggregates of the whole fleet (`/api/v1/fleet/aggregate`, one
request per metric, served from the rollups) with a bucket sized to the window, so a window holding
millions of rows arrives as a few hundred buckets per GPU; every chart
builder then re-bins its input to at most `MAX_CHART_ROWS` data rows (Altair's default limit), so no
chart ever embeds a big data set and `MaxRowsError` cannot happen. Frames are "long": one row per
(GPU, bucket, metric) with `min`, `avg`, `max`, `count`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import altair as alt
import numpy as np
import pandas as pd

from telemetry_nb.analysis.client import Gpu, TelemetryClient, parse_ts
from telemetry_nb.timeparse import parse_duration

UTIL = "DCGM_FI_DEV_GPU_UTIL"
GR_ENGINE = "DCGM_FI_PROF_GR_ENGINE_ACTIVE"  # the utilization of a MIG instance (a 0–1 ratio), which has no UTIL
TEMP = "DCGM_FI_DEV_GPU_TEMP"
POWER = "DCGM_FI_DEV_POWER_USAGE"
FB_USED = "DCGM_FI_DEV_FB_USED"
CHART_METRICS = (UTIL, TEMP, POWER, FB_USED)
DEFAULT_METRICS = (*CHART_METRICS, "DCGM_FI_DEV_MEM_COPY_UTIL", "DCGM_FI_DEV_SM_CLOCK")
MAX_CHART_ROWS = 5000
NICE_BUCKETS_S = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)
AGG_COLUMNS = ["uuid", "hostname", "gpu_index", "gpu", "bucket", "metric", "min", "avg", "max", "count"]
UNITS = {UTIL: "%", TEMP: "°C", POWER: "W", FB_USED: "MiB", "DCGM_FI_DEV_FB_FREE": "MiB",
         "DCGM_FI_DEV_MEM_COPY_UTIL": "%", "DCGM_FI_DEV_ENC_UTIL": "%", "DCGM_FI_DEV_DEC_UTIL": "%",
         "DCGM_FI_DEV_SM_CLOCK": "MHz", "DCGM_FI_DEV_MEM_CLOCK": "MHz"}


def short(metric: str) -> str:
    """`DCGM_FI_DEV_GPU_UTIL` → `GPU_UTIL`."""
    return metric.removeprefix("DCGM_FI_DEV_")


# -- windows and inventory -----------------------------------------------------------------------
def _aware(ts: datetime | str | pd.Timestamp | None) -> datetime | None:
    if ts is None or ts == "":
        return None
    if isinstance(ts, str):
        ts = parse_ts(ts)
    if isinstance(ts, pd.Timestamp):
        ts = ts.to_pydatetime()
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def resolve_window(gpus: Sequence[Gpu], *, start_time=None, end_time=None, window: str | float | None = "1h",
                   ) -> tuple[datetime, datetime]:
    """(start, end): `end_time` or else the newest `last_seen` (so replayed old data works), `start_time`
    or else end − `window`."""
    end = _aware(end_time)
    if end is None:
        seen = [g.last_seen for g in gpus if g.last_seen is not None]
        end = max(seen) if seen else datetime.now(UTC)
    start = _aware(start_time)
    if start is None:
        seconds = parse_duration(window) if isinstance(window, str) else float(window or 3600)
        start = end - timedelta(seconds=seconds)
    if end < start:
        raise ValueError(f"end_time {end} is before start_time {start}")
    return start, end


def select_gpus(gpus: Iterable[Gpu], *, hostnames: Sequence[str] | str | None = None,
                uuids: Sequence[str] | None = None, start: datetime | None = None,
                end: datetime | None = None) -> list[Gpu]:
    """GPUs of `hostnames` / `uuids` (None = all) that reported inside [start, end]."""
    if isinstance(hostnames, str):
        hostnames = [hostnames]
    hosts = set(hostnames) if hostnames else None
    ids = set(uuids) if uuids else None
    out = []
    for g in gpus:
        if hosts is not None and g.hostname not in hosts:
            continue
        if ids is not None and g.uuid not in ids:
            continue
        if start is not None and g.last_seen is not None and g.last_seen < start:
            continue
        if end is not None and g.first_seen is not None and g.first_seen > end:
            continue
        out.append(g)
    return sorted(out, key=lambda g: (g.hostname, g.gpu_index if g.gpu_index is not None else -1, g.uuid))


def gpus_frame(gpus: Iterable[Gpu]) -> pd.DataFrame:
    rows = [{"uuid": g.uuid, "hostname": g.hostname, "gpu_index": g.gpu_index, "device": g.device,
             "model_name": g.model_name, "first_seen": g.first_seen, "last_seen": g.last_seen} for g in gpus]
    df = pd.DataFrame(rows, columns=["uuid", "hostname", "gpu_index", "device", "model_name", "first_seen",
                                     "last_seen"])
    for col in ("first_seen", "last_seen"):
        df[col] = pd.to_datetime(df[col], utc=True)
    return df


def gpu_label(hostname: str, gpu_index: int | None, mig_instance: int | None = None) -> str:
    """`host/0`; a MIG instance `host/0/gi1`, so it never shares a chart row with its parent."""
    base = f"{hostname}/{'?' if gpu_index is None else gpu_index}"
    return base if mig_instance is None else f"{base}/gi{mig_instance}"


def choose_bucket(start: datetime, end: datetime, target: int = 120, min_s: float = 1) -> int:
    """The smallest nice bucket (1s, 5s, 1m, …) giving at most `target` buckets over the window."""
    span = max((end - start).total_seconds(), 1.0)
    want = max(span / max(target, 1), min_s)
    for b in NICE_BUCKETS_S:
        if b >= want:
            return b
    return int(math.ceil(want / 86400) * 86400)


def rollup_bucket(bucket_s: int, gpus: int, start: datetime, end: datetime, budget: int = 250_000) -> int:
    """`bucket_s`, rounded up to whole hours when a fleet query would otherwise read more than `budget`
    1-minute rollup rows per metric (GPUs × minutes): the 1 h rollup then answers it, 60× fewer rows.

    Fleet-wide charts re-bin to a few thousand points anyway, so the coarser bucket costs them nothing.
    """
    minutes = max((end - start).total_seconds(), 1.0) / 60
    if bucket_s < 3600 and gpus * minutes > budget and (end - start).total_seconds() >= 6 * 3600:
        return 3600
    return bucket_s


def fleet_buckets(target: int, gpus: int, max_elements: int | None, min_buckets: int = 10) -> int:
    """`target` buckets, fewer when `gpus` × buckets would pass `max_elements` (never under `min_buckets`)."""
    if not max_elements or gpus <= 0:
        return target
    return max(min(target, min_buckets), min(target, max_elements // gpus))


def align_start(start: datetime, bucket_s: int) -> datetime:
    """The start of the bucket holding `start` (buckets of a day or less align to midnight UTC, like the API's)."""
    if bucket_s <= 0 or 86400 % bucket_s:
        return start
    return pd.Timestamp(start).floor(f"{bucket_s}s").to_pydatetime()


# -- loading -------------------------------------------------------------------------------------
def _empty_agg() -> pd.DataFrame:
    df = pd.DataFrame({c: [] for c in AGG_COLUMNS})
    df["bucket"] = pd.to_datetime(df["bucket"], utc=True)
    return df


def load_aggregates(client: TelemetryClient, gpus: Sequence[Gpu], *, start: datetime, end: datetime,
                    bucket_s: int, metrics: Sequence[str] | None = None, workers: int = 8,
                    hostnames: Sequence[str] | None = None) -> pd.DataFrame:
    """Server-side min/avg/max/count per (GPU, bucket, metric) of `gpus`: one fleet request per metric.

    `/api/v1/fleet/aggregate` answers for every GPU at once from the rollups, so the cost does not grow
    with the number of GPUs; `hostnames` narrows the request server-side, `gpus` picks the rows kept.
    """
    if not gpus:
        return _empty_agg()
    names = list(metrics) if metrics else [m.name for m in client.metrics()]
    by_uuid = {g.uuid: g for g in gpus}

    def one(metric: str) -> pd.DataFrame:
        agg = client.fleet_aggregate(metric, bucket=bucket_s, start_time=start, end_time=end, hostname=hostnames)
        df = pd.DataFrame({"uuid": agg.uuid, "bucket": agg.bucket, "min": agg.min, "avg": agg.avg,
                           "max": agg.max, "count": agg.count})
        df["metric"] = metric
        return df[df["uuid"].isin(by_uuid)]

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(names), 4))) as pool:
        parts = [p for p in pool.map(one, names) if not p.empty]
    if not parts:
        return _empty_agg()
    df = pd.concat(parts, ignore_index=True)
    info = pd.DataFrame([(g.uuid, g.hostname, g.gpu_index, gpu_label(g.hostname, g.gpu_index, g.mig_instance))
                         for g in gpus],
                        columns=["uuid", "hostname", "gpu_index", "gpu"])
    df = df.merge(info, on="uuid", how="left")[AGG_COLUMNS]
    df["bucket"] = pd.to_datetime(df["bucket"], utc=True, format="ISO8601")
    for col in ("min", "avg", "max"):
        df[col] = df[col].astype(float)
    df["count"] = df["count"].astype(int)
    df.attrs["bucket_seconds"] = bucket_s
    return df


def load_raw(client: TelemetryClient, gpus: Sequence[Gpu], *, start: datetime, end: datetime,
             metrics: Sequence[str] | None = None, max_rows_per_gpu: int = 100_000, workers: int = 8) -> pd.DataFrame:
    """Every stored sample (uuid, hostname, gpu_index, gpu, timestamp, metric, value): for short windows only."""
    def one(g: Gpu) -> pd.DataFrame:
        items: list[dict] = []
        for page in client.telemetry_pages(g.uuid, start_time=start, end_time=end, metric=metrics):
            items.extend(page["items"])
            if len(items) >= max_rows_per_gpu:
                del items[max_rows_per_gpu:]
                break
        df = pd.DataFrame(items, columns=["timestamp", "metric", "value"])
        df.insert(0, "gpu", gpu_label(g.hostname, g.gpu_index, g.mig_instance))
        df.insert(0, "gpu_index", g.gpu_index)
        df.insert(0, "hostname", g.hostname)
        df.insert(0, "uuid", g.uuid)
        return df

    cols = ["uuid", "hostname", "gpu_index", "gpu", "timestamp", "metric", "value"]
    if not gpus:
        return pd.DataFrame(columns=cols)
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(gpus)))) as pool:
        parts = list(pool.map(one, gpus))
    df = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=cols)
    df["timestamp"] = pd.to_datetime(df["timestamp"], utc=True, format="ISO8601")
    df["value"] = df["value"].astype(float)
    return df


def raw_to_aggregates(raw: pd.DataFrame, bucket_s: int) -> pd.DataFrame:
    """Bucket a raw frame (from `load_raw` or elsewhere) client-side into the aggregate shape."""
    if raw.empty:
        return _empty_agg()
    df = raw.assign(bucket=raw["timestamp"].dt.floor(f"{int(bucket_s)}s"))
    keys = ["uuid", "hostname", "gpu_index", "gpu", "bucket", "metric"]
    out = df.groupby(keys, sort=False, dropna=False)["value"].agg(["min", "mean", "max", "count"]).reset_index()
    out = out.rename(columns={"mean": "avg"})[AGG_COLUMNS]
    out.attrs["bucket_seconds"] = bucket_s
    return out


def load_window(client: TelemetryClient, *, start_time=None, end_time=None, window: str | float | None = "1h",
                hostnames: Sequence[str] | str | None = None, metrics: Sequence[str] | None = None,
                target_buckets: int = 120, gpus: Sequence[Gpu] | None = None, workers: int = 8,
                known_metrics: Iterable[str] | None = None, max_elements: int | None = None,
                previous: dict | None = None) -> dict:
    """Inventory + aggregates for a window: {gpus, all_gpus, start, end, bucket_s, data, metrics}.

    `known_metrics` (the stored metric names) saves a `/api/v1/metrics` call (one more round trip per load).
    `max_elements` caps GPUs × buckets per metric (fewer, wider buckets for a big fleet: charts that show a
    few thousand cells need no more). `previous` (an earlier result for the same GPUs, metrics and bucket
    size) makes it a sliding refresh: only the buckets from `REFRESH_OVERLAP` before its end on are asked
    for again, the older ones are kept (rows arriving later than that show after the next full load).
    """
    inventory = list(gpus) if gpus is not None else client.gpus()
    hosts = [hostnames] if isinstance(hostnames, str) else hostnames
    scoped = [g for g in inventory if not hosts or g.hostname in hosts]
    start, end = resolve_window(scoped, start_time=start_time, end_time=end_time, window=window)
    selected = select_gpus(scoped, start=start, end=end)
    wanted = list(dict.fromkeys([*CHART_METRICS, GR_ENGINE, *(metrics or DEFAULT_METRICS)]))
    known = set(known_metrics) if known_metrics is not None else {m.name for m in client.metrics()}
    wanted = [m for m in wanted if m in known]
    bucket_s = rollup_bucket(choose_bucket(start, end, fleet_buckets(target_buckets, len(selected), max_elements)),
                             len(selected), start, end)
    # whole buckets: the server answers them from its rollups, not from the raw rows of a ragged first bucket
    first = align_start(start, bucket_s)
    kept, fetch_from = None, first
    if previous is not None and _slides(previous, selected, wanted, bucket_s, first, end):
        fetch_from = max(first, align_start(previous["end"] - max(REFRESH_OVERLAP, timedelta(seconds=bucket_s)),
                                            bucket_s))
        old = previous["data"]
        kept = old[(old["bucket"] >= pd.Timestamp(first)) & (old["bucket"] < pd.Timestamp(fetch_from))]
    data = utilization_fallback(load_aggregates(client, selected, start=fetch_from, end=end, bucket_s=bucket_s,
                                                metrics=wanted or None, workers=workers, hostnames=hosts or None))
    if kept is not None and not kept.empty:
        data = pd.concat([kept, data], ignore_index=True) if not data.empty else kept.reset_index(drop=True)
        data.attrs["bucket_seconds"] = bucket_s
    return {"gpus": selected, "all_gpus": scoped, "start": start, "end": end, "bucket_s": bucket_s, "data": data,
            "metrics": wanted, "first": first}


REFRESH_OVERLAP = timedelta(minutes=2)  # a sliding refresh re-reads this much before the last end (late samples)


def _slides(previous: dict, selected: Sequence[Gpu], metrics: Sequence[str], bucket_s: int, first: datetime,
            end: datetime) -> bool:
    """Whether `previous` covers the same GPUs, metrics and bucket size from at least `first` on."""
    return (previous.get("bucket_s") == bucket_s and previous.get("metrics") == list(metrics)
            and previous.get("first") is not None and previous["first"] <= first and previous["end"] <= end
            and [g.uuid for g in previous["gpus"]] == [g.uuid for g in selected] and not previous["data"].empty)


def utilization_fallback(df: pd.DataFrame) -> pd.DataFrame:
    """GPUs without `DCGM_FI_DEV_GPU_UTIL` (MIG instances) get it from `DCGM_FI_PROF_GR_ENGINE_ACTIVE` × 100.

    So every chart, the idle report and the fleet summary use whichever of the two a GPU reports.
    """
    if df.empty or not df["metric"].eq(GR_ENGINE).any():
        return df
    has_util = set(df.loc[df["metric"] == UTIL, "uuid"])
    gr = df[(df["metric"] == GR_ENGINE) & ~df["uuid"].isin(has_util)]
    if gr.empty:
        return df
    derived = gr.assign(metric=UTIL, min=gr["min"] * 100, avg=gr["avg"] * 100, max=gr["max"] * 100)
    out = pd.concat([df, derived], ignore_index=True)
    out.attrs.update(df.attrs)
    return out


def xid_gpus(events: Sequence, gpus: Sequence[Gpu] | None = None, hostname: str | None = None) -> pd.DataFrame:
    """GPUs with XID errors among `events` (client `Event`s, optionally of one host): one row each, newest first."""
    cols = ["gpu", "uuid", "errors", "last_code", "last_message", "last_at"]
    rows = [e for e in events if e.kind == "xid" and e.code and (not hostname or e.hostname == hostname)]
    if not rows:
        return pd.DataFrame(columns=cols)
    index = {g.uuid: g for g in gpus or []}
    df = pd.DataFrame([{"uuid": e.uuid, "hostname": e.hostname, "code": e.code, "message": e.message,
                        "at": e.timestamp} for e in rows]).sort_values("at")
    out = df.groupby("uuid", sort=False).agg(hostname=("hostname", "last"), errors=("code", "size"),
                                             last_code=("code", "last"), last_message=("message", "last"),
                                             last_at=("at", "last")).reset_index()
    out["gpu"] = [gpu_label(h, index[u].gpu_index, index[u].mig_instance) if u in index else gpu_label(h, None)
                  for u, h in zip(out["uuid"], out["hostname"], strict=True)]
    return out.sort_values("last_at", ascending=False)[cols].reset_index(drop=True)


# -- reshaping -----------------------------------------------------------------------------------
def _weighted(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Merge aggregate rows by `keys`: min of min, count-weighted avg, max of max, sum of count."""
    if df.empty:
        return pd.DataFrame(columns=[*keys, "min", "avg", "max", "count"])
    d = df.assign(_w=df["avg"] * df["count"])
    g = d.groupby(keys, sort=True, dropna=False, observed=True).agg(
        min=("min", "min"), _w=("_w", "sum"), max=("max", "max"), count=("count", "sum")).reset_index()
    g["avg"] = g["_w"] / g["count"].where(g["count"] > 0)
    return g.drop(columns="_w")[[*keys, "min", "avg", "max", "count"]]


def rebin(df: pd.DataFrame, series: int, max_rows: int = MAX_CHART_ROWS, min_bins: int = 2) -> pd.DataFrame:
    """Coarsen `bucket` so that `series` × time bins ≤ `max_rows` (adds column `t`)."""
    if df.empty:
        return df.assign(t=df["bucket"])
    start, end = df["bucket"].min(), df["bucket"].max()
    step = int(df.attrs.get("bucket_seconds") or 1)
    bins_now = int((end - start).total_seconds() // step) + 1
    allowed = max(min_bins, max_rows // max(series, 1))
    if bins_now > allowed:
        span = (end - start).total_seconds() + step
        step = next((b for b in NICE_BUCKETS_S if b >= span / allowed and b >= step),
                    int(math.ceil(span / allowed)))
    out = df.assign(t=df["bucket"].dt.floor(f"{step}s"))
    out.attrs["bucket_seconds"] = step
    return out


def metric_frame(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    out = df[df["metric"] == metric]
    out.attrs.update(df.attrs)
    return out


def per_gpu(df: pd.DataFrame) -> pd.DataFrame:
    """One row per GPU with window min/avg/max of each metric (columns like `GPU_UTIL_max`)."""
    if df.empty:
        return pd.DataFrame(columns=["uuid", "hostname", "gpu_index", "gpu"])
    keys = ["uuid", "hostname", "gpu_index", "gpu"]
    w = _weighted(df, [*keys, "metric"])
    w["metric"] = w["metric"].map(short)
    # pivot on one row number per GPU: a pivot on the four label columns with dropna=False (kept so that a GPU
    # without an index stays) would fill in their cartesian product, one row per uuid x hostname x index x label
    w["_row"] = w.groupby(keys, sort=True, dropna=False).ngroup()
    wide = w.pivot_table(index="_row", columns="metric", values=["min", "avg", "max", "count"], dropna=False)
    wide.columns = [f"{m}_{stat}" for stat, m in wide.columns]
    labels = w.drop_duplicates("_row").set_index("_row")[keys]
    last = df.groupby("uuid")["bucket"].max().rename("last_bucket")
    return labels.join(wide).sort_index().reset_index(drop=True).merge(last, on="uuid", how="left")


# -- tables --------------------------------------------------------------------------------------
def idle_gpus(df: pd.DataFrame, threshold: float = 5.0, *, window_s: float | None = None) -> pd.DataFrame:
    """The waste report: GPUs whose utilization never reached `threshold` % in the window."""
    cols = ["gpu", "hostname", "gpu_index", "uuid", "max_util", "avg_util", "avg_power_w", "avg_fb_used_mib",
            "idle_hours"]
    g = per_gpu(df)
    if g.empty or f"{short(UTIL)}_max" not in g:
        return pd.DataFrame(columns=cols)
    idle = g[g[f"{short(UTIL)}_max"] < threshold].copy()
    idle["max_util"] = idle[f"{short(UTIL)}_max"]
    idle["avg_util"] = idle[f"{short(UTIL)}_avg"].round(2)
    idle["avg_power_w"] = idle.get(f"{short(POWER)}_avg", np.nan)
    idle["avg_fb_used_mib"] = idle.get(f"{short(FB_USED)}_avg", np.nan)
    hours = (window_s or (df["bucket"].max() - df["bucket"].min()).total_seconds()
             + float(df.attrs.get("bucket_seconds") or 0)) / 3600
    idle["idle_hours"] = round(hours, 3)
    idle = idle.round({"avg_power_w": 1, "avg_fb_used_mib": 0})
    return idle[cols].sort_values(["hostname", "gpu_index"]).reset_index(drop=True)


def hottest_gpus(df: pd.DataFrame, n: int = 10) -> pd.DataFrame:
    """GPUs with the highest peak temperature in the window (with their power and utilization)."""
    cols = ["gpu", "hostname", "gpu_index", "uuid", "max_temp_c", "avg_temp_c", "max_power_w", "avg_util"]
    g = per_gpu(df)
    if g.empty or f"{short(TEMP)}_max" not in g:
        return pd.DataFrame(columns=cols)
    out = pd.DataFrame({"gpu": g["gpu"], "hostname": g["hostname"], "gpu_index": g["gpu_index"], "uuid": g["uuid"],
                        "max_temp_c": g[f"{short(TEMP)}_max"], "avg_temp_c": g[f"{short(TEMP)}_avg"].round(1),
                        "max_power_w": g.get(f"{short(POWER)}_max", np.nan),
                        "avg_util": g.get(f"{short(UTIL)}_avg", pd.Series(np.nan, index=g.index)).round(1)})
    return out.sort_values(["max_temp_c", "avg_temp_c"], ascending=False).head(n).reset_index(drop=True)


def infer_interval(df: pd.DataFrame, metric: str = UTIL, default: float = 1.0) -> float:
    """The sampling interval: median over GPUs of (covered span / samples) of `metric`."""
    m = df[df["metric"] == metric]
    if m.empty:
        return default
    step = float(df.attrs.get("bucket_seconds") or 1)
    g = m.groupby("uuid").agg(first=("bucket", "min"), last=("bucket", "max"), n=("count", "sum"))
    g = g[g["n"] >= 2]
    if g.empty:
        return default
    spans = (g["last"] - g["first"]).dt.total_seconds() + step
    return float(max(np.median(spans / g["n"]), 0.001))


def stopped_reporting(gpus: Sequence[Gpu] | pd.DataFrame, *, interval_s: float, intervals: float = 3,
                      newest: datetime | None = None) -> pd.DataFrame:
    """GPUs whose `last_seen` is more than `intervals` × `interval_s` before the newest `last_seen`."""
    g = gpus if isinstance(gpus, pd.DataFrame) else gpus_frame(gpus)
    cols = ["gpu", "hostname", "gpu_index", "uuid", "last_seen", "behind_s"]
    if g.empty or g["last_seen"].isna().all():
        return pd.DataFrame(columns=cols)
    ref = pd.Timestamp(newest) if newest is not None else g["last_seen"].max()
    if ref.tzinfo is None:
        ref = ref.tz_localize("UTC")
    behind = (ref - g["last_seen"]).dt.total_seconds()
    out = g[behind > intervals * interval_s].assign(behind_s=behind.round(1))
    out = out.assign(gpu=[gpu_label(h, i) for h, i in zip(out["hostname"], out["gpu_index"], strict=True)])
    return out[cols].sort_values("behind_s", ascending=False).reset_index(drop=True)


def fleet_summary(loaded: dict, *, idle_threshold: float = 5.0, now_buckets: int = 1,
                  idle: pd.DataFrame | None = None) -> dict:
    """Headline numbers: GPUs and hosts (reporting in the window / known), utilization now, idle GPUs.

    `idle`: `idle_gpus(loaded["data"], idle_threshold)` when the caller has it already.
    """
    df = loaded["data"]
    util = metric_frame(df, UTIL)
    now_util = None
    if not util.empty:
        last = util.groupby("uuid")["bucket"].transform("max")
        recent = util[util["bucket"] >= last - pd.Timedelta(seconds=(now_buckets - 1) * loaded["bucket_s"])]
        w = _weighted(recent, ["uuid"])
        now_util = float(w["avg"].mean()) if not w.empty else None
    return {"gpus": len(loaded["all_gpus"]), "reporting_gpus": int(df["uuid"].nunique()) if not df.empty else 0,
            "hosts": len({g.hostname for g in loaded["all_gpus"]}),
            "reporting_hosts": int(df["hostname"].nunique()) if not df.empty else 0,
            "utilization_now": now_util,
            "idle_gpus": len(idle if idle is not None else idle_gpus(df, idle_threshold)),
            "start": loaded["start"], "end": loaded["end"], "bucket_s": loaded["bucket_s"]}


# -- charts --------------------------------------------------------------------------------------
def _empty_chart(text: str, width: int = 400, height: int = 60) -> alt.Chart:
    return alt.Chart(pd.DataFrame({"text": [text]})).mark_text(fontSize=14, color="#666").encode(
        text="text:N").properties(width=width, height=height)


def _time_title(step: int) -> str:
    return f"time (UTC, {step}s buckets)" if step < 120 else f"time (UTC, {step // 60} min buckets)"


def _time_x(r: pd.DataFrame) -> alt.X:
    """The time axis of a re-binned frame: UTC, labelled by the bin size, formatted for the span."""
    step = int(r.attrs.get("bucket_seconds", 1))
    span = (r["t"].max() - r["t"].min()).total_seconds() if len(r) else 0
    fmt = "%m-%d %H:%M" if span > 86400 else ("%H:%M:%S" if span < 300 else "%H:%M")
    return alt.X("t:T", title=_time_title(step), axis=alt.Axis(format=fmt, labelOverlap=True, tickCount=8),
                 scale=alt.Scale(type="utc"))


def utilization_heatmap(df: pd.DataFrame, metric: str = UTIL, *, max_rows: int = MAX_CHART_ROWS,
                        min_bins: int = 10, width: int = 640, max_height: int = 900, by: str = "gpu") -> alt.Chart:
    """GPU × time heatmap of `metric` (avg per cell); at most `max_rows` cells, GPUs cut when there are too many.

    `by="hostname"`: one row per host (the mean of its GPUs), the fleet view when GPU rows would not fit.
    """
    m = metric_frame(df, metric)
    if m.empty:
        return _empty_chart(f"no {short(metric)} data in the window")
    if by == "hostname":
        return _host_heatmap(m, metric, max_rows=max_rows, min_bins=min_bins, width=width, max_height=max_height)
    gpus = sorted(m["gpu"].unique())
    title = f"Fleet {short(metric)} ({UNITS.get(metric, '')})"
    if len(gpus) * min_bins > max_rows:  # too many GPUs even at the coarsest grid: show the busiest ones
        keep = _weighted(m, ["gpu"]).sort_values("avg", ascending=False)["gpu"].head(max_rows // min_bins)
        title += f": busiest {len(keep)} of {len(gpus)} GPUs"
        m = m[m["gpu"].isin(set(keep))]
        m.attrs.update(df.attrs)
        gpus = sorted(keep)
    r = rebin(m, len(gpus), max_rows, min_bins)
    cells = _weighted(r, ["gpu", "hostname", "t"])
    domain = [0, 100] if UNITS.get(metric) == "%" else alt.Undefined
    height = min(max_height, max(120, 9 * len(gpus)))
    readable = height / len(gpus) >= 7
    y_axis = alt.Axis(labelFontSize=8 if len(gpus) > 40 else 10) if readable else alt.Axis(labels=False, ticks=False)
    y_title = "GPU (host/index)" if readable else f"{len(gpus)} GPUs, by host/index (hover for names)"
    return alt.Chart(cells).mark_rect().encode(
        x=_time_x(r),
        y=alt.Y("gpu:N", title=y_title, sort=gpus, axis=y_axis),
        color=alt.Color("avg:Q", title=short(metric), scale=alt.Scale(scheme="viridis", domain=domain)),
        tooltip=["gpu:N", alt.Tooltip("t:T", format="%H:%M:%S"), alt.Tooltip("avg:Q", format=".1f"),
                 alt.Tooltip("max:Q", format=".1f")],
    ).properties(title=title, width=width, height=height)


def _host_heatmap(m: pd.DataFrame, metric: str, *, max_rows: int, min_bins: int, width: int,
                  max_height: int) -> alt.Chart:
    hosts = sorted(m["hostname"].unique())
    title = f"Fleet {short(metric)} ({UNITS.get(metric, '')}), mean per host"
    if len(hosts) * min_bins > max_rows:
        keep = _weighted(m, ["hostname"]).sort_values("avg", ascending=False)["hostname"].head(max_rows // min_bins)
        title += f": busiest {len(keep)} of {len(hosts)} hosts"
        attrs = m.attrs
        m = m[m["hostname"].isin(set(keep))]
        m.attrs.update(attrs)
        hosts = sorted(keep)
    r = rebin(m, len(hosts), max_rows, min_bins)
    cells = _weighted(r, ["hostname", "t"])
    domain = [0, 100] if UNITS.get(metric) == "%" else alt.Undefined
    height = min(max_height, max(120, 9 * len(hosts)))
    readable = height / len(hosts) >= 7
    y_axis = alt.Axis(labelFontSize=8 if len(hosts) > 40 else 10) if readable else alt.Axis(labels=False, ticks=False)
    return alt.Chart(cells).mark_rect().encode(
        x=_time_x(r),
        y=alt.Y("hostname:N", title="host" if readable else f"{len(hosts)} hosts", sort=hosts, axis=y_axis),
        color=alt.Color("avg:Q", title=short(metric), scale=alt.Scale(scheme="viridis", domain=domain)),
        tooltip=["hostname:N", alt.Tooltip("t:T", format="%H:%M:%S"), alt.Tooltip("avg:Q", format=".1f"),
                 alt.Tooltip("max:Q", format=".1f")],
    ).properties(title=title, width=width, height=height)


def utilization_per_host(df: pd.DataFrame, *, metric: str = UTIL, max_rows: int = MAX_CHART_ROWS,
                         width: int = 640, lines: bool = True, max_hosts: int | None = None) -> alt.Chart:
    """Mean utilization per host over time (lines, unless `lines=False` or > 20 hosts), next to each host's
    window mean (bars); with more than `max_hosts` hosts the bars show the busiest and the idlest half each."""
    m = metric_frame(df, metric)
    if m.empty:
        return _empty_chart(f"no {short(metric)} data in the window")
    hosts = sorted(m["hostname"].unique())
    bars_data = _weighted(m, ["hostname"]).sort_values("avg", ascending=False)
    title = f"{short(metric)} per host (window mean)"
    if max_hosts and len(bars_data) > max_hosts:
        half = max_hosts // 2
        title += f": busiest {half} and idlest {max_hosts - half} of {len(bars_data)} hosts"
        bars_data = pd.concat([bars_data.head(half), bars_data.tail(max_hosts - half)])
    bars = alt.Chart(bars_data).mark_bar().encode(
        x=alt.X("avg:Q", title=f"mean {short(metric)} (%)", scale=alt.Scale(domain=[0, 100])),
        y=alt.Y("hostname:N", sort="-x", title=None),
        tooltip=["hostname:N", alt.Tooltip("avg:Q", format=".1f"), alt.Tooltip("max:Q", format=".0f")],
    ).properties(title=title, width=220, height=min(700, max(60, 16 * len(bars_data))))
    if len(hosts) > 20 or not lines:
        return bars
    r = rebin(m, len(hosts), max_rows)
    lines_data = _weighted(r, ["hostname", "t"])
    lines = alt.Chart(lines_data).mark_line(point=len(lines_data) < 200).encode(
        x=_time_x(r),
        y=alt.Y("avg:Q", title=f"mean {short(metric)} (%)", scale=alt.Scale(domain=[0, 100])),
        color=alt.Color("hostname:N", title="host"),
        tooltip=["hostname:N", alt.Tooltip("t:T", format="%H:%M:%S"), alt.Tooltip("avg:Q", format=".1f")],
    ).properties(title=f"{short(metric)} per host over time", width=width - 300, height=220)
    return alt.hconcat(lines, bars)


def temperature_vs_power(df: pd.DataFrame, *, max_rows: int = MAX_CHART_ROWS, width: int = 420) -> alt.Chart:
    """Scatter of average temperature vs average power, one point per (GPU, time bin), colored by utilization."""
    need = df[df["metric"].isin([TEMP, POWER, UTIL])]
    if need.empty or not {TEMP, POWER} <= set(need["metric"]):
        return _empty_chart("no temperature/power data in the window")
    need.attrs.update(df.attrs)
    r = rebin(need, need["uuid"].nunique(), max_rows, min_bins=1)
    w = _weighted(r, ["gpu", "hostname", "t", "metric"])
    wide = w.pivot_table(index=["gpu", "hostname", "t"], columns="metric", values="avg", observed=True).reset_index()
    wide = wide.dropna(subset=[TEMP, POWER]).rename(columns={TEMP: "temp_c", POWER: "power_w", UTIL: "util"})
    if "util" not in wide:
        wide["util"] = np.nan
    if len(wide) > max_rows:
        wide = wide.sample(max_rows, random_state=0)
    return alt.Chart(wide[["gpu", "hostname", "t", "temp_c", "power_w", "util"]]).mark_circle(
        size=24, opacity=0.6).encode(
        x=alt.X("power_w:Q", title="power (W)"), y=alt.Y("temp_c:Q", title="temperature (°C)",
                                                         scale=alt.Scale(zero=False)),
        color=alt.Color("util:Q", title="GPU_UTIL", scale=alt.Scale(scheme="viridis", domain=[0, 100])),
        tooltip=["gpu:N", alt.Tooltip("t:T", format="%H:%M:%S"), alt.Tooltip("power_w:Q", format=".0f"),
                 alt.Tooltip("temp_c:Q", format=".1f"), alt.Tooltip("util:Q", format=".0f")],
    ).properties(title="Temperature vs power (per GPU and time bin)", width=width, height=300)


def framebuffer_chart(df: pd.DataFrame, *, max_rows: int = MAX_CHART_ROWS, width: int = 640,
                      max_hosts: int = 12) -> alt.Chart:
    """Framebuffer memory used (GiB), summed per host, stacked over time (the busiest `max_hosts` hosts)."""
    m = metric_frame(df, FB_USED)
    if m.empty:
        return _empty_chart("no framebuffer data in the window")
    per_host = _weighted(m, ["hostname"]).sort_values("avg", ascending=False)
    hosts = list(per_host["hostname"].head(max_hosts))
    title = "Framebuffer memory used per host (GiB, stacked)"
    if len(per_host) > max_hosts:
        title += f": top {max_hosts} of {len(per_host)} hosts"
    m = m[m["hostname"].isin(set(hosts))]
    m.attrs.update(df.attrs)
    r = rebin(m, len(hosts), max_rows)
    per_gpu_t = _weighted(r, ["hostname", "uuid", "t"])
    totals = per_gpu_t.groupby(["hostname", "t"], as_index=False)["avg"].sum()
    totals["gib"] = totals["avg"] / 1024
    return alt.Chart(totals[["hostname", "t", "gib"]]).mark_area(opacity=0.85).encode(
        x=_time_x(r),
        y=alt.Y("gib:Q", stack="zero", title="framebuffer used (GiB)"),
        color=alt.Color("hostname:N", title="host", sort=hosts),
        tooltip=["hostname:N", alt.Tooltip("t:T", format="%H:%M:%S"), alt.Tooltip("gib:Q", format=".1f")],
    ).properties(title=title, width=width, height=240)


def metric_distributions(df: pd.DataFrame, metrics: Sequence[str] | None = None, *, bins: int = 30,
                         columns: int = 3) -> alt.Chart:
    """Histogram per metric of bucket averages (pre-binned here: `bins` rows per metric)."""
    names = [m for m in (metrics or sorted(df["metric"].unique())) if (df["metric"] == m).any()]
    if not names:
        return _empty_chart("no data in the window")
    rows = []
    for name in names:
        m = df[df["metric"] == name]
        values, weights = m["avg"].to_numpy(float), m["count"].to_numpy(float)
        lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
        if hi <= lo:
            hi = lo + 1.0
        hist, edges = np.histogram(values, bins=bins, range=(lo, hi), weights=weights)
        unit = UNITS.get(name, "")
        for h, a, b in zip(hist, edges[:-1], edges[1:], strict=True):
            rows.append({"metric": f"{short(name)} ({unit})" if unit else short(name), "lo": a, "hi": b,
                         "samples": float(h)})
    data = pd.DataFrame(rows)
    return alt.Chart(data).mark_rect().encode(
        x=alt.X("lo:Q", title=None), x2="hi:Q", y=alt.Y("samples:Q", title="samples"), y2=alt.datum(0),
        tooltip=["metric:N", alt.Tooltip("lo:Q", format=".1f"), alt.Tooltip("hi:Q", format=".1f"),
                 alt.Tooltip("samples:Q", format=".0f")],
    ).properties(width=200, height=120).facet(facet=alt.Facet("metric:N", title=None), columns=columns).resolve_scale(
        x="independent", y="independent").properties(title="Distribution per metric (samples, by bucket average)")


def metric_timeseries(df: pd.DataFrame, metric: str, *, by: str = "gpu", max_series: int = 16,
                      max_rows: int = MAX_CHART_ROWS, width: int = 640) -> alt.Chart:
    """`metric` over time: avg line and min–max band per GPU (or per host with `by="hostname"`)."""
    m = metric_frame(df, metric)
    if m.empty:
        return _empty_chart(f"no {short(metric)} data in the window")
    series = _weighted(m, [by]).sort_values("avg", ascending=False)[by].head(max_series)
    m = m[m[by].isin(set(series))]
    m.attrs.update(df.attrs)
    r = rebin(m, len(series), max_rows // 2)
    w = _weighted(r, [by, "t"])
    unit = UNITS.get(metric, "")
    base = alt.Chart(w).encode(x=_time_x(r),
                               color=alt.Color(f"{by}:N", title="GPU" if by == "gpu" else "host"))
    line = base.mark_line().encode(y=alt.Y("avg:Q", title=f"{short(metric)} ({unit})" if unit else short(metric)),
                                   tooltip=[f"{by}:N", alt.Tooltip("t:T", format="%H:%M:%S"),
                                            alt.Tooltip("avg:Q", format=".1f"), alt.Tooltip("min:Q", format=".1f"),
                                            alt.Tooltip("max:Q", format=".1f")])
    per = "GPU" if by == "gpu" else "host"
    if len(series) > 3 or by != "gpu":  # bands of many series, or across a host's GPUs, only blur the lines
        return line.properties(title=f"{short(metric)} over time (mean per {per})", width=width, height=240)
    band = base.mark_area(opacity=0.15).encode(y="min:Q", y2="max:Q")
    title = f"{short(metric)} over time (mean per {per}, min–max band within each bucket)"
    return (band + line).properties(title=title, width=width, height=240)


def chart_rows(chart: alt.TopLevelMixin) -> int:
    """Total data rows embedded in a chart's spec (the thing Altair's MaxRowsError limits)."""
    spec = chart.to_dict()
    total = sum(len(v) for v in spec.get("datasets", {}).values())

    def walk(node):
        nonlocal total
        if isinstance(node, dict):
            if isinstance(node.get("data"), dict) and isinstance(node["data"].get("values"), list):
                total += len(node["data"]["values"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk({k: v for k, v in spec.items() if k != "datasets"})
    return total


def svg_spec(chart: alt.TopLevelMixin) -> str:
    """The Vega-Lite JSON `to_svg` renders: unvalidated and compact (Altair's indented, validated JSON costs as
    much as the rendering), without per-mark ARIA descriptions (a third of the work and two thirds of the SVG
    of a 3,000-cell heatmap)."""
    import json

    spec = chart.to_dict(validate=False)
    spec.setdefault("config", {}).setdefault("aria", False)
    return json.dumps(spec, separators=(",", ":"))


def svg_of(spec: str) -> str:
    """SVG of a Vega-Lite JSON spec, by vl-convert."""
    import vl_convert as vlc

    return vlc.vegalite_to_svg(spec)


def to_svg(chart: alt.TopLevelMixin) -> str:
    """Render a chart to SVG with vl-convert (no browser, no CDN): what the offline dashboard shows."""
    return svg_of(svg_spec(chart))


class SvgRenderer:
    """Renders charts to SVG in `workers` worker processes (`svg_worker`), several at once and beside the
    caller's own work: vl-convert holds the GIL while it renders, so in-process renders run one at a time.
    A worker that cannot start or dies is replaced; meanwhile that chart renders in this process."""

    def __init__(self, workers: int = 2):
        import threading
        from concurrent.futures import ThreadPoolExecutor

        self.workers = max(1, workers)
        self._threads = ThreadPoolExecutor(self.workers, thread_name_prefix="svg")
        self._local = threading.local()
        self._procs: list = []

    def _worker(self):
        import subprocess
        import sys

        proc = getattr(self._local, "proc", None)
        if proc is None or proc.poll() is not None:
            proc = subprocess.Popen([sys.executable, "-m", "telemetry_nb.analysis.svg_worker"],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            self._local.proc = proc
            self._procs.append(proc)
        return proc

    def _render(self, spec: str) -> str:
        data = spec.encode()
        try:
            proc = self._worker()
            proc.stdin.write(len(data).to_bytes(4, "big") + data)
            proc.stdin.flush()
            head = proc.stdout.read(5)
            if len(head) < 5:
                raise OSError("the SVG worker exited")
            body = proc.stdout.read(int.from_bytes(head[1:], "big")).decode()
        except (OSError, ValueError):
            self._local.proc = None
            return svg_of(spec)
        if head[:1] == b"E":
            raise ValueError(f"vl-convert: {body}")
        return body

    def submit(self, chart: alt.TopLevelMixin):
        """Start rendering `chart`: a future whose `.result()` is its SVG."""
        return self._threads.submit(self._render, svg_spec(chart))

    def warm(self) -> None:
        """Start the workers now (each loads vl-convert once, ~1 s) instead of at the first chart; once."""
        if self._procs:
            return
        tiny = alt.Chart(pd.DataFrame({"x": [0]})).mark_point().encode(x="x:Q")
        for _ in range(self.workers):
            self.submit(tiny)

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
        for proc in self._procs:
            if proc.poll() is None:
                proc.stdin.close()
                proc.terminate()
        self._procs.clear()


_RENDERER: SvgRenderer | None = None


def svg_renderer() -> SvgRenderer:
    """The process's shared `SvgRenderer` (two workers, or one on a one-core machine), closed at exit."""
    global _RENDERER
    if _RENDERER is None:
        import atexit
        import os

        _RENDERER = SvgRenderer(workers=min(2, os.cpu_count() or 1))
        atexit.register(_RENDERER.close)
    return _RENDERER

"""GPU accounting for notebooks and the dashboard: the usage report (`/api/v1/usage`) as pandas frames,
a chargeback/showback summary, per-group utilization over time, charts and the CSV/JSON report files."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path

import altair as alt
import pandas as pd

from telemetry_nb.analysis.client import TelemetryClient, UsageReport, format_ts, parse_ts
from telemetry_nb.timeparse import parse_duration

GROUP_BY = ("namespace", "pod", "hostname", "model_name")
UNATTRIBUTED = "(unattributed)"
USAGE_COLUMNS = ["group", "gpu_hours", "busy_gpu_hours", "idle_gpu_hours", "idle_share", "avg_util", "gpus"]


def check_parameters(*, group_by: str, start_time=None, end_time=None, window: str | float | None = None,
                     idle_threshold: float = 5.0) -> None:
    """Refuse bad notebook parameters up front, each message starting with the parameter's name."""
    if group_by not in GROUP_BY:
        raise ValueError(f"group_by: unknown grouping {group_by!r}; use one of {', '.join(GROUP_BY)}")
    start = parse_ts(format_ts(start_time)) if start_time else None
    end = parse_ts(format_ts(end_time)) if end_time else None
    if start and end and end < start:
        raise ValueError(f"end_time: {format_ts(end)} is before start_time {format_ts(start)}")
    if window is not None and not start_time:
        try:
            parse_duration(window)
        except ValueError as err:
            raise ValueError(f"window: {err}") from None
    if not 0 <= float(idle_threshold) <= 100:
        raise ValueError(f"idle_threshold: {idle_threshold} is not a utilization between 0 and 100")


def resolve_window(client: TelemetryClient, *, start_time=None, end_time=None, window: str | float | None = "24h"
                   ) -> tuple[datetime, datetime]:
    """(start, end): given times, else the window ending at `end_time` or at the newest stored sample."""
    if start_time and end_time:
        return parse_ts(format_ts(start_time)), parse_ts(format_ts(end_time))
    report = client.usage(start_time=start_time, end_time=end_time)  # the server's defaults: newest sample
    end = report.end_time
    if start_time:
        return parse_ts(format_ts(start_time)), end
    return end - timedelta(seconds=parse_duration(window or "24h")), end


def usage_frame(report: UsageReport) -> pd.DataFrame:
    """One row per group, largest GPU-hours first; the unattributed group is labelled `(unattributed)`."""
    rows = [{"group": i.group if i.group is not None else UNATTRIBUTED, "gpu_hours": i.gpu_hours,
             "busy_gpu_hours": i.busy_gpu_hours, "idle_gpu_hours": i.idle_gpu_hours,
             "idle_share": i.idle_gpu_hours / i.gpu_hours if i.gpu_hours else 0.0,
             "avg_util": i.avg_util, "gpus": i.gpus} for i in report.items]
    df = pd.DataFrame(rows, columns=USAGE_COLUMNS)
    return df.sort_values("gpu_hours", ascending=False, kind="stable").reset_index(drop=True)


def summary(report: UsageReport, df: pd.DataFrame) -> dict:
    """Totals of a report: fleet GPU-hours, busy/idle hours and shares, the unattributed share."""
    total = float(df["gpu_hours"].sum())
    unattributed = float(df.loc[df["group"] == UNATTRIBUTED, "gpu_hours"].sum())
    idle = float(df["idle_gpu_hours"].sum())
    return {"group_by": report.group_by, "start_time": format_ts(report.start_time),
            "end_time": format_ts(report.end_time), "idle_threshold": report.idle_threshold,
            "groups": int((df["group"] != UNATTRIBUTED).sum()), "gpu_hours": total,
            "busy_gpu_hours": float(df["busy_gpu_hours"].sum()), "idle_gpu_hours": idle,
            "idle_share": idle / total if total else 0.0,
            "unattributed_gpu_hours": unattributed, "unattributed_share": unattributed / total if total else 0.0}


def top_wasting(df: pd.DataFrame, n: int = 10) -> pd.DataFrame:
    """The `n` attributed groups with the most idle GPU-hours."""
    owned = df[(df["group"] != UNATTRIBUTED) & (df["idle_gpu_hours"] > 0)]
    return owned.sort_values(["idle_gpu_hours", "group"], ascending=[False, True]).head(n).reset_index(drop=True)


def usage_over_time(client: TelemetryClient, start: datetime, end: datetime, *, group_by: str = "namespace",
                    slices: int = 12, idle_threshold: float = 5.0) -> pd.DataFrame:
    """Per group and time slice (the window cut into `slices`): GPU-hours and average utilization."""
    width = (end - start) / max(1, slices)
    bounds = [(start + k * width, start + (k + 1) * width - timedelta(microseconds=1)) for k in range(slices)]
    bounds[-1] = (bounds[-1][0], end)

    def one(b: tuple[datetime, datetime]) -> list[dict]:
        r = client.usage(group_by, start_time=b[0], end_time=b[1], idle_threshold=idle_threshold)
        return [{"slice": b[0], "group": i.group if i.group is not None else UNATTRIBUTED,
                 "gpu_hours": i.gpu_hours, "avg_util": i.avg_util} for i in r.items]

    with ThreadPoolExecutor(max_workers=4) as pool:
        rows = [row for part in pool.map(one, bounds) for row in part]
    return pd.DataFrame(rows, columns=["slice", "group", "gpu_hours", "avg_util"])


def hours_chart(df: pd.DataFrame, *, title: str = "GPU-hours per group") -> alt.Chart:
    """Stacked bars per group: busy-but-not-idle vs idle GPU-hours (the rest of gpu_hours is 'active')."""
    long = pd.DataFrame({"group": list(df["group"]) * 2,
                         "kind": ["active"] * len(df) + ["idle"] * len(df),
                         "gpu_hours": list(df["gpu_hours"] - df["idle_gpu_hours"]) + list(df["idle_gpu_hours"])})
    return alt.Chart(long, title=title).mark_bar().encode(
        x=alt.X("gpu_hours:Q", title="GPU-hours"), y=alt.Y("group:N", sort="-x", title=None),
        color=alt.Color("kind:N", scale=alt.Scale(domain=["active", "idle"], range=["#4c78a8", "#e45756"])),
        tooltip=["group", "kind", alt.Tooltip("gpu_hours:Q", format=".2f")])


def utilization_chart(over_time: pd.DataFrame) -> alt.Chart:
    """Average utilization per group over the window's slices."""
    return alt.Chart(over_time, title="Average utilization per group").mark_line(point=True).encode(
        x=alt.X("slice:T", title=None), y=alt.Y("avg_util:Q", title="avg utilization (%)"),
        color=alt.Color("group:N"), tooltip=["group", "slice:T", alt.Tooltip("avg_util:Q", format=".1f")])


def write_report(report_path: str | Path, df: pd.DataFrame, totals: dict) -> tuple[Path, Path]:
    """`<report_path>.csv` (the usage table) and `<report_path>.json` (the summary); returns both paths."""
    base = Path(report_path)
    base = base.with_suffix("") if base.suffix in (".csv", ".json") else base
    base.parent.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = base.with_suffix(".csv"), base.with_suffix(".json")
    df.to_csv(csv_path, index=False)
    json_path.write_text(json.dumps(totals, indent=2, default=str))
    return csv_path, json_path

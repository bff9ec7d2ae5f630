"""Accounting routes: `GET /api/v1/usage` (GPU-hours, busy and idle GPU-hours per group) and
`GET /api/v1/workloads` (workloads seen in a window, their GPUs, first/last seen). Thin: the store computes."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from telemetry_nb.api.params import (
    EndTime,
    Namespace,
    ParamError,
    Pod,
    StartTime,
    WorkloadCursor,
    decode_workload_cursor,
    encode_workload_cursor,
    fill_window,
    time_window,
)
from telemetry_nb.store import Reader
from telemetry_nb.store import usage as accounting
from telemetry_nb.timeparse import format_rfc3339 as rfc3339

if TYPE_CHECKING:
    from telemetry_nb.api.routes import Store

BAD_PARAMS = {422: {"description": "a parameter is invalid; `detail` starts with its name"}}
DEFAULT_WINDOW = timedelta(hours=24)
MAX_WINDOW = timedelta(days=31)


class UsageItem(BaseModel):
    group: str | None = Field(description="namespace, namespace/pod, hostname or model name; null: unattributed")
    gpu_hours: float = Field(description="time the group's GPUs reported while attributed to it")
    busy_gpu_hours: float = Field(description="Σ utilization/100 × sample interval")
    idle_gpu_hours: float = Field(description="time with utilization under idle_threshold")
    avg_util: float | None = Field(description="100 × busy_gpu_hours / gpu_hours")
    gpus: int


class UsageReport(BaseModel):
    group_by: Literal["namespace", "pod", "hostname", "model_name"]
    start_time: str
    end_time: str
    idle_threshold: float
    items: list[UsageItem]


class WorkloadGpu(BaseModel):
    uuid: str
    hostname: str
    first_seen: str
    last_seen: str


class Workload(BaseModel):
    namespace: str
    pod: str
    container: str
    first_seen: str
    last_seen: str
    gpus: list[WorkloadGpu]


class WorkloadPage(BaseModel):
    start_time: str
    end_time: str
    items: list[Workload]
    next_cursor: str | None


def router(store: Store) -> APIRouter:
    """The accounting routes over the API's `Store` (a pooled connection per request); mounted under /api/v1."""
    api = APIRouter()

    def window(r: Reader, start_time: str | None, end_time: str | None) -> tuple[datetime, datetime]:
        start, end = fill_window(*time_window(start_time, end_time), r.newest, DEFAULT_WINDOW)
        if end - start > MAX_WINDOW:
            raise ParamError(f"start_time: the window {rfc3339(start)} to {rfc3339(end)} is {end - start}, longer "
                             f"than {MAX_WINDOW.days} days; ask for it in parts")
        return start, end

    @api.get("/usage", response_model=UsageReport, operation_id="get_usage", responses=BAD_PARAMS,
             summary="GPU-hours, busy and idle GPU-hours per namespace, pod, host or model in a window")
    def usage(group_by: Literal["namespace", "pod", "hostname", "model_name"] = "namespace",
              start_time: StartTime = None, end_time: EndTime = None,
              idle_threshold: Annotated[float, Query(ge=0, le=100)] = 5.0) -> UsageReport:
        with store.reader() as r:
            start, end = window(r, start_time, end_time)
            groups = accounting.usage(r.conn, start, end, group_by=group_by, idle_threshold=idle_threshold)
        return UsageReport(group_by=group_by, start_time=rfc3339(start), end_time=rfc3339(end),
                           idle_threshold=idle_threshold,
                           items=[UsageItem(group=g.group, gpu_hours=g.seconds / 3600,
                                            busy_gpu_hours=g.busy_seconds / 3600,
                                            idle_gpu_hours=g.idle_seconds / 3600, avg_util=g.avg_util,
                                            gpus=len(g.gpus or ())) for g in groups])

    @api.get("/workloads", response_model=WorkloadPage, operation_id="list_workloads", responses=BAD_PARAMS,
             summary="Workloads seen in a window with their GPUs and first/last seen, paginated")
    def list_workloads(namespace: Namespace = None, pod: Pod = None, start_time: StartTime = None,
                       end_time: EndTime = None, limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                       cursor: WorkloadCursor = None) -> WorkloadPage:
        after = decode_workload_cursor(cursor) if cursor else None
        with store.reader() as r:
            start, end = window(r, start_time, end_time)
            items = accounting.workloads(r.conn, start, end, namespace=namespace or None, pod=pod or None)
        if after is not None:
            items = [w for w in items if (w["namespace"], w["pod"], w["container"]) > after]
        more = len(items) > limit
        items = items[:limit]
        last = items[-1] if items else None
        return WorkloadPage(
            start_time=rfc3339(start), end_time=rfc3339(end),
            items=[Workload(namespace=w["namespace"], pod=w["pod"], container=w["container"],
                            first_seen=rfc3339(w["first_seen"]), last_seen=rfc3339(w["last_seen"]),
                            gpus=[WorkloadGpu(uuid=g["uuid"], hostname=g["hostname"],
                                              first_seen=rfc3339(g["first_seen"]),
                                              last_seen=rfc3339(g["last_seen"])) for g in w["gpus"]])
                   for w in items],
            next_cursor=encode_workload_cursor(last["namespace"], last["pod"], last["container"]) if more else None)

    return api

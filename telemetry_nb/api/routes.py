"""The /api/v1 routes: inventory, per-GPU telemetry and aggregates, metrics. Thin over `store.Reader`.

`build_v1_router` takes the store and the auth dependency; a new route goes into it and inherits both
(and the documented 401/503 answers).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import orjson
import psycopg
import psycopg_pool
from fastapi import APIRouter, Depends, HTTPException, Query, Response

from telemetry_nb.api import models
from telemetry_nb.api.params import (
    Bucket,
    EndTime,
    EventCursor,
    EventKind,
    EventUuid,
    FleetBucket,
    GpuCursor,
    Hostname,
    Hostnames,
    MetricName,
    Metrics,
    ModelName,
    ModelNames,
    ParamError,
    ParentUuid,
    StartTime,
    TelemetryCursor,
    Uuid,
    decode_event_cursor,
    decode_telemetry_cursor,
    encode_event_cursor,
    encode_telemetry_cursor,
    fill_window,
    parse_bucket,
    time_window,
)
from telemetry_nb.api.usage import router as usage_routes
from telemetry_nb.store import Reader

log = logging.getLogger(__name__)
MAX_FLEET_ELEMENTS = 1_000_000
DEFAULT_FLEET_WINDOW = timedelta(hours=1)
_OUTAGE_CLASSES = ("08", "53", "57", "58")  # connection, resources, operator intervention, system


class Store:
    """Readers over a connection pool; an unreachable or overloaded database is a 503, never a 500."""

    def __init__(self, pool: psycopg_pool.ConnectionPool, *, timeout_s: float = 5.0, retry_after_s: int = 1):
        self.pool, self.timeout_s = pool, timeout_s
        self.retry = {"Retry-After": str(retry_after_s)}
        self._metric_ids: dict[str, int] = {}

    def metric_ids(self, r: Reader, names: list[str]) -> dict[str, int]:
        """`r.metric_ids(names)`, remembered: a metric's id never changes once stored, and metrics are never
        deleted (a name not stored yet is asked again next time)."""
        known = {n: self._metric_ids[n] for n in names if n in self._metric_ids}
        if len(known) < len(set(names)):
            fresh = r.metric_ids([n for n in names if n not in known])
            if len(self._metric_ids) < 100_000:
                self._metric_ids.update(fresh)
            known.update(fresh)
        return known

    @contextmanager
    def reader(self) -> Iterator[Reader]:
        try:
            with self.pool.connection(timeout=self.timeout_s) as conn:
                yield Reader(conn, missing_schema_is_empty=True)
        except psycopg_pool.PoolTimeout as err:
            raise HTTPException(503, f"database unavailable: {err}", headers=self.retry) from None
        except psycopg.Error as err:
            state = err.sqlstate or ""
            first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
            if not state or state[:2] in _OUTAGE_CLASSES:
                raise HTTPException(503, f"database unavailable: {first_line}", headers=self.retry) from None
            if state.startswith("22"):  # a value PostgreSQL cannot use: the request's fault
                raise ParamError(f"request: the database refused a value: {first_line}") from None
            raise


_UTC_ZONES = frozenset({"UTC", "Etc/UTC", "Etc/UCT", "UCT", "Etc/Universal", "Universal", "Etc/Zulu", "Zulu"})


def _is_utc(tz: Any) -> bool:
    """Whether every time in zone `tz` is UTC (the session's time zone: one per connection)."""
    return tz is UTC or getattr(tz, "key", None) in _UTC_ZONES


def gpu_out(row: dict) -> dict[str, Any]:
    def utc(ts: datetime | None) -> datetime | None:
        return ts.astimezone(UTC) if ts is not None else None

    return {"uuid": row["uuid"], "hostname": row["hostname"], "gpu_index": row["gpu_index"],
            "device": row["device"], "model_name": row["model_name"],
            "first_seen": utc(row["first_seen"]), "last_seen": utc(row["last_seen"]),
            "pci_bus_id": row["pci_bus_id"], "driver_version": row["driver_version"], "labels": row["labels"] or {},
            "parent_uuid": row["parent_uuid"] or None, "mig_profile": row["mig_profile"] or None,
            "mig_instance": row["mig_instance"]}


def _gpu_and_metrics(store: Store, r: Reader, uuid: str, metric: list[str] | None
                     ) -> tuple[dict, dict[str, int] | None]:
    gpu = r.get_gpu(uuid)
    if gpu is None:
        raise HTTPException(404, f"GPU {uuid!r} not found")
    if not metric:
        return gpu, None
    ids = store.metric_ids(r, metric)
    unknown = [m for m in metric if m not in ids]
    if unknown:
        raise ParamError(f"metric: unknown metric(s) {', '.join(unknown)}; GET /api/v1/metrics lists them")
    return gpu, ids


def telemetry_json(store: Store, uuid: str, start_time: str | None, end_time: str | None,
                   metric: list[str] | None, limit: int, cursor: str | None) -> bytes:
    """The body of `GET /api/v1/gpus/{uuid}/telemetry` for parameters that passed their schemas."""
    start, end = time_window(start_time, end_time)
    after = decode_telemetry_cursor(cursor) if cursor else None
    with store.reader() as r:
        gpu, ids = _gpu_and_metrics(store, r, uuid, metric)
        rows = r.telemetry_tuples(gpu["id"], start=start, end=end,
                                  metric_ids=None if ids is None else list(ids.values()), after=after, limit=limit)
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = encode_telemetry_cursor(rows[-1][0], rows[-1][2]) if more else None
    utc = not rows or _is_utc(rows[0][0].tzinfo)
    body = {"gpu": gpu_out(gpu),
            "items": [{"timestamp": ts if utc else ts.astimezone(UTC), "metric": name, "value": value}
                      for ts, name, _, value in rows],
            "next_cursor": next_cursor}
    return orjson.dumps(body, option=orjson.OPT_UTC_Z)


NOT_FOUND = {404: models.error("no GPU with this uuid (or no such path)")}
BAD_PARAMS = {422: models.error("a parameter is invalid; `detail` starts with its name", models.ParamErrorBody)}
GPU_LINKS = {"links": {
    "GetGpu": {"operationId": "get_gpu", "parameters": {"uuid": "$response.body#/items/0/uuid"}},
    "GetTelemetry": {"operationId": "get_telemetry", "parameters": {"uuid": "$response.body#/items/0/uuid"}},
    "GetAggregate": {"operationId": "get_aggregate", "parameters": {"uuid": "$response.body#/items/0/uuid"}},
}}


def build_v1_router(store: Store, auth: Callable, *, auth_enabled: bool) -> APIRouter:
    """The /api/v1 routes over `store`, every one behind the `auth` dependency."""
    responses: dict[int | str, dict[str, Any]] = {
        503: models.error("the database is unreachable or overloaded; retry later")}
    if auth_enabled:
        responses[401] = models.error(
            "no bearer token, or one not accepted", headers={"WWW-Authenticate": {
                "description": "`Bearer` (no token) or `Bearer error=\"invalid_token\"`",
                "schema": {"type": "string"}}})
    router = APIRouter(prefix="/api/v1", dependencies=[Depends(auth)], responses=responses)

    @router.get("/gpus", summary="GPU inventory, cursor-paginated by uuid", operation_id="list_gpus",
                responses={**BAD_PARAMS, 200: GPU_LINKS})
    def list_gpus(hostname: Hostname = None, model_name: ModelName = None,
                  limit: Annotated[int, Query(ge=1, le=1000, description="page size")] = 100,
                  cursor: GpuCursor = None, parent_uuid: ParentUuid = None) -> models.GpuPage:
        with store.reader() as r:
            rows = r.list_gpus(hostname=hostname, model_name=model_name, after=cursor or None, limit=limit,
                               parent_uuid=parent_uuid or None)
        more = len(rows) > limit
        rows = rows[:limit]
        return models.GpuPage(items=[gpu_out(g) for g in rows], next_cursor=rows[-1]["uuid"] if more else None)

    @router.get("/gpus/{uuid}", summary="One GPU", operation_id="get_gpu", responses={**NOT_FOUND, **BAD_PARAMS})
    def get_gpu(uuid: Uuid) -> models.Gpu:
        with store.reader() as r:
            gpu = r.get_gpu(uuid)
        if gpu is None:
            raise HTTPException(404, f"GPU {uuid!r} not found")
        return models.Gpu(**gpu_out(gpu))

    @router.get("/gpus/{uuid}/telemetry", summary="Telemetry of one GPU in a time range, by timestamp",
                operation_id="get_telemetry", responses={**NOT_FOUND, **BAD_PARAMS},
                response_model=models.TelemetryPage)
    def telemetry(uuid: Uuid, start_time: StartTime = None, end_time: EndTime = None, metric: Metrics = None,
                  limit: Annotated[int, Query(ge=1, le=10000, description="page size")] = 1000,
                  cursor: TelemetryCursor = None) -> Response:
        # the hot route, serialized straight to JSON (what pydantic would write for models.TelemetryPage);
        # a plainly valid request does not even get here: `hotpath.HotTelemetry` answers it with the same function
        return Response(telemetry_json(store, uuid, start_time, end_time, metric, limit, cursor),
                        media_type="application/json")

    @router.get("/gpus/{uuid}/telemetry/aggregate", summary="Per-bucket min/avg/max/count, computed in SQL",
                operation_id="get_aggregate", responses={**NOT_FOUND, **BAD_PARAMS})
    def aggregate(uuid: Uuid, metric: Metrics = None, bucket: Bucket = "1m", start_time: StartTime = None,
                  end_time: EndTime = None) -> models.Aggregate:
        start, end = time_window(start_time, end_time)
        seconds = parse_bucket(bucket)
        with store.reader() as r:
            gpu, ids = _gpu_and_metrics(store, r, uuid, metric)
            if ids is None:
                ids = r.metric_ids(r.metric_names())
            rows = r.aggregate(gpu["id"], list(ids.values()), timedelta(seconds=seconds), start=start, end=end)
        return models.Aggregate(gpu=gpu_out(gpu), bucket_seconds=seconds,
                                items=[{"bucket": a["bucket"].astimezone(UTC), "metric": a["metric"],
                                        "min": a["min"], "avg": float(a["avg"]), "max": a["max"],
                                        "count": a["count"]} for a in rows])

    @router.get("/fleet/aggregate", summary="One metric's per-bucket min/avg/max/count for every selected GPU",
                operation_id="get_fleet_aggregate", responses=BAD_PARAMS, response_model=models.FleetAggregate)
    def fleet_aggregate(metric: Annotated[MetricName, Query(description="the metric")],
                        bucket: FleetBucket = "15m", start_time: StartTime = None, end_time: EndTime = None,
                        hostname: Hostnames = None, model_name: ModelNames = None) -> Response:
        start, end = time_window(start_time, end_time)
        seconds = parse_bucket(bucket)
        width = timedelta(seconds=seconds)
        with store.reader() as r:
            ids = store.metric_ids(r, [metric])
            if metric not in ids:
                raise ParamError(f"metric: unknown metric {metric}; GET /api/v1/metrics lists them")
            gpu_ids = r.gpu_ids(hostnames=hostname, model_names=model_name)
            start, end = fill_window(start, end, r.newest, DEFAULT_FLEET_WINDOW)
            buckets = int((end - start) / width) + 1
            if len(gpu_ids) * buckets > MAX_FLEET_ELEMENTS:
                raise ParamError(f"bucket: {bucket} over {end - start} for {len(gpu_ids)} GPUs would return up to "
                                 f"{len(gpu_ids) * buckets:,} elements, more than {MAX_FLEET_ELEMENTS:,}; "
                                 "use a larger bucket, a shorter window or a hostname/model_name filter")
            res, rows = r.buckets([ids[metric]], width, start=start, end=end,
                                  gpu_ids=gpu_ids if hostname or model_name else None)
        utc = not rows or _is_utc(rows[0]["bucket"].tzinfo)
        body = {"metric": metric, "bucket_seconds": seconds, "resolution": res, "uuid": [a["uuid"] for a in rows],
                "bucket": [a["bucket"] if utc else a["bucket"].astimezone(UTC) for a in rows],
                "min": [a["min"] for a in rows], "avg": [a["sum"] / a["count"] for a in rows],
                "max": [a["max"] for a in rows], "count": [a["count"] for a in rows]}
        # serialized by orjson directly (what pydantic writes for models.FleetAggregate): FastAPI's generic path
        # costs ~1.5 s per 100,000 elements
        return Response(orjson.dumps(body, option=orjson.OPT_UTC_Z), media_type="application/json")

    @router.get("/events", summary="GPU events (XID errors), cursor-paginated by time", operation_id="list_events",
                responses=BAD_PARAMS)
    def list_events(uuid: EventUuid = None, kind: EventKind = None, start_time: StartTime = None,
                    end_time: EndTime = None,
                    limit: Annotated[int, Query(ge=1, le=1000, description="page size")] = 100,
                    cursor: EventCursor = None) -> models.EventPage:
        start, end = time_window(start_time, end_time)
        after = decode_event_cursor(cursor) if cursor else None
        with store.reader() as r:
            rows = r.events(uuid=uuid or None, kind=kind or None, start=start, end=end, after=after, limit=limit)
        more = len(rows) > limit
        rows = rows[:limit]
        last = rows[-1] if rows else None
        return models.EventPage(
            items=[models.Event(timestamp=e["ts"].astimezone(UTC), uuid=e["uuid"], hostname=e["hostname"],
                                kind=e["kind"], code=e["code"], message=e["message"]) for e in rows],
            next_cursor=encode_event_cursor(last["ts"], last["gpu_id"], last["kind"]) if more and last else None)

    @router.get("/metrics", summary="Metric names present, with row counts kept by the collectors",
                operation_id="list_metrics")
    def list_metrics() -> models.MetricList:
        with store.reader() as r:
            rows = r.metric_counts()
        return models.MetricList(items=[{"name": m["name"], "rows": m["rows"]} for m in rows])

    router.include_router(usage_routes(store))
    return router

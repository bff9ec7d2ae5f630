"""The API gateway: a FastAPI app over `store` (and `queue` for readiness); routes stay thin."""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

import psycopg
import psycopg_pool
import redis
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field

from telemetry_nb import __version__
from telemetry_nb.pipeline.streams import connect as redis_connect
from telemetry_nb.store import Reader
from telemetry_nb.timeparse import format_rfc3339 as rfc3339
from telemetry_nb.timeparse import parse_duration, parse_timestamp

log = logging.getLogger(__name__)
MAX_FLEET_ELEMENTS = 1_000_000
DEFAULT_FLEET_WINDOW = timedelta(hours=1)


class FleetAggregate(BaseModel):
    """Per-(GPU, bucket) aggregates of one metric over the fleet, as parallel arrays ordered by uuid, bucket."""

    metric: str
    bucket_seconds: float
    resolution: Literal["raw", "1m", "1h"] = Field(description="where closed buckets came from: raw samples or "
                                                               "the 1-minute / 1-hour rollup")
    uuid: list[str]
    bucket: list[str] = Field(description="bucket start, RFC 3339")
    min: list[float]
    avg: list[float]
    max: list[float]
    count: list[int]


class ParamError(ValueError):
    """A query parameter that cannot be used; the message starts with the parameter's name."""


def parse_time(name: str, text: str | None) -> datetime | None:
    """RFC 3339 (`Z` or an offset; a time without one is taken as UTC) → aware datetime."""
    if text is None or text == "":
        return None
    try:
        return parse_timestamp(text)
    except ValueError:
        raise ParamError(f"{name}: unparsable time {text!r}; use RFC 3339, e.g. 2025-07-18T20:42:34Z") from None


def _encode_cursor(obj: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj, separators=(",", ":")).encode()).decode().rstrip("=")


def _decode_cursor(text: str) -> object:
    try:
        return json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (ValueError, TypeError):
        raise ParamError(f"cursor: invalid cursor {text!r}; pass back the next_cursor of a previous page") from None


def _gpu_out(row: dict) -> dict:
    return {"uuid": row["uuid"], "hostname": row["hostname"], "gpu_index": row["gpu_index"],
            "device": row["device"], "model_name": row["model_name"],
            "first_seen": rfc3339(row["first_seen"]), "last_seen": rfc3339(row["last_seen"])}


def create_app(database_url: str, redis_url: str | None = None, *, pool_size: int = 8) -> FastAPI:
    """The API over the database at `database_url`; `redis_url` is used only by /ready."""
    pool = psycopg_pool.ConnectionPool(database_url, min_size=1, max_size=pool_size, open=False,
                                       kwargs={"autocommit": True, "connect_timeout": 5}, name="api")
    redis_client = redis_connect(redis_url, timeout_s=3) if redis_url else None
    registry = CollectorRegistry()
    requests_total = Counter("api_requests", "HTTP requests", ["route", "status"], registry=registry)
    latency = Histogram("api_request_seconds", "HTTP request latency", ["route"], registry=registry)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        pool.open(wait=False)
        yield
        pool.close()

    app = FastAPI(title="telemetry-nb API", version=__version__, lifespan=lifespan,
                  description="GPU inventory and per-GPU DCGM telemetry stored by telemetry-nb collectors.")

    @contextmanager
    def reader() -> Iterator[Reader]:
        try:
            with pool.connection(timeout=5) as conn:
                yield Reader(conn)
        except (psycopg_pool.PoolTimeout, psycopg.OperationalError) as err:
            raise HTTPException(503, f"database unavailable: {str(err).strip().splitlines()[0]}") from None

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        requests_total.labels(path, str(response.status_code)).inc()
        latency.labels(path).observe(time.perf_counter() - started)
        return response

    @app.exception_handler(ParamError)
    async def param_error(request: Request, exc: ParamError):
        return JSONResponse(status_code=422, content={"detail": str(exc)})

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        messages = []
        for err in exc.errors():
            name = ".".join(str(p) for p in err.get("loc", ())[1:]) or "request"
            messages.append(f"{name}: {err.get('msg')}")
        return JSONResponse(status_code=422, content={"detail": "; ".join(messages),
                                                      "errors": json.loads(json.dumps(exc.errors(), default=str))})

    @app.get("/health", summary="Liveness: the process answers")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready", summary="Readiness: Redis and PostgreSQL reachable")
    def ready():
        failed, detail = [], {}
        try:
            with pool.connection(timeout=3) as conn:
                conn.execute("SELECT 1")
            detail["postgresql"] = "ok"
        except Exception as err:  # noqa: BLE001 (any failure means not ready)
            failed.append("postgresql")
            detail["postgresql"] = f"{type(err).__name__}: {str(err).strip()[:200]}"
        if redis_client is not None:
            try:
                redis_client.ping()
                detail["redis"] = "ok"
            except redis.RedisError as err:
                failed.append("redis")
                detail["redis"] = f"{type(err).__name__}: {str(err).strip()[:200]}"
        body = {"status": "ready" if not failed else "not ready", "failed": failed, "checks": detail}
        if failed:
            body["detail"] = f"not ready: {', '.join(failed)} unreachable"
        return JSONResponse(status_code=503 if failed else 200, content=body)

    @app.get("/metrics", summary="Prometheus metrics of this service", response_class=Response)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/v1/gpus", summary="GPU inventory, cursor-paginated by uuid")
    def list_gpus(hostname: str | None = None, model_name: str | None = None,
                  limit: Annotated[int, Query(ge=1, le=1000)] = 100, cursor: str | None = None) -> dict:
        after = _decode_cursor(cursor) if cursor else None
        if after is not None and not isinstance(after, str):
            raise ParamError("cursor: invalid cursor for /api/v1/gpus")
        with reader() as r:
            rows = r.list_gpus(hostname=hostname, model_name=model_name, after=after, limit=limit)
        more = len(rows) > limit
        rows = rows[:limit]
        return {"items": [_gpu_out(g) for g in rows],
                "next_cursor": _encode_cursor(rows[-1]["uuid"]) if more else None}

    @app.get("/api/v1/gpus/{uuid}", summary="One GPU")
    def get_gpu(uuid: str) -> dict:
        with reader() as r:
            gpu = r.get_gpu(uuid)
        if gpu is None:
            raise HTTPException(404, f"GPU {uuid!r} not found")
        return _gpu_out(gpu)

    def _gpu_and_metrics(r: Reader, uuid: str, metric: list[str] | None) -> tuple[dict, dict[str, int] | None]:
        gpu = r.get_gpu(uuid)
        if gpu is None:
            raise HTTPException(404, f"GPU {uuid!r} not found")
        if not metric:
            return gpu, None
        ids = r.metric_ids(metric)
        unknown = [m for m in metric if m not in ids]
        if unknown:
            raise ParamError(f"metric: unknown metric(s) {', '.join(unknown)}; GET /api/v1/metrics lists them")
        return gpu, ids

    def _window(start_time: str | None, end_time: str | None) -> tuple[datetime | None, datetime | None]:
        start, end = parse_time("start_time", start_time), parse_time("end_time", end_time)
        if start and end and end < start:
            raise ParamError(f"end_time: {end_time} is before start_time {start_time}")
        return start, end

    @app.get("/api/v1/gpus/{uuid}/telemetry", summary="Telemetry of one GPU in a time range, by timestamp")
    def telemetry(uuid: str, start_time: str | None = None, end_time: str | None = None,
                  metric: Annotated[list[str] | None, Query()] = None,
                  limit: Annotated[int, Query(ge=1, le=10000)] = 1000, cursor: str | None = None) -> dict:
        start, end = _window(start_time, end_time)
        after = None
        if cursor:
            c = _decode_cursor(cursor)
            if not (isinstance(c, list) and len(c) == 2 and isinstance(c[1], int)):
                raise ParamError("cursor: invalid cursor for this endpoint")
            after = (parse_time("cursor", c[0]), c[1])
        with reader() as r:
            gpu, ids = _gpu_and_metrics(r, uuid, metric)
            rows = r.telemetry(gpu["id"], start=start, end=end, metric_ids=None if ids is None else list(ids.values()),
                               after=after, limit=limit)
        more = len(rows) > limit
        rows = rows[:limit]
        next_cursor = _encode_cursor([rows[-1]["timestamp"].isoformat(), rows[-1]["metric_id"]]) if more else None
        return {"gpu": _gpu_out(gpu),
                "items": [{"timestamp": rfc3339(t["timestamp"]), "metric": t["metric"], "value": t["value"]}
                          for t in rows],
                "next_cursor": next_cursor}

    @app.get("/api/v1/gpus/{uuid}/telemetry/aggregate", summary="Per-bucket min/avg/max/count, computed in SQL")
    def aggregate(uuid: str, metric: Annotated[list[str] | None, Query()] = None, bucket: str = "1m",
                  start_time: str | None = None, end_time: str | None = None) -> dict:
        start, end = _window(start_time, end_time)
        try:
            seconds = parse_duration(bucket)
        except ValueError as err:
            raise ParamError(f"bucket: {err}") from None
        if seconds < 1:
            raise ParamError("bucket: must be at least 1s")
        with reader() as r:
            gpu, ids = _gpu_and_metrics(r, uuid, metric)
            if ids is None:
                ids = r.metric_ids(r.metric_names())
            rows = r.aggregate(gpu["id"], list(ids.values()), timedelta(seconds=seconds), start=start, end=end)
        return {"gpu": _gpu_out(gpu), "bucket_seconds": seconds,
                "items": [{"bucket": rfc3339(a["bucket"]), "metric": a["metric"], "min": a["min"],
                           "avg": float(a["avg"]), "max": a["max"], "count": a["count"]} for a in rows]}

    @app.get("/api/v1/fleet/aggregate", summary="One metric's per-bucket min/avg/max/count for every selected GPU",
             response_model=FleetAggregate)
    def fleet_aggregate(metric: str, bucket: str = "15m", start_time: str | None = None,
                        end_time: str | None = None, hostname: Annotated[list[str] | None, Query()] = None,
                        model_name: Annotated[list[str] | None, Query()] = None) -> FleetAggregate:
        start, end = _window(start_time, end_time)
        try:
            seconds = parse_duration(bucket)
        except ValueError as err:
            raise ParamError(f"bucket: {err}") from None
        if seconds < 1:
            raise ParamError("bucket: must be at least 1s")
        width = timedelta(seconds=seconds)
        with reader() as r:
            ids = r.metric_ids([metric])
            if metric not in ids:
                raise ParamError(f"metric: unknown metric {metric}; GET /api/v1/metrics lists them")
            gpu_ids = r.gpu_ids(hostnames=hostname, model_names=model_name)
            if end is None:
                newest = r.newest()
                end = newest if newest is not None and (start is None or newest >= start) else \
                    (start + DEFAULT_FLEET_WINDOW if start else datetime.now(UTC))
            if start is None:
                start = end - DEFAULT_FLEET_WINDOW
            buckets = int((end - start) / width) + 1
            if len(gpu_ids) * buckets > MAX_FLEET_ELEMENTS:
                raise ParamError(f"bucket: {bucket} over {end - start} for {len(gpu_ids)} GPUs would return up to "
                                 f"{len(gpu_ids) * buckets:,} elements, more than {MAX_FLEET_ELEMENTS:,}; "
                                 "use a larger bucket, a shorter window or a hostname/model_name filter")
            res, rows = r.buckets([ids[metric]], width, start=start, end=end,
                                  gpu_ids=gpu_ids if hostname or model_name else None)
        return FleetAggregate(metric=metric, bucket_seconds=seconds, resolution=res,
                              uuid=[a["uuid"] for a in rows], bucket=[rfc3339(a["bucket"]) for a in rows],
                              min=[a["min"] for a in rows], avg=[a["sum"] / a["count"] for a in rows],
                              max=[a["max"] for a in rows], count=[a["count"] for a in rows])

    from telemetry_nb.api.usage import router as usage_router  # imports this module's helpers

    app.include_router(usage_router(reader))

    @app.get("/api/v1/metrics", summary="Metric names present, with row counts")
    def list_metrics() -> dict:
        with reader() as r:
            rows = r.metric_counts()
        return {"items": [{"name": m["name"], "rows": m["rows"]} for m in rows]}

    return app

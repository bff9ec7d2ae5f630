"""The API gateway: a FastAPI app over `store` (and Redis for readiness): service routes, error bodies, metrics.

The data routes live in `routes.py` (the /api/v1 router, behind the bearer-token dependency); the
parameter schemas in `params.py`; the response schemas in `models.py`.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import time
from collections.abc import Mapping
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import anyio.to_thread
import psycopg_pool
import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from telemetry_nb import __version__
from telemetry_nb.api import models
from telemetry_nb.api.auth import Tokens, bearer_auth
from telemetry_nb.api.hotpath import ROUTE_PATH, HotTelemetry
from telemetry_nb.api.limits import ApiLimits, Gate, GateState
from telemetry_nb.api.params import ParamError
from telemetry_nb.api.routes import Store, build_v1_router
from telemetry_nb.pipeline.streams import REDIS_ERRORS, redis_probe
from telemetry_nb.store import Reader

log = logging.getLogger(__name__)

_FRIENDLY = {"string_pattern_mismatch": "must not contain NUL or other control characters (or is malformed)"}


def _validation_detail(exc: RequestValidationError) -> str:
    """`name: message; …` for every violation, the parameter's name first (what clients and tests key on)."""
    messages = []
    for err in exc.errors():
        name = ".".join(str(p) for p in err.get("loc", ())[1:]) or "request"
        msg = err.get("msg", "invalid")
        if err.get("type") in _FRIENDLY:
            msg = f"{_FRIENDLY[err['type']]}: {msg}"
        messages.append(f"{name}: {msg}")
    return "; ".join(messages)


def create_app(database_url: str, redis_url: str | None = None, *, pool_size: int | None = None,
               tokens: Tokens | None = None, env: Mapping[str, str] | None = None,
               limits: ApiLimits | None = None) -> FastAPI:
    """The API over the database at `database_url`; `redis_url` is used only by /ready.

    `tokens` (default: from TELEMETRY_API_TOKENS / TELEMETRY_API_TOKENS_FILE in `env`) guards /api/v1.
    `limits` (default: `ApiLimits.from_env(env)`; `pool_size` overrides its connections) bound the
    connections and the requests waiting for one (the rest get a fast 503).
    """
    if tokens is None:
        tokens = Tokens.from_env(env)
    if limits is None:
        limits = ApiLimits.from_env(env)
    if pool_size is not None:
        limits = replace(limits, pool_size=pool_size)
    pool = psycopg_pool.ConnectionPool(database_url, min_size=1, max_size=limits.pool_size, open=False,
                                       kwargs={"autocommit": True, "connect_timeout": 5}, name="api")
    # on a Redis Cluster the probe asks the node of every stream partition (TELEMETRY_STREAM_PARTITIONS)
    stream_env = os.environ if env is None else env
    redis_ready = redis_probe(redis_url, 3, stream_env.get("TELEMETRY_STREAM") or "telemetry",
                              int(stream_env.get("TELEMETRY_STREAM_PARTITIONS") or 1)) if redis_url else None
    store = Store(pool, retry_after_s=limits.retry_after_s)
    registry = CollectorRegistry()
    requests_total = Counter("api_requests", "HTTP requests", ["route", "status"], registry=registry)
    latency = Histogram("api_request_seconds", "HTTP request latency", ["route"], registry=registry)
    labelled: dict[tuple[str, int], tuple[Any, Any]] = {}
    gate = GateState()
    Gauge("api_requests_running", "/api/v1 requests holding a database slot", registry=registry
          ).set_function(lambda: gate.running)
    Gauge("api_requests_waiting", "/api/v1 requests waiting for a database slot", registry=registry
          ).set_function(lambda: gate.waiting)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if tokens is not None:
            log.info("API /api/v1 requires a bearer token: %s", tokens.describe())
        pool.open(wait=False)
        # one thread per connection (the gate lets no more /api/v1 requests run), two for /health, /ready, /metrics
        anyio.to_thread.current_default_thread_limiter().total_tokens = limits.pool_size + 2
        # the app's long-lived objects (routes, schemas, models) out of the collector's sight: a full collection
        # then scans only what requests allocate, instead of pausing a request for tens of milliseconds
        gc.freeze()
        yield
        pool.close()

    app = FastAPI(title="telemetry-nb API", version=__version__, lifespan=lifespan,
                  description="GPU inventory and per-GPU DCGM telemetry stored by telemetry-nb collectors."
                              + (" Every /api/v1 route needs `Authorization: Bearer <token>`." if tokens else ""))

    async def count_requests(scope: dict, receive: Any, send: Any, inner: Any) -> None:
        """Every request counted and timed by route template (a pure ASGI wrapper: no per-request task)."""
        if scope["type"] != "http":
            await inner(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if b"%2f" in scope.get("raw_path", b"").lower():
                # an encoded slash would let `{uuid}` of one route match another route's path
                await JSONResponse(status_code=404, content={"detail": "Not Found: no path has an encoded slash "
                                                                      "(%2F)"})(scope, receive, send_status)
            else:
                await inner(scope, receive, send_status)
        finally:
            path = getattr(scope.get("route"), "path", "overloaded" if scope.get("overloaded") else "unmatched")
            key = (path, status[0])
            series = labelled.get(key)
            if series is None:  # the labelled children, looked up once per (route, status)
                series = labelled[key] = (requests_total.labels(path, str(status[0])), latency.labels(path))
            series[0].inc()
            series[1].observe(time.perf_counter() - started)

    @app.exception_handler(ParamError)
    async def param_error(request: Request, exc: ParamError):
        return JSONResponse(status_code=422, content={"detail": str(exc)})

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return JSONResponse(status_code=422, content={"detail": _validation_detail(exc),
                                                      "errors": json.loads(json.dumps(exc.errors(), default=str))})

    @app.get("/health", summary="Liveness: the process answers", operation_id="health")
    def health() -> models.Health:
        return models.Health(status="ok")

    @app.get("/ready", summary="Readiness: PostgreSQL reachable with the schema created, Redis reachable",
             operation_id="ready", responses={503: models.error("not ready; `failed` says what", models.Ready)})
    def ready() -> models.Ready:
        failed: list[str] = []
        detail: dict[str, str] = {}
        try:
            with pool.connection(timeout=3) as conn:
                version = Reader(conn).schema_version()
            detail["postgresql"] = "ok"
            if version is None:
                failed.append("schema")
                detail["schema"] = "not created yet: a collector creates it when it starts"
            else:
                detail["schema"] = f"ok (version {version})"
        except Exception as err:  # noqa: BLE001 (any failure means not ready)
            failed.append("postgresql")
            detail["postgresql"] = f"{type(err).__name__}: {str(err).strip()[:200]}"
        if redis_ready is not None:
            try:
                redis_ready()
                detail["redis"] = "ok"
            except (redis.RedisError, *REDIS_ERRORS) as err:
                failed.append("redis")
                detail["redis"] = f"{type(err).__name__}: {str(err).strip()[:200]}"
        body = models.Ready(status="ready" if not failed else "not ready", failed=failed, checks=detail)
        if failed:
            reasons = [f"{name} {'not created' if name == 'schema' else 'unreachable'}" for name in failed]
            body.detail = f"not ready: {', '.join(reasons)}"
            return JSONResponse(status_code=503, content=body.model_dump())
        return body

    @app.get("/metrics", summary="Prometheus metrics of this service", operation_id="metrics",
             response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text exposition format"}})
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    v1 = build_v1_router(store, bearer_auth(tokens), auth_enabled=tokens is not None)
    app.include_router(v1)
    hot_route = next(r for r in v1.routes if getattr(r, "path", None) == ROUTE_PATH)
    app.add_middleware(HotTelemetry, api=app, route=hot_route, store=store, tokens=tokens)  # inside the gate
    app.add_middleware(Gate, limits=limits, state=gate)
    app.add_middleware(Wrap, around=count_requests)  # outermost: a gated 503 is counted too
    return app


class Wrap:
    """An ASGI middleware made of one function `around(scope, receive, send, inner)`."""

    def __init__(self, app: Any, around: Any):
        self.app, self.around = app, around

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        await self.around(scope, receive, send, self.app)


def openapi_document(**kwargs: Any) -> dict:
    """The OpenAPI document of an app built with `kwargs` (no database is contacted)."""
    return create_app("postgresql://unused/unused", **kwargs).openapi()


def app_from_env() -> FastAPI:
    """The app over $DATABASE_URL / $REDIS_URL: what each `serve --workers N` worker process builds
    (its share of TELEMETRY_API_DB_CONNECTIONS among $TELEMETRY_API_WORKERS workers)."""
    import os

    workers = int(os.environ.get("TELEMETRY_API_WORKERS") or 1)
    return create_app(os.environ["DATABASE_URL"], os.environ.get("REDIS_URL") or None,
                      limits=ApiLimits.from_env(workers=workers))

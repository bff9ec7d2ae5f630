"""The hot route (`GET /api/v1/gpus/{uuid}/telemetry`) answered without FastAPI's per-request machinery.

FastAPI's routing, dependency solving and parameter validation cost about as much CPU as the route's own
work. A request whose every parameter plainly satisfies its schema (and whose bearer token, when tokens
are on, is accepted) is answered here by the same function the route calls (`routes.telemetry_json`);
anything else (an unknown or repeated parameter, a value that is not obviously valid, a missing or
refused token, another method) goes on to FastAPI unchanged, so every 401 and 422 stays FastAPI's own.
Errors the route itself raises (404, 422, 503) are rendered by the app's exception handlers.
"""

from __future__ import annotations

import asyncio
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import parse_qsl

from fastapi import FastAPI
from starlette.requests import Request

from telemetry_nb.api.auth import Tokens
from telemetry_nb.api.params import MAX_METRIC, MAX_TEXT, NAME_PATTERN, TELEMETRY_CURSOR_PATTERN, UUID_PATTERN
from telemetry_nb.api.routes import Store, telemetry_json

PREFIX, SUFFIX = "/api/v1/gpus/", "/telemetry"
ROUTE_PATH = PREFIX + "{uuid}" + SUFFIX
# fullmatch: `$` would also match before a trailing newline, which the schemas' patterns refuse
_UUID = re.compile(UUID_PATTERN)
_NAME = re.compile(NAME_PATTERN)
_CURSOR = re.compile(TELEMETRY_CURSOR_PATTERN)
_LIMIT = re.compile(r"[1-9][0-9]{0,4}")
_HEADERS = [(b"content-type", b"application/json")]


class HotTelemetry:
    """Pure ASGI middleware (inside the gate): plainly valid one-GPU telemetry requests answered directly."""

    def __init__(self, app: Any, api: FastAPI, route: Any, store: Store, tokens: Tokens | None):
        """`route`: the FastAPI route this stands in for (what the request metrics label a request by)."""
        self.app, self.api, self.route, self.store, self.tokens = app, api, route, store, tokens
        # a thread per connection (the gate admits no more requests at once); a plain executor hands work
        # over through a C queue, about half of what anyio's worker threads cost per call
        self.threads = ThreadPoolExecutor(max_workers=store.pool.max_size, thread_name_prefix="api-hot")

    def _params(self, scope: dict) -> tuple | None:
        """(uuid, start_time, end_time, metric, limit, cursor) when the request is plainly valid, else None."""
        if scope.get("root_path"):
            return None
        uuid = scope["path"][len(PREFIX):-len(SUFFIX)]
        if not uuid or len(uuid) > MAX_TEXT or not _UUID.fullmatch(uuid):
            return None
        start = end = cursor = None
        metric: list[str] = []
        limit = 1000
        seen: set[str] = set()
        for key, value in parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True):
            if key == "metric":
                if not value or len(value) > MAX_METRIC or not _NAME.fullmatch(value):
                    return None
                metric.append(value)
                continue
            if key in seen:
                return None
            seen.add(key)
            if key == "start_time" or key == "end_time":
                if not value or len(value) > 64:
                    return None
                if key == "start_time":
                    start = value
                else:
                    end = value
            elif key == "limit":
                if not _LIMIT.fullmatch(value) or int(value) > 10000:
                    return None
                limit = int(value)
            elif key == "cursor":
                if len(value) > 28 or not _CURSOR.fullmatch(value):
                    return None
                cursor = value
            else:
                return None
        return uuid, start, end, metric or None, limit, cursor

    def _authorized(self, scope: dict) -> bool:
        """What `auth.bearer_auth` admits: one Authorization header `Bearer <an accepted token>`."""
        if self.tokens is None:
            return True
        values = [v for k, v in scope["headers"] if k == b"authorization"]
        if len(values) != 1:
            return False
        scheme, _, token = values[0].decode("latin-1").partition(" ")
        token = token.strip()
        return scheme.lower() == "bearer" and bool(token) and self.tokens.accepts(token)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        params = None
        if (scope["type"] == "http" and scope["method"] == "GET" and path.startswith(PREFIX)
                and path.endswith(SUFFIX)):
            params = self._params(scope)
        if params is None or not self._authorized(scope):
            await self.app(scope, receive, send)
            return
        scope["route"] = self.route
        scope["path_params"] = {"uuid": params[0]}
        try:
            body = await asyncio.get_running_loop().run_in_executor(self.threads, telemetry_json, self.store, *params)
        except Exception as exc:  # noqa: BLE001 (rendered by the app's handler for it, else re-raised)
            handler = next((self.api.exception_handlers[c] for c in type(exc).__mro__
                            if c in self.api.exception_handlers), None)
            if handler is None:
                raise
            response = handler(Request(scope, receive), exc)
            if asyncio.iscoroutine(response):
                response = await response
            await response(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body)).encode()), *_HEADERS]})
        await send({"type": "http.response.body", "body": body})

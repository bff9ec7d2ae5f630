"""How much load one API worker takes on, and the gate that answers the rest with a fast 503.

Each worker process has `pool_size` database connections and lets at most that many /api/v1 requests
run at once (one thread each, so no thread ever waits for a connection). A request that finds every
connection busy waits in line for at most `queue_timeout_s`, behind at most `max_waiting` others;
past either bound it is answered `503` with `Retry-After` at once: a client (or a load balancer) retries
elsewhere or later instead of queueing for seconds behind a slow database.

Connections per PostgreSQL: replicas × TELEMETRY_API_DB_CONNECTIONS (every worker of a replica together)
must fit, with the collectors' and maintainer's connections, under `max_connections` minus
`superuser_reserved_connections` (README, "API under load").
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from telemetry_nb.timeparse import parse_duration

CONNECTIONS_PER_WORKER = 4  # a worker is one Python thread of CPU: more connections only queue inside PostgreSQL
# routes whose one request costs ~100 ms of CPU or more (thousands of rows to aggregate and serialize): more of
# them at once in one worker only share its one core, each slower, and starve the cheap requests
HEAVY_PREFIXES = ("/api/v1/fleet/", "/api/v1/usage", "/api/v1/workloads")


def default_workers() -> int:
    """The CPUs this process may run on (its affinity, else the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def serve_workers(flag: int | None, env: Mapping[str, str] | None = None) -> int:
    """`serve --workers`: the flag, else $TELEMETRY_API_WORKERS, else `default_workers()`."""
    env = os.environ if env is None else env
    return flag if flag is not None else _int(env, "TELEMETRY_API_WORKERS", default_workers(), 1)


def _int(env: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    raw = env.get(name) or ""
    try:
        value = int(raw) if raw else default
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ValueError(f"environment variable {name} must be at least {minimum}, got {value}")
    return value


@dataclass(frozen=True)
class ApiLimits:
    """One worker's database connections and the bounds on requests waiting for one."""

    pool_size: int = CONNECTIONS_PER_WORKER
    queue_timeout_s: float = 0.5
    max_waiting: int = 64
    retry_after_s: int = 1

    @property
    def heavy_slots(self) -> int:
        """How many of the connections the heavy routes (`HEAVY_PREFIXES`) may hold at once: half."""
        return max(1, self.pool_size // 2)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, workers: int = 1) -> ApiLimits:
        """TELEMETRY_API_DB_CONNECTIONS (all `workers` together; default 4 per worker) split evenly,
        TELEMETRY_API_QUEUE_TIMEOUT (default 0.5s), TELEMETRY_API_MAX_WAITING (per worker, default 64)."""
        env = os.environ if env is None else env
        total = _int(env, "TELEMETRY_API_DB_CONNECTIONS", CONNECTIONS_PER_WORKER * workers, 1)
        raw_timeout = env.get("TELEMETRY_API_QUEUE_TIMEOUT") or "0.5s"
        try:
            timeout = parse_duration(raw_timeout)
        except ValueError:
            raise ValueError("environment variable TELEMETRY_API_QUEUE_TIMEOUT must be a duration like 500ms or "
                             f"1s, got {raw_timeout!r}") from None
        return cls(pool_size=max(1, total // workers), queue_timeout_s=timeout,
                   max_waiting=_int(env, "TELEMETRY_API_MAX_WAITING", 64, 0))


@dataclass
class GateState:
    """What the gate is doing now (for /metrics): requests running, waiting, and rejected so far."""

    running: int = 0
    waiting: int = 0
    rejected: int = 0


class Gate:
    """Pure ASGI middleware: at most `limits.pool_size` requests under `prefix` at once (of them at most
    `limits.heavy_slots` of the heavy routes), a bounded line for the next ones, and an immediate `503` +
    `Retry-After` for the rest."""

    def __init__(self, app: Any, limits: ApiLimits, *, state: GateState | None = None, prefix: str = "/api/v1"):
        self.app, self.limits, self.prefix = app, limits, prefix
        self.slots = asyncio.Semaphore(limits.pool_size)
        self.heavy = asyncio.Semaphore(limits.heavy_slots)
        self.state = state if state is not None else GateState()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        state = self.state
        lanes = (self.heavy, self.slots) if scope["path"].startswith(HEAVY_PREFIXES) else (self.slots,)
        held: list[asyncio.Semaphore] = []
        try:
            if any(lane.locked() for lane in lanes):
                if state.waiting >= self.limits.max_waiting:
                    await self._reject(scope, send, f"{state.waiting} requests already waiting for a database "
                                                    "connection")
                    return
                state.waiting += 1
                try:
                    async with asyncio.timeout(self.limits.queue_timeout_s):
                        for lane in lanes:
                            await lane.acquire()
                            held.append(lane)
                except TimeoutError:
                    await self._reject(scope, send,
                                       f"no database connection free within {self.limits.queue_timeout_s:g}s")
                    return
                finally:
                    state.waiting -= 1
            else:
                for lane in lanes:
                    await lane.acquire()
                    held.append(lane)
            state.running += 1
            try:
                await self.app(scope, receive, send)
            finally:
                state.running -= 1
        finally:
            for lane in held:
                lane.release()

    async def _reject(self, scope: dict, send: Any, why: str) -> None:
        self.state.rejected += 1
        scope["overloaded"] = True  # for the request metrics: no route was matched
        body = json.dumps({"detail": f"overloaded: {why}; retry later"}).encode()
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"retry-after", str(self.limits.retry_after_s).encode())]})
        await send({"type": "http.response.body", "body": body})

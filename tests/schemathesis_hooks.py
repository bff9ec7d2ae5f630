"""schemathesis hooks (SCHEMATHESIS_HOOKS=tests.schemathesis_hooks) for the API test.

They only drop requests whose rejection depends on what OpenAPI cannot express: a time window whose
end is before its start (a rule across two parameters), and metric names the database does not hold
for a GPU it does hold (a rule on the data). Every other schema-valid request must be accepted.
Known GPUs and metrics come from the live API under test ($TELEMETRY_API_URL).
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from functools import cache

import httpx
import schemathesis

from telemetry_nb.api.params import ParamError, parse_bucket, parse_time
from telemetry_nb.api.routes import DEFAULT_FLEET_WINDOW, MAX_FLEET_ELEMENTS
from telemetry_nb.api.usage import DEFAULT_WINDOW, MAX_WINDOW


@cache
def _known() -> tuple[frozenset[str], frozenset[str]]:
    base = os.environ["TELEMETRY_API_URL"]
    headers = {"Authorization": f"Bearer {os.environ['TELEMETRY_API_TOKEN']}"} if os.environ.get(
        "TELEMETRY_API_TOKEN") else {}
    gpus = httpx.get(f"{base}/api/v1/gpus", params={"limit": 1000}, headers=headers).json()["items"]
    metrics = httpx.get(f"{base}/api/v1/metrics", headers=headers).json()["items"]
    return frozenset(g["uuid"] for g in gpus), frozenset(m["name"] for m in metrics)


def _time(query: dict, name: str):
    try:
        return parse_time(name, query.get(name)) if isinstance(query.get(name), str) else None
    except ParamError:
        return None


@cache
def _newest() -> datetime | None:
    base = os.environ["TELEMETRY_API_URL"]
    headers = {"Authorization": f"Bearer {os.environ['TELEMETRY_API_TOKEN']}"} if os.environ.get(
        "TELEMETRY_API_TOKEN") else {}
    gpus = httpx.get(f"{base}/api/v1/gpus", params={"limit": 1000}, headers=headers).json()["items"]
    seen = [parse_time("last_seen", g["last_seen"]) for g in gpus if g.get("last_seen")]
    return max(seen) if seen else None


def _window_ok(start, end) -> bool:
    """Accounting windows longer than MAX_WINDOW are refused (a rule across parameters and the data):
    the same defaults as the route, the newest sample standing in for a missing end."""
    if end is None:
        newest = _newest()
        end = newest if newest is not None and (start is None or newest >= start) else \
            (start + DEFAULT_WINDOW if start else datetime.now(UTC))
    if start is None:
        start = end - DEFAULT_WINDOW
    try:
        return end - start <= MAX_WINDOW
    except OverflowError:
        return False


def _fleet_ok(query: dict, start, end) -> bool:
    """A fleet request is refused for an unknown metric, or for more than MAX_FLEET_ELEMENTS elements
    (GPUs × buckets, a rule on the data: bounded here with the whole inventory and `now` for a missing end)."""
    gpus, metrics = _known()
    if isinstance(query.get("metric"), str) and query["metric"] not in metrics:
        return False
    try:
        seconds = parse_bucket(query["bucket"]) if isinstance(query.get("bucket"), str) else 900.0
    except ParamError:
        return True
    end = end or datetime.now(UTC)
    try:
        start = start or end - DEFAULT_FLEET_WINDOW  # an end in year 1 has no window before it
        return len(gpus) * ((end - start).total_seconds() / seconds + 1) <= MAX_FLEET_ELEMENTS
    except OverflowError:
        return False


@schemathesis.hook
def filter_case(context, case) -> bool:
    query = case.query or {}
    start, end = _time(query, "start_time"), _time(query, "end_time")
    if start and end and end < start:
        return False
    if case.path.endswith("/fleet/aggregate") and not _fleet_ok(query, start, end):
        return False
    if case.path.endswith(("/usage", "/workloads")) and not _window_ok(start, end):
        return False
    uuid = (case.path_parameters or {}).get("uuid")
    metric = query.get("metric")
    if isinstance(uuid, str) and metric is not None:
        gpus, metrics = _known()
        names = metric if isinstance(metric, list) else [metric]
        if uuid in gpus and any(isinstance(m, str) and m not in metrics for m in names):
            return False
    return True

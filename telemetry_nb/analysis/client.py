"""A typed client of the telemetry-nb REST API (httpx), for notebooks, the dashboard and checks.

Every list call follows `next_cursor` until the last page; a non-2xx answer raises `APIError` carrying
the status and the API's own `detail` text, so a notebook shows *why* a request failed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx

from telemetry_nb.timeparse import parse_timestamp

DEFAULT_API_URL = "http://127.0.0.1:8000"
TimeArg = datetime | str | None


class APIError(RuntimeError):
    """A request the API answered with a non-2xx status (or did not answer at all: `status` 0)."""

    def __init__(self, method: str, url: str, status: int, detail: str, body: Any = None):
        self.method, self.url, self.status, self.detail, self.body = method, url, status, detail, body
        where = f"{method} {url}"
        super().__init__(f"{where} -> HTTP {status}: {detail}" if status else f"{where} failed: {detail}")


def _retry_after(resp: httpx.Response) -> float | None:
    """The seconds of a `Retry-After: <seconds>` header (capped at 10), None without one."""
    try:
        return min(max(float(resp.headers["retry-after"]), 0.0), 10.0)
    except (KeyError, ValueError):
        return None


def parse_ts(text: str | None) -> datetime | None:
    """RFC 3339 from the API (`...Z`) → aware UTC datetime; None or empty stays None."""
    return parse_timestamp(text) if text else None


def format_ts(ts: TimeArg) -> str | None:
    """A datetime (naive = UTC) or an RFC 3339 string → the API's query text."""
    if ts is None or ts == "":
        return None
    if isinstance(ts, str):
        return ts
    if hasattr(ts, "to_pydatetime"):  # pandas.Timestamp
        ts = ts.to_pydatetime()
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC).isoformat().replace("+00:00", "Z")


def format_bucket(bucket: str | float) -> str:
    """Seconds → the API's bucket text (`30s`, `250ms`, `12d`: at most 6 digits); a string passes as is."""
    if isinstance(bucket, str):
        return bucket
    ms = max(1, round(float(bucket) * 1000))
    for unit, size in (("s", 1000), ("ms", 1), ("m", 60_000), ("h", 3_600_000), ("d", 86_400_000)):
        if ms % size == 0 and ms // size <= 999_999:
            return f"{ms // size}{unit}"
    return f"{min(999_999, round(ms / 86_400_000))}d"


@dataclass(frozen=True)
class Gpu:
    uuid: str
    hostname: str
    gpu_index: int | None
    device: str
    model_name: str
    first_seen: datetime | None
    last_seen: datetime | None
    parent_uuid: str | None = None  # set on a MIG instance: the GPU it is carved from
    mig_instance: int | None = None

    @classmethod
    def from_json(cls, d: dict) -> Gpu:
        return cls(uuid=d["uuid"], hostname=d.get("hostname") or "", gpu_index=d.get("gpu_index"),
                   device=d.get("device") or "", model_name=d.get("model_name") or "",
                   first_seen=parse_ts(d.get("first_seen")), last_seen=parse_ts(d.get("last_seen")),
                   parent_uuid=d.get("parent_uuid"), mig_instance=d.get("mig_instance"))


@dataclass(frozen=True)
class Point:
    """One stored sample of one GPU."""

    timestamp: datetime
    metric: str
    value: float


@dataclass(frozen=True)
class Telemetry:
    gpu: Gpu
    items: list[Point]


@dataclass(frozen=True)
class Bucket:
    """Server-side aggregate of one metric over one time bucket."""

    bucket: datetime
    metric: str
    min: float
    avg: float
    max: float
    count: int


@dataclass(frozen=True)
class Aggregate:
    gpu: Gpu
    bucket_seconds: float
    items: list[Bucket]


@dataclass(frozen=True)
class Event:
    """A GPU event: for kind `xid`, the XID code a GPU started reporting at `timestamp`."""

    timestamp: datetime
    uuid: str
    hostname: str
    kind: str
    code: int
    message: str


@dataclass(frozen=True)
class FleetAggregate:
    """`GET /api/v1/fleet/aggregate`: parallel arrays, one element per (GPU, bucket), ordered by uuid, bucket."""

    metric: str
    bucket_seconds: float
    resolution: str
    uuid: list[str]
    bucket: list[str]
    min: list[float]
    avg: list[float]
    max: list[float]
    count: list[int]


@dataclass(frozen=True)
class MetricInfo:
    name: str
    rows: int


@dataclass(frozen=True)
class UsageItem:
    """One group of `GET /api/v1/usage`."""

    group: str | None
    gpu_hours: float
    busy_gpu_hours: float
    idle_gpu_hours: float
    avg_util: float | None
    gpus: int


@dataclass(frozen=True)
class UsageReport:
    group_by: str
    start_time: datetime | None
    end_time: datetime | None
    idle_threshold: float
    items: list[UsageItem]


@dataclass(frozen=True)
class Workload:
    """One workload of `GET /api/v1/workloads` (its GPUs' uuids, first/last seen over all of them)."""

    namespace: str
    pod: str
    container: str
    first_seen: datetime | None
    last_seen: datetime | None
    gpus: list[str]


class TelemetryClient:
    """`TelemetryClient(api_url, token=...)`; the URL defaults to $TELEMETRY_API_URL, then http://127.0.0.1:8000.

    `token` (default $TELEMETRY_API_TOKEN) is sent as `Authorization: Bearer …` when the API requires one.
    """

    def __init__(self, base_url: str | None = None, *, token: str | None = None, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None, retries: int = 2,
                 sleep: Callable[[float], None] = time.sleep):
        """`retries`: how often a `503` that carries `Retry-After` (an overloaded or briefly unreachable
        database) is asked again, after the wait it names (at most 10 s each), through `sleep`."""
        self.retries, self._sleep = retries, sleep
        self.base_url = (base_url or os.environ.get("TELEMETRY_API_URL") or DEFAULT_API_URL).rstrip("/")
        token = token or os.environ.get("TELEMETRY_API_TOKEN") or None
        headers = {"Authorization": f"Bearer {token.strip()}"} if token else None
        self.authenticated = token is not None
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, transport=transport, headers=headers)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> TelemetryClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TelemetryClient({self.base_url!r}{', token=***' if self.authenticated else ''})"

    # -- plumbing ------------------------------------------------------------------------------
    def _get(self, path: str, params: dict | list | None = None, *, ok: Sequence[int] = ()) -> tuple[int, Any]:
        if isinstance(params, dict):
            params = [(k, v) for k, v in params.items() if v is not None]
        for attempt in range(self.retries + 1):
            try:
                resp = self._http.get(path, params=params)
            except httpx.HTTPError as err:
                raise APIError("GET", f"{self.base_url}{path}", 0, f"{type(err).__name__}: {err}") from None
            wait = _retry_after(resp) if resp.status_code == 503 and attempt < self.retries else None
            if wait is None:
                break
            self._sleep(wait)
        try:
            body = resp.json()
        except ValueError:
            body = resp.text
        if resp.is_success or resp.status_code in ok:
            return resp.status_code, body
        detail = body.get("detail") if isinstance(body, dict) else None
        if not isinstance(detail, str):
            detail = str(detail if detail is not None else body)[:500] or resp.reason_phrase
        raise APIError("GET", str(resp.request.url), resp.status_code, detail, body)

    def _pages(self, path: str, params: list[tuple[str, Any]]) -> Iterator[dict]:
        cursor = None
        while True:
            _, body = self._get(path, params + ([("cursor", cursor)] if cursor else []))
            yield body
            cursor = body.get("next_cursor")
            if not cursor:
                return

    # -- service -------------------------------------------------------------------------------
    def health(self) -> dict:
        """`GET /health`: the process answers."""
        return self._get("/health")[1]

    def ready(self) -> dict:
        """`GET /ready`; raises `APIError` (status 503, `body["failed"]` lists what is down) when not ready."""
        return self._get("/ready")[1]

    def metrics(self) -> list[MetricInfo]:
        """Metric names present, with their row counts."""
        return [MetricInfo(m["name"], int(m["rows"])) for m in self._get("/api/v1/metrics")[1]["items"]]

    # -- inventory -----------------------------------------------------------------------------
    def gpus(self, hostname: str | None = None, model_name: str | None = None, *, page_size: int = 1000) -> list[Gpu]:
        """Every GPU (optionally of one host / model), all pages."""
        params = [(k, v) for k, v in (("hostname", hostname), ("model_name", model_name), ("limit", page_size))
                  if v is not None]
        return [Gpu.from_json(g) for page in self._pages("/api/v1/gpus", params) for g in page["items"]]

    def gpu(self, uuid: str) -> Gpu:
        return Gpu.from_json(self._get(f"/api/v1/gpus/{uuid}")[1])

    def events(self, *, uuid: str | None = None, kind: str | None = None, start_time: TimeArg = None,
               end_time: TimeArg = None, page_size: int = 1000) -> list[Event]:
        """GPU events (XID errors) with start_time ≤ timestamp ≤ end_time, all pages, oldest first."""
        params = [(k, v) for k, v in (("uuid", uuid), ("kind", kind), ("start_time", format_ts(start_time)),
                                      ("end_time", format_ts(end_time)), ("limit", page_size)) if v is not None]
        return [Event(parse_ts(e["timestamp"]), e["uuid"], e.get("hostname") or "", e["kind"], int(e["code"]),
                      e.get("message") or "")
                for page in self._pages("/api/v1/events", params) for e in page["items"]]

    # -- telemetry -----------------------------------------------------------------------------
    def telemetry_pages(self, uuid: str, *, start_time: TimeArg = None, end_time: TimeArg = None,
                        metric: str | Sequence[str] | None = None, page_size: int = 10000) -> Iterator[dict]:
        """The raw JSON pages of `GET /api/v1/gpus/{uuid}/telemetry` (for callers that build frames fast)."""
        params: list[tuple[str, Any]] = [("limit", page_size)]
        params += [(k, v) for k, v in (("start_time", format_ts(start_time)), ("end_time", format_ts(end_time)))
                   if v is not None]
        params += [("metric", m) for m in _metrics(metric)]
        yield from self._pages(f"/api/v1/gpus/{uuid}/telemetry", params)

    def telemetry(self, uuid: str, *, start_time: TimeArg = None, end_time: TimeArg = None,
                  metric: str | Sequence[str] | None = None, page_size: int = 10000,
                  max_rows: int | None = None) -> Telemetry:
        """Samples of one GPU with start_time ≤ ts ≤ end_time, ordered by time, following every cursor.

        `max_rows` stops early (a guard for notebooks: use `aggregate` for long windows).
        """
        gpu: Gpu | None = None
        items: list[Point] = []
        for page in self.telemetry_pages(uuid, start_time=start_time, end_time=end_time, metric=metric,
                                         page_size=page_size):
            gpu = gpu or Gpu.from_json(page["gpu"])
            items.extend(Point(parse_ts(t["timestamp"]), t["metric"], t["value"]) for t in page["items"])
            if max_rows is not None and len(items) >= max_rows:
                del items[max_rows:]
                break
        assert gpu is not None
        return Telemetry(gpu, items)

    def aggregate(self, uuid: str, *, metric: str | Sequence[str] | None = None, bucket: str | float = "1m",
                  start_time: TimeArg = None, end_time: TimeArg = None) -> Aggregate:
        """Per-bucket min/avg/max/count computed by PostgreSQL; `bucket` is `30s`, `5m`, … or seconds."""
        params: list[tuple[str, Any]] = [("bucket", format_bucket(bucket))]
        params += [(k, v) for k, v in (("start_time", format_ts(start_time)), ("end_time", format_ts(end_time)))
                   if v is not None]
        params += [("metric", m) for m in _metrics(metric)]
        body = self._get(f"/api/v1/gpus/{uuid}/telemetry/aggregate", params)[1]
        return Aggregate(Gpu.from_json(body["gpu"]), float(body["bucket_seconds"]),
                         [Bucket(parse_ts(b["bucket"]), b["metric"], b["min"], b["avg"], b["max"], int(b["count"]))
                          for b in body["items"]])

    def fleet_aggregate(self, metric: str, *, bucket: str | float = "15m", start_time: TimeArg = None,
                        end_time: TimeArg = None, hostname: str | Sequence[str] | None = None,
                        model_name: str | Sequence[str] | None = None) -> FleetAggregate:
        """One metric for every selected GPU in one request (rollups server-side); bucket times stay RFC 3339."""
        if isinstance(bucket, int | float):
            bucket = f"{int(bucket)}s" if float(bucket).is_integer() else f"{bucket}s"
        params: list[tuple[str, Any]] = [("metric", metric), ("bucket", bucket)]
        params += [(k, v) for k, v in (("start_time", format_ts(start_time)), ("end_time", format_ts(end_time)))
                   if v is not None]
        params += [("hostname", h) for h in _metrics(hostname)]
        params += [("model_name", m) for m in _metrics(model_name)]
        b = self._get("/api/v1/fleet/aggregate", params)[1]
        return FleetAggregate(b["metric"], float(b["bucket_seconds"]), b["resolution"], b["uuid"], b["bucket"],
                              b["min"], b["avg"], b["max"], b["count"])

    # -- accounting ----------------------------------------------------------------------------
    def usage(self, group_by: str = "namespace", *, start_time: TimeArg = None, end_time: TimeArg = None,
              idle_threshold: float = 5.0) -> UsageReport:
        """`GET /api/v1/usage`: GPU-hours, busy and idle GPU-hours per group (`group` None: unattributed)."""
        params = {"group_by": group_by, "start_time": format_ts(start_time), "end_time": format_ts(end_time),
                  "idle_threshold": idle_threshold}
        b = self._get("/api/v1/usage", params)[1]
        return UsageReport(b["group_by"], parse_ts(b["start_time"]), parse_ts(b["end_time"]),
                           float(b["idle_threshold"]), [UsageItem(**i) for i in b["items"]])

    def workloads(self, *, namespace: str | None = None, pod: str | None = None, start_time: TimeArg = None,
                  end_time: TimeArg = None, page_size: int = 1000) -> list[Workload]:
        """`GET /api/v1/workloads`, all pages: workloads seen in the window, their GPUs, first/last seen."""
        params = [(k, v) for k, v in (("namespace", namespace), ("pod", pod), ("start_time", format_ts(start_time)),
                                      ("end_time", format_ts(end_time)), ("limit", page_size)) if v is not None]
        return [Workload(w["namespace"], w["pod"], w["container"], parse_ts(w["first_seen"]),
                         parse_ts(w["last_seen"]), [g["uuid"] for g in w["gpus"]])
                for page in self._pages("/api/v1/workloads", params) for w in page["items"]]


def _metrics(metric: str | Sequence[str] | None) -> list[str]:
    if metric is None:
        return []
    return [metric] if isinstance(metric, str) else list(metric)

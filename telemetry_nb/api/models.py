"""The API's response bodies as pydantic models: the OpenAPI document's schemas, and the shapes routes return."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field


class Gpu(BaseModel):
    """One GPU of the inventory; first/last seen are the times of its oldest and newest stored sample."""

    uuid: str
    hostname: str
    gpu_index: int | None
    device: str
    model_name: str
    first_seen: datetime | None
    last_seen: datetime | None
    pci_bus_id: str = ""
    driver_version: str = ""
    labels: dict[str, str] = Field(default_factory=dict, description="the exporter's static labels")
    parent_uuid: str | None = Field(None, description="for a MIG instance: the uuid of its GPU")
    mig_profile: str | None = None
    mig_instance: int | None = None


class GpuPage(BaseModel):
    items: list[Gpu]
    next_cursor: str | None = Field(description="pass back as `cursor` for the next page; null on the last page")


class Point(BaseModel):
    timestamp: datetime
    metric: str
    value: float


class TelemetryPage(BaseModel):
    gpu: Gpu
    items: list[Point]
    next_cursor: str | None = Field(description="pass back as `cursor` for the next page; null on the last page")


class Bucket(BaseModel):
    bucket: datetime = Field(description="start of the bucket")
    metric: str
    min: float
    avg: float
    max: float
    count: int


class Aggregate(BaseModel):
    gpu: Gpu
    bucket_seconds: float
    items: list[Bucket]


class Event(BaseModel):
    """One GPU event: for `kind` xid, the XID code a GPU started reporting at `timestamp`, with its message."""

    timestamp: datetime
    uuid: str
    hostname: str
    kind: str
    code: int
    message: str


class EventPage(BaseModel):
    """A page of events in (timestamp, GPU, kind) order; follow `next_cursor` until it is null."""

    items: list[Event]
    next_cursor: str | None = Field(description="pass back as `cursor` for the next page; null on the last page")


class FleetAggregate(BaseModel):
    """Per-(GPU, bucket) aggregates of one metric over the fleet, as parallel arrays ordered by uuid, bucket."""

    metric: str
    bucket_seconds: float
    resolution: Literal["raw", "1m", "1h"] = Field(description="where closed buckets came from: raw samples or "
                                                               "the 1-minute / 1-hour rollup")
    uuid: list[str]
    bucket: list[datetime] = Field(description="bucket start")
    min: list[float]
    avg: list[float]
    max: list[float]
    count: list[int]


class MetricInfo(BaseModel):
    name: str
    rows: int = Field(description="rows stored for this metric, all GPUs")


class MetricList(BaseModel):
    items: list[MetricInfo]


class Health(BaseModel):
    status: Literal["ok"]


class Ready(BaseModel):
    status: Literal["ready", "not ready"]
    failed: list[str] = Field(description="what is not ready: postgresql, schema, redis")
    checks: dict[str, str] = Field(description="per dependency: `ok` or why not")
    detail: str | None = Field(None, description="a one-line summary when not ready")


class ErrorBody(BaseModel):
    """404, 401 and 503 answers."""

    detail: str


class ParamErrorBody(BaseModel):
    """422: `detail` starts with the name of the offending parameter; `errors` lists schema violations."""

    detail: str
    errors: list[dict[str, Any]] | None = None


def error(description: str, model: type[BaseModel] = ErrorBody, **extra: Any) -> dict[str, Any]:
    """An entry of a route's `responses`: a documented error status with its body."""
    return {"model": model, "description": description, **extra}

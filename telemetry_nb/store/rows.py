"""The rows the store writes: telemetry rows in COPY text format plus the inventory rows they refer to.

The store knows rows, not stream entries: the pipeline's codec decodes an entry into a `RowBatch`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple


class GpuRow(NamedTuple):
    """A `gpus` row; `id` is the content hash of the uuid."""

    id: int
    uuid: str
    hostname: str
    gpu_index: int | None
    device: str
    model_name: str


class MetricRow(NamedTuple):
    """A `metrics` row, with how many telemetry rows of the batch carry it."""

    id: int
    name: str
    rows: int = 0


class WorkloadRow(NamedTuple):
    """A `workloads` row; `id` is the content hash of (namespace, pod, container)."""

    id: int
    namespace: str
    pod: str
    container: str


class InventoryRow(NamedTuple):
    """What the inventory knows of a GPU beyond `GpuRow`: every static label, and MIG identity."""

    id: int
    pci_bus_id: str
    driver_version: str
    labels: dict[str, str]
    parent_uuid: str
    mig_profile: str
    mig_instance: int | None


class EventRow(NamedTuple):
    """One reading of an event-carrying metric (XID: the last code); the writer stores changes of it."""

    gpu_id: int
    ts: datetime
    kind: str
    code: int
    message: str


@dataclass
class RowBatch:
    """`n` telemetry rows as COPY text (`gpu_id, ts, metric_id, value, workload_id`) and their inventory rows."""

    n: int
    rows: bytes
    gpus: list[GpuRow] = field(default_factory=list)
    metrics: list[MetricRow] = field(default_factory=list)
    workloads: list[WorkloadRow] = field(default_factory=list)
    inventory: list[InventoryRow] = field(default_factory=list)
    events: list[EventRow] = field(default_factory=list)

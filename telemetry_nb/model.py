"""The two things a source yields: a `Sample` (one metric reading of one GPU) or a `Rejected` row."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime


@dataclass(slots=True)
class Sample:
    """One DCGM reading: `value` of `metric` on GPU `uuid` at `ts` (timezone-aware, UTC)."""

    uuid: str
    metric: str
    ts: datetime
    value: float
    hostname: str = ""
    gpu_index: int | None = None
    device: str = ""
    model_name: str = ""
    container: str = ""
    pod: str = ""
    namespace: str = ""
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class Rejected:
    """A source row that could not become a `Sample`: where it was, why, and the raw text."""

    line: int
    reason: str
    raw: str

"""The two things a source yields: a `Sample` (one metric reading of one GPU) or a `Rejected` row.

Also the small vocabulary every source shares: which labels are static inventory labels, how a
MIG instance is named, and which metric carries XID errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

XID_METRIC = "DCGM_FI_DEV_XID_ERRORS"
# labels that change from sample to sample (workload, event) or name the metric: not inventory
NON_STATIC_LABELS = frozenset({"__name__", "container", "pod", "namespace", "pod_uid", "err_code", "err_msg"})


def mig_uuid(parent_uuid: str, instance: int) -> str:
    """The inventory uuid of MIG instance `instance` of GPU `parent_uuid` (stable, URL-path safe)."""
    return f"{parent_uuid}:gi{instance}"


def static_labels(labels: dict[str, str]) -> dict[str, str]:
    """The labels that describe the GPU itself (kept in the inventory), without workload/event labels."""
    return {k: v for k, v in labels.items() if k not in NON_STATIC_LABELS}


@dataclass(slots=True)
class Sample:
    """One DCGM reading: `value` of `metric` on GPU `uuid` at `ts` (timezone-aware, UTC).

    `labels` are all labels of the series as the source had them; a MIG instance has its own
    `uuid` (`mig_uuid`) and names its GPU in `parent_uuid`.
    """

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
    pci_bus_id: str = ""
    driver_version: str = ""
    parent_uuid: str = ""
    mig_profile: str = ""
    mig_instance: int | None = None


@dataclass(slots=True)
class Rejected:
    """A source row that could not become a `Sample`: where it was, why, and the raw text.

    `source` names where it came from when one publisher reads many sources (a scrape target).
    """

    line: int
    reason: str
    raw: str
    source: str = ""

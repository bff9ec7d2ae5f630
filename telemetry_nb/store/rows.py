"""The rows the store writes: telemetry rows in COPY text format plus the inventory rows they refer to.

The store knows rows, not stream entries: the pipeline's codec decodes an entry into a `RowBatch`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple

from telemetry_nb.store import binary


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
    """`n` telemetry rows (`gpu_id, ts, metric_id, value, workload_id`) for COPY, and their inventory rows.

    The rows are COPY text, or, when `plain` is set, binary COPY tuples (`store.binary`) of which the
    first `plain` have no workload.
    """

    n: int
    rows: bytes
    gpus: list[GpuRow] = field(default_factory=list)
    metrics: list[MetricRow] = field(default_factory=list)
    workloads: list[WorkloadRow] = field(default_factory=list)
    inventory: list[InventoryRow] = field(default_factory=list)
    events: list[EventRow] = field(default_factory=list)
    plain: int | None = None

    @property
    def binary(self) -> bool:
        return self.plain is not None

    def lines(self) -> list[bytes]:
        """The rows one by one: COPY lines with their newline, or binary tuples."""
        if self.plain is not None:
            return binary.split(self.rows, self.plain)
        parts = self.rows.split(b"\n")
        lines = [p + b"\n" for p in parts[:-1]]
        if parts[-1]:
            lines.append(parts[-1])
        return lines

    def ids(self, line: bytes) -> list[tuple[str, int]]:
        """The inventory rows one row refers to: ("gpu", id), ("metric", id) and ("workload", id) if it has one."""
        if self.plain is not None:
            gid, _, mid, _, wid = binary.raw_fields(line)
            return [("gpu", gid), ("metric", mid)] + ([("workload", wid)] if wid is not None else [])
        parts = line.rstrip(b"\n").split(b"\t")
        out = [("gpu", _int(parts[0]))]
        if len(parts) > 2:
            out.append(("metric", _int(parts[2])))
        if len(parts) > 4 and parts[4] != b"\\N":
            out.append(("workload", _int(parts[4])))
        return out

    def subset(self, lines: list[bytes]) -> RowBatch:
        """A batch of just `lines` (some of this batch's), with only the inventory rows they refer to."""
        gids: set[int] = set()
        per_metric: dict[int, int] = {}
        wids: set[int] = set()
        for line in lines:
            for kind, i in self.ids(line):
                if kind == "gpu":
                    gids.add(i)
                elif kind == "metric":
                    per_metric[i] = per_metric.get(i, 0) + 1
                else:
                    wids.add(i)
        plain = None
        if self.plain is not None:  # rows without a workload first, as the binary layout wants
            lines = sorted(lines, key=lambda line: len(line) != binary.PLAIN_SIZE)
            plain = sum(len(line) == binary.PLAIN_SIZE for line in lines)
        return RowBatch(n=len(lines), rows=b"".join(lines), gpus=[g for g in self.gpus if g.id in gids],
                        metrics=[m._replace(rows=per_metric[m.id]) for m in self.metrics if m.id in per_metric],
                        workloads=[w for w in self.workloads if w.id in wids],
                        inventory=[i for i in self.inventory if i.id in gids],
                        events=[e for e in self.events if e.gpu_id in gids], plain=plain)

    def halves(self) -> tuple[RowBatch, RowBatch]:
        """The first and the second half of the rows, as two batches (for isolating refused rows)."""
        lines = self.lines()
        mid = len(lines) // 2
        return self.subset(lines[:mid]), self.subset(lines[mid:])

    def describe(self, limit: int = 3) -> str:
        """The first `limit` rows in words (names instead of ids, control characters escaped), for operators."""
        gpus = {g.id: g for g in self.gpus}
        metrics = {m.id: m.name for m in self.metrics}
        out = []
        for line in self.lines()[:limit]:
            if self.plain is not None:
                gid, us, mid, value, _ = binary.raw_fields(line)
                try:
                    ts = binary.timestamp(us).isoformat()
                except ValueError as err:
                    ts = str(err)
                parts = [str(gid), ts, str(mid), repr(value)]
            else:
                parts = line.rstrip(b"\n").decode(errors="replace").split("\t")
                parts += [""] * (5 - len(parts))
            gpu = gpus.get(_int(parts[0].encode()))
            name = metrics.get(_int(parts[2].encode()), parts[2])
            where = f"gpu {_short(gpu.uuid)} on {_short(gpu.hostname)}" if gpu else f"gpu id {parts[0]}"
            out.append(f"{where} metric {_short(name)} ts {_short(parts[1])} value {_short(parts[3])}")
        more = self.n - len(out)
        return "; ".join(out) + (f"; and {more} more" if more > 0 else "")


def _int(text: bytes) -> int:
    try:
        return int(text)
    except ValueError:
        return 0


def _short(text: str, limit: int = 80) -> str:
    """`repr`-escaped (NUL and other control characters visible), cut to `limit` characters."""
    shown = repr(text)[1:-1]
    return shown if len(shown) <= limit else f"{shown[:limit]}…({len(text.encode(errors='replace'))} bytes)"

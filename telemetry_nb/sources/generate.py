"""Synthetic DCGM export rows at any scale: plausible per-metric values, some idle and some busy GPUs."""

from __future__ import annotations

import csv
import random
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from telemetry_nb.sources.dcgm_csv import HEADER

FB_TOTAL_MIB = 81559
MODEL = "NVIDIA H100 80GB HBM3"
METRICS = (
    "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_MEM_COPY_UTIL", "DCGM_FI_DEV_ENC_UTIL", "DCGM_FI_DEV_DEC_UTIL",
    "DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_POWER_USAGE", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_FREE",
    "DCGM_FI_DEV_SM_CLOCK", "DCGM_FI_DEV_MEM_CLOCK",
)

@dataclass
class _Gpu:
    uuid: str
    hostname: str
    index: int
    busy: bool
    util: float
    workload: tuple[str, str, str]


def _fleet(hosts: int, gpus_per_host: int, rng: random.Random, idle_fraction: float) -> list[_Gpu]:
    fleet = []
    for h in range(hosts):
        hostname = f"gpu-node-{h + 1:03d}"
        for g in range(gpus_per_host):
            busy = rng.random() >= idle_fraction
            workload = ("ml-training", f"trainer-{h:03d}-{g // 4}", "pytorch") if busy else ("", "", "")
            fleet.append(_Gpu(
                uuid=f"GPU-{uuidlib.UUID(int=rng.getrandbits(128))}",
                hostname=hostname, index=g, busy=busy,
                util=rng.uniform(60, 100) if busy else 0.0, workload=workload,
            ))
    return fleet


def _readings(gpu: _Gpu, rng: random.Random) -> dict[str, str]:
    if gpu.busy:
        gpu.util = min(100.0, max(40.0, gpu.util + rng.gauss(0, 6)))
    else:
        gpu.util = 0.0 if rng.random() < 0.95 else rng.uniform(0, 3)
    u = gpu.util / 100.0
    power = 68 + 600 * u + rng.gauss(0, 8)
    temp = 28 + 45 * u + rng.gauss(0, 1.5)
    fb_used = int(FB_TOTAL_MIB * (0.55 + 0.4 * u)) if gpu.busy else int(rng.choice((0, 0, 512)))
    return {
        "DCGM_FI_DEV_GPU_UTIL": str(round(gpu.util)),
        "DCGM_FI_DEV_MEM_COPY_UTIL": str(round(gpu.util * rng.uniform(0.2, 0.6))),
        "DCGM_FI_DEV_ENC_UTIL": "0",
        "DCGM_FI_DEV_DEC_UTIL": "0",
        "DCGM_FI_DEV_GPU_TEMP": str(round(temp)),
        "DCGM_FI_DEV_POWER_USAGE": f"{max(55.0, power):.3f}",
        "DCGM_FI_DEV_FB_USED": str(fb_used),
        "DCGM_FI_DEV_FB_FREE": str(FB_TOTAL_MIB - fb_used),
        "DCGM_FI_DEV_SM_CLOCK": str(1980 if gpu.busy else 345),
        "DCGM_FI_DEV_MEM_CLOCK": "2619",
    }


class Scheduler:
    """Pods of `namespaces` namespaces scheduled onto GPUs for a while, then released (for `--namespaces`).

    A free GPU stays free (idle, unattributed) for a random stretch, then a new pod takes it for 5–30 % of
    the run; one pod in `idle_holder_every` holds its GPU at 0 % utilization. Deterministic per seed.
    """

    def __init__(self, namespaces: int, ticks: int, rng: random.Random, idle_fraction: float,
                 idle_holder_every: int = 5):
        self.namespaces, self.ticks, self.rng = namespaces, ticks, rng
        self.idle_fraction, self.idle_holder_every = idle_fraction, idle_holder_every
        self.pods = 0
        self.until: dict[str, int] = {}

    def _stretch(self, share_lo: float, share_hi: float) -> int:
        return max(1, int(self.ticks * self.rng.uniform(share_lo, share_hi)))

    def step(self, gpu: _Gpu, tick: int) -> None:
        """Release or schedule `gpu` when its current stretch ends at `tick`."""
        if self.until.get(gpu.uuid, 0) > tick:
            return
        if gpu.workload[1] or self.rng.random() < self.idle_fraction:  # release, or stay free a while
            gpu.workload, gpu.busy = ("", "", ""), False
            self.until[gpu.uuid] = tick + self._stretch(0.02, 0.15)
            return
        self.pods += 1
        ns = f"team-{self.rng.randrange(self.namespaces):02d}"
        gpu.workload = (ns, f"job-{self.pods:05d}", "main")
        gpu.busy = self.pods % self.idle_holder_every != 0  # every n-th pod sits on its GPU at 0 %
        gpu.util = self.rng.uniform(60, 100) if gpu.busy else 0.0
        self.until[gpu.uuid] = tick + self._stretch(0.05, 0.30)


def generate_rows(
    hosts: int,
    gpus_per_host: int,
    duration_s: float,
    interval_s: float = 1.0,
    *,
    start: datetime | None = None,
    seed: int = 0,
    idle_fraction: float = 0.3,
    namespaces: int = 0,
) -> Iterator[list[str]]:
    """Yield DCGM CSV rows (without header), tick by tick, every GPU reporting every metric each tick.

    `namespaces` > 0 schedules pods of that many namespaces onto the GPUs over time (`Scheduler`); 0 keeps
    the fixed fleet (busy GPUs owned by `ml-training` pods for the whole run).
    """
    if hosts < 1 or gpus_per_host < 1:
        raise ValueError("hosts and gpus-per-host must be at least 1")
    if interval_s <= 0 or duration_s <= 0:
        raise ValueError("duration and interval must be positive")
    rng = random.Random(seed)
    fleet = _fleet(hosts, gpus_per_host, rng, idle_fraction)
    start = (start or datetime.now(UTC).replace(microsecond=0)).astimezone(UTC)
    ticks = max(1, int(duration_s / interval_s))
    if namespaces < 0:
        raise ValueError("namespaces must be 0 or more")
    scheduler = Scheduler(namespaces, ticks, rng, idle_fraction) if namespaces else None
    for t in range(ticks):
        ts = (start + timedelta(seconds=t * interval_s)).isoformat().replace("+00:00", "Z")
        for gpu in fleet:
            if scheduler is not None:
                scheduler.step(gpu, t)
            readings = _readings(gpu, rng)
            ns, pod, container = gpu.workload
            for metric in METRICS:
                labels = (
                    f'DCGM_FI_DRIVER_VERSION="535.129.03",Hostname="{gpu.hostname}",UUID="{gpu.uuid}",'
                    f'__name__="{metric}",device="nvidia{gpu.index}",gpu="{gpu.index}",'
                    f'instance="{gpu.hostname}:9400",job="dcgm_exporter",modelName="{MODEL}"'
                )
                yield [ts, metric, str(gpu.index), f"nvidia{gpu.index}", gpu.uuid, MODEL, gpu.hostname,
                       container, pod, ns, readings[metric], labels]


def row_count(hosts: int, gpus_per_host: int, duration_s: float, interval_s: float) -> int:
    """How many rows `generate_rows` yields for these parameters."""
    return max(1, int(duration_s / interval_s)) * hosts * gpus_per_host * len(METRICS)


def write_csv(path: str | Path, rows: Iterator[list[str]], *, progress=None) -> int:
    """Write `rows` under the DCGM header, every field quoted like a real export; returns the row count."""
    n = 0
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, quoting=csv.QUOTE_ALL)
        writer.writerow(HEADER)
        for row in rows:
            writer.writerow(row)
            n += 1
            if progress is not None and n % 10000 == 0:
                progress(10000)
    if progress is not None:
        progress(n % 10000)
    return n

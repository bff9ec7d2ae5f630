"""What a source row may contain so that PostgreSQL will store it: checked where the row is read.

A value outside these limits is a rejected row (line and reason), never a batch the database refuses.
Names are index keys (`metrics.name`, `gpus.uuid`, `gpus.hostname`, `workloads(namespace, pod,
container)`): a btree entry holds at most ~2.7 kB, so names are capped well below; text may not carry
NUL (PostgreSQL refuses it) nor other control characters; `gpu_id` is an `int` column.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from telemetry_nb.timeparse import parse_timestamp

GPU_ID_MAX = 2**31 - 1
_BAD_CHAR = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")  # C0 controls, DEL, lone surrogates (not UTF-8)


@dataclass(frozen=True)
class RowLimits:
    """Limits on one row; `min_ts` and `max_future_s` bound timestamps (the clock is the reader's)."""

    metric_bytes: int = 256
    text_bytes: int = 1024
    workload_bytes: int = 2048  # namespace + pod + container together: one index entry
    min_ts: datetime = datetime(2000, 1, 1, tzinfo=UTC)
    max_future_s: float = 86400.0

    @classmethod
    def from_settings(cls, settings) -> RowLimits:
        """From `Settings.min_timestamp` (text) and `Settings.max_future_s`."""
        return cls(min_ts=parse_timestamp(settings.min_timestamp), max_future_s=settings.max_future_s)

    def check_text(self, field: str, value: str, limit: int | None = None) -> str | None:
        """Why `value` of `field` cannot be stored, or None when it can."""
        bad = _BAD_CHAR.search(value)
        if bad is not None:
            ch = bad.group()
            what = "invalid character (lone surrogate)" if ch >= "\ud800" else "control character"
            return f"{what} {ch!r} in {field}"
        limit = limit or self.text_bytes
        if len(value) * 4 > limit:  # a character is at most 4 bytes in UTF-8
            size = len(value.encode())
            if size > limit:
                return f"{field} is {size} bytes, longer than the {limit}-byte limit"
        return None

    def check_names(self, uuid: str, metric: str, hostname: str, device: str, model: str, container: str,
                    pod: str, namespace: str) -> str | None:
        """The first reason the row's names cannot be stored, or None."""
        for field, value, limit in (("metric_name", metric, self.metric_bytes), ("uuid", uuid, None),
                                    ("Hostname", hostname, None), ("device", device, None),
                                    ("modelName", model, None), ("container", container, None),
                                    ("pod", pod, None), ("namespace", namespace, None)):
            why = self.check_text(field, value, limit)
            if why is not None:
                return why
        size = len(container.encode()) + len(pod.encode()) + len(namespace.encode())
        if size > self.workload_bytes:
            return f"namespace, pod and container are {size} bytes together, longer than {self.workload_bytes}"
        return None

    def check_gpu_id(self, raw: str, value: int) -> str | None:
        if not 0 <= value <= GPU_ID_MAX:
            return f"gpu_id {raw.strip()[:40]!r} out of range 0..{GPU_ID_MAX}"
        return None

    def check_ts(self, raw: str, ts: datetime, now: datetime) -> str | None:
        if ts < self.min_ts:
            return f"timestamp {raw.strip()[:64]!r} is before {self.min_ts.isoformat().replace('+00:00', 'Z')}"
        if ts > now + timedelta(seconds=self.max_future_s):
            return (f"timestamp {raw.strip()[:64]!r} is more than {self.max_future_s:g}s ahead of the clock "
                    f"({now.isoformat(timespec='seconds').replace('+00:00', 'Z')})")
        return None

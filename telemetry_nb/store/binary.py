"""Telemetry rows in PostgreSQL's binary COPY format: what the writer sends when rows arrive that way.

Binary COPY of `(gpu_id int8, ts timestamptz, metric_id int4, value float8, workload_id int8)` is faster
for PostgreSQL than text (no number or timestamp parsing: `bench/ingest.py` prints both). A row is a
5-field tuple; one without a workload (`NULL`) is 50 bytes, one with a workload 58. A batch keeps its
`plain` rows (no workload) first, so both runs are fixed-width and whole batches are checked and their
time span read with numpy instead of Python per row.
"""

from __future__ import annotations

import struct
from datetime import UTC, datetime, timedelta

import numpy as np

HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
TRAILER = struct.pack("!h", -1)
EPOCH = datetime(2000, 1, 1, tzinfo=UTC)  # PostgreSQL's timestamp epoch (microseconds since)
_US = timedelta(microseconds=1)

_FIELDS = [("nf", ">i2"), ("l0", ">i4"), ("gpu", ">i8"), ("l1", ">i4"), ("ts", ">i8"), ("l2", ">i4"),
           ("metric", ">i4"), ("l3", ">i4"), ("value", ">f8"), ("l4", ">i4")]
PLAIN = np.dtype(_FIELDS)  # workload NULL
WITH_WORKLOAD = np.dtype([*_FIELDS, ("workload", ">i8")])
_PLAIN = struct.Struct("!hiqiqiiidi")
_WITH = struct.Struct("!hiqiqiiidiq")
PLAIN_SIZE, WITH_SIZE = _PLAIN.size, _WITH.size
_LENGTHS = (8, 8, 4, 8)


def micros(ts: datetime) -> int:
    """`ts` as PostgreSQL stores it: microseconds since 2000-01-01 UTC (a naive time is taken as UTC)."""
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return (ts - EPOCH) // _US


def row(gpu_id: int, ts_us: int, metric_id: int, value: float, workload_id: int | None) -> bytes:
    """One row tuple (50 bytes without a workload, 58 with one)."""
    if workload_id is None:
        return _PLAIN.pack(5, 8, gpu_id, 8, ts_us, 4, metric_id, 8, value, -1)
    return _WITH.pack(5, 8, gpu_id, 8, ts_us, 4, metric_id, 8, value, 8, workload_id)


def _views(rows: bytes, plain: int) -> tuple[np.ndarray, np.ndarray]:
    cut = plain * PLAIN_SIZE
    return np.frombuffer(rows, PLAIN, count=plain), np.frombuffer(rows, WITH_WORKLOAD, offset=cut)


def check(rows: bytes, plain: int, n: int) -> str | None:
    """What is wrong with `n` rows of which the first `plain` lack a workload, or None (no Python per row).

    Every byte that is not data (field count and lengths) is compared with a well-formed row's at once.
    """
    if not 0 <= plain <= n or len(rows) != plain * PLAIN_SIZE + (n - plain) * WITH_SIZE:
        return f"{len(rows)} bytes are not {plain} rows without and {n - plain} with a workload"
    cut, view = plain * PLAIN_SIZE, memoryview(rows)
    for part, (width, at, expected) in zip((view[:cut], view[cut:]), _FRAMES, strict=True):
        if not part:
            continue
        ok = (np.frombuffer(part, np.uint8).reshape(-1, width)[:, at] == expected).all(axis=1)
        if not ok.all():
            return f"row {int(np.argmin(ok))} of a binary batch is not a telemetry row"
    return None


def _frame(dtype: np.dtype, last: int) -> tuple[int, np.ndarray, np.ndarray]:
    """(row size, offsets of its non-data bytes, their values in a well-formed row) of a row layout."""
    model = np.zeros(1, dtype)
    model["nf"], model["l4"] = 5, last
    for name, size in zip(("l0", "l1", "l2", "l3"), _LENGTHS, strict=True):
        model[name] = size
    at = np.concatenate([np.arange(dtype.fields[name][1], dtype.fields[name][1] + dtype.fields[name][0].itemsize)
                         for name in ("nf", "l0", "l1", "l2", "l3", "l4")])
    return dtype.itemsize, at, np.frombuffer(model.tobytes(), np.uint8)[at]


_FRAMES = (_frame(PLAIN, -1), _frame(WITH_WORKLOAD, 8))


def timestamp(us: int) -> datetime:
    """Microseconds since 2000-01-01 as a time; ValueError past what Python's datetime holds."""
    try:
        return EPOCH + us * _US
    except OverflowError:
        raise ValueError(f"timestamp out of range: {us} microseconds from 2000-01-01") from None


def span(rows: bytes, plain: int) -> tuple[datetime, datetime] | None:
    """(oldest, newest) timestamp of the rows."""
    stamps = [a["ts"] for a in _views(rows, plain) if len(a)]
    if not stamps:
        return None
    lo, hi = min(int(s.min()) for s in stamps), max(int(s.max()) for s in stamps)
    return timestamp(lo), timestamp(hi)


def split(rows: bytes, plain: int) -> list[bytes]:
    """The row tuples one by one (for isolating refused rows: not on the fast path)."""
    cut = plain * PLAIN_SIZE
    return ([rows[i:i + PLAIN_SIZE] for i in range(0, cut, PLAIN_SIZE)]
            + [rows[i:i + WITH_SIZE] for i in range(cut, len(rows), WITH_SIZE)])


def raw_fields(one: bytes) -> tuple[int, int, int, float, int | None]:
    """One row tuple as (gpu id, microseconds since 2000, metric id, value, workload id or None)."""
    if len(one) == PLAIN_SIZE:
        _, _, gid, _, us, _, mid, _, value, _ = _PLAIN.unpack(one)
        return gid, us, mid, value, None
    _, _, gid, _, us, _, mid, _, value, _, wid = _WITH.unpack(one)
    return gid, us, mid, value, wid


def fields(one: bytes) -> tuple[int, datetime, int, float, int | None]:
    """One row tuple as (gpu id, time, metric id, value, workload id or None)."""
    gid, us, mid, value, wid = raw_fields(one)
    return gid, timestamp(us), mid, value, wid

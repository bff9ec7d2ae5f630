"""A live source's rows as arrays (`Columns`) and their encoding: the same stream entry as `codec.encode_series`.

The scraper's fast path hands the streamer a target's samples as arrays (series, metric and stamp
indices into small lists, float64 values) instead of one tuple per sample, and `encode_columns`
builds the entry with numpy: the binary COPY rows as one structured array, the side fields with
Python once per distinct series, metric and timestamp of the entry. `tests/test_scrape_fast.py`
checks that the entries are byte for byte those of `codec.encode_series` over the same rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import lru_cache

import numpy as np

from telemetry_nb.model import XID_METRIC
from telemetry_nb.pipeline import codec
from telemetry_nb.store import binary
from telemetry_nb.timeparse import parse_timestamp


class Columns:
    """Rows (series, metric, timestamp text, value): row i is (`series[sidx[i]]`, `names[midx[i]]`,
    `stamps[tidx[i]]` (`stamps[0]` when `tidx` is None), `values[i]`). The lists may be shared by many.
    """

    __slots__ = ("series", "sidx", "names", "midx", "stamps", "tidx", "values")

    def __init__(self, series: Sequence[codec.Series], sidx: np.ndarray, names: Sequence[str], midx: np.ndarray,
                 stamps: Sequence[str], tidx: np.ndarray | None, values: np.ndarray):
        self.series, self.sidx, self.names, self.midx = series, sidx, names, midx
        self.stamps, self.tidx, self.values = stamps, tidx, values

    def __len__(self) -> int:
        return len(self.values)

    def select(self, rows: slice | np.ndarray) -> Columns:
        """The rows picked by a slice or a boolean mask, in order."""
        return Columns(self.series, self.sidx[rows], self.names, self.midx[rows], self.stamps,
                       None if self.tidx is None else self.tidx[rows], self.values[rows])

    @classmethod
    def from_rows(cls, rows: Iterable[tuple[codec.Series, str, str, float]]) -> Columns:
        """Tuples (what the exact parser's path makes) as columns."""
        series: dict[codec.Series, int] = {}
        names: dict[str, int] = {}
        stamps: dict[str, int] = {}
        sidx, midx, tidx, values = [], [], [], []
        for s, name, ts, value in rows:
            sidx.append(series.setdefault(s, len(series)))
            midx.append(names.setdefault(name, len(names)))
            tidx.append(stamps.setdefault(ts, len(stamps)))
            values.append(value)
        return cls(list(series), np.array(sidx, dtype=np.intp), list(names), np.array(midx, dtype=np.intp),
                   list(stamps), np.array(tidx, dtype=np.intp), np.array(values, dtype=np.float64))


def encode_columns(parts: Sequence[Columns]) -> dict[bytes, bytes]:
    """Encode the rows of `parts`, in order, into one stream entry, exactly as `codec.encode_series` would."""
    skeys, series = _keys(parts, "series", "sidx")
    mkeys, names = _keys(parts, "names", "midx")
    tkeys, stamps = _keys(parts, "stamps", "tidx")
    values = np.concatenate([p.values for p in parts]).astype(np.float64, copy=False)
    used_s, first_s, inv_s = np.unique(skeys, return_index=True, return_inverse=True)
    objs = [series[int(k)] for k in used_s]
    gpus: dict[int, list] = {}
    inventory: dict[int, list] = {}
    workloads: dict[tuple[str, str, str], int] = {}
    seen: set[codec.Series] = set()
    for k in np.argsort(first_s, kind="stable").tolist():  # first appearance, as the row-by-row encoder meets them
        s = objs[k]
        if s in seen:
            continue
        seen.add(s)
        inv = inventory.get(s.gid)
        if inv is None:
            gpus[s.gid] = s.gpu_row
            inv = inventory[s.gid] = list(s.inventory_row)
            inv[3] = dict(s.static)
        else:
            inv[3].update(s.static)
        if s.workload is not None:
            workloads[s.workload] = s.wid
    used_m, first_m, inv_m, count_m = np.unique(mkeys, return_index=True, return_inverse=True, return_counts=True)
    mnames = [names[int(k)] for k in used_m]
    metrics: dict[str, int] = {}
    per_metric: dict[str, int] = {}
    for k in np.argsort(first_m, kind="stable").tolist():
        name = mnames[k]
        if name not in metrics:
            metrics[name] = codec.metric_key(name)
            per_metric[name] = 0
        per_metric[name] += int(count_m[k])
    used_t, inv_t = np.unique(tkeys, return_inverse=True)
    ttexts = [stamps[int(k)] for k in used_t]
    inv_s, inv_m, inv_t = inv_s.reshape(-1), inv_m.reshape(-1), inv_t.reshape(-1)

    gid = np.array([s.gid for s in objs], dtype=np.int64)[inv_s]
    wid_of = [s.wid for s in objs]
    has = np.array([w is not None for w in wid_of], dtype=bool)[inv_s]
    us = np.array([_micros(t) for t in ttexts], dtype=np.int64)[inv_t]
    mid = np.array([metrics[n] for n in mnames], dtype=np.int32)[inv_m]
    plain = ~has
    rows = np.empty(int(plain.sum()), dtype=binary.PLAIN)
    _fill(rows, gid[plain], us[plain], mid[plain], values[plain], -1)
    with_workload = np.empty(len(values) - len(rows), dtype=binary.WITH_WORKLOAD)
    _fill(with_workload, gid[has], us[has], mid[has], values[has], 8)
    with_workload["workload"] = np.array([w or 0 for w in wid_of], dtype=np.int64)[inv_s[has]]

    events: list[list] = []
    xid = np.array([n == XID_METRIC for n in mnames], dtype=bool)[inv_m]
    if xid.any():
        v = values[xid]
        for i in np.flatnonzero(xid)[np.isfinite(v) & (v == np.floor(v))].tolist():
            s = objs[inv_s[i]]
            events.append([s.gid, ttexts[inv_t[i]], "xid", int(values[i]), s.err_msg])
    return codec.entry_fields(len(values), len(rows), rows.tobytes() + with_workload.tobytes(), gpus.values(),
                              metrics, per_metric, workloads, inventory.values(), events)


def _keys(parts: Sequence[Columns], table: str, index: str) -> tuple[np.ndarray, list]:
    """The parts' indices into their lists as indices into one list made of all the distinct lists."""
    bases: dict[int, int] = {}
    joined: list = []
    keys = []
    for p in parts:
        items = getattr(p, table)
        base = bases.get(id(items))
        if base is None:
            base = bases[id(items)] = len(joined)
            joined.extend(items)
        idx = getattr(p, index)
        keys.append(np.full(len(p), base, dtype=np.intp) if idx is None else idx + base)
    return np.concatenate(keys) if keys else np.zeros(0, dtype=np.intp), joined


def _fill(rows: np.ndarray, gid: np.ndarray, us: np.ndarray, mid: np.ndarray, values: np.ndarray, last: int) -> None:
    rows["nf"], rows["l0"], rows["gpu"], rows["l1"], rows["ts"] = 5, 8, gid, 8, us
    rows["l2"], rows["metric"], rows["l3"], rows["value"], rows["l4"] = 4, mid, 8, values, last


@lru_cache(maxsize=4096)
def _micros(ts: str) -> int:
    return binary.micros(parse_timestamp(ts))

"""A live source's rows as arrays (`Columns`) and their encoding: the same stream entry as `codec.encode_series`.

The scraper's fast path hands the streamer a target's samples as arrays (series, metric and stamp
indices into small lists, float64 values) instead of one tuple per sample, and `encode_batches`
builds the entries with numpy: the binary COPY rows as structured arrays over all rows at once, the
side fields with Python once per entry and distinct series, metric and timestamp. `tests/test_scrape_fast.py`
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


def encode_batches(parts: Sequence[Columns], size: int) -> list[tuple[dict[bytes, bytes], int]]:
    """The rows of `parts`, in order, cut into entries of `size` rows: what `codec.encode_series` makes of each
    cut, byte for byte. Numpy works over all rows at once; Python once per (entry, distinct series / metric)."""
    parts = [p for p in parts if len(p)]
    if not parts:
        return []
    skeys, series = _keys(parts, "series", "sidx")
    mkeys, names = _keys(parts, "names", "midx")
    tkeys, stamps = _keys(parts, "stamps", "tidx")
    values = np.concatenate([p.values for p in parts]).astype(np.float64, copy=False)
    n = len(values)
    batch = np.arange(n) // size
    used_s, sk = np.unique(skeys, return_inverse=True)
    used_m, mk = np.unique(mkeys, return_inverse=True)
    names_of = {}  # the same name may come from several lists: one index per name
    name_index = np.array([names_of.setdefault(names[k], len(names_of)) for k in used_m.tolist()], dtype=np.intp)
    used_t, tk = np.unique(tkeys, return_inverse=True)
    sk, tk = sk.reshape(-1), tk.reshape(-1)
    mk = name_index[mk.reshape(-1)]
    objs = [series[k] for k in used_s.tolist()]
    mnames = list(names_of)
    ttexts = [stamps[k] for k in used_t.tolist()]
    mids = [codec.metric_key(name) for name in mnames]

    gid = np.array([s.gid for s in objs], dtype=np.int64)[sk]
    has = np.array([s.wid is not None for s in objs], dtype=bool)[sk]
    us = np.array([_micros(t) for t in ttexts], dtype=np.int64)[tk]
    mid = np.array(mids, dtype=np.int32)[mk]
    plain = ~has
    plain_rows = np.empty(int(plain.sum()), dtype=binary.PLAIN)
    _fill(plain_rows, gid[plain], us[plain], mid[plain], values[plain], -1)
    workload_rows = np.empty(n - len(plain_rows), dtype=binary.WITH_WORKLOAD)
    _fill(workload_rows, gid[has], us[has], mid[has], values[has], 8)
    workload_rows["workload"] = np.array([s.wid or 0 for s in objs], dtype=np.int64)[sk[has]]
    plain_before = np.concatenate(([0], np.cumsum(plain)))

    cuts = list(range(0, n, size)) + [n]
    count = len(cuts) - 1
    gpus: list[dict[int, list]] = [{} for _ in range(count)]
    inventory: list[dict[int, list]] = [{} for _ in range(count)]
    workloads: list[dict[tuple[str, str, str], int]] = [{} for _ in range(count)]
    seen: list[set[codec.Series]] = [set() for _ in range(count)]
    in_batch, which, _ = _firsts(batch, sk, len(objs))
    for b, k in zip(in_batch, which, strict=True):  # each entry's series in order of first appearance
        s = objs[k]
        if s in seen[b]:
            continue
        seen[b].add(s)
        inv = inventory[b].get(s.gid)
        if inv is None:
            gpus[b][s.gid] = s.gpu_row
            inv = inventory[b][s.gid] = list(s.inventory_row)
            inv[3] = dict(s.static)
        else:
            inv[3].update(s.static)
        if s.workload is not None:
            workloads[b][s.workload] = s.wid
    in_batch, which, rows_of = _firsts(batch, mk, len(mnames))  # each entry's metrics in order, and their rows
    bounds = np.searchsorted(np.array(in_batch, dtype=np.int64), np.arange(count + 1)).tolist()
    metrics, per_metric = [], []
    for b in range(count):
        these = [mnames[k] for k in which[bounds[b]:bounds[b + 1]]]
        metrics.append(dict(zip(these, [mids[k] for k in which[bounds[b]:bounds[b + 1]]], strict=True)))
        per_metric.append(dict(zip(these, rows_of[bounds[b]:bounds[b + 1]], strict=True)))
    events: list[list[list]] = [[] for _ in range(count)]
    xid = np.array([name == XID_METRIC for name in mnames], dtype=bool)[mk]
    if xid.any():
        v = values[xid]
        for i in np.flatnonzero(xid)[np.isfinite(v) & (v == np.floor(v))].tolist():
            s = objs[sk[i]]
            events[i // size].append([s.gid, ttexts[tk[i]], "xid", int(values[i]), s.err_msg])
    out = []
    for b in range(count):
        lo, hi = cuts[b], cuts[b + 1]
        p_lo, p_hi = int(plain_before[lo]), int(plain_before[hi])
        rows = plain_rows[p_lo:p_hi].tobytes() + workload_rows[lo - p_lo:hi - p_hi].tobytes()
        out.append((codec.entry_fields(hi - lo, p_hi - p_lo, rows, gpus[b].values(), metrics[b], per_metric[b],
                                       workloads[b], inventory[b].values(), events[b]), hi - lo))
    return out


def _firsts(batch: np.ndarray, key: np.ndarray, width: int) -> tuple[list[int], list[int], list[int]]:
    """Per distinct (batch, key), in order of first appearance: the batch, the key and how many rows have it."""
    group = batch * width + key
    order = np.argsort(group, kind="stable")
    ordered = group[order]
    starts = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))
    sizes = np.diff(np.append(starts, len(group)))
    first_rows = order[starts]
    by_row = np.argsort(first_rows, kind="stable")
    groups = ordered[starts][by_row]
    return (groups // width).tolist(), (groups % width).tolist(), sizes[by_row].tolist()


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

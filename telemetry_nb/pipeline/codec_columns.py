"""`codec.encode` for columnar samples (`dcgm_fast.Columns`): the same stream entries, byte for byte.

The binary COPY rows are filled into numpy structured arrays; the side fields are built once per
distinct GPU, metric and workload of a batch, so no Python runs per row (only per XID reading, which
becomes an event).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime

import numpy as np

from telemetry_nb.model import XID_METRIC
from telemetry_nb.pipeline.codec import VERSION, _informative, gpu_key, metric_key, workload_key
from telemetry_nb.sources.dcgm_fast import Columns
from telemetry_nb.store import binary

_SEP = (",", ":")


def encode_columns(cols: Columns, batch_size: int, shard: tuple[int, int] = (0, 1),
                   shard_of: Callable[[str, int], int] | None = None, partitions: int = 1,
                   partition_of: Callable[[str, int], int] | None = None) -> list[tuple[dict[bytes, bytes], int, int]]:
    """(entry, rows, partition) of `batch_size` rows each, after keeping only shard `shard` = (I, N) by
    `shard_of(uuid, N)`, batched per stream partition (`partition_of(uuid, partitions)`)."""
    series = cols.series
    uuid = cols.uuid_of[series] if len(series) else np.empty(0, np.int64)
    if not len(series):
        return []
    used = np.unique(uuid)
    shard_i, shard_n = shard
    keep = None
    if shard_n > 1:
        mine = np.zeros(len(cols.uuids), bool)
        mine[used] = [shard_of(cols.uuids[u], shard_n) == shard_i for u in used.tolist()]
        keep = mine[uuid]
    part = None
    if partitions > 1:
        of = np.zeros(len(cols.uuids), np.int64)
        of[used] = [partition_of(cols.uuids[u], partitions) for u in used.tolist()]
        part = of[uuid]
    values = cols.value
    out = []
    for p in range(partitions if part is not None else 1):
        mask = keep if part is None else (part == p if keep is None else keep & (part == p))
        rows_idx = None if mask is None or mask.all() else np.flatnonzero(mask)
        out += [(fields, n, p) for fields, n in _encode_rows(cols, rows_idx, values, batch_size)]
    return out


def _encode_rows(cols: Columns, rows_idx: np.ndarray | None, values: np.ndarray, batch_size: int
                 ) -> list[tuple[dict[bytes, bytes], int]]:
    """Entries of the rows `rows_idx` (all when None), in order, `batch_size` rows each."""
    series = cols.series
    uuid = cols.uuid_of[series]
    if rows_idx is not None:
        series, uuid = series[rows_idx], uuid[rows_idx]
        gpu, metric, workload, ts = (c[rows_idx] for c in (cols.gpu, cols.metric, cols.workload, cols.ts))
        values = values[rows_idx]
    else:
        gpu, metric, workload, ts = cols.gpu, cols.metric, cols.workload, cols.ts
    n = len(series)
    if n == 0:
        return []
    # ids and times only of the GPUs, metrics, workloads and timestamps these rows use (the tables are larger)
    gids, gid_of = _gids(cols)
    m_used, m_row = np.unique(metric, return_inverse=True)
    mids = {m: metric_key(cols.metrics[m]) for m in m_used.tolist()}
    w_used, w_row = np.unique(workload, return_inverse=True)
    wids = {w: workload_key(*cols.workloads[w]) for w in w_used.tolist() if w >= 0}
    t_used, t_row = np.unique(ts, return_inverse=True)
    row_gid = gid_of[uuid]
    row_mid = np.array([mids[m] for m in m_used.tolist()], np.int64)[m_row.reshape(-1)]
    row_wid = np.array([wids.get(w, 0) for w in w_used.tolist()], np.int64)[w_row.reshape(-1)]
    row_us = np.array([binary.micros(datetime.fromisoformat(cols.ts_text[t])) for t in t_used.tolist()],
                      np.int64)[t_row.reshape(-1)]
    xid = cols.metrics.index(XID_METRIC) if XID_METRIC in cols.metrics else -1
    entries = []
    for a in range(0, n, batch_size):
        b = min(a + batch_size, n)
        fields = {
            b"v": VERSION,
            b"n": str(b - a).encode(),
        }
        gpus, inventory = _gpus(cols, gids, uuid[a:b], gpu[a:b], series[a:b])
        fields[b"gpus"] = gpus
        fields[b"metrics"] = _metrics(cols, mids, metric[a:b])
        fields[b"workloads"] = _workloads(cols, wids, workload[a:b])
        fields[b"inventory"] = inventory
        fields[b"events"] = _events(cols, gids, xid, uuid[a:b], metric[a:b], ts[a:b], series[a:b], values, a)
        plain = workload[a:b] < 0
        fields[b"plain"] = str(int(plain.sum())).encode()
        fields[b"rows"] = b"".join(_binary(sel + a, row_gid, row_us, row_mid, values, row_wid, with_workload)
                                   for sel, with_workload in ((np.flatnonzero(plain), False),
                                                              (np.flatnonzero(~plain), True)))
        entries.append((fields, b - a))
    return entries


def _gids(cols: Columns) -> tuple[list[int], np.ndarray]:
    """Each uuid's GPU id (`gpu_key`), by uuid code, as a list and an array; kept with the tables, grown with them."""
    got = cols.cache.get("gids")
    if got is None or len(got[0]) < len(cols.uuids):
        known = got[0] if got is not None else []
        ids = known + [gpu_key(u) for u in cols.uuids[len(known):]]
        got = cols.cache["gids"] = (ids, np.asarray(ids, np.int64))
    return got


def _binary(rows: np.ndarray, gid: np.ndarray, us: np.ndarray, mid: np.ndarray, value: np.ndarray, wid: np.ndarray,
            with_workload: bool) -> bytes:
    """Binary COPY tuples (`store.binary`) of the rows `rows`, in order."""
    if not len(rows):
        return b""
    out = np.empty(len(rows), binary.WITH_WORKLOAD if with_workload else binary.PLAIN)
    out["nf"], out["l0"], out["l1"], out["l2"], out["l3"] = 5, 8, 8, 4, 8
    out["gpu"], out["ts"], out["metric"], out["value"] = gid[rows], us[rows], mid[rows], value[rows]
    if with_workload:
        out["l4"], out["workload"] = 8, wid[rows]
    else:
        out["l4"] = -1
    return out.tobytes()


def _first(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct codes in order of first appearance, and each one's first position."""
    uniq, first = np.unique(codes, return_index=True)
    order = np.argsort(first, kind="stable")
    return uniq[order], first[order]


def _gpus(cols: Columns, gids: list[int], uuid: np.ndarray, gpu: np.ndarray, series: np.ndarray
          ) -> tuple[bytes, bytes]:
    """The `gpus` and `inventory` fields: per GPU its first row's attributes, static labels merged in row order."""
    us, first = _first(uuid)
    static = cols.static_of[series]
    pairs = np.unique(uuid * (len(cols.statics) + 1) + static)
    merged: dict[int, dict] = {}
    if len(pairs) != len(us):  # some GPU has rows with different static labels: merge like dict.update in order
        key = uuid * (len(cols.statics) + 1) + static
        uk, f_idx = np.unique(key, return_index=True)
        _, l_rev = np.unique(key[::-1], return_index=True)
        l_idx = len(key) - 1 - l_rev
        by_u: dict[int, list[tuple[int, int, int]]] = {}
        for k, f, last in zip(uk.tolist(), f_idx.tolist(), l_idx.tolist(), strict=True):
            u, s = divmod(k, len(cols.statics) + 1)
            by_u.setdefault(u, []).append((f, last, s))
        for u, items in by_u.items():
            if len(items) > 1:
                d: dict[str, str] = {}
                for _, _, s in sorted(items):
                    for k in cols.statics[s]:
                        d.setdefault(k, "")
                for _, _, s in sorted(items, key=lambda t: t[1]):
                    d.update(cols.statics[s])
                merged[u] = d
    cache = cols.cache
    gpu_rows, inv_rows = [], []
    for u, r in zip(us.tolist(), first.tolist(), strict=True):
        g, sc = int(gpu[r]), int(series[r])
        text = cache.get((u, g))
        if text is None:
            host, index, device, model = cols.gpus[g]
            text = cache[(u, g)] = json.dumps([gids[u], cols.uuids[u], host, index, device, model], separators=_SEP)
        gpu_rows.append(text)
        if u in merged:
            text = _inventory(gids[u], cols.idents[sc], merged[u])
        else:
            key = ("i", u, sc)
            text = cache.get(key)
            if text is None:
                text = cache[key] = _inventory(gids[u], cols.idents[sc], cols.statics[cols.static_of[sc]])
        if text:
            inv_rows.append(text)
    return f"[{','.join(gpu_rows)}]".encode(), f"[{','.join(inv_rows)}]".encode()


def _inventory(gid: int, ident: tuple, static: dict[str, str]) -> str:
    """One inventory row as JSON, or '' when it carries nothing beyond the defaults."""
    inv = [gid, *ident[:2], static, *ident[2:]]
    return json.dumps(inv, separators=_SEP) if _informative(inv) else ""


def _metrics(cols: Columns, mids: dict[int, int], metric: np.ndarray) -> bytes:
    uniq, first, counts = np.unique(metric, return_index=True, return_counts=True)
    order = np.argsort(first, kind="stable")
    return json.dumps([[mids[m], cols.metrics[m], c] for m, c in zip(uniq[order].tolist(), counts[order].tolist(),
                                                                       strict=True)], separators=_SEP).encode()


def _workloads(cols: Columns, wids: dict[int, int], workload: np.ndarray) -> bytes:
    ws, _ = _first(workload[workload >= 0])
    return json.dumps([[wids[w], *cols.workloads[w]] for w in ws.tolist()], separators=_SEP).encode()


def _events(cols: Columns, gids: list[int], xid: int, uuid: np.ndarray, metric: np.ndarray, ts: np.ndarray,
            series: np.ndarray, values: np.ndarray, offset: int) -> bytes:
    """Every integer XID reading of the batch (the rows of metric `XID_METRIC`)."""
    if xid < 0:
        return b"[]"
    rows = np.flatnonzero(metric == xid)
    events = []
    for r, v in zip(rows.tolist(), values[rows + offset].tolist(), strict=True):
        if v.is_integer():
            events.append([gids[int(uuid[r])], cols.ts_text[ts[r]], "xid", int(v), cols.err_msg[series[r]]])
    return json.dumps(events, separators=_SEP).encode()

"""One versioned encoding of a batch of samples into a Redis stream entry, and back.

The rows travel already in the shape of the `telemetry` table (`gpu_id, ts, metric_id, value,
workload_id`), so a collector COPYs a batch straight into the table with no per-row Python work.
Version 2 (what `encode` and `encode_series` write) carries them as binary COPY tuples
(`store.binary`: PostgreSQL parses no numbers or timestamps), rows without a workload first and
their count in `plain`; version 1 carries COPY text (older streamers; `as_text` writes it) and
still decodes. The ids are content hashes (`gpu_key`, `metric_key`, `workload_key`), so a streamer
needs no lookups and every process derives the same id. The batch's GPU inventory, metric names and
workloads travel as small JSON side fields for the upserts. Two optional side fields came later
(entries without them still decode): `inventory` (PCI bus id, driver version, static labels, MIG
parent/profile/instance per GPU) and `events` (every XID reading: GPU, time, code, message), from
which the writer derives XID change events.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import replace
from datetime import datetime
from functools import lru_cache

import orjson

from telemetry_nb.model import XID_METRIC, Sample, static_labels
from telemetry_nb.store import binary
from telemetry_nb.store.rows import EventRow, GpuRow, InventoryRow, MetricRow, RowBatch, WorkloadRow
from telemetry_nb.timeparse import parse_timestamp

VERSION = b"2"  # binary COPY rows; entries of version 1 (text rows: the scraper's, older streamers') still decode
TEXT_VERSION = b"1"
VERSIONS = (TEXT_VERSION, VERSION)


class CodecError(ValueError):
    """A stream entry that this version cannot decode; it goes to the dead-letter stream."""


@lru_cache(maxsize=65536)
def gpu_key(uuid: str) -> int:
    """The GPU's row id: a signed 64-bit hash of its uuid (collisions are caught by the primary key)."""
    return int.from_bytes(hashlib.blake2b(uuid.encode(), digest_size=8).digest(), "big", signed=True)


@lru_cache(maxsize=4096)
def metric_key(name: str) -> int:
    """The metric's id: a signed 32-bit hash of its name."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4).digest(), "big", signed=True)


@lru_cache(maxsize=65536)
def workload_key(namespace: str, pod: str, container: str) -> int:
    """The workload's id: a signed 64-bit hash of (namespace, pod, container)."""
    raw = f"{namespace}\0{pod}\0{container}".encode()
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "big", signed=True)


def encode(samples: Iterable[Sample]) -> dict[bytes, bytes]:
    """Encode samples into the fields of one stream entry (`XADD` takes the dict as is)."""
    plain: list[bytes] = []
    with_workload: list[bytes] = []
    gpus: dict[str, list] = {}
    metrics: dict[str, int] = {}
    per_metric: dict[str, int] = {}
    workloads: dict[tuple[str, str, str], int] = {}
    ts_text: dict[datetime, str] = {}
    ts_us: dict[datetime, int] = {}
    inventory: dict[str, list] = {}
    merged: dict[str, object] = {}  # per GPU, the last labels dict merged (sources share one per series)
    events: list[list] = []
    for s in samples:
        us = ts_us.get(s.ts)
        if us is None:
            us = ts_us[s.ts] = binary.micros(s.ts)
        gpu = gpus.get(s.uuid)
        if gpu is None:
            gpu = gpus[s.uuid] = [gpu_key(s.uuid), s.uuid, s.hostname, s.gpu_index, s.device, s.model_name]
            inventory[s.uuid] = [0, s.pci_bus_id, s.driver_version, static_labels(s.labels), s.parent_uuid,
                                 s.mig_profile, s.mig_instance]
            merged[s.uuid] = s.labels
        elif s.labels and merged[s.uuid] is not s.labels:
            inventory[s.uuid][3].update(static_labels(s.labels))
            merged[s.uuid] = s.labels
        mid = metrics.get(s.metric)
        if mid is None:
            mid = metrics[s.metric] = metric_key(s.metric)
            per_metric[s.metric] = 0
        per_metric[s.metric] += 1
        if s.pod or s.namespace or s.container:
            wkey = (s.namespace, s.pod, s.container)
            wid = workloads.get(wkey)
            if wid is None:
                wid = workloads[wkey] = workload_key(*wkey)
            with_workload.append(binary.row(gpu[0], us, mid, float(s.value), wid))
        else:
            plain.append(binary.row(gpu[0], us, mid, float(s.value), None))
        if s.metric == XID_METRIC and float(s.value).is_integer():
            ts = ts_text.get(s.ts)
            if ts is None:
                ts = ts_text[s.ts] = s.ts.isoformat()
            events.append([gpu[0], ts, "xid", int(s.value), s.labels.get("err_msg", "")])
    for uuid, inv in inventory.items():
        inv[0] = gpus[uuid][0]
    return _binary_fields(plain, with_workload, gpus.values(), metrics, per_metric, workloads, inventory.values(),
                          events)


def _binary_fields(plain: list[bytes], with_workload: list[bytes], gpus: Iterable[list], metrics: dict[str, int],
                   per_metric: dict[str, int], workloads: dict[tuple[str, str, str], int], inventory: Iterable[list],
                   events: list[list]) -> dict[bytes, bytes]:
    return entry_fields(len(plain) + len(with_workload), len(plain), b"".join(plain) + b"".join(with_workload), gpus,
                        metrics, per_metric, workloads, inventory, events)


def entry_fields(n: int, plain: int, rows: bytes, gpus: Iterable[list], metrics: dict[str, int],
                 per_metric: dict[str, int], workloads: dict[tuple[str, str, str], int], inventory: Iterable[list],
                 events: list[list]) -> dict[bytes, bytes]:
    """A version-2 entry of `n` binary rows (the first `plain` without a workload) and its side fields."""
    return {
        b"v": VERSION,
        b"n": str(n).encode(),
        b"plain": str(plain).encode(),
        b"gpus": json.dumps(list(gpus), separators=(",", ":")).encode(),
        b"metrics": json.dumps([[int(i), n, per_metric[n]] for n, i in metrics.items()],
                               separators=(",", ":")).encode(),
        b"workloads": json.dumps([[int(i), *w] for w, i in workloads.items()], separators=(",", ":")).encode(),
        b"inventory": json.dumps([i for i in inventory if _informative(i)], separators=(",", ":")).encode(),
        b"events": json.dumps(events, separators=(",", ":")).encode(),
        b"rows": rows,
    }


def as_text(fields: dict[bytes, bytes]) -> dict[bytes, bytes]:
    """A version-2 entry rewritten as version 1 (COPY text rows), as streamers before binary rows wrote it."""
    batch = decode(fields)
    if batch.plain is None:
        return fields
    lines = []
    for line in batch.lines():
        gid, ts, mid, value, wid = binary.fields(line)
        lines.append(f"{gid}\t{ts.isoformat()}\t{mid}\t{value!r}\t{wid if wid is not None else chr(92) + 'N'}\n")
    return encode_batch(replace(batch, rows="".join(lines).encode(), plain=None))


def encode_batch(batch: RowBatch) -> dict[bytes, bytes]:
    """A `RowBatch` back into stream-entry fields (a dead-lettered subset stays replayable as is)."""
    extra = {} if batch.plain is None else {b"plain": str(batch.plain).encode()}
    return {
        b"v": TEXT_VERSION if batch.plain is None else VERSION,
        **extra,
        b"n": str(batch.n).encode(),
        b"gpus": json.dumps([list(g) for g in batch.gpus], separators=(",", ":")).encode(),
        b"metrics": json.dumps([list(m) for m in batch.metrics], separators=(",", ":")).encode(),
        b"workloads": json.dumps([list(w) for w in batch.workloads], separators=(",", ":")).encode(),
        b"inventory": json.dumps([list(i) for i in batch.inventory], separators=(",", ":")).encode(),
        b"events": json.dumps([[e.gpu_id, e.ts.isoformat(), e.kind, e.code, e.message] for e in batch.events],
                              separators=(",", ":")).encode(),
        b"rows": batch.rows,
    }


class Series:
    """What every sample of one series shares (a `Sample` minus metric, time and value), ids worked out once.

    For live sources whose series repeat every scrape: `encode_series` then does per sample only what
    differs (the row text and the per-metric counts), the same entry `encode` would make.
    """

    __slots__ = ("uuid", "gid", "wid", "workload", "gpu_row", "inventory_row", "static", "err_msg", "_shard")

    def __init__(self, t: Sample):
        self.uuid = t.uuid
        self.gid = gpu_key(t.uuid)
        self.workload = (t.namespace, t.pod, t.container) if (t.pod or t.namespace or t.container) else None
        self.wid = workload_key(*self.workload) if self.workload else None
        self.gpu_row = [self.gid, t.uuid, t.hostname, t.gpu_index, t.device, t.model_name]
        self.static = static_labels(t.labels)
        self.inventory_row = [self.gid, t.pci_bus_id, t.driver_version, self.static, t.parent_uuid, t.mig_profile,
                              t.mig_instance]
        self.err_msg = t.labels.get("err_msg", "")
        self._shard: tuple[int, int] = (0, -1)

    def shard(self, count: int, shard_of) -> int:
        """This series' shard of `count` (by `shard_of(uuid, count)`), remembered."""
        if self._shard[0] != count:
            self._shard = (count, shard_of(self.uuid, count))
        return self._shard[1]


def encode_series(rows: Iterable[tuple[Series, str, str, float]]) -> dict[bytes, bytes]:
    """Encode (series, metric, timestamp text, value) rows into one stream entry, exactly as `encode` would."""
    plain: list[bytes] = []
    with_workload: list[bytes] = []
    gpus: dict[int, list] = {}
    inventory: dict[int, list] = {}
    metrics: dict[str, int] = {}
    per_metric: dict[str, int] = {}
    workloads: dict[tuple[str, str, str], int] = {}
    events: list[list] = []
    seen: set[Series] = set()
    stamps: dict[str, int] = {}
    row = binary.row
    for series, metric, ts, value in rows:
        if series not in seen:
            seen.add(series)
            gid = series.gid
            inv = inventory.get(gid)
            if inv is None:
                gpus[gid] = series.gpu_row
                inv = inventory[gid] = list(series.inventory_row)
                inv[3] = dict(series.static)
            else:
                inv[3].update(series.static)
            if series.workload is not None:
                workloads[series.workload] = series.wid
        mid = metrics.get(metric)
        if mid is None:
            mid = metrics[metric] = metric_key(metric)
            per_metric[metric] = 0
        per_metric[metric] += 1
        us = stamps.get(ts)
        if us is None:
            us = stamps[ts] = binary.micros(parse_timestamp(ts))
        if series.wid is None:
            plain.append(row(series.gid, us, mid, float(value), None))
        else:
            with_workload.append(row(series.gid, us, mid, float(value), series.wid))
        if metric == XID_METRIC and float(value).is_integer():
            events.append([series.gid, ts, "xid", int(value), series.err_msg])
    return _binary_fields(plain, with_workload, gpus.values(), metrics, per_metric, workloads, inventory.values(),
                          events)


def _informative(inv: list) -> bool:
    """An inventory row worth sending: it carries something beyond the defaults."""
    return bool(inv[1] or inv[2] or inv[3] or inv[4] or inv[5] or inv[6] is not None)


def decode(fields: dict[bytes, bytes]) -> RowBatch:
    """Decode a stream entry; raises `CodecError` naming what is wrong with it."""
    version = fields.get(b"v")
    if version not in VERSIONS:
        raise CodecError(f"unsupported batch encoding version {version!r} (this collector reads "
                         f"{b' and '.join(VERSIONS)!r})")
    try:
        n = int(fields[b"n"])
        plain = int(fields[b"plain"]) if version == VERSION else None
        rows = fields[b"rows"]
        gpus = _gpus(fields[b"gpus"])
        metrics = orjson.loads(fields[b"metrics"])
        workloads = _workloads(fields.get(b"workloads", b"[]"))
        inventory = _inventory(fields.get(b"inventory", b"[]"))
        events = orjson.loads(fields.get(b"events", b"[]"))
    except KeyError as err:
        raise CodecError(f"batch entry lacks field '{err.args[0].decode(errors='replace')}'") from None
    except (ValueError, TypeError) as err:
        if isinstance(err, CodecError):
            raise
        raise CodecError(f"batch entry is malformed: {err}") from None
    _check_shape(rows, metrics)
    _check_events(events)
    if plain is None:
        carried = rows.count(b"\n")
        if carried != n:
            raise CodecError(f"batch entry says n={n} but carries {carried} rows")
    else:
        wrong = binary.check(rows, plain, n)
        if wrong:
            raise CodecError(f"batch entry (n={n}, plain={plain}) is malformed: {wrong}")
    return RowBatch(n=n, rows=rows, gpus=list(gpus), metrics=[MetricRow(*m) for m in metrics],
                    workloads=list(workloads), inventory=list(inventory),
                    events=[EventRow(e[0], parse_timestamp(e[1]), *e[2:]) for e in events], plain=plain)


def _bad(what: str, row: object) -> CodecError:
    return CodecError(f"batch entry has a malformed {what} row: {row!r:.200}")


class _Checked:
    """Side rows already checked, by id: a row equal to the one seen last for its id is taken as it is.

    The fields of consecutive entries carry the same GPUs' rows again and again, though rarely the same
    set of GPUs, so this saves the checks and the tuple per row. Bounded: forgotten at `limit` ids.
    """

    def __init__(self, what: str, valid: Callable[[object], bool], make: Callable[[list], tuple],
                 not_a_list: str = "batch entry side fields are not lists", limit: int = 200_000):
        self.what, self.valid, self.make, self.not_a_list, self.limit = what, valid, make, not_a_list, limit
        self.rows: dict[int, tuple[list, tuple]] = {}

    def __call__(self, raw: bytes) -> tuple:
        parsed = orjson.loads(raw)
        if not isinstance(parsed, list):
            raise CodecError(self.not_a_list)
        seen, out = self.rows, []
        for r in parsed:
            key = r[0] if type(r) is list and r and type(r[0]) is int else None
            hit = seen.get(key) if key is not None else None
            if hit is not None and hit[0] == r:
                out.append(hit[1])
                continue
            if not self.valid(r):
                raise _bad(self.what, r)
            row = self.make(r)
            if len(seen) >= self.limit:
                seen.clear()
            seen[key] = (r, row)
            out.append(row)
        return tuple(out)


def _valid_gpu(g: object) -> bool:
    return (isinstance(g, list) and len(g) == 6 and isinstance(g[0], int) and isinstance(g[1], str)
            and isinstance(g[2], str) and (g[3] is None or isinstance(g[3], int))
            and isinstance(g[4], str) and isinstance(g[5], str))


def _valid_workload(w: object) -> bool:
    return isinstance(w, list) and len(w) == 4 and isinstance(w[0], int) and all(isinstance(x, str) for x in w[1:])


def _valid_inventory(i: object) -> bool:
    return (isinstance(i, list) and len(i) == 7 and isinstance(i[0], int)
            and all(isinstance(x, str) for x in (i[1], i[2], i[4], i[5]))
            and isinstance(i[3], dict) and all(isinstance(v, str) for v in i[3].values())
            and (i[6] is None or isinstance(i[6], int)))


# Identical fields (the same GPUs batch after batch) are parsed once; rows seen before are not checked
# again. Rows are tuples; nothing downstream mutates them.
_gpus = lru_cache(maxsize=1024)(_Checked("gpus", _valid_gpu, GpuRow._make))
_workloads = lru_cache(maxsize=1024)(_Checked("workloads", _valid_workload, WorkloadRow._make))
_inventory = lru_cache(maxsize=1024)(_Checked("inventory", _valid_inventory, InventoryRow._make,
                                              "batch entry inventory/events are not lists"))


def _check_events(events: object) -> None:
    """The optional events field, refused here when malformed (like `_check_shape`)."""
    if not isinstance(events, list):
        raise CodecError("batch entry inventory/events are not lists")
    for e in events:
        ok = (isinstance(e, list) and len(e) == 5 and isinstance(e[0], int) and isinstance(e[1], str)
              and isinstance(e[2], str) and isinstance(e[3], int) and isinstance(e[4], str))
        if ok:
            try:
                parse_timestamp(e[1])
            except ValueError:
                ok = False
        if not ok:
            raise _bad("events", e)


def _check_shape(rows: object, metrics: object) -> None:
    """Refuse fields of the wrong shape here, so they can never break a collector's transaction."""
    if not isinstance(rows, bytes):
        raise CodecError("batch entry rows are not bytes")
    if not isinstance(metrics, list):
        raise CodecError("batch entry side fields are not lists")
    for m in metrics:
        if not (isinstance(m, list) and len(m) in (2, 3) and isinstance(m[0], int) and isinstance(m[1], str)
                and (len(m) == 2 or isinstance(m[2], int))):
            raise _bad("metrics", m)


def decode_samples(batch: RowBatch) -> list[Sample]:
    """Rows of a batch back as `Sample`s, names and inventory filled from the side fields (for tools and tests)."""
    gpus = {g.id: g for g in batch.gpus}
    metrics = {m.id: m.name for m in batch.metrics}
    workloads = {w.id: (w.namespace, w.pod, w.container) for w in batch.workloads}
    inventory = {i.id: i for i in batch.inventory}
    out = []
    for line in batch.lines():
        if batch.binary:
            gid, when, mid, value, wid = binary.fields(line)
        else:
            gid, ts, mid, value, wid = line.decode().rstrip("\n").split("\t")
            gid, when, mid, value, wid = int(gid), parse_timestamp(ts), int(mid), float(value), (
                int(wid) if wid != "\\N" else None)
        g = gpus[gid]
        ns, pod, container = workloads[wid] if wid is not None else ("", "", "")
        out.append(Sample(uuid=g.uuid, metric=metrics[mid], ts=when, value=value,
                          hostname=g.hostname, gpu_index=g.gpu_index, device=g.device, model_name=g.model_name,
                          namespace=ns, pod=pod, container=container))
        inv = inventory.get(gid)
        if inv is not None:
            last = out[-1]
            last.labels = dict(inv.labels)
            last.pci_bus_id, last.driver_version, last.parent_uuid = inv.pci_bus_id, inv.driver_version, inv.parent_uuid
            last.mig_profile, last.mig_instance = inv.mig_profile, inv.mig_instance
    return out

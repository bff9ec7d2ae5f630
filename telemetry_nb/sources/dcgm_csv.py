"""Stream `Sample`/`Rejected` from a dcgm-exporter CSV export, by header name, in constant memory.

Handles what real exports contain: any column order, extra columns, BOM, CRLF, quoted fields,
fractional seconds (down to nanoseconds), `Z` or numeric offsets, epoch seconds/milliseconds,
repeated header rows from concatenated files, blank lines and junk rows (rejected, never fatal).
"""

from __future__ import annotations

import csv
import io
import math
import mmap
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import IO

import numpy as np

from telemetry_nb.model import Rejected, Sample
from telemetry_nb.sources.labels import Identity, identity
from telemetry_nb.sources.limits import RowLimits
from telemetry_nb.timeparse import parse_timestamp

REQUIRED = ("timestamp", "metric_name", "gpu_id", "uuid", "Hostname", "value")
OPTIONAL = ("device", "modelName", "container", "pod", "namespace", "labels_raw")
HEADER = (
    "timestamp", "metric_name", "gpu_id", "device", "uuid", "modelName",
    "Hostname", "container", "pod", "namespace", "value", "labels_raw",
)

# other spellings seen in exports and hand-made files; an exact column name always wins over an alias
ALIASES = {
    "time": "timestamp", "ts": "timestamp", "metric": "metric_name", "__name__": "metric_name",
    "gpu": "gpu_id", "gpu_index": "gpu_id", "gpu_uuid": "uuid", "host": "Hostname", "node": "Hostname",
    "model_name": "modelName", "model": "modelName", "labels": "labels_raw",
}

csv.field_size_limit(1 << 24)


class HeaderError(ValueError):
    """The file's header lacks required columns; nothing in it can be read."""


# the value: `(?:[^"\\]|\\.)*` unrolled (the same texts, matched a few times faster)
_LABEL = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_.:-]*)\s*=\s*"([^"\\]*(?:\\.[^"\\]*)*)"\s*(?:,|$)')
_UNESCAPE = re.compile(r"\\(.)")
_NAMES = re.compile(r"[A-Za-z_][A-Za-z0-9_.:-]*(?:,[A-Za-z_][A-Za-z0-9_.:-]*)*")  # label names, comma-joined
_SURROGATE = re.compile("[\ud800-\udfff]")


def parse_labels(raw: str) -> dict[str, str]:
    """Prometheus label syntax `k="v",k2="v2"` (with `\\"`, `\\\\`, `\\n` escapes) into a dict.

    Unparseable remainders are kept whole under the key `_unparsed` instead of failing the row.
    """
    raw = raw.strip()
    plain = _plain_labels(raw)
    return plain if plain is not None else _scan_labels(raw)


def _plain_labels(raw: str) -> dict[str, str] | None:
    """The usual spelling (`k="v",k2="v2"`: no escapes, spaces or stray quotes) split without a regex, ~1.5x
    faster; None for anything else. Where it answers, `_scan_labels` answers the same (tests/test_dcgm_csv.py)."""
    if not raw.endswith('"') or "\\" in raw:
        return None
    pairs = [p.split('="', 1) for p in raw[:-1].split('",')]
    for p in pairs:
        if len(p) != 2 or '"' in p[1]:
            return None
    names = ",".join([p[0] for p in pairs])
    if names.count(",") != len(pairs) - 1 or _NAMES.fullmatch(names) is None:  # a comma only between names
        return None
    return dict(pairs)


def _scan_labels(raw: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    pos = 0
    while pos < len(raw):
        m = _LABEL.match(raw, pos)
        if not m:
            labels["_unparsed"] = raw[pos:]
            break
        value = m.group(2)
        labels[m.group(1)] = (_UNESCAPE.sub(lambda e: "\n" if e.group(1) == "n" else e.group(1), value)
                              if "\\" in value else value)
        pos = m.end()
    return labels


def _header_key(col: str) -> str:
    """Header cell → lookup key; tolerates case, whitespace, a BOM (also before a quote) and stray quotes."""
    return col.strip().lstrip("\ufeff").strip().strip('"').strip().lower()


def _column_index(header: list[str]) -> dict[str, int]:
    wanted = {name.lower(): name for name in REQUIRED + OPTIONAL}
    index: dict[str, int] = {}
    for i, col in enumerate(header):
        key = _header_key(col)
        if key in wanted and wanted[key] not in index:
            index[wanted[key]] = i
    for i, col in enumerate(header):
        name = ALIASES.get(_header_key(col))
        if name is not None and name not in index:
            index[name] = i
    missing = [name for name in REQUIRED if name not in index]
    if missing:
        raise HeaderError(
            f"CSV header is missing required column(s): {', '.join(missing)} "
            f"(found: {', '.join(c.strip() for c in header) or 'nothing'})"
        )
    return index


def _utcnow() -> datetime:
    return datetime.now(UTC)


def read_samples(source: str | Path | IO[str], *, with_labels: bool = True, limits: RowLimits | None = None,
                 now: Callable[[], datetime] = _utcnow) -> Iterator[Sample | Rejected]:
    """Yield a `Sample` for every good row and a `Rejected` for every bad one, in file order.

    Raises `HeaderError` before yielding anything when a required column is missing.
    `with_labels=False` skips parsing `labels_raw` (the inventory then gets no labels). A row the
    database could not store (see `RowLimits`; timestamps are checked against `now()`) is rejected.
    """
    if isinstance(source, str | Path):
        with open(source, encoding="utf-8-sig", newline="", errors="replace") as fh:
            yield from read_samples(fh, with_labels=with_labels, limits=limits, now=now)
        return
    limits = limits or RowLimits()
    reader = csv.reader(source)
    try:
        header = next(reader)
        while not any(c.strip() for c in header):
            header = next(reader)
    except StopIteration:
        raise HeaderError("CSV file is empty: no header row") from None
    idx = _column_index(header)
    width = len(header)
    header_key = [_header_key(c) for c in header]
    i_ts, i_metric, i_gpu, i_uuid = idx["timestamp"], idx["metric_name"], idx["gpu_id"], idx["uuid"]
    i_host, i_value = idx["Hostname"], idx["value"]
    # optional columns that are absent read from an extra empty field appended to each row
    i_dev, i_model, i_cont, i_pod, i_ns, i_labels = (idx.get(name, width) for name in OPTIONAL)
    ts_cache: dict[str, datetime] = {}
    gpu_cache: dict[str, int | None] = {}
    # fast path: printable and short enough for any byte count; only other rows get the exact check
    metric_chars, text_chars = limits.metric_bytes // 4, limits.text_bytes // 4
    isfinite = math.isfinite
    prev_line = reader.line_num

    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            line, prev_line = prev_line + 1, reader.line_num
            yield Rejected(line=line, reason=f"malformed CSV: {err}", raw="")
            continue
        line = prev_line + 1
        prev_line = reader.line_num
        if len(row) != width:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            reason = ("repeated header row" if [_header_key(c) for c in row] == header_key
                      else f"expected {width} fields, got {len(row)}")
            yield Rejected(line=line, reason=reason, raw=_raw(row))
            continue
        uuid = row[i_uuid]
        metric = row[i_metric]
        raw_ts = row[i_ts]
        try:
            ts = ts_cache.get(raw_ts)
            if ts is None:
                if raw_ts.strip().lower() == "timestamp":
                    raise ValueError("repeated header row")
                ts = parse_timestamp(raw_ts)
                why = limits.check_ts(raw_ts, ts, now())
                if why is not None:
                    raise ValueError(why)
                if len(ts_cache) > 4096:
                    ts_cache.clear()
                ts_cache[raw_ts] = ts
            if not uuid or uuid[0].isspace() or uuid[-1].isspace():
                uuid = uuid.strip()
                if not uuid:
                    raise ValueError("empty uuid")
            if not metric or metric[0].isspace() or metric[-1].isspace():
                metric = metric.strip()
                if not metric:
                    raise ValueError("empty metric_name")
            try:
                value = float(row[i_value])
            except ValueError:
                raise ValueError(f"non-numeric value {row[i_value]!r}" if row[i_value].strip()
                                 else "empty value") from None
            if not isfinite(value):
                raise ValueError(f"non-finite value {row[i_value]!r}")
            gpu_raw = row[i_gpu]
            gpu_index = gpu_cache.get(gpu_raw, -1)
            if gpu_index == -1:
                try:
                    gpu_index = int(gpu_raw) if gpu_raw.strip() else None
                except ValueError:
                    raise ValueError(f"non-integer gpu_id {gpu_raw[:40]!r}") from None
                why = None if gpu_index is None else limits.check_gpu_id(gpu_raw, gpu_index)
                if why is not None:
                    raise ValueError(why)
                if len(gpu_cache) > 4096:
                    gpu_cache.clear()
                gpu_cache[gpu_raw] = gpu_index
            row.append("")
            host, dev, model = row[i_host].strip(), row[i_dev].strip(), row[i_model].strip()
            cont, pod, ns = row[i_cont].strip(), row[i_pod].strip(), row[i_ns].strip()
            if not (uuid.isprintable() and metric.isprintable() and host.isprintable() and dev.isprintable()
                    and model.isprintable() and cont.isprintable() and pod.isprintable() and ns.isprintable()
                    and len(metric) <= metric_chars and len(uuid) + len(host) + len(dev) + len(model)
                    + len(cont) + len(pod) + len(ns) <= text_chars):
                why = limits.check_names(uuid, metric, host, dev, model, cont, pod, ns)
                if why is not None:
                    raise ValueError(why)
        except ValueError as err:
            yield Rejected(line=line, reason=str(err), raw=_raw(row[:width]))
            continue
        labels, ident = _labels_and_identity(uuid, row[i_labels]) if with_labels and row[i_labels] else _NO_LABELS
        if ident is None:
            yield Sample(uuid, metric, ts, value, host, gpu_index, dev, model, cont, pod, ns, labels)
        elif isinstance(ident, str):
            yield Rejected(line=line, reason=ident, raw=_raw(row[:width]))
        else:  # labels_raw → inventory (PCI bus, driver, every static label) and MIG identity
            yield Sample(ident.uuid, metric, ts, value, host, gpu_index, dev, model, cont, pod, ns, labels,
                         ident.pci_bus_id, ident.driver_version, ident.parent_uuid, ident.mig_profile,
                         ident.mig_instance)


_NO_LABELS: tuple[dict[str, str], None] = ({}, None)
_LABELS_MAX_BYTES = 16384


@lru_cache(maxsize=8192)  # bounded: memory stays flat whatever the file
def _labels_and_identity(uuid: str, raw: str) -> tuple[dict[str, str], Identity | str | None]:
    """labels_raw parsed once per distinct text (rows repeat them); the dict is shared, never mutate it.

    Labels are stored as jsonb, which refuses NUL and lone surrogates: those, or more than 16 kB of
    labels, reject the row.
    """
    if len(raw) * 4 > _LABELS_MAX_BYTES and len(raw.encode(errors="replace")) > _LABELS_MAX_BYTES:
        return {}, f"labels_raw is longer than the {_LABELS_MAX_BYTES}-byte limit"
    if "\0" in raw or (not raw.isascii() and _SURROGATE.search(raw)):
        return {}, "NUL or an invalid character (lone surrogate) in labels_raw"
    labels = parse_labels(raw)
    try:
        return labels, identity(uuid, labels)
    except ValueError as err:
        return labels, str(err)


@dataclass
class Chunk:
    """Whole CSV records at bytes [offset, offset + length) of `path`, the header text, and the first line number."""

    path: str
    header: str
    first_line: int
    offset: int
    length: int


def split_records(path: str | Path, chunk_bytes: int = 4 << 20) -> Iterator[Chunk]:
    """Cut a CSV file into byte ranges of whole records, for parsing in parallel; constant memory.

    A range ends only at a line break outside quotes (an even count of `"` so far), so a quoted
    field that spans lines is never cut in two. Only offsets travel to the workers, not the text.
    The file is read as it is when the cutting starts (memory-mapped: counted in place, not copied, and
    each range's pages let go once counted, so resident memory stays per chunk).
    """
    with open(path, "rb") as fh:
        head = _whole_record(fh, fh.readline())
        header = head.decode("utf-8-sig", errors="replace")
        line = 1 + head.count(b"\n")
        offset = fh.tell()
        size = os.fstat(fh.fileno()).st_size
        if offset >= size:
            return
        with mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_READ) as mm:
            view = np.frombuffer(mm, np.uint8)
            try:
                while offset < size:
                    end = _line_end(mm, min(offset + chunk_bytes, size) - 1, size)
                    quotes = _count(view[offset:end], 34)
                    while quotes % 2 and end < size:  # inside a quoted field: take whole lines until it closes
                        more = _line_end(mm, end, size)
                        quotes += _count(view[end:more], 34)
                        end = more
                    yield Chunk(path=str(path), header=header, first_line=line, offset=offset, length=end - offset)
                    line += _count(view[offset:end], 10)
                    # counted: let go of its pages, or the whole file would end up in this process's RSS
                    done = offset - offset % mmap.PAGESIZE
                    mm.madvise(mmap.MADV_DONTNEED, done, end - end % mmap.PAGESIZE - done)
                    offset = end
            finally:
                del view  # the map closes only once no array refers to it


def _line_end(mm: mmap.mmap, at: int, size: int) -> int:
    """The offset just past the line break at or after `at` (or the end of the file)."""
    nl = mm.find(b"\n", at, size)
    return size if nl < 0 else nl + 1


def chunkable(path: str | Path) -> bool:
    """Whether the file starts with a plain one-line header, so that every chunk of it carries the header."""
    with open(path, "rb") as fh:
        text = fh.readline().decode("utf-8-sig", errors="replace")
    if text.count('"') % 2 or "\r" in text.replace("\r\n", ""):
        return False
    return any(c.strip() for c in next(csv.reader([text]), []))


def _whole_record(fh: IO[bytes], data: bytes) -> bytes:
    quotes = _count(data, 34)
    while quotes % 2:
        more = fh.readline()
        if not more:
            break
        data += more
        quotes += more.count(b'"')
    return data


def _count(data: bytes, byte: int) -> int:
    """How many times `byte` occurs in `data` (numpy: a few times faster than `bytes.count` on megabytes)."""
    return int(np.count_nonzero(np.frombuffer(data, np.uint8) == byte))


def read_chunk(chunk: Chunk, *, with_labels: bool = False, limits: RowLimits | None = None,
               now: Callable[[], datetime] = _utcnow) -> Iterator[Sample | Rejected]:
    """`read_samples` over one chunk, with line numbers of the whole file."""
    with open(chunk.path, "rb") as fh:
        fh.seek(chunk.offset)
        text = fh.read(chunk.length).decode("utf-8", errors="replace")
    shift = chunk.first_line - 1 - chunk.header.count("\n")
    for item in read_samples(io.StringIO(chunk.header + text, newline=""), with_labels=with_labels, limits=limits,
                             now=now):
        if isinstance(item, Rejected):
            item.line += shift
        yield item


def _raw(row: list[str]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow(row)
    return buf.getvalue()[:4096].encode("utf-8", "replace").decode()  # lone surrogates cannot go to Redis

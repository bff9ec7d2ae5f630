"""Vectorized reading of one DCGM CSV chunk (numpy + pyarrow) for bulk loads, exact by construction.

Only lines that are certainly plain are read in bulk: printable ASCII, standard CSV quoting, one record
per line, the header's field count, and values that pass every check of `dcgm_csv.read_samples`
(checked once per *distinct* key, all fields but timestamp and value, remembered across chunks).
Every other line (a bad row, odd quoting, a blank line, non-ASCII text…) is handed to `read_samples`
itself, and a chunk whose line structure is in any doubt (a quoted newline, a bare CR, an odd header)
is read by it whole. So a sample or a rejected line is the exact parser's, with its line number and reason.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from telemetry_nb.model import Rejected, Sample, static_labels
from telemetry_nb.sources.dcgm_csv import (
    _LABELS_MAX_BYTES,
    OPTIONAL,
    Chunk,
    HeaderError,
    _column_index,
    _labels_and_identity,
    _plain_labels,
    _utcnow,
    read_chunk,
    read_samples,
)
from telemetry_nb.sources.limits import RowLimits
from telemetry_nb.timeparse import parse_timestamp

# what decides everything about a row but its timestamp and value (see `FastReader._codes`)
_KEY_COLUMNS = ("metric_name", "uuid", "gpu_id", "Hostname", "device", "modelName", "container", "pod", "namespace",
                "labels_raw")
_KEY_SEP = "\x1f"
_BAD_KEY = (-1, -1, -1, -1)
_PLAIN_NUMBER = r"^-?[0-9]{1,20}(\.[0-9]{1,20})?$"  # pyarrow's cast of these is exactly Python's float()
_MISSING = object()
_UNCARVED = object()  # `_key`: labels whose __name__ value counts (not the usual spelling): keyed whole
_CACHE_MAX = 50_000  # distinct series, labels, GPUs… remembered across chunks (per process), then forgotten
_KEYS_MAX_BYTES = 16 << 20  # the distinct keys' text (labels_raw can be long), then forgotten
_TS_MAX = 20_000  # distinct timestamp and value texts remembered (they can be all distinct)
_NAME_VALUE = re.compile(r"[A-Za-z0-9_:]*")  # a metric name: no quote, comma, equals sign or backslash


@dataclass
class Columns:
    """A chunk's samples in file order as codes into small tables (what `codec_columns` encodes).

    Per row: `series` (→ `uuid_of`, `ident`, `static_of`, `err_msg`), `gpu` (→ `gpus`: hostname,
    gpu_index, device, model_name), `metric` (→ `metrics`), `workload` (→ `workloads`, -1 for none),
    `ts` (→ `ts_text`) and `value`, the value as a float.
    """

    series: np.ndarray
    gpu: np.ndarray
    metric: np.ndarray
    workload: np.ndarray
    ts: np.ndarray
    value: np.ndarray
    uuids: list[str]
    uuid_of: np.ndarray
    static_of: np.ndarray
    idents: list[tuple]  # per series: (pci_bus_id, driver_version, parent_uuid, mig_profile, mig_instance)
    err_msg: list[str]
    statics: list[dict[str, str]]
    gpus: list[tuple]
    metrics: list[str]
    workloads: list[tuple[str, str, str]]
    ts_text: list[str]
    cache: dict = field(default_factory=dict)  # the encoder's, kept as long as these tables

    @property
    def n(self) -> int:
        return len(self.series)


@dataclass
class Parsed:
    """One chunk read: `columns` (fast path, exact lines merged in), or `items` when the chunk was read exactly."""

    columns: Columns | None
    items: list[Sample | Rejected] | None
    rejected: list[Rejected]
    fast_rows: int = 0  # samples that took the vectorized path
    exact_lines: int = 0  # lines handed to the exact parser


@dataclass
class FastStats:
    """What the reader did, for logs, benchmarks and the test that the fast path is taken at all."""

    exact_chunks: int = 0
    fast_rows: int = 0
    exact_lines: int = 0
    why: dict[str, int] = field(default_factory=dict)  # why whole chunks went to the exact parser


class _Table:
    """Values → dense codes (first seen, first code), for one chunk."""

    __slots__ = ("codes", "values")

    def __init__(self):
        self.codes: dict = {}
        self.values: list = []

    def code(self, value) -> int:
        c = self.codes.get(value)
        if c is None:
            c = self.codes[value] = len(self.values)
            self.values.append(value)
        return c


class _Interner:
    """Distinct strings → ids kept across chunks, looked up vectorized (pyarrow `index_in`): no Python per row."""

    def __init__(self):
        self.known = pa.nulls(0, pa.string())

    def __len__(self) -> int:
        return len(self.known)

    def ids(self, column: pa.Array) -> tuple[np.ndarray, list[str]]:
        """The id of each row's string, and the strings not seen before (in the order of their new ids)."""
        found = pc.index_in(column, value_set=self.known)
        new: list[str] = []
        if found.null_count:
            fresh = pc.unique(column.filter(found.is_null()))
            new = fresh.to_pylist()
            self.known = pa.concat_arrays([self.known, fresh.cast(pa.string())])
            found = pc.index_in(column, value_set=self.known)
        return found.to_numpy(zero_copy_only=False).astype(np.int64), new


class _Builder:
    """The tables behind `Columns` codes, filled by the fast path and by the exact lines alike.

    Kept across chunks (codes stay valid), and started afresh between chunks once large.
    """

    def __init__(self):
        self.uuids, self.gpus, self.metrics, self.workloads, self.ts = (_Table() for _ in range(5))
        self.statics = _Table()  # keyed by the items of a static-labels dict
        self.series_keys = _Table()
        self.series_u: list[int] = []
        self.series_s: list[int] = []
        self.idents: list[tuple] = []
        self.err_msg: list[str] = []
        self.cache: dict = {}
        self.parts: dict[tuple[str, str], tuple[int, int, int] | None] = {}  # see `FastReader._key`

    def size(self) -> int:
        return (len(self.series_keys.values) + len(self.gpus.values) + len(self.workloads.values) + len(self.cache)
                + len(self.parts))

    def series(self, uuid: str, ident: tuple, static: dict[str, str], err: str) -> int:
        """Code of a series: what every sample of it shares in an entry (GPU, identity, static labels, err_msg)."""
        static_key = tuple(static.items())
        key = (uuid, ident, static_key, err)
        c = self.series_keys.codes.get(key)
        if c is None:
            c = self.series_keys.code(key)
            self.series_u.append(self.uuids.code(uuid))
            s = self.statics.codes.get(static_key)
            if s is None:
                s = self.statics.code(static_key)
                self.statics.values[s] = static
            self.series_s.append(s)
            self.idents.append(ident)
            self.err_msg.append(err)
        return c

    def sample_codes(self, s: Sample) -> tuple[int, int, int, int, int, float]:
        """A `Sample` of the exact parser as codes."""
        sc = self.series(s.uuid, (s.pci_bus_id, s.driver_version, s.parent_uuid, s.mig_profile, s.mig_instance),
                         static_labels(s.labels), s.labels.get("err_msg", ""))
        workload = (s.namespace, s.pod, s.container) if (s.pod or s.namespace or s.container) else None
        return (sc, self.gpus.code((s.hostname, s.gpu_index, s.device, s.model_name)), self.metrics.code(s.metric),
                -1 if workload is None else self.workloads.code(workload), self.ts.code(s.ts.isoformat()),
                s.value)

    def columns(self, series, gpu, metric, workload, ts, value) -> Columns:
        return Columns(series=series, gpu=gpu, metric=metric, workload=workload, ts=ts, value=value,
                       uuids=self.uuids.values, uuid_of=np.asarray(self.series_u, np.int64),
                       static_of=np.asarray(self.series_s, np.int64), idents=self.idents, err_msg=self.err_msg,
                       statics=self.statics.values, gpus=self.gpus.values, metrics=self.metrics.values,
                       workloads=self.workloads.values, ts_text=self.ts.values, cache=self.cache)


class _Fallback(Exception):
    """The chunk goes to the exact parser whole; the message says why (counted in `FastStats.why`)."""


class FastReader:
    """Reads chunks (`split_records`) the way `read_chunk` does, vectorized where that is certain.

    Holds per-process caches of per-distinct-value work (timestamps, labels), bounded in size.
    """

    def __init__(self, *, with_labels: bool = True, limits: RowLimits | None = None,
                 now: Callable[[], datetime] = _utcnow):
        self.with_labels = with_labels
        self.limits = limits or RowLimits()
        self.now = now
        self.stats = FastStats()
        self._headers: dict[str, tuple[int, dict[str, int]] | None] = {}
        self._ts: dict[str, datetime | None] = {}
        self._values: dict[str, str | None] = {}
        self._keys = _Interner()
        self._key_codes = np.empty((0, 4), np.int64)
        self._b = _Builder()
        self._idx: dict[str, int] = {}

    def read(self, chunk: Chunk) -> Parsed:
        """The chunk's samples and rejected lines, exactly as `read_chunk(chunk, with_labels=...)` yields them."""
        with open(chunk.path, "rb") as fh:
            fh.seek(chunk.offset)
            data = fh.read(chunk.length)
        try:
            parsed = self._fast(chunk, data)
        except _Fallback as why:
            reason = str(why)
            self.stats.exact_chunks += 1
            self.stats.why[reason] = self.stats.why.get(reason, 0) + 1
            items = list(read_chunk(chunk, with_labels=self.with_labels, limits=self.limits, now=self.now))
            rejected = [i for i in items if isinstance(i, Rejected)]
            return Parsed(None, [i for i in items if not isinstance(i, Rejected)], rejected,
                          exact_lines=data.count(b"\n"))
        self.stats.fast_rows += parsed.fast_rows
        self.stats.exact_lines += parsed.exact_lines
        return parsed

    # -- the fast path -------------------------------------------------------------------------

    def _forget(self) -> None:
        """Start the tables and caches afresh (between chunks): memory stays bounded whatever the file."""
        self._ts.clear()
        self._values.clear()
        self._keys = _Interner()
        self._key_codes = np.empty((0, 4), np.int64)
        self._b = _Builder()

    def _header(self, text: str) -> tuple[int, dict[str, int]]:
        if text not in self._headers:
            value = None
            if "\r" not in text.replace("\r\n", "") and text.endswith("\n"):
                rows = list(csv.reader(io.StringIO(text, newline="")))
                if len(rows) == 1 and any(c.strip() for c in rows[0]):
                    try:
                        value = (len(rows[0]), _column_index(rows[0]))
                    except HeaderError:
                        value = None
            self._headers[text] = value
        value = self._headers[text]
        if value is None:
            raise _Fallback("header")
        return value

    def _fast(self, chunk: Chunk, data: bytes) -> Parsed:
        width, idx = self._header(chunk.header)
        # per-value caches that no other code refers to are bounded on their own (timestamps can be all distinct)
        for cache in (self._ts, self._values):
            if len(cache) > _TS_MAX:
                cache.clear()
        if len(self._b.ts.values) > _TS_MAX:
            self._b.ts = _Table()
        if (self._idx != idx or self._b.size() + len(self._keys) > _CACHE_MAX
                or self._keys.known.nbytes > _KEYS_MAX_BYTES):
            self._forget()
            self._idx = idx
        a = np.frombuffer(data, np.uint8)
        size = len(a)
        if size == 0:
            return Parsed(self._b.columns(*_empty()), None, [])
        nl = np.flatnonzero(a == 10)
        ends = nl if data.endswith(b"\n") else np.append(nl, size)  # each line's last byte + 1 (its \n)
        starts = np.empty(len(ends), np.int64)
        starts[0] = 0
        starts[1:] = ends[:-1] + 1
        crlf = a[np.maximum(nl - 1, 0)] == 13
        crlf &= nl > 0
        odd_bytes = np.count_nonzero((a - np.uint8(32)) > 94) != len(nl) + np.count_nonzero(crlf)  # not 32…126
        if odd_bytes and np.count_nonzero(a == 13) != np.count_nonzero(crlf):
            raise _Fallback("bare CR")
        quotes = np.flatnonzero(a == 34)
        if len(quotes) % 2 or np.any(np.searchsorted(quotes, nl) & 1):
            raise _Fallback("quoted newline or unbalanced quotes")
        content_end = ends.copy()
        content_end[: len(nl)] -= crlf
        suspect = content_end == starts  # blank lines
        # quoting: an opening quote (even index) follows a comma, a line start or a closing quote ("" pair);
        # a closing quote (odd index) comes before a comma, the line end or an opening quote
        if len(quotes):
            opening, closing = quotes.reshape(-1, 2).T
            # clipped at the ends of the chunk, the neighbour is the quote itself: never bad
            prev = a.take(opening - 1, mode="clip")
            bad_open = (prev != 44) & (prev != 10) & (prev != 34)  # not , \n "
            nxt = a.take(closing + 1, mode="clip")
            bad_close = (nxt != 44) & (nxt != 10) & (nxt != 13) & (nxt != 34)  # not , \n \r "
            bad = np.concatenate([opening[bad_open], closing[bad_close]])
            if len(bad):
                suspect[np.searchsorted(ends, bad)] = True
        if odd_bytes:  # control characters, DEL or non-ASCII: such lines are read exactly
            odd = np.flatnonzero(((a < 32) & (a != 10) & (a != 13)) | (a > 126))
            suspect[np.searchsorted(ends, odd)] = True
        suspect_lines = list(np.flatnonzero(suspect))
        keep = np.flatnonzero(~suspect)
        if len(keep) == 0:
            buf = b""
        elif not suspect_lines:
            buf = data
        else:
            edge = np.diff(np.concatenate([[0], (~suspect).view(np.int8), [0]]))  # runs of kept lines
            first, stop = np.flatnonzero(edge == 1), np.flatnonzero(edge == -1)
            buf = b"".join(data[i:j] for i, j in zip(starts[first].tolist(),
                                                     np.minimum(ends[stop - 1] + 1, size).tolist(), strict=True))
        table, invalid = self._arrow(buf, width, idx, len(keep)) if buf else (None, [])
        if invalid:
            suspect_lines += [int(keep[i]) for i in invalid]
            keep = np.delete(keep, invalid)
        b = self._b
        if table is not None and table.num_rows:
            codes, ok, value = self._codes(table, b)
            if not ok.all():
                suspect_lines += [int(x) for x in keep[~ok]]
                keep = keep[ok]
                codes = [c[ok] for c in codes]
                value = value[ok]
        else:
            codes, value = [np.empty(0, np.int64) for _ in range(5)], np.empty(0, np.float64)
        fast_rows = len(keep)
        suspect_lines.sort()
        rejected: list[Rejected] = []
        if suspect_lines:
            lines, extra = self._exact_lines(chunk, data, starts, ends, suspect_lines, b, rejected)
            if lines:
                order = np.argsort(np.concatenate([keep, np.asarray(lines, np.int64)]), kind="stable")
                codes = [np.concatenate([c, np.asarray(e, np.int64)])[order] for c, e in zip(codes, extra[:5],
                                                                                            strict=True)]
                value = np.concatenate([value, np.asarray(extra[5], np.float64)])[order]
        return Parsed(b.columns(*codes, value), None, rejected, fast_rows=fast_rows, exact_lines=len(suspect_lines))

    def _arrow(self, buf: bytes, width: int, idx: dict[str, int], lines: int) -> tuple[pa.Table, list[int]]:
        """pyarrow's reading of certified lines (all text), and the 0-based lines with the wrong field count."""
        invalid: list[int | None] = []

        def wrong_count(row) -> str:
            invalid.append(None if row.number is None else row.number - 1)
            return "skip"

        names = [f"c{i}" for i in range(width)]
        wanted = sorted({i for i in idx.values() if i < width})
        try:
            table = pacsv.read_csv(
                pa.py_buffer(buf),
                read_options=pacsv.ReadOptions(column_names=names, use_threads=False, block_size=len(buf) + 64),
                parse_options=pacsv.ParseOptions(newlines_in_values=False, ignore_empty_lines=False,
                                                 invalid_row_handler=wrong_count),
                convert_options=pacsv.ConvertOptions(include_columns=[names[i] for i in wanted],
                                                     column_types={names[i]: pa.string() for i in wanted},
                                                     strings_can_be_null=False, quoted_strings_can_be_null=False))
        except (pa.ArrowException, ValueError) as err:
            raise _Fallback(f"pyarrow: {type(err).__name__}") from None
        if any(i is None for i in invalid):
            raise _Fallback("pyarrow row numbers unknown")
        if table.num_rows + len(invalid) != lines:
            raise _Fallback("pyarrow records are not lines")
        return table, invalid  # type: ignore[return-value]

    def _col(self, table: pa.Table, name: str) -> tuple[np.ndarray, list[str]]:
        """A column dictionary-encoded: (codes per row, distinct values); an absent column is all ''."""
        i = self._idx.get(name)
        if i is None or f"c{i}" not in table.column_names:
            return np.zeros(table.num_rows, np.int64), [""]
        enc = pc.dictionary_encode(table.column(f"c{i}").combine_chunks())
        return enc.indices.to_numpy(zero_copy_only=False).astype(np.int64), enc.dictionary.to_pylist()

    def _codes(self, table: pa.Table, b: _Builder):
        """Per-row codes of the certified rows, which of them the fast path accepts, and their values.

        Everything but the timestamp and the value is worked out once per distinct combination of the
        other fields (the row's *key*), remembered across chunks: a chunk only looks its keys up.
        """
        limits = self.limits
        t_codes, t_values = self._col(table, "timestamp")  # limits are checked against now: per chunk
        now = self.now()
        t_map = np.empty(len(t_values), np.int64)
        for j, raw in enumerate(t_values):
            ts = self._timestamp(raw)
            t_map[j] = -1 if ts is None or limits.check_ts(raw, ts, now) is not None else b.ts.code(ts.isoformat())
        ts = t_map[t_codes]
        parts = [self._text_column(table, name) for name in _KEY_COLUMNS]
        if not self.with_labels:
            parts[-1] = pa.scalar("")
        # certified lines are printable ASCII: the separator cannot occur inside a field
        key_ids, new = self._keys.ids(pc.binary_join_element_wise(*parts, _KEY_SEP))
        if new:
            codes = np.asarray([self._key(b, text) for text in new], np.int64).reshape(-1, 4)
            self._key_codes = np.concatenate([self._key_codes, codes])
        per_row = self._key_codes[key_ids]
        series, gpu, metric, workload = per_row[:, 0], per_row[:, 1], per_row[:, 2], per_row[:, 3]
        ok = (ts >= 0) & (series >= 0)
        value, v_ok = self._value_floats(table.column(f"c{self._idx['value']}").combine_chunks())
        ok &= v_ok
        return [series, gpu, metric, workload, ts], ok, value

    def _text_column(self, table: pa.Table, name: str) -> pa.Array | pa.Scalar:
        i = self._idx.get(name)
        if i is None or f"c{i}" not in table.column_names:
            return pa.scalar("")
        return table.column(f"c{i}").combine_chunks()

    def _key(self, b: _Builder, text: str) -> tuple[int, int, int, int]:
        """(series, gpu, metric, workload) codes of a distinct key, all -1 when the exact parser rejects such rows.

        A GPU's keys differ only in the metric, which labels_raw repeats as `__name__`: what the rest
        decides is worked out once per GPU (`_name_carved`), the metric once per name.
        """
        metric, rest = text.split(_KEY_SEP, 1)
        metric = metric.strip()
        if not 0 < len(metric) <= self.limits.metric_bytes:
            return _BAD_KEY
        head, labels = rest.rsplit(_KEY_SEP, 1)
        carved = _name_carved(labels)
        part = b.parts.get((head, carved), _MISSING)
        if part is _MISSING:
            part = b.parts[(head, carved)] = (self._part(b, head, carved) if _carving_holds(carved, labels)
                                              else _UNCARVED)
        if part is _UNCARVED:
            part = b.parts.get((head, labels), _MISSING)
            if part is _MISSING:
                part = b.parts[(head, labels)] = self._part(b, head, labels)
        if part is None:
            return _BAD_KEY
        series, gpu, workload = part
        return series, gpu, b.metrics.code(metric), workload

    def _part(self, b: _Builder, head: str, labels: str) -> tuple[int, int, int] | None:
        """(series, gpu, workload) codes of a key's fields but the metric, None when the exact parser rejects them."""
        uuid, gpu_id, host, dev, model, cont, pod, ns = head.split(_KEY_SEP)
        limits = self.limits
        text_ok = self._text_ok
        uuid, index, host, dev, model = text_ok(uuid) or None, self._gpu_id(gpu_id), text_ok(host), text_ok(dev), \
            text_ok(model)
        w = (text_ok(ns), text_ok(pod), text_ok(cont))
        if uuid is None or index is False or None in (host, dev, model) or None in w:
            return None
        if len(w[0]) + len(w[1]) + len(w[2]) > limits.workload_bytes:
            return None
        series = self._series(b, uuid, labels)
        if series < 0:
            return None
        return series, b.gpus.code((host, index, dev, model)), b.workloads.code(w) if (w[0] or w[1] or w[2]) else -1

    def _text_ok(self, value: str) -> str | None:
        """The stripped name, or None when it is longer than the limit (printable ASCII: bytes = characters)."""
        value = value.strip()
        return value if len(value) <= self.limits.text_bytes else None

    def _gpu_id(self, raw: str) -> int | None | bool:
        """gpu_id as the exact parser reads it: an int, None for blank, False when rejected."""
        if not raw.strip():
            return None  # a blank gpu_id: a sample without index
        try:
            value = int(raw)
        except ValueError:
            return False
        return value if self.limits.check_gpu_id(raw, value) is None else False

    def _timestamp(self, raw: str) -> datetime | None:
        got = self._ts.get(raw, _MISSING)
        if got is _MISSING:
            got = None
            if raw.strip().lower() != "timestamp":
                try:
                    got = parse_timestamp(raw)
                except ValueError:
                    got = None
            self._ts[raw] = got
        return got

    def _series(self, b: _Builder, uuid: str | None, raw: str) -> int:
        """The series code of a distinct (uuid, labels_raw), or -1 when the exact parser rejects the pair."""
        if uuid is None:
            return -1
        labels, ident = _labels_and_identity(uuid, raw) if raw else ({}, None)
        if isinstance(ident, str):
            return -1
        if ident is None:
            return b.series(uuid, ("", "", "", "", None), static_labels(labels), labels.get("err_msg", ""))
        return b.series(ident.uuid, (ident.pci_bus_id, ident.driver_version, ident.parent_uuid, ident.mig_profile,
                                     ident.mig_instance), static_labels(labels), labels.get("err_msg", ""))

    def _value_floats(self, values: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """float(value) per row, by pyarrow's cast for plain decimals (correctly rounded, like Python's);
        and which rows have a storable value."""
        plain = pc.match_substring_regex(values, _PLAIN_NUMBER)
        ok = np.ones(len(values), bool)
        plain_np = plain.to_numpy(zero_copy_only=False)
        if plain_np.all():
            return pc.cast(values, pa.float64()).to_numpy(zero_copy_only=False), ok
        out = np.zeros(len(values), np.float64)
        out[plain_np] = pc.cast(values.filter(plain), pa.float64()).to_numpy(zero_copy_only=False)
        rows = np.flatnonzero(~plain_np)
        cache = self._values
        for r, raw in zip(rows.tolist(), values.take(pa.array(rows)).to_pylist(), strict=True):
            got = cache.get(raw, _MISSING)
            if got is _MISSING:
                try:
                    v = float(raw)
                    got = v if math.isfinite(v) else None
                except ValueError:
                    got = None
                cache[raw] = got
            if got is None:
                ok[r] = False
            else:
                out[r] = got
        return out, ok

    def _exact_lines(self, chunk: Chunk, data: bytes, starts: np.ndarray, ends: np.ndarray, lines: list[int],
                     b: _Builder, rejected: list[Rejected]) -> tuple[list[int], list[list]]:
        """Read `lines` (0-based in the chunk) with the exact parser; their samples as codes, in line order."""
        texts = []
        for i in lines:
            text = data[starts[i]:ends[i] + 1].decode("utf-8", errors="replace")
            try:  # a line that is a record by itself: strict reading raises for anything else
                list(csv.reader([text], strict=True))
            except csv.Error:
                raise _Fallback("a line that is not a record by itself") from None
            texts.append(text)
        shift = chunk.header.count("\n")
        out_lines: list[int] = []
        extra: list[list] = [[] for _ in range(6)]
        for item in read_samples(io.StringIO(chunk.header + "".join(texts), newline=""),
                                 with_labels=self.with_labels, limits=self.limits, now=self.now):
            if isinstance(item, Rejected):
                item.line = chunk.first_line + lines[item.line - shift - 1]
                rejected.append(item)
                continue
            out_lines.append(-1)  # the line is found below, from the lines that yielded something
            for col, v in zip(extra, b.sample_codes(item), strict=True):
                col.append(v)
        if out_lines:
            out_lines = self._sample_lines(texts, lines, rejected, chunk.first_line)
            if len(out_lines) != len(extra[0]):
                raise _Fallback("exact lines do not match")
        return out_lines, extra

    @staticmethod
    def _sample_lines(texts: list[str], lines: list[int], rejected: list[Rejected], first_line: int) -> list[int]:
        """Which of `lines` yielded a sample: not blank (the exact parser skips those) and not rejected."""
        gone = {r.line - first_line for r in rejected}
        out = []
        for text, i in zip(texts, lines, strict=True):
            row = next(csv.reader([text]), [])
            if not row or (len(row) == 1 and not row[0].strip()) or i in gone:
                continue
            out.append(i)
        return out


def _name_carved(labels: str) -> str:
    """labels_raw with the value of its `__name__` label left out, where that changes nothing else it parses to.

    The fast path keeps only the series a row belongs to: static labels (never `__name__`), identity and
    err_msg. Taking a plain metric name out from between `__name__="` and its closing quote leaves every
    other label as it was, and the checks `_labels_and_identity` makes, as long as the labels have the
    usual spelling (`_key` checks that); anything less plain stays whole.
    """
    if labels.startswith('__name__="'):
        cut = 10
    else:
        cut = labels.find('",__name__="') + 12
        if cut < 12:
            return labels
    end = labels.find('"', cut)
    if (end < 0 or "\\" in labels or len(labels) * 4 > _LABELS_MAX_BYTES
            or _NAME_VALUE.fullmatch(labels, cut, end) is None):
        return labels
    return labels[:cut] + labels[end:]


def _carving_holds(carved: str, labels: str) -> bool:
    """Whether `labels` may be keyed by `carved` (`_name_carved`): the name leaves the rest as it was only where
    the labels have the usual spelling (`_plain_labels`); otherwise the exact parser's remainder can hold it."""
    return carved is labels or _plain_labels(carved.strip()) is not None


def _empty():
    e = np.empty(0, np.int64)
    return e, e, e, e, e, np.empty(0, np.float64)


__all__ = ["OPTIONAL", "Columns", "FastReader", "FastStats", "Parsed"]

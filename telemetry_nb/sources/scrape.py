"""Parse dcgm-exporter's Prometheus text exposition into `Sample`/`Rejected`, line by line.

What real exporters emit across versions: `Hostname` or `hostname`, `UUID` or `uuid`, labels in
any order, `container`/`pod`/`namespace` present, empty or absent, MIG labels, HELP/TYPE present
or not, blank lines, no trailing newline, optional millisecond timestamps. NaN/Inf and DCGM's
blank sentinel values (a field the GPU does not support) are rejected with a reason; so is a
malformed line, with its line number, while the rest of the scrape is kept.

A hand-written line parser rather than prometheus_client's: that one stops at the first bad line
and cannot say which line it was, and it is several times slower (see bench/scrape.py). Label
sets repeat every scrape, so each distinct one is parsed once and cached.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import NamedTuple

from telemetry_nb.model import Rejected, Sample
from telemetry_nb.sources.labels import first, identity

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[ \t]*([a-zA-Z_][a-zA-Z0-9_]*)[ \t]*=[ \t]*\"([^\"\\]*(?:\\.[^\"\\]*)*)\"[ \t]*(?:,|$)")
_UNESCAPE = re.compile(r"\\(.)")

# DCGM's "no value" sentinels (dcgm_structs.h): *_BLANK and the NOT_FOUND / NOT_SUPPORTED /
# NOT_PERMISSIONED values just above it, for 32-bit, 64-bit and floating-point fields
_BLANKS = {
    **{float(0x7FFFFFF0 + i): "int32" for i in range(4)},
    **{float(0x7FFFFFFFFFFFFFF0 + i): "int64" for i in range(4)},
    **{140737488355328.0 + i: "fp64" for i in range(4)},
}
MAX_RAW = 4096
_CACHE_LIMIT = 200_000


class SeriesInfo(NamedTuple):
    """What a label set says about a sample, parsed once per distinct label text."""

    uuid: str
    hostname: str
    gpu_index: int | None
    device: str
    model_name: str
    container: str
    pod: str
    namespace: str
    labels: dict[str, str]
    pci_bus_id: str
    driver_version: str
    parent_uuid: str
    mig_profile: str
    mig_instance: int | None


def parse_labels(text: str) -> dict[str, str]:
    """`k="v",k2="v2"` (escapes `\\\\`, `\\"`, `\\n`; trailing comma allowed) → dict; `ValueError` if malformed."""
    labels: dict[str, str] = {}
    pos, end = 0, len(text.rstrip())
    while pos < end:
        m = _LABEL.match(text, pos)
        if m is None:
            raise ValueError(f"malformed labels at {text[pos:pos + 40]!r}")
        value = m.group(2)
        if "\\" in value:
            value = _UNESCAPE.sub(lambda e: "\n" if e.group(1) == "n" else e.group(1), value)
        if m.group(1) in labels:
            raise ValueError(f"label {m.group(1)!r} given twice")
        labels[m.group(1)] = value
        pos = m.end()
    return labels


def series_info(labels: dict[str, str], default_host: str = "") -> SeriesInfo:
    """A label set → GPU identity and workload; `ValueError` when it names no GPU."""
    uuid = first(labels, "UUID", "uuid").strip()
    if not uuid:
        raise ValueError("no UUID/uuid label")
    gpu = first(labels, "gpu", "GPU").strip()
    try:
        gpu_index = int(gpu) if gpu else None
    except ValueError:
        raise ValueError(f"non-integer gpu label {gpu!r}") from None
    ident = identity(uuid, labels)
    return SeriesInfo(ident.uuid, first(labels, "Hostname", "hostname").strip() or default_host, gpu_index,
                      labels.get("device", ""), first(labels, "modelName", "model_name"), labels.get("container", ""),
                      labels.get("pod", ""), labels.get("namespace", ""), labels, ident.pci_bus_id,
                      ident.driver_version, ident.parent_uuid, ident.mig_profile, ident.mig_instance)


class ExpositionParser:
    """Parses scrapes of one or many targets; keeps the parsed label sets between calls (they repeat).

    `series_factory`, if given, is called once per distinct series (with its `SeriesInfo`); `rows()`
    yields what it returned next to each sample, so a caller can attach its own per-series work.
    """

    def __init__(self, default_host: str = "", series_factory: Callable[[SeriesInfo], object] | None = None):
        self.default_host = default_host
        self.series_factory = series_factory
        self._series: dict[str, dict[str, tuple[SeriesInfo, object] | str]] = {}  # host → label text → parsed
        self._size = 0
        self._names: set[str] = set()  # valid metric names seen: DCGM fields, and others (ignored)
        self._others: set[str] = set()
        self.ignored = 0  # non-DCGM families (the exporter's own metrics)

    def parse(self, text: str, scrape_ts: datetime, *, default_host: str | None = None
              ) -> Iterator[Sample | Rejected]:
        """Samples of one scrape, in order; `scrape_ts` stamps samples that carry no timestamp."""
        for row in self.rows(text, scrape_ts, default_host=default_host):
            if type(row) is Rejected:
                yield row
                continue
            info, _, name, ts, value = row
            yield Sample(info.uuid, name, ts, value, info.hostname, info.gpu_index, info.device, info.model_name,
                         info.container, info.pod, info.namespace, info.labels, info.pci_bus_id,
                         info.driver_version, info.parent_uuid, info.mig_profile, info.mig_instance)

    def rows(self, text: str, scrape_ts: datetime, *, default_host: str | None = None
             ) -> Iterator[tuple[SeriesInfo, object, str, datetime, float] | Rejected]:
        """(series info, factory's object, metric, time, value) per sample, or `Rejected`, in order."""
        factory = self.series_factory
        host = self.default_host if default_host is None else default_host
        if self._size > _CACHE_LIMIT:
            self._series.clear()
            self._size = 0
        series = self._series.get(host)
        if series is None:
            series = self._series[host] = {}
        size_before = len(series)
        seen: set[tuple[str, str]] = set()
        blanks = _BLANKS
        dcgm, others = self._names, self._others
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        lineno = 0
        for line in text.split("\n"):
            lineno += 1
            if not line:
                continue
            c = line[0]
            if c == "#":
                continue
            if c == " " or c == "\t":
                line = line.strip()
                if not line or line[0] == "#":
                    continue
            brace = line.find("{")
            if brace < 0:
                parts = line.split()
                name, label_text, rest = parts[0], "", parts[1:]
            else:
                close = line.rfind("}")
                name, label_text, rest = line[:brace], line[brace + 1:close], line[close + 1:].split()
                if close < brace:
                    rest = []
            n = len(rest)
            if n == 0 or n > 2 or (name not in dcgm and name not in others and not _valid_name(name, dcgm, others)):
                yield Rejected(lineno, "malformed sample line", line[:MAX_RAW])
                continue
            value_text = rest[0]
            try:
                value = float(value_text)
            except ValueError:
                yield Rejected(lineno, f"non-numeric value {value_text!r}", line[:MAX_RAW])
                continue
            if name not in dcgm and (name in others or not name.startswith("DCGM_")):
                self.ignored += 1
                continue
            cached = series.get(label_text)
            if cached is None:
                try:
                    info = series_info(parse_labels(label_text), host)
                    cached = (info, factory(info) if factory is not None else None)
                except ValueError as err:
                    cached = str(err)
                series[label_text] = cached
            if type(cached) is str:
                yield Rejected(lineno, cached, line[:MAX_RAW])
                continue
            info = cached[0]
            if not -1e300 < value < 2147483632.0:  # NaN, ±Inf and DCGM's blank sentinels are all out here
                if not math.isfinite(value):
                    yield Rejected(lineno, f"non-finite value {value_text!r}", line[:MAX_RAW])
                    continue
                if value in blanks:
                    yield Rejected(lineno, f"DCGM blank value {value_text} ({blanks[value]} field not supported "
                                           "or not available)", line[:MAX_RAW])
                    continue
            if n == 1:
                ts = scrape_ts
                key = (name, info.uuid)
            else:
                ts_text = rest[1]
                try:
                    ts = datetime.fromtimestamp(int(ts_text) / 1000, UTC)
                except (ValueError, OverflowError, OSError):
                    yield Rejected(lineno, f"invalid timestamp {ts_text!r}", line[:MAX_RAW])
                    continue
                key = (name, info.uuid + "\0" + ts_text)
            if key in seen:
                yield Rejected(lineno, f"duplicate series: {name} of {info.uuid} already in this scrape "
                                       "(first kept)", line[:MAX_RAW])
                continue
            seen.add(key)
            yield info, cached[1], name, ts, value
        self._size += len(series) - size_before


def _valid_name(name: str, dcgm: set[str], others: set[str]) -> bool:
    """Whether `name` is a valid metric name; remembered in `dcgm` (DCGM fields) or `others`."""
    if _NAME.fullmatch(name) is None:
        return False
    known = dcgm if name.startswith("DCGM_") else others
    if len(known) < 10_000:
        known.add(name)
    return True


def parse_exposition(text: str, scrape_ts: datetime, default_host: str = "") -> list[Sample | Rejected]:
    """One scrape's text → samples and rejected lines (a convenience over `ExpositionParser`)."""
    return list(ExpositionParser(default_host).parse(text, scrape_ts))

"""One versioned encoding of a batch of samples into a Redis stream entry, and back.

Version 1 puts the rows in PostgreSQL COPY text format (`uuid, metric, ts, value, namespace, pod,
container`), so a collector writes a batch with no per-row Python work, and carries the batch's GPU
inventory, metric names and workloads as small JSON side fields for the upserts.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from telemetry_nb.model import Sample
from telemetry_nb.sources.dcgm_csv import parse_timestamp

VERSION = b"1"
_ESCAPE = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


class CodecError(ValueError):
    """A stream entry that this version cannot decode; it goes to the dead-letter stream."""


@dataclass
class Batch:
    """A decoded stream entry: `rows` is COPY text; `gpus` rows are (uuid, host, index, device, model, first, last)."""

    n: int
    rows: bytes
    gpus: list[list] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)
    workloads: list[list[str]] = field(default_factory=list)


def _esc(text: str) -> str:
    return text.translate(_ESCAPE)


def encode(samples: Iterable[Sample]) -> dict[bytes, bytes]:
    """Encode samples into the fields of one stream entry (`XADD` takes the dict as is)."""
    lines: list[str] = []
    gpus: dict[str, list] = {}
    metrics: dict[str, None] = {}
    workloads: dict[tuple[str, str, str], None] = {}
    ts_text: dict[datetime, str] = {}
    for s in samples:
        ts = ts_text.get(s.ts)
        if ts is None:
            ts = ts_text[s.ts] = s.ts.isoformat()
        gpu = gpus.get(s.uuid)
        if gpu is None:
            gpus[s.uuid] = [s.uuid, s.hostname, s.gpu_index, s.device, s.model_name, s.ts, s.ts]
        else:
            if s.ts < gpu[5]:
                gpu[5] = s.ts
            elif s.ts > gpu[6]:
                gpu[6] = s.ts
        metrics[s.metric] = None
        if s.pod or s.namespace or s.container:
            workloads[(s.namespace, s.pod, s.container)] = None
        lines.append(
            f"{_esc(s.uuid)}\t{_esc(s.metric)}\t{ts}\t{s.value!r}\t"
            f"{_esc(s.namespace)}\t{_esc(s.pod)}\t{_esc(s.container)}\n"
        )
    for gpu in gpus.values():
        gpu[5] = gpu[5].isoformat()
        gpu[6] = gpu[6].isoformat()
    return {
        b"v": VERSION,
        b"n": str(len(lines)).encode(),
        b"gpus": json.dumps(list(gpus.values()), separators=(",", ":")).encode(),
        b"metrics": json.dumps(list(metrics), separators=(",", ":")).encode(),
        b"workloads": json.dumps([list(w) for w in workloads], separators=(",", ":")).encode(),
        b"rows": "".join(lines).encode(),
    }


def decode(fields: dict[bytes, bytes]) -> Batch:
    """Decode a stream entry; raises `CodecError` naming what is wrong with it."""
    version = fields.get(b"v")
    if version != VERSION:
        raise CodecError(f"unsupported batch encoding version {version!r} (this collector reads {VERSION!r})")
    try:
        batch = Batch(
            n=int(fields[b"n"]),
            rows=fields[b"rows"],
            gpus=json.loads(fields[b"gpus"]),
            metrics=json.loads(fields[b"metrics"]),
            workloads=json.loads(fields.get(b"workloads", b"[]")),
        )
    except KeyError as err:
        raise CodecError(f"batch entry lacks field {err.args[0]!r}") from None
    except (ValueError, TypeError) as err:
        raise CodecError(f"batch entry is malformed: {err}") from None
    carried = batch.rows.count(b"\n")
    if carried != batch.n:
        raise CodecError(f"batch entry says n={batch.n} but carries {carried} rows")
    return batch


def _unesc(text: str) -> str:
    if "\\" not in text:
        return text
    return text.replace("\\t", "\t").replace("\\n", "\n").replace("\\r", "\r").replace("\\\\", "\\")


def decode_samples(batch: Batch) -> list[Sample]:
    """Rows of a batch back as `Sample`s, with inventory fields filled from the side fields (for tools and tests)."""
    gpus = {g[0]: g for g in batch.gpus}
    out = []
    for line in batch.rows.decode().splitlines():
        uuid, metric, ts, value, ns, pod, container = (_unesc(f) for f in line.split("\t"))
        g = gpus.get(uuid, [uuid, "", None, "", ""])
        out.append(Sample(uuid=uuid, metric=metric, ts=parse_timestamp(ts), value=float(value),
                          hostname=g[1], gpu_index=g[2], device=g[3], model_name=g[4],
                          namespace=ns, pod=pod, container=container))
    return out

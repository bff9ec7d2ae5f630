"""Find the rows of a batch that PostgreSQL refuses, storing every other row.

A refused batch is split in halves until the refused rows stand alone (bisection: about 2·k·log2(n)
transactions for k refused rows among n). The inventory rows (GPUs, metrics, workloads) are tried
first, by themselves: when a name is what the database refuses, every row that refers to it is
refused with that reason without a transaction per row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from telemetry_nb.store.errors import is_data_error, reason
from telemetry_nb.store.rows import RowBatch
from telemetry_nb.store.writer import WriteResult

Write = Callable[[RowBatch], WriteResult]  # commits one batch; raises on refusal (outages retried inside)


@dataclass
class Isolated:
    """What became of a refused batch: rows stored, and the refused rows grouped by the database's reason."""

    consumed: int = 0
    stored: int = 0
    expired: int = 0  # rows past the retention horizon, skipped (not refused)
    transactions: int = 0
    refused: list[tuple[RowBatch, str]] = field(default_factory=list)

    @property
    def refused_rows(self) -> int:
        return sum(b.n for b, _ in self.refused)


def refused_by_data(err: BaseException) -> bool:
    """A refusal of the data (never an outage), including the driver's own refusals before sending."""
    return is_data_error(err) or isinstance(err, ValueError | TypeError | OverflowError | UnicodeError)


def isolate(batch: RowBatch, write: Write) -> Isolated:
    """Store every row of `batch` the database accepts; return the others with the reason it gave."""
    out = Isolated(consumed=batch.n)
    bad: dict[tuple[str, int], str] = {}
    _bisect_inventory(batch, _inventory(batch), write, bad, out)
    by_reason: dict[str, list[bytes]] = {}
    ok: list[bytes] = []
    for line in batch.lines():
        why = _refers_to_bad(batch, line, bad)
        if why is None:
            ok.append(line)
        else:
            by_reason.setdefault(why, []).append(line)
    pending = [ok] if ok else []
    while pending:
        lines = pending.pop()
        part = batch.subset(lines)
        try:
            result = write(part)
        except Exception as err:
            if not refused_by_data(err):
                raise
            out.transactions += 1
            if len(lines) == 1:
                by_reason.setdefault(reason(err), []).append(lines[0])
            else:
                mid = len(lines) // 2
                pending += [lines[mid:], lines[:mid]]  # first half next, so rows keep their order
            continue
        out.transactions += 1
        out.stored += result.stored
        out.expired += result.expired
    out.refused = [(batch.subset(lines), why) for why, lines in by_reason.items()]
    return out


def _inventory(batch: RowBatch) -> list[tuple[str, int]]:
    return ([("gpu", g.id) for g in batch.gpus] + [("metric", m.id) for m in batch.metrics]
            + [("workload", w.id) for w in batch.workloads])


def _inventory_batch(batch: RowBatch, items: list[tuple[str, int]]) -> RowBatch:
    want = set(items)
    return RowBatch(n=0, rows=b"", gpus=[g for g in batch.gpus if ("gpu", g.id) in want],
                    metrics=[m._replace(rows=0) for m in batch.metrics if ("metric", m.id) in want],
                    workloads=[w for w in batch.workloads if ("workload", w.id) in want])


def _bisect_inventory(batch: RowBatch, items: list[tuple[str, int]], write: Write,
                      bad: dict[tuple[str, int], str], out: Isolated) -> None:
    if not items:
        return
    try:
        write(_inventory_batch(batch, items))
        out.transactions += 1
        return
    except Exception as err:
        if not refused_by_data(err):
            raise
        out.transactions += 1
        if len(items) == 1:
            bad[items[0]] = reason(err)
            return
    mid = len(items) // 2
    _bisect_inventory(batch, items[:mid], write, bad, out)
    _bisect_inventory(batch, items[mid:], write, bad, out)


def _refers_to_bad(batch: RowBatch, line: bytes, bad: dict[tuple[str, int], str]) -> str | None:
    if not bad:
        return None
    for key in batch.ids(line):
        why = bad.get(key)
        if why is not None:
            return why
    return None

"""A CSV file's chunks parsed and encoded into stream entries by worker processes, handed back in file order.

A pool starts parsing the moment it is made, so a streamer makes it before importing and connecting to
Redis: the workers' start-up and first chunks overlap the streamer's own. Only byte offsets travel to the
workers (`split_records`), and at most two chunks per worker are in flight, so memory stays bounded.
"""

from __future__ import annotations

import collections
import concurrent.futures
import ctypes
import importlib.abc
import multiprocessing
import signal
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from telemetry_nb.model import Rejected, Sample
from telemetry_nb.pipeline import codec
from telemetry_nb.pipeline.placement import partition_of, shard_of
from telemetry_nb.sources.dcgm_csv import split_records

if TYPE_CHECKING:
    from telemetry_nb.config import Settings

FAST_CHUNK_BYTES = 3 << 20  # measured: 1 M rows in 3.9-4.4 s (2 MB: 5.3, 4 MB: 4.8-5.2); peak RSS ~145 MB
EXACT_CHUNK_BYTES = 4 << 20

Entries = list[tuple[dict, int, int]]  # (entry fields, rows, partition)
ChunkResult = tuple[Entries, list[Rejected], tuple[int, int, int]]


class ChunkPool:
    """Parses `path` in chunks with `workers` processes (forked; in this process when 1), results in order.

    Each result is (entries, rejected rows, (rows read vectorized, lines read exactly, 1 if the whole chunk
    was)), as `encode_chunk` returns it. `parser` "fast" reads chunks vectorized (`dcgm_fast`), "exact" row by row.
    """

    def __init__(self, path: str, workers: int, *, batch_size: int, shard: tuple[int, int] = (0, 1),
                 partitions: int = 1, limits=None, parser: str = "exact", chunk_bytes: int | None = None):
        if parser not in ("fast", "exact"):
            raise ValueError(f"parser must be 'fast' or 'exact', got {parser!r}")
        self.parser = parser
        self._args = (batch_size, shard, limits, partitions, parser)
        size = chunk_bytes or (FAST_CHUNK_BYTES if parser == "fast" else EXACT_CHUNK_BYTES)
        self._chunks = split_records(path, size)
        self._inflight: collections.deque[concurrent.futures.Future] = collections.deque()
        self._depth = 2 * workers
        self._stopped = False
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        _keep_freed_memory()  # before the fork: the workers inherit it
        if workers > 1:
            if parser == "fast":  # imported once here, before the fork: 0.46 s less CPU than in each worker
                from telemetry_nb.pipeline import codec_columns  # noqa: F401
            self._pool = concurrent.futures.ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("fork"), initializer=_worker_init,
                initargs=(parser == "fast",))
            self._fill()

    @classmethod
    def from_settings(cls, settings: Settings, path: str, workers: int, limits=None, parser: str = "exact"
                      ) -> ChunkPool:
        """A pool cutting entries as the settings' streamer does (batch size, shard, partitions); parsing starts."""
        return cls(path, workers, batch_size=settings.batch_size, shard=(settings.shard_index, settings.shard_count),
                   partitions=settings.stream_partitions, limits=limits, parser=parser)

    def results(self, should_stop: Callable[[], bool] = lambda: False) -> Iterator[ChunkResult]:
        """Every chunk's result in file order; once `should_stop()`, no new chunk starts (those in flight end)."""
        if self._pool is None:
            for chunk in self._chunks:
                if should_stop():
                    return
                yield encode_chunk(chunk, *self._args)
            return
        while self._inflight:
            result = self._inflight.popleft().result()
            if should_stop():
                self._stopped = True
            self._fill()
            yield result

    def close(self) -> None:
        """Stop the workers (chunks not started are dropped) and close the file."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._chunks.close()

    def __enter__(self) -> ChunkPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _fill(self) -> None:
        while not self._stopped and len(self._inflight) < self._depth:
            chunk = next(self._chunks, None)
            if chunk is None:
                return
            self._inflight.append(self._pool.submit(encode_chunk, chunk, *self._args))


def encode_chunk(chunk, batch_size: int, shard: tuple[int, int], limits=None, partitions: int = 1,
                 parser: str = "exact") -> ChunkResult:
    """Parse one chunk of a CSV file and encode its samples in batches per partition (runs in a worker process).

    Returns (fields, rows, partition) entries, the rejected rows, and what the fast reader did: (rows
    vectorized, lines read exactly, 1 if the whole chunk was). `parser` "fast" reads it vectorized
    (`dcgm_fast`), the same entries as "exact" (row by row).
    """
    if parser == "fast":
        return _encode_fast(chunk, batch_size, shard, limits, partitions)
    from telemetry_nb.sources.dcgm_csv import read_chunk

    rejected: list[Rejected] = []
    samples: list[Sample] = []
    for row in read_chunk(chunk, with_labels=True, limits=limits):
        if isinstance(row, Rejected):
            rejected.append(row)
        else:
            samples.append(row)
    return _encode_samples(samples, batch_size, shard, partitions), rejected, (0, 0, 0)


def _encode_samples(samples: list[Sample], batch_size: int, shard: tuple[int, int], partitions: int) -> Entries:
    shard_i, shard_n = shard
    entries: Entries = []
    batches: dict[int, list[Sample]] = {}
    for row in samples:
        if shard_n <= 1 or shard_of(row.uuid, shard_n) == shard_i:
            p = partition_of(row.uuid, partitions) if partitions > 1 else 0
            batch = batches.setdefault(p, [])
            batch.append(row)
            if len(batch) >= batch_size:
                entries.append((codec.encode(batch), len(batch), p))
                batches[p] = []
    for p, batch in batches.items():
        if batch:
            entries.append((codec.encode(batch), len(batch), p))
    return entries


_FAST_READERS: dict = {}


class _NoPandas(importlib.abc.MetaPathFinder):
    """Refuses `import pandas`: pyarrow tries it on first use, and does fine without it."""

    def find_spec(self, name, path=None, target=None):
        if name == "pandas" or name.startswith("pandas."):
            raise ImportError("pandas is not imported in CSV parser worker processes")
        return None


def _worker_init(fast: bool) -> None:
    """A parser worker process: Ctrl-C is the streamer's to handle (it stops the pool), and a fast parser keeps
    pyarrow from importing pandas (~50 MB and 0.3 s CPU for nothing)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if fast and "pandas" not in sys.modules:
        sys.meta_path.insert(0, _NoPandas())


def _keep_freed_memory() -> None:
    """glibc malloc: keep freed chunk-sized blocks for the next chunk instead of returning them to the kernel.

    Every chunk allocates and frees the same few MB (numpy and pyarrow temporaries); unmapped and mapped
    again, they cost a page fault per 4 kB (measured: 0.9-1.2 s of system CPU per 1 M rows, 0.4 s with this).
    The peak resident memory is what it was: the same blocks, reused.
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return
    mallopt(_M_MMAP_THRESHOLD, 64 << 20)
    mallopt(_M_TRIM_THRESHOLD, 256 << 20)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt(3) parameters


def _encode_fast(chunk, batch_size: int, shard: tuple[int, int], limits, partitions: int) -> ChunkResult:
    from telemetry_nb.pipeline.codec_columns import encode_columns
    from telemetry_nb.sources.dcgm_fast import FastReader

    reader = _FAST_READERS.get(limits)
    if reader is None:  # one per process: it keeps per-distinct-value work across chunks
        import pyarrow

        # malloc hands freed chunk buffers back sooner than pyarrow's default pool (mimalloc): ~25 MB less RSS
        pyarrow.set_memory_pool(pyarrow.system_memory_pool())
        reader = _FAST_READERS[limits] = FastReader(with_labels=True, limits=limits)
    parsed = reader.read(chunk)
    if parsed.columns is None:
        return (_encode_samples(parsed.items, batch_size, shard, partitions), parsed.rejected,
                (0, parsed.exact_lines, 1))
    entries = encode_columns(parsed.columns, batch_size, shard, shard_of, partitions, partition_of)
    return entries, parsed.rejected, (parsed.fast_rows, parsed.exact_lines, 0)

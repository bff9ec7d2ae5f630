"""Where a GPU's rows go: its shard among streamers and its partition among stream keys (no Redis needed)."""

from __future__ import annotations

import zlib


def partition_of(uuid: str, count: int) -> int:
    """Stable partition of a GPU: the same uuid always goes to the same one of `count` (crc32, like shards)."""
    return zlib.crc32(uuid.encode()) % count if count > 1 else 0


def shard_of(uuid: str, count: int) -> int:
    """Stable shard of a GPU: the same uuid always lands on the same one of `count` streamers."""
    return partition_of(uuid, count)


def parse_shard(text: str) -> tuple[int, int]:
    """`I/N` (0 ≤ I < N) → (I, N)."""
    try:
        i, n = (int(p) for p in text.split("/"))
    except ValueError:
        raise ValueError(f"invalid shard {text!r}: use I/N, e.g. 0/3") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"invalid shard {text!r}: need 0 <= I < N")
    return i, n

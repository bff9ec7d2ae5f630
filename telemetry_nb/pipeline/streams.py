"""Redis Streams: publish batches, read as a group member, ack, claim stale entries, dead-letter, lag.

Trimming is only ever done below the oldest entry that some consumer group still needs
(its oldest pending entry, or the first one it has not been delivered), so no unacknowledged
entry is ever removed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import redis

from telemetry_nb.backoff import Backoff, retry
from telemetry_nb.model import Rejected

T = TypeVar("T")

Entry = tuple[bytes, dict[bytes, bytes]]
REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.BusyLoadingError,
                redis.exceptions.TryAgainError, ConnectionError, OSError)


def connect(url: str, *, timeout_s: float = 10.0) -> redis.Redis:
    """A client for `redis://`, `rediss://` (TLS) or `unix://` URLs, with sane socket timeouts."""
    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                health_check_interval=30)


def retry_redis(fn: Callable[[], T], *, log: logging.Logger, retry_max_s: float, on_retry: Callable[[], None],
                should_stop: Callable[[], bool], what: str = "Redis") -> T:
    """Call `fn` until Redis answers: capped exponential backoff, a log line naming `what`, `on_retry` per failure."""
    return retry(fn, what=what, errors=REDIS_ERRORS, log=log, backoff=Backoff(retry_max_s),
                 on_retry=lambda _err: on_retry(), should_stop=should_stop)


def _next_id(entry_id: bytes | str) -> str:
    ms, _, seq = (entry_id.decode() if isinstance(entry_id, bytes) else entry_id).partition("-")
    return f"{ms}-{int(seq or 0) + 1}"


def _id_key(entry_id: bytes | str) -> tuple[int, int]:
    ms, _, seq = (entry_id.decode() if isinstance(entry_id, bytes) else entry_id).partition("-")
    return int(ms), int(seq or 0)


@dataclass
class Claimed:
    """What one XAUTOCLAIM sweep returned: live entries now ours, and how many pending IDs were deleted."""

    entries: list[Entry]
    deleted: list[bytes]
    cursor: bytes


class Queue:
    """One stream, its consumer group, and its dead-letter and rejected-row streams."""

    def __init__(self, client: redis.Redis, stream: str, group: str = "collectors", consumer: str = "c1"):
        self.r = client
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.dead_stream = f"{stream}:dead"  # entries a collector gave up on, with their error
        self.rejected_stream = f"{stream}:rejected"  # rows a source could not read, with line and reason
        self.r.set_response_callback("XAUTOCLAIM", _raw)

    # -- producer side -------------------------------------------------------------------------
    def ensure_group(self) -> None:
        """Create the stream and group from the very first entry, so nothing published early is missed."""
        try:
            self.r.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as err:
            if "BUSYGROUP" not in str(err):
                raise

    def publish(self, entries: Iterable[dict[bytes, bytes]]) -> list[bytes]:
        """XADD every entry in one pipeline round trip; returns their IDs."""
        pipe = self.r.pipeline(transaction=False)
        for fields in entries:
            pipe.xadd(self.stream, fields)
        return pipe.execute()

    def reject(self, rows: Iterable[Rejected], source: str = "") -> int:
        """Publish rejected rows (line, reason, raw) where an operator can read them."""
        pipe = self.r.pipeline(transaction=False)
        n = 0
        for row in rows:
            pipe.xadd(self.rejected_stream, {"source": row.source or source, "line": str(row.line),
                                             "reason": row.reason, "raw": row.raw})
            n += 1
        if n:
            pipe.execute()
        return n

    # -- consumer side -------------------------------------------------------------------------
    def read(self, count: int, block_ms: int | None = None, *, pending: bool = False) -> list[Entry]:
        """XREADGROUP: our own pending entries (`pending=True`, ID 0) or new ones (`>`)."""
        resp = self.r.xreadgroup(self.group, self.consumer, {self.stream: "0" if pending else ">"},
                                 count=count, block=None if pending else block_ms)
        if not resp:
            return []
        entries = resp[0][1]
        return [(eid, fields) for eid, fields in entries if fields is not None]

    def ack(self, ids: list[bytes]) -> int:
        if not ids:
            return 0
        return self.r.xack(self.stream, self.group, *ids)

    def deliveries(self, ids: list[bytes]) -> dict[bytes, int]:
        """How many times each of our pending `ids` has been delivered."""
        if not ids:
            return {}
        ordered = sorted(ids, key=_id_key)
        rows = self.r.xpending_range(self.stream, self.group, min=ordered[0], max=ordered[-1],
                                     count=max(len(ids), 1) * 4)
        wanted = set(ids)
        return {row["message_id"]: row["times_delivered"] for row in rows if row["message_id"] in wanted}

    def claim_stale(self, min_idle_ms: int, count: int = 100, cursor: bytes | str = b"0-0") -> Claimed:
        """XAUTOCLAIM entries idle longer than `min_idle_ms` (a dead collector's) for this consumer.

        IDs that are pending but whose entries were deleted from the stream are data loss: they are
        returned in `deleted` (and acked so they stop haunting the PEL) for the caller to count.
        Redis 7 lists them itself; Redis 6.2 returns nil in their place, so they are found by lookup.
        """
        resp = self.r.execute_command("XAUTOCLAIM", self.stream, self.group, self.consumer,
                                      int(min_idle_ms), cursor, "COUNT", count)
        next_cursor, raw_entries = resp[0], resp[1] or []
        deleted = list(resp[2]) if len(resp) > 2 and resp[2] else []
        entries: list[Entry] = []
        holes = False
        for item in raw_entries:
            if item is None or item[1] is None:
                holes = True
                continue
            flat = item[1]
            entries.append((item[0], dict(zip(flat[::2], flat[1::2], strict=True))))
        if holes:
            deleted.extend(self._deleted_among_ours(cursor, next_cursor, {eid for eid, _ in entries}))
        if deleted:
            self.ack(deleted)
        return Claimed(entries=entries, deleted=deleted, cursor=next_cursor)

    def _deleted_among_ours(self, start: bytes | str, end: bytes | str, live: set[bytes]) -> list[bytes]:
        high = "+" if end in (b"0-0", "0-0") else end
        rows = self.r.xpending_range(self.stream, self.group, min=start, max=high, count=10000,
                                     consumername=self.consumer)
        candidates = [row["message_id"] for row in rows if row["message_id"] not in live]
        pipe = self.r.pipeline(transaction=False)
        for eid in candidates:
            pipe.xrange(self.stream, min=eid, max=eid, count=1)
        return [eid for eid, found in zip(candidates, pipe.execute(), strict=True) if not found]

    def dead_letter(self, entry_id: bytes, fields: dict[bytes, bytes], error: str, deliveries: int = 0) -> None:
        """Move an entry to the dead-letter stream with its error, and ack it, atomically."""
        pipe = self.r.pipeline(transaction=True)
        dead = {b"entry_id": entry_id, b"error": error.encode(), b"deliveries": str(deliveries).encode(),
                b"group": self.group.encode(), b"consumer": self.consumer.encode(),
                b"at": str(time.time()).encode()}
        dead.update({b"f:" + k: v for k, v in fields.items()})
        pipe.xadd(self.dead_stream, dead)
        pipe.xack(self.stream, self.group, entry_id)
        pipe.execute()

    # -- health --------------------------------------------------------------------------------
    def groups(self) -> list[dict]:
        try:
            return self.r.xinfo_groups(self.stream)
        except redis.ResponseError:
            return []

    def pending_count(self) -> int:
        """Entries delivered to our group and not yet acknowledged."""
        for g in self.groups():
            if g["name"] in (self.group, self.group.encode()):
                return int(g["pending"])
        return 0

    def safe_trim(self) -> int:
        """Trim entries every group has acknowledged; returns how many were removed."""
        groups = self.groups()
        if not groups:
            return 0
        floor: tuple[int, int] | None = None
        floor_id = ""
        for g in groups:
            oldest = self.r.xpending(self.stream, g["name"])["min"] if int(g["pending"]) else None
            if oldest is not None:
                candidate = oldest.decode() if isinstance(oldest, bytes) else str(oldest)
            else:  # nothing pending (or it was acked meanwhile): everything delivered is acknowledged
                candidate = _next_id(g["last-delivered-id"])
            if floor is None or _id_key(candidate) < floor:
                floor, floor_id = _id_key(candidate), candidate
        if floor is None or floor == (0, 0):
            return 0
        return int(self.r.xtrim(self.stream, minid=floor_id, approximate=False))

    def undelivered(self) -> int:
        """Entries not yet delivered to our group (Redis 7 reports it; on 6.2 it is derived after `safe_trim`)."""
        for g in self.groups():
            if g["name"] in (self.group, self.group.encode()):
                if g.get("lag") is not None:
                    return int(g["lag"])
                info = self.r.xinfo_stream(self.stream)
                if info["last-generated-id"] == g["last-delivered-id"]:
                    return 0  # caught up
                self.safe_trim()
                return max(0, int(self.r.xlen(self.stream)) - int(g["pending"]))
        return int(self.r.xlen(self.stream)) if self.r.exists(self.stream) else 0

    def backlog(self) -> int:
        """Entries published and not yet acknowledged by our group: what backpressure and lag watch."""
        return self.undelivered() + self.pending_count()

    def dead_count(self) -> int:
        return int(self.r.xlen(self.dead_stream)) if self.r.exists(self.dead_stream) else 0

    def rejected_count(self) -> int:
        return int(self.r.xlen(self.rejected_stream)) if self.r.exists(self.rejected_stream) else 0

    def read_dead(self, count: int = 100) -> list[dict[str, str]]:
        """The newest dead-letter entries, decoded, for operators and checks."""
        return [_decode(fields) for _, fields in self.r.xrevrange(self.dead_stream, count=count)]

    def read_rejected(self, count: int = 100) -> list[dict[str, str]]:
        """The oldest rejected rows (line, reason, raw, source)."""
        return [_decode(fields) for _, fields in self.r.xrange(self.rejected_stream, count=count)]


def _raw(response, **options):
    return response


def _decode(fields: dict[bytes, bytes]) -> dict[str, str]:
    out = {}
    for k, v in fields.items():
        key = k.decode(errors="replace")
        if key == "f:rows":
            continue
        out[key] = v.decode(errors="replace")
    return out


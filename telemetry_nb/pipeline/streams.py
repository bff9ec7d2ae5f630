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


def redis_probe(url: str, timeout_s: float = 2.0) -> Callable[[], object]:
    """A cheap readiness probe: PING over a client of its own with short timeouts; raises when Redis is down."""
    client = connect(url, timeout_s=timeout_s)
    return client.ping


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


# Remove consumers idle past ARGV[3] ms with nothing pending, except ARGV[2] (ourselves), in one atomic step:
# checked and deleted together, so a consumer that reads an entry meanwhile never loses its pending list.
_PRUNE = """
local removed = {}
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local f = {}
  for i = 1, #c, 2 do f[c[i]] = c[i + 1] end
  if f['name'] ~= ARGV[2] and tonumber(f['pending']) == 0 and tonumber(f['idle']) > tonumber(ARGV[3]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], f['name'])
    table.insert(removed, f['name'])
  end
end
return removed
"""


@dataclass
class GroupUse:
    """How a consumer group uses the stream: who last read, and the oldest entry it still holds back."""

    name: str
    consumers: int
    pending: int
    idle_s: float | None  # since its most recent consumer last talked to Redis; None without consumers
    behind: bool  # it has pending entries or has not seen the newest one
    holding_s: float  # age of the oldest entry it still needs (0 when it needs none)

    def stale(self, after_s: float) -> bool:
        """No collector used it for `after_s` while it holds entries back from trimming."""
        return self.behind and self.holding_s > after_s and (self.idle_s is None or self.idle_s > after_s)


@dataclass
class Claimed:
    """What one XAUTOCLAIM sweep returned: live entries now ours, and how many pending IDs were deleted."""

    entries: list[Entry]
    deleted: list[bytes]
    cursor: bytes


class Queue:
    """One stream, its consumer group, and its dead-letter and rejected-row streams."""

    def __init__(self, client: redis.Redis, stream: str, group: str = "collectors", consumer: str = "c1", *,
                 side_maxlen: int = 100_000):
        self.r = client
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.side_maxlen = side_maxlen  # approximate cap of each side stream (MAXLEN ~)
        self.dead_stream = f"{stream}:dead"  # entries a collector gave up on, with their error
        self.rejected_stream = f"{stream}:rejected"  # rows a source could not read, with line and reason
        # lifetime totals of the side streams, which are capped: every record counted, also trimmed ones
        self.dead_total_key = f"{stream}:dead:total"
        self.rejected_total_key = f"{stream}:rejected:total"
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
        """Publish rejected rows (line, reason, raw) where an operator can read them, and count them."""
        pipe = self.r.pipeline(transaction=True)
        n = 0
        for row in rows:
            pipe.xadd(self.rejected_stream, {"source": row.source or source, "line": str(row.line),
                                             "reason": row.reason, "raw": row.raw},
                      maxlen=self.side_maxlen, approximate=True)
            n += 1
        if n:
            pipe.incrby(self.rejected_total_key, n)
            pipe.execute()
        return n

    def count_rejected(self, n: int) -> None:
        """Count `n` rejected rows without publishing them again (a looped file's later passes)."""
        if n:
            self.r.incrby(self.rejected_total_key, n)

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
        """How many times each pending entry of `ids` has been delivered: one exact XPENDING range per ID."""
        if not ids:
            return {}
        pipe = self.r.pipeline(transaction=False)
        for eid in ids:
            pipe.xpending_range(self.stream, self.group, min=eid, max=eid, count=1)
        out = {}
        for eid, rows in zip(ids, pipe.execute(), strict=True):
            if rows:
                out[eid] = int(rows[0]["times_delivered"])
        return out

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
        self.dead_letter_parts(entry_id, [(fields, error, {})], deliveries)

    def dead_letter_parts(self, entry_id: bytes, parts: Iterable[tuple[dict[bytes, bytes], str, dict[bytes, bytes]]],
                          deliveries: int = 0) -> int:
        """Dead-letter parts of an entry (fields, error, extra fields each) and ack the entry, atomically.

        With no parts it only acks. Returns how many dead-letter records were written.
        """
        pipe = self.r.pipeline(transaction=True)
        n = 0
        for fields, error, extra in parts:
            dead = {b"entry_id": entry_id, b"error": error.encode(), b"deliveries": str(deliveries).encode(),
                    b"group": self.group.encode(), b"consumer": self.consumer.encode(),
                    b"at": str(time.time()).encode(), **extra}
            dead.update({b"f:" + k: v for k, v in fields.items()})
            pipe.xadd(self.dead_stream, dead, maxlen=self.side_maxlen, approximate=True)
            n += 1
        if n:
            pipe.incrby(self.dead_total_key, n)
        pipe.xack(self.stream, self.group, entry_id)
        pipe.execute()
        return n

    def prune_consumers(self, idle_s: float) -> list[str]:
        """Remove other consumers idle longer than `idle_s` with nothing pending (restarts leave them behind)."""
        try:
            removed = self.r.eval(_PRUNE, 1, self.stream, self.group, self.consumer, int(idle_s * 1000))
        except redis.ResponseError as err:
            if "NOGROUP" in str(err) or "no such key" in str(err).lower():
                return []  # no group (yet, or any more): nothing to prune
            raise
        return [r.decode() if isinstance(r, bytes) else str(r) for r in removed or []]

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
        """Entries not yet delivered to our group; read-only (it never trims).

        Exact when the group has seen the newest entry (0) and on Redis 7 (its `lag`); on Redis 6.2 it is
        XLEN less pending, an upper bound that is exact right after `safe_trim` (which writers call).
        """
        for g in self.groups():
            if g["name"] in (self.group, self.group.encode()):
                if g.get("lag") is not None:
                    return int(g["lag"])
                info = self.r.xinfo_stream(self.stream)
                if info["last-generated-id"] == g["last-delivered-id"]:
                    return 0  # caught up
                return max(0, int(info["length"]) - int(g["pending"]))
        return int(self.r.xlen(self.stream)) if self.r.exists(self.stream) else 0

    def backlog(self) -> int:
        """Entries published and not yet acknowledged by our group: what backpressure and lag watch."""
        return self.undelivered() + self.pending_count()

    def dead_count(self) -> int:
        """Dead-letter records ever written (the stream itself is capped; streams from before the counter count too)."""
        return self._lifetime(self.dead_total_key, self.dead_stream)

    def rejected_count(self) -> int:
        """Rejected rows ever counted, including those trimmed from the capped stream and later passes of a loop."""
        return self._lifetime(self.rejected_total_key, self.rejected_stream)

    def _lifetime(self, counter: str, side: str) -> int:
        pipe = self.r.pipeline(transaction=False)
        pipe.get(counter)
        pipe.xlen(side)
        total, length = pipe.execute()
        return max(int(total or 0), int(length or 0))

    def group_uses(self) -> list[GroupUse]:
        """Every group on the stream and how it is used (read-only), to find abandoned ones that pin trimming."""
        groups = self.groups()
        if not groups:
            return []
        info = self.r.xinfo_stream(self.stream)
        now_s, now_us = self.r.time()
        now_ms = now_s * 1000 + now_us // 1000
        out = []
        for g in groups:
            name = _str(g["name"])
            consumers = self.r.xinfo_consumers(self.stream, name)
            idle = min((int(c["idle"]) for c in consumers), default=None)
            pending = int(g["pending"])
            behind = pending > 0 or _str(info["last-generated-id"]) != _str(g["last-delivered-id"])
            holding_ms = 0
            if behind:
                oldest = self.r.xpending(self.stream, name)["min"] if pending else None
                floor = _str(oldest) if oldest is not None else _next_id(g["last-delivered-id"])
                first = info.get("first-entry")
                first_ms = _id_key(first[0])[0] if first else now_ms
                holding_ms = now_ms - max(_id_key(floor)[0], first_ms)
            out.append(GroupUse(name=name, consumers=len(consumers), pending=pending,
                                idle_s=None if idle is None else idle / 1000, behind=behind,
                                holding_s=max(0, holding_ms) / 1000))
        return out

    def read_dead(self, count: int = 100) -> list[dict[str, str]]:
        """The newest dead-letter entries, decoded, for operators and checks."""
        return [_decode(fields) for _, fields in self.r.xrevrange(self.dead_stream, count=count)]

    def read_rejected(self, count: int = 100) -> list[dict[str, str]]:
        """The oldest rejected rows (line, reason, raw, source)."""
        return [_decode(fields) for _, fields in self.r.xrange(self.rejected_stream, count=count)]


def _str(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


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


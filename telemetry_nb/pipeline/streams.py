"""Redis Streams: publish batches, read as a group member, ack, claim stale entries, dead-letter, lag.

Trimming is only ever done below the oldest entry that some consumer group still needs
(its oldest pending entry, or the first one it has not been delivered), so no unacknowledged
entry is ever removed.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry

from telemetry_nb.backoff import Backoff, retry
from telemetry_nb.model import Rejected
from telemetry_nb.pipeline.placement import partition_of

if TYPE_CHECKING:
    from telemetry_nb.config import Settings

T = TypeVar("T")

Entry = tuple[bytes, dict[bytes, bytes]]
# a Redis Cluster node that is down or failing over answers CLUSTERDOWN/MASTERDOWN, or leaves a slot uncovered
REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.BusyLoadingError,
                redis.exceptions.TryAgainError, redis.exceptions.ClusterDownError,
                redis.exceptions.RedisClusterException, ConnectionError, OSError)
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def is_cluster_url(url: str) -> bool:
    """`redis+cluster://` or `rediss+cluster://` (TLS): a Redis Cluster, reached through any of its nodes."""
    return urlsplit(url).scheme in CLUSTER_SCHEMES


def connect(url: str, *, timeout_s: float = 10.0) -> redis.Redis | RedisCluster:
    """A client for `redis://`, `rediss://` (TLS) or `unix://` URLs, or a cluster client for
    `redis+cluster://host:port[,host:port…]` (the nodes listed are only where discovery starts)."""
    options = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s, "health_check_interval": 30}
    if not is_cluster_url(url):
        return redis.Redis.from_url(url, **options)
    parts = urlsplit(url)
    auth, _, hosts = parts.netloc.rpartition("@")
    nodes = [h.strip() for h in hosts.split(",") if h.strip()]
    if not nodes:
        raise ValueError(f"no node in Redis Cluster URL {parts.scheme}://…: use redis+cluster://host:port")
    first = f"{auth}@{nodes[0]}" if auth else nodes[0]
    plain = urlunsplit((CLUSTER_SCHEMES[parts.scheme], first, parts.path, parts.query, parts.fragment))
    startup = []
    for node in nodes[1:]:
        host, _, port = node.rpartition(":")
        startup.append(ClusterNode(host or node, int(port) if host else 6379))
    # a few quick attempts per call: while a master is down the caller's own backoff retries, and logs it
    return RedisCluster.from_url(plain, startup_nodes=startup, retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
                                 **options)


def is_cluster(client: object) -> bool:
    return isinstance(client, RedisCluster)


def redis_probe(url: str, timeout_s: float = 2.0, stream: str = "telemetry", partitions: int = 1
                ) -> Callable[[], object]:
    """A cheap readiness probe with short timeouts; raises when Redis is down. On a cluster it asks the
    node of every partition key (EXISTS), so a down master that holds a partition fails it; the cluster
    client is made on the first call, so a process starts while the cluster is down."""
    if not is_cluster_url(url):
        return connect(url, timeout_s=timeout_s).ping
    keys = partition_keys(stream, partitions, cluster=True)
    made: list[redis.Redis | RedisCluster] = []

    def probe() -> int:
        if not made:
            made.append(connect(url, timeout_s=timeout_s))
        return sum(int(made[0].exists(k)) for k in keys)
    return probe


def partition_keys(stream: str, count: int = 1, *, cluster: bool = False) -> list[str]:
    """The stream keys of `count` partitions: `stream` itself for one partition on a plain Redis (the
    names deployments always had), else `stream:{0}` … `stream:{N-1}`. The hash tag puts a partition's
    side keys (`…:dead`, `…:rejected`, their totals) in its slot, so MULTI and Lua over them work on a cluster."""
    if count < 1:
        raise ValueError(f"stream partitions must be at least 1, got {count}")
    if count == 1 and not cluster:
        return [stream]
    return [f"{stream}:{{{i}}}" for i in range(count)]


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
            if item is None or not item[1]:  # a live entry has fields; a cluster client parses a hole to {}
                holes = True
                continue
            flat = item[1]  # raw [k, v, …]; a cluster client's nodes parse replies themselves: {k: v}
            entries.append((item[0], flat if isinstance(flat, dict) else dict(zip(flat[::2], flat[1::2], strict=True))))
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



class Partitions:
    """The partition queues of one stream: where a GPU's entries go, and totals over all partitions.

    Every partition is a `Queue` of its own (stream, consumer group, dead-letter and rejected streams);
    one partition on a plain Redis is exactly the single stream of old.
    """

    def __init__(self, queues: list[Queue], stream: str | None = None):
        if not queues:
            raise ValueError("at least one partition queue is needed")
        self.queues = queues
        self.r = queues[0].r
        self.stream = stream or queues[0].stream  # the configured name, for log lines
        self.group = queues[0].group
        self.consumer = queues[0].consumer

    @classmethod
    def open(cls, client: redis.Redis | RedisCluster, stream: str, group: str = "collectors", consumer: str = "c1",
             *, count: int = 1, side_maxlen: int = 100_000) -> Partitions:
        """The `count` partitions of `stream` (names from `partition_keys`; hash-tagged on a cluster)."""
        keys = partition_keys(stream, count, cluster=is_cluster(client))
        return cls([Queue(client, k, group, consumer, side_maxlen=side_maxlen) for k in keys], stream)

    @property
    def rejected_stream(self) -> str:
        return self.queues[0].rejected_stream if len(self) == 1 else f"{self.stream}:{{0..{len(self) - 1}}}:rejected"

    @property
    def dead_stream(self) -> str:
        return self.queues[0].dead_stream if len(self) == 1 else f"{self.stream}:{{0..{len(self) - 1}}}:dead"

    def __len__(self) -> int:
        return len(self.queues)

    def __iter__(self) -> Iterator[Queue]:
        return iter(self.queues)

    def __getitem__(self, i: int) -> Queue:
        return self.queues[i]

    def index(self, uuid: str) -> int:
        """The partition of a GPU."""
        return partition_of(uuid, len(self.queues))

    # -- producer side -------------------------------------------------------------------------
    def ensure_group(self) -> None:
        for q in self.queues:
            q.ensure_group()

    def publish(self, entries: Iterable[tuple[int, dict[bytes, bytes]]]) -> list[bytes]:
        """XADD (partition, fields) entries in one pipeline (on a cluster, one round trip per node)."""
        pipe = self.r.pipeline(transaction=False)
        for p, fields in entries:
            pipe.xadd(self.queues[p].stream, fields)
        return pipe.execute()

    def _source_queue(self, source: str) -> Queue:
        # a source's rejected rows stay in one partition, in line order, for whoever reads them
        return self.queues[partition_of(source, len(self.queues))]

    def reject(self, rows: Iterable[Rejected], source: str = "") -> int:
        rows = list(rows)
        by_queue: dict[int, list[Rejected]] = {}
        for row in rows:
            by_queue.setdefault(partition_of(row.source or source, len(self.queues)), []).append(row)
        return sum(self.queues[p].reject(part, source) for p, part in by_queue.items())

    def count_rejected(self, n: int, source: str = "") -> None:
        self._source_queue(source).count_rejected(n)

    # -- consumer side and health, per partition and in total ------------------------------------
    def backlogs(self, partitions: Iterable[int] | None = None) -> dict[int, int]:
        """Unacknowledged entries of our group per partition (all of them, or those named)."""
        chosen = range(len(self.queues)) if partitions is None else sorted(set(partitions))
        return {p: self.queues[p].backlog() for p in chosen}

    def backlog(self) -> int:
        return sum(self.backlogs().values())

    def pending_count(self) -> int:
        return sum(q.pending_count() for q in self.queues)

    def safe_trim(self, partitions: Iterable[int] | None = None) -> int:
        chosen = range(len(self.queues)) if partitions is None else sorted(set(partitions))
        return sum(self.queues[p].safe_trim() for p in chosen)

    def prune_consumers(self, idle_s: float) -> list[str]:
        out: list[str] = []
        for q in self.queues:
            out.extend(n for n in q.prune_consumers(idle_s) if n not in out)
        return out

    def dead_count(self) -> int:
        return sum(q.dead_count() for q in self.queues)

    def rejected_count(self) -> int:
        return sum(q.rejected_count() for q in self.queues)

    def group_uses(self) -> list[tuple[str, GroupUse]]:
        """(partition key, group use) for every group on every partition."""
        return [(q.stream, g) for q in self.queues for g in q.group_uses()]

    def read_dead(self, count: int = 100) -> list[dict[str, str]]:
        """The newest dead-letter entries over all partitions (newest first, by when they were dead-lettered)."""
        if len(self.queues) == 1:
            return self.queues[0].read_dead(count)
        every = [d for q in self.queues for d in q.read_dead(count)]
        return heapq.nlargest(count, every, key=lambda d: float(d.get("at") or 0))

    def read_rejected(self, count: int = 100) -> list[dict[str, str]]:
        """The oldest rejected rows of each partition, a source's rows in line order."""
        if len(self.queues) == 1:
            return self.queues[0].read_rejected(count)
        every = [r for q in self.queues for r in q.read_rejected(count)]
        return sorted(every, key=lambda r: (r.get("source", ""), _int(r.get("line"))))[:count]


def as_partitions(queue: Queue | Partitions) -> Partitions:
    """A `Partitions` for either: one plain `Queue` is the one partition."""
    return queue if isinstance(queue, Partitions) else Partitions([queue])


def _int(text: str | None) -> int:
    try:
        return int(text or 0)
    except ValueError:
        return 0

def open_partitions(settings: Settings, client: redis.Redis | RedisCluster | None = None, *,
                    timeout_s: float = 10.0, wait: bool = True) -> Partitions:
    """The configured stream's partitions (`TELEMETRY_STREAM_PARTITIONS`) over `client` or a new one;
    `wait`: a cluster client waits (with backoff) until some node answers discovery."""
    if client is None:
        if is_cluster_url(settings.redis_url) and wait:  # discovery needs a node: wait for one, as for any outage
            client = retry(lambda: connect(settings.redis_url, timeout_s=timeout_s), what="Redis Cluster",
                           errors=REDIS_ERRORS, log=logging.getLogger(__name__),
                           backoff=Backoff(settings.retry_max_s), on_retry=lambda _e: None,
                           should_stop=lambda: False)
        else:
            client = connect(settings.redis_url, timeout_s=timeout_s)
    return Partitions.open(client, settings.stream, settings.group, settings.consumer,
                           count=settings.stream_partitions, side_maxlen=settings.side_maxlen)


def partitions_probe(settings: Settings, timeout_s: float = 2.0) -> Callable[[], object]:
    """`redis_probe` for the configured stream and partitions."""
    return redis_probe(settings.redis_url, timeout_s, settings.stream, settings.stream_partitions)


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


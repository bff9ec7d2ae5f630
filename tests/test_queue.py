"""Redis Streams operations against a real Redis: groups, claims, dead letters, safe trimming, lag."""

from __future__ import annotations

from telemetry_nb.model import Rejected
from telemetry_nb.pipeline.streams import Queue
from tests.clocks import age_pending


def _q(redis_client, stream, consumer="c1") -> Queue:
    q = Queue(redis_client, stream, "g", consumer)
    q.ensure_group()
    return q


def test_group_created_before_publish_sees_everything(redis_client, stream):
    q = _q(redis_client, stream)
    q.ensure_group()  # idempotent
    ids = q.publish([{b"i": str(i).encode()} for i in range(5)])
    got = q.read(10, 100)
    assert [eid for eid, _ in got] == ids
    assert q.pending_count() == 5 and q.undelivered() == 0 and q.backlog() == 5
    q.ack(ids[:3])
    assert q.backlog() == 2


def test_own_pending_reread_after_restart(redis_client, stream):
    q = _q(redis_client, stream)
    ids = q.publish([{b"i": b"1"}, {b"i": b"2"}])
    q.read(10, 100)
    again = Queue(redis_client, stream, "g", "c1")  # same consumer name, new process
    assert [eid for eid, _ in again.read(10, pending=True)] == ids


def test_claim_stale_takes_idle_entries_and_reports_deleted(redis_client, stream):
    dead = _q(redis_client, stream, "dead-collector")
    ids = dead.publish([{b"i": str(i).encode()} for i in range(3)])
    dead.read(10, 100)
    age_pending(redis_client, stream, "g", "dead-collector", ids, 60_000)  # read a minute ago, then it died
    redis_client.xdel(stream, ids[1])  # someone trimmed an unacknowledged entry: data loss
    alive = _q(redis_client, stream, "alive")
    assert alive.claim_stale(min_idle_ms=600_000).entries == []  # not idle long enough
    claimed = alive.claim_stale(min_idle_ms=30_000)
    assert [eid for eid, _ in claimed.entries] == [ids[0], ids[2]]
    assert claimed.deleted == [ids[1]]
    # the lost ID no longer haunts the pending list, the live ones are now ours
    pending = redis_client.xpending_range(stream, "g", "-", "+", 10)
    assert {p["message_id"]: p["consumer"] for p in pending} == {ids[0]: b"alive", ids[2]: b"alive"}


def test_dead_letter_moves_and_acks_atomically(redis_client, stream):
    q = _q(redis_client, stream)
    [eid] = q.publish([{b"v": b"1", b"rows": b"x"}])
    q.read(1, 100)
    q.dead_letter(eid, {b"v": b"1", b"rows": b"x"}, "boom: bad batch", deliveries=6)
    assert q.pending_count() == 0
    [dead] = q.read_dead()
    assert dead["entry_id"] == eid.decode() and dead["error"] == "boom: bad batch" and dead["deliveries"] == "6"
    assert q.dead_count() == 1


def test_rejected_rows_readable(redis_client, stream):
    q = _q(redis_client, stream)
    q.reject([Rejected(7, "non-numeric value 'N/A'", "a,b,N/A")], source="x.csv")
    assert q.read_rejected() == [{"source": "x.csv", "line": "7", "reason": "non-numeric value 'N/A'",
                                  "raw": "a,b,N/A"}]


def test_safe_trim_never_removes_unacknowledged(redis_client, stream):
    q = _q(redis_client, stream)
    ids = q.publish([{b"i": str(i).encode()} for i in range(300)])
    q.read(300, 100)
    q.ack(ids[:200])
    q.safe_trim()
    remaining = [eid for eid, _ in redis_client.xrange(stream)]
    assert set(ids[200:]) <= set(remaining)  # everything pending survives
    q.ack(ids[200:])
    new = q.publish([{b"i": b"late"}])  # published, not yet delivered
    q.safe_trim()
    assert new[0] in [eid for eid, _ in redis_client.xrange(stream)]
    assert q.backlog() == 1


def test_no_group_means_nothing_trimmed(redis_client, stream):
    q = Queue(redis_client, stream, "g", "c1")
    redis_client.xadd(stream, {b"i": b"1"})
    assert q.safe_trim() == 0 and redis_client.xlen(stream) == 1

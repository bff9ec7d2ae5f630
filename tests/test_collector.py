"""The collector against real Redis and PostgreSQL: exactly-once rows, dead letters, outages, recovery."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import psycopg
import pytest

from telemetry_nb.config import Settings
from telemetry_nb.model import Sample
from telemetry_nb.pipeline import codec
from telemetry_nb.pipeline.collector import Collector
from telemetry_nb.pipeline.streams import Queue
from tests.clocks import age_pending
from tests.relay import Relay

T0 = datetime(2025, 7, 18, 20, 0, 0, tzinfo=UTC)


def _batch(gpu: str, n: int, start: int = 0) -> list[Sample]:
    return [Sample(gpu, "DCGM_FI_DEV_GPU_UTIL", T0 + timedelta(seconds=start + i), float(i % 100), "host-1", 0,
                   "nvidia0", "H100") for i in range(n)]


def _settings(stream: str, **kw) -> Settings:
    base = dict(stream=stream, group="g", visibility_timeout_s=30, max_deliveries=3, block_ms=100,
                retry_max_s=0.5, read_count=5)
    base.update(kw)
    return Settings(**base)


def _collector(redis_client, stream, database_url, consumer="c1", join_wait_s: float = 0.05, **kw) -> Collector:
    s = _settings(stream, **kw)
    q = Queue(redis_client, stream, s.group, consumer)
    return Collector(q, database_url, s, join_wait_s=join_wait_s)


def _count(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        try:
            return conn.execute("SELECT count(*) FROM telemetry").fetchone()[0]
        except psycopg.errors.UndefinedTable:  # the collector has not migrated yet
            return 0


def test_exactly_once_despite_redelivery_and_replay(redis_client, stream, database_url):
    q = Queue(redis_client, stream, "g", "producer")
    q.ensure_group()
    entry = codec.encode(_batch("GPU-x", 50))
    q.publish([entry, entry])  # the same batch twice, as a retried XADD would
    q.publish([codec.encode(_batch("GPU-x", 50, start=25))])  # overlaps the first by 25 rows
    totals = _collector(redis_client, stream, database_url).run(drain=True)
    assert totals["consumed"] == 150 and totals["stored"] == 75
    assert _count(database_url) == 75
    assert q.backlog() == 0


def test_undecodable_entry_dead_lettered_good_ones_stored(redis_client, stream, database_url):
    q = Queue(redis_client, stream, "g", "producer")
    q.ensure_group()
    q.publish([codec.encode(_batch("GPU-a", 10)), {b"v": b"99", b"rows": b"??"}, codec.encode(_batch("GPU-b", 10))])
    totals = _collector(redis_client, stream, database_url).run(drain=True)
    assert totals == {"consumed": 20, "stored": 20, "dead": 1, "lost": 0, "expired": 0}
    [dead] = q.read_dead()
    assert "unsupported batch encoding version" in dead["error"]
    assert _count(database_url) == 20


def test_entry_the_database_refuses_is_isolated(redis_client, stream, database_url):
    q = Queue(redis_client, stream, "g", "producer")
    q.ensure_group()
    bad = codec.as_text(codec.encode(_batch("GPU-bad", 3)))  # text rows (version 1), as older streamers send them
    bad[b"rows"] = bad[b"rows"].replace(b"2025-07-18", b"2025-13-45", 1)  # a timestamp PostgreSQL rejects
    q.publish([codec.encode(_batch("GPU-a", 10)), bad, codec.encode(_batch("GPU-b", 10))])
    totals = _collector(redis_client, stream, database_url).run(drain=True)
    assert totals["stored"] == 22 and totals["dead"] == 1  # the bad entry's two good rows are stored too
    [dead] = q.read_dead()
    assert "database rejected the batch" in dead["error"] and "2025-13-45" in dead["error"]
    assert q.backlog() == 0


def test_entry_delivered_too_often_goes_to_dead_letter(redis_client, stream, database_url):
    q = Queue(redis_client, stream, "g", "crashy")
    q.ensure_group()
    [eid] = q.publish([codec.encode(_batch("GPU-poison", 5))])
    q.read(1, 100)
    for _ in range(3):  # three more collectors claimed it and died, the last one a minute ago
        redis_client.xclaim(stream, "g", "crashy", 0, [eid], idle=60_000)
    totals = _collector(redis_client, stream, database_url, consumer="survivor").run(drain=True)
    assert totals["dead"] == 1 and totals["stored"] == 0
    [dead] = q.read_dead()
    assert dead["entry_id"] == eid.decode() and "delivered 5 times" in dead["error"]


def test_restarted_collector_recovers_its_own_pending(redis_client, stream, database_url):
    q = Queue(redis_client, stream, "g", "steady-name")
    q.ensure_group()
    q.publish([codec.encode(_batch("GPU-a", 10))])
    q.read(10, 100)  # delivered, then the process died before writing
    totals = _collector(redis_client, stream, database_url, consumer="steady-name",
                        visibility_timeout_s=3600).run(drain=True)
    assert totals["stored"] == 10 and q.pending_count() == 0


def test_postgres_outage_retries_and_loses_nothing(redis_client, stream, database_url):
    parts = urlsplit(database_url)
    relay = Relay((parts.hostname, parts.port))
    via_relay = database_url.replace(f"{parts.hostname}:{parts.port}", f"127.0.0.1:{relay.port}")
    q = Queue(redis_client, stream, "g", "producer")
    q.ensure_group()
    q.publish([codec.encode(_batch("GPU-a", 100))])
    collector = _collector(redis_client, stream, via_relay)
    thread = threading.Thread(target=collector.run, kwargs={"drain": False}, daemon=True)
    thread.start()
    try:
        _wait(lambda: _count(database_url) == 100)
        relay.cut()
        q.publish([codec.encode(_batch("GPU-a", 100, start=100))])
        _wait(lambda: collector.metrics.retries.labels("postgresql")._value.get() >= 1)  # it tried and failed
        assert _count(database_url) == 100  # nothing written while PostgreSQL is unreachable…
        assert q.backlog() >= 1  # …and the entry is not acknowledged
        relay.restore()
        _wait(lambda: _count(database_url) == 200)
        _wait(lambda: q.backlog() == 0)
    finally:
        collector.stop()
        thread.join(timeout=10)
        relay.close()


def test_killed_collectors_entries_are_claimed_by_another(redis_client, stream, database_url):
    q = Queue(redis_client, stream, "g", "doomed")
    q.ensure_group()
    q.publish([codec.encode(_batch(f"GPU-{i}", 20)) for i in range(4)])
    taken = q.read(2, 100)  # the doomed collector took two entries and vanished a minute ago
    age_pending(redis_client, stream, "g", "doomed", [eid for eid, _ in taken], 60_000)
    totals = _collector(redis_client, stream, database_url, consumer="heir").run(drain=True)
    assert totals["stored"] == 80 and _count(database_url) == 80
    assert redis_client.xpending(stream, "g")["pending"] == 0


def _wait(cond, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail("condition not reached in time")
        time.sleep(0.1)


@pytest.mark.parametrize("read_count", [1, 10])
def test_a_write_waiting_in_postgresql_does_not_hold_up_the_next(redis_client, stream, database_url, read_count):
    """With two writers, the second read is stored and acknowledged while the first waits on a lock,
    whether that read is full or short (a short one after waiting `join_wait_s` to join the first)."""
    q = _warm(redis_client, stream, database_url)
    q.publish([codec.encode(_batch("GPU-a", 10))])
    if read_count == 1:
        q.publish([codec.encode(_batch("GPU-b", 10))])
    with psycopg.connect(database_url) as blocker:
        _block_gpu_a(blocker)
        c = _collector(redis_client, stream, database_url, read_count=read_count, writers=2)
        t = threading.Thread(target=c.run, kwargs={"drain": True})
        t.start()
        if read_count > 1:  # a short read of its own, once GPU-a's is being written
            _wait_pending(redis_client, stream, 1)
            q.publish([codec.encode(_batch("GPU-b", 10))])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _gpu_rows(database_url, "GPU-b") < 10:
            time.sleep(0.05)
        b_rows, a_rows = _gpu_rows(database_url, "GPU-b"), _gpu_rows(database_url, "GPU-a")
        blocker.rollback()
    t.join(timeout=60)
    assert (b_rows, a_rows) == (10, 0)  # GPU-b stored while GPU-a's write was still waiting
    assert _gpu_rows(database_url, "GPU-a") == 10 and q.backlog() == 0


def _warm(redis_client, stream: str, database_url: str) -> Queue:
    """A producer's queue, after one entry was collected: the schema, the metric and a partition exist."""
    q = Queue(redis_client, stream, "g", "producer")
    q.ensure_group()
    q.publish([codec.encode(_batch("GPU-warm", 1))])
    _collector(redis_client, stream, database_url).run(drain=True)
    return q


def _block_gpu_a(blocker: psycopg.Connection) -> None:
    """An uncommitted inventory row of GPU-a: a write of GPU-a's entries waits on it (the unique uuid)."""
    blocker.execute("INSERT INTO gpus (id, uuid, hostname, gpu_index, device, model_name) "
                    "VALUES (%s, 'GPU-a', 'host-1', 0, 'nvidia0', 'H100')", (codec.gpu_key("GPU-a"),))


def _gpu_rows(database_url: str, uuid: str) -> int:
    with psycopg.connect(database_url) as conn:
        return conn.execute("SELECT count(*) FROM telemetry t JOIN gpus g ON g.id = t.gpu_id WHERE g.uuid = %s",
                            (uuid,)).fetchone()[0]


def test_writers_come_from_the_environment_and_the_command_line():
    from telemetry_nb import cli

    assert Settings.from_env({}).writers == 2
    assert Settings.from_env({"TELEMETRY_COLLECTOR_WRITERS": "4"}).writers == 4
    with pytest.raises(ValueError, match="TELEMETRY_COLLECTOR_WRITERS"):
        Settings.from_env({"TELEMETRY_COLLECTOR_WRITERS": "0"})
    args = cli.build_parser().parse_args(["collect", "--writers", "3"])
    assert args.writers == 3
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["collect", "--writers", "0"])


@pytest.mark.parametrize("writers", [1, 2])
def test_reads_queued_behind_a_busy_writer_become_one_transaction(redis_client, stream, database_url, writers):
    """A write held by a lock: the three short reads that queue meanwhile are written as one transaction,
    with one writer, and with two while the reads wait for the running write (`join_wait_s`)."""
    q = _warm(redis_client, stream, database_url)
    with psycopg.connect(database_url) as blocker:
        _block_gpu_a(blocker)
        c = _collector(redis_client, stream, database_url, read_count=10, writers=writers, join_wait_s=60)
        t = threading.Thread(target=c.run, kwargs={"drain": True})
        t.start()
        q.publish([codec.encode(_batch("GPU-a", 10))])  # its write waits on the blocker
        for i in range(3):  # published one at a time: each is a read of its own
            _wait_pending(redis_client, stream, i + 1)
            q.publish([codec.encode(_batch(f"GPU-b{i}", 10))])
        _wait_pending(redis_client, stream, 4)
        blocker.rollback()
    t.join(timeout=60)
    assert c.totals["stored"] == 40 and q.backlog() == 0
    transactions = next(s.value for s in c.metrics.batch_seconds.collect()[0].samples if s.name.endswith("_count"))
    assert transactions == 2


def _wait_pending(redis_client, stream: str, n: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and redis_client.xpending(stream, "g")["pending"] < n:
        time.sleep(0.02)

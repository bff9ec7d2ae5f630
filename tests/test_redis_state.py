"""Redis state that stays bounded and true: capped side streams with lifetime counts, consumers that
do not pile up, exact delivery counts, abandoned groups reported, and read paths that never write."""

from __future__ import annotations

import io
import time
from datetime import UTC, datetime, timedelta

from telemetry_nb.analysis import checks
from telemetry_nb.config import Settings
from telemetry_nb.model import Rejected, Sample
from telemetry_nb.pipeline import codec
from telemetry_nb.pipeline.collector import Collector
from telemetry_nb.pipeline.streamer import Streamer
from telemetry_nb.pipeline.streams import Queue
from telemetry_nb.sources.dcgm_csv import HEADER, read_samples
from tests.conftest import run_cli

T0 = datetime(2025, 7, 18, 20, 0, 0, tzinfo=UTC)


def _node_entries(redis_client) -> int:
    """How far past MAXLEN ~ a stream may stay: approximate trimming removes whole nodes only."""
    try:
        return int(redis_client.config_get("stream-node-max-entries")["stream-node-max-entries"])
    except Exception:  # noqa: BLE001 (CONFIG may be disabled on a managed Redis)
        return 100


def _samples(gpu: str, n: int, start: int = 0) -> list[Sample]:
    return [Sample(gpu, "DCGM_FI_DEV_GPU_UTIL", T0 + timedelta(seconds=start + i), float(i), "h", 0)
            for i in range(n)]


def _dirty_csv(good: int, bad: int) -> str:
    lines = [",".join(HEADER)]
    for i in range(max(good, bad)):
        if i < good:
            lines.append(f"2025-07-18T20:00:{i % 60:02d}Z,DCGM_FI_DEV_GPU_UTIL,0,nvidia0,GPU-{i // 60},H100,h,,,,1,")
        if i < bad:
            lines.append(f"2025-07-18T20:00:00Z,DCGM_FI_DEV_GPU_UTIL,0,nvidia0,GPU-x,H100,h,,,,N/A{i},")
    return "\n".join(lines) + "\n"


def test_side_streams_stay_capped_under_a_looped_dirty_file_while_counts_grow(redis_client, stream):
    cap, bad, passes = 100, 300, 3
    text = _dirty_csv(good=120, bad=bad)
    q = Queue(redis_client, stream, "g", "streamer", side_maxlen=cap)
    streamer = Streamer(q, Settings(stream=stream, group="g", batch_size=50, high_water=0))
    calls = []

    def source():
        calls.append(1)
        if len(calls) > passes:
            streamer.stop()
        return read_samples(io.StringIO(text))

    summary = streamer.run(source, loop=True)
    assert summary.rejected == passes * bad
    xlen = redis_client.xlen(q.rejected_stream)
    assert cap <= xlen <= cap + _node_entries(redis_client) < bad  # capped, approximately
    assert q.rejected_count() == passes * bad  # every rejection counted, trimmed or repeated
    lines = [r["line"] for r in q.read_rejected(1000)]
    assert len(lines) == len(set(lines))  # later passes published nothing again

    for i in range(250):  # dead letters are capped the same way
        q.dead_letter(f"{i + 1}-0".encode(), {b"v": b"9"}, f"boom {i}")
    assert cap <= redis_client.xlen(q.dead_stream) <= cap + _node_entries(redis_client) < 250
    assert q.dead_count() == 250


def test_check_reports_lifetime_totals(cli_env, redis_client, stream):
    q = Queue(redis_client, stream, "collectors", "x", side_maxlen=10)
    q.ensure_group()
    q.reject([Rejected(i, "bad", "raw") for i in range(500)], source="f.csv")
    q.count_rejected(500)
    out = run_cli("check", env=cli_env, check=False).stdout
    assert "rejected=1000" in out and redis_client.xlen(q.rejected_stream) < 500


def _run_collector(redis_client, stream, database_url, consumer: str, **kw) -> dict:
    settings = Settings(stream=stream, group="g", block_ms=100, visibility_timeout_s=60, read_count=5, **kw)
    return Collector(Queue(redis_client, stream, "g", consumer), database_url, settings).run(drain=True)


def test_restarts_under_a_stable_name_leave_one_consumer(redis_client, stream, database_url):
    q = Queue(redis_client, stream, "g", "producer")
    q.ensure_group()
    for i in range(5):
        q.publish([codec.encode(_samples("GPU-a", 10, start=10 * i))])
        assert _run_collector(redis_client, stream, database_url, "collector-0")["stored"] == 10
    assert [c["name"] for c in redis_client.xinfo_consumers(stream, "g")] == [b"collector-0"]


def test_consumers_left_by_restarts_are_removed_once_idle(redis_client, stream, database_url):
    q = Queue(redis_client, stream, "g", "producer")
    q.ensure_group()
    for i in range(5):  # hostname-pid names: a new consumer per restart
        q.publish([codec.encode(_samples("GPU-a", 10, start=10 * i))])
        _run_collector(redis_client, stream, database_url, f"host-{100 + i}", consumer_idle_limit_s=0)
    assert [c["name"] for c in redis_client.xinfo_consumers(stream, "g")] == [b"host-104"]


def test_a_consumer_with_pending_entries_is_never_removed(redis_client, stream):
    holder = Queue(redis_client, stream, "g", "holder")
    holder.ensure_group()
    held, done = holder.publish([{b"i": b"1"}, {b"i": b"2"}])
    holder.read(1, 100)
    idle = Queue(redis_client, stream, "g", "idle")
    idle.read(1, 100)
    idle.ack([done])  # a consumer with nothing pending
    redis_client.xclaim(stream, "g", "holder", 0, [held], idle=3_600_000)
    time.sleep(0.01)  # "idle" has been idle for longer than 0 ms
    assert Queue(redis_client, stream, "g", "me").prune_consumers(idle_s=0) == ["idle"]
    assert {c["name"] for c in redis_client.xinfo_consumers(stream, "g")} == {b"holder"}
    assert redis_client.xpending(stream, "g")["pending"] == 1


def test_delivery_counts_are_exact_among_many_pending(redis_client, stream, database_url):
    q = Queue(redis_client, stream, "g", "crashed")
    q.ensure_group()
    first = q.publish([codec.encode(_samples("GPU-first", 5))])[0]
    q.publish([codec.encode(_samples(f"GPU-mid{i}", 1)) for i in range(40)])
    poison = q.publish([codec.encode(_samples("GPU-poison", 5))])[0]
    q.read(100, 100)  # all 42 pending for a collector that crashed on each
    for _ in range(6):
        redis_client.xclaim(stream, "g", "crashed", 0, [poison])  # six more collectors failed on it
    for eid in (first, poison):  # idle past the visibility timeout; the 40 between them are not
        redis_client.xclaim(stream, "g", "crashed", 0, [eid], idle=600_000)
    assert q.deliveries([first, poison]) == {first: 2, poison: 8}
    settings = Settings(stream=stream, group="g", visibility_timeout_s=60, max_deliveries=3, read_count=5,
                        block_ms=100)
    heir = Collector(Queue(redis_client, stream, "g", "heir"), database_url, settings)
    try:
        assert heir.claim_stale() == 2
    finally:
        heir.close()
    [dead] = q.read_dead()
    assert dead["entry_id"] == poison.decode() and "delivered 9 times" in dead["error"]
    assert heir.totals["stored"] == 5  # the first entry, delivered 3 times, is within the limit
    assert redis_client.xpending(stream, "g")["pending"] == 40


def _state(redis_client, stream) -> tuple:
    groups = [(g["name"], g["pending"], g["last-delivered-id"]) for g in redis_client.xinfo_groups(stream)]
    consumers = [(c["name"], c["pending"]) for g in groups for c in redis_client.xinfo_consumers(stream, g[0])]
    keys = sorted(redis_client.scan_iter(match=f"{stream}*"))
    return redis_client.xlen(stream), redis_client.xrange(stream), groups, consumers, keys


def test_check_and_health_reads_never_write(cli_env, redis_client, stream):
    q = Queue(redis_client, stream, "collectors", "c1")
    q.ensure_group()
    ids = q.publish([codec.encode(_samples(f"GPU-{i}", 2)) for i in range(30)])
    q.read(20, 100)
    q.ack(ids[:15])  # 15 acked (trimmable), 5 pending, 10 undelivered
    q.dead_letter(ids[15], {b"v": b"9"}, "boom")
    before = _state(redis_client, stream)
    assert q.backlog() >= 14 and q.undelivered() >= 10  # 10 undelivered + 4 pending, read without trimming
    run_cli("check", "--dead", "5", "--rejected", "5", env=cli_env, check=False)
    checks.check_redis(cli_env["REDIS_URL"], stream, "collectors", min_consumers=0)
    assert _state(redis_client, stream) == before
    assert q.safe_trim() == 16  # 15 acked + 1 dead-lettered: the trim is the writers' job, done separately


def test_abandoned_group_is_reported(cli_env, redis_client, stream):
    q = Queue(redis_client, stream, "collectors", "c1")
    q.ensure_group()
    redis_client.xgroup_create(stream, "old-deployment", id="0")  # nobody reads it any more
    ids = q.publish([codec.encode(_samples("GPU-a", 2)) for _ in range(3)])
    q.read(10, 100)
    q.ack(ids)
    time.sleep(0.05)  # entries become older than the (tiny) limit below
    out = run_cli("check", "--stale-group-after", "10ms", env=cli_env, check=False).stdout
    assert "'old-deployment' STALE" in out and "XGROUP DESTROY" in out and "'collectors'" not in out
    r = {c.name: c for c in checks.check_redis(cli_env["REDIS_URL"], stream, min_consumers=0, stale_group_s=0.01)}
    assert r["redis.groups"].status == checks.FAIL and "'old-deployment'" in r["redis.groups"].detail
    r = {c.name: c for c in checks.check_redis(cli_env["REDIS_URL"], stream, min_consumers=0)}
    assert r["redis.groups"].status == checks.PASS  # with the default day, it is not stale yet

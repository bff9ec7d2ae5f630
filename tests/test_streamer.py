"""The streamer against a real Redis: batching, sharding, re-stamping, backpressure, outages, rejects."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import pytest

from telemetry_nb.config import Settings
from telemetry_nb.model import Rejected, Sample
from telemetry_nb.pipeline import codec
from telemetry_nb.pipeline.placement import parse_shard, shard_of
from telemetry_nb.pipeline.streamer import Streamer
from telemetry_nb.pipeline.streams import Queue
from telemetry_nb.sources.dcgm_csv import read_samples
from tests.clocks import START, FakeClock
from tests.relay import Relay

T0 = datetime(2025, 7, 18, 20, 0, 0, tzinfo=UTC)


def _rows(stream: str, redis_client) -> list[Sample]:
    out = []
    for _, fields in redis_client.xrange(stream):
        out.extend(codec.decode_samples(codec.decode(fields)))
    return out


def _streamer(redis_client, stream, clock: FakeClock | None = None, **kw) -> Streamer:
    settings = Settings(stream=stream, group="g", batch_size=kw.pop("batch_size", 100), retry_max_s=0.3, **kw)
    timing = {"clock": clock, "sleep": clock.sleep} if clock else {}
    return Streamer(Queue(redis_client, stream, "g", "s"), settings, **timing)


def test_one_pass_publishes_every_row_in_batches(redis_client, stream, real_csv):
    summary = _streamer(redis_client, stream, batch_size=1000).run(lambda: read_samples(real_csv))
    assert (summary.published, summary.rejected, summary.entries) == (2470, 0, 3)
    got = _rows(stream, redis_client)
    want = [s for s in read_samples(real_csv, with_labels=False)]
    assert [(s.uuid, s.metric, s.ts, s.value) for s in got] == [(s.uuid, s.metric, s.ts, s.value) for s in want]


def test_shards_split_by_gpu_without_overlap(redis_client, stream, real_csv):
    seen: list[set] = []
    for i in range(3):
        name = f"{stream}-{i}"
        _streamer(redis_client, name, shard_index=i, shard_count=3).run(lambda: read_samples(real_csv))
        rows = _rows(name, redis_client)
        redis_client.delete(name)
        assert {shard_of(s.uuid, 3) for s in rows} == {i}
        seen.append({(s.uuid, s.metric, s.ts) for s in rows})
    assert sum(len(s) for s in seen) == 2470
    assert len(seen[0] | seen[1] | seen[2]) == 2470
    assert all(len(s) > 400 for s in seen)  # roughly balanced


def test_parse_shard():
    assert parse_shard("2/3") == (2, 3)
    for bad in ("3/3", "x", "1/0", "-1/2"):
        with pytest.raises(ValueError, match="shard"):
            parse_shard(bad)


def test_restamp_now_keeps_spacing(redis_client, stream):
    rows = [Sample("GPU-a", "M", T0 + timedelta(seconds=i * 0.2), float(i)) for i in range(5)]
    clock = FakeClock(START + 3600)
    _streamer(redis_client, stream, clock, batch_size=2).run(lambda: iter(rows), timestamps="now")
    got = _rows(stream, redis_client)
    assert [s.value for s in got] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert got[0].ts == datetime.fromtimestamp(START + 3600, UTC)  # the first row is stamped "now"
    gaps = [(b.ts - a.ts).total_seconds() for a, b in zip(got, got[1:], strict=False)]
    assert gaps == pytest.approx([0.2] * 4, abs=1e-6)
    assert clock.sleeps == pytest.approx([0.2] * 4, abs=1e-6)  # paced like the source, not dumped at once…
    assert redis_client.xlen(stream) == 5  # …and each row published when due, not held for a full batch


def test_loop_with_restamp_continues_time_forward(redis_client, stream):
    rows = [Sample("GPU-a", "M", T0 + timedelta(seconds=i * 0.1), float(i)) for i in range(3)]
    clock = FakeClock()
    streamer = _streamer(redis_client, stream, clock)
    passes = []

    def source():
        passes.append(1)
        if len(passes) == 3:
            streamer.stop()
        return iter(rows)

    streamer.run(source, loop=True, timestamps="now")
    ts = [s.ts.timestamp() - START for s in _rows(stream, redis_client)]
    # the second pass starts 1 s after the first pass's last row, not back at the source's first timestamp
    assert ts == pytest.approx([0.0, 0.1, 0.2, 1.2, 1.3, 1.4], abs=1e-6)
    assert sum(clock.sleeps) == pytest.approx(1.4, abs=1e-6)


def test_rejected_rows_go_to_the_rejected_stream(redis_client, stream):
    items = [Sample("GPU-a", "M", T0, 1.0), Rejected(3, "non-numeric value 'N/A'", "raw,N/A"),
             Sample("GPU-a", "M", T0 + timedelta(seconds=1), 2.0)]
    streamer = _streamer(redis_client, stream)
    streamer.source_name = "bad.csv"
    summary = streamer.run(lambda: iter(items))
    assert (summary.published, summary.rejected) == (2, 1)
    assert Queue(redis_client, stream).read_rejected() == [
        {"source": "bad.csv", "line": "3", "reason": "non-numeric value 'N/A'", "raw": "raw,N/A"}]


def test_backpressure_waits_for_the_consumers(redis_client, stream):
    rows = [Sample("GPU-a", "M", T0 + timedelta(seconds=i), float(i)) for i in range(2000)]
    settings = Settings(stream=stream, group="g", batch_size=10, retry_max_s=0.3, high_water=5)
    waiting = threading.Event()

    def sleep(seconds: float) -> None:  # the streamer sleeps only while it waits out backpressure here
        waiting.set()
        threading.Event().wait(0.005)

    streamer = Streamer(Queue(redis_client, stream, "g", "s"), settings, sleep=sleep, pipeline_depth=1)
    done = threading.Event()
    threading.Thread(target=lambda: (streamer.run(lambda: iter(rows)), done.set()), daemon=True).start()
    assert waiting.wait(60)
    assert not done.is_set()  # blocked: nobody is consuming
    assert redis_client.xlen(stream) <= 10
    assert streamer.metrics.backpressure._value.get() == 1
    consumer = Queue(redis_client, stream, "g", "c")
    acked = 0
    deadline = time.monotonic() + 60
    while not done.is_set() and time.monotonic() < deadline:
        entries = consumer.read(50, 50)
        acked += consumer.ack([eid for eid, _ in entries])
        # the streamer never ran far ahead: entries it published that nobody acknowledged yet (exact, unlike
        # backlog() on Redis 6.2, which also counts acknowledged entries not trimmed yet)
        assert streamer.summary.entries - acked <= 10 + 2
    assert done.wait(10)
    entries = consumer.read(1000, 50)
    acked += consumer.ack([eid for eid, _ in entries])
    assert acked * 10 == 2000


def test_redis_outage_mid_stream_is_retried_without_loss(redis_client, stream, servers):
    host, port = redis_client.connection_pool.connection_kwargs["host"], \
        redis_client.connection_pool.connection_kwargs["port"]
    relay = Relay((host, port))
    from telemetry_nb.pipeline.streams import connect
    via = connect(relay.url("redis", "/0"), timeout_s=2)
    rows = [Sample("GPU-a", "M", T0 + timedelta(seconds=i), float(i)) for i in range(3000)]
    settings = Settings(stream=stream, group="g", batch_size=100, retry_max_s=0.3, high_water=0)
    streamer = Streamer(Queue(via, stream, "g", "s"), settings, pipeline_depth=1, sleep=time.sleep)

    def restore_after_a_retry():  # the outage lasts until the streamer has hit it and backed off once
        while streamer.metrics.retries.labels("redis")._value.get() < 1 and not relay_closed.is_set():
            relay_closed.wait(0.01)
        relay.restore()

    def source():
        for i, r in enumerate(rows):
            if i == 1000:
                relay.cut()
                threading.Thread(target=restore_after_a_retry, daemon=True).start()
            yield r

    relay_closed = threading.Event()
    try:
        summary = streamer.run(source)
    finally:
        relay_closed.set()
        relay.close()
    assert summary.published == 3000
    assert streamer.metrics.retries.labels("redis")._value.get() >= 1
    got = {s.value for s in _rows(stream, redis_client)}
    assert got == {float(i) for i in range(3000)}  # nothing skipped (a retried batch may appear twice)

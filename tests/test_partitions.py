"""Stream partitions: keys and slots, routing by GPU, per-partition claims/dead letters/trimming/backpressure,
checks, and the whole pipeline across a real 3-master Redis Cluster with a master killed mid-stream."""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from redis.crc import key_slot

from telemetry_nb.analysis import canary, checks
from telemetry_nb.cluster import LocalCluster
from telemetry_nb.config import Settings
from telemetry_nb.model import Sample
from telemetry_nb.pipeline import codec
from telemetry_nb.pipeline.collector import Collector
from telemetry_nb.pipeline.streamer import Streamer
from telemetry_nb.pipeline.streams import (
    REDIS_ERRORS,
    Partitions,
    connect,
    open_partitions,
    partition_keys,
    partition_of,
    redis_probe,
)
from telemetry_nb.sources.dcgm_csv import read_samples
from telemetry_nb.sources.generate import generate_rows, row_count, write_csv
from tests.clocks import age_pending
from tests.conftest import run_cli

T0 = datetime(2025, 7, 18, 20, 0, 0, tzinfo=UTC)
N = 4


def _samples(gpus: list[str], n: int) -> list[Sample]:
    return [Sample(g, "DCGM_FI_DEV_GPU_UTIL", T0 + timedelta(seconds=i), float(i % 100), "host-1", 0, "nvidia0",
                   "H100") for g in gpus for i in range(n)]


def _gpus_in(partition: int, count: int, n: int = N) -> list[str]:
    """`count` GPU uuids that all belong to `partition` of `n`."""
    found, i = [], 0
    while len(found) < count:
        if partition_of(f"GPU-{i}", n) == partition:
            found.append(f"GPU-{i}")
        i += 1
    return found


def _settings(stream: str, **kw) -> Settings:
    base = dict(stream=stream, group="g", stream_partitions=N, visibility_timeout_s=30, max_deliveries=3,
                block_ms=100, retry_max_s=0.5, read_count=5, maintain=False, batch_size=50)
    base.update(kw)
    return Settings(**base)


def _rows(database_url: str) -> tuple[int, int]:
    """(rows, distinct (gpu, metric, ts)) in the telemetry table."""
    with psycopg.connect(database_url) as conn:
        try:
            return conn.execute("SELECT count(*), count(DISTINCT (gpu_id, metric_id, ts)) FROM telemetry").fetchone()
        except psycopg.errors.UndefinedTable:  # no collector has migrated yet
            return 0, 0


@pytest.fixture
def parts(redis_client, stream):
    """The N partitions of this test's stream (producer side); their keys are deleted afterwards."""
    p = Partitions.open(redis_client, stream, "g", "producer", count=N)
    p.ensure_group()
    yield p
    for key in partition_keys(stream, N):
        redis_client.delete(key, f"{key}:dead", f"{key}:rejected", f"{key}:dead:total", f"{key}:rejected:total")


def test_partition_keys_keep_the_old_name_and_put_side_keys_in_their_partitions_slot():
    assert partition_keys("telemetry", 1) == ["telemetry"]  # today's deployments: same key as before
    assert partition_keys("telemetry", 1, cluster=True) == ["telemetry:{0}"]  # MULTI over its side keys needs a tag
    keys = partition_keys("telemetry", 6)
    assert keys == [f"telemetry:{{{i}}}" for i in range(6)]
    for key in keys:
        assert {key_slot(f"{key}{side}".encode()) for side in ("", ":dead", ":rejected", ":dead:total",
                                                                ":rejected:total")} == {key_slot(key.encode())}
    assert len({key_slot(k.encode()) for k in keys}) == 6
    assert all(partition_of(u, 6) == partition_of(u, 6) for u in ("GPU-a", "GPU-b"))
    with pytest.raises(ValueError):
        partition_keys("telemetry", 0)
    with pytest.raises(ValueError, match="TELEMETRY_STREAM_PARTITIONS"):
        Settings.from_env({"TELEMETRY_STREAM_PARTITIONS": "0"})
    assert Settings.from_env({"TELEMETRY_STREAM_PARTITIONS": "6"}).stream_partitions == 6


def test_each_gpu_goes_to_its_own_partition_and_collectors_store_every_row(redis_client, stream, parts,
                                                                          database_url, real_csv):
    settings = _settings(stream)
    summary = Streamer(parts, settings).run_parallel(str(real_csv), workers=2)  # the worker-process path
    gpus = [f"GPU-{i}" for i in range(16)]
    more = Streamer(parts, settings).run(lambda: iter(_samples(gpus, 30)))  # the one-process path
    series = [codec.Series(s) for s in _samples([f"GPU-live-{i}" for i in range(8)], 1)]
    scraped = Streamer(parts, settings).publish_series(  # the scraper's path
        (se, "DCGM_FI_DEV_POWER_USAGE", (T0 + timedelta(hours=1, seconds=t)).isoformat(), 1.0 * t)
        for se in series for t in range(10))
    for i, q in enumerate(parts):
        entries = redis_client.xrange(q.stream)
        assert entries, f"partition {i} got nothing"
        uuids = {s.uuid for _, f in entries for s in codec.decode_samples(codec.decode(f))}
        assert {partition_of(u, N) for u in uuids} == {i}
    totals = Collector(open_partitions(settings, redis_client), database_url, settings).run(drain=True)
    expected = summary.published + more.published + scraped
    assert more.published == 16 * 30 and scraped == 8 * 10 and totals["stored"] == expected
    assert _rows(database_url) == (expected, expected)
    assert parts.backlogs() == dict.fromkeys(range(N), 0) and parts.dead_count() == 0
    parts.safe_trim()
    assert all(redis_client.xlen(q.stream) == 0 for q in parts)  # all acknowledged: every partition trimmed


def test_claims_and_dead_letters_stay_in_their_partition(redis_client, stream, parts, database_url):
    parts.publish([(1, codec.encode(_samples(_gpus_in(1, 2), 10))), (1, {b"v": b"99"}),  # undecodable
                   (3, codec.encode(_samples(_gpus_in(3, 3), 10)))])
    crashed = Partitions.open(redis_client, stream, "g", "crashed", count=N)
    taken = crashed[3].read(10, 100)  # a collector took partition 3's entry and died
    age_pending(redis_client, crashed[3].stream, "g", "crashed", [eid for eid, _ in taken], 60_000)
    settings = _settings(stream)
    heir = Collector(Partitions.open(redis_client, stream, "g", "heir", count=N), database_url, settings)
    totals = heir.run(drain=True)
    assert totals["stored"] == 50 and totals["dead"] == 1
    assert [q.dead_count() for q in parts] == [0, 1, 0, 0] and parts.dead_count() == 1
    [dead] = parts.read_dead()
    assert "unsupported batch encoding version" in dead["error"]
    assert all(redis_client.xpending(q.stream, "g")["pending"] == 0 for q in parts)
    assert "heir" in {c["name"].decode() for c in redis_client.xinfo_consumers(parts[3].stream, "g")}


def test_backpressure_waits_only_for_the_partition_it_publishes_to(redis_client, stream, parts, caplog):
    caplog.set_level(logging.INFO, "telemetry_nb.pipeline.streamer")
    parts.publish([(2, codec.encode(_samples(["x"], 1)))] * 10)  # partition 2: 10 entries nobody consumes
    consumer = Partitions.open(redis_client, stream, "g", "c", count=N)
    slept = []

    def sleep(seconds: float) -> None:  # while the streamer waits, a collector works through partition 2
        slept.append(seconds)
        consumer[2].ack([eid for eid, _ in consumer[2].read(10, 100)])

    settings = _settings(stream, high_water=4, batch_size=10)
    streamer = Streamer(parts, settings, sleep=sleep, pipeline_depth=1)
    streamer.run(lambda: iter(_samples(_gpus_in(0, 1), 50)))  # partition 0 is empty: no wait
    assert slept == []
    streamer.run(lambda: iter(_samples(_gpus_in(2, 1), 20)))
    assert slept and parts.backlogs([2]) == {2: 2}  # it waited for partition 2, then published its 2 entries
    assert any(f"in {parts[2].stream}" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)


def test_checks_and_check_command_report_per_partition_and_in_total(redis_client, stream, parts, cli_env):
    parts.publish([(0, codec.encode(_samples(["a"], 2))), (0, codec.encode(_samples(["a"], 2))),
                   (3, codec.encode(_samples(["b"], 2)))])
    r = {c.name: c for c in checks.check_redis(cli_env["REDIS_URL"], stream, "g", max_lag=1, min_consumers=0,
                                               partitions=N)}
    assert [r[f"redis.partition.{i}"].status for i in range(N)] == ["fail", "pass", "pass", "pass"]
    assert r["redis.lag"].status == "fail" and "3 backlog entries in all" in r["redis.lag"].detail
    assert f"{parts[0].stream}: backlog entries=2 > 1" in r["redis.lag"].detail
    assert r["redis.stream"].status == "pass" and "4/4 partitions pass" in r["redis.stream"].detail
    # (the database is empty, so `check` exits 1 on PostgreSQL: only its Redis lines matter here)
    out = run_cli("check", "--partitions", str(N), env={**cli_env, "TELEMETRY_GROUP": "g"}, check=False).stdout
    assert "backlog=3" in out and "partitions=4" in out
    assert f"partition {parts[3].stream} backlog=1 pending=0" in out


def test_canary_sends_one_gpu_per_partition_and_reports_each(redis_client, stream, parts, cli_env, api_server):
    uuids = canary.canary_uuids(6)
    assert [partition_of(u, 6) for u in uuids] == list(range(6)) and len(set(uuids)) == 6
    settings = _settings(stream, group="collectors", redis_url=cli_env["REDIS_URL"])
    collector = Collector(Partitions.open(redis_client, stream, "collectors", "c", count=N), cli_env["DATABASE_URL"],
                          settings)
    running = threading.Thread(target=collector.run)
    running.start()
    try:
        report = canary.run_canary(api_url=api_server, redis_url=cli_env["REDIS_URL"], stream=stream, rows=10,
                                   spacing_s=0.01, timeout_s=30, database_url=cli_env["DATABASE_URL"], partitions=N)
    finally:
        collector.stop()
        running.join(30)
    assert report.ok, report.summary()
    assert report.expected == report.seen == 4 * 10
    per = report.summary()["partitions"]
    assert [(p["partition"], p["expected"], p["ok"]) for p in per] == [(i, 10, 10) for i in range(N)]
    assert [partition_of(p["uuid"], N) for p in per] == list(range(N))
    assert report.cleanup.count("removed GPU") == N


# -- a real Redis Cluster ------------------------------------------------------------------------
def test_pipeline_across_a_redis_cluster_survives_a_killed_master(tmp_path, database_url):
    csv = tmp_path / "fleet.csv"
    hosts, per_host, seconds = 8, 4, 60
    write_csv(csv, generate_rows(hosts, per_host, seconds, start=T0))
    expected = row_count(hosts, per_host, seconds, 1.0)
    want = {(codec.gpu_key(s.uuid), codec.metric_key(s.metric), s.ts) for s in read_samples(csv)}
    assert len(want) == expected
    with LocalCluster(tmp_path / "cluster", masters=3) as cluster:
        settings = _settings("telemetry", stream_partitions=6, redis_url=cluster.url, visibility_timeout_s=3,
                             batch_size=250, retry_max_s=0.5, read_count=10)
        streamer = Streamer(open_partitions(settings), settings)
        collector = Collector(open_partitions(settings), database_url, settings)
        threads = [threading.Thread(target=lambda: streamer.run(lambda: read_samples(csv), rate=expected / 6)),
                   threading.Thread(target=collector.run)]
        for t in threads:
            t.start()
        ready = redis_probe(cluster.url, 2, "telemetry", 6)  # what /ready and /metrics probes ask
        ready()
        _wait(lambda: streamer.summary.published >= expected // 4)
        cluster.kill(1)  # a master holding a third of the slots crashes mid-stream…
        with pytest.raises(REDIS_ERRORS):
            ready()  # …its partitions' node does not answer: not ready
        time.sleep(3)  # …past the node timeout: the cluster is down, both sides retry
        cluster.restart(1)  # …and comes back from its own AOF and nodes.conf
        ready()
        threads[0].join(60)
        assert streamer.summary.published == expected
        _wait(lambda: _rows(database_url)[0] >= expected, 40)
        collector.stop()
        threads[1].join(30)
        parts = open_partitions(settings)
        assert parts.backlog() == 0 and parts.dead_count() == 0
    retries = sum(m.registry.get_sample_value("telemetry_retries_total", {"dependency": "redis"}) or 0
                  for m in (streamer.metrics, collector.metrics))
    assert retries > 0  # the outage was real, and was waited out
    assert _rows(database_url) == (expected, expected)
    with psycopg.connect(database_url) as conn:
        got = set(conn.execute("SELECT gpu_id, metric_id, ts FROM telemetry").fetchall())
    assert got == want


def _wait(cond, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def test_cluster_url_names_every_node(tmp_path):
    cluster = LocalCluster(tmp_path, masters=3)
    assert cluster.url.startswith("redis+cluster://") and cluster.url.count(",") == 2
    with pytest.raises(ValueError):
        connect("redis+cluster://")

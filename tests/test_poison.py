"""Poison rows that only PostgreSQL catches: injected straight into stream entries, past the parser.

The collector must store every other row of the entry, dead-letter just the refused rows with the
database's reason, and never take a refusal for an outage (no "PostgreSQL unavailable", no retry).
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from telemetry_nb import store
from telemetry_nb.config import Settings
from telemetry_nb.model import Sample
from telemetry_nb.pipeline import codec
from telemetry_nb.pipeline.collector import Collector
from telemetry_nb.pipeline.streams import Queue
from telemetry_nb.store import binary

T0 = datetime(2025, 7, 18, 20, 0, 0, tzinfo=UTC)


def _rows(n: int, gpu: str = "GPU-good", metric: str = "DCGM_FI_DEV_GPU_UTIL", start: int = 0) -> list[Sample]:
    return [Sample(gpu, metric, T0 + timedelta(seconds=start + i), float(i), "host-1", 0, "nvidia0", "H100")
            for i in range(n)]


def _collect(redis_client, stream, database_url, **kw) -> tuple[Collector, dict]:
    settings = Settings(stream=stream, group="g", block_ms=100, retry_max_s=0.5, read_count=kw.pop("read_count", 5),
                        visibility_timeout_s=30, **kw)
    c = Collector(Queue(redis_client, stream, "g", "c1"), database_url, settings)
    out: dict = {}
    worker = threading.Thread(target=lambda: out.update(c.run(drain=True)), daemon=True)
    worker.start()
    worker.join(timeout=60)  # a generous deadline: a collector retrying a refusal forever never drains
    if worker.is_alive():
        c.stop()
        worker.join(timeout=10)
        pytest.fail("the collector did not drain the poisoned stream (retrying a refusal as an outage?)")
    return c, out


def _stored(database_url: str) -> list[tuple[str, str, float]]:
    with psycopg.connect(database_url) as conn:
        return conn.execute("SELECT g.uuid, m.name, t.value FROM telemetry t JOIN gpus g ON g.id = t.gpu_id "
                            "JOIN metrics m ON m.id = t.metric_id ORDER BY t.ts, g.uuid").fetchall()


def _queue(redis_client, stream) -> Queue:
    q = Queue(redis_client, stream, "g", "producer")
    q.ensure_group()
    return q


def test_huge_incompressible_metric_name_and_nul_uuid_only_cost_their_rows(redis_client, stream, database_url, caplog):
    huge = "M_" + os.urandom(4600).hex()  # ~9 kB of incompressible text: beyond a btree index entry
    rows = _rows(40)
    rows[7] = _rows(1, metric=huge, start=7)[0]
    rows[23] = _rows(1, gpu="GPU-\x00nul", start=23)[0]
    q = _queue(redis_client, stream)
    q.publish([codec.encode(rows), codec.encode(_rows(10, gpu="GPU-other"))])
    with caplog.at_level(logging.INFO):
        collector, totals = _collect(redis_client, stream, database_url)
    assert "PostgreSQL unavailable" not in caplog.text
    assert collector.metrics.retries.labels("postgresql")._value.get() == 0
    assert totals["consumed"] == 50 and totals["stored"] == 48
    stored = _stored(database_url)
    assert len(stored) == 48 and all(m != huge and "\x00" not in u for u, m, _ in stored)
    dead = q.read_dead(10)
    assert len(dead) == 2 and q.dead_count() == 2
    errors = " | ".join(d["error"] for d in dead)
    assert "[54000]: index row" in errors  # program_limit_exceeded, in the database's own words
    assert "NUL" in errors or "0x00" in errors
    assert all(d["rows"] == "1" and d["f:n"] == "1" for d in dead)
    assert any("\\x00" in d["row"] for d in dead)  # the operator sees the NUL escaped
    assert q.backlog() == 0 and redis_client.xpending(stream, "g")["pending"] == 0
    # each dead-lettered part is a valid entry again (replayable): one row, the refused one
    parts = [codec.decode({k[2:]: v for k, v in fields.items() if k.startswith(b"f:")})
             for _, fields in redis_client.xrange(q.dead_stream)]
    refused = sorted((s.uuid, s.metric) for p in parts for s in codec.decode_samples(p))
    assert refused == sorted([("GPU-good", huge), ("GPU-\x00nul", "DCGM_FI_DEV_GPU_UTIL")])


def test_many_rows_sharing_a_refused_name_cost_few_transactions(redis_client, stream, database_url):
    huge = "H_" + os.urandom(4600).hex()
    rows = _rows(300, metric=huge) + _rows(300, start=300)
    q = _queue(redis_client, stream)
    q.publish([codec.encode(rows)])
    _, totals = _collect(redis_client, stream, database_url)
    assert totals["stored"] == 300 and totals["dead"] == 1
    [dead] = q.read_dead()
    assert dead["rows"] == "300" and "300 of 600 rows refused" in dead["error"]


def test_rows_postgres_refuses_inside_the_copy(redis_client, stream, database_url):
    good = codec.as_text(codec.encode(_rows(20)))  # text rows (version 1), as older streamers send them
    lines = good[b"rows"].split(b"\n")
    lines[3] = lines[3].replace(b"2025-07-18T20", b"0000-07-18T20", 1)  # year 0 does not exist
    lines[11] = lines[11].split(b"\t", 1)[0] + b"\t2025-07-18T20:00:11+00:00\t\x00\t1.0\t\\N"  # NUL in the COPY
    good[b"rows"] = b"\n".join(lines)
    q = _queue(redis_client, stream)
    q.publish([good])
    _, totals = _collect(redis_client, stream, database_url)
    assert totals["stored"] == 18 and len(_stored(database_url)) == 18
    dead = q.read_dead()
    assert sorted(int(d["rows"]) for d in dead) == [1, 1]
    errors = " | ".join(d["error"] for d in dead)
    assert "0000-07-18" in errors  # the database's own words, with the value it refused…
    assert "[22021]" in errors and "0x00" in errors  # …and its SQLSTATE


def test_binary_rows_postgres_refuses_are_isolated(redis_client, stream, database_url):
    good = codec.encode(_rows(20))
    rows = bytearray(good[b"rows"])
    at = 5 * binary.PLAIN_SIZE + 18  # row 5's timestamp: far past what timestamptz holds
    rows[at:at + 8] = struct.pack("!q", 2 ** 62)
    good[b"rows"] = bytes(rows)
    q = _queue(redis_client, stream)
    q.publish([good])
    _, totals = _collect(redis_client, stream, database_url)
    assert totals["stored"] == 19 and len(_stored(database_url)) == 19
    [dead] = q.read_dead()
    assert dead["rows"] == "1" and "out of range" in dead["error"]


def test_gpu_index_beyond_int32_refused_alone(redis_client, stream, database_url):
    rows = _rows(10)
    rows[4] = Sample("GPU-wide", "DCGM_FI_DEV_GPU_UTIL", T0, 1.0, "h", 2**40)
    q = _queue(redis_client, stream)
    q.publish([codec.encode(rows)])
    _, totals = _collect(redis_client, stream, database_url)
    assert totals["stored"] == 9
    [dead] = q.read_dead()
    assert "out of range" in dead["error"] and "GPU-wide" in dead["row"]


def test_a_refused_entry_among_many_in_one_transaction(redis_client, stream, database_url):
    q = _queue(redis_client, stream)
    entries = [codec.encode(_rows(10, gpu=f"GPU-{i}")) for i in range(12)]
    entries[9] = codec.as_text(entries[9])
    entries[9][b"rows"] = entries[9][b"rows"].replace(b"2025-07-18", b"2025-02-30", 1)
    q.publish(entries)
    _, totals = _collect(redis_client, stream, database_url, read_count=20)
    assert totals["stored"] == 119 and totals["dead"] == 1


def test_outages_and_refusals_are_told_apart_by_sqlstate(database_url):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(psycopg.OperationalError) as refused:
        psycopg.connect(f"postgresql://127.0.0.1:{port}/x", connect_timeout=2)
    assert store.is_outage(refused.value) and not store.is_data_error(refused.value)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE k (t text PRIMARY KEY, i int)")
        with pytest.raises(psycopg.OperationalError) as too_big:  # psycopg's class says "operational"…
            conn.execute("INSERT INTO k VALUES (%s)", (os.urandom(5000).hex(),))
        assert too_big.value.sqlstate == "54000" and not store.is_outage(too_big.value)  # …SQLSTATE says data
        for sql, params in (("INSERT INTO k VALUES ('a', %s)", (2**40,)), ("SELECT 1/0", None),
                            ("SELECT 'x'::timestamptz", None), ("SELECT * FROM nope", None)):
            with pytest.raises(psycopg.Error) as err:
                conn.execute(sql, params)
            assert store.is_data_error(err.value), err.value.sqlstate
        with pytest.raises(psycopg.Error) as nul:
            conn.execute("INSERT INTO k VALUES (%s)", ("a\x00b",))
        assert store.is_data_error(nul.value)
        conn.close()
        with pytest.raises(psycopg.OperationalError) as closed:
            conn.execute("SELECT 1")
        assert store.is_outage(closed.value)
    assert store.is_outage(psycopg.errors.lookup("57P01")("terminating connection due to administrator command"))
    assert store.is_outage(psycopg.errors.lookup("40P01")("deadlock detected"))
    assert store.is_outage(psycopg.errors.lookup("53100")("could not extend file: No space left on device"))


def test_dirty_csv_end_to_end_every_good_row_stored_nothing_dead_lettered(cli_env, redis_client, stream, database_url,
                                                                          tmp_path):
    """Good rows interleaved with every kind of value PostgreSQL would refuse: the parser rejects each bad one."""
    import csv

    from telemetry_nb.sources.dcgm_csv import HEADER
    from tests.conftest import run_cli

    def row(i: int, **over) -> list[str]:
        base = dict(timestamp=f"2025-07-18T20:{i // 60 % 60:02d}:{i % 60:02d}Z", metric_name="DCGM_FI_DEV_GPU_UTIL",
                    gpu_id=str(i % 8), device="nvidia0", uuid=f"GPU-{i % 8}", modelName="H100", Hostname="node-1",
                    container="c", pod="p", namespace="ns", value=str(i), labels_raw="")
        base.update(over)
        return [base[h] for h in HEADER]

    bad_values = [
        {"uuid": "GPU-\x00"}, {"metric_name": "M_" + os.urandom(4600).hex()}, {"Hostname": "h" * 3000},
        {"pod": "p\x1bx"}, {"namespace": "n" * 1024, "pod": "p" * 1024, "container": "c" * 100},
        {"gpu_id": str(2**31)}, {"gpu_id": "-3"}, {"timestamp": "0001-01-01T00:00:00+05:00"},
        {"timestamp": "12345678901234567890"}, {"timestamp": "1990-01-01T00:00:00Z"},
        {"timestamp": "2999-01-01T00:00:00Z"}, {"value": "inf"}, {"modelName": "m\x7fm"},
    ]
    rows, bad_lines, good = [], [], 0
    for i in range(200):
        if i % 15 == 7 and len(bad_lines) < len(bad_values):
            rows.append(row(i, **bad_values[len(bad_lines)]))
            bad_lines.append(len(rows) + 1)  # +1: the header is line 1
        else:
            rows.append(row(i))
            good += 1
    assert len(bad_lines) == len(bad_values)
    path = tmp_path / "dirty.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([HEADER, *rows])
    out = run_cli("stream", "--csv", str(path), "--batch-size", "50", env=cli_env)
    assert f"published={good} rejected={len(bad_values)}" in out.stdout
    run_cli("collect", "--drain", env=cli_env)
    q = Queue(redis_client, stream, "collectors")
    rejected = q.read_rejected(100)
    assert [int(r["line"]) for r in rejected] == bad_lines and all(r["reason"] for r in rejected)
    assert q.dead_count() == 0 and redis_client.xlen(q.dead_stream) == 0
    assert len(_stored(database_url)) == good

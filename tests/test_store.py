"""The store against a real PostgreSQL: migrations, the idempotent write, kept row counts, reads."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from telemetry_nb import store
from telemetry_nb.model import Sample
from telemetry_nb.pipeline import codec

T0 = datetime(2025, 7, 18, 20, 0, 0, tzinfo=UTC)


def _batch(gpu: str, metric: str, n: int, start: int = 0, text: bool = False) -> store.RowBatch:
    samples = [Sample(gpu, metric, T0 + timedelta(seconds=start + i), float(i), "h", 0, "nvidia0", "H100")
               for i in range(n)]
    fields = codec.encode(samples)
    return codec.decode(codec.as_text(fields) if text else fields)


def _true_counts(conn) -> dict[str, int]:
    return dict(conn.execute("SELECT m.name, count(*) FROM telemetry t JOIN metrics m ON m.id = t.metric_id "
                             "GROUP BY m.name").fetchall())


def test_migrations_are_idempotent_and_recorded(database_url):
    with psycopg.connect(database_url) as conn:
        assert store.migrate(conn) == store.SCHEMA_VERSION
        assert store.migrate(conn) == store.SCHEMA_VERSION
        versions = [v for (v,) in conn.execute("SELECT version FROM schema_version ORDER BY version")]
    assert versions == [v for v, _ in store.schema.MIGRATIONS]


def test_upgrade_from_version_1_backfills_row_counts(database_url):
    with psycopg.connect(database_url) as conn:
        conn.execute("CREATE TABLE schema_version (version int PRIMARY KEY, applied_at timestamptz NOT NULL "
                     "DEFAULT now())")
        conn.execute(store.schema.MIGRATIONS[0][1])
        conn.execute("INSERT INTO schema_version (version) VALUES (1)")
        conn.execute("INSERT INTO metrics VALUES (7, 'M')")
        conn.execute("INSERT INTO telemetry SELECT 1, %s + make_interval(secs => g), 7, g, NULL "
                     "FROM generate_series(1, 25) g", (T0,))
        conn.commit()
        assert store.migrate(conn) == store.SCHEMA_VERSION
        assert store.Reader(conn).metric_counts() == [{"name": "M", "rows": 25}]


def test_counts_stay_exact_through_duplicates_and_deletes(database_url):
    with psycopg.connect(database_url) as conn:
        store.migrate(conn)
        writer = store.Writer(conn)
        first = writer.write([_batch("GPU-a", "UTIL", 100), _batch("GPU-b", "TEMP", 40)])
        assert (first.consumed, first.stored) == (140, 140) and writer.fallbacks == 0
        again = writer.write([_batch("GPU-a", "UTIL", 100, start=50), _batch("GPU-b", "TEMP", 40)])
        assert (again.consumed, again.stored) == (140, 50) and writer.fallbacks == 1
        reader = store.Reader(conn)
        assert {m["name"]: m["rows"] for m in reader.metric_counts()} == _true_counts(conn) == {"UTIL": 150,
                                                                                                "TEMP": 40}
        assert reader.summary()["rows"] == 190
        assert store.delete_gpu(conn, "GPU-b") == 40
        assert {m["name"]: m["rows"] for m in reader.metric_counts()} == {"UTIL": 150, "TEMP": 0}
        assert reader.get_gpu("GPU-b") is None


def test_failed_transaction_leaves_nothing_and_is_redone_in_full(database_url):
    with psycopg.connect(database_url) as conn:
        store.migrate(conn)
        writer = store.Writer(conn)
        bad = _batch("GPU-c", "NEW_METRIC", 3, text=True)
        bad.rows = bad.rows.replace(b"2025-07-18", b"2025-13-45", 1)
        with pytest.raises(psycopg.DataError):
            writer.write([_batch("GPU-c", "NEW_METRIC", 5, start=10), bad])
        assert conn.execute("SELECT count(*) FROM telemetry").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM metrics").fetchone()[0] == 0  # the upserts rolled back too
        result = writer.write([_batch("GPU-c", "NEW_METRIC", 5, start=10)])  # caches did not believe otherwise
        assert result.stored == 5
        assert store.Reader(conn).metric_counts() == [{"name": "NEW_METRIC", "rows": 5}]


def test_metric_id_collision_is_refused(database_url):
    with psycopg.connect(database_url) as conn:
        store.migrate(conn)
        clash = codec.metric_key("UTIL")
        conn.execute("INSERT INTO metrics VALUES (%s, 'SOMETHING_ELSE')", (clash,))
        conn.commit()
        with pytest.raises(store.IdCollision, match="UTIL"):
            store.Writer(conn).write([_batch("GPU-a", "UTIL", 3)])


def test_newer_schema_is_refused(database_url):
    with psycopg.connect(database_url) as conn:
        store.migrate(conn)
        conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (store.SCHEMA_VERSION + 1,))
        conn.commit()
        with pytest.raises(store.SchemaTooNew, match="newer than this telemetry-nb"):
            store.migrate(conn)


def _advisory_locks(conn, pid: int) -> int:
    return conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = %s AND granted",
                        (pid,)).fetchone()[0]


def test_two_writers_never_wait_on_each_others_row_counts(database_url):
    """Collectors committing at once touch no common row: the second writes while the first holds its transaction."""
    with psycopg.connect(database_url) as a, psycopg.connect(database_url) as b, \
            psycopg.connect(database_url, autocommit=True) as watch:
        store.migrate(a)
        first, second = store.Writer(a), store.Writer(b)
        for w, gpu in ((first, "GPU-a"), (second, "GPU-b")):  # metrics, GPUs and partitions known to both
            w.write([_batch(gpu, "UTIL", 10), _batch(gpu, "TEMP", 10)])
        a.execute("SELECT 1")  # an open transaction: the first writer's write nests in it and stays uncommitted
        more = [_batch("GPU-a", "UTIL", 50, start=10), _batch("GPU-a", "TEMP", 50, start=10)]
        assert first.write(more).stored == 100
        assert _advisory_locks(watch, a.info.backend_pid) == 1  # it took one count slot, not every free one
        b.execute("SET lock_timeout = '2s'")  # waiting on the first writer's locks fails the write (55P03)
        b.commit()
        more = [_batch("GPU-b", "UTIL", 50, start=10), _batch("GPU-b", "TEMP", 50, start=10)]
        assert second.write(more).stored == 100
        waiting = watch.execute("SELECT count(*) FROM pg_locks WHERE NOT granted").fetchone()[0]
        a.commit()
        assert waiting == 0
        counts = {m["name"]: m["rows"] for m in store.Reader(watch).metric_counts()}
        assert counts == _true_counts(watch) == {"UTIL": 120, "TEMP": 120}
        slots = watch.execute("SELECT count(DISTINCT slot) FROM metric_row_counts").fetchone()[0]
        assert slots == 2  # the second writer took the next slot while the first held slot 0

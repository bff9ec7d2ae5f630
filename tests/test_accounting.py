"""The notebook-side accounting helpers (telemetry_nb.analysis.accounting) and ad-hoc SQL (analysis.sql)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import psycopg
import pytest
import sqlalchemy as sa

from telemetry_nb.analysis import accounting as acc
from telemetry_nb.analysis.client import UsageItem, UsageReport
from telemetry_nb.analysis.sql import engine, read_sql

REPORT = UsageReport("namespace", datetime(2025, 7, 1, tzinfo=UTC), datetime(2025, 7, 2, tzinfo=UTC), 5.0, [
    UsageItem("ml", 10.0, 6.0, 1.0, 60.0, 4), UsageItem(None, 5.0, 0.0, 5.0, 0.0, 2),
    UsageItem("research", 20.0, 2.0, 15.0, 10.0, 3)])


@pytest.mark.parametrize("kwargs, name", [
    ({"group_by": "team"}, "group_by"),
    ({"group_by": "pod", "start_time": "2025-07-02T00:00:00Z", "end_time": "2025-07-01T00:00:00Z"}, "end_time"),
    ({"group_by": "pod", "window": "a while"}, "window"),
    ({"group_by": "pod", "idle_threshold": 101}, "idle_threshold"),
])
def test_check_parameters_names_the_bad_one(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}: "):
        acc.check_parameters(**kwargs)


def test_usage_frame_summary_top_wasting_and_files(tmp_path):
    df = acc.usage_frame(REPORT)
    assert list(df["group"]) == ["research", "ml", "(unattributed)"]  # largest GPU-hours first
    assert df.loc[0, "idle_share"] == 0.75
    s = acc.summary(REPORT, df)
    assert (s["gpu_hours"], s["idle_gpu_hours"], s["unattributed_share"], s["groups"]) == (35.0, 21.0, 5 / 35, 2)
    assert list(acc.top_wasting(df, 5)["group"]) == ["research", "ml"]  # the unattributed group owns nobody
    csv_path, json_path = acc.write_report(tmp_path / "out" / "usage.csv", df, s)
    assert (csv_path.name, json_path.name) == ("usage.csv", "usage.json")
    assert json.loads(json_path.read_text())["gpu_hours"] == 35.0
    assert csv_path.read_text().splitlines()[0] == ",".join(acc.USAGE_COLUMNS)
    assert acc.hours_chart(df).to_dict()["mark"]["type"] == "bar"


def test_read_sql_runs_read_only_queries(database_url):
    with psycopg.connect(database_url, autocommit=True) as c:
        c.execute("CREATE TABLE workloads (id bigint, namespace text, pod text, container text)")
        c.execute("INSERT INTO workloads VALUES (1, 'ml', 'a', 'c'), (2, 'ops', 'b', 'c')")
    df = read_sql("SELECT pod FROM workloads WHERE namespace = :ns", database_url=database_url, ns="ml")
    assert list(df["pod"]) == ["a"]
    with engine(database_url).connect() as conn, pytest.raises(sa.exc.InternalError, match="read-only"):
        conn.execute(sa.text("DELETE FROM workloads"))
    with engine(database_url, read_only=False).begin() as conn:
        assert conn.execute(sa.text("DELETE FROM workloads WHERE id = 2")).rowcount == 1

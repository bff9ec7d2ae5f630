"""telemetry_nb.analysis.canary on its own: samples, classification of rows, the streamer path, clean-up."""

from __future__ import annotations

import dataclasses

import httpx
import pytest

from telemetry_nb.analysis import canary
from telemetry_nb.sources.generate import METRICS


def test_make_samples_are_distinct_known_and_reproducible():
    a = canary.make_samples("GPU-canary-x", 25, spacing_s=0.5, seed=1)
    assert len(a) == 25 and len({(s.metric, s.ts) for s in a}) == 25
    assert [s.metric for s in a[:10]] == list(METRICS)
    assert (a[10].ts - a[0].ts).total_seconds() == 0.5
    assert all(s.uuid == "GPU-canary-x" and s.hostname == canary.CANARY_HOST for s in a)
    b = canary.make_samples("GPU-canary-x", 25, spacing_s=0.5, seed=1, start=a[0].ts)
    assert [s.value for s in a] == [s.value for s in b]
    assert canary.canary_uuid() != canary.canary_uuid()
    with pytest.raises(ValueError):
        canary.make_samples("x", 0)


def test_quantiles_match_numpy():
    np = pytest.importorskip("numpy")
    values = sorted([0.3, 0.1, 0.5, 0.2, 0.9, 0.4])
    for q in (0.5, 0.95):
        assert canary._quantile(values, q) == pytest.approx(float(np.quantile(values, q)))


def test_canary_ignores_streamer_sharding_and_cleans_up(stack, monkeypatch):
    monkeypatch.setenv("TELEMETRY_SHARD_INDEX", "3")
    monkeypatch.setenv("TELEMETRY_SHARD_COUNT", "4")  # as in a sharded streamer pod
    report = canary.run_canary(api_url=stack.api_url, redis_url=stack.redis_url, stream=stack.stream, rows=30,
                               spacing_s=0.02, timeout_s=30, database_url=stack.database_url)
    assert report.ok, report.summary()
    assert report.published == report.seen == 30 and report.polls >= 1
    assert report.cleanup == f"removed GPU {report.uuid} and 30 rows"
    assert httpx.get(f"{stack.api_url}/api/v1/gpus/{report.uuid}").status_code == 404
    frame = report.frame()
    assert list(frame["status"].unique()) == ["ok"] and (frame["got"] == frame["expected"]).all()
    assert canary.latency_chart(report).to_dict()["title"].startswith("Canary end-to-end latency (30 rows)")


def test_canary_reports_wrong_values(stack, monkeypatch):
    real_publish = canary.publish

    def tampering(samples, **kw):  # the first three rows arrive with other values than the canary sent
        sent = [dataclasses.replace(s, value=s.value + 1) if i < 3 else dataclasses.replace(s)
                for i, s in enumerate(samples)]
        return real_publish(sent, **{**kw, "live": False})

    monkeypatch.setattr(canary, "publish", tampering)
    report = canary.run_canary(api_url=stack.api_url, redis_url=stack.redis_url, stream=stack.stream, rows=12,
                               timeout_s=30, database_url=stack.database_url)
    assert not report.ok and report.wrong == 3 and report.missing == 0
    assert "3 rows with wrong values" in report.failures()
    with pytest.raises(AssertionError, match="3 rows with wrong values"):
        report.raise_for_failures()
    wrong = report.frame().query("status == 'wrong'")
    assert (wrong["got"] - wrong["expected"]).round(9).tolist() == [1.0, 1.0, 1.0]


def test_cleanup_without_a_database_url_is_reported():
    assert canary.clean_up("GPU-canary-x", None) == "skipped: no database_url"
    assert canary.clean_up("GPU-canary-x", "postgresql://postgres@127.0.0.1:1/x").startswith("failed:")

"""telemetry_nb.analysis.checks against real Redis, PostgreSQL and API processes (and a fake Kubernetes API)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest
import redis

from telemetry_nb import store
from telemetry_nb.analysis import checks
from telemetry_nb.analysis.checks import FAIL, PASS, SKIP, CheckResult
from telemetry_nb.embedded import free_port
from tests.conftest import run_cli


def by_name(results: list[CheckResult]) -> dict[str, CheckResult]:
    return {r.name: r for r in results}


def test_api_checks(api_server, database_url):
    before = by_name(checks.check_api(api_server))
    assert before["api.ready"].status == FAIL and "schema" in before["api.ready"].detail  # no collector ran yet
    with store.connect(database_url, autocommit=True) as conn:
        store.migrate(conn)
    r = by_name(checks.check_api(api_server))
    assert r["api.health"].status == PASS and r["api.ready"].status == PASS
    assert '"redis": "ok"' in r["api.ready"].detail
    assert r["api.auth"].status == PASS and "no token sent" in r["api.auth"].detail
    dead = by_name(checks.check_api(f"http://127.0.0.1:{free_port()}", timeout=2))
    assert dead["api.health"].status == FAIL and dead["api.ready"].status == SKIP
    assert checks.check_api("")[0].status == SKIP


def test_redis_checks_follow_the_pipeline(cli_env, real_csv):
    url, stream = cli_env["REDIS_URL"], cli_env["TELEMETRY_STREAM"]
    r = by_name(checks.check_redis(url, stream))
    assert r["redis.reachable"].status == PASS and "Redis" in r["redis.reachable"].detail
    assert r["redis.stream"].status == FAIL and "does not exist" in r["redis.stream"].detail
    assert r["redis.lag"].status == SKIP and r["redis.dead_letter"].status == PASS

    run_cli("stream", "--csv", str(real_csv), "--batch-size", "100", env=cli_env)  # ~25 entries, nobody reads
    entries = redis.Redis.from_url(url).xlen(stream)  # 2,470 rows in entries of up to 100 (per parser chunk)
    assert 25 <= entries <= 30
    r = by_name(checks.check_redis(url, stream, max_lag=10, min_consumers=0))
    assert r["redis.stream"].status == r["redis.group"].status == PASS
    assert r["redis.lag"].status == FAIL and r["redis.lag"].detail == f"backlog entries={entries} > 10"
    assert r["redis.pending"].status == PASS and "pending entries=0" in r["redis.pending"].detail
    assert r["redis.consumers"].status == PASS and "0 active of 0" in r["redis.consumers"].detail
    assert by_name(checks.check_redis(url, stream))["redis.consumers"].status == FAIL  # nobody consumes
    wrong_group = by_name(checks.check_redis(url, stream, "nobody"))
    assert wrong_group["redis.group"].status == FAIL and "collectors" in wrong_group["redis.group"].detail

    run_cli("collect", "--drain", env=cli_env)
    r = by_name(checks.check_redis(url, stream, max_lag=0))
    assert r["redis.lag"].status == PASS and r["redis.lag"].detail == "backlog entries=0 <= 0"
    assert r["redis.consumers"].status == PASS and "1 active of 1" in r["redis.consumers"].detail

    client = redis.Redis.from_url(url)
    client.xadd(f"{stream}:dead", {"entry_id": "1-0", "error": "CodecError: unsupported version"})
    r = by_name(checks.check_redis(url, stream, max_dead=0))
    assert r["redis.dead_letter"].status == FAIL and "CodecError" in r["redis.dead_letter"].detail
    assert by_name(checks.check_redis(url, stream))["redis.dead_letter"].status == PASS  # reported only
    client.close()

    down = checks.check_redis("redis://127.0.0.1:1/0", stream, timeout=2)
    assert [x.name for x in down if x.status == FAIL] == ["redis.reachable"]
    assert all(x.status == SKIP for x in down[1:])
    assert checks.check_redis("", stream)[0].status == SKIP
    bad = checks.check_redis("http://not-redis:80", stream)[0]
    assert bad.name == "redis.reachable" and bad.status == FAIL


def test_postgres_checks(cli_env, real_csv):
    url = cli_env["DATABASE_URL"]
    empty = by_name(checks.check_postgres(url))
    assert empty["postgres.reachable"].status == PASS
    assert empty["postgres.schema"].status == FAIL and empty["postgres.rows"].status == SKIP

    run_cli("stream", "--csv", str(real_csv), env=cli_env)
    run_cli("collect", "--drain", env=cli_env)
    r = by_name(checks.check_postgres(url, max_staleness_s=300))
    assert r["postgres.schema"].status == PASS
    assert r["postgres.rows"].status == PASS and r["postgres.rows"].detail.startswith("2470 telemetry rows, 247 GPUs")
    assert r["postgres.freshness"].status == FAIL and "2025-07-18T20:42:37Z" in r["postgres.freshness"].detail
    assert by_name(checks.check_postgres(url, max_staleness_s=None))["postgres.freshness"].status == SKIP
    assert by_name(checks.check_postgres(url, max_staleness_s=0))["postgres.freshness"].status == SKIP
    then = datetime(2025, 7, 18, 20, 43, tzinfo=UTC)
    fresh = by_name(checks.check_postgres(url, max_staleness_s=60, now=lambda: then))
    assert fresh["postgres.freshness"].status == PASS and "23s old" in fresh["postgres.freshness"].detail
    assert by_name(checks.check_postgres(url, min_rows=10**6))["postgres.rows"].status == FAIL

    down = checks.check_postgres("postgresql://postgres@127.0.0.1:1/x")
    assert [x.name for x in down if x.status == FAIL] == ["postgres.reachable"]
    assert checks.check_postgres("")[0].status == SKIP


def _pod(name, component, *, ready=True, phase="Running", deleting=False):
    conditions = [SimpleNamespace(type="Ready", status="True" if ready else "False")]
    return SimpleNamespace(
        metadata=SimpleNamespace(name=name, labels={"app.kubernetes.io/component": component},
                                 deletion_timestamp=datetime.now(UTC) if deleting else None),
        status=SimpleNamespace(phase=phase, conditions=conditions))


class FakeCore:
    def __init__(self, pods):
        self.pods, self.calls = pods, []

    def list_namespaced_pod(self, namespace, label_selector, _request_timeout=None):
        self.calls.append((namespace, label_selector))
        return SimpleNamespace(items=self.pods)


def test_kubernetes_checks_count_ready_pods_per_component():
    core = FakeCore([_pod("s-0", "streamer"), _pod("s-1", "streamer", ready=False),
                     _pod("c-1", "collector"), _pod("c-2", "collector", deleting=True),
                     _pod("a-1", "api-gateway", phase="Pending", ready=False)])
    r = by_name(checks.check_kubernetes("ctx", "gpu", {"streamer": 1, "collector": 1, "api-gateway": 1},
                                        release="tp", core_api=core))
    assert core.calls == [("gpu", "app.kubernetes.io/name=telemetry-pipeline,app.kubernetes.io/instance=tp")]
    assert r["kubernetes.api"].status == PASS
    assert r["kubernetes.streamer"].status == PASS and r["kubernetes.streamer"].detail.startswith("1/2 pods ready")
    assert r["kubernetes.collector"].status == PASS
    assert r["kubernetes.api-gateway"].status == FAIL and "a-1 (Pending)" in r["kubernetes.api-gateway"].detail
    two = by_name(checks.check_kubernetes("ctx", "gpu", {"streamer": 2}, components="streamer,dashboard",
                                          core_api=core))
    assert set(two) == {"kubernetes.api", "kubernetes.streamer", "kubernetes.dashboard"}
    assert two["kubernetes.streamer"].status == FAIL and two["kubernetes.dashboard"].detail.startswith("0/0")
    assert checks.check_kubernetes(None)[0] == CheckResult("kubernetes", SKIP, "not requested (kube_context not set)")


def test_kubernetes_check_reports_an_unusable_context(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    r = checks.check_kubernetes("prod", "gpu", {"collector": 2})
    assert [(x.name, x.status) for x in r] == [("kubernetes.api", FAIL), ("kubernetes.collector", SKIP)]


def test_expected_counts():
    assert checks.expected_counts(None) == {"streamer": 1, "collector": 1, "api-gateway": 1}
    assert checks.expected_counts({"streamer": 4}) == {"streamer": 4}
    assert checks.expected_counts({"streamer": 4}, "streamer, redis") == {"streamer": 4, "redis": 1}
    assert checks.expected_counts({"a": "2"}, ["a"]) == {"a": 2}
    assert checks.expected_counts('{"collector": 3}') == {"collector": 3}  # papermill -p expected '{...}'
    assert checks.expected_counts("collector=3, api-gateway") == {"collector": 3, "api-gateway": 1}


def test_retry_runs_a_section_until_it_passes_or_time_is_up():
    attempts = []

    def flaky():
        attempts.append(1)
        return [CheckResult("x", PASS if len(attempts) >= 3 else FAIL)]

    assert checks.retry(flaky, timeout_s=10, interval_s=0.01)[0].status == PASS and len(attempts) == 3
    attempts.clear()
    assert checks.retry(flaky, timeout_s=0, interval_s=0.01)[0].status == FAIL and len(attempts) == 1


def test_report_table_and_assertion(tmp_path):
    results = [CheckResult("a", PASS, "fine"), CheckResult("b", FAIL, "broken"), CheckResult("c", SKIP, "n/a"),
               CheckResult("d", FAIL, "also broken")]
    report = checks.write_report(results, tmp_path / "out" / "report.json",
                                 {"redis_url": "redis://:s3cret@host:6379/0", "max_lag": 5})
    stored = json.loads((tmp_path / "out" / "report.json").read_text())
    assert stored == json.loads(json.dumps(report))
    assert stored["ok"] is False and stored["failed"] == ["b", "d"]
    assert stored["counts"] == {"pass": 1, "fail": 2, "skip": 1}
    assert stored["parameters"] == {"redis_url": "redis://:***@host:6379/0", "max_lag": 5}
    table = checks.to_frame(results)
    assert list(table.columns) == ["check", "status", "detail"] and len(table) == 4
    with pytest.raises(AssertionError, match=r"^failed checks: b, d \(b: broken; d: also broken\)$"):
        checks.assert_passed(results)
    checks.assert_passed(results[:1])


def test_run_all_on_a_live_pipeline(cli_env, api_server, real_csv):
    run_cli("stream", "--csv", str(real_csv), env=cli_env)
    run_cli("collect", "--drain", env=cli_env)
    results = checks.run_all(api_url=api_server, redis_url=cli_env["REDIS_URL"],
                             database_url=cli_env["DATABASE_URL"], stream=cli_env["TELEMETRY_STREAM"],
                             max_staleness_s=None)
    assert checks.failed(results) == []
    assert [r.name for r in results][:2] == ["api.health", "api.ready"] and results[-1].name == "kubernetes"
    stale = checks.run_all(database_url=cli_env["DATABASE_URL"], max_staleness_s=60)
    assert checks.failed(stale) == ["postgres.freshness"]
    assert {r.name for r in stale if r.status == SKIP} == {"api", "redis", "kubernetes"}

"""The notebooks, executed with papermill against a live stack; the deployment check also against broken ones."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import httpx
import pandas as pd
import pytest
import redis
from papermill.exceptions import PapermillExecutionError

from telemetry_nb.analysis import explore
from telemetry_nb.embedded import free_port
from tests.conftest import run_cli, start_cli, wait_http
from tests.notebooks.conftest import HISTORY_ROWS, HOSTS, NOTEBOOKS, run_notebook

ALL = ["01_deployment_check.ipynb", "02_data_flow_verification.ipynb", "03_gpu_telemetry_exploration.ipynb",
       "dashboard.ipynb"]


def svg_outputs(nb) -> list[str]:
    """The SVG images an executed notebook shows (Altair's "svg" renderer)."""
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            svg = o.get("data", {}).get("image/svg+xml")
            if svg:
                out.append("".join(svg) if isinstance(svg, list) else svg)
    return out


# -- stored form -----------------------------------------------------------------------------------
def test_stored_notebooks_are_stripped():
    """One policy: notebooks are committed without outputs or execution counts (nbstripout --verify)."""
    paths = [str(NOTEBOOKS / n) for n in ALL]
    proc = subprocess.run([sys.executable, "-m", "nbstripout", "--verify", *paths], capture_output=True, text=True)
    assert proc.returncode == 0, f"run nbstripout on the notebooks:\n{proc.stdout}{proc.stderr}"
    for n in ALL:
        nb = json.loads((NOTEBOOKS / n).read_text())
        for cell in nb["cells"]:
            if cell["cell_type"] == "code":
                assert cell["outputs"] == [] and cell["execution_count"] is None, n


@pytest.mark.parametrize("name, params", [
    ("01_deployment_check.ipynb", ["api_url", "api_token", "redis_url", "database_url", "stream", "group",
                                   "kube_context", "namespace", "expected", "max_lag", "max_staleness_s", "report_path",
                                   "release",
                                   "expected_components", "timeout_s", "max_dead"]),
    ("02_data_flow_verification.ipynb", ["api_url", "api_token", "redis_url", "database_url", "stream", "rows",
                                         "timeout_s", "max_latency_s", "cleanup", "report_path"]),
    ("03_gpu_telemetry_exploration.ipynb", ["api_url", "api_token", "start_time", "end_time", "window", "hostnames",
                                            "metrics"]),
    ("dashboard.ipynb", ["api_url", "api_token"]),
])
def test_parameters_cell_declares(name, params):
    import papermill as pm

    declared = set(pm.inspect_notebook(str(NOTEBOOKS / name)))
    assert set(params) <= declared, set(params) - declared


# -- 01 deployment check ---------------------------------------------------------------------------
def _check_params(stack, tmp_path, **extra):
    return {"api_url": stack.api_url, "redis_url": stack.redis_url, "database_url": stack.database_url,
            "stream": stack.stream, "report_path": str(tmp_path / "report.json"), **extra}


def test_deployment_check_passes_on_a_live_stack(stack, tmp_path):
    run_notebook("01_deployment_check.ipynb", tmp_path, **_check_params(stack, tmp_path, max_staleness_s=120))
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ok"] and report["failed"] == []
    status = {c["name"]: c["status"] for c in report["checks"]}
    for name in ("api.health", "api.ready", "redis.reachable", "redis.stream", "redis.group", "redis.consumers",
                 "redis.lag", "redis.pending", "redis.dead_letter", "postgres.reachable", "postgres.schema",
                 "postgres.rows", "postgres.freshness"):
        assert status[name] == "pass", (name, report["checks"])
    assert status["kubernetes"] == "skip"
    assert "not requested" in next(c["detail"] for c in report["checks"] if c["name"] == "kubernetes")
    rows = next(c["detail"] for c in report["checks"] if c["name"] == "postgres.rows")
    assert int(rows.split()[0]) >= HISTORY_ROWS
    assert "***" not in json.dumps(report["parameters"]) or "@" in stack.redis_url


def test_deployment_check_sends_the_api_token(stack, tmp_path):
    """Against an API that requires a token: passes with `api_token`, fails naming api.auth without it."""
    token = "tnb-notebook-token-31337"
    port = free_port()
    env = {k: v for k, v in stack.env.items() if k != "TELEMETRY_API_TOKEN"}
    proc = start_cli("serve", "--port", str(port), env={**env, "TELEMETRY_API_TOKENS": token},
                     log_path=tmp_path / "api-auth.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/health")
        api_url = f"http://127.0.0.1:{port}"
        run_notebook("01_deployment_check.ipynb", tmp_path / "with",
                     **_check_params(stack, tmp_path / "with", api_url=api_url, api_token=token, max_staleness_s=0))
        report = json.loads((tmp_path / "with" / "report.json").read_text())
        auth = next(c for c in report["checks"] if c["name"] == "api.auth")
        assert report["ok"] and auth["status"] == "pass" and "token accepted" in auth["detail"]
        assert token not in json.dumps(report)
        with pytest.raises(PapermillExecutionError) as err:
            run_notebook("01_deployment_check.ipynb", tmp_path / "without",
                         **_check_params(stack, tmp_path / "without", api_url=api_url, max_staleness_s=0))
        assert "failed checks: api.auth" in str(err.value)
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_deployment_check_fails_naming_redis_on_a_wrong_url(stack, tmp_path):
    params = _check_params(stack, tmp_path, redis_url="redis://127.0.0.1:1/0", max_staleness_s=0)
    with pytest.raises(PapermillExecutionError) as err:
        run_notebook("01_deployment_check.ipynb", tmp_path, **params)
    assert "failed checks: redis.reachable" in str(err.value)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["failed"] == ["redis.reachable"]
    skipped = {c["name"] for c in report["checks"] if c["status"] == "skip"}
    assert {"redis.lag", "redis.pending", "redis.group"} <= skipped


def test_deployment_check_fails_when_lag_grows_with_the_collector_stopped(cli_env, api_server, real_csv, tmp_path):
    run_cli("stream", "--csv", str(real_csv), env=cli_env)
    run_cli("collect", "--drain", env=cli_env)  # the collector ran once, then stopped
    run_cli("stream", "--csv", str(real_csv), "--batch-size", "100", env=cli_env)  # ~25 entries nobody collects
    with redis.Redis.from_url(cli_env["REDIS_URL"]) as client:  # entries of up to 100 rows, per parser chunk
        entries = client.xlen(cli_env["TELEMETRY_STREAM"])  # the drained ones were trimmed by the collector
    assert 25 <= entries <= 30
    params = {"api_url": api_server, "redis_url": cli_env["REDIS_URL"], "database_url": cli_env["DATABASE_URL"],
              "stream": cli_env["TELEMETRY_STREAM"], "max_lag": 10, "max_staleness_s": None, "min_consumers": 0,
              "report_path": str(tmp_path / "report.json")}
    with pytest.raises(PapermillExecutionError) as err:
        run_notebook("01_deployment_check.ipynb", tmp_path, **params)
    assert "failed checks: redis.lag, redis.pending" in str(err.value) or "failed checks: redis.lag" in str(err.value)
    report = json.loads((tmp_path / "report.json").read_text())
    assert "redis.lag" in report["failed"]
    lag = next(c for c in report["checks"] if c["name"] == "redis.lag")
    assert f"backlog entries={entries} > 10" in lag["detail"]
    assert not {"postgres.reachable", "postgres.schema", "postgres.rows", "api.ready"} & set(report["failed"])


def test_deployment_check_kubernetes_section_runs_when_a_context_is_given(stack, tmp_path):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "dead",
        "clusters": [{"name": "dead", "cluster": {"server": "https://127.0.0.1:1"}}],
        "users": [{"name": "u", "user": {"token": "x"}}],
        "contexts": [{"name": "dead", "context": {"cluster": "dead", "user": "u", "namespace": "gpu"}}]}))
    os.environ["KUBECONFIG"] = str(kubeconfig)
    try:
        with pytest.raises(PapermillExecutionError) as err:
            run_notebook("01_deployment_check.ipynb", tmp_path,
                         **_check_params(stack, tmp_path, kube_context="dead", max_staleness_s=0,
                                         expected_components="streamer,collector"))
    finally:
        del os.environ["KUBECONFIG"]
    assert "failed checks: kubernetes.api" in str(err.value)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["failed"] == ["kubernetes.api"]
    assert {c["name"] for c in report["checks"] if c["status"] == "skip" and c["name"].startswith("kube")} == {
        "kubernetes.streamer", "kubernetes.collector"}


# -- 02 canary -------------------------------------------------------------------------------------
def test_data_flow_canary_arrives_exact_and_is_cleaned_up(stack, tmp_path):
    report_path = tmp_path / "flow.json"
    nb = run_notebook("02_data_flow_verification.ipynb", tmp_path, api_url=stack.api_url, redis_url=stack.redis_url,
                      database_url=stack.database_url, stream=stack.stream, rows=50, spacing_s=0.05, timeout_s=60,
                      report_path=str(report_path))
    (latency_svg,) = svg_outputs(nb)
    assert "Canary end-to-end latency (50 rows)" in latency_svg
    report = json.loads(report_path.read_text())
    assert report["ok"] and report["failures"] == []
    assert report["expected"] == report["published"] == report["seen"] == 50
    assert report["missing"] == report["wrong"] == report["late"] == report["unexpected"] == 0
    assert 0 < report["p50_s"] <= report["p95_s"] <= report["max_s"] < 30
    assert all(r["status"] == "ok" and r["got"] == r["expected"] for r in report["rows"])
    assert report["cleanup"].startswith(f"removed GPU {report['uuid']} and 50 rows")
    assert httpx.get(f"{stack.api_url}/api/v1/gpus/{report['uuid']}").status_code == 404


def test_data_flow_canary_fails_on_late_rows(stack, tmp_path):
    with pytest.raises(PapermillExecutionError) as err:
        run_notebook("02_data_flow_verification.ipynb", tmp_path, api_url=stack.api_url, redis_url=stack.redis_url,
                     database_url=stack.database_url, stream=stack.stream, rows=20, max_latency_s=0.000001,
                     report_path=str(tmp_path / "flow.json"))
    assert "20 rows later than" in str(err.value)
    report = json.loads((tmp_path / "flow.json").read_text())
    assert report["late"] == 20 and not report["ok"] and report["cleanup"].startswith("removed")


def test_data_flow_canary_fails_on_missing_rows_without_a_collector(cli_env, api_server, tmp_path):
    with pytest.raises(PapermillExecutionError) as err:
        run_notebook("02_data_flow_verification.ipynb", tmp_path, api_url=api_server,
                     redis_url=cli_env["REDIS_URL"], database_url=cli_env["DATABASE_URL"],
                     stream=cli_env["TELEMETRY_STREAM"], rows=10, timeout_s=1.5, report_path=str(tmp_path / "f.json"))
    assert "10 rows missing after the timeout" in str(err.value)
    assert json.loads((tmp_path / "f.json").read_text())["timed_out"] is True


# -- 03 exploration --------------------------------------------------------------------------------
def _history_truth(stack) -> pd.DataFrame:
    df = pd.read_csv(stack.history_csv, usecols=["metric_name", "uuid", "Hostname", "value"])
    util = df[df["metric_name"] == "DCGM_FI_DEV_GPU_UTIL"]
    return util.groupby("uuid").agg(max_util=("value", "max"), host=("Hostname", "first"))


def test_exploration_of_a_window_with_a_million_rows(stack, tmp_path):
    assert sum(m["rows"] for m in httpx.get(f"{stack.api_url}/api/v1/metrics").json()["items"]) > 1_000_000
    summary_path = tmp_path / "summary.json"
    nb = run_notebook("03_gpu_telemetry_exploration.ipynb", tmp_path, api_url=stack.api_url, window="1h",
                      metrics=list(explore.UNITS), summary_path=str(summary_path))
    assert len(svg_outputs(nb)) == 5  # heatmap, per host, temperature/power, framebuffer, distributions
    assert "cdn.jsdelivr" not in json.dumps([c.get("outputs", []) for c in nb.cells])  # renders offline
    s = json.loads(summary_path.read_text())
    assert s["samples"] >= HISTORY_ROWS  # every history row is in the window, aggregated server-side
    assert max(s["chart_rows"].values()) <= explore.MAX_CHART_ROWS
    assert s["aggregate_rows"] < s["samples"] / 20
    assert s["summary"]["reporting_gpus"] == HOSTS * 8 and s["summary"]["reporting_hosts"] == HOSTS
    truth = _history_truth(stack)
    assert set(s["idle"]) == set(truth[truth["max_util"] < 5].index)
    assert 0 < len(s["idle"]) < HOSTS * 8
    real = set(pd.read_csv(stack.real_csv, usecols=["uuid"])["uuid"])
    assert set(s["stopped"]) == real  # the 2025 export's GPUs stopped reporting long ago
    assert 0.9 <= s["interval_s"] <= 5.5


def test_exploration_of_a_fixed_historical_window_and_hosts(stack, tmp_path):
    real = pd.read_csv(stack.real_csv)
    hosts = sorted(real["Hostname"].unique())[:3]
    summary_path = tmp_path / "summary.json"
    run_notebook("03_gpu_telemetry_exploration.ipynb", tmp_path, api_url=stack.api_url,
                 start_time="2025-07-18T20:00:00Z", end_time="2025-07-18T21:00:00Z", hostnames=",".join(hosts),
                 metrics=None, summary_path=str(summary_path))
    s = json.loads(summary_path.read_text())
    mine = real[real["Hostname"].isin(hosts)]
    default_metrics = set(explore.DEFAULT_METRICS)
    assert s["samples"] == int(mine["metric_name"].isin(default_metrics).sum())
    assert s["hosts"] == hosts
    assert s["summary"]["reporting_gpus"] == mine["uuid"].nunique()
    assert s["window"]["start"].startswith("2025-07-18T20:00:00")
    idle_truth = mine[(mine["metric_name"] == "DCGM_FI_DEV_GPU_UTIL") & (mine["value"] < 5)]["uuid"]
    assert set(s["idle"]) == set(idle_truth)


# -- nbval -----------------------------------------------------------------------------------------
def test_nbval_runs_every_notebook_with_its_defaults(stack, tmp_path):
    """`pytest --nbval-lax` over a copy of notebooks/ whose defaults come from the stack's environment."""
    copy = tmp_path / "notebooks"
    shutil.copytree(NOTEBOOKS, copy, ignore=shutil.ignore_patterns(".ipynb_checkpoints", "voila"))
    env = {**stack.env, "TELEMETRY_NB_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "--nbval-lax", "-q", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), "--nbval-cell-timeout", "240", str(copy)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
    assert json.loads((tmp_path / "deployment_check.json").read_text())["ok"]
    assert json.loads((tmp_path / "data_flow_report.json").read_text())["ok"]


# -- dashboard in a real browser -------------------------------------------------------------------
def test_dashboard_cli_help():
    proc = subprocess.run([sys.executable, "-m", "telemetry_nb.cli", "dashboard", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "--api-url" in proc.stdout and "--refresh" in proc.stdout


def test_dashboard_finds_the_checkouts_notebooks(monkeypatch):
    from telemetry_nb.analysis.dashboard import notebooks_dir

    monkeypatch.delenv("TELEMETRY_NOTEBOOKS", raising=False)
    assert notebooks_dir() == NOTEBOOKS  # an editable install has no share/telemetry-nb copy


def test_dashboard_cli_reports_a_missing_notebook(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "telemetry_nb.cli", "dashboard", "--notebook",
                           str(tmp_path / "nope.ipynb")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "not found" in proc.stderr


def test_dashboard_in_headless_chromium(stack, tmp_path):
    from telemetry_nb.embedded import free_port
    from tests.notebooks.browser import chromium_page, save_screenshot

    port = free_port()
    proc = start_cli("dashboard", "--port", str(port), "--api-url", stack.api_url, "--refresh", "4",
                     env=stack.env, log_path=tmp_path / "voila.log")
    try:
        _wait_port(f"http://127.0.0.1:{port}/", proc, tmp_path / "voila.log")
        with chromium_page() as (page, requests):
            page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded", timeout=120_000)
            page.wait_for_selector(".widget-html svg", timeout=120_000)
            page.wait_for_function("document.querySelectorAll('.widget-html svg').length >= 4", timeout=60_000)
            text = page.inner_text("body")
            for bad in ("Traceback", "Error", "Could not refresh"):
                assert bad not in text, text[:3000]
            assert "GPUs reporting".upper() in text.upper() and f"{HOSTS * 8} / " in text
            status = page.inner_text(".tnb-status")
            save_screenshot(page, tmp_path / "dashboard-fleet.png", docs=True)
            # the host picker drives the charts
            host = "gpu-node-002"
            page.locator("select").first.select_option(host)
            page.wait_for_function(f"document.body.textContent.includes('— {host}')", timeout=60_000)
            # the timer refreshes the page on its own
            page.wait_for_function("s => document.querySelector('.tnb-status').innerText !== s", arg=status,
                                   timeout=60_000)
            page.wait_for_timeout(500)
            shot = save_screenshot(page, tmp_path / "dashboard-host.png")
            assert shot.stat().st_size > 20_000
            outside = [u for u in requests if not u.startswith(f"http://127.0.0.1:{port}/")
                       and not u.startswith(("ws://127.0.0.1", "data:", "blob:"))]
            assert outside == [], f"the dashboard fetched from outside (no CDN allowed): {outside}"
            assert "Traceback" not in page.inner_text("body")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    log = (tmp_path / "voila.log").read_text()
    assert "Traceback" not in log, log[-4000:]


def _wait_port(url: str, proc, log, timeout_s: float = 90) -> None:
    """Wait for the port to accept connections (a GET of the page would start a kernel)."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"dashboard exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        with socket.socket() as sock:
            sock.settimeout(1)
            if sock.connect_ex((parts.hostname, parts.port)) == 0:
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} did not come up:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)

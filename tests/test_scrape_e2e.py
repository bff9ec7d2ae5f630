"""End to end through the CLI: live exporters (a local HTTP server whose text changes every scrape) →
`telemetry-nb scrape` → Redis → `collect` → PostgreSQL → API: every GPU, MIG instance, label, value and
XID event exactly; the scraper SIGKILLed and restarted mid-run loses only the scrapes of its down time
and doubles nothing."""

from __future__ import annotations

import signal
import threading
import time
from collections import defaultdict
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from telemetry_nb.embedded import free_port
from telemetry_nb.model import mig_uuid
from telemetry_nb.pipeline.streams import Queue
from telemetry_nb.timeparse import format_rfc3339
from tests.conftest import run_cli, start_cli, wait_http

A0, A1 = "GPU-0a0a0a0a-0000-4000-8000-000000000000", "GPU-0a0a0a0a-0000-4000-8000-000000000001"
PARENT = "GPU-0b0b0b0b-0000-4000-8000-000000000000"
MIG1, MIG2 = mig_uuid(PARENT, 1), mig_uuid(PARENT, 2)
A_METRICS = ("DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_POWER_USAGE")
A_LABELS = {
    A0: {"gpu": "0", "UUID": A0, "pci_bus_id": "00000000:18:00.0", "device": "nvidia0",
         "modelName": "NVIDIA H100 80GB HBM3", "Hostname": "node-a", "DCGM_FI_DRIVER_VERSION": "550.54.15"},
    A1: {"gpu": "1", "UUID": A1, "pci_bus_id": "00000000:2A:00.0", "device": "nvidia1",
         "modelName": "NVIDIA H100 80GB HBM3", "Hostname": "node-a", "DCGM_FI_DRIVER_VERSION": "550.54.15"},
}
B_STATIC = {"gpu": "0", "uuid": PARENT, "hostname": "node-b", "device": "nvidia0", "modelName": "NVIDIA A100-SXM4-40GB",
            "pci_bus_id": "00000000:07:00.0", "DCGM_FI_DRIVER_VERSION": "535.129.03"}
MSG = {43: "GPU stopped processing", 79: "GPU has fallen off the bus"}


def _xid_code(k: int) -> int:
    return 0 if k < 3 else 43 if k < 9 else 79


def _labels(d: dict[str, str]) -> str:
    return ",".join(f'{k}="{v}"' for k, v in d.items())


def node_a(k: int) -> str:
    """exporter 3.x: HELP/TYPE, Hostname/UUID, a pod on GPU 1, no timestamps; one malformed line."""
    out = []
    for m, name in enumerate(A_METRICS):
        out.append(f"# HELP {name} help text\n# TYPE {name} gauge\n")
        for g, uuid in enumerate((A0, A1)):
            work = 'container="main",namespace="ml",pod="train-0"' if g else 'container="",namespace="",pod=""'
            out.append(f"{name}{{{_labels(A_LABELS[uuid])},{work}}} {k * 100 + g * 10 + m}\n")
    out.append("DCGM_FI_DEV_SM_CLOCK{this is broken 1\n")  # line 13: rejected every scrape, the rest kept
    return "".join(out)


def node_b(k: int, ms: int) -> str:
    """2026 spelling, no HELP/TYPE, MIG instances, XID with messages, sample timestamps, no final newline."""
    code = _xid_code(k)
    lines = [
        f'DCGM_FI_DEV_GPU_TEMP{{{_labels(B_STATIC)}}} {40 + k} {ms}',
        f'DCGM_FI_DEV_XID_ERRORS{{{_labels(B_STATIC)},err_code="{code}",err_msg="{MSG.get(code, "")}"}} {code} {ms}',
        f'DCGM_FI_PROF_GR_ENGINE_ACTIVE{{GPU_I_PROFILE="1g.5gb",GPU_I_ID="1",{_labels(B_STATIC)}}} {k / 100} {ms}',
        f'DCGM_FI_PROF_GR_ENGINE_ACTIVE{{GPU_I_PROFILE="3g.20gb",GPU_I_ID="2",{_labels(B_STATIC)},'
        f'pod="infer-1",namespace="serve",container="triton"}} {k / 50} {ms}',
        f'DCGM_FI_DEV_FB_USED{{GPU_I_PROFILE="1g.5gb",GPU_I_ID="1",{_labels(B_STATIC)}}} {1000 + k} {ms}',
    ]
    return "\n".join(lines)


class Exporters:
    """Two exporters on one local HTTP server; every request gets the next scrape number of its target."""

    def __init__(self):
        self.served: dict[str, list[tuple[int, float, int]]] = defaultdict(list)  # target → (k, at, ms)
        self.lock = threading.Lock()
        ex = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802
                target = self.path.strip("/").split("/")[0]
                if target not in ("node-a", "node-b"):
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                with ex.lock:
                    k = len(ex.served[target])
                    ms = int(time.time() * 1000)
                    ex.served[target].append((k, time.time(), ms))
                body = (node_a(k) if target == "node-a" else node_b(k, ms)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"

    def count(self, target: str) -> int:
        with self.lock:
            return len(self.served[target])


@pytest.fixture
def exporters():
    ex = Exporters()
    yield ex
    ex.server.shutdown()


def _wait_for(fn, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not fn():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _get_all(url: str, **params) -> list[dict]:
    items, cursor = [], None
    while True:
        page = httpx.get(url, params={**params, **({"cursor": cursor} if cursor else {})}).json()
        items += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return items


def _iso(ms: int) -> str:
    """The API's spelling of a millisecond sample timestamp."""
    return format_rfc3339(datetime.fromtimestamp(ms / 1000, UTC))


def test_scrape_collect_api_exact_with_a_killed_and_restarted_scraper(cli_env, exporters, api_server, tmp_path,
                                                                      redis_client):
    dead_port = free_port()  # nothing listens: a target that is down the whole time
    metrics_port = free_port()
    down = f"http://127.0.0.1:{dead_port}/metrics"
    args = ("scrape", "--target", f"{exporters.base}/node-a/metrics", "--target", f"{exporters.base}/node-b/metrics",
            "--target", down, "--interval", "0.3s", "--timeout", "1s")
    first = start_cli(*args, "--metrics-port", str(metrics_port), env=cli_env, log_path=tmp_path / "scrape1.log")
    _wait_for(lambda: exporters.count("node-b") >= 6, "six scrapes")
    wait_http(f"http://127.0.0.1:{metrics_port}/health")
    scrape_metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed_at = time.time()
    served_before = {t: exporters.count(t) for t in ("node-a", "node-b")}
    time.sleep(1.5)  # down time: nobody scrapes
    assert {t: exporters.count(t) for t in ("node-a", "node-b")} == served_before
    second = start_cli(*args, env=cli_env, log_path=tmp_path / "scrape2.log")
    _wait_for(lambda: exporters.count("node-b") >= served_before["node-b"] + 8, "eight more scrapes")
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=30) == 0
    run_cli("collect", "--drain", env=cli_env)

    # per-target metrics and logs: the down target is logged once per run, the others kept going
    assert f'telemetry_scrape_up{{target="{exporters.base}/node-a/metrics"}} 1.0' in scrape_metrics
    assert f'telemetry_scrape_up{{target="{down}"}} 0.0' in scrape_metrics
    assert "telemetry_scrape_duration_seconds" in scrape_metrics and "telemetry_scrape_samples" in scrape_metrics
    log2 = (tmp_path / "scrape2.log").read_text()
    assert log2.count(f"Target {down} is down") == 1
    assert log2.strip().splitlines()[-1].startswith("cycles=")

    # the inventory: every GPU and MIG instance, with every static label
    gpus = {g["uuid"]: g for g in _get_all(f"{api_server}/api/v1/gpus")}
    assert set(gpus) == {A0, A1, PARENT, MIG1, MIG2}
    a0 = gpus[A0]
    assert {k: a0[k] for k in ("hostname", "gpu_index", "device", "model_name", "pci_bus_id", "driver_version",
                                "labels", "parent_uuid", "mig_profile", "mig_instance")} == {
        "hostname": "node-a", "gpu_index": 0, "device": "nvidia0", "model_name": "NVIDIA H100 80GB HBM3",
        "pci_bus_id": "00000000:18:00.0", "driver_version": "550.54.15", "labels": A_LABELS[A0],
        "parent_uuid": None, "mig_profile": None, "mig_instance": None}
    assert gpus[A1]["labels"] == A_LABELS[A1]
    assert gpus[PARENT]["labels"] == B_STATIC and gpus[PARENT]["hostname"] == "node-b"
    assert {(g["uuid"], g["parent_uuid"], g["mig_profile"], g["mig_instance"], g["hostname"])
            for g in _get_all(f"{api_server}/api/v1/gpus", parent_uuid=PARENT)} == {
        (MIG1, PARENT, "1g.5gb", 1, "node-b"), (MIG2, PARENT, "3g.20gb", 2, "node-b")}
    assert gpus[MIG2]["labels"] == {**B_STATIC, "GPU_I_PROFILE": "3g.20gb", "GPU_I_ID": "2"}

    def rows(uuid: str) -> list[tuple[str, str, float]]:
        return [(i["timestamp"], i["metric"], i["value"])
                for i in _get_all(f"{api_server}/api/v1/gpus/{uuid}/telemetry", limit=10000)]

    # node-a: no sample timestamps, so each scrape has one scrape time; every stored scrape complete and exact
    served_a = {k: at for k, at, _ in exporters.served["node-a"]}
    stored_k: dict[str, set[int]] = {}
    for g, uuid in enumerate((A0, A1)):
        by_ts: dict[str, dict[str, float]] = defaultdict(dict)
        for ts, metric, value in rows(uuid):
            by_ts[ts][metric] = value
        ks = []
        for ts, values in by_ts.items():
            k = int(values["DCGM_FI_DEV_GPU_UTIL"] // 100)
            assert values == {name: float(k * 100 + g * 10 + m) for m, name in enumerate(A_METRICS)}, ts
            ks.append(k)
        assert len(ks) == len(set(ks)), "a scrape stored twice"
        stored_k[uuid] = set(ks)
    assert stored_k[A0] == stored_k[A1]
    missing = set(served_a) - stored_k[A0]
    assert all(killed_at - 1.0 <= served_a[k] <= killed_at for k in missing), "a gap outside the down time"
    assert len(stored_k[A0]) >= len(served_a) - 2

    # node-b: sample timestamps kept to the millisecond; parent and instances never mix
    served_b = {ms: k for k, _, ms in exporters.served["node-b"]}
    parent_rows, mig1_rows, mig2_rows = rows(PARENT), rows(MIG1), rows(MIG2)
    assert {m for _, m, _ in parent_rows} == {"DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_XID_ERRORS"}
    assert {m for _, m, _ in mig1_rows} == {"DCGM_FI_PROF_GR_ENGINE_ACTIVE", "DCGM_FI_DEV_FB_USED"}
    stored_ms = sorted(ms for ms in served_b if (_iso(ms), "DCGM_FI_DEV_GPU_TEMP", 40.0 + served_b[ms])
                       in set(parent_rows))
    assert len(parent_rows) == 2 * len(stored_ms)
    assert all(killed_at - 1.0 <= ms / 1000 <= killed_at for ms in set(served_b) - set(stored_ms))
    assert len(stored_ms) >= len(served_b) - 2
    assert sorted(mig2_rows) == sorted((_iso(ms), "DCGM_FI_PROF_GR_ENGINE_ACTIVE", served_b[ms] / 50)
                                       for ms in stored_ms)
    assert sorted(mig1_rows) == sorted([(_iso(ms), "DCGM_FI_PROF_GR_ENGINE_ACTIVE", served_b[ms] / 100)
                                        for ms in stored_ms] + [(_iso(ms), "DCGM_FI_DEV_FB_USED", 1000.0 + served_b[ms])
                                                                for ms in stored_ms])

    # XID events: one per change of the last code, none repeated by the restart
    expected, last = [], 0
    for ms in stored_ms:
        code = _xid_code(served_b[ms])
        if code and code != last:
            expected.append({"timestamp": _iso(ms), "uuid": PARENT, "hostname": "node-b", "kind": "xid",
                             "code": code, "message": MSG[code]})
        last = code
    events = _get_all(f"{api_server}/api/v1/events")
    assert events == expected and [e["code"] for e in events] == [43, 79]

    # the malformed line of node-a landed in <stream>:rejected with its target and line number
    queue = Queue(redis_client, cli_env["TELEMETRY_STREAM"])
    rejected = queue.read_rejected(5)
    assert rejected and all(r["source"] == f"{exporters.base}/node-a/metrics" and r["line"] == "13"
                            and r["reason"] == "malformed sample line" for r in rejected)


def test_scrape_refuses_bad_usage(cli_env):
    none = run_cli("scrape", env=cli_env, check=False, timeout=60)
    assert none.returncode == 2 and "give exactly one of --target" in none.stderr
    both = run_cli("scrape", "--target", "x:1", "--kubernetes", env=cli_env, check=False, timeout=60)
    assert both.returncode == 2 and "give exactly one of --target" in both.stderr
    missing = run_cli("scrape", "--targets-file", "/nonexistent/targets", env=cli_env, check=False, timeout=60)
    assert missing.returncode == 2 and "targets file not found" in missing.stderr
    bad = run_cli("scrape", "--target", "x:1", "--interval", "often", env=cli_env, check=False, timeout=60)
    assert bad.returncode == 2 and "invalid duration" in bad.stderr


def test_demo_scrapes_a_given_exporter(tmp_path):
    """`demo --scrape URL` against an exporter it did not start (here the fake one, run as a separate process)."""
    import os
    import subprocess
    import sys

    from telemetry_nb.embedded import Embedded

    exporter_port, api_port = free_port(), free_port()
    exporter = subprocess.Popen([sys.executable, "-m", "telemetry_nb.cli", "fake-exporter", "--port",
                                 str(exporter_port), "--targets", "2", "--gpus", "4", "--fields", "11"])
    home = tmp_path / "demo-home"
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env.update(TELEMETRY_NB_HOME=str(home), PYTHONUNBUFFERED="1")
    url = f"http://127.0.0.1:{exporter_port}/target/1/metrics"
    log = open(tmp_path / "demo.log", "w")
    demo = subprocess.Popen([sys.executable, "-m", "telemetry_nb.cli", "demo", "--scrape", url, "--port",
                             str(api_port), "--no-dashboard"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{api_port}"

        def ready() -> bool:
            try:
                return len(httpx.get(f"{base}/api/v1/gpus", timeout=2).json()["items"]) == 4 and \
                    len(httpx.get(f"{base}/api/v1/events", timeout=2).json()["items"]) == 1
            except (httpx.HTTPError, ValueError, KeyError):
                return False

        _wait_for(ready, "the demo to show the exporter's 4 GPUs and its XID event", 90)
        gpus = httpx.get(f"{base}/api/v1/gpus").json()["items"]
        assert {g["hostname"] for g in gpus} == {"gpu-node-0002"}
        assert all(g["driver_version"] == "550.54.15" and g["pci_bus_id"] and g["labels"]["Hostname"] ==
                   "gpu-node-0002" for g in gpus)
        (event,) = httpx.get(f"{base}/api/v1/events").json()["items"]
        assert (event["code"], event["message"], event["hostname"]) == (13, "Graphics Engine Exception",
                                                                        "gpu-node-0002")
    finally:
        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=40) == 0
        log.close()
        exporter.terminate()
        exporter.wait(10)
        Embedded(home).stop()


def test_worker_processes_share_the_targets_and_publish_each_scrape_once(cli_env, exporters, database_url):
    import psycopg

    targets = [a for t in ("node-a", "node-b") for a in ("--target", f"{exporters.base}/{t}/metrics")]
    out = run_cli("scrape", *targets, "--workers", "2", "--cycles", "3", "--interval", "0.2s", env=cli_env)
    # node-a: 6 samples a scrape (one malformed line rejected), node-b: 5
    assert out.stdout.strip().splitlines()[-1] == "cycles=3 published=33 rejected=3"
    assert "Scraping with 2 worker processes" in out.stderr
    assert (exporters.count("node-a"), exporters.count("node-b")) == (3, 3)
    run_cli("collect", "--drain", env=cli_env)
    with psycopg.connect(database_url) as conn:
        n, distinct = conn.execute("SELECT count(*), count(DISTINCT (gpu_id, ts, metric_id)) FROM telemetry").fetchone()
    assert n == distinct == 33

"""Target discovery: static, a file re-read on change, and Kubernetes list + watch with the official client.

A Kubernetes API server cannot run here, so discovery talks to a local HTTP server that answers the
pods / EndpointSlices list and watch calls with real-shaped JSON, scripted per call.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from telemetry_nb.sources.targets import FileTargets, KubernetesTargets, StaticTargets, kubernetes_client


def test_static_targets_are_normalised():
    t = StaticTargets(["node1:9400", "http://node2:9400/metrics", "https://node3:9401"])
    assert t.current() == ["http://node1:9400/metrics", "http://node2:9400/metrics", "https://node3:9401/metrics"]


def test_targets_file_is_reread_when_it_changes(tmp_path):
    f = tmp_path / "targets.txt"
    f.write_text("# exporters\nnode1:9400\n\nhttp://node2:9400/metrics  # second\n")
    t = FileTargets(f)
    assert t.current() == ["http://node1:9400/metrics", "http://node2:9400/metrics"]
    f.write_text("node3:9400\n")
    os.utime(f, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))  # a new mtime even on coarse clocks
    assert t.current() == ["http://node3:9400/metrics"]
    f.unlink()
    assert t.current() == ["http://node3:9400/metrics"]  # unreadable: the last list is kept


def _pod(name: str, ip: str | None, phase: str = "Running", rv: str = "1", deleting: bool = False) -> dict:
    meta = {"name": name, "namespace": "gpu-operator", "resourceVersion": rv, "uid": f"uid-{name}",
            "labels": {"app": "nvidia-dcgm-exporter"}}
    if deleting:
        meta["deletionTimestamp"] = "2026-03-01T12:00:00Z"
    status = {"phase": phase, **({"podIP": ip, "podIPs": [{"ip": ip}]} if ip else {})}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta,
            "spec": {"nodeName": f"node-{name}", "containers": [{"name": "nvidia-dcgm-exporter",
                                                                 "ports": [{"containerPort": 9400}]}]},
            "status": status}


def _slice(name: str, endpoints: list[tuple[str, bool]], rv: str = "1") -> dict:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": name, "namespace": "gpu-operator", "resourceVersion": rv,
                         "labels": {"kubernetes.io/service-name": "nvidia-dcgm-exporter"}},
            "ports": [{"name": "gpu-metrics", "port": 9400, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": ready, "serving": ready},
                           "targetRef": {"kind": "Pod", "name": f"pod-{ip}"}} for ip, ready in endpoints]}


class FakeKubeAPI:
    """Answers list calls with the current list and watch calls from a script of event batches."""

    def __init__(self, path: str, kind: str):
        self.path, self.kind = path, kind
        self.items: list[dict] = []
        self.rv = "100"
        self.watches: queue.Queue = queue.Queue()  # each watch call streams the next batch of events, then ends
        self.requests: list[dict] = []
        self.release = threading.Event()
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802
                url = urlsplit(self.path)
                q = {k: v[0] for k, v in parse_qs(url.query).items()}
                api.requests.append({"path": url.path, **q})
                if url.path != api.path:
                    return self._json(404, {"kind": "Status", "code": 404, "reason": "NotFound"})
                if q.get("watch", "").lower() not in ("true", "1"):
                    return self._json(200, {"kind": api.kind + "List", "apiVersion": "v1",
                                            "metadata": {"resourceVersion": api.rv}, "items": api.items})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                script = []
                while not api.release.is_set():
                    try:
                        script = api.watches.get(timeout=0.2)
                        break
                    except queue.Empty:
                        continue
                for event in script:
                    line = (json.dumps(event) + "\n").encode()
                    self.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")

            def _json(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.release.set()
        self.server.shutdown()


def _until(fn, expected, timeout_s: float = 20):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = fn()
        if got == expected:
            return got
        time.sleep(0.05)
    return fn()


@pytest.fixture
def pods_api():
    api = FakeKubeAPI("/api/v1/namespaces/gpu-operator/pods", "Pod")
    yield api
    api.close()


def test_pods_are_listed_then_watched_as_they_come_and_go(pods_api):
    api = pods_api
    api.items = [_pod("exp-a", "10.0.0.1"), _pod("exp-b", None, phase="Pending")]
    api.watches.put([
        {"type": "MODIFIED", "object": _pod("exp-b", "10.0.0.2", rv="101")},
        {"type": "ADDED", "object": _pod("exp-c", "10.0.0.3", rv="102")},
        {"type": "BOOKMARK", "object": {"kind": "Pod", "metadata": {"resourceVersion": "103"}}},
        {"type": "DELETED", "object": _pod("exp-a", "10.0.0.1", rv="104")},
        {"type": "MODIFIED", "object": _pod("exp-c", "10.0.0.3", rv="105", deleting=True)},
    ])
    api.watches.put([{"type": "ADDED", "object": _pod("exp-d", "10.0.0.4", rv="106")}])
    targets = KubernetesTargets(kubernetes_client(api.url), namespace="gpu-operator",
                                selector="app=nvidia-dcgm-exporter", port=9400, watch_timeout_s=30)
    targets.start()
    try:
        assert targets.wait_synced(20)
        final = ["http://10.0.0.2:9400/metrics", "http://10.0.0.4:9400/metrics"]
        seen = _until(targets.current, final)
        assert seen == final
        api.items = [_pod("exp-b", "10.0.0.2"), _pod("exp-e", "10.0.0.5")]
        api.rv = "200"
        # the API server expired our resourceVersion: list again, then watch from the new one
        api.watches.put([{"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                                      "message": "too old resource version: 106 (150)",
                                                      "reason": "Expired", "code": 410}}])
        relisted = ["http://10.0.0.2:9400/metrics", "http://10.0.0.5:9400/metrics"]
        assert _until(targets.current, relisted) == relisted  # exp-d vanished while unwatched: dropped on relist
    finally:
        targets.stop()
    lists = [r for r in api.requests if r.get("watch", "").lower() not in ("true", "1")]
    watches = [r for r in api.requests if r.get("watch", "").lower() in ("true", "1")]
    assert all(r["labelSelector"] == "app=nvidia-dcgm-exporter" for r in api.requests)
    assert len(lists) >= 2  # the first list, and the relist after the expired watch
    assert watches[0]["resourceVersion"] == "100"  # watched from the list's resourceVersion
    assert watches[1]["resourceVersion"] == "105"  # resumed from the last event seen, not relisted
    assert watches[2]["resourceVersion"] == "106"
    assert watches[3]["resourceVersion"] == "200"  # after the relist


def test_endpointslices_give_ready_endpoints_only():
    api = FakeKubeAPI("/apis/discovery.k8s.io/v1/namespaces/gpu-operator/endpointslices", "EndpointSlice")
    try:
        api.items = [_slice("dcgm-abc", [("10.1.0.1", True), ("10.1.0.2", False)])]
        api.watches.put([{"type": "MODIFIED", "object": _slice("dcgm-abc", [("10.1.0.1", True), ("10.1.0.2", True),
                                                                              ("10.1.0.3", True)], rv="101")}])
        targets = KubernetesTargets(kubernetes_client(api.url), role="endpointslice",
                                    selector="kubernetes.io/service-name=nvidia-dcgm-exporter", port=9400).start()
        try:
            assert targets.wait_synced(20)
            want = [f"http://10.1.0.{i}:9400/metrics" for i in (1, 2, 3)]
            assert _until(targets.current, want) == want
        finally:
            targets.stop()
        assert api.requests[0]["labelSelector"] == "kubernetes.io/service-name=nvidia-dcgm-exporter"
    finally:
        api.close()


def test_api_server_down_keeps_targets_and_retries(pods_api):
    api = pods_api
    api.items = [_pod("exp-a", "10.0.0.1")]
    targets = KubernetesTargets(kubernetes_client(api.url), retry_max_s=0.2, watch_timeout_s=1).start()
    try:
        assert targets.wait_synced(20)
        api.server.shutdown()
        api.server.server_close()
        api.release.set()
        time.sleep(0.5)  # let a watch or two fail against the closed port
        assert targets.current() == ["http://10.0.0.1:9400/metrics"]
    finally:
        targets.stop()

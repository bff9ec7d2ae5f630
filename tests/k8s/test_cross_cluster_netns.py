"""Cross-cluster deployment simulated on one machine with Linux network namespaces.

Four namespaces stand in for separate hosts: "edge" runs a streamer, "central" runs PostgreSQL, a
collector and the API, "redis" runs Redis, and "wan" sits between them with a delaying TCP relay
(25 ms ± 5 ms each way; this kernel has no netem). Edge and central reach Redis only through the
relay, over TCP between namespace addresses in 198.18.0.0/15 (the benchmarking range). Then the
edge↔wan link is cut for 10 s mid-stream and restored: nothing may be lost or duplicated.

It runs twice: with the roles as processes, and as containers of the images (k8s/scripts/build-image.sh),
the streamer in the edge namespace and collector + API in the central one (`podman run --network
ns:/run/netns/NAME`), hardened like the chart's pods.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from pathlib import Path

import pytest
from containers import CHART_ENV, HARDENED, podman_argv, podman_env

from telemetry_nb.embedded import redis_server_binary
from telemetry_nb.timeparse import parse_timestamp
from tests.conftest import REAL_CSV, REPO, require

PREFIX = f"tnb{uuid.uuid4().hex[:4]}"
NS = {name: f"{PREFIX}-{name}" for name in ("edge", "central", "redis", "wan")}
# one /30 per link: wan side .1, host side .2
LINKS = {"edge": "198.18.1", "central": "198.18.2", "redis": "198.18.3"}
REDIS_PORT, PG_PORT, API_PORT = 6379, 5432, 8000
DELAY_S, JITTER_S = 0.025, 0.005


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _in(ns: str, argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", NS[ns], *argv], capture_output=True, text=True, **kw)


class Topology:
    """Create the namespaces, veth links and addresses; remove everything again on `close()`."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []
        self.containers: list[str] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="tnb-netns-"))
        self.tmp.chmod(0o755)
        for ns in NS.values():
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        for host, net in LINKS.items():
            a, b = f"{PREFIX}{host[0]}h", f"{PREFIX}{host[0]}w"
            _ip("link", "add", a, "type", "veth", "peer", "name", b)
            _ip("link", "set", a, "netns", NS[host])
            _ip("link", "set", b, "netns", NS["wan"])
            _ip("-n", NS[host], "addr", "add", f"{net}.2/30", "dev", a)
            _ip("-n", NS["wan"], "addr", "add", f"{net}.1/30", "dev", b)
            _ip("-n", NS[host], "link", "set", a, "up")
            _ip("-n", NS["wan"], "link", "set", b, "up")

    def host_link(self, host: str) -> str:
        return f"{PREFIX}{host[0]}h"

    def start(self, ns: str, argv: list[str], name: str, env: dict | None = None) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "w")
        proc = subprocess.Popen(["ip", "netns", "exec", NS[ns], *argv], stdout=log, stderr=subprocess.STDOUT,
                                env=env or os.environ.copy(), cwd=REPO)
        self.procs.append(proc)
        return proc

    def start_container(self, ns: str, image: str, args: list[str], name: str, env: dict[str, str],
                        volumes: tuple[str, ...] = ()) -> subprocess.Popen:
        """`podman run` (attached, so its output is the log) inside namespace `ns`'s network."""
        cname = f"{PREFIX}-{name}"
        self.containers.append(cname)
        argv = podman_argv("run", "--rm", "--name", cname, *HARDENED, f"--network=ns:/run/netns/{NS[ns]}",
                           *[f"--env={k}={v}" for k, v in {**CHART_ENV, **env}.items()],
                           *[f"--volume={v}" for v in volumes], image, *args)
        log = open(self.tmp / f"{name}.log", "w")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=podman_env(), cwd=REPO)
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text() if path.exists() else ""

    def close(self) -> None:
        if self.containers:  # one call: podman stops them in parallel
            subprocess.run(podman_argv("rm", "-f", "-t", "5", *self.containers), capture_output=True,
                           env=podman_env(), timeout=120)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        # PostgreSQL daemonizes: stop it by its data folder
        pg = self.tmp / "central" / "postgres"
        if (pg / "postmaster.pid").exists():
            from telemetry_nb.embedded import Embedded
            Embedded(self.tmp / "central", host=f"{LINKS['central']}.2").stop()
        for ns in NS.values():
            subprocess.run(["ip", "netns", "pids", ns], capture_output=True)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(self.tmp, ignore_errors=True)


def _wait(cond, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


PY = sys.executable
FETCH = r"""
import httpx, json, sys
base = sys.argv[1]
gpus, cursor = [], None
while True:
    page = httpx.get(base + "/api/v1/gpus", params={"limit": 1000, **({"cursor": cursor} if cursor else {})}).json()
    gpus += page["items"]; cursor = page["next_cursor"]
    if cursor is None: break
rows = {}
for g in gpus:
    items, cursor = [], None
    while True:
        body = httpx.get(f"{base}/api/v1/gpus/{g['uuid']}/telemetry",
                         params={"limit": 10000, **({"cursor": cursor} if cursor else {})}).json()
        items += body["items"]; cursor = body["next_cursor"]
        if cursor is None: break
    rows[g["uuid"]] = [(i["timestamp"], i["metric"], i["value"]) for i in items]
print(json.dumps(rows))
"""


@pytest.fixture
def topology():
    require(os.geteuid() == 0, "network namespaces need root")
    require(shutil.which("ip") is not None, "iproute2 ('ip') is not installed")
    require(REAL_CSV.is_file(), f"real DCGM export not found at {REAL_CSV}")
    topo = Topology()
    try:
        yield topo
    finally:
        topo.close()


@pytest.mark.parametrize("roles", ["processes", "containers"])
def test_edge_and_central_through_a_delayed_wan_with_a_cut_link(topology, roles, request):
    t = topology
    images = request.getfixturevalue("images") if roles == "containers" else None
    redis_host, central, edge_gw, central_gw = (f"{LINKS['redis']}.2", f"{LINKS['central']}.2",
                                                f"{LINKS['edge']}.1", f"{LINKS['central']}.1")
    # redis host: a real redis-server bound to its namespace address
    t.start("redis", [str(redis_server_binary()), "--bind", redis_host, "--port", str(REDIS_PORT),
                      "--protected-mode", "no", "--save", "", "--appendonly", "no"], "redis")
    # wan: one delaying relay per path to Redis
    for gw in (edge_gw, central_gw):
        t.start("wan", [PY, "-m", "tests.relay", "--listen", f"{gw}:{REDIS_PORT}",
                        "--target", f"{redis_host}:{REDIS_PORT}", "--delay", str(DELAY_S),
                        "--jitter", str(JITTER_S)], f"relay-{gw}")
    # central: PostgreSQL (embedded, listening on the namespace address), collector, API
    pg = _in("central", [PY, "-m", "telemetry_nb.cli", "embedded", "env", "--services", "postgresql",
                         "--host", central, "--home", str(t.tmp / "central")], timeout=120)
    assert pg.returncode == 0, pg.stderr
    database_url = pg.stdout.strip().split("DATABASE_URL=", 1)[1]
    stream = f"xc-{uuid.uuid4().hex[:6]}"
    central_env = {**os.environ, "REDIS_URL": f"redis://{central_gw}:{REDIS_PORT}/0", "DATABASE_URL": database_url,
                   "TELEMETRY_STREAM": stream, "TELEMETRY_VISIBILITY_TIMEOUT": "5"}
    edge_env = {**os.environ, "REDIS_URL": f"redis://{edge_gw}:{REDIS_PORT}/0", "TELEMETRY_STREAM": stream,
                "TELEMETRY_BATCH_SIZE": "50", "TELEMETRY_RETRY_MAX": "2"}
    for env in (central_env, edge_env):
        env.pop("TELEMETRY_NB_HOME", None)

    # the delay is really there: a PING from the edge through the wan takes ≥ 40 ms
    ping = _in("edge", [PY, "-c", "import redis, time, sys; r = redis.Redis(host=sys.argv[1], port=int(sys.argv[2]));"
                        "r.ping(); t = time.perf_counter(); [r.ping() for _ in range(5)];"
                        "print((time.perf_counter() - t) / 5)", edge_gw, str(REDIS_PORT)], timeout=30)
    assert ping.returncode == 0, ping.stderr
    rtt = float(ping.stdout.strip())
    assert 0.040 <= rtt < 0.5, rtt
    # and edge cannot reach Redis or central directly: only through the relay
    direct = _in("edge", [PY, "-c", "import socket, sys; socket.create_connection((sys.argv[1], 6379), timeout=2)",
                          redis_host], timeout=30)
    assert direct.returncode != 0

    serve = ["serve", "--host", central, "--port", str(API_PORT)]
    if images:
        # the database URL names the central address, which the central namespace's containers share
        c_env = {k: central_env[k] for k in ("REDIS_URL", "DATABASE_URL", "TELEMETRY_STREAM",
                                             "TELEMETRY_VISIBILITY_TIMEOUT")}
        t.start_container("central", images.services, ["collect"], "collector", c_env)
        t.start_container("central", images.services, serve, "api", c_env)
    else:
        t.start("central", [PY, "-m", "telemetry_nb.cli", "collect"], "collector", env=central_env)
        t.start("central", [PY, "-m", "telemetry_nb.cli", *serve], "api", env=central_env)
    api = f"http://{central}:{API_PORT}"
    _wait(lambda: _in("central", [PY, "-c", "import httpx, sys; httpx.get(sys.argv[1]).raise_for_status()",
                                  api + "/health"], timeout=20).returncode == 0, 60, "the API")

    # edge: stream the real export at 200 rows/s; cut the edge link for 10 s in the middle
    if images:
        e_env = {k: edge_env[k] for k in ("REDIS_URL", "TELEMETRY_STREAM", "TELEMETRY_BATCH_SIZE",
                                          "TELEMETRY_RETRY_MAX")}
        streamer = t.start_container("edge", images.services, ["stream", "--csv", "/data/dcgm.csv", "--rate", "200"],
                                     "streamer", e_env, volumes=(f"{REAL_CSV}:/data/dcgm.csv:ro",))
    else:
        streamer = t.start("edge", [PY, "-m", "telemetry_nb.cli", "stream", "--csv", str(REAL_CSV), "--rate", "200"],
                           "streamer", env=edge_env)
    _wait(lambda: "Published" in t.log("streamer"), 60, "the first published batch")
    time.sleep(2)
    _ip("-n", NS["edge"], "link", "set", t.host_link("edge"), "down")
    time.sleep(10)
    assert streamer.poll() is None  # still trying, not crashed
    _ip("-n", NS["edge"], "link", "set", t.host_link("edge"), "up")
    assert streamer.wait(timeout=240) == 0, t.log("streamer")[-3000:]
    log = t.log("streamer")
    assert "published=2470 rejected=0" in log
    assert "Redis unavailable" in log  # it noticed the outage and retried

    expected: dict[str, list] = defaultdict(list)
    with open(REAL_CSV, newline="", encoding="utf-8-sig") as fh:
        for r in csv.DictReader(fh):
            ts = parse_timestamp(r["timestamp"]).isoformat().replace("+00:00", "Z")
            expected[r["uuid"]].append((ts, r["metric_name"], float(r["value"])))

    def fetch() -> dict:
        out = _in("central", [PY, "-c", FETCH, api], timeout=120)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def complete() -> bool:
        return sum(len(v) for v in fetch().values()) >= 2470

    _wait(complete, 120, "all 2,470 rows to reach the API")
    got = fetch()
    assert set(got) == set(expected) and len(got) == 247
    for uuid_, rows in got.items():  # every row exactly once, with its exact timestamp and value
        assert sorted(map(tuple, rows)) == sorted(expected[uuid_])

"""A local Redis Cluster from the embedded `redis-server`: for tests and `bench/ingest.py --partitions`.

`masters` nodes in cluster mode, each with its own port and folder (AOF on, so a node killed with
SIGKILL and started again on the same port and folder comes back with its data and its `nodes.conf`);
slots are assigned with CLUSTER ADDSLOTS and the nodes met with CLUSTER MEET through a client, as
`redis-cli --cluster create` does. No replicas: a killed master's slots are down until it returns.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import redis

from telemetry_nb.embedded import port_free, redis_server_binary

SLOTS = 16384


def _cluster_ports(host: str, n: int) -> list[int]:
    """`n` ports free together with their cluster bus ports (+10000), which must stay below 65536."""
    rng = random.Random()
    ports: list[int] = []
    while len(ports) < n:
        port = rng.randrange(20000, 45000)
        if port not in ports and port_free(host, port) and port_free(host, port + 10000):
            ports.append(port)
    return ports


class LocalCluster:
    """Start with `start()` (or `with LocalCluster(root) as c:`); `url` is a `redis+cluster://` URL."""

    def __init__(self, root: str | Path, masters: int = 3, *, host: str = "127.0.0.1", node_timeout_ms: int = 2000):
        if masters < 1:
            raise ValueError("a cluster needs at least one master")
        self.root = Path(root)
        self.host = host
        self.node_timeout_ms = node_timeout_ms
        self.ports = _cluster_ports(host, masters)
        self.procs: list[subprocess.Popen | None] = [None] * masters

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{self.host}:{p}" for p in self.ports)

    def node(self, i: int) -> redis.Redis:
        """A plain client of node `i` (for cluster admin commands)."""
        return redis.Redis(self.host, self.ports[i], socket_timeout=5, socket_connect_timeout=5)

    def start(self, timeout_s: float = 30.0) -> LocalCluster:
        for i in range(len(self.ports)):
            self.start_node(i)
        for i, client in enumerate(self.node(i) for i in range(len(self.ports))):
            with client:
                client.execute_command("CLUSTER", "SET-CONFIG-EPOCH", i + 1)
                lo, hi = i * SLOTS // len(self.ports), (i + 1) * SLOTS // len(self.ports)
                client.execute_command("CLUSTER", "ADDSLOTS", *range(lo, hi))
        with self.node(0) as first:
            for port in self.ports[1:]:
                first.execute_command("CLUSTER", "MEET", self.host, port)
        self.wait_ok(timeout_s)
        return self

    def start_node(self, i: int, timeout_s: float = 15.0) -> None:
        """Start node `i` (again) on its port with its folder: its AOF and nodes.conf bring it back as it was."""
        folder = self.root / f"node-{i}"
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [str(redis_server_binary()), "--port", str(self.ports[i]), "--bind", self.host,
               "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
               "--cluster-node-timeout", str(self.node_timeout_ms), "--dir", str(folder),
               "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--protected-mode", "no",
               "--logfile", str(folder / "redis.log"), "--daemonize", "no"]
        self.procs[i] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout_s
        with self.node(i) as client:
            while True:
                try:
                    client.ping()
                    return
                except (redis.ConnectionError, redis.exceptions.BusyLoadingError):
                    if self.procs[i].poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"Redis Cluster node {i} on port {self.ports[i]} did not start; "
                                           f"see {folder / 'redis.log'}") from None
                    time.sleep(0.05)

    def kill(self, i: int) -> None:
        """SIGKILL node `i`, as a crash would."""
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        self.procs[i] = None

    def restart(self, i: int, timeout_s: float = 30.0) -> None:
        self.start_node(i)
        self.wait_ok(timeout_s)

    def wait_ok(self, timeout_s: float = 30.0) -> None:
        """Until every node says cluster_state:ok and knows every other node."""
        deadline = time.monotonic() + timeout_s
        while True:
            states = []
            for i in range(len(self.ports)):
                try:
                    with self.node(i) as client:
                        info = client.cluster("info")
                    states.append(info.get("cluster_state") == "ok"
                                  and int(info.get("cluster_known_nodes", 0)) == len(self.ports))
                except redis.RedisError:
                    states.append(False)
            if all(states):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"Redis Cluster not ok after {timeout_s:g}s (nodes ok: {states})")
            time.sleep(0.1)

    def stop(self) -> None:
        for i, proc in enumerate(self.procs):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.kill(i)
            self.procs[i] = None

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

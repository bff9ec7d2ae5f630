"""`telemetry-nb demo`: embedded servers + streamer + collector + API (+ dashboard) as one supervised tree."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from telemetry_nb.config import Settings
from telemetry_nb.embedded import Embedded, port_free

log = logging.getLogger(__name__)


@dataclass
class Child:
    """A supervised child process, restarted with backoff when it dies on its own."""

    name: str
    argv: list[str]
    proc: subprocess.Popen | None = None
    restarts: int = 0
    next_start: float = 0.0
    env: dict[str, str] = field(default_factory=dict)

    def start(self) -> None:
        log.info("Starting %s: %s", self.name, " ".join(self.argv[1:]))
        self.proc = subprocess.Popen(self.argv, env=self.env, start_new_session=True)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "telemetry_nb.cli", *args]


def run_demo(args: argparse.Namespace, settings: Settings) -> int:
    ports = [("--port", args.port)] + ([] if args.no_dashboard else [("--dashboard-port", args.dashboard_port)])
    for flag, port in ports:
        if not port_free("127.0.0.1", port):
            print(f"error: port {port} is already in use (another demo?); choose another with {flag}",
                  file=sys.stderr)
            return 2
    home = Path(settings.home).absolute()
    emb = Embedded(home)
    was_running = emb.status()
    env_urls = emb.env()
    env = {**os.environ, **env_urls, "TELEMETRY_NB_HOME": str(home)}
    csv_path = args.csv
    if csv_path is None:
        csv_path = str(home / "demo.csv")
        if not Path(csv_path).exists():
            log.info("Generating sample data (%d hosts x %d GPUs, 10 minutes at 1 s) into %s",
                     args.hosts, args.gpus_per_host, csv_path)
            subprocess.run(_cli("generate", "--hosts", str(args.hosts), "--gpus-per-host", str(args.gpus_per_host),
                                "--duration", "10m", "--interval", "1s", "--namespaces", "4", "--out", csv_path),
                           check=True, env=env)
    elif not Path(csv_path).is_file():
        print(f"error: CSV file not found: {csv_path}", file=sys.stderr)
        return 2
    api = f"http://127.0.0.1:{args.port}"
    children = [
        Child("streamer", _cli("stream", "--csv", csv_path, "--loop", "--timestamps", "now"), env=env),
        Child("collector", _cli("collect", "--visibility-timeout", "30"), env=env),
        Child("api", _cli("serve", "--port", str(args.port)), env=env),
    ]
    if not args.no_dashboard:
        children.append(Child("dashboard", _cli("dashboard", "--port", str(args.dashboard_port),
                                                "--api-url", api), env=env))
    stopping = False

    def stop(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    for c in children:
        c.start()
    print(f"\ntelemetry-nb demo is running (data in {home})\n"
          f"  API:        {api}/api/v1/gpus\n"
          f"  API docs:   {api}/docs\n"
          + ("" if args.no_dashboard else f"  Dashboard:  http://127.0.0.1:{args.dashboard_port}\n")
          + f"  Redis:      {env_urls['REDIS_URL']}\n  PostgreSQL: {env_urls['DATABASE_URL']}\n"
          "Press Ctrl-C to stop.\n", flush=True)
    try:
        while not stopping:
            time.sleep(0.5)
            for c in children:
                if c.proc is not None and c.proc.poll() is not None and not stopping:
                    delay = min(30.0, 2.0 ** min(c.restarts, 5))
                    log.warning("%s exited with code %s; restarting in %.0fs", c.name, c.proc.returncode, delay)
                    c.proc, c.restarts, c.next_start = None, c.restarts + 1, time.monotonic() + delay
                if c.proc is None and time.monotonic() >= c.next_start and not stopping:
                    c.start()
    finally:
        log.info("Stopping the demo")
        for c in children:
            if c.proc is not None and c.proc.poll() is None:
                c.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for c in children:
            if c.proc is not None:
                try:
                    c.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    c.proc.kill()
        if not (was_running["redis"]["running"] and was_running["postgresql"]["running"]):
            emb.stop()
            log.info("Embedded servers stopped; data kept in %s", home)
    return 0

"""`telemetry-nb demo`: embedded servers + a source (fake exporter + scraper, your exporters, or a CSV replay)
+ collector + API (+ dashboard) as one supervised tree."""

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
    dashboard_note = ""
    if not args.no_dashboard:
        from telemetry_nb.extras import missing_notebook_modules, notebooks_extra_message

        missing = missing_notebook_modules()
        if missing:  # the services still run: say clearly what is left out and how to get it
            dashboard_note = notebooks_extra_message("not started: the dashboard", missing)
            log.warning("Running the demo without the dashboard: %s", dashboard_note)
            args.no_dashboard = True
    ports = [("--port", args.port)] + ([] if args.no_dashboard else [("--dashboard-port", args.dashboard_port)])
    for flag, port in ports:
        if not port_free("127.0.0.1", port):
            print(f"error: port {port} is already in use (another demo?); choose another with {flag}",
                  file=sys.stderr)
            return 2
    scrape = list(getattr(args, "scrape", None) or [])
    if args.csv is not None and scrape:
        print("error: give --csv or --scrape, not both", file=sys.stderr)
        return 2
    if args.csv is not None and not Path(args.csv).is_file():
        print(f"error: CSV file not found: {args.csv}", file=sys.stderr)
        return 2
    home = Path(settings.home).absolute()
    emb = Embedded(home)
    was_running = emb.status()
    env_urls = emb.env()
    # the demo runs without API tokens, whatever the shell that starts it has configured
    env = {k: v for k, v in os.environ.items() if k not in ("TELEMETRY_API_TOKENS", "TELEMETRY_API_TOKENS_FILE")}
    env = {**env, **env_urls, "TELEMETRY_NB_HOME": str(home)}
    api = f"http://127.0.0.1:{args.port}"
    if args.csv is not None:  # replay a CSV export, re-stamped to now
        csv_path = args.csv
        source = [Child("streamer", _cli("stream", "--csv", csv_path, "--loop", "--timestamps", "now"), env=env)]
    elif scrape:  # real dcgm-exporters
        source = [Child("scraper", _cli("scrape", *[a for url in scrape for a in ("--target", url)],
                                        "--interval", args.scrape_interval), env=env)]
    else:  # the scrape path, against a built-in fake exporter serving generated GPUs
        from telemetry_nb.embedded import free_port
        from telemetry_nb.sources.fake_exporter import target_urls

        port = free_port()
        urls = target_urls(f"http://127.0.0.1:{port}", args.hosts)
        log.info("Serving %d fake dcgm-exporters (%d GPUs each) on port %d", args.hosts, args.gpus_per_host, port)
        source = [Child("exporter", _cli("fake-exporter", "--port", str(port), "--targets", str(args.hosts),
                                         "--gpus", str(args.gpus_per_host), "--fields", "11"), env=env),
                  Child("scraper", _cli("scrape", *[a for url in urls for a in ("--target", url)],
                                        "--interval", args.scrape_interval), env=env)]
    children = [
        *source,
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
          + (f"  Dashboard:  {dashboard_note}\n" if dashboard_note else "")
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

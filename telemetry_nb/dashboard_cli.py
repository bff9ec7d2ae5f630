"""`telemetry-nb dashboard`: serve notebooks/dashboard.ipynb with Voilà against an API."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path


def notebooks_dir() -> Path:
    """The notebooks folder: $TELEMETRY_NOTEBOOKS, the repository's, or /app/notebooks in the image."""
    candidates = [os.environ.get("TELEMETRY_NOTEBOOKS", ""), str(Path(__file__).resolve().parent.parent / "notebooks"),
                  "/app/notebooks"]
    for c in candidates:
        if c and (Path(c) / "dashboard.ipynb").exists():
            return Path(c)
    raise FileNotFoundError("notebooks/dashboard.ipynb not found; set TELEMETRY_NOTEBOOKS to the notebooks folder")


def voila_command(port: int, host: str = "127.0.0.1", notebook: Path | None = None) -> list[str]:
    nb = notebook or notebooks_dir() / "dashboard.ipynb"
    return [sys.executable, "-m", "voila", str(nb), f"--port={port}", f"--Voila.ip={host}", "--no-browser",
            "--show_tracebacks=True"]


def cmd_dashboard(args: argparse.Namespace) -> int:
    env = dict(os.environ)
    if args.api_url:
        env["TELEMETRY_API_URL"] = args.api_url
    env.setdefault("TELEMETRY_API_URL", "http://127.0.0.1:8000")
    return subprocess.call(voila_command(args.port, args.host, Path(args.notebook) if args.notebook else None),
                           env=env)


def add_parser(sub, common) -> None:
    p = sub.add_parser("dashboard", help="serve the Voilà dashboard",
                       description="Serve notebooks/dashboard.ipynb with Voilà (no code cells shown).")
    p.add_argument("--port", type=int, default=8866, help="port (default 8866)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--api-url", help="API base URL (default $TELEMETRY_API_URL or http://127.0.0.1:8000)")
    p.add_argument("--notebook", help="dashboard notebook (default notebooks/dashboard.ipynb)")
    p.add_argument("--log-level", default="INFO", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_dashboard)

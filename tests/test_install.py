"""The slim service install: `pip install <repo>` into a fresh venv gives streamer, collector, API and CLI,
runs them on the embedded servers, and carries no notebook stack (Jupyter, pandas, Voilà, Kubernetes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from telemetry_nb.embedded import free_port
from tests.conftest import REPO, wait_http

NOTEBOOK_STACK = ("jupyterlab", "pandas", "voila", "altair", "vl_convert", "ipykernel", "ipywidgets", "papermill",
                  "kubernetes")


def _du_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / 1e6


def test_core_install_runs_the_services_without_jupyter(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py, cli = venv / "bin" / "python", venv / "bin" / "telemetry-nb"
    # a real install from the checkout (pip's wheel cache keeps it quick); the index is pip's own configuration
    pip = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(REPO)],
                         capture_output=True, text=True, timeout=900)
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]
    size = _du_mb(venv)
    print(f"core install: {size:.0f} MB in {venv}")

    env = {k: v for k, v in os.environ.items()
           if k not in ("REDIS_URL", "DATABASE_URL", "PYTHONPATH", "VIRTUAL_ENV", "TELEMETRY_API_TOKENS",
                        "TELEMETRY_API_TOKENS_FILE", "TELEMETRY_API_URL", "TELEMETRY_API_TOKEN")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", TELEMETRY_NB_HOME=str(tmp_path / "home"),
               PYTHONUNBUFFERED="1")

    def run(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(cli), *args], env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=timeout)
        if check:
            assert proc.returncode == 0, f"telemetry-nb {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
        return proc

    # the notebook stack is not there (and the checkout is not on the path: the venv's own copy runs)
    for module in NOTEBOOK_STACK:
        probe = subprocess.run([str(py), "-c", f"import {module}"], cwd=tmp_path, env=env, capture_output=True)
        assert probe.returncode != 0, f"{module} is importable from the core install"
    where = subprocess.run([str(py), "-c", "import telemetry_nb; print(telemetry_nb.__file__)"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(venv)), where

    for command in ("stream", "collect", "serve", "check", "generate", "embedded", "demo", "dashboard"):
        assert "usage: telemetry-nb" in run(command, "--help").stdout
    dashboard = run("dashboard", check=False)
    assert dashboard.returncode == 2 and "telemetry-nb[notebooks]" in dashboard.stderr, dashboard.stderr

    # a tiny real run on the embedded servers this install ships
    csv = tmp_path / "tiny.csv"
    run("generate", "--hosts", "1", "--gpus-per-host", "2", "--duration", "5s", "--interval", "1s",
        "--out", str(csv))
    try:
        assert "published=100 rejected=0" in run("stream", "--csv", str(csv)).stdout
        assert "stored=100" in run("collect", "--drain").stdout
        port = free_port()
        with open(tmp_path / "serve.log", "w") as log:
            server = subprocess.Popen([str(cli), "serve", "--port", str(port)], env=env, cwd=tmp_path, stdout=log,
                                      stderr=subprocess.STDOUT)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_http(base + "/health", timeout_s=60)
            gpus = httpx.get(f"{base}/api/v1/gpus", timeout=10).json()["items"]
            assert len(gpus) == 2
            assert httpx.get(f"{base}/ready", timeout=10).json()["status"] == "ready"
            assert run("check").returncode == 0
        finally:
            server.terminate()
            server.wait(timeout=15)
        # the demo runs the services without the extra and says what it left out
        demo_port = free_port()
        with open(tmp_path / "demo.log", "w") as log:
            demo = subprocess.Popen([str(cli), "demo", "--port", str(demo_port), "--hosts", "1",
                                     "--gpus-per-host", "1"], env=env, cwd=tmp_path, stdout=log,
                                    stderr=subprocess.STDOUT)
        try:
            wait_http(f"http://127.0.0.1:{demo_port}/health", timeout_s=90)
            assert httpx.get(f"http://127.0.0.1:{demo_port}/api/v1/metrics", timeout=10).status_code == 200
        finally:
            demo.send_signal(signal.SIGINT)
            demo.wait(timeout=60)
        out = (tmp_path / "demo.log").read_text()
        assert "Dashboard:  not started: the dashboard needs the notebooks extra" in out, out[-2000:]
        assert "telemetry-nb[notebooks]" in out and "Traceback" not in out
    finally:
        run("embedded", "stop", check=False)

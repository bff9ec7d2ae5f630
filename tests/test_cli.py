"""The CLI as a user meets it: help everywhere, clear errors, the generator, embedded servers, the demo."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict

import httpx
import pytest

from telemetry_nb.cli import build_parser
from telemetry_nb.embedded import Embedded, free_port
from tests.conftest import REPO, run_cli

COMMANDS = [c for c in build_parser()._subparsers._group_actions[0].choices]


def test_every_command_is_listed():
    assert set(COMMANDS) >= {"demo", "generate", "stream", "collect", "serve", "embedded", "check", "dashboard"}


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_on_every_command(command, cli_env):
    args = ["--help"] if command is None else [command, "--help"]
    out = run_cli(*args, env=cli_env)
    assert out.stdout.startswith("usage: telemetry-nb")
    assert "--help" in out.stdout


def test_missing_csv_is_a_clear_error(cli_env, redis_client, stream):
    out = run_cli("stream", "--csv", "/no/such/file.csv", env=cli_env, check=False)
    assert out.returncode == 2
    assert out.stderr.strip() == "error: CSV file not found: /no/such/file.csv"
    assert redis_client.exists(stream) == 0


def test_directory_instead_of_csv(cli_env, tmp_path):
    out = run_cli("stream", "--csv", str(tmp_path), env=cli_env, check=False)
    assert out.returncode == 2 and "not a file" in out.stderr


def test_unreadable_csv(cli_env, tmp_path):
    path = tmp_path / "locked.csv"
    path.write_text("timestamp\n")
    path.chmod(0)
    if os.geteuid() == 0:  # root reads any mode-000 file; this procfs file refuses reads even to root
        path = "/proc/self/clear_refs"
    out = run_cli("stream", "--csv", str(path), env=cli_env, check=False)
    assert out.returncode == 2
    assert "not readable" in out.stderr or "cannot read CSV file" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_missing_header_columns_publish_nothing(cli_env, tmp_path, redis_client, stream):
    path = tmp_path / "bad.csv"
    path.write_text("timestamp,metric_name,gpu_id,device,modelName,Hostname\n2025-07-18T20:42:34Z,M,0,d,m,h\n")
    out = run_cli("stream", "--csv", str(path), env=cli_env, check=False)
    assert out.returncode == 2
    assert "missing required column(s): uuid, value" in out.stderr
    assert redis_client.exists(stream) == 0


def test_bad_rows_summary_and_rejected_stream(cli_env, tmp_path, redis_client, stream):
    path = tmp_path / "mixed.csv"
    path.write_text('timestamp,metric_name,gpu_id,uuid,Hostname,value\n'
                    '2025-07-18T20:42:34Z,M,0,GPU-1,h,1\n'
                    '2025-07-18T20:42:35Z,M,0,GPU-1,h,N/A\n'
                    'not-a-time,M,0,GPU-1,h,3\n'
                    '2025-07-18T20:42:37Z,M,0,GPU-1,h,4\n')
    out = run_cli("stream", "--csv", str(path), env=cli_env)
    assert out.stdout.strip().splitlines()[-1] == "published=2 rejected=2"
    assert "Rejected line 3: non-numeric value 'N/A'" in out.stderr
    assert "Rejected line 4: unparseable timestamp 'not-a-time'" in out.stderr
    rejected = redis_client.xrange(f"{stream}:rejected")
    assert [(f[b"line"], f[b"reason"]) for _, f in rejected] == [
        (b"3", b"non-numeric value 'N/A'"), (b"4", b"unparseable timestamp 'not-a-time'")]


def test_generator_values_are_plausible(cli_env, tmp_path):
    path = tmp_path / "gen.csv"
    run_cli("generate", "--hosts", "3", "--gpus-per-host", "4", "--duration", "30s", "--out", str(path),
            env=cli_env)
    rows = list(csv.DictReader(open(path, newline="")))
    assert len(rows) == 3 * 4 * 30 * 10
    assert len({r["uuid"] for r in rows}) == 12 and len({r["Hostname"] for r in rows}) == 3
    by = defaultdict(dict)
    for r in rows:
        by[(r["uuid"], r["timestamp"])][r["metric_name"]] = float(r["value"])
    util_by_gpu = defaultdict(list)
    for (uuid, _), m in by.items():
        assert m["DCGM_FI_DEV_FB_USED"] + m["DCGM_FI_DEV_FB_FREE"] == 81559
        assert 0 <= m["DCGM_FI_DEV_GPU_UTIL"] <= 100
        assert 20 <= m["DCGM_FI_DEV_GPU_TEMP"] <= 95
        assert 50 <= m["DCGM_FI_DEV_POWER_USAGE"] <= 750
        util_by_gpu[uuid].append(m["DCGM_FI_DEV_GPU_UTIL"])
    means = [sum(v) / len(v) for v in util_by_gpu.values()]
    assert any(x < 5 for x in means) and any(x > 50 for x in means)  # idle and busy GPUs


def test_generate_rejects_bad_duration(cli_env, tmp_path):
    out = run_cli("generate", "--duration", "ten minutes", "--out", str(tmp_path / "x.csv"), env=cli_env,
                  check=False)
    assert out.returncode == 2 and "invalid duration 'ten minutes'" in out.stderr


def test_embedded_lifecycle_keeps_data(tmp_path):
    home = tmp_path / "emb"
    env = {**os.environ, "TELEMETRY_NB_HOME": str(home)}
    env.pop("REDIS_URL", None)
    env.pop("DATABASE_URL", None)
    try:
        line = run_cli("embedded", "env", env=env).stdout.strip()
        assert line.startswith("export REDIS_URL=redis://127.0.0.1:") and " DATABASE_URL=postgresql://" in line
        urls = dict(part.split("=", 1) for part in line.removeprefix("export ").split())
        import psycopg
        import redis
        redis.Redis.from_url(urls["REDIS_URL"]).set("kept", "yes")
        with psycopg.connect(urls["DATABASE_URL"], autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (x int)")
            conn.execute("INSERT INTO kept VALUES (42)")
        assert run_cli("embedded", "status", env=env).returncode == 0
        run_cli("embedded", "stop", env=env)
        assert run_cli("embedded", "status", env=env, check=False).returncode == 3
        line = run_cli("embedded", "env", env=env).stdout.strip()
        urls = dict(part.split("=", 1) for part in line.removeprefix("export ").split())
        assert redis.Redis.from_url(urls["REDIS_URL"]).get("kept") == b"yes"
        with psycopg.connect(urls["DATABASE_URL"]) as conn:
            assert conn.execute("SELECT x FROM kept").fetchone() == (42,)
    finally:
        Embedded(home).stop()


def test_demo_serves_live_data_within_30s(tmp_path):
    home = tmp_path / "demo-home"
    port = free_port()
    env = {**os.environ, "TELEMETRY_NB_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    env.pop("REDIS_URL", None)
    env.pop("DATABASE_URL", None)
    log = open(tmp_path / "demo.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "telemetry_nb.cli", "demo", "--port", str(port),
                             "--no-dashboard", "--hosts", "2", "--gpus-per-host", "4"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, cwd=REPO)
    started = time.monotonic()
    try:
        gpus = []
        while time.monotonic() - started < 30:
            try:
                gpus = httpx.get(f"http://127.0.0.1:{port}/api/v1/gpus", timeout=2).json()["items"]
            except (httpx.HTTPError, ValueError):
                gpus = []
            if len(gpus) == 8:
                break
            time.sleep(0.5)
        assert len(gpus) == 8, (tmp_path / "demo.log").read_text()[-3000:]
        first = later = gpus[0]["last_seen"]
        deadline = time.monotonic() + 30
        while later <= first and time.monotonic() < deadline:  # live replay: timestamps keep moving forward
            time.sleep(0.25)
            later = httpx.get(f"http://127.0.0.1:{port}/api/v1/gpus/{gpus[0]['uuid']}").json()["last_seen"]
        assert later > first
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=40) == 0
        log.close()
    text = (tmp_path / "demo.log").read_text()
    assert "API:" in text and "Stopping the demo" in text
    assert not Embedded(home).status()["redis"]["running"]


def test_check_command_reports_both_servers(cli_env, real_csv):
    run_cli("stream", "--csv", str(real_csv), env=cli_env)
    run_cli("collect", "--drain", env=cli_env)
    out = run_cli("check", env=cli_env)
    lines = out.stdout.splitlines()
    assert lines[0].startswith("redis      ok") and "backlog=0" in lines[0]
    assert lines[1].startswith("postgresql ok") and "rows=2470 gpus=247" in lines[1]
    broken = run_cli("check", env={**cli_env, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}, check=False)
    assert broken.returncode == 1 and broken.stdout.startswith("redis      FAIL")


def test_unix_socket_redis_url(cli_env, tmp_path, real_csv):
    from telemetry_nb.embedded import redis_server_binary

    sock = tmp_path / "r.sock"
    server = subprocess.Popen([str(redis_server_binary()), "--port", "0", "--unixsocket", str(sock),
                               "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        env = {**cli_env, "REDIS_URL": f"unix://{sock}"}
        out = run_cli("stream", "--csv", str(real_csv), env=env)
        assert out.stdout.strip().endswith("published=2470 rejected=0")
        col = run_cli("collect", "--drain", env=env)
        assert "Stored 2470 rows" in col.stderr
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_demo_refuses_a_busy_port(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {**os.environ, "TELEMETRY_NB_HOME": str(tmp_path / "h")}
        out = run_cli("demo", "--port", str(port), "--no-dashboard", env=env, check=False, timeout=60)
    assert out.returncode == 2 and f"port {port} is already in use" in out.stderr
    assert not (tmp_path / "h").exists()  # nothing started


def test_check_lists_rejected_rows_and_dead_letters(cli_env, tmp_path, redis_client, stream):
    path = tmp_path / "mixed.csv"
    path.write_text("timestamp,metric_name,gpu_id,uuid,Hostname,value\n2025-07-18T20:42:35Z,M,0,GPU-1,h,N/A\n")
    run_cli("stream", "--csv", str(path), env=cli_env)
    redis_client.xadd(stream, {"v": "42", "rows": "?"})  # an entry no collector can decode
    run_cli("collect", "--drain", env=cli_env)
    out = run_cli("check", "--dead", "5", "--rejected", "5", env=cli_env).stdout
    assert "dead=1 rejected=1" in out
    assert f"  rejected {path}:2 non-numeric value 'N/A'" in out
    assert "deliveries=0 unsupported batch encoding version b'42'" in out


def test_serve_with_two_worker_processes(cli_env, tmp_path):
    from tests.conftest import start_cli, wait_http

    port = free_port()
    proc = start_cli("serve", "--port", str(port), "--workers", "2", env=cli_env, log_path=tmp_path / "api.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + "/health")
        with httpx.Client(base_url=base, timeout=10) as http:
            assert all(http.get("/api/v1/gpus").status_code == 200 for _ in range(20))
        workers = subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "spawn_main"], capture_output=True,
                                 text=True).stdout.split()
        assert len(workers) == 2, f"uvicorn should run two worker processes, found {workers}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    log = (tmp_path / "api.log").read_text()
    assert "Traceback" not in log and "2 worker processes" in log, log[-2000:]

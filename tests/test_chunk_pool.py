"""ChunkPool: a CSV file's chunks parsed in worker processes, handed back in file order, started before Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from telemetry_nb.pipeline.chunk_pool import ChunkPool, encode_chunk
from telemetry_nb.sources.dcgm_csv import split_records
from telemetry_nb.sources.generate import generate_rows, write_csv


def _one_process(path, chunk_bytes: int, parser: str) -> list:
    return [encode_chunk(c, 100, (0, 1), None, 1, parser) for c in split_records(path, chunk_bytes)]


@pytest.mark.parametrize("parser", ["fast", "exact"])
@pytest.mark.parametrize("workers", [1, 2])
def test_results_come_in_file_order_as_one_process_encodes_them(real_csv, workers, parser):
    with ChunkPool(str(real_csv), workers, batch_size=100, parser=parser, chunk_bytes=64 << 10) as pool:
        got = list(pool.results())
    expected = _one_process(real_csv, 64 << 10, parser)
    assert len(expected) > 8
    assert got == expected


def test_after_a_stop_no_new_chunk_starts_and_those_in_flight_end(real_csv):
    expected = _one_process(real_csv, 16 << 10, "fast")
    with ChunkPool(str(real_csv), 2, batch_size=100, parser="fast", chunk_bytes=16 << 10) as pool:
        got = list(pool.results(should_stop=lambda: True))
    assert len(expected) > 20
    assert got == expected[:4]  # the first, and the three in flight with it (two per worker)


def test_a_pool_parses_without_the_redis_or_postgresql_client_loaded(real_csv):
    """So that `stream` starts its parsers first and imports and connects to Redis while they work."""
    code = ("import sys; from telemetry_nb.pipeline.chunk_pool import ChunkPool; "
            "pool = ChunkPool(sys.argv[1], 2, batch_size=100, parser='fast'); "
            "rows = sum(n for entries, _, _ in pool.results() for _, n, _ in entries); pool.close(); "
            "print(rows, [m for m in ('redis', 'psycopg') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code, str(real_csv)], capture_output=True, text=True, check=True)
    assert out.stdout.split(maxsplit=1) == ["2470", "[]\n"]


def test_ctrl_c_stops_a_parallel_stream_cleanly(cli_env, tmp_path):
    """Ctrl-C reaches the whole process group: the parser workers leave it to the streamer, which stops."""
    path = tmp_path / "big.csv"
    total = write_csv(path, generate_rows(40, 8, 60, 1.0, seed=3))  # 8 MB: several chunks per worker
    env = {**cli_env, "TELEMETRY_HIGH_WATER": "2", "TELEMETRY_LOG_LEVEL": "INFO"}  # no collector: it waits
    proc = subprocess.Popen([sys.executable, "-m", "telemetry_nb.cli", "stream", "--csv", str(path), "--workers", "2",
                             "--batch-size", "100"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any("Backpressure:" in line for line in lines):
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=60)
    reader.join(timeout=10)  # stderr is the reader's alone: communicate() would take lines from it
    out = proc.stdout.read()
    err = "".join(lines)
    assert "Backpressure:" in err
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert 0 < int(out.split("published=")[1].split()[0]) < total

"""The fast (vectorized) CSV path against the exact one: the same entries, rejected lines and stored rows."""

from __future__ import annotations

import csv
import io
import random
import re
import subprocess
import sys
import uuid as uuidlib
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from telemetry_nb.model import XID_METRIC, Rejected, static_labels
from telemetry_nb.pipeline import codec
from telemetry_nb.pipeline.chunk_pool import encode_chunk
from telemetry_nb.pipeline.codec_columns import encode_columns
from telemetry_nb.pipeline.placement import shard_of
from telemetry_nb.sources.dcgm_csv import (
    HEADER,
    _labels_and_identity,
    read_chunk,
    read_samples,
    split_records,
)
from telemetry_nb.sources.dcgm_fast import FastReader, _carving_holds, _name_carved
from telemetry_nb.sources.generate import generate_rows, write_csv
from telemetry_nb.sources.limits import RowLimits
from tests.conftest import run_cli

T0 = datetime(2025, 7, 18, 20, 42, 34, tzinfo=UTC)
METRICS = ["DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_POWER_USAGE", XID_METRIC]
VALUES = ["0", "42", "100", "-0", "3.14", "0.5", "81003", "0.0001", "0.00001", "1e5", "1E-7", "+1", " 7 ", "1_000",
          "12345678901234567", "123456789012345", "1234567890.12345678", "007", "5.", ".5", "42.50", "-12.0",
          "9007199254740993", "0.1234567890123456", "-99.999", "2.5e-3", "6.02e23"]
BAD_VALUES = ["N/A", "", "nan", "NaN", "inf", "-inf", "1e400", "0x10", "1,5"]
TIMES = [lambda t: t.isoformat().replace("+00:00", "Z"), lambda t: t.isoformat(),
         lambda t: (t + timedelta(microseconds=500000)).isoformat().replace("+00:00", "Z"),
         lambda t: t.strftime("%Y-%m-%dT%H:%M:%S.123456789Z"),
         lambda t: t.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ") + "+0000",
         lambda t: str(int(t.timestamp())), lambda t: str(int(t.timestamp() * 1000)),
         lambda t: t.strftime("%Y-%m-%d %H:%M:%S UTC"), lambda t: " " + t.isoformat()]
BAD_FIELDS = {
    "timestamp": ["yesterday", "", "1999-12-31T23:59:59Z", "2100-01-01T00:00:00Z", "0001-01-01T00:00:00+05:00",
                  "12345678901234567890", "timestamp"],
    "uuid": ["", "  ", "GPU-\x00abc", "U" * 1100, "GPU-\ud800"],
    "metric_name": ["", " ", "DCGM\x01UTIL", "M" * 257, "é" * 129],
    "gpu_id": ["x1", "-1", "2147483648", "1e3"],
    "Hostname": ["node\x7f1", "h" * 1025], "device": ["d\x07"], "modelName": ["m" * 1025],
    "pod": ["p" * 1000], "namespace": ["n" * 1000 + "\x1f"], "container": ["multi\nline"],
    "labels_raw": ['GPU_I_ID="x"', "\x00", 'a="' + "x" * 17000 + '"'],
    "value": BAD_VALUES,
}
ODD_FIELDS = {  # accepted by the exact parser, but not plain: non-ASCII, padding, quotes, commas, newlines
    "modelName": ["NVIDIA H100 ünïcode", " padded model "], "Hostname": [" node-9 "], "uuid": [" GPU-pad "],
    "pod": ['trainer, "big"', "with,comma"], "labels_raw": ['note="two\nlines"', 'q="say \\"hi\\""'],
    "gpu_id": [" 3", "+4", "", "1_0"], "metric_name": [" DCGM_FI_DEV_GPU_UTIL "],
}
JUNK = ["garbage line", "", "   ", "a,b,c", '"2025-07-18T20:42:34Z","M","0"', "\ufeffBOM in the middle,1,2",
        "x,y\tz"]
# how labels_raw may spell `__name__` (the fast path works a GPU's series out once for all its metric names)
NAMES = ['__name__="{m}"', '__name__=""', '__name__="a-b"', '__name__="x,y"', '__name__="say \\"hi\\""',
         '__name__="a=b"', '__name__="{m}",__name__="other"', '__name__ = "{m}"', '__name__="{m}"x', '__name__="{m}']
WEIRD = ['ab"c,d', '{row},ab"c', '"ab"c,{row}', 'x,"unclosed,{row}', "bare\rCR,{row}", "{row}\r"]


def _fleet(rng: random.Random, n: int) -> list[dict]:
    fleet = []
    for i in range(n):
        gpu = {"uuid": f"GPU-{uuidlib.UUID(int=rng.getrandbits(128))}", "host": f"node-{i // 4}", "index": str(i % 4),
               "mig": rng.random() < 0.2, "pci": rng.random() < 0.5, "workload": rng.random() < 0.5}
        fleet.append(gpu)
    return fleet


def _good(rng: random.Random, fleet: list[dict], tick: int) -> dict[str, str]:
    g = rng.choice(fleet)
    metric = rng.choice(METRICS)
    ts = T0 + timedelta(seconds=tick)
    labels = [f'DCGM_FI_DRIVER_VERSION="535.{rng.choice(["129.03", "54"])}"', f'Hostname="{g["host"]}"',
              f'UUID="{g["uuid"]}"', f'__name__="{metric}"', f'gpu="{g["index"]}"']
    if g["pci"]:
        labels.append(f'pci_bus_id="00000000:{int(g["index"]) + 10:02X}:00.0"')
    if g["mig"]:
        labels += [f'GPU_I_ID="{rng.choice("12")}"', 'GPU_I_PROFILE="1g.10gb"']
    if rng.random() < 0.3:
        labels.append(f'job="{rng.choice(["a", "b"])}"')  # a static label that changes: merged per GPU
    value = rng.choice(VALUES) if rng.random() < 0.5 else repr(round(rng.uniform(-1e4, 1e6), rng.randint(0, 6)))
    if metric == XID_METRIC:
        labels.append(f'err_code="{rng.choice(["13", "79"])}",err_msg="Graphics Engine Exception"')
        value = rng.choice(["0", "13", "79", "43.5", "48"])
    r = rng.random()
    if r < 0.15:  # other spellings and places of the name, first, last or in the middle
        labels[3] = rng.choice(NAMES).format(m=metric)
        labels.insert(rng.choice([0, 3, len(labels)]), labels.pop(3))
    elif r < 0.17:  # as long as the exact parser takes (16,384 bytes), or a byte longer because of the name
        filler = 'a="' + "x" * (16384 - len(",".join(labels)) - 5 - rng.choice([0, 1, 4000, 12200])) + '"'
        labels.insert(rng.choice([0, len(labels)]), filler)
    if rng.random() < 0.1:
        labels = []
    workload = ("team-a", f"job-{rng.randint(1, 3)}", "main") if g["workload"] else ("", "", "")
    return {"timestamp": rng.choice(TIMES)(ts), "metric_name": metric, "gpu_id": g["index"],
            "device": f"nvidia{g['index']}", "uuid": g["uuid"], "modelName": "NVIDIA H100 80GB HBM3",
            "Hostname": g["host"], "container": workload[2], "pod": workload[1], "namespace": workload[0],
            "value": value, "labels_raw": ",".join(labels)}


def _header(rng: random.Random) -> list[str]:
    header = list(HEADER)
    kind = rng.random()
    if kind < 0.25:
        rng.shuffle(header)
    elif kind < 0.4:
        header = [h for h in header if h not in ("device", "modelName", "labels_raw", "container")]
    elif kind < 0.5:
        header = header + ["extra"]
    elif kind < 0.6:
        header = [{"timestamp": "time", "Hostname": "host", "uuid": "GPU_UUID"}.get(h, h) for h in header]
    elif kind < 0.7:
        header = [f" {h.upper()} " for h in header]
    return header


def _dirty_file(rng: random.Random, path, rows: int, *, weird: bool, bad_rate: float | None = None) -> None:
    """A CSV of good rows mixed with every kind of bad row the exact parser knows, in random quoting."""
    header = _header(rng)
    names = [{"time": "timestamp", "host": "Hostname", "gpu_uuid": "uuid"}.get(h.strip().lower(), h.strip())
             for h in header]
    names = [next((c for c in HEADER if c.lower() == n.lower()), n) for n in names]
    eol = rng.choice(["\n", "\r\n"])
    quoting = rng.choice([csv.QUOTE_ALL, csv.QUOTE_MINIMAL, None])  # None: each row its own
    fleet = _fleet(rng, rng.randint(1, 12))
    bad_rate = rng.choice([0.0, 0.01, 0.1, 0.4]) if bad_rate is None else bad_rate
    out = io.StringIO()
    csv.writer(out, quoting=quoting or csv.QUOTE_ALL, lineterminator=eol).writerow(header)
    for i in range(rows):
        row = _good(rng, fleet, i // 7)
        r = rng.random()
        line = None
        if r < bad_rate / 2:
            field = rng.choice(sorted(BAD_FIELDS))
            row[field] = rng.choice(BAD_FIELDS[field])
        elif r < bad_rate * 0.7:
            line = rng.choice(JUNK if not rng.random() < 0.2 else [",".join(header)])
        elif r < bad_rate * 0.8:
            row = dict(row)
            row.pop(rng.choice(list(row)))  # a field short
        elif r < bad_rate:
            field = rng.choice(sorted(ODD_FIELDS))
            row[field] = rng.choice(ODD_FIELDS[field])
        if line is None:
            values = [row.get(n, "extra-value") for n in names if n in row or n == "extra"]
            buf = io.StringIO()
            q = quoting if quoting is not None else rng.choice([csv.QUOTE_ALL, csv.QUOTE_MINIMAL])
            csv.writer(buf, quoting=q, lineterminator=eol).writerow(values)
            line = buf.getvalue()[: -len(eol)]
            if weird and rng.random() < 0.03:
                line = rng.choice(WEIRD).format(row=line)
        out.write(line + eol)
    text = out.getvalue()
    if rng.random() < 0.3:
        text = "\ufeff" + text
    if rng.random() < 0.2:
        text = text[: -len(eol)]  # no line break at the end
    path.write_bytes(text.encode("utf-8", errors="surrogatepass"))


def _decoded(entries):
    out = []
    for fields, _ in entries:
        batch = codec.decode(fields)
        out.append((codec.decode_samples(batch), batch.gpus, batch.inventory, batch.events, batch.workloads,
                    batch.metrics))
    return out


NOW = datetime(2025, 7, 19, tzinfo=UTC)  # the parsers' clock: rejection reasons name it
_READERS: dict = {}


def _batches(samples, batch_size: int, shard) -> list[tuple[dict, int]]:
    """What the streamer's exact path makes of a chunk's samples: shard, then `codec.encode` per batch."""
    kept = [s for s in samples if shard[1] <= 1 or shard_of(s.uuid, shard[1]) == shard[0]]
    return [(codec.encode(kept[i:i + batch_size]), len(kept[i:i + batch_size]))
            for i in range(0, len(kept), batch_size)]


def _exact(chunk, batch_size: int, shard, limits) -> tuple[list, list[Rejected]]:
    items = list(read_chunk(chunk, with_labels=True, limits=limits, now=lambda: NOW))
    return (_batches([i for i in items if not isinstance(i, Rejected)], batch_size, shard),
            [i for i in items if isinstance(i, Rejected)])


def _fast(chunk, batch_size: int, shard, limits) -> tuple[list, list[Rejected], int, int]:
    reader = _READERS.setdefault(limits, FastReader(limits=limits, now=lambda: NOW))  # caches span files
    parsed = reader.read(chunk)
    if parsed.columns is None:
        return _batches(parsed.items, batch_size, shard), parsed.rejected, 0, parsed.exact_lines
    entries = [(e, n) for e, n, _ in encode_columns(parsed.columns, batch_size, shard, shard_of)]
    return entries, parsed.rejected, parsed.fast_rows, parsed.exact_lines


def _assert_same(path, *, chunk_bytes: int, batch_size: int, shard=(0, 1), limits=None) -> tuple[int, int]:
    """Both paths over every chunk of `path`: identical entries, decoded rows, rejected lines."""
    fast_rows = exact_lines = 0
    for chunk in split_records(path, chunk_bytes=chunk_bytes):
        exact, exact_rej = _exact(chunk, batch_size, shard, limits)
        fast, fast_rej, f, e = _fast(chunk, batch_size, shard, limits)
        fast_rows, exact_lines = fast_rows + f, exact_lines + e
        assert [(r.line, r.reason, r.raw) for r in fast_rej] == [(r.line, r.reason, r.raw) for r in exact_rej]
        assert _decoded(fast) == _decoded(exact)
        assert fast == exact  # byte for byte: the same COPY text, ids, inventory, events
    return fast_rows, exact_lines


def test_differential_over_generated_dirty_files(tmp_path):
    rng = random.Random(20250718)
    fast_total = exact_total = 0
    for i in range(40):
        path = tmp_path / f"dirty{i}.csv"
        _dirty_file(rng, path, rng.randint(20, 200), weird=i % 3 == 0)
        shard = rng.choice([(0, 1), (0, 1), (1, 3)])
        limits = rng.choice([None, RowLimits(min_ts=T0 + timedelta(seconds=5), metric_bytes=24)])
        f, e = _assert_same(path, chunk_bytes=rng.choice([200, 1500, 6000, 1 << 20]),
                            batch_size=rng.choice([3, 7, 50, 1000]), shard=shard, limits=limits)
        fast_total, exact_total = fast_total + f, exact_total + e
    assert fast_total > 2000 and exact_total > 100  # both paths ran, mixed within chunks


def test_rejected_lines_are_the_files_true_lines(tmp_path):
    """Chunked fast reading rejects what reading the whole file row by row rejects, at the same lines."""
    rng = random.Random(7)
    for i in range(10):
        path = tmp_path / f"d{i}.csv"
        _dirty_file(rng, path, 150, weird=False)
        want = [(r.line, r.reason) for r in read_samples(path, now=lambda: NOW) if isinstance(r, Rejected)]
        got = []
        for chunk in split_records(path, chunk_bytes=700):
            got += [(r.line, r.reason) for r in _fast(chunk, 50, (0, 1), None)[1]]
        assert got == want


def test_real_export_fast_and_exact_identical(real_csv):
    _assert_same(real_csv, chunk_bytes=1 << 20, batch_size=1000)
    _assert_same(real_csv, chunk_bytes=50_000, batch_size=333, shard=(2, 3))
    for chunk in split_records(real_csv, chunk_bytes=100_000):  # the streamer's worker function, both ways
        for shard, partitions in (((1, 2), 1), ((0, 1), 4)):  # batched per stream partition the same way
            fast = encode_chunk(chunk, 500, shard, None, partitions, parser="fast")
            exact = encode_chunk(chunk, 500, shard, None, partitions, parser="exact")
            def by_partition(entries):  # each partition's entries in order (partitions are separate streams)
                return sorted(entries, key=lambda e: e[2])
            assert by_partition(fast[0]) == by_partition(exact[0]) and fast[1] == exact[1] and fast[2][0] > 0
            assert {p for _, _, p in fast[0]} == set(range(partitions))


def test_value_texts_are_pythons_repr(tmp_path):
    """Every spelling of a number: the vectorized value is exactly `float(text)` (or the row is rejected)."""
    rng = random.Random(3)
    values = VALUES + BAD_VALUES
    for _ in range(3000):
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 19)))
        cut = rng.randint(0, len(digits))
        values.append(rng.choice(["", "-"]) + (digits[:cut] or "0") + rng.choice([".", ""]) + digits[cut:])
        values.append(repr(rng.uniform(-1e17, 1e17) * 10 ** rng.randint(-25, 0)))
    path = tmp_path / "values.csv"
    rows = [["2025-07-18T20:42:34Z", "M", "0", f"GPU-{i % 50}", "h", v] for i, v in enumerate(values)]
    buf = io.StringIO()
    csv.writer(buf).writerows([["timestamp", "metric_name", "gpu_id", "uuid", "Hostname", "value"], *rows])
    path.write_text(buf.getvalue())
    fast_rows, _ = _assert_same(path, chunk_bytes=1 << 20, batch_size=1000)
    assert fast_rows > len(values) * 0.8


def test_parser_workers_do_not_import_pandas(real_csv):
    """A fast parser worker process reads and encodes without pandas (pyarrow would load it: ~50 MB, 0.3 s)."""
    code = ("import sys; from telemetry_nb.pipeline import chunk_pool; "
            "from telemetry_nb.sources.dcgm_csv import split_records; chunk_pool._worker_init(True); "
            "[chunk] = split_records(sys.argv[1]); entries, _, _ = chunk_pool.encode_chunk(chunk, 1000, (0, 1), "
            "parser='fast'); print(sum(n for _, n, _ in entries), 'pandas' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(real_csv)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["2470", "False"]


def test_clean_chunks_take_the_fast_path(tmp_path, real_csv):
    """A clean file is read vectorized, every row; a dirty one only hands its bad lines to the exact parser."""
    path = tmp_path / "clean.csv"
    write_csv(path, generate_rows(4, 4, 30, 1.0, seed=2, start=T0))
    reader = FastReader(now=lambda: T0 + timedelta(days=1))
    for source, rows in ((path, 4 * 4 * 30 * 10), (real_csv, 2470)):
        [chunk] = split_records(source)
        parsed = reader.read(chunk)
        assert parsed.columns is not None and parsed.items is None
        assert (parsed.fast_rows, parsed.exact_lines, parsed.columns.n) == (rows, 0, rows)
        [entry] = [e for e, _, _ in encode_columns(parsed.columns, 10_000)]
        assert codec.decode(entry).n == rows
    text = path.read_text().splitlines(keepends=True)
    text[5] = text[5].replace('"', '"x', 1)  # an unparseable timestamp
    text[9] = "junk\r\n"
    (tmp_path / "dirty.csv").write_text("".join(text))
    [chunk] = split_records(tmp_path / "dirty.csv")
    parsed = reader.read(chunk)
    assert (parsed.fast_rows, parsed.exact_lines) == (len(text) - 3, 2)
    assert [(r.line, r.reason[:22]) for r in parsed.rejected] == [(6, "unparseable timestamp "),
                                                                  (10, "expected 12 fields, go")]
    assert reader.stats.exact_chunks == 0 and reader.stats.fast_rows == 4 * 4 * 30 * 10 + 2470 + len(text) - 3


def test_labels_are_parsed_once_per_gpu_not_per_metric(tmp_path):
    """labels_raw differs between a GPU's metrics only in `__name__`: the fast path parses it once per GPU."""
    path = tmp_path / "fleet.csv"
    write_csv(path, generate_rows(4, 4, 3, 1.0, seed=3, start=T0))
    _labels_and_identity.cache_clear()
    [chunk] = split_records(path)
    parsed = FastReader(now=lambda: T0 + timedelta(days=1)).read(chunk)
    assert parsed.fast_rows == 4 * 4 * 3 * 10
    assert _labels_and_identity.cache_info().misses == 4 * 4  # the exact parser: once per GPU and metric
    assert len(list(read_chunk(chunk, with_labels=True, now=lambda: T0 + timedelta(days=1)))) == 4 * 4 * 3 * 10
    assert _labels_and_identity.cache_info().misses == 4 * 4 + 4 * 4 * 10


def test_carving_the_name_out_never_changes_what_the_labels_are_stored_as():
    """Where the fast path keys a GPU's labels with `__name__`'s value taken out, the exact parser stores the
    same static labels, identity and err_msg for them as for the whole text (random spellings of labels)."""
    pairs = ['job="a"', 'GPU_I_ID="1"', 'GPU_I_ID="x"', 'err_msg="boom"', 'pci_bus_id="00:1"', 'UUID="GPU-1"',
             '_unparsed="u"', 'DCGM_FI_DRIVER_VERSION="535"', 'k="é"', 'k="a,b"', 'k=""']
    odd = ['"', ",", "=", '="', "\\", '\\"', " ", "x", "{", 'q="say \\"hi\\""', "k=v", '__name__="']
    names = ["DCGM_FI_DEV_GPU_UTIL", "", "a:b_9", "a-b", "x,y", "a=b", 'a\\"b']
    rng = random.Random(7)
    carved = 0
    for _ in range(20_000):
        parts = [rng.choice(pairs) for _ in range(rng.randint(0, 6))]
        parts.insert(rng.randint(0, len(parts)), f'__name__="{rng.choice(names)}"')
        if rng.random() < 0.3:  # a second name, or something odd anywhere
            parts.insert(rng.randint(0, len(parts)), rng.choice(odd + ['__name__="M"']))
        raw = rng.choice(["", " "]) + ",".join(parts) + rng.choice(["", " ", ","])
        text = _name_carved(raw)
        if text is raw or not _carving_holds(text, raw):
            continue  # keyed whole, as before
        carved += 1
        (labels, ident), (want_labels, want_ident) = _labels_and_identity("GPU-u", text), \
            _labels_and_identity("GPU-u", raw)
        assert static_labels(labels) == static_labels(want_labels), raw
        assert (labels.get("err_msg"), ident) == (want_labels.get("err_msg"), want_ident), raw
    assert carved > 2000  # the shortcut was taken often enough to mean something


def test_quoted_newline_chunk_is_read_exactly_whole(tmp_path):
    path = tmp_path / "nl.csv"
    path.write_text(",".join(HEADER) + "\n" + '2025-07-18T20:42:34Z,M,0,d,GPU-1,m,h,,,,1,"a=""two\nlines"""\n'
                    "2025-07-18T20:42:35Z,M,0,d,GPU-1,m,h,,,,2,\n")
    [chunk] = split_records(path)
    reader = FastReader()
    parsed = reader.read(chunk)
    assert parsed.columns is None and len(parsed.items) == 2
    assert reader.stats.why == {"quoted newline or unbalanced quotes": 1}
    _assert_same(path, chunk_bytes=1 << 20, batch_size=10)


def _table(url: str) -> dict[str, list]:
    with psycopg.connect(url) as conn:
        return {q: conn.execute(q).fetchall() for q in (
            "SELECT gpu_id, ts, metric_id, value, workload_id FROM telemetry ORDER BY 1, 2, 3",
            "SELECT * FROM gpus ORDER BY id", "SELECT * FROM workloads ORDER BY 1",
            "SELECT * FROM gpu_events ORDER BY 1, 2, 3", "SELECT * FROM metrics ORDER BY 1")}


def test_stream_stores_the_same_rows_with_either_parser(cli_env, servers, redis_client, tmp_path):
    """CLI `stream` with the fast parser (the default) and the exact one (TELEMETRY_CSV_PARSER=exact), each in
    2 worker processes: the same rows, inventory, events and rejected lines end up stored."""
    rng = random.Random(12)
    path = tmp_path / "dirty.csv"
    _dirty_file(rng, path, 600, weird=False, bad_rate=0.1)
    other = f"{cli_env['TELEMETRY_STREAM']}-exact"
    second_db = f"{cli_env['DATABASE_URL'].rsplit('/', 1)[1]}_exact"
    with psycopg.connect(servers.database("postgres"), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {second_db}")
    try:
        exact_env = {**cli_env, "TELEMETRY_STREAM": other, "DATABASE_URL": servers.database(second_db),
                     "TELEMETRY_CSV_PARSER": "exact"}
        fast = run_cli("stream", "--csv", str(path), "--workers", "2", env=cli_env)
        exact = run_cli("stream", "--csv", str(path), "--workers", "2", env=exact_env)
        assert "Fast CSV parser:" in fast.stderr and "Fast CSV parser:" not in exact.stderr
        assert fast.stdout.strip().splitlines()[-1] == exact.stdout.strip().splitlines()[-1]
        for env in (cli_env, exact_env):
            run_cli("collect", "--drain", env=env)

        def rejected(stream):  # the two runs read the clock a moment apart: reasons may name different seconds
            return [(f[b"line"], re.sub(rb"the clock \([^)]*\)", b"the clock", f[b"reason"]), f[b"raw"])
                    for _, f in redis_client.xrange(f"{stream}:rejected")]

        assert rejected(cli_env["TELEMETRY_STREAM"]) == rejected(other) != []
        got, want = _table(cli_env["DATABASE_URL"]), _table(exact_env["DATABASE_URL"])
        assert len(want["SELECT gpu_id, ts, metric_id, value, workload_id FROM telemetry ORDER BY 1, 2, 3"]) > 300
        assert got == want
    finally:
        redis_client.delete(other, f"{other}:rejected", f"{other}:rejected:total", f"{other}:dead")
        with psycopg.connect(servers.database("postgres"), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {second_db} WITH (FORCE)")


@pytest.mark.parametrize("shard", ["0/2", "1/2"])
def test_stream_shards_with_the_fast_parser(cli_env, redis_client, real_csv, shard):
    out = run_cli("stream", "--csv", str(real_csv), "--shard", shard, env=cli_env)
    rows = []
    for _, fields in redis_client.xrange(cli_env["TELEMETRY_STREAM"]):
        rows += codec.decode_samples(codec.decode(fields))
    assert {shard_of(s.uuid, 2) for s in rows} == {int(shard[0])}
    assert out.stdout.strip().splitlines()[-1] == f"published={len(rows)} rejected=0"
    assert "Fast CSV parser: 2470 rows read vectorized, 0 lines row by row (0 whole chunks)" in out.stderr

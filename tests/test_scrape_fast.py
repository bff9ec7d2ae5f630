"""The scraper's fast path (vectorized parser + columnar encoding) against the exact one, byte for byte.

Generated exporter texts, clean and mutated in every way the fast path hands to the exact parser,
are served over HTTP and scraped twice by a `--parser exact` and a `--parser fast` scraper: the
stream entries, the rejected rows, the ignored count and the series cache must be identical, and the
regular texts must really have taken the fast path.
"""

from __future__ import annotations

import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import redis

from telemetry_nb.config import Settings
from telemetry_nb.observability import PipelineMetrics, ScrapeMetrics
from telemetry_nb.pipeline import codec
from telemetry_nb.pipeline.scraper import FAST_GROUP, Scraper
from telemetry_nb.pipeline.streamer import Streamer
from telemetry_nb.pipeline.streams import open_partitions, partition_keys
from telemetry_nb.sources.fake_exporter import render_target
from telemetry_nb.sources.targets import StaticTargets
from tests.conftest import run_cli

T0 = 1_767_225_600.123  # 2026-01-01, a scrape start with milliseconds


def _samples(text: str) -> list[int]:
    lines = text.split("\n")
    return [i for i, line in enumerate(lines) if line and not line.startswith("#")]


def _edit(text: str, rng: random.Random, fn) -> str:
    """Apply `fn` to one sample line, picked at random."""
    lines = text.split("\n")
    i = rng.choice(_samples(text))
    lines[i] = fn(lines[i])
    return "\n".join(lines)


def _value(v: str):
    return lambda line: line.rsplit(" ", 1)[0] + " " + v


def _each_sample(text: str, fn) -> str:
    lines = text.split("\n")
    for i in _samples(text):
        lines[i] = fn(lines[i])
    return "\n".join(lines)


def _shuffle_labels(rng: random.Random):
    def fn(line: str) -> str:
        name, rest = line.split("{", 1)
        labels, value = rest.rsplit("} ", 1)
        pairs = [p + '"' for p in labels.split('",')]
        pairs[-1] = pairs[-1][:-1]
        rng.shuffle(pairs)
        return f"{name}{{{','.join(pairs)}}} {value}"
    return fn


def _mig(line: str) -> str:
    if 'gpu="0"' not in line:
        return line
    one = line.replace('gpu="0",', 'gpu="0",GPU_I_ID="1",GPU_I_PROFILE="1g.10gb",')
    two = line.replace('gpu="0",', 'gpu="0",GPU_I_ID="2",GPU_I_PROFILE="2g.20gb",').rsplit(" ", 1)[0] + " 7"
    return one + "\n" + two


# texts the fast path takes: they must come out exactly as from the exact parser
REGULAR = {
    "clean": lambda t, r: t,
    "no HELP/TYPE": lambda t, r: "\n".join(x for x in t.split("\n") if not x.startswith("#")),
    "no trailing newline": lambda t, r: t.rstrip("\n"),
    "labels in any order": lambda t, r: _each_sample(t, _shuffle_labels(r)),
    "MIG instances": lambda t, r: _each_sample(t, _mig),
    "workload labels absent": lambda t, r: _each_sample(
        t, lambda x: x.replace('container="",namespace="",pod=""', "")
        .replace('container="pytorch",namespace="ml-training",', "").replace(",}", "}").replace(",,", ",")),
    "pod_uid and a pod on every GPU": lambda t, r: t.replace('container="",namespace="",pod=""',
                                                             'container="c",namespace="ns",pod="p",pod_uid="u-1"'),
    "2026 spelling": lambda t, r: t.replace("Hostname=", "hostname=").replace("UUID=", "uuid="),
    "no hostname label": lambda t, r: _each_sample(t, lambda x: x.split('Hostname="')[0]
                                                   + x.split('Hostname="')[1].split('",', 1)[1]),
    "blank lines": lambda t, r: t.replace("\n# HELP", "\n\n\n# HELP"),
    "number spellings": lambda t, r: _edit(_edit(_edit(t, r, _value("1.5e3")), r, _value("-0")), r,
                                           _value("3000000000")),
    "XID that is not an integer": lambda t, r: _each_sample(
        t, lambda x: x.rsplit(" ", 1)[0] + " 13.5" if x.startswith("DCGM_FI_DEV_XID_ERRORS") else x),
    "braces and escapes in label values": lambda t, r: t.replace("NVIDIA H100 80GB HBM3", 'NVIDIA {H100} \\"80GB\\"')
    .replace("Graphics Engine Exception", "bad } 5 thing"),
    "empty body": lambda t, r: "",
    "comments only": lambda t, r: "# HELP DCGM_FI_DEV_GPU_UTIL x\n# TYPE DCGM_FI_DEV_GPU_UTIL gauge\n",
}
# texts the fast path hands to the exact parser (rejected lines, ignored families, odd layouts)
IRREGULAR = {
    "CRLF": lambda t, r: t.replace("\n", "\r\n"),
    "leading whitespace": lambda t, r: _edit(t, r, lambda x: "  " + x),
    "sample timestamp": lambda t, r: _edit(t, r, lambda x: x + " 1767225599000"),
    "NaN": lambda t, r: _edit(t, r, _value("NaN")),
    "+Inf": lambda t, r: _edit(t, r, _value("+Inf")),
    "-Inf": lambda t, r: _edit(t, r, _value("-Inf")),
    "int32 blank": lambda t, r: _edit(t, r, _value("2147483632")),
    "int64 blank": lambda t, r: _edit(t, r, _value("9223372036854775794")),
    "fp64 blank": lambda t, r: _edit(t, r, _value("140737488355330")),
    "unparsable value": lambda t, r: _edit(t, r, _value("1.2.3")),
    "non-numeric value": lambda t, r: _edit(t, r, _value("12abc")),
    "long value": lambda t, r: _edit(t, r, _value("0.00000000000000000000000000000000125")),
    "duplicate series": lambda t, r: _edit(t, r, lambda x: x + "\n" + x.rsplit(" ", 1)[0] + " 1"),
    "non-DCGM family": lambda t, r: t + 'process_open_fds{instance="x"} 5\ngo_goroutines 12\n',
    "invalid name": lambda t, r: _edit(t, r, lambda x: "DCGM-FI" + x[7:]),
    "no UUID label": lambda t, r: _edit(t, r, lambda x: x.replace("UUID=", "XUUID=")),
    "malformed labels": lambda t, r: _edit(t, r, lambda x: x.replace('gpu="', "gpu=").replace('",UUID', ",UUID", 1)),
    "empty label set": lambda t, r: t + "DCGM_FI_DEV_GPU_UTIL{} 5\n",
    "no labels": lambda t, r: t + "DCGM_FI_DEV_GPU_UTIL 5\n",
    "two spaces": lambda t, r: _edit(t, r, lambda x: x.replace("} ", "}  ")),
    "tab": lambda t, r: _edit(t, r, lambda x: x.replace("} ", "}\t")),
    "non-ASCII model name": lambda t, r: t.replace("NVIDIA H100", "NVIDIA H100 \u2014"),
    "invalid UTF-8": lambda t, r: t.replace("NVIDIA H100", "NVIDIA H100 \udcff"),
}


def _bodies(seed: int, variant: int) -> tuple[list[bytes], int]:
    """Texts of every kind (and clean ones to pass FAST_GROUP); returns them and how many are regular."""
    rng = random.Random(f"{seed}-{variant}")
    kinds = [("r", n, m) for n, m in REGULAR.items()] + [("i", n, m) for n, m in IRREGULAR.items()]
    kinds += [("r", "clean", REGULAR["clean"])] * (FAST_GROUP + 8 - len(kinds))
    out, regular = [], 0
    for i, (kind, name, mutate) in enumerate(kinds):
        host = 1 if "XID" in name or "braces" in name else i % 6  # host 1 has an XID error; hosts repeat
        text = render_target(host, gpus=4, fields=12, variant=variant, seed=seed)
        out.append(mutate(text.decode(), rng).encode("utf-8", errors="surrogateescape"))
        regular += kind == "r"
    return out, regular


class _Server:
    """Serves `bodies[i]` at /t/<i>, whatever `bodies` is when asked."""

    def __init__(self):
        self.bodies: list[bytes] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802
                body = owner.bodies[int(self.path.rsplit("/", 1)[1])]
                self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))  # one send

            def log_message(self, *args):
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        self.base = f"http://127.0.0.1:{self.http.server_address[1]}"


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.http.shutdown()


@pytest.mark.parametrize(("batch_size", "shard", "partitions"), [(100, (0, 1), 1), (37, (1, 2), 1), (50, (0, 1), 3)])
def test_fast_path_publishes_exactly_what_the_exact_path_does(servers, stream, redis_client, server, batch_size,
                                                               shard, partitions):
    now = [T0]
    scrapers = {}
    for parser in ("exact", "fast"):
        settings = Settings(redis_url=servers.redis_url, stream=f"{stream}-{parser}", high_water=0,
                            batch_size=batch_size, shard_index=shard[0], shard_count=shard[1],
                            stream_partitions=partitions)
        streamer = Streamer(open_partitions(settings, redis.Redis.from_url(servers.redis_url)), settings)
        streamer.source_name = "scrape"
        scrapers[parser] = Scraper(streamer, StaticTargets([]), ScrapeMetrics(PipelineMetrics().registry),
                                   clock=lambda: now[0], timeout_s=120, parser=parser)  # a slow test machine
    keys = {p: partition_keys(f"{stream}-{p}", partitions) for p in scrapers}  # each partition in its order
    regular = 0
    try:
        for cycle in range(2):  # the second scrape finds every label set in the cache
            server.bodies, regular = _bodies(seed=batch_size, variant=cycle)
            urls = [f"{server.base}/t/{i}" for i in range(len(server.bodies))]
            now[0] = T0 + 15 * cycle
            results = {p: s.scrape(urls)[0] for p, s in scrapers.items()}
            assert results["fast"].samples == results["exact"].samples > 1000
            assert results["fast"].rejected == results["exact"].rejected > 10
            assert results["fast"].published == results["exact"].published
        entries = {p: [f for k in keys[p] for _, f in redis_client.xrange(k)] for p in scrapers}
        rejected = {p: [f for k in keys[p] for _, f in redis_client.xrange(f"{k}:rejected")] for p in scrapers}
        if partitions > 1:
            assert all(redis_client.xlen(k) for k in keys["fast"])  # every partition got its GPUs
    finally:
        for p, s in scrapers.items():
            s.close()
            for k in keys[p]:
                redis_client.delete(k, f"{k}:rejected", f"{k}:rejected:total")
    assert len(entries["fast"]) == len(entries["exact"]) > 10
    for fast, exact in zip(entries["fast"], entries["exact"], strict=True):
        assert fast == exact
    assert rejected["fast"] == rejected["exact"]
    fast, exact = scrapers["fast"].parser, scrapers["exact"].parser
    assert fast.ignored == exact.ignored > 0
    def cache(parser) -> dict:  # what each label set parsed to (the series objects are each scraper's own)
        return {h: {t: v if type(v) is str else v[0] for t, v in c.items()} for h, c in parser._series.items()}
    assert cache(fast) == cache(exact) and fast._size == exact._size
    # not vacuous: workloads, plain rows, XID events, MIG instances all went through
    batches = [codec.decode(e) for e in entries["fast"]]
    assert any(b.events for b in batches) and any(b.workloads for b in batches)
    assert any(0 < b.plain < b.n for b in batches)
    assert any(i.mig_instance is not None for b in batches for i in b.inventory)
    # the regular texts really took the fast path, the others really went to the exact parser
    counter = scrapers["fast"].fast
    assert counter.fast == 2 * regular
    assert sum(counter.fallbacks.values()) == 2 * len(IRREGULAR)


def test_arrow_reads_plain_numbers_as_float_does():
    """The fast path casts value texts with Arrow; on its character set Arrow must agree with float() or refuse."""
    rng = random.Random(7)
    texts = ["".join(rng.choice("0123456789.eE+-") for _ in range(rng.randint(1, 9))) for _ in range(20_000)]
    texts += [repr(rng.uniform(-1e9, 1e9)) for _ in range(5_000)] + [f"{rng.random():.17e}" for _ in range(5_000)]
    for text in texts:
        try:
            ours = pc.cast(pa.array([text]), pa.float64())[0].as_py()
        except pa.ArrowInvalid:
            continue  # the target goes to the exact parser
        assert repr(ours) == repr(float(text)), text


def test_cli_parser_option_and_its_environment_variable(cli_env, redis_client, server):
    """`scrape --parser exact` and the default (fast) publish the same samples; a bad $TELEMETRY_SCRAPE_PARSER is
    refused with a clear message."""
    bodies, _ = _bodies(seed=3, variant=0)
    server.bodies = bodies[:4] + bodies[len(REGULAR):len(REGULAR) + 8]  # some regular texts, some not
    targets = [a for i in range(len(server.bodies)) for a in ("--target", f"{server.base}/t/{i}")]
    rows = {}
    for parser in ("exact", "fast"):
        stream = f"{cli_env['TELEMETRY_STREAM']}-{parser}"
        env = {**cli_env, "TELEMETRY_STREAM": stream}
        args = ["--parser", "exact"] if parser == "exact" else []
        out = run_cli("scrape", *targets, *args, "--cycles", "1", env=env, timeout=120)
        assert "cycles=1" in out.stdout
        batches = [codec.decode(f) for _, f in redis_client.xrange(stream)]
        rows[parser] = sorted((s.uuid, s.metric, s.value) for b in batches for s in codec.decode_samples(b))
        rows[parser + " rejected"] = sorted(f[b"reason"] for _, f in redis_client.xrange(f"{stream}:rejected"))
        redis_client.delete(stream, f"{stream}:rejected", f"{stream}:rejected:total")
    assert rows["fast"] == rows["exact"] and len(rows["fast"]) > 300
    assert rows["fast rejected"] == rows["exact rejected"] and rows["fast rejected"]
    bad = run_cli("scrape", "--target", "x:1", env={**cli_env, "TELEMETRY_SCRAPE_PARSER": "quick"}, check=False,
                  timeout=60)
    assert bad.returncode != 0 and "must be fast or exact, not 'quick'" in bad.stderr


def test_columnar_entries_equal_encode_series_over_the_same_rows():
    """Rows spread over columns whose lists overlap (a series or name in two lists), several timestamps, XID
    readings integer or not, cut into entries at any size: each entry is `codec.encode_series`' of its cut."""
    from datetime import UTC, datetime

    from telemetry_nb.model import XID_METRIC, Sample
    from telemetry_nb.pipeline.columnar import Columns, encode_batches

    rng = random.Random(11)
    ts = datetime(2026, 1, 1, tzinfo=UTC)

    def series(i: int, pod: str) -> codec.Series:
        return codec.Series(Sample(f"GPU-{i % 5}", "", ts, 0.0, "h", i % 5, f"nvidia{i % 5}", "M",
                                   labels={"gpu": str(i % 5), "k": str(i), "err_msg": f"e{i}"}, pod=pod,
                                   pci_bus_id=f"p{i % 5}"))

    pool = [series(i, "p" if i % 3 else "") for i in range(12)]
    names = ["DCGM_FI_DEV_GPU_UTIL", XID_METRIC, "DCGM_FI_DEV_FB_USED"]
    stamps = [(ts.replace(second=k)).isoformat() for k in range(3)]
    rows, parts = [], []
    for _ in range(9):
        mine = rng.sample(pool, 6)
        local_names = rng.sample(names, 3)
        k = rng.randint(1, 40)
        sidx = [rng.randrange(6) for _ in range(k)]
        midx = [rng.randrange(3) for _ in range(k)]
        tidx = [rng.randrange(3) for _ in range(k)]
        values = [rng.choice([0.0, -0.0, 13.0, 13.5, 1e20, rng.random()]) for _ in range(k)]
        parts.append(Columns(mine, np.array(sidx), local_names, np.array(midx), stamps, np.array(tidx),
                             np.array(values)))
        rows += [(mine[s], local_names[m], stamps[t], v) for s, m, t, v in zip(sidx, midx, tidx, values, strict=True)]
    for size in (1, 7, 50, 1000):
        expected = [codec.encode_series(rows[i:i + size]) for i in range(0, len(rows), size)]
        assert [fields for fields, _ in encode_batches(parts, size)] == expected

"""The DCGM CSV source: the real export, real-world variations, and every kind of bad row."""

from __future__ import annotations

import csv
import io
import random
import subprocess
import sys
import tracemalloc
from datetime import UTC, datetime, timedelta

import pytest

from telemetry_nb.model import Rejected, Sample
from telemetry_nb.sources.dcgm_csv import HEADER, HeaderError, parse_labels, read_samples
from telemetry_nb.sources.generate import generate_rows, write_csv
from telemetry_nb.sources.limits import RowLimits
from telemetry_nb.timeparse import parse_timestamp


def _csv(rows: list[list[str]], header=HEADER, quote=csv.QUOTE_MINIMAL, eol="\n") -> str:
    buf = io.StringIO()
    w = csv.writer(buf, quoting=quote, lineterminator=eol)
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _row(**over) -> list[str]:
    base = dict(timestamp="2025-07-18T20:42:34Z", metric_name="DCGM_FI_DEV_GPU_UTIL", gpu_id="3", device="nvidia3",
                uuid="GPU-abc", modelName="NVIDIA H100 80GB HBM3", Hostname="node-1", container="c", pod="p",
                namespace="ns", value="42", labels_raw='gpu="3",job="dcgm"')
    base.update(over)
    return [base[h] for h in HEADER]


def test_real_export_every_row(real_csv):
    out = list(read_samples(real_csv))
    samples = [s for s in out if isinstance(s, Sample)]
    assert len(out) == len(samples) == 2470
    assert len({s.uuid for s in samples}) == 247
    assert len({s.hostname for s in samples}) == 31
    assert len({s.metric for s in samples}) == 10
    first = samples[0]
    assert first.uuid == "GPU-5fd4f087-86f3-7a43-b711-4771313afc50"
    assert first.ts == datetime(2025, 7, 18, 20, 42, 34, tzinfo=UTC)
    assert first.metric == "DCGM_FI_DEV_GPU_UTIL" and first.value == 0.0 and first.gpu_index == 0
    assert first.labels["DCGM_FI_DRIVER_VERSION"] == "535.129.03"
    assert first.labels["instance"] == "mtv5-dgx1-hgpu-031:9400"
    assert first.labels["modelName"] == "NVIDIA H100 80GB HBM3"
    # every row agrees with the stdlib csv module's reading of the same file
    with open(real_csv, newline="", encoding="utf-8-sig") as fh:
        ref = list(csv.DictReader(fh))
    assert [(s.uuid, s.metric, float(r["value"])) for s, r in zip(samples, ref, strict=True)] == \
        [(r["uuid"], r["metric_name"], s.value) for s, r in zip(samples, ref, strict=True)]


def test_permuted_columns_extra_columns_bom_crlf():
    header = list(reversed(HEADER)) + ["extra"]
    rows = [list(reversed(_row(gpu_id=str(i), uuid=f"GPU-{i}"))) + ["junk"] for i in range(3)]
    text = "\ufeff" + _csv(rows, header=header, quote=csv.QUOTE_ALL, eol="\r\n")
    out = list(read_samples(io.StringIO(text, newline="")))
    assert [s.uuid for s in out] == ["GPU-0", "GPU-1", "GPU-2"]
    assert all(isinstance(s, Sample) and s.value == 42.0 and s.namespace == "ns" for s in out)
    assert out[1].gpu_index == 1 and out[1].labels == {"gpu": "3", "job": "dcgm"}


def test_file_with_bom_and_crlf_on_disk(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes(("\ufeff" + _csv([_row(), _row(uuid="GPU-2")], eol="\r\n")).encode("utf-8"))
    out = list(read_samples(path))
    assert [s.uuid for s in out] == ["GPU-abc", "GPU-2"]


@pytest.mark.parametrize("text, expected", [
    ("2025-07-18T20:42:34Z", datetime(2025, 7, 18, 20, 42, 34, tzinfo=UTC)),
    ("2025-07-18T20:42:34.5Z", datetime(2025, 7, 18, 20, 42, 34, 500000, tzinfo=UTC)),
    ("2025-07-18T20:42:34.123456789Z", datetime(2025, 7, 18, 20, 42, 34, 123456, tzinfo=UTC)),
    ("2025-07-18T13:42:34-07:00", datetime(2025, 7, 18, 20, 42, 34, tzinfo=UTC)),
    ("2025-07-18 22:42:34+0200", datetime(2025, 7, 18, 20, 42, 34, tzinfo=UTC)),
    ("2025-07-18T20:42:34", datetime(2025, 7, 18, 20, 42, 34, tzinfo=UTC)),
    ("1752871354", datetime(2025, 7, 18, 20, 42, 34, tzinfo=UTC)),
    ("1752871354500", datetime(2025, 7, 18, 20, 42, 34, 500000, tzinfo=UTC)),
])
def test_timestamps(text, expected):
    assert parse_timestamp(text) == expected


def test_offsets_normalised_to_utc_in_samples():
    out = list(read_samples(io.StringIO(_csv([_row(timestamp="2025-07-18T22:42:34.250+02:00")]))))
    assert out[0].ts == datetime(2025, 7, 18, 20, 42, 34, 250000, tzinfo=UTC)
    assert out[0].ts.utcoffset() == timedelta(0)


@pytest.mark.parametrize("over, reason", [
    ({"timestamp": "yesterday"}, "unparseable timestamp 'yesterday'"),
    ({"timestamp": ""}, "empty timestamp"),
    ({"value": "N/A"}, "non-numeric value 'N/A'"),
    ({"value": ""}, "empty value"),
    ({"value": "nan"}, "non-finite value 'nan'"),
    ({"uuid": ""}, "empty uuid"),
    ({"metric_name": " "}, "empty metric_name"),
    ({"gpu_id": "x1"}, "non-integer gpu_id 'x1'"),
])
def test_bad_rows_rejected_with_line_and_reason(over, reason):
    text = _csv([_row(uuid="GPU-good1"), _row(**over), _row(uuid="GPU-good2")])
    out = list(read_samples(io.StringIO(text)))
    assert [type(o) for o in out] == [Sample, Rejected, Sample]
    bad = out[1]
    assert bad.line == 3
    assert bad.reason == reason
    assert "GPU" in bad.raw or over.get("uuid") == ""


def test_wrong_field_count_repeated_header_blank_and_junk_lines():
    good = _csv([_row(uuid="GPU-1")]).splitlines()
    lines = good + ["", ",".join(HEADER), '"2025-07-18T20:42:34Z","M","0"', "garbage line",
                    _csv([_row(uuid="GPU-2")]).splitlines()[1]]
    out = list(read_samples(io.StringIO("\n".join(lines) + "\n")))
    assert [o.uuid for o in out if isinstance(o, Sample)] == ["GPU-1", "GPU-2"]
    rejected = [o for o in out if isinstance(o, Rejected)]
    assert [(r.line, r.reason) for r in rejected] == [
        (4, "repeated header row"), (5, f"expected {len(HEADER)} fields, got 3"),
        (6, f"expected {len(HEADER)} fields, got 1")]


def test_quoted_fields_with_commas_quotes_and_newlines():
    row = _row(pod='trainer, "big"', labels_raw='note="a,b",quote="say \\"hi\\"",text="multi\nline"')
    out = list(read_samples(io.StringIO(_csv([row, _row(uuid="GPU-next")], quote=csv.QUOTE_ALL))))
    assert out[0].pod == 'trainer, "big"'
    assert out[0].labels == {"note": "a,b", "quote": 'say "hi"', "text": "multi\nline"}
    assert isinstance(out[1], Sample) and out[1].uuid == "GPU-next"


def test_missing_required_columns_named():
    header = [h for h in HEADER if h not in ("uuid", "value")]
    with pytest.raises(HeaderError) as err:
        list(read_samples(io.StringIO(",".join(header) + "\n")))
    assert "uuid" in str(err.value) and "value" in str(err.value)


def test_empty_file():
    with pytest.raises(HeaderError, match="empty"):
        list(read_samples(io.StringIO("")))


def test_header_case_and_whitespace_tolerated():
    header = [f" {h.upper()} " for h in HEADER]
    out = list(read_samples(io.StringIO(_csv([_row()], header=header))))
    assert isinstance(out[0], Sample) and out[0].hostname == "node-1" and out[0].model_name.startswith("NVIDIA")


def test_labels_parser():
    assert parse_labels('a="1",b="two words",c="x\\"y",d="back\\\\slash"') == {
        "a": "1", "b": "two words", "c": 'x"y', "d": "back\\slash"}
    assert parse_labels("") == {}
    assert parse_labels('a="1",broken') == {"a": "1", "_unparsed": "broken"}


def test_plain_labels_split_as_the_scanner_reads_them(real_csv):
    """The split fast path answers only where the regex scanner answers the same: over the real export's
    labels and 20,000 random texts made of the pieces that confuse label syntax."""
    from telemetry_nb.sources.dcgm_csv import _plain_labels, _scan_labels

    with open(real_csv, newline="") as fh:
        real = [row["labels_raw"] for row in csv.DictReader(fh)]
    assert all(_plain_labels(raw.strip()) == _scan_labels(raw.strip()) for raw in real)
    assert sum(_plain_labels(raw.strip()) is not None for raw in real) == len(real)  # the export is all plain
    pieces = ["a", "b.c", "_x", "9", "=", '"', '="', '",', ",", " ", "\\", '\\"', "\n", "é", '""', "-", ":"]
    rng = random.Random(7)
    answered = 0
    for _ in range(20_000):  # label lists, then a random piece or two dropped in anywhere
        text = ",".join(f'{rng.choice(["a", "b.c", "_x", "gpu-1", "k:v"])}="'
                        f'{"".join(rng.choice(pieces) for _ in range(rng.randrange(0, 4)))}"'
                        for _ in range(rng.randrange(1, 5)))
        for _ in range(rng.randrange(0, 3)):
            at = rng.randrange(len(text) + 1)
            text = text[:at] + rng.choice(pieces) + text[at:]
        text = text.strip()
        plain = _plain_labels(text)
        if plain is not None:
            answered += 1
            assert plain == _scan_labels(text), text
    assert answered > 200  # the random texts do reach the fast path


def test_memory_does_not_grow_with_file_size(tmp_path):
    """Reading 10x more rows must not need 10x more memory: the source streams."""
    def peak(rows: int) -> int:
        path = tmp_path / f"g{rows}.csv"
        write_csv(path, generate_rows(5, 4, rows / 200, 1.0, seed=1))
        tracemalloc.start()
        n = sum(1 for _ in read_samples(path))
        _, peak_bytes = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert n == rows
        return peak_bytes
    small, large = peak(2_000), peak(20_000)
    assert large < small * 2, (small, large)


def test_random_junk_never_raises():
    rng = random.Random(7)
    alphabet = 'ab,"\n\r;=0123456789.-:TZ \x00\x01\x7f\ud800é'
    words = ["0001-01-01T00:00:00+05:00", "12345678901234567890", "2147483648", "x" * 3000, "nan", "1e400"]
    for _ in range(300):
        junk = "".join(rng.choice(words) if rng.random() < 0.05 else rng.choice(alphabet)
                       for _ in range(rng.randint(0, 300)))
        text = ",".join(HEADER) + "\n" + junk
        for item in read_samples(io.StringIO(text)):
            assert isinstance(item, Sample | Rejected)


@pytest.mark.parametrize("chunk_bytes", [64, 333, 4096])
def test_chunks_for_parallel_parsing_read_exactly_like_one_pass(tmp_path, chunk_bytes):
    rows = [_row(uuid=f"GPU-{i}", value=str(i)) for i in range(40)]
    rows[5] = _row(labels_raw='x="two\nlines"', uuid="GPU-5")  # a quoted newline must never be cut
    rows[17] = _row(value="N/A", uuid="GPU-17")
    rows[31] = _row(pod='has "quotes", and commas', uuid="GPU-31")
    tail = _csv([_row(uuid="GPU-last")]).split("\n", 1)[1]
    text = _csv(rows, quote=csv.QUOTE_ALL, eol="\r\n") + "junk line\r\n" + tail
    path = tmp_path / "c.csv"
    path.write_bytes(("\ufeff" + text).encode())
    from telemetry_nb.sources.dcgm_csv import read_chunk, split_records
    chunks = list(split_records(path, chunk_bytes=chunk_bytes))
    assert len(chunks) > 1 or chunk_bytes == 4096
    parallel = [item for chunk in chunks for item in read_chunk(chunk, with_labels=True)]
    assert parallel == list(read_samples(path))
    assert [(r.line, r.reason) for r in parallel if isinstance(r, Rejected)] == [
        (20, "non-numeric value 'N/A'"), (43, f"expected {len(HEADER)} fields, got 1")]


def test_chunks_tile_the_file_at_record_boundaries(tmp_path):
    """Over random files (quoted line breaks, CRLF, no final newline, unbalanced quotes): the chunks cover
    everything after the header in order, each but an unbalanced last one holds an even count of quotes, ends
    at a line break unless it is the last, and knows its first line number."""
    from telemetry_nb.sources.dcgm_csv import split_records

    pieces = ["a,b,c\n", '"x\ny",z\n', '""\n', 'q"\n', '"open\n', "line\r\n", "\n", "tail", '"a""b",c\n']
    rng = random.Random(11)
    for i in range(200):
        head = rng.choice(["h1,h2\n", '"h\n1",h2\n', "h1,h2\r\n", "h1,h2"])
        body = "".join(rng.choice(pieces) for _ in range(rng.randrange(0, 60))).encode()
        path = tmp_path / f"{i}.csv"
        path.write_bytes(head.encode() + body)
        for size in (1, 7, 64, 1 << 20):
            chunks = list(split_records(path, size))
            data = path.read_bytes()
            start = 0  # the header: its first line, and more lines while a quoted field is open
            while start < len(data) and (start == 0 or data[:start].count(b'"') % 2):
                nl = data.find(b"\n", start)
                start = len(data) if nl < 0 else nl + 1
            assert b"".join(data[c.offset:c.offset + c.length] for c in chunks) == data[start:]
            for n, c in enumerate(chunks):
                text = data[c.offset:c.offset + c.length]
                last = n == len(chunks) - 1
                assert c.length > 0 and (text.endswith(b"\n") or last)
                assert text.count(b'"') % 2 == 0 or last
                assert c.first_line == 1 + data[:c.offset].count(b"\n")


def test_cutting_a_file_keeps_its_pages_out_of_resident_memory(tmp_path):
    """The file is memory-mapped to be counted; its pages must not add up in the streamer's RSS (the peak-RSS
    target is per process, whatever the file size)."""
    path = tmp_path / "big.csv"
    line = ",".join(f'"{v}"' for v in _row()) + "\n"
    with open(path, "w") as fh:
        fh.write(",".join(HEADER) + "\n")
        fh.write(line * (120_000_000 // len(line)))  # 120 MB
    code = ("import sys; from telemetry_nb.sources.dcgm_csv import split_records\n"
            "def kib(key): return int(next(l for l in open('/proc/self/status') if l.startswith(key)).split()[1])\n"
            "before = kib('VmRSS:'); n = sum(1 for _ in split_records(sys.argv[1], 3 << 20))\n"
            "print(n, (kib('VmHWM:') - before) // 1024)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    chunks, grown_mib = (int(v) for v in out.stdout.split())
    assert chunks >= 38
    assert grown_mib < 30, f"peak RSS grew by {grown_mib} MiB while cutting a 120 MB file"


def test_other_column_spellings_are_understood():
    text = ("time,metric,gpu,GPU_UUID,host,model,value\n"
            "2025-07-18 20:42:34.5 UTC,DCGM_FI_DEV_GPU_TEMP,2,GPU-z,n1,A100,61\n")
    [s] = list(read_samples(io.StringIO(text)))
    assert (s.uuid, s.metric, s.gpu_index, s.hostname, s.model_name, s.value) == (
        "GPU-z", "DCGM_FI_DEV_GPU_TEMP", 2, "n1", "A100", 61.0)
    assert s.ts == datetime(2025, 7, 18, 20, 42, 34, 500000, tzinfo=UTC)


def test_exact_column_name_wins_over_an_alias():
    text = "gpu,gpu_id,timestamp,metric_name,uuid,Hostname,value\n9,1,2025-07-18T20:42:34Z,M,GPU-a,h,1\n"
    [s] = list(read_samples(io.StringIO(text)))
    assert s.gpu_index == 1


NOW = datetime(2025, 7, 19, 0, 0, 0, tzinfo=UTC)  # the streamer's clock in these tests


@pytest.mark.parametrize("over, reason", [
    ({"uuid": "GPU-\x00abc"}, "control character '\\x00' in uuid"),
    ({"metric_name": "DCGM\x01UTIL"}, "control character '\\x01' in metric_name"),
    ({"Hostname": "node\x7f1"}, "control character '\\x7f' in Hostname"),
    ({"container": "multi\nline"}, "control character '\\n' in container"),
    ({"pod": "p\ud800"}, "invalid character (lone surrogate) '\\ud800' in pod"),
    ({"metric_name": "M" * 257}, "metric_name is 257 bytes, longer than the 256-byte limit"),
    ({"metric_name": "é" * 129}, "metric_name is 258 bytes, longer than the 256-byte limit"),
    ({"Hostname": "h" * 1025}, "Hostname is 1025 bytes, longer than the 1024-byte limit"),
    ({"modelName": "m" * 5000}, "modelName is 5000 bytes, longer than the 1024-byte limit"),
    ({"namespace": "n" * 1000, "pod": "p" * 1000, "container": "c" * 100},
     "namespace, pod and container are 2100 bytes together, longer than 2048"),
    ({"gpu_id": "2147483648"}, "gpu_id '2147483648' out of range 0..2147483647"),
    ({"gpu_id": "-1"}, "gpu_id '-1' out of range 0..2147483647"),
    ({"timestamp": "0001-01-01T00:00:00+05:00"}, "timestamp out of range '0001-01-01T00:00:00+05:00'"),
    ({"timestamp": "12345678901234567890"}, "timestamp out of range '12345678901234567890'"),
    ({"timestamp": "1999-12-31T23:59:59Z"}, "timestamp '1999-12-31T23:59:59Z' is before 2000-01-01T00:00:00Z"),
    ({"timestamp": "2025-07-20T00:00:01Z"},
     "timestamp '2025-07-20T00:00:01Z' is more than 86400s ahead of the clock (2025-07-19T00:00:00Z)"),
])
def test_values_postgres_would_refuse_are_rejected_rows(over, reason):
    text = _csv([_row(uuid="GPU-good1"), _row(**over), _row(uuid="GPU-good2")])
    out = list(read_samples(io.StringIO(text), now=lambda: NOW))
    assert [type(o) for o in out] == [Sample, Rejected, Sample]
    assert (out[1].line, out[1].reason) == (3, reason)
    out[1].raw.encode()  # the raw text can be published (no lone surrogates)


def test_limits_at_their_edges_are_accepted_and_configurable():
    edge = _row(metric_name="M" * 256, Hostname="h" * 1024, gpu_id="2147483647", timestamp="2025-07-20T00:00:00Z")
    [s] = list(read_samples(io.StringIO(_csv([edge])), now=lambda: NOW))
    assert isinstance(s, Sample) and s.gpu_index == 2**31 - 1
    strict = RowLimits(min_ts=datetime(2025, 7, 18, tzinfo=UTC), max_future_s=60)
    rows = [_row(timestamp="2025-07-17T23:59:59Z"), _row(timestamp="2025-07-19T00:01:01Z"),
            _row(timestamp="2025-07-19T00:00:59Z")]
    out = list(read_samples(io.StringIO(_csv(rows)), limits=strict, now=lambda: NOW))
    assert [type(o) for o in out] == [Rejected, Rejected, Sample]
    assert "before 2025-07-18T00:00:00Z" in out[0].reason and "more than 60s ahead" in out[1].reason


def test_fuzzed_rows_are_stored_or_rejected_never_refused():
    """Good rows mixed with every kind of bad value: each is a Sample PostgreSQL can store, or a Rejected."""
    rng = random.Random(11)
    poison = {
        "uuid": ["GPU-\x00", "GPU-\x1b[31m", "U" * 3000, "GPU-\ud801"],
        "metric_name": ["DCGM\x00", "M" * 300, "M_" + "ä" * 200, "\t"],
        "Hostname": ["h\x00", "h" * 9000, "h\rx"], "device": ["d\x07"], "modelName": ["m" * 1025],
        "pod": ["p" * 2000, "p\x00"], "namespace": ["n\x1fs"], "container": ["c" * 1500],
        "gpu_id": ["99999999999", "-5", "1e3", "2147483648", "9" * 30],
        "timestamp": ["0001-01-01T00:00:00+05:00", "9999-12-31T23:59:59-05:00", "12345678901234567890",
                      "99999999999999999999.5", "1970-01-01T00:00:00Z", "2100-01-01T00:00:00Z", "1e400"],
        "value": ["1e400", "-inf", "0x10", "NaN"],
    }
    rows, expect_bad = [], []
    for i in range(400):
        over = {"uuid": f"GPU-{i}"}
        bad = rng.random() < 0.5
        if bad:
            field = rng.choice(sorted(poison))
            over[field] = rng.choice(poison[field])
        rows.append(_row(**over))
        expect_bad.append(bad)
    out = list(read_samples(io.StringIO(_csv(rows)), now=lambda: NOW))
    assert len(out) == len(rows)
    limits = RowLimits()
    for item, bad, row in zip(out, expect_bad, rows, strict=True):
        if isinstance(item, Rejected):
            assert bad and item.reason, row
            continue
        assert not bad, (row, item)
        names = (item.uuid, item.metric, item.hostname, item.device, item.model_name, item.container, item.pod,
                 item.namespace)
        assert limits.check_names(*names) is None
        assert 0 <= item.gpu_index <= 2**31 - 1 and datetime(2000, 1, 1, tzinfo=UTC) <= item.ts <= NOW

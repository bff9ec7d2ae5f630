"""The stream entry encoding: round trip, ids, and refusal of entries it cannot read."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest

from telemetry_nb.model import Sample
from telemetry_nb.pipeline import codec
from telemetry_nb.store import binary

T0 = datetime(2025, 7, 18, 20, 42, 34, 250000, tzinfo=UTC)


def _samples() -> list[Sample]:
    return [
        Sample("GPU-a", "DCGM_FI_DEV_GPU_UTIL", T0, 97.0, "h1", 0, "nvidia0", "H100", "c", "p", "ns"),
        Sample("GPU-a", "DCGM_FI_DEV_POWER_USAGE", T0, 301.123456789, "h1", 0, "nvidia0", "H100"),
        Sample("GPU-b", "DCGM_FI_DEV_GPU_UTIL", T0, 0.1 + 0.2, "h2", 1, "nvidia1", "H100"),
    ]


def _key(s: Sample) -> tuple:
    return (s.uuid, s.metric, s.ts)


def test_round_trip_is_exact():
    samples = _samples()
    batch = codec.decode(codec.encode(samples))
    assert batch.binary and batch.plain == 2  # binary rows, the two without a workload first
    back = codec.decode_samples(batch)
    # values bit-exact, timestamps to the microsecond, workloads and inventory kept (rows reordered by kind)
    assert sorted(back, key=_key) == sorted(samples, key=_key)


def _text_entry(samples: list[Sample]) -> dict[bytes, bytes]:
    """A version-1 entry (COPY text rows) of the samples, as streamers before version 2 wrote them."""
    return codec.as_text(codec.encode(samples))


def test_version_1_text_entries_still_decode_to_the_same_samples():
    samples = _samples()
    fields_v1 = _text_entry(samples)
    text = codec.decode(fields_v1)
    assert fields_v1[b"v"] == b"1" and not text.binary and text.rows.count(b"\n") == 3
    assert sorted(codec.decode_samples(text), key=_key) == sorted(samples, key=_key)
    binary = codec.decode(codec.encode(samples))
    assert (sorted(text.gpus), sorted(text.metrics), text.workloads) == (
        sorted(binary.gpus), sorted(binary.metrics), binary.workloads)


def test_subsets_of_binary_rows_keep_the_layout_and_their_inventory():
    batch = codec.decode(codec.encode(_samples()))
    lines = batch.lines()
    assert sorted(map(len, lines)) == [50, 50, 58]
    part = batch.subset([lines[2], lines[0]])  # the workload row given first
    assert part.plain == 1 and part.n == 2 and codec.decode(codec.encode_batch(part)).rows == part.rows
    assert {g.uuid for g in part.gpus} == {"GPU-a"} and [w.pod for w in part.workloads] == ["p"]
    assert "gpu GPU-a on h1 metric DCGM_FI_DEV_POWER_USAGE ts 2025-07-18T20:42:34.250000+00:00 value 301.12" in (
        part.describe())


def test_ids_are_stable_and_distinct():
    assert codec.gpu_key("GPU-a") == codec.gpu_key("GPU-a") != codec.gpu_key("GPU-b")
    assert -(2 ** 63) <= codec.gpu_key("GPU-a") < 2 ** 63
    assert -(2 ** 31) <= codec.metric_key("DCGM_FI_DEV_GPU_UTIL") < 2 ** 31
    assert codec.workload_key("ns", "p", "c") != codec.workload_key("ns", "pc", "")


def test_side_fields_carry_inventory_once_per_gpu():
    batch = codec.decode(codec.encode(_samples()))
    assert batch.n == 3
    assert sorted(g.uuid for g in batch.gpus) == ["GPU-a", "GPU-b"]
    assert sorted((m.name, m.rows) for m in batch.metrics) == [("DCGM_FI_DEV_GPU_UTIL", 2),
                                                               ("DCGM_FI_DEV_POWER_USAGE", 1)]
    assert [(w.namespace, w.pod, w.container) for w in batch.workloads] == [("ns", "p", "c")]


@pytest.mark.parametrize("mutate, message", [
    (lambda f: f.update({b"v": b"9"}), "unsupported batch encoding version"),
    (lambda f: f.pop(b"rows"), "lacks field 'rows'"),
    (lambda f: f.update({b"gpus": b"{not json"}), "malformed"),
    (lambda f: f.update({b"n": b"7"}), "158 bytes are not 2 rows without and 5 with a workload"),
    (lambda f: f.update({b"plain": b"3"}), "158 bytes are not 3 rows without and 0 with a workload"),
    (lambda f: f.update({b"rows": f[b"rows"][:64] + b"\x00\x00\x00\x09" + f[b"rows"][68:]}),
     "row 1 of a binary batch is not a telemetry row"),
    (lambda f: f.pop(b"plain"), "lacks field 'plain'"),
])
def test_bad_entries_raise_codec_error(mutate, message):
    fields = codec.encode(_samples())
    mutate(fields)
    with pytest.raises(codec.CodecError, match=message):
        codec.decode(fields)


def test_binary_check_flags_exactly_the_rows_whose_framing_bytes_are_wrong():
    """Every byte of every row changed in turn: refused iff it is a field count or length, naming its row."""
    fields = codec.encode(_samples())  # 2 rows without a workload, then 1 with one
    rows, plain = fields[b"rows"], int(fields[b"plain"])
    framing = {0, 1, *range(2, 6), *range(14, 18), *range(26, 30), *range(34, 38), *range(46, 50)}
    starts = [0, binary.PLAIN_SIZE, 2 * binary.PLAIN_SIZE, len(rows)]
    for at in range(len(rows)):
        bad = bytearray(rows)
        bad[at] ^= 0x41
        row = next(i for i in range(3) if starts[i] <= at < starts[i + 1])
        wrong = binary.check(bytes(bad), plain, 3)
        if at - starts[row] in framing:
            assert wrong == f"row {row - (row >= plain) * plain} of a binary batch is not a telemetry row", at
        else:
            assert wrong is None, at


@pytest.mark.parametrize("field, value, what", [
    (b"gpus", b"[[1]]", "gpus"),
    (b"gpus", b'[["not-an-id","GPU-a","h",0,"d","m"]]', "gpus"),
    (b"metrics", b'[[1,"M","many"]]', "metrics"),
    (b"workloads", b'[[1,"ns"]]', "workloads"),
])
def test_side_fields_of_the_wrong_shape_are_refused(field, value, what):
    fields = codec.encode(_samples())
    fields[field] = value
    with pytest.raises(codec.CodecError, match=f"malformed {what} row"):
        codec.decode(fields)


def test_a_side_row_seen_before_is_reused_and_a_changed_one_checked_again():
    """Rows equal to one already checked for their id are taken as they are; any difference is checked anew."""
    fields = codec.encode([Sample("GPU-s", "DCGM_FI_DEV_GPU_UTIL", T0, 1.0, "h1", 0, "nvidia0", "H100",
                                  labels={"UUID": "GPU-s", "rack": "r1"}, pci_bus_id="00000000:07:00.0")])
    first = codec.decode(fields)
    row = orjson.loads(fields[b"gpus"])[0]
    again = codec.decode({**fields, b"gpus": orjson.dumps([row]) + b" "})  # new bytes, same rows
    assert again.gpus[0] is first.gpus[0]
    changed = {**fields, b"gpus": orjson.dumps([[row[0], row[1], 7, row[3], row[4], row[5]]])}
    with pytest.raises(codec.CodecError, match="malformed gpus row"):  # a hostname that is not text
        codec.decode(changed)
    inv = orjson.loads(fields[b"inventory"])[0]
    moved = codec.decode({**fields, b"inventory": orjson.dumps([[*inv[:3], {**inv[3], "rack": "r2"}, *inv[4:]]])})
    assert moved.inventory[0].labels["rack"] == "r2"
    with pytest.raises(codec.CodecError, match="malformed inventory row"):
        codec.decode({**fields, b"inventory": orjson.dumps([[*inv[:3], {"rack": 2}, *inv[4:]]])})


def test_encode_series_makes_the_entry_encode_makes():
    """The live sources' fast path (per-series work once) encodes exactly what `encode` does."""
    from dataclasses import replace

    base = Sample("GPU-m:gi1", "DCGM_FI_PROF_GR_ENGINE_ACTIVE", T0, 0.5, "h1", 0, "nvidia0", "A100", "c", "p", "ns",
                  {"UUID": "GPU-m", "GPU_I_ID": "1", "pod": "p"}, "0:7:0", "550", "GPU-m", "1g.5gb", 1)
    other = Sample("GPU-a", "DCGM_FI_DEV_XID_ERRORS", T0, 43.0, "h1", 1, "nvidia1", "A100",
                   labels={"UUID": "GPU-a", "err_msg": "GPU stopped processing"})
    samples = [base, replace(base, metric="DCGM_FI_DEV_FB_USED", value=1024.0), other,
               replace(other, metric="DCGM_FI_DEV_GPU_TEMP", value=40.0, labels={"UUID": "GPU-a", "extra": "x"})]
    series = {id(s.labels): codec.Series(s) for s in samples}
    rows = [(series[id(s.labels)], s.metric, s.ts.isoformat(), s.value) for s in samples]
    assert codec.encode_series(rows) == codec.encode(samples)

"""The exposition parser on texts in the shapes real dcgm-exporters emit, across versions, MIG, pods and XID."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

from prometheus_client.parser import text_string_to_metric_families

from telemetry_nb.model import Rejected, Sample, mig_uuid
from telemetry_nb.sources.dcgm_csv import read_samples
from telemetry_nb.sources.scrape import ExpositionParser, parse_exposition

T = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
UUID0 = "GPU-5fd4f087-86f3-7a43-b711-4771313afc50"
UUID1 = "GPU-bc7a12ab-4998-fdc5-0785-2678a929a142"

# dcgm-exporter 3.x: Hostname/UUID, HELP and TYPE, static labels, empty workload labels
V3 = f"""# HELP DCGM_FI_DEV_SM_CLOCK SM clock frequency (in MHz).
# TYPE DCGM_FI_DEV_SM_CLOCK gauge
DCGM_FI_DEV_SM_CLOCK{{gpu="0",UUID="{UUID0}",pci_bus_id="00000000:18:00.0",device="nvidia0",modelName="NVIDIA H100 80GB HBM3",Hostname="node-a",DCGM_FI_DRIVER_VERSION="535.129.03",container="",namespace="",pod=""}} 1980
DCGM_FI_DEV_SM_CLOCK{{gpu="1",UUID="{UUID1}",pci_bus_id="00000000:2A:00.0",device="nvidia1",modelName="NVIDIA H100 80GB HBM3",Hostname="node-a",DCGM_FI_DRIVER_VERSION="535.129.03",container="main",namespace="ml",pod="train-0"}} 1410
# HELP DCGM_FI_DEV_GPU_UTIL GPU utilization (in %).
# TYPE DCGM_FI_DEV_GPU_UTIL gauge
DCGM_FI_DEV_GPU_UTIL{{gpu="0",UUID="{UUID0}",pci_bus_id="00000000:18:00.0",device="nvidia0",modelName="NVIDIA H100 80GB HBM3",Hostname="node-a",DCGM_FI_DRIVER_VERSION="535.129.03",container="",namespace="",pod=""}} 0
DCGM_FI_DEV_GPU_UTIL{{gpu="1",UUID="{UUID1}",pci_bus_id="00000000:2A:00.0",device="nvidia1",modelName="NVIDIA H100 80GB HBM3",Hostname="node-a",DCGM_FI_DRIVER_VERSION="535.129.03",container="main",namespace="ml",pod="train-0"}} 97
"""

# the 2026 spelling: hostname/uuid, labels in another order, pod_uid, no HELP/TYPE, blank lines,
# workload labels absent on one GPU, CRLF line ends, no trailing newline
V2026 = (
    f'DCGM_FI_DEV_SM_CLOCK{{uuid="{UUID0}",hostname="node-a",gpu="0",device="nvidia0",modelName="NVIDIA H100 80GB HBM3",'
    f'DCGM_FI_DRIVER_VERSION="535.129.03",pci_bus_id="00000000:18:00.0"}} 1980\r\n'
    "\r\n"
    f'DCGM_FI_DEV_SM_CLOCK{{pod="train-0",namespace="ml",container="main",pod_uid="4f1c",uuid="{UUID1}",'
    f'hostname="node-a",gpu="1",device="nvidia1",modelName="NVIDIA H100 80GB HBM3",DCGM_FI_DRIVER_VERSION="535.129.03",'
    f'pci_bus_id="00000000:2A:00.0"}} 1410\r\n'
    "\n"
    f'DCGM_FI_DEV_GPU_UTIL{{uuid="{UUID0}",hostname="node-a",gpu="0",device="nvidia0",modelName="NVIDIA H100 80GB HBM3",'
    f'DCGM_FI_DRIVER_VERSION="535.129.03",pci_bus_id="00000000:18:00.0"}} 0\r\n'
    f'DCGM_FI_DEV_GPU_UTIL{{pod="train-0",namespace="ml",container="main",pod_uid="4f1c",uuid="{UUID1}",'
    f'hostname="node-a",gpu="1",device="nvidia1",modelName="NVIDIA H100 80GB HBM3",DCGM_FI_DRIVER_VERSION="535.129.03",'
    f'pci_bus_id="00000000:2A:00.0"}} 97'
)


def _samples(rows) -> list[Sample]:
    return [r for r in rows if isinstance(r, Sample)]


def _rejected(rows) -> list[Rejected]:
    return [r for r in rows if isinstance(r, Rejected)]


def _key(s: Sample) -> tuple:
    return (s.uuid, s.metric, s.ts, s.value, s.hostname, s.gpu_index, s.device, s.model_name, s.container, s.pod,
            s.namespace, s.pci_bus_id, s.driver_version, s.parent_uuid, s.mig_profile, s.mig_instance)


def test_exporter_3x_text_is_read_with_every_label():
    rows = parse_exposition(V3, T)
    assert _rejected(rows) == []
    s = _samples(rows)
    assert [(x.uuid, x.metric, x.value) for x in s] == [
        (UUID0, "DCGM_FI_DEV_SM_CLOCK", 1980.0), (UUID1, "DCGM_FI_DEV_SM_CLOCK", 1410.0),
        (UUID0, "DCGM_FI_DEV_GPU_UTIL", 0.0), (UUID1, "DCGM_FI_DEV_GPU_UTIL", 97.0)]
    first = s[0]
    assert (first.hostname, first.gpu_index, first.device, first.model_name) == \
        ("node-a", 0, "nvidia0", "NVIDIA H100 80GB HBM3")
    assert (first.pci_bus_id, first.driver_version, first.parent_uuid, first.mig_instance) == \
        ("00000000:18:00.0", "535.129.03", "", None)
    assert all(x.ts == T for x in s)  # no timestamp in the text: the scrape time
    assert first.labels == {"gpu": "0", "UUID": UUID0, "pci_bus_id": "00000000:18:00.0", "device": "nvidia0",
                            "modelName": "NVIDIA H100 80GB HBM3", "Hostname": "node-a",
                            "DCGM_FI_DRIVER_VERSION": "535.129.03", "container": "", "namespace": "", "pod": ""}
    assert (s[1].container, s[1].pod, s[1].namespace) == ("main", "train-0", "ml")


def test_2026_spelling_gives_the_same_samples_as_3x():
    old, new = parse_exposition(V3, T), parse_exposition(V2026, T)
    assert _rejected(new) == []
    assert [_key(s) for s in _samples(new)] == [_key(s) for s in _samples(old)]
    assert _samples(new)[1].labels["pod_uid"] == "4f1c"  # kept, though it is not a column


def test_mig_instances_are_their_own_gpus_and_never_mix_with_the_parent():
    text = f"""# TYPE DCGM_FI_PROF_GR_ENGINE_ACTIVE gauge
DCGM_FI_PROF_GR_ENGINE_ACTIVE{{gpu="0",UUID="{UUID0}",device="nvidia0",modelName="NVIDIA A100-SXM4-40GB",GPU_I_PROFILE="1g.5gb",GPU_I_ID="7",Hostname="mig-node"}} 0.25
DCGM_FI_PROF_GR_ENGINE_ACTIVE{{gpu="0",UUID="{UUID0}",device="nvidia0",modelName="NVIDIA A100-SXM4-40GB",GPU_I_PROFILE="3g.20gb",GPU_I_ID="1",Hostname="mig-node"}} 0.75
DCGM_FI_DEV_FB_USED{{gpu="0",UUID="{UUID0}",device="nvidia0",modelName="NVIDIA A100-SXM4-40GB",GPU_I_PROFILE="1g.5gb",GPU_I_ID="7",Hostname="mig-node"}} 1024
DCGM_FI_DEV_GPU_TEMP{{gpu="0",UUID="{UUID0}",device="nvidia0",modelName="NVIDIA A100-SXM4-40GB",Hostname="mig-node"}} 41
"""
    s = _samples(parse_exposition(text, T))
    assert [(x.uuid, x.metric, x.value, x.parent_uuid, x.mig_profile, x.mig_instance) for x in s] == [
        (mig_uuid(UUID0, 7), "DCGM_FI_PROF_GR_ENGINE_ACTIVE", 0.25, UUID0, "1g.5gb", 7),
        (mig_uuid(UUID0, 1), "DCGM_FI_PROF_GR_ENGINE_ACTIVE", 0.75, UUID0, "3g.20gb", 1),
        (mig_uuid(UUID0, 7), "DCGM_FI_DEV_FB_USED", 1024.0, UUID0, "1g.5gb", 7),
        (UUID0, "DCGM_FI_DEV_GPU_TEMP", 41.0, "", "", None),
    ]
    assert mig_uuid(UUID0, 7) == f"{UUID0}:gi7" and "/" not in mig_uuid(UUID0, 7)  # usable in a URL path


def test_xid_with_messages_escapes_and_sample_timestamps():
    text = (f'DCGM_FI_DEV_XID_ERRORS{{gpu="0",UUID="{UUID0}",Hostname="n",err_code="79",'
            f'err_msg="GPU has fallen off the bus {{\\"pcie\\"}}\\nreset required"}} 79 1772366400123\n'
            f'DCGM_FI_DEV_XID_ERRORS{{gpu="1",UUID="{UUID1}",Hostname="n",err_code="0",err_msg=""}} 0\n')
    s = _samples(parse_exposition(text, T))
    assert s[0].value == 79.0 and s[0].labels["err_code"] == "79"
    assert s[0].labels["err_msg"] == 'GPU has fallen off the bus {"pcie"}\nreset required'
    assert s[0].ts == datetime(2026, 3, 1, 12, 0, 0, 123000, tzinfo=UTC)  # the sample's own timestamp (ms)
    assert s[1].ts == T and s[1].value == 0.0


def test_bad_values_are_rejected_with_line_and_reason_and_the_rest_is_kept():
    good = f'{{gpu="0",UUID="{UUID0}",Hostname="n"}}'
    text = "\n".join([
        "# HELP DCGM_FI_DEV_GPU_TEMP GPU temperature (in C).",       # 1
        f"DCGM_FI_DEV_GPU_TEMP{good} 40",                              # 2 kept
        f"DCGM_FI_DEV_POWER_USAGE{good} NaN",                          # 3 NaN
        f"DCGM_FI_DEV_SM_CLOCK{good} +Inf",                            # 4 Inf
        f"DCGM_FI_DEV_MEM_CLOCK{good} 2147483632",                     # 5 int32 blank
        f"DCGM_FI_DEV_FB_USED{good} 9223372036854775792",              # 6 int64 blank
        f"DCGM_FI_DEV_POWER_MGMT_LIMIT{good} 140737488355328",         # 7 fp64 blank
        f'DCGM_FI_DEV_GPU_UTIL{{gpu="0",UUID="{UUID0}" 12',            # 8 malformed: no closing brace
        f"DCGM_FI_DEV_GPU_UTIL{good} twelve",                          # 9 non-numeric
        f"DCGM_FI_DEV_GPU_TEMP{good} 41",                              # 10 duplicate series
        'DCGM_FI_DEV_GPU_UTIL{gpu="0",Hostname="n"} 5',                # 11 no uuid
        f"DCGM_FI_DEV_ENC_UTIL{good} 3 soon",                          # 12 bad timestamp
        "this is not a sample line at all",                            # 13 malformed
        f'DCGM_FI_DEV_DEC_UTIL{{gpu="0",UUID="{UUID0}",Hostname="n",}} 1',  # 14 kept (trailing comma)
        "dcgm_exporter_last_update_seconds 1.7e9",                     # 15 not a DCGM field: ignored
        f"DCGM_FI_DEV_MEM_COPY_UTIL{good} -Inf",                       # 16
    ])
    rows = parse_exposition(text, T)
    assert [(s.metric, s.value) for s in _samples(rows)] == [("DCGM_FI_DEV_GPU_TEMP", 40.0),
                                                              ("DCGM_FI_DEV_DEC_UTIL", 1.0)]
    got = {(r.line, r.reason) for r in _rejected(rows)}
    assert got == {
        (3, "non-finite value 'NaN'"), (4, "non-finite value '+Inf'"),
        (5, "DCGM blank value 2147483632 (int32 field not supported or not available)"),
        (6, "DCGM blank value 9223372036854775792 (int64 field not supported or not available)"),
        (7, "DCGM blank value 140737488355328 (fp64 field not supported or not available)"),
        (8, "malformed sample line"), (9, "non-numeric value 'twelve'"),
        (10, f"duplicate series: DCGM_FI_DEV_GPU_TEMP of {UUID0} already in this scrape (first kept)"),
        (11, "no UUID/uuid label"), (12, "invalid timestamp 'soon'"), (13, "malformed sample line"),
        (16, "non-finite value '-Inf'"),
    }
    assert next(r for r in _rejected(rows) if r.line == 9).raw == f"DCGM_FI_DEV_GPU_UTIL{good} twelve"


def test_a_warm_parser_answers_exactly_as_a_fresh_one_whatever_the_values_become():
    """A warm parser reuses the label sets of earlier scrapes; what each line becomes must not depend on that:
    the same samples, rejects (line, reason, text) and ignored count as a fresh parser."""
    import random

    rng = random.Random(7)
    labels = [f'{{gpu="{g}",UUID="{u}",Hostname="n"}}' for g, u in ((0, UUID0), (1, UUID1))]
    names = ["DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_SM_CLOCK", "DCGM_FI_DEV_FB_USED"]
    odd = ["NaN", "+Inf", "-Inf", "2147483632", "9223372036854775792", "140737488355328", "twelve", "1_5",
           "4.2e1", "-0", "", "7 1700000000000", "7 soon"]
    warm = ExpositionParser()
    for scrape in range(90):
        dirty = scrape % 3 == 1  # the others exactly what dcgm-exporter writes
        lines = ["# HELP DCGM_FI_DEV_GPU_TEMP GPU temperature (in C).", "# TYPE DCGM_FI_DEV_GPU_TEMP gauge",
                 f"dcgm_exporter_build_info{labels[0]} {rng.choice(['1', 'x']) if dirty else '1'}", ""]
        for lab in labels:
            for name in names:
                value = rng.choice(odd) if dirty and rng.random() < 0.3 else str(rng.randrange(0, 100))
                sep = " " if not dirty or rng.random() < 0.9 else rng.choice(["  ", "\t", " \t"])
                lines.append(f"{name}{lab}{sep}{value}".rstrip())
                if dirty and rng.random() < 0.05:
                    lines.append(lines[-1])  # a repeated series
        if dirty and rng.random() < 0.2:
            lines.insert(rng.randrange(len(lines)), "  " + lines[-1])  # indented
        if dirty and rng.random() < 0.2:
            lines.append(f'DCGM_FI_DEV_GPU_TEMP{{gpu="9",UUID="GPU-new-{scrape}"}} 1')  # a label set not seen yet
        if scrape % 3 == 2:
            lines.append(lines[-1])  # plain, but a series twice: the second is refused
        rng.shuffle(lines)
        text = "\n".join(lines)
        ts = T + timedelta(seconds=30 * scrape)
        ignored_before = warm.ignored
        ours = list(warm.parse(text, ts, default_host="h"))
        fresh = list(ExpositionParser().parse(text, ts, default_host="h"))
        assert [_key(x) if isinstance(x, Sample) else (x.line, x.reason, x.raw) for x in ours] == \
               [_key(x) if isinstance(x, Sample) else (x.line, x.reason, x.raw) for x in fresh], scrape
        assert warm.ignored == ignored_before + sum(
            1 for ln in lines if ln.strip().startswith("dcgm_exporter_build_info") and ln.split()[-1] == "1")


def test_malformed_labels_reject_only_their_line():
    text = (f'DCGM_FI_DEV_GPU_UTIL{{gpu="0",UUID="{UUID0}",bad label="x"}} 1\n'
            f'DCGM_FI_DEV_GPU_UTIL{{gpu="1",UUID="{UUID1}",gpu="2"}} 1\n'
            f'DCGM_FI_DEV_GPU_UTIL{{gpu="x",UUID="{UUID1}"}} 1\n'
            f'DCGM_FI_DEV_GPU_TEMP{{gpu="1",UUID="{UUID1}"}} 30\n')
    rows = parse_exposition(text, T)
    assert [r.line for r in _rejected(rows)] == [1, 2, 3]
    assert _rejected(rows)[1].reason == "label 'gpu' given twice"
    assert _rejected(rows)[2].reason == "non-integer gpu label 'x'"
    assert [s.metric for s in _samples(rows)] == ["DCGM_FI_DEV_GPU_TEMP"]


def test_missing_hostname_falls_back_to_the_target_host_and_cache_is_per_target():
    parser = ExpositionParser()
    text = f'DCGM_FI_DEV_GPU_UTIL{{gpu="0",UUID="{UUID0}"}} 1\n'
    a = _samples(parser.parse(text, T, default_host="10.0.0.1"))
    b = _samples(parser.parse(text, T, default_host="10.0.0.2"))
    assert (a[0].hostname, b[0].hostname) == ("10.0.0.1", "10.0.0.2")
    again = _samples(parser.parse(text, T, default_host="10.0.0.1"))
    assert again[0].labels is a[0].labels  # a label set is parsed once and shared


def test_agrees_with_prometheus_client_on_good_text():
    rows = _samples(parse_exposition(V3, T))
    theirs = [(s.name, dict(s.labels), s.value) for f in text_string_to_metric_families(V3) for s in f.samples]
    assert [(s.metric, s.labels, s.value) for s in rows] == theirs


def test_csv_labels_raw_fill_the_inventory_and_mig(real_csv):
    first = next(iter(read_samples(real_csv)))
    assert first.driver_version == "535.129.03"
    assert first.labels["instance"] == "mtv5-dgx1-hgpu-031:9400" and first.labels["job"] == "dgx_dcgm_exporter"
    text = ("timestamp,metric_name,gpu_id,device,uuid,modelName,Hostname,container,pod,namespace,value,labels_raw\n"
            f'2026-03-01T12:00:00Z,DCGM_FI_PROF_GR_ENGINE_ACTIVE,0,nvidia0,{UUID0},A100,h,,,,0.5,'
            '"GPU_I_ID=""3"",GPU_I_PROFILE=""2g.10gb"",pci_bus_id=""00000000:07:00.0"""\n'
            f'2026-03-01T12:00:00Z,DCGM_FI_PROF_GR_ENGINE_ACTIVE,0,nvidia0,{UUID0},A100,h,,,,0.5,'
            '"GPU_I_ID=""three"""\n')
    rows = list(read_samples(io.StringIO(text)))
    mig = rows[0]
    assert (mig.uuid, mig.parent_uuid, mig.mig_instance, mig.mig_profile, mig.pci_bus_id) == \
        (mig_uuid(UUID0, 3), UUID0, 3, "2g.10gb", "00000000:07:00.0")
    assert isinstance(rows[1], Rejected) and rows[1].line == 3 and rows[1].reason == "non-integer GPU_I_ID 'three'"

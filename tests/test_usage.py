"""GPU accounting (issue 13) against a real PostgreSQL and API: usage and workloads equal a direct
computation over the stored samples, through packed hours, rollups and an unrefreshed tail."""

from __future__ import annotations

import math
from collections import defaultdict
from datetime import UTC, datetime, timedelta

import httpx
import psycopg
import pytest

from telemetry_nb import store
from telemetry_nb.analysis.client import TelemetryClient
from telemetry_nb.model import Sample
from telemetry_nb.pipeline import codec
from telemetry_nb.pipeline.maintainer import Maintainer
from telemetry_nb.sources.dcgm_csv import read_samples
from telemetry_nb.store import lifecycle
from telemetry_nb.store.usage import ENGINE_ACTIVE, UTIL, plan

T0 = datetime(2025, 7, 10, tzinfo=UTC)
H = 3600
TAIL_S = 13 * H  # samples from here on are written after the maintenance pass: not rolled up yet
END_S = 14 * H


def util_at(gpu: int, i: int) -> float:
    """Deterministic utilization with idle stretches, values around the 5 % threshold and busy stretches."""
    x = (i * 7919 + gpu * 104729) % 1000
    if (i // 40 + gpu) % 3 == 0:
        return float(x % 9)  # 0..8: around the threshold
    return float(x % 101)


# (uuid, interval s, metric, [(from s, to s, workload or None)]); gaps are simply not listed
FLEET = [
    ("GPU-a", 30, UTIL, [(0, 5 * H, ("ml", "train-a", "pytorch")), (5 * H, END_S, None)]),
    ("GPU-b", 30, UTIL, [(0, 5 * H, None), (5 * H, 9 * H, ("ml", "train-a", "pytorch")),
                         (9 * H, END_S, ("research", "nb-x", "jupyter"))]),  # train-a moves from GPU-a to GPU-b
    ("GPU-c", 30, UTIL, [(0, 6 * H + 600, ("research", "nb-y", "jupyter"))]),  # stops reporting at 6:10
    ("MIG-d", 60, ENGINE_ACTIVE, [(0, 2 * H, None), (2 * H, 12 * H, ("ml", "train-b", "jax")),
                                  (12 * H, END_S, None)]),
    ("GPU-e", 10, UTIL, [(0, END_S, None)]),  # idle-ish, never attributed, 10 s samples
    ("GPU-f", 30, UTIL, [(0, 3 * H, ("ops", "probe", "c")), (4 * H + 7, END_S, ("ops", "probe", "c"))]),  # gap
]
HOST = {"GPU-a": "node-1", "GPU-b": "node-1", "GPU-c": "node-2", "MIG-d": "node-2", "GPU-e": "node-3",
        "GPU-f": "node-3"}


def schedule() -> list[Sample]:
    out = []
    for g, (uuid, step, metric, spans) in enumerate(FLEET):
        for a, b, w in spans:
            for s in range(a, b, step):
                u = util_at(g, s // step)
                value = u / 100.0 if metric == ENGINE_ACTIVE else u
                ns, pod, c = w or ("", "", "")
                kw = dict(hostname=HOST[uuid], gpu_index=g, device=f"nvidia{g}",
                          model_name="A100 MIG 3g.40gb" if uuid.startswith("MIG") else "H100",
                          namespace=ns, pod=pod, container=c)
                ts = T0 + timedelta(seconds=s)
                out.append(Sample(uuid, metric, ts, value, **kw))
                out.append(Sample(uuid, "DCGM_FI_DEV_GPU_TEMP", ts, 40.0 + u / 10, **kw))
    return out


def write(conn, samples: list[Sample], chunk: int = 20000) -> None:
    writer = store.Writer(conn, partition=lifecycle.HOUR * 6)
    for i in range(0, len(samples), chunk):
        writer.write([codec.decode(codec.encode(samples[i:i + chunk]))])


def stored(conn, start: datetime, end: datetime) -> list[tuple]:
    """The utilization samples in [start, end] straight from `telemetry` (raw ∪ packed), with their owners."""
    return conn.execute(
        "SELECT g.uuid, g.hostname, g.model_name, m.name, t.value, w.namespace, w.pod FROM telemetry t "
        "JOIN gpus g ON g.id = t.gpu_id JOIN metrics m ON m.id = t.metric_id "
        "LEFT JOIN workloads w ON w.id = t.workload_id WHERE m.name = ANY(%s) AND t.ts >= %s AND t.ts <= %s",
        ([UTIL, ENGINE_ACTIVE], start, end)).fetchall()


def direct(rows: list[tuple], group_by: str, threshold: float) -> dict:
    """The report computed from the stored samples and the known sampling intervals."""
    interval = {uuid: step for uuid, step, _, _ in FLEET}
    has_util = {r[0] for r in rows if r[3] == UTIL}
    out: dict = defaultdict(lambda: {"gpu_hours": 0.0, "busy_gpu_hours": 0.0, "idle_gpu_hours": 0.0, "gpus": set()})
    for uuid, host, model, metric, value, ns, pod in rows:
        if (metric == UTIL) != (uuid in has_util):
            continue
        util = value * 100 if metric == ENGINE_ACTIVE else value
        key = {"hostname": host, "model_name": model, "namespace": ns or None,
               "pod": f"{ns}/{pod}" if ns else None}[group_by]
        h = interval[uuid] / 3600
        g = out[key]
        g["gpu_hours"] += h
        g["busy_gpu_hours"] += util / 100 * h
        g["idle_gpu_hours"] += h if util < threshold else 0.0
        g["gpus"].add(uuid)
    return out


def assert_report(body: dict, truth: dict) -> None:
    got = {i["group"]: i for i in body["items"]}
    assert set(got) == set(truth)
    for key, t in truth.items():
        i = got[key]
        assert i["gpus"] == len(t["gpus"])
        assert math.isclose(i["gpu_hours"], t["gpu_hours"], rel_tol=1e-12), key
        for f in ("busy_gpu_hours", "idle_gpu_hours"):
            assert math.isclose(i[f], t[f], rel_tol=1e-6, abs_tol=1e-12), (key, f, i[f], t[f])
        assert math.isclose(i["avg_util"], 100 * t["busy_gpu_hours"] / t["gpu_hours"], rel_tol=1e-6)


@pytest.fixture
def conn(database_url):
    with psycopg.connect(database_url, autocommit=True) as c:
        store.migrate(c, partition=lifecycle.HOUR * 6)
        yield c


def test_plan_covers_the_window_once_with_rollups_inside_and_samples_at_the_edges():
    lo, hi = T0 + timedelta(minutes=17, seconds=3), T0 + timedelta(hours=5, minutes=2, seconds=1)
    dirty = [(T0 + timedelta(hours=2, minutes=30), T0 + timedelta(hours=2, minutes=30, seconds=1))]
    p = plan(lo, hi, lifecycle.State(), dirty)
    assert p.hours == [(T0 + timedelta(hours=1), T0 + timedelta(hours=2)),
                       (T0 + timedelta(hours=3), T0 + timedelta(hours=5))]
    assert p.minutes == [(T0 + timedelta(minutes=18), T0 + timedelta(hours=1)),
                         (T0 + timedelta(hours=2), T0 + timedelta(hours=2, minutes=30)),
                         (T0 + timedelta(hours=2, minutes=31), T0 + timedelta(hours=3)),
                         (T0 + timedelta(hours=5), T0 + timedelta(hours=5, minutes=2))]
    assert p.samples == [(lo, T0 + timedelta(minutes=18)),
                         (T0 + timedelta(hours=2, minutes=30), T0 + timedelta(hours=2, minutes=31)),
                         (T0 + timedelta(hours=5, minutes=2), hi)]
    # rollups expired before 4 h: everything older comes from samples
    state = lifecycle.State(expired_before={"telemetry_1m": T0 + timedelta(hours=4)})
    p = plan(lo, hi, state, [])
    assert p.hours == [(T0 + timedelta(hours=4), T0 + timedelta(hours=5))]
    assert p.samples[0] == (lo, T0 + timedelta(hours=4))


def test_usage_equals_a_direct_computation_over_the_samples(conn, database_url, api_server):
    samples = schedule()
    old = [s for s in samples if s.ts < T0 + timedelta(seconds=TAIL_S)]
    write(conn, old)
    policy = lifecycle.Policy(partition=lifecycle.HOUR * 6, late_window=lifecycle.HOUR * 6)
    with Maintainer(database_url, policy, clock=lambda: T0 + timedelta(days=30)) as m:
        m.run_once()
    assert lifecycle.read_state(conn).packed_before > T0  # the first hours are packed, the rest rolled up
    write(conn, [s for s in samples if s.ts >= T0 + timedelta(seconds=TAIL_S)])  # the unrefreshed tail
    assert lifecycle.dirty_ranges(conn)

    full = (T0, T0 + timedelta(seconds=END_S))
    ragged = (T0 + timedelta(minutes=17, seconds=3), T0 + timedelta(hours=13, minutes=41, seconds=10))
    packed = (T0 + timedelta(minutes=10), T0 + timedelta(hours=5, minutes=30))  # intervals from packed hours

    def report(window, group_by, threshold=5.0) -> dict:
        params = {"group_by": group_by, "start_time": window[0].isoformat(), "end_time": window[1].isoformat(),
                  "idle_threshold": threshold}
        body = httpx.get(f"{api_server}/api/v1/usage", params=params, timeout=60).json()
        assert body["group_by"] == group_by and body["idle_threshold"] == threshold
        assert set(body) == {"group_by", "start_time", "end_time", "idle_threshold", "items"}
        return body

    def check() -> None:
        for window in (full, ragged, packed):
            rows = stored(conn, *window)
            for group_by in ("namespace", "pod", "hostname", "model_name"):
                for threshold in (5.0, 50.0):
                    assert_report(report(window, group_by, threshold), direct(rows, group_by, threshold))
        body = report(full, "pod")
        by = {i["group"]: i for i in body["items"]}
        # exact GPU-hours of the known allocations: train-a 5 h on GPU-a + 4 h on GPU-b, nb-y until it went
        # silent at 6:10, the MIG instance's 10 h, probe 3 h + 1,200 samples (10 h) after its 1 h gap
        assert math.isclose(by["ml/train-a"]["gpu_hours"], 9.0, rel_tol=1e-12)
        assert by["ml/train-a"]["gpus"] == 2
        assert math.isclose(by["research/nb-y"]["gpu_hours"], 6 + 10 / 60, rel_tol=1e-12)
        assert math.isclose(by["ml/train-b"]["gpu_hours"], 10.0, rel_tol=1e-12)
        assert math.isclose(by["ops/probe"]["gpu_hours"], 13.0, rel_tol=1e-12)
        # every item adds up to the fleet's reporting GPU-hours; the unattributed group is null
        fleet = 14 + 14 + (6 + 10 / 60) + 14 + 14 + 13  # GPU-a, b, c, MIG-d, GPU-e, f
        assert math.isclose(sum(i["gpu_hours"] for i in body["items"]), fleet, rel_tol=1e-12)
        unattributed = by[None]
        assert math.isclose(unattributed["gpu_hours"], 9 + 5 + 2 + 2 + 14, rel_tol=1e-12)
        assert unattributed["gpus"] == 4  # GPU-a, GPU-b, MIG-d, GPU-e

    check()
    Maintainer(database_url, policy, clock=lambda: T0 + timedelta(days=30)).run_once()
    assert not lifecycle.dirty_ranges(conn)
    check()  # rolled up now: same figures from the rollups
    assert conn.execute("SELECT count(*) FROM telemetry_1h WHERE idle IS NULL").fetchone()[0] == 0
    conn.execute("UPDATE telemetry_1h SET idle = NULL WHERE bucket < %s", (T0 + timedelta(hours=7),))
    conn.execute("UPDATE telemetry_1m SET idle = NULL WHERE bucket < %s", (T0 + timedelta(hours=5),))
    check()  # buckets rolled before the rollups counted idle samples (schema 4): their samples answer

    # workloads: who was where, first/last seen to the sample
    page = httpx.get(f"{api_server}/api/v1/workloads", params={"start_time": full[0].isoformat(),
                                                               "end_time": full[1].isoformat(), "limit": 2}).json()
    seen = page["items"]
    while page["next_cursor"]:
        page = httpx.get(f"{api_server}/api/v1/workloads", params={
            "start_time": full[0].isoformat(), "end_time": full[1].isoformat(), "limit": 2,
            "cursor": page["next_cursor"]}).json()
        seen += page["items"]
    assert [(w["namespace"], w["pod"]) for w in seen] == [
        ("ml", "train-a"), ("ml", "train-b"), ("ops", "probe"), ("research", "nb-x"), ("research", "nb-y")]
    train_a = seen[0]
    assert [(g["uuid"], g["first_seen"], g["last_seen"]) for g in train_a["gpus"]] == [
        ("GPU-a", "2025-07-10T00:00:00Z", "2025-07-10T04:59:30Z"),
        ("GPU-b", "2025-07-10T05:00:00Z", "2025-07-10T08:59:30Z")]
    assert (train_a["first_seen"], train_a["last_seen"]) == ("2025-07-10T00:00:00Z", "2025-07-10T08:59:30Z")
    ml = httpx.get(f"{api_server}/api/v1/workloads", params={"namespace": "research", "pod": "nb-y",
                                                            "start_time": full[0].isoformat(),
                                                            "end_time": full[1].isoformat()}).json()["items"]
    assert [(w["pod"], w["last_seen"]) for w in ml] == [("nb-y", "2025-07-10T06:09:30Z")]
    # the typed client follows the pages and reads the same figures
    with TelemetryClient(api_server) as client:
        ws = client.workloads(start_time=full[0], end_time=full[1], page_size=2)
        assert [(w.namespace, w.pod, w.gpus) for w in ws][:1] == [("ml", "train-a", ["GPU-a", "GPU-b"])]
        assert len(ws) == 5 and ws[-1].last_seen == datetime(2025, 7, 10, 6, 9, 30, tzinfo=UTC)
        typed = client.usage("pod", start_time=full[0], end_time=full[1])
        assert typed.group_by == "pod" and typed.start_time == full[0]
        assert {i.group: (i.gpu_hours, i.gpus) for i in typed.items} == {
            i["group"]: (i["gpu_hours"], i["gpus"]) for i in report(full, "pod")["items"]}


def test_real_export_is_all_unattributed_with_every_gpu_counted(conn, api_server, real_csv):
    samples = [s for s in read_samples(real_csv) if isinstance(s, Sample)]
    write(conn, samples)
    uuids = {s.uuid for s in samples}
    hosts = {s.hostname for s in samples}
    body = httpx.get(f"{api_server}/api/v1/usage", params={"start_time": "2025-07-18T20:00:00Z",
                                                           "end_time": "2025-07-18T21:00:00Z"}).json()
    assert [(i["group"], i["gpus"]) for i in body["items"]] == [(None, len(uuids))] == [(None, 247)]
    busy = [s.value for s in samples if s.metric == UTIL]
    item = body["items"][0]
    # one sample per GPU: each counts dcgm-exporter's default 30 s interval
    assert math.isclose(item["gpu_hours"], 247 * 30 / 3600, rel_tol=1e-12)
    assert math.isclose(item["busy_gpu_hours"], sum(busy) / 100 * 30 / 3600, rel_tol=1e-9)
    assert math.isclose(item["idle_gpu_hours"], sum(1 for v in busy if v < 5) * 30 / 3600, rel_tol=1e-12)
    by_host = httpx.get(f"{api_server}/api/v1/usage", params={"group_by": "hostname",
                                                              "start_time": "2025-07-18T20:00:00Z",
                                                              "end_time": "2025-07-18T21:00:00Z"}).json()
    assert {i["group"] for i in by_host["items"]} == hosts
    assert sum(i["gpus"] for i in by_host["items"]) == 247
    workloads = httpx.get(f"{api_server}/api/v1/workloads", params={"start_time": "2025-07-18T20:00:00Z",
                                                                    "end_time": "2025-07-18T21:00:00Z"}).json()
    assert workloads["items"] == []


def test_usage_and_workloads_refuse_bad_parameters_naming_them(conn, api_server):
    cases = [
        ("usage", {"group_by": "team"}, "group_by: "),
        ("usage", {"start_time": "2025-07-02T00:00:00Z", "end_time": "2025-07-01T00:00:00Z"}, "end_time: "),
        ("usage", {"start_time": "yesterday"}, "start_time: unparsable time"),
        ("usage", {"idle_threshold": "-1"}, "idle_threshold: "),
        ("usage", {"start_time": "2025-01-01T00:00:00Z", "end_time": "2025-03-01T00:00:00Z"},
         "start_time: the window"),
        ("workloads", {"limit": "0"}, "limit: "),
        ("workloads", {"cursor": "not a cursor!"}, "cursor: "),
    ]
    for route, params, detail in cases:
        r = httpx.get(f"{api_server}/api/v1/{route}", params=params)
        assert r.status_code == 422, (route, params, r.text)
        assert r.json()["detail"].startswith(detail), (route, params, r.json()["detail"])


def test_generator_schedules_pods_releases_gpus_and_has_idle_holders():
    from telemetry_nb.sources.generate import generate_rows

    rows = [r for r in generate_rows(2, 4, 4 * 3600, 30, seed=3, namespaces=3) if r[1] == UTIL]
    owners: dict[str, list[tuple[str, str]]] = defaultdict(list)
    util: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        owners[r[4]].append((r[9], r[8]))
        if r[8]:
            util[r[8]].append(float(r[10]))
    assert {ns for o in owners.values() for ns, _ in o if ns} == {"team-00", "team-01", "team-02"}
    assert sum(1 for o in owners.values() for w in o if w == ("", "")) > 0  # free GPUs: unattributed
    assert all(len({w for w in o if w[1]}) >= 2 for o in owners.values())  # pods come and go on every GPU
    holders = [p for p, v in util.items() if max(v) < 5]
    assert holders and len(holders) < len(util)  # some pods sit on their GPU at ~0 %, most work
    assert list(generate_rows(1, 2, 60, 1, seed=3)) == list(generate_rows(1, 2, 60, 1, seed=3, namespaces=0))

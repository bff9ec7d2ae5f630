"""XID events and the richer inventory (labels, PCI bus, driver, MIG) through the writer and the API."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import psycopg
import pytest

from telemetry_nb import store
from telemetry_nb.model import XID_METRIC, Sample, mig_uuid
from telemetry_nb.pipeline import codec

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


def _xid(uuid: str, i: int, code: int, msg: str = "") -> Sample:
    return Sample(uuid, XID_METRIC, T0 + timedelta(seconds=15 * i), float(code), "h", 0, "nvidia0", "H100",
                  labels={"UUID": uuid, "err_code": str(code), "err_msg": msg})


def _write(database_url: str, samples: list[Sample]) -> store.Writer:
    conn = psycopg.connect(database_url)
    store.migrate(conn)
    w = store.Writer(conn)
    w.write([codec.decode(codec.encode(samples))])
    return w


def _events(database_url: str) -> list[tuple]:
    with psycopg.connect(database_url) as conn:
        return conn.execute("SELECT g.uuid, e.ts, e.kind, e.code, e.message FROM gpu_events e "
                            "JOIN gpus g ON g.id = e.gpu_id ORDER BY g.uuid, e.ts").fetchall()


CODES = [0, 43, 43, 0, 43, 79, 79]  # the last XID code, as the exporter reports it every scrape
EXPECTED = [("GPU-a", T0 + timedelta(seconds=15), "xid", 43, "GPU stopped processing"),
            ("GPU-a", T0 + timedelta(seconds=60), "xid", 43, "GPU stopped processing"),
            ("GPU-a", T0 + timedelta(seconds=75), "xid", 79, "GPU has fallen off the bus")]


def _readings() -> list[Sample]:
    msgs = {0: "", 43: "GPU stopped processing", 79: "GPU has fallen off the bus"}
    return [_xid("GPU-a", i, c, msgs[c]) for i, c in enumerate(CODES)]


def test_a_change_of_the_last_xid_code_is_one_event(database_url):
    _write(database_url, _readings())
    assert _events(database_url) == EXPECTED


def test_writers_committing_at_once_see_each_others_readings(database_url):
    """Two writers of consecutive readings of one GPU at once: the later one waits and decides on committed rows."""
    import threading

    readings = _readings()
    with psycopg.connect(database_url) as a, psycopg.connect(database_url) as b:
        store.migrate(a)
        first, second = store.Writer(a), store.Writer(b)
        first.write([codec.decode(codec.encode(readings[:1]))])  # metric, GPU and partition known to both
        second.write([codec.decode(codec.encode(readings[:1]))])
        a.execute("SELECT 1")  # an open transaction: the first writer's write nests in it and stays uncommitted
        first.write([codec.decode(codec.encode(readings[1:2]))])  # code 43 after 0: an event
        done = threading.Event()
        late = threading.Thread(target=lambda: (second.write([codec.decode(codec.encode(readings[2:3]))]),
                                                done.set()))
        late.start()  # 43 again: no event, but only if it sees the first writer's 43
        assert not done.wait(1.0)  # it waits for the first writer's commit
        a.commit()
        late.join(timeout=30)
        assert done.is_set()
    assert _events(database_url) == EXPECTED[:1]


def test_events_are_exact_however_batches_arrive(database_url):
    readings = _readings()
    # one reading per transaction, newest first: the worst order a set of collectors could produce
    conn = psycopg.connect(database_url)
    store.migrate(conn)
    w = store.Writer(conn)
    for s in reversed(readings):
        w.write([codec.decode(codec.encode([s]))])
    assert _events(database_url) == EXPECTED
    # redelivered and replayed: nothing doubles
    w.write([codec.decode(codec.encode(readings)), codec.decode(codec.encode(readings[2:5]))])
    assert _events(database_url) == EXPECTED
    # a restarted source that reports the same last code again later: no new event
    w.write([codec.decode(codec.encode([_xid("GPU-a", 20, 79, "GPU has fallen off the bus")]))])
    assert _events(database_url) == EXPECTED


def test_inventory_keeps_labels_pci_driver_and_mig(database_url):
    base = {"UUID": "GPU-p", "Hostname": "h", "pci_bus_id": "00000000:07:00.0", "DCGM_FI_DRIVER_VERSION": "550.54"}
    parent = Sample("GPU-p", "DCGM_FI_DEV_GPU_TEMP", T0, 40.0, "h", 0, "nvidia0", "A100", labels=base,
                    pci_bus_id="00000000:07:00.0", driver_version="550.54")
    inst = Sample(mig_uuid("GPU-p", 2), "DCGM_FI_PROF_GR_ENGINE_ACTIVE", T0, 0.5, "h", 0, "nvidia0", "A100",
                  labels={**base, "GPU_I_ID": "2", "GPU_I_PROFILE": "1g.10gb", "pod": "p1"},
                  pci_bus_id="00000000:07:00.0", driver_version="550.54", parent_uuid="GPU-p", mig_profile="1g.10gb",
                  mig_instance=2)
    w = _write(database_url, [parent, inst])
    # a later batch without labels (an old entry, or a CSV without labels_raw) forgets nothing
    w.write([codec.decode(codec.encode([Sample("GPU-p", "DCGM_FI_DEV_GPU_TEMP", T0 + timedelta(seconds=1), 41.0,
                                               "h", 0, "nvidia0", "A100")]))])
    # a new label is merged in
    w.write([codec.decode(codec.encode([Sample("GPU-p", "DCGM_FI_DEV_GPU_TEMP", T0 + timedelta(seconds=2), 41.0,
                                               "h", 0, "nvidia0", "A100", labels={"cluster": "edge-1"})]))])
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT uuid, pci_bus_id, driver_version, labels, parent_uuid, mig_profile, mig_instance "
                            "FROM gpu_inventory ORDER BY uuid").fetchall()
    assert rows == [
        ("GPU-p", "00000000:07:00.0", "550.54", {**base, "cluster": "edge-1"}, "", "", None),
        ("GPU-p:gi2", "00000000:07:00.0", "550.54", {**base, "GPU_I_ID": "2", "GPU_I_PROFILE": "1g.10gb"},
         "GPU-p", "1g.10gb", 2),
    ]


def test_old_entries_without_the_new_side_fields_still_decode():
    fields = codec.encode([_xid("GPU-a", 1, 43)])
    del fields[b"inventory"], fields[b"events"]
    batch = codec.decode(fields)
    assert batch.n == 1 and batch.inventory == [] and batch.events == []


@pytest.mark.parametrize("field,value", [(b"events", b'[[1,"not a time","xid",43,""]]'),
                                         (b"inventory", b'[[1,"","",["not","a","dict"],"","",null]]')])
def test_malformed_new_side_fields_are_refused(field, value):
    fields = codec.encode([_xid("GPU-a", 1, 43)])
    fields[field] = value
    with pytest.raises(codec.CodecError, match=f"malformed {field.decode()}"):
        codec.decode(fields)


def test_events_api_filters_paginates_and_refuses_bad_parameters(database_url, api_server):
    readings = _readings() + [_xid("GPU-b", i, c, "m") for i, c in enumerate([13, 13, 31])]
    _write(database_url, readings)
    api = api_server
    seen, cursor = [], None
    while True:
        page = httpx.get(f"{api}/api/v1/events", params={"limit": 2, **({"cursor": cursor} if cursor else {})})
        assert page.status_code == 200, page.text
        body = page.json()
        seen += body["items"]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert [(e["timestamp"], e["uuid"], e["code"]) for e in seen] == [
        ("2026-03-01T12:00:00Z", "GPU-b", 13), ("2026-03-01T12:00:15Z", "GPU-a", 43),
        ("2026-03-01T12:00:30Z", "GPU-b", 31), ("2026-03-01T12:01:00Z", "GPU-a", 43),
        ("2026-03-01T12:01:15Z", "GPU-a", 79)]
    assert seen[1] == {"timestamp": "2026-03-01T12:00:15Z", "uuid": "GPU-a", "hostname": "h", "kind": "xid",
                       "code": 43, "message": "GPU stopped processing"}
    only_a = httpx.get(f"{api}/api/v1/events", params={"uuid": "GPU-a", "kind": "xid",
                                                       "start_time": "2026-03-01T12:00:20Z",
                                                       "end_time": "2026-03-01T12:01:15Z"}).json()
    assert [e["code"] for e in only_a["items"]] == [43, 79]
    for params, start in [({"end_time": "2026-03-01T11:00:00Z", "start_time": "2026-03-01T12:00:00Z"}, "end_time:"),
                          ({"limit": 0}, "limit:"), ({"cursor": "garbage"}, "cursor:"),
                          ({"start_time": "yesterday"}, "start_time:")]:
        r = httpx.get(f"{api}/api/v1/events", params=params)
        assert r.status_code == 422 and r.json()["detail"].startswith(start), (params, r.text)
    assert "/api/v1/events" in httpx.get(f"{api}/openapi.json").json()["paths"]
    from telemetry_nb.analysis.client import TelemetryClient

    with TelemetryClient(api) as client:  # the notebooks' client follows the cursor too
        got = client.events(uuid="GPU-b", kind="xid")
        assert [(e.uuid, e.code, e.message, e.timestamp.isoformat()) for e in got] == [
            ("GPU-b", 13, "m", "2026-03-01T12:00:00+00:00"), ("GPU-b", 31, "m", "2026-03-01T12:00:30+00:00")]
        assert client.events(start_time="2026-03-01T12:01:10Z", page_size=1)[0].code == 79


def test_notebooks_use_gr_engine_active_where_gpu_util_is_absent_and_list_xid_gpus():
    import pandas as pd

    from telemetry_nb.analysis import explore
    from telemetry_nb.analysis.client import Event, Gpu

    t = pd.Timestamp("2026-03-01T12:00:00Z")
    rows = [("GPU-p", "h", 0, "h/0", t, explore.UTIL, 50.0, 60.0, 70.0, 4),
            ("GPU-p", "h", 0, "h/0", t, explore.GR_ENGINE, 0.1, 0.2, 0.3, 4),  # has UTIL: left alone
            ("GPU-p:gi1", "h", 0, "h/0", t, explore.GR_ENGINE, 0.25, 0.5, 0.75, 4)]
    df = pd.DataFrame(rows, columns=explore.AGG_COLUMNS)
    df.attrs["bucket_seconds"] = 60
    out = explore.utilization_fallback(df)
    util = out[out["metric"] == explore.UTIL].set_index("uuid")
    assert util.loc["GPU-p", "avg"] == 60.0
    assert tuple(util.loc["GPU-p:gi1", ["min", "avg", "max", "count"]]) == (25.0, 50.0, 75.0, 4)
    assert len(out) == 4 and out.attrs["bucket_seconds"] == 60

    gpus = [Gpu("GPU-a", "h1", 3, "nvidia3", "H100", None, None)]
    events = [Event(t, "GPU-a", "h1", "xid", 43, "GPU stopped processing"),
              Event(t + pd.Timedelta("1min"), "GPU-a", "h1", "xid", 79, "GPU has fallen off the bus"),
              Event(t, "GPU-b", "h2", "xid", 13, "Graphics Engine Exception")]
    table = explore.xid_gpus(events, gpus)
    assert table.to_dict("records") == [
        {"gpu": "h1/3", "uuid": "GPU-a", "errors": 2, "last_code": 79, "last_message": "GPU has fallen off the bus",
         "last_at": t + pd.Timedelta("1min")},
        {"gpu": "h2/?", "uuid": "GPU-b", "errors": 1, "last_code": 13, "last_message": "Graphics Engine Exception",
         "last_at": t}]
    assert list(explore.xid_gpus(events, gpus, "h2")["uuid"]) == ["GPU-b"]
    mig = Gpu("GPU-a:gi2", "h1", 3, "nvidia3", "H100", None, None, parent_uuid="GPU-a", mig_instance=2)
    assert explore.gpu_label(mig.hostname, mig.gpu_index, mig.mig_instance) == "h1/3/gi2"
    assert explore.xid_gpus([Event(t, mig.uuid, "h1", "xid", 31, "")], [mig])["gpu"].tolist() == ["h1/3/gi2"]
    assert explore.xid_gpus([], gpus).empty


def test_the_csv_source_gives_the_same_xid_events(database_url):
    import io

    from telemetry_nb.sources.dcgm_csv import read_samples

    head = "timestamp,metric_name,gpu_id,device,uuid,modelName,Hostname,container,pod,namespace,value,labels_raw\n"
    rows = [f'2026-03-01T12:00:{15 * i:02d}Z,{XID_METRIC},0,nvidia0,GPU-a,H100,h,,,,{code},'
            f'"err_code=""{code}"",err_msg=""{msg}"",DCGM_FI_DRIVER_VERSION=""550.54"""\n'
            for i, (code, msg) in enumerate([(0, ""), (43, "GPU stopped processing"), (43, "GPU stopped processing")])]
    samples = list(read_samples(io.StringIO(head + "".join(rows))))
    _write(database_url, samples)
    assert _events(database_url) == [("GPU-a", T0 + timedelta(seconds=15), "xid", 43, "GPU stopped processing")]
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT driver_version, labels FROM gpus").fetchone() == (
            "550.54", {"DCGM_FI_DRIVER_VERSION": "550.54"})  # err_code/err_msg are not inventory labels

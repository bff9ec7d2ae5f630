"""End-to-end canary behind notebooks/02_data_flow_verification.ipynb.

A GPU uuid unique to the run gets `rows` samples with known values, stamped "now" and paced like a live
export; they go through `Streamer.run` (the streamer's own code path) into Redis, the running
collectors store them, and the API is polled until every row is visible with its exact value, or a
timeout passes. Latency of a row = the moment a poll first saw it − its sample timestamp.
With stream partitions (`partitions`, default $TELEMETRY_STREAM_PARTITIONS) there is one canary GPU per
partition, each with `rows` samples, and the report counts per partition as well as in total.
"""

from __future__ import annotations

import math
import os
import random
import threading
import time
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from telemetry_nb.analysis.client import APIError, TelemetryClient, parse_ts
from telemetry_nb.model import Sample
from telemetry_nb.sources.generate import METRICS

CANARY_HOST = "telemetry-nb-canary"
CANARY_MODEL = "telemetry-nb canary"


def canary_uuid() -> str:
    """A uuid no real GPU has and no earlier run used."""
    return f"GPU-canary-{uuidlib.uuid4()}"


def canary_uuids(partitions: int) -> list[str]:
    """One fresh canary uuid per stream partition, the one for partition i at index i."""
    from telemetry_nb.pipeline.streams import partition_of

    found: dict[int, str] = {}
    while len(found) < partitions:
        u = canary_uuid()
        found.setdefault(partition_of(u, partitions), u)
    return [found[i] for i in range(partitions)]


def make_samples(uuid: str, rows: int, *, spacing_s: float = 0.1, start: datetime | None = None,
                 seed: int | None = None) -> list[Sample]:
    """`rows` samples: ticks `spacing_s` apart, one sample per DCGM metric per tick, random full-precision values."""
    if rows < 1:
        raise ValueError("rows must be at least 1")
    rng = random.Random(seed if seed is not None else uuid)
    start = start or datetime.now(UTC)
    step = timedelta(seconds=max(spacing_s, 1e-6))
    out = []
    for i in range(rows):
        tick, j = divmod(i, len(METRICS))
        out.append(Sample(uuid=uuid, metric=METRICS[j], ts=start + tick * step, value=rng.uniform(0, 1000),
                          hostname=CANARY_HOST, gpu_index=0, device="canary0", model_name=CANARY_MODEL))
    return out


@dataclass
class CanaryReport:
    uuid: str
    expected: int
    published: int = 0
    seen: int = 0
    missing: int = 0
    wrong: int = 0
    unexpected: int = 0
    late: int = 0
    timed_out: bool = False
    max_latency_s: float | None = None
    publish_s: float = 0.0
    elapsed_s: float = 0.0
    polls: int = 0
    cleanup: str = "not requested"
    rows: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    uuids: list[str] = field(default_factory=list)  # one per partition (index = partition); [uuid] for one

    def per_partition(self) -> list[dict]:
        """Rows expected, seen, missing, wrong and late for each partition's canary GPU."""
        out = []
        for i, u in enumerate(self.uuids or [self.uuid]):
            mine = [r for r in self.rows if r.get("uuid", self.uuid) == u]
            out.append({"partition": i, "uuid": u, "expected": len(mine),
                        **{k: sum(r["status"] == k for r in mine) for k in ("ok", "missing", "wrong", "late")}})
        return out

    @property
    def latencies(self) -> list[float]:
        return [r["latency_s"] for r in self.rows if r["latency_s"] is not None]

    def latency_stats(self) -> dict[str, float | None]:
        lat = sorted(self.latencies)
        if not lat:
            return {"p50_s": None, "p95_s": None, "max_s": None}
        return {"p50_s": _quantile(lat, 0.5), "p95_s": _quantile(lat, 0.95), "max_s": lat[-1]}

    def failures(self) -> list[str]:
        out = []
        if self.published != self.expected:
            out.append(f"published {self.published} of {self.expected} rows")
        if self.missing:
            out.append(f"{self.missing} rows missing after the timeout")
        if self.wrong:
            out.append(f"{self.wrong} rows with wrong values")
        if self.unexpected:
            out.append(f"{self.unexpected} unexpected rows")
        if self.late:
            out.append(f"{self.late} rows later than {self.max_latency_s:g}s")
        out.extend(self.errors)
        return out

    @property
    def ok(self) -> bool:
        return not self.failures()

    def summary(self) -> dict:
        return {"uuid": self.uuid, "ok": self.ok, "expected": self.expected, "published": self.published,
                "seen": self.seen, "missing": self.missing, "wrong": self.wrong, "unexpected": self.unexpected,
                "late": self.late, "timed_out": self.timed_out, "max_latency_s": self.max_latency_s,
                **self.latency_stats(), "publish_s": round(self.publish_s, 3), "elapsed_s": round(self.elapsed_s, 3),
                "polls": self.polls, "cleanup": self.cleanup, "failures": self.failures(),
                **({"partitions": self.per_partition()} if len(self.uuids) > 1 else {})}

    def frame(self):
        import pandas as pd

        return pd.DataFrame(self.rows, columns=["metric", "timestamp", "expected", "got", "latency_s", "status"])

    def raise_for_failures(self) -> None:
        if not self.ok:
            raise AssertionError(f"canary {self.uuid} failed: {'; '.join(self.failures())}")


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    pos = (len(sorted_values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def publish(samples: list[Sample], *, redis_url: str, stream: str, group: str = "collectors",
            batch_size: int = 1000, live: bool = True, partitions: int = 1) -> int:
    """Publish `samples` with the streamer's code path; `live` re-stamps to now and paces them in real time.

    The streamer re-stamps the `Sample` objects in place, so afterwards they carry the published timestamps.
    """
    from telemetry_nb.config import Settings
    from telemetry_nb.pipeline.streamer import Streamer
    from telemetry_nb.pipeline.streams import connect, open_partitions

    # one shard: a streamer pod's TELEMETRY_SHARD_* must not filter the canary's GPU out
    settings = Settings.from_env(redis_url=redis_url, stream=stream, group=group, batch_size=batch_size,
                                 consumer="canary", shard_index=0, shard_count=1, stream_partitions=partitions)
    client = connect(settings.redis_url)
    try:
        streamer = Streamer(open_partitions(settings, client), settings)
        streamer.source_name = "canary"
        summary = streamer.run(lambda: iter(samples), timestamps="now" if live else "source")
        return summary.published
    finally:
        client.close()


def _ts_key(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat(timespec="microseconds")


def run_canary(*, api_url: str, redis_url: str, stream: str, group: str = "collectors", rows: int = 100,
               spacing_s: float = 0.1, batch_size: int = 1000, timeout_s: float = 60.0, poll_s: float = 0.25,
               max_latency_s: float | None = 30.0, database_url: str | None = None, cleanup: bool = True,
               uuid: str | None = None, clock: Callable[[], float] = time.time,
               api_token: str | None = None, partitions: int | None = None) -> CanaryReport:
    """Publish a canary; poll the API until all rows are visible or `timeout_s` after publishing; clean up.

    `rows` samples per partition's canary GPU (one GPU, `uuid` if given, without partitions).
    """
    n = partitions if partitions is not None else int(os.environ.get("TELEMETRY_STREAM_PARTITIONS") or 1)
    uuids = [uuid or canary_uuid()] if n <= 1 else canary_uuids(n)
    uuid = uuids[0]
    start = datetime.now(UTC)
    samples = sorted((s for u in uuids for s in make_samples(u, rows, spacing_s=spacing_s, start=start)),
                     key=lambda s: s.ts)  # ticks interleaved, so pacing holds for every GPU
    rows = len(samples)
    report = CanaryReport(uuid=uuid, expected=rows, max_latency_s=max_latency_s, uuids=uuids)
    started = time.monotonic()
    first_seen: dict[tuple[str, str, str], float] = {}
    got: dict[tuple[str, str, str], float] = {}
    published: dict[str, object] = {}
    api_errors: list[str] = []

    def _publish() -> None:
        t0 = time.monotonic()
        try:
            published["rows"] = publish(samples, redis_url=redis_url, stream=stream, group=group,
                                        batch_size=batch_size, live=True, partitions=max(n, 1))
        except Exception as err:  # noqa: BLE001 (reported as a failure of the canary)
            published["error"] = f"publish failed: {type(err).__name__}: {err}"
        published["seconds"] = time.monotonic() - t0

    thread = threading.Thread(target=_publish, name="canary-publish", daemon=True)
    thread.start()
    not_before = samples[0].ts - timedelta(seconds=5)
    deadline = None
    with TelemetryClient(api_url, token=api_token, timeout=10) as api:
        while True:
            if deadline is None and not thread.is_alive():
                deadline = time.monotonic() + timeout_s
            items = []
            for u in uuids:
                try:
                    items += [(u, t) for page in api.telemetry_pages(u, start_time=not_before) for t in page["items"]]
                except APIError as err:
                    if err.status != 404 and not api_errors:  # 404: the canary GPU is not stored yet
                        api_errors.append(f"API: {err}")
            now = clock()
            report.polls += 1
            for u, t in items:
                key = (u, t["metric"], _ts_key(parse_ts(t["timestamp"])))
                if key not in first_seen:
                    first_seen[key] = now
                    got[key] = t["value"]
            if deadline is not None and (len(first_seen) >= rows or time.monotonic() >= deadline):
                break
            time.sleep(poll_s)
    thread.join()
    report.publish_s = float(published.get("seconds", 0.0))
    report.published = int(published.get("rows", 0))
    if "error" in published:
        report.errors.append(str(published["error"]))
    report.elapsed_s = time.monotonic() - started
    if api_errors and len(first_seen) < rows:
        report.errors.extend(api_errors)

    expected_keys = set()
    for s in samples:
        key = (s.uuid, s.metric, _ts_key(s.ts))
        expected_keys.add(key)
        seen_at = first_seen.get(key)
        latency = None if seen_at is None else seen_at - s.ts.timestamp()
        if seen_at is None:
            status = "missing"
        elif got[key] != s.value:
            status = "wrong"
        elif max_latency_s is not None and latency > max_latency_s:
            status = "late"
        else:
            status = "ok"
        report.rows.append({"metric": s.metric, "timestamp": s.ts, "expected": s.value, "got": got.get(key),
                            "latency_s": latency, "status": status,
                            **({"uuid": s.uuid, "partition": uuids.index(s.uuid)} if n > 1 else {})})
    report.seen = sum(r["status"] != "missing" for r in report.rows)
    report.missing = sum(r["status"] == "missing" for r in report.rows)
    report.wrong = sum(r["status"] == "wrong" for r in report.rows)
    report.late = sum(r["status"] == "late" for r in report.rows)
    report.unexpected = len(set(first_seen) - expected_keys)
    report.timed_out = report.missing > 0
    if cleanup:
        done = [clean_up(u, database_url) for u in uuids]
        report.cleanup = done[0] if len(done) == 1 else "; ".join(done)
    return report


def clean_up(uuid: str, database_url: str | None) -> str:
    """Remove the canary GPU and its rows; returns what happened (for the report)."""
    if not database_url:
        return "skipped: no database_url"
    from telemetry_nb import store

    try:
        with store.connect(database_url, autocommit=True) as conn:
            n = store.delete_gpu(conn, uuid)
        return f"removed GPU {uuid} and {n} rows"
    except Exception as err:  # noqa: BLE001
        return f"failed: {type(err).__name__}: {err}"


def latency_chart(report: CanaryReport, *, width: int = 520, height: int = 220):
    """Histogram of per-row end-to-end latency, with p50 / p95 / max marked (one row per sample: small)."""
    import altair as alt
    import pandas as pd

    lat = pd.DataFrame({"latency_s": report.latencies})
    stats = report.latency_stats()
    marks = pd.DataFrame([{"stat": k.removesuffix("_s"), "latency_s": v} for k, v in stats.items() if v is not None])
    title = f"Canary end-to-end latency ({len(lat)} rows)"
    if lat.empty:
        return alt.Chart(pd.DataFrame({"x": [0]})).mark_text(text="no canary row was seen").properties(
            title=title, width=width, height=height)
    hist = alt.Chart(lat).mark_bar(opacity=0.8).encode(
        x=alt.X("latency_s:Q", bin=alt.Bin(maxbins=30), title="latency (s): first seen in API − sample timestamp"),
        y=alt.Y("count():Q", title="rows"))
    rules = alt.Chart(marks).mark_rule(strokeDash=[4, 3], size=2).encode(
        x="latency_s:Q", color=alt.Color("stat:N", scale=alt.Scale(domain=["p50", "p95", "max"]), title=None),
        tooltip=["stat", alt.Tooltip("latency_s:Q", format=".3f")])
    return (hist + rules).properties(title=title, width=width, height=height)

"""Deployment checks behind notebooks/01_deployment_check.ipynb: API, Redis, PostgreSQL, Kubernetes.

Every check returns `CheckResult(name, status, detail)` with status 'pass', 'fail' or 'skip'. A check
that cannot run because the one before it failed (no Redis → no lag) is a 'skip' naming the reason,
so the failed list names the root cause, not its echoes.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from telemetry_nb.config import redact

PASS, FAIL, SKIP = "pass", "fail", "skip"
COMPONENTS = ("streamer", "collector", "api-gateway")
APP_LABEL = "app.kubernetes.io/name=telemetry-pipeline"


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: str
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status != FAIL


def _err(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}"[:300]


def _bound(name: str, value: float, limit: float | None, what: str) -> CheckResult:
    if limit is None:
        return CheckResult(name, PASS, f"{what}={value} (no limit set)")
    status = PASS if value <= limit else FAIL
    return CheckResult(name, status, f"{what}={value} {'<=' if status == PASS else '>'} {limit}")


# -- API -----------------------------------------------------------------------------------------
def check_api(api_url: str | None, *, token: str | None = None, timeout: float = 10.0) -> list[CheckResult]:
    """`/health` and `/ready` answer 200 (it reports 503 with the failed dependencies), and a data route
    (`/api/v1/metrics`) answers with `token` (default $TELEMETRY_API_TOKEN) when the API requires one."""
    if not api_url:
        return [CheckResult("api", SKIP, "not requested (api_url not set)")]
    from telemetry_nb.analysis.client import APIError, TelemetryClient

    out = []
    with TelemetryClient(api_url, token=token, timeout=timeout) as api:
        try:
            body = api.health()
            out.append(CheckResult("api.health", PASS, f"{api_url}/health: {body.get('status', body)}"))
        except APIError as err:
            out.append(CheckResult("api.health", FAIL, str(err)))
            out.append(CheckResult("api.ready", SKIP, "skipped: /health failed"))
            out.append(CheckResult("api.auth", SKIP, "skipped: /health failed"))
            return out
        try:
            body = api.ready()
            out.append(CheckResult("api.ready", PASS, f"{api_url}/ready: {json.dumps(body.get('checks', body))}"))
        except APIError as err:
            failed = err.body.get("failed") if isinstance(err.body, dict) else None
            detail = f"{api_url}/ready -> HTTP {err.status}" + (f": failed {failed}" if failed else f": {err.detail}")
            out.append(CheckResult("api.ready", FAIL, detail))
        try:
            n = len(api.metrics())
            how = "token accepted" if api.authenticated else "no token sent"
            out.append(CheckResult("api.auth", PASS, f"{api_url}/api/v1/metrics: {n} metrics ({how})"))
        except APIError as err:
            hint = ""
            if err.status == 401:
                hint = ("; the API requires a bearer token: set api_token / $TELEMETRY_API_TOKEN" if not
                        api.authenticated else "; the token was not accepted")
            out.append(CheckResult("api.auth", FAIL, f"{err}{hint}"))
    return out


# -- Redis ---------------------------------------------------------------------------------------
def check_redis(redis_url: str | None, stream: str, group: str = "collectors", *, max_lag: int | None = 1000,
                max_pending: int | None = None, max_dead: int | None = None, min_consumers: int = 1,
                consumer_idle_s: float = 60.0, stale_group_s: float = 86400.0,
                timeout: float = 5.0, partitions: int | None = None) -> list[CheckResult]:
    """Reachable; stream and group exist; active consumers; backlog and pending ≤ limits; no abandoned
    group; dead letters. Read-only: nothing here writes to Redis.

    Lag and pending count stream *entries* (each a batch of up to `batch_size` rows). `max_pending`
    defaults to `max_lag`. A consumer is active when it talked to Redis in the last `consumer_idle_s`.
    A group is abandoned when no consumer of it talked to Redis for `stale_group_s` while it holds
    entries back from trimming (for longer than that, too). `partitions` defaults to
    $TELEMETRY_STREAM_PARTITIONS (or 1), as the pipeline's own processes read it. With more than one,
    every check holds for each partition (limits apply per partition); each result gives the totals and
    names failing partitions, and one `redis.partition.I` result per partition sums it up.
    """
    if not redis_url:
        return [CheckResult("redis", SKIP, "not requested (redis_url not set)")]
    import redis

    from telemetry_nb.pipeline.streams import REDIS_ERRORS, Queue, connect, is_cluster, partition_keys

    try:
        client = connect(redis_url, timeout_s=timeout)
        info = client.info("server")
        if is_cluster(client):  # one answer per node: {node: info}
            info = next(iter(info.values()), {}) if info and "redis_version" not in info else info
    except (redis.RedisError, *REDIS_ERRORS, ValueError) as err:  # ValueError: not a redis:// URL
        return [CheckResult("redis.reachable", FAIL, f"{redact(redis_url)}: {_err(err)}"),
                *(CheckResult(n, SKIP, "skipped: Redis unreachable") for n in _REDIS_NAMES)]
    out = [CheckResult("redis.reachable", PASS, f"{redact(redis_url)} (Redis {info.get('redis_version', '?')})")]
    limits = dict(max_lag=max_lag, max_pending=max_pending, max_dead=max_dead, min_consumers=min_consumers,
                  consumer_idle_s=consumer_idle_s, stale_group_s=stale_group_s)
    if partitions is None:
        partitions = int(os.environ.get("TELEMETRY_STREAM_PARTITIONS") or 1)
    try:
        keys = partition_keys(stream, partitions, cluster=is_cluster(client))
        per = [_check_stream(client, Queue(client, key, group), key, group, **limits) for key in keys]
    finally:
        client.close()
    if len(per) == 1:
        return out + per[0][0]
    return out + _combine(keys, per) + [_partition_summary(i, key, results, numbers)
                                        for i, (key, (results, numbers)) in enumerate(zip(keys, per, strict=True))]


_REDIS_NAMES = ["redis.stream", "redis.group", "redis.consumers", "redis.lag", "redis.pending", "redis.groups",
                "redis.dead_letter"]
_TOTALS = {"redis.stream": ("entries", "entries"), "redis.lag": ("backlog", "backlog entries"),
           "redis.pending": ("pending", "pending entries"), "redis.dead_letter": ("dead", "dead letters")}


def _combine(keys: list[str], per: list[tuple[list[CheckResult], dict[str, int]]]) -> list[CheckResult]:
    """One result per check over all partitions: the worst status, totals, and the partitions that fail."""
    out = []
    for name in _REDIS_NAMES:
        found = [(key, r) for key, (results, _) in zip(keys, per, strict=True) for r in results if r.name == name]
        statuses = {r.status for _, r in found}
        status = FAIL if FAIL in statuses else PASS if PASS in statuses else SKIP
        detail = f"{sum(r.status == PASS for _, r in found)}/{len(keys)} partitions pass"
        if name in _TOTALS:
            field, label = _TOTALS[name]
            detail += f"; {sum(n.get(field, 0) for _, n in per)} {label} in all"
        if name == "redis.consumers":
            detail += f"; active consumers per partition: {[n.get('active', 0) for _, n in per]}"
        worst = [f"{key}: {r.detail}" for key, r in found if r.status == status and status != PASS]
        if worst:
            detail += "; " + "; ".join(worst[:6]) + (f"; … {len(worst) - 6} more" if len(worst) > 6 else "")
        out.append(CheckResult(name, status, detail))
    return out


def _partition_summary(i: int, key: str, results: list[CheckResult], numbers: dict[str, int]) -> CheckResult:
    failing = [r.name for r in results if r.status == FAIL]
    detail = (f"{key}: {numbers.get('entries', 0)} entries, backlog {numbers.get('backlog', 0)}, pending "
              f"{numbers.get('pending', 0)}, {numbers.get('active', 0)} active consumers, dead "
              f"{numbers.get('dead', 0)}" + (f"; failing: {', '.join(failing)}" if failing else ""))
    return CheckResult(f"redis.partition.{i}", FAIL if failing else PASS, detail)


def _check_stream(client, q, stream: str, group: str, *, max_lag: int | None, max_pending: int | None,
                  max_dead: int | None, min_consumers: int, consumer_idle_s: float, stale_group_s: float
                  ) -> tuple[list[CheckResult], dict[str, int]]:
    """The checks of one stream key (one partition), and its numbers for the totals."""
    import redis

    from telemetry_nb.pipeline.streams import REDIS_ERRORS

    names = _REDIS_NAMES
    out: list[CheckResult] = []
    numbers: dict[str, int] = {}
    try:
        if not client.exists(stream) or client.type(stream) not in (b"stream", "stream"):
            out.append(CheckResult("redis.stream", FAIL, f"stream {stream!r} does not exist"))
            out += [CheckResult(n, SKIP, f"skipped: no stream {stream!r}") for n in names[1:-1]]
        else:
            numbers["entries"] = int(client.xlen(stream))
            out.append(CheckResult("redis.stream", PASS, f"stream {stream!r}: {numbers['entries']} entries"))
            groups = {_s(g["name"]): g for g in q.groups()}
            if group not in groups:
                out.append(CheckResult("redis.group", FAIL, f"consumer group {group!r} not on stream {stream!r} "
                                                            f"(groups: {sorted(groups) or 'none'})"))
                out += [CheckResult(n, SKIP, f"skipped: no group {group!r}") for n in names[2:5]]
            else:
                out.append(CheckResult("redis.group", PASS, f"group {group!r} exists"))
                consumers = client.xinfo_consumers(stream, group)
                active = [c for c in consumers if int(c.get("idle", 0)) <= consumer_idle_s * 1000]
                numbers["active"] = len(active)
                detail = (f"{len(active)} active of {len(consumers)} consumers "
                          f"(active = seen in the last {consumer_idle_s:g}s; need >= {min_consumers})")
                out.append(CheckResult("redis.consumers", PASS if len(active) >= min_consumers else FAIL, detail))
                pending = int(groups[group]["pending"])
                backlog = _undelivered(client, q, stream, groups[group]) + pending
                numbers["pending"], numbers["backlog"] = pending, backlog
                out.append(_bound("redis.lag", backlog, max_lag, "backlog entries"))
                out.append(_bound("redis.pending", pending, max_lag if max_pending is None else max_pending,
                                  "pending entries"))
            stale = [g for g in q.group_uses() if g.stale(stale_group_s)]
            if stale:
                out.append(CheckResult("redis.groups", FAIL, "abandoned consumer groups (no consumer for > "
                                       f"{stale_group_s:g}s) hold entries back from trimming: " + ", ".join(
                                           f"{g.name!r} for {g.holding_s:.0f}s" for g in stale)
                                       + f"; remove with XGROUP DESTROY {stream} NAME"))
            else:
                out.append(CheckResult("redis.groups", PASS, f"no group unused for > {stale_group_s:g}s holds "
                                                              "entries back"))
        dead = q.dead_count()
        numbers["dead"] = dead
        detail = f"{dead} dead letters ever written to {q.dead_stream}"
        if dead:
            last = q.read_dead(1)[0]
            detail += f"; newest error: {last.get('error', '')[:160]}"
        status = FAIL if max_dead is not None and dead > max_dead else PASS
        if max_dead is not None:
            detail += f" ({'<=' if status == PASS else '>'} max_dead {max_dead})"
        out.append(CheckResult("redis.dead_letter", status, detail))
    except (redis.RedisError, *REDIS_ERRORS) as err:
        done = {r.name for r in out}
        out += [CheckResult(n, FAIL, f"Redis error: {_err(err)}") for n in names if n not in done]
    return out, numbers


def _undelivered(client, q, stream: str, group_info: dict) -> int:
    """Entries not yet delivered to the group: exact 0 when the group has seen the newest entry (any Redis),
    else Redis 7's `lag`, else the queue's estimate (XLEN less pending, which counts untrimmed entries)."""
    last = client.xinfo_stream(stream).get("last-generated-id")
    if last is not None and _s(last) == _s(group_info.get("last-delivered-id", b"")):
        return 0
    return q.undelivered()


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


# -- PostgreSQL ----------------------------------------------------------------------------------
def check_postgres(database_url: str | None, *, max_staleness_s: float | None = 300.0, min_rows: int = 1,
                   now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> list[CheckResult]:
    """Reachable; schema version is this code's; rows ≥ `min_rows`; newest `last_seen` ≤ `max_staleness_s` old.

    `max_staleness_s` None or 0 turns the freshness check off (replayed historical data).
    """
    if not database_url:
        return [CheckResult("postgres", SKIP, "not requested (database_url not set)")]
    import psycopg

    from telemetry_nb import store

    names = ["postgres.schema", "postgres.rows", "postgres.freshness"]
    try:
        with store.connect(database_url, autocommit=True, connect_timeout=5) as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]
            try:
                s = store.Reader(conn).summary()
            except psycopg.errors.UndefinedTable as err:
                return [CheckResult("postgres.reachable", PASS, f"{redact(database_url)} (PostgreSQL {version})"),
                        CheckResult("postgres.schema", FAIL, f"schema missing ({_err(err)}); has a collector run?"),
                        *(CheckResult(n, SKIP, "skipped: no schema") for n in names[1:])]
    except psycopg.Error as err:
        return [CheckResult("postgres.reachable", FAIL, f"{redact(database_url)}: {_err(err)}"),
                *(CheckResult(n, SKIP, "skipped: PostgreSQL unreachable") for n in names)]
    out = [CheckResult("postgres.reachable", PASS, f"{redact(database_url)} (PostgreSQL {version})")]
    want = store.SCHEMA_VERSION
    out.append(CheckResult("postgres.schema", PASS if s["schema_version"] == want else FAIL,
                           f"schema version {s['schema_version']} (this code expects {want})"))
    out.append(CheckResult("postgres.rows", PASS if s["rows"] >= min_rows else FAIL,
                           f"{s['rows']} telemetry rows, {s['gpus']} GPUs (need >= {min_rows} rows)"))
    newest = s["newest"]
    if not max_staleness_s:
        out.append(CheckResult("postgres.freshness", SKIP, f"disabled (max_staleness_s={max_staleness_s!r}); "
                                                           f"newest sample {_iso(newest)}"))
    elif newest is None:
        out.append(CheckResult("postgres.freshness", FAIL, "no GPU has reported yet"))
    else:
        age = (now() - newest).total_seconds()
        status = PASS if age <= max_staleness_s else FAIL
        op = "<=" if status == PASS else ">"
        out.append(CheckResult("postgres.freshness", status,
                               f"newest sample {_iso(newest)} is {age:.0f}s old ({op} {max_staleness_s:g}s)"))
    return out


def _iso(ts: datetime | None) -> str:
    return ts.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z") if ts else "none"


# -- Kubernetes ----------------------------------------------------------------------------------
def check_kubernetes(kube_context: str | None, namespace: str | None = None,
                     expected: Mapping[str, int] | None = None, *, release: str | None = None,
                     components: Sequence[str] | str | None = None, core_api: Any = None) -> list[CheckResult]:
    """Ready pods per component (`app.kubernetes.io/component=…`) ≥ `expected[component]`.

    `kube_context` "in-cluster" uses the pod's service account; None/"" skips the section. `release`
    narrows to `app.kubernetes.io/instance=<release>`. `components` (a list or "a,b") names what to check,
    each needing `expected.get(c, 1)` Ready pods; by default the keys of `expected` (or all three
    pipeline components). `core_api` (a `CoreV1Api`) is for tests.
    """
    wanted = expected_counts(expected, components)
    if not kube_context and core_api is None:
        return [CheckResult("kubernetes", SKIP, "not requested (kube_context not set)")]
    selector = APP_LABEL + (f",app.kubernetes.io/instance={release}" if release else "")
    try:
        api = core_api or _core_api(kube_context)
        ns = namespace or _default_namespace(kube_context)
        pods = api.list_namespaced_pod(ns, label_selector=selector, _request_timeout=15).items
    except Exception as err:  # noqa: BLE001 (config, auth, network: all mean "cannot check")
        return [CheckResult("kubernetes.api", FAIL, f"context {kube_context!r}: {_err(err)}"),
                *(CheckResult(f"kubernetes.{c}", SKIP, "skipped: Kubernetes API unavailable") for c in wanted)]
    out = [CheckResult("kubernetes.api", PASS, f"context {kube_context!r}, namespace {ns!r}: "
                                                f"{len(pods)} pods match {selector}")]
    for component, want in wanted.items():
        mine = [p for p in pods if (p.metadata.labels or {}).get("app.kubernetes.io/component") == component]
        ready = [p for p in mine if _pod_ready(p)]
        not_ready = [f"{p.metadata.name} ({p.status.phase})" for p in mine if not _pod_ready(p)]
        detail = f"{len(ready)}/{len(mine)} pods ready (need >= {want})"
        if not_ready:
            detail += f"; not ready: {', '.join(not_ready[:5])}"
        out.append(CheckResult(f"kubernetes.{component}", PASS if len(ready) >= int(want) else FAIL, detail))
    return out


def expected_counts(expected: Mapping[str, int] | str | None, components: Sequence[str] | str | None = None
                    ) -> dict[str, int]:
    """component → Ready pods needed, from `expected` and an optional component list ("a,b" or a list).

    `expected` may also be text, as `papermill -p` passes it: JSON (`{"collector": 2}`) or `collector=2,api-gateway=1`.
    """
    if isinstance(expected, str):
        text = expected.strip()
        if text.startswith("{"):
            expected = json.loads(text)
        else:
            pairs = [p.partition("=") for p in text.split(",") if p.strip()]
            expected = {k.strip(): int(v or 1) for k, _, v in pairs}
    expected = dict(expected or {})
    if isinstance(components, str):
        components = [c.strip() for c in components.split(",") if c.strip()]
    names = list(components) if components else (list(expected) or list(COMPONENTS))
    return {c: int(expected.get(c, 1)) for c in names}


def retry(run: Callable[[], list[CheckResult]], timeout_s: float = 0, interval_s: float = 5.0,
          sleep: Callable[[float], None] = time.sleep) -> list[CheckResult]:
    """Run a section until nothing fails or `timeout_s` has passed (a rollout still settling); the last results."""
    deadline = time.monotonic() + max(float(timeout_s or 0), 0.0)
    while True:
        results = run()
        if not failed(results) or time.monotonic() + interval_s > deadline:
            return results
        sleep(interval_s)


def _core_api(kube_context: str):
    from kubernetes import client, config

    if kube_context == "in-cluster":
        config.load_incluster_config()
    else:
        config.load_kube_config(context=kube_context)
    return client.CoreV1Api()


def _default_namespace(kube_context: str | None) -> str:
    if kube_context == "in-cluster":
        try:
            return Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace").read_text().strip()
        except OSError:
            return "default"
    try:
        from kubernetes import config

        contexts, active = config.list_kube_config_contexts()
        ctx = next((c for c in contexts if c["name"] == kube_context), active)
        return ctx.get("context", {}).get("namespace") or "default"
    except Exception:  # noqa: BLE001
        return "default"


def _pod_ready(pod) -> bool:
    if pod.metadata.deletion_timestamp is not None or pod.status.phase != "Running":
        return False
    return any(c.type == "Ready" and c.status == "True" for c in (pod.status.conditions or []))


# -- all of it -----------------------------------------------------------------------------------
def run_all(*, api_url: str | None = None, redis_url: str | None = None, database_url: str | None = None,
            stream: str = "telemetry", group: str = "collectors", kube_context: str | None = None,
            namespace: str | None = None, expected: Mapping[str, int] | None = None, max_lag: int | None = 1000,
            max_pending: int | None = None, max_dead: int | None = None, min_consumers: int = 1,
            max_staleness_s: float | None = 300.0, release: str | None = None,
            components: Sequence[str] | str | None = None, timeout_s: float = 0,
            stale_group_s: float = 86400.0, api_token: str | None = None,
            partitions: int | None = None) -> list[CheckResult]:
    """Every section, in order API → Redis → PostgreSQL → Kubernetes, retried until `timeout_s` (in all) passed."""
    deadline = time.monotonic() + max(float(timeout_s or 0), 0.0)

    def left() -> float:
        return max(0.0, deadline - time.monotonic())

    return [*retry(lambda: check_api(api_url, token=api_token), left()),
            *retry(lambda: check_redis(redis_url, stream, group, max_lag=max_lag, max_pending=max_pending,
                                       max_dead=max_dead, min_consumers=min_consumers,
                                       stale_group_s=stale_group_s, partitions=partitions), left()),
            *retry(lambda: check_postgres(database_url, max_staleness_s=max_staleness_s), left()),
            *retry(lambda: check_kubernetes(kube_context, namespace, expected, release=release,
                                            components=components), left())]


def failed(results: Sequence[CheckResult]) -> list[str]:
    return [r.name for r in results if r.status == FAIL]


def to_frame(results: Sequence[CheckResult]):
    import pandas as pd

    return pd.DataFrame([asdict(r) for r in results], columns=["name", "status", "detail"]).rename(
        columns={"name": "check"})


def write_report(results: Sequence[CheckResult], path: str | Path, parameters: Mapping[str, Any] | None = None) -> dict:
    """Write the JSON report (`ok`, `failed`, `checks`, `parameters` with URLs redacted); returns it."""
    params = {k: (redact(v) if isinstance(v, str) and "://" in v else v) for k, v in (parameters or {}).items()}
    report = {"generated_at": _iso(datetime.now(UTC)), "ok": not failed(results), "failed": failed(results),
              "counts": {s: sum(r.status == s for r in results) for s in (PASS, FAIL, SKIP)},
              "checks": [asdict(r) for r in results], "parameters": params}
    path = Path(path)
    if path.parent != Path(""):
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    tmp.replace(path)
    return report


def assert_passed(results: Sequence[CheckResult]) -> None:
    """Raise `AssertionError("failed checks: a, b")` when any check failed (papermill exits non-zero)."""
    names = failed(results)
    if names:
        details = "; ".join(f"{r.name}: {r.detail}" for r in results if r.status == FAIL)
        raise AssertionError(f"failed checks: {', '.join(names)} ({details})")


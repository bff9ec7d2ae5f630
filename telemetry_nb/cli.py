"""`telemetry-nb` subcommands: thin wiring of settings, servers and the pipeline layers."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from telemetry_nb import __version__
from telemetry_nb.config import Settings, redact

# set before numpy is first imported: the services use no BLAS, and OpenBLAS's thread pool costs every
# process ~0.1 s of CPU at start-up (measured: numpy + pyarrow import in 0.29 s of CPU, 0.17 s with one thread)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

log = logging.getLogger("telemetry_nb")
EXIT_USAGE = 2


class CliError(Exception):
    """A user-facing error: printed as `error: …` with a non-zero exit, no traceback."""


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "uvicorn.access", "psycopg.pool"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _settings(args: argparse.Namespace, **extra) -> Settings:
    overrides = {
        "redis_url": getattr(args, "redis_url", None), "database_url": getattr(args, "database_url", None),
        "stream": getattr(args, "stream", None), "group": getattr(args, "group", None),
        "stream_partitions": getattr(args, "partitions", None),
        "home": Path(args.home) if getattr(args, "home", None) else None,
        "metrics_port": getattr(args, "metrics_port", None), "batch_size": getattr(args, "batch_size", None),
    }
    overrides.update(extra)
    return Settings.from_env(**overrides)


def _with_servers(settings: Settings, need_db: bool = True) -> Settings:
    """Fill empty URLs from the embedded servers (started on demand)."""
    from dataclasses import replace

    if settings.redis_url and (settings.database_url or not need_db):
        return settings  # nothing to start (and psycopg, which the embedded servers' module loads, stays unloaded)
    from telemetry_nb.embedded import resolve_urls

    redis_url, database_url = resolve_urls(settings.redis_url, settings.database_url, settings.home, need_db=need_db)
    return replace(settings, redis_url=redis_url, database_url=database_url)


def _on_signals(stop) -> None:
    def handler(signum, frame):
        log.info("Received %s; stopping after the current batch", signal.Signals(signum).name)
        stop()
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _check_csv(path: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise CliError(f"CSV file not found: {path}")
    if not p.is_file():
        raise CliError(f"not a file: {path}")
    if not os.access(p, os.R_OK):
        raise CliError(f"CSV file is not readable (permission denied): {path}")
    try:
        with open(p, "rb") as fh:
            fh.read(1)
    except OSError as err:
        raise CliError(f"cannot read CSV file {path}: {err.strerror}") from None
    return p


def _start_metrics(settings: Settings, metrics, probes) -> None:
    """Serve /metrics, /health and /ready (from `probes`, name → callable that raises when down) if a port is set."""
    if settings.metrics_port:
        from telemetry_nb.observability import Readiness, serve_metrics
        serve_metrics(settings.metrics_port, metrics, Readiness(probes).start())


# -- commands -----------------------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> int:
    from datetime import datetime

    from tqdm import tqdm

    from telemetry_nb.sources.generate import generate_rows, row_count, write_csv
    from telemetry_nb.timeparse import parse_duration

    try:
        duration, interval = parse_duration(args.duration), parse_duration(args.interval)
        start = datetime.fromisoformat(args.start) if args.start else None
        rows = generate_rows(args.hosts, args.gpus_per_host, duration, interval, start=start, seed=args.seed,
                             idle_fraction=args.idle_fraction, namespaces=args.namespaces)
        total = row_count(args.hosts, args.gpus_per_host, duration, interval)
    except ValueError as err:
        raise CliError(str(err)) from None
    with tqdm(total=total, unit="rows", unit_scale=True, disable=None, desc="generate") as bar:
        n = write_csv(args.out, rows, progress=bar.update)
    log.info("Wrote %d rows (%d GPUs on %d hosts) to %s", n, args.hosts * args.gpus_per_host, args.hosts, args.out)
    return 0


def cmd_stream(args: argparse.Namespace) -> int:
    import contextlib

    from telemetry_nb.pipeline.placement import parse_shard
    from telemetry_nb.sources.dcgm_csv import HeaderError, read_samples
    from telemetry_nb.sources.limits import RowLimits

    path = _check_csv(args.csv)
    if args.parser not in ("fast", "exact"):
        raise CliError(f"--parser / TELEMETRY_CSV_PARSER must be 'fast' or 'exact', got {args.parser!r}")
    extra = {"high_water": args.high_water}
    if args.shard:
        try:
            extra["shard_index"], extra["shard_count"] = parse_shard(args.shard)
        except ValueError as err:
            raise CliError(str(err)) from None
    settings = _settings(args, **extra)
    if not 0 <= settings.shard_index < max(settings.shard_count, 1):
        raise CliError(f"invalid shard {settings.shard_index}/{settings.shard_count}: need 0 <= I < N")
    try:  # validate the header before touching Redis: a bad file publishes nothing
        next(iter(read_samples(path, with_labels=False)), None)
    except HeaderError as err:
        raise CliError(f"{path}: {err}") from None
    try:
        limits = RowLimits.from_settings(settings)
    except ValueError as err:
        raise CliError(f"TELEMETRY_MIN_TIMESTAMP: {err}") from None
    workers = _stream_workers(args, path)
    fast = _fast_parser(args, path)
    pool = None
    if fast or workers > 1:  # parsing starts now, while this process goes on to import and reach Redis
        from telemetry_nb.pipeline.chunk_pool import ChunkPool

        pool = ChunkPool.from_settings(settings, str(path), workers, limits, "fast" if fast else "exact")
    with pool or contextlib.nullcontext():
        return _stream(args, path, _with_servers(settings, need_db=False), limits, pool, workers)


def _stream(args: argparse.Namespace, path: Path, settings: Settings, limits, pool, workers: int) -> int:
    """`stream` once its file is checked and its parser pool (if any) started: publish it all."""
    from tqdm import tqdm

    from telemetry_nb.observability import PipelineMetrics
    from telemetry_nb.pipeline.streamer import Streamer
    from telemetry_nb.pipeline.streams import open_partitions, partitions_probe
    from telemetry_nb.sources.dcgm_csv import read_samples

    log.info("Streaming %s to %s stream %r (%d partition%s, shard %d/%d, batch %d rows)", path,
             redact(settings.redis_url), settings.stream, settings.stream_partitions,
             "" if settings.stream_partitions == 1 else "s", settings.shard_index, settings.shard_count,
             settings.batch_size)
    queue = open_partitions(settings)
    metrics = PipelineMetrics()
    with tqdm(unit="rows", unit_scale=True, disable=None, desc="stream") as bar:
        streamer = Streamer(queue, settings, metrics=metrics, progress=bar.update)
        streamer.source_name = str(path)
        _on_signals(streamer.stop)
        _start_metrics(settings, metrics, {"redis": partitions_probe(settings)})
        if pool is not None:
            if pool.parser == "fast":
                log.info("Parsing with the fast CSV parser in %d process%s (one pass, source timestamps)", workers,
                         "" if workers == 1 else "es")
            else:
                log.info("Parsing with %d worker processes (one pass, source timestamps)", workers)
            summary = streamer.run_chunks(pool)
        else:
            summary = streamer.run(lambda: read_samples(path, limits=limits), loop=args.loop,
                                   timestamps=args.timestamps, rate=args.rate)
    print(f"published={summary.published} rejected={summary.rejected}")
    return 0


def cmd_scrape(args: argparse.Namespace) -> int:
    from telemetry_nb.observability import PipelineMetrics, ScrapeMetrics
    from telemetry_nb.pipeline.placement import parse_shard
    from telemetry_nb.pipeline.scraper import Scraper
    from telemetry_nb.pipeline.streamer import Streamer
    from telemetry_nb.pipeline.streams import open_partitions, partitions_probe
    from telemetry_nb.timeparse import parse_duration

    targets = _scrape_targets(args)
    try:
        interval, timeout = parse_duration(args.interval), parse_duration(args.timeout)
    except ValueError as err:
        raise CliError(str(err)) from None
    if interval <= 0 or timeout <= 0:
        raise CliError("--interval and --timeout must be positive")
    extra = {"high_water": args.high_water}
    if args.shard:
        try:
            extra["shard_index"], extra["shard_count"] = parse_shard(args.shard)
        except ValueError as err:
            raise CliError(str(err)) from None
    settings = _with_servers(_settings(args, **extra), need_db=False)
    log.info("Scraping %s every %gs (timeout %gs, %d at a time) into %s stream %r (shard %d/%d)",
             _describe_targets(args), interval, timeout, args.concurrency, redact(settings.redis_url),
             settings.stream, settings.shard_index, settings.shard_count)
    metrics = PipelineMetrics()
    streamer = Streamer(open_partitions(settings), settings, metrics=metrics)
    streamer.source_name = "scrape"
    if args.workers < 1:
        raise CliError("--workers must be at least 1")
    if args.parser not in ("fast", "exact"):
        raise CliError(f"--parser (or $TELEMETRY_SCRAPE_PARSER) must be fast or exact, not {args.parser!r}")

    def make_worker() -> Scraper:  # runs in a forked worker process: its own Redis connection
        worker_streamer = Streamer(open_partitions(settings), settings)
        worker_streamer.source_name = "scrape"
        return Scraper(worker_streamer, targets, ScrapeMetrics(PipelineMetrics().registry), interval_s=interval,
                       timeout_s=timeout, concurrency=args.concurrency, parser=args.parser)

    scraper = Scraper(streamer, targets, ScrapeMetrics(metrics.registry), interval_s=interval, timeout_s=timeout,
                      concurrency=args.concurrency, workers=args.workers, make_worker=make_worker, parser=args.parser)
    _on_signals(scraper.stop)
    _start_metrics(settings, metrics, {"redis": partitions_probe(settings)})
    try:
        cycles = scraper.run(cycles=args.cycles)
    finally:
        if hasattr(targets, "stop"):
            targets.stop()
    print(f"cycles={cycles} published={scraper.published} rejected={scraper.rejected}")
    return 0


def cmd_fake_exporter(args: argparse.Namespace) -> int:
    import asyncio

    from telemetry_nb.sources.fake_exporter import FakeExporter

    exporter = FakeExporter(args.targets, args.gpus, args.fields, seed=args.seed)
    if args.targets_file:
        from telemetry_nb.sources.fake_exporter import target_urls

        Path(args.targets_file).write_text("\n".join(target_urls(f"http://{args.host}:{args.port}", args.targets))
                                           + "\n")
    try:
        asyncio.run(exporter.serve(args.host, args.port))
    except KeyboardInterrupt:
        pass
    return 0


def _scrape_targets(args: argparse.Namespace):
    from telemetry_nb.sources.targets import FileTargets, KubernetesTargets, StaticTargets, kubernetes_client

    chosen = sum(bool(x) for x in (args.target, args.targets_file, args.kubernetes))
    if chosen != 1:
        raise CliError("give exactly one of --target URL (repeatable), --targets-file FILE or --kubernetes")
    if args.target:
        return StaticTargets(args.target)
    if args.targets_file:
        if not Path(args.targets_file).is_file():
            raise CliError(f"targets file not found: {args.targets_file}")
        return FileTargets(args.targets_file)
    try:
        api = kubernetes_client(args.kube_api)
    except Exception as err:  # noqa: BLE001 (no in-cluster config and no kubeconfig)
        raise CliError(f"cannot configure the Kubernetes client: {err}") from None
    found = KubernetesTargets(api, namespace=args.namespace, selector=args.selector, port=args.port,
                              role=args.role, field_selector=args.field_selector or "").start()
    if not found.wait_synced(30):
        log.warning("Discovery has not listed any %s yet; scraping whatever it finds", args.role)
    return found


def _describe_targets(args: argparse.Namespace) -> str:
    if args.target:
        return f"{len(args.target)} target(s)"
    if args.targets_file:
        return f"the targets in {args.targets_file}"
    return f"{args.role}s {args.selector!r} in namespace {args.namespace} (port {args.port})"


def _fast_parser(args: argparse.Namespace, path: Path) -> bool:
    """`--parser fast` (the default) reads one-pass loads with source timestamps; other runs go row by row."""
    if args.parser == "exact":
        return False
    if args.loop or args.timestamps != "source" or args.rate:
        log.debug("The fast CSV parser reads one-pass loads with source timestamps; this run reads row by row")
        return False
    from telemetry_nb.sources.dcgm_csv import chunkable

    if not chunkable(path):
        log.info("%s does not start with a plain header line; reading it row by row", path)
        return False
    return True


def _stream_workers(args: argparse.Namespace, path: Path) -> int:
    """Parallel parsing only for a one-pass bulk load with source timestamps; `auto` also wants a big file."""
    eligible = not args.loop and args.timestamps == "source" and not args.rate
    if args.workers == "auto":
        return min(os.cpu_count() or 1, 4) if eligible and path.stat().st_size > 16 << 20 else 1
    try:
        n = int(args.workers)
    except ValueError:
        raise CliError(f"--workers must be a number or 'auto', got {args.workers!r}") from None
    if n < 1:
        raise CliError("--workers must be at least 1")
    if n > 1 and not eligible:
        raise CliError("--workers > 1 needs a one-pass load with source timestamps (no --loop, --rate or "
                       "--timestamps now)")
    return n


def cmd_collect(args: argparse.Namespace) -> int:
    from telemetry_nb.observability import PipelineMetrics
    from telemetry_nb.pipeline.collector import Collector
    from telemetry_nb.pipeline.streams import open_partitions, partitions_probe
    from telemetry_nb.store import postgres_probe

    extra = {"visibility_timeout_s": args.visibility_timeout, "max_deliveries": args.max_deliveries,
             "read_count": args.read_count, "consumer_idle_limit_s": args.consumer_idle_limit,
             "writers": args.writers}
    if args.consumer:
        extra["consumer"] = args.consumer
    settings = _with_servers(_settings(args, **extra))
    log.info("Collecting %s stream %r (%d partition%s, group %r, consumer %r) into %s", redact(settings.redis_url),
             settings.stream, settings.stream_partitions, "" if settings.stream_partitions == 1 else "s",
             settings.group, settings.consumer, redact(settings.database_url))
    queue = open_partitions(settings)
    metrics = PipelineMetrics()
    collector = Collector(queue, settings.database_url, settings, metrics=metrics)
    _on_signals(collector.stop)
    _start_metrics(settings, metrics, {"redis": partitions_probe(settings),
                                       "postgresql": postgres_probe(settings.database_url)})
    totals = collector.run(drain=args.drain)
    print(" ".join(f"{k}={v}" for k, v in totals.items()))
    return 0


def cmd_maintain(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from telemetry_nb.observability import PipelineMetrics
    from telemetry_nb.pipeline.maintainer import Maintainer

    settings = _settings(args)
    if not settings.database_url:
        from telemetry_nb.embedded import Embedded

        settings = replace(settings, database_url=Embedded(settings.home, services=("postgresql",)).env()
                           ["DATABASE_URL"])
    policy = settings.policy()
    log.info("Maintaining %s: partitions of %s, raw kept %s, 1m %s, 1h %s, packed after %s",
             redact(settings.database_url), policy.partition, policy.retention_raw or "forever",
             policy.retention_1m or "forever", policy.retention_1h or "forever", policy.late_window)
    metrics = PipelineMetrics()
    maintainer = Maintainer(settings.database_url, policy, metrics=metrics)
    if args.once:
        report = maintainer.run_once()
        maintainer.close()
        if not report.leader:
            print("not leader: another maintainer holds the lock; nothing done")
            return 0
        r = report.refresh
        print(f"created={len(report.created)} refreshed_changes={r.changes if r else 0} "
              f"rollup_rows={(r.rows_1m + r.rows_1h) if r else 0} packed={len(report.packed)} "
              f"dropped={sum(len(v) for v in report.dropped.values())}")
        return 0
    _on_signals(maintainer.stop)
    _start_metrics(settings, metrics, lambda: (True, "ok"))
    maintainer.run(args.interval if args.interval is not None else settings.maintain_interval_s)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from telemetry_nb.api import create_app
    from telemetry_nb.api.limits import ApiLimits, serve_workers

    settings = _with_servers(_settings(args))
    try:
        workers = serve_workers(args.workers)
        if workers < 1:
            raise ValueError("--workers must be at least 1")
        limits = ApiLimits.from_env(workers=workers)
    except ValueError as err:
        raise CliError(str(err)) from None
    log.info("API on http://%s:%d (docs at /docs, %d worker process%s, %d database connections each, 503 after "
             "%gs waiting or %d waiting) over %s", args.host, args.port, workers, "" if workers == 1 else "es",
             limits.pool_size, limits.queue_timeout_s, limits.max_waiting, redact(settings.database_url))
    # /ready asks the node of every stream partition on a cluster: the app (and each worker) reads these
    os.environ["TELEMETRY_STREAM"] = settings.stream
    os.environ["TELEMETRY_STREAM_PARTITIONS"] = str(settings.stream_partitions)
    if workers == 1:
        uvicorn.run(create_app(settings.database_url, settings.redis_url, limits=limits), host=args.host,
                    port=args.port, log_level="warning", access_log=False)
        return 0
    # worker processes import the app by name: they get the resolved URLs (embedded servers included) by env
    os.environ["DATABASE_URL"] = settings.database_url
    os.environ["TELEMETRY_API_WORKERS"] = str(workers)
    if settings.redis_url:
        os.environ["REDIS_URL"] = settings.redis_url
    # access_log off: its lines (INFO) were never shown at this log level, yet each was formatted per request
    uvicorn.run("telemetry_nb.api.app:app_from_env", factory=True, workers=workers, host=args.host, port=args.port,
                log_level="warning", access_log=False)
    return 0


def cmd_embedded(args: argparse.Namespace) -> int:
    from telemetry_nb.embedded import Embedded

    services = tuple(s.strip() for s in args.services.split(",") if s.strip())
    emb = Embedded(_settings(args).home, host=args.host, services=services)
    if args.action == "start":
        env = emb.env()
        for name, key in (("Redis:     ", "REDIS_URL"), ("PostgreSQL:", "DATABASE_URL")):
            if key in env:
                print(f"{name} {env[key]}")
    elif args.action == "stop":
        emb.stop()
        print("stopped")
    elif args.action == "status":
        status = emb.status()
        print(json.dumps(status, indent=2))
        return 0 if status["redis"]["running"] and status["postgresql"]["running"] else 3
    elif args.action == "env":
        print("export " + " ".join(f"{k}={v}" for k, v in emb.env().items()))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from telemetry_nb.demo import run_demo

    return run_demo(args, _settings(args))


def cmd_check(args: argparse.Namespace) -> int:
    from telemetry_nb.pipeline.streams import open_partitions
    from telemetry_nb.store import Reader
    from telemetry_nb.store import connect as db_connect

    settings = _with_servers(_settings(args))
    ok = True
    try:  # read-only: nothing here writes to Redis
        parts = open_partitions(settings, timeout_s=5, wait=False)
        parts.r.ping()
        backlogs = parts.backlogs()
        n = len(parts)
        print(f"redis      ok   {redact(settings.redis_url)} backlog={sum(backlogs.values())} "
              f"dead={parts.dead_count()} rejected={parts.rejected_count()}" + (f" partitions={n}" if n > 1 else ""))
        if n > 1:
            for i, q in enumerate(parts):
                print(f"  partition {q.stream} backlog={backlogs[i]} pending={q.pending_count()} "
                      f"dead={q.dead_count()} rejected={q.rejected_count()}")
        stale_after = args.stale_group_after if args.stale_group_after is not None else settings.group_stale_s
        for key, g in parts.group_uses():
            if g.stale(stale_after):
                print(f"  group    {g.name!r} STALE: no consumer for > {stale_after:g}s, holds entries back from "
                      f"trimming for {g.holding_s:.0f}s (pending={g.pending}); if it is abandoned, remove it: "
                      f"XGROUP DESTROY {key} {g.name}")
        for d in parts.read_dead(args.dead) if args.dead else []:
            rows = f" rows={d['rows']}" if "rows" in d else ""
            print(f"  dead     {d.get('entry_id')} deliveries={d.get('deliveries')}{rows} {d.get('error')}")
            if d.get("row"):
                print(f"           {d['row'][:400]}")
        for r in parts.read_rejected(args.rejected) if args.rejected else []:
            print(f"  rejected {r.get('source')}:{r.get('line')} {r.get('reason')}")
    except Exception as err:  # noqa: BLE001
        ok = False
        print(f"redis      FAIL {redact(settings.redis_url)}: {err}")
    try:
        with db_connect(settings.database_url, autocommit=True) as conn:
            s = Reader(conn).summary()
        print(f"postgresql ok   {redact(settings.database_url)} schema={s['schema_version']} rows={s['rows']} "
              f"gpus={s['gpus']} newest={s['newest']}")
    except Exception as err:  # noqa: BLE001
        ok = False
        print(f"postgresql FAIL {redact(settings.database_url)}: {str(err).strip()}")
    api_url = args.api_url or os.environ.get("TELEMETRY_API_URL")
    if api_url:
        ok = _check_api(api_url, args.api_token) and ok
    return 0 if ok else 1


def _check_api(api_url: str, token: str | None) -> bool:
    """The API's health, readiness and a data route with the bearer token (arg or $TELEMETRY_API_TOKEN)."""
    from telemetry_nb.analysis.checks import FAIL, PASS, check_api

    results = check_api(api_url, token=token, timeout=5)
    for r in results:
        print(f"{r.name:<10} {'ok' if r.status == PASS else r.status.upper():<4} {r.detail}")
    return not any(r.status == FAIL for r in results)


# -- parser ------------------------------------------------------------------------------------
def parse_duration_arg(text: str) -> float:
    """argparse type for `90s`, `10m`, `1h`, `1d`."""
    from telemetry_nb.timeparse import parse_duration

    try:
        return parse_duration(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _positive_int(text: str) -> int:
    """argparse type for a count of at least 1."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _common(p: argparse.ArgumentParser, *, db: bool = True, redis: bool = True) -> None:
    if redis:
        p.add_argument("--redis-url", help="Redis URL (redis://, rediss://, unix://, or redis+cluster://host:port "
                                           "for a Redis Cluster); default $REDIS_URL or the embedded server")
        p.add_argument("--stream", help="stream name (default $TELEMETRY_STREAM or 'telemetry')")
        p.add_argument("--partitions", type=int, metavar="N",
                       help="stream partitions (default $TELEMETRY_STREAM_PARTITIONS or 1); every streamer, "
                            "collector and API of a stream must use the same N")
    if db:
        p.add_argument("--database-url", help="PostgreSQL URL; default $DATABASE_URL or the embedded server")
    p.add_argument("--home", help="data folder of the embedded servers (default $TELEMETRY_NB_HOME "
                                  "or ./.telemetry-nb)")
    p.add_argument("--log-level", default=os.environ.get("TELEMETRY_LOG_LEVEL", "INFO"),
                   help="DEBUG, INFO, WARNING or ERROR (default INFO)")


def _publish_args(p: argparse.ArgumentParser) -> None:
    """The flags every publisher (`stream`, `scrape`) shares: sharding, batch size, backpressure."""
    p.add_argument("--shard", help="I/N: publish only GPUs of shard I of N (default $TELEMETRY_SHARD_INDEX/"
                                   "$TELEMETRY_SHARD_COUNT or 0/1)")
    p.add_argument("--batch-size", type=int, help="rows per stream entry (default 2000)")
    p.add_argument("--high-water", type=int, help="wait while more entries than this are unacknowledged "
                                                  "(default 1000; 0 disables)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="telemetry-nb",
        description="GPU telemetry pipeline: DCGM CSV -> Redis Streams -> PostgreSQL -> REST API -> notebooks.",
        epilog="Without REDIS_URL/DATABASE_URL every command uses the embedded servers under ./.telemetry-nb.")
    parser.add_argument("--version", action="version", version=f"telemetry-nb {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("demo", help="run everything on embedded servers with sample data (the main job)",
                       description="Start the embedded servers and run a source + collector + API (+ dashboard) "
                                   "until Ctrl-C. The source scrapes a built-in fake dcgm-exporter serving "
                                   "generated GPUs, or your exporters (--scrape URL), or replays a CSV (--csv).")
    p.add_argument("--csv", help="DCGM CSV to replay live instead of scraping")
    p.add_argument("--scrape", action="append", metavar="URL",
                   help="a real dcgm-exporter to scrape, e.g. http://gpu-node:9400/metrics (repeatable)")
    p.add_argument("--scrape-interval", default="1s", help="scrape interval in the demo (default 1s)")
    p.add_argument("--port", type=int, default=8000, help="API port (default 8000)")
    p.add_argument("--dashboard-port", type=int, default=8866, help="Voilà dashboard port (default 8866)")
    p.add_argument("--no-dashboard", action="store_true", help="do not start the Voilà dashboard")
    p.add_argument("--hosts", type=int, default=4, help="fake exporter hosts (default 4)")
    p.add_argument("--gpus-per-host", type=int, default=8, help="GPUs per fake host (default 8)")
    _common(p, db=False, redis=False)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("generate", help="write a synthetic DCGM CSV export",
                       description="Write synthetic dcgm-exporter CSV rows: every GPU reports 10 metrics per tick.")
    p.add_argument("--hosts", type=int, default=4, help="number of hosts (default 4)")
    p.add_argument("--gpus-per-host", type=int, default=8, help="GPUs per host (default 8)")
    p.add_argument("--duration", default="10m", help="time span, e.g. 90s, 10m, 2h (default 10m)")
    p.add_argument("--interval", default="1s", help="sampling interval (default 1s)")
    p.add_argument("--start", help="first timestamp, ISO 8601 (default now)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--idle-fraction", type=float, default=0.3, help="share of idle GPUs (default 0.3)")
    p.add_argument("--namespaces", type=int, default=0,
                   help="schedule pods of N namespaces onto the GPUs over time (some GPUs free and unattributed, "
                        "one pod in five at 0%% utilization); default 0: a fixed ml-training fleet")
    p.add_argument("--out", required=True, help="output CSV path")
    p.add_argument("--log-level", default="INFO", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("stream", help="publish a DCGM CSV to the Redis stream",
                       description="Read a DCGM CSV export and publish it in batches to a Redis stream. "
                                   "Ends with a 'published=N rejected=M' line.")
    p.add_argument("--csv", required=True, help="DCGM CSV export to read")
    p.add_argument("--loop", action="store_true", help="replay the file forever")
    p.add_argument("--timestamps", choices=("source", "now"), default="source",
                   help="keep source timestamps, or re-stamp to now keeping their spacing (live replay)")
    p.add_argument("--rate", type=float, help="maximum rows per second")
    p.add_argument("--workers", default="auto", help="parser processes for one-pass loads: a number, or auto "
                                                     "(one per core, up to 4, for files over 16 MB; default)")
    p.add_argument("--parser", default=os.environ.get("TELEMETRY_CSV_PARSER") or "fast",
                   help="CSV parser for one-pass loads with source timestamps: fast (vectorized, pyarrow; lines it "
                        "cannot be sure of go row by row) or exact (row by row); the same rows either way "
                        "(default $TELEMETRY_CSV_PARSER or fast)")
    _publish_args(p)
    p.add_argument("--metrics-port", type=int, help="serve /metrics, /health and /ready (503 while Redis is "
                                                    "unreachable) on this port (default off)")
    _common(p, db=False)
    p.set_defaults(func=cmd_stream)

    p = sub.add_parser("scrape", help="scrape dcgm-exporter endpoints live and publish to the Redis stream",
                       description="Scrape dcgm-exporter /metrics endpoints every --interval and publish the "
                                   "samples like `stream` does (batches, backpressure, retries, shards, rejected "
                                   "lines in <stream>:rejected). Targets: --target, --targets-file or --kubernetes.",
                       epilog="Ends (on SIGTERM/Ctrl-C or after --cycles) with 'cycles=N published=N rejected=M'.")
    p.add_argument("--target", action="append", metavar="URL",
                   help="exporter URL, e.g. http://node1:9400/metrics (repeatable; host:port is enough)")
    p.add_argument("--targets-file", metavar="FILE", help="file with one URL a line, re-read when it changes")
    p.add_argument("--kubernetes", action="store_true",
                   help="discover the exporters through the Kubernetes API (list + watch, like kubernetes_sd)")
    p.add_argument("--namespace", default="gpu-operator", help="namespace of the exporters (default gpu-operator)")
    p.add_argument("--selector", default="app=nvidia-dcgm-exporter",
                   help="label selector of the exporter pods or EndpointSlices (default app=nvidia-dcgm-exporter)")
    p.add_argument("--port", type=int, default=9400, help="exporter port (default 9400)")
    p.add_argument("--role", choices=("pod", "endpointslice"), default="pod",
                   help="discover pods (default) or the EndpointSlices of the exporter's Service")
    p.add_argument("--field-selector", help="extra field selector, e.g. spec.nodeName=$NODE_NAME (own node only)")
    p.add_argument("--kube-api", metavar="URL", help="Kubernetes API server URL (default: in-cluster config, "
                                                     "else the kubeconfig)")
    p.add_argument("--interval", default="15s", help="time between scrapes of a target (default 15s)")
    p.add_argument("--timeout", default="5s", help="per-target scrape timeout (default 5s)")
    p.add_argument("--concurrency", type=int, default=100, help="targets scraped at once (default 100)")
    p.add_argument("--cycles", type=int, help="stop after this many scrape cycles (default: run until stopped)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes that fetch, parse and publish a share of the targets each (default 1; "
                        "parsing is CPU-bound: more helps with hundreds of targets on several cores)")
    p.add_argument("--parser", choices=("fast", "exact"), default=os.environ.get("TELEMETRY_SCRAPE_PARSER", "fast"),
                   help="fast (default): vectorized for regular exporter text, the exact line parser for any other "
                        "target; exact: the line parser for every target (same output, more CPU). "
                        "Default $TELEMETRY_SCRAPE_PARSER or fast")
    _publish_args(p)
    p.add_argument("--metrics-port", type=int, help="serve /metrics (telemetry_scrape_up{target}…) and /health "
                                                    "on this port (default off)")
    _common(p, db=False)
    p.set_defaults(func=cmd_scrape)

    p = sub.add_parser("fake-exporter", help="serve generated GPUs like a fleet of dcgm-exporters (no GPU needed)",
                       description="Serve --targets fake GPU hosts on one port at /target/<i>/metrics (/metrics is "
                                   "target 0) in the Prometheus text format, values changing every scrape.")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=9400, help="port (default 9400)")
    p.add_argument("--targets", type=int, default=4, help="fake hosts (default 4)")
    p.add_argument("--gpus", type=int, default=8, help="GPUs per host (default 8)")
    p.add_argument("--fields", type=int, default=10, help="DCGM fields per GPU, at most 40 (default 10)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--targets-file", metavar="FILE", help="also write the target URLs to FILE, one a line")
    p.add_argument("--log-level", default="INFO", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_fake_exporter)

    p = sub.add_parser("collect", help="consume the stream into PostgreSQL",
                       description="Consume the stream as a consumer-group member; write each batch in one "
                                   "transaction, then acknowledge it.")
    p.add_argument("--drain", action="store_true", help="exit 0 once no undelivered or pending entries remain")
    p.add_argument("--group", help="consumer group (default $TELEMETRY_GROUP or 'collectors')")
    p.add_argument("--consumer", help="consumer name (default $TELEMETRY_CONSUMER or hostname-pid); a stable name "
                                      "lets a restarted collector re-read its own pending entries")
    p.add_argument("--consumer-idle-limit", type=parse_duration_arg, metavar="DURATION",
                   help="remove other consumers idle this long with nothing pending (default "
                        "$TELEMETRY_CONSUMER_IDLE_LIMIT or 1h)")
    p.add_argument("--visibility-timeout", type=float, help="claim entries idle longer than this, seconds "
                                                            "(default 60)")
    p.add_argument("--max-deliveries", type=int, help="dead-letter entries delivered more often (default 5)")
    p.add_argument("--read-count", type=int, help="entries per read and transaction (default 25)")
    p.add_argument("--writers", type=_positive_int, help="PostgreSQL connections writing reads in parallel, one "
                                                         "transaction each (default $TELEMETRY_COLLECTOR_WRITERS "
                                                         "or 2)")
    p.add_argument("--metrics-port", type=int, help="serve /metrics, /health and /ready (503 while Redis or "
                                                    "PostgreSQL is unreachable) on this port (default off)")
    _common(p)
    p.set_defaults(func=cmd_collect)

    p = sub.add_parser("maintain", help="partitions, rollups, packing and retention of the telemetry tables",
                       description="Create partitions ahead, refresh the 1m/1h rollups, pack closed ranges and "
                                   "drop partitions past retention (TELEMETRY_RETENTION_RAW/_1M/_1H). Collectors "
                                   "already do this in the background as a single leader; run it yourself for a "
                                   "CronJob (--once) or with TELEMETRY_MAINTAIN=0 on the collectors.")
    p.add_argument("--once", action="store_true", help="one pass, then exit (for a CronJob)")
    p.add_argument("--interval", type=float, help="seconds between passes (default $TELEMETRY_MAINTAIN_INTERVAL "
                                                  "or 60)")
    p.add_argument("--metrics-port", type=int, help="serve /metrics and /health on this port (default off)")
    _common(p, redis=False)
    p.set_defaults(func=cmd_maintain)

    p = sub.add_parser("serve", help="run the REST API gateway",
                       description="Serve the GPU inventory and telemetry over REST (OpenAPI at /openapi.json).")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes sharing the port (default $TELEMETRY_API_WORKERS, else the CPUs "
                        "this process may use)")
    _common(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("embedded", help="start/stop/status/env of the embedded Redis and PostgreSQL",
                       description="Manage the embedded servers. `eval \"$(telemetry-nb embedded env)\"` "
                                   "exports their URLs for other processes.")
    p.add_argument("action", choices=("start", "stop", "status", "env"))
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    p.add_argument("--services", default="redis,postgresql",
                   help="which servers to run: redis, postgresql or both (default redis,postgresql)")
    _common(p, db=False, redis=False)
    p.set_defaults(func=cmd_embedded)

    p = sub.add_parser("check", help="check that Redis and PostgreSQL are reachable and show backlog and rows",
                       description="Health check: exit 0 when both servers answer, 1 otherwise.")
    p.add_argument("--dead", type=int, default=0, metavar="N", help="also list the newest N dead-letter entries")
    p.add_argument("--rejected", type=int, default=0, metavar="N", help="also list the first N rejected rows")
    p.add_argument("--stale-group-after", type=parse_duration_arg, metavar="DURATION",
                   help="report consumer groups no collector used this long that hold entries back from trimming "
                        "(default $TELEMETRY_GROUP_STALE_AFTER or 1d)")
    p.add_argument("--api-url", help="also check the API at this URL (default $TELEMETRY_API_URL; unset: skipped)")
    p.add_argument("--api-token", help="bearer token for the API (default $TELEMETRY_API_TOKEN, which keeps it "
                                       "out of the process list)")
    _common(p)
    p.set_defaults(func=cmd_check)

    from telemetry_nb.analysis import dashboard
    dashboard.add_parser(sub, _common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(getattr(args, "log_level", "INFO"))
    try:
        return args.func(args) or 0
    except CliError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as err:
        from telemetry_nb.store import SchemaTooNew

        if not isinstance(err, SchemaTooNew):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 1
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

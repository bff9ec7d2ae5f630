"""Settings from environment variables, with CLI flags layered on top: the one typed place for config."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from telemetry_nb.timeparse import parse_duration


def _env_int(env: dict[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


def _env_float(env: dict[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be a number, got {raw!r}") from None


def _env_duration(env: dict[str, str], name: str, default: float, *, zero_is_none: bool = False) -> float | None:
    """A duration variable (`14d`, `1h`, `90`): seconds; with `zero_is_none`, `0` means "forever" (None)."""

    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        seconds = parse_duration(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be a duration like 14d, 1h or 90s, got {raw!r}") from None
    if seconds == 0 and zero_is_none:
        return None
    return seconds


def with_password(url: str, password: str | None) -> str:
    """Put `password` into `url` unless the URL already carries one (passwords live in Secrets, not URLs)."""
    if not url or not password:
        return url
    parts = urlsplit(url)
    if parts.password or parts.scheme.startswith("unix"):
        return url
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def redact(url: str) -> str:
    """The URL with any password replaced by `***`, for log lines."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{parts.username or ''}:***@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


@dataclass(frozen=True)
class Settings:
    """Everything a streamer, collector or API process needs to find its servers and size its work.

    Empty `redis_url`/`database_url` mean "use the embedded servers under `home`".
    """

    redis_url: str = ""
    database_url: str = ""
    stream: str = "telemetry"
    stream_partitions: int = 1  # stream keys `stream:{0}`…; 1 on a plain Redis = the one key `stream`
    group: str = "collectors"
    consumer: str = field(default_factory=lambda: f"{os.uname().nodename}-{os.getpid()}")
    batch_size: int = 2000  # rows per entry: half the per-entry work of 1000 (bench/ingest.py)
    read_count: int = 25  # 25 x 2000 rows per transaction
    writers: int = 2  # collector: PostgreSQL connections writing reads in parallel (COPY is CPU-bound per backend)
    block_ms: int = 1000
    visibility_timeout_s: float = 60.0
    max_deliveries: int = 5
    high_water: int = 1000  # entries: 2 M rows waiting at most
    retry_max_s: float = 30.0
    metrics_port: int = 0
    home: Path = Path(".telemetry-nb")
    shard_index: int = 0
    shard_count: int = 1
    side_maxlen: int = 100_000  # approximate cap of <stream>:rejected and <stream>:dead
    consumer_idle_limit_s: float = 3600.0  # remove other consumers idle this long with nothing pending
    group_stale_s: float = 86400.0  # `check` reports a group no collector used this long that holds entries
    min_timestamp: str = "2000-01-01T00:00:00Z"  # the parser rejects older timestamps
    max_future_s: float = 86400.0  # …and those further ahead of the streamer's clock than this
    partition_s: float = 86400.0
    retention_raw_s: float | None = 14 * 86400.0
    retention_1m_s: float | None = 90 * 86400.0
    retention_1h_s: float | None = 730 * 86400.0
    late_window_s: float = 86400.0
    maintain: bool = True  # collectors run the maintenance leader in the background
    maintain_interval_s: float = 60.0

    def policy(self):
        """The data lifecycle policy (`store.lifecycle.Policy`) these settings describe."""
        from datetime import timedelta

        from telemetry_nb.store.lifecycle import Policy

        def td(seconds: float | None) -> timedelta | None:
            return None if seconds is None else timedelta(seconds=seconds)

        return Policy(partition=td(self.partition_s), retention_raw=td(self.retention_raw_s),
                      retention_1m=td(self.retention_1m_s), retention_1h=td(self.retention_1h_s),
                      late_window=td(self.late_window_s))

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> Settings:
        """Read `REDIS_URL`, `DATABASE_URL`, `TELEMETRY_*` from `env` (default os.environ); non-None overrides win."""
        env = dict(os.environ if env is None else env)
        settings = cls(
            redis_url=with_password(env.get("REDIS_URL", ""), env.get("REDIS_PASSWORD")),
            database_url=env.get("DATABASE_URL", ""),
            stream=env.get("TELEMETRY_STREAM") or "telemetry",
            stream_partitions=_env_int(env, "TELEMETRY_STREAM_PARTITIONS", 1),
            group=env.get("TELEMETRY_GROUP") or "collectors",
            batch_size=_env_int(env, "TELEMETRY_BATCH_SIZE", 2000),
            read_count=_env_int(env, "TELEMETRY_READ_COUNT", 25),
            writers=_env_int(env, "TELEMETRY_COLLECTOR_WRITERS", 2),
            block_ms=_env_int(env, "TELEMETRY_BLOCK_MS", 1000),
            visibility_timeout_s=_env_float(env, "TELEMETRY_VISIBILITY_TIMEOUT", 60.0),
            max_deliveries=_env_int(env, "TELEMETRY_MAX_DELIVERIES", 5),
            high_water=_env_int(env, "TELEMETRY_HIGH_WATER", 1000),
            retry_max_s=_env_float(env, "TELEMETRY_RETRY_MAX", 30.0),
            metrics_port=_env_int(env, "TELEMETRY_METRICS_PORT", 0),
            home=Path(env.get("TELEMETRY_NB_HOME") or ".telemetry-nb"),
            shard_index=_env_int(env, "TELEMETRY_SHARD_INDEX", 0),
            shard_count=_env_int(env, "TELEMETRY_SHARD_COUNT", 1),
            side_maxlen=_env_int(env, "TELEMETRY_SIDE_MAXLEN", 100_000),
            consumer_idle_limit_s=_env_duration(env, "TELEMETRY_CONSUMER_IDLE_LIMIT", 3600.0),
            group_stale_s=_env_duration(env, "TELEMETRY_GROUP_STALE_AFTER", 86400.0),
            min_timestamp=env.get("TELEMETRY_MIN_TIMESTAMP") or "2000-01-01T00:00:00Z",
            max_future_s=_env_duration(env, "TELEMETRY_MAX_FUTURE", 86400.0),
            partition_s=_env_duration(env, "TELEMETRY_PARTITION", 86400.0),
            retention_raw_s=_env_duration(env, "TELEMETRY_RETENTION_RAW", 14 * 86400.0, zero_is_none=True),
            retention_1m_s=_env_duration(env, "TELEMETRY_RETENTION_1M", 90 * 86400.0, zero_is_none=True),
            retention_1h_s=_env_duration(env, "TELEMETRY_RETENTION_1H", 730 * 86400.0, zero_is_none=True),
            late_window_s=_env_duration(env, "TELEMETRY_LATE_WINDOW", 86400.0),
            maintain=(env.get("TELEMETRY_MAINTAIN") or "1").lower() not in ("0", "false", "no", "off"),
            maintain_interval_s=_env_duration(env, "TELEMETRY_MAINTAIN_INTERVAL", 60.0),
        )
        if settings.partition_s < 3600 or settings.partition_s % 3600:
            raise ValueError("environment variable TELEMETRY_PARTITION must be a whole number of hours (1h, 1d, "
                             f"7d…), got {env.get('TELEMETRY_PARTITION')!r}")
        if settings.writers < 1:
            raise ValueError("environment variable TELEMETRY_COLLECTOR_WRITERS must be at least 1, got "
                             f"{env.get('TELEMETRY_COLLECTOR_WRITERS')!r}")
        if settings.stream_partitions < 1:
            raise ValueError("environment variable TELEMETRY_STREAM_PARTITIONS must be at least 1, got "
                             f"{env.get('TELEMETRY_STREAM_PARTITIONS')!r}")
        if env.get("TELEMETRY_CONSUMER"):
            settings = replace(settings, consumer=env["TELEMETRY_CONSUMER"])
        known = {f.name for f in fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"unknown settings: {sorted(unknown)}")
        return replace(settings, **{k: v for k, v in overrides.items() if v is not None})

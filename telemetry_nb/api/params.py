"""Query and path parameters of the API: their schemas (patterns, formats, lengths) and their parsing.

Every pattern here describes exactly what the routes accept: a value that matches its schema is never
refused for its form (only for what the data says: an unknown GPU or metric), and a value that does
not match is a 422 naming the parameter. That is what makes the OpenAPI document exact.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Annotated

from fastapi import Path, Query
from pydantic import StringConstraints

# text that PostgreSQL can store and compare: no NUL, no other C0 control character, no DEL
TEXT_PATTERN = r"^[^\x00-\x1f\x7f]*$"
NAME_PATTERN = r"^[^\x00-\x1f\x7f]+$"
UUID_PATTERN = r"^[^\x00-\x1f\x7f/]+$"  # a path segment: no slash either
MAX_TEXT = 1024  # bytes-ish limit of hostnames, models, uuids (the streamer's limit for text fields)
MAX_METRIC = 256  # the streamer's limit for metric names

# RFC 3339 date-time; a space where the offset's sign belongs is a `+` a URL query decoded into a space
_RFC3339 = re.compile(r"^(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?"
                      r"(?:([Zz])|([+\- ])(\d{2}):(\d{2}))$")

# a GPU page's cursor is the last uuid of the page; a telemetry page's is `<epoch µs>.<metric id>`
GPU_CURSOR_PATTERN = UUID_PATTERN
TELEMETRY_CURSOR_PATTERN = r"^-?[0-9]{1,16}\.[0-9]{1,10}$"
# an event page's is `<epoch µs>.<gpu id>.<kind>`
EVENT_CURSOR_PATTERN = r"^-?[0-9]{1,16}\.-?[0-9]{1,19}\.[a-z_]{1,32}$"
KIND_PATTERN = r"^[a-z_]{1,32}$"

# a positive duration: 1–6 integer digits (an optional fraction of up to 3), or 0.xxx, then an optional unit
BUCKET_PATTERN = r"^(?:[1-9][0-9]{0,5}(?:\.[0-9]{1,3})?|0\.(?:[1-9][0-9]{0,2}|0[1-9][0-9]?|00[1-9]))(?:ms|s|m|h|d)?$"
# fleet views: whole seconds or more (an integer part of at least 1, no `ms`)
FLEET_BUCKET_PATTERN = r"^[1-9][0-9]{0,5}(?:\.[0-9]{1,3})?(?:s|m|h|d)?$"
_BUCKET = re.compile(r"^([0-9.]+)(ms|s|m|h|d)?$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}

_MIN = datetime.min.replace(tzinfo=UTC)
_MAX = datetime.max.replace(tzinfo=UTC)


class ParamError(ValueError):
    """A query parameter that cannot be used; the message starts with the parameter's name."""


def parse_time(name: str, text: str | None) -> datetime | None:
    """RFC 3339 (`Z` or an offset) → aware UTC datetime; times past datetime's range clamp to its ends.

    Clamping is exact for a query bound: no stored row lies outside datetime's range.
    """
    if text is None:
        return None
    m = _RFC3339.match(text)
    if not m:
        raise ParamError(f"{name}: unparsable time {text!r:.80}; use RFC 3339 with Z or an offset, "
                         "e.g. 2025-07-18T20:42:34Z")
    year, month, day, hour, minute, second, frac, zulu, sign, oh, om = m.groups()
    try:
        local = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second),
                         int((frac or "0")[:6].ljust(6, "0")))
        offset = timedelta(0) if zulu else (-1 if sign == "-" else 1) * timedelta(hours=int(oh), minutes=int(om))
        tz = timezone(offset)
    except ValueError as err:
        raise ParamError(f"{name}: invalid time {text!r:.80}: {err}") from None
    try:
        return local.replace(tzinfo=tz).astimezone(UTC)
    except OverflowError:
        return _MIN if offset > timedelta(0) else _MAX


def time_window(start_time: str | None, end_time: str | None) -> tuple[datetime | None, datetime | None]:
    """The `start_time`/`end_time` parameters parsed (either may be absent); 422 when end is before start."""
    start, end = parse_time("start_time", start_time), parse_time("end_time", end_time)
    if start and end and end < start:
        raise ParamError(f"end_time: {end_time} is before start_time {start_time}")
    return start, end


def fill_window(start: datetime | None, end: datetime | None, newest: Callable[[], datetime | None],
                default: timedelta) -> tuple[datetime, datetime]:
    """A window with both ends: `end` defaults to the newest stored sample (asked only then, and only if
    not before `start`), else `start` + `default` or now; `start` to `end` − `default`."""
    if end is None:
        latest = newest()
        end = latest if latest is not None and (start is None or latest >= start) else \
            (start + default if start else datetime.now(UTC))
    if start is None:
        start = end - default
    return start, end


def parse_bucket(text: str) -> float:
    """A `BUCKET_PATTERN` duration → seconds."""
    m = _BUCKET.match(text)
    if not m or not re.match(BUCKET_PATTERN, text):
        raise ParamError(f"bucket: invalid duration {text!r:.80}: use a positive number with ms, s, m, h or d "
                         "(e.g. 30s, 5m, 1h)")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


def encode_telemetry_cursor(ts: datetime, metric_id: int) -> str:
    delta = ts - datetime(1970, 1, 1, tzinfo=UTC)
    micros = (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds
    return f"{micros}.{metric_id}"


def decode_telemetry_cursor(text: str) -> tuple[datetime, int]:
    """`<epoch µs>.<metric id>` → (timestamp, metric id); every `TELEMETRY_CURSOR_PATTERN` match is valid."""
    if not re.match(TELEMETRY_CURSOR_PATTERN, text):
        raise ParamError(f"cursor: invalid cursor {text!r:.80}; pass back the next_cursor of a previous page")
    micros, metric_id = text.split(".")
    ts = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=int(micros))
    return ts, int(metric_id)


def encode_event_cursor(ts: datetime, gpu_id: int, kind: str) -> str:
    return f"{encode_telemetry_cursor(ts, 0).split('.')[0]}.{gpu_id}.{kind}"


def decode_event_cursor(text: str) -> tuple[datetime, int, str]:
    """`<epoch µs>.<gpu id>.<kind>` → (timestamp, gpu id, kind); every `EVENT_CURSOR_PATTERN` match is valid."""
    if not re.match(EVENT_CURSOR_PATTERN, text):
        raise ParamError(f"cursor: invalid cursor {text!r:.80}; pass back the next_cursor of a previous page")
    micros, gpu_id, kind = text.split(".")
    gid = max(-(2 ** 63), min(int(gpu_id), 2 ** 63 - 1))  # ids are bigint: clamping keeps the order exact
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=int(micros)), gid, kind


WORKLOAD_CURSOR_PATTERN = r"^[A-Za-z0-9_-]{1,4096}$"


def encode_workload_cursor(namespace: str, pod: str, container: str) -> str:
    raw = "\x1f".join((namespace, pod, container)).encode()  # stored names never hold control characters
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_workload_cursor(text: str) -> tuple[str, str, str]:
    """A position in (namespace, pod, container) order; every `WORKLOAD_CURSOR_PATTERN` match is one."""
    if not re.match(WORKLOAD_CURSOR_PATTERN, text):
        raise ParamError(f"cursor: invalid cursor {text!r:.80}; pass back the next_cursor of a previous page")
    text = text[: len(text) - (len(text) % 4 == 1)]  # a lone trailing character carries no whole byte
    parts = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode(errors="replace").split("\x1f", 2)
    parts += [""] * (3 - len(parts))
    return parts[0], parts[1], parts[2]


# -- the parameter declarations the routes share ------------------------------------------------
# Optional query parameters are declared `str` with a default of None (not `str | None`), so that their
# schema is the plain string schema rather than `anyOf [string, null]`: a query string has no null.
def _text(description: str, *, max_length: int = MAX_TEXT, pattern: str = TEXT_PATTERN) -> Query:
    return Query(description=description, max_length=max_length, pattern=pattern)


def _time(description: str) -> Query:
    return Query(description=description + " (RFC 3339 with `Z` or an offset; inclusive)", max_length=64,
                 json_schema_extra={"format": "date-time"})


MetricName = Annotated[str, StringConstraints(min_length=1, max_length=MAX_METRIC, pattern=NAME_PATTERN)]
Hostname = Annotated[str, _text("only GPUs of this host")]
ModelName = Annotated[str, _text("only GPUs of this model")]
Uuid = Annotated[str, Path(description="the GPU's uuid", min_length=1, max_length=MAX_TEXT, pattern=UUID_PATTERN)]
StartTime = Annotated[str, _time("earliest sample time")]
EndTime = Annotated[str, _time("latest sample time; not before start_time")]
Metrics = Annotated[list[MetricName], Query(description="metric name; repeat for several (default: every metric)")]
Namespace = Annotated[str, _text("only workloads of this namespace")]
Pod = Annotated[str, _text("only workloads of this pod")]
WorkloadCursor = Annotated[str, Query(description="next_cursor of the previous page", max_length=4096,
                                      pattern=WORKLOAD_CURSOR_PATTERN)]
GpuCursor = Annotated[str, _text("next_cursor of the previous page", pattern=GPU_CURSOR_PATTERN)]
ParentUuid = Annotated[str, _text("only the MIG instances of this GPU", pattern=UUID_PATTERN)]
EventUuid = Annotated[str, _text("only events of this GPU", pattern=UUID_PATTERN)]
EventKind = Annotated[str, Query(description="only events of this kind (e.g. xid)", max_length=32,
                                 pattern=KIND_PATTERN)]
EventCursor = Annotated[str, Query(description="next_cursor of the previous page", max_length=72,
                                   pattern=EVENT_CURSOR_PATTERN)]
TelemetryCursor = Annotated[str, Query(description="next_cursor of the previous page", max_length=28,
                                       pattern=TELEMETRY_CURSOR_PATTERN)]
Hostnames = Annotated[list[Annotated[str, StringConstraints(max_length=MAX_TEXT, pattern=TEXT_PATTERN)]],
                      Query(description="only GPUs of these hosts; repeat for several")]
ModelNames = Annotated[list[Annotated[str, StringConstraints(max_length=MAX_TEXT, pattern=TEXT_PATTERN)]],
                       Query(description="only GPUs of these models; repeat for several")]
FleetBucket = Annotated[str, Query(description="bucket width, at least 1 s: a number of at least 1 with an optional "
                                               "unit s, m, h or d (seconds without one), e.g. 30s, 15m, 1h",
                                   max_length=10, pattern=FLEET_BUCKET_PATTERN)]
Bucket = Annotated[str, Query(description="bucket width: a positive number with an optional unit ms, s, m, h "
                                          "or d (seconds without one), e.g. 30s, 5m, 1h", max_length=10,
                              pattern=BUCKET_PATTERN)]

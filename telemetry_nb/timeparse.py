"""The one timestamp parser and the one duration parser every layer shares.

Timestamps: RFC 3339 / ISO 8601 with `Z`, an offset or a ` UTC` suffix, any fraction (truncated to
microseconds), a time without offset taken as UTC, or epoch seconds / milliseconds. A `+` that a URL
query decoded into a space (`…T20:00:00 02:00`) is read as `+`. Everything out of datetime's range is a
`ValueError`, never an `OverflowError`, so callers need to catch one exception only.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

_FRACTION = re.compile(r"(\.\d{6})\d+")
_SPACE_OFFSET = re.compile(r"(T[\d:.]+) (\d\d(?::?\d\d)?)$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_timestamp(text: str) -> datetime:
    """Timestamp text (see the module docstring) → aware UTC datetime; `ValueError` when it is not one."""
    s = text.strip()
    if not s:
        raise ValueError("empty timestamp")
    try:
        if s[0].isdigit() and s.replace(".", "", 1).isdigit():
            epoch = float(s)
            if epoch > 1e11:
                epoch /= 1000.0
            try:
                return datetime.fromtimestamp(epoch, UTC)
            except ValueError:  # "year 391220960 is out of range"
                raise OverflowError from None
        if s[-4:].upper() in (" UTC", " GMT"):
            s = s[:-4] + "+00:00"
        s = _SPACE_OFFSET.sub(r"\1+\2", s)
        s = _FRACTION.sub(r"\1", s)
        try:
            ts = datetime.fromisoformat(s)
        except ValueError:
            raise ValueError(f"unparseable timestamp {text!r}") from None
        if ts.tzinfo is None:
            return ts.replace(tzinfo=UTC)
        return ts.astimezone(UTC)
    except (OverflowError, OSError):
        raise ValueError(f"timestamp out of range {text!r:.64}") from None


def format_rfc3339(ts: datetime | None) -> str | None:
    """Aware datetime → RFC 3339 in UTC with `Z` (what the API answers); None stays None."""
    if ts is None:
        return None
    return ts.astimezone(UTC).isoformat().replace("+00:00", "Z")


def parse_duration(text: str) -> float:
    """`10m`, `1s`, `250ms`, `2h`, `1d`, `1.5` (seconds) → seconds."""
    m = _DURATION.match(str(text))
    if not m:
        raise ValueError(f"invalid duration {text!r}: use a number with ms, s, m, h or d (e.g. 10m)")
    return float(m.group(1)) * _UNIT_S[m.group(2)]

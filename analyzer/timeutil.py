"""Time parameters in and out of the analyzer.

The API accepts datetimes, RFC 3339 strings and unix seconds (spec section
10); the store keeps naive UTC TIMESTAMPs. Everything is normalised here, once,
so a bad value becomes one clear ``BadRequest`` instead of a DuckDB error.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone
from typing import Union

from tailscope.errors import BadRequest

TimeLike = Union[datetime, str, int, float, None]

_EPOCH = datetime(1970, 1, 1)


def to_utc_naive(value: TimeLike, name: str = "time") -> datetime | None:
    """Parse ``value`` into a naive UTC datetime (``None`` stays ``None``).

    Raises:
        BadRequest: the value is neither RFC 3339 nor a finite unix time.
    """
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(timezone.utc).replace(tzinfo=None)
        return value
    if isinstance(value, bool):
        raise BadRequest(f"{name}: expected an RFC 3339 time or unix seconds, got {value!r}")
    if isinstance(value, (int, float)):
        return _from_unix(float(value), name)
    if isinstance(value, str):
        text = value.strip()
        try:
            return _from_unix(float(text), name)
        except ValueError:
            pass
        iso = text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text
        try:
            parsed = datetime.fromisoformat(iso)
        except ValueError:
            raise BadRequest(
                f"{name}: {value!r} is not an RFC 3339 time (e.g. 2026-11-23T14:02:00Z) or unix seconds"
            ) from None
        if parsed.tzinfo is not None:
            parsed = parsed.astimezone(timezone.utc).replace(tzinfo=None)
        return parsed
    raise BadRequest(f"{name}: expected an RFC 3339 time or unix seconds, got {type(value).__name__}")


def _from_unix(seconds: float, name: str) -> datetime:
    if not math.isfinite(seconds) or not (0 <= seconds < 32503680000):
        raise BadRequest(f"{name}: unix time {seconds!r} is out of range")
    return _EPOCH + timedelta(seconds=seconds)


def iso(value: datetime | None) -> str | None:
    """RFC 3339 UTC with a ``Z`` (what every response uses)."""
    if value is None:
        return None
    if value.tzinfo is not None:
        value = value.astimezone(timezone.utc).replace(tzinfo=None)
    text = value.isoformat(timespec="milliseconds")
    return text + "Z"


def unix(value: datetime) -> float:
    return (value - _EPOCH).total_seconds()


def from_unix(seconds: float) -> datetime:
    return _EPOCH + timedelta(seconds=float(seconds))

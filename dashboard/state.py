"""The dashboard's view state and its URL form.

Everything a person chose (time range, service, auto-refresh) lives in the
query string, so a link pasted into an incident channel opens the same view.
Parsing is strict: a mangled link gets a one-line error naming the bad
parameter instead of silently showing a different range.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace
from urllib.parse import parse_qs, urlencode

from tailscope.errors import BadRequest

# Preset ranges offered by the picker, in seconds.
RANGES: dict[str, int] = {
    "15m": 15 * 60,
    "1h": 3600,
    "6h": 6 * 3600,
    "24h": 24 * 3600,
    "7d": 7 * 24 * 3600,
}
RANGE_LABELS: dict[str, str] = {
    "15m": "last 15 minutes",
    "1h": "last hour",
    "6h": "last 6 hours",
    "24h": "last 24 hours",
    "7d": "last 7 days",
    "custom": "custom range",
}
DEFAULT_RANGE = "1h"
# Auto-refresh choices, seconds (0 = off).
REFRESH_CHOICES: tuple[int, ...] = (0, 10, 30, 60, 300)


def parse_time(text: str, name: str) -> dt.datetime:
    """RFC 3339 or unix seconds → aware UTC datetime; :class:`BadRequest` names ``name``."""
    raw = text.strip()
    try:
        seconds = float(raw)
    except ValueError:
        pass
    else:
        return dt.datetime.fromtimestamp(seconds, tz=dt.timezone.utc)
    try:
        value = dt.datetime.fromisoformat(raw.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise BadRequest(f"invalid {name}: {text!r} is not an RFC 3339 time or unix seconds") from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.astimezone(dt.timezone.utc)


def format_time(value: dt.datetime) -> str:
    """The URL form of a time: RFC 3339 UTC, seconds precision."""
    return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class ViewState:
    """What the global controls select. ``start``/``end`` set mean a custom range."""

    range: str = DEFAULT_RANGE
    start: dt.datetime | None = None
    end: dt.datetime | None = None
    service: str | None = None
    refresh: int = 0

    def window(self, now: dt.datetime | None = None) -> tuple[dt.datetime, dt.datetime]:
        """The ``[start, end)`` the pages query, as aware UTC datetimes."""
        now = now or dt.datetime.now(dt.timezone.utc)
        if self.start is not None or self.end is not None:
            end = self.end or now
            start = self.start or end - dt.timedelta(seconds=RANGES[DEFAULT_RANGE])
            return start, end
        return now - dt.timedelta(seconds=RANGES[self.range]), now

    def with_window(self, start: dt.datetime, end: dt.datetime) -> "ViewState":
        return replace(self, range="custom", start=start, end=end)

    def search(self, **extra: str | None) -> str:
        """The query string (with leading ``?``, or ``""`` when all defaults)."""
        params: dict[str, str] = {}
        if self.start is not None or self.end is not None:
            if self.start is not None:
                params["start"] = format_time(self.start)
            if self.end is not None:
                params["end"] = format_time(self.end)
        elif self.range != DEFAULT_RANGE:
            params["range"] = self.range
        if self.service:
            params["service"] = self.service
        if self.refresh:
            params["refresh"] = str(self.refresh)
        for key, value in extra.items():
            if value:
                params[key] = value
        return ("?" + urlencode(params)) if params else ""


def parse_search(search: str | None) -> tuple[ViewState, dict[str, str]]:
    """``?range=6h&service=chat-api`` → (state, every parameter as a plain dict)."""
    raw = parse_qs((search or "").lstrip("?"), keep_blank_values=False)
    params = {k: v[-1] for k, v in raw.items() if v}
    rng = params.get("range", DEFAULT_RANGE)
    if rng not in RANGES and rng != "custom":
        raise BadRequest(f"invalid range: {rng!r} (one of {', '.join(RANGES)})")
    start = parse_time(params["start"], "start") if "start" in params else None
    end = parse_time(params["end"], "end") if "end" in params else None
    if start is not None and end is not None and start >= end:
        raise BadRequest(f"invalid time range: start {format_time(start)} is not before end {format_time(end)}")
    if rng == "custom" and start is None and end is None:
        rng = DEFAULT_RANGE
    if start is not None or end is not None:
        rng = "custom"
    try:
        refresh = int(params.get("refresh", "0"))
    except ValueError:
        raise BadRequest(f"invalid refresh: {params['refresh']!r} is not a number of seconds") from None
    if refresh < 0:
        raise BadRequest(f"invalid refresh: {refresh} (must be >= 0 seconds)")
    service = params.get("service") or None
    return ViewState(range=rng, start=start, end=end, service=service, refresh=refresh), params


def pick_step(start: dt.datetime, end: dt.datetime, points: int = 120) -> int:
    """A round bucket width (s) giving about ``points`` buckets over the window."""
    span = max((end - start).total_seconds(), 1.0)
    for step in (1, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400):
        if span / step <= points:
            return step
    return 86400

"""What every page renderer gets: the analyzer, the store, the config and the view.

Passed explicitly (no module-level globals) so tests can build pages against
their own store and analyzer, and two servers in one process do not share
state.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from dashboard.state import ViewState, pick_step


@dataclass
class PageContext:
    analyzer: Any
    store: Any
    config: Any
    state: ViewState = field(default_factory=ViewState)
    params: dict[str, str] = field(default_factory=dict)
    prefix: str = "/dashboard/"
    now: dt.datetime | None = None

    @property
    def window(self) -> tuple[dt.datetime, dt.datetime]:
        return self.state.window(self.now)

    @property
    def step_s(self) -> int:
        start, end = self.window
        return pick_step(start, end)

    def href(self, page: str = "", *, state: ViewState | None = None, **extra: str | None) -> str:
        """A dashboard link that keeps the view state (range, service, refresh)."""
        path = "/".join(quote(part, safe="") for part in page.strip("/").split("/")) if page else ""
        return self.prefix + path + (state or self.state).search(**extra)

    def incident_href(self, incident_id: str) -> str:
        return self.href(f"incident/{incident_id}")

    def request_href(self, trace_id: str, at: Any = None) -> str:
        """A request's page; ``at`` (a time it was live) lets the trace be found without reading every span."""
        when = at.isoformat() if isinstance(at, dt.datetime) else (str(at) if at else None)
        return self.href(f"request/{trace_id}", at=when)

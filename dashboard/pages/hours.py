"""Hour of day: p99 by hour of day × day (heat map), per service and per provider.

Load that follows the clock (an upstream provider busy in its region's
afternoon, a nightly batch job) shows as a vertical stripe; a one-off
incident shows as a single hot cell. Needs days of data, so the page looks
at least 7 days back from the end of the selected range.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from typing import Any

import plotly.graph_objects as go
from dash import html

from dashboard import queries
from dashboard.components import base_figure_layout, graph, section
from dashboard.context import PageContext

MIN_DAYS = 7
MAX_SERIES = 6


def heatmap(rows: list[dict[str, Any]], title: str) -> go.Figure:
    days = sorted({r["day"] for r in rows})
    z = [[None] * 24 for _ in days]
    n = [[0] * 24 for _ in days]
    index = {d: i for i, d in enumerate(days)}
    for r in rows:
        z[index[r["day"]]][int(r["hour"])] = r["p99_ms"]
        n[index[r["day"]]][int(r["hour"])] = r["requests"]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=list(range(24)),
            y=[d.isoformat() for d in days],
            customdata=n,
            colorscale="YlOrRd",
            # One distinct value would get a degenerate colour scale: anchor it at zero.
            zmin=0 if len({r["p99_ms"] for r in rows}) < 2 else None,
            colorbar={"title": {"text": "p99 ms"}},
            hovertemplate="%{y} %{x}:00 UTC<br>p99 %{z:.0f} ms<br>%{customdata} requests<extra></extra>",
            xgap=1,
            ygap=1,
        )
    )
    base_figure_layout(fig, title=title, height=max(220, 26 * len(days) + 110))
    fig.update_xaxes(title_text="hour of day (UTC)", dtick=1)
    fig.update_yaxes(type="category", autorange="reversed")
    return fig


def _grouped(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        out[r["series"] or "?"].append(r)
    return out


def render(ctx: PageContext) -> Any:
    start, end = ctx.window
    start = min(start, end - dt.timedelta(days=MIN_DAYS))
    services = _grouped(queries.p99_by_hour(ctx.store, start, end, ctx.state.service))
    providers = _grouped(queries.provider_p99_by_hour(ctx.store, start, end, ctx.state.service))
    service_graphs = [graph(heatmap(rows, f"{name} — request p99"), id=f"hours-service-{name}") for name, rows in sorted(services.items())[:MAX_SERIES]]
    provider_graphs = []
    for name, rows in sorted(providers.items())[:MAX_SERIES]:
        region = next((r["region"] for r in rows if r.get("region")), None)
        provider_graphs.append(graph(heatmap(rows, f"{name} — provider call p99" + (f" (region {region})" if region else "")), id=f"hours-provider-{name}"))
    return html.Div(
        [
            html.H2("Hour of day"),
            html.Div(f"p99 per UTC hour and day, {start:%Y-%m-%d %H:%M} → {end:%Y-%m-%d %H:%M} UTC (at least {MIN_DAYS} days)", className="ts-muted"),
            section("Per service", *(service_graphs or [html.Div("no requests in this range", className="ts-empty")]), id="hours-services"),
            section("Per provider", *(provider_graphs or [html.Div("no provider calls in this range", className="ts-empty")]), id="hours-providers"),
        ]
    )

"""Overview: per-service p50/p95/p99 and request rate, incidents as bands, top causes.

The page a person lands on from an alert: is p99 bad, since when, and which
cause dominates. Everything comes from the analyzer (already aggregated per
time step), so the page costs one series query per service.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import plotly.graph_objects as go
from dash import dcc, html
from plotly.subplots import make_subplots

from dashboard.components import (
    CAUSE_COLORS,
    base_figure_layout,
    cause_label,
    empty_figure,
    fmt_ms,
    fmt_pct,
    fmt_time,
    graph,
    link,
    recommendation_text,
    section,
    table,
    to_datetime,
)
from dashboard.context import PageContext

MAX_SERVICES = 8


def latency_figure(series: dict[str, Any], incidents: list[dict[str, Any]], service: str, window: tuple[Any, Any] | None = None) -> go.Figure:
    """p50/p95/p99 lines over a request-rate bar, with the service's incidents shaded.

    ``window`` pins the time axis, so every service's chart lines up and a
    sparse service does not get an axis zoomed onto its one request.
    """
    points = series.get("points") or []
    step = float(series.get("step_s") or 60)
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    times = [to_datetime(p["t"]) for p in points]
    rate = [(p.get("count") or 0) / step for p in points]
    fig.add_trace(
        go.Bar(x=times, y=rate, name="requests/s", marker_color="rgba(120,140,170,0.25)", hovertemplate="%{y:.2f} req/s<extra></extra>"),
        secondary_y=True,
    )
    for key, name, color, width in (("p50_ms", "p50", "#2ca02c", 1.5), ("p95_ms", "p95", "#ff7f0e", 1.5), ("p99_ms", "p99", "#d62728", 2.5)):
        fig.add_trace(
            go.Scatter(
                x=times,
                y=[p.get(key) for p in points],
                name=name,
                mode="lines",
                line={"color": color, "width": width},
                connectgaps=False,
                hovertemplate=f"{name} %{{y:.0f}} ms<extra></extra>",
            ),
            secondary_y=False,
        )
    for inc in incidents:
        if inc.get("service") not in (None, service):
            continue
        top = (inc.get("causes") or [{}])[0].get("cause", "unknown")
        fig.add_vrect(
            x0=to_datetime(inc["start"]),
            x1=to_datetime(inc["end"]),
            fillcolor=CAUSE_COLORS.get(top, "#d62728"),
            opacity=0.15,
            line_width=0,
            annotation_text=f"incident: {cause_label(top)}",
            annotation_position="top left",
            annotation_font_size=11,
        )
    base_figure_layout(fig, title=f"{service} — latency and request rate", height=330)
    fig.update_yaxes(title_text="latency (ms)", rangemode="tozero", secondary_y=False)
    fig.update_yaxes(title_text="req/s", rangemode="tozero", showgrid=False, secondary_y=True)
    if window is not None:
        fig.update_xaxes(range=[window[0], window[1]])
    return fig


def top_causes(incidents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Causes of the range: excess milliseconds summed over every incident's attribution."""
    excess: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    recommendation: dict[str, str] = {}
    for inc in incidents:
        for c in inc.get("causes") or []:
            excess[c["cause"]] += float(c.get("excess_ms") or 0.0)
            count[c["cause"]] += 1
            text = recommendation_text(c.get("recommendation"))
            if text and c["cause"] not in recommendation:
                recommendation[c["cause"]] = text
    total = sum(excess.values()) or 1.0
    out = [
        {"cause": k, "excess_ms": v, "share": v / total, "incidents": count[k], "recommendation": recommendation.get(k)}
        for k, v in excess.items()
    ]
    return sorted(out, key=lambda r: -r["excess_ms"])


def causes_figure(causes: list[dict[str, Any]]) -> go.Figure:
    if not causes:
        return empty_figure("no incidents in this range")
    causes = list(reversed(causes))
    fig = go.Figure(
        go.Bar(
            x=[c["share"] for c in causes],
            y=[cause_label(c["cause"]) for c in causes],
            orientation="h",
            marker_color=[CAUSE_COLORS.get(c["cause"], "#888") for c in causes],
            text=[f"{c['share'] * 100:.0f} %  ({fmt_ms(c['excess_ms'])} excess)" for c in causes],
            textposition="auto",
            hovertemplate="%{y}: %{x:.0%} of excess<extra></extra>",
        )
    )
    base_figure_layout(fig, height=max(160, 48 * len(causes) + 60))
    fig.update_xaxes(tickformat=".0%", range=[0, 1])
    return fig


def render(ctx: PageContext) -> Any:
    start, end = ctx.window
    services = [ctx.state.service] if ctx.state.service else list(ctx.analyzer.services())[:MAX_SERVICES]
    incidents = ctx.analyzer.incidents(service=ctx.state.service, start=start, end=end).get("incidents", [])
    graphs = []
    for service in services:
        series = ctx.analyzer.latency(service=service, start=start, end=end, step_s=ctx.step_s)
        if not series.get("points"):
            graphs.append(graph(empty_figure(f"{service}: no requests in this range")))
            continue
        # Pattern-matching id: dragging over any service's chart zooms the whole view.
        graphs.append(graph(latency_figure(series, incidents, service, (start, end)), id={"type": "latency", "service": service}))
    if not services:
        graphs.append(html.Div("No services have sent request spans yet.", className="ts-empty"))

    causes = top_causes(incidents)
    incident_rows = []
    for inc in sorted(incidents, key=lambda i: str(i.get("start")), reverse=True):
        top = (inc.get("causes") or [{}])[0]
        incident_rows.append(
            [
                link(fmt_time(inc.get("start")), ctx.incident_href(str(inc["id"])), className="ts-link incident-link"),
                inc.get("service") or "–",
                fmt_time(inc.get("end")) if not inc.get("open") else html.Span("open", className="ts-badge"),
                f"{fmt_ms(inc.get('p99_ms'))} (baseline {fmt_ms(inc.get('baseline_p99_ms'))})",
                f"{inc.get('slow_requests', '–')} / {inc.get('requests', '–')}",
                html.Span(
                    f"{cause_label(top.get('cause', 'unknown'))} {fmt_pct(top.get('share'))}",
                    className=f"ts-cause cause-{top.get('cause', 'unknown')}",
                ),
            ]
        )
    return html.Div(
        [
            html.H2("Overview"),
            html.Div(graphs, id="overview-latency"),
            html.Div(
                [
                    section(
                        "Top causes in this range",
                        graph(causes_figure(causes), id="overview-causes"),
                        html.Ul(
                            [
                                html.Li([html.B(cause_label(c["cause"]) + ": "), c["recommendation"]])
                                for c in causes
                                if c.get("recommendation")
                            ],
                            className="ts-recs",
                        ),
                        id="top-causes",
                    ),
                    section(
                        f"Incidents ({len(incidents)})",
                        table(["start", "service", "end", "p99", "slow / requests", "top cause"], incident_rows, empty="no incidents in this range"),
                        id="incidents",
                    ),
                ],
                className="ts-grid2",
            ),
            section(
                "Slowest requests (most excess first)",
                # Filled by its own callback once the page is shown: finding the
                # slowest requests over a long range is the costliest query here.
                dcc.Loading(html.Div(html.Div("finding the slowest requests…", className="ts-muted"), id="overview-slow"), type="dot"),
                id="slow-requests",
            ),
        ]
    )


def slow_requests_table(ctx: PageContext, limit: int = 10) -> Any:
    """The range's slowest requests (most excess first), with links to their pages."""
    start, end = ctx.window
    slow = ctx.analyzer.slow_requests(service=ctx.state.service, start=start, end=end, limit=limit).get("requests", [])
    rows = [
        [
            link(r["trace_id"][:16] + "…", ctx.request_href(r["trace_id"], at=r.get("start")), className="ts-link request-link"),
            r.get("service") or "–",
            fmt_time(r.get("start")),
            fmt_ms(r.get("latency_ms")),
            fmt_ms(r.get("excess_ms")),
            ", ".join(f"{cause_label(c['cause'])} {fmt_pct(c.get('share'))}" for c in (r.get("causes") or [])[:3]) or "–",
        ]
        for r in slow
    ]
    return table(["trace", "service", "start", "latency", "excess", "causes"], rows, empty="no slow requests in this range")

"""Incident: causes by share of excess, their evidence and recommendation,
the slow requests, and the contrast table (slow vs baseline by dimension).

This is the page linked from alerts and pasted into incident channels, so it
opens on the incident's own time span whatever range the link carried.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import plotly.graph_objects as go
from dash import html

from dashboard.components import (
    CAUSE_COLORS,
    base_figure_layout,
    cause_label,
    evidence_view,
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
from dashboard.pages.overview import latency_figure


SHOWN_SLOW = 25


def causes_figure(causes: list[dict[str, Any]]) -> go.Figure:
    rows = list(reversed(causes))
    fig = go.Figure(
        go.Bar(
            x=[c.get("share") or 0 for c in rows],
            y=[cause_label(c["cause"]) for c in rows],
            orientation="h",
            marker_color=[CAUSE_COLORS.get(c["cause"], "#888") for c in rows],
            text=[f"{(c.get('share') or 0) * 100:.0f} % · {fmt_ms(c.get('excess_ms'))}" for c in rows],
            textposition="auto",
            hovertemplate="%{y}: %{x:.0%} of the excess latency<extra></extra>",
        )
    )
    base_figure_layout(fig, title="Share of the excess latency, by cause", height=max(170, 46 * len(rows) + 80))
    fig.update_xaxes(tickformat=".0%", range=[0, 1])
    return fig


def _contrast_table(rows: list[dict[str, Any]]) -> Any:
    """Dimension values over-represented among the slow requests, most lift first."""
    body = [
        [
            str(r.get("dimension", "–")).replace("_", " "),
            html.Code(str(r.get("value", "–"))),
            f"{r.get('slow', '–')} ({fmt_pct(r.get('slow_share'))})",
            f"{r.get('baseline', '–')} ({fmt_pct(r.get('baseline_share'))})",
            f"{r['lift']:.1f}×" if isinstance(r.get("lift"), (int, float)) else "–",
            f"{r['p_value']:.1e}" if isinstance(r.get("p_value"), (int, float)) else "–",
        ]
        for r in rows
    ]
    return table(["dimension", "value", "slow requests", "baseline requests", "lift", "p value"], body, empty="no dimension stands out among the slow requests")


def _bucket_table(rec: Any) -> Any:
    """For a compile miss: the bucket sets the analyzer weighed (bounds, padding cost)."""
    options = rec.get("bucket_options") if isinstance(rec, dict) else None
    if not options:
        return None
    rows = [
        [str(o.get("compiles", len(o.get("buckets") or []))), ", ".join(map(str, o.get("buckets") or [])), fmt_pct(o.get("padding_overhead"))]
        for o in options
    ]
    return table(["compiled shapes", "bucket bounds", "extra padded tokens"], rows, class_name="ts-table ts-small")


def render(ctx: PageContext, incident_id: str) -> Any:
    inc = ctx.analyzer.incident(incident_id)
    causes = sorted(inc.get("causes") or [], key=lambda c: -(c.get("share") or 0))
    service = inc.get("service")
    start, end = to_datetime(inc.get("start")), to_datetime(inc.get("end"))

    # Context: the service's latency from a little before to a little after.
    context_graph: Any = None
    around = _around(start, end)
    if around is not None and service:
        series = ctx.analyzer.latency(service=service, start=around[0], end=around[1], step_s=None)
        if series.get("points"):
            context_graph = graph(latency_figure(series, [inc], service, around), id="incident-latency")

    cause_blocks = []
    for c in causes:
        cause = c.get("cause", "unknown")
        cause_blocks.append(
            html.Div(
                [
                    html.H4(
                        [
                            html.Span(cause_label(cause), className=f"ts-cause cause-{cause}"),
                            html.Span(f" {fmt_pct(c.get('share'))} of excess · {fmt_ms(c.get('excess_ms'))}", className="ts-muted"),
                        ]
                    ),
                    html.Div([html.B("Recommendation: "), recommendation_text(c["recommendation"])], className="ts-rec") if recommendation_text(c.get("recommendation")) else None,
                    _bucket_table(c.get("recommendation")),
                    html.Div([html.B("Evidence"), evidence_view(c.get("evidence"), lambda t: ctx.request_href(t, at=inc.get("start")))], className="ts-evidence-block"),
                ],
                className="ts-cause-block",
                id=f"cause-{cause}",
            )
        )

    slow = inc.get("requests_detail") or []
    slow_rows = [
        [
            link(r["trace_id"][:16] + "…", ctx.request_href(r["trace_id"], at=r.get("start")), className="ts-link request-link"),
            fmt_time(r.get("start")),
            fmt_ms(r.get("latency_ms")),
            fmt_ms(r.get("excess_ms")),
            ", ".join(f"{cause_label(x['cause'])} {fmt_pct(x.get('share'))}" for x in (r.get("causes") or [])[:3]) or "–",
        ]
        for r in slow[:SHOWN_SLOW]
        if r.get("trace_id")
    ]
    contrast = inc.get("contrast") or []

    summary = html.Div(
        [
            _kv("service", service or "–"),
            _kv("from", fmt_time(inc.get("start"))),
            _kv("to", "open" if inc.get("open") else fmt_time(inc.get("end"))),
            _kv("p99", fmt_ms(inc.get("p99_ms"))),
            _kv("baseline p99", fmt_ms(inc.get("baseline_p99_ms"))),
            _kv("slow / requests", f"{inc.get('slow_requests', len(slow))} / {inc.get('requests', '–')}"),
            _kv("excess", fmt_ms(inc.get("excess_ms"))),
        ],
        className="ts-summary",
    )
    overview_link = link(
        "← overview of this time span",
        ctx.href("", state=ctx.state.with_window(*around)) if around else ctx.href(""),
    )
    return html.Div(
        [
            html.H2([f"Incident {incident_id}"], id="incident-title"),
            overview_link,
            summary,
            context_graph,
            section("Causes", graph(causes_figure(causes), id="incident-causes") if causes else html.Div("no cause attributed", className="ts-empty"), *cause_blocks, id="causes"),
            section(
                f"Slow requests ({len(slow)})",
                table(["trace", "start", "latency", "excess", "causes"], slow_rows, empty="no slow requests recorded"),
                html.Div(f"the {SHOWN_SLOW} with the most excess are shown ({len(slow) - SHOWN_SLOW} more)", className="ts-muted") if len(slow) > SHOWN_SLOW else None,
                id="incident-slow",
            ),
            section(
                "Contrast: what the slow requests have in common (vs the service's other requests)",
                _contrast_table(contrast),
                id="contrast",
            ),
        ]
    )


def _around(start: dt.datetime | None, end: dt.datetime | None) -> tuple[dt.datetime, dt.datetime] | None:
    """The incident with context: twice its length before, once after, at least 2 minutes each side."""
    if start is None or end is None:
        return None
    span = max(end - start, dt.timedelta(minutes=1))
    pad = dt.timedelta(minutes=2)
    return start - 2 * span - pad, end + span + pad


def _kv(key: str, value: Any) -> html.Div:
    return html.Div([html.Span(key, className="ts-k"), html.Span(value, className="ts-v")], className="ts-kv")

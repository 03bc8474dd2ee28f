"""Batching: batch size and padding waste over time, and head-of-line cases.

Batching trades latency for throughput; this page shows what it cost: tokens
computed only as padding, time spent waiting for a batch to fill, and short
requests that finished late because they shared a batch with a long one.
"""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go
from dash import html
from plotly.subplots import make_subplots

from dashboard import queries
from dashboard.components import base_figure_layout, empty_figure, fmt_ms, fmt_pct, fmt_time, graph, link, section, table, to_datetime
from dashboard.context import PageContext


def batch_figure(series: list[dict[str, Any]]) -> go.Figure:
    if not series:
        return empty_figure("no batch spans in this range", 260)
    t = [to_datetime(r["t"]) for r in series]
    fig = make_subplots(rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.07, subplot_titles=("batch size (mean, max)", "padding waste", "wait to fill (ms)"))
    fig.add_trace(go.Scatter(x=t, y=[r["mean_size"] for r in series], name="mean size", line={"color": "#1f77b4"}), row=1, col=1)
    fig.add_trace(go.Scatter(x=t, y=[r["max_size"] for r in series], name="max size", line={"color": "#1f77b4", "dash": "dot"}), row=1, col=1)
    fig.add_trace(go.Scatter(x=t, y=[r["padding_waste"] for r in series], name="padding waste", line={"color": "#ff7f0e"}, fill="tozeroy"), row=2, col=1)
    fig.add_trace(go.Scatter(x=t, y=[r["mean_wait_ms"] for r in series], name="mean wait", line={"color": "#8c564b"}), row=3, col=1)
    base_figure_layout(fig, height=520)
    fig.update_yaxes(tickformat=".0%", rangemode="tozero", row=2, col=1)
    fig.update_yaxes(rangemode="tozero")
    fig.update_layout(showlegend=False)
    for ann in fig.layout.annotations:
        ann.font.size = 11
        ann.x = 0.0
        ann.xanchor = "left"
    return fig


def render(ctx: PageContext) -> Any:
    start, end = ctx.window
    series = queries.batch_series(ctx.store, start, end, ctx.step_s, ctx.state.service)
    hol = queries.head_of_line(ctx.store, start, end, ctx.state.service)
    total = sum(r["batches"] for r in series)
    hol_rows = [
        [
            fmt_time(h["start_time"]),
            h.get("service_instance_id") or "–",
            str(h["batch_size"]),
            f"{h['batch_min_len']} → {h['batch_max_len']}",
            fmt_pct(h.get("padding_waste")),
            fmt_ms(h.get("duration_ms")),
            link(f"shortest ({h['shortest_len']} tok, {fmt_ms(h.get('shortest_latency_ms'))})", ctx.request_href(h["shortest_trace"], at=h.get("start_time")), className="ts-link request-link")
            if h.get("shortest_trace")
            else "–",
            link(f"longest ({h['longest_len']} tok)", ctx.request_href(h["longest_trace"], at=h.get("start_time")), className="ts-link request-link") if h.get("longest_trace") else "–",
        ]
        for h in hol
    ]
    return html.Div(
        [
            html.H2("Batching"),
            html.Div([html.Span(f"{total} batches in range", className="ts-pill"), html.Span(f"{len(hol)} head-of-line cases shown", className="ts-pill")]),
            section("Batch size, padding waste and fill wait", graph(batch_figure(series), id="batch-series"), id="batching"),
            section(
                "Head-of-line cases (longest member ≥ 4 × shortest)",
                table(["start", "replica", "size", "batch min → max len", "padding", "batch time", "waited (member input)", "waited on"], hol_rows, empty="no head-of-line cases in this range"),
                id="head-of-line",
            ),
        ]
    )

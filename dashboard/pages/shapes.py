"""Shapes and compiles: the padded-shape and input-length distributions with
the recommended buckets drawn over them, and compile events over time with
their reasons.

A recompile storm is a shape problem: every new padded length the kernels
see can cost a compile. Seeing the lengths next to the suggested bucket
edges shows how much padding the fix costs and how many shapes it leaves.
"""

from __future__ import annotations

import math
from typing import Any

import plotly.graph_objects as go
from dash import html

from dashboard import queries
from dashboard.components import base_figure_layout, empty_figure, fmt_ms, fmt_pct, fmt_time, graph, link, section, table, to_datetime
from dashboard.context import PageContext

KIND_COLORS = {"recompile": "#d62728", "first": "#1f77b4"}


BUCKET_CHOICES = (4, 8, 16)
SHOWN_K = 8


def bucket_options(ctx: PageContext, start: Any, end: Any) -> tuple[list[dict[str, Any]], float | None]:
    """The analyzer's padding-bucket optimiser over the range's input lengths.

    Returns one option per bucket count (bounds, padding overhead vs the real
    tokens) and the padding overhead the service runs with now.
    """
    from analyzer.buckets import optimal_buckets

    data = queries.length_counts(ctx.store, start, end, ctx.state.service)
    lengths, counts = data["lengths"], data["counts"]
    real = sum(n * c for n, c in zip(lengths, counts))
    options = []
    for k in BUCKET_CHOICES:
        if not lengths:
            break
        bounds, padded = optimal_buckets(lengths, counts, k)
        options.append({"k": k, "buckets": bounds, "overhead": (padded / real - 1.0) if real else None})
        if len(bounds) < k:
            break
    current = (float(data["padded"]) / float(data["real"]) - 1.0) if data.get("real") and data.get("padded") else None
    return options, current


def distribution_figure(hist: list[dict[str, Any]], buckets: list[int]) -> go.Figure:
    """Step histograms on a log length axis: real input lengths vs the padded shapes run."""
    per = queries.BINS_PER_OCTAVE
    fig = go.Figure()
    styles = {
        "input": ("input length (tokens)", "rgba(31,119,180,0.9)", "rgba(31,119,180,0.25)"),
        "shape": ("padded shape the kernels ran", "rgba(255,127,14,0.95)", "rgba(255,127,14,0.20)"),
    }
    for what, (name, line, fill) in styles.items():
        rows = [r for r in hist if r["what"] == what]
        if not rows:
            continue
        xs: list[float] = []
        ys: list[int] = []
        for r in rows:
            lo, hi = 2 ** (r["k"] / per), 2 ** ((r["k"] + 1) / per)
            xs += [lo, hi]
            ys += [r["requests"], r["requests"]]
        fig.add_trace(
            go.Scatter(x=xs, y=ys, name=name, mode="lines", line={"color": line, "width": 1.5, "shape": "hv"}, fill="tozeroy", fillcolor=fill, hovertemplate="%{x:.0f} tokens: %{y} requests<extra></extra>")
        )
    if buckets:
        # Lines as one trace (data coordinates); labels as annotations, whose x
        # on a log axis is given in log10 units.
        top = max((r["requests"] for r in hist), default=1) * 1.05
        xs: list[float | None] = []
        ys: list[float | None] = []
        for b in buckets:
            xs += [b, b, None]
            ys += [0, top, None]
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name="recommended bucket bounds", line={"color": "#2ca02c", "dash": "dash", "width": 1.5}, hoverinfo="skip"))
        for b in buckets:
            fig.add_annotation(x=math.log10(b), y=top, text=str(b), showarrow=False, yanchor="bottom", font={"color": "#2ca02c", "size": 10})
    base_figure_layout(fig, title="Sequence lengths, quarter-octave bins (recommended bucket bounds dashed green)", height=340)
    fig.update_xaxes(title_text="tokens (log scale)", type="log")
    fig.update_yaxes(title_text="requests", rangemode="tozero")
    return fig


def compiles_figure(events: list[dict[str, Any]]) -> go.Figure:
    if not events:
        return empty_figure("no compile events in this range", 260)
    fig = go.Figure()
    for kind in sorted({e.get("compile_kind") or "?" for e in events}):
        sel = [e for e in events if (e.get("compile_kind") or "?") == kind]
        fig.add_trace(
            go.Scatter(
                x=[to_datetime(e["start_time"]) for e in sel],
                y=[e["duration_ms"] for e in sel],
                mode="markers",
                name=kind,
                marker={"size": 9, "color": KIND_COLORS.get(kind, "#7f7f7f"), "line": {"width": 0.5, "color": "#333"}},
                customdata=[[e.get("service_instance_id") or "", e.get("compile_shape") or "", (e.get("compile_reason") or "")[:160]] for e in sel],
                hovertemplate="%{y:.0f} ms on %{customdata[0]}<br>shape %{customdata[1]}<br>%{customdata[2]}<extra>" + kind + "</extra>",
            )
        )
    base_figure_layout(fig, title="Compile events (duration of the stall)", height=300)
    fig.update_yaxes(title_text="ms", rangemode="tozero")
    return fig


def render(ctx: PageContext) -> Any:
    start, end = ctx.window
    service = ctx.state.service
    shapes = queries.shape_distribution(ctx.store, start, end, service)
    hist = queries.length_histograms(ctx.store, start, end, service)
    options, current_overhead = bucket_options(ctx, start, end)
    shown = next((o for o in options if o["k"] == SHOWN_K), options[-1] if options else None)
    buckets = shown["buckets"] if shown else []
    events = queries.compile_events(ctx.store, start, end, service)
    distinct_shapes = len(shapes)
    reasons = queries.compile_reasons(ctx.store, start, end, service)

    if hist:
        dist: Any = graph(distribution_figure(hist, buckets), id="shape-distribution")
    else:
        dist = graph(empty_figure("no request lengths in this range"), id="shape-distribution")
    reason_rows = [
        [r["kind"], html.Code(r["reason"][:300]), str(r["compiles"]), str(r["shapes"]), fmt_ms(r["total_ms"]), fmt_ms(r["max_ms"])]
        for r in reasons
    ]
    longest = queries.longest_compiles(ctx.store, start, end, service)
    recent = [
        [
            fmt_time(e["start_time"]),
            e.get("service_instance_id") or "–",
            e.get("compile_kind") or "–",
            e.get("compile_shape") or "–",
            fmt_ms(e["duration_ms"]),
            str(e["requests_overlapped"]),
            link(f"{e['worst_trace'][:12]}… ({fmt_ms(e['worst_ms'])})", ctx.request_href(e["worst_trace"], at=e.get("start_time")), className="ts-link request-link") if e.get("worst_trace") else "–",
        ]
        for e in longest
    ]
    return html.Div(
        [
            html.H2("Shapes and compiles"),
            html.Div(
                [
                    html.Span(f"{distinct_shapes} distinct padded shapes", className="ts-pill"),
                    html.Span(f"{len(events)} compile events", className="ts-pill"),
                    html.Span(f"{sum(1 for e in events if e.get('compile_kind') == 'recompile')} recompiles", className="ts-pill"),
                ]
            ),
            section(
                "Lengths and recommended buckets",
                dist,
                html.Div(
                    [
                        html.B("Recommended buckets: "),
                        ", ".join(map(str, buckets)),
                        f" — {len(buckets)} compiled shapes instead of {distinct_shapes}, "
                        f"{fmt_pct(shown['overhead'])} extra padded tokens"
                        # Shapes shorter than the prompts (prefix-cached tokens not run) make
                        # "padding now" meaningless; it is shown only when it is a cost.
                        + (f" (padding now costs {fmt_pct(current_overhead)})" if current_overhead is not None and current_overhead >= 0 else ""),
                    ],
                    className="ts-rec",
                    id="bucket-rec",
                )
                if shown
                else html.Div("no input lengths in this range to recommend buckets from", className="ts-muted", id="bucket-rec"),
                table(
                    ["buckets", "bounds", "extra padded tokens"],
                    [[str(len(o["buckets"])), ", ".join(map(str, o["buckets"])), fmt_pct(o["overhead"])] for o in options],
                    empty="",
                    class_name="ts-table ts-small",
                ),
                id="shapes",
            ),
            section("Compile events over time", graph(compiles_figure(events), id="compile-events"), id="compiles"),
            section(
                "Compile reasons (guard failures)",
                table(["kind", "reason", "compiles", "shapes", "total stall", "longest"], reason_rows, empty="no compile events in this range"),
                id="compile-reasons",
            ),
            section("Longest compile stalls", table(["start", "replica", "kind", "shape", "stall", "requests stalled", "slowest of them"], recent, empty="none"), id="compile-longest"),
        ]
    )

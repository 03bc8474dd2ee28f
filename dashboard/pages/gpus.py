"""GPUs: per host and GPU — utilisation, memory, SM clock against max, power,
temperature, clocks-event reasons decoded, per-process memory.

Answers "was the GPU the problem": a clock well under its max with a power
or thermal reason set explains a throttle; a second process's memory
explains contention. Series are bucketed in SQL (mean per bucket).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import plotly.graph_objects as go
from dash import html
from plotly.subplots import make_subplots

from dashboard import queries
from dashboard.components import base_figure_layout, fmt_time, graph, section, table, to_datetime
from dashboard.context import PageContext

MAX_GPUS = 16
GIB = 1024**3


def gpu_figure(host: str, index: Any, name: str | None, series: dict[str, list[dict[str, Any]]]) -> go.Figure:
    """Five stacked panels sharing the time axis; limits drawn dashed."""
    fig = make_subplots(
        rows=5,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.045,
        subplot_titles=("utilisation", "memory (GiB)", "SM clock (MHz)", "power (W)", "temperature (°C)"),
    )

    def line(metric: str, row: int, label: str, color: str, scale: float = 1.0, dash: str | None = None) -> None:
        pts = series.get(metric) or []
        if not pts:
            return
        fig.add_trace(
            go.Scatter(
                x=[to_datetime(p["t"]) for p in pts],
                y=[(p["mean"] or 0) * scale for p in pts],
                name=label,
                mode="lines",
                line={"color": color, "width": 1.6, "dash": dash},
                legendgroup=label,
            ),
            row=row,
            col=1,
        )

    line("tailscope.gpu.utilization", 1, "utilisation", "#1f77b4")
    line("tailscope.gpu.memory.used", 2, "memory used", "#9467bd", 1 / GIB)
    line("tailscope.gpu.memory.total", 2, "memory total", "#9467bd", 1 / GIB, "dot")
    line("tailscope.gpu.sm_clock", 3, "SM clock", "#2ca02c")
    line("tailscope.gpu.sm_clock.max", 3, "SM clock max", "#2ca02c", 1.0, "dot")
    line("tailscope.gpu.power", 4, "power", "#ff7f0e")
    line("tailscope.gpu.power.limit", 4, "power limit", "#ff7f0e", 1.0, "dot")
    line("tailscope.gpu.temperature", 5, "temperature", "#d62728")
    base_figure_layout(fig, title=f"{host} · GPU {index}" + (f" · {name}" if name else ""), height=620)
    fig.update_yaxes(tickformat=".0%", range=[0, 1.05], row=1, col=1)
    for row in (2, 3, 4):  # from zero, so a clock dip or a power cap reads at its true size
        fig.update_yaxes(rangemode="tozero", row=row, col=1)
    fig.update_layout(showlegend=False)
    for ann in fig.layout.annotations:
        ann.font.size = 11
        ann.x = 0.0
        ann.xanchor = "left"
    return fig


def render(ctx: PageContext) -> Any:
    start, end = ctx.window
    host = ctx.params.get("host") or None
    rows = queries.gpu_series(ctx.store, start, end, ctx.step_s, host)
    by_gpu: dict[tuple[str, Any], dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    names: dict[tuple[str, Any], str | None] = {}
    for r in rows:
        key = (r["host_name"] or "?", r["gpu_index"])
        by_gpu[key][r["name"]].append(r)
        names[key] = names.get(key) or r.get("gpu_name")

    reasons = queries.gpu_clock_reasons(ctx.store, start, end)
    reason_rows = []
    for r in reasons:
        decoded = queries.decode_clock_reasons(int(r["mask"]))
        bad = any(int(r["mask"]) & bit for bit, _, harmful in queries.CLOCK_REASONS if harmful)
        reason_rows.append(
            [
                r["host_name"] or "?",
                str(r["gpu_index"]),
                f"0x{int(r['mask']):x}",
                html.Span(", ".join(decoded), className="ts-warn" if bad else ""),
                str(r["samples"]),
                fmt_time(r["first_seen"]),
                fmt_time(r["last_seen"]),
            ]
        )
    procs = queries.gpu_processes(ctx.store, start, end)
    proc_rows = [
        [p["host_name"] or "?", str(p["gpu_index"]), str(p["pid"]), f"{(p['latest_bytes'] or 0) / GIB:.2f} GiB", f"{(p['peak_bytes'] or 0) / GIB:.2f} GiB", fmt_time(p["last_seen"])]
        for p in procs
    ]
    xids = queries.gpu_xids(ctx.store, start, end)
    xid_rows = [[fmt_time(x["time"]), x["host_name"] or "?", str(x["gpu_index"]), str(x["xid"])] for x in xids]

    keys = sorted(by_gpu, key=lambda k: (k[0], k[1] if k[1] is not None else -1))
    figures = [graph(gpu_figure(h, i, names.get((h, i)), by_gpu[(h, i)]), id=f"gpu-{h}-{i}") for h, i in keys[:MAX_GPUS]]
    note = html.Div(f"showing {MAX_GPUS} of {len(keys)} GPUs; add ?host=NAME to the URL to pick a host", className="ts-muted") if len(keys) > MAX_GPUS else None
    return html.Div(
        [
            html.H2("GPUs"),
            section(
                "Clocks-event (throttle) reasons",
                table(["host", "GPU", "mask", "reasons", "samples", "first", "last"], reason_rows, empty="no clock-event reasons set in this range"),
                id="gpu-reasons",
            ),
            section("XID errors", table(["time", "host", "GPU", "XID"], xid_rows, empty="no XID errors in this range"), id="gpu-xids"),
            section(
                "Per-process GPU memory",
                table(["host", "GPU", "pid", "latest", "peak", "last seen"], proc_rows, empty="no per-process samples in this range"),
                id="gpu-processes",
            ),
            section(
                "Per GPU",
                note,
                html.Div(figures or [html.Div("no GPU metrics in this range (is the node agent running?)", className="ts-empty")], className="ts-grid2"),
                id="gpu-series",
            ),
        ]
    )

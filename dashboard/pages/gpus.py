"""GPUs: per host and GPU — utilisation, memory, SM clock against max, power,
temperature, clocks-event reasons decoded, per-process memory.

Answers "was the GPU the problem": a clock well under its max with a power
or thermal reason set explains a throttle; a second process's memory
explains contention. Series are bucketed in SQL (mean per bucket).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from dash import html

from dashboard import queries
from dashboard.components import GRID, figure_style, fmt_time, graph, section, table, to_datetime
from dashboard.context import PageContext

MAX_GPUS = 16
GIB = 1024**3


PANELS = ("utilisation", "memory (GiB)", "SM clock (MHz)", "power (W)", "temperature (°C)")


def gpu_figure(host: str, index: Any, name: str | None, series: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Five stacked panels sharing the time axis; limits drawn dotted.

    Built as a plain figure dict: a page with many GPUs would otherwise spend
    most of its time in plotly's per-property validation, not in the query.
    """
    rows = len(PANELS)
    gap = 0.045
    height = (1.0 - gap * (rows - 1)) / rows
    layout: dict[str, Any] = {
        **figure_style(f"{host} · GPU {index}" + (f" · {name}" if name else ""), 620),
        "showlegend": False,
        "annotations": [],
        "xaxis": {"anchor": f"y{rows}", "type": "date", "gridcolor": GRID, "showline": False},
    }
    for i, title in enumerate(PANELS):
        axis = "yaxis" if i == 0 else f"yaxis{i + 1}"
        top = 1.0 - i * (height + gap)
        layout[axis] = {"domain": [round(max(0.0, top - height), 4), round(min(1.0, top), 4)], "anchor": "x", "gridcolor": GRID, "zeroline": False, "rangemode": "tozero" if 0 < i < 4 else "normal"}
        layout["annotations"].append({"text": title, "xref": "paper", "yref": "paper", "x": 0, "y": top, "xanchor": "left", "yanchor": "bottom", "showarrow": False, "font": {"size": 11}})
    layout["yaxis"].update({"tickformat": ".0%", "range": [0, 1.05]})
    data: list[dict[str, Any]] = []

    def line(metric: str, row: int, label: str, color: str, scale: float = 1.0, dash: str = "solid") -> None:
        pts = series.get(metric) or []
        if not pts:
            return
        data.append(
            {
                "type": "scatter",
                "mode": "lines",
                "name": label,
                "x": [to_datetime(p["t"]) for p in pts],
                "y": [(p["mean"] or 0) * scale for p in pts],
                "line": {"color": color, "width": 1.6, "dash": dash},
                "xaxis": "x",
                "yaxis": "y" if row == 1 else f"y{row}",
            }
        )

    line("tailscope.gpu.utilization", 1, "utilisation", "#1f77b4")
    line("tailscope.gpu.memory.used", 2, "memory used", "#9467bd", 1 / GIB)
    line("tailscope.gpu.memory.total", 2, "memory total", "#9467bd", 1 / GIB, "dot")
    line("tailscope.gpu.sm_clock", 3, "SM clock", "#2ca02c")
    line("tailscope.gpu.sm_clock.max", 3, "SM clock max", "#2ca02c", 1.0, "dot")
    line("tailscope.gpu.power", 4, "power", "#ff7f0e")
    line("tailscope.gpu.power.limit", 4, "power limit", "#ff7f0e", 1.0, "dot")
    line("tailscope.gpu.temperature", 5, "temperature", "#d62728")
    return {"data": data, "layout": layout}


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

"""Request: a waterfall of one request's stage spans with everything that
overlapped it — compile spans with their reasons, KV evictions, its batch and
the batch's longest member, its GPU's clock and utilisation — so a person sees
why it was slow without reading SQL.

The data is the analyzer's ``trace(trace_id)``; this module only lays it out.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import plotly.graph_objects as go
from dash import html
from plotly.subplots import make_subplots

from dashboard import queries
from dashboard.components import (
    CAUSE_COLORS,
    base_figure_layout,
    cause_label,
    empty_figure,
    evidence_view,
    fmt_ms,
    fmt_pct,
    fmt_time,
    graph,
    link,
    section,
    table,
    to_datetime,
)
from dashboard.context import PageContext

GPU_CONTEXT_S = 60

ROLE_COLORS = {
    "request": "#4c78a8",
    "queue": "#bab0ac",
    "prefill": "#72b7b2",
    "decode": "#54a24b",
    "provider_call": "#17becf",
    "compile": "#d62728",
    "model_load": "#1f77b4",
    "batch": "#ff7f0e",
}


def _first(d: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for k in keys:
        if k in d and d[k] is not None:
            return d[k]
    return default


def _span_times(s: dict[str, Any]) -> tuple[dt.datetime | None, dt.datetime | None]:
    start = to_datetime(_first(s, "start", "start_time"))
    end = to_datetime(_first(s, "end", "end_time"))
    if end is None and start is not None and s.get("duration_ms") is not None:
        end = start + dt.timedelta(milliseconds=float(s["duration_ms"]))
    return start, end


def _label(s: dict[str, Any]) -> str:
    role = s.get("role") or ""
    name = s.get("name") or role or "span"
    if role == "compile":
        who = s.get("service_instance_id") or s.get("instance") or ""
        return f"compile {s.get('compile_kind') or ''} {s.get('compile_shape') or ''} {('· ' + who) if who else ''}".strip()
    return name if not role or role == name else f"{name} ({role})"


def waterfall(rows: list[dict[str, Any]], evictions: list[dict[str, Any]], origin: dt.datetime) -> go.Figure:
    """Horizontal bars from the request's start (ms); evictions as dashed lines."""
    fig = go.Figure()
    labels: list[str] = []
    for i, s in enumerate(rows):
        start, end = _span_times(s)
        if start is None or end is None:
            continue
        x0 = (start - origin).total_seconds() * 1000
        width = max((end - start).total_seconds() * 1000, 0.5)
        label = f"{i + 1:>2}. {_label(s)}"
        labels.append(label)
        role = s.get("role") or "other"
        hover = f"{_label(s)}<br>{fmt_ms(width)} from +{x0:.0f} ms"
        if s.get("compile_reason"):
            hover += "<br>" + str(s["compile_reason"])[:200]
        fig.add_trace(
            go.Bar(
                y=[label],
                x=[width],
                base=[x0],
                orientation="h",
                marker_color=ROLE_COLORS.get(role, "#9d9d9d"),
                marker_line_width=0,
                name=role,
                text=[fmt_ms(width)],
                textposition="inside" if width > 0 else "none",
                insidetextanchor="start",
                hovertemplate=hover + "<extra></extra>",
                showlegend=False,
            )
        )
    for ev in evictions:
        t = to_datetime(_first(ev, "time", "t"))
        if t is None:
            continue
        x = (t - origin).total_seconds() * 1000
        fig.add_vline(x=x, line_dash="dash", line_color=CAUSE_COLORS["kv_eviction"], annotation_text="KV eviction", annotation_font_size=10)
    base_figure_layout(fig, title="Waterfall (ms from the request's start)", height=max(220, 34 * len(labels) + 90))
    fig.update_yaxes(autorange="reversed", categoryorder="array", categoryarray=labels, tickfont={"family": "ui-monospace, Menlo, monospace", "size": 11})
    fig.update_xaxes(title_text="ms", zeroline=True)
    fig.update_layout(barmode="overlay", margin={"l": 300})
    return fig


def gpu_figure(samples: list[dict[str, Any]], origin: dt.datetime, end: dt.datetime) -> go.Figure:
    """The request's GPU during the request: SM clock vs max, and utilisation."""
    by_name: dict[str, list[tuple[float, float]]] = {}
    for s in samples:
        t = to_datetime(_first(s, "time", "t"))
        if t is None or s.get("value") is None:
            continue
        by_name.setdefault(str(s.get("name", "")), []).append(((t - origin).total_seconds(), float(s["value"])))
    if not by_name:
        return empty_figure("no GPU samples for this request's GPU", 180)
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    style = {
        "tailscope.gpu.sm_clock": ("SM clock (MHz)", "#2ca02c", None, False),
        "tailscope.gpu.sm_clock.max": ("SM clock max", "#2ca02c", "dot", False),
        "tailscope.gpu.utilization": ("utilisation", "#1f77b4", None, True),
    }
    for name, pts in by_name.items():
        if name not in style:
            continue
        label, color, dash, secondary = style[name]
        pts.sort()
        fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], name=label, mode="lines+markers", line={"color": color, "dash": dash}), secondary_y=secondary)
    fig.add_vrect(x0=0, x1=max((end - origin).total_seconds(), 0.5), fillcolor="#4c78a8", opacity=0.12, line_width=0, annotation_text="request", annotation_position="top left", annotation_font_size=10)
    base_figure_layout(fig, title="Its GPU around the request (shaded)", height=240)
    fig.update_yaxes(title_text="MHz", rangemode="tozero", secondary_y=False)
    fig.update_yaxes(title_text="util", tickformat=".0%", range=[0, 1.05], secondary_y=True, showgrid=False)
    fig.update_xaxes(title_text="seconds from the request's start")
    return fig


def _list(d: dict[str, Any], *keys: str) -> list[dict[str, Any]]:
    for k in keys:
        v = d.get(k)
        if isinstance(v, list):
            return v
    return []


def render(ctx: PageContext, trace_id: str) -> Any:
    data = ctx.analyzer.trace(trace_id, around=ctx.params.get("at"))
    req = data.get("request") or {}
    spans = _list(data, "spans")
    if not req:
        return _non_request(ctx, trace_id, spans)
    origin, req_end = _span_times(req)
    if origin is None:
        starts = [t for t in (_span_times(s)[0] for s in spans) if t is not None]
        origin = min(starts) if starts else dt.datetime.now(dt.timezone.utc)
    if req_end is None:
        req_end = origin

    compiles = _list(data, "compiles", "compile_spans", "overlapping_compiles")
    evictions = _list(data, "evictions", "kv_evictions")
    batch = data.get("batch") or {}
    # GPU samples are periodic (the node agent's interval): look a minute either
    # side so a short request still shows the clock and load around it.
    gpu_samples: list[dict[str, Any]] = []
    if req.get("host_name"):
        pad = dt.timedelta(seconds=GPU_CONTEXT_S)
        gpu_samples = queries.gpu_around(ctx.store, req["host_name"], req.get("gpu_index"), origin - pad, req_end + pad)

    own_ids = {s.get("span_id") for s in spans}
    rows = sorted(spans, key=lambda s: (0 if s.get("span_id") == req.get("span_id") else 1, _span_times(s)[0] or origin))
    rows += [{**c, "role": "compile"} for c in compiles if c.get("span_id") not in own_ids]
    if batch and _first(batch, "start", "start_time") is not None and batch.get("span_id") not in own_ids:
        rows.append({**batch, "role": "batch", "name": f"batch {batch.get('batch_id') or ''} ({batch.get('batch_size') or '?'} requests)"})

    incident = _incident_of(ctx, req, origin, req_end)
    analysis = data.get("analysis") or {}
    if not analysis.get("causes") and incident is not None:
        # The incident's own attribution of this request, when the trace has none.
        analysis = next((r for r in incident.get("requests_detail") or [] if r.get("trace_id") == trace_id), analysis)
    causes = analysis.get("causes") or []
    cause_items = [
        html.Li(
            [
                html.Span(cause_label(c.get("cause", "unknown")), className=f"ts-cause cause-{c.get('cause', 'unknown')}"),
                html.Span(f" {fmt_pct(c.get('share'))} · {fmt_ms(c.get('excess_ms'))} excess", className="ts-muted"),
                html.Div(evidence_view(c.get("evidence"), lambda t: ctx.request_href(t, at=req.get("start_time"))), className="ts-evidence-block") if c.get("evidence") else None,
            ]
        )
        for c in causes
    ]

    compile_rows = [
        [fmt_time(_first(c, "start", "start_time")), c.get("service_instance_id") or c.get("instance") or req.get("service_instance_id") or "–", c.get("compile_kind") or "–", c.get("compile_shape") or "–", fmt_ms(c.get("duration_ms")), html.Code(str(c.get("compile_reason") or "–")[:300])]
        for c in compiles
    ]
    evict_rows = [
        [fmt_time(_first(e, "time", "t")), e.get("service_instance_id") or e.get("instance") or "–", e.get("kv_reason") or e.get("reason") or "–", str(e.get("kv_blocks") or e.get("blocks") or "–"), fmt_pct(e.get("kv_usage") if e.get("kv_usage") is not None else e.get("usage")), "this request" if (e.get("kv_victim_trace_id") or e.get("victim") or "").lower() == trace_id.lower() else "other"]
        for e in evictions
    ]
    batch_block: Any = html.Div("not part of a recorded batch", className="ts-empty")
    if batch:
        longest = batch.get("longest") or batch.get("longest_member") or {}
        longest_trace = longest.get("trace_id") if isinstance(longest, dict) else batch.get("longest_trace")
        batch_block = html.Div(
            [
                html.Div(
                    [
                        _kv("batch", batch.get("batch_id") or "–"),
                        _kv("size", str(batch.get("batch_size") or "–")),
                        _kv("lengths", f"{batch.get('batch_min_len', '–')} → {batch.get('batch_max_len', '–')}"),
                        _kv("padding waste", fmt_pct(_waste(batch))),
                        _kv("wait to fill", fmt_ms((batch.get("batch_wait_s") or 0) * 1000) if batch.get("batch_wait_s") is not None else "–"),
                        _kv("batch time", fmt_ms(batch.get("duration_ms"))),
                    ],
                    className="ts-summary",
                ),
                html.Div(
                    [
                        "Longest member: ",
                        link(f"{longest_trace[:16]}…", ctx.request_href(longest_trace, at=req.get("start_time")), className="ts-link request-link") if longest_trace and longest_trace != trace_id else html.Span("this request" if longest_trace == trace_id else "–"),
                        html.Span(f" ({_first(longest, 'input_tokens', 'longest_tokens', 'len', default='?')} tokens)" if isinstance(longest, dict) and longest else "", className="ts-muted"),
                    ]
                ),
            ]
        )

    latency = req.get("latency_ms") or req.get("duration_ms")
    return html.Div(
        [
            html.H2(["Request ", html.Code(trace_id)], id="request-title"),
            html.Div(
                [
                    _kv("service", req.get("service_name") or req.get("service") or "–"),
                    _kv("replica", req.get("service_instance_id") or req.get("instance") or "–"),
                    _kv("host · GPU", f"{req.get('host_name') or '–'} · {req.get('gpu_index') if req.get('gpu_index') is not None else '–'}"),
                    _kv("start", fmt_time(origin)),
                    _kv("latency", fmt_ms(latency)),
                    _kv("expected", fmt_ms(analysis.get("expected_ms"))),
                    _kv("excess", fmt_ms(analysis.get("excess_ms"))),
                    _kv("input / output tokens", f"{_n(req.get('input_tokens'))} / {_n(req.get('output_tokens'))}"),
                    _kv("shape", str(_own(spans, req).get("shape_len") or "–")),
                ],
                className="ts-summary",
            ),
            html.Div(
                ["Part of incident ", link(incident["id"], ctx.incident_href(incident["id"]), className="ts-link incident-link"),
                 html.Span(f" ({fmt_time(incident.get('start'))} → {fmt_time(incident.get('end'))})", className="ts-muted")],
                id="request-incident",
            )
            if incident
            else None,
            section("Why it was slow", html.Ul(cause_items, className="ts-causes") if cause_items else html.Div("no excess latency attributed to this request", className="ts-empty"), id="request-causes"),
            section("Waterfall", graph(waterfall(rows, evictions, origin), id="request-waterfall") if rows else html.Div("no spans", className="ts-empty"), id="waterfall"),
            html.Div(
                [
                    section("Compiles that overlapped it", table(["start", "replica", "kind", "shape", "stall", "reason"], compile_rows, empty="no compile overlapped this request"), id="request-compiles"),
                    section("KV evictions", table(["time", "replica", "reason", "blocks", "usage after", "victim"], evict_rows, empty="no KV eviction around this request"), id="request-evictions"),
                ],
                className="ts-grid2",
            ),
            html.Div(
                [
                    section("Its batch", batch_block, id="request-batch"),
                    section("Its GPU", graph(gpu_figure(gpu_samples, origin, req_end), id="request-gpu"), id="request-gpu-section"),
                ],
                className="ts-grid2",
            ),
        ]
    )


def _n(value: Any) -> str:
    return "–" if value is None else str(value)


def _non_request(ctx: PageContext, trace_id: str, spans: list[dict[str, Any]]) -> Any:
    """A trace without a request span (a compile or batch span sent on its own): just its spans."""
    starts = [t for t in (_span_times(s)[0] for s in spans) if t is not None]
    origin = min(starts) if starts else dt.datetime.now(dt.timezone.utc)
    first = spans[0] if spans else {}
    return html.Div(
        [
            html.H2(["Trace ", html.Code(trace_id)], id="request-title"),
            html.Div(
                f"This trace has no request span: it holds {len(spans)} span(s) emitted on their own "
                f"({', '.join(sorted({str(s.get('role') or s.get('name')) for s in spans}))}) on "
                f"{first.get('service_instance_id') or first.get('service_name') or 'an unknown replica'}. "
                "The requests it affected link to it from their own pages.",
                className="ts-muted",
            ),
            section("Spans", graph(waterfall(spans, [], origin), id="request-waterfall") if spans else html.Div("no spans", className="ts-empty"), id="waterfall"),
        ]
    )


def _incident_of(ctx: PageContext, req: dict[str, Any], start: dt.datetime, end: dt.datetime) -> dict[str, Any] | None:
    """The incident (with its slow requests) this request's start falls in, if any."""
    service = req.get("service_name") or req.get("service")
    if not service:
        return None
    found = ctx.analyzer.incidents(service=service, start=start - dt.timedelta(minutes=30), end=end + dt.timedelta(minutes=30)).get("incidents", [])
    for inc in found:
        a, b = to_datetime(inc.get("start")), to_datetime(inc.get("end"))
        if a is not None and b is not None and a <= start < b:
            return ctx.analyzer.incident(inc["id"])
    return None


def _own(spans: list[dict[str, Any]], req: dict[str, Any]) -> dict[str, Any]:
    """The request's own span row (the request summary omits some columns)."""
    return next((s for s in spans if s.get("span_id") == req.get("span_id")), req)


def _waste(batch: dict[str, Any]) -> float | None:
    real, padded = batch.get("batch_real_tokens"), batch.get("batch_padded_tokens")
    if real is None or not padded:
        return batch.get("padding_waste")
    return 1.0 - float(real) / float(padded)


def _kv(key: str, value: Any) -> html.Div:
    return html.Div([html.Span(key, className="ts-k"), html.Span(value, className="ts-v")], className="ts-kv")

"""Small building blocks every page uses: error line, tables, links, figure style.

Errors are shown as the same one-line message the JSON API returns (spec
section 10, ``tailscope.errors``) — never a traceback in the browser.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Any, Callable, Iterable, Sequence

from dash import dcc, html

from tailscope.errors import TailscopeError

log = logging.getLogger("tailscope.dashboard")

INTERNAL_ERROR = "internal error (details in the server log)"

# One palette for causes so a cause has the same colour on every page.
CAUSE_COLORS: dict[str, str] = {
    "compile_miss": "#d62728",
    "kv_eviction": "#9467bd",
    "batch_contention": "#ff7f0e",
    "queue_saturation": "#8c564b",
    "provider_load": "#17becf",
    "gpu_throttle": "#e377c2",
    "gpu_contention": "#bcbd22",
    "cold_start": "#1f77b4",
    "unknown": "#7f7f7f",
}
CAUSE_LABELS: dict[str, str] = {
    "compile_miss": "compile miss",
    "kv_eviction": "KV eviction",
    "batch_contention": "batch contention",
    "queue_saturation": "queue saturation",
    "provider_load": "provider load",
    "gpu_throttle": "GPU throttle",
    "gpu_contention": "GPU contention",
    "cold_start": "cold start",
    "unknown": "unknown",
}


def cause_label(cause: str) -> str:
    return CAUSE_LABELS.get(cause, cause)


def recommendation_text(rec: Any) -> str | None:
    """The analyzer's recommendation is ``{summary, **numbers}``; older/other shapes are plain text."""
    if rec is None:
        return None
    if isinstance(rec, dict):
        return rec.get("summary") or rec.get("recommendation")
    return str(rec)


def error_line(message: str) -> html.Div:
    """The one-line error, styled, with a stable class the browser tests look for."""
    return html.Div(message, className="ts-error", role="alert")


def error_message(exc: BaseException) -> str:
    """The user-facing line for an exception: its own message, or the generic 500 line."""
    if isinstance(exc, TailscopeError):
        return exc.message
    log.error("dashboard callback failed", exc_info=exc)
    return INTERNAL_ERROR


def guarded(render: Callable[[], Any]) -> Any:
    """Run a page renderer; errors become one line (the traceback goes to the log)."""
    try:
        return render()
    except Exception as exc:  # noqa: BLE001 - translated for the user here, logged above
        return error_line(error_message(exc))


def fmt_ms(value: Any) -> str:
    if value is None:
        return "–"
    value = float(value)
    if value >= 10_000:
        return f"{value / 1000:.1f} s"
    if value >= 1000:
        return f"{value / 1000:.2f} s"
    return f"{value:.0f} ms" if value >= 10 else f"{value:.1f} ms"


def fmt_pct(value: Any) -> str:
    return "–" if value is None else f"{float(value) * 100:.0f} %"


def fmt_time(value: Any) -> str:
    """Show a time as ``YYYY-MM-DD HH:MM:SS UTC`` whatever form it came in."""
    if value is None:
        return "–"
    if isinstance(value, (int, float)):
        value = dt.datetime.fromtimestamp(value, tz=dt.timezone.utc)
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return value
    if value.tzinfo is not None:
        value = value.astimezone(dt.timezone.utc)
    return value.strftime("%Y-%m-%d %H:%M:%S") + " UTC"


def to_datetime(value: Any) -> dt.datetime | None:
    """Analyzer times (RFC 3339 strings) and DuckDB times (naive UTC) → aware UTC."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return dt.datetime.fromtimestamp(value, tz=dt.timezone.utc)
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.timezone.utc)
    return value.astimezone(dt.timezone.utc)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, class_name: str = "ts-table", empty: str = "nothing in this range") -> html.Div | html.Table:
    """A plain HTML table (cells may be components, e.g. links)."""
    body = [html.Tr([html.Td(cell) for cell in row]) for row in rows]
    if not body:
        return html.Div(empty, className="ts-empty")
    return html.Table([html.Thead(html.Tr([html.Th(h) for h in headers])), html.Tbody(body)], className=class_name)


# Evidence columns that are bookkeeping, not proof (ids a person cannot use).
_HIDDEN_EVIDENCE = {"span_id", "batch_span_id", "parent_span_id"}


def evidence_view(evidence: Any, trace_href: Callable[[str], str] | None = None) -> Any:
    """Render a cause's evidence (rows that prove it) whatever shape the analyzer gives.

    Columns naming a trace become links to that request's page when
    ``trace_href`` is given.
    """
    if evidence is None or evidence == {} or evidence == []:
        return html.Span("no evidence recorded", className="ts-muted")
    if isinstance(evidence, str):
        return html.Span(evidence)
    if isinstance(evidence, dict):
        items = []
        for key, value in evidence.items():
            items.append(html.Dt(str(key).replace("_", " ")))
            items.append(html.Dd(evidence_view(value, trace_href) if isinstance(value, (dict, list)) else _scalar(value)))
        return html.Dl(items, className="ts-evidence")
    if isinstance(evidence, list):
        if evidence and all(isinstance(e, dict) for e in evidence):
            keys: list[str] = []
            for e in evidence[:50]:
                for k in e:
                    if k not in keys and k not in _HIDDEN_EVIDENCE:
                        keys.append(k)
            rows = [[_evidence_cell(k, e.get(k), trace_href) for k in keys] for e in evidence[:50]]
            more = [html.Div(f"… and {len(evidence) - 50} more", className="ts-muted")] if len(evidence) > 50 else []
            headers = [k.replace("_", " ") for k in keys]
            return html.Div([table(headers, rows, class_name="ts-table ts-small ts-evidence-table")] + more, className="ts-scroll")
        return html.Span(", ".join(str(_scalar(e)) for e in evidence[:50]))
    return html.Span(_scalar(evidence))


def _evidence_cell(key: str, value: Any, trace_href: Callable[[str], str] | None) -> Any:
    if trace_href is not None and isinstance(value, str) and key.endswith("trace_id") and len(value) == 32:
        return dcc.Link(value[:12] + "…", href=trace_href(value), className="ts-link request-link", title=value)
    if key in ("reason", "compile_reason") and isinstance(value, str):
        return html.Code(value, className="ts-reason")
    return _scalar(value)


def _scalar(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str)[:300]
    return str(value)


def link(text: str, href: str, **kwargs: Any) -> dcc.Link:
    return dcc.Link(text, href=href, className=kwargs.pop("className", "ts-link"), **kwargs)


def section(title: str, *children: Any, id: str | None = None) -> html.Section:
    kwargs = {"id": id} if id else {}
    return html.Section([html.H3(title), *children], className="ts-section", **kwargs)


def graph(figure: Any, *, id: str | dict[str, str] | None = None) -> dcc.Graph:
    """A figure (a plotly Figure or a plain figure dict) in a responsive graph."""
    kwargs = {"id": id} if id else {}
    return dcc.Graph(figure=figure, config={"displaylogo": False, "responsive": True}, className="ts-graph", **kwargs)


GRID = "#e9edf2"


def figure_style(title: str | None = None, height: int = 320) -> dict[str, Any]:
    """A calm shared look for every figure (white, thin grid, legend on top), as layout keys.

    Uses the empty ``none`` template plus these few keys rather than
    ``plotly_white``: applying a full template costs tens of milliseconds per
    figure, which adds up on pages with many figures.
    """
    return {
        "template": "none",
        "height": height,
        "margin": {"l": 56, "r": 24, "t": 48 if title else 20, "b": 40},
        "title": {"text": title, "x": 0.01, "font": {"size": 14}} if title else None,
        "legend": {"orientation": "h", "y": 1.12, "x": 0, "font": {"size": 11}},
        "font": {"family": "Inter, system-ui, -apple-system, Segoe UI, sans-serif", "size": 12, "color": "#2a3f5f"},
        "hoverlabel": {"font": {"size": 11}},
        "paper_bgcolor": "white",
        "plot_bgcolor": "white",
        "hovermode": "closest",
    }


def base_figure_layout(fig: Any, *, title: str | None = None, height: int = 320) -> Any:
    """Apply :func:`figure_style` to a plotly Figure (grid lines on every axis)."""
    fig.update_layout(**figure_style(title, height))
    fig.update_xaxes(gridcolor=GRID, zeroline=False, showline=False, automargin=True)
    fig.update_yaxes(gridcolor=GRID, zeroline=False, showline=False, automargin=True)
    return fig


def empty_figure(message: str, height: int = 200) -> Any:
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, font={"size": 13, "color": "#888"}, xref="paper", yref="paper", x=0.5, y=0.5)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return base_figure_layout(fig, height=height)

"""The Dash app, mounted inside the server's FastAPI app under ``/dashboard/``.

One process owns the DuckDB file (DESIGN.md), so the dashboard is not a
separate service: it is a Flask/Dash WSGI app served by the same uvicorn
through ``a2wsgi`` (WSGI callbacks run on its thread pool, so a slow page
never blocks ingest on the event loop), reading through the same store and
analyzer objects as the JSON API.

Routing is one callback: ``(pathname, query string) → page``. The query
string holds the view state (range, service, refresh) so any URL can be
pasted into an incident channel and opens the same view.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import unquote

from dash import ALL, Dash, Input, Output, State, ctx, dcc, html, no_update

from dashboard.components import error_message, guarded
from dashboard.context import PageContext
from dashboard.state import RANGE_LABELS, RANGES, REFRESH_CHOICES, ViewState, parse_search, parse_time

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger("tailscope.dashboard")

PREFIX = "/dashboard/"

# (path segment, nav label); "" is the overview.
NAV: tuple[tuple[str, str], ...] = (
    ("", "Overview"),
    ("gpus", "GPUs"),
    ("shapes", "Shapes & compiles"),
    ("batching", "Batching"),
    ("hours", "Hour of day"),
    ("sql", "SQL console"),
)


def render_page(pathname: str | None, search: str | None, *, analyzer: Any, store: Any, config: Any, now: dt.datetime | None = None) -> Any:
    """The page for a URL (the routing callback's body; tests call it directly).

    Unknown pages, bad query strings and analyzer errors come back as the
    one-line message the JSON API would give.
    """
    from dashboard.pages import batching, gpus, hours, incident, overview, request, shapes, sql_console

    def _render() -> Any:
        state, params = parse_search(search)
        page_ctx = PageContext(analyzer=analyzer, store=store, config=config, state=state, params=params, prefix=PREFIX, now=now)
        path = _relative(pathname)
        parts = [unquote(p) for p in path.split("/") if p]
        if not parts:
            return overview.render(page_ctx)
        head, rest = parts[0], parts[1:]
        simple: dict[str, Callable[[PageContext], Any]] = {
            "gpus": gpus.render,
            "shapes": shapes.render,
            "batching": batching.render,
            "hours": hours.render,
            "sql": sql_console.render,
        }
        if head in simple and not rest:
            return simple[head](page_ctx)
        if head == "incident" and len(rest) == 1:
            return incident.render(page_ctx, rest[0])
        if head == "request" and len(rest) == 1:
            return request.render(page_ctx, rest[0])
        from tailscope.errors import NotFound

        raise NotFound(f"no such dashboard page: {pathname}")

    return guarded(_render)


def refreshes(pathname: str | None) -> bool:
    """Whether auto-refresh re-renders this page (not the SQL console: it would wipe the editor)."""
    return _relative(pathname).split("/")[0] != "sql"


def _relative(pathname: str | None) -> str:
    path = pathname or PREFIX
    if path.startswith(PREFIX):
        return path[len(PREFIX):]
    if path.rstrip("/") == PREFIX.rstrip("/"):
        return ""
    return path.lstrip("/")


def nav_links(pathname: str | None, search: str | None) -> list[Any]:
    """The top navigation, carrying the current view state to every page."""
    try:
        state, _ = parse_search(search)
        qs = state.search()
    except Exception:  # noqa: BLE001 - the page itself reports the bad link
        qs = ""
    current = _relative(pathname).split("/")[0]
    return [
        dcc.Link(label, href=PREFIX + seg + qs, className="ts-nav-link" + (" active" if seg == current else ""), id=f"nav-{seg or 'overview'}")
        for seg, label in NAV
    ]


def _range_options(state: ViewState) -> list[dict[str, str]]:
    opts = [{"label": RANGE_LABELS[k], "value": k} for k in RANGES]
    if state.range == "custom":
        start, end = state.window()
        opts.append({"label": f"{start:%m-%d %H:%M} → {end:%m-%d %H:%M} UTC", "value": "custom"})
    return opts


def build_dash(*, analyzer: Any, store: Any, config: Any) -> Dash:
    """Build the Dash app (not mounted); its Flask server is ``app.server``."""
    app = Dash(
        "tailscope.dashboard",
        requests_pathname_prefix=PREFIX,
        routes_pathname_prefix="/",
        assets_folder=str(Path(__file__).parent / "assets"),
        suppress_callback_exceptions=True,
        title="tailscope",
        update_title=None,
        serve_locally=True,
    )
    app.layout = html.Div(
        [
            dcc.Location(id="url", refresh="callback-nav"),
            dcc.Interval(id="tick", interval=30_000, disabled=True),
            html.Header(
                [
                    html.Div([html.Span("tailscope", className="ts-logo"), html.Span("why is p99 bad right now?", className="ts-tagline")], className="ts-brand"),
                    html.Nav(id="nav", className="ts-nav"),
                    html.Div(
                        [
                            dcc.Dropdown(id="ctl-range", options=_range_options(ViewState()), value="1h", clearable=False, searchable=False, className="ts-ctl ts-ctl-range"),
                            dcc.Dropdown(id="ctl-service", options=[], value=None, placeholder="all services", clearable=True, className="ts-ctl ts-ctl-service"),
                            dcc.Dropdown(
                                id="ctl-refresh",
                                options=[{"label": "auto-refresh off" if s == 0 else f"refresh every {s} s", "value": s} for s in REFRESH_CHOICES],
                                value=0,
                                clearable=False,
                                searchable=False,
                                className="ts-ctl ts-ctl-refresh",
                            ),
                        ],
                        className="ts-controls",
                    ),
                ],
                className="ts-header",
            ),
            html.Main(dcc.Loading(html.Div(id="page"), type="dot", delay_show=400), className="ts-main"),
        ],
        className="ts-app",
    )

    @app.callback(
        Output("url", "search"),
        Output("ctl-range", "value"),
        Output("ctl-range", "options"),
        Output("ctl-service", "value"),
        Output("ctl-service", "options"),
        Output("ctl-refresh", "value"),
        Output("tick", "disabled"),
        Output("tick", "interval"),
        Input("url", "search"),
        Input("ctl-range", "value"),
        Input("ctl-service", "value"),
        Input("ctl-refresh", "value"),
    )
    def sync_controls(search: str | None, rng: str | None, service: str | None, refresh: int | None) -> tuple[Any, ...]:
        return sync_controls_callback(ctx.triggered_id, search, rng, service, refresh, analyzer=analyzer)

    @app.callback(
        Output("page", "children"),
        Output("nav", "children"),
        Input("url", "pathname"),
        Input("url", "search"),
        Input("tick", "n_intervals"),
    )
    def route(pathname: str | None, search: str | None, _ticks: int | None) -> tuple[Any, Any]:
        if ctx.triggered_id == "tick" and not refreshes(pathname):
            return no_update, no_update
        page = render_page(pathname, search, analyzer=analyzer, store=store, config=config)
        return page, nav_links(pathname, search)

    @app.callback(
        Output("url", "search", allow_duplicate=True),
        Input({"type": "latency", "service": ALL}, "relayoutData"),
        State("url", "search"),
        prevent_initial_call=True,
    )
    def zoom(_relayouts: list[Any], search: str | None) -> Any:
        triggered = ctx.triggered[0]["value"] if ctx.triggered else None
        return zoom_search(triggered, search)

    @app.callback(Output("overview-slow", "children"), Input("overview-slow", "id"), State("url", "search"))
    def overview_slow(_id: str, search: str | None) -> Any:
        return overview_slow_callback(search, analyzer=analyzer, store=store, config=config)

    from dashboard.pages import sql_console

    sql_console.register(app, store, config)
    return app


def zoom_search(relayout: dict[str, Any] | None, search: str | None) -> Any:
    """A drag-zoom on a latency chart becomes a custom range in the URL (so the page re-renders
    with finer buckets and the link can be shared); anything else changes nothing."""
    if not relayout:
        return no_update
    lo, hi = relayout.get("xaxis.range[0]"), relayout.get("xaxis.range[1]")
    if lo is None and isinstance(relayout.get("xaxis.range"), list) and len(relayout["xaxis.range"]) == 2:
        lo, hi = relayout["xaxis.range"]
    if lo is None or hi is None:
        return no_update
    try:
        state, params = parse_search(search)
        start, end = parse_time(str(lo), "start"), parse_time(str(hi), "end")
    except Exception:  # noqa: BLE001 - a zoom that cannot be read keeps the view as it is
        return no_update
    if end <= start:
        return no_update
    extra = {k: v for k, v in params.items() if k not in ("range", "start", "end", "service", "refresh")}
    return state.with_window(start, end).search(**extra)


def overview_slow_callback(search: str | None, *, analyzer: Any, store: Any, config: Any, now: dt.datetime | None = None) -> Any:
    """The overview's slowest-requests table, rendered after the rest of the page."""
    from dashboard.pages import overview

    def _render() -> Any:
        state, params = parse_search(search)
        page_ctx = PageContext(analyzer=analyzer, store=store, config=config, state=state, params=params, prefix=PREFIX, now=now)
        return overview.slow_requests_table(page_ctx)

    return guarded(_render)


def sync_controls_callback(triggered: Any, search: str | None, rng: str | None, service: str | None, refresh: int | None, *, analyzer: Any) -> tuple[Any, ...]:
    """Keep the header controls and the URL in step (either side may change).

    A URL change (page load, pasted link, back button) sets the controls; a
    control change writes the URL, which the routing callback then renders.
    """
    try:
        services = sorted(analyzer.services())
    except Exception as exc:  # noqa: BLE001 - the page shows the error too
        log.warning("services() failed: %s", error_message(exc))
        services = []
    service_opts = [{"label": s, "value": s} for s in services]
    try:
        state, params = parse_search(search)
    except Exception:  # noqa: BLE001 - the page reports the bad link; controls stay
        return (no_update,) * 4 + (service_opts,) + (no_update,) * 3
    if triggered in (None, "url"):
        opts = _range_options(state)
        if state.service and state.service not in services:
            service_opts.append({"label": state.service, "value": state.service})
        return (no_update, state.range, opts, state.service, service_opts, state.refresh, state.refresh <= 0, max(state.refresh, 1) * 1000)
    new = state
    if triggered == "ctl-range" and rng and rng != "custom":
        new = ViewState(range=rng, service=state.service, refresh=state.refresh)
    elif triggered == "ctl-service":
        new = ViewState(range=state.range, start=state.start, end=state.end, service=service or None, refresh=state.refresh)
    elif triggered == "ctl-refresh":
        new = ViewState(range=state.range, start=state.start, end=state.end, service=state.service, refresh=int(refresh or 0))
    extra = {k: v for k, v in params.items() if k not in ("range", "start", "end", "service", "refresh")}
    new_search = new.search(**extra)
    return (
        new_search if new_search != (search or "") else no_update,
        no_update,
        _range_options(new),
        no_update,
        service_opts,
        no_update,
        new.refresh <= 0,
        max(new.refresh, 1) * 1000,
    )


def mount(app: "FastAPI", *, analyzer: Any, store: Any, config: Any) -> Dash:
    """Serve the dashboard from ``app`` at ``/dashboard/`` (and redirect ``/dashboard``)."""
    from a2wsgi import WSGIMiddleware
    from fastapi.responses import RedirectResponse

    dash_app = build_dash(analyzer=analyzer, store=store, config=config)

    @app.get("/dashboard", include_in_schema=False)
    def _dashboard_slash() -> RedirectResponse:
        return RedirectResponse(PREFIX, status_code=307)

    app.mount(PREFIX.rstrip("/"), WSGIMiddleware(dash_app.server, workers=8))
    return dash_app


__all__ = ["build_dash", "mount", "render_page", "nav_links", "sync_controls_callback", "overview_slow_callback", "zoom_search", "refreshes"]

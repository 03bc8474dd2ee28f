"""Callback tests: the dashboard's page renderers and callbacks, called directly,
against a real server's store filled through the real OTLP ingest.

One server per module (the scenario takes ~10 s to send); every test reads it.
"""

from __future__ import annotations

import datetime as dt
import io
from typing import Any, Iterator

import httpx
import plotly.graph_objects as go
import pytest

from test_dashboard_scenario import Scenario, send_scenario, wait_ingested


class _Running:
    def __init__(self, server: Any, port: int) -> None:
        self.server = server
        self.url = f"http://127.0.0.1:{port}"

    @property
    def store(self) -> Any:
        return self.server.store


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[_Running, Scenario]]:
    from tailscope.config import load
    from tailscope.server import build_server

    db = tmp_path_factory.mktemp("dash") / "store.duckdb"
    server = build_server(load({"db": str(db), "port": 0, "grpc_port": 0, "dashboard": True}, environ={}))
    port = server.serve_in_thread()
    running = _Running(server, port)
    try:
        sc = send_scenario(running.url)
        wait_ingested(running, sc)
        yield running, sc
    finally:
        server.shutdown_thread()


@pytest.fixture(scope="module")
def parts(filled: tuple[_Running, Scenario]) -> dict[str, Any]:
    running, sc = filled
    return {
        "analyzer": running.server.parts["analyzer"],
        "store": running.store,
        "config": running.server.config,
        "now": sc.now + dt.timedelta(seconds=1),
    }


def render(parts: dict[str, Any], path: str, search: str = "") -> Any:
    from dashboard.app import render_page

    return render_page(path, search, **parts)


def texts(component: Any) -> list[str]:
    """Every string shown by a component tree (figures excluded)."""
    out: list[str] = []
    if component is None:
        return out
    if isinstance(component, (list, tuple)):
        for c in component:
            out += texts(c)
        return out
    if isinstance(component, (str, int, float)):
        return [str(component)]
    children = getattr(component, "children", None)
    if children is not None:
        out += texts(children)
    return out


def walk(component: Any) -> Iterator[Any]:
    if component is None or isinstance(component, (str, int, float)):
        return
    if isinstance(component, (list, tuple)):
        for c in component:
            yield from walk(c)
        return
    yield component
    yield from walk(getattr(component, "children", None))


def by_id(component: Any, id_: Any) -> Any:
    for c in walk(component):
        if getattr(c, "id", None) == id_:
            return c
    raise AssertionError(f"no component with id {id_!r}")


def hrefs(component: Any) -> list[str]:
    return [c.href for c in walk(component) if getattr(c, "href", None)]


def errors(component: Any) -> list[str]:
    return [" ".join(texts(c)) for c in walk(component) if getattr(c, "className", None) == "ts-error"]


def window_search(sc: Scenario) -> str:
    start = sc.now - dt.timedelta(minutes=35)
    end = sc.now + dt.timedelta(minutes=1)
    return f"?start={start:%Y-%m-%dT%H:%M:%SZ}&end={end:%Y-%m-%dT%H:%M:%SZ}"


# --- the scenario itself -----------------------------------------------------
def test_scenario_arrived_through_otlp(filled: Any) -> None:
    """Every span, point and record sent is stored, with the spike in it."""
    running, sc = filled
    cur = running.store.cursor()
    rows = dict(cur.execute("SELECT role, count(*) FROM spans GROUP BY role").fetchall())
    assert rows["request"] == sc.requests
    assert rows["compile"] == sc.compiles >= 8
    assert cur.execute("SELECT count(*) FROM metrics").fetchone()[0] == sc.metric_points
    assert cur.execute("SELECT count(*) FROM logs WHERE event_name = 'tailscope.kv.eviction'").fetchone()[0] == sc.log_records
    stalled = cur.execute(
        "SELECT quantile_cont(duration_ms, 0.5) FROM spans WHERE role = 'request' AND trace_id IN (SELECT unnest(?))",
        [sc.stalled_traces],
    ).fetchone()[0]
    normal = cur.execute("SELECT quantile_cont(duration_ms, 0.5) FROM spans WHERE role = 'request'").fetchone()[0]
    assert stalled > normal + 800, (stalled, normal)


# --- overview, incident, request -------------------------------------------
def test_overview_shows_the_incident_and_its_cause(parts: dict[str, Any], filled: Any) -> None:
    _, sc = filled
    page = render(parts, "/dashboard/", window_search(sc))
    assert errors(page) == []
    shown = " ".join(texts(page))
    assert "compile miss" in shown
    fig = by_id(page, {"type": "latency", "service": "chat-api"}).figure
    names = {t.name for t in fig.data}
    assert {"p50", "p95", "p99", "requests/s"} <= names
    # The incident is drawn as a band over the latency chart, where it happened.
    bands = [s for s in fig.layout.shapes if s.type == "rect"]
    assert bands, "no incident band"
    incident_links = [h for h in hrefs(page) if "/dashboard/incident/" in h]
    assert incident_links and all("start=" in h for h in incident_links), incident_links
    # The slowest requests come in a second callback (the costly query), with links.
    from dashboard.app import overview_slow_callback

    slow = overview_slow_callback(window_search(sc), **parts)
    assert errors(slow) == []
    linked = {h.split("/dashboard/request/")[1].split("?")[0] for h in hrefs(slow) if "/dashboard/request/" in h}
    assert linked & set(sc.stalled_traces)
    assert all("at=" in h for h in hrefs(slow) if "/dashboard/request/" in h)


def test_incident_page_explains_with_evidence(parts: dict[str, Any], filled: Any) -> None:
    _, sc = filled
    overview = render(parts, "/dashboard/", window_search(sc))
    link = next(h for h in hrefs(overview) if "/dashboard/incident/" in h)
    path, _, search = link.partition("?")
    page = render(parts, path, "?" + search)
    assert errors(page) == []
    by_id(page, "cause-compile_miss")
    shown = " ".join(texts(page))
    assert "Recommendation" in shown
    causes = by_id(page, "incident-causes").figure.data[0]
    assert "compile miss" in list(causes.y)
    # Slow requests link to their request pages; the stalled ones are among them.
    req_links = [h for h in hrefs(page) if "/dashboard/request/" in h]
    assert req_links
    linked = {h.split("/dashboard/request/")[1].split("?")[0] for h in req_links}
    assert linked & set(sc.stalled_traces)
    # Each link says when the request ran, so its page finds the trace without reading every span.
    assert all("at=" in h for h in req_links), req_links
    path, _, search = req_links[0].partition("?")
    assert errors(render(parts, path, "?" + search)) == []


def test_request_page_shows_the_compile_that_stalled_it(parts: dict[str, Any], filled: Any) -> None:
    _, sc = filled
    trace_id = sc.stalled_traces[len(sc.stalled_traces) // 2]
    page = render(parts, f"/dashboard/request/{trace_id}", window_search(sc))
    assert errors(page) == []
    shown = " ".join(texts(page))
    assert "size mismatch" in shown  # the guard failure that caused the recompile
    assert "compile miss" in shown
    fig = by_id(page, "request-waterfall").figure
    labels = [str(t.y[0]) for t in fig.data]
    assert any("queue" in lab for lab in labels) and any("compile" in lab for lab in labels)
    gpu = by_id(page, "request-gpu").figure
    assert any(t.name == "SM clock (MHz)" for t in gpu.data)


def test_unknown_request_is_one_line_not_found(parts: dict[str, Any]) -> None:
    page = render(parts, "/dashboard/request/" + "ab" * 16)
    (line,) = errors(page)
    assert "\n" not in line and "Traceback" not in line


# --- store-backed pages ------------------------------------------------------
def test_gpus_page_decodes_clock_reasons(parts: dict[str, Any], filled: Any) -> None:
    _, sc = filled
    page = render(parts, "/dashboard/gpus", window_search(sc))
    assert errors(page) == []
    shown = " ".join(texts(page))
    assert "SW power cap" in shown and "0x4" in shown
    assert "4101" in shown and "4201" in shown  # per-process rows
    fig = go.Figure(by_id(page, "gpu-gpu-node-1-0").figure)  # a plain dict on this page; validate it
    names = {t.name for t in fig.data}
    assert {"utilisation", "SM clock", "SM clock max", "power", "power limit", "temperature", "memory used"} <= names
    clock = next(t for t in fig.data if t.name == "SM clock")
    assert min(clock.y) < 1500 < max(clock.y)  # the power-cap dip is visible


def test_shapes_page_lists_compiles_and_reasons(parts: dict[str, Any], filled: Any) -> None:
    _, sc = filled
    page = render(parts, "/dashboard/shapes", window_search(sc))
    assert errors(page) == []
    shown = " ".join(texts(page))
    assert f"{sc.compiles} compile events" in shown
    assert "size mismatch at index 1" in shown
    events = by_id(page, "compile-events").figure
    assert sum(len(t.x) for t in events.data) == sc.compiles
    # The longest stalls link to the slowest request each one stalled.
    linked = {h.split("/dashboard/request/")[1].split("?")[0] for h in hrefs(by_id(page, "compile-longest"))}
    assert linked and linked <= set(sc.stalled_traces)
    assert all("at=" in h for h in hrefs(by_id(page, "compile-longest")))  # the compile's time: no full scan for the trace
    dist = by_id(page, "shape-distribution").figure
    assert {t.name for t in dist.data} >= {"padded shape the kernels ran", "input length (tokens)"}


def test_batching_page_finds_head_of_line_cases(parts: dict[str, Any], filled: Any) -> None:
    _, sc = filled
    page = render(parts, "/dashboard/batching", window_search(sc))
    assert errors(page) == []
    fig = by_id(page, "batch-series").figure
    waste = next(t for t in fig.data if t.name == "padding waste")
    assert all(0 <= w <= 1 for w in waste.y if w is not None)
    links = [h for h in hrefs(page) if "/dashboard/request/" in h]
    assert len(links) >= 2
    assert all("at=" in h for h in links)  # the batch's time


def test_hours_page_heat_maps_per_service_and_provider(parts: dict[str, Any], filled: Any) -> None:
    _, sc = filled
    page = render(parts, "/dashboard/hours", window_search(sc))
    assert errors(page) == []
    for id_ in ("hours-service-embed-api", "hours-provider-openai @ api.openai.com"):
        heat = by_id(page, id_).figure.data[0]
        assert len(heat.y) >= 3  # three days of background traffic
        assert len(heat.x) == 24
        cells = [v for row in heat.z for v in row if v is not None]
        assert len(cells) >= 48
    chat = by_id(page, "hours-service-chat-api").figure.data[0]
    assert [v for row in chat.z for v in row if v is not None]  # its last half hour


def test_service_filter_restricts_pages(parts: dict[str, Any], filled: Any) -> None:
    _, sc = filled
    page = render(parts, "/dashboard/hours", window_search(sc) + "&service=embed-api")
    ids = {getattr(c, "id", None) for c in walk(page)}
    assert "hours-service-embed-api" in ids and "hours-service-chat-api" not in ids


# --- SQL console -------------------------------------------------------------
def test_sql_console_runs_a_query(parts: dict[str, Any]) -> None:
    from dashboard.pages.sql_console import run_callback

    status, result = run_callback(parts["store"], parts["config"], "SELECT role, count(*) AS n FROM spans GROUP BY role ORDER BY role")
    assert "rows" in " ".join(texts(status))
    grid = by_id(result, "sql-table")
    head, body = grid.children
    assert texts(head) == ["role", "n"]
    roles = {texts(tr)[0] for tr in body.children}
    assert {"request", "compile", "batch", "queue"} <= roles


def test_sql_console_refuses_a_write_with_the_api_message(parts: dict[str, Any], filled: Any) -> None:
    from dashboard.pages.sql_console import run_callback

    running, _ = filled
    sql = "DELETE FROM spans"
    status, result = run_callback(parts["store"], parts["config"], sql)
    assert result is None
    (line,) = errors(status)
    api = httpx.post(running.url + "/api/v1/sql", json={"sql": sql}, timeout=30)
    assert api.status_code == 400
    assert line == api.json()["error"]
    assert running.store.cursor().execute("SELECT count(*) FROM spans").fetchone()[0] > 0


def test_every_worked_query_runs(parts: dict[str, Any]) -> None:
    from dashboard.pages.sql_console import EXAMPLES, run_callback

    for name, sql in EXAMPLES.items():
        status, result = run_callback(parts["store"], parts["config"], sql)
        assert errors(status) == [], (name, errors(status))
        assert result is not None and by_id(result, "sql-table").children[1].children, f"worked query {name!r} returned nothing on the scenario"


def test_sql_downloads_csv_and_typed_parquet(parts: dict[str, Any]) -> None:
    import base64

    import pyarrow as pa
    import pyarrow.parquet as pq

    from dashboard.pages.sql_console import download_callback

    sql = "SELECT trace_id, start_time, duration_ms FROM spans WHERE role = 'request' ORDER BY start_time LIMIT 20"
    data, _ = download_callback(parts["store"], parts["config"], sql, "csv")
    lines = data["content"].splitlines()
    assert lines[0] == "trace_id,start_time,duration_ms" and len(lines) == 21
    data, _ = download_callback(parts["store"], parts["config"], sql, "parquet")
    table = pq.read_table(io.BytesIO(base64.b64decode(data["content"])))
    assert table.num_rows == 20
    assert pa.types.is_timestamp(table.schema.field("start_time").type)
    assert pa.types.is_floating(table.schema.field("duration_ms").type)
    data, status = download_callback(parts["store"], parts["config"], "DROP TABLE spans", "parquet")
    assert errors(status) and "read-only" in errors(status)[0]


def test_sql_schema_browser_lists_documented_tables(parts: dict[str, Any]) -> None:
    from collector.schema import TABLE_DOCS

    page = render(parts, "/dashboard/sql")
    schema = by_id(page, "sql-schema")
    shown = " ".join(texts(schema))
    for table in TABLE_DOCS:
        assert table in shown
    assert "compile_reason" in shown


# --- URL state, routing, errors ----------------------------------------------
def test_state_round_trips_through_the_url() -> None:
    from dashboard.state import ViewState, parse_search

    start = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    state = ViewState(range="custom", start=start, end=start + dt.timedelta(hours=1), service="chat api", refresh=30)
    parsed, params = parse_search(state.search(q="SELECT 1"))
    assert parsed == state and params["q"] == "SELECT 1"
    assert parse_search("?range=24h")[0].window(start) == (start - dt.timedelta(hours=24), start)
    assert parse_search("")[0] == ViewState()


@pytest.mark.parametrize(
    "search, message",
    [
        ("?range=3w", "invalid range: '3w'"),
        ("?start=yesterday", "invalid start: 'yesterday'"),
        ("?start=2026-01-02T00:00:00Z&end=2026-01-01T00:00:00Z", "is not before end"),
        ("?refresh=soon", "invalid refresh"),
    ],
)
def test_bad_links_give_one_line(parts: dict[str, Any], search: str, message: str) -> None:
    page = render(parts, "/dashboard/gpus", search)
    (line,) = errors(page)
    assert message in line


def test_zooming_a_latency_chart_sets_a_custom_range() -> None:
    from dash import no_update

    from dashboard.app import zoom_search

    out = zoom_search({"xaxis.range[0]": "2026-11-23 18:05:00.5", "xaxis.range[1]": "2026-11-23 18:20:00"}, "?range=6h&service=chat-api")
    assert out == "?start=2026-11-23T18%3A05%3A00Z&end=2026-11-23T18%3A20%3A00Z&service=chat-api"
    assert zoom_search({"xaxis.autorange": True}, "?range=6h") is no_update
    assert zoom_search({"xaxis.range[0]": "garbage", "xaxis.range[1]": "x"}, "") is no_update


def test_auto_refresh_spares_the_sql_console() -> None:
    from dashboard.app import refreshes

    assert refreshes("/dashboard/") and refreshes("/dashboard/gpus") and refreshes("/dashboard/incident/x")
    assert not refreshes("/dashboard/sql")


def test_unknown_page(parts: dict[str, Any]) -> None:
    (line,) = errors(render(parts, "/dashboard/nope"))
    assert line == "no such dashboard page: /dashboard/nope"


def test_controls_and_url_stay_in_step(parts: dict[str, Any]) -> None:
    from dashboard.app import sync_controls_callback
    from dash import no_update

    analyzer = parts["analyzer"]
    # A pasted link sets the controls.
    out = sync_controls_callback("url", "?range=6h&service=chat-api&refresh=10", None, None, None, analyzer=analyzer)
    assert out[0] is no_update and out[1] == "6h" and out[3] == "chat-api" and out[5] == 10
    assert {o["value"] for o in out[4]} >= {"chat-api", "embed-api"}
    assert out[6] is False and out[7] == 10_000
    # Changing a control writes the URL (other parameters are kept).
    out = sync_controls_callback("ctl-range", "?range=6h&service=chat-api&q=x", "24h", "chat-api", 0, analyzer=analyzer)
    assert out[0] == "?range=24h&service=chat-api&q=x"
    out = sync_controls_callback("ctl-service", "?range=6h&service=chat-api", "6h", None, 0, analyzer=analyzer)
    assert out[0] == "?range=6h"


def test_dashboard_is_mounted_in_the_server(filled: Any) -> None:
    running, _ = filled
    r = httpx.get(running.url + "/dashboard", follow_redirects=True, timeout=30)
    assert r.status_code == 200 and "_dash-config" in r.text
    cfg = httpx.get(running.url + "/dashboard/_dash-layout", timeout=30)
    assert cfg.status_code == 200 and "ctl-range" in cfg.text
    assert httpx.get(running.url + "/dashboard/assets/style.css", timeout=30).status_code == 200


def test_every_page_renders_on_an_empty_store(tmp_path: Any) -> None:
    """A fresh install: every page explains there is nothing yet, none errors."""
    from analyzer.service import Analyzer
    from collector.store import Store
    from dashboard.app import overview_slow_callback, render_page
    from tailscope.config import load

    config = load({"db": str(tmp_path / "empty.duckdb")}, environ={})
    store = Store(config.db)
    try:
        analyzer = Analyzer(store, config)
        for path in ("", "gpus", "shapes", "batching", "hours", "sql"):
            page = render_page("/dashboard/" + path, "?range=24h", analyzer=analyzer, store=store, config=config)
            assert errors(page) == [], (path, errors(page))
        shown = " ".join(texts(render_page("/dashboard/", "", analyzer=analyzer, store=store, config=config)))
        assert "No services have sent request spans yet." in shown
        assert errors(overview_slow_callback("", analyzer=analyzer, store=store, config=config)) == []
        (line,) = errors(render_page("/dashboard/request/" + "0" * 32, "", analyzer=analyzer, store=store, config=config))
        assert "no trace" in line
    finally:
        store.close()

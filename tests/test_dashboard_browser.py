"""End-to-end: real headless Chromium (Debian's) against the real server.

The server is filled by the lab's ``compile_miss`` scenario (a real small
model served with real torch.compile: bucketing is switched off on replica-0
for three minutes, so new input lengths really recompile while requests
queue) and, for the multi-service pages (a provider with an hour-of-day
profile, a GPU power-cap episode, KV evictions), by the OTLP scenario of
``test_dashboard_scenario``. Each page must load with no console error and
show the incident and its cause; the SQL console must run a query and refuse
a write.

Screenshots go to a temporary folder, or to ``$DASHBOARD_SCREENSHOTS_DIR``
when set (``docs/screenshots/`` is refreshed that way).
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import pytest

from test_dashboard_scenario import Scenario, send_scenario, wait_ingested

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
TIMEOUT_MS = 30_000


class _Running:
    def __init__(self, server: Any, port: int) -> None:
        self.server = server
        self.url = f"http://127.0.0.1:{port}"

    @property
    def store(self) -> Any:
        return self.server.store


class _Site:
    """The running server and what was sent to it."""

    def __init__(self, running: _Running, lab: Any, otlp: Scenario) -> None:
        self.running = running
        self.url = running.url
        self.lab = lab  # lab.runner.ScenarioResult
        self.otlp = otlp

    @property
    def lab_window(self) -> str:
        """The lab scenario's virtual day, with five minutes either side."""
        fmt = "%Y-%m-%dT%H:%M:%SZ"
        start = dt.datetime.fromtimestamp(self.lab.start - 300, tz=dt.timezone.utc)
        end = dt.datetime.fromtimestamp(self.lab.end + 300, tz=dt.timezone.utc)
        return f"?start={start.strftime(fmt)}&end={end.strftime(fmt)}"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Site]:
    pytest.importorskip("torch")
    from lab.runner import run_scenarios
    from tailscope.config import load
    from tailscope.server import build_server

    from conftest import SHARED_DATA

    root = tmp_path_factory.mktemp("dash-browser")
    server = build_server(load({"db": str(root / "store.duckdb"), "port": 0, "grpc_port": 0, "dashboard": True}, environ={}))
    port = server.serve_in_thread()
    running = _Running(server, port)
    try:
        (lab,) = run_scenarios(["compile_miss"], running.url, root / "lab", data_dir=SHARED_DATA)
        otlp = send_scenario(running.url)
        wait_ingested(running, otlp, extra=lab.spans)
        yield _Site(running, lab, otlp)
    finally:
        server.shutdown_thread()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists() or shutil.which("chromium") is None:
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium chromium-driver")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-dev-shm-usage"],
        )
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = os.environ.get("DASHBOARD_SCREENSHOTS_DIR")
    path = Path(target) if target else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


class _Page:
    """A browser tab that records console errors and uncaught exceptions."""

    def __init__(self, context: Any) -> None:
        self.context = context
        self.page = context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.problems: list[str] = []
        self.page.on("console", lambda m: self.problems.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.problems.append(f"pageerror: {e}"))

    def settle(self) -> None:
        """Wait until Dash has no callback in flight and the page is painted."""
        self.page.wait_for_selector("#page > *")
        self.page.wait_for_function("() => !document.querySelector('[data-dash-is-loading=\"true\"]')")
        self.page.wait_for_timeout(300)

    def close(self) -> None:
        self.page.close()


@pytest.fixture(scope="module")
def context(browser: Any) -> Iterator[Any]:
    """One browser profile for the module, so Dash's scripts are fetched once (HTTP cache)."""
    ctx = browser.new_context(viewport={"width": 1440, "height": 900}, accept_downloads=True)
    yield ctx
    ctx.close()


@pytest.fixture
def tab(context: Any) -> Iterator[_Page]:
    p = _Page(context)
    yield p
    p.close()


def _otlp_window(sc: Scenario) -> str:
    start = sc.now - dt.timedelta(minutes=35)
    end = sc.now + dt.timedelta(minutes=1)
    return f"?start={start:%Y-%m-%dT%H:%M:%SZ}&end={end:%Y-%m-%dT%H:%M:%SZ}"


# (name, path, which data, texts the page must show)
PAGES = [
    ("overview", "", "lab", ["Overview", "compile miss", "Incidents (", "chat-api"]),
    ("gpus", "gpus", "otlp", ["SW power cap", "Per-process GPU memory", "gpu-node-2"]),
    ("shapes", "shapes", "lab", ["Recommended buckets", "size mismatch", "recompile"]),
    ("batching", "batching", "lab", ["Head-of-line cases", "Batch size, padding waste"]),
    ("hours", "hours", "otlp", ["Hour of day", "Per provider"]),
    ("sql", "sql", "otlp", ["SQL console", "Tables", "span_links"]),
]


@pytest.mark.parametrize("name, path, data, expected", PAGES, ids=[p[0] for p in PAGES])
def test_page_loads_clean(site: _Site, tab: _Page, shots: Path, name: str, path: str, data: str, expected: list[str]) -> None:
    window = site.lab_window if data == "lab" else _otlp_window(site.otlp)
    tab.page.goto(site.url + "/dashboard/" + path + window)
    tab.settle()
    body = tab.page.inner_text("#page")
    for text in expected:
        assert text in body, f"{name}: {text!r} not shown in: {body[:2000]}"
    # Figures are SVG (not in inner_text): check they were drawn.
    figures = {"overview": "#overview-latency .main-svg", "hours": "#hours-providers .main-svg", "gpus": "#gpu-series .main-svg", "shapes": "#shapes .main-svg", "batching": "#batching .main-svg"}
    if name in figures:
        tab.page.wait_for_selector(figures[name])
    if name == "hours":
        titles = tab.page.locator("#hours-providers .gtitle").all_text_contents()
        assert any("openai" in t for t in titles), titles
    tab.page.screenshot(path=str(shots / f"{name}.png"), full_page=True)
    assert tab.problems == [], tab.problems


def test_incident_and_request_pages_via_links(site: _Site, tab: _Page, shots: Path) -> None:
    tab.page.goto(site.url + "/dashboard/" + site.lab_window)
    tab.settle()
    tab.page.click("a.incident-link >> nth=0")
    tab.page.wait_for_url("**/dashboard/incident/**")
    tab.page.wait_for_selector("#cause-compile_miss")
    tab.settle()
    body = tab.page.inner_text("#page")
    assert "compile miss" in body and "Recommendation" in body and "Contrast" in body
    tab.page.screenshot(path=str(shots / "incident.png"), full_page=True)
    incident_url = tab.page.url

    tab.page.click("#incident-slow a.request-link >> nth=0")
    tab.page.wait_for_url("**/dashboard/request/**")
    tab.page.wait_for_selector("#request-waterfall .main-svg")
    tab.settle()
    body = tab.page.inner_text("#page")
    assert "Why it was slow" in body and "compile miss" in body and "Compiles that overlapped it" in body
    tab.page.screenshot(path=str(shots / "request.png"), full_page=True)

    # The incident link is a plain URL: pasted into a fresh tab it opens the same page.
    fresh = tab.context.new_page()
    fresh.goto(incident_url)
    fresh.wait_for_selector("#cause-compile_miss", timeout=TIMEOUT_MS)
    fresh.close()
    assert tab.problems == [], tab.problems


def test_sql_console_runs_and_refuses_a_write(site: _Site, tab: _Page, shots: Path) -> None:
    running = site.running
    tab.page.goto(running.url + "/dashboard/sql")
    tab.settle()
    tab.page.fill("#sql-editor", "SELECT role, count(*) AS spans FROM spans GROUP BY role ORDER BY spans DESC")
    tab.page.click("#sql-run")
    tab.page.wait_for_selector("#sql-table td:has-text('request')")
    assert "rows" in tab.page.inner_text("#sql-status")
    tab.page.screenshot(path=str(shots / "sql.png"), full_page=True)

    with tab.page.expect_download() as dl:
        tab.page.click("#sql-csv")
    assert dl.value.suggested_filename.endswith(".csv")
    csv_text = Path(dl.value.path()).read_text()
    assert csv_text.splitlines()[0] == "role,spans"

    tab.page.fill("#sql-editor", "DELETE FROM spans")
    tab.page.click("#sql-run")
    error = tab.page.wait_for_selector("#sql-status .ts-error")
    assert "read-only" in error.inner_text()
    tab.page.screenshot(path=str(shots / "sql-refused.png"), full_page=False)
    count = running.store.cursor().execute("SELECT count(*) FROM spans").fetchone()[0]
    assert count > 0
    assert tab.problems == [], tab.problems


def test_dragging_over_a_latency_chart_zooms_the_view(site: _Site, tab: _Page) -> None:
    tab.page.goto(site.url + "/dashboard/?range=1h")
    tab.settle()
    drag = tab.page.locator("#overview-latency .nsewdrag").first
    box = drag.bounding_box()
    assert box is not None
    y = box["y"] + box["height"] / 2
    tab.page.mouse.move(box["x"] + box["width"] * 0.3, y)
    tab.page.mouse.down()
    tab.page.mouse.move(box["x"] + box["width"] * 0.5, y, steps=8)
    tab.page.mouse.up()
    tab.page.wait_for_url("**/dashboard/?start=*&end=*")
    tab.settle()
    assert "11-" in tab.page.inner_text("#ctl-range") or "→" in tab.page.inner_text("#ctl-range")
    assert tab.problems == [], tab.problems


def test_controls_follow_the_url_and_write_it(site: _Site, tab: _Page) -> None:
    tab.page.goto(site.url + "/dashboard/gpus?range=24h&service=embed-api")
    tab.settle()
    assert "last 24 hours" in tab.page.inner_text("#ctl-range")
    assert "embed-api" in tab.page.inner_text("#ctl-service")
    # Navigation keeps the view state in every link.
    tab.page.click("#nav-shapes")
    tab.page.wait_for_url("**/dashboard/shapes?range=24h&service=embed-api")
    tab.settle()
    # A bad link gives the API's one-line error, not a traceback.
    tab.page.goto(site.url + "/dashboard/gpus?range=3w")
    tab.settle()
    assert tab.page.inner_text(".ts-error").startswith("invalid range: '3w'")
    assert tab.problems == [], tab.problems

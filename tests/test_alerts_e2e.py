"""End to end: a p99 spike written through the real OTLP ingest reaches a real receiver with the right top cause.

Real server (ingest → DuckDB → the real analyzer → the alert evaluator →
the outbox sender), the stock OpenTelemetry SDK and OTLP/HTTP exporter, a
real receiver on loopback. The telemetry is the benchmark's generator
(benchmarks/alert_latency.py): 25 back-dated minutes of normal traffic, then
a window in which 15 % of requests stall in torch.compile recompiles.
"""

from __future__ import annotations

import importlib.util
import json
import random
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from analyzer.alerts import signing
from conftest import REPO
from test_alerts_receiver import Receiver


def _bench() -> Any:
    spec = importlib.util.spec_from_file_location("alert_latency_bench", REPO / "benchmarks" / "alert_latency.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_compile_spike_reaches_the_receiver_with_its_cause(make_server: Any) -> None:
    bench = _bench()
    receiver = Receiver()
    try:
        srv = make_server(alert_interval_s=1, public_url="http://tailscope.test:4318")
        r = httpx.post(srv.url + "/api/v1/alerts/webhooks", json={"url": receiver.url + "/hook", "secret": "e2e-secret", "format": "generic"})
        assert r.status_code == 201, r.text
        rng = random.Random(11)
        tel = bench.Telemetry(srv.url, "chat-api", schedule_delay_ms=200)
        step = 60
        now = time.time()
        current = now // step * step  # the window still filling
        spike_start = current - step  # the newest complete window spikes
        bench.backfill(tel, spike_start - 25 * 60, spike_start, 1.0, rng)
        stalled = bench.spike_window(tel, spike_start, current, 1.0, rng, share=0.15)
        assert stalled >= 3
        tel.flush()
        tel.close()
        got = receiver.wait_for(lambda rs: any(x.status == 200 for x in rs), timeout=90)[0]
        body = got.json()
        assert signing.verify("e2e-secret", got.header(signing.TIMESTAMP_HEADER), got.body, got.header(signing.SIGNATURE_HEADER))
        assert body["event"] == "open"
        inc = body["incident"]
        assert inc["service"] == "chat-api" and inc["open"] is True
        assert inc["p99_ms"] > 2 * inc["baseline_p99_ms"]
        top = body["top_causes"][0]
        assert top["cause"] == "compile_miss", body["top_causes"]
        assert top["recommendation"], top
        assert "size mismatch" in str(top["evidence"])  # the guard-failure reason travels with the alert
        assert body["url"] == f"http://tailscope.test:4318/dashboard/incident/{inc['id']}"
        # the link opens the dashboard's incident page for this incident (rendered by the real dashboard)
        from urllib.parse import urlsplit

        from dashboard.app import render_page

        page = render_page(urlsplit(body["url"]).path, "", analyzer=srv.server.parts["analyzer"], store=srv.store, config=srv.server.config)
        rendered = json.dumps(page.to_plotly_json(), default=lambda o: o.to_plotly_json() if hasattr(o, "to_plotly_json") else str(o))
        assert "incident-title" in rendered and inc["id"] in rendered and "no such dashboard page" not in rendered
        alerts = httpx.get(srv.url + "/api/v1/alerts").json()["alerts"]
        assert len(alerts) == 1 and alerts[0]["incident_id"] == inc["id"] and alerts[0]["top_cause"] == "compile_miss"
        # the evaluator keeps running over the same open incident: no second message
        time.sleep(3)
        assert len([x for x in receiver.received if x.status == 200]) == 1
    finally:
        receiver.close()


@pytest.mark.slow
def test_server_restart_mid_retry_still_delivers_once(make_server: Any, tmp_path: Path) -> None:
    """The receiver is down (500) when the alert fires; the server restarts; the alert arrives once."""
    bench = _bench()
    receiver = Receiver(default_status=500)
    try:
        db = str(tmp_path / "restart.duckdb")
        srv = make_server(db=db, alert_interval_s=1)
        r = httpx.post(srv.url + "/api/v1/alerts/webhooks", json={"url": receiver.url + "/hook", "secret": "k", "format": "generic"})
        assert r.status_code == 201, r.text
        rng = random.Random(5)
        tel = bench.Telemetry(srv.url, "chat-api", schedule_delay_ms=200)
        now = time.time()
        spike_start = now // 60 * 60 - 60
        bench.backfill(tel, spike_start - 25 * 60, spike_start, 1.0, rng)
        bench.spike_window(tel, spike_start, spike_start + 60, 1.0, rng, share=0.15)
        tel.flush()
        tel.close()
        receiver.wait_for(lambda rs: len(rs) >= 1, timeout=90)  # first attempt failed: waiting to retry
        srv.stop()
        failed = len(receiver.received)
        assert failed >= 1 and all(x.status == 500 for x in receiver.received)
        receiver.default_status = 200
        again = make_server(db=db, alert_interval_s=1)  # same DuckDB file, same control DB next to it
        got = receiver.wait_for(lambda rs: any(x.status == 200 for x in rs), timeout=60)
        time.sleep(3)  # the restarted evaluator sees the same open incident: no second alert, no resend
        ok = [x for x in receiver.received if x.status == 200]
        assert len(ok) == 1
        assert {x.header("Idempotency-Key") for x in got} == {ok[0].header("Idempotency-Key")}
        assert ok[0].json()["top_causes"][0]["cause"] == "compile_miss"
        alerts = httpx.get(again.url + "/api/v1/alerts").json()["alerts"]
        assert len(alerts) == 1
        d = httpx.get(again.url + "/api/v1/alerts/deliveries").json()["deliveries"]
        assert len(d) == 1 and d[0]["status"] == "delivered" and d[0]["attempts"] == failed + 1
    finally:
        receiver.close()


@pytest.mark.slow
def test_lab_compile_miss_spike_reaches_the_receiver_with_the_injected_cause(make_server: Any, tmp_path: Path) -> None:
    """The lab's compile_miss scenario (real model, real torch.compile recompiles) with its injection in the newest minute."""
    pytest.importorskip("torch", reason="the lab needs torch (the 'torch' extra)")
    from lab.runner import Lab, LabConfig
    from lab.scenarios import build
    from lab.sim import Window

    receiver = Receiver()
    try:
        srv = make_server(alert_interval_s=1)
        r = httpx.post(srv.url + "/api/v1/alerts/webhooks", json={"url": receiver.url + "/hook", "secret": "lab", "format": "generic"})
        assert r.status_code == 201, r.text
        scn = build("compile_miss", window=Window(660.0, 720.0))  # bucketing off in the scenario's last minute
        assert scn.duration == 720.0
        base = time.time() // 60 * 60 - scn.duration  # the scenario ends at the last minute boundary: its last window is the newest
        with Lab(LabConfig()) as lab:
            result = lab.run(scn, srv.url, base, tmp_path / "lab")
        injected = {i["cause"] for i in result.injections}
        assert injected == {"compile_miss"} and result.compiles > 0
        got = receiver.wait_for(lambda rs: any(x.status == 200 for x in rs), timeout=90)[0]
        assert signing.verify("lab", got.header(signing.TIMESTAMP_HEADER), got.body, got.header(signing.SIGNATURE_HEADER))
        body = got.json()
        assert body["event"] == "open" and body["incident"]["service"] == scn.service
        assert body["top_causes"][0]["cause"] in injected, body["top_causes"]
        assert any(e.get("kind") == "compile_span" and "size mismatch" in str(e.get("reason")) for e in body["top_causes"][0]["evidence"])
    finally:
        receiver.close()

"""End to end: a p99 spike written through the real OTLP ingest reaches a real receiver with the right top cause.

Real server (ingest → DuckDB → the real analyzer → the alert evaluator →
the outbox sender), the stock OpenTelemetry SDK and OTLP/HTTP exporter, a
real receiver on loopback. The telemetry is the benchmark's generator
(benchmarks/alert_latency.py): 25 back-dated minutes of normal traffic, then
a window in which 15 % of requests stall in torch.compile recompiles.
"""

from __future__ import annotations

import importlib.util
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
        assert body["url"] == f"http://tailscope.test:4318/dashboard/incident?id={inc['id']}"
        alerts = httpx.get(srv.url + "/api/v1/alerts").json()["alerts"]
        assert len(alerts) == 1 and alerts[0]["incident_id"] == inc["id"] and alerts[0]["top_cause"] == "compile_miss"
        # the evaluator keeps running over the same open incident: no second message
        time.sleep(3)
        assert len([x for x in receiver.received if x.status == 200]) == 1
    finally:
        receiver.close()

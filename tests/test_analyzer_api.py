"""The analyzer over HTTP on a real server, the CLI on a stopped store, and OTLP in → diagnosis out."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from analyzer_world import World, replicas

A = 16 * 60


def _compile_world(seed: int = 31) -> World:
    w = World(seed=seed)
    reps = replicas(3)
    w.steady("chat-api", reps, 30, 5)
    for r in reps:
        w.gpu_series(r.host, r.gpu, r.pid, 0, 30 * 60, every_s=10)
    for k in range(12):
        w.compile_stall(reps[1], A + k * 20, 3.0, 600 + k)
    w.render()
    return w


def test_http_api(make_server) -> None:
    srv = make_server()
    w = _compile_world()
    w.write(srv.store)
    get = lambda path, **params: httpx.get(srv.url + path, params=params, timeout=60)  # noqa: E731

    r = get("/api/v1/services")
    assert r.status_code == 200 and r.json() == {"services": ["chat-api"]}

    r = get("/api/v1/latency", service="chat-api", step="120")
    body = r.json()
    assert r.status_code == 200 and body["step_s"] == 120 and len(body["points"]) == 15
    assert set(body["points"][0]) >= {"t", "count", "p50_ms", "p95_ms", "p99_ms"} and body["points"][0]["t"].endswith("Z")

    r = get("/api/v1/incidents", service="chat-api")
    incidents = r.json()["incidents"]
    assert r.status_code == 200 and len(incidents) == 1
    inc = incidents[0]
    assert inc["causes"][0]["cause"] == "compile_miss" and inc["open"] is False
    assert {"id", "service", "start", "end", "p99_ms", "baseline_p99_ms", "requests", "slow_requests", "causes"} <= set(inc)

    # the id is stable: asking again, or over another range that holds it, gives the same id
    again = get("/api/v1/incidents", start="2026-11-20T12:10:00Z", end=str(1795176000 + 1800)).json()["incidents"]
    assert [i["id"] for i in again] == [inc["id"]]

    one = get(f"/api/v1/incidents/{inc['id']}").json()
    assert one["id"] == inc["id"] and one["requests_detail"] and one["contrast"]

    slow = get("/api/v1/slow-requests", service="chat-api", limit="20").json()["requests"]
    assert len(slow) == 20 and slow[0]["excess_ms"] >= slow[-1]["excess_ms"]
    assert {"trace_id", "span_id", "service", "start", "latency_ms", "excess_ms", "causes"} <= set(slow[0])

    victim = next(s for s in slow if s["causes"] and s["causes"][0]["cause"] == "compile_miss")
    tr = get(f"/api/v1/traces/{victim['trace_id'].upper()}").json()
    assert tr["trace_id"] == victim["trace_id"]
    assert {s["role"] for s in tr["spans"]} >= {"request", "queue", "prefill", "decode"}
    assert tr["overlapping_compiles"] and tr["gpu_samples"]
    assert tr["analysis"]["causes"][0]["cause"] == "compile_miss"
    assert "searched" not in tr  # no time given: every span was looked at

    # with a time it was live (what the dashboard's links pass), only spans near it are read: the same answer
    near = get(f"/api/v1/traces/{victim['trace_id']}", around=victim["start"]).json()
    assert near["searched"]["start"] < victim["start"] < near["searched"]["end"]
    assert {k: v for k, v in near.items() if k != "searched"} == tr
    # a wrong time finds no request there and falls back to looking everywhere
    far = get(f"/api/v1/traces/{victim['trace_id']}", around="2026-01-01T00:00:00Z").json()
    assert far == tr

    # errors: clear 400s / 404s in the project's error shape, never a traceback
    for path, params, status, words in [
        ("/api/v1/latency", {"start": "yesterday"}, 400, "RFC 3339"),
        ("/api/v1/latency", {"step": "0"}, 400, "step"),
        ("/api/v1/latency", {"step": "1", "start": "0", "end": "1795180000"}, 400, "limit"),
        ("/api/v1/incidents", {"start": "2026-11-20T13:00:00Z", "end": "2026-11-20T12:00:00Z"}, 400, "before"),
        ("/api/v1/slow-requests", {"limit": "lots"}, 400, "limit"),
        ("/api/v1/traces/xyz", {}, 400, "32 hex"),
        ("/api/v1/traces/" + "ab" * 16, {}, 404, "no trace"),
        ("/api/v1/traces/" + "ab" * 16, {"around": "soon"}, 400, "around"),
        ("/api/v1/traces/" + "ab" * 16, {"around": "2026-11-20T12:00:00Z"}, 404, "no trace"),
        ("/api/v1/incidents/inc-1-deadbeef", {}, 404, "no incident"),
        ("/api/v1/incidents/nope", {}, 400, "incident id"),
    ]:
        r = get(path, **params)
        assert r.status_code == status, (path, r.text)
        assert r.json()["ok"] is False and words in r.json()["error"], r.text


def test_empty_store_answers_empty(make_server) -> None:
    srv = make_server()
    get = lambda path: httpx.get(srv.url + path, timeout=30).json()  # noqa: E731
    assert get("/api/v1/incidents") == {"incidents": []}
    assert get("/api/v1/slow-requests") == {"requests": []}
    assert get("/api/v1/latency")["points"] == []
    assert get("/api/v1/services") == {"services": []}


def test_cli_on_stopped_store(tmp_path: Path) -> None:
    from collector.store import Store

    db = tmp_path / "stopped.duckdb"
    with Store(db) as store:
        _compile_world(32).write(store)
    out = subprocess.run([sys.executable, "-m", "tailscope.cli", "analyze", "--db", str(db), "--json", "--slow", "5"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["incidents"][0]["causes"][0]["cause"] == "compile_miss" and len(report["slow_requests"]) == 5
    text = subprocess.run([sys.executable, "-m", "tailscope.cli", "analyze",  "--db", str(db), "--since", "2026-11-20T12:00:00Z"], capture_output=True, text=True, timeout=120)
    assert text.returncode == 0 and "compile_miss" in text.stdout and "Pad input lengths to buckets" in text.stdout
    bad = subprocess.run([sys.executable, "-m", "tailscope.cli", "analyze", "--db", str(tmp_path / "missing.duckdb")], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "no such database" in bad.stderr and "Traceback" not in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "tailscope.cli", "analyze", "--db", str(db), "--since", "soon"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "RFC 3339" in bad.stderr


def test_otlp_spans_from_the_real_sdk_are_diagnosed(make_server) -> None:
    """Request + stage + compile spans sent by the stock OTel SDK exporter, diagnosed by the analyzer."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.trace import SpanKind, set_span_in_context

    srv = make_server()
    provider = TracerProvider(resource=Resource.create({"service.name": "otel-api", "service.instance.id": "r0",
                                                        "host.name": "h0", "process.pid": 7}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=srv.url + "/v1/traces"), max_queue_size=20_000, max_export_batch_size=512))
    tracer = provider.get_tracer("test")
    import numpy as np

    rng = np.random.default_rng(3)
    t = 1795176000.0
    stalled = []
    for i in range(900):
        t += float(rng.exponential(0.2))
        q = float(rng.exponential(0.004))
        dec = 0.004 * 50 * float(rng.lognormal(0, 0.3))
        stall = 2.5 if i in range(600, 900, 15) else 0.0
        ns = lambda x: int(x * 1e9)  # noqa: E731
        req = tracer.start_span("request", kind=SpanKind.SERVER, start_time=ns(t), attributes={
            "tailscope.role": "request", "gen_ai.request.model": "m", "gen_ai.usage.input_tokens": 100,
            "gen_ai.usage.output_tokens": 50, "tailscope.gpu.index": 0})
        ctx = set_span_in_context(req)
        s = t
        for role, dur in (("queue", q), ("prefill", 0.01 + stall), ("decode", dec)):
            st = tracer.start_span(role, context=ctx, start_time=ns(s), attributes={"tailscope.role": role})
            if stall and role == "prefill":
                c = tracer.start_span("torch.compile", context=set_span_in_context(req), start_time=ns(s), attributes={
                    "tailscope.role": "compile", "tailscope.compile.reason": "tensor 'x' size mismatch at index 1. expected 100, actual 101",
                    "tailscope.compile.shape": "[1, 101]", "tailscope.compile.kind": "recompile"})
                c.end(end_time=ns(s + stall))
            st.end(end_time=ns(s + dur))
            s += dur
        req.end(end_time=ns(s))
        if stall:
            stalled.append(format(req.get_span_context().trace_id, "032x"))
    provider.force_flush(30_000)
    provider.shutdown()
    deadline = time.time() + 30
    while time.time() < deadline:
        n = srv.sql("SELECT count(*) FROM spans WHERE role = 'request'")[0][0]
        if n == 900:
            break
        time.sleep(0.2)
    assert n == 900
    slow = httpx.get(srv.url + "/api/v1/slow-requests", params={"limit": 50}, timeout=60).json()["requests"]
    flagged = {r["trace_id"]: r for r in slow}
    assert set(stalled) <= set(flagged)
    for tid in stalled:
        top = flagged[tid]["causes"][0]
        assert top["cause"] == "compile_miss" and top["evidence"][0]["via"] == "child"

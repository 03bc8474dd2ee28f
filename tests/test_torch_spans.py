"""Request / stage / batch / provider spans, KV and replica events, the KV gauge:
through the real OTLP exporters into the real server, read back with SQL."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import datetime, timezone
from typing import Any, Callable

import pytest

from agents.torch import instrument


def wait_rows(srv: Any, query: str, want: Callable[[list[tuple]], bool], timeout_s: float = 20.0) -> list[tuple]:
    """Poll the SQL endpoint until ``want(rows)``: the server commits ingest asynchronously."""
    deadline = time.monotonic() + timeout_s
    rows = srv.sql(query)
    while not want(rows) and time.monotonic() < deadline:
        time.sleep(0.1)
        rows = srv.sql(query)
    return rows


@pytest.fixture
def handles():
    made = []

    def factory(**kwargs: Any):
        kwargs.setdefault("compile_events", False)
        kwargs.setdefault("schedule_delay_s", 0.1)
        h = instrument(**kwargs)
        made.append(h)
        return h

    yield factory
    for h in made:
        h.shutdown()


def _utc(ts: Any) -> datetime:
    if isinstance(ts, str):
        ts = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    return ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)


def test_request_and_stage_spans_land_in_typed_columns(make_server, handles):
    srv = make_server()
    h = handles(
        service="chat-api", endpoint=srv.url, instance_id="replica-0", host_name="node-a",
        resource={"tailscope.pool": "realtime"},
    )
    with h.request(model="tiny", input_tokens=11, session_id="s1", priority="interactive",
                   gpu_index=1, kv_cached_tokens=4, request_id="r-1",
                   attributes={"custom.tag": "x", "custom.list": [1, 2]}) as req:
        with h.stage("queue", parent=req):
            pass
        with h.stage("prefill"):  # parent defaults to the active request
            pass
        with h.stage("decode", parent=req):
            pass
        pc = h.start_stage("provider_call", parent=req, system="openai",
                           server_address="api.openai.com", region="America/New_York")
        pc.end()
        req.set(output_tokens=32, shape_len=16, kv_preemptions=1)
    assert h.flush(10)

    rows = wait_rows(
        srv,
        "SELECT span_id, parent_span_id, trace_id, name, kind, role, model, input_tokens, output_tokens, "
        "session_id, shape_len, priority, gpu_index, kv_cached_tokens, kv_preemptions, request_id, "
        "gen_ai_system, server_address, provider_region, service_name, service_instance_id, host_name, "
        "process_pid, pool, attributes FROM spans ORDER BY start_time",
        lambda r: len(r) >= 5,
    )
    assert len(rows) == 5
    by_role = {r[5]: r for r in rows}
    assert set(by_role) == {"request", "queue", "prefill", "decode", "provider_call"}
    r = by_role["request"]
    assert r[0] == req.span_id and r[1] is None and r[2] == req.trace_id
    assert "SERVER" in r[4].upper()
    assert r[6:16] == ("tiny", 11, 32, "s1", 16, "interactive", 1, 4, 1, "r-1")
    assert r[19:24] == ("chat-api", "replica-0", "node-a", __import__("os").getpid(), "realtime")
    extra = json.loads(r[24]) if isinstance(r[24], str) else r[24]
    assert extra["custom.tag"] == "x" and extra["custom.list"] == [1, 2]
    for role in ("queue", "prefill", "decode", "provider_call"):
        assert by_role[role][1] == req.span_id and by_role[role][2] == req.trace_id
    pc_row = by_role["provider_call"]
    assert "CLIENT" in pc_row[4].upper()
    assert pc_row[16:19] == ("openai", "api.openai.com", "America/New_York")


def test_batch_span_links_members_and_members_carry_the_batch_id(make_server, handles):
    srv = make_server()
    h = handles(service="chat-api", endpoint=srv.url, instance_id="replica-1")
    reqs = [h.start_request(model="tiny", input_tokens=n) for n in (9, 30, 64)]
    b = h.start_batch("b-17", members=reqs, max_len=64, min_len=9, real_tokens=103,
                      padded_tokens=192, wait_s=0.004)
    b.end()
    for r in reqs:
        r.end()
    assert h.flush(10)
    batch = wait_rows(
        srv,
        "SELECT span_id, batch_id, batch_size, batch_max_len, batch_min_len, batch_real_tokens, "
        "batch_padded_tokens, batch_wait_s FROM spans WHERE role = 'batch'",
        lambda r: len(r) == 1,
    )
    assert batch == [(b.span_id, "b-17", 3, 64, 9, 103, 192, 0.004)]
    members = wait_rows(
        srv, "SELECT span_id, batch_id FROM spans WHERE role = 'request' ORDER BY span_id", lambda r: len(r) == 3
    )
    assert sorted(members) == sorted((r.span_id, "b-17") for r in reqs)
    links = wait_rows(
        srv, "SELECT trace_id, span_id, linked_trace_id, linked_span_id FROM span_links", lambda r: len(r) == 3
    )
    assert sorted(links) == sorted((b.trace_id, b.span_id, r.trace_id, r.span_id) for r in reqs)


def test_explicit_times_on_a_virtual_clock(make_server, handles):
    """The lab replays hour-of-day scenarios on a virtual clock."""
    srv = make_server()
    h = handles(service="chat-api", endpoint=srv.url, instance_id="replica-2")
    t0 = datetime(2024, 3, 5, 14, 2, 0, tzinfo=timezone.utc).timestamp()
    req = h.start_request(model="tiny", start_time=t0)
    q = h.start_stage("queue", parent=req, start_time=t0)
    q.end(end_time=t0 + 0.25)
    req.end(end_time=t0 + 1.5)
    h.kv_eviction(blocks=2, reason="preemption", victim=req, time=t0 + 0.5)
    assert h.flush(10)
    rows = wait_rows(
        srv, "SELECT role, start_time, end_time, duration_ms FROM spans ORDER BY role", lambda r: len(r) == 2
    )
    got = {r[0]: (_utc(r[1]), _utc(r[2]), r[3]) for r in rows}
    assert got["request"][0] == datetime(2024, 3, 5, 14, 2, 0, tzinfo=timezone.utc)
    assert got["request"][2] == pytest.approx(1500.0, abs=0.01)
    assert got["queue"][2] == pytest.approx(250.0, abs=0.01)
    logs = wait_rows(srv, "SELECT time FROM logs", lambda r: len(r) == 1)
    assert _utc(logs[0][0]) == datetime(2024, 3, 5, 14, 2, 0, 500000, tzinfo=timezone.utc)


def test_kv_and_replica_events_and_kv_usage_gauge(make_server, handles):
    srv = make_server()
    h = handles(service="chat-api", endpoint=srv.url, instance_id="replica-3", export_interval_s=60)
    with h.request(model="tiny") as req:
        h.kv_eviction(blocks=8, reason="capacity", victim=req, usage=0.93)
    h.kv_eviction(blocks=3, reason="prefix_lru")
    h.replica_ready(load_seconds=3.2)
    h.set_kv_usage(0.81)
    assert h.flush(10)  # also collects the gauge now, not in 60 s
    logs = wait_rows(
        srv,
        "SELECT event_name, kv_blocks, kv_reason, kv_victim_trace_id, kv_usage, load_seconds, trace_id, "
        "span_id, service_instance_id FROM logs ORDER BY kv_blocks DESC NULLS LAST",
        lambda r: len(r) == 3,
    )
    assert logs[0] == ("tailscope.kv.eviction", 8, "capacity", req.trace_id, 0.93, None,
                       req.trace_id, req.span_id, "replica-3")
    assert logs[1][:5] == ("tailscope.kv.eviction", 3, "prefix_lru", None, None)
    assert logs[2][0] == "tailscope.replica.ready" and logs[2][5] == 3.2
    metrics = wait_rows(
        srv,
        "SELECT name, value, service_name, service_instance_id FROM metrics WHERE name = 'tailscope.kv.usage'",
        lambda r: len(r) >= 1,
    )
    assert metrics[0] == ("tailscope.kv.usage", 0.81, "chat-api", "replica-3")


def test_exception_in_a_request_marks_it_as_an_error(make_server, handles):
    srv = make_server()
    h = handles(service="chat-api", endpoint=srv.url, instance_id="replica-4")
    with pytest.raises(RuntimeError):
        with h.request(model="tiny"):
            raise RuntimeError("out of memory")
    assert h.flush(10)
    rows = wait_rows(srv, "SELECT status_code, status_message FROM spans", lambda r: len(r) == 1)
    assert "ERROR" in rows[0][0].upper() and "out of memory" in rows[0][1]


def test_bearer_token_is_sent(make_server, handles):
    srv = make_server(tokens="s3cret")
    good = handles(service="chat-api", endpoint=srv.url, instance_id="with-token", token="s3cret")
    bad = handles(service="chat-api", endpoint=srv.url, instance_id="no-token")
    good.start_request(model="tiny").end()
    bad.start_request(model="tiny").end()
    assert good.flush(10)
    assert not bad.flush(10)  # the server refused it: 401
    assert bad.failed_exports["spans"] == 1 and good.failed_exports["spans"] == 0
    rows = wait_rows(srv, "SELECT service_instance_id FROM spans", lambda r: len(r) >= 1)
    assert rows == [("with-token",)]


def test_bad_arguments_are_clear_errors(make_server, handles):
    h = handles(service="x", endpoint=make_server().url)
    for _ in range(1):
        with pytest.raises(ValueError, match="unknown stage 'prefil'"):
            h.start_stage("prefil")
        with pytest.raises(TypeError, match="input_tokens must be an int"):
            h.start_request(input_tokens="11")
        with pytest.raises(TypeError, match="unknown attribute keyword 'modle'"):
            h.start_request(modle="tiny")
        with pytest.raises(TypeError, match="attribute 'x.y' must be"):
            h.start_request(attributes={"x.y": {"a": 1}})
        with pytest.raises(ValueError, match="unknown KV eviction reason"):
            h.kv_eviction(blocks=1, reason="full")
        with pytest.raises(ValueError, match="usage must be a ratio"):
            h.set_kv_usage(81)
        req = h.start_request(start_time=100.0)
        with pytest.raises(ValueError, match="would end before it started"):
            req.end(end_time=99.0)
        req.end(end_time=101.0)
        req.end()  # a second end is ignored
        with pytest.raises(RuntimeError, match="already ended"):
            req.set(output_tokens=3)
        with pytest.raises(RuntimeError, match="has already ended"):
            h.start_batch("b", members=[req])
        with pytest.raises(TypeError, match="times are unix seconds"):
            h.start_request(start_time="now")
    with pytest.raises(ValueError, match="endpoint must be an http"):
        instrument(service="x", endpoint="127.0.0.1:4318", compile_events=False)
    with pytest.raises(ValueError, match="service must be a non-empty string"):
        instrument(service="", compile_events=False)


def test_ids_are_lowercase_hex_and_unique_even_with_a_seeded_global_random(make_server, handles):
    import random

    h = handles(service="x", endpoint=make_server().url)
    for _ in range(1):
        random.seed(0)
        a = h.start_request()
        random.seed(0)
        b = h.start_request()
        assert a.trace_id != b.trace_id and a.span_id != b.span_id
        for s in (a, b):
            assert len(s.trace_id) == 32 and len(s.span_id) == 16
            assert s.trace_id == s.trace_id.lower() and int(s.trace_id, 16) and int(s.span_id, 16)


def test_importing_the_package_does_not_import_torch():
    code = "import sys, agents.torch; assert 'torch' not in sys.modules, 'torch imported'; import agents"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_full_queue_drops_are_counted_and_flush_says_so(make_server, handles):
    """Serving code never blocks on export: overflow is dropped, counted, and reported."""
    srv = make_server()
    h = handles(service="chat-api", endpoint=srv.url, instance_id="tiny-queue",
                schedule_delay_s=3600, max_queue_size=8, max_export_batch_size=8)
    import logging

    logging.getLogger("opentelemetry.sdk._shared_internal").setLevel(logging.ERROR)  # "Queue full" per span
    try:
        for _ in range(50):
            h.start_request(model="tiny").end()
        assert not h.flush(10)
    finally:
        logging.getLogger("opentelemetry.sdk._shared_internal").setLevel(logging.NOTSET)
    stats = h.stats()
    assert stats["recorded"]["spans"] == 50
    assert stats["exported"]["spans"] + stats["dropped"]["spans"] == 50
    assert stats["dropped"]["spans"] > 0 and stats["failed"]["spans"] == 0
    stored = wait_rows(srv, "SELECT count(*) FROM spans", lambda r: r[0][0] >= stats["exported"]["spans"])
    assert stored == [(stats["exported"]["spans"],)]
    h.start_request(model="tiny").end()
    assert h.flush(10)  # nothing new lost since the last flush

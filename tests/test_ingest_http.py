"""OTLP/HTTP ingest end to end: real server on loopback, real OTel SDK exporter, read back via /api/v1/sql."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import httpx
import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from ingest_payloads import logs_request, metrics_request, request_spans

PB = {"content-type": "application/x-protobuf"}


def assert_json_valid(srv) -> None:
    """Stored JSON columns parse (ingest hands them to DuckDB as arrow.json, which DuckDB does not re-check)."""
    for table, cols in (("spans", ("attributes", "resource_attributes")), ("metrics", ("attributes", "resource_attributes")),
                        ("logs", ("attributes", "resource_attributes")), ("span_events", ("attributes",)), ("span_links", ("attributes",))):
        bad = " OR ".join(f"({c} IS NOT NULL AND NOT json_valid({c}))" for c in cols)
        assert srv.sql(f"SELECT count(*) FROM {table} WHERE {bad}") == [(0,)], table


def test_stock_otel_sdk_http_exporter_spans_are_stored(make_server):
    """The unmodified opentelemetry-sdk + OTLP/HTTP exporter, as any user would configure it."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.trace import SpanKind

    srv = make_server()
    provider = TracerProvider(resource=Resource.create({"service.name": "chat-api", "service.instance.id": "replica-7", "host.name": "node-b"}))
    exporter = OTLPSpanExporter(endpoint=srv.url + "/v1/traces", timeout=10)
    provider.add_span_processor(BatchSpanProcessor(exporter, max_export_batch_size=64))
    tracer = provider.get_tracer("tests.stock")
    expected = {}
    for i in range(150):
        with tracer.start_as_current_span("llm_request", kind=SpanKind.SERVER) as span:
            span.set_attribute("tailscope.role", "request")
            span.set_attribute("gen_ai.request.model", "llama-3-8b")
            span.set_attribute("gen_ai.usage.input_tokens", 10 + i)
            span.set_attribute("custom.thing", f"v{i}")
            with tracer.start_as_current_span("prefill") as child:
                child.set_attribute("tailscope.role", "prefill")
            expected[format(span.get_span_context().span_id, "016x")] = 10 + i
    assert provider.force_flush(30_000)
    provider.shutdown()

    rows = srv.sql(
        "SELECT span_id, trace_id, service_name, service_instance_id, host_name, role, model, input_tokens, kind, "
        "json_extract_string(attributes, '$.\"custom.thing\"') FROM spans WHERE name = 'llm_request'"
    )
    assert len(rows) == 150
    got = {r[0]: r for r in rows}
    assert set(got) == set(expected)
    for span_id, tokens in expected.items():
        r = got[span_id]
        assert re.fullmatch(r"[0-9a-f]{32}", r[1])
        assert r[2:8] == ("chat-api", "replica-7", "node-b", "request", "llama-3-8b", tokens)
        assert r[9] == f"v{tokens - 10}"
    assert_json_valid(srv)
    children = srv.sql("SELECT count(*) FROM spans s JOIN spans p ON s.parent_span_id = p.span_id WHERE s.role = 'prefill'")
    assert children == [(150,)]
    # Bookkeeping: one ingest_batches row per accepted request, items add up.
    assert srv.sql("SELECT sum(items) FROM ingest_batches WHERE signal = 'traces'") == [(300,)]


def test_protobuf_response_and_all_three_signals(make_server):
    srv = make_server()
    req, ids = request_spans(25)
    r = httpx.post(srv.url + "/v1/traces", content=req.SerializeToString(), headers=PB, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/x-protobuf"
    resp = ExportTraceServiceResponse.FromString(r.content)
    assert resp.partial_success.rejected_spans == 0

    r = httpx.post(srv.url + "/v1/metrics", content=metrics_request(3).SerializeToString(), headers=PB, timeout=10)
    assert r.status_code == 200, r.text
    assert ExportMetricsServiceResponse.FromString(r.content).partial_success.rejected_data_points == 0

    r = httpx.post(srv.url + "/v1/logs", content=logs_request(2).SerializeToString(), headers=PB, timeout=10)
    assert r.status_code == 200, r.text
    assert ExportLogsServiceResponse.FromString(r.content).partial_success.rejected_log_records == 0

    assert srv.sql("SELECT count(*) FROM spans") == [(25,)]
    assert srv.sql("SELECT count(*), min(gpu_index), max(gpu_index) FROM metrics WHERE name = 'tailscope.gpu.utilization'") == [(3, 0, 2)]
    assert srv.sql("SELECT count(*) FROM logs WHERE event_name = 'tailscope.kv.eviction' AND kv_reason = 'capacity'") == [(2,)]
    stored = {r[0] for r in srv.sql("SELECT span_id FROM spans")}
    assert stored == set(ids)
    assert_json_valid(srv)


def test_gzip_protobuf_is_accepted(make_server):
    srv = make_server()
    req, ids = request_spans(40)
    body = gzip.compress(req.SerializeToString())
    r = httpx.post(srv.url + "/v1/traces", content=body, headers={**PB, "content-encoding": "gzip"}, timeout=10)
    assert r.status_code == 200, r.text
    assert srv.sql("SELECT count(*) FROM spans") == [(40,)]


def test_otlp_json_examples_from_the_spec_repo(make_server, shared_data: Path):
    """The opentelemetry-proto examples, posted verbatim as OTLP/JSON (uppercase hex ids, string int64s)."""
    srv = make_server()
    for signal, name in (("traces", "trace.json"), ("metrics", "metrics.json"), ("logs", "logs.json")):
        body = (shared_data / "otlp" / name).read_bytes()
        r = httpx.post(srv.url + f"/v1/{signal}", content=body, headers={"content-type": "application/json"}, timeout=10)
        assert r.status_code == 200, (signal, r.text)
        assert r.headers["content-type"] == "application/json"
        assert isinstance(r.json(), dict)
    doc = json.loads((shared_data / "otlp" / "trace.json").read_text())
    span = doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    rows = srv.sql("SELECT trace_id, span_id, parent_span_id FROM spans")
    assert rows == [(span["traceId"].lower(), span["spanId"].lower(), span["parentSpanId"].lower())]
    assert srv.sql("SELECT count(*) FROM logs")[0][0] >= 1
    assert srv.sql("SELECT count(DISTINCT name) FROM metrics")[0][0] >= 3
    assert_json_valid(srv)


def test_partial_success_reports_rejected_spans(make_server):
    """A span with a wrong-length id is dropped and counted; the rest of the request is stored."""
    srv = make_server()
    req, ids = request_spans(5)
    bad = req.resource_spans[0].scope_spans[0].spans[2]
    bad.span_id = b"\x01\x02\x03"  # 3 bytes: not a span id
    r = httpx.post(srv.url + "/v1/traces", content=req.SerializeToString(), headers=PB, timeout=10)
    assert r.status_code == 200, r.text
    resp = ExportTraceServiceResponse.FromString(r.content)
    assert resp.partial_success.rejected_spans == 1
    assert resp.partial_success.error_message
    stored = {row[0] for row in srv.sql("SELECT span_id FROM spans")}
    assert stored == set(ids) - {ids[2]}

    # The same through OTLP/JSON: the response is JSON with camelCase partialSuccess.
    doc = {
        "resourceSpans": [
            {
                "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "j"}}]},
                "scopeSpans": [
                    {
                        "spans": [
                            {"traceId": "0af7651916cd43dd8448eb211c80319c", "spanId": "b7ad6b7169203331", "name": "ok",
                             "startTimeUnixNano": "1700000000000000000", "endTimeUnixNano": "1700000001000000000"},
                            {"traceId": "00000000000000000000000000000000", "spanId": "b7ad6b7169203332", "name": "zero-trace-id",
                             "startTimeUnixNano": "1700000000000000000", "endTimeUnixNano": "1700000001000000000"},
                        ]
                    }
                ],
            }
        ]
    }
    r = httpx.post(srv.url + "/v1/traces", json=doc, timeout=10)
    assert r.status_code == 200, r.text
    body = r.json()
    assert int(body["partialSuccess"]["rejectedSpans"]) == 1
    assert body["partialSuccess"]["errorMessage"]
    assert srv.sql("SELECT count(*) FROM spans WHERE service_name = 'j'") == [(1,)]


def _metric_values(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_metrics_endpoint_counts_ingest(make_server):
    srv = make_server(queue_max_spans=5000)
    req, _ = request_spans(30)
    body = req.SerializeToString()
    assert httpx.post(srv.url + "/v1/traces", content=body, headers=PB, timeout=10).status_code == 200
    assert httpx.post(srv.url + "/v1/traces", content=b"\xff\xff garbage", headers=PB, timeout=10).status_code == 400
    r = httpx.get(srv.url + "/metrics", timeout=10)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    m = _metric_values(r.text)
    assert m['tailscope_ingest_received_items_total{signal="traces"}'] == 30
    assert m['tailscope_ingest_stored_items_total{signal="traces"}'] == 30
    assert m['tailscope_ingest_requests_total{signal="traces",transport="http",status="200"}'] == 1
    assert m['tailscope_ingest_requests_total{signal="traces",transport="http",status="400"}'] == 1
    assert m['tailscope_ingest_received_bytes_total{signal="traces",transport="http"}'] == len(body) + len(b"\xff\xff garbage")
    assert m["tailscope_ingest_queue_capacity_items"] == 5000
    assert m["tailscope_ingest_queue_items"] == 0
    assert m["tailscope_ingest_commits_total"] >= 1
    assert m['tailscope_ingest_flush_seconds_bucket{le="+Inf"}'] == m["tailscope_ingest_commits_total"]
    assert m["tailscope_ingest_ack_wait_seconds_count"] == 1
    assert m["tailscope_ingest_decode_seconds_count"] == 2  # the garbage body was decoded too (and refused)
    assert "tailscope_ingest_responses_429_total" in r.text


def test_metrics_endpoint_leaks_no_token(make_server):
    srv = make_server(tokens="s3cret-token-value")
    text = httpx.get(srv.url + "/metrics", timeout=10).text
    assert "s3cret" not in text


def test_empty_requests_are_ok(make_server):
    srv = make_server()
    for signal in ("traces", "metrics", "logs"):
        r = httpx.post(srv.url + f"/v1/{signal}", content=b"", headers=PB, timeout=10)
        assert r.status_code == 200, (signal, r.text)
    assert srv.sql("SELECT count(*) FROM ingest_batches") == [(0,)]


@pytest.mark.slow
def test_decoding_in_worker_processes(make_server):
    """decode_workers > 0: bodies are decoded in a process pool; errors cross the process boundary intact."""
    srv = make_server(decode_workers=1)
    req, ids = request_spans(30)
    r = httpx.post(srv.url + "/v1/traces", content=gzip.compress(req.SerializeToString()), headers={**PB, "content-encoding": "gzip"}, timeout=60)
    assert r.status_code == 200, r.text
    r = httpx.post(srv.url + "/v1/traces", content=b"\xff\xff garbage", headers=PB, timeout=60)
    assert r.status_code == 400 and "invalid OTLP protobuf" in r.json()["error"]
    r = httpx.post(srv.url + "/v1/traces", content=b"{}", headers={"content-type": "text/csv"}, timeout=60)
    assert r.status_code == 415
    assert {row[0] for row in srv.sql("SELECT span_id FROM spans")} == set(ids)

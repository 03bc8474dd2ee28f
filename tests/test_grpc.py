"""OTLP/gRPC receiver: the stock gRPC exporter, auth metadata, status codes, gzip."""

from __future__ import annotations

import grpc
import pytest
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from conftest import free_port
from ingest_payloads import logs_request, metrics_request, request_spans

TRACE_EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


def _export(channel: grpc.Channel, path: str, request, response_cls, **kw):
    call = channel.unary_unary(path, request_serializer=lambda m: m.SerializeToString(), response_deserializer=response_cls.FromString)
    return call(request, timeout=30, **kw)


@pytest.fixture
def grpc_server(make_server):
    def factory(**settings):
        srv = make_server(grpc_port=free_port(), **settings)
        assert srv.server.parts["grpc"].port == srv.grpc_port
        return srv

    return factory


def test_stock_otel_grpc_exporter_spans_are_stored(grpc_server):
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.trace import SpanKind

    srv = grpc_server(tokens="grpc-token")
    provider = TracerProvider(resource=Resource.create({"service.name": "vllm", "service.instance.id": "vllm-0"}))
    exporter = OTLPSpanExporter(
        endpoint=f"127.0.0.1:{srv.grpc_port}", insecure=True, headers={"authorization": "Bearer grpc-token"}, timeout=20
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    tracer = provider.get_tracer("tests.grpc")
    ids = set()
    for i in range(40):
        with tracer.start_as_current_span("llm_request", kind=SpanKind.SERVER) as span:
            span.set_attribute("gen_ai.usage.prompt_tokens", i)
            span.set_attribute("gen_ai.request.id", f"cmpl-{i}")
            ids.add(format(span.get_span_context().span_id, "016x"))
    assert provider.force_flush(30_000)
    provider.shutdown()
    rows = srv.sql("SELECT span_id, service_name, input_tokens, request_id, kind FROM spans")
    assert {r[0] for r in rows} == ids
    assert all(r[1] == "vllm" and r[3] == f"cmpl-{r[2]}" for r in rows)
    text = __import__("httpx").get(srv.url + "/metrics", timeout=10).text
    assert 'tailscope_ingest_requests_total{signal="traces",transport="grpc",status="OK"}' in text


def test_all_signals_gzip_and_status_codes(grpc_server):
    srv = grpc_server(tokens="t1")
    auth = (("authorization", "Bearer t1"),)
    with grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch:
        req, ids = request_spans(12)
        resp = _export(ch, TRACE_EXPORT, req, trace_service_pb2.ExportTraceServiceResponse, metadata=auth, compression=grpc.Compression.Gzip)
        assert resp.partial_success.rejected_spans == 0
        _export(ch, "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export", metrics_request(2),
                metrics_service_pb2.ExportMetricsServiceResponse, metadata=auth)
        _export(ch, "/opentelemetry.proto.collector.logs.v1.LogsService/Export", logs_request(3),
                logs_service_pb2.ExportLogsServiceResponse, metadata=auth)

        with pytest.raises(grpc.RpcError) as exc:
            _export(ch, TRACE_EXPORT, req, trace_service_pb2.ExportTraceServiceResponse)
        assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as exc:
            _export(ch, TRACE_EXPORT, req, trace_service_pb2.ExportTraceServiceResponse, metadata=(("authorization", "Bearer nope"),))
        assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED

        garbage = ch.unary_unary(TRACE_EXPORT, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as exc:
            garbage(b"\x0a\xff\xff\xff\xff\x0f not protobuf", timeout=10, metadata=auth)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "invalid OTLP protobuf" in exc.value.details()

        # Partial success: one span with a 3-byte id is rejected, the rest stored.
        req2, ids2 = request_spans(4)
        req2.resource_spans[0].scope_spans[0].spans[0].span_id = b"abc"
        resp = _export(ch, TRACE_EXPORT, req2, trace_service_pb2.ExportTraceServiceResponse, metadata=auth)
        assert resp.partial_success.rejected_spans == 1

    assert {r[0] for r in srv.sql("SELECT span_id FROM spans")} == set(ids) | set(ids2[1:])
    assert srv.sql("SELECT count(*) FROM metrics") == [(2,)]
    assert srv.sql("SELECT count(*) FROM logs") == [(3,)]


def test_over_size_limit_is_resource_exhausted(grpc_server):
    srv = grpc_server(max_body_bytes=20_000)
    with grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch:
        req, _ = request_spans(300)
        with pytest.raises(grpc.RpcError) as exc:
            _export(ch, TRACE_EXPORT, req, trace_service_pb2.ExportTraceServiceResponse)
        assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        small, ids = request_spans(5)
        _export(ch, TRACE_EXPORT, small, trace_service_pb2.ExportTraceServiceResponse)
    assert {r[0] for r in srv.sql("SELECT span_id FROM spans")} == set(ids)


def test_full_queue_is_resource_exhausted_with_retry_info(grpc_server):
    from google.rpc.error_details_pb2 import RetryInfo

    srv = grpc_server(queue_max_spans=100, retry_after_s=3)
    ingest = srv.server.parts["ingest"]
    import threading

    with grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch:
        first, first_ids = request_spans(100)
        result: list = []
        with srv.store._write_lock:  # the writer cannot commit: the queue stays full
            t = threading.Thread(target=lambda: result.append(_export(ch, TRACE_EXPORT, first, trace_service_pb2.ExportTraceServiceResponse)))
            t.start()
            for _ in range(600):
                if ingest.depth >= 100:
                    break
                t.join(0.05)
            assert ingest.depth == 100
            with pytest.raises(grpc.RpcError) as exc:
                _export(ch, TRACE_EXPORT, request_spans(5)[0], trace_service_pb2.ExportTraceServiceResponse)
            assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            trailer = dict(exc.value.trailing_metadata())["google.rpc.retryinfo-bin"]
            assert RetryInfo.FromString(trailer).retry_delay.seconds == 3
        t.join(30)
        assert len(result) == 1
    assert {r[0] for r in srv.sql("SELECT span_id FROM spans")} == set(first_ids)


def test_port_zero_picks_a_free_port(tmp_path):
    from collector.ingest import Ingest
    from collector.grpc_server import GrpcReceiver
    from collector.store import Store
    from tailscope.config import load

    config = load({"db": str(tmp_path / "g.duckdb"), "grpc_port": 0}, environ={})
    store = Store(config.db)
    ingest = Ingest(store, config)
    ingest.start()
    receiver = GrpcReceiver(ingest, config)
    receiver.start()
    try:
        assert receiver.port and receiver.port > 0
        with grpc.insecure_channel(f"127.0.0.1:{receiver.port}") as ch:
            _export(ch, TRACE_EXPORT, request_spans(3)[0], trace_service_pb2.ExportTraceServiceResponse)
    finally:
        receiver.stop()
        ingest.stop()
        store.close()

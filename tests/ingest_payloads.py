"""OTLP request builders for the ingest tests (protobuf messages from opentelemetry-proto).

Each span gets a unique, known span id so a test can check exactly which
acknowledged spans reached the store.
"""

from __future__ import annotations

import itertools
import os
import time

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

_counter = itertools.count(1)


def kv(key: str, value: object) -> KeyValue:
    if isinstance(value, bool):
        return KeyValue(key=key, value=AnyValue(bool_value=value))
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    if isinstance(value, float):
        return KeyValue(key=key, value=AnyValue(double_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=str(value)))


def set_any_value(value: AnyValue, v: object) -> None:
    """Fill an OTLP ``AnyValue`` from a Python value (scalars, bytes, nested lists and dicts)."""
    if isinstance(v, bool):
        value.bool_value = v
    elif isinstance(v, int):
        value.int_value = v
    elif isinstance(v, float):
        value.double_value = v
    elif isinstance(v, str):
        value.string_value = v
    elif isinstance(v, bytes):
        value.bytes_value = v
    elif isinstance(v, list):
        value.array_value.SetInParent()
        for x in v:
            set_any_value(value.array_value.values.add(), x)
    elif isinstance(v, dict):
        value.kvlist_value.SetInParent()
        for k, x in v.items():
            set_any_value(value.kvlist_value.values.add(key=k).value, x)
    elif v is not None:
        raise TypeError(v)


def unique_span_id() -> bytes:
    """8 bytes: a per-process prefix and a counter, never zero, never repeated in a run."""
    return (os.getpid() & 0xFFFF).to_bytes(2, "big") + next(_counter).to_bytes(6, "big")


def request_spans(n: int, *, service: str = "chat-api", instance: str = "replica-0", start_ns: int | None = None) -> tuple[ExportTraceServiceRequest, list[str]]:
    """``n`` spec-shaped request spans (about 12 attributes each); returns the request and the span ids (hex)."""
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.extend(
        [kv("service.name", service), kv("service.instance.id", instance), kv("host.name", "node-a"), kv("process.pid", 4242)]
    )
    ss = rs.scope_spans.add()
    ss.scope.name = "tests.ingest"
    t0 = start_ns if start_ns is not None else time.time_ns() - 5_000_000_000
    ids: list[str] = []
    for i in range(n):
        sid = unique_span_id()
        ids.append(sid.hex())
        sp = ss.spans.add()
        sp.trace_id = os.urandom(16)
        sp.span_id = sid
        sp.name = "llm_request"
        sp.kind = Span.SPAN_KIND_SERVER
        sp.start_time_unix_nano = t0 + i * 1000
        sp.end_time_unix_nano = t0 + i * 1000 + 250_000_000
        sp.attributes.extend(
            [
                kv("tailscope.role", "request"),
                kv("gen_ai.request.model", "llama-3-8b"),
                kv("gen_ai.usage.input_tokens", 100 + i % 900),
                kv("gen_ai.usage.output_tokens", 20 + i % 200),
                kv("gen_ai.latency.time_in_queue", 0.01),
                kv("gen_ai.latency.time_to_first_token", 0.05),
                kv("gen_ai.latency.e2e", 0.25),
                kv("gen_ai.request.id", f"req-{sid.hex()}"),
                kv("session.id", f"s-{i % 50}"),
                kv("tailscope.shape.len", 128),
                kv("tailscope.batch.id", f"b-{i // 8}"),
                kv("tailscope.gpu.index", i % 8),
            ]
        )
    return req, ids


def metrics_request(points: int = 3) -> ExportMetricsServiceRequest:
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    rm.resource.attributes.extend([kv("service.name", "node-agent"), kv("host.name", "node-a")])
    m = rm.scope_metrics.add().metrics.add()
    m.name = "tailscope.gpu.utilization"
    m.unit = "1"
    now = time.time_ns()
    for i in range(points):
        p = m.gauge.data_points.add()
        p.time_unix_nano = now - i * 1_000_000_000
        p.as_double = 0.5
        p.attributes.extend([kv("gpu.index", i), kv("gpu.uuid", f"GPU-{i}"), kv("gpu.name", "H100")])
    return req


def logs_request(records: int = 2) -> ExportLogsServiceRequest:
    req = ExportLogsServiceRequest()
    rl = req.resource_logs.add()
    rl.resource.attributes.extend([kv("service.name", "chat-api"), kv("service.instance.id", "replica-0")])
    sl = rl.scope_logs.add()
    now = time.time_ns()
    for i in range(records):
        r = sl.log_records.add()
        r.time_unix_nano = now - i * 1000
        r.event_name = "tailscope.kv.eviction"
        r.attributes.extend([kv("tailscope.kv.blocks", 4 + i), kv("tailscope.kv.reason", "capacity")])
    return req


def varint(n: int) -> bytes:
    """A non-negative integer as a protobuf base-128 varint (for hand-built wire bytes)."""
    out = b""
    while n >= 0x80:
        out += bytes([n & 0x7F | 0x80])
        n >>= 7
    return out + bytes([n])


def mutate(body: bytes, edits: list[tuple[int, int, str]]) -> bytes:
    """Apply (position, byte, op) edits — r(eplace), i(nsert), d(elete) — to a body; positions wrap."""
    b = bytearray(body)
    for pos, byte, op in edits:
        pos %= len(b) + 1
        if op == "r" and pos < len(b):
            b[pos] = byte
        elif op == "i":
            b.insert(pos, byte)
        elif op == "d" and pos < len(b):
            del b[pos]
    return bytes(b)

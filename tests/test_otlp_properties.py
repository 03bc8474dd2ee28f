"""Property tests for the OTLP decoders (hypothesis).

1. Whatever the bytes, the decoders answer with a result or BadPayload /
   PayloadTooLarge — never another exception (random bytes, mutated valid
   bodies of every signal, arbitrary JSON, OTLP-shaped JSON with random leaves).
2. Random valid spans round-trip ids, times, names and attributes, and the
   protobuf and OTLP/JSON encodings of the same request decode to the same rows.
   No attribute is lost: every key/value sent (span and resource) is in the
   JSON column or, with its own type, in its typed column — and not in both.
"""

from __future__ import annotations

import base64
import gzip
import json
import math
from datetime import datetime, timezone
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from collector.attributes import Lifter
from collector.otlp import JSON, PROTOBUF, RESOURCE_LIFTER, SPAN_LIFTER, decode, decompress
from collector.otlp_json import to_otlp_json
from tailscope.errors import BadPayload, PayloadTooLarge

from ingest_payloads import mutate, set_any_value

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SLOW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

SIGNALS = ("traces", "metrics", "logs")
MIN_NS, MAX_NS = 86_400 * 10**9, 7_258_118_400 * 10**9
KNOWN_KEYS = ("tailscope.role", "gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens", "gen_ai.latency.e2e",
              "tailscope.gpu.index", "gen_ai.request.model", "gen_ai.response.model", "tailscope.batch.id", "session.id")
RESOURCE_KEYS = ("service.name", "service.instance.id", "host.name", "process.pid", "tailscope.pool")


def survives(signal: str, body: bytes, content_type: str) -> None:
    try:
        d = decode(signal, body, content_type)
    except (BadPayload, PayloadTooLarge):
        return
    assert d.accepted + d.rejected >= 0
    for table in d.tables.values():
        for text in table.column("attributes").to_pylist():
            json.loads(text)  # always valid JSON


# ------------------------------------------------------------ 1. never crashes


@FAST
@given(st.sampled_from(SIGNALS), st.binary(max_size=400))
def test_arbitrary_bytes_as_protobuf(signal: str, body: bytes) -> None:
    survives(signal, body, PROTOBUF)


@FAST
@given(st.sampled_from(SIGNALS), st.binary(max_size=200))
def test_arbitrary_bytes_as_json(signal: str, body: bytes) -> None:
    survives(signal, body, JSON)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)


@FAST
@given(st.sampled_from(SIGNALS), json_values)
def test_arbitrary_json(signal: str, doc: Any) -> None:
    survives(signal, json.dumps(doc).encode(), JSON)


def _leaf() -> st.SearchStrategy[Any]:
    return st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats() | st.text(max_size=40) | st.sampled_from(
        ["", "00" * 16, "00" * 8, "AB" * 16, "ab" * 8, "-1", "NaN", "SPAN_KIND_SERVER", "1544712660000000000", "1e400"])


def _mostly(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Usually a valid value for the field, sometimes anything."""
    junk = _leaf()
    return st.integers(0, 9).flatmap(lambda i: junk if i == 5 else valid)


def _otlp_shaped(signal: str) -> st.SearchStrategy[dict[str, Any]]:
    """OTLP/JSON skeletons whose fields mostly hold valid values, sometimes junk of any type."""
    time = _mostly(st.integers(MIN_NS, MAX_NS).map(str) | st.integers(MIN_NS, MAX_NS))
    tid = _mostly(st.binary(min_size=16, max_size=16).map(bytes.hex))
    sid = _mostly(st.binary(min_size=8, max_size=8).map(bytes.hex))
    num = _mostly(st.integers(0, 1000) | st.integers(0, 1000).map(str))
    dbl = _mostly(st.floats(allow_nan=False) | st.sampled_from(["NaN", "Infinity", "-Infinity"]))
    text = _mostly(st.text(max_size=20))
    scalar_value = st.one_of(
        st.fixed_dictionaries({"stringValue": text}), st.fixed_dictionaries({"intValue": num}),
        st.fixed_dictionaries({"doubleValue": dbl}), st.fixed_dictionaries({"boolValue": _mostly(st.booleans())}),
        st.fixed_dictionaries({"bytesValue": _mostly(st.binary(max_size=6).map(lambda b: base64.b64encode(b).decode()))}),
        st.fixed_dictionaries({}))
    anyvalue = st.recursive(
        scalar_value,
        lambda inner: st.fixed_dictionaries({"arrayValue": st.fixed_dictionaries({"values": st.lists(inner, max_size=3)})})
        | st.fixed_dictionaries({"kvlistValue": st.fixed_dictionaries({"values": st.lists(
            st.fixed_dictionaries({"key": st.text(max_size=5), "value": inner}), max_size=3)})}),
        max_leaves=6,
    )
    attrs = _mostly(st.lists(st.fixed_dictionaries({"key": _mostly(st.sampled_from(KNOWN_KEYS) | st.text(max_size=8)),
                                                    "value": _mostly(anyvalue)}), max_size=4))
    kv = {"attributes": attrs}
    point = st.fixed_dictionaries({"timeUnixNano": time}, optional={
        "startTimeUnixNano": time, "asDouble": dbl, "asInt": num, "count": num, "sum": dbl,
        "bucketCounts": _mostly(st.lists(num, max_size=3)), "explicitBounds": _mostly(st.lists(dbl, max_size=3)),
        "quantileValues": _mostly(st.lists(st.fixed_dictionaries({"quantile": dbl, "value": dbl}), max_size=2)),
        "positive": _mostly(st.fixed_dictionaries({"offset": num, "bucketCounts": st.lists(num, max_size=2)})),
        "scale": num, "zeroCount": num, **kv})
    data = st.fixed_dictionaries({"dataPoints": _mostly(st.lists(point, max_size=3))},
                                 optional={"isMonotonic": _mostly(st.booleans()), "aggregationTemporality": _mostly(st.integers(0, 2))})
    fields = {
        "traces": {"traceId": tid, "spanId": sid, "parentSpanId": sid, "name": text, "kind": _mostly(st.integers(0, 5)),
                   "startTimeUnixNano": time, "endTimeUnixNano": time,
                   "status": _mostly(st.fixed_dictionaries({}, optional={"code": _mostly(st.integers(0, 2)), "message": text})),
                   "events": _mostly(st.lists(st.fixed_dictionaries({"name": text, "timeUnixNano": time}, optional=kv), max_size=2)),
                   "links": _mostly(st.lists(st.fixed_dictionaries({"traceId": tid, "spanId": sid}, optional=kv), max_size=2)), **kv},
        "logs": {"timeUnixNano": time, "observedTimeUnixNano": time, "eventName": text, "severityNumber": _mostly(st.integers(0, 24)),
                 "severityText": text, "body": _mostly(anyvalue), "traceId": tid, "spanId": sid, **kv},
        "metrics": {"name": text, "unit": text, "gauge": data, "sum": data, "histogram": data,
                    "exponentialHistogram": data, "summary": data},
    }[signal]
    required = {"traces": ("traceId", "spanId", "startTimeUnixNano", "endTimeUnixNano"), "logs": ("timeUnixNano",),
                "metrics": ("name",)}[signal]
    item = st.fixed_dictionaries({k: fields[k] for k in required}, optional={k: v for k, v in fields.items() if k not in required})
    list_key, scope_key, items_key = {
        "traces": ("resourceSpans", "scopeSpans", "spans"),
        "logs": ("resourceLogs", "scopeLogs", "logRecords"),
        "metrics": ("resourceMetrics", "scopeMetrics", "metrics"),
    }[signal]
    scope = st.fixed_dictionaries({items_key: _mostly(st.lists(item, max_size=3))},
                                  optional={"scope": _mostly(st.fixed_dictionaries({}, optional={"name": text}))})
    resource = st.fixed_dictionaries({scope_key: _mostly(st.lists(scope, max_size=2))},
                                     optional={"resource": _mostly(st.fixed_dictionaries({"attributes": attrs}))})
    return st.fixed_dictionaries({list_key: _mostly(st.lists(resource, max_size=2))})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_otlp_shaped_json_with_random_leaves(data: st.DataObject) -> None:
    signal = data.draw(st.sampled_from(SIGNALS))
    survives(signal, json.dumps(data.draw(_otlp_shaped(signal))).encode(), JSON)


def _valid_bodies() -> dict[str, bytes]:
    tr = ExportTraceServiceRequest()
    rs = tr.resource_spans.add()
    rs.resource.attributes.add(key="service.name").value.string_value = "svc"
    s = rs.scope_spans.add().spans.add(trace_id=b"\x01" * 16, span_id=b"\x02" * 8, name="x", kind=2,
                                        start_time_unix_nano=1_700_000_000 * 10**9, end_time_unix_nano=1_700_000_001 * 10**9)
    s.attributes.add(key="gen_ai.usage.input_tokens").value.int_value = 12
    s.attributes.add(key="tailscope.role").value.string_value = "request"
    s.attributes.add(key="d").value.double_value = 0.5
    s.attributes.add(key="a").value.array_value.values.add().bool_value = True
    s.events.add(name="e", time_unix_nano=1_700_000_000 * 10**9).attributes.add(key="k").value.int_value = 1
    s.links.add(trace_id=b"\x03" * 16, span_id=b"\x04" * 8)
    lg = ExportLogsServiceRequest()
    rec = lg.resource_logs.add().scope_logs.add().log_records.add(time_unix_nano=1_700_000_000 * 10**9, event_name="ev")
    rec.body.kvlist_value.values.add(key="k").value.string_value = "v"
    rec.attributes.add(key="tailscope.kv.blocks").value.int_value = 3
    me = ExportMetricsServiceRequest()
    ms = me.resource_metrics.add().scope_metrics.add()
    ms.metrics.add(name="g").gauge.data_points.add(time_unix_nano=1_700_000_000 * 10**9, as_double=1.0).attributes.add(key="gpu.index").value.int_value = 0
    ms.metrics.add(name="h").histogram.data_points.add(time_unix_nano=1_700_000_000 * 10**9, count=2, bucket_counts=[1, 1], explicit_bounds=[1.0])
    ms.metrics.add(name="s").summary.data_points.add(time_unix_nano=1_700_000_000 * 10**9, count=1).quantile_values.add(quantile=0.5, value=1)
    ms.metrics.add(name="x").exponential_histogram.data_points.add(time_unix_nano=1_700_000_000 * 10**9, count=1, scale=1)
    return {"traces": tr.SerializeToString(), "logs": lg.SerializeToString(), "metrics": me.SerializeToString()}


VALID = _valid_bodies()


@FAST
@given(st.sampled_from(SIGNALS), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255), st.sampled_from("rid")), min_size=1, max_size=4))
def test_mutated_protobuf_bodies(signal: str, edits: list[tuple[int, int, str]]) -> None:
    survives(signal, mutate(VALID[signal], edits), PROTOBUF)


@FAST
@given(st.sampled_from(SIGNALS), st.lists(st.tuples(st.integers(0, 10_000), st.characters(codec="utf-8")), min_size=1, max_size=3))
def test_mutated_json_bodies(signal: str, edits: list[tuple[int, str]]) -> None:
    cls = {"traces": ExportTraceServiceRequest, "logs": ExportLogsServiceRequest, "metrics": ExportMetricsServiceRequest}[signal]
    text = json.dumps(to_otlp_json(cls.FromString(VALID[signal])))
    for pos, ch in edits:
        pos %= len(text)
        text = text[:pos] + ch + text[pos + 1:]
    survives(signal, text.encode("utf-8", "surrogatepass"), JSON)


@FAST
@given(st.binary(max_size=300), st.sampled_from(["gzip", "deflate", "identity", None, "br"]))
def test_decompress_arbitrary_bytes(body: bytes, enc: str | None) -> None:
    try:
        decompress(body, enc, limit=1000)
    except (BadPayload, PayloadTooLarge):
        pass


@FAST
@given(st.binary(max_size=3000), st.integers(1, 4000))
def test_decompress_limit_is_exact(data: bytes, limit: int) -> None:
    body = gzip.compress(data)
    if len(data) <= limit:
        assert decompress(body, "gzip", limit=limit) == data
    else:
        try:
            decompress(body, "gzip", limit=limit)
            raise AssertionError("over the limit but accepted")
        except PayloadTooLarge:
            pass


# ---------------------------------------------------------- 2. valid spans round-trip


scalar = (
    st.text(max_size=30)
    | st.integers(-(1 << 63), (1 << 63) - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.booleans()
    | st.binary(max_size=10)
    | st.none()
)
attr_value = st.recursive(scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                          max_leaves=8)
attr_key = st.sampled_from(KNOWN_KEYS) | st.text(max_size=20) | st.text(min_size=120, max_size=140)


_set = set_any_value


def expected_json(v: Any) -> Any:
    """What the attributes JSON column must hold for a value."""
    if isinstance(v, float) and not math.isfinite(v):
        return "NaN" if v != v else ("Infinity" if v > 0 else "-Infinity")
    if isinstance(v, bytes):
        return base64.b64encode(v).decode()
    if isinstance(v, list):
        return [expected_json(x) for x in v]
    if isinstance(v, dict):
        return {k: expected_json(x) for k, x in v.items()}
    return v


def nonzero(n: int) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=n, max_size=n).filter(lambda b: any(b))


span_spec = st.fixed_dictionaries({
    "trace_id": nonzero(16),
    "span_id": nonzero(8),
    "parent": st.just(b"") | nonzero(8),
    "name": st.text(max_size=30),
    "kind": st.integers(0, 5),
    "start": st.integers(MIN_NS, MAX_NS - 10**12),
    "duration": st.integers(0, 10**12),
    "status": st.tuples(st.integers(0, 2), st.text(max_size=10)),
    "attrs": st.dictionaries(attr_key, attr_value, max_size=8),
})


def _same(a: Any, b: Any) -> bool:
    """Row equality where NaN equals NaN."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def assert_recoverable(row: dict[str, Any], sent: dict[str, Any], lifter: Lifter, json_column: str) -> None:
    """Every sent key/value is in the JSON column or, with its own type, in its
    typed column; the JSON column holds nothing that was not sent."""
    stored = json.loads(row[json_column])
    assert set(stored) <= set(sent), set(stored) - set(sent)
    column_of = {k: c.column for c in lifter.columns for k in c.keys}
    for k, v in sent.items():
        if k in stored:
            assert stored[k] == expected_json(v), (k, v, stored[k])
            continue
        assert k in column_of, f"{k!r} is neither in the JSON column nor a typed column's key"
        got = row[column_of[k]]
        want = expected_json(v) if isinstance(v, bytes) else v  # bytes are stored as base64 text everywhere
        assert type(got) is type(want) and _same(got, want), (k, v, got)


resource_attrs = st.dictionaries(st.sampled_from(RESOURCE_KEYS) | st.text(max_size=12), attr_value, max_size=5)


@SLOW
@given(st.lists(span_spec, min_size=1, max_size=6), resource_attrs)
def test_valid_spans_round_trip_and_encodings_agree(specs: list[dict[str, Any]], resource: dict[str, Any]) -> None:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    for k, v in resource.items():
        _set(rs.resource.attributes.add(key=k).value, v)
    spans = rs.scope_spans.add().spans
    for spec in specs:
        s = spans.add(trace_id=spec["trace_id"], span_id=spec["span_id"], parent_span_id=spec["parent"], name=spec["name"],
                      kind=spec["kind"], start_time_unix_nano=spec["start"], end_time_unix_nano=spec["start"] + spec["duration"])
        s.status.code, s.status.message = spec["status"]
        for k, v in spec["attrs"].items():
            _set(s.attributes.add(key=k).value, v)
    pb = decode("traces", req.SerializeToString(), PROTOBUF)
    js = decode("traces", json.dumps(to_otlp_json(req)).encode(), JSON)
    assert pb.accepted == js.accepted == len(specs) and pb.rejected == js.rejected == 0
    pb_rows, js_rows = pb.tables["spans"].to_pylist(), js.tables["spans"].to_pylist()
    for spec, row, other in zip(specs, pb_rows, js_rows):
        assert row.keys() == other.keys()
        for col in row:
            assert _same(row[col], other[col]), (col, row[col], other[col])
        assert row["trace_id"] == spec["trace_id"].hex() and row["span_id"] == spec["span_id"].hex()
        assert row["parent_span_id"] == (spec["parent"].hex() if spec["parent"] else None)
        assert row["name"] == spec["name"]
        start = datetime.fromtimestamp(spec["start"] // 1000 / 1e6, tz=timezone.utc).replace(tzinfo=None)
        assert abs((row["start_time"] - start).total_seconds()) < 1e-5
        assert row["duration_ms"] == spec["duration"] / 1e6
        assert_recoverable(row, spec["attrs"], SPAN_LIFTER, "attributes")
        assert_recoverable(row, resource, RESOURCE_LIFTER, "resource_attributes")
        role = spec["attrs"].get("tailscope.role")
        if isinstance(role, str):
            assert row["role"] == role
        tokens = spec["attrs"].get("gen_ai.usage.input_tokens")
        if type(tokens) is int:
            assert row["input_tokens"] == tokens

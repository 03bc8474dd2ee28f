"""OTLP decoders: spec examples, round trips, typed columns, item validation, bad bodies.

Requests are built with the stock opentelemetry-proto classes and encoded as
protobuf bytes and as OTLP/JSON, so both decoders see what real exporters send.
"""

from __future__ import annotations

import base64
import gzip
import json
import math
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from collector import otlp
from collector.otlp import PROTOBUF, JSON, UnsupportedMediaType, decode, decode_message, decompress
from collector.otlp_json import to_otlp_json
from tailscope.errors import BadPayload, PayloadTooLarge

from ingest_payloads import set_any_value, varint

T0 = 1_763_900_000_000_000_000  # 2025-11-23, ns
TID = bytes.fromhex("5b8efff798038103d269b633813fc60c")
SID = bytes.fromhex("eee19b7ec3c1b174")


_set = set_any_value


def add_attrs(target: Any, attrs: dict[str, Any]) -> None:
    for k, v in attrs.items():
        _set(target.add(key=k).value, v)


def trace_request(spans: list[dict[str, Any]], resource: dict[str, Any] | None = None) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    add_attrs(rs.resource.attributes, resource if resource is not None else {"service.name": "chat-api", "host.name": "node-1"})
    ss = rs.scope_spans.add()
    ss.scope.name = "test.scope"
    for i, spec in enumerate(spans):
        s = ss.spans.add()
        s.trace_id = spec.get("trace_id", TID)
        s.span_id = spec.get("span_id", (i + 1).to_bytes(8, "big"))
        if "parent" in spec:
            s.parent_span_id = spec["parent"]
        s.name = spec.get("name", "llm_request")
        s.kind = spec.get("kind", 2)
        s.start_time_unix_nano = spec.get("start", T0 + i * 1000)
        s.end_time_unix_nano = spec.get("end", s.start_time_unix_nano + 250_000_000)
        if "status" in spec:
            s.status.code, s.status.message = spec["status"]
        add_attrs(s.attributes, spec.get("attrs", {}))
        for ev in spec.get("events", []):
            e = s.events.add(name=ev["name"], time_unix_nano=ev["time"])
            add_attrs(e.attributes, ev.get("attrs", {}))
        for ln in spec.get("links", []):
            link = s.links.add(trace_id=ln["trace_id"], span_id=ln["span_id"])
            add_attrs(link.attributes, ln.get("attrs", {}))
    return req


def both(signal: str, req: Any, **kw: Any) -> tuple[otlp.Decoded, otlp.Decoded]:
    """Decode a request as protobuf and as OTLP/JSON; the tables must agree."""
    pb = decode(signal, req.SerializeToString(), PROTOBUF, **kw)
    js = decode(signal, json.dumps(to_otlp_json(req)).encode(), JSON, **kw)
    assert set(pb.tables) == set(js.tables)
    for name in pb.tables:
        assert pb.tables[name].to_pylist() == js.tables[name].to_pylist(), name
    assert (pb.accepted, pb.rejected, pb.truncated_values) == (js.accepted, js.rejected, js.truncated_values)
    return pb, js


def rows(d: otlp.Decoded, table: str) -> list[dict[str, Any]]:
    return d.tables[table].to_pylist()


# ------------------------------------------------------------------ spec examples


def read(shared_data: Path, name: str) -> bytes:
    return (shared_data / "otlp" / name).read_bytes()


def test_spec_example_trace(shared_data: Path) -> None:
    d = decode("traces", read(shared_data, "trace.json"), "application/json; charset=utf-8")
    assert (d.accepted, d.rejected, d.errors) == (1, 0, [])
    (span,) = rows(d, "spans")
    assert span["trace_id"] == "5b8efff798038103d269b633813fc60c"  # uppercase hex in, lowercase out
    assert span["span_id"] == "eee19b7ec3c1b174"
    assert span["parent_span_id"] == "eee19b7ec3c1b173"
    assert span["kind"] == "SERVER" and span["status_code"] == "UNSET"
    assert span["start_time"].isoformat() == "2018-12-13T14:51:00"
    assert span["duration_ms"] == 1000.0
    assert span["service_name"] == "my.service" and span["scope_name"] == "my.library"
    assert json.loads(span["attributes"]) == {"my.span.attr": "some value"}
    assert json.loads(span["resource_attributes"]) == {}  # service.name is in its column
    assert span["role"] is None  # has a parent: not a request span


def test_spec_example_logs(shared_data: Path) -> None:
    d = decode("logs", read(shared_data, "logs.json"), JSON)
    (rec,) = rows(d, "logs")
    assert rec["body"] == "Example log record"
    assert rec["severity_number"] == 10 and rec["severity_text"] == "Information"
    assert rec["trace_id"] == "5b8efff798038103d269b633813fc60c" and rec["span_id"] == "eee19b7ec3c1b174"
    assert json.loads(rec["attributes"]) == {
        "string.attribute": "some string", "boolean.attribute": True, "int.attribute": 10,
        "double.attribute": 637.704, "array.attribute": ["many", "values"],
        "map.attribute": {"some.map.key": "some value"},
    }
    assert rec["time"].isoformat() == "2018-12-13T14:51:00.300000"


def test_spec_example_events(shared_data: Path) -> None:
    d = decode("logs", read(shared_data, "events.json"), JSON)
    (rec,) = rows(d, "logs")
    assert rec["event_name"] == "browser.page_view"
    body = json.loads(rec["body"])
    assert body["type"] == 0 and body["title"] == "Free Online GUID Generator"
    assert rec["trace_id"] is None


def test_spec_example_metrics(shared_data: Path) -> None:
    d = decode("metrics", read(shared_data, "metrics.json"), JSON)
    assert (d.accepted, d.rejected) == (4, 0)
    by_name = {r["name"]: r for r in rows(d, "metrics")}
    counter = by_name["my.counter"]
    assert (counter["type"], counter["value"], counter["is_monotonic"]) == ("sum", 5.0, True)
    assert json.loads(counter["attributes"])["_temporality"] == "DELTA"
    assert (by_name["my.gauge"]["type"], by_name["my.gauge"]["value"]) == ("gauge", 10.0)
    hist = by_name["my.histogram"]
    assert (hist["count"], hist["sum"], hist["bucket_counts"], hist["explicit_bounds"]) == (2, 2.0, [1, 1], [1.0])
    exp = by_name["my.exponential.histogram"]
    assert (exp["type"], exp["count"], exp["sum"]) == ("exponential_histogram", 3, 10.0)
    extra = json.loads(exp["attributes"])
    assert extra["_scale"] == 0 and extra["_zero_count"] == 1 and extra["_positive"] == {"offset": 1, "bucket_counts": [0, 2]}


# ------------------------------------------------------------------ round trips


REQUEST_ATTRS = {
    "tailscope.role": "request",
    "gen_ai.request.model": "llama-3-8b",
    "gen_ai.usage.input_tokens": 812,
    "gen_ai.usage.output_tokens": 64,
    "gen_ai.latency.time_in_queue": 0.125,
    "gen_ai.latency.time_to_first_token": 0.5,
    "gen_ai.request.id": "cmpl-1",
    "session.id": "s-9",
    "tailscope.shape.len": 1024,
    "tailscope.batch.id": "b-7",
    "tailscope.gpu.index": 3,
    "tailscope.priority": "interactive",
}


def test_spans_round_trip_with_typed_columns() -> None:
    odd = {
        "neg": -5, "big": -(1 << 63), "max": (1 << 63) - 1, "t": True, "f": False, "pi": 3.25, "whole": 5.0,
        "quote": 'say "hi"\n\\', "uni": "héllo ✓", "blob": b"\x00\x01", "arr": [1, "a", [2.5]],
        "map": {"k": {"n": None}}, "empty": None, "long": "x" * 300, "k" * 200: "long key",
    }
    req = trace_request([
        {"attrs": REQUEST_ATTRS, "status": (2, "boom"),
         "events": [{"name": "first_token", "time": T0 + 5, "attrs": {"n": 1}}],
         "links": [{"trace_id": b"\x01" * 16, "span_id": b"\x02" * 8, "attrs": {"why": "batch"}}]},
        {"parent": SID, "kind": 1, "name": "prefill", "attrs": {"tailscope.role": "prefill", **odd}},
    ], resource={"service.name": "chat-api", "service.instance.id": "replica-3", "host.name": "gpu-1",
                 "process.pid": 4242, "tailscope.pool": "realtime", "extra.res": [1, 2]})
    d, _ = both("traces", req)
    assert (d.accepted, d.rejected, d.errors) == (2, 0, [])
    root, child = rows(d, "spans")
    assert root["role"] == "request" and root["model"] == "llama-3-8b"
    assert (root["input_tokens"], root["output_tokens"], root["shape_len"], root["gpu_index"]) == (812, 64, 1024, 3)
    assert (root["time_in_queue_s"], root["ttft_s"]) == (0.125, 0.5)
    assert (root["request_id"], root["session_id"], root["batch_id"], root["priority"]) == ("cmpl-1", "s-9", "b-7", "interactive")
    assert (root["status_code"], root["status_message"], root["kind"]) == ("ERROR", "boom", "SERVER")
    assert json.loads(root["attributes"]) == {}  # every request attribute has its typed column
    assert (root["service_name"], root["service_instance_id"], root["host_name"], root["process_pid"], root["pool"]) == (
        "chat-api", "replica-3", "gpu-1", 4242, "realtime")
    assert json.loads(root["resource_attributes"]) == {"extra.res": [1, 2]}
    assert child["parent_span_id"] == SID.hex() and child["kind"] == "INTERNAL" and child["role"] == "prefill"
    attrs = json.loads(child["attributes"])
    expected = dict(odd, blob=base64.b64encode(b"\x00\x01").decode())  # tailscope.role is in `role`
    assert attrs == expected
    assert isinstance(attrs["whole"], float)
    (ev,) = rows(d, "span_events")
    assert (ev["trace_id"], ev["span_id"], ev["name"], json.loads(ev["attributes"])) == (TID.hex(), "0000000000000001", "first_token", {"n": 1})
    assert ev["service_name"] == "chat-api"
    (ln,) = rows(d, "span_links")
    assert (ln["linked_trace_id"], ln["linked_span_id"], json.loads(ln["attributes"])) == ("01" * 16, "02" * 8, {"why": "batch"})


def test_also_read_keys_and_wrong_types() -> None:
    req = trace_request([
        {"attrs": {"gen_ai.usage.prompt_tokens": 10, "gen_ai.usage.completion_tokens": 3, "gen_ai.response.model": "m2"}},
        {"attrs": {"gen_ai.usage.prompt_tokens": 10, "gen_ai.usage.input_tokens": 20,
                   "gen_ai.request.model": "m1", "gen_ai.response.model": "m2"}},
        {"attrs": {"gen_ai.usage.input_tokens": "abc", "tailscope.gpu.index": 1 << 40, "gen_ai.latency.e2e": "1.5",
                   "tailscope.shape.len": 12.0, "tailscope.batch.id": 77, "tailscope.priority": True}},
    ])
    d, _ = both("traces", req)
    a, b, c = rows(d, "spans")
    assert (a["input_tokens"], a["output_tokens"], a["model"]) == (10, 3, "m2")
    assert (b["input_tokens"], b["model"]) == (20, "m1")  # the first key wins whatever the order
    assert c["input_tokens"] is None and c["gpu_index"] is None and c["priority"] is None
    assert (c["e2e_s"], c["shape_len"], c["batch_id"]) == (1.5, 12, "77")
    assert json.loads(c["attributes"])["gen_ai.usage.input_tokens"] == "abc"  # kept in JSON
    # only values a column holds with their own type leave the JSON column: the
    # other also-read keys, wrong types and converted values stay
    assert json.loads(a["attributes"]) == {}
    assert json.loads(b["attributes"]) == {"gen_ai.usage.prompt_tokens": 10, "gen_ai.response.model": "m2"}
    assert json.loads(c["attributes"]) == {"gen_ai.usage.input_tokens": "abc", "tailscope.gpu.index": 1 << 40,
                                           "gen_ai.latency.e2e": "1.5", "tailscope.shape.len": 12.0,
                                           "tailscope.batch.id": 77, "tailscope.priority": True}


def test_role_of_vllm_llm_request() -> None:
    vllm = {"gen_ai.request.id": "r1", "gen_ai.usage.prompt_tokens": 5}
    req = trace_request([
        {"attrs": vllm},  # root SERVER with gen_ai.*: a request
        {"attrs": vllm, "parent": SID},  # has a parent
        {"attrs": vllm, "kind": 3},  # CLIENT
        {"attrs": {"http.method": "POST"}},  # no gen_ai.*
        {"attrs": dict(vllm, **{"tailscope.role": "batch"})},  # explicit role wins
    ])
    d, _ = both("traces", req)
    assert [r["role"] for r in rows(d, "spans")] == ["request", None, None, None, "batch"]


def test_invalid_spans_are_rejected_and_the_rest_kept() -> None:
    req = trace_request([
        {},
        {"trace_id": bytes(16)},
        {"span_id": bytes(8)},
        {"start": 0},
        {"start": T0, "end": T0 - 1},
        {"start": 7_258_118_400 * 10**9 + 1, "end": 7_258_118_400 * 10**9 + 2},
        {"start": 10**9, "end": 2 * 10**9},  # 1970-01-01: a clock that was never set
        {},
    ])
    d, _ = both("traces", req)
    assert (d.accepted, d.rejected) == (2, 6)
    msg = " | ".join(d.errors)
    assert "trace_id" in msg and "span_id" in msg and "end time before start" in msg and "outside" in msg
    # wrong-length ids exist only in protobuf (OTLP/JSON rejects them as a body error)
    bad = trace_request([{"trace_id": b"\x01" * 15}, {"span_id": b"\x01" * 9}, {"parent": b"\x01" * 3}, {}])
    d = decode("traces", bad.SerializeToString(), PROTOBUF)
    assert (d.accepted, d.rejected) == (1, 3)
    assert "parent_span_id" in " ".join(d.errors)


def test_events_and_links_of_rejected_spans_are_dropped() -> None:
    req = trace_request([
        {"trace_id": bytes(16), "events": [{"name": "e", "time": T0}]},
        {"events": [{"name": "ok", "time": T0}, {"name": "bad", "time": 5}],
         "links": [{"trace_id": bytes(16), "span_id": b"\x01" * 8}, {"trace_id": b"\x03" * 16, "span_id": b"\x04" * 8}]},
    ])
    d, _ = both("traces", req)
    assert [e["name"] for e in rows(d, "span_events")] == ["ok"]
    assert [ln["linked_trace_id"] for ln in rows(d, "span_links")] == ["03" * 16]
    assert any("span event" in e for e in d.errors) and any("span link" in e for e in d.errors)


def test_duplicate_keys_and_non_finite_doubles_give_valid_json() -> None:
    req = trace_request([{"attrs": {}}])
    s = req.resource_spans[0].scope_spans[0].spans[0]
    s.attributes.add(key="a").value.int_value = 1
    s.attributes.add(key="a").value.int_value = 2
    for key, x in (("nan", math.nan), ("inf", math.inf), ("ninf", -math.inf)):
        s.attributes.add(key=key).value.double_value = x
    d, _ = both("traces", req)
    assert json.loads(rows(d, "spans")[0]["attributes"]) == {"a": 2, "nan": "NaN", "inf": "Infinity", "ninf": "-Infinity"}


def test_repeated_lifted_key_leaves_the_json_only_if_the_column_took_its_last_copy() -> None:
    req = trace_request([{"attrs": {}}])
    s = req.resource_spans[0].scope_spans[0].spans[0]
    for v in ("early", "late"):
        s.attributes.add(key="tailscope.batch.id").value.string_value = v
    s.attributes.add(key="tailscope.shape.len").value.int_value = 7
    s.attributes.add(key="tailscope.shape.len").value.string_value = "x"  # last copy has the wrong type
    d, _ = both("traces", req)
    (span,) = rows(d, "spans")
    assert span["batch_id"] == "late"  # last value wins, as in the JSON object
    assert span["shape_len"] == 7
    assert json.loads(span["attributes"]) == {"tailscope.shape.len": "x"}  # the column did not take this copy


def test_long_values_are_truncated_and_counted() -> None:
    req = trace_request([{"name": "n" * 50, "attrs": {"big": "é" * 40, "small": "ok", "blob": b"\x07" * 64,
                                                       "nested": ["y" * 100], "K" * 50: {"L" * 40: 1}}}])
    d, _ = both("traces", req, max_attribute_bytes=32)
    span = rows(d, "spans")[0]
    attrs = json.loads(span["attributes"])
    assert attrs["big"] == "é" * 16 and attrs["small"] == "ok"  # cut on a character boundary
    assert attrs["nested"] == ["y" * 32] and len(base64.b64decode(attrs["blob"])) == 32
    assert span["name"] == "n" * 32
    assert attrs["K" * 32] == {"L" * 32: 1}  # keys are cut too
    assert d.truncated_values == 6


def test_megabyte_attribute_is_cut_to_the_default_limit() -> None:
    req = trace_request([{"attrs": {"huge": "z" * (1 << 20)}}])
    d = decode("traces", req.SerializeToString(), PROTOBUF)
    assert len(json.loads(rows(d, "spans")[0]["attributes"])["huge"]) == 65536
    assert d.truncated_values == 1


def test_decode_message_for_grpc() -> None:
    req = trace_request([{"attrs": REQUEST_ATTRS}])
    d = decode_message("traces", req)
    assert d.accepted == 1 and rows(d, "spans")[0]["model"] == "llama-3-8b"


def test_many_spans_and_resources() -> None:
    req = trace_request([{"attrs": dict(REQUEST_ATTRS, **{"gen_ai.request.id": f"r{i}"})} for i in range(300)])
    extra = trace_request([{"attrs": {"x": i}} for i in range(5)], resource={"service.name": "other"})
    req.resource_spans.extend(extra.resource_spans)
    d, _ = both("traces", req)
    spans = rows(d, "spans")
    assert len(spans) == 305
    assert [s["request_id"] for s in spans[:300]] == [f"r{i}" for i in range(300)]
    assert {s["service_name"] for s in spans[300:]} == {"other"}


# ---------------------------------------------------------------------- logs


def log_request(records: list[dict[str, Any]]) -> ExportLogsServiceRequest:
    req = ExportLogsServiceRequest()
    rl = req.resource_logs.add()
    add_attrs(rl.resource.attributes, {"service.name": "chat-api", "service.instance.id": "replica-1"})
    sl = rl.scope_logs.add()
    sl.scope.name = "tailscope"
    for spec in records:
        lr = sl.log_records.add()
        lr.time_unix_nano = spec.get("time", T0)
        lr.observed_time_unix_nano = spec.get("observed", 0)
        if "event_name" in spec:
            lr.event_name = spec["event_name"]
        lr.severity_number = spec.get("severity", 9)
        if "body" in spec:
            _set(lr.body, spec["body"])
        lr.trace_id = spec.get("trace_id", b"")
        lr.span_id = spec.get("span_id", b"")
        add_attrs(lr.attributes, spec.get("attrs", {}))
    return req


def test_logs_kv_events_and_time_fallback() -> None:
    req = log_request([
        {"attrs": {"event.name": "tailscope.kv.eviction", "tailscope.kv.blocks": 12, "tailscope.kv.reason": "capacity",
                   "tailscope.kv.victim_trace_id": TID.hex(), "tailscope.kv.usage": 0.75}, "body": "evicted"},
        {"event_name": "tailscope.gpu.xid", "attrs": {"gpu.index": 2, "tailscope.gpu.xid": 79}, "body": {"a": [1]},
         "trace_id": TID, "span_id": SID},
        {"time": 0, "observed": T0 + 7, "event_name": "tailscope.replica.ready",
         "attrs": {"tailscope.replica.load_seconds": 41.5}},
        {"time": 0, "observed": 0},
        {"trace_id": bytes(16)},
    ])
    d, _ = both("logs", req)
    assert (d.accepted, d.rejected) == (3, 2)
    ev, xid, ready = rows(d, "logs")
    assert (ev["event_name"], ev["kv_blocks"], ev["kv_reason"], ev["kv_usage"], ev["kv_victim_trace_id"]) == (
        "tailscope.kv.eviction", 12, "capacity", 0.75, TID.hex())
    assert ev["body"] == "evicted" and ev["service_instance_id"] == "replica-1"
    assert (xid["event_name"], xid["gpu_index"], xid["xid"], json.loads(xid["body"])) == ("tailscope.gpu.xid", 2, 79, {"a": [1]})
    assert (xid["trace_id"], xid["span_id"]) == (TID.hex(), SID.hex())
    assert ready["load_seconds"] == 41.5 and ready["observed_time"] == ready["time"]
    assert ready["time"].isoformat().startswith("2025-11-23")
    # values in typed columns leave the JSON; event.name stays (the record's own
    # event_name field can fill the column instead), as do resource extras
    assert json.loads(ev["attributes"]) == {"event.name": "tailscope.kv.eviction"}
    assert json.loads(xid["attributes"]) == {} and json.loads(ready["attributes"]) == {}
    assert json.loads(ev["resource_attributes"]) == {}


def test_log_event_name_attribute_is_kept_beside_the_field() -> None:
    req = log_request([{"event_name": "from.field", "attrs": {"event.name": "from.attribute", "tailscope.kv.blocks": 3}},
                       {"attrs": {"event.name": "only.attribute", "gpu.index": 1, "tailscope.gpu.index": 2}}])
    d, _ = both("logs", req)
    a, b = rows(d, "logs")
    assert (a["event_name"], json.loads(a["attributes"])) == ("from.field", {"event.name": "from.attribute"})
    assert (b["event_name"], b["gpu_index"]) == ("only.attribute", 1)
    assert json.loads(b["attributes"]) == {"event.name": "only.attribute", "tailscope.gpu.index": 2}


# ------------------------------------------------------------------- metrics


def test_all_metric_kinds_from_protobuf() -> None:
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    add_attrs(rm.resource.attributes, {"service.name": "node-agent", "host.name": "gpu-1"})
    sm = rm.scope_metrics.add()
    gpu = {"gpu.index": 1, "gpu.uuid": "GPU-abc", "gpu.name": "H100"}
    m = sm.metrics.add(name="tailscope.gpu.utilization", unit="1")
    add_attrs(m.gauge.data_points.add(time_unix_nano=T0, as_double=0.5).attributes, gpu)
    add_attrs(m.gauge.data_points.add(time_unix_nano=T0 + 1, as_int=7).attributes, gpu)
    m = sm.metrics.add(name="vllm:num_preemptions_total")
    m.sum.is_monotonic, m.sum.aggregation_temporality = True, 2
    m.sum.data_points.add(time_unix_nano=T0, start_time_unix_nano=T0 - 10**9, as_int=(1 << 60) + 1)
    m = sm.metrics.add(name="lat", unit="s")
    m.histogram.aggregation_temporality = 2
    m.histogram.data_points.add(time_unix_nano=T0, count=3, sum=1.5, bucket_counts=[1, 2, 0], explicit_bounds=[0.1, 1.0], min=0.05)
    m = sm.metrics.add(name="exp")
    p = m.exponential_histogram.data_points.add(time_unix_nano=T0, count=4, scale=2, zero_count=1)
    p.positive.offset, p.positive.bucket_counts[:] = -1, [1, 2]
    m = sm.metrics.add(name="q")
    p = m.summary.data_points.add(time_unix_nano=T0, count=10, sum=5.0)
    p.quantile_values.add(quantile=0.99, value=2.5)
    sm.metrics.add(name="bad").gauge.data_points.add(time_unix_nano=0, as_double=1.0)
    d, _ = both("metrics", req)
    assert (d.accepted, d.rejected) == (6, 1)
    g1, g2, total, hist, exp, summ = rows(d, "metrics")
    assert (g1["type"], g1["value"], g1["gpu_index"], g1["gpu_uuid"], g1["gpu_name"], g1["host_name"]) == (
        "gauge", 0.5, 1, "GPU-abc", "H100", "gpu-1")
    assert g2["value"] == 7.0
    assert (total["type"], total["is_monotonic"], total["value"]) == ("sum", True, float((1 << 60) + 1))
    assert json.loads(total["attributes"]) == {"_temporality": "CUMULATIVE", "_int_value": (1 << 60) + 1}
    assert total["start_time"] is not None and g1["start_time"] is None
    assert (hist["count"], hist["sum"], hist["bucket_counts"], hist["explicit_bounds"], hist["unit"]) == (3, 1.5, [1, 2, 0], [0.1, 1.0], "s")
    assert json.loads(hist["attributes"])["_min"] == 0.05
    assert exp["count"] == 4 and json.loads(exp["attributes"])["_positive"] == {"offset": -1, "bucket_counts": [1, 2]}
    assert (summ["type"], summ["count"], json.loads(summ["attributes"])["_quantiles"]) == ("summary", 10, [{"quantile": 0.99, "value": 2.5}])


# -------------------------------------------------------------- into the store


def test_decoded_tables_insert_into_the_store(tmp_path: Path, shared_data: Path) -> None:
    from collector.store import Store

    traces = decode("traces", trace_request([
        {"attrs": REQUEST_ATTRS, "events": [{"name": "e", "time": T0}],
         "links": [{"trace_id": b"\x01" * 16, "span_id": b"\x02" * 8}]}]).SerializeToString(), PROTOBUF)
    logs = decode("logs", read(shared_data, "logs.json"), JSON)
    metrics = decode("metrics", read(shared_data, "metrics.json"), JSON)
    store = Store(tmp_path / "t.duckdb")
    try:
        store.write([(name, t) for d in (traces, logs, metrics) for name, t in d.tables.items()])
        cur = store.cursor()
        assert cur.execute("SELECT model, gpu_index, session_id, attributes FROM spans").fetchall() == [("llama-3-8b", 3, "s-9", "{}")]
        assert cur.execute("SELECT count(*) FROM span_events").fetchone() == (1,)
        assert cur.execute("SELECT count(*) FROM span_links").fetchone() == (1,)
        assert cur.execute("SELECT attributes->>'$.\"int.attribute\"' FROM logs").fetchone() == ("10",)
        assert cur.execute("SELECT bucket_counts FROM metrics WHERE type = 'histogram'").fetchone() == ([1, 1],)
    finally:
        store.close()


# ---------------------------------------------------------------- bad bodies


GOOD = trace_request([{"attrs": REQUEST_ATTRS}]).SerializeToString()


@pytest.mark.parametrize("body", [
    b"\xff\xff\xff\xff",  # invalid tag/varint
    GOOD[:-7],  # truncated
    b"\x0a\x05abc",  # length past the end
    b"this is not protobuf at all",
])
def test_garbage_protobuf_is_a_bad_payload(body: bytes) -> None:
    with pytest.raises(BadPayload, match="protobuf"):
        decode("traces", body, PROTOBUF)


def _attr_blob(key: bytes, value: bytes) -> bytes:
    return b"\x0a" + bytes([len(key)]) + key + b"\x12" + bytes([len(value)]) + value


def _span_with_raw_attr(blob: bytes) -> bytes:
    """A valid request whose one attribute's encoding is replaced by ``blob``."""
    # the private classes hold attributes as bytes, so any encoding can be put in
    fast = otlp._REQUEST["traces"].FromString(trace_request([{"attrs": {"k": "v"}}]).SerializeToString())
    fast.resource_spans[0].scope_spans[0].spans[0].attributes[0] = blob
    return fast.SerializeToString()


def test_bad_attribute_inside_valid_envelope() -> None:
    with pytest.raises(BadPayload):
        decode("traces", _span_with_raw_attr(b"\x0a\x05ab"), PROTOBUF)  # truncated KeyValue
    with pytest.raises(BadPayload):
        decode("traces", _span_with_raw_attr(_attr_blob(b"\xff\xfe", b"\x0a\x01x")), PROTOBUF)  # key not UTF-8
    with pytest.raises(BadPayload):
        decode("traces", _span_with_raw_attr(_attr_blob(b"k", b"\x0a\x02\xc3\x28")), PROTOBUF)  # value not UTF-8


def test_unusual_but_valid_attribute_encodings() -> None:
    # value before key, an unknown field, a non-minimal varint: all legal protobuf
    blobs = [
        b"\x12\x03\x18\x96\x01" + b"\x0a\x01a",
        _attr_blob(b"b", b"\x18\x05") + b"\x78\x01",
        _attr_blob(b"c", b"\x18\x85\x80\x00"),
        _attr_blob(b"d", b""),
        b"\x0a\x01e",
    ]
    fast = otlp._REQUEST["traces"].FromString(trace_request([{}]).SerializeToString())
    fast.resource_spans[0].scope_spans[0].spans[0].attributes.extend(blobs)
    d = decode("traces", fast.SerializeToString(), PROTOBUF)
    assert json.loads(rows(d, "spans")[0]["attributes"]) == {"a": 150, "b": 5, "c": 5, "d": None, "e": None}


def _nested_blob(depth: int) -> bytes:
    """A KeyValue whose value is ``depth`` arrays inside each other (built by hand:
    upb refuses to build messages this deep)."""
    v = b"\x0a\x04leaf"  # AnyValue{string_value}
    for _ in range(depth):
        arr = b"\x0a" + varint(len(v)) + v  # ArrayValue{values}
        v = b"\x2a" + varint(len(arr)) + arr  # AnyValue{array_value}
    return b"\x0a\x04deep\x12" + varint(len(v)) + v


def _nested_json(depth: int) -> str:
    return '{"arrayValue":{"values":[' * depth + '{"stringValue":"leaf"}' + "]}}" * depth


def test_deep_nesting_is_refused_not_a_recursion_error() -> None:
    for depth in (40, 150, 5000):
        fast = otlp._REQUEST["traces"].FromString(trace_request([{}]).SerializeToString())
        fast.resource_spans[0].scope_spans[0].spans[0].attributes.append(_nested_blob(depth))
        with pytest.raises(BadPayload, match="nested|protobuf"):
            decode("traces", fast.SerializeToString(), PROTOBUF)
        body = _span_json(attributes=[{"key": "deep", "value": "@"}]).replace(b'"@"', _nested_json(depth).encode())
        with pytest.raises(BadPayload, match="nested"):
            decode("traces", body, JSON)
    deep_json = b'{"resourceSpans":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(BadPayload):
        decode("traces", deep_json, JSON)
    fast = otlp._REQUEST["traces"].FromString(trace_request([{}]).SerializeToString())
    fast.resource_spans[0].scope_spans[0].spans[0].attributes.append(_nested_blob(20))
    d = decode("traces", fast.SerializeToString(), PROTOBUF)
    assert d.accepted == 1 and "leaf" in rows(d, "spans")[0]["attributes"]


def _span_json(**fields: Any) -> bytes:
    span = {"traceId": TID.hex(), "spanId": SID.hex(), "name": "x",
            "startTimeUnixNano": str(T0), "endTimeUnixNano": str(T0 + 1)}
    span.update(fields)
    return json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [span]}]}]}).encode()


@pytest.mark.parametrize("body, fragment", [
    (b"[]", "must be an object"),
    (b"42", "must be an object"),
    (b'"x"', "must be an object"),
    (b"{", "not valid JSON"),
    (b'{"resourceSpans": 5}', "must be a list"),
    (b'{"resourceSpans": [5]}', "must be an object"),
    (b'{"resourceSpans": [{"scopeSpans": [{"spans": {"a": 1}}]}]}', "must be a list"),
    (_span_json(traceId="abc"), "32 hex digits"),
    (_span_json(spanId="EEE19B7EC3C1B1"), "16 hex digits"),
    (_span_json(traceId="zz" * 16), "not valid hex"),
    (_span_json(spanId=" " * 16), "not valid hex"),
    (_span_json(traceId=12), "hex string"),
    (_span_json(startTimeUnixNano="soon"), "not an integer"),
    (_span_json(kind="SIDEWAYS"), "unknown value"),
    (_span_json(attributes=[{"key": "a", "value": {"intValue": "1.5"}}]), "not an integer"),
    (_span_json(attributes=[{"key": "a", "value": {"intValue": str(1 << 64)}}]), "64-bit"),
    (_span_json(attributes=[{"key": 1, "value": {}}]), "key must be a string"),
    (_span_json(attributes=[{"key": "a", "value": {"boolValue": "yes"}}]), "true or false"),
    (_span_json(attributes=[{"key": "a", "value": {"bytesValue": "***"}}]), "base64"),
    (_span_json(attributes={"a": 1}), "must be a list"),
    (_span_json(name="\ud800"), "cannot be stored"),
    (b'{"resourceLogs": []}', "send it to /v1/logs"),
    (b'{"hello": "world"}', "expected a 'resourceSpans' list"),
    (b"\xff\xfe{}", "UTF-8"),
])
def test_bad_json_bodies(body: bytes, fragment: str) -> None:
    with pytest.raises(BadPayload, match=fragment):
        decode("traces", body, JSON)


def test_json_leniency_unknown_fields_snake_case_enums_and_numbers() -> None:
    body = json.dumps({"resourceSpans": [{"futureField": {"x": 1}, "scope_spans": [{"spans": [
        {"trace_id": TID.hex().upper(), "span_id": SID.hex(), "name": "x", "kind": "SPAN_KIND_CLIENT",
         "start_time_unix_nano": T0, "endTimeUnixNano": str(T0 + 10**6), "status": {"code": "STATUS_CODE_OK"},
         "somethingNew": [1, 2], "attributes": [{"key": "n", "value": {"int_value": 5, "extra": 1}},
                                                 {"key": "d", "value": {"doubleValue": "NaN"}}]}]}]}]}).encode()
    d = decode("traces", body, "Application/JSON")
    span = rows(d, "spans")[0]
    assert (span["kind"], span["status_code"], span["duration_ms"]) == ("CLIENT", "OK", 1.0)
    assert json.loads(span["attributes"]) == {"n": 5, "d": "NaN"}
    assert decode("traces", b"{}", JSON).accepted == 0


def test_unknown_protobuf_fields_are_ignored() -> None:
    # field 99 (varint) appended to the request: unknown, must be skipped
    d = decode("traces", GOOD + b"\x98\x06\x01", PROTOBUF)
    assert d.accepted == 1


def test_content_types() -> None:
    assert decode("traces", GOOD, "application/x-protobuf; charset=binary").accepted == 1
    for bad in ("text/plain", None, "", "application/grpc"):
        with pytest.raises(UnsupportedMediaType, match="application/x-protobuf") as err:
            decode("traces", GOOD, bad)
        assert err.value.status == 415
        assert isinstance(err.value, BadPayload)
    with pytest.raises(ValueError):
        decode("spans", GOOD, PROTOBUF)


def test_empty_bodies_are_empty_requests() -> None:
    for signal in ("traces", "metrics", "logs"):
        d = decode(signal, b"", PROTOBUF)
        assert (d.accepted, d.rejected, d.tables) == (0, 0, {})


# --------------------------------------------------------------- compression


def test_gzip_identity_and_deflate() -> None:
    assert decompress(gzip.compress(GOOD), "gzip", limit=1 << 20) == GOOD
    assert decompress(GOOD, None, limit=1 << 20) == GOOD
    assert decompress(GOOD, "identity", limit=1 << 20) == GOOD
    import zlib

    assert decompress(zlib.compress(GOOD), "deflate", limit=1 << 20) == GOOD
    assert decompress(gzip.compress(b"a") + gzip.compress(b"b"), "gzip", limit=10) == b"ab"


def test_gzip_bomb_is_refused_without_inflating_it() -> None:
    import tracemalloc

    bomb = gzip.compress(bytes(64 << 20), compresslevel=1)  # 64 MiB of zeros in about 300 KiB
    assert len(bomb) < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(PayloadTooLarge):
            decompress(bomb, "gzip", limit=4 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20  # bounded by the limit plus one chunk, not by the bomb


def test_identity_body_over_the_limit() -> None:
    with pytest.raises(PayloadTooLarge):
        decompress(b"x" * 101, None, limit=100)


@pytest.mark.parametrize("body, enc", [
    (b"not gzip", "gzip"),
    (gzip.compress(b"hello world")[:-6], "gzip"),
    (gzip.compress(b"x") + b"trailing junk", "gzip"),
    (b"x", "br"),
    (b"x", "gzip, gzip"),
])
def test_bad_compression(body: bytes, enc: str) -> None:
    with pytest.raises(BadPayload):
        decompress(body, enc, limit=1 << 20)


def test_warm_up_decodes_every_signal_without_error() -> None:
    otlp.warm_up()  # used by decode workers at start; must never raise


def test_numeric_looking_strings_that_int_refuses_stay_in_json() -> None:
    # "²" and "+-5" pass str.isdigit() after stripping signs, yet int() refuses them
    req = trace_request([{"attrs": {"gen_ai.usage.input_tokens": "²", "tailscope.shape.len": "+-5",
                                    "tailscope.batch.size": "١٢"}}])
    d, _ = both("traces", req)
    (span,) = rows(d, "spans")
    assert (span["input_tokens"], span["shape_len"], span["batch_size"]) == (None, None, 12)
    assert json.loads(span["attributes"]) == {"gen_ai.usage.input_tokens": "²", "tailscope.shape.len": "+-5",
                                              "tailscope.batch.size": "١٢"}


def test_ten_byte_varint_keeps_its_low_64_bits_whatever_the_key_length() -> None:
    # the last byte of a 10-byte varint carries bits past 64: protobuf drops them
    for key in (b"k", b"k" * 200):
        value = b"\x18" + bytes([0xFF] * 9 + [0x7F])
        blob = b"\x0a" + varint(len(key)) + key + b"\x12" + varint(len(value)) + value
        fast = otlp._REQUEST["traces"].FromString(trace_request([{}]).SerializeToString())
        fast.resource_spans[0].scope_spans[0].spans[0].attributes.append(blob)
        d = decode("traces", fast.SerializeToString(), PROTOBUF)
        assert json.loads(rows(d, "spans")[0]["attributes"]) == {key.decode(): -1}


def test_without_the_compiled_decoder_python_decodes(monkeypatch: pytest.MonkeyPatch) -> None:
    from collector import otlp_c
    from collector.decode_pool import DecodePool
    from tailscope.config import ConfigError, load

    monkeypatch.setattr(otlp_c, "AVAILABLE", False)
    monkeypatch.setattr(otlp_c, "IMPORT_ERROR", "No module named 'collector._otlpfast'")
    assert otlp.active_decoder("auto") == otlp.active_decoder("python") == "python"
    with pytest.raises(RuntimeError, match="not built"):
        otlp.active_decoder("compiled")
    assert DecodePool(load({}, environ={})).active == "python"
    with pytest.raises(ConfigError, match="decoder=compiled"):
        DecodePool(load({"decoder": "compiled"}, environ={}))
    d = decode("traces", GOOD, PROTOBUF)
    assert d.accepted == 1

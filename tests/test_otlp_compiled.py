"""The compiled traces decoder (collector/_otlpfast.c) against the Python one.

Both must give identical results — the same tables (schema, every value, NaN
and -0.0 included), accepted/rejected counts, error messages and truncation
counts — or both raise BadPayload:

(a) on the request shapes the project sends: the torch instrumentation
    through the stock OTLP exporter, spec-shaped request spans as the tests and
    benchmarks build them, the spec's example trace;
(b) on hypothesis-generated requests (the strategies of test_otlp_properties),
    with invalid ids and times, events, links, nested and long values, small
    size limits;
(c) on random, truncated and mutated bytes and hand-made wire encodings:
    the compiled decoder never crashes and refuses exactly what the Python
    one refuses.

For (a) the compiled walker itself must take the body (not hand it back to
the Python code); for (b) and (c) either is fine, only the result counts.
"""

from __future__ import annotations

import http.server
import json
import math
import os
import random
import struct
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from collector import otlp, otlp_c
from collector.decoded import Decoded
from collector.otlp import PROTOBUF, decode
from tailscope.errors import BadPayload

from ingest_payloads import mutate, request_spans, set_any_value, varint
from test_otlp_properties import MAX_NS, MIN_NS, VALID, attr_key, attr_value, nonzero, resource_attrs, span_spec

pytestmark = pytest.mark.skipif(
    not otlp_c.AVAILABLE,
    reason=f"the compiled OTLP decoder is not built ({otlp_c.IMPORT_ERROR}); "
           "`pip install -e .` builds it where a C compiler and the Python headers are installed",
)

REPO = Path(__file__).resolve().parent.parent
# OTLP_FUZZ_EXAMPLES=5000 for a longer search than the suite's
SETTINGS = settings(max_examples=int(os.environ.get("OTLP_FUZZ_EXAMPLES", "150")), deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ------------------------------------------------------------------ comparing


def _canon(v: Any) -> Any:
    """A value with floats as their bits (NaN == NaN, -0.0 != 0.0)."""
    if isinstance(v, float):
        return ("f", struct.pack("<d", v))
    if isinstance(v, list):
        return [_canon(x) for x in v]
    if isinstance(v, dict):
        return {k: _canon(x) for k, x in v.items()}
    return v


def summary(d: Decoded) -> dict[str, Any]:
    tables = {}
    for name, t in d.tables.items():
        tables[name] = (t.schema, t.num_rows, {c: _canon(t.column(c).to_pylist()) for c in t.column_names})
    return {"signal": d.signal, "accepted": d.accepted, "rejected": d.rejected, "errors": d.errors,
            "truncated": d.truncated_values, "tables": tables}


def outcome(decoder: str, body: bytes, limit: int) -> Any:
    try:
        return summary(decode("traces", body, PROTOBUF, max_attribute_bytes=limit, decoder=decoder))
    except BadPayload as exc:
        return ("BadPayload", type(exc))


def assert_same(body: bytes, limit: int = 65536, *, compiled_walk: bool = False) -> Any:
    """Both decoders agree on ``body``; with ``compiled_walk`` the C walker must take it itself."""
    py = outcome("python", body, limit)
    c = outcome("compiled", body, limit)
    if isinstance(py, dict) and isinstance(c, dict):
        assert py.keys() == c.keys()
        for key in py:
            if key != "tables":
                assert c[key] == py[key], key
        assert c["tables"].keys() == py["tables"].keys()
        for name, (schema, n, cols) in py["tables"].items():
            c_schema, c_n, c_cols = c["tables"][name]
            assert c_schema == schema, name
            assert c_n == n, name
            for col in cols:
                assert c_cols[col] == cols[col], (name, col)
    else:
        assert c == py
    if compiled_walk:
        assert otlp_c.decode_traces(body, limit) is not None, "the compiled walker handed a real request back"
    return py


def fast_request(req: ExportTraceServiceRequest) -> Any:
    """The collector's request class, whose attributes are raw bytes (any encoding can be put in)."""
    return otlp._REQUEST["traces"].FromString(req.SerializeToString())


# ------------------------------------------------------------------ (a) real shapes


class _Capture(http.server.BaseHTTPRequestHandler):
    bodies: list[bytes] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        if self.path == "/v1/traces":
            type(self).bodies.append(body)
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def capture() -> Iterator[tuple[str, list[bytes]]]:
    """An OTLP/HTTP endpoint that keeps every traces body it gets."""
    bodies: list[bytes] = []
    handler = type("Capture", (_Capture,), {"bodies": bodies})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", bodies
    srv.shutdown()
    srv.server_close()


def test_what_the_torch_instrumentation_sends(capture: tuple[str, list[bytes]]) -> None:
    from agents.torch import instrument

    url, bodies = capture
    h = instrument(service="chat-api", endpoint=url, instance_id="replica-0", host_name="node-a",
                   resource={"tailscope.pool": "realtime"}, compile_events=False, schedule_delay_s=0.05)
    try:
        reqs = [h.start_request(model="llama-3-8b", input_tokens=100 + i, session_id=f"s{i % 3}", priority="interactive",
                                gpu_index=i % 8, kv_cached_tokens=4, request_id=f"r-{i}",
                                attributes={"custom.tag": "x", "custom.list": [1, 2, 3], "custom.words": ["a", "b"],
                                            "custom.float": 0.1 * i, "custom.big": 1e300, "custom.nan": math.nan,
                                            "custom.flag": i % 2 == 0, "custom.text": 'quote " and \\ and \n ünï'})
                for i in range(20)]
        with h.batch("b-1", reqs[:8], max_len=512, min_len=64, real_tokens=3000, padded_tokens=4096):
            pass
        for i, req in enumerate(reqs):
            for stage in ("queue", "prefill", "decode"):
                with h.stage(stage, parent=req):
                    pass
            req.set(output_tokens=7 + i)
            if i % 5 == 0:
                req.set_error("upstream timed out")
            if i:
                req.add_link(reqs[i - 1], {"why": "retry"})
            req.end()
    finally:
        h.shutdown()
    assert bodies, "the exporter sent nothing"
    spans = 0
    for body in bodies:
        res = assert_same(body, compiled_walk=True)
        spans += res["accepted"]
    assert spans >= 20 * 4 + 1


def test_spec_shaped_request_spans_from_tests_and_benchmarks() -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from decode import build_request
        from ingest import build_body
    finally:
        sys.path.pop(0)
    req, _ = request_spans(300)
    assert_same(req.SerializeToString(), compiled_walk=True)
    assert_same(build_body(500, 3), compiled_walk=True)
    assert_same(build_request(random.Random(5), 500, 1_763_900_000 * 10**9, 2).SerializeToString(), compiled_walk=True)


def test_spec_example_trace(shared_data: Path) -> None:
    from google.protobuf import json_format

    req = ExportTraceServiceRequest()
    json_format.Parse((shared_data / "otlp" / "trace.json").read_text(), req, ignore_unknown_fields=True)
    assert_same(req.SerializeToString(), compiled_walk=True)


def test_every_span_field_events_links_status_and_scopes() -> None:
    req = ExportTraceServiceRequest()
    for r in range(3):
        rs = req.resource_spans.add(schema_url="https://opentelemetry.io/schemas/1.26.0")
        for k, v in (("service.name", f"svc-{r}"), ("process.pid", 7 + r), ("tailscope.pool", "p"), ("extra", [1, 2])):
            set_any_value(rs.resource.attributes.add(key=k).value, v)
        rs.resource.dropped_attributes_count = 2
        for s_i in range(2):
            ss = rs.scope_spans.add(schema_url="x")
            ss.scope.name = "" if s_i else f"scope-{r}"
            ss.scope.version = "1.0"
            ss.scope.attributes.add(key="scope.attr").value.string_value = "ignored"
            for i in range(4):
                s = ss.spans.add(trace_id=bytes([r + 1]) * 16, span_id=bytes([i + 1, s_i + 1]) * 4, trace_state="a=b",
                                 parent_span_id=(b"\x00" * 8 if i == 1 else b"\x09" * 8 if i == 2 else b""),
                                 flags=0x301, name=f"span {i} ✓", kind=i % 7, dropped_attributes_count=1,
                                 dropped_events_count=2, dropped_links_count=3,
                                 start_time_unix_nano=1_700_000_000 * 10**9 + i, end_time_unix_nano=1_700_000_001 * 10**9)
                s.status.code = i % 4
                s.status.message = "boom" if i == 3 else ""
                for k, v in (("gen_ai.request.model", "m"), ("tailscope.role", "stage") if i == 2 else ("x", 1),
                             ("gen_ai.latency.e2e", 1), ("tailscope.gpu.index", 3.0), ("f", 5.0), ("g", -0.0),
                             ("tailscope.batch.size", "12"), ("gen_ai.latency.time_in_queue", "0.5")):
                    set_any_value(s.attributes.add(key=k).value, v)
                e = s.events.add(name="ev", time_unix_nano=1_700_000_000 * 10**9 + 5, dropped_attributes_count=1)
                e.attributes.add(key="k").value.double_value = 1e-7
                s.events.add(name="", time_unix_nano=0)  # dropped: no time
                ln = s.links.add(trace_id=b"\x05" * 16, span_id=b"\x06" * 8, trace_state="t", flags=1)
                ln.attributes.add(key="why").value.string_value = "batch"
                s.links.add(trace_id=b"\x00" * 16, span_id=b"\x06" * 8)  # dropped: zero trace id
    res = assert_same(req.SerializeToString(), compiled_walk=True)
    assert res["accepted"] == 24 and len(res["errors"]) == 2  # the dropped events and links


def test_rejected_spans_and_their_reasons() -> None:
    req = ExportTraceServiceRequest()
    ss = req.resource_spans.add().scope_spans.add()
    t = 1_700_000_000 * 10**9
    for tid, sid, pid, start, end in (
        (b"\x01" * 16, b"\x02" * 8, b"", t, t + 1),
        (b"", b"\x02" * 8, b"", t, t),
        (b"\x00" * 16, b"\x02" * 8, b"", t, t),
        (b"\x01" * 15, b"\x02" * 8, b"", t, t),
        (b"\x01" * 16, b"\x00" * 8, b"", t, t),
        (b"\x01" * 16, b"\x02" * 9, b"", t, t),
        (b"\x01" * 16, b"\x02" * 8, b"\x03" * 7, t, t),
        (b"\x01" * 16, b"\x02" * 8, b"", 0, t),
        (b"\x01" * 16, b"\x02" * 8, b"", t, MAX_NS + 1),
        (b"\x01" * 16, b"\x02" * 8, b"", t + 5, t),
    ):
        s = ss.spans.add(trace_id=tid, span_id=sid, parent_span_id=pid, start_time_unix_nano=start, end_time_unix_nano=end)
        s.attributes.add(key="gen_ai.usage.input_tokens").value.int_value = 1
        s.events.add(name="e", time_unix_nano=t)
        s.links.add(trace_id=b"\x01" * 16, span_id=b"\x02" * 8)
    res = assert_same(req.SerializeToString(), compiled_walk=True)
    assert (res["accepted"], res["rejected"], len(res["errors"])) == (1, 9, 5)


def test_truncation_of_names_messages_keys_and_values() -> None:
    req = ExportTraceServiceRequest()
    s = req.resource_spans.add().scope_spans.add().spans.add(
        trace_id=b"\x01" * 16, span_id=b"\x02" * 8, name="n" * 30 + "é" * 10,
        start_time_unix_nano=1_700_000_000 * 10**9, end_time_unix_nano=1_700_000_000 * 10**9)
    s.status.message = "m" * 40
    for k, v in (("k" * 40, "v"), ("big", "é" * 40), ("blob", b"\x07" * 64), ("list", ["x" * 40, "y"]),
                 ("tailscope.role", "r" * 33), ("ok", "short")):
        set_any_value(s.attributes.add(key=k).value, v)
    s.events.add(name="e" * 50, time_unix_nano=1_700_000_000 * 10**9).attributes.add(key="a").value.string_value = "é" * 30
    for limit in (1, 7, 16, 31, 32, 33, 65536):
        assert_same(req.SerializeToString(), limit, compiled_walk=True)


def test_unusual_attribute_encodings_go_through_the_python_reader() -> None:
    def blob(key: bytes, value: bytes) -> bytes:
        return b"\x0a" + bytes([len(key)]) + key + b"\x12" + bytes([len(value)]) + value

    blobs = [
        b"\x12\x03\x18\x96\x01" + b"\x0a\x01a",  # value before key
        blob(b"b", b"\x18\x05") + b"\x78\x01",  # unknown field
        blob(b"c", b"\x18\x85\x80\x00"),  # non-minimal varint
        blob(b"d", b""),  # empty value
        b"\x0a\x01e",  # no value
        b"",  # empty KeyValue
        blob(b"f", b"\x0a\x01x\x18\x02"),  # two value fields: the last wins
        blob(b"g", b"\x18" + bytes([0xFF] * 9 + [0x01])),  # -1
        blob(b"h", b"\x10\x80\x01"),  # bool from a 2-byte varint
        blob(b"i", b"\x3a\x02\x00\x01"),  # bytes
        blob(b"gen_ai.usage.input_tokens", b"\x18\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01"),
        blob(b"a", b"\x18\x07"),  # repeats key "a"
    ]
    fast = fast_request(_one_span_request())
    fast.resource_spans[0].scope_spans[0].spans[0].attributes.extend(blobs)
    res = assert_same(fast.SerializeToString(), compiled_walk=True)
    assert res["accepted"] == 1


def _one_span_request() -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    req.resource_spans.add().scope_spans.add().spans.add(
        trace_id=b"\x01" * 16, span_id=b"\x02" * 8, name="x", kind=2,
        start_time_unix_nano=1_700_000_000 * 10**9, end_time_unix_nano=1_700_000_001 * 10**9)
    return req


def test_bad_attributes_are_refused_by_both() -> None:
    for bad in (b"\x0a\x05ab", b"\x0a\x02\xff\xfe\x12\x03\x0a\x01x", b"\x0a\x01k\x12\x04\x0a\x02\xc3\x28",
                b"\x0a\x01k\x12\x02\x0a\x05", b"\x0a\x01k\x12\x01\x18"):
        for where in ("span", "event", "link", "resource"):
            fast = fast_request(_one_span_request())
            s = fast.resource_spans[0].scope_spans[0].spans[0]
            target = {"span": s.attributes, "event": s.events.add(name="e").attributes,
                      "link": s.links.add(trace_id=b"\x01" * 16, span_id=b"\x01" * 8).attributes,
                      "resource": fast.resource_spans[0].resource.attributes}[where]
            target.append(bad)
            body = fast.SerializeToString()
            assert assert_same(body) == ("BadPayload", BadPayload), (bad, where)
            for decoder in ("python", "compiled"):  # and with the same message
                with pytest.raises(BadPayload) as exc:
                    decode("traces", body, PROTOBUF, decoder=decoder)
                if decoder == "python":
                    message = str(exc.value)
                else:
                    assert str(exc.value) == message


def test_deep_nesting_is_refused_by_both() -> None:
    from test_otlp_decode import _nested_blob

    for depth in (20, 40, 150):
        fast = fast_request(_one_span_request())
        fast.resource_spans[0].scope_spans[0].spans[0].attributes.append(_nested_blob(depth))
        assert_same(fast.SerializeToString())


def test_many_attributes_on_one_span_and_repeated_keys() -> None:
    req = _one_span_request()
    s = req.resource_spans[0].scope_spans[0].spans[0]
    rng = random.Random(3)
    for i in range(3000):  # over the size where duplicate keys are found by hashing
        k = rng.choice(["tailscope.batch.id", "gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens", "x"]) if i % 3 else f"k{i % 700}"
        set_any_value(s.attributes.add(key=k).value, rng.choice([1, "a", 2.5, True, None, [1]]))
    assert_same(req.SerializeToString(), compiled_walk=True)


def test_empty_and_span_less_requests() -> None:
    assert_same(b"", compiled_walk=True)
    req = ExportTraceServiceRequest()
    req.resource_spans.add().resource.attributes.add(key="service.name").value.string_value = "s"
    req.resource_spans.add().scope_spans.add().scope.name = "empty"
    assert_same(req.SerializeToString(), compiled_walk=True)


# ------------------------------------------------------------------ (b) random requests


invalid_id = st.binary(max_size=17)
event_spec = st.fixed_dictionaries({
    "name": st.text(max_size=12), "time": st.integers(0, MAX_NS + 10) | st.integers(MIN_NS, MAX_NS),
    "attrs": st.dictionaries(attr_key, attr_value, max_size=3)})
link_spec = st.fixed_dictionaries({
    "trace_id": nonzero(16) | invalid_id, "span_id": nonzero(8) | invalid_id,
    "attrs": st.dictionaries(attr_key, attr_value, max_size=3)})
odd_span = st.fixed_dictionaries({
    "trace_id": nonzero(16) | invalid_id, "span_id": nonzero(8) | invalid_id, "parent": st.just(b"") | invalid_id,
    "name": st.text(max_size=30), "kind": st.integers(-3, 9),
    "start": st.integers(0, (1 << 64) - 1) | st.integers(MIN_NS, MAX_NS), "duration": st.integers(-10, 10**12),
    "status": st.tuples(st.integers(-1, 4), st.text(max_size=10)),
    "attrs": st.lists(st.tuples(attr_key, attr_value), max_size=8)})


def _build(resources: list[tuple[dict[str, Any], list[tuple[str, list[tuple[dict[str, Any], list[Any], list[Any]]]]]]]) -> bytes:
    req = ExportTraceServiceRequest()
    for res, scopes in resources:
        rs = req.resource_spans.add()
        for k, v in res.items():
            set_any_value(rs.resource.attributes.add(key=k).value, v)
        for scope_name, spans in scopes:
            ss = rs.scope_spans.add()
            ss.scope.name = scope_name
            for spec, events, links in spans:
                end = min(max(spec["start"] + spec["duration"], 0), (1 << 64) - 1)
                s = ss.spans.add(trace_id=spec["trace_id"], span_id=spec["span_id"], parent_span_id=spec["parent"],
                                 name=spec["name"], kind=spec["kind"], start_time_unix_nano=spec["start"],
                                 end_time_unix_nano=end)
                s.status.code, s.status.message = spec["status"]
                attrs = spec["attrs"].items() if isinstance(spec["attrs"], dict) else spec["attrs"]
                for k, v in attrs:
                    set_any_value(s.attributes.add(key=k).value, v)
                for ev in events:
                    e = s.events.add(name=ev["name"], time_unix_nano=ev["time"])
                    for k, v in ev["attrs"].items():
                        set_any_value(e.attributes.add(key=k).value, v)
                for ln in links:
                    link = s.links.add(trace_id=ln["trace_id"], span_id=ln["span_id"])
                    for k, v in ln["attrs"].items():
                        set_any_value(link.attributes.add(key=k).value, v)
    return req.SerializeToString()


requests = st.lists(st.tuples(
    resource_attrs,
    st.lists(st.tuples(st.text(max_size=8), st.lists(st.tuples(
        span_spec | odd_span, st.lists(event_spec, max_size=2), st.lists(link_spec, max_size=2)), max_size=4)), max_size=2),
), max_size=2)
limits = st.sampled_from([65536, 65536, 1, 8, 24, 100])


@SETTINGS
@given(requests, limits)
def test_random_requests(resources: list[Any], limit: int) -> None:
    assert_same(_build(resources), limit)


@SETTINGS
@given(st.lists(span_spec, min_size=1, max_size=6), resource_attrs)
def test_random_valid_spans_are_walked_by_the_compiled_decoder(specs: list[dict[str, Any]], resource: dict[str, Any]) -> None:
    body = _build([(resource, [("scope", [(s, [], []) for s in specs])])])
    assert_same(body, compiled_walk=True)


@settings(max_examples=300, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False)
       | st.integers(-1074, 1023).map(lambda e: math.ldexp(1.0, e))  # powers of two: uneven rounding intervals
       | st.builds(lambda m, e: m * 10.0**e, st.integers(-99999, 99999), st.integers(-30, 30)))
def test_double_text_is_arrows(x: float) -> None:
    from collector import _otlpfast

    assert _otlpfast.arrow_double_str(x) == pa.array([x], pa.float64()).cast(pa.string())[0].as_py()


# ------------------------------------------------------------------ (c) bytes


def _tag(num: int, wt: int) -> bytes:
    return varint(num << 3 | wt)


def _rich_body() -> bytes:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.add(key="service.name").value.string_value = "svc"
    ss = rs.scope_spans.add()
    ss.scope.name = "sc"
    s = ss.spans.add(trace_id=b"\x01" * 16, span_id=b"\x02" * 8, parent_span_id=b"\x03" * 8, name="x", kind=2,
                     start_time_unix_nano=1_700_000_000 * 10**9, end_time_unix_nano=1_700_000_001 * 10**9)
    s.status.code, s.status.message = 2, "bad"
    for k, v in (("gen_ai.usage.input_tokens", 12), ("tailscope.role", "request"), ("d", 0.5), ("a", [True]), ("e2e", 1.5)):
        set_any_value(s.attributes.add(key=k).value, v)
    s.events.add(name="e", time_unix_nano=1_700_000_000 * 10**9).attributes.add(key="k").value.int_value = 1
    s.links.add(trace_id=b"\x03" * 16, span_id=b"\x04" * 8).attributes.add(key="l").value.bool_value = False
    return req.SerializeToString()


RICH = _rich_body()
BODIES = [RICH, VALID["traces"], request_spans(3)[0].SerializeToString()]


@SETTINGS
@given(st.binary(max_size=400))
def test_random_bytes(body: bytes) -> None:
    assert_same(body)


@SETTINGS
@given(st.sampled_from(BODIES), st.integers(0, 10_000))
def test_truncated_bodies(body: bytes, cut: int) -> None:
    assert_same(body[: cut % (len(body) + 1)])


@SETTINGS
@given(st.sampled_from(BODIES), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255), st.sampled_from("rid")),
                                        min_size=1, max_size=6))
def test_mutated_bodies(body: bytes, edits: list[tuple[int, int, str]]) -> None:
    assert_same(mutate(body, edits))


def _field(num: int, wt: int, payload: bytes | int) -> bytes:
    if wt == 0:
        return _tag(num, 0) + varint(int(payload))
    if wt == 1:
        return _tag(num, 1) + struct.pack("<Q", int(payload) & ((1 << 64) - 1))
    if wt == 5:
        return _tag(num, 5) + struct.pack("<I", int(payload) & 0xFFFFFFFF)
    assert isinstance(payload, bytes)
    return _tag(num, 2) + varint(len(payload)) + payload


# wire-level pieces of a span: every field with its right and with wrong wire types
span_field = st.one_of(
    st.tuples(st.integers(1, 20), st.sampled_from([0, 1, 2, 5]),
              st.integers(0, (1 << 64) - 1) | st.binary(max_size=20) | st.sampled_from([b"\x01" * 16, b"\x02" * 8, b"\xff\xfe", b"ok"])),
    st.tuples(st.just(7), st.just(1), st.integers(MIN_NS, MAX_NS)),
    st.tuples(st.just(8), st.just(1), st.integers(MIN_NS, MAX_NS)),
    st.tuples(st.just(9), st.just(2), st.sampled_from([b"\x0a\x01k\x12\x02\x18\x01", b"\x0a\x03gen\x12\x03\x0a\x01v",
                                                      b"\x0a\x01d\x12\x09\x21" + struct.pack("<d", 2.0), b"\x0a\x01k"])),
    st.tuples(st.just(15), st.just(2), st.sampled_from([b"\x18\x02", b"\x12\x02ok", b"\x12\x02\xff\xfe", b"\x08\x01", b"\x18"])),
    st.tuples(st.sampled_from([11, 13]), st.just(2), st.sampled_from([b"\x09" + b"\x00" * 8, b"\x12\x01e", b"\x0a\x10" + b"\x01" * 16 + b"\x12\x08" + b"\x02" * 8, b"\x1a\x03abc", b"\x22\x05\x0a\x01k"])),
)


def _span_bytes(fields: list[tuple[int, int, Any]]) -> bytes:
    out = b""
    for num, wt, payload in fields:
        if wt == 2 and not isinstance(payload, bytes):
            payload = varint(payload)
        if wt != 2 and isinstance(payload, bytes):
            payload = int.from_bytes(payload[:8], "little")
        out += _field(num, wt, payload)
    return out


base_span = [(1, 2, b"\x01" * 16), (2, 2, b"\x02" * 8), (7, 1, 1_700_000_000 * 10**9), (8, 1, 1_700_000_001 * 10**9)]


@SETTINGS
@given(st.lists(span_field, max_size=8), st.lists(st.tuples(st.integers(1, 5), st.sampled_from([0, 1, 2, 5]), st.binary(max_size=6)), max_size=3),
       st.booleans())
def test_hand_made_wire_encodings(extra: list[tuple[int, int, Any]], outer: list[tuple[int, int, bytes]], scope_last: bool) -> None:
    span = _span_bytes(base_span + extra)
    scope = _field(1, 2, _field(1, 2, b"scope") + _field(2, 2, b"1.0"))
    spans = _field(2, 2, span)
    ss = spans + scope if scope_last else scope + spans
    ss += _span_bytes([(n + 2, wt, p) for n, wt, p in outer])  # fields 3.. of ScopeSpans: schema_url and unknown ones
    resource = _field(1, 2, _field(1, 2, b"\x0a\x0cservice.name\x12\x03\x0a\x01s"))
    rs = _field(1, 2, resource + _field(2, 2, ss))
    assert_same(rs)


def _pad(n: int, extra: int) -> bytes:
    """``n`` as a varint padded with ``extra`` redundant bytes (legal up to upb's limits, then not)."""
    out = bytearray(varint(n))
    if extra:
        out[-1] |= 0x80
        out += b"\x80" * (extra - 1) + b"\x00"
    return bytes(out)


def _parse(b: bytes) -> list[tuple[int, int, Any]] | None:
    """The fields of ``b`` if it reads as one clean protobuf message, else None."""
    fields, i = [], 0
    try:
        while i < len(b):
            tag, i = _read_varint(b, i)
            num, wt = tag >> 3, tag & 7
            if num == 0:
                return None
            if wt == 0:
                v, i = _read_varint(b, i)
            elif wt == 1 or wt == 5:
                size = 8 if wt == 1 else 4
                if i + size > len(b):
                    return None
                v, i = b[i:i + size], i + size
            elif wt == 2:
                n, i = _read_varint(b, i)
                if i + n > len(b):
                    return None
                v, i = b[i:i + n], i + n
            else:
                return None
            fields.append((num, wt, v))
    except IndexError:
        return None
    return fields


def _read_varint(b: bytes, i: int) -> tuple[int, int]:
    x = shift = 0
    while True:
        c = b[i]
        i += 1
        x |= (c & 0x7F) << shift
        if c < 0x80 or shift > 70:
            return x, i
        shift += 7


def _reencode(b: bytes, rnd: random.Random, depth: int = 0) -> bytes:
    """``b`` with varints (tags, lengths, values) at random places written with redundant bytes."""
    fields = _parse(b) if depth < 10 else None
    if fields is None:
        return b
    pad = lambda: 0 if rnd.random() < 0.8 else rnd.choice([1, 2, 3, 4, 5, 9])  # noqa: E731
    out = b""
    for num, wt, v in fields:
        out += _pad(num << 3 | wt, pad())
        if wt == 0:
            out += _pad(v, pad())
        elif wt == 2:
            inner = _reencode(v, rnd, depth + 1)
            out += _pad(len(inner), pad()) + inner
        else:
            out += v
    return out


@SETTINGS
@given(st.sampled_from(BODIES), st.randoms(use_true_random=False))
def test_redundant_varint_bytes(body: bytes, rnd: random.Random) -> None:
    # upb takes tags and lengths of up to 5 bytes and values of up to 10: both decoders must draw the same line
    assert_same(_reencode(body, rnd))


@SETTINGS
@given(st.binary(max_size=40), st.sampled_from([b"", b"\x0a", b"\x18", b"\x21", b"\x10", b"\x2a", b"\x32", b"\x3a", b"\x12"]),
       st.binary(max_size=12))
def test_hand_made_attribute_encodings(key: bytes, tag: bytes, value: bytes) -> None:
    inner = tag + value
    blob = _field(1, 2, key) + _field(2, 2, inner)
    fast = fast_request(_one_span_request())
    fast.resource_spans[0].scope_spans[0].spans[0].attributes.extend([blob, blob[:-1] if blob else b"", blob + b"\x00"])
    assert_same(fast.SerializeToString())
    assert_same(fast.SerializeToString(), 4)


# ------------------------------------------------------------------ selection


def test_decoder_setting_and_what_the_server_says(make_server: Any) -> None:
    import httpx

    assert otlp.active_decoder("auto") == "compiled" and otlp.active_decoder("python") == "python"
    with pytest.raises(ValueError):
        otlp.active_decoder("fast")
    for setting, name in (("auto", "compiled"), ("python", "python")):
        srv = make_server(decoder=setting)
        health = httpx.get(srv.url + "/healthz", timeout=10).json()
        assert health["decoder"] == name
        metrics = httpx.get(srv.url + "/metrics", timeout=10).text
        assert f'tailscope_ingest_decoder_info{{decoder="{name}"}} 1' in metrics
        req, ids = request_spans(5)
        r = httpx.post(srv.url + "/v1/traces", content=req.SerializeToString(), headers={"content-type": PROTOBUF}, timeout=30)
        assert r.status_code == 200
        assert srv.sql("SELECT count(*) FROM spans")[0][0] == 5


def test_decode_refuses_an_unknown_decoder() -> None:
    with pytest.raises(ValueError):
        decode("traces", b"", PROTOBUF, decoder="fast")

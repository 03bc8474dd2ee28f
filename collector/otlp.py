"""OTLP export requests (protobuf or JSON) → Arrow tables for the store.

Entry points (the ingest pipeline and the gRPC services call these):

* :func:`decompress` — ``Content-Encoding`` handling with a size limit
  (re-exported from ``collector.compression``).
* :func:`decode` — an HTTP body of ``application/x-protobuf`` or
  ``application/json`` for ``"traces"``, ``"metrics"`` or ``"logs"``.
* :func:`decode_message` — an already parsed ``Export*ServiceRequest`` (gRPC).

Protobuf traces go to the compiled decoder (``collector.otlp_c``, a C walk of
the wire format) when it is built, unless ``decoder="python"``; it produces the
same tables as the Python code here, which stays the definition of what is
stored and decodes every body the C walker hands back (anything unusual).

Whole-body problems raise :class:`BadPayload` (or :class:`UnsupportedMediaType`,
status 415). Invalid *items* — a span with a zero trace id, a log record
without a time — are dropped and counted in ``Decoded.rejected`` with a reason
in ``Decoded.errors`` (OTLP partial success); the rest of the body is kept.

Why a private copy of the OTLP descriptors: the stock generated classes turn
every attribute into two wrapper objects plus a oneof lookup, which costs more
than everything else in ingest. The copy declares ``attributes`` fields as
``repeated bytes`` (the wire format of a sub-message and of bytes is the same),
so upb hands over each ``KeyValue``'s encoding untouched and
``collector.attributes`` decodes each distinct one once per batch.

Metric data points: gauges and sums put their number in ``value``;
histograms fill ``count``/``sum``/``bucket_counts``/``explicit_bounds``;
exponential histograms and summaries fill ``count``/``sum``. Whatever has no
column is kept in the point's ``attributes`` JSON under keys starting with
``_``: ``_temporality`` (``DELTA``/``CUMULATIVE``, sums and histograms),
``_min``/``_max`` (histograms), ``_scale``, ``_zero_count``,
``_zero_threshold``, ``_positive``/``_negative`` (``{offset, bucket_counts}``)
for exponential histograms, ``_quantiles`` (``[{quantile, value}]``) for
summaries, ``_int_value`` when an integer point does not fit a double exactly.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from collector import attributes as A
from collector.compression import decompress  # noqa: F401  (part of this module's interface)
from collector.decoded import Decoded
from collector.schema import LOG_ATTR_COLUMNS, METRIC_ATTR_COLUMNS, RESOURCE_COLUMNS, SPAN_ATTR_COLUMNS, AttrColumn
from tailscope.errors import BadPayload, PayloadTooLarge  # noqa: F401

SIGNALS = ("traces", "metrics", "logs")
PROTOBUF = "application/x-protobuf"
JSON = "application/json"
ACCEPTED_TYPES = (PROTOBUF, JSON)


class UnsupportedMediaType(BadPayload):
    """The body's Content-Type is neither OTLP protobuf nor OTLP JSON."""

    status = 415


# ------------------------------------------------------------------ time limits

# Before 1970-01-02 or after 2200-01-01 a timestamp is a bug (unset clock,
# seconds sent as nanoseconds, ...), not telemetry.
MIN_NS = 86_400 * 10**9
MAX_NS = 7_258_118_400 * 10**9
_U64_MAX = (1 << 64) - 1

_KIND_ARROW = pa.array(["UNSPECIFIED", "INTERNAL", "SERVER", "CLIENT", "PRODUCER", "CONSUMER"], pa.string())
_STATUS_ARROW = pa.array(["UNSET", "OK", "ERROR"], pa.string())
_TEMPORALITY = {0: "UNSPECIFIED", 1: "DELTA", 2: "CUMULATIVE"}

_LOG_EVENT_NAME = AttrColumn("event_name", "VARCHAR", "str", ("event.name",))

RESOURCE_LIFTER = A.Lifter(RESOURCE_COLUMNS)
SPAN_LIFTER = A.Lifter(SPAN_ATTR_COLUMNS)
# a record's own event_name field wins over the event.name attribute, which
# therefore stays in the JSON column
LOG_LIFTER = A.Lifter(LOG_ATTR_COLUMNS + (_LOG_EVENT_NAME,), keep_in_json=("event_name",))
METRIC_LIFTER = A.Lifter(METRIC_ATTR_COLUMNS)
PLAIN_LIFTER = A.Lifter(())

_TS = pa.timestamp("us")


# ------------------------------------------------------------- descriptors


def _fast_classes() -> tuple[dict[str, Any], Any, Any]:
    """Request classes whose ``attributes`` fields are raw bytes (see module docstring)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
    from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
    from opentelemetry.proto.common.v1 import common_pb2
    from opentelemetry.proto.logs.v1 import logs_pb2
    from opentelemetry.proto.metrics.v1 import metrics_pb2
    from opentelemetry.proto.resource.v1 import resource_pb2
    from opentelemetry.proto.trace.v1 import trace_pb2

    kv_type = ".opentelemetry.proto.common.v1.KeyValue"
    pool = descriptor_pool.DescriptorPool()

    def patch(messages: Any) -> None:
        for m in messages:
            for f in m.field:
                if f.name == "attributes" and f.type_name == kv_type:
                    f.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
                    f.ClearField("type_name")
            patch(m.nested_type)

    for mod in (common_pb2, resource_pb2, trace_pb2, logs_pb2, metrics_pb2,
                trace_service_pb2, logs_service_pb2, metrics_service_pb2):
        fdp = descriptor_pb2.FileDescriptorProto()
        mod.DESCRIPTOR.CopyToProto(fdp)
        patch(fdp.message_type)
        pool.Add(fdp)
    names = {
        "traces": "opentelemetry.proto.collector.trace.v1.ExportTraceServiceRequest",
        "metrics": "opentelemetry.proto.collector.metrics.v1.ExportMetricsServiceRequest",
        "logs": "opentelemetry.proto.collector.logs.v1.ExportLogsServiceRequest",
    }
    classes = {s: message_factory.GetMessageClass(pool.FindMessageTypeByName(n)) for s, n in names.items()}
    return classes, common_pb2.KeyValue, logs_pb2.SeverityNumber


_REQUEST, _KV, _SEVERITY = _fast_classes()


# ------------------------------------------------------------------ entry points


DECODERS = ("auto", "python", "compiled")


def compiled_available() -> bool:
    """Whether the compiled traces decoder (collector/_otlpfast.c) is built and imports."""
    from collector import otlp_c

    return otlp_c.AVAILABLE


def active_decoder(decoder: str = "auto") -> str:
    """``"compiled"`` or ``"python"``: what decodes OTLP protobuf traces under the ``decoder`` setting."""
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; expected one of {DECODERS}")
    if decoder == "python":
        return "python"
    if compiled_available():
        return "compiled"
    if decoder == "compiled":
        from collector import otlp_c

        raise RuntimeError(f"the compiled OTLP decoder is not built: {otlp_c.IMPORT_ERROR}")
    return "python"


def decode(signal: str, body: bytes, content_type: str | None, *, max_attribute_bytes: int = 65536,
           decoder: str = "auto") -> Decoded:
    """Decode one OTLP/HTTP request body.

    Args:
        signal: ``"traces"``, ``"metrics"`` or ``"logs"``.
        body: the (already decompressed) body.
        content_type: the Content-Type header; parameters such as ``charset``
            are allowed.
        max_attribute_bytes: longer string values are cut (``truncated_values``).
        decoder: for protobuf traces, ``"auto"`` uses the compiled decoder
            (collector.otlp_c) when it is built, ``"python"`` never does,
            ``"compiled"`` requires it. Both give the same result; the compiled
            one hands bodies it does not fully understand to the Python code.

    Raises:
        UnsupportedMediaType: neither protobuf nor JSON (HTTP 415).
        BadPayload: the body is not a valid OTLP request of that signal.
    """
    _check_signal(signal)
    if not isinstance(body, bytes):
        body = bytes(body)  # bytearray / memoryview from a transport
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media == PROTOBUF:
        if signal == "traces" and active_decoder(decoder) == "compiled":
            from collector import otlp_c

            fast = _guard(otlp_c.decode_traces, body, max_attribute_bytes)
            if fast is not None:
                return fast
        from google.protobuf.message import DecodeError

        try:
            message = _REQUEST[signal].FromString(body)
        except DecodeError as exc:
            raise BadPayload(f"invalid OTLP protobuf {signal} body: {exc}") from None
        return _guard(_PB[signal], message, max_attribute_bytes)
    if media == JSON:
        from collector import otlp_json

        return otlp_json.decode_json(signal, body, max_attribute_bytes)
    raise UnsupportedMediaType(
        f"unsupported Content-Type {content_type!r}; send {PROTOBUF} or {JSON}"
    )


def decode_message(signal: str, message: Any, *, max_attribute_bytes: int = 65536) -> Decoded:
    """Decode a parsed ``Export{Trace,Metrics,Logs}ServiceRequest`` (the gRPC path).

    The message is re-encoded (fast, in C) and parsed with this module's
    byte-attribute classes so both transports share one decoder.
    """
    _check_signal(signal)
    cls = _REQUEST[signal]
    if not isinstance(message, cls):
        from google.protobuf.message import DecodeError

        try:
            message = cls.FromString(message.SerializeToString())
        except (DecodeError, AttributeError) as exc:
            raise BadPayload(f"invalid OTLP {signal} request: {exc}") from None
    return _guard(_PB[signal], message, max_attribute_bytes)


def warm_up() -> None:
    """Decode one small request of each signal, protobuf and JSON, and discard it.

    The first decode in a process pays about a second for Arrow kernel and
    regex set-up; a decode worker calls this when it starts so that no client
    request waits for it.
    """
    from collector.otlp_json import to_otlp_json
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    import json

    t = 1_700_000_000 * 10**9
    traces = ExportTraceServiceRequest()
    rs = traces.resource_spans.add()
    rs.resource.attributes.add(key="service.name").value.string_value = "warm-up"
    span = rs.scope_spans.add().spans.add(trace_id=b"\x01" * 16, span_id=b"\x02" * 8, parent_span_id=b"\x03" * 8,
                                          name="warm-up", kind=2, start_time_unix_nano=t, end_time_unix_nano=t + 1)
    for key, setter in (("gen_ai.usage.input_tokens", "int_value"), ("gen_ai.latency.e2e", "double_value"),
                        ("tailscope.role", "string_value"), ("flag", "bool_value")):
        setattr(span.attributes.add(key=key).value, setter, {"int_value": 1, "double_value": 0.5,
                                                              "string_value": 'a"b', "bool_value": True}[setter])
    span.attributes.add(key="list").value.array_value.values.add().int_value = 1
    span.events.add(name="e", time_unix_nano=t)
    span.links.add(trace_id=b"\x04" * 16, span_id=b"\x05" * 8)
    logs = ExportLogsServiceRequest()
    rec = logs.resource_logs.add().scope_logs.add().log_records.add(time_unix_nano=t, event_name="warm-up")
    rec.body.string_value = "warm-up"
    rec.attributes.add(key="tailscope.kv.blocks").value.int_value = 1
    metrics = ExportMetricsServiceRequest()
    m = metrics.resource_metrics.add().scope_metrics.add().metrics.add(name="warm-up")
    m.gauge.data_points.add(time_unix_nano=t, as_double=1.0).attributes.add(key="gpu.index").value.int_value = 0
    for signal, req in (("traces", traces), ("logs", logs), ("metrics", metrics)):
        decode(signal, req.SerializeToString(), PROTOBUF)
        decode(signal, json.dumps(to_otlp_json(req)).encode(), JSON)


def _check_signal(signal: str) -> None:
    if signal not in SIGNALS:
        raise ValueError(f"unknown OTLP signal {signal!r}; expected one of {SIGNALS}")


def _guard(fn: Callable[[Any, int], Any], message: Any, limit: int) -> Any:
    """Turn Arrow / Unicode failures on hostile input into BadPayload."""
    try:
        return fn(message, limit)
    except (pa.ArrowException, UnicodeError, OverflowError) as exc:
        raise BadPayload(f"body contains a value that cannot be stored: {str(exc)[:200]}") from None


# ------------------------------------------------------------------ resources


class Resources:
    """Distinct resources of one request: their typed columns and JSON."""

    def __init__(self) -> None:
        self.rows: list[list[Any]] = []
        self.json: list[str] = []

    def add(self, pairs: list[tuple[str, Any]]) -> int:
        row, rest = RESOURCE_LIFTER.lift_row(pairs)
        self.rows.append(row)
        self.json.append(A.pairs_json(rest))
        return len(self.rows) - 1

    def columns(self, res_idx: np.ndarray) -> dict[str, pa.Array]:
        idx = pa.array(res_idx, pa.int64())
        out: dict[str, pa.Array] = {}
        for ci, col in enumerate(RESOURCE_LIFTER.columns):
            out[col.column] = pa.array([r[ci] for r in self.rows], RESOURCE_LIFTER.types[ci]).take(idx)
        out["resource_attributes"] = pa.array(self.json, pa.string()).take(idx)
        return out


def pb_pairs(blobs: Any, limit: int, trunc: A.Counter) -> list[tuple[str, Any]]:
    return [A.decode_kv_blob(b, limit, trunc, _KV) for b in blobs]


class Attrs:
    """Attribute lists of one kind of item, raw (protobuf bytes) or decoded (JSON)."""

    def __init__(self, raw: bool) -> None:
        self.raw = raw
        self.flat: list[Any] = []
        self.counts: list[int] = []

    def columns(self, lifter: A.Lifter, limit: int) -> A.AttrColumns:
        if self.raw:
            entries, index = lifter.pb_entries(self.flat, limit, _KV)
        else:  # OTLP/JSON: values were decoded (and cut) by the walker
            entries = lifter.py_entries(self.flat)
            index = np.arange(len(self.flat), dtype=np.int64)
        return A.columns(lifter, entries, index, self.counts)


def _ns(values: list[int]) -> np.ndarray:
    return np.array(values, dtype=np.uint64) if values else np.zeros(0, dtype=np.uint64)


def _in_range(ns: np.ndarray) -> np.ndarray:
    return (ns >= MIN_NS) & (ns <= MAX_NS)


def _keep(table: pa.Table, keep: np.ndarray) -> pa.Table:
    """The rows of ``table`` where ``keep`` is true (no copy when all are kept)."""
    return table if keep.all() else table.filter(pa.array(keep, pa.bool_()))


def _ts(ns: np.ndarray) -> pa.Array:
    us = np.ascontiguousarray((ns // 1000).astype(np.int64))
    return pa.Array.from_buffers(_TS, len(us), [None, pa.py_buffer(us)])


class Ids:
    """A column of binary ids: which are well formed, and their lowercase hex (null if not)."""

    __slots__ = ("length", "valid", "empty", "hex")

    def __init__(self, ids: list[bytes], size: int) -> None:
        hexes = pa.array([b.hex() for b in ids], pa.string())
        self.length = pc.binary_length(hexes).to_numpy(zero_copy_only=False) // 2
        self.empty = self.length == 0
        nonzero = pc.not_equal(hexes, "0" * (2 * size)).to_numpy(zero_copy_only=False)
        self.valid = (self.length == size) & nonzero
        if self.valid.all():
            self.hex = hexes
        else:
            self.hex = pc.if_else(pa.array(self.valid, pa.bool_()), hexes, pa.scalar(None, pa.string()))


class Reasons:
    """Counts rejected items per reason; phrased once per reason, not per item."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.keep: np.ndarray | None = None
        self.errors: list[str] = []
        self.rejected = 0

    def check(self, ok: np.ndarray, reason: str) -> None:
        if self.keep is None:
            self.keep = np.ones(len(ok), dtype=bool)
        bad = int(np.count_nonzero(self.keep & ~ok))
        if bad:
            self.errors.append(f"{bad} {self.what} rejected: {reason}")
            self.rejected += bad
            self.keep &= ok


# -------------------------------------------------------------------- traces


class SpanBatch:
    """Column lists for spans, span events and links, filled by a walker."""

    def __init__(self, raw: bool) -> None:
        self.resources = Resources()
        self.trunc = A.Counter()
        self.tids: list[bytes] = []
        self.sids: list[bytes] = []
        self.pids: list[bytes] = []
        self.names: list[str] = []
        self.kinds: list[int] = []
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.scodes: list[int] = []
        self.smsgs: list[str | None] = []
        self.scopes: list[str | None] = []
        self.res_idx: list[int] = []
        self.attrs = Attrs(raw)
        self.ev_span: list[int] = []
        self.ev_time: list[int] = []
        self.ev_name: list[str] = []
        self.ev_attrs = Attrs(raw)
        self.ln_span: list[int] = []
        self.ln_tid: list[bytes] = []
        self.ln_sid: list[bytes] = []
        self.ln_attrs = Attrs(raw)

    def finish(self, limit: int) -> Decoded:
        n = len(self.tids)
        out = Decoded("traces")
        if n == 0:
            return out
        st, en = _ns(self.starts), _ns(self.ends)
        tids, sids, pids = Ids(self.tids, 16), Ids(self.sids, 8), Ids(self.pids, 8)
        r = Reasons("span(s)")
        r.check(tids.valid, "trace_id must be 16 bytes and not all zero")
        r.check(sids.valid, "span_id must be 8 bytes and not all zero")
        r.check(pids.empty | (pids.length == 8), "parent_span_id must be empty or 8 bytes")
        r.check(_in_range(st) & _in_range(en), "start/end time missing or outside 1970-01-02..2200-01-01")
        r.check(en >= st, "end time before start time")
        keep = r.keep
        assert keep is not None

        tid_hex, sid_hex = tids.hex, sids.hex
        has_parent = pids.valid  # an all-zero parent id means "no parent"
        kinds = np.array(self.kinds, dtype=np.int64)
        scodes = np.array(self.scodes, dtype=np.int64)
        res_idx = np.array(self.res_idx, dtype=np.int64)
        ac = self.attrs.columns(SPAN_LIFTER, limit)

        cols: dict[str, pa.Array] = {
            "trace_id": tid_hex,
            "span_id": sid_hex,
            "parent_span_id": pids.hex,
            "name": pa.array(self.names, pa.string()),
            "kind": _KIND_ARROW.take(pa.array(np.where((kinds >= 0) & (kinds <= 5), kinds, 0), pa.int64())),
            "start_time": _ts(st),
            "end_time": _ts(en),
            "duration_ms": pa.array((en.astype(np.int64) - st.astype(np.int64)) / 1e6, pa.float64()),
            "status_code": _STATUS_ARROW.take(pa.array(np.where((scodes >= 0) & (scodes <= 2), scodes, 0), pa.int64())),
            "status_message": pa.array(self.smsgs, pa.string()),
            "scope_name": pa.array(self.scopes, pa.string()),
        }
        res_cols = self.resources.columns(res_idx)
        for col in RESOURCE_LIFTER.names:
            cols[col] = res_cols[col]
        for name, arr in zip(SPAN_LIFTER.names, ac.lifted):
            cols[name] = arr
        # vLLM's llm_request: root SERVER span with gen_ai.* attributes, no role
        role = cols["role"]
        default = pc.is_null(role).to_numpy(zero_copy_only=False) & ~has_parent & (kinds == 2) & ac.gen_ai
        if default.any():
            cols["role"] = pc.if_else(pa.array(default, pa.bool_()), "request", role)
        cols["attributes"] = ac.json
        cols["resource_attributes"] = res_cols["resource_attributes"]
        out.tables["spans"] = _keep(pa.table(cols), keep)
        out.accepted = int(np.count_nonzero(keep))
        out.rejected = r.rejected
        out.errors = r.errors
        out.truncated_values = ac.truncated + self.trunc.n

        if self.ev_span:
            ev_span = np.array(self.ev_span, dtype=np.int64)
            ev_ns = _ns(self.ev_time)
            ev_ok = _in_range(ev_ns)
            dropped = int(np.count_nonzero(keep[ev_span] & ~ev_ok))
            if dropped:
                out.errors.append(f"{dropped} span event(s) dropped: time missing or outside 1970-01-02..2200-01-01")
            eac = self.ev_attrs.columns(PLAIN_LIFTER, limit)
            out.truncated_values += eac.truncated
            idx = pa.array(ev_span, pa.int64())
            ev = pa.table({
                "trace_id": tid_hex.take(idx),
                "span_id": sid_hex.take(idx),
                "time": _ts(ev_ns),
                "name": pa.array(self.ev_name, pa.string()),
                "service_name": res_cols["service_name"].take(idx),
                "attributes": eac.json,
            })
            out.tables["span_events"] = _keep(ev, keep[ev_span] & ev_ok)
        if self.ln_span:
            ln_span = np.array(self.ln_span, dtype=np.int64)
            ln_tid, ln_sid = Ids(self.ln_tid, 16), Ids(self.ln_sid, 8)
            ln_ok = ln_tid.valid & ln_sid.valid
            dropped = int(np.count_nonzero(keep[ln_span] & ~ln_ok))
            if dropped:
                out.errors.append(f"{dropped} span link(s) dropped: linked trace_id/span_id must be 16/8 bytes and not all zero")
            lac = self.ln_attrs.columns(PLAIN_LIFTER, limit)
            out.truncated_values += lac.truncated
            idx = pa.array(ln_span, pa.int64())
            ln = pa.table({
                "trace_id": tid_hex.take(idx),
                "span_id": sid_hex.take(idx),
                "linked_trace_id": ln_tid.hex,
                "linked_span_id": ln_sid.hex,
                "attributes": lac.json,
            })
            out.tables["span_links"] = _keep(ln, keep[ln_span] & ln_ok)
        return out


def _cut(s: str, limit: int, trunc: A.Counter) -> str:
    if len(s) * 4 > limit:
        s, cut = A.truncate_str(s, limit)
        trunc.n += cut
    return s


def _traces_pb(req: Any, limit: int) -> Decoded:
    b = SpanBatch(raw=True)
    trunc = b.trunc
    tids, sids, pids = b.tids.append, b.sids.append, b.pids.append
    names, kinds = b.names.append, b.kinds.append
    starts, ends = b.starts.append, b.ends.append
    scodes, smsgs = b.scodes.append, b.smsgs.append
    flat, counts = b.attrs.flat.extend, b.attrs.counts.append
    for rs in req.resource_spans:
        ri = b.resources.add(pb_pairs(rs.resource.attributes, limit, trunc))
        for ss in rs.scope_spans:
            spans = ss.spans
            first = len(b.tids)
            for s in spans:
                tids(s.trace_id)
                sids(s.span_id)
                pids(s.parent_span_id)
                name = s.name
                names(name if len(name) * 4 <= limit else _cut(name, limit, trunc))
                kinds(s.kind)
                starts(s.start_time_unix_nano)
                ends(s.end_time_unix_nano)
                st = s.status
                scodes(st.code)
                msg = st.message
                smsgs(_cut(msg, limit, trunc) if msg else None)
                a = s.attributes
                flat(a)
                counts(len(a))
                if s.events:
                    _pb_events(b, len(b.tids) - 1, s.events, limit)
                if s.links:
                    _pb_links(b, len(b.tids) - 1, s.links)
            k = len(b.tids) - first
            b.scopes.extend([ss.scope.name or None] * k)
            b.res_idx.extend([ri] * k)
    return b.finish(limit)


def _pb_events(b: SpanBatch, si: int, events: Any, limit: int) -> None:
    for ev in events:
        b.ev_span.append(si)
        b.ev_time.append(ev.time_unix_nano)
        b.ev_name.append(_cut(ev.name, limit, b.trunc))
        b.ev_attrs.flat.extend(ev.attributes)
        b.ev_attrs.counts.append(len(ev.attributes))


def _pb_links(b: SpanBatch, si: int, links: Any) -> None:
    for ln in links:
        b.ln_span.append(si)
        b.ln_tid.append(ln.trace_id)
        b.ln_sid.append(ln.span_id)
        b.ln_attrs.flat.extend(ln.attributes)
        b.ln_attrs.counts.append(len(ln.attributes))


# ---------------------------------------------------------------------- logs


class LogBatch:
    """Column lists for log records."""

    def __init__(self, raw: bool) -> None:
        self.resources = Resources()
        self.trunc = A.Counter()
        self.times: list[int] = []
        self.observed: list[int] = []
        self.event_names: list[str | None] = []
        self.sev_num: list[int] = []
        self.sev_text: list[str | None] = []
        self.bodies: list[str | None] = []
        self.tids: list[bytes] = []
        self.sids: list[bytes] = []
        self.scopes: list[str | None] = []
        self.res_idx: list[int] = []
        self.attrs = Attrs(raw)

    def finish(self, limit: int) -> Decoded:
        n = len(self.times)
        out = Decoded("logs")
        if n == 0:
            return out
        t, o = _ns(self.times), _ns(self.observed)
        time_ns = np.where(t != 0, t, o)
        tids, sids = Ids(self.tids, 16), Ids(self.sids, 8)
        r = Reasons("log record(s)")
        r.check(_in_range(time_ns), "time and observed time missing or outside 1970-01-02..2200-01-01")
        r.check(tids.empty | tids.valid, "trace_id must be empty or 16 bytes, not all zero")
        r.check(sids.empty | sids.valid, "span_id must be empty or 8 bytes, not all zero")
        keep = r.keep
        assert keep is not None
        ac = self.attrs.columns(LOG_LIFTER, limit)
        lifted = dict(zip(LOG_LIFTER.names, ac.lifted))
        ev_attr = lifted.pop("event_name")
        ev_field = pa.array(self.event_names, pa.string())
        res_cols = self.resources.columns(np.array(self.res_idx, dtype=np.int64))
        obs_ok = _in_range(o)
        cols: dict[str, pa.Array] = {
            "time": _ts(time_ns),
            "observed_time": pa.array((o // 1000).astype(np.int64), _TS, mask=~obs_ok),
            "event_name": pc.coalesce(ev_field, ev_attr),
            "severity_number": pa.array(self.sev_num, pa.int32()),
            "severity_text": pa.array(self.sev_text, pa.string()),
            "body": pa.array(self.bodies, pa.string()),
            "trace_id": tids.hex,
            "span_id": sids.hex,
            "scope_name": pa.array(self.scopes, pa.string()),
        }
        for col in RESOURCE_LIFTER.names:
            cols[col] = res_cols[col]
        cols.update(lifted)
        cols["attributes"] = ac.json
        cols["resource_attributes"] = res_cols["resource_attributes"]
        out.tables["logs"] = _keep(pa.table(cols), keep)
        out.accepted = int(np.count_nonzero(keep))
        out.rejected = r.rejected
        out.errors = r.errors
        out.truncated_values = ac.truncated + self.trunc.n
        return out


def body_text(v: Any) -> str | None:
    """A log body as stored: text as itself, anything else as JSON."""
    if v is None or type(v) is str:
        return v
    return A.value_json(v)


def _logs_pb(req: Any, limit: int) -> Decoded:
    b = LogBatch(raw=True)
    trunc = b.trunc
    for rl in req.resource_logs:
        ri = b.resources.add(pb_pairs(rl.resource.attributes, limit, trunc))
        for sl in rl.scope_logs:
            records = sl.log_records
            for lr in records:
                b.times.append(lr.time_unix_nano)
                b.observed.append(lr.observed_time_unix_nano)
                b.event_names.append(_cut(lr.event_name, limit, trunc) or None)
                b.sev_num.append(lr.severity_number)
                b.sev_text.append(_cut(lr.severity_text, limit, trunc) or None)
                b.bodies.append(body_text(A.pb_value(lr.body, limit, trunc)) if lr.HasField("body") else None)
                b.tids.append(lr.trace_id)
                b.sids.append(lr.span_id)
                a = lr.attributes
                b.attrs.flat.extend(a)
                b.attrs.counts.append(len(a))
            b.scopes.extend([sl.scope.name or None] * len(records))
            b.res_idx.extend([ri] * len(records))
    return b.finish(limit)


# ------------------------------------------------------------------- metrics


class MetricBatch:
    """Column lists for metric data points (one row per point)."""

    def __init__(self, raw: bool) -> None:
        self.resources = Resources()
        self.trunc = A.Counter()
        self.times: list[int] = []
        self.starts: list[int] = []
        self.names: list[str] = []
        self.types: list[str] = []
        self.units: list[str | None] = []
        self.values: list[float | None] = []
        self.counts: list[int | None] = []
        self.sums: list[float | None] = []
        self.buckets: list[list[int] | None] = []
        self.bounds: list[list[float] | None] = []
        self.monotonic: list[bool | None] = []
        self.extras: list[dict[str, Any] | None] = []
        self.scopes: list[str | None] = []
        self.res_idx: list[int] = []
        self.attrs = Attrs(raw)

    def point(self, name: str, typ: str, unit: str | None, time_ns: int, start_ns: int, value: float | None = None,
              count: int | None = None, total: float | None = None, buckets: list[int] | None = None,
              bounds: list[float] | None = None, monotonic: bool | None = None, extras: dict[str, Any] | None = None) -> None:
        self.names.append(name)
        self.types.append(typ)
        self.units.append(unit)
        self.times.append(time_ns)
        self.starts.append(start_ns)
        self.values.append(value)
        self.counts.append(count)
        self.sums.append(total)
        self.buckets.append(buckets)
        self.bounds.append(bounds)
        self.monotonic.append(monotonic)
        self.extras.append(extras)

    def finish(self, limit: int) -> Decoded:
        n = len(self.times)
        out = Decoded("metrics")
        if n == 0:
            return out
        t, s = _ns(self.times), _ns(self.starts)
        r = Reasons("metric point(s)")
        r.check(_in_range(t), "time missing or outside 1970-01-02..2200-01-01")
        r.check(np.fromiter((bool(x) for x in self.names), dtype=bool, count=n), "metric name is empty")
        keep = r.keep
        assert keep is not None
        ac = self.attrs.columns(METRIC_LIFTER, limit)
        json_col = ac.json
        if any(e is not None for e in self.extras):
            texts = json_col.to_pylist()
            for i, extra in enumerate(self.extras):
                if extra:
                    frag = ",".join(A._jstr(k) + ":" + A.value_json(v) for k, v in extra.items())
                    texts[i] = texts[i][:-1] + ("," if texts[i] != "{}" else "") + frag + "}"
            json_col = pa.array(texts, pa.string())
        res_cols = self.resources.columns(np.array(self.res_idx, dtype=np.int64))
        cols: dict[str, pa.Array] = {
            "time": _ts(t),
            "start_time": pa.array((s // 1000).astype(np.int64), _TS, mask=~_in_range(s)),
            "name": pa.array(self.names, pa.string()),
            "type": pa.array(self.types, pa.string()),
            "unit": pa.array(self.units, pa.string()),
            "value": pa.array(self.values, pa.float64()),
            "count": pa.array(self.counts, pa.int64()),
            "sum": pa.array(self.sums, pa.float64()),
            "bucket_counts": pa.array(self.buckets, pa.list_(pa.int64())),
            "explicit_bounds": pa.array(self.bounds, pa.list_(pa.float64())),
            "is_monotonic": pa.array(self.monotonic, pa.bool_()),
            "scope_name": pa.array(self.scopes, pa.string()),
        }
        for col in RESOURCE_LIFTER.names:
            cols[col] = res_cols[col]
        cols.update(zip(METRIC_LIFTER.names, ac.lifted))
        cols["attributes"] = json_col
        cols["resource_attributes"] = res_cols["resource_attributes"]
        out.tables["metrics"] = _keep(pa.table(cols), keep)
        out.accepted = int(np.count_nonzero(keep))
        out.rejected = r.rejected
        out.errors = r.errors
        out.truncated_values = ac.truncated + self.trunc.n
        return out


def number(as_double: float, as_int: int, is_int: bool) -> tuple[float, dict[str, Any] | None]:
    """A number point's value as a double, plus ``_int_value`` when that loses digits."""
    if not is_int:
        return as_double, None
    f = float(as_int)
    return f, (None if abs(as_int) <= 1 << 53 else {"_int_value": as_int})


def _metrics_pb(req: Any, limit: int) -> Decoded:
    b = MetricBatch(raw=True)
    trunc = b.trunc
    for rm in req.resource_metrics:
        ri = b.resources.add(pb_pairs(rm.resource.attributes, limit, trunc))
        for sm in rm.scope_metrics:
            first = len(b.times)
            for m in sm.metrics:
                _pb_metric(b, m, limit)
            k = len(b.times) - first
            b.scopes.extend([sm.scope.name or None] * k)
            b.res_idx.extend([ri] * k)
    return b.finish(limit)


def _pb_metric(b: MetricBatch, m: Any, limit: int) -> None:
    name = _cut(m.name, limit, b.trunc)
    unit = m.unit or None
    which = m.WhichOneof("data")
    if which is None:
        return
    data = getattr(m, which)
    attrs = b.attrs
    for dp in data.data_points:
        attrs.flat.extend(dp.attributes)
        attrs.counts.append(len(dp.attributes))
        t, s = dp.time_unix_nano, dp.start_time_unix_nano
        if which == "gauge" or which == "sum":
            v, extra = number(dp.as_double, dp.as_int, dp.WhichOneof("value") == "as_int")
            if which == "sum":
                extra = dict(extra or {}, _temporality=_TEMPORALITY.get(data.aggregation_temporality, str(data.aggregation_temporality)))
                b.point(name, "sum", unit, t, s, value=v, monotonic=data.is_monotonic, extras=extra)
            else:
                b.point(name, "gauge", unit, t, s, value=v, extras=extra)
        elif which == "histogram":
            extra: dict[str, Any] = {"_temporality": _TEMPORALITY.get(data.aggregation_temporality, str(data.aggregation_temporality))}
            if dp.HasField("min"):
                extra["_min"] = dp.min
            if dp.HasField("max"):
                extra["_max"] = dp.max
            b.point(name, "histogram", unit, t, s, count=dp.count, total=dp.sum if dp.HasField("sum") else None,
                    buckets=list(dp.bucket_counts), bounds=list(dp.explicit_bounds), extras=extra)
        elif which == "exponential_histogram":
            extra = {
                "_temporality": _TEMPORALITY.get(data.aggregation_temporality, str(data.aggregation_temporality)),
                "_scale": dp.scale,
                "_zero_count": dp.zero_count,
                "_zero_threshold": dp.zero_threshold,
                "_positive": {"offset": dp.positive.offset, "bucket_counts": list(dp.positive.bucket_counts)},
                "_negative": {"offset": dp.negative.offset, "bucket_counts": list(dp.negative.bucket_counts)},
            }
            if dp.HasField("min"):
                extra["_min"] = dp.min
            if dp.HasField("max"):
                extra["_max"] = dp.max
            b.point(name, "exponential_histogram", unit, t, s, count=dp.count,
                    total=dp.sum if dp.HasField("sum") else None, extras=extra)
        else:  # summary
            extra = {"_quantiles": [{"quantile": q.quantile, "value": q.value} for q in dp.quantile_values]}
            b.point(name, "summary", unit, t, s, count=dp.count, total=dp.sum, extras=extra)


_PB: dict[str, Callable[[Any, int], Decoded]] = {"traces": _traces_pb, "logs": _logs_pb, "metrics": _metrics_pb}

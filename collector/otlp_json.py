"""OTLP/JSON request bodies → the same column batches as the protobuf path.

OTLP/JSON is not protobuf's canonical JSON: trace and span ids are hex
(either case), not base64; 64-bit integers may be strings or numbers; enums
may be names or numbers; field names are lowerCamelCase, and snake_case is
accepted too (as ``json_format`` would). Unknown fields are ignored, as OTLP
requires. The body is walked directly (no ``json_format.Parse``) so ids are
checked on the way and no intermediate protobuf objects are built.

Every structural problem raises :class:`BadPayload` naming the field.
"""

from __future__ import annotations

import json
from typing import Any

from collector import attributes as A
from collector import otlp as O
from collector.decoded import Decoded
from tailscope.errors import BadPayload

_SPAN_KINDS = {"SPAN_KIND_UNSPECIFIED": 0, "SPAN_KIND_INTERNAL": 1, "SPAN_KIND_SERVER": 2,
               "SPAN_KIND_CLIENT": 3, "SPAN_KIND_PRODUCER": 4, "SPAN_KIND_CONSUMER": 5}
_STATUS = {"STATUS_CODE_UNSET": 0, "STATUS_CODE_OK": 1, "STATUS_CODE_ERROR": 2}
_TEMPORALITY = {"AGGREGATION_TEMPORALITY_UNSPECIFIED": 0, "AGGREGATION_TEMPORALITY_DELTA": 1,
                "AGGREGATION_TEMPORALITY_CUMULATIVE": 2}
_SEVERITY = {name: num for name, num in O._SEVERITY.items()}


def decode_json(signal: str, body: bytes, limit: int) -> Decoded:
    """Decode an OTLP/JSON body for ``signal`` (see :func:`collector.otlp.decode`)."""
    try:
        text = body.decode("utf-8-sig")  # a leading BOM is tolerated
    except UnicodeDecodeError as exc:
        raise BadPayload(f"OTLP/JSON body is not valid UTF-8 (byte {exc.start})") from None
    try:
        doc = json.loads(text)
    except RecursionError:
        raise BadPayload("OTLP/JSON body is nested too deeply") from None
    except ValueError as exc:
        raise BadPayload(f"OTLP/JSON body is not valid JSON: {exc}") from None
    if type(doc) is not dict:
        raise BadPayload(f"OTLP/JSON body must be an object, got {type(doc).__name__}")
    _check_top_level(signal, doc)
    walk = {"traces": _traces, "logs": _logs, "metrics": _metrics}[signal]
    try:
        return walk(doc, limit)
    except RecursionError:
        raise BadPayload("OTLP/JSON body is nested too deeply") from None
    except (O.pa.ArrowException, UnicodeError, OverflowError) as exc:
        raise BadPayload(f"OTLP/JSON body contains a value that cannot be stored: {str(exc)[:200]}") from None


_TOP = {"traces": ("resourceSpans", "resource_spans"), "logs": ("resourceLogs", "resource_logs"),
        "metrics": ("resourceMetrics", "resource_metrics")}


def _check_top_level(signal: str, doc: dict[str, Any]) -> None:
    """Refuse an object that is not this signal's request (data would be lost silently).

    ``{}`` is a valid empty request, and unknown fields next to the expected one
    are ignored, but a body with only other keys — typically another signal's
    request sent to the wrong endpoint — is an error.
    """
    if not doc or any(k in doc for k in _TOP[signal]):
        return
    for other, keys in _TOP.items():
        if any(k in doc for k in keys):
            raise BadPayload(f"this is an OTLP {other} request ({keys[0]}); send it to /v1/{other}, not /v1/{signal}")
    raise BadPayload(f"not an OTLP/JSON {signal} request: expected a {_TOP[signal][0]!r} list, got keys {sorted(doc)[:5]}")


# ---------------------------------------------------------------- field helpers


def _get(d: dict[str, Any], camel: str, snake: str) -> Any:
    v = d.get(camel)
    if v is None and snake != camel:
        v = d.get(snake)
    return v


def _list(d: dict[str, Any], camel: str, snake: str, what: str) -> list[Any]:
    v = _get(d, camel, snake)
    if v is None:
        return []
    if type(v) is not list:
        raise BadPayload(f"{what}.{camel} must be a list, got {type(v).__name__}")
    return v


def _obj(v: Any, what: str) -> dict[str, Any]:
    if type(v) is not dict:
        raise BadPayload(f"{what} must be an object, got {type(v).__name__}")
    return v


def _opt_obj(d: dict[str, Any], camel: str, snake: str, what: str) -> dict[str, Any]:
    v = _get(d, camel, snake)
    if v is None:
        return {}
    return _obj(v, f"{what}.{camel}")


def _str(d: dict[str, Any], camel: str, snake: str, what: str) -> str:
    v = _get(d, camel, snake)
    if v is None:
        return ""
    if type(v) is not str:
        raise BadPayload(f"{what}.{camel} must be a string, got {type(v).__name__}")
    return v


def _hexid(v: Any, size: int, what: str) -> bytes:
    """An OTLP/JSON id: hex of exactly ``size`` bytes (either case), or empty."""
    if v is None or v == "":
        return b""
    if type(v) is not str:
        raise BadPayload(f"{what} must be a hex string, got {type(v).__name__}")
    if len(v) != 2 * size:
        raise BadPayload(f"{what} must be {2 * size} hex digits ({size} bytes), got {len(v)} characters")
    try:
        b = bytes.fromhex(v)
    except ValueError:
        raise BadPayload(f"{what} is not valid hex: {v[:40]!r}") from None
    if len(b) != size:
        raise BadPayload(f"{what} is not valid hex: {v[:40]!r}")
    return b


def _time(d: dict[str, Any], camel: str, snake: str, what: str) -> int:
    """A fixed64 nanosecond time; out-of-range values become 0 (rejected per item)."""
    v = _get(d, camel, snake)
    if v is None:
        return 0
    if type(v) is str and v.isascii() and v.isdigit():
        x = int(v)
    elif type(v) is int:
        x = v
    else:
        x = A.json_int(v, f"{what}.{camel}")
    return x if 0 <= x <= O._U64_MAX else 0


def _uint(d: dict[str, Any], camel: str, snake: str, what: str) -> int:
    v = _get(d, camel, snake)
    if v is None:
        return 0
    x = A.json_int(v, f"{what}.{camel}")
    if x < 0 or x > O._U64_MAX:
        raise BadPayload(f"{what}.{camel} out of range: {x}")
    return x


def _int(d: dict[str, Any], camel: str, snake: str, what: str) -> int:
    v = _get(d, camel, snake)
    if v is None:
        return 0
    x = A.json_int(v, f"{what}.{camel}")
    if not -(1 << 63) <= x < (1 << 63):
        raise BadPayload(f"{what}.{camel} out of range: {x}")
    return x


def _double(d: dict[str, Any], camel: str, snake: str, what: str) -> float | None:
    v = _get(d, camel, snake)
    return None if v is None else A.json_double(v, f"{what}.{camel}")


def _enum(d: dict[str, Any], camel: str, snake: str, names: dict[str, int], what: str) -> int:
    v = _get(d, camel, snake)
    if v is None:
        return 0
    if type(v) is int:
        if not -(1 << 31) <= v < (1 << 31):
            raise BadPayload(f"{what}.{camel}: enum value {v} out of range")
        return v
    if type(v) is str:
        if v in names:
            return names[v]
        # also accept the short form, e.g. "SERVER" for SPAN_KIND_SERVER
        for full, num in names.items():
            if full.endswith("_" + v):
                return num
        raise BadPayload(f"{what}.{camel}: unknown value {v[:40]!r}")
    raise BadPayload(f"{what}.{camel} must be an enum name or number, got {type(v).__name__}")


def _resource(b: Any, d: dict[str, Any], what: str, limit: int) -> int:
    res = _opt_obj(d, "resource", "resource", what)
    return b.resources.add(A.json_attrs(res.get("attributes"), limit, b.trunc, f"{what}.resource.attributes"))


def _scope_name(d: dict[str, Any], what: str) -> str | None:
    scope = _opt_obj(d, "scope", "scope", what)
    return _str(scope, "name", "name", f"{what}.scope") or None


def _attrs(target: O.Attrs, d: dict[str, Any], limit: int, trunc: A.Counter, what: str) -> None:
    pairs = A.json_attrs(d.get("attributes"), limit, trunc, f"{what}.attributes")
    target.flat.extend(pairs)
    target.counts.append(len(pairs))


def _cut(s: str, limit: int, trunc: A.Counter) -> str:
    return O._cut(s, limit, trunc)


# -------------------------------------------------------------------- traces


def _traces(doc: dict[str, Any], limit: int) -> Decoded:
    b = O.SpanBatch(raw=False)
    trunc = b.trunc
    for i, rs in enumerate(_list(doc, "resourceSpans", "resource_spans", "body")):
        w = f"resourceSpans[{i}]"
        rs = _obj(rs, w)
        ri = _resource(b, rs, w, limit)
        for j, ss in enumerate(_list(rs, "scopeSpans", "scope_spans", w)):
            w2 = f"{w}.scopeSpans[{j}]"
            ss = _obj(ss, w2)
            scope = _scope_name(ss, w2)
            spans = _list(ss, "spans", "spans", w2)
            for k, s in enumerate(spans):
                try:
                    _span(b, s, limit, trunc)
                except BadPayload as exc:  # say where, without formatting paths for every span
                    raise BadPayload(f"{w2}.spans[{k}]: {exc.message}") from None
            b.scopes.extend([scope] * len(spans))
            b.res_idx.extend([ri] * len(spans))
    return b.finish(limit)


def _span(b: O.SpanBatch, s: Any, limit: int, trunc: A.Counter) -> None:
    s = _obj(s, "span")
    b.tids.append(_hexid(_get(s, "traceId", "trace_id"), 16, "traceId"))
    b.sids.append(_hexid(_get(s, "spanId", "span_id"), 8, "spanId"))
    b.pids.append(_hexid(_get(s, "parentSpanId", "parent_span_id"), 8, "parentSpanId"))
    b.names.append(_cut(_str(s, "name", "name", "span"), limit, trunc))
    b.kinds.append(_enum(s, "kind", "kind", _SPAN_KINDS, "span"))
    b.starts.append(_time(s, "startTimeUnixNano", "start_time_unix_nano", "span"))
    b.ends.append(_time(s, "endTimeUnixNano", "end_time_unix_nano", "span"))
    st = s.get("status")
    if st is None:
        b.scodes.append(0)
        b.smsgs.append(None)
    else:
        st = _obj(st, "span.status")
        b.scodes.append(_enum(st, "code", "code", _STATUS, "span.status"))
        msg = _str(st, "message", "message", "span.status")
        b.smsgs.append(_cut(msg, limit, trunc) if msg else None)
    _attrs(b.attrs, s, limit, trunc, "span")
    si = len(b.tids) - 1
    events = s.get("events")
    if events is not None:
        for e, ev in enumerate(_list(s, "events", "events", "span")):
            we = f"events[{e}]"
            ev = _obj(ev, we)
            b.ev_span.append(si)
            b.ev_time.append(_time(ev, "timeUnixNano", "time_unix_nano", we))
            b.ev_name.append(_cut(_str(ev, "name", "name", we), limit, trunc))
            _attrs(b.ev_attrs, ev, limit, trunc, we)
    links = s.get("links")
    if links is not None:
        for e, ln in enumerate(_list(s, "links", "links", "span")):
            wl = f"links[{e}]"
            ln = _obj(ln, wl)
            b.ln_span.append(si)
            b.ln_tid.append(_hexid(_get(ln, "traceId", "trace_id"), 16, f"{wl}.traceId"))
            b.ln_sid.append(_hexid(_get(ln, "spanId", "span_id"), 8, f"{wl}.spanId"))
            _attrs(b.ln_attrs, ln, limit, trunc, wl)


# ---------------------------------------------------------------------- logs


def _logs(doc: dict[str, Any], limit: int) -> Decoded:
    b = O.LogBatch(raw=False)
    trunc = b.trunc
    for i, rl in enumerate(_list(doc, "resourceLogs", "resource_logs", "body")):
        w = f"resourceLogs[{i}]"
        rl = _obj(rl, w)
        ri = _resource(b, rl, w, limit)
        for j, sl in enumerate(_list(rl, "scopeLogs", "scope_logs", w)):
            w2 = f"{w}.scopeLogs[{j}]"
            sl = _obj(sl, w2)
            scope = _scope_name(sl, w2)
            records = _list(sl, "logRecords", "log_records", w2)
            for k, lr in enumerate(records):
                w3 = f"{w2}.logRecords[{k}]"
                lr = _obj(lr, w3)
                b.times.append(_time(lr, "timeUnixNano", "time_unix_nano", w3))
                b.observed.append(_time(lr, "observedTimeUnixNano", "observed_time_unix_nano", w3))
                b.event_names.append(_cut(_str(lr, "eventName", "event_name", w3), limit, trunc) or None)
                b.sev_num.append(_enum(lr, "severityNumber", "severity_number", _SEVERITY, w3))
                b.sev_text.append(_cut(_str(lr, "severityText", "severity_text", w3), limit, trunc) or None)
                body = lr.get("body")
                b.bodies.append(None if body is None else O.body_text(A.json_value(body, limit, trunc)))
                b.tids.append(_hexid(_get(lr, "traceId", "trace_id"), 16, f"{w3}.traceId"))
                b.sids.append(_hexid(_get(lr, "spanId", "span_id"), 8, f"{w3}.spanId"))
                _attrs(b.attrs, lr, limit, trunc, w3)
            b.scopes.extend([scope] * len(records))
            b.res_idx.extend([ri] * len(records))
    return b.finish(limit)


# ------------------------------------------------------------------- metrics


def _metrics(doc: dict[str, Any], limit: int) -> Decoded:
    b = O.MetricBatch(raw=False)
    for i, rm in enumerate(_list(doc, "resourceMetrics", "resource_metrics", "body")):
        w = f"resourceMetrics[{i}]"
        rm = _obj(rm, w)
        ri = _resource(b, rm, w, limit)
        for j, sm in enumerate(_list(rm, "scopeMetrics", "scope_metrics", w)):
            w2 = f"{w}.scopeMetrics[{j}]"
            sm = _obj(sm, w2)
            scope = _scope_name(sm, w2)
            first = len(b.times)
            for k, m in enumerate(_list(sm, "metrics", "metrics", w2)):
                _metric(b, _obj(m, f"{w2}.metrics[{k}]"), limit, f"{w2}.metrics[{k}]")
            n = len(b.times) - first
            b.scopes.extend([scope] * n)
            b.res_idx.extend([ri] * n)
    return b.finish(limit)


_KINDS = (("gauge", "gauge", "gauge"), ("sum", "sum", "sum"), ("histogram", "histogram", "histogram"),
          ("exponentialHistogram", "exponential_histogram", "exponential_histogram"), ("summary", "summary", "summary"))


def _metric(b: O.MetricBatch, m: dict[str, Any], limit: int, what: str) -> None:
    name = _cut(_str(m, "name", "name", what), limit, b.trunc)
    unit = _str(m, "unit", "unit", what) or None
    for camel, snake, typ in _KINDS:
        data = _get(m, camel, snake)
        if data is not None:
            break
    else:
        return  # no data (or only an unknown kind): nothing to store
    wd = f"{what}.{camel}"
    data = _obj(data, wd)
    temporality = _enum(data, "aggregationTemporality", "aggregation_temporality", _TEMPORALITY, wd)
    temp_name = O._TEMPORALITY.get(temporality, str(temporality))
    for p, dp in enumerate(_list(data, "dataPoints", "data_points", wd)):
        wp = f"{wd}.dataPoints[{p}]"
        dp = _obj(dp, wp)
        _attrs(b.attrs, dp, limit, b.trunc, wp)
        t = _time(dp, "timeUnixNano", "time_unix_nano", wp)
        s = _time(dp, "startTimeUnixNano", "start_time_unix_nano", wp)
        if typ in ("gauge", "sum"):
            as_int = _get(dp, "asInt", "as_int")
            if as_int is not None:
                v, extra = O.number(0.0, _int(dp, "asInt", "as_int", wp), True)
            else:
                v, extra = _double(dp, "asDouble", "as_double", wp) or 0.0, None
            if typ == "sum":
                mono = _get(data, "isMonotonic", "is_monotonic")
                if mono is not None and type(mono) is not bool:
                    raise BadPayload(f"{wd}.isMonotonic must be true or false")
                b.point(name, "sum", unit, t, s, value=v, monotonic=bool(mono),
                        extras=dict(extra or {}, _temporality=temp_name))
            else:
                b.point(name, "gauge", unit, t, s, value=v, extras=extra)
            continue
        count = _uint(dp, "count", "count", wp)
        total = _double(dp, "sum", "sum", wp)
        extra = {}
        if typ == "histogram":
            extra["_temporality"] = temp_name
            buckets = [A.json_int(x, f"{wp}.bucketCounts") for x in _list(dp, "bucketCounts", "bucket_counts", wp)]
            bounds = [A.json_double(x, f"{wp}.explicitBounds") for x in _list(dp, "explicitBounds", "explicit_bounds", wp)]
            for key, camel_k in (("_min", "min"), ("_max", "max")):
                x = _double(dp, camel_k, camel_k, wp)
                if x is not None:
                    extra[key] = x
            if any(not 0 <= x < (1 << 63) for x in buckets):
                raise BadPayload(f"{wp}.bucketCounts out of range")
            b.point(name, "histogram", unit, t, s, count=_signed(count, wp), total=total, buckets=buckets, bounds=bounds, extras=extra)
        elif typ == "exponential_histogram":
            extra["_temporality"] = temp_name
            extra["_scale"] = _int(dp, "scale", "scale", wp)
            extra["_zero_count"] = _uint(dp, "zeroCount", "zero_count", wp)
            extra["_zero_threshold"] = _double(dp, "zeroThreshold", "zero_threshold", wp) or 0.0
            for side in ("positive", "negative"):
                buck = _opt_obj(dp, side, side, wp)
                extra["_" + side] = {
                    "offset": _int(buck, "offset", "offset", f"{wp}.{side}"),
                    "bucket_counts": [A.json_int(x, f"{wp}.{side}.bucketCounts")
                                      for x in _list(buck, "bucketCounts", "bucket_counts", f"{wp}.{side}")],
                }
            for key, camel_k in (("_min", "min"), ("_max", "max")):
                x = _double(dp, camel_k, camel_k, wp)
                if x is not None:
                    extra[key] = x
            b.point(name, "exponential_histogram", unit, t, s, count=_signed(count, wp), total=total, extras=extra)
        else:
            qs = []
            for q in _list(dp, "quantileValues", "quantile_values", wp):
                q = _obj(q, f"{wp}.quantileValues[]")
                qs.append({"quantile": _double(q, "quantile", "quantile", wp) or 0.0,
                           "value": _double(q, "value", "value", wp) or 0.0})
            extra["_quantiles"] = qs
            b.point(name, "summary", unit, t, s, count=_signed(count, wp), total=total or 0.0, extras=extra)


def _signed(count: int, what: str) -> int:
    if count >= 1 << 63:
        raise BadPayload(f"{what}.count out of range: {count}")
    return count


# ------------------------------------------------------------------- encoding


_ID_FIELDS = ("traceId", "spanId", "parentSpanId")


def to_otlp_json(message: Any) -> dict[str, Any]:
    """OTLP/JSON for a stock ``Export*ServiceRequest``: ids as hex, not base64.

    For tests, benchmarks and debugging (the server only decodes).
    """
    import base64

    from google.protobuf import json_format

    doc = json_format.MessageToDict(message)

    def fix(node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k in _ID_FIELDS and isinstance(v, str):
                    node[k] = base64.b64decode(v).hex()
                else:
                    fix(v)
        elif isinstance(node, list):
            for v in node:
                fix(v)

    fix(doc)
    return doc

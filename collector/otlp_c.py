"""The compiled OTLP traces decoder (``collector/_otlpfast.c``) and the Arrow tables around it.

The C walker reads an ``ExportTraceServiceRequest`` body field by field and
writes the spans, span events and span links straight into Arrow buffers:
hex ids, times, kind/status names, the typed attribute columns and the
leftover attributes as JSON text, by the same rules as the Python decoder
(``collector.otlp`` + ``collector.attributes``, which stay the definition).
This module wraps those buffers as pyarrow arrays and adds what the Python
code keeps doing: resource attributes (one list per ``ResourceSpans``) and the
rare attribute encodings the walker hands back (nested values, bytes, long
strings, unusual field order), through ``collector.attributes.decode_kv_blob``.

When the walker meets anything it does not fully understand — malformed wire
format, a string that is not UTF-8, a known field with an unexpected wire
type — it answers None and :func:`decode_traces` does too: the caller then
runs the Python decoder, which decodes the body or raises its ``BadPayload``.
So both decoders agree on every body (tests/test_otlp_compiled.py checks this
on real request shapes, random requests and random, truncated and mutated bytes).

The extension is optional (``setup.py`` builds it when a C compiler is there);
:data:`AVAILABLE` says whether it imported and :data:`IMPORT_ERROR` why not.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from collector import attributes as A
from collector.decoded import Decoded

try:
    from collector import _otlpfast
except ImportError as exc:  # not built (no compiler at install time) or built for another Python
    _otlpfast = None
    IMPORT_ERROR: str | None = str(exc)
else:
    IMPORT_ERROR = None

AVAILABLE = _otlpfast is not None

_KINDS = {"str": 1, "int": 2, "float": 3}  # collector.attributes._KIND_CODE
_STORES = {"VARCHAR": 0, "BIGINT": 1, "INTEGER": 2, "DOUBLE": 3}
_TS = pa.timestamp("us")
_STR = pa.string()

# the C walker's span columns, in order (then res_idx and the JSON attributes)
_SPAN_BASE = (
    ("trace_id", _STR), ("span_id", _STR), ("parent_span_id", _STR), ("name", _STR), ("kind", _STR),
    ("start_time", _TS), ("end_time", _TS), ("duration_ms", pa.float64()), ("status_code", _STR),
    ("status_message", _STR), ("scope_name", _STR),
)
_REASONS = (
    "trace_id must be 16 bytes and not all zero",
    "span_id must be 8 bytes and not all zero",
    "parent_span_id must be empty or 8 bytes",
    "start/end time missing or outside 1970-01-02..2200-01-01",
    "end time before start time",
)

_spec: Any = None


def _fallback(blob: bytes, limit: int) -> tuple[str, Any, int, str | None]:
    """One KeyValue the C reader left to Python: (key, value, values cut, JSON of a nested value)."""
    from collector.otlp import _KV

    trunc = A.Counter()
    key, value = A.decode_kv_blob(blob, limit, trunc, _KV)
    nested = not (value is None or type(value) in (str, int, float, bool))
    return key, value, trunc.n, A.value_json(value) if nested else None


def _make_spec() -> Any:
    from collector.otlp import SPAN_LIFTER

    lifter = SPAN_LIFTER
    return _otlpfast.Spec(
        {key: (spec[0], spec[1]) for key, spec in lifter._keys.items()},
        [_KINDS[c.kind] for c in lifter.columns],
        [_STORES[c.sql_type] for c in lifter.columns],
        [bool(x) for x in lifter.strip],
        lifter.names.index("role") if "role" in lifter.names else -1,
        _fallback,
        A.coerce,
    )


def _array(typ: pa.DataType, col: tuple[int, int, bytes | None, bytes | None, bytes]) -> pa.Array:
    n, nulls, valid, offsets, data = col
    buffers = [None if valid is None else pa.py_buffer(valid)]
    if offsets is not None:
        buffers.append(pa.py_buffer(offsets))
    buffers.append(pa.py_buffer(data))
    return pa.Array.from_buffers(typ, n, buffers, null_count=nulls)


def _index(col: tuple[int, int, bytes | None, bytes | None, bytes]) -> np.ndarray:
    return np.frombuffer(col[4], dtype=np.int64)


def decode_traces(body: bytes, limit: int) -> Decoded | None:
    """Decode an OTLP protobuf traces body, or None when the Python decoder must (see module docstring)."""
    global _spec
    if _otlpfast is None:
        raise RuntimeError(f"the compiled OTLP decoder is not built: {IMPORT_ERROR}")
    if _spec is None:
        _spec = _make_spec()
    r = _otlpfast.decode_traces(body, limit, _spec)
    if r is None:
        return None
    from collector.otlp import RESOURCE_LIFTER, SPAN_LIFTER, Resources, pb_pairs

    resources = Resources()
    trunc = A.Counter()
    for blobs in r["resources"]:
        resources.add(pb_pairs(blobs, limit, trunc))
    out = Decoded("traces")
    if r["spans"] == 0:
        return out
    sc = r["span_columns"]
    cols: dict[str, pa.Array] = {name: _array(typ, c) for (name, typ), c in zip(_SPAN_BASE, sc)}
    res_cols = resources.columns(_index(sc[11]))
    for name in RESOURCE_LIFTER.names:
        cols[name] = res_cols[name]
    for name, typ, c in zip(SPAN_LIFTER.names, SPAN_LIFTER.types, r["lifted"]):
        cols[name] = _array(typ, c)
    cols["attributes"] = _array(_STR, sc[12])
    cols["resource_attributes"] = res_cols["resource_attributes"]
    out.tables["spans"] = pa.table(cols)
    out.accepted = r["kept"]
    out.rejected = sum(r["reasons"])
    out.errors = [f"{k} span(s) rejected: {why}" for k, why in zip(r["reasons"], _REASONS) if k]
    out.truncated_values = r["truncated"] + trunc.n
    if r["events"]:
        if r["events_dropped"]:
            out.errors.append(f"{r['events_dropped']} span event(s) dropped: time missing or outside 1970-01-02..2200-01-01")
        ec = r["event_columns"]
        out.tables["span_events"] = pa.table({
            "trace_id": _array(_STR, ec[0]),
            "span_id": _array(_STR, ec[1]),
            "time": _array(_TS, ec[2]),
            "name": _array(_STR, ec[3]),
            "service_name": resources.columns(_index(ec[4]))["service_name"],
            "attributes": _array(_STR, ec[5]),
        })
    if r["links"]:
        if r["links_dropped"]:
            out.errors.append(f"{r['links_dropped']} span link(s) dropped: linked trace_id/span_id must be 16/8 bytes and not all zero")
        lc = r["link_columns"]
        out.tables["span_links"] = pa.table({
            "trace_id": _array(_STR, lc[0]),
            "span_id": _array(_STR, lc[1]),
            "linked_trace_id": _array(_STR, lc[2]),
            "linked_span_id": _array(_STR, lc[3]),
            "attributes": _array(_STR, lc[4]),
        })
    return out

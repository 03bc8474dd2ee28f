"""OTLP attribute lists → the store's JSON ``attributes`` column and typed columns.

Why columnar: a request span carries about a dozen attributes, and handling
each one in Python (wrap the protobuf object, read the oneof, build a dict,
``json.dumps`` it) costs more than everything else in ingest together. Here
an attribute list is handled as a whole batch:

* every attribute of the batch is one *entry* (key, JSON fragment ``"key":value``,
  typed-column slot and coerced value, whether it is ``gen_ai.*``);
* protobuf attributes arrive as raw ``KeyValue`` bytes (see ``collector.otlp``),
  so identical attributes across the batch — ``tailscope.role=request``, the
  model, the GPU index — are decoded once (Arrow ``dictionary_encode`` plus a
  small bounded memo across batches), and only distinct ones reach Python;
* the per-item JSON object is then assembled by Arrow (``take`` of fragments,
  list ``binary_join``), and typed columns are filled by a NumPy scatter.

Values: strings, ints, doubles, bools as themselves; ``bytes`` as base64 text
(as OTLP/JSON writes them); arrays as JSON lists; kvlists as JSON objects.
Non-finite doubles are stored as the strings ``"NaN"``, ``"Infinity"``,
``"-Infinity"`` (JSON has no literal for them). String values longer than
``max_attribute_bytes`` UTF-8 bytes are cut to that length.
"""

from __future__ import annotations

import base64
import json
import math
import struct
from json.encoder import encode_basestring as _jstr  # C-accelerated when available
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from collector.schema import AttrColumn
from tailscope.errors import BadPayload

if TYPE_CHECKING:
    from google.protobuf.message import Message

# AnyValue nesting (arrays / kvlists inside each other) deeper than this rejects
# the whole body: such values are never legitimate telemetry and deep recursion
# is a denial-of-service vector.
MAX_DEPTH = 32

# Memo of decoded protobuf KeyValue bytes per (lifter, limit); cleared when full
# so memory stays bounded. Only short encodings are memoised (long values are
# almost never repeated).
_MEMO_MAX = 50_000
_MEMO_BLOB_MAX = 256

_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_INT32_MIN, _INT32_MAX = -(1 << 31), (1 << 31) - 1

_unpack_double = struct.Struct("<d").unpack_from

_PA_TYPES = {"VARCHAR": pa.string(), "BIGINT": pa.int64(), "INTEGER": pa.int32(), "DOUBLE": pa.float64()}


# --------------------------------------------------------------------------- values


def truncate_str(s: str, limit: int) -> tuple[str, bool]:
    """Cut ``s`` to at most ``limit`` UTF-8 bytes (on a character boundary)."""
    if len(s) * 4 <= limit:  # cheap: no string of this length can be over
        return s, False
    b = s.encode("utf-8", "surrogatepass")
    if len(b) <= limit:
        return s, False
    return b[:limit].decode("utf-8", "ignore"), True


def _float_json(x: float) -> str:
    if math.isfinite(x):
        return repr(x)
    return '"NaN"' if x != x else ('"Infinity"' if x > 0 else '"-Infinity"')


def _sanitize(v: Any) -> Any:
    """Replace non-finite floats by their OTLP/JSON string names (for json.dumps)."""
    if isinstance(v, float) and not math.isfinite(v):
        return "NaN" if v != v else ("Infinity" if v > 0 else "-Infinity")
    if isinstance(v, list):
        return [_sanitize(x) for x in v]
    if isinstance(v, dict):
        return {k: _sanitize(x) for k, x in v.items()}
    return v


def value_json(v: Any) -> str:
    """JSON text of one decoded attribute value."""
    t = type(v)
    if t is str:
        return _jstr(v)
    if t is int:
        return str(v)
    if t is float:
        return _float_json(v)
    if t is bool:
        return "true" if v else "false"
    if v is None:
        return "null"
    try:
        return json.dumps(v, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except ValueError:
        return json.dumps(_sanitize(v), ensure_ascii=False, separators=(",", ":"))


class Counter:
    """Mutable count of values cut to the size limit (shared by nested decoders)."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


def pb_value(v: "Message", limit: int, trunc: Counter, depth: int = 0) -> Any:
    """Decode a protobuf ``AnyValue`` into a Python value (see module docstring)."""
    which = v.WhichOneof("value")
    if which == "string_value":
        s, cut = truncate_str(v.string_value, limit)
        trunc.n += cut
        return s
    if which == "int_value":
        return v.int_value
    if which == "double_value":
        return v.double_value
    if which == "bool_value":
        return v.bool_value
    if which is None:
        return None
    if depth >= MAX_DEPTH:
        raise BadPayload(f"attribute value nested deeper than {MAX_DEPTH} levels of arrays/kvlists")
    if which == "array_value":
        return [pb_value(x, limit, trunc, depth + 1) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: pb_value(kv.value, limit, trunc, depth + 1) for kv in v.kvlist_value.values}
    if which == "bytes_value":
        b = v.bytes_value
        if len(b) > limit:
            b = b[:limit]
            trunc.n += 1
        return base64.b64encode(b).decode("ascii")
    return None


_JSON_SCALARS = ("stringValue", "string_value", "intValue", "int_value", "doubleValue", "double_value", "boolValue", "bool_value")


def json_int(x: Any, what: str) -> int:
    """An OTLP/JSON 64-bit integer: a JSON number or a decimal string."""
    if type(x) is int:
        return x
    if type(x) is str:
        try:
            return int(x, 10)
        except ValueError:
            raise BadPayload(f"{what}: {x[:40]!r} is not an integer") from None
    if type(x) is float and x.is_integer():
        return int(x)
    raise BadPayload(f"{what}: expected an integer, got {type(x).__name__}")


def json_double(x: Any, what: str) -> float:
    if type(x) is float or type(x) is int:
        return float(x)
    if type(x) is str:
        try:
            return float(x)  # accepts "NaN", "Infinity", "-Infinity" as proto3 JSON does
        except ValueError:
            raise BadPayload(f"{what}: {x[:40]!r} is not a number") from None
    raise BadPayload(f"{what}: expected a number, got {type(x).__name__}")


def json_value(v: Any, limit: int, trunc: Counter, depth: int = 0) -> Any:
    """Decode an OTLP/JSON ``AnyValue`` object into a Python value."""
    if type(v) is not dict:
        if v is None:
            return None
        raise BadPayload(f"attribute value must be an AnyValue object, got {type(v).__name__}")
    for name, x in v.items():
        if name in ("stringValue", "string_value"):
            if type(x) is not str:
                raise BadPayload(f"stringValue must be a string, got {type(x).__name__}")
            s, cut = truncate_str(x, limit)
            trunc.n += cut
            return s
        if name in ("intValue", "int_value"):
            i = json_int(x, "intValue")
            if not _INT64_MIN <= i <= _INT64_MAX:
                raise BadPayload(f"intValue {i} is outside the 64-bit range")
            return i
        if name in ("doubleValue", "double_value"):
            return json_double(x, "doubleValue")
        if name in ("boolValue", "bool_value"):
            if type(x) is not bool:
                raise BadPayload(f"boolValue must be true or false, got {type(x).__name__}")
            return x
        if name in ("arrayValue", "array_value", "kvlistValue", "kvlist_value"):
            if depth >= MAX_DEPTH:
                raise BadPayload(f"attribute value nested deeper than {MAX_DEPTH} levels of arrays/kvlists")
            if type(x) is not dict:
                raise BadPayload(f"{name} must be an object with 'values'")
            vals = x.get("values", [])
            if type(vals) is not list:
                raise BadPayload(f"{name}.values must be a list")
            if name[0] == "a":
                return [json_value(e, limit, trunc, depth + 1) for e in vals]
            out: dict[str, Any] = {}
            for kv in vals:
                k, val = json_kv(kv, limit, trunc, depth + 1)
                out[k] = val
            return out
        if name in ("bytesValue", "bytes_value"):
            if type(x) is not str:
                raise BadPayload("bytesValue must be a base64 string")
            try:
                b = base64.b64decode(x + "=" * (-len(x) % 4), altchars=b"-_" if ("-" in x or "_" in x) else None, validate=True)
            except ValueError:
                raise BadPayload(f"bytesValue {x[:40]!r} is not valid base64") from None
            if len(b) > limit:
                b = b[:limit]
                trunc.n += 1
            return base64.b64encode(b).decode("ascii")
        # unknown member: ignored (OTLP requires unknown fields to be ignored)
    return None


def json_kv(kv: Any, limit: int, trunc: Counter, depth: int = 0) -> tuple[str, Any]:
    if type(kv) is not dict:
        raise BadPayload(f"attribute must be an object with 'key' and 'value', got {type(kv).__name__}")
    key = kv.get("key", "")
    if type(key) is not str:
        raise BadPayload(f"attribute key must be a string, got {type(key).__name__}")
    return key, json_value(kv.get("value"), limit, trunc, depth)


def json_attrs(kvs: Any, limit: int, trunc: Counter, what: str = "attributes") -> list[tuple[str, Any]]:
    """Decode an OTLP/JSON attribute list into ``[(key, value), ...]``."""
    if kvs is None:
        return []
    if type(kvs) is not list:
        raise BadPayload(f"{what} must be a list of key/value objects")
    return [json_kv(kv, limit, trunc) for kv in kvs]


# ------------------------------------------------------------- protobuf KeyValue bytes


def _varint(b: bytes, i: int) -> tuple[int, int]:
    x = shift = 0
    while True:
        c = b[i]
        i += 1
        x |= (c & 0x7F) << shift
        if c < 0x80:
            return x, i
        shift += 7
        if shift > 63:
            raise IndexError("varint too long")


def decode_kv_blob(b: bytes, limit: int, trunc: Counter, kv_class: Any) -> tuple[str, Any]:
    """Decode one serialized ``KeyValue`` into ``(key, value)``.

    A hand-written reader covers the canonical encoding of scalar attributes
    (key, then value with one scalar field), which is what every SDK writes;
    anything else (nested values, bytes, reordered or unknown fields) goes to
    the real protobuf parser, so the result never depends on which path ran.
    """
    try:
        if b[0] == 0x0A:
            kl, i = _varint(b, 1)
            j = i + kl
            key = b[i:j].decode("utf-8")
            n = len(b)
            if j == n:
                return key, None
            if b[j] == 0x12:
                vl, k = _varint(b, j + 1)
                if k + vl == n:
                    if vl == 0:
                        return key, None
                    tag = b[k]
                    if tag == 0x0A:
                        sl, m = _varint(b, k + 1)
                        if m + sl == n:
                            s = b[m:n].decode("utf-8")
                            if len(s) * 4 > limit:
                                s, cut = truncate_str(s, limit)
                                trunc.n += cut
                            return key, s
                    elif tag == 0x18:
                        x, m = _varint(b, k + 1)
                        if m == n:
                            return key, x - (1 << 64) if x > _INT64_MAX else x
                    elif tag == 0x21:
                        if k + 9 == n:
                            return key, _unpack_double(b, k + 1)[0]
                    elif tag == 0x10:
                        x, m = _varint(b, k + 1)
                        if m == n:
                            return key, x != 0
    except (IndexError, UnicodeDecodeError):
        pass  # let the real parser say what is wrong
    from google.protobuf.message import DecodeError

    try:
        kv = kv_class.FromString(b)
    except DecodeError as exc:
        raise BadPayload(f"invalid protobuf attribute (KeyValue): {exc}") from None
    return kv.key, pb_value(kv.value, limit, trunc)


# ------------------------------------------------------------------------ lifting


def coerce(value: Any, kind: str, sql_type: str) -> Any:
    """``value`` converted for a typed column, or None when it has the wrong type."""
    t = type(value)
    if kind == "str":
        if t is str:
            return value
        if t is int or t is float:
            return repr(value) if t is float else str(value)
        return None
    if kind == "int":
        if t is int:
            x = value
        elif t is float and value.is_integer():
            x = int(value)
        elif t is str and value.strip().lstrip("+-").isdigit():
            x = int(value)
        else:
            return None
        lo, hi = (_INT32_MIN, _INT32_MAX) if sql_type == "INTEGER" else (_INT64_MIN, _INT64_MAX)
        return x if lo <= x <= hi else None
    # float
    if t is float:
        return value
    if t is int:
        return float(value)
    if t is str:
        try:
            return float(value)
        except ValueError:
            return None
    return None


class Lifter:
    """Knows which attribute keys become which typed columns of one table.

    An *entry* is the tuple ``(fragment, column index or -1, coerced value,
    priority, is_gen_ai, key)``: priority 0 for a column's first key, higher for its
    "also read" keys (the first present key wins).
    """

    def __init__(self, columns: Sequence[AttrColumn]) -> None:
        self.columns = tuple(columns)
        self.names = [c.column for c in self.columns]
        self.types = [_PA_TYPES[c.sql_type] for c in self.columns]
        self._keys: dict[str, tuple[int, int, str, str]] = {}
        for ci, col in enumerate(self.columns):
            for prio, key in enumerate(col.keys):
                self._keys.setdefault(key, (ci, prio, col.kind, col.sql_type))
        self._key_json: dict[str, str] = {}
        self._memo: dict[int, dict[bytes, tuple]] = {}

    def entry(self, key: str, value: Any) -> tuple:
        kj = self._key_json.get(key)
        if kj is None:
            kj = _jstr(key) + ":"
            if len(self._key_json) < _MEMO_MAX:
                self._key_json[key] = kj
        spec = self._keys.get(key)
        ci, prio, lifted = -1, 0, None
        if spec is not None:
            lifted = coerce(value, spec[2], spec[3])
            if lifted is not None:
                ci, prio = spec[0], spec[1]
        return (kj + value_json(value), ci, lifted, prio, key.startswith("gen_ai."), key)

    def lift_row(self, pairs: Iterable[tuple[str, Any]]) -> list[Any]:
        """Typed-column values for one attribute list (used for resources)."""
        row: list[Any] = [None] * len(self.columns)
        best = [1 << 30] * len(self.columns)
        for key, value in pairs:
            spec = self._keys.get(key)
            if spec is None:
                continue
            v = coerce(value, spec[2], spec[3])
            if v is not None and spec[1] <= best[spec[0]]:
                row[spec[0]] = v
                best[spec[0]] = spec[1]
        return row

    def pb_entries(self, flat: list[bytes], limit: int, kv_class: Any) -> tuple[list[tuple], np.ndarray, int]:
        """Entries for raw KeyValue bytes: ``(unique entries, index per flat item, truncated)``."""
        n = len(flat)
        if n == 0:
            return [], np.zeros(0, dtype=np.int64), 0
        enc = pc.dictionary_encode(pa.array(flat, pa.binary()))
        uniq = enc.dictionary.to_pylist()
        index = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        memo = self._memo.get(limit)
        if memo is None:
            memo = self._memo.setdefault(limit, {})
        if len(memo) > _MEMO_MAX:
            memo.clear()
        trunc = Counter()
        entries: list[tuple] = []
        truncated_u: list[int] = []
        append = entries.append
        for blob in uniq:
            e = memo.get(blob)
            if e is None:
                before = trunc.n
                key, value = decode_kv_blob(blob, limit, trunc, kv_class)
                e = self.entry(key, value)
                cut = trunc.n - before
                if cut:
                    truncated_u.append(len(entries))
                    truncated_u.append(cut)
                elif len(blob) <= _MEMO_BLOB_MAX:
                    memo[blob] = e
            append(e)
        truncated = 0
        if truncated_u:
            counts = np.bincount(index, minlength=len(entries))
            for pos in range(0, len(truncated_u), 2):
                truncated += int(counts[truncated_u[pos]]) * truncated_u[pos + 1]
        return entries, index, truncated

    def py_entries(self, flat: list[tuple[str, Any]]) -> tuple[list[tuple], np.ndarray]:
        """Entries for already-decoded ``(key, value)`` pairs (OTLP/JSON, resources)."""
        entry = self.entry
        return [entry(k, v) for k, v in flat], np.arange(len(flat), dtype=np.int64)


class AttrColumns:
    """The result of :func:`columns`: JSON column, typed columns, gen_ai flags."""

    __slots__ = ("json", "lifted", "gen_ai")

    def __init__(self, json_col: pa.Array, lifted: list[pa.Array], gen_ai: np.ndarray) -> None:
        self.json = json_col
        self.lifted = lifted
        self.gen_ai = gen_ai


def columns(lifter: Lifter, entries: list[tuple], index: np.ndarray, counts: Sequence[int]) -> AttrColumns:
    """Assemble per-item columns from entries.

    Args:
        entries: distinct attributes (see :class:`Lifter`).
        index: for each attribute of each item, in item order, its entry.
        counts: number of attributes of each item.
    """
    n = len(counts)
    cnt = np.asarray(counts, dtype=np.int64)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(cnt, out=offsets[1:])
    item_of = np.repeat(np.arange(n, dtype=np.int64), cnt)
    frags = pa.array([e[0] for e in entries], pa.string()) if entries else pa.array([], pa.string())
    taken = frags.take(pa.array(index)) if len(index) else pa.array([], pa.string())
    lists = pa.LargeListArray.from_arrays(pa.array(offsets), taken)
    json_col = pc.binary_join_element_wise("{", pc.binary_join(lists, ","), "}", "")

    key_ids: dict[str, int] = {}
    kid = np.fromiter((key_ids.setdefault(e[5], len(key_ids)) for e in entries), dtype=np.int64, count=len(entries))
    if len(index):
        combined = item_of * max(len(key_ids), 1) + kid[index]
        if len(np.unique(combined)) != len(combined):
            json_col = _dedupe_json(entries, index, offsets, json_col, item_of, combined)

    # typed columns: scatter entry values into per-item slots
    lifted: list[pa.Array] = []
    ncols = len(lifter.columns)
    col_u = np.fromiter((e[1] for e in entries), dtype=np.int64, count=len(entries))
    col_flat = col_u[index] if len(index) else np.zeros(0, dtype=np.int64)
    present = set(np.unique(col_flat).tolist()) if len(col_flat) else set()
    prio_u = None
    for ci in range(ncols):
        typ = lifter.types[ci]
        if ci not in present:
            lifted.append(pa.nulls(n, typ))
            continue
        pos = np.nonzero(col_flat == ci)[0]
        if len(lifter.columns[ci].keys) > 1:
            # lower priority (later "also read" keys) first, so the first key wins
            if prio_u is None:
                prio_u = np.fromiter((e[3] for e in entries), dtype=np.int64, count=len(entries))
            pos = pos[np.argsort(-prio_u[index[pos]], kind="stable")]
        src = index[pos]
        uniq_src, inv = np.unique(src, return_inverse=True)
        vals = pa.array([entries[u][2] for u in uniq_src.tolist()], typ)
        sel = np.full(n, -1, dtype=np.int64)
        sel[item_of[pos]] = inv
        lifted.append(vals.take(pa.array(sel, mask=sel < 0)))
    gen_flat = np.fromiter((e[4] for e in entries), dtype=bool, count=len(entries))
    if len(index):
        gen_ai = np.bincount(item_of[gen_flat[index]], minlength=n) > 0
    else:
        gen_ai = np.zeros(n, dtype=bool)
    return AttrColumns(json_col, lifted, gen_ai)


def _dedupe_json(entries: list[tuple], index: np.ndarray, offsets: np.ndarray, json_col: pa.Array,
                 item_of: np.ndarray, combined: np.ndarray) -> pa.Array:
    """Rebuild the JSON of items that repeat a key (last value wins, as in a dict)."""
    _, first, counts = np.unique(combined, return_index=True, return_counts=True)
    dup_items = np.unique(item_of[first[counts > 1]])
    out = json_col.to_pylist()
    idx = index.tolist()
    for it in dup_items.tolist():
        parts: dict[str, str] = {}
        for p in range(int(offsets[it]), int(offsets[it + 1])):
            e = entries[idx[p]]
            parts.pop(e[5], None)
            parts[e[5]] = e[0]
        out[it] = "{" + ",".join(parts.values()) + "}"
    return pa.array(out, pa.string())


def pairs_json(pairs: Iterable[tuple[str, Any]]) -> str:
    """JSON object text for a small attribute list (resources), last key wins."""
    parts: dict[str, str] = {}
    for k, v in pairs:
        parts.pop(k, None)
        parts[k] = _jstr(k) + ":" + value_json(v)
    return "{" + ",".join(parts.values()) + "}"

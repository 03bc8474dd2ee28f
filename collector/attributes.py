"""OTLP attribute lists → the store's JSON ``attributes`` column and typed columns.

Why columnar: a request span carries about a dozen attributes, and handling
each one in Python (wrap the protobuf object, read the oneof, build a dict,
``json.dumps`` it) costs more than everything else in ingest together. Here
an attribute list is handled as a whole batch:

* every attribute of the batch is one *entry* (key, JSON fragment ``"key":value``,
  typed-column slot and coerced value, whether it is ``gen_ai.*``);
* protobuf attributes arrive as raw ``KeyValue`` bytes (see ``collector.otlp``),
  so identical attributes across the batch — ``tailscope.role=request``, the
  model, the GPU index — are found by Arrow ``dictionary_encode`` and decoded
  once; the distinct ones are decoded together by a NumPy reader of the
  canonical encoding (:func:`decode_blobs`), and only unusual ones (nested
  values, long strings) go through the protobuf parser one by one;
* JSON fragments ``"key":value`` are made by Arrow string kernels, the
  per-item JSON object is assembled by Arrow (``take`` of fragments, list
  ``binary_join``), and typed columns are filled by a NumPy scatter.

Values: strings, ints, doubles, bools as themselves; ``bytes`` as base64 text
(as OTLP/JSON writes them); arrays as JSON lists; kvlists as JSON objects.
Non-finite doubles are stored as the strings ``"NaN"``, ``"Infinity"``,
``"-Infinity"`` (JSON has no literal for them). String values (and keys)
longer than ``max_attribute_bytes`` UTF-8 bytes are cut to that length, bytes
values too, so one megabyte value cannot bloat the store.
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
        out: dict[str, Any] = {}
        for kv in v.kvlist_value.values:
            key = kv.key
            if len(key) * 4 > limit:
                key, cut = truncate_str(key, limit)
                trunc.n += cut
            out[key] = pb_value(kv.value, limit, trunc, depth + 1)
        return out
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
            if len(x) * 4 > limit:
                x, cut = truncate_str(x, limit)
                trunc.n += cut
            return x
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
    if len(key) * 4 > limit:
        key, cut = truncate_str(key, limit)
        trunc.n += cut
    return key, json_value(kv.get("value"), limit, trunc, depth)


def json_attrs(kvs: Any, limit: int, trunc: Counter, what: str = "attributes") -> list[tuple[str, Any]]:
    """Decode an OTLP/JSON attribute list into ``[(key, value), ...]``."""
    if kvs is None:
        return []
    if type(kvs) is not list:
        raise BadPayload(f"{what} must be a list of key/value objects")
    out: list[tuple[str, Any]] = []
    append = out.append
    short = limit // 4  # strings this long cannot be over the limit in UTF-8
    for kv in kvs:
        # fast path: {"key": str, "value": {one scalar member}} with nothing to cut
        if type(kv) is dict:
            key = kv.get("key")
            v = kv.get("value")
            if type(key) is str and len(key) <= short and type(v) is dict and len(v) == 1:
                (name, x), = v.items()
                tx = type(x)
                if name == "stringValue":
                    if tx is str and len(x) <= short:
                        append((key, x))
                        continue
                elif name == "intValue":
                    if tx is str and x.isascii() and x.lstrip("-").isdigit():
                        i = int(x)
                        if _INT64_MIN <= i <= _INT64_MAX:
                            append((key, i))
                            continue
                    elif tx is int and _INT64_MIN <= x <= _INT64_MAX:
                        append((key, x))
                        continue
                elif name == "doubleValue":
                    if tx is float or tx is int:
                        append((key, float(x)))
                        continue
                elif name == "boolValue":
                    if tx is bool:
                        append((key, x))
                        continue
        append(json_kv(kv, limit, trunc))  # everything else, with its checks and messages
    return out


# ------------------------------------------------------------- protobuf KeyValue bytes


_U64 = (1 << 64) - 1


def _varint(b: bytes, i: int) -> tuple[int, int]:
    x = shift = 0
    while True:
        c = b[i]
        i += 1
        x |= (c & 0x7F) << shift
        if c < 0x80:
            return x & _U64, i  # bits past 64 of a 10-byte varint are dropped, as protobuf does
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
            if kl > limit:
                raise IndexError("long key: the general path cuts it")
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
    key = kv.key
    if len(key) * 4 > limit:
        key, cut = truncate_str(key, limit)
        trunc.n += cut
    return key, pb_value(kv.value, limit, trunc)


# ------------------------------------------------------------------------ lifting


def coerce(value: Any, kind: str, sql_type: str) -> Any:
    """``value`` converted for a typed column, or None when it has the wrong type.

    Text columns take strings and integers; integer columns take integers,
    integral doubles and decimal strings; double columns take numbers and
    numeric strings. Anything else stays only in the JSON column.
    """
    t = type(value)
    if kind == "str":
        if t is str:
            return value
        return str(value) if t is int else None
    if kind == "int":
        if t is int:
            x = value
        elif t is float and value.is_integer():
            x = int(value)
        elif t is str and value.strip().lstrip("+-").isdigit():
            try:
                x = int(value)
            except ValueError:  # "+-5", "²": digits to isdigit(), not to int()
                return None
        else:
            return None
        lo, hi = (_INT32_MIN, _INT32_MAX) if sql_type == "INTEGER" else (_INT64_MIN, _INT64_MAX)
        return x if lo <= x <= hi else None
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


# value types of an entry
_NULL, _STR, _INT, _FLT, _BOOL, _OTHER = 0, 1, 2, 3, 4, 5
_KIND_CODE = {"str": _STR, "int": _INT, "float": _FLT}
_NATIVE = {"str": str, "int": int, "float": float}  # value types a column holds as themselves
_TYPE_CODE = {str: _STR, int: _INT, float: _FLT, bool: _BOOL, type(None): _NULL}
_NEEDS_ESCAPE = '["\\\\\\x00-\\x1f]'  # characters a JSON string must escape


class Values:
    """Typed values of ``n`` entries, one NumPy/Arrow array per type.

    ``vtype`` says which array holds entry ``i``; ``other`` holds lists and
    kvlists (decoded Python values) by entry index.
    """

    __slots__ = ("vtype", "sval", "ival", "fval", "bval", "other")

    def __init__(self, vtype: np.ndarray, sval: pa.Array, ival: np.ndarray, fval: np.ndarray,
                 bval: np.ndarray, other: dict[int, Any]) -> None:
        self.vtype = vtype
        self.sval = sval
        self.ival = ival
        self.fval = fval
        self.bval = bval
        self.other = other

    @classmethod
    def from_python(cls, values: Sequence[Any]) -> "Values":
        codes = [_TYPE_CODE.get(type(v), _OTHER) for v in values]
        present = set(codes)
        n = len(codes)
        vtype = np.array(codes, dtype=np.int8) if n else np.zeros(0, dtype=np.int8)
        strs = [v if c == _STR else None for v, c in zip(values, codes)] if _STR in present else [None] * n
        ival = np.array([v if c == _INT else 0 for v, c in zip(values, codes)], dtype=np.int64) if _INT in present else np.zeros(n, dtype=np.int64)
        fval = np.array([v if c == _FLT else 0.0 for v, c in zip(values, codes)], dtype=np.float64) if _FLT in present else np.zeros(n)
        bval = np.array([v if c == _BOOL else False for v, c in zip(values, codes)], dtype=bool) if _BOOL in present else np.zeros(n, dtype=bool)
        other = {i: v for i, (v, c) in enumerate(zip(values, codes)) if c == _OTHER} if _OTHER in present else {}
        return cls(vtype, pa.array(strs, pa.string()), ival, fval, bval, other)

    def subset(self, sel: np.ndarray) -> "Values":
        """The values of entries ``sel``, in that order."""
        other = {j: self.other[i] for j, i in enumerate(sel.tolist()) if i in self.other} if self.other else {}
        return Values(self.vtype[sel], self.sval.take(pa.array(sel, pa.int64())), self.ival[sel], self.fval[sel],
                      self.bval[sel], other)

    def patch(self, at: Sequence[int], values: Sequence[Any]) -> None:
        """Overwrite entries ``at`` with decoded Python ``values``."""
        if not len(at):
            return
        strs = self.sval.to_pylist()
        for i, v in zip(at, values):
            t = type(v)
            strs[i] = None
            if t is str:
                self.vtype[i] = _STR
                strs[i] = v
            elif t is int:
                self.vtype[i] = _INT
                self.ival[i] = v
            elif t is float:
                self.vtype[i] = _FLT
                self.fval[i] = v
            elif t is bool:
                self.vtype[i] = _BOOL
                self.bval[i] = v
            elif v is None:
                self.vtype[i] = _NULL
            else:
                self.vtype[i] = _OTHER
                self.other[i] = v
        self.sval = pa.array(strs, pa.string())

    def json_text(self) -> pa.Array:
        """JSON text of every value (each type formatted only where it occurs)."""
        n = len(self.vtype)
        if n == 0:
            return pa.array([], pa.string())
        vt = self.vtype
        order = np.argsort(vt, kind="stable")
        bounds = np.searchsorted(vt[order], np.arange(7)).tolist()
        parts: list[pa.Array] = []
        patch: dict[int, str] = {}
        for t in range(6):
            lo, hi = bounds[t], bounds[t + 1]
            if lo == hi:
                continue
            sel = order[lo:hi]
            if t == _STR:
                sv = self.sval.take(pa.array(sel, pa.int64()))
                parts.append(pc.binary_join_element_wise('"', sv, '"', ""))
                esc = pc.match_substring_regex(sv, _NEEDS_ESCAPE).to_numpy(zero_copy_only=False)
                for j in np.nonzero(esc)[0].tolist():
                    patch[lo + j] = _jstr(sv[j].as_py())
            elif t == _INT:
                parts.append(pa.array(self.ival[sel]).cast(pa.string()))
            elif t == _FLT:
                fv = self.fval[sel]
                txt = pa.array(fv).cast(pa.string())
                # Arrow prints 5.0 as "5": keep it a double in JSON
                parts.append(pc.if_else(pc.match_substring_regex(txt, "[.en]"), txt, pc.binary_join_element_wise(txt, ".0", "")))
                for j in np.nonzero(~np.isfinite(fv))[0].tolist():
                    patch[lo + j] = _float_json(float(fv[j]))
            elif t == _BOOL:
                parts.append(pc.if_else(pa.array(self.bval[sel], pa.bool_()), "true", "false"))
            elif t == _NULL:
                parts.append(pa.array(["null"] * (hi - lo), pa.string()))
            else:
                parts.append(pa.array([value_json(self.other[i]) for i in sel.tolist()], pa.string()))
        by_type = pa.concat_arrays(parts) if len(parts) > 1 else parts[0]
        if patch:
            texts = by_type.to_pylist()
            for i, t in patch.items():
                texts[i] = t
            by_type = pa.array(texts, pa.string())
        inverse = np.empty(n, dtype=np.int64)
        inverse[order] = np.arange(n, dtype=np.int64)
        return by_type.take(pa.array(inverse, pa.int64()))


class Entries:
    """Distinct attributes of a batch, as columns (see the module docstring).

    ``frags(sel)``: JSON fragments ``"key":value`` of the entries ``sel``, made
    only for the entries a JSON column needs (most of a request span's go to
    typed columns, and formatting doubles as text is not free); ``key_id`` into ``keys``; ``col``:
    typed column index or -1; ``prio``: 0 for a column's first key; ``gen_ai``;
    ``lift_s``/``lift_i``/``lift_f``: the value converted for a text, integer
    or double column; ``exact``: the column holds the value with its own type
    (a string in a text column, an integer in an integer column, a double in a
    double column), so the JSON column need not repeat it; ``trunc``: values
    cut to the size limit in this entry.
    """

    __slots__ = ("vals", "k_json", "key_id", "keys", "col", "prio", "gen_ai", "lift_s", "lift_i", "lift_f", "exact", "trunc")

    def __len__(self) -> int:
        return len(self.key_id)

    def frags(self, sel: np.ndarray) -> pa.Array:
        """JSON fragments ``"key":value`` of entries ``sel`` (a NumPy index array)."""
        if not len(sel):
            return pa.array([], pa.string())
        text = self.vals.subset(sel).json_text()
        return pc.binary_join_element_wise(self.k_json.take(pa.array(self.key_id[sel], pa.int64())), text, "")


class Lifter:
    """Knows which attribute keys become which typed columns of one table.

    An attribute stored in its typed column with its own type is left out of
    the JSON column (it would only repeat the column: about half the bytes of
    a request span). Everything else stays in JSON: the other "also read" keys
    of a column, values of the wrong type, values converted on the way in
    (an integer in a text column, an integral double in an integer column),
    and the columns named in ``keep_in_json`` (where the typed column can
    also be filled from elsewhere, e.g. a log record's own ``event_name``).
    """

    def __init__(self, columns: Sequence[AttrColumn], keep_in_json: Iterable[str] = ()) -> None:
        self.columns = tuple(columns)
        keep = frozenset(keep_in_json)
        unknown = keep - {c.column for c in self.columns}
        if unknown:
            raise ValueError(f"keep_in_json names unknown columns: {sorted(unknown)}")
        self.strip = np.array([c.column not in keep for c in self.columns], dtype=bool)
        self.names = [c.column for c in self.columns]
        self.types = [_PA_TYPES[c.sql_type] for c in self.columns]
        self._keys: dict[str, tuple[int, int, str, str]] = {}
        for ci, col in enumerate(self.columns):
            for prio, key in enumerate(col.keys):
                self._keys.setdefault(key, (ci, prio, col.kind, col.sql_type))

    def lift_row(self, pairs: Sequence[tuple[str, Any]]) -> tuple[list[Any], list[tuple[str, Any]]]:
        """Typed-column values for one attribute list (used for resources), and
        the pairs the JSON column must keep (see the class docstring)."""
        row: list[Any] = [None] * len(self.columns)
        best = [1 << 30] * len(self.columns)
        won: list[int] = [-1] * len(self.columns)  # position of the pair a column took, if exact
        for i, (key, value) in enumerate(pairs):
            spec = self._keys.get(key)
            if spec is None:
                continue
            v = coerce(value, spec[2], spec[3])
            if v is not None and spec[1] <= best[spec[0]]:
                row[spec[0]] = v
                best[spec[0]] = spec[1]
                won[spec[0]] = i if type(value) is _NATIVE[spec[2]] and self.strip[spec[0]] else -1
        if max(won, default=-1) < 0:
            return row, list(pairs)
        last = {k: i for i, (k, _) in enumerate(pairs)}
        # a key leaves the JSON only if the column took its last copy (the one JSON would keep)
        lifted = {pairs[i][0] for i in won if i >= 0 and last[pairs[i][0]] == i}
        return row, [p for p in pairs if p[0] not in lifted]

    # -- building entries

    def entries(self, keys: pa.Array, vals: Values, trunc: np.ndarray) -> Entries:
        """Entries from keys (a string array) and their typed values."""
        enc = keys.dictionary_encode()
        key_id = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        uniq = enc.dictionary.to_pylist()
        k = len(uniq)
        k_json = pa.array([_jstr(u) + ":" for u in uniq], pa.string())
        k_col = np.full(k, -1, dtype=np.int64)
        k_prio = np.zeros(k, dtype=np.int64)
        k_kind = np.zeros(k, dtype=np.int8)
        k_i32 = np.zeros(k, dtype=bool)
        k_gen = np.zeros(k, dtype=bool)
        for j, u in enumerate(uniq):
            spec = self._keys.get(u)
            if spec is not None:
                k_col[j], k_prio[j], k_kind[j] = spec[0], spec[1], _KIND_CODE[spec[2]]
                k_i32[j] = spec[3] == "INTEGER"
            k_gen[j] = u.startswith("gen_ai.")
        e = Entries()
        e.keys = uniq
        e.key_id = key_id
        e.trunc = trunc
        e.vals = vals
        e.k_json = k_json
        e.gen_ai = k_gen[key_id]
        e.prio = k_prio[key_id]
        kind = k_kind[key_id]
        col = k_col[key_id]
        vt = vals.vtype
        ival, fval = vals.ival, vals.fval
        with np.errstate(invalid="ignore"):
            integral = np.isfinite(fval) & (np.floor(fval) == fval) & (np.abs(fval) < 9.2e18)
        lift_i = np.where(vt == _INT, ival, np.where(integral, fval, 0).astype(np.int64))
        ok_int = (vt == _INT) | ((vt == _FLT) & integral)
        i32 = k_i32[key_id]
        ok_int &= ~i32 | ((lift_i >= _INT32_MIN) & (lift_i <= _INT32_MAX))
        lift_f = np.where(vt == _INT, ival.astype(np.float64), fval)
        ok = np.where(kind == _STR, (vt == _STR) | (vt == _INT),
                      np.where(kind == _INT, ok_int, (kind == _FLT) & ((vt == _INT) | (vt == _FLT))))
        # numeric strings for numeric columns: rare, done in Python
        num_str = np.nonzero((vt == _STR) & ((kind == _INT) | (kind == _FLT)))[0]
        if len(num_str):
            for i in num_str.tolist():
                spec_kind = "int" if kind[i] == _INT else "float"
                v = coerce(vals.sval[i].as_py(), spec_kind, "INTEGER" if i32[i] else "BIGINT")
                if v is not None:
                    ok[i] = True
                    if spec_kind == "int":
                        lift_i[i] = v
                    else:
                        lift_f[i] = v
        e.col = np.where(ok, col, -1)
        e.exact = ok & (kind == vt)  # _STR/_INT/_FLT share codes with the kinds
        e.lift_i = lift_i
        e.lift_f = lift_f
        e.lift_s = _lift_text(vals, ok & (kind == _STR))
        return e

    def py_entries(self, flat: Sequence[tuple[str, Any]], trunc: np.ndarray | None = None) -> Entries:
        """Entries for decoded ``(key, value)`` pairs (OTLP/JSON, protobuf fallbacks)."""
        keys = pa.array([p[0] for p in flat], pa.string())
        vals = Values.from_python([p[1] for p in flat])
        if trunc is None:
            trunc = np.zeros(len(flat), dtype=np.int64)
        return self.entries(keys, vals, trunc)

    def pb_entries(self, flat: list[bytes], limit: int, kv_class: Any) -> tuple[Entries, np.ndarray]:
        """Entries for raw KeyValue encodings: ``(distinct entries, entry index per item)``."""
        if not flat:
            return self.py_entries([]), np.zeros(0, dtype=np.int64)
        enc = pc.dictionary_encode(pa.array(flat, pa.binary()))
        index = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        keys, vals, fallback = decode_blobs(enc.dictionary, limit)
        trunc = np.zeros(len(vals.vtype), dtype=np.int64)
        if len(fallback):
            counter = Counter()
            blobs = enc.dictionary
            key_list = keys.to_pylist()
            values = []
            for i in fallback.tolist():
                before = counter.n
                key, value = decode_kv_blob(blobs[i].as_py(), limit, counter, kv_class)
                trunc[i] = counter.n - before
                key_list[i] = key
                values.append(value)
            keys = pa.array(key_list, pa.string())
            vals.patch(fallback.tolist(), values)
        return self.entries(keys, vals, trunc), index


def _lift_text(vals: Values, wanted: np.ndarray) -> pa.Array:
    """Text-column values: strings as they are, integers in decimal."""
    ints = np.nonzero(wanted & (vals.vtype == _INT))[0]
    if not len(ints):
        return vals.sval
    texts = vals.sval.to_pylist()
    for i, v in zip(ints.tolist(), vals.ival[ints].tolist()):
        texts[i] = str(v)
    return pa.array(texts, pa.string())


# ------------------------------------------------------------ vectorised KeyValue reader


def _substrings(data: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> pa.Array:
    """A string array of ``data[starts[i]:starts[i]+lengths[i]]`` (UTF-8 checked)."""
    n = len(starts)
    offsets = np.zeros(n + 1, dtype=np.int32)  # bodies are far below 2 GiB
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    idx = np.repeat(starts - offsets[:-1], lengths) + np.arange(total, dtype=np.int64)
    buf = data[idx].tobytes()
    arr = pa.BinaryArray.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets.tobytes()), pa.py_buffer(buf)])
    return arr.cast(pa.string())  # raises ArrowInvalid on bad UTF-8


_SHIFTS = (7 * np.arange(10, dtype=np.uint64)).astype(np.uint64)
_PAD = 160  # reads past an item's end stay inside the padded buffer


def decode_blobs(blobs: pa.Array, limit: int) -> tuple[pa.Array, Values, np.ndarray]:
    """Decode serialized ``KeyValue``s with scalar values, all at once.

    Handles the canonical encoding every SDK writes for scalar attributes with
    short keys and values (key < 128 bytes, value < 126 bytes). Returns the
    keys, the values and the indices it did *not* handle (empty key, nested
    values, bytes, long or over-limit strings, reordered or unknown fields);
    their keys are ``""`` and values null until the caller fills them in.
    """
    n = len(blobs)
    offs = np.frombuffer(blobs.buffers()[1], dtype=np.int32)[blobs.offset: blobs.offset + n + 1].astype(np.int64)
    raw = blobs.buffers()[2]
    data = np.frombuffer(raw, dtype=np.uint8) if raw is not None else np.zeros(0, dtype=np.uint8)
    d = np.concatenate([data, np.zeros(_PAD, dtype=np.uint8)])
    s = offs[:-1]
    length = offs[1:] - s
    # header: 0A <key len> key 12 <value len> <value tag> ...
    ok = length >= 4
    s = np.where(ok, s, 0)
    kl = d[s + 1].astype(np.int64)
    ok &= (d[s] == 0x0A) & (kl > 0) & (kl < 128) & (kl <= limit)
    p = np.where(ok, s + 2 + kl, 0)
    vl = d[p + 1].astype(np.int64)
    ok &= (d[p] == 0x12) & (vl < 128) & (length == 4 + kl + vl)
    tag = np.where(ok & (vl > 0), d[p + 2], 0)
    q = p + 3  # first byte after the value's tag
    vtype = np.zeros(n, dtype=np.int8)
    handled = ok & (vl == 0)  # empty AnyValue: null

    # strings: 0A <len> bytes
    i_str = np.nonzero(tag == 0x0A)[0]
    sl = d[q[i_str]].astype(np.int64)
    good = (sl < 128) & (vl[i_str] == sl + 2) & (sl <= limit)
    i_str, sl = i_str[good], sl[good]
    vtype[i_str] = _STR
    handled[i_str] = True
    # ints: 18 varint (1-10 bytes, canonical)
    ival = np.zeros(n, dtype=np.int64)
    i_int = np.nonzero(tag == 0x18)[0]
    if len(i_int):
        nb = vl[i_int] - 1
        width = int(min(max(int(nb.max()), 1), 10))  # token counts and ids take 1-3 bytes, not 10
        grid = d[q[i_int][:, None] + np.arange(width)].astype(np.uint64)
        pos = np.arange(width)[None, :]
        within = pos < nb[:, None]
        cont = (grid & 0x80) != 0
        canon = (nb >= 1) & (nb <= 10) & np.all((cont == (pos < (nb - 1)[:, None])) | ~within, axis=1)
        v = np.sum(np.where(within, (grid & np.uint64(0x7F)) << _SHIFTS[:width], np.uint64(0)), axis=1, dtype=np.uint64)
        i_int, v = i_int[canon], v[canon]
        ival[i_int] = v.view(np.int64)
        vtype[i_int] = _INT
        handled[i_int] = True
    # doubles: 21 + 8 bytes little endian
    fval = np.zeros(n, dtype=np.float64)
    i_flt = np.nonzero((tag == 0x21) & (vl == 9))[0]
    if len(i_flt):
        fval[i_flt] = np.ascontiguousarray(d[q[i_flt][:, None] + np.arange(8)]).view("<f8").reshape(len(i_flt))
        vtype[i_flt] = _FLT
        handled[i_flt] = True
    # bools: 10 + one varint byte
    bval = np.zeros(n, dtype=bool)
    i_bool = np.nonzero((tag == 0x10) & (vl == 2))[0]
    if len(i_bool):
        byte = d[q[i_bool]]
        i_bool, byte = i_bool[byte < 0x80], byte[byte < 0x80]
        bval[i_bool] = byte != 0
        vtype[i_bool] = _BOOL
        handled[i_bool] = True

    keys = _substrings(d, s + 2, np.where(handled, kl, 0))
    if len(i_str) == n:
        svals = _substrings(d, q + 1, sl)
    else:
        starts = np.zeros(n, dtype=np.int64)
        lens = np.zeros(n, dtype=np.int64)
        starts[i_str] = q[i_str] + 1
        lens[i_str] = sl
        is_str = np.zeros(n, dtype=bool)
        is_str[i_str] = True
        svals = _substrings(d, starts, lens)
        svals = pa.Array.from_buffers(pa.string(), n, [pa.array(is_str).buffers()[1]] + svals.buffers()[1:])
    return keys, Values(vtype, svals, ival, fval, bval, {}), np.nonzero(~handled)[0]


# ----------------------------------------------------------------- item columns


class AttrColumns:
    """The result of :func:`columns`: JSON column, typed columns, gen_ai flags."""

    __slots__ = ("json", "lifted", "gen_ai", "truncated")

    def __init__(self, json_col: pa.Array, lifted: list[pa.Array], gen_ai: np.ndarray, truncated: int) -> None:
        self.json = json_col
        self.lifted = lifted
        self.gen_ai = gen_ai
        self.truncated = truncated


def columns(lifter: Lifter, e: Entries, index: np.ndarray, counts: Sequence[int]) -> AttrColumns:
    """Assemble per-item columns.

    Typed columns first; then the JSON column from the attributes that were
    not stored in a typed column with their own type (see :class:`Lifter`).

    Args:
        e: distinct attributes.
        index: for each attribute of each item, in item order, its entry.
        counts: number of attributes of each item.
    """
    n = len(counts)
    cnt = np.asarray(counts, dtype=np.int64)
    item_of = np.repeat(np.arange(n, dtype=np.int64), cnt)
    n_keys = max(len(e.keys), 1)
    combined = item_of * n_keys + e.key_id[index] if len(index) else np.zeros(0, dtype=np.int64)

    lifted: list[pa.Array] = []
    col_flat = e.col[index] if len(index) else np.zeros(0, dtype=np.int64)
    seen = np.bincount(col_flat + 1, minlength=len(lifter.columns) + 1)[1:] if len(col_flat) else np.zeros(len(lifter.columns))
    present = set(np.nonzero(seen)[0].tolist())
    arrays: dict[str, pa.Array] = {}
    winners: list[np.ndarray] = []  # flat positions whose value a typed column holds exactly
    for ci, spec in enumerate(lifter.columns):
        typ = lifter.types[ci]
        if ci not in present:
            lifted.append(pa.nulls(n, typ))
            continue
        pos = np.nonzero(col_flat == ci)[0]
        if len(spec.keys) > 1:
            # later "also read" keys first, so the first key present wins
            pos = pos[np.argsort(-e.prio[index[pos]], kind="stable")]
        win = np.full(n, -1, dtype=np.int64)
        win[item_of[pos]] = pos  # last assignment wins: the first key, its last occurrence
        sel = np.where(win >= 0, index[np.maximum(win, 0)], -1)
        if lifter.strip[ci]:
            w = win[win >= 0]
            winners.append(w[e.exact[index[w]]])
        if spec.kind not in arrays:
            arrays[spec.kind] = {"str": lambda: e.lift_s, "int": lambda: pa.array(e.lift_i, pa.int64()),
                                 "float": lambda: pa.array(e.lift_f, pa.float64())}[spec.kind]()
        col = arrays[spec.kind].take(pa.array(sel, pa.int64(), mask=sel < 0))
        lifted.append(col.cast(typ) if col.type != typ else col)

    # JSON: drop every copy (in its item) of a key whose last copy, the one the
    # JSON object would keep, went to a column with its own type
    if winners:
        gone = np.concatenate(winners)
        if len(gone) and _has_repeats(combined, n * n_keys):
            rev = combined[::-1]
            _, last_rev = np.unique(rev, return_index=True)
            is_last = np.zeros(len(combined), dtype=bool)
            is_last[len(combined) - 1 - last_rev] = True
            gone = gone[is_last[gone]]
        keep = ~np.isin(combined, combined[gone]) if len(gone) else np.ones(len(index), dtype=bool)
        j_index, j_item, j_comb = index[keep], item_of[keep], combined[keep]
        j_cnt = np.bincount(j_item, minlength=n) if len(j_item) else np.zeros(n, dtype=np.int64)
    else:
        j_index, j_item, j_comb, j_cnt = index, item_of, combined, cnt
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(j_cnt, out=offsets[1:])
    if len(j_index):
        need, j_local = np.unique(j_index, return_inverse=True)  # format each needed entry once
        frags = e.frags(need)
        taken = frags.take(pa.array(j_local.reshape(-1), pa.int64()))
    else:
        need, j_local, frags = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), pa.array([], pa.string())
        taken = frags
    lists = pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), taken)
    json_col = pc.binary_join_element_wise("{", pc.binary_join(lists, ","), "}", "")
    if len(j_index) and _has_repeats(j_comb, n * n_keys):
        json_col = _dedupe_json(frags, j_local, e.key_id[j_index], offsets, json_col, j_item, j_comb)

    if len(index):
        gen_ai = np.bincount(item_of[e.gen_ai[index]], minlength=n) > 0
        truncated = int(e.trunc[index].sum())
    else:
        gen_ai = np.zeros(n, dtype=bool)
        truncated = 0
    return AttrColumns(json_col, lifted, gen_ai, truncated)


def _has_repeats(combined: np.ndarray, space: int) -> bool:
    """Whether some item has a key twice (``combined`` = item * n_keys + key)."""
    if not len(combined):
        return False
    if space <= 1 << 24:
        return bool(np.bincount(combined).max() > 1)
    return len(np.unique(combined)) != len(combined)


def _dedupe_json(frags: pa.Array, local: np.ndarray, key_ids: np.ndarray, offsets: np.ndarray, json_col: pa.Array,
                 item_of: np.ndarray, combined: np.ndarray) -> pa.Array:
    """Rebuild the JSON of items that repeat a key (last value wins, as in a dict).

    ``local[p]``: position in ``frags`` of the p-th attribute; ``key_ids[p]`` its key.
    """
    _, first, counts = np.unique(combined, return_index=True, return_counts=True)
    dup_items = np.unique(item_of[first[counts > 1]])
    out = json_col.to_pylist()
    loc = local.tolist()
    keys = key_ids.tolist()
    for it in dup_items.tolist():
        parts: dict[int, str] = {}
        for p in range(int(offsets[it]), int(offsets[it + 1])):
            parts.pop(keys[p], None)
            parts[keys[p]] = frags[loc[p]].as_py()
        out[it] = "{" + ",".join(parts.values()) + "}"
    return pa.array(out, pa.string())


def pairs_json(pairs: Iterable[tuple[str, Any]]) -> str:
    """JSON object text for a small attribute list (resources), last key wins."""
    parts: dict[str, str] = {}
    for k, v in pairs:
        parts.pop(k, None)
        parts[k] = _jstr(k) + ":" + value_json(v)
    return "{" + ",".join(parts.values()) + "}"

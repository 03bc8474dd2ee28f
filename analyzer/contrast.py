"""Which attribute values are over-represented among the slow requests.

Honeycomb's BubbleUp idea, done as one GROUP BY per dimension in DuckDB: for
every (dimension, value), the share of slow requests that have it against the
share of baseline requests that have it, the lift, and a two-proportion
z-test. Many values are tested at once, so a value counts only when it clears
a Bonferroni-corrected level (a shotgun of comparisons would otherwise
always find "something").
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any, Sequence

import duckdb
import pyarrow as pa

from analyzer.requests import REQUEST_PREDICATE

ALPHA = 0.05
MIN_SLOW = 3
TOP = 10

# Each dimension: the raw key columns it groups by (cheap to hash: ints and
# the stored strings) and how a group's value is written out. Grouping on
# raw keys and formatting the few groups afterwards is ~3x cheaper than
# building a string per request per dimension.
DIMENSIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "instance": (("service_instance_id",), "service_instance_id"),
    "host": (("host_name",), "host_name"),
    "gpu": (("host_name", "gpu_index"), "host_name || '/gpu' || gpu_index::VARCHAR"),
    "model": (("model",), "model"),
    "shape_len": (("shape_len",), "shape_len::VARCHAR"),
    "input_len_bucket": (("in_octave",), "'<=' || CAST(pow(2, in_octave) AS BIGINT)::VARCHAR"),
    "output_len_bucket": (("out_octave",), "'<=' || CAST(pow(2, out_octave) AS BIGINT)::VARCHAR"),
    "batch_size": (("batch_size_",), "batch_size_::VARCHAR"),
    "priority": (("priority",), "priority"),
    "pool": (("pool",), "pool"),
    "hour_utc": (("hour_",), "lpad(hour_::VARCHAR, 2, '0') || ':00'"),
}
_KEYS = sorted({k for keys, _ in DIMENSIONS.values() for k in keys})


def _octave(col: str) -> str:
    return f"CASE WHEN {col} IS NULL THEN NULL ELSE CAST(ceil(log2(greatest({col}, 1))) AS INTEGER) END"


def _grouping_id(keys: Sequence[str]) -> int:
    """DuckDB's grouping() over _KEYS for a set grouped by ``keys`` (a bit per key not grouped)."""
    n = len(_KEYS)
    return sum(1 << (n - 1 - i) for i, k in enumerate(_KEYS) if k not in keys)


def _p_value(s: int, S: int, b: int, B: int) -> float:
    if S == 0 or B == 0:
        return 1.0
    p = (s + b) / (S + B)
    se = math.sqrt(p * (1 - p) * (1 / S + 1 / B))
    if se == 0:
        return 1.0
    z = (s / S - b / B) / se
    return math.erfc(abs(z) / math.sqrt(2))


def counts(
    con: duckdb.DuckDBPyConnection,
    service: str,
    slow: Sequence[tuple[str, str]],
    start: datetime,
    end: datetime,
) -> list[tuple[str, str, int, int]]:
    """(dimension, value, slow requests, other requests) for every value seen in [start, end): one scan."""
    con.register("_slowids", pa.table({"trace_id": [s[0] for s in slow], "span_id": [s[1] for s in slow]}))
    sets = ", ".join("(" + ", ".join(keys) + ")" for keys, _ in DIMENSIONS.values())
    dim_of = " ".join(f"WHEN {_grouping_id(keys)} THEN '{d}'" for d, (keys, _) in DIMENSIONS.items())
    value_of = " ".join(f"WHEN '{d}' THEN {fmt}" for d, (_, fmt) in DIMENSIONS.items())
    try:
        rows = con.execute(
            f"""WITH r AS (
                  SELECT trace_id, span_id, batch_id, service_instance_id, host_name, gpu_index, model, shape_len,
                      {_octave('input_tokens')} AS in_octave, {_octave('output_tokens')} AS out_octave,
                      priority, pool, hour(start_time) AS hour_
                  FROM spans WHERE {REQUEST_PREDICATE} AND service_name = ? AND start_time >= ? AND start_time < ?
               ),
               bs AS (
                  SELECT batch_id, any_value(batch_size) AS batch_size FROM spans
                  WHERE role = 'batch' AND start_time >= ? - INTERVAL 10 MINUTE AND start_time < ? AND batch_id IS NOT NULL
                  GROUP BY batch_id
               ),
               l AS (
                  SELECT r.* EXCLUDE (trace_id, span_id, batch_id), b.batch_size AS batch_size_,
                      (r.trace_id, r.span_id) IN (SELECT trace_id, span_id FROM _slowids) AS slow
                  FROM r LEFT JOIN bs b USING (batch_id)
               ),
               g AS (
                  SELECT CASE grouping({', '.join(_KEYS)}) {dim_of} END AS dim, {', '.join(_KEYS)},
                      count(*) FILTER (WHERE slow) AS s, count(*) FILTER (WHERE NOT slow) AS b
                  FROM l GROUP BY GROUPING SETS ({sets})
               )
               SELECT dim, CASE dim {value_of} END AS value, s, b FROM g""",
            [service, start, end, start, end],
        ).fetchall()
    finally:
        con.unregister("_slowids")
    return [(d, v, int(n_s), int(n_b)) for d, v, n_s, n_b in rows if v is not None]


def contrast(
    con: duckdb.DuckDBPyConnection,
    service: str,
    slow: Sequence[tuple[str, str]],
    start: datetime,
    end: datetime,
) -> list[dict[str, Any]]:
    """Dimension values over-represented among ``slow`` vs the service's other requests in [start, end)."""
    if not slow:
        return []
    rows = counts(con, service, slow, start, end)
    totals: dict[str, tuple[int, int]] = {}
    for dim, _, s, b in rows:
        S, B = totals.get(dim, (0, 0))
        totals[dim] = (S + s, B + b)
    tested = [r for r in rows if r[2] >= MIN_SLOW]
    m = max(1, len(tested))
    out = []
    for dim, value, s, b in tested:
        S, B = totals[dim]
        if S == 0 or B == 0:
            continue
        p1, p0 = s / S, b / B
        lift = ((s + 0.5) / (S + 1)) / ((b + 0.5) / (B + 1))
        pv = _p_value(s, S, b, B)
        if lift > 1.0 and pv * m < ALPHA:
            out.append({"dimension": dim, "value": value, "slow": int(s), "baseline": int(b),
                        "slow_share": round(p1, 4), "baseline_share": round(p0, 4), "lift": round(lift, 2),
                        "p_value": float(f"{min(1.0, pv * m):.3g}")})
    out.sort(key=lambda r: (-r["lift"], r["p_value"]))
    return out[:TOP]

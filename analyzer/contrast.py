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

DIMENSIONS: dict[str, str] = {
    "instance": "service_instance_id",
    "host": "host_name",
    "gpu": "host_name || '/gpu' || gpu_index::VARCHAR",
    "model": "model",
    "shape_len": "shape_len::VARCHAR",
    "input_len_bucket": "CASE WHEN input_tokens IS NULL THEN NULL ELSE '<=' || CAST(pow(2, ceil(log2(greatest(input_tokens, 1)))) AS BIGINT)::VARCHAR END",
    "output_len_bucket": "CASE WHEN output_tokens IS NULL THEN NULL ELSE '<=' || CAST(pow(2, ceil(log2(greatest(output_tokens, 1)))) AS BIGINT)::VARCHAR END",
    "batch_size": "batch_size_::VARCHAR",
    "priority": "priority",
    "pool": "pool",
    "hour_utc": "lpad(hour(start_time)::VARCHAR, 2, '0') || ':00'",
}


def _p_value(s: int, S: int, b: int, B: int) -> float:
    if S == 0 or B == 0:
        return 1.0
    p = (s + b) / (S + B)
    se = math.sqrt(p * (1 - p) * (1 / S + 1 / B))
    if se == 0:
        return 1.0
    z = (s / S - b / B) / se
    return math.erfc(abs(z) / math.sqrt(2))


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
    con.register("_slowids", pa.table({"trace_id": [s[0] for s in slow], "span_id": [s[1] for s in slow]}))
    try:
        dims = " UNION ALL ".join(f"SELECT slow, '{d}' AS dim, ({e}) AS value FROM l" for d, e in DIMENSIONS.items())
        rows = con.execute(
            f"""WITH r AS (
                  SELECT * FROM spans WHERE {REQUEST_PREDICATE} AND service_name = ? AND start_time >= ? AND start_time < ?
               ),
               bs AS (
                  SELECT batch_id, any_value(batch_size) AS batch_size FROM spans
                  WHERE role = 'batch' AND start_time >= ? - INTERVAL 10 MINUTE AND start_time < ? AND batch_id IS NOT NULL
                  GROUP BY batch_id
               ),
               l AS MATERIALIZED (
                  SELECT r.*, b.batch_size AS batch_size_, (r.trace_id, r.span_id) IN (SELECT trace_id, span_id FROM _slowids) AS slow
                  FROM r LEFT JOIN bs b USING (batch_id)
               )
               SELECT dim, value, count(*) FILTER (WHERE slow) AS s, count(*) FILTER (WHERE NOT slow) AS b
               FROM ({dims}) d
               WHERE value IS NOT NULL GROUP BY ALL""",
            [service, start, end, start, end],
        ).fetchall()
    finally:
        con.unregister("_slowids")
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

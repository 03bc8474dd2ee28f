"""What is normal for a comparable request, and which requests exceeded it.

A request is judged against requests like it: same service and model, input
and output lengths in the same half-octave (falling back to coarser classes
when a class has too few requests), taken from a reference period with the
incident windows cut out. The expected latency is the class median; the
normal spread is the class's p90 - p50. A request is slow when it exceeds the
median by more than SLOW_SPREADS spreads, or exceeds its service's SLO.

Everything here is one SQL statement per step over DuckDB; the per-request
work in Python starts only with the (few) slow requests.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Sequence

import duckdb

from analyzer.requests import COMPONENTS, REQUEST_PREDICATE, component_exprs, length_bucket, request_columns, stage_sums_sql

# Why 2.5 spreads: for lognormal latencies (σ 0.5 to 1) it flags roughly the
# top 1-2 % of a class in steady traffic, so in an incident the flagged set is
# dominated by the requests the incident actually hurt.
SLOW_SPREADS = 2.5
MIN_CLASS = 30
REFERENCE_SAMPLE = 200_000
MAX_SLOW = 5_000

# Finest first. Output length drives decode time, so the fallbacks keep it
# (half-octave, then octave) before giving up on lengths altogether.
_LEVELS = (
    ("l4", ("service", "model", "ib", "ob")),
    ("l3", ("service", "model", "ob")),
    ("l2", ("service", "model", "ob2")),
    ("l1", ("service", "model")),
    ("l0", ("service",)),
)
_KEYS = ("service", "model", "ib", "ob", "ob2")


@dataclass(frozen=True)
class Span:
    """A time range over which requests are looked at."""

    start: datetime
    end: datetime


def _service_filter(services: Sequence[str] | None) -> tuple[str, list[Any]]:
    if not services:
        return "TRUE", []
    marks = ", ".join("?" for _ in services)
    return f"service_name IN ({marks})", list(services)


def _ranges_filter(col: str, ranges: Sequence[tuple[str, datetime, datetime]], negate: bool) -> tuple[str, list[Any]]:
    if not ranges:
        return ("TRUE" if negate else "FALSE"), []
    parts, params = [], []
    for service, a, b in ranges:
        parts.append(f"(service_name = ? AND {col} >= ? AND {col} < ?)")
        params += [service, a, b]
    expr = " OR ".join(parts)
    return (f"NOT ({expr})" if negate else f"({expr})"), params


def class_baselines(
    con: duckdb.DuckDBPyConnection,
    services: Sequence[str] | None,
    ref: Span,
    exclude: Sequence[tuple[str, datetime, datetime]],
    components: bool = True,
) -> "Any":
    """Per class and level: n, p50/p90 latency and median of each component (Arrow table).

    ``components=False`` skips the stage-span join (spike detection needs
    only the latency thresholds).
    """
    svc_sql, svc_params = _service_filter(services)
    ex_sql, ex_params = _ranges_filter("start_time", exclude, negate=True)
    comps = ", ".join(f"median({c}_ms) AS {c}_ms" for c in COMPONENTS) if components else "NULL AS _none"
    selects = []
    for name, keys in _LEVELS:
        cols = ", ".join(keys)
        pad = ", ".join(
            k if k in keys else ("NULL::VARCHAR" if k in ("service", "model") else "NULL::INTEGER") + f" AS {k}"
            for k in _KEYS
        )
        selects.append(
            f"""SELECT '{name}' AS level, {pad}, count(*) AS n,
                quantile_cont(latency_ms, 0.5) AS p50_ms, quantile_cont(latency_ms, 0.9) AS p90_ms, {comps}
            FROM ref_rows GROUP BY {cols}"""
        )
    kids_cte = f"kids AS ({stage_sums_sql('ref_req')})," if components else ""
    comp_cols = ",\n            " + component_exprs("r", "k") if components else ""
    kids_join = "LEFT JOIN kids k USING (trace_id, span_id)" if components else ""
    sql = f"""
    WITH ref_req AS (
        SELECT * FROM (
            SELECT {request_columns()},
                {length_bucket('input_tokens')} AS ib, {length_bucket('output_tokens')} AS ob
            FROM spans
            WHERE {REQUEST_PREDICATE} AND start_time >= ? AND start_time < ? AND {svc_sql} AND {ex_sql}
        ) USING SAMPLE reservoir({REFERENCE_SAMPLE} ROWS) REPEATABLE (17)
    ),
    {kids_cte}
    ref_rows AS (
        SELECT r.service, coalesce(r.model, '') AS model, r.ib, r.ob, r.ob // 2 AS ob2, r.latency_ms{comp_cols}
        FROM ref_req r {kids_join}
    )
    {' UNION ALL '.join(selects)}
    """
    return con.sql(sql, params=[ref.start, ref.end, *svc_params, *ex_params]).to_arrow_table()


def class_join(classes_name: str, row: str = "r") -> tuple[str, Any]:
    """LEFT JOINs of a row relation onto every class level, and a picker of the finest level's column."""
    joins, picks = [], []
    for name, keys in _LEVELS:
        cond = " AND ".join(f"{name}.{k} IS NOT DISTINCT FROM {row}.{k}" for k in keys)
        joins.append(f"LEFT JOIN (SELECT * FROM {classes_name} WHERE level = '{name}' AND n >= {MIN_CLASS}) {name} ON {cond}")
        picks.append(name)

    def pick(col: str) -> str:
        return "coalesce(" + ", ".join(f"{p}.{col}" for p in picks) + ")"

    return " ".join(joins), pick


def slow_threshold_sql(pick: Any) -> str:
    """Latency above which a request is slow for its class (before the SLO)."""
    spread = f"greatest({pick('p90_ms')} - {pick('p50_ms')}, 0.1 * {pick('p50_ms')}, 1.0)"
    return f"({pick('p50_ms')} + {SLOW_SPREADS} * {spread})"


def slow_candidates(
    con: duckdb.DuckDBPyConnection,
    classes_name: str,
    services: Sequence[str] | None,
    ranges: Sequence[tuple[str, datetime, datetime]] | None,
    window: Span,
    slo: dict[str, float],
    limit: int = MAX_SLOW,
    trace_id: str | None = None,
) -> list[dict[str, Any]]:
    """Requests in ``window`` (and in ``ranges`` when given) that exceed their class's normal.

    ``classes_name`` is a registered relation from :func:`class_baselines`.
    Returns dict rows with the expected latency and components, most excess first.
    With ``trace_id`` the threshold is not applied: that trace's request is
    returned with its baseline whether or not it was slow.
    """
    svc_sql, svc_params = _service_filter(services)
    rg_sql, rg_params = _ranges_filter("start_time", ranges or (), negate=False) if ranges is not None else ("TRUE", [])
    slo_sql = " ".join(f"WHEN ? THEN ?" for _ in slo)
    slo_params: list[Any] = []
    for k, v in slo.items():
        slo_params += [k, float(v)]
    slo_expr = f"CASE r.service {slo_sql} ELSE NULL END" if slo else "NULL::DOUBLE"
    join_sql, pick = class_join(classes_name)
    picks = [name for name, _ in _LEVELS]
    level = "CASE " + " ".join(f"WHEN {p}.n IS NOT NULL THEN '{p}'" for p in picks) + " END"
    spread = f"greatest({pick('p90_ms')} - {pick('p50_ms')}, 0.1 * {pick('p50_ms')}, 1.0)"
    exp_comps = ", ".join(f"{pick(c + '_ms')} AS exp_{c}_ms" for c in COMPONENTS)
    slow_sql = (
        "trace_id = ?"
        if trace_id is not None
        else f"(latency_ms > expected_ms + {SLOW_SPREADS} * spread_ms OR (slo_ms IS NOT NULL AND latency_ms > slo_ms))"
    )
    sql = f"""
    WITH r AS (
        SELECT {request_columns()}, coalesce(model, '') AS model_key,
            {length_bucket('input_tokens')} AS ib, {length_bucket('output_tokens')} AS ob,
            {length_bucket('output_tokens')} // 2 AS ob2
        FROM spans
        WHERE {REQUEST_PREDICATE} AND start_time >= ? AND start_time < ? AND {svc_sql} AND {rg_sql}
    ),
    j AS (
        SELECT r.*, {pick('p50_ms')} AS expected_ms, {spread} AS spread_ms, {level} AS class_level,
            {pick('n')} AS class_n, {slo_expr} AS slo_ms, {exp_comps}
        FROM (SELECT * REPLACE (model_key AS model) FROM r) r
        {join_sql}
    )
    SELECT *, latency_ms - expected_ms AS excess_ms, epoch(start_time) AS t0, epoch(end_time) AS t1
    FROM j
    WHERE expected_ms IS NOT NULL AND {slow_sql}
    ORDER BY excess_ms DESC
    LIMIT {int(limit)}
    """
    params = [window.start, window.end, *svc_params, *rg_params, *slo_params]
    if trace_id is not None:
        params.append(trace_id)
    cur = con.execute(sql, params)
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, row)) for row in cur.fetchall()]

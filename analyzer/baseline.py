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
from datetime import datetime, timedelta
from typing import Any, Sequence

import duckdb

from analyzer.requests import COMPONENTS, LATENCY_MS, REQUEST_PREDICATE, component_exprs, length_bucket, request_columns, stage_sums_sql

# Why 2.5 spreads: for lognormal latencies (σ 0.5 to 1) it flags roughly the
# top 1-2 % of a class in steady traffic, so in an incident the flagged set is
# dominated by the requests the incident actually hurt.
SLOW_SPREADS = 2.5
MIN_CLASS = 30
REFERENCE_SAMPLE = 100_000  # requests a baseline is estimated from, at most (hash-sampled)
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


def service_filter(services: Sequence[str] | None) -> tuple[str, list[Any]]:
    """A predicate on ``service_name`` for these services (``TRUE``: all) and its parameters."""
    if not services:
        return "TRUE", []
    marks = ", ".join("?" for _ in services)
    return f"service_name IN ({marks})", list(services)


def slo_case(slo: dict[str, float], col: str) -> tuple[str, list[Any]]:
    """The p99 objective (ms) of the service in ``col`` as SQL (NULL where none is set), and its parameters."""
    if not slo:
        return "NULL::DOUBLE", []
    params: list[Any] = []
    for name, v in slo.items():
        params += [name, float(v)]
    return f"CASE {col} {' '.join('WHEN ? THEN ?' for _ in slo)} ELSE NULL END", params


def _ranges_filter(col: str, ranges: Sequence[tuple[str, datetime, datetime]], negate: bool) -> tuple[str, list[Any]]:
    if not ranges:
        return ("TRUE" if negate else "FALSE"), []
    parts, params = [], []
    for service, a, b in ranges:
        parts.append(f"(service_name = ? AND {col} >= ? AND {col} < ?)")
        params += [service, a, b]
    expr = " OR ".join(parts)
    return (f"NOT ({expr})" if negate else f"({expr})"), params


def _spans_filter(col: str, spans: Sequence[Span]) -> tuple[str, list[Any]]:
    parts, params = [], []
    for sp in spans:
        parts.append(f"({col} >= ? AND {col} < ?)")
        params += [sp.start, sp.end]
    return "(" + " OR ".join(parts) + ")", params


def count_requests(con: duckdb.DuckDBPyConnection, services: Sequence[str] | None, refs: Sequence[Span]) -> int:
    svc_sql, svc_params = service_filter(services)
    rng_sql, rng_params = _spans_filter("start_time", refs)
    return int(con.execute(
        f"SELECT count(*) FROM spans WHERE {REQUEST_PREDICATE} AND {rng_sql} AND {svc_sql}", [*rng_params, *svc_params]
    ).fetchall()[0][0])


def class_baselines(
    con: duckdb.DuckDBPyConnection,
    services: Sequence[str] | None,
    ref: Span | Sequence[Span],
    exclude: Sequence[tuple[str, datetime, datetime]],
    components: bool = True,
    sample: int = REFERENCE_SAMPLE,
    total: int | None = None,
) -> "Any":
    """Per class and level: n, p50/p90 latency and median of each component (Arrow table).

    ``ref`` is one range or several (one per incident). At most about
    ``sample`` requests set the latency classes: a hash of the start time
    picks them, which DuckDB evaluates while scanning (no reservoir to
    fill; an integer hash, ~5x cheaper than hashing the id strings), and
    which picks the same requests every time (stable baselines, stable
    incident ids). Component medians come from every request of a recent
    slice of each range (:func:`_component_slices`), read with their stage
    spans. ``components=False`` skips that (spike detection needs only the
    latency thresholds). ``total``: the requests in ``ref``, when the caller
    has counted them already (it sets the sample rate).
    """
    refs = [ref] if isinstance(ref, Span) else list(ref)
    svc_sql, svc_params = service_filter(services)
    ex_sql, ex_params = _ranges_filter("start_time", exclude, negate=True)
    rng_sql, rng_params = _spans_filter("start_time", refs)
    if total is None:
        total = count_requests(con, services, refs)
    keep = 10_000 if total <= sample else max(1, int(10_000 * sample / total))
    sample_sql = "TRUE" if keep >= 10_000 else f"hash(start_time) % 10000 < {keep}"
    latency_aggs = ("count(*) AS n, quantile_cont(latency_ms, 0.5) AS p50_ms, quantile_cont(latency_ms, 0.9) AS p90_ms, "
                    "regr_intercept(latency_ms, output_tokens) AS reg_a, regr_slope(latency_ms, output_tokens) AS reg_b")
    comp_aggs = ", ".join(f"median({c}_ms) AS {c}_ms" for c in COMPONENTS)
    lat_sql = " UNION ALL ".join(_per_level(latency_aggs, "ref_rows"))
    ref_rows = f"""ref_rows AS (
        SELECT service_name AS service, coalesce(model, '') AS model,
            {length_bucket('input_tokens')} AS ib, {length_bucket('output_tokens')} AS ob,
            {length_bucket('output_tokens')} // 2 AS ob2, output_tokens, {LATENCY_MS} AS latency_ms
        FROM spans
        WHERE {REQUEST_PREDICATE} AND {rng_sql} AND {svc_sql} AND {ex_sql} AND {sample_sql}
    )"""
    sql = f"WITH {ref_rows} {lat_sql}"
    params = [*rng_params, *svc_params, *ex_params]
    if components:
        slices = _component_slices(con, refs, exclude, services, total)
        slice_sql, slice_params = _spans_filter("start_time", [sl for sl, _ in slices])
        kid_sql, kid_params = _spans_filter("c.start_time", [Span(sl.start, kids_end) for sl, kids_end in slices])
        sql = f"""
        WITH {ref_rows},
        comp_req AS MATERIALIZED (
            SELECT {request_columns()},
                {length_bucket('input_tokens')} AS ib, {length_bucket('output_tokens')} AS ob
            FROM spans
            WHERE {REQUEST_PREDICATE} AND {slice_sql} AND {svc_sql} AND {ex_sql}
        ),
        kids AS ({stage_sums_sql('comp_req', 'AND ' + kid_sql)}),
        comp_rows AS (
            SELECT r.service, coalesce(r.model, '') AS model, r.ib, r.ob, r.ob // 2 AS ob2,
                {component_exprs("r", "k")}
            FROM comp_req r LEFT JOIN kids k USING (trace_id, span_id)
        ),
        lat AS ({lat_sql}),
        comp AS ({" UNION ALL ".join(_per_level(comp_aggs, "comp_rows"))})
        SELECT lat.*, {", ".join(f"comp.{c}_ms" for c in COMPONENTS)}
        FROM lat LEFT JOIN comp ON lat.level = comp.level AND {" AND ".join(f"lat.{k} IS NOT DISTINCT FROM comp.{k}" for k in _KEYS)}
        """
        params += [*slice_params, *svc_params, *ex_params, *kid_params]
    table = con.sql(sql, params=params).to_arrow_table()
    # The unsampled request count rides along as metadata (callers size work by it).
    return table.replace_schema_metadata({**(table.schema.metadata or {}), b"requests": str(total).encode()})


def _per_level(aggs: str, rel: str) -> list[str]:
    """One GROUP BY per class level over ``rel``, keys padded with NULLs to the same columns."""
    selects = []
    for name, keys in _LEVELS:
        pad = ", ".join(
            k if k in keys else ("NULL::VARCHAR" if k in ("service", "model") else "NULL::INTEGER") + f" AS {k}"
            for k in _KEYS
        )
        selects.append(f"SELECT '{name}' AS level, {pad}, {aggs} FROM {rel} GROUP BY {', '.join(keys)}")
    return selects


# Component medians need far fewer requests than latency classes, and the
# stage-span scan (every child span in the slice's time range, read and
# probed by (trace, parent)) is the expensive part of a baseline: they come
# from about COMPONENT_REQUESTS requests, at most the last COMPONENT_SLICE.
COMPONENT_SLICE = timedelta(hours=2)
COMPONENT_REQUESTS = 50_000
COMPONENT_MIN_SLICE = timedelta(minutes=1)


def _component_slices(
    con: duckdb.DuckDBPyConnection,
    refs: Sequence[Span],
    exclude: Sequence[tuple[str, datetime, datetime]],
    services: Sequence[str] | None,
    total: int,
) -> list[tuple[Span, datetime]]:
    """Per reference range, (the slice whose requests give component medians, the end of their child spans' scan).

    A range holding few requests (every lab scenario) gives its last
    COMPONENT_SLICE, anchored at its last request (a range asked for past
    the end of the data still gets its components from the data). A busy
    one gives a slice about COMPONENT_REQUESTS requests long that ends where
    the first excluded range (the incident) inside it begins: the normal
    just before the incident, not the backlog draining after it.
    """
    svc_sql, svc_params = service_filter(services)
    seconds = sum((r.end - r.start).total_seconds() for r in refs) or 1.0
    busy = total > COMPONENT_REQUESTS
    length = max(COMPONENT_MIN_SLICE, min(COMPONENT_SLICE, timedelta(seconds=COMPONENT_REQUESTS / len(refs) * seconds / max(total, 1))))

    def newest(col: str, span: Span) -> datetime | None:
        """The latest ``col`` of the requests that started in ``span``."""
        return con.execute(f"SELECT max({col}) FROM spans WHERE {REQUEST_PREDICATE} AND start_time >= ? AND start_time < ? AND {svc_sql}",
                           [span.start, span.end, *svc_params]).fetchall()[0][0]

    out = []
    for r in refs:
        last = newest("start_time", r)
        end = min(r.end, last + timedelta(milliseconds=1)) if last is not None else r.end
        if busy:
            inside = [a for svc, a, _ in exclude if r.start + length <= a < end and (not services or svc in services)]
            end = min(inside, default=end)
            sl = Span(max(r.start, end - length), end)
        else:
            sl = Span(max(r.start, end - COMPONENT_SLICE), end)
        # Children start before their request ends: scan them up to the slice's last end (a long
        # request's children with it), not a fixed hour past it.
        last_end = newest("end_time", sl)
        out.append((sl, (last_end if last_end is not None else sl.end) + timedelta(minutes=1)))
    return out


@dataclass(frozen=True)
class Expectation:
    """SQL expressions for a row's expected latency, spread and component scale."""

    joins: str
    expected: str
    spread: str
    scale: str
    level: str
    n: str
    pick: Any

    def threshold(self) -> str:
        """Latency above which a request is slow for its class (before the SLO)."""
        return f"({self.expected} + {SLOW_SPREADS} * {self.spread})"


def expectation(classes_name: str, row: str = "r") -> Expectation:
    """Join a row relation (service, model, ib, ob, ob2, output_tokens) onto its class baselines.

    The finest level with at least MIN_CLASS requests wins. When no
    length-aware level has enough (the sparse tail of very long outputs),
    the expectation comes from the service/model's latency-vs-output-tokens
    line, so a long request that took the usual time *for its length* is
    not flagged; its spread is the service's relative spread.
    """
    joins = []
    for name, keys in _LEVELS:
        cond = " AND ".join(f"{name}.{k} IS NOT DISTINCT FROM {row}.{k}" for k in keys)
        joins.append(f"LEFT JOIN (SELECT * FROM {classes_name} WHERE level = '{name}' AND n >= {MIN_CLASS}) {name} ON {cond}")
    names = [n for n, _ in _LEVELS]
    length_aware = names[:3]

    def pick(col: str, among: list[str] = names) -> str:
        return "coalesce(" + ", ".join(f"{p}.{col}" for p in among) + ")"

    coarse = "coalesce(l1.p50_ms, l0.p50_ms)"
    fit = (f"CASE WHEN l1.reg_b > 0 AND {row}.output_tokens IS NOT NULL "
           f"THEN greatest(l1.reg_a + l1.reg_b * {row}.output_tokens, 0.25 * l1.p50_ms) END")
    matched = f"{pick('n', length_aware)} IS NOT NULL"
    expected = f"CASE WHEN {matched} THEN {pick('p50_ms', length_aware)} ELSE coalesce({fit}, {coarse}) END"
    rel = f"(coalesce(l1.p90_ms, l0.p90_ms) / nullif({coarse}, 0) - 1.0)"
    spread = (f"CASE WHEN {matched} THEN greatest({pick('p90_ms', length_aware)} - {pick('p50_ms', length_aware)}, "
              f"0.1 * {pick('p50_ms', length_aware)}, 1.0) "
              f"ELSE greatest(({expected}) * {rel}, 0.1 * ({expected}), 1.0) END")
    scale = f"CASE WHEN {matched} THEN 1.0 ELSE ({expected}) / nullif({coarse}, 0) END"
    level = "CASE " + " ".join(f"WHEN {p}.n IS NOT NULL THEN '{p}'" for p in names) + " END"
    return Expectation(" ".join(joins), expected, spread, scale, level, pick("n"), pick)


def threshold_tables(con: duckdb.DuckDBPyConnection, classes_name: str) -> tuple[Any, Any]:
    """Slow thresholds resolved per class key (service, model, ib, ob) and per service (fallback).

    Lets a pass over millions of requests find the slow ones with one
    equi-join on a small table instead of joining every class level.
    """
    x = expectation(classes_name, row="c")
    thr = con.sql(
        f"""SELECT c.service, c.model, c.ib, c.ob, {x.threshold()} AS thr
            FROM (SELECT service, model, ib, ob, ob // 2 AS ob2, CAST(pow(2, (ob + 0.5) / 2) AS BIGINT) AS output_tokens
                  FROM {classes_name} WHERE level = 'l4') c {x.joins}"""
    ).to_arrow_table()
    thr0 = con.sql(
        f"""SELECT c.service, {x.threshold()} AS thr
            FROM (SELECT service, NULL::VARCHAR AS model, NULL::INTEGER AS ib, NULL::INTEGER AS ob,
                      NULL::INTEGER AS ob2, NULL::BIGINT AS output_tokens
                  FROM {classes_name} WHERE level = 'l0') c {x.joins}"""
    ).to_arrow_table()
    return thr, thr0


# The per-key threshold uses a representative length for the sparse-tail
# fallback; the exact check follows on the few rows that pass, so the
# prefilter only needs to be a little lenient.
PREFILTER = 0.7


def slow_candidates(
    con: duckdb.DuckDBPyConnection,
    classes_name: str,
    services: Sequence[str] | None,
    ranges: Sequence[tuple[str, datetime, datetime]] | None,
    window: Span,
    slo: dict[str, float],
    limit: int = MAX_SLOW,
    trace_id: str | None = None,
    per_range: int | None = None,
) -> list[dict[str, Any]]:
    """Requests in ``window`` (and in ``ranges`` when given) that exceed their class's normal.

    ``classes_name`` is a registered relation from :func:`class_baselines`.
    Returns dict rows with the expected latency and components, most excess first.
    With ``trace_id`` the threshold is not applied: that trace's request is
    returned with its baseline whether or not it was slow.
    With ``per_range`` (and ``ranges``), at most that many slow requests per
    range are returned, a uniform sample (by span-id hash) rather than the
    worst ones, with ``range_idx`` and ``range_total`` (the range's full slow
    count) on each row: enough to estimate an incident's cause shares
    without explaining thousands of requests one by one.
    """
    svc_sql, svc_params = service_filter(services)
    rg_sql, rg_params = _ranges_filter("start_time", ranges or (), negate=False) if ranges is not None else ("TRUE", [])
    slo_expr, slo_params = slo_case(slo, "r.service")
    x = expectation(classes_name)
    exp_comps = ", ".join(f"{x.pick(c + '_ms')} * {x.scale} AS exp_{c}_ms" for c in COMPONENTS)
    range_cols, qualify, range_params = "", "", []
    if per_range is not None and ranges:
        case = " ".join(f"WHEN service = ? AND start_time >= ? AND start_time < ? THEN {k}" for k in range(len(ranges)))
        for service, a, b in ranges:
            range_params += [service, a, b]
        range_cols = f", CASE {case} END AS range_idx, count(*) OVER (PARTITION BY range_idx) AS range_total"
        qualify = f"QUALIFY row_number() OVER (PARTITION BY range_idx ORDER BY hash(span_id)) <= {int(per_range)}"
    prefilter, joins_pre = "", ""
    if trace_id is None:
        thr, thr0 = threshold_tables(con, classes_name)
        con.register("_pthr", thr)
        con.register("_pthr0", thr0)
        joins_pre = "LEFT JOIN _pthr pt USING (service, model, ib, ob) LEFT JOIN _pthr0 pt0 USING (service)"
        # (qualified: the threshold tables joined here have a service column too)
        slo_pre = (" OR " + slo_case(slo, "r0.service")[0] + " IS NOT NULL") if slo else ""
        prefilter = f"AND (latency_ms > {PREFILTER} * coalesce(pt.thr, pt0.thr, 0){slo_pre})"
    slow_sql = (
        "trace_id = ?"
        if trace_id is not None
        else f"(latency_ms > expected_ms + {SLOW_SPREADS} * spread_ms OR (slo_ms IS NOT NULL AND latency_ms > slo_ms))"
    )
    # Selection reads only what it needs; the full request rows are fetched by
    # rowid for the few selected (a day of 10 M requests: ~1.4 s -> ~0.4 s,
    # the wide columns were most of the scan). One statement: one snapshot.
    ids = ", trace_id, span_id" if (trace_id is not None or per_range is not None) else ""
    keep = ", ".join(["rid", "model_key", "ib", "ob", "ob2", "expected_ms", "spread_ms", "class_level", "class_n", "slo_ms",
                      *(f"exp_{c}_ms" for c in COMPONENTS)])
    sql = f"""
    WITH r0 AS (
        SELECT rowid AS rid, service_name AS service, model, coalesce(model, '') AS model_key, output_tokens,
            start_time, {LATENCY_MS} AS latency_ms{ids},
            {length_bucket('input_tokens')} AS ib, {length_bucket('output_tokens')} AS ob,
            {length_bucket('output_tokens')} // 2 AS ob2
        FROM spans
        WHERE {REQUEST_PREDICATE} AND start_time >= ? AND start_time < ? AND {svc_sql} AND {rg_sql}
    ),
    r AS (
        SELECT r0.* FROM (SELECT * REPLACE (model_key AS model) FROM r0) r0 {joins_pre.replace("USING (service, model, ib, ob)", "ON pt.service = r0.service AND pt.model = r0.model AND pt.ib = r0.ib AND pt.ob = r0.ob").replace("USING (service)", "ON pt0.service = r0.service")}
        WHERE TRUE {prefilter.replace("latency_ms", "r0.latency_ms")}
    ),
    j AS (
        SELECT r.*, {x.expected} AS expected_ms, {x.spread} AS spread_ms, {x.level} AS class_level,
            {x.n} AS class_n, {slo_expr} AS slo_ms, {exp_comps}
        FROM r
        {x.joins}
    ),
    top AS (
        SELECT {keep}, latency_ms - expected_ms AS excess_ms{range_cols}
        FROM j
        WHERE expected_ms IS NOT NULL AND {slow_sql}
        {qualify}
        ORDER BY excess_ms DESC
        LIMIT {int(limit)}
    )
    SELECT * REPLACE (model_key AS model) FROM (
        SELECT {request_columns("s")}, top.* EXCLUDE (rid), epoch(s.start_time) AS t0, epoch(s.end_time) AS t1
        FROM top JOIN spans s ON s.rowid = top.rid
    )
    ORDER BY excess_ms DESC
    """
    pre_params = slo_params if (slo and trace_id is None) else []
    params = [window.start, window.end, *svc_params, *rg_params, *pre_params, *slo_params, *range_params]
    if trace_id is not None:
        params.append(trace_id)
    try:
        cur = con.execute(sql, params)
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, row)) for row in cur.fetchall()]
    finally:
        if trace_id is None:
            con.unregister("_pthr")
            con.unregister("_pthr0")

"""Aggregating SQL for the pages that read the store directly.

Every query here aggregates inside DuckDB (time buckets, quantiles, group-bys,
LIMITs) and returns at most a few thousand rows, so a page over a 24-hour
range with millions of spans moves kilobytes into Python, not the spans.
Times in and out are UTC; DuckDB's TIMESTAMP columns are naive UTC.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collector.store import Store

# What a request span is and what its latency is: the analyzer's definitions
# (spec section 3), shared so that every page means the same thing by "p99".
from analyzer.requests import LATENCY_MS, REQUEST_PREDICATE  # noqa: E402

# NVML clocks-event reason bits (SIGNALS.md); the first is benign.
CLOCK_REASONS: tuple[tuple[int, str, bool], ...] = (
    (0x1, "GPU idle", False),
    (0x2, "applications clocks setting", False),
    (0x4, "SW power cap", True),
    (0x8, "HW slowdown", True),
    (0x10, "sync boost", False),
    (0x20, "SW thermal slowdown", True),
    (0x40, "HW thermal slowdown", True),
    (0x80, "HW power brake slowdown", True),
    (0x100, "display clock setting", False),
)

GPU_METRICS = (
    "tailscope.gpu.utilization",
    "tailscope.gpu.memory.used",
    "tailscope.gpu.memory.total",
    "tailscope.gpu.sm_clock",
    "tailscope.gpu.sm_clock.max",
    "tailscope.gpu.power",
    "tailscope.gpu.power.limit",
    "tailscope.gpu.temperature",
)


def decode_clock_reasons(mask: int) -> list[str]:
    """``0x44`` → ``['SW power cap', 'HW thermal slowdown']``; unknown bits are named in hex."""
    names = [name for bit, name, _ in CLOCK_REASONS if mask & bit]
    known = 0
    for bit, _, _ in CLOCK_REASONS:
        known |= bit
    if mask & ~known:
        names.append(f"other bits 0x{mask & ~known:x}")
    return names


def _naive(value: dt.datetime) -> dt.datetime:
    """DuckDB TIMESTAMP parameters are naive UTC."""
    if value.tzinfo is not None:
        value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return value


def _rows(store: "Store", sql: str, params: list[Any]) -> list[dict[str, Any]]:
    cur = store.cursor()
    try:
        cur.execute(sql, params)
        cols = [d[0] for d in cur.description or []]
        return [dict(zip(cols, row)) for row in cur.fetchall()]
    finally:
        cur.close()


def _service_clause(service: str | None, params: list[Any], column: str = "service_name") -> str:
    if not service:
        return ""
    params.append(service)
    return f" AND {column} = ?"


# --- GPUs --------------------------------------------------------------------
def gpu_series(store: "Store", start: dt.datetime, end: dt.datetime, step_s: int, host: str | None = None) -> list[dict[str, Any]]:
    """Per (host, GPU, metric, bucket): mean and max of each GPU gauge."""
    params: list[Any] = [step_s, _naive(start), _naive(end), list(GPU_METRICS)]
    host_clause = ""
    if host:
        host_clause = " AND host_name = ?"
        params.append(host)
    return _rows(
        store,
        f"""
        SELECT host_name, gpu_index, any_value(gpu_name) AS gpu_name, name,
               time_bucket(to_seconds(?::BIGINT), time) AS t,
               avg(value) AS mean, max(value) AS max
        FROM metrics
        WHERE time >= ? AND time < ? AND list_contains(?, name){host_clause}
        GROUP BY ALL ORDER BY host_name, gpu_index, name, t
        """,
        params,
    )


def gpu_clock_reasons(store: "Store", start: dt.datetime, end: dt.datetime) -> list[dict[str, Any]]:
    """Each non-zero clocks-event mask seen per GPU: samples, first and last time."""
    return _rows(
        store,
        """
        SELECT host_name, gpu_index, CAST(value AS BIGINT) AS mask, count(*) AS samples,
               min(time) AS first_seen, max(time) AS last_seen
        FROM metrics
        WHERE name = 'tailscope.gpu.clock_event_reasons' AND time >= ? AND time < ? AND value <> 0
        GROUP BY ALL ORDER BY host_name, gpu_index, samples DESC
        """,
        [_naive(start), _naive(end)],
    )


def gpu_processes(store: "Store", start: dt.datetime, end: dt.datetime) -> list[dict[str, Any]]:
    """Per GPU process: latest and peak memory in the window."""
    return _rows(
        store,
        """
        SELECT host_name, gpu_index, coalesce(point_pid, process_pid) AS pid,
               arg_max(value, time) AS latest_bytes, max(value) AS peak_bytes, max(time) AS last_seen
        FROM metrics
        WHERE name = 'tailscope.gpu.process.memory.used' AND time >= ? AND time < ?
        GROUP BY ALL ORDER BY host_name, gpu_index, peak_bytes DESC
        LIMIT 500
        """,
        [_naive(start), _naive(end)],
    )


def gpu_around(store: "Store", host: str, gpu_index: int | None, start: dt.datetime, end: dt.datetime) -> list[dict[str, Any]]:
    """One GPU's clock, clock max and utilisation samples in a (short) window."""
    params: list[Any] = [host, _naive(start), _naive(end)]
    gpu = ""
    if gpu_index is not None:
        gpu = " AND gpu_index = ?"
        params.append(int(gpu_index))
    return _rows(
        store,
        f"""
        SELECT time, name, value FROM metrics
        WHERE host_name = ? AND time >= ? AND time <= ?{gpu}
          AND name IN ('tailscope.gpu.sm_clock', 'tailscope.gpu.sm_clock.max', 'tailscope.gpu.utilization')
        ORDER BY time LIMIT 2000
        """,
        params,
    )


def gpu_xids(store: "Store", start: dt.datetime, end: dt.datetime) -> list[dict[str, Any]]:
    return _rows(
        store,
        """
        SELECT time, host_name, gpu_index, xid FROM logs
        WHERE event_name = 'tailscope.gpu.xid' AND time >= ? AND time < ?
        ORDER BY time DESC LIMIT 200
        """,
        [_naive(start), _naive(end)],
    )


# --- Shapes and compiles -----------------------------------------------------
def shape_distribution(store: "Store", start: dt.datetime, end: dt.datetime, service: str | None) -> list[dict[str, Any]]:
    """Request count per padded shape length (the length kernels ran with)."""
    params: list[Any] = [_naive(start), _naive(end)]
    svc = _service_clause(service, params)
    return _rows(
        store,
        f"""
        SELECT shape_len, count(*) AS requests FROM spans
        WHERE {REQUEST_PREDICATE} AND start_time >= ? AND start_time < ? AND shape_len IS NOT NULL{svc}
        GROUP BY shape_len ORDER BY shape_len LIMIT 5000
        """,
        params,
    )


BINS_PER_OCTAVE = 4


def length_histograms(store: "Store", start: dt.datetime, end: dt.datetime, service: str | None) -> list[dict[str, Any]]:
    """Requests per quarter-octave length bin, for input lengths and padded shapes alike.

    Log-spaced bins because token lengths span three or four orders of
    magnitude; bin ``k`` covers ``[2**(k/4), 2**((k+1)/4))`` tokens.
    """
    params: list[Any] = [_naive(start), _naive(end)]
    svc = _service_clause(service, params)
    return _rows(
        store,
        f"""
        WITH r AS (
            SELECT input_tokens, shape_len FROM spans
            WHERE {REQUEST_PREDICATE} AND start_time >= ? AND start_time < ?{svc}
        )
        SELECT 'input' AS what, CAST(floor(log2(input_tokens) * {BINS_PER_OCTAVE}) AS INTEGER) AS k, count(*) AS requests
        FROM r WHERE input_tokens > 0 GROUP BY ALL
        UNION ALL
        SELECT 'shape' AS what, CAST(floor(log2(shape_len) * {BINS_PER_OCTAVE}) AS INTEGER) AS k, count(*) AS requests
        FROM r WHERE shape_len > 0 GROUP BY ALL
        ORDER BY what, k
        """,
        params,
    )


def length_counts(store: "Store", start: dt.datetime, end: dt.datetime, service: str | None) -> dict[str, Any]:
    """Exact input lengths with counts (for the bucket optimiser) and the padding now in use."""
    params: list[Any] = [_naive(start), _naive(end)]
    svc = _service_clause(service, params)
    where = f"{REQUEST_PREDICATE} AND start_time >= ? AND start_time < ? AND input_tokens > 0{svc}"
    rows = _rows(store, f"SELECT input_tokens AS len, count(*) AS n FROM spans WHERE {where} GROUP BY 1 ORDER BY 1", list(params))
    now = _rows(
        store,
        f"SELECT sum(input_tokens) AS real, sum(shape_len) AS padded FROM spans WHERE {where} AND shape_len IS NOT NULL",
        list(params),
    )
    return {"lengths": [int(r["len"]) for r in rows], "counts": [int(r["n"]) for r in rows], **(now[0] if now else {})}


def compile_events(store: "Store", start: dt.datetime, end: dt.datetime, service: str | None, limit: int = 5000) -> list[dict[str, Any]]:
    params: list[Any] = [_naive(start), _naive(end)]
    svc = _service_clause(service, params)
    params.append(limit)
    return _rows(
        store,
        f"""
        SELECT start_time, duration_ms, service_name, service_instance_id, compile_kind, compile_reason,
               compile_shape, compile_frame, compile_backend, compile_cache, trace_id
        FROM spans WHERE role = 'compile' AND start_time >= ? AND start_time < ?{svc}
        ORDER BY start_time LIMIT ?
        """,
        params,
    )


def longest_compiles(store: "Store", start: dt.datetime, end: dt.datetime, service: str | None, limit: int = 20) -> list[dict[str, Any]]:
    """The longest compile stalls, each with the slowest request it overlapped on its replica."""
    params: list[Any] = [_naive(start), _naive(end)]
    svc = _service_clause(service, params)
    params.append(limit)
    return _rows(
        store,
        f"""
        WITH c AS (
            SELECT span_id, start_time, end_time, duration_ms, service_name, service_instance_id, compile_kind, compile_shape
            FROM spans WHERE role = 'compile' AND start_time >= ? AND start_time < ?{svc}
            ORDER BY duration_ms DESC LIMIT ?
        ), r AS (
            SELECT trace_id, service_instance_id, start_time, end_time, {LATENCY_MS} AS latency_ms FROM spans
            WHERE {REQUEST_PREDICATE}
              AND start_time >= (SELECT min(start_time) FROM c) - INTERVAL 10 MINUTE
              AND start_time <= (SELECT max(end_time) FROM c)
              AND service_instance_id IN (SELECT service_instance_id FROM c)
        )
        SELECT c.span_id, c.start_time, c.duration_ms, c.service_instance_id, c.compile_kind, c.compile_shape,
               count(r.trace_id) AS requests_overlapped, arg_max(r.trace_id, r.latency_ms) AS worst_trace,
               max(r.latency_ms) AS worst_ms
        FROM c LEFT JOIN r ON r.service_instance_id = c.service_instance_id
                          AND r.start_time < c.end_time AND r.end_time > c.start_time
        GROUP BY ALL ORDER BY c.duration_ms DESC
        """,
        params,
    )


def compile_reasons(store: "Store", start: dt.datetime, end: dt.datetime, service: str | None) -> list[dict[str, Any]]:
    params: list[Any] = [_naive(start), _naive(end)]
    svc = _service_clause(service, params)
    return _rows(
        store,
        f"""
        SELECT coalesce(compile_kind, '?') AS kind, coalesce(compile_reason, '(no reason given)') AS reason,
               count(*) AS compiles, sum(duration_ms) AS total_ms, max(duration_ms) AS max_ms,
               count(DISTINCT compile_shape) AS shapes
        FROM spans WHERE role = 'compile' AND start_time >= ? AND start_time < ?{svc}
        GROUP BY ALL ORDER BY total_ms DESC LIMIT 50
        """,
        params,
    )


# --- Batching ----------------------------------------------------------------
def batch_series(store: "Store", start: dt.datetime, end: dt.datetime, step_s: int, service: str | None) -> list[dict[str, Any]]:
    """Per bucket: batches, mean and max size, padding waste, mean fill wait."""
    params: list[Any] = [step_s, _naive(start), _naive(end)]
    svc = _service_clause(service, params)
    return _rows(
        store,
        f"""
        SELECT time_bucket(to_seconds(?::BIGINT), start_time) AS t, count(*) AS batches,
               avg(batch_size) AS mean_size, max(batch_size) AS max_size,
               1.0 - sum(batch_real_tokens)::DOUBLE / nullif(sum(batch_padded_tokens), 0) AS padding_waste,
               avg(batch_wait_s) * 1000.0 AS mean_wait_ms, avg(duration_ms) AS mean_duration_ms
        FROM spans WHERE role = 'batch' AND start_time >= ? AND start_time < ?{svc}
        GROUP BY 1 ORDER BY 1
        """,
        params,
    )


def head_of_line(store: "Store", start: dt.datetime, end: dt.datetime, service: str | None, limit: int = 25) -> list[dict[str, Any]]:
    """Batches where short requests waited on a much longer member (longest/shortest ≥ 4).

    Each row names the batch's shortest member (the one that paid) and its
    longest member (the one it waited on), so both link to their request pages.
    """
    params: list[Any] = [_naive(start), _naive(end)]
    svc = _service_clause(service, params, "b.service_name")
    params += [limit, _naive(start), _naive(end)]
    return _rows(
        store,
        f"""
        WITH b AS (
            SELECT batch_id, start_time, duration_ms, service_name, service_instance_id, batch_size,
                   batch_max_len, batch_min_len, batch_real_tokens, batch_padded_tokens, batch_wait_s,
                   batch_max_len::DOUBLE / batch_min_len * batch_size AS hol_score
            FROM spans b
            WHERE role = 'batch' AND start_time >= ? AND start_time < ? AND batch_size >= 2
              AND batch_min_len > 0 AND batch_max_len >= 4 * batch_min_len{svc}
            ORDER BY hol_score DESC
            LIMIT ?
        ), m AS (
            SELECT batch_id, trace_id, coalesce(input_tokens, shape_len) AS len, {LATENCY_MS} AS latency_ms
            FROM spans
            WHERE {REQUEST_PREDICATE} AND batch_id IN (SELECT batch_id FROM b)
              AND start_time >= ? - INTERVAL 1 HOUR AND start_time < ? + INTERVAL 1 HOUR
        )
        SELECT b.*, 1.0 - b.batch_real_tokens::DOUBLE / nullif(b.batch_padded_tokens, 0) AS padding_waste,
               arg_min(m.trace_id, m.len) AS shortest_trace, min(m.len) AS shortest_len,
               arg_min(m.latency_ms, m.len) AS shortest_latency_ms,
               arg_max(m.trace_id, m.len) AS longest_trace, max(m.len) AS longest_len
        FROM b LEFT JOIN m USING (batch_id)
        GROUP BY ALL
        ORDER BY b.hol_score DESC
        """,
        params,
    )


# --- Hour of day -------------------------------------------------------------
def p99_by_hour(store: "Store", start: dt.datetime, end: dt.datetime, service: str | None) -> list[dict[str, Any]]:
    """Request p99 (ms) and count per (UTC day, UTC hour), per service."""
    params: list[Any] = [_naive(start), _naive(end)]
    svc = _service_clause(service, params)
    return _rows(
        store,
        f"""
        SELECT service_name AS series, CAST(date_trunc('day', start_time) AS DATE) AS day, hour(start_time) AS hour,
               quantile_cont({LATENCY_MS}, 0.99) AS p99_ms, count(*) AS requests
        FROM spans WHERE {REQUEST_PREDICATE} AND start_time >= ? AND start_time < ?{svc}
        GROUP BY ALL ORDER BY series, day, hour
        """,
        params,
    )


def provider_p99_by_hour(store: "Store", start: dt.datetime, end: dt.datetime, service: str | None) -> list[dict[str, Any]]:
    """Provider-call p99 per (provider, UTC day, UTC hour); region kept for the caption."""
    params: list[Any] = [_naive(start), _naive(end)]
    svc = _service_clause(service, params)
    return _rows(
        store,
        f"""
        SELECT coalesce(gen_ai_system, 'provider') || coalesce(' @ ' || server_address, '') AS series,
               any_value(provider_region) AS region,
               CAST(date_trunc('day', start_time) AS DATE) AS day, hour(start_time) AS hour,
               quantile_cont(duration_ms, 0.99) AS p99_ms, count(*) AS requests
        FROM spans WHERE role = 'provider_call' AND start_time >= ? AND start_time < ?{svc}
        GROUP BY series, day, hour ORDER BY series, day, hour
        """,
        params,
    )

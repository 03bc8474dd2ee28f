"""Which spans are requests, how long they took, and what their stages were.

All SQL, all set-based: the analyzer never loops over request rows in
Python for series or baselines. The fragments here are shared by the latency
series, the comparable-request baselines and the slow-request queries so that
"latency" and "component" mean the same thing everywhere.
"""

from __future__ import annotations

# A span is a request span when it says so, or when it is a root SERVER span
# carrying gen_ai attributes (how vLLM's `llm_request` spans are recognised,
# spec section 3). Roots may have a NULL or empty parent id depending on the
# decoder.
REQUEST_PREDICATE = """(
    role = 'request'
    OR (role IS NULL AND coalesce(parent_span_id, '') = ''
        AND upper(coalesce(kind, '')) IN ('SERVER', 'SPAN_KIND_SERVER', '2')
        AND (model IS NOT NULL OR input_tokens IS NOT NULL OR e2e_s IS NOT NULL))
)"""

# vLLM's e2e wins over the span duration: it is the engine's own measurement.
LATENCY_MS = "coalesce(e2e_s * 1000.0, duration_ms, date_diff('microsecond', start_time, end_time) / 1000.0)"

# The stage roles a request span's children may carry (spec section 3).
STAGES: tuple[str, ...] = ("queue", "prefill", "decode", "provider_call", "compile", "model_load")

# Components used for excess decomposition, and the vLLM flat attribute each
# falls back to when no child stage span exists.
COMPONENTS: tuple[str, ...] = ("queue", "prefill", "decode", "provider_call", "model_load", "compile")
_FLAT = {"queue": "time_in_queue_s", "prefill": "prefill_s", "decode": "decode_s"}


def length_bucket(col: str) -> str:
    """Half-octave bucket of a token count: comparable lengths share a bucket.

    Half-octaves (x√2 wide) keep a long request's normal time from being
    mistaken for excess, yet leave enough requests per class to estimate a
    baseline. NULL lengths form their own bucket (-1).
    """
    return f"CASE WHEN {col} IS NULL THEN -1 WHEN {col} <= 1 THEN 0 ELSE CAST(floor(2 * log2({col})) AS INTEGER) END"


def request_columns(alias: str = "") -> str:
    """The request view's columns over ``spans`` (optionally aliased)."""
    p = f"{alias}." if alias else ""
    lat = LATENCY_MS.replace("e2e_s", f"{p}e2e_s").replace("duration_ms", f"{p}duration_ms")
    lat = lat.replace("start_time", f"{p}start_time").replace("end_time", f"{p}end_time")
    return f"""{p}trace_id, {p}span_id, {p}service_name AS service, {p}model,
    {p}service_instance_id AS instance, {p}host_name, {p}process_pid, {p}gpu_index,
    {p}start_time, {p}end_time, {lat} AS latency_ms,
    {p}input_tokens, {p}output_tokens, {p}shape_len, {p}batch_id, {p}session_id,
    {p}kv_cached_tokens, {p}kv_preemptions, {p}priority, {p}replica_started_at,
    {p}time_in_queue_s, {p}prefill_s, {p}decode_s, {p}ttft_s"""


def requests_sql(where: str = "TRUE") -> str:
    """Request rows (with latency) matching ``where`` (over plain ``spans`` columns)."""
    return f"SELECT {request_columns()} FROM spans WHERE {REQUEST_PREDICATE} AND ({where})"


def stage_sums_sql(request_rel: str, time_filter: str = "") -> str:
    """Per request in ``request_rel`` (trace_id, span_id, start_time, end_time): child stage sums.

    Child spans are found by (trace_id, parent_span_id); the time filter on
    the children keeps the scan on the zone maps of ``start_time``.
    """
    sums = ",\n        ".join(
        f"sum(CASE WHEN c.role = '{s}' THEN c.duration_ms END) AS {s}_child_ms" for s in STAGES
    )
    return f"""
    SELECT c.trace_id, c.parent_span_id AS span_id,
        {sums}
    FROM spans c
    WHERE c.role IN ({', '.join(repr(s) for s in STAGES)})
      AND c.parent_span_id IS NOT NULL
      AND c.start_time >= (SELECT min(start_time) - INTERVAL 1 HOUR FROM {request_rel})
      AND c.start_time <= (SELECT max(end_time) + INTERVAL 1 MINUTE FROM {request_rel})
      {time_filter}
      AND (c.trace_id, c.parent_span_id) IN (SELECT trace_id, span_id FROM {request_rel})
    GROUP BY ALL"""


# Stages that, on a request whose other stages are reported, did not happen when
# they are not: it was scheduled at once, nothing compiled or loaded on its path
# (instrumentations commonly emit a queue span only when a request waited).
# A missing prefill, decode or provider call means the request's path has no
# such stage (a gateway, a cache hit), so its normal is taken over the requests that have one.
ZERO_WHEN_ABSENT: tuple[str, ...] = ("queue", "compile", "model_load")


def component_exprs(req: str = "r", kids: str = "k") -> str:
    """Component milliseconds: child stage spans first, vLLM flat attributes otherwise (see ZERO_WHEN_ABSENT)."""
    has_kids = "coalesce(" + ", ".join(f"{kids}.{s}_child_ms" for s in STAGES) + ") IS NOT NULL"
    out = []
    for comp in COMPONENTS:
        parts = [f"{kids}.{comp}_child_ms"]
        if comp in _FLAT:
            parts.append(f"{req}.{_FLAT[comp]} * 1000.0")
        if comp in ZERO_WHEN_ABSENT:
            parts.append(f"CASE WHEN {has_kids} THEN 0.0 END")
        expr = f"coalesce({', '.join(parts)})" if len(parts) > 1 else parts[0]
        out.append(f"{expr} AS {comp}_ms")
    return ",\n    ".join(out)

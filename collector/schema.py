"""The telemetry store's schema: tables, typed attribute columns, migrations.

Why typed columns: the analyzer filters and groups on a few dozen known
attributes (spec sections 3-8) over millions of rows; columns make those
scans vectorised and compressible, while everything else is kept verbatim in
a JSON ``attributes`` column so nothing sent is dropped. An attribute stored
in its typed column with its own type is not repeated in the JSON (that
repetition was half the bytes of a request span); other "also read" keys,
wrong-typed or converted values stay in the JSON (collector.attributes.Lifter).

Rows are appended in arrival order; DuckDB's zone maps on ``start_time`` /
``time`` keep time-range scans cheap because batches arrive roughly in time
order (no secondary index is needed for range predicates).
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class AttrColumn:
    """A known attribute lifted into its own column.

    ``keys`` are read in order; the first present wins (spec's "also read").
    ``kind`` is one of ``str``, ``int``, ``float``.
    """

    column: str
    sql_type: str
    kind: str
    keys: tuple[str, ...]


def _c(column: str, sql_type: str, *keys: str) -> AttrColumn:
    kind = {"VARCHAR": "str", "BIGINT": "int", "INTEGER": "int", "DOUBLE": "float"}[sql_type]
    return AttrColumn(column, sql_type, kind, keys)


# Resource attributes copied onto every row of every table (spec section 2).
RESOURCE_COLUMNS: tuple[AttrColumn, ...] = (
    _c("service_name", "VARCHAR", "service.name"),
    _c("service_instance_id", "VARCHAR", "service.instance.id"),
    _c("host_name", "VARCHAR", "host.name"),
    _c("process_pid", "BIGINT", "process.pid"),
    _c("pool", "VARCHAR", "tailscope.pool"),
)

# Span attributes (spec sections 3-6).
SPAN_ATTR_COLUMNS: tuple[AttrColumn, ...] = (
    _c("role", "VARCHAR", "tailscope.role"),
    _c("model", "VARCHAR", "gen_ai.request.model", "gen_ai.response.model"),
    _c("input_tokens", "BIGINT", "gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens"),
    _c("output_tokens", "BIGINT", "gen_ai.usage.output_tokens", "gen_ai.usage.completion_tokens"),
    _c("time_in_queue_s", "DOUBLE", "gen_ai.latency.time_in_queue"),
    _c("ttft_s", "DOUBLE", "gen_ai.latency.time_to_first_token"),
    _c("e2e_s", "DOUBLE", "gen_ai.latency.e2e"),
    _c("prefill_s", "DOUBLE", "gen_ai.latency.time_in_model_prefill"),
    _c("decode_s", "DOUBLE", "gen_ai.latency.time_in_model_decode"),
    _c("request_id", "VARCHAR", "gen_ai.request.id"),
    _c("session_id", "VARCHAR", "session.id"),
    _c("shape_len", "BIGINT", "tailscope.shape.len"),
    _c("batch_id", "VARCHAR", "tailscope.batch.id"),
    _c("kv_cached_tokens", "BIGINT", "tailscope.kv.cached_tokens", "gen_ai.usage.cache_read.input_tokens"),
    _c("kv_preemptions", "BIGINT", "tailscope.kv.preemptions"),
    _c("gpu_index", "INTEGER", "tailscope.gpu.index"),
    _c("priority", "VARCHAR", "tailscope.priority"),
    _c("replica_started_at", "DOUBLE", "tailscope.replica.started_at"),
    _c("compile_backend", "VARCHAR", "tailscope.compile.backend"),
    _c("compile_kind", "VARCHAR", "tailscope.compile.kind"),
    _c("compile_reason", "VARCHAR", "tailscope.compile.reason"),
    _c("compile_frame", "VARCHAR", "tailscope.compile.frame"),
    _c("compile_shape", "VARCHAR", "tailscope.compile.shape"),
    _c("compile_cache", "VARCHAR", "tailscope.compile.cache"),
    _c("batch_size", "BIGINT", "tailscope.batch.size"),
    _c("batch_max_len", "BIGINT", "tailscope.batch.max_len"),
    _c("batch_min_len", "BIGINT", "tailscope.batch.min_len"),
    _c("batch_real_tokens", "BIGINT", "tailscope.batch.real_tokens"),
    _c("batch_padded_tokens", "BIGINT", "tailscope.batch.padded_tokens"),
    _c("batch_wait_s", "DOUBLE", "tailscope.batch.wait"),
    _c("gen_ai_system", "VARCHAR", "gen_ai.system"),
    _c("server_address", "VARCHAR", "server.address"),
    _c("provider_region", "VARCHAR", "tailscope.provider.region"),
)

# Log-record attributes (spec section 7).
LOG_ATTR_COLUMNS: tuple[AttrColumn, ...] = (
    _c("kv_blocks", "BIGINT", "tailscope.kv.blocks"),
    _c("kv_reason", "VARCHAR", "tailscope.kv.reason"),
    _c("kv_victim_trace_id", "VARCHAR", "tailscope.kv.victim_trace_id"),
    _c("kv_usage", "DOUBLE", "tailscope.kv.usage"),
    _c("load_seconds", "DOUBLE", "tailscope.replica.load_seconds"),
    _c("gpu_index", "INTEGER", "gpu.index", "tailscope.gpu.index"),
    _c("xid", "BIGINT", "tailscope.gpu.xid"),
)

# Metric data-point attributes (spec section 8).
METRIC_ATTR_COLUMNS: tuple[AttrColumn, ...] = (
    _c("gpu_index", "INTEGER", "gpu.index"),
    _c("gpu_uuid", "VARCHAR", "gpu.uuid"),
    _c("gpu_name", "VARCHAR", "gpu.name"),
    _c("point_pid", "BIGINT", "process.pid"),
)


def _cols(cols: tuple[AttrColumn, ...]) -> str:
    return "".join(f",\n    {c.column} {c.sql_type}" for c in cols)


# Version 1 DDL. Times are UTC TIMESTAMP (microseconds); ids lowercase hex.
_V1 = f"""
CREATE TABLE IF NOT EXISTS spans (
    trace_id VARCHAR NOT NULL,
    span_id VARCHAR NOT NULL,
    parent_span_id VARCHAR,
    name VARCHAR,
    kind VARCHAR,
    start_time TIMESTAMP NOT NULL,
    end_time TIMESTAMP NOT NULL,
    duration_ms DOUBLE,
    status_code VARCHAR,
    status_message VARCHAR,
    scope_name VARCHAR{_cols(RESOURCE_COLUMNS)}{_cols(SPAN_ATTR_COLUMNS)},
    attributes JSON,
    resource_attributes JSON
);
CREATE TABLE IF NOT EXISTS span_links (
    trace_id VARCHAR NOT NULL,
    span_id VARCHAR NOT NULL,
    linked_trace_id VARCHAR NOT NULL,
    linked_span_id VARCHAR NOT NULL,
    attributes JSON
);
CREATE TABLE IF NOT EXISTS span_events (
    trace_id VARCHAR NOT NULL,
    span_id VARCHAR NOT NULL,
    time TIMESTAMP NOT NULL,
    name VARCHAR,
    service_name VARCHAR,
    attributes JSON
);
CREATE TABLE IF NOT EXISTS logs (
    time TIMESTAMP NOT NULL,
    observed_time TIMESTAMP,
    event_name VARCHAR,
    severity_number INTEGER,
    severity_text VARCHAR,
    body VARCHAR,
    trace_id VARCHAR,
    span_id VARCHAR,
    scope_name VARCHAR{_cols(RESOURCE_COLUMNS)}{_cols(LOG_ATTR_COLUMNS)},
    attributes JSON,
    resource_attributes JSON
);
CREATE TABLE IF NOT EXISTS metrics (
    time TIMESTAMP NOT NULL,
    start_time TIMESTAMP,
    name VARCHAR NOT NULL,
    type VARCHAR NOT NULL,
    unit VARCHAR,
    value DOUBLE,
    count BIGINT,
    sum DOUBLE,
    bucket_counts BIGINT[],
    explicit_bounds DOUBLE[],
    is_monotonic BOOLEAN,
    scope_name VARCHAR{_cols(RESOURCE_COLUMNS)}{_cols(METRIC_ATTR_COLUMNS)},
    attributes JSON,
    resource_attributes JSON
);
CREATE TABLE IF NOT EXISTS profiler_traces (
    id VARCHAR PRIMARY KEY,
    received_at TIMESTAMP NOT NULL,
    host_name VARCHAR,
    service_instance_id VARCHAR,
    service_name VARCHAR,
    filename VARCHAR,
    path VARCHAR NOT NULL,
    size_bytes BIGINT,
    sha256 VARCHAR,
    trace_start TIMESTAMP,
    trace_end TIMESTAMP,
    summary JSON
);
CREATE TABLE IF NOT EXISTS ingest_batches (
    batch_seq BIGINT PRIMARY KEY,
    received_at TIMESTAMP NOT NULL,
    signal VARCHAR NOT NULL,
    items BIGINT NOT NULL
);
"""

# Each migration takes the store from version i to i+1. Append, never edit.
MIGRATIONS: tuple[str, ...] = (_V1,)

# Tables and their time column, for retention and time-range export.
TIME_COLUMNS: dict[str, str] = {
    "spans": "start_time",
    "span_events": "time",
    "logs": "time",
    "metrics": "time",
    "profiler_traces": "received_at",
}

# Tables a user may query through the SQL console, with one-line descriptions.
TABLE_DOCS: dict[str, str] = {
    "spans": "one row per span: ids (lowercase hex), name, UTC start/end, resource columns, the spec's known attributes as columns, the rest in JSON `attributes`",
    "span_links": "OTel span links (batch span -> member request spans)",
    "span_events": "span events with their time and attributes",
    "logs": "log records / events (KV evictions, replica ready, GPU XIDs) with typed event columns",
    "metrics": "metric points: gauges and sums in `value`, histograms in count/sum/bucket_counts/explicit_bounds",
    "profiler_traces": "uploaded PyTorch profiler (Kineto) traces, their stored path and summary JSON",
    "ingest_batches": "one row per committed ingest batch (exactly-once bookkeeping)",
}

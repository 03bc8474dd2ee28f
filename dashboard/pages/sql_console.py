"""SQL console: editor, run, result table, CSV/Parquet download, schema browser,
and worked postmortem queries to start from.

Queries go through ``collector.sql.run_query`` — the very guard, time limit
and row cap behind ``POST /api/v1/sql`` (spec section 10) — so the console
can do nothing the API refuses, and a refused write shows the API's line.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from typing import TYPE_CHECKING, Any

from dash import Input, Output, State, dcc, html, no_update

from dashboard.components import error_line, error_message

if TYPE_CHECKING:
    from dash import Dash

# Worked postmortem queries (each is run by the tests, so they stay valid).
EXAMPLES: dict[str, str] = {
    "Slowest requests of the last hour, with stages": """\
SELECT r.start_time, r.service_name, r.service_instance_id, r.trace_id,
       round(r.duration_ms) AS latency_ms, r.input_tokens, r.shape_len,
       round(sum(c.duration_ms) FILTER (WHERE c.role = 'queue'))   AS queue_ms,
       round(sum(c.duration_ms) FILTER (WHERE c.role = 'compile')) AS compile_ms,
       round(sum(c.duration_ms) FILTER (WHERE c.role = 'prefill')) AS prefill_ms,
       round(sum(c.duration_ms) FILTER (WHERE c.role = 'decode'))  AS decode_ms
FROM spans r LEFT JOIN spans c ON c.trace_id = r.trace_id AND c.parent_span_id = r.span_id
WHERE r.role = 'request' AND r.start_time > now()::TIMESTAMP - INTERVAL 1 HOUR
GROUP BY ALL ORDER BY latency_ms DESC LIMIT 50""",
    "p50 / p99 per service per minute": """\
SELECT service_name, time_bucket(INTERVAL 1 MINUTE, start_time) AS minute, count(*) AS requests,
       round(quantile_cont(duration_ms, 0.5)) AS p50_ms, round(quantile_cont(duration_ms, 0.99)) AS p99_ms
FROM spans WHERE role = 'request'
GROUP BY ALL ORDER BY service_name, minute DESC LIMIT 500""",
    "Requests stalled by a compile on their replica": """\
SELECT c.start_time AS compile_start, round(c.duration_ms) AS compile_ms, c.service_instance_id,
       c.compile_kind, c.compile_shape, c.compile_reason,
       count(r.trace_id) AS requests_overlapped, round(max(r.duration_ms)) AS worst_request_ms
FROM spans c JOIN spans r
  ON r.role = 'request' AND r.service_instance_id = c.service_instance_id
 AND r.start_time < c.end_time AND r.end_time > c.start_time
WHERE c.role = 'compile'
GROUP BY ALL ORDER BY compile_ms DESC LIMIT 50""",
    "Recompile reasons, ranked by stall time": """\
SELECT compile_reason, count(*) AS compiles, count(DISTINCT compile_shape) AS shapes,
       round(sum(duration_ms)) AS total_stall_ms
FROM spans WHERE role = 'compile'
GROUP BY ALL ORDER BY total_stall_ms DESC LIMIT 50""",
    "KV evictions per replica per minute": """\
SELECT service_instance_id, time_bucket(INTERVAL 1 MINUTE, time) AS minute, kv_reason,
       count(*) AS evictions, sum(kv_blocks) AS blocks, round(min(kv_usage), 2) AS min_usage_after
FROM logs WHERE event_name = 'tailscope.kv.eviction'
GROUP BY ALL ORDER BY minute DESC, evictions DESC LIMIT 500""",
    "GPU SM clock vs max, with throttle reasons": """\
SELECT host_name, gpu_index, time_bucket(INTERVAL 1 MINUTE, time) AS minute,
       round(avg(value) FILTER (WHERE name = 'tailscope.gpu.sm_clock')) AS sm_mhz,
       round(max(value) FILTER (WHERE name = 'tailscope.gpu.sm_clock.max')) AS max_mhz,
       bit_or(CAST(value AS BIGINT)) FILTER (WHERE name = 'tailscope.gpu.clock_event_reasons') AS reasons_mask
FROM metrics WHERE name LIKE 'tailscope.gpu.%'
GROUP BY ALL ORDER BY minute DESC, host_name, gpu_index LIMIT 500""",
    "Batches with the most padding": """\
SELECT start_time, service_instance_id, batch_id, batch_size, batch_min_len, batch_max_len,
       round(1 - batch_real_tokens / nullif(batch_padded_tokens, 0), 2) AS padding_waste,
       round(batch_wait_s * 1000) AS wait_ms
FROM spans WHERE role = 'batch'
ORDER BY padding_waste DESC NULLS LAST LIMIT 50""",
}
DEFAULT_EXAMPLE = "Slowest requests of the last hour, with stages"


def schema_browser(store: Any) -> html.Div:
    """Documented tables (``collector.schema.TABLE_DOCS``) with columns from information_schema."""
    from collector.schema import TABLE_DOCS
    from collector.sql import describe_tables

    tables = describe_tables(store, TABLE_DOCS)["tables"]
    items = []
    for t in tables:
        cols = [html.Li([html.Code(c["name"]), html.Span(" " + c["type"].lower(), className="ts-muted")]) for c in t["columns"]]
        items.append(
            html.Details(
                [html.Summary([html.Code(t["name"]), html.Span(f" ({len(cols)})", className="ts-muted")]), html.P(t["doc"], className="ts-doc"), html.Ul(cols, className="ts-cols")],
                className="ts-table-doc",
                open=t["name"] == "spans",
            )
        )
    return html.Div([html.H4("Tables")] + items, className="ts-schema", id="sql-schema")


def render(ctx: Any) -> html.Div:
    query = ctx.params.get("q") or EXAMPLES[DEFAULT_EXAMPLE]
    return html.Div(
        [
            html.H2("SQL console"),
            html.Div(
                [
                    html.Div(
                        [
                            html.Div(
                                [
                                    dcc.Dropdown(
                                        id="sql-example",
                                        options=[{"label": k, "value": k} for k in EXAMPLES],
                                        placeholder="start from a worked postmortem query…",
                                        clearable=True,
                                        className="ts-example",
                                    ),
                                ],
                                className="ts-row",
                            ),
                            dcc.Textarea(id="sql-editor", value=query, spellCheck=False, className="ts-editor"),
                            html.Div(
                                [
                                    html.Button("Run", id="sql-run", n_clicks=0, className="ts-button ts-primary"),
                                    html.Button("Download CSV", id="sql-csv", n_clicks=0, className="ts-button"),
                                    html.Button("Download Parquet", id="sql-parquet", n_clicks=0, className="ts-button"),
                                    html.Span(
                                        f"read-only · {ctx.config.sql_time_limit_ms} ms limit · {ctx.config.sql_max_rows} rows max",
                                        className="ts-muted",
                                    ),
                                ],
                                className="ts-row",
                            ),
                            html.Div(id="sql-status", className="ts-status"),
                            html.Div(id="sql-result"),
                            dcc.Download(id="sql-download"),
                        ],
                        className="ts-sql-main",
                    ),
                    schema_browser(ctx.store),
                ],
                className="ts-sql",
            ),
        ]
    )


def _run(store: Any, config: Any, sql: str) -> dict[str, Any]:
    from collector.sql import run_query

    return run_query(store, sql or "", time_limit_ms=config.sql_time_limit_ms, max_rows=config.sql_max_rows)


SHOWN_ROWS = 500


def result_view(result: dict[str, Any]) -> tuple[Any, Any]:
    """(status line, result table) for a successful query; the table shows the first rows."""
    columns = result["columns"]
    rows = result["rows"]
    status = f"{len(rows)} row{'s' if len(rows) != 1 else ''}"
    if result.get("truncated"):
        status += " (cut at the row limit)"
    if len(rows) > SHOWN_ROWS:
        status += f", first {SHOWN_ROWS} shown (download for all)"
    status += f" · {result.get('elapsed_ms', 0):.0f} ms"
    if not columns:
        return html.Span(status, className="ts-ok"), None
    head = html.Thead(html.Tr([html.Th(c) for c in columns]))
    body = html.Tbody([html.Tr([html.Td(_cell(v)) for v in row]) for row in rows[:SHOWN_ROWS]])
    return html.Span(status, className="ts-ok"), html.Div(html.Table([head, body], id="sql-table", className="ts-table ts-result"), className="ts-result-wrap")


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str)
    return str(value)


def to_csv(result: dict[str, Any]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(result["columns"])
    for row in result["rows"]:
        writer.writerow(["" if v is None else v for v in row])
    return buf.getvalue()


def to_parquet(result: dict[str, Any]) -> bytes:
    """The result as Parquet; RFC 3339 ``…Z`` text columns go back to UTC timestamps."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns: dict[str, Any] = {}
    for i, name in enumerate(result["columns"]):
        values = [row[i] for row in result["rows"]]
        columns[_unique(name, columns)] = _arrow_column(values)
    table = pa.table(columns) if columns else pa.table({})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def _unique(name: str, taken: dict[str, Any]) -> str:
    out, n = name, 1
    while out in taken:
        n += 1
        out = f"{name}_{n}"
    return out


def _arrow_column(values: list[Any]) -> Any:
    import pyarrow as pa

    present = [v for v in values if v is not None]
    if present and all(isinstance(v, str) and len(v) >= 20 and v.endswith("Z") and v[4] == "-" and v[10] == "T" for v in present):
        try:
            parsed = [None if v is None else dt.datetime.fromisoformat(v[:-1]) for v in values]
            return pa.array(parsed, type=pa.timestamp("us"))
        except ValueError:
            pass
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if v is None else str(v) for v in values], type=pa.string())


def register(app: "Dash", store: Any, config: Any) -> None:
    """The console's callbacks: pick an example, run, download."""

    @app.callback(Output("sql-editor", "value"), Input("sql-example", "value"), prevent_initial_call=True)
    def pick_example(name: str | None) -> Any:
        return EXAMPLES.get(name or "", no_update)

    @app.callback(
        Output("sql-status", "children"),
        Output("sql-result", "children"),
        Input("sql-run", "n_clicks"),
        State("sql-editor", "value"),
    )
    def run(n_clicks: int, sql: str | None) -> tuple[Any, Any]:
        return run_callback(store, config, sql)

    @app.callback(
        Output("sql-download", "data"),
        Output("sql-status", "children", allow_duplicate=True),
        Input("sql-csv", "n_clicks"),
        Input("sql-parquet", "n_clicks"),
        State("sql-editor", "value"),
        prevent_initial_call=True,
    )
    def download(csv_clicks: int, parquet_clicks: int, sql: str | None) -> tuple[Any, Any]:
        from dash import ctx as dash_ctx

        fmt = "parquet" if dash_ctx.triggered_id == "sql-parquet" else "csv"
        return download_callback(store, config, sql, fmt)


def run_callback(store: Any, config: Any, sql: str | None) -> tuple[Any, Any]:
    """Run the editor's query: (status, result) — an error is one line, no table."""
    try:
        result = _run(store, config, sql or "")
    except Exception as exc:  # noqa: BLE001 - shown as the API's one line
        return error_line(error_message(exc)), None
    return result_view(result)


def download_callback(store: Any, config: Any, sql: str | None, fmt: str) -> tuple[Any, Any]:
    """Run the query again and send the full (row-capped) result as a file."""
    from dash import dcc as _dcc

    try:
        result = _run(store, config, sql or "")
    except Exception as exc:  # noqa: BLE001
        return no_update, error_line(error_message(exc))
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    if fmt == "parquet":
        return _dcc.send_bytes(to_parquet(result), f"tailscope-{stamp}.parquet"), no_update
    return {"content": to_csv(result), "filename": f"tailscope-{stamp}.csv", "type": "text/csv", "base64": False}, no_update

"""Export a time range of the store to Parquet files the ``duckdb`` CLI opens.

Written through pyarrow rather than DuckDB's ``COPY``, because the server's
DuckDB instance has file access turned off for the SQL console's sake.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq

from collector.schema import TIME_COLUMNS
from collector.store import Store

EXPORT_TABLES = ("spans", "span_links", "span_events", "logs", "metrics", "profiler_traces")


def export_parquet(
    store: Store,
    out_dir: str | Path,
    *,
    start: dt.datetime | None = None,
    end: dt.datetime | None = None,
    tables: tuple[str, ...] = EXPORT_TABLES,
    progress: Callable[[str, int], None] | None = None,
) -> dict[str, int]:
    """Write ``<out_dir>/<table>.parquet`` for rows in ``[start, end)``; returns rows per table.

    Span links are exported for the spans in the range (they carry no time).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    cur = store.cursor()
    try:
        for table in tables:
            if table not in EXPORT_TABLES:
                raise ValueError(f"unknown table {table!r}; known: {', '.join(EXPORT_TABLES)}")
            where, params = _range_filter(table, start, end)
            # Stream record batches so a large range never sits whole in memory.
            reader = cur.sql(f"SELECT * FROM {table}{where}", params=params).to_arrow_reader(100_000)
            rows = 0
            with pq.ParquetWriter(out / f"{table}.parquet", reader.schema, compression="zstd") as writer:
                for batch in reader:
                    writer.write_batch(batch)
                    rows += batch.num_rows
            counts[table] = rows
            if progress is not None:
                progress(table, rows)
    finally:
        cur.close()
    return counts


def _range_filter(table: str, start: dt.datetime | None, end: dt.datetime | None) -> tuple[str, list]:
    clauses: list[str] = []
    params: list = []
    if table == "span_links":
        inner, inner_params = _range_filter("spans", start, end)
        if not inner:
            return "", []
        return f" WHERE (trace_id, span_id) IN (SELECT trace_id, span_id FROM spans{inner})", inner_params
    col = TIME_COLUMNS.get(table)
    if col is None:
        return "", []
    if start is not None:
        clauses.append(f"{col} >= ?")
        params.append(start)
    if end is not None:
        clauses.append(f"{col} < ?")
        params.append(end)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params

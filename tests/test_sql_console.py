"""The read-only SQL console: what runs, what is refused, and the limits."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pytest

from collector.sql import check_read_only, lock_down, run_query
from collector.store import Store
from tailscope.errors import QueryError, QueryInterrupted, ReadOnlyViolation


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "t.duckdb")
    t0 = dt.datetime(2026, 11, 23, 14, 0, 0)
    n = 50
    s.write([(
        "spans",
        pa.table({
            "trace_id": [f"{i:032x}" for i in range(n)],
            "span_id": [f"{i:016x}" for i in range(n)],
            "name": ["llm_request"] * n,
            "start_time": [t0 + dt.timedelta(seconds=i) for i in range(n)],
            "end_time": [t0 + dt.timedelta(seconds=i, milliseconds=100 + i) for i in range(n)],
            "service_name": ["chat-api"] * n,
            "role": ["request"] * n,
            "attributes": ['{"k": "v"}'] * n,
        }),
    )])
    lock_down(s.cursor())
    yield s
    s.close()


def test_select_returns_columns_rows_and_json_values(store):
    out = run_query(store, "SELECT trace_id, start_time, attributes->>'k' AS k FROM spans ORDER BY start_time LIMIT 2", time_limit_ms=5000, max_rows=100)
    assert out["columns"] == ["trace_id", "start_time", "k"]
    assert out["rows"][0] == ["0" * 32, "2026-11-23T14:00:00Z", "v"]
    assert out["truncated"] is False


def test_row_cap_sets_truncated(store):
    out = run_query(store, "SELECT * FROM spans", time_limit_ms=5000, max_rows=10)
    assert len(out["rows"]) == 10 and out["truncated"] is True


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO spans (trace_id, span_id, start_time, end_time) VALUES ('a','b',now(),now())",
        "DELETE FROM spans",
        "UPDATE spans SET name = 'x'",
        "DROP TABLE spans",
        "CREATE TABLE x AS SELECT 1",
        "COPY spans TO '/tmp/leak.csv'",
        "ATTACH '/tmp/other.duckdb' AS o",
        "INSTALL httpfs",
        "LOAD httpfs",
        "SET enable_external_access = true",
        "PRAGMA database_size",
        "CALL pragma_version()",
        "CHECKPOINT",
        "SELECT * FROM checkpoint()",
        "SELECT 1; DELETE FROM spans",
    ],
)
def test_writes_and_side_effects_are_refused(store, sql):
    with pytest.raises(ReadOnlyViolation):
        run_query(store, sql, time_limit_ms=5000, max_rows=10)
    assert run_query(store, "SELECT count(*) FROM spans", time_limit_ms=5000, max_rows=10)["rows"] == [[50]]


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM read_text('/etc/hostname')",
        "SELECT * FROM glob('/*')",
        "SELECT * FROM read_parquet('https://example.com/x.parquet')",
        "WITH x AS (SELECT * FROM read_json_auto('/etc/os-release')) SELECT * FROM x",
    ],
)
def test_files_and_network_are_unreachable(store, sql):
    with pytest.raises(ReadOnlyViolation, match="no file, network or extension access"):
        run_query(store, sql, time_limit_ms=5000, max_rows=10)


def test_time_limit_interrupts_and_names_the_limit(store):
    with pytest.raises(QueryInterrupted, match="300 ms"):
        run_query(store, "SELECT count(*) FROM range(100000000000) a", time_limit_ms=300, max_rows=10)
    # the store is still usable afterwards
    assert run_query(store, "SELECT 1", time_limit_ms=5000, max_rows=10)["rows"] == [[1]]


def test_errors_are_one_line_query_errors(store):
    with pytest.raises(QueryError, match="no_such_table"):
        run_query(store, "SELECT * FROM no_such_table", time_limit_ms=5000, max_rows=10)
    with pytest.raises(QueryError):
        run_query(store, "SELEKT 1", time_limit_ms=5000, max_rows=10)
    with pytest.raises(QueryError, match="empty"):
        check_read_only("   ")


def test_explain_describe_show_are_allowed(store):
    for sql in ("EXPLAIN SELECT * FROM spans", "DESCRIBE spans", "SHOW TABLES", "SUMMARIZE spans"):
        assert run_query(store, sql, time_limit_ms=5000, max_rows=1000)["columns"]


def test_ingest_still_writes_after_lock_down(store):
    """Locking the console down must not stop the collector's Arrow inserts."""
    t = dt.datetime(2026, 11, 23, 15)
    store.write([("spans", pa.table({"trace_id": ["f" * 32], "span_id": ["e" * 16], "start_time": [t], "end_time": [t]}))])
    assert run_query(store, "SELECT count(*) FROM spans", time_limit_ms=5000, max_rows=10)["rows"] == [[51]]

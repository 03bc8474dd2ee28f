"""Read-only ad-hoc SQL over the telemetry store, for incident postmortems.

Three guards, each closing a different hole (datasette's pattern, on DuckDB):

1. Statement type: exactly one statement, and it must be a query (SELECT,
   including WITH / DESCRIBE / SHOW / SUMMARIZE, or EXPLAIN). INSERT, COPY,
   ATTACH, SET, PRAGMA, CALL, … are refused before anything runs.
2. No file or network access: the server's DuckDB instance runs with
   ``enable_external_access = false`` (see :func:`lock_down`), so
   ``read_csv('/etc/passwd')``, ``glob()``, ``INSTALL``/``LOAD`` and URL reads
   fail inside DuckDB even if they hide in a subquery.
3. Limits: a timer interrupts the query at ``sql_time_limit_ms`` and the
   result is cut at ``sql_max_rows`` rows with ``truncated: true``.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import math
import re
import threading
import uuid
from typing import TYPE_CHECKING, Any

import duckdb

from tailscope.errors import QueryError, QueryInterrupted, ReadOnlyViolation

if TYPE_CHECKING:
    from fastapi import APIRouter

    from collector.store import Store
    from tailscope.config import Config

_ALLOWED = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}

# Table functions that are SELECT-shaped but act on the database.
_FORBIDDEN_FUNCTIONS = re.compile(r"\b(checkpoint|force_checkpoint)\s*\(", re.IGNORECASE)


def lock_down(con: duckdb.DuckDBPyConnection) -> None:
    """Turn off file, network and extension access for this DuckDB instance.

    Irreversible while the database is open (DuckDB refuses to re-enable it),
    which is the point: no SQL that reaches the console can turn it back on.
    """
    con.execute("SET enable_external_access = false")


def check_read_only(sql: str) -> str:
    """Return the single query in ``sql`` or raise :class:`ReadOnlyViolation`."""
    text = sql.strip()
    if not text:
        raise QueryError("empty query")
    try:
        statements = duckdb.extract_statements(text)
    except duckdb.Error as exc:
        raise QueryError(_one_line(exc)) from None
    if len(statements) != 1:
        raise ReadOnlyViolation(f"one statement at a time, got {len(statements)}")
    statement = statements[0]
    if statement.type not in _ALLOWED:
        kind = statement.type.name.replace("_", " ")
        raise ReadOnlyViolation(f"the SQL console is read-only: {kind} statements are refused (only SELECT / EXPLAIN)")
    if _FORBIDDEN_FUNCTIONS.search(text):
        raise ReadOnlyViolation("the SQL console is read-only: checkpoint() is refused")
    return text


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:500]


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            return value.isoformat() + "Z"
        return value.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")
    if isinstance(value, (dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def run_query(store: "Store", sql: str, *, time_limit_ms: int, max_rows: int) -> dict[str, Any]:
    """Run one read-only query: ``{columns, rows, truncated, elapsed_ms}``.

    Raises:
        ReadOnlyViolation: the statement would write or is not a query.
        QueryInterrupted: it ran past ``time_limit_ms`` (the message names the limit).
        QueryError: DuckDB rejected it (syntax, unknown column, permission).
    """
    import time

    text = check_read_only(sql)
    cur = store.cursor()
    timed_out = threading.Event()

    def _interrupt() -> None:
        timed_out.set()
        cur.interrupt()

    timer = threading.Timer(time_limit_ms / 1000.0, _interrupt)
    started = time.perf_counter()
    timer.start()
    try:
        cur.execute(text)
        columns = [d[0] for d in (cur.description or [])]
        rows = cur.fetchmany(max_rows + 1) if columns else []
    except duckdb.InterruptException:
        raise QueryInterrupted(
            f"query interrupted: it ran past the SQL time limit of {time_limit_ms} ms (setting sql_time_limit_ms)"
        ) from None
    except duckdb.PermissionException as exc:
        raise ReadOnlyViolation(f"refused: the SQL console has no file, network or extension access ({_one_line(exc)})") from None
    except duckdb.Error as exc:
        if timed_out.is_set():
            raise QueryInterrupted(
                f"query interrupted: it ran past the SQL time limit of {time_limit_ms} ms (setting sql_time_limit_ms)"
            ) from None
        raise QueryError(_one_line(exc)) from None
    finally:
        timer.cancel()
        cur.close()
    truncated = len(rows) > max_rows
    rows = rows[:max_rows]
    return {
        "columns": columns,
        "rows": [[_jsonable(v) for v in row] for row in rows],
        "truncated": truncated,
        "elapsed_ms": round((time.perf_counter() - started) * 1000, 3),
    }


def _sql_request_model() -> Any:
    """The request body model, built once at module scope.

    Why not a class inside ``make_router``: with ``from __future__ import
    annotations`` FastAPI resolves the endpoint's annotation ``SqlRequest`` in
    the module's globals; a local class is not found there and the body was
    taken for a query parameter ("query.request: Field required").
    """
    global SqlRequest
    if "SqlRequest" not in globals():
        from pydantic import BaseModel, Field

        class SqlRequest(BaseModel):  # type: ignore[no-redef]
            sql: str = Field(..., description="one read-only query")
            max_rows: int | None = Field(None, ge=1, description="at most the server's sql_max_rows")

    return SqlRequest


def make_router(store: "Store", config: "Config") -> "APIRouter":
    """``POST /api/v1/sql`` and ``GET /api/v1/tables`` (the schema browser's source)."""
    from fastapi import APIRouter
    from fastapi.concurrency import run_in_threadpool

    from collector.schema import TABLE_DOCS

    SqlRequest = _sql_request_model()
    lock_down(store.cursor())
    router = APIRouter()

    @router.post("/api/v1/sql")
    async def sql(request: SqlRequest) -> dict[str, Any]:
        cap = min(request.max_rows or config.sql_max_rows, config.sql_max_rows)
        return await run_in_threadpool(
            run_query, store, request.sql, time_limit_ms=config.sql_time_limit_ms, max_rows=cap
        )

    @router.get("/api/v1/tables")
    async def tables() -> dict[str, Any]:
        return await run_in_threadpool(describe_tables, store, TABLE_DOCS)

    return router


def describe_tables(store: "Store", docs: dict[str, str]) -> dict[str, Any]:
    """Every documented table with its columns and types (for the schema browser)."""
    cur = store.cursor()
    try:
        rows = cur.execute(
            "SELECT table_name, column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = 'main' ORDER BY table_name, ordinal_position"
        ).fetchall()
    finally:
        cur.close()
    out: dict[str, dict[str, Any]] = {}
    for table, column, dtype in rows:
        if table not in docs:
            continue
        out.setdefault(table, {"name": table, "doc": docs[table], "columns": []})["columns"].append(
            {"name": column, "type": dtype}
        )
    return {"tables": [out[t] for t in docs if t in out]}

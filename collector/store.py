"""The DuckDB telemetry store: one owner process, many readers through cursors.

DuckDB lets one process write a database file, so the server process opens it
once (this class) and every reader in that process (API, analyzer, dashboard,
SQL console) works on a ``cursor()`` of the same connection. A stopped
server's file is opened read-only by ``tailscope sql`` / ``tailscope analyze``.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import duckdb

from collector.schema import MIGRATIONS, SCHEMA_VERSION, TIME_COLUMNS

if TYPE_CHECKING:
    import pyarrow as pa


# How many span writes the change log keeps (a reader further behind starts over).
SPAN_WRITE_LOG = 4096


class StoreError(Exception):
    """The telemetry store could not do what was asked."""


class StoreLocked(StoreError):
    """Another process holds the DuckDB file (a running server owns it)."""


class SchemaTooNew(StoreError):
    """The file was written by a newer tailscope than this one."""


def _map_duckdb_error(exc: duckdb.Error, path: str) -> StoreError:
    text = str(exc)
    if "lock" in text.lower():
        return StoreLocked(
            f"{path} is in use by another process (a running `tailscope serve` owns it); "
            "query it through the server's /api/v1/sql, or stop the server first"
        )
    return StoreError(f"cannot open {path}: {text}")


class Store:
    """The telemetry database.

    Args:
        path: the DuckDB file, or ``":memory:"``.
        read_only: open without taking the write lock (for a stopped server's file).
    """

    def __init__(self, path: str | Path, *, read_only: bool = False) -> None:
        self.path = str(path)
        self.read_only = read_only
        if self.path != ":memory:" and not read_only:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        if read_only and self.path != ":memory:" and not Path(self.path).exists():
            raise StoreError(f"no such database: {self.path}")
        try:
            self._con = duckdb.connect(self.path, read_only=read_only)
        except duckdb.Error as exc:
            raise _map_duckdb_error(exc, self.path) from None
        self._write_lock = threading.Lock()
        # The start_time range (unix s) of each committed span write, by sequence
        # number: lets a reader's cache of per-window figures drop only the
        # windows new data landed in (late spans from a spooling agent included).
        self._write_seq = 0
        self._span_writes: deque[tuple[int, float, float]] = deque(maxlen=SPAN_WRITE_LOG)
        if not read_only:
            self._migrate()
        else:
            self._check_version()

    # --- schema -------------------------------------------------------------
    def _current_version(self) -> int:
        con = self._con
        exists = con.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'schema_version'"
        ).fetchone()[0]
        if not exists:
            return 0
        row = con.execute("SELECT max(version) FROM schema_version").fetchone()
        return int(row[0] or 0)

    def _check_version(self) -> None:
        version = self._current_version()
        if version > SCHEMA_VERSION:
            raise SchemaTooNew(f"{self.path} has schema version {version}; this tailscope knows up to {SCHEMA_VERSION}")

    def _migrate(self) -> None:
        self._check_version()
        con = self._con
        con.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER, applied_at TIMESTAMP)")
        version = self._current_version()
        for target in range(version + 1, SCHEMA_VERSION + 1):
            con.execute("BEGIN TRANSACTION")
            try:
                con.execute(MIGRATIONS[target - 1])
                con.execute("INSERT INTO schema_version VALUES (?, now()::TIMESTAMP)", [target])
                con.execute("COMMIT")
            except Exception:
                con.execute("ROLLBACK")
                raise

    @property
    def schema_version(self) -> int:
        return self._current_version()

    # --- access -------------------------------------------------------------
    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A connection for one thread's reads (DuckDB cursors are not thread-safe)."""
        return self._con.cursor()

    def write(self, tables: Iterable[tuple[str, "pa.Table"]], *, extra_sql: Iterable[tuple[str, list[Any]]] = ()) -> None:
        """Append Arrow tables (and run bookkeeping statements) in one transaction.

        The commit is durable when this returns: DuckDB writes and syncs its WAL
        on commit, which is what lets ingest acknowledge only what is on disk.
        """
        if self.read_only:
            raise StoreError("store is open read-only")
        with self._write_lock:
            con = self._con
            spans: list["pa.Table"] = []
            con.execute("BEGIN TRANSACTION")
            try:
                for name, table in tables:
                    if table.num_rows == 0:
                        continue
                    con.register("_ingest", table)
                    cols = ", ".join(f'"{c}"' for c in table.column_names)
                    con.execute(f"INSERT INTO {name} ({cols}) SELECT {cols} FROM _ingest")
                    con.unregister("_ingest")
                    if name == "spans":
                        spans.append(table)
                for sql, params in extra_sql:
                    con.execute(sql, params)
                con.execute("COMMIT")
            except Exception:
                con.execute("ROLLBACK")
                raise
            for table in spans:
                self._log_span_write(table)

    def execute_write(self, sql: str, params: list[Any] | None = None) -> None:
        """A single write statement under the writer lock (retention, uploads)."""
        if self.read_only:
            raise StoreError("store is open read-only")
        with self._write_lock:
            self._con.execute(sql, params or [])
            self._log_span_write(None)  # any statement may touch spans: readers start over

    def delete_older_than(self, hours: int) -> dict[str, int]:
        """Retention: drop rows older than ``hours`` from every time-keyed table."""
        deleted: dict[str, int] = {}
        with self._write_lock:
            con = self._con
            for table, col in TIME_COLUMNS.items():
                n = con.execute(
                    f"DELETE FROM {table} WHERE {col} < now()::TIMESTAMP - to_hours(?)", [hours]
                ).fetchone()
                deleted[table] = int(n[0]) if n else 0
            self._log_span_write(None)
        return deleted

    # --- what changed --------------------------------------------------------
    def _log_span_write(self, table: "pa.Table | None") -> None:
        """Record a committed span write's start_time range; ``None``: unknown (everything)."""
        lo, hi = -math.inf, math.inf
        if table is not None and "start_time" in table.column_names:
            import pyarrow.compute as pc

            bounds = pc.min_max(table.column("start_time").cast("timestamp[us]").cast("int64")).as_py()
            if bounds["min"] is not None:
                lo, hi = bounds["min"] / 1e6, bounds["max"] / 1e6
        self._write_seq += 1
        self._span_writes.append((self._write_seq, lo, hi))

    @property
    def span_write_seq(self) -> int:
        """The sequence number of the newest logged span write (0: none yet)."""
        with self._write_lock:
            return self._write_seq

    def span_writes_since(self, seq: int) -> tuple[int, list[tuple[float, float]] | None]:
        """(the current write sequence, the start_time ranges (unix s) of span writes after ``seq``).

        ``None`` instead of ranges when they are not known (the log rolled
        over): a reader's cache must then start over. Writes that bypass
        this class (raw SQL on the connection) are not seen here; readers
        also check the row count.
        """
        with self._write_lock:
            current = self._write_seq
            if seq == current:
                return current, []
            log = list(self._span_writes)
        if seq > current or not log or log[0][0] > seq + 1:
            return current, None
        return current, [(lo, hi) for n, lo, hi in log if n > seq]

    def checkpoint(self) -> None:
        with self._write_lock:
            self._con.execute("CHECKPOINT")

    def close(self) -> None:
        try:
            self._con.close()
        except duckdb.Error:
            pass

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

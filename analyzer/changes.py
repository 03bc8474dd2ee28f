"""What the store's writes since a given moment touched, and results kept until they touch their data.

The store logs the start-time range of every committed span write
(``Store.span_writes_since``). A reader marks the moment it starts computing
(write sequence number and row count); later, the ranges written since tell
it whether its result can still stand. A statement of unknown extent
(retention, raw SQL through the store) or a row count that moved without a
logged write (raw SQL on the connection) reads as "everything may have
changed".
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Hashable

import duckdb

Ranges = list[tuple[float, float]]  # unix seconds, inclusive


@dataclass(frozen=True)
class Mark:
    seq: int | None  # None: the store keeps no write log
    rows: int


def mark(store: Any, con: duckdb.DuckDBPyConnection) -> Mark:
    """The moment to compare later writes with (take it before reading)."""
    seq = getattr(store, "span_write_seq", None)
    return Mark(seq, _rows(con))  # the row count after the sequence: a write in between is seen as a write


def since(store: Any, con: duckdb.DuckDBPyConnection, at: Mark | None) -> tuple[Mark, Ranges | None]:
    """(now, the start-time ranges of the span writes since ``at``; None: unknown, assume everything)."""
    log = getattr(store, "span_writes_since", None)
    if log is None or at is None or at.seq is None:
        return mark(store, con), None
    seq, ranges = log(at.seq)
    rows = _rows(con)
    if ranges is not None and not ranges and rows != at.rows:
        ranges = None
    return Mark(seq, rows), ranges


def _rows(con: duckdb.DuckDBPyConnection) -> int:
    return int(con.execute("SELECT count(*) FROM spans").fetchall()[0][0])


@dataclass
class _Entry:
    value: Any
    at: Mark
    horizon_s: float  # the result read no span that started after this


class Kept:
    """Results kept until a span write lands at or before their horizon.

    For results that read only data up to a known time (an incident that
    ended a while ago, and everything its explanation looked at): live
    writes land after it and leave it standing; a late span from before it
    (an agent's spool replayed) drops it.
    """

    def __init__(self, store: Any, size: int = 16) -> None:
        self.store = store
        self.size = size
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()

    def get(self, con: duckdb.DuckDBPyConnection, key: Hashable) -> Any | None:
        with self._lock:
            entry = self._entries.get(key)
        if entry is None:
            return None
        _, ranges = since(self.store, con, entry.at)
        if ranges is None or any(lo <= entry.horizon_s for lo, _ in ranges):
            with self._lock:
                self._entries.pop(key, None)
            return None
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
        return entry.value

    def put(self, key: Hashable, value: Any, at: Mark, horizon_s: float) -> None:
        if at.seq is None:
            return  # no write log: nothing could tell when it goes stale
        with self._lock:
            self._entries[key] = _Entry(value, at, horizon_s)
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

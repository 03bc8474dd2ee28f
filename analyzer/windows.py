"""Per-window figures for spike detection, kept for the windows no write has touched since.

Detection reads every request of its range (the asked-for range and 25 h
before it) into per-window figures: request count, p99, its top values and
the count of class-slow requests. A dashboard refresh, or the alert
evaluator every few seconds, asks again moments later, when only the last
window or two has new data. A window's figures depend only on its requests
and on the class thresholds, so:

- the thresholds are estimated over whole hours (``[hour of lead, hour of
  end)``) when those hold nearly all of the range's requests: the same
  thresholds for every call within the hour (the unfinished hour, a sliver
  of the range, does not move them);
- each whole window's figures are kept until a write lands in it: the
  store's span-write log says which start times each committed write
  covered (:mod:`analyzer.changes`), so late spans from an agent's spool drop
  exactly the windows they fall in; a store without the log, a write of
  unknown extent, or a row count that moved without a logged write, drop
  everything.

With thresholds that cannot be pinned (a range whose unfinished hour holds
much of its data: a young store) every call computes everything, as before.
"""

from __future__ import annotations

import math
import threading
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Sequence

import duckdb

from analyzer.baseline import Span, class_baselines, service_filter, slo_case, threshold_tables
from analyzer.changes import Mark, since
from analyzer.detect import p99_support
from analyzer.requests import LATENCY_MS, REQUEST_PREDICATE, length_bucket
from analyzer.timeutil import from_unix, unix

SPIKE_SAMPLE = 100_000  # requests the spike thresholds are estimated from, at most
TOP_K_MIN = 128
PIN_SHARE = 0.9  # whole hours must hold this share of the range's requests for the thresholds to be pinned
MAX_RANGES = 8  # holes among the kept windows read as separate ranges, at most (an OR of many is slow)
MAX_CACHES = 8  # window caches (and threshold sets) kept: callers with different ranges (dashboard, alerts) each keep theirs

Row = tuple[str, int, int, float, int]  # service, window, requests, p99 ms, class-slow requests


def _request_total(classes: Any) -> int:
    """The unsampled request count :func:`class_baselines` attached to its table (0 when absent)."""
    try:
        return int((classes.schema.metadata or {}).get(b"requests", b"0"))
    except ValueError:
        return 0


def p99_from_top(m: int, top: Sequence[float]) -> float | None:
    """quantile_cont(x, 0.99) from the largest values of ``m`` (descending), or None when too few were kept.

    Same interpolation as DuckDB: h = 0.99 (m - 1); lo + (h - floor h) (hi - lo)
    between the ascending order statistics floor(h) and floor(h) + 1.
    """
    if m <= 0:
        return float("nan")
    h = (m - 1) * 0.99
    f = int(h)
    ra = m - 1 - f  # descending rank of the lower order statistic
    if ra >= len(top):
        return None
    lo = float(top[ra])
    hi = float(top[ra - 1]) if ra >= 1 else lo
    return lo + (h - f) * (hi - lo)


@dataclass
class _Thresholds:
    thr: Any
    thr0: Any
    total: int  # requests in ``span`` (sizes the top-k)
    span: Span
    pinned: bool
    gen: int


@dataclass
class _Cache:
    """One (service, step)'s whole windows under one set of thresholds: window -> service -> figures."""

    windows: dict[int, dict[str, tuple[int, float, int, Sequence[float]]]] = field(default_factory=dict)


def _floor_hour(t: datetime) -> datetime:
    return t.replace(minute=0, second=0, microsecond=0)


class WindowStats:
    """Per-window figures of a store's requests, with the cache described above.

    Args:
        store: the telemetry store (its ``span_writes_since`` feeds invalidation).
        slo: per-service p99 objectives (ms): over it counts as slow whatever the class.
    """

    def __init__(self, store: Any, slo: dict[str, float]) -> None:
        self.store = store
        self.slo = slo
        self.enabled = True
        self._lock = threading.Lock()
        self._at: Mark | None = None  # the writes up to here are accounted for
        self._gen = 0
        self._thresholds: OrderedDict[tuple[str | None, datetime, datetime], _Thresholds] = OrderedDict()
        self._caches: OrderedDict[tuple[str | None, int, int], _Cache] = OrderedDict()  # (service, step, thresholds gen)

    # --- invalidation ---------------------------------------------------------
    def _sync(self, con: duckdb.DuckDBPyConnection) -> None:
        """Drop what the writes since the last call may have changed."""
        now, ranges = since(self.store, con, self._at)
        with self._lock:
            if ranges is None:
                self._thresholds.clear()
                self._caches.clear()
            else:
                for lo, hi in ranges:
                    self._drop(lo, hi)
            self._at = now

    def _drop(self, lo: float, hi: float) -> None:
        if math.isinf(lo) or math.isinf(hi):
            self._thresholds.clear()
            self._caches.clear()
            return
        stale = set()
        for key, th in list(self._thresholds.items()):
            if unix(th.span.start) <= hi and lo < unix(th.span.end):
                stale.add(th.gen)
                del self._thresholds[key]
        for key, cache in list(self._caches.items()):
            _, step, gen = key
            if gen in stale:  # its thresholds will be estimated again: every window with them
                del self._caches[key]
                continue
            a, b = int(lo // step), int(hi // step)
            # a span with a far-off timestamp can make the range years wide: walk whichever is shorter
            for w in range(a, b + 1) if b - a < len(cache.windows) else [w for w in cache.windows if a <= w <= b]:
                cache.windows.pop(w, None)

    # --- thresholds -------------------------------------------------------------
    def thresholds(self, con: duckdb.DuckDBPyConnection, service: str | None, lead: datetime, end: datetime) -> _Thresholds:
        """Class-slow thresholds for detection over [lead, end), pinned to whole hours when they hold nearly all of it."""
        svc, params = service_filter([service] if service else None)
        pin = Span(_floor_hour(lead), _floor_hour(end))
        total, inside, unpinned = con.execute(
            f"""SELECT count(*), count(*) FILTER (WHERE start_time < ?), count(*) FILTER (WHERE start_time >= ?) FROM spans
                WHERE {REQUEST_PREDICATE} AND start_time >= ? AND start_time < ? AND {svc}""",
            [pin.end, lead, pin.start, end, *params],
        ).fetchall()[0]
        pinned = pin.end > pin.start and inside > 0 and inside >= PIN_SHARE * total
        key = (service, pin.start, pin.end)
        if pinned and self.enabled:
            with self._lock:
                hit = self._thresholds.get(key)
                if hit is not None:
                    self._thresholds.move_to_end(key)
                    return hit
        span = pin if pinned else Span(lead, end)
        classes = class_baselines(con, [service] if service else None, span, (), components=False, sample=SPIKE_SAMPLE,
                                  total=inside if pinned else unpinned)  # the requests of ``span``, counted above
        con.register("_sclasses", classes)
        try:
            thr, thr0 = threshold_tables(con, "_sclasses")
        finally:
            con.unregister("_sclasses")
        with self._lock:
            self._gen += 1
            th = _Thresholds(thr, thr0, _request_total(classes), span, pinned, self._gen)
            if pinned and self.enabled:
                self._thresholds[key] = th
                while len(self._thresholds) > MAX_CACHES:
                    self._thresholds.popitem(last=False)
        return th

    # --- figures ------------------------------------------------------------------
    def stats(self, con: duckdb.DuckDBPyConnection, service: str | None, lead: datetime, end: datetime, step: int,
              tops: dict[tuple[str, int], Sequence[float]] | None = None) -> list[Row]:
        """(service, window, requests, p99, class-slow requests) per window of [lead, end), ordered.

        ``tops``, when given, receives each window's largest latencies (descending): as many
        as detection's p99 check can count (``detect.p99_support``), fewer if the window has fewer.
        """
        self._sync(con)
        th = self.thresholds(con, service, lead, end)
        # The p99 of a window needs only its top 1 % (+2) values: a bounded top-k per
        # window (max(x, k)) is cheaper than quantile_cont's full per-window buffer and
        # gives the same number. k comes from the busiest window the thresholds' request
        # count suggests (4x the mean window); busier windows are recomputed exactly.
        windows = max(1.0, (th.span.end - th.span.start).total_seconds() / step)
        k = max(TOP_K_MIN, int(0.01 * 4 * th.total / windows) + 3) if th.total else TOP_K_MIN
        first, last = math.ceil(unix(lead) / step), math.floor(unix(end) / step) - 1  # whole windows inside
        cache = self._cache(service, step, th) if (th.pinned and self.enabled) else _Cache()
        with self._lock:
            have = {w: cache.windows[w] for w in range(first, last + 1) if w in cache.windows}
        # What to read: the edges (part windows) and every whole window not kept, merged.
        pieces = [(lead, from_unix(first * step))]
        pieces += [(from_unix(w * step), from_unix((w + 1) * step)) for w in range(first, last + 1) if w not in have]
        pieces.append((from_unix((last + 1) * step), end))
        ranges: list[list[datetime]] = []
        for a, b in pieces:
            a, b = max(a, lead), min(b, end)
            if b <= a:
                continue
            if ranges and a <= ranges[-1][1]:
                ranges[-1][1] = max(ranges[-1][1], b)
            else:
                ranges.append([a, b])
        if len(ranges) > MAX_RANGES:  # kept windows read again inside it get the same figures
            ranges = [[ranges[0][0], ranges[-1][1]]]
        fresh = self._read(con, service, lead, end, step, th, k, ranges) if ranges else {}
        if th.pinned and self.enabled:
            with self._lock:
                for w in range(first, last + 1):
                    if w not in have:
                        cache.windows[w] = fresh.get(w, {})
                self._prune(cache, first, last)
        out: list[Row] = []
        for w in sorted(set(have) | set(fresh)):
            for s, (n, p99, slow, top) in (have.get(w) or fresh.get(w) or {}).items():
                out.append((s, w, n, p99, slow))
                if tops is not None:
                    tops[(s, w)] = top
        out.sort(key=lambda r: (r[0], r[1]))
        return out

    def _cache(self, service: str | None, step: int, th: _Thresholds) -> _Cache:
        with self._lock:
            key = (service, step, th.gen)
            cache = self._caches.get(key)
            if cache is None:
                cache = self._caches[key] = _Cache()
            self._caches.move_to_end(key)
            while len(self._caches) > MAX_CACHES:
                self._caches.popitem(last=False)
            return cache

    @staticmethod
    def _prune(cache: _Cache, first: int, last: int) -> None:
        """Keep a cache near the ranges being asked about (a moving range leaves old windows behind)."""
        span = last - first + 1
        if len(cache.windows) > 4 * max(span, 1):
            for w in [w for w in cache.windows if w < first - span or w > last + span]:
                del cache.windows[w]

    def _read(self, con: duckdb.DuckDBPyConnection, service: str | None, lead: datetime, end: datetime, step: int,
              th: _Thresholds, k: int, ranges: list[list[datetime]]) -> dict[int, dict[str, tuple[int, float, int, Sequence[float]]]]:
        """One pass over the requests of ``ranges``: window -> service -> (n, p99, slow, top)."""
        svc, svc_params = service_filter([service] if service else None)
        rng = " OR ".join("(start_time >= ? AND start_time < ?)" for _ in ranges)
        rng_params = [x for r in ranges for x in r]
        slo_expr, slo_params = slo_case(self.slo, "r.service")
        con.register("_thr", th.thr)
        con.register("_thr0", th.thr0)
        try:
            # Class thresholds resolved per class key: the pass over every request is
            # one equi-join on a small table (a short request that stalled counts as
            # slow even when long requests set the service's p99).
            rows = con.execute(
                f"""WITH r AS (
                        SELECT service_name AS service, coalesce(model, '') AS model,
                            {length_bucket('input_tokens')} AS ib, {length_bucket('output_tokens')} AS ob,
                            {LATENCY_MS} AS latency_ms, CAST(floor(epoch(start_time) / {step}) AS BIGINT) AS w
                        FROM spans WHERE {REQUEST_PREDICATE} AND ({rng}) AND {svc}
                          AND service_name IS NOT NULL
                    )
                    SELECT r.service, r.w, count(*) AS n, count(r.latency_ms) AS m, max(r.latency_ms, {k}) AS top,
                        count(*) FILTER (WHERE r.latency_ms > coalesce(t.thr, t0.thr) OR r.latency_ms > {slo_expr}) AS slow
                    FROM r LEFT JOIN _thr t USING (service, model, ib, ob) LEFT JOIN _thr0 t0 USING (service)
                    GROUP BY ALL""",
                rng_params + svc_params + slo_params,
            ).fetchall()
        finally:
            con.unregister("_thr")
            con.unregister("_thr0")
        out: dict[int, dict[str, tuple[int, float, int, Sequence[float]]]] = {}
        refill: list[tuple[str, int]] = []
        for s, w, n, m, top, slow in rows:
            p99 = p99_from_top(int(m), top or [])
            if p99 is None:
                refill.append((s, int(w)))
            # Detection reads a window's top values only to count how many exceed a baseline, up to
            # p99_support(n): more are never needed, so only those are kept (array('d'): 8 bytes a value).
            keep = math.ceil(p99_support(int(n))) + 1
            out.setdefault(int(w), {})[s] = (int(n), p99 if p99 is not None else float("nan"), int(slow), array("d", (top or [])[:keep]))
        if refill:
            # Windows busier than the estimate: their exact p99 the plain way.
            exact = {(s, int(w)): float(p) for s, w, p in con.execute(
                f"""SELECT service_name, CAST(floor(epoch(start_time) / {step}) AS BIGINT) AS w, quantile_cont({LATENCY_MS}, 0.99)
                    FROM spans WHERE {REQUEST_PREDICATE} AND start_time >= ? AND start_time < ? AND {svc}
                      AND service_name IS NOT NULL
                      AND CAST(floor(epoch(start_time) / {step}) AS BIGINT) IN ({', '.join(str(w) for _, w in refill)})
                    GROUP BY ALL""", [lead, end, *svc_params]).fetchall()}
            for s, w in refill:
                n, _, slow, top = out[w][s]
                out[w][s] = (n, exact[(s, w)], slow, top)
        return out

"""The analyzer's Python API: latency series, incidents, slow requests, traces.

The dashboard, the alert evaluator, the HTTP API and the CLI all call this
class; it reads the store through a fresh cursor per call (DuckDB cursors are
not thread-safe) and returns plain JSON-able dicts shaped as in spec
section 10 (times RFC 3339 UTC, durations ``*_ms``).

Default range: the last 24 h *of data* (ending at the newest span), so a
stopped store is analysed where its data is, not at wall-clock now.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import OrderedDict, defaultdict
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Sequence

import duckdb
import numpy as np

from analyzer import recommend
from analyzer.attribute import attribute
from analyzer.baseline import Span, class_baselines, slow_candidates
from analyzer.changes import Kept, mark
from analyzer.contrast import contrast
from analyzer.detect import DAY_S, detect
from analyzer.evidence import Evidence, gather
from analyzer.requests import LATENCY_MS, REQUEST_PREDICATE
from analyzer.timeutil import TimeLike, from_unix, iso, to_utc_naive, unix
from analyzer.windows import WindowStats
from tailscope.causes import CAUSES
from tailscope.config import parse_slo
from tailscope.errors import BadRequest, NotFound

DEFAULT_RANGE = timedelta(hours=24)
# Detection looks this far before the asked-for start, so a window's baseline
# (recent windows, and the same hour yesterday) does not depend on where the
# caller's range happens to begin: incident ids stay stable.
LEAD_IN = timedelta(seconds=DAY_S + 3600)
REFERENCE_BEFORE = timedelta(hours=1)
EXPLAIN_PER_INCIDENT = 1000  # slow requests explained per incident (a uniform sample beyond that)
WINDOW_TARGET = 100  # requests a window should hold for its p99 to mean something
_FACTORS = (1, 2, 5, 10, 15, 30, 60, 120, 240)
REFERENCE_AFTER = timedelta(minutes=15)
KEEP_PAD = timedelta(hours=1)  # how long after the last slow request ends a kept explanation still reads spans
TRACE_AROUND = timedelta(hours=2)  # a trace looked up around a time: its spans that started this close to it
MAX_POINTS = 20_000
_ID = re.compile(r"^inc-(\d+)-([0-9a-f]{8})$")
_TRACE = re.compile(r"^[0-9a-fA-F]{32}$")


def _merge(spans: list[Span]) -> list[Span]:
    out: list[Span] = []
    for sp in sorted(spans, key=lambda x: x.start):
        if out and sp.start <= out[-1].end:
            out[-1] = Span(out[-1].start, max(out[-1].end, sp.end))
        else:
            out.append(sp)
    return out


MIN_RUN = 2  # windows a cause must dominate before an incident is split at it
PARALLEL_SHARE = 0.2  # a cause of a side-by-side split explains at least this share of the run's attributed excess
HOME_SHARE = 0.8  # its home replicas hold at least this share of its excess
LOCAL_SHARE = 0.05  # a problem local to fewer replicas than the dominant one explains this share of the excess ...
LOCAL_MIN = 5  # ... and is the largest cause of this many requests, to be split off (_local_within)


def _home(excess_by_instance: dict[str, float]) -> set[str]:
    """The fewest instances that hold HOME_SHARE of a cause's excess (largest first)."""
    total = sum(excess_by_instance.values())
    out: set[str] = set()
    acc = 0.0
    for inst, ms in sorted(excess_by_instance.items(), key=lambda kv: -kv[1]):
        out.add(inst)
        acc += ms
        if acc >= HOME_SHARE * total:
            break
    return out


def _excess_by_cause(results: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Attributed excess (ms) per cause and instance (``unknown`` left out: it names no problem)."""
    per: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for r in results:
        for c in r["causes"]:
            if c["cause"] != "unknown":
                per[c["cause"]][r.get("instance") or ""] += c["excess_ms"] or 0.0
    return per


def _top_cause(r: dict[str, Any]) -> str | None:
    return max(r["causes"], key=lambda c: c["excess_ms"] or 0.0)["cause"] if r["causes"] else None


def _piece(sp: dict[str, Any], i0: int, i1: int, cause: str | None = None, **flags: Any) -> dict[str, Any]:
    """The part of incident ``sp`` over its windows ``i0..i1`` (a cause named: hashed into its id)."""
    step, windows = sp["_step"], sp["_windows"]
    a, b = windows[i0][0], windows[i1][0] + step
    sub = dict(sp)
    sub.update({
        "id": incident_id(sp["service"], a, cause), "start": iso(from_unix(a)), "end": iso(from_unix(b)),
        "_a": from_unix(a), "_b": from_unix(b),
        "p99_ms": round(max(w[2] for w in windows[i0:i1 + 1]), 3),
        "requests": sum(w[1] for w in windows[i0:i1 + 1]),
        "open": sp["open"] and i1 == len(windows) - 1,
        "split_from": sp["id"], **flags,
    })
    return sub


def _claimed_windows(sp: dict[str, Any], mine: list[dict[str, Any]], cause: str) -> tuple[int, int]:
    """First and last of ``sp``'s windows in which ``mine`` hold excess of ``cause`` (all of them when none)."""
    step, windows = sp["_step"], sp["_windows"]
    hit = {(unix(to_utc_naive(r["start"])) // step) * step for r in mine for c in r["causes"] if c["cause"] == cause}
    idx = [i for i, w in enumerate(windows) if w[0] in hit] or list(range(len(windows)))
    return idx[0], idx[-1]


def _side_by_side(sp: dict[str, Any], results: list[dict[str, Any]]) -> list[tuple[dict[str, Any], list[dict[str, Any]]]] | None:
    """Two problems on different replicas at the same time: one incident each, side by side (None: not that).

    Causes that each explain PARALLEL_SHARE of the run's attributed excess,
    each on its own replicas (their home instances do not overlap), are
    independent problems with their own fixes; splitting them in time does
    not separate them when they overlap (the dominant cause flips from
    window to window). Each gets the requests on its home instances (the
    largest also those on no cause's), over the windows where it claims
    excess. A service-wide cause (a surge) has every replica as its home:
    a local problem during it is split off by ``_local_within`` instead.
    """
    per = _excess_by_cause(results)
    total = sum(sum(v.values()) for v in per.values())
    main = sorted((c for c, v in per.items() if total > 0 and sum(v.values()) >= PARALLEL_SHARE * total),
                  key=lambda c: -sum(per[c].values()))
    if len(main) < 2:
        return None
    homes = {c: _home(per[c]) for c in main}
    if any(homes[a] & homes[b] for i, a in enumerate(main) for b in main[i + 1:]):
        return None
    claimed = set().union(*homes.values())
    out = []
    for k, cause in enumerate(main):
        mine = [r for r in results if (r.get("instance") or "") in homes[cause] or (k == 0 and (r.get("instance") or "") not in claimed)]
        sub = _piece(sp, *_claimed_windows(sp, mine, cause), None if k == 0 else cause, side_by_side=True)
        out.append((sub, [r for r in mine if sub["start"] <= r["start"] < sub["end"]]))
    return out


def _local_within(sp: dict[str, Any], results: list[dict[str, Any]]) -> tuple[list[tuple[dict[str, Any], list[dict[str, Any]]]], list[dict[str, Any]]] | None:
    """A problem on some replicas inside a wider one (a KV squeeze on one replica during a surge on all).

    The dominant cause holds most of the excess on every replica, so neither
    a split in time (it dominates every window) nor side by side (the homes
    overlap) separates the local one, yet it is a problem of its own with its
    own fix. A cause whose home is fewer replicas than the dominant cause's,
    that explains at least LOCAL_SHARE of the run's attributed excess and is
    the largest cause of at least LOCAL_MIN requests, gets an incident of
    those requests over the windows they fall in (``side_by_side: true``);
    the wider incident keeps the rest. None: no such cause.
    """
    per = _excess_by_cause(results)
    total = sum(sum(v.values()) for v in per.values())
    ranked = sorted(per, key=lambda c: -sum(per[c].values()))
    if len(ranked) < 2 or total <= 0:
        return None
    wide = len(_home(per[ranked[0]]))
    out: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
    taken: set[int] = set()
    for cause in ranked[1:]:
        if sum(per[cause].values()) < LOCAL_SHARE * total:
            break
        home = _home(per[cause])
        if len(home) >= wide:
            continue
        mine = [r for r in results if (r.get("instance") or "") in home and id(r) not in taken and _top_cause(r) == cause]
        if len(mine) < LOCAL_MIN:
            continue
        taken.update(id(r) for r in mine)
        out.append((_piece(sp, *_claimed_windows(sp, mine, cause), cause, side_by_side=True), mine))
    if not out:
        return None
    return out, [r for r in results if id(r) not in taken]


def _split(sp: dict[str, Any], results: list[dict[str, Any]]) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Split a run of abnormal windows where the dominant cause changes.

    Two problems that overlap in time (a surge, then a KV squeeze; compiles on
    one replica, then a throttled GPU on another) are two incidents for the
    person fixing them, each with its own top cause and recommendation. A
    cause must dominate MIN_RUN windows to start its own incident; windows
    dominated by ``unknown`` never split one. Problems on different replicas
    are split side by side first (``_side_by_side``), a problem on a few
    replicas inside a wider one next (``_local_within``; the wider one is
    then split in time as before).
    """
    parallel = _side_by_side(sp, results)
    if parallel is not None:
        return parallel
    local = _local_within(sp, results)
    if local is not None:
        pieces, rest = local
        wider = _in_time(sp, rest)
        if wider[0][0] is sp:  # not split: a copy, so its count is of the requests left to it
            wider = [(dict(sp), rest)]
        return wider + pieces
    return _in_time(sp, results)


def _in_time(sp: dict[str, Any], results: list[dict[str, Any]]) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """``_split``'s split in time: where the dominant cause changes for MIN_RUN windows (or one clearly)."""
    step, windows = sp["_step"], sp["_windows"]
    if len(windows) < 2 * MIN_RUN:
        return [(sp, results)]
    per: dict[float, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    hits: dict[float, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in results:
        w = (unix(to_utc_naive(r["start"])) // step) * step
        for c in r["causes"]:
            if c["cause"] != "unknown":
                per[w][c["cause"]] += c["excess_ms"] or 0.0
                hits[w][c["cause"]] += 1
    dom = [max(per[t], key=per[t].get) if per.get(t) else None for t, _, _ in windows]
    runs: list[list[Any]] = []  # [first, last, cause]
    for i, d in enumerate(dom):
        if runs and (d is None or d == runs[-1][2] or runs[-1][2] is None):
            runs[-1][1] = i
            if runs[-1][2] is None:
                runs[-1][2] = d
        else:
            runs.append([i, i, d])
    def stands(run: list[Any]) -> bool:
        """Long enough, or a window that one cause clearly dominates (≥ 60 %, 1.5x the next, ≥ 5 requests)."""
        if run[1] - run[0] + 1 >= MIN_RUN:
            return True
        cell: dict[str, float] = defaultdict(float)
        n = 0
        for i in range(run[0], run[1] + 1):
            for cause, ms in per.get(windows[i][0], {}).items():
                cell[cause] += ms
            n += hits.get(windows[i][0], {}).get(run[2], 0)
        ranked = sorted(cell.values(), reverse=True)
        if not ranked or n < 5:
            return False
        runner_up = ranked[1] if len(ranked) > 1 else 0.0
        return cell.get(run[2], 0.0) >= 0.6 * sum(ranked) and cell.get(run[2], 0.0) >= 1.5 * runner_up

    merged: list[list[Any]] = []
    for run in runs:
        if merged and (not stands(run) or not stands(merged[-1])):
            merged[-1][1] = run[1]
        else:
            merged.append(run)
    if len(merged) == 1:
        return [(sp, results)]
    return [(sub, [r for r in results if sub["start"] <= r["start"] < sub["end"]])
            for sub in (_piece(sp, i0, i1) for i0, i1, _ in merged)]


def incident_id(service: str, start_s: float, cause: str | None = None) -> str:
    """Stable id: the same service and first spiky window always give the same id.

    An incident split side by side from another that starts in the same
    window (a second problem on other replicas) hashes its cause in too.
    """
    key = service if cause is None else f"{service}\x00{cause}"
    return f"inc-{int(start_s)}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


class _Background:
    """One function run on a daemon thread; ``result()`` waits for it and re-raises its error.

    Not an executor: its worker threads are joined at interpreter exit, so a
    store read still running when a server stops would hold the process.
    """

    def __init__(self, fn: Any) -> None:
        self._done = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None
        threading.Thread(target=self._run, args=(fn,), name="tailscope-analyzer-side", daemon=True).start()

    def _run(self, fn: Any) -> None:
        try:
            self._value = fn()
        except BaseException as exc:  # handed to the caller by result()
            self._error = exc
        finally:
            self._done.set()

    def wait(self) -> None:
        self._done.wait()

    def result(self) -> Any:
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return iso(value)
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, float) and value != value:
        return None
    return value


def _rows(cur: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    cols = [d[0] for d in cur.description]
    return [{c: _jsonable(v) for c, v in zip(cols, r)} for r in cur.fetchall()]


class Analyzer:
    """Reads the telemetry store and explains its tail latency.

    Args:
        store: a :class:`collector.store.Store` (read-only is fine).
        config: the server :class:`~tailscope.config.Config` (``slo_ms``,
            ``analysis_step_s``); ``None`` uses the defaults.
    """

    def __init__(self, store: Any, config: Any = None) -> None:
        self.store = store
        slo_text = getattr(config, "slo_ms", "") if config is not None else ""
        self.slo: dict[str, float] = parse_slo(slo_text) if slo_text else {}
        self.step_s = int(getattr(config, "analysis_step_s", 60) or 60) if config is not None else 60
        self._cache: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.use_cache = True
        self.windows = WindowStats(store, self.slo)  # per-window figures, kept across calls until written to
        self._kept = Kept(store)  # explained incidents, kept until a write lands in what they read

    @property
    def incremental(self) -> bool:
        """Whether calls reuse what earlier calls computed from data no write has touched since (on by default)."""
        return self.windows.enabled

    @incremental.setter
    def incremental(self, on: bool) -> None:
        self.windows.enabled = on  # what is kept meanwhile stays checked against the writes since it was computed

    # --- plumbing -----------------------------------------------------------
    def _con(self) -> duckdb.DuckDBPyConnection:
        return self.store.cursor()

    def _version(self, con: duckdb.DuckDBPyConnection) -> tuple:
        return tuple(con.execute(
            "SELECT (SELECT count(*) FROM spans), (SELECT count(*) FROM logs), (SELECT count(*) FROM metrics)"
        ).fetchall()[0])

    def _cached(self, con: duckdb.DuckDBPyConnection, key: tuple, compute: Any) -> Any:
        if not self.use_cache:
            return compute()
        full = key + self._version(con)
        with self._lock:
            if full in self._cache:
                self._cache.move_to_end(full)
                return self._cache[full]
        value = compute()
        with self._lock:
            self._cache[full] = value
            while len(self._cache) > 64:
                self._cache.popitem(last=False)
        return value

    def _newest(self, con: duckdb.DuckDBPyConnection) -> datetime | None:
        row = con.execute(f"SELECT max(start_time) FROM spans WHERE {REQUEST_PREDICATE}").fetchall()[0]
        return row[0] if row else None

    def _range(self, con: duckdb.DuckDBPyConnection, start: TimeLike, end: TimeLike) -> tuple[datetime, datetime] | None:
        s, e = to_utc_naive(start, "start"), to_utc_naive(end, "end")
        if s is not None and e is not None and s >= e:
            raise BadRequest(f"start ({iso(s)}) must be before end ({iso(e)})")
        if e is None:
            newest = self._newest(con)
            if newest is None:
                return None
            e = newest + timedelta(milliseconds=1)
            if s is not None and s >= e:
                return None
        if s is None:
            s = e - DEFAULT_RANGE
        return s, e

    def _check_step(self, step_s: Any, start: datetime, end: datetime) -> int:
        if step_s is None:
            step = self.step_s
        else:
            try:
                step = int(step_s)
            except (TypeError, ValueError):
                raise BadRequest(f"step: expected whole seconds, got {step_s!r}") from None
        if step <= 0 or step > 7 * DAY_S:
            raise BadRequest(f"step: must be between 1 and {7 * DAY_S} seconds, got {step}")
        points = (end - start).total_seconds() / step
        if points > MAX_POINTS:
            raise BadRequest(f"step: {step} s over this range gives {points:.0f} points; the limit is {MAX_POINTS} (use a larger step)")
        return step

    # --- services and latency -----------------------------------------------
    def services(self) -> list[str]:
        con = self._con()
        try:
            return self._cached(con, ("services",), lambda: [r[0] for r in con.execute(
                f"SELECT DISTINCT service_name FROM spans WHERE {REQUEST_PREDICATE} AND service_name IS NOT NULL ORDER BY 1"
            ).fetchall()])
        finally:
            con.close()

    def latency(self, service: str | None = None, start: TimeLike = None, end: TimeLike = None,
                step_s: int | None = None, model: str | None = None) -> dict[str, Any]:
        """Request latency per window: ``{service, model, step_s, points: [{t, count, p50_ms, p95_ms, p99_ms}]}``."""
        con = self._con()
        try:
            rng = self._range(con, start, end)
            step = self._check_step(step_s, *rng) if rng else self._check_step(step_s, datetime(1970, 1, 1), datetime(1970, 1, 1))
            if rng is None:
                return {"service": service, "model": model, "step_s": step, "points": []}
            key = ("latency", service, model, rng, step)
            return self._cached(con, key, lambda: self._latency(con, service, model, rng, step))
        finally:
            con.close()

    def _latency(self, con: duckdb.DuckDBPyConnection, service: str | None, model: str | None,
                 rng: tuple[datetime, datetime], step: int) -> dict[str, Any]:
        where, params = ["start_time >= ?", "start_time < ?"], [rng[0], rng[1]]
        if service:
            where.append("service_name = ?")
            params.append(service)
        if model:
            where.append("model = ?")
            params.append(model)
        rows = con.execute(
            f"""SELECT CAST(floor(epoch(start_time) / {step}) AS BIGINT) AS w, count(*) AS n,
                    quantile_cont({LATENCY_MS}, [0.5, 0.95, 0.99]) AS q
                FROM spans WHERE {REQUEST_PREDICATE} AND {' AND '.join(where)}
                GROUP BY w ORDER BY w""",
            params,
        ).fetchall()
        points = [{"t": iso(from_unix(w * step)), "count": int(n), "p50_ms": round(q[0], 3), "p95_ms": round(q[1], 3),
                   "p99_ms": round(q[2], 3)} for w, n, q in rows]
        return {"service": service, "model": model, "step_s": step, "start": iso(rng[0]), "end": iso(rng[1]), "points": points}

    # --- spikes -------------------------------------------------------------
    def _spikes(self, con: duckdb.DuckDBPyConnection, service: str | None, rng: tuple[datetime, datetime]) -> list[dict[str, Any]]:
        """Incident skeletons (no causes yet) overlapping ``rng``, per service.

        A service with little traffic gets wider windows (a whole multiple of
        the configured step) so each holds enough requests for a p99: one
        setting serves a 1000 req/s API and a 6 req/min gateway alike.
        """
        lead = rng[0] - LEAD_IN
        by_service: dict[str, tuple[int, list[tuple[int, int, float, int]]]] = {}
        tops: dict[tuple[str, int], list[float]] = {}
        for s, w, n, p99, slow in self.windows.stats(con, service, lead, rng[1], self.step_s, tops):
            by_service.setdefault(s, (self.step_s, []))[1].append((w, n, p99, slow))
        wide_tops: dict[str, dict[tuple[str, int], list[float]]] = {}
        for s, (step, series) in list(by_service.items()):
            counts = sorted(x[1] for x in series)
            median = counts[len(counts) // 2] if counts else 0
            if median >= WINDOW_TARGET:
                continue
            factor = next((f for f in _FACTORS if median * f >= WINDOW_TARGET), _FACTORS[-1])
            wide = self.step_s * factor
            wide_tops[s] = {}
            by_service[s] = (wide, [(w, n, p99, slow) for _, w, n, p99, slow in self.windows.stats(con, s, lead, rng[1], wide, wide_tops[s])])
        newest = self._newest(con)
        out = []
        lo_s, hi_s = unix(rng[0]), unix(rng[1])
        for s, (step, series) in by_service.items():
            newest_complete = int(unix(newest) // step) - 1 if newest else None
            w = np.array([x[0] for x in series], dtype=np.int64)
            t = w * step
            n = np.array([x[1] for x in series], dtype=np.int64)
            p = np.array([x[2] for x in series], dtype=np.float64)
            slow = np.array([x[3] for x in series], dtype=np.int64)
            src = wide_tops.get(s, tops)
            top = [src.get((s, x[0]), []) for x in series]
            for sp in detect(t.astype(np.float64), n, p, step_s=step, slo_ms=self.slo.get(s), slow=slow, top=top):
                a, b = float(t[sp.first]), float(t[sp.last] + step)
                if b <= lo_s or a >= hi_s:
                    continue
                out.append({
                    "id": incident_id(s, a), "service": s, "start": iso(from_unix(a)), "end": iso(from_unix(b)),
                    "_a": from_unix(a), "_b": from_unix(b),
                    "p99_ms": round(sp.peak_p99, 3), "baseline_p99_ms": round(sp.baseline_p99, 3),
                    "threshold_ms": round(sp.threshold, 3), "by_slo": sp.by_slo, "slo_ms": self.slo.get(s),
                    "requests": int(n[sp.first:sp.last + 1].sum()),
                    "open": newest_complete is not None and int(w[sp.last]) >= newest_complete,
                    "_step": step,
                    "_windows": [(float(t[j]), int(n[j]), float(p[j])) for j in range(sp.first, sp.last + 1)],
                })
        out.sort(key=lambda x: (x["_a"], x["service"]))
        return out

    # --- incidents ----------------------------------------------------------
    def incidents(self, service: str | None = None, start: TimeLike = None, end: TimeLike = None) -> dict[str, Any]:
        """``{incidents: [...]}``: spikes with their slow requests' causes, ranked by share of excess."""
        con = self._con()
        try:
            rng = self._range(con, start, end)
            if rng is None:
                return {"incidents": []}
            return self._cached(con, ("incidents", service, rng), lambda: self._incidents(con, service, rng, detail=False))
        finally:
            con.close()

    def incident(self, incident_id: str) -> dict[str, Any]:
        """One incident with its slow requests and the contrast table."""
        m = _ID.match(incident_id or "")
        if not m:
            raise BadRequest(f"not an incident id: {incident_id!r} (expected inc-<unix start>-<8 hex>)")
        a = from_unix(int(m.group(1)))
        con = self._con()
        try:
            newest = self._newest(con)
            if newest is None:
                raise NotFound(f"no incident {incident_id}: the store has no requests")
            rng = (a, max(a + timedelta(seconds=self.step_s), newest + timedelta(milliseconds=1)))
            rng = (a, min(rng[1], a + DEFAULT_RANGE))
            found = self._cached(con, ("incident", incident_id, rng), lambda: self._incidents(con, None, rng, detail=True, only=incident_id))
        finally:
            con.close()
        if not found["incidents"]:
            raise NotFound(f"no incident {incident_id} in the store (it may have aged out)")
        return found["incidents"][0]

    def _incidents(self, con: duckdb.DuckDBPyConnection, service: str | None, rng: tuple[datetime, datetime],
                   detail: bool, only: str | None = None) -> dict[str, Any]:
        spikes = self._spikes(con, service, rng)
        if only is not None:
            m = _ID.match(only)
            at = from_unix(int(m.group(1))) if m else None
            spikes = [s for s in spikes if s["id"] == only or (at is not None and s["_a"] <= at < s["_b"] and only in {
                incident_id(s["service"], unix(at), c) for c in (None, *CAUSES)})]
        if not spikes:
            return {"incidents": []}
        # Incidents that ended a while ago keep their explanation until a write lands
        # before its horizon (live spans land after it); an open one changes with every write.
        key = ("explained", detail, only, json.dumps(spikes, sort_keys=True, default=str))
        return self._kept_or(con, key, lambda: self._explain_spikes(con, spikes, detail, only),
                             keep=not any(s["open"] for s in spikes))

    def _kept_or(self, con: duckdb.DuckDBPyConnection, key: tuple, compute: Any, keep: bool = True) -> Any:
        """``compute()``'s value (it returns value, horizon), or the one kept from an earlier call while
        no span write has landed at or before its horizon since (see :class:`analyzer.changes.Kept`)."""
        keep = keep and self.incremental
        if keep and (kept := self._kept.get(con, key)) is not None:
            return kept
        before = mark(self.store, con)
        value, horizon_s = compute()
        if keep:
            self._kept.put(key, value, before, horizon_s)
        return value

    def _explain_spikes(self, con: duckdb.DuckDBPyConnection, spikes: list[dict[str, Any]], detail: bool,
                        only: str | None) -> tuple[dict[str, Any], float]:
        """The incidents of ``spikes``, explained; and the latest start time (unix s) of any span they read."""
        ranges = [(s["service"], s["_a"], s["_b"]) for s in spikes]
        refs = _merge([Span(s["_a"] - REFERENCE_BEFORE, s["_b"] + REFERENCE_AFTER) for s in spikes])
        # Each incident's contrast needs only the ids of its explained requests, known
        # before their evidence is gathered: it runs on its own cursor meanwhile (DuckDB
        # releases the GIL; attribution is Python), and is used unless the incident splits.
        early: dict[int, frozenset] = {}
        side = self._con()
        job: _Background | None = None

        def start_contrasts(cands: list[dict[str, Any]]) -> None:
            nonlocal job
            ids: dict[int, list[tuple[str, str]]] = defaultdict(list)
            for r in cands:
                if r.get("range_idx") is not None:
                    ids[int(r["range_idx"])].append((r["trace_id"], r["span_id"]))
            todo = [(k, sp, ids[k]) for k, sp in enumerate(spikes) if ids.get(k)]
            early.update({k: frozenset(mine) for k, _, mine in todo})
            job = _Background(lambda: {k: contrast(side, sp["service"], mine, sp["_a"] - REFERENCE_BEFORE, sp["_b"])
                                       for k, sp, mine in todo})

        try:
            results, ev = self._explain(con, sorted({s["service"] for s in spikes}), ranges,
                                        Span(min(s["_a"] for s in spikes), max(s["_b"] for s in spikes)),
                                        refs, exclude=ranges, limit=EXPLAIN_PER_INCIDENT * len(ranges),
                                        per_range=EXPLAIN_PER_INCIDENT, on_candidates=start_contrasts)
            out = self._assemble(con, spikes, results, ev, early, job, detail, only)
            # Everything read started before the references end or the slow requests do
            # (children and evidence of requests still running then: within KEEP_PAD).
            return out, max(unix(max(r.end for r in refs)), ev.last_s) + KEEP_PAD.total_seconds()
        finally:
            if job is not None:
                job.wait()  # the side cursor is closed only once its queries are done
            side.close()

    def _assemble(self, con: duckdb.DuckDBPyConnection, spikes: list[dict[str, Any]], results: list[dict[str, Any]], ev: Evidence,
                  early: dict[int, frozenset], job: "_Background | None", detail: bool, only: str | None) -> dict[str, Any]:
        """Incidents from their spikes and explained requests: split, causes, contrast."""
        out = []
        for k, sp in enumerate(spikes):
            mine = [r for r in results if r.get("_range") == k]
            total = max((r["_range_total"] for r in mine), default=0)
            weight = total / len(mine) if mine else 1.0
            for r in mine:
                r.pop("_range", None)
                r.pop("_range_total", None)
            for sub, sub_mine in _split(sp, mine):
                if only is not None and sub["id"] != only:
                    continue
                inc = {k2: v for k2, v in sub.items() if not k2.startswith("_")}
                inc["slow_requests"] = int(round(weight * len(sub_mine))) if sub is not sp else total
                inc["explained_sample"] = len(sub_mine)
                inc["excess_ms"] = round(weight * sum(r["excess_ms"] or 0.0 for r in sub_mine), 1)
                inc["causes"] = self._aggregate(con, sub, sub_mine, ev, weight)
                slow_ids = [(r["trace_id"], r["span_id"]) for r in sub_mine]
                if sub is sp and job is not None and early.get(k) == frozenset(slow_ids):
                    inc["contrast"] = job.result()[k]
                else:
                    inc["contrast"] = contrast(con, sub["service"], slow_ids, sub["_a"] - REFERENCE_BEFORE, sub["_b"])
                if detail:
                    inc["requests_detail"] = sub_mine[:200]
                else:
                    inc["examples"] = [r["trace_id"] for r in sub_mine[:5]]
                out.append(inc)
        out.sort(key=lambda x: (x["start"], x["service"], x["id"]))
        return {"incidents": out}

    def _explain(self, con: duckdb.DuckDBPyConnection, services: Sequence[str], ranges: Sequence[tuple[str, datetime, datetime]] | None,
                 window: Span, ref: Span | list[Span], exclude: Sequence[tuple[str, datetime, datetime]],
                 limit: int | None = None, trace_id: str | None = None,
                 per_range: int | None = None, on_candidates: Any = None) -> tuple[list[dict[str, Any]], Evidence]:
        classes = class_baselines(con, services, ref, exclude)
        con.register("_classes", classes)
        try:
            kwargs: dict[str, Any] = {"trace_id": trace_id, "per_range": per_range}
            if limit is not None:
                kwargs["limit"] = limit
            cands = slow_candidates(con, "_classes", services, ranges, window, self.slo, **kwargs)
        finally:
            con.unregister("_classes")
        if on_candidates is not None:
            on_candidates(cands)
        refs = [ref] if isinstance(ref, Span) else ref
        ev = gather(con, cands, ref_start=min(r.start for r in refs), ref_end=max(r.end for r in refs), step_s=self.step_s,
                    refs=[(r.start, r.end) for r in refs])
        out = []
        for r in cands:
            res = attribute(r, ev)
            if r.get("range_idx") is not None:
                res["_range"], res["_range_total"] = int(r["range_idx"]), int(r["range_total"])
            out.append(res)
        return out, ev

    def _aggregate(self, con: duckdb.DuckDBPyConnection, sp: dict[str, Any], results: list[dict[str, Any]], ev: Evidence,
                   weight: float = 1.0) -> list[dict[str, Any]]:
        """Sum the requests' claims per cause (scaled by ``weight`` when they are a sample)."""
        total = sum(r["excess_ms"] or 0.0 for r in results)
        ms: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        rows: dict[str, dict[str, dict]] = defaultdict(dict)
        for r in results:
            for c in r["causes"]:
                ms[c["cause"]] += c["excess_ms"] or 0.0
                counts[c["cause"]] += 1
                for e in c["evidence"]:
                    key = json.dumps({k: e.get(k) for k in ("kind", "span_id", "batch_id", "pid", "time", "instance", "host", "gpu_index", "window_start", "system")}, sort_keys=True, default=str)
                    kept = rows[c["cause"]].get(key)
                    if kept is None:
                        rows[c["cause"]][key] = dict(e, requests=1)
                    else:
                        kept["requests"] += 1
        causes = []
        for cause, v in sorted(ms.items(), key=lambda kv: -kv[1]):
            evidence = sorted(rows[cause].values(), key=lambda e: -e["requests"])[:8]
            causes.append({
                "cause": cause, "share": round(v / total, 4) if total else 0.0, "excess_ms": round(v * weight, 1),
                "requests": int(round(counts[cause] * weight)), "evidence": evidence,
                "recommendation": self._recommend(con, cause, sp, [e for e in rows[cause].values()], ev),
            })
        return causes

    def _recommend(self, con: duckdb.DuckDBPyConnection, cause: str, sp: dict[str, Any], rows: list[dict], ev: Evidence) -> dict[str, Any] | None:
        s, a, b = sp["service"], sp["_a"], sp["_b"]
        if cause == "compile_miss":
            return recommend.compile_miss(con, s, a, b, rows)
        if cause == "batch_contention":
            return recommend.batch_contention(con, s, a, b, rows, ev)
        if cause == "queue_saturation":
            return recommend.queue_saturation(s, a, b, ev)
        if cause == "provider_load":
            return recommend.provider_load(rows, ev)
        if cause == "kv_eviction":
            return recommend.kv_eviction(rows)
        if cause == "gpu_throttle":
            return recommend.gpu_throttle(rows)
        if cause == "gpu_contention":
            return recommend.gpu_contention(rows)
        if cause == "cold_start":
            return recommend.cold_start(rows)
        return {"summary": "no evidence in the telemetry explains this part of the excess; add stage spans "
                           "(queue/prefill/decode), batch spans and GPU metrics so it can be decomposed."}

    # --- slow requests ------------------------------------------------------
    def slow_requests(self, service: str | None = None, start: TimeLike = None, end: TimeLike = None, limit: int = 100) -> dict[str, Any]:
        """``{requests: [...]}``: requests over their comparable baseline, most excess first, with causes."""
        try:
            limit = int(limit)
        except (TypeError, ValueError):
            raise BadRequest(f"limit: expected a whole number, got {limit!r}") from None
        if not 1 <= limit <= 5000:
            raise BadRequest(f"limit: must be between 1 and 5000, got {limit}")
        con = self._con()
        try:
            rng = self._range(con, start, end)
            if rng is None:
                return {"requests": []}
            return self._cached(con, ("slow", service, rng, limit),
                                lambda: self._kept_or(con, ("slow", service, rng, limit), lambda: self._slow(con, service, rng, limit)))
        finally:
            con.close()

    def _slow(self, con: duckdb.DuckDBPyConnection, service: str | None, rng: tuple[datetime, datetime],
              limit: int) -> tuple[dict[str, Any], float]:
        """The slow requests of ``rng``; and the latest start time (unix s) of any span read (the range's
        spikes depend on nothing after its end)."""
        spikes = self._spikes(con, service, rng)
        exclude = [(s["service"], s["_a"], s["_b"]) for s in spikes]
        services = [service] if service else None
        # Comparable requests outside incidents: the range's own; a range that begins inside an
        # incident (and may lie wholly inside a long one) also gets the hour before that incident,
        # the normal its own requests are judged against in the incident list.
        refs = _merge([Span(*rng)] + [Span(s["_a"] - REFERENCE_BEFORE, s["_a"]) for s in spikes if s["_a"] < rng[0]])
        results, ev = self._explain(con, services, None, Span(*rng), refs, exclude=exclude, limit=limit)
        horizon_s = max(unix(rng[1]), ev.last_s) + KEEP_PAD.total_seconds()
        return {"start": iso(rng[0]), "end": iso(rng[1]), "requests": results}, horizon_s

    # --- one trace ----------------------------------------------------------
    def trace(self, trace_id: str, around: TimeLike = None) -> dict[str, Any]:
        """Every span and event of one request, what overlapped it, and its analysis.

        Trace ids are random, so finding one reads the id of every span in the
        store (~1 s per 40 M spans). ``around`` (a time the trace was live, e.g.
        its request's start, which every table that links to a trace knows)
        bounds that to the spans that started within TRACE_AROUND of it; a
        trace with no request span there is looked for everywhere.
        """
        if not isinstance(trace_id, str) or not _TRACE.match(trace_id):
            raise BadRequest(f"not a trace id: {trace_id!r} (expected 32 hex digits)")
        at = to_utc_naive(around, "around")
        tid = trace_id.lower()
        con = self._con()
        try:
            if at is not None:
                found = self._trace(con, tid, (at - TRACE_AROUND, at + TRACE_AROUND))
                if found is not None:
                    return found
            found = self._trace(con, tid, None)
            if found is None:
                raise NotFound(f"no trace {tid} in the store")
            return found
        finally:
            con.close()

    def _trace(self, con: duckdb.DuckDBPyConnection, tid: str, within: tuple[datetime, datetime] | None) -> dict[str, Any] | None:
        """The trace's spans, events and analysis; with ``within``, only what started then (None: no request span there)."""
        bound, bound_params = ("AND start_time >= ? AND start_time <= ?", list(within)) if within else ("", [])
        spans = _rows(con.execute(
            f"""SELECT *, {REQUEST_PREDICATE} AS is_request, {LATENCY_MS} AS latency_ms FROM spans
                WHERE trace_id = ? {bound} ORDER BY start_time, parent_span_id IS NOT NULL, span_id""", [tid, *bound_params]))
        if not spans or (within is not None and not any(s["is_request"] for s in spans)):
            return None
        for s in spans:
            for k in ("attributes", "resource_attributes"):
                if isinstance(s.get(k), str):
                    try:
                        s[k] = json.loads(s[k])
                    except ValueError:
                        pass
        tbound = bound.replace("start_time", "time")
        events = _rows(con.execute(f"SELECT * FROM span_events WHERE trace_id = ? {tbound} ORDER BY time", [tid, *bound_params]))
        req = next((s for s in spans if s["is_request"]), None)
        out: dict[str, Any] = {"trace_id": tid, "spans": spans, "events": events, "request": None}
        if within is not None:
            out["searched"] = {"start": iso(within[0]), "end": iso(within[1])}
        logs = _rows(con.execute(
            f"""SELECT * EXCLUDE (attributes, resource_attributes) FROM logs
                WHERE (trace_id = ? OR lower(kv_victim_trace_id) = ?) {tbound} ORDER BY time""",
            [tid, tid, *bound_params]))
        out["logs"] = logs
        if req is None:
            return out
        out["request"] = {k: req.get(k) for k in ("span_id", "service_name", "model", "service_instance_id", "host_name", "gpu_index",
                                                  "start_time", "end_time", "latency_ms", "input_tokens", "output_tokens", "batch_id")}
        a, b = to_utc_naive(req["start_time"]), to_utc_naive(req["end_time"])
        inst, host, gpu = req.get("service_instance_id"), req.get("host_name"), req.get("gpu_index")
        out["overlapping_compiles"] = _rows(con.execute(
            """SELECT trace_id, span_id, parent_span_id, start_time, end_time, duration_ms, compile_kind, compile_reason,
                   compile_shape, compile_cache, compile_backend, compile_frame
               FROM spans WHERE role = 'compile' AND service_instance_id = ? AND start_time <= ? AND end_time >= ?
                 AND start_time >= ? - INTERVAL 1 HOUR ORDER BY start_time""", [inst, b, a, a]))
        out["evictions"] = _rows(con.execute(
            """SELECT time, event_name, service_instance_id, kv_reason, kv_blocks, kv_usage, kv_victim_trace_id FROM logs
               WHERE event_name = 'tailscope.kv.eviction' AND time >= ? AND time <= ?
                 AND (service_instance_id = ? OR lower(kv_victim_trace_id) = ?) ORDER BY time""", [a, b, inst, tid]))
        out["replica_events"] = _rows(con.execute(
            """SELECT time, event_name, service_instance_id, load_seconds FROM logs
               WHERE event_name IN ('tailscope.replica.ready', 'tailscope.gpu.xid') AND time >= ? - INTERVAL 10 MINUTE AND time <= ?
                 AND (service_instance_id = ? OR host_name = ?) ORDER BY time""", [a, b, inst, host]))
        gpu_sql = "AND gpu_index = ?" if gpu is not None else ""
        out["gpu_samples"] = _rows(con.execute(
            f"""SELECT time, name, value, gpu_index, point_pid FROM metrics
               WHERE host_name = ? {gpu_sql} AND time >= ? - INTERVAL 5 SECOND AND time <= ? + INTERVAL 5 SECOND
                 AND name LIKE 'tailscope.gpu.%' ORDER BY time LIMIT 1000""",
            [host, *([gpu] if gpu is not None else []), a, b]))
        out["batch"] = self._batch_of(con, req, a)
        out["analysis"] = self._analyse_one(con, req, a, b)
        return out

    def _batch_of(self, con: duckdb.DuckDBPyConnection, req: dict[str, Any], a: datetime) -> dict[str, Any] | None:
        rows = _rows(con.execute(
            """SELECT trace_id, span_id, batch_id, start_time, end_time, duration_ms, batch_size, batch_max_len, batch_min_len,
                   batch_real_tokens, batch_padded_tokens, batch_wait_s
               FROM spans WHERE role = 'batch' AND start_time >= ? - INTERVAL 10 MINUTE AND start_time <= ? + INTERVAL 10 MINUTE
                 AND (batch_id = ? OR (trace_id, span_id) IN (SELECT trace_id, span_id FROM span_links
                      WHERE linked_trace_id = ? AND linked_span_id = ?))
               LIMIT 1""", [a, a, req.get("batch_id"), req["trace_id"], req["span_id"]]))
        if not rows:
            return None
        batch = rows[0]
        batch["members"] = _rows(con.execute(
            f"""SELECT trace_id, span_id, input_tokens, output_tokens, shape_len, {LATENCY_MS} AS latency_ms FROM spans
               WHERE {REQUEST_PREDICATE} AND start_time >= ? - INTERVAL 10 MINUTE AND start_time <= ? + INTERVAL 10 MINUTE
                 AND (batch_id = ? OR (trace_id, span_id) IN (SELECT linked_trace_id, linked_span_id FROM span_links
                      WHERE trace_id = ? AND span_id = ?))
               ORDER BY input_tokens DESC NULLS LAST LIMIT 256""",
            [a, a, batch.get("batch_id"), batch["trace_id"], batch["span_id"]]))
        batch["longest_member"] = batch["members"][0] if batch["members"] else None
        return batch

    def _analyse_one(self, con: duckdb.DuckDBPyConnection, req: dict[str, Any], a: datetime, b: datetime) -> dict[str, Any] | None:
        service = req.get("service_name")
        if not service:
            return None
        ref = Span(a - REFERENCE_BEFORE, b + REFERENCE_AFTER)
        exclude: list[tuple[str, datetime, datetime]] = []  # a local baseline; medians shrug off an incident in it
        results, _ = self._explain(con, [service], None, Span(a - timedelta(milliseconds=1), a + timedelta(milliseconds=1)), ref, exclude,
                                   trace_id=req["trace_id"])
        mine = [r for r in results if r["span_id"] == req["span_id"]]
        return mine[0] if mine else None

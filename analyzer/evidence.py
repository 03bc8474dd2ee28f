"""Fetch, for a set of slow requests, every row that could explain them.

One query per kind of evidence, each bounded by the slow requests' time span
and joined on the keys the spec gives (trace/parent ids, service instance,
host + GPU index, batch id or span links, session id, provider). The result
is an in-memory :class:`Evidence` index that the attribution step reads; it
never goes back to the store per request.
"""

from __future__ import annotations

import bisect
import math
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Sequence

import duckdb
import pyarrow as pa

from analyzer.requests import REQUEST_PREDICATE, STAGES as STAGE_ROLES
from analyzer.timeutil import unix

# How far before a request a stall on its instance can still be the reason it
# queued (the backlog a stall leaves takes a while to drain).
STALL_LOOKBACK_S = 300.0
# How far back a replica's busy period (its queue never emptying) is traced:
# first max(a minute, three times the request's own wait), then, for those
# whose replica never emptied in that, 10 minutes, an hour, then BUSY_MAX_S.
BUSY_FIRST_S = 60.0
BUSY_LOOKBACK_S = 3600.0
# Each longer look scans every request on the replica over it: a 10-minute step first
# keeps the common backlog (minutes old) from paying for an hour's scan.
BUSY_STEPS_S = (600.0, BUSY_LOOKBACK_S, 12 * 3600.0)
BUSY_MAX_S = BUSY_STEPS_S[-1]
STALL_MAX_S = 3600.0  # the longest stall (compile, weight load) looked for before a slow request
GPU_PAD_S = 5.0  # GPU samples are periodic; one just outside the request still describes it
QUEUE_SLOT_S = 10
THROTTLE_BITS = 0x4 | 0x8 | 0x20 | 0x40 | 0x80
GPU_METRICS = (
    "tailscope.gpu.sm_clock",
    "tailscope.gpu.sm_clock.max",
    "tailscope.gpu.clock_event_reasons",
    "tailscope.gpu.utilization",
    "tailscope.gpu.process.memory.used",
)


def _rows(cur: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r)) for r in cur.fetchall()]


@dataclass
class Evidence:
    """Indexes of evidence rows, keyed the way attribution looks them up."""

    children: dict[tuple[str, str], list[dict]] = field(default_factory=lambda: defaultdict(list))
    compiles: dict[str, list[dict]] = field(default_factory=lambda: defaultdict(list))  # by instance
    loads: dict[str, list[dict]] = field(default_factory=lambda: defaultdict(list))  # by instance
    # batch span id -> the recompute after an eviction that set its length (see ``_recompute_batches``),
    # and compile span id -> the same, for compiles under such a batch
    recompute_batch: dict[str, dict] = field(default_factory=dict)
    recompute_compile: dict[str, dict] = field(default_factory=dict)
    evict_victim: dict[str, list[dict]] = field(default_factory=lambda: defaultdict(list))  # by trace
    evict_instance: dict[str, list[dict]] = field(default_factory=lambda: defaultdict(list))
    session_prev: dict[tuple[str, str], dict] = field(default_factory=dict)
    batch_of: dict[tuple[str, str], dict] = field(default_factory=dict)
    batch_ref: dict[str, dict] = field(default_factory=dict)  # by service
    batches_on: dict[str, list[dict]] = field(default_factory=lambda: defaultdict(list))  # by instance
    evict_ref: dict[str, float] = field(default_factory=dict)  # capacity/preemption evictions per second, by instance
    queue_profile: dict[tuple[str, int], dict[str, float]] = field(default_factory=dict)  # (service, 10 s slot) -> instance -> median queue ms

    def peer_queue_ms(self, service: str | None, instance: str | None, t: float) -> float | None:
        """Median queue time on the *other* replicas of the service around ``t`` (None without peers)."""
        slot = int(t // QUEUE_SLOT_S)
        key = (service, instance, slot)
        if key not in self._peer_memo:  # slow requests crowd into the same few slots and replicas
            self._peer_memo[key] = self._peer_queue_ms(service, instance, slot)
        return self._peer_memo[key]

    def _peer_queue_ms(self, service: str | None, instance: str | None, slot: int) -> float | None:
        vals = []
        for k in (slot - 1, slot, slot + 1):
            for inst, q in (self.queue_profile.get((service or "", k)) or {}).items():
                if inst != instance:
                    vals.append(q)
        if not vals:
            return None
        vals.sort()
        return vals[len(vals) // 2]
    gpu: dict[tuple[str, int | None], dict[str, list[tuple[float, float, int | None]]]] = field(default_factory=dict)
    gpu_ref: dict[tuple[str, int | None], dict] = field(default_factory=dict)
    foreign_presence: dict[tuple[str, int | None, int], float] = field(default_factory=dict)
    serving_pids: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set))  # by host
    xids: dict[str, list[dict]] = field(default_factory=lambda: defaultdict(list))  # by host
    provider_base: dict[tuple[str, str], dict] = field(default_factory=dict)
    rates: dict[str, dict[int, tuple[int, int]]] = field(default_factory=dict)  # service -> window -> (arrivals, completions)
    rate_ref: dict[str, dict] = field(default_factory=dict)  # service -> median arrivals, peak completions
    # (trace, span) of a queued slow request -> when its replica's queue was last empty before it arrived
    busy_since: dict[tuple[str, str], float] = field(default_factory=dict)
    step_s: int = 60
    last_s: float = 0.0  # the latest end of the slow requests (unix s): the evidence reads nothing that started much later
    # lookup memos (filled on first use; the evidence does not change once gathered)
    _peer_memo: dict[tuple, float | None] = field(default_factory=dict, repr=False)
    _gpu_times: dict[tuple, list[float]] = field(default_factory=dict, repr=False)

    # --- lookups used by attribution ----------------------------------------
    def gpu_key(self, host: str | None, gpu: int | None) -> tuple[str, int | None]:
        """The (host, GPU index) whose samples describe a request's GPU.

        No GPU index on the request (vLLM's spans carry none): on a host with
        exactly one GPU in the metrics, that GPU is the one. Every lookup keyed
        by GPU (samples, reference clocks, which processes are always there)
        goes through here, so they all mean the same GPU.
        """
        key = (host or "", gpu)
        if gpu is None and key not in self.gpu:
            on_host = [k for k in self.gpu if k[0] == key[0]]
            if len(on_host) == 1:
                return on_host[0]
        return key

    def gpu_samples(self, host: str | None, gpu: int | None, name: str, a: float, b: float) -> list[tuple[float, float, int | None]]:
        key = self.gpu_key(host, gpu)
        series = self.gpu.get(key)
        if not series:
            return []
        rows = series.get(name, [])
        if not rows:
            return []
        times = self._gpu_times.get((key, name))
        if times is None or len(times) != len(rows):
            times = self._gpu_times[(key, name)] = [row[0] for row in rows]
        return rows[bisect.bisect_left(times, a - GPU_PAD_S):bisect.bisect_right(times, b + GPU_PAD_S)]


def _register(con: duckdb.DuckDBPyConnection, name: str, slow: Sequence[dict[str, Any]],
              since: dict[tuple[str, str], float] | None = None) -> None:
    """Register the slow requests; ``tq`` is where the look at each one begins (its busy period's start, or t0)."""
    cols = ("trace_id", "span_id", "service", "instance", "host_name", "gpu_index", "batch_id", "session_id")
    since = since or {}
    table = pa.table(
        {
            **{c: pa.array([r.get(c) for r in slow], type=pa.int64() if c == "gpu_index" else pa.string()) for c in cols},
            "t0": pa.array([float(r["t0"]) for r in slow], type=pa.float64()),
            "t1": pa.array([float(r["t1"]) for r in slow], type=pa.float64()),
            "tq": pa.array([min(float(r["t0"]), since.get((r["trace_id"], r["span_id"]), math.inf)) for r in slow],
                           type=pa.float64()),
        }
    )
    con.register(name, table)


def _ts(seconds: float) -> datetime:
    return datetime(1970, 1, 1) + timedelta(seconds=seconds)


def gather(
    con: duckdb.DuckDBPyConnection,
    slow: Sequence[dict[str, Any]],
    *,
    ref_start: datetime,
    ref_end: datetime,
    step_s: int,
    refs: Sequence[tuple[datetime, datetime]] | None = None,
) -> Evidence:
    """Collect the evidence for ``slow`` (dict rows with t0/t1 unix seconds).

    ``refs``: the reference ranges when there are several (incidents hours
    apart); [ref_start, ref_end] stands for them otherwise.
    """
    ev = Evidence(step_s=step_s)
    if not slow:
        return ev
    _register(con, "_slow", slow)
    try:
        lo_s = min(float(r["t0"]) for r in slow)
        hi_s = max(float(r["t1"]) for r in slow)
        ev.last_s = hi_s
        lo, hi = _ts(lo_s), _ts(hi_s)
        _children(con, ev, slow)
        _busy_periods(con, ev, slow)
        if ev.busy_since:
            # what slowed a replica while its backlog built is looked for from the busy period's start
            con.unregister("_slow")
            _register(con, "_slow", slow, ev.busy_since)
        lo_busy = _ts(min([lo_s, *ev.busy_since.values()]))
        _stalls(con, ev, lo_busy, hi)
        _evictions(con, ev, lo_busy, hi)
        _eviction_rates(con, ev, ref_start, ref_end)
        _sessions(con, ev, lo, hi)
        _batches(con, ev, lo, hi, ref_start, ref_end)
        _recompute_batches(con, ev, lo, hi)
        _gpu(con, ev, lo_busy, hi, ref_start)
        _providers(con, ev, hi)
        _rates(con, ev, ref_start, step_s, _rate_spans(slow, ev, refs or [(ref_start, ref_end)], hi, step_s))
        _queue_profile(con, ev, lo, hi)
    finally:
        con.unregister("_slow")
    return ev


def _time_ranges(slow: Sequence[dict[str, Any]], pad_s: float = 1.0, gap_s: float = 60.0,
                 most: int = 64) -> list[tuple[datetime, datetime, list[str]]]:
    """The slow requests' lifetimes merged into a few time ranges (for zone-map pruning), each with its requests' trace ids."""
    spans = sorted((float(r["t0"]) - pad_s, float(r["t1"]) + pad_s, str(r["trace_id"])) for r in slow)
    merged: list[list[Any]] = []
    for a, b, tid in spans:
        if merged and a <= merged[-1][1] + gap_s:
            merged[-1][1] = max(merged[-1][1], b)
            merged[-1][2].add(tid)
        else:
            merged.append([a, b, {tid}])
    if len(merged) > most:
        merged = [[merged[0][0], max(m[1] for m in merged), {t for m in merged for t in m[2]}]]
    return [(_ts(a), _ts(b), sorted(ids)) for a, b, ids in merged]


FEW_TRACES = 32  # a time range holding at most this many slow requests looks their trace ids up as a list


def _children(con: duckdb.DuckDBPyConnection, ev: Evidence, slow: Sequence[dict[str, Any]]) -> None:
    # Child spans start inside their parent: scanning only the slow requests'
    # own time ranges keeps this cheap when they are scattered over a day.
    cols = """c.trace_id, c.parent_span_id, c.span_id, c.role, epoch(c.start_time) AS a, epoch(c.end_time) AS b,
                c.duration_ms, c.compile_kind, c.compile_reason, c.compile_shape, c.compile_cache, c.compile_backend,
                c.compile_frame, c.gen_ai_system, c.server_address, c.provider_region, c.name"""
    # One simple range per branch, so each branch prunes row groups on its own. A range around
    # a few scattered requests (a day's slowest) also lists their trace ids: the scan then drops
    # the range's other spans before reading their columns (~2x cheaper than probing the pairs of each).
    branches, params = [], []
    for a, b, ids in _time_ranges(slow, most=200):
        few = len(ids) <= FEW_TRACES
        branches.append(f"""SELECT {cols} FROM spans c
           WHERE c.start_time >= ? AND c.start_time <= ? AND c.parent_span_id IS NOT NULL
             {"AND c.trace_id IN (" + ", ".join("?" for _ in ids) + ")" if few else ""}
             AND (c.trace_id, c.parent_span_id) IN (SELECT trace_id, span_id FROM _slow)""")
        params += [a, b, *(ids if few else [])]
    cur = con.execute(" UNION ALL ".join(branches), params)
    for row in _rows(cur):
        ev.children[(row["trace_id"], row["parent_span_id"])].append(row)


def queue_ms(req: dict[str, Any], children: Sequence[dict[str, Any]]) -> float | None:
    """A request's time in queue: queue spans, vLLM's attribute, 0 ms with other stages (None: no queue telemetry)."""
    q = [float(c.get("duration_ms") or 0.0) for c in children if c.get("role") == "queue"]
    if q:
        return sum(q)
    flat = req.get("time_in_queue_s")
    if flat is not None:
        return float(flat) * 1000.0
    return 0.0 if any(c.get("role") in STAGE_ROLES for c in children) else None


def _busy_periods(con: duckdb.DuckDBPyConnection, ev: Evidence, slow: Sequence[dict[str, Any]]) -> None:
    """For each slow request that queued beyond its class's normal: when its replica's queue was last empty.

    A request waits behind the backlog its replica had when it arrived; that
    backlog has been building since the replica's queue was last empty (the
    start of the busy period). Whatever slowed the replica during that busy
    period (a compile, a weight load, a throttled GPU, a foreign job, a KV
    squeeze) is why the backlog exists, however long it takes to drain (which
    depends on the load, so no fixed look-back fits every service). "Empty"
    is read from the other requests on the same replica: one that arrived
    and waited no more than twice the service's normal queue time (the
    median of the class medians) found the queue (about) empty. Traced back
    max(1 min, 3 x the request's wait), then 10 min, an hour, BUSY_MAX_S for
    those whose replica never emptied in the shorter look; replicas with no
    queue telemetry get nothing.
    """
    need: list[tuple[dict[str, Any], float]] = []
    for r in slow:
        exp = r.get("exp_queue_ms")
        if not r.get("instance") or exp is None:
            continue
        q = queue_ms(r, ev.children.get((r["trace_id"], r["span_id"]), []))
        if q is not None and q > 2.0 * float(exp) + 1.0:
            need.append((r, min(BUSY_MAX_S, max(BUSY_FIRST_S, 3.0 * q / 1000.0))))
    if not need:
        return
    per_service: dict[str, list[float]] = defaultdict(list)
    for r, _ in need:
        per_service[r.get("service") or ""].append(float(r["exp_queue_ms"]))
    thr = {s: max(2.0 * sorted(v)[len(v) // 2], 1.0) for s, v in per_service.items()}
    # A first, short look (as far back as the request's own wait suggests): most
    # replicas emptied moments before. Those that never emptied in it are traced
    # back further (BUSY_STEPS_S), up to BUSY_MAX_S (a backlog that drains for hours).
    todo = need
    while todo:
        unresolved = _trace_back(con, ev, todo, thr)
        todo = [(r, next(x for x in BUSY_STEPS_S if x > lb)) for r, lb in unresolved if lb < BUSY_MAX_S]


def _trace_back(con: duckdb.DuckDBPyConnection, ev: Evidence, need: Sequence[tuple[dict[str, Any], float]],
                thr: dict[str, float]) -> list[tuple[dict[str, Any], float]]:
    """One look back (per request: row, seconds); sets ``busy_since``, returns those that hit the look-back's start."""
    if not need:
        return []
    table = pa.table({
        "trace_id": [r["trace_id"] for r, _ in need], "span_id": [r["span_id"] for r, _ in need],
        "instance": [r["instance"] for r, _ in need], "t0": pa.array([float(r["t0"]) for r, _ in need], pa.float64()),
        "thr": pa.array([thr[r.get("service") or ""] for r, _ in need], pa.float64()),
        "lb": pa.array([float(lb) for _, lb in need], pa.float64()),
    })
    rng, params = _ranges_sql([(float(r["t0"]) - lb, float(r["t0"])) for r, lb in need])
    rows = {(r["trace_id"], r["span_id"]): (r, lb) for r, lb in need}
    unresolved = []
    con.register("_busy", table)
    try:
        # An arrival found the queue (about) empty unless it waited longer than the
        # threshold: its queue span (or vLLM attribute) says so; no queue span with
        # other stages is 0 ms. Long waits are few, so they are the set looked up.
        cur = con.execute(
            f"""WITH t AS (SELECT DISTINCT instance AS inst, thr FROM _busy),
               r AS (
                  SELECT r.trace_id, r.span_id, r.service_instance_id AS inst, epoch(r.start_time) AS a, r.time_in_queue_s
                  FROM spans r WHERE {REQUEST_PREDICATE} AND ({rng}) AND r.service_instance_id IN (SELECT inst FROM t)
               ),
               long AS (
                  SELECT c.trace_id, c.parent_span_id AS span_id FROM spans c JOIN t ON c.service_instance_id = t.inst
                  WHERE c.role = 'queue' AND ({rng.replace("start_time", "c.start_time")}) AND c.duration_ms > t.thr
               ),
               e AS (
                  SELECT r.inst, r.a FROM r JOIN t USING (inst)
                  WHERE coalesce(r.time_in_queue_s * 1000.0 <= t.thr, TRUE)
                    AND NOT EXISTS (SELECT 1 FROM long WHERE long.trace_id = r.trace_id AND long.span_id = r.span_id)
               )
               SELECT b.trace_id, b.span_id, b.t0, b.lb, e.a AS q0, b.instance IN (SELECT inst FROM r) AS seen
               FROM _busy b ASOF LEFT JOIN e ON b.instance = e.inst AND b.t0 > e.a""",
            params + params,
        )
        for tid, sid, t0, lb, q0, seen in cur.fetchall():
            if q0 is not None and float(q0) >= float(t0) - float(lb):
                ev.busy_since[(tid, sid)] = float(q0)
            elif seen:
                ev.busy_since[(tid, sid)] = float(t0) - float(lb)
                unresolved.append(rows[(tid, sid)])
    finally:
        con.unregister("_busy")
    return unresolved


def _ranges_sql(spans: Sequence[tuple[float, float]], col: str = "start_time") -> tuple[str, list[Any]]:
    """Time ranges (unix s), merged, as an OR of simple range predicates on ``col`` (each prunes row groups)."""
    merged: list[list[float]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    if len(merged) > 200:  # scattered over a long range: one range (the predicate stays small)
        merged = [[merged[0][0], max(m[1] for m in merged)]]
    sql = " OR ".join(f"({col} >= ? AND {col} < ?)" for _ in merged)
    return sql, [x for a, b in merged for x in (_ts(a), _ts(b))]


def _stalls(con: duckdb.DuckDBPyConnection, ev: Evidence, lo: datetime, hi: datetime) -> None:
    """Compile spans and model loads on the slow requests' instances (any parent)."""
    cur = con.execute(
        f"""SELECT span_id, trace_id, parent_span_id, role, service_instance_id AS instance,
                epoch(start_time) AS a, epoch(end_time) AS b, duration_ms,
                compile_kind, compile_reason, compile_shape, compile_cache, compile_backend, compile_frame
           FROM spans
           WHERE role IN ('compile', 'model_load') AND start_time >= ? - INTERVAL {int(STALL_MAX_S)} SECOND
             AND end_time >= ? - INTERVAL {int(STALL_LOOKBACK_S)} SECOND
             AND start_time <= ? AND service_instance_id IN (SELECT DISTINCT instance FROM _slow)
           ORDER BY start_time""",
        [lo, lo, hi],
    )
    for row in _rows(cur):
        (ev.compiles if row["role"] == "compile" else ev.loads)[row["instance"]].append(row)
    cur = con.execute(
        f"""SELECT service_instance_id AS instance, epoch(time) AS b, load_seconds
           FROM logs WHERE event_name = 'tailscope.replica.ready'
             AND time >= ? - INTERVAL {int(STALL_LOOKBACK_S)} SECOND AND time <= ? + INTERVAL 1 HOUR
             AND service_instance_id IN (SELECT DISTINCT instance FROM _slow)
           ORDER BY time""",
        [lo, hi],
    )
    for row in _rows(cur):
        load = float(row["load_seconds"] or 0.0)
        ev.loads[row["instance"]].append(
            {"span_id": None, "role": "replica.ready", "instance": row["instance"], "a": row["b"] - load, "b": row["b"],
             "duration_ms": load * 1000.0}
        )


def _evictions(con: duckdb.DuckDBPyConnection, ev: Evidence, lo: datetime, hi: datetime) -> None:
    cur = con.execute(
        f"""SELECT epoch(time) AS t, service_instance_id AS instance, lower(kv_victim_trace_id) AS victim,
                kv_reason, kv_blocks, kv_usage, trace_id
           FROM logs WHERE event_name = 'tailscope.kv.eviction'
             AND time >= ? - INTERVAL {int(STALL_LOOKBACK_S)} SECOND AND time <= ? + INTERVAL 1 MINUTE
             AND (lower(kv_victim_trace_id) IN (SELECT trace_id FROM _slow)
                  OR trace_id IN (SELECT trace_id FROM _slow)
                  OR service_instance_id IN (SELECT DISTINCT instance FROM _slow))
           ORDER BY time""",
        [lo, hi],
    )
    for row in _rows(cur):
        victim = row["victim"] or None
        if victim:
            ev.evict_victim[victim].append(row)
        elif row["trace_id"]:
            ev.evict_victim[row["trace_id"]].append(row)
        if row["instance"]:
            ev.evict_instance[row["instance"]].append(row)
    # Engines that emit no eviction records still count their preemptions
    # (vLLM's Prometheus counter, forwarded by the agent under its own name):
    # each increase between two scrapes is that many preemptions, at the later scrape.
    cur = con.execute(
        f"""SELECT service_instance_id AS instance, epoch(time) AS t, value - lag(value) OVER w AS d, value
           FROM metrics WHERE name IN ({', '.join(repr(n) for n in PREEMPTION_COUNTERS)})
             AND time >= ? - INTERVAL {int(STALL_LOOKBACK_S) + 60} SECOND AND time <= ? + INTERVAL 1 MINUTE
             AND service_instance_id IN (SELECT DISTINCT instance FROM _slow)
           WINDOW w AS (PARTITION BY service_instance_id, name ORDER BY time)
           ORDER BY time""",
        [lo, hi],
    )
    added = set()
    for inst, t, d, value in cur.fetchall():
        n = _increase(d, value)
        if n > 0 and inst:
            ev.evict_instance[inst].append({"t": float(t), "instance": inst, "victim": None, "kv_reason": "preemption",
                                            "kv_blocks": None, "kv_usage": None, "trace_id": None, "count": n,
                                            "source": "engine_counter"})
            added.add(inst)
    for inst in added:
        ev.evict_instance[inst].sort(key=lambda e: e["t"])


PREEMPTION_COUNTERS = ("vllm:num_preemptions_total", "vllm:num_preemptions")


def _increase(d: float | None, value: float | None) -> int:
    """A cumulative counter's increase between two scrapes (a drop is a restart: the new value is the increase)."""
    if d is None or value is None:
        return 0
    return int(round(value if d < 0 else d))


def _recompute_batches(con: duckdb.DuckDBPyConnection, ev: Evidence, lo: datetime, hi: datetime) -> None:
    """Batches whose length exists only because a member is being recomputed after an eviction.

    A preempted (or evicted) request comes back with its prompt *plus* the
    tokens it had generated, so the batch that recomputes it can be longer than
    any fresh request would make it: a new padded shape (which recompiles), more
    padding for its other members, a longer batch that holds the replica while
    others queue. All of that is a consequence of the eviction, not of the
    service's shape or batching policy: no eviction, no recompute. The chain is
    read from telemetry only: the batch span (``batch_max_len``), its members
    (span links), members with ``kv_preemptions > 0`` or named by an eviction
    record before the batch started. The batch counts as a recompute's when
    its longest length exceeds every member's own input length: that length
    carries generated tokens, so it is a recompute's, and it set the shape.

    Looked at: the parent batches of compile spans, the slow requests' own
    batches, and the abnormally long batches they may have queued behind.
    """
    compile_parent = {c["span_id"]: (c["trace_id"], c["parent_span_id"]) for rows in ev.compiles.values() for c in rows
                      if c.get("parent_span_id") and c.get("trace_id")}
    cand = set(compile_parent.values())
    cand |= {(b["b_trace"], b["b_span"]) for b in ev.batch_of.values() if b.get("b_trace") and b.get("b_span")}
    normals = [r.get("duration_p50") for r in ev.batch_ref.values() if r.get("duration_p50")]
    if normals:
        floor_ms = 3.0 * min(normals)
        cand |= {(b["b_trace"], b["b_span"]) for rows in ev.batches_on.values() for b in rows
                 if (b.get("duration_ms") or 0) > floor_ms and b.get("b_trace")}
    if not cand:
        return
    pairs = sorted(cand)
    con.register("_rbat", pa.table({"t": [p[0] for p in pairs], "s": [p[1] for p in pairs]}))
    try:
        cur = con.execute(
            """WITH b AS (
                  SELECT s.trace_id AS b_trace, s.span_id AS b_span, s.batch_id, s.batch_max_len, s.batch_size,
                      epoch(s.start_time) AS ba
                  FROM spans s JOIN _rbat p ON s.trace_id = p.t AND s.span_id = p.s
                  WHERE s.role = 'batch' AND s.start_time >= ? - INTERVAL 10 MINUTE AND s.start_time <= ?
                    AND s.batch_max_len IS NOT NULL
               ),
               m AS (
                  SELECT b.b_span, r.trace_id, r.span_id, r.input_tokens, r.output_tokens,
                      coalesce(r.kv_preemptions, 0) AS preemptions
                  FROM b JOIN span_links l ON l.trace_id = b.b_trace AND l.span_id = b.b_span
                  JOIN spans r ON r.span_id = l.linked_span_id AND r.trace_id = l.linked_trace_id
                  WHERE r.start_time >= ? - INTERVAL 1 HOUR AND r.start_time <= ?
               ),
               e AS (
                  SELECT m.b_span, m.trace_id, max(epoch(g.time)) AS evicted_at, any_value(g.kv_reason) AS reason,
                      count(*) AS evictions
                  FROM m JOIN b USING (b_span)
                  JOIN logs g ON g.event_name = 'tailscope.kv.eviction' AND lower(g.kv_victim_trace_id) = m.trace_id
                      AND epoch(g.time) <= b.ba
                  WHERE g.time >= ? - INTERVAL 1 HOUR AND g.time <= ?
                  GROUP BY ALL
               )
               SELECT b.b_span, b.batch_id, b.batch_max_len, b.batch_size,
                   m.trace_id, m.span_id, m.input_tokens, m.output_tokens, m.preemptions, e.evicted_at, e.reason, e.evictions
               FROM b JOIN m USING (b_span) LEFT JOIN e USING (b_span, trace_id)""",
            [lo, hi, lo, hi, lo, hi],
        )
        by_batch: dict[str, list[dict]] = defaultdict(list)
        for row in _rows(cur):
            by_batch[row["b_span"]].append(row)
    finally:
        con.unregister("_rbat")
    for bspan, members in by_batch.items():
        max_len = members[0]["batch_max_len"]
        victims = [m for m in members if (m.get("preemptions") or 0) > 0 or m.get("evictions")]
        longest_input = max((m.get("input_tokens") or 0) for m in members)
        if not victims or max_len <= longest_input:
            continue
        v = max(victims, key=lambda m: (m.get("input_tokens") or 0) + (m.get("output_tokens") or 0))
        ev.recompute_batch[bspan] = {
            "batch_id": members[0].get("batch_id"), "batch_span_id": bspan,
            "batch_size": members[0].get("batch_size"), "batch_max_len": max_len,
            "longest_member_input_tokens": longest_input,
            "recomputed_trace_id": v["trace_id"], "recomputed_span_id": v["span_id"],
            "recomputed_input_tokens": v.get("input_tokens"), "recomputed_output_tokens": v.get("output_tokens"),
            "kv_preemptions": v.get("preemptions"), "evicted_at": v.get("evicted_at"), "eviction_reason": v.get("reason"),
            "recomputed_members": len(victims),
        }
    for cid, (_, parent) in compile_parent.items():
        if parent in ev.recompute_batch:
            ev.recompute_compile[cid] = ev.recompute_batch[parent]


def _queue_profile(con: duckdb.DuckDBPyConnection, ev: Evidence, lo: datetime, hi: datetime) -> None:
    """Per replica and 10 s slot, the median time requests queued, around the slow requests.

    Waits are queue stage spans or vLLM's ``time_in_queue``; a slot's other
    requests waited 0 ms (see ``requests.ZERO_WHEN_ABSENT``: a queue span is
    often emitted only when a request waited), so the median is over them all.
    """
    slot = f"CAST(floor(epoch(start_time) / {QUEUE_SLOT_S}) AS BIGINT)"
    near = f"""{slot} IN (SELECT DISTINCT CAST(floor(t0 / {QUEUE_SLOT_S}) AS BIGINT) + d FROM _slow, range(-1, 2) r(d))
               AND start_time >= ? - INTERVAL 1 MINUTE AND start_time <= ?
               AND service_name IN (SELECT DISTINCT service FROM _slow) AND service_instance_id IS NOT NULL"""
    cur = con.execute(
        f"""WITH w AS (
              SELECT service_name AS service, service_instance_id AS inst, {slot} AS slot, duration_ms AS q
              FROM spans WHERE role = 'queue' AND {near}
              UNION ALL
              SELECT service_name, service_instance_id, {slot}, time_in_queue_s * 1000.0
              FROM spans WHERE {REQUEST_PREDICATE} AND time_in_queue_s IS NOT NULL AND {near}
           ),
           n AS (SELECT service_name AS service, service_instance_id AS inst, {slot} AS slot, count(*) AS n
                 FROM spans WHERE {REQUEST_PREDICATE} AND {near} GROUP BY ALL)
           SELECT service, inst, slot, n.n, list(w.q ORDER BY w.q) FILTER (WHERE w.q IS NOT NULL)
           FROM n LEFT JOIN w USING (service, inst, slot) GROUP BY ALL""",
        [lo, hi, lo, hi, lo, hi],
    )
    for service, inst, slot, n, waits in cur.fetchall():
        waits = [float(x) for x in waits or [] if x is not None]
        every = [0.0] * max(0, int(n) - len(waits)) + waits
        if every:
            mid = len(every) // 2
            med = every[mid] if len(every) % 2 else 0.5 * (every[mid - 1] + every[mid])
            ev.queue_profile.setdefault((service or "", int(slot)), {})[inst] = med


def _eviction_rates(con: duckdb.DuckDBPyConnection, ev: Evidence, ref_start: datetime, ref_end: datetime) -> None:
    """Each instance's normal rate of capacity/preemption evictions (per second).

    The reference range may contain the very squeeze being diagnosed, so a
    plain mean would call it normal: the rate is the mean over the quieter
    three quarters of its minutes (empty minutes count), which ignores a burst
    covering up to a quarter of the range but keeps a steady background rate.
    """
    minutes = max(int((ref_end - ref_start).total_seconds() // 60), 1)
    cur = con.execute(
        """SELECT service_instance_id, CAST(floor(epoch(time) / 60) AS BIGINT) AS m, count(*) FROM logs
           WHERE event_name = 'tailscope.kv.eviction' AND coalesce(kv_reason, '') <> 'prefix_lru'
             AND time >= ? AND time < ? AND service_instance_id IN (SELECT DISTINCT instance FROM _slow)
           GROUP BY ALL""",
        [ref_start, ref_end],
    )
    by_min: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for inst, m, n in cur.fetchall():
        by_min[inst][int(m)] += int(n)
    cur = con.execute(
        f"""SELECT instance, CAST(floor(t / 60) AS BIGINT) AS m, d, value FROM (
              SELECT service_instance_id AS instance, epoch(time) AS t, value - lag(value) OVER w AS d, value
              FROM metrics WHERE name IN ({', '.join(repr(n) for n in PREEMPTION_COUNTERS)})
                AND time >= ? AND time < ? AND service_instance_id IN (SELECT DISTINCT instance FROM _slow)
              WINDOW w AS (PARTITION BY service_instance_id, name ORDER BY time))""",
        [ref_start, ref_end],
    )
    for inst, m, d, value in cur.fetchall():
        n = _increase(d, value)
        if n > 0 and inst:
            by_min[inst][int(m)] += n
    per_min = {inst: list(v.values()) for inst, v in by_min.items()}
    for inst, counts in per_min.items():
        counts = sorted(counts + [0] * max(0, minutes - len(counts)))
        quiet = counts[: max(1, (3 * len(counts)) // 4)]
        ev.evict_ref[inst] = sum(quiet) / len(quiet) / 60.0


def _sessions(con: duckdb.DuckDBPyConnection, ev: Evidence, lo: datetime, hi: datetime) -> None:
    """Each slow request's previous turn in its session (for prefix-cache hits that fell)."""
    cur = con.execute(
        f"""WITH s AS (
              SELECT trace_id, span_id, session_id, start_time, input_tokens, output_tokens, kv_cached_tokens,
                  lag(input_tokens) OVER w AS prev_input, lag(output_tokens) OVER w AS prev_output,
                  lag(kv_cached_tokens) OVER w AS prev_cached, lag(trace_id) OVER w AS prev_trace
              FROM spans
              WHERE {REQUEST_PREDICATE} AND session_id IN (SELECT session_id FROM _slow WHERE session_id IS NOT NULL)
                AND start_time >= ? - INTERVAL 6 HOUR AND start_time <= ?
              WINDOW w AS (PARTITION BY session_id ORDER BY start_time)
            )
            SELECT s.* FROM s JOIN _slow USING (trace_id, span_id) WHERE s.prev_trace IS NOT NULL""",
        [lo, hi],
    )
    for row in _rows(cur):
        ev.session_prev[(row["trace_id"], row["span_id"])] = row


def _batches(con: duckdb.DuckDBPyConnection, ev: Evidence, lo: datetime, hi: datetime, ref_start: datetime, ref_end: datetime) -> None:
    cur = con.execute(
        """WITH linked AS (
              SELECT l.trace_id AS b_trace, l.span_id AS b_span, s.trace_id, s.span_id
              FROM span_links l JOIN _slow s ON l.linked_span_id = s.span_id AND l.linked_trace_id = s.trace_id
           ),
           b AS (
              SELECT trace_id AS b_trace, span_id AS b_span, batch_id, epoch(start_time) AS a, epoch(end_time) AS b,
                  batch_size, batch_max_len, batch_min_len, batch_real_tokens, batch_padded_tokens, batch_wait_s,
                  service_instance_id
              FROM spans
              WHERE role = 'batch' AND start_time >= ? - INTERVAL 10 MINUTE AND start_time <= ?
                AND (batch_id IN (SELECT batch_id FROM _slow WHERE batch_id IS NOT NULL)
                     OR span_id IN (SELECT b_span FROM linked))
           )
           SELECT s.trace_id, s.span_id, b.* FROM _slow s JOIN b ON s.batch_id = b.batch_id
           UNION ALL BY NAME
           SELECT linked.trace_id, linked.span_id, b.* FROM linked JOIN b USING (b_trace, b_span)""",
        [lo, hi],
    )
    rows = _rows(cur)
    for row in rows:
        ev.batch_of.setdefault((row["trace_id"], row["span_id"]), row)
    if rows:
        ids = sorted({r["batch_id"] for r in rows if r.get("batch_id")})
        spans_ = sorted({(r["b_trace"], r["b_span"]) for r in rows})
        con.register("_bspans", pa.table({"t": [s[0] for s in spans_], "s": [s[1] for s in spans_]}))
        con.register("_bids", pa.table({"batch_id": pa.array(ids, type=pa.string())}))
        try:
            cur = con.execute(
                f"""WITH m AS (
                      SELECT batch_id AS key, trace_id, coalesce(shape_len, input_tokens) AS len, input_tokens, output_tokens
                      FROM spans WHERE {REQUEST_PREDICATE} AND batch_id IN (SELECT batch_id FROM _bids)
                        AND start_time >= ? - INTERVAL 10 MINUTE AND start_time <= ?
                      UNION ALL
                      SELECT l.span_id AS key, r.trace_id, coalesce(r.shape_len, r.input_tokens), r.input_tokens, r.output_tokens
                      FROM span_links l JOIN _bspans b ON l.trace_id = b.t AND l.span_id = b.s
                      JOIN spans r ON r.span_id = l.linked_span_id AND r.trace_id = l.linked_trace_id
                    )
                    SELECT key, arg_max(trace_id, input_tokens) AS longest_trace, max(input_tokens) AS longest_tokens,
                        arg_max(trace_id, output_tokens) AS longest_output_trace, max(output_tokens) AS longest_output,
                        count(*) AS members
                    FROM m GROUP BY key""",
                [lo, hi],
            )
            longest = {r["key"]: r for r in _rows(cur)}
        finally:
            con.unregister("_bspans")
            con.unregister("_bids")
        for row in ev.batch_of.values():
            info = longest.get(row.get("batch_id")) or longest.get(row.get("b_span"))
            if info:
                row["longest_trace"] = info["longest_trace"]
                row["longest_tokens"] = info["longest_tokens"]
                row["longest_output_trace"] = info["longest_output_trace"]
                row["longest_output"] = info["longest_output"]
    cur = con.execute(
        """SELECT service_name AS service, count(*) AS n,
              median(batch_wait_s) AS wait_p50, quantile_cont(batch_wait_s, 0.9) AS wait_p90,
              median(batch_padded_tokens::DOUBLE / nullif(batch_real_tokens, 0)) AS pad_p50,
              median(batch_max_len::DOUBLE / nullif(batch_min_len, 0)) AS spread_p50,
              median(batch_size) AS size_p50, median(duration_ms) AS duration_p50
           FROM spans WHERE role = 'batch' AND start_time >= ? AND start_time < ?
             AND service_name IN (SELECT DISTINCT service FROM _slow)
           GROUP BY ALL""",
        [ref_start, ref_end],
    )
    for row in _rows(cur):
        ev.batch_ref[row["service"]] = row
    # How unequal members' output lengths normally are (static batches run until
    # the longest generation ends): median of max/min output per batch.
    cur = con.execute(
        f"""SELECT service, median(mx::DOUBLE / greatest(mn, 1)) AS out_spread_p50 FROM (
              SELECT service_name AS service, batch_id, max(output_tokens) AS mx, min(output_tokens) AS mn
              FROM spans WHERE {REQUEST_PREDICATE} AND batch_id IS NOT NULL AND start_time >= ? AND start_time < ?
                AND service_name IN (SELECT DISTINCT service FROM _slow)
              GROUP BY ALL HAVING count(*) > 1)
           GROUP BY service""",
        [ref_start, ref_end],
    )
    for service, spread in cur.fetchall():
        ev.batch_ref.setdefault(service, {})["out_spread_p50"] = spread
    # Batches that ran on the slow requests' instances around them: a request
    # queued behind an abnormally long batch waited on that batch.
    cur = con.execute(
        """SELECT service_instance_id AS instance, trace_id AS b_trace, span_id AS b_span, batch_id,
              epoch(start_time) AS a, epoch(end_time) AS b, duration_ms, batch_size, batch_max_len
           FROM spans WHERE role = 'batch' AND start_time >= ? - INTERVAL 2 MINUTE AND start_time <= ?
             AND service_instance_id IN (SELECT DISTINCT instance FROM _slow)
           ORDER BY start_time""",
        [lo, hi],
    )
    for row in _rows(cur):
        ev.batches_on[row["instance"]].append(row)


def _gpu(con: duckdb.DuckDBPyConnection, ev: Evidence, lo: datetime, hi: datetime, ref_start: datetime) -> None:
    names = ", ".join(f"'{n}'" for n in GPU_METRICS)
    # Only the samples around each slow request: the requests' intervals are
    # cut into minute slots and joined on (host, gpu, slot), so a day of
    # samples is never pulled into Python for a handful of requests.
    cur = con.execute(
        f"""WITH slots AS (
              SELECT DISTINCT host_name, gpu_index, slot FROM (
                  SELECT host_name, gpu_index,
                      unnest(range(CAST(floor((tq - {GPU_PAD_S}) / 60) AS BIGINT), CAST(floor((t1 + {GPU_PAD_S}) / 60) AS BIGINT) + 1)) AS slot
                  FROM _slow)
           ),
           m AS (
              SELECT host_name, gpu_index, name, epoch(time) AS t, value, point_pid,
                  CAST(floor(epoch(time) / 60) AS BIGINT) AS slot
              FROM metrics WHERE name IN ({names})
                AND time >= ? - INTERVAL {int(GPU_PAD_S)} SECOND AND time <= ? + INTERVAL {int(GPU_PAD_S)} SECOND
                AND host_name IN (SELECT DISTINCT host_name FROM _slow)
           )
           SELECT m.host_name, m.gpu_index, m.name, m.t, m.value, m.point_pid
           FROM m SEMI JOIN slots s ON m.host_name = s.host_name AND m.slot = s.slot
                AND (s.gpu_index IS NULL OR m.gpu_index = s.gpu_index)
           ORDER BY m.t""",
        [lo, hi],
    )
    for host, gpu, name, t, value, pid in cur.fetchall():
        series = ev.gpu.setdefault((host or "", gpu), {})
        series.setdefault(name, []).append((float(t), float(value) if value is not None else float("nan"), pid))
    # What each GPU looked like in the reference period: clocks and which foreign
    # processes are a permanent part of the picture (not evidence of anything).
    cur = con.execute(
        f"""SELECT host_name, gpu_index,
              median(value) FILTER (WHERE name = 'tailscope.gpu.sm_clock') AS clock_p50,
              max(value) FILTER (WHERE name = 'tailscope.gpu.sm_clock.max') AS clock_max,
              median(value) FILTER (WHERE name = 'tailscope.gpu.utilization') AS util_p50
           FROM metrics WHERE name IN ({names}) AND time >= ? AND time <= ?
             AND host_name IN (SELECT DISTINCT host_name FROM _slow)
           GROUP BY ALL""",
        [ref_start, hi],
    )
    for row in _rows(cur):
        ev.gpu_ref[(row["host_name"] or "", row["gpu_index"])] = row
    cur = con.execute(
        """WITH w AS (
              SELECT host_name, gpu_index, point_pid, floor(epoch(time) / 30) AS slot
              FROM metrics WHERE name = 'tailscope.gpu.process.memory.used' AND time >= ? AND time <= ?
                AND host_name IN (SELECT DISTINCT host_name FROM _slow)
           ),
           tot AS (SELECT host_name, gpu_index, count(DISTINCT slot) AS slots FROM w GROUP BY ALL)
           SELECT w.host_name, w.gpu_index, w.point_pid, count(DISTINCT w.slot) / any_value(tot.slots) AS presence
           FROM w JOIN tot USING (host_name, gpu_index) WHERE w.point_pid IS NOT NULL GROUP BY ALL""",
        [ref_start, hi],
    )
    for host, gpu, pid, presence in cur.fetchall():
        ev.foreign_presence[(host or "", gpu, int(pid))] = float(presence)
    cur = con.execute(
        f"""SELECT DISTINCT host_name, process_pid FROM spans
           WHERE {REQUEST_PREDICATE} AND start_time >= ? AND start_time <= ? AND process_pid IS NOT NULL
             AND host_name IN (SELECT DISTINCT host_name FROM _slow)""",
        [lo, hi],
    )
    for host, pid in cur.fetchall():
        ev.serving_pids[host or ""].add(int(pid))
    cur = con.execute(
        """SELECT host_name, gpu_index, epoch(time) AS t, xid, body
           FROM logs WHERE event_name = 'tailscope.gpu.xid' AND time >= ? - INTERVAL 2 MINUTE AND time <= ?
             AND host_name IN (SELECT DISTINCT host_name FROM _slow)""",
        [lo, hi],
    )
    for row in _rows(cur):
        ev.xids[row["host_name"] or ""].append(row)


def _local_hour(utc_hour: int, region: str | None) -> int:
    if not region:
        return utc_hour
    try:
        from zoneinfo import ZoneInfo

        now = datetime.now(timezone.utc).replace(hour=utc_hour, minute=0, second=0, microsecond=0)
        return now.astimezone(ZoneInfo(region)).hour
    except Exception:  # an unknown zone name: fall back to UTC rather than fail the analysis
        return utc_hour


def _providers(con: duckdb.DuckDBPyConnection, ev: Evidence, hi: datetime) -> None:
    """Each provider's call duration by hour of day in its own region's zone (last 7 days)."""
    cur = con.execute(
        """SELECT coalesce(gen_ai_system, '') AS system, coalesce(server_address, '') AS address,
              any_value(provider_region) AS region, hour(start_time) AS utc_hour,
              count(*) AS n, median(duration_ms) AS p50_ms, quantile_cont(duration_ms, 0.9) AS p90_ms
           FROM spans WHERE role = 'provider_call' AND start_time >= ? - INTERVAL 7 DAY AND start_time <= ?
           GROUP BY ALL""",
        [hi, hi],
    )
    for row in _rows(cur):
        key = (row["system"], row["address"])
        base = ev.provider_base.setdefault(key, {"region": row["region"], "hours": {}, "n": 0, "sum_p50": 0.0})
        local = _local_hour(int(row["utc_hour"]), row["region"])
        base["hours"][local] = {"n": int(row["n"]), "p50_ms": float(row["p50_ms"]), "p90_ms": float(row["p90_ms"])}
        base["n"] += int(row["n"])
        base["sum_p50"] += float(row["p50_ms"]) * int(row["n"])


def _rate_spans(slow: Sequence[dict[str, Any]], ev: Evidence, refs: Sequence[tuple[datetime, datetime]], hi: datetime,
                step_s: int) -> list[tuple[float, float]]:
    """The windows the load evidence reads: each reference range up to the last slow request's end, and each
    slow request's last few windows or busy period (so incidents hours apart do not scan the hours between)."""
    top = unix(hi) + 1e-6  # the scan is inclusive of ``hi``
    spans = [(unix(a), min(unix(b), top)) for a, b in refs if a < hi]
    lowest = min([s for s, _ in spans] + [min(ev.busy_since.get((r["trace_id"], r["span_id"]), math.inf), float(r["t0"])) for r in slow])
    for r in slow:
        t0 = float(r["t0"])
        since = ev.busy_since.get((r["trace_id"], r["span_id"]), t0)
        first = min(since // step_s, t0 // step_s - 3) * step_s  # its busy period, and the last windows before it
        spans.append((max(first, lowest), min((t0 // step_s + 1) * step_s, top)))
    return spans


def _rates(con: duckdb.DuckDBPyConnection, ev: Evidence, ref_start: datetime, step_s: int,
           spans: Sequence[tuple[float, float]]) -> None:
    """Arrivals and completions per window and instance count (for Little's law).

    Read over ``spans`` (unix seconds, :func:`_rate_spans`): the reference
    ranges and each slow request's busy period (its surge is read from
    them); the normal arrival rate is the reference's (from ``ref_start``).
    """
    where, params = _ranges_sql(spans)
    cur = con.execute(
        f"""WITH r AS (
              SELECT service_name AS service, service_instance_id AS inst,
                  CAST(floor(epoch(start_time) / {step_s}) AS BIGINT) AS wa,
                  CAST(floor(epoch(end_time) / {step_s}) AS BIGINT) AS wc
              FROM spans WHERE {REQUEST_PREDICATE} AND ({where})
                AND service_name IN (SELECT DISTINCT service FROM _slow)
           ),
           a AS (SELECT service, wa AS w, count(*) AS arrivals, count(DISTINCT inst) AS instances FROM r GROUP BY ALL),
           c AS (SELECT service, wc AS w, count(*) AS completions FROM r GROUP BY ALL)
           SELECT service, w, coalesce(arrivals, 0) AS arrivals, coalesce(completions, 0) AS completions,
               coalesce(instances, 0) AS instances
           FROM a FULL JOIN c USING (service, w) ORDER BY w""",
        params,
    )
    for service, w, arrivals, completions, instances in cur.fetchall():
        ev.rates.setdefault(service, {})[int(w)] = (int(arrivals), int(completions), int(instances))
    first = int(unix(ref_start) // step_s)
    for service, rates in ev.rates.items():
        arr = sorted(v[0] for w, v in rates.items() if w >= first) or sorted(v[0] for v in rates.values())
        ev.rate_ref[service] = {"median_arrivals": arr[len(arr) // 2] if arr else 0,
                                "peak_completions": max((v[1] for v in rates.values()), default=0)}

"""Split one slow request's excess latency among the causes of spec section 9.

The excess (latency minus the class median) is a budget. Each cause claims
milliseconds only with evidence, and only from where its mechanism puts time:

* stalls with a time interval (a compile, a model load / replica start) claim
  their overlap with the request, taken out of the stages they overlapped;
  a stall that ended shortly before the request still owns the request's
  queueing excess up to the stall's length (the backlog it left), so a queue
  behind a compiling replica is blamed on the compile, not on saturation;
* KV evictions / preemptions claim recompute time (prefill, decode, re-queue);
* GPU throttling and contention claim compute-stage excess (throttling no
  more than its clock drop can explain);
* batch contention claims the batch-wait excess and head-of-line / padding
  compute time;
* provider load claims the provider-call excess;
* queue saturation claims the queueing excess no culprit explained, only when
  arrivals outran completions or surged;
* whatever is left is ``unknown``: never forced onto a cause.

Shares are claims over the excess, so they sum to at most 1.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from analyzer.evidence import THROTTLE_BITS, Evidence
from analyzer.requests import ZERO_WHEN_ABSENT
from analyzer.timeutil import from_unix, iso
from tailscope.causes import CAUSES  # noqa: F401  (re-exported: the analyzer's vocabulary)

POOLS = ("queue", "prefill", "decode", "provider_call", "model_load", "compile")
COMPUTE = ("prefill", "decode")
WARM_UP_S = 60.0
BACKLOG_FACTOR = 4.0  # a stall's backlog drains within a few stall-lengths at ρ ≲ 0.8
KV_BACKLOG_S = 60.0  # a KV squeeze that ended this long before a request (plus its queue time) still queues it
FOREIGN_PRESENCE_MAX = 0.6  # a process present most of the time is part of normal
_FLAT = {"queue": "time_in_queue_s", "prefill": "prefill_s", "decode": "decode_s"}


def _overlap(a: float, b: float, c: float, d: float) -> float:
    return max(0.0, min(b, d) - max(a, c))


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _minus(intervals: list[tuple[float, float]], taken: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out = []
    for a, b in intervals:
        pieces = [(a, b)]
        for c, d in taken:
            nxt = []
            for x, y in pieces:
                if d <= x or c >= y:
                    nxt.append((x, y))
                    continue
                if x < c:
                    nxt.append((x, c))
                if d < y:
                    nxt.append((d, y))
            pieces = nxt
        out.extend(pieces)
    return out


def _r(x: float | None, nd: int = 1) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), nd)


class Ledger:
    """The excess budget of one request and the stage pools it can be claimed from."""

    def __init__(self, excess_ms: float, pools: dict[str, float], stages: dict[str, list[tuple[float, float]]]) -> None:
        self.left = max(0.0, excess_ms)
        self.pools = dict(pools)
        self.pools["other"] = max(0.0, excess_ms - sum(pools.values()))
        self.stages = stages
        self.ms: dict[str, float] = defaultdict(float)
        self.evidence: dict[str, list[dict]] = defaultdict(list)

    def claim_interval(self, cause: str, intervals: list[tuple[float, float]], evidence: list[dict]) -> float:
        """Claim the time of ``intervals`` (unix s), out of the stages they overlap."""
        total_ms = sum(b - a for a, b in intervals) * 1000.0
        ms = min(total_ms, self.left)
        if ms <= 0:
            return 0.0
        remaining = ms
        for role, spans in self.stages.items():
            if role not in self.pools or role == "compile":
                continue
            inside = sum(_overlap(a, b, c, d) for a, b in intervals for c, d in spans) * 1000.0
            take = min(inside, self.pools[role], remaining)
            self.pools[role] -= take
            remaining -= take
        for role in ("compile", "model_load", "queue", "other", "prefill", "decode"):
            if remaining <= 0:
                break
            take = min(self.pools.get(role, 0.0), remaining)
            self.pools[role] -= take
            remaining -= take
        self._book(cause, ms, evidence)
        return ms

    def claim_pools(self, cause: str, pools: tuple[str, ...], cap_ms: float, evidence: list[dict]) -> float:
        """Claim up to ``cap_ms`` of the remaining excess in ``pools`` (in order)."""
        ms = 0.0
        for role in pools:
            take = min(self.pools.get(role, 0.0), cap_ms - ms, self.left - ms)
            if take > 0:
                self.pools[role] -= take
                ms += take
        if ms > 0:
            self._book(cause, ms, evidence)
        return ms

    def _book(self, cause: str, ms: float, evidence: list[dict]) -> None:
        self.left -= ms
        self.ms[cause] += ms
        self.evidence[cause].extend(evidence)


def components(req: dict[str, Any], children: list[dict]) -> tuple[dict[str, float | None], dict[str, list[tuple[float, float]]]]:
    """Actual stage milliseconds (child spans first, vLLM attributes otherwise) and stage intervals."""
    sums: dict[str, float] = defaultdict(float)
    stages: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for c in children:
        role = c.get("role")
        if role in POOLS:
            sums[role] += float(c.get("duration_ms") or 0.0)
            stages[role].append((float(c["a"]), float(c["b"])))
    comp: dict[str, float | None] = {}
    for p in POOLS:
        if p in sums:
            comp[p] = sums[p]
        elif p in _FLAT and req.get(_FLAT[p]) is not None:
            comp[p] = float(req[_FLAT[p]]) * 1000.0
        elif p in ZERO_WHEN_ABSENT and stages:
            comp[p] = 0.0  # its other stages are reported: this one did not happen
        else:
            comp[p] = None
    if not stages and comp.get("queue") is not None:
        # A flat vLLM span: the queue is its first part, the rest follows it.
        t0 = float(req["t0"])
        q = comp["queue"] / 1000.0
        stages["queue"].append((t0, t0 + q))
        if comp.get("prefill") is not None:
            stages["prefill"].append((t0 + q, t0 + q + comp["prefill"] / 1000.0))
    return comp, dict(stages)


def _compile_row(c: dict, overlap_ms: float, via: str) -> dict:
    return {
        "kind": "compile_span",
        "span_id": c.get("span_id"),
        "trace_id": c.get("trace_id"),
        "instance": c.get("instance"),
        "start": iso(from_unix(c["a"])),
        "duration_ms": _r(c.get("duration_ms")),
        "overlap_ms": _r(overlap_ms),
        "reason": c.get("compile_reason"),
        "shape": c.get("compile_shape"),
        "compile_kind": c.get("compile_kind"),
        "cache": c.get("compile_cache"),
        "frame": c.get("compile_frame"),
        "via": via,
    }


def _recompute_compile_row(ev: Evidence) -> Any:
    """Evidence for a compile caused by an eviction: eviction record → recompute → compile."""

    def row(c: dict, overlap_ms: float, via: str) -> dict:
        chain = ev.recompute_compile[c["span_id"]]
        return {**_compile_row(c, overlap_ms, via), "kind": "recompute_compile", "batch_id": chain.get("batch_id"),
                "batch_span_id": chain.get("batch_span_id"), **_chain(chain)}

    return row


def _load_row(c: dict, overlap_ms: float, via: str) -> dict:
    return {
        "kind": "model_load" if c.get("role") == "model_load" else "replica_ready",
        "span_id": c.get("span_id"),
        "instance": c.get("instance"),
        "start": iso(from_unix(c["a"])),
        "ready_at": iso(from_unix(c["b"])),
        "load_ms": _r(c.get("duration_ms")),
        "overlap_ms": _r(overlap_ms),
        "via": via,
    }


def attribute(req: dict[str, Any], ev: Evidence) -> dict[str, Any]:
    """Explain one slow request. ``req`` is a row of ``baseline.slow_candidates``."""
    key = (req["trace_id"], req["span_id"])
    t0, t1 = float(req["t0"]), float(req["t1"])
    latency = float(req["latency_ms"])
    expected = float(req["expected_ms"] or 0.0)
    excess = max(0.0, latency - expected)
    children = ev.children.get(key, [])
    comp, stages = components(req, children)
    pools = {}
    for p in POOLS:
        exp = req.get(f"exp_{p}_ms")
        pools[p] = max(0.0, (comp[p] or 0.0) - float(exp or 0.0)) if comp[p] is not None else 0.0
    led = Ledger(excess, pools, stages)
    has_compute = any(comp[p] is not None for p in COMPUTE)
    compute_pools: tuple[str, ...] = COMPUTE if has_compute else ("other",)
    compute_ms = sum(comp[p] or 0.0 for p in COMPUTE) if has_compute else max(0.0, latency - (comp["queue"] or 0.0))
    inst = req.get("instance")

    # --- 1. stalls on the request's path: compiles, model loads, replica start --
    claimed: list[tuple[float, float]] = []
    stall_sets = []
    compiles = {c["span_id"]: {**c, "instance": inst} for c in children if c.get("role") == "compile"}
    for c in ev.compiles.get(inst, []) if inst else []:
        compiles.setdefault(c["span_id"], c)
    loads = [{**c, "instance": inst} for c in children if c.get("role") == "model_load"]
    loads += [c for c in (ev.loads.get(inst, []) if inst else []) if c.get("span_id") not in {x.get("span_id") for x in loads} or c.get("span_id") is None]
    started = req.get("replica_started_at")
    if started is not None and float(started) > t0:
        loads.append({"span_id": None, "role": "replica.started_at", "instance": inst, "a": t0, "b": float(started),
                      "duration_ms": (float(started) - t0) * 1000.0})
    stall_sets.append(("cold_start", loads, _load_row))
    # A compile whose shape only a recompute after an eviction created is the
    # eviction's doing (no eviction, no recompute, no new shape): kv_eviction.
    recompute = {k: c for k, c in compiles.items() if k in ev.recompute_compile}
    stall_sets.append(("kv_eviction", [c for k, c in compiles.items() if k in recompute], _recompute_compile_row(ev)))
    stall_sets.append(("compile_miss", [c for k, c in compiles.items() if k not in recompute], _compile_row))
    for cause, stalls, row_fn in stall_sets:
        hits = [(max(s["a"], t0), min(s["b"], t1), s) for s in stalls if _overlap(s["a"], s["b"], t0, t1) > 0]
        if not hits:
            continue
        intervals = _minus(_union([(a, b) for a, b, _ in hits]), claimed)
        child_ids = {c.get("span_id") for c in children}
        rows = [row_fn(s, (b - a) * 1000.0, "child" if s.get("span_id") in child_ids and s.get("span_id") else "same_instance_overlap")
                for a, b, s in hits]
        if led.claim_interval(cause, intervals, rows) > 0:
            claimed = _union(claimed + intervals)

    # --- 2. the backlog a stall left in front of the request ------------------
    # A stall of d seconds delays every request queued behind it in the same
    # busy period by up to d: the stall time between the moment the replica's
    # queue was last empty (q0) and the request's arrival is what the stalls
    # may claim of its queueing, however long the backlog took to drain.
    q0 = ev.busy_since.get(key)
    if led.pools["queue"] > 0 and inst:
        if q0 is not None:
            for cause, stalls, row_fn in stall_sets:
                parts = [(max(s["a"], q0), min(s["b"], t0), s) for s in stalls if s["b"] > q0 and s["a"] < t0]
                if not parts:
                    continue
                cap = sum(b - a for a, b in _union([(a, b) for a, b, _ in parts])) * 1000.0
                rows = []
                for _, b, s in sorted(parts, key=lambda x: -x[1])[:5]:
                    row = row_fn(s, 0.0, "backlog")
                    row["gap_before_request_ms"] = _r(max(0.0, t0 - s["b"]) * 1000.0)
                    row["busy_since"] = iso(from_unix(q0))
                    rows.append(row)
                led.claim_pools(cause, ("queue",), cap, rows)
        else:
            # no queue telemetry from the replica's other requests: the stall that
            # ended last, within a few of its lengths (drained at ρ ≲ 0.8)
            recent = []
            for cause, stalls, row_fn in stall_sets:
                for s in stalls:
                    dur = s["b"] - s["a"]
                    gap = t0 - s["b"]
                    if dur > 0 and 0 <= gap <= BACKLOG_FACTOR * dur + 1.0:
                        recent.append((s["b"], cause, s, row_fn, dur, gap))
            if recent:
                _, cause, s, row_fn, dur, gap = max(recent, key=lambda x: x[0])
                row = row_fn(s, 0.0, "backlog")
                row["gap_before_request_ms"] = _r(gap * 1000.0)
                led.claim_pools(cause, ("queue",), dur * 1000.0, [row])

    # A problem on this replica explains its queueing only beyond what the other
    # replicas' queues show at the same time (a surge queues them all alike).
    queue_cap = math.inf
    if comp["queue"] is not None:
        peer = ev.peer_queue_ms(req.get("service"), inst, t0)
        if peer is not None:
            queue_cap = max(0.0, comp["queue"] - max(peer, float(req.get("exp_queue_ms") or 0.0)))

    # --- 3. KV evictions and preemptions --------------------------------------
    victim_rows = ev.evict_victim.get(req["trace_id"], [])
    preempt = int(req.get("kv_preemptions") or 0)
    other = () if has_compute else ("other",)
    if victim_rows or preempt > 0:
        rows = [_evict_row(e) for e in victim_rows[:5]]
        if preempt > 0:
            rows.append({"kind": "preemptions", "kv_preemptions": preempt})
        led.claim_pools("kv_eviction", ("prefill", "decode", "queue") + other, math.inf, rows)
    else:
        rate = ev.evict_ref.get(inst or "", 0.0)
        pressure = _kv_pressure(ev, inst, req["trace_id"], t0 - 30, t1)
        if pressure:
            # The cache is full: new requests wait for blocks, running ones recompute.
            rows = [dict(_evict_row(e), normal_rate_per_s=_r(rate, 4)) for e in pressure[:5]]
            led.claim_pools("kv_eviction", ("queue",), queue_cap, rows)
            led.claim_pools("kv_eviction", ("prefill",) + other, math.inf, rows)
        elif comp["queue"] and led.pools["queue"] > 0:
            # The squeeze ended before the request: the queue it built (fewer
            # sequences fit, recomputes) still drains in front of it, on this replica only.
            q_s = comp["queue"] / 1000.0
            since = q0 if q0 is not None else t0 - KV_BACKLOG_S - q_s
            before = _kv_pressure(ev, inst, req["trace_id"], since, t0)
            if before:
                rows = [dict(_evict_row(before[-1]), normal_rate_per_s=_r(rate, 4), evictions_before=_n_evictions(before),
                             gap_before_request_ms=_r((t0 - before[-1]["t"]) * 1000.0), via="backlog")]
                led.claim_pools("kv_eviction", ("queue",), queue_cap, rows)
        lost = _prefix_lost(req, ev.session_prev.get((req["trace_id"], req["span_id"])))
        if lost:
            led.claim_pools("kv_eviction", ("prefill",) + other, math.inf, [lost])

    # --- 4. the GPU: throttled clocks, XIDs, foreign processes ----------------
    # A degraded GPU slows the request's own compute, and the replica's queue
    # builds behind the slower service: both are the GPU's doing.
    host, gpu = req.get("host_name"), req.get("gpu_index")
    throttle = _throttle(ev, host, gpu, t0, t1)
    if throttle:
        frac, rows = throttle
        led.claim_pools("gpu_throttle", compute_pools, compute_ms * frac if frac < 1 else math.inf, rows)
        led.claim_pools("gpu_throttle", ("queue",), queue_cap, rows[:1])
    foreign = _foreign(ev, host, gpu, req.get("process_pid"), t0, t1)
    if foreign:
        led.claim_pools("gpu_contention", compute_pools, math.inf, foreign)
        led.claim_pools("gpu_contention", ("queue",), queue_cap, foreign[:1])
    if q0 is not None and q0 < t0 and led.pools["queue"] > 0:
        # The GPU was degraded while the backlog the request met was building.
        back = None if throttle else _throttle(ev, host, gpu, q0, t0)
        if back:
            led.claim_pools("gpu_throttle", ("queue",), queue_cap,
                            [dict(back[1][0], via="backlog", busy_since=iso(from_unix(q0)))])
        back_f = [] if foreign else _foreign(ev, host, gpu, req.get("process_pid"), q0, t0)
        if back_f:
            led.claim_pools("gpu_contention", ("queue",), queue_cap, [dict(back_f[0], via="backlog", busy_since=iso(from_unix(q0)))])

    # --- 5. the batch it ran in, and the batch it queued behind -----------------
    ref_b = ev.batch_ref.get(req.get("service"))
    batch = ev.batch_of.get(key)
    if batch:
        _batch(led, req, batch, ref_b, compute_pools, compute_ms, ev.recompute_batch.get(batch.get("b_span") or ""))
    if led.pools["queue"] > 0 and inst:
        _queued_behind(led, req, ev.batches_on.get(inst, []), ref_b, stages, comp, ev.recompute_batch)

    # --- 6. the upstream provider ---------------------------------------------
    if led.pools["provider_call"] > 0:
        calls = [c for c in children if c.get("role") == "provider_call"]
        rows = [_provider_row(c, ev) for c in calls[:3]]
        led.claim_pools("provider_load", ("provider_call",), math.inf, rows)

    # --- 7. warm-up right after the replica became ready ----------------------
    if started is not None and 0 <= t0 - float(started) <= WARM_UP_S:
        led.claim_pools("cold_start", ("queue",) + compute_pools, math.inf,
                        [{"kind": "warm_up", "replica_started_at": iso(from_unix(float(started))),
                          "seconds_after_ready": _r(t0 - float(started), 2)}])

    # --- 8. saturation: queueing that no culprit explains ---------------------
    # Arrivals above the service's capacity queue every replica the load is
    # spread over: where the other replicas queue far less at the same moment,
    # the rest of this one's queue is local, and saturation does not explain it
    # (up to twice the peers' queue excess is taken as the same surge, unevenly spread).
    if led.pools["queue"] > 0:
        sat = _saturation(ev, req.get("service"), t0, q0)
        if sat:
            sat_cap = math.inf
            peer = ev.peer_queue_ms(req.get("service"), inst, t0) if comp["queue"] is not None else None
            if peer is not None:
                sat_cap = 2.0 * max(0.0, peer - float(req.get("exp_queue_ms") or 0.0))
                sat = dict(sat, peer_queue_ms=_r(peer))
            led.claim_pools("queue_saturation", ("queue",) + (() if comp["queue"] is not None else ("other",)), sat_cap, [sat])

    # --- 9. a batch that waited long to fill ----------------------------------
    # Last among queue claims: a batch "waits" whenever its members queue, for
    # whatever reason; only what nothing else explains is the fill wait itself.
    if batch and led.pools["queue"] > 0:
        _batch_wait(led, batch, ref_b, has_compute)

    causes = []
    for cause, ms in sorted(led.ms.items(), key=lambda kv: -kv[1]):
        if ms <= 0:
            continue
        causes.append({"cause": cause, "share": round(ms / excess, 4) if excess else 0.0, "excess_ms": _r(ms),
                       "evidence": led.evidence[cause][:5]})
    if led.left > 0.5:
        causes.append({"cause": "unknown", "share": round(led.left / excess, 4), "excess_ms": _r(led.left), "evidence": []})
    return {
        "trace_id": req["trace_id"],
        "span_id": req["span_id"],
        "service": req.get("service"),
        "model": req.get("model") or None,
        "instance": inst,
        "start": iso(from_unix(t0)),
        "latency_ms": _r(latency),
        "expected_ms": _r(expected),
        "excess_ms": _r(excess),
        "input_tokens": req.get("input_tokens"),
        "output_tokens": req.get("output_tokens"),
        "components": {
            f"{p}_ms": {"actual": _r(comp[p]), "expected": _r(req.get(f"exp_{p}_ms"))} for p in POOLS if comp[p] is not None
        },
        "causes": causes,
    }


def _kv_pressure(ev: Evidence, inst: str | None, trace_id: str, a: float, b: float) -> list[dict]:
    """Capacity/preemption evictions of others on ``inst`` in [a, b] when they run at ≥ 3× its normal rate."""
    if not inst:
        return []
    got = [e for e in ev.evict_instance.get(inst, []) if a <= e["t"] <= b
           and e.get("kv_reason") != "prefix_lru" and e.get("victim") != trace_id]
    n = _n_evictions(got)
    expected = ev.evict_ref.get(inst, 0.0) * (b - a)
    return got if n >= 3 and n >= 3 * expected else []


def _n_evictions(rows: list[dict]) -> int:
    """Evictions/preemptions the rows stand for (an engine counter's row: its increase)."""
    return sum(int(e.get("count") or 1) for e in rows)


def _evict_row(e: dict) -> dict:
    row = {"kind": "kv_eviction", "time": iso(from_unix(e["t"])), "instance": e.get("instance"),
           "reason": e.get("kv_reason"), "blocks": e.get("kv_blocks"), "kv_usage": e.get("kv_usage"),
           "victim_trace_id": e.get("victim")}
    if e.get("source"):
        row.update(kind="preemption_counter", preemptions=e.get("count"), source=e["source"])
    return row


def _prefix_lost(req: dict, prev: dict | None) -> dict | None:
    """The session's earlier turn hit the prefix cache and this one mostly missed it."""
    if not prev or req.get("kv_cached_tokens") is None:
        return None
    prev_cached = prev.get("prev_cached") or 0
    prev_input = prev.get("prev_input") or 0
    cached = int(req["kv_cached_tokens"])
    if prev_cached > 0 and prev_input > 0 and cached < 0.5 * prev_input:
        return {"kind": "prefix_cache_drop", "session_id": req.get("session_id"), "previous_trace_id": prev.get("prev_trace"),
                "previous_cached_tokens": prev_cached, "previous_input_tokens": prev_input, "cached_tokens": cached}
    return None


def _throttle(ev: Evidence, host: str | None, gpu: int | None, t0: float, t1: float) -> tuple[float, list[dict]] | None:
    rows: list[dict] = []
    for x in ev.xids.get(host or "", []):
        if (gpu is None or x.get("gpu_index") in (None, gpu)) and t0 - 60 <= x["t"] <= t1:
            rows.append({"kind": "xid", "host": host, "gpu_index": x.get("gpu_index"), "xid": x.get("xid"),
                         "time": iso(from_unix(x["t"]))})
    if rows:
        return 1.0, rows
    clocks = [v for _, v, _ in ev.gpu_samples(host, gpu, "tailscope.gpu.sm_clock", t0, t1) if not math.isnan(v)]
    if not clocks:
        return None
    ref = ev.gpu_ref.get(ev.gpu_key(host, gpu)) or {}
    maxes = [v for _, v, _ in ev.gpu_samples(host, gpu, "tailscope.gpu.sm_clock.max", t0, t1) if not math.isnan(v)]
    clock_max = max(maxes) if maxes else ref.get("clock_max")
    normal = ref.get("clock_p50") or clock_max
    if not normal:
        return None
    low = min(clocks)
    mean = sum(clocks) / len(clocks)
    bits = 0
    reasons = ev.gpu_samples(host, gpu, "tailscope.gpu.clock_event_reasons", t0, t1)
    for _, v, _ in reasons:
        if not math.isnan(v):
            bits |= int(v)
    has_reasons = bool(reasons)
    # The clock must sit well below what this GPU normally runs at (a power-capped
    # H100 at 1410 of 1980 MHz all day is its normal, not a throttle event).
    if low >= 0.85 * normal or (has_reasons and not bits & THROTTLE_BITS):
        return None
    frac = max(0.0, 1.0 - mean / normal)
    return frac, [{"kind": "gpu_clock", "host": host, "gpu_index": gpu, "sm_clock_mhz": _r(low, 0),
                   "normal_sm_clock_mhz": _r(normal, 0), "sm_clock_max_mhz": _r(clock_max, 0),
                   "clock_event_reasons": hex(bits), "reasons": decode_reasons(bits)}]


_REASONS = {0x1: "gpu_idle", 0x2: "applications_clocks_setting", 0x4: "sw_power_cap", 0x8: "hw_slowdown",
            0x10: "sync_boost", 0x20: "sw_thermal_slowdown", 0x40: "hw_thermal_slowdown",
            0x80: "hw_power_brake_slowdown", 0x100: "display_clock_setting"}


def decode_reasons(bits: int) -> list[str]:
    """NVML clocks-event reason bits → names."""
    return [name for bit, name in _REASONS.items() if bits & bit]


def _foreign(ev: Evidence, host: str | None, gpu: int | None, pid: int | None, t0: float, t1: float) -> list[dict]:
    serving = ev.serving_pids.get(host or "", set())
    seen: dict[int, float] = {}
    key = ev.gpu_key(host, gpu)
    for _, v, p in ev.gpu_samples(host, gpu, "tailscope.gpu.process.memory.used", t0, t1):
        if p is None or p == pid or p in serving:
            continue
        if ev.foreign_presence.get((key[0], key[1], int(p)), 0.0) > FOREIGN_PRESENCE_MAX:
            continue
        seen[int(p)] = max(seen.get(int(p), 0.0), v if not math.isnan(v) else 0.0)
    return [{"kind": "foreign_process", "host": host, "gpu_index": gpu, "pid": p, "memory_bytes": int(m),
             "serving_pid": pid} for p, m in sorted(seen.items(), key=lambda kv: -kv[1])]


def _batch_row(req: dict, b: dict, ref: dict | None) -> dict:
    own = req.get("shape_len") or req.get("input_tokens")
    max_len = b.get("batch_max_len") or b.get("longest_tokens")
    real, padded = b.get("batch_real_tokens"), b.get("batch_padded_tokens")
    own_out, max_out = req.get("output_tokens"), b.get("longest_output")
    return {"kind": "batch", "batch_id": b.get("batch_id"), "batch_span_id": b.get("b_span"), "size": b.get("batch_size"),
            "max_len": max_len, "own_len": own, "longest_member_trace_id": b.get("longest_trace"),
            "own_output_tokens": own_out, "longest_output_tokens": max_out,
            "longest_output_trace_id": b.get("longest_output_trace"),
            "padded_tokens": padded, "real_tokens": real, "wait_ms": _r((b.get("batch_wait_s") or 0) * 1000.0),
            "hol_ratio": _r(max_len / own, 2) if own and max_len else None,
            "output_hol_ratio": _r(max_out / own_out, 2) if own_out and max_out else None,
            "padding_ratio": _r(padded / real, 2) if real and padded else None,
            "normal_padding_ratio": _r((ref or {}).get("pad_p50"), 2), "normal_len_spread": _r((ref or {}).get("spread_p50"), 2),
            "normal_output_spread": _r((ref or {}).get("out_spread_p50"), 2)}


def _chain(chain: dict) -> dict:
    """The eviction → recompute part of an evidence row (see ``evidence._recompute_batches``)."""
    return {"recomputed_trace_id": chain.get("recomputed_trace_id"), "recomputed_input_tokens": chain.get("recomputed_input_tokens"),
            "batch_max_len": chain.get("batch_max_len"), "longest_member_input_tokens": chain.get("longest_member_input_tokens"),
            "kv_preemptions": chain.get("kv_preemptions"),
            "evicted_at": iso(from_unix(chain["evicted_at"])) if chain.get("evicted_at") is not None else None,
            "eviction_reason": chain.get("eviction_reason")}


def _batch(led: Ledger, req: dict, b: dict, ref: dict | None, compute_pools: tuple[str, ...], compute_ms: float,
           recompute: dict | None = None) -> None:
    """Head-of-line blocking inside its own batch: longer inputs (padding) or longer generations.

    When the batch's longest length is a member being recomputed after an
    eviction (``recompute``), the extra length and padding are the eviction's.
    """
    row = _batch_row(req, b, ref)
    hol, pad, out_hol = row["hol_ratio"] or 1.0, row["padding_ratio"] or 1.0, row["output_hol_ratio"] or 1.0
    pad_ref = (ref or {}).get("pad_p50") or 1.0
    spread_ref = (ref or {}).get("spread_p50") or 1.0
    out_ref = (ref or {}).get("out_spread_p50") or 1.0
    abnormal_hol = hol >= 2.0 and hol >= 1.5 * spread_ref
    abnormal_pad = pad >= 1.3 and pad >= 1.5 * pad_ref
    abnormal_out = out_hol >= 2.0 and out_hol >= 1.5 * out_ref
    if abnormal_out:
        # A static batch decodes until its longest generation ends.
        decode_pool = ("decode",) if "decode" in compute_pools else compute_pools
        led.claim_pools("batch_contention", decode_pool, math.inf, [dict(row, via="longest_generation")])
    if abnormal_hol or abnormal_pad:
        frac = max(1.0 - 1.0 / hol if hol > 1 else 0.0, 1.0 - 1.0 / pad if pad > 1 else 0.0)
        via = "head_of_line" if abnormal_hol else "padding"
        if recompute:
            led.claim_pools("kv_eviction", compute_pools, compute_ms * frac,
                            [dict(row, **_chain(recompute), kind="recompute_batch", via=via)])
        else:
            led.claim_pools("batch_contention", compute_pools, compute_ms * frac, [dict(row, via=via)])


def _queued_behind(led: Ledger, req: dict, batches: list[dict], ref: dict | None, stages: dict, comp: dict,
                   recompute: dict[str, dict] | None = None) -> None:
    """The request queued while an abnormally long batch held its replica.

    A batch long because it recomputes an evicted request (``recompute``, by
    batch span id) holds the replica for the eviction: that wait is ``kv_eviction``.
    """
    recompute = recompute or {}
    normal = (ref or {}).get("duration_p50")
    if not normal or not batches:
        return
    t0 = float(req["t0"])
    q = stages.get("queue") or ([(t0, t0 + (comp.get("queue") or 0.0) / 1000.0)] if comp.get("queue") else [])
    if not q:
        return
    qa, qb = q[0][0], q[-1][1]
    long_ones = [b for b in batches if (b.get("duration_ms") or 0) > 3.0 * normal and _overlap(b["a"], b["b"], qa, qb) > 0]
    if not long_ones:
        return
    for cause, group in (("kv_eviction", [b for b in long_ones if b.get("b_span") in recompute]),
                         ("batch_contention", [b for b in long_ones if b.get("b_span") not in recompute])):
        if not group:
            continue
        worst = max(group, key=lambda b: b["duration_ms"])
        overlap_ms = sum(_overlap(b["a"], b["b"], qa, qb) for b in group) * 1000.0
        row = {"kind": "batch_ahead", "batch_id": worst.get("batch_id"), "batch_span_id": worst.get("b_span"),
               "duration_ms": _r(worst.get("duration_ms")), "normal_duration_ms": _r(normal),
               "size": worst.get("batch_size"), "max_len": worst.get("batch_max_len"), "via": "queued_behind"}
        if cause == "kv_eviction":
            row.update(_chain(recompute[worst["b_span"]]), kind="recompute_batch_ahead")
        led.claim_pools(cause, ("queue",), overlap_ms, [row])


def _batch_wait(led: Ledger, b: dict, ref: dict | None, has_compute: bool) -> None:
    wait = b.get("batch_wait_s")
    if wait is None:
        return
    w50 = (ref or {}).get("wait_p50") or 0.0
    w90 = (ref or {}).get("wait_p90") or 0.0
    if wait > max(2.0 * w90, w50 + 0.005):
        led.claim_pools("batch_contention", ("queue",) + (() if has_compute else ("other",)), (wait - w50) * 1000.0,
                        [{"kind": "batch_wait", "batch_id": b.get("batch_id"), "batch_span_id": b.get("b_span"),
                          "wait_ms": _r(wait * 1000.0), "normal_wait_ms": _r(w50 * 1000.0), "size": b.get("batch_size"),
                          "via": "batch_wait"}])


def _provider_row(c: dict, ev: Evidence) -> dict:
    key = (c.get("gen_ai_system") or "", c.get("server_address") or "")
    base = ev.provider_base.get(key) or {}
    hours = base.get("hours", {})
    region = c.get("provider_region") or base.get("region")
    from analyzer.evidence import _local_hour

    hour = _local_hour(int(from_unix(c["a"]).hour), region)
    h = hours.get(hour) or {}
    overall = base["sum_p50"] / base["n"] if base.get("n") else None
    return {"kind": "provider_call", "span_id": c.get("span_id"), "system": c.get("gen_ai_system"),
            "server_address": c.get("server_address"), "region": region, "local_hour": hour,
            "duration_ms": _r(c.get("duration_ms")), "hour_p50_ms": _r(h.get("p50_ms")), "overall_p50_ms": _r(overall)}


def _saturation(ev: Evidence, service: str | None, t0: float, since: float | None = None) -> dict | None:
    """Load evidence for the queue a request met: arrivals surged, or outran completions.

    The queue a request meets was built over the last few windows (a surge
    that just ended still leaves its backlog draining), or, when its
    replica's busy period is known (``since``), over that whole period: a
    surge that ended long ago can leave a backlog that drains for as long
    again. Over a long period the surge is judged on the mean arrival rate
    (any long stretch has some busy minute).
    """
    rates = ev.rates.get(service or "")
    if not rates:
        return None
    step = ev.step_s
    w = int(t0 // step)
    recent = [rates.get(i, (0, 0, 0)) for i in range(w - 3, w + 1)]
    arrivals = sum(v[0] for v in recent)
    completions = sum(v[1] for v in recent)
    ref = ev.rate_ref.get(service or "") or {}
    ref_arr = ref.get("median_arrivals", 0)
    peak_done = ref.get("peak_completions", 0)
    now = rates.get(w, (0, 0, 0))
    surge = ref_arr > 0 and max(v[0] for v in recent) >= 1.2 * ref_arr
    building = arrivals > 1.05 * completions and arrivals - completions >= 3
    busy_rate = None
    if since is not None and since < (w - 3) * step:
        period = [rates.get(i, (0, 0, 0))[0] for i in range(int(since // step), w + 1)]
        busy_rate = sum(period) / len(period)
        surge = surge or (ref_arr > 0 and busy_rate >= 1.2 * ref_arr)
    if not (surge or building):
        return None
    return {"kind": "load", "window_start": iso(from_unix(w * step)), "arrival_rate_per_s": _r(now[0] / step, 2),
            "completion_rate_per_s": _r(now[1] / step, 2), "normal_arrival_rate_per_s": _r(ref_arr / step, 2),
            "peak_completion_rate_per_s": _r(peak_done / step, 2), "instances": now[2],
            "utilisation": _r(now[0] / peak_done, 2) if peak_done else None,
            "backlog_growth": int(arrivals - completions),
            **({"busy_since": iso(from_unix(since)), "busy_arrival_rate_per_s": _r(busy_rate / step, 2)} if busy_rate is not None else {})}

"""A concrete fix per cause, with the numbers that make it actionable.

Each function reads the incident's own data (length distribution, compile
count, arrival and completion rates, the provider's hour profile, …) and
returns ``{"summary": str, **numbers}``; the summary is what a person reads,
the numbers are what the dashboard and alerts can show or compare.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from typing import Any

import duckdb

from analyzer.attribute import decode_reasons
from analyzer.buckets import optimal_buckets
from analyzer.evidence import Evidence
from analyzer.requests import REQUEST_PREDICATE
from analyzer.timeutil import unix

TARGET_UTILISATION = 0.7  # the knee: M/M/c queueing delay climbs steeply past ~70-80 %
BUCKET_CHOICES = (4, 8, 16)


def _lengths(con: duckdb.DuckDBPyConnection, service: str, start: datetime, end: datetime) -> tuple[list[int], list[int], dict]:
    """Computed lengths (prompt minus prefix-cache hits: what the kernels pad) and today's padding.

    ``tailscope.shape.len`` is the length the kernels ran with, so it is compared
    with the tokens actually computed, not the whole prompt: with a prefix cache
    the padded shape can be shorter than the prompt.
    """
    computed = "greatest(input_tokens - coalesce(kv_cached_tokens, 0), 1)"
    rows = con.execute(
        f"""SELECT {computed} AS len, count(*) FROM spans
            WHERE {REQUEST_PREDICATE} AND service_name = ? AND start_time >= ? AND start_time < ? AND input_tokens > 0
            GROUP BY 1 ORDER BY 1""",
        [service, start, end],
    ).fetchall()
    cur = con.execute(
        f"""SELECT sum({computed}), sum(shape_len), count(DISTINCT shape_len) FROM spans
            WHERE {REQUEST_PREDICATE} AND service_name = ? AND start_time >= ? AND start_time < ?
              AND shape_len IS NOT NULL AND input_tokens > 0""",
        [service, start, end],
    ).fetchall()[0]
    return [int(r[0]) for r in rows], [int(r[1]) for r in rows], {"real": cur[0], "padded": cur[1], "shapes": cur[2]}


def compile_miss(con: duckdb.DuckDBPyConnection, service: str, start: datetime, end: datetime, rows: list[dict]) -> dict[str, Any]:
    ctx_start = start - timedelta(hours=1)
    lengths, counts, now = _lengths(con, service, ctx_start, end)
    compiles = con.execute(
        """SELECT count(*), count(DISTINCT compile_shape), sum(duration_ms) FROM spans
           WHERE role = 'compile' AND start_time >= ? AND start_time < ?
             AND service_instance_id IN (SELECT DISTINCT service_instance_id FROM spans
                 WHERE service_name = ? AND start_time >= ? AND start_time < ?)""",
        [start, end, service, start, end],
    ).fetchall()[0]
    n_compiles, n_shapes, stall_ms = int(compiles[0] or 0), int(compiles[1] or 0), float(compiles[2] or 0.0)
    real = sum(l * c for l, c in zip(lengths, counts))
    options = []
    for k in BUCKET_CHOICES:
        if not lengths:
            break
        bounds, padded = optimal_buckets(lengths, counts, k)
        options.append({"buckets": bounds, "compiles": len(bounds),
                        "padding_overhead": round(padded / real - 1.0, 4) if real else None})
        if len(bounds) < k:
            break
    current_pad = (now["padded"] / now["real"] - 1.0) if now.get("real") else None
    if current_pad is not None and current_pad < 0:
        current_pad = None  # shapes shorter than the computed tokens: shape.len means something else here
    best = options[1] if len(options) > 1 else (options[0] if options else None)
    if best:
        summary = (
            f"{n_compiles} compiles ({n_shapes} distinct shapes, {stall_ms / 1000:.1f} s of stall) in the incident. "
            f"Pad input lengths to buckets {best['buckets']}: {best['compiles']} compiled shapes in all, "
            f"{best['padding_overhead'] * 100:.0f}% extra padded tokens"
            + (f" (now {current_pad * 100:.0f}%)" if current_pad is not None else "")
            + "; or mark the length dimension dynamic (torch._dynamo.mark_dynamic(x, 1)) and turn on the "
            "persistent compile cache so restarts hit it; warm each bucket up before taking traffic."
        )
    else:
        summary = (f"{n_compiles} compiles in the incident: bound the distinct input shapes (bucketing or "
                   "torch._dynamo.mark_dynamic) and use a persistent compile cache.")
    return {"summary": summary, "compiles": n_compiles, "distinct_shapes": n_shapes, "compile_stall_ms": round(stall_ms, 1),
            "bucket_options": options, "current_padding_overhead": round(current_pad, 4) if current_pad is not None else None}


def batch_contention(con: duckdb.DuckDBPyConnection, service: str, start: datetime, end: datetime, rows: list[dict], ev: Evidence) -> dict[str, Any]:
    lengths, counts, _ = _lengths(con, service, start - timedelta(hours=1), end)
    bounds = optimal_buckets(lengths, counts, 4)[0] if lengths else []
    ref = ev.batch_ref.get(service) or {}
    hol = [r.get("hol_ratio") for r in rows if r.get("hol_ratio")]
    waits = [r.get("wait_ms") for r in rows if r.get("wait_ms") is not None]
    size = ref.get("size_p50")
    normal_wait = (ref.get("wait_p50") or 0.0) * 1000.0
    parts = []
    if bounds:
        parts.append(f"batch by length bucket {bounds} so no short request shares a batch with one many times its length"
                     + (f" (slow requests ran beside members up to {max(hol):.0f}x their length)" if hol else ""))
    if waits and max(waits) > normal_wait:
        parts.append(f"cap the batch fill timeout near the normal {normal_wait:.0f} ms (slow requests waited up to {max(waits):.0f} ms)")
    if size:
        parts.append(f"keep the batch size near its usual {size:.0f} or flush early when a long member arrives")
    return {"summary": "; ".join(parts) or "separate long and short requests into different batches.",
            "length_buckets": bounds, "max_hol_ratio": max(hol) if hol else None,
            "max_wait_ms": max(waits) if waits else None, "normal_wait_ms": round(normal_wait, 1),
            "normal_batch_size": size}


def queue_saturation(service: str, start: datetime, end: datetime, ev: Evidence) -> dict[str, Any]:
    rates = ev.rates.get(service) or {}
    step = ev.step_s
    a, b = int(unix(start) // step), int(unix(end) // step)
    inside = [rates[w] for w in range(a, b + 1) if w in rates]
    arrivals = max((v[0] for v in inside), default=0) / step
    instances = max((v[2] for v in inside), default=0) or max((v[2] for v in rates.values()), default=1) or 1
    peak_done = max((v[1] for v in rates.values()), default=0) / step
    per_replica = peak_done / instances if instances else 0.0
    if per_replica <= 0:
        return {"summary": "arrivals outran completions; add capacity or shed load.", "arrival_rate_per_s": round(arrivals, 2)}
    rho = arrivals / (per_replica * instances)
    need = max(instances, math.ceil(arrivals / (TARGET_UTILISATION * per_replica)))
    return {
        "summary": (f"arrivals peaked at {arrivals:.1f} req/s against a measured capacity of about {per_replica:.1f} req/s "
                    f"per replica x {instances} replicas (utilisation {rho:.0%}); by Little's law {need} replicas keep "
                    f"utilisation at or below {TARGET_UTILISATION:.0%}, or shed/queue-limit low-priority traffic at the door."),
        "arrival_rate_per_s": round(arrivals, 2), "capacity_per_replica_per_s": round(per_replica, 2),
        "replicas": instances, "utilisation": round(rho, 3), "replicas_needed": need, "target_utilisation": TARGET_UTILISATION,
    }


def provider_load(rows: list[dict], ev: Evidence) -> dict[str, Any]:
    if not rows:
        return {"summary": "the upstream provider was slow: hedge or fail over."}
    key = (rows[0].get("system") or "", rows[0].get("server_address") or "")
    base = ev.provider_base.get(key) or {}
    hours = base.get("hours", {})
    overall = base["sum_p50"] / base["n"] if base.get("n") else None
    peak = sorted(hours.items(), key=lambda kv: -kv[1]["p50_ms"])[:3]
    calm = sorted(hours.items(), key=lambda kv: kv[1]["p50_ms"])[:1]
    took = [r["duration_ms"] for r in rows if r.get("duration_ms") is not None]
    mean_took = sum(took) / len(took) if took else None
    hedge_at = calm[0][1]["p90_ms"] if calm else None
    gain = (mean_took - hedge_at) if mean_took and hedge_at else None
    region = base.get("region") or rows[0].get("region") or "UTC"
    peak_txt = ", ".join(f"{h:02d}:00" for h, _ in peak)
    summary = (f"{key[0] or 'the provider'} ({key[1]}) is slowest at {peak_txt} {region} time"
               + (f" (p50 {peak[0][1]['p50_ms']:.0f} ms vs {overall:.0f} ms overall)" if peak and overall else "")
               + (f"; hedging a second request after {hedge_at:.0f} ms, or moving this traffic to another region/provider "
                  f"in those hours, would save about {gain:.0f} ms per affected call" if gain and gain > 0 else "")
               + ".")
    return {"summary": summary, "provider": key[0], "server_address": key[1], "region": region,
            "peak_hours_local": [h for h, _ in peak], "overall_p50_ms": round(overall, 1) if overall else None,
            "hedge_after_ms": round(hedge_at, 1) if hedge_at else None, "expected_gain_ms": round(gain, 1) if gain else None}


def kv_eviction(rows: list[dict]) -> dict[str, Any]:
    evictions = [r for r in rows if r.get("kind") == "kv_eviction"]
    usage = [r["kv_usage"] for r in evictions if r.get("kv_usage") is not None]
    preempt = sum(int(r.get("kv_preemptions") or 0) for r in rows if r.get("kind") == "preemptions")
    preempt += sum(int(r.get("preemptions") or 0) for r in rows if r.get("kind") == "preemption_counter")  # engine counters
    drops = [r for r in rows if r.get("kind") == "prefix_cache_drop"]
    summary = (f"{len(evictions)} KV evictions" + (f" at KV usage up to {max(usage):.0%}" if usage else "")
               + (f", {preempt} preemptions" if preempt else "") + (f", {len(drops)} session prefix-cache misses" if drops else "")
               + ": give the KV cache more memory (e.g. vLLM --gpu-memory-utilization up, or a smaller max-model-len), "
               "lower max-num-seqs so running sequences fit, and keep prefix-cache headroom for live sessions.")
    return {"summary": summary, "evictions": len(evictions), "max_kv_usage": max(usage) if usage else None,
            "preemptions": preempt, "prefix_cache_misses": len(drops)}


def gpu_throttle(rows: list[dict]) -> dict[str, Any]:
    bits = 0
    low = None
    for r in rows:
        if r.get("clock_event_reasons"):
            bits |= int(r["clock_event_reasons"], 16)
        if r.get("sm_clock_mhz") is not None:
            low = r["sm_clock_mhz"] if low is None else min(low, r["sm_clock_mhz"])
    xids = sorted({r.get("xid") for r in rows if r.get("kind") == "xid"} - {None})
    reasons = decode_reasons(bits)
    normal = next((r.get("normal_sm_clock_mhz") for r in rows if r.get("normal_sm_clock_mhz")), None)
    gpus = sorted({f"{r.get('host')}/gpu{r.get('gpu_index')}" for r in rows})
    checks = []
    if bits & 0x4 or bits & 0x80:
        checks.append("the power cap and power delivery (nvidia-smi -q -d POWER)")
    if bits & 0x20 or bits & 0x40:
        checks.append("cooling: inlet temperature, fans, airflow (nvidia-smi -q -d TEMPERATURE)")
    if bits & 0x8:
        checks.append("hardware slowdown: PSU / thermal alarms on the node")
    if xids:
        checks.append(f"XID {', '.join(str(x) for x in xids)} in the kernel log; drain the GPU if it repeats")
    summary = (f"{', '.join(gpus)} ran at {low:.0f} MHz" if low else f"{', '.join(gpus)} was throttled") \
        + (f" instead of about {normal:.0f} MHz" if normal else "") \
        + (f" ({', '.join(reasons)})" if reasons else "") + "; check " + ("; ".join(checks) or "power and cooling") \
        + ", and route traffic away from the GPU while it is degraded."
    return {"summary": summary, "gpus": gpus, "reasons": reasons, "xids": xids, "min_sm_clock_mhz": low,
            "normal_sm_clock_mhz": normal}


def gpu_contention(rows: list[dict]) -> dict[str, Any]:
    procs: dict[tuple[str, int], int] = {}
    for r in rows:
        if r.get("kind") == "foreign_process":
            key = (f"{r.get('host')}/gpu{r.get('gpu_index')}", int(r["pid"]))
            procs[key] = max(procs.get(key, 0), int(r.get("memory_bytes") or 0))
    listing = ", ".join(f"pid {pid} on {gpu} ({mem / 2**30:.1f} GiB)" for (gpu, pid), mem in procs.items())
    return {"summary": f"another process shared the serving GPU: {listing or 'foreign process'}; move it off, or isolate "
                       "with MIG partitions / MPS limits, or schedule batch jobs away from serving GPUs.",
            "processes": [{"gpu": g, "pid": p, "memory_bytes": m} for (g, p), m in procs.items()]}


def cold_start(rows: list[dict]) -> dict[str, Any]:
    loads = [r.get("load_ms") for r in rows if r.get("load_ms")]
    insts = sorted({r.get("instance") for r in rows if r.get("instance")})
    longest = max(loads) / 1000.0 if loads else None
    return {"summary": (f"requests reached {', '.join(insts) or 'a replica'} while it was starting"
                        + (f" (load up to {longest:.1f} s)" if longest else "")
                        + ": mark replicas ready only after weights are loaded and warm-up (compile of every bucket) "
                          "is done, keep a minimum number of warm replicas, and use a persistent compile cache."),
            "instances": insts, "max_load_s": round(longest, 2) if longest else None}

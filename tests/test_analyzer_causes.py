"""One test per cause: inject the mechanism into realistic traffic, expect the right diagnosis.

Each world is 30 minutes of Poisson traffic with heavy-tailed noise on a few
replicas, written into a real DuckDB store; the cause is injected as a
mechanism (not as a label) between minutes 16 and 20. The analyzer must find
an incident there, rank the injected cause first with its evidence, and give
most affected slow requests that cause as their top cause.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from analyzer.service import Analyzer
from analyzer_world import Replica, World, by_cause, per_request_accuracy, replicas, top_cause
from collector.store import Store

A, B = 16 * 60, 20 * 60  # the injection window, seconds


def analyse(world: World, tmp_path: Path, flat: bool = False, **cfg: Any) -> tuple[Analyzer, list[dict], list[dict]]:
    world.render(flat=flat)
    store = Store(tmp_path / "t.duckdb")
    world.write(store)
    from tailscope.config import load

    analyzer = Analyzer(store, load(cfg, environ={}))
    incidents = analyzer.incidents()["incidents"]
    slow = analyzer.slow_requests(limit=3000)["requests"]
    return analyzer, incidents, slow


def the_incident(incidents: list[dict], service: str = "chat-api") -> dict:
    mine = [i for i in incidents if i["service"] == service and i["start"] < "2026-11-20T12:21" and i["end"] > "2026-11-20T12:16"]
    assert mine, f"no incident found in the injection window: {[(i['service'], i['start'], i['end']) for i in incidents]}"
    return max(mine, key=lambda i: i["slow_requests"])


def assert_diagnosis(world: World, incidents: list[dict], slow: list[dict], cause: str, service: str = "chat-api",
                     min_accuracy: float = 0.9) -> dict:
    inc = the_incident(incidents, service)
    assert inc["causes"][0]["cause"] == cause, [(c["cause"], c["share"]) for c in inc["causes"]]
    assert sum(c["share"] for c in inc["causes"]) <= 1.0 + 1e-6
    top = inc["causes"][0]
    assert top["evidence"], "the top cause carries no evidence rows"
    assert top["recommendation"]["summary"]
    acc, n = per_request_accuracy(world, slow, cause)
    assert n >= 10, f"only {n} injected requests were flagged slow ({by_cause(slow)})"
    assert acc >= min_accuracy, f"top-1 accuracy {acc:.2f} over {n} affected slow requests ({by_cause(slow)})"
    return inc


def base_world(seed: int, n: int = 4, rps: float = 6.0, **kw: Any) -> tuple[World, list[Replica]]:
    w = World(seed=seed)
    reps = replicas(n)
    w.steady("chat-api", reps, 30, rps, **kw)
    for r in reps:
        w.gpu_series(r.host, r.gpu, r.pid, 0, 30 * 60, every_s=5)
    return w, reps


def test_compile_miss(tmp_path: Path) -> None:
    w, reps = base_world(1)
    for k in range(12):
        w.compile_stall(reps[1], A + k * 20, 3.0, 700 + k)
    _, incidents, slow = analyse(w, tmp_path)
    inc = assert_diagnosis(w, incidents, slow, "compile_miss")
    ev = inc["causes"][0]["evidence"][0]
    assert ev["kind"] == "compile_span" and "size mismatch" in ev["reason"] and ev["shape"].startswith("[1,")
    rec = inc["causes"][0]["recommendation"]
    assert rec["compiles"] == 12 and rec["bucket_options"][0]["compiles"] <= 4
    # The requests that only queued behind the compiling replica are blamed on the compile, not on saturation.
    backlog = [r for r in slow if w.affected.get(r["trace_id"]) == "compile_miss"
               and any(e.get("via") == "backlog" for c in r["causes"] for e in c["evidence"])]
    assert backlog and all(top_cause(r) == "compile_miss" for r in backlog)
    assert any(c["dimension"] == "instance" and c["value"] == "replica-1" for c in inc["contrast"])


def test_kv_eviction(tmp_path: Path) -> None:
    w, reps = base_world(2)
    rng = np.random.default_rng(5)
    for r in w.requests:
        if A <= r.t < B and rng.random() < 0.15:
            r.queue_ms += float(rng.uniform(500, 1500))
            r.prefill_ms += 2 * r.prefill_ms + 300
            r.decode_ms *= 1.3
            r.preemptions = 1
            w.log(time=r.t + r.queue_ms / 2000, event_name="tailscope.kv.eviction", service_name=r.service,
                  service_instance_id=r.replica.instance, host_name=r.replica.host, kv_blocks=16, kv_reason="preemption",
                  kv_victim_trace_id=r.trace_id, kv_usage=0.97)
            w.mark([r], "kv_eviction")
    _, incidents, slow = analyse(w, tmp_path)
    inc = assert_diagnosis(w, incidents, slow, "kv_eviction")
    kinds = {e["kind"] for e in inc["causes"][0]["evidence"]}
    assert kinds & {"kv_eviction", "preemptions"}
    assert inc["causes"][0]["recommendation"]["evictions"] >= 1


def _batches(w: World, mix_from: float, mix_to: float) -> None:
    """Batches of 4 per replica: by length bucket normally, mixed lengths in [mix_from, mix_to)."""
    by_rep: dict[str, list] = {}
    for r in sorted(w.requests, key=lambda r: r.t):
        mixing = mix_from <= r.t < mix_to
        key = r.replica.instance + ("" if mixing else f"/{r.shape_len}")
        by_rep.setdefault(key, []).append(r)
        group = by_rep[key]
        if len(group) < 4:
            continue
        by_rep[key] = []
        lens = [m.input_tokens for m in group]
        bid = f"b{w._n}"
        w._n += 1
        for m in group:
            m.batch_id = bid
            if mixing and max(lens) >= 4 * m.input_tokens:
                m.prefill_ms = 5 + 0.04 * max(lens) * 4
                m.decode_ms *= 1 + 0.8 * np.log2(max(lens) / m.input_tokens)
                w.mark([m], "batch_contention")
        first = group[0]
        bs_t = max(m.t for m in group)
        w.spans.append({"trace_id": f"{w._n:032x}", "span_id": w._span_id(), "parent_span_id": None, "name": "batch",
                        "kind": "INTERNAL", "start_time": w.ts(bs_t), "end_time": w.ts(bs_t + 0.05), "duration_ms": 50.0,
                        "service_name": first.service, "service_instance_id": first.replica.instance,
                        "host_name": first.replica.host, "process_pid": first.replica.pid, "role": "batch", "batch_id": bid,
                        "batch_size": 4, "batch_max_len": max(lens), "batch_min_len": min(lens),
                        "batch_real_tokens": sum(lens), "batch_padded_tokens": 4 * max(lens), "batch_wait_s": 0.004})


def test_batch_contention(tmp_path: Path) -> None:
    w, reps = base_world(3)
    _batches(w, A, B)
    _, incidents, slow = analyse(w, tmp_path)
    inc = assert_diagnosis(w, incidents, slow, "batch_contention", min_accuracy=0.85)
    ev = inc["causes"][0]["evidence"][0]
    assert ev["kind"] == "batch" and ev["hol_ratio"] >= 4 and ev["longest_member_trace_id"]
    assert inc["causes"][0]["recommendation"]["length_buckets"]


def test_queue_saturation(tmp_path: Path) -> None:
    w, reps = base_world(4)
    surge = w.steady("chat-api", reps, (B - A) / 60, 5.0, start_s=A)
    for r in w.requests:
        if A <= r.t < B + 60:
            # the backlog grows while arrivals outrun capacity, then drains
            backlog = (r.t - A) / (B - A) * 4000 if r.t < B else 4000 * (1 - (r.t - B) / 60)
            r.queue_ms += backlog
            if backlog > 300:
                w.mark([r], "queue_saturation")
    assert surge
    _, incidents, slow = analyse(w, tmp_path)
    inc = assert_diagnosis(w, incidents, slow, "queue_saturation")
    rec = inc["causes"][0]["recommendation"]
    assert rec["replicas_needed"] > rec["replicas"] and rec["utilisation"] > 0.7


def test_provider_load(tmp_path: Path) -> None:
    w = World(seed=5)
    reps = replicas(3)
    w.steady("agent-api", reps, 30, 6, provider=("openai", "api.openai.com", "America/New_York"))
    rng = np.random.default_rng(3)
    for r in w.requests:
        if A <= r.t < B and rng.random() < 0.6:
            r.provider_ms *= 6
            w.mark([r], "provider_load")
    _, incidents, slow = analyse(w, tmp_path)
    inc = assert_diagnosis(w, incidents, slow, "provider_load", service="agent-api")
    ev = inc["causes"][0]["evidence"][0]
    assert ev["system"] == "openai" and ev["region"] == "America/New_York"
    assert inc["causes"][0]["recommendation"]["peak_hours_local"]


def test_gpu_throttle_not_fooled_by_normal_power_cap(tmp_path: Path) -> None:
    # Every GPU runs power-capped (0x4 at 1410 of 1980 MHz) all the time: that is normal.
    w, reps = base_world(6)
    bad = reps[2]
    w.set_metric(bad.host, bad.gpu, "tailscope.gpu.sm_clock", A, B, 450)
    w.set_metric(bad.host, bad.gpu, "tailscope.gpu.clock_event_reasons", A, B, 0x40 | 0x4)
    for r in w.on(bad, A, B):
        r.prefill_ms *= 1410 / 450
        r.decode_ms *= 1410 / 450
        w.mark([r], "gpu_throttle")
    _, incidents, slow = analyse(w, tmp_path)
    inc = assert_diagnosis(w, incidents, slow, "gpu_throttle", min_accuracy=0.85)
    rec = inc["causes"][0]["recommendation"]
    assert "hw_thermal_slowdown" in rec["reasons"] and rec["min_sm_clock_mhz"] == 450
    # the healthy, power-capped GPUs are never blamed
    assert not [r for r in slow if top_cause(r) == "gpu_throttle" and r["instance"] != bad.instance]


def test_gpu_contention(tmp_path: Path) -> None:
    w, reps = base_world(7)
    bad = reps[3]
    for t in np.arange(A, B, 5.0):
        w.metrics.append({"time": w.ts(float(t)), "name": "tailscope.gpu.process.memory.used", "type": "gauge",
                          "value": 20e9, "host_name": bad.host, "gpu_index": bad.gpu, "point_pid": 4242})
    for r in w.on(bad, A, B):
        r.prefill_ms *= 3.2
        r.decode_ms *= 3.2
        w.mark([r], "gpu_contention")
    _, incidents, slow = analyse(w, tmp_path)
    inc = assert_diagnosis(w, incidents, slow, "gpu_contention", min_accuracy=0.85)
    assert any(e.get("pid") == 4242 for e in inc["causes"][0]["evidence"])


def test_cold_start(tmp_path: Path) -> None:
    w, reps = base_world(8)
    new = Replica("replica-new", "node-9", 0, 5000)
    w.gpu_series(new.host, new.gpu, new.pid, A, 30 * 60, every_s=5)
    ready = A + 25.0
    w.log(time=ready, event_name="tailscope.replica.ready", service_name="chat-api", service_instance_id=new.instance,
          host_name=new.host, load_seconds=25.0)
    for r in w.steady("chat-api", [new], (30 * 60 - A) / 60, 2.0, start_s=A):
        r.started_at = (w.ts(ready) - w.ts(0)).total_seconds() + 1795176000.0  # unix s of `ready`
        if r.t < ready:
            r.queue_ms += (ready - r.t) * 1000.0
            w.mark([r], "cold_start")
        elif r.t < ready + 10:
            r.queue_ms += (ready + 10 - r.t) * 300.0
            w.mark([r], "cold_start")
    _, incidents, slow = analyse(w, tmp_path)
    inc = assert_diagnosis(w, incidents, slow, "cold_start", min_accuracy=0.85)
    assert "replica-new" in inc["causes"][0]["recommendation"]["instances"]


def test_mixed_compile_and_throttle(tmp_path: Path) -> None:
    w, reps = base_world(9)
    for k in range(12):
        w.compile_stall(reps[1], A + k * 20, 3.0, 900 + k)
    bad = reps[2]
    w.set_metric(bad.host, bad.gpu, "tailscope.gpu.sm_clock", A, B, 450)
    w.set_metric(bad.host, bad.gpu, "tailscope.gpu.clock_event_reasons", A, B, 0x20)
    for r in w.on(bad, A, B):
        r.prefill_ms *= 1410 / 450
        r.decode_ms *= 1410 / 450
        w.mark([r], "gpu_throttle")
    _, incidents, slow = analyse(w, tmp_path)
    # two problems on two replicas at once: two incidents side by side, each with its own top cause
    mine = [i for i in incidents if i["service"] == "chat-api" and i["start"] < "2026-11-20T12:21" and i["end"] > "2026-11-20T12:16"]
    assert {i["causes"][0]["cause"] for i in mine} == {"compile_miss", "gpu_throttle"}, \
        [(i["start"], i["end"], [c["cause"] for c in i["causes"]]) for i in mine]
    hits = [r for r in slow if w.affected.get(r["trace_id"])]
    good = sum(1 for r in hits if top_cause(r) == w.affected[r["trace_id"]])
    assert len(hits) >= 20 and good / len(hits) >= 0.8, (good, len(hits), by_cause(hits))


def test_vllm_flat_spans_gpu_throttle(tmp_path: Path) -> None:
    # vLLM's llm_request spans: no role, no stage children, no GPU index; one GPU per host.
    w = World(seed=10)
    reps = [Replica(f"vllm-{i}", f"gpu-node-{i}", 0, 2000 + i) for i in range(4)]
    w.steady("chat-api", reps, 30, 6)
    for r in reps:
        w.gpu_series(r.host, r.gpu, r.pid, 0, 30 * 60, every_s=5)
    bad = reps[0]
    w.set_metric(bad.host, 0, "tailscope.gpu.sm_clock", A, B, 450)
    w.set_metric(bad.host, 0, "tailscope.gpu.clock_event_reasons", A, B, 0x8)
    for r in w.on(bad, A, B):
        r.prefill_ms *= 1410 / 450
        r.decode_ms *= 1410 / 450
        w.mark([r], "gpu_throttle")
    for r in w.requests:
        r.replica = Replica(r.replica.instance, r.replica.host, None, r.replica.pid)  # type: ignore[arg-type]
    _, incidents, slow = analyse(w, tmp_path, flat=True)
    inc = assert_diagnosis(w, incidents, slow, "gpu_throttle", min_accuracy=0.85)
    some = next(r for r in slow if w.affected.get(r["trace_id"]))
    assert set(some["components"]) >= {"queue_ms", "prefill_ms", "decode_ms"}


def test_vllm_flat_spans_queue_saturation(tmp_path: Path) -> None:
    w, reps = base_world(11)
    w.steady("chat-api", reps, (B - A) / 60, 5.0, start_s=A)
    for r in w.requests:
        if A <= r.t < B:
            r.queue_ms += (r.t - A) / (B - A) * 4000
            if (r.t - A) / (B - A) * 4000 > 300:
                w.mark([r], "queue_saturation")
    _, incidents, slow = analyse(w, tmp_path, flat=True)
    assert_diagnosis(w, incidents, slow, "queue_saturation")


def _recompute_compile(w: World, rep: Replica, at: float, seconds: float) -> Any:
    """A preempted request comes back with prompt + generated tokens; its recompute batch's new shape recompiles.

    Telemetry as a serving engine leaves it: an eviction record naming the
    victim (``kv_preemptions = 1`` on its span), a batch span whose
    ``batch_max_len`` (the victim's prompt plus what it had generated) exceeds
    every member's own input, and the compile span as that batch's child.
    """
    victim = max(w.on(rep, at - 30, at - 5), key=lambda r: r.t)
    generated = victim.output_tokens // 2 + 64
    recompute_len = victim.input_tokens + generated
    w.log(time=at - 3.0, event_name="tailscope.kv.eviction", service_name=victim.service,
          service_instance_id=rep.instance, host_name=rep.host, kv_blocks=24, kv_reason="preemption",
          kv_victim_trace_id=victim.trace_id, kv_usage=0.98)
    victim.preemptions = 1
    # re-queued until the recompute batch, which first compiles, then prefills the longer sequence
    victim.queue_ms += max(0.0, (at - victim.end) * 1000.0)
    victim.prefill_ms += seconds * 1000.0 + 0.04 * recompute_len
    w.compile_stall(rep, at, seconds, recompute_len)
    genuine_row = w.spans.pop()  # the same stall, re-parented below under the recompute batch
    members = [victim] + [r for r in w.on(rep, at, at + seconds) if r.input_tokens < recompute_len][:3]
    b_trace, b_span = f"{w.seed:08x}{w._n + 1:024x}", w._span_id()
    w._n += 1
    lens = [recompute_len] + [m.input_tokens for m in members[1:]]
    w.spans.append({"trace_id": b_trace, "span_id": b_span, "parent_span_id": None, "name": "batch", "kind": "INTERNAL",
                    "start_time": w.ts(at), "end_time": w.ts(at + seconds + 0.2), "duration_ms": (seconds + 0.2) * 1000.0,
                    "service_name": victim.service, "service_instance_id": rep.instance, "host_name": rep.host,
                    "process_pid": rep.pid, "role": "batch", "batch_id": f"rb{b_span}", "batch_size": len(members),
                    "batch_max_len": max(lens), "batch_min_len": min(lens), "batch_real_tokens": sum(lens),
                    "batch_padded_tokens": int(sum(lens) * 1.1), "batch_wait_s": 0.004})
    for m in members:
        w.links.append({"trace_id": b_trace, "span_id": b_span, "linked_trace_id": m.trace_id, "linked_span_id": m.span_id})
    row = dict(genuine_row, trace_id=b_trace, parent_span_id=b_span)
    w.spans.append(row)
    for r in w.requests:
        if getattr(r, "_affected", None) == "compile_miss":
            r._affected = "kv_eviction"  # type: ignore[attr-defined]
    w.mark([victim], "kv_eviction")
    return victim


def test_kv_eviction_recompute_compile(tmp_path: Path) -> None:
    """Eviction → recompute with a longer sequence → a new shape compiles: the compile is the eviction's.

    The same world also has genuine recompiles (new shapes from fresh traffic,
    no evicted member) on another replica: those stay ``compile_miss``.
    """
    w, reps = base_world(11)
    victims = [_recompute_compile(w, reps[1], A + k * 20, 3.0) for k in range(12)]
    for k in range(3):
        w.compile_stall(reps[2], A + 5 + k * 70, 3.0, 900 + k)  # marks its requests compile_miss
    _, incidents, slow = analyse(w, tmp_path)
    inc = assert_diagnosis(w, incidents, slow, "kv_eviction")
    chain = [e for r in slow for c in r["causes"] if c["cause"] == "kv_eviction" for e in c["evidence"]
             if e["kind"] == "recompute_compile"]
    assert chain, [e["kind"] for e in inc["causes"][0]["evidence"]]
    victim_ids = {v.trace_id for v in victims}
    for e in chain:
        # the chain: eviction record → recomputed request → its batch → the compile
        assert e["recomputed_trace_id"] in victim_ids and e["eviction_reason"] == "preemption" and e["evicted_at"]
        assert e["kv_preemptions"] == 1 and e["batch_max_len"] > e["longest_member_input_tokens"]
        assert e["span_id"] and e["batch_span_id"] and "size mismatch" in e["reason"]
    # requests that only queued behind such a compile are the eviction's too
    backlog = [r for r in slow if w.affected.get(r["trace_id"]) == "kv_eviction"
               and any(e.get("via") == "backlog" for c in r["causes"] for e in c["evidence"])]
    assert backlog and all(top_cause(r) == "kv_eviction" for r in backlog)
    # genuine new shapes (no recomputed member) are still compile misses
    acc, n = per_request_accuracy(w, slow, "compile_miss")
    assert n >= 3 and acc >= 0.9, (acc, n, by_cause(slow))
    genuine = [e for r in slow if w.affected.get(r["trace_id"]) == "compile_miss" for c in r["causes"]
               if c["cause"] == "compile_miss" for e in c["evidence"]]
    assert genuine and all(e["kind"] == "compile_span" for e in genuine)


def test_kv_squeeze_backlog(tmp_path: Path) -> None:
    """A KV squeeze on one replica: requests arriving after it ended still queue in the backlog it left.

    Capacity evictions run at 2/s on replica-1 during the window (none
    before): requests there wait for blocks, and those arriving up to a minute
    after it ended wait behind them. Those late ones saw no eviction while they
    ran; the squeeze just before them is their cause (not the long batches or
    saturation their queue would otherwise suggest).
    """
    w, reps = base_world(12)
    rep = reps[1]
    rng = np.random.default_rng(7)
    for k in range(int((B - A) * 2)):
        w.log(time=A + k / 2, event_name="tailscope.kv.eviction", service_name="chat-api", service_instance_id=rep.instance,
              host_name=rep.host, kv_blocks=8, kv_reason="capacity", kv_usage=0.99)
    for r in w.on(rep, A, B + 60):
        if r.t < B:
            r.queue_ms += float(rng.uniform(2000, 6000))
            r.prefill_ms *= 2
        else:
            r.queue_ms += 8000.0 * (1 - (r.t - B) / 60)
        w.mark([r], "kv_eviction")
    _, incidents, slow = analyse(w, tmp_path)
    assert_diagnosis(w, incidents, slow, "kv_eviction")
    late = [r for r in slow if w.affected.get(r["trace_id"]) == "kv_eviction" and r["start"] >= iso_at(B + 30)]
    assert len(late) >= 5, by_cause(slow)
    assert all(top_cause(r) == "kv_eviction" for r in late), [r["causes"] for r in late if top_cause(r) != "kv_eviction"][:2]
    assert all(any(e.get("via") == "backlog" for c in r["causes"] for e in c["evidence"]) for r in late)


def iso_at(seconds: float) -> str:
    return World.ts(seconds).strftime("%Y-%m-%dT%H:%M:%S")

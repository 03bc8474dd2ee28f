"""Telemetry of a lab run, sent through the project's own instrumentation.

Each replica ("process") is one ``agents.torch.instrument`` handle with its
own resource (``service.instance.id`` = ``replica-N``, ``host.name``, a
``process.pid`` that changes when the replica restarts). Spans are created
with explicit start/end times: the lab runs on a virtual clock, so every
request, stage, batch, eviction and ready event is placed at the virtual time
it happened (``base_epoch`` + virtual seconds).

Compile spans: the real compiles happened on this machine's wall clock, so
the hook-driven spans of ``compile_events`` would land at the wrong times.
The lab turns the hook off and re-times dynamo's own ``CompilationMetrics``
record (parsed by ``compile_events.parse_metrics``: kind, guard-failure
reason, cache, frame) onto the virtual timeline, as a child of the batch
whose forward triggered it, with the measured duration stretched by the
lab's scale.

GPU readings and the KV-usage gauge carry virtual timestamps too, so they are
encoded with the node agent's OTLP encoder and posted to ``/v1/metrics``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable

import httpx

from lab.gpu import GpuPlan, kv_points, points
from lab.model import CompileEvent
from lab.scenarios import Scenario
from lab.sim import ReplicaRun

HOST = "lab-node-0"


def pid_of(replica: int, generation: int) -> int:
    """Emulated serving-process ids: a restart is a new process."""
    return 20000 + replica * 100 + generation


@dataclass
class Emitted:
    """Ids of what was sent, for the ground-truth file."""

    trace_ids: dict[int, str]
    span_ids: dict[int, str]
    instance: dict[int, str]
    spans: int
    events: int
    metric_points: int


def _compile_attrs(ev: CompileEvent) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        "tailscope.role": "compile",
        "tailscope.compile.backend": ev.backend,
        "tailscope.compile.kind": ev.kind,
        "tailscope.compile.cache": "miss",
        "tailscope.compile.frame": ev.frame,
        "tailscope.compile.shape": json.dumps(list(ev.shape)),
        "tailscope.lab.measured_compile_s": round(ev.seconds, 6),
    }
    if ev.reason:
        attrs["tailscope.compile.reason"] = ev.reason
    if ev.raw is not None:
        try:
            from agents.torch.compile_events import parse_metrics

            rec = parse_metrics(ev.raw)
        except Exception:  # an older/newer torch record: keep what the executor read
            rec = None
        if rec is not None:
            attrs["tailscope.compile.kind"] = rec.kind if ev.kind != "first" else "first"
            attrs["tailscope.compile.cache"] = rec.cache
            if rec.reason:
                attrs["tailscope.compile.reason"] = rec.reason
            if rec.frame:
                attrs["tailscope.compile.frame"] = rec.frame
    return attrs


def _compile_span(handle: Any, parent: Any, ev: CompileEvent, start: float, end: float) -> None:
    from opentelemetry.trace import SpanKind

    from agents.torch.compile_events import COMPILE_SPAN_NAME
    from agents.torch.spans import Span, to_ns

    span = Span(handle, COMPILE_SPAN_NAME, SpanKind.INTERNAL, parent, _compile_attrs(ev), to_ns(start))
    span.end(end)


def post_metrics(endpoint: str, pts: list[Any], token: str | None = None, chunk: int = 4000) -> int:
    """Send metric points (``agents.otlp_encode.MetricPoint``) as OTLP/protobuf."""
    from agents.otlp_encode import encode_metrics

    headers = {"Content-Type": "application/x-protobuf"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    with httpx.Client(timeout=30) as client:
        for i in range(0, len(pts), chunk):
            body = encode_metrics(pts[i : i + chunk])
            for attempt in range(20):
                r = client.post(endpoint.rstrip("/") + "/v1/metrics", content=body, headers=headers)
                if r.status_code in (429, 503):
                    import time

                    time.sleep(min(2.0, float(r.headers.get("Retry-After", "0.5") or 0.5)))
                    continue
                break
            if r.status_code != 200:
                raise RuntimeError(f"the server refused lab metrics: HTTP {r.status_code} {r.text[:200]}")
    return len(pts)


def emit_chat(
    scn: Scenario,
    runs: dict[int, ReplicaRun],
    base_epoch: float,
    endpoint: str,
    scale: float,
    token: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> Emitted:
    """Send one chat scenario's spans, events and metrics."""
    from agents.torch import instrument

    ep = lambda t: base_epoch + t  # noqa: E731 - virtual seconds -> unix seconds
    trace_ids: dict[int, str] = {}
    span_ids: dict[int, str] = {}
    instance: dict[int, str] = {}
    n_spans = n_events = n_points = 0
    by_rid = {q.rid: q for q in scn.requests}
    for r, run in runs.items():
        inst = f"replica-{r}"
        loads = sorted(run.loads, key=lambda l: l.start)
        handles = [
            instrument(scn.service, endpoint, instance_id=inst, host_name=HOST, token=token,
                       resource={"process.pid": pid_of(r, g), "tailscope.pool": "realtime"}, compile_events=False)
            for g in range(len(loads) + 1)
        ]

        def gen(t: float) -> int:
            """Which process generation was serving at virtual time t."""
            return sum(1 for l in loads if l.start <= t)

        reqs: dict[int, Any] = {}
        outcomes = sorted(run.outcomes.values(), key=lambda o: (o.arrival, o.rid))
        for o in outcomes:
            q = by_rid[o.rid]
            g = gen(o.segments[0][1]) if o.segments else 0
            kw: dict[str, Any] = dict(
                model=scn.model, input_tokens=q.prompt, request_id=f"req-{base_epoch:.0f}-{q.rid}", gpu_index=r, priority="interactive",
            )
            if q.session:
                kw["session_id"] = q.session
            if g > 0:
                kw["replica_started_at"] = ep(loads[g - 1].end)
            span = handles[g].start_request(start_time=ep(o.arrival), **kw)
            reqs[o.rid] = span
            trace_ids[o.rid] = span.trace_id
            span_ids[o.rid] = span.span_id
            instance[o.rid] = inst
        # batches (members still open), with compile spans under them
        for k, b in enumerate(run.batches):
            h = handles[gen(b.start)]
            if k % 5000 == 4999:
                h.flush(timeout_s=60)
            bspan = h.start_batch(
                b.bid, members=[reqs[m] for m in b.members], start_time=ep(b.start), size=b.size, max_len=b.max_len,
                min_len=b.min_len, real_tokens=b.real_tokens, padded_tokens=b.padded_tokens, wait_s=b.wait,
            )
            bspan.set(attributes={"tailscope.shape.len": b.shape[1], "tailscope.batch.shape": json.dumps(list(b.shape))})
            n_spans += 1
            if b.compile is not None and b.compile_end > b.compile_start:
                _compile_span(h, bspan, b.compile, ep(b.compile_start), ep(b.compile_end))
                n_spans += 1
            bspan.end(ep(b.end))
        # model loads (cold start): a model_load span, warm-up compiles inside it, a ready event
        for g, load in enumerate(loads, start=1):
            h = handles[g]
            ls = h.start_stage("model_load", parent=None, start_time=ep(load.start))
            warm_total = sum(e.seconds for e in load.warmup) * scale
            t = max(load.start, load.end - warm_total)  # warm-up compiles close the load phase
            k = (load.end - t) / warm_total if warm_total > 0 else 0.0
            for e in load.warmup:
                _compile_span(h, ls, e, ep(t), ep(t + e.seconds * scale * k))
                t += e.seconds * scale * k
                n_spans += 1
            ls.end(ep(load.end))
            h.replica_ready(load_seconds=load.end - load.start, time=ep(load.end))
            n_spans += 1
            n_events += 1
        # KV events
        for k, ev in enumerate(run.kv_log):
            h = handles[gen(ev.time)]
            if k % 1000 == 999:
                h.flush(timeout_s=60)  # the SDK's log queue holds 2048 records: never let it drop
            victim = reqs.get(ev.victim) if ev.victim is not None else None
            h.kv_eviction(blocks=int(ev.blocks), reason=ev.reason, victim=victim, usage=min(1.0, max(0.0, ev.usage)), time=ep(ev.time))
            n_events += 1
        # stages and request ends
        for o in outcomes:
            span = reqs[o.rid]
            h = span._handle
            q = by_rid[o.rid]
            prev = o.arrival
            for bid, bstart, _pstart, pend, left in o.segments:
                if bstart > prev:
                    h.start_stage("queue", parent=span, start_time=ep(prev)).end(ep(bstart))
                    n_spans += 1
                h.start_stage("prefill", parent=span, start_time=ep(bstart)).end(ep(pend))
                n_spans += 1
                end = left if not math.isnan(left) else o.end
                if end > pend:
                    h.start_stage("decode", parent=span, start_time=ep(pend)).end(ep(end))
                    n_spans += 1
                prev = end
            first = o.segments[0]
            span.set(
                output_tokens=q.output, shape_len=o.shape_len, kv_cached_tokens=o.cached_tokens, kv_preemptions=o.preemptions,
                time_in_queue=max(0.0, first[1] - o.arrival), ttft=max(0.0, o.segments[-1][3] - o.arrival), e2e=o.latency,
                attributes={
                    "gen_ai.latency.time_in_model_prefill": sum(s[3] - s[1] for s in o.segments),
                    "gen_ai.latency.time_in_model_decode": sum(((s[4] if not math.isnan(s[4]) else o.end) - s[3]) for s in o.segments),
                },
            )
            span.end(ep(o.end))
            n_spans += 1
        if progress:
            progress(f"{inst}: flushing telemetry")
        for h in handles:
            h.flush(timeout_s=120)
            h.shutdown()
        # KV usage gauge of this replica and its emulated GPU's readings
        res = {"service.name": scn.service, "service.instance.id": inst, "host.name": HOST, "process.pid": pid_of(r, 0)}
        pts = kv_points(res, run.kv_usage, base_epoch)
        spec = scn.specs[r]
        plan = GpuPlan(
            host=HOST, index=r, serving_pid=pid_of(r, 0), busy=run.busy,
            throttle=[(w.start, w.end, ratio) for w, ratio in spec.throttle],
            contention=[(w.start, w.end, share) for w, share in spec.contention],
            loads=[(l.start, l.end) for l in loads], kv_usage=run.kv_usage, kv_blocks=spec.kv_blocks or 0,
        )
        pts += points(plan, 0.0, scn.duration, base_epoch)
        n_points += post_metrics(endpoint, pts, token)
    return Emitted(trace_ids, span_ids, instance, n_spans, n_events, n_points)


def emit_gateway(
    scn: Scenario,
    latencies: dict[int, float],
    base_epoch: float,
    endpoint: str,
    token: str | None = None,
) -> Emitted:
    """The provider scenario: request spans with a ``provider_call`` CLIENT child each."""
    from agents.torch import instrument

    assert scn.provider is not None
    p = scn.provider
    handles = {r: instrument(scn.service, endpoint, instance_id=f"gateway-{r}", host_name="lab-node-1", token=token, compile_events=False)
               for r in range(len(scn.specs))}
    trace_ids: dict[int, str] = {}
    span_ids: dict[int, str] = {}
    instance: dict[int, str] = {}
    n = 0
    for q in sorted(scn.requests, key=lambda x: x.arrival):
        h = handles[q.replica]
        t0 = base_epoch + q.arrival
        lat = latencies[q.rid]
        req = h.start_request(start_time=t0, model="upstream-large", input_tokens=q.prompt, request_id=f"req-{base_epoch:.0f}-{q.rid}")
        call = h.start_stage("provider_call", parent=req, start_time=t0 + 0.0025, system=p.system, server_address=p.address, region=p.region)
        call.end(t0 + lat - 0.0025)
        req.set(output_tokens=q.output, e2e=lat)
        req.end(t0 + lat)
        trace_ids[q.rid] = req.trace_id
        span_ids[q.rid] = req.span_id
        instance[q.rid] = f"gateway-{q.replica}"
        n += 2
    for h in handles.values():
        h.flush(timeout_s=120)
        h.shutdown()
    return Emitted(trace_ids, span_ids, instance, n, 0, 0)

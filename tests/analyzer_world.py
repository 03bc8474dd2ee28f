"""A synthetic but mechanistic serving world for the analyzer's tests.

Requests are built from their stages (queue → prefill → decode, or a provider
call) with heavy-tailed noise; causes are injected as *mechanisms* — a
compile stall on an instance delays whatever was queued or running there, a
preempted request recomputes its prefill, a throttled GPU slows compute by
its clock ratio — and the telemetry (request/stage/compile/batch spans, span
links, eviction/ready logs, GPU metrics) is written into a real DuckDB store
through ``Store.write`` in the schema's columns. The ``affected`` dict is the
test's own ground truth; the analyzer never sees it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pyarrow as pa

T0 = datetime(2026, 11, 20, 12, 0, 0)

_SPAN_TYPES = {
    "trace_id": pa.string(), "span_id": pa.string(), "parent_span_id": pa.string(), "name": pa.string(), "kind": pa.string(),
    "start_time": pa.timestamp("us"), "end_time": pa.timestamp("us"), "duration_ms": pa.float64(),
    "service_name": pa.string(), "service_instance_id": pa.string(), "host_name": pa.string(), "process_pid": pa.int64(),
    "role": pa.string(), "model": pa.string(), "input_tokens": pa.int64(), "output_tokens": pa.int64(),
    "time_in_queue_s": pa.float64(), "ttft_s": pa.float64(), "e2e_s": pa.float64(), "prefill_s": pa.float64(), "decode_s": pa.float64(),
    "session_id": pa.string(), "shape_len": pa.int64(), "batch_id": pa.string(), "kv_cached_tokens": pa.int64(),
    "kv_preemptions": pa.int64(), "gpu_index": pa.int32(), "priority": pa.string(), "replica_started_at": pa.float64(),
    "compile_backend": pa.string(), "compile_kind": pa.string(), "compile_reason": pa.string(), "compile_shape": pa.string(),
    "compile_cache": pa.string(), "compile_frame": pa.string(),
    "batch_size": pa.int64(), "batch_max_len": pa.int64(), "batch_min_len": pa.int64(), "batch_real_tokens": pa.int64(),
    "batch_padded_tokens": pa.int64(), "batch_wait_s": pa.float64(),
    "gen_ai_system": pa.string(), "server_address": pa.string(), "provider_region": pa.string(),
}
_LOG_TYPES = {
    "time": pa.timestamp("us"), "event_name": pa.string(), "service_name": pa.string(), "service_instance_id": pa.string(),
    "host_name": pa.string(), "trace_id": pa.string(), "kv_blocks": pa.int64(), "kv_reason": pa.string(),
    "kv_victim_trace_id": pa.string(), "kv_usage": pa.float64(), "load_seconds": pa.float64(), "gpu_index": pa.int32(), "xid": pa.int64(),
}
_METRIC_TYPES = {
    "time": pa.timestamp("us"), "name": pa.string(), "type": pa.string(), "value": pa.float64(), "host_name": pa.string(),
    "gpu_index": pa.int32(), "point_pid": pa.int64(), "service_name": pa.string(),
}


@dataclass
class Replica:
    instance: str
    host: str
    gpu: int
    pid: int


@dataclass
class Req:
    t: float  # arrival, seconds from T0
    service: str
    replica: Replica
    model: str
    input_tokens: int
    output_tokens: int
    queue_ms: float
    prefill_ms: float
    decode_ms: float
    provider_ms: float | None = None
    provider: tuple[str, str, str | None] | None = None
    session_id: str | None = None
    kv_cached: int | None = None
    preemptions: int | None = None
    shape_len: int | None = None
    batch_id: str | None = None
    priority: str | None = None
    started_at: float | None = None
    compile_child: tuple[float, float, str, str] | None = None  # offset into prefill s, duration s, reason, shape
    trace_id: str = ""
    span_id: str = ""

    @property
    def latency_ms(self) -> float:
        return self.queue_ms + self.prefill_ms + self.decode_ms + (self.provider_ms or 0.0)

    @property
    def end(self) -> float:
        return self.t + self.latency_ms / 1000.0


@dataclass
class World:
    seed: int = 0
    requests: list[Req] = field(default_factory=list)
    spans: list[dict] = field(default_factory=list)
    logs: list[dict] = field(default_factory=list)
    metrics: list[dict] = field(default_factory=list)
    links: list[dict] = field(default_factory=list)
    affected: dict[str, str] = field(default_factory=dict)  # trace_id -> injected cause (test ground truth)
    _n: int = 0

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    # --- ids and time ---------------------------------------------------
    def _ids(self) -> tuple[str, str]:
        self._n += 1
        return f"{self.seed:08x}{self._n:024x}", f"{self._n:016x}"

    def _span_id(self) -> str:
        self._n += 1
        return f"{self._n:016x}"

    @staticmethod
    def ts(seconds: float) -> datetime:
        return T0 + timedelta(seconds=seconds)

    # --- traffic --------------------------------------------------------
    def steady(self, service: str, replicas: list[Replica], minutes: float, rps: float, *, model: str = "tiny",
               start_s: float = 0.0, sigma: float = 0.45, provider: tuple[str, str, str | None] | None = None,
               sessions: int = 0) -> list[Req]:
        """Poisson arrivals with lognormal lengths and heavy-tailed stage noise."""
        rng = self.rng
        n = int(rng.poisson(rps * minutes * 60))
        times = np.sort(rng.uniform(start_s, start_s + minutes * 60, n))
        inp = np.clip(rng.lognormal(np.log(300), 0.8, n), 8, 4000).astype(int)
        out = np.clip(rng.lognormal(np.log(80), 0.7, n), 4, 800).astype(int)
        made = []
        for i in range(n):
            rep = replicas[i % len(replicas)]
            noise = rng.lognormal(0, sigma)
            queue = float(rng.exponential(4.0) * rng.lognormal(0, 0.8))
            prefill = (5 + 0.04 * inp[i]) * rng.lognormal(0, 0.2)
            decode = 6.0 * out[i] * noise
            r = Req(float(times[i]), service, rep, model, int(inp[i]), int(out[i]), queue, prefill, decode,
                    shape_len=int(2 ** np.ceil(np.log2(inp[i]))), priority="interactive" if i % 5 else "batch")
            if provider:
                r.provider = provider
                r.provider_ms = float(300 * rng.lognormal(0, 0.3))
                r.decode_ms = r.decode_ms * 0.1
            if sessions:
                r.session_id = f"s{i % sessions}"
            r.trace_id, r.span_id = self._ids()
            made.append(r)
        self.requests.extend(made)
        return made

    def on(self, replica: Replica, a: float, b: float, service: str | None = None) -> list[Req]:
        """Requests on ``replica`` whose arrival lies in [a, b) (seconds)."""
        return [r for r in self.requests if r.replica is replica and a <= r.t < b and (service is None or r.service == service)]

    # --- injected mechanisms --------------------------------------------
    def compile_stall(self, replica: Replica, at: float, seconds: float, shape_len: int, service: str = "chat-api") -> None:
        """A recompile on ``replica``: everything queued or running there waits; a backlog follows."""
        c0, c1 = at, at + seconds
        trigger = None
        for r in sorted(self.on(replica, at - 5, c1 + 4 * seconds, service), key=lambda r: r.t):
            if r.t >= c0 and r.t < c1:
                r.queue_ms += (c1 - r.t) * 1000.0
                if trigger is None:
                    trigger = r
            elif r.t < c0 < r.end:
                r.decode_ms += seconds * 1000.0
            elif c1 <= r.t:
                backlog = seconds - (r.t - c1) * 1.0  # drains at ρ≈0.5
                if backlog <= 0.05:
                    continue
                r.queue_ms += backlog * 1000.0
            else:
                continue
            r._affected = "compile_miss"  # type: ignore[attr-defined]
        self.spans.append(self._compile_row(replica, c0, c1, shape_len, service))

    def _compile_row(self, replica: Replica, c0: float, c1: float, shape_len: int, service: str, parent: tuple[str, str] | None = None) -> dict:
        tid, sid = self._ids()
        return {"trace_id": parent[0] if parent else tid, "span_id": sid, "parent_span_id": parent[1] if parent else None,
                "name": "torch.compile", "kind": "INTERNAL", "start_time": self.ts(c0), "end_time": self.ts(c1),
                "duration_ms": (c1 - c0) * 1000.0, "service_name": service, "service_instance_id": replica.instance,
                "host_name": replica.host, "process_pid": replica.pid, "role": "compile", "compile_backend": "inductor",
                "compile_kind": "recompile", "compile_reason": f"tensor 'x' size mismatch at index 1. expected 512, actual {shape_len}",
                "compile_shape": f"[1, {shape_len}]", "compile_cache": "miss", "compile_frame": "forward"}

    def mark(self, reqs: list[Req], cause: str) -> None:
        for r in reqs:
            r._affected = cause  # type: ignore[attr-defined]

    # --- rendering ------------------------------------------------------
    def render(self, flat: bool = False) -> None:
        """Turn requests into spans (stage children, or vLLM flat attributes)."""
        for r in self.requests:
            if not r.trace_id:
                r.trace_id, r.span_id = self._ids()
            cause = getattr(r, "_affected", None)
            if cause:
                self.affected[r.trace_id] = cause
        for r in self.requests:
            self._render(r, flat)

    def _base(self, r: Req) -> dict:
        return {"service_name": r.service, "service_instance_id": r.replica.instance, "host_name": r.replica.host,
                "process_pid": r.replica.pid}

    def _render(self, r: Req, flat: bool) -> None:
        row = {**self._base(r), "trace_id": r.trace_id, "span_id": r.span_id, "parent_span_id": None,
               "name": "llm_request" if flat else "request", "kind": "SERVER", "start_time": self.ts(r.t),
               "end_time": self.ts(r.end), "duration_ms": r.latency_ms, "model": r.model, "input_tokens": r.input_tokens,
               "output_tokens": r.output_tokens, "gpu_index": r.replica.gpu, "session_id": r.session_id,
               "kv_cached_tokens": r.kv_cached, "kv_preemptions": r.preemptions, "shape_len": None if flat else r.shape_len,
               "batch_id": r.batch_id, "priority": None if flat else r.priority, "replica_started_at": r.started_at}
        if flat:
            row.update({"role": None, "time_in_queue_s": r.queue_ms / 1000, "prefill_s": r.prefill_ms / 1000,
                        "decode_s": r.decode_ms / 1000, "e2e_s": r.latency_ms / 1000,
                        "ttft_s": (r.queue_ms + r.prefill_ms) / 1000})
            self.spans.append(row)
            return
        row["role"] = "request"
        self.spans.append(row)
        t = r.t
        stages = [("queue", r.queue_ms)]
        if r.provider_ms is not None:
            stages.append(("provider_call", r.provider_ms))
        stages += [("prefill", r.prefill_ms), ("decode", r.decode_ms)]
        for role, ms in stages:
            st = {**self._base(r), "trace_id": r.trace_id, "span_id": self._span_id(), "parent_span_id": r.span_id,
                  "name": role, "kind": "CLIENT" if role == "provider_call" else "INTERNAL", "start_time": self.ts(t),
                  "end_time": self.ts(t + ms / 1000), "duration_ms": ms, "role": role}
            if role == "provider_call" and r.provider:
                st.update({"gen_ai_system": r.provider[0], "server_address": r.provider[1], "provider_region": r.provider[2]})
            if role == "prefill" and r.compile_child:
                off, dur, reason, shape = r.compile_child
                cs = self._compile_row(r.replica, t + off, t + off + dur, 0, r.service, parent=(r.trace_id, r.span_id))
                cs.update({"compile_reason": reason, "compile_shape": shape})
                self.spans.append(cs)
            self.spans.append(st)
            t += ms / 1000

    def gpu_series(self, host: str, gpu: int, pid: int, start_s: float, end_s: float, every_s: float = 1.0,
                   clock: float = 1410.0, clock_max: float = 1980.0, reasons: int = 0x4) -> None:
        """NVML-like samples: a power-capped H100's normal (1410 of 1980 MHz, reason 0x4)."""
        for t in np.arange(start_s, end_s, every_s):
            ts = self.ts(float(t))
            for name, value, p in (("tailscope.gpu.sm_clock", clock, None), ("tailscope.gpu.sm_clock.max", clock_max, None),
                                   ("tailscope.gpu.clock_event_reasons", reasons, None),
                                   ("tailscope.gpu.utilization", 0.7, None),
                                   ("tailscope.gpu.process.memory.used", 30e9, pid)):
                self.metrics.append({"time": ts, "name": name, "type": "gauge", "value": float(value), "host_name": host,
                                     "gpu_index": gpu, "point_pid": p})

    def set_metric(self, host: str, gpu: int, name: str, a: float, b: float, value: float) -> None:
        for m in self.metrics:
            if m["host_name"] == host and m["gpu_index"] == gpu and m["name"] == name and self.ts(a) <= m["time"] < self.ts(b):
                m["value"] = float(value)

    def log(self, **row: Any) -> None:
        row["time"] = self.ts(row["time"])
        self.logs.append(row)

    # --- store ----------------------------------------------------------
    def write(self, store: Any) -> None:
        def table(rows: list[dict], types: dict[str, pa.DataType]) -> pa.Table:
            cols = sorted({k for r in rows for k in r})
            return pa.table({c: pa.array([r.get(c) for r in rows], type=types[c]) for c in cols})

        tables = [("spans", table(self.spans, _SPAN_TYPES))]
        if self.logs:
            tables.append(("logs", table(self.logs, _LOG_TYPES)))
        if self.metrics:
            tables.append(("metrics", table(self.metrics, _METRIC_TYPES)))
        if self.links:
            tables.append(("span_links", pa.table({k: [l[k] for l in self.links] for k in ("trace_id", "span_id", "linked_trace_id", "linked_span_id")})))
        store.write(tables)


def replicas(n: int, host_of: Any = None) -> list[Replica]:
    return [Replica(f"replica-{i}", host_of(i) if host_of else f"node-{i // 2}", i % 2, 1000 + i) for i in range(n)]


def steady_store(path: Any, seed: int, minutes: float = 130, rps: float = 1.5) -> Any:
    """A new store at ``path`` holding ``minutes`` of steady chat-api traffic on two replicas (open: close it)."""
    from collector.store import Store

    w = World(seed=seed)
    w.steady("chat-api", replicas(2), minutes, rps)
    w.render()
    store = Store(path)
    w.write(store)
    return store


def top_cause(result: dict) -> str | None:
    causes = result.get("causes") or []
    return causes[0]["cause"] if causes else None


def per_request_accuracy(world: World, slow: list[dict], cause: str) -> tuple[float, int]:
    """Share of the injected requests that were flagged slow whose top cause is ``cause``."""
    hits = [r for r in slow if world.affected.get(r["trace_id"]) == cause]
    if not hits:
        return 0.0, 0
    good = sum(1 for r in hits if top_cause(r) == cause)
    return good / len(hits), len(hits)


def by_cause(slow: list[dict]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for r in slow:
        out[top_cause(r) or "-"] += 1
    return dict(out)

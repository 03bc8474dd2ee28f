"""A held-out serving world: replicas simulated event by event, causes as mechanisms, labels by counterfactual.

Used by ``benchmarks/robustness.py`` (the held-out sweep) and by regression
tests. It shares nothing with the lab (no torch, no real CPU costs) and
little with ``analyzer_world`` (which hand-places each effect): here a cause
is switched on in the *engine* and its effects follow from queueing.

The engine. Each replica is a continuous-batching server with ``c`` sequence
slots (``slots``) or a static batcher (``static``: batches of up to ``B``
members that run until their longest generation ends, with batch spans).
All of a replica's running work progresses at one speed that a mechanism can
change: 0 while it compiles or loads weights, the clock ratio while its GPU
is throttled, ``1 − share`` while a foreign job shares the GPU. A KV squeeze
lowers the slot count and preempts running sequences, which recompute their
prompt plus what they had generated. A surge adds arrivals; a batch-job
client adds long generations to one replica; a slow provider lengthens a
gateway's provider calls. Compiles happen when a request's padded shape is
new on the replica (at most ``RECOMPILE_LIMIT`` per injection, torch's
default limit, after which the frame runs eager).

The telemetry (``telemetry``):

* ``full``: request spans (``tailscope.role = request``) with queue /
  prefill / decode / provider_call stage children, compile spans as children
  of the request that triggered them, batch spans linked to their members
  (static engine), eviction logs naming their victim, replica-ready logs,
  ``tailscope.kv.usage`` and the node agent's GPU metrics;
* ``vllm``: what vLLM emits with no changes: one flat root SERVER span per
  request (``llm_request``, ``gen_ai.latency.*``, no role, no children, no GPU
  index; one GPU per host) and its Prometheus metrics
  (``vllm:num_preemptions_total``, ``vllm:kv_cache_usage_perc``,
  ``vllm:num_requests_waiting`` / ``running``), plus the node agent's GPU metrics;
* ``nogpu``: ``full`` without any GPU metric.

Labels (kept out of the store) follow the lab's rule (``lab/truth.py``): the
same requests are served again with one mechanism off, and with all off; a
request is slow when its total excess passes ``max(0.25 s, 0.5 × its
latency with everything off)``, and its cause is the mechanism that cost it most.
"""

from __future__ import annotations

import bisect
import csv
import gzip
import heapq
import json
import math
import zlib
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

T0 = datetime(2026, 3, 2, 0, 0, 0)  # a Monday, 00:00 UTC
DAY_S = 86_400.0
DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
RECOMPILE_LIMIT = 8
SLOW_ABS_S = 0.25
SLOW_REL = 0.5

# model -> (prefill fixed ms, prefill ms per prompt token, decode ms per generated token)
MODELS: dict[str, tuple[float, float, float]] = {
    "llama-3.1-8b-instruct": (6.0, 0.010, 9.0),
    "llama-3.1-70b-instruct": (22.0, 0.045, 31.0),
    "qwen2.5-32b": (12.0, 0.025, 19.0),
}
MECH = ("compile_miss", "kv_eviction", "batch_contention", "queue_saturation", "provider_load", "gpu_throttle",
        "gpu_contention", "cold_start")


@dataclass
class Injection:
    """``cause`` on ``replica`` (None: the whole service) during [start, end) seconds, at ``magnitude``.

    The magnitude is read per mechanism (see ``Sim._knobs``): roughly how many
    times the baseline p99 the requests it hits directly end up taking.
    """

    cause: str
    start: float
    end: float
    replica: int | None = None
    magnitude: float = 3.0


@dataclass
class Case:
    name: str
    service: str = "chat-api"
    models: tuple[str, ...] = ("llama-3.1-8b-instruct",)
    replicas: int = 4
    rps: float = 8.0
    hours: float = 2.0
    profile: str = "steady"  # steady | diurnal | growth | azure
    lengths: str = "synthetic"  # synthetic | azure | mooncake
    telemetry: str = "full"  # full | vllm | nogpu
    engine: str = "slots"  # slots | static
    injections: list[Injection] = field(default_factory=list)
    sigma: float = 0.5  # lognormal noise of decode work
    pauses: float = 0.005  # share of requests with a Pareto-tailed pause (GC, page faults, a noisy moment)
    gpus_per_host: int = 8
    gpu_every_s: float = 10.0
    provider_region: str | None = None  # set: a gateway whose requests call an upstream provider in this zone
    rho: float = 0.55  # target utilisation at the busiest normal time
    seed: int = 0
    sidecar: bool = True  # a monitoring process always on every GPU (normal, never evidence)

    @property
    def duration(self) -> float:
        return self.hours * 3600.0


# --- inputs ------------------------------------------------------------------

_TRACES: dict[str, Any] = {}


def azure_rows() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(arrival s from start, context tokens, generated tokens) of the Azure conv trace."""
    if "azure" not in _TRACES:
        t, c, g = [], [], []
        with gzip.open(DATA / "azure-llm-2023" / "AzureLLMInferenceTrace_conv.csv.gz", "rt", newline="") as fh:
            for row in csv.DictReader(fh):
                ts = datetime.fromisoformat(row["TIMESTAMP"][:26])
                t.append(ts.timestamp())
                c.append(int(row["ContextTokens"]))
                g.append(int(row["GeneratedTokens"]))
        t0 = t[0]
        _TRACES["azure"] = (np.array(t) - t0, np.array(c), np.array(g))
    return _TRACES["azure"]


def mooncake_rows() -> tuple[np.ndarray, np.ndarray]:
    if "mooncake" not in _TRACES:
        inp, out = [], []
        with gzip.open(DATA / "mooncake" / "synthetic_trace.jsonl.gz", "rt") as fh:
            for line in fh:
                d = json.loads(line)
                inp.append(int(d["input_length"]))
                out.append(int(d["output_length"]))
        _TRACES["mooncake"] = (np.array(inp), np.array(out))
    return _TRACES["mooncake"]


def arrivals(case: Case, rng: np.random.Generator) -> np.ndarray:
    dur, rps = case.duration, case.rps
    if case.profile == "steady":
        return np.sort(rng.uniform(0, dur, rng.poisson(rps * dur)))
    if case.profile == "azure":
        # the trace's per-second arrival counts as the rate profile (its swell and burstiness), tiled
        t, _, _ = azure_rows()
        per_s = np.bincount(t.astype(int))
        rate = per_s / per_s.mean() * rps
        secs = np.arange(int(math.ceil(dur)))
        lam = rate[secs % len(rate)]
        counts = rng.poisson(lam)
        out = np.repeat(secs, counts) + rng.uniform(0, 1, counts.sum())
        return np.sort(out[out < dur])
    # thinning against the profile's peak
    if case.profile == "diurnal":
        def rate(x: np.ndarray) -> np.ndarray:  # peak at 15:00 UTC, trough at 03:00
            return rps * (1.0 + 0.6 * np.sin(2 * np.pi * (x / DAY_S - 0.375)))
        peak = 1.6 * rps
    elif case.profile == "growth":
        def rate(x: np.ndarray) -> np.ndarray:  # doubles over the case, linearly
            return rps * (0.5 + 0.5 * x / dur)
        peak = rps
    else:
        raise ValueError(f"unknown profile {case.profile!r}")
    cand = np.sort(rng.uniform(0, dur, rng.poisson(peak * dur)))
    return cand[rng.uniform(0, peak, len(cand)) < rate(cand)]


def lengths(case: Case, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    if case.lengths == "synthetic":
        inp = np.clip(rng.lognormal(np.log(600), 0.9, n), 4, 16000).astype(np.int64)
        out = np.clip(rng.lognormal(np.log(160), 0.8, n), 1, 2000).astype(np.int64)
    elif case.lengths == "azure":
        _, c, g = azure_rows()
        k = rng.integers(0, len(c), n)
        inp, out = c[k].astype(np.int64), np.maximum(g[k], 1).astype(np.int64)
    elif case.lengths == "mooncake":
        i, o = mooncake_rows()
        k = rng.integers(0, len(i), n)
        inp, out = i[k].astype(np.int64), np.maximum(o[k], 1).astype(np.int64)
    else:
        raise ValueError(f"unknown lengths {case.lengths!r}")
    return inp, out


# --- the replica engine --------------------------------------------------------


class Speed:
    """A replica's speed over time: 1 outside the intervals, ``s`` (0 = stalled) inside them."""

    def __init__(self) -> None:
        self.a: list[float] = []
        self.b: list[float] = []
        self.s: list[float] = []

    def add(self, a: float, b: float, s: float) -> None:
        """Add an interval; overlapping intervals are merged at the slower speed (a stall inside a throttle)."""
        pieces = [(a, b, s)]
        keep_a, keep_b, keep_s = [], [], []
        for x, y, v in zip(self.a, self.b, self.s):
            if y <= a or x >= b:
                keep_a.append(x), keep_b.append(y), keep_s.append(v)
                continue
            if x < a:
                keep_a.append(x), keep_b.append(a), keep_s.append(v)
            if y > b:
                keep_a.append(b), keep_b.append(y), keep_s.append(v)
            pieces.append((max(x, a), min(y, b), min(v, s)))
        # the new interval, split where it met older ones (slower speed wins there)
        cuts = sorted({a, b} | {p[0] for p in pieces} | {p[1] for p in pieces})
        for x, y in zip(cuts, cuts[1:]):
            if x < a or y > b or y <= x:
                continue
            v = min(p[2] for p in pieces if p[0] <= x and p[1] >= y)
            keep_a.append(x), keep_b.append(y), keep_s.append(v)
        order = sorted(range(len(keep_a)), key=lambda i: keep_a[i])
        self.a = [keep_a[i] for i in order]
        self.b = [keep_b[i] for i in order]
        self.s = [keep_s[i] for i in order]

    def advance(self, t: float, work_s: float) -> float:
        """When ``work_s`` seconds of full-speed work started at ``t`` is done."""
        i = bisect.bisect_right(self.b, t)
        w = work_s
        while True:
            if i >= len(self.a):
                return t + w
            a, b, s = self.a[i], self.b[i], self.s[i]
            if t < a:
                if t + w <= a:
                    return t + w
                w -= a - t
                t = a
            cap = (b - t) * s
            if s > 0 and w <= cap:
                return t + w / s
            w -= cap
            t = b
            i += 1

    def resume(self, t: float) -> float:
        """The first time at or after ``t`` when the replica is not stalled."""
        i = bisect.bisect_right(self.b, t)
        while i < len(self.a) and self.a[i] <= t and self.s[i] == 0:
            t = self.b[i]
            i += 1
        return t

    def work(self, t0: float, t1: float) -> float:
        """Full-speed work done between ``t0`` and ``t1``."""
        done = t1 - t0
        i = bisect.bisect_right(self.b, t0)
        while i < len(self.a) and self.a[i] < t1:
            done -= (min(self.b[i], t1) - max(self.a[i], t0)) * (1 - self.s[i])
            i += 1
        return max(0.0, done)


@dataclass
class Knobs:
    """What the injections do to one replica (or the service), in engine terms."""

    speed: list[tuple[float, float, float, str]] = field(default_factory=list)  # a, b, speed, cause
    compile_windows: list[tuple[float, float, float]] = field(default_factory=list)  # a, b, stall s
    squeeze: list[tuple[float, float, int, float]] = field(default_factory=list)  # a, b, slots, preempt probability
    restart: list[tuple[float, float]] = field(default_factory=list)  # a, load s


@dataclass
class Run:
    """One request's path through its replica: queue waits, runs (start, end, prefill work, decode work)."""

    waits: list[tuple[float, float]] = field(default_factory=list)
    runs: list[tuple[float, float, float, float, bool]] = field(default_factory=list)  # start, end, P s, D s, preempted
    compile: tuple[float, float, int] | None = None  # the compile it triggered: a, b, shape
    end: float = 0.0
    preemptions: int = 0
    batch: int | None = None


def prefill_s(model: str, tokens: np.ndarray | int) -> Any:
    a, b, _ = MODELS[model]
    return (a + b * tokens) / 1000.0


def pow2(x: int) -> int:
    return 1 << max(4, int(math.ceil(math.log2(max(x, 1)))))


def replica_speed(knobs: Knobs, on: set[str]) -> Speed:
    """A replica's speed with the mechanisms ``on``: throttle / contention slow it, a restart stalls it while it loads."""
    speed = Speed()
    for a, b, s, cause in knobs.speed:
        if cause in on:
            speed.add(a, b, s)
    if "cold_start" in on:
        for a, load in knobs.restart:
            speed.add(a, a + load, 0.0)
    return speed


def simulate_slots(idx: list[int], arr: np.ndarray, P: np.ndarray, D: np.ndarray, inp: np.ndarray, out: np.ndarray,
                   model_of: list[str], slots: int, knobs: Knobs, u: np.ndarray, on: set[str]) -> tuple[dict[int, Run], Speed, list[tuple]]:
    """Serve ``idx`` (sorted by arrival) on one continuous-batching replica.

    ``on``: the mechanisms switched on. Returns each request's run, the
    replica's final speed profile, and the evictions (time, victim idx, tokens).
    """
    speed = replica_speed(knobs, on)
    caps: list[tuple[float, int]] = []
    pre_windows = []
    if "kv_eviction" in on:
        for a, b, c2, p in knobs.squeeze:
            caps += [(a, c2), (b, slots)]
            pre_windows.append((a, b, p))
    caps.sort()
    compile_on = "compile_miss" in on and knobs.compile_windows
    seen_shapes: set[int] = set()
    compiles_in: dict[int, int] = {}
    runs: dict[int, Run] = {i: Run() for i in idx}
    evictions: list[tuple] = []
    queue: deque = deque()  # (idx, enqueued at, P, D)
    running: dict[int, tuple[int, float, float, float]] = {}  # idx -> (version, start, P, D)
    heap: list[tuple[float, int, int, str]] = []  # (time, version, idx, kind: 'end' | 'preempt')
    version: dict[int, int] = {}
    cap = slots
    ci = 0
    k = 0
    n = len(idx)
    INF = math.inf

    def reschedule() -> None:
        for j, (v, st, p, d) in list(running.items()):
            v2 = v + 1
            running[j] = (v2, st, p, d)
            version[j] = v2
            heapq.heappush(heap, (speed.advance(st, p + d), v2, j, "end"))

    def start(t: float) -> None:
        while queue and len(running) < cap:
            j, enq, p, d = queue.popleft()
            run = runs[j]
            run.waits.append((enq, t))
            if compile_on:
                for w, (a, b, stall) in enumerate(knobs.compile_windows):
                    if a <= t < b and not run.runs:
                        shape = int(math.ceil(inp[j] / 64.0) * 64)
                        if shape not in seen_shapes and compiles_in.get(w, 0) < RECOMPILE_LIMIT:
                            seen_shapes.add(shape)
                            compiles_in[w] = compiles_in.get(w, 0) + 1
                            c0 = speed.resume(t)  # the engine compiles one graph at a time
                            speed.add(c0, c0 + stall, 0.0)
                            run.compile = (c0, c0 + stall, shape)
                            reschedule()
            v = version.get(j, 0) + 1
            version[j] = v
            running[j] = (v, t, p, d)
            end = speed.advance(t, p + d)
            heapq.heappush(heap, (end, v, j, "end"))
            for a, b, prob in pre_windows:
                if a <= t < b and u[j] < prob and not run.preemptions:
                    heapq.heappush(heap, (t + (end - t) * (0.2 + 0.7 * u[j] / prob), v, j, "preempt"))

    def preempt(j: int, t: float) -> None:
        v, st, p, d = running.pop(j)
        version[j] = v + 1
        run = runs[j]
        run.runs.append((st, t, p, d, True))
        done = speed.work(st, t)
        generated = 0 if done <= p else int(out[j] * min(1.0, (done - p) / d)) if d > 0 else 0
        d_left = max(0.0, d - max(0.0, done - p))
        run.preemptions += 1
        evictions.append((t, j, int(inp[j] + generated)))
        queue.appendleft((j, t, float(prefill_s(model_of[j], int(inp[j] + generated))), d_left))

    while k < n or queue or running:
        while heap and heap[0][1] != version.get(heap[0][2]):
            heapq.heappop(heap)
        t_arr = arr[idx[k]] if k < n else INF
        t_ev = heap[0][0] if heap else INF
        t_cap = caps[ci][0] if ci < len(caps) else INF
        t = min(t_arr, t_ev, t_cap)
        if t == INF:
            break
        if t == t_cap:
            cap = caps[ci][1]
            ci += 1
            if len(running) > cap:  # the squeeze: the latest-started sequences lose their blocks
                for j in sorted(running, key=lambda x: -running[x][1])[: len(running) - cap]:
                    preempt(j, t)
        elif t == t_ev:
            _, v, j, kind = heapq.heappop(heap)
            if kind == "end":
                _, st, p, d = running.pop(j)
                version[j] = v + 1
                runs[j].runs.append((st, t, p, d, False))
                runs[j].end = t
            else:
                preempt(j, t)
        else:
            j = idx[k]
            k += 1
            queue.append((j, float(arr[j]), float(P[j]), float(D[j])))
        start(t)
    return runs, speed, evictions


def simulate_static(idx: list[int], arr: np.ndarray, inp: np.ndarray, out: np.ndarray, model_of: list[str], size: int,
                    fill_s: float, knobs: Knobs, on: set[str], noise: np.ndarray) -> tuple[dict[int, Run], Speed, list[dict]]:
    """Serve ``idx`` on a static batcher: up to ``size`` members, padded to the longest, decoding until the longest ends."""
    speed = replica_speed(knobs, on)
    runs: dict[int, Run] = {}
    batches: list[dict] = []
    free = 0.0
    k, n = 0, len(idx)
    while k < n:
        first = idx[k]
        open_at = max(free, float(arr[first]))  # the replica is free and someone waits
        members = []
        while k < n and len(members) < size and arr[idx[k]] <= open_at:
            members.append(idx[k])
            k += 1
        bs = open_at
        if len(members) < size:
            # wait for the batch to fill, at most fill_s after its oldest member arrived
            deadline = max(open_at, float(arr[first]) + fill_s)
            while k < n and len(members) < size and arr[idx[k]] <= deadline:
                members.append(idx[k])
                k += 1
            bs = max(open_at, float(arr[members[-1]]) if len(members) == size else deadline)
        model = model_of[first]
        _, _, step = MODELS[model]
        max_in = max(int(inp[j]) for j in members)
        max_out = max(int(out[j]) for j in members)
        p_work = float(prefill_s(model, pow2(max_in) * len(members) ** 0.5))
        # a static batch steps until its longest member ends; the step time's noise is the batch's, not a member's
        d_work = max_out * step * (1 + 0.03 * len(members)) / 1000.0 * float(noise[first]) ** 0.5
        p_end = speed.advance(bs, p_work)
        end = speed.advance(p_end, d_work)
        for j in members:
            r = Run(batch=len(batches))
            r.waits.append((float(arr[j]), bs))
            r.runs.append((bs, end, p_work, d_work, False))
            r.end = end
            runs[j] = r
        batches.append({"start": bs, "end": end, "members": members, "max_len": pow2(max_in), "min_len": min(int(inp[j]) for j in members),
                        "real": int(sum(int(inp[j]) for j in members)), "padded": pow2(max_in) * len(members),
                        "wait": bs - open_at})
        free = end
    return runs, speed, batches


# --- the world -----------------------------------------------------------------


class Sim:
    """Generates one case: requests, engine runs (actual and counterfactual), labels, telemetry tables."""

    def __init__(self, case: Case) -> None:
        self.case = case
        self.rng = np.random.default_rng(case.seed)
        c = case
        self.gateway = c.provider_region is not None
        t = arrivals(c, self.rng)
        inp, out = lengths(c, len(t), self.rng)
        stream = np.zeros(len(t), dtype=np.int8)  # 0 base, 1 surge, 2 long generations
        # injected extra streams
        extra_t, extra_s, extra_r = [], [], []
        self.base_rps_per_replica = c.rps / c.replicas
        for inj in c.injections:
            if inj.cause == "queue_saturation":
                mult = min(inj.magnitude, 5.0) - 1.0
                m = self.rng.poisson(mult * c.rps * (inj.end - inj.start))
                extra_t.append(self.rng.uniform(inj.start, inj.end, m))
                extra_s.append(np.full(m, 1, dtype=np.int8))
                extra_r.append(np.full(m, -1))
            if inj.cause == "batch_contention":
                m = self.rng.poisson(0.15 * self.base_rps_per_replica * (inj.end - inj.start))
                extra_t.append(self.rng.uniform(inj.start, inj.end, m))
                extra_s.append(np.full(m, 2, dtype=np.int8))
                extra_r.append(np.full(m, inj.replica if inj.replica is not None else 0))
        route = None
        if extra_t:
            et = np.concatenate(extra_t)
            ei, eo = lengths(c, len(et), self.rng)
            es = np.concatenate(extra_s)
            er = np.concatenate(extra_r)
            p99_out = float(np.quantile(out, 0.99)) if len(out) else 500.0
            for inj in c.injections:
                if inj.cause == "batch_contention":
                    eo = np.where(es == 2, (inj.magnitude * p99_out * self.rng.uniform(0.8, 1.2, len(eo))).astype(np.int64), eo)
            t = np.concatenate([t, et])
            inp = np.concatenate([inp, ei])
            out = np.concatenate([out, eo])
            stream = np.concatenate([stream, es])
            route = np.concatenate([np.full(len(t) - len(et), -1), er])
        order = np.argsort(t, kind="stable")
        self.t, self.inp, self.out, self.stream = t[order], inp[order], out[order], stream[order]
        n = len(self.t)
        self.n = n
        r0 = int(self.rng.integers(0, c.replicas))
        rr = (np.arange(n) + r0) % c.replicas  # round robin, as a load balancer spreads requests
        if route is not None:
            forced = route[order]
            rr = np.where(forced >= 0, forced, rr)
        self.replica = rr
        models = list(c.models)
        self.model_of = [models[i % len(models)] for i in range(n)] if len(models) > 1 else [models[0]] * n
        if len(models) > 1:
            self.model_of = [models[int(x)] for x in self.rng.integers(0, len(models), n)]
        a = np.array([MODELS[m][0] for m in self.model_of])
        b = np.array([MODELS[m][1] for m in self.model_of])
        step = np.array([MODELS[m][2] for m in self.model_of])
        self.P = (a + b * self.inp) / 1000.0 * self.rng.lognormal(0, 0.15, n)
        self.noise = self.rng.lognormal(0, c.sigma, n)
        self.D = step * self.out / 1000.0 * self.noise
        pause = self.rng.random(n) < c.pauses
        self.D = self.D + np.where(pause, 0.1 * (self.rng.pareto(1.5, n) + 1), 0.0)
        self.u = self.rng.random(n)
        if self.gateway:
            hour = ((self.t % DAY_S) / 3600.0)
            self.prov_base = 0.35 * np.sqrt(np.maximum(self.out, 1) / 100.0) * self.rng.lognormal(0, 0.3, n) * (
                1 + 0.25 * np.sin(2 * np.pi * (hour - 9) / 24))
        self._size_engine()
        self.knobs = self._knobs()

    # the engine is sized for the busiest normal time at utilisation rho
    def _size_engine(self) -> None:
        c = self.case
        peak = {"diurnal": 1.6, "growth": 1.0, "steady": 1.0, "azure": 1.9}[c.profile]
        lam = peak * c.rps / c.replicas
        base = self.stream == 0
        mean_s = float(np.mean(self.P[base] + self.D[base])) if base.any() else 1.0
        self.slots = max(1, int(math.ceil(lam * mean_s / c.rho)))
        self.batch_size, self.fill_s = 1, 0.02
        if c.engine == "static":
            for size in (2, 4, 8, 16, 32, 64, 128, 256):
                sample = self.rng.integers(0, max(1, int(base.sum())), (64, size))
                outs = self.out[base][sample].max(axis=1)
                ins = self.inp[base][sample].max(axis=1)
                step = MODELS[self.model_of[0]][2]
                dur = np.mean([float(prefill_s(self.model_of[0], pow2(int(i)) * size ** 0.5)) + o * step * (1 + 0.03 * size) / 1000.0
                               * 1.2 for i, o in zip(ins, outs)])
                if size / dur * c.rho >= lam:
                    break
            self.batch_size = size

    def baseline_p99(self) -> float:
        """p99 latency (s) of the base traffic with nothing on: the scale magnitudes are read against."""
        if not hasattr(self, "_p99"):
            lat = self.serve(set())[0]
            self._p99 = float(np.quantile(lat[self.stream == 0], 0.99))
            self._p50 = float(np.quantile(lat[self.stream == 0], 0.5))
        return self._p99

    def _knobs(self) -> dict[int, Knobs]:
        c = self.case
        knobs = {r: Knobs() for r in range(c.replicas)}
        for inj in c.injections:
            targets = range(c.replicas) if inj.replica is None else [inj.replica]
            m = inj.magnitude
            for r in targets:
                kn = knobs[r]
                if inj.cause == "compile_miss":
                    kn.compile_windows.append((inj.start, inj.end, max(0.2, (m - 1.0) * self.baseline_p99())))
                elif inj.cause == "gpu_throttle":
                    kn.speed.append((inj.start, inj.end, max(0.08, 1.0 / m), "gpu_throttle"))
                elif inj.cause == "gpu_contention":
                    kn.speed.append((inj.start, inj.end, max(0.08, 1.0 / m), "gpu_contention"))
                elif inj.cause == "kv_eviction":
                    kn.squeeze.append((inj.start, inj.end, max(1, int(round(self.slots / m))), min(0.6, 0.12 * m)))
                elif inj.cause == "cold_start":
                    kn.restart.append((inj.start, min(600.0, max(5.0, (m - 1.0) * self.baseline_p99()))))
        return knobs

    def serve(self, on: set[str]) -> tuple[np.ndarray, dict[int, Run], dict[int, Speed], dict[int, list], dict[int, list]]:
        """Latency (s) of every request with the mechanisms ``on``; the runs, speeds, evictions and batches per replica.

        A surge or a batch-job client that is off still arrives, on capacity of its own (as in the lab).
        """
        c = self.case
        lat = np.zeros(self.n)
        runs: dict[int, Run] = {}
        speeds: dict[int, Speed] = {}
        evictions: dict[int, list] = {}
        batches: dict[int, list] = {}
        if self.gateway:
            factor = np.ones(self.n)
            if "provider_load" in on:
                for inj in c.injections:
                    if inj.cause == "provider_load":
                        hit = (self.t >= inj.start) & (self.t < inj.end)
                        if inj.replica is not None:
                            hit &= self.replica == inj.replica
                        factor = np.where(hit, inj.magnitude, factor)
            prov = self.prov_base * factor
            lat = 0.004 + prov
            for j in range(self.n):
                runs[j] = Run(waits=[(float(self.t[j]), float(self.t[j]) + 0.001)], end=float(self.t[j] + lat[j]))
            self._prov = prov
            return lat, runs, speeds, evictions, batches
        knobs = getattr(self, "knobs", None) or {r: Knobs() for r in range(c.replicas)}
        groups = []
        for r in range(c.replicas):
            mine = self.replica == r
            sep = []
            if "queue_saturation" not in on:
                sep.append(1)
            if "batch_contention" not in on:
                sep.append(2)
            main = mine & ~np.isin(self.stream, sep)
            groups.append((r, np.flatnonzero(main), True))
            for s in sep:
                g = np.flatnonzero(mine & (self.stream == s))
                if len(g):
                    groups.append((r, g, False))
        for r, g, primary in groups:
            idx = g.tolist()
            kn = knobs[r]
            if c.engine == "static":
                got, sp, bl = simulate_static(idx, self.t, self.inp, self.out, self.model_of, self.batch_size, self.fill_s, kn, on, self.noise)
                ev: list = []
            else:
                got, sp, ev = simulate_slots(idx, self.t, self.P, self.D, self.inp, self.out, self.model_of, self.slots, kn, self.u, on)
                bl = []
            for j, run in got.items():
                lat[j] = run.end - self.t[j]
            runs.update(got)
            if primary:
                speeds[r], evictions[r], batches[r] = sp, ev, bl
        return lat, runs, speeds, evictions, batches

    # --- labels ---------------------------------------------------------------
    def label(self) -> dict[str, Any]:
        """Serve actual and counterfactuals; per request: latency, slow, cause."""
        mechs = sorted({i.cause for i in self.case.injections})
        lat, runs, speeds, evictions, batches = self.serve(set(mechs))
        self.actual = (lat, runs, speeds, evictions, batches)
        self.prov_actual = getattr(self, "_prov", None)
        cf = {m: self.serve(set(mechs) - {m})[0] for m in mechs}
        base = cf[mechs[0]] if len(mechs) == 1 else (self.serve(set())[0] if mechs else lat)
        total = np.maximum(0.0, lat - base)
        slow = total > np.maximum(SLOW_ABS_S, SLOW_REL * base)
        cause = np.full(self.n, None, dtype=object)
        if mechs:
            ex = np.stack([np.maximum(0.0, lat - cf[m]) for m in mechs])
            best = ex.argmax(axis=0)
            cause = np.where(slow, np.array(mechs, dtype=object)[best], None)
            cause = np.where(slow & (ex.max(axis=0) <= 0), "unknown", cause)
        self.lat, self.slow, self.cause = lat, slow, cause
        return {"mechs": mechs, "slow": int(slow.sum())}

    # --- telemetry --------------------------------------------------------------
    def ids(self) -> tuple[list[str], list[str]]:
        s = self.case.seed & 0xFFFFFFFF
        return [f"{s:08x}{j + 1:024x}" for j in range(self.n)], [f"{j + 1:016x}" for j in range(self.n)]

    def instance(self, r: int) -> str:
        return f"{self.case.service}-{r}" if self.case.telemetry == "vllm" else f"{self.case.service}-replica-{r}"

    def host(self, r: int) -> tuple[str, int]:
        per = 1 if self.case.telemetry == "vllm" else self.case.gpus_per_host
        return f"{self.case.service}-node-{r // per}", r % per

    def pid(self, r: int, t: float) -> int:
        restarts = sum(1 for a, _ in self.knobs[r].restart if a <= t and "cold_start" in {i.cause for i in self.case.injections})
        return 4000 + 10 * r + restarts

    def ready_at(self, r: int, t: float) -> float:
        """When the replica serving at ``t`` became ready (unix s)."""
        ready = -3600.0
        for a, load in self.knobs[r].restart:
            if a + load <= t:
                ready = a + load
        return ready

    def ts(self, s: np.ndarray | float) -> Any:
        if isinstance(s, np.ndarray):
            base = np.datetime64(T0, "us")
            return pa.array(base + (s * 1e6).astype("timedelta64[us]"), pa.timestamp("us"))
        return T0 + timedelta(seconds=float(s))

    def tables(self) -> list[tuple[str, pa.Table]]:
        """The store's tables as the collector would have written them (spec sections 3-8)."""
        c = self.case
        lat, runs, speeds, evictions, batches = self.actual
        tids, sids = self.ids()
        self.trace_ids = tids
        out: list[tuple[str, pa.Table]] = []
        inst = [self.instance(r) for r in range(c.replicas)]
        hosts = [self.host(r) for r in range(c.replicas)]
        rep = self.replica
        end = self.t + lat
        epoch0 = (T0 - datetime(1970, 1, 1)).total_seconds()
        if c.telemetry == "vllm":
            q = np.array([sum(b - a for a, b in runs[j].waits) for j in range(self.n)])
            pf = np.array([sum(min(r[2], r[1] - r[0]) for r in runs[j].runs) for j in range(self.n)])
            dec = np.maximum(0.0, lat - q - pf)
            ttft = np.array([runs[j].runs[-1][0] - self.t[j] + min(runs[j].runs[-1][2], runs[j].runs[-1][1] - runs[j].runs[-1][0]) for j in range(self.n)])
            spans = {
                "trace_id": tids, "span_id": sids, "parent_span_id": [None] * self.n, "name": ["llm_request"] * self.n,
                "kind": ["SERVER"] * self.n, "start_time": self.ts(self.t), "end_time": self.ts(end), "duration_ms": lat * 1000.0,
                "service_name": [c.service] * self.n, "service_instance_id": [inst[r] for r in rep],
                "host_name": [hosts[r][0] for r in rep], "process_pid": [self.pid(int(r), float(t)) for r, t in zip(rep, end)],
                "model": self.model_of, "input_tokens": self.inp, "output_tokens": self.out,
                "time_in_queue_s": q, "prefill_s": pf, "decode_s": dec, "e2e_s": lat, "ttft_s": ttft,
                "request_id": [f"cmpl-{j}" for j in range(self.n)],
            }
            out.append(("spans", pa.table(spans)))
            out += self._engine_metrics(runs, evictions)
            out += self._gpu_metrics()
            return out
        # full / nogpu: request spans and stage children
        pre = np.array([runs[j].preemptions for j in range(self.n)], dtype=np.int64)
        shape = np.array([pow2(int(x)) for x in self.inp], dtype=np.int64)
        for j in range(self.n):
            if runs[j].compile is not None:
                shape[j] = runs[j].compile[2]
        cols: dict[str, Any] = {
            "trace_id": tids, "span_id": sids, "parent_span_id": [None] * self.n, "name": ["POST /v1/chat/completions"] * self.n,
            "kind": ["SERVER"] * self.n, "start_time": self.ts(self.t), "end_time": self.ts(end), "duration_ms": lat * 1000.0,
            "service_name": [c.service] * self.n, "service_instance_id": [inst[r] for r in rep],
            "host_name": [hosts[r][0] for r in rep], "process_pid": [self.pid(int(r), float(t)) for r, t in zip(rep, end)],
            "role": ["request"] * self.n, "model": self.model_of, "input_tokens": self.inp, "output_tokens": self.out,
            "gpu_index": pa.array([hosts[r][1] for r in rep], pa.int32()), "shape_len": shape,
            "kv_preemptions": pre, "kv_cached_tokens": np.zeros(self.n, dtype=np.int64),
            "priority": ["interactive" if x % 7 else "batch" for x in range(self.n)],
            "replica_started_at": [epoch0 + self.ready_at(int(r), float(t)) for r, t in zip(rep, end)],
            "batch_id": [f"b{int(rep[j])}-{runs[j].batch}" if runs[j].batch is not None else None for j in range(self.n)],
        }
        if self.gateway:
            cols["gpu_index"] = pa.array([None] * self.n, pa.int32())
            cols["shape_len"] = pa.array([None] * self.n, pa.int64())
            cols["kv_preemptions"] = pa.array([None] * self.n, pa.int64())
        out.append(("spans", pa.table(cols)))
        out.append(("spans", self._stage_spans(runs, tids, sids, inst, hosts)))
        if batches and any(batches.values()):
            out += self._batch_spans(batches, runs, tids, sids, inst, hosts)
        logs = self._logs(evictions, tids, inst, hosts)
        if logs is not None:
            out.append(("logs", logs))
        if c.telemetry == "full" and not self.gateway:
            out += self._gpu_metrics()
            out += self._kv_usage(runs)
        return out

    def _stage_spans(self, runs: dict[int, Run], tids: list[str], sids: list[str], inst: list[str], hosts: list) -> pa.Table:
        c = self.case
        rows: dict[str, list] = {k: [] for k in ("trace_id", "span_id", "parent_span_id", "name", "kind", "a", "b", "role",
                                                 "service_instance_id", "host_name", "compile_kind", "compile_reason",
                                                 "compile_shape", "compile_cache", "compile_backend", "compile_frame",
                                                 "gen_ai_system", "server_address", "provider_region")}
        n_span = self.n

        def add(j: int, role: str, a: float, b: float, **kw: Any) -> None:
            nonlocal n_span
            n_span += 1
            r = int(self.replica[j])
            rows["trace_id"].append(tids[j])
            rows["span_id"].append(f"{n_span:016x}")
            rows["parent_span_id"].append(sids[j])
            rows["name"].append(kw.pop("name", role))
            rows["kind"].append("CLIENT" if role == "provider_call" else "INTERNAL")
            rows["a"].append(a)
            rows["b"].append(b)
            rows["role"].append(role)
            rows["service_instance_id"].append(inst[r])
            rows["host_name"].append(hosts[r][0])
            for k in ("compile_kind", "compile_reason", "compile_shape", "compile_cache", "compile_backend", "compile_frame",
                      "gen_ai_system", "server_address", "provider_region"):
                rows[k].append(kw.get(k))

        for j in range(self.n):
            run = runs[j]
            if self.gateway:
                t = float(self.t[j])
                add(j, "queue", t, t + 0.001)
                add(j, "provider_call", t + 0.001, t + 0.001 + float(self.prov_actual[j]), name="chat gpt-4o", gen_ai_system="openai",
                    server_address="api.openai.com", provider_region=self.case.provider_region)
                continue
            for a, b in run.waits:
                if b > a:
                    add(j, "queue", a, b)
            for st, en, p, d, _ in run.runs:
                sp = self.actual[2].get(int(self.replica[j]))
                p_end = min(en, sp.advance(st, p)) if sp is not None else min(en, st + p)
                add(j, "prefill", st, p_end)
                if en > p_end:
                    add(j, "decode", p_end, en)
            if run.compile is not None:
                a, b, shape = run.compile
                add(j, "compile", a, b, name="torch.compile", compile_kind="recompile", compile_cache="miss",
                    compile_reason=f"tensor 'input_ids' size mismatch at index 1. expected {pow2(int(self.inp[j]))}, actual {shape}",
                    compile_shape=f"[1, {shape}]", compile_backend="inductor", compile_frame="forward")
        a = np.array(rows.pop("a"))
        b = np.array(rows.pop("b"))
        cols = dict(rows)
        cols["start_time"] = self.ts(a)
        cols["end_time"] = self.ts(b)
        cols["duration_ms"] = (b - a) * 1000.0
        cols["service_name"] = [c.service] * len(a)
        return pa.table(cols)

    def _batch_spans(self, batches: dict[int, list], runs: dict[int, Run], tids: list[str], sids: list[str], inst: list[str],
                     hosts: list) -> list[tuple[str, pa.Table]]:
        rows: dict[str, list] = {k: [] for k in ("trace_id", "span_id", "batch_id", "a", "b", "service_instance_id", "host_name",
                                                 "batch_size", "batch_max_len", "batch_min_len", "batch_real_tokens",
                                                 "batch_padded_tokens", "batch_wait_s")}
        links: dict[str, list] = {k: [] for k in ("trace_id", "span_id", "linked_trace_id", "linked_span_id")}
        s = self.case.seed & 0xFFFFFFFF
        for r, bl in batches.items():
            for k, b in enumerate(bl):
                tid, sid = f"{s:08x}ba{r:06x}{k:016x}", f"ba{r:04x}{k:010x}"
                rows["trace_id"].append(tid)
                rows["span_id"].append(sid)
                rows["batch_id"].append(f"b{r}-{k}")
                rows["a"].append(b["start"])
                rows["b"].append(b["end"])
                rows["service_instance_id"].append(inst[r])
                rows["host_name"].append(hosts[r][0])
                rows["batch_size"].append(len(b["members"]))
                rows["batch_max_len"].append(b["max_len"])
                rows["batch_min_len"].append(b["min_len"])
                rows["batch_real_tokens"].append(b["real"])
                rows["batch_padded_tokens"].append(b["padded"])
                rows["batch_wait_s"].append(b["wait"])
                for j in b["members"]:
                    links["trace_id"].append(tid)
                    links["span_id"].append(sid)
                    links["linked_trace_id"].append(tids[j])
                    links["linked_span_id"].append(sids[j])
        a, b = np.array(rows.pop("a")), np.array(rows.pop("b"))
        cols = dict(rows)
        n = len(a)
        cols.update({"start_time": self.ts(a), "end_time": self.ts(b), "duration_ms": (b - a) * 1000.0, "role": ["batch"] * n,
                     "name": ["batch"] * n, "kind": ["INTERNAL"] * n, "parent_span_id": [None] * n,
                     "service_name": [self.case.service] * n})
        return [("spans", pa.table(cols)), ("span_links", pa.table(links))]

    def _logs(self, evictions: dict[int, list], tids: list[str], inst: list[str], hosts: list) -> pa.Table | None:
        c = self.case
        rows: dict[str, list] = {k: [] for k in ("t", "event_name", "service_instance_id", "host_name", "kv_blocks", "kv_reason",
                                                 "kv_victim_trace_id", "kv_usage", "load_seconds")}
        for r, ev in evictions.items():
            for t, j, tokens in ev:
                rows["t"].append(t)
                rows["event_name"].append("tailscope.kv.eviction")
                rows["service_instance_id"].append(inst[r])
                rows["host_name"].append(hosts[r][0])
                rows["kv_blocks"].append(max(1, tokens // 16))
                rows["kv_reason"].append("preemption")
                rows["kv_victim_trace_id"].append(tids[j])
                rows["kv_usage"].append(0.97)
                rows["load_seconds"].append(None)
        if "cold_start" in {i.cause for i in c.injections}:
            for r, kn in self.knobs.items():
                for a, load in kn.restart:
                    rows["t"].append(a + load)
                    rows["event_name"].append("tailscope.replica.ready")
                    rows["service_instance_id"].append(inst[r])
                    rows["host_name"].append(hosts[r][0])
                    for k in ("kv_blocks", "kv_reason", "kv_victim_trace_id", "kv_usage"):
                        rows[k].append(None)
                    rows["load_seconds"].append(load)
        if not rows["t"]:
            return None
        t = np.array(rows.pop("t"))
        cols = dict(rows)
        cols["time"] = self.ts(t)
        cols["service_name"] = [c.service] * len(t)
        cols["kv_blocks"] = pa.array(cols["kv_blocks"], pa.int64())
        cols["kv_usage"] = pa.array(cols["kv_usage"], pa.float64())
        cols["load_seconds"] = pa.array(cols["load_seconds"], pa.float64())
        cols["kv_reason"] = pa.array(cols["kv_reason"], pa.string())
        cols["kv_victim_trace_id"] = pa.array(cols["kv_victim_trace_id"], pa.string())
        return pa.table(cols)

    def _sample_times(self, every: float) -> np.ndarray:
        return np.arange(0.0, self.case.duration, every)

    def _gpu_metrics(self) -> list[tuple[str, pa.Table]]:
        c = self.case
        if c.telemetry == "nogpu":
            return []
        ts = self._sample_times(c.gpu_every_s)
        names, vals, hostc, gpuc, pidc, times = [], [], [], [], [], []
        throttle = {i.replica for i in c.injections if i.cause == "gpu_throttle"}
        foreign = [(i.replica, i.start, i.end) for i in c.injections if i.cause == "gpu_contention"]
        for r in range(c.replicas):
            host, gpu = self.host(r)
            capped = zlib.crc32(f"{c.seed}/{host}".encode()) % 2 == 0  # half the nodes run power-capped (0x4) as their normal
            clock = np.full(len(ts), 1410.0 if capped else 1980.0)
            reasons = np.full(len(ts), 0x4 if capped else 0x0, dtype=np.int64)
            for a, b, s, cause in self.knobs[r].speed:
                if cause == "gpu_throttle" and r in throttle:
                    hit = (ts >= a) & (ts < b)
                    clock = np.where(hit, clock * s, clock)
                    reasons = np.where(hit, reasons | 0x20 | 0x40, reasons)
            util = np.clip(0.55 + 0.1 * np.sin(ts / 600.0), 0, 1)
            k = len(ts)
            for name, v in (("tailscope.gpu.sm_clock", clock), ("tailscope.gpu.sm_clock.max", np.full(k, 1980.0)),
                            ("tailscope.gpu.clock_event_reasons", reasons.astype(float)), ("tailscope.gpu.utilization", util),
                            ("tailscope.gpu.memory.used", np.full(k, 60e9)), ("tailscope.gpu.memory.total", np.full(k, 80e9)),
                            ("tailscope.gpu.temperature", np.full(k, 62.0))):
                names += [name] * k
                vals.append(v)
                hostc += [host] * k
                gpuc += [gpu] * k
                pidc += [None] * k
                times.append(ts)
            # per-process memory: the serving process, a sidecar always there, and a foreign job while it runs
            procs = [(np.array([self.pid(r, float(x)) for x in ts]), np.ones(k, bool), 50e9)]
            if c.sidecar:
                procs.append((np.full(k, 900 + r), np.ones(k, bool), 0.4e9))
            for fr, a, b in foreign:
                if fr == r or fr is None:
                    procs.append((np.full(k, 7777 + r), (ts >= a) & (ts < b), 18e9))
            for pids, when, mem in procs:
                m = int(when.sum())
                names += ["tailscope.gpu.process.memory.used"] * m
                vals.append(np.full(m, mem))
                hostc += [host] * m
                gpuc += [gpu] * m
                pidc += pids[when].tolist()
                times.append(ts[when])
        t = np.concatenate(times)
        return [("metrics", pa.table({"time": self.ts(t), "name": names, "type": ["gauge"] * len(t), "value": np.concatenate(vals),
                                      "host_name": hostc, "gpu_index": pa.array(gpuc, pa.int32()), "point_pid": pa.array(pidc, pa.int64()),
                                      "gpu_uuid": [f"GPU-{h}-{g}" for h, g in zip(hostc, gpuc)], "gpu_name": ["NVIDIA H100 80GB HBM3"] * len(t)}))]

    def _occupancy(self, runs: dict[int, Run], r: int, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Waiting and running requests on replica ``r`` at each time of ``ts``."""
        mine = np.flatnonzero(self.replica == r)
        wa = np.array(sorted(a for j in mine for a, _ in runs[j].waits))
        wb = np.array(sorted(b for j in mine for _, b in runs[j].waits))
        ra = np.array(sorted(x[0] for j in mine for x in runs[j].runs))
        rb = np.array(sorted(x[1] for j in mine for x in runs[j].runs))
        waiting = np.searchsorted(wa, ts, "right") - np.searchsorted(wb, ts, "right") if len(wa) else np.zeros(len(ts))
        running = np.searchsorted(ra, ts, "right") - np.searchsorted(rb, ts, "right") if len(ra) else np.zeros(len(ts))
        return waiting.astype(float), running.astype(float)

    def _kv_usage(self, runs: dict[int, Run]) -> list[tuple[str, pa.Table]]:
        c = self.case
        ts = self._sample_times(15.0)
        t_all, v_all, inst_all = [], [], []
        for r in range(c.replicas):
            _, running = self._occupancy(runs, r, ts)
            cap = np.full(len(ts), float(self.slots))
            for a, b, c2, _ in self.knobs[r].squeeze:
                cap = np.where((ts >= a) & (ts < b), float(c2), cap)
            t_all.append(ts)
            v_all.append(np.clip(running / cap * 0.9, 0, 1))
            inst_all += [self.instance(r)] * len(ts)
        t = np.concatenate(t_all)
        return [("metrics", pa.table({"time": self.ts(t), "name": ["tailscope.kv.usage"] * len(t), "type": ["gauge"] * len(t),
                                      "value": np.concatenate(v_all), "service_name": [c.service] * len(t),
                                      "service_instance_id": inst_all}))]

    def _engine_metrics(self, runs: dict[int, Run], evictions: dict[int, list]) -> list[tuple[str, pa.Table]]:
        """vLLM's Prometheus metrics as the node agent forwards them: a scrape every 10 s per replica."""
        c = self.case
        ts = self._sample_times(10.0)
        names, vals, insts, hostc, times, types = [], [], [], [], [], []
        for r in range(c.replicas):
            waiting, running = self._occupancy(runs, r, ts)
            ev_t = np.array(sorted(e[0] for e in evictions.get(r, [])))
            pre = np.searchsorted(ev_t, ts, "right").astype(float) if len(ev_t) else np.zeros(len(ts))
            cap = np.full(len(ts), float(self.slots))
            for a, b, c2, _ in self.knobs[r].squeeze:
                cap = np.where((ts >= a) & (ts < b), float(c2), cap)
            usage = np.clip(running / cap * 0.9, 0, 1)
            for name, v, kind in (("vllm:num_requests_waiting", waiting, "gauge"), ("vllm:num_requests_running", running, "gauge"),
                                  ("vllm:kv_cache_usage_perc", usage, "gauge"), ("vllm:num_preemptions_total", pre, "sum")):
                names += [name] * len(ts)
                vals.append(v)
                insts += [self.instance(r)] * len(ts)
                hostc += [self.host(r)[0]] * len(ts)
                types += [kind] * len(ts)
                times.append(ts)
        t = np.concatenate(times)
        return [("metrics", pa.table({"time": self.ts(t), "name": names, "type": types, "value": np.concatenate(vals),
                                      "service_name": [c.service] * len(t), "service_instance_id": insts, "host_name": hostc,
                                      "is_monotonic": [k == "sum" for k in types]}))]

    # --- ground truth, as the accuracy benchmark reads it -------------------------
    def truth(self) -> dict[str, Any]:
        c = self.case
        iso = lambda s: (T0 + timedelta(seconds=float(s))).isoformat() + "Z"  # noqa: E731
        tids = self.trace_ids
        injections = []
        for inj in c.injections:
            end = inj.end
            if inj.cause == "cold_start":
                end = max(end, max((a + load for a, load in self.knobs[inj.replica or 0].restart), default=end))
            hit = (self.cause == inj.cause) & self.slow
            if inj.replica is not None and inj.cause not in ("queue_saturation",):
                hit &= self.replica == inj.replica
            eff = float((self.t[hit] + self.lat[hit]).max()) if hit.any() else end
            injections.append({"cause": inj.cause, "instance": None if inj.replica is None else self.instance(inj.replica),
                               "start": iso(inj.start), "end": iso(end), "effect_end": iso(max(end, eff)),
                               "labelled_slow": int(hit.sum()), "magnitude": inj.magnitude})
        reqs = [{"trace_id": tids[j], "slow": True, "cause": self.cause[j]} for j in np.flatnonzero(self.slow)]
        return {"start": iso(0), "end": iso(c.duration), "injections": injections, "requests": reqs, "n_requests": self.n}


def build(case: Case) -> Sim:
    sim = Sim(case)
    sim.label()
    return sim


def write(sim: Sim, store: Any) -> None:
    """Write the case's telemetry into a store (one append per table)."""
    by: dict[str, list[pa.Table]] = {}
    for name, table in sim.tables():
        by.setdefault(name, []).append(table)
    for name, tables in by.items():
        for t in tables:
            store.write([(name, t)])

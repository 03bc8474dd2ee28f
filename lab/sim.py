"""The serving loop of one replica, in virtual time.

Why virtual time: a scenario must cover many analysis windows (and the
provider scenario many hours) in seconds of wall time. What the loop decides
is real scheduling: a FIFO request queue, a dynamic batcher (max batch size,
batch-fill timeout, optional length bucketing and padding), a paged KV cache
that evicts and preempts, static batches whose members return when the longest
finishes. What each step costs comes from this machine: every prefill batch
runs the real compiled forward (``Executor``), a compile is timed by dynamo
itself, and steady compute follows the :class:`CostModel` measured at start.
All measured durations are stretched by ``scale`` (the lab's clock runs
``scale`` times slower than the CPU, as if a larger model ran here).

The same loop reruns without real execution for counterfactuals: compile
stalls are then replayed from the durations measured in the actual run.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from lab.kvcache import KVCache
from lab.model import CompileEvent, CostModel, Executor, batch_bucket, padded_len


@dataclass
class Request:
    rid: int
    arrival: float  # virtual seconds from the scenario start
    prompt: int
    output: int
    replica: int = 0
    stream: str = "base"  # base | surge | long: lets counterfactuals move a stream to its own capacity
    session: str | None = None
    blocks: tuple[int, ...] = ()  # prefix-block hashes of the prompt's full blocks
    provider: bool = False


@dataclass
class Window:
    start: float
    end: float

    def __contains__(self, t: float) -> bool:
        return self.start <= t < self.end


@dataclass
class ReplicaSpec:
    """How one replica serves: batching, padding, KV, and injected conditions."""

    max_batch: int = 8
    fill_timeout: float = 0.02
    buckets: tuple[int, ...] | None = (32, 64, 128, 256, 512, 1024)
    pad_multiple: int = 8
    pad_batch: str = "max"  # "max": batch dim always max_batch (one shape per length); "pow2"
    length_bucketing: bool = False  # batch only requests of the head's bucket
    kv_blocks: int | None = 4096
    block_tokens: int = 16
    # injected conditions (windows in virtual seconds)
    no_bucketing: list[Window] = field(default_factory=list)
    kv_squeeze: list[tuple[Window, int]] = field(default_factory=list)  # capacity while inside
    throttle: list[tuple[Window, float]] = field(default_factory=list)  # (window, sm clock ratio)
    contention: list[tuple[Window, float]] = field(default_factory=list)  # (window, share of the GPU taken)
    restarts: list[tuple[float, float]] = field(default_factory=list)  # (time, weight-load seconds)
    warm_shapes: bool = True  # compile every (batch, bucket) shape during model load


@dataclass
class Switches:
    """Mechanisms that are ON. Counterfactuals turn exactly one off."""

    compile: bool = True
    kv: bool = True
    throttle: bool = True
    contention: bool = True
    restart: bool = True
    bucketing_off: bool = True


@dataclass
class BatchRecord:
    bid: str
    replica: int
    start: float
    prefill_start: float
    prefill_end: float
    end: float
    members: list[int]
    size: int
    max_len: int
    min_len: int
    real_tokens: int
    padded_tokens: int
    wait: float
    shape: tuple[int, int]
    compile: CompileEvent | None = None
    compile_start: float = 0.0
    compile_end: float = 0.0


@dataclass
class Outcome:
    rid: int
    arrival: float
    scheduled: float = math.nan
    prefill_start: float = math.nan
    prefill_end: float = math.nan
    decode_start: float = math.nan
    end: float = math.nan
    batch: str = ""
    shape_len: int = 0
    cached_tokens: int = 0
    preemptions: int = 0
    compile_s: float = 0.0
    generated: int = 0
    # (batch id, batch start, prefill start, prefill end, left the batch): one per time scheduled
    segments: list[tuple[str, float, float, float, float]] = field(default_factory=list)

    @property
    def latency(self) -> float:
        return self.end - self.arrival


@dataclass
class KvLog:
    time: float
    blocks: int
    reason: str
    usage: float
    victim: int | None


@dataclass
class LoadRecord:
    start: float
    end: float
    real_seconds: float  # measured model build + warm-up compiles
    compiles: int
    warmup: list[CompileEvent] = field(default_factory=list)


@dataclass
class ReplicaRun:
    outcomes: dict[int, Outcome]
    batches: list[BatchRecord]
    kv_log: list[KvLog]
    kv_usage: list[tuple[float, float]]
    loads: list[LoadRecord]
    busy: list[tuple[float, float]]
    compile_costs: dict[tuple[int, int], float]


class _Live:
    """A request inside the loop (carries preemption state)."""

    __slots__ = ("req", "enq", "generated", "private", "pinned")

    def __init__(self, req: Request, enq: float) -> None:
        self.req = req
        self.enq = enq
        self.generated = 0
        self.private = 0
        self.pinned: tuple[int, ...] = ()


def _factor(spec: ReplicaSpec, sw: Switches, t: float) -> float:
    """How much slower the (emulated) GPU runs at ``t``: clocks below max
    slow it by max/current; a foreign job taking share s leaves 1-s."""
    f = 1.0
    if sw.throttle:
        for w, ratio in spec.throttle:
            if t in w:
                f *= 1.0 / ratio
    if sw.contention:
        for w, share in spec.contention:
            if t in w:
                f *= 1.0 / (1.0 - share)
    return f


def simulate(
    replica: int,
    requests: list[Request],
    spec: ReplicaSpec,
    cost: CostModel,
    scale: float,
    switches: Switches | None = None,
    executor: Executor | None = None,
    compile_costs: dict[tuple[int, int], float] | None = None,
    on_window: Callable[[str, bool], None] | None = None,
    load_real_seconds: float | None = None,
    progress: Callable[[int], None] | None = None,
    execute_all: bool = False,
) -> ReplicaRun:
    """Serve ``requests`` (this replica's, sorted by arrival) and return what happened.

    With ``executor`` the loop runs the real forward for every batch shape the
    replica has not run yet (every batch with ``execute_all``): that is where
    torch.compile compiles, and what it costs is measured; without it, compile stalls come from ``compile_costs`` (the
    actual run's measured durations, by shape; 0 when ``switches.compile`` is off).
    """
    sw = switches or Switches()
    arrivals = sorted(requests, key=lambda r: (r.arrival, r.rid))
    costs: dict[tuple[int, int], float] = dict(compile_costs or {})
    default_compile = (sorted(costs.values())[len(costs) // 2] if costs else 0.25)
    kv = KVCache(spec.kv_blocks if sw.kv else None, spec.block_tokens)
    out = {r.rid: Outcome(r.rid, r.arrival) for r in arrivals}
    batches: list[BatchRecord] = []
    kv_log: list[KvLog] = []
    kv_usage: list[tuple[float, float]] = []
    loads: list[LoadRecord] = []
    busy: list[tuple[float, float]] = []
    shapes: set[tuple[int, int]] = set()
    queue: deque[_Live] = deque()
    restarts = sorted(spec.restarts) if sw.restart else []
    t = 0.0
    i = 0
    n = len(arrivals)
    done = 0
    nbatch = 0
    contention_on = False

    warm_events: list[CompileEvent] = []

    def warm_shapes() -> list[tuple[int, int]]:
        if not (spec.warm_shapes and spec.buckets):
            return []
        bs = [spec.max_batch] if spec.pad_batch == "max" else [b for b in (1, 2, 4, 8, 16, 32, 64) if b <= spec.max_batch]
        return [(b, L) for b in bs for L in spec.buckets]

    def warm(start: float, weight_load: float) -> float:
        """Model load: (re)build the process, compile every bucket shape."""
        nonlocal shapes
        shapes = set()
        compiles = 0
        real = 0.0
        if executor is not None:
            import time as _time

            t0 = _time.thread_time()  # CPU time: see Executor.run
            executor.restart()
            for shape in warm_shapes():
                r = executor.run(*shape)
                if r.compile is not None:
                    costs[shape] = r.compile.seconds
                    compiles += 1
                    warm_events.append(r.compile)
                shapes.add(shape)
            real = _time.thread_time() - t0
        else:
            for shape in warm_shapes():
                real += costs.get(shape, default_compile)
                shapes.add(shape)
                compiles += 1
        if load_real_seconds is not None and executor is None:
            real = load_real_seconds
        dur = weight_load + real * scale
        loads.append(LoadRecord(start, start + dur, real, compiles, list(warm_events)))
        warm_events.clear()
        return start + dur

    # The replica starts warm: its initial load (and warm-up compiles) happened
    # before the scenario, so its bucket shapes cost no stall.
    if executor is not None and execute_all:
        warm(-1e9, 0.0)
        loads.clear()
        warm_events.clear()
    else:
        shapes.update(warm_shapes())

    def admit_until(limit: float) -> None:
        nonlocal i
        while i < n and arrivals[i].arrival <= limit:
            queue.append(_Live(arrivals[i], arrivals[i].arrival))
            i += 1

    while done < n:
        if restarts and t >= restarts[0][0]:
            at, weight_load = restarts.pop(0)
            t = warm(max(t, at), weight_load)
            continue
        if not queue:
            if i >= n:
                break
            nt = max(t, arrivals[i].arrival)
            if restarts and nt >= restarts[0][0]:
                at, weight_load = restarts.pop(0)
                t = warm(max(t, at), weight_load)
                continue
            t = nt
        admit_until(t)
        if len(queue) < spec.max_batch:
            deadline = queue[0].enq + spec.fill_timeout
            nxt = arrivals[i].arrival if i < n else math.inf
            if t < deadline:
                t = min(deadline, nxt)
                continue
        # --- form a batch --------------------------------------------------
        bucketing = spec.buckets if not (sw.bucketing_off and any(t in w for w in spec.no_bucketing)) else None
        cap = spec.kv_blocks
        for w, c in spec.kv_squeeze:
            if t in w:
                cap = c
        if sw.kv:
            kv.capacity = cap
        head = queue[0]
        members: list[_Live] = []
        head_bucket = padded_len(head.req.prompt, spec.buckets) if spec.length_bucketing and spec.buckets else None
        skipped: list[_Live] = []
        hits: dict[int, int] = {}
        while queue and len(members) < spec.max_batch:
            lv = queue.popleft()
            if head_bucket is not None and padded_len(lv.req.prompt, spec.buckets) != head_bucket:
                skipped.append(lv)
                continue
            private = math.ceil((lv.req.prompt + lv.generated) / spec.block_tokens) - len(lv.req.blocks) + 1
            if not kv.can_fit(lv.req.blocks, max(private, 1)):
                if members:
                    skipped.append(lv)
                    break
                # nothing runs between batches, so nothing can be preempted: make room
                # by dropping the whole prefix cache (a lone request may over-commit)
                dropped = kv.drop_unpinned()
                if dropped is not None:
                    kv_log.append(KvLog(t, dropped.blocks, dropped.reason, dropped.usage, None))
            hit, ev = kv.admit(lv.req.blocks, max(private, 1))
            if ev is not None:
                kv_log.append(KvLog(t, ev.blocks, ev.reason, ev.usage, None))
            lv.private = max(private, 1)
            lv.pinned = lv.req.blocks
            o = out[lv.req.rid]
            if lv.generated == 0:
                o.cached_tokens = hit * spec.block_tokens
            else:
                o.cached_tokens = min(o.cached_tokens, hit * spec.block_tokens)
            hits[lv.req.rid] = hit * spec.block_tokens
            members.append(lv)
        for lv in reversed(skipped):
            queue.appendleft(lv)
        # prefill computes what the cache did not hold (a preempted request
        # recomputes its prompt and the tokens it had generated)
        lens = [max(1, lv.req.prompt + lv.generated - hits[lv.req.rid]) for lv in members]
        L = max(lens)
        Lp = padded_len(L, bucketing, spec.pad_multiple)
        Bp = spec.max_batch if spec.pad_batch == "max" else batch_bucket(len(members), spec.max_batch)
        nbatch += 1
        bid = f"r{replica}-b{nbatch}"
        start = t
        f = _factor(spec, sw, t)
        if executor is not None and on_window is not None:
            want = any(t in w for w, _ in spec.contention) and sw.contention
            if want != contention_on:
                on_window("contention", want)
                contention_on = want
        stall = 0.0
        event: CompileEvent | None = None
        if (Bp, Lp) not in shapes:
            if executor is not None:
                if not executor.has_run and warm_shapes():
                    # the replica warmed its bucket shapes before the scenario (not
                    # charged); run one now so this shape is a recompile, as it would be
                    executor.run(*warm_shapes()[0])
                r = executor.run(Bp, Lp)
                event = r.compile
                # no compile event: dynamo's recompile limit was hit and the frame runs eager
                costs[(Bp, Lp)] = event.seconds if event is not None else 0.0
                if event is not None:
                    stall = event.seconds * scale
            elif sw.compile:
                stall = costs.get((Bp, Lp), default_compile) * scale
            shapes.add((Bp, Lp))
        elif executor is not None and execute_all:
            executor.run(Bp, Lp)
        compile_start = t
        t += stall
        prefill_start = t
        t += cost.prefill(Bp, Lp) * scale * f
        prefill_end = t
        for lv in members:
            o = out[lv.req.rid]
            if math.isnan(o.scheduled):
                o.scheduled = start
                o.prefill_start = prefill_start
            o.prefill_end = prefill_end
            o.decode_start = prefill_end
            o.shape_len = Lp
            o.batch = bid
            o.compile_s += stall
            o.segments.append((bid, start, prefill_start, prefill_end, math.nan))
        # --- decode: static batch, until the longest member is done ----------
        running = list(members)
        finished: list[_Live] = []
        preempted: list[_Live] = []
        while running:
            step_f = _factor(spec, sw, t)
            t += cost.decode_step(batch_bucket(len(running), spec.max_batch)) * scale * step_f
            for lv in list(running):
                if lv.generated < lv.req.output:
                    lv.generated += 1
                    if (lv.req.prompt + lv.generated) % spec.block_tokens == 0 and lv.generated < lv.req.output:
                        ok, ev = kv.grow(1)
                        if not ok and len(running) == 1:
                            kv.used_private += 1  # a lone request always proceeds (over-commit)
                            ok = True
                        if ev is not None:
                            kv_log.append(KvLog(t, ev.blocks, ev.reason, ev.usage, None))
                        if ok:
                            lv.private += 1
                            continue
                        # out of blocks: preempt the most recently arrived running member
                        victim = max(running, key=lambda x: (x.req.arrival, x.req.rid))
                        running.remove(victim)
                        kv.release(victim.pinned, victim.private)
                        kv_log.append(KvLog(t, victim.private + len(victim.pinned), "preemption", kv.usage(), victim.req.rid))
                        victim.private = 0
                        out[victim.req.rid].preemptions += 1
                        seg = out[victim.req.rid].segments[-1]
                        out[victim.req.rid].segments[-1] = seg[:4] + (t,)
                        preempted.append(victim)
                        if victim is not lv:
                            ok2, _ = kv.grow(1)
                            if ok2:
                                lv.private += 1
            if all(lv.generated >= lv.req.output for lv in running):
                finished.extend(running)
                running = []
        end = t
        busy.append((start, end))
        for lv in finished:
            o = out[lv.req.rid]
            o.end = end
            o.generated = lv.generated
            o.segments[-1] = o.segments[-1][:4] + (end,)
            kv.release(lv.pinned, lv.private)
            done += 1
        for lv in reversed(preempted):
            lv.enq = end
            queue.appendleft(lv)
        kv_usage.append((end, kv.usage()))
        real_tokens = sum(lens)
        batches.append(
            BatchRecord(
                bid=bid, replica=replica, start=start, prefill_start=prefill_start, prefill_end=prefill_end, end=end,
                members=[lv.req.rid for lv in members], size=len(members), max_len=max(lens), min_len=min(lens),
                real_tokens=real_tokens, padded_tokens=Bp * Lp, wait=max(0.0, start - min(lv.enq for lv in members)),
                shape=(Bp, Lp), compile=event, compile_start=compile_start, compile_end=compile_start + stall,
            )
        )
        if progress is not None:
            progress(done)
        admit_until(t)
    if contention_on and on_window is not None:
        on_window("contention", False)
    return ReplicaRun(out, batches, kv_log, kv_usage, loads, busy, costs)

"""The lab's scenarios: one per cause of spec section 9, a control, and mixtures.

Each scenario is a service, its replicas (how each batches, pads and caches),
the requests (arrival times and lengths from Poisson/diurnal generators or a
public-trace replay), and the injections: which mechanism is switched on, on
which replica, in which window of virtual time. Nothing here reaches the
telemetry: the analyzer learns about injections only through what the
mechanisms do to the served requests.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lab.loadgen import (
    OUTPUT_MAX,
    PROMPT_MAX,
    LengthSampler,
    azure_or_synthetic,
    scale_lengths,
    diurnal,
    mooncake_or_synthetic,
    poisson,
)
from lab.provider import Provider
from lab.sim import ReplicaSpec, Request, Window
from tailscope.causes import INJECTABLE_CAUSES as CAUSES


SYSTEM_BLOCKS = 4  # a shared system prompt: 4 blocks of 16 tokens every chat request starts with


@dataclass
class Injection:
    """One injected mechanism: ``cause`` on ``replica`` (None: the whole service) during [start, end)."""

    cause: str
    start: float
    end: float
    replica: int | None = None
    detail: dict = field(default_factory=dict)


@dataclass
class Scenario:
    name: str
    description: str
    service: str
    duration: float  # virtual seconds
    specs: list[ReplicaSpec]
    requests: list[Request]
    injections: list[Injection]
    provider: Provider | None = None  # set: a gateway service whose requests call the provider
    start_local: tuple[str, int] = ("UTC", 10)  # (time zone, hour) the scenario's virtual time 0 falls on
    model: str = "tiny-lm"
    sources: list[str] = field(default_factory=list)  # the traces (or stand-ins) that drove it

    @property
    def causes(self) -> set[str]:
        return {i.cause for i in self.injections}


class Sessions:
    """Multi-turn conversations: each turn's prompt extends the last (prefix reuse)."""

    def __init__(self, n: int, rng: random.Random, first_uid: int = 1) -> None:
        self.rng = rng
        self.next_uid = first_uid
        self.pool = [self._new() for _ in range(n)]

    def _new(self) -> list[int]:
        uid = self.next_uid
        self.next_uid += 1
        return [uid, 0]  # uid, history tokens

    def turn(self, prompt: int, output: int) -> tuple[str, int, tuple[int, ...]]:
        k = self.rng.randrange(len(self.pool))
        st = self.pool[k]
        total = SYSTEM_BLOCKS * 16 + st[1] + max(8, prompt // 2)
        if total > PROMPT_MAX:
            st = self.pool[k] = self._new()
            total = SYSTEM_BLOCKS * 16 + max(8, prompt // 2)
        full = total // 16
        blocks = tuple(i for i in range(min(full, SYSTEM_BLOCKS))) + tuple(
            st[0] * 4096 + i for i in range(SYSTEM_BLOCKS, full)
        )
        st[1] = total - SYSTEM_BLOCKS * 16 + output
        return f"s{st[0]}", total, blocks


def _route(n: int, replicas: int, rng: random.Random) -> list[int]:
    """Round-robin with a random start, as a load balancer would spread requests."""
    first = rng.randrange(replicas)
    return [(first + i) % replicas for i in range(n)]


def chat_requests(
    times: list[float],
    replicas: int,
    rng: random.Random,
    sampler: LengthSampler,
    sessions: Sessions,
    stream: str = "base",
    first_rid: int = 0,
    replica: int | None = None,
    output_mult: float = 1.0,
    output_cap: int = OUTPUT_MAX,
) -> list[Request]:
    route = _route(len(times), replicas, rng)
    out = []
    for k, t in enumerate(times):
        shape = sampler.draw(rng)
        output = max(2, min(output_cap, int(shape.output * output_mult)))
        sid, prompt, blocks = sessions.turn(shape.prompt, output)
        out.append(
            Request(first_rid + k, t, prompt, output, replica if replica is not None else route[k], stream, sid, blocks)
        )
    return out


KV_PROMPT_MAX = 1024  # the KV scenario keeps longer (Mooncake-like) prompts
KV_BLOCKS = 65536  # normal KV capacity per replica: a scenario's working set fits (no evictions)
KV_BLOCKS_LONG = 65536  # the same for the Mooncake replay's long prompts


def _specs(n: int, **kw: object) -> list[ReplicaSpec]:
    kw.setdefault("kv_blocks", KV_BLOCKS)
    return [ReplicaSpec(**kw) for _ in range(n)]  # type: ignore[arg-type]


# --- catalog --------------------------------------------------------------

DURATION = 720.0  # 12 virtual minutes: 12 analysis windows of 60 s
WINDOW = Window(300.0, 480.0)  # the default injection window: minutes 5-8
BASE_RATE = 2.2  # requests per second per replica


def _base(seed: int, data_dir: Path | None, replicas: int = 2, rate: float = BASE_RATE, duration: float = DURATION) -> tuple[random.Random, LengthSampler, Sessions, list[Request]]:
    rng = random.Random(seed)
    rows, _ = azure_or_synthetic(data_dir)
    sampler = LengthSampler(rows)
    sessions = Sessions(24 * replicas, rng)
    times = poisson(rate * replicas, 0.0, duration, rng)
    return rng, sampler, sessions, chat_requests(times, replicas, rng, sampler, sessions)


def control(seed: int = 1, data_dir: Path | None = None) -> Scenario:
    _, _, _, reqs = _base(seed, data_dir)
    return Scenario("control", "steady Poisson traffic, bucketing on, nothing injected", "chat-api", DURATION, _specs(2), reqs, [])


def control_azure(seed: int = 12, data_dir: Path | None = None, from_minute: float = 20.0) -> Scenario:
    """The Azure conv trace's own arrivals (minutes 20-32, its load swell, at real
    speed) and lengths, nothing injected: a control with real burstiness."""
    rng = random.Random(seed)
    rows, source = azure_or_synthetic(data_dir)
    t0 = from_minute * 60
    picked = [(t - t0, c, g) for t, c, g in rows if t0 <= t < t0 + DURATION]
    sessions = Sessions(48, rng)
    reqs = []
    for k, (t, c, g) in enumerate(picked):
        shape = scale_lengths(c, g)
        sid, prompt, blocks = sessions.turn(shape.prompt, shape.output)
        reqs.append(Request(k, t, prompt, shape.output, k % 2, "base", sid, blocks))
    return Scenario(
        "control_azure", f"replay of the Azure LLM conv trace's arrivals and lengths (minutes {from_minute:.0f}-{from_minute + 12:.0f}, its load swell), nothing injected",
        "chat-api", DURATION, _specs(2), reqs, [], sources=[source + f", arrivals replayed from minute {from_minute:.0f}"],
    )


def compile_miss(seed: int = 2, data_dir: Path | None = None, window: Window = WINDOW, replica: int = 0) -> Scenario:
    _, _, _, reqs = _base(seed, data_dir)
    specs = _specs(2, pad_multiple=32)
    specs[replica].no_bucketing.append(window)
    return Scenario(
        "compile_miss",
        f"a deploy swaps replica-{replica}'s power-of-two length buckets for padding to multiples of 32: every new padded length recompiles (torch.compile, dynamic=False)",
        "chat-api", DURATION, specs, reqs,
        [Injection("compile_miss", window.start, window.end, replica, {"bucketing": "off", "pad_multiple": specs[replica].pad_multiple})],
    )


def kv_eviction(seed: int = 3, data_dir: Path | None = None, window: Window = WINDOW, replica: int = 0, squeezed_blocks: int = 200) -> Scenario:
    """Driven by the Mooncake trace: its arrivals (sped up), lengths and prefix-block hashes."""
    rows, source = mooncake_or_synthetic(data_dir)
    span = rows[-1][0] or 1.0
    speed = span / DURATION
    reqs: list[Request] = []
    for k, (t, inp, outp, hashes) in enumerate(rows):
        # one Mooncake block (512 tokens) becomes two lab blocks (16 tokens each)
        prompt = max(16, min(KV_PROMPT_MAX, math.ceil(inp / 16)))
        output = max(2, min(OUTPUT_MAX, math.ceil(outp / 4)))
        blocks = tuple(x for h in hashes for x in (2 * h, 2 * h + 1))[: prompt // 16]
        # prefix-affine routing (as a cache-aware router does): same first block, same replica
        reqs.append(Request(k, t / speed, prompt, output, hashes[0] % 2 if hashes else k % 2, "base", None, blocks))
    specs = _specs(2, kv_blocks=KV_BLOCKS_LONG, pad_batch="pow2")
    specs[replica].kv_squeeze.append((window, squeezed_blocks))
    return Scenario(
        "kv_eviction",
        f"Mooncake replay with prefix reuse; KV capacity on replica-{replica} squeezed to {squeezed_blocks} blocks (a co-located tenant pins the rest): prefix blocks evicted, running requests preempted and recomputed",
        "chat-api", DURATION, specs, reqs,
        [Injection("kv_eviction", window.start, window.end, replica, {"capacity_blocks": squeezed_blocks, "normal_blocks": KV_BLOCKS_LONG})],
    )


def batch_contention(seed: int = 4, data_dir: Path | None = None, window: Window = WINDOW, replica: int = 0) -> Scenario:
    rng, sampler, sessions, reqs = _base(seed, data_dir)
    times = poisson(0.6, window.start, window.end, rng)
    longs = chat_requests(times, 2, rng, sampler, sessions, stream="long", first_rid=len(reqs), replica=replica, output_mult=6.0, output_cap=4 * OUTPUT_MAX)
    return Scenario(
        "batch_contention",
        f"a batch-job client sends long generations to replica-{replica}; short requests in the same static batches wait for the longest member",
        "chat-api", DURATION, _specs(2), reqs + longs,
        [Injection("batch_contention", window.start, window.end, replica, {"long_rate_per_s": 0.6, "output_mult": 6})],
    )


def queue_saturation(seed: int = 5, data_dir: Path | None = None, window: Window = WINDOW) -> Scenario:
    rng, sampler, sessions, reqs = _base(seed, data_dir)
    extra = 4.0 * BASE_RATE
    times = poisson(extra * 2, window.start, window.end, rng)
    surge = chat_requests(times, 2, rng, sampler, sessions, stream="surge", first_rid=len(reqs))
    return Scenario(
        "queue_saturation",
        "a traffic surge (5x the base rate, same request mix) on both replicas pushes utilisation past capacity",
        "chat-api", DURATION, _specs(2), reqs + surge,
        [Injection("queue_saturation", window.start, window.end, None, {"rate_multiplier": 5})],
    )


def gpu_throttle(seed: int = 6, data_dir: Path | None = None, window: Window = WINDOW, replica: int = 1, ratio: float = 0.45) -> Scenario:
    _, _, _, reqs = _base(seed, data_dir)
    specs = _specs(2)
    specs[replica].throttle.append((window, ratio))
    return Scenario(
        "gpu_throttle",
        f"replica-{replica}'s GPU hits its power cap and thermal slowdown: SM clock at {ratio:.0%} of max (reasons 0x4|0x20)",
        "chat-api", DURATION, specs, reqs,
        [Injection("gpu_throttle", window.start, window.end, replica, {"clock_ratio": ratio, "reasons": 0x24})],
    )


def gpu_contention(seed: int = 7, data_dir: Path | None = None, window: Window = WINDOW, replica: int = 0, share: float = 0.6) -> Scenario:
    _, _, _, reqs = _base(seed, data_dir)
    specs = _specs(2)
    specs[replica].contention.append((window, share))
    return Scenario(
        "gpu_contention",
        f"a co-located batch job takes {share:.0%} of replica-{replica}'s GPU (and a real CPU-burning process runs beside the lab)",
        "chat-api", DURATION, specs, reqs,
        [Injection("gpu_contention", window.start, window.end, replica, {"share": share})],
    )


def cold_start(seed: int = 8, data_dir: Path | None = None, at: float = 300.0, replica: int = 1, weight_load_s: float = 12.0) -> Scenario:
    _, _, _, reqs = _base(seed, data_dir)
    specs = _specs(2)
    specs[replica].restarts.append((at, weight_load_s))
    return Scenario(
        "cold_start",
        f"replica-{replica} restarts at minute {at / 60:.0f}: weights load ({weight_load_s:.0f} s emulated) then real warm-up compiles; its queue waits",
        "chat-api", DURATION, specs, reqs,
        [Injection("cold_start", at, at + weight_load_s, replica, {"weight_load_s": weight_load_s})],
    )


def provider_load(seed: int = 9, data_dir: Path | None = None) -> Scenario:
    """A gateway whose requests call an upstream provider in New York, over 12 virtual hours
    (05:00-17:00 New York time, diurnal arrivals rising through the morning)."""
    rng = random.Random(seed)
    sampler = LengthSampler(azure_or_synthetic(data_dir)[0])
    provider = Provider(width_h=1.2)
    duration = 12 * 3600.0
    times = diurnal(20 / 60, 0.3, 24 * 3600.0, 0.0, duration, rng, phase_s=1 * 3600.0)
    reqs = []
    for k, t in enumerate(times):
        shape = sampler.draw(rng)
        reqs.append(Request(k, t, shape.prompt, shape.output, k % 2, "base", None, (), provider=True))
    return Scenario(
        "provider_load",
        f"a gateway calling an upstream provider ({provider.region}) whose latency triples around {provider.peak_hour:.0f}:00 its local time (12 virtual hours)",
        "agent-api", duration, _specs(2), reqs,
        # the window is filled in by the runner from the provider's curve (needs the epoch)
        [Injection("provider_load", math.nan, math.nan, None, {"region": provider.region, "peak": provider.peak})],
        provider=provider,
        start_local=(provider.region, 5),
    )


def mix_compile_throttle(seed: int = 10, data_dir: Path | None = None) -> Scenario:
    a, b = Window(240.0, 420.0), Window(360.0, 540.0)
    _, _, _, reqs = _base(seed, data_dir)
    specs = _specs(2, pad_multiple=32)
    specs[0].no_bucketing.append(a)
    specs[1].throttle.append((b, 0.45))
    return Scenario(
        "mix_compile_throttle",
        "compile misses on replica-0 (minutes 4-7) overlapping GPU throttling on replica-1 (minutes 6-9)",
        "chat-api", DURATION, specs, reqs,
        [Injection("compile_miss", a.start, a.end, 0, {"bucketing": "off"}), Injection("gpu_throttle", b.start, b.end, 1, {"clock_ratio": 0.45, "reasons": 0x24})],
    )


def mix_queue_kv(seed: int = 11, data_dir: Path | None = None) -> Scenario:
    """Overlapping in time on the same service: a surge on both replicas and a KV squeeze on replica-0."""
    a, b = Window(240.0, 420.0), Window(360.0, 540.0)
    rng, sampler, sessions, reqs = _base(seed, data_dir)
    times = poisson(4.0 * BASE_RATE * 2, a.start, a.end, rng)
    surge = chat_requests(times, 2, rng, sampler, sessions, stream="surge", first_rid=len(reqs))
    specs = _specs(2)
    specs[0].kv_squeeze.append((b, 160))
    return Scenario(
        "mix_queue_kv",
        "a traffic surge (minutes 4-7, both replicas) overlapping a KV squeeze on replica-0 (minutes 6-9)",
        "chat-api", DURATION, specs, reqs + surge,
        [Injection("queue_saturation", a.start, a.end, None, {"rate_multiplier": 5}), Injection("kv_eviction", b.start, b.end, 0, {"capacity_blocks": 200})],
    )


CATALOG: dict[str, Callable[..., Scenario]] = {
    "control": control,
    "control_azure": control_azure,
    "compile_miss": compile_miss,
    "kv_eviction": kv_eviction,
    "batch_contention": batch_contention,
    "queue_saturation": queue_saturation,
    "provider_load": provider_load,
    "gpu_throttle": gpu_throttle,
    "gpu_contention": gpu_contention,
    "cold_start": cold_start,
    "mix_compile_throttle": mix_compile_throttle,
    "mix_queue_kv": mix_queue_kv,
}


def build(name: str, data_dir: Path | None = None, **kw: object) -> Scenario:
    try:
        factory = CATALOG[name]
    except KeyError:
        raise ValueError(f"unknown scenario {name!r}; known: {', '.join(CATALOG)}") from None
    scn = factory(data_dir=data_dir, **kw)
    if not scn.sources:
        if name == "kv_eviction":
            scn.sources.append(mooncake_or_synthetic(data_dir)[1])
        else:
            scn.sources.append(azure_or_synthetic(data_dir)[1])
    return scn

"""Ground truth by counterfactual: consistent with the actual run, and honest.

Simulation only (fixed cost model): the counterfactual reruns are exactly the
loop the actual run used, with one mechanism switched off.
"""

from __future__ import annotations

import random

import pytest

from lab import truth
from lab.loadgen import LengthSampler
from lab.model import CostModel
from lab.provider import Provider
from lab.scenarios import Injection, Scenario, Sessions, chat_requests
from lab.sim import ReplicaSpec, Request, Window
from lab.loadgen import poisson

COST = CostModel(a=0.0003, b=2e-6, c=1e-8, step={1: 0.0004, 2: 0.0004, 4: 0.00045, 8: 0.0005})
SAMPLER = LengthSampler([(0.0, c, g) for c, g in ((300, 60), (800, 120), (1500, 200), (120, 30), (2500, 400))])


def small(causes: dict[str, Window], seed: int = 1, duration: float = 240.0) -> Scenario:
    rng = random.Random(seed)
    sessions = Sessions(16, rng)
    reqs = chat_requests(poisson(4.0, 0.0, duration, rng), 2, rng, SAMPLER, sessions)
    specs = [ReplicaSpec(kv_blocks=65536, pad_multiple=32) for _ in range(2)]
    inj = []
    for cause, w in causes.items():
        if cause == "compile_miss":
            specs[0].no_bucketing.append(w)
        elif cause == "gpu_throttle":
            specs[1].throttle.append((w, 0.4))
        elif cause == "kv_eviction":
            specs[0].kv_squeeze.append((w, 48))
        elif cause == "queue_saturation":
            extra = chat_requests(poisson(12.0, w.start, w.end, rng), 2, rng, SAMPLER, sessions, stream="surge", first_rid=len(reqs))
            reqs += extra
        elif cause == "batch_contention":
            extra = chat_requests(poisson(0.5, w.start, w.end, rng), 2, rng, SAMPLER, sessions, stream="long", first_rid=len(reqs), replica=0, output_mult=6, output_cap=384)
            reqs += extra
        elif cause == "cold_start":
            specs[1].restarts.append((w.start, w.end - w.start))
        inj.append(Injection(cause, w.start, w.end, None))
    return Scenario("t", "test", "chat-api", duration, specs, reqs, inj)


def actual(scn: Scenario, costs: dict) -> dict[int, float]:
    return truth.serve(scn, COST, 10.0, frozenset(), costs, {1: 0.3}, 0.0)


COSTS = {0: {(8, L): 0.3 for L in range(32, 2049, 32)}}


def test_counterfactual_with_nothing_off_reproduces_the_actual_run() -> None:
    scn = small({"compile_miss": Window(60, 120), "gpu_throttle": Window(90, 150), "batch_contention": Window(100, 160)})
    a = actual(scn, COSTS)
    b = truth.serve(scn, COST, 10.0, frozenset(), COSTS, {1: 0.3}, 0.0)
    assert a == b


@pytest.mark.parametrize("cause", ["compile_miss", "gpu_throttle", "kv_eviction", "queue_saturation", "batch_contention", "cold_start"])
def test_each_mechanism_labels_slow_requests_only_from_its_window_on(cause: str) -> None:
    w = Window(80.0, 140.0) if cause != "cold_start" else Window(80.0, 100.0)
    scn = small({cause: w})
    a = actual(scn, COSTS)
    labels = truth.label(scn, a, COST, 10.0, COSTS, {1: 0.3}, 0.0)
    assert truth.check_consistent(labels) == []
    slow = [x for x in labels.values() if x.slow]
    assert len(slow) >= 5, f"{cause}: only {len(slow)} labelled slow"
    assert {x.cause for x in slow} == {cause}
    # nothing before the injection is affected by it
    early = [x for x in labels.values() if x.arrival + x.latency < w.start]
    assert early and all(x.excess[cause] == 0.0 and not x.slow for x in early)
    # a single mechanism: its excess is the whole excess
    for x in slow:
        assert x.excess[cause] == pytest.approx(x.total_excess)


def test_no_injection_means_no_slow_labels() -> None:
    scn = small({})
    a = actual(scn, COSTS)
    labels = truth.label(scn, a, COST, 10.0, COSTS, {}, 0.0)
    assert not any(x.slow for x in labels.values())


def test_mixture_on_two_replicas_labels_each_replica_with_its_own_cause() -> None:
    scn = small({"compile_miss": Window(60, 120), "gpu_throttle": Window(90, 150)})
    a = actual(scn, COSTS)
    labels = truth.label(scn, a, COST, 10.0, COSTS, {}, 0.0)
    by_replica = {0: set(), 1: set()}
    for x in labels.values():
        if x.slow:
            by_replica[x.replica].add(x.cause)
    assert by_replica == {0: {"compile_miss"}, 1: {"gpu_throttle"}}


def test_provider_counterfactual_is_the_off_peak_latency_with_the_same_noise() -> None:
    from datetime import datetime
    from zoneinfo import ZoneInfo

    p = Provider()
    day = datetime(2026, 7, 1, 0, 0, tzinfo=ZoneInfo(p.region)).timestamp()
    reqs = [Request(i, i * 600.0, 100, 50, provider=True) for i in range(144)]
    scn = Scenario("p", "provider", "agent-api", 86400.0, [ReplicaSpec()], reqs, [Injection("provider_load", 0, 0)], provider=p, start_local=(p.region, 0))
    a = truth.provider_latencies(scn, day, loaded=True)
    labels = truth.label(scn, a, COST, 10.0, {}, {}, day)
    peak = [x for x in labels.values() if 12 * 3600 <= x.arrival < 14 * 3600]
    night = [x for x in labels.values() if x.arrival < 5 * 3600]
    assert all(x.slow and x.cause == "provider_load" for x in peak)
    assert not any(x.slow for x in night)
    # 5 ms of local work, then the call: only the provider part scales with its load
    assert all((x.latency - 0.005) / (x.baseline - 0.005) == pytest.approx(p.load(day + x.arrival)) for x in labels.values())

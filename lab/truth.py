"""Ground truth by counterfactual: what each injected mechanism cost each request.

For every mechanism present in a scenario, the same requests are served again
with only that mechanism switched off (compile stalls charged zero, KV cache
unbounded, clocks at max, no foreign job, no restart, the long-generation or
surge stream given its own capacity, the provider at its off-peak latency).
A request's excess for mechanism m is its actual latency minus its latency in
that rerun; its total excess is against the rerun with everything off. A
request is labelled slow when the total excess passes both an absolute and a
relative threshold, and its cause is the mechanism with the largest excess.

The labels are written next to the run (never into the telemetry store).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable

from lab.model import CostModel
from lab.scenarios import Scenario
from lab.sim import Request, Switches, simulate

SLOW_ABS_S = 0.25
SLOW_REL = 0.5

_SWITCH_OF = {
    "compile_miss": "compile",
    "kv_eviction": "kv",
    "gpu_throttle": "throttle",
    "gpu_contention": "contention",
    "cold_start": "restart",
}
_STREAM_OF = {"batch_contention": "long", "queue_saturation": "surge"}


@dataclass
class Label:
    rid: int
    replica: int
    arrival: float
    latency: float
    baseline: float  # latency with every mechanism off
    excess: dict[str, float] = field(default_factory=dict)
    total_excess: float = 0.0
    slow: bool = False
    cause: str | None = None


def provider_latencies(scn: Scenario, base_epoch: float, loaded: bool) -> dict[int, float]:
    """Gateway requests: a small local overhead plus the provider call (seeded noise per request)."""
    assert scn.provider is not None
    out = {}
    for r in scn.requests:
        rng = random.Random(r.rid * 1_000_003 + 17)
        out[r.rid] = 0.005 + scn.provider.latency(base_epoch + r.arrival, r.output, rng, loaded=loaded)
    return out


def serve(
    scn: Scenario,
    cost: CostModel,
    scale: float,
    off: frozenset[str],
    compile_costs: dict[int, dict[tuple[int, int], float]],
    load_real: dict[int, float],
    base_epoch: float,
) -> dict[int, float]:
    """Latency of every request with the mechanisms in ``off`` switched off (simulation only)."""
    if scn.provider is not None:
        return provider_latencies(scn, base_epoch, loaded="provider_load" not in off)
    sw = Switches(**{_SWITCH_OF[m]: False for m in off if m in _SWITCH_OF})
    moved = {_STREAM_OF[m] for m in off if m in _STREAM_OF}
    lat: dict[int, float] = {}
    for r, spec in enumerate(scn.specs):
        mine = [q for q in scn.requests if q.replica == r]
        groups: list[list[Request]] = [[q for q in mine if q.stream not in moved]]
        groups += [[q for q in mine if q.stream == s] for s in sorted(moved)]
        for group in groups:
            if not group:
                continue
            run = simulate(r, group, spec, cost, scale, sw, compile_costs=compile_costs.get(r, {}), load_real_seconds=load_real.get(r))
            lat.update({rid: o.latency for rid, o in run.outcomes.items()})
    return lat


def label(
    scn: Scenario,
    actual: dict[int, float],
    cost: CostModel,
    scale: float,
    compile_costs: dict[int, dict[tuple[int, int], float]],
    load_real: dict[int, float],
    base_epoch: float,
    progress: Callable[[str], None] | None = None,
) -> dict[int, Label]:
    """Per-request labels from one rerun per mechanism and one with all off."""
    mechs = sorted(scn.causes)
    cf: dict[str, dict[int, float]] = {}
    for m in mechs:
        if progress:
            progress(f"counterfactual without {m}")
        cf[m] = serve(scn, cost, scale, frozenset([m]), compile_costs, load_real, base_epoch)
    if len(mechs) == 1:
        base = cf[mechs[0]]
    elif mechs:
        base = serve(scn, cost, scale, frozenset(mechs), compile_costs, load_real, base_epoch)
    else:
        base = actual
    replica_of = {q.rid: q.replica for q in scn.requests}
    arrival_of = {q.rid: q.arrival for q in scn.requests}
    out: dict[int, Label] = {}
    for rid, lat in actual.items():
        b = base.get(rid, lat)
        lab = Label(rid, replica_of[rid], arrival_of[rid], lat, b)
        for m in mechs:
            lab.excess[m] = max(0.0, lat - cf[m].get(rid, lat))
        lab.total_excess = max(0.0, lat - b)
        lab.slow = lab.total_excess > max(SLOW_ABS_S, SLOW_REL * b)
        if lab.slow and lab.excess:
            m, e = max(lab.excess.items(), key=lambda kv: kv[1])
            lab.cause = m if e > 0 else "unknown"
        out[rid] = lab
    return out


def check_consistent(labels: dict[int, Label], tol: float = 1e-6) -> list[str]:
    """Invariants every label set must satisfy (used by tests)."""
    problems = []
    for lab in labels.values():
        if not (math.isfinite(lab.latency) and lab.latency > 0):
            problems.append(f"request {lab.rid}: latency {lab.latency}")
        if any(e < -tol for e in lab.excess.values()):
            problems.append(f"request {lab.rid}: negative excess")
        if lab.slow and lab.cause is None:
            problems.append(f"request {lab.rid}: slow without a cause")
        if not lab.slow and lab.cause is not None:
            problems.append(f"request {lab.rid}: cause without being slow")
    return problems

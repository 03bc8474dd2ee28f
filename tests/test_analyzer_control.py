"""No false incidents: steady traffic with ordinary heavy-tailed noise stays quiet.

And the slow-request definition: judged against comparable requests, so a
short request stalled 3 s is slow while a long one that took the usual time
for its length is not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from analyzer.service import Analyzer
from analyzer_world import World, replicas
from collector.store import Store


def _store(w: World, tmp_path: Path, name: str = "c.duckdb") -> Analyzer:
    w.render()
    store = Store(tmp_path / name)
    w.write(store)
    return Analyzer(store)


@pytest.mark.parametrize("seed,sigma,rps", [(21, 0.6, 6.0), (22, 0.9, 3.0), (23, 0.45, 12.0)])
def test_heavy_tailed_steady_traffic_raises_no_incident(tmp_path: Path, seed: int, sigma: float, rps: float) -> None:
    w = World(seed=seed)
    reps = replicas(4)
    w.steady("chat-api", reps, 45, rps, sigma=sigma)
    rng = np.random.default_rng(seed)
    for r in w.requests:
        u = rng.random()
        if u < 0.01:  # Pareto-tailed pauses (GC, page faults, a noisy neighbour for a moment)
            r.queue_ms += float(100 * (rng.pareto(1.5) + 1))
    analyzer = _store(w, tmp_path)
    assert analyzer.incidents()["incidents"] == []
    # the slow requests of steady traffic have no cause invented for them
    slow = analyzer.slow_requests(limit=500)["requests"]
    assert slow, "heavy-tailed traffic always has some slow requests"
    invented = [r for r in slow if r["causes"] and r["causes"][0]["cause"] not in ("unknown", "queue_saturation")]
    assert len(invented) <= 0.05 * len(slow), [r["causes"][0]["cause"] for r in invented][:10]


def test_gradual_load_growth_is_not_an_incident(tmp_path: Path) -> None:
    w = World(seed=24)
    reps = replicas(4)
    for k in range(6):  # traffic doubles over an hour in 10-minute steps, latencies unchanged
        w.steady("chat-api", reps, 10, 4.0 + 0.8 * k, start_s=k * 600)
    analyzer = _store(w, tmp_path)
    assert analyzer.incidents()["incidents"] == []


def test_short_stalled_request_is_slow_long_normal_one_is_not(tmp_path: Path) -> None:
    w = World(seed=25)
    reps = replicas(2)
    w.steady("chat-api", reps, 20, 6.0)
    short = min((r for r in w.requests if 600 < r.t < 700), key=lambda r: r.output_tokens)
    short.queue_ms += 3000.0
    longest = max((r for r in w.requests if r.t < 1200), key=lambda r: r.output_tokens)
    # the long request's latency is typical for its length: reset its noise to its class median
    longest.decode_ms = 6.0 * longest.output_tokens
    longest.queue_ms = 3.0
    analyzer = _store(w, tmp_path)
    slow = analyzer.slow_requests(limit=1000)["requests"]
    ids = {r["trace_id"]: r for r in slow}
    assert short.trace_id in ids
    assert ids[short.trace_id]["excess_ms"] >= 2500
    assert longest.latency_ms > short.latency_ms  # the long one is slower in absolute terms ...
    assert longest.trace_id not in ids  # ... and still not slow for its class
    # the stall sits in the queue component, and is compared with the queue's own baseline
    comp = ids[short.trace_id]["components"]["queue_ms"]
    assert comp["actual"] >= 3000 and comp["expected"] < 100


def test_latency_series_and_low_traffic(tmp_path: Path) -> None:
    w = World(seed=26)
    w.steady("chat-api", replicas(2), 30, 0.3)  # ~18 requests a minute: too few for a p99 per window
    a = _store(w, tmp_path)
    series = a.latency(step_s=300)
    assert series["step_s"] == 300 and len(series["points"]) == 6
    p = series["points"][0]
    assert p["count"] > 0 and p["p50_ms"] <= p["p95_ms"] <= p["p99_ms"]
    assert sum(x["count"] for x in series["points"]) == len(w.requests)
    assert a.incidents()["incidents"] == []

"""Unit tests of the analyzer's pure parts: time parsing, detection, buckets, attribution ledger."""

from __future__ import annotations

import itertools
from datetime import datetime

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analyzer.attribute import Ledger, _minus, _union, decode_reasons
from analyzer.buckets import optimal_buckets, padded_tokens
from analyzer.contrast import _p_value
from analyzer.detect import detect
from analyzer.timeutil import iso, to_utc_naive
from tailscope.errors import BadRequest


def test_time_parsing() -> None:
    want = datetime(2026, 11, 20, 12, 0, 0)
    assert to_utc_naive("2026-11-20T12:00:00Z") == want
    assert to_utc_naive("2026-11-20T13:00:00+01:00") == want
    assert to_utc_naive(1795176000) == want
    assert to_utc_naive("1795176000.0") == want
    assert to_utc_naive(None) is None
    assert iso(want) == "2026-11-20T12:00:00.000Z"
    for bad in ("yesterday", "2026-13-01", float("nan"), -5, True, [1]):
        with pytest.raises(BadRequest):
            to_utc_naive(bad)  # type: ignore[arg-type]


def _series(n: int, rng: np.random.Generator, sigma: float = 0.25) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    t = np.arange(n, dtype=float) * 60
    count = rng.poisson(400, n)
    p99 = 1000 * rng.lognormal(0, sigma, n)
    return t, count, p99


def test_detect_quiet_noise_and_a_spike_with_hysteresis() -> None:
    rng = np.random.default_rng(1)
    t, count, p99 = _series(240, rng)
    assert detect(t, count, p99, step_s=60) == []
    p99[100:106] = [4000, 5000, 1500, 5000, 4200, 3800]  # dips to 1.5x inside: hysteresis keeps one incident
    spikes = detect(t, count, p99, step_s=60)
    assert [(s.first, s.last) for s in spikes] == [(100, 105)]
    assert 800 < spikes[0].baseline_p99 < 1250


def test_detect_needs_samples_and_honours_slo() -> None:
    rng = np.random.default_rng(2)
    t, count, p99 = _series(120, rng)
    count[50] = 5
    p99[50] = 50_000  # a max over 5 requests is not a p99
    assert detect(t, count, p99, step_s=60) == []
    p99[60:63] = 2000  # under the spike threshold (~2500 here), but over the SLO
    assert all(s.first != 60 for s in detect(t, count, p99, step_s=60))
    spikes = detect(t, count, p99, step_s=60, slo_ms=1900)
    assert (60, 62, True) in [(s.first, s.last, s.by_slo) for s in spikes]


def test_detect_share_of_class_slow_requests() -> None:
    rng = np.random.default_rng(3)
    t, count, p99 = _series(120, rng)
    slow = rng.binomial(count, 0.01)
    assert detect(t, count, p99, step_s=60, slow=slow) == []
    slow[70:74] = (count[70:74] * 0.06).astype(int)  # p99 unmoved, 6x the usual share of class-slow requests
    spikes = detect(t, count, p99, step_s=60, slow=slow)
    assert [(s.first, s.last) for s in spikes] == [(70, 73)]


def test_detect_same_hour_of_previous_days() -> None:
    # A busy hour every day has a higher p99; with days of history that is its normal.
    rng = np.random.default_rng(4)
    n = 3 * 1440
    t, count, p99 = _series(n, rng, sigma=0.1)
    busy = ((t % 86400) // 3600) == 14
    p99[busy] *= 2.2
    spikes = detect(t, count, p99, step_s=60)
    assert all(s.first < 1440 for s in spikes), [(s.first, s.last) for s in spikes]


def _brute(L: list[int], c: list[int], k: int) -> int:
    best = None
    for m in range(1, min(k, len(L)) + 1):
        for combo in itertools.combinations(L[:-1], m - 1):
            bounds = sorted(combo) + [L[-1]]
            cost = sum(ci * min(b for b in bounds if b >= li) for li, ci in zip(L, c))
            best = cost if best is None else min(best, cost)
    return best or 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 200), st.integers(1, 9)), min_size=1, max_size=8, unique_by=lambda x: x[0]),
       st.integers(1, 4))
def test_bucket_dp_is_exact(pairs: list[tuple[int, int]], k: int) -> None:
    pairs.sort()
    L, c = [p[0] for p in pairs], [p[1] for p in pairs]
    bounds, padded = optimal_buckets(L, c, k)
    assert padded == _brute(L, c, k) == padded_tokens(L, c, bounds)
    assert len(bounds) <= k and bounds[-1] == max(L)


def test_bucket_dp_large_and_fast() -> None:
    rng = np.random.default_rng(5)
    lengths = np.clip(rng.lognormal(np.log(300), 0.8, 50_000), 1, 8000).astype(int)
    L, c = np.unique(lengths, return_counts=True)
    bounds, padded = optimal_buckets(L.tolist(), c.tolist(), 8)
    assert len(bounds) == 8 and bounds[-1] >= L.max()
    assert padded >= int((L * c).sum())
    assert padded <= padded_tokens(L.tolist(), c.tolist(), [2 ** i for i in range(6, 14)])  # beats powers of two


def test_ledger_never_explains_more_than_the_excess() -> None:
    led = Ledger(1000.0, {"queue": 800.0, "prefill": 100.0, "decode": 0.0, "provider_call": 0.0, "model_load": 0.0, "compile": 0.0},
                 {"queue": [(0.0, 1.0)]})
    assert led.claim_interval("compile_miss", [(0.0, 0.6)], []) == pytest.approx(600.0)
    assert led.pools["queue"] == pytest.approx(200.0)
    assert led.claim_pools("queue_saturation", ("queue",), float("inf"), []) == pytest.approx(200.0)
    assert led.claim_pools("kv_eviction", ("prefill", "decode", "other"), float("inf"), []) == pytest.approx(200.0)
    assert led.left == pytest.approx(0.0)
    assert led.claim_pools("gpu_throttle", ("other",), float("inf"), []) == 0.0


def test_interval_helpers_and_reasons() -> None:
    assert _union([(3, 4), (0, 1), (0.5, 2)]) == [(0, 2), (3, 4)]
    assert _minus([(0, 10)], [(2, 3), (5, 6)]) == [(0, 2), (3, 5), (6, 10)]
    assert decode_reasons(0x4 | 0x40) == ["sw_power_cap", "hw_thermal_slowdown"]


def test_two_proportion_p_value() -> None:
    assert _p_value(50, 100, 100, 1000) < 1e-6
    assert _p_value(10, 100, 100, 1000) > 0.5


def test_padding_is_measured_against_computed_tokens_not_cached_prompt(tmp_path):
    """With a prefix cache the kernels run only the uncached part: padding compares shape.len with that."""
    import datetime as _dt

    import pyarrow as _pa

    from analyzer import recommend
    from collector.store import Store

    t0 = _dt.datetime(2026, 11, 23, 14)
    n = 40
    with Store(tmp_path / "pad.duckdb") as store:
        store.write([("spans", _pa.table({
            "trace_id": [f"{i:032x}" for i in range(n)],
            "span_id": [f"{i:016x}" for i in range(n)],
            "start_time": [t0 + _dt.timedelta(seconds=i) for i in range(n)],
            "end_time": [t0 + _dt.timedelta(seconds=i, milliseconds=300) for i in range(n)],
            "kind": ["SERVER"] * n,
            "service_name": ["chat-api"] * n,
            "role": ["request"] * n,
            "input_tokens": [100] * n,
            "kv_cached_tokens": [60] * n,
            "shape_len": [64] * n,
        }))])
        out = recommend.compile_miss(store.cursor(), "chat-api", t0, t0 + _dt.timedelta(minutes=5), [])
    # 40 computed tokens padded to 64: 60 % overhead (the whole prompt would say -36 %)
    assert out["current_padding_overhead"] == 0.6

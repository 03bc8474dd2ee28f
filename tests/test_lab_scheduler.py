"""The lab's serving loop: batching, padding, static batches, KV eviction and preemption.

These run the scheduler on its virtual clock without the real executor (a
fixed cost model), so each property can be checked exactly.
"""

from __future__ import annotations

import math

import pytest

from lab.kvcache import KVCache
from lab.model import CostModel, padded_len
from lab.sim import ReplicaSpec, Request, Switches, Window, simulate

COST = CostModel(a=0.001, b=1e-6, c=0.0, step={1: 0.001, 2: 0.001, 4: 0.0012, 8: 0.0015})


def reqs(times: list[float], prompt: int = 40, output: int = 8) -> list[Request]:
    return [Request(i, t, prompt, output) for i, t in enumerate(times)]


def test_requests_arriving_together_share_a_batch_up_to_max_batch() -> None:
    spec = ReplicaSpec(max_batch=4, fill_timeout=0.05)
    run = simulate(0, reqs([0.0] * 10), spec, COST, scale=10.0)
    assert [b.size for b in run.batches] == [4, 4, 2]
    assert sum(b.size for b in run.batches) == 10


def test_a_lone_request_waits_the_fill_timeout_then_runs_alone() -> None:
    spec = ReplicaSpec(max_batch=8, fill_timeout=0.05)
    run = simulate(0, reqs([1.0]), spec, COST, scale=10.0)
    (b,) = run.batches
    assert b.size == 1
    assert b.start == pytest.approx(1.05)
    assert run.outcomes[0].scheduled == pytest.approx(1.05)


def test_a_request_arriving_within_the_fill_timeout_joins_the_batch() -> None:
    spec = ReplicaSpec(max_batch=8, fill_timeout=0.05)
    run = simulate(0, reqs([1.0, 1.03, 1.2]), spec, COST, scale=10.0)
    assert [b.members for b in run.batches][0] == [0, 1]


def test_lengths_pad_to_buckets_and_batch_dim_to_max() -> None:
    spec = ReplicaSpec(max_batch=8, buckets=(32, 64, 128), pad_batch="max")
    run = simulate(0, [Request(0, 0.0, 40, 4), Request(1, 0.0, 50, 4)], spec, COST, scale=10.0)
    (b,) = run.batches
    assert b.shape == (8, 64)
    assert b.real_tokens == 90 and b.padded_tokens == 8 * 64
    assert b.max_len == 50 and b.min_len == 40
    assert run.outcomes[0].shape_len == 64


def test_pow2_batch_padding_and_bucket_overflow() -> None:
    assert padded_len(200, (32, 64, 128)) == 256  # beyond the last bucket: multiples of it
    spec = ReplicaSpec(max_batch=8, buckets=(32, 64), pad_batch="pow2")
    run = simulate(0, reqs([0.0] * 3, prompt=20), spec, COST, scale=10.0)
    assert run.batches[0].shape == (4, 32)


def test_without_bucketing_the_window_pads_to_a_multiple_and_new_shapes_stall() -> None:
    spec = ReplicaSpec(max_batch=4, buckets=(64, 128), pad_multiple=8, no_bucketing=[Window(10.0, 20.0)])
    times = [1.0, 12.0, 14.0, 16.0, 30.0]
    prompts = [41, 41, 43, 41, 41]
    rs = [Request(i, t, p, 4) for i, (t, p) in enumerate(zip(times, prompts))]
    run = simulate(0, rs, spec, COST, scale=10.0, compile_costs={(4, 48): 0.2})
    shapes = [b.shape for b in run.batches]
    assert shapes == [(4, 64), (4, 48), (4, 48), (4, 48), (4, 64)]
    stalls = [b.compile_end - b.compile_start for b in run.batches]
    assert stalls[1] == pytest.approx(2.0)  # 0.2 s measured x scale 10, first time only
    assert stalls[0] == stalls[2] == stalls[3] == stalls[4] == 0.0
    assert run.outcomes[1].compile_s == pytest.approx(2.0)


def test_length_bucketing_batches_only_the_heads_bucket() -> None:
    spec = ReplicaSpec(max_batch=8, buckets=(32, 64, 128), length_bucketing=True)
    rs = [Request(0, 0.0, 20, 4), Request(1, 0.0, 100, 4), Request(2, 0.0, 25, 4)]
    run = simulate(0, rs, spec, COST, scale=10.0)
    assert [sorted(b.members) for b in run.batches] == [[0, 2], [1]]


def test_static_batches_return_members_when_the_longest_finishes() -> None:
    spec = ReplicaSpec(max_batch=4)
    rs = [Request(0, 0.0, 40, 2), Request(1, 0.0, 40, 50)]
    run = simulate(0, rs, spec, COST, scale=10.0)
    assert run.outcomes[0].end == run.outcomes[1].end
    # head-of-line blocking: the short one is charged 50 decode steps
    assert run.outcomes[0].latency > 50 * COST.decode_step(2) * 10 * 0.99


def test_throttle_window_slows_compute_by_the_clock_ratio() -> None:
    base = simulate(0, reqs([5.0]), ReplicaSpec(), COST, scale=10.0)
    slow = simulate(0, reqs([5.0]), ReplicaSpec(throttle=[(Window(0, 100), 0.5)]), COST, scale=10.0)
    fill = ReplicaSpec().fill_timeout
    assert (slow.outcomes[0].latency - fill) == pytest.approx(2 * (base.outcomes[0].latency - fill))
    off = simulate(0, reqs([5.0]), ReplicaSpec(throttle=[(Window(0, 100), 0.5)]), COST, scale=10.0, switches=Switches(throttle=False))
    assert off.outcomes[0].latency == pytest.approx(base.outcomes[0].latency)


def test_restart_makes_queued_requests_wait_for_the_model_load() -> None:
    spec = ReplicaSpec(restarts=[(10.0, 20.0)])
    run = simulate(0, reqs([9.0, 11.0, 50.0]), spec, COST, scale=10.0, compile_costs={}, load_real_seconds=0.5)
    (load,) = run.loads
    assert load.start == pytest.approx(max(10.0, run.batches[0].end))
    assert load.end == pytest.approx(load.start + 20.0 + 0.5 * 10.0)
    assert run.outcomes[1].scheduled >= load.end
    assert run.outcomes[2].latency < 2.0  # long after: served normally


# --- KV cache ---------------------------------------------------------------


def test_prefix_blocks_are_reused_and_lru_evicted_under_pressure() -> None:
    kv = KVCache(capacity=10)
    hit, ev = kv.admit((1, 2, 3), private=1)
    assert hit == 0 and ev is None
    kv.release((1, 2, 3), 1)
    hit, _ = kv.admit((1, 2, 4), private=1)  # shares the first two blocks
    assert hit == 2
    kv.release((1, 2, 4), 1)
    assert kv.cached_prefix((1, 2, 3)) == 3
    # 4 resident prefix blocks (1,2,3,4); a 9-block request must evict the LRU ones
    hit, ev = kv.admit((7, 8, 9, 10, 11, 12, 13), private=2)
    assert ev is not None and ev.reason == "prefix_lru" and ev.blocks == 3
    assert kv.cached_prefix((1, 2, 4)) == 0  # block 1 was least recently used
    assert kv.used <= 10


def test_pinned_blocks_are_never_evicted() -> None:
    kv = KVCache(capacity=4)
    kv.admit((1, 2), private=1)
    ok, _ = kv.grow(1)
    assert ok
    ok, _ = kv.grow(1)  # full: nothing unpinned to evict
    assert not ok
    assert kv.cached_prefix((1, 2)) == 2


def test_unbounded_cache_never_evicts() -> None:
    kv = KVCache(capacity=None)
    for i in range(1000):
        kv.admit((i, i + 10_000), private=3)
    assert kv.evictions == []


def test_kv_pressure_preempts_running_requests_which_recompute() -> None:
    # 4 requests of 64-token prompts and 64 outputs need 4 x (4 + 4 + 1) blocks; 20 blocks force preemption
    rs = [Request(i, 0.0, 64, 64, blocks=tuple(range(i * 100, i * 100 + 4))) for i in range(4)]
    spec = ReplicaSpec(max_batch=4, kv_blocks=20, buckets=(64, 128, 256))
    run = simulate(0, rs, spec, COST, scale=10.0)
    pre = [e for e in run.kv_log if e.reason == "preemption"]
    assert pre, "no preemption under KV pressure"
    victims = {e.victim for e in pre}
    for v in victims:
        o = run.outcomes[v]
        assert o.preemptions >= 1
        assert len(o.segments) == o.preemptions + 1  # rescheduled once per preemption
        assert o.end > run.batches[0].end  # finished in a later batch
    # every request still completes all its tokens
    assert all(o.generated == 64 for o in run.outcomes.values())
    unbounded = simulate(0, rs, spec, COST, scale=10.0, switches=Switches(kv=False))
    assert not unbounded.kv_log
    assert max(o.end for o in unbounded.outcomes.values()) < max(o.end for o in run.outcomes.values())


def test_bad_kv_configuration_is_refused_with_the_value() -> None:
    with pytest.raises(ValueError, match="-3"):
        KVCache(capacity=-3)


def test_every_request_completes_once() -> None:
    import random

    rng = random.Random(3)
    rs = [Request(i, rng.uniform(0, 60), rng.randint(8, 300), rng.randint(2, 60), blocks=(i,)) for i in range(400)]
    run = simulate(0, rs, ReplicaSpec(kv_blocks=200), COST, scale=10.0)
    assert set(run.outcomes) == {r.rid for r in rs}
    assert all(math.isfinite(o.end) and o.end >= o.arrival for o in run.outcomes.values())
    members = [m for b in run.batches for m in b.members]
    pre = sum(o.preemptions for o in run.outcomes.values())
    assert len(members) == len(rs) + pre


# --- properties ---------------------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_op = st.one_of(
    st.tuples(st.just("admit"), st.lists(st.integers(0, 30), min_size=0, max_size=6, unique=True), st.integers(1, 4)),
    st.tuples(st.just("grow"), st.integers(1, 3)),
    st.tuples(st.just("release")),
)


@settings(max_examples=150, deadline=None)
@given(capacity=st.integers(8, 40), ops=st.lists(_op, max_size=60))
def test_kv_cache_invariants_under_any_sequence(capacity: int, ops: list[tuple]) -> None:
    """Pinned blocks are never evicted, the cache never goes over capacity on
    its own, and unpinned cached blocks are exactly the LRU list."""
    kv = KVCache(capacity=capacity)
    running: list[tuple[tuple[int, ...], int]] = []
    for op in ops:
        if op[0] == "admit":
            hashes, private = tuple(op[1]), op[2]
            if kv.can_fit(hashes, private):
                kv.admit(hashes, private)
                running.append((hashes, private))
                assert kv.used <= capacity
        elif op[0] == "grow" and running:
            ok, _ = kv.grow(op[1])
            if ok:
                h, p = running[-1]
                running[-1] = (h, p + op[1])
            assert kv.used <= capacity
        elif op[0] == "release" and running:
            h, p = running.pop(0)
            kv.release(h, p)
        pinned = {x for h, _ in running for x in h}
        assert all(kv.cached_prefix((x,)) == 1 for x in pinned)  # pinned blocks stay resident
        assert set(kv._lru) == {h for h, r in kv._ref.items() if r == 0}
        assert kv.used_private == sum(p for _, p in running)
        assert 0.0 <= kv.usage() <= 1.0

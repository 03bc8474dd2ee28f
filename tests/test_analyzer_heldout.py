"""Regressions from the held-out robustness sweep (``benchmarks/robustness.py``).

Each test builds a small world with the event-driven serving simulator
(``serving_sim``: replicas with slots and a speed that mechanisms change,
labels by counterfactual rerun) into a real DuckDB store, and checks one
behaviour that the sweep found broken, for a mechanistic reason rather than
a number: the backlog a local degradation leaves, a signal that an engine
emits in its own form, a GPU that requests do not name.
"""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

from analyzer.service import Analyzer
from collector.store import Store
from serving_sim import T0, Case, Injection, Sim, build, write

H, M = 3600.0, 60.0


def analyse(case: Case, tmp_path: Path) -> tuple[Sim, list[dict], list[dict]]:
    sim = build(case)
    store = Store(tmp_path / f"{case.name}.duckdb")
    write(sim, store)
    a = Analyzer(store)
    start, end = T0, T0 + timedelta(seconds=case.duration + 600)
    incidents = a.incidents(case.service, start, end)["incidents"]
    slow = a.slow_requests(case.service, start, end, limit=5000)["requests"]
    return sim, incidents, slow


def top(r: dict) -> str | None:
    return (r.get("causes") or [{}])[0].get("cause")


def labelled(sim: Sim, slow: list[dict], cause: str) -> list[dict]:
    truth = {sim.trace_ids[j]: sim.cause[j] for j in range(sim.n) if sim.slow[j]}
    return [r for r in slow if truth.get(r["trace_id"]) == cause]


def accuracy(sim: Sim, slow: list[dict], cause: str) -> tuple[float, Counter[Any]]:
    hits = labelled(sim, slow, cause)
    assert len(hits) >= 20, f"only {len(hits)} labelled {cause} requests reported slow"
    got = Counter(top(r) for r in hits)
    return got[cause] / len(hits), got


def at(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).isoformat()


def test_back_to_back_compiles_own_the_whole_backlog_on_a_single_replica(tmp_path: Path) -> None:
    """One replica, a compile storm: the queue the stalls built is theirs, not saturation's.

    With no peers to compare with and arrivals outrunning completions while
    the replica is stalled, "saturation" is the symptom; the compiles during
    the busy period the request arrived in are the cause, however many there
    were and however long the backlog takes to drain.
    """
    case = Case("compile_1rep", service="code-assist", replicas=1, rps=0.5, hours=2.0,
                injections=[Injection("compile_miss", 1 * H, 1 * H + 20 * M, 0, 5.0)], seed=901)
    sim, incidents, slow = analyse(case, tmp_path)
    acc, got = accuracy(sim, slow, "compile_miss")
    assert acc >= 0.9, got
    assert got["queue_saturation"] == 0, got
    backlog = [e for r in labelled(sim, slow, "compile_miss") for c in r["causes"] if c["cause"] == "compile_miss"
               for e in c["evidence"] if e.get("via") == "backlog"]
    assert backlog and all(e.get("busy_since") for e in backlog)
    mine = [i for i in incidents if i["start"] < at(1 * H + 20 * M) and i["end"] > at(1 * H)]
    assert mine and mine[0]["causes"][0]["cause"] == "compile_miss"


def test_requests_queued_behind_a_throttled_gpu_after_it_recovered_are_the_throttles(tmp_path: Path) -> None:
    """The clock is back to normal, but the queue built while it was low still drains: gpu_throttle."""
    case = Case("throttle_backlog", replicas=4, rps=8, hours=1.5,
                injections=[Injection("gpu_throttle", 45 * M, 60 * M, 1, 3.0)], seed=902)
    sim, _, slow = analyse(case, tmp_path)
    acc, got = accuracy(sim, slow, "gpu_throttle")
    assert acc >= 0.9, got
    after = [r for r in labelled(sim, slow, "gpu_throttle") if r["start"] > at(60 * M + 30)]
    assert len(after) >= 10, "the throttle should leave a backlog after it ends"
    assert all(top(r) == "gpu_throttle" for r in after), Counter(top(r) for r in after)
    assert any(e.get("via") == "backlog" for r in after for c in r["causes"] for e in c["evidence"])


def test_requests_that_arrived_during_a_weight_load_own_their_whole_wait(tmp_path: Path) -> None:
    """A request that arrived while its replica loaded weights waits for the load, then for the
    requests that arrived before it: both are the restart's doing (up to the load's length)."""
    case = Case("cold_backlog", models=("llama-3.1-70b-instruct",), replicas=4, rps=8, hours=1.5,
                injections=[Injection("cold_start", 45 * M, 46 * M, 2, 5.0)], seed=903)
    sim, _, slow = analyse(case, tmp_path)
    acc, got = accuracy(sim, slow, "cold_start")
    assert acc >= 0.9, got
    assert got["queue_saturation"] == 0, got


def test_a_queue_local_to_one_replica_is_not_saturation(tmp_path: Path) -> None:
    """vLLM's flat spans say nothing about a restart: the restarted replica's queue is local
    (its peers do not queue), so saturation may not claim it; with no evidence it stays unknown."""
    case = Case("cold_vllm", service="llm", replicas=4, rps=8, hours=1.5, telemetry="vllm", gpus_per_host=1,
                injections=[Injection("cold_start", 45 * M, 46 * M, 2, 5.0)], seed=904)
    sim, _, slow = analyse(case, tmp_path)
    hits = labelled(sim, slow, "cold_start")
    assert len(hits) >= 20
    got = Counter(top(r) for r in hits)
    assert got["queue_saturation"] <= 0.05 * len(hits), got
    assert got["unknown"] >= 0.9 * len(hits), got


def test_an_always_present_process_on_a_gpu_the_request_does_not_name_is_not_contention(tmp_path: Path) -> None:
    """vLLM's spans carry no GPU index; on a one-GPU host the GPU is found by host. What is
    always on that GPU (a monitoring sidecar) must be read for the same GPU, so it is normal."""
    case = Case("kv_vllm_sidecar", service="llm", replicas=4, rps=10, hours=1.0, telemetry="vllm", gpus_per_host=1,
                injections=[Injection("gpu_throttle", 30 * M, 40 * M, 1, 3.0)], seed=905)
    sim, _, slow = analyse(case, tmp_path)
    assert not [r for r in slow if top(r) == "gpu_contention"], Counter(top(r) for r in slow)
    acc, got = accuracy(sim, slow, "gpu_throttle")
    assert acc >= 0.9, got


def test_preemptions_counted_only_by_the_engine_are_kv_eviction(tmp_path: Path) -> None:
    """vLLM logs no eviction records; its ``vllm:num_preemptions_total`` counter rising on the
    squeezed replica (forwarded by the agent) is the evidence."""
    case = Case("kv_vllm", service="llm", replicas=4, rps=12, hours=1.0, telemetry="vllm", gpus_per_host=1,
                injections=[Injection("kv_eviction", 30 * M, 40 * M, 3, 4.0)], seed=906)
    sim, incidents, slow = analyse(case, tmp_path)
    acc, got = accuracy(sim, slow, "kv_eviction")
    assert acc >= 0.9, got
    mine = [i for i in incidents if i["start"] < at(40 * M) and i["end"] > at(30 * M)]
    assert mine and mine[0]["causes"][0]["cause"] == "kv_eviction"
    rec = mine[0]["causes"][0]["recommendation"]
    assert rec["preemptions"] > 0
    assert any(e["kind"] == "preemption_counter" for e in mine[0]["causes"][0]["evidence"])


# --- detection: what a window of a few hundred requests can and cannot show -------------

def _windows(n: int, rng: Any, per: int = 250) -> tuple[Any, Any, Any, Any, list[list[float]]]:
    """Windows of ``per`` lognormal latencies: (t, count, p99, class-slow count, top latencies)."""
    import numpy as np

    t = np.arange(n, dtype=float) * 60
    lat = [np.sort(1000 * rng.lognormal(0, 0.6, per))[::-1] for _ in range(n)]
    p99 = np.array([float(np.quantile(x, 0.99)) for x in lat])
    count = np.full(n, per)
    slow = rng.binomial(count, 0.01)
    return t, count, p99, slow, [list(x[:64]) for x in lat]


def test_a_p99_moved_by_a_few_outliers_is_not_an_incident() -> None:
    """The p99 of 250 requests sits between their 2nd and 3rd largest: three outliers of a heavy
    tail put it past the threshold. An incident needs significantly more than the usual 1 % of
    the window above the usual p99."""
    import numpy as np

    from analyzer.detect import detect

    rng = np.random.default_rng(11)
    t, count, p99, slow, top = _windows(120, rng)
    usual = float(np.median(p99))
    outliers = [8 * usual, 6 * usual, 5 * usual]
    top[80] = sorted(outliers + top[80][3:], reverse=True)
    p99[80] = 5.2 * usual
    assert detect(t, count, p99, step_s=60, slow=slow, top=top) == []
    # the same p99, with a tenth of the window above the usual p99: an incident
    top[80] = sorted([3 * usual] * 25 + top[80][25:], reverse=True)
    assert [(s.first, s.last) for s in detect(t, count, p99, step_s=60, slow=slow, top=top)] == [(80, 80)]


def test_a_one_window_cluster_of_slow_requests_needs_the_next_window_to_confirm_it() -> None:
    """Queueing makes slow requests come in clusters (one long request holding a replica's slots):
    a single window's cluster that the next window does not continue is noise; two windows are an incident."""
    import numpy as np

    from analyzer.detect import detect

    rng = np.random.default_rng(12)
    t, count, p99, slow, top = _windows(120, rng)
    slow[60] = 16
    assert detect(t, count, p99, step_s=60, slow=slow, top=top) == []
    slow[61] = 12
    assert [(s.first, s.last) for s in detect(t, count, p99, step_s=60, slow=slow, top=top)] == [(60, 61)]


def test_clustered_class_slow_counts_widen_the_share_signals_noise_band() -> None:
    """A history whose slow requests come in clusters (many windows with none, some with several)
    varies far more than a binomial: a count a binomial would call a 5-sigma spike is within it."""
    import numpy as np

    from analyzer.detect import detect, share_baseline

    rng = np.random.default_rng(13)
    t, count, p99, slow, top = _windows(120, rng)
    slow[:] = np.where(rng.random(120) < 0.25, rng.integers(4, 9, 120), 0)  # clusters of 4-8, a quarter of the windows
    share = (slow / count).tolist()
    base = share_baseline(share, slow, count, list(range(60)))
    assert base.dispersion > 3
    slow[90:93] = 11
    assert detect(t, count, p99, step_s=60, slow=slow, top=top) == []
    slow[90:93] = 40
    assert [(s.first, s.last) for s in detect(t, count, p99, step_s=60, slow=slow, top=top)] == [(90, 92)]


def test_intermittent_clusters_over_an_hour_are_one_incident_at_the_coarser_look() -> None:
    """A squeeze that preempts a few requests at a time makes one-window clusters every few windows
    for an hour: no two consecutive windows confirm, but ten-window windows are clearly above normal,
    so it is one incident over the windows that show it. Isolated clusters far apart stay noise."""
    import numpy as np

    from analyzer.detect import detect

    rng = np.random.default_rng(14)
    t, count, p99, slow, top = _windows(400, rng)
    slow[300:360] += rng.binomial(count[300:360], 0.01)  # twice the usual share, and a cluster every fourth window
    slow[300:360:4] = 14
    assert detect(t, count, p99, step_s=60, slow=slow, top=top, coarse=1) == []  # no two consecutive windows confirm
    spikes = detect(t, count, p99, step_s=60, slow=slow, top=top)
    assert len(spikes) == 1 and 295 <= spikes[0].first <= 300 and 350 <= spikes[0].last <= 360, [(s.first, s.last) for s in spikes]
    quiet = rng.binomial(count, 0.01)
    for j in (100, 220, 340):  # the same clusters, an hour or two apart
        quiet[j] = 14
    assert detect(t, count, p99, step_s=60, slow=quiet, top=top) == []


def test_two_problems_on_different_replicas_at_once_are_two_incidents_side_by_side(tmp_path: Path) -> None:
    """A KV squeeze on one replica and a foreign job on another, over the same minutes: the dominant
    cause flips from window to window, so splitting in time cut it into a string of pieces (or kept
    one incident naming one cause). Each is its own incident, with its own top cause, fix and id."""
    case = Case("two_at_once", replicas=6, rps=10, hours=1.5,
                injections=[Injection("kv_eviction", 45 * M, 60 * M, 0, 4.0), Injection("gpu_contention", 45 * M, 60 * M, 3, 3.0)],
                seed=907)
    sim, incidents, slow = analyse(case, tmp_path)
    mine = [i for i in incidents if i["start"] < at(60 * M) and i["end"] > at(45 * M)]
    assert sorted(i["causes"][0]["cause"] for i in mine) == ["gpu_contention", "kv_eviction"], \
        [(i["start"], i["end"], [(c["cause"], c["share"]) for c in i["causes"]]) for i in mine]
    assert len({i["id"] for i in mine}) == 2
    store = Store(tmp_path / f"{case.name}.duckdb")
    a = Analyzer(store)
    for inc in mine:
        one = a.incident(inc["id"])
        assert one["id"] == inc["id"] and one["causes"][0]["cause"] == inc["causes"][0]["cause"]
    for cause in ("kv_eviction", "gpu_contention"):
        acc, got = accuracy(sim, slow, cause)
        assert acc >= 0.9, got


def test_a_problem_on_one_replica_during_a_surge_on_all_is_its_own_incident(tmp_path: Path) -> None:
    """A surge on every replica and a KV squeeze on one, overlapping: saturation dominates every
    window and every replica, so the split in time cut the run into a string of pieces whose top
    cause flipped back and forth (seven here), and side by side did not apply (the homes overlap).
    The squeeze is its own incident, on its replica; the surge keeps the rest."""
    case = Case("surge_and_local_kv", replicas=4, rps=8, hours=1.5,
                injections=[Injection("queue_saturation", 45 * M, 60 * M, None, 3.0), Injection("kv_eviction", 50 * M, 65 * M, 0, 4.0)],
                seed=910)
    _, incidents, _ = analyse(case, tmp_path)
    mine = [i for i in incidents if i["start"] < at(65 * M) and i["end"] > at(45 * M)]
    shown = [(i["start"], i["end"], [(c["cause"], c["share"]) for c in i["causes"]]) for i in mine]
    assert sorted(i["causes"][0]["cause"] for i in mine) == ["kv_eviction", "queue_saturation"], shown
    local = next(i for i in mine if i["causes"][0]["cause"] == "kv_eviction")
    wide = next(i for i in mine if i["causes"][0]["cause"] == "queue_saturation")
    assert local.get("side_by_side") and local["split_from"] == wide["id"] and local["id"] != wide["id"], shown
    assert wide["start"] < local["start"], shown  # the surge began first
    a = Analyzer(Store(tmp_path / f"{case.name}.duckdb"))
    for inc in mine:
        one = a.incident(inc["id"])
        assert one["id"] == inc["id"] and one["causes"][0]["cause"] == inc["causes"][0]["cause"]


def test_a_backlog_that_drains_for_hours_is_still_its_surges(tmp_path: Path) -> None:
    """A surge on a single replica that ran at ρ≈0.55: the backlog it built drains for hours after it
    ended. Requests queued in that drain are saturation's (the mean arrival rate over the busy period
    they arrived in is the surge's), however long ago the surge ended: the busy period is traced back
    further than the first hour when the replica never emptied in it."""
    case = Case("long_drain", service="support-bot", models=("llama-3.1-70b-instruct",), replicas=1, rps=0.5, hours=6.0,
                injections=[Injection("queue_saturation", 1 * H, 1.5 * H, None, 5.0)], seed=908)
    sim, _, _ = analyse(case, tmp_path)
    a = Analyzer(Store(tmp_path / f"{case.name}.duckdb"))
    drain = a.slow_requests(case.service, T0 + timedelta(hours=3), T0 + timedelta(hours=4), limit=5000)["requests"]
    late = labelled(sim, drain, "queue_saturation")
    assert len(late) >= 20, len(late)
    got = Counter(top(r) for r in late)
    assert got["queue_saturation"] >= 0.9 * len(late), got


def test_slow_requests_of_a_range_inside_an_incident_are_judged_against_the_hour_before_it(tmp_path: Path) -> None:
    """Asked for a range that lies inside a long incident, the slow-request list had no normal
    requests to compare with (the range minus its incident windows is empty) and returned nothing.
    The hour before the incident is the normal, as for the incident's own requests."""
    case = Case("inside", service="support-bot", replicas=2, rps=2, hours=3.0,
                injections=[Injection("queue_saturation", 1 * H, 1.75 * H, None, 3.0)], seed=909)
    sim, incidents, _ = analyse(case, tmp_path)
    assert any(i["start"] <= at(1 * H + 5 * M) and i["end"] >= at(1 * H + 40 * M) for i in incidents)
    a = Analyzer(Store(tmp_path / f"{case.name}.duckdb"))
    inside = a.slow_requests(case.service, T0 + timedelta(seconds=1 * H + 20 * M), T0 + timedelta(seconds=1 * H + 35 * M),
                             limit=5000)["requests"]
    truth = [j for j in range(sim.n) if sim.slow[j] and 1 * H + 20 * M <= sim.t[j] < 1 * H + 35 * M]
    assert len(truth) >= 50
    got = {r["trace_id"] for r in labelled(sim, inside, "queue_saturation")}
    assert len(got) >= 0.9 * len(truth), (len(got), len(truth))
    assert Counter(top(r) for r in labelled(sim, inside, "queue_saturation"))["queue_saturation"] >= 0.9 * len(got)


def test_a_wait_longer_than_twenty_minutes_is_traced_back_past_the_hour(tmp_path: Path) -> None:
    """The first look back is three times the request's own wait; when that is already more than an
    hour and the replica never emptied in it, the next look is the longest one (not skipped)."""
    from analyzer.evidence import BUSY_LOOKBACK_S

    case = Case("very_long_drain", service="support-bot", models=("llama-3.1-70b-instruct",), replicas=1, rps=0.5, hours=6.0,
                injections=[Injection("queue_saturation", 1 * H, 2 * H, None, 5.0)], seed=910)
    sim, _, _ = analyse(case, tmp_path)
    a = Analyzer(Store(tmp_path / f"{case.name}.duckdb"))
    later = a.slow_requests(case.service, T0 + timedelta(hours=3.5), T0 + timedelta(hours=4), limit=5000)["requests"]
    waited = [r for r in labelled(sim, later, "queue_saturation") if r["components"]["queue_ms"]["actual"] > BUSY_LOOKBACK_S / 3 * 1000]
    assert len(waited) >= 10, len(waited)
    assert all(top(r) == "queue_saturation" for r in waited), Counter(top(r) for r in waited)


def test_a_short_historys_chance_scatter_is_not_taken_for_clustering() -> None:
    """Twelve windows of independent requests scatter around their mean by chance (Pearson's ratio
    1 ± 0.43); taken at face value that blunted the share signal, and a compile storm in the newest,
    half-filled window (6 of 57 requests slow, ~0.6 usual) went unreported by an alert test
    depending on where the minute fell. Only dispersion beyond that chance counts."""
    import numpy as np

    from analyzer.detect import detect, share_baseline

    t = np.arange(13, dtype=float) * 120
    count = np.array([105, 95, 89, 119, 101, 97, 110, 92, 104, 99, 108, 100, 57])
    slow = np.array([1, 0, 2, 0, 3, 0, 1, 0, 2, 1, 0, 1, 6])
    p99 = np.full(13, 400.0)
    share = (slow / count).tolist()
    assert share_baseline(share, slow, count, list(range(12))).dispersion == 1.0
    assert [(s.first, s.last) for s in detect(t, count, p99, step_s=120, slow=slow)] == [(12, 12)]


def test_an_slo_per_service_opens_and_explains_incidents(tmp_path: Path) -> None:
    """With `slo_ms` set, slow-request selection's prefilter named `service` unqualified beside the
    class-threshold tables (which have one too): every incident list and slow-request table failed
    with a binder error. Set between the normal p99 and the incident's, the SLO opens the same
    incident, explained the same way, and every request over it that has a baseline is slow."""
    from tailscope.config import load

    case = Case("slo", replicas=4, rps=8, hours=1.5, injections=[Injection("kv_eviction", 45 * M, 60 * M, 0, 4.0)], seed=911)
    sim, incidents, slow = analyse(case, tmp_path)
    mine = [i for i in incidents if i["start"] < at(60 * M) and i["end"] > at(45 * M)]
    assert mine and mine[0]["causes"][0]["cause"] == "kv_eviction"
    slo_ms = 2 * mine[0]["baseline_p99_ms"]
    assert slo_ms < mine[0]["p99_ms"]
    a = Analyzer(Store(tmp_path / f"{case.name}.duckdb"), load({"slo_ms": f"{case.service}={slo_ms:.0f}"}, environ={}))
    start, end = T0, T0 + timedelta(seconds=case.duration + 600)
    with_slo = [i for i in a.incidents(case.service, start, end)["incidents"] if i["start"] < at(60 * M) and i["end"] > at(45 * M)]
    assert with_slo and with_slo[0]["slo_ms"] == round(slo_ms) and with_slo[0]["causes"][0]["cause"] == "kv_eviction"
    listed = a.slow_requests(case.service, start, end, limit=5000)["requests"]
    assert {r["trace_id"] for r in slow} <= {r["trace_id"] for r in listed}
    assert any(r["latency_ms"] > slo_ms for r in listed)

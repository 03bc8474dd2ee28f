"""Spike detection's per-window figures: windows kept across calls are dropped exactly when written to.

A real store, the real write path (``Store.write``, whose span-write log is
the invalidation signal) and a fresh analyzer as the oracle: whatever the
kept windows save, the figures must equal a from-scratch pass.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import pytest

from analyzer.service import Analyzer
from analyzer_world import T0, World, replicas, steady_store
from collector.store import Store

STEP = 60
LEAD, END = T0, T0 + timedelta(hours=2, minutes=5)  # 2 whole hours (pinned thresholds) and 5 minutes of the third


def late(start_s: float, seed: int, sigma: float = 1.5) -> World:
    """A minute of extra traffic at ``start_s`` (seconds after T0): what a spooling agent delivers late."""
    w = World(seed=seed)
    w.steady("chat-api", replicas(2), 1, 2, start_s=start_s, sigma=sigma)
    w.render()
    return w


@pytest.fixture()
def world_store(tmp_path: Path):
    store = steady_store(tmp_path / "w.duckdb", seed=21)
    yield store
    store.close()


def test_windows_are_kept_and_reread_only_where_new_spans_land(world_store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    a = Analyzer(world_store)
    con = world_store.cursor()
    reads: list[list[list]] = []
    original = a.windows._read
    monkeypatch.setattr(a.windows, "_read", lambda *args: reads.append([list(r) for r in args[-1]]) or original(*args))

    def stats() -> list[tuple]:
        return a.windows.stats(con, None, LEAD, END, STEP)

    def fresh() -> list[tuple]:
        return Analyzer(world_store).windows.stats(world_store.cursor(), None, LEAD, END, STEP)

    first = stats()
    assert reads == [[[LEAD, END]]]
    assert a.windows.thresholds(con, None, LEAD, END).pinned

    reads.clear()
    assert stats() == first
    assert reads == []  # nothing written: every window kept

    # New spans in the unfinished hour (outside the thresholds' whole hours): that minute only.
    late(2 * 3600 + 120, seed=22).write(world_store)
    reads.clear()
    now = stats()
    assert reads == [[[T0 + timedelta(seconds=2 * 3600 + 120), T0 + timedelta(seconds=2 * 3600 + 180)]]]
    assert now == fresh()
    assert now != first

    # Late spans in an hour the thresholds came from: thresholds and every window again.
    late(1800, seed=23).write(world_store)
    reads.clear()
    now = stats()
    assert reads == [[[LEAD, END]]]
    assert now == fresh()

    # A write that bypasses the store's log (raw SQL): the row count gives it away.
    with world_store._write_lock:
        world_store._con.execute(
            "INSERT INTO spans (trace_id, span_id, name, kind, start_time, end_time, duration_ms, service_name, role) "
            "VALUES ('ab', 'cd', 'req', 'SERVER', ?, ?, 50000.0, 'chat-api', 'request')",
            [T0 + timedelta(seconds=600), T0 + timedelta(seconds=650)])
    reads.clear()
    now = stats()
    assert reads == [[[LEAD, END]]]
    assert now == fresh()
    con.close()


def test_a_range_whose_unfinished_hour_holds_much_of_its_data_is_computed_every_time(world_store: Store) -> None:
    """Thresholds over whole hours would leave out too much of a young store: nothing is kept."""
    a = Analyzer(world_store)
    con = world_store.cursor()
    end = T0 + timedelta(minutes=50)  # all of it in the unfinished hour
    assert not a.windows.thresholds(con, None, LEAD, end).pinned
    assert a.windows.stats(con, None, LEAD, end, STEP) == a.windows.stats(con, None, LEAD, end, STEP)
    assert not a.windows._caches
    con.close()


def test_with_incremental_off_every_call_estimates_thresholds_and_reads_every_window(world_store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """What benchmarks/analyze.py calls "warm" (everything computed): not even the hour's thresholds are kept."""
    import analyzer.windows as windows

    a = Analyzer(world_store)
    a.incremental = False
    con = world_store.cursor()
    estimates: list[object] = []
    original = windows.class_baselines
    monkeypatch.setattr(windows, "class_baselines", lambda *args, **kw: estimates.append(args) or original(*args, **kw))
    first = a.windows.stats(con, None, LEAD, END, STEP)
    assert a.windows.stats(con, None, LEAD, END, STEP) == first
    assert len(estimates) == 2 and not a.windows._caches and not a.windows._thresholds
    a.incremental = True
    a.windows.stats(con, None, LEAD, END, STEP)
    a.windows.stats(con, None, LEAD, END, STEP)
    assert len(estimates) == 3  # on again: estimated once, then kept
    con.close()


def test_callers_with_different_ranges_each_keep_their_windows(world_store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """The dashboard's day and the alert evaluator's hour pin different thresholds: neither evicts the other."""
    a = Analyzer(world_store)
    con = world_store.cursor()
    calls = [(LEAD, END), (LEAD + timedelta(hours=1), END)]
    first = [a.windows.stats(con, None, lead, end, STEP) for lead, end in calls]
    assert all(a.windows.thresholds(con, None, lead, end).pinned for lead, end in calls)
    reads: list = []
    original = a.windows._read
    monkeypatch.setattr(a.windows, "_read", lambda *args: reads.append(args[-1]) or original(*args))
    assert [a.windows.stats(con, None, lead, end, STEP) for lead, end in calls] == first
    assert reads == []
    con.close()


def test_an_explained_incident_is_kept_until_a_write_lands_in_what_it_read(tmp_path: Path) -> None:
    """Spans arriving now (after the incident and its references) leave its explanation standing; a late span
    inside it (a spool replayed) makes it computed again. Either way it equals a fresh analyzer's."""
    w = World(seed=41)
    reps = replicas(3)
    w.steady("chat-api", reps, 180, 3)
    for k in range(10):
        w.compile_stall(reps[1], 30 * 60 + k * 20, 3.0, 600 + k)
    w.render()
    store = Store(tmp_path / "inc.duckdb")
    try:
        w.write(store)
        a = Analyzer(store)
        a.use_cache = False  # the result cache would hide nothing here (writes change the version), but be plain
        first = a.incidents()
        (inc,) = first["incidents"]
        assert inc["causes"][0]["cause"] == "compile_miss" and not inc["open"]

        late(175 * 60, seed=42, sigma=0.45).write(store)  # ordinary new spans, 2 h after the incident: outside what it read
        second = a.incidents()
        assert second is first  # kept, not computed again
        assert second == Analyzer(store).incidents()

        # Late, ordinary spans just after it, in the reference its baselines come from: the incident
        # itself (its windows, the spike) does not move, but what explains it was read from there.
        late(44 * 60, seed=43, sigma=0.45).write(store)
        third = a.incidents()
        assert [i["id"] for i in third["incidents"]] == [inc["id"]]
        assert third is not first
        assert third == Analyzer(store).incidents()

        # The slow requests of a range that ended before the new data: kept the same way.
        past = (T0, T0 + timedelta(hours=1))
        slow = a.slow_requests(start=past[0], end=past[1], limit=50)
        late(178 * 60, seed=44, sigma=0.45).write(store)
        assert a.slow_requests(start=past[0], end=past[1], limit=50) is slow
        late(50 * 60, seed=45, sigma=0.45).write(store)
        again = a.slow_requests(start=past[0], end=past[1], limit=50)
        assert again is not slow and again == Analyzer(store).slow_requests(start=past[0], end=past[1], limit=50)

        a.incremental = False  # everything computed on every call
        assert a.incidents() is not a.incidents()
    finally:
        store.close()


def test_a_write_spanning_decades_drops_the_kept_windows_it_covers_without_walking_every_minute(world_store: Store) -> None:
    """One batch with a span stamped 1970 (a client with no clock) and one now: its range covers every kept
    window; they are found among the kept ones, not by counting 29 million minutes."""
    import pyarrow as pa

    a = Analyzer(world_store)
    con = world_store.cursor()
    a.windows.stats(con, None, LEAD, END, STEP)
    stamps = [datetime(1970, 1, 1, 0, 0, 1), T0 + timedelta(seconds=2 * 3600 + 90)]
    world_store.write([("spans", pa.table({
        "trace_id": ["e" * 32, "f" * 32], "span_id": ["e" * 16, "f" * 16], "name": ["req", "req"], "kind": ["SERVER"] * 2,
        "start_time": pa.array(stamps, pa.timestamp("us")), "end_time": pa.array(stamps, pa.timestamp("us")),
        "duration_ms": [90_000.0, 90_000.0], "service_name": ["chat-api"] * 2, "role": ["request"] * 2,
    }))])
    assert a.windows.stats(con, None, LEAD, END, STEP) == Analyzer(world_store).windows.stats(world_store.cursor(), None, LEAD, END, STEP)
    con.close()

"""Spike detection's per-window figures: windows kept across calls are dropped exactly when written to.

A real store, the real write path (``Store.write``, whose span-write log is
the invalidation signal) and a fresh analyzer as the oracle: whatever the
kept windows save, the figures must equal a from-scratch pass.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from analyzer.service import Analyzer
from analyzer_world import T0, World, replicas
from collector.store import Store

STEP = 60
LEAD, END = T0, T0 + timedelta(hours=2, minutes=5)  # 2 whole hours (pinned thresholds) and 5 minutes of the third


def late(start_s: float, seed: int) -> World:
    """A minute of extra traffic at ``start_s`` (seconds after T0): what a spooling agent delivers late."""
    w = World(seed=seed)
    w.steady("chat-api", replicas(2), 1, 2, start_s=start_s, sigma=1.5)
    w.render()
    return w


@pytest.fixture()
def world_store(tmp_path: Path):
    w = World(seed=21)
    w.steady("chat-api", replicas(2), 130, 1.5)
    w.render()
    store = Store(tmp_path / "w.duckdb")
    w.write(store)
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

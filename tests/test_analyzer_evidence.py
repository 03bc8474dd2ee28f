"""Evidence lookups: what they read for the requests they explain, against a direct query."""

from __future__ import annotations

from pathlib import Path

import pytest

from analyzer_world import steady_store
from collector.store import Store


@pytest.fixture()
def store(tmp_path: Path):
    s = steady_store(tmp_path / "w.duckdb", seed=31)
    yield s
    s.close()


def test_child_spans_are_found_for_scattered_and_for_clustered_requests(store: Store) -> None:
    """Evidence reads the stage spans of the requests it explains through their time ranges; a range
    around a few scattered requests also lists their trace ids (the cheap path), a busy one does not.
    Either way every child span of every request, and only those, comes back."""
    from analyzer import evidence

    con = store.cursor()
    rows = con.execute(
        "SELECT trace_id, span_id, epoch(start_time), epoch(end_time) FROM spans WHERE role = 'request' ORDER BY start_time"
    ).fetchall()
    scattered = rows[::97]  # minutes apart: a range each
    start = len(rows) // 2
    clustered = rows[start:start + 3 * evidence.FEW_TRACES]  # back to back: one range with many requests
    slow = [{"trace_id": t, "span_id": s, "t0": a, "t1": b} for t, s, a, b in scattered + clustered]
    ranges = evidence._time_ranges(slow, most=200)
    assert any(len(ids) <= evidence.FEW_TRACES for _, _, ids in ranges)
    assert any(len(ids) > evidence.FEW_TRACES for _, _, ids in ranges)
    ev = evidence.Evidence(step_s=60)
    evidence._register(con, "_slow", slow)
    try:
        evidence._children(con, ev, slow)
    finally:
        con.unregister("_slow")
    got = {(k[0], k[1], c["span_id"]) for k, kids in ev.children.items() for c in kids}
    pairs = {(r["trace_id"], r["span_id"]) for r in slow}
    want = {(t, p, s) for t, p, s in con.execute(
        "SELECT trace_id, parent_span_id, span_id FROM spans WHERE parent_span_id IS NOT NULL").fetchall() if (t, p) in pairs}
    assert len(want) >= 2 * len(slow) and got == want
    con.close()

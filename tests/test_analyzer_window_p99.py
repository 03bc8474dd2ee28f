"""The spike detector's per-window p99 (top-k shortcut) equals DuckDB's quantile_cont, refill path included."""

from __future__ import annotations

import random

import duckdb
import pytest

import analyzer.windows as windows
from analyzer.service import Analyzer
from analyzer.windows import p99_from_top
from analyzer.requests import LATENCY_MS, REQUEST_PREDICATE
from analyzer_world import World, replicas


@pytest.mark.parametrize("n", [1, 2, 3, 99, 100, 101, 250, 1000, 4321])
def test_p99_from_top_matches_quantile_cont(n: int) -> None:
    rnd = random.Random(n)
    xs = [rnd.lognormvariate(5, 1) for _ in range(n)] + [7.0] * (n // 10)  # ties too
    con = duckdb.connect()
    con.execute("CREATE TABLE t AS SELECT unnest(?::DOUBLE[]) AS x", [xs])
    want, top = con.execute("SELECT quantile_cont(x, 0.99), max(x, 64) FROM t").fetchall()[0]
    got = p99_from_top(len(xs), top)
    if len(xs) - 1 - int((len(xs) - 1) * 0.99) >= 64:
        assert got is None  # too few kept: the caller recomputes exactly
    else:
        assert got == pytest.approx(want, rel=1e-12)


def test_window_stats_equal_exact_quantiles(tmp_path, monkeypatch) -> None:
    """Both paths (top-k and the exact refill for busy windows) against a plain quantile_cont per window."""
    from collector.store import Store

    w = World(seed=5)
    w.steady("chat-api", replicas(2), 20, 8)
    w.render()
    store = Store(tmp_path / "s.duckdb")
    try:
        w.write(store)
        a = Analyzer(store)
        a.windows.enabled = False  # each pass computes (not a window kept from the pass before)
        con = store.cursor()
        lo, hi = con.execute("SELECT min(start_time), max(start_time) + INTERVAL 1 SECOND FROM spans").fetchall()[0]
        want = {(s, int(k)): (int(n), float(p)) for s, k, n, p in con.execute(
            f"SELECT service_name, CAST(floor(epoch(start_time) / 60) AS BIGINT), count(*), quantile_cont({LATENCY_MS}, 0.99) "
            f"FROM spans WHERE {REQUEST_PREDICATE} GROUP BY ALL").fetchall()}
        for k_min in (128, 1):  # 1: every window is busier than k, so all go through the exact refill
            monkeypatch.setattr(windows, "TOP_K_MIN", k_min)
            monkeypatch.setattr(windows, "_request_total", lambda classes: 0)
            got = {(s, k): (n, p) for s, k, n, p, _ in a.windows.stats(con, None, lo, hi, 60)}
            assert got.keys() == want.keys()
            for key, (n, p) in want.items():
                assert got[key][0] == n and got[key][1] == pytest.approx(p, rel=1e-12)
        con.close()
    finally:
        store.close()

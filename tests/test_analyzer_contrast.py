"""The slow-vs-baseline contrast: its counts against a per-request recount in Python, and what it ranks first."""

from __future__ import annotations

import math
from collections import Counter
from analyzer.contrast import contrast, counts
from analyzer_world import World, replicas


def _value(dim: str, r, batch_size: dict[str, int], at) -> str | None:
    """What each dimension means, written out per request (the oracle)."""
    octave = lambda n: None if n is None else f"<={2 ** math.ceil(math.log2(max(n, 1)))}"  # noqa: E731
    return {
        "instance": r.replica.instance,
        "host": r.replica.host,
        "gpu": f"{r.replica.host}/gpu{r.replica.gpu}",
        "model": r.model,
        "shape_len": None if r.shape_len is None else str(r.shape_len),
        "input_len_bucket": octave(r.input_tokens),
        "output_len_bucket": octave(r.output_tokens),
        "batch_size": None if r.batch_id not in batch_size else str(batch_size[r.batch_id]),
        "priority": r.priority,
        "pool": None,
        "hour_utc": f"{at(r.t).hour:02d}:00",
    }[dim]


def test_counts_equal_a_per_request_recount(tmp_path) -> None:
    from collector.store import Store

    w = World(seed=11)
    reqs = w.steady("chat-api", replicas(4), 90, 3)  # 90 minutes: two hours of the day
    w.steady("other-api", replicas(2), 30, 2)  # another service: never counted
    batch_size: dict[str, int] = {}
    for i, r in enumerate(reqs):
        if i % 3:  # some requests ran in batches (sizes 1..6), the rest carry no batch id
            r.batch_id = f"b{i // 6}"
            batch_size[r.batch_id] = 1 + (i // 6) % 6
    w.render()
    for k, (bid, size) in enumerate(batch_size.items()):
        first = next(r for r in reqs if r.batch_id == bid)
        w.spans.append({"trace_id": f"{0xba7c4 + k:032x}", "span_id": f"{0xba7c4 + k:016x}", "name": "batch",
                        "kind": "INTERNAL", "start_time": w.ts(first.t), "end_time": w.ts(first.t + 0.1), "duration_ms": 100.0,
                        "service_name": "chat-api", "role": "batch", "batch_id": bid, "batch_size": size})
    # slow: everything on replica-1 in minutes 40-50, plus every 37th request anywhere
    slow = [r for k, r in enumerate(reqs) if (r.replica.instance == "replica-1" and 2400 <= r.t < 3000) or k % 37 == 0]
    a, b = w.ts(600), w.ts(5000)
    store = Store(tmp_path / "c.duckdb")
    try:
        w.write(store)
        con = store.cursor()
        got = counts(con, "chat-api", [(r.trace_id, r.span_id) for r in slow], a, b)
        slow_ids = {r.trace_id for r in slow}
        want: Counter[tuple[str, str, bool]] = Counter()
        for r in reqs:
            if not (600 <= r.t < 5000):
                continue
            for dim in ("instance", "host", "gpu", "model", "shape_len", "input_len_bucket", "output_len_bucket",
                        "batch_size", "priority", "pool", "hour_utc"):
                v = _value(dim, r, batch_size, w.ts)
                if v is not None:
                    want[(dim, v, r.trace_id in slow_ids)] += 1
        assert {(d, v): (s, n) for d, v, s, n in got} == {
            (d, v): (want[(d, v, True)], want[(d, v, False)]) for d, v, _ in want
        }
        top = contrast(con, "chat-api", [(r.trace_id, r.span_id) for r in slow], a, b)
        assert top[0]["dimension"] == "instance" and top[0]["value"] == "replica-1"
        assert all(x["p_value"] < 0.05 and x["lift"] > 1 for x in top)
        assert contrast(con, "chat-api", [], a, b) == []
        con.close()
    finally:
        store.close()

"""The ingest queue and group-commit writer against a real DuckDB file (no HTTP)."""

from __future__ import annotations

import datetime as dt
import itertools
import threading
from pathlib import Path

import pyarrow as pa
import pytest

from collector.decoded import Decoded
from collector.ingest import Ingest
from collector.store import Store
from tailscope.config import load
from tailscope.errors import Overloaded, Unavailable

_ids = itertools.count(1)


def spans(n: int, **extra: list) -> Decoded:
    now = dt.datetime(2026, 11, 23, 12, 0, 0)
    ids = [f"{next(_ids):016x}" for _ in range(n)]
    cols = {
        "trace_id": ["ab" * 16] * n,
        "span_id": ids,
        "start_time": pa.array([now] * n, pa.timestamp("us")),
        "end_time": pa.array([now] * n, pa.timestamp("us")),
        "name": ["req"] * n,
        **extra,
    }
    return Decoded("traces", {"spans": pa.table(cols)}, accepted=n)


@pytest.fixture
def store(tmp_path: Path):
    s = Store(tmp_path / "t.duckdb")
    yield s
    s.close()


def make_ingest(store: Store, **settings) -> Ingest:
    ing = Ingest(store, load(settings, environ={}))
    ing.start()
    return ing


def count(store: Store, sql: str):
    cur = store.cursor()
    try:
        return cur.execute(sql).fetchall()
    finally:
        cur.close()


def test_group_commit_writes_many_requests_in_one_transaction(store):
    ing = make_ingest(store, flush_interval_ms=200, queue_max_spans=100_000)
    try:
        with store._write_lock:  # hold the store like a long retention DELETE would
            futures = [ing.submit(spans(10)) for _ in range(30)]
            assert not any(f.done() for f in futures)
            assert ing.depth == 300
        for f in futures:
            f.result(timeout=30)
    finally:
        ing.stop()
    assert count(store, "SELECT count(*) FROM spans") == [(300,)]
    assert count(store, "SELECT count(*), count(DISTINCT batch_seq), sum(items) FROM ingest_batches") == [(30, 30, 300)]
    # The first request may have been taken alone; the other 29 queued behind the held lock form one group.
    assert ing.metrics.commits <= 2
    assert ing.depth == 0


def test_commit_waits_at_most_the_flush_interval_when_idle(store):
    ing = make_ingest(store, flush_interval_ms=50)
    try:
        fut = ing.submit(spans(1))
        fut.result(timeout=10)  # resolves without any other request arriving
    finally:
        ing.stop()
    assert count(store, "SELECT count(*) FROM spans") == [(1,)]


def test_full_queue_refuses_with_retry_after_and_keeps_what_it_took(store):
    ing = make_ingest(store, queue_max_spans=100, retry_after_s=3)
    try:
        with store._write_lock:
            taken = [ing.submit(spans(40)), ing.submit(spans(40))]
            with pytest.raises(Overloaded) as exc:
                ing.submit(spans(40))
            assert exc.value.status == 429
            assert exc.value.headers == {"Retry-After": "3"}
            assert "queue is full" in exc.value.message
            with pytest.raises(Overloaded):
                ing.submit(spans(21))
            assert ing.submit(spans(20)).done() is False  # exactly fills the queue
            with pytest.raises(Overloaded):
                ing.check_room()
        for f in taken:
            f.result(timeout=30)
    finally:
        ing.stop()
    assert count(store, "SELECT count(*) FROM spans") == [(100,)]
    assert ing.metrics.shed["queue_full"] >= 40


def test_a_request_bigger_than_the_queue_is_taken_when_the_queue_is_empty(store):
    ing = make_ingest(store, queue_max_spans=10)
    try:
        ing.submit(spans(50)).result(timeout=30)
    finally:
        ing.stop()
    assert count(store, "SELECT count(*) FROM spans") == [(50,)]


def test_stop_drains_everything_accepted_then_refuses(store):
    ing = make_ingest(store, flush_interval_ms=5000, queue_max_spans=100_000)
    futures = [ing.submit(spans(7)) for _ in range(12)]
    ing.stop()  # must not wait out the 5 s flush interval, and must write all 12
    assert all(f.done() and f.exception() is None for f in futures)
    assert count(store, "SELECT count(*) FROM spans") == [(84,)]
    with pytest.raises(Unavailable) as exc:
        ing.submit(spans(1))
    assert exc.value.status == 503 and exc.value.headers["Retry-After"] == "1"


def test_not_started_is_unavailable(store):
    ing = Ingest(store, load({}, environ={}))
    with pytest.raises(Unavailable):
        ing.check_room()
    ing.stop()


def test_one_bad_request_does_not_sink_its_group(store):
    """Rows the store refuses (a NOT NULL violation) fail only their own request, with 503."""
    ing = make_ingest(store, flush_interval_ms=1000)
    try:
        with store._write_lock:
            good1 = ing.submit(spans(5))
            bad = spans(3)
            bad.tables["spans"] = bad.tables["spans"].set_column(1, "span_id", pa.array([None, None, None], pa.string()))
            badf = ing.submit(bad)
            good2 = ing.submit(spans(6))
        good1.result(timeout=30)
        good2.result(timeout=30)
        with pytest.raises(Unavailable):
            badf.result(timeout=30)
        ing.check_room()  # the store itself is fine: no circuit breaker
    finally:
        ing.stop()
    assert count(store, "SELECT count(*) FROM spans") == [(11,)]
    assert count(store, "SELECT sum(items) FROM ingest_batches") == [(11,)]
    assert ing.depth == 0


def test_failing_store_answers_503_then_recovers(store, monkeypatch):
    ing = make_ingest(store, retry_after_s=1)
    real_write = store.write
    failing = threading.Event()
    failing.set()

    def write(tables, **kw):
        if failing.is_set():
            raise OSError("No space left on device")
        return real_write(tables, **kw)

    monkeypatch.setattr(store, "write", write)
    try:
        with pytest.raises(Unavailable) as exc:
            ing.submit(spans(4)).result(timeout=30)
        assert "retry later" in exc.value.message
        assert "No space" not in exc.value.message  # no internals to the client
        with pytest.raises(Unavailable):  # circuit breaker: refused at once
            ing.check_room()
        failing.clear()
        ing._failing_until = 0.0  # let the breaker's retry_after_s window pass without sleeping
        ing.submit(spans(4)).result(timeout=30)
        ing.check_room()
    finally:
        ing.stop()
    assert count(store, "SELECT count(*) FROM spans") == [(4,)]
    assert ing.metrics.commit_failures >= 1


def test_sequence_continues_after_restart(tmp_path):
    path = tmp_path / "r.duckdb"
    s = Store(path)
    ing = make_ingest(s)
    ing.submit(spans(2)).result(timeout=30)
    ing.stop()
    s.close()
    s = Store(path)
    ing = make_ingest(s)
    ing.submit(spans(2)).result(timeout=30)
    ing.stop()
    assert count(s, "SELECT list(batch_seq ORDER BY batch_seq) FROM ingest_batches") == [([1, 2],)]
    s.close()


def test_concurrent_submitters_lose_nothing(store):
    ing = make_ingest(store, queue_max_spans=300, flush_interval_ms=5)
    acked: list[int] = []
    refused = 0
    lock = threading.Lock()

    def sender(k: int) -> None:
        nonlocal refused
        for _ in range(20):
            d = spans(25)
            try:
                fut = ing.submit(d)
            except Overloaded:
                with lock:
                    refused += 1
                continue
            fut.result(timeout=30)
            with lock:
                acked.append(d.accepted)

    threads = [threading.Thread(target=sender, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    ing.stop()
    assert count(store, "SELECT count(*) FROM spans") == [(sum(acked),)]
    assert len(acked) + refused == 160


def test_cancelled_waiter_does_not_break_the_writer(store):
    """A handler cancelled while waiting (uvicorn's shutdown timeout) still gets its rows written."""
    import asyncio

    ing = make_ingest(store, flush_interval_ms=1)

    async def scenario() -> None:
        with store._write_lock:
            task = asyncio.ensure_future(ing.put(spans(5)))
            other = ing.submit(spans(6))
            await asyncio.sleep(0)  # let the task submit
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        await asyncio.wrap_future(other)

    try:
        asyncio.run(scenario())
        ing.submit(spans(2)).result(timeout=30)  # the writer is still alive
    finally:
        ing.stop()
    assert count(store, "SELECT count(*) FROM spans") == [(13,)]
    assert ing.depth == 0


def test_checkpoint_threshold_setting_reaches_duckdb(store):
    for mb in (64, 8):
        Ingest(store, load({"checkpoint_threshold_mb": mb}, environ={}))
        ((value,),) = count(store, "SELECT current_setting('checkpoint_threshold')")
        number, unit = value.split()
        assert (float(number), unit) == (mb, "MiB"), value

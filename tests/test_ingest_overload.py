"""Overload over real HTTP: a full queue answers 429 + Retry-After at once, and every 200 is stored."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from ingest_payloads import request_spans

PB = {"content-type": "application/x-protobuf"}


def test_full_queue_answers_429_and_every_ack_is_stored(make_server):
    """The store is held (as a long retention DELETE holds it), so the writer cannot commit.

    Requests that fit in the small queue wait for their commit; the rest are
    refused immediately with 429 and Retry-After, not buffered. Once the store
    is free again every queued request gets its 200 and its spans are stored.
    """
    srv = make_server(queue_max_spans=1000, retry_after_s=2)
    ingest = srv.server.parts["ingest"]
    results: dict[int, tuple[int, str | None, list[str]]] = {}
    answered = threading.Condition()

    def send(k: int) -> None:
        req, ids = request_spans(300)
        r = httpx.post(srv.url + "/v1/traces", content=req.SerializeToString(), headers=PB, timeout=60)
        with answered:
            results[k] = (r.status_code, r.headers.get("retry-after"), ids)
            answered.notify_all()

    with srv.store._write_lock:
        threads = [threading.Thread(target=send, args=(k,)) for k in range(10)]
        for t in threads:
            t.start()
        # 3 requests of 300 fit in 1000 items; the other 7 must be answered while the
        # store is still held (i.e. without waiting for any commit).
        with answered:
            answered.wait_for(lambda: sum(1 for s, _, _ in results.values() if s == 429) >= 7, timeout=60)
            refused = [k for k, (s, _, _) in results.items() if s == 429]
        assert len(refused) == 7, results
        assert ingest.depth == 900
    for t in threads:
        t.join(60)
    statuses = sorted(s for s, _, _ in results.values())
    assert statuses == [200] * 3 + [429] * 7
    for s, retry_after, _ in results.values():
        if s == 429:
            assert retry_after == "2"
    acked = {i for s, _, ids in results.values() if s == 200 for i in ids}
    refused_ids = {i for s, _, ids in results.values() if s == 429 for i in ids}
    stored = {r[0] for r in srv.sql("SELECT span_id FROM spans")}
    assert stored == acked and not (stored & refused_ids)
    text = httpx.get(srv.url + "/metrics", timeout=10).text
    assert "tailscope_ingest_responses_429_total 7" in text
    assert 'tailscope_ingest_shed_items_total{reason="queue_full"} 2100' in text


@pytest.mark.slow
def test_many_senders_against_a_tiny_queue_lose_nothing(make_server):
    """Concurrent senders that retry on 429 like OTLP exporters do; nothing acknowledged goes missing."""
    srv = make_server(queue_max_spans=400, flush_interval_ms=50, retry_after_s=1)
    acked: list[str] = []
    counts = {"200": 0, "429": 0, "other": 0}
    lock = threading.Lock()

    def sender() -> None:
        with httpx.Client(timeout=60) as client:
            for _ in range(6):
                req, ids = request_spans(150)
                body = req.SerializeToString()
                for _attempt in range(20):
                    r = client.post(srv.url + "/v1/traces", content=body, headers=PB)
                    with lock:
                        counts[str(r.status_code) if r.status_code in (200, 429) else "other"] += 1
                    if r.status_code != 429:
                        break
                    assert r.headers["retry-after"] == "1"
                    time.sleep(0.05)  # a short back-off, shorter than Retry-After, to keep the test quick
                if r.status_code == 200:
                    with lock:
                        acked.extend(ids)

    threads = [threading.Thread(target=sender) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert counts["other"] == 0, counts
    assert counts["429"] > 0, counts  # 8 senders x 150 spans against a 400-item queue
    stored = [r[0] for r in srv.sql("SELECT span_id FROM spans")]
    assert len(stored) == len(set(stored))
    assert set(stored) == set(acked)


def test_shutting_down_answers_503_with_retry_after(make_server):
    srv = make_server(retry_after_s=4)
    req, ids = request_spans(10)
    assert httpx.post(srv.url + "/v1/traces", content=req.SerializeToString(), headers=PB, timeout=30).status_code == 200
    srv.server.parts["ingest"].stop()  # what the shutdown hook does before the process exits
    r = httpx.post(srv.url + "/v1/traces", content=request_spans(3)[0].SerializeToString(), headers=PB, timeout=30)
    assert r.status_code == 503 and r.headers["retry-after"] == "4"
    assert "shutting down" in r.json()["error"]
    assert {row[0] for row in srv.sql("SELECT span_id FROM spans")} == set(ids)
